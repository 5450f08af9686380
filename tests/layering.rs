//! `stevedore layers` end to end: formats, options, errors, determinism and sharing reports.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use stevedore::layering::{plan_layers, PlanOptions, Strategy};
use stevedore::nixstore::{nix_base32_encode, ClosureGraph, GraphFormat};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stevedore"))
}

fn layers(args: &[&str]) -> Output {
    Command::new(bin()).arg("layers").args(args).output().expect("runs stevedore")
}

fn ok_json(out: Output) -> Vec<Vec<String>> {
    assert!(out.status.success(), "stevedore failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is the JSON plan")
}

fn failure(out: Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected failure, got stdout {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    err
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A store path for a number, with a valid hash part.
fn path(i: usize) -> String {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    format!("/nix/store/{}-pkg{i:04}-1.{}", nix_base32_encode(&h), i % 7)
}

/// A package-set-like DAG: path i uses a few lower, mostly low ("popular") paths, sizes spread
/// over orders of magnitude, some self-references.
fn synthetic(n: usize, seed: u64) -> Vec<Value> {
    let mut s = seed;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|i| {
            let mut refs: Vec<String> = (0..if i == 0 { 0 } else { next() % 5 })
                .map(|_| {
                    let r = (next() % 1000) as f64 / 1000.0;
                    path((r * r * i as f64) as usize)
                })
                .collect();
            if i % 3 == 0 {
                refs.push(path(i));
            }
            refs.sort();
            refs.dedup();
            json!({"path": path(i), "narHash": format!("sha256:{}", nix_base32_encode(&[i as u8; 32])), "narSize": 1u64 << (next() % 24), "closureSize": 0, "references": refs})
        })
        .collect()
}

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
    p
}

#[test]
fn same_plan_whatever_the_input_order() {
    let dir = tmp();
    let mut nodes = synthetic(300, 11);
    let a = write(dir.path(), "a.json", &Value::Array(nodes.clone()));
    nodes.reverse();
    nodes.swap(3, 200);
    nodes.swap(17, 150);
    let b = write(dir.path(), "b.json", &Value::Array(nodes));
    for strategy in ["popularity", "auto", "dominator"] {
        for max in ["2", "20", "100"] {
            let args = |f: &Path| vec![f.to_str().unwrap().to_string(), "--strategy".into(), strategy.into(), "--max-layers".into(), max.into(), "-q".into()];
            let oa = Command::new(bin()).arg("layers").args(args(&a)).output().unwrap();
            let ob = Command::new(bin()).arg("layers").args(args(&b)).output().unwrap();
            assert!(oa.status.success());
            assert_eq!(oa.stdout, ob.stdout, "{strategy} at {max} depends on input order");
            let plan: Vec<Vec<String>> = serde_json::from_slice(&oa.stdout).unwrap();
            assert!(plan.len() < max.parse::<usize>().unwrap(), "{strategy}: {} layers", plan.len());
            let mut all: Vec<String> = plan.concat();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), 300, "{strategy}: every path once");
        }
    }
}

#[test]
fn library_and_command_agree() {
    let dir = tmp();
    let v = Value::Array(synthetic(120, 5));
    let f = write(dir.path(), "g.json", &v);
    let graph = ClosureGraph::load(&f, GraphFormat::Auto).unwrap();
    let opts = PlanOptions { strategy: Strategy::Popularity, max_layers: 30, ..Default::default() };
    let lib = plan_layers(&graph, &opts).unwrap();
    assert_eq!(lib.len(), 29);
    assert_eq!(ok_json(layers(&[f.to_str().unwrap(), "--strategy", "popularity", "--max-layers", "30"])), lib);
    // The default strategy is auto, as in nixpkgs today.
    let auto = plan_layers(&graph, &PlanOptions { max_layers: 30, ..Default::default() }).unwrap();
    assert_eq!(ok_json(layers(&[f.to_str().unwrap(), "--max-layers", "30"])), auto);
}

