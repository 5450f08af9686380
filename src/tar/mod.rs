//! Tar archives: headers exactly as CPython's `tarfile` writes them in PAX mode (this file),
//! the one reader every input archive goes through ([`read`]), and the one rule for member
//! names ([`name`]).
//!
//! Byte-identical layers are what let an image built by stevedore share layer digests with the
//! same store paths built by nixpkgs' `stream_layered_image.py`, so every detail here (field
//! padding, checksum layout, when a PAX record is needed and in which order) follows what Python
//! emits, not what the POSIX spec merely allows.

use std::io::{self, Write};

pub mod name;
pub mod read;
pub mod write;

pub const BLOCK: u64 = 512;
/// Python pads a closed archive to a multiple of this (tar's default blocking factor 20).
pub const RECORD: u64 = 10240;

pub const REGTYPE: u8 = b'0';
pub const LNKTYPE: u8 = b'1';
pub const SYMTYPE: u8 = b'2';
pub const CHRTYPE: u8 = b'3';
pub const BLKTYPE: u8 = b'4';
pub const DIRTYPE: u8 = b'5';
pub const FIFOTYPE: u8 = b'6';
const XHDTYPE: u8 = b'x';

/// The metadata of one archive member. `name` is the final member name (directories already
/// carry their trailing `/`).
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub name: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub kind: u8,
    pub linkname: &'a [u8],
    pub uname: &'a str,
    pub gname: &'a str,
    pub devmajor: u32,
    pub devminor: u32,
}

impl<'a> Header<'a> {
    /// A regular file with the given name and size, owned by 0:0 with empty owner names, mode
    /// 0644: what `tarfile.TarInfo(name)` gives by default.
    pub fn plain_file(name: &'a [u8], size: u64, mtime: i64) -> Self {
        Header {
            name,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime,
            kind: REGTYPE,
            linkname: b"",
            uname: "",
            gname: "",
            devmajor: 0,
            devminor: 0,
        }
    }
}

pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Bytes of zeros that close an archive whose members took `offset` bytes.
pub fn trailer_len(offset: u64) -> u64 {
    let end = offset + 2 * BLOCK;
    2 * BLOCK + (RECORD - end % RECORD) % RECORD
}

/// Does this name, taken as Python would decode it (UTF-8 with surrogateescape), contain only
/// ASCII? Returns the number of characters Python would see as well.
fn py_chars(s: &[u8]) -> (bool, usize) {
    if s.is_ascii() {
        return (true, s.len());
    }
    let mut chars = 0;
    for chunk in s.utf8_chunks() {
        chars += chunk.valid().chars().count() + chunk.invalid().len();
    }
    (false, chars)
}

/// Python encodes the ustar name fields with `ascii`/`replace`: every non-ASCII character (and
/// every undecodable byte, which surrogateescape turned into one character) becomes `?`.
fn ascii_replace(s: &[u8], out: &mut Vec<u8>) {
    if s.is_ascii() {
        out.extend_from_slice(s);
        return;
    }
    for chunk in s.utf8_chunks() {
        for c in chunk.valid().chars() {
            out.push(if c.is_ascii() { c as u8 } else { b'?' });
        }
        out.extend(std::iter::repeat_n(b'?', chunk.invalid().len()));
    }
}

/// Builds headers into reusable buffers, so that writing a member allocates nothing.
#[derive(Default)]
pub struct HeaderEncoder {
    records: Vec<u8>,
    scratch: Vec<u8>,
    out: Vec<u8>,
    binary: bool,
}

