# OCI output from the Nix functions: format = "oci-archive" and "oci".
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# oci-formats: an oci-archive with zstd layers, an OCI layout with gzip ones that podman runs
test_oci_formats() {
  local out
  out=$(build ociArchive) || fail "$(tail -5 "$work/ociArchive.log")"
  [[ "$out" == *-hello-oci.tar ]] || fail "name: $out"
  skopeo inspect --raw "oci-archive:$out" >"$work/oci-archive.json"
  expect_eq "$(python3 -c 'import json,sys; print({l["mediaType"] for l in json.load(open(sys.argv[1]))["layers"]})' "$work/oci-archive.json")" "{'application/vnd.oci.image.layer.v1.tar+zstd'}"
  out=$(build ociLayout) || fail "$(tail -5 "$work/ociLayout.log")"
  [ -f "$out/index.json" ] && [ -f "$out/oci-layout" ] || fail "not an OCI layout: $out"
  skopeo inspect --raw "oci:$out" >"$work/oci-layout.json"
  expect_eq "$(python3 -c 'import json,sys; print({l["mediaType"] for l in json.load(open(sys.argv[1]))["layers"]})' "$work/oci-layout.json")" "{'application/vnd.oci.image.layer.v1.tar+gzip'}"
  skopeo copy -q "oci:$out" "docker-archive:$work/from-oci.tar:localhost/oci-layout:latest" >/dev/null
  load "$work/from-oci.tar"
  expect_eq "$(podrun localhost/oci-layout:latest)" "hello from stevedore"
}
t oci-formats test_oci_formats

# oci-bases: an oci-archive (zstd) and an OCI layout directory (gzip) as fromImage: their layers
# come first with their diff_ids, the base Env is merged, and podman runs the results
test_oci_bases() {
  local out base_ids ids
  out=$(build onOciArchive) || fail "$(tail -5 "$work/onOciArchive.log")"
  "$out" 2>"$work/onOciArchive.stream.log" >"$work/on-oci-archive.tar" || fail "$(tail -5 "$work/onOciArchive.stream.log")"
  base_ids=$(skopeo inspect --config "oci-archive:$(build ociArchive)" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')
  ids=$(skopeo inspect --config "docker-archive:$work/on-oci-archive.tar" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')
  [[ "${ids%]}" == "${base_ids%]}, "* ]] || fail "base diff_ids $base_ids not first in $ids"
  load "$work/on-oci-archive.tar"
  expect_eq "$(podrun on-oci-archive:latest)" $'hello from stevedore\nbar'
  out=$(build onOciLayout) || fail "$(tail -5 "$work/onOciLayout.log")"
  base_ids=$(skopeo inspect --config "oci:$(build ociLayout)" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')
  ids=$(skopeo inspect --config "docker-archive:$(plain "$out")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')
  [[ "${ids%]}" == "${base_ids%]}, "* ]] || fail "base diff_ids $base_ids not first in $ids"
  load "$(plain "$out")"
  expect_eq "$(podrun on-oci-layout:latest)" "hello from stevedore"
}
t oci-bases test_oci_bases
