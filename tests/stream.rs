//! `stevedore stream`: byte-for-byte compatibility, base images, errors.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

fn three_layers(fixture: &Path) -> Vec<Vec<String>> {
    let p = store_paths(fixture);
    vec![p[..2].to_vec(), p[2..5].to_vec(), p[5..].to_vec()]
}

#[test]
fn store_layers_are_byte_identical_to_python_tarfile() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let layers = three_layers(&fx);
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, layers.clone()));
    let img = Image::parse(&stream_ok(&conf));
    assert_eq!(img.layer_count(), 3);
    for (i, paths) in layers.iter().enumerate() {
        let ours = img.layer(i);
        let reference = oracle_layer(paths, 0, 0, "root", "root", 1);
        assert!(ours == reference.as_slice(), "layer {i} differs from CPython's tarfile");
        assert_eq!(img.config["rootfs"]["diff_ids"][i], format!("sha256:{}", sha256_hex(ours)));
    }
}

#[test]
fn owner_and_mtime_follow_the_conf() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let paths = store_paths(&fx)[3..5].to_vec();
    let mut conf = base_conf(&fx, vec![paths.clone()]);
    conf["uid"] = json!(1000);
    conf["gid"] = json!("100");
    conf["uname"] = json!("a-rather-long-user-name-over-32-chars");
    conf["gname"] = json!("usérs");
    conf["mtime"] = json!("2024-05-01T12:00:00+02:00");
    let conf = write_json(tmp.path(), "conf.json", &conf);
    let img = Image::parse(&stream_ok(&conf));
    let reference = oracle_layer(&paths, 1000, 100, "a-rather-long-user-name-over-32-chars", "usérs", 1714557600);
    assert!(img.layer(0) == reference.as_slice());
    let mut a = tar::Archive::new(img.layer(0));
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().uid().unwrap(), 1000);
        assert_eq!(e.header().mtime().unwrap(), 1714557600);
    }
}

/// Digests worked out once from the rules (and the Python oracle) for the fixed fixture at
/// /tmp/stevedore-test-fixtures/golden-6-12-0: if one changes, layers no longer match nixpkgs'.
#[test]
fn golden_digests() {
    let fx = fixture("golden", 6, 12, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let p = store_paths(&fx);
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![p[..3].to_vec(), p[3..].to_vec()]));
    let img = Image::parse(&stream_ok(&conf));
    let ids: Vec<&str> = img.config["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ids, GOLDEN_DIFF_IDS);
    assert_eq!(sha256_hex(&img.config_bytes), GOLDEN_CONFIG);
}

const GOLDEN_DIFF_IDS: [&str; 2] = [
    "sha256:c235a67ca66b2c4c2f3a638bf0a864ed9457c0990b18baf5986fa272883860b4",
    "sha256:78d90a046654079a2655675965f989775afc4fe60cee9b324c1f4c1110acb56e",
];
const GOLDEN_CONFIG: &str = "ee6f3d300c15a7e1e6a87d357ae52df8a866f0d15add97e23b9bd1bd8e16d931";

