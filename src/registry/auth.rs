//! Image references (`docker://REGISTRY/REPO[:TAG|@DIGEST]`), credentials from the usual auth
//! files, and the registry's auth challenges (Basic, Bearer).
//!
//! Secrets live only in `Creds` and in request headers: `Creds` prints as its source, and no
//! error message is built from a header or a token.

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use crate::image::reference::DOCKER_HUB;
/// Where Docker Hub's API lives (its name is `DOCKER_HUB`).
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (Docker Hub normalized to `docker.io`).
    pub registry: String,
    /// Repository path, e.g. `library/alpine` or `team/app`.
    pub repo: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `[docker://]NAME[:TAG][@DIGEST]`, checked and split by `crate::image::reference` (one
    /// grammar for every image name): a first component with a dot or a colon, `localhost`, or
    /// an uppercase letter is a registry; otherwise the image is on Docker Hub (`docker.io`,
    /// one-component names under `library/`).
    pub fn parse(s: &str) -> Result<Reference> {
        let name = s.strip_prefix("docker://").unwrap_or(s);
        if name.is_empty() || name.contains("://") {
            bail!("bad image reference {s:?}: expected docker://REGISTRY/REPO[:TAG|@DIGEST]");
        }
        let parts = crate::image::reference::parse_reference(name)?;
        // The API's host names Docker Hub too.
        let (registry, repo) = crate::image::reference::normalized(parts.domain.filter(|d| *d != DOCKER_HUB_API), parts.path);
        Ok(Reference { registry, repo, tag: parts.tag.map(str::to_owned), digest: parts.digest.map(str::to_owned) })
    }

    /// Where the API is: Docker Hub's differs from its name.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The tag, digest or `latest`, as used in manifest URLs.
    pub fn reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// `registry/repo`
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

pub fn check_digest(d: &str) -> Result<()> {
    if !crate::image::reference::is_sha256_digest(d) {
        bail!("not a sha256 digest: {d:?}");
    }
    Ok(())
}

/// A user name and password, and where they came from (which is all that is ever printed).
#[derive(Clone)]
pub struct Creds {
    pub user: String,
    /// The password, or with `identity_token` the refresh token for the registry's OAuth2
    /// token endpoint.
    pub pass: String,
    pub identity_token: bool,
    pub source: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds(from {})", self.source)
    }
}

impl Creds {
    pub fn basic_header(&self) -> String {
        format!("Basic {}", base64_encode(format!("{}:{}", self.user, self.pass).as_bytes()))
    }
}

/// `--creds USER[:PASS]` (PASS may be empty; a bare USER means no password).
pub fn parse_creds(s: &str) -> Result<Creds> {
    let (user, pass) = s.split_once(':').unwrap_or((s, ""));
    if user.is_empty() {
        bail!("--creds needs USER:PASSWORD");
    }
    Ok(Creds { user: user.into(), pass: pass.into(), identity_token: false, source: "--creds".into() })
}

/// Keys an `auths` entry may use for a registry: `host`, `https://host`, `host/v1/` forms,
/// and for Docker Hub its historical index URL.
fn normalize_key(key: &str) -> String {
    let k = key.trim_start_matches("https://").trim_start_matches("http://");
    let k = k.trim_end_matches('/');
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.into(),
        _ => k.to_string(),
    }
}

/// What the auth files give for a registry.
#[derive(Debug, Default)]
pub struct Found {
    pub creds: Option<Creds>,
    /// Why there are none although a credential helper is configured, for one line on stderr.
    pub note: Option<String>,
}

