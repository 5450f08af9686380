//! OCI image layouts (a directory, or that directory as a tar: `oci-archive`, with a Docker
//! `manifest.json` beside the layout as `docker save` writes one), with each layer compressed on
//! its own (none, gzip or zstd), deterministically.
//!
//! Several processes may write into one layout at once. Blobs are written to temporary files
//! of their own in the layout's top directory (not in `blobs/sha256`, where `umoci gc` takes
//! every name for a digest) and renamed into place once complete and fsynced; two writers of
//! one blob write the same bytes, so either rename may win. `index.json` is updated under an
//! exclusive lock on the layout directory, re-read under it, and replaced by a rename.

use crate::compress::{Annotations, Compressor, Pipeline};
use crate::util::files::{self, create_temp, TempPath};
use crate::util::hex;
use crate::image::{ImageSpec, LayerInfo, LayerSink};
use crate::util::progress::Progress;
use crate::util::io::out_err;
use crate::util::io::OutputError;
use crate::util::io::HashingWriter;
use crate::tar::Header;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// What the blob of a layer, config or manifest is: the OCI descriptor fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    pub size: u64,
    /// A layer's annotations (zstd:chunked's TOC position); usually none.
    pub annotations: Annotations,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: impl Into<String>, size: u64) -> Descriptor {
        Descriptor { media_type: media_type.into(), digest: digest.into(), size, annotations: Vec::new() }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size});
        if !self.annotations.is_empty() {
            let mut sorted = self.annotations.clone();
            sorted.sort();
            v["annotations"] = Value::Object(sorted.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
        }
        v
    }
}

pub fn layer_media_type(c: Compressor) -> String {
    format!("application/vnd.oci.image.layer.v1.tar{}", c.media_suffix())
}

/// A layer blob being written: compressed bytes into a temporary file, hashed on the way.
/// Dropped unfinished (an error, a pipeline torn down), it removes the file.
struct BlobOut {
    w: HashingWriter<BufWriter<File>>,
    tmp: TempPath,
}

impl Write for BlobOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

fn buf_file(buf: BufWriter<File>) -> std::io::Result<File> {
    buf.into_inner().map_err(|e| e.into_error())
}

/// Moves a complete blob to its digest's name; returns (digest hex, size, annotations).
fn finish_blob(blobs: &Path, out: BlobOut, annotations: Annotations) -> std::io::Result<(String, u64, Annotations)> {
    let (buf, digest, size) = out.w.finish();
    let digest = hex(&digest);
    out.tmp.persist(buf_file(buf)?, &blobs.join(&digest))?;
    Ok((digest, size, annotations))
}

type BlobDone = Box<dyn FnMut(BlobOut, Annotations) -> std::io::Result<(String, u64, Annotations)>>;
type BlobPipeline = Pipeline<BlobOut, (String, u64, Annotations), BlobDone>;

/// Writes each layer, compressed, into `blobs/sha256/`. Layers are compressed by one pipeline:
/// the next layer's tar is made while the last pieces of earlier ones are still compressing.
struct BlobSink {
    /// The layout, where the temporary files go.
    root: PathBuf,
    compressor: Compressor,
    pipe: BlobPipeline,
    /// diff_ids of closed layers whose blob is not complete yet, oldest first.
    pending: std::collections::VecDeque<String>,
    /// Compressed descriptors by diff_id.
    by_diff_id: HashMap<String, Descriptor>,
    started: std::time::Instant,
    raw_bytes: u64,
}

impl BlobSink {
    fn new(root: &Path, compressor: Compressor) -> BlobSink {
        let blobs = root.join("blobs/sha256");
        let done: BlobDone = Box::new(move |out, annotations| finish_blob(&blobs, out, annotations));
        BlobSink {
            root: root.to_owned(),
            compressor,
            pipe: Pipeline::new(compressor, done),
            pending: Default::default(),
            by_diff_id: HashMap::new(),
            started: std::time::Instant::now(),
            raw_bytes: 0,
        }
    }

    /// Records the blobs completed so far.
    fn collect(&mut self) {
        for (digest, size, annotations) in self.pipe.take_finished() {
            let diff_id = self.pending.pop_front().expect("a finished blob was closed");
            let d = Descriptor { annotations, ..Descriptor::new(layer_media_type(self.compressor), format!("sha256:{digest}"), size) };
            self.by_diff_id.insert(diff_id, d);
        }
    }

    /// Waits for every layer's blob.
    fn finish(&mut self) -> Result<()> {
        self.pipe.wait().map_err(out_err)?;
        self.collect();
        Ok(())
    }
}

