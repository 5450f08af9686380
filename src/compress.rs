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
