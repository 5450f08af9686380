#!/usr/bin/env bash
# Runs CMD... (default: an interactive shell) inside the Debian 13 root of tests/modern/root.sh,
# as root, and exits with CMD's status.
#
#   bash tests/modern/enter.sh nix --version
#   KEEP=1 bash tests/modern/enter.sh ...   # keep the scratch directory (written files, logs)
#
# The root is entered with a private mount namespace and pivot_root, not chroot: the kernel
# refuses user namespaces to a chrooted process (runAsRoot and Nix's sandbox need them), and
# containers-storage wants / to be a mount point. Everything is written to a scratch directory
# that is removed afterwards: an overlay above the cached root, and plain directories for
# /nix, /tmp and the container stores (overlayfs cannot hold podman's or Docker's overlays).
# The repository and ../shared are bound at their own absolute paths, so host-built test
# binaries and the paths baked into them work inside. Private PID, network (loopback only),
# IPC and UTS namespaces: when CMD ends, whatever it started (nix-daemon, dockerd, a registry)
# is stopped, then killed with the namespace, and no mount, process or port reaches the host.
set -euo pipefail

if [ "${1:-}" = --inside ]; then
  # PID 1 of the new namespaces, still seeing the host's root.
  shift
  root=$1 scratch=$2 cwd=$3
  shift 3
  binds=()
  while [ "$1" != -- ]; do binds+=("$1"); shift; done
  shift
  m=$scratch/mnt
  mkdir -p "$scratch"/{upper,work,mnt,nix,tmp,var-tmp,containers,docker,containerd}
  chmod 1777 "$scratch/tmp" "$scratch/var-tmp"
  mount -t overlay overlay -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$m"
  mount -t proc proc "$m/proc"
  mount --rbind /sys "$m/sys"
  mount --rbind /dev "$m/dev"
  # Not the host's /dev/shm and message queues: this IPC namespace gets its own.
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$m/dev/shm"
  if [ -d "$m/dev/mqueue" ]; then mount -t mqueue mqueue "$m/dev/mqueue"; fi
  mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$m/run"
  mount --bind "$scratch/tmp" "$m/tmp"
  mount --bind "$scratch/var-tmp" "$m/var/tmp"
  mkdir -p "$m/nix" "$m/var/lib/containers" "$m/var/lib/docker" "$m/var/lib/containerd"
  mount --bind "$scratch/nix" "$m/nix"
  mount --bind "$scratch/containers" "$m/var/lib/containers"
  mount --bind "$scratch/docker" "$m/var/lib/docker"
  mount --bind "$scratch/containerd" "$m/var/lib/containerd"
  for b in "${binds[@]}"; do
    mkdir -p "$m$b"
    mount --rbind "$b" "$m$b"
  done
  cd "$m"
  pivot_root . .oldroot
  umount -l /.oldroot
  hostname stevedore-trixie
  ip link set lo up
  cd "$cwd"

  # Stops what CMD left running: TERM to every other process of the namespace, a while for
  # daemons to shut down cleanly, then KILL (the namespace's end would kill them anyway).
  stop_all() {
    kill -TERM -1 2>/dev/null || true
    local i p s live
    for i in $(seq 100); do
      live=0
      for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = 1 ] && continue
        # Zombies are gone but for their exit status. `read`, not $(<...): no subshell to count.
        read -r s 2>/dev/null <"$p/stat" || continue
        s=${s##*) }
        [ "${s%% *}" = Z ] || { live=1; break; }
      done
      [ $live -eq 0 ] && return 0
      sleep 0.1
    done
    echo "enter.sh: killing what did not stop within 10 s:" >&2
    ps -e -o pid=,args= 2>/dev/null | awk '$1 != 1' >&2 || true
    kill -KILL -1 2>/dev/null || true
  }
  # A clean environment: the host's PATH and HOME name things that are not in the root.
  keep=()
  for v in CI KEEP TERM RUST_BACKTRACE RUST_TEST_THREADS $(compgen -v STEVEDORE_ || true); do
    [ -n "${!v+x}" ] && keep+=("$v=${!v}")
  done
  rc=0
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root \
    LANG=C.UTF-8 PODMAN_IGNORE_CGROUPSV1_WARNING=1 "${keep[@]}" "$@" || rc=$?
  stop_all
  exit $rc
fi

[ "$(id -u)" -eq 0 ] || { echo "enter.sh: must run as root" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
root=${STEVEDORE_MODERN_ROOT:-$(bash "$here/root.sh")}
[ -e "$root/.complete" ] || { echo "enter.sh: $root is not a finished root (tests/modern/root.sh makes one)" >&2; exit 1; }
binds=("$repo")
[ -d "$repo/../shared" ] && binds+=("$(cd "$repo/../shared" && pwd -P)")
# A target directory outside the repository, for host-built test binaries.
if [ -n "${CARGO_TARGET_DIR:-}" ] && [ -d "$CARGO_TARGET_DIR" ]; then
  t=$(cd "$CARGO_TARGET_DIR" && pwd -P)
  [[ "$t/" == "$repo/"* ]] || binds+=("$t")
fi
cwd=$(pwd -P)
inside=0
for b in "${binds[@]}"; do [[ "$cwd/" == "$b/"* ]] && inside=1; done
[ $inside -eq 1 ] || cwd=/
[ $# -gt 0 ] || set -- bash -i

# On the host's disk, not in the root's overlay: its own directories must be able to hold
# overlay mounts.
scratch=$(mktemp -d "${STEVEDORE_SCRATCH:-/var/tmp}/stevedore-trixie.XXXXXX")
# The one thing inside that shows outside: podman and dockerd make cgroups (libpod_parent,
# docker) in the host's hierarchies, which are shared. Those made meanwhile and left empty go.
cgroups_before=$(find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort)
cleanup() {
  comm -13 <(echo "$cgroups_before") <(find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort) \
    | awk '{ print length($0), $0 }' | sort -rn | cut -d' ' -f2- | while read -r d; do rmdir "$d" 2>/dev/null; done
  if [ -n "${KEEP:-}" ]; then echo "enter.sh: kept $scratch" >&2; else rm -rf "$scratch"; fi
}
trap cleanup EXIT
rc=0
# --kill-child: if this script is killed, the namespace's PID 1 goes too, and all inside it.
unshare --mount --propagation private --pid --fork --kill-child --net --ipc --uts \
  "$BASH" "$here/enter.sh" --inside "$root" "$scratch" "$cwd" "${binds[@]}" -- "$@" || rc=$?
exit $rc
