//! Several images in one Docker archive (nixpkgs' `mergeImages`): `docker load` or
//! `podman load` of the result loads every image with its tags.
//!
//! An input is a Docker archive (plain, gzip or zstd; it may itself hold several images) or an
//! executable that streams one (what streamLayeredImage builds), which is run once with its
//! output spooled to a scratch file. Each archive is read twice: the first pass indexes its
//! members, hashes every file and keeps the small ones (manifest and configs); the second copies
//! the layers the output does not hold yet, so no layer is ever held in memory.
//!
//! Layers are named by the sha256 of their bytes, `<hex>/layer.tar` (the diff_id, for the usual
//! uncompressed layer): images streamed apart all call their first layer `1/layer.tar`, and
//! images that share a layer share its one copy. Configs keep their bytes (so image IDs do not
//! change) under `<sha256>.json`; `manifest.json` lists every input's images in input order;
//! `repositories` is the legacy tag index. Members carry fixed metadata, so the output's bytes
//! depend on the inputs alone.

use crate::image::read::ArchiveIndex;
use crate::util::hex;
use crate::image::{docker_manifest_entry, docker_manifest_json, Outer};
use crate::util::progress::Progress;
use crate::util::io::copy_reading;
use crate::util::io::HashingWriter;
use crate::pycompat::json::dumps_indent4;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The modification time of every output member (1970-01-01T00:00:01Z, as image defaults).
const MTIME: i64 = 1;

/// A layer of an input image: the member holding it, after following links.
#[derive(Debug, Clone)]
struct LayerRef {
    member: String,
    /// Hex sha256 of the member's bytes: its name in the output.
    digest: String,
    size: u64,
}

#[derive(Debug)]
struct ImageEntry {
    config: Vec<u8>,
    /// As the input's manifest gives them (a list, or null for an untagged image).
    repo_tags: Value,
    layers: Vec<LayerRef>,
}

fn broken(label: &str, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("image {label}: {what}")
}

/// Whether a member's bytes start as gzip or zstd do.
fn compressed_member(idx: &ArchiveIndex, member: &str) -> Result<bool> {
    let m = idx.resolve(member)?;
    let mut head = Vec::new();
    idx.open_member(&m)?.take(4).read_to_end(&mut head)?;
    Ok(crate::compress::detect(&head) != crate::compress::Compression::None)
}

