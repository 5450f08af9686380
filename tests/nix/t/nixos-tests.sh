# nixpkgs' nixos/tests/docker-tools.nix without a VM: the assertions other areas do not make,
# over the images of tests/nix/nixos-cases.nix (cases.nix's `nixos`), loaded and run with
# podman and read with skopeo and Python.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# layer-order: over three chained buildImages later layers' files win; each runAsRoot sees the
# layers below it unpacked in order
test_layer_order() {
  local out
  out=$(build nixos.layersOrder) || fail "$(tail -5 "$work/nixos.layersOrder.log")"
  summary "$out" order
  expect_eq "$(q order 'len(d["layers"])')" 3
  load "$out"
  expect_eq "$(podrun layers-order:latest cat /tmp/layer1 /tmp/layer2 /tmp/layer3 | tr '\n' ' ')" "layer1 layer2 layer3 "
  out=$(build nixos.layersUnpackOrder) || fail "$(tail -5 "$work/nixos.layersUnpackOrder.log")"
  load "$out"
  expect_eq "$(podrun unpack-order-c:latest cat /layer-order)" abc
}
t layer-order test_layer_order

# repeated-base-layers: a base whose manifest names one layer file twice unpacks under runAsRoot,
# and the image loads and runs
test_repeated_base_layers() {
  local out
  out=$(build nixos.repeatedLayers) || fail "$(tail -5 "$work/nixos.repeatedLayers.log")"
  summary "$out" repeated
  expect_eq "$(q repeated 'len(d["layers"])')" 3
  expect_eq "$(q repeated 'len({l["diff_id"] for l in d["layers"][:2]})')" 1
  load "$(build nixos.emptyTwice)"
  load "$out"
  expect_eq "$(podrun repeated-layer-test:latest sh -c 'cat /ran; exit 0')" "runAsRoot has run."
}
t repeated-base-layers test_repeated_base_layers

# two-layers-and-bulk: maxLayers = 2 gives a 2-layer image that loads and runs; a bulk layer over
# it uses exactly maxLayers = 4 layers with every store path in
test_two_layers_and_bulk() {
  local two bulk
  two=$(build nixos.twoLayers) || fail "$(tail -5 "$work/nixos.twoLayers.log")"
  bulk=$(build nixos.bulkOverBase) || fail "$(tail -5 "$work/nixos.bulkOverBase.log")"
  summary "$two" two
  summary "$bulk" bulk
  expect_eq "$(q two 'len(d["layers"])')" 2
  expect_eq "$(q bulk 'len(d["layers"])')" 4
  expect_eq "$(q bulk '[l["diff_id"] for l in d["layers"]][:2]')" "$(q two '[l["diff_id"] for l in d["layers"]]')"
  load "$(plain "$two")"
  expect_eq "$(podrun two-layered-image:latest)" "hello from stevedore"
  load "$bulk"
  expect_eq "$(podrun layered-bulk-layer:latest ls /bin/hello)" /bin/hello
  expect_eq "$(podrun layered-bulk-layer:latest hello)" "hello from stevedore"
}
t two-layers-and-bulk test_two_layers_and_bulk

# minimal-store-paths: an image whose tree refers to busybox alone has busybox alone in its store,
# though its extraCommands used more
test_minimal_store_paths() {
  local out bb
  out=$(build nixos.minimalPaths) || fail "$(tail -5 "$work/nixos.minimalPaths.log")"
  bb=$(nix-build "$repo/tests/nix/pkgs.nix" -A busybox --no-out-link 2>/dev/null)
  load "$out"
  podrun no-store-paths:latest ls / >/dev/null
  expect_eq "$(podrun no-store-paths:latest ls /nix/store)" "$(basename "$bb")"
}
t minimal-store-paths test_minimal_store_paths

# architecture: architecture = "arm64" (buildImage, streamLayeredImage) and a package set whose
# host platform is aarch64 give arm64 images, as skopeo and podman read them
test_architecture() {
  local a out
  for a in archImage archStream cross; do
    out=$(build "nixos.$a") || fail "$a: $(tail -5 "$work/nixos.$a.log")"
    if [ "$a" = archStream ]; then "$out" >"$work/arch-stream.tar" 2>/dev/null; out=$work/arch-stream.tar; fi
    expect_eq "$(skopeo inspect "docker-archive:$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Architecture"])')" arm64 "$a"
  done
  load "$out"
  expect_eq "$(pod image inspect --format '{{.Architecture}}' hello-cross:latest)" arm64
}
t architecture test_architecture

# registry-prefix: a buildImage named host:port/path/name keeps it in RepoTags and in podman
test_registry_prefix() {
  local out
  out=$(build nixos.prefixed) || fail "$(tail -5 "$work/nixos.prefixed.log")"
  summary "$out" prefixed
  expect_eq "$(q prefixed 'd["repo_tags"]')" "['localhost:5000/team/prefixed:latest']"
  expect_eq "$(nixeval 'c.nixos.prefixed.imageName')" '"localhost:5000/team/prefixed"'
  load "$out"
  pod images --format '{{.Repository}}:{{.Tag}}' | grep -qxF localhost:5000/team/prefixed:latest || fail "$(pod images)"
  expect_eq "$(podrun localhost:5000/team/prefixed:latest)" "hello from stevedore"
}
t registry-prefix test_registry_prefix

