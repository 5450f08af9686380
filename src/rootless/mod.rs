//! `run-as-root`: nixpkgs' `runAsRoot` without a VM. A script runs as (namespaced) root over the
//! image's filesystem and what it changed becomes a new layer.
//!
//! Processes, from the caller down:
//!
//! - **P** (the caller) reads the base image into a merged tree ([`crate::image::flatten::Tree`]),
//!   forks C and writes C's uid/gid maps from outside, as only the parent namespace can.
//! - **C** enters new user, mount, network, IPC and UTS namespaces. As root there it lays
//!   out the root filesystem in a scratch directory (every layer applied, owners set), takes a
//!   snapshot of it, copies the `--layer` trees on top, runs the script through S, then diffs
//!   the tree against the snapshot and writes the change as a layer tar.
//! - **S**, pid 1 of a new pid namespace (entered by a short-lived intermediate), mounts the
//!   store paths (read-only), a fresh /proc and a small /dev in a mount namespace of its own,
//!   pivots into the root, and forks T.
//! - **T** runs `SHELL SCRIPT` as uid 0.
//!
//! Id mapping. As root (or with `newuidmap` and a subordinate id range) every id the image uses
//! is mapped, so `chown` is real and the diff reads owners from `lstat`. Otherwise only our own
//! uid and gid can be mapped, to 0: then owners other than root are kept in a table by
//! (device, inode): the base image's owners as it is laid out, and the script's `chown` calls,
//! which a seccomp filter hands to S (`SECCOMP_RET_USER_NOTIF`, so static binaries are covered
//! too); S records the requested owner and reports success without touching the file. The
//! script then sees root-owned files, but the layer carries the owners it asked for.
//!
//! The diff needs no overlayfs: a file changed if its inode or ctime changed, and before the
//! script starts we wait until the clock has moved past every ctime in the snapshot, so even a
//! same-size rewrite with the old mtime restored is caught.

use crate::rootfs::beneath::Root;
use crate::image::flatten::{self, member_name, Kind, LayerBlob, LayerData, Selector, TarOut, Tree, SEP};
use crate::util::hex;
use crate::util::io::HashingWriter;
use crate::rootfs::{self, Dirlinks};
use crate::tar::{self as t, Header};
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fchmod, fchmodat, mkdirat, mknodat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{linkat, mkfifoat, symlinkat};
use nix::fcntl::AtFlags;
use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How container ids are mapped to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdMapping {
    /// Every id if we can (as root, or with newuidmap/newgidmap and /etc/subuid and
    /// /etc/subgid ranges), else our own uid and gid only, with owners recorded.
    Auto,
    /// Every id, or fail.
    Full,
    /// Our own uid and gid as 0, other owners recorded (what an unprivileged build gets).
    Single,
}

impl crate::util::shared::Choice for IdMapping {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[
        ("auto", IdMapping::Auto, "Every id if we can (as root, or with newuidmap/newgidmap and /etc/subuid and /etc/subgid ranges), else our own uid and gid only, with owners recorded"),
        ("full", IdMapping::Full, "Every id, or fail"),
        ("single", IdMapping::Single, "Our own uid and gid as 0, other owners recorded (what an unprivileged build gets)"),
    ];
}

/// A run-as-root job: the base image and trees to lay out, the script, where the layer goes
/// (the `stevedore run-as-root` options mean the same).
#[derive(Debug, Clone)]
pub struct RunAsRoot {
    /// The base image (a Docker archive, plain, gzip or zstd, an OCI archive or layout);
    /// without it the script starts from an empty root.
    pub from_image: Option<PathBuf>,
    /// Take the image tagged NAME:TAG from it (default: the first image).
    pub from_image_name: Option<String>,
    /// The tag to go with --from-image-name (default `latest`).
    pub from_image_tag: Option<String>,
    /// A directory tree copied onto the root before the script runs (copyToRoot), as
    /// `rsync -ak --chown=0:0 DIR/ ROOT/` would: symlinks to directories become directories,
    /// owners are root. Repeatable; later ones win. Its contents end up in the new layer.
    pub layers: Vec<PathBuf>,
    /// Copy --layer trees as `rsync -aK` (keepContentsDirlinks): symlinks stay symlinks, and
    /// symlinks to directories already in the root are followed.
    pub keep_dirlinks: bool,
    /// A store path to bind-mount read-only at the same place (repeatable).
    pub store_paths: Vec<PathBuf>,
    /// Bind-mount this whole store directory read-only instead (e.g. /nix/store).
    pub store_dir: Option<PathBuf>,
    /// The script to run.
    pub script: PathBuf,
    /// The shell that runs it, as a path inside the root (a store path's shell, usually).
    pub shell: String,
    /// An environment variable for the script (repeatable). The environment is only these,
    /// plus PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin if not given.
    pub env: Vec<String>,
    /// Commands run after the script (nixpkgs' extraCommands): by `--extra-commands-shell`,
    /// not chrooted, with the root filesystem as working directory and stevedore's own
    /// environment, as root of the namespace. What they change goes into the layer too.
    pub extra_commands: Option<PathBuf>,
    /// The shell for --extra-commands, a path outside the image.
    pub extra_commands_shell: PathBuf,
    /// Where to write the new layer (a tar; replaced only once complete).
    pub out_layer: PathBuf,
    /// Also write the layer's sha256 (hex) to this file. It always goes to stdout.
    pub out_checksum: Option<PathBuf>,
    /// Modification time of every member (default: $SOURCE_DATE_EPOCH, else 1).
    pub mtime: Option<i64>,
    /// How ids are mapped in the user namespace.
    pub id_mapping: IdMapping,
    /// Where to lay out the root filesystem (default: $TMPDIR, else /tmp).
    pub scratch: Option<PathBuf>,
    /// Print nothing on stderr but errors (the script's output still goes there).
    pub quiet: bool,
}

