# The results' and functions' API as nixpkgs' (mkDerivation's overrideAttrs and
# overrideDerivation, passthru and meta, lib.functionArgs), and the variant argument.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# function-args: lib.functionArgs (a functor's __functionArgs, else builtins.functionArgs) of
# every function lists the arguments it takes
test_function_args() {
  local got
  got=$(nixeval '
    let
      d = c.dockerTools;
      fa = f: f.__functionArgs or (builtins.functionArgs f);
      has = f: names: builtins.all (n: (fa f) ? ${n}) names;
    in [
      (has d.streamLayeredImage [ "name" "contents" "maxLayers" "variant" "passthru" "meta" ])
      (has d.buildLayeredImage [ "name" "compressor" "format" "contents" "fakeRootCommands" ])
      (has d.buildImage [ "name" "copyToRoot" "runAsRoot" "variant" "diskSize" ])
      (has d.buildImageWithNixDb [ "name" "copyToRoot" ] && !((fa d.buildImageWithNixDb) ? includeNixDB))
      (has d.buildLayeredImageWithNixDb [ "name" "contents" "compressor" ])
      (has d.streamNixShellImage [ "drv" "command" "run" ] && has d.buildNixShellImage [ "drv" "compressor" ])
      (builtins.functionArgs d.exportImage == { fromImage = false; fromImageName = true; fromImageTag = true; name = true; diskSize = true; })
      (has d.pullImage [ "imageName" "imageDigest" "variant" ])
      ((fa d.buildImage).name == false && (fa d.buildImage).tag)
      (fa d.mergeImages == { })
    ]')
  expect_eq "$got" '[true,true,true,true,true,true,true,true,true,true]'
  # The functors still call: callPackage-style, with only the arguments a function takes.
  expect_eq "$(nixeval '
    let f = c.dockerTools.streamLayeredImage; fa = f.__functionArgs;
    in (f (builtins.intersectAttrs fa { name = "x"; tag = "t"; notAnArgument = 1; })).imageTag')" '"t"'
}
t function-args test_function_args

# override-attrs: overrideAttrs re-makes the derivation (nixpkgs' NixOS test's image over
# itself), keeps passthru, meta and .override; overrideDerivation and the untagged tag follow
test_override_attrs() {
  local out renamed
  # nixpkgs' docker-tools test: layer1.overrideAttrs (_: { fromImage = layer1; }).
  out=$(build api.repeated) || fail "$(tail -5 "$work/api.repeated.log")"
  summary "$out" repeated
  expect_eq "$(q repeated 'len(d["layers"])')" 2
  expect_eq "$(q repeated 'len(set(l["diff_id"] for l in d["layers"]))')" 1
  load "$out"
  # A new name and compressor (a derivation attribute), requiredSystemFeatures (Nix's), passthru
  # and meta kept and extended, then .override on top.
  renamed=$(build api.renamed) || fail "$(tail -5 "$work/api.renamed.log")"
  [[ "$renamed" == *-renamed.tar ]] || fail "name: $renamed"
  summary "$renamed" renamed
  expect_eq "$(q renamed 'd["repo_tags"]')" "['registry.example/team/hello:v1']"
  expect_eq "$(nixeval '[ c.api.renamed.extra c.api.renamed.passthru.extra c.api.renamed.imageTag c.api.renamed.meta.description (c.api.renamed.stream ? conf) c.api.renamed.imageName ]')" \
    '["kept","kept","v1","renamed",true,"registry.example/team/hello"]'
  expect_eq "$(nixeval '[ c.api.renamedOverridden.name c.api.renamedOverridden.imageTag c.api.renamedOverridden.extra (c.api.renamedOverridden ? override) ]')" \
    '["renamed.tar","v3","kept",true]'
  # What mkDerivation's results have, on every function's.
  expect_eq "$(nixeval 'map (r: r ? overrideAttrs && r ? overrideDerivation && r ? passthru && r ? meta) [ c.hello c.helloGz c.pureImage c.nixDbImage c.nixDbLayered c.shellRun c.shellCommand c.redisRoot c.merged c.evalOnly.pulled ]')" \
    '[true,true,true,true,true,true,true,true,true,true]'
  expect_eq "$(nixeval 'map (r: r ? override) [ c.hello c.helloGz c.pureImage c.redisRoot c.merged ]')" '[true,true,true,false,false]'
  expect_eq "$(nixeval '[ c.api.streamMeta.name c.api.streamMeta.meta.description c.api.streamMeta.isExe c.api.streamMeta.imageTag ]')" \
    '["stream-renamed","s",true,"v1"]'
  # An untagged image's tag is its derivation's hash, after an override too.
  local tag
  tag=$(nixeval 'c.api.untaggedRenamed.imageTag' | tr -d '"')
  expect_eq "$tag" "$(nixeval 'builtins.substring 11 32 c.api.untaggedRenamed.outPath' | tr -d '"')"
  [ "$tag" != "$(nixeval 'c.api.emptyUntagged.imageTag' | tr -d '"')" ] || fail "the tag did not follow the override"
  summary "$(build api.untaggedRenamed)" untagged
  expect_eq "$(q untagged 'd["repo_tags"]')" "['empty-untagged:$tag']"
  # overrideDerivation (exportImage), overrideAttrs with a set (mergeImages).
  out=$(build api.exported) || fail "$(tail -5 "$work/api.exported.log")"
  [[ "$out" == *-redis-like-root.tar-2 ]] || fail "name: $out"
  out=$(build api.merged) || fail "$(tail -5 "$work/api.merged.log")"
  [[ "$out" == *-merged-2 ]] || fail "name: $out"
  expect_eq "$(nixeval '[ c.redisRoot.passthru c.redisRoot.meta c.merged.passthru c.evalOnly.pulled.meta ]')" '[{},{},{},{}]'
  # pullImage's builder is not ours: any attribute may be added.
  expect_eq "$(nixeval '(c.evalOnly.pulled.overrideAttrs (_: { anything = "x"; })).anything')" '"x"'
}
t override-attrs test_override_attrs

# variant: the config of buildImage and buildLayeredImage has it after architecture; pullImage
# asks `stevedore pull` for it; none given, nothing changes
test_variant() {
  local out
  out=$(build api.variantImage) || fail "$(tail -5 "$work/api.variantImage.log")"
  summary "$out" variant
  expect_eq "$(q variant '(d["config"]["architecture"], d["config"]["variant"], list(d["config"])[:3])')" "('arm', 'v7', ['created', 'architecture', 'variant'])"
  skopeo inspect --config "docker-archive:$out" >"$work/variant-inspect.json"
  expect_eq "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["architecture"], d.get("variant"))' "$work/variant-inspect.json")" "arm v7"
  out=$(build api.variantLayered) || fail "$(tail -5 "$work/api.variantLayered.log")"
  summary "$out" variant-layered
  expect_eq "$(q variant-layered '(d["config"]["architecture"], d["config"]["variant"])')" "('arm64', 'v8')"
  summary "$(build emptyImage)" no-variant
  expect_eq "$(q no-variant '"variant" in d["config"]')" False
  expect_eq "$(nixeval 'let a = c.evalOnly.pulled.drvAttrs.args; in builtins.elem "--variant" a && builtins.elem "v7" a')" true
}
t variant test_variant
