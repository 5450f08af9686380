//! A store layer: the tar of a list of store paths, planned from metadata, then written once.
//!
//! The member order and headers are those of nixpkgs' `stream_layered_image.py`: `/nix` and
//! `/nix/store` first, then each store path and everything below it, sorted as Python sorts
//! `pathlib.Path` objects. Sorting paths component by component is the same as a pre-order walk
//! that visits each directory's children in name order, which is what we do.
//!
//! Planning only reads metadata (directory listings and `lstat`), so the layer's exact size is
//! known before any content is read; writing then reads every file once.

use crate::pycompat::py_name_cmp;
use crate::util::io::out_err;
use crate::tar::{self, Header, HeaderEncoder};
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Who owns every member, and when it was modified.
#[derive(Debug, Clone)]
pub struct Owner {
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub mtime: i64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Member name (absolute, directories ending in `/`) in the plan's arena.
    name: (u32, u32),
    /// Symlink target in the arena.
    link: (u32, u32),
    kind: u8,
    mode: u32,
    size: u64,
    rdev: (u32, u32),
}

/// Everything needed to write a layer, and its size in bytes.
pub struct LayerPlan {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    /// Size of the layer's tar, trailer included.
    pub tar_size: u64,
    /// Bytes of file contents in the layer.
    pub content_size: u64,
    pub files: u64,
}

impl LayerPlan {
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Keeps the members `keep` accepts, given their name and a mode it may change, and
    /// recomputes the sizes.
    pub fn retain(&mut self, owner: &Owner, mut keep: impl FnMut(&[u8], &mut u32) -> bool) {
        let mut entries = std::mem::take(&mut self.entries);
        entries.retain_mut(|e| {
            let name = &self.arena[e.name.0 as usize..(e.name.0 + e.name.1) as usize];
            keep(name, &mut e.mode)
        });
        let mut enc = HeaderEncoder::new();
        let (mut offset, mut content, mut files) = (0u64, 0u64, 0u64);
        for e in &entries {
            offset += enc.encoded_len(&self.header(e, owner));
            if e.kind == tar::REGTYPE {
                offset += e.size + tar::padding(e.size);
                content += e.size;
                files += 1;
            }
        }
        self.entries = entries;
        self.tar_size = offset + tar::trailer_len(offset);
        self.content_size = content;
        self.files = files;
    }

    fn name(&self, e: &Entry) -> &[u8] {
        &self.arena[e.name.0 as usize..(e.name.0 + e.name.1) as usize]
    }

    fn link(&self, e: &Entry) -> &[u8] {
        &self.arena[e.link.0 as usize..(e.link.0 + e.link.1) as usize]
    }

    fn header<'a>(&'a self, e: &Entry, owner: &'a Owner) -> Header<'a> {
        Header {
            name: self.name(e),
            mode: e.mode,
            uid: owner.uid,
            gid: owner.gid,
            size: if e.kind == tar::REGTYPE { e.size } else { 0 },
            mtime: owner.mtime,
            kind: e.kind,
            linkname: self.link(e),
            uname: &owner.uname,
            gname: &owner.gname,
            devmajor: e.rdev.0,
            devminor: e.rdev.1,
        }
    }
}

/// Whether this process may read any file (asked once: every regular file in a layer needs it).
fn running_as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| nix::unistd::geteuid().is_root())
}

/// Normalizes a store path as `pathlib.Path` would (repeated slashes and `.` components
/// dropped) and checks that it lies inside `store_dir`.
pub fn check_store_path(path: &str, store_dir: &str) -> Result<PathBuf> {
    let norm = |s: &str| -> Vec<String> {
        s.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_owned).collect()
    };
    if !path.starts_with('/') {
        bail!("store path {path:?} is not absolute");
    }
    let parts = norm(path);
    let store = norm(store_dir);
    if parts.iter().any(|c| c == "..") || parts.len() <= store.len() || parts[..store.len()] != store[..] {
        bail!("path {path:?} is not inside the store directory {store_dir:?}");
    }
    Ok(PathBuf::from(format!("/{}", parts.join("/"))))
}

struct Planner<'o> {
    plan: LayerPlan,
    enc: HeaderEncoder,
    owner: &'o Owner,
    offset: u64,
}

