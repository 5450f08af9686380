//! Compression: reading archives that may be compressed (plain tar, gzip or zstd, told apart by
//! their first bytes rather than by file name), and the layer compressors, gzip in independent
//! deflate pieces and zstd, spread over threads with byte-identical output for any thread count.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

pub mod chunked;

/// A layer descriptor's annotations, as an encoder made them (zstd:chunked's TOC position).
pub type Annotations = Vec<(String, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// A reader of `r`'s bytes decompressed (gzip or zstd, told by its first bytes; plain bytes
/// are passed through), and what they were.
pub fn decoder<'a>(mut r: impl Read + 'a) -> std::io::Result<(Compression, Box<dyn Read + 'a>)> {
    // A reader may return fewer bytes than asked; the magic needs four.
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let kind = detect(&head[..got]);
    let chained = std::io::Cursor::new(head).take(got as u64).chain(r);
    Ok(match kind {
        Compression::None => (kind, Box::new(chained)),
        Compression::Gzip => (kind, Box::new(flate2::read::MultiGzDecoder::new(chained))),
        Compression::Zstd => (kind, Box::new(zstd::stream::read::Decoder::new(chained)?)),
    })
}

/// Opens `path` and returns a reader of its decompressed bytes.
pub fn open_decompressed(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = reader.fill_buf().with_context(|| format!("cannot read {}", path.display()))?;
    if head.starts_with(b"\xfd7zXZ\0") || head.starts_with(b"BZh") {
        bail!("{}: xz and bzip2 archives are not supported; use plain, gzip or zstd", path.display());
    }
    Ok(match detect(head) {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(reader)
                .with_context(|| format!("{}: cannot start zstd decoding", path.display()))?,
        ),
    })
}

/// How layers are compressed in OCI output and pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    None,
    /// gzip at this deflate level (1-9; `GZIP_LEVEL` unless the user asks for another).
    Gzip(u8),
    Zstd,
    /// zstd in containers-storage's zstd:chunked format (see [`chunked`]): still zstd to
    /// every client, and pulled partially by those that read its table of contents.
    ZstdChunked,
}

impl crate::util::shared::Choice for Compressor {
    const CHOICES: &'static [(&'static str, Self, &'static str)] =
        &[("none", Compressor::None, ""), ("gz", Compressor::GZIP, ""), ("zstd", Compressor::Zstd, ""), ("zstd:chunked", Compressor::ZstdChunked, "")];
}

impl Compressor {
    /// gzip at the default level.
    pub const GZIP: Compressor = Compressor::Gzip(GZIP_LEVEL as u8);

    pub fn is_gzip(self) -> bool {
        matches!(self, Compressor::Gzip(_))
    }

    /// zstd, chunked or not (the same media type).
    pub fn is_zstd(self) -> bool {
        matches!(self, Compressor::Zstd | Compressor::ZstdChunked)
    }

    /// The same compressor at deflate level `level` (1-9), for gzip only: a smaller or faster
    /// encoding than the default, other bytes and so other digests.
    pub fn with_gzip_level(self, level: Option<u32>) -> Result<Self> {
        match (self, level) {
            (c, None) => Ok(c),
            (Compressor::Gzip(_), Some(l @ 1..=9)) => Ok(Compressor::Gzip(l as u8)),
            (Compressor::Gzip(_), Some(l)) => bail!("--gzip-level {l}: use 1 (fastest) to 9 (smallest)"),
            (_, Some(_)) => bail!("--gzip-level applies to --compressor gz only"),
        }
    }

    /// Names the encoder's output for caches of digests: the kind, its format version and,
    /// for gzip at another level than the default, the level.
    pub fn cache_name(self) -> String {
        match self {
            Compressor::None => format!("None-v{}", self.format_version()),
            Compressor::Gzip(l) if u32::from(l) == GZIP_LEVEL => format!("Gzip-v{}", self.format_version()),
            Compressor::Gzip(l) => format!("Gzip-v{}-level{l}", self.format_version()),
            Compressor::Zstd => format!("Zstd-v{}", self.format_version()),
            Compressor::ZstdChunked => format!("ZstdChunked-v{}", self.format_version()),
        }
    }

