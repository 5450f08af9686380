//! OCI output: layouts and oci-archives with per-layer gzip/zstd compression.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    fs::read(layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())).unwrap()
}

fn json_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&blob(layout, digest)).unwrap()
}

fn decompress(data: &[u8], media_type: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if media_type.ends_with("+gzip") {
        flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
    } else if media_type.ends_with("+zstd") {
        zstd::stream::read::Decoder::new(data).unwrap().read_to_end(&mut out).unwrap();
    } else {
        out = data.to_vec();
    }
    out
}

/// The fixture image of two store layers: the fixture, the conf (written into `dir`), and the
/// image as a Docker archive.
fn two_layer_image(dir: &Path) -> (PathBuf, PathBuf, Image) {
    let fx = fixture("compat", 8, 30, 0.0);
    let p = store_paths(&fx);
    let conf = write_json(dir, "conf.json", &base_conf(&fx, vec![p[..4].to_vec(), p[4..].to_vec()]));
    let docker = Image::parse(&stream_ok(&conf));
    (fx, conf, docker)
}

#[test]
fn layouts_hold_compressed_layers_that_decompress_to_the_diff_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, conf, docker) = two_layer_image(tmp.path());
    for (compressor, suffix) in [("none", ""), ("gz", "+gzip"), ("zstd", "+zstd"), ("zstd:chunked", "+zstd")] {
        let layout = tmp.path().join(format!("layout-{compressor}"));
        let out = stream(&conf, &["--format", "oci", "--compressor", compressor, "-o", layout.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        // Named as containerd names it: the normalised name, and the tag alone as the OCI
        // spec suggests.
        let annotations = &index["manifests"][0]["annotations"];
        assert_eq!(annotations["io.containerd.image.name"], "docker.io/library/fixture:latest");
        assert_eq!(annotations["org.opencontainers.image.ref.name"], "latest");
        let manifest = json_blob(&layout, index["manifests"][0]["digest"].as_str().unwrap());
        assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        // The config is the Docker archive's, byte for byte: same image ID.
        assert_eq!(blob(&layout, manifest["config"]["digest"].as_str().unwrap()), docker.config_bytes);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        for (i, l) in layers.iter().enumerate() {
            assert_eq!(l["mediaType"], format!("application/vnd.oci.image.layer.v1.tar{suffix}"));
            let data = blob(&layout, l["digest"].as_str().unwrap());
            assert_eq!(data.len() as u64, l["size"].as_u64().unwrap());
            assert_eq!(format!("sha256:{}", sha256_hex(&data)), l["digest"]);
            let plain = decompress(&data, l["mediaType"].as_str().unwrap());
            assert!(plain == docker.layer(i), "{compressor} layer {i} does not decompress to the docker layer");
            if compressor != "none" {
                assert!(data.len() < plain.len());
            }
            // zstd:chunked layers locate their table of contents and tar-split in annotations
            // (the format itself is checked in src/compress/chunked.rs); the others have none.
            let keys: Vec<&str> = l.get("annotations").and_then(Value::as_object).map(|a| a.keys().map(String::as_str).collect()).unwrap_or_default();
            if compressor == "zstd:chunked" {
                assert_eq!(keys, ["io.github.containers.zstd-chunked.manifest-checksum", "io.github.containers.zstd-chunked.manifest-position", "io.github.containers.zstd-chunked.tarsplit-position"]);
            } else {
                assert!(keys.is_empty(), "{compressor}: {keys:?}");
            }
        }
        let inspect: Value = serde_json::from_slice(
            &Command::new("skopeo").args(["inspect", &format!("oci:{}:latest", layout.display())]).output().unwrap().stdout,
        )
        .unwrap_or(Value::Null);
        if inspect != Value::Null {
            assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
        }
    }
}

#[test]
fn oci_archives_are_the_same_bytes_on_one_core_or_all() {
    let fx = fixture("compat", 8, 30, 2.5);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![store_paths(&fx)]));
    for compressor in ["gz", "zstd", "zstd:chunked"] {
        let all = stream(&conf, &["--format", "oci-archive", "--compressor", compressor]);
        assert!(all.status.success(), "{}", String::from_utf8_lossy(&all.stderr));
        let one = Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin())
            .args(["stream", "--format", "oci-archive", "--compressor", compressor])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(one.status.success());
        assert!(all.stdout == one.stdout, "{compressor}: output depends on the number of cores");
        // An oci-archive is the layout as a tar, index.json first among the JSON files, then
        // the Docker manifest.json.
        let names: Vec<String> = members(&all.stdout).into_iter().map(|(n, _)| n).collect();
        assert_eq!(&names[..5], ["oci-layout", "index.json", "manifest.json", "blobs/", "blobs/sha256/"]);
    }
}

