//! `stevedore serve`: a read-only registry (distribution API v2, the pull side) that serves
//! images made from stream confs when they are asked for. A manifest is built from its conf at
//! each request (so a rebuilt `result` is served at once), its layers' diff_ids coming from the
//! digest cache (`image::digests`: store paths never change, so an unchanged layer is never read
//! to be hashed again); layers are uncompressed, their digests their diff_ids, and a blob is
//! streamed from the store when it is fetched. Clients (`docker pull`, `podman pull`, `ctr pull`,
//! skopeo) fetch only the layers they lack: on loopback, the fastest way into any runtime.

pub mod http;
pub mod load;

use crate::compress::Compressor;
use crate::image::conf::{self, StreamConf};
use crate::image::digests::DigestCache;
use crate::image::oci::{self, Descriptor, CONFIG_TYPE, MANIFEST_TYPE};
use crate::image::{ImageSpec, LayerSink};
use crate::util::progress::Progress;
use crate::util::sha256_digest;
use anyhow::{anyhow, bail, Result};
use http::{Request, Window};
use serde_json::json;
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use crate::registry::ManifestFormat;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An image to serve: `name:tag`, made from a stream conf, or taken from an image on disk.
#[derive(Debug, Clone)]
pub struct Served {
    /// The repository path clients ask for (the name without its registry), and the tag.
    pub name: String,
    pub tag: String,
    /// The name as given (or the conf's repo_tag), with a tag: what a loaded image is called.
    pub repo_tag: String,
    pub source: Source,
}

#[derive(Debug, Clone)]
pub enum Source {
    /// A stream conf, made into an image at each request.
    Conf(PathBuf),
    /// Anything `stevedore push` takes but a conf (a Docker archive, an OCI layout or archive,
    /// with skopeo's `docker-archive:`/`oci:`/`oci-archive:` prefixes): its blobs as they are,
    /// a Docker archive's layers uncompressed, with the config byte for byte.
    Image(String),
}

impl Served {
    /// `[NAME[:TAG]=]SOURCE`; without a name, a conf's `repo_tag` (read now) names it, and
    /// other sources must be named.
    pub fn parse(arg: &str) -> Result<Served> {
        // A path that exists is a path, even with a `=` in it.
        let (named, given) = match arg.split_once('=') {
            Some((n, c)) if !Path::new(arg).exists() => (Some(n), c),
            _ => (None, arg),
        };
        // A stream script (`./result` of streamLayeredImage) stands for its conf. Only the
        // head of a file is read to tell: SOURCE may be a big archive.
        let script_conf = stream_script_head(Path::new(given)).map(|text| conf::conf_of_stream_script(&text));
        let given = match script_conf {
            Some(Some(conf)) => conf,
            Some(None) => bail!("{given}: a script, but not one that runs `stevedore stream`: give its conf (passthru.conf) or the archive it writes"),
            None => given.to_string(),
        };
        let given = given.as_str();
        let source = match crate::registry::source::Source::parse(given)? {
            crate::registry::source::Source::Conf(path) => Source::Conf(path),
            _ => Source::Image(given.to_string()),
        };
        let repo_tag = match (named, &source) {
            (Some(n), _) => n.to_string(),
            (None, Source::Conf(path)) => StreamConf::load(path, &conf::now())?.repo_tag,
            (None, Source::Image(_)) => bail!("{given}: name the image (NAME:TAG={given} for serve, -t NAME:TAG for load)"),
        };
        let repo_tag = crate::image::reference::with_default_tag(&repo_tag);
        let parts = crate::image::reference::parse_reference(&repo_tag).map_err(|e| anyhow!("{arg}: {e:#}"))?;
        let (name, tag) = (parts.path.to_string(), parts.tag.unwrap_or("latest").to_string());
        Ok(Served { name, tag, repo_tag, source })
    }

    /// Where it comes from, for messages.
    pub fn what(&self) -> String {
        match &self.source {
            Source::Conf(p) => p.display().to_string(),
            Source::Image(s) => s.clone(),
        }
    }
}

/// The text of `path` if it is a small file starting with `#!` (a script), else None.
fn stream_script_head(path: &Path) -> Option<String> {
    use std::io::Read;
    const MOST: u64 = 64 * 1024;
    let mut head = Vec::new();
    std::fs::File::open(path).ok()?.take(MOST + 1).read_to_end(&mut head).ok()?;
    (head.starts_with(b"#!") && head.len() as u64 <= MOST).then(|| String::from_utf8_lossy(&head).into_owned())
}

pub struct ServeOptions {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long a connection may sit idle, or a write wait.
    pub timeout: Duration,
}

