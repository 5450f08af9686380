//! push, pull, prefetch and index against a real registry (docker-registry, distribution v2.8)
//! on 127.0.0.1, one per test, with skopeo and podman as independent checks. A small proxy in
//! the test injects failures (503s, dropped connections) and plays a bearer-token server.
//!
//! Needs docker-registry and skopeo (`tests/setup.sh` installs them). Outside CI a machine
//! without them skips these tests with a message; in CI (CI=true) that is a failure.

mod common;

use common::*;
use base64::Engine;
use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn have_tools() -> bool {
    let ok = ["docker-registry", "skopeo"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "CI must have docker-registry and skopeo");
        eprintln!("docker-registry/skopeo missing; registry tests skipped");
    }
    ok
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Answer the first `n` blob-upload PATCH/PUT requests with 503.
    Fail503(usize),
    /// Close the connection halfway through the body of the first `n` blob uploads.
    Drop(usize),
    /// Require a bearer token, issued by `/token` for basic credentials user:pw, or by a POST
    /// of the OAuth2 refresh-token grant for REFRESH.
    Bearer,
}

/// An HTTP proxy on 127.0.0.1 in front of a registry, one request per connection.
struct Proxy {
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _server: Server,
}

const TOKEN: &str = "t0k3n-for-tests";
const REFRESH: &str = "r3fresh-identity-token";

type Head = (String, String, Vec<(String, String)>);

fn read_head(r: &mut BufReader<TcpStream>) -> Option<Head> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Some((method, path, headers))
}

fn respond(mut s: &TcpStream, status: &str, headers: &str, body: &str) {
    let _ = write!(s, "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
}

fn start_proxy(upstream: u16, fault: Fault) -> Proxy {
    let log = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(AtomicUsize::new(0));
    let log2 = log.clone();
    let server = Server::start(move |conn| {
        let (log, faults) = (&log2, &faults);
        let port = conn.local_addr().unwrap().port();
        conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let Some((method, path, headers)) = read_head(&mut r) else { return };
        let get = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
        let len: u64 = get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        log.lock().unwrap().push(format!("{method} {path}"));
        let upload = (method == "PATCH" || method == "PUT") && path.contains("/blobs/uploads/");
        let drain = |r: &mut BufReader<TcpStream>, n: u64| {
            let _ = std::io::copy(&mut r.take(n), &mut std::io::sink());
        };
        match fault {
            Fault::Fail503(n) if upload && faults.fetch_add(1, Ordering::SeqCst) < n => {
                drain(&mut r, len);
                log.lock().unwrap().push("-> 503".into());
                respond(&conn, "503 Service Unavailable", "", "");
                return;
            }
            Fault::Drop(n) if upload && len > 2 && faults.fetch_add(1, Ordering::SeqCst) < n => {
                drain(&mut r, len / 2);
                log.lock().unwrap().push("-> dropped".into());
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
            Fault::Bearer if path.starts_with("/token") && method == "POST" => {
                let mut body = vec![0u8; len as usize];
                let _ = r.read_exact(&mut body);
                let form = String::from_utf8_lossy(&body).into_owned();
                log.lock().unwrap().push(format!("form {}", form.replace(REFRESH, "REFRESH")));
                let fields: Vec<&str> = form.split('&').collect();
                if fields.contains(&"grant_type=refresh_token") && fields.contains(&format!("refresh_token={REFRESH}").as_str()) {
                    respond(&conn, "200 OK", "Content-Type: application/json\r\n", &format!("{{\"access_token\":\"{TOKEN}\"}}"));
                } else {
                    respond(&conn, "401 Unauthorized", "", "{\"error\":\"invalid_grant\"}");
                }
                return;
            }
            Fault::Bearer if path.starts_with("/token") => {
                let want = format!("Basic {}", stevedore::registry::auth::base64_encode(b"user:pw"));
                if get("authorization").as_deref() == Some(want.as_str()) {
                    respond(&conn, "200 OK", "Content-Type: application/json\r\n", &format!("{{\"token\":\"{TOKEN}\"}}"));
                } else {
                    respond(&conn, "401 Unauthorized", "", "{\"details\":\"bad credentials\"}");
                }
                return;
            }
            Fault::Bearer if get("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) => {
                drain(&mut r, len);
                let challenge = format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test\"\r\n");
                respond(&conn, "401 Unauthorized", &challenge, "");
                return;
            }
            _ => {}
        }
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        for (k, v) in &headers {
            if !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("authorization") {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str("Connection: close\r\n\r\n");
        if up.write_all(head.as_bytes()).is_err() || std::io::copy(&mut (&mut r).take(len), &mut up).is_err() {
            return;
        }
        let mut conn = conn;
        let _ = std::io::copy(&mut up, &mut conn);
    });
    Proxy { port: server.port, log, _server: server }
}

/// Runs stevedore with no auth files but the ones a test gives.
fn stevedore(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let home = std::env::temp_dir().join("stevedore-registry-test-home");
    fs::create_dir_all(&home).unwrap();
    let mut c = Command::new(bin());
    c.args(args).env("HOME", &home).env_remove("XDG_RUNTIME_DIR").env_remove("XDG_CONFIG_HOME").env_remove("DOCKER_CONFIG").env_remove("REGISTRY_AUTH_FILE").env_remove("COSIGN_PASSWORD");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).output().expect("stevedore runs")
}

fn ok(out: Output, what: &str) -> (String, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap().trim().to_string(), stderr)
}

fn push(conf: &Path, dest: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["push", conf.to_str().unwrap(), dest, "--insecure"];
    args.extend_from_slice(extra);
    ok(stevedore(&args, &[]), &format!("push to {dest}"))
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo").args(args).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A conf over the shared fixture that plans its layers from the closure graph (which also
/// gives documents their path infos).
fn graph_conf(dir: &Path) -> PathBuf {
    let fx = fixture("compat", 8, 30, 0.0);
    let mut conf = base_conf(&fx, vec![]);
    conf.as_object_mut().unwrap().remove("store_layers");
    conf["closure_graph"] = json!(fx.join("closure.json"));
    conf["max_layers"] = json!(4);
    write_json(dir, "conf.json", &conf)
}

/// A conf over the shared fixture: one layer per store path.
fn fixture_conf(dir: &Path, arch: &str) -> PathBuf {
    let fx = fixture("compat", 8, 30, 0.0);
    let layers: Vec<Vec<String>> = store_paths(&fx).into_iter().map(|p| vec![p]).collect();
    let mut conf = base_conf(&fx, layers);
    conf["architecture"] = json!(arch);
    write_json(dir, &format!("conf-{arch}.json"), &conf)
}

fn summary(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("summary:")).unwrap_or_else(|| panic!("no summary line in: {stderr}"))
}

fn sha256_file(p: &Path) -> String {
    sha256_hex(&fs::read(p).unwrap())
}

fn podman_load(archive: &Path) {
    if Command::new("podman").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have podman");
        return;
    }
    let out = Command::new("podman")
        .args(["--cgroup-manager=cgroupfs", "--runtime", "/usr/sbin/runc", "load", "-i"])
        .arg(archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "podman load failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Destinations Docker would not read fail at once, in one line, before any connection (no
/// registry listens on port 1), for `push` and `index` alike.
#[test]
fn destinations_are_checked_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let conf = conf.to_str().unwrap();
    for (dest, why) in [
        ("docker://127.0.0.1:1/team/a..b:v1", "path component \"a..b\""),
        ("docker://bad host:1/app:v1", "it contains whitespace or a control character"),
        ("docker://127.0.0.1:x1/app:v1", "registry \"127.0.0.1:x1\""),
    ] {
        for args in [["push", conf, dest], ["index", dest, conf]] {
            let out = stevedore(&args, &[]);
            let err = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(1), "{err}");
            let want = format!("stevedore: destination: invalid image reference {:?}: {why}", &dest["docker://".len()..]);
            assert!(err.starts_with(&want), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
    // Sources for pull and prefetch go through the same grammar (with a digest allowed), and a
    // first component that names a registry must be a host.
    let out = dir.path().join("out.tar");
    for (image, why) in [
        ("docker://127.0.0.1:1/team/a..b:v1", "path component \"a..b\""),
        ("docker://127.0.0.1:1/a-/b", "path component \"a-\""),
        ("docker://ho_st.example/app", "registry \"ho_st.example\""),
        ("docker://127.0.0.1:1/app@sha256:abc", "digest \"sha256:abc\""),
    ] {
        for args in [vec!["pull", image, "-o", out.to_str().unwrap()], vec!["prefetch", image]] {
            let out = stevedore(&args, &[]);
            let err = String::from_utf8(out.stderr).unwrap();
            let want = format!("stevedore: invalid image reference {:?}: {why}", &image["docker://".len()..]);
            assert!(out.status.code() == Some(1) && err.starts_with(&want) && err.lines().count() == 1, "{args:?}: {err}");
        }
    }
}

#[test]
fn push_conf_then_pull_it_back() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let dest = format!("docker://{}/team/app:v1", reg.addr());
    // A fresh digest cache: the first push compresses every layer to learn its digest.
    let cache = dir.path().join("cache");
    let push_cached = |conf: &Path, dest: &str| {
        ok(stevedore(&["push", conf.to_str().unwrap(), dest, "--insecure"], &[("XDG_CACHE_HOME", &cache)]), "push")
    };
    // Compressed once: each layer goes up from the spool file the digest pass wrote, and the
    // spool is gone afterwards.
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let (digest, stderr) = ok(stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure"], &[("XDG_CACHE_HOME", &cache), ("TMPDIR", &tmp)]), "push");
    assert!(stderr.contains("Compressing 8 layers to learn their digests"), "{stderr}");
    assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
    assert!(stderr.lines().filter(|l| l.contains(": uploaded ")).count() == 9, "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains(" bytes (layer ")).count(), 8, "{stderr}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "the spool was left behind");
    // With the digests cached, a registry that lacks the layers gets them made again straight
    // into the upload: the same blobs.
    let (other, stderr) = push_cached(&conf, &format!("docker://{}/team/other:v1", reg.addr()));
    assert_eq!(other, digest);
    assert!(stderr.contains("Looking up the digests of 8 layers") && !stderr.contains("Compressing"), "{stderr}");
    assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
    // Layers compress side by side on every thread count, to the same blobs.
    for threads in ["1", "16"] {
        let fresh = dir.path().join(format!("cache-{threads}"));
        let dest = format!("docker://{}/threads{threads}/app:v1", reg.addr());
        let env = [("XDG_CACHE_HOME", fresh.as_path()), ("STEVEDORE_THREADS", Path::new(threads))];
        let (d, stderr) = ok(stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure"], &env), "push");
        assert_eq!(d, digest, "{threads} threads");
        assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
    }

    // skopeo sees the manifest we printed, and the image stream writes for the same conf.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert!(manifest["layers"].as_array().unwrap().iter().all(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"));
    let streamed = Image::parse(&stream_ok(&conf));
    let via_skopeo = dir.path().join("skopeo.tar");
    skopeo(&["copy", "--src-tls-verify=false", &dest, &format!("docker-archive:{}:x/y:z", via_skopeo.display())]);
    let image = Image::parse(&fs::read(&via_skopeo).unwrap());
    assert_eq!(image.config_bytes, streamed.config_bytes, "the pushed config differs from stream's");
    for i in 0..image.layer_count() {
        assert!(image.layer(i) == streamed.layer(i), "layer {i} differs");
    }

    // A second push of the unchanged image uploads nothing, and with digests cached it only
    // hashes the layers (no compression).
    let (again, stderr) = push_cached(&conf, &dest);
    assert_eq!(again, digest);
    assert!(summary(&stderr).starts_with("summary: 9 blobs: 0 uploaded (0 bytes), 0 mounted, 9 existed"), "{stderr}");
    assert!(stderr.contains("Looking up the digests of 8 layers") && !stderr.contains("Compressing"), "{stderr}");
    // Two store paths moved into one layer: that layer and the config are all that go up.
    let mut changed: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    let layers = changed["store_layers"].as_array_mut().unwrap();
    let last = layers.pop().unwrap();
    layers.last_mut().unwrap().as_array_mut().unwrap().extend(last.as_array().unwrap().iter().cloned());
    let changed_conf = write_json(dir.path(), "changed.json", &changed);
    let (_, stderr) = push_cached(&changed_conf, &format!("docker://{}/team/app:v2", reg.addr()));
    assert!(stderr.contains("Compressing 1 of 7 layers"), "{stderr}");
    assert!(summary(&stderr).starts_with("summary: 8 blobs: 2 uploaded"), "{stderr}");

    // Pull round trip: a Docker archive equal to stream's in content, loadable, usable as a base.
    let pulled = dir.path().join("pulled.tar");
    let (pulled_digest, _) = ok(stevedore(&["pull", &dest, "--insecure", "-o", pulled.to_str().unwrap()], &[]), "pull");
    assert_eq!(pulled_digest, digest);
    let image = Image::parse(&fs::read(&pulled).unwrap());
    assert_eq!(image.config_bytes, streamed.config_bytes);
    assert_eq!(image.manifest[0]["RepoTags"], json!([format!("{}/team/app:v1", reg.addr())]));
    for i in 0..image.layer_count() {
        assert!(image.layer(i) == streamed.layer(i), "pulled layer {i} differs");
    }
    let again = dir.path().join("again.tar");
    ok(stevedore(&["pull", &dest, "--insecure", "-q", "-o", again.to_str().unwrap()], &[]), "pull");
    assert_eq!(sha256_file(&again), sha256_file(&pulled), "pull output is not deterministic");
    podman_load(&pulled);
    let mut derived: Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
    derived["from_image"] = json!(pulled);
    derived["store_layers"] = json!([]);
    let derived_conf = write_json(dir.path(), "derived.json", &derived);
    let derived_image = Image::parse(&stream_ok(&derived_conf));
    assert_eq!(derived_image.layer_count(), 8);

    // Docker schema 2 manifests (skopeo --format v2s2) pull the same way.
    let v2s2 = format!("docker://{}/team/v2s2:v1", reg.addr());
    skopeo(&["copy", "--format", "v2s2", "--dest-tls-verify=false", &format!("docker-archive:{}", via_skopeo.display()), &v2s2]);
    let raw: Value = serde_json::from_slice(&skopeo(&["inspect", "--raw", "--tls-verify=false", &v2s2])).unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    let from_v2s2 = dir.path().join("v2s2.tar");
    ok(stevedore(&["pull", &v2s2, "--insecure", "-q", "-o", from_v2s2.to_str().unwrap()], &[]), "pull v2s2");
    let image = Image::parse(&fs::read(&from_v2s2).unwrap());
    assert_eq!(image.config["rootfs"], streamed.config["rootfs"]);
    for i in 0..image.layer_count() {
        assert!(image.layer(i) == streamed.layer(i), "v2s2 layer {i} differs");
    }

    // OCI layout output.
    let layout = dir.path().join("layout");
    ok(stevedore(&["pull", &dest, "--insecure", "-q", "--format", "oci", "-o", layout.to_str().unwrap()], &[]), "pull --format oci");
    // Named as containerd names it, so skopeo finds it by its tag.
    let raw = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", layout.display())]);
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
}

#[test]
fn push_archives_and_layouts_with_mounts() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let base = format!("docker://{}/base:v1", reg.addr());
    let (digest, _) = push(&conf, &base, &["-q"]);

    // A Docker archive of the same image pushes to the same manifest, its blobs mounted.
    let archive = dir.path().join("image.tar");
    fs::write(&archive, stream_ok(&conf)).unwrap();
    let (d, stderr) = push(&archive, &format!("docker://{}/from-archive:v1", reg.addr()), &["--mount-from", "base"]);
    assert_eq!(d, digest);
    assert!(summary(&stderr).starts_with("summary: 9 blobs: 0 uploaded (0 bytes), 9 mounted"), "{stderr}");

    // An OCI layout (stream --format oci, gzip): same manifest again, uploaded this time.
    let layout = dir.path().join("layout");
    assert!(stream(&conf, &["--format", "oci", "-o", layout.to_str().unwrap(), "-q"]).status.success());
    let (d, stderr) = push(Path::new(&format!("oci:{}", layout.display())), &format!("docker://{}/from-layout:v1", reg.addr()), &[]);
    assert_eq!(d, digest);
    assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");

    // An oci-archive with zstd layers keeps its own (zstd) manifest.
    let oci_archive = dir.path().join("oci.tar");
    assert!(stream(&conf, &["--format", "oci-archive", "--compressor", "zstd", "-o", oci_archive.to_str().unwrap(), "-q"]).status.success());
    let dest = format!("docker://{}/from-oci-archive:v1", reg.addr());
    let (d, _) = push(&oci_archive, &dest, &["-q"]);
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), d);
    let m: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
    // ...and equals what a push of the conf with --compressor zstd makes.
    let (z, _) = push(&conf, &format!("docker://{}/zstd:v1", reg.addr()), &["--compressor", "zstd", "-q"]);
    assert_eq!(z, d);
}

#[test]
fn push_picks_one_image_of_a_merged_archive_or_layout() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    // Two images (other architectures, other configs), each streamed alone, then merged.
    let mut singles = Vec::new();
    for (arch, tag) in [("amd64", "team/one:v1"), ("arm64", "two:v2")] {
        let conf = fixture_conf(dir.path(), arch);
        let archive = dir.path().join(format!("{arch}.tar"));
        ok(stevedore(&["stream", conf.to_str().unwrap(), "-t", tag, "-o", archive.to_str().unwrap(), "-q"], &[]), "stream");
        let (digest, _) = push(&archive, &format!("docker://{}/single:{arch}", reg.addr()), &["-q"]);
        singles.push((archive, digest));
    }
    let merged = dir.path().join("merged.tar");
    ok(stevedore(&["merge", "-q", "-o", merged.to_str().unwrap(), singles[0].0.to_str().unwrap(), singles[1].0.to_str().unwrap()], &[]), "merge");
    let m = merged.display();
    let dest = format!("docker://{}/picked:v1", reg.addr());
    for (source, want) in [
        (format!("docker-archive:{m}:team/one:v1"), &singles[0].1),
        (format!("docker-archive:{m}:docker.io/team/one:v1"), &singles[0].1),
        (format!("docker-archive:{m}:two:v2"), &singles[1].1),
        (format!("docker-archive:{m}:@0"), &singles[0].1),
        (format!("docker-archive:{m}:@1"), &singles[1].1),
    ] {
        let (d, _) = push(Path::new(&source), &dest, &["-q"]);
        assert_eq!(&d, want, "{source}");
    }
    for (source, said) in [
        (format!("docker-archive:{m}"), format!("source {m}: it holds 2 images; name one as :NAME:TAG or :@N (@0 team/one:v1, @1 two:v2)")),
        (m.to_string(), format!("source {m}: it holds 2 images; name one as :NAME:TAG or :@N (@0 team/one:v1, @1 two:v2)")),
        (format!("docker-archive:{m}:two:v1"), format!("source {m}: no image tagged two:v1 (it has: team/one:v1, two:v2)")),
        (format!("docker-archive:{m}:@2"), format!("source {m}: no image @2: manifest.json lists 2 (@0 to @1)")),
        (format!("docker-archive:{m}:@x"), format!("source docker-archive:{m}:@x: image index \"@x\": '@' and a number from 0")),
        (format!("docker-archive:{m}:Two:v2"), format!("source docker-archive:{m}:Two:v2: invalid image reference \"Two:v2\": the repository name must be lowercase (\"Two\")")),
    ] {
        let out = stevedore(&["push", &source, &dest, "--insecure", "-q"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{source}: pushed");
        assert_eq!(err.trim_end(), format!("stevedore: {said}"), "{source}");
    }

    // Layouts holding both, named as stevedore names entries now and as it did before.
    let layout = dir.path().join("layout");
    for (arch, tag) in [("amd64", "team/one:v1"), ("arm64", "two:v2")] {
        let conf = fixture_conf(dir.path(), arch);
        ok(stevedore(&["stream", conf.to_str().unwrap(), "--format", "oci", "-t", tag, "-o", layout.to_str().unwrap(), "-q"], &[]), "stream");
    }
    let old = old_style_copy(&layout, &dir.path().join("old"));
    let mut digests = Vec::new();
    for l in [&layout, &old] {
        for r in ["team/one:v1", "docker.io/team/one:v1", "v1", "two:v2", "v2"] {
            let (d, _) = push(Path::new(&format!("oci:{}:{r}", l.display())), &dest, &["-q"]);
            digests.push((l.display().to_string(), r, d));
        }
    }
    for (l, r, d) in &digests {
        assert_eq!(d, &digests[if r.ends_with('1') { 0 } else { 3 }].2, "oci:{l}:{r}");
    }
    assert_ne!(digests[0].2, digests[3].2);
}

#[test]
fn push_of_a_conf_whose_customisation_layer_is_a_base_layer() {
    // The manifest lists the one blob twice.
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let custom = custom_layer(dir.path(), "custom", &[("etc/x", b"x!\n")]);
    let mut conf: Value = serde_json::from_slice(&fs::read(fixture_conf(dir.path(), "amd64")).unwrap()).unwrap();
    conf["customisation_layer"] = json!(custom);
    let base_conf = write_json(dir.path(), "base.json", &conf);
    let base = dir.path().join("base.tar");
    fs::write(&base, stream_ok(&base_conf)).unwrap();
    conf["from_image"] = json!(base);
    conf["store_layers"] = json!([]);
    let derived = write_json(dir.path(), "derived.json", &conf);
    let dest = format!("docker://{}/same:v1", reg.addr());
    // With and without cached digests (the cache is this test's own).
    let cache = dir.path().join("cache");
    for _ in 0..2 {
        let (digest, _) = ok(stevedore(&["push", derived.to_str().unwrap(), &dest, "--insecure", "-q"], &[("XDG_CACHE_HOME", &cache)]), "push");
        let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
        assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
        let m: Value = serde_json::from_slice(&raw).unwrap();
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 10);
        assert_eq!(layers[8], layers[9]);
    }
    // What the registry holds pulls back to the image streamed.
    let pulled = dir.path().join("pulled.tar");
    ok(stevedore(&["pull", &dest, "--insecure", "-q", "-o", pulled.to_str().unwrap()], &[]), "pull");
    let streamed = Image::parse(&stream_ok(&derived));
    assert_eq!(Image::parse(&fs::read(&pulled).unwrap()).config_bytes, streamed.config_bytes);
}

/// The fixture image pushed straight to `reg` as `direct:v1`: its conf, its digest, and the
/// manifest the registry holds.
fn direct_image(reg: &Registry, dir: &Path) -> (PathBuf, String, Value) {
    let conf = fixture_conf(dir, "amd64");
    let (digest, _) = push(&conf, &format!("docker://{}/direct:v1", reg.addr()), &["-q"]);
    let manifest = serde_json::from_slice(&skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/direct:v1", reg.addr())])).unwrap();
    (conf, digest, manifest)
}

/// Checks that what landed at `reference` is whole: skopeo copies it out to `out` and every
/// layer hashes to its diff_id. Returns the layer count.
fn assert_whole(reference: &str, out: &Path) -> usize {
    skopeo(&["copy", "--src-tls-verify=false", reference, &format!("docker-archive:{}", out.display())]);
    let image = Image::parse(&fs::read(out).unwrap());
    for i in 0..image.layer_count() {
        assert_eq!(format!("sha256:{}", sha256_hex(image.layer(i))), image.config["rootfs"]["diff_ids"][i]);
    }
    image.layer_count()
}

/// The challenge of a registry whose token realm is `/token` on `port`.
fn bearer_challenge(port: u16) -> String {
    format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test\"\r\n")
}

#[test]
fn failed_uploads_are_retried() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let (conf, expected, _) = direct_image(&reg, dir.path());

    // Digests cached (layers made again into the upload) or not (uploaded from the spool).
    let fresh = |name: &str| Some(dir.path().join(name));
    for (fault, chunk, cache) in [(Fault::Fail503(3), "64K", None), (Fault::Drop(2), "64M", None), (Fault::Drop(2), "200K", None), (Fault::Fail503(3), "64K", fresh("c1")), (Fault::Drop(2), "200K", fresh("c2"))] {
        let proxy = start_proxy(reg.port, fault);
        let repo = format!("flaky{}", proxy.port);
        let dest = format!("docker://127.0.0.1:{}/{repo}:v1", proxy.port);
        let args = ["push", conf.to_str().unwrap(), &dest, "--insecure", "--chunk-size", chunk];
        let env: Vec<(&str, &Path)> = cache.iter().map(|c| ("XDG_CACHE_HOME", c.as_path())).collect();
        let (digest, stderr) = ok(stevedore(&args, &env), &format!("push to {dest}"));
        assert_eq!(digest, expected);
        assert!(stderr.contains("retrying from its start"), "{stderr}");
        assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
        let log = proxy.log.lock().unwrap().clone();
        let injected = log.iter().filter(|l| l.starts_with("->")).count();
        assert!(injected >= 2, "faults were not injected: {log:?}");
        if chunk == "64K" {
            assert!(log.iter().any(|l| l.starts_with("PATCH ")), "no chunked upload: {log:?}");
        }
        assert_whole(&format!("docker://{}/{repo}:v1", reg.addr()), &dir.path().join(format!("{repo}.tar")));
    }

    // A registry that never recovers gives up with one line, with digests cached or not (then
    // the failure comes from the upload beside the digest pass, which stops; no spool is left).
    let proxy = start_proxy(reg.port, Fault::Fail503(1000));
    let (cache, tmp) = (dir.path().join("down-cache"), dir.path().join("down-tmp"));
    fs::create_dir(&tmp).unwrap();
    for env in [vec![], vec![("XDG_CACHE_HOME", cache.as_path()), ("TMPDIR", tmp.as_path())]] {
        let out = stevedore(&["push", conf.to_str().unwrap(), &format!("docker://127.0.0.1:{}/down:v1", proxy.port), "--insecure", "--retries", "1", "-q"], &env);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("503"), "{stderr}");
    }
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "the spool was left behind");
}

