//! Partial pulls of zstd:chunked layers: podman 5 pulls image A, then image B (A with one file
//! changed) from a real registry (docker-registry, distribution v2.8) on 127.0.0.1, through a
//! recording proxy that counts what every request fetched. B's changed layer must cost a small
//! fraction of its size (podman reads the layer's TOC by Range requests and fetches only the
//! files it does not already have), and B's files must be byte for byte those of a full pull.
//!
//! The images come from one function each: podman's own (`podman push --compression-format
//! zstd:chunked`), which shows the harness measures what it should, and stevedore's (`stevedore
//! push --compressor zstd:chunked`, B with one store path rebuilt, one file in it changed), which
//! must fetch no more than B's TOC, tar-split and that one file's frames.
//!
//! Needs podman >= 5 (partial pulls; podman 4.3 of Debian 12 has none), docker-registry, skopeo
//! and busybox-static. Elsewhere the test is skipped with a message; on the Debian 13 stack
//! (STEVEDORE_STACK=debian13, tests/modern) a missing tool is a failure.
//!
//! Traps met while writing it (podman 5.4.2, containers-storage 1.57):
//! - Debian 13 ships no /etc/containers/storage.conf, and partial pulls are off by default:
//!   each store here has its own storage.conf (CONTAINERS_STORAGE_CONF) with
//!   `pull_options = {enable_partial_images = "true", ...}` and its own graphroot, runroot and
//!   libpod tmpdir, so nothing touches the machine's store or another test's.
//! - A partial pull that fails is an error, not a fallback to a full pull. podman's own
//!   zstd:chunked output of some tars with record padding past the end blocks (GNU tar's and
//!   CPython tarfile's 10 KiB records, seen on a 10 MiB tree, not on small ones) fails so:
//!   "tar-split and TOC data is inconsistent: decoding a tar header from a tar-split entry:
//!   unexpected EOF" (tar-split's IterateHeaders reads each segment, past the previous file's
//!   padding, as a tar header; a short run of zeros there is an error). The layer tars here end
//!   at their two end blocks.
//! - The debug log (`--log-level=debug`) tells a partial pull ("Created zstd:chunked differ for
//!   blob", "Retrieved partial blob") from a failed one ("Could not create zstd:chunked differ")
//!   and from a layer with no TOC, pulled whole ("Failed to retrieve partial blob: no TOC found
//!   and convert_images is not configured").
//! - podman tries HTTPS first even with --tls-verify=false: the proxy gets a TLS hello first.

mod common;

use common::{Registry, Server};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// podman >= 5, docker-registry, skopeo and a static busybox; or a message and false (a
/// failure instead on the Debian 13 stack, whose root must have them all).
fn have_tools() -> bool {
    let modern = std::env::var("STEVEDORE_STACK").as_deref() == Ok("debian13");
    let version = Command::new("podman").arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let major: Option<u32> = version.as_deref().and_then(|v| v.rsplit(' ').next()?.split('.').next()?.parse().ok());
    let others = ["docker-registry", "skopeo"].iter().all(|t| Command::new(t).arg("--version").output().is_ok()) && Path::new("/bin/busybox").exists();
    let ok = major.is_some_and(|m| m >= 5) && others;
    if !ok {
        let why = format!(
            "partial pulls of zstd:chunked need podman >= 5 (found {}), docker-registry, skopeo and busybox-static (all found: {others})",
            version.as_deref().unwrap_or("no podman")
        );
        assert!(!modern, "the Debian 13 root must have them: {why}");
        eprintln!("{why}: chunked tests skipped");
    }
    ok
}

/// One request that went through the proxy, and what it cost.
#[derive(Clone, Debug)]
struct Exchange {
    method: String,
    path: String,
    /// The request's Range header (`bytes=a-b,c-d,...`), if any.
    range: Option<String>,
    /// The response's status, 0 if the registry sent none.
    status: u16,
    /// The response's Content-Type (multipart/byteranges for a multi-range answer).
    content_type: Option<String>,
    /// Bytes of response body sent to the client (after the head; for a multipart/byteranges
    /// answer, its boundaries and part heads too: what crossed the wire).
    body_bytes: u64,
}

impl Exchange {
    /// The byte ranges asked for: 0 for a whole-blob GET.
    fn ranges(&self) -> usize {
        self.range.as_deref().map_or(0, |r| r.trim_start_matches("bytes=").split(',').count())
    }

