# The stevedore binary, for callPackage: `pkgs.callPackage ./nix/package.nix { }`.
{ lib, rustPlatform }:
let
  cargo = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  # Only what cargo needs, so edits elsewhere (docs, nix/, tests/) do not rebuild the binary.
  src = builtins.path {
    name = "stevedore-src";
    path = ../.;
    filter =
      path: type:
      let
        rel = builtins.substring (builtins.stringLength (toString ../.) + 1) (-1) (toString path);
        top = builtins.head (builtins.split "/" rel);
      in
      builtins.elem top [
        "Cargo.toml"
        "Cargo.lock"
        "src"
      ];
  };
in
rustPlatform.buildRustPackage {
  pname = cargo.package.name;
  version = cargo.package.version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;
  # Integration tests need podman, skopeo and a registry; the unit tests run here.
  cargoTestFlags = [
    "--lib"
    "--bins"
  ];
  meta = {
    description = cargo.package.description;
    license = lib.licenses.mit;
    mainProgram = "stevedore";
  };
}
