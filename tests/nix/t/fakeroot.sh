# The binary under fakeroot, as the library's fakeRootCommands run it.
# Sourced by tests/nix/run.sh; the helpers are tests/nix/lib.sh's.

# fakeroot-lstat: a chown and a mknod under fakeroot show in the layer `stevedore nix pack` makes.
# As an unprivileged user: fakeroot fakes what our (dynamically linked) packer sees through lstat.
test_fakeroot_lstat() {
  local d=$work/fakeroot
  mkdir -p "$d"
  chmod 777 "$d"
  setpriv --reuid=65534 --regid=65534 --clear-groups env -i PATH=/usr/bin:/bin \
    fakeroot -- sh -c "mkdir $d/r && mkdir $d/r/x && echo hi > $d/r/x/f && chown 7:8 $d/r/x/f && mknod $d/r/null c 1 3 && $stevedore_path/bin/stevedore nix pack --owners fs $d/r $d/o"
  python3 - "$d/o/layer.tar" <<'EOF'
import sys, tarfile
m = {e.name: e for e in tarfile.open(sys.argv[1])}
assert m["./x/f"].uid == 7 and m["./x/f"].gid == 8, (m["./x/f"].uid, m["./x/f"].gid)
assert m["./x"].uid == 0 and m["."].uid == 0
assert m["./null"].ischr() and (m["./null"].devmajor, m["./null"].devminor) == (1, 3)
EOF
}
t fakeroot-lstat test_fakeroot_lstat
