# nixpkgs' nixos/tests/docker-tools.nix without a VM: the assertions other areas do not make,
# over the images of tests/nix/nixos-cases.nix (cases.nix's `nixos`), loaded and run with
# podman and read with skopeo and Python.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# layer-order: over three chained buildImages later layers' files win; each runAsRoot sees the
# layers below it unpacked in order
test_layer_order() {
  local out
  out=$(built nixos.layersOrder)
  summary "$out" order
  expect_eq "$(q order 'len(d["layers"])')" 3
  load "$out"
  expect_eq "$(podrun layers-order:latest cat /tmp/layer1 /tmp/layer2 /tmp/layer3 | tr '\n' ' ')" "layer1 layer2 layer3 "
  out=$(built nixos.layersUnpackOrder)
  load "$out"
  expect_eq "$(podrun unpack-order-c:latest cat /layer-order)" abc
}
t layer-order test_layer_order

# repeated-base-layers: a base whose manifest names one layer member twice (held once) unpacks
# under runAsRoot, and the image loads and runs
test_repeated_base_layers() {
  local out twice
  twice=$(built nixos.emptyTwice)
  python3 - "$twice" <<'EOF'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
layers = json.load(t.extractfile("manifest.json"))[0]["Layers"]
assert len(layers) == 2 and layers[0] == layers[1], layers
assert t.getnames().count(layers[0]) == 1, t.getnames()
EOF
  out=$(built nixos.repeatedLayers)
  summary "$out" repeated
  expect_eq "$(q repeated 'len(d["layers"])')" 3
  load "$twice"
  load "$out"
  expect_eq "$(podrun repeated-layer-test:latest sh -c 'cat /ran; exit 0')" "runAsRoot has run."
}
t repeated-base-layers test_repeated_base_layers

# two-layers-and-bulk: maxLayers = 2 gives a 2-layer image that loads and runs; a bulk layer over
# it uses exactly maxLayers = 4 layers with every store path in
test_two_layers_and_bulk() {
  local two bulk
  two=$(built nixos.twoLayers)
  bulk=$(built nixos.bulkOverBase)
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
  out=$(built nixos.minimalPaths)
  bb=$(pkg busybox)
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
    out=$(built "nixos.$a")
    [ "$a" != archStream ] || out=$(load_stream "$out")
    expect_eq "$(skopeo inspect "docker-archive:$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Architecture"])')" arm64 "$a"
  done
  load "$out"
  expect_eq "$(pod image inspect --format '{{.Architecture}}' hello-cross:latest)" arm64
}
t architecture test_architecture

# registry-prefix: a buildImage named host:port/path/name keeps it in RepoTags and in podman
test_registry_prefix() {
  local out
  out=$(built nixos.prefixed)
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
  out=$(built nixos.fakeRootRefs)
  load "$(plain "$out")"
  expect_eq "$(podrun layered-image-with-fake-root-commands:latest /hello/bin/hello)" "hello from stevedore"
  expect_eq "$(podrun layered-image-with-fake-root-commands:latest stat -c %u /home/alice)" 1000
}
t fakeroot-store-refs test_fakeroot_store_refs

# merge-untagged-owners: mergeImages of an untagged buildImage and a fakeRootCommands image loads
# both, the first under its hash tag, the second with its owners
test_merge_untagged_owners() {
  local out tag
  out=$(built nixos.mergedUntaggedOwners)
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
  out=$(built nixos.chrootChown)
  load_stream "$out" >/dev/null
  expect_eq "$(podrun chown-test:latest)" 12345:12345
}
t fakechroot-chown test_fakechroot_chown

# bare-paths: a directory of the sources (./bare-path) in copyToRoot and in contents is at the root
test_bare_paths() {
  local out
  out=$(built nixos.barePathImage)
  load "$out"
  expect_eq "$(podrun build-image-with-path:latest cat /hello.txt)" "hello from a bare path"
  out=$(built nixos.barePathStream)
  load_stream "$out" >/dev/null
  expect_eq "$(podrun layered-image-with-path:latest cat /hello.txt)" "hello from a bare path"
}
t bare-paths test_bare_paths

# nix-shell-no-home: a nix-shell image's homeDirectory is HOME, and is not made
test_nix_shell_no_home() {
  local out
  out=$(built nixos.shellNoHome)
  load_stream "$out" >/dev/null
  expect_eq "$(podrun nix-shell-nonexistent-home:latest 2>&1)" "home=/homeless-shelter absent"
}
t nix-shell-no-home test_nix_shell_no_home

# no-store-mounted: includeStorePaths = false (with and without enableFakechroot) leaves the store
# out, so the program runs only with the host's store mounted
test_no_store_mounted() {
  local out image
  load "$(plain "$(built noStore)")"
  out=$(load_stream "$(built nixos.noStoreChroot)")
  summary "$out" nostore-chroot
  expect_eq "$(q nostore-chroot '[e[0] for l in d["layers"] for e in l["entries"] if "nix" in e[0]]')" "[]"
  for image in nostore:latest nostore-chroot:latest; do
    if podrun "$image" >/dev/null 2>&1; then fail "$image ran without the store"; fi
    expect_eq "$(podrun -v /nix/store:/nix/store:ro "$image")" "hello from stevedore" "$image"
  done
}
t no-store-mounted test_no_store_mounted

# store-symlink: a store path that is a symlink is one in the image, not the tree it points to
test_store_symlink() {
  local out link
  out=$(built nixos.storeSymlink)
  link=$(pkg storeSymlink)
  load_stream "$out" >/dev/null
  expect_eq "$(podrun layeredstoresymlink:latest sh -c "test -L $link && readlink $link")" "$(readlink "$link")"
}
t store-symlink test_store_symlink

# non-root: uid, gid, uname and gname own the store layers; the image runs as that user
test_non_root() {
  local out
  out=$(built nixos.nonRoot)
  out=$(load_stream "$out")
  python3 - "$out" <<'EOF'
import io, json, sys, tarfile
t = tarfile.open(sys.argv[1])
layers = json.load(t.extractfile("manifest.json"))[0]["Layers"]
for name in layers[:-1]:
    for e in tarfile.open(fileobj=io.BytesIO(t.extractfile(name).read())):
        assert (e.uid, e.gid, e.uname, e.gname) == (1000, 1000, "user", "user"), (name, e.name, e.uid, e.gid, e.uname, e.gname)
EOF
  expect_eq "$(podrun non-root-test:latest)" 1000:1000
  expect_eq "$(podrun non-root-test:latest id -u)" 1000
}
t non-root test_non_root

# build-image-dates: buildImage is dated 1970-01-01T00:00:01Z by default, and now with created = "now"
test_build_image_dates() {
  created() { skopeo inspect "docker-archive:$(built "$1")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Created"])'; }
  expect_eq "$(created emptyImage)" 1970-01-01T00:00:01Z
  python3 - "$(created nixos.createdNow)" <<'EOF'
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
  out=$(built nixos.quoting)
  load "$out"
  expect_eq "$(podrun run-as-root-extra-commands:latest cat runAsRoot extraCommands /quoted-root /quoted-extra)" \
    '(runAsRoot)
(extraCommand)
a b|single $x \n|it'\''s "double" $x \ end
a b|single $x \n|it'\''s "double" $x \ end'
}
t quoting test_quoting
