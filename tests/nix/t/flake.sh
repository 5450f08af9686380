# The flake (flake.nix), against a stand-in nixpkgs flake made of tests/nix/pkgs.nix and the
# binary (tests/nix/fake-nixpkgs).
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# flake: its checks build and run, lib.dockerTools is there, the overlay builds with its stevedore
test_flake() {
  local fake=$work/fake-nixpkgs flake=$work/flake
  mkdir -p "$fake" "$flake"
  cp "$repo/tests/nix/fake-nixpkgs/flake.nix" "$repo/tests/nix/pkgs.nix" "$fake/"
  cp -r "$work/stevedore" "$fake/stevedore"
  cp -r "$repo/flake.nix" "$repo/flake.lock" "$repo/nix" "$repo/Cargo.toml" "$repo/Cargo.lock" "$flake/"
  local over=(--override-input nixpkgs "path:$fake" --no-write-lock-file)
  nix flake show "path:$flake" "${over[@]}" >"$work/flake-show.txt" 2>"$work/flake.log" || fail "flake show: $(tail -3 "$work/flake.log")"
  grep -q "overlays" "$work/flake-show.txt" || fail "no overlays in: $(cat "$work/flake-show.txt")"
  local img
  nix build "path:$flake#checks.x86_64-linux.hello-image" "${over[@]}" -o "$work/flake-image" 2>>"$work/flake.log" || fail "build: $(tail -5 "$work/flake.log")"
  img=$(readlink "$work/flake-image")
  skopeo inspect "docker-archive:$(plain "$img")" | grep -q '"amd64"'
  nix build "path:$flake#checks.x86_64-linux.hello-build-image" "${over[@]}" -o "$work/flake-build-image" 2>>"$work/flake.log" || fail "build buildImage: $(tail -5 "$work/flake.log")"
  skopeo inspect --config "docker-archive:$(plain "$(readlink "$work/flake-build-image")")" | grep -q '"/nix/store/[^"]*-hello/bin/hello"' || fail "buildImage check: no hello in the config"
  local stream
  nix build "path:$flake#checks.x86_64-linux.hello-stream" "${over[@]}" -o "$work/flake-stream" 2>>"$work/flake.log" || fail "build stream: $(tail -5 "$work/flake.log")"
  stream=$(readlink "$work/flake-stream")
  "$stream" | pod load >/dev/null
  echo stevedore-hello:latest >>"$work/loaded"
  expect_eq "$(podrun stevedore-hello:latest)" "hello from stevedore"
  # lib.dockerTools and the overlay give the same functions.
  expect_eq "$(nix eval --json "path:$flake#lib" "${over[@]}" --apply 'l: builtins.isFunction l.dockerTools' 2>>"$work/flake.log")" true
  # The overlay replaces pkgs.dockerTools; its functions build with the overlaid stevedore.
  nix eval --impure --json "${over[@]}" --expr "
    let
      flake = builtins.getFlake \"path:$flake\";
      fake = builtins.getFlake \"path:$fake\";
      prev = fake.legacyPackages.x86_64-linux;
      final = prev // flake.overlays.default final prev // { buildPackages = final; };
    in {
      names = builtins.attrNames (builtins.intersectAttrs { streamLayeredImage = 1; buildLayeredImage = 1; fakeNss = 1; } final.dockerTools);
      drv = (final.dockerTools.streamLayeredImage { name = \"overlay\"; contents = [ final.busybox ]; }).drvPath;
    }
  " >"$work/overlay.json" 2>>"$work/flake.log" || fail "overlay: $(tail -3 "$work/flake.log")"
  python3 - "$work/overlay.json" <<'EOF2'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["names"] == ["buildLayeredImage", "fakeNss", "streamLayeredImage"], d
assert d["drv"].endswith("-stream-overlay.drv"), d
EOF2
}
t flake test_flake
