# streamLayeredImage and buildLayeredImage: the stream script and passthru, compressors, owners
# and modes, reproducible builds, layering (maxLayers, layeringPipeline), fromImage, dates, tags.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# stream: the stream script writes the image asked for (config, tag, store layers); podman runs it
test_stream() {
  local out
  out=$(build hello)
  [[ "$out" == */*-stream-hello ]] || fail "derivation name: $out"
  head -c 2 "$out" | grep -q '#!' || fail "not a script"
  "$out" --help | grep -q -- --repo_tag || fail "--help does not mention --repo_tag"
  "$out" >"$work/hello.tar" 2>"$work/hello.stream.log"
  skopeo inspect "docker-archive:$work/hello.tar" >"$work/hello.inspect"
  python3 - "$work/hello.inspect" <<'EOF'
import json, sys
i = json.load(open(sys.argv[1]))
assert i["Architecture"] == "amd64", i["Architecture"]
assert i["Os"] == "linux"
assert "FOO=bar" in i["Env"], i["Env"]
assert i["Created"] == "1970-01-01T00:00:01Z", i["Created"]
assert len(i["Layers"]) >= 3, i["Layers"]  # busybox, greeting/hello, customisation
EOF
  summary "$work/hello.tar" hello
  expect_eq "$(q hello 'd["repo_tags"]')" "['registry.example/team/hello:v1']"
  expect_eq "$(q hello 'd["config"]["config"]["Cmd"][0].endswith("-hello/bin/hello")')" True
  # Every closure path is in a store layer, none of the implementation paths are.
  expect_eq "$(q hello 'any(e[0].endswith("-greeting/share/greeting") for l in d["layers"] for e in l["entries"])')" True
  expect_eq "$(q hello 'any(("-base.json" in e[0] or "-customisation-layer" in e[0]) for l in d["layers"] for e in l["entries"])')" False
  # The customisation layer: ./ names, busybox's tree joined as symlinks.
  expect_eq "$(q hello '[e[0] for e in d["layers"][-1]["entries"]][:3]')" "['./', './bin/', './bin/ash']"
  load "$work/hello.tar"
  expect_eq "$(podrun registry.example/team/hello:v1)" "hello from stevedore"
  # -t renames, as nixpkgs' stream script's --repo_tag does.
  "$out" -t localhost/renamed:x 2>/dev/null | pod load >/dev/null
  echo localhost/renamed:x >>"$work/loaded"
  pod image exists localhost/renamed:x
}
t stream test_stream

# passthru: imageName, imageTag, isExe, stream, .override and shadowSetup evaluate as nixpkgs' do
test_passthru() {
  expect_eq "$(nixeval 'c.hello.imageTag')" '"v1"'
  expect_eq "$(nixeval 'c.hello.isExe')" true
  expect_eq "$(nixeval 'c.hello.imageName')" '"registry.example/team/hello"'
  expect_eq "$(nixeval 'c.hello.passthru.imageTag')" '"v1"'
  expect_eq "$(nixeval 'c.helloGz.imageTag')" '"v1"'
  expect_eq "$(nixeval 'c.helloGz.stream.isExe')" true
  expect_eq "$(nixeval 'c.helloGz.isExe or false')" false
  expect_eq "$(nixeval 'c.helloOverridden.imageTag')" '"v2"'
  expect_eq "$(nixeval 'builtins.isString c.dockerTools.shadowSetup && builtins.match ".*-shadow/bin.*" c.dockerTools.shadowSetup != null')" true
}
t passthru test_passthru

# archives: gz, zstd and none archives are the streamed image (none byte for byte), podman runs one
test_archives() {
  local gz zst none
  gz=$(build helloGz)
  zst=$(build helloZstd)
  none=$(build helloNone)
  [[ "$gz" == *-hello.tar.gz && "$zst" == *-hello.tar.zst && "$none" == *-hello.tar ]] || fail "names: $gz $zst $none"
  expect_eq "$(head -c 2 "$gz" | od -An -tx1 | tr -d ' ')" 1f8b
  expect_eq "$(head -c 4 "$zst" | od -An -tx1 | tr -d ' ')" 28b52ffd
  # Same conf, so the same image (config digest) whatever the compression, and as streamed.
  "$(build hello)" >"$work/hello-streamed.tar" 2>/dev/null
  local ids=()
  local gz_plain zst_plain
  gz_plain=$(plain "$gz")
  zst_plain=$(plain "$zst")
  for f in "$work/hello-streamed.tar" "$gz_plain" "$zst_plain" "$none"; do
    ids+=("$(skopeo inspect --config "docker-archive:$f" | sha256sum | cut -c1-64)")
  done
  expect_eq "${ids[1]}" "${ids[0]}" gz
  expect_eq "${ids[2]}" "${ids[0]}" zstd
  expect_eq "${ids[3]}" "${ids[0]}" none
  cmp -s "$none" "$work/hello-streamed.tar" || fail "the uncompressed archive differs from the stream"
  load "$zst_plain"
  expect_eq "$(podrun registry.example/team/hello:v1)" "hello from stevedore"
}
t archives test_archives

# owners: fakeRootCommands' owners and modes, extraCommands' files, in the layer and the container
test_owners() {
  local out
  out=$(build owners)
  summary "$out" owners
  python3 - "$work/owners.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][-1]["entries"]}
assert (m["./data/"][3], m["./data/"][4]) == (1234, 5678), m["./data/"]
assert (m["./data/f"][3], m["./data/f"][4], m["./data/f"][2]) == (42, 43, "0o4750"), m["./data/f"]
assert m["./tmp/"][2] == "0o1777", m["./tmp/"]
assert (m["./extra.txt"][3], m["./extra.txt"][4]) == (0, 0)
assert all(e[6] == "" or e[1] == "2" for e in m.values())
EOF
  load "$(plain "$out")"
  expect_eq "$(podrun owners:latest stat -c '%u:%g %a %n' /data /data/f /tmp | tr '\n' ';')" \
    "1234:5678 755 /data;42:43 4750 /data/f;0:0 1777 /tmp;"
}
t owners test_owners

# reproducible: images, a layer, a customisation layer rebuild (nix-build --check) to the same bytes
test_reproducible() {
  # --check rebuilds and fails if the bytes differ.
  local a
  for a in helloGz owners pureImage redisLike.layer redisLike; do
    build "$a" >/dev/null || fail "$a: $(tail -3 "$work/$a.log")"
    build "$a" --check >/dev/null || fail "$a: $(tail -3 "$work/$a.log")"
  done
  local conf layer
  conf=$(nix-instantiate "$cases" -A owners.stream.conf "${nargs[@]}" 2>/dev/null)
  layer=$(nix-store -q --references "$conf" | grep -- '-owners-customisation-layer.drv$')
  nix-build "$layer" --check --no-out-link >/dev/null 2>"$work/layer-check.log" || fail "customisation layer: $(tail -3 "$work/layer-check.log")"
}
t reproducible test_reproducible

# no-store-paths: an image with no store paths is one layer, with no /nix in it
test_no_store_paths() {
  local out
  out=$(build noStore)
  summary "$out" nostore
  expect_eq "$(q nostore 'len(d["layers"])')" 1
  expect_eq "$(q nostore 'any(e[0].startswith("./nix") or e[0].startswith("/nix") for e in d["layers"][0]["entries"])')" False
  expect_eq "$(q nostore '[e[0] for e in d["layers"][0]["entries"]][:2]')" "['./', './bin/']"
}
t no-store-paths test_no_store_paths

# max-layers: all 12 store paths get layered; maxLayers is a limit, layeringPipeline's count exact
test_max_layers() {
  local all max4 pipe
  all=$(build chainAll)
  max4=$(build chainMax4)
  pipe=$(build chainPipeline)
  "$all" >"$work/all.tar" 2>/dev/null
  "$max4" >"$work/max4.tar" 2>/dev/null
  "$pipe" >"$work/pipe.tar" 2>/dev/null
  summary "$work/all.tar" all
  summary "$work/max4.tar" max4
  summary "$work/pipe.tar" pipe
  local paths='len({e[0].split("/")[3] for l in d["layers"][:-1] for e in l["entries"] if len(e[0].split("/")) > 3 and e[0].split("/")[3]})'
  expect_eq "$(q all "$paths")" 12
  expect_eq "$(q max4 "$paths")" 12
  expect_eq "$(q pipe "$paths")" 12
  [ "$(q all 'len(d["layers"])')" -gt 4 ] || fail "chainAll has only $(q all 'len(d["layers"])') layers"
  # auto-layer may use fewer layers than allowed, never more.
  [ "$(q max4 'len(d["layers"])')" -le 4 ] || fail "chainMax4 has $(q max4 'len(d["layers"])') layers"
  expect_eq "$(q pipe 'len(d["layers"])')" 4
}
t max-layers test_max_layers

# from-image: fromImage's layers come first, unchanged, Env merged; too low a maxLayers is an error
test_from_image() {
  local base app
  base=$(build base)
  app=$(build app)
  "$app" >"$work/app.tar" 2>"$work/app.stream.log"
  summary "$base" base
  summary "$work/app.tar" app
  local nbase
  nbase=$(q base 'len(d["layers"])')
  [ "$nbase" -ge 2 ] || fail "base has $nbase layers"
  expect_eq "$(q app '[l["diff_id"] for l in d["layers"]][:'"$nbase"']')" "$(q base '[l["diff_id"] for l in d["layers"]]')"
  expect_eq "$(q app 'd["config"]["config"]["Env"]')" "['BASE=1', 'FOO=bar']"
  load "$work/app.tar"
  expect_eq "$(podrun app:latest)" "hello from stevedore"
  expect_eq "$(podrun app:latest sh -c 'echo $BASE $FOO')" "1 bar"
  # base's layers plus one customisation layer leave nothing for store paths.
  if build appTooManyLayers >/dev/null; then fail "maxLayers = 2 with a base image built"; fi
  grep -q "maxLayers 2 is too low" "$work/appTooManyLayers.log" || fail "$(tail -3 "$work/appTooManyLayers.log")"
}
t from-image test_from_image

# dates: created (the default, "now", a date) and mtime give the config's date and the files' times
test_dates() {
  local now def m2000
  now=$(build createdNow)
  def=$(build createdDefault)
  m2000=$(build mtime2000)
  summary "$now" now
  summary "$def" def
  summary "$m2000" m2000
  expect_eq "$(q def 'd["config"]["created"]')" "1970-01-01T00:00:01+00:00"
  [ "$(q now 'd["config"]["created"][:4]')" -ge 2025 ] || fail "created now: $(q now 'd["config"]["created"]')"
  # created = "now" leaves file times alone, so the store layers are the same.
  expect_eq "$(q now '[l["diff_id"] for l in d["layers"]][:-1]')" "$(q def '[l["diff_id"] for l in d["layers"]][:-1]')"
  expect_eq "$(q def '{e[5] for l in d["layers"] for e in l["entries"]}')" "{1}"
  expect_eq "$(q m2000 '{e[5] for l in d["layers"] for e in l["entries"]}')" "{946684800}"
  expect_eq "$(q m2000 'd["config"]["created"]')" "2024-05-01T10:00:00+00:00"
}
t dates test_dates

# untagged: with no tag, the tag is the hash of the conf's store path
test_untagged() {
  local out tag conf
  out=$(build untagged)
  "$out" >"$work/untagged.tar" 2>/dev/null
  summary "$work/untagged.tar" untagged
  tag=$(nixeval 'c.untagged.imageTag' | tr -d '"')
  conf=$(nix-build "$cases" -A untagged.conf "${nargs[@]}" --no-out-link 2>/dev/null)
  expect_eq "${#tag}" 32
  expect_eq "$tag" "$(basename "$conf" | cut -c1-32)"
  expect_eq "$(q untagged 'd["repo_tags"]')" "['registry.example/untagged:$tag']"
}
t untagged test_untagged

# sbom: passthru.sbom and passthru.spdx list every store path of the image with its layer's
# diff_id (the image's own), nixpkgs' narinfo properties and the contents' meta; reproducible
test_sbom() {
  local img cdx spdx
  img=$(built withMeta)
  cdx=$(built withMeta.sbom)
  spdx=$(built withMeta.spdx)
  [[ "$cdx" == *-with-meta-sbom.cdx.json && "$spdx" == *-with-meta-sbom.spdx.json ]] || fail "names: $cdx $spdx"
  summary "$img" withmeta
  python3 - "$cdx" "$spdx" "$work/withmeta.json" <<'EOF2'
import json, sys
cdx, spdx, img = (json.load(open(f)) for f in sys.argv[1:4])
assert cdx["bomFormat"] == "CycloneDX" and cdx["specVersion"] == "1.6", cdx["specVersion"]
assert cdx["metadata"]["component"]["name"] == "with-meta", cdx["metadata"]["component"]
comps = {c["name"]: c for c in cdx["components"]}
assert {"busybox", "hello", "greeting"} <= set(comps), sorted(comps)
props = lambda c: {p["name"]: p["value"] for p in c["properties"]}
bb = comps["busybox"]
assert bb["licenses"][0]["license"]["id"] == "GPL-2.0-only", bb.get("licenses")
assert bb["description"].startswith("Tiny"), bb.get("description")
p = props(bb)
assert p["nix:narinfo:nar_hash"].startswith("sha256:"), p
assert p["nix:store_path"].startswith("/nix/store/") and p["nix:store_path"].endswith("-busybox"), p
# Each path's layer diff_id is one of the image's own.
diff_ids = {l["diff_id"] for l in img["layers"]}
for c in cdx["components"]:
    d = props(c)["stevedore:layer:diff_id"]
    assert d in diff_ids, (c["name"], d, diff_ids)
# hello depends on greeting, greeting on busybox.
deps = {d["ref"]: set(d.get("dependsOn", [])) for d in cdx["dependencies"]}
assert comps["greeting"]["bom-ref"] in deps[comps["hello"]["bom-ref"]], deps
assert comps["busybox"]["bom-ref"] in deps[comps["greeting"]["bom-ref"]], deps
assert spdx["spdxVersion"] == "SPDX-2.3", spdx["spdxVersion"]
names = {p["name"] for p in spdx["packages"]}
assert {"busybox", "hello", "greeting"} <= names, names
bb = [p for p in spdx["packages"] if p["name"] == "busybox"][0]
assert bb["licenseDeclared"] == "GPL-2.0-only", bb
assert bb["homepage"] == "https://busybox.net", bb
EOF2
  build withMeta.sbom --check >/dev/null || fail "sbom: $(tail -3 "$work/withMeta.sbom.log")"
  build withMeta.spdx --check >/dev/null || fail "spdx: $(tail -3 "$work/withMeta.spdx.log")"
}
t sbom test_sbom
