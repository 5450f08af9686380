//! Reading images: Docker archives (`docker save`, our streams, merged archives), OCI archives
//! (plain, gzip or zstd) and OCI layout directories. One index of an archive's members serves
//! every reader (base images, export, run-as-root, merge, push), with one rule for names and
//! links; [`open_image`] finds an image's layers by one selection rule.
//!
//! A compressed archive cannot be read at random and its manifest may come last (ours put it
//! there), so one pass indexes every member and keeps the small ones that look like JSON, up to
//! a total budget; metadata past the budget is read again when asked for (by offset in a plain
//! archive, by another pass in a compressed one). Memory is bounded whatever the archive holds.

use crate::compress::{detect, open_decompressed, Compression};
use crate::util::files::TempDir;
use crate::util::limits::{check_regular, parse_json, read_limited, METADATA_VALUES};
pub use crate::util::limits::JSON_LIMIT;
use crate::util::hex;
use crate::tar::name::{normalize_text, symlink_target};
use crate::tar::read::{self, Reader};
use crate::tar::{LNKTYPE, SYMTYPE};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What the first pass keeps of small JSON-looking members, in all.
const KEEP_BUDGET: u64 = 16 << 20;
/// Members an image archive may have; real ones have a few per layer.
pub const MAX_MEMBERS: usize = 200_000;
/// Links followed to find the member holding the bytes.
const MAX_HOPS: usize = 32;

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64, digest: Option<[u8; 32]> },
    Link(String),
}

/// A member holding bytes, links followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    /// Where its data starts in the uncompressed archive.
    pub offset: u64,
    pub size: u64,
}

/// The members of an image archive.
#[derive(Debug)]
pub struct ArchiveIndex {
    pub path: PathBuf,
    pub compressed: bool,
    members: HashMap<String, Member>,
    kept: HashMap<String, Vec<u8>>,
}

fn looks_like_json(head: &[u8]) -> bool {
    head.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b == b'{' || b == b'[')
}

/// Opens a tar for one pass, seeking over data when the file is plain.
enum Pass {
    Plain(Reader<BufReader<File>>),
    Stream(Reader<Box<dyn Read>>),
}

impl Pass {
    fn open(path: &Path, compressed: bool) -> Result<Pass> {
        Ok(if compressed {
            Pass::Stream(Reader::new(open_decompressed(path)?))
        } else {
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let len = f.metadata()?.len();
            Pass::Plain(Reader::seekable(BufReader::with_capacity(1 << 16, f), len))
        })
    }

    fn next(&mut self) -> read::Result<Option<read::Entry>> {
        match self {
            Pass::Plain(r) => r.next(),
            Pass::Stream(r) => r.next(),
        }
    }

    fn data(&mut self) -> &mut dyn Read {
        match self {
            Pass::Plain(r) => r,
            Pass::Stream(r) => r,
        }
    }
}

