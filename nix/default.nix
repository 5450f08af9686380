# stevedore's dockerTools: nixpkgs' `pkgs.dockerTools` API (same argument names, defaults and
# meaning) with the heavy steps done by the stevedore binary.
#
#   import ./nix { inherit pkgs; stevedore = <the stevedore package>; }
#
# The core path (streamLayeredImage / buildLayeredImage without commands) uses builtins only:
# each step is a derivation whose builder is stevedore itself, reading structured attrs, so it
# needs neither nixpkgs' lib nor stdenv. `pkgs` supplies what only some features need
# (runtimeShell, coreutils, fakeroot, proot, and the packages behind the helpers), looked up
# lazily. Functions stevedore does not implement come from `fallback` (nixpkgs' own dockerTools).
{
  pkgs ? { },
  stevedore,
  fallback ? (pkgs.dockerTools or { }),
}:
let
  inherit (builtins)
    all
    attrNames
    baseNameOf
    concatStringsSep
    filter
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isString
    map
    removeAttrs
    substring
    toJSON
    ;

  stevedoreBin = "${stevedore}/bin/stevedore";

  platform = import ./platform.nix { inherit stevedore pkgs; };
  inherit (platform) buildSystem hostSystem;
  defaultArchitecture = platform.defaultArchitecture (
    throw "dockerTools: no default architecture for ${hostSystem}; pass `architecture`"
  );

  # A derivation built by `stevedore nix ACTION` from its structured attrs.
  stevedoreDrv =
    action: attrs:
    builtins.derivation (
      {
        system = buildSystem;
        builder = stevedoreBin;
        args = [
          "nix"
          action
        ];
        __structuredAttrs = true;
      }
      // attrs
    );

  # Small steps: not worth a binary cache round trip.
  local = {
    preferLocalBuild = true;
    allowSubstitutes = false;
  };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # Like lib.makeOverridable: `.override` re-applies the function to changed arguments.
  makeOverridable =
    f: args:
    f args
    // {
      override =
        changes: makeOverridable f (args // (if isFunction changes then changes args else changes));
    };

  # Attaches passthru attributes and meta to a derivation, as mkDerivation does.
  withPassthru =
    drv: passthru: extra:
    drv // passthru // extra // { inherit passthru; };

  # Tools on PATH for extraCommands / fakeRootCommands: stdenv's usual ones, those pkgs has.
  commandTools = filter (n: pkgs ? ${n}) [
    "coreutils"
    "findutils"
    "diffutils"
    "gnused"
    "gnugrep"
    "gawk"
    "gnutar"
    "gzip"
    "bzip2"
    "xz"
    "getopt"
  ];

  compressorExt = {
    none = "";
    gz = ".gz";
    zstd = ".zst";
  };

  checkCompressor =
    fn: name: compressor:
    if isString compressor && compressorExt ? ${compressor} then
      compressorExt.${compressor}
    else
      throw "dockerTools.${fn}: image ${toJSON name}: compressor must be one of ${concatStringsSep ", " (attrNames compressorExt)} (got ${toJSON compressor})";

  # Our extension: `format` picks a Docker archive (compressed whole, as nixpkgs writes
  # them), an OCI image layout directory or an oci-archive (layers compressed one by one).
  formats = [
    "docker-archive"
    "oci"
    "oci-archive"
  ];
  # The output's name for an image called `baseName`.
  outputName =
    fn: name: baseName: format: compressor:
    let
      ext = checkCompressor fn name compressor;
    in
    if format == "docker-archive" then
      "${baseName}.tar${ext}"
    else if format == "oci" then
      "${baseName}-oci"
    else if format == "oci-archive" then
      "${baseName}-oci.tar"
    else
      throw "dockerTools.${fn}: image ${toJSON name}: format must be one of ${concatStringsSep ", " formats} (got ${toJSON format})";

  # The image's config as nixpkgs writes it with writeText: its references are the closure of
  # `config`, so the store paths the config names end up in the image.
  configJson =
    name: config: architecture:
    stevedoreDrv "text" (
      local
      // {
        inherit name;
        text = toJSON {
          inherit config architecture;
          os = "linux";
        };
      }
    );

  # Argument checks streamLayeredImage and buildImage share; `fail` names the function and image.
  commonChecks =
    fail:
    {
      name,
      tag,
      architecture,
      created,
      uid,
      gid,
      extraCommands,
      includeNixDB,
    }:
    let
      isId = v: (isInt v && v >= 0) || (isString v && builtins.match "[0-9]+" v != null);
    in
    [
      (isString name && name != "" || fail "name must be a non-empty string")
      (tag == null || isString tag && tag != "" || fail "tag must be null or a non-empty string")
      (isString architecture || fail "architecture must be a string")
      (isString created || fail "created must be a string (ISO-8601 or \"now\")")
      (isId uid || fail "uid must be a non-negative integer")
      (isId gid || fail "gid must be a non-negative integer")
      (isString extraCommands || fail "extraCommands must be a string")
      (isBool includeNixDB || fail "includeNixDB must be a boolean")
    ];

  # The tag, or as nixpkgs tags an untagged image: the hash part of a derivation's output.
  tagOr =
    tag: drv:
    if tag != null then tag else substring 0 32 (baseNameOf (builtins.unsafeDiscardStringContext drv.outPath));

  # `nix run .#image.copyToRegistry [-- docker://REGISTRY/REPO:TAG]`: pushes `source` (a conf
  # or an archive) straight to a registry, to `imageRef` unless told otherwise.
  pushScript =
    shell: baseName: source: imageRef:
    stevedoreDrv "push-script" (
      local
      // {
        name = "copy-${baseName}-to-registry";
        inherit shell imageRef;
        stevedore = stevedoreBin;
        conf = source;
      }
    );

  # Functions that take an image take a stream too (passthru.isExe): its archive is written
  # first, uncompressed.
  imageFile =
    img:
    if isAttrs img && (img.isExe or false) && img ? conf then
      stevedoreDrv "archive" (
        local
        // {
          name = "${baseNameOf (img.imageName or "image")}-base.tar";
          conf = "${img.conf}";
          compressor = "none";
        }
      )
    else
      img;

  streamLayeredImage = makeOverridable (
    {
      name,
      tag ? null,
      fromImage ? null,
      contents ? [ ],
      config ? { },
      architecture ? defaultArchitecture,
      created ? "1970-01-01T00:00:01Z",
      mtime ? "1970-01-01T00:00:01Z",
      uid ? 0,
      gid ? 0,
      uname ? "root",
      gname ? "root",
      maxLayers ? 100,
      extraCommands ? "",
      fakeRootCommands ? "",
      enableFakechroot ? false,
      includeStorePaths ? true,
      includeNixDB ? false,
      layeringPipeline ? null,
      debug ? false,
      meta ? { },
      passthru ? { },
    }:
    let
      fail = msg: throw "dockerTools.streamLayeredImage: image ${toJSON name}: ${msg}";
      checks = commonChecks fail {
        inherit name tag architecture created uid gid extraCommands includeNixDB;
      } ++ [
        (isAttrs config || config == null || fail "config must be an attribute set")
        (isString mtime || fail "mtime must be a string (ISO-8601 or \"now\")")
        (isString uname || fail "uname must be a string")
        (isString gname || fail "gname must be a string")
        (isInt maxLayers || fail "maxLayers must be an integer")
        (
          layeringPipeline != null || maxLayers > 1
          || fail "maxLayers must be greater than 1 (got ${toString maxLayers})"
        )
        (isString fakeRootCommands || fail "fakeRootCommands must be a string")
        (isBool enableFakechroot || fail "enableFakechroot must be a boolean")
        (isBool includeStorePaths || fail "includeStorePaths must be a boolean")
        (
          layeringPipeline == null || isList layeringPipeline || isString layeringPipeline
          || builtins.isPath layeringPipeline || isAttrs layeringPipeline
          || fail "layeringPipeline must be null, a list, or a JSON file"
        )
      ];

      baseName = baseNameOf name;
      contentsList = if isList contents then contents else [ contents ];

      runCommands = extraCommands != "" || fakeRootCommands != "" || enableFakechroot;
      useFakeroot = fakeRootCommands != "" || enableFakechroot;
      need = attr: why: pkgs.${attr} or (fail "${why} needs pkgs.${attr}");
      shell = need "runtimeShell" "the stream executable";
      fakeroot = need "fakeroot" "fakeRootCommands";
      proot = need "proot" "enableFakechroot";
      toolDirs =
        map (n: "${pkgs.${n}}/bin") commandTools
        ++ (if useFakeroot then [ "${fakeroot}/bin" ] else [ ])
        ++ (if enableFakechroot then [ "${proot}/bin" ] else [ ]);

      baseJson = configJson "${baseName}-base.json" config architecture;

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
              shell = need "runtimeShell" "extraCommands / fakeRootCommands";
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

      stream = stevedoreDrv "stream-script" (
        local
        // {
          name = "stream-${baseName}";
          inherit shell;
          stevedore = stevedoreBin;
          conf = "${conf}";
        }
      );

      copyToRegistry = pushScript shell baseName "${conf}" "${toLower name}:${imageTag}";

      allPassthru = passthru // {
        inherit imageTag conf copyToRegistry;
        # Lets functions that take images tell executables from archives.
        isExe = true;
      };
    in
    assert all (c: c) checks;
    withPassthru stream allPassthru {
      imageName = toLower name;
      inherit meta;
    }
  );

  buildLayeredImage = makeOverridable (
    {
      name,
      compressor ? "gz",
      format ? "docker-archive",
      meta ? { },
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
      archive = stevedoreDrv "archive" {
        name = outputName "buildLayeredImage" name (baseNameOf name) format compressor;
        conf = "${stream.conf}";
        inherit compressor format;
        inherit (stream) imageName;
      };
      # Not an executable: the archive itself.
      allPassthru = removeAttrs stream.passthru [ "isExe" ] // {
        inherit (stream) imageTag;
        inherit stream;
      };
    in
    withPassthru archive allPassthru {
      inherit (stream) imageName;
      inherit meta;
    }
  );

  buildImage = makeOverridable (
    {
      name,
      tag ? null,
      fromImage ? null,
      fromImageName ? null,
      fromImageTag ? null,
      copyToRoot ? null,
      # Deprecated alias of copyToRoot.
      contents ? null,
      keepContentsDirlinks ? false,
      config ? null,
      architecture ? defaultArchitecture,
      runAsRoot ? null,
      # The VM's sizes in nixpkgs; no VM here.
      diskSize ? 1024,
      buildVMMemorySize ? 512,
      extraCommands ? "",
      uid ? 0,
      gid ? 0,
      created ? "1970-01-01T00:00:01Z",
      compressor ? "gz",
      includeNixDB ? false,
      format ? "docker-archive",
      meta ? { },
    }@args:
    let
      fail = msg: throw "dockerTools.buildImage: image ${toJSON name}: ${msg}";
      checks = commonChecks fail {
        inherit name tag architecture created uid gid extraCommands includeNixDB;
      } ++ [
        (config == null || isAttrs config || fail "config must be null or an attribute set")
        (runAsRoot == null || isString runAsRoot || fail "runAsRoot must be null or a string (a shell script)")
        (isBool keepContentsDirlinks || fail "keepContentsDirlinks must be a boolean")
        (fromImageName == null || isString fromImageName || fail "fromImageName must be null or a string")
        (fromImageTag == null || isString fromImageTag || fail "fromImageTag must be null or a string")
        (
          fromImageTag == null || fromImageName != null
          || fail "fromImageTag needs fromImageName"
        )
        (isInt diskSize || fail "diskSize must be an integer")
        (isInt buildVMMemorySize || fail "buildVMMemorySize must be an integer")
      ];

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

      need = attr: why: pkgs.${attr} or (fail "${why} needs pkgs.${attr}");
      toolDirs = map (n: "${pkgs.${n}}/bin") commandTools;
      hasRunAsRoot = runAsRoot != null;
      baseImage = if fromImage == null then null else "${imageFile fromImage}";

      baseJson = configJson "${baseName}-config.json" config architecture;

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
              shell = need "runtimeShell" "extraCommands";
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
              runAsRootShell = pkgs.stdenv.shell or (need "runtimeShell" "runAsRoot");
              runAsRootPath = "${need "coreutils" "runAsRoot"}/bin:/bin";
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

      result = stevedoreDrv "image" {
        name = outputName "buildImage" name "docker-image-${baseName}" format compressor;
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
          ;
      };

      imageTag = tagOr tag result;

      copyToRegistry = pushScript (need "runtimeShell" "copyToRegistry") baseName "${result}" "${toLower name}:${imageTag}";
    in
    assert all (c: c) checks;
    deprecation (
      withPassthru result
        {
          buildArgs = args;
          inherit layer imageTag copyToRegistry;
        }
        {
          imageName = toLower name;
          inherit meta;
        }
    )
  );

  # An image's flattened file system as one tar (nixpkgs runs a VM for this).
  exportImage =
    {
      fromImage,
      fromImageName ? null,
      fromImageTag ? null,
      name ? fromImage.name,
      diskSize ? 1024,
    }:
    stevedoreDrv "export" {
      inherit name fromImageName fromImageTag;
      fromImage = "${imageFile fromImage}";
    };

  # A derivation that is only symlinks: { "rel/path" = target; }.
  symlinkTree =
    name: links:
    stevedoreDrv "symlinks" (
      local
      // {
        inherit name links;
      }
    );

  caBundle = "${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt";

  # streamNixShellImage / buildNixShellImage (nix-shell-image.nix).
  nixShellImage = import ./nix-shell-image.nix {
    inherit pkgs streamLayeredImage buildLayeredImage;
    inherit (ours) binSh usrBinEnv;
    writeText = name: text: stevedoreDrv "text" (local // { inherit name text; });
    writeFiles = name: files: stevedoreDrv "files" (local // { inherit name files; });
  };

  ours = {
    inherit
      streamLayeredImage
      buildLayeredImage
      buildImage
      exportImage
      ;

    buildImageWithNixDb = args: buildImage (args // { includeNixDB = true; });

    pullImage = import ./pull-image.nix { inherit stevedore pkgs; };

    buildLayeredImageWithNixDb = args: buildLayeredImage (args // { includeNixDB = true; });

    # /etc/passwd, /etc/group and /etc/nsswitch.conf with root and nobody (nixpkgs' fakeNss).
    fakeNss = pkgs.fakeNss or (throw "dockerTools.fakeNss needs pkgs.fakeNss");

    # /usr/bin/env, for `#!/usr/bin/env` scripts.
    usrBinEnv = symlinkTree "usr-bin-env" { "usr/bin/env" = "${pkgs.coreutils}/bin/env"; };

    # /bin/sh: an interactive bash, so that `docker run -it IMAGE` is usable.
    binSh = symlinkTree "bin-sh" { "bin/sh" = "${pkgs.bashInteractive or pkgs.bash}/bin/bash"; };

    # The CA bundle where the common distributions look for it.
    caCertificates = symlinkTree "ca-certificates" {
      "etc/ssl/certs/ca-bundle.crt" = caBundle;
      "etc/ssl/certs/ca-certificates.crt" = caBundle;
      "etc/pki/tls/certs/ca-bundle.crt" = caBundle;
    };

    # Shell code for a root script (nixpkgs' buildImage runAsRoot): puts shadow's tools on PATH
    # and creates the account files useradd/groupadd need, unless they exist already.
    shadowSetup = ''
      export PATH=${pkgs.shadow}/bin:$PATH
      mkdir -p /etc/pam.d
      if [[ ! -f /etc/passwd ]]; then
        echo "root:x:0:0::/root:${pkgs.runtimeShell}" > /etc/passwd
        echo "root:!x:::::::" > /etc/shadow
      fi
      if [[ ! -f /etc/group ]]; then
        echo "root:x:0:" > /etc/group
        echo "root:x::" > /etc/gshadow
      fi
      if [[ ! -f /etc/pam.d/other ]]; then
        {
          echo "account sufficient pam_unix.so"
          echo "auth sufficient pam_rootok.so"
          echo "password requisite pam_unix.so nullok yescrypt"
          echo "session required pam_unix.so"
        } > /etc/pam.d/other
      fi
      if [[ ! -f /etc/login.defs ]]; then
        touch /etc/login.defs
      fi
    '';

    # One Docker archive holding all the images (archives, plain or compressed, or stream
    # executables), for one `docker load`.
    mergeImages =
      images:
      if isList images then
        stevedoreDrv "merge" {
          name = "merge-docker-images";
          images = map (i: "${i}") images;
        }
      else
        throw "dockerTools.mergeImages: expects a list of images";

    inherit (nixShellImage) streamNixShellImage buildNixShellImage;
  };
in
fallback // ours
