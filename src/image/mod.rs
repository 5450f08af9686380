//! Images: what they hold and how they are written and read. Here, the image spec built from a
//! stream conf ([`ImageSpec`], the config nixpkgs writes), the layer sinks, and the Docker
//! archive writer; beside it the conf (`conf`), store-path layers (`layer`), the OCI writer
//! (`oci`), the one image reader (`read`), base images (`base`), merged archives (`merge`),
//! flattened filesystems (`flatten`) and image references (`reference`).
//!
//! The Docker image archive (`docker save` format, Image Spec v1.2) is streamed in one pass.
//! Each layer's size is known from its plan before its bytes are produced, so a layer is
//! written straight into the outer archive while it is hashed. Our own layers are named by their position
//! (`N/layer.tar`), base layers by their diff_id; `manifest.json`, written last, ties names to
//! the image. The image config is the one nixpkgs writes, byte for byte.

pub mod read;
pub mod base;
pub mod conf;
pub mod digests;
pub mod flatten;
pub mod layer;
pub mod merge;
pub mod oci;
pub mod reference;

use crate::util::io::copy_reading;
use crate::util::progress::Progress;
use crate::util::hex;
use crate::image::base::{merge_env, BaseImage};
use crate::image::conf::StreamConf;
use crate::image::layer::{check_store_path, plan_layer, Owner};
use crate::util::io::HashingWriter;
use crate::pycompat::json::{dumps_indent4, list_repr};
use crate::tar::{self, Header};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What an image is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Docker archive (`docker save` format), compressed whole if at all, as nixpkgs writes it.
    DockerArchive,
    /// An OCI image layout directory, layers compressed one by one.
    Oci,
    /// An OCI image layout as a tar.
    OciArchive,
}

impl crate::util::shared::Choice for Format {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[
        ("docker-archive", Format::DockerArchive, ""),
        ("oci", Format::Oci, ""),
        ("oci-archive", Format::OciArchive, ""),
    ];
}

/// One layer of the finished image.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// Member name in the outer archive.
    pub path: String,
    /// Hex sha256 of the uncompressed layer tar.
    pub diff_id: String,
    pub size: u64,
    /// What the history comment lists.
    pub paths: Vec<String>,
}

/// The outer archive of a Docker archive: plain-file members, all with one mtime.
pub(crate) struct Outer<W: Write> {
    pub(crate) tar: tar::write::Writer<W>,
    mtime: i64,
    /// The layer members written so far (as a [`LayerSink`]): a layer named again (one equal
    /// to a base layer, whose member is named by its diff_id) is read but not written twice.
    layers: HashSet<String>,
    /// Whether the current layer is one already written; its bytes go to `discard`.
    again: bool,
    discard: io::Sink,
}

impl<W: Write> Outer<W> {
    /// An archive whose members all carry `mtime`.
    pub(crate) fn new(w: W, mtime: i64) -> Self {
        Outer { tar: tar::write::Writer::new(w), mtime, layers: HashSet::new(), again: false, discard: io::sink() }
    }

    /// A member of `size` bytes, which the caller writes to `self.tar.get_mut()`.
    pub(crate) fn begin_member(&mut self, name: &str, size: u64) -> Result<()> {
        self.tar.header(&Header::plain_file(name.as_bytes(), size, self.mtime))
    }

    pub(crate) fn end_member(&mut self, size: u64) -> Result<()> {
        self.tar.end_data(size)
    }

    pub(crate) fn add_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.tar.bytes(&Header::plain_file(name.as_bytes(), data.len() as u64, self.mtime), data)
    }

    pub(crate) fn finish(self) -> Result<W> {
        self.tar.finish()
    }
}

/// Reads a customisation layer directory (`layer.tar` + `checksum`).
fn customisation_checksum(dir: &Path) -> Result<(PathBuf, String, u64)> {
    let checksum_path = dir.join("checksum");
    let text = fs::read_to_string(&checksum_path).with_context(|| format!("cannot read {}", checksum_path.display()))?;
    let checksum = text.trim().to_string();
    if checksum.len() != 64 || !checksum.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("{}: not a sha256 hex digest: {:?}", checksum_path.display(), checksum);
    }
    let layer_path = dir.join("layer.tar");
    let size = fs::metadata(&layer_path).with_context(|| format!("cannot stat {}", layer_path.display()))?.len();
    Ok((layer_path, checksum.to_ascii_lowercase(), size))
}