/// Where a blob listed by a manifest built here comes from.
#[derive(Clone)]
enum Blob {
    Config(Arc<Vec<u8>>),
    /// Layer `index` of the image `conf` describes, `size` bytes.
    Layer { conf: Arc<StreamConf>, index: usize, size: u64 },
    /// A blob of an image on disk (`Source::Image`), found again in its plan when fetched.
    Planned { source: String, size: u64, layer: bool },
}

/// Entries kept of manifests built before; past this, the maps start again (blobs are found
/// again by building the images anew).
const MAX_ENTRIES: usize = 100_000;

/// A manifest built: the repository it was built for, its bytes.
type Built = (String, Arc<Vec<u8>>);

/// What was sent: layer bodies (whole or in part) and their bytes.
#[derive(Default)]
pub struct Stats {
    pub layers: AtomicU64,
    pub layer_bytes: AtomicU64,
}

/// Layers made at once (each holds a few MiB of buffers, and reads the store); more requests
/// wait their turn, so memory stays flat however many connections a client opens.
const LAYERS_AT_ONCE: usize = 4;

/// A counting semaphore.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots { used: Mutex::new(0), freed: Condvar::new(), max: max.max(1) }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut n = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= self.max {
            n = self.freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'s>(&'s Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

struct State {
    images: Vec<Served>,
    stats: Arc<Stats>,
    layers_at_once: Slots,
    blobs: Mutex<HashMap<String, Blob>>,
    /// Manifest bytes by digest, with the repository they were built for.
    manifests: Mutex<HashMap<String, Built>>,
    cache: Mutex<DigestCache>,
    progress: Progress,
}

/// A failed request: its status, the registry error code and a message.
struct Failure(u16, &'static str, String);

impl State {
    /// Builds `img`'s manifest and remembers what it lists.
    fn build(&self, img: &Served) -> Result<(String, Arc<Vec<u8>>)> {
        let conf_path = match &img.source {
            Source::Conf(p) => p,
            Source::Image(source) => return self.build_planned(img, source),
        };
        let conf = Arc::new(StreamConf::load(conf_path, &conf::now())?);
        let spec = ImageSpec::new(&conf)?;
        let quiet = Progress { quiet: true };
        let layers = {
            let mut cache = self.cache.lock().map_err(|_| anyhow!("internal error: digest cache lock"))?;
            spec.describe_layers(&mut cache, &quiet)?
        };
        let config = Arc::new(spec.config_json(&layers).into_bytes());
        let config_desc = Descriptor::new(CONFIG_TYPE, sha256_digest(&config), config.len() as u64);
        let descs: Vec<Descriptor> = layers
            .iter()
            .map(|l| Descriptor::new(oci::layer_media_type(Compressor::None), format!("sha256:{}", l.diff_id), l.size))
            .collect();
        let manifest = Arc::new(oci::manifest_json(&config_desc, &descs).into_bytes());
        let digest = sha256_digest(&manifest);
        // Last to first, so a layer listed twice is made from its first place.
        let mut blobs: Vec<(String, Blob)> = descs.iter().enumerate().rev().map(|(index, d)| (d.digest.clone(), Blob::Layer { conf: conf.clone(), index, size: d.size })).collect();
        blobs.push((config_desc.digest.clone(), Blob::Config(config)));
        self.remember(img, blobs, vec![(digest.clone(), manifest.clone())])?;
        Ok((digest, manifest))
    }

    /// Keeps what a build of `img` lists, for the requests that follow: its blobs and its
    /// manifests by digest. The maps start again past `MAX_ENTRIES`.
    fn remember(&self, img: &Served, blobs: Vec<(String, Blob)>, manifests: Vec<(String, Arc<Vec<u8>>)>) -> Result<()> {
        let mut map = self.blobs.lock().map_err(|_| anyhow!("internal error: blob map lock"))?;
        if map.len() > MAX_ENTRIES {
            map.clear();
        }
        map.extend(blobs);
        drop(map);
        let mut map = self.manifests.lock().map_err(|_| anyhow!("internal error: manifest map lock"))?;
        if map.len() > MAX_ENTRIES {
            map.clear();
        }
        map.extend(manifests.into_iter().map(|(digest, bytes)| (digest, (img.name.clone(), bytes))));
        Ok(())
    }

    /// An image on disk: its plan (as a push with layers uncompressed makes it) gives the
    /// manifests and blobs. Child manifests of an index are kept too, found by digest.
    fn build_planned(&self, img: &Served, source: &str) -> Result<(String, Arc<Vec<u8>>)> {
        let quiet = Progress { quiet: true };
        let (top, manifests, blobs) = crate::registry::with_plan(source, Compressor::None, ManifestFormat::Oci, None, &quiet, |plan| {
            let manifests: Vec<(String, Arc<Vec<u8>>)> = plan.manifests.iter().map(|m| (m.digest.clone(), Arc::new(m.bytes.clone()))).collect();
            let blobs: Vec<(String, Blob)> =
                plan.blobs.iter().map(|b| (b.digest.clone(), Blob::Planned { source: source.to_string(), size: b.size, layer: b.what != "config" })).collect();
            Ok((plan.top().digest.clone(), manifests, blobs))
        })?;
        // The top manifest is the plan's last.
        let top_bytes = manifests.last().map(|(_, b)| b.clone()).ok_or_else(|| anyhow!("internal error: a plan without a manifest"))?;
        self.remember(img, blobs, manifests)?;
        Ok((top, top_bytes))
    }

    fn images_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Served> + 'a {
        self.images.iter().filter(move |i| i.name == name)
    }

    fn manifest(&self, name: &str, reference: &str) -> Result<(String, Arc<Vec<u8>>), Failure> {
        let fail = |e: anyhow::Error| Failure(500, "UNKNOWN", format!("{name}:{reference}: {e:#}"));
        if self.images_named(name).next().is_none() {
            return Err(Failure(404, "NAME_UNKNOWN", format!("no image named {name} is served here")));
        }
        if reference.starts_with("sha256:") {
            let known = |s: &State| s.manifests.lock().ok().and_then(|m| m.get(reference).filter(|(n, _)| n == name).map(|(_, b)| b.clone()));
            if let Some(bytes) = known(self) {
                return Ok((reference.to_string(), bytes));
            }
            // Asked for a manifest built before a restart (or forgotten): build them again.
            for img in self.images_named(name) {
                self.build(img).map_err(fail)?;
            }
            return known(self).map(|b| (reference.to_string(), b)).ok_or_else(|| Failure(404, "MANIFEST_UNKNOWN", format!("{name}@{reference} is not served here (any more)")));
        }
        let img = self.images_named(name).find(|i| i.tag == reference).ok_or_else(|| Failure(404, "MANIFEST_UNKNOWN", format!("{name} has no tag {reference} here")))?;
        self.build(img).map_err(fail)
    }

    fn blob(&self, name: &str, digest: &str) -> Result<Blob, Failure> {
        if self.images_named(name).next().is_none() {
            return Err(Failure(404, "NAME_UNKNOWN", format!("no image named {name} is served here")));
        }
        let known = |s: &State| s.blobs.lock().ok().and_then(|b| b.get(digest).cloned());
        if let Some(b) = known(self) {
            return Ok(b);
        }
        for img in self.images_named(name) {
            self.build(img).map_err(|e| Failure(500, "UNKNOWN", format!("{name}: {e:#}")))?;
        }
        known(self).ok_or_else(|| Failure(404, "BLOB_UNKNOWN", format!("{name} has no blob {digest} here")))
    }
}

