#!/usr/bin/env python3
"""Test oracle: the tar of a store layer as CPython's tarfile writes it.

    layer.py OWNER_JSON PATH... > layer.tar

OWNER_JSON is {"uid", "gid", "uname", "gname", "mtime"}. The rules (from the stevedore issue that
specifies store layers): `/nix` and `/nix/store` directories (0755) first, then each store path
and everything below it in `pathlib.Path` order, absolute names, hard links written as regular
files, ownership and mtime from OWNER_JSON, PAX format in stream mode.
"""
import json
import pathlib
import sys
import tarfile


def member(tar, path):
    info = tar.gettarinfo(str(path))
    info.name = "/" + info.name
    if info.islnk():
        info.type = tarfile.REGTYPE
        info.linkname = ""
        info.size = path.stat().st_size
    return info


def main():
    owner = json.loads(sys.argv[1])

    def own(info):
        info.uid, info.gid = owner["uid"], owner["gid"]
        info.uname, info.gname = owner["uname"], owner["gname"]
        info.mtime = owner["mtime"]
        return info

    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for top in ("/nix", "/nix/store"):
            info = tarfile.TarInfo(top)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(own(info))
        for arg in sys.argv[2:]:
            root = pathlib.Path(arg)
            tree = [root] if root.is_symlink() else [root, *root.rglob("*")]
            for path in sorted(tree):
                info = own(member(tar, path))
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


if __name__ == "__main__":
    main()
