# streamNixShellImage / buildNixShellImage: an image whose shell has the environment
# `nix-shell` would give for a derivation (nixpkgs' arguments and meaning), built with our
# streamLayeredImage / buildLayeredImage. Builtins only, like the rest of nix/.
#
# What the container gets, following what Nix does for a build and nix-shell on top of it:
# - Env: the derivation's attributes as Nix passes them to its builder (`args` is not one;
#   lists joined by spaces; `passAsFile` ones as `<name>Path` files), each output's name set to
#   its store path, the build directory variables (NIX_BUILD_TOP, TMPDIR, ... = /build), HOME,
#   NIX_STORE, NIX_BUILD_CORES=1, TERM, SSL_CERT_FILE (when pkgs has cacert), and PATH with the
#   shell's directory and `buildDerivation`, which runs the derivation's builder with its args.
# - A build user `nixbld` (uid:gid, home homeDirectory) in /etc/passwd and /etc/group; /build
#   owned by it; /nix/store writable by anyone (sticky), so `buildDerivation` can create the
#   outputs; Cmd runs as uid:gid in /build.
# - Cmd starts `shell` with an rc file that sources $stdenv/setup when there is one, runs the
#   shellHook, and then `command` (interactive shell, `--rcfile`) or `run` (the rc file run as
#   a script) and exits; with neither, the shell stays interactive (`docker run -it`).
{
  pkgs,
  streamLayeredImage,
  buildLayeredImage,
  # name: text: a store file holding text.
  writeText,
  # name: { "rel/path" = { text; executable; } or { directory = true; }; }: a store tree.
  writeFiles,
  # lib.nix's: a functor with declared arguments, and a function's arguments.
  setFunctionArgs,
  functionArgs,
  binSh,
  usrBinEnv,
}:
let
  inherit (builtins)
    attrNames
    concatStringsSep
    elem
    filter
    isAttrs
    isList
    isPath
    isString
    listToAttrs
    map
    removeAttrs
    replaceStrings
    toJSON
    ;

  storeDir = builtins.storeDir;
  # Nix's build directory inside its sandbox: what builds see as their working directory.
  buildDir = "/build";

  quote = s: "'" + replaceStrings [ "'" ] [ "'\\''" ] s + "'";

  # A derivation attribute as Nix turns it into a string for the builder: paths are copied to
  # the store, lists joined with spaces, true is "1", false and null are "".
  stringValue =
    v:
    if isPath v then
      "${v}"
    else if isList v then
      concatStringsSep " " (map stringValue v)
    else
      toString v;

  # streamNixShellImage's arguments (nixpkgs' names and defaults), turned into streamLayeredImage's.
  imageArgs =
    {
      # The derivation whose build environment the image gives (not one with
      # __structuredAttrs).
      drv,
      # The image's name and tag (tag null: the hash part of the conf's output path).
      name ? drv.name + "-env",
      tag ? null,
      # The build user `nixbld`: who owns /build and runs Cmd, and its home.
      uid ? 1000,
      gid ? 1000,
      homeDirectory ? "/build",
      # The shell Cmd starts (a bash), which also runs buildDerivation (nixpkgs runs that
      # with runtimeShell, which need not be in the image).
      shell ? "${pkgs.bashInteractive or pkgs.bash or (throw "dockerTools.streamNixShellImage: the default shell needs pkgs.bashInteractive; pass `shell`")}/bin/bash",
      # Shell code run in the interactive shell after the shellHook (nix-shell --command).
      command ? null,
      # Shell code run after the shellHook, then the shell exits (nix-shell --run); not with
      # command.
      run ? null,
    }:
    let
      fail = msg: throw "dockerTools.streamNixShellImage: ${msg}";
      attrs =
        if isAttrs drv && drv ? drvAttrs then drv.drvAttrs else fail "drv must be a derivation";
      checks = [
        (!(attrs.__structuredAttrs or false)
          || fail "derivation ${toJSON drv.name} uses __structuredAttrs, which a nix-shell image cannot reproduce")
        (command == null || run == null || fail "give `command` or `run`, not both")
        (command == null || isString command || fail "command must be a string")
        (run == null || isString run || fail "run must be a string")
      ];

      ids = "${toString uid}:${toString gid}";
      passAsFile = attrs.passAsFile or [ ];
      ignoreNulls = attrs.__ignoreNulls or false;
      envNames = filter (
        n: n != "args" && n != "__ignoreNulls" && !(ignoreNulls && attrs.${n} == null)
      ) (attrNames attrs);

      # The derivation's environment, as Nix would give it to the builder.
      drvEnv =
        listToAttrs (
          map (
            n:
            if elem n passAsFile then
              {
                name = "${n}Path";
                value = "${writeText "pass-as-text-${n}" (stringValue attrs.${n})}";
              }
            else
              {
                name = n;
                value = stringValue attrs.${n};
              }
          ) envNames
        )
        // listToAttrs (
          map (o: {
            name = o;
            value = builtins.unsafeDiscardStringContext drv.${o}.outPath;
          }) (drv.outputs or [ "out" ])
        );

      buildDerivation = writeFiles "build-derivation" {
        "bin/buildDerivation" = {
          # The image's shell runs it: it is there and works in the container by definition.
          text = ''
            #!${shell}
            exec ${concatStringsSep " " (map (a: quote (stringValue a)) ([ attrs.builder ] ++ attrs.args or [ ]))}
          '';
          executable = true;
        };
      };
      staticPath = "${dirOf shell}:${buildDerivation}/bin";

      # What nix-shell runs before handing the shell over (nix-build.cc), in a file.
      rcfile = writeText "nix-shell-rc" (
        ''
          unset PATH
          dontAddDisableDepTrack=1
          if [ -e "$stdenv/setup" ]; then . "$stdenv/setup"; fi
          PATH=${staticPath}''${PATH:+:$PATH}
          SHELL=${quote shell}
          BASH=${quote shell}
          set +e
          if [ -n "$PS1" ] && [ -z "$NIX_SHELL_PRESERVE_PROMPT" ]; then
            PS1='\n\[\033[1;32m\][nix-shell:\w]\$\[\033[0m\] '
          fi
          if [ "$(type -t runHook 2>/dev/null)" = function ]; then runHook shellHook; fi
          unset NIX_ENFORCE_PURITY
          shopt -u nullglob 2>/dev/null
          shopt -s execfail 2>/dev/null
        ''
        + (
          if command != null then
            "${command}\nexit\n"
          else if run != null then
            "${run}\nexit\n"
          else
            ""
        )
      );

      # Later sets win: the derivation's attributes override the defaults, the build
      # directory variables override both, as in Nix.
      env =
        (if pkgs ? cacert then { SSL_CERT_FILE = "${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"; } else { })
        // {
          PATH = staticPath;
          HOME = homeDirectory;
          NIX_STORE = storeDir;
          NIX_BUILD_CORES = "1";
        }
        // drvEnv
        // {
          NIX_BUILD_TOP = buildDir;
          TMPDIR = buildDir;
          TEMPDIR = buildDir;
          TMP = buildDir;
          TEMP = buildDir;
          PWD = buildDir;
          TERM = "xterm-256color";
        };

      # fakeNss's files plus the build user, whose home is homeDirectory (Nix itself uses the
      # build directory there).
      nss = writeFiles "fake-nss" {
        "etc/passwd".text = ''
          root:x:0:0:root user:/var/empty:/bin/sh
          nobody:x:65534:65534:nobody:/var/empty:/bin/sh
          nixbld:x:${ids}:Build user:${homeDirectory}:/noshell
        '';
        "etc/group".text = ''
          root:x:0:
          nobody:x:65534:
          nixbld:!:${toString gid}:
        '';
        "etc/nsswitch.conf".text = ''
          hosts: files dns
        '';
        "var/empty".directory = true;
      };
    in
    assert builtins.all (c: c) checks;
    {
      inherit name tag;
      contents = [
        binSh
        usrBinEnv
        nss
      ];
      fakeRootCommands = ''
        mkdir -p .${storeDir} .${buildDir}
        chmod a+w+t .${storeDir}
        chown -R ${ids} .${buildDir}
      '';
      config = {
        User = ids;
        Cmd = if run == null then [ shell "--rcfile" rcfile ] else [ shell rcfile ];
        WorkingDir = buildDir;
        Env = map (n: "${n}=${env.${n}}") (attrNames env);
      };
    };
in
{
  # nixpkgs' streamNixShellImage: a stream executable (streamLayeredImage); arguments: imageArgs.
  streamNixShellImage = setFunctionArgs (args: streamLayeredImage (imageArgs args)) (
    functionArgs imageArgs
  );

  # nixpkgs' buildNixShellImage: that image stored (buildLayeredImage).
  buildNixShellImage = setFunctionArgs (
    {
      drv,
      # The archive's compression: "gz", "none" or "zstd".
      compressor ? "gz",
      # Every other argument is streamNixShellImage's.
      ...
    }@args:
    buildLayeredImage (imageArgs (removeAttrs args [ "compressor" ]) // { inherit compressor; })
  ) (functionArgs imageArgs // { compressor = true; });
}