impl HeaderEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Collects the PAX records Python would write for `h` into `self.records`.
    fn collect_pax(&mut self, h: &Header) {
        self.records.clear();
        self.binary = false;
        let text_fields: [(&[u8], &str, usize); 4] = [
            (h.name, "path", 100),
            (h.linkname, "linkpath", 100),
            (h.uname.as_bytes(), "uname", 32),
            (h.gname.as_bytes(), "gname", 32),
        ];
        for (value, key, limit) in text_fields {
            let (ascii, chars) = py_chars(value);
            if !ascii || chars > limit {
                if std::str::from_utf8(value).is_err() {
                    self.binary = true;
                }
                push_record(&mut self.records, key, value);
            }
        }
        let mut num = itoa_buf();
        for (key, value, digits) in [
            ("uid", h.uid as i128, 8u32),
            ("gid", h.gid as i128, 8),
            ("size", h.size as i128, 12),
            ("mtime", h.mtime as i128, 12),
        ] {
            if !fits_octal(value, digits) {
                let s = fmt_i128(value, &mut num);
                push_record(&mut self.records, key, s.as_bytes());
            }
        }
        if self.binary {
            // Python puts this first when any value is not valid UTF-8.
            let mut with_charset = b"21 hdrcharset=BINARY\n".to_vec();
            with_charset.extend_from_slice(&self.records);
            self.records = with_charset;
        }
    }

    /// The number of bytes `write` would produce for this header (excluding file contents).
    pub fn encoded_len(&mut self, h: &Header) -> u64 {
        self.collect_pax(h);
        if self.records.is_empty() {
            BLOCK
        } else {
            2 * BLOCK + self.records.len() as u64 + padding(self.records.len() as u64)
        }
    }

    /// Appends the header block(s) for `h` to `out`.
    pub fn encode(&mut self, h: &Header, out: &mut Vec<u8>) {
        self.collect_pax(h);
        if !self.records.is_empty() {
            let pax = Header {
                name: b"././@PaxHeader",
                mode: 0,
                uid: 0,
                gid: 0,
                size: self.records.len() as u64,
                mtime: 0,
                kind: XHDTYPE,
                linkname: b"",
                uname: "",
                gname: "",
                devmajor: 0,
                devminor: 0,
            };
            ustar_block(&pax, &mut self.scratch, out);
            out.extend_from_slice(&self.records);
            out.resize(out.len() + padding(self.records.len() as u64) as usize, 0);
        }
        ustar_block(h, &mut self.scratch, out);
    }

    /// Writes the header block(s) for `h`.
    pub fn write<W: Write>(&mut self, h: &Header, w: &mut W) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.encode(h, &mut out);
        let written = w.write_all(&out);
        self.out = out;
        written
    }
}

fn push_record(records: &mut Vec<u8>, key: &str, value: &[u8]) {
    // A record is "LEN KEY=VALUE\n" where LEN counts itself too.
    let body = key.len() + value.len() + 3;
    let mut len = body;
    loop {
        let total = body + decimal_digits(len);
        if total == len {
            break;
        }
        len = total;
    }
    records.extend_from_slice(len.to_string().as_bytes());
    records.push(b' ');
    records.extend_from_slice(key.as_bytes());
    records.push(b'=');
    records.extend_from_slice(value);
    records.push(b'\n');
}

fn decimal_digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn fits_octal(v: i128, digits: u32) -> bool {
    v >= 0 && v < 8i128.pow(digits - 1)
}

fn itoa_buf() -> String {
    String::with_capacity(24)
}

fn fmt_i128(v: i128, buf: &mut String) -> &str {
    use std::fmt::Write as _;
    buf.clear();
    let _ = write!(buf, "{v}");
    buf.as_str()
}

/// Python's `stn`: encode, truncate to the field, pad with NULs.
fn put_str(out: &mut Vec<u8>, s: &[u8], len: usize, scratch: &mut Vec<u8>) {
    scratch.clear();
    ascii_replace(s, scratch);
    let n = scratch.len().min(len);
    out.extend_from_slice(&scratch[..n]);
    out.resize(out.len() + (len - n), 0);
}

/// Python's `itn` for values that fit: zero-padded octal, then one NUL. Values that do not fit
/// were moved to a PAX record and are written as 0, as Python does.
fn put_octal(out: &mut Vec<u8>, v: i128, len: usize) {
    let mut v = if fits_octal(v, len as u32) { v as u64 } else { 0 };
    let start = out.len();
    out.resize(start + len, 0);
    for i in (0..len - 1).rev() {
        out[start + i] = b'0' + (v & 7) as u8;
        v >>= 3;
    }
}

fn ustar_block(h: &Header, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    let start = out.len();
    put_str(out, h.name, 100, scratch);
    put_octal(out, (h.mode & 0o7777) as i128, 8);
    put_octal(out, h.uid as i128, 8);
    put_octal(out, h.gid as i128, 8);
    put_octal(out, h.size as i128, 12);
    put_octal(out, h.mtime as i128, 12);
    out.extend_from_slice(b"        ");
    out.push(h.kind);
    put_str(out, h.linkname, 100, scratch);
    out.extend_from_slice(b"ustar\x0000");
    put_str(out, h.uname.as_bytes(), 32, scratch);
    put_str(out, h.gname.as_bytes(), 32, scratch);
    if h.kind == CHRTYPE || h.kind == BLKTYPE {
        put_octal(out, h.devmajor as i128, 8);
        put_octal(out, h.devminor as i128, 8);
    } else {
        out.resize(out.len() + 16, 0);
    }
    out.resize(start + BLOCK as usize, 0);
    let block = &mut out[start..];
    let sum: u32 = block.iter().map(|&b| b as u32).sum();
    let chk = format!("{:06o}\0", sum);
    block[148..155].copy_from_slice(chk.as_bytes());
}

