//! A session with one registry: scheme detection, authentication, retries, and the API calls
//! push, pull and index need.

use super::auth::{find_creds, parse_challenge, Challenge, Creds, Reference};
use super::http::{io_failure, BodyWriter, Client, NetError, Response, Stalled, Url};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

/// Manifest media types we read (and ask for), newest first.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or config we accept (the distribution spec suggests 4 MiB for manifests).
pub use crate::util::limits::JSON_LIMIT;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct Connect {
    /// `USER:PASSWORD`; else the auth files and their credential helpers.
    pub creds: Option<String>,
    /// Allow plain HTTP and unverified TLS.
    pub insecure: bool,
    /// Retries of a request that failed with a connection error, 5xx or 429.
    pub retries: u32,
    /// Print nothing on stderr but errors.
    pub quiet: bool,
}

enum Auth {
    None,
    Basic(String),
    Bearer { realm: String, service: Option<String>, token: Option<String> },
}

pub struct Registry {
    pub http: Client,
    /// `scheme://host[:port]`
    pub base: Url,
    /// The registry as the user named it, for messages.
    pub host: String,
    verify: bool,
    creds: Option<Creds>,
    /// Why there are no credentials although a helper is configured.
    creds_note: Option<String>,
    auth: Mutex<Auth>,
    /// Scopes asked for when a token is needed, e.g. `repository:team/app:pull,push`.
    scopes: Mutex<Vec<String>>,
    pub retries: u32,
}

/// An HTTP status the registry answered with, kept so callers can tell 404 from the rest.
#[derive(Debug)]
pub struct StatusError {
    pub status: u16,
    pub message: String,
    /// The server's Retry-After (capped), for whoever retries.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for StatusError {}

/// A 401 with a new Bearer challenge on a request that carried our token (it expired, or
/// lacks a scope): the token is dropped, and the request (an upload: from a new session) is
/// worth one more try with a fresh one.
#[derive(Debug)]
pub struct Expired(pub String);

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Expired {}

/// A manifest the registry does not have (404), named.
#[derive(Debug)]
pub struct NotFound(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: not found", self.0)
    }
}
impl std::error::Error for NotFound {}

/// What a registry answered a manifest PUT with.
#[derive(Debug, Default)]
pub struct ManifestPut {
    /// `OCI-Subject`: the registry has the referrers API and indexed the manifest's subject.
    pub oci_subject: Option<String>,
}

/// Whether a failure is worth another try: connection trouble, a timeout, 5xx, 429, an expired
/// token.
pub fn retriable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<NetError>().is_some()
            || c.downcast_ref::<Stalled>().is_some()
            || c.downcast_ref::<Expired>().is_some()
            || c.downcast_ref::<StatusError>().is_some_and(|s| s.status >= 500 || s.status == 429)
    })
}

/// Whether the server kept us waiting past the timeout (or below the floor).
pub fn stalled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Stalled>().is_some())
}

fn expired(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Expired>().is_some())
}

/// The tries of one request, or of one blob upload or download (retried as a whole, its
/// requests inside not retried on their own, so retries never multiply):
///
/// - after a connection failure, 5xx or 429: up to `--retries` (R) more, waiting 0.5 s, 1 s,
///   2 s, ... (at most 15 s; or the server's Retry-After, at most 10 s) before each;
/// - of these, one at most after a timeout: a server that kept us waiting twice is not waited
///   on a third time;
/// - after an expired token: one more, at once, with a fresh token.
///
/// So with timeout T (`STEVEDORE_REGISTRY_TIMEOUT`, 60 s) and R = 4, the longest a registry
/// can hold one request whose bodies are in memory (each try is bounded by T, see
/// `http::Paced`) is:
///
/// - silent, or dripping: 2 tries that time out, T each, and a 0.5 s wait: 2T + 0.5 s (2 min);
/// - answering every try with a 5xx just before T: (R + 1) T and the waits, 5T + 40 s at most
///   (5 min 40 s);
/// - plus T for the one try again after a 401 with a new challenge, and, if it asks for a token
///   first, the token request's own worst case (the same), twice at most (the first token, and
///   a fresh one for an expired one). A redirect is a request of its own (5 at most); with
///   --insecure, the first contact may spend T on an HTTPS handshake before plain HTTP.
///
/// A streamed blob body (an upload, or a download of the size a descriptor gives) adds its
/// size at the 1 KiB/s floor per try. A command stops at the first request that runs out of
/// tries; a registry that answers, however slowly, gets a number of requests that grows with
/// the image (a few per blob), each bounded as above.
pub struct Tries {
    max: u32,
    attempt: u32,
    stalled: bool,
    refreshed: bool,
}

