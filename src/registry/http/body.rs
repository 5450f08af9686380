//! Message bodies: a request body being sent (length-delimited or chunked) and a response read
//! by Content-Length, chunks or until close, each within the connection's deadlines.

use super::*;

/// The body of a request being sent; `finish` reads the response.
pub struct BodyWriter {
    pub(super) conn: Option<Conn>,
    /// A write failed: the connection is kept only for `early_response`.
    pub(super) failed: bool,
    pub(super) remaining: u64,
    pub(super) method: String,
    pub(super) url: Url,
    pub(super) buf: Vec<u8>,
    /// The exchange's deadline (a body in memory), else None.
    pub(super) deadline: Option<Instant>,
    pub(super) timeout: Duration,
    pub(super) client_pool: Arc<Mutex<HashMap<PoolKey, Vec<Conn>>>>,
    pub(super) stats: Arc<Mutex<Stats>>,
}

impl BodyWriter {
    pub(super) fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other("request already failed"));
        }
        let conn = self.conn.as_mut().ok_or_else(|| io::Error::other("request already failed"))?;
        let r = conn.get_mut().write_all(data);
        if r.is_err() {
            self.failed = true;
        }
        r?;
        if let Ok(mut s) = self.stats.lock() {
            s.bytes_sent += data.len() as u64;
        }
        Ok(())
    }

    pub(super) fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.send(&buf);
            self.buf = buf;
            r?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends what is buffered and reads the response head.
    pub fn finish(mut self) -> Result<Response> {
        if self.remaining != 0 {
            bail!("request body for {} {} is {} bytes short of its length", self.method, self.url, self.remaining);
        }
        let (method, url) = (self.method.clone(), self.url.clone());
        let sent = self.flush_buf().and_then(|()| match self.conn.as_mut() {
            Some(c) if !self.failed => c.get_mut().flush(),
            _ => Err(io::Error::other("request already failed")),
        });
        if let Err(e) = sent {
            return self.early_response().ok_or_else(|| io_failure(format!("sending {method} {url}"), &e));
        }
        let conn = self.conn.take().ok_or_else(|| net(format!("{method} {url}"), "connection lost"))?;
        let deadline = self.deadline.unwrap_or_else(|| Instant::now() + self.timeout);
        Response::read(conn, &method, &url, self.client_pool.clone(), self.stats.clone(), deadline, true)
    }

    /// After a failed write: the error response the server sent before it stopped reading our
    /// body (a 401 for an expired token, a 413), if one comes at once. Servers answer early
    /// and close; the answer is still there to read.
    pub fn early_response(mut self) -> Option<Response> {
        let conn = self.conn.take()?;
        let deadline = Instant::now() + self.timeout.min(EARLY_RESPONSE);
        let r = Response::read(conn, &self.method, &self.url, self.client_pool.clone(), self.stats.clone(), deadline, false).ok()?;
        (r.status >= 400).then_some(r)
    }
}

impl Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() as u64 > self.remaining {
            return Err(io::Error::other(format!(
                "request body for {} {} is longer than the {} bytes announced",
                self.method, self.url, self.remaining
            )));
        }
        if self.failed {
            return Err(io::Error::other("request already failed"));
        }
        self.remaining -= data.len() as u64;
        if self.buf.len() + data.len() > self.buf.capacity() {
            self.flush_buf()?;
        }
        if data.len() >= self.buf.capacity() {
            self.send(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) enum BodyKind {
    None,
    Length(u64),
    Chunked { left_in_chunk: u64, done: bool },
    UntilClose,
}

pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Where the request went (whose origin answered).
    pub(super) url: Url,
    pub(super) headers: Vec<(String, String)>,
    pub(super) conn: Option<Conn>,
    pub(super) body: BodyKind,
    pub(super) keep_alive: bool,
    pub(super) what: String,
    pub(super) pool: Arc<Mutex<HashMap<PoolKey, Vec<Conn>>>>,
    pub(super) key: PoolKey,
    pub(super) stats: Arc<Mutex<Stats>>,
    /// When the head was due: a body read into memory is due then too.
    pub(super) deadline: Instant,
}