#[test]
fn a_full_spool_disk_is_one_clear_error() {
    if !have_tools() {
        return;
    }
    // A 64 KiB tmpfs as TMPDIR: the first compressed layer does not fit. Needs root (CI is).
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("small");
    fs::create_dir(&tmp).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"]).arg(&tmp).status().map(|s| s.success()).unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&tmp);
    let reg = Registry::start(None);
    let conf = fixture_conf(dir.path(), "amd64");
    let cache = dir.path().join("cache");
    let dest = format!("docker://{}/full:v1", reg.addr());
    let out = stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure", "--compressor", "none", "-q"], &[("XDG_CACHE_HOME", &cache), ("TMPDIR", &tmp)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TMPDIR") && stderr.contains(tmp.to_str().unwrap()), "{stderr}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "the spool was left behind");
    // No tag was pushed.
    let out = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &dest]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn basic_and_bearer_auth() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(Some(("user", "s3cret-pw")));
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let auth_file = |name: &str, userpass: &str| {
        let auth = stevedore::registry::auth::base64_encode(userpass.as_bytes());
        write_json(dir.path(), name, &json!({"auths": {reg.addr(): {"auth": auth}}}))
    };
    let good = auth_file("good.json", "user:s3cret-pw");
    let bad = auth_file("bad.json", "user:wr0ng-pw");
    let dest = format!("docker://{}/private:v1", reg.addr());
    let args = ["push", conf.to_str().unwrap(), &dest, "--insecure", "-q"];

    let (digest, _) = ok(stevedore(&args, &[("REGISTRY_AUTH_FILE", &good)]), "push with an auth file");
    assert!(digest.starts_with("sha256:"));
    let out = stevedore(&args, &[("REGISTRY_AUTH_FILE", &bad)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("rejected the credentials") && stderr.contains("bad.json"), "{stderr}");
    assert!(!stderr.contains("wr0ng") && !stderr.contains(&stevedore::registry::auth::base64_encode(b"user:wr0ng-pw")), "{stderr}");
    let out = stevedore(&args, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs credentials"));
    let mut with_creds = args.to_vec();
    with_creds.extend(["--creds", "user:s3cret-pw"]);
    let pulled = dir.path().join("p.tar");
    ok(stevedore(&with_creds, &[]), "push with --creds");
    ok(
        stevedore(&["pull", &dest, "--insecure", "-q", "-o", pulled.to_str().unwrap()], &[("REGISTRY_AUTH_FILE", &good)]),
        "pull with an auth file",
    );

    // Bearer tokens: the proxy asks for one and its /token endpoint checks user:pw.
    let open = Registry::start(None);
    let proxy = start_proxy(open.port, Fault::Bearer);
    let dest = format!("docker://127.0.0.1:{}/tokens:v1", proxy.port);
    let (d, _) = ok(stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure", "-q", "--creds", "user:pw"], &[]), "push with a token");
    assert_eq!(d, digest);
    assert!(proxy.log.lock().unwrap().iter().any(|l| l.starts_with("GET /token?service=test&scope=repository%3Atokens%3Apull%2Cpush")));
    let out = stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure", "-q", "--creds", "user:nope"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim().lines().count() == 1 && stderr.contains("rejected"), "{stderr}");
    assert!(!stderr.contains("nope"), "{stderr}");
}

/// A fake `docker-credential-NAME` in `bin`: logs what it was asked (argument and stdin) to
/// `NAME.log` and runs `body` (sh).
fn fake_helper(bin: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = bin.join(format!("docker-credential-{name}"));
    let log = bin.join(format!("{name}.log"));
    fs::write(&path, format!("#!/bin/sh\nserver=$(cat)\necho \"$1 $server\" >>'{}'\n{body}\n", log.display())).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credential_helpers() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(Some(("user", "s3cret-pw")));
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let creds = |user: &str, secret: &str| format!("printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}' \"$server\"");
    fake_helper(&bin, "good", &creds("user", "s3cret-pw"));
    fake_helper(&bin, "wrong", &creds("user", "wr0ng-pw"));
    fake_helper(&bin, "empty", "echo 'credentials not found in native keychain'; exit 1");
    fake_helper(&bin, "broken", "echo 'the keychain is locked' >&2; exit 3");
    fake_helper(&bin, "token", &creds("<token>", REFRESH));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = |config: Value, dest: &str, quiet: bool| {
        let file = write_json(dir.path(), "config.json", &config);
        let mut args = vec!["push", conf.to_str().unwrap(), dest, "--insecure"];
        if quiet {
            args.push("-q");
        }
        let out = stevedore(&args, &[("REGISTRY_AUTH_FILE", &file), ("PATH", Path::new(&path))]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        for secret in ["s3cret-pw", "wr0ng-pw", REFRESH] {
            assert!(!stderr.contains(secret), "a secret in: {stderr}");
        }
        (out, stderr)
    };
    let addr = reg.addr();
    let dest = format!("docker://{addr}/helped:v1");

    // credHelpers for the registry, asked with `get` and the registry on stdin; credsStore for
    // any registry, beside the empty auths entry docker writes.
    let (out, _) = run(json!({"credHelpers": {addr.clone(): "good"}, "credsStore": "wrong"}), &dest, true);
    assert!(out.status.success());
    assert_eq!(fs::read_to_string(bin.join("good.log")).unwrap().trim(), format!("get {addr}"));
    let (out, stderr) = run(json!({"auths": {addr.clone(): {}}, "credsStore": "good"}), &dest, true);
    assert!(out.status.success(), "{stderr}");
    // Wrong credentials are refused with the helper named.
    let (out, stderr) = run(json!({"credsStore": "wrong"}), &dest, true);
    assert!(!out.status.success() && stderr.contains("rejected the credentials from credential helper docker-credential-wrong"), "{stderr}");
    // No credentials there, or no such helper: anonymous, with a note saying why.
    for helper in ["empty", "missing"] {
        let (out, stderr) = run(json!({"credHelpers": {addr.clone(): helper}}), &dest, false);
        assert!(!out.status.success());
        let lines: Vec<&str> = stderr.trim().lines().collect();
        assert!(lines[0].contains(&format!("docker-credential-{helper}")) && lines[0].contains("without credentials"), "{stderr}");
        assert!(lines.last().unwrap().contains("needs credentials"), "{stderr}");
    }
    // Any other failure stops, naming the helper, in one line.
    let (out, stderr) = run(json!({"credHelpers": {addr.clone(): "broken"}}), &dest, true);
    assert!(!out.status.success() && stderr.trim().lines().count() == 1, "{stderr}");
    assert!(stderr.contains("credential helper docker-credential-broken failed") && stderr.contains("keychain is locked"), "{stderr}");
    // An identity token is no password for basic auth...
    let (out, stderr) = run(json!({"credHelpers": {addr.clone(): "token"}}), &dest, true);
    assert!(!out.status.success() && stderr.contains("identity token"), "{stderr}");
    // ...but a refresh token for a token server (the OAuth2 grant, POSTed).
    let open = Registry::start(None);
    let proxy = start_proxy(open.port, Fault::Bearer);
    let host = format!("127.0.0.1:{}", proxy.port);
    let (out, stderr) = run(json!({"credHelpers": {host.clone(): "token"}}), &format!("docker://{host}/tokens:v1"), true);
    assert!(out.status.success(), "{stderr}");
    let log = proxy.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l == "form grant_type=refresh_token&refresh_token=REFRESH&service=test&scope=repository%3Atokens%3Apull%2Cpush&client_id=stevedore"),
        "{log:?}"
    );
    // So is an `identitytoken` in an auths entry.
    let (out, stderr) = run(json!({"auths": {host.clone(): {"identitytoken": REFRESH}}}), &format!("docker://{host}/tokens:v2"), true);
    assert!(out.status.success(), "{stderr}");
}

/// Sends one request to the registry on 127.0.0.1 and returns the whole response, as a
/// tamperer with push rights could.
fn http_send(port: u16, request_line: &str, content_type: &str, body: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "{request_line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

/// PUTs a manifest.
fn http_put_manifest(port: u16, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
    let head = http_send(port, &format!("PUT /v2/{repo}/manifests/{tag}"), media_type, body);
    assert!(head.starts_with("HTTP/1.1 201"), "PUT {repo}:{tag}: {head}");
}

/// Uploads a blob (POST a session, PUT the bytes); returns its digest.
fn http_post_blob(port: u16, repo: &str, body: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(body));
    let started = http_send(port, &format!("POST /v2/{repo}/blobs/uploads/"), "application/octet-stream", b"");
    assert!(started.starts_with("HTTP/1.1 202"), "POST upload to {repo}: {started}");
    let location = started.lines().find_map(|l| l.strip_prefix("Location: ")).unwrap().trim();
    let path = location.find("/v2/").map(|i| &location[i..]).unwrap();
    let sep = if path.contains('?') { '&' } else { '?' };
    let done = http_send(port, &format!("PUT {path}{sep}digest={digest}"), "application/octet-stream", body);
    assert!(done.starts_with("HTTP/1.1 201"), "PUT blob to {repo}: {done}");
    digest
}

/// A customisation layer directory `dir/name` (layer.tar and its checksum) holding `files`.
fn custom_layer(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let custom = dir.join(name);
    fs::create_dir_all(&custom).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let data = b.into_inner().unwrap();
    fs::write(custom.join("layer.tar"), &data).unwrap();
    fs::write(custom.join("checksum"), sha256_hex(&data)).unwrap();
    custom
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}


#[test]
fn compressed_layers_decompress_to_diff_ids() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    // One digest cache for all: a gzip level of its own must not find the default's digests.
    let cache = dir.path().join("cache");
    let mut gz_digests = Vec::new();
    let mut chunked_manifests = Vec::new();
    let cases = [("gz", "+gzip", None), ("zstd", "+zstd", None), ("none", "", None), ("gz", "+gzip", Some("9")), ("gz", "+gzip", Some("1")), ("zstd:chunked", "+zstd", None), ("zstd:chunked", "+zstd", Some("again"))];
    for (compressor, suffix, extra) in cases {
        let repo = format!("c-{}{}", compressor.replace(':', "-"), extra.unwrap_or(""));
        let dest = format!("docker://{}/{repo}:v1", reg.addr());
        let mut args = vec!["push", conf.to_str().unwrap(), &dest, "--insecure", "--compressor", compressor, "-q"];
        if let Some(level) = extra.filter(|_| compressor == "gz") {
            args.extend(["--gzip-level", level]);
        }
        let (digest, _) = ok(stevedore(&args, &[("XDG_CACHE_HOME", &cache)]), "push");
        if compressor == "zstd:chunked" {
            // The second push takes digests and annotations from the cache: the same manifest.
            chunked_manifests.push(digest.clone());
        }
        if compressor == "gz" {
            gz_digests.push(digest);
        }
        // Straight from the registry's API: skopeo would recompress uncompressed layers.
        let manifest: Value = serde_json::from_slice(&skopeo(&["inspect", "--raw", "--tls-verify=false", &dest])).unwrap();
        let blob = |d: &str| http_get(reg.port, &format!("/v2/{repo}/blobs/{d}"));
        let config: Value = serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
            assert_eq!(layer["mediaType"], format!("application/vnd.oci.image.layer.v1.tar{suffix}"));
            let data = blob(layer["digest"].as_str().unwrap());
            let mut tar = Vec::new();
            match compressor {
                "gz" => flate2::read::GzDecoder::new(&data[..]).read_to_end(&mut tar).unwrap(),
                "zstd" | "zstd:chunked" => zstd::stream::read::Decoder::new(&data[..]).unwrap().read_to_end(&mut tar).unwrap(),
                _ => std::io::copy(&mut &data[..], &mut tar).unwrap() as usize,
            };
            let toc = layer["annotations"]["io.github.containers.zstd-chunked.manifest-position"].as_str();
            assert_eq!(toc.is_some(), compressor == "zstd:chunked", "{compressor} layer {i}: {layer}");
            assert_eq!(format!("sha256:{}", sha256_hex(&tar)), config["rootfs"]["diff_ids"][i], "{compressor} layer {i}");
        }
    }
    gz_digests.dedup();
    assert_eq!(gz_digests.len(), 3, "gzip levels 4, 9 and 1 gave the same image");
    assert_eq!(chunked_manifests.len(), 2);
    assert_eq!(chunked_manifests[0], chunked_manifests[1], "a cached zstd:chunked layer lost its annotations");
    // Levels are checked, and only gzip has them.
    for (args, why) in [(["--compressor", "gz", "--gzip-level", "0"], "use 1 (fastest) to 9"), (["--compressor", "zstd", "--gzip-level", "9"], "gz only")] {
        let dest = format!("docker://{}/bad:v1", reg.addr());
        let mut all = vec!["push", conf.to_str().unwrap(), &dest, "--insecure"];
        all.extend(args);
        let out = stevedore(&all, &[]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn index_pull_platform_and_prefetch() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let amd = fixture_conf(dir.path(), "amd64");
    let arm = fixture_conf(dir.path(), "arm64");
    let (amd_digest, _) = push(&amd, &format!("docker://{}/amd:v1", reg.addr()), &["-q"]);
    let dest = format!("docker://{}/multi:v1", reg.addr());
    // One image already pushed (in another repository: mounted over), one pushed from its conf.
    let (index_digest, stderr) = ok(
        stevedore(&["index", &dest, &format!("docker://{}/amd:v1", reg.addr()), arm.to_str().unwrap(), "--insecure"], &[]),
        "index",
    );
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]);
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), index_digest, "{stderr}");
    let index: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(index["manifests"][0]["digest"], amd_digest.as_str());
    assert_eq!(index["manifests"][0]["platform"], json!({"architecture": "amd64", "os": "linux"}));
    assert_eq!(index["manifests"][1]["platform"], json!({"architecture": "arm64", "os": "linux"}));

    // Pull picks the platform asked for; skopeo agrees on which manifest that is.
    for arch in ["amd64", "arm64"] {
        let out = dir.path().join(format!("{arch}.tar"));
        let (d, _) = ok(stevedore(&["pull", &dest, "--arch", arch, "--insecure", "-q", "-o", out.to_str().unwrap()], &[]), "pull");
        let image = Image::parse(&fs::read(&out).unwrap());
        assert_eq!(image.config["architecture"], arch);
        let by_skopeo = skopeo(&["inspect", "--tls-verify=false", "--override-arch", arch, &dest]);
        let by_skopeo: Value = serde_json::from_slice(&by_skopeo).unwrap();
        assert_eq!(by_skopeo["Digest"].as_str(), Some(index_digest.as_str()));
        assert!(d.starts_with("sha256:") && d != index_digest);
        if arch == "amd64" {
            assert_eq!(d, amd_digest);
        }
    }
    // --variant (pullImage's variant) picks as skopeo's --override-variant: v8 of arm64 is the
    // entry without one.
    let v8 = dir.path().join("v8.tar");
    ok(stevedore(&["pull", &dest, "--arch", "arm64", "--variant", "v8", "--insecure", "-q", "-o", v8.to_str().unwrap()], &[]), "pull --variant");
    assert_eq!(fs::read(&v8).unwrap(), fs::read(dir.path().join("arm64.tar")).unwrap());
    let by_skopeo = skopeo(&["inspect", "--config", "--tls-verify=false", "--override-arch", "arm64", "--override-variant", "v8", &dest]);
    assert_eq!(serde_json::from_slice::<Value>(&by_skopeo).unwrap()["architecture"], "arm64");
    let out = stevedore(&["pull", &dest, "--arch", "s390x", "--insecure", "-q", "-o", dir.path().join("x.tar").to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no image for linux/s390x") && stderr.contains("linux/arm64"), "{stderr}");
    assert!(!dir.path().join("x.tar").exists() && !dir.path().join("x.tar.partial").exists());

    // prefetch's hash is the sha256 of what pullImage's builder (pull NAME@DIGEST) writes.
    let (text, _) = ok(stevedore(&["prefetch", &dest, "--arch", "arm64", "--insecure", "-q"], &[]), "prefetch");
    let field = |name: &str| -> String {
        let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{name} = "))).unwrap_or_else(|| panic!("no {name} in {text}"));
        line.split('"').nth(1).unwrap().to_string()
    };
    assert_eq!(field("imageName"), format!("{}/multi", reg.addr()));
    assert_eq!(field("imageDigest"), index_digest);
    assert_eq!(field("finalImageTag"), "v1");
    let fod = dir.path().join("fod.tar");
    ok(
        stevedore(
            &[
                "pull",
                &format!("docker://{}@{}", field("imageName"), field("imageDigest")),
                "--arch",
                "arm64",
                "--image-name",
                &field("finalImageName"),
                "--image-tag",
                &field("finalImageTag"),
                "--insecure",
                "-q",
                "-o",
                fod.to_str().unwrap(),
            ],
            &[],
        ),
        "pull by digest",
    );
    use sha2::Digest;
    let sri = format!("sha256-{}", stevedore::registry::auth::base64_encode(&sha2::Sha256::digest(fs::read(&fod).unwrap())));
    assert_eq!(field("hash"), sri);
    podman_load(&fod);
}

/// A layer: a tar of `files` (name, contents), as a test image's layer.
fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Writes an OCI layout at `dir` holding one image: `layers` compressed as `how` (gz, zstd,
/// none), the config's bytes as `config` makes them from its JSON, OCI media types or Docker
/// schema 2 ones (`docker`); the manifest is indented (a registry keeps its bytes).
fn hand_layout(dir: &Path, layers: &[&[u8]], how: &str, config: impl Fn(Value) -> Vec<u8>, docker: bool) {
    use std::io::Write as _;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let hex = sha256_hex(data);
        fs::write(blobs.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    let layer_type = match (docker, how) {
        (true, "gz") => "application/vnd.docker.image.rootfs.diff.tar.gzip".to_string(),
        (true, _) => "application/vnd.docker.image.rootfs.diff.tar".to_string(),
        (false, "gz") => "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
        (false, "zstd") => "application/vnd.oci.image.layer.v1.tar+zstd".to_string(),
        (false, _) => "application/vnd.oci.image.layer.v1.tar".to_string(),
    };
    let (mut descs, mut diff_ids) = (Vec::new(), Vec::new());
    for l in layers {
        let blob = match how {
            "gz" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(l).unwrap();
                e.finish().unwrap()
            }
            "zstd" => zstd::encode_all(*l, 3).unwrap(),
            _ => l.to_vec(),
        };
        descs.push(json!({"mediaType": layer_type, "digest": put(&blob), "size": blob.len()}));
        diff_ids.push(format!("sha256:{}", sha256_hex(l)));
    }
    let config = config(json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}));
    let (manifest_type, config_type) = if docker {
        ("application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.container.image.v1+json")
    } else {
        ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.config.v1+json")
    };
    let manifest = json!({"schemaVersion": 2, "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": put(&config), "size": config.len()}, "layers": descs});
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap();
    let top = json!({"mediaType": manifest_type, "digest": put(&manifest), "size": manifest.len()});
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap()).unwrap();
}