impl Tries {
    pub fn new(retries: u32) -> Tries {
        Tries { max: retries, attempt: 0, stalled: false, refreshed: false }
    }

    /// After failure `e`: how long to wait before the next try, or None to give up.
    pub fn after_error(&mut self, e: &anyhow::Error) -> Option<Duration> {
        if expired(e) {
            return (!std::mem::replace(&mut self.refreshed, true)).then_some(Duration::ZERO);
        }
        if self.attempt >= self.max || !retriable(e) {
            return None;
        }
        if stalled(e) && std::mem::replace(&mut self.stalled, true) {
            return None;
        }
        self.attempt += 1;
        Some(retry_delay(e, self.attempt))
    }

    /// After a 5xx or 429 answer (with its Retry-After): how long to wait, or None to give up.
    pub fn after_status(&mut self, after: Option<Duration>) -> Option<Duration> {
        if self.attempt >= self.max {
            return None;
        }
        self.attempt += 1;
        Some(after.unwrap_or_else(|| backoff(self.attempt)))
    }
}

/// Backoff before try `attempt` (1-based): 0.5 s, 1 s, 2 s, 4 s, ... capped at 15 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((500u64 << attempt.saturating_sub(1).min(5)).min(15_000))
}

/// Longest Retry-After we honour: a server asking for minutes should not stall a push that long
/// per try (the tries are bounded anyway).
const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);

/// A response's Retry-After in seconds (the HTTP-date form falls back to our backoff), capped.
fn retry_after(resp: &Response) -> Option<Duration> {
    resp.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(|s| Duration::from_secs(s).min(RETRY_AFTER_CAP))
}

/// How long to wait before try `attempt` after `e`: the server's Retry-After if it gave one.
pub fn retry_delay(e: &anyhow::Error, attempt: u32) -> Duration {
    e.chain().find_map(|c| c.downcast_ref::<StatusError>().and_then(|s| s.retry_after)).unwrap_or_else(|| backoff(attempt))
}

