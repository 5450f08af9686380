//! Layer file trees: `contents` joined into one root as nixpkgs' `symlinkJoin` does (with
//! `lndir`), or `copyToRoot` copied as buildImage's `rsync -a` does, then packed into a tar.
//!
//! The tar has relative `./` names (as `tar -C root -c .` writes them), members sorted by name
//! directory by directory, numeric owners, one fixed mtime, and hard links stored as full files,
//! so the same tree always gives the same bytes. Owners come either from `lstat` (when packing
//! inside a fakeroot session, which fakes what `lstat` returns, so `chown` in
//! `fakeRootCommands` shows) or are all root, as they would be seen under fakeroot anyway.

pub mod beneath;

use crate::pycompat::py_name_cmp;
use crate::util::io::HashingWriter;
use crate::tar::write::Writer;
use crate::tar::{self, Header};
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directory names `lndir` skips (source control metadata), and so does symlinkJoin.
const LNDIR_SKIPPED_DIRS: &[&str] = &["BitKeeper", "RCS", "SCCS", "CVS", "CVS.adm", ".svn", ".git", ".hg"];

/// Joins the trees `paths` into `root` (which must exist): directories become real
/// directories, merged across paths; everything else becomes a symlink, to the original file,
/// or with the same target as the original symlink. The first path to provide a name wins, as
/// with `lndir`, and names ending in `~` are skipped, as `lndir` does.
pub fn join(paths: &[PathBuf], root: &Path) -> Result<()> {
    for p in paths {
        let meta = fs::metadata(p).with_context(|| format!("contents: cannot stat {}", p.display()))?;
        if !meta.is_dir() {
            bail!("contents: {} is not a directory (symlinkJoin needs directories)", p.display());
        }
        join_dir(p, root)?;
    }
    Ok(())
}

fn sorted_entries(dir: &Path) -> Result<Vec<(Vec<u8>, fs::FileType)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot list directory {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list directory {}", dir.display()))?;
        let ft = e.file_type().with_context(|| format!("cannot stat {}", e.path().display()))?;
        out.push((e.file_name().as_bytes().to_vec(), ft));
    }
    // lndir takes readdir's order; sorting only changes which conflict warning comes first.
    out.sort_by(|a, b| py_name_cmp(&a.0, &b.0));
    Ok(out)
}

fn join_dir(from: &Path, to: &Path) -> Result<()> {
    for (name, ft) in sorted_entries(from)? {
        if name.ends_with(b"~") {
            continue;
        }
        let name = OsStr::from_bytes(&name);
        let src = from.join(name);
        let dst = to.join(name);
        let existing = fs::symlink_metadata(&dst).ok();
        if ft.is_dir() {
            if LNDIR_SKIPPED_DIRS.iter().any(|d| OsStr::new(d) == name) {
                continue;
            }
            match existing {
                None => {
                    fs::create_dir(&dst).with_context(|| format!("cannot create directory {}", dst.display()))?;
                    set_mode(&dst, 0o755)?;
                }
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    eprintln!("warning: contents: {} exists and is not a directory; not merging {} into it", dst.display(), src.display());
                    continue;
                }
            }
            join_dir(&src, &dst)?;
        } else {
            let target = if ft.is_symlink() {
                fs::read_link(&src).with_context(|| format!("cannot read link {}", src.display()))?
            } else {
                src.clone()
            };
            if let Some(m) = existing {
                let same = m.file_type().is_symlink() && fs::read_link(&dst).map(|t| t == target).unwrap_or(false);
                if !same {
                    eprintln!("warning: contents: {} exists already; keeping it rather than {}", dst.display(), src.display());
                }
                continue;
            }
            std::os::unix::fs::symlink(&target, &dst).with_context(|| format!("cannot create symlink {}", dst.display()))?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| format!("cannot chmod {}", path.display()))
}

/// How [`copy_to_root`] treats symlinks to directories, as buildImage's `keepContentsDirlinks`
/// picks between `rsync -k` and `rsync -K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dirlinks {
    /// `--copy-dirlinks`: a symlink to a directory in the source is copied as that directory.
    Copy,
    /// `--keep-dirlinks`: source symlinks stay symlinks, and a symlink to a directory already
    /// in the root is followed (inside the root) when the source has a directory there.
    Keep,
}

