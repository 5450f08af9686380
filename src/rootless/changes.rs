//! What the script changed, as a layer: the root laid out from the base image's merged tree (owners
//! the disk cannot hold kept by inode), snapshots before and after, their diff, and the change
//! written as a tar (C's work).

use super::*;

// Owners the disk cannot hold.

/// Owners that are not on disk, by (device, inode): ids the namespace does not map, and, with a
/// single mapping, every owner but root, including the script's recorded `chown`s. An entry
/// holds only for the inode it was made for: file systems hand a freed inode number to the
/// next new file at once, so the birth time must match too (a file made after the snapshot
/// is born later than anything in it; the script's own chowns are pinned by S meanwhile).
#[derive(Default, Debug)]
pub(super) struct Owners {
    pub(super) single: bool,
    pub(super) fake: HashMap<(u64, u64), Fake>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Fake {
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) birth: Option<(u64, u32)>,
}

pub(super) fn birth(meta: &fs::Metadata) -> Option<(u64, u32)> {
    meta.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| (d.as_secs(), d.subsec_nanos()))
}

impl Owners {
    /// Sets the owner of `path` (not following symlinks), on disk when the ids are mapped.
    pub(super) fn set(&mut self, path: &Path, uid: u64, gid: u64) -> Result<()> {
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => (d, n),
            _ => bail!("cannot chown {}: not a path below a directory", path.display()),
        };
        let dir = openat(AT_FDCWD, dir, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open {}", dir.display()))?;
        self.set_at(dir.as_fd(), name, path, uid, gid)
    }

    /// Sets the owner of `name` in directory `dir` (not following symlinks); `shown` names it
    /// in messages.
    pub(super) fn set_at(&mut self, dir: BorrowedFd, name: &OsStr, shown: &Path, uid: u64, gid: u64) -> Result<()> {
        let fd = openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot open {}", shown.display()))?;
        let meta = File::from(fd).metadata().with_context(|| format!("cannot stat {}", shown.display()))?;
        let id = (meta.dev(), meta.ino());
        let fake = Fake { uid, gid, birth: birth(&meta) };
        if self.single {
            // Everything on disk is ours, which is root here.
            if (uid, gid) == (0, 0) {
                self.fake.remove(&id);
            } else {
                self.fake.insert(id, fake);
            }
            return Ok(());
        }
        if uid < u32::MAX as u64 && gid < u32::MAX as u64 {
            let owner = (Some(nix::unistd::Uid::from_raw(uid as u32)), Some(nix::unistd::Gid::from_raw(gid as u32)));
            match nix::unistd::fchownat(dir, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(()) => {
                    self.fake.remove(&id);
                    return Ok(());
                }
                Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => bail!("cannot chown {} to {uid}:{gid}: {e}", shown.display()),
            }
        }
        // An id outside the mapping.
        self.fake.insert(id, fake);
        Ok(())
    }

    /// A `chown` the script asked for (`u32::MAX` keeps that id). Only single mappings record,
    /// and then the disk says root.
    pub(super) fn record(&mut self, dev: u64, ino: u64, birth: Option<(u64, u32)>, uid: u32, gid: u32) {
        let cur = match self.fake.get(&(dev, ino)) {
            Some(f) if f.birth == birth => (f.uid, f.gid),
            _ => (0, 0),
        };
        let (uid, gid) = (if uid == u32::MAX { cur.0 } else { uid as u64 }, if gid == u32::MAX { cur.1 } else { gid as u64 });
        self.fake.insert((dev, ino), Fake { uid, gid, birth });
    }