/// Credentials for `registry/repo` from the auth files, first file that has any: a
/// `credHelpers` helper for the registry, else the longest matching `auths` entry
/// (`host/team` beats `host`) with credentials, else the `credsStore` helper. Docker writes
/// an empty `auths` entry beside a helper, so an entry only counts if it holds credentials.
pub fn find_creds(reference: &Reference) -> Result<Found> {
    let full = reference.name();
    for file in &crate::util::settings::get().auth_files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => bail!("cannot read auth file {}: {e}", file.display()),
        };
        let json: Value = serde_json::from_slice(&text).map_err(|_| anyhow!("auth file {} is not valid JSON", file.display()))?;
        let source = format!("auth file {}", file.display());
        let helper_for = json
            .get("credHelpers")
            .and_then(Value::as_object)
            .and_then(|h| h.iter().find(|(k, _)| normalize_key(k) == reference.registry))
            .map(|(_, v)| v.as_str().ok_or_else(|| anyhow!("{source}: credHelpers for {} is not a string", reference.registry)))
            .transpose()?;
        if let Some(helper) = helper_for {
            return run_helper(helper, reference, &source);
        }
        let mut best: Option<(usize, &Value)> = None;
        for (key, entry) in json.get("auths").and_then(Value::as_object).into_iter().flatten() {
            let k = normalize_key(key);
            let matches = k == reference.registry || (full.starts_with(&k) && full[k.len()..].starts_with('/'));
            if matches && best.is_none_or(|(len, _)| k.len() > len) {
                best = Some((k.len(), entry));
            }
        }
        if let Some((_, entry)) = best {
            if let Some(creds) = auths_entry(entry, reference, &source)? {
                return Ok(Found { creds: Some(creds), note: None });
            }
        }
        if let Some(store) = json.get("credsStore").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            return run_helper(store, reference, &source);
        }
    }
    Ok(Found::default())
}

/// The credentials in one `auths` entry, if it has any.
fn auths_entry(entry: &Value, reference: &Reference, source: &str) -> Result<Option<Creds>> {
    let str_field = |k: &str| entry.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    if let Some(token) = str_field("identitytoken") {
        return Ok(Some(Creds { user: "<token>".into(), pass: token.into(), identity_token: true, source: source.into() }));
    }
    if let Some(auth) = str_field("auth") {
        let decoded = base64_decode(auth).ok_or_else(|| anyhow!("{source}: the entry for {} is not valid base64", reference.registry))?;
        let decoded = String::from_utf8(decoded).map_err(|_| anyhow!("{source}: the entry for {} is not UTF-8", reference.registry))?;
        let (user, pass) =
            decoded.split_once(':').ok_or_else(|| anyhow!("{source}: the entry for {} is not USER:PASSWORD", reference.registry))?;
        return Ok(Some(Creds { user: user.into(), pass: pass.into(), identity_token: false, source: source.into() }));
    }
    if let (Some(u), Some(p)) = (str_field("username"), entry.get("password").and_then(Value::as_str)) {
        return Ok(Some(Creds { user: u.into(), pass: p.into(), identity_token: false, source: source.into() }));
    }
    Ok(None)
}

/// What a registry is called when asking a credential helper: the name `docker login` stored
/// it under (Docker Hub's historical index URL, else `host[:port]`).
fn helper_server_url(reference: &Reference) -> String {
    if reference.registry == DOCKER_HUB {
        "https://index.docker.io/v1/".into()
    } else {
        reference.registry.clone()
    }
}

/// The most a credential helper may print on stdout (credentials are a few hundred bytes), and
/// the most of its stderr we keep (the rest is read and dropped).
const HELPER_STDOUT_MAX: usize = 64 * 1024;
const HELPER_STDERR_KEPT: usize = 4096;

/// Why reading a helper's output stopped early.
enum HelperStop {
    Deadline,
    TooMuch,
    Io(std::io::Error),
}

