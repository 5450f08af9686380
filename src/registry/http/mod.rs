//! A small blocking HTTP/1.1 client: plain TCP or rustls, kept-alive connections, and request
//! bodies written through `Write` so a layer can be compressed straight into the socket.
//!
//! It does only what the registry API needs: Content-Length or chunked responses, no
//! redirects (the caller follows them), no proxies, no compression. No server can keep it
//! waiting for long (`Paced`): `STEVEDORE_REGISTRY_TIMEOUT` (60 s) bounds each wait, each
//! phase of a request, and, with a 1 KiB/s floor, a streamed body.

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod url;
mod body;
pub use url::*;
pub use body::*;

/// The slowest a streamed body may move, in bytes a second, averaged over each stretch of
/// `timeout` spent waiting on the socket.
const FLOOR: f64 = 1024.0;
/// How long a response the server sent before it stopped reading our body may take to arrive.
const EARLY_RESPONSE: Duration = Duration::from_secs(2);

/// `d` for messages, to the hundredth: `60 s`, `2.5 s`.
pub fn seconds(d: Duration) -> String {
    let s = (d.as_secs_f64() * 100.0).round() / 100.0;
    format!("{s} s")
}

/// A failure to talk to the server at all (connect, TLS, reset, truncated response):
/// worth retrying, unlike an HTTP error status.
#[derive(Debug)]
pub struct NetError(pub String);

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NetError {}

/// A server that kept us waiting past the timeout, or sent (or took) a body slower than the
/// floor: worth one more try, not several (see `client::Tries`).
#[derive(Debug)]
pub struct Stalled(pub String);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Stalled {}

fn net(what: impl std::fmt::Display, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(NetError(format!("{what}: {e}")))
}

/// An I/O error on a connection, as a `Stalled` if it is a timeout, else a `NetError`.
pub fn io_failure(what: impl std::fmt::Display, e: &io::Error) -> anyhow::Error {
    let message = format!("{what}: {e}");
    if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
        anyhow::Error::new(Stalled(message))
    } else {
        anyhow::Error::new(NetError(message))
    }
}

/// A TCP stream that fails when the server keeps us waiting, the one place every read and
/// write of a connection (TLS records included) goes through. With `timeout` = T
/// (`STEVEDORE_REGISTRY_TIMEOUT`, 60 s by default):
///
/// - no byte may take longer than T to come or go (time spent waiting on the socket);
/// - each stretch of T spent waiting must move at least T x 1 KiB (`FLOOR`), so a server that
///   drips a byte every few seconds fails after T of waiting, not never;
/// - a phase with a deadline (connecting with TLS; a request held in memory with its whole
///   response; a response head after a streamed body; a body read into memory) must end by it.
///
/// Only time spent blocked in the socket counts: a layer we compress slowly while streaming it
/// into a request is not the server's fault. Every wait is bounded by whichever limit comes
/// first (the socket timeout is set to it before each call).
struct Paced {
    tcp: TcpStream,
    timeout: Duration,
    deadline: Option<Instant>,
    /// Time spent waiting in the current stretch, and the bytes moved in it.
    busy: Duration,
    moved: u64,
    /// Time spent waiting since the last byte moved.
    quiet: Duration,
    /// The socket timeouts last set: read, write.
    set: [Option<Duration>; 2],
}

impl Paced {
    fn new(tcp: TcpStream, timeout: Duration) -> Paced {
        Paced { tcp, timeout, deadline: None, busy: Duration::ZERO, moved: 0, quiet: Duration::ZERO, set: [None, None] }
    }

    /// Starts a phase: a fresh stretch, and the deadline the whole phase must meet, if any.
    fn phase(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        self.busy = Duration::ZERO;
        self.moved = 0;
        self.quiet = Duration::ZERO;
    }

