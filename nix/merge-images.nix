# mergeImages: several images in one Docker archive, for one `docker load`.
{
  # nix/lib.nix
  lib,
}:
let
  inherit (lib) stevedoreDrv;
in
{
  # nixpkgs' mergeImages: a derivation that is an uncompressed Docker archive holding all the
  # images, each layer stored once.
  mergeImages =
    # A list of images: archives (plain, gz or zstd) or (ours) stream executables.
    images:
    if builtins.isList images then
      stevedoreDrv "merge" {
        name = "merge-docker-images";
        images = map (i: "${i}") images;
      }
    else
      throw "dockerTools.mergeImages: expects a list of images";
}
