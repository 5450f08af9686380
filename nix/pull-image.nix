# pullImage without skopeo: nixpkgs' `dockerTools.pullImage` (same arguments and defaults), a
# fixed-output derivation whose builder is `stevedore pull`. It writes a Docker archive with
# the layers decompressed, a pure function of the image, so `stevedore prefetch` can print the
# hash ahead of time:
#
#   stevedore prefetch docker://ghcr.io/owner/app:v1 [--arch arm64] [--final-image-tag TAG]
#
# Hashes from nix-prefetch-docker do not carry over: skopeo writes a different archive.
#
#   pullImage = import ./pull-image.nix { inherit stevedore pkgs; };
#
# `stevedore` is the package (a derivation or a directory with bin/stevedore). Only builtins
# are used; `pkgs` is consulted for the host platform's default architecture and nothing else.
# No credentials: like nixpkgs' pullImage, the image must be pullable anonymously (anything
# given to the builder would end up in the derivation, and so in the store).
{
  stevedore,
  pkgs ? { },
  ...
}:
let
  stevedoreBin = "${stevedore}/bin/stevedore";

  platform = import ./platform.nix { inherit stevedore pkgs; };
  inherit (platform) buildSystem hostSystem;
  defaultArchitecture = platform.defaultArchitecture (
    throw "pullImage: no default architecture for ${hostSystem}; pass `arch`"
  );

  fixName = name: builtins.replaceStrings [ "/" ":" ] [ "-" "-" ] name;

  # What nixpkgs' fetchers use for "no hash yet": the build fails and prints the real one.
  fakeHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
in
{
  # The image's repository: "ghcr.io/owner/app", "library/nginx" (Docker Hub), ...
  imageName,
  # The digest of what the name refers to (a multi-platform index's digest is fine: the
  # platform is picked from it): `stevedore prefetch` prints it.
  imageDigest,
  # The output's hash: `sha256` (nixpkgs' older name) or `hash` (SRI), not both; neither: a
  # fake hash, so that the build fails and prints the real one.
  sha256 ? "",
  hash ? "",
  # The platform picked from a multi-platform index: os, and arch below.
  os ? "linux",
  # Image architecture; defaults to the host platform's, in Go's names.
  arch ? defaultArchitecture,
  # Name and tag recorded in the archive.
  finalImageName ? imageName,
  finalImageTag ? "latest",
  # false: allow plain HTTP and unverified TLS (registries on trusted networks).
  tlsVerify ? true,
  # The output's name.
  name ? fixName "docker-image-${finalImageName}-${finalImageTag}.tar",
}:
assert
  (sha256 != "" && hash != "")
  -> throw "pullImage: give either `sha256` or `hash`, not both";
builtins.derivation {
  inherit name imageDigest;
  system = buildSystem;
  builder = stevedoreBin;
  args =
    [
      "pull"
      "docker://${imageName}@${imageDigest}"
      "--os"
      os
      "--arch"
      arch
      "--format"
      "docker-archive"
      "--image-name"
      finalImageName
      "--image-tag"
      finalImageTag
      "--output"
      (builtins.placeholder "out")
    ]
    ++ (if tlsVerify then [ ] else [ "--insecure" ]);
  # As nixpkgs sets them, for consumers that read them off the derivation.
  imageName = finalImageName;
  imageTag = finalImageTag;
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash =
    if hash != "" then
      hash
    else if sha256 != "" then
      sha256
    else
      fakeHash;
  preferLocalBuild = true;
}