#[test]
fn roots_excludes_and_text_formats() {
    let dir = tmp();
    let nodes = synthetic(60, 9);
    let f = write(dir.path(), "g.json", &Value::Array(nodes.clone()));
    // The same graph as closureInfo's registration.
    let mut reg = String::new();
    for n in &nodes {
        let refs = n["references"].as_array().unwrap();
        reg += &format!("{}\n{}\n{}\n\n{}\n", n["path"].as_str().unwrap(), n["narHash"].as_str().unwrap(), n["narSize"], refs.len());
        for r in refs {
            reg += &format!("{}\n", r.as_str().unwrap());
        }
    }
    let r = dir.path().join("registration");
    std::fs::write(&r, reg).unwrap();
    for s in ["popularity", "auto", "dominator"] {
        let from_json = ok_json(layers(&[f.to_str().unwrap(), "--strategy", s, "-q"]));
        let from_reg = ok_json(layers(&[r.to_str().unwrap(), "--strategy", s, "-q"]));
        assert_eq!(from_json, from_reg, "{s}");
    }
    // --root plans only that closure; --exclude leaves a path out.
    let root = path(59);
    let graph = ClosureGraph::load(&f, GraphFormat::Auto).unwrap();
    let closure = graph.closure_of(&[&root]).unwrap();
    let plan = ok_json(layers(&[f.to_str().unwrap(), "--root", &root, "--exclude", &root, "-q"]));
    let planned: Vec<String> = plan.concat();
    assert_eq!(planned.len(), closure.len() - 1);
    assert!(!planned.contains(&root));
    assert!(planned.iter().all(|p| closure.index_of(p).is_some()));
    // An unknown --exclude is only a warning, as nixpkgs ignores it.
    let out = layers(&[f.to_str().unwrap(), "--exclude", &path(999)]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: --exclude"));
}

#[test]
fn pipelines_inline_and_from_a_file() {
    let dir = tmp();
    let f = write(dir.path(), "g.json", &Value::Array(synthetic(80, 3)));
    let split = path(79);
    let pipeline = json!([["split_paths", [split]], ["over", "rest", ["pipe", [["popularity_contest"], ["limit_layers", 10]]]]]);
    let pf = write(dir.path(), "pipeline.json", &pipeline);
    let inline = ok_json(layers(&[f.to_str().unwrap(), "--pipeline", &pipeline.to_string(), "-q"]));
    let from_file = ok_json(layers(&[f.to_str().unwrap(), "--pipeline", pf.to_str().unwrap(), "--strategy", "pipeline", "-q"]));
    assert_eq!(inline, from_file);
    assert!(inline[0].contains(&split), "split path first, in main");
    assert!(inline.len() <= 12);
    // The default popularity pipeline, spelled out, is the popularity strategy.
    let spelled = ok_json(layers(&[f.to_str().unwrap(), "--pipeline", r#"[["popularity_contest"], ["limit_layers", 99]]"#, "-q"]));
    assert_eq!(spelled, ok_json(layers(&[f.to_str().unwrap(), "--strategy", "popularity", "-q"])));
    // Past the budget is allowed, with a warning.
    let out = layers(&[f.to_str().unwrap(), "--pipeline", r#"[["popularity_contest"]]"#, "--max-layers", "10"]);
    assert_eq!(ok_json(out.clone()).len(), 80);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than the 9 maxLayers leaves"));
}

#[test]
fn explain_and_sharing_report() {
    let dir = tmp();
    let nodes = synthetic(200, 21);
    let a = write(dir.path(), "a.json", &Value::Array(nodes.clone()));
    let graph = ClosureGraph::load(&a, GraphFormat::Auto).unwrap();
    // A related image: the closure of a few of the same paths.
    let roots: Vec<String> = [150, 170, 199].iter().map(|&i| path(i)).collect();
    let b = write(dir.path(), "b.json", &graph.closure_of(&roots).unwrap().to_json());
    let out = layers(&[a.to_str().unwrap(), "--strategy", "dominator", "--max-layers", "40", "--explain", "--against", b.to_str().unwrap()]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("layer") && lines[0].contains("bytes"), "{table}");
    assert_eq!(lines.len(), 1 + 39 + 2, "{table}");
    assert!(lines[40].starts_with("total: 39 layers, 200 store paths"), "{table}");
    assert!(lines[41].contains("layers identical") && lines[41].contains("shared"), "{table}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("layers for 200 store paths in"), "{stderr}");
    // The same image against itself shares everything.
    let out = layers(&[a.to_str().unwrap(), "--against", a.to_str().unwrap(), "--max-layers", "40"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(100.0%)"));
    ok_json(out);
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let dir = tmp();
    let (a, b) = (path(1), path(2));
    let cases: Vec<(Value, &str)> = vec![
        (json!([{"path": a, "narSize": 1, "references": [b]}]), "which is not in the graph"),
        (json!([{"path": a, "narSize": 1, "references": [b]}, {"path": b, "narSize": 1, "references": [a]}]), "cycle"),
        (json!([{"path": a, "references": []}]), "missing field `narSize`"),
        (json!([{"path": "/nix/store/short-x", "narSize": 1, "references": []}]), "invalid store path"),
        (json!({"nope": []}), "\"graph\""),
    ];
    for (i, (v, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("{i}.json"), v);
        let err = failure(layers(&[f.to_str().unwrap()]));
        assert!(err.contains(want) && err.contains(f.to_str().unwrap()), "{err}");
    }
    let f = dir.path().join("broken.json");
    std::fs::write(&f, "[{\"path\": ").unwrap();
    assert!(failure(layers(&[f.to_str().unwrap()])).contains("line 1"));
    let good = write(dir.path(), "good.json", &Value::Array(synthetic(5, 1)));
    let g = good.to_str().unwrap();
    assert!(failure(layers(&[g, "--max-layers", "1"])).contains("too low"));
    assert!(failure(layers(&[g, "--max-layers", "3", "--base-layers", "2"])).contains("base image has 2 layers"));
    assert!(failure(layers(&[g, "--strategy", "pipeline"])).contains("needs --pipeline"));
    assert!(failure(layers(&[g, "--pipeline", "[[\"limit_layers\", 0]]"])).contains("at least 1"));
    assert!(failure(layers(&[g, "--root", &path(77)])).contains("not in the graph"));
    assert!(failure(layers(&[dir.path().join("missing.json").to_str().unwrap()])).contains("cannot read"));
}
