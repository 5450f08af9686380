//! The one tar reader: ustar, GNU and PAX archives, streamed, within fixed limits.
//!
//! Every archive stevedore reads (base images, their layers, merge inputs, OCI archives) may
//! come from anyone, so the reader holds at most one extended header in memory and never more
//! than [`MAX_EXTENDED`] bytes of it (Go's `archive/tar` limit), checks each header's checksum,
//! and refuses what it cannot represent faithfully (sparse files, NUL bytes in names) rather
//! than guessing. Member data is never buffered: the caller reads it, or it is skipped (by
//! seeking when the input allows).

use std::io::{self, Read, Seek};

/// The largest PAX extended header or GNU long name/link accepted.
pub const MAX_EXTENDED: u64 = 1 << 20;
/// Extended headers allowed before one member's header (PAX, GNU long name and link, a global
/// header or two); more is a malformed or hostile archive.
const MAX_EXTENSIONS: usize = 8;

pub use super::{BLKTYPE, CHRTYPE, DIRTYPE, FIFOTYPE, LNKTYPE, REGTYPE, SYMTYPE};

/// A member's metadata, extended headers applied. `kind` is one of the type constants, or
/// another type byte the caller may skip; `\0` and `7` (contiguous) read as [`REGTYPE`].
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub devmajor: u32,
    pub devminor: u32,
    /// Where the member's data starts in the (uncompressed) archive.
    pub data_offset: u64,
}