fn say(quiet: bool, s: impl AsRef<str>) {
    if !quiet {
        eprintln!("{}", s.as_ref());
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

// ---------------------------------------------------------------------------------------------
// Owners the disk cannot hold.

/// Owners that are not on disk, by (device, inode): ids the namespace does not map, and, with a
/// single mapping, every owner but root, including the script's recorded `chown`s. An entry
/// holds only for the inode it was made for: file systems hand a freed inode number to the
/// next new file at once, so the birth time must match too (a file made after the snapshot
/// is born later than anything in it; the script's own chowns are pinned by S meanwhile).
#[derive(Default, Debug)]
struct Owners {
    single: bool,
    fake: HashMap<(u64, u64), Fake>,
}

#[derive(Debug, Clone, Copy)]
struct Fake {
    uid: u64,
    gid: u64,
    birth: Option<(u64, u32)>,
}

fn birth(meta: &fs::Metadata) -> Option<(u64, u32)> {
    meta.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| (d.as_secs(), d.subsec_nanos()))
}

impl Owners {
    /// Sets the owner of `path` (not following symlinks), on disk when the ids are mapped.
    fn set(&mut self, path: &Path, uid: u64, gid: u64) -> Result<()> {
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
    fn set_at(&mut self, dir: BorrowedFd, name: &OsStr, shown: &Path, uid: u64, gid: u64) -> Result<()> {
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
    fn record(&mut self, dev: u64, ino: u64, birth: Option<(u64, u32)>, uid: u32, gid: u32) {
        let cur = match self.fake.get(&(dev, ino)) {
            Some(f) if f.birth == birth => (f.uid, f.gid),
            _ => (0, 0),
        };
        let (uid, gid) = (if uid == u32::MAX { cur.0 } else { uid as u64 }, if gid == u32::MAX { cur.1 } else { gid as u64 });
        self.fake.insert((dev, ino), Fake { uid, gid, birth });
    }

    fn of(&self, meta: &fs::Metadata) -> (u64, u64) {
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
fn key_rel(key: &[u8]) -> Vec<u8> {
    key.iter().map(|&b| if b == SEP { b'/' } else { b }).collect()
}

/// Creates the tree on disk under `root` (which exists): data read from the layers by offset,
/// hard links kept, owners set (or recorded), directory modes set last so read-only ones can
/// be filled first. Every name is made relative to its directory, opened beneath the root
/// without following symlinks ([`Root`]), so no link in the image leads a write outside.
fn materialize(tree: &Tree, blobs: &[LayerBlob], root_path: &Path, owners: &mut Owners) -> Result<()> {
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
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    fn of(meta: &fs::Metadata, owners: &Owners) -> Stat {
        let (uid, gid) = owners.of(meta);
        Stat { ino: meta.ino(), mode: meta.mode(), uid, gid, ctime: (meta.ctime(), meta.ctime_nsec()), birth: birth(meta) }
    }
}

/// Every path under `root` (not following symlinks), keyed as the tree keys them.
fn scan(root: &Path, owners: &Owners) -> Result<(Stat, BTreeMap<Vec<u8>, Stat>)> {
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
fn wait_for_clock(scratch: &Path, snap: &BTreeMap<Vec<u8>, Stat>) -> Result<()> {
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

fn is_below(key: &[u8], dir: &[u8]) -> bool {
    key.len() > dir.len() && key.starts_with(dir) && key[dir.len()] == SEP
}

fn split_key(key: &[u8]) -> (&[u8], &[u8]) {
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
fn write_changes(root: &Path, changes: &[Change], owners: &Owners, out: &Path, mtime: i64) -> Result<([u8; 32], LayerCounts)> {
    flatten::write_atomically(out, |w| {
        let mut tar = TarOut::new(HashingWriter::new(w));
        let mut beneath = Root::open(root).with_context(|| format!("cannot open {}", root.display()))?;
        let mut counts = LayerCounts::default();
        let root_meta = fs::symlink_metadata(root).with_context(|| format!("cannot stat {}", root.display()))?;
        let (uid, gid) = owners.of(&root_meta);
        let mut h = Header { uid, gid, mode: root_meta.mode() & 0o7777, kind: t::DIRTYPE, ..Header::plain_file(b"./", 0, mtime) };
        tar.add(&h, None)?;
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
                    tar.add(&h, None)?;
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
                        tar.add(&h, Some((&mut f, &what)))?;
                    } else {
                        tar.add(&h, None)?;
                    }
                    counts.entries += 1;
                }
            }
        }
        let (w, digest, _) = tar.finish()?.finish();
        Ok((w, (digest, counts)))
    })
}

// ---------------------------------------------------------------------------------------------
// Mount points.

/// A path we created in the root to mount something on; removed afterwards if still empty.
struct MountPoint {
    created: Vec<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PointKind {
    Dir,
    File,
}

/// Makes `root/rel` (and missing parents) exist as a mount point of `kind`, refusing to go
/// through symlinks in the image.
fn mount_point(root: &Path, rel: &Path, kind: PointKind) -> Result<MountPoint> {
    let mut created = Vec::new();
    let mut path = root.to_owned();
    let comps: Vec<_> = rel.components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect();
    for (i, c) in comps.iter().enumerate() {
        path.push(c);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && (!last || kind == PointKind::Dir) => {}
            Ok(m) if last && kind == PointKind::File && m.is_file() => {}
            Ok(_) => bail!("cannot mount on /{}: the image has something else there", rel.display()),
            Err(_) => {
                if last && kind == PointKind::File {
                    File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                } else {
                    fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
                }
                created.push(path.clone());
            }
        }
    }
    Ok(MountPoint { created })
}

/// Removes what [`mount_point`] created, deepest first, where still empty.
fn remove_mount_points(points: &[MountPoint]) {
    for p in points.iter().rev() {
        for c in p.created.iter().rev() {
            match fs::symlink_metadata(c) {
                Ok(m) if m.is_dir() => {
                    let _ = fs::remove_dir(c);
                }
                Ok(m) if m.is_file() && m.len() == 0 => {
                    let _ = fs::remove_file(c);
                }
                _ => {}
            }
        }
    }
}

/// What S mounts: (source, target inside the root, kind).
struct Mounts {
    store: Vec<(PathBuf, PathBuf, PointKind)>,
}

// ---------------------------------------------------------------------------------------------
// Messages from S (and T) to C: framed, each written with one write(2), so atomic.

const FRAME_OWNER: u8 = b'R';
const FRAME_ERROR: u8 = b'E';

fn send_frame(fd: RawFd, tag: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(4000)];
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(tag);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    // SAFETY: the pointer and length are those of `buf`, a live Vec, so the kernel reads only
    // memory we own. A bad `fd` makes write fail (EBADF), ignored: C then misses a frame.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
}

/// Reads frames until every writer has closed the pipe.
fn read_frames(fd: OwnedFd, owners: &mut Owners) -> Result<Option<String>> {
    let mut r = File::from(fd);
    let mut error = None;
    loop {
        let mut head = [0u8; 5];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(error),
            Err(e) => bail!("cannot read from the namespace's init process: {e}"),
        }
        let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).context("the namespace's init process sent a truncated message")?;
        match head[0] {
            FRAME_OWNER if len == 40 => {
                let word = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().unwrap());
                let half = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
                let birth = (half(36) != 0).then(|| (word(24), half(32)));
                owners.record(word(0), word(8), birth, half(16), half(20));
            }
            FRAME_ERROR => error = Some(String::from_utf8_lossy(&payload).into_owned()),
            _ => bail!("the namespace's init process sent a malformed message"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The chown supervisor (single mapping).

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;

#[cfg(target_arch = "x86_64")]
const ARCH: u32 = AUDIT_ARCH_X86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: u32 = AUDIT_ARCH_AARCH64;

#[cfg(target_arch = "x86_64")]
const CHOWN_CALLS: &[libc::c_long] = &[libc::SYS_chown, libc::SYS_lchown, libc::SYS_fchown, libc::SYS_fchownat];
#[cfg(target_arch = "aarch64")]
const CHOWN_CALLS: &[libc::c_long] = &[libc::SYS_fchown, libc::SYS_fchownat];

/// Installs a filter that hands every chown family call to a supervisor; returns the
/// listener fd.
fn install_chown_filter() -> io::Result<RawFd> {
    let _ = (AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64);
    let n = CHOWN_CALLS.len();
    let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter { code: 0x15, jt, jf, k };
    let mut prog = vec![
        stmt(0x20, 4), // ld arch
        jeq(ARCH, 0, (n + 1) as u8),
        stmt(0x20, 0), // ld nr
    ];
    for (i, &nr) in CHOWN_CALLS.iter().enumerate() {
        prog.push(jeq(nr as u32, (n - i) as u8, 0));
    }
    prog.push(stmt(0x06, libc::SECCOMP_RET_ALLOW));
    prog.push(stmt(0x06, libc::SECCOMP_RET_USER_NOTIF));
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: `fprog` points at `prog`, whose `len` filters it counts; both live on this stack
    // until the call returns, and the kernel copies the program. A negative result is checked;
    // otherwise it is a new descriptor that nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog as *const libc::sock_fprog) };
    if fd < 0 {
        return Err(errno());
    }
    Ok(fd as RawFd)
}

/// Reads a NUL-terminated string at `addr` in process `pid`.
fn read_remote_path(pid: u32, addr: u64) -> Result<Vec<u8>, i32> {
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|_| libc::ESRCH)?;
    let mut out = Vec::new();
    let mut at = addr;
    let mut buf = [0u8; 256];
    while out.len() < libc::PATH_MAX as usize {
        // Stay inside the page: the next one may be unmapped.
        let room = (4096 - (at % 4096)).min(buf.len() as u64) as usize;
        let n = std::os::unix::fs::FileExt::read_at(&mem, &mut buf[..room], at).map_err(|_| libc::EFAULT)?;
        if n == 0 {
            return Err(libc::EFAULT);
        }
        if let Some(z) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    Err(libc::ENAMETOOLONG)
}

enum Verdict {
    /// Let the kernel run the call (not our file system).
    Continue,
    /// Answer with this errno (0: success).
    Return(i32),
}

/// Handles one chown call: resolves its target as the caller would (S shares its root and
/// mount namespace), records the requested owner, and clears set-id bits as chown does.
fn handle_chown(listener: RawFd, req: &libc::seccomp_notif, root_dev: u64, frames: RawFd, pins: &mut Pins) -> Verdict {
    let pid = req.pid;
    let a = req.data.args;
    let nr = req.data.nr as libc::c_long;
    let path_of = |addr: u64| read_remote_path(pid, addr);
    // Where the caller's path starts: its cwd, one of its directory descriptors, or the root.
    enum Base {
        Root,
        Cwd,
        Fd(i32),
    }
    let base_of = |dirfd: i32| if dirfd == libc::AT_FDCWD { Base::Cwd } else { Base::Fd(dirfd) };
    // (start, path, follow the last symlink, uid, gid); an empty path means the start itself.
    let (base, path, follow, uid, gid) = match nr {
        n if n == libc::SYS_fchown => (Base::Fd(a[0] as i32), Vec::new(), true, a[1] as u32, a[2] as u32),
        n if n == libc::SYS_fchownat => {
            let flags = a[4] as i32;
            let p = match path_of(a[1]) {
                Ok(p) => p,
                Err(e) => return Verdict::Return(e),
            };
            if p.is_empty() && flags & libc::AT_EMPTY_PATH == 0 {
                return Verdict::Return(libc::ENOENT);
            }
            (base_of(a[0] as i32), p, flags & libc::AT_SYMLINK_NOFOLLOW == 0, a[2] as u32, a[3] as u32)
        }
        _ => {
            #[cfg(target_arch = "x86_64")]
            {
                let p = match path_of(a[0]) {
                    Ok(p) => p,
                    Err(e) => return Verdict::Return(e),
                };
                if p.is_empty() {
                    return Verdict::Return(libc::ENOENT);
                }
                (Base::Cwd, p, nr == libc::SYS_chown, a[1] as u32, a[2] as u32)
            }
            #[cfg(not(target_arch = "x86_64"))]
            return Verdict::Continue;
        }
    };
    // The memory we read belonged to the caller only if the call is still pending.
    // SAFETY: NOTIF_ID_VALID reads one u64, and `&req.id` is one, borrowed for the call. A stale
    // or bad `listener` only makes the ioctl fail.
    if unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _, &req.id) } != 0 {
        return Verdict::Return(libc::ESRCH);
    }
    // We share the caller's root and mounts, but "/proc/self" would be us: name the caller.
    let (base, path) = match [&b"/proc/self/"[..], b"/proc/thread-self/"].iter().find(|p| path.starts_with(p)) {
        Some(prefix) => (Base::Root, [format!("/proc/{pid}/").as_bytes(), &path[prefix.len()..]].concat()),
        None => (base, path),
    };
    let start = match base {
        _ if path.starts_with(b"/") => None,
        Base::Root => None,
        Base::Cwd => Some(format!("/proc/{pid}/cwd")),
        Base::Fd(fd) => Some(format!("/proc/{pid}/fd/{fd}")),
    };
    let opened = (|| -> Result<OwnedFd, i32> {
        let open_plain = |p: &str, extra: i32| -> Result<OwnedFd, i32> {
            let c = CString::new(p).map_err(|_| libc::EINVAL)?;
            // SAFETY: `c` is a NUL-terminated CString that outlives the call.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
            if fd < 0 {
                return Err(errno().raw_os_error().unwrap_or(libc::EIO));
            }
            // SAFETY: `fd` (not negative) was just returned by open(2); nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        if path.is_empty() {
            // fchown(fd) or AT_EMPTY_PATH: the descriptor (a magic link we mean to follow).
            return open_plain(start.as_deref().unwrap_or("/"), 0);
        }
        if path.starts_with(format!("/proc/{pid}/").as_bytes()) {
            return open_plain(&String::from_utf8_lossy(&path), if follow { 0 } else { libc::O_NOFOLLOW });
        }
        let dir = match &start {
            Some(s) => Some(open_plain(s, libc::O_DIRECTORY)?),
            None => None,
        };
        // The caller's own path must not go through magic links: they would resolve as us.
        // SAFETY: open_how is three u64s, for which all zero bytes is a valid value (and the one
        // openat2 requires for what we do not set).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_CLOEXEC | if follow { 0 } else { libc::O_NOFOLLOW }) as u64;
        how.resolve = libc::RESOLVE_NO_MAGICLINKS;
        let c = CString::new(path.clone()).map_err(|_| libc::EINVAL)?;
        let dirfd = dir.as_ref().map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
        // SAFETY: `c` is NUL-terminated and `how` is a live open_how whose size is the one passed;
        // both outlive the call. `dirfd` is AT_FDCWD or the descriptor of `dir`, alive until the
        // closure returns.
        let fd = unsafe { libc::syscall(libc::SYS_openat2, dirfd, c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>()) };
        if fd < 0 {
            return Err(errno().raw_os_error().unwrap_or(libc::EIO));
        }
        // SAFETY: `fd` (not negative) was just returned by openat2; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    })();
    let fd = match opened {
        Ok(fd) => fd,
        // Through a magic link, or openat2 missing (before Linux 5.6): let the kernel run the
        // call as the caller, which gives the true answer (EINVAL for an unmapped id).
        Err(libc::ELOOP | libc::EXDEV | libc::ENOSYS) => return Verdict::Continue,
        Err(e) => return Verdict::Return(e),
    };
    // SAFETY: stat is a C struct of integers, for which all zero bytes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: so is statvfs.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an OwnedFd alive for both calls, and each writes one struct of the type
    // it is given into a live local of that type.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 || unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut vfs) } != 0 {
        return Verdict::Return(libc::EIO);
    }
    if st.st_dev != root_dev {
        return Verdict::Continue;
    }
    if vfs.f_flag & libc::ST_RDONLY != 0 {
        return Verdict::Return(libc::EROFS);
    }
    // SAFETY: statx too is a C struct of integers, for which all zero bytes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a NUL-terminated static string (with AT_EMPTY_PATH: `fd` itself, an
    // OwnedFd alive for the call), and statx writes one statx into `stx`, a live local.
    let has_birth = unsafe { libc::statx(fd.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_BTIME, &mut stx) } == 0 && stx.stx_mask & libc::STATX_BTIME != 0;
    let mut rec = Vec::with_capacity(40);
    rec.extend_from_slice(&st.st_dev.to_le_bytes());
    rec.extend_from_slice(&st.st_ino.to_le_bytes());
    rec.extend_from_slice(&uid.to_le_bytes());
    rec.extend_from_slice(&gid.to_le_bytes());
    rec.extend_from_slice(&(stx.stx_btime.tv_sec as u64).to_le_bytes());
    rec.extend_from_slice(&stx.stx_btime.tv_nsec.to_le_bytes());
    rec.extend_from_slice(&(has_birth as u32).to_le_bytes());
    send_frame(frames, FRAME_OWNER, &rec);
    let mode = st.st_mode & 0o7777;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && (uid != u32::MAX || gid != u32::MAX) {
        let mut new = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            new &= !libc::S_ISGID;
        }
        if new != mode {
            if let Ok(p) = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
                // SAFETY: `p` is a NUL-terminated CString that outlives the call. A failure
                // is ignored: the owner is recorded all the same.
                unsafe { libc::chmod(p.as_ptr(), new) };
            }
        }
    }
    pins.keep(fd);
    Verdict::Return(0)
}

/// Descriptors of the inodes whose owner we recorded, held while the script runs so that a
/// deleted one's number cannot go to a new file (and its owner with it), up to a budget.
struct Pins {
    fds: Vec<OwnedFd>,
    budget: usize,
}

impl Pins {
    fn new() -> Pins {
        // Raise the soft limit on open files to the hard one, keeping room for everything else.
        // SAFETY: rlimit is two integers: all zero is valid, and getrlimit overwrites it.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        let mut budget = 0;
        // SAFETY: getrlimit and setrlimit read or write one rlimit, `lim`, live for each call. If
        // setrlimit fails the limit stays, and the second getrlimit reads the one that holds.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            // SAFETY: as above, `lim` is live for the call.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
            // SAFETY: as above.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
            budget = (lim.rlim_cur as usize).saturating_sub(256);
        }
        Pins { fds: Vec::new(), budget }
    }

    fn keep(&mut self, fd: OwnedFd) {
        if self.fds.len() < self.budget {
            self.fds.push(fd);
        }
    }
}

