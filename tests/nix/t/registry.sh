# Registries: passthru.copyToRegistry pushes to, and pullImage pulls from, a docker-registry on loopback.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# start_registry: starts a docker-registry on a random loopback port (set in $port) serving
# $work/registry, stopped when the test's subshell exits.
start_registry() {
  local dir=$work/registry
  port=$((20000 + RANDOM % 20000))
  mkdir -p "$dir"
  printf 'version: 0.1\nhttp:\n  addr: 127.0.0.1:%s\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "$port" "$dir" >"$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  local pid=$!
  # Each test runs in a subshell: EXIT also fires when a failed assertion ends it early.
  # shellcheck disable=SC2064
  trap "kill $pid 2>/dev/null" EXIT
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
}

# copy-to-registry: copyToRegistry pushes (the second time nothing), and skopeo reads the image back
test_copy_to_registry() {
  local push out
  push=$(build hello.copyToRegistry)
  start_registry
  out=$("$push" "docker://127.0.0.1:$port/team/hello:v1" --insecure -q)
  expect_eq "$(skopeo inspect --tls-verify=false "docker://127.0.0.1:$port/team/hello:v1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Digest"])')" "$out"
  # Unchanged: nothing uploaded the second time.
  out=$("$push" "docker://127.0.0.1:$port/team/hello:v1" --insecure 2>&1)
  [[ "$out" == *": 0 uploaded"* ]] || fail "second push uploaded blobs: $out"
  # Push options pass through: Docker schema 2 manifests for Docker-only clients.
  out=$("$push" "docker://127.0.0.1:$port/team/hello:v2s2" --insecure -q --manifest-format v2s2)
  expect_eq "$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/hello:v2s2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mediaType"])')" "application/vnd.docker.distribution.manifest.v2+json"
  # copyToRegistry.override { compressor = "zstd:chunked"; }: the layers of a partial pull.
  push=$(build chunkedPush)
  grep -qF -- "--compressor 'zstd:chunked'" "$push" || fail "the script does not compress so: $(cat "$push")"
  out=$("$push" "docker://127.0.0.1:$port/team/hello:chunked" --insecure -q)
  skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/hello:chunked" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert all("io.github.containers.zstd-chunked.manifest-checksum" in l["annotations"] for l in d["layers"]), d' || fail "no zstd:chunked layers"
  # buildImage's copyToRegistry pushes its (gzipped) archive.
  push=$(build redisLike.copyToRegistry)
  out=$("$push" "docker://127.0.0.1:$port/team/redis:latest" --insecure -q)
  expect_eq "$(skopeo inspect --tls-verify=false "docker://127.0.0.1:$port/team/redis:latest" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["Digest"], len(d["Layers"]))')" "$out 3"
}
t copy-to-registry test_copy_to_registry

