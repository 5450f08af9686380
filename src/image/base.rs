//! Base images (`fromImage`): Docker archives (plain or compressed whole, their layer members
//! plain or compressed, as Docker 25+'s `docker save` writes them with the containerd store),
//! OCI archives and OCI layout directories, indexed once ([`crate::image::read`]). Their layers
//! are copied in the order they are stored, each checked against its diff_id as it is copied.
//! Outer member order does not matter to loaders: they follow `manifest.json`.
//!
//! A compressed layer's uncompressed size is only known once it is decompressed, and a Docker
//! archive member's size comes before its bytes: such a layer is decompressed into a scratch
//! file first (one at a time, so the disk holds at most one layer's worth).

use crate::image::read::{blob_name, check_sha256_digest, oci_manifest, select_manifest_entry, ArchiveIndex, ArchivePick, OciStore, Selector};
use crate::util::files::TempDir;
use crate::util::hex;
use crate::util::io::{copy_reading, HashingWriter};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BaseLayer {
    /// The layer's path as the base manifest names it (used in history comments).
    pub manifest_path: String,
    /// The member (or, in a layout directory, the file under it) that holds its bytes, after
    /// following links.
    pub member: String,
    /// `sha256:<hex>` from the base config's `rootfs.diff_ids`.
    pub diff_id: String,
    /// The member's size as stored (compressed, if it is).
    pub size: u64,
}

/// Where the layers and config are: an archive's members or a layout directory's files.
enum Store {
    Archive(ArchiveIndex),
    Dir(PathBuf),
}

pub struct BaseImage {
    pub path: PathBuf,
    /// The base image's config JSON (`config`, `rootfs`, `history`, ...).
    pub image_json: Value,
    pub layers: Vec<BaseLayer>,
    config_name: String,
    store: Store,
    /// What messages call it: `base image`, or `source` when it is pushed.
    role: &'static str,
}

impl std::fmt::Debug for BaseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("BaseImage").field("path", &self.path).field("layers", &self.layers).finish()
    }
}

/// An archive as messages name it: `base image PATH`, or `source PATH` when it is pushed.
#[derive(Clone, Copy)]
struct Who<'a>(&'static str, &'a Path);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1.display())
    }
}

fn broken(who: Who, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{who}: {what}")
}

/// Layer media types whose blobs are a tar (plain, gzip or zstd, told by their bytes).
fn is_layer_type(t: &str) -> bool {
    let t = [".gzip", ".zstd", "+gzip", "+zstd"].iter().find_map(|s| t.strip_suffix(s)).unwrap_or(t);
    [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ]
    .contains(&t)
}

const CONFIG_TYPES: [&str; 2] = ["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// Hashes what passes through, so a base layer is checked against its diff_id as it is copied.
struct Verify<'a> {
    inner: Box<dyn Read + 'a>,
    hasher: Sha256,
    read: u64,
}

impl Read for Verify<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

enum State<'a> {
    Unread,
    /// Read as it comes and hashed, checked once the caller is done; `plain` when stored
    /// uncompressed (then its size is the member's too).
    Hashed { v: Verify<'a>, plain: bool },
    /// Decompressed into a scratch file, and checked there already.
    Spooled(BufReader<File>),
}

/// One base layer's bytes as [`BaseImage::copy_layers`] hands them over: uncompressed, by
/// [`Self::sized`] or [`Self::stream`]. A layer neither is called for is not read.
pub struct LayerBytes<'a> {
    layer: &'a BaseLayer,
    who: Who<'a>,
    raw: Option<Box<dyn Read + 'a>>,
    scratch: &'a mut Option<TempDir>,
    state: State<'a>,
}

impl<'a> LayerBytes<'a> {
    /// The uncompressed tar with its size, for a sink that needs the size first: read in place
    /// when stored plain; a compressed one is decompressed into a scratch file (under the
    /// settings' temporary directory) and checked against its diff_id before it is returned.
    pub fn sized(&mut self) -> Result<(u64, &mut dyn Read)> {
        self.open(true)?;
        Ok(match &mut self.state {
            State::Hashed { v, .. } => (self.layer.size, v as &mut dyn Read),
            State::Spooled(f) => {
                let len = f.get_ref().metadata().with_context(|| format!("{}: cannot stat the decompressed {}", self.who.1.display(), self.layer.member))?.len();
                (len, f as &mut dyn Read)
            }
            State::Unread => unreachable!("opened above"),
        })
    }

