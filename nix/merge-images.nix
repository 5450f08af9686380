# mergeImages: several images in one Docker archive, for one `docker load`.
{
  # nix/lib.nix
  lib,
}:
let
  inherit (lib) mkResult stevedoreDrv;
in
{
  # nixpkgs' mergeImages: a derivation that is an uncompressed Docker archive holding all the
  # images, each layer stored once. Like nixpkgs' (a runCommand), it has passthru and meta
  # (empty) and overrideAttrs / overrideDerivation (lib.nix's mkResult).
  mergeImages =
    # A list of images: archives (plain, gz or zstd) or (ours) stream executables.
    images:
    if builtins.isList images then
      mkResult
        {
          make = stevedoreDrv "merge";
          fail = msg: throw "dockerTools.mergeImages: ${msg}";
        }
        (_: {
          name = "merge-docker-images";
          images = map (i: "${i}") images;
          passthru = { };
          meta = { };
        })
    else
      throw "dockerTools.mergeImages: expects a list of images";
}
