# streamLayeredImage, buildLayeredImage and buildLayeredImageWithNixDb: a layered image, one
# layer per store path of the closure (as many as maxLayers allows) plus a customisation layer
# with `contents` joined at the root. The stream is an executable that writes the image; the
# build functions store it.
#
# Core path: with no commands it uses builtins only, each step a derivation whose builder is
# stevedore (`pkgs` supplies runtimeShell for the stream executable, fakeroot, proot and the
# command tools, when asked for).
{
  pkgs,
  # nix/lib.nix
  lib,
}:
let
  inherit (builtins)
    baseNameOf
    concatStringsSep
    isList
    map
    removeAttrs
    ;
  inherit (lib)
    checkArgs
    commandTools
    configJson
    defaultArchitecture
    failWith
    functionArgs
    imageFile
    loadScript
    local
    makeOverridable
    mkResult
    need
    outputName
    provenanceOf
    pushScript
    sbomOf
    setFunctionArgs
    stevedoreBin
    stevedoreDrv
    tagOr
    toLower
    ;
in
rec {
  # nixpkgs' streamLayeredImage: a derivation that is an executable writing a Docker archive
  # (`./result | docker load`; `./result --help` lists `stevedore stream`'s options). Its
  # passthru: imageTag, conf (what the executable reads), copyToRegistry, copyToPodman,
  # copyToDockerDaemon, copyToContainerd, sbom (CycloneDX 1.6), spdx (SPDX 2.3), provenance
  # (SLSA provenance v1), isExe = true.
  streamLayeredImage = makeOverridable (
    {
      # The image's name (a repository: "registry.example/team/app"); lowercased in the image.
      name,
      # The image's tag; null: the hash part of the conf's output path, as nixpkgs does.
      tag ? null,
      # A base image whose layers come first: a Docker archive (plain or compressed), or
      # (ours) a stream executable from streamLayeredImage. null: FROM scratch.
      fromImage ? null,
      # Paths (or one) joined at the image's root as symlinks (symlinkJoin), their closure
      # in the store layers.
      contents ? [ ],
      # The container config (Docker Image Spec v1.3: Cmd, Env, ...); store paths it names
      # are in the image.
      config ? { },
      # GOARCH of the image; defaults to the host platform's (pkgs.go.GOARCH for unknown ones).
      architecture ? defaultArchitecture,
      # The CPU variant ("v7" for arm, ...) in the image's config; null: none.
      variant ? null,
      # The image's creation date: ISO-8601, or "now" (not reproducible).
      created ? "1970-01-01T00:00:01Z",
      # File times in the layers: ISO-8601, or "now". nixpkgs dates the customisation layer's
      # files 1980-01-01 whatever this is; here they get mtime too.
      mtime ? "1970-01-01T00:00:01Z",
      # Owner of the store layers' files (integers, or strings of digits), and its names.
      uid ? 0,
      gid ? 0,
      uname ? "root",
      gname ? "root",
      # Most layers in the image, counting fromImage's; must be greater than 1. Ignored when
      # layeringPipeline is given (as in nixpkgs).
      maxLayers ? 100,
      # Shell code run in the customisation layer's tree (the contents as symlinks): with
      # `runtimeShell -e` and the usual tools on PATH, but no stdenv setup functions.
      extraCommands ? "",
      # Shell code run after extraCommands under fakeroot: files it chowns keep those owners.
      fakeRootCommands ? "",
      # Run fakeRootCommands under proot with the tree as `/` and the store bound.
      enableFakechroot ? false,
      # false: only the customisation layer, no store paths (for a bind-mounted store).
      includeStorePaths ? true,
      # The Nix database (/nix/var/nix/db) of the contents' closure, with GC roots.
      includeNixDB ? false,
      # How the closure is split into layers: nixpkgs' pipeline of steps (a list, or a JSON
      # file); null: `auto` limited by maxLayers, as current nixpkgs.
      layeringPipeline ? null,
      # Print the store layers (on the build's stderr).
      debug ? false,
      # The result's meta.
      meta ? { },
      # Attributes added to the result (and its passthru).
      passthru ? { },
    }:
    let
      fn = "streamLayeredImage";
      fail = failWith fn name;
      checked = checkArgs fn {
        inherit
          name
          tag
          architecture
          variant
          created
          uid
          gid
          extraCommands
          includeNixDB
          config
          mtime
          uname
          gname
          maxLayers
          layeringPipeline
          fakeRootCommands
          enableFakechroot
          includeStorePaths
          ;
      };

      baseName = baseNameOf name;
      contentsList = if isList contents then contents else [ contents ];

      runCommands = extraCommands != "" || fakeRootCommands != "" || enableFakechroot;
      useFakeroot = fakeRootCommands != "" || enableFakechroot;
      shell = need fail "runtimeShell" "the stream executable";
      fakeroot = need fail "fakeroot" "fakeRootCommands";
      proot = need fail "proot" "enableFakechroot";
      toolDirs =
        map (n: "${pkgs.${n}}/bin") commandTools
        ++ (if useFakeroot then [ "${fakeroot}/bin" ] else [ ])
        ++ (if enableFakechroot then [ "${proot}/bin" ] else [ ]);

      baseJson = configJson "${baseName}-base.json" config architecture variant;

      # contents joined into one tree (symlinkJoin), extraCommands run in it, then
      # fakeRootCommands under fakeroot, and the tree packed into layer.tar.
      customisationLayer = stevedoreDrv "customisation-layer" (
        {
          name = "${baseName}-customisation-layer";
          contents = map (c: "${c}") contentsList;
          inherit
            extraCommands
            fakeRootCommands
            enableFakechroot
            mtime
            ;
          storeDir = builtins.storeDir;
        }
        // (
          if runCommands then
            {
              shell = need fail "runtimeShell" "extraCommands / fakeRootCommands";
              path = concatStringsSep ":" toolDirs;
            }
          else
            { }
        )
        // (
          # The Nix database of the contents' closure, with them as GC roots (nixpkgs'
          # mkDbExtraCommand), written before extraCommands run.
          if includeNixDB then
            {
              includeNixDB = true;
              exportReferencesGraph.dbClosure = contentsList;
              dbRoots = map (c: "${c}") contentsList;
            }
          else
            { }
        )
        // (if useFakeroot then { fakeroot = "${fakeroot}/bin/fakeroot"; } else { })
        // (if enableFakechroot then { proot = "${proot}/bin/proot"; } else { })
      );

      conf = stevedoreDrv "conf" (
        local
        // {
          name = "${baseName}-conf.json";
          baseJson = "${baseJson}";
          customisationLayer = "${customisationLayer}";
          # The closure of the config and of the contents; both roots stay out of the layers.
          exportReferencesGraph.closure =
            if includeStorePaths then
              [
                baseJson
                customisationLayer
              ]
            else
              [ ];
          excludePaths = [
            "${baseJson}"
            "${customisationLayer}"
          ];
          fromImage = if fromImage == null then null else "${imageFile fromImage}";
          layeringPipeline =
            if layeringPipeline == null || isList layeringPipeline then
              layeringPipeline
            else
              "${layeringPipeline}";
          imageName = toLower name;
          storeDir = builtins.storeDir;
          inherit
            tag
            maxLayers
            created
            mtime
            uid
            gid
            uname
            gname
            debug
            ;
        }
      );

      imageTag = tagOr tag conf;

      copyToRegistry = pushScript shell baseName "${conf}" "${toLower name}:${imageTag}" {
        cyclonedx = sbom;
        inherit spdx provenance;
      };
      copyToPodman = loadScript shell baseName "${conf}" "podman";
      copyToDockerDaemon = loadScript shell baseName "${conf}" "docker";
      copyToContainerd = loadScript shell baseName "${conf}" "containerd";
      sbom = sbomOf baseName "${conf}" contentsList "cyclonedx";
      spdx = sbomOf baseName "${conf}" contentsList "spdx";
      provenance = provenanceOf baseName conf;
    in
    assert checked;
    mkResult
      {
        make = stevedoreDrv "stream-script";
        inherit fail;
        extra.imageName = toLower name;
      }
      (
        _:
        local
        // {
          name = "stream-${baseName}";
          inherit shell meta;
          stevedore = stevedoreBin;
          conf = "${conf}";
          passthru = passthru // {
            inherit
              imageTag
              conf
              copyToRegistry
              copyToPodman
              copyToDockerDaemon
              copyToContainerd
              sbom
              spdx
              provenance
              ;
            # Lets functions that take images tell executables from archives.
            isExe = true;
          };
        }
      )
  );

  # nixpkgs' buildLayeredImage: streamLayeredImage's image stored, a derivation that is the
  # archive. Its passthru: streamLayeredImage's without isExe, plus `stream`.
  buildLayeredImage = makeOverridable (
    setFunctionArgs
      (
        {
          # The image's name, as streamLayeredImage's; the output is named after it.
          name,
          # The archive's compression (enums.json): "gz", "none" or "zstd". For OCI outputs,
          # each layer's.
          compressor ? "gz",
          # Our extension (enums.json): "docker-archive" (name.tar[.gz|.zst]), "oci" (an OCI
          # image layout directory, name-oci) or "oci-archive" (that layout as a tar,
          # name-oci.tar).
          format ? "docker-archive",
          # The archive's meta.
          meta ? { },
          # Every other argument is streamLayeredImage's.
          ...
        }@args:
        let
          stream = streamLayeredImage (
            removeAttrs args [
              "compressor"
              "format"
              "meta"
            ]
          );
        in
        mkResult
          {
            make = stevedoreDrv "archive";
            fail = failWith "buildLayeredImage" name;
          }
          (_: {
            name = outputName "buildLayeredImage" name (baseNameOf name) format compressor;
            conf = "${stream.conf}";
            inherit compressor format meta;
            inherit (stream) imageName;
            # Not an executable: the archive itself.
            passthru = removeAttrs stream.passthru [ "isExe" ] // {
              inherit (stream) imageTag;
              inherit stream;
            };
          })
      )
      # Its own arguments and those it passes to streamLayeredImage, as functionArgs reports them.
      (
        functionArgs streamLayeredImage
        // {
          compressor = true;
          format = true;
          meta = true;
        }
      )
  );

  # buildLayeredImage with includeNixDB = true.
  buildLayeredImageWithNixDb = setFunctionArgs (
    args: buildLayeredImage (args // { includeNixDB = true; })
  ) (removeAttrs (functionArgs buildLayeredImage) [ "includeNixDB" ]);
}