/// Copies the tree `src` onto `root` as `rsync -a --chown=0:0 SRC/ ROOT/` does: directories
/// merge (taking the source's mode), anything else is replaced. `created` is called on every
/// path made or changed, to give it its owner (root). Directories are made writable while they
/// are filled, so read-only store trees can be merged as a non-root user.
pub fn copy_to_root(src: &Path, root: &Path, dirlinks: Dirlinks, created: &mut dyn FnMut(&Path) -> Result<()>) -> Result<()> {
    let meta = fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory (copyToRoot copies directories' contents)", src.display());
    }
    copy_dir(src, root, root, dirlinks, created, 0)
}

/// Follows `rel` (relative to `root`) inside `root`, as a chroot into it would: absolute
/// targets start again at `root`, `..` stops there. None if it leads nowhere.
fn resolve_in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = rel.iter().rev().map(|c| c.to_owned()).collect();
    let mut at = PathBuf::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        match c.as_bytes() {
            b"/" | b"." | b"" => continue,
            b".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        let next = at.join(&c);
        let meta = fs::symlink_metadata(root.join(&next)).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = fs::read_link(root.join(&next)).ok()?;
            if target.is_absolute() {
                at = PathBuf::new();
            }
            todo.extend(target.iter().rev().map(|c| c.to_owned()));
        } else {
            at = next;
        }
    }
    Some(root.join(at))
}

fn copy_dir(src: &Path, dst: &Path, root: &Path, dirlinks: Dirlinks, created: &mut dyn FnMut(&Path) -> Result<()>, depth: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if depth > 256 {
        bail!("{}: directories nested too deeply (a symlink loop?)", src.display());
    }
    let mut names: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("cannot list {}", src.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("cannot list {}", src.display()))?;
    names.sort();
    for name in names {
        let s = src.join(&name);
        let mut d = dst.join(&name);
        let mut meta = fs::symlink_metadata(&s).with_context(|| format!("cannot stat {}", s.display()))?;
        if meta.file_type().is_symlink() && dirlinks == Dirlinks::Copy {
            if let Ok(target) = fs::metadata(&s) {
                if target.is_dir() {
                    meta = target;
                }
            }
        }
        let mut existing = fs::symlink_metadata(&d).ok();
        let ft = meta.file_type();
        if ft.is_dir() {
            if dirlinks == Dirlinks::Keep && existing.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
                let rel = d.strip_prefix(root).unwrap_or(&d).to_owned();
                if let Some(target) = resolve_in_root(root, &rel).filter(|t| t.is_dir()) {
                    d = target;
                    existing = fs::symlink_metadata(&d).ok();
                }
            }
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    fs::remove_file(&d).with_context(|| format!("cannot replace {}", d.display()))?;
                    fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?;
                }
                None => fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?,
            }
            // Writable while we fill it; it takes the source's mode afterwards.
            set_mode(&d, 0o700)?;
            copy_dir(&s, &d, root, dirlinks, created, depth + 1)?;
            created(&d)?;
            set_mode(&d, meta.mode() & 0o7777)?;
            continue;
        }
        if !(ft.is_file() || ft.is_symlink()) {
            eprintln!("stevedore: warning: {} is neither a file, a directory nor a symlink; not copied", s.display());
            continue;
        }
        match existing {
            Some(m) if m.is_dir() => {
                make_removable(&d)?;
                fs::remove_dir_all(&d)
            }
            Some(_) => fs::remove_file(&d),
            None => Ok(()),
        }
        .with_context(|| format!("cannot replace {}", d.display()))?;
        if ft.is_symlink() {
            let target = fs::read_link(&s).with_context(|| format!("cannot read link {}", s.display()))?;
            std::os::unix::fs::symlink(&target, &d).with_context(|| format!("cannot create symlink {}", d.display()))?;
            created(&d)?;
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            let mut from = File::open(&s).with_context(|| format!("cannot open {}", s.display()))?;
            let mut to = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            io::copy(&mut from, &mut to).with_context(|| format!("cannot copy {} to {}", s.display(), d.display()))?;
            created(&d)?;
            set_mode(&d, meta.mode() & 0o7777)?;
        }
    }
    Ok(())
}

