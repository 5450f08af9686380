//! End to end: stream an image into `podman load`, run it, inspect it with skopeo and umoci.
//!
//! Needs podman, runc, skopeo, umoci and busybox-static (`.ci/run` installs them). Outside CI a
//! machine without them skips these tests with a message; in CI (CI=true) that is a failure.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

fn have_tools() -> bool {
    let ok = ["podman", "skopeo", "umoci"].iter().all(|t| Command::new(t).arg("--version").output().is_ok())
        && Path::new("/bin/busybox").exists();
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI must have podman, skopeo, umoci and busybox-static");
        eprintln!("podman/skopeo/umoci/busybox-static missing; end-to-end test skipped");
    }
    ok
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--cgroup-manager=cgroupfs", "--runtime", "/usr/sbin/runc"]);
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A store path holding a static busybox, and a customisation layer linking /bin/sh to it.
fn busybox_image(dir: &Path, tag: &str) -> std::path::PathBuf {
    let fx = fixture("compat", 8, 30, 0.0);
    let bb = dir.join("store").join("4bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox");
    fs::create_dir_all(bb.join("bin")).unwrap();
    fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    // One store dir per image: copy a few fixture paths next to busybox.
    let mut layers = vec![vec![bb.to_str().unwrap().to_string()]];
    let ours = dir.join("store");
    for p in store_paths(&fx).iter().take(3) {
        let name = Path::new(p).file_name().unwrap();
        let status = Command::new("cp").arg("-a").arg(p).arg(ours.join(name)).status().unwrap();
        assert!(status.success());
        layers.push(vec![ours.join(name).to_str().unwrap().to_string()]);
    }
    // Customisation layer: /bin/sh -> busybox, /etc/motd owned by 1000:100.
    let custom = dir.join("custom");
    fs::create_dir_all(&custom).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    h.set_cksum();
    b.append_data(&mut h.clone(), "bin/", std::io::empty()).unwrap();
    b.append_data(&mut h, "etc/", std::io::empty()).unwrap();
    let mut l = tar::Header::new_ustar();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    l.set_mode(0o777);
    b.append_link(&mut l, "bin/sh", bb.join("bin/busybox")).unwrap();
    let mut f = tar::Header::new_ustar();
    f.set_size(6);
    f.set_mode(0o640);
    f.set_uid(1000);
    f.set_gid(100);
    f.set_cksum();
    b.append_data(&mut f, "etc/motd", &b"hello\n"[..]).unwrap();
    let data = b.into_inner().unwrap();
    fs::write(custom.join("layer.tar"), &data).unwrap();
    fs::write(custom.join("checksum"), sha256_hex(&data)).unwrap();

    let mut conf = base_conf(dir, layers);
    conf["store_dir"] = json!(ours);
    conf["customisation_layer"] = json!(custom);
    conf["repo_tag"] = json!(tag);
    conf["config"] = json!({"Cmd": ["/bin/sh", "-c", "echo from-cmd"], "Env": ["GREETING=hi", "PATH=/bin"], "WorkingDir": "/etc"});
    conf["architecture"] = json!("amd64");
    write_json(dir, "conf.json", &conf)
}

/// With the tools there: a scratch directory, a tag of this run's for `name`, and the conf of
/// busybox_image under that tag.
fn podman_image(name: &str) -> Option<(tempfile::TempDir, String, std::path::PathBuf)> {
    if !have_tools() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tag = format!("localhost/{name}:{}", std::process::id());
    let conf = busybox_image(tmp.path(), &tag);
    Some((tmp, tag, conf))
}

