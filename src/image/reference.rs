//! Image references that name a repository and tag (`repo_tag` in a conf, `stevedore stream
//! -t`, the RepoTags of merged images, the Nix builders' `imageName` and `tag`, push
//! destinations), and the registry references of `push`, `pull`, `prefetch` and `index` (which
//! may carry a digest), checked against Docker's grammar (github.com/distribution/reference),
//! so that a newline, `../` or an uppercase name is refused here, with one message, instead of
//! by a loader or a registry later (or never, for a file name made from it). This is the one
//! parser of image names: `registry::auth::Reference` is built from `parse_reference`.
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [ domain "/" ] path-component { "/" path-component }   (255 characters at most)
//! domain           := host [ ":" port ]
//! host             := domain-component { "." domain-component } | "[" IPv6 address "]"
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port             := [0-9]+
//! path-component   := [a-z0-9]+ { separator [a-z0-9]+ }
//! separator        := "." | "_" | "__" | "-"+
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest           := "sha256:" [0-9a-f]{64}                                (the only kind we use)
//! ```
//!
//! The tag follows the last `:` after the last `/`, so `registry:5000/app` has none. A name
//! without a tag passes (loaders read it as `:latest`); a digest (`@sha256:…`) passes only
//! `parse_reference`: every other place that checks names a tag.
//!
//! Which component is the registry follows Docker (`splitDockerDomain`): the first of several
//! components, if it has a `.`, a `:` or a `[`, is `localhost`, or has an uppercase letter;
//! otherwise the name is on Docker Hub. For a registry reference that component must then be a
//! valid `domain` (`a_b.c/app` is a fine repository name for a loader, but names no registry).

use anyhow::{bail, Result};

/// Docker Hub, as normalised names call it.
pub const DOCKER_HUB: &str = "docker.io";

/// distribution/reference's `NameTotalLengthMax`.
const NAME_MAX: usize = 255;
/// The longest tag the grammar allows.
const TAG_MAX: usize = 128;

/// Checks `NAME[:TAG]` against Docker's reference grammar; the error reads
/// `invalid image reference "…": why`, with the reference quoted and escaped (one line).
pub fn check_repo_tag(s: &str) -> Result<()> {
    match split(s, false) {
        Ok(_) => Ok(()),
        Err(why) => bail!("invalid image reference {s:?}: {why}"),
    }
}

/// A reference split as Docker splits it (see the module documentation), borrowing from the
/// string it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts<'a> {
    /// `NAME` as written: without tag and digest, with the registry if it was given.
    pub name: &'a str,
    /// The registry's `host[:port]`, if the name has one.
    pub domain: Option<&'a str>,
    /// The repository: the name without its registry.
    pub path: &'a str,
    pub tag: Option<&'a str>,
    /// `sha256:` and 64 lowercase hex digits.
    pub digest: Option<&'a str>,
}

/// Checks and splits a registry reference, `NAME[:TAG][@DIGEST]` (without a scheme); errors
/// read as `check_repo_tag`'s.
pub fn parse_reference(s: &str) -> Result<Parts<'_>> {
    let parts = match split(s, true) {
        Ok(p) => p,
        Err(why) => bail!("invalid image reference {s:?}: {why}"),
    };
    if let Some(d) = parts.domain.filter(|d| !domain_ok(d)) {
        bail!("invalid image reference {s:?}: {}", bad_registry(d));
    }
    Ok(parts)
}

/// The registry and repository of a split name as Docker normalises them (`splitDockerDomain`):
/// no registry, or `index.docker.io`, is Docker Hub, where a one-component repository is
/// under `library/`.
pub fn normalized(domain: Option<&str>, path: &str) -> (String, String) {
    let registry = match domain {
        None | Some("index.docker.io") => DOCKER_HUB,
        Some(d) => d,
    };
    let repo = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path.to_string() };
    (registry.to_string(), repo)
}

/// Checks `NAME[:TAG]` and returns the name fully qualified, as skopeo records it in a Docker
/// archive and containerd stores a loaded image under (distribution/reference's
/// `ParseNormalizedNamed`, then `Name()`, see [`normalized`]), and the tag (`latest` if none).
pub fn normalized_name_tag(s: &str) -> Result<(String, String)> {
    let parts = parse_reference(s)?;
    if parts.digest.is_some() {
        bail!("invalid image reference {s:?}: a digest (@…) cannot stand for a tag here: give NAME[:TAG]");
    }
    let (registry, repo) = normalized(parts.domain, parts.path);
    Ok((format!("{registry}/{repo}"), parts.tag.unwrap_or("latest").to_string()))
}

