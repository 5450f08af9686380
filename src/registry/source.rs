//! What `push` and `index` can push: a stream conf, an OCI layout directory, an oci-archive or
//! a Docker archive, each turned into a `Plan` (blobs and manifests with their digests).
//!
//! Layers that are made on the fly (a conf's store layers, a Docker archive's uncompressed
//! layers) are compressed once to learn their digests. A push keeps them in a `Spool` on disk
//! as they are made and uploads from there, each as soon as it is complete. A layer whose
//! digest the cache knew is only hashed; if the registry lacks it, it is made again, straight
//! into the upload.

use crate::image::read::{blob_name, ArchiveIndex, ArchivePick, OciStore};
use crate::util::limits::{parse_json, METADATA_VALUES};
use crate::image::base::BaseImage;
use crate::compress::{Annotations, Compressor, Pipeline};
use crate::util::{hex, sha256_digest};
use crate::image::{ImageSpec, LayerSink};
use crate::util::progress::Progress;
use crate::util::io::HashingWriter;
use crate::image::oci::{self, Descriptor, CONFIG_TYPE, INDEX_TYPE, MANIFEST_TYPE};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use crate::util::files::TempDir;
use crate::image::digests::compressed_key;

/// Where a blob's bytes come from.
pub enum BlobData {
    Bytes(Vec<u8>),
    File(PathBuf),
    /// Item `n` of the plan's pass.
    Pass(usize),
}

pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub data: BlobData,
    /// For progress lines, e.g. `layer 3`.
    pub what: String,
}

pub struct ManifestPut {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

/// Produces blobs in one sequential pass (re-runnable: the bytes are the same every time).
pub trait LayerPass {
    /// Writes the raw bytes of every item `sink.wants(n)` accepts.
    fn run(&self, sink: &mut dyn LayerSink, progress: &Progress) -> Result<()>;
    /// How raw bytes become the blob; `None`: they are the blob already.
    fn compressor(&self) -> Option<Compressor>;
}

pub struct Plan<'a> {
    /// Layers first, then configs: what the manifests need to be present.
    pub blobs: Vec<Blob>,
    /// Children before the index listing them; the last is what the tag names.
    pub manifests: Vec<ManifestPut>,
    pub pass: Option<&'a dyn LayerPass>,
}

impl Plan<'_> {
    pub fn top(&self) -> &ManifestPut {
        self.manifests.last().expect("a plan has a manifest")
    }
}

/// Which manifest media types a push writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ManifestFormat {
    /// OCI image manifests and indexes.
    Oci,
    /// Docker's image manifest schema 2 and manifest lists, for clients that read no other.
    V2s2,
}

impl crate::util::shared::Choice for ManifestFormat {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[("oci", ManifestFormat::Oci, ""), ("v2s2", ManifestFormat::V2s2, "")];
}

const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
const DOCKER_FOREIGN_LAYER: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar";

/// The Docker media type of a layer given as `t` (OCI or Docker already).
fn docker_layer_type(t: &str, what: &str) -> Result<String> {
    let (base, compression) = match t.rsplit_once(['+', '.']) {
        Some((b, c @ ("gzip" | "zstd"))) => (b, Some(c)),
        _ => (t, None),
    };
    let docker = match base {
        "application/vnd.oci.image.layer.v1.tar" | DOCKER_LAYER => DOCKER_LAYER,
        "application/vnd.oci.image.layer.nondistributable.v1.tar" | DOCKER_FOREIGN_LAYER => DOCKER_FOREIGN_LAYER,
        _ => bail!("{what}: layer media type {t} has no Docker schema 2 form"),
    };
    match compression {
        None => Ok(docker.to_string()),
        Some("gzip") => Ok(format!("{docker}.gzip")),
        _ => bail!("{what}: a zstd layer, and Docker's schema 2 has no zstd (push with --compressor gz or none, or --manifest-format oci)"),
    }
}

