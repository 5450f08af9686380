//! S, pid 1 of the namespace: the mount points it makes in the root, its read-only store
//! mounts, /proc, /dev and /sys, the pivot into the root, and T, which runs the script.

use super::*;

// Mount points.

/// A path we created in the root to mount something on; removed afterwards if still empty.
pub(super) struct MountPoint {
    pub(super) created: Vec<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PointKind {
    Dir,
    File,
}

/// Makes `root/rel` (and missing parents) exist as a mount point of `kind`, refusing to go
/// through symlinks in the image.
pub(super) fn mount_point(root: &Path, rel: &Path, kind: PointKind) -> Result<MountPoint> {
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
pub(super) fn remove_mount_points(points: &[MountPoint]) {
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
pub(super) struct Mounts {
    pub(super) store: Vec<(PathBuf, PathBuf, PointKind)>,
}


// ---------------------------------------------------------------------------------------------
// S: pid 1 of the namespace.

pub(super) struct ScriptSpec {
    pub(super) shell: CString,
    pub(super) argv: Vec<CString>,
    pub(super) env: Vec<CString>,
    pub(super) script_fd: RawFd,
}

pub(super) fn bind_read_only(src: &Path, target: &Path) -> Result<()> {
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

pub(super) fn setup_dev(dev: &Path) -> Result<()> {
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

pub(super) fn loopback_up() {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    // The kernel copies a whole struct ifreq in and out (the name, then a union of 24 bytes).
    const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());
    let mut req = IfReq { name: [0; 16], flags: 0, pad: [0; 22] };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: socket takes integers only and returns a new descriptor or -1 (checked).
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return;
    }
    // SAFETY: `s` is the socket just made, open until the close below. SIOCGIFFLAGS writes a
    // struct ifreq: IfReq has its layout (repr(C): the 16-byte name, ifr_flags as a short at
    // offset 16, and its size, asserted above) and `req` is a live local, borrowed for the call.
    if unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req) } == 0 {
        req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: as above; SIOCSIFFLAGS only reads `req`. A failure leaves lo down, which
        // scripts rarely need.
        unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS as _, &req) };
    }
    // SAFETY: `s` came from socket above, nothing else owns it, and it is closed once, here.
    unsafe { libc::close(s) };
}

/// S: mounts, pivots into the root, runs T and supervises it. Returns T's exit code (or
/// 128 + signal).
pub(super) fn init_main(root: &Path, mounts: &Mounts, spec: &ScriptSpec, single: bool, frames: RawFd) -> Result<i32> {
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
    // SAFETY: S runs no other thread (forked from the intermediate, itself forked from C, and
    // none of the three starts one), so the child, T, cannot inherit a lock or half-updated
    // state of another thread and may run any code. It ends in execve or _exit: it never
    // returns into S's code.
    let child = match unsafe { fork() }.map_err(|e| anyhow!("fork failed: {e}"))? {
        ForkResult::Child => {
            drop(sock_s);
            let e = exec_script(spec, single, sock_t.as_raw_fd());
            send_frame(frames, FRAME_ERROR, e.as_bytes());
            // SAFETY: _exit has no preconditions; it skips the destructors and atexit
            // handlers, which belong to S.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(sock_t);
    let listener = if single { Some(recv_fd(sock_s.as_raw_fd()).context("the script process did not send its seccomp listener")?) } else { None };
    supervise(child, listener, root_dev, frames)
}

pub(super) fn recv_fd(sock: RawFd) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed `fd` in our table for this SCM_RIGHTS message
                // just now (with MSG_CMSG_CLOEXEC); nothing else refers to it, so it is ours to
                // own and close.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    bail!("no file descriptor received")
}

/// T: drops into the script. Returns only on failure, with the message to report.
pub(super) fn exec_script(spec: &ScriptSpec, single: bool, sock: RawFd) -> String {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    // Signals the caller ignores (Rust ignores SIGPIPE, so `yes | head` would not end; a
    // background job ignores SIGINT) must not reach the script: all back to default. The raw
    // call, since glibc's wrappers refuse its own signals 32 and 33; an all-zero kernel
    // sigaction is SIG_DFL with no flags and an empty mask on every architecture.
    let default = [0u64; 4];
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction copies one kernel struct sigaction from `default`: handler,
            // flags, restorer and the 8-byte mask are 32 bytes on x86_64 and aarch64, and
            // `default` is 32 live bytes; 8 is the sigset size the kernel requires, and the old
            // action is not asked for (null). No handler of ours is replaced under a thread
            // using it: T runs no other thread, and glibc's own signals (32, 33) serve only
            // cancellation and set*id across threads, which T never uses before it execs.
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), std::ptr::null_mut::<u64>(), 8usize) };
        }
    }
    // SAFETY: sigset_t is an array of integers, for which all zero bytes is a valid value.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `none` is a live sigset_t, made empty by sigemptyset before sigprocmask reads it;
    // the old mask is not asked for (null).
    unsafe {
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    // The script's output is progress, not product: stdout goes to stderr.
    // SAFETY: dup2 takes integers. What it closes, fd 1, is owned by no OwnedFd or File of T:
    // std opens /dev/null on fds 0-2 at startup if they are closed, so none of our own files
    // can have been given fd 1, and std's Stdout only writes to the number (T writes nothing
    // to it before it execs).
    unsafe { libc::dup2(2, 1) };
    // SAFETY: F_GETFD and F_SETFD take integers and change only the close-on-exec flag of
    // `script_fd`: P's descriptor of the script (the File `run` holds across
    // run_in_namespaces), open when P forked C and inherited through every fork since, so it
    // still names the script here. The shell reads it through /proc/self/fd after the exec.
    unsafe {
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
                // nothing else, and closed once, here; the message sent holds its own reference
                // to the listener until S receives it.
                unsafe { libc::close(listener) };
            }
            Err(e) => return format!("cannot install the seccomp filter that records chown: {e}"),
        }
    }
    let e = nix::unistd::execve(&spec.shell, &spec.argv, &spec.env).unwrap_err();
    format!("cannot run the shell {} inside the image: {e} (it must be in the image, a --layer or a --store-path)", spec.shell.to_string_lossy())
}

pub(super) fn supervise(child: Pid, listener: Option<OwnedFd>, root_dev: u64, frames: RawFd) -> Result<i32> {
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