impl Planner<'_> {
    fn push(&mut self, name: &[u8], kind: u8, mode: u32, size: u64, link: &[u8], rdev: (u32, u32)) -> Result<()> {
        let arena = &mut self.plan.arena;
        let name_at = (arena.len() as u32, name.len() as u32);
        arena.extend_from_slice(name);
        let link_at = (arena.len() as u32, link.len() as u32);
        arena.extend_from_slice(link);
        if arena.len() > u32::MAX as usize {
            bail!("too many or too long file names in one layer");
        }
        let e = Entry { name: name_at, link: link_at, kind, mode, size, rdev };
        let h = self.plan.header(&e, self.owner);
        self.offset += self.enc.encoded_len(&h);
        if kind == tar::REGTYPE {
            self.offset += size + tar::padding(size);
            self.plan.content_size += size;
            self.plan.files += 1;
        }
        self.plan.entries.push(e);
        Ok(())
    }

    /// Adds `path` (whose metadata is `meta`) and, for a directory, everything below it.
    fn add_tree(&mut self, path: &mut PathBuf, meta: &fs::Metadata) -> Result<()> {
        let ft = meta.file_type();
        let mode = meta.mode() & 0o7777;
        let bytes = path.as_os_str().as_bytes();
        // Member names are absolute, as nixpkgs writes them.
        let mut name = Vec::with_capacity(bytes.len() + 1);
        name.extend_from_slice(bytes);
        if ft.is_dir() {
            name.push(b'/');
            self.push(&name, tar::DIRTYPE, mode, 0, b"", (0, 0))?;
            let mut children: Vec<(Vec<u8>, fs::Metadata)> = Vec::new();
            let listing = fs::read_dir(&*path).with_context(|| format!("cannot list directory {}", path.display()))?;
            for child in listing {
                let child = child.with_context(|| format!("cannot list directory {}", path.display()))?;
                let meta = child
                    .metadata()
                    .with_context(|| format!("cannot stat {}", child.path().display()))?;
                children.push((child.file_name().as_bytes().to_vec(), meta));
            }
            children.sort_by(|a, b| py_name_cmp(&a.0, &b.0));
            for (child, meta) in children {
                path.push(OsStr::from_bytes(&child));
                self.add_tree(path, &meta)?;
                path.pop();
            }
        } else if ft.is_file() {
            if !running_as_root() {
                if let Err(errno) = nix::unistd::access(&**path, nix::unistd::AccessFlags::R_OK) {
                    bail!("cannot read {}: {}", path.display(), io::Error::from(errno));
                }
            }
            self.push(&name, tar::REGTYPE, mode, meta.len(), b"", (0, 0))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&*path).with_context(|| format!("cannot read link {}", path.display()))?;
            self.push(&name, tar::SYMTYPE, mode, 0, target.as_os_str().as_bytes(), (0, 0))?;
        } else if ft.is_fifo() {
            self.push(&name, tar::FIFOTYPE, mode, 0, b"", (0, 0))?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { tar::CHRTYPE } else { tar::BLKTYPE };
            let rdev = meta.rdev();
            let dev = (libc::major(rdev), libc::minor(rdev));
            self.push(&name, kind, mode, 0, b"", dev)?;
        } else {
            bail!("{} is a socket, which a tar layer cannot hold", path.display());
        }
        Ok(())
    }
}

/// Plans the layer holding `paths` (already checked with [`check_store_path`]).
pub fn plan_layer(paths: &[PathBuf], owner: &Owner) -> Result<LayerPlan> {
    let mut p = Planner {
        plan: LayerPlan { arena: Vec::new(), entries: Vec::new(), tar_size: 0, content_size: 0, files: 0 },
        enc: HeaderEncoder::new(),
        owner,
        offset: 0,
    };
    for root in [&b"/nix/"[..], b"/nix/store/"] {
        p.push(root, tar::DIRTYPE, 0o755, 0, b"", (0, 0))?;
    }
    for path in paths {
        let meta = fs::symlink_metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!("store path {} does not exist", path.display()),
            _ => anyhow!("cannot stat store path {}: {e}", path.display()),
        })?;
        p.add_tree(&mut path.clone(), &meta)?;
    }
    p.plan.tar_size = p.offset + tar::trailer_len(p.offset);
    Ok(p.plan)
}

