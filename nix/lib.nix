# The internals the dockerTools functions share (not nixpkgs' lib, which stevedore does not
# use): the derivation helpers, every argument check, output names, and the steps several
# functions make (the image config, the push script, a stream's archive).
#
#   lib = import ./lib.nix { inherit pkgs stevedore; };
{
  pkgs ? { },
  stevedore,
}:
let
  inherit (builtins)
    all
    attrNames
    baseNameOf
    concatStringsSep
    elem
    filter
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isString
    mapAttrs
    substring
    toJSON
    ;

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # A uid or gid: a non-negative integer, or a string of digits (nixpkgs' Python runs int()).
  isId = v: (isInt v && v >= 0) || (isString v && builtins.match "[0-9]+" v != null);

  hasPrefix = prefix: s: substring 0 (builtins.stringLength prefix) s == prefix;

  # check ARG OK MESSAGE: one argument check (see argumentChecks).
  check = arg: ok: message: { inherit arg ok message; };
in
rec {
  inherit pkgs;

  # The enumerations the binary shares (compressors, output formats, GOARCH names).
  enums = builtins.fromJSON (builtins.readFile ./enums.json);

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

  toLower = builtins.replaceStrings upper lower;

  # lib.setFunctionArgs: `f` as a functor that nixpkgs' lib.functionArgs (and so callPackage)
  # reads as taking `args` (what builtins.functionArgs gives for a lambda: name -> has default).
  setFunctionArgs = f: args: {
    __functor = _: f;
    __functionArgs = args;
  };

  # lib.functionArgs: a functor's declared arguments, else the lambda's.
  functionArgs = f: f.__functionArgs or (builtins.functionArgs f);

  # Like lib.makeOverridable: the function keeps `f`'s arguments (functionArgs), and its result
  # gets `.override` (re-applies `f` to changed arguments); what its overrideAttrs and
  # overrideDerivation return keeps `.override`.
  makeOverridable =
    f:
    let
      mirror = g: setFunctionArgs g (functionArgs f);
    in
    mirror (
      args:
      let
        result = f args;
        # `g` applied to the result of `f`, with `.override` still re-applying `f` first.
        overrideResult = g: makeOverridable (mirror (a: g (f a))) args;
      in
      result
      // {
        override =
          changes: makeOverridable f (args // (if isFunction changes then changes args else changes));
        overrideAttrs = g: overrideResult (r: r.overrideAttrs g);
        overrideDerivation = g: overrideResult (r: r.overrideDerivation g);
      }
    );

  # A result as mkDerivation makes one: the derivation `make ATTRS` with passthru and meta on it,
  # and overrideAttrs / overrideDerivation that make it again from changed attributes.
  #
  #   mkResult { make; fail; open ? false; extra ? { }; } (final: ATTRS // { passthru; meta; })
  #
  # The function gets `final`, the attributes after every override plus `finalPackage` (the
  # result), so passthru that depends on them (an untagged image's tag) follows overrides.
  # overrideAttrs takes `old: { ... }`, `final: old: { ... }` or a set. It may change the
  # attributes the derivation has and add those Nix itself reads (enums.json's nixAttributes);
  # another name is an error (`fail MESSAGE`) unless `open` (a builder that is not ours and
  # ignores what it does not read). `extra`: attributes of the result, not of the derivation.
  mkResult =
    spec: rattrs:
    extensible spec (attrNames (
      removeAttrs (rattrs (throw "mkResult: only names")) [
        "passthru"
        "meta"
      ]
    )) rattrs;

  extensible =
    spec: known: rattrs:
    let
      final = rattrs final // {
        finalPackage = result;
      };
      attrs = removeAttrs final [
        "passthru"
        "meta"
        "finalPackage"
      ];
      unknown = filter (n: !(elem n known || elem n enums.nixAttributes)) (attrNames attrs);
      drv =
        if spec.open or false || unknown == [ ] then
          spec.make attrs
        else
          spec.fail "overrideAttrs: ${head unknown} is not an attribute of this derivation (its builder, stevedore, takes ${concatStringsSep ", " known}; Nix's own, such as requiredSystemFeatures, may be added; other values belong in passthru)";
      passthru = final.passthru or { };
      result =
        drv
        // passthru
        // spec.extra or { }
        // {
          inherit passthru;
          meta = final.meta or { };
          overrideAttrs =
            f:
            extensible spec known (
              self:
              let
                prev = rattrs self;
                # As mkDerivation's: `old: changes`, `final: old: changes`, or the changes.
                changes =
                  if isFunction f then
                    (
                      let
                        r = f prev;
                      in
                      if isFunction r then f self prev else r
                    )
                  else
                    f;
              in
              prev // changes
            );
          # lib.overrideDerivation: `f` gets the result and gives attributes for the derivation.
          overrideDerivation = f: result.overrideAttrs (_: f result);
        };
    in
    result;

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

  # A derivation that is only symlinks: { "rel/path" = target; }.
  symlinkTree =
    name: links:
    stevedoreDrv "symlinks" (
      local
      // {
        inherit name links;
      }
    );

  # name: text: a store file holding text (writeText).
  writeText = name: text: stevedoreDrv "text" (local // { inherit name text; });

  # name: { "rel/path" = { text; executable; } or { directory = true; }; }: a store tree.
  writeFiles = name: files: stevedoreDrv "files" (local // { inherit name files; });

  # --- Errors and argument checks --------------------------------------------------------

  # The error of function `fn` (streamLayeredImage, ...) about the image called `name`.
  failWith = fn: name: msg: throw "dockerTools.${fn}: image ${toJSON name}: ${msg}";

  # pkgs.ATTR, or an error saying that WHY needs it.
  need =
    fail: attr: why:
    pkgs.${attr} or (fail "${why} needs pkgs.${attr}");

  # Every check of a function's arguments, in the order they run (the first that fails is the
  # error; a check may read other arguments, `a`). A function runs those of the arguments it
  # passes to checkArgs. The compressor and format are checked by outputName.
  argumentChecks = fn: [
    (check "name" (a: isString a.name && a.name != "") "name must be a non-empty string")
    (check "tag" (
      a: a.tag == null || isString a.tag && a.tag != ""
    ) "tag must be null or a non-empty string")
    (check "architecture" (a: isString a.architecture) "architecture must be a string")
    (check "variant" (
      a: a.variant == null || isString a.variant && a.variant != ""
    ) "variant must be null or a non-empty string")
    (check "created" (a: isString a.created) "created must be a string (ISO-8601 or \"now\")")
    (check "uid" (a: isId a.uid) "uid must be a non-negative integer")
    (check "gid" (a: isId a.gid) "gid must be a non-negative integer")
    (check "extraCommands" (a: isString a.extraCommands) "extraCommands must be a string")
    (check "includeNixDB" (a: isBool a.includeNixDB) "includeNixDB must be a boolean")
    # buildImage's config defaults to null, streamLayeredImage's to { }; both take either.
    (check "config" (a: isAttrs a.config || a.config == null) (
      if fn == "buildImage" then
        "config must be null or an attribute set"
      else
        "config must be an attribute set"
    ))
    (check "mtime" (a: isString a.mtime) "mtime must be a string (ISO-8601 or \"now\")")
    (check "uname" (a: isString a.uname) "uname must be a string")
    (check "gname" (a: isString a.gname) "gname must be a string")
    (check "maxLayers" (a: isInt a.maxLayers) "maxLayers must be an integer")
    # nixpkgs ignores maxLayers when a layeringPipeline is given.
    (check "maxLayers" (a: a.layeringPipeline != null || a.maxLayers > 1) (
      a: "maxLayers must be greater than 1 (got ${toString a.maxLayers})"
    ))
    (check "fakeRootCommands" (a: isString a.fakeRootCommands) "fakeRootCommands must be a string")
    (check "enableFakechroot" (a: isBool a.enableFakechroot) "enableFakechroot must be a boolean")
    (check "includeStorePaths" (
      a: isBool a.includeStorePaths
    ) "includeStorePaths must be a boolean")
    (check "layeringPipeline" (
      a:
      a.layeringPipeline == null
      || isList a.layeringPipeline
      || isString a.layeringPipeline
      || builtins.isPath a.layeringPipeline
      || isAttrs a.layeringPipeline
    ) "layeringPipeline must be null, a list, or a JSON file")
    (check "runAsRoot" (
      a: a.runAsRoot == null || isString a.runAsRoot
    ) "runAsRoot must be null or a string (a shell script)")
    (check "keepContentsDirlinks" (
      a: isBool a.keepContentsDirlinks
    ) "keepContentsDirlinks must be a boolean")
    (check "fromImageName" (
      a: a.fromImageName == null || isString a.fromImageName
    ) "fromImageName must be null or a string")
    (check "fromImageTag" (
      a: a.fromImageTag == null || isString a.fromImageTag
    ) "fromImageTag must be null or a string")
    (check "fromImageTag" (
      a: a.fromImageTag == null || a.fromImageName != null
    ) "fromImageTag needs fromImageName")
    (check "diskSize" (a: isInt a.diskSize) "diskSize must be an integer")
    (check "buildVMMemorySize" (
      a: isInt a.buildVMMemorySize
    ) "buildVMMemorySize must be an integer")
  ];

  # checkArgs FN ARGS: true if the arguments in ARGS (a set that has `name`) pass their checks,
  # else the first failure's error.
  checkArgs =
    fn: a:
    all (
      c:
      !(a ? ${c.arg})
      || c.ok a
      || failWith fn a.name (if isFunction c.message then c.message a else c.message)
    ) (argumentChecks fn);

  # File extension of each compressor (enums.json): { gz = ".gz"; none = ""; zstd = ".zst"; }.
  compressorExt = mapAttrs (_: c: c.extension) enums.compressors;

  checkCompressor =
    fn: name: compressor:
    if isString compressor && (enums.compressors.${compressor}.layersOnly or false) then
      failWith fn name "compressor ${compressor} compresses the layers of OCI images: use it with format = \"oci\" or \"oci-archive\" (a Docker archive is compressed whole; use \"zstd\")"
    else if isString compressor && compressorExt ? ${compressor} then
      compressorExt.${compressor}
    else
      failWith fn name "compressor must be one of ${concatStringsSep ", " (attrNames compressorExt)} (got ${toJSON compressor})";

  # The output's name for an image called `baseName` (checks `format` and `compressor`): a
  # Docker archive is compressed whole, so it has the compressor's extension; OCI outputs
  # compress their layers one by one. `format` is our extension (enums.json).
  outputName =
    fn: name: baseName: format: compressor:
    if isString format && enums.formats ? ${format} then
      baseName
      + enums.formats.${format}.suffix
      + (if format == "docker-archive" then checkCompressor fn name compressor else "")
    else
      failWith fn name "format must be one of ${concatStringsSep ", " (attrNames enums.formats)} (got ${toJSON format})";

  # --- Steps several functions share -----------------------------------------------------

  # The image's config as nixpkgs writes it with writeText: its references are the closure of
  # `config`, so the store paths the config names end up in the image. `variant` (null: none)
  # goes next to the architecture.
  configJson =
    name: config: architecture: variant:
    stevedoreDrv "text" (
      local
      // {
        inherit name;
        text = toJSON (
          {
            inherit config architecture;
            os = "linux";
          }
          // (if variant == null then { } else { inherit variant; })
        );
      }
    );

  # The tag, or as nixpkgs tags an untagged image: the hash part of a derivation's output.
  tagOr =
    tag: drv:
    if tag != null then tag else substring 0 32 (baseNameOf (builtins.unsafeDiscardStringContext drv.outPath));

  # `nix run .#image.copyToRegistry [-- docker://REGISTRY/REPO:TAG]`: pushes `source` (a conf
  # or an archive) straight to a registry, to `imageRef` unless told otherwise.
  # `.override { sbom = true; }` ("cyclonedx", or "spdx") also attaches the image's SBOM (from
  # `sboms`: { cyclonedx, spdx, provenance } derivations, or null where the function has none)
  # as an OCI 1.1 artifact; `attach = [ documents ]` attaches others; `sign = KEY` signs the
  # image and `provenance = true` attests its provenance with that key; `compressor = "zstd"`
  # (or "zstd:chunked", "none") compresses the layers so instead of gzip.
  pushScript =
    shell: baseName: source: imageRef: sboms:
    makeOverridable (
      {
        sbom ? false,
        attach ? [ ],
        sign ? null,
        provenance ? false,
        compressor ? null,
      }:
      let
        fail = failWith "copyToRegistry" baseName;
        # The key is named, never copied: a Nix path value or a string with store context
        # would put it in the world-readable store.
        key =
          if sign == null then
            null
          else if builtins.isPath sign then
            fail "sign must be a string (\"/path/to/cosign.key\" or \"env://VAR\"), not a Nix path: that would copy the key into the store"
          else if !(isString sign) then
            fail "sign must be a string (\"/path/to/cosign.key\" or \"env://VAR\"), got ${builtins.typeOf sign}"
          else if builtins.hasContext sign || hasPrefix builtins.storeDir sign then
            fail "sign must name a key outside the Nix store (everyone can read the store)"
          else if !(hasPrefix "/" sign || hasPrefix "env://" sign) then
            fail "sign must be an absolute path or env://VAR (got \"${sign}\")"
          else
            sign;
        format =
          if sbom == true then
            "cyclonedx"
          else if sbom == false || sbom == null then
            null
          else if isString sbom && elem sbom [ "cyclonedx" "spdx" ] then
            sbom
          else
            fail "sbom must be true, false, \"cyclonedx\" or \"spdx\" (got ${toJSON sbom})";
        document =
          if format == null then
            [ ]
          else if sboms == null then
            fail "this image has no SBOM to attach (sbom = ${toJSON sbom})"
          else
            [ "${sboms.${format}}" ];
        predicate =
          if provenance == false || provenance == null then
            null
          else if provenance != true then
            fail "provenance must be true or false (got ${toJSON provenance})"
          else if key == null then
            fail "provenance = true needs sign: the attestation is signed with that key"
          else if sboms == null || !(sboms ? provenance) then
            fail "this image has no provenance to attest"
          else
            "${sboms.provenance}";
      in
      assert isList attach || fail "attach must be a list of documents (got ${builtins.typeOf attach})";
      assert
        compressor == null
        || (isString compressor && enums.compressors ? ${compressor})
        || fail "compressor must be one of ${concatStringsSep ", " (attrNames enums.compressors)} (got ${toJSON compressor})";
      stevedoreDrv "push-script" (
        local
        // {
          name = "copy-${baseName}-to-registry";
          inherit shell imageRef;
          stevedore = stevedoreBin;
          conf = source;
          attach = document ++ map toString attach;
          sign = key;
          provenance = predicate;
          inherit compressor;
        }
      )
    ) { };

  # `nix run .#image.copyToPodman` (copyToDockerDaemon, copyToContainerd): loads the image of
  # `conf` into that runtime, sending only the layers it lacks (`stevedore load`).
  loadScript =
    shell: baseName: conf: runtime:
    stevedoreDrv "load-script" (
      local
      // {
        name = "copy-${baseName}-to-${runtime}";
        inherit shell conf runtime;
        stevedore = stevedoreBin;
      }
    );

  # What evaluation knows of a package the user passed (its meta), for the SBOM: license as a
  # list of { spdxId, fullName }, the first homepage, the description. Anything that is not
  # an attribute set (a path, a string) has none; a meta that fails to evaluate counts as none.
  packageMeta =
    p:
    let
      tried = builtins.tryEval (
        let
          m = if isAttrs p then p.meta or { } else { };
          lic = m.license or null;
          lics = if lic == null then [ ] else if isList lic then lic else [ lic ];
          norm =
            l:
            if isAttrs l then
              {
                spdxId = l.spdxId or null;
                fullName = l.fullName or null;
              }
            else
              {
                spdxId = null;
                fullName = toString l;
              };
          home = m.homepage or null;
        in
        builtins.deepSeq (map norm lics) {
          path = "${p}";
          license = map norm lics;
          homepage = if isString home then home else if isList home && home != [ ] then head home else null;
          description = if isString (m.description or null) then m.description else null;
        }
      );
    in
    if tried.success then tried.value else { path = "${p}"; };

  # passthru.sbom (format "cyclonedx") and passthru.spdx: the bill of materials of the image
  # `conf` describes, made in the sandbox from the graph of its closure.
  sbomOf =
    baseName: conf: packages: format:
    stevedoreDrv "sbom" (
      local
      // {
        name = "${baseName}-sbom.${if format == "spdx" then "spdx" else "cdx"}.json";
        inherit conf;
        exportReferencesGraph.closure = [ conf ];
        packages = map packageMeta packages;
        sbomFormat = format;
      }
    );

  # passthru.provenance: the SLSA provenance v1 predicate of the image `conf` (a derivation)
  # describes, naming that derivation (by path only: the predicate does not depend on it) and
  # every store path in the image with its NAR hash, made in the sandbox from the closure graph.
  provenanceOf =
    baseName: conf:
    stevedoreDrv "sbom" (
      local
      // {
        name = "${baseName}-provenance.json";
        conf = "${conf}";
        exportReferencesGraph.closure = [ conf ];
        sbomFormat = "slsa-provenance";
        derivation = builtins.unsafeDiscardStringContext conf.drvPath;
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
}
