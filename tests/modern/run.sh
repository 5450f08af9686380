#!/usr/bin/env bash
# The test suite on the modern stack (Debian 13: Nix 2.26 with a sandboxing nix-daemon and
# build users, podman 5.4, skopeo 1.18, umoci, docker-registry), from the host:
#
#   bash tests/modern/run.sh              # the Rust tests, the Nix tests, the Docker tests
#   bash tests/modern/run.sh owners push  # only the Nix and Docker tests with these words in their names
#   STEVEDORE_MODERN_PARTS="nix docker" bash tests/modern/run.sh   # only these parts
#
# The Rust test binaries and the release binary are built here, on the host, with the host's
# toolchain (Debian 13's rustc 1.85 is older than Cargo.lock needs), then run inside the root
# (tests/modern/root.sh makes it, tests/modern/enter.sh enters it). The output has cargo's
# "test result:" lines and ends with the Nix runner's "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
list=$(mktemp)
trap 'rm -f "$list" "$list.json"' EXIT

parts=${STEVEDORE_MODERN_PARTS:-rust nix docker}
t0=$SECONDS
root=$(bash tests/modern/root.sh) || { echo "debian13: no root"; echo "0 passed, 1 failed"; exit 1; }
echo "root: $root (ready in $((SECONDS - t0)) s)"

# The same binaries `cargo test --lib --bins --tests` builds (nothing to do after a host run).
if ! cargo test --no-run --lib --bins --tests --message-format=json >"$list.json" 2>"$list.err"; then
  cat "$list.err"; rm -f "$list.err"
  echo "0 passed, 1 failed"; exit 1
fi
rm -f "$list.err"
python3 - "$list.json" >"$list" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
EOF
[ -s "$list" ] || { echo "no test binaries"; echo "0 passed, 1 failed"; exit 1; }
bin=${STEVEDORE_BIN:-}
if [ -z "$bin" ] && [[ " $parts " == *" nix "* || " $parts " == *" docker "* ]]; then
  cargo build --release --quiet || { echo "0 passed, 1 failed"; exit 1; }
  bin=$repo/target/release/stevedore
fi
# The list lives in the host's /tmp, which the root does not see; the repository it does.
cp "$list" "$repo/target/modern-tests.txt"
rc=0
STEVEDORE_MODERN_PARTS=$parts STEVEDORE_MODERN_ROOT=$root \
  bash tests/modern/enter.sh bash tests/modern/suite.sh "$repo/target/modern-tests.txt" "${bin:-none}" "$@" || rc=$?
# Say which layer failed when no test did (a crash, a kill, the namespace's teardown).
[ $rc -eq 0 ] || echo "debian13: the suite exited $rc"
exit $rc
