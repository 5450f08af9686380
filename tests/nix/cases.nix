# The images tests/nix/run.sh builds with the real nix-build and checks.
{
  # The stevedore package: a store path holding bin/stevedore (run.sh adds it to the store).
  stevedorePath,
  system ? "x86_64-linux",
}:
let
  pkgs = import ./pkgs.nix { inherit system; };
  stevedore = builtins.storePath stevedorePath;
  dockerTools = import ../../nix { inherit pkgs stevedore; };
  chrootTools = import ../../nix {
    pkgs = pkgs // {
      runtimeShell = "${pkgs.busybox}/bin/sh";
    };
    inherit stevedore;
  };
  inherit (pkgs) busybox hello chain;

  helloArgs = {
    name = "registry.example/team/hello";
    tag = "v1";
    contents = [ busybox ];
    config = {
      Cmd = [ "${hello}/bin/hello" ];
      Env = [ "FOO=bar" ];
      WorkingDir = "/";
    };
  };

  variantArgs = {
    name = "variant";
    tag = "latest";
    architecture = "arm";
    variant = "v7";
    compressor = "none";
  };

  base = dockerTools.buildLayeredImage {
    name = "base";
    tag = "latest";
    contents = [ busybox ];
    config.Env = [
      "BASE=1"
      "FOO=base"
    ];
  };