/// A hand-made store with every awkward case tar has.
fn awkward_store(root: &Path) -> Vec<String> {
    let store = root.join("store");
    let a = store.join("0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-awkward");
    fs::create_dir_all(a.join("empty")).unwrap();
    fs::create_dir_all(a.join("d".repeat(99))).unwrap(); // 99 + "/" fits the name field...
    fs::create_dir_all(a.join("e".repeat(100))).unwrap(); // ...100 + "/" does not
    fs::create_dir_all(a.join("x").join("y".repeat(200))).unwrap();
    fs::write(a.join("x").join("y".repeat(200)).join("z".repeat(250)), b"deep").unwrap();
    fs::write(a.join("zero"), b"").unwrap();
    fs::write(a.join("block"), vec![7u8; 512]).unwrap();
    fs::write(a.join("block+1"), vec![8u8; 513]).unwrap();
    fs::write(a.join("naïve-日本語-ü"), b"utf8").unwrap();
    {
        use std::os::unix::ffi::OsStrExt;
        fs::write(a.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9")), b"raw bytes name").unwrap();
    }
    // Sorting by components differs from sorting strings: "a/b" comes before "a-b" ('/' > '-').
    fs::create_dir_all(a.join("s/a")).unwrap();
    fs::write(a.join("s/a/b"), b"1").unwrap();
    fs::write(a.join("s/a-b"), b"2").unwrap();
    fs::write(a.join("s/a.b"), b"3").unwrap();
    fs::write(a.join("s/A"), b"4").unwrap();
    fs::write(a.join(".hidden"), b"dot").unwrap();
    fs::write(a.join("exec"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(a.join("exec"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::write(a.join("setuid"), b"s").unwrap();
    fs::set_permissions(a.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(a.join("block"), a.join("hardlink-to-block")).unwrap();
    fs::hard_link(a.join("block"), a.join("s/another-hardlink")).unwrap();
    symlink("zero", a.join("rel-link")).unwrap();
    symlink("/".to_string() + &"t".repeat(150), a.join("long-target-link")).unwrap();
    symlink("ünïcode-target", a.join("unicode-target-link")).unwrap();
    symlink("dangling/nowhere", a.join("dangling")).unwrap();
    symlink("s", a.join("dir-link")).unwrap();
    nix::unistd::mkfifo(&a.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    // A store path that is a symlink, and one that is a single file.
    let l = store.join("1lllllllllllllllllllllllllllllll-link");
    symlink(&a, &l).unwrap();
    let f = store.join("2fffffffffffffffffffffffffffffff-file.txt");
    fs::write(&f, b"a single-file store path\n").unwrap();
    vec![a, l, f].into_iter().map(|p| p.to_str().unwrap().to_string()).collect()
}

#[test]
fn awkward_names_links_and_modes_match_python() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = awkward_store(tmp.path());
    let mut conf = base_conf(tmp.path(), vec![paths.clone(), vec![paths[2].clone()]]);
    conf["store_dir"] = json!(tmp.path().join("store").to_str().unwrap());
    let conf = write_json(tmp.path(), "conf.json", &conf);
    let img = Image::parse(&stream_ok(&conf));
    assert!(img.layer(0) == oracle_layer(&paths, 0, 0, "root", "root", 1).as_slice(), "awkward layer differs");
    assert!(img.layer(1) == oracle_layer(&paths[2..], 0, 0, "root", "root", 1).as_slice());
    // Hard links come out as regular files with their contents.
    let names: Vec<(String, u64, tar::EntryType)> = tar::Archive::new(img.layer(0))
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (String::from_utf8_lossy(&e.path_bytes()).into_owned(), e.size(), e.header().entry_type())
        })
        .collect();
    let hl = names.iter().find(|(n, _, _)| n.ends_with("/hardlink-to-block")).unwrap();
    assert_eq!((hl.1, hl.2), (512, tar::EntryType::Regular));
    // Component order: s/A, s/a/, s/a/b, s/a-b, s/a.b
    let s: Vec<&str> = names.iter().filter_map(|(n, _, _)| n.split_once("-awkward/s/").map(|x| x.1)).collect();
    assert_eq!(s, ["", "A", "a/", "a/b", "a-b", "a.b", "another-hardlink"]);
}

#[test]
fn output_is_deterministic_across_environments() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, three_layers(&fx)));
    let first = stream_ok(&conf);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 077; exec {} stream {}", bin().display(), conf.display()))
        .env("TZ", "Pacific/Kiritimati")
        .env("LC_ALL", "tr_TR.UTF-8")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(first == out.stdout, "output changed with umask/TZ/locale");
}

#[test]
fn stream_remembers_diff_ids_for_push_and_load_but_not_inside_a_nix_build() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, three_layers(&fx)));
    let cache = tmp.path().join("cache");
    let run = |env: &[(&str, &Path)]| {
        let out = Command::new(bin()).arg("stream").arg(&conf).env("XDG_CACHE_HOME", &cache).envs(env.iter().copied()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let file = cache.join("stevedore/layer-digests");
    run(&[("NIX_BUILD_TOP", tmp.path())]);
    assert!(!cache.exists(), "a stream inside a Nix build wrote the digest cache");
    let image = Image::parse(&run(&[]));
    let remembered: Vec<String> = fs::read_to_string(&file).unwrap().lines().map(|l| l.split(' ').nth(1).unwrap().to_string()).collect();
    let diff_ids: Vec<String> = image.config["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    assert_eq!(remembered, diff_ids);
    run(&[]);
    assert_eq!(fs::read_to_string(&file).unwrap().lines().count(), 3, "a second stream added entries again");
}

#[test]
fn repo_tag_override_and_progress_lines() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, three_layers(&fx)));
    for flag in ["-t", "--repo_tag", "--repo-tag"] {
        let out = stream(&conf, &[flag, "registry.example/team/app:v1"]);
        assert!(out.status.success());
        let img = Image::parse(&out.stdout);
        assert_eq!(img.manifest[0]["RepoTags"], json!(["registry.example/team/app:v1"]));
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("No 'fromImage' provided\nCreating layer 1 from paths: ['"), "{err}");
        assert!(err.contains("Adding manifests...\n") && err.ends_with("Done.\n"), "{err}");
    }
    // A registry with a port, as nixpkgs names allow; a name without a tag is NAME:latest
    // (Docker and podman refuse an untagged RepoTags entry).
    for (tag, written) in [("registry.example.com:5000/a/b:tag", "registry.example.com:5000/a/b:tag"), ("app", "app:latest"), ("localhost:5000/app", "localhost:5000/app:latest")] {
        let out = stream(&conf, &["-t", tag]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(Image::parse(&out.stdout).manifest[0]["RepoTags"], json!([written]));
    }
    for bad in ["app:v1\n", "a/../b:v1", "App:v1", "app:", ""] {
        let out = stream(&conf, &["-t", bad]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(out.stdout.is_empty(), "wrote output despite: {err}");
        assert!(err.starts_with(&format!("stevedore: --repo_tag: invalid image reference {bad:?}: ")), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

fn customisation_layer(dir: &Path) -> std::path::PathBuf {
    let c = dir.join("custom");
    fs::create_dir_all(&c).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "./etc/motd", &b"hello\n"[..]).unwrap();
    let data = b.into_inner().unwrap();
    fs::write(c.join("layer.tar"), &data).unwrap();
    fs::write(c.join("checksum"), sha256_hex(&data) + "\n").unwrap();
    c
}

#[test]
fn customisation_layer_comes_last_and_is_checked() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let custom = customisation_layer(tmp.path());
    let mut conf = base_conf(&fx, three_layers(&fx));
    conf["customisation_layer"] = json!(custom);
    let conf_path = write_json(tmp.path(), "conf.json", &conf);
    let img = Image::parse(&stream_ok(&conf_path));
    assert_eq!(img.layer_count(), 4);
    assert_eq!(img.layer(3), fs::read(custom.join("layer.tar")).unwrap());
    let history = img.config["history"].as_array().unwrap();
    assert_eq!(history[3]["comment"], format!("store paths: ['{}']", custom.display()));

    // A checksum that does not match the layer is an error, and no manifest is written.
    fs::write(custom.join("checksum"), "0".repeat(64)).unwrap();
    let out = stream(&conf_path, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("checksum file says"), "{err}");
    assert!(!members(&out.stdout).iter().any(|(n, _)| n == "manifest.json"));

    fs::write(custom.join("checksum"), "not a checksum").unwrap();
    let out = stream(&conf_path, &[]);
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8(out.stderr).unwrap().contains("not a sha256 hex digest"));
}

#[test]
fn empty_image_and_empty_layers() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![]));
    let img = Image::parse(&stream_ok(&conf));
    assert_eq!(img.layer_count(), 0);
    assert_eq!(img.config["rootfs"]["diff_ids"], json!([]));
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![vec![]]));
    let img = Image::parse(&stream_ok(&conf));
    assert!(img.layer(0) == oracle_layer(&[], 0, 0, "root", "root", 1).as_slice());
}