impl LayerSink for BlobSink {
    fn begin(&mut self, _name: &str, _size: u64) -> Result<()> {
        let (file, tmp) = create_temp(&self.root, OsStr::new("blob")).with_context(|| format!("cannot create a file in {}", self.root.display()))?;
        let w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        self.pipe.begin(BlobOut { w, tmp }).map_err(out_err)
    }

    fn out(&mut self) -> &mut dyn Write {
        &mut self.pipe
    }

    fn end(&mut self, size: u64, diff_id: &str) -> Result<()> {
        self.pending.push_back(diff_id.to_string());
        self.raw_bytes += size;
        self.pipe.end().map_err(out_err)?;
        self.collect();
        Ok(())
    }
}

/// Stores `data` as a blob of the layout and returns its descriptor.
pub fn put_blob(layout: &Path, media_type: &str, data: &[u8]) -> Result<Descriptor> {
    let digest = hex(&Sha256::digest(data));
    let path = layout.join("blobs/sha256").join(&digest);
    let (mut file, tmp) = create_temp(layout, OsStr::new("blob")).with_context(|| format!("cannot create a file in {}", layout.display()))?;
    file.write_all(data).and_then(|()| tmp.persist(file, &path)).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Descriptor::new(media_type, format!("sha256:{digest}"), data.len() as u64))
}

/// The image written into a layout: its manifest and what went into it.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    pub diff_ids: Vec<String>,
}

/// The OCI manifest JSON for a config and layers.
pub fn manifest_json(config: &Descriptor, layers: &[Descriptor]) -> String {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    serde_json::to_string(&manifest).expect("JSON values always serialize")
}

/// Writes the image into the OCI layout at `dir` (created if needed; other images already in
/// its index are kept, one with the same name is replaced) and tags it `repo_tag`.
pub fn write_layout(spec: &ImageSpec, dir: &Path, compressor: Compressor, repo_tag: &str, progress: &Progress) -> Result<WrittenImage> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    let mut sink = BlobSink::new(dir, compressor);
    // On failure the unfinished blobs' temporary files go with the sink.
    let layers: Vec<LayerInfo> = spec.emit_layers(&mut sink, progress).and_then(|l| sink.finish().map(|()| l)).map_err(|e| match e.downcast_ref::<OutputError>() {
        Some(OutputError(io)) => anyhow!("cannot write a layer blob into {}: {io}", dir.display()),
        None => e,
    })?;
    if compressor != Compressor::None && sink.raw_bytes > 0 {
        let packed: u64 = sink.by_diff_id.values().map(|d| d.size).sum();
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        let secs = sink.started.elapsed().as_secs_f64();
        progress.say(format!(
            "Compressed {} layers: {:.1} MiB to {:.1} MiB in {secs:.2} s ({:.0} MiB/s)",
            sink.by_diff_id.len(),
            mib(sink.raw_bytes),
            mib(packed),
            mib(sink.raw_bytes) / secs.max(1e-6)
        ));
    }
    progress.say("Adding manifests...");
    let layer_descs: Vec<Descriptor> = layers
        .iter()
        .map(|l| sink.by_diff_id.get(&l.diff_id).cloned().ok_or_else(|| anyhow!("internal error: layer {} was not written", l.path)))
        .collect::<Result<_>>()?;
    let config = put_blob(dir, CONFIG_TYPE, spec.config_json(&layers).as_bytes())?;
    let manifest = put_blob(dir, MANIFEST_TYPE, manifest_json(&config, &layer_descs).as_bytes())?;
    add_to_index(dir, &manifest, Some(repo_tag))?;
    Ok(WrittenImage {
        manifest,
        config,
        layers: layer_descs,
        diff_ids: layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect(),
    })
}

