# The images of nixpkgs' nixos/tests/docker-tools.nix (and the examples it loads) that
# tests/nix/t/nixos-tests.sh checks, made from tests/nix/pkgs.nix's stand-ins: cases.nix's
# `nixos`.
{
  pkgs,
  # nix/ over pkgs.
  dockerTools,
  stevedore,
  # cases.nix's buildImage of nothing (one layer of only the root directory), default date.
  emptyImage,
}:
let
  inherit (pkgs) busybox hello;

  # A buildImage over `parent` whose extraCommands write `files` (name = text) under /tmp.
  writesTmp =
    name: parent: files:
    dockerTools.buildImage {
      inherit name;
      tag = "latest";
      fromImage = parent;
      copyToRoot = if parent == null then [ busybox ] else [ ];
      extraCommands =
        "mkdir -p tmp\n"
        + builtins.concatStringsSep "" (
          map (f: "echo ${files.${f}} > tmp/${f}\n") (builtins.attrNames files)
        );
      compressor = "none";
    };

  # A buildImage over `parent` whose runAsRoot appends `letter` to /layer-order.
  appendsLetter =
    parent: letter:
    dockerTools.buildImage {
      name = "unpack-order-${letter}";
      tag = "latest";
      fromImage = parent;
      copyToRoot = [ busybox ];
      runAsRoot = ''echo -n "${letter}" >> /layer-order'';
      compressor = "none";
    };

  # The same (empty) layer twice: buildImage of nothing over a buildImage of nothing.
  emptyTwice = dockerTools.buildImage {
    name = "empty-twice";
    tag = "latest";
    fromImage = emptyImage;
    compressor = "none";
  };

  # nixpkgs' two-layered-image: two layers in all.
  twoLayers = dockerTools.buildLayeredImage {
    name = "two-layered-image";
    tag = "latest";
    contents = [
      pkgs.bashInteractive
      hello
    ];
    config.Cmd = [ "${hello}/bin/hello" ];
    maxLayers = 2;
  };

  # nixpkgs' layeredImageWithFakeRootCommands: a home owned by uid 1000, and a link to a
  # store path that only fakeRootCommands' output refers to.
  fakeRootRefs = dockerTools.buildLayeredImage {
    name = "layered-image-with-fake-root-commands";
    tag = "latest";
    contents = [ busybox ];
    fakeRootCommands = ''
      mkdir -p ./home/alice
      chown 1000 ./home/alice
      ln -s ${hello} ./hello
    '';
  };

  # An untagged buildImage (its tag is the hash of its output path, as nixpkgs'). Uncompressed:
  # `nix-build --check` without the sandbox builds at another path and rewrites its hash in
  # the output, which it cannot do inside gzip (tests/nix/t/sandbox.sh checks so).
  untaggedImage = dockerTools.buildImage {
    name = "bash-no-tag";
    copyToRoot = [ busybox ];
    compressor = "none";
  };

  # For enableFakechroot with a chown: a shell, coreutils and fakeroot's preload library that
  # work in proot's root, where only the store is (nixpkgs' all do).
  chrootTools = import ../../nix {
    pkgs = pkgs // {
      runtimeShell = "${pkgs.hostBash}/bin/bash";
      coreutils = pkgs.chrootCoreutils;
      fakeroot = pkgs.storeFakeroot;
    };
    inherit stevedore;
  };

  # nixpkgs' cross example: dockerTools of a package set whose host platform is aarch64.
  crossTools = import ../../nix {
    pkgs = import ./pkgs.nix {
      inherit (pkgs) system;
      hostSystem = "aarch64-linux";
    };
    inherit stevedore;
  };