/// Rewrites the plan's manifests as Docker schema 2 manifests and manifest lists (new bytes,
/// so new digests; the blobs are the same). Indexes come after the manifests they list, and
/// take their new digests.
pub fn into_docker_manifests(plan: &mut Plan) -> Result<()> {
    let mut renamed: HashMap<String, (String, u64, &'static str)> = HashMap::new();
    for m in &mut plan.manifests {
        let what = format!("manifest {}", m.digest);
        let doc: Value = parse_json(&m.bytes, METADATA_VALUES).map_err(|e| anyhow!("{what}: {e:#}"))?;
        let desc = |d: &Value, media_type: String| -> Result<Value> {
            let digest = d.get("digest").and_then(Value::as_str).ok_or_else(|| anyhow!("{what}: a descriptor has no digest"))?;
            let size = d.get("size").and_then(Value::as_u64).ok_or_else(|| anyhow!("{what}: descriptor {digest} has no size"))?;
            let mut out = serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
            for key in ["urls", "platform"] {
                if let Some(v) = d.get(key) {
                    out[key] = v.clone();
                }
            }
            Ok(out)
        };
        let (converted, media_type) = if let Some(list) = doc.get("manifests").and_then(Value::as_array) {
            let entries = list
                .iter()
                .map(|e| {
                    let digest = e.get("digest").and_then(Value::as_str).unwrap_or_default();
                    match renamed.get(digest) {
                        Some((d, size, t)) => {
                            let mut out = desc(e, t.to_string())?;
                            out["digest"] = Value::from(d.as_str());
                            out["size"] = Value::from(*size);
                            Ok(out)
                        }
                        None => bail!("{what}: lists {digest}, which this push does not carry"),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            (serde_json::json!({"schemaVersion": 2, "mediaType": super::client::DOCKER_LIST, "manifests": entries}), super::client::DOCKER_LIST)
        } else {
            let config = doc.get("config").ok_or_else(|| anyhow!("{what}: no config"))?;
            match config.get("mediaType").and_then(Value::as_str) {
                Some(CONFIG_TYPE | DOCKER_CONFIG) | None => {}
                Some(t) => bail!("{what}: config media type {t} is not an image config; Docker schema 2 cannot carry it"),
            }
            let layers = doc
                .get("layers")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("{what}: no layers"))?
                .iter()
                .map(|l| desc(l, docker_layer_type(l.get("mediaType").and_then(Value::as_str).unwrap_or(""), &what)?))
                .collect::<Result<Vec<_>>>()?;
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": super::client::DOCKER_MANIFEST,
                "config": desc(config, DOCKER_CONFIG.into())?,
                "layers": layers,
            });
            (manifest, super::client::DOCKER_MANIFEST)
        };
        let bytes = serde_json::to_vec(&converted)?;
        let digest = sha256_digest(&bytes);
        renamed.insert(m.digest.clone(), (digest.clone(), bytes.len() as u64, media_type));
        *m = ManifestPut { bytes, media_type: media_type.into(), digest };
    }
    Ok(())
}

/// A source as given on the command line.
pub enum Source {
    Conf(PathBuf),
    OciDir(PathBuf, Option<String>),
    OciArchive(PathBuf, Option<String>),
    /// With the image to take of a multi-image archive, if given.
    DockerArchive(PathBuf, Option<ArchivePick>),
}

fn split_ref(s: &str) -> (PathBuf, Option<String>) {
    // `PATH:REF`, REF itself possibly `NAME:TAG` (as skopeo reads `oci:DIR:REF`): split at the
    // first colon whose left part exists, so paths with colons still work.
    if Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    for (i, _) in s.match_indices(':') {
        let (p, r) = (&s[..i], &s[i + 1..]);
        if !r.is_empty() && Path::new(p).exists() {
            return (PathBuf::from(p), Some(r.to_string()));
        }
    }
    (PathBuf::from(s), None)
}

impl Source {
    /// `oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, `docker-archive:FILE[:NAME:TAG|:@N]` (as
    /// skopeo reads them), or a path: a directory is an OCI layout, a JSON file a conf, a tar
    /// is told by its members.
    pub fn parse(s: &str) -> Result<Source> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (p, r) = split_ref(rest);
            return Ok(Source::OciDir(p, r));
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (p, r) = split_ref(rest);
            return Ok(Source::OciArchive(p, r));
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (p, r) = split_ref(rest);
            let pick = r.map(|r| ArchivePick::parse(&r)).transpose().map_err(|e| anyhow!("source {s}: {e:#}"))?;
            return Ok(Source::DockerArchive(p, pick));
        }
        if let Some(rest) = s.strip_prefix("conf:") {
            return Ok(Source::Conf(rest.into()));
        }
        let path = PathBuf::from(s);
        let meta = fs::metadata(&path).map_err(|e| anyhow!("cannot read source {s}: {e}"))?;
        if meta.is_dir() {
            return Ok(Source::OciDir(path, None));
        }
        crate::util::limits::check_regular(&path).map_err(|e| anyhow!("source {e:#}"))?;
        let mut head = [0u8; 512];
        let n = File::open(&path).and_then(|mut f| f.read(&mut head)).map_err(|e| anyhow!("cannot read source {s}: {e}"))?;
        if head[..n].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return Ok(Source::Conf(path));
        }
        // A tar: a Docker archive has manifest.json, an oci-archive index.json. Newer ones of
        // both have both: one whose layers are compressed already is pushed as it is.
        let idx = ArchiveIndex::load(&path).with_context(|| format!("source {s}: not a conf, a Docker archive or an oci-archive"))?;
        match (idx.contains("manifest.json"), idx.contains("index.json")) {
            (true, true) if idx.oci_layers_compressed() => Ok(Source::OciArchive(path, None)),
            (true, _) => Ok(Source::DockerArchive(path, None)),
            (false, true) => Ok(Source::OciArchive(path, None)),
            _ => bail!("source {s}: a tar with neither manifest.json (Docker archive) nor index.json (oci-archive)"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layers made on the fly: pass 1 learns their compressed digests.

/// Compressed layers kept on disk by the pass that learns their digests, so a push compresses
/// each layer once: the upload reads the file. Each file is handed over (`ready`) as soon as it is
/// complete, so it can go up while later layers are still being compressed; whoever takes it
/// removes it when done, and what is left goes with the directory.
pub struct Spool {
    dir: TempDir,
    ready: Mutex<Option<Sender<Spooled>>>,
    /// Set by the consumer when it failed: the pass stops at the next layer.
    failed: AtomicBool,
    next: AtomicUsize,
}

/// A complete spooled layer.
pub struct Spooled {
    pub digest: String,
    pub size: u64,
    pub path: PathBuf,
    /// For progress lines, e.g. `layer 3`.
    pub what: String,
}

impl Spool {
    /// A spool in the temporary directory (`TMPDIR`), telling `ready` of each layer.
    pub fn new(ready: Sender<Spooled>) -> Result<Spool> {
        let dir = TempDir::new_in(&crate::util::settings::get().temp_dir)?;
        Ok(Spool { dir, ready: Mutex::new(Some(ready)), failed: AtomicBool::new(false), next: AtomicUsize::new(0) })
    }

    fn create(&self) -> Result<Kept> {
        let path = self.dir.path().join(format!("layer-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        let file = File::create(&path).map_err(|e| anyhow!("cannot create {} to keep a compressed layer: {e}", path.display()))?;
        Ok(Kept::File(io::BufWriter::with_capacity(1 << 20, file), path))
    }

    fn hand_over(&self, layer: Spooled) {
        if let Some(tx) = self.ready.lock().ok().as_ref().and_then(|g| g.as_ref()) {
            let _ = tx.send(layer);
        }
    }

    /// No more layers: the consumer sees the end.
    pub fn close(&self) {
        if let Ok(mut g) = self.ready.lock() {
            g.take();
        }
    }

    /// The consumer gave up: the pass stops.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

/// Where the digest pass puts a compressed layer: nowhere (only its digest is wanted), or a
/// spool file.
enum Kept {
    Nothing,
    File(io::BufWriter<File>, PathBuf),
}

impl Write for Kept {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Kept::Nothing => Ok(buf.len()),
            Kept::File(f, path) => f.write(buf).map_err(|e| spool_error(path, e)),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Kept::Nothing => Ok(()),
            Kept::File(f, path) => f.flush().map_err(|e| spool_error(path, e)),
        }
    }
}

fn spool_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot keep a compressed layer in {}: {e} (TMPDIR chooses where)", path.display()))
}

/// A failure of the digest pipeline: nothing is written but the spool, whose errors say so.
fn spool_failed(e: io::Error) -> anyhow::Error {
    anyhow!("{e}")
}

/// A compressed layer's digest and size, and its spool file if it was kept.
type Hashed = ([u8; 32], u64, Option<PathBuf>, Annotations);

type HashPipeline = Pipeline<HashingWriter<Kept>, Hashed, fn(HashingWriter<Kept>, Annotations) -> io::Result<Hashed>>;

fn hashed(w: HashingWriter<Kept>, annotations: Annotations) -> io::Result<Hashed> {
    let (kept, digest, size) = w.finish();
    let path = match kept {
        Kept::Nothing => None,
        Kept::File(f, path) => {
            f.into_inner().map_err(|e| spool_error(&path, e.into_error()))?;
            Some(path)
        }
    };
    Ok((digest, size, path, annotations))
}

/// A layer the digest pass learnt: its descriptor, diff_id (hex) and spool file, if kept.
struct Learnt {
    digest: String,
    size: u64,
    diff_id: String,
    kept: Option<PathBuf>,
    annotations: Annotations,
}

/// Compresses and hashes each layer, keeping it in the spool if there is one. One pipeline for
/// all layers, so small layers compress in parallel too.
struct DigestSink<'s> {
    /// Only these items (None: all).
    only: Option<std::collections::HashSet<usize>>,
    index: usize,
    pipe: HashPipeline,
    /// Closed items not hashed yet, oldest first: (item, diff_id hex).
    pending: std::collections::VecDeque<(usize, String)>,
    results: HashMap<usize, Learnt>,
    spool: Option<&'s Spool>,
}

impl<'s> DigestSink<'s> {
    fn new(compressor: Compressor, only: Option<std::collections::HashSet<usize>>, spool: Option<&'s Spool>) -> DigestSink<'s> {
        let pipe = Pipeline::new(compressor, hashed as fn(_, _) -> _);
        DigestSink { only, index: 0, pipe, pending: Default::default(), results: HashMap::new(), spool }
    }

    fn collect(&mut self) {
        for (digest, size, kept, annotations) in self.pipe.take_finished() {
            let (index, diff_id) = self.pending.pop_front().expect("a finished layer was closed");
            let digest = format!("sha256:{}", hex(&digest));
            if let (Some(spool), Some(path)) = (self.spool, &kept) {
                spool.hand_over(Spooled { digest: digest.clone(), size, path: path.clone(), what: format!("layer {}", index + 1) });
            }
            self.results.insert(index, Learnt { digest, size, diff_id, kept, annotations });
        }
    }

    /// Waits for the last layers; returns the results by item.
    fn finish(mut self) -> Result<HashMap<usize, Learnt>> {
        self.pipe.wait().map_err(spool_failed)?;
        self.collect();
        Ok(self.results)
    }
}

impl LayerSink for DigestSink<'_> {
    fn wants(&mut self, index: usize) -> bool {
        self.index = index;
        self.only.as_ref().is_none_or(|o| o.contains(&index))
    }
    fn begin(&mut self, _name: &str, _size: u64) -> Result<()> {
        if self.spool.is_some_and(|s| s.failed.load(Ordering::Relaxed)) {
            bail!("stopped: an upload failed");
        }
        let kept = match self.spool {
            Some(spool) => spool.create()?,
            None => Kept::Nothing,
        };
        self.pipe.begin(HashingWriter::new(kept)).map_err(spool_failed)
    }
    fn out(&mut self) -> &mut dyn Write {
        &mut self.pipe
    }
    fn end(&mut self, _size: u64, diff_id: &str) -> Result<()> {
        self.pending.push_back((self.index, diff_id.to_string()));
        self.pipe.end().map_err(spool_failed)?;
        self.collect();
        Ok(())
    }
}

/// What the plan knows of a layer before the push: its compressed digest and size, the file it
/// was kept in if it was compressed for this push, and its descriptor's annotations.
type Known = (String, u64, Option<PathBuf>, Annotations);

/// Learns the compressed digest of every item of `pass` whose diff_id (`diff_ids`, by item;
/// None: not known before producing it) is not cached, keeping those layers in `spool` if
/// given. Returns what is known by item.
fn layer_digests(pass: &dyn LayerPass, compressor: Compressor, diff_ids: &[Option<String>], spool: Option<&Spool>, progress: &Progress) -> Result<HashMap<usize, Known>> {
    let mut cache = crate::image::digests::DigestCache::open();
    let mut out = HashMap::new();
    let mut misses = std::collections::HashSet::new();
    for (i, d) in diff_ids.iter().enumerate() {
        match d.as_deref().and_then(|d| cache.get_annotated(&compressed_key(compressor, d))) {
            Some((digest, size, annotations)) => {
                out.insert(i, (digest, size, None, annotations));
            }
            None => {
                misses.insert(i);
            }
        }
    }
    if misses.is_empty() {
        return Ok(out);
    }
    progress.say(format!("Compressing {} of {} layers to learn their digests...", misses.len(), diff_ids.len()));
    let mut sink = DigestSink::new(compressor, Some(misses), spool);
    pass.run(&mut sink, &Progress { quiet: true })?;
    for (i, l) in sink.finish()? {
        if let Some(Some(known)) = diff_ids.get(i) {
            if known.trim_start_matches("sha256:") != l.diff_id {
                bail!("layer {} hashes to sha256:{}, not {known}", i + 1, l.diff_id);
            }
        }
        cache.put_annotated(&compressed_key(compressor, &l.diff_id), &l.digest, l.size, &l.annotations);
        out.insert(i, (l.digest, l.size, l.kept, l.annotations));
    }
    Ok(out)
}

/// A layer's blob: from its spool file if it has one, else made again by the pass.
fn layer_blob((digest, size, kept, _): &Known, item: usize, what: String) -> Blob {
    let data = match kept {
        Some(path) => BlobData::File(path.clone()),
        None => BlobData::Pass(item),
    };
    Blob { digest: digest.clone(), size: *size, data, what }
}

/// A stream conf's layers (base image, store layers, customisation layer).
pub struct ConfPass<'c> {
    pub spec: ImageSpec<'c>,
    pub compressor: Compressor,
}