/// Writes layer `index` of the image `conf` describes into `w` (a store layer is planned and
/// read again; nothing else of the image is read). Returns its diff_id; fails also when `w`
/// stops taking bytes (a range is complete).
fn write_layer(conf: &StreamConf, index: usize, w: &mut dyn Write) -> Result<String> {
    let spec = ImageSpec::new(conf)?;
    let mut one = OneItem { index, out: w, diff_id: None };
    spec.emit_layers(&mut one, &Progress { quiet: true })?;
    one.diff_id.ok_or_else(|| anyhow!("internal error: layer {} was not produced", index + 1))
}

/// A manifest's media type, from its `mediaType` (an OCI manifest if it has none).
fn media_type(manifest: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|v| v.get("mediaType").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| MANIFEST_TYPE.to_string())
}

/// Writes bytes `start..end` of the blob `digest` of the image on disk `source` into `w`.
fn write_planned(source: &str, digest: &str, start: u64, end: u64, w: &mut dyn Write) -> Result<()> {
    use crate::registry::source::BlobData;
    let quiet = Progress { quiet: true };
    crate::registry::with_plan(source, Compressor::None, ManifestFormat::Oci, None, &quiet, |plan| {
        let blob = plan.blobs.iter().find(|b| b.digest == digest).ok_or_else(|| anyhow!("{source}: no blob {digest} any more"))?;
        match &blob.data {
            BlobData::Bytes(b) => w.write_all(&b[start as usize..end as usize])?,
            BlobData::File(p) => {
                use std::io::{Read, Seek};
                let mut f = std::fs::File::open(p).map_err(|e| anyhow!("cannot open {}: {e}", p.display()))?;
                f.seek(io::SeekFrom::Start(start)).map_err(|e| anyhow!("cannot read {}: {e}", p.display()))?;
                let copied = io::copy(&mut f.take(end - start), w)?;
                if copied != end - start {
                    bail!("{} is shorter than its descriptor says", p.display());
                }
            }
            BlobData::Pass(i) => {
                let pass = plan.pass.ok_or_else(|| anyhow!("internal error: a pass blob without a pass"))?;
                let mut win = Window { inner: w, pos: 0, start, end };
                let mut one = OneItem { index: *i, out: &mut win, diff_id: None };
                match pass.run(&mut one, &quiet) {
                    Ok(()) => {}
                    Err(_) if win.pos >= end => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    })
}

/// Takes item `index` of a pass (or layer `index` of an image) into `out`, nothing else, and
/// keeps its diff_id.
struct OneItem<'w> {
    index: usize,
    out: &'w mut dyn Write,
    diff_id: Option<String>,
}

impl LayerSink for OneItem<'_> {
    fn wants(&mut self, index: usize) -> bool {
        index == self.index
    }
    fn begin(&mut self, _: &str, _: u64) -> Result<()> {
        Ok(())
    }
    fn out(&mut self) -> &mut dyn Write {
        &mut *self.out
    }
    fn end(&mut self, _: u64, diff_id: &str) -> Result<()> {
        self.diff_id = Some(diff_id.to_string());
        Ok(())
    }
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"errors": [{"code": code, "message": message}]})).unwrap_or_default()
}