in
{
  inherit
    emptyTwice
    twoLayers
    fakeRootRefs
    untaggedImage
    ;

  # nixpkgs' layersOrder: three chained images, each later one overwriting files of the
  # earlier ones.
  layersOrder =
    let
      l1 = writesTmp "l1" null {
        layer1 = "layer1";
        layer2 = "layer1";
        layer3 = "layer1";
      };
      l2 = writesTmp "l2" l1 {
        layer2 = "layer2";
        layer3 = "layer2";
      };
    in
    writesTmp "layers-order" l2 { layer3 = "layer3"; };

  # nixpkgs' layersUnpackOrder: each runAsRoot sees the layers below it, in order.
  layersUnpackOrder = appendsLetter (appendsLetter (appendsLetter null "a") "b") "c";

  # nixpkgs' repeatedLayerTestImage: a base archive whose manifest names one layer member
  # twice (as `docker save` may write; emptyTwice's two layers are the same bytes), under
  # runAsRoot, which unpacks the base.
  repeatedLayers = dockerTools.buildImage {
    name = "repeated-layer-test";
    tag = "latest";
    fromImage = emptyTwice;
    copyToRoot = [ busybox ];
    runAsRoot = "echo 'runAsRoot has run.' > /ran";
    compressor = "none";
  };

  # nixpkgs' layered-bulk-layer: over twoLayers, at most 4 layers in all.
  bulkOverBase = dockerTools.buildLayeredImage {
    name = "layered-bulk-layer";
    tag = "latest";
    fromImage = twoLayers;
    contents = [
      busybox
      hello
    ];
    maxLayers = 4;
    compressor = "none";
  };

  # nixpkgs' no-store-paths: busybox copied to the root. The script uses hello, the tree
  # refers to busybox only, so only busybox is in the store.
  minimalPaths = dockerTools.buildLayeredImage {
    name = "no-store-paths";
    tag = "latest";
    extraCommands = ''
      test -x ${hello}/bin/hello
      cp -r ${busybox}/* .
      echo ${busybox} > busybox-path
    '';
    compressor = "none";
  };

  # nixpkgs' build-image-with-architecture and layered-image-with-architecture, and the
  # cross example.
  archImage = dockerTools.buildImage {
    name = "build-image-with-architecture";
    tag = "latest";
    architecture = "arm64";
    copyToRoot = [ busybox ];
    compressor = "none";
  };
  archStream = dockerTools.streamLayeredImage {
    name = "layered-image-with-architecture";
    tag = "latest";
    architecture = "arm64";
    contents = [ busybox ];
  };
  cross = crossTools.buildImage {
    name = "hello-cross";
    tag = "latest";
    copyToRoot = hello;
    compressor = "none";
  };

  # nixpkgs' prefixedImage, with a registry port and a path.
  prefixed = dockerTools.buildImage {
    name = "localhost:5000/team/prefixed";
    tag = "latest";
    copyToRoot = [ busybox ];
    config.Cmd = [ "${hello}/bin/hello" ];
    compressor = "none";
  };

  # nixpkgs' mergedBashNoTagAndRedis and mergedBashFakeRoot in one.
  mergedUntaggedOwners = dockerTools.mergeImages [
    untaggedImage
    fakeRootRefs
  ];

  # nixpkgs' chownTestImage: chown under enableFakechroot.
  chrootChown = chrootTools.streamLayeredImage {
    name = "chown-test";
    tag = "latest";
    contents = [ busybox ];
    enableFakechroot = true;
    fakeRootCommands = ''
      touch /testfile
      chown 12345:12345 /testfile
    '';
    config.Cmd = [
      "${busybox}/bin/stat"
      "-c"
      "%u:%g"
      "/testfile"
    ];
  };

  # nixpkgs' helloOnRootNoStoreFakechroot: includeStorePaths = false under enableFakechroot.
  noStoreChroot = chrootTools.streamLayeredImage {
    name = "nostore-chroot";
    tag = "latest";
    contents = [ busybox ];
    config.Cmd = [ "${hello}/bin/hello" ];
    includeStorePaths = false;
    enableFakechroot = true;
  };

  # nixpkgs' build-image-with-path and layered-image-with-path: a directory of the test
  # sources, not a derivation.
  barePathImage = dockerTools.buildImage {
    name = "build-image-with-path";
    tag = "latest";
    copyToRoot = [
      busybox
      ./bare-path
    ];
    compressor = "none";
  };
  barePathStream = dockerTools.streamLayeredImage {
    name = "layered-image-with-path";
    tag = "latest";
    contents = [
      busybox
      ./bare-path
    ];
  };

  # nixpkgs' nix-shell-nonexistent-home: the build user's home is not made.
  shellNoHome = dockerTools.streamNixShellImage {
    name = "nix-shell-nonexistent-home";
    tag = "latest";
    drv = pkgs.shellTarget;
    shell = "${pkgs.hostBash}/bin/bash";
    homeDirectory = "/homeless-shelter";
    run = ''
      if [ -e "$HOME" ]; then echo "$HOME exists"; exit 1; fi
      echo "home=$HOME absent"
    '';
  };

  # nixpkgs' layeredStoreSymlink: a store path that is a symlink stays one.
  storeSymlink = dockerTools.streamLayeredImage {
    name = "layeredstoresymlink";
    tag = "latest";
    contents = [
      busybox
      pkgs.storeSymlink
    ];
  };

  # nixpkgs' nonRootTestImage: the store layers owned by uid:gid, with those names.
  nonRoot = dockerTools.streamLayeredImage {
    name = "non-root-test";
    tag = "latest";
    uid = 1000;
    gid = 1000;
    uname = "user";
    gname = "user";
    contents = [ busybox ];
    config = {
      User = "1000:1000";
      Cmd = [
        "${busybox}/bin/stat"
        "-c"
        "%u:%g"
        "${busybox}/bin/busybox"
      ];
    };
  };

  # buildImage's created = "now" (nixpkgs' unstableDate); emptyImage has the default.
  createdNow = dockerTools.buildImage {
    name = "unstable-date";
    tag = "latest";
    created = "now";
    compressor = "none";
  };

  # nixpkgs' runAsRootExtraCommands (issue 34779), with more quoting: the scripts run as
  # written, not re-evaluated.
  quoting = dockerTools.buildImage {
    name = "run-as-root-extra-commands";
    tag = "latest";
    copyToRoot = [ busybox ];
    runAsRoot = ''
      echo "(runAsRoot)" > runAsRoot
      x='a b'
      printf '%s|%s|%s\n' "$x" 'single $x \n' "it's \"double\" \$x \\ end" > /quoted-root
    '';
    extraCommands = ''
      echo "(extraCommand)" > extraCommands
      x='a b'
      printf '%s|%s|%s\n' "$x" 'single $x \n' "it's \"double\" \$x \\ end" > quoted-extra
    '';
    compressor = "none";
  };
}