pub(super) fn read_line(conn: &mut Conn, what: &str) -> Result<String> {
    let mut line = Vec::new();
    let n = conn.by_ref().take(64 * 1024).read_until(b'\n', &mut line).map_err(|e| io_failure(what, &e))?;
    if n == 0 {
        return Err(net(what, "the server closed the connection"));
    }
    if line.last() != Some(&b'\n') {
        return Err(net(what, "truncated or oversized response line"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

impl Response {
    /// Reads a response head, which must come by `deadline`; the body is then read under the
    /// `Paced` floor, or by the same deadline through `bytes` or `discard`. A connection that
    /// is not `reusable` (its request was cut short) never goes back to the pool.
    pub(super) fn read(
        mut conn: Conn,
        method: &str,
        url: &Url,
        pool: Arc<Mutex<HashMap<PoolKey, Vec<Conn>>>>,
        stats: Arc<Mutex<Stats>>,
        deadline: Instant,
        reusable: bool,
    ) -> Result<Response> {
        let what = format!("{method} {url}");
        conn.get_mut().paced().phase(Some(deadline));
        let mut interim = 0;
        let (status, reason, headers) = loop {
            let line = read_line(&mut conn, &what)?;
            let mut parts = line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            if !version.starts_with("HTTP/1.") {
                return Err(net(&what, format!("not an HTTP/1.x response: {:?}", line.chars().take(40).collect::<String>())));
            }
            let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| net(&what, "bad status line"))?;
            let reason = parts.next().unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let h = read_line(&mut conn, &what)?;
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
                if headers.len() > 200 {
                    return Err(net(&what, "too many response headers"));
                }
            }
            if (100..200).contains(&status) {
                // 100 Continue and friends: the real response follows (a few, not forever).
                interim += 1;
                if interim > 10 {
                    return Err(net(&what, "too many interim (1xx) responses"));
                }
                continue;
            }
            break (status, reason, headers);
        };
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let keep_alive = !get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body = if method == "HEAD" || status == 204 || status == 304 {
            BodyKind::None
        } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            BodyKind::Chunked { left_in_chunk: 0, done: false }
        } else if let Some(len) = get("content-length") {
            BodyKind::Length(len.parse().map_err(|_| net(&what, "bad Content-Length"))?)
        } else {
            BodyKind::UntilClose
        };
        let key = (url.tls, url.host.clone(), url.port);
        conn.get_mut().paced().phase(None);
        let keep_alive = keep_alive && reusable;
        let mut r = Response { status, reason, url: url.clone(), headers, conn: Some(conn), body, keep_alive, what, pool, key, stats, deadline };
        r.maybe_recycle();
        Ok(r)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The URL this answers (its origin may not be the registry's: redirects, upload locations).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The Content-Length the server announced, if it did (and the body is not chunked).
    pub fn content_length(&self) -> Option<u64> {
        match self.body {
            BodyKind::Length(_) | BodyKind::None => self.header("content-length").and_then(|l| l.parse().ok()),
            _ => None,
        }
    }

    /// `GET`/`HEAD` target for errors: `METHOD URL`.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Once the body is consumed, the connection goes back to the pool.
    pub(super) fn maybe_recycle(&mut self) {
        let done = match self.body {
            BodyKind::None | BodyKind::Length(0) => true,
            BodyKind::Chunked { done, .. } => done,
            _ => false,
        };
        if done {
            if let Some(conn) = self.conn.take() {
                if self.keep_alive && conn.buffer().is_empty() {
                    if let Ok(mut pool) = self.pool.lock() {
                        let list = pool.entry(self.key.clone()).or_default();
                        if list.len() < 4 {
                            list.push(conn);
                        }
                    }
                }
            }
        }
    }

    /// The rest of the body is to be read into memory: it must come by the deadline the head had.
    pub fn in_memory(&mut self) {
        let deadline = self.deadline;
        if let Some(conn) = self.conn.as_mut() {
            conn.get_mut().paced().phase(Some(deadline));
        }
    }

    /// Reads the whole body (by the head's deadline), refusing more than `limit` bytes
    /// (reading at most `limit + 1`).
    pub fn bytes(mut self, limit: u64) -> Result<Vec<u8>> {
        if matches!(self.body, BodyKind::Length(_)) && self.content_length().is_some_and(|n| n > limit) {
            bail!("{}: response larger than {limit} bytes", self.what);
        }
        self.in_memory();
        let mut out = Vec::new();
        let n = self.by_ref().take(limit + 1).read_to_end(&mut out).map_err(|e| io_failure(&self.what, &e))?;
        if n as u64 > limit {
            bail!("{}: response larger than {limit} bytes", self.what);
        }
        Ok(out)
    }

    /// Reads and drops the body (so the connection can be reused), ignoring errors.
    pub fn discard(mut self) {
        self.in_memory();
        let _ = io::copy(&mut self.by_ref().take(1 << 20), &mut io::sink());
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(conn) = self.conn.as_mut() else { return Ok(0) };
        let n = match &mut self.body {
            BodyKind::None => 0,
            BodyKind::Length(left) => {
                if *left == 0 {
                    0
                } else {
                    let k = (buf.len() as u64).min(*left) as usize;
                    let n = conn.read(&mut buf[..k])?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection mid-body"));
                    }
                    *left -= n as u64;
                    n
                }
            }
            BodyKind::Chunked { left_in_chunk, done } => {
                if *done {
                    0
                } else {
                    if *left_in_chunk == 0 {
                        let mut line = String::new();
                        conn.by_ref().take(4096).read_line(&mut line)?;
                        let size = line.trim().split(';').next().unwrap_or("");
                        let size = u64::from_str_radix(size.trim(), 16)
                            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                        if size == 0 {
                            // Trailers, then the blank line; a few, not an endless stream.
                            let mut trailers = 0;
                            loop {
                                let mut t = String::new();
                                if conn.by_ref().take(4096).read_line(&mut t)? == 0 || t.trim().is_empty() {
                                    break;
                                }
                                trailers += 1;
                                if trailers > 100 {
                                    return Err(io::Error::new(io::ErrorKind::InvalidData, "too many chunked trailers"));
                                }
                            }
                            *done = true;
                        }
                        *left_in_chunk = size;
                    }
                    if *done {
                        0
                    } else {
                        let k = (buf.len() as u64).min(*left_in_chunk) as usize;
                        let n = conn.read(&mut buf[..k])?;
                        if n == 0 {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection mid-body"));
                        }
                        *left_in_chunk -= n as u64;
                        if *left_in_chunk == 0 {
                            let mut crlf = [0u8; 2];
                            conn.read_exact(&mut crlf)?;
                            if crlf != *b"\r\n" {
                                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk framing"));
                            }
                        }
                        n
                    }
                }
            }
            BodyKind::UntilClose => {
                let n = conn.read(buf)?;
                self.keep_alive = false;
                n
            }
        };
        if n == 0 {
            match &mut self.body {
                BodyKind::Length(_) => self.body = BodyKind::Length(0),
                BodyKind::UntilClose => {
                    self.conn = None;
                    return Ok(0);
                }
                _ => {}
            }
            self.maybe_recycle();
        } else if let Ok(mut s) = self.stats.lock() {
            s.bytes_received += n as u64;
        }
        Ok(n)
    }
}