/// Answers one request: its status and the body bytes sent. An error means the connection
/// must close (a write failed, or a layer failed after its head was sent).
fn respond(state: &State, req: &Request, w: &mut BufWriter<TcpStream>) -> io::Result<(u16, u64)> {
    let head_only = req.method == "HEAD";
    let keep = req.keep_alive;
    let send = |w: &mut BufWriter<TcpStream>, status: u16, headers: &[(&str, String)], body: &[u8]| -> io::Result<(u16, u64)> {
        http::write_head(w, status, headers, body.len() as u64, keep)?;
        if !head_only {
            w.write_all(body)?;
        }
        w.flush()?;
        Ok((status, body.len() as u64))
    };
    let json_type = || [("Content-Type", "application/json".to_string())];
    let fail = |w: &mut BufWriter<TcpStream>, f: Failure| {
        state.progress.say(format!("{} {}: {}", req.method, req.path, f.2));
        send(w, f.0, &json_type(), &error_body(f.1, &f.2))
    };
    if req.method != "GET" && req.method != "HEAD" {
        return fail(w, Failure(405, "UNSUPPORTED", format!("{} is not served: this registry is read-only", req.method)));
    }
    let path = req.path.as_str();
    if path == "/v2/" || path == "/v2" {
        return send(w, 200, &json_type(), b"{}");
    }
    if path == "/v2/_catalog" {
        let mut names: Vec<&str> = state.images.iter().map(|i| i.name.as_str()).collect();
        names.sort();
        names.dedup();
        return send(w, 200, &json_type(), &serde_json::to_vec(&json!({"repositories": names})).unwrap_or_default());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return fail(w, Failure(404, "NOT_FOUND", format!("{path}: not a registry API path")));
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        if state.images_named(name).next().is_none() {
            return fail(w, Failure(404, "NAME_UNKNOWN", format!("no image named {name} is served here")));
        }
        let tags: Vec<&str> = state.images_named(name).map(|i| i.tag.as_str()).collect();
        return send(w, 200, &json_type(), &serde_json::to_vec(&json!({"name": name, "tags": tags})).unwrap_or_default());
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return match state.manifest(name, reference) {
            Ok((digest, bytes)) => send(w, 200, &[("Content-Type", media_type(&bytes)), ("Docker-Content-Digest", digest)], &bytes),
            Err(f) => fail(w, f),
        };
    }
    let Some((name, digest)) = rest.rsplit_once("/blobs/") else {
        return fail(w, Failure(404, "NOT_FOUND", format!("{path}: not a registry API path")));
    };
    let blob = match state.blob(name, digest) {
        Ok(b) => b,
        Err(f) => return fail(w, f),
    };
    let total = match &blob {
        Blob::Config(b) => b.len() as u64,
        Blob::Layer { size, .. } | Blob::Planned { size, .. } => *size,
    };
    let (start, end, status) = match http::range(req.header("range"), total) {
        Ok(None) => (0, total, 200),
        Ok(Some((a, b))) => (a, b, 206),
        Err(http::Unsatisfiable) => {
            http::write_head(w, 416, &[("Content-Range", format!("bytes */{total}"))], 0, keep)?;
            w.flush()?;
            return Ok((416, 0));
        }
    };
    let mut headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Docker-Content-Digest", digest.to_string()),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    if status == 206 {
        headers.push(("Content-Range", format!("bytes {start}-{}/{total}", end - 1)));
    }
    http::write_head(w, status, &headers, end - start, keep)?;
    if head_only {
        w.flush()?;
        return Ok((status, 0));
    }
    match blob {
        Blob::Config(b) => w.write_all(&b[start as usize..end as usize])?,
        Blob::Planned { source, layer, .. } => {
            let _slot = state.layers_at_once.acquire();
            if layer {
                state.stats.layers.fetch_add(1, Ordering::Relaxed);
                state.stats.layer_bytes.fetch_add(end - start, Ordering::Relaxed);
            }
            if let Err(e) = write_planned(&source, digest, start, end, &mut *w) {
                state.progress.say(format!("{name}: blob {digest}: {e:#}"));
                return Err(io::Error::other("blob failed"));
            }
        }
        Blob::Layer { conf, index, .. } => {
            let _slot = state.layers_at_once.acquire();
            state.stats.layers.fetch_add(1, Ordering::Relaxed);
            state.stats.layer_bytes.fetch_add(end - start, Ordering::Relaxed);
            let mut win = Window { inner: &mut *w, pos: 0, start, end };
            let made = write_layer(&conf, index, &mut win);
            let complete = win.pos >= end;
            match made {
                Ok(diff_id) if status == 200 && format!("sha256:{diff_id}") != digest => {
                    state.progress.say(format!("{name}: layer {} came out as sha256:{diff_id}, not {digest}: its store paths changed", index + 1));
                    return Err(io::Error::other("layer changed"));
                }
                Ok(_) => {}
                Err(_) if complete => {}
                Err(e) => {
                    // The head is out: all that is left is to drop the connection.
                    state.progress.say(format!("{name}: layer {}: {e:#}", index + 1));
                    return Err(io::Error::other("layer failed"));
                }
            }
        }
    }
    w.flush()?;
    Ok((status, end - start))
}

