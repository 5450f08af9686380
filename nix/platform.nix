# Which platform stevedore's derivations build on, and the GOARCH name (what the OCI image spec
# and registries use) of the platform images are for. Shared by default.nix and pull-image.nix.
{
  stevedore,
  pkgs ? { },
}:
rec {
  # Derivations run stevedore, so they are for the platform stevedore was built for.
  buildSystem =
    if builtins.isAttrs stevedore && stevedore ? system then
      stevedore.system
    else
      pkgs.stdenv.buildPlatform.system or pkgs.system or builtins.currentSystem;

  hostSystem = pkgs.stdenv.hostPlatform.system or pkgs.system or buildSystem;

  goArch = {
    x86_64-linux = "amd64";
    aarch64-linux = "arm64";
    i686-linux = "386";
    armv5tel-linux = "arm";
    armv6l-linux = "arm";
    armv7l-linux = "arm";
    riscv64-linux = "riscv64";
    powerpc64le-linux = "ppc64le";
    s390x-linux = "s390x";
    mips64el-linux = "mips64le";
    loongarch64-linux = "loong64";
    x86_64-darwin = "amd64";
    aarch64-darwin = "arm64";
  };

  # The host's GOARCH, or `fallback` (a caller's throw naming its own argument) if unknown.
  defaultArchitecture = fallback: goArch.${hostSystem} or pkgs.go.GOARCH or fallback;
}
