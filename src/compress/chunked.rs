//! zstd:chunked layers, as containers-storage reads them for partial pulls: each regular file's
//! data in zstd frames of its own (pieces of at most [`PIECE`] bytes), the tar headers in the
//! frames between, and at the end three skippable frames: the table of contents (TOC: JSON,
//! zstd-compressed, one entry per member with its data's digest and frame offsets), the
//! tar-split (every byte of the tar that is not file data, as JSON lines, so that the exact
//! uncompressed tar, and so the diff_id, can be put back together from the files), and a footer
//! that locates both. Decoders skip skippable frames, so to every other client the layer is
//! plain zstd with the same diff_id.
//!
//! [`Layer`] follows one layer through the compression pipeline: on the caller's thread it cuts
//! the tar into pieces as it goes by ([`Layer::room`], [`Layer::feed`]); the pipeline's threads
//! compress the pieces and hash the data pieces ([`sums`]); as the pieces are written, in order,
//! it learns where each file's frames are ([`Layer::written`]); and it ends the layer with the
//! metadata frames and the descriptor's annotations ([`Layer::finish`]).
//!
//! Whatever the format, or Go's `archive/tar` that reads it back, would not represent exactly
//! (a name that is not UTF-8, two members of one name, sparse or unknown member types, times
//! with fractions, access times, ...) makes the layer plain zstd from there on: the frames
//! written are valid either way, and without the annotations clients pull the layer whole.

use crate::tar::{self, read};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{self, Write};

/// The most data one frame holds: a file's data is cut into frames of this size (each a chunk
/// of the TOC), which compress in parallel; headers between files are cut likewise.
pub const PIECE: usize = 4 << 20;
/// The most header bytes one member may have (its extended headers included), and the most
/// bytes after the end-of-archive blocks; more turns the layer plain.
const MAX_RUN: usize = 4 << 20;
const MAX_TRAILER: usize = 1 << 20;

pub const TOC_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
pub const TOC_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
pub const TAR_SPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";

/// What a piece of the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Tar headers, padding, the end of the archive, or anything after a fallback.
    Other,
    /// Data of the current regular file; `last` ends it, `whole` when it is the file's only piece.
    Data { last: bool, whole: bool },
}

/// What a compression thread learnt of a data piece: its SHA-256 and CRC-64, its length, and,
/// for a file of several pieces, the data itself (its SHA-256 taken whole, in order, when
/// written; the CRCs are combined instead, which takes them off the writing thread).
pub struct Sums {
    sha: [u8; 32],
    crc: u64,
    len: u64,
    data: Option<Vec<u8>>,
}

/// Hashes a data piece (on a compression thread, after compressing it); keeps the data if the
/// file has more pieces, else gives it back.
pub fn sums(role: Role, data: Vec<u8>) -> (Option<Sums>, Option<Vec<u8>>) {
    match role {
        Role::Other => (None, Some(data)),
        Role::Data { whole, .. } => {
            let (sha, crc, len) = (Sha256::digest(&data).into(), crc64(0, &data), data.len() as u64);
            let (kept, back) = if whole { (None, Some(data)) } else { (Some(data), None) };
            (Some(Sums { sha, crc, len, data: kept }), back)
        }
    }
}

/// Where the scanner is in the tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Collecting a member's headers into `run`: `need` more bytes complete what `step` waits for.
    Headers { need: usize, step: Step },
    /// In a regular file's data.
    Data { left: u64, size: u64, whole: bool },
    /// After the end-of-archive block.
    Trailer,
    /// Not following the tar any more: fixed-size pieces, no TOC.
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Padding,
    Block,
    Extension,
}

/// A frame of a file's data, once written.
struct Chunk {
    offset: u64,
    end: u64,
    size: u64,
    sha: [u8; 32],
}

/// A regular file's data as the writer learns it.
struct Data {
    chunks: Vec<Chunk>,
    /// Running hashes of a file of several pieces.
    sha: Option<Sha256>,
    crc: u64,
    /// Set when the last piece is written.
    done: Option<([u8; 32], u64)>,
}

/// A member (or the end of the archive) between being scanned and being entered in the TOC and
/// tar-split, which waits for its data's frames to be written.
struct Member {
    /// The raw bytes before its data: the previous file's padding, its headers.
    segment: Vec<u8>,
    /// None: the end of the archive (a segment only).
    entry: Option<Entry>,
}

struct Entry {
    name: String,
    size: u64,
    /// The TOC entry's fields up to `xattrs` (those taken from the header), JSON.
    fields: String,
    data: Option<Data>,
}

impl Member {
    fn complete(&self) -> bool {
        self.entry.as_ref().and_then(|e| e.data.as_ref()).is_none_or(|d| d.done.is_some())
    }
}