fn serve_one(listener: RawFd, root_dev: u64, frames: RawFd, pins: &mut Pins) {
    // SAFETY: seccomp_notif and seccomp_notif_resp are C structs of integers: all zero bytes is
    // a valid value, and the one NOTIF_RECV requires of the struct it fills.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: NOTIF_RECV writes one seccomp_notif into `req`, a live local of that type.
    if unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut req) } != 0 {
        return; // the caller died meanwhile
    }
    // SAFETY: as for `req` above.
    let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
    resp.id = req.id;
    match handle_chown(listener, &req, root_dev, frames, pins) {
        Verdict::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        Verdict::Return(0) => {}
        Verdict::Return(e) => resp.error = -e,
    }
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp, `resp`, borrowed for the call. A failure
    // (the caller died meanwhile) is ignored: there is no one left to answer.
    unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND as _, &resp) };
}

// ---------------------------------------------------------------------------------------------
// S: pid 1 of the namespace.

struct ScriptSpec {
    shell: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    script_fd: RawFd,
}

fn bind_read_only(src: &Path, target: &Path) -> Result<()> {
    mount(Some(src), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| anyhow!("cannot bind-mount {} into the root: {e}", src.display()))?;
    // A remount may not drop flags the source mount has locked (nosuid, nodev, ...).
    let vfs = nix::sys::statvfs::statvfs(target).map_err(|e| anyhow!("cannot statvfs {}: {e}", target.display()))?;
    let f = vfs.flags();
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (from, to) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(from) {
            flags |= to;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| anyhow!("cannot make {} read-only: {e}", target.display()))
}

