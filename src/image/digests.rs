//! The digest cache: what earlier runs learnt by hashing or compressing a layer, so that an
//! unchanged layer is never hashed or compressed twice. One file,
//! `$XDG_CACHE_HOME/stevedore/layer-digests` (or `~/.cache/...`), shared by every command; a
//! missing or unreadable cache only costs time. Two kinds of entry:
//!
//! - `compressed_key`: a compressed layer's digest and size, by encoder and diff_id. The
//!   encoders are deterministic, so the mapping never changes.
//! - `layer_key`: a layer's diff_id and size, by what determines its bytes: the store paths it
//!   holds (each with its inode and change time, so a path deleted and built again, perhaps
//!   to other bytes, is a new key), the owner and mtime its members get, and the version of the
//!   tar writer. Store paths never change once made, so that is enough to skip reading them;
//!   a path that is writable (not a store path as Nix leaves it) gets no key and is read.

use super::layer::Owner;
use crate::compress::{Annotations, Compressor};
use crate::util::hex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bump when the bytes of a store layer for the same inputs change (tar headers, ordering).
const LAYER_FORMAT: u32 = 1;

pub struct DigestCache {
    path: Option<PathBuf>,
    map: HashMap<String, (String, u64, Annotations)>,
}

impl DigestCache {
    /// The cache of the settings (`XDG_CACHE_HOME`, `HOME`), or an empty one kept in memory.
    pub fn open() -> DigestCache {
        DigestCache::at(crate::util::settings::get().digest_cache.clone())
    }

    pub fn at(path: Option<PathBuf>) -> DigestCache {
        let mut map = HashMap::new();
        if let Some(text) = path.as_ref().and_then(|p| fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let f: Vec<&str> = line.split(' ').collect();
                let (key, digest, size, annotations) = match f[..] {
                    [key, digest, size] => (key, digest, size, Some(Vec::new())),
                    [key, digest, size, annotations] => (key, digest, size, parse_annotations(annotations)),
                    _ => continue,
                };
                if let (Ok(size), true, Some(annotations)) = (size.parse(), super::reference::is_sha256_digest(digest), annotations) {
                    map.insert(key.to_string(), (digest.to_string(), size, annotations));
                }
            }
        }
        DigestCache { path, map }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The digest (`sha256:...`) and size kept under `key`.
    pub fn get(&self, key: &str) -> Option<(String, u64)> {
        self.map.get(key).map(|(d, s, _)| (d.clone(), *s))
    }

    /// The digest, size and descriptor annotations kept under `key`.
    pub fn get_annotated(&self, key: &str) -> Option<(String, u64, Annotations)> {
        self.map.get(key).cloned()
    }

    pub fn put(&mut self, key: &str, digest: &str, size: u64) {
        self.put_annotated(key, digest, size, &[])
    }

    /// Keeps a compressed layer's digest and size with its descriptor's annotations, which are
    /// written as a fourth field `KEY=VALUE,...` (older versions skip such lines).
    pub fn put_annotated(&mut self, key: &str, digest: &str, size: u64, annotations: &[(String, String)]) {
        let clean = annotations.iter().all(|(k, v)| [k, v].iter().all(|s| !s.is_empty() && !s.contains([' ', ',', '=', '\n'])));
        if !clean || self.map.insert(key.to_string(), (digest.to_string(), size, annotations.to_vec())).is_some() {
            return;
        }
        let extra: Vec<String> = annotations.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let extra = if extra.is_empty() { String::new() } else { format!(" {}", extra.join(",")) };
        if let Some(path) = &self.path {
            use std::io::Write as _;
            let _ = path.parent().map(fs::create_dir_all);
            // One short append per line: concurrent runs interleave whole lines.
            if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = f.write_all(format!("{key} {digest} {size}{extra}\n").as_bytes());
            }
        }
    }
}

