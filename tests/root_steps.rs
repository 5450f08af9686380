//! buildImage's root steps without a VM: `run-as-root` (as root, and as an unprivileged user when
//! the kernel allows user namespaces), `export` (round trip, cross-checked with umoci), and
//! `nixdb` (checked by Debian's Nix).

mod common;

use common::{bin, sha256_hex};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A layer tar from (name, kind, data, uid) with kinds d(ir), f(ile), l(ink): data is the target.
fn layer(entries: &[(&str, char, &str, u64)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, uid) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(0);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
            'f' => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_bytes()).unwrap();
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, name, data).unwrap();
            }
            _ => unreachable!(),
        }
    }
    b.into_inner().unwrap()
}

/// A Docker archive (`docker save` layout) of the given layers.
fn docker_archive(layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", sha256_hex(l))).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let names: Vec<String> = (0..layers.len()).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": [tag], "Layers": names}])).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&config_name, &config);
    add("manifest.json", &manifest);
    for (name, l) in names.iter().zip(layers) {
        add(name, l);
    }
    b.into_inner().unwrap()
}

/// One tar member, as the tests look at them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    name: String,
    kind: char,
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: u64,
    data: String,
}

fn members(tar_bytes: &[u8]) -> Vec<Member> {
    let mut ar = tar::Archive::new(tar_bytes);
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let kind = match h.entry_type() {
                tar::EntryType::Directory => 'd',
                tar::EntryType::Regular => 'f',
                tar::EntryType::Symlink => 'l',
                other => other.as_byte() as char,
            };
            let mut data = String::new();
            if kind == 'l' {
                data = String::from_utf8(e.link_name_bytes().unwrap().to_vec()).unwrap();
            } else {
                e.read_to_string(&mut data).unwrap();
            }
            Member {
                name: String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                kind,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mode: h.mode().unwrap(),
                mtime: h.mtime().unwrap(),
                data,
            }
        })
        .collect()
}

fn m(name: &str, kind: char, owner: u64, mode: u32, data: &str) -> Member {
    Member { name: name.into(), kind, uid: owner, gid: owner, mode, mtime: 12345, data: data.into() }
}

/// Everything one run-as-root test needs, in a directory others can read (the unprivileged
/// run is another user).
struct Fixture {
    dir: tempfile::TempDir,
    busybox: PathBuf,
    base: PathBuf,
    base_layers: Vec<Vec<u8>>,
    script: PathBuf,
    copy_to_root: PathBuf,
}

const BASE_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new().prefix("stevedore-root-steps-").tempdir_in("/tmp").unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A store path holding a static busybox and the applets the script uses.
    let busybox = dir.path().join("store/0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-busybox");
    fs::create_dir_all(busybox.join("bin")).unwrap();
    fs::copy("/bin/busybox", busybox.join("bin/busybox")).expect("busybox-static is installed at /bin/busybox");
    for applet in ["sh", "mkdir", "chown", "rm", "echo", "cat", "ls", "id", "chmod", "touch", "ln", "stat", "grep"] {
        symlink("busybox", busybox.join("bin").join(applet)).unwrap();
    }
    let base_layers = vec![
        layer(&[
            ("etc/", 'd', "", 0),
            ("etc/passwd", 'f', BASE_PASSWD, 0),
            ("etc/group", 'f', "root:x:0:\n", 0),
            ("tmp-old/", 'd', "", 0),
            ("tmp-old/delete-me", 'f', "bye\n", 0),
            ("tmp-old/stays", 'f', "s\n", 0),
            ("var/", 'd', "", 0),
            ("var/lib/", 'd', "", 0),
            ("var/lib/old/", 'd', "", 0),
            ("var/lib/old/a", 'f', "a\n", 0),
            ("var/lib/old/b", 'f', "b\n", 0),
            ("srv/", 'd', "", 1234),
            ("srv/owned", 'f', "owned by 1234\n", 1234),
            ("gone-in-l2", 'f', "x", 0),
            ("bin", 'l', "usr/bin", 0),
            ("usr/", 'd', "", 0),
            ("usr/bin/", 'd', "", 0),
        ]),
        layer(&[(".wh.gone-in-l2", 'f', "", 0), ("etc/", 'd', "", 0), ("etc/motd", 'f', "hi\n", 0)]),
    ];
    let base = dir.path().join("base.tar");
    fs::write(&base, docker_archive(&base_layers, "base:latest")).unwrap();
    // copyToRoot: a file, and a symlink to a directory (rsync -k copies it as a directory).
    let copy_to_root = dir.path().join("contents");
    fs::create_dir_all(copy_to_root.join("etc")).unwrap();
    fs::write(copy_to_root.join("etc/os-release"), "ID=test\n").unwrap();
    fs::create_dir_all(dir.path().join("cfgdir")).unwrap();
    fs::write(dir.path().join("cfgdir/app.conf"), "x=1\n").unwrap();
    symlink(dir.path().join("cfgdir"), copy_to_root.join("cfg")).unwrap();
    let script = dir.path().join("script.sh");
    fs::write(
        &script,
        "set -e\n\
         mkdir -p /data\n\
         echo 'app:x:999:999::/data:/bin/sh' >> /etc/passwd\n\
         echo hello > /data/file\n\
         chown 999:999 /data/file /data\n\
         rm /tmp-old/delete-me\n\
         rm -rf /var/lib/old && mkdir /var/lib/old && echo new > /var/lib/old/new\n\
         echo more >> /srv/owned\n\
         test \"$(cat /etc/os-release)\" = ID=test\n\
         test -f /proc/self/status && test -c /dev/null\n\
         echo \"running as $(id -u):$(id -g)\"\n",
    )
    .unwrap();
    for p in [&script, &base] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status().unwrap();
    Fixture { dir, busybox, base, base_layers, script, copy_to_root }
}

