//! Base images (`fromImage`): Docker archives, plain or compressed, indexed once
//! ([`crate::image::read`]) and their layers copied in the order they appear, each checked against
//! its diff_id as it is copied. Outer member order does not matter to loaders: they follow
//! `manifest.json`.

use crate::image::read::{check_sha256_digest, select_manifest_entry, ArchiveIndex, ArchivePick};
use crate::util::hex;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BaseLayer {
    /// The layer's path as the base manifest names it (used in history comments).
    pub manifest_path: String,
    /// The member that holds its bytes, after following links.
    pub member: String,
    /// `sha256:<hex>` from the base config's `rootfs.diff_ids`.
    pub diff_id: String,
    pub size: u64,
}

pub struct BaseImage {
    pub path: PathBuf,
    /// The base image's config JSON (`config`, `rootfs`, `history`, ...).
    pub image_json: Value,
    pub layers: Vec<BaseLayer>,
    index: ArchiveIndex,
    /// The member holding the config.
    config_member: String,
    /// What messages call it: `base image`, or `source` for a push.
    role: &'static str,
}

impl std::fmt::Debug for BaseImage {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("BaseImage").field("path", &self.path).field("layers", &self.layers).finish()
    }
}

/// An error about the archive at `path`, read as `role` (`base image`, `source`).
fn broken(role: &str, path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{role} {}: {what}", path.display())
}

/// Hashes what passes through, so a base layer is checked against its diff_id as it is copied.
struct Verify<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    read: u64,
    head: Vec<u8>,
}

impl Read for Verify<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if self.head.len() < 4 {
            let k = n.min(4 - self.head.len());
            self.head.extend_from_slice(&buf[..k]);
        }
        self.read += n as u64;
        Ok(n)
    }
}

impl BaseImage {
    /// The first image of the archive at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_selected(path, Some(&ArchivePick::At(0)))
    }

    /// The image of the archive at `path` that `pick` names (see `select_manifest_entry`).
    pub fn load_selected(path: &Path, pick: Option<&ArchivePick>) -> Result<Self> {
        Self::load_as(path, pick, "base image")
    }

    /// As [`Self::load_selected`], for messages that call the archive `role`.
    pub fn load_as(path: &Path, pick: Option<&ArchivePick>, role: &'static str) -> Result<Self> {
        if path.is_dir() {
            bail!(broken(role, path, "it is a directory (an OCI layout?); a base image must be a Docker archive"));
        }
        let index = ArchiveIndex::load(path).map_err(|e| anyhow!("{role} {e:#}"))?;
        // An oci-archive with a Docker manifest.json too (stevedore's) still has compressed layers.
        if index.contains("oci-layout") && (!index.contains("manifest.json") || index.oci_layers_compressed()) {
            bail!(broken(role, path, "it is an OCI image, and a base image must be a Docker archive (build it with format = \"docker-archive\")"));
        }
        let read_json = |name: &str| index.json(name).map_err(|e| anyhow!("{role} {e:#}"));
        let manifest = read_json("manifest.json")?;
        let first = select_manifest_entry(&manifest, pick, path).map_err(|e| anyhow!("{role} {e}"))?;
        let config_name = first
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| broken(role, path, "manifest.json has no \"Config\""))?;
        let image_json = read_json(config_name)?;
        let layer_paths: Vec<String> = first
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| broken(role, path, "manifest.json has no \"Layers\""))?
            .iter()
            .map(|l| l.as_str().map(str::to_owned).ok_or_else(|| broken(role, path, "a layer path in manifest.json is not a string")))
            .collect::<Result<_>>()?;
        let diff_ids: Vec<String> = image_json
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| broken(role, path, format!("{config_name} has no rootfs.diff_ids")))?
            .iter()
            .map(|d| {
                d.as_str()
                    .and_then(|d| check_sha256_digest(d).ok().map(|_| d.to_owned()))
                    .ok_or_else(|| broken(role, path, format!("{config_name}: bad diff_id {d} (not sha256: and 64 lowercase hex digits)")))
            })
            .collect::<Result<_>>()?;
        if diff_ids.len() != layer_paths.len() {
            bail!(broken(
                role,
                path,
                format!("manifest.json lists {} layers but the config has {} diff_ids", layer_paths.len(), diff_ids.len())
            ));
        }
        if !image_json.get("config").is_none_or(|c| c.is_object() || c.is_null()) {
            bail!(broken(role, path, format!("{config_name}: \"config\" is not an object")));
        }
        let mut layers: Vec<BaseLayer> = Vec::new();
        for (manifest_path, diff_id) in layer_paths.into_iter().zip(diff_ids) {
            let m = index.resolve(&manifest_path).map_err(|e| anyhow!("{role} {e:#}"))?;
            // One member serving two layers must be one layer (it has one digest).
            if let Some(other) = layers.iter().find(|l| l.member == m.name && l.diff_id != diff_id) {
                bail!(broken(role, path, format!("layer member {} is given two diff_ids, {} and {diff_id}", m.name, other.diff_id)));
            }
            layers.push(BaseLayer { manifest_path, member: m.name, diff_id, size: m.size });
        }
        Ok(BaseImage { path: path.to_owned(), image_json, layers, index, config_member: config_name.to_string(), role })
    }

    /// The base image's `Env`, if any.
    pub fn env(&self) -> Vec<String> {
        self.image_json
            .pointer("/config/Env")
            .and_then(Value::as_array)
            .map(|env| env.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// The raw bytes of the image's config member (the image ID is their digest).
    pub fn config_bytes(&self) -> Result<Vec<u8>> {
        self.index.bytes(&self.config_member)
    }

    /// Calls `f` once for each distinct layer member, in archive order, with a reader of its
    /// bytes. A layer `f` reads from is checked against its diff_id: what `f` leaves unread is
    /// read too, and a layer whose bytes do not match is an error after `f` returns (so a
    /// caller writing an archive fails before its manifest is written). A compressed member's
    /// diff_id is that of its decompressed bytes, which only a decompressing `f` can check.
    pub fn copy_layers(&self, mut f: impl FnMut(&BaseLayer, &mut dyn Read) -> Result<()>) -> Result<()> {
        let mut by_member: HashMap<&str, &BaseLayer> = HashMap::new();
        for l in &self.layers {
            by_member.entry(l.member.as_str()).or_insert(l);
        }
        let wanted: Vec<String> = by_member.keys().map(|k| k.to_string()).collect();
        self.index
            .for_each_wanted(&wanted, |name, r| {
                let layer = by_member[name];
                let mut v = Verify { inner: r, hasher: Sha256::new(), read: 0, head: Vec::new() };
                f(layer, &mut v)?;
                if v.read == 0 || crate::compress::detect(&v.head) != crate::compress::Compression::None {
                    return Ok(true);
                }
                // What `f` left unread still counts.
                io::copy(&mut v, &mut io::sink()).with_context(|| format!("cannot read {}", layer.member))?;
                if v.read != layer.size {
                    bail!(broken(self.role, &self.path, format!("layer {} is truncated", layer.member)));
                }
                let got = format!("sha256:{}", hex(&v.hasher.finalize()));
                if got != layer.diff_id {
                    bail!(broken(self.role, &self.path, format!("layer {} is {got}, but the config's diff_id says {}", layer.member, layer.diff_id)));
                }
                Ok(true)
            })
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
