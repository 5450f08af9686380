//! Writers and copies shared by every output: hashing while writing, and output errors told
//! apart from input errors (a closed pipe is not a broken store path).

use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Sha256,
    pub count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    pub fn finish(self) -> (W, [u8; 32], u64) {
        (self.inner, self.hasher.finalize().into(), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Errors writing to the output, kept apart from errors reading the store, so the caller can
/// tell a closed pipe from a broken input.
#[derive(Debug)]
pub struct OutputError(pub io::Error);

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write the output: {}", self.0)
    }
}

impl std::error::Error for OutputError {}

pub fn out_err(e: io::Error) -> anyhow::Error {
    anyhow::Error::new(OutputError(e))
}

pub fn write_zeros<W: Write>(w: &mut W, mut n: u64) -> Result<()> {
    let zeros = [0u8; 4096];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..k]).map_err(out_err)?;
        n -= k as u64;
    }
    Ok(())
}

/// Copies until the end of `r`, telling read errors (named by `what`) from output errors.
pub fn copy_reading<W: Write + ?Sized>(r: &mut impl Read, w: &mut W, buf: &mut [u8], what: impl Fn() -> String) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let k = match r.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!("cannot read {}: {e}", what())),
        };
        w.write_all(&buf[..k]).map_err(out_err)?;
        n += k as u64;
    }
}