impl Fixture {
    fn run_as_root_cmd(&self, out: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("run-as-root")
            .arg("--from-image")
            .arg(&self.base)
            .arg("--layer")
            .arg(&self.copy_to_root)
            .arg("--store-path")
            .arg(&self.busybox)
            .arg("--script")
            .arg(&self.script)
            .arg("--shell")
            .arg(self.busybox.join("bin/sh"))
            .arg("--env")
            .arg(format!("PATH={}/bin", self.busybox.display()))
            .arg("--out-layer")
            .arg(out)
            .args(["--mtime", "12345"])
            .args(extra);
        c
    }
}

fn expected_layer() -> Vec<Member> {
    vec![
        m("./", 'd', 0, 0o755, ""),
        m("./cfg/", 'd', 0, 0o755, ""),
        m("./cfg/app.conf", 'f', 0, 0o644, "x=1\n"),
        m("./data/", 'd', 999, 0o755, ""),
        m("./data/file", 'f', 999, 0o644, "hello\n"),
        m("./etc/", 'd', 0, 0o755, ""),
        m("./etc/os-release", 'f', 0, 0o644, "ID=test\n"),
        m("./etc/passwd", 'f', 0, 0o644, &format!("{BASE_PASSWD}app:x:999:999::/data:/bin/sh\n")),
        // Owned by 1234 in the base: the append keeps the owner, even with a single mapping.
        m("./srv/", 'd', 1234, 0o755, ""),
        m("./srv/owned", 'f', 1234, 0o644, "owned by 1234\nmore\n"),
        m("./tmp/", 'd', 0, 0o1777, ""),
        m("./tmp-old/", 'd', 0, 0o755, ""),
        m("./tmp-old/.wh.delete-me", 'f', 0, 0, ""),
        m("./var/", 'd', 0, 0o755, ""),
        m("./var/lib/", 'd', 0, 0o755, ""),
        m("./var/lib/old/", 'd', 0, 0o755, ""),
        m("./var/lib/old/.wh..wh..opq", 'f', 0, 0, ""),
        m("./var/lib/old/new", 'f', 0, 0o644, "new\n"),
    ]
}

/// Runs, checks success, that stdout is the file's sha256 and that stderr ends with the
/// summary; returns the layer's bytes.
fn run_ok(mut cmd: Command, out: &Path) -> Vec<u8> {
    let o = cmd.output().expect("stevedore runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run-as-root failed: {stderr}");
    let bytes = fs::read(out).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), sha256_hex(&bytes), "stdout must be the layer's sha256 only");
    assert!(stderr.contains("running as 0:0"), "{stderr}");
    bytes
}

fn check_layer(bytes: &[u8]) {
    let got = members(bytes);
    assert_eq!(got, expected_layer(), "layer members differ");
}