/// Reads a helper's stdout (at most `HELPER_STDOUT_MAX` bytes) and stderr (the first
/// `HELPER_STDERR_KEPT` bytes kept) until both end, or `deadline`.
fn read_helper_output(child: &mut std::process::Child, deadline: std::time::Instant) -> std::result::Result<(Vec<u8>, Vec<u8>), HelperStop> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read as _;
    use std::os::fd::AsFd;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 8192];
    while out.is_some() || err.is_some() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(HelperStop::Deadline);
        }
        let (out_ready, err_ready) = {
            let mut fds = Vec::new();
            if let Some(o) = &out {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            }
            if let Some(e) = &err {
                fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
            }
            let wait = PollTimeout::try_from(left.max(std::time::Duration::from_millis(1))).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, wait) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(HelperStop::Io(e.into())),
            }
            let ready = |i: usize| fds.get(i).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
            match (out.is_some(), err.is_some()) {
                (true, true) => (ready(0), ready(1)),
                (true, false) => (ready(0), false),
                _ => (false, ready(0)),
            }
        };
        if out_ready {
            let n = out.as_mut().expect("polled").read(&mut buf).map_err(HelperStop::Io)?;
            if n == 0 {
                out = None;
            } else if stdout.len() + n > HELPER_STDOUT_MAX {
                return Err(HelperStop::TooMuch);
            } else {
                stdout.extend_from_slice(&buf[..n]);
            }
        }
        if err_ready {
            let n = err.as_mut().expect("polled").read(&mut buf).map_err(HelperStop::Io)?;
            if n == 0 {
                err = None;
            } else {
                let keep = n.min(HELPER_STDERR_KEPT.saturating_sub(stderr.len()));
                stderr.extend_from_slice(&buf[..keep]);
            }
        }
    }
    Ok((stdout, stderr))
}

/// Runs `docker-credential-NAME get` with the registry on stdin, as docker does, for at most
/// the registry timeout (`STEVEDORE_REGISTRY_TIMEOUT`, 60 s): a helper that does not finish by
/// then is killed, and that is an error naming it. A helper that is not installed, or has
/// nothing for the registry, leaves the session anonymous (with a note); any other failure is
/// an error naming the helper. Nothing the helper prints goes into a message unless it failed
/// and its output does not look like credentials.
fn run_helper(name: &str, reference: &Reference, source: &str) -> Result<Found> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    if name.is_empty() || name.contains(['/', '\\']) {
        bail!("{source}: bad credential helper name {name:?}");
    }
    let timeout = crate::util::settings::get().registry_timeout()?;
    let program = format!("docker-credential-{name}");
    let server = helper_server_url(reference);
    let child = Command::new(&program).arg("get").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let note = format!("credential helper {program} (from {source}) is not installed: going on without credentials");
            return Ok(Found { creds: None, note: Some(note) });
        }
        Err(e) => bail!("cannot run credential helper {program} (from {source}): {e}"),
    };
    let deadline = std::time::Instant::now() + timeout;
    // A few hundred bytes: the pipe takes them whether or not the helper reads. One that exits
    // without reading closes the pipe: its exit status says more.
    let _ = child.stdin.take().expect("piped").write_all(server.as_bytes());
    let output = read_helper_output(&mut child, deadline);
    let status = match &output {
        Ok(_) => loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
                Ok(None) => break None,
                Err(e) => bail!("credential helper {program}: {e}"),
            }
        },
        Err(_) => None,
    };
    let Some(status) = status else {
        // Its output is never shown: it may hold the secret.
        let _ = child.kill();
        let _ = child.wait();
        let why = match output {
            Err(HelperStop::TooMuch) => format!("printed more than {} KiB", HELPER_STDOUT_MAX / 1024),
            Err(HelperStop::Io(e)) => format!("could not be read: {e}"),
            _ => format!("did not finish within {} ({}); stopped it", super::http::seconds(timeout), crate::util::settings::REGISTRY_TIMEOUT_VAR),
        };
        bail!("credential helper {program} (from {source}) {why}");
    };
    let (out_bytes, err_bytes) = output.unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out_bytes);
    if !status.success() {
        let said = format!("{} {}", stdout.trim(), String::from_utf8_lossy(&err_bytes).trim());
        if said.to_ascii_lowercase().contains("credentials not found") {
            let note = format!("credential helper {program} has no credentials for {server}: going on without credentials");
            return Ok(Found { creds: None, note: Some(note) });
        }
        let line = said.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown = if line.is_empty() || line.contains('{') || line.to_ascii_lowercase().contains("secret") {
            String::new()
        } else {
            format!(": {}", line.chars().take(200).collect::<String>())
        };
        bail!("credential helper {program} failed for {server} ({status}){shown}");
    }
    let bad = || anyhow!("credential helper {program} gave no Username and Secret for {server}");
    let json: Value = serde_json::from_str(&stdout).map_err(|_| bad())?;
    let user = json.get("Username").and_then(Value::as_str).ok_or_else(bad)?;
    let secret = json.get("Secret").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(bad)?;
    Ok(Found {
        creds: Some(Creds {
            user: user.into(),
            pass: secret.into(),
            // docker's convention: this user name means the secret is an identity token.
            identity_token: user == "<token>",
            source: format!("credential helper {program}"),
        }),
        note: None,
    })
}