impl Entry {
    pub fn is_file(&self) -> bool {
        self.kind == REGTYPE
    }
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Why an archive could not be read; `Display` is one line.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// Malformed or unsupported, at this byte offset.
    Bad(u64, String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => write!(f, "the archive is truncated"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Bad(at, what) => write!(f, "at byte {at}: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn seek_forward<R: Seek>(r: &mut R, n: u64) -> io::Result<()> {
    r.seek_relative(i64::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "member too large"))?)
}

/// Reads members one by one: [`Reader::next`] gives the next header, and the reader itself
/// ([`Read`]) yields that member's data, never more than its size.
pub struct Reader<R> {
    inner: R,
    /// Bytes consumed from `inner`.
    pos: u64,
    /// Data bytes of the current member not yet read, and the padding after them.
    left: u64,
    pad: u64,
    done: bool,
    /// For inputs that can seek: skip data without reading it; `len` bounds where that may go.
    seek: Option<fn(&mut R, u64) -> io::Result<()>>,
    len: Option<u64>,
}

impl<R: Read> Reader<R> {
    /// A reader of a stream (data is skipped by reading it).
    pub fn new(inner: R) -> Self {
        Reader { inner, pos: 0, left: 0, pad: 0, done: false, seek: None, len: None }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        match (self.seek, self.len) {
            (Some(seek), Some(len)) => {
                if self.pos + n > len {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
                seek(&mut self.inner, n)?;
            }
            _ => {
                let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
                if copied != n {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
        }
        self.pos += n;
        Ok(())
    }

    /// Reads one 512-byte block; false at a clean end of input.
    fn block(&mut self, buf: &mut [u8; 512]) -> Result<bool> {
        let mut got = 0;
        while got < 512 {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += 512;
        Ok(true)
    }

    /// The data of an extended header, within [`MAX_EXTENDED`].
    fn extended(&mut self, size: u64, what: &str, at: u64) -> Result<Vec<u8>> {
        if size > MAX_EXTENDED {
            return Err(Error::Bad(at, format!("a {what} of {size} bytes (the limit is {MAX_EXTENDED})")));
        }
        let mut data = vec![0u8; size as usize];
        self.inner.read_exact(&mut data)?;
        self.pos += size;
        self.skip(super::padding(size))?;
        Ok(data)
    }

    /// The next member, or `None` after the last. Not an `Iterator`: a member borrows the reader.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        let rest = self.left + self.pad;
        self.left = 0;
        self.pad = 0;
        self.skip(rest)?;

        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut extensions = 0;
        let mut block = [0u8; 512];
        loop {
            let at = self.pos;
            if !self.block(&mut block)? {
                if extensions > 0 {
                    return Err(Error::Bad(at, "the archive ends after an extended header".into()));
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                if extensions > 0 {
                    return Err(Error::Bad(at, "an extended header is followed by the end of the archive".into()));
                }
                // End of archive (a second zero block, if any, is not read: the caller may
                // stop at the first, as tar does).
                self.done = true;
                return Ok(None);
            }
            check_checksum(&block, at)?;
            let kind = block[156];
            let size = number(&block[124..136], "size", at)?;
            match kind {
                b'x' | b'g' | b'L' | b'K' => {
                    extensions += 1;
                    if extensions > MAX_EXTENSIONS {
                        return Err(Error::Bad(at, "too many extended headers before one member".into()));
                    }
                    let size = u64::try_from(size).map_err(|_| Error::Bad(at, "a negative size".into()))?;
                    match kind {
                        b'x' => {
                            if pax.is_some() {
                                return Err(Error::Bad(at, "two PAX headers for one member".into()));
                            }
                            let data = self.extended(size, "PAX header", at)?;
                            parse_pax(&data, at)?;
                            pax = Some(data);
                        }
                        b'g' => {
                            // Global headers set defaults that container tools ignore; so do we.
                            let data = self.extended(size, "PAX global header", at)?;
                            parse_pax(&data, at)?;
                        }
                        b'L' => long_name = Some(trim_nuls(self.extended(size, "GNU long name", at)?)),
                        _ => long_link = Some(trim_nuls(self.extended(size, "GNU long link", at)?)),
                    }
                    continue;
                }
                b'S' => return Err(Error::Bad(at, "GNU sparse members are not supported".into())),
                _ => {}
            }
            let mut e = header_entry(&block, at)?;
            e.size = u64::try_from(size).map_err(|_| Error::Bad(at, "a negative size".into()))?;
            if let Some(n) = long_name {
                e.name = n;
            }
            if let Some(l) = long_link {
                e.link = l;
            }
            if let Some(p) = &pax {
                for (key, value) in parse_pax(p, at)? {
                    apply_pax(&mut e, key, value, at)?;
                }
            }
            if e.kind == 0 || e.kind == b'7' {
                // Old archives mark directories with a trailing slash only.
                e.kind = if e.kind == 0 && e.name.ends_with(b"/") { DIRTYPE } else { REGTYPE };
            }
            if e.name.contains(&0) || e.link.contains(&0) {
                return Err(Error::Bad(at, format!("member {:?}: a NUL byte in its name or link", e.name_lossy())));
            }
            // Types that carry no data, whatever the size field says (as Go reads them).
            if matches!(e.kind, LNKTYPE | SYMTYPE | CHRTYPE | BLKTYPE | DIRTYPE | FIFOTYPE) {
                e.size = 0;
            }
            e.data_offset = self.pos;
            self.left = e.size;
            self.pad = super::padding(e.size);
            return Ok(Some(e));
        }
    }
}

impl<R: Read + Seek> Reader<R> {
    /// A reader of a seekable input of `len` bytes: unread data is skipped by seeking.
    pub fn seekable(inner: R, len: u64) -> Self {
        Reader { inner, pos: 0, left: 0, pad: 0, done: false, seek: Some(seek_forward::<R>), len: Some(len) }
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the archive ends inside a member"));
        }
        self.left -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }
}

fn trim_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

pub(crate) fn check_checksum(block: &[u8; 512], at: u64) -> Result<()> {
    let stored = number(&block[148..156], "checksum", at)?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as i64;
        signed += b as i8 as i64;
    }
    if stored as i64 != unsigned && stored as i64 != signed {
        return Err(Error::Bad(at, "not a tar header (bad checksum)".into()));
    }
    Ok(())
}

/// A numeric field: octal (space or NUL padded), or GNU base-256 when the top bit is set.
pub(crate) fn number(field: &[u8], what: &str, at: u64) -> Result<i128> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let negative = field[0] & 0x40 != 0;
        let mut v: i128 = (field[0] & 0x3f) as i128;
        if negative {
            v -= 0x40;
        }
        for &b in &field[1..] {
            if v.unsigned_abs() > (i64::MAX as u128) {
                return Err(Error::Bad(at, format!("the {what} field is out of range")));
            }
            v = v * 256 + b as i128;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let text = std::str::from_utf8(&text).map_err(|_| Error::Bad(at, format!("the {what} field is not a number")))?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Ok(0);
    }
    i128::from_str_radix(text, 8).map_err(|_| Error::Bad(at, format!("the {what} field {text:?} is not an octal number")))
}

fn field_str(field: &[u8]) -> Vec<u8> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field[..end].to_vec()
}

fn header_entry(block: &[u8; 512], at: u64) -> Result<Entry> {
    let ustar = &block[257..263] == b"ustar\0";
    let mut name = field_str(&block[..100]);
    if ustar {
        let prefix = field_str(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix;
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let kind = block[156];
    let num = |range: std::ops::Range<usize>, what: &str| number(&block[range], what, at);
    let dev = |v: i128, what: &str| u32::try_from(v).map_err(|_| Error::Bad(at, format!("the {what} field is out of range")));
    let (devmajor, devminor) = if kind == CHRTYPE || kind == BLKTYPE {
        (dev(num(329..337, "devmajor")?, "devmajor")?, dev(num(337..345, "devminor")?, "devminor")?)
    } else {
        (0, 0)
    };
    let id = |v: i128, what: &str| u64::try_from(v).map_err(|_| Error::Bad(at, format!("the {what} field is out of range")));
    Ok(Entry {
        name,
        link: field_str(&block[157..257]),
        kind,
        mode: (num(100..108, "mode")? & 0o7777) as u32,
        uid: id(num(108..116, "uid")?, "uid")?,
        gid: id(num(116..124, "gid")?, "gid")?,
        size: 0,
        mtime: i64::try_from(num(136..148, "mtime")?).map_err(|_| Error::Bad(at, "the mtime field is out of range".into()))?,
        devmajor,
        devminor,
        data_offset: 0,
    })
}

/// The records of a PAX header: `LEN KEY=VALUE\n`, each checked.
pub(crate) fn parse_pax(data: &[u8], at: u64) -> Result<Vec<(&[u8], &[u8])>> {
    let bad = |what: &str| Error::Bad(at, format!("a malformed PAX header ({what})"));
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // Some writers pad the header with NULs.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest.iter().take(20).position(|&b| b == b' ').ok_or_else(|| bad("no record length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| bad("a bad record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("a record runs past its length"));
        }
        let record = &rest[sp + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| bad("a record without '='"))?;
        out.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(out)
}

fn apply_pax(e: &mut Entry, key: &[u8], value: &[u8], at: u64) -> Result<()> {
    let num = |what: &str| -> Result<u64> {
        std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Error::Bad(at, format!("the PAX {what} {:?} is not a number", String::from_utf8_lossy(value))))
    };
    match key {
        b"path" => e.name = value.to_vec(),
        b"linkpath" => e.link = value.to_vec(),
        b"size" => e.size = num("size")?,
        b"uid" => e.uid = num("uid")?,
        b"gid" => e.gid = num("gid")?,
        b"mtime" => {
            // Seconds with an optional fraction; whole seconds are what layers keep.
            let text = std::str::from_utf8(value).unwrap_or("");
            let whole = text.split('.').next().unwrap_or("");
            e.mtime = whole.parse().map_err(|_| Error::Bad(at, format!("the PAX mtime {text:?} is not a number")))?;
        }
        k if k.starts_with(b"GNU.sparse.") => return Err(Error::Bad(at, "GNU sparse members are not supported".into())),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(entries: &[(&str, u8, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::new(*kind));
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while let Some(e) = r.next()? {
            let mut data = Vec::new();
            if e.kind == b'0' && e.name.ends_with(b"skip") {
                // leave it for next() to skip
            } else {
                r.read_to_end(&mut data)?;
            }
            out.push((e, data));
        }
        Ok(out)
    }

    /// A PAX header member with the given records, then a regular member.
    fn with_pax(records: &[u8], name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = crate::tar::HeaderEncoder::new();
        let mut h = crate::tar::Header::plain_file(b"././@PaxHeader", records.len() as u64, 0);
        h.kind = b'x';
        enc.encode(&h, &mut out);
        out.extend_from_slice(records);
        out.resize(out.len() + crate::tar::padding(records.len() as u64) as usize, 0);
        enc.encode(&crate::tar::Header::plain_file(name, data.len() as u64, 0), &mut out);
        out.extend_from_slice(data);
        out.resize(out.len() + crate::tar::padding(data.len() as u64) as usize, 0);
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn reads_members_and_skips_unread_data() {
        let bytes = build(&[("a", b'0', b"hello"), ("dir/", b'5', b""), ("b-skip", b'0', &[7u8; 1000]), ("c", b'0', b"x")]);
        let got = read_all(&bytes).unwrap();
        let names: Vec<String> = got.iter().map(|(e, _)| e.name_lossy()).collect();
        assert_eq!(names, ["a", "dir/", "b-skip", "c"]);
        assert_eq!(got[0].1, b"hello");
        assert_eq!(got[1].0.kind, DIRTYPE);
        assert_eq!(got[3].1, b"x");
        // The same through the seeking reader.
        let mut r = Reader::seekable(io::Cursor::new(&bytes), bytes.len() as u64);
        let mut n = 0;
        while let Some(e) = r.next().unwrap() {
            n += 1;
            assert_eq!(&bytes[e.data_offset as usize..][..e.size as usize].len(), &(e.size as usize));
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn long_names_from_gnu_and_pax() {
        let long = "d/".repeat(80) + "file";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let got = read_all(&b.into_inner().unwrap()).unwrap();
        assert_eq!(got[0].0.name_lossy(), long);
        assert_eq!(got[0].1, b"abc");

        let bytes = with_pax(b"17 path=pax/name\n12 uid=1234\n", b"short", b"data");
        let got = read_all(&bytes).unwrap();
        assert_eq!(got[0].0.name, b"pax/name");
        assert_eq!(got[0].0.uid, 1234);
        assert_eq!(got[0].1, b"data");
    }

    #[test]
    fn hostile_headers_are_errors() {
        // A NUL inside a PAX path: one name posing as two components.
        let bytes = with_pax(b"12 path=a\0x\n", b"a", b"");
        let e = read_all(&bytes).unwrap_err().to_string();
        assert!(e.contains("NUL"), "{e}");
        // A PAX header larger than the limit is refused before it is read.
        let mut big = Vec::new();
        let mut h = crate::tar::Header::plain_file(b"././@PaxHeader", 1 << 30, 0);
        h.kind = b'x';
        crate::tar::HeaderEncoder::new().encode(&h, &mut big);
        let e = read_all(&big).unwrap_err().to_string();
        assert!(e.contains("limit"), "{e}");
        // Bad checksum.
        let mut bytes = build(&[("a", b'0', b"x")]);
        bytes[0] = b'b';
        assert!(read_all(&bytes).unwrap_err().to_string().contains("checksum"));
        // Truncated data.
        let bytes = build(&[("a", b'0', &[1u8; 2000])]);
        assert!(read_all(&bytes[..1024]).is_err());
        // Malformed PAX records.
        for rec in [&b"99 path=x\n"[..], b"x path=y\n", b"5 a\n", b"8 pathx\n"] {
            assert!(read_all(&with_pax(rec, b"a", b"")).is_err(), "{:?}", String::from_utf8_lossy(rec));
        }
        // Sparse files.
        assert!(read_all(&build(&[("s", b'S', b"")])).is_err());
        // An endless run of extended headers.
        let mut many = Vec::new();
        for _ in 0..20 {
            let mut h = crate::tar::Header::plain_file(b"././@LongLink", 2, 0);
            h.kind = b'L';
            crate::tar::HeaderEncoder::new().encode(&h, &mut many);
            many.extend_from_slice(b"x\0");
            many.resize(many.len() + 510, 0);
        }
        assert!(read_all(&many).unwrap_err().to_string().contains("too many"));
    }

    #[test]
    fn numbers_in_base_256_and_header_only_types() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[11] = 5;
        field[10] = 1;
        assert_eq!(number(&field, "size", 0).unwrap(), 261);
        assert_eq!(number(b"0000644 \0", "mode", 0).unwrap(), 0o644);
        assert!(number(b"12x4\0", "mode", 0).is_err());
        // A symlink whose size field claims data has none.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "l", "target").unwrap();
        let got = read_all(&b.into_inner().unwrap()).unwrap();
        assert_eq!(got[0].0.kind, SYMTYPE);
        assert_eq!(got[0].0.link, b"target");
        assert_eq!(got[0].0.size, 0);
    }
}
