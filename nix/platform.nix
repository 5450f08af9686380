# Which platform stevedore's derivations build on, and the GOARCH name (what the OCI image spec
# and registries use) of the platform images are for. Shared by lib.nix and pull-image.nix.
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

  # Nix system -> GOARCH, shared with the binary (enums.json).
  goArch = (builtins.fromJSON (builtins.readFile ./enums.json)).goArch;

  # The host's GOARCH, or `fallback` (a caller's throw naming its own argument) if unknown.
  defaultArchitecture = fallback: goArch.${hostSystem} or pkgs.go.GOARCH or fallback;
}
