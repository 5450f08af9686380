# A tiny stand-in for nixpkgs, built from the host's tools (no nixpkgs can be fetched here):
# what nix/default.nix takes from `pkgs`, plus fixture packages for the images under test.
# Fixtures are builtins.derivation with /bin/sh and absolute host paths under /usr, so they
# build without the sandbox, or in it when it has /usr and the library directories
# (extra-sandbox-paths = /usr /lib /lib64; /bin/sh is Nix's own). Nothing else of the host is
# there: not /bin (on merged /usr, /usr/bin is the real one), nor /etc (alternatives).
{
  system ? "x86_64-linux",
  # The platform the packages are for (stdenv.hostPlatform), as a cross package set has it
  # (pkgsCross.aarch64-multiplatform: "aarch64-linux"). There is no cross compiler here: the
  # packages stay the build platform's binaries; only what reads the platform sees it.
  hostSystem ? system,
  # A prebuilt stevedore (a directory with bin/stevedore), for the flake test's
  # rustPlatform.buildRustPackage stand-in.
  stevedorePrebuilt ? null,
}:
let
  # The script ends in `exit 0`: a shell may run the last command in its own place (bash does,
  # and it is /bin/sh on some hosts), and coreutils close stdout before they exit, which Nix
  # may answer with SIGKILL. `-e` still fails the build at the first failing command.
  sh =
    name: script:
    builtins.derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-e"
        "-c"
        "${script}\nexit 0\n"
      ];
      PATH = "/usr/bin:/bin";
    };

  # The host's static busybox, copied into the store so images can run it.
  busybox = sh "busybox" ''
    mkdir -p $out/bin
    cp /usr/bin/busybox $out/bin/busybox
    for a in sh ash cat chmod chown echo env id ls mkdir rm sleep stat test touch true; do
      ln -s busybox $out/bin/$a
    done
  '';

  # Host coreutils, by absolute path: dynamically linked, so fakeroot's LD_PRELOAD works on them.
  coreutils = sh "coreutils" ''
    mkdir -p $out/bin
    for t in basename cat chgrp chmod chown cp dirname echo env false head id install ln ls \
             mkdir mknod mv readlink realpath rm rmdir sha256sum sort stat tail test touch true wc; do
      ln -s /usr/bin/$t $out/bin/$t
    done
  '';

  wrapper =
    name: target: env:
    sh name ''
      mkdir -p $out/bin
      printf '#!/bin/sh\n${env}PATH="$PATH:/usr/bin:/bin" exec ${target} "$@"\n' > $out/bin/${name}
      chmod +x $out/bin/${name}
    '';

  self = {
    inherit system busybox coreutils;
    stdenv.hostPlatform.system = hostSystem;
    stdenv.buildPlatform.system = system;
    # nixpkgs' stdenv.shell is bash; busybox's sh has the bash syntax shadowSetup uses.
    stdenv.shell = "${busybox}/bin/sh";
    # The host's dash: dynamically linked, and it looks commands up on PATH, so under fakeroot
    # `chown` & co. are the (faked) coreutils ones. busybox's sh would run its own static
    # applets instead, which fakeroot cannot see.
    dash = sh "dash" ''
      mkdir -p $out/bin
      cp /usr/bin/dash $out/bin/dash
    '';
    runtimeShell = "${self.dash}/bin/dash";
    # Not /usr/bin/fakeroot: it is a link through /etc/alternatives. In Nix's sandbox (a user
    # namespace with one uid) a real chown to another uid fails with EINVAL, which Debian's
    # fakeroot passes on (nixpkgs patches its fakeroot to ignore it, as it ignores EPERM);
    # FAKEROOTDONTTRYCHOWN has libfakeroot only record the owner, in and out of the sandbox.
    fakeroot = wrapper "fakeroot" "/usr/bin/fakeroot-sysv" "FAKEROOTDONTTRYCHOWN=1 ";
    proot = wrapper "proot" "/usr/bin/proot" "";

    # A program whose closure is more than itself: hello -> greeting -> busybox.
    greeting = sh "greeting" ''
      mkdir -p $out/share
      echo "hello from stevedore" > $out/share/greeting
      ln -s ${busybox} $out/share/shell
    '';
    hello = sh "hello" ''
      mkdir -p $out/bin
      printf '#!${busybox}/bin/sh\nread -r line < ${self.greeting}/share/greeting\necho "$line"\n' > $out/bin/hello
      chmod +x $out/bin/hello
    '';

    # chain-12 -> chain-11 -> ... -> chain-1: a closure of 12 paths, for maxLayers.
    chain =
      let
        link =
          n:
          sh "chain-${toString n}" (
            ''
              mkdir -p $out
              echo ${toString n} > $out/n
            ''
            + (if n > 1 then "echo ${link (n - 1)} > $out/prev\n" else "")
          );
      in
      link 12;

    # A store path that is itself a symlink (to a directory of the store).
    storeSymlink = sh "store-symlink" "ln -s ${self.greeting} $out";

    # For copyToRoot's symlinks to directories (rsync -k or -K): `lib -> lib64`, then a
    # tree with a lib/ directory.
    libLink = sh "lib-link" ''
      mkdir -p $out/lib64
      echo 64 > $out/lib64/a
      ln -s lib64 $out/lib
    '';
    libFile = sh "lib-file" ''
      mkdir -p $out/lib
      echo b > $out/lib/b
    '';

    # What the dockerTools helpers link to.
    # busybox's sh under bash's name (the static busybox has no `bash` applet).
    bashInteractive = sh "bash-interactive" ''
      mkdir -p $out/bin
      printf '#!${busybox}/bin/sh\nexec ${busybox}/bin/sh "$@"\n' > $out/bin/bash
      chmod +x $out/bin/bash
    '';
    cacert = sh "cacert" ''
      mkdir -p $out/etc/ssl/certs
      echo "not a real bundle" > $out/etc/ssl/certs/ca-bundle.crt
    '';
    fakeNss = sh "fake-nss" ''
      mkdir -p $out/etc
      printf 'root:x:0:0:root user:/var/empty:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/sh\n' > $out/etc/passwd
      printf 'root:x:0:\nnobody:x:65534:\n' > $out/etc/group
      printf 'hosts: files dns\n' > $out/etc/nsswitch.conf
    '';
    # shadow's useradd/groupadd for the options images use, as busybox scripts (they run in the
    # image's root, where the host's shadow and its libraries are not, and Debian's static
    # busybox has no adduser): they append to /etc/passwd, /etc/shadow, /etc/group.
    shadow = sh "shadow" ''
      mkdir -p $out/bin
      cat > $out/bin/groupadd <<'EOS'
      #!${busybox}/bin/sh
      set -e
      bb=${busybox}/bin/busybox
      gid=
      while [ $# -gt 1 ]; do
        case $1 in -g) gid=$2; shift ;; esac
        shift
      done
      [ -n "$gid" ] || gid=$($bb awk -F: 'BEGIN { g = 999 } { if ($3 >= g && $3 < 60000) g = $3 + 1 } END { print g }' /etc/group)
      echo "$1:x:$gid:" >> /etc/group
      echo "$1:!::" >> /etc/gshadow
      EOS
      cat > $out/bin/useradd <<'EOS'
      #!${busybox}/bin/sh
      set -e
      bb=${busybox}/bin/busybox
      uid= group= home=/var/empty shell=/bin/sh make=
      while [ $# -gt 1 ]; do
        case $1 in
          -u) uid=$2; shift ;; -g) group=$2; shift ;; -d) home=$2; shift ;;
          -s) shell=$2; shift ;; -m) make=1 ;;
        esac
        shift
      done
      [ -n "$uid" ] || uid=$($bb awk -F: 'BEGIN { u = 999 } { if ($3 >= u && $3 < 60000) u = $3 + 1 } END { print u }' /etc/passwd)
      gid=$uid
      [ -z "$group" ] || gid=$($bb awk -F: -v g="$group" '$1 == g || $3 == g { print $3 }' /etc/group)
      [ -n "$gid" ] || { echo "useradd: group $group does not exist" >&2; exit 6; }
      echo "$1:x:$uid:$gid::$home:$shell" >> /etc/passwd
      echo "$1:!:1::::::" >> /etc/shadow
      [ -z "$make" ] || { $bb mkdir -p "$home"; $bb chown "$uid:$gid" "$home"; }
      EOS
      chmod +x $out/bin/groupadd $out/bin/useradd
    '';

    # Enough of nixpkgs for flake.nix: callPackage, lib.licenses and a buildRustPackage that
    # hands back the prebuilt binary.
    buildPackages = self;
    callPackage =
      f: overrides:
      let
        fn = if builtins.isFunction f then f else import f;
      in
      fn (builtins.intersectAttrs (builtins.functionArgs fn) self // overrides);
    lib.licenses.mit = {
      spdxId = "MIT";
      free = true;
    };
    rustPlatform.buildRustPackage =
      args:
      if stevedorePrebuilt == null then
        throw "tests/nix/pkgs.nix: no stevedorePrebuilt to stand in for buildRustPackage"
      else
        sh "${args.pname}-${args.version}" ''
          mkdir -p $out/bin
          cp ${stevedorePrebuilt}/bin/stevedore $out/bin/stevedore
        ''
        // {
          inherit (args) pname version;
          meta = args.meta or { };
        };
    nixfmt-tree = wrapper "treefmt" "/usr/bin/false" "";

    # Host programs (of /usr/bin) with their libraries, each started through their loader by a
    # busybox script, so they run where there is nothing but the store: in a container, or in
    # proot's root under enableFakechroot.
    hostPrograms =
      name: programs:
      sh name ''
        mkdir -p $out/bin $out/lib $out/libexec
        for p in ${builtins.concatStringsSep " " programs}; do
          cp /usr/bin/$p $out/libexec/$p
          # ldd is a `#!/bin/bash` script.
          for l in $(/usr/bin/bash /usr/bin/ldd /usr/bin/$p | sed -nE 's|.*[ \t](/[^ ]+) \(0x.*|\1|p'); do cp -L "$l" $out/lib/; done
          printf '#!${busybox}/bin/sh\nexec %s/lib/ld-linux-x86-64.so.2 --library-path %s/lib %s/libexec/%s "$@"\n' $out $out $out $p > $out/bin/$p
          chmod +x $out/bin/$p
        done
      '';
    # The host's bash, for the nix-shell images.
    hostBash = self.hostPrograms "host-bash" [ "bash" ];
    # What fakeRootCommands need under proot's root: coreutils that run there, and a fakeroot
    # whose preload library is in the store, so the programs there load it.
    chrootCoreutils = self.hostPrograms "chroot-coreutils" [
      "chown"
      "mkdir"
      "stat"
      "touch"
    ];
    fakerootLib = sh "fakeroot-lib" ''
      mkdir -p $out/lib
      cp /usr/lib/x86_64-linux-gnu/libfakeroot/libfakeroot-sysv.so $out/lib/
    '';
    storeFakeroot =
      wrapper "fakeroot" "/usr/bin/fakeroot-sysv --lib ${self.fakerootLib}/lib/libfakeroot-sysv.so"
        "FAKEROOTDONTTRYCHOWN=1 ";

    # A derivation to open a nix-shell image on: two outputs, passAsFile, a stdenv-like setup
    # with runHook, and a shellHook. Its builder is the static busybox, so `buildDerivation`
    # works inside the image.
    shellTarget = builtins.derivation {
      name = "shell-target";
      inherit system;
      builder = "${busybox}/bin/sh";
      args = [
        "-e"
        "-c"
        ''
          mkdir -p $out $dev
          echo "built with GREETING=$GREETING in $PWD" > $out/result
          cat "$notesPath" > $dev/notes
        ''
      ];
      outputs = [
        "out"
        "dev"
      ];
      GREETING = "hi there";
      notes = "passed as a file";
      passAsFile = [ "notes" ];
      flags = [
        "-a"
        "-b"
      ];
      enabled = true;
      stdenv = sh "fake-stdenv" ''
        mkdir -p $out
        cat > $out/setup <<'EOF'
        runHook() { eval "eval \"\$$1\""; }
        export FROM_SETUP=1
        PATH=${busybox}/bin''${PATH:+:$PATH}
        EOF
      '';
      shellHook = "export HOOKED=yes";
    };
  };
in
self