    fn is_blob(&self, digest: &str) -> bool {
        self.path.split('?').next().unwrap().ends_with(&format!("/blobs/{digest}"))
    }
}

/// An HTTP proxy on 127.0.0.1 in front of a registry that forwards every request as it came
/// (method, path, headers, Range, body) and records it. One request per connection: the
/// proxy asks the registry for `Connection: close` and says so to the client, so that a
/// response ends where the registry's connection does, whatever its framing (Content-Length,
/// chunked, HEAD, multipart/byteranges), and the client (Go's net/http) opens a new connection
/// per request. A connection that does not start with an HTTP request (podman first tries
/// TLS, even with --tls-verify=false) is closed unanswered and not recorded.
struct RecordingProxy {
    port: u16,
    log: Arc<Mutex<Vec<Exchange>>>,
    _server: Server,
}

impl RecordingProxy {
    fn start(upstream: u16) -> RecordingProxy {
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let server = Server::start(move |conn| {
            if let Some(x) = forward(conn, upstream) {
                log2.lock().unwrap().push(x);
            }
        });
        RecordingProxy { port: server.port, log, _server: server }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What was recorded since the last reset, and a fresh start.
    fn reset(&self) -> Vec<Exchange> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// What was recorded since the last reset.
    fn exchanges(&self) -> Vec<Exchange> {
        self.log.lock().unwrap().clone()
    }
}

/// Bytes of response body sent for blob `digest` (GETs; HEADs send none).
fn blob_bytes(log: &[Exchange], digest: &str) -> u64 {
    log.iter().filter(|x| x.is_blob(digest)).map(|x| x.body_bytes).sum()
}

/// Bytes of response body sent for everything.
fn total_bytes(log: &[Exchange]) -> u64 {
    log.iter().map(|x| x.body_bytes).sum()
}

/// A request's or response's first line and headers, up to the blank line; None at EOF or on
/// anything that is not HTTP/1.x text.
fn read_head(r: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    let first = first.trim_end().to_string();
    if first.is_empty() || !first.contains("HTTP/1.") {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            return Some((first, headers));
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

/// A head with `Connection: close` in place of the hop-by-hop connection headers.
fn write_head(w: &mut impl Write, first: &str, headers: &[(String, String)]) -> std::io::Result<()> {
    let mut out = format!("{first}\r\n");
    for (k, v) in headers {
        if !["connection", "keep-alive", "proxy-connection"].contains(&k.to_ascii_lowercase().as_str()) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    w.write_all(out.as_bytes())
}

/// Serves one client connection: its one request to the registry and the answer back.
fn forward(client: TcpStream, upstream: u16) -> Option<Exchange> {
    client.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut from_client = BufReader::new(client.try_clone().ok()?);
    let (line, headers) = read_head(&mut from_client)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let range = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("range")).map(|(_, v)| v.clone());

    let server = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    server.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut to_server = server.try_clone().ok()?;
    write_head(&mut to_server, &line, &headers).ok()?;
    // A request body (none in a pull), whatever its framing: what the client sends next goes
    // to the registry as it comes, until either side closes.
    let buffered = from_client.buffer().to_vec();
    let pump = std::thread::spawn(move || {
        if to_server.write_all(&buffered).is_ok() {
            let _ = std::io::copy(&mut from_client, &mut to_server);
        }
    });

    let mut from_server = BufReader::new(server.try_clone().ok()?);
    let mut x = Exchange { method, path, range, status: 0, content_type: None, body_bytes: 0 };
    let mut to_client = client.try_clone().ok()?;
    if let Some((status_line, headers)) = read_head(&mut from_server) {
        x.status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        x.content_type = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.clone());
        if write_head(&mut to_client, &status_line, &headers).is_ok() {
            // The registry closes after the body (Connection: close): all it sends is body.
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from_server.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        x.body_bytes += n as u64;
                    }
                }
            }
        }
    }
    let _ = to_client.flush();
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = pump.join();
    Some(x)
}