    /// Accepts nixpkgs' names (`none`, `gz`, `zstd`) and the long ones.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "" => Compressor::None,
            "gz" | "gzip" => Compressor::GZIP,
            "zstd" | "zst" => Compressor::Zstd,
            "zstd:chunked" => Compressor::ZstdChunked,
            other => bail!("unknown compressor {other:?}: use none, gz, zstd or zstd:chunked"),
        })
    }

    /// The suffix of the OCI layer media type.
    pub fn media_suffix(self) -> &'static str {
        match self {
            Compressor::None => "",
            Compressor::Gzip(_) => "+gzip",
            Compressor::Zstd | Compressor::ZstdChunked => "+zstd",
        }
    }

    /// Names the encoder's output format, for caches of digests: bump it when the bytes change.
    pub fn format_version(self) -> u32 {
        match self {
            // 2: level 4 instead of 6, incompressible sub-blocks stored.
            Compressor::Gzip(_) => 2,
            _ => 1,
        }
    }

    fn chunk_size(self) -> usize {
        match self {
            // Deflate looks back 32 KiB only, so 1 MiB pieces cost almost nothing in ratio.
            Compressor::Gzip(_) => 1 << 20,
            _ => 4 << 20,
        }
    }
}

/// The deflate level of gzip layers. zlib-rs at 4 is about 40% faster than at 6 on binaries
/// and text for 1-2% more bytes (bench/gzip-levels makes the table behind the choice).
pub const GZIP_LEVEL: u32 = 4;

/// Sub-blocks of a gzip piece judged on their own: stored when incompressible.
const GZIP_SUB_BLOCK: usize = 32 * 1024;

/// Whether `data` looks incompressible: its bytes are spread so evenly that their order-2
/// Rényi entropy (a lower bound of the Shannon entropy) is at least 7.9 bits per byte, as it is
/// for compressed or encrypted data. Deflate would spend the most time on such bytes for
/// nothing. Integer arithmetic only, so the decision, and the output, is the same on every
/// machine.
fn incompressible(data: &[u8]) -> bool {
    // Four tables, summed at the end: a run of equal bytes no longer waits on one counter.
    let mut counts = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        counts[0][q[0] as usize] += 1;
        counts[1][q[1] as usize] += 1;
        counts[2][q[2] as usize] += 1;
        counts[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        counts[0][b as usize] += 1;
    }
    let squares: u64 = (0..256)
        .map(|i| {
            let c = (counts[0][i] + counts[1][i] + counts[2][i] + counts[3][i]) as u64;
            c * c
        })
        .sum();
    let n = data.len() as u64;
    // sum(p^2) <= 2^-7.9  <=>  256 * sum(c^2) * 10000 <= n^2 * 10718 (2^0.1 = 1.0718)
    n > 0 && 256 * squares * 10_000 <= n * n * 10_718
}

/// Deflates `data` with `c` (reset first, so the segment refers to nothing before it), ending
/// on a byte boundary: a sync flush, or the final block if `fin`.
fn deflate_segment(c: &mut flate2::Compress, data: &[u8], fin: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
    use flate2::FlushCompress;
    c.reset();
    let flush = if fin { FlushCompress::Finish } else { FlushCompress::Sync };
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let before = c.total_in();
        let status = c.compress_vec(input, out, flush).map_err(std::io::Error::other)?;
        input = &input[(c.total_in() - before) as usize..];
        if input.is_empty() && (status == flate2::Status::StreamEnd || (!fin && out.capacity() > out.len())) {
            return Ok(());
        }
    }
}