impl LayerPass for ConfPass<'_> {
    fn run(&self, sink: &mut dyn LayerSink, progress: &Progress) -> Result<()> {
        self.spec.emit_layers(sink, progress).map(drop)
    }
    fn compressor(&self) -> Option<Compressor> {
        Some(self.compressor)
    }
}

/// Plans a conf's image: one digest pass (keeping the compressed layers in `spool`, if given),
/// then the OCI config and manifest.
pub fn plan_conf<'a>(pass: &'a ConfPass<'_>, spool: Option<&Spool>, progress: &Progress) -> Result<Plan<'a>> {
    let quiet = Progress { quiet: true };
    let n = pass.spec.layer_count();
    let mut cache = crate::image::digests::DigestCache::open();
    let (layers, digests) = if cache.is_empty() {
        // Nothing cached: compress every layer once, learning diff_ids on the way.
        progress.say(format!("Compressing {n} layers to learn their digests..."));
        let mut sink = DigestSink::new(pass.compressor, None, spool);
        let layers = pass.spec.emit_layers(&mut sink, &quiet)?;
        let mut digests = HashMap::new();
        for (i, l) in sink.finish()? {
            cache.put_annotated(&compressed_key(pass.compressor, &l.diff_id), &l.digest, l.size, &l.annotations);
            digests.insert(i, (l.digest, l.size, l.kept, l.annotations));
        }
        pass.spec.remember_layers(&mut cache, &layers);
        (layers, digests)
    } else {
        // The diff_ids find cached digests: known ones from the store paths (nothing read),
        // the others from a cheap pass (tar + sha256, no compression). Only layers whose
        // compressed digest is not cached are compressed.
        progress.say(format!("Looking up the digests of {n} layers..."));
        let layers = pass.spec.describe_layers(&mut cache, &quiet)?;
        let diff_ids: Vec<Option<String>> = layers.iter().map(|l| Some(l.diff_id.clone())).collect();
        let digests = layer_digests(pass, pass.compressor, &diff_ids, spool, progress)?;
        (layers, digests)
    };
    let mut blobs = Vec::new();
    let mut descs = Vec::new();
    for i in 0..layers.len() {
        let known = digests.get(&i).ok_or_else(|| anyhow!("internal error: layer {} was not produced", i + 1))?;
        descs.push(Descriptor { annotations: known.3.clone(), ..Descriptor::new(oci::layer_media_type(pass.compressor), known.0.clone(), known.1) });
        blobs.push(layer_blob(known, i, format!("layer {}", i + 1)));
    }
    let config = pass.spec.config_json(&layers).into_bytes();
    let config_desc = Descriptor::new(CONFIG_TYPE, sha256_digest(&config), config.len() as u64);
    blobs.push(Blob { digest: config_desc.digest.clone(), size: config_desc.size, data: BlobData::Bytes(config), what: "config".into() });
    let manifest = oci::manifest_json(&config_desc, &descs).into_bytes();
    let digest = sha256_digest(&manifest);
    Ok(Plan { blobs, manifests: vec![ManifestPut { bytes: manifest, media_type: MANIFEST_TYPE.into(), digest }], pass: Some(pass) })
}