#[test]
fn run_as_root_as_root_then_export_round_trip() {
    if !is_root() {
        eprintln!("skipped: not root (the unprivileged path is tested by run_as_root_unprivileged)");
        return;
    }
    let f = fixture();
    let out = f.dir.path().join("layer.tar");
    let scratch = f.dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let started = std::time::Instant::now();
    let mut cmd = f.run_as_root_cmd(&out, &["--scratch"]);
    cmd.arg(&scratch);
    let bytes = run_ok(cmd, &out);
    let took = started.elapsed();
    check_layer(&bytes);
    assert_eq!(bytes.len() % 10240, 0, "padded to a tar record");
    // Deterministic: again, and with the single mapping an unprivileged builder gets.
    let again = run_ok(f.run_as_root_cmd(&out, &[]), &out);
    assert!(again == bytes, "a second run gave different bytes");
    let single = run_ok(f.run_as_root_cmd(&out, &["--id-mapping", "single"]), &out);
    assert!(single == bytes, "--id-mapping single gave different bytes");
    eprintln!("run-as-root: {} bytes in {:.0} ms", bytes.len(), took.as_secs_f64() * 1000.0);
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "scratch files left behind");

    // export of base + new layer: the image as a container would see it.
    let mut layers = f.base_layers.clone();
    layers.push(bytes);
    let image = f.dir.path().join("image.tar");
    fs::write(&image, docker_archive(&layers, "built:latest")).unwrap();
    let flat = f.dir.path().join("flat.tar");
    let o = Command::new(bin()).args(["export", "--compressor", "none", "--mtime", "7", "-o"]).arg(&flat).arg("--from-image").arg(&image).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = members(&fs::read(&flat).unwrap());
    let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "./", "./bin", "./cfg/", "./cfg/app.conf", "./data/", "./data/file", "./etc/", "./etc/group", "./etc/motd", "./etc/os-release", "./etc/passwd", "./srv/",
            "./srv/owned", "./tmp/", "./tmp-old/", "./tmp-old/stays", "./usr/", "./usr/bin/", "./var/", "./var/lib/", "./var/lib/old/", "./var/lib/old/new",
        ]
    );
    let get = |n: &str| got.iter().find(|m| m.name == n).unwrap().clone();
    assert_eq!((get("./data/file").uid, get("./data/file").gid, get("./data/file").data.as_str()), (999, 999, "hello\n"));
    assert_eq!((get("./srv/owned").uid, get("./srv/owned").data.as_str()), (1234, "owned by 1234\nmore\n"));
    assert!(get("./etc/passwd").data.ends_with("app:x:999:999::/data:/bin/sh\n"));
    assert!(got.iter().all(|m| m.mtime == 7));

    // The same image as zstd, gzip and an OCI layout flattens to the same bytes.
    let plain = fs::read(&flat).unwrap();
    let archive = fs::read(&image).unwrap();
    let zst = f.dir.path().join("image.tar.zst");
    fs::write(&zst, zstd::encode_all(&archive[..], 3).unwrap()).unwrap();
    let gz = f.dir.path().join("image.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &archive).unwrap();
    fs::write(&gz, enc.finish().unwrap()).unwrap();
    for (input, comp) in [(&zst, "gz"), (&gz, "zstd")] {
        let out = f.dir.path().join(format!("flat.{comp}"));
        let o = Command::new(bin()).args(["export", "-q", "--mtime", "7", "--compressor", comp, "-o"]).arg(&out).arg("--from-image").arg(input).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let data = fs::read(&out).unwrap();
        let mut back = Vec::new();
        if comp == "gz" {
            flate2::read::MultiGzDecoder::new(&data[..]).read_to_end(&mut back).unwrap();
        } else {
            zstd::stream::read::Decoder::new(&data[..]).unwrap().read_to_end(&mut back).unwrap();
        }
        assert!(back == plain, "export of {} differs", input.display());
    }
    cross_check_with_umoci(f.dir.path(), &image, &plain);
}

