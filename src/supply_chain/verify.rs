//! Verification: does an image (an archive or a layout) hold exactly what a conf makes? The
//! conf's layers and config are recomputed (their digests from the cache where known) and
//! compared with the image's: every layer's bytes are read and checked against its diff_id,
//! then the diff_ids and the config. For the first layer that differs, the files that differ
//! are listed, from both tars.

use crate::image::base::{BaseImage, LayerMismatch};
use crate::image::conf::StreamConf;
use crate::image::digests::DigestCache;
use crate::image::read::ArchivePick;
use crate::image::{ImageSpec, LayerSink};
use crate::util::files::TempDir;
use crate::util::hex;
use crate::util::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// How many differing files a report lists (the rest are counted).
const LISTED: usize = 20;
/// The most entries a layer's listing may hold: a hostile tar must not take all memory.
const MAX_ENTRIES: usize = 2_000_000;

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Same config digest, same layers: `config` digest and the number of layers.
    Identical { config: String, layers: usize },
    /// Where and how they differ, in lines for a person.
    Differs(Vec<String>),
}

/// One tar entry as far as a container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    owner: (u64, u64),
    size: u64,
    link: Option<String>,
    content: String,
}

/// Compares the image at `image` (`pick` names one of a multi-image Docker archive) with what
/// `conf` makes.
pub fn verify(conf: &StreamConf, image: &Path, pick: Option<&ArchivePick>, progress: &Progress) -> Result<Verdict> {
    let spec = ImageSpec::new(conf)?;
    let expected = spec.describe_layers(&mut DigestCache::open(), progress)?;
    let expected_config = spec.config_json(&expected);
    let expected_digest = format!("sha256:{}", hex(&Sha256::digest(expected_config.as_bytes())));
    let actual = BaseImage::load_picked(image, pick).with_context(|| format!("{}", image.display()))?;

    // Every layer's bytes against its diff_id (copy_layers checks them): a config that lists
    // the right diff_ids proves nothing if the layers beside it are others.
    let want: Vec<String> = expected.iter().map(|l| format!("sha256:{}", l.diff_id)).collect();
    let first_diff = (0..want.len().max(actual.layers.len())).find(|&i| want.get(i) != actual.layers.get(i).map(|l| &l.diff_id));
    // Both copies of the first differing layer are listed from here.
    let scratch = TempDir::new_in(&crate::util::settings::get().temp_dir)?;
    let mut kept: Option<PathBuf> = None;
    let mut layer_no = 0;
    let read = actual.copy_layers(|layer, bytes| {
        layer_no += 1;
        progress.say(format!("checking layer {layer_no} of {} ({})", actual.layers.len(), layer.diff_id));
        let keep = first_diff.is_some_and(|i| actual.layers.get(i).is_some_and(|l| l.member == layer.member));
        let r = bytes.stream()?;
        if keep {
            let path = scratch.path().join("image-layer.tar");
            let mut out = BufWriter::new(File::create(&path).with_context(|| format!("cannot create {}", path.display()))?);
            io::copy(r, &mut out).and_then(|_| out.flush()).with_context(|| format!("cannot write {}", path.display()))?;
            kept = Some(path);
        } else {
            io::copy(r, &mut io::sink())?;
        }
        Ok(())
    });
    if let Err(e) = read {
        // A layer that is not what its config says is a difference; anything else is trouble.
        return match e.downcast_ref::<LayerMismatch>() {
            Some(m) => Ok(Verdict::Differs(vec![format!("the image's layers are not what its config says: {m}")])),
            None => Err(e),
        };
    }

    let Some(i) = first_diff else {
        let actual_config = actual.config_bytes()?;
        let actual_digest = format!("sha256:{}", hex(&Sha256::digest(&actual_config)));
        if actual_digest == expected_digest {
            return Ok(Verdict::Identical { config: actual_digest, layers: want.len() });
        }
        let mut lines = vec![format!("the config differs: {actual_digest}, the conf makes {expected_digest} (the layers are the same)")];
        let expected_json: Value = serde_json::from_str(&expected_config)?;
        for field in differing_fields(&actual.image_json, &expected_json) {
            lines.push(format!("  field {field}"));
        }
        return Ok(Verdict::Differs(lines));
    };

    let mut lines = Vec::new();
    if want.len() != actual.layers.len() {
        lines.push(format!("the image has {} layers, the conf makes {}", actual.layers.len(), want.len()));
    }
    let what = match expected.get(i) {
        Some(l) if !l.paths.is_empty() => format!(" (the conf's holds {})", summarize(&l.paths)),
        _ => String::new(),
    };
    lines.push(format!(
        "layer {} differs{what}: the image's is {}, the conf's {}",
        i + 1,
        actual.layers.get(i).map_or("missing", |l| l.diff_id.as_str()),
        want.get(i).map_or("missing", |d| d.as_str())
    ));
    // The files of both, where both exist.
    let theirs = match &kept {
        Some(p) => Some(listing(File::open(p)?).context("reading the image's layer")?),
        None => None,
    };
    let ours = match want.get(i) {
        Some(_) => Some(expected_listing(&spec, i, scratch.path(), progress)?),
        None => None,
    };
    let empty = BTreeMap::new();
    let (theirs, ours) = (theirs.as_ref().unwrap_or(&empty), ours.as_ref().unwrap_or(&empty));
    let mut found = Vec::new();
    for (path, e) in theirs {
        match ours.get(path) {
            None => found.push(format!("  only in the image: {path}")),
            Some(o) if o != e => found.push(format!("  differs: {path} ({})", how(o, e))),
            Some(_) => {}
        }
    }
    for path in ours.keys().filter(|p| !theirs.contains_key(*p)) {
        found.push(format!("  missing from the image: {path}"));
    }
    let n = found.len();
    lines.extend(found.into_iter().take(LISTED));
    if n > LISTED {
        lines.push(format!("  ... and {} more", n - LISTED));
    }
    Ok(Verdict::Differs(lines))
}