/// The largest size a ustar header's octal field holds (8 GiB - 1).
pub const USTAR_SIZE_MAX: u64 = 8u64.pow(11) - 1;

/// A ustar header as Go's `archive/tar` writes it for skopeo's Docker archives (containers/image
/// `docker-archive`): mode 0444 for a file, 0 for a symlink (`link`), owner 0:0 with no names,
/// mtime 0, every numeric field zero-padded octal ending in NUL, devmajor and devminor included.
/// `pull` writes its archives with it so that their hashes are skopeo's (pullImage's). `None`
/// for what one ustar block cannot hold (Go would add a PAX header): a name or link of more
/// than 100 bytes, a size over [`USTAR_SIZE_MAX`].
pub fn go_ustar_header(name: &str, size: u64, link: Option<&str>) -> Option<[u8; 512]> {
    let linkname = link.unwrap_or("");
    if name.len() > 100 || linkname.len() > 100 || size > USTAR_SIZE_MAX {
        return None;
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(if link.is_some() { b"0000000" } else { b"0000444" });
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = if link.is_some() { SYMTYPE } else { REGTYPE };
    h[157..157 + linkname.len()].copy_from_slice(linkname.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[329..336].copy_from_slice(b"0000000");
    h[337..344].copy_from_slice(b"0000000");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(h: &Header) -> Vec<u8> {
        let mut e = HeaderEncoder::new();
        let mut out = Vec::new();
        e.encode(h, &mut out);
        assert_eq!(out.len() as u64, e.encoded_len(h));
        out
    }

    #[test]
    fn plain_header_layout() {
        let h = Header::plain_file(b"manifest.json", 5, 1);
        let b = encode(&h);
        assert_eq!(b.len(), 512);
        assert_eq!(&b[100..108], b"0000644\0");
        assert_eq!(&b[124..136], b"00000000005\0");
        assert_eq!(&b[257..265], b"ustar\x0000");
        assert_eq!(b[155], b' ');
        assert_eq!(b[154], 0);
        assert!(b[329..345].iter().all(|&c| c == 0));
    }

    #[test]
    fn pax_for_long_and_non_ascii_names() {
        let long = vec![b'a'; 101];
        let h = Header { name: &long, ..Header::plain_file(b"", 0, 0) };
        let b = encode(&h);
        assert_eq!(b.len(), 3 * 512);
        assert_eq!(&b[512..516], b"111 ");
        // The ustar name is the first 100 bytes.
        assert_eq!(&b[1024..1124], &long[..100]);

        let h = Header { name: "café".as_bytes(), ..Header::plain_file(b"", 0, 0) };
        let b = encode(&h);
        assert_eq!(&b[512..526], "14 path=café\n".as_bytes());
        assert_eq!(&b[1024..1029], b"caf?\0");

        // exactly 100 ASCII characters fit
        let hundred = vec![b'b'; 100];
        let h = Header { name: &hundred, ..Header::plain_file(b"", 0, 0) };
        assert_eq!(encode(&h).len(), 512);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut r = Vec::new();
        push_record(&mut r, "path", &[b'x'; 92]);
        // 92 + 4 + 3 = 99, plus 3 digits = 102
        assert!(r.starts_with(b"102 path="));
        assert_eq!(r.len(), 102);
        r.clear();
        push_record(&mut r, "path", &[b'x'; 91]);
        // 98 bytes plus two digits would be 100, which needs three: 101
        assert!(r.starts_with(b"101 path="));
        assert_eq!(r.len(), 101);
    }

    #[test]
    fn big_numbers_move_to_pax() {
        let h = Header::plain_file(b"big", 8 * 1024 * 1024 * 1024, -1);
        let b = encode(&h);
        let rec = &b[512..512 + 31];
        assert!(rec.starts_with(b"19 size=8589934592\n12 mtime=-1\n"));
        assert_eq!(&b[1024 + 124..1024 + 136], b"00000000000\0");
    }

    #[test]
    fn undecodable_bytes_mark_binary_charset() {
        let h = Header { name: b"a\xffb", ..Header::plain_file(b"", 0, 0) };
        let b = encode(&h);
        assert!(b[512..].starts_with(b"21 hdrcharset=BINARY\n12 path=a\xffb\n"));
        assert_eq!(&b[1024..1028], b"a?b\0");
    }

    #[test]
    fn trailer_pads_to_record() {
        assert_eq!(trailer_len(0), RECORD);
        assert_eq!(trailer_len(512), RECORD - 512);
        assert_eq!(trailer_len(RECORD - 1024), 1024);
        assert_eq!(trailer_len(RECORD - 512), 1024 + RECORD - 512);
    }
}
