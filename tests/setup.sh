#!/usr/bin/env bash
# Installs what the tests and the example need on Debian 12 (run as root). Idempotent.
# mmdebstrap makes the Debian 13 root of the modern stack (tests/modern/root.sh).
set -euo pipefail
need=()
for pkg in nix-bin podman runc skopeo umoci docker-registry busybox-static fakeroot proot uidmap python3 time curl zstd mmdebstrap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
command -v cargo >/dev/null || { echo "cargo (Rust stable) is needed: https://rustup.rs" >&2; exit 1; }
