//! Base images (`fromImage`): Docker archives, plain or compressed, read in streaming passes.
//!
//! A compressed archive cannot be read at random, and its manifest may come last (ours put it
//! there), so the first pass indexes members and keeps small JSON files, and a later pass
//! copies the layers in the order they appear. Outer member order does not matter to loaders:
//! they follow `manifest.json`.

use crate::compress::open_decompressed;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Members up to this size are kept from the first pass in case they are the manifest or the
/// image config.
const SMALL_MEMBER: u64 = 4 << 20;

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

#[derive(Debug)]
pub struct BaseImage {
    pub path: PathBuf,
    /// The base image's config JSON (`config`, `rootfs`, `history`, ...).
    pub image_json: Value,
    pub layers: Vec<BaseLayer>,
}

#[derive(Debug, Clone)]
enum Member {
    File { size: u64 },
    Link { target: String },
}

/// Normalizes an archive member name: no `.`, no empty components, `..` resolved.
pub fn normalize_member_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// The member a link member `name` points to (a symlink's target taken relative to its
/// directory), normalized; None if the member is not a link.
pub fn link_target<R: Read>(entry: &tar::Entry<R>, name: &str) -> Option<String> {
    let kind = entry.header().entry_type();
    if !(kind.is_symlink() || kind.is_hard_link()) {
        return None;
    }
    let target = entry.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
    Some(if kind.is_symlink() && !target.starts_with('/') {
        let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        normalize_member_name(&format!("{dir}/{target}"))
    } else {
        normalize_member_name(&target)
    })
}

fn broken(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("base image {}: {what}", path.display())
}

/// Runs `f` on every member of the archive, in order.
fn for_each_member(path: &Path, mut f: impl FnMut(&mut tar::Entry<Box<dyn Read>>) -> Result<bool>) -> Result<()> {
    let reader = open_decompressed(path)?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| broken(path, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| broken(path, format!("not a valid tar archive: {e}")))?;
        if !f(&mut entry)? {
            break;
        }
    }
    Ok(())
}

/// The entry of a Docker archive's `manifest.json` tagged `wanted` (`name:tag`), or the first.
pub fn select_manifest_entry<'m>(manifest: &'m Value, wanted: Option<&str>, path: &Path) -> Result<&'m Value> {
    let images = manifest.as_array().ok_or_else(|| anyhow!("{}: manifest.json is not a list", path.display()))?;
    match wanted {
        Some(wanted) => images
            .iter()
            .find(|i| i["RepoTags"].as_array().is_some_and(|t| t.iter().any(|t| t.as_str() == Some(wanted))))
            .ok_or_else(|| {
                let tags: Vec<&str> = images.iter().filter_map(|i| i["RepoTags"].as_array()).flatten().filter_map(Value::as_str).collect();
                anyhow!("{}: no image tagged {wanted} (it has: {})", path.display(), tags.join(", "))
            }),
        None => images.first().ok_or_else(|| anyhow!("{}: manifest.json lists no image", path.display())),
    }
}

