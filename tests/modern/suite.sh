#!/usr/bin/env bash
# The test suite on Debian 13's packages; runs inside the root (tests/modern/run.sh enters it).
# Starts a nix-daemon that builds in its sandbox with build users, as a multi-user install
# does, then runs the host-built Rust test binaries listed in LIST ("NAME PATH" lines), builds
# stevedore with Debian 13's own cargo and rustc (msrv), runs tests/nix/run.sh with
# STEVEDORE_BIN (and an sshd on loopback for its remote build), and Docker 26 with both image
# stores (docker.sh). Its output has cargo's "test result:" lines and the other parts'
# "[msrv: ]N passed, N failed" lines; the exit status is non-zero if anything failed.
#
#   suite.sh LIST STEVEDORE_BIN [WORD...]   # WORDs pick Nix and Docker tests by name
#   STEVEDORE_MODERN_PARTS="rust nix" ...   # only these parts (of rust, msrv, nix, docker)
set -uo pipefail
list=$1 bin=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd -P)
parts=${STEVEDORE_MODERN_PARTS:-rust msrv nix docker}
status=0
# Tests that need tools only this stack has (oras, cosign) fail rather than skip without them.
export STEVEDORE_STACK=debian13

# Written to the overlay, so gone with it. No substituters: nothing can be fetched here.
# sandbox-fallback = false: a sandbox that cannot be set up is an error, not an unsandboxed
# build. The stand-in fixtures run host tools by absolute path, so the sandbox gets /usr and
# the library directories; /bin stays out of it (merged /usr: a symlink there breaks every
# sandboxed build, and Nix's own sandbox-paths already gives /bin/sh).
mkdir -p /etc/nix
cat >/etc/nix/nix.conf <<'EOF'
build-users-group = nixbld
sandbox = true
sandbox-fallback = false
extra-sandbox-paths = /usr /lib /lib64
substituters =
experimental-features = nix-command flakes
EOF
# The daemon uses the store itself; clients (everything after) talk to it.
env -u NIX_REMOTE nix-daemon >/tmp/nix-daemon.log 2>&1 &
daemon=$!
export NIX_REMOTE=daemon
for _ in $(seq 100); do [ -S /nix/var/nix/daemon-socket/socket ] && break; sleep 0.1; done
[ -S /nix/var/nix/daemon-socket/socket ] || { echo "nix-daemon did not start:"; cat /tmp/nix-daemon.log; echo "0 passed, 1 failed"; exit 1; }
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT
echo "stack: Debian $(cat /etc/debian_version), $(nix --version), $(podman --version), $(skopeo --version), umoci $(umoci --version | awk '{print $NF}')"

if [[ " $parts " == *" rust "* ]]; then
  # As cargo test runs them: from the package root, every test, one binary after another.
  while read -r name exe; do
    [ -n "$name" ] || continue
    echo "     Running $name ($exe)"
    (cd "$repo" && CARGO_MANIFEST_DIR=$repo "$exe" --include-ignored) 2>&1 || { echo "error: $name exited $?, to rerun pass \`--test $name\`"; status=1; }
  done <"$list"
fi

if [[ " $parts " == *" msrv "* ]]; then
  # Cargo.toml's rust-version is Debian 13's Rust, and is what builds stevedore here: `apt install
  # cargo` on Debian 13 builds it. Offline, from the crates run.sh vendored (target/msrv/vendor),
  # into target/msrv/target, kept between runs. msrv-build: the library and the binary, as a
  # user builds them; msrv-check-tests: the tests, examples and dev-dependencies compile too.
  msrv_pass=0 msrv_fail=0
  msrv() {
    local name=$1 t0=$SECONDS
    shift
    if (cd "$repo" && cargo "$@" --locked --offline --target-dir target/msrv/target \
      --config 'source.crates-io.replace-with="msrv-vendor"' \
      --config "source.msrv-vendor.directory=\"$repo/target/msrv/vendor\"") >"/tmp/$name.log" 2>&1; then
      msrv_pass=$((msrv_pass + 1)); echo "ok   $name (rustc $have, $((SECONDS - t0)) s)"
    else
      tail -30 "/tmp/$name.log"
      msrv_fail=$((msrv_fail + 1)); echo "FAIL $name (rustc $have, $((SECONDS - t0)) s)"; status=1
    fi
  }
  want=$(sed -nE 's/^rust-version[[:space:]]*=[[:space:]]*"([0-9.]+)".*/\1/p' "$repo/Cargo.toml" | head -1)
  have=$(rustc --version | awk '{ print $2 }')
  # The same major.minor: a rust-version lowered below what is built here would go untested.
  if [ -z "$want" ] || [ "$(echo "$want" | cut -d. -f1-2)" != "$(echo "$have" | cut -d. -f1-2)" ]; then
    echo "FAIL msrv-build: Cargo.toml's rust-version is [$want], Debian 13's rustc $have"
    msrv_fail=1 status=1
  else
    msrv msrv-build build
    msrv msrv-check-tests check --tests --examples
  fi
  echo "msrv: $msrv_pass passed, $msrv_fail failed"
fi

if [[ " $parts " == *" nix "* ]]; then
  # A second store for the remote build, over ssh-ng to an sshd on loopback (root's key; the
  # files go with the overlay).
  mkdir -p /root/.ssh /run/sshd
  chmod 700 /root/.ssh
  ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
  cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys
  ssh-keygen -q -A
  printf 'Host builder\n  HostName 127.0.0.1\n  Port 2222\n  User root\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n' >/root/.ssh/config
  if /usr/sbin/sshd -p 2222 -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password -E /tmp/sshd.log; then
    export STEVEDORE_NIX_REMOTE_ROOT=/tmp/remote-store
    export STEVEDORE_NIX_REMOTE="ssh-ng://builder?remote-store=local%3Froot%3D$STEVEDORE_NIX_REMOTE_ROOT"
  else
    echo "sshd did not start: $(tail -3 /tmp/sshd.log)"; status=1
  fi
  STEVEDORE_BIN=$bin STEVEDORE_NIX_SANDBOX=1 bash "$repo/tests/nix/run.sh" "$@" || { echo "suite: tests/nix/run.sh exited $?"; status=1; }
fi

if [[ " $parts " == *" docker "* ]]; then
  bash "$repo/tests/modern/docker.sh" "$bin" "$@" || { echo "suite: tests/modern/docker.sh exited $?"; status=1; }
fi
exit $status