/// Makes every directory under `dir` writable, so a non-root user can remove the tree.
fn make_removable(dir: &Path) -> Result<()> {
    set_mode(dir, 0o700)?;
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_removable(&e.path())?;
        }
    }
    Ok(())
}

/// Who owns the packed files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// 0:0 for everything: what a fakeroot session shows for files nobody chowned.
    Root,
    /// What `lstat` says (inside fakeroot: the faked owners).
    FromFs,
    /// These ids for everything (`tar --owner=UID --group=GID`).
    Fixed(u64, u64),
}

/// What `lstat` says about a file, read through libc so that fakeroot's LD_PRELOAD wrapper
/// answers (it fakes owners, and modes and device numbers of nodes made with `mknod`).
struct Stat {
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    rdev: (u32, u32),
}

fn lstat(path: &Path) -> io::Result<Stat> {
    // nix calls libc's lstat (as fakeroot needs), not statx as std does.
    let st = nix::sys::stat::lstat(path)?;
    Ok(Stat {
        mode: st.st_mode,
        uid: st.st_uid as u64,
        gid: st.st_gid as u64,
        size: st.st_size as u64,
        rdev: (libc::major(st.st_rdev), libc::minor(st.st_rdev)),
    })
}

/// Options for [`pack`].
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub mtime: i64,
    pub owners: Owners,
}

/// The written layer: its size and sha256.
pub struct Packed {
    pub size: u64,
    pub digest: [u8; 32],
    pub members: u64,
}

struct Packer<'a, W: Write> {
    tar: Writer<HashingWriter<W>>,
    opts: &'a PackOptions,
}

impl<W: Write> Packer<'_, W> {
    /// Writes a member's header (and, for a regular file, its data from `data`).
    fn member(&mut self, name: &[u8], st: &Stat, kind: u8, size: u64, link: &[u8], data: Option<(&mut dyn Read, &dyn Fn() -> String)>) -> Result<()> {
        let (uid, gid) = match self.opts.owners {
            Owners::Root => (0, 0),
            Owners::FromFs => (st.uid, st.gid),
            Owners::Fixed(uid, gid) => (uid, gid),
        };
        let h = Header {
            name,
            mode: st.mode & 0o7777,
            uid,
            gid,
            size,
            mtime: self.opts.mtime,
            kind,
            linkname: link,
            uname: "",
            gname: "",
            devmajor: st.rdev.0,
            devminor: st.rdev.1,
        };
        self.tar.member(&h, data)
    }

    /// Adds `path` (named `name` in the tar) and everything below it.
    fn add(&mut self, path: &mut PathBuf, name: &mut Vec<u8>) -> Result<()> {
        let st = lstat(path).with_context(|| format!("cannot stat {}", path.display()))?;
        match st.mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if !name.ends_with(b"/") {
                    name.push(b'/');
                }
                self.member(name, &st, tar::DIRTYPE, 0, b"", None)?;
                let mut children: Vec<Vec<u8>> = Vec::new();
                for e in fs::read_dir(&*path).with_context(|| format!("cannot list directory {}", path.display()))? {
                    let e = e.with_context(|| format!("cannot list directory {}", path.display()))?;
                    children.push(e.file_name().as_bytes().to_vec());
                }
                children.sort_by(|a, b| py_name_cmp(a, b));
                let base = name.len();
                for child in children {
                    name.truncate(base);
                    name.extend_from_slice(&child);
                    path.push(OsStr::from_bytes(&child));
                    let r = self.add(path, name);
                    path.pop();
                    r?;
                }
                name.truncate(base);
            }
            libc::S_IFREG => {
                let mut f = File::open(&*path).with_context(|| format!("cannot open {}", path.display()))?;
                let what = || path.display().to_string();
                self.member(name, &st, tar::REGTYPE, st.size, b"", Some((&mut f, &what)))?;
            }
            libc::S_IFLNK => {
                let target = fs::read_link(&*path).with_context(|| format!("cannot read link {}", path.display()))?;
                self.member(name, &st, tar::SYMTYPE, 0, target.as_os_str().as_bytes(), None)?;
            }
            libc::S_IFCHR => self.member(name, &st, tar::CHRTYPE, 0, b"", None)?,
            libc::S_IFBLK => self.member(name, &st, tar::BLKTYPE, 0, b"", None)?,
            libc::S_IFIFO => self.member(name, &st, tar::FIFOTYPE, 0, b"", None)?,
            // GNU tar skips sockets too: a tar member cannot hold one.
            libc::S_IFSOCK => eprintln!("warning: {}: skipping a socket", path.display()),
            other => bail!("{}: unknown file type {other:o}", path.display()),
        }
        Ok(())
    }
}