/// umoci applies layers on its own; its unpacked tree must hold the same names and contents as
/// our flattened tarball. Skipped if skopeo or umoci is missing (both are on the dev machines).
fn cross_check_with_umoci(dir: &Path, image: &Path, flat: &[u8]) {
    let have = |t: &str| Command::new(t).arg("--version").output().is_ok_and(|o| o.status.success());
    if !(have("skopeo") && have("umoci")) {
        eprintln!("skipped the umoci cross-check: skopeo or umoci is missing");
        return;
    }
    let layout = dir.join("oci");
    let st = Command::new("skopeo").arg("copy").arg("-q").arg(format!("docker-archive:{}", image.display())).arg(format!("oci:{}:x", layout.display())).status().unwrap();
    assert!(st.success(), "skopeo copy failed");
    // Our export reads the OCI layout too (gzip blobs as skopeo writes them).
    let from_oci = dir.join("flat-oci.tar");
    let o = Command::new(bin()).args(["export", "-q", "--mtime", "7", "--compressor", "none", "--from-image-name", "x", "-o"]).arg(&from_oci).arg("--from-image").arg(&layout).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs::read(&from_oci).unwrap() == flat, "export of the OCI layout differs from that of the Docker archive");
    let rootfs = dir.join("umoci-rootfs");
    let o = Command::new("umoci").args(["raw", "unpack", "--rootless", "--image"]).arg(format!("{}:x", layout.display())).arg(&rootfs).output().unwrap();
    assert!(o.status.success(), "umoci failed: {}", String::from_utf8_lossy(&o.stderr));
    let mut theirs = Vec::new();
    fn walk(root: &Path, rel: &str, out: &mut Vec<(String, String)>) {
        let mut names: Vec<_> = fs::read_dir(root.join(rel)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() { n.clone() } else { format!("{rel}/{n}") };
            let p = root.join(&r);
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.push((format!("./{r}/"), String::new()));
                walk(root, &r, out);
            } else if meta.file_type().is_symlink() {
                out.push((format!("./{r}"), fs::read_link(&p).unwrap().to_string_lossy().into_owned()));
            } else {
                out.push((format!("./{r}"), fs::read_to_string(&p).unwrap()));
            }
        }
    }
    walk(&rootfs, "", &mut theirs);
    let ours: Vec<(String, String)> = members(flat).into_iter().filter(|m| m.name != "./").map(|m| (m.name, m.data)).collect();
    assert_eq!(ours, theirs, "our flattened tree differs from umoci's");
    Command::new("chmod").args(["-R", "u+rwX"]).arg(&rootfs).status().unwrap();
}

/// Whether this kernel lets an unprivileged user create a user namespace, and if not, why.
fn userns_refusal() -> Option<String> {
    for (file, bad) in [
        ("/proc/sys/user/max_user_namespaces", "0"),
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1"),
    ] {
        if fs::read_to_string(file).is_ok_and(|v| v.trim() == bad) {
            return Some(format!("{file} is {bad}"));
        }
    }
    None
}

/// Runs `cmd` as uid/gid 65534 when we are root (setpriv), else as ourselves.
fn as_unprivileged(cmd: &Command) -> Command {
    if !is_root() {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        return c;
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(cmd.get_program()).args(cmd.get_args());
    c
}

#[test]
fn run_as_root_unprivileged() {
    let probe = if is_root() { Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-U", "true"]).output() } else { Command::new("unshare").args(["-U", "true"]).output() };
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        let why = probe.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string()).unwrap_or_else(|e| e.to_string());
        match userns_refusal() {
            Some(reason) => {
                eprintln!("skipped: the kernel refuses unprivileged user namespaces ({reason}): {why}");
                return;
            }
            None if ci() => panic!("unprivileged user namespaces fail although the kernel allows them: {why}"),
            None => {
                eprintln!("skipped: cannot create a user namespace unprivileged: {why}");
                return;
            }
        }
    }
    let f = fixture();
    let work = f.dir.path().join("unpriv");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o777)).unwrap();
    let out = work.join("layer.tar");
    // One id mapped (what a Nix build user gets): chown goes through the seccomp recorder.
    let mut cmd = f.run_as_root_cmd(&out, &["--id-mapping", "single", "--scratch"]);
    cmd.arg(&work);
    let o = as_unprivileged(&cmd).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "unprivileged run-as-root failed: {stderr}");
    assert!(stderr.contains("other owners are recorded"), "{stderr}");
    let bytes = fs::read(&out).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), sha256_hex(&bytes));
    // chown to 999 and the base's 1234 survive though only one id is mapped.
    check_layer(&bytes);
    let left: Vec<_> = fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["layer.tar"], "scratch files left behind");
    if is_root() {
        let root_out = f.dir.path().join("root-layer.tar");
        let root_bytes = run_ok(f.run_as_root_cmd(&root_out, &[]), &root_out);
        assert!(root_bytes == bytes, "the unprivileged layer differs from the root one");
    }
    // Root of a namespace that maps one id (`unshare -r`, like a rootless container): auto
    // must see that root there cannot chown, and record owners.
    let nested_out = work.join("nested.tar");
    let mut nested = f.run_as_root_cmd(&nested_out, &["--scratch"]);
    nested.arg(&work);
    let mut c = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-r"]);
        c
    } else {
        let mut c = Command::new("unshare");
        c.arg("-r");
        c
    };
    c.arg(nested.get_program()).args(nested.get_args());
    let o = c.output().unwrap();
    assert!(o.status.success(), "nested run-as-root failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other owners are recorded"));
    assert!(fs::read(&nested_out).unwrap() == bytes, "the nested layer differs");
    fs::remove_file(&nested_out).unwrap();
    // A full range through newuidmap, where this user has subordinate ids.
    let mut full = f.run_as_root_cmd(&out, &["--id-mapping", "full", "--scratch"]);
    full.arg(&work);
    let o = as_unprivileged(&full).output().unwrap();
    if o.status.success() {
        assert!(String::from_utf8_lossy(&o.stderr).contains("subordinate ids"));
        check_layer(&fs::read(&out).unwrap());
        assert!(fs::read(&out).unwrap() == bytes, "the full-range layer differs from the single-mapping one");
    } else {
        eprintln!("note: no full id range for the unprivileged user: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
}

#[test]
fn run_as_root_errors_are_one_line() {
    let f = fixture();
    let out = f.dir.path().join("never.tar");
    let failing = f.dir.path().join("fail.sh");
    fs::write(&failing, "echo doomed; exit 3\n").unwrap();
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o644)).unwrap();
    let mut cases: Vec<(Command, &str)> = Vec::new();
    let mut c = f.run_as_root_cmd(&out, &[]);
    let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
    let with = |from: &str, to: &Path| {
        let mut c = Command::new(bin());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            c.arg(a);
            if a == from {
                it.next();
                c.arg(to);
            }
        }
        c
    };
    cases.push((with("--script", &failing), "failed with exit code 3"));
    cases.push((with("--shell", Path::new("/no/such/sh")), "cannot run the shell /no/such/sh"));
    cases.push((with("--from-image", &f.dir.path().join("missing.tar")), "cannot open image"));
    cases.push((with("--out-layer", Path::new("/no/such/dir/layer.tar")), "is not a directory"));
    c.args(["--from-image-name", "nope"]);
    cases.push((c, "no image tagged nope:latest"));
    if !is_root() && Command::new("unshare").args(["-U", "true"]).status().map_or(true, |s| !s.success()) {
        eprintln!("skipped: no user namespaces here");
        return;
    }
    for (mut cmd, want) in cases {
        let o: Output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert!(!o.status.success(), "{cmd:?} succeeded");
        assert!(last.starts_with("stevedore: ") && last.contains(want), "{want:?} not in {stderr:?}");
        assert!(o.stdout.is_empty());
        assert!(!out.exists() && !PathBuf::from(format!("{}.partial", out.display())).exists());
    }
}

