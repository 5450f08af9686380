#!/usr/bin/env bash
# The main job on a fresh Debian machine: build stevedore, build the example image with the real
# nix-build (tests/nix/cases.nix `hello`: streamLayeredImage over a small package set made from
# host tools, since nixpkgs cannot be fetched here), pipe it into `podman load` and run it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/setup.sh
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
cargo build --release --quiet
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
mkdir -p "$pkg/bin" && cp target/release/stevedore "$pkg/bin/"
stevedore=$(nix-store --add "$pkg")
stream=$(nix-build tests/nix/cases.nix -A hello --argstr stevedorePath "$stevedore" --no-out-link)
echo "built $stream" >&2
"$stream" | podman --cgroup-manager=cgroupfs --runtime /usr/sbin/runc load
tag=$(nix-instantiate --eval --raw -E "let i = (import ./tests/nix/cases.nix { stevedorePath = \"$stevedore\"; }).hello; in i.imageName + \":\" + i.imageTag" 2>/dev/null \
  || nix-instantiate --eval -E "let i = (import ./tests/nix/cases.nix { stevedorePath = \"$stevedore\"; }).hello; in i.imageName + \":\" + i.imageTag" | tr -d '"')
podman --cgroup-manager=cgroupfs --runtime /usr/sbin/runc run --rm --network=none \
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$tag"