/// A Docker archive's layers, read from the archive (decompressed if they were compressed).
pub struct DockerArchivePass {
    pub base: BaseImage,
    pub compressor: Compressor,
}

impl LayerPass for DockerArchivePass {
    fn run(&self, sink: &mut dyn LayerSink, _progress: &Progress) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        self.base.copy_layers(|layer, bytes| {
            let index = self.base.layers.iter().position(|l| l.member == layer.member).unwrap_or(0);
            if !sink.wants(index) {
                return Ok(());
            }
            // The registry needs no size first: decompressed as it goes, checked by copy_layers.
            sink.begin(&layer.member, layer.size)?;
            let mut hw = HashingWriter::new(sink.out());
            crate::util::io::copy_reading(&mut bytes.stream()?, &mut hw, &mut buf, || format!("{}: member {}", self.base.path.display(), layer.member))?;
            let (_, digest, size) = hw.finish();
            sink.end(size, &hex(&digest))
        })
    }
    fn compressor(&self) -> Option<Compressor> {
        Some(self.compressor)
    }
}

pub fn plan_docker_archive<'a>(pass: &'a DockerArchivePass, spool: Option<&Spool>, progress: &Progress) -> Result<Plan<'a>> {
    // The config lists diff_ids, so cached digests are found without reading any layer.
    let diff_ids: Vec<Option<String>> = pass
        .base
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (pass.base.layers.iter().position(|m| m.member == l.member) == Some(i)).then(|| l.diff_id.clone()))
        .collect();
    let results = layer_digests(pass, pass.compressor, &diff_ids, spool, progress)?;
    // Byte for byte, so the image ID is kept.
    let config = pass.base.config_bytes()?;
    let mut blobs = Vec::new();
    let mut descs = Vec::new();
    for (i, layer) in pass.base.layers.iter().enumerate() {
        // Layers sharing a member were produced once, under the first index.
        let first = pass.base.layers.iter().position(|l| l.member == layer.member).unwrap_or(i);
        let known = results.get(&first).ok_or_else(|| anyhow!("internal error: layer {} was not produced", i + 1))?;
        descs.push(Descriptor { annotations: known.3.clone(), ..Descriptor::new(oci::layer_media_type(pass.compressor), known.0.clone(), known.1) });
        blobs.push(layer_blob(known, first, format!("layer {}", i + 1)));
    }
    let config_desc = Descriptor::new(CONFIG_TYPE, sha256_digest(&config), config.len() as u64);
    blobs.push(Blob { digest: config_desc.digest.clone(), size: config_desc.size, data: BlobData::Bytes(config), what: "config".into() });
    let manifest = oci::manifest_json(&config_desc, &descs).into_bytes();
    let digest = sha256_digest(&manifest);
    Ok(Plan { blobs, manifests: vec![ManifestPut { bytes: manifest, media_type: MANIFEST_TYPE.into(), digest }], pass: Some(pass) })
}

