//! `stevedore serve`: a read-only registry serving images made from confs, checked with raw
//! HTTP, skopeo and podman (which must fetch only the layers it lacks).

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A running `stevedore serve`, its stderr collected; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(images: &[String], cache: &Path) -> Server {
        let mut child = Command::new(bin())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(images)
            .env("XDG_CACHE_HOME", cache)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut addr = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut addr).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        assert!(!addr.trim().is_empty(), "serve printed no address");
        Server { child, addr: addr.trim().to_string(), log }
    }

    /// Digests of the blob bodies sent since the log was last taken (not HEADs or manifests).
    fn take_blob_gets(&self) -> Vec<String> {
        // Lines come from another thread: give the last request's line a moment.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let lines = std::mem::take(&mut *self.log.lock().unwrap());
        lines
            .iter()
            .filter(|l| l.starts_with("GET ") && (l.contains(" 200 ") || l.contains(" 206 ")))
            .filter_map(|l| l.split(' ').nth(1)?.split_once("/blobs/").map(|(_, d)| d.to_string()))
            .collect()
    }

    /// One raw request: status line, headers (lowercase names), body.
    fn request(&self, raw: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let code = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
        let mut body = vec![0u8; if raw.starts_with("HEAD ") { 0 } else { len }];
        r.read_exact(&mut body).unwrap();
        (code, headers, body)
    }

    fn get(&self, path: &str, extra: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn podman(args: &[&str]) -> Option<std::process::Output> {
    if Command::new("podman").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must have podman");
        return None;
    }
    let out = Command::new("podman").args(["--cgroup-manager=cgroupfs", "--runtime", "/usr/sbin/runc"]).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "podman {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(out)
}