impl ArchiveIndex {
    /// Indexes the archive at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, false)
    }

    /// Indexes the archive and hashes every file member (what `merge` names layers by).
    pub fn load_hashing(path: &Path) -> Result<Self> {
        Self::load_with(path, true)
    }

    fn load_with(path: &Path, hashing: bool) -> Result<Self> {
        check_regular(path)?;
        let mut head = [0u8; 8];
        let n = File::open(path).and_then(|mut f| f.read(&mut head)).with_context(|| format!("cannot read {}", path.display()))?;
        let compressed = crate::compress::detect(&head[..n]) != crate::compress::Compression::None;
        let mut idx = ArchiveIndex { path: path.to_owned(), compressed, members: HashMap::new(), kept: HashMap::new() };
        let mut kept_bytes = 0u64;
        let mut pass = Pass::open(path, compressed)?;
        let mut buf = vec![0u8; 1 << 16];
        let mut count = 0usize;
        while let Some(e) = pass.next().map_err(|e| idx.bad(e))? {
            count += 1;
            if count > MAX_MEMBERS {
                bail!("{}: more than {MAX_MEMBERS} members; not an image archive", path.display());
            }
            let name = match normalize_text(&e.name) {
                Ok(Some(n)) => n,
                // Manifests name members in JSON: a name that is not UTF-8 is never asked for.
                Ok(None) => continue,
                Err(err) => bail!("{}: member {:?}: {err}", path.display(), e.name_lossy()),
            };
            let member = match e.kind {
                SYMTYPE => Member::Link(symlink_target(&name, &e.link).map_err(|err| anyhow!("{}: member {name}: {err}", path.display()))?),
                LNKTYPE => match normalize_text(&e.link) {
                    Ok(Some(t)) => Member::Link(t),
                    Ok(None) => continue,
                    Err(err) => bail!("{}: member {name}: hard link target: {err}", path.display()),
                },
                _ if e.is_file() => {
                    let mut hasher = hashing.then(Sha256::new);
                    let mut keep: Option<Vec<u8>> = None;
                    let mut read_so_far = 0u64;
                    if hasher.is_some() || (e.size <= JSON_LIMIT && kept_bytes + e.size <= KEEP_BUDGET) {
                        let r = pass.data();
                        loop {
                            let k = match r.read(&mut buf) {
                                Ok(0) => break,
                                Ok(k) => k,
                                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                                Err(err) => bail!("{}: member {name}: {}", path.display(), read::Error::Io(err)),
                            };
                            if read_so_far == 0 && e.size <= JSON_LIMIT && kept_bytes + e.size <= KEEP_BUDGET && looks_like_json(&buf[..k]) {
                                keep = Some(Vec::with_capacity(e.size as usize));
                            }
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[..k]);
                            }
                            if let Some(kv) = keep.as_mut() {
                                kv.extend_from_slice(&buf[..k]);
                            }
                            read_so_far += k as u64;
                            if hasher.is_none() && keep.is_none() {
                                break;
                            }
                        }
                    }
                    match keep {
                        Some(data) => {
                            kept_bytes += data.len() as u64;
                            idx.kept.insert(name.clone(), data);
                        }
                        // A later member of the same name replaces what was kept of an earlier one.
                        None => {
                            idx.kept.remove(&name);
                        }
                    }
                    Member::File { offset: e.data_offset, size: e.size, digest: hasher.map(|h| h.finalize().into()) }
                }
                _ => continue,
            };
            if matches!(member, Member::Link(_)) {
                idx.kept.remove(&name);
            }
            idx.members.insert(name, member);
        }
        Ok(idx)
    }

    fn bad(&self, e: read::Error) -> anyhow::Error {
        anyhow!("{}: not a valid tar archive: {e}", self.path.display())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// Whether the archive holds an OCI layout (`index.json`) whose images' layers are all
    /// compressed (gzip or zstd media types). Such an archive that has a Docker `manifest.json`
    /// too (stevedore's oci-archives; Docker 25+'s `docker save` has one with the containerd
    /// store) is read through its index, its blobs taken as they are; one with plain layers (the
    /// classic store's `docker save`) as a Docker archive. False if the index cannot be read.
    pub fn oci_layers_compressed(&self) -> bool {
        fn compressed(idx: &ArchiveIndex, desc: &Value, depth: u32) -> Option<bool> {
            let digest = desc.get("digest")?.as_str()?.strip_prefix("sha256:")?;
            let doc = idx.json(&format!("blobs/sha256/{digest}")).ok()?;
            let children = match doc.get("manifests") {
                Some(list) if depth < 4 => list.as_array()?.iter().map(|d| compressed(idx, d, depth + 1)).collect::<Option<Vec<_>>>()?,
                Some(_) => return None,
                None => doc.get("layers")?.as_array()?.iter().map(|l| l.get("mediaType")?.as_str().map(|t| t.ends_with("gzip") || t.ends_with("zstd"))).collect::<Option<Vec<_>>>()?,
            };
            Some(!children.is_empty() && children.iter().all(|&c| c))
        }
        let Ok(index) = self.json("index.json") else { return false };
        let Some(list) = index.get("manifests").and_then(Value::as_array).filter(|l| !l.is_empty()) else { return false };
        list.iter().all(|d| compressed(self, d, 0) == Some(true))
    }

    /// Follows links from member `name` (as a manifest names it) to the member holding bytes.
    pub fn resolve(&self, name: &str) -> Result<Resolved> {
        let mut name = normalize_text(name.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| anyhow!("{}: {name:?} is not a member name", self.path.display()))?;
        for _ in 0..MAX_HOPS {
            match self.members.get(&name) {
                Some(Member::File { offset, size, .. }) => return Ok(Resolved { name, offset: *offset, size: *size }),
                Some(Member::Link(target)) => name = target.clone(),
                None => bail!("{}: it has no member {name:?}", self.path.display()),
            }
        }
        bail!("{}: too many links resolving {name:?}", self.path.display())
    }

    /// The sha256 of a file member's bytes (indexes made by [`Self::load_hashing`]).
    pub fn digest(&self, member: &str) -> Option<String> {
        match self.members.get(member) {
            Some(Member::File { digest: Some(d), .. }) => Some(hex(d)),
            _ => None,
        }
    }

    /// The bytes of metadata member `name` (at most [`JSON_LIMIT`]).
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let m = self.resolve(name)?;
        if let Some(data) = self.kept.get(&m.name) {
            return Ok(data.clone());
        }
        if m.size > JSON_LIMIT {
            bail!("{}: {name} is {} bytes, too large to be image metadata (the limit is {} MiB)", self.path.display(), m.size, JSON_LIMIT >> 20);
        }
        let mut data = Vec::with_capacity(m.size as usize);
        self.open_member(&m)?.read_to_end(&mut data).with_context(|| format!("{}: cannot read {name}", self.path.display()))?;
        Ok(data)
    }

    /// Member `name` parsed as JSON.
    pub fn json(&self, name: &str) -> Result<Value> {
        let data = self.bytes(name)?;
        parse_json(&data, METADATA_VALUES).map_err(|e| anyhow!("{}: {name}: {e:#}", self.path.display()))
    }

    /// A reader of one member's bytes: in place in a plain archive, else by a pass to it.
    pub fn open_member(&self, m: &Resolved) -> Result<Box<dyn Read + '_>> {
        if !self.compressed {
            let f = File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
            return Ok(Box::new(crate::image::read::Region::new(f, m.offset, m.size)));
        }
        let mut pass = Pass::open(&self.path, true)?;
        while let Some(e) = pass.next().map_err(|e| self.bad(e))? {
            if e.data_offset == m.offset && e.is_file() {
                let Pass::Stream(r) = pass else { unreachable!("compressed archives are streamed") };
                return Ok(Box::new(r.take(m.size)));
            }
        }
        bail!("{}: member {} vanished between reads", self.path.display(), m.name)
    }

    /// Calls `f` with each wanted file member (by resolved name) in archive order, each once,
    /// with a reader of exactly its bytes; stops early once all were seen or `f` says so.
    pub fn for_each_wanted(&self, wanted: &[String], mut f: impl FnMut(&str, &mut dyn Read) -> Result<bool>) -> Result<()> {
        let mut left: std::collections::HashSet<&str> = wanted.iter().map(String::as_str).collect();
        if left.is_empty() {
            return Ok(());
        }
        let mut pass = Pass::open(&self.path, self.compressed)?;
        while let Some(e) = pass.next().map_err(|e| self.bad(e))? {
            if !e.is_file() {
                continue;
            }
            let Ok(Some(name)) = normalize_text(&e.name) else { continue };
            // Only the member the index kept under this name (a later one of the same name
            // replaced it, as extraction would).
            let is_it = matches!(self.members.get(&name), Some(Member::File { offset, .. }) if *offset == e.data_offset);
            if is_it && left.remove(name.as_str()) {
                if !f(&name, pass.data())? {
                    return Ok(());
                }
                if left.is_empty() {
                    return Ok(());
                }
            }
        }
        if let Some(missing) = left.iter().next() {
            bail!("{}: member {missing} vanished between reads", self.path.display());
        }
        Ok(())
    }
}

