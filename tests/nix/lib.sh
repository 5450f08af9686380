# The framework of the Nix end-to-end tests, sourced by tests/nix/run.sh (not run on its own).
#
# A test is a shell function in one of the area files tests/nix/t/AREA.sh, registered and run at
# once with `t NAME FUNCTION`. It runs in a subshell with `set -e`: any failing command fails it,
# and so do fail/expect_eq. Its output goes to $work/test-NAME.out, whose last 25 lines are shown
# if it fails. To add a test: write the function in the area file it belongs to, a one-line
# comment above it naming what it proves, and a `t NAME FUNCTION` line after it; a new area is a
# new file in tests/nix/t/, added to run.sh's list of areas.
#
# What a test can use (set by `setup`):
#   $repo            the repository (the working directory too)
#   $work            the scratch directory: logs, archives, summaries (kept with KEEP=1)
#   $cases           tests/nix/cases.nix, the images to build
#   "${nargs[@]}"    the arguments cases.nix needs (--argstr stevedorePath ...), for nix-build
#                    and nix-instantiate calls of its own
#   $stevedore_path  the store path holding bin/stevedore (the binary under test)
#   $sandboxed       non-empty if Nix sandboxes every build (STEVEDORE_NIX_SANDBOX)

# setup [WORD...]: checks or sets Nix's configuration, makes the work dir (removed on exit unless
# KEEP is set), adds the binary (STEVEDORE_BIN, else cargo build --release) to the store, and keeps
# the WORDs as test filters. Exits with "0 passed, 1 failed" if any of that fails.
setup() {
  cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
  repo=$PWD
  sandboxed=${STEVEDORE_NIX_SANDBOX:-}
  if [ -n "$sandboxed" ]; then
    local nix_sandbox
    nix_sandbox=$(nix config show sandbox 2>/dev/null || nix show-config 2>/dev/null | sed -n 's/^sandbox = //p')
    [ "$nix_sandbox" = true ] || { echo "STEVEDORE_NIX_SANDBOX is set but Nix's sandbox is [$nix_sandbox]"; echo "0 passed, 1 failed"; exit 1; }
  else
    export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
  fi

  work=$(mktemp -d /tmp/stevedore-nix-tests.XXXXXX)
  chmod 755 "$work"
  # Images podman loaded, one a line (tests run in subshells, so not a shell array).
  touch "$work/loaded"
  trap cleanup EXIT

  passed=0
  failed=0
  skipped=0
  failures=()
  started=$SECONDS
  filters=("$@")

  local bin
  if [ -n "${STEVEDORE_BIN:-}" ]; then
    bin=$STEVEDORE_BIN
  else
    echo "building stevedore (cargo build --release)..."
    cargo build --release --quiet || { echo "0 passed, 1 failed"; exit 1; }
    bin=$repo/target/release/stevedore
  fi
  mkdir -p "$work/stevedore/bin"
  cp "$bin" "$work/stevedore/bin/stevedore"
  stevedore_path=$(nix-store --add "$work/stevedore") || { echo "0 passed, 1 failed"; exit 1; }
  echo "stevedore: $stevedore_path"

  cases=$repo/tests/nix/cases.nix
  nargs=(--argstr stevedorePath "$stevedore_path")
}

# cleanup: (the EXIT trap) removes the images podman loaded, and the work dir unless KEEP is set.
cleanup() {
  while read -r i; do [ -n "$i" ] && pod rmi -f "$i" >/dev/null 2>&1; done <"$work/loaded"
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}

# --- Running tests ------------------------------------------------------------------------------

