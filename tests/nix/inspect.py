#!/usr/bin/env python3
"""Summarizes a Docker image archive (plain or gzip) as JSON for the Nix tests (`summary` in
tests/nix/lib.sh).

Prints {"repo_tags", "config" (the image config), "layers": [{"member", "diff_id",
"entries": [[name, type, mode, uid, gid, mtime, linkname], ...]}]}.
"""
import hashlib
import json
import sys
import tarfile


def main(path):
    with tarfile.open(path, "r:*") as outer:
        members = {m.name: m for m in outer.getmembers()}
        manifest = json.load(outer.extractfile(members["manifest.json"]))[0]
        config = json.load(outer.extractfile(members[manifest["Config"]]))
        layers = []
        for name in manifest["Layers"]:
            member = members[name]
            while member.issym() or member.islnk():
                member = members[member.linkname]
            data = outer.extractfile(member).read()
            entries = []
            with tarfile.open(fileobj=__import__("io").BytesIO(data)) as layer:
                for e in layer.getmembers():
                    # tarfile drops the trailing slash of directory names; put it back.
                    name = e.name + "/" if e.isdir() and not e.name.endswith("/") else e.name
                    entries.append([name, e.type.decode(), oct(e.mode), e.uid, e.gid, e.mtime, e.linkname])
            layers.append({"member": name, "diff_id": "sha256:" + hashlib.sha256(data).hexdigest(), "entries": entries})
    json.dump({"repo_tags": manifest["RepoTags"], "config": config, "layers": layers}, sys.stdout, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
