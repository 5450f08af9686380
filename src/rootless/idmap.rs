//! P, outside: which uid/gid maps to ask for (full, or our own ids only) and writing them for C.

use super::*;

// P: id maps, from outside.

#[derive(Debug, Clone)]
pub(super) enum MapPlan {
    /// As root: every id we have, mapped to itself.
    Identity { uid_map: String, gid_map: String },
    /// newuidmap/newgidmap: our ids to 0, a subordinate range to 1..
    Helper { uid: u32, gid: u32, subuid: (u64, u64), subgid: (u64, u64) },
    /// Our uid and gid to 0.
    Single { uid: u32, gid: u32 },
}

impl MapPlan {
    pub(super) fn describe(&self) -> String {
        match self {
            MapPlan::Identity { .. } => "every id mapped to itself (we are root)".into(),
            MapPlan::Helper { subuid, .. } => format!("root is us, ids 1-{} are subordinate ids from /etc/subuid (newuidmap)", subuid.1),
            MapPlan::Single { uid, .. } => format!("only uid {uid} (as root); other owners are recorded"),
        }
    }
}

/// Whether the ranges of one of our id maps hold every id from 0 to 65535 (what images use).
pub(super) fn covers_usual_ids(map: &str) -> bool {
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

pub(super) fn identity_map(file: &str) -> Result<String> {
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

pub(super) fn subid_range(file: &str, name: Option<&str>, id: u32) -> Option<(u64, u64)> {
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

pub(super) fn on_path(tool: &str) -> bool {
    crate::util::settings::get().search_path.iter().any(|d| d.join(tool).is_file())
}

pub(super) fn plans(mode: IdMapping) -> Result<Vec<MapPlan>> {
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

pub(super) fn write_proc(pid: Pid, file: &str, content: &str) -> io::Result<()> {
    // One write(2): the kernel takes a map in a single write only.
    let mut f = OpenOptions::new().write(true).open(format!("/proc/{pid}/{file}"))?;
    f.write_all(content.as_bytes())
}

/// Applies one plan to C's namespace; `Err` if it did not take (nothing was written then).
pub(super) fn apply_plan(pid: Pid, plan: &MapPlan) -> Result<()> {
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

/// The name of the signal-cleanup thread (`util::files::install_signal_cleanup`) as the
/// kernel keeps it: thread names are cut to 15 bytes.
const SIGNAL_THREAD: &str = "stevedore-signa";

/// Fails unless this is the process's only thread but for the signal-cleanup one: C runs the
/// whole of run-as-root after the fork, which is sound only if no other thread can hold a
/// lock or be half-way through changing memory at that moment. Only this thread could start
/// another, so what this finds holds at the fork. A thread just joined may linger in
/// /proc/self/task for a moment (past its last user-space instruction): looked at again.
pub(super) fn check_threads() -> Result<()> {
    let me = nix::unistd::gettid().as_raw().to_string();
    let mut tries = 0;
    loop {
        let tasks = fs::read_dir("/proc/self/task").context("cannot list this process's threads in /proc/self/task")?;
        let mut others = Vec::new();
        for task in tasks {
            let task = task.context("cannot list this process's threads in /proc/self/task")?;
            if task.file_name().to_str() == Some(me.as_str()) {
                continue;
            }
            match fs::read_to_string(task.path().join("comm")) {
                Ok(comm) if comm.trim_end_matches('\n') == SIGNAL_THREAD => {}
                Ok(comm) => others.push(format!("{} ({})", task.file_name().to_string_lossy(), comm.trim_end())),
                Err(_) => {} // ended meanwhile
            }
        }
        if others.is_empty() {
            return Ok(());
        }
        tries += 1;
        if tries == 50 {
            bail!("run-as-root must fork from a process running no other thread, but these run: {}", others.join(", "));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Forks C, maps its ids, and waits for its one-line report.
pub(super) fn run_in_namespaces(job: &Job, plans: &[MapPlan]) -> Result<(String, LayerCounts)> {
    use nix::fcntl::OFlag;
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (res_r, res_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    check_threads()?;
    // SAFETY: after this fork C does far more than async-signal-safe calls (all of its work).
    // That is sound as no other thread of P can be inside a lock or half-way through changing
    // memory: check_threads just found none but the signal-cleanup thread (src/util/files.rs),
    // and only this thread could start one (the threads other steps use, compression and layer
    // writing, are joined before those return). The signal thread waits in sigwait holding
    // nothing, unless a signal came: then it holds the temp-file registry, and perhaps stderr,
    // while it ends P; C could at worst block on them (never see what they guard half-changed)
    // and is ended by its parent-death signal or, once P is gone, by the `ready` or `go` pipe.
    // glibc's fork leaves malloc usable in the child. C ends in _exit (panics caught).
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