#[test]
fn from_image_chains_layers_and_merges_env() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let p = store_paths(&fx);
    let base_archive = stream_ok(&write_json(tmp.path(), "base.json", &base_conf(&fx, vec![p[..3].to_vec(), p[3..5].to_vec()])));
    let base = Image::parse(&base_archive);
    for how in ["plain", "gzip", "zstd"] {
        let base_path = tmp.path().join(format!("base.tar.{how}"));
        fs::write(&base_path, compress(&base_archive, how)).unwrap();
        let mut conf = base_conf(&fx, vec![p[5..].to_vec()]);
        conf["from_image"] = json!(base_path);
        conf["config"] = json!({"Env": ["LANG=de_DE.UTF-8", "NEW=1"], "Cmd": ["/bin/app"]});
        let out = stream(&write_json(tmp.path(), "conf.json", &conf), &[]);
        assert!(out.status.success(), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        let img = Image::parse(&out.stdout);
        assert_eq!(img.layer_count(), 3, "{how}");
        assert_eq!(img.layer(0), base.layer(0));
        assert_eq!(img.layer(1), base.layer(1));
        let ids = &img.config["rootfs"]["diff_ids"];
        assert_eq!(ids[0], base.config["rootfs"]["diff_ids"][0]);
        assert_eq!(ids[2], format!("sha256:{}", sha256_hex(img.layer(2))));
        assert_eq!(img.config["config"]["Env"], json!(["PATH=/bin", "LANG=de_DE.UTF-8", "NEW=1"]));
        assert_eq!(img.config["history"][0]["comment"], "store paths: ['1/layer.tar']");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("Adding base layer 1 from 1/layer.tar\nAdding base layer 2 from 2/layer.tar\nCreating layer 3 from"), "{err}");
        // The result can be a base again.
        let again = tmp.path().join("again.tar");
        fs::write(&again, &out.stdout).unwrap();
        let mut conf2 = base_conf(&fx, vec![]);
        conf2["from_image"] = json!(again);
        let img2 = Image::parse(&stream_ok(&write_json(tmp.path(), "conf2.json", &conf2)));
        assert_eq!(img2.layer_count(), 3);
        assert_eq!(img2.layer(2), img.layer(2));
    }
}

