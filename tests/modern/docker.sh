#!/usr/bin/env bash
# Docker 26 against stevedore's images, with each image store: the classic one (overlay2) and
# containerd's (containerd-snapshotter). Runs inside the Debian 13 root with a nix-daemon up
# (tests/modern/suite.sh): builds the images from tests/nix/cases.nix, then, per store, starts a
# dockerd of its own, loads every output format, runs the images, checks a `docker save` round
# trip and `docker push` to a registry on loopback.
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
dockerd_pid=
reg_pid=
cleanup() {
  stop_dockerd
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
for c in gz zstd none; do
  "$bin" stream -q "${img[hello.conf]}" --format oci-archive --compressor "$c" -o "$work/oci-$c.tar" \
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
  dockerd_pid=$!
  for _ in $(seq 150); do docker info >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "dockerd ($store) did not start:"; tail -5 "$work/dockerd-$store.log"
  return 1
}
stop_dockerd() {
  [ -n "$dockerd_pid" ] || return 0
  kill "$dockerd_pid" 2>/dev/null
  # dockerd stops its containerd and shims first; wait for all of it.
  for _ in $(seq 150); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
  wait "$dockerd_pid" 2>/dev/null
  dockerd_pid=
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

test_load_merged() {
  expect_eq "$(loaded -i "${img[merged]}" | tr '\n' ' ')" "$tag merge-two:latest merge-three:latest " "merged"
  expect_eq "$(docker run --rm --network none merge-two:latest)" "two"
  expect_eq "$(docker run --rm --network none merge-three:latest)" "three"
}

test_load_oci_archives() {
  local c out
  for c in gz zstd none; do
    docker rmi -f "$tag" >/dev/null 2>&1 || true
    if ! out=$(docker load -i "$work/oci-$c.tar" 2>&1); then
      # Docker's classic store reads only manifest.json, which an OCI archive need not have.
      [ "$store" = classic ] && [[ "$out" == *"blobs/json: no such file"* ]] \
        && skip "Docker 26's classic store cannot load an oci-archive (it wants a manifest.json: $out); load a docker-archive, or use the containerd store"
      fail "oci-archive $c: $out"
    fi
    expect_eq "$(echo "$out" | sed -nE 's/^Loaded image: //p')" "$tag" "oci-archive $c"
    runs "$tag"
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

echo "docker: $(dockerd --version)"
for s in classic containerd; do
  if ! start_dockerd "$s"; then
    failed=$((failed + 1)); failures+=("docker-$s-start")
    continue
  fi
  t "docker-$s-load-docker-archives" test_load_docker_archives
  t "docker-$s-load-merged" test_load_merged
  t "docker-$s-load-oci-archives" test_load_oci_archives
  t "docker-$s-image-id" test_image_id
  t "docker-$s-save-round-trip" test_save_round_trip
  t "docker-$s-push" test_push
  stop_dockerd
done
[ "$failed" -eq 0 ] || echo "failed: ${failures[*]}"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
