//! The Docker image archive (`docker save` format, Image Spec v1.2), streamed in one pass.
//!
//! Each layer's size is known from its plan before its bytes are produced, so a layer is written
//! straight into the outer archive while it is hashed. Our own layers are named by their position
//! (`N/layer.tar`), base layers by their diff_id; `manifest.json`, written last, ties names to
//! the image. The image config is the one nixpkgs writes, byte for byte.

use crate::base::{merge_env, BaseImage};
use crate::conf::StreamConf;
use crate::layer::{self, check_store_path, out_err, plan_layer, HashingWriter, Owner};
use crate::pyjson::{dumps_indent4, list_repr};
use crate::tar::{self, Header, HeaderEncoder};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
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

/// The outer archive: member headers and padding, with a running offset for the trailer.
struct Outer<W: Write> {
    w: W,
    enc: HeaderEncoder,
    offset: u64,
    mtime: i64,
}

impl<W: Write> Outer<W> {
    fn begin_member(&mut self, name: &str, size: u64) -> Result<()> {
        let h = Header::plain_file(name.as_bytes(), size, self.mtime);
        let mut buf = Vec::with_capacity(1024);
        self.enc.encode(&h, &mut buf);
        self.w.write_all(&buf).map_err(out_err)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn end_member(&mut self, size: u64) -> Result<()> {
        let pad = tar::padding(size);
        self.w.write_all(&[0u8; 512][..pad as usize]).map_err(out_err)?;
        self.offset += size + pad;
        Ok(())
    }

    fn add_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.begin_member(name, data.len() as u64)?;
        self.w.write_all(data).map_err(out_err)?;
        self.end_member(data.len() as u64)
    }

    fn finish(mut self) -> Result<W> {
        layer::write_zeros(&mut self.w, tar::trailer_len(self.offset))?;
        self.w.flush().map_err(out_err)?;
        Ok(self.w)
    }
}

/// Progress on stderr: nixpkgs' lines, then how much and how fast.
pub struct Progress {
    pub quiet: bool,
}

impl Progress {
    fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", line.as_ref());
        }
    }

    fn done(&self, what: &str, bytes: u64, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        let mib = bytes as f64 / (1024.0 * 1024.0);
        self.say(format!("  {what}: {mib:.1} MiB in {secs:.2} s ({:.0} MiB/s)", mib / secs.max(1e-6)));
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

/// Streams the whole image to `out`.
pub fn stream<W: Write>(conf: &StreamConf, repo_tag: Option<&str>, out: W, progress: &Progress) -> Result<W> {
    let started = Instant::now();
    let owner = Owner {
        uid: conf.uid,
        gid: conf.gid,
        uname: conf.uname.clone(),
        gname: conf.gname.clone(),
        mtime: conf.mtime,
    };
    // Check everything that can be checked before the first byte goes out, so that bad input
    // gives an error and no output rather than a truncated archive.
    let store_layers: Vec<Vec<PathBuf>> = conf
        .store_layers
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
    let custom = conf.customisation_layer.as_deref().map(customisation_checksum).transpose()?;
    let base = conf.from_image.as_deref().map(BaseImage::load).transpose()?;

    let mut outer = Outer { w: out, enc: HeaderEncoder::new(), offset: 0, mtime: conf.mtime };
    let mut layers: Vec<LayerInfo> = Vec::new();

    match &base {
        None => progress.say("No 'fromImage' provided"),
        Some(base) => {
            let mut num = 0;
            base.copy_layers(|layer, reader| {
                num += 1;
                progress.say(format!("Adding base layer {num} from {}", layer.manifest_path));
                let name = format!("{}/layer.tar", &layer.diff_id["sha256:".len()..]);
                outer.begin_member(&name, layer.size)?;
                let copied = io::copy(&mut reader.take(layer.size), &mut outer.w).map_err(|e| {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        out_err(e)
                    } else {
                        anyhow!("base image {}: cannot read {}: {e}", base.path.display(), layer.member)
                    }
                })?;
                if copied != layer.size {
                    bail!("base image {}: {} is truncated", base.path.display(), layer.member);
                }
                outer.end_member(layer.size)
            })?;
            for layer in &base.layers {
                layers.push(LayerInfo {
                    path: format!("{}/layer.tar", &layer.diff_id["sha256:".len()..]),
                    diff_id: layer.diff_id["sha256:".len()..].to_string(),
                    size: layer.size,
                    paths: vec![layer.manifest_path.clone()],
                });
            }
        }
    }

    let mut buf = vec![0u8; 1 << 20];
    for (paths, given) in store_layers.iter().zip(&conf.store_layers) {
        let num = layers.len() + 1;
        progress.say(format!("Creating layer {num} from paths: {}", list_repr(given)));
        let layer_started = Instant::now();
        let plan = plan_layer(paths, &owner).with_context(|| format!("layer {num}"))?;
        let name = format!("{num}/layer.tar");
        outer.begin_member(&name, plan.tar_size)?;
        let digest = layer::write_layer(&plan, &owner, &mut outer.w).with_context(|| format!("layer {num}"))?;
        outer.end_member(plan.tar_size)?;
        progress.done(&format!("layer {num}, {} files", plan.files), plan.tar_size, layer_started);
        layers.push(LayerInfo { path: name, diff_id: hex(&digest), size: plan.tar_size, paths: given.clone() });
    }

    if let (Some((layer_path, checksum, size)), Some(dir)) = (&custom, &conf.customisation_layer) {
        progress.say(format!("Creating layer {} with customisation...", layers.len() + 1));
        let name = format!("{checksum}/layer.tar");
        outer.begin_member(&name, *size)?;
        let mut file = File::open(layer_path).with_context(|| format!("cannot open {}", layer_path.display()))?;
        let mut hw = HashingWriter::new(&mut outer.w);
        let copied = copy_reading(&mut file, &mut hw, &mut buf, layer_path)?;
        let (_, digest, _) = hw.finish();
        if copied != *size {
            bail!("{} changed size while it was being read", layer_path.display());
        }
        if hex(&digest) != *checksum {
            bail!("{}: checksum file says {checksum} but layer.tar hashes to {}", dir.display(), hex(&digest));
        }
        outer.end_member(*size)?;
        layers.push(LayerInfo {
            path: name,
            diff_id: checksum.clone(),
            size: *size,
            paths: vec![dir.to_string_lossy().into_owned()],
        });
    }

    progress.say("Adding manifests...");
    let config_json = image_config(conf, base.as_ref(), &layers);
    let config_digest = hex(&Sha256::digest(config_json.as_bytes()));
    let config_name = format!("{config_digest}.json");
    outer.add_bytes(&config_name, config_json.as_bytes())?;
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": [repo_tag.unwrap_or(&conf.repo_tag)],
        "Layers": layers.iter().map(|l| l.path.clone()).collect::<Vec<_>>(),
    }]);
    outer.add_bytes("manifest.json", dumps_indent4(&manifest).as_bytes())?;
    let out = outer.finish()?;
    let total: u64 = layers.iter().map(|l| l.size).sum();
    progress.done(&format!("image {config_digest:.12}, {} layers", layers.len()), total, started);
    progress.say("Done.");
    Ok(out)
}

fn copy_reading<W: Write>(r: &mut impl Read, w: &mut W, buf: &mut [u8], path: &Path) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let k = match r.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
        };
        w.write_all(&buf[..k]).map_err(out_err)?;
        n += k as u64;
    }
}

/// The image config JSON as nixpkgs writes it.
pub fn image_config(conf: &StreamConf, base: Option<&BaseImage>, layers: &[LayerInfo]) -> String {
    let mut config = conf.config.clone();
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