/// [`normalized_name_tag`] as one string: `app:v1` is `docker.io/library/app:v1`,
/// `localhost:5000/x` is `localhost:5000/x:latest`.
pub fn normalized_repo_tag(s: &str) -> Result<String> {
    normalized_name_tag(s).map(|(name, tag)| format!("{name}:{tag}"))
}

/// A fully qualified `REGISTRY/REPO:TAG` as Docker prints it (`FamiliarString`): without
/// `docker.io/` and `library/`. Other strings are returned as they are.
pub fn familiar(normalized: &str) -> &str {
    match normalized.strip_prefix("docker.io/") {
        Some(rest) => rest.strip_prefix("library/").filter(|r| !r.contains('/')).unwrap_or(rest),
        None => normalized,
    }
}

/// `NAME[:TAG]` with the tag `latest` added if it has none: what Docker and podman load an
/// untagged name as (both refuse an untagged `RepoTags` entry). A name that does not parse is
/// returned as it is, for the checks to refuse.
pub fn with_default_tag(s: &str) -> String {
    match split(s, false) {
        Ok(Parts { tag: None, .. }) => format!("{s}:latest"),
        _ => s.to_string(),
    }
}

/// The tag of `NAME:TAG` (after the last `:` after the last `/`), if it has one.
pub fn tag_of(s: &str) -> Option<&str> {
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    s[last_slash..].rfind(':').map(|i| &s[last_slash + i + 1..])
}

/// Whether `d` is `sha256:` and 64 lowercase hex digits.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

fn bad_registry(d: &str) -> String {
    format!("registry {d:?}: a host name (letters, digits, '-', '.') or [IPv6], then an optional :PORT (digits)")
}

/// Checks `s` against the grammar (a digest allowed if `digest_ok`) and splits it; the error
/// says what is wrong.
fn split(s: &str, digest_ok: bool) -> std::result::Result<Parts<'_>, String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or a control character".into());
    }
    let (s, digest) = match s.split_once('@') {
        Some(_) if !digest_ok => return Err("a digest (@…) cannot stand for a tag here: give NAME[:TAG]".into()),
        Some((_, d)) if !is_sha256_digest(d) => return Err(format!("digest {d:?}: 'sha256:' and 64 lowercase hex digits")),
        Some((rest, d)) => (rest, Some(d)),
        None => (s, None),
    };
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], Some(&s[last_slash + i + 1..])),
        None => (s, None),
    };
    if let Some(tag) = tag {
        if tag.is_empty() {
            return Err("the tag after ':' is empty".into());
        }
        if tag.len() > TAG_MAX {
            return Err(format!("the tag is longer than {TAG_MAX} characters"));
        }
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if !word(tag.as_bytes()[0]) || !tag.bytes().all(|c| word(c) || c == b'.' || c == b'-') {
            return Err(format!("tag {tag:?}: letters, digits, '_', '.' and '-', not starting with '.' or '-'"));
        }
    }
    if name.is_empty() {
        return Err(if digest.is_some() && tag.is_none() { "the name before the digest is empty" } else { "the name before the tag is empty" }.into());
    }
    if name.len() > NAME_MAX {
        return Err(format!("the name is longer than {NAME_MAX} characters"));
    }
    let components: Vec<&str> = name.split('/').collect();
    if components.iter().any(|c| c.is_empty()) {
        return Err("the name has an empty component ('/' at an end or '//')".into());
    }
    // With more components to come, the first may be a registry host instead.
    let path = match components.split_first() {
        Some((first, rest)) if !rest.is_empty() && domain_ok(first) => rest,
        Some((first, rest)) if !rest.is_empty() && first.contains([':', '[', ']']) => return Err(bad_registry(first)),
        _ => &components[..],
    };
    for c in path {
        if !path_component_ok(c) {
            if c.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("the repository name must be lowercase ({c:?})"));
            }
            return Err(format!("path component {c:?}: lowercase letters and digits, separated by one '.', one or two '_', or '-'s"));
        }
    }
    // Docker's split: which component names the registry (checked as a host by
    // `parse_reference`; a loader takes a name that reads as a path either way).
    let first = components[0];
    let is_domain = components.len() > 1
        && (first.contains(['.', ':', '[']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()));
    let (domain, path) = if is_domain { (Some(first), &name[first.len() + 1..]) } else { (None, name) };
    Ok(Parts { name, domain, path, tag, digest })
}

