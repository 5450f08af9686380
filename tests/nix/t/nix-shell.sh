# streamNixShellImage and buildNixShellImage: a derivation's build environment as an image.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# nix-shell: the image has the derivation's environment and build user; buildDerivation builds in it
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
t nix-shell test_nix_shell