# selected NAME: whether NAME contains one of the filter words (all names do if there are none).
selected() {
  [ ${#filters[@]} -eq 0 ] && return 0
  local w
  for w in "${filters[@]}"; do [[ "$1" == *"$w"* ]] && return 0; done
  return 1
}

# t NAME FUNCTION: runs FUNCTION as test NAME (if selected) in a subshell with set -e, counts it
# as passed, failed or skipped, and prints its result and time (and the end of its output if it
# failed).
t() {
  selected "$1" || return 0
  local t0=$SECONDS rc
  rm -f "$work/test-$1.skip"
  # Not inside `if`: there, bash would ignore the subshell's `set -e`.
  ( set -e; test_name=$1; "$2" ) >"$work/test-$1.out" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && [ -e "$work/test-$1.skip" ]; then
    skipped=$((skipped + 1))
    echo "skip $1: $(cat "$work/test-$1.skip")"
  elif [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    echo "ok   $1 ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL $1 ($((SECONDS - t0)) s)"
    sed 's/^/     | /' "$work/test-$1.out" | tail -25
  fi
}

# finish: prints the time taken, the failed tests' names and the last line "N passed, N failed"
# (", N skipped" added if any were); its status is non-zero if any test failed.
finish() {
  echo "nix tests took $((SECONDS - started)) s"
  [ "$failed" -eq 0 ] || echo "failed: ${failures[*]}"
  echo "$passed passed, $failed failed$([ "$skipped" -eq 0 ] || echo ", $skipped skipped")"
  [ "$failed" -eq 0 ]
}

# --- Assertions (in a test) ---------------------------------------------------------------------

# fail MESSAGE...: prints MESSAGE (indented) to stderr and returns 1, which fails the test.
fail() { echo "    $*" >&2; return 1; }
# expect_eq ACTUAL EXPECTED [WHAT]: fails unless ACTUAL is EXPECTED; WHAT names the value.
expect_eq() { [ "$1" = "$2" ] || fail "expected [$2], got [$1]${3:+ ($3)}"; }
# skip REASON...: ends the test as skipped, REASON shown on its result line.
skip() { echo "$*" >"$work/test-$test_name.skip"; exit 0; }

# --- Nix ----------------------------------------------------------------------------------------

# build ATTR [NIX-BUILD-OPTIONS...]: nix-builds cases.nix's ATTR, prints the output path; the log
# goes to $work/ATTR.log.
build() {
  nix-build "$cases" -A "$1" "${nargs[@]}" --no-out-link "${@:2}" 2>"$work/$1.log"
}
# built ATTR: build's output path, or the test fails with the end of the build's log.
built() {
  build "$1" || fail "$1: $(tail -5 "$work/$1.log")"
}
# pkg ATTR: tests/nix/pkgs.nix's ATTR, built; prints its store path.
pkg() {
  nix-build "$repo/tests/nix/pkgs.nix" -A "$1" --no-out-link 2>>"$work/pkgs.log"
}
# nixeval EXPR: evaluates EXPR with `c` bound to the cases set, prints the JSON result (the log
# goes to $work/eval.log).
nixeval() {
  nix-instantiate --eval --strict --json -E "let c = import $cases { stevedorePath = \"$stevedore_path\"; }; in $1" 2>"$work/eval.log"
}

# --- Archives -----------------------------------------------------------------------------------

# summary ARCHIVE NAME: tests/nix/inspect.py's JSON of a Docker archive (plain or gzip), written
# to $work/NAME.json for q.
# refused EXPR PATTERN: evaluating EXPR (as nixeval) fails with a message matching PATTERN.
refused() {
  ! nixeval "$1" >/dev/null || fail "accepted: $1"
  grep -q -- "$2" "$work/eval.log" || fail "$1: $(tail -2 "$work/eval.log")"
}

summary() {
  python3 "$repo/tests/nix/inspect.py" "$1" >"$work/$2.json"
}
# q NAME EXPR: prints the Python expression EXPR over `d`, the summary in $work/NAME.json.
q() {
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$work/$1.json"
}
# plain ARCHIVE: prints the path of the archive uncompressed (a .gz or .zst is decompressed into
# $work; skopeo 1.9 and podman 4.3 only read plain ones).
plain() {
  case "$1" in
    *.gz) zcat "$1" >"$work/$(basename "$1" .gz)"; echo "$work/$(basename "$1" .gz)" ;;
    *.zst) zstd -q -dc "$1" >"$work/$(basename "$1" .zst)"; echo "$work/$(basename "$1" .zst)" ;;
    *) echo "$1" ;;
  esac
}

# --- Podman -------------------------------------------------------------------------------------

# pod ARGS...: podman with the flags this host needs (cgroupfs, runc).
pod() { podman --cgroup-manager=cgroupfs --runtime /usr/sbin/runc "$@"; }
# podrun [OPTIONS...] IMAGE [CMD...]: runs a throwaway container with no network.
podrun() {
  pod run --rm --network=none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
}
# load_stream EXECUTABLE: runs a stream executable (streamLayeredImage's) into $work, and loads
# the archive; prints its path.
load_stream() {
  local tar
  tar=$work/$(basename "$1").tar
  "$1" >"$tar" 2>"$tar.log" || { tail -5 "$tar.log" >&2; return 1; }
  load "$tar"
  echo "$tar"
}
# load ARCHIVE: podman loads it, remembering the image for cleanup. (An image loaded otherwise,
# e.g. from a pipe, goes into $work/loaded by hand: `echo NAME:TAG >>"$work/loaded"`.)
load() {
  local out
  out=$(pod load -i "$1" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" | sed -nE 's/^Loaded image(\(s\))?: //p' >>"$work/loaded"
}
