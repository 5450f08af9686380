#!/usr/bin/env python3
"""A store closure of real, compressible data: copies of this host's binaries, libraries and
Python trees, for benchmarks where mkstore's random file contents would make compression
meaningless.

    hoststore.py OUT_DIR [--mib N]

Writes OUT_DIR/store/<hash>-<name> (one store path per host tree, copied with symlinks kept and
store modes: 0444/0555 files, 0555 directories), OUT_DIR/closure.json in the shape of
`exportReferencesGraph`, and OUT_DIR/conf.json: a stream conf with one layer per path. Trees are
taken in a fixed order, none over 40% of the total, until about N MiB (default 1200) are copied. The bytes depend on the
host's packages: compare contenders within one run, never numbers across machines.
"""
import argparse, hashlib, json, os, shutil, stat, sys

TREES = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/bin",
    "/usr/lib/python3.11",
    "/usr/lib/python3",
    "/usr/share/perl",
    "/usr/libexec",
    "/usr/sbin",
    "/usr/share/locale",
    "/usr/share/doc",
    "/usr/lib/gcc",
]
ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def store_hash(name):
    h = hashlib.sha256(name.encode()).digest()
    return "".join(ALPHABET[b % 32] for b in h[:32])


def copy_tree(src, dst, budget):
    """Copies regular files, directories and symlinks of src (sorted, no other kinds) into dst
    until `budget` bytes are copied; returns the bytes copied."""
    copied = 0
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        out = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(out, exist_ok=True)
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                dirs.remove(d)
                files.append(d)
        for f in sorted(files):
            s, t = os.path.join(root, f), os.path.join(out, f)
            try:
                st = os.lstat(s)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), t)
            elif stat.S_ISREG(st.st_mode) and copied < budget:
                try:
                    shutil.copyfile(s, t)
                except OSError:
                    continue
                os.chmod(t, 0o555 if st.st_mode & 0o111 else 0o444)
                copied += st.st_size
    for root, dirs, _ in os.walk(dst):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o555)
    os.chmod(dst, 0o555)
    return copied


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mib", type=int, default=1200)
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    store = os.path.join(a.out, "store")
    os.makedirs(store)
    budget = a.mib << 20
    paths = []
    for tree in TREES:
        if budget <= 0 or not os.path.isdir(tree):
            continue
        name = tree.strip("/").replace("/", "-")
        path = os.path.join(store, f"{store_hash(name)}-{name}")
        # No tree takes more than 40% of the total, so there are several layers.
        budget -= copy_tree(tree, path, min(budget, (a.mib << 20) * 2 // 5))
        paths.append(path)
    closure = [{"path": p, "narHash": "sha256:" + "0" * 52, "narSize": 0, "closureSize": 0, "references": [p]} for p in paths]
    json.dump(closure, open(os.path.join(a.out, "closure.json"), "w"))
    conf = {"store_layers": [[p] for p in paths], "customisation_layer": None, "from_image": None, "config": {},
            "architecture": "amd64", "created": "1970-01-01T00:00:01Z", "mtime": "1970-01-01T00:00:01Z",
            "uid": 0, "gid": 0, "uname": "root", "gname": "root", "store_dir": store, "repo_tag": "bench:latest"}
    json.dump(conf, open(os.path.join(a.out, "conf.json"), "w"))
    print(f"{len(paths)} store paths, {((a.mib << 20) - budget) / 1e6:.0f} MB under {store}", file=sys.stderr)


main()