    /// The uncompressed tar, decompressed as it is read (checked once the caller is done).
    pub fn stream(&mut self) -> Result<&mut dyn Read> {
        self.open(false)?;
        Ok(match &mut self.state {
            State::Hashed { v, .. } => v,
            State::Spooled(f) => f,
            State::Unread => unreachable!("opened above"),
        })
    }

    fn open(&mut self, spool: bool) -> Result<()> {
        let what = || format!("{}: member {}", self.who.1.display(), self.layer.member);
        let raw = self.raw.take().ok_or_else(|| anyhow!("internal error: {} opened twice", what()))?;
        let (kind, inner) = crate::compress::decoder(raw).map_err(|e| anyhow!("cannot read {}: {e}", what()))?;
        let plain = kind == crate::compress::Compression::None;
        let mut v = Verify { inner, hasher: Sha256::new(), read: 0 };
        if plain || !spool {
            self.state = State::Hashed { v, plain };
            return Ok(());
        }
        let dir = match self.scratch {
            Some(d) => d,
            None => self.scratch.insert(TempDir::new_in(&crate::util::settings::get().temp_dir)?),
        };
        let dest = dir.0.join("layer.tar");
        let file = File::create(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let mut buf = vec![0u8; 1 << 20];
        copy_reading(&mut v, &mut w, &mut buf, || format!("{} (decompressing it)", what())).map_err(|e| match e.downcast_ref::<crate::util::io::OutputError>() {
            Some(o) => anyhow!("cannot write {}: {}", dest.display(), o.0),
            None => e,
        })?;
        let (bw, _, _) = w.finish();
        bw.into_inner().map_err(|e| anyhow!("cannot write {}: {}", dest.display(), e.error()))?;
        self.check(v)?;
        let f = File::open(&dest).with_context(|| format!("cannot open {}", dest.display()))?;
        self.state = State::Spooled(BufReader::with_capacity(1 << 20, f));
        Ok(())
    }

    fn check(&self, v: Verify) -> Result<()> {
        check(self.layer, self.who, v)
    }

    /// After the caller: what it left unread of a layer it read still counts.
    fn finish(self) -> Result<()> {
        let LayerBytes { layer, who, state, .. } = self;
        let State::Hashed { mut v, plain } = state else { return Ok(()) };
        io::copy(&mut v, &mut io::sink()).map_err(|e| anyhow!("cannot read {}: member {}: {e}", who.1.display(), layer.member))?;
        if plain && v.read != layer.size {
            bail!(broken(who, format!("layer {} is truncated", layer.member)));
        }
        check(layer, who, v)
    }
}

/// A layer whose bytes are not what the config's diff_id says, told apart from trouble reading
/// it (`stevedore verify` reports it as a difference).
#[derive(Debug)]
pub struct LayerMismatch(pub String);

impl std::fmt::Display for LayerMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayerMismatch {}

fn check(layer: &BaseLayer, who: Who, v: Verify) -> Result<()> {
    let got = format!("sha256:{}", hex(&v.hasher.finalize()));
    if got != layer.diff_id {
        return Err(LayerMismatch(format!("{who}: layer {} is {got}, but the config's diff_id says {}", layer.member, layer.diff_id)).into());
    }
    Ok(())
}

/// The `sha256:` diff_ids of an image config.
fn diff_ids(who: Who, config_name: &str, image_json: &Value) -> Result<Vec<String>> {
    image_json
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| broken(who, format!("{config_name} has no rootfs.diff_ids")))?
        .iter()
        .map(|d| {
            d.as_str()
                .and_then(|d| check_sha256_digest(d).ok().map(|_| d.to_owned()))
                .ok_or_else(|| broken(who, format!("{config_name}: bad diff_id {d} (not sha256: and 64 lowercase hex digits)")))
        })
        .collect()
}