/// One zstd:chunked layer being written (see the module documentation).
pub struct Layer {
    scan: Scan,
    /// The current member's header bytes, the padding before them first.
    run: Vec<u8>,
    pad: usize,
    extensions: usize,
    names: HashSet<String>,
    /// Roles of the pieces dispatched and not written yet, oldest first.
    roles: VecDeque<Role>,
    queue: VecDeque<Member>,
    toc: zstd::stream::write::Encoder<'static, Vec<u8>>,
    toc_len: u64,
    entries: u64,
    split: zstd::stream::write::Encoder<'static, Vec<u8>>,
    split_len: u64,
    position: u64,
    /// Why the layer turned plain, if it did.
    plain: Option<String>,
}

impl Layer {
    pub fn new() -> io::Result<Layer> {
        let mut l = Layer {
            scan: Scan::Headers { need: 512, step: Step::Block },
            run: Vec::new(),
            pad: 0,
            extensions: 0,
            names: HashSet::new(),
            roles: VecDeque::new(),
            queue: VecDeque::new(),
            toc: zstd::stream::write::Encoder::new(Vec::new(), super::ZSTD_LEVEL)?,
            toc_len: 0,
            entries: 0,
            split: zstd::stream::write::Encoder::new(Vec::new(), super::ZSTD_LEVEL)?,
            split_len: 0,
            position: 0,
            plain: None,
        };
        l.toc_text(r#"{"version":1,"entries":["#)?;
        Ok(l)
    }

    /// Why the layer is plain zstd, if it is.
    pub fn plain(&self) -> Option<&str> {
        self.plain.as_deref()
    }

    fn fall_back(&mut self, why: String) {
        if self.plain.is_none() {
            self.plain = Some(why);
        }
        self.scan = Scan::Plain;
        self.queue.clear();
        self.run = Vec::new();
    }

    /// How many bytes may be added to a piece now holding `filled` bytes before the next
    /// decision (never 0: a full piece has been cut).
    pub fn room(&self, filled: usize) -> usize {
        let space = PIECE - filled;
        match self.scan {
            Scan::Headers { need, .. } => need.min(space),
            Scan::Data { left, .. } => (left.min(space as u64)) as usize,
            Scan::Trailer | Scan::Plain => space,
        }
    }

    /// Takes `bytes` (at most [`Layer::room`]), just added to a piece that now holds `filled`
    /// bytes; returns the piece's role if it must be cut here.
    pub fn feed(&mut self, bytes: &[u8], filled: usize) -> Option<Role> {
        let full = filled >= PIECE;
        match self.scan {
            Scan::Headers { need, step } => {
                self.run.extend_from_slice(bytes);
                let need = need - bytes.len();
                if need > 0 {
                    self.scan = Scan::Headers { need, step };
                    return full.then_some(Role::Other);
                }
                if let Some(cut) = self.step(step) {
                    return Some(cut);
                }
                full.then_some(Role::Other)
            }
            Scan::Data { left, size, whole } => {
                let left = left - bytes.len() as u64;
                self.scan = Scan::Data { left, size, whole };
                if left == 0 {
                    self.start_headers(tar::padding(size) as usize);
                    return Some(Role::Data { last: true, whole });
                }
                full.then_some(Role::Data { last: false, whole })
            }
            Scan::Trailer => {
                if self.run.len() + bytes.len() > MAX_TRAILER || bytes.iter().any(|&b| b != 0) {
                    self.fall_back("data after the end of the archive".into());
                } else {
                    self.run.extend_from_slice(bytes);
                }
                full.then_some(Role::Other)
            }
            Scan::Plain => full.then_some(Role::Other),
        }
    }

    fn start_headers(&mut self, pad: usize) {
        self.run.clear();
        self.pad = pad;
        self.extensions = 0;
        self.scan = if pad > 0 { Scan::Headers { need: pad, step: Step::Padding } } else { Scan::Headers { need: 512, step: Step::Block } };
    }

    /// What `step` waited for is in `run`: decides what comes next; a cut before a file's data.
    fn step(&mut self, step: Step) -> Option<Role> {
        let block_at = self.run.len().saturating_sub(512);
        match step {
            Step::Padding | Step::Extension => {
                self.scan = Scan::Headers { need: 512, step: Step::Block };
                None
            }
            Step::Block => {
                let block: [u8; 512] = self.run[block_at..].try_into().expect("a whole block");
                if block.iter().all(|&b| b == 0) {
                    if self.extensions > 0 {
                        self.fall_back("an extended header before the end of the archive".into());
                    } else {
                        self.scan = Scan::Trailer;
                    }
                    return None;
                }
                if read::check_checksum(&block, 0).is_err() {
                    self.fall_back("a header with a bad checksum".into());
                    return None;
                }
                if matches!(block[156], b'x' | b'g' | b'L' | b'K') {
                    let size = read::number(&block[124..136], "size", 0).ok().and_then(|s| usize::try_from(s).ok());
                    self.extensions += 1;
                    match size {
                        Some(size) if self.extensions <= 8 && self.run.len() + size < MAX_RUN => {
                            let need = size + tar::padding(size as u64) as usize;
                            self.scan = if need == 0 { Scan::Headers { need: 512, step: Step::Block } } else { Scan::Headers { need, step: Step::Extension } };
                        }
                        _ => self.fall_back("extended headers too large".into()),
                    }
                    return None;
                }
                self.member()
            }
        }
    }

    /// The member whose headers are in `run`: queued; a cut if its data follows.
    fn member(&mut self) -> Option<Role> {
        let entry = match toc_fields(&self.run[self.pad..]) {
            Ok(e) => e,
            Err(why) => {
                self.fall_back(why);
                return None;
            }
        };
        if !self.names.insert(clean(&entry.name)) {
            self.fall_back(format!("two members named {:?}", entry.name));
            return None;
        }
        let size = entry.size;
        let has_data = entry.data.is_some();
        self.queue.push_back(Member { segment: std::mem::take(&mut self.run), entry: Some(entry) });
        if has_data {
            self.scan = Scan::Data { left: size, size, whole: size <= PIECE as u64 };
            Some(Role::Other)
        } else {
            self.start_headers(0);
            None
        }
    }

    /// The stream ends: the end of the archive joins the queue (or the layer turns plain if the
    /// tar did not end as it should). Returns the last piece's role.
    pub fn end(&mut self) -> Role {
        match self.scan {
            Scan::Trailer => {
                let segment = std::mem::take(&mut self.run);
                self.queue.push_back(Member { segment, entry: None });
            }
            Scan::Plain => {}
            _ => self.fall_back("the tar does not end with an end-of-archive block".into()),
        }
        Role::Other
    }

    /// A piece was handed to the compression threads.
    pub fn dispatched(&mut self, role: Role) {
        self.roles.push_back(role);
    }

    /// The next piece, whose hashes are `sums`, was written at `offset..end` of the layer.
    /// Gives back the piece's data if `sums` kept it.
    pub fn written(&mut self, offset: u64, end: u64, mut sums: Option<Sums>) -> io::Result<Option<Vec<u8>>> {
        let role = self.roles.pop_front().unwrap_or(Role::Other);
        let back = sums.as_mut().and_then(|s| s.data.take());
        if self.plain.is_some() {
            return Ok(back);
        }
        if let (Role::Data { last, whole }, Some(s)) = (role, sums) {
            let Some(data) = self.queue.front_mut().and_then(|m| m.entry.as_mut()).and_then(|e| e.data.as_mut()) else {
                self.fall_back("internal: data without a file".into());
                return Ok(back);
            };
            if !whole {
                data.sha.get_or_insert_with(Sha256::new).update(back.as_deref().unwrap_or_default());
                data.crc = crc64_combine(data.crc, s.crc, s.len);
            }
            data.chunks.push(Chunk { offset, end, size: s.len, sha: s.sha });
            if last {
                data.done = Some(match data.sha.take() {
                    Some(sha) if !whole => (sha.finalize().into(), data.crc),
                    _ => (s.sha, s.crc),
                });
            }
        }
        self.flush()?;
        Ok(back)
    }

    /// Enters the complete members at the front of the queue in the TOC and tar-split.
    fn flush(&mut self) -> io::Result<()> {
        while self.queue.front().is_some_and(Member::complete) {
            let m = self.queue.pop_front().expect("checked");
            self.split_line(&format!(r#"{{"type":2,"payload":"{}","position":{}}}"#, b64(&m.segment), self.position))?;
            let Some(e) = m.entry else { continue };
            let done = e.data.as_ref().and_then(|d| d.done);
            let crc = match done {
                Some((_, crc)) => format!("\"{}\"", b64(&crc.to_be_bytes())),
                None => "null".into(),
            };
            let size = if e.size > 0 { format!(r#","size":{}"#, e.size) } else { String::new() };
            self.split_line(&format!(r#"{{"type":1,"name":{}{size},"payload":{crc},"position":{}}}"#, json_str(&e.name), self.position))?;
            let mut text = String::with_capacity(e.fields.len() + 200);
            text.push_str(if self.entries == 0 { "" } else { "," });
            text.push_str(&e.fields);
            if let (Some(d), Some((sha, _))) = (&e.data, done) {
                let first = &d.chunks[0];
                let last_end = d.chunks.last().map_or(first.end, |c| c.end);
                let _ = write!(text, r#","digest":"sha256:{}","offset":{},"endOffset":{last_end}"#, crate::util::hex(&sha), first.offset);
                if d.chunks.len() > 1 {
                    let _ = write!(text, r#","chunkSize":{},"chunkDigest":"sha256:{}""#, first.size, crate::util::hex(&first.sha));
                    let mut at = first.size;
                    for c in &d.chunks[1..] {
                        let _ = write!(
                            text,
                            r#"}},{{"type":"chunk","name":{},"offset":{},"endOffset":{},"chunkSize":{},"chunkOffset":{at},"chunkDigest":"sha256:{}""#,
                            json_str(&e.name),
                            c.offset,
                            c.end,
                            c.size,
                            crate::util::hex(&c.sha)
                        );
                        at += c.size;
                    }
                }
            }
            text.push('}');
            self.toc_text(&text)?;
            self.entries += 1;
        }
        Ok(())
    }

    fn split_line(&mut self, line: &str) -> io::Result<()> {
        self.split.write_all(line.as_bytes())?;
        self.split.write_all(b"\n")?;
        self.split_len += line.len() as u64 + 1;
        self.position += 1;
        Ok(())
    }

    fn toc_text(&mut self, text: &str) -> io::Result<()> {
        self.toc.write_all(text.as_bytes())?;
        self.toc_len += text.len() as u64;
        Ok(())
    }

    /// Every piece is written and the layer's frames end at `offset` in `out`: writes the TOC,
    /// tar-split and footer frames and returns the descriptor's annotations (none for a layer
    /// that turned plain).
    pub fn finish(mut self, out: &mut impl Write, offset: u64) -> io::Result<Vec<(String, String)>> {
        self.flush()?;
        if self.plain.is_some() || !self.queue.is_empty() {
            return Ok(Vec::new());
        }
        let split = self.split.finish()?;
        let split_digest = crate::util::sha256_digest(&split);
        let tail = format!(r#"],"tarSplitDigest":"{split_digest}"}}"#);
        self.toc.write_all(tail.as_bytes())?;
        let toc_len = self.toc_len + tail.len() as u64;
        let toc = self.toc.finish()?;
        let toc_at = offset + 8;
        let split_at = toc_at + toc.len() as u64 + 8;
        let mut footer = Vec::with_capacity(64);
        for v in [toc_at, toc.len() as u64, toc_len, 1, split_at, split.len() as u64, self.split_len] {
            footer.extend_from_slice(&v.to_le_bytes());
        }
        footer.extend_from_slice(FOOTER_MAGIC);
        for data in [&toc[..], &split[..], &footer[..]] {
            out.write_all(&SKIPPABLE_MAGIC)?;
            out.write_all(&(data.len() as u32).to_le_bytes())?;
            out.write_all(data)?;
        }
        Ok(vec![
            (TOC_CHECKSUM.to_string(), crate::util::sha256_digest(&toc)),
            (TOC_POSITION.to_string(), format!("{toc_at}:{}:{toc_len}:1", toc.len())),
            (TAR_SPLIT_POSITION.to_string(), format!("{split_at}:{}:{}", split.len(), self.split_len)),
        ])
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// A name as Go's `filepath.Clean` has it, which the tar-split reader checks for duplicates.
fn clean(name: &str) -> String {
    let rooted = name.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." if parts.last().is_some_and(|l| *l != "..") => {
                parts.pop();
            }
            ".." if rooted => {}
            p => parts.push(p),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

/// A Unix time as Go marshals a `time.Time` in UTC (RFC 3339), if Go can (years 0 to 9999).
fn go_time(t: i64) -> Option<String> {
    if !(-62_167_219_200..=253_402_300_799).contains(&t) {
        return None;
    }
    let (date, time) = crate::util::civil_from_unix(t);
    Some(format!("{date}T{time}Z"))
}

/// The member whose headers (extended ones first) are `headers`, with the TOC fields Go's
/// `archive/tar` would read from them; why not, if Go would read them otherwise than we can
/// say in the TOC.
fn toc_fields(headers: &[u8]) -> Result<Entry, String> {
    let entry = match read::Reader::new(headers).next() {
        Ok(Some(e)) => e,
        Ok(None) => return Err("an empty member header".into()),
        Err(e) => return Err(format!("a member the TOC cannot describe ({e})")),
    };
    let Some(block) = headers.len().checked_sub(512).and_then(|at| headers.get(at..)) else {
        return Err("a short member header".into());
    };
    // Go reads the old regular type '\0' as our reader does: a directory if the name ends in '/'.
    let flag = if block[156] == 0 { entry.kind } else { block[156] };
    let kind = match flag {
        b'0' => "reg",
        b'1' => "hardlink",
        b'2' => "symlink",
        b'3' => "char",
        b'4' => "block",
        b'5' => "dir",
        b'6' => "fifo",
        t => return Err(format!("a member of type {:?}", t as char)),
    };
    let magic = &block[257..265];
    let gnu = magic == b"ustar  \0";
    if magic != b"ustar\x0000" && !gnu {
        return Err("a header that is neither ustar nor GNU".into());
    }
    if gnu && (block[345] != 0 || block[357] != 0) {
        return Err("a GNU header with access or change times".into());
    }
    if !gnu && &block[508..512] == b"tar\0" {
        return Err("a star header".into());
    }
    let field = |range: std::ops::Range<usize>| read::number(&block[range], "field", 0).ok().and_then(|v| i64::try_from(v).ok());
    let (Some(mode), Some(raw_size), Some(devmajor), Some(devminor)) = (field(100..108), field(124..136), field(329..337), field(337..345)) else {
        return Err("a header field out of range".into());
    };
    // Extended headers: what Go reads from them that the TOC holds, and what it cannot.
    let mut xattrs = String::new();
    let mut pax_size = false;
    let mut at = 0;
    while at + 512 < headers.len() {
        let b = &headers[at..at + 512];
        let size = read::number(&b[124..136], "size", 0).ok().and_then(|s| usize::try_from(s).ok()).unwrap_or(0);
        let data = headers.get(at + 512..at + 512 + size).unwrap_or_default();
        match b[156] {
            b'x' => {
                for (key, value) in read::parse_pax(data, 0).map_err(|e| e.to_string())? {
                    match key {
                        b"atime" | b"ctime" => return Err("a member with access or change times".into()),
                        b"mtime" if value.contains(&b'.') => return Err("a modification time with a fraction".into()),
                        b"size" => pax_size = true,
                        k if k.starts_with(b"GNU.sparse.") => return Err("a sparse member".into()),
                        k => {
                            if let Some(attr) = k.strip_prefix(b"SCHILY.xattr.") {
                                let attr = std::str::from_utf8(attr).map_err(|_| "an extended attribute name that is not UTF-8".to_string())?;
                                let _ = write!(xattrs, "{}{}:\"{}\"", if xattrs.is_empty() { "" } else { "," }, json_str(attr), b64(value));
                            }
                        }
                    }
                }
            }
            b'L' | b'K' => {}
            _ => return Err("a PAX global header".into()),
        }
        at += 512 + size + tar::padding(size as u64) as usize;
    }
    if kind != "reg" && (raw_size != 0 || pax_size) {
        return Err(format!("a {kind} member with a size"));
    }
    let name = String::from_utf8(entry.name.clone()).map_err(|_| format!("a name that is not UTF-8 ({:?})", entry.name_lossy()))?;
    let link = String::from_utf8(entry.link).map_err(|_| format!("a link target that is not UTF-8 in {name:?}"))?;
    let modtime = go_time(entry.mtime).ok_or_else(|| format!("{name:?}: a modification time Go cannot write"))?;
    let mut fields = format!(r#"{{"type":"{kind}","name":{}"#, json_str(&name));
    if !link.is_empty() {
        let _ = write!(fields, r#","linkName":{}"#, json_str(&link));
    }
    for (key, v) in [("mode", mode), ("size", entry.size as i64), ("uid", entry.uid as i64), ("gid", entry.gid as i64)] {
        if v != 0 {
            let _ = write!(fields, r#","{key}":{v}"#);
        }
    }
    let _ = write!(fields, r#","modtime":"{modtime}""#);
    for (key, v) in [("devMajor", devmajor), ("devMinor", devminor)] {
        if v != 0 {
            let _ = write!(fields, r#","{key}":{v}"#);
        }
    }
    if !xattrs.is_empty() {
        let _ = write!(fields, r#","xattrs":{{{xattrs}}}"#);
    }
    let data = (kind == "reg" && entry.size > 0).then(|| Data { chunks: Vec::new(), sha: None, crc: 0, done: None });
    Ok(Entry { name, size: entry.size, fields, data })
}

/// CRC-64 with the ISO polynomial, as Go's `hash/crc64` computes it (tar-split's checksum of
/// each file): `crc` so far, then `data`.
pub fn crc64(crc: u64, data: &[u8]) -> u64 {
    static TABLES: std::sync::OnceLock<[[u64; 256]; 8]> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        const POLY: u64 = 0xD800_0000_0000_0000;
        let mut t = [[0u64; 256]; 8];
        for (i, slot) in t[0].iter_mut().enumerate() {
            let mut c = i as u64;
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *slot = c;
        }
        for k in 1..8 {
            let (done, rest) = t.split_at_mut(k);
            for (i, slot) in rest[0].iter_mut().enumerate() {
                let prev = done[k - 1][i];
                *slot = (prev >> 8) ^ done[0][(prev & 0xff) as usize];
            }
        }
        t
    });
    let mut c = !crc;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        c ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        c = t[7][(c & 0xff) as usize]
            ^ t[6][((c >> 8) & 0xff) as usize]
            ^ t[5][((c >> 16) & 0xff) as usize]
            ^ t[4][((c >> 24) & 0xff) as usize]
            ^ t[3][((c >> 32) & 0xff) as usize]
            ^ t[2][((c >> 40) & 0xff) as usize]
            ^ t[1][((c >> 48) & 0xff) as usize]
            ^ t[0][(c >> 56) as usize];
    }
    for &b in words.remainder() {
        c = t[0][((c ^ b as u64) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The CRC-64 of `a` then `b` from `crc64(0, a)`, `crc64(0, b)` and `b`'s length, as zlib
/// combines CRC-32s: `crc_a` is run through `len_b` zero bytes by squaring the operator of one
/// zero bit (a 64×64 matrix over GF(2)), so a combination costs O(log len_b).
pub fn crc64_combine(crc_a: u64, crc_b: u64, len_b: u64) -> u64 {
    fn times(mat: &[u64; 64], mut vec: u64) -> u64 {
        let mut sum = 0;
        let mut i = 0;
        while vec != 0 {
            if vec & 1 == 1 {
                sum ^= mat[i];
            }
            vec >>= 1;
            i += 1;
        }
        sum
    }
    fn square(mat: &[u64; 64]) -> [u64; 64] {
        std::array::from_fn(|n| times(mat, mat[n]))
    }
    if len_b == 0 {
        return crc_a;
    }
    // The operator of one zero bit, then of one zero byte (8 bits: three squarings).
    let mut op = [0u64; 64];
    op[0] = 0xD800_0000_0000_0000;
    for (n, row) in op.iter_mut().enumerate().skip(1) {
        *row = 1 << (n - 1);
    }
    for _ in 0..3 {
        op = square(&op);
    }
    let (mut crc, mut len) = (crc_a, len_b);
    loop {
        if len & 1 == 1 {
            crc = times(&op, crc);
        }
        len >>= 1;
        if len == 0 {
            return crc ^ crc_b;
        }
        op = square(&op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{Compressor, Pipeline};
    use crate::tar::{Header, DIRTYPE, LNKTYPE, REGTYPE, SYMTYPE};
    use serde_json::Value;
    use std::io::Read;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 4 == 0 { (x >> 24) as u8 } else { (i % 13) as u8 }
            })
            .collect()
    }

    /// A tar with every kind of member the TOC holds, files of 0, 1, PIECE-1, PIECE, PIECE+1
    /// and 2.5 PIECE bytes, long and non-ASCII names.
    /// Extra members: name, type, content.
    type Extra<'a> = (&'a [u8], u8, Vec<u8>);

    fn sample_tar(extra: &[Extra]) -> Vec<u8> {
        let mut w = crate::tar::write::Writer::new(Vec::new());
        let long = format!("nix/store/{}-long/{}", "a".repeat(32), "n".repeat(150));
        type Member<'a> = (Vec<u8>, u8, Vec<u8>, &'a [u8]);
        let mut members: Vec<Member> = vec![
            (b"nix/".to_vec(), DIRTYPE, vec![], b""),
            (b"nix/store/".to_vec(), DIRTYPE, vec![], b""),
            (b"nix/store/empty".to_vec(), REGTYPE, vec![], b""),
            (b"nix/store/one".to_vec(), REGTYPE, vec![7], b""),
            ("nix/store/caf\u{e9}".as_bytes().to_vec(), REGTYPE, data(1000, 3), b""),
            (b"nix/store/below".to_vec(), REGTYPE, data(PIECE - 1, 4), b""),
            (b"nix/store/exact".to_vec(), REGTYPE, data(PIECE, 5), b""),
            (b"nix/store/above".to_vec(), REGTYPE, data(PIECE + 1, 6), b""),
            (long.clone().into_bytes(), REGTYPE, data(PIECE * 5 / 2, 7), b""),
            (b"nix/store/link".to_vec(), SYMTYPE, vec![], b"one"),
            (b"nix/store/hard".to_vec(), LNKTYPE, vec![], b"nix/store/one"),
        ];
        for (name, kind, content) in extra {
            members.push((name.to_vec(), *kind, content.clone(), b""));
        }
        for (name, kind, content, link) in &members {
            let h = Header { kind: *kind, linkname: link, mode: if *kind == DIRTYPE { 0o755 } else { 0o444 }, ..Header::plain_file(name, content.len() as u64, 1) };
            w.bytes(&h, content).unwrap();
        }
        w.finish().unwrap()
    }

    fn chunked(tar: &[u8], threads: usize) -> (Vec<u8>, Annotations) {
        let mut p = Pipeline::with_threads(Compressor::ZstdChunked, threads, |w: Vec<u8>, a| Ok((w, a)));
        p.begin(Vec::new()).unwrap();
        for part in tar.chunks(10_007) {
            p.write_all(part).unwrap();
        }
        p.end().unwrap();
        p.wait().unwrap();
        p.take_finished().pop().unwrap()
    }

    use crate::compress::Annotations;

    fn unzstd(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(b).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    fn annotation<'a>(a: &'a Annotations, key: &str) -> &'a str {
        &a.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key} in {a:?}")).1
    }

    fn position(a: &Annotations, key: &str) -> Vec<usize> {
        annotation(a, key).split(':').map(|n| n.parse().unwrap()).collect()
    }

    /// Reads the layer as containers-storage does: TOC and tar-split by the annotations, each
    /// file from its frames; checks both against the tar, and the tar put back together from
    /// the tar-split and the files.
    fn check(tar: &[u8], blob: &[u8], a: &Annotations) {
        assert!(unzstd(blob) == tar, "plain zstd decoding differs");
        let toc_at = position(a, TOC_POSITION);
        let toc_blob = &blob[toc_at[0]..toc_at[0] + toc_at[1]];
        assert_eq!(crate::util::sha256_digest(toc_blob), annotation(a, TOC_CHECKSUM));
        let toc_json = unzstd(toc_blob);
        assert_eq!(toc_json.len(), toc_at[2]);
        assert_eq!(toc_at[3], 1);
        let toc: Value = serde_json::from_slice(&toc_json).unwrap();
        let ts_at = position(a, TAR_SPLIT_POSITION);
        let ts_blob = &blob[ts_at[0]..ts_at[0] + ts_at[1]];
        assert_eq!(toc["tarSplitDigest"], crate::util::sha256_digest(ts_blob));
        let ts = unzstd(ts_blob);
        assert_eq!(ts.len(), ts_at[2]);
        // The footer: the last 64 bytes, in a skippable frame.
        let footer = &blob[blob.len() - 64..];
        assert_eq!(&blob[blob.len() - 72..blob.len() - 68], &SKIPPABLE_MAGIC);
        assert_eq!(&footer[56..], FOOTER_MAGIC);
        let word = |i: usize| u64::from_le_bytes(footer[i * 8..i * 8 + 8].try_into().unwrap()) as usize;
        assert_eq!([word(0), word(1), word(2), word(3), word(4), word(5), word(6)], [toc_at[0], toc_at[1], toc_at[2], 1, ts_at[0], ts_at[1], ts_at[2]]);

        // Each file's content from its own frames.
        let mut files = std::collections::HashMap::new();
        let entries = toc["entries"].as_array().unwrap();
        let mut i = 0;
        while i < entries.len() {
            let e = &entries[i];
            i += 1;
            if e["type"] != "reg" || e.get("digest").is_none() {
                continue;
            }
            let mut content = Vec::new();
            let mut parts = vec![e];
            while i < entries.len() && entries[i]["type"] == "chunk" {
                parts.push(&entries[i]);
                i += 1;
            }
            // As containers-storage reads them: a chunk's frames end where the next begins, the
            // last where the file's entry says.
            for (k, p) in parts.iter().enumerate() {
                let o = p["offset"].as_u64().unwrap() as usize;
                let end = parts.get(k + 1).map_or(&e["endOffset"], |n| &n["offset"]).as_u64().unwrap() as usize;
                let piece = unzstd(&blob[o..end]);
                if parts.len() > 1 {
                    assert_eq!(p["chunkSize"].as_u64().unwrap() as usize, piece.len());
                    assert_eq!(p["chunkOffset"].as_u64().unwrap_or(0) as usize, content.len(), "chunk {k}");
                    assert_eq!(p["chunkDigest"], crate::util::sha256_digest(&piece));
                }
                content.extend(piece);
            }
            assert_eq!(content.len() as u64, e["size"].as_u64().unwrap());
            assert_eq!(e["digest"], crate::util::sha256_digest(&content));
            files.insert(e["name"].as_str().unwrap().to_string(), content);
        }
        // The tar again, from the tar-split and the files.
        let mut again = Vec::new();
        for (n, line) in ts.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let v: Value = serde_json::from_slice(line).unwrap();
            assert_eq!(v["position"], n);
            match v["type"].as_u64().unwrap() {
                2 => again.extend(crate::registry::auth::base64_decode(v["payload"].as_str().unwrap()).unwrap()),
                1 => {
                    if v.get("size").is_some() {
                        let c = &files[v["name"].as_str().unwrap()];
                        let crc = crate::registry::auth::base64_decode(v["payload"].as_str().unwrap()).unwrap();
                        assert_eq!(crc, crc64(0, c).to_be_bytes());
                        again.extend(c);
                    } else {
                        assert!(v["payload"].is_null());
                    }
                }
                t => panic!("type {t}"),
            }
        }
        assert!(again == tar, "the tar-split does not put the tar back together");
    }

    #[test]
    fn go_crc64_iso() {
        assert_eq!(crc64(0, b"123456789"), 0xb909_56c7_75a4_1001);
        assert_eq!(crc64(crc64(0, b"1234"), b"56789"), 0xb909_56c7_75a4_1001);
        assert_eq!(crc64_combine(crc64(0, b"1234"), crc64(0, b"56789"), 5), 0xb909_56c7_75a4_1001);
        assert_eq!(crc64_combine(0, crc64(0, b"123456789"), 9), 0xb909_56c7_75a4_1001);
        assert_eq!(crc64_combine(crc64(0, b"123456789"), 0, 0), 0xb909_56c7_75a4_1001);
        let d = data(3 << 20, 7);
        for cut in [1, 8, 4095, 1 << 20, (3 << 20) - 1] {
            let (a, b) = d.split_at(cut);
            assert_eq!(crc64_combine(crc64(0, a), crc64(0, b), b.len() as u64), crc64(0, &d), "cut at {cut}");
        }
    }

    #[test]
    fn layers_read_as_containers_storage_reads_them() {
        // Old regular members (type '\0'), a directory among them, as Go reads them.
        let tar = sample_tar(&[(b"nix/store/old", 0, data(10, 1)), (b"nix/store/olddir/", 0, vec![])]);
        let (blob, a) = chunked(&tar, 2);
        check(&tar, &blob, &a);
        let toc: Value = serde_json::from_slice(&unzstd(&blob[position(&a, TOC_POSITION)[0]..][..position(&a, TOC_POSITION)[1]])).unwrap();
        let e = &toc["entries"];
        assert_eq!(e[0], serde_json::json!({"type": "dir", "name": "nix/", "mode": 493, "modtime": "1970-01-01T00:00:01Z"}));
        let of = |name: &str| e.as_array().unwrap().iter().find(|x| x["name"] == name).unwrap().clone();
        assert_eq!((of("nix/store/old")["type"].clone(), of("nix/store/olddir/")["type"].clone()), ("reg".into(), "dir".into()));
        let link = e.as_array().unwrap().iter().find(|x| x["type"] == "hardlink").unwrap();
        assert_eq!(link["linkName"], "nix/store/one");
        assert!(link.get("size").is_none() && link.get("digest").is_none());
        // The long file is three chunks: its entry and two chunk entries.
        assert_eq!(e.as_array().unwrap().iter().filter(|x| x["type"] == "chunk").count(), 1 + 2);
        // The same bytes whatever the thread count.
        for threads in [1, 5] {
            assert!(chunked(&tar, threads) == (blob.clone(), a.clone()), "{threads} threads");
        }
    }

    #[test]
    fn what_the_toc_cannot_hold_makes_plain_zstd() {
        let cases: Vec<(&str, Vec<Extra>)> = vec![
            ("a name that is not UTF-8", vec![(b"nix/store/\xff", REGTYPE, vec![1])]),
            ("two members named", vec![(b"nix/store/one/", REGTYPE, vec![2])]),
            ("type", vec![(b"nix/store/contiguous", b'7', vec![])]),
            ("global header", vec![(b"nix/store/g", b'g', b"7 a=bc\n".to_vec())]),
        ];
        for (why, extra) in cases {
            let tar = sample_tar(&extra);
            let (blob, a) = chunked(&tar, 2);
            assert!(a.is_empty(), "{why}: {a:?}");
            assert!(unzstd(&blob) == tar, "{why}");
        }
        // Not a tar at all, a truncated one, an empty stream: plain zstd of the same bytes.
        let tar = sample_tar(&[]);
        for bytes in [data(100_000, 9), tar[..tar.len() - 10240].to_vec(), tar[..700].to_vec(), Vec::new()] {
            let (blob, a) = chunked(&bytes, 2);
            assert!(a.is_empty());
            assert!(unzstd(&blob) == bytes);
        }
    }

    #[test]
    fn many_small_members_and_extended_headers() {
        let names: Vec<(Vec<u8>, Vec<u8>)> = (0..3000).map(|i| (format!("nix/store/{i:04}-{}", "x".repeat(i % 190)).into_bytes(), data(i % 700, i as u64))).collect();
        let extra: Vec<Extra> = names.iter().map(|(n, c)| (&n[..], REGTYPE, c.clone())).collect();
        let tar = sample_tar(&extra);
        let (blob, a) = chunked(&tar, 2);
        check(&tar, &blob, &a);
    }

    #[test]
    fn names_clean_as_go_cleans_them() {
        for (a, b) in [("a/b/", "a/b"), ("./a//b/.", "a/b"), ("a/../b", "b"), ("../a", "../a"), ("/../a", "/a"), ("", "."), ("./", ".")] {
            assert_eq!(clean(a), b, "{a}");
        }
        assert_eq!(go_time(0).unwrap(), "1970-01-01T00:00:00Z");
        assert!(go_time(253_402_300_800).is_none());
    }
}
