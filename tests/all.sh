#!/usr/bin/env bash
# Runs every test: the Rust unit and integration tests (including podman/skopeo/umoci end to
# end), then the Nix end-to-end tests with the real nix-build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
status=0
cargo test --no-fail-fast -- --include-ignored 2>&1 || status=1
if [ -f tests/nix/run.sh ]; then
  bash tests/nix/run.sh || status=1
fi
exit $status
