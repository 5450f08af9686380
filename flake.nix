{
  description = "stevedore: container images from Nix closures, a drop-in for pkgs.dockerTools";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f nixpkgs.legacyPackages.${system};
          }) systems
        );

      # stevedore's dockerTools for a package set; the binary is built with that set.
      dockerToolsFor =
        pkgs:
        import ./nix {
          inherit pkgs;
          stevedore = pkgs.buildPackages.callPackage ./nix/package.nix { };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        stevedore = pkgs.callPackage ./nix/package.nix { };
        default = stevedore;
      });

      # `lib.dockerTools pkgs`: nixpkgs' dockerTools API for `pkgs`, built by stevedore; what
      # stevedore lacks falls back to nixpkgs'.
      lib.dockerTools = dockerToolsFor;

      # Sets `pkgs.stevedore` and replaces `pkgs.dockerTools` (keeping nixpkgs' functions that
      # stevedore does not provide).
      overlays.default = final: prev: {
        stevedore = final.callPackage ./nix/package.nix { };
        dockerTools = import ./nix {
          pkgs = final;
          stevedore = final.buildPackages.stevedore;
          fallback = prev.dockerTools or { };
        };
      };

      checks = forAllSystems (
        pkgs:
        let
          dockerTools = dockerToolsFor pkgs;
          args = {
            name = "stevedore-hello";
            tag = "latest";
            config.Cmd = [ "${pkgs.hello}/bin/hello" ];
          };
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          hello-image = dockerTools.buildLayeredImage args;
          hello-stream = dockerTools.streamLayeredImage args;
          # A root step without a VM.
          hello-build-image = dockerTools.buildImage (
            args
            // {
              copyToRoot = [ pkgs.busybox ];
              runAsRoot = ''
                mkdir -p /data
                chown 1000:1000 /data
              '';
            }
          );
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