#[test]
fn podman_loads_and_runs_the_streamed_image() {
    let Some((tmp, tag, conf)) = podman_image("stevedore-e2e") else { return };

    // Stream straight into `podman load`, as a NixOS host does with imageStream.
    let mut streamer = Command::new(bin()).arg("stream").arg(&conf).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let load = podman().args(["load"]).stdin(streamer.stdout.take().unwrap()).output().unwrap();
    assert!(streamer.wait().unwrap().success());
    assert!(load.status.success(), "podman load: {}", String::from_utf8_lossy(&load.stderr));

    let run = |args: &[&str]| -> String {
        run_ok(
            podman()
                .args(["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", &tag])
                .args(args),
        )
    };
    assert_eq!(run(&[]), "from-cmd\n");
    assert_eq!(run(&["/bin/sh", "-c", "echo $GREETING; pwd; cat motd"]), "hi\n/etc\nhello\n");
    assert_eq!(run(&["/bin/sh", "-c", "stat -c '%u:%g %a' /etc/motd"]), "1000:100 640\n");
    let bb = tmp.path().join("store/4bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox/bin/busybox");
    assert_eq!(run(&["/bin/sh", "-c", &format!("stat -c '%u:%g %a' {}", bb.display())]), "0:0 755\n");

    let inspect: Value = serde_json::from_str(&run_ok(podman().args(["image", "inspect", &tag]))).unwrap();
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 5);
    let docker_id = inspect[0]["Id"].as_str().unwrap().to_string();
    let _ = podman().args(["rmi", "-f", &tag]).output();

    // The same image as a zstd oci-archive: same image ID, same behaviour.
    let archive = tmp.path().join("image.oci.tar");
    let out = Command::new(bin()).arg("stream").arg(&conf).args(["--format", "oci-archive", "--compressor", "zstd", "-o"]).arg(&archive).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run_ok(podman().args(["load", "-i"]).arg(&archive));
    assert_eq!(run(&["/bin/sh", "-c", "cat /etc/motd"]), "hello\n");
    let inspect: Value = serde_json::from_str(&run_ok(podman().args(["image", "inspect", &tag]))).unwrap();
    assert_eq!(inspect[0]["Id"], docker_id);
    let _ = podman().args(["rmi", "-f", &tag]).output();
}

#[test]
fn skopeo_and_umoci_read_the_archive() {
    if !have_tools() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let conf = busybox_image(tmp.path(), "example.org/team/app:v2");
    let archive = tmp.path().join("image.tar");
    let out = Command::new(bin()).arg("stream").arg(&conf).arg("-o").arg(&archive).output().unwrap();
    assert!(out.status.success());

    let inspect: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", &format!("docker-archive:{}", archive.display())]))).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 5);
    assert_eq!(inspect["Env"], json!(["GREETING=hi", "PATH=/bin"]));
    assert_eq!(inspect["RepoTags"], json!([]), "skopeo lists tags of a registry repo only");
    let cfg: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", "--config", &format!("docker-archive:{}", archive.display())]))).unwrap();
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/sh", "-c", "echo from-cmd"]));

    // Into an OCI layout and unpacked by umoci: the files are where the layers put them.
    let oci = tmp.path().join("oci");
    run_ok(Command::new("skopeo").args(["copy", "-q", &format!("docker-archive:{}", archive.display()), &format!("oci:{}:v2", oci.display())]));
    let bundle = tmp.path().join("bundle");
    run_ok(Command::new("umoci").args(["unpack", "--rootless", "--image", &format!("{}:v2", oci.display())]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    assert_eq!(fs::read(rootfs.join("etc/motd")).unwrap(), b"hello\n");
    assert!(fs::symlink_metadata(rootfs.join("bin/sh")).unwrap().file_type().is_symlink());
    let bb = tmp.path().join("store/4bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox/bin/busybox");
    let inside = rootfs.join(bb.strip_prefix("/").unwrap());
    assert_eq!(fs::read(&inside).unwrap(), fs::read("/bin/busybox").unwrap());

    // Layouts of zstd and zstd:chunked layers, written by stevedore: umoci reads both alike.
    // umoci 0.4.7 (Debian 12 and 13) unpacks no zstd layer at all; a umoci that does must
    // unpack the chunked one as plain zstd.
    let mut unpacked = Vec::new();
    for c in ["zstd", "zstd:chunked"] {
        let layout = tmp.path().join(format!("layout-{}", c.replace(':', "-")));
        let out = Command::new(bin()).arg("stream").arg(&conf).args(["--format", "oci", "--compressor", c, "-o"]).arg(&layout).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tag = format!("{}:v2", layout.display());
        let manifest: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", "--raw", &format!("oci:{tag}")]))).unwrap();
        let toc = manifest["layers"].as_array().unwrap().iter().filter(|l| l["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"].is_string()).count();
        assert_eq!(toc, if c == "zstd" { 0 } else { 5 }, "{c}: {manifest}");
        let bundle = tmp.path().join(format!("bundle-{}", c.replace(':', "-")));
        let out = Command::new("umoci").args(["unpack", "--rootless", "--image", &tag]).arg(&bundle).output().unwrap();
        let rootfs = bundle.join("rootfs");
        unpacked.push(if out.status.success() {
            assert_eq!(fs::read(rootfs.join("etc/motd")).unwrap(), b"hello\n", "{c}");
            assert_eq!(fs::read(rootfs.join(bb.strip_prefix("/").unwrap())).unwrap(), fs::read("/bin/busybox").unwrap(), "{c}");
            "unpacked".to_string()
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("not correct mediatype: application/vnd.oci.image.layer.v1.tar+zstd"), "{c}: {err}");
            "refused as zstd".to_string()
        });
        // skopeo decompresses every layer (to recompress it as gzip): each is its diff_id.
        let copied = tmp.path().join(format!("copied-{}", c.replace(':', "-")));
        run_ok(Command::new("skopeo").args(["copy", "-q", "--dest-compress", "--dest-compress-format", "gzip", &format!("oci:{tag}"), &format!("dir:{}", copied.display())]));
        let file = |d: &Value| fs::read(copied.join(d.as_str().unwrap().trim_start_matches("sha256:"))).unwrap();
        let m: Value = serde_json::from_slice(&fs::read(copied.join("manifest.json")).unwrap()).unwrap();
        let config: Value = serde_json::from_slice(&file(&m["config"]["digest"])).unwrap();
        for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&file(&l["digest"])[..]), &mut tar).unwrap();
            assert_eq!(format!("sha256:{}", common::sha256_hex(&tar)), config["rootfs"]["diff_ids"][i], "{c}: layer {i}");
        }
    }
    assert_eq!(unpacked[0], unpacked[1], "umoci reads zstd:chunked otherwise than zstd");
    make_writable(tmp.path());
}

