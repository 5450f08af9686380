# Pushing to a registry: passthru.copyToRegistry, to a docker-registry on loopback.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# copy-to-registry: copyToRegistry pushes (the second time nothing), and skopeo reads the image back
test_copy_to_registry() {
  local push dir port out
  push=$(build hello.copyToRegistry)
  dir=$work/registry
  port=$((20000 + RANDOM % 20000))
  mkdir -p "$dir"
  printf 'version: 0.1\nhttp:\n  addr: 127.0.0.1:%s\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "$port" "$dir" >"$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  local pid=$!
  # Each test runs in a subshell: EXIT also fires when a failed assertion ends it early.
  # shellcheck disable=SC2064
  trap "kill $pid 2>/dev/null" EXIT
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
  out=$("$push" "docker://127.0.0.1:$port/team/hello:v1" --insecure -q)
  expect_eq "$(skopeo inspect --tls-verify=false "docker://127.0.0.1:$port/team/hello:v1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Digest"])')" "$out"
  # Unchanged: nothing uploaded the second time.
  out=$("$push" "docker://127.0.0.1:$port/team/hello:v1" --insecure 2>&1)
  [[ "$out" == *": 0 uploaded"* ]] || fail "second push uploaded blobs: $out"
  # buildImage's copyToRegistry pushes its (gzipped) archive.
  push=$(build redisLike.copyToRegistry)
  out=$("$push" "docker://127.0.0.1:$port/team/redis:latest" --insecure -q)
  expect_eq "$(skopeo inspect --tls-verify=false "docker://127.0.0.1:$port/team/redis:latest" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["Digest"], len(d["Layers"]))')" "$out 3"
}
t copy-to-registry test_copy_to_registry