# copy-to-registry-sbom: copyToRegistry.override { sbom = true; sign = KEY; provenance = true; }
# pushes the image, attaches passthru.sbom (the very file) as an artifact listed under the
# referrers tag, signs it and attests passthru.provenance and the SBOM; bad values fail
test_copy_to_registry_sbom() {
  local push sbom provenance out index artifact layer
  push=$(built withMetaPush)
  sbom=$(built withMeta.sbom)
  grep -qF -- "--attach '$sbom'" "$push" || fail "the script does not attach $sbom: $(cat "$push")"
  start_registry
  grep -qF -- "--sign 'env://STEVEDORE_TEST_KEY'" "$push" || fail "the script does not sign: $(cat "$push")"
  # passthru.provenance, made in the sandbox, names the conf's derivation and every store path
  # of the image with its NAR hash (as the Nix database has it).
  provenance=$(built withMeta.provenance)
  grep -qF -- "--provenance '$provenance'" "$push" || fail "the script does not attest $provenance"
  python3 - "$provenance" "$(nixeval 'c.withMeta.conf.drvPath')" <<'PY' || fail "provenance: $(head -c 600 "$provenance")"
import json, subprocess, sys
p = json.load(open(sys.argv[1]))
bd = p["buildDefinition"]
assert bd["externalParameters"]["derivation"] == json.loads(sys.argv[2]), bd["externalParameters"]
deps = bd["resolvedDependencies"]
assert deps and all(d["name"].startswith("/nix/store/") for d in deps), deps
for d in deps:
    want = subprocess.run(["nix-store", "--query", "--hash", d["name"]], capture_output=True, text=True, check=True).stdout.strip()
    assert d["annotations"]["narHash"] == want, (d, want)
PY
  out=$(STEVEDORE_TEST_KEY=$(cat "$repo/tests/data/cosign.key") COSIGN_PASSWORD=test-pass "$push" "docker://127.0.0.1:$port/team/meta:1" --insecure -q)
  # Signed as cosign does (tests/registry.rs checks the signature itself, and with cosign).
  skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/meta:${out/:/-}.sig" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert [l["mediaType"] for l in d["layers"]] == ["application/vnd.dev.cosign.simplesigning.v1+json"], d' || fail "no signature"
  skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/meta:${out/:/-}.att" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert [l["annotations"]["predicateType"] for l in d["layers"]] == ["https://slsa.dev/provenance/v1", "https://cyclonedx.org/bom"], d' || fail "no attestations"
  index=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/meta:${out/:/-}")
  artifact=$(python3 -c 'import json,sys; m=json.loads(sys.argv[1])["manifests"]; assert [x["artifactType"] for x in m] == ["application/vnd.cyclonedx+json"], m; print(m[0]["digest"])' "$index")
  layer=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/team/meta@$artifact" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["subject"]["digest"] == sys.argv[1], d; print(d["layers"][0]["digest"])' "$out")
  curl -sf "http://127.0.0.1:$port/v2/team/meta/blobs/$layer" -o "$work/pushed-sbom.json"
  cmp -s "$work/pushed-sbom.json" "$sbom" || fail "the attached SBOM is not passthru.sbom"
  refused '(c.withMeta.copyToRegistry.override { sbom = "yes"; }).drvPath' 'copyToRegistry: image "with-meta": sbom must be true, false, "cyclonedx" or "spdx"'
  refused '(c.redisLike.copyToRegistry.override { sbom = true; }).drvPath' 'has no SBOM to attach'
  # The key is named, never copied into the store.
  refused "(c.withMeta.copyToRegistry.override { sign = $repo/tests/data/cosign.key; }).drvPath" 'sign must be a string .*not a Nix path'
  refused '(c.withMeta.copyToRegistry.override { sign = "${builtins.toFile "key" "x"}"; }).drvPath' 'sign must name a key outside the Nix store'
  refused '(c.withMeta.copyToRegistry.override { sign = "cosign.key"; }).drvPath' 'sign must be an absolute path or env://VAR'
  refused '(c.withMeta.copyToRegistry.override { provenance = true; }).drvPath' 'provenance = true needs sign'
}
t copy-to-registry-sbom test_copy_to_registry_sbom

