# mergeImages, and buildImage's fromImageName/fromImageTag picking one image of a merged archive.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# merge: mergeImages' archive loads as three images, busybox's layer once; buildImage picks one
test_merge() {
  local out
  out=$(build merged) || fail "$(tail -5 "$work/merged.log")"
  [[ "$out" == */*-merge-docker-images ]] || fail "derivation name: $out"
  python3 - "$out" <<'EOF'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
names = t.getnames()
m = json.load(t.extractfile("manifest.json"))
assert [e["RepoTags"] for e in m] == [["registry.example/team/hello:v1"], ["merge-two:latest"], ["merge-three:latest"]], m
assert len(names) == len(set(names)), "duplicate members"
layers = [l for e in m for l in e["Layers"]]
assert all(l.endswith("/layer.tar") and len(l) == 74 for l in layers), layers
assert len(set(layers)) < len(layers), "no layer is shared"
assert sorted(set(layers)) == sorted(n for n in names if n.endswith("/layer.tar"))
EOF
  load "$out"
  pod image exists registry.example/team/hello:v1
  pod image exists merge-two:latest
  pod image exists merge-three:latest
  expect_eq "$(podrun registry.example/team/hello:v1)" "hello from stevedore"
  expect_eq "$(podrun merge-two:latest)" "two"
  expect_eq "$(podrun merge-three:latest)" "three"
  build merged --check >/dev/null || fail "not reproducible: $(tail -3 "$work/merged.log")"
  # buildImage's fromImageName/fromImageTag pick an image of the merged archive, not the first.
  local picked
  picked=$(build pickedFromMerged) || fail "$(tail -5 "$work/pickedFromMerged.log")"
  skopeo inspect --config "docker-archive:$out:merge-three:latest" >"$work/three.json"
  summary "$picked" picked
  expect_eq "$(q picked '[l["diff_id"] for l in d["layers"]][:-1]')" \
    "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rootfs"]["diff_ids"])' "$work/three.json")"
  load "$picked"
  expect_eq "$(podrun picked:latest)" "picked three"
}
t merge test_merge
