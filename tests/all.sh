#!/usr/bin/env bash
# Runs every test on two stacks:
#   debian12  the host's Debian 12 packages (Nix 2.8 unsandboxed, podman 4.3, skopeo 1.9): the
#             Rust unit and integration tests (including podman/skopeo/umoci end to end), then
#             the Nix end-to-end tests with the real nix-build;
#   debian13  the same test binaries and Nix tests inside a Debian 13 root (Nix 2.26 through a
#             sandboxing nix-daemon with build users, podman 5.4, skopeo 1.18): tests/modern/.
# STEVEDORE_STACKS="debian13" runs only the named stacks. Ends with one summary line per stack
# and a total line.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh || exit 1
stacks=${STEVEDORE_STACKS:-debian12 debian13}
logs=()
trap 'rm -f "${logs[@]}"' EXIT
status=0

# count LOG: passed, failed and skipped, summed over cargo's "test result" lines and the
# runners' "N passed, N failed[, N skipped]" lines.
count() {
  awk '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    /^([a-z]+: )?[0-9]+ passed, [0-9]+ failed/ { n = ($1 ~ /:$/) ? 2 : 1; p += $n; f += $(n+2); if ($(n+5) ~ /^skipped/) s += $(n+4) }
    END { print p + 0, f + 0, s + 0 }' "$1"
}

debian12() {
  export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
  local rc=0
  cargo test --no-fail-fast --lib --bins --tests -- --include-ignored || rc=1
  bash tests/nix/run.sh || rc=1
  return $rc
}
debian13() {
  bash tests/modern/run.sh
}

summary=()
tp=0 tf=0
for s in $stacks; do
  case $s in debian12 | debian13) ;; *) echo "unknown stack $s (debian12, debian13)"; exit 1 ;; esac
  log=$(mktemp)
  logs+=("$log")
  t0=$SECONDS
  echo "=== $s ==="
  ( "$s" ) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r p f k < <(count "$log")
  # A stack that failed without a failing test (a build or setup error) counts one failure.
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  [ "$f" -eq 0 ] || status=1
  echo "=== $s took $((SECONDS - t0)) s ==="
  summary+=("$s: $p passed, $f failed$([ "$k" -eq 0 ] || echo ", $k skipped")")
  tp=$((tp + p)) tf=$((tf + f))
done
printf '%s\n' "${summary[@]}"
echo "total: $tp passed, $tf failed"
exit $status
