# Where builds run and what they see: the build user, and the same bytes in and out of Nix's
# sandbox.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# build-env: builds run as the user, and see the /etc, that Nix's configuration gives them.
# On the modern stack in the sandbox as a build user (uid 1000 inside the sandbox's user
# namespace, no host /etc), and as a nixbld user with the sandbox turned off; elsewhere as the
# calling user on the host's file system.
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
t build-env test_build_env

# sandbox: every library derivation of the cases builds the same bytes in and out of Nix's sandbox.
# Customisation layers with fakeRootCommands, runAsRoot and includeNixDB, confs, archives,
# streams, merges, exports: --check rebuilds each in the other mode and compares. The host's
# /usr and libraries let the stand-in fixtures and the dynamically linked binary run in the
# sandbox; runAsRoot's namespaces nest in the sandbox's. createdNow and nixos.createdNow are left
# out: their date is the build's.
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
      skip = [ "dockerTools" "bad" "evalOnly" "appTooManyLayers" "createdNow" "nixos.createdNow" ];
      keep = builtins.filter (n: !builtins.elem n skip);
      paths = n: if c.${n} ? drvPath then [ n ] else keep (map (m: "${n}.${m}") (builtins.attrNames c.${n}));
    in builtins.concatMap paths (keep (builtins.attrNames c))' | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))')
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
t sandbox test_sandbox
