//! Files that appear whole or not at all, scratch directories that do not outlive the process,
//! and cleaning up after interrupted runs.
//!
//! - [`create_temp`] makes a new temporary file (`O_EXCL`, a name no other process or thread
//!   uses) beside its destination; [`TempPath::persist`] fsyncs it and renames it into place.
//!   [`write_atomically`] does both for one output file, then fsyncs the directory.
//! - [`TempDir`] is a scratch directory removed when dropped.
//! - [`lock_dir`] takes an exclusive `flock` on a directory, for read-modify-write updates.
//! - [`install_signal_cleanup`] (once, first thing in `main`) blocks SIGINT, SIGTERM and
//!   SIGHUP in every thread and waits for them on a thread of its own, which removes every
//!   temporary file and directory still registered, then exits with 128 + the signal.
//!   Removing files in an async signal handler would not be safe; a thread may allocate.
//!   Children inherit the blocked mask: `std::process::Command` clears it before exec, and so
//!   does `run-as-root` for the script it runs, so programs we start see default signals.
//! - A SIGKILL leaves litter no cleanup could catch, so every name made here says who made it:
//!   `.{stem}.stevedore-{tag}-{pid}-{start}-{seq}.partial` for files and
//!   `.stevedore-{tag}-{pid}-{start}-{seq}.scratch` for directories, where `start` is the
//!   process's start time (from `/proc/PID/stat`, so a reused pid is told apart) and `tag`
//!   names the boot and pid namespace (pids mean nothing across either). The first time a
//!   process makes one in a directory it removes the siblings in that scheme whose owner is
//!   gone ([`sweep`]). Nothing else is ever removed: not other names, not entries of another
//!   owner uid, boot or pid namespace, not symlinks.

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

const MARK: &[u8] = b".stevedore-";
const FILE_SUFFIX: &[u8] = b".partial";
const DIR_SUFFIX: &[u8] = b".scratch";
/// The tag written when the boot or pid namespace cannot be told: never swept.
const UNKNOWN_TAG: &str = "000000000000";
/// A stem longer than this is cut, so that names stay under NAME_MAX (255).
const MAX_STEM: usize = 120;

// ---------------------------------------------------------------------------------------------
// Who we are.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    tag: String,
    pid: u32,
    start: u64,
}

/// The start time (field 22) of a `/proc/PID/stat` line, and its pid field.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let pid = stat.split(' ').next()?.parse().ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some((pid, start))
}

fn identify(pid: u32) -> Owner {
    let known = (|| {
        let (stat_pid, start) = parse_stat(&fs::read_to_string("/proc/self/stat").ok()?)?;
        // Another pid namespace's /proc would make every liveness check wrong.
        if stat_pid != pid {
            return None;
        }
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = fs::metadata("/proc/self/ns/pid").ok()?;
        let digest = Sha256::digest(format!("{}:{}:{}", boot.trim(), ns.dev(), ns.ino()));
        let tag = crate::util::hex(&digest[..6]);
        Some(Owner { tag, pid, start })
    })();
    known.unwrap_or(Owner { tag: UNKNOWN_TAG.into(), pid, start: 0 })
}

