# runAsRoot, without a VM, over a layered base image; exportImage.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# run-as-root: runAsRoot's changes over a base image are the new layer, and exportImage flattens it.
# nixpkgs' redis example: shadowSetup's useradd, a chowned /data, a deleted base file as a
# whiteout, extraCommands, then the flattened file system from exportImage; and a stream as
# the base image.
test_run_as_root() {
  local out root
  out=$(build redisLike) || fail "$(tail -5 "$work/redisLike.log")"
  summary "$out" redis
  summary "$(build rootBase)" rootbase
  expect_eq "$(q redis '[l["diff_id"] for l in d["layers"]][:-1]')" "$(q rootbase '[l["diff_id"] for l in d["layers"]]')"
  expect_eq "$(q redis 'd["config"]["config"]["Env"]')" "['BASE=1', 'FOO=bar']"
  python3 - "$work/redis.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][-1]["entries"]}
assert "./etc/.wh.removed" in m, sorted(m)
assert m["./data/"][3] == 999 and m["./data/"][4] == 999, m["./data/"]
assert "./extra.txt" in m and "./bin/hello" in m
# Only what changed: the base's busybox links are not repeated, nor its store paths.
assert "./bin/sh" not in m and "./keep/file" not in m, sorted(m)
assert not any("-busybox" in n for n in m), sorted(m)
assert any(n.endswith("-greeting/share/greeting") for n in m), sorted(m)
EOF
  load "$(plain "$out")"
  expect_eq "$(podrun redis-like:latest)" "hello from stevedore"
  expect_eq "$(podrun redis-like:latest sh -c 'id redis; stat -c "%U:%G %n" /data /data/made; cat /keep/file /extra.txt; pwd; test -e /etc/removed || echo removed' | tr '\n' ';')" \
    "uid=999(redis) gid=999(redis) groups=999(redis);redis:redis /data;root:root /data/made;kept;extra;/data;removed;"
  root=$(build redisRoot) || fail "$(tail -5 "$work/redisRoot.log")"
  python3 - "$root" <<'EOF'
import sys, tarfile
t = tarfile.open(sys.argv[1])
m = {e.name: e for e in t}
assert not any(".wh." in n for n in m), [n for n in m if ".wh." in n]
assert "./etc/removed" not in m and "./keep/file" in m and "./data/made" in m, sorted(m)
assert (m["./data"].uid, m["./data"].gid) == (999, 999), m["./data"]
assert m["./bin/sh"].issym() and m["./bin/hello"].isfile()
assert all(e.mtime == 315532800 for e in m.values())
# copyToRoot is copied: its own store path is not needed, what it refers to is.
assert any(n.endswith("-greeting/share/greeting") for n in m)
assert not any(n.endswith("-hello/bin/hello") for n in m)
assert b"redis:x:999:999" in t.extractfile("./etc/passwd").read()
EOF
  # A stream as the base image, picked by name and tag.
  out=$(build streamBase) || fail "$(tail -5 "$work/streamBase.log")"
  summary "$(plain "$out")" onstream
  "$(build hello)" >"$work/hello-base.tar" 2>/dev/null
  summary "$work/hello-base.tar" hellobase
  expect_eq "$(q onstream '[e[0] for e in d["layers"][-1]["entries"] if "on-stream" in e[0]]')" "['./on-stream']"
  expect_eq "$(q onstream '[l["diff_id"] for l in d["layers"]][:-1]')" "$(q hellobase '[l["diff_id"] for l in d["layers"]]')"
}
t run-as-root test_run_as_root
