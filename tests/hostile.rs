//! Hostile inputs, made here: archives that try to write outside the output, to take unbounded
//! memory, to hang, or to pass off bytes as what they are not. Each must end in a one-line
//! error (or, where the input is legal, a correct result) with nothing written outside, memory
//! under 100 MiB, and no half-written output.

mod common;

use common::{bin, run, Run};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use stevedore::tar::{Header, HeaderEncoder};

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha(d: &[u8]) -> String {
    hex(&Sha256::digest(d))
}

/// One raw member: an optional PAX header with `records`, then `h` and its data.
fn member(out: &mut Vec<u8>, pax: Option<&[u8]>, h: Header, data: &[u8]) {
    let mut enc = HeaderEncoder::new();
    if let Some(records) = pax {
        let mut p = Header::plain_file(b"././@PaxHeader", records.len() as u64, 0);
        p.kind = b'x';
        enc.encode(&p, out);
        out.extend_from_slice(records);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    enc.encode(&h, out);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A PAX record `LEN key=value\n`.
fn record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len += 1;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn file<'a>(name: &'a [u8], data: &[u8], mode: u32) -> Header<'a> {
    Header { mode, ..Header::plain_file(name, data.len() as u64, 0) }
}

fn with_kind<'a>(name: &'a [u8], kind: u8, link: &'a [u8]) -> Header<'a> {
    Header { kind, linkname: link, mode: if kind == b'5' { 0o755 } else { 0o777 }, ..Header::plain_file(name, 0, 0) }
}

fn end(mut t: Vec<u8>) -> Vec<u8> {
    t.resize(t.len() + 1024, 0);
    t
}

/// A Docker archive of `layers`; `diff_ids` overrides the config's (else the layers' digests).
/// `extra` members go first.
fn docker_archive(layers: &[Vec<u8>], diff_ids: Option<Vec<String>>, extra: &[(String, Vec<u8>)]) -> Vec<u8> {
    let diff_ids = diff_ids.unwrap_or_else(|| layers.iter().map(|l| format!("sha256:{}", sha(l))).collect());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha(&config));
    let names: Vec<String> = (0..layers.len()).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": ["hostile:latest"], "Layers": names}])).unwrap();
    let mut out = Vec::new();
    for (name, data) in extra {
        member(&mut out, None, file(name.as_bytes(), data, 0o644), data);
    }
    member(&mut out, None, file(config_name.as_bytes(), &config, 0o644), &config);
    member(&mut out, None, file(b"manifest.json", &manifest, 0o644), &manifest);
    for (name, l) in names.iter().zip(layers) {
        member(&mut out, None, file(name.as_bytes(), l, 0o644), l);
    }
    end(out)
}

fn go(cmd: Command) -> Run {
    let what = format!("{:?}", cmd.get_args().next().unwrap_or_default());
    let r = run(cmd, None, Duration::from_secs(120));
    eprintln!("{what}: peak RSS {} KiB", r.max_rss_kib);
    r
}

fn stevedore(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(bin());
    for a in args {
        c.arg(a);
    }
    c
}

fn userns_ok() -> bool {
    nix::unistd::geteuid().is_root() || Command::new("unshare").args(["-U", "true"]).status().is_ok_and(|s| s.success())
}