/// The member of an oci-archive holding the blob of `digest` (`sha256:<hex>`).
fn blob_member(digest: &Value) -> String {
    format!("blobs/sha256/{}", digest.as_str().unwrap().strip_prefix("sha256:").unwrap())
}

#[test]
fn oci_archives_carry_a_docker_manifest_naming_their_blobs() {
    // As `docker save` writes since Docker 25, so that Docker's classic store (which reads only
    // manifest.json) loads them too: the config and the compressed layer blobs, by member name.
    let tmp = tempfile::tempdir().unwrap();
    let (fx, conf, docker) = two_layer_image(tmp.path());
    let p = store_paths(&fx);
    for (compressor, tag) in [("gz", None), ("zstd", Some("example.org/team/app:v3")), ("none", None)] {
        let mut args = vec!["--format", "oci-archive", "--compressor", compressor];
        args.extend(tag.iter().flat_map(|t| ["-t", *t]));
        let out = stream(&conf, &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let members = members(&out.stdout);
        // nixpkgs' form of manifest.json (as in a Docker archive), Docker's keys in Docker's order.
        let raw = String::from_utf8(member(&members, "manifest.json").to_vec()).unwrap();
        let at = |key: &str| raw.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("no {key} in {raw}"));
        assert!(at("Config") < at("RepoTags") && at("RepoTags") < at("Layers"), "{raw}");
        assert!(raw.starts_with("[\n    {\n        \"Config\": "), "{raw}");
        let manifest: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(manifest.as_array().unwrap().len(), 1);
        let entry = &manifest[0];
        assert_eq!(entry["RepoTags"], serde_json::json!([tag.unwrap_or("fixture:latest")]), "{compressor}");
        // It names what the OCI manifest names, and the archive holds those members.
        let index: Value = serde_json::from_slice(member(&members, "index.json")).unwrap();
        let oci: Value = serde_json::from_slice(member(&members, &blob_member(&index["manifests"][0]["digest"]))).unwrap();
        assert_eq!(entry["Config"], blob_member(&oci["config"]["digest"]));
        let layers: Vec<String> = oci["layers"].as_array().unwrap().iter().map(|l| blob_member(&l["digest"])).collect();
        assert_eq!(entry["Layers"], serde_json::json!(layers));
        // The config is the Docker archive's (same image ID); the layers decompress to its layers.
        assert!(member(&members, entry["Config"].as_str().unwrap()) == docker.config_bytes, "{compressor}: config");
        for (i, l) in oci["layers"].as_array().unwrap().iter().enumerate() {
            let data = member(&members, &layers[i]);
            assert!(decompress(data, l["mediaType"].as_str().unwrap()) == docker.layer(i), "{compressor}: layer {i}");
        }
        // stevedore reads it as the oci-archive it is: `push` of the bare path takes its
        // compressed blobs as they are. With plain layers it is a Docker archive. Either way it
        // serves as a base image, its layers decompressed to what the Docker archive holds.
        let archive = tmp.path().join(format!("oci-{compressor}.tar"));
        fs::write(&archive, &out.stdout).unwrap();
        let source = stevedore::registry::source::Source::parse(archive.to_str().unwrap()).unwrap();
        let is_oci = matches!(source, stevedore::registry::source::Source::OciArchive(..));
        assert_eq!(is_oci, compressor != "none", "{compressor}: read as {}", if is_oci { "an oci-archive" } else { "a Docker archive" });
        let mut base = base_conf(&fx, vec![p[..1].to_vec()]);
        base["from_image"] = Value::from(archive.to_str().unwrap());
        let out = stream(&write_json(tmp.path(), "on-base.json", &base), &[]);
        assert!(out.status.success(), "{compressor}: {}", String::from_utf8_lossy(&out.stderr));
        let on_base = Image::parse(&out.stdout);
        assert_eq!(on_base.layer_count(), 3);
        for i in 0..2 {
            assert!(on_base.layer(i) == docker.layer(i), "{compressor}: base layer {i}");
        }
    }
    // A layout directory has no manifest.json: only archives need one.
    let layout = tmp.path().join("layout");
    assert!(stream(&conf, &["--format", "oci", "-o", layout.to_str().unwrap()]).status.success());
    assert!(!layout.join("manifest.json").exists());
}