/// One line from a registry's error body (`{"errors":[{"code","message"}]}`), if any.
fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(errs) = v.get("errors").and_then(Value::as_array) {
            let parts: Vec<String> = errs
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(Value::as_str).unwrap_or("");
                    let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
                    format!("{code}: {msg}")
                })
                .collect();
            if !parts.is_empty() {
                return one_line(&parts.join("; "));
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    if text.trim_start().starts_with('<') {
        return String::new(); // an HTML error page says nothing useful on one line
    }
    one_line(&text)
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

impl Registry {
    /// Opens a session with `reference`'s registry for `scopes`. With `insecure`, HTTPS without
    /// verification is tried first and plain HTTP after, as skopeo does.
    pub fn connect(reference: &Reference, args: &Connect, scopes: Vec<String>) -> Result<Registry> {
        let (creds, creds_note) = match &args.creds {
            Some(c) => (Some(super::auth::parse_creds(c)?), None),
            None => {
                let found = find_creds(reference)?;
                if let (Some(note), false) = (&found.note, args.quiet) {
                    eprintln!("{note}");
                }
                (found.creds, found.note)
            }
        };
        let http = Client::new()?;
        let host = reference.api_host().to_string();
        let mut reg = Registry {
            http,
            base: Url::parse(&format!("https://{host}"))?,
            host: reference.registry.clone(),
            verify: !args.insecure,
            creds,
            creds_note,
            auth: Mutex::new(Auth::None),
            scopes: Mutex::new(scopes),
            retries: args.retries,
        };
        let ping = reg.ping();
        let ping = match ping {
            // Only a failed handshake says "maybe plain HTTP"; a refused connection stays refused.
            Err(e) if args.insecure && format!("{e:#}").contains("TLS handshake") => {
                reg.base = Url::parse(&format!("http://{host}"))?;
                reg.ping()
            }
            other => other,
        };
        let resp = ping.map_err(|e| {
            let msg = format!("{e:#}");
            let hint = match () {
                _ if args.insecure || !msg.contains("TLS handshake") => "",
                _ if msg.contains("certificate") => " (trust its CA with SSL_CERT_FILE, or use --insecure)",
                _ => " (for plain HTTP, add --insecure)",
            };
            anyhow!("cannot reach registry {}: {e:#}{hint}", reg.host)
        })?;
        let status = resp.status;
        let challenge = resp.header("www-authenticate").and_then(parse_challenge);
        resp.discard();
        match status {
            200..=299 => {}
            401 => {
                reg.set_challenge(challenge)?;
                // Get the token now: bad credentials fail before any work is done.
                reg.auth_header()?;
            }
            404 => bail!("{} does not serve the registry API (GET /v2/ gave 404)", reg.host),
            s => bail!("registry {}: GET /v2/ gave HTTP {s}", reg.host),
        }
        Ok(reg)
    }

    fn ping(&self) -> Result<Response> {
        let url = self.url("/v2/")?;
        let mut tries = Tries::new(self.retries);
        loop {
            let wait = match self.http.send("GET", &url, &[], &[], self.verify) {
                Ok(r) if r.status >= 500 || r.status == 429 => match tries.after_status(retry_after(&r)) {
                    Some(w) => {
                        r.discard();
                        w
                    }
                    None => return Ok(r),
                },
                Ok(r) => return Ok(r),
                // A TLS handshake with a plain-HTTP server fails for good: no retry.
                Err(e) if e.to_string().contains("TLS") => return Err(e),
                Err(e) => tries.after_error(&e).ok_or(e)?,
            };
            std::thread::sleep(wait);
        }
    }

    fn set_challenge(&self, challenge: Option<Challenge>) -> Result<()> {
        let mut auth = self.auth.lock().unwrap();
        match challenge {
            Some(Challenge::Basic) => {
                let creds = self.creds.as_ref().ok_or_else(|| self.unauthorized())?;
                if creds.identity_token {
                    bail!("registry {} asks for a password, but {} gave an identity token (for token servers only)", self.host, creds.source);
                }
                *auth = Auth::Basic(creds.basic_header());
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                *auth = Auth::Bearer { realm, service, token: None };
            }
            None => bail!("registry {} asks for authentication of an unknown kind", self.host),
        }
        Ok(())
    }

    /// Asks for more scopes (e.g. pull on a repository to mount from); the next token covers them.
    pub fn add_scope(&self, scope: String) {
        let mut scopes = self.scopes.lock().unwrap();
        if !scopes.contains(&scope) {
            scopes.push(scope);
            if let Auth::Bearer { token, .. } = &mut *self.auth.lock().unwrap() {
                *token = None;
            }
        }
    }

    pub fn url(&self, path: &str) -> Result<Url> {
        self.base.join(path)
    }

    /// The Authorization header, fetching a bearer token first if needed.
    fn auth_header(&self) -> Result<Option<String>> {
        let mut auth = self.auth.lock().unwrap();
        match &mut *auth {
            Auth::None => Ok(None),
            Auth::Basic(h) => Ok(Some(h.clone())),
            Auth::Bearer { realm, service, token } => {
                if token.is_none() {
                    *token = Some(self.fetch_token(realm, service.as_deref())?);
                }
                Ok(token.as_ref().map(|t| format!("Bearer {t}")))
            }
        }
    }

    fn fetch_token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        let mut url = Url::parse(realm).map_err(|e| anyhow!("{}", self.redact(format!("registry {}: bad token realm: {e}", self.host))))?;
        if url.tls && !self.verify {
            // keep as is: --insecure already relaxes verification below
        }
        let scopes = self.scopes.lock().unwrap().clone();
        let mut headers = Vec::new();
        let mut method = "GET";
        let mut body = Vec::new();
        match &self.creds {
            Some(c) if c.identity_token => {
                // OAuth2: the identity token is a refresh token, traded for an access token by
                // a form POST to the realm (scopes space-separated), as docker does.
                let mut form = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", c.pass.clone())];
                if let Some(s) = service {
                    form.push(("service", s.to_string()));
                }
                if !scopes.is_empty() {
                    form.push(("scope", scopes.join(" ")));
                }
                form.push(("client_id", "stevedore".into()));
                body = form.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect::<Vec<_>>().join("&").into_bytes();
                headers.push(("Content-Type".to_string(), "application/x-www-form-urlencoded".to_string()));
                method = "POST";
            }
            creds => {
                let mut query = Vec::new();
                if let Some(s) = service {
                    query.push(format!("service={}", urlencode(s)));
                }
                for s in &scopes {
                    query.push(format!("scope={}", urlencode(s)));
                }
                if !query.is_empty() {
                    url.path.push(if url.path.contains('?') { '&' } else { '?' });
                    url.path.push_str(&query.join("&"));
                }
                if let Some(c) = creds {
                    headers.push(("Authorization".to_string(), c.basic_header()));
                }
            }
        }
        // The credentials go to the realm (the token server) in this request only; the token
        // it gives goes to the registry's origin only (`headers_for`).
        let mut tries = Tries::new(self.retries);
        let resp = loop {
            let r = self.http.send(method, &url, &headers, &body, self.verify);
            let wait = match r {
                Ok(r) if r.status >= 500 || r.status == 429 => match tries.after_status(retry_after(&r)) {
                    Some(w) => {
                        r.discard();
                        w
                    }
                    None => break r,
                },
                Ok(r) => break r,
                Err(e) => match tries.after_error(&e) {
                    Some(w) => w,
                    None => bail!("registry {}: cannot get a token: {e:#}", self.host),
                },
            };
            std::thread::sleep(wait);
        };
        match resp.status {
            200 => {}
            resp_status @ (401 | 403) => {
                resp.discard();
                return Err(match &self.creds {
                    Some(c) => anyhow!("registry {} rejected the credentials from {} (HTTP {})", self.host, c.source, resp_status),
                    None => anyhow!("registry {} refused an anonymous token: give --creds or log in (auth file){}", self.host, self.note()),
                });
            }
            s => {
                resp.discard();
                bail!("registry {}: token request gave HTTP {s}", self.host);
            }
        }
        let body = resp.bytes(1 << 20).map_err(|_| anyhow!("registry {}: the token response is larger than 1 MiB", self.host))?;
        let json: Value = crate::util::limits::parse_json(&body, crate::util::limits::METADATA_VALUES).map_err(|_| anyhow!("registry {}: the token response is not JSON", self.host))?;
        json.get("token")
            .or_else(|| json.get("access_token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("registry {}: the token response has no token", self.host))
    }

    /// What a 401 on an authenticated request means, as an error.
    fn unauthorized(&self) -> anyhow::Error {
        match &self.creds {
            Some(c) => anyhow!("registry {} rejected the credentials from {} (HTTP 401)", self.host, c.source),
            None => anyhow!("registry {} needs credentials: give --creds or log in (auth file){}", self.host, self.note()),
        }
    }

    /// Why a configured credential helper gave nothing, for errors about missing credentials.
    fn note(&self) -> String {
        self.creds_note.as_ref().map_or(String::new(), |n| format!(" ({n})"))
    }

    /// `headers`, plus Authorization if `url` is on the registry's own origin: an upload
    /// Location or a redirect may point elsewhere (blob storage), and no credential, basic or
    /// bearer, goes there (as docker does).
    fn headers_for(&self, url: &Url, headers: &[(&str, &str)]) -> Result<Vec<(String, String)>> {
        let mut h: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if url.same_origin(&self.base) {
            if let Some(a) = self.auth_header()? {
                h.push(("Authorization".into(), a));
            }
        }
        Ok(h)
    }

    /// A `Location` header resolved against `base`; a bad one is an error without our secrets
    /// (a server may echo them into it).
    pub fn join_location(&self, base: &Url, location: &str) -> Result<Url> {
        base.join(location).map_err(|e| anyhow!("{}", self.redact(format!("registry {}: bad Location: {e:#}", self.host))))
    }

    /// `s` (text a server sent, for an error message) with our secrets blanked out, in case
    /// it echoes a header back.
    fn redact(&self, s: String) -> String {
        let mut secrets = Vec::new();
        if let Some(c) = &self.creds {
            let basic = c.basic_header();
            secrets.push(basic.trim_start_matches("Basic ").to_string());
            secrets.push(c.pass.clone());
        }
        if let Ok(auth) = self.auth.try_lock() {
            if let Auth::Bearer { token: Some(t), .. } = &*auth {
                secrets.push(t.clone());
            }
        }
        secrets.into_iter().filter(|x| !x.is_empty()).fold(s, |s, x| s.replace(&x, "<redacted>"))
    }

    /// A request with an in-memory body, retried (see `Tries`) on connection errors, timeouts,
    /// 5xx and 429, with a token refreshed once on 401. Returns any other response, error
    /// statuses included.
    pub fn request(&self, method: &str, url: &Url, headers: &[(&str, &str)], body: &[u8]) -> Result<Response> {
        self.request_tries(method, url, headers, body, self.retries)
    }

    /// `request` without retries (but with the token refresh), for a step of something its
    /// caller retries as a whole.
    fn request_once(&self, method: &str, url: &Url, headers: &[(&str, &str)], body: &[u8]) -> Result<Response> {
        self.request_tries(method, url, headers, body, 0)
    }

    fn request_tries(&self, method: &str, url: &Url, headers: &[(&str, &str)], body: &[u8], retries: u32) -> Result<Response> {
        let mut tries = Tries::new(retries);
        let mut reauthed = false;
        loop {
            let same_origin = url.same_origin(&self.base);
            let h = self.headers_for(url, headers)?;
            let result = self.http.send(method, url, &h, body, self.verify);
            let wait = match result {
                Ok(r) if r.status == 401 && same_origin => {
                    let challenge = r.header("www-authenticate").and_then(parse_challenge);
                    r.discard();
                    if reauthed {
                        return Err(self.unauthorized());
                    }
                    reauthed = true;
                    // A new challenge (first auth, an expired token, or a scope we lacked).
                    self.reauth(challenge)?;
                    continue;
                }
                Ok(r) if r.status >= 500 || r.status == 429 => match tries.after_status(retry_after(&r)) {
                    Some(w) => {
                        r.discard();
                        w
                    }
                    None => return Ok(r),
                },
                Ok(r) => return Ok(r),
                Err(e) => tries.after_error(&e).ok_or(e)?,
            };
            std::thread::sleep(wait);
        }
    }

    /// Takes a 401's challenge: its scopes join ours, and the next request gets a new token
    /// (or, for a Basic challenge to Basic credentials, fails: they were refused).
    fn reauth(&self, challenge: Option<Challenge>) -> Result<()> {
        if let Some(Challenge::Bearer { scope: Some(s), .. }) = &challenge {
            for s in s.split(' ') {
                self.add_scope(s.to_string());
            }
        }
        if let (Some(Challenge::Basic), Auth::Basic(_)) = (&challenge, &*self.auth.lock().unwrap()) {
            return Err(self.unauthorized());
        }
        self.set_challenge(challenge)
    }

    /// Starts a request whose body (`len` bytes) the caller streams. Not retried here: the
    /// caller re-produces the body (in a new upload session).
    pub fn start_stream(&self, method: &str, url: &Url, headers: &[(&str, &str)], len: u64) -> Result<BodyWriter> {
        let h = self.headers_for(url, headers)?;
        self.http.start(method, url, &h, len, self.verify)
    }

    /// Turns an unexpected response into an error naming what failed.
    pub fn fail(&self, what: &str, resp: Response) -> anyhow::Error {
        let status = resp.status;
        let foreign = !resp.url().same_origin(&self.base);
        if status == 401 && !foreign {
            // On a streamed request (`request` handles its own): a Bearer challenge means a new
            // token may do, for one more try of the whole upload.
            let challenge = resp.header("www-authenticate").and_then(parse_challenge);
            resp.discard();
            if let Some(c @ Challenge::Bearer { .. }) = challenge {
                if !matches!(*self.auth.lock().unwrap(), Auth::Basic(_)) {
                    return match self.reauth(Some(c)) {
                        Ok(()) => anyhow::Error::new(Expired(format!("{what}: registry {} refused our token (HTTP 401)", self.host))),
                        Err(e) => e,
                    };
                }
            }
            return self.unauthorized();
        }
        let retry_after = retry_after(&resp);
        let reason = resp.reason.clone();
        let origin = resp.url().origin();
        let detail = resp.bytes(64 * 1024).map(|b| error_detail(&b)).unwrap_or_default();
        let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
        let message = if foreign {
            // Not the registry refusing our credentials: we never send them to another origin.
            format!("{what}: {origin} refused with HTTP {status} {reason} (not registry {}'s origin: no credentials were sent there){detail}", self.host)
        } else {
            format!("{what}: HTTP {status} {reason}{detail}")
        };
        // The reason phrase and the body are the server's words: they may echo our headers.
        let message = self.redact(message);
        anyhow::Error::new(StatusError { status, message, retry_after })
    }

    /// A GET or HEAD, following redirects (to a storage backend: without our Authorization).
    fn follow(&self, method: &str, mut url: Url, headers: &[(&str, &str)], what: &str, retries: u32) -> Result<Response> {
        for _ in 0..5 {
            let resp = self.request_tries(method, &url, headers, &[], retries)?;
            match resp.status {
                301 | 302 | 303 | 307 | 308 => {
                    let loc = resp.header("location").map(str::to_owned);
                    resp.discard();
                    url = self.join_location(&url, &loc.ok_or_else(|| anyhow!("{what}: redirect without Location"))?)?;
                }
                _ => return Ok(resp),
            }
        }
        bail!("{what}: too many redirects")
    }

    /// HEAD a blob: its size if present.
    pub fn blob_exists(&self, repo: &str, digest: &str) -> Result<Option<u64>> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let resp = self.follow("HEAD", url, &[], &format!("checking blob {digest} in {}/{repo}", self.host), self.retries)?;
        match resp.status {
            200 => Ok(Some(resp.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0))),
            404 => Ok(None),
            _ => Err(self.fail(&format!("checking blob {digest} in {}/{repo}", self.host), resp)),
        }
    }

    /// Tries a cross-repository mount; true if the blob is now in `repo`.
    pub fn mount(&self, repo: &str, digest: &str, from: &str) -> Result<bool> {
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"))?;
        let resp = self.request("POST", &url, &[], &[])?;
        match resp.status {
            201 => {
                resp.discard();
                Ok(true)
            }
            202 => {
                // Not mountable: the registry opened an upload instead; cancel it.
                let location = resp.header("location").map(str::to_owned);
                resp.discard();
                if let Some(loc) = location {
                    if let Ok(u) = self.url(&loc).or_else(|_| self.base.join(&loc)) {
                        if let Ok(r) = self.request("DELETE", &u, &[], &[]) {
                            r.discard();
                        }
                    }
                }
                Ok(false)
            }
            // Some registries answer an unmountable blob with an error rather than 202.
            400..=499 => {
                resp.discard();
                Ok(false)
            }
            _ => Err(self.fail(&format!("mounting blob {digest} from {from}"), resp)),
        }
    }

    /// Opens an upload session; returns its URL. Not retried here: callers retry the upload as
    /// a whole.
    pub fn start_upload(&self, repo: &str) -> Result<Url> {
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let resp = self.request_once("POST", &url, &[], &[])?;
        if resp.status != 202 {
            return Err(self.fail(&format!("starting an upload to {}/{repo}", self.host), resp));
        }
        let loc = resp.header("location").map(str::to_owned);
        resp.discard();
        let loc = loc.ok_or_else(|| anyhow!("registry {}: upload started without a Location", self.host))?;
        self.join_location(&self.base, &loc)
    }

    /// Uploads a blob held in memory (configs, manifests' blobs): POST, then one PUT.
    pub fn upload_bytes(&self, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
        let mut tries = Tries::new(self.retries);
        loop {
            let result = (|| {
                let url = with_digest(self.start_upload(repo)?, digest);
                let resp = self.request_once("PUT", &url, &[("Content-Type", "application/octet-stream")], data)?;
                if resp.status != 201 {
                    return Err(self.fail(&format!("uploading blob {digest}"), resp));
                }
                resp.discard();
                Ok(())
            })();
            match result {
                Err(e) => std::thread::sleep(tries.after_error(&e).ok_or(e)?),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// GET a manifest: (bytes, media type, digest of the bytes).
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<(Vec<u8>, String, String)> {
        self.get_manifest_sized(repo, reference, None)
    }

    /// GET a manifest whose size a descriptor gives (else at most JSON_LIMIT bytes are read).
    pub fn get_manifest_sized(&self, repo: &str, reference: &str, size: Option<u64>) -> Result<(Vec<u8>, String, String)> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let resp = self.request("GET", &url, &[("Accept", ACCEPT)], &[])?;
        if resp.status != 200 {
            let what = format!("getting manifest {}/{repo}:{reference}", self.host);
            if resp.status == 404 {
                resp.discard();
                return Err(anyhow::Error::new(NotFound(what)));
            }
            return Err(self.fail(&what, resp));
        }
        let media = resp.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_string();
        let what = format!("manifest {}/{repo}:{reference}", self.host);
        let body = match size {
            Some(n) => read_sized(resp, n, &what)?,
            None => resp.bytes(JSON_LIMIT).map_err(|_| anyhow!("{what} is larger than {JSON_LIMIT} bytes"))?,
        };
        let digest = format!("sha256:{}", crate::util::hex(&<sha2::Sha256 as sha2::Digest>::digest(&body)));
        if reference.starts_with("sha256:") && digest != reference {
            bail!("manifest {}/{repo}@{reference} has digest {digest}: the registry sent the wrong bytes", self.host);
        }
        let media = if media.is_empty() || media == "application/json" || media == "text/plain" {
            crate::util::limits::parse_json::<Value>(&body, crate::util::limits::METADATA_VALUES)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default()
        } else {
            media
        };
        Ok((body, media, digest))
    }

    /// PUT a manifest under `reference` (a digest or a tag).
    ///
    /// A manifest whose blobs the registry calls unknown is tried again (up to `--retries`):
    /// every blob was uploaded (or seen) before, so it is a registry that briefly cannot see one
    /// while another client commits the same blob (docker-registry's filesystem storage
    /// rewrites a blob's link file in place). A blob that is really missing fails each try.
    pub fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Result<ManifestPut> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let mut tries = Tries::new(self.retries);
        loop {
            let resp = self.request("PUT", &url, &[("Content-Type", media_type)], body)?;
            if resp.status == 201 || resp.status == 200 {
                let put = ManifestPut { oci_subject: resp.header("oci-subject").map(|s| s.trim().to_string()) };
                resp.discard();
                return Ok(put);
            }
            let e = self.fail(&format!("putting manifest {}/{repo}:{reference}", self.host), resp);
            let blob_unknown = e.downcast_ref::<StatusError>().is_some_and(|s| s.status == 400 && s.message.contains("MANIFEST_BLOB_UNKNOWN"));
            match tries.after_status(None) {
                Some(wait) if blob_unknown => std::thread::sleep(wait),
                _ => return Err(e),
            }
        }
    }

    /// GET a manifest that may not exist: None if the registry answers 404.
    pub fn find_manifest(&self, repo: &str, reference: &str) -> Result<Option<(Vec<u8>, String, String)>> {
        match self.get_manifest(repo, reference) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// GET a blob, following redirects (to a storage backend: without our Authorization). Not
    /// retried here: callers retry the download as a whole.
    pub fn get_blob(&self, repo: &str, digest: &str) -> Result<Response> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let what = format!("getting blob {digest} from {}/{repo}", self.host);
        let resp = self.follow("GET", url, &[], &what, 0)?;
        match resp.status {
            200 => Ok(resp),
            _ => Err(self.fail(&what, resp)),
        }
    }
}

/// Fails if a response announces a length other than the `size` a descriptor gives.
pub fn check_length(resp: &Response, size: u64, what: &str) -> Result<()> {
    match resp.content_length() {
        Some(n) if n != size => bail!("{what}: the registry announced {n} bytes (Content-Length), its descriptor says {size}"),
        _ => Ok(()),
    }
}

/// Reads a body that must be exactly `size` bytes (a descriptor's): at most `size + 1` bytes
/// are read, whatever the server sends.
pub fn read_sized(resp: Response, size: u64, what: &str) -> Result<Vec<u8>> {
    if size > JSON_LIMIT {
        bail!("{what} is too large ({size} bytes, at most {JSON_LIMIT})");
    }
    check_length(&resp, size, what)?;
    let mut resp = resp;
    resp.in_memory();
    let mut out = Vec::new();
    let n = resp.by_ref().take(size + 1).read_to_end(&mut out).map_err(|e| io_failure(format!("reading {what}"), &e))?;
    if n as u64 > size {
        bail!("{what} is longer than the {size} bytes its descriptor gives: stopped reading");
    }
    if (n as u64) < size {
        // A body without a length that ends early: as likely a dropped connection as a lie.
        return Err(anyhow::Error::new(NetError(format!("{what} is {n} bytes, shorter than the {size} bytes its descriptor gives"))));
    }
    Ok(out)
}

/// Adds `digest=` to an upload URL (which may already have a query, e.g. `_state=`).
pub fn with_digest(mut url: Url, digest: &str) -> Url {
    url.path.push(if url.path.contains('?') { '&' } else { '?' });
    url.path.push_str("digest=");
    url.path.push_str(&urlencode(digest));
    url
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays() {
        let status = |s: u16, after: Option<u64>| {
            anyhow::Error::new(StatusError { status: s, message: format!("HTTP {s}"), retry_after: after.map(Duration::from_secs) }).context("uploading")
        };
        assert!(retriable(&status(500, None)) && retriable(&status(429, None)) && !retriable(&status(404, None)));
        assert!(retriable(&anyhow::Error::new(NetError("reset".into())).context("uploading")));
        // Retry-After (through a context) beats the backoff; without one, the backoff.
        assert_eq!(retry_delay(&status(429, Some(2)), 1), Duration::from_secs(2));
        assert_eq!(retry_delay(&status(503, None), 3), backoff(3));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(30), Duration::from_secs(15));
    }
}
