# exportImage: an image's flattened file system as one tar (nixpkgs runs a VM for this; here it
# is made in userspace).
{
  # nix/lib.nix
  lib,
}:
let
  inherit (lib) imageFile stevedoreDrv;
in
{
  # nixpkgs' exportImage: a derivation that is the tar, whiteouts and opaque directories
  # applied, owners kept.
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
    stevedoreDrv "export" {
      inherit name fromImageName fromImageTag;
      fromImage = "${imageFile fromImage}";
    };
}