#[test]
fn serves_what_stream_makes_and_only_what_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture("serve", 8, 30, 0.0);
    let paths = store_paths(&fx);
    let layers: Vec<Vec<String>> = paths.iter().map(|p| vec![p.clone()]).collect();
    let conf = write_json(dir.path(), "conf.json", &base_conf(&fx, layers.clone()));
    let cache = dir.path().join("cache");
    let server = Server::start(&[format!("team/app:v1={}", conf.display())], &cache);
    let streamed = Image::parse(&stream_ok(&conf));

    // The API as any client sees it.
    let (code, headers, body) = server.get("/v2/", "");
    assert_eq!((code, body.as_slice()), (200, &b"{}"[..]));
    assert_eq!(header(&headers, "docker-distribution-api-version"), Some("registry/2.0"));
    let (code, headers, manifest) = server.get("/v2/team/app/manifests/v1", "Accept: application/vnd.oci.image.manifest.v1+json\r\n");
    assert_eq!(code, 200);
    let digest = header(&headers, "docker-content-digest").unwrap().to_string();
    assert_eq!(digest, format!("sha256:{}", sha256_hex(&manifest)));
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let descs = manifest["layers"].as_array().unwrap();
    assert_eq!(descs.len(), streamed.layer_count());
    for (i, d) in descs.iter().enumerate() {
        assert_eq!(d["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(d["digest"], streamed.config["rootfs"]["diff_ids"][i]);
        assert_eq!(d["size"], streamed.layer(i).len());
    }
    let (code, _, config) = server.get(&format!("/v2/team/app/blobs/{}", manifest["config"]["digest"].as_str().unwrap()), "");
    assert_eq!(code, 200);
    assert_eq!(config, streamed.config_bytes, "the served config is not stream's");
    assert_eq!(server.get(&format!("/v2/team/app/manifests/{digest}"), "").0, 200);
    assert_eq!(server.get("/v2/team/app/tags/list", "").2, serde_json::to_vec(&json!({"name": "team/app", "tags": ["v1"]})).unwrap());
    assert_eq!(server.get("/v2/_catalog", "").2, serde_json::to_vec(&json!({"repositories": ["team/app"]})).unwrap());

    // Layers whole, by range, and HEAD.
    let layer = descs[2]["digest"].as_str().unwrap();
    let want = streamed.layer(2);
    let (code, _, body) = server.get(&format!("/v2/team/app/blobs/{layer}"), "");
    assert_eq!(code, 200);
    assert!(body == want, "layer 3 differs from stream's");
    let (code, headers, body) = server.get(&format!("/v2/team/app/blobs/{layer}"), "Range: bytes=1000-1999\r\n");
    assert_eq!(code, 206);
    assert_eq!(header(&headers, "content-range"), Some(format!("bytes 1000-1999/{}", want.len()).as_str()));
    assert!(body == want[1000..2000]);
    let (code, _, body) = server.get(&format!("/v2/team/app/blobs/{layer}"), "Range: bytes=-100\r\n");
    assert_eq!(code, 206);
    assert!(body == want[want.len() - 100..]);
    assert_eq!(server.get(&format!("/v2/team/app/blobs/{layer}"), &format!("Range: bytes={}-\r\n", want.len())).0, 416);
    let (code, headers, body) = server.request(&format!("HEAD /v2/team/app/blobs/{layer} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    assert_eq!((code, body.len()), (200, 0));
    assert_eq!(header(&headers, "content-length"), Some(want.len().to_string().as_str()));

    // Clean errors, and the server goes on.
    let code_of = |body: &[u8]| serde_json::from_slice::<Value>(body).unwrap()["errors"][0]["code"].as_str().unwrap().to_string();
    let (code, _, body) = server.get("/v2/other/manifests/v1", "");
    assert_eq!((code, code_of(&body).as_str()), (404, "NAME_UNKNOWN"));
    let (code, _, body) = server.get("/v2/team/app/manifests/v2", "");
    assert_eq!((code, code_of(&body).as_str()), (404, "MANIFEST_UNKNOWN"));
    let (code, _, body) = server.get(&format!("/v2/team/app/blobs/sha256:{}", "0".repeat(64)), "");
    assert_eq!((code, code_of(&body).as_str()), (404, "BLOB_UNKNOWN"));
    let (code, _, _) = server.request("PUT /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    assert_eq!(code, 405);
    assert_eq!(server.request("NONSENSE\r\n\r\n").0, 400);
    assert_eq!(server.get("/v2/", "").0, 200);

    // skopeo copies it out, byte for byte what stream makes.
    let out = dir.path().join("copy.tar");
    let status = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false", &format!("docker://{}/team/app:v1", server.addr), &format!("docker-archive:{}:x/y:z", out.display())])
        .status()
        .unwrap();
    assert!(status.success());
    let copied = Image::parse(&fs::read(&out).unwrap());
    assert_eq!(copied.config_bytes, streamed.config_bytes);
    for i in 0..copied.layer_count() {
        assert!(copied.layer(i) == streamed.layer(i), "layer {i} differs");
    }

    // podman pulls it as the same image `podman load` makes from stream's archive; pulls it
    // again without a blob; after a change, fetches only the changed layer and the config.
    server.take_blob_gets();
    let reference = format!("{}/team/app:v1", server.addr);
    // Nothing of an earlier run may hold these layers.
    let Some(_) = podman(&["images"]) else { return };
    let _ = Command::new("podman").args(["rmi", "-f", "localhost/fixture:latest"]).output();
    let old: Vec<String> = String::from_utf8(podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]).unwrap().stdout).unwrap().lines().filter(|l| l.ends_with("/team/app:v1")).map(str::to_owned).collect();
    for r in old {
        let _ = Command::new("podman").args(["rmi", "-f", &r]).output();
    }
    podman(&["pull", "-q", "--tls-verify=false", &reference]);
    assert_eq!(server.take_blob_gets().len(), layers.len() + 1);
    let layer_digests = |m: &Value| -> Vec<String> { m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect() };
    let before = layer_digests(&manifest);
    let id = |r: &str| String::from_utf8(podman(&["image", "inspect", "--format", "{{.Id}}", r]).unwrap().stdout).unwrap().trim().to_string();
    let archive = dir.path().join("stream.tar");
    fs::write(&archive, stream_ok(&conf)).unwrap();
    podman(&["load", "-q", "-i", archive.to_str().unwrap()]);
    assert_eq!(id(&reference), id("localhost/fixture:latest"), "podman pull and podman load give other images");
    podman(&["pull", "-q", "--tls-verify=false", &reference]);
    let fetched = server.take_blob_gets();
    assert!(fetched.iter().all(|d| !before.contains(d)), "an unchanged image's layers were fetched again: {fetched:?}");
    let mut changed = base_conf(&fx, layers[..layers.len() - 2].to_vec());
    changed["store_layers"].as_array_mut().unwrap().push(json!([paths[paths.len() - 2], paths[paths.len() - 1]]));
    fs::write(&conf, serde_json::to_vec(&changed).unwrap()).unwrap();
    podman(&["pull", "-q", "--tls-verify=false", &reference]);
    let fetched = server.take_blob_gets();
    let (_, _, m) = server.get("/v2/team/app/manifests/v1", "");
    let after = layer_digests(&serde_json::from_slice(&m).unwrap());
    let new: Vec<&String> = after.iter().filter(|d| !before.contains(d)).collect();
    assert_eq!(new.len(), 1);
    let layers_fetched: Vec<&String> = fetched.iter().filter(|d| after.contains(d)).collect();
    assert_eq!(layers_fetched, new, "podman fetched other layers than the changed one");
    let _ = Command::new("podman").args(["rmi", "-f", &reference, "localhost/fixture:latest"]).output();

    // A restarted server finds the layers' digests in the cache: the same manifest.
    drop(server);
    let cached = fs::read_to_string(cache.join("stevedore/layer-digests")).unwrap();
    assert!(cached.lines().filter(|l| l.starts_with("layer-v1:")).count() >= layers.len(), "{cached}");
    let server = Server::start(&[format!("team/app:v1={}", conf.display())], &cache);
    let (_, headers, _) = server.get("/v2/team/app/manifests/v1", "");
    let again = header(&headers, "docker-content-digest").unwrap().to_string();
    let streamed = Image::parse(&stream_ok(&conf));
    let (_, _, m) = server.get(&format!("/v2/team/app/manifests/{again}"), "");
    let m: Value = serde_json::from_slice(&m).unwrap();
    let served: Vec<&Value> = m["layers"].as_array().unwrap().iter().map(|l| &l["digest"]).collect();
    let want: Vec<&Value> = streamed.config["rootfs"]["diff_ids"].as_array().unwrap().iter().collect();
    assert_eq!(served, want);
}

#[test]
fn a_broken_conf_is_an_error_response_not_a_dead_server() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture("serve", 8, 30, 0.0);
    let conf = write_json(dir.path(), "conf.json", &base_conf(&fx, vec![store_paths(&fx)]));
    let server = Server::start(&[format!("app={}", conf.display())], &dir.path().join("cache"));
    assert_eq!(server.get("/v2/app/manifests/latest", "").0, 200);
    fs::write(&conf, b"{ not json").unwrap();
    let (code, _, body) = server.get("/v2/app/manifests/latest", "");
    assert_eq!(code, 500);
    assert!(String::from_utf8_lossy(&body).contains("conf.json"), "{}", String::from_utf8_lossy(&body));
    let mut missing = base_conf(&fx, vec![vec![format!("{}/store/00000000000000000000000000000000-gone", fx.display())]]);
    missing["repo_tag"] = json!("app:latest");
    fs::write(&conf, serde_json::to_vec(&missing).unwrap()).unwrap();
    let (code, _, body) = server.get("/v2/app/manifests/latest", "");
    assert_eq!(code, 500);
    assert!(String::from_utf8_lossy(&body).contains("does not exist"), "{}", String::from_utf8_lossy(&body));
    assert_eq!(server.get("/v2/", "").0, 200);
    // A conf that cannot be read at start is refused at once.
    let out = Command::new(bin()).args(["serve", "--listen", "127.0.0.1:0", "/nonexistent/conf.json"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim().lines().count(), 1);
}

#[test]
fn load_into_podman_sends_only_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture("serve-load", 6, 20, 0.0);
    let paths = store_paths(&fx);
    let layers: Vec<Vec<String>> = paths.iter().map(|p| vec![p.clone()]).collect();
    let mut c = base_conf(&fx, layers.clone());
    c["repo_tag"] = json!("stevedore-load-test:v1");
    let conf = write_json(dir.path(), "conf.json", &c);
    let Some(_) = podman(&["images"]) else { return };
    let _ = Command::new("podman").args(["rmi", "-f", "localhost/stevedore-load-test:v1", "localhost/stevedore-load-test:streamed"]).output();
    let cache = dir.path().join("cache");
    let load = |conf: &Path| -> String {
        let out = Command::new(bin()).args(["load", "--into", "podman"]).arg(conf).env("XDG_CACHE_HOME", &cache).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "load failed: {stderr}");
        stderr.lines().find(|l| l.starts_with("loaded ")).unwrap_or_else(|| panic!("no summary: {stderr}")).to_string()
    };
    let summary = load(&conf);
    assert!(summary.contains(&format!("{} layers sent", layers.len())), "{summary}");
    // The same image `stream | podman load` gives, under the conf's name.
    let archive = dir.path().join("stream.tar");
    let out = Command::new(bin()).args(["stream", "-t", "stevedore-load-test:streamed", "-o"]).arg(&archive).arg(&conf).output().unwrap();
    assert!(out.status.success());
    podman(&["load", "-q", "-i", archive.to_str().unwrap()]);
    let id = |r: &str| String::from_utf8(podman(&["image", "inspect", "--format", "{{.Id}}", r]).unwrap().stdout).unwrap().trim().to_string();
    assert_eq!(id("localhost/stevedore-load-test:v1"), id("localhost/stevedore-load-test:streamed"));
    // The loopback name is gone.
    let names = String::from_utf8(podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]).unwrap().stdout).unwrap();
    assert!(!names.lines().any(|n| n.starts_with("127.0.0.1:") && n.contains("stevedore-load-test")), "{names}");
    assert!(load(&conf).contains(" 0 layers sent"));
    // One store path moved: one layer goes.
    let mut changed = c.clone();
    let mut moved = layers[..layers.len() - 2].to_vec();
    moved.push(paths[paths.len() - 2..].to_vec());
    changed["store_layers"] = json!(moved);
    let changed_conf = write_json(dir.path(), "changed.json", &changed);
    let summary = load(&changed_conf);
    assert!(summary.contains(" 1 layers sent"), "{summary}");
    // Images (and their layers) removed meanwhile: the runtime asks for what it lost, and the
    // image is whole again.
    let _ = Command::new("podman").args(["rmi", "-f", "localhost/stevedore-load-test:v1", "localhost/stevedore-load-test:streamed"]).output();
    let summary = load(&conf);
    assert!(summary.contains(&format!("{} layers sent", layers.len())), "{summary}");
    podman(&["load", "-q", "-i", archive.to_str().unwrap()]);
    assert_eq!(id("localhost/stevedore-load-test:v1"), id("localhost/stevedore-load-test:streamed"));
    let _ = Command::new("podman").args(["rmi", "-f", "localhost/stevedore-load-test:v1", "localhost/stevedore-load-test:streamed"]).output();
}