struct Case {
    dir: tempfile::TempDir,
    /// A directory outside every output, which nothing may write into.
    host: PathBuf,
    busybox: PathBuf,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::Builder::new().prefix("stevedore-hostile-").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let host = dir.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(0o777)).unwrap();
        let busybox = dir.path().join("store/0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-busybox");
        fs::create_dir_all(busybox.join("bin")).unwrap();
        fs::copy("/bin/busybox", busybox.join("bin/busybox")).expect("busybox-static is installed at /bin/busybox");
        std::os::unix::fs::symlink("busybox", busybox.join("bin/sh")).unwrap();
        Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status().unwrap();
        Case { dir, host, busybox }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn host_is_untouched(&self) {
        let left: Vec<_> = fs::read_dir(&self.host).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "written outside the output: {left:?}");
    }

    fn run_as_root(&self, image: &Path, out: &Path) -> Command {
        let script = self.write("script.sh", b"true\n");
        let mut c = Command::new(bin());
        c.arg("run-as-root")
            .arg("--from-image")
            .arg(image)
            .arg("--store-path")
            .arg(&self.busybox)
            .arg("--script")
            .arg(script)
            .arg("--shell")
            .arg(self.busybox.join("bin/sh"))
            .arg("--out-layer")
            .arg(out)
            .args(["--mtime", "1", "-q"]);
        c
    }

    fn export(&self, image: &Path, out: &Path) -> Command {
        let mut c = stevedore(&[&"export", &"--from-image", &image, &"-o", &out, &"--compressor", &"none", &"-q"]);
        c.arg("--scratch").arg(self.dir.path());
        c
    }

    fn stream_from(&self, image: &Path, out: Option<&Path>) -> Command {
        let conf = json!({
            "store_layers": [], "customisation_layer": null, "from_image": image,
            "config": {}, "architecture": "amd64", "created": "1970-01-01T00:00:01Z",
            "mtime": "1970-01-01T00:00:01Z", "uid": 0, "gid": 0, "uname": "root", "gname": "root",
            "store_dir": "/nix/store", "repo_tag": "out:latest",
        });
        let conf = self.write("conf.json", &serde_json::to_vec(&conf).unwrap());
        let mut c = stevedore(&[&"stream", &conf, &"-q"]);
        if let Some(o) = out {
            c.arg("-o").arg(o);
        }
        c
    }

    fn merge(&self, image: &Path, out: &Path) -> Command {
        stevedore(&[&"merge", &image, &"-o", &out, &"-q"])
    }
}

fn no_output(out: &Path) {
    assert!(!out.exists(), "{} was written", out.display());
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    assert!(!partial.exists(), "{} was left", partial.display());
}

#[test]
fn a_nul_in_a_name_cannot_escape() {
    let c = Case::new();
    let host = c.host.as_os_str().as_encoded_bytes();
    let mut l = Vec::new();
    member(&mut l, None, with_kind(b"a", b'2', host), b"");
    member(&mut l, Some(&record("path", b"a\0x")), file(b"a", b"#!/bin/sh\n", 0o4755), b"#!/bin/sh\n");
    let image = c.write("nul.tar", &docker_archive(&[end(l)], None, &[]));
    let out = c.path("out.tar");
    c.export(&image, &out).pipe(go).failed_with("NUL");
    no_output(&out);
    if userns_ok() {
        c.run_as_root(&image, &out).pipe(go).failed_with("NUL");
        no_output(&out);
    }
    // A directory and a hard link posing the same way.
    for (h, data) in [(with_kind(b"a", b'5', b""), &b""[..]), (with_kind(b"a", b'1', b"a"), b"")] {
        let mut l = Vec::new();
        member(&mut l, None, with_kind(b"a", b'2', host), b"");
        member(&mut l, Some(&record("path", b"a\0d")), h, data);
        let image = c.write("nul2.tar", &docker_archive(&[end(l)], None, &[]));
        c.export(&image, &out).pipe(go).failed_with("NUL");
    }
    c.host_is_untouched();
}

