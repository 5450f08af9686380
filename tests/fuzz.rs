//! A mutation fuzzer on stable Rust: real archives, confs and graphs, mutated by a seeded
//! generator (bit flips, interesting bytes, truncation, inserted PAX records, swapped and
//! repeated blocks), fed to every reader. Properties: no panic, no hang, no file outside the
//! scratch directory, memory within bounds; a clean error is a fine answer.
//!
//! `cargo test --test fuzz` runs a short, bounded pass. For a long one:
//! `STEVEDORE_FUZZ_CASES=20000 cargo test --release --test fuzz -- --nocapture` (bench/fuzz).
//! A failing case is written to `$TMPDIR/stevedore-fuzz-failure-N` with its seed.

mod common;

use common::{bin, fixture, run, store_paths};
use serde_json::json;
use std::fs;
use std::io::{self, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;
use stevedore::tar::{Header, HeaderEncoder};

/// xorshift64*: the same cases on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const PAX_RECORDS: &[&[u8]] = &[
    b"path=../../escape",
    b"path=a\0b",
    b"path=/",
    b"linkpath=/etc/passwd",
    b"linkpath=../../../x",
    b"size=99999999999999",
    b"size=-1",
    b"uid=-5",
    b"mtime=1.5e300",
    b"GNU.sparse.size=10",
    b"path=",
];

fn pax_block(rng: &mut Rng) -> Vec<u8> {
    let mut records = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let r = PAX_RECORDS[rng.below(PAX_RECORDS.len())];
        let body = r.len() + 2;
        let mut len = body + 1;
        while body + len.to_string().len() != len {
            len += 1;
        }
        // Now and then a lying length.
        let shown = if rng.below(8) == 0 { len + rng.below(40) } else { len };
        records.extend_from_slice(format!("{shown} ").as_bytes());
        records.extend_from_slice(r);
        records.push(b'\n');
    }
    let mut out = Vec::new();
    let mut h = Header::plain_file(b"././@PaxHeader", records.len() as u64, 0);
    h.kind = if rng.below(5) == 0 { b'g' } else { b'x' };
    HeaderEncoder::new().encode(&h, &mut out);
    out.extend_from_slice(&records);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// One mutation of `data`, which is a tar when `tar` (mutations then favour block bounds).
fn mutate(rng: &mut Rng, data: &[u8], tar: bool) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(3) {
        if d.is_empty() {
            break;
        }
        let blocks = d.len() / 512;
        match rng.below(if tar { 8 } else { 5 }) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(d.len());
                    d[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(d.len());
                d[i] = [0u8, 0xff, b'/', b'.', b'0', b'7', b' ', b'x', b'L', b'K', b'1', b'2', b'{', b'"'][rng.below(14)];
            }
            2 => {
                let at = if tar && rng.below(2) == 0 { rng.below(blocks + 1) * 512 } else { rng.below(d.len()) };
                d.truncate(at);
            }
            3 => {
                let i = rng.below(d.len());
                let n = rng.below(64).min(d.len() - i);
                d.drain(i..i + n);
            }
            4 => {
                let i = rng.below(d.len());
                let n = rng.below(64).min(d.len() - i);
                let copy = d[i..i + n].to_vec();
                let at = rng.below(d.len());
                d.splice(at..at, copy);
            }
            5 if blocks > 0 => {
                let at = rng.below(blocks) * 512;
                let p = pax_block(rng);
                d.splice(at..at, p);
            }
            6 if blocks > 1 => {
                let (a, b) = (rng.below(blocks) * 512, rng.below(blocks) * 512);
                let (a, b) = (a.min(b), a.max(b));
                if a != b && b + 512 <= d.len() {
                    let (x, y) = d.split_at_mut(b);
                    x[a..a + 512].swap_with_slice(&mut y[..512]);
                }
            }
            7 if blocks > 0 => {
                // A header's size or checksum field rewritten with a valid-looking number.
                let at = rng.below(blocks) * 512;
                if at + 512 <= d.len() {
                    let field = if rng.below(2) == 0 { 124..136 } else { 148..156 };
                    let n = format!("{:0w$o}", rng.next() % (1 << 33), w = field.len() - 1);
                    d[field.clone()][..field.len() - 1].copy_from_slice(&n.as_bytes()[n.len() - (field.len() - 1)..]);
                }
            }
            _ => {}
        }
    }
    d
}