#[test]
fn archives_and_layouts_are_served_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture("serve", 8, 30, 0.0);
    let layers: Vec<Vec<String>> = store_paths(&fx).into_iter().map(|p| vec![p]).collect();
    let conf = write_json(dir.path(), "conf.json", &base_conf(&fx, layers));
    let streamed = Image::parse(&stream_ok(&conf));
    let archive = dir.path().join("image.tar");
    fs::write(&archive, stream_ok(&conf)).unwrap();
    let layout = dir.path().join("layout");
    let out = Command::new(bin()).arg("stream").arg(&conf).args(["-q", "--format", "oci", "--compressor", "zstd", "-o"]).arg(&layout).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = Server::start(&[format!("a:v1={}", archive.display()), format!("l:v1=oci:{}", layout.display())], &dir.path().join("cache"));

    // The Docker archive: its config byte for byte, its layers uncompressed (digest = diff_id).
    let (code, _, m) = server.get("/v2/a/manifests/v1", "");
    assert_eq!(code, 200);
    let m: Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(server.get(&format!("/v2/a/blobs/{}", m["config"]["digest"].as_str().unwrap()), "").2, streamed.config_bytes);
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(l["digest"], streamed.config["rootfs"]["diff_ids"][i]);
    }
    let (code, _, body) = server.get(&format!("/v2/a/blobs/{}", m["layers"][1]["digest"].as_str().unwrap()), "Range: bytes=512-1535\r\n");
    assert_eq!(code, 206);
    assert!(body == streamed.layer(1)[512..1536]);

    // The layout: its own manifest and blobs.
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let (code, headers, m) = server.get("/v2/l/manifests/v1", "");
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "docker-content-digest"), Some(digest));
    assert_eq!(m, fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap());
    let m: Value = serde_json::from_slice(&m).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v2/l/blobs/{layer}"), "").2, fs::read(layout.join("blobs/sha256").join(&layer[7..])).unwrap());
    let out = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{}/l:v1", server.addr)]).output().unwrap();
    assert!(out.status.success());

    // Unnamed, an archive is refused in one line.
    let out = Command::new(bin()).args(["serve", "--listen", "127.0.0.1:0"]).arg(&archive).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.trim().lines().count() == 1 && stderr.contains("name the image"), "{stderr}");
}
