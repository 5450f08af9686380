# The Nix database in images: buildImageWithNixDb, buildLayeredImageWithNixDb and
# streamLayeredImage's includeNixDB.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# nix-db: each image's database registers its closure; Nix verifies it, and a changed file fails.
# Nix itself (Debian's nix-store, pointed at the image's unpacked root) checks every path
# against its registered hash.
test_nix_db() {
  local kind root dir
  for kind in image layered stream; do
    root=$(build "nixDbRoots.$kind") || fail "$kind: $(tail -5 "$work/nixDbRoots.$kind.log")"
    dir=$work/nixdb-$kind
    mkdir -p "$dir"
    tar -C "$dir" -xf "$root"
    ls "$dir/nix/var/nix/gcroots/docker" | grep -q -- '-hello$' || fail "$kind: no GC root"
    nix-store --store "local?root=$dir" --verify --check-contents >"$work/verify-$kind.log" 2>&1 || fail "$kind: $(tail -3 "$work/verify-$kind.log")"
    expect_eq "$(nix-store --store "local?root=$dir" -qR "$dir"/nix/var/nix/gcroots/docker/*-hello 2>/dev/null | sed 's/.*-//' | sort | tr '\n' ' ')" "busybox greeting hello " "$kind"
  done
  # The check notices a changed file.
  chmod -R u+w "$dir/nix/store"
  echo tampered >"$(echo "$dir"/nix/store/*-greeting)/share/greeting"
  if nix-store --store "local?root=$dir" --verify --check-contents >/dev/null 2>&1; then fail "a tampered store verified"; fi
}
t nix-db test_nix_db
