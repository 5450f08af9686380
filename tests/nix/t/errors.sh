# Mistakes: every case under cases.nix's `bad` fails to build, with a message that names it.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# errors: each bad.* case fails with its message (check_error ATTR MESSAGE)
test_errors() {
  check_error() { # ATTR MESSAGE
    if build "bad.$1" >/dev/null; then fail "bad.$1 built"; fi
    grep -qF -- "$2" "$work/bad.$1.log" || fail "bad.$1: no [$2] in: $(grep -i error "$work/bad.$1.log" | tail -3)"
  }
  check_error maxLayers1 'maxLayers must be greater than 1 (got 1)'
  check_error compressor 'compressor must be one of gz, none, zstd, zstd:chunked (got "xz")'
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
  check_error overrideUnknown 'dockerTools.buildImage: image "empty": overrideAttrs: postInstall is not an attribute of this derivation'
  check_error variant 'variant must be null or a non-empty string'
}
t errors test_errors
