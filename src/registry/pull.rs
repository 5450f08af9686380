//! Pulling: resolve a tag or digest (picking a platform from an index), verify every blob, and
//! write a Docker archive (layers decompressed to their diff_ids) or an OCI layout.
//!
//! The Docker archive is a pure function of the image and the same bytes as skopeo's
//! `docker-archive` output (what nixpkgs' pullImage hashes): `prefetch` hashes it, and
//! pullImage's fixed-output derivation must produce it again, so hashes from nixpkgs-era
//! pullImage calls and nix-prefetch-docker carry over.

use super::auth::Reference;
use super::client::{check_length, read_sized, Registry, Tries, DOCKER_LIST, JSON_LIMIT};
use super::http::{io_failure, NetError};
use crate::util::sha256_digest;
use crate::compress::{detect, Compression};
use crate::util::hex;
use crate::util::progress::Progress;
use crate::image::oci::{self, Descriptor, INDEX_TYPE};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ffi::OsStr;
use std::path::Path;
use std::rc::Rc;

#[derive(Debug, Clone)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

/// The image a reference resolves to for a platform.
pub struct Resolved {
    /// Digest of what the reference names (an index's, for a multi-arch image).
    pub top_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

fn is_index(media_type: &str, json: &Value) -> bool {
    media_type == INDEX_TYPE || media_type == DOCKER_LIST || (media_type.is_empty() && json.get("manifests").is_some())
}

fn descriptor(v: &Value, what: &str) -> Result<Descriptor> {
    let digest = v.get("digest").and_then(Value::as_str).ok_or_else(|| anyhow!("{what}: a descriptor has no digest"))?;
    super::auth::check_digest(digest).map_err(|e| anyhow!("{what}: {e}"))?;
    Ok(Descriptor {
        media_type: v.get("mediaType").and_then(Value::as_str).unwrap_or("").to_string(),
        digest: digest.to_string(),
        size: v.get("size").and_then(Value::as_u64).ok_or_else(|| anyhow!("{what}: descriptor {digest} has no size"))?,
        annotations: v
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default(),
    })
}

/// The variants to look for, best first, as containers/image (skopeo's `--override-variant`)
/// orders them: the one asked for, then those of less capable machines of the architecture (arm:
/// v7, v6, v5), then an entry without a variant; none asked for: an entry without a variant,
/// then the architecture's base variant (arm64: v8).
fn wanted_variants<'a>(arch: &str, want: Option<&'a str>) -> Vec<&'a str> {
    const LESS_CAPABLE: &[(&str, &[&str])] = &[("arm", &["v7", "v6", "v5"]), ("arm64", &["v8"])];
    let order: &[&str] = LESS_CAPABLE.iter().find(|(a, _)| *a == arch).map_or(&[], |(_, v)| v);
    match want {
        Some(w) => {
            let mut vs: Vec<&str> = match order.iter().position(|v| *v == w) {
                Some(i) => order[i..].to_vec(),
                None => vec![w],
            };
            vs.push("");
            vs
        }
        None if arch == "arm64" => vec!["", "v8"],
        None => vec![""],
    }
}

/// Picks the manifest for `want` from an index's entries: the first entry of the best variant
/// (`wanted_variants`); with no variant asked for and none of those, the architecture's first.
fn pick_platform(index: &Value, want: &Platform, what: &str) -> Result<Value> {
    let entries = index.get("manifests").and_then(Value::as_array).ok_or_else(|| anyhow!("{what}: index has no manifests"))?;
    let mut candidates = Vec::new();
    let mut available = Vec::new();
    for e in entries {
        let p = e.get("platform");
        let os = p.and_then(|p| p.get("os")).and_then(Value::as_str).unwrap_or("");
        let arch = p.and_then(|p| p.get("architecture")).and_then(Value::as_str).unwrap_or("");
        let variant = p.and_then(|p| p.get("variant")).and_then(Value::as_str).unwrap_or("");
        available.push(format!("{os}/{arch}{}", if variant.is_empty() { String::new() } else { format!("/{variant}") }));
        if os == want.os && arch == want.arch {
            candidates.push((variant, e));
        }
    }
    let wanted = wanted_variants(&want.arch, want.variant.as_deref());
    let chosen = wanted
        .iter()
        .find_map(|w| candidates.iter().find(|(v, _)| v == w))
        .or(if want.variant.is_none() { candidates.first() } else { None })
        .map(|(_, e)| (*e).clone());
    chosen.ok_or_else(|| {
        let wanted = format!("{}/{}{}", want.os, want.arch, want.variant.as_ref().map(|v| format!("/{v}")).unwrap_or_default());
        anyhow!("{what} has no image for {wanted} (it has: {})", available.join(", "))
    })
}