/// Every file of a layout directory with its contents, by relative path.
fn layout_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "blobs/sha256"] {
        for e in fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                out.push((format!("{sub}/{}", e.file_name().to_string_lossy()), fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn many_layers_compress_in_parallel_to_the_same_layout_on_any_thread_count() {
    // One layer per store path (small ones, and some of several compression pieces): the
    // layers are compressed side by side, yet 1 and 16 threads write the same files.
    let fx = fixture("compat", 12, 20, 2.5);
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<String>> = store_paths(&fx).into_iter().map(|p| vec![p]).collect();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, layers));
    let docker = Image::parse(&stream_ok(&conf));
    for compressor in ["gz", "zstd", "zstd:chunked", "none"] {
        let mut layouts = Vec::new();
        for threads in ["1", "16"] {
            let layout = tmp.path().join(format!("layout-{compressor}-{threads}"));
            let out = Command::new(bin())
                .env("STEVEDORE_THREADS", threads)
                .args(["stream", "--format", "oci", "--compressor", compressor, "-o"])
                .arg(&layout)
                .arg(&conf)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let files = layout_files(&layout);
            // No temporary files are left, and every layer is there and decompresses right.
            assert!(files.iter().all(|(n, _)| !n.contains(".partial")), "{compressor}: partial files left");
            let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
            let manifest = json_blob(&layout, index["manifests"][0]["digest"].as_str().unwrap());
            let descs = manifest["layers"].as_array().unwrap();
            assert_eq!(descs.len(), 12);
            for (i, l) in descs.iter().enumerate() {
                let plain = decompress(&blob(&layout, l["digest"].as_str().unwrap()), l["mediaType"].as_str().unwrap());
                assert!(plain == docker.layer(i), "{compressor}/{threads}: layer {i} differs");
                if compressor == "gz" {
                    // mkstore's random file contents go in stored blocks: still plain gzip.
                    let path = layout.join("blobs/sha256").join(&l["digest"].as_str().unwrap()[7..]);
                    let t = Command::new("gzip").arg("-t").arg(&path).status().expect("gzip runs");
                    assert!(t.success(), "gzip -t rejects layer {i}");
                }
            }
            layouts.push(files);
        }
        assert!(layouts[0] == layouts[1], "{compressor}: 1 and 16 threads wrote different layouts");
    }
}

/// `dir/layout`, with the images `tagged` (a tag, and per layer the start and end of a run of
/// the fixture's store paths) streamed into it one after another; and the store paths.
fn layout_of(dir: &Path, tagged: &[(&str, &[(usize, usize)])]) -> (PathBuf, Vec<String>) {
    let fx = fixture("compat", 8, 30, 0.0);
    let p = store_paths(&fx);
    let layout = dir.join("layout");
    for (tag, layers) in tagged {
        let conf = write_json(dir, "conf.json", &base_conf(&fx, layers.iter().map(|&(a, b)| p[a..b].to_vec()).collect()));
        let out = stream(&conf, &["--format", "oci", "-q", "-t", tag, "-o", layout.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    (layout, p)
}

#[test]
fn a_layout_collects_several_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, _) = layout_of(tmp.path(), &[("a:1", &[(0, 2)]), ("b:1", &[(0, 2), (2, 3)]), ("a:1", &[(3, 4)])]);
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["annotations"]["io.containerd.image.name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["docker.io/library/b:1", "docker.io/library/a:1"], "re-tagging replaces the old entry, not b's of the same tag");
    // The shared first layer is stored once; the replaced manifest stays as a blob.
    let blobs = fs::read_dir(layout.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 3 + 3 + 3, "3 layers, 3 configs, 3 manifests; got {blobs}");
}

#[test]
fn readers_find_images_by_name_in_new_and_old_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (layout, p) = layout_of(tmp.path(), &[("a:1", &[(0, 2)]), ("b:1", &[(0, 2), (2, 3)])]);
    let old = old_style_copy(&layout, &tmp.path().join("old"));
    let b_only = p[2].trim_start_matches('/').to_string();
    for dir in [&layout, &old] {
        // export --from-image-name takes NAME:TAG, whichever way the index names it; b has a
        // store path a lacks.
        for (name, has_b) in [("a", false), ("b", true), ("docker.io/library/b", true)] {
            let out = tmp.path().join("fs.tar");
            let o = Command::new(bin())
                .args(["export", "-q", "--compressor", "none", "--from-image-name", name, "--from-image-tag", "1", "-o"])
                .arg(&out)
                .arg("--from-image")
                .arg(dir)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}: {name}: {}", dir.display(), String::from_utf8_lossy(&o.stderr));
            let names: Vec<String> = members(&fs::read(&out).unwrap()).into_iter().map(|(n, _)| n).collect();
            assert_eq!(names.iter().any(|n| n.trim_start_matches("./").starts_with(&b_only)), has_b, "{}: {name}", dir.display());
        }
        // Without a name, two images are ambiguous; an unknown name lists the names.
        for (args, said) in [(&[][..], "lists 2 images; name one (names: a:1, b:1)"), (&["--from-image-name", "c"][..], "no image named c:latest (names: a:1, b:1)")] {
            let o = Command::new(bin()).args(["export", "-q", "-o"]).arg(tmp.path().join("x.tar")).arg("--from-image").arg(dir).args(args).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && err.contains(said) && err.lines().count() == 1, "{}: {err}", dir.display());
        }
    }
}