#[test]
fn names_above_the_root_are_refused_and_links_stay_inside() {
    let c = Case::new();
    let out = c.path("out.tar");
    let host = c.host.as_os_str().as_encoded_bytes().to_vec();
    let mut dotdot = Vec::new();
    member(&mut dotdot, None, file(b"../../escape", b"x", 0o644), b"x");
    let mut hard = Vec::new();
    member(&mut hard, None, with_kind(b"h", b'1', b"../../../etc/passwd"), b"");
    for (name, layer, want) in [("dotdot.tar", dotdot, "climbs above"), ("hard.tar", hard, "climbs above")] {
        let image = c.write(name, &docker_archive(&[end(layer)], None, &[]));
        c.export(&image, &out).pipe(go).failed_with(want);
        no_output(&out);
        if userns_ok() {
            c.run_as_root(&image, &out).pipe(go).failed_with(want);
        }
    }

    // A symlink to a host directory, then files through it in a later layer: legal, and they
    // land inside the image, at the link's target taken in the image's root.
    let mut l1 = Vec::new();
    member(&mut l1, None, with_kind(b"a", b'2', &host), b"");
    member(&mut l1, None, with_kind(b"rel", b'2', b"../../../../../../tmp"), b"");
    let mut l2 = Vec::new();
    member(&mut l2, None, file(b"a/x", b"inside\n", 0o4755), b"inside\n");
    member(&mut l2, None, with_kind(b"a/d/", b'5', b""), b"");
    member(&mut l2, None, with_kind(b"a/h", b'1', b"a/x"), b"");
    member(&mut l2, None, with_kind(b"a/l", b'2', b"/etc/passwd"), b"");
    member(&mut l2, None, file(b"rel/y", b"y\n", 0o644), b"y\n");
    let image = c.write("links.tar", &docker_archive(&[end(l1), end(l2)], None, &[]));
    c.export(&image, &out).pipe(go).succeeded();
    // Extract it as an unsuspecting user would, with Python's tarfile.
    let target = c.path("extracted");
    fs::create_dir(&target).unwrap();
    let py = "import tarfile,sys\nt=tarfile.open(sys.argv[1])\nfor m in t.getmembers():\n  print(m.name, m.type)\nt.extractall(sys.argv[2])\n".to_string();
    let o = Command::new("python3").args(["-c", &py]).arg(&out).arg(&target).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let inside = target.join(c.host.strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(inside.join("x")).unwrap(), "inside\n");
    assert_eq!(fs::read_to_string(target.join("tmp/y")).unwrap(), "y\n");
    c.host_is_untouched();
    fs::remove_file(&out).unwrap();
    if userns_ok() {
        c.run_as_root(&image, &out).pipe(go).succeeded();
        c.host_is_untouched();
    }
}

#[test]
fn memory_stays_bounded() {
    let c = Case::new();
    let out = c.path("out.tar");
    // Hundreds of 4 MiB members of zeros (and as many that start like JSON) beside a valid
    // image, compressed to a few hundred KB.
    let image = c.path("bomb.tar.zst");
    let mut z = zstd::Encoder::new(fs::File::create(&image).unwrap(), 3).unwrap();
    let zeros = vec![0u8; 4 << 20];
    let mut json_like = zeros.clone();
    json_like[0] = b'{';
    for i in 0..150 {
        for (name, data) in [(format!("zeros/{i}"), &zeros), (format!("json/{i}.json"), &json_like)] {
            let mut h = Vec::new();
            HeaderEncoder::new().encode(&file(name.as_bytes(), data, 0o644), &mut h);
            z.write_all(&h).unwrap();
            z.write_all(data).unwrap();
        }
    }
    let mut l = Vec::new();
    member(&mut l, None, file(b"hello", b"hi\n", 0o644), b"hi\n");
    z.write_all(&docker_archive(&[end(l)], None, &[])).unwrap();
    z.finish().unwrap();
    assert!(fs::metadata(&image).unwrap().len() < 8 << 20);
    c.export(&image, &out).pipe(go).succeeded();
    fs::remove_file(&out).unwrap();
    c.stream_from(&image, Some(&out)).pipe(go).succeeded();
    fs::remove_file(&out).unwrap();
    c.merge(&image, &out).pipe(go).succeeded();
    fs::remove_file(&out).unwrap();
    if userns_ok() {
        c.run_as_root(&image, &out).pipe(go).succeeded();
        fs::remove_file(&out).unwrap();
    }

    // A PAX header claiming 1 GiB, in the outer archive and in a layer.
    let mut big = Vec::new();
    let mut h = Header::plain_file(b"././@PaxHeader", 1 << 30, 0);
    h.kind = b'x';
    HeaderEncoder::new().encode(&h, &mut big);
    big.extend_from_slice(&vec![b'9'; 1 << 20]);
    let outer = c.write("bigpax.tar", &big);
    for cmd in [c.export(&outer, &out), c.stream_from(&outer, Some(&out)), c.merge(&outer, &out)] {
        cmd.pipe(go).failed_with("limit");
        no_output(&out);
    }
    let image = c.write("bigpax-layer.tar", &docker_archive(&[big.clone()], None, &[]));
    c.export(&image, &out).pipe(go).failed_with("limit");
}