# fakeroot-store-refs: a store path only fakeRootCommands' output refers to is in the image with
# its closure, beside the owner fakeRootCommands gave
test_fakeroot_store_refs() {
  local out
  out=$(build nixos.fakeRootRefs) || fail "$(tail -5 "$work/nixos.fakeRootRefs.log")"
  load "$(plain "$out")"
  expect_eq "$(podrun layered-image-with-fake-root-commands:latest /hello/bin/hello)" "hello from stevedore"
  expect_eq "$(podrun layered-image-with-fake-root-commands:latest stat -c %u /home/alice)" 1000
}
t fakeroot-store-refs test_fakeroot_store_refs

# merge-untagged-owners: mergeImages of an untagged buildImage and a fakeRootCommands image loads
# both, the first under its hash tag, the second with its owners
test_merge_untagged_owners() {
  local out tag
  out=$(build nixos.mergedUntaggedOwners) || fail "$(tail -5 "$work/nixos.mergedUntaggedOwners.log")"
  tag=$(nixeval 'c.nixos.untaggedImage.imageTag' | tr -d '"')
  # Not the image the previous test loaded: this one must come from the merged archive.
  pod rmi -f layered-image-with-fake-root-commands:latest >/dev/null 2>&1 || true
  load "$out"
  expect_eq "$(podrun "bash-no-tag:$tag" sh -c 'echo untagged runs')" "untagged runs"
  expect_eq "$(podrun layered-image-with-fake-root-commands:latest stat -c %u /home/alice)" 1000
}
t merge-untagged-owners test_merge_untagged_owners

# fakechroot-chown: a chown in fakeRootCommands under enableFakechroot shows in the image
test_fakechroot_chown() {
  local out
  out=$(build nixos.chrootChown) || fail "$(tail -5 "$work/nixos.chrootChown.log")"
  "$out" >"$work/chown.tar" 2>/dev/null
  load "$work/chown.tar"
  expect_eq "$(podrun chown-test:latest)" 12345:12345
}
t fakechroot-chown test_fakechroot_chown

# bare-paths: a directory of the sources (./bare-path) in copyToRoot and in contents is at the root
test_bare_paths() {
  local out
  out=$(build nixos.barePathImage) || fail "$(tail -5 "$work/nixos.barePathImage.log")"
  load "$out"
  expect_eq "$(podrun build-image-with-path:latest cat /hello.txt)" "hello from a bare path"
  out=$(build nixos.barePathStream) || fail "$(tail -5 "$work/nixos.barePathStream.log")"
  "$out" >"$work/bare-path.tar" 2>/dev/null
  load "$work/bare-path.tar"
  expect_eq "$(podrun layered-image-with-path:latest cat /hello.txt)" "hello from a bare path"
}
t bare-paths test_bare_paths

# nix-shell-no-home: a nix-shell image's homeDirectory is HOME, and is not made
test_nix_shell_no_home() {
  local out
  out=$(build nixos.shellNoHome) || fail "$(tail -5 "$work/nixos.shellNoHome.log")"
  "$out" >"$work/shell-no-home.tar" 2>/dev/null
  load "$work/shell-no-home.tar"
  expect_eq "$(podrun nix-shell-nonexistent-home:latest 2>&1)" "home=/homeless-shelter absent"
}
t nix-shell-no-home test_nix_shell_no_home

# no-store-mounted: includeStorePaths = false leaves the program out, so it runs only with the
# host's store mounted
test_no_store_mounted() {
  local out
  out=$(build noStore) || fail "$(tail -5 "$work/noStore.log")"
  load "$(plain "$out")"
  if podrun nostore:latest >/dev/null 2>&1; then fail "ran without the store"; fi
  expect_eq "$(podrun -v /nix/store:/nix/store:ro nostore:latest)" "hello from stevedore"
}
t no-store-mounted test_no_store_mounted

# build-image-dates: buildImage is dated 1970-01-01T00:00:01Z by default, and now with created = "now"
test_build_image_dates() {
  created() { skopeo inspect "docker-archive:$(build "nixos.$1")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Created"])'; }
  expect_eq "$(created createdDefault)" 1970-01-01T00:00:01Z
  python3 - "$(created createdNow)" <<'EOF'
import datetime, sys
t = datetime.datetime.fromisoformat(sys.argv[1].replace("Z", "+00:00"))
age = datetime.datetime.now(datetime.timezone.utc) - t
assert datetime.timedelta(seconds=-60) < age < datetime.timedelta(days=1), sys.argv[1]
EOF
}
t build-image-dates test_build_image_dates

# quoting: runAsRoot and extraCommands run as written: quotes, parentheses, $ and backslashes
test_quoting() {
  local out
  out=$(build nixos.quoting) || fail "$(tail -5 "$work/nixos.quoting.log")"
  load "$out"
  expect_eq "$(podrun run-as-root-extra-commands:latest cat runAsRoot extraCommands /quoted-root /quoted-extra)" \
    '(runAsRoot)
(extraCommand)
a b|single $x \n|it'\''s "double" $x \ end
a b|single $x \n|it'\''s "double" $x \ end'
}
t quoting test_quoting
