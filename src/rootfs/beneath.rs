//! Paths beneath a root directory that cannot lead out of it.
//!
//! `run-as-root` lays out an image's files in a scratch root, often as real root. The image
//! comes from anyone, so a symlink it holds (`etc -> /etc`) must never be followed by our own
//! file operations: every directory on the way to a name is opened one component at a time
//! with `O_NOFOLLOW`, from a descriptor of the root, and the name itself is made or changed
//! relative to that directory (`mkdirat`, `openat(O_EXCL|O_NOFOLLOW)`, `symlinkat`,
//! `fchownat(AT_SYMLINK_NOFOLLOW)`, ...). Whatever the tree holds, nothing outside the root is
//! reached, even if a later bug hands us a hostile key.

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory under which every path is resolved without following symlinks.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    /// The last directory opened, by its components joined with `/`: siblings come in a row
    /// when a tree is walked in order, so most lookups open nothing.
    cached: Option<(Vec<u8>, OwnedFd)>,
}

/// `rel` as its directory (empty for the root) and its last component.
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    }
}

fn bad_component(c: &[u8]) -> bool {
    c.is_empty() || c == b"." || c == b".." || c.contains(&b'/') || c.contains(&0)
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = openat(nix::fcntl::AT_FDCWD, path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(Root { fd, path: path.to_owned(), cached: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host path of `rel` (components joined with `/`), for messages only.
    pub fn display(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.path.clone()
        } else {
            self.path.join(OsStr::from_bytes(rel))
        }
    }

    /// Opens directory `dir` (relative, components joined with `/`; empty for the root) as an
    /// `O_PATH` descriptor, refusing any component that is a symlink or not a directory.
    pub fn open_dir(&self, dir: &[u8]) -> io::Result<OwnedFd> {
        let mut fd = self.fd.try_clone()?;
        if dir.is_empty() {
            return Ok(fd);
        }
        for c in dir.split(|&b| b == b'/') {
            if bad_component(c) {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a path component that is not a plain name"));
            }
            // O_NOFOLLOW with O_PATH opens a symlink itself rather than failing, and O_DIRECTORY
            // then refuses it: either way no link is followed.
            fd = openat(&fd, OsStr::from_bytes(c), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| if e == nix::errno::Errno::ELOOP { io::Error::from_raw_os_error(libc::ENOTDIR) } else { e.into() })?;
        }
        Ok(fd)
    }

    /// The directory holding `rel` and its last component, checked to be a plain name.
    pub fn parent<'a>(&mut self, rel: &'a [u8]) -> io::Result<(BorrowedFd<'_>, &'a OsStr)> {
        let (dir, name) = split(rel);
        if bad_component(name) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a path whose last component is not a plain name"));
        }
        let hit = matches!(&self.cached, Some((k, _)) if k == dir);
        if !hit {
            let fd = self.open_dir(dir)?;
            self.cached = Some((dir.to_vec(), fd));
        }
        let fd = self.cached.as_ref().map(|(_, fd)| fd.as_fd()).expect("just cached");
        Ok((fd, OsStr::from_bytes(name)))
    }

    /// Opens `rel` itself without following a symlink there (`O_PATH` for directories and
    /// other non-files, as asked by `flags`).
    pub fn open_at(&mut self, rel: &[u8], flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
        if rel.is_empty() {
            return Ok(openat(&self.fd, ".", flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::from_bits_truncate(mode))?);
        }
        let (dir, name) = self.parent(rel)?;
        Ok(openat(dir, name, flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::from_bits_truncate(mode))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn symlinks_on_the_way_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        let root = d.path().join("root");
        fs::create_dir_all(&outside).unwrap();
        fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
        std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
        let mut r = Root::open(&root).unwrap();
        // Through an absolute and a relative link: refused.
        assert!(r.open_at(b"a/x", OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_EXCL, 0o600).is_err());
        assert!(r.open_at(b"rel/x", OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_EXCL, 0o600).is_err());
        // The link itself is not opened as a file either.
        assert!(r.open_at(b"a", OFlag::O_RDONLY, 0).is_err());
        for bad in [&b"../x"[..], b"real/../../x", b"", b"real//x", b"real/./x"] {
            assert!(r.parent(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(r.open_at(b"real/x", OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_EXCL, 0o600).is_ok());
        assert!(root.join("real/x").exists());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }
}