/// This process as names record it (worked out again in a forked child).
fn me() -> Owner {
    static ME: Mutex<Option<Owner>> = Mutex::new(None);
    let pid = std::process::id();
    let mut me = ME.lock().unwrap_or_else(PoisonError::into_inner);
    match &*me {
        Some(o) if o.pid == pid => o.clone(),
        _ => me.insert(identify(pid)).clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Names.

static SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

/// A new name in the scheme: `.{stem}.stevedore-...partial` or `.stevedore-...scratch`.
fn new_name(stem: Option<&OsStr>) -> OsString {
    let o = me();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut name = Vec::new();
    let suffix = match stem {
        Some(stem) => {
            name.push(b'.');
            let stem = stem.as_bytes();
            name.extend_from_slice(&stem[..stem.len().min(MAX_STEM)]);
            FILE_SUFFIX
        }
        None => DIR_SUFFIX,
    };
    name.extend_from_slice(MARK);
    name.extend_from_slice(format!("{}-{}-{}-{seq}", o.tag, o.pid, o.start).as_bytes());
    name.extend_from_slice(suffix);
    OsString::from_vec(name)
}

/// What a name in the scheme says: its kind and owner.
fn parse_name(name: &[u8]) -> Option<(Kind, Owner)> {
    if !name.starts_with(b".") {
        return None;
    }
    let (body, kind) = match (name.strip_suffix(FILE_SUFFIX), name.strip_suffix(DIR_SUFFIX)) {
        (Some(b), _) => (b, Kind::File),
        (_, Some(b)) => (b, Kind::Dir),
        _ => return None,
    };
    let at = body.windows(MARK.len()).rposition(|w| w == MARK)?;
    // Directories have no stem; files have one (maybe empty) between the leading dot and it.
    if (kind == Kind::Dir) != (at == 0) {
        return None;
    }
    let fields: Vec<&[u8]> = body[at + MARK.len()..].split(|&b| b == b'-').collect();
    let [tag, pid, start, seq] = fields[..] else { return None };
    let digits = |f: &[u8], max: usize| !f.is_empty() && f.len() <= max && f.iter().all(u8::is_ascii_digit);
    if tag.len() != UNKNOWN_TAG.len() || !tag.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    if !digits(pid, 10) || !digits(start, 20) || !digits(seq, 20) {
        return None;
    }
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    let owner = Owner { tag: text(tag), pid: text(pid).parse().ok()?, start: text(start).parse().ok()? };
    Some((kind, owner))
}

/// Whether the process that made a name may still be running (when unsure: yes).
fn alive(owner: &Owner, me: &Owner) -> bool {
    if owner.pid == me.pid {
        return owner.start == me.start;
    }
    match fs::read_to_string(format!("/proc/{}/stat", owner.pid)) {
        Ok(stat) => parse_stat(&stat).is_none_or(|(_, start)| start == owner.start),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// Removes what dead stevedore processes left in `dir` (see the module comment for what
/// counts); best effort, a warning for what cannot go.
pub fn sweep(dir: &Path) {
    for warning in sweep_quietly(dir) {
        eprintln!("{warning}");
    }
}

/// [`sweep`], returning the warnings.
fn sweep_quietly(dir: &Path) -> Vec<String> {
    let me = me();
    let mut warnings = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return warnings };
    if me.tag == UNKNOWN_TAG {
        return warnings;
    }
    let uid = nix::unistd::geteuid().as_raw();
    for entry in entries.flatten() {
        let Some((kind, owner)) = parse_name(entry.file_name().as_bytes()) else { continue };
        if owner.tag != me.tag || alive(&owner, &me) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if meta.uid() != uid {
            continue;
        }
        let removed = match kind {
            Kind::File if meta.file_type().is_file() => fs::remove_file(&path),
            Kind::Dir if meta.file_type().is_dir() => remove_tree(&path),
            _ => continue,
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                warnings.push(format!("stevedore: warning: cannot remove {} (left by an interrupted run): {e}", path.display()))
            }
            _ => {}
        }
    }
    warnings
}

/// [`sweep`]s `dir` the first time this process makes something in it.
fn sweep_once(dir: &Path) {
    static SWEPT: Mutex<Option<(u32, HashSet<PathBuf>)>> = Mutex::new(None);
    let pid = std::process::id();
    let first = {
        let mut swept = SWEPT.lock().unwrap_or_else(PoisonError::into_inner);
        let set = match &mut *swept {
            Some((p, set)) if *p == pid => set,
            other => &mut other.insert((pid, HashSet::new())).1,
        };
        set.insert(dir.to_owned())
    };
    if first {
        sweep(dir);
    }
}

/// Removes a directory tree, making directories we own writable first if that is what stops
/// it (store paths are copied with mode 0555).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let mut result = fs::remove_dir_all(path);
    for attempt in 0..3 {
        match &result {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if attempt == 0 => make_writable(path),
            // Something may still be writing into it (signal cleanup): look again.
            Err(_) => {}
        }
        result = fs::remove_dir_all(path);
    }
    result
}

fn make_writable(root: &Path) {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&dir) else { continue };
        if !meta.is_dir() {
            continue;
        }
        if meta.mode() & 0o700 != 0o700 {
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o700));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a signal must clean up.