fn expect_error(conf: &Value, dir: &Path, needle: &str) {
    let path = write_json(dir, "bad.json", conf);
    let out = stream(&path, &[]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "wrote output despite: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert_eq!(err.trim_end().lines().filter(|l| l.starts_with("stevedore:")).count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = store_paths(&fx);
    let store = fx.join("store");

    let mut c = base_conf(&fx, vec![vec![format!("{}/00000000000000000000000000000000-missing", store.display())]]);
    expect_error(&c, d, "does not exist");
    c = base_conf(&fx, vec![vec!["/etc/passwd".into()]]);
    expect_error(&c, d, "is not inside the store directory");
    c = base_conf(&fx, vec![p.clone()]);
    c["uid"] = json!(-1);
    expect_error(&c, d, "field 'uid'");
    c = base_conf(&fx, vec![p.clone()]);
    c["store_layers"] = json!("oops");
    expect_error(&c, d, "field 'store_layers'");
    c = base_conf(&fx, vec![p.clone()]);
    c["created"] = json!("last tuesday");
    expect_error(&c, d, "field 'created'");
    c = base_conf(&fx, vec![p.clone()]);
    c.as_object_mut().unwrap().remove("repo_tag");
    expect_error(&c, d, "field 'repo_tag' is missing");
    // Docker's reference grammar, with the reference escaped onto the one line.
    for (tag, why) in [
        ("app:v1\nX-Injected: 1", "it contains whitespace or a control character"),
        ("../../etc/app:v1", "path component \"..\""),
        ("Team/App:v1", "the repository name must be lowercase"),
        ("app:v1@sha256:0000000000000000000000000000000000000000000000000000000000000000", "a digest"),
    ] {
        c = base_conf(&fx, vec![p.clone()]);
        c["repo_tag"] = json!(tag);
        expect_error(&c, d, &format!("field 'repo_tag': invalid image reference {tag:?}: {why}"));
    }
    // nixpkgs always writes store_layers; without it (and no closure_graph) nothing says what to stream.
    c = base_conf(&fx, vec![p.clone()]);
    c.as_object_mut().unwrap().remove("store_layers");
    expect_error(&c, d, "field 'store_layers' is missing");
    c["store_layers"] = json!(null);
    expect_error(&c, d, "field 'store_layers': expected a list of layers, got null");
    c = base_conf(&fx, vec![p.clone()]);
    c["customisation_layer"] = json!(d.join("nowhere"));
    expect_error(&c, d, "nowhere/checksum");

    // Broken base images: not an archive, no manifest, a manifest naming a missing layer.
    let garbage = d.join("garbage.tar");
    fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    c = base_conf(&fx, vec![p.clone()]);
    c["from_image"] = json!(garbage);
    expect_error(&c, d, "base image");
    let mut b = tar::Builder::new(Vec::new());
    let manifest = br#"[{"Config": "c.json", "Layers": ["gone/layer.tar"]}]"#;
    let mut h = tar::Header::new_ustar();
    h.set_size(manifest.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", &manifest[..]).unwrap();
    let config = br#"{"rootfs": {"diff_ids": []}}"#;
    h.set_size(config.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "c.json", &config[..]).unwrap();
    fs::write(&garbage, b.into_inner().unwrap()).unwrap();
    expect_error(&c, d, "1 layers but the config has 0 diff_ids");
    fs::write(&garbage, compress(b"not a tar at all", "gzip")).unwrap();
    expect_error(&c, d, "base image");
    // OCI images are told apart from broken archives.
    let mut b = tar::Builder::new(Vec::new());
    let layout = br#"{"imageLayoutVersion": "1.0.0"}"#;
    let mut h = tar::Header::new_ustar();
    h.set_size(layout.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "oci-layout", &layout[..]).unwrap();
    fs::write(&garbage, b.into_inner().unwrap()).unwrap();
    expect_error(&c, d, "neither a Docker archive (no manifest.json) nor an OCI archive (no index.json)");
    c["from_image"] = json!(d);
    expect_error(&c, d, "index.json");

    // Not JSON at all.
    let bad = d.join("notjson.json");
    fs::write(&bad, "{ this is not json").unwrap();
    let out = stream(&bad, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("notjson.json: not valid JSON"));
}

#[test]
fn unreadable_file_is_an_error_before_output() {
    if !nix::unistd::geteuid().is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("needs root and setpriv to run as another user; skipped");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let store = tmp.path().join("store");
    let sp = store.join("3sssssssssssssssssssssssssssssss-secret");
    fs::create_dir_all(&sp).unwrap();
    fs::write(sp.join("secret"), b"x").unwrap();
    fs::set_permissions(sp.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let mut conf = base_conf(tmp.path(), vec![vec![sp.to_str().unwrap().into()]]);
    conf["store_dir"] = json!(store);
    let conf = write_json(tmp.path(), "conf.json", &conf);
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .arg("stream")
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read") && err.contains("secret"), "{err}");
}

#[test]
fn closed_stdout_stops_cleanly() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, three_layers(&fx)));
    let mut child = Command::new(bin())
        .arg("stream")
        .arg(&conf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(err.contains("closed the output"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn output_file_is_written_whole_or_not_at_all() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, three_layers(&fx)));
    let target = tmp.path().join("image.tar");
    let out = stream(&conf, &["-o", target.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(fs::read(&target).unwrap(), stream_ok(&conf));
    let mut bad = base_conf(&fx, three_layers(&fx));
    bad["customisation_layer"] = json!(tmp.path().join("missing"));
    let bad = write_json(tmp.path(), "bad.json", &bad);
    let target2 = tmp.path().join("image2.tar");
    assert!(!stream(&bad, &["-o", target2.to_str().unwrap()]).status.success());
    assert!(!target2.exists());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("partial")).count(), 0);
}

#[test]
fn created_now_leaves_layers_alone() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let mut conf = base_conf(&fx, three_layers(&fx));
    let fixed = Image::parse(&stream_ok(&write_json(tmp.path(), "a.json", &conf)));
    conf["created"] = json!("now");
    let now = Image::parse(&stream_ok(&write_json(tmp.path(), "b.json", &conf)));
    assert_eq!(fixed.config["rootfs"], now.config["rootfs"]);
    let created = now.config["created"].as_str().unwrap();
    assert!(created.starts_with("20") && created.ends_with("+00:00"), "{created}");
}