/// A region of a file, readable and seekable as a file of its own.
pub struct Region {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Region {
    pub fn new(file: File, start: u64, len: u64) -> Self {
        Region { file, start, len, pos: 0 }
    }
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        let k = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        if k == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends inside a member"));
        }
        self.pos += k as u64;
        Ok(k)
    }
}

impl Seek for Region {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

/// Which image of a Docker archive (an entry of its `manifest.json`) to take, as skopeo's
/// `docker-archive:PATH[:{NAME:TAG|@N}]` names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchivePick {
    /// The image with this `RepoTags` entry (compared normalised: `app:v1` is
    /// `docker.io/library/app:v1`).
    Tagged(String),
    /// The image at this 0-based position of `manifest.json`.
    At(usize),
}

impl ArchivePick {
    /// `@N` or `NAME[:TAG]` (the tag `latest` if none).
    pub fn parse(s: &str) -> Result<ArchivePick> {
        if let Some(n) = s.strip_prefix('@') {
            return n.parse().map(ArchivePick::At).map_err(|_| anyhow!("image index {s:?}: '@' and a number from 0"));
        }
        crate::image::reference::check_repo_tag(s)?;
        Ok(ArchivePick::Tagged(s.to_string()))
    }

    /// `NAME:TAG` if a name was given (`Selector::wanted`), else the first image, as nixpkgs
    /// takes a base image's.
    pub fn named_or_first(wanted: Option<&str>) -> ArchivePick {
        wanted.map_or(ArchivePick::At(0), |w| ArchivePick::Tagged(w.to_string()))
    }
}

/// The entry of a Docker archive's `manifest.json` that `pick` names; with none, the only one
/// (several are an error that lists them: nothing is taken silently). An unknown name lists
/// the names there are.
pub fn select_manifest_entry<'m>(manifest: &'m Value, pick: Option<&ArchivePick>, path: &Path) -> Result<&'m Value> {
    let images = manifest.as_array().ok_or_else(|| anyhow!("{}: manifest.json is not a list", path.display()))?;
    let tags = |i: &'m Value| i["RepoTags"].as_array().into_iter().flatten().filter_map(Value::as_str);
    let listed = || {
        let all: Vec<String> = images
            .iter()
            .enumerate()
            .map(|(n, i)| {
                let t: Vec<&str> = tags(i).collect();
                format!("@{n} {}", if t.is_empty() { "untagged".to_string() } else { t.join(" ") })
            })
            .collect();
        all.join(", ")
    };
    let normal = |t: &str| crate::image::reference::normalized_repo_tag(t).unwrap_or_else(|_| t.to_string());
    match pick {
        Some(ArchivePick::Tagged(wanted)) => {
            let want = normal(wanted);
            images.iter().find(|i| tags(i).any(|t| normal(t) == want)).ok_or_else(|| {
                let all: Vec<&str> = images.iter().flat_map(tags).collect();
                let all = if all.is_empty() { "no tags".to_string() } else { all.join(", ") };
                anyhow!("{}: no image tagged {wanted} (it has: {all})", path.display())
            })
        }
        Some(ArchivePick::At(n)) => images.get(*n).ok_or_else(|| match images.len() {
            0 => anyhow!("{}: manifest.json lists no image", path.display()),
            k => anyhow!("{}: no image @{n}: manifest.json lists {k} (@0 to @{})", path.display(), k - 1),
        }),
        None => match images.as_slice() {
            [] => bail!("{}: manifest.json lists no image", path.display()),
            [only] => Ok(only),
            _ => bail!("{}: it holds {} images; name one as :NAME:TAG or :@N ({})", path.display(), images.len(), listed()),
        },
    }
}