/// Packs the tree at `root` into `out` as a layer tar: `./`, then everything below it.
pub fn pack<W: Write>(root: &Path, out: W, opts: &PackOptions) -> Result<(W, Packed)> {
    let mut p = Packer { tar: Writer::new(HashingWriter::new(out)), opts };
    let mut path = root.to_path_buf();
    let mut name = b"./".to_vec();
    p.add(&mut path, &mut name)?;
    let members = p.tar.members();
    let (w, digest, size) = p.tar.finish()?.finish();
    Ok((w, Packed { size, digest, members }))
}

/// Packs `root` into `dir/layer.tar` and writes its sha256 (hex) to `dir/checksum`, the layout
/// `stevedore stream` reads a customisation layer from.
pub fn pack_to_dir(root: &Path, dir: &Path, opts: &PackOptions) -> Result<Packed> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tar_path = dir.join("layer.tar");
    let file = File::create(&tar_path).with_context(|| format!("cannot create {}", tar_path.display()))?;
    let (w, packed) = pack(root, BufWriter::with_capacity(1 << 20, file), opts)?;
    w.into_inner()
        .map_err(|e| anyhow!("cannot write {}: {}", tar_path.display(), e.error()))?
        .sync_all()
        .with_context(|| format!("cannot write {}", tar_path.display()))?;
    let checksum = dir.join("checksum");
    fs::write(&checksum, format!("{}\n", crate::util::hex(&packed.digest)))
        .with_context(|| format!("cannot write {}", checksum.display()))?;
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn members(tar_bytes: &[u8]) -> Vec<(String, u8, u64, u64, u64, String)> {
        let mut a = ::tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    h.entry_type().as_byte(),
                    h.mode().unwrap() as u64,
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn join_merges_directories_and_links_files() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::create_dir_all(a.join("bin")).unwrap();
        fs::create_dir_all(b.join("bin")).unwrap();
        fs::create_dir_all(b.join(".git")).unwrap();
        fs::write(a.join("bin/x"), "x").unwrap();
        fs::write(b.join("bin/x"), "other").unwrap();
        fs::write(b.join("bin/y~"), "backup").unwrap();
        symlink("x", b.join("bin/z")).unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        join(&[a.clone(), b.clone()], &root).unwrap();
        assert!(fs::symlink_metadata(root.join("bin")).unwrap().is_dir());
        assert_eq!(fs::read_link(root.join("bin/x")).unwrap(), a.join("bin/x"));
        assert_eq!(fs::read_link(root.join("bin/z")).unwrap(), PathBuf::from("x"));
        assert!(!root.join("bin/y~").exists());
        assert!(!root.join(".git").exists());
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(join(&[file], &root).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn pack_is_sorted_relative_and_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("b/c")).unwrap();
        fs::write(root.join("a"), "hello").unwrap();
        fs::hard_link(root.join("a"), root.join("b/hard")).unwrap();
        symlink("/nix/store/x", root.join("b/link")).unwrap();
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let opts = PackOptions { mtime: 42, owners: Owners::Root };
        let (bytes, packed) = pack(&root, Vec::new(), &opts).unwrap();
        assert_eq!(bytes.len() as u64, packed.size);
        assert_eq!(bytes.len() % tar::RECORD as usize, 0);
        let m = members(&bytes);
        let names: Vec<&str> = m.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["./", "./a", "./b/", "./b/c/", "./b/hard", "./b/link"]);
        assert_eq!(m[1].2, 0o4755);
        assert!(m.iter().all(|e| e.3 == 0 && e.4 == 42));
        // Hard links are stored as files, with their contents.
        assert_eq!(m[4].1, b'0');
        assert_eq!(m[5].5, "/nix/store/x");
        let (again, _) = pack(&root, Vec::new(), &opts).unwrap();
        assert_eq!(bytes, again);
        let out = tmp.path().join("out");
        let p = pack_to_dir(&root, &out, &opts).unwrap();
        assert_eq!(fs::read(out.join("layer.tar")).unwrap(), bytes);
        assert_eq!(fs::read_to_string(out.join("checksum")).unwrap().trim(), crate::util::hex(&p.digest));
    }

    fn tree(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
            names.sort();
            for p in names {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                let mode = m.permissions().mode() & 0o7777;
                if m.file_type().is_symlink() {
                    out.push(format!("{rel} -> {}", fs::read_link(&p).unwrap().display()));
                } else if m.is_dir() {
                    out.push(format!("{rel} dir {mode:o}"));
                    walk(root, &p, out);
                } else {
                    out.push(format!("{rel} {:?} {mode:o}", fs::read_to_string(&p).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn copy_to_root_merges_read_only_trees_and_follows_dirlinks_as_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::create_dir_all(a.join("lib64")).unwrap();
        fs::create_dir_all(a.join("bin")).unwrap();
        fs::write(a.join("lib64/x"), "x").unwrap();
        fs::write(a.join("bin/tool"), "a").unwrap();
        symlink("lib64", a.join("lib")).unwrap();
        symlink("tool", a.join("bin/alias")).unwrap();
        fs::create_dir_all(b.join("lib")).unwrap();
        fs::create_dir_all(b.join("bin")).unwrap();
        fs::write(b.join("lib/y"), "y").unwrap();
        fs::write(b.join("bin/tool"), "b").unwrap();
        // Read-only, as store paths are: merging the second must still work.
        for d in [&a, &b] {
            for sub in ["", "bin", "lib64", "lib"] {
                let p = d.join(sub);
                if fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o555)).unwrap();
                }
            }
        }
        let copy = tmp.path().join("copy");
        fs::create_dir(&copy).unwrap();
        let mut made = 0;
        for src in [&a, &b] {
            copy_to_root(src, &copy, Dirlinks::Copy, &mut |_| {
                made += 1;
                Ok(())
            })
            .unwrap();
        }
        assert!(made > 0);
        assert_eq!(
            tree(&copy),
            [
                "bin dir 555",
                "bin/alias -> tool",
                "bin/tool \"b\" 644",
                "lib dir 555",
                "lib/x \"x\" 644",
                "lib/y \"y\" 644",
                "lib64 dir 555",
                "lib64/x \"x\" 644",
            ]
        );
        let keep = tmp.path().join("keep");
        fs::create_dir(&keep).unwrap();
        for src in [&a, &b] {
            copy_to_root(src, &keep, Dirlinks::Keep, &mut |_| Ok(())).unwrap();
        }
        assert_eq!(
            tree(&keep),
            ["bin dir 555", "bin/alias -> tool", "bin/tool \"b\" 644", "lib -> lib64", "lib64 dir 555", "lib64/x \"x\" 644", "lib64/y \"y\" 644"]
        );
        // A file replaces a directory and a directory a file; a file is not a tree to copy.
        let c = tmp.path().join("c");
        fs::create_dir_all(&c).unwrap();
        fs::write(c.join("lib64"), "now a file").unwrap();
        fs::create_dir_all(c.join("bin/tool")).unwrap();
        copy_to_root(&c, &keep, Dirlinks::Copy, &mut |_| Ok(())).unwrap();
        assert!(fs::symlink_metadata(keep.join("lib64")).unwrap().is_file());
        assert!(fs::symlink_metadata(keep.join("bin/tool")).unwrap().is_dir());
        let e = copy_to_root(&c.join("lib64"), &keep, Dirlinks::Copy, &mut |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        for d in [&a, &b, &copy, &keep] {
            make_removable(d).unwrap();
        }
    }

    #[test]
    fn resolving_inside_the_root_never_leaves_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("/usr/lib", root.join("abs")).unwrap();
        symlink("../../../../usr/lib", root.join("up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(root, Path::new("abs")), Some(root.join("usr/lib")));
        assert_eq!(resolve_in_root(root, Path::new("up")), Some(root.join("usr/lib")));
        assert_eq!(resolve_in_root(root, Path::new("loop")), None);
        assert_eq!(resolve_in_root(root, Path::new("missing/x")), None);
    }

}
