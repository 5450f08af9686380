# What images take from pkgs: dockerTools' small helpers, enableFakechroot's proot, and no pkgs
# at all.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# helpers: usrBinEnv, binSh, caCertificates and fakeNss link into the layer; binSh's /bin/sh runs
test_helpers() {
  local out
  out=$(build helpers)
  summary "$out" helpers
  python3 - "$work/helpers.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][-1]["entries"]}
assert m["./usr/bin/env"][6].endswith("-coreutils/bin/env"), m["./usr/bin/env"]
assert m["./bin/sh"][6].endswith("-bash-interactive/bin/bash"), m["./bin/sh"]
for p in ["./etc/ssl/certs/ca-bundle.crt", "./etc/ssl/certs/ca-certificates.crt", "./etc/pki/tls/certs/ca-bundle.crt"]:
    assert m[p][6].endswith("-cacert/etc/ssl/certs/ca-bundle.crt"), m[p]
assert m["./etc/passwd"][6].endswith("-fake-nss/etc/passwd")
EOF
  # binSh's /bin/sh runs.
  load "$out"
  expect_eq "$(podrun helpers:latest /bin/sh -c 'echo sh works')" "sh works"
}
t helpers test_helpers

# fakechroot: enableFakechroot runs fakeRootCommands in the image's root, leaving no bindings in it
test_fakechroot() {
  local out
  out=$(build chroot) || fail "$(tail -5 "$work/chroot.log")"
  summary "$out" chroot
  expect_eq "$(q chroot '[e[0] for e in d["layers"][-1]["entries"] if "made" in e[0]]')" "['./made-in-chroot/', './made-in-chroot/f']"
  # proot's bindings (the store, /dev, /proc, ...) leave nothing in the tree.
  expect_eq "$(q chroot '[e[0] for e in d["layers"][-1]["entries"] if e[0].split("/")[1] in ("nix", "dev", "proc", "sys", "tmp")]')" "[]"
}
t fakechroot test_fakechroot

# minimal-pkgs: the library imported with no pkgs builds a layered image that podman runs
test_minimal_pkgs() {
  local out
  out=$(build minimal) || fail "$(tail -5 "$work/minimal.log")"
  load "$out"
  expect_eq "$(podrun minimal:latest)" "hello from stevedore"
}
t minimal-pkgs test_minimal_pkgs
