#!/usr/bin/env bash
# Runs every test: the Rust unit and integration tests (including podman/skopeo/umoci end to
# end), then the Nix end-to-end tests with the real nix-build. Ends with one summary line.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh || exit 1
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast --lib --bins --tests -- --include-ignored 2>&1 | tee "$log" || status=1
if [ -f tests/nix/run.sh ]; then
  bash tests/nix/run.sh 2>&1 | tee -a "$log" || status=1
fi
# Sum cargo's "test result" lines and the Nix runner's "N passed, N failed" line.
read -r passed failed < <(awk '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  /^([a-z]+: )?[0-9]+ passed, [0-9]+ failed/ { n = ($1 ~ /:$/) ? 2 : 1; p += $n; f += $(n+2) }
  END { print p + 0, f + 0 }' "$log")
[ "$failed" -eq 0 ] || status=1
echo "total: $passed passed, $failed failed"
exit $status