/// Chunks of layer bytes travel from the reading thread to the writing and hashing threads in
/// buffers of this size.
const CHUNK: usize = 1 << 20;
const CHUNKS_IN_FLIGHT: usize = 4;
/// Buffers the reader may have out at once, queued for writing or hashing: the memory bound. A
/// layer's bytes wait here while the writer waits for the layer before it to be hashed, so the
/// next one is hashed meanwhile. A single layer (what `serve` makes per request) has no next
/// one, and gets a few.
const BUFFERS: usize = 32;
const BUFFERS_FOR_ONE: usize = CHUNKS_IN_FLIGHT + 2;
/// Layers hashed side by side (one thread each), as far as `STEVEDORE_THREADS` allows.
const HASHERS: usize = 2;

/// A filled chunk, shared by the writer and a hasher; back to the pool when both are done.
struct Buf {
    data: Vec<u8>,
    len: usize,
    pool: std::sync::mpsc::Sender<Vec<u8>>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        let _ = self.pool.send(std::mem::take(&mut self.data));
    }
}

/// The reading side of the pipeline: fills chunks with headers and file contents (read straight
/// into the chunk, no extra copy) and hands full ones over.
struct ChunkSender {
    chunk: Vec<u8>,
    filled: usize,
    tx: std::sync::mpsc::SyncSender<Msg>,
    pool: std::sync::mpsc::Receiver<Vec<u8>>,
    pool_tx: std::sync::mpsc::Sender<Vec<u8>>,
    /// Buffers made so far; past `most`, the reader waits for one to come back.
    made: usize,
    most: usize,
}

/// The writing side went away (it failed, e.g. on a closed pipe, and will report why).
#[derive(Debug)]
struct ConsumerGone;

impl std::fmt::Display for ConsumerGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the output side stopped")
    }
}

impl std::error::Error for ConsumerGone {}

