//! Registry URLs: what we parse of them (scheme, host, port, path and query) and no more.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// Host as written (a name, an IPv4 address or a bracketed IPv6 address).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("not an http(s) URL: {s:?}");
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') {
            bail!("URLs with user info are not supported");
        }
        let (host, port) = split_host_port(authority, if tls { 443 } else { 80 })?;
        Ok(Url { tls, host, port, path })
    }

    /// `scheme://host[:port]`
    pub fn origin(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let scheme = if self.tls { "https" } else { "http" };
        if self.port == default {
            format!("{scheme}://{}", self.host)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// Whether `other` is on the same origin (scheme, host, port): credentials go to one
    /// origin only.
    pub fn same_origin(&self, other: &Url) -> bool {
        self.tls == other.tls && self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }

    /// Resolves a `Location` header (absolute, or a path) against this URL.
    pub fn join(&self, location: &str) -> Result<Url> {
        if location.starts_with("http://") || location.starts_with("https://") {
            Url::parse(location)
        } else if location.starts_with("//") {
            Url::parse(&format!("{}:{location}", if self.tls { "https" } else { "http" }))
        } else if location.starts_with('/') {
            Ok(Url { path: location.to_string(), ..self.clone() })
        } else {
            bail!("unsupported relative location {location:?}")
        }
    }

    pub(super) fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.origin(), self.path)
    }
}

/// Splits `host[:port]` (with `[v6]` brackets allowed).
pub fn split_host_port(authority: &str, default: u16) -> Result<(String, u16)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or_else(|| anyhow!("bad host {authority:?}"))?;
        let port = authority[end + 1..].strip_prefix(':');
        (&authority[..=end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| anyhow!("bad port in {authority:?}"))?,
        None => default,
    };
    if host.is_empty() {
        bail!("empty host in {authority:?}");
    }
    Ok((host.to_string(), port))
}