/// The members of a tar as (raw header, data), for naming the first difference.
fn tar_members(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut a = tar::Archive::new(data);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let header = e.header().as_bytes().to_vec();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            (header, body)
        })
        .collect()
}

/// pullImage's archive is skopeo's: for each image (gzip, plain and zstd layers, several
/// layers, a layer repeated, a config with indentation, HTML characters and U+2028, Docker
/// schema 2 media types, both platforms of an index, Docker Hub-style short final names),
/// `pull --format docker-archive` writes the same bytes as nixpkgs' pullImage command,
/// `skopeo copy docker://NAME@DIGEST docker-archive://OUT:FINALNAME:FINALTAG` (with its flags),
/// and prefetch's hash is theirs. Whichever skopeo is on PATH: 1.9 on the host, 1.18 in
/// tests/modern (1.9 cannot write zstd images to a Docker archive: that case is skipped there).
#[test]
fn docker_archives_are_skopeos_byte_for_byte() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let arm = fixture_conf(dir.path(), "arm64");
    for c in ["gz", "none", "zstd"] {
        push(&conf, &format!("docker://{}/conf-{c}:v1", reg.addr()), &["--compressor", c, "-q"]);
    }
    let l1 = tar_layer(&[("etc/a", b"alpha\n"), ("bin/x", &[7u8; 3000])]);
    let l2 = tar_layer(&[("usr/share/doc/readme", "readme ".repeat(900).as_bytes())]);
    let l3 = tar_layer(&[("srv/data", &(0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>())]);
    let fancy = |mut c: Value| {
        c["created"] = json!("2024-05-06T07:08:09.123456789Z");
        c["author"] = json!("A <a@b.c> & co");
        c["config"] = json!({"Env": ["PATH=/bin", "X=<&>\u{2028}"], "Cmd": ["/bin/x"], "Labels": {"z": "1", "a": "é"}});
        c["container_config"] = json!({"Cmd": ["sh", "-c", "#(nop) x"]});
        c["docker_version"] = json!("20.10.7");
        c["history"] = json!([{"created_by": "x"}, {"created_by": "y", "empty_layer": true}]);
        let mut text = serde_json::to_string_pretty(&c).unwrap().into_bytes();
        text.push(b'\n');
        text
    };
    let layouts: [(&str, Vec<&[u8]>, &str, bool); 3] =
        [("fancy", vec![&l1, &l2, &l3], "gz", false), ("repeat", vec![&l1, &l2, &l1], "gz", false), ("docker", vec![&l2, &l3], "gz", true)];
    for (name, layers, how, docker) in &layouts {
        let layout = dir.path().join(name);
        hand_layout(&layout, layers, how, |c| if *name == "repeat" { serde_json::to_vec(&c).unwrap() } else { fancy(c) }, *docker);
        ok(stevedore(&["push", &format!("oci:{}", layout.display()), &format!("docker://{}/{name}:v1", reg.addr()), "--insecure", "-q"], &[]), "push layout");
    }
    push(&arm, &format!("docker://{}/arm:v1", reg.addr()), &["-q"]);
    let index = format!("docker://{}/multi:v1", reg.addr());
    ok(
        stevedore(&["index", &index, &format!("docker://{}/conf-gz:v1", reg.addr()), &format!("docker://{}/arm:v1", reg.addr()), "--insecure", "-q"], &[]),
        "index",
    );

    let cases = [
        ("conf-gz", "amd64", "example.org/final/app"),
        ("conf-none", "amd64", "nginx"),
        ("conf-zstd", "amd64", "team/app"),
        ("fancy", "amd64", "127.0.0.1:5000/x"),
        ("repeat", "amd64", "index.docker.io/x"),
        ("docker", "amd64", "localhost/d"),
        ("multi", "amd64", "multi"),
        ("multi", "arm64", "multi"),
    ];
    let tmp = dir.path().join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let mut compared = 0;
    for (repo, arch, final_name) in cases {
        let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/{repo}:v1", reg.addr())]);
        let source = format!("{}/{repo}@sha256:{}", reg.addr(), sha256_hex(&raw));
        let theirs = dir.path().join(format!("{repo}-{arch}.skopeo.tar"));
        let ours = dir.path().join(format!("{repo}-{arch}.tar"));
        // nixpkgs' pullImage builder, but for `--src-tls-verify=false` (tlsVerify = false).
        let out = Command::new("skopeo")
            .args(["--insecure-policy", &format!("--tmpdir={}", tmp.display()), "--override-os", "linux", "--override-arch", arch])
            .args(["copy", "--src-tls-verify=false", &format!("docker://{source}")])
            .arg(format!("docker-archive://{}:{final_name}:t1", theirs.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && repo == "conf-zstd" && stderr.contains("zstd compression is not supported") {
            eprintln!("this skopeo cannot write zstd images to a Docker archive; {repo} skipped");
            continue;
        }
        assert!(out.status.success(), "skopeo copy {source}: {stderr}");
        let args = ["pull", &format!("docker://{source}"), "--arch", arch, "--image-name", final_name, "--image-tag", "t1", "--insecure", "-q", "-o"];
        ok(stevedore(&[&args[..], &[ours.to_str().unwrap()]].concat(), &[]), "pull");
        let (a, b) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
        if a != b {
            let (ma, mb) = (tar_members(&a), tar_members(&b));
            for (i, (x, y)) in ma.iter().zip(&mb).enumerate() {
                let name = String::from_utf8_lossy(&y.0[..100]).trim_end_matches('\0').to_string();
                assert_eq!(x.0, y.0, "{repo}/{arch}: header of member {i} ({name}) differs from skopeo's");
                assert!(x.1 == y.1, "{repo}/{arch}: member {i} ({name}) differs: {:?} vs skopeo's {:?}", String::from_utf8_lossy(&x.1), String::from_utf8_lossy(&y.1));
            }
            panic!("{repo}/{arch}: {} members, skopeo's {}; {} bytes, skopeo's {}", ma.len(), mb.len(), a.len(), b.len());
        }
        compared += 1;
        if repo == "fancy" || repo == "multi" {
            // prefetch prints the hash of these bytes: a nixpkgs pullImage's.
            let (text, _) = ok(stevedore(&["prefetch", &format!("docker://{}/{repo}:v1", reg.addr()), "--arch", arch, "--final-image-name", final_name, "--final-image-tag", "t1", "--insecure", "-q"], &[]), "prefetch");
            use sha2::Digest;
            let sri = format!("sha256-{}", stevedore::registry::auth::base64_encode(&sha2::Sha256::digest(&b)));
            assert!(text.contains(&format!("hash = \"{sri}\";")), "{text}");
        }
    }
    assert!(compared >= 7, "only {compared} images compared");
}

#[test]
fn pull_image_nix_fixed_output_derivation() {
    if !have_tools() {
        return;
    }
    if Command::new("nix-build").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have nix-build");
        eprintln!("nix-build missing; pullImage test skipped");
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "arm64");
    let dest = format!("docker://{}/nixpull:v2", reg.addr());
    push(&conf, &dest, &["-q"]);
    let (text, _) = ok(stevedore(&["prefetch", &dest, "--arch", "arm64", "--insecure", "-q"], &[]), "prefetch");
    let field = |name: &str| -> String {
        let line = text.lines().find(|l| l.trim_start().starts_with(&format!("{name} = "))).unwrap();
        line.split('"').nth(1).unwrap().to_string()
    };

    // The binary as a package in the store, as nix/default.nix receives it.
    let pkg = dir.path().join("stevedore");
    fs::create_dir_all(pkg.join("bin")).unwrap();
    fs::copy(bin(), pkg.join("bin/stevedore")).unwrap();
    let added = Command::new("nix-store").arg("--add").arg(&pkg).output().unwrap();
    assert!(added.status.success(), "nix-store --add: {}", String::from_utf8_lossy(&added.stderr));
    let store_path = String::from_utf8(added.stdout).unwrap().trim().to_string();
    let nix_file = concat!(env!("CARGO_MANIFEST_DIR"), "/nix/pull-image.nix");
    let build = |hash: &str| {
        let expr = format!(
            r#"let pullImage = import {nix_file} {{ stevedore = builtins.storePath "{store_path}"; }};
               in pullImage {{ imageName = "{}"; imageDigest = "{}"; hash = "{hash}"; finalImageTag = "v2"; arch = "arm64"; tlsVerify = false; }}"#,
            field("imageName"),
            field("imageDigest")
        );
        Command::new("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .env("NIX_CONFIG", "sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = build(&field("hash"));
    assert!(out.status.success(), "nix-build failed: {}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let image = Image::parse(&fs::read(&path).unwrap());
    assert_eq!(image.config["architecture"], "arm64");
    assert_eq!(image.manifest[0]["RepoTags"], json!([format!("{}/nixpull:v2", reg.addr())]));
    // A wrong hash fails the build (the fixed-output check), naming the real one.
    let wrong = format!("sha256-{}", stevedore::registry::auth::base64_encode(&[7u8; 32]));
    let out = build(&wrong);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hash mismatch"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn https_with_a_private_ca() {
    if !have_tools() {
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A CA, and a server certificate for 127.0.0.1 signed by it (webpki refuses a CA
    // certificate as the server's own).
    let (ca, cert, key) = (dir.path().join("ca.pem"), dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let script = r#"set -e
        ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        openssl req -x509 $ec -days 2 -subj /CN=test-ca -keyout ca-key.pem -out ca.pem 2>/dev/null
        openssl req $ec -subj /CN=127.0.0.1 -keyout key.pem -out req.pem 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > ext.cnf
        openssl x509 -req -in req.pem -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile ext.cnf -out cert.pem 2>/dev/null"#;
    let out = Command::new("sh").args(["-c", script]).current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    let reg = Registry::start_with(None, Some((&cert, &key)));
    let conf = fixture_conf(dir.path(), "amd64");
    let dest = format!("docker://{}/tls:v1", reg.addr());
    let args = ["push", conf.to_str().unwrap(), &dest, "-q"];
    // Unknown CA: refused, in one line.
    let out = stevedore(&args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim().lines().count() == 1 && stderr.contains("TLS handshake"), "{stderr}");
    // The CA given by SSL_CERT_FILE: verified HTTPS.
    let (digest, _) = ok(stevedore(&args, &[("SSL_CERT_FILE", &ca)]), "push over verified TLS");
    // --insecure: HTTPS without verification.
    let mut insecure = args.to_vec();
    insecure.push("--insecure");
    let (again, _) = ok(stevedore(&insecure, &[]), "push over unverified TLS");
    assert_eq!(again, digest);
    let pulled = dir.path().join("p.tar");
    ok(stevedore(&["pull", &dest, "-q", "-o", pulled.to_str().unwrap()], &[("SSL_CERT_FILE", &ca)]), "pull over TLS");
    assert_eq!(Image::parse(&fs::read(&pulled).unwrap()).layer_count(), 8);
}

/// One request as a scripted front saw it (body read whole: test requests are small).
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The front's own port.
    port: u16,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What a scripted front does with a request.
enum Act {
    /// Pass it to the upstream registry, replacing `.0` with `.1` in the response head if given.
    Forward(Option<(String, String)>),
    /// Answer with this status, extra header lines and body.
    Reply(&'static str, String, Vec<u8>),
    /// Write `head`, then `unit` over and over, up to `max` bytes in all (or until the client
    /// goes away): a server that does not stop.
    Endless { head: String, unit: Vec<u8>, max: u64 },
    /// Reset the connection (RST) instead of answering.
    Reset,
    /// Answer nothing, holding the connection until the client goes away (or 60 s).
    Silent,
    /// Write `head`, then `unit` every `every` until the client goes away (or 60 s): a server
    /// that is never quite silent.
    Drip { head: String, unit: Vec<u8>, every: Duration },
}

/// A scripted HTTP server on 127.0.0.1 (in front of `upstream`, if any), one request per
/// connection: `rule` decides what each request gets. Logs every request with the
/// Authorization header it carried, and counts the bytes it wrote.
struct Front {
    port: u16,
    log: Arc<Mutex<Vec<(String, Option<String>)>>>,
    written: Arc<std::sync::atomic::AtomicU64>,
    _server: Server,
}

impl Front {
    fn log(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }
    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Resets `s`: SO_LINGER 0, so closing sends RST rather than FIN.
fn reset(s: TcpStream) {
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
}

fn start_front(upstream: Option<u16>, rule: impl Fn(&Req) -> Act + Send + Sync + 'static) -> Front {
    let log = Arc::new(Mutex::new(Vec::new()));
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (log2, written2) = (log.clone(), written.clone());
    let server = Server::start(move |conn| {
        let (log, written) = (&log2, &written2);
        let port = conn.local_addr().unwrap().port();
        conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
        conn.set_write_timeout(Some(Duration::from_secs(20))).ok();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let Some((method, path, headers)) = read_head(&mut r) else { return };
        let len: usize = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let req = Req { method, path, headers, body, port };
        let auth = req.header("authorization").map(str::to_owned);
        log.lock().unwrap().push((format!("{} {}", req.method, req.path), auth));
        let mut conn = conn;
        match rule(&req) {
            Act::Reply(status, headers, body) => {
                let head = format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&body));
            }
            Act::Endless { head, unit, max } => {
                let mut n = 0u64;
                let mut ok = conn.write_all(head.as_bytes()).is_ok();
                while ok && n < max {
                    ok = conn.write_all(&unit).is_ok();
                    n += unit.len() as u64;
                    written.fetch_add(unit.len() as u64, Ordering::SeqCst);
                }
            }
            Act::Reset => {
                drop(r);
                reset(conn);
            }
            Act::Silent => {
                conn.set_read_timeout(Some(Duration::from_secs(60))).ok();
                let _ = r.read(&mut [0u8; 1]);
            }
            Act::Drip { head, unit, every } => {
                let until = Instant::now() + Duration::from_secs(60);
                let mut ok = conn.write_all(head.as_bytes()).is_ok();
                while ok && Instant::now() < until {
                    std::thread::sleep(every);
                    ok = conn.write_all(&unit).is_ok();
                    written.fetch_add(unit.len() as u64, Ordering::SeqCst);
                }
            }
            Act::Forward(rewrite) => {
                let Some(Ok(mut up)) = upstream.map(|p| TcpStream::connect(("127.0.0.1", p))) else { return };
                up.set_read_timeout(Some(Duration::from_secs(20))).ok();
                let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
                for (k, v) in &req.headers {
                    if !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("authorization") {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                }
                head.push_str("Connection: close\r\n\r\n");
                if up.write_all(head.as_bytes()).and_then(|()| up.write_all(&req.body)).is_err() {
                    return;
                }
                let mut ur = BufReader::new(up);
                let mut resp_head = String::new();
                loop {
                    let mut line = String::new();
                    if ur.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    resp_head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                if let Some((from, to)) = rewrite {
                    resp_head = resp_head.replace(&from, &to);
                }
                if conn.write_all(resp_head.as_bytes()).is_ok() {
                    let _ = std::io::copy(&mut ur, &mut conn);
                }
            }
        }
    });
    Front { port: server.port, log, written, _server: server }
}

/// Runs stevedore, failing the test if it takes longer than `secs` (a hang).
fn stevedore_within(secs: u64, args: &[&str]) -> (bool, String) {
    stevedore_within_env(secs, args, &[])
}

/// `stevedore_within` with variables set.
fn stevedore_within_env(secs: u64, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let home = std::env::temp_dir().join("stevedore-registry-test-home");
    fs::create_dir_all(&home).unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(bin())
        .args(args)
        .env("HOME", &home)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stevedore {args:?} still running after {secs} s: {}", fs::read_to_string(err.path()).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), fs::read_to_string(err.path()).unwrap())
}

/// Which faults a rule has injected already (each fires once).
#[derive(Clone, Default)]
struct Once(Arc<Mutex<Vec<String>>>);

impl Once {
    fn first(&self, key: &str) -> bool {
        let mut fired = self.0.lock().unwrap();
        if fired.iter().any(|k| k == key) {
            return false;
        }
        fired.push(key.to_string());
        true
    }
    fn fired(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn push_survives_a_fault_on_every_kind_of_request() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let (conf, expected, manifest) = direct_image(&reg, dir.path());
    let layers = manifest["layers"].as_array().unwrap();
    // The last layer is the last upload of the pass: its PUT completes as the pass ends.
    let last_layer = layers.last().unwrap()["digest"].as_str().unwrap().to_string();

    for (chunk, bearer) in [("64M", false), ("64K", true)] {
        let once = Once::default();
        let faults = once.clone();
        let last = format!("digest={}", last_layer.replace(':', "%3A"));
        let front = start_front(Some(reg.port), move |req| {
            let (m, p) = (req.method.as_str(), req.path.as_str());
            if bearer && p.starts_with("/token") {
                if faults.first("token 503") {
                    return Act::Reply("503 Service Unavailable", "Retry-After: 1\r\n".into(), vec![]);
                }
                let want = format!("Basic {}", stevedore::registry::auth::base64_encode(b"user:pw"));
                return if req.header("authorization") == Some(want.as_str()) {
                    Act::Reply("200 OK", "Content-Type: application/json\r\n".into(), format!("{{\"token\":\"{TOKEN}\"}}").into_bytes())
                } else {
                    Act::Reply("401 Unauthorized", String::new(), vec![])
                };
            }
            if bearer && req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
                return Act::Reply("401 Unauthorized", bearer_challenge(req.port), vec![]);
            }
            let fault = match m {
                "HEAD" if p.contains("/blobs/") => faults.first("HEAD 429").then(|| Act::Reply("429 Too Many Requests", "Retry-After: 1\r\n".into(), vec![])),
                "POST" if p.contains("/blobs/uploads/") => faults.first("POST reset").then_some(Act::Reset),
                "PATCH" => faults.first("PATCH reset").then_some(Act::Reset),
                "PUT" if p.contains(&last) => faults.first("last PUT 500").then(|| Act::Reply("500 Internal Server Error", String::new(), vec![])),
                "PUT" if p.contains("/manifests/") => faults.first("manifest reset").then_some(Act::Reset),
                _ => None,
            };
            fault.unwrap_or(Act::Forward(None))
        });
        let repo = format!("faulty{}", front.port);
        let dest = format!("docker://127.0.0.1:{}/{repo}:v1", front.port);
        let mut args = vec!["--chunk-size", chunk];
        if bearer {
            args.extend(["--creds", "user:pw"]);
        }
        let (digest, stderr) = push(&conf, &dest, &args);
        assert_eq!(digest, expected, "{stderr}");
        assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
        // The PUT that got the 500 was retried in a new upload session.
        let last = format!("digest={}", last_layer.replace(':', "%3A"));
        let sessions: Vec<String> = front.log().iter().filter(|(l, _)| l.starts_with("PUT ") && l.contains(&last)).map(|(l, _)| l.split('?').next().unwrap().to_string()).collect();
        assert!(sessions.len() == 2 && sessions[0] != sessions[1], "{sessions:?}");
        let mut want = vec!["HEAD 429", "POST reset", "last PUT 500", "manifest reset"];
        if bearer {
            want.extend(["token 503", "PATCH reset"]);
        }
        let fired = once.fired();
        for w in want {
            assert!(fired.iter().any(|f| f == w), "fault {w:?} was not injected: {fired:?}");
        }
        // What landed is whole: skopeo copies it out and the layers hash to their diff_ids.
        let count = assert_whole(&format!("docker://{}/{repo}:v1", reg.addr()), &dir.path().join(format!("{repo}.tar")));
        assert_eq!(count, layers.len());
    }
}

const SECRET: &str = "s3cret-pw";

/// A's rule for the credential tests: requires user:SECRET (Basic, or a Bearer token from the
/// realm at `realm`), sends uploads to `foreign` (their Location) and blob GETs there (307),
/// HEADs too once `heads` is set; `/v2/echo/` manifests answer 400 with the Authorization
/// header echoed in the error.
fn own_origin_rule(realm: Option<u16>, foreign: u16, heads: Arc<AtomicBool>) -> impl Fn(&Req) -> Act + Send + Sync + 'static {
    move |req| {
        let auth = req.header("authorization").unwrap_or("");
        let ok = match realm {
            None => auth == format!("Basic {}", stevedore::registry::auth::base64_encode(format!("user:{SECRET}").as_bytes())),
            Some(_) => auth == format!("Bearer {TOKEN}"),
        };
        if !ok {
            let challenge = match realm {
                None => "WWW-Authenticate: Basic realm=\"test\"\r\n".to_string(),
                Some(p) => format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{p}/token\",service=\"test\"\r\n"),
            };
            return Act::Reply("401 Unauthorized", challenge, vec![]);
        }
        let (m, p) = (req.method.as_str(), req.path.as_str());
        if p.starts_with("/v2/echo/") {
            let body = json!({"errors": [{"code": "DENIED", "message": format!("you sent {auth}")}]});
            return Act::Reply("400 Bad Request", "Content-Type: application/json\r\n".into(), body.to_string().into_bytes());
        }
        if (m == "GET" || (m == "HEAD" && heads.load(Ordering::SeqCst))) && p.contains("/blobs/sha256:") {
            return Act::Reply("307 Temporary Redirect", format!("Location: http://127.0.0.1:{foreign}{p}\r\n"), vec![]);
        }
        if m == "POST" && p.contains("/blobs/uploads/") {
            return Act::Forward(Some((format!("127.0.0.1:{}", req.port), format!("127.0.0.1:{foreign}"))));
        }
        Act::Forward(None)
    }
}

#[test]
fn credentials_go_to_the_registry_origin_only() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let basic = basic_secret();
    // B: another origin (blob storage, an upload service) in front of the same registry.
    let foreign = start_front(Some(reg.port), |_| Act::Forward(None));
    let realm = token_server();
    let creds = format!("user:{SECRET}");
    for bearer in [false, true] {
        let heads = Arc::new(AtomicBool::new(false));
        let own = start_front(Some(reg.port), own_origin_rule(bearer.then_some(realm.port), foreign.port, heads.clone()));
        let before = foreign.log().len();
        // Uploads in monolithic PUTs and in PATCH chunks (at B, from the upload Location), and
        // a pull (blob GETs redirected to B).
        for (repo, chunk) in [("a", "64M"), ("b", "64K")] {
            let dest = format!("docker://127.0.0.1:{}/{repo}{}:v1", own.port, own.port);
            let (_, stderr) = push(&conf, &dest, &["--chunk-size", chunk, "--creds", &creds]);
            assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
        }
        let pulled = dir.path().join("p.tar");
        let src = format!("docker://127.0.0.1:{}/a{}:v1", own.port, own.port);
        ok(stevedore(&["pull", &src, "--insecure", "-q", "--creds", &creds, "-o", pulled.to_str().unwrap()], &[]), "pull");
        assert_eq!(Image::parse(&fs::read(&pulled).unwrap()).layer_count(), 8);
        let check = |kinds: &[&str]| {
            let seen = foreign.log()[before..].to_vec();
            let leaked: Vec<_> = seen.iter().filter(|(_, a)| a.is_some()).collect();
            assert!(leaked.is_empty(), "credentials sent to another origin: {leaked:?}");
            for kind in kinds {
                assert!(seen.iter().any(|(l, _)| l.starts_with(kind)), "no {kind}at the other origin: {seen:?}");
            }
        };
        check(&["PUT ", "PATCH ", "GET "]);
        // A push that finds every blob (HEADs redirected to B).
        heads.store(true, Ordering::SeqCst);
        let (_, stderr) = push(&conf, &format!("docker://127.0.0.1:{}/a{}:v2", own.port, own.port), &["--creds", &creds]);
        assert!(summary(&stderr).starts_with("summary: 9 blobs: 0 uploaded (0 bytes), 0 mounted, 9 existed"), "{stderr}");
        check(&["HEAD "]);
        // The token server sees the password, never the token; the registry sees the token.
        assert!(realm.log().iter().all(|(_, a)| a.as_deref().is_none_or(|a| a == basic)), "{:?}", realm.log());
        if bearer {
            assert!(own.log().iter().any(|(_, a)| a.as_deref() == Some(&format!("Bearer {TOKEN}"))));
            assert!(own.log().iter().all(|(_, a)| a.as_deref() != Some(basic.as_str())), "the password went to the registry, not the realm");
        }
    }
}

fn basic_secret() -> String {
    format!("Basic {}", stevedore::registry::auth::base64_encode(format!("user:{SECRET}").as_bytes()))
}

/// A token server that gives TOKEN for user:SECRET.
fn token_server() -> Front {
    let want = basic_secret();
    start_front(None, move |req| {
        if req.header("authorization") == Some(want.as_str()) {
            Act::Reply("200 OK", "Content-Type: application/json\r\n".into(), format!("{{\"token\":\"{TOKEN}\"}}").into_bytes())
        } else {
            Act::Reply("401 Unauthorized", String::new(), vec![])
        }
    })
}

#[test]
fn a_refusal_by_another_origin_is_not_blamed_on_the_credentials() {
    let (upstream, _, _) = hostile_registry();
    // B, where the registry redirects blob reads, refuses them all.
    let foreign = start_front(None, |_| Act::Reply("401 Unauthorized", "WWW-Authenticate: Basic realm=\"storage\"\r\n".into(), vec![]));
    let realm = token_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tar");
    let creds = format!("user:{SECRET}");
    let secrets = [SECRET.to_string(), basic_secret()["Basic ".len()..].to_string(), TOKEN.to_string()];
    for bearer in [false, true] {
        let own = start_front(Some(upstream.port), own_origin_rule(bearer.then_some(realm.port), foreign.port, Arc::new(AtomicBool::new(true))));
        let pull = |repo: &str| {
            let image = format!("docker://127.0.0.1:{}/{repo}:v1", own.port);
            let (success, stderr) = stevedore_within(60, &["pull", &image, "--insecure", "-q", "--arch", "amd64", "--creds", &creds, "-o", out.to_str().unwrap()]);
            assert!(!success && stderr.trim().lines().count() == 1, "{stderr}");
            for s in &secrets {
                assert!(!stderr.contains(s.as_str()), "a secret in: {stderr}");
            }
            stderr
        };
        // B's 401 is its refusal, not the registry's: say who, and that it got no credentials.
        let stderr = pull("ok");
        assert!(stderr.contains(&foreign.origin()) && stderr.contains("no credentials were sent there"), "{stderr}");
        assert!(!stderr.contains("rejected the credentials"), "{stderr}");
        assert!(foreign.log().iter().all(|(_, a)| a.is_none()), "credentials sent to another origin: {:?}", foreign.log());
        // A registry that echoes our Authorization header back in an error: not printed.
        let stderr = pull("echo");
        assert!(stderr.contains("DENIED") && stderr.contains("<redacted>"), "{stderr}");
    }
}

/// A registry on 127.0.0.1 serving one image (a config and one 1000-byte layer) under any
/// repository name, hostile in the way the name says (see the test). Returns it and the
/// layer's and the config's digests.
/// One small image: a 1000-byte layer, its config and manifest, with their digests.
struct TinyImage {
    layer: Vec<u8>,
    layer_digest: String,
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
}

fn tiny_image() -> TinyImage {
    let layer = vec![b'x'; 1000];
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}).to_string().into_bytes();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    TinyImage { layer, layer_digest, config, config_digest, manifest }
}

fn hostile_registry() -> (Front, String, String) {
    let TinyImage { layer, layer_digest, config, config_digest, manifest } = tiny_image();
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    // An index whose entry says the manifest is 100 bytes shorter than it is.
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len() - 100,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    })
    .to_string()
    .into_bytes();
    let (ld, cd) = (layer_digest.clone(), config_digest.clone());
    let front = start_front(None, move |req| {
        let p = req.path.as_str();
        let repo = p.trim_start_matches("/v2/").split('/').next().unwrap_or("");
        // Up to 1 GiB: far more than any bounded reader takes, little enough to end the test
        // (with an error) where a reader is not bounded.
        let endless = |head: &str, unit: &[u8]| Act::Endless { head: head.to_string(), unit: unit.to_vec(), max: 1 << 30 };
        let until_close = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        let is_layer = p.ends_with(&ld) && p.contains("/blobs/");
        match repo {
            _ if p == "/v2/" => Act::Reply("200 OK", String::new(), vec![]),
            _ if p.starts_with("/token") => endless("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"token\":\"", b"aaaaaaaaaaaaaaaa"),
            "token" => Act::Reply("401 Unauthorized", format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{}/token\"\r\n", req.port), vec![]),
            "bigmanifest" if p.contains("/manifests/") => endless(until_close, b"{\"a\":\"                        \"}"),
            "index" if p.ends_with("/manifests/v1") => Act::Reply("200 OK", "Content-Type: application/vnd.oci.image.index.v1+json\r\n".into(), index.clone()),
            "index" if p.contains("/manifests/") => endless("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n", &manifest),
            _ if p.contains("/manifests/") => Act::Reply("200 OK", "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n".into(), manifest.clone()),
            "bigconfig" if p.ends_with(&cd) => endless(until_close, b"{ }"),
            _ if p.ends_with(&cd) => Act::Reply("200 OK", String::new(), config.clone()),
            _ if !is_layer => Act::Reply("404 Not Found", String::new(), vec![]),
            "long" => endless(until_close, &[b'x'; 4096]),
            "chunked" => endless("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", format!("1000\r\n{}\r\n", "x".repeat(0x1000)).as_bytes()),
            "length" => Act::Reply("200 OK", String::new(), vec![b'x'; 2000]),
            "trailers" => endless(&format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n0\r\n", "x".repeat(1000)), b"X-Trailer: again\r\n"),
            "interim" => endless("", b"HTTP/1.1 100 Continue\r\n\r\n"),
            _ => Act::Reply("200 OK", String::new(), layer.clone()),
        }
    });
    (front, layer_digest, config_digest)
}

#[test]
fn pull_reads_no_more_than_the_descriptors_say() {
    let (front, layer, config) = hostile_registry();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tar");
    let pull = |repo: &str| {
        let image = format!("docker://127.0.0.1:{}/{repo}:v1", front.port);
        let before = front.written.load(Ordering::SeqCst);
        let (success, stderr) = stevedore_within(60, &["pull", &image, "--insecure", "-q", "--retries", "1", "--arch", "amd64", "-o", out.to_str().unwrap()]);
        (success, stderr, front.written.load(Ordering::SeqCst) - before)
    };
    let (success, stderr, _) = pull("ok");
    assert!(success, "the well-behaved image does not pull: {stderr}");
    fs::remove_file(&out).unwrap();
    for (repo, want) in [
        ("long", vec![layer.as_str(), "longer than the 1000 bytes its descriptor gives"]),
        ("chunked", vec![layer.as_str(), "longer than the 1000 bytes its descriptor gives"]),
        ("length", vec![layer.as_str(), "2000 bytes (Content-Length), its descriptor says 1000"]),
        ("trailers", vec![layer.as_str(), "too many chunked trailers"]),
        ("interim", vec!["too many interim"]),
        ("bigconfig", vec![config.as_str(), "longer than the"]),
        ("bigmanifest", vec!["manifest", "larger than 4194304 bytes"]),
        ("index", vec!["manifest", "longer than the", "its descriptor gives"]),
        ("token", vec!["token response is larger than 1 MiB"]),
    ] {
        let (success, stderr, written) = pull(repo);
        assert!(!success, "{repo}: pulled");
        assert_eq!(stderr.trim().lines().count(), 1, "{repo}: {stderr}");
        assert!(stderr.starts_with("stevedore: ") && !stderr.contains("panicked"), "{repo}: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{repo}: no {w:?} in: {stderr}");
        }
        // What the server managed to write: what was read, plus what the sockets buffer.
        assert!(written < 64 << 20, "{repo}: the server wrote {written} bytes before the client stopped reading");
        assert!(!out.exists() && !dir.path().join("out.tar.partial").exists(), "{repo}");
    }
}

/// With STEVEDORE_REGISTRY_TIMEOUT=T (1 s here), a registry that says nothing, or drips its
/// answers, fails a pull in one line within a few T: each request (or blob download) that
/// times out is tried twice, not `--retries` + 1 (5) times. Silence and drips at every stage:
/// the ping, a manifest's head, a config read into memory, a layer streamed (a head, then
/// silence; or bytes below 1 KiB/s), the token server.
#[test]
fn silent_and_dripping_registries_fail_in_bounded_time() {
    let img = tiny_image();
    let (ld, cd) = (img.layer_digest.clone(), img.config_digest.clone());
    let (config, layer, manifest) = (img.config.clone(), img.layer.clone(), img.manifest.clone());
    let front = start_front(None, move |req| {
        let p = req.path.as_str();
        let repo = p.trim_start_matches("/v2/").split('/').next().unwrap_or("");
        let drip = |head: String, unit: &[u8], ms: u64| Act::Drip { head, unit: unit.to_vec(), every: Duration::from_millis(ms) };
        let sized = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
        match repo {
            _ if p == "/v2/" => Act::Reply("200 OK", String::new(), vec![]),
            _ if p.starts_with("/token") => Act::Silent,
            "token" => Act::Reply("401 Unauthorized", format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{}/token\"\r\n", req.port), vec![]),
            "silent" => Act::Silent,
            "drip-head" => drip("HTTP/1.1 200 OK\r\n".into(), b"X-Drip: y\r\n", 300),
            _ if p.contains("/manifests/") => Act::Reply("200 OK", "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n".into(), manifest.clone()),
            "drip-config" if p.ends_with(&cd) => drip(sized(config.len()), b"{", 100),
            _ if p.ends_with(&cd) => Act::Reply("200 OK", String::new(), config.clone()),
            "quiet-layer" if p.ends_with(&ld) => drip(sized(layer.len()), b"", 500),
            "drip-layer" if p.ends_with(&ld) => drip(sized(layer.len()), b"x", 100),
            _ if p.ends_with(&ld) => Act::Reply("200 OK", String::new(), layer.clone()),
            _ => Act::Reply("404 Not Found", String::new(), vec![]),
        }
    });
    let silent_ping = start_front(None, |_| Act::Silent);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.tar");
    let env = [("STEVEDORE_REGISTRY_TIMEOUT", "1")];
    let pull = |port: u16, repo: &str| {
        let image = format!("docker://127.0.0.1:{port}/{repo}:v1");
        let started = Instant::now();
        let (success, stderr) = stevedore_within_env(60, &["pull", &image, "--insecure", "-q", "--arch", "amd64", "-o", out.to_str().unwrap()], &env);
        (success, stderr, started.elapsed())
    };
    let (success, stderr, _) = pull(front.port, "ok");
    assert!(success, "the well-behaved image does not pull: {stderr}");
    fs::remove_file(&out).unwrap();
    let (config_get, layer_get) = (format!("/blobs/{}", img.config_digest), format!("/blobs/{}", img.layer_digest));
    for (port, repo, stalled, want) in [
        (silent_ping.port, "ping", "GET /v2/", "cannot reach registry"),
        (front.port, "silent", "GET /v2/silent/manifests/v1", "manifests/v1"),
        (front.port, "drip-head", "GET /v2/drip-head/manifests/v1", "manifests/v1"),
        (front.port, "drip-config", config_get.as_str(), "config"),
        (front.port, "quiet-layer", layer_get.as_str(), "no data for 1 s"),
        (front.port, "drip-layer", layer_get.as_str(), "too slow"),
        (front.port, "token", "GET /token", "cannot get a token"),
    ] {
        let log_before = if port == front.port { front.log().len() } else { silent_ping.log().len() };
        let (success, stderr, took) = pull(port, repo);
        eprintln!("{repo}: failed after {took:?}: {}", stderr.trim());
        assert!(!success, "{repo}: pulled");
        assert_eq!(stderr.trim().lines().count(), 1, "{repo}: {stderr}");
        assert!(stderr.starts_with("stevedore: ") && !stderr.contains("panicked"), "{repo}: {stderr}");
        assert!(stderr.contains("STEVEDORE_REGISTRY_TIMEOUT=1") && stderr.contains(want), "{repo}: {stderr}");
        // Two tries of 1 s, 0.5 s between them, and (--insecure) maybe 1 s of an HTTPS
        // handshake nobody answers before plain HTTP; the rest is slack for a loaded machine.
        assert!(took < Duration::from_secs(10), "{repo}: took {took:?}: {stderr}");
        let log = if port == front.port { front.log() } else { silent_ping.log() };
        let tries = log[log_before..].iter().filter(|(l, _)| l.contains(stalled)).count();
        assert_eq!(tries, 2, "{repo}: {stalled} tried {tries} times: {:?}", &log[log_before..]);
        assert!(!out.exists(), "{repo}");
    }
}