/// A private containers-storage (graphroot, runroot, libpod tmpdir) in a temporary directory,
/// with partial pulls on or off, and podman commands that use it and nothing of the machine's.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new(partial: bool) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // use_hard_links = "false": files found in other layers are copied, not linked, so
        // layers stay independent; ostree_repos = "": no ostree lookups.
        let conf = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\n[storage.options]\n\
             pull_options = {{enable_partial_images = \"{partial}\", use_hard_links = \"false\", ostree_repos = \"\"}}\n",
            p.join("graph").display(),
            p.join("run").display()
        );
        fs::write(p.join("storage.conf"), conf).unwrap();
        // No search registries, no mirrors of the machine's: names here are fully qualified.
        fs::write(p.join("registries.conf"), "unqualified-search-registries = []\n").unwrap();
        fs::create_dir_all(p.join("tmp")).unwrap();
        Store { dir }
    }

    fn podman(&self) -> Command {
        let p = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_STORAGE_CONF", p.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", p.join("registries.conf"))
            .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
            // runc: crun fails on these hosts' hybrid cgroups (../shared/nix/README.md).
            .args(["--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(p.join("tmp"));
        c
    }

    /// `podman ARGS`'s stdout; stderr too with `debug`, which passes `--log-level=debug`.
    fn run(&self, args: &[&str], debug: bool) -> (String, String) {
        let mut c = self.podman();
        if debug {
            c.arg("--log-level=debug");
        }
        c.args(args);
        let out = c.output().expect("podman runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{c:?} failed: {}", tail(&stderr, 40));
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    }

    /// Pulls `image` (plain HTTP) with a debug log, and returns the log.
    fn pull(&self, image: &str) -> String {
        self.run(&["pull", "--tls-verify=false", image], true).1
    }

    /// The image's merged tree: path -> (kind, mode, content or link target hash).
    fn tree(&self, image: &str) -> BTreeMap<String, String> {
        let (mnt, _) = self.run(&["image", "mount", image], false);
        let tree = walk(Path::new(mnt.trim()));
        self.run(&["image", "unmount", image], false);
        tree
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Unmounts the layers and frees the store's files (overlay mounts would block removal).
        let _ = self.podman().args(["system", "reset", "--force"]).output();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn walk(root: &Path) -> BTreeMap<String, String> {
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let m = fs::symlink_metadata(&p).unwrap();
            let name = p.strip_prefix(root).unwrap().display().to_string();
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                go(root, &p, out);
                "dir".to_string()
            } else {
                format!("file {}", common::sha256_hex(&fs::read(&p).unwrap()))
            };
            out.insert(name, format!("{what} {mode:o} {}:{}", m.uid(), m.gid()));
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// Two images in the registry, by `repo:tag` (no host: they are pulled through the proxy), the
/// digests and sizes of B's layers that A does not have, and a command whose output, in a
/// container of B, shows the changed files.
struct Pair {
    a: String,
    b: String,
    changed: Vec<(String, u64)>,
    run: Vec<String>,
    /// Directories the layers hold no entry for (the parents of a store dir other than
    /// /nix/store, as in nixpkgs' layers): a full pull creates them 0755, a partial one mode 0.
    implicit_dirs: Vec<String>,
    /// The most a partial pull of B after A may fetch, if the test knows it exactly.
    most: Option<u64>,
}

/// An image's manifest in the registry (`skopeo inspect --raw`, plain HTTP).
fn manifest(reg: &Registry, name: &str) -> Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/{name}", reg.addr())])
        .output()
        .expect("skopeo runs");
    assert!(out.status.success(), "skopeo inspect {name}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Pair for `a` and `b` as the registry has them, checking that every layer of both is
/// zstd:chunked (a zstd layer whose descriptor has the TOC's position).
fn pair_from_registry(reg: &Registry, a: &str, b: &str, run: &[&str]) -> Pair {
    let (ma, mb) = (manifest(reg, a), manifest(reg, b));
    for (name, m) in [(a, &ma), (b, &mb)] {
        for l in m["layers"].as_array().unwrap() {
            assert!(l["mediaType"].as_str().unwrap().ends_with("+zstd"), "{name}: not a zstd layer: {l}");
            assert!(
                l["annotations"]["io.github.containers.zstd-chunked.manifest-position"].is_string(),
                "{name}: a layer without the zstd:chunked annotations: {l}"
            );
        }
    }
    let in_a: Vec<&Value> = ma["layers"].as_array().unwrap().iter().map(|l| &l["digest"]).collect();
    let changed: Vec<(String, u64)> = mb["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| !in_a.contains(&&l["digest"]))
        .map(|l| (l["digest"].as_str().unwrap().to_string(), l["size"].as_u64().unwrap()))
        .collect();
    assert!(!changed.is_empty(), "B has no layer that A lacks");
    Pair { a: a.to_string(), b: b.to_string(), changed, run: run.iter().map(|s| s.to_string()).collect(), implicit_dirs: Vec::new(), most: None }
}

/// Pseudo-random, incompressible bytes (xorshift64*), the same for the same seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A root file system tar: busybox with /bin/sh and /bin/sha256sum, eight files of 1 MiB of
/// noise, and two files B changes, apart (so that B's pull asks for two ranges in one request,
/// answered as multipart/byteranges): /data/0-changing (256 KiB of noise from `seed`) before the
/// big files, /data/z-changing (64 KiB) after them. The tar crate ends the archive at its two
/// zero blocks, with no record padding (see the traps above).
fn rootfs_tar(seed: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1);
        h.set_cksum();
        h
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, data: &[u8]| {
        b.append_data(&mut header(tar::EntryType::Regular, mode, data.len() as u64), name, data).unwrap();
    };
    for d in ["bin/", "data/", "etc/"] {
        b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), d, std::io::empty()).unwrap();
    }
    file(&mut b, "bin/busybox", 0o755, &fs::read("/bin/busybox").unwrap());
    for l in ["bin/sh", "bin/sha256sum"] {
        b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), l, "busybox").unwrap();
    }
    file(&mut b, "data/0-changing", 0o644, &noise(seed, 256 << 10));
    for i in 0..8 {
        file(&mut b, &format!("data/big{i}"), 0o644, &noise(100 + i, 1 << 20));
    }
    file(&mut b, "data/z-changing", 0o600, &noise(seed + 1000, 64 << 10));
    file(&mut b, "etc/motd", 0o644, b"hello\n");
    b.into_inner().unwrap()
}