// ------------------------------------------------------------------------------------------
// nixdb, checked by Nix itself.

fn nix_env(cmd: &mut Command) -> &mut Command {
    cmd.env("NIX_CONFIG", "sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes").env_remove("NIX_REMOTE")
}

fn nix(args: &[&str]) -> Output {
    let mut c = Command::new(args[0]);
    nix_env(&mut c).args(&args[1..]);
    let o = c.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn stdout_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn nixdb_is_accepted_by_nix() {
    if Command::new("nix-store").arg("--version").output().is_err() {
        assert!(!ci(), "nix-store is missing, and CI needs this test to run");
        eprintln!("skipped: nix-store is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Real store paths: a content-addressed one, and a built one that references it and itself.
    fs::create_dir_all(d.join("src/sub")).unwrap();
    fs::write(d.join("src/greeting"), "hello from nixdb\n").unwrap();
    fs::write(d.join("src/sub/run"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(d.join("src/sub/run"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("greeting", d.join("src/link")).unwrap();
    let mut add = Command::new("nix-store");
    nix_env(&mut add).arg("--add").arg(d.join("src"));
    let added = add.output().unwrap();
    if !added.status.success() {
        // e.g. not root and no daemon: the store cannot be written.
        let why = String::from_utf8_lossy(&added.stderr).trim().to_string();
        assert!(!ci(), "nix-store --add failed, and CI needs this test to run: {why}");
        eprintln!("skipped: cannot add to the Nix store here: {why}");
        return;
    }
    let b = stdout_line(&added);
    // The graph's builder ends in `exit 0`: bash runs a script's last command in its own place,
    // and cp closes stdout before it exits, which Nix may answer with SIGKILL.
    let expr = format!(
        r#"let
  b = builtins.storePath "{b}";
  a = builtins.derivation {{ name = "stevedore-nixdb-a"; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" "/bin/mkdir $out; echo $b > $out/ref; echo $out > $out/self" ]; inherit b; }};
in {{ inherit a; graph = builtins.derivation {{ name = "stevedore-nixdb-graph"; system = builtins.currentSystem; builder = "/bin/bash";
     __structuredAttrs = true; exportReferencesGraph.closure = [ a ];
     args = [ "-c" "source .attrs.sh; /bin/cp .attrs.json \${{outputs[out]}}; exit 0" ]; }}; }}"#
    );
    fs::write(d.join("closure.nix"), expr).unwrap();
    let built = nix(&["nix-build", "--no-out-link", d.join("closure.nix").to_str().unwrap()]);
    let outs: Vec<String> = String::from_utf8_lossy(&built.stdout).lines().map(str::to_owned).collect();
    let (a, graph) = (outs.iter().find(|p| p.ends_with("-stevedore-nixdb-a")).unwrap().clone(), outs.iter().find(|p| p.ends_with("-graph")).unwrap().clone());

    let nixdb = |root: &Path, input: &Path, key: bool| {
        let mut c = Command::new(bin());
        c.arg("nixdb").arg("--root").arg(root).arg("--closure").arg(input).args(["--roots", &a, "-q"]);
        if key {
            c.args(["--key", "closure"]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "nixdb failed: {}", String::from_utf8_lossy(&o.stderr));
        fs::read(root.join("nix/var/nix/db/db.sqlite")).unwrap()
    };
    let root = d.join("root");
    let db = nixdb(&root, Path::new(&graph), true);
    // Reproducible, and nothing but the database, the schema file and the root link.
    assert!(nixdb(&d.join("again"), Path::new(&graph), true) == db, "two runs gave different databases");
    let mut files: Vec<String> = Vec::new();
    for e in walk_all(&root) {
        files.push(e.strip_prefix(&root).unwrap().to_string_lossy().into_owned());
    }
    files.sort();
    let base = Path::new(&a).file_name().unwrap().to_string_lossy().into_owned();
    let want_link = format!("nix/var/nix/gcroots/docker/{base}");
    assert_eq!(files, ["nix/var/nix/db/db.sqlite", "nix/var/nix/db/schema", want_link.as_str()]);
    assert_eq!(fs::read_to_string(root.join("nix/var/nix/db/schema")).unwrap(), "10");
    assert_eq!(fs::read_link(root.join(&want_link)).unwrap(), Path::new(&a));
    // closureInfo's registration format gives the same bytes.
    let attrs: Value = serde_json::from_slice(&fs::read(&graph).unwrap()).unwrap();
    let mut reg = String::new();
    for p in attrs["closure"].as_array().unwrap() {
        let refs: Vec<&str> = p["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        reg += &format!("{}\n{}\n{}\n\n{}\n", p["path"].as_str().unwrap(), p["narHash"].as_str().unwrap(), p["narSize"], refs.len());
        for r in refs {
            reg += &format!("{r}\n");
        }
    }
    fs::write(d.join("registration"), reg).unwrap();
    assert!(nixdb(&d.join("reg"), &d.join("registration"), false) == db, "registration input gave other bytes");

    // Nix itself: put the paths in a chroot store with our database and check everything.
    fs::create_dir_all(root.join("nix/store")).unwrap();
    let b_path = attrs["closure"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap().to_string()).find(|p| *p != a).unwrap();
    let st = Command::new("cp").arg("-a").arg(&a).arg(&b_path).arg(root.join("nix/store")).status().unwrap();
    assert!(st.success());
    let store = format!("local?root={}", root.display());
    let verify = nix(&["nix-store", "--store", &store, "--verify", "--check-contents"]);
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(!said.contains("error") && !said.contains("modified") && !said.contains("disappeared"), "{said}");
    let info = |store: Option<&str>| -> BTreeMap<String, Value> {
        let mut args = vec!["nix", "path-info", "--json", "-r", a.as_str()];
        if let Some(s) = store {
            args.extend(["--store", s]);
        }
        path_infos(serde_json::from_slice(&nix(&args).stdout).unwrap())
    };
    assert_eq!(info(Some(&store)), info(None), "path info differs from the real store's");
    let dead = nix(&["nix-store", "--store", &store, "--gc", "--print-dead"]);
    assert_eq!(stdout_line(&dead), "", "the GC root does not keep the closure alive");
    let roots = stdout_line(&nix(&["nix-store", "--store", &store, "--gc", "--print-roots"]));
    assert!(roots.contains(&want_link), "{roots}");
}

/// `nix path-info --json` output as path -> {narHash, narSize, references}: a list of objects
/// with a `path` before Nix 2.19, an object keyed by path since.
fn path_infos(v: Value) -> BTreeMap<String, Value> {
    let keep = |info: &Value| -> Value {
        let mut o = info.as_object().unwrap_or_else(|| panic!("path info is not an object: {info}")).clone();
        o.retain(|k, _| ["narHash", "narSize", "references"].contains(&k.as_str()));
        Value::Object(o)
    };
    match v {
        Value::Array(list) => list.iter().map(|p| (p["path"].as_str().expect("path info without a path").to_string(), keep(p))).collect(),
        Value::Object(map) => map.iter().map(|(path, info)| (path.clone(), keep(info))).collect(),
        other => panic!("nix path-info --json gave neither a list nor an object: {other}"),
    }
}

#[test]
fn path_info_json_of_every_nix_version() {
    let a = "/nix/store/0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-a";
    let b = "/nix/store/1c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-b";
    let before_2_19 = json!([
        {"path": a, "narHash": "sha256-AAAA", "narSize": 120, "references": [a, b], "registrationTime": 1, "valid": true},
        {"path": b, "narHash": "sha256-BBBB", "narSize": 80, "references": [], "ca": "fixed:r:sha256:xyz"}
    ]);
    let since_2_19 = json!({
        b: {"narHash": "sha256-BBBB", "narSize": 80, "references": [], "ca": "fixed:r:sha256:xyz", "signatures": []},
        a: {"narHash": "sha256-AAAA", "narSize": 120, "references": [a, b], "deriver": null, "ultimate": true}
    });
    let want = path_infos(before_2_19);
    assert_eq!(want.len(), 2);
    assert_eq!(want[a], json!({"narHash": "sha256-AAAA", "narSize": 120, "references": [a, b]}));
    assert_eq!(path_infos(since_2_19), want);
}

fn walk_all(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk_all(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every way to name a chown target, with one id mapped (the seccomp recorder resolves each as
/// the script would): relative to the cwd, recursive, through an absolute symlink, without
/// following one, through the caller's /proc/self, and via a descriptor; and owners recorded
/// for a deleted file do not pass to the next file given its inode number.
#[test]
fn recorded_chown_targets() {
    if !is_root() && Command::new("unshare").args(["-U", "true"]).status().map_or(true, |s| !s.success()) {
        eprintln!("skipped: no user namespaces here");
        return;
    }
    let f = fixture();
    let script = f.dir.path().join("chowns.sh");
    fs::write(
        &script,
        "set -e\n\
         mkdir -p /x/sub && cd /x && touch a b c sub/d\n\
         chown 42:43 a\n\
         chown -R 7:8 sub\n\
         ln -s /x/b /x/abs-link && chown 50:51 /x/abs-link\n\
         ln -s c /x/rel-link && chown -h 60:61 /x/rel-link\n\
         exec 3</srv && chown 70:71 /proc/self/fd/3\n\
         chown :9 c\n\
         if chown 80 /no/such/file 2>/dev/null; then exit 1; fi\n\
         rm /srv/owned && echo x > /srv/new1\n\
         touch /gone && chown 4321:4321 /gone && rm /gone && echo y > /born\n\
         test \"$(umask)\" = 0022\n\
         grep -q '^SigIgn:[[:space:]]*0*$' /proc/self/status\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    // extraCommands run after the script, from the root filesystem, outside the chroot.
    let extra = f.dir.path().join("extra.sh");
    fs::write(&extra, "mkdir -p var/log && echo extra > var/log/x && chmod 1777 var/log\n").unwrap();
    fs::set_permissions(&extra, fs::Permissions::from_mode(0o644)).unwrap();
    let out = f.dir.path().join("chowns.tar");
    // Under a caller's umask 077 and ignored SIGPIPE (Rust's default), the script still gets
    // umask 022 and default signal handling.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 077; exec \"$0\" \"$@\""]).arg(bin());
    cmd.arg("run-as-root").arg("--extra-commands").arg(&extra).arg("--from-image").arg(&f.base).arg("--store-path").arg(&f.busybox).arg("--script").arg(&script);
    cmd.arg("--shell").arg(f.busybox.join("bin/sh")).arg("--env").arg(format!("PATH={}/bin", f.busybox.display()));
    cmd.arg("--out-layer").arg(&out).args(["--mtime", "12345", "--id-mapping", "single", "-q"]);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let owners: Vec<(String, u64, u64)> = members(&fs::read(&out).unwrap()).into_iter().map(|m| (m.name, m.uid, m.gid)).collect();
    let want: Vec<(String, u64, u64)> = [
        ("./", 0, 0),
        // Both reuse the inode of a file with a recorded owner, which must not carry over.
        ("./born", 0, 0),
        ("./srv/", 70, 71),
        ("./srv/.wh.owned", 0, 0),
        ("./srv/new1", 0, 0),
        ("./tmp/", 0, 0),
        ("./var/", 0, 0),
        ("./var/log/", 0, 0),
        ("./var/log/x", 0, 0),
        ("./x/", 0, 0),
        ("./x/a", 42, 43),
        ("./x/abs-link", 0, 0),
        ("./x/b", 50, 51),
        ("./x/c", 0, 9),
        ("./x/rel-link", 60, 61),
        ("./x/sub/", 7, 8),
        ("./x/sub/d", 7, 8),
    ]
    .iter()
    .map(|(n, u, g)| (n.to_string(), *u, *g))
    .collect();
    assert_eq!(owners, want);
}

/// The real use: run-as-root as the builder of a sandboxed Nix build, where the builder is an
/// unprivileged uid in Nix's own user namespace. The fixture sits at a fixed path so its store
/// paths are reused; `nix-build --check` then rebuilds and compares the bytes each time.
#[test]
fn run_as_root_in_the_nix_sandbox() {
    if Command::new("nix-build").arg("--version").output().is_err() {
        assert!(!ci(), "nix-build is missing, and CI needs this test to run");
        eprintln!("skipped: nix-build is not installed");
        return;
    }
    let dir = PathBuf::from("/tmp/stevedore-test-fixtures/root-steps-nix");
    let busybox = dir.join("0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-busybox");
    if !dir.join("base.tar").exists() {
        let f = fixture();
        fs::create_dir_all(&dir).unwrap();
        Command::new("cp").arg("-a").arg(&f.busybox).arg(&busybox).status().unwrap();
        fs::write(dir.join("base.tar.partial"), docker_archive(&f.base_layers, "base:latest")).unwrap();
        fs::rename(dir.join("base.tar.partial"), dir.join("base.tar")).unwrap();
    }
    let script = "set -e\nmkdir -p /data\necho 'app:x:999:999::/data:/bin/sh' >> /etc/passwd\necho hello > /data/file\n\
                  chown 999:999 /data/file /data\nrm /tmp-old/delete-me\nrm -rf /var/lib/old && mkdir /var/lib/old && echo new > /var/lib/old/new\n\
                  echo more >> /srv/owned\necho \"in the sandbox: $(id -u):$(id -g)\"\n";
    let bin = bin();
    let expr = format!(
        r#"let bb = builtins.path {{ path = {bb}; name = "busybox"; }}; in derivation {{
  name = "stevedore-root-layer"; system = builtins.currentSystem; builder = "{bin}";
  args = [ "run-as-root" "--from-image" (builtins.path {{ path = {base}; name = "base.tar"; }}) "--store-path" bb
           "--script" (builtins.toFile "run-as-root.sh" {script:?}) "--shell" "${{bb}}/bin/sh" "--env" "PATH=${{bb}}/bin"
           "--mtime" "12345" "--out-layer" (placeholder "out") ];
}}"#,
        bb = busybox.display(),
        base = dir.join("base.tar").display(),
        bin = bin.display(),
    );
    let nix_file = tempfile::NamedTempFile::new().unwrap();
    fs::write(nix_file.path(), expr).unwrap();
    // The test binary links against the host's glibc, and is no store path: let the sandbox see them.
    let config = format!(
        "sandbox = true\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command\nextra-sandbox-paths = /lib64 /lib /usr/lib {}",
        bin.parent().unwrap().display()
    );
    let build = |check: bool| {
        let mut c = Command::new("nix-build");
        c.env("NIX_CONFIG", &config).env_remove("NIX_REMOTE").arg("--no-out-link").arg(nix_file.path());
        if check {
            c.arg("--check");
        }
        c.output().unwrap()
    };
    let o = build(false);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        // If stevedore never got to say anything, the sandbox itself could not start it.
        let started = stderr.contains("stevedore:") || stderr.contains("User namespace:");
        assert!(!started, "the sandboxed build failed: {stderr}");
        eprintln!("skipped: sandboxed Nix builds do not run here: {}", stderr.lines().last().unwrap_or(""));
        return;
    }
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // A real rebuild, compared bit for bit with the first by Nix.
    let o = build(true);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nix-build --check failed (not reproducible?): {stderr}");
    assert!(stderr.contains("in the sandbox: 0:0") && stderr.contains("other owners are recorded"), "{stderr}");
    let want: Vec<Member> = expected_layer().into_iter().filter(|m| !m.name.starts_with("./cfg") && m.name != "./etc/os-release").collect();
    assert_eq!(members(&fs::read(&out).unwrap()), want);
}