impl BaseImage {
    /// The first image of the archive at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_selected(path, None)
    }

    /// The image tagged `wanted` (`name:tag`) of the archive at `path`, or the first one.
    pub fn load_selected(path: &Path, wanted: Option<&str>) -> Result<Self> {
        if path.is_dir() {
            bail!(broken(path, "it is a directory (an OCI layout?); a base image must be a Docker archive"));
        }
        let mut members: HashMap<String, Member> = HashMap::new();
        let mut small: HashMap<String, Vec<u8>> = HashMap::new();
        for_each_member(path, |entry| {
            let name = normalize_member_name(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if let Some(target) = link_target(entry, &name) {
                members.insert(name, Member::Link { target });
            } else if kind.is_file() {
                let size = entry.size();
                if size <= SMALL_MEMBER {
                    let mut data = Vec::with_capacity(size as usize);
                    entry
                        .read_to_end(&mut data)
                        .map_err(|e| broken(path, format!("cannot read member {name}: {e}")))?;
                    small.insert(name.clone(), data);
                }
                members.insert(name, Member::File { size });
            }
            Ok(true)
        })?;

        let resolve = |name: &str| -> Result<(String, u64)> {
            let mut name = normalize_member_name(name);
            for _ in 0..32 {
                match members.get(&name) {
                    Some(Member::File { size }) => return Ok((name, *size)),
                    Some(Member::Link { target }) => name = target.clone(),
                    None => return Err(broken(path, format!("it has no member {name:?}"))),
                }
            }
            Err(broken(path, format!("too many links resolving {name:?}")))
        };
        let read_json = |name: &str| -> Result<Value> {
            let (member, _) = resolve(name)?;
            let data = small
                .get(&member)
                .ok_or_else(|| broken(path, format!("{name} is too large to be JSON metadata")))?;
            serde_json::from_slice(data).map_err(|e| broken(path, format!("{name} is not valid JSON: {e}")))
        };

        if !members.contains_key("manifest.json") && members.contains_key("oci-layout") {
            bail!(broken(path, "it is an OCI image, and a base image must be a Docker archive (build it with format = \"docker-archive\")"));
        }
        let manifest = read_json("manifest.json")?;
        let first = select_manifest_entry(&manifest, wanted, path).map_err(|e| anyhow!("base image {e}"))?;
        let config_name = first
            .get("Config")
            .and_then(Value::as_str)
            .ok_or_else(|| broken(path, "manifest.json has no \"Config\""))?;
        let image_json = read_json(config_name)?;
        let layer_paths: Vec<String> = first
            .get("Layers")
            .and_then(Value::as_array)
            .ok_or_else(|| broken(path, "manifest.json has no \"Layers\""))?
            .iter()
            .map(|l| l.as_str().map(str::to_owned).ok_or_else(|| broken(path, "a layer path in manifest.json is not a string")))
            .collect::<Result<_>>()?;
        let diff_ids: Vec<String> = image_json
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| broken(path, format!("{config_name} has no rootfs.diff_ids")))?
            .iter()
            .map(|d| {
                d.as_str()
                    .filter(|d| d.starts_with("sha256:") && d.len() == 71)
                    .map(str::to_owned)
                    .ok_or_else(|| broken(path, format!("{config_name}: bad diff_id {d}")))
            })
            .collect::<Result<_>>()?;
        if diff_ids.len() != layer_paths.len() {
            bail!(broken(
                path,
                format!("manifest.json lists {} layers but the config has {} diff_ids", layer_paths.len(), diff_ids.len())
            ));
        }
        if !image_json.get("config").map_or(true, |c| c.is_object() || c.is_null()) {
            bail!(broken(path, format!("{config_name}: \"config\" is not an object")));
        }
        let layers = layer_paths
            .into_iter()
            .zip(diff_ids)
            .map(|(manifest_path, diff_id)| {
                let (member, size) = resolve(&manifest_path)?;
                Ok(BaseLayer { manifest_path, member, diff_id, size })
            })
            .collect::<Result<_>>()?;
        Ok(BaseImage { path: path.to_owned(), image_json, layers })
    }

    /// The base image's `Env`, if any.
    pub fn env(&self) -> Vec<String> {
        self.image_json
            .pointer("/config/Env")
            .and_then(Value::as_array)
            .map(|env| env.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// Calls `f` once for each distinct layer member, in archive order, with a reader of its
    /// bytes.
    pub fn copy_layers(&self, mut f: impl FnMut(&BaseLayer, &mut dyn Read) -> Result<()>) -> Result<()> {
        let mut wanted: HashMap<&str, &BaseLayer> = self.layers.iter().map(|l| (l.member.as_str(), l)).collect();
        for_each_member(&self.path, |entry| {
            if wanted.is_empty() {
                return Ok(false);
            }
            let name = normalize_member_name(&String::from_utf8_lossy(&entry.path_bytes()));
            if entry.header().entry_type().is_file() {
                if let Some(layer) = wanted.remove(name.as_str()) {
                    f(layer, entry)?;
                }
            }
            Ok(true)
        })
        .context("reading the base image's layers")?;
        if let Some(missing) = wanted.keys().next() {
            bail!(broken(&self.path, format!("member {missing} vanished between reads")));
        }
        Ok(())
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

    #[test]
    fn normalize_member_names() {
        assert_eq!(normalize_member_name("./abc/layer.tar"), "abc/layer.tar");
        assert_eq!(normalize_member_name("abc/../def/layer.tar"), "def/layer.tar");
        assert_eq!(normalize_member_name("/manifest.json"), "manifest.json");
    }
}