fn setup_dev(dev: &Path) -> Result<()> {
    mount(Some("tmpfs"), dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("mode=755,size=65536k"))
        .map_err(|e| anyhow!("cannot mount a tmpfs on /dev: {e}"))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        File::create(&target).with_context(|| format!("cannot create {}", target.display()))?;
        let src = Path::new("/dev").join(name);
        if let Err(e) = mount(Some(&src), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>) {
            if name != "tty" {
                bail!("cannot bind-mount {}: {e}", src.display());
            }
            let _ = fs::remove_file(&target);
        }
    }
    for (name, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")] {
        std::os::unix::fs::symlink(target, dev.join(name)).with_context(|| format!("cannot create /dev/{name}"))?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm)?;
    fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777))?;
    let _ = mount(Some("shm"), &shm, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777,size=65536k"));
    let pts = dev.join("pts");
    fs::create_dir(&pts)?;
    let _ = mount(Some("devpts"), &pts, Some("devpts"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620"));
    Ok(())
}

fn loopback_up() {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut req = IfReq { name: [0; 16], flags: 0, pad: [0; 22] };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: socket returns a new descriptor or -1 (checked), which only this block uses and
    // closes once. SIOCGIFFLAGS and SIOCSIFFLAGS read and write a struct ifreq: IfReq has its
    // layout (repr(C): a 16-byte name, the flags as a short at offset 16, 40 bytes in all) and
    // is a live local for both calls. Failures leave lo down, which scripts rarely need.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req) == 0 {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS as _, &req);
        }
        libc::close(s);
    }
}

