# buildImage and buildImageWithNixDb: one new layer over the base image's layers, made without
# a VM (`runAsRoot` runs in user and mount namespaces, inside an ordinary build).
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
    toJSON
    ;
  inherit (lib)
    checkArgs
    commandTools
    configJson
    defaultArchitecture
    failWith
    functionArgs
    imageFile
    makeOverridable
    mkResult
    need
    outputName
    pushScript
    setFunctionArgs
    stevedoreDrv
    tagOr
    toLower
    ;
in
rec {
  # nixpkgs' buildImage: a derivation that is the image (a Docker archive unless `format`
  # says otherwise). Its passthru: buildArgs (the arguments), layer (the new layer's
  # derivation), imageTag, copyToRegistry; overrideAttrs changes the image's derivation (see
  # lib.nix's mkResult), `.override` the arguments.
  buildImage = makeOverridable (
    {
      # The image's name (a repository: "registry.example/team/app"); lowercased in the image.
      name,
      # The image's tag; null: the hash part of the output path, as nixpkgs does.
      tag ? null,
      # The base image: a Docker archive (plain or compressed; docker save, dockerTools), or
      # (ours) a stream executable from streamLayeredImage. null: FROM scratch.
      fromImage ? null,
      # Which image of a fromImage archive that has several. Ours: the image they pick gives
      # its layers too (nixpkgs takes the first image's layers whatever the name).
      fromImageName ? null,
      # Needs fromImageName (nixpkgs ignores a tag without a name).
      fromImageTag ? null,
      # Paths (or one) whose trees are copied to the image's root, as `rsync -a` (`-k`).
      copyToRoot ? null,
      # Deprecated alias of copyToRoot (a warning says so).
      contents ? null,
      # true: keep symlinks to directories of copyToRoot as symlinks (`rsync -K`).
      keepContentsDirlinks ? false,
      # The container config (Docker Image Spec v1.3: Cmd, Env, ...); store paths it names
      # are in the layer.
      config ? null,
      # GOARCH of the image; defaults to the host platform's (pkgs.go.GOARCH for unknown ones).
      architecture ? defaultArchitecture,
      # The CPU variant ("v7" for arm, ...) in the image's config; null: none.
      variant ? null,
      # Shell code run as root over the base image plus copyToRoot, as `stdenv.shell` with
      # `set -e` and coreutils on PATH. Ours: in namespaces with the store read-only, /proc, a
      # minimal /dev and a read-only /sys, not in a VM; no KVM needed.
      runAsRoot ? null,
      # The VM's sizes in nixpkgs; accepted and unused (no VM here).
      diskSize ? 1024,
      buildVMMemorySize ? 512,
      # Shell code run in the new layer's directory after runAsRoot, not as root: with
      # `runtimeShell -e` and the usual tools on PATH.
      extraCommands ? "",
      # Owner of the new layer's files (integers, or strings of digits).
      uid ? 0,
      gid ? 0,
      # The image's creation date: ISO-8601, or "now" (not reproducible).
      created ? "1970-01-01T00:00:01Z",
      # The archive's compression (enums.json): "gz", "none" or "zstd". For OCI outputs,
      # each layer's.
      compressor ? "gz",
      # The Nix database (/nix/var/nix/db) of copyToRoot's closure, with GC roots.
      includeNixDB ? false,
      # Our extension (enums.json): "docker-archive" (docker-image-NAME.tar[.gz|.zst]), "oci"
      # (an OCI image layout directory, -oci) or "oci-archive" (that layout as a tar, -oci.tar).
      format ? "docker-archive",
      # The result's meta.
      meta ? { },
    }@args:
    let
      fn = "buildImage";
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
          runAsRoot
          keepContentsDirlinks
          fromImageName
          fromImageTag
          diskSize
          buildVMMemorySize
          ;
      };

      baseName = baseNameOf name;
      rootContents = if copyToRoot == null then contents else copyToRoot;
      rootList =
        if rootContents == null then
          [ ]
        else if isList rootContents then
          rootContents
        else
          [ rootContents ];
      deprecation =
        if contents != null then
          builtins.trace "warning: dockerTools.buildImage: image ${toJSON name}: the contents parameter is deprecated; use copyToRoot (with buildEnv if you want packages linked into /bin)"
        else
          (x: x);

      toolDirs = map (n: "${pkgs.${n}}/bin") commandTools;
      hasRunAsRoot = runAsRoot != null;
      baseImage = if fromImage == null then null else "${imageFile fromImage}";

      baseJson = configJson "${baseName}-config.json" config architecture variant;

      # The image's one new layer (nixpkgs' mkPureLayer / mkRootLayer).
      layer = stevedoreDrv "image-layer" (
        {
          name = "docker-layer-${baseName}";
          copyToRoot = map (c: "${c}") rootList;
          baseJson = "${baseJson}";
          storeDir = builtins.storeDir;
          inherit
            keepContentsDirlinks
            extraCommands
            uid
            gid
            includeNixDB
            ;
        }
        // (
          if extraCommands != "" then
            {
              shell = need fail "runtimeShell" "extraCommands";
              path = concatStringsSep ":" toolDirs;
            }
          else
            { }
        )
        // (
          if hasRunAsRoot then
            {
              inherit runAsRoot fromImageName fromImageTag;
              fromImage = baseImage;
              # nixpkgs' shellScript: stdenv's shell, with coreutils and /bin on PATH.
              runAsRootShell = pkgs.stdenv.shell or (need fail "runtimeShell" "runAsRoot");
              runAsRootPath = "${need fail "coreutils" "runAsRoot"}/bin:/bin";
            }
          else
            { }
        )
        // (
          if includeNixDB then
            {
              exportReferencesGraph.dbClosure = rootList;
              dbRoots = map (c: "${c}") rootList;
            }
          else
            { }
        )
      );

      result = mkResult { make = stevedoreDrv "image"; inherit fail; } (final: {
        name = outputName fn name "docker-image-${baseName}" format compressor;
        layer = "${layer}";
        # What the layer refers to (copyToRoot, the config's store paths) goes in with it.
        exportReferencesGraph.closure = [ layer ];
        baseJson = "${baseJson}";
        fromImage = baseImage;
        imageName = toLower name;
        storeDir = builtins.storeDir;
        inherit
          fromImageName
          fromImageTag
          created
          compressor
          format
          tag
          meta
          ;
        passthru = rec {
          buildArgs = args;
          inherit layer;
          imageTag = tagOr final.tag final.finalPackage;
          copyToRegistry = pushScript (need fail "runtimeShell" "copyToRegistry") baseName "${final.finalPackage}" "${final.imageName}:${imageTag}" null;
        };
      });
    in
    assert checked;
    deprecation result
  );

  # buildImage with includeNixDB = true.
  buildImageWithNixDb = setFunctionArgs (args: buildImage (args // { includeNixDB = true; })) (
    removeAttrs (functionArgs buildImage) [ "includeNixDB" ]
  );
}
