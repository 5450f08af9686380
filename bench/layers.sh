#!/usr/bin/env bash
# Benchmark of `stevedore layers`: planning speed, and bytes shared between related images.
#
#   bench/layers.sh [--bin PATH] [--paths N] [--edges N] [--pairs N] [--runs R]
#
# Speed: a synthetic closure graph of N paths (default 10,000) and about E references (default
# 100,000) is planned with each strategy; the best of R runs is kept, both as the command's own
# planning time (stderr) and as wall time including reading the graph.
#
# Sharing: pairs of related images are planned with each strategy at the same budget, and we
# count the bytes of the second image that sit in layers identical in the first (what a registry
# or a local store would not fetch again). Pairs come from two sources:
#   - a synthetic package set (5,000 paths, heavy-tailed sizes as in real stores): two apps
#     (siblings), two images sharing one app plus another each (shared-app), and the same image
#     after one dependency is updated, which renames it and everything depending on it (update);
#   - a mkstore closure (../shared/bench/mkstore.py; 400 paths): the closures of two random sets
#     of top-level paths. (mkstore's own "same seed, different --paths" pairs share only path
#     names, not references or sizes, so they are not related images.)
# "ceiling" is what a layer per path would share.
set -euo pipefail
cd "$(dirname "$0")/.."
paths=10000 edges=100000 pairs=30 runs=3 bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift ;;
    --paths) paths=$2; shift ;;
    --edges) edges=$2; shift ;;
    --pairs) pairs=$2; shift ;;
    --runs) runs=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  cargo build --release -q
  bin=$PWD/target/release/stevedore
fi
work=$PWD/target/bench-layers
mkdir -p "$work"

python3 - "$bin" "$work" "$paths" "$edges" "$pairs" "$runs" <<'PY'
import glob, json, math, os, random, re, subprocess, sys, time
bin, work, n, e, npairs, runs = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix base32
STRATEGIES = ["popularity", "auto", "dominator"]

def store_hash(rng):
    return "".join(rng.choice(ALPHABET) for _ in range(32))

def write(fn, paths, sizes, refs, keep):
    json.dump([{"path": paths[i], "narSize": sizes[i], "references": sorted({paths[j] for j in refs[i]} | ({paths[i]} if i % 5 == 0 else set()))}
               for i in sorted(keep)], open(fn, "w"))

def closure(refs, roots):
    seen, todo = set(), list(roots)
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(refs[x])
    return seen