/// A registry that takes an upload and never answers it: the push fails in one line within
/// a few T, the upload tried twice (a new session each time).
#[test]
fn a_registry_that_never_answers_an_upload() {
    let uploads = Arc::new(AtomicUsize::new(0));
    let n = uploads.clone();
    let front = start_front(None, move |req| {
        let (m, p) = (req.method.as_str(), req.path.as_str());
        match m {
            _ if p == "/v2/" => Act::Reply("200 OK", String::new(), vec![]),
            "POST" if p.ends_with("/blobs/uploads/") => {
                let id = n.fetch_add(1, Ordering::SeqCst);
                Act::Reply("202 Accepted", format!("Location: {p}session{id}\r\n"), vec![])
            }
            "PUT" | "PATCH" => Act::Silent,
            _ => Act::Reply("404 Not Found", String::new(), vec![]),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let dest = format!("docker://127.0.0.1:{}/app:v1", front.port);
    let started = Instant::now();
    let (success, stderr) = stevedore_within_env(60, &["push", conf.to_str().unwrap(), &dest, "--insecure", "-q"], &[("STEVEDORE_REGISTRY_TIMEOUT", "1")]);
    let took = started.elapsed();
    eprintln!("push failed after {took:?}: {}", stderr.trim());
    assert!(!success && stderr.trim().lines().count() == 1, "{stderr}");
    assert!(stderr.contains("uploading blob") && stderr.contains("STEVEDORE_REGISTRY_TIMEOUT=1"), "{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {stderr}");
    let puts: Vec<String> = front.log().into_iter().map(|(l, _)| l).filter(|l| l.starts_with("PUT ")).collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    assert_ne!(puts[0].split('?').next(), puts[1].split('?').next(), "{puts:?}");
}

/// A credential helper that never exits is killed after the timeout, and one that prints
/// without end is stopped; either is a one-line error naming the helper, never its output.
#[test]
fn credential_helpers_that_hang_or_babble_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let pid_file = dir.path().join("hang.pid");
    fake_helper(&bin, "hang", &format!("echo $$ >'{}'; echo SECRET-hang; exec sleep 600", pid_file.display()));
    fake_helper(&bin, "babble", "while :; do echo 'SECRET-babble'; done");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    for helper in ["hang", "babble"] {
        // Nothing listens on port 1: the helper runs before any connection.
        let config = write_json(dir.path(), "config.json", &json!({"credHelpers": {"127.0.0.1:1": helper}}));
        let out = dir.path().join("out.tar");
        let started = Instant::now();
        let (success, stderr) = stevedore_within_env(
            60,
            &["pull", "docker://127.0.0.1:1/app:v1", "--insecure", "-o", out.to_str().unwrap()],
            &[("REGISTRY_AUTH_FILE", config.to_str().unwrap()), ("PATH", &path), ("STEVEDORE_REGISTRY_TIMEOUT", "1")],
        );
        let took = started.elapsed();
        assert!(!success && stderr.trim().lines().count() == 1, "{helper}: {stderr}");
        assert!(stderr.contains(&format!("credential helper docker-credential-{helper} (from auth file {})", config.display())), "{stderr}");
        assert!(!stderr.contains("SECRET"), "{helper}: its output in: {stderr}");
        let want = if helper == "hang" { "did not finish within 1 s" } else { "printed more than 64 KiB" };
        assert!(stderr.contains(want), "{stderr}");
        assert!(took < Duration::from_secs(10), "{helper}: took {took:?}");
    }
    let pid = fs::read_to_string(&pid_file).unwrap();
    assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists(), "the hanging helper (pid {pid}) is still running");
}

/// Bearer tokens that expire while a push runs (each serves `uses` requests, then the
/// registry answers 401 with a new challenge): in-memory requests and streamed uploads alike
/// get a fresh token and go on (an upload from a new session), and the image lands whole. A
/// registry that refuses every upload whatever the token fails the push in one line, with a
/// token fetched again once per try, not without end.
#[test]
fn expired_tokens_are_refreshed_mid_push() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let (conf, expected, manifest) = direct_image(&reg, dir.path());
    let largest = manifest["layers"].as_array().unwrap().iter().map(|l| l["size"].as_u64().unwrap()).max().unwrap();
    // Chunks small enough that the largest layer takes several PATCHes; a token serves as
    // many requests as that layer's upload needs (POST, the PATCHes, the PUT), so each upload
    // can finish on a fresh token, but no token lasts the push.
    let chunk = (largest / 4).max(1024);
    let uses = 2 + largest.div_ceil(chunk) as usize;

    for refuse_uploads in [false, true] {
        let issued = Arc::new(AtomicUsize::new(0));
        let counts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Default::default();
        let refused: Arc<Mutex<Vec<String>>> = Default::default();
        let (issued2, refused2) = (issued.clone(), refused.clone());
        let front = start_front(Some(reg.port), move |req| {
            let (m, p) = (req.method.as_str(), req.path.as_str());
            if p.starts_with("/token") {
                let n = issued2.fetch_add(1, Ordering::SeqCst) + 1;
                return Act::Reply("200 OK", "Content-Type: application/json\r\n".into(), format!("{{\"token\":\"tok-{n}\"}}").into_bytes());
            }
            let challenge = bearer_challenge(req.port);
            let Some(token) = req.header("authorization").and_then(|a| a.strip_prefix("Bearer tok-")) else {
                return Act::Reply("401 Unauthorized", challenge, vec![]);
            };
            let used = {
                let mut c = counts.lock().unwrap();
                let n = c.entry(token.to_string()).or_default();
                *n += 1;
                *n
            };
            let streamed = (m == "PATCH" || m == "PUT") && p.contains("/blobs/uploads/");
            if if refuse_uploads { streamed } else { used > uses } {
                refused2.lock().unwrap().push(format!("{m} {}", p.split('?').next().unwrap()));
                let body = json!({"errors": [{"code": "UNAUTHORIZED", "message": "token expired"}]}).to_string().into_bytes();
                return Act::Reply("401 Unauthorized", format!("{challenge}Content-Type: application/json\r\n"), body);
            }
            Act::Forward(None)
        });
        let dest = format!("docker://127.0.0.1:{}/expiring{}:v1", front.port, front.port);
        let chunk_arg = chunk.to_string();
        let mut args = vec!["push", conf.to_str().unwrap(), &dest, "--insecure", "--chunk-size", &chunk_arg];
        if refuse_uploads {
            args.push("-q");
        }
        let (success, stderr) = stevedore_within(120, &args);
        let refused = refused.lock().unwrap().clone();
        let issued = issued.load(Ordering::SeqCst);
        if refuse_uploads {
            assert!(!success && stderr.trim().lines().count() == 1, "{stderr}");
            assert!(stderr.contains("uploading blob") && stderr.contains("refused our token (HTTP 401)"), "{stderr}");
            // The first token, and one fresh one for the upload's second try.
            assert_eq!(issued, 2, "tokens issued: {issued}; refused: {refused:?}");
            assert_eq!(refused.len(), 2, "{refused:?}");
            continue;
        }
        assert!(success, "{stderr}\nuses {uses}, chunk {chunk}, {issued} tokens; refused: {refused:?}\n{:?}", front.log());
        assert!(summary(&stderr).starts_with("summary: 9 blobs: 9 uploaded"), "{stderr}");
        assert!(issued > 2, "only {issued} tokens for the whole push (uses {uses}, chunk {chunk})");
        let streamed = refused.iter().filter(|r| (r.starts_with("PATCH ") || r.starts_with("PUT ")) && r.contains("/blobs/uploads/")).count();
        assert!(streamed > 0, "no upload request met an expired token: {refused:?}");
        assert!(refused.iter().any(|r| !r.contains("/blobs/uploads/")), "no in-memory request met an expired token: {refused:?}");
        assert_whole(&format!("docker://{}/expiring{}:v1", reg.addr(), front.port), &dir.path().join("expiring.tar"));
        let (digest, _) = ok(stevedore(&["push", conf.to_str().unwrap(), &format!("docker://{}/expiring{}:v1", reg.addr(), front.port), "--insecure", "-q"], &[]), "push again");
        assert_eq!(digest, expected);
    }
}