# pull-image: pullImage builds what nixpkgs' own builder (skopeo into a docker-archive) writes, so
# a hash of that archive holds given as `hash`, `sha256` or `outputHash`; prefetch prints it; a
# fake hash fails naming it; conflicting hash arguments are refused in one line
test_pull_image() {
  local push digest hex sri out name
  push=$(build hello.copyToRegistry)
  start_registry
  name=127.0.0.1:$port/team/hello
  "$push" "docker://$name:v1" --insecure -q >/dev/null
  digest=sha256:$(skopeo inspect --raw --tls-verify=false "docker://$name:v1" | sha256sum | cut -d' ' -f1)
  # nixpkgs' pullImage builder (with tlsVerify = false), run by hand.
  skopeo --insecure-policy --tmpdir="$work" --override-os linux --override-arch amd64 copy \
    --src-tls-verify=false "docker://$name@$digest" "docker-archive://$work/skopeo.tar:$name:latest" >"$work/skopeo.log" 2>&1
  hex=$(sha256sum <"$work/skopeo.tar" | cut -d' ' -f1)
  sri=sha256-$(python3 -c 'import base64,sys; print(base64.b64encode(bytes.fromhex(sys.argv[1])).decode())' "$hex")
  # pull ARGS [NIX-BUILD-OPTIONS...]: builds pullImage of the image with ARGS added.
  pull() {
    nix-build --no-out-link "${@:2}" -E "let c = import $cases { stevedorePath = \"$stevedore_path\"; }; in
      c.dockerTools.pullImage { imageName = \"$name\"; imageDigest = \"$digest\"; arch = \"amd64\"; tlsVerify = false; $1 }" 2>"$work/pull.log"
  }
  out=$(pull "hash = \"$sri\";") || { cat "$work/pull.log" >&2; fail "pullImage with skopeo's hash failed"; }
  cmp "$out" "$work/skopeo.tar" || fail "pullImage's archive is not skopeo's"
  # Built again (the output may be from an earlier run), it still has that hash.
  pull "hash = \"$sri\";" --check >/dev/null || fail "rebuilt: $(tail -3 "$work/pull.log")"
  expect_eq "$(pull "sha256 = \"$hex\";")" "$out" "sha256"
  expect_eq "$(pull "outputHash = \"$hex\"; outputHashAlgo = \"sha256\";")" "$out" "outputHash"
  expect_eq "$(pull "outputHash = \"$sri\"; outputHashAlgo = null;")" "$out" "SRI outputHash"
  "$stevedore_path/bin/stevedore" prefetch "docker://$name:v1" --arch amd64 --final-image-tag latest --insecure -q >"$work/prefetch.nix"
  grep -qF "hash = \"$sri\";" "$work/prefetch.nix" || fail "prefetch: $(cat "$work/prefetch.nix")"
  # A fake hash builds once and the failure names the real one.
  ! pull 'hash = "";' >/dev/null || fail "a fake hash built"
  grep -qF "$sri" "$work/pull.log" || fail "no real hash in: $(tail -3 "$work/pull.log")"
  ! pull "hash = \"$sri\"; sha256 = \"$hex\";" >/dev/null || fail "hash and sha256 together were accepted"
  grep -q "pullImage: give either .sha256. or .hash., not both" "$work/pull.log" || fail "$(tail -2 "$work/pull.log")"
  ! pull "outputHash = \"$sri\"; hash = \"$sri\";" >/dev/null || fail "outputHash and hash together were accepted"
  grep -q "pullImage: give .outputHash." "$work/pull.log" || fail "$(tail -2 "$work/pull.log")"
  ! pull "" >/dev/null || fail "no hash was accepted"
  grep -q "pullImage: no hash" "$work/pull.log" || fail "$(tail -2 "$work/pull.log")"
}
t pull-image test_pull_image

# copy-to-podman: passthru.copyToPodman loads the image (the image podman runs is the one a stream
# loads), the second time sending no layer; copyToDockerDaemon and copyToContainerd are scripts
# that run `stevedore load` for their runtime
test_copy_to_podman() {
  local load out
  load=$(build hello.copyToPodman)
  pod rmi -f registry.example/team/hello:v1 >/dev/null 2>&1 || true
  echo registry.example/team/hello:v1 >>"$work/loaded"
  out=$("$load" 2>&1) || fail "copyToPodman: $out"
  [[ "$out" == *"loaded registry.example/team/hello:v1 into podman"* ]] || fail "$out"
  expect_eq "$(podrun registry.example/team/hello:v1)" "hello from stevedore"
  out=$("$load" 2>&1) || fail "copyToPodman again: $out"
  [[ "$out" == *" 0 layers sent"* ]] || fail "the second load sent layers: $out"
  # The stream executable itself stands for its conf.
  out=$("$stevedore_path/bin/stevedore" load "$(build hello)" 2>&1) || fail "load of the stream script: $out"
  [[ "$out" == *"loaded registry.example/team/hello:v1 into podman: 0 layers sent"* ]] || fail "$out"
  for rt in DockerDaemon:docker Containerd:containerd; do
    load=$(build "hello.copyTo${rt%%:*}")
    grep -q -- "load --into '\?${rt#*:}'\? " "$load" || fail "copyTo${rt%%:*}: $(cat "$load")"
  done
}
t copy-to-podman test_copy_to_podman