fn summarize(paths: &[String]) -> String {
    match paths {
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
        [] => String::new(),
    }
}

/// What differs between two entries of one path.
fn how(ours: &Entry, theirs: &Entry) -> String {
    let mut what = Vec::new();
    if ours.kind != theirs.kind {
        what.push("type");
    }
    if ours.content != theirs.content || ours.size != theirs.size {
        what.push("content");
    }
    if ours.mode != theirs.mode {
        what.push("mode");
    }
    if ours.owner != theirs.owner {
        what.push("owner");
    }
    if ours.link != theirs.link {
        what.push("link target");
    }
    if what.is_empty() {
        what.push("metadata");
    }
    what.join(", ")
}

/// The top-level config fields (and those of `config`) whose values differ.
fn differing_fields(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec!["(the whole document)".into()] };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(Value::Object(x)), Some(Value::Object(y))) if k == "config" => {
                let mut inner: Vec<&String> = x.keys().chain(y.keys()).collect();
                inner.sort();
                inner.dedup();
                out.extend(inner.into_iter().filter(|f| x.get(*f) != y.get(*f)).map(|f| format!("config.{f}")));
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

/// The entries of a layer tar, by path (as a container would see it: `./` and `/` dropped).
fn listing(r: impl Read) -> Result<BTreeMap<String, Entry>> {
    let mut archive = tar::Archive::new(r);
    let mut out = BTreeMap::new();
    for entry in archive.entries().context("not a tar")? {
        let mut entry = entry.context("a tar entry")?;
        let path = entry.path_bytes();
        let path = String::from_utf8_lossy(&path).trim_start_matches("./").trim_start_matches('/').trim_end_matches('/').to_string();
        let h = entry.header();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Regular | tar::EntryType::Continuous => 'f',
            other => other.as_byte() as char,
        };
        let (mode, owner) = (h.mode().unwrap_or(0), (h.uid().unwrap_or(0), h.gid().unwrap_or(0)));
        let link = entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
        let size = entry.size();
        let mut hashing = crate::util::io::HashingWriter::new(io::sink());
        io::copy(&mut entry, &mut hashing).context("a tar entry's bytes")?;
        let (_, digest, _) = hashing.finish();
        out.insert(path, Entry { kind, mode, owner, size, link, content: hex(&digest) });
        if out.len() > MAX_ENTRIES {
            bail!("more than {MAX_ENTRIES} entries");
        }
    }
    Ok(out)
}

/// Writes the conf's layer `index` to a file in `dir` and lists it.
fn expected_listing(spec: &ImageSpec, index: usize, dir: &Path, progress: &Progress) -> Result<BTreeMap<String, Entry>> {
    struct One {
        index: usize,
        file: BufWriter<File>,
    }
    impl LayerSink for One {
        fn wants(&mut self, index: usize) -> bool {
            index == self.index
        }
        fn begin(&mut self, _: &str, _: u64) -> Result<()> {
            Ok(())
        }
        fn out(&mut self) -> &mut dyn Write {
            &mut self.file
        }
        fn end(&mut self, _: u64, _: &str) -> Result<()> {
            self.file.flush().map_err(|e| anyhow!("cannot write the conf's layer: {e}"))
        }
    }
    let path = dir.join("conf-layer.tar");
    let file = BufWriter::new(File::create(&path).with_context(|| format!("cannot create {}", path.display()))?);
    let mut sink = One { index, file };
    spec.emit_layers(&mut sink, &Progress { quiet: true }).context("making the conf's layer")?;
    drop(sink);
    progress.say(format!("listing layer {}", index + 1));
    listing(File::open(&path)?).context("reading the conf's layer")
}
