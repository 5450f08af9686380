#!/usr/bin/env bash
# Makes, once, the Debian 13 (trixie) root that the modern-stack tests run in, and prints its
# path. The root is cached under $STEVEDORE_ROOT_CACHE (default /var/cache/stevedore) in a
# directory named after a hash of the package list and of the setup below, so later runs (and
# other checkouts) reuse it; a change to either makes a new one. Needs root and mmdebstrap
# (installed from the host's mirror if missing). The mirror is the host's apt one, or
# STEVEDORE_DEBIAN_MIRROR. The root itself is never written by the tests: tests/modern/enter.sh
# runs them on an overlay above it.
set -euo pipefail

suite=trixie
packages=(
  # The stack under test.
  nix-bin podman runc conmon netavark catatonit skopeo umoci docker.io docker-cli containerd docker-registry
  # Signatures and referrers, checked with the real clients.
  cosign oras
  # What the tests and fixtures call.
  busybox-static fakeroot proot uidmap python3 time curl zstd ca-certificates openssl
  iproute2 procps util-linux mount
  # For the ssh-ng remote build (a later milestone).
  openssh-server openssh-client
  # The MSRV build (suite.sh's msrv-build): Debian 13's own Rust, and the C compiler that
  # ring, zstd-sys and rusqlite's bundled SQLite build with.
  cargo rustc gcc libc6-dev
)

# Runs in the new root (through chroot: only plain file edits here) before it is kept.
setup_root() {
  local r=$1
  # Build users, as a multi-user Nix install has them.
  chroot "$r" groupadd --system nixbld
  for i in $(seq 1 8); do
    chroot "$r" useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin \
      --gid nixbld --groups nixbld --comment "Nix build user $i" "nixbld$i"
  done
  # Mount points that enter.sh needs in every root.
  mkdir -p "$r/.oldroot"
}

cache=${STEVEDORE_ROOT_CACHE:-/var/cache/stevedore}
key=$( { echo "$suite"; printf '%s\n' "${packages[@]}"; declare -f setup_root; } | sha256sum | cut -c1-16)
root=$cache/$suite-$key

if [ -e "$root/.complete" ]; then
  touch "$root/.complete"
  echo "$root"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "root.sh: must run as root (mmdebstrap, chroot)" >&2; exit 1; }
mkdir -p "$cache"
# One maker at a time; a second run waits, then finds the root made.
exec 9>"$cache/.lock"
flock 9
if [ -e "$root/.complete" ]; then
  echo "$root"
  exit 0
fi

# The mirror the host's apt uses (deb822 first, then the one-line format).
mirror=${STEVEDORE_DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
  mirror=$(sed -nE 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p' /etc/apt/sources.list.d/debian.sources | grep -v -- -security | head -1)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(sed -nE 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' /etc/apt/sources.list | grep -v -- -security | head -1)
fi
[ -n "$mirror" ] || { echo "root.sh: no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2; exit 1; }

if ! command -v mmdebstrap >/dev/null; then
  echo "root.sh: installing mmdebstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >&2; } \
    || { echo "root.sh: cannot install mmdebstrap" >&2; exit 1; }
fi

tmp=$cache/.making-$suite-$key
log=$cache/$suite-$key.log
rm -rf "$tmp"
echo "root.sh: making the $suite root in $root from $mirror (log: $log)" >&2
t0=$SECONDS
# Check-Valid-Until off: the host's mirror may serve a snapshot whose Release has expired.
if ! mmdebstrap --variant=minbase --mode=root --format=directory \
  --aptopt='Acquire::Check-Valid-Until "false"' \
  --include="$(IFS=,; echo "${packages[*]}")" \
  "$suite" "$tmp" "$mirror" >"$log" 2>&1; then
  echo "root.sh: mmdebstrap failed making the $suite root from $mirror; the end of $log:" >&2
  tail -20 "$log" >&2
  rm -rf "$tmp"
  exit 1
fi
setup_root "$tmp" >>"$log" 2>&1 || { echo "root.sh: setting up the root failed; see $log" >&2; tail -5 "$log" >&2; rm -rf "$tmp"; exit 1; }
touch "$tmp/.complete"
mv "$tmp" "$root"
echo "root.sh: made $root in $((SECONDS - t0)) s" >&2
# Roots of other package lists that no run has used for a week.
find "$cache" -mindepth 2 -maxdepth 2 -name .complete -mtime +7 -printf '%h\n' 2>/dev/null | while read -r old; do
  [ "$old" != "$root" ] && rm -rf "$old" "$old.log"
done
echo "$root"
