//! Owners under a single id mapping: the seccomp filter that hands the script's chown calls to S,
//! which records the owner asked for (framed messages to C) and reports success.

use super::*;

// Messages from S (and T) to C: framed, each written with one write(2), so atomic.

pub(super) const FRAME_OWNER: u8 = b'R';
pub(super) const FRAME_ERROR: u8 = b'E';

pub(super) fn send_frame(fd: RawFd, tag: u8, payload: &[u8]) {
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
pub(super) fn read_frames(fd: OwnedFd, owners: &mut Owners) -> Result<Option<String>> {
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

pub(super) const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
pub(super) const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;

#[cfg(target_arch = "x86_64")]
pub(super) const ARCH: u32 = AUDIT_ARCH_X86_64;
#[cfg(target_arch = "aarch64")]
pub(super) const ARCH: u32 = AUDIT_ARCH_AARCH64;

#[cfg(target_arch = "x86_64")]
pub(super) const CHOWN_CALLS: &[libc::c_long] = &[libc::SYS_chown, libc::SYS_lchown, libc::SYS_fchown, libc::SYS_fchownat];
#[cfg(target_arch = "aarch64")]
pub(super) const CHOWN_CALLS: &[libc::c_long] = &[libc::SYS_fchown, libc::SYS_fchownat];

/// Installs a filter that hands every chown family call to a supervisor; returns the
/// listener fd.
pub(super) fn install_chown_filter() -> io::Result<RawFd> {
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
    // prctl is variadic, and the C library reads all four arguments as unsigned long (va_arg):
    // they must be passed as such, not as the ints plain literals would be.
    let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only (of the type read, above) and
    // touches no memory of ours.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) })?;
    // SAFETY: `fprog` points at `prog`, whose `len` filters it counts; both live on this stack
    // until the call returns, and the kernel copies (and checks) the program. A negative result
    // is checked; otherwise it is a new descriptor that nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER, &fprog as *const libc::sock_fprog) };
    if fd < 0 {
        return Err(errno());
    }
    Ok(fd as RawFd)
}

/// Reads a NUL-terminated string at `addr` in process `pid`.
pub(super) fn read_remote_path(pid: u32, addr: u64) -> Result<Vec<u8>, i32> {
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

pub(super) enum Verdict {
    /// Let the kernel run the call (not our file system).
    Continue,
    /// Answer with this errno (0: success).
    Return(i32),
}

/// Handles one chown call: resolves its target as the caller would (S shares its root and
/// mount namespace), records the requested owner, and clears set-id bits as chown does.
pub(super) fn handle_chown(listener: RawFd, req: &libc::seccomp_notif, root_dev: u64, frames: RawFd, pins: &mut Pins) -> Verdict {
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
    // SAFETY: NOTIF_ID_VALID reads one u64, and `&req.id` is one, borrowed for the call.
    // `listener` is S's listener, which `supervise` keeps open while it serves.
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
    // statx(2) writes the kernel's struct statx whole: 256 bytes, new fields taking spare room.
    const _: () = assert!(std::mem::size_of::<libc::statx>() == 256);
    // SAFETY: statx too is a C struct of integers, for which all zero bytes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a NUL-terminated static string (with AT_EMPTY_PATH: `fd` itself, an
    // OwnedFd alive for the call), and statx writes one struct statx, of the size asserted
    // above, into `stx`, a live local of that type.
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
pub(super) struct Pins {
    pub(super) fds: Vec<OwnedFd>,
    pub(super) budget: usize,
}

impl Pins {
    pub(super) fn new() -> Pins {
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

    pub(super) fn keep(&mut self, fd: OwnedFd) {
        if self.fds.len() < self.budget {
            self.fds.push(fd);
        }
    }
}

pub(super) fn serve_one(listener: RawFd, root_dev: u64, frames: RawFd, pins: &mut Pins) {
    // SAFETY: seccomp_notif and seccomp_notif_resp are C structs of integers: all zero bytes is
    // a valid value, and the one NOTIF_RECV requires of the struct it fills.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: NOTIF_RECV writes one seccomp_notif into `req`, a live local of that type: the
    // ioctl number encodes size_of::<seccomp_notif>(), and the kernel accepts it only if that
    // is the size of the struct it copies out. `listener` is open, as in handle_chown.
    if unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut req) } != 0 {
        return; // the caller died meanwhile
    }
    // SAFETY: as for `req` above: integers, all zero valid (and what the kernel wants of the
    // fields not set here).
    let mut resp: libc::seccomp_notif_resp = unsafe { std::mem::zeroed() };
    resp.id = req.id;
    match handle_chown(listener, &req, root_dev, frames, pins) {
        Verdict::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        Verdict::Return(0) => {}
        Verdict::Return(e) => resp.error = -e,
    }
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp (its size encoded in the ioctl number, as
    // for NOTIF_RECV), `resp`, borrowed for the call. A failure (the caller died meanwhile) is
    // ignored: there is no one left to answer.
    unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND as _, &resp) };
}
