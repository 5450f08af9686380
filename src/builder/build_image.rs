//! nixpkgs' `buildImage` as builder actions, without a VM.
//!
//! - `image-layer` makes the image's one new layer, as nixpkgs' `mkPureLayer` or (with
//!   `runAsRoot`) `mkRootLayer` do: `copyToRoot` copied like `rsync -a` (`-k`, or `-K` with
//!   `keepContentsDirlinks`), the Nix database when `includeNixDB`, then `extraCommands`; with
//!   `runAsRoot` the script runs as root over the base image plus that tree in user and mount
//!   namespaces ([`crate::rootless`]) and the layer holds what changed. Attributes:
//!   `copyToRoot`, `keepContentsDirlinks`, `extraCommands` (+ `shell`, `path`), `uid`, `gid`,
//!   `mtime`, `baseJson`, `includeNixDB` (+ the graph `dbClosure` and `dbRoots`), and for the
//!   root step `runAsRoot`, `runAsRootShell`, `runAsRootPath`, `fromImage`, `fromImageName`,
//!   `fromImageTag`, `storeDir`. Output: `layer.tar`, `checksum` (its sha256), `json` (the
//!   base JSON with the checksum; it keeps the config's store paths in the layer's closure, as
//!   in nixpkgs) and `VERSION`.
//! - `image` writes the image: the base image's layers (the one picked by `fromImageName` and
//!   `fromImageTag`, else the first) and the new layer, to which the files of its closure
//!   (the graph `closure`) that no base layer has are appended, with `/nix/store` made
//!   readable (0555) when the base has none. Attributes: `layer`, `closure`, `fromImage`,
//!   `fromImageName`, `fromImageTag`, `baseJson`, `created`, `mtime`, `imageName`, `tag` (null:
//!   the hash of `$out`), `storeDir`, `compressor`, `format`.
//! - `export` flattens an image into one tar ([`crate::image::flatten`]): `fromImage`,
//!   `fromImageName`, `fromImageTag`, `mtime`.

use crate::image::conf::{self, StreamConf};
use crate::image::flatten::{self, key_of, key_of_name, Tree};
use crate::image::read::Selector;
use crate::image::layer::{check_store_path, plan_layer, Owner};
use crate::util::io::HashingWriter;
use super::attrs;
use super::{build_top, repo_tag, write_new, Commands, STDENV_EPOCH};
use crate::rootfs::{self, Dirlinks, Owners, PackOptions};
use crate::util::files::make_dir;
use crate::rootless::{IdMapping, RunAsRoot};
use crate::nixstore::ClosureGraph;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

/// The file time of every member: `mtime`, else the one nixpkgs' buildImage gives.
fn mtime(mtime: Option<i64>) -> i64 {
    mtime.unwrap_or(STDENV_EPOCH)
}

fn selector(name: &Option<String>, tag: &Option<String>) -> Result<Selector> {
    let sel = Selector { name: name.clone(), tag: tag.clone() };
    if sel.tag.is_some() && sel.name.is_none() {
        bail!("fromImageTag: given without fromImageName");
    }
    Ok(sel)
}

/// The closure graph exported under `key`, or an empty one.
fn graph(value: Option<&Value>, key: &str) -> Result<ClosureGraph> {
    match value {
        None => Ok(ClosureGraph::default()),
        Some(v) => ClosureGraph::from_json_value(v).with_context(|| format!("{key} (exportReferencesGraph)")),
    }
}

/// Writes the Nix database of `dbClosure` into the tree at `root` (mkDbExtraCommand), with
/// `dbRoots` as GC roots.
pub(crate) fn write_nix_db(db_closure: Option<&Value>, db_roots: &[String], root: &Path, registration_time: i64) -> Result<()> {
    let g = graph(db_closure, "dbClosure")?;
    crate::nixstore::db::write_tree(&g, root, db_roots, registration_time).context("includeNixDB")?;
    eprintln!("Registered {} store paths in the Nix database", g.len());
    Ok(())
}