#[test]
fn oci_archives_load_through_either_transport() {
    // An oci-archive holds a Docker manifest.json too: skopeo reads it as an oci-archive and as
    // a Docker archive, podman loads it (`podman load` takes the OCI layout; `podman pull
    // docker-archive:` the manifest.json) and runs it, with the config's digest as image ID.
    let Some((tmp, tag, conf)) = podman_image("stevedore-oci-both") else { return };
    let skopeo_json = |args: &[&str]| -> Value { serde_json::from_str(&run_ok(Command::new("skopeo").arg("inspect").args(args))).unwrap() };
    for c in ["gz", "zstd", "zstd:chunked", "none"] {
        let archive = tmp.path().join(format!("image-{}.tar", c.replace(':', "-")));
        let out = Command::new(bin()).arg("stream").arg(&conf).args(["--format", "oci-archive", "--compressor", c, "-o"]).arg(&archive).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let oci = format!("oci-archive:{}", archive.display());
        let docker = format!("docker-archive:{}", archive.display());
        let config_digest = skopeo_json(&["--raw", &oci])["config"]["digest"].as_str().unwrap().to_string();
        assert_eq!(skopeo_json(&["--raw", &docker])["config"]["digest"], config_digest.as_str(), "{c}: the Docker view has another config");
        assert_eq!(skopeo_json(&["--config", &docker]), skopeo_json(&["--config", &oci]), "{c}");
        assert_eq!(skopeo_json(&[&docker])["Layers"].as_array().unwrap().len(), 5, "{c}");
        for load in [&["load", "-i", archive.to_str().unwrap()][..], &["pull", "-q", &docker]] {
            let _ = podman().args(["rmi", "-f", &tag]).output();
            run_ok(podman().args(load));
            let inspect: Value = serde_json::from_str(&run_ok(podman().args(["image", "inspect", &tag]))).unwrap();
            assert_eq!(format!("sha256:{}", inspect[0]["Id"].as_str().unwrap()), config_digest, "{c}: podman {}", load[0]);
            let said = run_ok(podman().args(["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", &tag, "/bin/sh", "-c", "cat /etc/motd"]));
            assert_eq!(said, "hello\n", "{c}: podman {}", load[0]);
        }
    }
    let _ = podman().args(["rmi", "-f", &tag]).output();
    make_writable(tmp.path());
}

/// The names of a tar's members, in order, and the RepoTags and Layers of its manifest.json.
fn archive_names(archive: &Path) -> (Vec<String>, Value) {
    let members = members(&fs::read(archive).unwrap());
    let manifest: Value = serde_json::from_slice(member(&members, "manifest.json")).unwrap();
    (members.into_iter().map(|(n, _)| n).collect(), manifest)
}