/// `sha256:` and 64 lowercase hex digits, as a digest naming a layer or blob must be (it
/// becomes part of member and file names).
pub fn check_sha256_digest(d: &str) -> Result<&str> {
    if !crate::image::reference::is_sha256_digest(d) {
        bail!("digest {d:?} is not sha256: and 64 lowercase hex digits");
    }
    Ok(&d["sha256:".len()..])
}

/// One layer's uncompressed tar: `len` bytes at `offset` in `path` (a layer member inside a
/// plain archive is read in place).
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// How the image names it (member path or digest), for messages.
    pub what: String,
}

/// An image's layers, bottom first, with the scratch directory holding decompressed ones.
pub struct OpenedImage {
    pub layers: Vec<LayerBlob>,
    _scratch: TempDir,
}

/// Which image of a multi-image archive or layout to take.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub name: Option<String>,
    pub tag: Option<String>,
}

impl Selector {
    /// `name:tag` (the tag defaults to `latest`), if a name was given.
    pub fn wanted(&self) -> Option<String> {
        self.name.as_ref().map(|n| format!("{n}:{}", self.tag.as_deref().unwrap_or("latest")))
    }
}

/// Where an OCI image's JSON and blobs come from: a layout directory or an archive (an
/// oci-archive's members). Every OCI reader (export, run-as-root, base images, push) reads through it.
pub enum OciStore<'a> {
    Dir(&'a Path),
    Archive(&'a ArchiveIndex),
}

impl OciStore<'_> {
    /// The layout or archive, for messages: `OCI layout DIR`, `oci-archive FILE`.
    pub fn what(&self) -> String {
        match self {
            OciStore::Dir(dir) => format!("OCI layout {}", dir.display()),
            OciStore::Archive(idx) => format!("oci-archive {}", idx.path.display()),
        }
    }

    /// The bytes of metadata file `name` (`index.json`, `blobs/sha256/HEX`), at most [`JSON_LIMIT`].
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        match self {
            OciStore::Dir(dir) => read_limited(&dir.join(name), JSON_LIMIT),
            OciStore::Archive(idx) => idx.bytes(name),
        }
    }

    pub fn json(&self, name: &str) -> Result<Value> {
        match self {
            OciStore::Dir(dir) => {
                let p = dir.join(name);
                let data = read_limited(&p, JSON_LIMIT)?;
                parse_json(&data, METADATA_VALUES).map_err(|e| anyhow!("{}: {e:#}", p.display()))
            }
            OciStore::Archive(idx) => idx.json(name),
        }
    }

    /// The size of blob file or member `name`.
    pub fn size(&self, name: &str) -> Result<u64> {
        match self {
            OciStore::Dir(dir) => Ok(fs::metadata(dir.join(name)).with_context(|| format!("{}: {name}", self.what()))?.len()),
            OciStore::Archive(idx) => Ok(idx.resolve(name).with_context(|| format!("{}: no {name}", self.what()))?.size),
        }
    }
}

/// The file or member name of blob `digest` (checked to be `sha256:` and 64 hex digits).
pub fn blob_name(digest: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", check_sha256_digest(digest)?))
}

const INDEX_TYPES: [&str; 2] = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// The manifest of the image an OCI index (`index.json`) points to, chosen by
/// [`select_index_entry`] (in a multi-platform index, this machine's platform, else the first),
/// with its digest. Every document read on the way must match the digest that names it.
pub fn oci_manifest(src: &OciStore, sel: &Selector, what: &Path) -> Result<(Value, String)> {
    let index = src.json("index.json")?;
    let wanted = sel.name.as_deref().map(|n| IndexRef::Name(n, sel.tag.as_deref()));
    let chosen = select_index_entry(&index, wanted, &what.display().to_string())?;
    let mut desc = chosen.clone();
    for _ in 0..4 {
        let media = desc["mediaType"].as_str().unwrap_or("");
        let digest = desc["digest"].as_str().ok_or_else(|| anyhow!("{}: a descriptor has no digest", what.display()))?.to_string();
        let name = blob_name(&digest)?;
        let bytes = src.bytes(&name)?;
        if crate::util::sha256_digest(&bytes) != digest {
            bail!("{}: {name} does not match its digest", what.display());
        }
        let doc: Value = parse_json(&bytes, METADATA_VALUES).map_err(|e| anyhow!("{}: {name}: {e:#}", what.display()))?;
        let is_index = INDEX_TYPES.contains(&media) || (media.is_empty() && doc.get("manifests").is_some());
        if !is_index {
            return Ok((doc, digest));
        }
        // A multi-platform index: take this machine's platform, else the first.
        let list = doc["manifests"].as_array().ok_or_else(|| anyhow!("{}: index {digest} lists no manifests", what.display()))?;
        let native = list.iter().find(|m| m.pointer("/platform/os").and_then(Value::as_str) == Some("linux") && m.pointer("/platform/architecture").and_then(Value::as_str) == Some(crate::util::shared::host_go_arch()));
        desc = native.or(list.first()).cloned().ok_or_else(|| anyhow!("{}: index {digest} is empty", what.display()))?;
    }
    bail!("{}: indexes nested too deeply", what.display())
}