/// Images made by podman: one-layer A and B (`podman import` of rootfs_tar, B with the two
/// changing files different), pushed straight to the registry as zstd:chunked by podman.
fn push_pair_podman(reg: &Registry, work: &Path) -> Pair {
    let store = Store::new(false);
    for (name, seed) in [("a", 1), ("b", 2)] {
        let tar = work.join(format!("{name}.tar"));
        fs::write(&tar, rootfs_tar(seed)).unwrap();
        let local = format!("localhost/chunked/{name}:1");
        store.run(&["import", tar.to_str().unwrap(), &local], false);
        let remote = format!("{}/chunked/{name}:1", reg.addr());
        store.run(&["push", "--compression-format", "zstd:chunked", "--tls-verify=false", &local, &remote], false);
    }
    pair_from_registry(reg, "chunked/a:1", "chunked/b:1", &["/bin/sha256sum", "/data/0-changing", "/data/big3", "/data/z-changing"])
}

/// Images made by stevedore (`stevedore push --compressor zstd:chunked`, the debug binary cargo
/// built for the tests): one layer per store
/// path, a static busybox, two paths of 1 MiB noise files, and in B one of those rebuilt as a
/// Nix rebuild would be: a new store path name, the same files but for one changed file (so the
/// partial pull finds the others by their digests under another name). None, with a message,
/// while stevedore has no zstd:chunked compressor (remove that once it has).
fn push_pair_stevedore(reg: &Registry, work: &Path) -> Option<Pair> {
    let store = work.join("store");
    let path = |name: &str, files: Vec<(String, Vec<u8>, u32)>| {
        let dir = store.join(name);
        for (f, data, mode) in files {
            let p = dir.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, data).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        dir.to_str().unwrap().to_string()
    };
    let busybox = path("4bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox", vec![("bin/busybox".into(), fs::read("/bin/busybox").unwrap(), 0o555)]);
    let other = path("5ccccccccccccccccccccccccccccccc-other", (0..4).map(|i| (format!("share/o{i}"), noise(200 + i, 1 << 20), 0o444)).collect());
    let app = |name: &str, seed: u64| {
        let mut files: Vec<_> = (0..4).map(|i| (format!("lib/big{i}"), noise(300 + i, 1 << 20), 0o444)).collect();
        files.push(("bin/changing".into(), noise(seed, 256 << 10), 0o555));
        path(name, files)
    };
    let app_a = app("1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-app-1.0", 1);
    let app_b = app("2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-app-1.1", 2);
    for (name, app) in [("a", &app_a), ("b", &app_b)] {
        let mut conf = common::base_conf(work, vec![vec![busybox.clone()], vec![other.clone()], vec![app.clone()]]);
        conf["store_dir"] = serde_json::json!(store);
        conf["repo_tag"] = serde_json::json!(format!("chunked-stevedore/{name}:1"));
        let conf = common::write_json(work, &format!("{name}.json"), &conf);
        let dest = format!("docker://{}/chunked-stevedore/{name}:1", reg.addr());
        let out = Command::new(common::bin())
            .arg("push")
            .arg(&conf)
            .args([&dest, "--insecure", "--compressor", "zstd:chunked"])
            .env("HOME", work)
            .env("XDG_CACHE_HOME", work.join("cache"))
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .stdin(Stdio::null())
            .output()
            .expect("stevedore runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "stevedore push {name}: {stderr}");
    }
    let bb = format!("{busybox}/bin/busybox");
    let run = [bb.as_str(), "sha256sum", &format!("{app_b}/bin/changing"), &format!("{app_b}/lib/big2"), &format!("{other}/share/o1")];
    let mut pair = pair_from_registry(reg, "chunked-stevedore/a:1", "chunked-stevedore/b:1", &run);
    pair.implicit_dirs = store.ancestors().filter(|p| p.parent().is_some()).map(|p| p.strip_prefix("/").unwrap().display().to_string()).collect();
    // Exactly what must be fetched: B's changed layer's TOC and tar-split, and the frames of
    // the one file no layer of A has (bin/changing); a little more for the multipart framing.
    let tocs = |image: &str| -> Vec<(Value, u64)> {
        let m = manifest(reg, image);
        let repo = image.split(':').next().unwrap().to_string();
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let pos = |key: &str| -> Vec<usize> {
                    l["annotations"][format!("io.github.containers.zstd-chunked.{key}-position")].as_str().unwrap().split(':').map(|n| n.parse().unwrap()).collect()
                };
                let (toc, split) = (pos("manifest"), pos("tarsplit"));
                let blob = common::http_get(reg.port, &format!("/v2/{repo}/blobs/{}", l["digest"].as_str().unwrap()));
                let toc_json = zstd::decode_all(&blob[toc[0]..toc[0] + toc[1]]).unwrap();
                (serde_json::from_slice(&toc_json).unwrap(), (toc[1] + split[1]) as u64)
            })
            .collect()
    };
    let have: std::collections::HashSet<String> =
        tocs(&pair.a).iter().flat_map(|(t, _)| t["entries"].as_array().unwrap().iter().filter_map(|e| e["digest"].as_str().map(String::from)).collect::<Vec<_>>()).collect();
    let mut most = 0;
    let mut new_files = Vec::new();
    for (toc, meta) in tocs(&pair.b) {
        let entries = toc["entries"].as_array().unwrap();
        let missing: Vec<&Value> = entries.iter().filter(|e| e["digest"].as_str().is_some_and(|d| !have.contains(d))).collect();
        if missing.is_empty() {
            continue;
        }
        most += meta + 2048;
        for e in missing {
            most += e["endOffset"].as_u64().unwrap() - e["offset"].as_u64().unwrap();
            new_files.push(e["name"].as_str().unwrap().to_string());
        }
    }
    assert!(new_files.len() == 1 && new_files[0].ends_with("-app-1.1/bin/changing"), "{new_files:?}");
    pair.most = Some(most);
    Some(pair)
}

