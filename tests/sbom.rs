//! `stevedore sbom`: CycloneDX and SPDX documents of an image's closure, from a conf with a
//! closure graph, the Nix database, or a graph alone.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn sbom(args: &[&str], cache: &Path) -> Output {
    Command::new(bin()).arg("sbom").args(args).env("XDG_CACHE_HOME", cache).output().unwrap()
}

fn ok(out: Output) -> Value {
    assert!(out.status.success(), "sbom failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn props(c: &Value) -> Vec<(String, String)> {
    c["properties"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap().into(), p["value"].as_str().unwrap().into())).collect()
}

#[test]
fn cyclonedx_lists_every_store_path_with_its_layer_and_references() {
    let fx = fixture("sbom", 8, 20, 0.0);
    let dir = tempfile::tempdir().unwrap();
    let paths = store_paths(&fx);
    let layers = vec![paths[..3].to_vec(), paths[3..].to_vec()];
    let conf = write_json(dir.path(), "conf.json", &base_conf(&fx, layers.clone()));
    let graph = fx.join("closure.json");
    let packages = write_json(dir.path(), "packages.json", &json!([{"path": paths[7], "license": [{"spdxId": "MIT", "fullName": "MIT License"}], "homepage": "https://example.org", "description": "the app"}]));
    let cache = dir.path().join("cache");
    let args = [conf.to_str().unwrap(), "--graph", graph.to_str().unwrap(), "--packages", packages.to_str().unwrap()];
    let out = sbom(&args, &cache);
    let doc = ok(out);
    assert_eq!(doc["bomFormat"], "CycloneDX");
    assert_eq!(doc["specVersion"], "1.6");
    assert_eq!(doc["metadata"]["component"]["name"], "fixture");
    let comps = doc["components"].as_array().unwrap();
    let mut want = paths.clone();
    want.sort();
    let got: Vec<&str> = comps.iter().map(|c| c["bom-ref"].as_str().unwrap()).collect();
    assert_eq!(got, want);

    // Layer diff_ids are those of the streamed image.
    let image = Image::parse(&stream_ok(&conf));
    let diff_ids = image.config["rootfs"]["diff_ids"].as_array().unwrap().clone();
    let closure: Value = serde_json::from_slice(&fs::read(&graph).unwrap()).unwrap();
    for c in comps {
        let path = c["bom-ref"].as_str().unwrap();
        let p = props(c);
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let layer = layers.iter().position(|l| l.iter().any(|x| x == path)).unwrap();
        assert_eq!(get("stevedore:layer:diff_id").as_deref(), diff_ids[layer].as_str());
        let info = closure.as_array().unwrap().iter().find(|i| i["path"] == path).unwrap();
        assert_eq!(get("nix:narinfo:nar_hash").as_deref(), info["narHash"].as_str());
        assert_eq!(get("nix:narinfo:nar_size"), Some(info["narSize"].to_string()));
        assert_eq!(get("nix:store_path").as_deref(), Some(path));
        let deps = doc["dependencies"].as_array().unwrap().iter().find(|d| d["ref"] == path).unwrap();
        let mut refs: Vec<&str> = info["references"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).filter(|r| *r != path).collect();
        refs.sort();
        assert_eq!(deps["dependsOn"], json!(refs));
    }
    let app = comps.iter().find(|c| c["bom-ref"] == paths[7].as_str()).unwrap();
    assert_eq!((&app["type"], &app["licenses"][0]["license"]["id"], &app["description"]), (&json!("application"), &json!("MIT"), &json!("the app")));

    // The same bytes again, with the digests now from the cache, and in another environment.
    let again = Command::new(bin()).arg("sbom").args(args).env("XDG_CACHE_HOME", &cache).env("TZ", "Asia/Kathmandu").env("LC_ALL", "tr_TR.UTF-8").output().unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&again.stdout).unwrap(), doc);
    assert_eq!(again.stdout, sbom(&args, &cache).stdout);
}

#[test]
fn spdx_and_the_nix_database_and_a_bare_graph() {
    let fx = fixture("sbom", 8, 20, 0.0);
    let dir = tempfile::tempdir().unwrap();
    let paths = store_paths(&fx);
    let conf = write_json(dir.path(), "conf.json", &base_conf(&fx, vec![paths.clone()]));
    let cache = dir.path().join("cache");
    let graph = fx.join("closure.json");

    // A Nix database of the closure (what `stevedore nixdb` writes, as Nix does).
    let root = dir.path().join("root");
    let made = Command::new(bin()).args(["nixdb", "--closure", graph.to_str().unwrap(), "--root", root.to_str().unwrap()]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let db = root.join("nix/var/nix/db/db.sqlite");
    let from_db = ok(sbom(&[conf.to_str().unwrap(), "--nix-db", db.to_str().unwrap(), "--format", "spdx"], &cache));
    assert_eq!(from_db["spdxVersion"], "SPDX-2.3");
    let pkgs = from_db["packages"].as_array().unwrap();
    assert_eq!(pkgs.len(), paths.len() + 1);
    assert!(pkgs[1]["comment"].as_str().unwrap().contains("narHash sha256:"), "{}", pkgs[1]);
    let rels = from_db["relationships"].as_array().unwrap();
    assert_eq!(rels.iter().filter(|r| r["relationshipType"] == "CONTAINS").count(), paths.len());
    assert!(rels.iter().any(|r| r["relationshipType"] == "DEPENDS_ON"));

    // A graph alone: every path, no layers.
    let bare = ok(sbom(&[graph.to_str().unwrap(), "--name", "tools"], &cache));
    assert_eq!(bare["metadata"]["component"]["name"], "tools");
    assert_eq!(bare["components"].as_array().unwrap().len(), paths.len());

    // Errors name what is wrong.
    let other = fixture("sbom-other", 2, 5, 0.0);
    let out = sbom(&[conf.to_str().unwrap(), "--graph", other.join("closure.json").to_str().unwrap()], &cache);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the closure graph does not list") && err.lines().count() == 1, "{err}");
    let out = sbom(&[conf.to_str().unwrap(), "--nix-db", dir.path().join("none.sqlite").to_str().unwrap()], &cache);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"), "{}", String::from_utf8_lossy(&out.stderr));
}
