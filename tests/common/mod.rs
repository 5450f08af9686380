//! Shared helpers for the integration tests: fixture store closures and running the binary.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MKSTORE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/bench/mkstore.py");

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stevedore"))
}

/// A mkstore closure at a fixed path, so that member names (and so digests) are the same on
/// every run. Made once and shared by concurrently running tests under a lock.
pub fn fixture(name: &str, paths: u32, files: u32, big_mib: f64) -> PathBuf {
    let root = PathBuf::from("/tmp/stevedore-test-fixtures");
    fs::create_dir_all(&root).unwrap();
    let _lock = nix::fcntl::Flock::lock(File::create(root.join(".lock")).unwrap(), nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
    let dir = root.join(format!("{name}-{paths}-{files}-{big_mib}"));
    if !dir.join("closure.json").exists() {
        if dir.exists() {
            make_writable(&dir);
            fs::remove_dir_all(&dir).unwrap();
        }
        let status = Command::new("python3")
            .arg(MKSTORE)
            .arg(&dir)
            .args(["--paths", &paths.to_string(), "--files-per-path", &files.to_string()])
            .args(["--big-mib", &big_mib.to_string(), "--seed", "7"])
            .stdout(Stdio::null())
            .status()
            .expect("python3 runs mkstore.py");
        assert!(status.success(), "mkstore.py failed");
    }
    dir
}

pub fn make_writable(dir: &Path) {
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(dir).status();
}

/// The store paths of a fixture, in closure.json order.
pub fn store_paths(fixture: &Path) -> Vec<String> {
    let closure: Value = serde_json::from_slice(&fs::read(fixture.join("closure.json")).unwrap()).unwrap();
    closure.as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap().to_string()).collect()
}

pub fn base_conf(fixture: &Path, layers: Vec<Vec<String>>) -> Value {
    json!({
        "store_layers": layers,
        "customisation_layer": null,
        "from_image": null,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", "LANG=C.UTF-8"]},
        "architecture": "amd64",
        "created": "1970-01-01T00:00:01Z",
        "mtime": "1970-01-01T00:00:01Z",
        "uid": 0,
        "gid": 0,
        "uname": "root",
        "gname": "root",
        "store_dir": fixture.join("store").to_str().unwrap(),
        "repo_tag": "fixture:latest",
    })
}

pub fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    p
}

pub fn stream(conf: &Path, extra: &[&str]) -> Output {
    Command::new(bin()).arg("stream").arg(conf).args(extra).output().expect("stevedore runs")
}