/// What an OCI index entry names its image by: the fully qualified `REGISTRY/REPO:TAG`, from
/// `io.containerd.image.name` (containerd's, and ours) or a `org.opencontainers.image.ref.name`
/// that is a whole `NAME:TAG` (what stevedore wrote before it wrote containerd's form), and the
/// tag, from a bare-tag `ref.name` (the OCI form: skopeo's `oci:DIR:TAG`, ours) or the name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EntryName {
    pub full: Option<String>,
    pub tag: Option<String>,
}

impl EntryName {
    pub fn of(m: &Value) -> EntryName {
        let ann = |k: &str| m.get("annotations").and_then(|a| a.get(k)).and_then(Value::as_str);
        let normal = |n: &str| crate::image::reference::normalized_repo_tag(n).unwrap_or_else(|_| n.to_string());
        let ref_name = ann("org.opencontainers.image.ref.name");
        let bare = ref_name.filter(|r| !r.contains([':', '/']));
        let full = ann("io.containerd.image.name").or(ref_name.filter(|r| bare != Some(r))).map(normal);
        let tag = bare.map(str::to_owned).or_else(|| full.as_deref().and_then(crate::image::reference::tag_of).map(str::to_owned));
        EntryName { full, tag }
    }

    /// How messages list it: the name as Docker prints it, else the tag.
    fn shown(&self) -> Option<&str> {
        self.full.as_deref().map(crate::image::reference::familiar).or(self.tag.as_deref())
    }
}

/// How an image of an OCI index is asked for.
#[derive(Debug, Clone, Copy)]
pub enum IndexRef<'a> {
    /// As skopeo reads `oci:DIR:REF`: `NAME:TAG` (or a `NAME` with a `/`), else a bare tag.
    Ref(&'a str),
    /// A name and maybe a tag (`latest` if none), as `fromImageName` and `fromImageTag` give
    /// them. Without a tag the name may also be an entry's bare `ref.name`, as skopeo's
    /// `oci:DIR:NAME` writes one.
    Name(&'a str, Option<&'a str>),
}

/// The layer blob names of the image an OCI index (`index.json`) points to.
fn oci_layers(src: &OciStore, sel: &Selector, what: &Path) -> Result<Vec<String>> {
    let (doc, digest) = oci_manifest(src, sel, what)?;
    let layers = doc["layers"].as_array().ok_or_else(|| anyhow!("{}: manifest {digest} has no layers", what.display()))?;
    layers
        .iter()
        .map(|l| blob_name(l["digest"].as_str().ok_or_else(|| anyhow!("{}: a layer has no digest", what.display()))?))
        .collect()
}

