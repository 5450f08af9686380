#!/usr/bin/env bash
# The test suite on Debian 13's packages; runs inside the root (tests/modern/run.sh enters it).
# Starts a nix-daemon that builds in its sandbox with build users, as a multi-user install
# does, then runs the host-built Rust test binaries listed in LIST ("NAME PATH" lines),
# tests/nix/run.sh with STEVEDORE_BIN (and an sshd on loopback for its remote build), and
# Docker 26 with both image stores (docker.sh). Its output has cargo's "test result:" lines and the
# Nix runner's "N passed, N failed" line; the exit status is non-zero if anything failed.
#
#   suite.sh LIST STEVEDORE_BIN [WORD...]   # WORDs pick Nix and Docker tests by name
#   STEVEDORE_MODERN_PARTS="rust nix" ...   # only these parts (of rust, nix, docker)
set -uo pipefail
list=$1 bin=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd -P)
parts=${STEVEDORE_MODERN_PARTS:-rust nix docker}
status=0

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