/// S: mounts, pivots into the root, runs T and supervises it. Returns T's exit code (or
/// 128 + signal).
fn init_main(root: &Path, mounts: &Mounts, spec: &ScriptSpec, single: bool, frames: RawFd) -> Result<i32> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // A mount namespace of our own: pivot_root moves every process sharing it, C included.
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| anyhow!("cannot create a mount namespace: {e}"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| anyhow!("cannot make mounts private: {e}"))?;
    mount(Some(root), root, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(|e| anyhow!("cannot bind-mount the root: {e}"))?;
    for (src, rel, _) in &mounts.store {
        bind_read_only(src, &root.join(rel.strip_prefix("/").unwrap_or(rel)))?;
    }
    let proc_dir = root.join("proc");
    if mount(Some("proc"), &proc_dir, Some("proc"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None::<&str>).is_err() {
        // Some kernels refuse a fresh proc where parts of /proc are masked: use the outer one.
        mount(Some("/proc"), &proc_dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(|e| anyhow!("cannot mount /proc: {e}"))?;
    }
    setup_dev(&root.join("dev"))?;
    // /sys read-only, as container runtimes give it: a sysfs of our network namespace, or
    // the outer one bound. Scripts rarely need it, so failing to mount it is not an error.
    let sys_dir = root.join("sys");
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mount(Some("sysfs"), &sys_dir, Some("sysfs"), ro, None::<&str>).is_err() && bind_read_only(Path::new("/sys"), &sys_dir).is_err() {
        eprintln!("stevedore: note: /sys could not be mounted; the script runs without it");
    }
    loopback_up();
    let _ = nix::unistd::sethostname("localhost");
    nix::unistd::chdir(root)?;
    nix::unistd::pivot_root(".", ".").map_err(|e| anyhow!("pivot_root failed: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| anyhow!("cannot detach the old root: {e}"))?;
    nix::unistd::chdir("/")?;
    let root_dev = fs::metadata("/")?.dev();

    let (sock_s, sock_t) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )?;
    // SAFETY: S runs no other thread (it is a fresh child of C, which runs none), so the child
    // cannot inherit a lock another thread held; it ends in execve or _exit, never returning.
    let child = match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
        ForkResult::Child => {
            drop(sock_s);
            let e = exec_script(spec, single, sock_t.as_raw_fd());
            send_frame(frames, FRAME_ERROR, e.as_bytes());
            // SAFETY: _exit has no preconditions; it skips the destructors and atexit
            // handlers that belong to S.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(sock_t);
    let listener = if single { Some(recv_fd(sock_s.as_raw_fd()).context("the script process did not send its seccomp listener")?) } else { None };
    supervise(child, listener, root_dev, frames)
}

fn recv_fd(sock: RawFd) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed `fd` in our table for this SCM_RIGHTS message
                // just now (with MSG_CMSG_CLOEXEC); nothing else refers to it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("no file descriptor received")
}

/// T: drops into the script. Returns only on failure, with the message to report.
fn exec_script(spec: &ScriptSpec, single: bool, sock: RawFd) -> String {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    // SAFETY: T runs no other thread, so resetting its signals and descriptors disturbs no
    // one. rt_sigaction reads a kernel sigaction from `default`: 32 zero bytes, at least its
    // size (handler, flags, restorer, an 8-byte mask, the sigsetsize passed) on x86_64 and
    // aarch64, and the old action is not asked for (null). `none` is a live sigset_t that
    // sigemptyset initialises before sigprocmask reads it. dup2 and fcntl take integers;
    // fd 1 is replaced under no Rust object of T (T writes to it through nothing but the
    // script it execs), and `script_fd` is P's open descriptor of the script, inherited.
    unsafe {
        // Signals the caller ignores (Rust ignores SIGPIPE, so `yes | head` would not end;
        // a background job ignores SIGINT) must not reach the script: all back to default.
        // The raw call, since glibc's wrappers refuse its own signals 32 and 33; an all-zero
        // kernel sigaction is SIG_DFL with no flags and an empty mask on every architecture.
        let default = [0u64; 4];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), std::ptr::null_mut::<u64>(), 8usize);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // The script's output is progress, not product: stdout goes to stderr.
        libc::dup2(2, 1);
        let flags = libc::fcntl(spec.script_fd, libc::F_GETFD);
        libc::fcntl(spec.script_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
    }
    if single {
        match install_chown_filter() {
            Ok(listener) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
                let fds = [listener];
                let iov = [io::IoSlice::new(b"L")];
                if let Err(e) = sendmsg::<()>(sock, &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None) {
                    return format!("cannot hand the seccomp listener over: {e}");
                }
                // SAFETY: `listener` is the descriptor install_chown_filter returned, owned by
                // nothing else; S has its own copy now, and it is closed once, here.
                unsafe { libc::close(listener) };
            }
            Err(e) => return format!("cannot install the seccomp filter that records chown: {e}"),
        }
    }
    let e = nix::unistd::execve(&spec.shell, &spec.argv, &spec.env).unwrap_err();
    format!("cannot run the shell {} inside the image: {e} (it must be in the image, a --layer or a --store-path)", spec.shell.to_string_lossy())
}

fn supervise(child: Pid, listener: Option<OwnedFd>, root_dev: u64, frames: RawFd) -> Result<i32> {
    let mut listener = listener;
    let mut pins = Pins::new();
    loop {
        match &listener {
            Some(l) => {
                let mut fds = [nix::poll::PollFd::new(l.as_fd(), nix::poll::PollFlags::POLLIN)];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                    Ok(n) if n > 0 => {
                        let ev = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
                        if ev.contains(nix::poll::PollFlags::POLLIN) {
                            serve_one(l.as_raw_fd(), root_dev, frames, &mut pins);
                        } else if ev.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR) {
                            // Every filtered process is gone.
                            listener = None;
                        }
                    }
                    _ => {}
                }
                // Reap without blocking: orphans are ours too, as pid 1.
                loop {
                    match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code),
                        Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return Ok(128 + sig as i32),
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(_) => continue,
                    }
                }
            }
            None => match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return Ok(128 + sig as i32),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("waiting for the script failed: {e}"),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// C: the namespace's root.

/// What C needs, prepared by P before forking.
struct Job<'a> {
    args: &'a RunAsRoot,
    tree: &'a Tree,
    blobs: &'a [LayerBlob],
    scratch: &'a Path,
    mounts: Mounts,
    spec: ScriptSpec,
    /// `--extra-commands`, absolute (it runs from the root filesystem).
    extra_commands: Option<PathBuf>,
    mtime: i64,
}

/// Runs the script through S; returns its exit code.
fn run_script(job: &Job, root: &Path, single: bool, owners: &mut Owners) -> Result<i32> {
    let (frames_r, frames_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: C runs no other thread (a fork copies only the calling thread, and C starts
    // none), so the child cannot inherit a lock another thread held; it ends in
    // exit_reporting (_exit).
    match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
        ForkResult::Child => {
            drop(frames_r);
            // A pid namespace per run, entered here rather than by C: once its pid 1 exits,
            // nothing can be forked into it again, and C still has commands to run.
            let fw = frames_w.as_raw_fd();
            let init = || -> Result<i32> {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                unshare(CloneFlags::CLONE_NEWPID).map_err(|e| anyhow!("cannot create a pid namespace: {e}"))?;
                // SAFETY: this intermediate process runs no other thread either; the child,
                // S, ends in exit_reporting (_exit).
                match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
                    ForkResult::Child => exit_reporting(fw, || init_main(root, &job.mounts, &job.spec, single, fw)),
                    ForkResult::Parent { child } => loop {
                        match waitpid(child, None) {
                            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                            Err(e) => bail!("waiting for the namespace's init failed: {e}"),
                        }
                    },
                }
            };
            exit_reporting(fw, init)
        }
        ForkResult::Parent { child } => {
            drop(frames_w);
            let error = read_frames(frames_r, owners)?;
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other.map_err(|e| anyhow!("waiting for the namespace's init failed: {e}"))?,
                }
            };
            if let Some(e) = error {
                bail!("{e}");
            }
            match status {
                WaitStatus::Exited(_, code) => Ok(code),
                WaitStatus::Signaled(_, sig, _) => Ok(128 + sig as i32),
                other => bail!("the namespace's init ended oddly: {other:?}"),
            }
        }
    }
}

/// Everything C does as root in the namespace; returns the layer's digest.
fn in_namespace(job: &Job, root: &Path, single: bool) -> Result<(String, LayerCounts)> {
    let quiet = job.args.quiet;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| anyhow!("cannot make mounts private: {e}"))?;
    let mut owners = Owners { single, fake: HashMap::new() };
    fs::create_dir(root).with_context(|| format!("cannot create {}", root.display()))?;
    say(quiet, format!("Laying out the root filesystem ({} paths)...", job.tree.nodes.len()));
    materialize(job.tree, job.blobs, root, &mut owners)?;
    let (_, lower) = scan(root, &owners)?;
    wait_for_clock(job.scratch, &lower)?;
    for dir in &job.args.layers {
        say(quiet, format!("Adding {}...", dir.display()));
        let dirlinks = if job.args.keep_dirlinks { Dirlinks::Keep } else { Dirlinks::Copy };
        rootfs::copy_to_root(dir, root, dirlinks, &mut |p| owners.set(p, 0, 0))?;
    }
    // /tmp stays, as with nixpkgs (its VM makes it too); the mount points go afterwards.
    if fs::symlink_metadata(root.join("tmp")).is_err() {
        fs::create_dir(root.join("tmp"))?;
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    }
    let mut points = Vec::new();
    let made = (|| -> Result<()> {
        points.push(mount_point(root, Path::new("proc"), PointKind::Dir)?);
        points.push(mount_point(root, Path::new("dev"), PointKind::Dir)?);
        points.push(mount_point(root, Path::new("sys"), PointKind::Dir)?);
        for (_, rel, kind) in &job.mounts.store {
            points.push(mount_point(root, rel, *kind)?);
        }
        Ok(())
    })();
    let status = made.and_then(|()| {
        say(quiet, format!("Running {} as root...", job.args.script.display()));
        run_script(job, root, single, &mut owners)
    });
    remove_mount_points(&points);
    let status = status?;
    if status != 0 {
        if status > 128 {
            bail!("the script {} was killed by signal {}", job.args.script.display(), status - 128);
        }
        bail!("the script {} failed with exit code {status}", job.args.script.display());
    }
    if let Some(extra) = &job.extra_commands {
        say(quiet, format!("Running {}...", extra.display()));
        let stderr = io::stderr().as_fd().try_clone_to_owned().context("cannot duplicate stderr")?;
        let status = std::process::Command::new(&job.args.extra_commands_shell)
            .arg(extra)
            .current_dir(root)
            .stdout(stderr)
            .status()
            .with_context(|| format!("cannot run {}", job.args.extra_commands_shell.display()))?;
        if !status.success() {
            bail!("the extra commands {} failed ({status})", extra.display());
        }
    }
    let (_, upper) = scan(root, &owners)?;
    let changes = diff(&lower, &upper);
    let (digest, counts) = write_changes(root, &changes, &owners, &job.args.out_layer, job.mtime)?;
    Ok((hex(&digest), counts))
}