/// Receives an image's layers, one after another, as uncompressed tar bytes.
pub trait LayerSink {
    /// Whether the layer at `index` (in image order) is wanted at all; a sink that answers no
    /// gets no calls for it and the layer is not produced (pushes skip blobs a registry has).
    fn wants(&mut self, _index: usize) -> bool {
        true
    }
    /// A layer of `size` bytes begins; `name` is its member name in a Docker archive.
    fn begin(&mut self, name: &str, size: u64) -> Result<()>;
    /// Where the layer's bytes go.
    fn out(&mut self) -> &mut dyn Write;
    /// The layer is complete; its uncompressed sha256 is `diff_id` (hex).
    fn end(&mut self, size: u64, diff_id: &str) -> Result<()>;
}

struct Custom {
    dir: PathBuf,
    tar: PathBuf,
    checksum: String,
    size: u64,
}

/// An image ready to be written: the conf with every input checked, so that bad input gives
/// an error before the first byte goes out rather than a truncated archive.
pub struct ImageSpec<'c> {
    pub conf: &'c StreamConf,
    owner: Owner,
    /// The store layers as the conf gives them (or as planned from its closure graph).
    given: Vec<Vec<String>>,
    store_layers: Vec<Vec<PathBuf>>,
    custom: Option<Custom>,
    pub base: Option<BaseImage>,
}

