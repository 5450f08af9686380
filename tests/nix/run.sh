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
#
# The framework (setup, helpers, `t NAME FUNCTION`) is tests/nix/lib.sh; the tests are in
# tests/nix/t/AREA.sh, one file per area, run in the order of `areas` below.
set -uo pipefail
# shellcheck source=tests/nix/lib.sh
source "$(dirname "$0")/lib.sh"

areas=(
  fakeroot    # the binary under fakeroot
  layered     # streamLayeredImage, buildLayeredImage
  helpers     # dockerTools' helpers, enableFakechroot, the library with no pkgs
  errors      # bad arguments and failing builds, with their messages
  build-image # buildImage without runAsRoot
  run-as-root # runAsRoot over a base image, exportImage
  nix-db      # the Nix database in images
  formats     # OCI output
  merge       # mergeImages
  api         # overrideAttrs, passthru, meta, functionArgs, variant
  sandbox     # the build environment, in and out of Nix's sandbox
  nix-shell   # streamNixShellImage, buildNixShellImage
  nixos-tests # what nixpkgs' nixos/tests/docker-tools.nix asserts, without a VM
  flake       # flake.nix
  remote      # remote builds over ssh-ng (with STEVEDORE_NIX_REMOTE)
  registry    # copyToRegistry, pullImage
)
# An area file not in the list would silently not run.
for f in "$(dirname "$0")"/t/*.sh; do
  [[ " ${areas[*]} " == *" $(basename "$f" .sh) "* ]] || { echo "$f is not in tests/nix/run.sh's areas"; echo "0 passed, 1 failed"; exit 1; }
done

setup "$@"
for area in "${areas[@]}"; do
  # shellcheck source=/dev/null
  source "$repo/tests/nix/t/$area.sh"
done

finish
