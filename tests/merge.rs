//! `stevedore merge`: several images in one Docker archive.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn merge(args: &[&Path]) -> Output {
    Command::new(bin()).arg("merge").args(args).output().expect("stevedore runs")
}

/// An executable that streams the image of `conf`, as streamLayeredImage's result does.
fn stream_script(dir: &Path, name: &str, conf: &Path) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\nexec '{}' stream '{}' \"$@\"\n", bin().display(), conf.display())).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The layers of image `i` of a merged archive, by its manifest.
fn layers_of(members: &[(String, Vec<u8>)], manifest: &Value, i: usize) -> Vec<Vec<u8>> {
    manifest[i]["Layers"].as_array().unwrap().iter().map(|l| member(members, l.as_str().unwrap()).to_vec()).collect()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    a: Vec<u8>,
    b: Vec<u8>,
    c: Vec<u8>,
    /// a gzipped, b zstd-compressed, c as a stream executable.
    inputs: Vec<PathBuf>,
}

/// Three images streamed apart, so each calls its layers `1/layer.tar`, `2/layer.tar`: a and b
/// share their first layer, c has the same store paths as a in one layer.
fn three_images() -> Fixture {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let p = store_paths(&fx);
    let mut conf_a = base_conf(&fx, vec![p[..2].to_vec(), p[2..5].to_vec()]);
    conf_a["repo_tag"] = json!("registry.example:5000/a:1");
    let mut conf_b = base_conf(&fx, vec![p[..2].to_vec(), p[5..].to_vec()]);
    conf_b["repo_tag"] = json!("b:1");
    conf_b["config"] = json!({"Cmd": ["/bin/b"]});
    let mut conf_c = base_conf(&fx, vec![p[..5].to_vec()]);
    conf_c["repo_tag"] = json!("c:latest");
    let a = stream_ok(&write_json(tmp.path(), "a.json", &conf_a));
    let b = stream_ok(&write_json(tmp.path(), "b.json", &conf_b));
    let c_conf = write_json(tmp.path(), "c.json", &conf_c);
    let c = stream_ok(&c_conf);
    let a_path = tmp.path().join("a.tar.gz");
    fs::write(&a_path, compress(&a, "gzip")).unwrap();
    let b_path = tmp.path().join("b.tar.zst");
    fs::write(&b_path, compress(&b, "zstd")).unwrap();
    let c_path = stream_script(tmp.path(), "stream-c", &c_conf);
    Fixture { _tmp: tmp, a, b, c, inputs: vec![a_path, b_path, c_path] }
}

#[test]
fn merges_images_with_colliding_layer_names_and_shares_layers() {
    let f = three_images();
    let inputs: Vec<&Path> = f.inputs.iter().map(PathBuf::as_path).collect();
    let out = merge(&inputs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let members = members(&out.stdout);
    let manifest: Value = serde_json::from_slice(member(&members, "manifest.json")).unwrap();
    assert_eq!(manifest.as_array().unwrap().len(), 3);

    let originals = [Image::parse(&f.a), Image::parse(&f.b), Image::parse(&f.c)];
    // Both inputs had a `2/layer.tar`, with different contents.
    assert_ne!(originals[0].layer(1), originals[1].layer(1));
    for (i, orig) in originals.iter().enumerate() {
        let entry = &manifest[i];
        assert_eq!(entry["RepoTags"], orig.manifest[0]["RepoTags"], "image {i}");
        // Config bytes unchanged (same image ID), named by their digest.
        let config_name = entry["Config"].as_str().unwrap();
        assert_eq!(config_name, format!("{}.json", sha256_hex(&orig.config_bytes)));
        assert_eq!(member(&members, config_name), orig.config_bytes.as_slice());
        // The same layers, named by content, in the same order.
        let layers = layers_of(&members, &manifest, i);
        assert_eq!(layers.len(), orig.layer_count());
        for (k, layer) in layers.iter().enumerate() {
            assert!(layer.as_slice() == orig.layer(k), "image {i} layer {k}");
            assert_eq!(entry["Layers"][k], format!("{}/layer.tar", sha256_hex(layer)));
            assert_eq!(orig.config["rootfs"]["diff_ids"][k], format!("sha256:{}", sha256_hex(layer)));
        }
    }
    // a and b share their first layer: one copy. Every member name appears once.
    assert_eq!(manifest[0]["Layers"][0], manifest[1]["Layers"][0]);
    let layer_members = members.iter().filter(|(n, _)| n.ends_with("/layer.tar")).count();
    assert_eq!(layer_members, 4);
    let mut names: Vec<&String> = members.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), members.len());
    // The legacy tag index.
    let repos: Value = serde_json::from_slice(member(&members, "repositories")).unwrap();
    let id = |i: usize| sha256_hex(&originals[i].config_bytes);
    assert_eq!(
        repos,
        json!({"registry.example:5000/a": {"1": id(0)}, "b": {"1": id(1)}, "c": {"latest": id(2)}})
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Running ") && err.contains("4 distinct layer(s)"), "{err}");
}