def stevedore(*args):
    p = subprocess.run([bin, "layers", *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"stevedore layers {' '.join(args)} failed: {p.stderr}")
    return p

# --- speed ---------------------------------------------------------------------------------
rng = random.Random(1)
paths = [f"/nix/store/{store_hash(rng)}-pkg{i:05d}" for i in range(n)]
sizes = [int(math.exp(rng.gauss(12, 2))) for _ in range(n)]
per = max(1, e // n)
refs = []
for i in range(n):
    r = set()
    while len(r) < min(i, per):
        r.add(int((rng.random() ** 2) * i))  # low indices are the popular libraries
    refs.append(r)
big = f"{work}/graph-{n}-{e}.json"
write(big, paths, sizes, refs, range(n))
print(f"Planning a closure graph of {n} paths and {sum(map(len, refs))} references (best of {runs}):")
print(f"  {'strategy':12} {'planning':>10} {'wall':>10}  layers")
split = json.dumps([["split_paths", [paths[-1]]], ["over", "rest", ["pipe", [["popularity_contest"], ["limit_layers", 98]]]]])
for name, args in [(s, ["--strategy", s]) for s in STRATEGIES] + [("pipeline", ["--pipeline", split])]:
    best_plan = best_wall = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        p = stevedore(big, *args)
        best_wall = min(best_wall, time.perf_counter() - t)
        best_plan = min(best_plan, float(re.search(r"in ([0-9.]+) ms", p.stderr).group(1)))
    print(f"  {name:12} {best_plan:8.1f}ms {best_wall * 1e3:8.1f}ms  {len(json.loads(p.stdout))}")

# --- sharing -------------------------------------------------------------------------------
def package_set(count, seed):
    rng = random.Random(seed)
    paths = [f"/nix/store/{store_hash(rng)}-pkg{i:05d}" for i in range(count)]
    sizes = [int(math.exp(rng.gauss(12, 2))) for _ in range(count)]
    refs = [set(int((rng.random() ** 2) * i) for _ in range(min(i, rng.choice([0, 1, 2, 4, 6, 8, 12])))) if i else set() for i in range(count)]
    return paths, sizes, refs

def updated(paths, sizes, refs, target, rng):
    users = [[] for _ in paths]
    for i, r in enumerate(refs):
        for j in r:
            users[j].append(i)
    paths2, sizes2 = list(paths), list(sizes)
    for i in closure(users, [target]):
        paths2[i] = paths[i][:11] + store_hash(rng) + paths[i][43:]
    sizes2[target] = int(sizes[target] * rng.uniform(0.9, 1.1))
    return paths2, sizes2

def make_pairs(out):
    os.makedirs(out, exist_ok=True)
    ps = package_set(5000, 1)
    paths, sizes, refs = ps
    rng = random.Random(2)
    top = range(2500, 5000)
    for k in range(npairs):
        kind = ["siblings", "shared-app", "update"][k % 3]
        if kind == "siblings":
            a, b = closure(refs, [rng.choice(top)]), closure(refs, [rng.choice(top)])
            write(f"{out}/{k}-{kind}-a.json", *ps, a); write(f"{out}/{k}-{kind}-b.json", *ps, b)
        elif kind == "shared-app":
            app = rng.choice(top)
            a, b = closure(refs, [app, rng.choice(top)]), closure(refs, [app, rng.choice(top)])
            write(f"{out}/{k}-{kind}-a.json", *ps, a); write(f"{out}/{k}-{kind}-b.json", *ps, b)
        else:
            a = closure(refs, [rng.choice(top), rng.choice(top)])
            p2, s2 = updated(paths, sizes, refs, rng.choice(sorted(a)), rng)
            write(f"{out}/{k}-{kind}-a.json", *ps, a); write(f"{out}/{k}-{kind}-b.json", p2, s2, refs, a)

def mkstore_pairs(out):
    fx = f"{work}/mkstore-400"
    if not os.path.exists(f"{fx}/closure.json"):
        subprocess.run(["python3", "../shared/bench/mkstore.py", fx, "--paths", "400", "--files-per-path", "2", "--big-mib", "1", "--seed", "1"],
                       check=True, stdout=subprocess.DEVNULL)
    g = sorted(json.load(open(f"{fx}/closure.json")), key=lambda x: x["path"])
    idx = {x["path"]: i for i, x in enumerate(g)}
    paths = [x["path"] for x in g]
    sizes = [x["narSize"] for x in g]
    refs = [{idx[r] for r in x["references"] if r != x["path"]} for x in g]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(3)
    used = {j for r in refs for j in r}
    tops = sorted(set(range(len(g))) - used)
    for k in range(npairs):
        a = closure(refs, rng.sample(tops, 12))
        b = closure(refs, rng.sample(tops, 12))
        write(f"{out}/{k}-mkstore-a.json", paths, sizes, refs, a); write(f"{out}/{k}-mkstore-b.json", paths, sizes, refs, b)

def evaluate(d, max_layers):
    res = {}
    for fa in sorted(glob.glob(f"{d}/*-a.json")):
        fb = fa[:-7] + "-b.json"
        kind = fa.split("/")[-1].split("-", 1)[1][:-7]
        gb = json.load(open(fb))
        size = {x["path"]: x["narSize"] for x in gb}
        in_a = {x["path"] for x in json.load(open(fa))}
        total = sum(size.values())
        r = res.setdefault(kind, {"total": 0, "ceiling": 0})
        r["total"] += total
        r["ceiling"] += sum(s for p, s in size.items() if p in in_a)
        for s in STRATEGIES:
            plan_a = {tuple(l) for l in json.loads(stevedore(fa, "--strategy", s, "--max-layers", str(max_layers), "-q").stdout)}
            plan_b = json.loads(stevedore(fb, "--strategy", s, "--max-layers", str(max_layers), "-q").stdout)
            r[s] = r.get(s, 0) + sum(sum(size[p] for p in l) for l in plan_b if tuple(l) in plan_a)
    return res

pkg, mk = f"{work}/pairs-pkgset", f"{work}/pairs-mkstore"
make_pairs(pkg)
mkstore_pairs(mk)
for max_layers in (100, 20):
    print(f"\nBytes of the second image in layers identical in the first, maxLayers {max_layers} ({npairs} pairs each):")
    print(f"  {'pairs':12} " + " ".join(f"{s:>11}" for s in STRATEGIES + ["ceiling"]))
    rows = {**evaluate(pkg, max_layers), **evaluate(mk, max_layers)}
    for kind in ["siblings", "shared-app", "update", "mkstore"]:
        r = rows[kind]
        print(f"  {kind:12} " + " ".join(f"{100 * r[s] / r['total']:10.1f}%" for s in STRATEGIES + ["ceiling"]))
    all_pkg = {s: sum(rows[k][s] for k in ["siblings", "shared-app", "update"]) for s in STRATEGIES + ["ceiling", "total"]}
    print(f"  {'pkgset, all':12} " + " ".join(f"{100 * all_pkg[s] / all_pkg['total']:10.1f}%" for s in STRATEGIES + ["ceiling"]))
PY
