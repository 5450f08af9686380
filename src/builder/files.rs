//! The small derivations: `text` (writeText), `symlinks` (a tree of links, such as usrBinEnv
//! and binSh) and `files` (fakeNss-style trees and small scripts).

use super::attrs::{self, kind, Attrs, Field};
use super::write_new;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::fs;
use std::path::{Path, PathBuf};

/// `text`: the attribute `text` as `$out`.
pub(super) fn text((out, a): (PathBuf, attrs::Text)) -> Result<()> {
    write_new(&out, a.text.as_bytes(), 0o444)
}

/// For the actions that make `$out` a directory from an attribute set of relative paths (`key`):
/// creates `$out` and returns the set, or says what the set should hold (`expected`).
fn output_tree<'a>(out: &Path, value: &'a Option<Value>, key: &str, expected: &str) -> Result<&'a Map<String, Value>> {
    let Some(Value::Object(entries)) = value else {
        bail!("{key}: expected {expected}");
    };
    fs::create_dir(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(entries)
}

/// `out/rel` for an entry of [`output_tree`]'s set, once `rel` is a clean relative path.
fn tree_path(out: &Path, key: &str, rel: &str) -> Result<PathBuf> {
    if rel.starts_with('/') || rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("{key}: {rel:?} is not a clean relative path");
    }
    Ok(out.join(rel))
}

/// `symlinks`: `$out` a directory of the symlinks `links` names.
pub(super) fn symlinks((out, a): (PathBuf, attrs::Symlinks)) -> Result<()> {
    let links = output_tree(&out, &a.links, "links", "an attribute set of relative path = target")?;
    for (rel, target) in links {
        let target = target.as_str().ok_or_else(|| anyhow!("links.{rel}: expected a string, got {}", kind(target)))?;
        let link = tree_path(&out, "links", rel)?;
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::os::unix::fs::symlink(target, &link).with_context(|| format!("cannot create symlink {}", link.display()))?;
    }
    Ok(())
}

/// `files`: `$out` a directory of the files and directories `files` describes.
pub(super) fn files((out, a): (PathBuf, attrs::Files)) -> Result<()> {
    let files = output_tree(&out, &a.files, "files", "an attribute set of relative path = { text; executable; } or { directory = true; }")?;
    for (rel, spec) in files {
        let path = tree_path(&out, "files", rel)?;
        let spec = Attrs::from_value(spec.clone()).map_err(|_| anyhow!("files.{rel}: expected an attribute set, got {}", kind(spec)))?;
        let dir = if bool::read(&spec, "directory").with_context(|| format!("files.{rel}"))? { path.as_path() } else { path.parent().unwrap_or(&out) };
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if dir == path {
            continue;
        }
        let text = String::read(&spec, "text").with_context(|| format!("files.{rel}"))?;
        let mode = if bool::read(&spec, "executable").with_context(|| format!("files.{rel}"))? { 0o555 } else { 0o444 };
        write_new(&path, text.as_bytes(), mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use attrs::ActionAttrs;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_writes_texts_modes_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let attrs = |files: Value| attrs::Files::from_attrs(&Attrs::from_value(json!({"outputs": {"out": out}, "files": files})).unwrap()).unwrap();
        files(attrs(json!({
            "etc/passwd": {"text": "root:x:0:0::/:/bin/sh\n"},
            "bin/run": {"text": "#!/bin/sh\n", "executable": true},
            "var/empty": {"directory": true}
        })))
        .unwrap();
        assert_eq!(fs::read_to_string(out.join("etc/passwd")).unwrap(), "root:x:0:0::/:/bin/sh\n");
        assert_eq!(fs::metadata(out.join("bin/run")).unwrap().permissions().mode() & 0o777, 0o555);
        assert_eq!(fs::metadata(out.join("etc/passwd")).unwrap().permissions().mode() & 0o777, 0o444);
        assert!(out.join("var/empty").is_dir());
        fs::remove_dir_all(&out).unwrap();
        let e = files(attrs(json!({"../x": {"text": ""}}))).unwrap_err().to_string();
        assert!(e.contains("not a clean relative path"), "{e}");
        fs::remove_dir_all(&out).unwrap();
        let e = files(attrs(json!({"x": {"executable": true}}))).unwrap_err();
        assert!(format!("{e:#}").starts_with("files.x: text: missing"), "{e:#}");
    }
}