/// First pass: the images an archive holds, with their layers located and hashed.
fn index(path: &Path, label: &str) -> Result<(ArchiveIndex, Vec<ImageEntry>)> {
    let idx = ArchiveIndex::load_hashing(path).map_err(|e| broken(label, format!("{e:#}")))?;
    let resolve = |name: &str| -> Result<(String, u64, String)> {
        let m = idx.resolve(name).map_err(|e| broken(label, format!("{e:#}")))?;
        let digest = idx.digest(&m.name).ok_or_else(|| anyhow!("internal error: member {} was not hashed", m.name))?;
        Ok((m.name, m.size, digest))
    };
    let read_small = |name: &str| -> Result<Vec<u8>> { idx.bytes(name).map_err(|e| broken(label, format!("{e:#}"))) };

    let manifest: Value = crate::util::limits::parse_json(&read_small("manifest.json")?, crate::util::limits::METADATA_VALUES)
        .map_err(|e| broken(label, format!("manifest.json is not valid JSON: {e}")))?;
    let entries = manifest.as_array().filter(|m| !m.is_empty()).ok_or_else(|| broken(label, "manifest.json lists no image"))?;
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let at = |what: &str| broken(label, format!("manifest.json, image {}: {what}", i + 1));
            let config_name = entry.get("Config").and_then(Value::as_str).ok_or_else(|| at("no \"Config\""))?;
            let config = read_small(config_name)?;
            let config_json: Value =
                crate::util::limits::parse_json(&config, crate::util::limits::METADATA_VALUES).map_err(|e| broken(label, format!("{config_name}: {e:#}")))?;
            let layer_names = entry.get("Layers").and_then(Value::as_array).ok_or_else(|| at("no \"Layers\""))?;
            let layers = layer_names
                .iter()
                .map(|l| {
                    let l = l.as_str().ok_or_else(|| at("a layer path is not a string"))?;
                    let (member, size, digest) = resolve(l)?;
                    Ok(LayerRef { member, digest, size })
                })
                .collect::<Result<Vec<_>>>()?;
            // A loader would reject the image later; say so now, naming the input.
            if let Some(diff_ids) = config_json.pointer("/rootfs/diff_ids").and_then(Value::as_array) {
                if diff_ids.len() != layers.len() {
                    return Err(at(&format!("{} layers, but {config_name} has {} diff_ids", layers.len(), diff_ids.len())));
                }
                // Layers are named by their digest in the output and the config is kept as it
                // is: a plain layer must be what its diff_id says (a compressed one's diff_id is
                // that of its decompressed bytes, which the loader checks).
                for (layer, diff_id) in layers.iter().zip(diff_ids) {
                    let want = diff_id.as_str().unwrap_or("");
                    if want != format!("sha256:{}", layer.digest) && !compressed_member(&idx, &layer.member)? {
                        return Err(at(&format!("layer {} is sha256:{}, but {config_name} gives the diff_id {want}", layer.member, layer.digest)));
                    }
                }
            }
            let repo_tags = match entry.get("RepoTags") {
                None | Some(Value::Null) => Value::Null,
                Some(tags @ Value::Array(items)) if items.iter().all(Value::is_string) => tags.clone(),
                Some(_) => return Err(at("\"RepoTags\" is not a list of strings")),
            };
            for tag in repo_tags.as_array().into_iter().flatten().filter_map(Value::as_str) {
                crate::image::reference::check_repo_tag(tag).map_err(|e| at(&e.to_string()))?;
            }
            Ok(ImageEntry { config, repo_tags, layers })
        })
        .collect::<Result<Vec<_>>>()
        .map(|entries| (idx, entries))
}

/// Whether `path` is a program to run rather than an archive to read: executable, and starting
/// as a script or an ELF file does (no tar archive or compressed stream starts so).
fn is_program(path: &Path) -> Result<bool> {
    let meta = fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if meta.is_dir() {
        bail!("image {}: a directory, not an image archive or a stream executable", path.display());
    }
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Ok(false);
    }
    let mut head = [0u8; 4];
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let n = file.read(&mut head).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(head[..n].starts_with(b"#!") || head[..n].starts_with(b"\x7fELF"))
}

/// Runs a stream executable with its archive going to `spool`. Its progress goes to stderr
/// unless quiet; then only the last line it printed is kept, for the error if it fails.
fn run_stream(program: &Path, label: &str, spool: &Path, progress: &Progress) -> Result<()> {
    let file = File::create(spool).with_context(|| format!("cannot create {}", spool.display()))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null()).stdout(file);
    cmd.stderr(if progress.quiet { Stdio::piped() } else { Stdio::inherit() });
    let out = cmd.output().map_err(|e| broken(label, format!("cannot run it: {e}")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        let last = said.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(": {}", l.trim())).unwrap_or_default();
        bail!(broken(label, format!("the stream executable failed ({}){last}", out.status)));
    }
    Ok(())
}

/// Splits `name:tag` as Docker does: the tag follows the last `:` after the last `/`.
pub(crate) fn split_repo_tag(repo_tag: &str) -> (&str, &str) {
    match repo_tag.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (repo_tag, "latest"),
    }
}

