//! Image references that name a repository and tag (`repo_tag` in a conf, `stevedore stream
//! -t`, the RepoTags of merged images, the Nix builders' `imageName` and `tag`, push
//! destinations), checked against Docker's grammar (github.com/distribution/reference), so
//! that a newline, `../` or an uppercase name is refused here, with one message, instead of by
//! a loader or a registry later (or never, for a file name made from it).
//!
//! ```text
//! reference        := name [ ":" tag ]
//! name             := [ domain "/" ] path-component { "/" path-component }   (255 characters at most)
//! domain           := host [ ":" port ]
//! host             := domain-component { "." domain-component } | "[" IPv6 address "]"
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! port             := [0-9]+
//! path-component   := [a-z0-9]+ { separator [a-z0-9]+ }
//! separator        := "." | "_" | "__" | "-"+
//! tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! ```
//!
//! The tag follows the last `:` after the last `/`, so `registry:5000/app` has none. A name
//! without a tag passes (loaders read it as `:latest`); a digest (`@sha256:…`) does not: every
//! place that checks names a tag.

use anyhow::{bail, Result};

/// distribution/reference's `NameTotalLengthMax`.
const NAME_MAX: usize = 255;
/// The longest tag the grammar allows.
const TAG_MAX: usize = 128;

/// Checks `NAME[:TAG]` against Docker's reference grammar; the error reads
/// `invalid image reference "…": why`, with the reference quoted and escaped (one line).
pub fn check_repo_tag(s: &str) -> Result<()> {
    match problem(s) {
        None => Ok(()),
        Some(why) => bail!("invalid image reference {s:?}: {why}"),
    }
}

/// What is wrong with `s`, if anything.
fn problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("it is empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("it contains whitespace or a control character".into());
    }
    if s.contains('@') {
        return Some("a digest (@…) cannot stand for a tag here: give NAME[:TAG]".into());
    }
    let last_slash = s.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match s[last_slash..].rfind(':') {
        Some(i) => (&s[..last_slash + i], Some(&s[last_slash + i + 1..])),
        None => (s, None),
    };
    if let Some(tag) = tag {
        if tag.is_empty() {
            return Some("the tag after ':' is empty".into());
        }
        if tag.len() > TAG_MAX {
            return Some(format!("the tag is longer than {TAG_MAX} characters"));
        }
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if !word(tag.as_bytes()[0]) || !tag.bytes().all(|c| word(c) || c == b'.' || c == b'-') {
            return Some(format!("tag {tag:?}: letters, digits, '_', '.' and '-', not starting with '.' or '-'"));
        }
    }
    if name.is_empty() {
        return Some("the name before the tag is empty".into());
    }
    if name.len() > NAME_MAX {
        return Some(format!("the name is longer than {NAME_MAX} characters"));
    }
    let components: Vec<&str> = name.split('/').collect();
    if components.iter().any(|c| c.is_empty()) {
        return Some("the name has an empty component ('/' at an end or '//')".into());
    }
    // With more components to come, the first may be a registry host instead.
    let path = match components.split_first() {
        Some((first, rest)) if !rest.is_empty() && domain_ok(first) => rest,
        Some((first, rest)) if !rest.is_empty() && first.contains([':', '[', ']']) => {
            return Some(format!("registry {first:?}: a host name (letters, digits, '-', '.') or [IPv6], then an optional :PORT (digits)"));
        }
        _ => &components[..],
    };
    for c in path {
        if !path_component_ok(c) {
            if c.bytes().any(|b| b.is_ascii_uppercase()) {
                return Some(format!("the repository name must be lowercase ({c:?})"));
            }
            return Some(format!(
                "path component {c:?}: lowercase letters and digits, separated by one '.', one or two '_', or '-'s"
            ));
        }
    }
    None
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
    host.map_or(true, |h| h.split('.').all(component_ok)) && port.map_or(true, |p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