enum Entry {
    File(PathBuf),
    Dir(PathBuf),
    /// A forked child (pid, start time) to kill before anything is removed, and directories
    /// to sweep once it is dead (it may have made temporary files there).
    Child(i32, u64, Vec<PathBuf>),
}

struct Registry {
    next: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Registry {
    fn add(&mut self, e: Entry) -> u64 {
        self.next += 1;
        self.entries.insert(self.next, e);
        self.next
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { next: 0, entries: BTreeMap::new() });

/// The registry, locked. Signal cleanup holds it until the process ends, so whoever waits for
/// it then waits forever: no temporary file is made or renamed into place after cleanup began.
fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A temporary file, removed when dropped unless [persisted](TempPath::persist).
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    id: u64,
    done: bool,
}

/// Creates a new temporary file in `dir`, named from `stem` (the destination's file name, say).
pub fn create_temp(dir: &Path, stem: &OsStr) -> io::Result<(File, TempPath)> {
    sweep_once(dir);
    for _ in 0..1000 {
        let path = dir.join(new_name(Some(stem)));
        // Created and registered under the lock: signal cleanup sees every file there is.
        let mut reg = registry();
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                let id = reg.add(Entry::File(path.clone()));
                return Ok((file, TempPath { path, id, done: false }));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no unused temporary file name"))
}

impl TempPath {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes `file` (this temporary file) to disk and renames it to `target`. The directory
    /// is not synced: see [`sync_dir`].
    pub fn persist(mut self, file: File, target: &Path) -> io::Result<()> {
        file.sync_all()?;
        drop(file);
        let mut reg = registry();
        fs::rename(&self.path, target)?;
        reg.entries.remove(&self.id);
        self.done = true;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = registry();
            let _ = fs::remove_file(&self.path);
            reg.entries.remove(&self.id);
        }
    }
}

/// Replaces `link` with a symlink to `target` in one rename, made under a temporary name of
/// the scheme (which a sweep removes if we die between the two steps).
pub fn replace_symlink(target: &str, link: &Path) -> Result<()> {
    let stem = link.file_name().ok_or_else(|| anyhow!("{} has no file name", link.display()))?;
    let tmp = parent_of(link).join(new_name(Some(stem)));
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("cannot create symlink {}", tmp.display()))?;
    fs::rename(&tmp, link).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!("cannot rename {} to {}: {e}", tmp.display(), link.display())
    })
}

/// fsyncs a directory, so that renames into it survive a crash. Filesystems that cannot sync
/// directories are let be.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => Ok(()),
        r => r,
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes a file whole or not at all: into a new temporary file beside it, fsynced, renamed
/// over it, and the directory fsynced. An existing output that is not a regular file (a
/// device such as `/dev/null`, a FIFO) is written in place: renaming over it would replace it.
pub fn write_atomically<T>(path: &Path, write: impl FnOnce(BufWriter<File>) -> Result<(BufWriter<File>, T)>) -> Result<T> {
    // Output errors name the file: "the output" says little when there are several.
    let named = |e: anyhow::Error| match e.downcast_ref::<crate::util::io::OutputError>() {
        Some(crate::util::io::OutputError(io)) => anyhow!("cannot write {}: {io}", path.display()),
        None => e,
    };
    if fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let file = fs::OpenOptions::new().write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let (w, value) = write(BufWriter::with_capacity(1 << 20, file)).map_err(named)?;
        w.into_inner().map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?;
        return Ok(value);
    }
    let dir = parent_of(path);
    let name = path.file_name().ok_or_else(|| anyhow!("cannot write {}: not a file name", path.display()))?;
    let (file, tmp) = create_temp(dir, name).with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let (w, value) = write(BufWriter::with_capacity(1 << 20, file)).map_err(named)?;
    let file = w.into_inner().map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?;
    tmp.persist(file, path).with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(value)
}

/// [`write_atomically`] for bytes at hand.
pub fn write_file_atomically(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomically(path, |mut w| {
        w.write_all(data).map_err(crate::util::io::out_err)?;
        Ok((w, ()))
    })
}