impl BaseImage {
    /// The only (or, in a Docker archive, the first) image at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_selected(path, &Selector::default())
    }

    /// The image `sel` picks at `path` (by the rules of [`select_manifest_entry`] in a Docker
    /// archive, of [`crate::image::read::select_index_entry`] in an OCI one).
    pub fn load_selected(path: &Path, sel: &Selector) -> Result<Self> {
        // Without a name, a Docker archive's first image, as nixpkgs takes a base image's.
        Self::load_with(path, sel, Some(ArchivePick::named_or_first(sel.wanted().as_deref())), "base image")
    }

    /// The image `pick` names (none: the only one) of a Docker archive, or the only image of
    /// an OCI one, as `push docker-archive:FILE[:NAME:TAG|:@N]` asks for it.
    pub fn load_picked(path: &Path, pick: Option<&ArchivePick>) -> Result<Self> {
        Self::load_with(path, &Selector::default(), pick.cloned(), "source")
    }

    fn load_with(path: &Path, sel: &Selector, pick: Option<ArchivePick>, role: &'static str) -> Result<Self> {
        let who = Who(role, path);
        let store = if path.is_dir() {
            Store::Dir(path.to_owned())
        } else {
            Store::Archive(ArchiveIndex::load(path).map_err(|e| anyhow!("{role} {e:#}"))?)
        };
        // (config member, its JSON, layers by member path, given sizes where the manifest has them)
        let (config_name, image_json, layer_paths, sizes) = match &store {
            Store::Archive(index) if index.contains("manifest.json") => {
                let manifest = index.json("manifest.json").map_err(|e| anyhow!("{role} {e:#}"))?;
                let first = select_manifest_entry(&manifest, pick.as_ref(), path).map_err(|e| anyhow!("{role} {e}"))?;
                let config_name = first.get("Config").and_then(Value::as_str).ok_or_else(|| broken(who, "manifest.json has no \"Config\""))?.to_owned();
                let image_json = index.json(&config_name).map_err(|e| anyhow!("{role} {e:#}"))?;
                let layer_paths: Vec<String> = first
                    .get("Layers")
                    .and_then(Value::as_array)
                    .ok_or_else(|| broken(who, "manifest.json has no \"Layers\""))?
                    .iter()
                    .map(|l| l.as_str().map(str::to_owned).ok_or_else(|| broken(who, "a layer path in manifest.json is not a string")))
                    .collect::<Result<_>>()?;
                let n = layer_paths.len();
                (config_name, image_json, layer_paths, vec![None; n])
            }
            Store::Archive(index) if !index.contains("index.json") => {
                bail!(broken(who, "neither a Docker archive (no manifest.json) nor an OCI archive (no index.json)"))
            }
            Store::Archive(_) | Store::Dir(_) => {
                let oci = match &store {
                    Store::Archive(index) => OciStore::Archive(index),
                    Store::Dir(dir) => OciStore::Dir(dir),
                };
                let (manifest, digest) = oci_manifest(&oci, sel, path).map_err(|e| anyhow!("{role} {e:#}"))?;
                let config = manifest.get("config").ok_or_else(|| broken(who, format!("manifest {digest} has no config")))?;
                if let Some(t) = config.get("mediaType").and_then(Value::as_str).filter(|t| !CONFIG_TYPES.contains(t)) {
                    bail!(broken(who, format!("manifest {digest}: config media type {t} is not a container image's")));
                }
                let config_digest = config.get("digest").and_then(Value::as_str).ok_or_else(|| broken(who, format!("manifest {digest}: the config has no digest")))?;
                let config_name = blob_name(config_digest).map_err(|e| broken(who, format!("manifest {digest}: config: {e}")))?;
                let bytes = oci.bytes(&config_name).map_err(|e| anyhow!("{role} {e:#}"))?;
                if crate::util::sha256_digest(&bytes) != config_digest {
                    bail!(broken(who, format!("{config_name} does not match its digest")));
                }
                let image_json = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| broken(who, format!("{config_name}: {e:#}")))?;
                let mut layer_paths = Vec::new();
                let mut sizes = Vec::new();
                for l in manifest.get("layers").and_then(Value::as_array).ok_or_else(|| broken(who, format!("manifest {digest} has no layers")))? {
                    if let Some(t) = l.get("mediaType").and_then(Value::as_str).filter(|t| !is_layer_type(t)) {
                        bail!(broken(who, format!("manifest {digest}: layer media type {t} is not a tar, gzip or zstd layer")));
                    }
                    let d = l.get("digest").and_then(Value::as_str).ok_or_else(|| broken(who, format!("manifest {digest}: a layer has no digest")))?;
                    layer_paths.push(blob_name(d).map_err(|e| broken(who, format!("manifest {digest}: layer: {e}")))?);
                    sizes.push(l.get("size").and_then(Value::as_u64));
                }
                (config_name, image_json, layer_paths, sizes)
            }
        };
        let diff_ids = diff_ids(who, &config_name, &image_json)?;
        if diff_ids.len() != layer_paths.len() {
            bail!(broken(
                who,
                format!("the manifest lists {} layers but the config has {} diff_ids", layer_paths.len(), diff_ids.len())
            ));
        }
        if !image_json.get("config").is_none_or(|c| c.is_object() || c.is_null()) {
            bail!(broken(who, format!("{config_name}: \"config\" is not an object")));
        }
        let mut layers: Vec<BaseLayer> = Vec::new();
        for ((manifest_path, diff_id), given) in layer_paths.into_iter().zip(diff_ids).zip(sizes) {
            let (member, size) = match &store {
                Store::Archive(index) => {
                    let m = index.resolve(&manifest_path).map_err(|e| anyhow!("{role} {e:#}"))?;
                    (m.name, m.size)
                }
                Store::Dir(dir) => {
                    let meta = crate::util::limits::check_regular(&dir.join(&manifest_path)).map_err(|e| anyhow!("{role} {e:#}"))?;
                    (manifest_path.clone(), meta.len())
                }
            };
            if given.is_some_and(|g| g != size) {
                bail!(broken(who, format!("layer {member} is {size} bytes, but the manifest says {}", given.unwrap_or_default())));
            }
            // One member serving two layers must be one layer (it has one digest).
            if let Some(other) = layers.iter().find(|l| l.member == member && l.diff_id != diff_id) {
                bail!(broken(who, format!("layer member {member} is given two diff_ids, {} and {diff_id}", other.diff_id)));
            }
            layers.push(BaseLayer { manifest_path, member, diff_id, size });
        }
        Ok(BaseImage { path: path.to_owned(), image_json, layers, config_name, store, role })
    }

    /// The base image's `Env`, if any.
    pub fn env(&self) -> Vec<String> {
        self.image_json
            .pointer("/config/Env")
            .and_then(Value::as_array)
            .map(|env| env.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// The raw bytes of the image's config (the image ID is their digest).
    pub fn config_bytes(&self) -> Result<Vec<u8>> {
        match &self.store {
            Store::Archive(index) => index.bytes(&self.config_name),
            Store::Dir(dir) => crate::util::limits::read_limited(&dir.join(&self.config_name), crate::image::read::JSON_LIMIT),
        }
    }

    /// Calls `f` once for each distinct layer member, in the order they are stored, with its
    /// bytes. A layer `f` reads is checked against its diff_id: what `f` leaves unread is read
    /// too, and a layer whose bytes do not match is an error by the time `f` returns (so a
    /// caller writing an archive fails before its manifest is written).
    pub fn copy_layers(&self, mut f: impl FnMut(&BaseLayer, &mut LayerBytes) -> Result<()>) -> Result<()> {
        let mut by_member: HashMap<&str, &BaseLayer> = HashMap::new();
        for l in &self.layers {
            by_member.entry(l.member.as_str()).or_insert(l);
        }
        let mut scratch: Option<TempDir> = None;
        let mut one = |layer: &BaseLayer, raw: Box<dyn Read + '_>, scratch: &mut Option<TempDir>| -> Result<()> {
            let mut bytes = LayerBytes { layer, who: Who(self.role, &self.path), raw: Some(raw), scratch, state: State::Unread };
            f(layer, &mut bytes)?;
            bytes.finish()
        };
        match &self.store {
            Store::Archive(index) => {
                let wanted: Vec<String> = by_member.keys().map(|k| k.to_string()).collect();
                index.for_each_wanted(&wanted, |name, r| one(by_member[name], Box::new(r), &mut scratch).map(|()| true))
            }
            Store::Dir(dir) => {
                let mut seen = std::collections::HashSet::new();
                self.layers.iter().filter(|l| seen.insert(l.member.as_str())).try_for_each(|layer| {
                    let file = dir.join(&layer.member);
                    let r = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
                    one(layer, Box::new(BufReader::with_capacity(1 << 16, r).take(layer.size)), &mut scratch)
                })
            }
        }
        .context("reading the base image's layers")
    }
}

/// Merges the base image's `Env` under ours as nixpkgs does: variables keep the position of
/// their first appearance and take the value of their last.
pub fn merge_env(base: &[String], ours: &[String]) -> Vec<String> {
    let mut order: Vec<&str> = Vec::new();
    let mut values: HashMap<&str, &String> = HashMap::new();
    for entry in base.iter().chain(ours) {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        if values.insert(key, entry).is_none() {
            order.push(key);
        }
    }
    order.into_iter().map(|k| values[k].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_keeps_first_position_last_value() {
        let base = vec!["PATH=/a".to_string(), "X=1".into(), "FLAG".into()];
        let ours = vec!["PATH=/b".to_string(), "Y=2".into()];
        assert_eq!(merge_env(&base, &ours), vec!["PATH=/b", "X=1", "FLAG", "Y=2"]);
    }
}