// ---------------------------------------------------------------------------------------------
// OCI layouts: blobs are ready; walk index -> manifests -> blobs.

/// Walks from a descriptor down to blobs: every manifest of an index, so a push carries all
/// platforms (unlike a reader, which takes one).
fn walk(
    desc: &Value,
    store: &OciStore,
    blobs: &mut Vec<(String, u64, String)>,
    manifests: &mut Vec<ManifestPut>,
    what: &str,
    depth: u32,
) -> Result<()> {
    if depth > 4 {
        bail!("{what}: indexes nested too deeply");
    }
    let digest = desc.get("digest").and_then(Value::as_str).ok_or_else(|| anyhow!("{what}: a descriptor has no digest"))?.to_string();
    super::auth::check_digest(&digest).map_err(|e| anyhow!("{what}: {e}"))?;
    let bytes = store.bytes(&blob_name(&digest)?).map_err(|e| anyhow!("{what}: blob {digest}: {e:#}"))?;
    if sha256_digest(&bytes) != digest {
        bail!("{what}: blob {digest} does not match its digest");
    }
    let json: Value = parse_json(&bytes, METADATA_VALUES).map_err(|e| anyhow!("{what}: manifest {digest}: {e:#}"))?;
    let media_type = json
        .get("mediaType")
        .and_then(Value::as_str)
        .or_else(|| desc.get("mediaType").and_then(Value::as_str))
        .unwrap_or(if json.get("manifests").is_some() { INDEX_TYPE } else { MANIFEST_TYPE })
        .to_string();
    if let Some(children) = json.get("manifests").and_then(Value::as_array) {
        for child in children {
            walk(child, store, blobs, manifests, what, depth + 1)?;
        }
    } else {
        let mut add = |d: &Value, kind: &str| -> Result<()> {
            let digest = d.get("digest").and_then(Value::as_str).ok_or_else(|| anyhow!("{what}: a descriptor has no digest"))?;
            super::auth::check_digest(digest).map_err(|e| anyhow!("{what}: {e}"))?;
            let size = d.get("size").and_then(Value::as_u64).ok_or_else(|| anyhow!("{what}: descriptor {digest} has no size"))?;
            if !blobs.iter().any(|(b, _, _)| b == digest) {
                blobs.push((digest.to_string(), size, kind.to_string()));
            }
            Ok(())
        };
        let layers = json.get("layers").and_then(Value::as_array).ok_or_else(|| anyhow!("{what}: manifest {digest} has no layers"))?;
        for (i, l) in layers.iter().enumerate() {
            add(l, &format!("layer {}", i + 1))?;
        }
        add(json.get("config").ok_or_else(|| anyhow!("{what}: manifest {digest} has no config"))?, "config")?;
    }
    if !manifests.iter().any(|m| m.digest == digest) {
        manifests.push(ManifestPut { bytes, media_type, digest });
    }
    Ok(())
}

