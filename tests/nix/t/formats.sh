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

# oci-chunked: compressor = "zstd:chunked" writes zstd layers that locate their table of contents
# in annotations (src/compress/chunked.rs and tests/chunked.rs check the format itself); a Docker
# archive, compressed whole, refuses it
test_oci_chunked() {
  local out
  out=$(build ociChunked) || fail "$(tail -5 "$work/ociChunked.log")"
  skopeo inspect --raw "oci:$out" >"$work/oci-chunked.json"
  python3 - "$work/oci-chunked.json" <<'PY' || fail "$(cat "$work/oci-chunked.json")"
import json, sys
layers = json.load(open(sys.argv[1]))["layers"]
assert layers and all(l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd" for l in layers), layers
for l in layers:
    toc = l["annotations"]["io.github.containers.zstd-chunked.manifest-position"].split(":")
    assert len(toc) == 4 and toc[3] == "1" and int(toc[0]) + int(toc[1]) < l["size"], l
PY
  refused '(c.helloGz.override { compressor = "zstd:chunked"; }).drvPath' 'compresses the layers of OCI images'
  refused '(c.hello.copyToRegistry.override { compressor = "xz"; }).drvPath' 'compressor must be one of gz, none, zstd, zstd:chunked'
}
t oci-chunked test_oci_chunked

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