    fn stalled(&self, why: String) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, format!("{why} ({}={})", crate::util::settings::REGISTRY_TIMEOUT_VAR, self.timeout.as_secs_f64()))
    }

    fn io(&mut self, write: bool, mut op: impl FnMut(&mut TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        loop {
            if self.busy >= self.timeout {
                if (self.moved as f64) < FLOOR * self.timeout.as_secs_f64() {
                    let dir = if write { "took" } else { "sent" };
                    return Err(self.stalled(format!("too slow: the server {dir} {} bytes in {} of waiting, less than 1 KiB/s", self.moved, seconds(self.busy))));
                }
                self.busy = Duration::ZERO;
                self.moved = 0;
            }
            let start = Instant::now();
            let mut limit = self.timeout.saturating_sub(self.quiet).min(self.timeout - self.busy);
            if let Some(d) = self.deadline {
                let left = d.saturating_duration_since(start);
                if left.is_zero() {
                    return Err(self.stalled(format!("no complete answer within {}", seconds(self.timeout))));
                }
                limit = limit.min(left);
            }
            let limit = limit.max(Duration::from_millis(1));
            let slot = &mut self.set[write as usize];
            if *slot != Some(limit) {
                if write { self.tcp.set_write_timeout(Some(limit))? } else { self.tcp.set_read_timeout(Some(limit))? }
                *slot = Some(limit);
            }
            let r = op(&mut self.tcp);
            let waited = start.elapsed();
            self.busy += waited;
            match r {
                Ok(n) => {
                    self.moved += n as u64;
                    self.quiet = if n > 0 { Duration::ZERO } else { self.quiet + waited };
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    self.quiet += waited;
                    if self.quiet >= self.timeout {
                        let what = if write { "the server took nothing" } else { "no data" };
                        return Err(self.stalled(format!("{what} for {}", seconds(self.timeout))));
                    }
                    // The stretch or the deadline is over: the checks above say which.
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io(false, |t| t.read(buf))
    }
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io(true, |t| t.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

enum Stream {
    Plain(Paced),
    Tls(Box<StreamOwned<ClientConnection, Paced>>),
}

impl Stream {
    fn paced(&mut self) -> &mut Paced {
        match self {
            Stream::Plain(p) => p,
            Stream::Tls(s) => &mut s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An open connection: a buffered reader over the stream (writes go to `get_mut()`).
type Conn = BufReader<Stream>;
type PoolKey = (bool, String, u16);

/// Counters shared by every request of a client.
#[derive(Default, Debug)]
pub struct Stats {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

pub struct Client {
    tls: Arc<ClientConfig>,
    /// Used instead of `tls` with --insecure: any certificate is accepted.
    tls_unverified: Arc<ClientConfig>,
    pool: Arc<Mutex<HashMap<PoolKey, Vec<Conn>>>>,
    pub stats: Arc<Mutex<Stats>>,
    /// How long the server may keep us waiting (`Paced`).
    pub timeout: Duration,
}

impl Client {
    /// A client with the registry timeout of the settings (`STEVEDORE_REGISTRY_TIMEOUT`).
    pub fn new() -> Result<Client> {
        Client::with_timeout(crate::util::settings::get().registry_timeout()?)
    }

    pub fn with_timeout(timeout: Duration) -> Result<Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        // Extra CAs (a private registry's, or a test's) from the variables Nix builds and
        // OpenSSL-based tools honour.
        for (var, path) in &crate::util::settings::get().ca_files {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| anyhow!("cannot read {var}={}: {e}", path.to_string_lossy()))?;
            for cert in certs {
                let cert = cert.map_err(|e| anyhow!("{var}={}: bad PEM: {e}", path.to_string_lossy()))?;
                let _ = roots.add(cert);
            }
        }
        let tls = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS setup")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls_unverified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS setup")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        Ok(Client {
            tls: Arc::new(tls),
            tls_unverified: Arc::new(tls_unverified),
            pool: Default::default(),
            stats: Default::default(),
            timeout,
        })
    }

    /// A new connection, TCP and TLS set up by `deadline`.
    fn connect(&self, url: &Url, verify: bool, deadline: Instant) -> Result<Conn> {
        let host = url.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<_> = (host, url.port)
            .to_socket_addrs()
            .map_err(|e| net(format!("cannot resolve {}", url.host), e))?
            .collect();
        let what = format!("cannot connect to {}", url.host_header());
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(t), _) => t,
            (None, Some(e)) => return Err(io_failure(&what, &e)),
            (None, None) => return Err(net(&what, "no address")),
        };
        tcp.set_nodelay(true).ok();
        let mut paced = Paced::new(tcp, self.timeout);
        paced.phase(Some(deadline));
        let stream = if url.tls {
            let name = ServerName::try_from(host.to_string()).map_err(|_| anyhow!("bad TLS server name {host:?}"))?;
            let config = if verify { self.tls.clone() } else { self.tls_unverified.clone() };
            let conn = ClientConnection::new(config, name).context("TLS setup")?;
            let mut s = StreamOwned::new(conn, paced);
            // Handshake now, so certificate problems are reported as such.
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).map_err(|e| io_failure(format!("TLS handshake with {}", url.host_header()), &e))?;
            }
            Stream::Tls(Box::new(s))
        } else {
            Stream::Plain(paced)
        };
        Ok(BufReader::with_capacity(64 * 1024, stream))
    }

    fn take_pooled(&self, url: &Url) -> Option<Conn> {
        self.pool.lock().ok()?.get_mut(&(url.tls, url.host.clone(), url.port))?.pop()
    }

    /// Sends a request with a body in memory; the whole exchange (connecting, the request, the
    /// response head, and a body read with `bytes` or `discard`) must end within the timeout.
    /// A kept-alive connection that turns out to be closed is replaced once, transparently,
    /// within the same deadline (one that timed out is not: that is the server's answer).
    pub fn send(&self, method: &str, url: &Url, headers: &[(String, String)], body: &[u8], verify: bool) -> Result<Response> {
        let deadline = Instant::now() + self.timeout;
        if let Some(conn) = self.take_pooled(url) {
            match self.exchange(conn, method, url, headers, body, deadline) {
                Ok(r) => return Ok(r),
                Err(e) if e.downcast_ref::<NetError>().is_some() => {} // stale: try a new connection
                Err(e) => return Err(e),
            }
        }
        let conn = self.connect(url, verify, deadline)?;
        self.exchange(conn, method, url, headers, body, deadline)
    }

    fn exchange(&self, conn: Conn, method: &str, url: &Url, headers: &[(String, String)], body: &[u8], deadline: Instant) -> Result<Response> {
        let mut w = self.start_on(conn, method, url, headers, body.len() as u64, Some(deadline))?;
        if let Err(e) = w.write_all(body) {
            return w.early_response().ok_or_else(|| io_failure(format!("sending {method} {url}"), &e));
        }
        w.finish()
    }

    /// Starts a request whose body (exactly `len` bytes) the caller writes, on a new connection:
    /// connected within the timeout, the body then moving at the `Paced` floor.
    pub fn start(&self, method: &str, url: &Url, headers: &[(String, String)], len: u64, verify: bool) -> Result<BodyWriter> {
        let conn = self.connect(url, verify, Instant::now() + self.timeout)?;
        self.start_on(conn, method, url, headers, len, None)
    }

    /// Writes the request head; `deadline` is the exchange's (a body in memory), or None for a
    /// streamed body (its response head then has the timeout from the body's end).
    fn start_on(&self, mut conn: Conn, method: &str, url: &Url, headers: &[(String, String)], len: u64, deadline: Option<Instant>) -> Result<BodyWriter> {
        conn.get_mut().paced().phase(deadline);
        let mut head = format!("{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: stevedore/{}\r\n", url.path, url.host_header(), env!("CARGO_PKG_VERSION"));
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        if len > 0 || !matches!(method, "GET" | "HEAD") {
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        head.push_str("\r\n");
        conn.get_mut().write_all(head.as_bytes()).map_err(|e| io_failure(format!("sending {method} {url}"), &e))?;
        if let Ok(mut s) = self.stats.lock() {
            s.requests += 1;
            s.bytes_sent += head.len() as u64;
        }
        Ok(BodyWriter {
            conn: Some(conn),
            failed: false,
            remaining: len,
            method: method.to_string(),
            url: url.clone(),
            buf: Vec::with_capacity(64 * 1024),
            deadline,
            timeout: self.timeout,
            client_pool: self.pool.clone(),
            stats: self.stats.clone(),
        })
    }
}

/// Accepts any server certificate (--insecure), still checking the handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://auth.example/token?service=x").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (true, "auth.example", 443, "/token?service=x"));
        let u = Url::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((u.port, u.path.as_str()), (5000, "/"));
        assert_eq!(u.join("/v2/x/blobs/uploads/abc?_state=1").unwrap().to_string(), "http://127.0.0.1:5000/v2/x/blobs/uploads/abc?_state=1");
        assert_eq!(split_host_port("[::1]:5000", 443).unwrap(), ("[::1]".to_string(), 5000));
        assert!(Url::parse("http://user:pw@host/").is_err());
        // Origins: scheme, host (any case) and port, default ports included.
        let base = Url::parse("https://Registry.example/v2/").unwrap();
        assert!(base.same_origin(&Url::parse("https://registry.example:443/v2/x?y").unwrap()));
        for other in ["http://registry.example/v2/", "https://registry.example:5000/", "https://storage.example/", "https://registry.example.evil/"] {
            assert!(!base.same_origin(&Url::parse(other).unwrap()), "{other}");
        }
        assert!(!base.same_origin(&base.join("//storage.example/blob").unwrap()));
    }

    /// Framing a hostile server might send: each is an error after a bounded read.
    #[test]
    fn hostile_framing_is_bounded() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let replies = [
            // A Content-Length over the limit: refused before reading the body.
            "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nabc".to_string(),
            // A chunk not followed by CRLF.
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n".to_string(),
            // Endless trailers (well, 200 of them).
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{}\r\n", "X: y\r\n".repeat(200)),
            // Endless interim responses.
            "HTTP/1.1 100 Continue\r\n\r\n".repeat(50),
        ];
        let n = replies.len();
        let server = std::thread::spawn(move || {
            for reply in replies {
                let (s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                }
                let mut w = s;
                let _ = w.write_all(reply.as_bytes());
            }
        });
        let client = Client::new().unwrap();
        let url = Url::parse(&format!("http://127.0.0.1:{port}/a")).unwrap();
        let mut errors = Vec::new();
        for _ in 0..n {
            let e = client.send("GET", &url, &[], &[], true).and_then(|r| r.bytes(100)).unwrap_err();
            errors.push(format!("{e:#}"));
        }
        server.join().unwrap();
        assert!(errors[0].contains("larger than 100 bytes"), "{errors:?}");
        assert!(errors[1].contains("bad chunk framing"), "{errors:?}");
        assert!(errors[2].contains("too many chunked trailers"), "{errors:?}");
        assert!(errors[3].contains("too many interim"), "{errors:?}");
    }

    /// Chunked and sized bodies on one kept-alive connection, from a scripted server.
    #[test]
    fn chunked_and_keep_alive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for reply in [
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: 1\r\n\r\n",
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\nLocation: /x\r\n\r\nabc",
            ] {
                let mut line = String::new();
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" {
                        break;
                    }
                }
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let client = Client::new().unwrap();
        let url = Url::parse(&format!("http://127.0.0.1:{port}/a")).unwrap();
        let r = client.send("GET", &url, &[], &[], true).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.bytes(100).unwrap(), b"hello world");
        let r = client.send("GET", &url, &[], &[], true).unwrap();
        assert_eq!((r.status, r.header("LOCATION")), (201, Some("/x")));
        assert_eq!(r.bytes(100).unwrap(), b"abc");
        server.join().unwrap();
        assert_eq!(client.stats.lock().unwrap().requests, 2);
    }

    /// A scripted server for one connection: reads the request head, then hands the socket to
    /// `then`.
    fn serve_once(then: impl FnOnce(TcpStream) + Send + 'static) -> Url {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            then(s);
        });
        Url::parse(&format!("http://127.0.0.1:{port}/a")).unwrap()
    }

    /// Writes `head`, then `unit` every `every` until the client goes away.
    fn drip(head: &'static str, unit: &'static [u8], every: Duration) -> impl FnOnce(TcpStream) + Send + 'static {
        move |mut s| {
            let _ = s.write_all(head.as_bytes());
            while s.write_all(unit).is_ok() {
                std::thread::sleep(every);
            }
        }
    }

    /// A server that says nothing, or drips its head or its body, fails a request within about
    /// the timeout, as a `Stalled` error (one line), whatever the socket's own timeouts.
    #[test]
    fn slow_servers_time_out() {
        let t = Duration::from_secs(1);
        let client = Client::with_timeout(t).unwrap();
        let silent = |mut s: TcpStream| {
            let _ = s.read(&mut [0u8; 1]); // until the client goes away
        };
        let cases: Vec<(Url, bool, &str)> = vec![
            // (Silence passes the deadline and the quiet limit together: either may be named.)
            (serve_once(silent), false, "within 1 s|no data for 1 s"),
            // A header line every 0.2 s: never 1 s without a byte, but no end to the head (and
            // below the floor: either may be named).
            (serve_once(drip("HTTP/1.1 200 OK\r\n", b"X-Drip: y\r\n", Duration::from_millis(200))), false, "within 1 s|too slow"),
            // A streamed body at about 100 bytes/s.
            (serve_once(drip("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"0123456789", Duration::from_millis(100))), true, "too slow: the server sent"),
            // The same body read into memory: due with the head.
            (serve_once(drip("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"0123456789", Duration::from_millis(100))), false, "within 1 s|too slow"),
            // A head, then silence.
            (serve_once(drip("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"", Duration::from_secs(100))), true, "no data for 1 s"),
        ];
        for (url, stream, want) in cases {
            let started = Instant::now();
            let e = client
                .send("GET", &url, &[], &[], true)
                .and_then(|mut r| {
                    if stream {
                        io::copy(&mut r, &mut io::sink()).map_err(|e| io_failure("reading", &e))?;
                        Ok(())
                    } else {
                        r.bytes(1 << 20).map(drop)
                    }
                })
                .unwrap_err();
            let took = started.elapsed();
            let msg = format!("{e:#}");
            assert!(want.split('|').any(|w| msg.contains(w)) && msg.contains("STEVEDORE_REGISTRY_TIMEOUT=1") && !msg.contains('\n'), "{want}: {msg}");
            assert!(e.downcast_ref::<Stalled>().is_some(), "{msg}");
            assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{want}: took {took:?}");
        }
    }

    /// A server that stops reading a streamed request body fails the upload within about the
    /// timeout; one that answers first (a 401) and closes is heard.
    #[test]
    fn uploads_to_servers_that_stop_reading() {
        let client = Client::with_timeout(Duration::from_secs(1)).unwrap();
        let chunk = vec![0u8; 1 << 20];
        let upload = |url: &Url| -> (io::Error, BodyWriter, Duration) {
            let started = Instant::now();
            let mut w = client.start("PUT", url, &[], 1 << 30, true).unwrap();
            loop {
                if let Err(e) = w.write_all(&chunk) {
                    return (e, w, started.elapsed());
                }
                assert!(started.elapsed() < Duration::from_secs(20), "the upload never failed");
            }
        };
        let url = serve_once(|_s| std::thread::sleep(Duration::from_secs(30)));
        let (e, w, took) = upload(&url);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("the server took nothing for 1 s"), "{e}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        drop(w);
        let url = serve_once(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:1/t\"\r\nContent-Length: 0\r\n\r\n");
            std::thread::sleep(Duration::from_millis(200));
            // Closing with our body unread resets the connection.
        });
        let (e, w, _) = upload(&url);
        assert_ne!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let r = w.early_response().expect("the early 401 is read");
        assert_eq!((r.status, r.header("www-authenticate").is_some()), (401, true));
    }

    #[test]
    fn seconds_for_messages() {
        assert_eq!(seconds(Duration::from_secs(60)), "60 s");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5 s");
    }
}
