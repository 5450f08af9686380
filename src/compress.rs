//! Reading archives that may be compressed: plain tar, gzip or zstd, told apart by their
//! first bytes rather than by file name.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

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
    Gzip,
    Zstd,
}

impl Compressor {
    /// Accepts nixpkgs' names (`none`, `gz`, `zstd`) and the long ones.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "" => Compressor::None,
            "gz" | "gzip" => Compressor::Gzip,
            "zstd" | "zst" => Compressor::Zstd,
            other => bail!("unknown compressor {other:?}: use none, gz or zstd"),
        })
    }

    /// The suffix of the OCI layer media type.
    pub fn media_suffix(self) -> &'static str {
        match self {
            Compressor::None => "",
            Compressor::Gzip => "+gzip",
            Compressor::Zstd => "+zstd",
        }
    }

    fn chunk_size(self) -> usize {
        match self {
            // Deflate looks back 32 KiB only, so 1 MiB pieces cost almost nothing in ratio.
            Compressor::Gzip => 1 << 20,
            _ => 4 << 20,
        }
    }
}

/// One piece of the stream, compressed on its own: a raw deflate segment ending on a byte
/// boundary (sync flush, or the final block) for gzip, a complete frame for zstd.
fn compress_chunk(kind: Compressor, data: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
    match kind {
        Compressor::None => Ok(data.to_vec()),
        Compressor::Gzip => {
            use flate2::{Compress, FlushCompress};
            let mut c = Compress::new(flate2::Compression::new(6), false);
            let mut out = Vec::with_capacity(data.len() / 2 + 1024);
            let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
            let mut input = data;
            loop {
                if out.capacity() - out.len() < 64 * 1024 {
                    out.reserve(out.capacity().max(64 * 1024));
                }
                let before = c.total_in();
                let status = c.compress_vec(input, &mut out, flush).map_err(std::io::Error::other)?;
                input = &input[(c.total_in() - before) as usize..];
                if input.is_empty() && (status == flate2::Status::StreamEnd || (!last && out.capacity() > out.len())) {
                    break;
                }
            }
            Ok(out)
        }
        Compressor::Zstd => zstd::bulk::compress(data, 3),
    }
}

type ChunkResult = (u64, std::io::Result<Vec<u8>>, flate2::Crc);

/// Compresses a stream in fixed-size pieces on all cores. The pieces are cut at the same byte
/// offsets whatever the thread count, so the output is the same bytes on 1 core or 16: a
/// single gzip member made of independently deflated segments (as `pigz --independent`
/// writes), or a sequence of zstd frames.
pub struct ParallelEncoder<W: std::io::Write> {
    inner: W,
    kind: Compressor,
    chunk: Vec<u8>,
    jobs: Option<std::sync::mpsc::Sender<(u64, Vec<u8>, bool)>>,
    results: std::sync::mpsc::Receiver<ChunkResult>,
    workers: Vec<std::thread::JoinHandle<()>>,
    sent: u64,
    written: u64,
    waiting: std::collections::BTreeMap<u64, (Vec<u8>, flate2::Crc)>,
    max_in_flight: u64,
    crc: flate2::Crc,
    started: bool,
}

impl<W: std::io::Write> ParallelEncoder<W> {
    pub fn new(inner: W, kind: Compressor) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
        let (job_tx, job_rx) = std::sync::mpsc::channel::<(u64, Vec<u8>, bool)>();
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        let (res_tx, res_rx) = std::sync::mpsc::channel();
        let workers = (0..threads)
            .map(|_| {
                let jobs = job_rx.clone();
                let results = res_tx.clone();
                std::thread::spawn(move || loop {
                    let job = jobs.lock().map(|rx| rx.recv());
                    let Ok(Ok((seq, data, last))) = job else { return };
                    let mut crc = flate2::Crc::new();
                    if kind == Compressor::Gzip {
                        crc.update(&data);
                    }
                    let out = compress_chunk(kind, &data, last);
                    if results.send((seq, out, crc)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        ParallelEncoder {
            inner,
            kind,
            chunk: Vec::with_capacity(kind.chunk_size()),
            jobs: Some(job_tx),
            results: res_rx,
            workers,
            sent: 0,
            written: 0,
            waiting: Default::default(),
            max_in_flight: 2 * threads as u64 + 1,
            crc: flate2::Crc::new(),
            started: false,
        }
    }

    /// Writes finished pieces in order, waiting for results until at most `in_flight` pieces
    /// are outstanding.
    fn write_ready(&mut self, in_flight: u64) -> std::io::Result<()> {
        loop {
            while let Some((data, crc)) = self.waiting.remove(&self.written) {
                if !self.started && self.kind == Compressor::Gzip {
                    // gzip header: no name, mtime 0, OS "unknown", so bytes never vary.
                    self.inner.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
                }
                self.started = true;
                self.inner.write_all(&data)?;
                self.crc.combine(&crc);
                self.written += 1;
            }
            if self.sent - self.written <= in_flight {
                return Ok(());
            }
            let (seq, out, crc) = self
                .results
                .recv()
                .map_err(|_| std::io::Error::other("a compression thread died"))?;
            self.waiting.insert(seq, (out?, crc));
        }
    }

    fn dispatch(&mut self, last: bool) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.chunk, Vec::with_capacity(self.kind.chunk_size()));
        let jobs = self.jobs.as_ref().expect("encoder used after finish");
        jobs.send((self.sent, data, last)).map_err(|_| std::io::Error::other("compression threads stopped"))?;
        self.sent += 1;
        while let Ok((seq, out, crc)) = self.results.try_recv() {
            self.waiting.insert(seq, (out?, crc));
        }
        self.write_ready(self.max_in_flight - 1)
    }

    /// Flushes the last piece and the trailer; returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        if self.kind == Compressor::Gzip || !self.chunk.is_empty() || self.sent == 0 {
            self.dispatch(true)?;
        }
        self.write_ready(0)?;
        if self.kind == Compressor::Gzip {
            let crc = self.crc.sum();
            let size = self.crc.amount();
            self.inner.write_all(&crc.to_le_bytes())?;
            self.inner.write_all(&size.to_le_bytes())?;
        }
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        Ok(self.inner)
    }
}

impl<W: std::io::Write> std::io::Write for ParallelEncoder<W> {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len();
        let size = self.kind.chunk_size();
        while !buf.is_empty() {
            let k = buf.len().min(size - self.chunk.len());
            self.chunk.extend_from_slice(&buf[..k]);
            buf = &buf[k..];
            if self.chunk.len() == size {
                self.dispatch(false)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut e = ParallelEncoder::new(Vec::new(), kind);
        for part in data.chunks(piece.max(1)) {
            e.write_all(part).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        for kind in [Compressor::Gzip, Compressor::Zstd] {
            for n in [0usize, 1, 1 << 20, (1 << 20) + 1, 9 << 20] {
                let data = sample(n);
                let a = encode(kind, &data, 65536);
                let b = encode(kind, &data, 777);
                assert_eq!(a, b, "{kind:?} {n}: output depends on write sizes");
                let mut back = Vec::new();
                match kind {
                    Compressor::Gzip => flate2::read::GzDecoder::new(&a[..]).read_to_end(&mut back).unwrap(),
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
    fn compressor_names() {
        assert_eq!(Compressor::parse("gz").unwrap(), Compressor::Gzip);
        assert_eq!(Compressor::parse("zstd").unwrap(), Compressor::Zstd);
        assert_eq!(Compressor::parse("none").unwrap(), Compressor::None);
        assert!(Compressor::parse("xz").is_err());
    }
}