#[test]
fn an_untagged_name_loads_as_latest() {
    // Docker and podman refuse an untagged RepoTags entry: `-t NAME` (or a conf's repo_tag
    // NAME) means NAME:latest, in a Docker archive and in an oci-archive's annotations.
    let Some((tmp, _, conf)) = podman_image("unused") else { return };
    let name = format!("stevedore-untagged-{}", std::process::id());
    let docker = tmp.path().join("docker.tar");
    let oci = tmp.path().join("oci.tar");
    for (format, out) in [("docker-archive", &docker), ("oci-archive", &oci)] {
        let o = Command::new(bin()).arg("stream").arg(&conf).args(["-q", "-t", &name, "--format", format, "-o"]).arg(out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(archive_names(out).1[0]["RepoTags"], json!([format!("{name}:latest")]), "{format}");
    }
    let index: Value = serde_json::from_slice(member(&members(&fs::read(&oci).unwrap()), "index.json")).unwrap();
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["io.containerd.image.name"], format!("docker.io/library/{name}:latest"));
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "latest");
    // A conf's untagged repo_tag too.
    let mut c: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    c["repo_tag"] = json!(name);
    let untagged = write_json(tmp.path(), "untagged.json", &c);
    let o = Command::new(bin()).arg("stream").arg(&untagged).args(["-q", "-o"]).arg(&docker).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(archive_names(&docker).1[0]["RepoTags"], json!([format!("{name}:latest")]));

    for (archive, loaded) in [(&docker, format!("localhost/{name}:latest")), (&oci, format!("docker.io/library/{name}:latest"))] {
        let said = run_ok(podman().args(["load", "-i"]).arg(archive));
        assert!(said.contains(&format!("Loaded image: {loaded}")), "{}: {said}", archive.display());
        let out = run_ok(podman().args(["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", &loaded, "/bin/sh", "-c", "cat /etc/motd"]));
        assert_eq!(out, "hello\n");
        let _ = podman().args(["rmi", "-f", &loaded]).output();
    }
    make_writable(tmp.path());
}

#[test]
fn a_customisation_layer_equal_to_a_base_layer_is_stored_once() {
    // The base image's last layer is the customisation layer this image adds again: the same
    // member name, the same bytes. The archive holds it once and lists it twice, as `docker
    // save` does; podman loads it.
    let Some((tmp, tag, conf)) = podman_image("stevedore-same-layer") else { return };
    let base = tmp.path().join("base.tar");
    let o = Command::new(bin()).arg("stream").arg(&conf).args(["-q", "-o"]).arg(&base).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut derived: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    derived["from_image"] = json!(base);
    derived["store_layers"] = json!([[derived["store_layers"][0][0].clone()]]);
    let derived = write_json(tmp.path(), "derived.json", &derived);
    let image = tmp.path().join("image.tar");
    let o = Command::new(bin()).arg("stream").arg(&derived).arg("-o").arg(&image).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (names, manifest) = archive_names(&image);
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "member names repeat: {names:?}");
    let layers: Vec<&str> = manifest[0]["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(layers.len(), 7);
    assert_eq!(layers[4], layers[6], "{layers:?}");
    let config: Value = serde_json::from_slice(member(&members(&fs::read(&image).unwrap()), manifest[0]["Config"].as_str().unwrap())).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][4], config["rootfs"]["diff_ids"][6]);
    // skopeo reads it; podman loads and runs it.
    let inspect: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", &format!("docker-archive:{}", image.display())]))).unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 7);
    let _ = podman().args(["rmi", "-f", &tag]).output();
    run_ok(podman().args(["load", "-i"]).arg(&image));
    let out = run_ok(podman().args(["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", &tag, "/bin/sh", "-c", "cat /etc/motd"]));
    assert_eq!(out, "hello\n");
    let _ = podman().args(["rmi", "-f", &tag]).output();
    // As an OCI layout the blob is stored once and named twice by the manifest.
    let layout = tmp.path().join("layout");
    let o = Command::new(bin()).arg("stream").arg(&derived).args(["-q", "--format", "oci", "-o"]).arg(&layout).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inspect: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", &format!("oci:{}", layout.display())]))).unwrap();
    let l = inspect["Layers"].as_array().unwrap();
    assert_eq!((l.len(), &l[4]), (7, &l[6]));
    make_writable(tmp.path());
}