/// The Docker CLI to check with: `STEVEDORE_TEST_DOCKER`, else `docker` on PATH, if it runs.
fn docker_cli() -> Option<PathBuf> {
    let cli = std::env::var_os("STEVEDORE_TEST_DOCKER").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("docker"));
    Command::new(&cli).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| cli)
}

#[test]
fn v2s2_manifests_for_docker_only_clients() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let raw = |dest: &str| -> Value { serde_json::from_slice(&skopeo(&["inspect", "--raw", "--tls-verify=false", dest])).unwrap() };
    // A runnable image: busybox as a store path.
    let bb = dir.path().join("store/5bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-busybox");
    fs::create_dir_all(bb.join("bin")).unwrap();
    fs::copy("/bin/busybox", bb.join("bin/busybox")).unwrap();
    let mut conf = base_conf(dir.path(), vec![vec![bb.to_str().unwrap().into()]]);
    conf["store_dir"] = json!(dir.path().join("store"));
    conf["config"] = json!({"Cmd": [bb.join("bin/busybox"), "echo", "v2s2 runs"]});
    let conf = write_json(dir.path(), "busybox.json", &conf);
    let dest = format!("docker://{}/v2s2:gz", reg.addr());
    let (digest, _) = push(&conf, &dest, &["--manifest-format", "v2s2", "-q"]);
    let m = raw(&dest);
    assert_eq!(m["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(m["config"]["mediaType"], "application/vnd.docker.container.image.v1+json");
    assert_eq!(m["layers"][0]["mediaType"], "application/vnd.docker.image.rootfs.diff.tar.gzip");
    assert_eq!(format!("sha256:{}", sha256_hex(&skopeo(&["inspect", "--raw", "--tls-verify=false", &dest]))), digest);
    assert_whole(&dest, &dir.path().join("whole.tar"));
    // The OCI default is unchanged, and its blobs are the v2s2 image's.
    let (oci_digest, _) = push(&conf, &format!("docker://{}/v2s2:oci", reg.addr()), &["-q"]);
    let oci = raw(&format!("docker://{}/v2s2:oci", reg.addr()));
    assert_eq!(oci["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_ne!(oci_digest, digest);
    assert_eq!(oci["layers"][0]["digest"], m["layers"][0]["digest"]);
    assert_eq!(oci["config"]["digest"], m["config"]["digest"]);
    // Uncompressed layers are `.tar`; an OCI layout pushed as v2s2 is the same manifest as its conf.
    let plain = format!("docker://{}/v2s2:plain", reg.addr());
    push(&conf, &plain, &["--manifest-format", "v2s2", "--compressor", "none", "-q"]);
    assert_eq!(raw(&plain)["layers"][0]["mediaType"], "application/vnd.docker.image.rootfs.diff.tar");
    let layout = dir.path().join("layout");
    assert!(stream(&conf, &["--format", "oci", "-o", layout.to_str().unwrap(), "-q"]).status.success());
    let (from_layout, _) = push(&layout, &format!("docker://{}/v2s2:layout", reg.addr()), &["--manifest-format", "v2s2", "-q"]);
    assert_eq!(from_layout, digest);
    // zstd has no Docker form: refused at once (before connecting), or for a zstd source's blobs.
    let out = stevedore(&["push", conf.to_str().unwrap(), "docker://127.0.0.1:1/x:y", "--manifest-format", "v2s2", "--compressor", "zstd"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.lines().count() == 1 && err.contains("zstd"), "{err}");
    let zstd = dir.path().join("zstd-oci.tar");
    assert!(stream(&conf, &["--format", "oci-archive", "--compressor", "zstd", "-o", zstd.to_str().unwrap(), "-q"]).status.success());
    let out = stevedore(&["push", zstd.to_str().unwrap(), &format!("docker://{}/v2s2:zstd", reg.addr()), "--manifest-format", "v2s2", "--insecure"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("zstd layer") && err.contains("no zstd"), "{err}");
    // An index: a Docker manifest list of Docker manifests.
    let arm = fixture_conf(dir.path(), "arm64");
    let list = format!("docker://{}/v2s2:multi", reg.addr());
    ok(stevedore(&["index", &list, conf.to_str().unwrap(), arm.to_str().unwrap(), "--manifest-format", "v2s2", "--insecure", "-q"], &[]), "index");
    let l = raw(&list);
    assert_eq!(l["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json");
    assert_eq!(l["manifests"][0]["digest"], digest.as_str());
    for e in l["manifests"].as_array().unwrap() {
        assert_eq!(e["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    }
    // podman pulls and runs it.
    if Command::new("podman").arg("--version").output().is_ok() {
        let podman = |args: &[&str]| -> String {
            let out = Command::new("podman").args(["--cgroup-manager=cgroupfs", "--runtime", "/usr/sbin/runc"]).args(args).output().unwrap();
            assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let image = format!("{}/v2s2:gz", reg.addr());
        podman(&["pull", "-q", "--tls-verify=false", &image]);
        assert_eq!(podman(&["run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", &image]), "v2s2 runs\n");
        podman(&["rmi", "-f", &image]);
    }
    // The Docker CLI (Docker 20.10's `docker manifest inspect` reads Docker manifests only).
    if let Some(cli) = docker_cli() {
        let config = dir.path().join("docker-config");
        fs::create_dir_all(&config).unwrap();
        for (reference, media_type) in [("v2s2:gz", "application/vnd.docker.distribution.manifest.v2+json"), ("v2s2:multi", "application/vnd.docker.distribution.manifest.list.v2+json")] {
            let out = Command::new(&cli).env("DOCKER_CONFIG", &config).args(["manifest", "inspect", "--insecure", &format!("{}/{reference}", reg.addr())]).output().unwrap();
            assert!(out.status.success(), "{cli:?} manifest inspect {reference}: {}", String::from_utf8_lossy(&out.stderr));
            let got: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(got["mediaType"], media_type, "{reference}");
        }
    }
}

/// push --sbom and --attach: the document goes up as an OCI 1.1 artifact whose subject is the
/// image, listed (docker-registry 2.8 has no referrers API) in the index tagged
/// `sha256-<hex>`; pushing again adds nothing twice, two pushes at once both end up listed,
/// and what cannot be attached fails before anything is sent.
#[test]
fn push_attaches_documents_as_referrers() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = graph_conf(dir.path());
    let doc = |format: &str| {
        let file = dir.path().join(format!("sbom.{format}.json"));
        ok(stevedore(&["sbom", conf.to_str().unwrap(), "--format", format, "-q", "-o", file.to_str().unwrap()], &[]), "sbom");
        file
    };
    let (cdx, spdx) = (doc("cyclonedx"), doc("spdx"));
    let referrers = |repo: &str, digest: &str| -> Vec<Value> {
        let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/{repo}:sha256-{}", reg.addr(), &digest[7..])]);
        let index: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
        index["manifests"].as_array().unwrap().clone()
    };

    let dest = format!("docker://{}/team/app:v1", reg.addr());
    let (digest, stderr) = push(&conf, &dest, &["--sbom", "cyclonedx"]);
    assert!(stderr.contains(&format!("listed under tag sha256-{}", &digest[7..])), "{stderr}");
    let list = referrers("team/app", &digest);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["artifactType"], "application/vnd.cyclonedx+json");
    let artifact = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/team/app@{}", reg.addr(), list[0]["digest"].as_str().unwrap())]);
    assert_eq!(list[0]["size"], json!(artifact.len()));
    let artifact: Value = serde_json::from_slice(&artifact).unwrap();
    assert_eq!(artifact["subject"]["digest"], digest.as_str());
    assert_eq!(artifact["config"]["mediaType"], "application/vnd.oci.empty.v1+json");
    let layer = &artifact["layers"][0];
    assert_eq!(layer["annotations"]["org.opencontainers.image.title"], "sbom.cdx.json");
    // The attached document is the one `stevedore sbom` writes for the conf, byte for byte.
    let blob = http_get(reg.port, &format!("/v2/team/app/blobs/{}", layer["digest"].as_str().unwrap()));
    assert_eq!(sha256_hex(&blob), sha256_file(&cdx));

    // Again with the same SBOM and an SPDX one from a file: one more entry, not two.
    let (again, _) = push(&conf, &dest, &["--sbom", "cyclonedx", "--attach", spdx.to_str().unwrap()]);
    assert_eq!(again, digest);
    let types: Vec<Value> = referrers("team/app", &digest).iter().map(|m| m["artifactType"].clone()).collect();
    assert_eq!(types, ["application/vnd.cyclonedx+json", "application/spdx+json"]);

    // The real oras finds them (falling back, as the spec says, from the referrers API to the
    // tag) and pulls the document back as the file it was pushed as.
    if let Some(oras) = modern_tool("oras") {
        let image = format!("{}/team/app@{digest}", reg.addr());
        let out = Command::new(&oras).args(["discover", "--plain-http", "--format", "json", &image]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "oras discover: {}", String::from_utf8_lossy(&out.stderr));
        let found: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut types: Vec<&str> = found["manifests"].as_array().unwrap_or_else(|| panic!("{said}")).iter().map(|m| m["artifactType"].as_str().unwrap()).collect();
        types.sort();
        assert_eq!(types, ["application/spdx+json", "application/vnd.cyclonedx+json"], "{said}");
        let pulled = dir.path().join("pulled");
        let artifact = format!("{}/team/app@{}", reg.addr(), list[0]["digest"].as_str().unwrap());
        let out = Command::new(&oras).args(["pull", "--plain-http", "-o", pulled.to_str().unwrap(), &artifact]).output().unwrap();
        assert!(out.status.success(), "oras pull: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(sha256_file(&pulled.join("sbom.cdx.json")), sha256_file(&cdx));
    }

    // Two pushes at once, each attaching its own document: both are listed.
    let dest = format!("docker://{}/team/race:v1", reg.addr());
    let children: Vec<_> = [&cdx, &spdx]
        .iter()
        .map(|f| Command::new(bin()).args(["push", conf.to_str().unwrap(), &dest, "--insecure", "-q", "--attach", f.to_str().unwrap()]).env("HOME", dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    let digests: Vec<String> = children.into_iter().map(|c| ok(c.wait_with_output().unwrap(), "concurrent push").0).collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(referrers("team/race", &digests[0]).len(), 2);

    // --sbom needs a conf; --attach a document. Both fail before connecting (port 1).
    let archive = dir.path().join("image.tar");
    fs::write(&archive, stream_ok(&conf)).unwrap();
    let nowhere = "docker://127.0.0.1:1/x/y:z";
    for (args, want) in [
        (vec!["push", archive.to_str().unwrap(), nowhere, "--sbom", "cyclonedx"], "--sbom: "),
        (vec!["push", conf.to_str().unwrap(), nowhere, "--attach", archive.to_str().unwrap()], "not a JSON document"),
        (vec!["push", conf.to_str().unwrap(), nowhere, "--attach", conf.to_str().unwrap()], "neither a CycloneDX nor an SPDX document"),
    ] {
        let out = stevedore(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}

/// `push --sign` signs as `cosign sign --key` does: the `sha256-<hex>.sig` manifest's layer is
/// a simple-signing payload naming the repository and the digest, its annotation an ECDSA
/// P-256 signature OpenSSL and cosign accept; signing again adds nothing, another key adds its
/// own signature beside the first, a tampered signature fails, and a key that cannot sign fails
/// before anything is sent, without showing the key.
#[test]
fn push_signs_as_cosign_does() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = fixture_conf(dir.path(), "amd64");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let (key, public) = (data.join("cosign.key"), data.join("cosign.pub"));
    let pass = Path::new("test-pass");
    let dest = format!("docker://{}/team/app:v1", reg.addr());
    let signed = |key: &str, env: &[(&str, &Path)]| {
        let mut env = env.to_vec();
        env.push(("COSIGN_PASSWORD", pass));
        ok(stevedore(&["push", conf.to_str().unwrap(), &dest, "--insecure", "--sign", key], &env), "push --sign")
    };
    let (digest, stderr) = signed(key.to_str().unwrap(), &[]);
    let sig_tag = format!("sha256-{}.sig", &digest[7..]);
    assert!(stderr.contains(&format!("signed (tag {sig_tag})")), "{stderr}");
    let sig_manifest = || skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/team/app:{sig_tag}", reg.addr())]);
    let first = sig_manifest();
    let manifest: Value = serde_json::from_slice(&first).unwrap();
    let layers = manifest["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.dev.cosign.simplesigning.v1+json");
    let payload = http_get(reg.port, &format!("/v2/team/app/blobs/{}", layers[0]["digest"].as_str().unwrap()));
    let claim: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claim["critical"]["image"]["docker-manifest-digest"], digest.as_str());
    assert_eq!(claim["critical"]["identity"]["docker-reference"], format!("{}/team/app", reg.addr()));
    assert_eq!(claim["critical"]["type"], "cosign container image signature");
    // OpenSSL, which shares no code with us, checks the signature.
    let openssl_verifies = |public: &Path, layer: &Value| {
        let der = unb64(layer["annotations"]["dev.cosignproject.cosign/signature"].as_str().unwrap());
        let (sig_file, payload_file) = (dir.path().join("sig.der"), dir.path().join("payload"));
        fs::write(&sig_file, der).unwrap();
        fs::write(&payload_file, &payload).unwrap();
        let out = Command::new("openssl").args(["dgst", "-sha256", "-verify"]).arg(public).arg("-signature").arg(&sig_file).arg(&payload_file).output().unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Verified OK")
    };
    assert!(openssl_verifies(&public, &layers[0]));

    // Signing again (the signature is deterministic) leaves the manifest as it was.
    signed(key.to_str().unwrap(), &[]);
    assert_eq!(sig_manifest(), first);

    // A second, unencrypted key from the environment adds its signature beside the first.
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "second.pem"]);
    openssl(&["pkey", "-in", "second.pem", "-pubout", "-out", "second.pub"]);
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sec1.pem"]);
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa.pem"]);
    let second = fs::read_to_string(dir.path().join("second.pem")).unwrap();
    signed("env://SECOND_KEY", &[("SECOND_KEY", Path::new(&second))]);
    let manifest: Value = serde_json::from_slice(&sig_manifest()).unwrap();
    let layers = manifest["layers"].as_array().unwrap().clone();
    assert_eq!(layers.len(), 2, "{manifest}");
    assert!(openssl_verifies(&public, &layers[0]) && openssl_verifies(&dir.path().join("second.pub"), &layers[1]));
    assert!(!openssl_verifies(&public, &layers[1]));
    // So does a SEC1 key.
    signed(dir.path().join("sec1.pem").to_str().unwrap(), &[]);

    // The real cosign, offline, accepts both keys; after the first key's signature is swapped
    // for the second key's, it refuses the first.
    let image = format!("{}/team/app@{digest}", reg.addr());
    if let Some(cosign) = modern_tool("cosign") {
        let verify = |public: &Path| {
            let out = Command::new(&cosign).args(["verify", "--key"]).arg(public).args(["--insecure-ignore-tlog", "--allow-http-registry", "--allow-insecure-registry", &image]).env("HOME", dir.path()).output().unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (good, said) = verify(&public);
        assert!(good, "cosign verify: {said}");
        assert!(verify(&dir.path().join("second.pub")).0);
        let mut tampered = manifest.clone();
        tampered["layers"] = json!([layers[0].clone()]);
        tampered["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"] = layers[1]["annotations"]["dev.cosignproject.cosign/signature"].clone();
        http_put_manifest(reg.port, "team/app", &sig_tag, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&tampered).unwrap());
        let (good, said) = verify(&public);
        assert!(!good, "cosign accepted a tampered signature: {said}");
    }

    // Keys that cannot sign fail before connecting (port 1), in one line that shows no key.
    let nowhere = "docker://127.0.0.1:1/x/y:z";
    let rsa = dir.path().join("rsa.pem");
    let missing = dir.path().join("missing.key");
    for (key_arg, env, want) in [
        (key.to_str().unwrap(), vec![("COSIGN_PASSWORD", Path::new("wrong"))], "wrong passphrase"),
        (key.to_str().unwrap(), vec![], "set COSIGN_PASSWORD"),
        (public.to_str().unwrap(), vec![], "a PUBLIC KEY block, not a private key"),
        (rsa.to_str().unwrap(), vec![], "not an ECDSA P-256 key"),
        (missing.to_str().unwrap(), vec![], "missing.key"),
        ("env://STEVEDORE_NO_SUCH_KEY", vec![], "unset"),
        (conf.to_str().unwrap(), vec![], "not a PEM file"),
    ] {
        let out = stevedore(&["push", conf.to_str().unwrap(), nowhere, "--sign", key_arg], &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want) && err.trim().lines().count() == 1, "{key_arg}: {err}");
        assert!(!err.contains("KEY-----") && !err.contains("eyJrZGYi") && !err.contains("test-pass"), "{err}");
    }
}

/// `push --sign --provenance` attests the SLSA provenance predicate (and, signed, the SBOM) as
/// `cosign attest` does: DSSE envelopes of in-toto statements naming the pushed digest, in the
/// `sha256-<hex>.att` manifest, which OpenSSL and `cosign verify-attestation` accept. One byte
/// changed in the SBOM, a swapped signature, or one byte changed in a layer fails verification.
#[test]
fn push_attests_provenance_and_sboms_as_cosign_does() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let conf = graph_conf(dir.path());
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let (key, public) = (data.join("cosign.key"), data.join("cosign.pub"));
    let provenance = dir.path().join("provenance.json");
    ok(stevedore(&["provenance", conf.to_str().unwrap(), "--derivation", "/nix/store/00000000000000000000000000000000-app.drv", "-q", "-o", provenance.to_str().unwrap()], &[]), "provenance");
    let predicate: Value = serde_json::from_slice(&fs::read(&provenance).unwrap()).unwrap();
    assert_eq!(predicate["buildDefinition"]["externalParameters"]["derivation"], "/nix/store/00000000000000000000000000000000-app.drv");
    assert_eq!(predicate["buildDefinition"]["resolvedDependencies"].as_array().unwrap().len(), 8, "{predicate}");

    let dest = format!("docker://{}/team/app:v1", reg.addr());
    let args = ["push", conf.to_str().unwrap(), &dest, "--insecure", "--sign", key.to_str().unwrap(), "--provenance", provenance.to_str().unwrap(), "--sbom", "cyclonedx"];
    let pass = [("COSIGN_PASSWORD", Path::new("test-pass"))];
    let (digest, _) = ok(stevedore(&args, &pass), "push --provenance");
    let att_tag = format!("sha256-{}.att", &digest[7..]);
    let att_manifest = || skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/team/app:{att_tag}", reg.addr())]);
    let first = att_manifest();
    let manifest: Value = serde_json::from_slice(&first).unwrap();
    let layers = manifest["layers"].as_array().unwrap().clone();
    let types: Vec<&str> = layers.iter().map(|l| l["annotations"]["predicateType"].as_str().unwrap()).collect();
    assert_eq!(types, ["https://slsa.dev/provenance/v1", "https://cyclonedx.org/bom"]);
    let mut envelopes = Vec::new();
    for layer in &layers {
        assert_eq!(layer["mediaType"], "application/vnd.dsse.envelope.v1+json");
        let envelope: Value = serde_json::from_slice(&http_get(reg.port, &format!("/v2/team/app/blobs/{}", layer["digest"].as_str().unwrap()))).unwrap();
        assert_eq!(envelope["payloadType"], "application/vnd.in-toto+json");
        let payload = unb64(envelope["payload"].as_str().unwrap());
        let statement: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(statement["subject"][0]["digest"]["sha256"], &digest[7..]);
        assert_eq!(statement["predicateType"], layer["annotations"]["predicateType"]);
        // OpenSSL checks the signature over DSSE's pre-authentication encoding.
        let mut pae = format!("DSSEv1 28 application/vnd.in-toto+json {} ", payload.len()).into_bytes();
        pae.extend_from_slice(&payload);
        let (sig_file, pae_file) = (dir.path().join("sig.der"), dir.path().join("pae"));
        fs::write(&sig_file, unb64(envelope["signatures"][0]["sig"].as_str().unwrap())).unwrap();
        fs::write(&pae_file, &pae).unwrap();
        let out = Command::new("openssl").args(["dgst", "-sha256", "-verify"]).arg(&public).arg("-signature").arg(&sig_file).arg(&pae_file).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("Verified OK"), "{}", String::from_utf8_lossy(&out.stderr));
        envelopes.push((envelope, statement));
    }
    assert_eq!(envelopes[0].1["predicate"], predicate);
    assert_eq!(envelopes[1].1["predicate"]["bomFormat"], "CycloneDX");
    // Again: the same envelopes, nothing added.
    ok(stevedore(&args, &pass), "push again");
    assert_eq!(att_manifest(), first);
    // The predicate must be one, and attesting needs a key; both fail before connecting.
    let nowhere = "docker://127.0.0.1:1/x/y:z";
    let out = stevedore(&["push", conf.to_str().unwrap(), nowhere, "--sign", key.to_str().unwrap(), "--provenance", conf.to_str().unwrap()], &pass);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a SLSA provenance v1 predicate") && err.trim().lines().count() == 1, "{err}");
    let out = stevedore(&["push", conf.to_str().unwrap(), nowhere, "--provenance", provenance.to_str().unwrap()], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--sign"));

    let Some(cosign) = modern_tool("cosign") else { return };
    let verify = |kind: &str, image: &str| {
        let mut c = Command::new(&cosign);
        match kind {
            "signature" => c.arg("verify"),
            t => c.args(["verify-attestation", "--type", t]),
        };
        let out = c.arg("--key").arg(&public).args(["--insecure-ignore-tlog", "--allow-http-registry", "--allow-insecure-registry", image]).env("HOME", dir.path()).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let image = format!("{}/team/app@{digest}", reg.addr());
    for kind in ["signature", "slsaprovenance1", "cyclonedx"] {
        let (good, said) = verify(kind, &image);
        assert!(good, "cosign {kind}: {said}");
    }
    // One byte of the SBOM changed inside its envelope (signature kept): refused.
    let (envelope, statement) = &envelopes[1];
    let mut forged = statement.clone();
    forged["predicate"]["serialNumber"] = json!("urn:uuid:00000000-0000-0000-0000-000000000001");
    let mut env = envelope.clone();
    let payload = serde_json::to_vec(&forged).unwrap();
    env["payload"] = json!(b64(&payload));
    let env_bytes = serde_json::to_vec(&env).unwrap();
    let forged_digest = http_post_blob(reg.port, "team/app", &env_bytes);
    let mut tampered = manifest.clone();
    tampered["layers"][1]["digest"] = json!(forged_digest);
    tampered["layers"][1]["size"] = json!(env_bytes.len());
    http_put_manifest(reg.port, "team/app", &att_tag, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&tampered).unwrap());
    let (good, said) = verify("cyclonedx", &image);
    assert!(!good, "cosign accepted a changed SBOM: {said}");
    // The provenance's signature swapped for the SBOM's: refused.
    let mut swapped = manifest.clone();
    let mut env = envelopes[0].0.clone();
    env["signatures"] = envelopes[1].0["signatures"].clone();
    let env_bytes = serde_json::to_vec(&env).unwrap();
    swapped["layers"] = json!([{"mediaType": "application/vnd.dsse.envelope.v1+json", "digest": http_post_blob(reg.port, "team/app", &env_bytes), "size": env_bytes.len(), "annotations": layers[0]["annotations"].clone()}]);
    http_put_manifest(reg.port, "team/app", &att_tag, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&swapped).unwrap());
    let (good, said) = verify("slsaprovenance1", &image);
    assert!(!good, "cosign accepted a swapped signature: {said}");
    // One byte of a layer changed: the manifest that names it is not the signed one.
    let image_manifest: Value = serde_json::from_slice(&skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/team/app@{digest}", reg.addr())])).unwrap();
    let mut blob = http_get(reg.port, &format!("/v2/team/app/blobs/{}", image_manifest["layers"][0]["digest"].as_str().unwrap()));
    let last = blob.len() - 1;
    blob[last] ^= 1;
    let mut changed = image_manifest.clone();
    changed["layers"][0]["digest"] = json!(http_post_blob(reg.port, "team/app", &blob));
    http_put_manifest(reg.port, "team/app", "v1", image_manifest["mediaType"].as_str().unwrap(), &serde_json::to_vec(&changed).unwrap());
    let (good, said) = verify("signature", &format!("{}/team/app:v1", reg.addr()));
    assert!(!good, "cosign accepted a changed layer: {said}");
}

/// `stevedore verify IMAGE --against CONF`: an archive or a registry image made from the conf is
/// identical (exit 0); against a conf whose customisation layer has other files, the first
/// layer that differs is named with the files that differ (exit 1); a config field that differs
/// is named; a layer changed by one byte behind its config is caught; trouble exits 2.
#[test]
fn verify_names_the_layer_and_files_that_differ() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let mut conf: Value = serde_json::from_slice(&fs::read(fixture_conf(dir.path(), "amd64")).unwrap()).unwrap();
    conf["customisation_layer"] = json!(custom_layer(dir.path(), "a", &[("etc/x", b"x!\n"), ("etc/y", b"y\n"), ("etc/same", b"=\n")]));
    let a = write_json(dir.path(), "a.json", &conf);
    conf["customisation_layer"] = json!(custom_layer(dir.path(), "b", &[("etc/x", b"X!\n"), ("etc/same", b"=\n"), ("etc/w", b"w\n")]));
    let b = write_json(dir.path(), "b.json", &conf);
    conf["customisation_layer"] = json!(dir.path().join("a"));
    conf["config"]["Env"] = json!(["PATH=/usr/bin"]);
    let c = write_json(dir.path(), "c.json", &conf);
    let layers = conf["store_layers"].as_array().unwrap().len() + 1;
    let archive = dir.path().join("a.tar");
    fs::write(&archive, stream_ok(&a)).unwrap();
    let verify = |image: &str, against: &Path| {
        let out = stevedore(&["verify", image, "--against", against.to_str().unwrap(), "--insecure", "-q"], &[]);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, said, err) = verify(archive.to_str().unwrap(), &a);
    assert_eq!(code, Some(0), "{said}{err}");
    assert!(said.starts_with("identical: config sha256:") && said.contains(&format!("{layers} layers")), "{said}");

    let (code, said, _) = verify(archive.to_str().unwrap(), &b);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(&format!("layer {layers} differs")), "{said}");
    for line in ["differs: etc/x (content)", "only in the image: etc/y", "missing from the image: etc/w"] {
        assert!(said.contains(line), "{line}: {said}");
    }
    assert!(!said.contains("etc/same"), "{said}");
    let (code, said, _) = verify(archive.to_str().unwrap(), &c);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("the config differs") && said.contains("field config.Env") && !said.contains("config.Cmd"), "{said}");

    // From a registry, the same verdicts.
    let dest = format!("docker://{}/team/verify:v1", reg.addr());
    push(&a, &dest, &["-q"]);
    let (code, said, err) = verify(&dest, &a);
    assert_eq!(code, Some(0), "{said}{err}");
    let (code, said, _) = verify(&dest, &b);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("differs: etc/x (content)"), "{said}");

    // One byte of the customisation layer changed inside the archive, its config untouched.
    let mut bytes = fs::read(&archive).unwrap();
    let at = bytes.windows(3).position(|w| w == b"x!\n").unwrap();
    bytes[at] = b'z';
    let tampered = dir.path().join("tampered.tar");
    fs::write(&tampered, bytes).unwrap();
    let (code, said, _) = verify(tampered.to_str().unwrap(), &a);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("not what its config says"), "{said}");

    // Trouble: exit 2 with one line.
    for image in [dir.path().join("missing.tar").to_str().unwrap(), a.to_str().unwrap()] {
        let (code, said, err) = verify(image, &a);
        assert_eq!(code, Some(2), "{image}: {said}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
