# stevedore's dockerTools: nixpkgs' `pkgs.dockerTools` API (same argument names, defaults and
# meaning) with the heavy steps done by the stevedore binary.
#
#   import ./nix { inherit pkgs; stevedore = <the stevedore package>; }
#
# The core path (streamLayeredImage / buildLayeredImage without commands) uses builtins only:
# each step is a derivation whose builder is stevedore itself, reading structured attrs, so it
# needs neither nixpkgs' lib nor stdenv. `pkgs` supplies what only some features need
# (runtimeShell, coreutils, fakeroot, proot, and the packages behind the helpers), looked up
# lazily. Functions stevedore does not implement come from `fallback` (nixpkgs' own dockerTools).
#
# This file only assembles the set; each function is in the file named here, its arguments
# documented where they are declared:
#
#   streamLayeredImage, buildLayeredImage,
#   buildLayeredImageWithNixDb                 stream-layered-image.nix
#   buildImage, buildImageWithNixDb            build-image.nix
#   exportImage                                export-image.nix
#   mergeImages                                merge-images.nix
#   pullImage                                  pull-image.nix
#   streamNixShellImage, buildNixShellImage    nix-shell-image.nix
#   fakeNss, usrBinEnv, binSh, caCertificates,
#   shadowSetup                                helpers.nix
#
# and what they share: lib.nix (the derivation helpers, the results' mkDerivation API (mkResult:
# passthru, meta, overrideAttrs), makeOverridable, every argument check, output names),
# platform.nix (the build platform, the default architecture), enums.json (compressors, output
# formats, GOARCH names and the attributes Nix reads, read by the binary too). package.nix builds
# the binary.
{
  # The package set: nixpkgs, or anything with the attributes the functions use.
  pkgs ? { },
  # The stevedore package: a derivation, or a store path holding bin/stevedore.
  stevedore,
  # What is not ours: nixpkgs' dockerTools (the overlay passes the previous one).
  fallback ? (pkgs.dockerTools or { }),
}:
let
  lib = import ./lib.nix { inherit pkgs stevedore; };

  layered = import ./stream-layered-image.nix { inherit pkgs lib; };
  image = import ./build-image.nix { inherit pkgs lib; };
  exported = import ./export-image.nix { inherit lib; };
  merged = import ./merge-images.nix { inherit lib; };
  helpers = import ./helpers.nix { inherit pkgs lib; };
  nixShell = import ./nix-shell-image.nix {
    inherit pkgs;
    inherit (layered) streamLayeredImage buildLayeredImage;
    inherit (lib)
      writeText
      writeFiles
      setFunctionArgs
      functionArgs
      ;
    inherit (helpers) binSh usrBinEnv;
  };

  ours = {
    inherit (layered) streamLayeredImage buildLayeredImage buildLayeredImageWithNixDb;
    inherit (image) buildImage buildImageWithNixDb;
    inherit (exported) exportImage;
    inherit (merged) mergeImages;
    pullImage = import ./pull-image.nix { inherit stevedore pkgs; };
    inherit (nixShell) streamNixShellImage buildNixShellImage;
    inherit (helpers)
      fakeNss
      usrBinEnv
      binSh
      caCertificates
      shadowSetup
      ;
  };
in
fallback // ours