fn serve_connection(state: &State, stream: TcpStream, opts: &ServeOptions) {
    let _ = stream.set_read_timeout(Some(opts.timeout));
    let _ = stream.set_write_timeout(Some(opts.timeout));
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else { return };
    let mut r = BufReader::new(stream);
    let mut w = BufWriter::with_capacity(256 << 10, write_half);
    loop {
        let req = match http::read_request(&mut r) {
            Ok(req) => req,
            Err(http::ReadError::Closed) => return,
            Err(http::ReadError::Bad(why)) => {
                let body = error_body("BAD_REQUEST", &why);
                let _ = http::write_head(&mut w, 400, &[("Content-Type", "application/json".into())], body.len() as u64, false);
                let _ = w.write_all(&body);
                let _ = w.flush();
                return;
            }
        };
        let started = Instant::now();
        let result = respond(state, &req, &mut w);
        if let Ok((status, bytes)) = &result {
            state.progress.say(format!("{} {} {status} {bytes} bytes {:.3} s", req.method, req.path, started.elapsed().as_secs_f64()));
        }
        if result.is_err() || !req.keep_alive {
            return;
        }
    }
}

/// A registry of `images`, ready to serve.
pub struct Server {
    state: State,
    /// What it sent, readable while it runs.
    pub stats: Arc<Stats>,
}

impl Server {
    pub fn new(images: Vec<Served>, progress: Progress) -> Server {
        let stats = Arc::new(Stats::default());
        let state = State { images, stats: stats.clone(), layers_at_once: Slots::new(LAYERS_AT_ONCE), blobs: Mutex::default(), manifests: Mutex::default(), cache: Mutex::new(DigestCache::open()), progress };
        Server { state, stats }
    }

    /// Serves on `listener` until the process is stopped. At most `max_connections`
    /// connections are served at once; the others wait in the listen queue.
    pub fn run(self, listener: TcpListener, opts: ServeOptions) -> Result<()> {
        let state = self.state;
        let connections = Slots::new(opts.max_connections);
        std::thread::scope(|scope| -> Result<()> {
            loop {
                let slot = connections.acquire();
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) => {
                        drop(slot);
                        // Out of file descriptors and the like: wait a little rather than spin.
                        state.progress.say(format!("cannot accept a connection: {e}"));
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let (state, opts) = (&state, &opts);
                scope.spawn(move || {
                    let _slot = slot;
                    serve_connection(state, stream, opts);
                });
            }
        })
    }
}