/// A scratch directory, removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Makes a new one in `parent` (created if need be).
    pub fn new_in(parent: &Path) -> Result<TempDir> {
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        sweep_once(parent);
        for _ in 0..1000 {
            let path = parent.join(new_name(None));
            let mut reg = registry();
            match fs::create_dir(&path) {
                Ok(()) => {
                    reg.add(Entry::Dir(path.clone()));
                    return Ok(TempDir(path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(anyhow!("cannot create {}: {e}", path.display())),
            }
        }
        Err(anyhow!("cannot create a scratch directory in {}: no unused name", parent.display()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Removed outside the lock (a whole root filesystem takes a while); signal cleanup
        // removing it meanwhile is harmless.
        let _ = remove_tree(&self.0);
        registry().entries.retain(|_, e| !matches!(e, Entry::Dir(p) if *p == self.0));
    }
}

/// A forked child that signal cleanup kills (and reaps) before removing anything, as it may
/// still be writing into a scratch directory. `outputs` are files it writes atomically: their
/// directories are swept once it is dead, for its temporary files.
pub struct ChildGuard(u64);

impl ChildGuard {
    pub fn new(pid: i32, outputs: &[&Path]) -> ChildGuard {
        let start = fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat(&s)).map_or(0, |(_, s)| s);
        let dirs = outputs.iter().map(|o| parent_of(o).to_owned()).collect();
        ChildGuard(registry().add(Entry::Child(pid, start, dirs)))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        registry().entries.remove(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Locks.

/// An exclusive `flock` on a directory, released when dropped.
pub struct DirLock(Option<nix::fcntl::Flock<File>>);

/// Locks `dir` exclusively, waiting for other holders. The lock is on the directory itself,
/// not a file in it: files get replaced by renames (a lock on the old inode guards nothing)
/// and a lock file would stay behind for good. Filesystems that refuse to lock a directory
/// (NFS emulates flock with byte-range locks, which need a file open for writing) get a
/// `.stevedore.lock` file in it instead; every process on such a filesystem falls back alike.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    fn lock(mut f: File) -> std::result::Result<Flock<File>, Errno> {
        loop {
            match Flock::lock(f, FlockArg::LockExclusive) {
                Ok(l) => return Ok(l),
                Err((back, Errno::EINTR)) => f = back,
                Err((_, e)) => return Err(e),
            }
        }
    }
    let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    match lock(f) {
        Ok(l) => Ok(DirLock(Some(l))),
        Err(Errno::EBADF | Errno::ENOLCK | Errno::EOPNOTSUPP | Errno::EINVAL) => {
            let path = dir.join(".stevedore.lock");
            let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            lock(f).map(|l| DirLock(Some(l))).map_err(|e| anyhow!("cannot lock {}: {e}", path.display()))
        }
        Err(e) => Err(anyhow!("cannot lock {}: {e}", dir.display())),
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            // Closing the descriptor releases the lock anyway; nix's own drop would panic.
            if let Err((l, _)) = l.unlock() {
                std::mem::forget(l);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signals.

const CLEANUP_SIGNALS: [Signal; 3] = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM];

/// Signals this process was started with set to be ignored (`nohup`, a shell's background
/// job): they stay ignored.
fn ignored_signals() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("SigIgn:")).and_then(|m| u64::from_str_radix(m.trim(), 16).ok()).unwrap_or(0)
}

/// Sets up cleanup on SIGINT, SIGTERM and SIGHUP; call it once, before any thread is started
/// (threads inherit the mask that routes the signals to the cleanup thread).
pub fn install_signal_cleanup() {
    let ignored = ignored_signals();
    let mut set = SigSet::empty();
    for sig in CLEANUP_SIGNALS {
        if ignored & (1 << (sig as i32 - 1)) == 0 {
            set.add(sig);
        }
    }
    if set.iter().next().is_none() || set.thread_block().is_err() {
        return;
    }
    let spawned = std::thread::Builder::new().name("stevedore-signals".into()).spawn(move || loop {
        match set.wait() {
            Ok(sig) => cleanup_and_exit(sig),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    });
    if spawned.is_err() {
        let _ = set.thread_unblock();
    }
}

fn cleanup_and_exit(sig: Signal) -> ! {
    use nix::sys::wait::waitpid;
    use nix::unistd::Pid;
    let mut reg = registry();
    let entries = std::mem::take(&mut reg.entries);
    let mut sweeps = Vec::new();
    for e in entries.values() {
        if let Entry::Child(pid, start, dirs) = e {
            // Only the process registered, not one that got its pid after it was reaped.
            let same = fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat(&s)).is_some_and(|(_, s)| s == *start);
            if same {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
                while let Err(nix::errno::Errno::EINTR) = waitpid(Pid::from_raw(*pid), None) {}
            }
            sweeps.extend(dirs.iter().cloned());
        }
    }
    // Newest first: files in a scratch directory before the directory. Nothing is printed
    // until all is removed: stderr may be a pipe nobody reads any more.
    let mut warnings = Vec::new();
    for e in entries.values().rev() {
        let (path, removed) = match e {
            Entry::File(p) => (p, fs::remove_file(p)),
            Entry::Dir(p) => (p, remove_tree(p)),
            Entry::Child(..) => continue,
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => warnings.push(format!("stevedore: warning: cannot remove {}: {e}", path.display())),
            _ => {}
        }
    }
    for dir in sweeps {
        warnings.extend(sweep_quietly(&dir));
    }
    warnings.push(format!("stevedore: stopped by {}", sig.as_str()));
    // Unbuffered, and not through std's stderr lock: another thread may hold it, stuck on a
    // full pipe.
    let _ = nix::unistd::write(io::stderr(), format!("{}\n", warnings.join("\n")).as_bytes());
    // The registry stays locked: nothing else gets made or renamed into place from here on.
    std::process::exit(128 + sig as i32)
}

/// Ends the process with `code` unless signal cleanup has begun (then that ends it, with its
/// own status); keeps cleanup from beginning meanwhile. `last_words` (an error message) is
/// printed only then, so an interrupted run does not also report the failures the cleanup
/// caused.
pub fn exit(code: i32, last_words: impl FnOnce()) -> ! {
    let _reg = registry();
    last_words();
    std::process::exit(code)
}

/// Makes the directory `dir` with mode 0755 whatever the umask.
pub fn make_dir(dir: &Path) -> Result<()> {
    fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).with_context(|| format!("cannot chmod {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_fifos_are_written_in_place() {
        use std::io::Write;
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(fifo).unwrap())
        };
        write_atomically(&fifo, |mut w| {
            w.write_all(b"through").map_err(crate::util::io::out_err)?;
            Ok((w, ()))
        })
        .unwrap();
        assert_eq!(reader.join().unwrap(), b"through");
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        write_file_atomically(Path::new("/dev/null"), b"gone").unwrap();
        assert!(fs::symlink_metadata("/dev/null").unwrap().file_type().is_char_device());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn names_parse_back_and_nothing_else_parses() {
        let me = me();
        let file = new_name(Some(OsStr::new("image.tar")));
        let (kind, owner) = parse_name(file.as_bytes()).unwrap();
        assert_eq!((kind, owner), (Kind::File, me.clone()));
        let s = file.to_string_lossy();
        assert!(s.starts_with(".image.tar.stevedore-") && s.ends_with(".partial"), "{s}");
        let dir = new_name(None);
        assert_eq!(parse_name(dir.as_bytes()), Some((Kind::Dir, me.clone())));
        assert_ne!(new_name(None), dir, "names are unique");
        let long = new_name(Some(OsStr::new(&"x".repeat(300))));
        assert!(long.len() < 255);
        assert!(parse_name(long.as_bytes()).is_some());
        for other in [
            "image.tar.partial",
            ".partial-0",
            ".stevedore-123-456",
            ".stevedore-1234-5678.scratch",
            "x.stevedore-0123456789ab-1-2-3.partial",
            ".x.stevedore-0123456789ab-1-2-3.scratch",
            ".stevedore-0123456789ab-1-2-3.partial",
            ".x.stevedore-0123456789AB-1-2-3.partial",
            ".x.stevedore-0123456789ab-1-2.partial",
            ".x.stevedore-0123456789ab-1-2-3-4.partial",
            ".x.stevedore-0123456789ab--2-3.partial",
            ".x.stevedore-0123456789ab-1-2-3.partial~",
        ] {
            assert_eq!(parse_name(other.as_bytes()), None, "{other}");
        }
        assert!(parse_name(b".x.stevedore-0123456789ab-1-2-3.partial").is_some());
        assert!(parse_name(b".stevedore-0123456789ab-1-2-3.scratch").is_some());
    }

    #[test]
    fn stat_lines_with_odd_command_names() {
        let line = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some((4242, 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn sweep_removes_only_dead_owners_litter() {
        let me = me();
        if me.tag == UNKNOWN_TAG {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let name = |pid: u32, start: u64, kind: Kind| {
            let end = if kind == Kind::File { "partial" } else { "scratch" };
            let stem = if kind == Kind::File { ".out" } else { "" };
            format!("{stem}.stevedore-{}-{pid}-{start}-0.{end}", me.tag)
        };
        // Dead: our pid with another start time (pid reuse), and a pid no process has.
        let dead_file = name(me.pid, me.start + 1, Kind::File);
        let dead_dir = name(4_000_000_000, 1, Kind::Dir);
        fs::write(d.join(&dead_file), b"x").unwrap();
        fs::create_dir_all(d.join(&dead_dir).join("sub/deeper")).unwrap();
        fs::set_permissions(d.join(&dead_dir).join("sub"), fs::Permissions::from_mode(0o555)).unwrap();
        // Alive (us), another boot or namespace, the wrong kind, a symlink, other names.
        let live = name(me.pid, me.start, Kind::File);
        let foreign = ".out.stevedore-ffffffffffff-4000000000-1-0.partial".to_string();
        let wrong_kind = name(4_000_000_000, 1, Kind::File);
        let link = name(4_000_000_001, 1, Kind::Dir);
        for keep in [&live, &foreign, "out.partial", ".stevedore-1-2"] {
            fs::write(d.join(keep), b"keep").unwrap();
        }
        fs::create_dir(d.join(&wrong_kind)).unwrap();
        fs::create_dir(d.join("target")).unwrap();
        std::os::unix::fs::symlink(d.join("target"), d.join(&link)).unwrap();
        sweep(d);
        assert!(!d.join(&dead_file).exists());
        assert!(!d.join(&dead_dir).exists());
        for keep in [&live, &foreign, "out.partial", ".stevedore-1-2", &wrong_kind, &link, "target"] {
            assert!(fs::symlink_metadata(d.join(keep)).is_ok(), "{keep} was removed");
        }
    }

    #[test]
    fn temp_files_are_unique_exclusive_and_gone_unless_persisted() {
        let tmp = tempfile::tempdir().unwrap();
        let (f1, t1) = create_temp(tmp.path(), OsStr::new("a")).unwrap();
        let (f2, t2) = create_temp(tmp.path(), OsStr::new("a")).unwrap();
        assert_ne!(t1.path(), t2.path());
        let (p1, p2) = (t1.path().to_owned(), t2.path().to_owned());
        t1.persist(f1, &tmp.path().join("a")).unwrap();
        assert!(tmp.path().join("a").exists() && !p1.exists());
        drop(f2);
        drop(t2);
        assert!(!p2.exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        assert!(registry().entries.values().all(|e| !matches!(e, Entry::File(p) if *p == p1 || *p == p2)));
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (file, t) = create_temp(tmp.path(), OsStr::new("a")).unwrap();
        let p = t.path().to_owned();
        assert!(t.persist(file, &tmp.path().join("missing/a")).is_err());
        assert!(!p.exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn failed_writes_leave_the_old_file() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("out");
        write_file_atomically(&path, b"old").unwrap();
        let r: Result<()> = write_atomically(&path, |mut w| {
            w.write_all(b"new, but not all of it").unwrap();
            Err(anyhow!("injected"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "the temporary file is gone");
    }

    #[test]
    fn temp_dirs_go_even_when_read_only_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let d = TempDir::new_in(&tmp.path().join("new")).unwrap();
        fs::create_dir_all(d.path().join("ro/x")).unwrap();
        fs::write(d.path().join("ro/x/f"), b"").unwrap();
        fs::set_permissions(d.path().join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        let p = d.path().to_owned();
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn dir_locks_exclude_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock_dir(tmp.path()).unwrap();
        let got = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, flag) = (tmp.path().to_owned(), got.clone());
        let t = std::thread::spawn(move || {
            let _l = lock_dir(&dir).unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!got.load(Ordering::SeqCst), "a second holder got the lock");
        drop(held);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "no lock file is left");
    }
}