pub fn resolve(reg: &Registry, reference: &Reference, platform: &Platform) -> Result<Resolved> {
    let (bytes, media_type, top_digest) = reg.get_manifest(&reference.repo, reference.reference())?;
    let what = reference.to_string();
    let json: Value = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{what}: manifest: {e:#}"))?;
    let (bytes, media_type, digest, json) = if is_index(&media_type, &json) {
        let entry = pick_platform(&json, platform, &what)?;
        let d = descriptor(&entry, &what)?;
        let (b, m, dg) = reg.get_manifest_sized(&reference.repo, &d.digest, Some(d.size))?;
        let j: Value = crate::util::limits::parse_json(&b, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{what}: manifest {}: {e:#}", d.digest))?;
        if is_index(&m, &j) {
            bail!("{what}: nested indexes are not supported");
        }
        (b, m, dg, j)
    } else {
        (bytes, media_type, top_digest.clone(), json)
    };
    if json.get("schemaVersion").and_then(Value::as_u64) == Some(1) || media_type.contains("distribution.manifest.v1") {
        bail!("{what}: Docker schema 1 manifests are not supported");
    }
    let config = descriptor(json.get("config").ok_or_else(|| anyhow!("{what}: manifest has no config"))?, &what)?;
    let layers = json
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("{what}: manifest has no layers"))?
        .iter()
        .map(|l| descriptor(l, &what))
        .collect::<Result<Vec<_>>>()?;
    for l in &layers {
        if l.media_type.contains("nondistributable") || l.media_type.contains("foreign") {
            bail!("{what}: layer {} is non-distributable ({}); it cannot be pulled from the registry", l.digest, l.media_type);
        }
    }
    let media_type = if media_type.is_empty() { oci::MANIFEST_TYPE.to_string() } else { media_type };
    Ok(Resolved { top_digest, manifest: bytes, manifest_digest: digest, media_type, config, layers })
}

/// Reads a small blob (a config) whole, verifying it.
pub fn get_json_blob(reg: &Registry, repo: &str, d: &Descriptor) -> Result<Vec<u8>> {
    if d.size > JSON_LIMIT {
        bail!("config {} is too large ({} bytes)", d.digest, d.size);
    }
    let mut tries = Tries::new(reg.retries);
    loop {
        let what = format!("blob {} from {}/{repo}", d.digest, reg.host);
        let result = reg.get_blob(repo, &d.digest).and_then(|r| read_sized(r, d.size, &what));
        match result {
            Ok(b) => {
                if sha256_digest(&b) != d.digest {
                    bail!("blob {} from {}/{repo} does not match its digest", d.digest, reg.host);
                }
                return Ok(b);
            }
            Err(e) => std::thread::sleep(tries.after_error(&e).ok_or(e)?),
        }
    }
}

/// Hashes what passes through, and remembers how the source (the network) failed, if it did.
struct Tee<R> {
    inner: R,
    state: Rc<RefCell<(Sha256, u64, Option<io::ErrorKind>)>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                let mut s = self.state.borrow_mut();
                s.0.update(&buf[..n]);
                s.1 += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.state.borrow_mut().2 = Some(e.kind());
                Err(e)
            }
        }
    }
}