#[test]
fn fifos_and_endless_inputs_end_in_errors() {
    let c = Case::new();
    let out = c.path("out.tar");
    let fifo = c.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    for cmd in [c.export(&fifo, &out), c.stream_from(&fifo, Some(&out)), c.merge(&fifo, &out)] {
        run(cmd, None, Duration::from_secs(20)).failed_with("not a regular file");
    }
    // A graph on stdin that never ends, and one in a FIFO.
    let endless: Box<dyn FnOnce(std::process::ChildStdin) + Send> = Box::new(|mut w| {
        let chunk = vec![b'['; 1 << 16];
        while w.write_all(&chunk).is_ok() {}
    });
    run(stevedore(&[&"layers", &"-"]), Some(endless), Duration::from_secs(60)).failed_with("limit");
    run(stevedore(&[&"layers", &fifo]), None, Duration::from_secs(20)).failed_with("not a regular file");
    // A conf that is a FIFO.
    run(stevedore(&[&"stream", &fifo]), None, Duration::from_secs(20)).failed_with("not a regular file");
}

/// A layer tar holding one small file.
fn hello_layer() -> Vec<u8> {
    let mut l = Vec::new();
    member(&mut l, None, file(b"hello", b"hi\n", 0o644), b"hi\n");
    end(l)
}

#[test]
fn base_layers_must_match_their_diff_ids() {
    let c = Case::new();
    let out = c.path("out.tar");
    let l = hello_layer();
    // A diff_id that is no digest names an output member: refused.
    let sneaky = format!("sha256:../../x/layer.tar{}", "a".repeat(64 - "../../x/layer.tar".len()));
    assert_eq!(sneaky.len(), 71);
    let upper = format!("sha256:{}", sha(&l).to_uppercase());
    for (name, id) in [("sneaky.tar", sneaky), ("upper.tar", upper)] {
        let image = c.write(name, &docker_archive(std::slice::from_ref(&l), Some(vec![id]), &[]));
        c.stream_from(&image, Some(&out)).pipe(go).failed_with("bad diff_id");
        no_output(&out);
    }
    // A well-formed diff_id that is not the layer's: found while the layer is copied, before
    // manifest.json is written.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let image = c.write("wrong.tar", &docker_archive(std::slice::from_ref(&l), Some(vec![wrong]), &[]));
    c.stream_from(&image, Some(&out)).pipe(go).failed_with("diff_id");
    no_output(&out);
    let r = c.stream_from(&image, None).pipe(go);
    r.failed_with("diff_id");
    assert!(!r.stdout.windows(13).any(|w| w == b"manifest.json"), "the partial stream has a manifest");
    // merge checks too: it names layers by their digest and keeps the config as it is, so a
    // lying config would load as a broken image.
    c.merge(&image, &out).pipe(go).failed_with("diff_id");
    no_output(&out);
}

/// An OCI layout at `dir` with one layer `blob` (as stored), whose config gives `diff_id`;
/// `tamper` may change the manifest before it is written.
fn oci_layout(dir: &Path, blob: &[u8], diff_id: &str, tamper: impl FnOnce(&mut serde_json::Value)) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |data: &[u8]| {
        fs::write(dir.join("blobs/sha256").join(sha(data)), data).unwrap();
        format!("sha256:{}", sha(data))
    };
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [diff_id]}})).unwrap();
    let mut manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(blob), "size": blob.len()}],
    });
    tamper(&mut manifest);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest), "size": manifest.len()}]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion": "1.0.0"}"#).unwrap();
}