#[test]
fn skopeo_made_oci_bases_carry_their_layers_into_images_podman_runs() {
    // Bases as skopeo writes them (oci-archive and layout directory, layers gzip or zstd; a
    // layout with plain layers from stevedore): stevedore builds on each, its base layers decompressed to their diff_ids in the
    // Docker archive and recompressed in the OCI output, and podman runs both.
    let Some((tmp, tag, conf)) = podman_image("stevedore-oci-base") else { return };
    let base = tmp.path().join("base.tar");
    let out = Command::new(bin()).arg("stream").arg(&conf).arg("-q").arg("-o").arg(&base).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let base_diff_ids = Image::parse(&fs::read(&base).unwrap()).config["rootfs"]["diff_ids"].clone();
    let fx = fixture("compat", 8, 30, 0.0);
    let ours = store_paths(&fx)[5].clone();
    let run = |image: &str| -> String {
        let script = format!("cat /etc/motd; echo $GREETING; ls {ours} | wc -l");
        run_ok(podman().args(["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", image, "/bin/sh", "-c", &script]))
    };
    let files = fs::read_dir(&ours).unwrap().count();
    for (transport, compress) in [("oci-archive", "gzip"), ("oci-archive", "zstd"), ("oci", "gzip"), ("oci", "zstd"), ("oci", "")] {
        let case = format!("{transport} {compress}");
        let made = tmp.path().join(format!("base-{transport}-{compress}"));
        let dest = match compress {
            "" => format!("{transport}:{}", made.display()),
            _ => format!("{transport}:{}:base", made.display()),
        };
        if compress.is_empty() {
            // skopeo 1.9 compresses OCI layers whatever it is told: plain ones are ours.
            run_ok(Command::new(bin()).arg("stream").arg(&conf).args(["-q", "--format", "oci", "--compressor", "none", "-t", "base:base", "-o"]).arg(&made));
        } else {
            run_ok(Command::new("skopeo").args(["copy", "-q", "--dest-compress", "--dest-compress-format", compress]).arg(format!("docker-archive:{}", base.display())).arg(&dest));
        }
        let raw: Value = serde_json::from_str(&run_ok(Command::new("skopeo").args(["inspect", "--raw", &dest]))).unwrap();
        let suffix = if compress.is_empty() { ".tar" } else { compress };
        assert!(raw["layers"].as_array().unwrap().iter().all(|l| l["mediaType"].as_str().unwrap().ends_with(suffix)), "{case}: {raw}");
        let mut c = base_conf(&fx, vec![vec![ours.clone()]]);
        c["from_image"] = json!(made);
        c["repo_tag"] = json!(tag);
        let c = write_json(tmp.path(), "on-base.json", &c);
        let _ = podman().args(["rmi", "-f", &tag]).output();
        let mut streamer = Command::new(bin()).arg("stream").arg(&c).arg("-q").stdout(Stdio::piped()).spawn().unwrap();
        let load = podman().args(["load"]).stdin(streamer.stdout.take().unwrap()).output().unwrap();
        assert!(streamer.wait().unwrap().success(), "{case}");
        assert!(load.status.success(), "{case}: podman load: {}", String::from_utf8_lossy(&load.stderr));
        assert_eq!(run(&tag), format!("hello\nhi\n{files}\n"), "{case}");
        let inspect: Value = serde_json::from_str(&run_ok(podman().args(["image", "inspect", &tag]))).unwrap();
        let layers = inspect[0]["RootFS"]["Layers"].as_array().unwrap();
        assert_eq!(layers.len(), 6, "{case}");
        assert_eq!(json!(layers[..5]), base_diff_ids, "{case}: the base layers keep their diff_ids");
        // The OCI output, zstd: the same diff_ids.
        let archive = tmp.path().join("on-base.oci.tar");
        let out = Command::new(bin()).arg("stream").arg(&c).args(["-q", "--format", "oci-archive", "--compressor", "zstd", "-o"]).arg(&archive).output().unwrap();
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let _ = podman().args(["rmi", "-f", &tag]).output();
        run_ok(podman().args(["load", "-i"]).arg(&archive));
        assert_eq!(run(&tag), format!("hello\nhi\n{files}\n"), "{case}: oci-archive");
        let again: Value = serde_json::from_str(&run_ok(podman().args(["image", "inspect", &tag]))).unwrap();
        assert_eq!(again[0]["RootFS"]["Layers"], inspect[0]["RootFS"]["Layers"], "{case}: oci-archive");
    }
    let _ = podman().args(["rmi", "-f", &tag]).output();
    make_writable(tmp.path());
}