/// Downloads blob `d` into `out`, decompressed if `decompress`, verifying its digest and size.
/// Returns (bytes written, sha256 hex of what was written).
fn fetch_blob(reg: &Registry, repo: &str, d: &Descriptor, decompress: bool, out: &mut dyn Write) -> Result<(u64, String)> {
    let what = format!("blob {}", d.digest);
    let resp = reg.get_blob(repo, &d.digest)?;
    check_length(&resp, d.size, &format!("{what} from {}/{repo}", reg.host))?;
    let state = Rc::new(RefCell::new((Sha256::new(), 0u64, None)));
    // The descriptor's size and one byte more, whatever the server sends (or keeps sending).
    let body = resp.take(d.size.saturating_add(1));
    let mut reader = BufReader::with_capacity(1 << 20, Tee { inner: body, state: state.clone() });
    let mut hw = crate::util::io::HashingWriter::new(out);
    let too_long = || state.borrow().1 > d.size;
    let overflow = || anyhow!("{what} from {}/{repo} is longer than the {} bytes its descriptor gives: stopped reading", reg.host, d.size);
    let head = reader.fill_buf().map_err(|e| io_failure(format!("reading {what}"), &e))?;
    let kind = if decompress { detect(head) } else { Compression::None };
    let copy_result: io::Result<BufReader<Tee<_>>> = (|| {
        Ok(match kind {
            Compression::None => {
                io::copy(&mut reader, &mut hw)?;
                reader
            }
            Compression::Gzip => {
                let mut dec = flate2::bufread::MultiGzDecoder::new(reader);
                io::copy(&mut dec, &mut hw)?;
                dec.into_inner()
            }
            Compression::Zstd => {
                let mut dec = zstd::stream::read::Decoder::with_buffer(reader)?;
                io::copy(&mut dec, &mut hw)?;
                dec.finish()
            }
        })
    })();
    let mut rest = match copy_result {
        Ok(r) => r,
        // Cut off after size + 1 bytes, a compressed stream may look corrupt: the length is why.
        Err(_) if too_long() => return Err(overflow()),
        // The decoder's error for the network's (the same kind, maybe another message).
        Err(e) if state.borrow().2.is_some() => {
            let kind = state.borrow().2.unwrap_or(e.kind());
            return Err(io_failure(format!("reading {what}"), &io::Error::new(kind, e)));
        }
        Err(e) => return Err(anyhow!("{what}: {e}")),
    };
    // Whatever follows the compressed stream still counts toward the digest.
    io::copy(&mut rest, &mut io::sink()).map_err(|e| io_failure(format!("reading {what}"), &e))?;
    if too_long() {
        return Err(overflow());
    }
    let (_, digest, n) = hw.finish();
    let (hasher, size, _) = state.borrow().clone();
    if size < d.size {
        // A body without a length that ends early: as likely a dropped connection as a lie.
        return Err(anyhow::Error::new(NetError(format!("reading {what}: it ended after {size} of its {} bytes", d.size))));
    }
    let got = format!("sha256:{}", hex(&hasher.finalize()));
    if got != d.digest || size != d.size {
        bail!("{what} from {}/{repo} does not match its descriptor (got {got}, {size} bytes)", reg.host);
    }
    Ok((n, hex(&digest)))
}


/// The top-level members of an image config that skopeo copies into the top layer's legacy
/// `json` (containers/image's docker-archive writer), in this order of names.
const LEGACY_ATTRS: [&str; 7] = ["architecture", "config", "container", "container_config", "created", "docker_version", "os"];

/// Go's `json.Compact` with HTML escaping, as `json.Marshal` applies it to a raw value: no
/// whitespace outside strings, `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes.
fn go_compact(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in raw.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            ' ' | '\t' | '\n' | '\r' if !in_string => {}
            _ => out.push(c),
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
    }
    out
}