/// The entry of an OCI index (`index.json`'s `manifests`) an image is asked for by, with one rule
/// for every reader (export, run-as-root, base images, push):
///
/// - by name (`NAME:TAG`): the entries of that name, compared normalised (`app:v1` is
///   `docker.io/library/app:v1`); if none has it, the entries named by a bare tag alone that
///   is TAG (or the NAME given without a tag, see [`IndexRef::Name`]);
/// - by a bare `TAG`, as skopeo's `oci:DIR:TAG`: the entries with that tag, whatever their name;
/// - nothing: the only entry.
///
/// No match, or several entries of different images, is an error that lists the names.
pub fn select_index_entry<'m>(index: &'m Value, wanted: Option<IndexRef>, what: &str) -> Result<&'m Value> {
    let manifests = index.get("manifests").and_then(Value::as_array).ok_or_else(|| anyhow!("{what}: index.json lists no manifests"))?;
    let named: Vec<EntryName> = manifests.iter().map(EntryName::of).collect();
    let names = || {
        let mut n: Vec<&str> = named.iter().filter_map(EntryName::shown).collect();
        n.dedup();
        if n.is_empty() { "none named".to_string() } else { n.join(", ") }
    };
    let Some(wanted) = wanted else {
        return match manifests.as_slice() {
            [] => bail!("{what}: index.json lists no manifests"),
            [only] => Ok(only),
            _ => bail!("{what}: index.json lists {} images; name one (names: {})", manifests.len(), names()),
        };
    };
    // The name wanted (normalised), if any, and the bare tag that may stand for it.
    let normal = |n: &str| crate::image::reference::normalized_repo_tag(n).map_err(|e| anyhow!("{what}: {e}"));
    let (full, bare, wanted) = match wanted {
        IndexRef::Ref(r) if r.contains([':', '/']) => {
            let (name, tag) = crate::image::reference::normalized_name_tag(r).map_err(|e| anyhow!("{what}: {e}"))?;
            (Some(format!("{name}:{tag}")), tag, r.to_string())
        }
        IndexRef::Ref(r) => (None, r.to_string(), r.to_string()),
        IndexRef::Name(n, t) => {
            let given = format!("{n}:{}", t.unwrap_or("latest"));
            (Some(normal(&given)?), t.unwrap_or(n).to_string(), given)
        }
    };
    let pick = |keep: &dyn Fn(&EntryName) -> bool| -> Vec<&'m Value> { manifests.iter().zip(&named).filter(|(_, n)| keep(n)).map(|(m, _)| m).collect() };
    let by_tag = |n: &EntryName| n.tag.as_deref() == Some(bare.as_str());
    let found = match &full {
        Some(full) => {
            let by_name = pick(&|n| n.full.as_deref() == Some(full.as_str()));
            if by_name.is_empty() { pick(&|n| n.full.is_none() && by_tag(n)) } else { by_name }
        }
        None => pick(&by_tag),
    };
    match found.as_slice() {
        [] => bail!("{what}: no image named {wanted} (names: {})", names()),
        [one] => Ok(one),
        [one, rest @ ..] if rest.iter().all(|m| m.get("digest") == one.get("digest")) => Ok(one),
        many => bail!("{what}: {} images match {wanted}; name one of them in full (names: {})", many.len(), names()),
    }
}

/// The layer member names of the image a Docker archive's `manifest.json` lists.
fn docker_layers(idx: &ArchiveIndex, sel: &Selector) -> Result<Vec<String>> {
    let manifest = idx.json("manifest.json")?;
    let image = select_manifest_entry(&manifest, Some(&ArchivePick::named_or_first(sel.wanted().as_deref())), &idx.path)?;
    image["Layers"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: manifest.json has no \"Layers\"", idx.path.display()))?
        .iter()
        .map(|l| l.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{}: a layer path is not a string", idx.path.display())))
        .collect()
}

/// Copies `r` (decompressing it if it is gzip or zstd) into a new scratch file.
fn decompress_to(r: impl Read, dest: &Path, what: &str) -> Result<u64> {
    let (_, mut reader) = crate::compress::decoder(r).with_context(|| format!("cannot read {what}"))?;
    let mut out = BufWriter::new(File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?);
    let n = io::copy(&mut reader, &mut out).with_context(|| format!("cannot decompress {what}"))?;
    out.flush().with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(n)
}