impl<'c> ImageSpec<'c> {
    pub fn new(conf: &'c StreamConf) -> Result<Self> {
        let owner = Owner {
            uid: conf.uid,
            gid: conf.gid,
            uname: conf.uname.clone(),
            gname: conf.gname.clone(),
            mtime: conf.mtime,
        };
        let sel = crate::image::read::Selector { name: conf.from_image_name.clone(), tag: conf.from_image_tag.clone() };
        let base = conf.from_image.as_deref().map(|p| BaseImage::load_selected(p, &sel)).transpose()?;
        let given = match &conf.layering {
            None => conf.store_layers.clone(),
            Some(layering) => {
                let graph = layering.load_graph()?;
                let mut options = layering.options.clone();
                options.base_layers = base.as_ref().map_or(0, |b| b.layers.len());
                crate::layering::plan_layers(&graph, &options).context("planning layers from 'closure_graph'")?
            }
        };
        let store_layers = given
            .iter()
            .enumerate()
            .map(|(i, paths)| {
                paths
                    .iter()
                    .map(|p| {
                        let path = check_store_path(p, &conf.store_dir).map_err(|e| anyhow!("layer {}: {e}", i + 1))?;
                        fs::symlink_metadata(&path).map_err(|e| match e.kind() {
                            io::ErrorKind::NotFound => anyhow!("store path {p} does not exist"),
                            _ => anyhow!("cannot stat store path {p}: {e}"),
                        })?;
                        Ok(path)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let custom = conf
            .customisation_layer
            .as_deref()
            .map(|dir| {
                customisation_checksum(dir).map(|(tar, checksum, size)| Custom { dir: dir.to_owned(), tar, checksum, size })
            })
            .transpose()?;
        Ok(ImageSpec { conf, owner, given, store_layers, custom, base })
    }

    /// The store layers' paths, bottom first, as checked against the store directory.
    pub fn store_layers(&self) -> &[Vec<PathBuf>] {
        &self.store_layers
    }

    /// How many layers the image has.
    pub fn layer_count(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.layers.len()) + self.store_layers.len() + usize::from(self.custom.is_some())
    }

    /// Writes every layer into `sink`: the base image's (in the order they sit in its archive),
    /// then the store layers, then the customisation layer. Returns them in image order; a
    /// store layer the sink did not want has an empty `diff_id` (it was never produced).
    pub fn emit_layers(&self, sink: &mut dyn LayerSink, progress: &Progress) -> Result<Vec<LayerInfo>> {
        let mut layers: Vec<LayerInfo> = Vec::new();
        match &self.base {
            None => progress.say("No 'fromImage' provided"),
            Some(base) => {
                let mut num = 0;
                let mut buf = vec![0u8; 1 << 20];
                // Uncompressed sizes, known once a layer is read (a stored size otherwise).
                let mut sizes: HashMap<String, u64> = HashMap::new();
                base.copy_layers(|layer, bytes| {
                    num += 1;
                    let index = base.layers.iter().position(|l| l.member == layer.member).unwrap_or(0);
                    if !sink.wants(index) {
                        return Ok(());
                    }
                    progress.say(format!("Adding base layer {num} from {}", layer.manifest_path));
                    let (size, reader) = bytes.sized()?;
                    sink.begin(&base_layer_name(&layer.diff_id), size)?;
                    let what = || format!("base image {}: member {}", base.path.display(), layer.member);
                    let copied = copy_reading(&mut reader.take(size), sink.out(), &mut buf, what)?;
                    if copied != size {
                        bail!("{} is truncated", what());
                    }
                    sizes.insert(layer.member.clone(), size);
                    sink.end(size, &layer.diff_id["sha256:".len()..])
                })?;
                for layer in &base.layers {
                    layers.push(LayerInfo {
                        path: base_layer_name(&layer.diff_id),
                        diff_id: layer.diff_id["sha256:".len()..].to_string(),
                        size: sizes.get(layer.member.as_str()).copied().unwrap_or(layer.size),
                        paths: vec![layer.manifest_path.clone()],
                    });
                }
            }
        }

        // The store layers: planned and read on another thread, which runs ahead across
        // layer boundaries (see layer::write_layers).
        let first = layers.len();
        let wanted: Vec<usize> = (0..self.store_layers.len()).filter(|&i| sink.wants(first + i)).collect();
        struct Out<'s, 'p> {
            sink: &'s mut dyn LayerSink,
            progress: &'p Progress,
            spec: &'p ImageSpec<'p>,
            wanted: &'p [usize],
            first: usize,
            infos: Vec<Option<(String, u64)>>,
            started: Instant,
            files: u64,
        }
        impl layer::LayerOut for Out<'_, '_> {
            fn begin(&mut self, i: usize, size: u64, files: u64) -> Result<()> {
                let store_index = self.wanted[i];
                let num = self.first + store_index + 1;
                self.progress.say(format!("Creating layer {num} from paths: {}", list_repr(&self.spec.given[store_index])));
                self.started = Instant::now();
                self.files = files;
                // The sink learns which layer comes next from `wants`.
                self.sink.wants(num - 1);
                self.sink.begin(&format!("{num}/layer.tar"), size)
            }
            fn out(&mut self) -> &mut dyn Write {
                self.sink.out()
            }
            fn end(&mut self, i: usize, size: u64, digest: [u8; 32]) -> Result<()> {
                let store_index = self.wanted[i];
                let num = self.first + store_index + 1;
                let diff_id = hex(&digest);
                self.sink.end(size, &diff_id)?;
                self.progress.done(&format!("layer {num}, {} files", self.files), size, self.started);
                self.infos[store_index] = Some((diff_id, size));
                Ok(())
            }
        }
        let mut out = Out { sink, progress, spec: self, wanted: &wanted, first, infos: vec![None; self.store_layers.len()], started: Instant::now(), files: 0 };
        let owner = &self.owner;
        let plan = |i: usize| plan_layer(&self.store_layers[wanted[i]], owner);
        let label = |i: usize| format!("layer {}", first + wanted[i] + 1);
        layer::write_layers(wanted.len(), &plan, &label, owner, &mut out)?;
        let infos = out.infos;
        for (store_index, given) in self.given.iter().enumerate() {
            let num = layers.len() + 1;
            let (diff_id, size) = infos[store_index].clone().unwrap_or_default();
            layers.push(LayerInfo { path: format!("{num}/layer.tar"), diff_id, size, paths: given.clone() });
        }

        if let Some(c) = &self.custom {
            let name = format!("{}/layer.tar", c.checksum);
            if sink.wants(layers.len()) {
                progress.say(format!("Creating layer {} with customisation...", layers.len() + 1));
                sink.begin(&name, c.size)?;
                let mut file = File::open(&c.tar).with_context(|| format!("cannot open {}", c.tar.display()))?;
                let mut hw = HashingWriter::new(sink.out());
                let mut buf = vec![0u8; 1 << 20];
                let copied = copy_reading(&mut file, &mut hw, &mut buf, || c.tar.display().to_string())?;
                let (_, digest, _) = hw.finish();
                if copied != c.size {
                    bail!("{} changed size while it was being read", c.tar.display());
                }
                if hex(&digest) != c.checksum {
                    bail!("{}: checksum file says {} but layer.tar hashes to {}", c.dir.display(), c.checksum, hex(&digest));
                }
                sink.end(c.size, &c.checksum)?;
            }
            layers.push(LayerInfo {
                path: name,
                diff_id: c.checksum.clone(),
                size: c.size,
                paths: vec![self.conf.customisation_layer_source.clone().unwrap_or_else(|| c.dir.to_string_lossy().into_owned())],
            });
        }
        Ok(layers)
    }

    /// The digest-cache keys of the base and store layers, in image order (None: a path that
    /// cannot be examined); the customisation layer has none.
    fn layer_keys(&self) -> Vec<Option<String>> {
        let mut keys: Vec<Option<String>> = Vec::new();
        if let Some(base) = &self.base {
            keys.extend(base.layers.iter().map(|l| digests::base_layer_key(&base.path, &l.member)));
        }
        keys.extend(self.store_layers.iter().map(|paths| digests::layer_key(paths, &self.owner)));
        keys
    }

    /// Remembers in `cache` the diff_ids and sizes of `layers` (as emit_layers returned them,
    /// every layer produced), so `describe_layers` need not read them again.
    pub fn remember_layers(&self, cache: &mut digests::DigestCache, layers: &[LayerInfo]) {
        for (key, layer) in self.layer_keys().iter().zip(layers) {
            if let (Some(key), false) = (key, layer.diff_id.is_empty()) {
                cache.put(key, &format!("sha256:{}", layer.diff_id), layer.size);
            }
        }
    }

    /// The image's layers with their diff_ids and uncompressed sizes, reading and hashing only
    /// the layers `cache` does not know (and remembering those). The customisation layer's
    /// diff_id is its checksum file's.
    pub fn describe_layers(&self, cache: &mut digests::DigestCache, progress: &Progress) -> Result<Vec<LayerInfo>> {
        let keys = self.layer_keys();
        let known: Vec<Option<(String, u64)>> = keys.iter().map(|k| k.as_deref().and_then(|k| cache.get(k))).collect();
        /// Hashes (emit_layers does) what the cache lacks, and nothing else.
        struct Unknown<'k>(&'k [Option<(String, u64)>], io::Sink);
        impl LayerSink for Unknown<'_> {
            fn wants(&mut self, index: usize) -> bool {
                matches!(self.0.get(index), Some(None))
            }
            fn begin(&mut self, _: &str, _: u64) -> Result<()> {
                Ok(())
            }
            fn out(&mut self) -> &mut dyn Write {
                &mut self.1
            }
            fn end(&mut self, _: u64, _: &str) -> Result<()> {
                Ok(())
            }
        }
        let mut layers = self.emit_layers(&mut Unknown(&known, io::sink()), progress)?;
        let nbase = self.base.as_ref().map_or(0, |b| b.layers.len());
        for (i, layer) in layers.iter_mut().enumerate().take(keys.len()) {
            // A repeated base member was read once, under its first index.
            let first = match &self.base {
                Some(base) if i < nbase => base.layers.iter().position(|l| l.member == base.layers[i].member).unwrap_or(i),
                _ => i,
            };
            if let Some((diff_id, size)) = &known[first] {
                layer.diff_id = diff_id.trim_start_matches("sha256:").to_string();
                layer.size = *size;
            }
        }
        self.remember_layers(cache, &layers);
        Ok(layers)
    }

    /// The image config JSON, as nixpkgs writes it.
    pub fn config_json(&self, layers: &[LayerInfo]) -> String {
        image_config(self.conf, self.base.as_ref(), layers)
    }
}

fn base_layer_name(diff_id: &str) -> String {
    format!("{}/layer.tar", &diff_id["sha256:".len()..])
}

impl<W: Write> LayerSink for Outer<W> {
    fn begin(&mut self, name: &str, size: u64) -> Result<()> {
        self.again = !self.layers.insert(name.to_string());
        if self.again {
            return Ok(());
        }
        self.begin_member(name, size)
    }
    fn out(&mut self) -> &mut dyn Write {
        if self.again {
            return &mut self.discard;
        }
        self.tar.get_mut()
    }
    fn end(&mut self, size: u64, _diff_id: &str) -> Result<()> {
        if std::mem::take(&mut self.again) {
            return Ok(());
        }
        self.end_member(size)
    }
}

/// Streams the whole image to `out` as a Docker archive.
pub fn stream<W: Write>(conf: &StreamConf, repo_tag: Option<&str>, out: W, progress: &Progress) -> Result<W> {
    let started = Instant::now();
    let spec = ImageSpec::new(conf)?;
    let mut outer = Outer::new(out, conf.mtime);
    let layers = spec.emit_layers(&mut outer, progress)?;
    // What this stream hashed, a later push, load or serve need not hash again.
    spec.remember_layers(&mut digests::DigestCache::open(), &layers);
    progress.say("Adding manifests...");
    let config_json = spec.config_json(&layers);
    let config_digest = hex(&Sha256::digest(config_json.as_bytes()));
    let config_name = format!("{config_digest}.json");
    outer.add_bytes(&config_name, config_json.as_bytes())?;
    let entry = docker_manifest_entry(&config_name, json!([repo_tag.unwrap_or(&conf.repo_tag)]), layers.iter().map(|l| l.path.clone()).collect());
    outer.add_bytes("manifest.json", docker_manifest_json(vec![entry]).as_bytes())?;
    let out = outer.finish()?;
    let total: u64 = layers.iter().map(|l| l.size).sum();
    progress.done(&format!("image {config_digest:.12}, {} layers", layers.len()), total, started);
    progress.say("Done.");
    Ok(out)
}

/// One image of a Docker archive's `manifest.json`: its config and layer members, in the key
/// order `docker save` and nixpkgs write (`RepoTags` is a list of `name:tag`, or null).
pub(crate) fn docker_manifest_entry(config: &str, repo_tags: Value, layers: Vec<String>) -> Value {
    json!({"Config": config, "RepoTags": repo_tags, "Layers": layers})
}

/// A Docker archive's `manifest.json` listing `entries`, as nixpkgs writes it (Python's
/// `json.dumps(indent=4)`), so the same images give the same bytes.
pub(crate) fn docker_manifest_json(entries: Vec<Value>) -> String {
    dumps_indent4(&Value::Array(entries))
}

/// The image config JSON as nixpkgs writes it.
pub fn image_config(conf: &StreamConf, base: Option<&BaseImage>, layers: &[LayerInfo]) -> String {
    let mut config = conf.config.clone();
    if config.is_null() && base.is_some_and(|b| !b.env().is_empty()) {
        // A null config still takes the base image's Env (buildImage's jq does so).
        config = json!({});
    }
    if let (Some(base), Value::Object(map)) = (base, &mut config) {
        let ours: Vec<String> = map
            .get("Env")
            .and_then(Value::as_array)
            .map(|e| e.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let merged = merge_env(&base.env(), &ours);
        if !merged.is_empty() {
            map.insert("Env".into(), json!(merged));
        }
    }
    let created = &conf.created.iso;
    let mut image = Map::new();
    image.insert("created".into(), json!(created));
    image.insert("architecture".into(), json!(conf.architecture));
    if let Some(variant) = &conf.variant {
        image.insert("variant".into(), json!(variant));
    }
    image.insert("os".into(), json!(conf.os));
    image.insert("config".into(), config);
    image.insert(
        "rootfs".into(),
        json!({
            "diff_ids": layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect::<Vec<_>>(),
            "type": "layers",
        }),
    );
    image.insert(
        "history".into(),
        Value::Array(
            layers
                .iter()
                .map(|l| json!({"created": created, "comment": format!("store paths: {}", list_repr(&l.paths))}))
                .collect(),
        ),
    );
    dumps_indent4(&Value::Object(image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_are_the_nix_librarys() {
        use crate::util::shared::{names, Choice};
        let ours: Vec<&str> = Format::CHOICES.iter().map(|c| c.0).collect();
        assert_eq!(ours, names("formats"));
    }

    #[test]
    fn a_layer_named_again_is_not_written_again() {
        let mut outer = Outer::new(Vec::new(), 1);
        for data in [&b"first"[..], b"first", b"other"] {
            let name = if data == b"other" { "b/layer.tar" } else { "a/layer.tar" };
            outer.begin(name, data.len() as u64).unwrap();
            outer.out().write_all(data).unwrap();
            outer.end(data.len() as u64, "").unwrap();
        }
        let bytes = outer.finish().unwrap();
        let names: Vec<String> = ::tar::Archive::new(&bytes[..]).entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["a/layer.tar", "b/layer.tar"]);
    }

    #[test]
    fn variant_follows_the_architecture_when_given() {
        let now = crate::image::conf::Timestamp { iso: String::new(), unix: 0 };
        let conf = |extra: serde_json::Value| {
            let mut v = json!({"store_layers": [], "architecture": "arm", "created": "1970-01-01T00:00:01Z",
                "uid": 0, "gid": 0, "uname": "root", "gname": "root", "store_dir": "/nix/store", "repo_tag": "a:b"});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            StreamConf::from_value(v, &now).unwrap()
        };
        let with = image_config(&conf(json!({"variant": "v7"})), None, &[]);
        let keys: Vec<String> = serde_json::from_str::<serde_json::Map<String, Value>>(&with).unwrap().keys().cloned().collect();
        assert_eq!(keys[..3], ["created", "architecture", "variant"]);
        assert!(with.contains("\"variant\": \"v7\""), "{with}");
        // None (or null) writes no field: nixpkgs' config, byte for byte.
        for c in [conf(json!({})), conf(json!({"variant": null}))] {
            assert!(!image_config(&c, None, &[]).contains("variant"));
        }
    }
}
