# A stand-in for the nixpkgs flake input, for tests/nix/run.sh: tests/nix/pkgs.nix (host tools)
# and a prebuilt stevedore, which run.sh copies next to this file. Used with
#   --override-input nixpkgs path:DIR
{
  outputs =
    { self }:
    let
      pkgsFor =
        system:
        import ./pkgs.nix {
          inherit system;
          stevedorePrebuilt = ./stevedore;
        };
    in
    {
      legacyPackages.x86_64-linux = pkgsFor "x86_64-linux";
      legacyPackages.aarch64-linux = pkgsFor "aarch64-linux";
    };
}