pub fn stream_ok(conf: &Path) -> Vec<u8> {
    let out = stream(conf, &[]);
    assert!(out.status.success(), "stream failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// An archive's members as (name, bytes).
pub fn members(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut a = tar::Archive::new(archive);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().to_vec()).unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

pub fn member<'a>(members: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &members.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no member {name}")).1
}

pub struct Image {
    pub members: Vec<(String, Vec<u8>)>,
    pub manifest: Value,
    pub config: Value,
    pub config_bytes: Vec<u8>,
}

impl Image {
    pub fn parse(archive: &[u8]) -> Image {
        let members = members(archive);
        let manifest: Value = serde_json::from_slice(member(&members, "manifest.json")).unwrap();
        let config_bytes = member(&members, manifest[0]["Config"].as_str().unwrap()).to_vec();
        let config = serde_json::from_slice(&config_bytes).unwrap();
        Image { members, manifest, config, config_bytes }
    }

    pub fn layer(&self, i: usize) -> &[u8] {
        member(&self.members, self.manifest[0]["Layers"][i].as_str().unwrap())
    }

    pub fn layer_count(&self) -> usize {
        self.manifest[0]["Layers"].as_array().unwrap().len()
    }
}

/// `data` compressed as a base image may be: "gzip", "zstd", or anything else for plain.
pub fn compress(data: &[u8], how: &str) -> Vec<u8> {
    use std::io::Write;
    match how {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "zstd" => zstd::encode_all(data, 3).unwrap(),
        _ => data.to_vec(),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    stevedore::util::hex(&Sha256::digest(data))
}

/// The oracle's bytes for a store layer (tests/oracle/layer.py, CPython's tarfile).
pub fn oracle_layer(paths: &[String], uid: u64, gid: u64, uname: &str, gname: &str, mtime: i64) -> Vec<u8> {
    let owner = json!({"uid": uid, "gid": gid, "uname": uname, "gname": gname, "mtime": mtime});
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oracle/layer.py"))
        .arg(owner.to_string())
        .args(paths)
        .output()
        .expect("python3 runs the oracle");
    assert!(out.status.success(), "oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Peak memory that any run may reach.
pub const RSS_LIMIT_KIB: i64 = 100 * 1024;

pub struct Run {
    pub ok: bool,
    pub stderr: String,
    pub stdout: Vec<u8>,
    pub max_rss_kib: i64,
}

impl Run {
    pub fn last_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or("")
    }

    /// Failed with a one-line error containing `want`.
    pub fn failed_with(&self, want: &str) {
        assert!(!self.ok, "succeeded, but should have failed with {want:?}");
        let last = self.last_line();
        assert!(last.starts_with("stevedore: ") && last.contains(want), "{want:?} not in the last line of {:?}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }

    pub fn succeeded(&self) {
        assert!(self.ok, "failed: {}", self.stderr);
    }
}

/// Runs `cmd` (stdin from `input`, if any) with a time limit, and reports its own peak RSS.
pub fn run(mut cmd: Command, input: Option<Box<dyn FnOnce(std::process::ChildStdin) + Send>>, limit: Duration) -> Run {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("stevedore runs");
    let feeder = input.map(|f| {
        let stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || f(stdin))
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).ok();
        v
    });
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let (status, rss) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in; pid is our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: status and usage are valid for writes; WNOHANG returns at once.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (status, usage.ru_maxrss);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {limit:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = out_t.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    let r = Run { ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, stderr, stdout, max_rss_kib: rss };
    assert!(
        libc::WIFEXITED(status),
        "{cmd:?} was killed by signal {} (a crash): {}",
        libc::WTERMSIG(status),
        r.stderr
    );
    assert!(r.max_rss_kib < RSS_LIMIT_KIB, "{cmd:?} peaked at {} MiB: {}", r.max_rss_kib / 1024, r.stderr);
    r
}

/// A copy at `to` of the OCI layout `from` with its index.json as stevedore wrote it before
/// containerd's form: the familiar `NAME:TAG` in both name annotations.
pub fn old_style_copy(from: &Path, to: &Path) -> PathBuf {
    fs::create_dir_all(to).unwrap();
    assert!(Command::new("cp").arg("-a").arg(from.join(".")).arg(to).status().unwrap().success());
    let path = to.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    for m in index["manifests"].as_array_mut().unwrap() {
        let full = m["annotations"]["io.containerd.image.name"].as_str().unwrap();
        let short = full.trim_start_matches("docker.io/").trim_start_matches("library/").to_string();
        m["annotations"] = serde_json::json!({"io.containerd.image.name": short, "org.opencontainers.image.ref.name": short});
    }
    fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    to.to_owned()
}

/// A tool that the Debian 13 stack (tests/modern) has and Debian 12 lacks (oras, cosign): its
/// path if on PATH; None elsewhere, but a failure on the modern stack (STEVEDORE_STACK=debian13),
/// where a missing tool means a broken root rather than an older machine.
pub fn modern_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()));
    if found.is_none() {
        assert!(std::env::var("STEVEDORE_STACK").as_deref() != Ok("debian13"), "the Debian 13 root must have {name}");
        eprintln!("{name} is not installed (Debian 13 has it): its checks are skipped here");
    }
    found
}

/// GET from the registry on 127.0.0.1 (a blob: distribution's filesystem driver serves it).
pub fn http_get(port: u16, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "GET {path}: chunked");
    all[end + 4..].to_vec()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A docker-registry serving a temporary directory on 127.0.0.1; killed when dropped.
pub struct Registry {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        Self::start_with(htpasswd, None)
    }

    /// With `tls`: (certificate, key) PEM files to serve HTTPS with.
    pub fn start_with(htpasswd: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n",
            dir.path().join("data").display()
        );
        if let Some((user, pass)) = htpasswd {
            let hash = bcrypt::hash(pass, 4).unwrap();
            let file = dir.path().join("htpasswd");
            fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", file.display()));
        }
        config.push_str(&format!("http:\n  addr: 127.0.0.1:{port}\n"));
        if let Some((cert, key)) = tls {
            config.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry runs");
        let reg = Registry { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP server on 127.0.0.1 that gives each connection to `handle` on a thread of its own;
/// it stops accepting when dropped.
pub struct Server {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Server {
    pub fn start(handle: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> Server {
        use std::sync::{atomic::*, Arc};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, handle) = (stop.clone(), Arc::new(handle));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                std::thread::spawn(move || handle(conn));
            }
        });
        Server { port, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}
