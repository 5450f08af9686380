#!/usr/bin/env bash
# The test suite on the modern stack (Debian 13: Nix 2.26 with a sandboxing nix-daemon and
# build users, podman 5.4, skopeo 1.18, umoci, docker-registry), from the host:
#
#   bash tests/modern/run.sh              # the Rust tests, the MSRV build, the Nix tests, the Docker tests
#   bash tests/modern/run.sh owners push  # only the Nix and Docker tests with these words in their names
#   STEVEDORE_MODERN_PARTS="nix docker" bash tests/modern/run.sh   # only these parts (of rust msrv nix docker)
#
# The Rust test binaries and the release binary are built here, on the host, with the host's
# toolchain (the binaries the debian12 stack runs), then run inside the root (tests/modern/root.sh
# makes it, tests/modern/enter.sh enters it). The msrv part builds stevedore again inside, with
# Debian 13's own cargo and rustc (Cargo.toml's rust-version), offline, from the crates of
# Cargo.lock vendored here into target/msrv/vendor. The output has cargo's "test result:" lines,
# "msrv: N passed, N failed", and the Nix and Docker runners' "N passed, N failed" lines.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
list=$(mktemp)
trap 'rm -f "$list" "$list.json"' EXIT

parts=${STEVEDORE_MODERN_PARTS:-rust msrv nix docker}
status=0
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
# The root has no network: the crates for the MSRV build come from here (fetched if missing;
# cargo vendor keeps the crates' own mtimes, so a build there is not redone for nothing).
if [[ " $parts " == *" msrv "* ]]; then
  if ! cargo vendor --locked --versioned-dirs "$repo/target/msrv/vendor" >/dev/null 2>"$list.err"; then
    tail -5 "$list.err"
    echo "FAIL msrv-build (cargo vendor failed)"
    echo "msrv: 0 passed, 1 failed"
    parts=${parts//msrv/} status=1
  fi
  rm -f "$list.err"
fi
[ -n "${parts// /}" ] || exit $status
# The list lives in the host's /tmp, which the root does not see; the repository it does.
cp "$list" "$repo/target/modern-tests.txt"
rc=0
STEVEDORE_MODERN_PARTS=$parts STEVEDORE_MODERN_ROOT=$root \
  bash tests/modern/enter.sh bash tests/modern/suite.sh "$repo/target/modern-tests.txt" "${bin:-none}" "$@" || rc=$?
# Say which layer failed when no test did (a crash, a kill, the namespace's teardown).
[ $rc -eq 0 ] || { echo "debian13: the suite exited $rc"; status=1; }
exit $status