/// Lines of a podman debug log about chunked and partial pulls, for messages.
fn partial_lines(log: &str) -> String {
    let keys = ["zstd:chunked", "partial", "differ", "level=warning", "level=error"];
    log.lines().filter(|l| keys.iter().any(|k| l.contains(k))).collect::<Vec<_>>().join("\n")
}

/// A fresh store with partial pulls pulls A then B through the recording proxy: B's changed
/// layers must be pulled partially and cost a small fraction of their size, and B's files must
/// be those of a full pull into another fresh store.
fn check_partial_pull(reg: &Registry, pair: &Pair) {
    let proxy = RecordingProxy::start(reg.port);
    let (a, b) = (format!("{}/{}", proxy.addr(), pair.a), format!("{}/{}", proxy.addr(), pair.b));
    let store = Store::new(true);

    let log = store.pull(&a);
    let seen = proxy.reset();
    eprintln!("pull A: {} requests, {} bytes ({} ranges)", seen.len(), total_bytes(&seen), seen.iter().map(Exchange::ranges).sum::<usize>());
    assert!(log.contains("Retrieved partial blob"), "A was not pulled partially:\n{}", partial_lines(&log));

    let log = store.pull(&b);
    let seen = proxy.exchanges();
    for x in &seen {
        let ranges = if x.range.is_some() { format!(" [{} ranges]", x.ranges()) } else { String::new() };
        let kind = x.content_type.as_deref().unwrap_or("-").split(';').next().unwrap();
        eprintln!("  {} {}{ranges} -> {} {kind}, {} bytes", x.method, x.path, x.status, x.body_bytes);
    }
    let mut fetched = 0;
    let mut size = 0;
    for (digest, layer_size) in &pair.changed {
        let blob: Vec<&Exchange> = seen.iter().filter(|x| x.is_blob(digest)).collect();
        let bytes = blob_bytes(&seen, digest);
        eprintln!(
            "pull B after A: layer {digest} of {layer_size} bytes: fetched {bytes} bytes ({:.1} %) in {} requests, {} byte ranges",
            100.0 * bytes as f64 / *layer_size as f64,
            blob.len(),
            blob.iter().map(|x| x.ranges()).sum::<usize>()
        );
        assert!(
            log.contains(&format!("Retrieved partial blob {digest}")),
            "B's layer {digest} was not pulled partially:\n{}",
            partial_lines(&log)
        );
        assert!(blob.iter().all(|x| x.range.is_some() && x.status == 206), "a whole-blob GET of {digest}: {blob:?}");
        fetched += bytes;
        size += layer_size;
    }
    eprintln!("pull B after A: {} requests, {} bytes in all", seen.len(), total_bytes(&seen));
    // What changed is 256 KiB (and 64 KiB) of noise in a layer of 4 to 10 MiB: what is fetched is
    // that, the TOC and the tar-split, well under a fifth of the layer.
    assert!(fetched * 5 < size, "fetched {fetched} of {size} bytes of B's changed layers: not a partial pull");
    if let Some(most) = pair.most {
        assert!(fetched <= most, "fetched {fetched} bytes, more than the TOC, tar-split and changed file's frames ({most})");
    }

    let partial_tree = store.tree(&b);
    let full = Store::new(false);
    let log = full.pull(&b);
    assert!(!log.contains("Retrieved partial blob"), "a store without partial pulls pulled partially");
    let mut full_tree = full.tree(&b);
    assert!(full_tree.len() > 5, "{full_tree:?}");
    let mut partial_tree = partial_tree;
    for d in &pair.implicit_dirs {
        for t in [&mut partial_tree, &mut full_tree] {
            let v = t.remove(d).unwrap_or_else(|| panic!("{d} is missing"));
            assert!(v.starts_with("dir "), "{d}: {v}");
        }
    }
    if partial_tree != full_tree {
        let differ: Vec<_> = full_tree
            .iter()
            .filter(|(k, v)| partial_tree.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: full {v}, partial {}", partial_tree.get(k).map_or("missing", |p| p.as_str())))
            .collect();
        let extra: Vec<_> = partial_tree.keys().filter(|k| !full_tree.contains_key(*k)).collect();
        panic!("the partial pull of B differs from the full one: {differ:#?}; only in the partial pull: {extra:?}");
    }
    // And it runs: the files as a container sees them.
    let run = |s: &Store| {
        let mut args = vec!["run", "--rm", "--network=none", &b];
        args.extend(pair.run.iter().map(String::as_str));
        s.run(&args, false).0
    };
    let (sums, want) = (run(&store), run(&full));
    assert!(!want.is_empty());
    assert_eq!(sums, want);
    eprintln!("a container of the partial pull of B: {}", sums.trim().replace('\n', "; "));
}

#[test]
fn podman_made_zstd_chunked_pulls_partially() {
    if !have_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let pair = push_pair_podman(&reg, work.path());
    check_partial_pull(&reg, &pair);
}

#[test]
fn stevedore_made_zstd_chunked_pulls_partially() {
    if !have_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let Some(pair) = push_pair_stevedore(&reg, work.path()) else { return };
    check_partial_pull(&reg, &pair);
}