struct Seeds {
    archives: Vec<(String, Vec<u8>)>,
    /// The crafted image's layers, mutated one at a time inside a well-formed archive.
    layers: Vec<Vec<u8>>,
    confs: Vec<Vec<u8>>,
    graphs: Vec<Vec<u8>>,
    host: PathBuf,
}

fn member(out: &mut Vec<u8>, h: Header, data: &[u8]) {
    HeaderEncoder::new().encode(&h, out);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A Docker archive of two hand-made layers with every kind of member, including a symlink to
/// `host`, which nothing may ever write through.
fn crafted(host: &Path) -> Vec<Vec<u8>> {
    let host = host.as_os_str().as_encoded_bytes();
    let mut l1 = Vec::new();
    let d = |name: &'static [u8]| Header { kind: b'5', mode: 0o755, ..Header::plain_file(name, 0, 0) };
    let link = |name: &'static [u8], kind: u8, target: &'static [u8]| Header { kind, linkname: target, mode: 0o777, ..Header::plain_file(name, 0, 0) };
    member(&mut l1, d(b"./"), b"");
    member(&mut l1, d(b"etc/"), b"");
    member(&mut l1, Header { uid: 1000, gid: 100, mode: 0o4755, ..Header::plain_file(b"etc/passwd", 5, 0) }, b"root\n");
    member(&mut l1, Header { kind: b'2', linkname: host, mode: 0o777, ..Header::plain_file(b"h", 0, 0) }, b"");
    member(&mut l1, link(b"etc/hard", b'1', b"etc/passwd"), b"");
    member(&mut l1, link(b"etc/sym", b'2', b"../etc/passwd"), b"");
    member(&mut l1, Header { kind: b'6', ..Header::plain_file(b"fifo", 0, 0) }, b"");
    member(&mut l1, Header { kind: b'3', devmajor: 1, devminor: 3, ..Header::plain_file(b"null", 0, 0) }, b"");
    let long = [b'n'; 150];
    member(&mut l1, Header::plain_file(&long, 3, 0), b"abc");
    member(&mut l1, Header::plain_file("caf\u{e9}".as_bytes(), 1, 0), b"x");
    l1.resize(l1.len() + 1024, 0);
    let mut l2 = Vec::new();
    member(&mut l2, Header::plain_file(b"h/through-the-link", 2, 0), b"hi");
    member(&mut l2, Header::plain_file(b"etc/.wh.sym", 0, 0), b"");
    member(&mut l2, Header::plain_file(b"etc/.wh..wh..opq", 0, 0), b"");
    member(&mut l2, Header::plain_file(b"etc/new", 1, 0), b"n");
    l2.resize(l2.len() + 1024, 0);
    vec![l1, l2]
}

fn sha(d: &[u8]) -> String {
    common::sha256_hex(d)
}

fn docker_archive(layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("sha256:{}", sha(l))).collect();
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let config_name = format!("{}.json", sha(&config));
    let names: Vec<String> = (0..layers.len()).map(|i| format!("{i}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": ["crafted:latest"], "Layers": names}])).unwrap();
    let mut out = Vec::new();
    member(&mut out, Header::plain_file(b"manifest.json", manifest.len() as u64, 0), &manifest);
    member(&mut out, Header::plain_file(config_name.as_bytes(), config.len() as u64, 0), &config);
    for (n, l) in names.iter().zip(layers) {
        member(&mut out, Header::plain_file(n.as_bytes(), l.len() as u64, 0), l);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn seeds(dir: &Path) -> Seeds {
    let host = dir.join("host");
    fs::create_dir(&host).unwrap();
    let fx = fixture("fuzz", 3, 3, 0.0);
    let paths = store_paths(&fx);
    let conf = common::base_conf(&fx, vec![paths[..1].to_vec(), paths[1..].to_vec()]);
    let conf_path = common::write_json(dir, "conf.json", &conf);
    let layers = crafted(&host);
    let mut archives = vec![("crafted".to_string(), docker_archive(&layers))];
    for format in ["docker-archive", "oci-archive"] {
        let out = dir.join(format!("seed-{format}.tar"));
        let o = Command::new(bin()).arg("stream").arg(&conf_path).args(["-q", "--format", format, "-o"]).arg(&out).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        archives.push((format.to_string(), fs::read(&out).unwrap()));
    }
    let graph = fs::read(fx.join("closure.json")).unwrap();
    Seeds { archives, layers, confs: vec![serde_json::to_vec(&conf).unwrap()], graphs: vec![graph], host }
}

/// Everything the library does with an image archive, in process; how far it got (an index,
/// a base image, a flattened tree, a merge).
fn read_archive(path: &Path, scratch: &Path) -> [bool; 4] {
    let mut got = [false; 4];
    let quiet = stevedore::util::progress::Progress { quiet: true };
    if let Ok(idx) = stevedore::image::read::ArchiveIndex::load(path) {
        got[0] = true;
        let _ = idx.json("manifest.json");
        let _ = idx.json("index.json");
    }
    if let Ok(base) = stevedore::image::base::BaseImage::load(path) {
        got[1] = base
            .copy_layers(|_, bytes| {
                io::copy(bytes.sized()?.1, &mut io::sink())?;
                Ok(())
            })
            .is_ok();
    }
    if let Ok(img) = stevedore::image::read::open_image(path, &Default::default(), scratch, true) {
        if let Ok(tree) = stevedore::image::flatten::Tree::from_layers(&img.layers) {
            // Nothing written below a symlink, no name that leaves the root.
            for key in tree.nodes.keys() {
                let mut prefix = Vec::new();
                for comp in key.split(|&b| b == stevedore::image::flatten::SEP) {
                    assert!(comp != b".." && comp != b"." && !comp.is_empty() && !comp.contains(&b'/'), "bad key {key:?}");
                    if !prefix.is_empty() {
                        let parent = tree.nodes.get(&prefix).expect("every parent is in the tree");
                        assert_eq!(parent.kind, stevedore::image::flatten::Kind::Dir, "a path below a non-directory: {key:?}");
                        prefix.push(stevedore::image::flatten::SEP);
                    }
                    prefix.extend_from_slice(comp);
                }
            }
            got[2] = stevedore::image::flatten::write_tree(&tree, &img.layers, io::sink(), 1).is_ok();
        }
    }
    got[3] = stevedore::image::merge::merge(&[path.to_owned()], scratch, io::sink(), &quiet).is_ok();
    if let Ok(index) = stevedore::image::read::ArchiveIndex::load(path) {
        let _ = stevedore::registry::source::plan_oci(&stevedore::image::read::OciStore::Archive(&index), None);
    }
    got
}

/// Runs `f` on a worker thread: a panic or a hang (over `limit`) is reported with `case`.
fn guarded<T: Send + 'static>(case: &str, input: &[u8], limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(f));
        let _ = tx.send(r.map_err(|p| p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()));
    });
    let failure = match rx.recv_timeout(limit) {
        Ok(Ok(v)) => return v,
        Ok(Err(msg)) => format!("panicked: {msg}"),
        Err(_) => format!("did not finish within {limit:?}"),
    };
    let keep = std::env::temp_dir().join(format!("stevedore-fuzz-failure-{}", std::process::id()));
    fs::write(&keep, input).unwrap();
    panic!("case {case} {failure}; input kept in {}", keep.display());
}

