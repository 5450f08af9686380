# buildImage without runAsRoot: the copyToRoot layer, passthru, keepContentsDirlinks.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# build-image: buildImage's one layer holds copyToRoot and the closure; podman runs it as any user.
# Copies (not links) of copyToRoot owned by uid:gid, the closure of the config and of the
# contents in the layer, /nix/store readable by everyone.
test_build_image() {
  local out tag layer
  out=$(build pureImage) || fail "$(tail -5 "$work/pureImage.log")"
  [[ "$out" == *-docker-image-pure.tar ]] || fail "name: $out"
  summary "$out" pure
  tag=$(nixeval 'c.pureImage.imageTag' | tr -d '"')
  expect_eq "${#tag}" 32
  expect_eq "$tag" "$(basename "$out" | cut -c1-32)"
  expect_eq "$(q pure 'd["repo_tags"]')" "['pure:$tag']"
  expect_eq "$(q pure 'len(d["layers"])')" 1
  python3 - "$work/pure.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][0]["entries"]}
assert m["./bin/busybox"][1] == "0" and (m["./bin/busybox"][3], m["./bin/busybox"][4]) == (1000, 100), m["./bin/busybox"]
assert m["./tmp/"][2] == "0o1777", m["./tmp/"]
assert m["/nix/"][2] == m["/nix/store/"][2] == "0o555", (m["/nix/"], m["/nix/store/"])
names = {n.split("/")[3] for n in m if n.startswith("/nix/store/") and len(n.split("/")) > 4}
for p in ("-hello", "-greeting", "-busybox"):
    assert any(n.endswith(p) for n in names), (p, names)
assert not any("docker-layer" in n or "config.json" in n for n in names), names
EOF
  load "$out"
  expect_eq "$(podrun "pure:$tag")" "hello from stevedore"
  expect_eq "$(podrun --user 65534 "pure:$tag")" "hello from stevedore"
  # passthru as nixpkgs has it.
  expect_eq "$(nixeval 'c.pureImage.buildArgs.uid')" 1000
  layer=$(nix-build "$cases" -A pureImage.layer "${nargs[@]}" --no-out-link 2>/dev/null)
  [ -f "$layer/layer.tar" ] && [ -f "$layer/json" ] || fail "passthru.layer: $layer"
  expect_eq "$(sha256sum <"$layer/layer.tar" | cut -c1-64)" "$(cat "$layer/checksum")"
  # Nothing to copy and no store paths: one layer with only the root directory.
  summary "$(build emptyImage)" empty
  expect_eq "$(q empty '[[e[0] for e in l["entries"]] for l in d["layers"]]')" "[['./']]"
  skopeo inspect "docker-archive:$(build emptyImage)" >/dev/null
  # keepContentsDirlinks: rsync -k turns lib -> lib64 into a directory, -K keeps the link.
  summary "$(build dirlinksCopy)" copy
  summary "$(build dirlinksKeep)" keep
  expect_eq "$(q copy '[(e[0], e[1]) for e in d["layers"][0]["entries"] if not e[0].startswith("/")]')" \
    "[('./', '5'), ('./lib/', '5'), ('./lib/a', '0'), ('./lib/b', '0'), ('./lib64/', '5'), ('./lib64/a', '0')]"
  expect_eq "$(q keep '[(e[0], e[1]) for e in d["layers"][0]["entries"] if not e[0].startswith("/")]')" \
    "[('./', '5'), ('./lib', '2'), ('./lib64/', '5'), ('./lib64/a', '0'), ('./lib64/b', '0')]"
}
t build-image test_build_image
