#!/usr/bin/env bash
# End-to-end tests of the Nix library (nix/) with the real nix-build, offline: images are built
# from tests/nix/cases.nix with host tools standing in for nixpkgs (tests/nix/pkgs.nix), then
# loaded and run with podman and inspected with skopeo. Run from anywhere:
#
#   bash tests/nix/run.sh            # builds the binary with cargo build --release
#   STEVEDORE_BIN=path/to/stevedore bash tests/nix/run.sh
#   bash tests/nix/run.sh owners app # only the tests whose names contain these words
#   KEEP=1 bash tests/nix/run.sh     # keep the scratch directory (logs, archives)
#   STEVEDORE_NIX_SANDBOX=1 ...      # Nix's own configuration sandboxes every build with build
#                                    # users (tests/modern/suite.sh's nix-daemon); else builds
#                                    # run unsandboxed as the calling user
#
# The last line is "N passed, N failed"; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
sandboxed=${STEVEDORE_NIX_SANDBOX:-}
if [ -n "$sandboxed" ]; then
  nix_sandbox=$(nix config show sandbox 2>/dev/null || nix show-config 2>/dev/null | sed -n 's/^sandbox = //p')
  [ "$nix_sandbox" = true ] || { echo "STEVEDORE_NIX_SANDBOX is set but Nix's sandbox is [$nix_sandbox]"; echo "0 passed, 1 failed"; exit 1; }
else
  export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes'
fi