    pub(super) fn of(&self, meta: &fs::Metadata) -> (u64, u64) {
        match self.fake.get(&(meta.dev(), meta.ino())) {
            Some(f) if f.birth == birth(meta) => (f.uid, f.gid),
            _ => (meta.uid() as u64, meta.gid() as u64),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Laying out the root filesystem.

/// A tree key as a relative path (components joined with `/`; keys hold no `/` or NUL in a
/// component, see [`crate::tar::name`]).
pub(super) fn key_rel(key: &[u8]) -> Vec<u8> {
    key.iter().map(|&b| if b == SEP { b'/' } else { b }).collect()
}

/// Creates the tree on disk under `root` (which exists): data read from the layers by offset,
/// hard links kept, owners set (or recorded), directory modes set last so read-only ones can
/// be filled first. Every name is made relative to its directory, opened beneath the root
/// without following symlinks ([`Root`]), so no link in the image leads a write outside.
pub(super) fn materialize(tree: &Tree, blobs: &[LayerBlob], root_path: &Path, owners: &mut Owners) -> Result<()> {
    let mut root = Root::open(root_path).with_context(|| format!("cannot open {}", root_path.display()))?;
    let mut data = LayerData::new(blobs);
    let mut first_of_inode: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut dirs: Vec<(Vec<u8>, u32, u64, u64)> = Vec::new();
    let mut stand_ins = 0;
    let perm = |m: u32| Mode::from_bits_truncate(m as libc::mode_t);
    for (key, node) in &tree.nodes {
        let rel = key_rel(key);
        let shown = root.display(&rel);
        let fail = |what: &str, e: io::Error| anyhow!("cannot {what} {}: {e}", shown.display());
        let mut file: Option<File> = None;
        match &node.kind {
            Kind::Dir => {
                let (dir, name) = root.parent(&rel).map_err(|e| fail("create directory", e))?;
                mkdirat(dir, name, perm(0o700)).map_err(|e| fail("create directory", e.into()))?;
                dirs.push((rel, node.mode, node.uid, node.gid));
                continue;
            }
            Kind::File { layer, offset, size, inode } => {
                if let Some(first) = first_of_inode.get(inode) {
                    let (first_dir, first_name) = crate::rootfs::beneath::split(first);
                    let from = root.open_dir(first_dir).map_err(|e| fail("hard-link", e))?;
                    let (dir, name) = root.parent(&rel).map_err(|e| fail("hard-link", e))?;
                    linkat(&from, OsStr::from_bytes(first_name), dir, name, AtFlags::empty()).map_err(|e| fail("hard-link", e.into()))?;
                    continue;
                }
                let fd = root.open_at(&rel, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, 0o600).map_err(|e| fail("create", e))?;
                let mut f = File::from(fd);
                let mut r = data.reader(*layer, *offset, *size)?;
                io::copy(&mut r, &mut f).map_err(|e| fail("write", e))?;
                first_of_inode.insert(*inode, rel.clone());
                file = Some(f);
            }
            Kind::Symlink(target) => {
                let (dir, name) = root.parent(&rel).map_err(|e| fail("create symlink", e))?;
                symlinkat(OsStr::from_bytes(target), dir, name).map_err(|e| fail("create symlink", e.into()))?;
                owners.set_at(dir, name, &shown, node.uid, node.gid)?;
                continue;
            }
            Kind::Fifo => {
                let (dir, name) = root.parent(&rel).map_err(|e| fail("create fifo", e))?;
                mkfifoat(dir, name, perm(0o600)).map_err(|e| fail("create fifo", e.into()))?;
            }
            Kind::Char(major, minor) | Kind::Block(major, minor) => {
                let kind = if matches!(node.kind, Kind::Char(..)) { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                let (dir, name) = root.parent(&rel).map_err(|e| fail("create", e))?;
                if mknodat(dir, name, kind, perm(0o600), libc::makedev(*major, *minor)).is_err() {
                    // No user namespace may create device nodes. An empty file stands in; it is
                    // left out of the layer unless the script replaces it.
                    let fd = root.open_at(&rel, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, 0o600).map_err(|e| fail("create", e))?;
                    drop(fd);
                    stand_ins += 1;
                }
            }
        }
        let (dir, name) = root.parent(&rel).map_err(|e| fail("open", e))?;
        owners.set_at(dir, name, &shown, node.uid, node.gid)?;
        // After chown, which clears set-id bits. The name is what we just made, not a link.
        match file {
            Some(f) => fchmod(&f, perm(node.mode)).map_err(|e| fail("chmod", e.into()))?,
            None => fchmodat(dir, name, perm(node.mode), FchmodatFlags::FollowSymlink).map_err(|e| fail("chmod", e.into()))?,
        }
    }
    for (rel, mode, uid, gid) in dirs.iter().rev() {
        let shown = root.display(rel);
        let fail = |what: &str, e: io::Error| anyhow!("cannot {what} {}: {e}", shown.display());
        let (dir, name) = root.parent(rel).map_err(|e| fail("open", e))?;
        owners.set_at(dir, name, &shown, *uid, *gid)?;
        let fd = openat(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| fail("open", e.into()))?;
        fchmod(&fd, perm(*mode)).map_err(|e| fail("chmod", e.into()))?;
    }
    owners.set(root_path, tree.root.uid, tree.root.gid)?;
    fs::set_permissions(root_path, fs::Permissions::from_mode(tree.root.mode)).with_context(|| format!("cannot chmod {}", root_path.display()))?;
    if stand_ins > 0 {
        eprintln!("stevedore: warning: the image has {stand_ins} device nodes, which a user namespace cannot create; the script sees empty files in their place");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Snapshots and the diff.

/// What the diff compares of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ino: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Owner as the image sees it (recorded owners applied).
    pub uid: u64,
    pub gid: u64,
    pub ctime: (i64, i64),
    /// Birth time where the file system keeps one: file systems reuse a freed inode at once
    /// (ext4 does), so a directory removed and made again is told apart by this.
    pub birth: Option<(u64, u32)>,
}

impl Stat {
    pub(super) fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub(super) fn of(meta: &fs::Metadata, owners: &Owners) -> Stat {
        let (uid, gid) = owners.of(meta);
        Stat { ino: meta.ino(), mode: meta.mode(), uid, gid, ctime: (meta.ctime(), meta.ctime_nsec()), birth: birth(meta) }
    }
}

/// Every path under `root` (not following symlinks), keyed as the tree keys them.
pub(super) fn scan(root: &Path, owners: &Owners) -> Result<(Stat, BTreeMap<Vec<u8>, Stat>)> {
    fn walk(dir: &Path, key: &[u8], owners: &Owners, out: &mut BTreeMap<Vec<u8>, Stat>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?;
            let name = entry.file_name();
            let k = if key.is_empty() { name.as_bytes().to_vec() } else { [key, &[SEP], name.as_bytes()].concat() };
            if meta.is_dir() {
                walk(&path, &k, owners, out)?;
            }
            out.insert(k, Stat::of(&meta, owners));
        }
        Ok(())
    }
    let meta = fs::symlink_metadata(root).with_context(|| format!("cannot stat {}", root.display()))?;
    let mut out = BTreeMap::new();
    walk(root, b"", owners, &mut out)?;
    Ok((Stat::of(&meta, owners), out))
}

/// Waits until a file changed now gets a ctime later than every ctime in `snap`, so that any
/// change the script makes shows in the ctime (file systems keep coarse timestamps).
pub(super) fn wait_for_clock(scratch: &Path, snap: &BTreeMap<Vec<u8>, Stat>) -> Result<()> {
    let newest = snap.values().map(|s| s.ctime).max().unwrap_or((0, 0));
    let probe = scratch.join(".clock");
    let started = std::time::Instant::now();
    loop {
        fs::write(&probe, b"x").with_context(|| format!("cannot write {}", probe.display()))?;
        let m = fs::metadata(&probe)?;
        if (m.ctime(), m.ctime_nsec()) > newest {
            let _ = fs::remove_file(&probe);
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            bail!("the clock of {} does not advance past the snapshot's timestamps", scratch.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// One member of the new layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The path as it is now (new, changed, or a parent directory of a change).
    Entry(Vec<u8>),
    /// `.wh.NAME`: the path was deleted.
    Whiteout(Vec<u8>),
    /// `DIR/.wh..wh..opq`: the directory was replaced; lower contents are hidden.
    Opaque(Vec<u8>),
}

pub(super) fn is_below(key: &[u8], dir: &[u8]) -> bool {
    key.len() > dir.len() && key.starts_with(dir) && key[dir.len()] == SEP
}

pub(super) fn split_key(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().rposition(|&b| b == SEP) {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (&b""[..], key),
    }
}

/// The changes from `lower` to `upper`, in member order (a directory before what is in it;
/// an opaque marker right after its directory). A path changed if it is new, its kind,
/// inode (and birth time), permissions or owner changed, or (not a directory) its ctime did. A deleted path
/// gives one whiteout, whatever was below it; a directory replaced by a new one (another inode)
/// is emitted whole, marked opaque. Parent directories of every change are included.
pub fn diff(lower: &BTreeMap<Vec<u8>, Stat>, upper: &BTreeMap<Vec<u8>, Stat>) -> Vec<Change> {
    let mut out: BTreeMap<Vec<u8>, Change> = BTreeMap::new();
    let mut hidden: Option<Vec<u8>> = None; // lower entries below this are gone with it
    let mut all_new: Option<Vec<u8>> = None; // upper entries below this are all new
    let mut keys: Vec<&Vec<u8>> = lower.keys().chain(upper.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let u = upper.get(key);
        if all_new.as_deref().is_some_and(|d| is_below(key, d)) {
            if u.is_some() {
                out.insert(key.clone(), Change::Entry(key.clone()));
            }
            continue;
        }
        let l = if hidden.as_deref().is_some_and(|d| is_below(key, d)) { None } else { lower.get(key) };
        match (l, u) {
            (None, None) => {}
            (Some(l), None) => {
                let (parent, name) = split_key(key);
                let wh = [&b".wh."[..], name].concat();
                let sort = if parent.is_empty() { wh } else { [parent, &[SEP], &wh].concat() };
                out.insert(sort, Change::Whiteout(key.clone()));
                if l.is_dir() {
                    hidden = Some(key.clone());
                }
            }
            (None, Some(u)) => {
                out.insert(key.clone(), Change::Entry(key.clone()));
                if u.is_dir() {
                    all_new = Some(key.clone());
                }
            }
            (Some(l), Some(u)) => match (l.is_dir(), u.is_dir()) {
                (true, true) if (l.ino, l.birth) != (u.ino, u.birth) => {
                    out.insert(key.clone(), Change::Entry(key.clone()));
                    out.insert([&key[..], &[SEP]].concat(), Change::Opaque(key.clone()));
                    all_new = Some(key.clone());
                }
                (true, true) => {
                    if (l.mode, l.uid, l.gid) != (u.mode, u.uid, u.gid) {
                        out.insert(key.clone(), Change::Entry(key.clone()));
                    }
                }
                (true, false) => {
                    out.insert(key.clone(), Change::Entry(key.clone()));
                    hidden = Some(key.clone());
                }
                (false, true) => {
                    out.insert(key.clone(), Change::Entry(key.clone()));
                    all_new = Some(key.clone());
                }
                (false, false) => {
                    if l != u {
                        out.insert(key.clone(), Change::Entry(key.clone()));
                    }
                }
            },
        }
    }
    // Parents of every change, so the layer is complete on its own.
    let mut parents = Vec::new();
    for change in out.values() {
        let key = match change {
            Change::Entry(k) | Change::Whiteout(k) | Change::Opaque(k) => k,
        };
        let mut k = &key[..];
        loop {
            let (parent, _) = split_key(k);
            if parent.is_empty() {
                break;
            }
            parents.push(parent.to_vec());
            k = parent;
        }
    }
    for p in parents {
        out.entry(p.clone()).or_insert(Change::Entry(p));
    }
    out.into_values().collect()
}

/// Counts of what a layer holds.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayerCounts {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaques: u64,
}

/// Writes the changes under `root` as a layer tar to `out` and returns its sha256.
pub(super) fn write_changes(root: &Path, changes: &[Change], owners: &Owners, out: &Path, mtime: i64) -> Result<([u8; 32], LayerCounts)> {
    flatten::write_atomically(out, |w| {
        let mut tar = Writer::new(HashingWriter::new(w));
        let mut beneath = Root::open(root).with_context(|| format!("cannot open {}", root.display()))?;
        let mut counts = LayerCounts::default();
        let root_meta = fs::symlink_metadata(root).with_context(|| format!("cannot stat {}", root.display()))?;
        let (uid, gid) = owners.of(&root_meta);
        let mut h = Header { uid, gid, mode: root_meta.mode() & 0o7777, kind: t::DIRTYPE, ..Header::plain_file(b"./", 0, mtime) };
        tar.member(&h, None)?;
        for change in changes {
            match change {
                Change::Whiteout(key) | Change::Opaque(key) => {
                    let (parent, name) = split_key(key);
                    let leaf: Vec<u8> = match change {
                        Change::Whiteout(_) => [&b".wh."[..], name].concat(),
                        _ => b".wh..wh..opq".to_vec(),
                    };
                    let dir = if matches!(change, Change::Opaque(_)) { &key[..] } else { parent };
                    let full = if dir.is_empty() { leaf } else { [dir, &[SEP], &leaf].concat() };
                    let name = member_name(&full, false);
                    h = Header { mode: 0, ..Header::plain_file(&name, 0, mtime) };
                    tar.member(&h, None)?;
                    if matches!(change, Change::Whiteout(_)) {
                        counts.whiteouts += 1;
                    } else {
                        counts.opaques += 1;
                    }
                }
                Change::Entry(key) => {
                    let rel = key_rel(key);
                    let path = beneath.display(&rel);
                    let node = beneath.open_at(&rel, OFlag::O_PATH, 0).with_context(|| format!("cannot open {}", path.display()))?;
                    let meta = File::from(node).metadata().with_context(|| format!("cannot stat {}", path.display()))?;
                    let ft = meta.file_type();
                    let (uid, gid) = owners.of(&meta);
                    let name = member_name(key, ft.is_dir());
                    let mut link = Vec::new();
                    let (kind, size) = if ft.is_dir() {
                        (t::DIRTYPE, 0)
                    } else if ft.is_file() {
                        (t::REGTYPE, meta.len())
                    } else if ft.is_symlink() {
                        let (dir, name) = beneath.parent(&rel)?;
                        link = nix::fcntl::readlinkat(dir, name).with_context(|| format!("cannot read link {}", path.display()))?.into_vec();
                        (t::SYMTYPE, 0)
                    } else if ft.is_fifo() {
                        (t::FIFOTYPE, 0)
                    } else if ft.is_char_device() {
                        (t::CHRTYPE, 0)
                    } else if ft.is_block_device() {
                        (t::BLKTYPE, 0)
                    } else {
                        eprintln!("stevedore: warning: {} is a socket, which a layer cannot hold; left out", path.display());
                        continue;
                    };
                    let rdev = meta.rdev();
                    let h = Header {
                        name: &name,
                        mode: meta.mode() & 0o7777,
                        uid,
                        gid,
                        size,
                        mtime,
                        kind,
                        linkname: &link,
                        uname: "",
                        gname: "",
                        devmajor: libc::major(rdev),
                        devminor: libc::minor(rdev),
                    };
                    if kind == t::REGTYPE {
                        let mut f = File::from(beneath.open_at(&rel, OFlag::O_RDONLY, 0).with_context(|| format!("cannot open {}", path.display()))?);
                        let what = || path.display().to_string();
                        tar.member(&h, Some((&mut f, &what)))?;
                    } else {
                        tar.member(&h, None)?;
                    }
                    counts.entries += 1;
                }
            }
        }
        let (w, digest, _) = tar.finish()?.finish();
        Ok((w, (digest, counts)))
    })
}
