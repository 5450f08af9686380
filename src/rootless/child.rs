//! C, the namespace's root: lays out the root, runs the script through S, writes the change.

use super::*;

// C: the namespace's root.

/// What C needs, prepared by P before forking.
pub(super) struct Job<'a> {
    pub(super) args: &'a RunAsRoot,
    pub(super) tree: &'a Tree,
    pub(super) blobs: &'a [LayerBlob],
    pub(super) scratch: &'a Path,
    pub(super) mounts: Mounts,
    pub(super) spec: ScriptSpec,
    /// `--extra-commands`, absolute (it runs from the root filesystem).
    pub(super) extra_commands: Option<PathBuf>,
    pub(super) mtime: i64,
}

/// Runs the script through S; returns its exit code.
pub(super) fn run_script(job: &Job, root: &Path, single: bool, owners: &mut Owners) -> Result<i32> {
    let (frames_r, frames_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: C runs no other thread (a fork copies only the calling thread, and C starts
    // none: laying out and scanning the root and copying the --layer trees run on its one
    // thread), so the child cannot inherit a lock or half-updated state of another
    // thread and may run any code. It ends in exit_reporting (_exit): it never returns into
    // C's code.
    match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
        ForkResult::Child => {
            drop(frames_r);
            // A pid namespace per run, entered here rather than by C: once its pid 1 exits,
            // nothing can be forked into it again, and C still has commands to run.
            let fw = frames_w.as_raw_fd();
            let init = || -> Result<i32> {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                unshare(CloneFlags::CLONE_NEWPID).map_err(|e| anyhow!("cannot create a pid namespace: {e}"))?;
                // SAFETY: this intermediate process, forked from single-threaded C, starts
                // no thread either; the child, S, ends in exit_reporting (_exit).
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
pub(super) fn in_namespace(job: &Job, root: &Path, single: bool) -> Result<(String, LayerCounts)> {
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
            .envs(job.args.extra_commands_env.iter().map(|(k, v)| (k, v)))
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
pub(super) fn remove_tree(root: &Path) {
    if fs::symlink_metadata(root).is_ok() {
        if let Err(e) = fs::remove_dir_all(root) {
            eprintln!("stevedore: warning: cannot remove {}: {e}", root.display());
        }
    }
}

/// C's whole life: enter the namespaces, wait for the maps, work, report one line.
pub(super) fn child_main(job: &Job, ready: OwnedFd, go: OwnedFd, result: OwnedFd) -> i32 {
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

pub(super) fn userns_hint() -> String {
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
