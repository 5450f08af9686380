//! The one rule for archive member names, shared by every reader (base images, layers, merged
//! archives, OCI archives, registry sources, `run-as-root`).
//!
//! A name is a path beneath the archive's root: a leading `/` is dropped (absolute names are
//! taken relative to the root, as tar and container runtimes do), `.` and empty components are
//! dropped, `..` removes the component before it, and a `..` that would climb above the root
//! is an error, as is a NUL byte anywhere (no file system can hold one, and it would let a
//! name pose as two components wherever components are joined with a separator).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    Nul,
    AboveRoot,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            NameError::Empty => "the name is empty",
            NameError::Nul => "the name has a NUL byte",
            NameError::AboveRoot => "the name climbs above the archive's root (`..`)",
        })
    }
}

impl std::error::Error for NameError {}

/// The components of member name `raw` beneath the root; none for the root itself (`./`, `/`).
pub fn components(raw: &[u8]) -> Result<Vec<&[u8]>, NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.contains(&0) {
        return Err(NameError::Nul);
    }
    let mut out: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop().ok_or(NameError::AboveRoot)?;
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Member name `raw` as a normalized relative path (`a/b`; empty for the root).
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, NameError> {
    Ok(components(raw)?.join(&b'/'))
}

/// [`normalize`] for names that must be text (the outer archive's members, which manifests name
/// in JSON): `None` for names that are not UTF-8, which no manifest can refer to.
pub fn normalize_text(raw: &[u8]) -> Result<Option<String>, NameError> {
    let n = normalize(raw)?;
    Ok(String::from_utf8(n).ok())
}

/// Where a symbolic link member `link` (normalized) pointing at `target` leads, as a member
/// name: relative targets are taken from the link's directory, absolute ones from the root, and
/// `..` stops at the root, as path resolution in a container's root does.
pub fn symlink_target(link: &str, target: &[u8]) -> Result<String, NameError> {
    if target.contains(&0) {
        return Err(NameError::Nul);
    }
    let target = String::from_utf8_lossy(target);
    let mut out: Vec<&str> = Vec::new();
    if !target.starts_with('/') {
        out.extend(link.split('/').filter(|c| !c.is_empty()));
        out.pop();
    }
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    Ok(out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_beneath_the_root() {
        assert_eq!(normalize(b"./abc/layer.tar").unwrap(), b"abc/layer.tar");
        assert_eq!(normalize(b"abc/../def/layer.tar").unwrap(), b"def/layer.tar");
        assert_eq!(normalize(b"/manifest.json").unwrap(), b"manifest.json");
        assert_eq!(normalize(b"a//b/./c/").unwrap(), b"a/b/c");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(normalize(b"/").unwrap(), b"");
        assert_eq!(normalize("caf\u{e9}/\u{1F600}".as_bytes()).unwrap(), "caf\u{e9}/\u{1F600}".as_bytes());
        assert_eq!(normalize(b"a\xff/b").unwrap(), b"a\xff/b");
    }

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(normalize(b"a\0x"), Err(NameError::Nul));
        assert_eq!(normalize(b"../x"), Err(NameError::AboveRoot));
        assert_eq!(normalize(b"a/../../x"), Err(NameError::AboveRoot));
        assert_eq!(normalize(b"/../etc/passwd"), Err(NameError::AboveRoot));
        assert_eq!(normalize(b""), Err(NameError::Empty));
        assert_eq!(normalize_text(b"a\xff").unwrap(), None);
    }

    #[test]
    fn symlink_targets_stop_at_the_root() {
        assert_eq!(symlink_target("a/b/link", b"../c").unwrap(), "a/c");
        assert_eq!(symlink_target("a/link", b"/x/y").unwrap(), "x/y");
        assert_eq!(symlink_target("link", b"../../../etc/passwd").unwrap(), "etc/passwd");
        assert_eq!(symlink_target("a/link", b"./b").unwrap(), "a/b");
        assert!(symlink_target("a", b"x\0y").is_err());
    }
}