/// `image-layer`: the new layer of a buildImage.
pub fn image_layer((out, a): (PathBuf, attrs::ImageLayer)) -> Result<()> {
    let top = build_top()?;
    let mtime = mtime(a.mtime);
    let items: Vec<PathBuf> = a.copy_to_root.iter().map(PathBuf::from).collect();
    let dirlinks = if a.keep_contents_dirlinks { Dirlinks::Keep } else { Dirlinks::Copy };
    let extra = a.extra_commands.clone().unwrap_or_default();
    let commands = Commands { shell: a.shell.as_deref(), path: a.path.as_deref(), out: &out };

    make_dir(&out)?;
    match &a.run_as_root {
        None => {
            let root = top.join("layer");
            make_dir(&root)?;
            for item in &items {
                eprintln!("Adding {}", item.display());
                rootfs::copy_to_root(item, &root, dirlinks, &mut |_| Ok(())).context("copyToRoot")?;
            }
            if a.include_nix_db {
                write_nix_db(a.db_closure.as_ref(), &a.db_roots, &root, mtime)?;
            }
            if !extra.is_empty() {
                commands.run("extraCommands", &extra, &root, None)?;
            }
            let uid = a.uid.ok_or_else(|| anyhow!("uid: missing"))?;
            let gid = a.gid.ok_or_else(|| anyhow!("gid: missing"))?;
            let owners = Owners::Fixed(uid, gid);
            let packed = rootfs::pack_to_dir(&root, &out, &PackOptions { mtime, owners })?;
            eprintln!("Packed the layer: {} members, {} bytes", packed.members, packed.size);
        }
        Some(script) => {
            // nixpkgs' shellScript: the shell, `set -e`, coreutils and /bin on PATH.
            let shell = a.run_as_root_shell.clone().ok_or_else(|| anyhow!("runAsRootShell: missing"))?;
            let path = a.run_as_root_path.as_deref().unwrap_or("/bin");
            let script_file = top.join("run-as-root.sh");
            write_new(&script_file, format!("#!{shell}\nset -e\nexport PATH={path}\n{script}\n").as_bytes(), 0o555)?;
            let mut layers = items.clone();
            if a.include_nix_db {
                let db_root = top.join("nix-db");
                make_dir(&db_root)?;
                write_nix_db(a.db_closure.as_ref(), &a.db_roots, &db_root, mtime)?;
                layers.push(db_root);
            }
            let extra_commands = if extra.is_empty() {
                None
            } else {
                let f = top.join("extra-commands.sh");
                write_new(&f, format!("set -e\n{extra}\n").as_bytes(), 0o444)?;
                Some(f)
            };
            let scratch = top.join("scratch");
            make_dir(&scratch)?;
            let sel = selector(&a.from_image_name, &a.from_image_tag)?;
            let args = RunAsRoot {
                from_image: a.from_image.as_ref().map(PathBuf::from),
                from_image_name: sel.name,
                from_image_tag: sel.tag,
                layers,
                keep_dirlinks: dirlinks == Dirlinks::Keep,
                store_paths: Vec::new(),
                store_dir: Some(PathBuf::from(a.store_dir.as_deref().unwrap_or("/nix/store"))),
                script: script_file,
                shell,
                env: Vec::new(),
                extra_commands,
                extra_commands_shell: PathBuf::from(a.shell.as_deref().unwrap_or("/bin/sh")),
                // They run outside the namespace's root, with our environment and these.
                extra_commands_env: commands.vars().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                out_layer: out.join("layer.tar"),
                out_checksum: Some(out.join("checksum")),
                mtime: Some(mtime),
                id_mapping: IdMapping::Auto,
                scratch: Some(scratch),
                quiet: false,
            };
            crate::rootless::run(&args).context("runAsRoot")?;
        }
    }

    let checksum = fs::read_to_string(out.join("checksum")).context("cannot read the layer's checksum")?.trim().to_string();
    let mut meta = match &a.base_json {
        Some(p) => crate::util::limits::read_json_input(Path::new(p))?,
        None => json!({}),
    };
    if let Value::Object(m) = &mut meta {
        m.insert("checksum".into(), checksum.into());
    }
    write_new(&out.join("json"), serde_json::to_string(&meta)?.as_bytes(), 0o444)?;
    write_new(&out.join("VERSION"), b"1.0", 0o444)
}

/// Keys (as [`flatten`] keys paths) of every member of a layer tar, and where its last member
/// ends (so more members can follow).
fn layer_members(path: &Path) -> Result<(HashSet<Vec<u8>>, u64)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut archive = crate::tar::read::Reader::seekable(std::io::BufReader::new(file), len);
    let mut keys = HashSet::new();
    let mut end = 0u64;
    while let Some(entry) = archive.next().map_err(|e| anyhow!("{}: not a valid tar archive: {e}", path.display()))? {
        keys.insert(key_of_name(&entry.name).with_context(|| path.display().to_string())?);
        end = end.max(entry.data_offset + entry.size.div_ceil(512) * 512);
    }
    Ok((keys, end))
}

