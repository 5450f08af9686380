//! Interrupted runs: SIGINT, SIGTERM and SIGHUP remove what a run was writing (partial output
//! files, OCI blob temporaries, scratch directories) and exit with 128 + the signal; what a
//! SIGKILL leaves is removed by the next run that writes there, and nothing else is.
//!
//! A run is held mid-write by a customisation layer whose `layer.tar` is a FIFO nobody writes:
//! the store layers are written, then the process waits on it. Exports are held up by size.
//!
//! stevedore keeps ignoring a signal it was started ignoring (`nohup`, a background job), and
//! this test may itself run so (`nohup cargo test`, a CI runner ignoring SIGINT): every run the
//! tests signal starts with SIGHUP, SIGINT and SIGTERM at their defaults, and one that does not
//! end soon after its signal is killed and fails the test instead of hanging it.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A conf whose customisation layer never arrives: the run stops inside the image.
fn stuck_conf(dir: &Path) -> PathBuf {
    let fx = fixture("compat", 8, 30, 0.0);
    let custom = dir.join("custom");
    fs::create_dir_all(&custom).unwrap();
    fs::write(custom.join("checksum"), "0".repeat(64)).unwrap();
    nix::unistd::mkfifo(&custom.join("layer.tar"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut conf = base_conf(&fx, vec![store_paths(&fx)[..3].to_vec()]);
    conf["customisation_layer"] = json!(custom);
    write_json(dir, "stuck.json", &conf)
}

fn quick_conf(dir: &Path) -> PathBuf {
    let fx = fixture("compat", 8, 30, 0.0);
    write_json(dir, "quick.json", &base_conf(&fx, vec![store_paths(&fx)[..2].to_vec()]))
}

/// The signals the tests send, back at their defaults in `cmd`'s process, whatever this test
/// process inherited: a signal ignored here would be ignored there too, and stevedore keeps it so.
fn with_default_signals(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec, and calls only signal(2), which
    // is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
                if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }
}

fn start(args: &[&str]) -> Child {
    with_default_signals(Command::new(bin()).args(args)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// How long a signalled run may take to clean up and exit.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// Waits for `child` and its stderr, for at most `limit`; one still running then is killed and
/// the test fails.
fn wait_at_most(mut child: Child, limit: Duration, what: &str) -> Output {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = rx.recv_timeout(limit.saturating_sub(started.elapsed())).unwrap_or_else(|_| panic!("{what}: its stderr is still open after {limit:?}"));
    Output { status, stdout: Vec::new(), stderr }
}

/// Names in `dir` made by stevedore's temporary naming scheme (or the old `.partial` one).
fn litter(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".stevedore-") || n.ends_with(".partial"))
        .collect();
    names.sort();
    names
}

/// Waits (up to a minute) until `dir` holds litter for which `pred` holds; returns its names.
fn wait_for_litter(dir: &Path, child: &mut Child, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let started = Instant::now();
    loop {
        let found: Vec<String> = if dir.exists() { litter(dir).into_iter().filter(|n| pred(n)).collect() } else { Vec::new() };
        if !found.is_empty() {
            return found;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ended ({status}) before writing anything temporary into {}", dir.display());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "nothing temporary appeared in {}", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Signals `child`, which must then exit 128 + the signal saying why, without a panic.
fn interrupt(child: Child, sig: Signal) -> Output {
    signal(&child, sig);
    let out = wait_at_most(child, STOP_LIMIT, &format!("after {sig}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + sig as i32), "{sig}: {err}");
    assert!(err.trim_end().ends_with(&format!("stevedore: stopped by {sig}")), "{sig}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

fn index_of(layout: &Path) -> Vec<u8> {
    fs::read(layout.join("index.json")).unwrap()
}

fn image_names(layout: &Path) -> Vec<String> {
    let index: Value = serde_json::from_slice(&index_of(layout)).unwrap();
    index["manifests"].as_array().unwrap().iter().map(|m| m["annotations"]["io.containerd.image.name"].as_str().unwrap().to_string()).collect()
}

fn assert_blobs_intact(layout: &Path) {
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        assert_eq!(sha256_hex(&fs::read(e.path()).unwrap()), e.file_name().to_string_lossy(), "a blob holds other bytes");
    }
}

#[test]
fn signals_remove_the_partial_output_file() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = stuck_conf(tmp.path());
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let target = out.join("image.tar");
        let mut child = start(&["stream", conf.to_str().unwrap(), "-o", target.to_str().unwrap()]);
        wait_for_litter(&out, &mut child, |n| n.starts_with(".image.tar.stevedore-"));
        std::thread::sleep(Duration::from_millis(200));
        interrupt(child, sig);
        assert!(!target.exists(), "{sig}");
        assert_eq!(litter(&out), Vec::<String>::new(), "{sig} left these");
    }
}

#[test]
fn signals_remove_oci_blob_temporaries_and_keep_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let quick = quick_conf(tmp.path());
    assert!(Command::new(bin()).args(["stream", "-q", "--format", "oci", "-t", "old:1", "-o"]).arg(&layout).arg(&quick).status().unwrap().success());
    let old = index_of(&layout);
    let conf = stuck_conf(tmp.path());
    let mut child = start(&["stream", conf.to_str().unwrap(), "--format", "oci", "-t", "new:1", "-o", layout.to_str().unwrap()]);
    wait_for_litter(&layout, &mut child, |n| n.starts_with(".blob.stevedore-"));
    std::thread::sleep(Duration::from_millis(200));
    interrupt(child, Signal::SIGINT);
    assert_eq!(litter(&layout), Vec::<String>::new());
    assert!(index_of(&layout) == old, "the index changed");
    assert_blobs_intact(&layout);
}

#[test]
fn signals_remove_an_oci_archive_and_its_scratch_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = stuck_conf(tmp.path());
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let target = out.join("image.oci.tar");
    let mut child = start(&["stream", conf.to_str().unwrap(), "--format", "oci-archive", "-o", target.to_str().unwrap()]);
    wait_for_litter(&out, &mut child, |n| n.ends_with(".scratch"));
    wait_for_litter(&out, &mut child, |n| n.ends_with(".partial"));
    std::thread::sleep(Duration::from_millis(200));
    interrupt(child, Signal::SIGTERM);
    assert_eq!(litter(&out), Vec::<String>::new());
    assert!(!target.exists());
}

/// An OCI layout (zstd layers) of an image with one big file, and a small one, made once.
fn export_inputs() -> (PathBuf, PathBuf) {
    let root = PathBuf::from("/tmp/stevedore-test-fixtures/interrupt-export");
    let _lock = {
        fs::create_dir_all(root.parent().unwrap()).unwrap();
        let f = fs::File::create(root.parent().unwrap().join(".lock-interrupt")).unwrap();
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).unwrap()
    };
    let (big, small) = (root.join("big-layout"), root.join("small-layout"));
    if !root.join("done").exists() {
        let _ = fs::remove_dir_all(&root);
        let store = root.join("store");
        let path = store.join("0123456789abcdfghijklmnpqrsvwxyz-big");
        fs::create_dir_all(&path).unwrap();
        // Sparse: cheap to make, but 768 MiB to decompress and write again.
        fs::File::create(path.join("big.bin")).unwrap().set_len(768 << 20).unwrap();
        let mut conf = base_conf(&root, vec![vec![path.to_str().unwrap().to_string()]]);
        conf["store_dir"] = json!(store);
        let conf = write_json(&root, "big.json", &conf);
        let st = Command::new(bin()).args(["stream", "-q", "--format", "oci", "--compressor", "zstd", "-o"]).arg(&big).arg(&conf).status().unwrap();
        assert!(st.success());
        let quick = quick_conf(&root);
        let st = Command::new(bin()).args(["stream", "-q", "--format", "oci", "-o"]).arg(&small).arg(&quick).status().unwrap();
        assert!(st.success());
        fs::write(root.join("done"), "").unwrap();
    }
    (big, small)
}

fn export(image: &Path, output: &Path, scratch: &Path) -> Child {
    start(&["export", "--from-image", image.to_str().unwrap(), "-o", output.to_str().unwrap(), "--scratch", scratch.to_str().unwrap(), "--compressor", "none"])
}

#[test]
fn signals_remove_an_exports_scratch_directory() {
    let (big, _) = export_inputs();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    let out = tmp.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let mut child = export(&big, &out.join("fs.tar"), &scratch);
    let dirs = wait_for_litter(&scratch, &mut child, |n| n.ends_with(".scratch"));
    // Holding a decompressed layer, not just made.
    let layer = scratch.join(&dirs[0]).join("layer-0.tar");
    let started = Instant::now();
    while fs::metadata(&layer).map_or(0, |m| m.len()) == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    interrupt(child, Signal::SIGTERM);
    assert_eq!(litter(&scratch), Vec::<String>::new());
    assert_eq!(litter(&out), Vec::<String>::new());
    assert!(!out.join("fs.tar").exists());
}

/// `name` with another owner pid and start time (the rest, the boot and namespace tag, kept).
fn with_owner(name: &str, pid: u32, start: u64) -> String {
    let at = name.rfind(".stevedore-").unwrap() + ".stevedore-".len();
    let (head, rest) = name.split_at(at);
    let f: Vec<&str> = rest.splitn(4, '-').collect();
    format!("{head}{}-{pid}-{start}-{}", f[0], f[3])
}

fn own_start_time() -> u64 {
    let stat = fs::read_to_string("/proc/self/stat").unwrap();
    stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn the_next_run_removes_what_a_killed_one_left_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = stuck_conf(tmp.path());
    let quick = quick_conf(tmp.path());
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();

    // An output file.
    let mut child = start(&["stream", conf.to_str().unwrap(), "-o", out.join("image.tar").to_str().unwrap()]);
    let left = wait_for_litter(&out, &mut child, |n| n.starts_with(".image.tar.stevedore-"));
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    assert_eq!(litter(&out), left, "SIGKILL leaves its partial file");
    // Names stevedore did not make, or made by a live process (this test's pid and start
    // time), or in another boot or pid namespace, stay.
    let live = with_owner(&left[0], std::process::id(), own_start_time());
    let foreign = ".image.tar.stevedore-ffffffffffff-1-1-0.partial";
    let keep = ["image.tar.partial", ".stevedore-1-2", "x.stevedore-0123456789ab-1-2-3.partial", foreign, &live];
    for k in keep {
        fs::write(out.join(k), "keep").unwrap();
    }
    let st = Command::new(bin()).args(["stream", "-q", "-o"]).arg(out.join("other.tar")).arg(&quick).status().unwrap();
    assert!(st.success());
    assert!(!out.join(&left[0]).exists(), "the killed run's partial file is still there");
    for k in keep {
        assert!(out.join(k).exists(), "{k} was removed");
    }

    // A layout.
    let layout = tmp.path().join("layout");
    assert!(Command::new(bin()).args(["stream", "-q", "--format", "oci", "-t", "old:1", "-o"]).arg(&layout).arg(&quick).status().unwrap().success());
    let mut child = start(&["stream", conf.to_str().unwrap(), "--format", "oci", "-t", "killed:1", "-o", layout.to_str().unwrap()]);
    wait_for_litter(&layout, &mut child, |n| n.starts_with(".blob.stevedore-"));
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    assert!(!litter(&layout).is_empty());
    assert!(Command::new(bin()).args(["stream", "-q", "--format", "oci", "-t", "next:1", "-o"]).arg(&layout).arg(&quick).status().unwrap().success());
    assert_eq!(litter(&layout), Vec::<String>::new());
    assert_eq!(image_names(&layout), ["docker.io/library/old:1", "docker.io/library/next:1"]);
    assert_blobs_intact(&layout);
    let umoci = Command::new("umoci").args(["ls", "--layout"]).arg(&layout).output().unwrap();
    assert!(umoci.status.success(), "{}", String::from_utf8_lossy(&umoci.stderr));

    // An export's scratch directory (with a layer half decompressed in it).
    let (big, small) = export_inputs();
    let scratch = tmp.path().join("scratch");
    let mut child = export(&big, &out.join("fs.tar"), &scratch);
    let dirs = wait_for_litter(&scratch, &mut child, |n| n.ends_with(".scratch"));
    let started = Instant::now();
    while fs::metadata(scratch.join(&dirs[0]).join("layer-0.tar")).map_or(0, |m| m.len()) == 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    assert_eq!(litter(&scratch), dirs);
    let done = export(&small, &out.join("small.tar"), &scratch).wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(litter(&scratch), Vec::<String>::new());
}

#[test]
fn signals_ignored_at_start_stay_ignored() {
    // As under `nohup`, or a background job of a non-interactive shell (SIGINT).
    let tmp = tempfile::tempdir().unwrap();
    let conf = stuck_conf(tmp.path());
    let target = tmp.path().join("image.tar");
    // bash cannot trap what it was started ignoring: it starts with the defaults.
    let mut child = with_default_signals(
        Command::new("bash").arg("-c").arg("trap '' TERM; exec \"$@\"").arg("bash").arg(bin()).args(["stream", conf.to_str().unwrap(), "-o", target.to_str().unwrap()]),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_litter(tmp.path(), &mut child, |n| n.starts_with(".image.tar.stevedore-"));
    signal(&child, Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "an ignored SIGTERM stopped it");
    interrupt(child, Signal::SIGINT);
    assert_eq!(litter(tmp.path()), Vec::<String>::new());
}

#[test]
fn programs_we_run_get_no_blocked_signals() {
    // The cleanup thread needs the signals blocked everywhere else; programs run from a
    // thread must not inherit that (std::process::Command clears the mask before exec).
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("image.tar");
    fs::write(&archive, stream_ok(&quick_conf(tmp.path()))).unwrap();
    let record = tmp.path().join("mask");
    let script = tmp.path().join("image.sh");
    fs::write(&script, format!("#!/bin/sh\ngrep -E '^Sig(Blk|Ign)' /proc/self/status > {}\nexec cat {}\n", record.display(), archive.display())).unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(bin()).args(["merge", "-q", "-o"]).arg(tmp.path().join("merged.tar")).arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mask = fs::read_to_string(&record).unwrap();
    assert!(mask.contains("SigBlk:\t0000000000000000"), "{mask}");
}

/// A store path with a static busybox, for scripts run by `run-as-root`.
fn busybox_store(dir: &Path) -> PathBuf {
    let bb = dir.join("store/0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-busybox");
    fs::create_dir_all(bb.join("bin")).unwrap();
    fs::copy("/bin/busybox", bb.join("bin/busybox")).expect("busybox-static is installed at /bin/busybox");
    for applet in ["sh", "sleep", "touch"] {
        std::os::unix::fs::symlink("busybox", bb.join("bin").join(applet)).unwrap();
    }
    bb
}

fn run_as_root(bb: &Path, script: &Path, out: &Path, scratch: &Path) -> Child {
    let sh = bb.join("bin/sh");
    let path = format!("PATH={}/bin", bb.display());
    start(&["run-as-root", "--store-path", bb.to_str().unwrap(), "--script", script.to_str().unwrap(), "--shell", sh.to_str().unwrap()]
        .into_iter()
        .chain(["--env", &path, "--out-layer", out.to_str().unwrap(), "--scratch", scratch.to_str().unwrap()])
        .collect::<Vec<_>>())
}

/// Processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn signals_stop_run_as_root_and_its_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let bb = busybox_store(tmp.path());
    let (scratch, out) = (tmp.path().join("scratch"), tmp.path().join("out"));
    fs::create_dir_all(&out).unwrap();
    let quick = tmp.path().join("quick.sh");
    fs::write(&quick, "touch /made\n").unwrap();
    let probe = run_as_root(&bb, &quick, &out.join("probe.tar"), &scratch).wait_with_output().unwrap();
    if !probe.status.success() {
        eprintln!("skipped: run-as-root does not work here: {}", String::from_utf8_lossy(&probe.stderr).trim());
        return;
    }
    // The script says it runs by a file in the root it works on, then waits.
    let token = format!("{}", 600 + std::process::id() % 300);
    let slow = tmp.path().join("slow.sh");
    fs::write(&slow, format!("touch /started\nsleep {token}\n")).unwrap();
    let started = |scratch: &Path| fs::read_dir(scratch).unwrap().flatten().any(|e| e.path().join("rootfs/started").exists());
    let wait_started = |child: &mut Child| {
        let t = Instant::now();
        while !started(&scratch) {
            assert!(child.try_wait().unwrap().is_none(), "run-as-root ended early");
            assert!(t.elapsed() < Duration::from_secs(60), "the script did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut child = run_as_root(&bb, &slow, &out.join("layer.tar"), &scratch);
    wait_started(&mut child);
    interrupt(child, Signal::SIGTERM);
    assert_eq!(litter(&scratch), Vec::<String>::new());
    assert_eq!(litter(&out), Vec::<String>::new());
    assert!(!out.join("layer.tar").exists());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(processes_with(&format!("sleep {token}")), Vec::<String>::new(), "the script outlived it");

    // SIGKILL: the namespace processes die with it (parent-death signals); the next run
    // removes the scratch directory left.
    let mut child = run_as_root(&bb, &slow, &out.join("layer.tar"), &scratch);
    wait_started(&mut child);
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(litter(&scratch).len(), 1);
    assert_eq!(processes_with(&format!("sleep {token}")), Vec::<String>::new(), "the script outlived it");
    let again = run_as_root(&bb, &quick, &out.join("again.tar"), &scratch).wait_with_output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(litter(&scratch), Vec::<String>::new());
}