/// Removes a tree whatever its modes (we are root in the namespace that owns it).
fn remove_tree(root: &Path) {
    if fs::symlink_metadata(root).is_ok() {
        if let Err(e) = fs::remove_dir_all(root) {
            eprintln!("stevedore: warning: cannot remove {}: {e}", root.display());
        }
    }
}

/// C's whole life: enter the namespaces, wait for the maps, work, report one line.
fn child_main(job: &Job, ready: OwnedFd, go: OwnedFd, result: OwnedFd) -> i32 {
    let root = job.scratch.join("rootfs");
    let outcome = (|| -> Result<(String, LayerCounts)> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        let flags = CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS;
        unshare(flags).map_err(|e| anyhow!("cannot create a user namespace: {e}{}", userns_hint()))?;
        // Modes of what the script creates must not depend on the caller (nixpkgs' VM: 022).
        // SAFETY: umask takes an integer and only sets this process's file mode mask.
        unsafe { libc::umask(0o022) };
        nix::unistd::write(&ready, b"u")?;
        drop(ready);
        let mut mode = [0u8; 1];
        let n = nix::unistd::read(&go, &mut mode)?;
        if n != 1 {
            bail!("the id mapping could not be set up");
        }
        let single = mode[0] == b's';
        let zero_u = nix::unistd::Uid::from_raw(0);
        let zero_g = nix::unistd::Gid::from_raw(0);
        nix::unistd::setresgid(zero_g, zero_g, zero_g).map_err(|e| anyhow!("cannot become gid 0 in the namespace: {e}"))?;
        if !single {
            nix::unistd::setgroups(&[]).map_err(|e| anyhow!("cannot drop supplementary groups: {e}"))?;
        }
        nix::unistd::setresuid(zero_u, zero_u, zero_u).map_err(|e| anyhow!("cannot become uid 0 in the namespace: {e}"))?;
        let r = in_namespace(job, &root, single);
        remove_tree(&root);
        r
    })();
    let (line, code) = match outcome {
        Ok((digest, c)) => (format!("ok {digest} {} {} {}", c.entries, c.whiteouts, c.opaques), 0),
        Err(e) => (format!("err {}", format!("{e:#}").replace('\n', " ")), 1),
    };
    let _ = nix::unistd::write(&result, line.as_bytes());
    code
}

fn userns_hint() -> String {
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let clone = fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone").unwrap_or_default();
    let apparmor = fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").unwrap_or_default();
    if max.trim() == "0" {
        " (user.max_user_namespaces is 0)".into()
    } else if clone.trim() == "0" {
        " (kernel.unprivileged_userns_clone is 0)".into()
    } else if apparmor.trim() == "1" {
        " (kernel.apparmor_restrict_unprivileged_userns is 1)".into()
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------
// P: id maps, from outside.

#[derive(Debug, Clone)]
enum MapPlan {
    /// As root: every id we have, mapped to itself.
    Identity { uid_map: String, gid_map: String },
    /// newuidmap/newgidmap: our ids to 0, a subordinate range to 1..
    Helper { uid: u32, gid: u32, subuid: (u64, u64), subgid: (u64, u64) },
    /// Our uid and gid to 0.
    Single { uid: u32, gid: u32 },
}

impl MapPlan {
    fn describe(&self) -> String {
        match self {
            MapPlan::Identity { .. } => "every id mapped to itself (we are root)".into(),
            MapPlan::Helper { subuid, .. } => format!("root is us, ids 1-{} are subordinate ids from /etc/subuid (newuidmap)", subuid.1),
            MapPlan::Single { uid, .. } => format!("only uid {uid} (as root); other owners are recorded"),
        }
    }
}

/// Whether the ranges of one of our id maps hold every id from 0 to 65535 (what images use).
fn covers_usual_ids(map: &str) -> bool {
    let mut ranges: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (f.len() == 3).then(|| (f[0], f[0] + f[2]))
        })
        .collect();
    ranges.sort();
    let mut next = 0;
    for (start, end) in ranges {
        if start > next {
            break;
        }
        next = next.max(end);
    }
    next >= 65536
}

fn identity_map(file: &str) -> Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?;
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| format!("{} {} {}", f[0], f[0], f[2]))
        })
        .collect();
    Ok(lines.join("\n") + "\n")
}

fn subid_range(file: &str, name: Option<&str>, id: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        if f.len() != 3 || !(Some(f[0]) == name || f[0] == id.to_string()) {
            return None;
        }
        let (start, count) = (f[1].parse().ok()?, f[2].parse::<u64>().ok()?);
        (count > 0).then_some((start, count))
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn plans(mode: IdMapping) -> Result<Vec<MapPlan>> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let mut full = Vec::new();
    // Root of a namespace with few ids (`unshare -r`, a rootless container) is no better off
    // than an unprivileged user.
    let ours = |f: &str| fs::read_to_string(f).unwrap_or_default();
    if uid == 0 && covers_usual_ids(&ours("/proc/self/uid_map")) && covers_usual_ids(&ours("/proc/self/gid_map")) {
        full.push(MapPlan::Identity { uid_map: identity_map("/proc/self/uid_map")?, gid_map: identity_map("/proc/self/gid_map")? });
    } else if uid != 0 && on_path("newuidmap") && on_path("newgidmap") {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
        let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).ok().flatten().map(|g| g.name);
        let sub_u = subid_range("/etc/subuid", user.as_deref(), uid);
        let sub_g = subid_range("/etc/subgid", user.as_deref().or(group.as_deref()), uid);
        if let (Some(subuid), Some(subgid)) = (sub_u, sub_g) {
            full.push(MapPlan::Helper { uid, gid, subuid, subgid });
        }
    }
    Ok(match mode {
        IdMapping::Single => vec![MapPlan::Single { uid, gid }],
        IdMapping::Full if full.is_empty() => {
            bail!("--id-mapping full: not root, and no newuidmap/newgidmap with /etc/subuid and /etc/subgid ranges for uid {uid}")
        }
        IdMapping::Full => full,
        IdMapping::Auto => {
            full.push(MapPlan::Single { uid, gid });
            full
        }
    })
}

fn write_proc(pid: Pid, file: &str, content: &str) -> io::Result<()> {
    // One write(2): the kernel takes a map in a single write only.
    let mut f = OpenOptions::new().write(true).open(format!("/proc/{pid}/{file}"))?;
    f.write_all(content.as_bytes())
}

