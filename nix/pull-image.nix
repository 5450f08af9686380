# pullImage without skopeo: nixpkgs' `dockerTools.pullImage` (same arguments and defaults), a
# fixed-output derivation whose builder is `stevedore pull`. It writes the Docker archive
# `skopeo copy docker://NAME@DIGEST docker-archive:$out:FINALNAME:FINALTAG` writes, byte for
# byte (measured against skopeo 1.9 and 1.18, which agree: see README.md, pullImage), so the
# hashes of existing nixpkgs calls and of nix-prefetch-docker still hold, and
# `stevedore prefetch` prints them too:
#
#   stevedore prefetch docker://ghcr.io/owner/app:v1 [--arch arm64] [--final-image-tag TAG]
#
#   pullImage = import ./pull-image.nix { inherit stevedore pkgs; };
#
# `stevedore` is the package (a derivation or a directory with bin/stevedore). Only builtins
# are used (lib.nix's helpers too); `pkgs` is consulted for the host platform's default
# architecture and nothing else.
# No credentials: like nixpkgs' pullImage, the image must be pullable anonymously (anything
# given to the builder would end up in the derivation, and so in the store).
{
  stevedore,
  pkgs ? { },
  ...
}:
let
  # The binary, the platform, and the result as mkDerivation's (passthru, meta, overrideAttrs).
  inherit (import ./lib.nix { inherit stevedore pkgs; })
    stevedoreBin
    platform
    buildSystem
    hostSystem
    mkResult
    ;
  defaultArchitecture = platform.defaultArchitecture (
    throw "pullImage: no default architecture for ${hostSystem}; pass `arch`"
  );

  fixName = name: builtins.replaceStrings [ "/" ":" ] [ "-" "-" ] name;

  # What nixpkgs' fetchers use for "no hash yet" (lib.fakeHash, lib.fakeSha256): the build
  # fails and prints the real one.
  fakeHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  fakeSha256 = "0000000000000000000000000000000000000000000000000000";
in
{
  # The image's repository: "ghcr.io/owner/app", "library/nginx" (Docker Hub), ...
  imageName,
  # The digest of what the name refers to (a multi-platform index's digest is fine: the
  # platform is picked from it): `stevedore prefetch` prints it.
  imageDigest,
  # The output's hash, as current nixpkgs' pullImage takes it (lib.fetchers.withNormalizedHash):
  # `hash` (SRI) or `sha256`, not both, "" for a fake one (the build fails and prints the real
  # one); or `outputHash` with `outputHashAlgo`, and then neither of the others.
  hash ? null,
  sha256 ? null,
  outputHash ? null,
  outputHashAlgo ? null,
  # The platform picked from a multi-platform index: os, and arch below.
  os ? "linux",
  # Image architecture; defaults to the host platform's, in Go's names.
  arch ? defaultArchitecture,
  # The CPU variant to pick ("v7", "v8"), as skopeo's --override-variant: else a less capable
  # one, else an entry without one; null: an entry without a variant (arm64: or v8).
  variant ? null,
  # Name and tag recorded in the archive.
  finalImageName ? imageName,
  finalImageTag ? "latest",
  # false: allow plain HTTP and unverified TLS (registries on trusted networks).
  tlsVerify ? true,
  # The output's name.
  name ? fixName "docker-image-${finalImageName}-${finalImageTag}.tar",
}:
let
  # nixpkgs' precedence: `outputHash` as given; else the one of `hash` and `sha256`.
  fixedOutput =
    if outputHash != null then
      if hash != null || sha256 != null then
        throw "pullImage: give `outputHash` (with `outputHashAlgo`) or `hash` or `sha256`, not several"
      else if outputHashAlgo == null && builtins.match "(md5|sha1|sha256|sha512)-.*" outputHash == null then
        throw "pullImage: `outputHash` ${outputHash} is not an SRI hash: give `outputHashAlgo` too"
      else
        { inherit outputHash outputHashAlgo; }
    else if hash != null && sha256 != null then
      throw "pullImage: give either `sha256` or `hash`, not both"
    else if hash != null then
      {
        outputHash = if hash == "" then fakeHash else hash;
        outputHashAlgo = null;
      }
    else if sha256 != null then
      {
        outputHash = if sha256 == "" then fakeSha256 else sha256;
        outputHashAlgo = "sha256";
      }
    else
      throw "pullImage: no hash: give `hash` (`stevedore prefetch` prints it; \"\" builds once and prints it)";
in
# The builder is `stevedore pull`, not structured attributes: overrideAttrs may add any.
mkResult
  {
    make = builtins.derivation;
    open = true;
  }
  (_: {
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
      ++ (if variant == null then [ ] else [ "--variant" variant ])
      ++ (if tlsVerify then [ ] else [ "--insecure" ]);
    # As nixpkgs sets them, for consumers that read them off the derivation.
    imageName = finalImageName;
    imageTag = finalImageTag;
    outputHashMode = "flat";
    inherit (fixedOutput) outputHash outputHashAlgo;
    preferLocalBuild = true;
    passthru = { };
    meta = { };
  })
