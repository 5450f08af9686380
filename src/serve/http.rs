//! The little HTTP/1.1 a read-only registry needs: request heads (bounded in size and time),
//! keep-alive, and responses with a known length.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// Request heads larger than this are refused.
const MAX_HEAD: usize = 64 * 1024;

pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// HTTP/1.1 without `Connection: close`.
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why no request could be read.
pub enum ReadError {
    /// The client closed the connection between requests (or timed out there).
    Closed,
    /// The head is malformed or too large: answer 400 and close.
    Bad(String),
}

fn read_line(r: &mut BufReader<TcpStream>, used: &mut usize) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = r.by_ref().take((MAX_HEAD - *used) as u64 + 1).read_until(b'\n', &mut line).map_err(|_| ReadError::Closed)?;
    *used += n;
    if *used > MAX_HEAD {
        return Err(ReadError::Bad("request head too large".into()));
    }
    if n == 0 || !line.ends_with(b"\n") {
        return Err(ReadError::Closed);
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ReadError::Bad("request head is not UTF-8".into()))
}

/// Reads one request head; a body, if announced, is read and dropped (this registry takes none).
pub fn read_request(r: &mut BufReader<TcpStream>) -> Result<Request, ReadError> {
    let mut used = 0;
    let mut first = read_line(r, &mut used)?;
    // Tolerate empty lines between requests, as RFC 9112 asks.
    while first.is_empty() {
        first = read_line(r, &mut used)?;
    }
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(ReadError::Bad(format!("malformed request line {first:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(format!("unsupported protocol {version:?}")));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut used)?;
        if line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once(':') else { return Err(ReadError::Bad(format!("malformed header line {line:?}"))) };
        headers.push((k.trim().to_string(), v.trim().to_string()));
        if headers.len() > 200 {
            return Err(ReadError::Bad("too many headers".into()));
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("").to_string();
    let mut req = Request { method: method.to_string(), path, headers, keep_alive: version == "HTTP/1.1" };
    if req.header("connection").is_some_and(|c| c.to_ascii_lowercase().contains("close")) {
        req.keep_alive = false;
    }
    if req.header("transfer-encoding").is_some() {
        return Err(ReadError::Bad("request bodies are not accepted".into()));
    }
    match req.header("content-length").map(|l| l.parse::<u64>()) {
        None | Some(Ok(0)) => {}
        Some(Ok(n)) if n <= MAX_HEAD as u64 => {
            io::copy(&mut r.by_ref().take(n), &mut io::sink()).map_err(|_| ReadError::Closed)?;
        }
        _ => return Err(ReadError::Bad("request bodies are not accepted".into())),
    }
    Ok(req)
}

/// Writes a response head for a body of `len` bytes.
pub fn write_head(w: &mut impl Write, status: u16, headers: &[(&str, String)], len: u64, keep_alive: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nDocker-Distribution-Api-Version: registry/2.0\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    w.write_all(head.as_bytes())
}

/// A `Range` that cannot be satisfied (answered with 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range of a body of `total` bytes asked for with `Range: bytes=A-B`, `A-` or `-N`:
/// Ok(None) for the whole body. Several ranges are answered with the whole body, which RFC 9110
/// allows.
pub fn range(value: Option<&str>, total: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let bad = |_| Unsatisfiable;
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(bad)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (total.saturating_sub(n), total)
        }
        (a, "") => (a.parse().map_err(bad)?, total),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(bad)?, b.parse().map_err(bad)?);
            if b < a {
                return Err(Unsatisfiable);
            }
            (a, (b + 1).min(total))
        }
    };
    if start >= total {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// Passes on bytes `start..end` of what is written through it and swallows the rest; once past
/// `end` it fails with `Done`, which stops the producer early.
pub struct Window<W> {
    pub inner: W,
    pub pos: u64,
    pub start: u64,
    pub end: u64,
}

/// The window is full: not a failure.
#[derive(Debug)]
pub struct Done;

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("range complete")
    }
}

impl std::error::Error for Done {}

impl<W: Write> Write for Window<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos >= self.end {
            return Err(io::Error::other(Done));
        }
        let (from, to) = (self.pos, self.pos + buf.len() as u64);
        let a = self.start.max(from);
        let b = self.end.min(to);
        if a < b {
            self.inner.write_all(&buf[(a - from) as usize..(b - from) as usize])?;
        }
        self.pos = to;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some("bytes=0-3"), 10), Ok(Some((0, 4))));
        assert_eq!(range(Some("bytes=5-"), 10), Ok(Some((5, 10))));
        assert_eq!(range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        assert_eq!(range(Some("bytes=8-100"), 10), Ok(Some((8, 10))));
        assert_eq!(range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("bytes=4-2"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("bytes=x-"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("items=0-1"), 10), Ok(None));
    }

    #[test]
    fn a_window_passes_its_bytes_only() {
        let mut w = Window { inner: Vec::new(), pos: 0, start: 3, end: 7 };
        w.write_all(b"0123").unwrap();
        w.write_all(b"45").unwrap();
        assert!(w.write_all(b"6789").is_ok());
        assert!(w.write_all(b"x").is_err());
        assert_eq!(w.inner, b"3456");
    }
}