#[test]
fn output_is_deterministic_and_written_whole() {
    let f = three_images();
    let inputs: Vec<&Path> = f.inputs.iter().map(PathBuf::as_path).collect();
    let first = merge(&inputs);
    assert!(first.status.success());
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("merged.tar");
    let out = Command::new(bin()).arg("merge").args(&inputs).arg("-o").arg(&out_path).arg("-q").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
    assert!(fs::read(&out_path).unwrap() == first.stdout, "file and stdout differ");
    // Nothing but the output is left next to it (the spooled stream is gone).
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    assert_eq!(first.stdout.len() % 10240, 0);

    // A merged archive is an input like any other: its images come along, layers still shared.
    let again = Command::new(bin()).arg("merge").arg(&out_path).arg(&f.inputs[1]).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let members2 = members(&again.stdout);
    let manifest2: Value = serde_json::from_slice(member(&members2, "manifest.json")).unwrap();
    assert_eq!(manifest2.as_array().unwrap().len(), 4);
    assert_eq!(manifest2[3], manifest2[1]);
    assert_eq!(members2.iter().filter(|(n, _)| n.ends_with("/layer.tar")).count(), 4);
    let err = String::from_utf8(again.stderr).unwrap();
    assert!(err.contains("warning: b:1 names more than one image"), "{err}");
}

#[test]
fn broken_inputs_give_one_line_errors_naming_the_input() {
    let f = three_images();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = &f.inputs[0];

    let text = d.join("notes.txt");
    fs::write(&text, "not an image at all, just some text that is long enough").unwrap();
    let truncated = d.join("truncated.tar.gz");
    let gz = fs::read(good).unwrap();
    fs::write(&truncated, &gz[..gz.len() / 2]).unwrap();
    let no_manifest = d.join("no-manifest.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "config.json", &b"{}"[..]).unwrap();
    fs::write(&no_manifest, b.into_inner().unwrap()).unwrap();
    let missing_layer = d.join("missing-layer.tar");
    let mut b = tar::Builder::new(Vec::new());
    let manifest = br#"[{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["1/layer.tar"]}]"#;
    for (name, data) in [("c.json", &b"{}"[..]), ("manifest.json", &manifest[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    fs::write(&missing_layer, b.into_inner().unwrap()).unwrap();
    // A tag no loader would take (and that would name a file outside a `repositories` tree).
    let bad_tag = d.join("bad-tag.tar");
    let mut b = tar::Builder::new(Vec::new());
    let manifest = br#"[{"Config": "c.json", "RepoTags": ["ok:1", "../x:1"], "Layers": []}]"#;
    for (name, data) in [("c.json", &b"{}"[..]), ("manifest.json", &manifest[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    fs::write(&bad_tag, b.into_inner().unwrap()).unwrap();
    let failing = d.join("failing-stream");
    fs::write(&failing, "#!/bin/sh\necho oops >&2\nexit 3\n").unwrap();
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
    let absent = d.join("absent.tar");

    let cases: [(&Path, &str); 7] = [
        (&text, "not a valid tar archive"),
        (&truncated, "truncated"),
        (&no_manifest, "it has no member \"manifest.json\""),
        (&missing_layer, "it has no member \"1/layer.tar\""),
        (&bad_tag, "manifest.json, image 1: invalid image reference \"../x:1\": path component \"..\""),
        (&failing, "the stream executable failed (exit status: 3)"),
        (&absent, "cannot open"),
    ];
    let out_path = d.join("out.tar");
    for (input, needle) in cases {
        let out = Command::new(bin()).arg("merge").arg(good).arg(input).arg("-o").arg(&out_path).output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line = err.lines().find(|l| l.starts_with("stevedore:")).unwrap_or_else(|| panic!("no error line in {err}"));
        assert!(line.contains(&input.display().to_string()), "{line}");
        assert!(line.contains(needle), "expected {needle:?} in {line:?}");
        assert_eq!(err.lines().filter(|l| l.starts_with("stevedore:")).count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_path.exists(), "a partial output was left for {}", input.display());
    }
    assert_eq!(fs::read_dir(d).unwrap().count(), 6, "scratch files were left behind");
}