in
let
  cases = {
    inherit dockerTools;

    hello = dockerTools.streamLayeredImage helloArgs;
    helloGz = dockerTools.buildLayeredImage helloArgs;
    helloZstd = dockerTools.buildLayeredImage (helloArgs // { compressor = "zstd"; });
    helloNone = dockerTools.buildLayeredImage (helloArgs // { compressor = "none"; });
    # .override re-applies the function, as with nixpkgs' makeOverridable.
    helloOverridden = (dockerTools.streamLayeredImage helloArgs).override { tag = "v2"; };

    # An image whose contents carry meta, as nixpkgs packages do, for passthru.sbom.
    withMeta = dockerTools.buildLayeredImage {
      name = "with-meta";
      tag = "1";
      contents = [
        (busybox
          // {
            meta = {
              description = "Tiny versions of common UNIX utilities";
              homepage = [ "https://busybox.net" ];
              license = {
                spdxId = "GPL-2.0-only";
                fullName = "GNU General Public License v2.0 only";
              };
            };
          }
        )
        hello
      ];
    };

    withMetaPush = cases.withMeta.copyToRegistry.override {
      sbom = true;
      sign = "env://STEVEDORE_TEST_KEY";
      provenance = true;
    };

    owners = dockerTools.buildLayeredImage {
      name = "owners";
      tag = "latest";
      contents = [ busybox ];
      extraCommands = ''
        mkdir -p tmp
        chmod 1777 tmp
        echo extra > extra.txt
      '';
      fakeRootCommands = ''
        mkdir -p data
        echo secret > data/f
        chown 1234:5678 data
        chown 42:43 data/f
        chmod 4750 data/f
      '';
    };

    noStore = dockerTools.buildLayeredImage {
      name = "nostore";
      tag = "latest";
      contents = [ busybox ];
      config.Cmd = [ "${hello}/bin/hello" ];
      includeStorePaths = false;
    };

    chainAll = dockerTools.streamLayeredImage {
      name = "chain";
      tag = "all";
      contents = [ chain ];
    };
    chainMax4 = dockerTools.streamLayeredImage {
      name = "chain";
      tag = "max4";
      contents = [ chain ];
      maxLayers = 4;
    };
    chainPipeline = dockerTools.streamLayeredImage {
      name = "chain";
      tag = "pipeline";
      contents = [ chain ];
      layeringPipeline = [
        [ "popularity_contest" ]
        [
          "limit_layers"
          3
        ]
      ];
    };

    inherit base;
    app = dockerTools.streamLayeredImage {
      name = "app";
      tag = "latest";
      fromImage = base;
      config = {
        Cmd = [ "${hello}/bin/hello" ];
        Env = [ "FOO=bar" ];
      };
    };
    # base has at least 2 layers, so 2 leaves none for store paths.
    appTooManyLayers = dockerTools.streamLayeredImage {
      name = "app";
      fromImage = base;
      contents = [ hello ];
      maxLayers = 2;
    };

    createdNow = dockerTools.buildLayeredImage {
      name = "dates";
      tag = "now";
      contents = [ busybox ];
      created = "now";
      compressor = "none";
    };
    createdDefault = dockerTools.buildLayeredImage {
      name = "dates";
      tag = "default";
      contents = [ busybox ];
      compressor = "none";
    };
    mtime2000 = dockerTools.buildLayeredImage {
      name = "dates";
      tag = "mtime2000";
      contents = [ busybox ];
      created = "2024-05-01T12:00:00+02:00";
      mtime = "2000-01-01T00:00:00Z";
      compressor = "none";
    };

    untagged = dockerTools.streamLayeredImage {
      name = "Registry.Example/Untagged";
      contents = [ busybox ];
    };

    helpers = dockerTools.buildLayeredImage {
      name = "helpers";
      tag = "latest";
      contents = with dockerTools; [
        usrBinEnv
        binSh
        caCertificates
        fakeNss
      ];
      compressor = "none";
    };

    # Under proot the image's root is `/`, where only the store is bound: the shell must be
    # one that needs no host libraries, so this one uses the static busybox.
    chroot = chrootTools.buildLayeredImage {
      name = "chroot";
      tag = "latest";
      contents = [ busybox ];
      enableFakechroot = true;
      fakeRootCommands = ''
        test -x /bin/sh
        test -d ${builtins.storeDir}
        mkdir /made-in-chroot
        echo ok > /made-in-chroot/f
      '';
      compressor = "none";
    };

    # The core path needs nothing from pkgs: an archive with no commands builds with pkgs = { }
    # (the stream executable alone needs pkgs.runtimeShell).
    minimal = (import ../../nix { inherit stevedore; }).buildLayeredImage {
      name = "minimal";
      tag = "latest";
      contents = [ busybox ];
      config.Cmd = [ "${hello}/bin/hello" ];
      compressor = "none";
    };

    # buildImage: copyToRoot copied (not linked), the closure of the config and of the
    # contents added to the layer, owners from uid/gid.
    pureImage = dockerTools.buildImage {
      name = "pure";
      copyToRoot = [ busybox ];
      config.Cmd = [ "${hello}/bin/hello" ];
      uid = 1000;
      gid = 100;
      extraCommands = ''
        mkdir -p tmp
        chmod 1777 tmp
      '';
      compressor = "none";
    };
    emptyImage = dockerTools.buildImage {
      name = "empty";
      tag = "latest";
      compressor = "none";
    };
    dirlinksCopy = dockerTools.buildImage {
      name = "dirlinks";
      tag = "copy";
      copyToRoot = [
        pkgs.libLink
        pkgs.libFile
      ];
      compressor = "none";
    };
    dirlinksKeep = dockerTools.buildImage {
      name = "dirlinks";
      tag = "keep";
      copyToRoot = [
        pkgs.libLink
        pkgs.libFile
      ];
      keepContentsDirlinks = true;
      compressor = "none";
    };

    # nixpkgs' redis example, over a layered base image: a user and an owned /data made by a
    # root script, a file of the base deleted (a whiteout), extraCommands after it.
    rootBase = dockerTools.buildLayeredImage {
      name = "root-base";
      tag = "latest";
      contents = [ busybox ];
      extraCommands = ''
        mkdir -p etc keep
        echo doomed > etc/removed
        echo kept > keep/file
      '';
      config.Env = [
        "BASE=1"
        "FOO=base"
      ];
    };
    redisLike = dockerTools.buildImage {
      name = "redis-like";
      tag = "latest";
      fromImage = cases.rootBase;
      copyToRoot = [ hello ];
      runAsRoot = ''
        #!${pkgs.runtimeShell}
        ${dockerTools.shadowSetup}
        groupadd -r redis
        useradd -r -g redis redis
        mkdir -p /data
        chown redis:redis /data
        echo made-as-root > /data/made
        rm /etc/removed
      '';
      extraCommands = ''
        echo extra > extra.txt
      '';
      config = {
        Cmd = [ "/bin/hello" ];
        WorkingDir = "/data";
        Env = [ "FOO=bar" ];
        Volumes."/data" = { };
      };
    };
    redisRoot = dockerTools.exportImage {
      fromImage = cases.redisLike;
      name = "redis-like-root.tar";
    };
    # A stream as the base, picked by name and tag, and exported.
    streamBase = dockerTools.buildImage {
      name = "on-stream";
      tag = "latest";
      fromImage = cases.hello;
      fromImageName = "registry.example/team/hello";
      fromImageTag = "v1";
      runAsRoot = "touch /on-stream";
      compressor = "zstd";
    };

    # The Nix database: buildImage, buildLayeredImage and streamLayeredImage.
    nixDbImage = dockerTools.buildImageWithNixDb {
      name = "nixdb";
      tag = "image";
      copyToRoot = [ hello ];
      compressor = "none";
    };
    nixDbLayered = dockerTools.buildLayeredImageWithNixDb {
      name = "nixdb";
      tag = "layered";
      contents = [ hello ];
    };
    nixDbStream = dockerTools.streamLayeredImage {
      name = "nixdb";
      tag = "stream";
      contents = [ hello ];
      includeNixDB = true;
    };
    nixDbRoots = {
      image = dockerTools.exportImage { fromImage = cases.nixDbImage; };
      layered = dockerTools.exportImage { fromImage = cases.nixDbLayered; };
      stream = dockerTools.exportImage {
        fromImage = cases.nixDbStream;
        name = "nixdb-stream-root";
      };
    };

    # OCI output from the Nix functions.
    ociArchive = dockerTools.buildLayeredImage (
      helloArgs
      // {
        format = "oci-archive";
        compressor = "zstd";
      }
    );
    # zstd:chunked layers in an OCI layout, and pushed so by copyToRegistry.
    ociChunked = dockerTools.buildLayeredImage (
      helloArgs
      // {
        format = "oci";
        compressor = "zstd:chunked";
      }
    );
    chunkedPush = cases.hello.copyToRegistry.override { compressor = "zstd:chunked"; };
    ociLayout = dockerTools.buildImage {
      name = "oci-layout";
      tag = "latest";
      copyToRoot = [ busybox ];
      config.Cmd = [ "${hello}/bin/hello" ];
      format = "oci";
    };

    # OCI images as bases: the zstd oci-archive under streamLayeredImage, the gzip OCI layout
    # (a directory, no manifest.json) under buildImage.
    onOciArchive = dockerTools.streamLayeredImage {
      name = "on-oci-archive";
      tag = "latest";
      fromImage = cases.ociArchive;
      contents = [ busybox ];
      config.Cmd = [
        "${busybox}/bin/sh"
        "-c"
        "${hello}/bin/hello; echo $FOO"
      ];
    };
    onOciLayout = dockerTools.buildImage {
      name = "on-oci-layout";
      tag = "latest";
      fromImage = cases.ociLayout;
      config.Cmd = [ "${hello}/bin/hello" ];
    };

    # mergeImages: a gzipped archive, a stream executable and a zstd archive, all with busybox.
    merged = dockerTools.mergeImages [
      (dockerTools.buildLayeredImage helloArgs)
      (dockerTools.streamLayeredImage {
        name = "merge-two";
        tag = "latest";
        contents = [ busybox ];
        config.Cmd = [ "${busybox}/bin/sh" "-c" "echo two" ];
      })
      (dockerTools.buildLayeredImage {
        name = "merge-three";
        tag = "latest";
        contents = [ busybox ];
        config.Cmd = [ "${busybox}/bin/sh" "-c" "echo three" ];
        compressor = "zstd";
      })
    ];

    # buildImage over the third image of that archive, picked by name and tag.
    pickedFromMerged = dockerTools.buildImage {
      name = "picked";
      tag = "latest";
      fromImage = cases.merged;
      fromImageName = "merge-three";
      fromImageTag = "latest";
      runAsRoot = "touch /picked";
      config.Cmd = [ "${busybox}/bin/sh" "-c" "test -e /picked && echo picked three" ];
      compressor = "none";
    };

    # nix-shell images of pkgs.shellTarget, with a bash that runs in the container.
    shellRun = dockerTools.streamNixShellImage {
      drv = pkgs.shellTarget;
      tag = "run";
      shell = "${pkgs.hostBash}/bin/bash";
      run = ''
        echo "greeting=$GREETING flags=$flags enabled=$enabled out=$out dev=$dev"
        echo "user=$(id -u):$(id -g) $(busybox whoami) home=$HOME pwd=$PWD $(pwd) top=$NIX_BUILD_TOP tmp=$TMPDIR"
        echo "setup=$FROM_SETUP hooked=$HOOKED notes=$(cat "$notesPath") shell=$SHELL"
        touch /build/writable && echo build-writable
        buildDerivation && cat "$out/result" "$dev/notes"
      '';
    };
    shellCommand = dockerTools.buildNixShellImage {
      drv = pkgs.shellTarget;
      name = "shell-command";
      tag = "latest";
      uid = 4321;
      gid = 765;
      homeDirectory = "/home/me";
      shell = "${pkgs.hostBash}/bin/bash";
      command = ''echo "interactive=$- user=$(id -u):$(id -g) home=$HOME hooked=$HOOKED"'';
      compressor = "none";
    };
    shellInteractive = dockerTools.streamNixShellImage {
      drv = pkgs.shellTarget;
      shell = "${pkgs.hostBash}/bin/bash";
    };

    # nixpkgs' nixos/tests/docker-tools.nix, the assertions tests/nix/t/nixos-tests.sh ports
    # (without a VM: podman, skopeo and Python look at the images).
    nixos = import ./nixos-cases.nix {
      inherit
        pkgs
        dockerTools
        stevedore
        ;
      inherit (cases) emptyImage;
    };

    # The results' mkDerivation API and the variant argument (tests/nix/t/api.sh).
    api = {
      # nixpkgs' NixOS test: the image's derivation over itself (two identical layers).
      repeated = cases.emptyImage.overrideAttrs (_: {
        fromImage = cases.emptyImage;
      });
      # A new name and tag, meta and passthru kept, a Nix attribute added; then `.override`.
      renamed = cases.helloGz.overrideAttrs (old: {
        name = "renamed.tar";
        compressor = "none";
        requiredSystemFeatures = [ ];
        meta = old.meta // {
          description = "renamed";
        };
        passthru = old.passthru // {
          extra = "kept";
        };
      });
      renamedOverridden = cases.api.renamed.override { tag = "v3"; };
      # The untagged image's tag follows its derivation; final: old: as mkDerivation takes it.
      untaggedRenamed = cases.emptyUntagged.overrideAttrs (final: old: { name = "${old.name}-2"; });
      emptyUntagged = cases.emptyUntagged;
      streamMeta = (dockerTools.streamLayeredImage (helloArgs // { meta.description = "s"; })).overrideAttrs {
        name = "stream-renamed";
      };
      exported = cases.redisRoot.overrideDerivation (old: {
        name = "${old.name}-2";
      });
      merged = cases.merged.overrideAttrs { name = "merged-2"; };
      variantImage = dockerTools.buildImage variantArgs;
      variantLayered = dockerTools.buildLayeredImage (
        variantArgs
        // {
          name = "variant-layered";
          architecture = "arm64";
          variant = "v8";
        }
      );
    };
    # Evaluated, never built (a pull needs a registry).
    evalOnly.pulled = dockerTools.pullImage {
      imageName = "library/busybox";
      imageDigest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
      hash = "";
      arch = "arm";
      variant = "v7";
    };
    emptyUntagged = dockerTools.buildImage {
      name = "empty-untagged";
      compressor = "none";
    };

    # Each of these must fail with the message run.sh looks for.
    bad = {
      maxLayers1 = dockerTools.streamLayeredImage {
        name = "bad";
        maxLayers = 1;
      };
      compressor = dockerTools.buildLayeredImage {
        name = "bad";
        compressor = "xz";
      };
      runAsRootList = dockerTools.buildImage {
        name = "bad";
        runAsRoot = [ "true" ];
      };
      format = dockerTools.buildLayeredImage {
        name = "bad";
        format = "squashfs";
      };
      failingRunAsRoot = dockerTools.buildImage {
        name = "bad";
        copyToRoot = [ busybox ];
        runAsRoot = ''
          echo about to fail
          false
          echo not reached
        '';
      };
      missingBaseTag = dockerTools.buildImage {
        name = "bad";
        fromImage = base;
        fromImageName = "base";
        fromImageTag = "nope";
      };
      emptyName = dockerTools.streamLayeredImage { name = ""; };
      # Names and tags Docker would not read fail the build, not a later load or push.
      badName = dockerTools.streamLayeredImage {
        name = "team/../app";
        tag = "v1";
      };
      badTag = dockerTools.buildImage {
        name = "app";
        tag = "v1\nX";
      };
      created = dockerTools.streamLayeredImage {
        name = "bad";
        created = "yesterday";
      };
      notDir = dockerTools.streamLayeredImage {
        name = "bad";
        contents = [ "${hello}/bin/hello" ];
      };
      failingCommands = dockerTools.streamLayeredImage {
        name = "bad";
        extraCommands = "false";
      };
      noShell = (import ../../nix { inherit stevedore; }).streamLayeredImage { name = "bad"; };
      unknownArgument = dockerTools.streamLayeredImage {
        name = "bad";
        copyToRoot = [ ];
      };
      shellBoth = dockerTools.streamNixShellImage {
        drv = pkgs.shellTarget;
        command = "true";
        run = "true";
      };
      shellStructured = dockerTools.streamNixShellImage {
        drv = builtins.derivation {
          name = "structured";
          inherit system;
          builder = "/bin/sh";
          __structuredAttrs = true;
        };
      };
      mergeNotList = dockerTools.mergeImages pkgs.hello;
      mergeBroken = dockerTools.mergeImages [ pkgs.hello ];
      overrideUnknown = cases.emptyImage.overrideAttrs (_: {
        postInstall = "true";
      });
      variant = dockerTools.streamLayeredImage {
        name = "bad";
        variant = 7;
      };
    };
  };
in
cases