#[test]
fn format_errors() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![store_paths(&fx)]));
    let out = stream(&conf, &["--format", "oci"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--output"));
    let out = stream(&conf, &["--compressor", "gz"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("OCI formats"));
    let out = stream(&conf, &["--format", "oci-archive", "--compressor", "xz"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown compressor"));
}

/// Every blob of a layout hashes to its name; nothing but blobs is in `blobs/sha256`.
fn assert_blobs_intact(layout: &Path) {
    for e in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert_eq!(sha256_hex(&fs::read(e.path()).unwrap()), name, "blob {name} holds other bytes");
    }
}

/// Temporary files or scratch directories left in `dir`.
fn litter(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("stevedore-") || n.contains("partial") || n.contains(".lock"))
        .collect()
}

/// The value of annotation `key` of every entry of a layout's index.
fn annotations(layout: &Path, key: &str) -> Vec<String> {
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"].as_array().unwrap().iter().map(|m| m["annotations"][key].as_str().unwrap().to_string()).collect()
}

#[test]
fn concurrent_writers_into_one_layout_keep_every_tag_and_blob() {
    // Eight processes, each a different tag, at once. All share a first layer (the same blob,
    // written eight times at once); each has one of its own.
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let p = store_paths(&fx);
    let layout = tmp.path().join("layout");
    let children: Vec<(String, std::process::Child)> = (0..8)
        .map(|i| {
            let conf = write_json(tmp.path(), &format!("conf{i}.json"), &base_conf(&fx, vec![p[..2].to_vec(), vec![p[i].clone()]]));
            let tag = format!("name:tag{i}");
            let child = Command::new(bin())
                .args(["stream", "--quiet", "--format", "oci", "-t", &tag, "-o"])
                .arg(&layout)
                .arg(&conf)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (tag, child)
        })
        .collect();
    let mut tags = Vec::new();
    for (tag, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{tag}: {}", String::from_utf8_lossy(&out.stderr));
        tags.push(tag);
    }
    let mut names = annotations(&layout, "io.containerd.image.name");
    names.sort();
    let full: Vec<String> = tags.iter().map(|t| format!("docker.io/library/{t}")).collect();
    assert_eq!(names, full, "every writer's name is in index.json, once");
    // skopeo and umoci find an image by its tag alone (org.opencontainers.image.ref.name).
    let tags: Vec<String> = tags.iter().map(|t| t["name:".len()..].to_string()).collect();
    assert_blobs_intact(&layout);
    assert!(litter(&layout).is_empty(), "left: {:?}", litter(&layout));
    let umoci = Command::new("umoci").args(["ls", "--layout"]).arg(&layout).output().expect("umoci runs");
    assert!(umoci.status.success(), "umoci ls: {}", String::from_utf8_lossy(&umoci.stderr));
    let mut listed: Vec<String> = String::from_utf8(umoci.stdout).unwrap().lines().map(str::to_owned).collect();
    listed.sort();
    assert_eq!(listed, tags);
    for tag in &tags {
        let out = Command::new("skopeo").args(["inspect", &format!("oci:{}:{tag}", layout.display())]).output().expect("skopeo runs");
        assert!(out.status.success(), "skopeo inspect {tag}: {}", String::from_utf8_lossy(&out.stderr));
        let inspect: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2, "{tag}");
    }
}

/// Runs the binary with file writes past `limit_kib` failing (EFBIG, as a full disk fails them).
fn stream_with_file_size_limit(conf: &Path, limit_kib: u32, extra: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {limit_kib}; exec \"$@\""))
        .arg("bash")
        .arg(bin())
        .arg("stream")
        .arg(conf)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_failed_layout_update_leaves_the_old_index() {
    let fx = fixture("compat", 8, 30, 0.0);
    let tmp = tempfile::tempdir().unwrap();
    let p = store_paths(&fx);
    let layout = tmp.path().join("layout");
    let conf = write_json(tmp.path(), "conf.json", &base_conf(&fx, vec![p[..4].to_vec()]));
    let out = stream(&conf, &["--format", "oci", "-t", "keep:1", "-o", layout.to_str().unwrap()]);
    assert!(out.status.success());
    // An index bigger than the limit (more tags of the same image), so that writing a new one
    // fails, but the new image's own blobs (no layers: a config and a manifest) fit.
    let mut index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"][0].clone();
    for i in 0..200 {
        let mut e = entry.clone();
        e["annotations"] = serde_json::json!({"io.containerd.image.name": format!("docker.io/library/keep:pad{i}"), "org.opencontainers.image.ref.name": format!("pad{i}")});
        index["manifests"].as_array_mut().unwrap().push(e);
    }
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let old = fs::read(layout.join("index.json")).unwrap();
    assert!(old.len() > 32 * 1024);
    let empty = write_json(tmp.path(), "empty.json", &base_conf(&fx, vec![]));
    for (conf, what) in [(&empty, "index.json"), (&conf, "a layer blob")] {
        let out = stream_with_file_size_limit(conf, 16, &["--format", "oci", "-t", "new:1", "-o", layout.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "failing on {what}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert!(last.starts_with("stevedore: ") && last.contains("too large"), "failing on {what}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(fs::read(layout.join("index.json")).unwrap() == old, "failing on {what}: the old index.json changed");
        assert!(litter(&layout).is_empty(), "failing on {what}: left {:?}", litter(&layout));
        assert_blobs_intact(&layout);
    }
    let inspect = Command::new("skopeo").args(["inspect", &format!("oci:{}:1", layout.display())]).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
}
