//! The one tar writer: headers by [`HeaderEncoder`] (CPython's bytes), data padded to whole
//! blocks, the end-of-archive blocks padded to a whole record. Image archives, OCI archives,
//! exports, customisation layers and run-as-root's layers are written with it; store layers
//! use the same encoder from their chunked producer (`image::layer`).
//!
//! Write errors are [`OutputError`]s, so a closed pipe is told apart from a broken input; read
//! errors name the input.

use super::{padding, trailer_len, Header, HeaderEncoder, REGTYPE};
use crate::util::io::{copy_reading, out_err, write_zeros};
use anyhow::{anyhow, bail, Result};
use std::io::{Read, Write};

pub struct Writer<W: Write> {
    w: W,
    enc: HeaderEncoder,
    hdr: Vec<u8>,
    buf: Vec<u8>,
    offset: u64,
    members: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Self {
        Writer { w, enc: HeaderEncoder::new(), hdr: Vec::with_capacity(1024), buf: Vec::new(), offset: 0, members: 0 }
    }

    /// Bytes written so far (where the next header goes).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Members written so far.
    pub fn members(&self) -> u64 {
        self.members
    }

    /// The underlying writer, for data a caller streams itself between [`Writer::header`] and
    /// [`Writer::end_data`].
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// Writes the header of `h`; a regular file's `h.size` bytes of data must follow, then
    /// [`Writer::end_data`].
    pub fn header(&mut self, h: &Header) -> Result<()> {
        self.hdr.clear();
        self.enc.encode(h, &mut self.hdr);
        self.w.write_all(&self.hdr).map_err(out_err)?;
        self.offset += self.hdr.len() as u64;
        self.members += 1;
        Ok(())
    }

    /// After `size` bytes of a member's data: the padding to the next block.
    pub fn end_data(&mut self, size: u64) -> Result<()> {
        let pad = padding(size);
        self.w.write_all(&[0u8; 512][..pad as usize]).map_err(out_err)?;
        self.offset += size + pad;
        Ok(())
    }

    /// A member whose data is in memory.
    pub fn bytes(&mut self, h: &Header, data: &[u8]) -> Result<()> {
        debug_assert_eq!(h.size, data.len() as u64);
        self.header(h)?;
        self.w.write_all(data).map_err(out_err)?;
        self.end_data(data.len() as u64)
    }

    /// A member; a regular file's data is exactly `h.size` bytes read from `data` (named by
    /// `what` in errors), which must be given then.
    pub fn member(&mut self, h: &Header, data: Option<(&mut dyn Read, &dyn Fn() -> String)>) -> Result<()> {
        self.header(h)?;
        if h.kind != REGTYPE {
            return Ok(());
        }
        match data {
            Some((r, what)) => {
                if self.buf.is_empty() {
                    self.buf = vec![0u8; 1 << 20];
                }
                let n = copy_reading(&mut r.take(h.size), &mut self.w, &mut self.buf, what)?;
                if n < h.size {
                    bail!("{} shrank while it was being read ({} bytes expected)", what(), h.size);
                }
            }
            None if h.size > 0 => return Err(anyhow!("internal error: no data for a {}-byte member", h.size)),
            None => {}
        }
        self.end_data(h.size)
    }

    /// The end-of-archive blocks, padded to a whole record (as Python's tarfile pads); flushes
    /// and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        write_zeros(&mut self.w, trailer_len(self.offset))?;
        self.w.flush().map_err(out_err)?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_padded_and_the_archive_ends_on_a_record() {
        let mut w = Writer::new(Vec::new());
        w.bytes(&Header::plain_file(b"a", 3, 1), b"abc").unwrap();
        let mut data: &[u8] = b"hello";
        w.member(&Header::plain_file(b"b", 5, 1), Some((&mut data, &|| "b".to_string()))).unwrap();
        assert_eq!(w.members(), 2);
        assert_eq!(w.offset(), 4 * 512);
        let out = w.finish().unwrap();
        assert_eq!(out.len() as u64, crate::tar::RECORD);
        let mut short: &[u8] = b"hi";
        let mut w = Writer::new(Vec::new());
        let e = w.member(&Header::plain_file(b"c", 5, 1), Some((&mut short, &|| "c".to_string()))).unwrap_err().to_string();
        assert!(e.starts_with("c shrank while it was being read"), "{e}");
    }
}
