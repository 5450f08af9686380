# The helpers nixpkgs' dockerTools has for image contents: fakeNss, usrBinEnv, binSh,
# caCertificates (derivations to put in `contents` / `copyToRoot`) and shadowSetup (shell code
# for runAsRoot). Each looks up the package it is made from in `pkgs` when used.
{
  pkgs,
  # nix/lib.nix
  lib,
}:
let
  inherit (lib) symlinkTree;

  caBundle = "${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt";
in
{
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
}
