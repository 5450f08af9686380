# exportImage: an image's flattened file system as one tar (nixpkgs runs a VM for this; here it
# is made in userspace).
{
  # nix/lib.nix
  lib,
}:
let
  inherit (lib) imageFile mkResult stevedoreDrv;
in
{
  # nixpkgs' exportImage: a derivation that is the tar, whiteouts and opaque directories
  # applied, owners kept. Like nixpkgs' (a runCommand), it has passthru and meta (empty) and
  # overrideAttrs / overrideDerivation (lib.nix's mkResult), and no `.override`.
  exportImage =
    {
      # The image: a Docker archive (plain or compressed), or (ours) a stream executable
      # from streamLayeredImage.
      fromImage,
      # Which image of a fromImage archive that has several (both null: the first).
      fromImageName ? null,
      fromImageTag ? null,
      # The output's name; nixpkgs' default too.
      name ? fromImage.name,
      # The VM's disk size in nixpkgs; accepted and unused (no VM here).
      diskSize ? 1024,
    }:
    mkResult
      {
        make = stevedoreDrv "export";
        fail = msg: throw "dockerTools.exportImage: ${msg}";
      }
      (_: {
        inherit name fromImageName fromImageTag;
        fromImage = "${imageFile fromImage}";
        passthru = { };
        meta = { };
      });
}