/// Applies one plan to C's namespace; `Err` if it did not take (nothing was written then).
fn apply_plan(pid: Pid, plan: &MapPlan) -> Result<()> {
    match plan {
        MapPlan::Identity { uid_map, gid_map } => {
            write_proc(pid, "uid_map", uid_map).context("uid_map")?;
            write_proc(pid, "gid_map", gid_map).context("gid_map (uid_map was written)")
        }
        MapPlan::Helper { uid, gid, subuid, subgid } => {
            let run = |tool: &str, id: u32, sub: (u64, u64)| -> Result<()> {
                let out = std::process::Command::new(tool)
                    .args([pid.to_string(), "0".into(), id.to_string(), "1".into(), "1".into(), sub.0.to_string(), sub.1.to_string()])
                    .output()
                    .with_context(|| format!("cannot run {tool}"))?;
                if !out.status.success() {
                    bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                Ok(())
            };
            run("newuidmap", *uid, *subuid)?;
            run("newgidmap", *gid, *subgid).context("newgidmap (newuidmap had worked)")
        }
        MapPlan::Single { uid, gid } => {
            write_proc(pid, "uid_map", &format!("0 {uid} 1\n")).context("uid_map")?;
            write_proc(pid, "setgroups", "deny").context("setgroups")?;
            write_proc(pid, "gid_map", &format!("0 {gid} 1\n")).context("gid_map (uid_map was written)")
        }
    }
}

/// Forks C, maps its ids, and waits for its one-line report.
fn run_in_namespaces(job: &Job, plans: &[MapPlan]) -> Result<(String, LayerCounts)> {
    use nix::fcntl::OFlag;
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (res_r, res_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: P's only other thread is the signal-cleanup thread (src/util/files.rs), waiting in
    // sigwait and holding no lock (it takes the temp-file registry only to clean up, and then
    // ends the process); run-as-root starts no other, and the threads other steps use
    // (compression, layer writing) are joined before they return. So the child cannot inherit
    // a lock another thread held (glibc's fork resets malloc's own). It ends in _exit (panics
    // caught).
    let child = match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
        ForkResult::Child => {
            drop((ready_r, go_w, res_r));
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child_main(job, ready_w, go_r, res_w))).unwrap_or(101);
            // SAFETY: _exit has no preconditions; it keeps the child from running P's
            // destructors and atexit handlers (which would remove P's scratch directory).
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    // On a signal, C is killed before its scratch is removed, and what it was writing swept.
    let _reap = crate::util::files::ChildGuard::new(child.as_raw(), &[&job.args.out_layer]);
    drop((ready_w, go_r, res_w));
    let mut byte = [0u8; 1];
    let unshared = nix::unistd::read(&ready_r, &mut byte).unwrap_or(0) == 1;
    let mut mapping_error = None;
    if unshared {
        let mut chosen = None;
        let mut errors = Vec::new();
        for plan in plans {
            match apply_plan(child, plan) {
                Ok(()) => {
                    chosen = Some(plan);
                    break;
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        match chosen {
            Some(plan) => {
                say(job.args.quiet, format!("User namespace: {}", plan.describe()));
                let mode = if matches!(plan, MapPlan::Single { .. }) { b"s" } else { b"f" };
                let _ = nix::unistd::write(&go_w, mode);
            }
            None => mapping_error = Some(format!("cannot map ids into the user namespace: {}", errors.join("; "))),
        }
    }
    drop(go_w);
    let mut report = String::new();
    File::from(res_r).read_to_string(&mut report).context("cannot read the namespace's report")?;
    let status = waitpid(child, None).map_err(|e| anyhow!("waiting for the namespace failed: {e}"))?;
    if let Some(e) = mapping_error {
        bail!(e);
    }
    if let Some(msg) = report.strip_prefix("err ") {
        bail!("{msg}");
    }
    let fields: Vec<&str> = report.strip_prefix("ok ").map(|r| r.split(' ').collect()).unwrap_or_default();
    if fields.len() != 4 {
        bail!("the namespace's process ended without a report ({status:?})");
    }
    let num = |s: &str| s.parse::<u64>().unwrap_or(0);
    Ok((fields[0].to_string(), LayerCounts { entries: num(fields[1]), whiteouts: num(fields[2]), opaques: num(fields[3]) }))
}

/// `stevedore run-as-root`.
pub fn run(args: &RunAsRoot) -> Result<()> {
    let started = std::time::Instant::now();
    let mtime = match args.mtime {
        Some(m) => m,
        None => flatten::default_mtime()?,
    };
    let script = File::open(&args.script).with_context(|| format!("cannot open the script {}", args.script.display()))?;
    let extra_commands = match &args.extra_commands {
        Some(extra) => Some(fs::canonicalize(extra).with_context(|| format!("cannot open the extra commands {}", extra.display()))?),
        None => None,
    };
    for out in std::iter::once(&args.out_layer).chain(&args.out_checksum) {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !fs::metadata(parent).map(|m| m.is_dir()).unwrap_or(false) {
            bail!("cannot write {}: {} is not a directory", out.display(), parent.display());
        }
    }
    for dir in &args.layers {
        if !fs::metadata(dir).with_context(|| format!("cannot read --layer {}", dir.display()))?.is_dir() {
            bail!("--layer {} is not a directory", dir.display());
        }
    }
    let mut env: Vec<CString> = Vec::new();
    for e in &args.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("--env {e:?}: expected NAME=VALUE");
        }
        env.push(CString::new(e.as_bytes()).map_err(|_| anyhow!("--env {e:?} has a NUL byte"))?);
    }
    if !args.env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(CString::new("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").unwrap());
    }
    if !args.shell.starts_with('/') {
        bail!("--shell {}: must be an absolute path inside the root", args.shell);
    }

    // What to mount: the store directory, or each store path (where it is, read-only).
    let mut store = Vec::new();
    let abs = |p: &Path| -> Result<PathBuf> {
        if !p.is_absolute() {
            bail!("{} is not an absolute path", p.display());
        }
        Ok(p.to_owned())
    };
    if let Some(dir) = &args.store_dir {
        let dir = abs(dir)?;
        if !fs::metadata(&dir).with_context(|| format!("cannot read --store-dir {}", dir.display()))?.is_dir() {
            bail!("--store-dir {} is not a directory", dir.display());
        }
        store.push((dir.clone(), dir, PointKind::Dir));
    }
    for p in &args.store_paths {
        let p = abs(p)?;
        if args.store_dir.as_ref().is_some_and(|d| p.starts_with(d)) {
            continue;
        }
        let meta = fs::metadata(&p).with_context(|| format!("cannot read --store-path {}", p.display()))?;
        store.push((p.clone(), p, if meta.is_dir() { PointKind::Dir } else { PointKind::File }));
    }
    store.sort_by(|a, b| a.1.cmp(&b.1));
    store.dedup_by(|a, b| a.1 == b.1);

    // The script is read through its descriptor unless it is visible inside the root.
    let script_abs = fs::canonicalize(&args.script).unwrap_or_else(|_| args.script.clone());
    let visible = store.iter().any(|(src, _, _)| script_abs.starts_with(src));
    let script_arg = if visible { script_abs.into_os_string().into_vec() } else { format!("/proc/self/fd/{}", script.as_raw_fd()).into_bytes() };
    let shell = CString::new(args.shell.as_bytes()).map_err(|_| anyhow!("--shell has a NUL byte"))?;
    let argv = vec![shell.clone(), CString::new(script_arg).map_err(|_| anyhow!("the script path has a NUL byte"))?];

    let plans = plans(args.id_mapping)?;
    let scratch_parent = flatten::scratch_dir(args.scratch.as_deref());
    let scratch = crate::image::oci::TempDir::new_in(&scratch_parent)?;
    let (tree, image) = match &args.from_image {
        Some(image) => {
            let sel = Selector { name: args.from_image_name.clone(), tag: args.from_image_tag.clone() };
            let opened = flatten::open_image(image, &sel, &scratch.0, args.quiet)?;
            say(args.quiet, format!("Reading {} layers of {}...", opened.layers.len(), image.display()));
            (Tree::from_layers(&opened.layers)?, Some(opened))
        }
        None => (Tree::new(), None),
    };
    let blobs: &[LayerBlob] = image.as_ref().map_or(&[], |i| &i.layers);
    let job = Job {
        args,
        tree: &tree,
        blobs,
        scratch: &scratch.0,
        mounts: Mounts { store },
        spec: ScriptSpec { shell, argv, env, script_fd: script.as_raw_fd() },
        extra_commands,
        mtime,
    };
    let (digest, counts) = run_in_namespaces(&job, &plans)?;
    if let Some(path) = &args.out_checksum {
        crate::util::files::write_file_atomically(path, format!("{digest}\n").as_bytes())?;
    }
    say(
        args.quiet,
        format!(
            "Wrote {}: {} entries, {} whiteouts, {} opaque directories, sha256 {digest} ({:.2} s)",
            args.out_layer.display(),
            counts.entries,
            counts.whiteouts,
            counts.opaques,
            started.elapsed().as_secs_f64()
        ),
    );
    let mut out = io::stdout().lock();
    writeln!(out, "{digest}").context("cannot write to stdout")?;
    drop(script);
    Ok(())
}

/// Runs `f` in a forked child and exits with its code; an error goes to the parent as an error
/// frame on `fw` (a panic or error exits 125, as container runtimes do for their own failures).
fn exit_reporting(fw: RawFd, f: impl FnOnce() -> Result<i32>) -> ! {
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            send_frame(fw, FRAME_ERROR, format!("{e:#}").as_bytes());
            125
        }
        Err(_) => 125,
    };
    // SAFETY: _exit has no preconditions; a forked child must end without running the
    // destructors and atexit handlers of the process it was forked from.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::flatten::key_of;

    fn st(ino: u64, dir: bool, ctime: i64) -> Stat {
        Stat { ino, mode: if dir { libc::S_IFDIR | 0o755 } else { libc::S_IFREG | 0o644 }, uid: 0, gid: 0, ctime: (ctime, 0), birth: None }
    }

    fn k(p: &str) -> Vec<u8> {
        let parts: Vec<&[u8]> = p.split('/').map(str::as_bytes).collect();
        key_of(&parts)
    }

    fn show(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                let (tag, key) = match c {
                    Change::Entry(k) => ("+", k),
                    Change::Whiteout(k) => ("-", k),
                    Change::Opaque(k) => ("opaque ", k),
                };
                format!("{tag}{}", String::from_utf8_lossy(&member_name(key, false)[2..]))
            })
            .collect()
    }

    #[test]
    fn diff_whiteouts_opaque_dirs_and_parents() {
        let mut lower = BTreeMap::new();
        for (p, ino, dir) in [
            ("etc", 1, true),
            ("etc/passwd", 2, false),
            ("etc/group", 3, false),
            ("gone", 4, true),
            ("gone/a", 5, false),
            ("gone/b", 6, true),
            ("gone/b/c", 7, false),
            ("old", 8, true),
            ("old/x", 9, false),
            ("old/y", 10, false),
            ("var", 11, true),
            ("var/lib", 12, true),
            ("var/lib/f", 13, false),
            ("file2dir", 14, false),
            ("dir2file", 15, true),
            ("dir2file/z", 16, false),
            ("chowned", 17, false),
        ] {
            lower.insert(k(p), st(ino, dir, 100));
        }
        let mut upper = lower.clone();
        upper.insert(k("etc/passwd"), st(2, false, 200)); // edited in place: ctime moved
        upper.remove(&k("gone"));
        for p in ["gone/a", "gone/b", "gone/b/c"] {
            upper.remove(&k(p));
        }
        // `old` removed and made again: a new inode, with one file of the same name.
        upper.insert(k("old"), st(20, true, 200));
        upper.remove(&k("old/y"));
        upper.insert(k("old/x"), st(21, false, 200));
        upper.remove(&k("var/lib/f"));
        upper.insert(k("data"), st(22, true, 200));
        upper.insert(k("data/new"), st(23, false, 200));
        upper.insert(k("file2dir"), st(24, true, 200));
        upper.insert(k("file2dir/in"), st(25, false, 200));
        upper.remove(&k("dir2file/z"));
        upper.insert(k("dir2file"), st(26, false, 200));
        upper.insert(k("chowned"), Stat { uid: 999, gid: 999, ..st(17, false, 100) }); // a recorded chown: ctime unchanged
        let changes = diff(&lower, &upper);
        assert_eq!(
            show(&changes),
            [
                // Whiteouts sort by their own name: ".wh.gone" comes first.
                "-gone",
                "+chowned",
                "+data",
                "+data/new",
                "+dir2file",
                "+etc",
                "+etc/passwd",
                "+file2dir",
                "+file2dir/in",
                "+old",
                "opaque old",
                "+old/x",
                "+var",
                "+var/lib",
                "-var/lib/f",
            ]
        );
    }

    #[test]
    fn usual_id_coverage() {
        assert!(covers_usual_ids("         0          0 4294967295\n"));
        assert!(covers_usual_ids("0 1000 1\n1 100000 65536\n"));
        assert!(!covers_usual_ids("0 65534 1\n"));
        assert!(!covers_usual_ids("1 100000 65536\n"));
        assert!(!covers_usual_ids("0 1000 1\n2 100000 65536\n"));
    }

    #[test]
    fn nothing_changed_means_no_changes() {
        let mut lower = BTreeMap::new();
        lower.insert(k("a"), st(1, true, 1));
        lower.insert(k("a/b"), st(2, false, 1));
        assert!(diff(&lower, &lower.clone()).is_empty());
        // A directory's ctime moves when entries come and go; that alone is no change.
        let mut upper = lower.clone();
        upper.insert(k("a"), st(1, true, 5));
        assert!(diff(&lower, &upper).is_empty());
    }

    #[test]
    fn detected_on_disk() {
        // The snapshot, clock wait and diff against a real tree (no namespaces needed).
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("keep")).unwrap();
        fs::create_dir_all(root.join("replace/sub")).unwrap();
        fs::write(root.join("keep/same-size"), "aaaa").unwrap();
        fs::write(root.join("keep/delete"), "x").unwrap();
        fs::write(root.join("replace/sub/f"), "x").unwrap();
        let owners = Owners::default();
        let (_, lower) = scan(&root, &owners).unwrap();
        wait_for_clock(d.path(), &lower).unwrap();
        // Same size, mtime put back: only the ctime tells.
        let before = fs::metadata(root.join("keep/same-size")).unwrap().modified().unwrap();
        fs::write(root.join("keep/same-size"), "bbbb").unwrap();
        File::options().write(true).open(root.join("keep/same-size")).unwrap().set_modified(before).unwrap();
        fs::remove_file(root.join("keep/delete")).unwrap();
        fs::remove_dir_all(root.join("replace")).unwrap();
        fs::create_dir(root.join("replace")).unwrap();
        fs::write(root.join("replace/new"), "n").unwrap();
        let (_, upper) = scan(&root, &owners).unwrap();
        assert_eq!(show(&diff(&lower, &upper)), ["+keep", "-keep/delete", "+keep/same-size", "+replace", "opaque replace", "+replace/new"]);
    }
}