/// The `oci-layout` file we write.
const LAYOUT_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Adds a manifest (or index) to the layout's `index.json`, replacing one of the same name
/// (`NAME[:TAG]`, compared normalised; the tag `latest` if none), and writes `oci-layout`
/// unless it is there already. Safe with other writers at once: the
/// index is read and replaced under an exclusive lock on the layout, so no entry is lost, and
/// replaced whole by a rename, so a failure (a full disk) leaves the old one.
pub fn add_to_index(dir: &Path, manifest: &Descriptor, name: Option<&str>) -> Result<()> {
    // The blobs' renames must be on disk before an index that names them is.
    let blobs = dir.join("blobs/sha256");
    files::sync_dir(&blobs).with_context(|| format!("cannot sync {}", blobs.display()))?;
    // Locking the directory, not a file in it: neither umoci nor containers/image lock a
    // layout at all, so there is no lock of theirs to share, and users of both expect a
    // layout to hold oci-layout, index.json and blobs/ only, not a lock file for good.
    let _lock = files::lock_dir(dir)?;
    let layout_path = dir.join("oci-layout");
    let layout_ok = fs::read(&layout_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| v["imageLayoutVersion"] == "1.0.0");
    if !layout_ok {
        files::write_file_atomically(&layout_path, LAYOUT_FILE)?;
    }
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Value> = match fs::read(&index_path) {
        Ok(bytes) => {
            let index: Value = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{}: {e:#}", index_path.display()))?;
            index["manifests"].as_array().cloned().unwrap_or_default()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => bail!("cannot read {}: {e}", index_path.display()),
    };
    let mut entry = manifest.to_json();
    if let Some(name) = name {
        // As containerd writes them (`ctr images export`): the fully qualified name, which
        // `ctr images import`, Kubernetes' CRI and podman name the image by, and the OCI
        // spec's bare tag, which skopeo's `oci:DIR:TAG` and umoci find it by.
        let (repo, tag) = crate::image::reference::normalized_name_tag(name)?;
        let full = format!("{repo}:{tag}");
        manifests.retain(|m| crate::image::read::EntryName::of(m).full.as_deref() != Some(full.as_str()));
        entry["annotations"] = json!({"io.containerd.image.name": full, "org.opencontainers.image.ref.name": tag});
    }
    manifests.push(entry);
    let index = json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests});
    files::write_file_atomically(&index_path, &serde_json::to_vec(&index)?)
}

impl WrittenImage {
    /// Its entry in an oci-archive's Docker `manifest.json`: the config and the layers (as
    /// compressed as the layout holds them) by their blob members, as Docker 25+'s `docker save`
    /// writes it.
    pub fn docker_manifest_entry(&self, repo_tag: &str) -> Value {
        let member = |d: &Descriptor| format!("blobs/sha256/{}", &d.digest["sha256:".len()..]);
        crate::image::docker_manifest_entry(&member(&self.config), json!([repo_tag]), self.layers.iter().map(member).collect())
    }
}

/// What a member of an oci-archive holds.
enum Holds {
    Dir,
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// Writes the layout directory `dir` as a tar (an `oci-archive`) to `out`: fixed member order,
/// owner and mtime, so the same layout gives the same bytes. Beside the layout it holds a Docker
/// `manifest.json` listing `images` (each with its tag), as `docker save` has since Docker 25:
/// Docker's classic image store reads only that.
pub fn tar_layout<W: Write>(dir: &Path, images: &[(&WrittenImage, &str)], out: &mut W, mtime: i64) -> Result<()> {
    let manifest = crate::image::docker_manifest_json(images.iter().map(|(image, tag)| image.docker_manifest_entry(tag)).collect());
    let mut members: Vec<(String, Holds)> = vec![
        ("oci-layout".into(), Holds::File(dir.join("oci-layout"))),
        ("index.json".into(), Holds::File(dir.join("index.json"))),
        ("manifest.json".into(), Holds::Bytes(manifest.into_bytes())),
        ("blobs/".into(), Holds::Dir),
        ("blobs/sha256/".into(), Holds::Dir),
    ];
    let mut blobs: Vec<String> = fs::read_dir(dir.join("blobs/sha256"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    blobs.retain(|b| !b.starts_with('.'));
    blobs.sort();
    members.extend(blobs.into_iter().map(|b| (format!("blobs/sha256/{b}"), Holds::File(dir.join("blobs/sha256").join(b)))));
    let mut tar = crate::tar::write::Writer::new(out);
    for (name, holds) in members {
        let size = match &holds {
            Holds::Dir => 0,
            Holds::File(path) => fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.len(),
            Holds::Bytes(data) => data.len() as u64,
        };
        let mut h = Header::plain_file(name.as_bytes(), size, mtime);
        match holds {
            Holds::Dir => {
                h.kind = crate::tar::DIRTYPE;
                h.mode = 0o755;
                tar.member(&h, None)?;
            }
            Holds::File(path) => {
                let mut f = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                tar.member(&h, Some((&mut f, &|| path.display().to_string())))?;
            }
            Holds::Bytes(data) => tar.bytes(&h, &data)?,
        }
    }
    tar.finish()?;
    Ok(())
}

/// Writes the image as an oci-archive to `out`: an OCI layout staged in a temporary directory
/// under `scratch`, then [`tar_layout`] of it.
pub fn write_archive<W: Write>(spec: &ImageSpec, scratch: &Path, compressor: Compressor, repo_tag: &str, out: &mut W, mtime: i64, progress: &Progress) -> Result<WrittenImage> {
    let staged = crate::util::files::TempDir::new_in(scratch)?;
    let written = write_layout(spec, &staged.0, compressor, repo_tag, progress)?;
    tar_layout(&staged.0, &[(&written, repo_tag)], out, mtime)?;
    Ok(written)
}