/// Opens a base image: a Docker archive (plain, gzip or zstd), an OCI archive, or an OCI
/// layout directory. Compressed layers are decompressed into a scratch directory under
/// `scratch`, which lives as long as the returned value.
pub fn open_image(path: &Path, sel: &Selector, scratch: &Path, quiet: bool) -> Result<OpenedImage> {
    let tmp = TempDir::new_in(scratch)?;
    let say = |s: String| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let meta = std::fs::metadata(path).with_context(|| format!("cannot open image {}", path.display()))?;
    let mut layers = Vec::new();
    if meta.is_dir() {
        let names = oci_layers(&OciStore::Dir(path), sel, path)?;
        for (i, name) in names.iter().enumerate() {
            let file = path.join(name);
            check_regular(&file)?;
            let mut f = File::open(&file).with_context(|| format!("cannot open layer {}", file.display()))?;
            let mut head = [0u8; 4];
            let n = f.read(&mut head).with_context(|| format!("cannot read {}", file.display()))?;
            if detect(&head[..n]) == Compression::None {
                let len = f.metadata()?.len();
                layers.push(LayerBlob { path: file, offset: 0, len, what: name.clone() });
            } else {
                say(format!("Decompressing layer {} ({name})...", i + 1));
                let dest = tmp.0.join(format!("layer-{i}.tar"));
                f.seek(SeekFrom::Start(0))?;
                let len = decompress_to(f, &dest, name)?;
                layers.push(LayerBlob { path: dest, offset: 0, len, what: name.clone() });
            }
        }
        return Ok(OpenedImage { layers, _scratch: tmp });
    }

    let idx = ArchiveIndex::load(path)?;
    let names = if idx.contains("manifest.json") {
        docker_layers(&idx, sel)?
    } else if idx.contains("index.json") {
        oci_layers(&OciStore::Archive(&idx), sel, path)?
    } else {
        bail!("{}: neither a Docker archive (no manifest.json) nor an OCI archive (no index.json)", path.display());
    };
    let resolved: Vec<Resolved> = names.iter().map(|n| idx.resolve(n)).collect::<Result<_>>()?;
    // A member may serve several layers; each is read or decompressed once.
    let mut done: HashMap<String, LayerBlob> = HashMap::new();
    if idx.compressed {
        let mut wanted: Vec<String> = resolved.iter().map(|r| r.name.clone()).collect();
        wanted.sort();
        wanted.dedup();
        say(format!("Decompressing {} layers of {}...", wanted.len(), path.display()));
        idx.for_each_wanted(&wanted, |name, r| {
            let dest = tmp.0.join(format!("layer-{}.tar", done.len()));
            let len = decompress_to(r, &dest, name)?;
            done.insert(name.to_owned(), LayerBlob { path: dest, offset: 0, len, what: name.to_owned() });
            Ok(true)
        })?;
    } else {
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for m in &resolved {
            if done.contains_key(&m.name) {
                continue;
            }
            let mut head = [0u8; 4];
            let n = f.read_at(&mut head[..m.size.min(4) as usize], m.offset)?;
            let blob = if detect(&head[..n]) == Compression::None {
                LayerBlob { path: path.to_owned(), offset: m.offset, len: m.size, what: m.name.clone() }
            } else {
                say(format!("Decompressing layer {}...", m.name));
                let dest = tmp.0.join(format!("layer-{}.tar", done.len()));
                let len = decompress_to(Region::new(f.try_clone()?, m.offset, m.size), &dest, &m.name)?;
                LayerBlob { path: dest, offset: 0, len, what: m.name.clone() }
            };
            done.insert(m.name.clone(), blob);
        }
    }
    for m in &resolved {
        let blob = done.get(&m.name).ok_or_else(|| anyhow!("{}: layer member {} vanished between reads", path.display(), m.name))?;
        layers.push(blob.clone());
    }
    Ok(OpenedImage { layers, _scratch: tmp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_picks_index_entries() {
        let old = |name: &str, digest: &str| serde_json::json!({"digest": digest, "annotations": {"org.opencontainers.image.ref.name": name}});
        let new = |full: &str, tag: &str, digest: &str| {
            serde_json::json!({"digest": digest, "annotations": {"io.containerd.image.name": full, "org.opencontainers.image.ref.name": tag}})
        };
        // As stevedore wrote layouts before (the name in both), as it and containerd write them
        // now, and a bare tag as skopeo's `oci:DIR:TAG` writes it.
        let index = serde_json::json!({"manifests": [
            old("team/app:v1", "sha256:a"),
            new("docker.io/team/app:v2", "v2", "sha256:b"),
            old("v1", "sha256:c"),
            new("docker.io/library/hello:v3", "v3", "sha256:d"),
            new("docker.io/library/other:v3", "v3", "sha256:e"),
            serde_json::json!({"digest": "sha256:f", "annotations": {"io.containerd.image.name": "hello:v4"}}),
        ]});
        let pick = |w: &str| select_index_entry(&index, Some(IndexRef::Ref(w)), "x").map(|m| m["digest"].as_str().unwrap().to_string());
        for (w, digest) in [
            ("team/app:v2", "sha256:b"),
            ("docker.io/team/app:v2", "sha256:b"),
            ("team/app:v1", "sha256:a"),
            ("hello:v3", "sha256:d"),
            ("docker.io/library/other:v3", "sha256:e"),
            ("hello:v4", "sha256:f"),
            ("v2", "sha256:b"),
            // No entry has this name; one is named by its tag alone.
            ("somebody/else:v1", "sha256:c"),
        ] {
            assert_eq!(pick(w).unwrap(), digest, "{w}");
        }
        // A bare tag that two images have: ambiguous, the error lists the names.
        let e = pick("v1").unwrap_err().to_string();
        assert!(e.contains("2 images match v1") && e.contains("team/app:v1, team/app:v2, v1, hello:v3, other:v3, hello:v4"), "{e}");
        assert!(pick("v3").unwrap_err().to_string().contains("2 images match v3"));
        assert!(pick("nope").unwrap_err().to_string().starts_with("x: no image named nope"));
        assert!(pick("hello:v2").unwrap_err().to_string().starts_with("x: no image named hello:v2"));
        assert!(pick("Bad:v1").unwrap_err().to_string().contains("lowercase"));
        // By name (fromImageName, export --from-image-name): the tag is latest if none, and a
        // name without a tag may be an entry's bare ref.name (skopeo's oci:DIR:NAME).
        let by_name = |n: &str, t: Option<&str>| select_index_entry(&index, Some(IndexRef::Name(n, t)), "x").map(|m| m["digest"].as_str().unwrap().to_string());
        assert_eq!(by_name("hello", Some("v3")).unwrap(), "sha256:d");
        assert_eq!(by_name("nobody", Some("v2")).unwrap_err().to_string().lines().count(), 1);
        let skopeo = serde_json::json!({"manifests": [old("x", "sha256:a"), new("docker.io/library/y:latest", "latest", "sha256:b")]});
        let pick_in = |n: &str, t: Option<&str>| select_index_entry(&skopeo, Some(IndexRef::Name(n, t)), "x").map(|m| m["digest"].as_str().unwrap().to_string());
        assert_eq!(pick_in("x", None).unwrap(), "sha256:a");
        assert_eq!(pick_in("y", None).unwrap(), "sha256:b");
        assert!(pick_in("x", Some("latest")).unwrap_err().to_string().contains("no image named x:latest (names: x, y:latest)"));
        // Unnamed: only a single image is taken.
        assert!(select_index_entry(&index, None, "x").unwrap_err().to_string().contains("lists 6 images"));
        let one = serde_json::json!({"manifests": [old("a:b", "sha256:d")]});
        assert!(select_index_entry(&one, None, "x").is_ok());
    }

    #[test]
    fn one_rule_picks_docker_archive_images() {
        let m = serde_json::json!([{"RepoTags": ["team/one:v1"]}, {"RepoTags": null}, {"RepoTags": ["two:v2", "docker.io/two:v3"]}]);
        let path = Path::new("m.tar");
        let pick = |p: Option<&str>| {
            let p = p.map(|p| ArchivePick::parse(p).unwrap());
            select_manifest_entry(&m, p.as_ref(), path).map(|e| m.as_array().unwrap().iter().position(|x| x == e).unwrap())
        };
        for (p, at) in [("team/one:v1", 0), ("docker.io/team/one:v1", 0), ("two:v3", 2), ("docker.io/library/two:v2", 2), ("@1", 1), ("@0", 0)] {
            assert_eq!(pick(Some(p)).unwrap(), at, "{p}");
        }
        let e = pick(None).unwrap_err().to_string();
        assert_eq!(e, "m.tar: it holds 3 images; name one as :NAME:TAG or :@N (@0 team/one:v1, @1 untagged, @2 two:v2 docker.io/two:v3)");
        assert_eq!(pick(Some("one:v1")).unwrap_err().to_string(), "m.tar: no image tagged one:v1 (it has: team/one:v1, two:v2, docker.io/two:v3)");
        assert_eq!(pick(Some("@3")).unwrap_err().to_string(), "m.tar: no image @3: manifest.json lists 3 (@0 to @2)");
        for bad in ["@", "@-1", "@x", "Two:v2", "a:b@sha256:00"] {
            assert!(ArchivePick::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ArchivePick::named_or_first(None), ArchivePick::At(0));
        let one = serde_json::json!([{"RepoTags": ["a:b"]}]);
        assert!(select_manifest_entry(&one, None, path).is_ok());
    }

    fn archive(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        for (name, target) in links {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, name, target).unwrap();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        f
    }

    #[test]
    fn links_resolve_and_json_is_read_past_the_budget() {
        let big = vec![b' '; 100];
        let f = archive(&[("./manifest.json", b"[{\"a\":1}]"), ("x/layer.tar", &big)], &[("y/layer.tar", "../x/layer.tar")]);
        let idx = ArchiveIndex::load(f.path()).unwrap();
        assert_eq!(idx.json("manifest.json").unwrap()[0]["a"], 1);
        assert_eq!(idx.resolve("y/layer.tar").unwrap().name, "x/layer.tar");
        // Not kept (not JSON), but read on demand in place.
        assert_eq!(idx.bytes("x/layer.tar").unwrap(), big);
        assert!(idx.resolve("../../etc/passwd").is_err());
    }

    #[test]
    fn compressed_archives_and_many_small_members_stay_bounded() {
        // Many JSON-looking members: more than the keep budget; all still readable.
        let body = format!("{{{}}}", " ".repeat((1 << 20) - 2));
        let names: Vec<String> = (0..20).map(|i| format!("m{i}.json")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), body.as_bytes())).collect();
        let f = archive(&entries, &[]);
        let gz = tempfile::NamedTempFile::new().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut enc, &std::fs::read(f.path()).unwrap()).unwrap();
        std::fs::write(gz.path(), enc.finish().unwrap()).unwrap();
        for path in [f.path(), gz.path()] {
            let idx = ArchiveIndex::load(path).unwrap();
            let kept: u64 = idx.kept.values().map(|v| v.len() as u64).sum();
            assert!(kept <= KEEP_BUDGET);
            assert_eq!(idx.bytes("m19.json").unwrap().len(), body.len());
            let mut seen = 0;
            idx.for_each_wanted(&names, |_, r| {
                seen += io::copy(r, &mut io::sink())?;
                Ok(true)
            })
            .unwrap();
            assert_eq!(seen, 20 * body.len() as u64);
        }
    }

    #[test]
    fn digests_must_be_lowercase_hex() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(check_sha256_digest(&ok).is_ok());
        assert!(check_sha256_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_sha256_digest(&format!("sha256:../../x/layer.tar{}", "a".repeat(47))).is_err());
        assert!(check_sha256_digest("sha512:00").is_err());
    }

    #[test]
    fn fifos_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(ArchiveIndex::load(&fifo).unwrap_err().to_string().contains("not a regular file"));
        assert!(crate::util::limits::read_limited(&fifo, 10).is_err());
    }
}
