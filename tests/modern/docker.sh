#!/usr/bin/env bash
# Docker 26 against stevedore's images, with each image store: the classic one (overlay2) and
# containerd's (containerd-snapshotter). Runs inside the Debian 13 root with a nix-daemon up
# (tests/modern/suite.sh): builds the images from tests/nix/cases.nix, then, per store, starts a
# dockerd of its own, loads every output format, runs the images, checks a `docker save` round
# trip and `docker push` to a registry on loopback. Before that, containerd 1.7's own client
# (`ctr`) imports and runs the archives, against a containerd of its own.
#
#   docker.sh STEVEDORE_BIN [WORD...]   # WORDs pick tests whose names contain them
#
# What a store does differently is asserted as it is (so a change shows); what it cannot do at
# all is a skip naming the gap. The last line is "N passed, N failed, N skipped".
set -uo pipefail
bin=$1
shift
repo=$(cd "$(dirname "$0")/../.." && pwd -P)
filters=("$@")
work=$(mktemp -d /tmp/stevedore-docker-tests.XXXXXX)
passed=0 failed=0 skipped=0
failures=()
daemon_pid=
reg_pid=
cleanup() {
  stop_daemon
  [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

fail() { echo "    $*" >&2; return 1; }
expect_eq() { [ "$1" = "$2" ] || fail "expected [$2], got [$1]${3:+ ($3)}"; }
# A test that exits 77 is skipped; its last line says why.
t() {
  local name=$1 t0=$SECONDS rc w
  if [ ${#filters[@]} -gt 0 ]; then
    for w in "${filters[@]}"; do [[ "$name" == *"$w"* ]] && break; w=; done
    [ -n "$w" ] || return 0
  fi
  ( set -e; "$2" ) >"$work/test-$name.out" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1)); echo "ok   $name ($((SECONDS - t0)) s)"
  elif [ $rc -eq 77 ]; then
    skipped=$((skipped + 1)); echo "skip $name: $(tail -1 "$work/test-$name.out")"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL $name ($((SECONDS - t0)) s)"
    sed 's/^/     | /' "$work/test-$name.out" | tail -25
  fi
}
skip() { echo "$*"; exit 77; }

# The images, built once: the Nix library's archives, and stevedore's OCI archives of the same
# conf with each layer compressor.
mkdir -p "$work/stevedore/bin"
cp "$bin" "$work/stevedore/bin/stevedore"
sp=$(nix-store --add "$work/stevedore") || { echo "0 passed, 1 failed"; exit 1; }
build() { nix-build "$repo/tests/nix/cases.nix" --argstr stevedorePath "$sp" --no-out-link -A "$1" 2>>"$work/build.log"; }
declare -A img
for a in hello helloGz helloZstd helloNone merged hello.conf; do
  img[$a]=$(build "$a") || { echo "building $a failed:"; tail -5 "$work/build.log"; echo "0 passed, 1 failed"; exit 1; }
done
# zstd:chunked layers are zstd to every client here (Docker, containerd): they load and run alike.
for c in gz zstd zstd:chunked none; do
  "$bin" stream -q "${img[hello.conf]}" --format oci-archive --compressor "$c" -o "$work/oci-${c/:/-}.tar" \
    || { echo "oci-archive $c failed"; echo "0 passed, 1 failed"; exit 1; }
done
tag=registry.example/team/hello:v1
# The image's config digest and diff_ids, as written (skopeo reads archives without a daemon).
skopeo inspect --raw "docker-archive:${img[helloNone]}" >"$work/manifest.json"
config_digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"]["digest"])' "$work/manifest.json")
diff_ids=$(skopeo inspect --config "docker-archive:${img[helloNone]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')

# A registry on loopback for the pushes (this network namespace has nothing else).
port=$((20000 + RANDOM % 20000))
mkdir -p "$work/registry"
printf 'version: 0.1\nhttp:\n  addr: 127.0.0.1:%s\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "$port" "$work/registry" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

store=
export DOCKER_HOST=unix:///run/stevedore-docker.sock
start_dockerd() { # STORE: classic or containerd
  store=$1
  local d=/var/lib/docker/$store
  mkdir -p "$d" "/run/docker-$store"
  if [ "$store" = containerd ]; then
    echo '{"features": {"containerd-snapshotter": true}}' >"$work/daemon-$store.json"
    driver=overlayfs
  else
    echo '{}' >"$work/daemon-$store.json"
    driver=overlay2
  fi
  dockerd --config-file "$work/daemon-$store.json" --iptables=false --ip6tables=false --bridge=none \
    --host "$DOCKER_HOST" --data-root "$d" --exec-root "/run/docker-$store" \
    --pidfile "/run/docker-$store.pid" --storage-driver "$driver" --insecure-registry "127.0.0.1:$port" \
    >"$work/dockerd-$store.log" 2>&1 &
  daemon_up "dockerd ($store)" "$work/dockerd-$store.log" docker info
}
# The daemon just started in the background (dockerd, or containerd; one at a time): waits
# until PROBE... succeeds, or says why not. NAME LOG PROBE...
daemon_up() {
  daemon_pid=$!
  local name=$1 log=$2
  shift 2
  for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$name did not start:"; tail -5 "$log"
  return 1
}
stop_daemon() {
  [ -n "$daemon_pid" ] || return 0
  kill "$daemon_pid" 2>/dev/null
  # dockerd stops its containerd and shims first; wait for all of it.
  for _ in $(seq 150); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
  wait "$daemon_pid" 2>/dev/null
  daemon_pid=
}

# The image loaded under TAG runs and says hello.
runs() { expect_eq "$(docker run --rm --network none "$1")" "hello from stevedore" "$1"; }
loaded() { docker load "$@" 2>&1 | tee -a "$work/load-$store.log" | sed -nE 's/^Loaded image: //p'; }

test_load_docker_archives() {
  local a
  for a in helloNone helloGz helloZstd; do
    docker rmi -f "$tag" >/dev/null 2>&1 || true
    expect_eq "$(loaded -i "${img[$a]}")" "$tag" "$a"
    runs "$tag"
  done
  # A stream piped into docker load, as a NixOS host does with imageStream.
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  expect_eq "$("${img[hello]}" 2>/dev/null | loaded)" "$tag" "stream"
  runs "$tag"
}

# stevedore load: Docker pulls from a loopback serve; the image is what docker load makes of the
# same image (layers, config; on the classic store the same ID), and a second load sends nothing.
test_stevedore_load() {
  local out want_layers want_config before
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  loaded -i "${img[helloNone]}" >/dev/null
  want_layers=$(docker image inspect --format '{{json .RootFS.Layers}}' "$tag")
  want_config=$(docker image inspect --format '{{json .Config}}' "$tag")
  # No image may keep the layers: this load must send them.
  # shellcheck disable=SC2046
  docker rmi -f $(docker images -aq) >/dev/null 2>&1 || true
  before=$(docker images --format '{{.Repository}}:{{.Tag}}' | sort)
  out=$("$bin" load --into docker "${img[hello.conf]}" 2>&1) || fail "stevedore load: $out"
  echo "$out"
  # (containerd's store may still hold the blobs of removed images until its GC runs.)
  [ "$store" != classic ] || [[ "$out" != *" 0 layers sent"* ]] || fail "the first load sent no layers: $out"
  runs "$tag"
  expect_eq "$(docker image inspect --format '{{json .RootFS.Layers}}' "$tag")" "$want_layers" "layers"
  expect_eq "$(docker image inspect --format '{{json .Config}}' "$tag")" "$want_config" "config"
  [ "$store" != classic ] || expect_eq "$(docker image inspect --format '{{.Id}}' "$tag")" "$config_digest" "classic ID"
  out=$("$bin" load --into docker "${img[hello.conf]}" 2>&1) || fail "stevedore load again: $out"
  echo "$out"
  [[ "$out" == *" 0 layers sent"* ]] || fail "the second load sent layers: $out"
  expect_eq "$(docker images --format '{{.Repository}}:{{.Tag}}' | grep -v "^$tag\$" | sort)" "$before" "names besides $tag (the loopback name must go)"
}

test_load_merged() {
  expect_eq "$(loaded -i "${img[merged]}" | tr '\n' ' ')" "$tag merge-two:latest merge-three:latest " "merged"
  expect_eq "$(docker run --rm --network none merge-two:latest)" "two"
  expect_eq "$(docker run --rm --network none merge-three:latest)" "three"
}

# A name without a tag (-t NAME) is NAME:latest in either archive: docker refuses an untagged
# RepoTags entry, and an oci-archive's index names it docker.io/library/NAME:latest.
test_load_untagged() {
  local a
  for a in docker-archive oci-archive; do
    "$bin" stream -q "${img[hello.conf]}" --format "$a" -t hello-untagged -o "$work/untagged-$a.tar"
    docker rmi -f hello-untagged:latest >/dev/null 2>&1 || true
    expect_eq "$(loaded -i "$work/untagged-$a.tar")" "hello-untagged:latest" "$a"
    runs hello-untagged:latest
  done
}

# The digest of an oci-archive's (only) OCI manifest.
oci_manifest_digest() { echo "sha256:$(skopeo inspect --raw "oci-archive:$1" | sha256sum | cut -d' ' -f1)"; }

# An oci-archive carries a Docker manifest.json too, which is all the classic store reads (its
# layers point at the compressed blobs, which it decompresses): so it loads there, with the
# config's digest as image ID, as a docker-archive does. containerd's store reads the OCI
# layout: the ID is the OCI manifest's digest.
test_load_oci_archives() {
  local c out id
  for c in gz zstd zstd:chunked none; do
    docker rmi -f "$tag" >/dev/null 2>&1 || true
    out=$(docker load -i "$work/oci-${c/:/-}.tar" 2>&1) || fail "oci-archive $c: $out"
    expect_eq "$(echo "$out" | sed -nE 's/^Loaded image: //p')" "$tag" "oci-archive $c"
    runs "$tag"
    id=$(docker image inspect --format '{{.Id}}' "$tag")
    if [ "$store" = classic ]; then
      expect_eq "$id" "$config_digest" "classic ID, oci-archive $c"
    else
      expect_eq "$id" "$(oci_manifest_digest "$work/oci-${c/:/-}.tar")" "containerd ID, oci-archive $c"
    fi
  done
}

# The image ID: the config's digest in the classic store, the manifest's in containerd's.
test_image_id() {
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  loaded -i "${img[helloNone]}" >/dev/null
  local id
  id=$(docker image inspect --format '{{.Id}}' "$tag")
  if [ "$store" = classic ]; then
    expect_eq "$id" "$config_digest" "classic ID"
  else
    [ "$id" != "$config_digest" ] || fail "containerd store: the ID is the config digest"
    expect_eq "$id" "$(docker images --no-trunc --format '{{.Digest}}' "$tag")" "containerd ID"
    expect_eq "$(docker image inspect --format '{{json .Config.Env}}' "$tag")" '["FOO=bar"]'
  fi
}

# docker save writes the same layers back: same diff_ids, and podman-free skopeo reads it.
test_save_round_trip() {
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  loaded -i "${img[helloGz]}" >/dev/null
  docker save "$tag" -o "$work/saved-$store.tar"
  expect_eq "$(skopeo inspect --config "docker-archive:$work/saved-$store.tar" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')" "$diff_ids" "saved diff_ids"
  docker rmi -f "$tag" >/dev/null
  expect_eq "$(loaded -i "$work/saved-$store.tar")" "$tag" "reload"
  runs "$tag"
}

# docker push of a loaded docker-archive: the classic store compresses the layers with gzip,
# containerd's pushes them as they were loaded (uncompressed), which `stevedore push` does not.
test_push() {
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  loaded -i "${img[helloNone]}" >/dev/null
  local dest=127.0.0.1:$port/$store/hello:v1 types
  docker tag "$tag" "$dest"
  docker push -q "$dest" >"$work/push-$store.log" 2>&1 || fail "push: $(tail -3 "$work/push-$store.log")"
  skopeo inspect --raw --tls-verify=false "docker://$dest" >"$work/pushed-$store.json"
  types=$(python3 -c 'import json,sys; print(sorted({l["mediaType"] for l in json.load(open(sys.argv[1]))["layers"]}))' "$work/pushed-$store.json")
  if [ "$store" = classic ]; then
    expect_eq "$types" "['application/vnd.docker.image.rootfs.diff.tar.gzip']"
  else
    expect_eq "$types" "['application/vnd.docker.image.rootfs.diff.tar']"
  fi
  expect_eq "$(skopeo inspect --config --tls-verify=false "docker://$dest" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')" "$diff_ids" "pushed diff_ids"
  # stevedore push of the same archive, the way around containerd's: gzip layers (OCI media
  # types), the same diff_ids, and the image pulls and runs in this store.
  local ours=127.0.0.1:$port/$store/ours:v1
  "$bin" push "docker-archive:${img[helloNone]}" "docker://$ours" --insecure -q >/dev/null
  expect_eq "$(skopeo inspect --raw --tls-verify=false "docker://$ours" | python3 -c 'import json,sys; print(sorted({l["mediaType"] for l in json.load(sys.stdin)["layers"]}))')" \
    "['application/vnd.oci.image.layer.v1.tar+gzip']" "stevedore push"
  expect_eq "$(skopeo inspect --config --tls-verify=false "docker://$ours" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')" "$diff_ids" "stevedore-pushed diff_ids"
  docker pull -q "$ours" >/dev/null
  runs "$ours"
}

# A `docker save` archive as a base image: the classic store saves plain layers; containerd's
# saves the blobs as they were loaded, here gzip and zstd members (Docker 25+'s OCI layout with a
# manifest.json naming them). stevedore builds on each (no layers of its own: the hello conf's
# Cmd runs from the base's layers), keeps the diff_ids, and the result loads and runs.
test_save_as_base() {
  local c saved conf out kinds
  for c in gz zstd; do
    docker rmi -f "$tag" >/dev/null 2>&1 || true
    loaded -i "$work/oci-${c/:/-}.tar" >/dev/null
    saved=$work/saved-base-$store-$c.tar
    docker save "$tag" -o "$saved"
    kinds=$(python3 - "$saved" <<'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
names = json.load(t.extractfile("manifest.json"))[0]["Layers"]
def kind(n):
    h = t.extractfile(t.getmember(n) if not t.getmember(n).issym() else t.getmember(n)).read(4)
    return "gzip" if h[:2] == b"\x1f\x8b" else "zstd" if h == b"\x28\xb5\x2f\xfd" else "tar"
print(" ".join(sorted({kind(n) for n in names})))
PY
)
    if [ "$store" = classic ]; then
      expect_eq "$kinds" "tar" "classic save, from $c"
    else
      expect_eq "$kinds" "${c/gz/gzip}" "containerd save, from $c"
    fi
    conf=$work/on-saved-$store-$c.json
    python3 - "${img[hello.conf]}" "$saved" "$conf" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(from_image=sys.argv[2], store_layers=[], customisation_layer=None, repo_tag="stevedore.test/on-saved:v1")
c.pop("layering", None)
json.dump(c, open(sys.argv[3], "w"))
PY
    for f in docker-archive oci-archive; do
      out=$work/on-saved-$store-$c-$f.tar
      "$bin" stream -q "$conf" --format "$f" -o "$out" || fail "stream on $saved ($f)"
      expect_eq "$(skopeo inspect --config "$f:$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rootfs"]["diff_ids"])')" "$diff_ids" "diff_ids on $c base, $f"
      docker rmi -f stevedore.test/on-saved:v1 >/dev/null 2>&1 || true
      expect_eq "$(loaded -i "$out")" "stevedore.test/on-saved:v1" "load on $c base, $f"
      runs stevedore.test/on-saved:v1
    done
  done
}

# containerd of its own, not dockerd's: its root and state in the scratch directories, no CRI.
ctr_sock=/run/stevedore-containerd/containerd.sock
start_containerd() {
  mkdir -p /run/stevedore-containerd /var/lib/containerd/stevedore-test
  printf 'version = 2\nroot = "/var/lib/containerd/stevedore-test"\nstate = "/run/stevedore-containerd/state"\n%s\n[grpc]\n  address = "%s"\n' \
    'disabled_plugins = ["io.containerd.grpc.v1.cri"]' "$ctr_sock" >"$work/containerd.toml"
  containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
  daemon_up containerd "$work/containerd.log" ctr -a "$ctr_sock" version
}

# `ctr images import` of a docker-archive and of oci-archives: the names ctr gives them, the
# OCI manifest's digest kept, and `ctr run` of each (no CNI: the container gets a network
# namespace of its own with loopback only).
test_ctr_import() {
  local c a
  ctr_() { ctr -a "$ctr_sock" -n stevedore-test "$@"; }
  # Imports ARCHIVE into an empty namespace; prints the names of what is there then.
  imported() {
    local old
    old=$(ctr_ images ls -q)
    [ -z "$old" ] || ctr_ images rm $old >/dev/null
    ctr_ images import "$1" >>"$work/ctr-import.log" 2>&1 || fail "ctr import $1: $(tail -3 "$work/ctr-import.log")"
    ctr_ images ls -q | tr '\n' ' '
  }
  ctr_runs() { expect_eq "$(ctr_ run --rm "$1" "stevedore-$RANDOM")" "hello from stevedore" "ctr run $1"; }
  # A fully qualified name: the same name from either archive.
  expect_eq "$(imported "${img[helloNone]}")" "$tag " "docker-archive"
  ctr_runs "$tag"
  for c in gz zstd zstd:chunked; do
    expect_eq "$(imported "$work/oci-${c/:/-}.tar")" "$tag " "oci-archive $c"
    expect_eq "$(ctr_ images ls | awk -v t="$tag" '$1 == t { print $3 }')" "$(oci_manifest_digest "$work/oci-${c/:/-}.tar")" "oci-archive $c digest"
    ctr_runs "$tag"
  done
  # A short name: ctr normalises a Docker archive's RepoTags, and takes an oci-archive's
  # io.containerd.image.name annotation as it is written, which is the normalised name, as
  # containerd writes it: both give the image the one name the CRI looks it up by.
  for a in docker-archive oci-archive; do
    "$bin" stream -q "${img[hello.conf]}" --format "$a" -t hello:v1 -o "$work/short-$a.tar"
  done
  expect_eq "$(imported "$work/short-docker-archive.tar")" "docker.io/library/hello:v1 " "short docker-archive"
  ctr_runs docker.io/library/hello:v1
  expect_eq "$(imported "$work/short-oci-archive.tar")" "docker.io/library/hello:v1 " "short oci-archive"
  ctr_runs docker.io/library/hello:v1
}

# stevedore load into containerd (ctr pulls from a loopback serve), into an empty namespace.
test_ctr_load() {
  local out old
  ctr_() { ctr -a "$ctr_sock" -n stevedore-load "$@"; }
  old=$(ctr_ images ls -q)
  [ -z "$old" ] || ctr_ images rm $old >/dev/null
  out=$(CONTAINERD_ADDRESS=$ctr_sock "$bin" load --into containerd --namespace stevedore-load "${img[hello.conf]}" 2>&1) || fail "stevedore load: $out"
  echo "$out"
  expect_eq "$(ctr_ images ls -q | tr '\n' ' ')" "$tag " "names after load"
  expect_eq "$(ctr_ run --rm "$tag" "stevedore-$RANDOM")" "hello from stevedore" "ctr run"
  out=$(CONTAINERD_ADDRESS=$ctr_sock "$bin" load --into containerd --namespace stevedore-load "${img[hello.conf]}" 2>&1) || fail "stevedore load again: $out"
  [[ "$out" == *" 0 layers sent"* ]] || fail "the second load sent layers: $out"
}

echo "containerd: $(containerd --version)"
if start_containerd; then
  t "ctr-import" test_ctr_import
  t "ctr-stevedore-load" test_ctr_load
  stop_daemon
else
  failed=$((failed + 1)); failures+=("ctr-start")
fi

echo "docker: $(dockerd --version)"
for s in classic containerd; do
  if ! start_dockerd "$s"; then
    failed=$((failed + 1)); failures+=("docker-$s-start")
    continue
  fi
  t "docker-$s-load-docker-archives" test_load_docker_archives
  t "docker-$s-load-merged" test_load_merged
  t "docker-$s-load-untagged" test_load_untagged
  t "docker-$s-load-oci-archives" test_load_oci_archives
  t "docker-$s-image-id" test_image_id
  t "docker-$s-save-round-trip" test_save_round_trip
  t "docker-$s-push" test_push
  t "docker-$s-save-as-base" test_save_as_base
  t "docker-$s-stevedore-load" test_stevedore_load
  stop_daemon
done
[ "$failed" -eq 0 ] || echo "failed: ${failures[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