/// Writes the merged archive of `inputs` to `out`; spooled stream output goes under `scratch`.
pub fn merge<W: Write>(inputs: &[PathBuf], scratch: &Path, out: W, progress: &Progress) -> Result<W> {
    if inputs.is_empty() {
        bail!("no images to merge");
    }
    let mut outer = Outer::new(out, MTIME);
    let mut written: HashSet<String> = HashSet::new();
    let mut images: Vec<ImageEntry> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for (i, input) in inputs.iter().enumerate() {
        let label = input.display().to_string();
        let spool = scratch.join(format!("input-{}.tar", i + 1));
        let archive = if is_program(input)? {
            progress.say(format!("Running {label}"));
            run_stream(input, &label, &spool, progress)?;
            spool.as_path()
        } else {
            input.as_path()
        };
        progress.say(format!("Indexing {label}"));
        let (idx, entries) = index(archive, &label)?;

        // Each new layer is copied from the first member that holds it.
        let mut wanted: HashMap<String, String> = HashMap::new();
        let mut claimed: HashSet<&str> = HashSet::new();
        for layer in entries.iter().flat_map(|e| &e.layers) {
            if !written.contains(&layer.digest) && claimed.insert(&layer.digest) {
                wanted.insert(layer.member.clone(), layer.digest.clone());
            }
        }
        let new_layers = wanted.len();
        let sizes: HashMap<&str, u64> = entries.iter().flat_map(|e| &e.layers).map(|l| (l.member.as_str(), l.size)).collect();
        let members: Vec<String> = wanted.keys().cloned().collect();
        idx.for_each_wanted(&members, |name, entry| {
            let digest = &wanted[name];
            let size = sizes[name];
            outer.begin_member(&format!("{digest}/layer.tar"), size)?;
            let mut hw = HashingWriter::new(outer.tar.get_mut());
            let copied = copy_reading(&mut entry.take(size), &mut hw, &mut buf, || format!("member {name} of image {label}"))?;
            let (_, again, _) = hw.finish();
            if copied != size || hex(&again) != *digest {
                bail!(broken(&label, format!("member {name} changed between reads")));
            }
            outer.end_member(size)?;
            written.insert(digest.clone());
            Ok(true)
        })
        .map_err(|e| broken(&label, format!("{e:#}")))?;
        if archive == spool {
            let _ = fs::remove_file(&spool);
        }
        let layers: usize = entries.iter().map(|e| e.layers.len()).sum();
        progress.say(format!("  {} image(s), {layers} layer(s), {new_layers} new", entries.len()));
        images.extend(entries);
    }

    progress.say("Adding manifests...");
    let mut manifest = Vec::new();
    let mut repositories: Map<String, Value> = Map::new();
    let mut seen_tags: HashSet<String> = HashSet::new();
    let mut configs_written: HashSet<String> = HashSet::new();
    for image in &images {
        let id = hex(&Sha256::digest(&image.config));
        let config_name = format!("{id}.json");
        if configs_written.insert(id.clone()) {
            outer.add_bytes(&config_name, &image.config)?;
        }
        for tag in image.repo_tags.as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !seen_tags.insert(tag.to_string()) {
                progress.say(format!("warning: {tag} names more than one image; a load keeps the last"));
            }
            let (name, t) = split_repo_tag(tag);
            let tags = repositories.entry(name.to_string()).or_insert_with(|| json!({}));
            if let Value::Object(tags) = tags {
                tags.insert(t.to_string(), Value::from(id.clone()));
            }
        }
        let layers = image.layers.iter().map(|l| format!("{}/layer.tar", l.digest)).collect();
        manifest.push(docker_manifest_entry(&config_name, image.repo_tags.clone(), layers));
    }
    outer.add_bytes("manifest.json", docker_manifest_json(manifest).as_bytes())?;
    outer.add_bytes("repositories", dumps_indent4(&Value::Object(repositories)).as_bytes())?;
    let out = outer.finish()?;
    progress.say(format!("Done: {} image(s), {} distinct layer(s).", images.len(), written.len()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_tags_split_like_docker() {
        assert_eq!(split_repo_tag("hello:v1"), ("hello", "v1"));
        assert_eq!(split_repo_tag("registry:5000/team/hello:v1"), ("registry:5000/team/hello", "v1"));
        assert_eq!(split_repo_tag("registry:5000/team/hello"), ("registry:5000/team/hello", "latest"));
    }
}