/// An oci-archive's big blobs, read from the tar in one pass.
pub struct OciArchivePass {
    pub index: ArchiveIndex,
    /// Pass items: member name (`blobs/sha256/<hex>`) by item number.
    pub members: Vec<String>,
}

impl LayerPass for OciArchivePass {
    fn run(&self, sink: &mut dyn LayerSink, _progress: &Progress) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let path = &self.index.path;
        let mut wanted = self.members.clone();
        wanted.sort();
        wanted.dedup();
        self.index.for_each_wanted(&wanted, |name, r| {
            for (i, _) in self.members.iter().enumerate().filter(|(_, m)| *m == name) {
                if sink.wants(i) {
                    sink.begin(name, 0)?;
                    let n = crate::util::io::copy_reading(&mut &mut *r, sink.out(), &mut buf, || format!("{}: member {name}", path.display()))?;
                    sink.end(n, "")?;
                    break;
                }
            }
            Ok(true)
        })
    }
    fn compressor(&self) -> Option<Compressor> {
        None
    }
}

/// Plans an OCI layout or oci-archive: the image `reference` names (see `select_index_entry`),
/// with every platform of an index. A layout's blobs are read from their files; an archive's
/// small JSON members are kept and its other blobs listed for one pass (the returned names).
pub fn plan_oci(store: &OciStore, reference: Option<&str>) -> Result<(Plan<'static>, Vec<String>)> {
    let what = store.what();
    let index: Value = store.json("index.json").map_err(|e| anyhow!("{what}: {e:#}"))?;
    let entry = crate::image::read::select_index_entry(&index, reference.map(crate::image::read::IndexRef::Ref), &what)?;
    let (mut found, mut manifests) = (Vec::new(), Vec::new());
    walk(entry, store, &mut found, &mut manifests, &what, 0)?;
    let (mut blobs, mut members) = (Vec::new(), Vec::new());
    for (digest, size, kind) in found {
        let name = blob_name(&digest)?;
        let actual = store.size(&name).map_err(|_| anyhow!("{what}: no blob {digest}"))?;
        if actual != size {
            bail!("{what}: blob {digest} is {actual} bytes, its descriptor says {size}");
        }
        let data = match store {
            OciStore::Dir(dir) => BlobData::File(dir.join(&name)),
            OciStore::Archive(_) if kind == "config" => {
                let bytes = store.bytes(&name)?;
                if sha256_digest(&bytes) != digest {
                    bail!("{what}: blob {digest} does not match its digest");
                }
                BlobData::Bytes(bytes)
            }
            OciStore::Archive(_) => {
                members.push(name);
                BlobData::Pass(members.len() - 1)
            }
        };
        blobs.push(Blob { digest, size, data, what: kind });
    }
    Ok((Plan { blobs, manifests, pass: None }, members))
}
