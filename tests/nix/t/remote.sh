# Remote builds, run only with STEVEDORE_NIX_REMOTE and STEVEDORE_NIX_REMOTE_ROOT: a second Nix
# store over ssh-ng (sshd on loopback, a store under another root), which tests/modern/suite.sh
# sets up.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# remote-build: images built on the remote store have the local build's paths and NAR hashes.
# Built there, not copied (the remote store has the build log): as a fleet of builders (Nix's
# distributed builds, Hydra) would build them.
test_remote_build() {
  local a drv out here
  for a in helloGz owners redisLike nixDbImage merged ociArchive shellCommand; do
    drv=$(nix-instantiate "$cases" -A "$a" "${nargs[@]}" 2>"$work/remote-$a.log") || fail "$a: $(tail -3 "$work/remote-$a.log")"
    out=$(nix build --store "$STEVEDORE_NIX_REMOTE" --eval-store auto "$drv^*" --no-link --print-out-paths 2>>"$work/remote-$a.log") \
      || fail "$a on the remote: $(grep -v '^warning' "$work/remote-$a.log" | tail -3)"
    [ -e "$STEVEDORE_NIX_REMOTE_ROOT$out" ] || fail "$a: $out is not in the remote store"
    # Built there, not copied: the remote store has the build's log.
    nix-store --store "local?root=$STEVEDORE_NIX_REMOTE_ROOT" --read-log "$drv" 2>/dev/null | grep -q . || fail "$a: no build log in the remote store"
    here=$(build "$a") || fail "$a: $(tail -3 "$work/$a.log")"
    expect_eq "$out" "$here" "$a"
    expect_eq "$(nix-store --store "local?root=$STEVEDORE_NIX_REMOTE_ROOT" -q --hash "$out")" "$(nix-store -q --hash "$here")" "$a's NAR hash"
  done
}
[ -z "${STEVEDORE_NIX_REMOTE:-}" ] || t remote-build test_remote_build
