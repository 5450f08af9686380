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
//!
//! The files split this one module by process role (`idmap` P, `child` C, `init` S and T,
//! `chown` the seccomp handler, `changes` the diff); they share this file's syscall imports and
//! helpers through `use super::*` on purpose, and only this file is the module's interface.
//!
//! Every `unsafe` here says why it is sound in a `// SAFETY:` comment (tests/source_rules.rs
//! checks all of src/, clippy this module).

#![deny(clippy::undocumented_unsafe_blocks)]

use crate::rootfs::beneath::Root;
use crate::image::flatten::{self, member_name, Kind, LayerData, Tree, SEP};
use crate::tar::write::Writer;
use crate::image::read::{LayerBlob, Selector};
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

mod changes;
mod init;
mod chown;
mod child;
mod idmap;
use changes::*;
use init::*;
use chown::*;
use child::*;
use idmap::*;

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
    /// Variables the extra commands get on top of our environment (the builder's `PATH`,
    /// `out`, `SOURCE_DATE_EPOCH`).
    pub extra_commands_env: Vec<(String, std::ffi::OsString)>,
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
    let scratch = crate::util::files::TempDir::new_in(&scratch_parent)?;
    let (tree, image) = match &args.from_image {
        Some(image) => {
            let sel = Selector { name: args.from_image_name.clone(), tag: args.from_image_tag.clone() };
            let opened = crate::image::read::open_image(image, &sel, &scratch.0, args.quiet)?;
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
    fn no_fork_with_other_threads_running() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new().name("other-thread".into()).spawn(move || rx.recv().is_ok()).unwrap();
        let e = check_threads().map_err(|e| e.to_string());
        drop(tx);
        t.join().unwrap();
        assert!(e.as_ref().is_err_and(|e| e.contains("(other-thread)")), "{e:?}");
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