fn lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !lower_alnum(b[0]) || !lower_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if lower_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while !lower_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `host [":" port]`
fn domain_ok(d: &str) -> bool {
    let (host, port) = if d.starts_with('[') {
        let Some(end) = d.find(']') else { return false };
        let inner = &d[1..end];
        if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        match &d[end + 1..] {
            "" => (None, None),
            rest => match rest.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return false,
            },
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.is_none_or(|h| h.split('.').all(component_ok)) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_names() {
        let n = |s: &str| normalized_name_tag(s).map(|(n, t)| format!("{n}:{t}")).unwrap();
        assert_eq!(n("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(n("team/app:v1"), "docker.io/team/app:v1");
        assert_eq!(n("index.docker.io/nginx:1"), "docker.io/library/nginx:1");
        assert_eq!(n("docker.io/library/nginx:1"), "docker.io/library/nginx:1");
        assert_eq!(n("127.0.0.1:5000/a/b:v2"), "127.0.0.1:5000/a/b:v2");
        assert_eq!(n("localhost/app"), "localhost/app:latest");
        assert!(normalized_name_tag("Nginx").is_err() && normalized_name_tag("a@sha256:x").is_err());
    }

    #[test]
    fn accepts_what_docker_accepts() {
        let long_tag = format!("x:{}", "t".repeat(128));
        let long_name = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(long_name.len(), 255);
        for s in [
            "a",
            "hello:v1",
            "nixos/nix",
            "registry.example.com:5000/a/b:tag",
            "registry.example/team/hello:v1",
            "localhost/app",
            "localhost:5000/app:latest",
            "127.0.0.1:5000/a",
            "[::1]:5000/a:b",
            "[fe80::1]/a",
            // A registry host may have capitals; a repository may not.
            "Registry.Example/app",
            "my-registry.example/app",
            "a_b/c",
            "a__b",
            "a-----b",
            "a.b-c_d/e",
            "x:_tag",
            "x:V1.0-rc_1",
            // One component and a tag, which reads like a host and port.
            "app:5000",
            // A 32-character hash as tag, as untagged nixpkgs images get.
            "app:0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq",
            long_tag.as_str(),
            long_name.as_str(),
        ] {
            assert!(check_repo_tag(s).is_ok(), "{s:?}: {:#}", check_repo_tag(s).unwrap_err());
        }
    }

    #[test]
    fn refuses_the_rest_with_one_message() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Hello:v1", "must be lowercase"),
            ("team/Hello", "must be lowercase"),
            ("app\n:v1", "control character"),
            ("app:v1\nx", "control character"),
            ("a b", "whitespace"),
            ("../etc:x", "path component \"..\""),
            ("a/../b", "path component \"..\""),
            ("a/./b:v1", "path component \".\""),
            ("a//b", "empty component"),
            ("/a", "empty component"),
            ("a/", "empty component"),
            (":v1", "name before the tag is empty"),
            ("a:", "tag after ':' is empty"),
            ("a:.x", "tag \".x\""),
            ("a:-x", "tag \"-x\""),
            ("a:x/y", "registry \"a:x\""),
            ("a:b:c", "path component \"a:b\""),
            ("a:v1@sha256:0000000000000000000000000000000000000000000000000000000000000000", "digest"),
            ("a@sha256:0000000000000000000000000000000000000000000000000000000000000000", "digest"),
            ("a___b", "path component"),
            ("a_.b", "path component"),
            ("-a", "path component"),
            ("a-", "path component"),
            ("a+b", "path component"),
            ("host:abc/a", "registry \"host:abc\""),
            ("host:/a", "registry \"host:\""),
            ("ho_st:5000/a", "registry \"ho_st:5000\""),
            ("[::1/a", "registry"),
            ("[zz]:5000/a", "registry"),
        ];
        for (s, why) in cases {
            let e = check_repo_tag(s).expect_err(s).to_string();
            assert!(e.starts_with(&format!("invalid image reference {s:?}: ")), "{e}");
            assert!(e.contains(why), "{s:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = check_repo_tag(&format!("x:{}", "t".repeat(129))).unwrap_err().to_string();
        assert!(e.ends_with("the tag is longer than 128 characters"), "{e}");
        let e = check_repo_tag(&format!("{}/{}:v1", "a".repeat(128), "b".repeat(127))).unwrap_err().to_string();
        assert!(e.ends_with("the name is longer than 255 characters"), "{e}");
    }

    #[test]
    fn names_normalise_as_containerd_stores_them() {
        for (given, full, short) in [
            ("app:tag", "docker.io/library/app:tag", "app:tag"),
            ("app", "docker.io/library/app:latest", "app:latest"),
            ("team/app:v1", "docker.io/team/app:v1", "team/app:v1"),
            ("docker.io/app:v1", "docker.io/library/app:v1", "app:v1"),
            ("index.docker.io/team/app:v1", "docker.io/team/app:v1", "team/app:v1"),
            ("ghcr.io/o/app:tag", "ghcr.io/o/app:tag", "ghcr.io/o/app:tag"),
            ("localhost:5000/x:t", "localhost:5000/x:t", "localhost:5000/x:t"),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            ("app:5000", "docker.io/library/app:5000", "app:5000"),
        ] {
            assert_eq!(normalized_repo_tag(given).unwrap(), full, "{given}");
            assert_eq!(familiar(full), short, "{full}");
        }
        assert!(normalized_repo_tag("Bad:x").unwrap_err().to_string().contains("lowercase"));
        assert_eq!(with_default_tag("app"), "app:latest");
        assert_eq!(with_default_tag("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(with_default_tag("app:v1"), "app:v1");
        assert_eq!(with_default_tag("Bad"), "Bad");
        assert_eq!((tag_of("a:b"), tag_of("h:5000/a"), tag_of("h:5000/a:t"), tag_of("v1")), (Some("b"), None, Some("t"), None));
    }

    #[test]
    fn registry_references_split_as_docker_splits_them() {
        let d = format!("sha256:{}", "0".repeat(64));
        let cases: Vec<(String, (&str, Option<&str>, &str, Option<&str>, Option<&str>))> = vec![
            ("alpine".into(), ("alpine", None, "alpine", None, None)),
            ("team/app:v1".into(), ("team/app", None, "team/app", Some("v1"), None)),
            ("localhost/app".into(), ("localhost/app", Some("localhost"), "app", None, None)),
            ("localhost:5000/a/b:t".into(), ("localhost:5000/a/b", Some("localhost:5000"), "a/b", Some("t"), None)),
            ("127.0.0.1:5000/x".into(), ("127.0.0.1:5000/x", Some("127.0.0.1:5000"), "x", None, None)),
            ("[::1]:5000/x:y".into(), ("[::1]:5000/x", Some("[::1]:5000"), "x", Some("y"), None)),
            ("Registry.Example/app".into(), ("Registry.Example/app", Some("Registry.Example"), "app", None, None)),
            ("Host/app".into(), ("Host/app", Some("Host"), "app", None, None)),
            (format!("ghcr.io/o/r@{d}"), ("ghcr.io/o/r", Some("ghcr.io"), "o/r", None, Some(d.as_str()))),
            (format!("r.example/o:v2@{d}"), ("r.example/o", Some("r.example"), "o", Some("v2"), Some(d.as_str()))),
        ];
        for (s, (name, domain, path, tag, digest)) in &cases {
            let p = parse_reference(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
            assert_eq!((p.name, p.domain, p.path, p.tag, p.digest), (*name, *domain, *path, *tag, *digest), "{s}");
        }
        for (s, why) in [
            ("127.0.0.1:5000/team/a..b", "path component \"a..b\""),
            ("host:5000/Bad", "must be lowercase"),
            ("host:5000/x@sha256:12", "digest \"sha256:12\""),
            ("x@md5:abc", "digest"),
            ("host:5000/x@", "digest \"\""),
            ("bad host/x", "whitespace"),
            ("127.0.0.1:x1/app", "registry \"127.0.0.1:x1\""),
            // A loader takes it as a two-component name; as a registry it is no host.
            ("a_b.c/app", "registry \"a_b.c\""),
        ] {
            let e = parse_reference(s).expect_err(s).to_string();
            assert!(e.starts_with(&format!("invalid image reference {s:?}: ")) && e.contains(why) && !e.contains('\n'), "{s}: {e}");
        }
        assert!(check_repo_tag("a_b.c/app").is_ok());
        assert!(is_sha256_digest(&d) && !is_sha256_digest(&format!("sha256:{}", "A".repeat(64))) && !is_sha256_digest(&d[..70]));
    }
}