fn vm_hwm_kib() -> i64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap_or(0)
}

#[test]
fn fuzz() {
    let cases: usize = std::env::var("STEVEDORE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let dir = tempfile::Builder::new().prefix("stevedore-fuzz-").tempdir_in("/tmp").unwrap();
    let seeds = seeds(dir.path());
    let scratch = dir.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let now = stevedore::image::conf::now();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut subprocess_runs = 0;
    let mut reached = [0usize; 4];
    for case in 0..cases {
        let seed_case = rng.next();
        let mut r = Rng(seed_case | 1);
        match r.below(6) {
            0..=3 => {
                let (name, input) = if r.below(2) == 0 {
                    let (name, seed) = &seeds.archives[r.below(seeds.archives.len())];
                    (name.as_str(), mutate(&mut r, seed, true))
                } else {
                    // Inside an archive whose diff_ids match, so the layer itself is read.
                    let mut layers = seeds.layers.clone();
                    let i = r.below(layers.len());
                    layers[i] = mutate(&mut r, &layers[i], true);
                    ("layer", docker_archive(&layers))
                };
                let path = dir.path().join("case.tar");
                fs::write(&path, &input).unwrap();
                let (p, s) = (path.clone(), scratch.clone());
                let got = guarded(&format!("{case} ({name}, seed {seed_case:#x})"), &input, Duration::from_secs(30), move || read_archive(&p, &s));
                for (n, g) in reached.iter_mut().zip(got) {
                    *n += usize::from(g);
                }
                // Now and then the whole command, to check its memory and that nothing is
                // written outside (run-as-root lays the tree out for real).
                if case % 20 == 0 {
                    subprocess_runs += 1;
                    let out = dir.path().join("out.tar");
                    let mut export = Command::new(bin());
                    export.args(["export", "-q", "--compressor", "none", "--from-image"]).arg(&path).arg("-o").arg(&out).arg("--scratch").arg(&scratch);
                    let _ = run(export, None, Duration::from_secs(60));
                    let _ = fs::remove_file(&out);
                    let script = dir.path().join("script.sh");
                    fs::write(&script, "").unwrap();
                    let mut rar = Command::new(bin());
                    rar.args(["run-as-root", "-q", "--shell", "/bin/busybox", "--script"]).arg(&script);
                    rar.arg("--from-image").arg(&path).arg("--out-layer").arg(&out).arg("--scratch").arg(&scratch);
                    let _ = run(rar, None, Duration::from_secs(60));
                    let _ = fs::remove_file(&out);
                }
            }
            4 => {
                let input = mutate(&mut r, &seeds.confs[0], false);
                let now = now.clone();
                let bytes = input.clone();
                guarded(&format!("{case} (conf, seed {seed_case:#x})"), &input, Duration::from_secs(10), move || {
                    if let Ok(v) = stevedore::util::limits::parse_json::<serde_json::Value>(&bytes, stevedore::util::limits::INPUT_VALUES) {
                        let _ = stevedore::image::conf::StreamConf::from_value(v, &now);
                    }
                });
            }
            _ => {
                let input = mutate(&mut r, &seeds.graphs[0], false);
                let bytes = input.clone();
                guarded(&format!("{case} (graph, seed {seed_case:#x})"), &input, Duration::from_secs(10), move || {
                    let _ = stevedore::nixstore::ClosureGraph::parse(&bytes, Default::default());
                });
            }
        }
        let left: Vec<_> = fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "case {case} left {left:?} in the scratch directory");
        let host: Vec<_> = fs::read_dir(&seeds.host).unwrap().collect();
        assert!(host.is_empty(), "case {case} wrote through the image's link to a host directory");
    }
    let hwm = vm_hwm_kib();
    eprintln!(
        "fuzz: {cases} cases ({subprocess_runs} also as commands); archives indexed {}, base images copied {}, trees flattened {}, merged {}; peak RSS of the test process {} MiB",
        reached[0], reached[1], reached[2], reached[3], hwm / 1024
    );
    assert!(hwm < 400 * 1024, "the in-process readers peaked at {} MiB", hwm / 1024);
    let _ = io::stderr().flush();
}