fn parse_annotations(field: &str) -> Option<Annotations> {
    field.split(',').map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

/// The key of a layer compressed with `c` whose diff_id is `diff_id`.
pub fn compressed_key(c: Compressor, diff_id: &str) -> String {
    format!("{}:{}", c.cache_name(), diff_id.trim_start_matches("sha256:"))
}

/// What identifies a file or directory on this machine until it is replaced. None for a
/// writable one: only what cannot change in place (store paths are read-only) is keyed so.
fn identity(h: &mut Sha256, path: &Path) -> Option<()> {
    let m = fs::symlink_metadata(path).ok()?;
    if !m.file_type().is_symlink() && m.mode() & 0o222 != 0 {
        return None;
    }
    h.update(path.as_os_str().as_encoded_bytes());
    h.update([0]);
    for n in [m.dev(), m.ino(), m.ctime() as u64, m.ctime_nsec() as u64, m.size()] {
        h.update(n.to_le_bytes());
    }
    Some(())
}

/// The key of a store layer holding `paths` with members owned as `owner` says; None if a path
/// cannot be examined (the layer is then hashed, and its error reported, as usual).
pub fn layer_key(paths: &[PathBuf], owner: &Owner) -> Option<String> {
    let mut h = Sha256::new();
    h.update(format!("store-layer-v{LAYER_FORMAT}\0{}\0{}\0{}\0{}\0{}\0", owner.uid, owner.gid, owner.uname, owner.gname, owner.mtime));
    for p in paths {
        identity(&mut h, p)?;
    }
    Some(format!("layer-v{LAYER_FORMAT}:{}", hex(&h.finalize())))
}

/// The key of the uncompressed layer in `member` of the base image file or directory at `path`.
pub fn base_layer_key(path: &Path, member: &str) -> Option<String> {
    let mut h = Sha256::new();
    h.update(b"base-layer-v1\0");
    identity(&mut h, path)?;
    if path.is_dir() {
        identity(&mut h, &path.join(member))?;
    }
    h.update(member.as_bytes());
    Some(format!("base-v1:{}", hex(&h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner { uid: 0, gid: 0, uname: "root".into(), gname: "root".into(), mtime: 1 }
    }

    #[test]
    fn keys_follow_what_makes_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("aaaa-a");
        fs::create_dir(&a).unwrap();
        // Writable: no key; read-only, as the store leaves paths: a key.
        assert!(layer_key(std::slice::from_ref(&a), &owner()).is_none());
        let read_only = |p: &Path| fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        read_only(&a);
        let k = layer_key(std::slice::from_ref(&a), &owner()).unwrap();
        assert_eq!(layer_key(std::slice::from_ref(&a), &owner()).unwrap(), k);
        let mut other = owner();
        other.mtime = 2;
        assert_ne!(layer_key(std::slice::from_ref(&a), &other).unwrap(), k);
        // Deleted and made again: another inode or change time, another key.
        fs::remove_dir(&a).unwrap();
        let b = dir.path().join("keep");
        fs::create_dir(&b).unwrap();
        fs::create_dir(&a).unwrap();
        read_only(&a);
        assert_ne!(layer_key(std::slice::from_ref(&a), &owner()).unwrap(), k);
        assert!(layer_key(&[dir.path().join("missing")], &owner()).is_none());
    }

    #[test]
    fn the_file_keeps_entries_and_skips_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/layer-digests");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let mut c = DigestCache::at(Some(path.clone()));
        assert!(c.is_empty());
        c.put("k1", &digest, 12);
        fs::write(&path, format!("{}garbage line\nk2 sha256:xyz 3\nk3 {digest} nan\n", fs::read_to_string(&path).unwrap())).unwrap();
        let c = DigestCache::at(Some(path));
        assert_eq!(c.get("k1"), Some((digest, 12)));
        assert_eq!(c.get("k2"), None);
        assert_eq!(c.get("k3"), None);
        assert_eq!(compressed_key(Compressor::GZIP, "sha256:00"), "Gzip-v2:00");
    }

    #[test]
    fn annotations_are_kept_beside_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer-digests");
        let digest = format!("sha256:{}", "cd".repeat(32));
        let toc = vec![("io.x.manifest-position".to_string(), "10:20:30:1".to_string()), ("io.x.checksum".to_string(), digest.clone())];
        let mut c = DigestCache::at(Some(path.clone()));
        c.put_annotated("ZstdChunked-v1:00", &digest, 7, &toc);
        // A value the line format cannot hold is not cached at all (the layer is compressed again).
        c.put_annotated("ZstdChunked-v1:11", &digest, 7, &[("k".into(), "a b".into())]);
        fs::write(&path, format!("{}bad {digest} 1 novalue\n", fs::read_to_string(&path).unwrap())).unwrap();
        let c = DigestCache::at(Some(path));
        assert_eq!(c.get_annotated("ZstdChunked-v1:00"), Some((digest.clone(), 7, toc)));
        assert_eq!(c.get("ZstdChunked-v1:00"), Some((digest, 7)));
        assert_eq!(c.get("ZstdChunked-v1:11"), None);
        assert_eq!(c.get("bad"), None);
    }
}