#[test]
fn compressed_and_oci_base_layers_are_checked_too() {
    let c = Case::new();
    let out = c.path("out.tar");
    let l = hello_layer();
    let good = format!("sha256:{}", sha(&l));
    let wrong = format!("sha256:{}", "0".repeat(64));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&l).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&l[..], 3).unwrap();
    // Sound ones, gzip and zstd, stream.
    for (name, blob) in [("gz", &gz), ("zst", &zst)] {
        let layout = c.path(&format!("layout-{name}"));
        oci_layout(&layout, blob, &good, |_| {});
        c.stream_from(&layout, Some(&out)).pipe(go).succeeded();
        fs::remove_file(&out).unwrap();
    }
    // A compressed layer that is not its diff_id: found while it is decompressed, before any
    // output; likewise a compressed Docker archive member.
    let layout = c.path("layout-wrong");
    oci_layout(&layout, &gz, &wrong, |_| {});
    c.stream_from(&layout, Some(&out)).pipe(go).failed_with("diff_id");
    no_output(&out);
    let r = c.stream_from(&layout, None).pipe(go);
    r.failed_with("diff_id");
    assert!(!r.stdout.windows(13).any(|w| w == b"manifest.json"), "the partial stream has a manifest");
    let image = c.write("zst-member.tar", &docker_archive(std::slice::from_ref(&zst), Some(vec![wrong.clone()]), &[]));
    c.stream_from(&image, Some(&out)).pipe(go).failed_with("diff_id");
    no_output(&out);
    // A gzip stream cut short.
    let layout = c.path("layout-cut");
    oci_layout(&layout, &gz[..gz.len() / 2], &good, |_| {});
    c.stream_from(&layout, Some(&out)).pipe(go).failed_with("base image");
    no_output(&out);
    // Manifests that lie: a layer's size, a media type that is no tar, a config that is not
    // the blob its digest names, a config that is no image's.
    type Tamper = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: [(&str, Tamper, &str); 4] = [
        ("size", Box::new(|m| m["layers"][0]["size"] = json!(3)), "but the manifest says 3"),
        ("type", Box::new(|m| m["layers"][0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+encrypted")), "is not a tar, gzip or zstd layer"),
        ("config", Box::new(|m| m["config"]["digest"] = json!(format!("sha256:{}", sha(b"{}")))), "does not match its digest"),
        ("artifact", Box::new(|m| m["config"]["mediaType"] = json!("application/vnd.cncf.helm.config.v1+json")), "is not a container image's"),
    ];
    for (name, tamper, needle) in cases {
        let layout = c.path(&format!("layout-{name}"));
        oci_layout(&layout, &gz, &good, tamper);
        if name == "config" {
            fs::write(layout.join(format!("blobs/sha256/{}", sha(b"{}"))), b"{ }").unwrap();
        }
        c.stream_from(&layout, Some(&out)).pipe(go).failed_with(needle);
        no_output(&out);
    }
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl Pipe for Command {}

#[test]
fn copied_trees_do_not_follow_the_images_links() {
    if !userns_ok() {
        eprintln!("skipped: no user namespaces here");
        return;
    }
    let c = Case::new();
    let host = c.host.as_os_str().as_encoded_bytes();
    let mut l = Vec::new();
    member(&mut l, None, with_kind(b"etc", b'2', host), b"");
    member(&mut l, None, with_kind(b"opt/", b'5', b""), b"");
    member(&mut l, None, with_kind(b"opt/app", b'2', host), b"");
    let image = c.write("links.tar", &docker_archive(&[end(l)], None, &[]));
    let tree = c.path("contents");
    fs::create_dir_all(tree.join("etc/sub")).unwrap();
    fs::write(tree.join("etc/sub/conf"), "x\n").unwrap();
    fs::create_dir_all(tree.join("opt")).unwrap();
    fs::write(tree.join("opt/app"), "a file where the image has a link\n").unwrap();
    Command::new("chmod").args(["-R", "a+rX"]).arg(&tree).status().unwrap();
    let out = c.path("out.tar");
    for keep in [false, true] {
        let mut cmd = c.run_as_root(&image, &out);
        cmd.arg("--layer").arg(&tree);
        if keep {
            cmd.arg("--keep-dirlinks");
        }
        cmd.pipe(go).succeeded();
        c.host_is_untouched();
        fs::remove_file(&out).unwrap();
    }
}