/// An object as Go's `json.Marshal` writes a `map[string]any`: keys in byte order, compact.
/// Values are JSON text already; keys are plain (no escaping needed).
fn go_object(mut fields: Vec<(&str, String)>) -> String {
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// The legacy per-layer metadata skopeo writes beside the layers, one `(id, json)` per layer
/// (bottom first): each id is the sha256 of the layer's json with its chain ID in place of the
/// id, so it depends on the layers below; the top layer's json carries [`LEGACY_ATTRS`] from
/// the config (`null` where it has none).
fn legacy_layers(config: &[u8], diff_ids: &[String]) -> Result<Vec<(String, String)>> {
    let top: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_slice(config).map_err(|e| anyhow!("config is not a JSON object: {e}"))?;
    let quote = |s: &str| format!("\"{s}\"");
    let mut out: Vec<(String, String)> = Vec::new();
    let mut chain = String::new();
    for (i, diff_id) in diff_ids.iter().enumerate() {
        chain = if i == 0 { diff_id.clone() } else { sha256_digest(format!("{chain} {diff_id}").as_bytes()) };
        let mut fields: Vec<(&str, String)> = Vec::new();
        if let Some((parent, _)) = out.last() {
            fields.push(("parent", quote(parent)));
        }
        if i + 1 == diff_ids.len() {
            for attr in LEGACY_ATTRS {
                fields.push((attr, top.get(attr).map_or_else(|| "null".to_string(), |raw| go_compact(raw.get()))));
            }
        }
        let mut with_chain = fields.clone();
        with_chain.push(("layer_id", quote(&chain)));
        let id = sha256_digest(go_object(with_chain).as_bytes())["sha256:".len()..].to_string();
        fields.push(("id", quote(&id)));
        out.push((id, go_object(fields)));
    }
    Ok(out)
}

/// Writes the Docker archive of `img` to `path` (via a `.partial` file), byte for byte as
/// `skopeo copy docker://… docker-archive:PATH:NAME:TAG` writes it (nixpkgs' pullImage, skopeo
/// 1.9 to 1.18 alike): the layers decompressed as `<diff_id>.tar` (each once), the config as
/// `<digest>.json`, then per layer a legacy directory (`layer.tar` symlink, `VERSION`, `json`),
/// `manifest.json` and `repositories`, all with Go's ustar headers. `name` must be normalized
/// (`image::reference::normalized_name_tag`).
pub fn write_docker_archive(reg: &Registry, repo: &str, img: &Resolved, (name, tag): (&str, &str), path: &Path, progress: &Progress) -> Result<()> {
    let config_bytes = get_json_blob(reg, repo, &img.config)?;
    let config: Value = crate::util::limits::parse_json(&config_bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("config {}: {e:#}", img.config.digest))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("config {} has no rootfs.diff_ids", img.config.digest))?
        .iter()
        .map(|d| d.as_str().map(str::to_owned).ok_or_else(|| anyhow!("config {}: bad diff_id", img.config.digest)))
        .collect::<Result<_>>()?;
    if diff_ids.len() != img.layers.len() {
        bail!("image has {} layers but its config lists {} diff_ids", img.layers.len(), diff_ids.len());
    }
    for d in &diff_ids {
        super::auth::check_digest(d).map_err(|e| anyhow!("config {}: {e}", img.config.digest))?;
    }
    let legacy = legacy_layers(&config_bytes, &diff_ids).map_err(|e| anyhow!("config {}: {e:#}", img.config.digest))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let stem = path.file_name().ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let (file, temp) = crate::util::files::create_temp(dir, stem).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let tmp = temp.path().to_owned();
    let header = |name: &str, size: u64, link: Option<&str>| {
        crate::tar::go_ustar_header(name, size, link).ok_or_else(|| anyhow!("{name}: {size} bytes is more than a Docker archive's ustar header holds ({} at most)", crate::tar::USTAR_SIZE_MAX))
    };
    let result = (|| -> Result<File> {
        let mut f = file;
        let mut names = Vec::new();
        let mut written = std::collections::HashSet::new();
        let mut buf = Vec::new();
        for (layer, diff_id) in img.layers.iter().zip(&diff_ids) {
            let name = format!("{}.tar", &diff_id["sha256:".len()..]);
            names.push(name.clone());
            if !written.insert(diff_id.clone()) {
                continue;
            }
            let start = f.stream_position()?;
            let mut tries = Tries::new(reg.retries);
            let (size, got) = loop {
                f.seek(SeekFrom::Start(start))?;
                f.set_len(start)?;
                f.write_all(&[0u8; 512])?;
                let mut w = BufWriter::with_capacity(1 << 20, &mut f);
                let r = fetch_blob(reg, repo, layer, true, &mut w);
                let r = r.and_then(|x| w.flush().map(|()| x).map_err(|e| anyhow!("cannot write {}: {e}", tmp.display())));
                drop(w);
                match r {
                    Ok(x) => break x,
                    Err(e) => {
                        let Some(wait) = tries.after_error(&e) else { return Err(e) };
                        progress.say(format!("{}: download failed ({e:#}); retrying", layer.digest));
                        std::thread::sleep(wait);
                    }
                }
            };
            if format!("sha256:{got}") != *diff_id {
                bail!("layer {} decompresses to sha256:{got}, but the config says {diff_id}", layer.digest);
            }
            let head = header(&name, size, None)?;
            f.write_all(&[0u8; 512][..crate::tar::padding(size) as usize])?;
            let end = f.stream_position()?;
            f.seek(SeekFrom::Start(start))?;
            f.write_all(&head)?;
            f.seek(SeekFrom::Start(end))?;
            progress.say(format!("{}: {} bytes, {size} uncompressed", layer.digest, layer.size));
        }
        let mut add = |f: &mut File, name: &str, data: &[u8], link: Option<&str>| -> Result<()> {
            buf.clear();
            buf.extend_from_slice(&header(name, data.len() as u64, link)?);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&[0u8; 512][..crate::tar::padding(data.len() as u64) as usize]);
            Ok(f.write_all(&buf)?)
        };
        let config_name = format!("{}.json", &img.config.digest["sha256:".len()..]);
        add(&mut f, &config_name, &config_bytes, None)?;
        let mut legacy_written = std::collections::HashSet::new();
        for ((id, json), layer) in legacy.iter().zip(&names) {
            if legacy_written.insert(id) {
                add(&mut f, &format!("{id}/layer.tar"), b"", Some(&format!("../{layer}")))?;
                add(&mut f, &format!("{id}/VERSION"), b"1.0", None)?;
                add(&mut f, &format!("{id}/json"), json.as_bytes(), None)?;
            }
        }
        // Compact, as Go's encoding/json writes them (the names need no escaping).
        let repo_tag = format!("{name}:{tag}");
        let manifest = Value::Array(vec![crate::image::docker_manifest_entry(&config_name, json!([repo_tag]), names)]);
        add(&mut f, "manifest.json", &serde_json::to_vec(&manifest)?, None)?;
        let top_id = legacy.last().map(|(id, _)| id.as_str());
        let mut repositories = serde_json::Map::new();
        if let Some(id) = top_id {
            let mut tags = serde_json::Map::new();
            tags.insert(tag.to_string(), json!(id));
            repositories.insert(name.to_string(), Value::Object(tags));
        }
        add(&mut f, "repositories", &serde_json::to_vec(&Value::Object(repositories))?, None)?;
        f.write_all(&[0u8; 1024])?;
        Ok(f)
    })();
    // Dropping `temp` on an error removes the partial file.
    temp.persist(result?, path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// Writes the image into the OCI layout at `dir` (blobs as the registry has them).
pub fn write_oci_layout(reg: &Registry, repo: &str, img: &Resolved, name: &str, dir: &Path, progress: &Progress) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;
    let mut all = img.layers.clone();
    all.push(img.config.clone());
    for d in &all {
        let path = blobs.join(&d.digest["sha256:".len()..]);
        if fs::metadata(&path).is_ok_and(|m| m.len() == d.size) {
            continue;
        }
        let mut tries = Tries::new(reg.retries);
        loop {
            // In the layout's top directory: tools take every name under blobs/sha256 for a digest.
            let (file, temp) = crate::util::files::create_temp(dir, OsStr::new(&d.digest["sha256:".len()..])).with_context(|| format!("cannot create a file in {}", dir.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let r = fetch_blob(reg, repo, d, false, &mut w).and_then(|_| w.into_inner().map_err(|e| anyhow!("cannot write {}: {}", temp.path().display(), e.error())));
            match r {
                Ok(file) => {
                    temp.persist(file, &path).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
                    break;
                }
                Err(e) => std::thread::sleep(tries.after_error(&e).ok_or(e)?),
            }
        }
        progress.say(format!("{}: {} bytes", d.digest, d.size));
    }
    let manifest = oci::put_blob(dir, &img.media_type, &img.manifest)?;
    // It writes oci-layout too, under the layout's lock.
    oci::add_to_index(dir, &manifest, Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_compact_escapes_as_encoding_json() {
        assert_eq!(go_compact("{ \"a\" : [1, \"x <&> y\"],\n \"b\":\"\u{2028}\\\" \"}"), r#"{"a":[1,"x \u003c\u0026\u003e y"],"b":"\u2028\" "}"#);
    }

    /// What skopeo 1.9 and 1.18 wrote for an image of three layers, the first repeated on top.
    #[test]
    fn legacy_layers_are_skopeos() {
        let (a, b) = ("sha256:d8fc1f70d0729f7e204dc7cd5deaf2b5c40a64ce481d474f85e8f14ab0d56b8e", "sha256:d430de81ae35666bac09ea1d5bb45a1256c1db3b4ea244baeb83183198d7667a");
        let config = format!(r#"{{"architecture": "amd64", "os": "linux", "rootfs": {{"type": "layers", "diff_ids": ["{a}", "{b}", "{a}"]}}}}"#);
        let legacy = legacy_layers(config.as_bytes(), &[a.into(), b.into(), a.into()]).unwrap();
        let ids: Vec<&str> = legacy.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "e1119a972ccacb0818a12345f2e09f0df1ac677d7c785f15ea99c10dbd50fb63",
                "cb7df4966c55994e2d08dc88359b3befd8155a0912a527ba6c68a19c98e95a95",
                "41b528edc83dd913f7823f1cc18bfeb6fa481d93a427fc1da9516c49bd2c1c80"
            ]
        );
        assert_eq!(legacy[0].1, r#"{"id":"e1119a972ccacb0818a12345f2e09f0df1ac677d7c785f15ea99c10dbd50fb63"}"#);
        assert_eq!(
            legacy[2].1,
            concat!(
                r#"{"architecture":"amd64","config":null,"container":null,"container_config":null,"created":null,"docker_version":null,"#,
                r#""id":"41b528edc83dd913f7823f1cc18bfeb6fa481d93a427fc1da9516c49bd2c1c80","os":"linux","#,
                r#""parent":"cb7df4966c55994e2d08dc88359b3befd8155a0912a527ba6c68a19c98e95a95"}"#
            )
        );
        assert!(legacy_layers(b"[1]", &[a.into()]).is_err());
    }

    fn pick(index: &Value, os: &str, arch: &str, variant: Option<&str>) -> Result<String> {
        let want = Platform { os: os.into(), arch: arch.into(), variant: variant.map(str::to_owned) };
        pick_platform(index, &want, "img").map(|e| e["digest"].as_str().unwrap_or("").to_owned())
    }

    // pullImage's `variant` (stevedore pull --variant) picks the entry skopeo's
    // --override-variant picks: that variant, else a less capable one, else none.
    #[test]
    fn variant_picks_the_platform_entry() {
        let entry = |d: &str, arch: &str, v: Option<&str>| {
            let mut p = json!({"os": "linux", "architecture": arch});
            if let Some(v) = v {
                p["variant"] = json!(v);
            }
            json!({"digest": d, "platform": p})
        };
        let index = json!({"manifests": [
            entry("amd", "amd64", None), entry("v6", "arm", Some("v6")), entry("v7", "arm", Some("v7")), entry("a64", "arm64", Some("v8")),
        ]});
        assert_eq!(pick(&index, "linux", "arm", Some("v7")).unwrap(), "v7");
        assert_eq!(pick(&index, "linux", "arm", Some("v6")).unwrap(), "v6");
        assert_eq!(pick(&index, "linux", "arm64", None).unwrap(), "a64");
        assert_eq!(pick(&index, "linux", "arm64", Some("v8")).unwrap(), "a64");
        // v8 is not arm's (nothing less capable is known), v5 has nothing to fall back on.
        for v in ["v8", "v5"] {
            let e = pick(&index, "linux", "arm", Some(v)).unwrap_err().to_string();
            assert_eq!(e, format!("img has no image for linux/arm/{v} (it has: linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8)"));
        }
        // Less capable variants, then none; no variant asked for: none first, then arm64's v8.
        let older = json!({"manifests": [entry("plain", "arm", None), entry("v6", "arm", Some("v6"))]});
        assert_eq!(pick(&older, "linux", "arm", Some("v7")).unwrap(), "v6");
        assert_eq!(pick(&older, "linux", "arm", None).unwrap(), "plain");
        let both = json!({"manifests": [entry("v8", "arm64", Some("v8")), entry("plain", "arm64", None)]});
        assert_eq!(pick(&both, "linux", "arm64", None).unwrap(), "plain");
        assert_eq!(pick(&both, "linux", "arm64", Some("v8")).unwrap(), "v8");
        assert_eq!(pick(&json!({"manifests": [entry("plain", "arm64", None)]}), "linux", "arm64", Some("v8")).unwrap(), "plain");
        // Nothing of the variants skopeo looks for, none asked: the architecture's first.
        assert_eq!(pick(&index, "linux", "arm", None).unwrap(), "v6");
    }
}