/// `image`: the buildImage archive.
pub fn image((out, a): (PathBuf, attrs::Image)) -> Result<()> {
    let repo_tag = repo_tag(&a.image_name, a.tag.as_deref(), &out)?;
    let top = build_top()?;
    let now = conf::now();
    let mtime = mtime(a.mtime);
    let store_dir = a.store_dir.clone().unwrap_or_else(|| "/nix/store".into());
    let layer_dir = PathBuf::from(&a.layer);
    let layer_tar = layer_dir.join("layer.tar");
    let from_image = a.from_image.as_ref().map(PathBuf::from);
    let sel = selector(&a.from_image_name, &a.from_image_tag)?;

    // What the base image and the layer have already: those files are not added again.
    let mut present: HashSet<Vec<u8>> = HashSet::new();
    if let Some(image) = &from_image {
        let scratch = top.join("base");
        make_dir(&scratch)?;
        let opened = crate::image::read::open_image(image, &sel, &scratch, false).context("fromImage")?;
        let tree = Tree::from_layers(&opened.layers).context("fromImage")?;
        present.extend(tree.nodes.into_keys());
    }
    let nix_store_in_base = present.contains(&key_of(&[b"nix", b"store"]));
    let (layer_keys, layer_end) = layer_members(&layer_tar)?;
    present.extend(layer_keys);

    let closure = graph(a.closure.as_ref(), "closure")?;
    let layer_path = layer_dir.to_string_lossy().into_owned();
    let mut paths = Vec::new();
    for i in 0..closure.len() as u32 {
        let p = closure.path(i);
        if p != layer_path {
            paths.push(check_store_path(p, &store_dir).context("closure")?);
        }
    }
    paths.sort();

    let final_dir = top.join("final");
    make_dir(&final_dir)?;
    let final_tar = final_dir.join("layer.tar");
    let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, File::create(&final_tar).with_context(|| format!("cannot create {}", final_tar.display()))?));
    // The layer's own members, then the closure's files.
    let mut src = File::open(&layer_tar).with_context(|| format!("cannot open {}", layer_tar.display()))?;
    let copied = std::io::copy(&mut (&mut src).take(layer_end), &mut w).with_context(|| format!("cannot copy {}", layer_tar.display()))?;
    if copied != layer_end {
        bail!("{} is truncated", layer_tar.display());
    }
    let owner = Owner { uid: 0, gid: 0, uname: "root".into(), gname: "root".into(), mtime };
    let mut added = 0usize;
    if !paths.is_empty() {
        let mut plan = plan_layer(&paths, &owner)?;
        plan.retain(&owner, |name, mode| {
            if name == b"/nix/" || name == b"/nix/store/" {
                // So that users other than root can read the store.
                *mode = 0o555;
                return !nix_store_in_base;
            }
            key_of_name(name).map_or(true, |k| !present.contains(&k))
        });
        added = plan.entry_count();
        crate::image::layer::write_layer(&plan, &owner, &mut w)?;
    } else {
        crate::util::io::write_zeros(&mut w, crate::tar::trailer_len(layer_end))?;
    }
    let (bw, digest, size) = w.finish();
    bw.into_inner().map_err(|e| anyhow!("cannot write {}: {}", final_tar.display(), e.error()))?;
    fs::write(final_dir.join("checksum"), format!("{}\n", crate::util::hex(&digest))).context("cannot write the checksum")?;
    eprintln!("The layer: {size} bytes, {added} members from {} store paths added", paths.len());

    let base: Value = crate::util::limits::read_json_input(Path::new(&a.base_json))?;
    let (date, time) = conf::civil_from_unix(mtime);
    let conf_value = json!({
        "store_layers": [],
        "customisation_layer": final_dir,
        "from_image": from_image,
        "from_image_name": sel.name,
        "from_image_tag": sel.tag,
        "config": base.get("config").cloned().unwrap_or(Value::Null),
        "architecture": base.get("architecture").cloned().unwrap_or_else(|| json!("amd64")),
        "variant": base.get("variant").cloned().unwrap_or(Value::Null),
        "os": base.get("os").cloned().unwrap_or_else(|| json!("linux")),
        "created": a.created,
        "mtime": format!("{date}T{time}+00:00"),
        "uid": 0, "gid": 0, "uname": "root", "gname": "root",
        "store_dir": store_dir,
        "repo_tag": repo_tag,
    });
    let mut conf = StreamConf::from_value(conf_value, &now)?;
    conf.customisation_layer_source = Some(layer_path);
    super::layered::write_image(&conf, &out, a.compressor, a.format)
}

/// `export`: exportImage's flattened file system.
pub fn export((out, a): (PathBuf, attrs::Export)) -> Result<()> {
    let top = build_top()?;
    let sel = selector(&a.from_image_name, &a.from_image_tag)?;
    let args = flatten::Export {
        from_image: PathBuf::from(&a.from_image),
        from_image_name: sel.name,
        from_image_tag: sel.tag,
        output: out,
        compressor: crate::compress::Compressor::None,
        mtime: Some(mtime(a.mtime)),
        scratch: Some(top),
        quiet: false,
    };
    flatten::export(&args)
}
