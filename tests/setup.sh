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

# The Rust toolchain: cargo and rustc at least Cargo.toml's rust-version.
need=$(sed -nE 's/^rust-version[[:space:]]*=[[:space:]]*"([0-9.]+)".*/\1/p' "$(dirname "$0")/../Cargo.toml" | head -1)
[ -n "$need" ] || { echo "setup.sh: no rust-version in Cargo.toml" >&2; exit 1; }
for tool in cargo rustc; do
  # "rustc 1.85.1 (4eb161250 2025-03-15)", "cargo 1.95.0-nightly (...)": the version, without a tag.
  found=$("$tool" --version 2>/dev/null | awk '{ sub(/-.*/, "", $2); print $2; exit }') || true
  if [ -z "$found" ]; then
    echo "$tool not found: Rust $need or newer is needed (Cargo.toml's rust-version; https://rustup.rs)" >&2
    exit 1
  fi
  # Oldest first: the needed version must not sort after the found one.
  if [ "$(printf '%s\n%s\n' "$need" "$found" | sort -V | head -1)" != "$need" ]; then
    echo "$tool $found is too old: Rust $need or newer is needed (Cargo.toml's rust-version; https://rustup.rs)" >&2
    exit 1
  fi
done