/// One challenge from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = std::collections::HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        s = s[eq + 1..].trim_start();
        let value;
        if let Some(r) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = r.char_indices();
            let mut end = r.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n)
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            value = v;
            s = &r[end..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        s = s.trim_start().trim_start_matches(',').trim_start();
        params.insert(key, value);
    }
    Some(Challenge::Bearer { realm: params.remove("realm")?, service: params.remove("service"), scope: params.remove("scope") })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes() {
        if c == b'=' {
            break;
        }
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'\n' | b'\r' => continue,
            _ => return None,
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("docker://127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!((r.registry.as_str(), r.repo.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", "team/app", Some("v1")));
        let r = Reference::parse("alpine").unwrap();
        assert_eq!((r.registry.as_str(), r.repo.as_str(), r.api_host()), ("docker.io", "library/alpine", "registry-1.docker.io"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!((r.registry.as_str(), r.reference()), ("localhost", d.as_str()));
        assert!(Reference::parse("docker://host:5000/Bad").is_err());
        assert!(Reference::parse("docker://host:5000/x@sha256:12").is_err());
        assert_eq!(Reference::parse("ghcr.io/o/r").unwrap().reference(), "latest");
        // Docker Hub's names and defaults, ports, localhost, IPv6, a tag beside a digest.
        for (s, registry, repo) in [
            ("docker.io/alpine", "docker.io", "library/alpine"),
            ("docker://index.docker.io/team/app:v1", "docker.io", "team/app"),
            ("registry-1.docker.io/library/nix", "docker.io", "library/nix"),
            ("team/app", "docker.io", "team/app"),
            ("localhost:5000/app", "localhost:5000", "app"),
            ("docker://[::1]:5000/a/b", "[::1]:5000", "a/b"),
            ("Host/app", "Host", "app"),
        ] {
            let r = Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
            assert_eq!((r.registry.as_str(), r.repo.as_str()), (registry, repo), "{s}");
        }
        let r = Reference::parse(&format!("docker://127.0.0.1:5000/a:v1@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.reference()), (Some("v1"), d.as_str()));
        // What the old, looser parser let through: the one grammar refuses it, in one line.
        for (s, why) in [
            ("docker://127.0.0.1:5000/team/a..b:v1", "path component \"a..b\""),
            ("docker://127.0.0.1:x1/app", "registry \"127.0.0.1:x1\""),
            ("docker://ho_st.example/app", "registry \"ho_st.example\""),
            ("docker://host:5000/a-/b", "path component \"a-\""),
            ("docker://host:5000//b", "empty component"),
            ("docker://bad host:1/app", "whitespace"),
        ] {
            let e = Reference::parse(s).expect_err(s).to_string();
            assert!(e.starts_with(&format!("invalid image reference {:?}: ", &s["docker://".len()..])) && e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull""#),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:a/b:pull".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "user:pass word"] {
            assert_eq!(base64_decode(&base64_encode(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn creds_do_not_print() {
        let c = parse_creds("me:secret").unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }
}