#[test]
fn a_closure_graph_is_planned_like_stevedore_layers() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let graph_file = fx.join("closure.json");
    for (strategy, max_layers) in [("popularity", 4), ("auto", 5), ("dominator", 3)] {
        let planned = Command::new(bin())
            .args(["layers", "-q", "--strategy", strategy, "--max-layers", &max_layers.to_string()])
            .arg(&graph_file)
            .output()
            .unwrap();
        assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));
        let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
        // The graph by file name, and inline.
        for graph in [json!(graph_file), serde_json::from_slice(&fs::read(&graph_file).unwrap()).unwrap()] {
            let mut conf = base_conf(&fx, vec![]);
            conf.as_object_mut().unwrap().remove("store_layers");
            conf["closure_graph"] = graph;
            conf["layering"] = json!(strategy);
            conf["max_layers"] = json!(max_layers);
            let img = Image::parse(&stream_ok(&write_json(tmp.path(), "conf.json", &conf)));
            let comments: Vec<String> = img.config["history"].as_array().unwrap().iter().map(|h| h["comment"].as_str().unwrap().to_string()).collect();
            let expected: Vec<String> = planned
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    let paths: Vec<String> = l.as_array().unwrap().iter().map(|p| format!("'{}'", p.as_str().unwrap())).collect();
                    format!("store paths: [{}]", paths.join(", "))
                })
                .collect();
            assert_eq!(comments, expected, "{strategy}");
            assert!(img.layer_count() < max_layers);
        }
    }
    // Both at once is an error, and so is a budget with no room for store paths.
    let mut conf = base_conf(&fx, vec![store_paths(&fx)]);
    conf["closure_graph"] = json!(graph_file);
    expect_error(&conf, tmp.path(), "either 'store_layers' or 'closure_graph'");
    let mut conf = base_conf(&fx, vec![]);
    conf.as_object_mut().unwrap().remove("store_layers");
    conf["closure_graph"] = json!(graph_file);
    conf["max_layers"] = json!(1);
    expect_error(&conf, tmp.path(), "maxLayers 1 is too low");
}