impl ChunkSender {
    fn flush(&mut self) -> Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let next = match self.pool.try_recv() {
            Ok(b) => b,
            Err(_) if self.made < self.most => {
                self.made += 1;
                vec![0u8; CHUNK]
            }
            Err(_) => self.pool.recv().map_err(|_| anyhow::Error::new(ConsumerGone))?,
        };
        let full = std::mem::replace(&mut self.chunk, next);
        let buf = Buf { data: full, len: self.filled, pool: self.pool_tx.clone() };
        self.tx.send(Msg::Piece(Piece::Data(std::sync::Arc::new(buf)))).map_err(|_| anyhow::Error::new(ConsumerGone))?;
        self.filled = 0;
        Ok(())
    }

    fn put(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.filled == CHUNK {
                self.flush()?;
            }
            let n = data.len().min(CHUNK - self.filled);
            self.chunk[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if self.filled == CHUNK {
                self.flush()?;
            }
            let k = n.min((CHUNK - self.filled) as u64) as usize;
            self.chunk[self.filled..self.filled + k].fill(0);
            self.filled += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// Copies exactly `size` bytes of the file at `path`. A file that changed size since it was
    /// planned is an error, since its header is already out.
    fn put_file(&mut self, path: &Path, size: u64) -> Result<()> {
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut left = size;
        while left > 0 {
            if self.filled == CHUNK {
                self.flush()?;
            }
            let want = left.min((CHUNK - self.filled) as u64) as usize;
            let n = match f.read(&mut self.chunk[self.filled..self.filled + want]) {
                Ok(0) => bail!("{} shrank while it was being archived", path.display()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => bail!("cannot read {}: {e}", path.display()),
            };
            self.filled += n;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if f.read(&mut probe).with_context(|| format!("cannot read {}", path.display()))? != 0 {
            bail!("{} grew while it was being archived", path.display());
        }
        Ok(())
    }
}

/// Produces the layer's bytes into `out`.
fn produce(plan: &LayerPlan, owner: &Owner, out: &mut ChunkSender) -> Result<u64> {
    let mut enc = HeaderEncoder::new();
    let mut offset = 0u64;
    let mut hdr = Vec::with_capacity(2048);
    for e in &plan.entries {
        hdr.clear();
        enc.encode(&plan.header(e, owner), &mut hdr);
        out.put(&hdr)?;
        offset += hdr.len() as u64;
        if e.kind == tar::REGTYPE {
            out.put_file(Path::new(OsStr::from_bytes(plan.name(e))), e.size)?;
            let pad = tar::padding(e.size);
            out.zeros(pad)?;
            offset += e.size + pad;
        }
    }
    let trailer = tar::trailer_len(offset);
    out.zeros(trailer)?;
    out.flush()?;
    Ok(offset + trailer)
}

/// What the reading thread hands the writing one: a layer begins (with its planned size), a
/// chunk of its bytes, it ends.
enum Piece {
    Begin(usize, u64, u64),
    Data(std::sync::Arc<Buf>),
    End,
}

/// What reaches the writing thread: from the reader, pieces and, last, that it stopped; from
/// the hashers, a layer's sha256.
enum Msg {
    Piece(Piece),
    ReaderDone,
    Digest(usize, [u8; 32]),
}

/// What a hasher thread is told.
enum HashJob {
    Start,
    Data(std::sync::Arc<Buf>),
    Finish(usize),
}

/// A layer the writer knows of, in order: its chunks not written yet, whether its end was
/// read, its digest once hashed.
struct Pending {
    i: usize,
    size: u64,
    files: u64,
    chunks: std::collections::VecDeque<std::sync::Arc<Buf>>,
    begun: bool,
    complete: bool,
    written: u64,
    digest: Option<[u8; 32]>,
    hasher: usize,
}

/// Where [`write_layers`] puts layers, one after another.
pub trait LayerOut {
    /// Layer `i` of the list begins; it will be `tar_size` bytes and hold `files` files.
    fn begin(&mut self, i: usize, tar_size: u64, files: u64) -> Result<()>;
    /// Where its bytes go.
    fn out(&mut self) -> &mut dyn Write;
    /// Layer `i` is complete; its sha256.
    fn end(&mut self, i: usize, tar_size: u64, digest: [u8; 32]) -> Result<()>;
}

/// Plans (with `plan`) and writes the layers `0..count` in order into `out`. One thread plans
/// and reads the store, running on across layer boundaries; the calling thread writes; up to
/// `HASHERS` threads hash, each its own layers, so the next layer is hashed while the current
/// one's hash is finished. Chunk buffers are reused, at most `BUFFERS` of them. `out` sees each
/// layer begun, written and ended (with its digest) in order, as if one thread did it all.
/// `label(i)` names layer `i` in errors.
pub fn write_layers<P: std::borrow::Borrow<LayerPlan> + Send>(
    count: usize,
    plan: &(dyn Fn(usize) -> Result<P> + Sync),
    label: &(dyn Fn(usize) -> String + Sync),
    owner: &Owner,
    out: &mut dyn LayerOut,
) -> Result<()> {
    use std::sync::mpsc::{channel, sync_channel};
    let (tx, rx) = sync_channel::<Msg>(CHUNKS_IN_FLIGHT + BUFFERS);
    let (pool_tx, pool_rx) = channel::<Vec<u8>>();
    let hashers = crate::util::settings::get().threads.clamp(1, HASHERS);
    std::thread::scope(|scope| {
        let reader_tx = tx.clone();
        let producer = scope.spawn(move || -> Result<()> {
            let most = if count > 1 { BUFFERS } else { BUFFERS_FOR_ONE };
            let mut sender = ChunkSender { chunk: vec![0u8; CHUNK], filled: 0, tx: reader_tx, pool: pool_rx, pool_tx, made: 1, most };
            let read = (|| -> Result<()> {
                for i in 0..count {
                    let p = plan(i).with_context(|| label(i))?;
                    let p = p.borrow();
                    sender.tx.send(Msg::Piece(Piece::Begin(i, p.tar_size, p.files))).map_err(|_| anyhow::Error::new(ConsumerGone))?;
                    let produced = produce(p, owner, &mut sender).with_context(|| label(i))?;
                    if produced != p.tar_size {
                        bail!("{}: internal error: planned {} bytes, produced {produced}", label(i), p.tar_size);
                    }
                    sender.tx.send(Msg::Piece(Piece::End)).map_err(|_| anyhow::Error::new(ConsumerGone))?;
                }
                Ok(())
            })();
            let _ = sender.tx.send(Msg::ReaderDone);
            read
        });
        let mut jobs = Vec::new();
        for _ in 0..hashers {
            let (job_tx, job_rx) = channel::<HashJob>();
            let results = tx.clone();
            scope.spawn(move || {
                let mut hasher = Sha256::new();
                for job in job_rx {
                    match job {
                        HashJob::Start => hasher = Sha256::new(),
                        HashJob::Data(buf) => hasher.update(&buf.data[..buf.len]),
                        HashJob::Finish(i) => {
                            if results.send(Msg::Digest(i, std::mem::take(&mut hasher).finalize().into())).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            jobs.push(job_tx);
        }
        drop(tx);
        let consumed = (|| -> Result<()> {
            let gone = || anyhow!("internal error: a hashing thread stopped");
            let mut layers: std::collections::VecDeque<Pending> = Default::default();
            let (mut next_hasher, mut reader_done) = (0, false);
            while !(reader_done && layers.is_empty()) {
                let Ok(msg) = rx.recv() else { break };
                match msg {
                    Msg::Piece(Piece::Begin(i, size, files)) => {
                        let hasher = next_hasher;
                        next_hasher = (next_hasher + 1) % jobs.len();
                        jobs[hasher].send(HashJob::Start).map_err(|_| gone())?;
                        layers.push_back(Pending { i, size, files, chunks: Default::default(), begun: false, complete: false, written: 0, digest: None, hasher });
                    }
                    Msg::Piece(Piece::Data(buf)) => {
                        let layer = layers.back_mut().ok_or_else(|| anyhow!("internal error: bytes of no layer"))?;
                        jobs[layer.hasher].send(HashJob::Data(buf.clone())).map_err(|_| gone())?;
                        layer.chunks.push_back(buf);
                    }
                    Msg::Piece(Piece::End) => {
                        let layer = layers.back_mut().ok_or_else(|| anyhow!("internal error: a layer ended that did not begin"))?;
                        layer.complete = true;
                        jobs[layer.hasher].send(HashJob::Finish(layer.i)).map_err(|_| gone())?;
                    }
                    Msg::Digest(i, digest) => {
                        let layer = layers.iter_mut().find(|l| l.i == i).ok_or_else(|| anyhow!("internal error: a digest of no layer"))?;
                        layer.digest = Some(digest);
                    }
                    Msg::ReaderDone => reader_done = true,
                }
                // Write what can be written: the first layer's bytes as they come, then, once
                // it is hashed, its end, and on to the next.
                while let Some(front) = layers.front_mut() {
                    if !front.begun {
                        out.begin(front.i, front.size, front.files)?;
                        front.begun = true;
                    }
                    while let Some(buf) = front.chunks.pop_front() {
                        out.out().write_all(&buf.data[..buf.len]).map_err(out_err)?;
                        front.written += buf.len as u64;
                    }
                    let (true, Some(digest)) = (front.complete, front.digest) else { break };
                    if front.written != front.size {
                        bail!("{}: internal error: planned {} bytes, wrote {}", label(front.i), front.size, front.written);
                    }
                    out.end(front.i, front.size, digest)?;
                    layers.pop_front();
                }
                // The reader stopped inside a layer: it failed, and says why below.
                if reader_done && layers.front().is_some_and(|l| !l.complete) {
                    break;
                }
            }
            Ok(())
        })();
        // Unblocks the reader and the hashers if we stopped early; the reader's error
        // (ConsumerGone) is then ours.
        drop(jobs);
        drop(rx);
        let produced = producer.join().map_err(|_| anyhow!("the layer reader thread panicked"))?;
        consumed?;
        produced
    })
}

/// Writes the planned layer to `w` and returns its sha256 (see [`write_layers`]).
pub fn write_layer<W: Write + ?Sized>(plan: &LayerPlan, owner: &Owner, w: &mut W) -> Result<[u8; 32]> {
    struct One<'w, W: Write + ?Sized>(&'w mut W, Option<[u8; 32]>);
    impl<W: Write + ?Sized> LayerOut for One<'_, W> {
        fn begin(&mut self, _: usize, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn out(&mut self) -> &mut dyn Write {
            self
        }
        fn end(&mut self, _: usize, _: u64, digest: [u8; 32]) -> Result<()> {
            self.1 = Some(digest);
            Ok(())
        }
    }
    impl<W: Write + ?Sized> Write for One<'_, W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }
    let mut one = One(w, None);
    write_layers(1, &|_| Ok(plan), &|_| "the layer".to_string(), owner, &mut one)?;
    one.1.ok_or_else(|| anyhow!("internal error: the layer was not written"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_drops_members_changes_modes_and_resizes() {
        let tmp = tempfile::tempdir().unwrap();
        let sp = tmp.path().join("0hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-kept");
        fs::create_dir_all(sp.join("d")).unwrap();
        fs::write(sp.join("d/a"), "aaaa").unwrap();
        fs::write(sp.join("d/b"), "b".repeat(700)).unwrap();
        let owner = Owner { uid: 0, gid: 0, uname: "root".into(), gname: "root".into(), mtime: 1 };
        let mut plan = plan_layer(std::slice::from_ref(&sp), &owner).unwrap();
        assert_eq!(plan.files, 2);
        plan.retain(&owner, |name, mode| {
            if name == b"/nix/" {
                *mode = 0o555;
            }
            !name.ends_with(b"/d/b")
        });
        assert_eq!((plan.files, plan.content_size), (1, 4));
        let mut out = Vec::new();
        write_layer(&plan, &owner, &mut out).unwrap();
        assert_eq!(out.len() as u64, plan.tar_size);
        let mut a = ::tar::Archive::new(&out[..]);
        let names: Vec<(String, u32)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (String::from_utf8_lossy(&e.path_bytes()).into_owned(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(names[0], ("/nix/".to_string(), 0o555));
        assert!(names.iter().any(|(n, _)| n.ends_with("/d/a")));
        assert!(!names.iter().any(|(n, _)| n.ends_with("/d/b")));
    }

    /// A sparse file over 8 GiB needs a PAX `size` record; planning and writing agree on sizes.
    /// Reading 8 GiB of holes takes ~15 s, so it runs with `--include-ignored` (as CI does).
    #[test]
    #[ignore]
    fn huge_sparse_file() {
        let tmp = tempfile::tempdir().unwrap();
        let sp = tmp.path().join("0hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-huge");
        fs::create_dir(&sp).unwrap();
        let size = (8u64 << 30) + 1;
        File::create(sp.join("sparse")).unwrap().set_len(size).unwrap();
        let owner = Owner { uid: 0, gid: 0, uname: "root".into(), gname: "root".into(), mtime: 1 };
        let plan = plan_layer(std::slice::from_ref(&sp), &owner).unwrap();
        assert_eq!(plan.content_size, size);
        let name_len = sp.join("sparse").as_os_str().len() as u64;
        let pax = if name_len > 100 { 2 } else { 1 };
        // /nix/, /nix/store/, the dir: 3 blocks; the file: its PAX header (1 block of records +
        // 1 header block) + its own header + contents.
        let members = 3 * 512 + (pax + 1) * 512 + 512 + size + tar::padding(size);
        assert_eq!(plan.tar_size, members + tar::trailer_len(members));
        struct Count(u64, Vec<u8>);
        impl Write for Count {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.1.len() < 8192 {
                    self.1.extend_from_slice(&b[..b.len().min(8192)]);
                }
                self.0 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Count(0, Vec::new());
        write_layer(&plan, &owner, &mut out).unwrap();
        assert_eq!(out.0, plan.tar_size);
        let head = &out.1[3 * 512..];
        assert!(head[512..].windows(16).any(|w| w == b"size=8589934593\n"));
    }

    #[test]
    fn store_paths_must_be_inside_the_store() {
        assert_eq!(check_store_path("/nix/store//abc-x/", "/nix/store").unwrap(), PathBuf::from("/nix/store/abc-x"));
        assert!(check_store_path("/nix/store", "/nix/store").is_err());
        assert!(check_store_path("/nix/store-evil/x", "/nix/store").is_err());
        assert!(check_store_path("/nix/store/../etc", "/nix/store").is_err());
        assert!(check_store_path("nix/store/abc", "/nix/store").is_err());
    }
}