work=$(mktemp -d /tmp/stevedore-nix-tests.XXXXXX)
chmod 755 "$work"
# Images podman loaded, one a line (tests run in subshells, so not a shell array).
touch "$work/loaded"
cleanup() {
  while read -r i; do [ -n "$i" ] && pod rmi -f "$i" >/dev/null 2>&1; done <"$work/loaded"
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

passed=0
failed=0
failures=()
started=$SECONDS

pod() { podman --cgroup-manager=cgroupfs --runtime /usr/sbin/runc "$@"; }
podrun() {
  pod run --rm --network=none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
}

if [ -n "${STEVEDORE_BIN:-}" ]; then
  bin=$STEVEDORE_BIN
else
  echo "building stevedore (cargo build --release)..."
  cargo build --release --quiet || { echo "0 passed, 1 failed"; exit 1; }
  bin=$repo/target/release/stevedore
fi
mkdir -p "$work/stevedore/bin"
cp "$bin" "$work/stevedore/bin/stevedore"
stevedore_path=$(nix-store --add "$work/stevedore") || { echo "0 passed, 1 failed"; exit 1; }
echo "stevedore: $stevedore_path"

cases=$repo/tests/nix/cases.nix
nargs=(--argstr stevedorePath "$stevedore_path")

# build ATTR: nix-build it, print the output path; the log goes to $work/ATTR.log.
build() {
  nix-build "$cases" -A "$1" "${nargs[@]}" --no-out-link "${@:2}" 2>"$work/$1.log"
}
# nixeval EXPR: evaluates EXPR with `c` bound to the cases set, prints the JSON result.
nixeval() {
  nix-instantiate --eval --strict --json -E "let c = import $cases { stevedorePath = \"$stevedore_path\"; }; in $1" 2>"$work/eval.log"
}
# summary ARCHIVE: tests/nix/inspect.py's JSON of an archive, in $work/NAME.json.
summary() {
  python3 "$repo/tests/nix/inspect.py" "$1" >"$work/$2.json"
}
# q NAME EXPR: a Python expression over the summary `d` of $work/NAME.json.
q() {
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$work/$1.json"
}
# plain ARCHIVE: the archive uncompressed (skopeo 1.9 and podman 4.3 only read plain ones).
plain() {
  case "$1" in
    *.gz) zcat "$1" >"$work/$(basename "$1" .gz)"; echo "$work/$(basename "$1" .gz)" ;;
    *.zst) zstd -q -dc "$1" >"$work/$(basename "$1" .zst)"; echo "$work/$(basename "$1" .zst)" ;;
    *) echo "$1" ;;
  esac
}
# load ARCHIVE: podman load, remembering the image for cleanup.
load() {
  local out
  out=$(pod load -i "$1" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" | sed -nE 's/^Loaded image(\(s\))?: //p' >>"$work/loaded"
}

fail() { echo "    $*" >&2; return 1; }
expect_eq() { [ "$1" = "$2" ] || fail "expected [$2], got [$1]${3:+ ($3)}"; }

selected() {
  [ ${#filters[@]} -eq 0 ] && return 0
  for w in "${filters[@]}"; do [[ "$1" == *"$w"* ]] && return 0; done
  return 1
}
filters=("$@")

# t NAME FUNCTION: runs a test, prints its result and time.
t() {
  selected "$1" || return 0
  local t0=$SECONDS rc
  # Not inside `if`: there, bash would ignore the subshell's `set -e`.
  ( set -e; "$2" ) >"$work/test-$1.out" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    passed=$((passed + 1))
    echo "ok   $1 ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL $1 ($((SECONDS - t0)) s)"
    sed 's/^/     | /' "$work/test-$1.out" | tail -25
  fi
}

# ---------------------------------------------------------------------------------------------

# fakeroot fakes what our (dynamically linked) packer sees through lstat: as an unprivileged
# user, a chown inside fakeroot shows in the packed layer.
test_fakeroot_lstat() {
  local d=$work/fakeroot
  mkdir -p "$d"
  chmod 777 "$d"
  setpriv --reuid=65534 --regid=65534 --clear-groups env -i PATH=/usr/bin:/bin \
    fakeroot -- sh -c "mkdir $d/r && mkdir $d/r/x && echo hi > $d/r/x/f && chown 7:8 $d/r/x/f && mknod $d/r/null c 1 3 && $stevedore_path/bin/stevedore nix pack --owners fs $d/r $d/o"
  python3 - "$d/o/layer.tar" <<'EOF'
import sys, tarfile
m = {e.name: e for e in tarfile.open(sys.argv[1])}
assert m["./x/f"].uid == 7 and m["./x/f"].gid == 8, (m["./x/f"].uid, m["./x/f"].gid)
assert m["./x"].uid == 0 and m["."].uid == 0
assert m["./null"].ischr() and (m["./null"].devmajor, m["./null"].devminor) == (1, 3)
EOF
}

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

test_no_store_paths() {
  local out
  out=$(build noStore)
  summary "$out" nostore
  expect_eq "$(q nostore 'len(d["layers"])')" 1
  expect_eq "$(q nostore 'any(e[0].startswith("./nix") or e[0].startswith("/nix") for e in d["layers"][0]["entries"])')" False
  expect_eq "$(q nostore '[e[0] for e in d["layers"][0]["entries"]][:2]')" "['./', './bin/']"
}

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

test_helpers() {
  local out
  out=$(build helpers)
  summary "$out" helpers
  python3 - "$work/helpers.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][-1]["entries"]}
assert m["./usr/bin/env"][6].endswith("-coreutils/bin/env"), m["./usr/bin/env"]
assert m["./bin/sh"][6].endswith("-bash-interactive/bin/bash"), m["./bin/sh"]
for p in ["./etc/ssl/certs/ca-bundle.crt", "./etc/ssl/certs/ca-certificates.crt", "./etc/pki/tls/certs/ca-bundle.crt"]:
    assert m[p][6].endswith("-cacert/etc/ssl/certs/ca-bundle.crt"), m[p]
assert m["./etc/passwd"][6].endswith("-fake-nss/etc/passwd")
EOF
  # binSh's /bin/sh runs.
  load "$out"
  expect_eq "$(podrun helpers:latest /bin/sh -c 'echo sh works')" "sh works"
}

test_fakechroot() {
  local out
  out=$(build chroot) || fail "$(tail -5 "$work/chroot.log")"
  summary "$out" chroot
  expect_eq "$(q chroot '[e[0] for e in d["layers"][-1]["entries"] if "made" in e[0]]')" "['./made-in-chroot/', './made-in-chroot/f']"
  # proot's bindings (the store, /dev, /proc, ...) leave nothing in the tree.
  expect_eq "$(q chroot '[e[0] for e in d["layers"][-1]["entries"] if e[0].split("/")[1] in ("nix", "dev", "proc", "sys", "tmp")]')" "[]"
}

test_minimal_pkgs() {
  local out
  out=$(build minimal) || fail "$(tail -5 "$work/minimal.log")"
  load "$out"
  expect_eq "$(podrun minimal:latest)" "hello from stevedore"
}

test_errors() {
  check_error() { # ATTR MESSAGE
    if build "bad.$1" >/dev/null; then fail "bad.$1 built"; fi
    grep -qF -- "$2" "$work/bad.$1.log" || fail "bad.$1: no [$2] in: $(grep -i error "$work/bad.$1.log" | tail -3)"
  }
  check_error maxLayers1 'maxLayers must be greater than 1 (got 1)'
  check_error compressor 'compressor must be one of gz, none, zstd (got "xz")'
  check_error runAsRootList 'runAsRoot must be null or a string (a shell script)'
  check_error format 'format must be one of docker-archive, oci, oci-archive (got "squashfs")'
  check_error failingRunAsRoot 'failed with exit code 1'
  check_error missingBaseTag 'no image tagged base:nope (it has: base:latest)'
  check_error emptyName 'name must be a non-empty string'
  check_error badName 'name and tag: invalid image reference "team/../app:v1": path component ".."'
  check_error badTag 'name and tag: invalid image reference "app:v1\nX": it contains whitespace or a control character'
  check_error created 'created: "yesterday" is not an ISO-8601 date/time or "now"'
  check_error notDir 'is not a directory (symlinkJoin needs directories)'
  check_error failingCommands 'extraCommands failed'
  check_error noShell 'the stream executable needs pkgs.runtimeShell'
  check_error unknownArgument "unexpected argument 'copyToRoot'"
  check_error shellBoth 'give `command` or `run`, not both'
  check_error shellStructured 'derivation "structured" uses __structuredAttrs'
  check_error mergeNotList 'dockerTools.mergeImages: expects a list of images'
  check_error mergeBroken '-hello: a directory, not an image archive'
}

# mergeImages: one archive that podman loads as three images, busybox's layer stored once.
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

# streamNixShellImage / buildNixShellImage: the derivation's environment, the build user, and
# buildDerivation building the outputs inside the container.
test_nix_shell() {
  local run cmd inter target out dev
  target() { nix-instantiate --eval --json -E "(import $repo/tests/nix/pkgs.nix { }).shellTarget.$1.outPath" | tr -d '"'; }
  out=$(target out)
  dev=$(target dev)
  run=$(build shellRun) || fail "$(tail -5 "$work/shellRun.log")"
  "$run" >"$work/shell-run.tar" 2>/dev/null
  load "$work/shell-run.tar"
  podrun shell-target-env:run >"$work/shell-run.out" 2>&1 || fail "run: $(cat "$work/shell-run.out")"
  line() { sed -n "$1p" "$work/shell-run.out"; }
  expect_eq "$(line 1)" "greeting=hi there flags=-a -b enabled=1 out=$out dev=$dev"
  expect_eq "$(line 2)" "user=1000:1000 nixbld home=/build pwd=/build /build top=/build tmp=/build"
  [[ "$(line 3)" == "setup=1 hooked=yes notes=passed as a file shell=/nix/store/"*-host-bash/bin/bash ]] || fail "line 3: $(line 3)"
  expect_eq "$(line 4)" "build-writable"
  # buildDerivation ran the builder, which made both outputs in the image's store.
  expect_eq "$(line 5)" "built with GREETING=hi there in /build"
  expect_eq "$(line 6)" "passed as a file"
  skopeo inspect --config "docker-archive:$work/shell-run.tar" >"$work/shell-run.config"
  python3 - "$work/shell-run.config" "$out" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))["config"]
env = dict(e.split("=", 1) for e in c["Env"])
assert c["User"] == "1000:1000" and c["WorkingDir"] == "/build", c
assert len(c["Cmd"]) == 2 and c["Cmd"][0].endswith("-host-bash/bin/bash") and c["Cmd"][1].endswith("-nix-shell-rc"), c["Cmd"]
assert env["out"] == sys.argv[2] and "args" not in env and env["NIX_BUILD_CORES"] == "1", env
assert env["notesPath"].endswith("-pass-as-text-notes") and "notes" not in env, env
assert env["SSL_CERT_FILE"].endswith("-cacert/etc/ssl/certs/ca-bundle.crt"), env
assert [e.split("=", 1)[0] for e in c["Env"]] == sorted(env), "Env is not sorted"
EOF
  # buildNixShellImage with `command`: an interactive shell (so a terminal), as uid:gid.
  cmd=$(build shellCommand) || fail "$(tail -5 "$work/shellCommand.log")"
  [[ "$cmd" == *-shell-command.tar ]] || fail "archive name: $cmd"
  load "$cmd"
  podrun -t shell-command:latest >"$work/shell-cmd.out" 2>&1 || fail "command: $(cat "$work/shell-cmd.out")"
  grep -q "^interactive=[a-zA-Z]*i[a-zA-Z]* user=4321:765 home=/home/me hooked=yes" "$work/shell-cmd.out" || fail "command: $(cat "$work/shell-cmd.out")"
  expect_eq "$(podrun --entrypoint /bin/sh shell-command:latest -c 'grep nixbld /etc/passwd /etc/group; stat -c %u:%g /build; stat -c %a /nix/store' | tr '\n' ';')" \
    "/etc/passwd:nixbld:x:4321:765:Build user:/home/me:/noshell;/etc/group:nixbld:!:765:;4321:765;1777;"
  # With neither `command` nor `run`, Cmd is an interactive shell on the rc file.
  inter=$(build shellInteractive) || fail "$(tail -5 "$work/shellInteractive.log")"
  "$inter" >"$work/shell-inter.tar" 2>/dev/null
  skopeo inspect --config "docker-archive:$work/shell-inter.tar" | python3 -c 'import json,sys; c = json.load(sys.stdin)["config"]["Cmd"]; assert c[1] == "--rcfile" and len(c) == 3, c'
  expect_eq "$(nixeval 'c.shellInteractive.imageName')" '"shell-target-env"'
}

# buildImage without runAsRoot: copies (not links) of copyToRoot owned by uid:gid, the closure
# of the config and of the contents in the layer, /nix/store readable by everyone.
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

# runAsRoot over a layered base image (nixpkgs' redis example), without a VM: shadowSetup's
# useradd, a chowned /data, a deleted base file as a whiteout, extraCommands, then the
# flattened file system from exportImage.
test_run_as_root() {
  local out root
  out=$(build redisLike) || fail "$(tail -5 "$work/redisLike.log")"
  summary "$out" redis
  summary "$(build rootBase)" rootbase
  expect_eq "$(q redis '[l["diff_id"] for l in d["layers"]][:-1]')" "$(q rootbase '[l["diff_id"] for l in d["layers"]]')"
  expect_eq "$(q redis 'd["config"]["config"]["Env"]')" "['BASE=1', 'FOO=bar']"
  python3 - "$work/redis.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
m = {e[0]: e for e in d["layers"][-1]["entries"]}
assert "./etc/.wh.removed" in m, sorted(m)
assert m["./data/"][3] == 999 and m["./data/"][4] == 999, m["./data/"]
assert "./extra.txt" in m and "./bin/hello" in m
# Only what changed: the base's busybox links are not repeated, nor its store paths.
assert "./bin/sh" not in m and "./keep/file" not in m, sorted(m)
assert not any("-busybox" in n for n in m), sorted(m)
assert any(n.endswith("-greeting/share/greeting") for n in m), sorted(m)
EOF
  load "$(plain "$out")"
  expect_eq "$(podrun redis-like:latest)" "hello from stevedore"
  expect_eq "$(podrun redis-like:latest sh -c 'id redis; stat -c "%U:%G %n" /data /data/made; cat /keep/file /extra.txt; pwd; test -e /etc/removed || echo removed' | tr '\n' ';')" \
    "uid=999(redis) gid=999(redis) groups=999(redis);redis:redis /data;root:root /data/made;kept;extra;/data;removed;"
  root=$(build redisRoot) || fail "$(tail -5 "$work/redisRoot.log")"
  python3 - "$root" <<'EOF'
import sys, tarfile
t = tarfile.open(sys.argv[1])
m = {e.name: e for e in t}
assert not any(".wh." in n for n in m), [n for n in m if ".wh." in n]
assert "./etc/removed" not in m and "./keep/file" in m and "./data/made" in m, sorted(m)
assert (m["./data"].uid, m["./data"].gid) == (999, 999), m["./data"]
assert m["./bin/sh"].issym() and m["./bin/hello"].isfile()
assert all(e.mtime == 315532800 for e in m.values())
# copyToRoot is copied: its own store path is not needed, what it refers to is.
assert any(n.endswith("-greeting/share/greeting") for n in m)
assert not any(n.endswith("-hello/bin/hello") for n in m)
assert b"redis:x:999:999" in t.extractfile("./etc/passwd").read()
EOF
  # A stream as the base image, picked by name and tag.
  out=$(build streamBase) || fail "$(tail -5 "$work/streamBase.log")"
  summary "$(plain "$out")" onstream
  "$(build hello)" >"$work/hello-base.tar" 2>/dev/null
  summary "$work/hello-base.tar" hellobase
  expect_eq "$(q onstream '[e[0] for e in d["layers"][-1]["entries"] if "on-stream" in e[0]]')" "['./on-stream']"
  expect_eq "$(q onstream '[l["diff_id"] for l in d["layers"]][:-1]')" "$(q hellobase '[l["diff_id"] for l in d["layers"]]')"
}

# The Nix database, from buildImageWithNixDb, buildLayeredImageWithNixDb and
# streamLayeredImage's includeNixDB: Nix itself (Debian's nix-store, pointed at the image's
# unpacked root) checks every path against its registered hash.
test_nix_db() {
  local kind root dir
  for kind in image layered stream; do
    root=$(build "nixDbRoots.$kind") || fail "$kind: $(tail -5 "$work/nixDbRoots.$kind.log")"
    dir=$work/nixdb-$kind
    mkdir -p "$dir"
    tar -C "$dir" -xf "$root"
    ls "$dir/nix/var/nix/gcroots/docker" | grep -q -- '-hello$' || fail "$kind: no GC root"
    nix-store --store "local?root=$dir" --verify --check-contents >"$work/verify-$kind.log" 2>&1 || fail "$kind: $(tail -3 "$work/verify-$kind.log")"
    expect_eq "$(nix-store --store "local?root=$dir" -qR "$dir"/nix/var/nix/gcroots/docker/*-hello 2>/dev/null | sed 's/.*-//' | sort | tr '\n' ' ')" "busybox greeting hello " "$kind"
  done
  # The check notices a changed file.
  chmod -R u+w "$dir/nix/store"
  echo tampered >"$(echo "$dir"/nix/store/*-greeting)/share/greeting"
  if nix-store --store "local?root=$dir" --verify --check-contents >/dev/null 2>&1; then fail "a tampered store verified"; fi
}

# OCI output from the Nix functions: an oci-archive with zstd layers, an OCI layout directory.
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

# Where builds run: on the modern stack in the sandbox as a build user (uid 1000 inside the
# sandbox's user namespace, no host /etc), and as a nixbld user with the sandbox turned off;
# elsewhere as the calling user on the host's file system.
test_build_env() {
  probe() { # NONCE [OPTIONS...]: the uid, the group names, and whether the host's /etc is there
    nix-build --no-out-link "${@:2}" -E "builtins.derivation {
      name = \"build-env-$1\"; system = \"x86_64-linux\"; builder = \"/bin/sh\";
      args = [ \"-c\" \"{ /usr/bin/id -u; /usr/bin/id -Gn; test -e /etc/debian_version && echo host-etc || echo own-etc; } > \$out\" ];
    }" 2>"$work/build-env.log" | xargs cat | tr '\n' ' '
  }
  local nonce=$$.$RANDOM out
  out=$(probe "a$nonce")
  if [ -n "$sandboxed" ]; then
    expect_eq "$out" "1000 nixbld own-etc " "sandboxed"
    out=$(probe "b$nonce" --option sandbox false)
    [[ "$out" =~ ^[0-9]+\ nixbld\ host-etc\ $ ]] && [ "${out%% *}" != 0 ] || fail "unsandboxed: [$out]"
    grep -q "^nixbld[0-9]*:x:${out%% *}:" /etc/passwd || fail "uid ${out%% *} is no nixbld user"
  else
    expect_eq "$out" "$(id -u) $(id -Gn) host-etc " "unsandboxed"
  fi
}

# Every derivation the library makes for the cases (customisation layers with fakeRootCommands,
# runAsRoot and includeNixDB, confs, archives, streams, merges, exports) built in and out of
# Nix's sandbox, byte for byte: --check rebuilds each in the other mode and compares. The
# host's /usr and libraries let the stand-in fixtures and the dynamically linked binary run in
# the sandbox; runAsRoot's namespaces nest in the sandbox's. createdNow is left out: its date
# is the build's.
test_sandbox() {
  local other attrs=() drvs=() lib=()
  if [ -n "$sandboxed" ]; then
    other=(--option sandbox false)
  else
    # Nix 2.8 binds /bin as it is; later ones fail every build on merged /usr's /bin symlink
    # (the modern stack's nix.conf leaves /bin out).
    other=(--option sandbox true --option extra-sandbox-paths "/bin /usr /lib /lib64")
  fi
  mapfile -t attrs < <(nixeval '
    let
      skip = [ "dockerTools" "bad" "appTooManyLayers" "createdNow" ];
      names = builtins.filter (n: !builtins.elem n skip) (builtins.attrNames c);
      paths = n: if c.${n} ? drvPath then [ n ] else map (m: "${n}.${m}") (builtins.attrNames c.${n});
    in builtins.concatMap paths names' | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))')
  [ ${#attrs[@]} -gt 30 ] || fail "only ${#attrs[@]} cases: ${attrs[*]}"
  mapfile -t drvs < <(nix-instantiate "$cases" "${nargs[@]}" $(printf -- '-A %s ' "${attrs[@]}") 2>"$work/sandbox-eval.log")
  [ ${#drvs[@]} -eq ${#attrs[@]} ] || fail "instantiated ${#drvs[@]} of ${#attrs[@]}: $(tail -3 "$work/sandbox-eval.log")"
  # The library's derivations are those whose builder is the stevedore binary.
  mapfile -t lib < <(nix-store -qR "${drvs[@]}" | grep '\.drv$' | python3 -c '
import re, sys
for d in sys.stdin.read().split():
    m = re.search(r"\"x86_64-linux\",\"([^\"]*)\"", open(d).read())
    if m and m.group(1).endswith("/bin/stevedore"):
        print(d)')
  echo "${#lib[@]} library derivations of ${#attrs[@]} cases"
  [ ${#lib[@]} -gt 60 ] || fail "only ${#lib[@]} library derivations"
  nix-store --realise "${lib[@]}" --max-jobs 2 >/dev/null 2>"$work/sandbox.log" || fail "build: $(grep -v '^warning' "$work/sandbox.log" | tail -3)"
  nix-store --realise --check --keep-going "${lib[@]}" --max-jobs 2 "${other[@]}" >/dev/null 2>"$work/sandbox-check.log" \
    || fail "rebuilt with ${other[*]}: $(grep -v '^warning' "$work/sandbox-check.log" | grep -E 'error|differ' | head -5)"
}

# A remote build: the image derivations built on a second Nix store over ssh-ng (sshd on
# loopback, a store under another root; tests/modern/suite.sh sets it up and names it in
# STEVEDORE_NIX_REMOTE and STEVEDORE_NIX_REMOTE_ROOT) give the same bytes as the local build,
# as a fleet of builders (Nix's distributed builds, Hydra) would.
test_remote_build() {
  local a drv out here
  for a in helloGz owners redisLike nixDbImage merged ociArchive shellCommand; do
    drv=$(nix-instantiate "$cases" -A "$a" "${nargs[@]}" 2>"$work/remote-$a.log") || fail "$a: $(tail -3 "$work/remote-$a.log")"
    out=$(nix build --store "$STEVEDORE_NIX_REMOTE" --eval-store auto "$drv^*" --no-link --print-out-paths 2>>"$work/remote-$a.log") \
      || fail "$a on the remote: $(grep -v '^warning' "$work/remote-$a.log" | tail -3)"
    [ -e "$STEVEDORE_NIX_REMOTE_ROOT$out" ] || fail "$a: $out is not in the remote store"
    # Built there, not copied: the remote store has the build's log.
    nix-store --store "local?root=$STEVEDORE_NIX_REMOTE_ROOT" --read-log "$drv" 2>/dev/null | grep -q . || fail "$a: no build log in the remote store"
    here=$(build "$a") || fail "$a: $(tail -3 "$work/$a.log")"
    expect_eq "$out" "$here" "$a"
    expect_eq "$(nix-store --store "local?root=$STEVEDORE_NIX_REMOTE_ROOT" -q --hash "$out")" "$(nix-store -q --hash "$here")" "$a's NAR hash"
  done
}

# The flake, against a stand-in nixpkgs flake made of tests/nix/pkgs.nix and the binary.
test_flake() {
  local fake=$work/fake-nixpkgs flake=$work/flake
  mkdir -p "$fake" "$flake"
  cp "$repo/tests/nix/fake-nixpkgs/flake.nix" "$repo/tests/nix/pkgs.nix" "$fake/"
  cp -r "$work/stevedore" "$fake/stevedore"
  cp -r "$repo/flake.nix" "$repo/flake.lock" "$repo/nix" "$repo/Cargo.toml" "$repo/Cargo.lock" "$flake/"
  local over=(--override-input nixpkgs "path:$fake" --no-write-lock-file)
  nix flake show "path:$flake" "${over[@]}" >"$work/flake-show.txt" 2>"$work/flake.log" || fail "flake show: $(tail -3 "$work/flake.log")"
  grep -q "overlays" "$work/flake-show.txt" || fail "no overlays in: $(cat "$work/flake-show.txt")"
  local img
  nix build "path:$flake#checks.x86_64-linux.hello-image" "${over[@]}" -o "$work/flake-image" 2>>"$work/flake.log" || fail "build: $(tail -5 "$work/flake.log")"
  img=$(readlink "$work/flake-image")
  skopeo inspect "docker-archive:$(plain "$img")" | grep -q '"amd64"'
  nix build "path:$flake#checks.x86_64-linux.hello-build-image" "${over[@]}" -o "$work/flake-build-image" 2>>"$work/flake.log" || fail "build buildImage: $(tail -5 "$work/flake.log")"
  skopeo inspect --config "docker-archive:$(plain "$(readlink "$work/flake-build-image")")" | grep -q '"/nix/store/[^"]*-hello/bin/hello"' || fail "buildImage check: no hello in the config"
  local stream
  nix build "path:$flake#checks.x86_64-linux.hello-stream" "${over[@]}" -o "$work/flake-stream" 2>>"$work/flake.log" || fail "build stream: $(tail -5 "$work/flake.log")"
  stream=$(readlink "$work/flake-stream")
  "$stream" | pod load >/dev/null
  echo stevedore-hello:latest >>"$work/loaded"
  expect_eq "$(podrun stevedore-hello:latest)" "hello from stevedore"
  # lib.dockerTools and the overlay give the same functions.
  expect_eq "$(nix eval --json "path:$flake#lib" "${over[@]}" --apply 'l: builtins.isFunction l.dockerTools' 2>>"$work/flake.log")" true
  # The overlay replaces pkgs.dockerTools; its functions build with the overlaid stevedore.
  nix eval --impure --json "${over[@]}" --expr "
    let
      flake = builtins.getFlake \"path:$flake\";
      fake = builtins.getFlake \"path:$fake\";
      prev = fake.legacyPackages.x86_64-linux;
      final = prev // flake.overlays.default final prev // { buildPackages = final; };
    in {
      names = builtins.attrNames (builtins.intersectAttrs { streamLayeredImage = 1; buildLayeredImage = 1; fakeNss = 1; } final.dockerTools);
      drv = (final.dockerTools.streamLayeredImage { name = \"overlay\"; contents = [ final.busybox ]; }).drvPath;
    }
  " >"$work/overlay.json" 2>>"$work/flake.log" || fail "overlay: $(tail -3 "$work/flake.log")"
  python3 - "$work/overlay.json" <<'EOF2'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["names"] == ["buildLayeredImage", "fakeNss", "streamLayeredImage"], d
assert d["drv"].endswith("-stream-overlay.drv"), d
EOF2
}

# passthru.copyToRegistry pushes to a registry on loopback, and skopeo reads the image back.
test_copy_to_registry() {
  local push dir port out
  push=$(build hello.copyToRegistry)
  dir=$work/registry
  port=$((20000 + RANDOM % 20000))
  mkdir -p "$dir"
  printf 'version: 0.1\nhttp:\n  addr: 127.0.0.1:%s\nstorage:\n  filesystem:\n    rootdirectory: %s\n' "$port" "$dir" >"$dir/config.yml"
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  local pid=$!
  # shellcheck disable=SC2064
  trap "kill $pid 2>/dev/null" RETURN
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

t fakeroot-lstat test_fakeroot_lstat
t stream test_stream
t passthru test_passthru
t archives test_archives
t owners test_owners
t reproducible test_reproducible
t no-store-paths test_no_store_paths
t max-layers test_max_layers
t from-image test_from_image
t dates test_dates
t untagged test_untagged
t helpers test_helpers
t fakechroot test_fakechroot
t minimal-pkgs test_minimal_pkgs
t errors test_errors
t build-image test_build_image
t run-as-root test_run_as_root
t nix-db test_nix_db
t oci-formats test_oci_formats
t merge test_merge
t build-env test_build_env
t sandbox test_sandbox
t nix-shell test_nix_shell
t flake test_flake
[ -z "${STEVEDORE_NIX_REMOTE:-}" ] || t remote-build test_remote_build
t copy-to-registry test_copy_to_registry

echo "nix tests took $((SECONDS - started)) s"
[ "$failed" -eq 0 ] || echo "failed: ${failures[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