/// `data` as stored (uncompressed) deflate blocks, starting on a byte boundary.
fn stored_blocks(data: &[u8], fin: bool, out: &mut Vec<u8>) {
    let blocks = data.len().div_ceil(GZIP_SUB_BLOCK);
    for (i, block) in data.chunks(GZIP_SUB_BLOCK).enumerate() {
        // BFINAL in bit 0, BTYPE 00, padding to the byte; then LEN and its complement.
        out.push(u8::from(fin && i + 1 == blocks));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}


/// One gzip piece as raw deflate at `level`, incompressible sub-blocks stored if `store` (always
/// for layers; bench/gzip-levels compares).
#[doc(hidden)]
pub fn deflate_piece_with(data: &[u8], last: bool, level: u32, store: bool) -> std::io::Result<Vec<u8>> {
    let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    if data.is_empty() {
        deflate_segment(&mut c, data, last, &mut out)?;
        return Ok(out);
    }
    let kinds: Vec<bool> = data.chunks(GZIP_SUB_BLOCK).map(|b| store && incompressible(b)).collect();
    let mut start = 0;
    while start < kinds.len() {
        let end = start + kinds[start..].iter().take_while(|&&k| k == kinds[start]).count();
        let segment = &data[start * GZIP_SUB_BLOCK..(end * GZIP_SUB_BLOCK).min(data.len())];
        let fin = last && end == kinds.len();
        if kinds[start] {
            stored_blocks(segment, fin, &mut out);
        } else {
            deflate_segment(&mut c, segment, fin, &mut out)?;
        }
        start = end;
    }
    Ok(out)
}

/// The zstd level of every layer, chunked or not.
const ZSTD_LEVEL: i32 = 3;

/// Compresses a piece into one zstd frame, in a buffer from `buffers`, with the thread's
/// context (made on first use: a context's tables are megabytes, too many to allocate for each
/// piece).
fn zstd_piece(ctx: &mut Option<zstd::bulk::Compressor<'static>>, data: &[u8], buffers: &Buffers) -> std::io::Result<Vec<u8>> {
    let c = match ctx {
        Some(c) => c,
        None => ctx.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
    };
    let mut out = buffers.take(zstd::zstd_safe::compress_bound(data.len()));
    c.compress_to_buffer(data, &mut out)?;
    Ok(out)
}

/// Big buffers (pieces, and what they compress to) handed back for the next pieces. A fresh
/// 4 MiB allocation is fresh pages, each faulted in and zeroed by the kernel: a fifth of the
/// CPU time of a zstd layer. Buffers under [`Buffers::MIN`] are not kept, so a small
/// zstd:chunked piece never holds a big one; at most `keep` are kept.
#[derive(Clone)]
struct Buffers {
    spare: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl Buffers {
    const MIN: usize = 1 << 20;

    fn new(keep: usize) -> Self {
        Buffers { spare: Default::default(), keep }
    }

    /// An empty buffer of at least `capacity` bytes.
    fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity >= Self::MIN {
            if let Ok(mut spare) = self.spare.lock() {
                if let Some(i) = spare.iter().rposition(|b| b.capacity() >= capacity) {
                    let mut b = spare.swap_remove(i);
                    b.clear();
                    return b;
                }
            }
        }
        Vec::with_capacity(capacity)
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() >= Self::MIN {
            if let Ok(mut spare) = self.spare.lock() {
                if spare.len() < self.keep {
                    spare.push(b);
                }
            }
        }
    }
}

type ChunkResult = (u64, std::io::Result<Vec<u8>>, flate2::Crc, Option<chunked::Sums>);
type Job = (u64, Vec<u8>, bool, chunked::Role);

/// zstd:chunked pieces, a file each, go to the threads in batches of about this many bytes: a
/// handoff per small file costs more in wake-ups than compressing it.
const BATCH_BYTES: usize = 1 << 20;

/// How many threads compress (`STEVEDORE_THREADS`, else one per core, at most 16). Output
/// bytes never depend on it.
pub fn threads() -> usize {
    crate::util::settings::get().threads
}

/// One output stream of a pipeline (a layer): its chunks are the global sequence numbers
/// `first..end`.
struct Stream<W> {
    inner: W,
    first: u64,
    /// Set when the stream is closed.
    end: Option<u64>,
    crc: flate2::Crc,
    /// Bytes written into `inner`.
    pos: u64,
    /// The zstd:chunked bookkeeping of the stream.
    layer: Option<chunked::Layer>,
}

/// Compresses any number of streams, one after another, on a pool of threads. Each stream is
/// cut into fixed-size pieces at the same offsets whatever the thread count, so its output is
/// the same bytes on 1 core or 16: a single gzip member made of independently deflated
/// segments (as `pigz --independent` writes), or a sequence of zstd frames.
///
/// Pieces of all streams share one queue, so a stream can be closed while its last pieces are
/// still being compressed and the next one begins at once: many small layers keep every core
/// busy, not only big ones. Output is written by the caller's thread, in order; when the last
/// piece of a stream is written, `done` gets its writer and annotations (before the next stream's
/// first byte goes anywhere) and its result is kept for `take_finished`. At most about two pieces per
/// thread are in memory at any time (two batches of small zstd:chunked pieces, a MiB or so each).
pub struct Pipeline<W: std::io::Write, R, F: FnMut(W, Annotations) -> std::io::Result<R>> {
    kind: Compressor,
    chunk: Vec<u8>,
    /// Pieces of the open stream dispatched so far.
    open_pieces: u64,
    jobs: Option<std::sync::mpsc::Sender<Vec<Job>>>,
    results: std::sync::mpsc::Receiver<Vec<ChunkResult>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    buffers: Buffers,
    /// Pieces numbered so far (the next piece's sequence number).
    sent: u64,
    /// Pieces numbered but not yet handed to the threads, and their bytes.
    batch: Vec<Job>,
    batch_bytes: usize,
    /// The sequence number after each batch handed to the threads and not yet written.
    batch_ends: std::collections::VecDeque<u64>,
    written: u64,
    waiting: std::collections::BTreeMap<u64, (Vec<u8>, flate2::Crc, Option<chunked::Sums>)>,
    /// Batches handed to the threads at most (a batch is one piece unless zstd:chunked).
    max_in_flight: usize,
    /// Streams not completely written, oldest first; the last may still be open.
    streams: std::collections::VecDeque<Stream<W>>,
    done: F,
    finished: Vec<R>,
    /// A write failed: the streams' state is lost, every later call fails.
    broken: bool,
}

impl<W: std::io::Write, R, F: FnMut(W, Annotations) -> std::io::Result<R>> Pipeline<W, R, F> {
    pub fn new(kind: Compressor, done: F) -> Self {
        Self::with_threads(kind, threads(), done)
    }

    pub fn with_threads(kind: Compressor, threads: usize, done: F) -> Self {
        let threads = threads.max(1);
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Vec<Job>>();
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let (res_tx, res_rx) = std::sync::mpsc::channel();
        let buffers = Buffers::new(2 * threads + 2);
        let workers = (0..threads)
            .map(|_| {
                let jobs = job_rx.clone();
                let results = res_tx.clone();
                let buffers = buffers.clone();
                std::thread::spawn(move || {
                    let mut ctx: Option<zstd::bulk::Compressor<'static>> = None;
                    loop {
                        let batch = jobs.lock().map(|rx| rx.recv());
                        let Ok(Ok(batch)) = batch else { return };
                        let mut done = Vec::with_capacity(batch.len());
                        for (seq, data, last, role) in batch {
                            let mut crc = flate2::Crc::new();
                            if kind.is_gzip() {
                                crc.update(&data);
                            }
                            // Each piece compressed on its own: a raw deflate segment ending on a byte
                            // boundary (sync flush, or the final block) for gzip, a frame for zstd.
                            let (out, sums) = match kind {
                                Compressor::None => (Ok(data), None),
                                Compressor::Gzip(level) => {
                                    // Runs of incompressible sub-blocks stored, the others compressed, each run on its own.
                                    let out = deflate_piece_with(&data, last, level.into(), true);
                                    buffers.give(data);
                                    (out, None)
                                }
                                Compressor::Zstd | Compressor::ZstdChunked => {
                                    let out = zstd_piece(&mut ctx, &data, &buffers);
                                    let (sums, spare) = chunked::sums(role, data);
                                    if let Some(b) = spare {
                                        buffers.give(b);
                                    }
                                    (out, sums)
                                }
                            };
                            done.push((seq, out, crc, sums));
                        }
                        if results.send(done).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Pipeline {
            kind,
            chunk: Vec::with_capacity(kind.chunk_size()),
            open_pieces: 0,
            jobs: Some(job_tx),
            results: res_rx,
            workers,
            buffers,
            sent: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_ends: Default::default(),
            written: 0,
            waiting: Default::default(),
            max_in_flight: 2 * threads + 1,
            streams: Default::default(),
            done,
            finished: Vec::new(),
            broken: false,
        }
    }

    fn is_open(&self) -> bool {
        self.streams.back().is_some_and(|s| s.end.is_none())
    }

    fn check(&self) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other("compression stopped after an earlier error"));
        }
        Ok(())
    }

    /// Starts a stream writing into `inner`; the previous one must be closed.
    pub fn begin(&mut self, inner: W) -> std::io::Result<()> {
        self.check()?;
        assert!(!self.is_open(), "Pipeline::begin while a stream is open");
        let layer = if self.kind == Compressor::ZstdChunked { Some(chunked::Layer::new()?) } else { None };
        self.streams.push_back(Stream { inner, first: self.sent, end: None, crc: flate2::Crc::new(), pos: 0, layer });
        self.open_pieces = 0;
        Ok(())
    }

    /// Closes the open stream without waiting for it to be written.
    pub fn end(&mut self) -> std::io::Result<()> {
        self.check()?;
        assert!(self.is_open(), "Pipeline::end without an open stream");
        let role = match self.streams.back_mut().and_then(|s| s.layer.as_mut()) {
            Some(layer) => layer.end(),
            None => chunked::Role::Other,
        };
        // gzip always ends with a final block; zstd needs one (empty) frame for an empty stream.
        if self.kind.is_gzip() || !self.chunk.is_empty() || self.open_pieces == 0 {
            self.dispatch(true, role)?;
        }
        self.streams.back_mut().expect("open stream").end = Some(self.sent);
        self.guarded(|p| p.write_ready(p.max_in_flight))
    }

    /// Waits until every closed stream is written.
    pub fn wait(&mut self) -> std::io::Result<()> {
        self.check()?;
        self.guarded(|p| {
            p.send_batch()?;
            p.write_ready(0)
        })
    }

    /// Results of `done` for the streams completed so far, oldest first.
    pub fn take_finished(&mut self) -> Vec<R> {
        std::mem::take(&mut self.finished)
    }

    /// Streams begun but not completely written yet (the open one included).
    pub fn pending(&self) -> usize {
        self.streams.len()
    }

    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> std::io::Result<()>) -> std::io::Result<()> {
        let r = f(self);
        self.broken |= r.is_err();
        r
    }

    /// Writes finished pieces in order, completing streams on the way, waiting for results
    /// until at most `in_flight` batches handed to the threads are outstanding.
    fn write_ready(&mut self, in_flight: usize) -> std::io::Result<()> {
        loop {
            while let Some(s) = self.streams.front() {
                if s.end != Some(self.written) {
                    break;
                }
                let mut s = self.streams.pop_front().expect("front exists");
                if self.kind.is_gzip() {
                    s.inner.write_all(&s.crc.sum().to_le_bytes())?;
                    s.inner.write_all(&s.crc.amount().to_le_bytes())?;
                }
                let annotations = match s.layer.take() {
                    Some(layer) => {
                        if let Some(why) = layer.plain() {
                            eprintln!("stevedore: a layer is plain zstd, not zstd:chunked: {why}");
                        }
                        layer.finish(&mut s.inner, s.pos)?
                    }
                    None => Vec::new(),
                };
                let r = (self.done)(s.inner, annotations)?;
                self.finished.push(r);
            }
            if let Some((data, crc, sums)) = self.waiting.remove(&self.written) {
                let s = self.streams.front_mut().expect("a piece belongs to a stream");
                if self.written == s.first && self.kind.is_gzip() {
                    // gzip header: no name, mtime 0, OS "unknown", so bytes never vary.
                    s.inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
                    s.pos += 10;
                }
                s.inner.write_all(&data)?;
                let start = s.pos;
                s.pos += data.len() as u64;
                if let Some(layer) = &mut s.layer {
                    if let Some(b) = layer.written(start, s.pos, sums)? {
                        self.buffers.give(b);
                    }
                }
                self.buffers.give(data);
                s.crc.combine(&crc);
                self.written += 1;
                continue;
            }
            while self.batch_ends.front().is_some_and(|&end| end <= self.written) {
                self.batch_ends.pop_front();
            }
            if self.batch_ends.len() <= in_flight {
                return Ok(());
            }
            let done = self.results.recv().map_err(|_| std::io::Error::other("a compression thread died"))?;
            self.received(done)?;
        }
    }

    fn received(&mut self, done: Vec<ChunkResult>) -> std::io::Result<()> {
        for (seq, out, crc, sums) in done {
            self.waiting.insert(seq, (out?, crc, sums));
        }
        Ok(())
    }

    /// Hands the pieces numbered so far to the threads.
    fn send_batch(&mut self) -> std::io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let jobs = self.jobs.as_ref().expect("pipeline used after drop");
        jobs.send(batch).map_err(|_| std::io::Error::other("compression threads stopped"))?;
        self.batch_ends.push_back(self.sent);
        Ok(())
    }

    fn dispatch(&mut self, last: bool, role: chunked::Role) -> std::io::Result<()> {
        // zstd:chunked pieces are as small as a file: room for the next one only (a fresh 4 MiB
        // buffer for each would be an mmap and page faults per file).
        let next = match self.streams.back_mut().and_then(|s| s.layer.as_mut()) {
            Some(layer) => {
                layer.dispatched(role);
                layer.room(0).max(16 << 10)
            }
            None => self.kind.chunk_size(),
        };
        let data = std::mem::replace(&mut self.chunk, self.buffers.take(next));
        self.batch_bytes += data.len();
        self.batch.push((self.sent, data, last, role));
        self.sent += 1;
        self.open_pieces += 1;
        if self.kind == Compressor::ZstdChunked && self.batch_bytes < BATCH_BYTES {
            return Ok(());
        }
        self.guarded(|p| {
            p.send_batch()?;
            while let Ok(done) = p.results.try_recv() {
                p.received(done)?;
            }
            p.write_ready(p.max_in_flight - 1)
        })
    }
}

impl<W: std::io::Write, R, F: FnMut(W, Annotations) -> std::io::Result<R>> std::io::Write for Pipeline<W, R, F> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        assert!(self.is_open(), "Pipeline::write without an open stream");
        let n = buf.len();
        if self.kind == Compressor::ZstdChunked {
            // Pieces end where the tar says (before and after each file's data), not at fixed sizes.
            while !buf.is_empty() {
                let layer = self.streams.back_mut().and_then(|s| s.layer.as_mut()).expect("a zstd:chunked stream has its layer");
                let k = buf.len().min(layer.room(self.chunk.len()));
                self.chunk.extend_from_slice(&buf[..k]);
                let cut = layer.feed(&buf[..k], self.chunk.len());
                buf = &buf[k..];
                if let Some(role) = cut {
                    self.dispatch(false, role)?;
                }
            }
            return Ok(n);
        }
        let size = self.kind.chunk_size();
        while !buf.is_empty() {
            let k = buf.len().min(size - self.chunk.len());
            self.chunk.extend_from_slice(&buf[..k]);
            buf = &buf[k..];
            if self.chunk.len() == size {
                self.dispatch(false, chunked::Role::Other)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: std::io::Write, R, F: FnMut(W, Annotations) -> std::io::Result<R>> Drop for Pipeline<W, R, F> {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Gives the stream's writer back, annotations dropped.
type PassOn<W> = fn(W, Annotations) -> std::io::Result<W>;

/// A pipeline of one stream: compresses everything written into `inner`.
pub struct ParallelEncoder<W: std::io::Write> {
    pipe: Pipeline<W, W, PassOn<W>>,
}

impl<W: std::io::Write> ParallelEncoder<W> {
    pub fn new(inner: W, kind: Compressor) -> Self {
        Self::with_threads(inner, kind, threads())
    }

    pub fn with_threads(inner: W, kind: Compressor, threads: usize) -> Self {
        // A whole archive is not a layer: zstd:chunked's table of contents has no place in it.
        let kind = if kind == Compressor::ZstdChunked { Compressor::Zstd } else { kind };
        let mut pipe = Pipeline::with_threads(kind, threads, (|w, _| Ok(w)) as PassOn<W>);
        pipe.begin(inner).expect("a new pipeline has no error");
        ParallelEncoder { pipe }
    }

    /// Flushes the last piece and the trailer; returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.pipe.end()?;
        self.pipe.wait()?;
        Ok(self.pipe.take_finished().pop().expect("the stream is complete"))
    }
}

impl<W: std::io::Write> std::io::Write for ParallelEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pipe.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_nix_librarys() {
        use crate::util::shared::{names, Choice};
        let mut ours: Vec<&str> = Compressor::CHOICES.iter().map(|c| c.0).collect();
        let mut theirs = names("compressors");
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
    }
    use std::io::{Read, Write};

    fn sample(n: usize) -> Vec<u8> {
        let mut x = 12345u64;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if i % 3 == 0 { (x >> 33) as u8 } else { (i % 17) as u8 }
            })
            .collect()
    }

    fn encode(kind: Compressor, data: &[u8], piece: usize) -> Vec<u8> {
        encode_with(kind, data, piece, 3)
    }

    fn encode_with(kind: Compressor, data: &[u8], piece: usize, threads: usize) -> Vec<u8> {
        let mut e = ParallelEncoder::with_threads(Vec::new(), kind, threads);
        for part in data.chunks(piece.max(1)) {
            e.write_all(part).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        for kind in [Compressor::GZIP, Compressor::Zstd] {
            for n in [0usize, 1, 1 << 20, (1 << 20) + 1, 9 << 20] {
                let data = sample(n);
                let a = encode(kind, &data, 65536);
                let b = encode(kind, &data, 777);
                assert_eq!(a, b, "{kind:?} {n}: output depends on write sizes");
                let mut back = Vec::new();
                match kind {
                    Compressor::Gzip(_) => flate2::read::GzDecoder::new(&a[..]).read_to_end(&mut back).unwrap(),
                    _ => zstd::stream::read::Decoder::new(&a[..]).unwrap().read_to_end(&mut back).unwrap(),
                };
                assert!(back == data, "{kind:?} {n}: round trip failed");
                if n > (1 << 20) {
                    assert!(a.len() < n, "{kind:?} did not compress");
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_the_bytes() {
        let data = sample(5 << 20);
        for kind in [Compressor::GZIP, Compressor::Zstd] {
            let one = encode_with(kind, &data, 100_000, 1);
            for threads in [2, 16] {
                assert!(encode_with(kind, &data, 4096, threads) == one, "{kind:?}: {threads} threads differ from 1");
            }
        }
    }

    struct Tagged(usize, Vec<u8>);

    impl Write for Tagged {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pipeline_streams_match_single_encoders() {
        // Many streams of mixed sizes (empty, small, several pieces) through one pipeline: each
        // completes in order with exactly the bytes a lone encoder gives it.
        let sizes = [0usize, 10, 300_000, 0, (1 << 20) + 5, 70, 9 << 20, 1];
        for kind in [Compressor::GZIP, Compressor::Zstd, Compressor::None] {
            for threads in [1, 2, 5] {
                let mut p = Pipeline::with_threads(kind, threads, |w: Tagged, _| Ok((w.0, w.1)));
                let mut got = Vec::new();
                for (i, &n) in sizes.iter().enumerate() {
                    p.begin(Tagged(i, Vec::new())).unwrap();
                    for part in sample(n).chunks(65_000) {
                        p.write_all(part).unwrap();
                    }
                    p.end().unwrap();
                    got.extend(p.take_finished());
                }
                p.wait().unwrap();
                got.extend(p.take_finished());
                assert_eq!(p.pending(), 0);
                assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), (0..sizes.len()).collect::<Vec<_>>());
                for (i, out) in got {
                    assert!(out == encode(kind, &sample(sizes[i]), 65_000), "{kind:?}/{threads}: stream {i} differs");
                }
            }
        }
    }

    #[test]
    fn pipeline_write_errors_stick() {
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut p = Pipeline::with_threads(Compressor::GZIP, 2, |w: Failing, _| Ok(w));
        p.begin(Failing).unwrap();
        p.write_all(&sample(1000)).unwrap();
        let e = p.end().and_then(|()| p.wait()).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert!(p.begin(Failing).is_err());
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(data).read_to_end(&mut back).unwrap();
        back
    }

    #[test]
    fn incompressible_sub_blocks_are_stored() {
        assert!(incompressible(&random(GZIP_SUB_BLOCK, 7)));
        assert!(!incompressible(&sample(GZIP_SUB_BLOCK)));
        assert!(!incompressible(&[0u8; 1000]));
        assert!(!incompressible(&[]));
        // All random: stored blocks, 5 bytes per 32 KiB over the input.
        let data = random(3 << 20, 1);
        let gz = encode(Compressor::GZIP, &data, 100_000);
        assert!(gz.len() > data.len() && gz.len() < data.len() + data.len() / 1000, "{} for {}", gz.len(), data.len());
        assert!(gunzip(&gz) == data);
        // Mixed in one piece, runs of both kinds, the last one either: compressible runs still
        // compress, and it all decodes.
        for tail_random in [false, true] {
            let mut data = Vec::new();
            for i in 0..9 {
                let part = if i % 3 == 0 { random(50_000, i) } else { sample(70_000) };
                data.extend(part);
            }
            data.extend(if tail_random { random(20_000, 99) } else { sample(20_000) });
            let gz = encode(Compressor::GZIP, &data, 4096);
            assert!(gunzip(&gz) == data, "tail random: {tail_random}");
            assert!(gz.len() < data.len() * 3 / 4, "{} for {}", gz.len(), data.len());
        }
    }

    #[test]
    fn compressor_names() {
        assert_eq!(Compressor::parse("gz").unwrap(), Compressor::GZIP);
        // The default level keeps the digest cache's old keys; other levels have their own.
        assert_eq!(Compressor::GZIP.cache_name(), "Gzip-v2");
        assert_eq!(Compressor::Zstd.cache_name(), "Zstd-v1");
        let best = Compressor::GZIP.with_gzip_level(Some(9)).unwrap();
        assert_eq!(best, Compressor::Gzip(9));
        assert_eq!(best.cache_name(), "Gzip-v2-level9");
        assert!(Compressor::GZIP.with_gzip_level(Some(10)).is_err());
        assert!(Compressor::Zstd.with_gzip_level(Some(6)).is_err());
        assert_eq!(Compressor::Zstd.with_gzip_level(None).unwrap(), Compressor::Zstd);
        assert_eq!(Compressor::parse("zstd").unwrap(), Compressor::Zstd);
        assert_eq!(Compressor::parse("none").unwrap(), Compressor::None);
        assert!(Compressor::parse("xz").is_err());
    }
}
