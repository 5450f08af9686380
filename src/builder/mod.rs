//! Builder mode: stevedore as the builder of the Nix library's derivations (`stevedore nix ACTION`).
//!
//! Every derivation in `nix/` that does real work has `builder = stevedore` and
//! `__structuredAttrs = true`, so it needs no shell, coreutils, jq or Python. Nix then gives the
//! builder no `$out` and no `PATH`: its inputs are in `NIX_ATTRS_JSON_FILE` (or `.attrs.json` in
//! the build directory), where `outputs.out` is the output path and each
//! `exportReferencesGraph.NAME = [ paths ]` became a list under `NAME` of
//! `{ path, narHash, narSize, closureSize, references }`.
//!
//! The actions and the attributes each reads (names follow nixpkgs' arguments, so errors name
//! the argument at fault):
//!
//! - `text`: `text` → `$out` (a file; what `writeText` does).
//! - `symlinks`: `links = { "rel/path" = "target"; }` → `$out`, a directory of symlinks.
//! - `customisation-layer`: `contents` (store paths, joined like `symlinkJoin`), `extraCommands`,
//!   `fakeRootCommands`, `enableFakechroot`, `mtime`, and when commands run: `shell`, `path`
//!   (their `PATH`), `fakeroot`, `proot` (executables) and `storeDir` → `$out/layer.tar`,
//!   `$out/checksum`.
//! - `conf`: `baseJson` (file with `config`, `architecture`, `os`), `closure` (the graph of
//!   `[ baseJson customisationLayer ]`, empty when `includeStorePaths` is false), `excludePaths`,
//!   `customisationLayer`, `fromImage`, `maxLayers`, `layeringPipeline` (null, a list, or a
//!   JSON file), `created`, `mtime`, `uid`, `gid`, `uname`, `gname`, `imageName`, `tag` (null:
//!   the hash of `$out`), `storeDir`, `debug` → `$out`, the conf JSON `stevedore stream` reads.
//! - `stream-script`: `shell`, `stevedore`, `conf` → `$out`, an executable that runs
//!   `stevedore stream CONF "$@"`.
//! - `customisation-layer` also writes the Nix database when `includeNixDB` (graph `dbClosure`,
//!   GC roots `dbRoots`).
//! - `archive`: `conf`, `compressor` (`none`, `gz`, `zstd`), `format` (`docker-archive`,
//!   `oci`, `oci-archive`) → `$out`, the image.
//! - `push-script`: `shell`, `stevedore`, `conf` (a conf or an archive), `imageRef` → `$out`,
//!   an executable that pushes the image.
//! - `image-layer`, `image`, `export`: buildImage and exportImage (see `build_image.rs`).
//! - `merge`: `images` (Docker archives or stream executables) → `$out`, one archive holding
//!   them all (see `crate::image::merge`).
//! - `files`: `files = { "rel/path" = { text = "..."; executable = bool; } or { directory = true; }; }`
//!   → `$out`, a directory of those files (fakeNss-style trees, small scripts in `bin/`).
//!
//! `stevedore nix pack ROOT DIR` packs a directory the way the customisation layer is packed.

pub mod build_image;

use crate::image::base::BaseImage;
use crate::compress::Compressor;
use crate::image::conf::{self, StreamConf, Timestamp};
use crate::image::{self, Format};
use crate::util::shared::Choice;
use crate::layering::{plan_layers, Pipeline, PlanOptions, Strategy};
use crate::rootfs::{self, Owners, PackOptions};
use crate::nixstore::ClosureGraph;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to build (see the module documentation for the attributes each reads).
#[derive(Debug, Clone)]
pub enum Action {
    /// Write the attribute `text` to $out.
    Text,
    /// Make $out a directory of symlinks (attribute `links`).
    Symlinks,
    /// Build the customisation layer ($out/layer.tar and $out/checksum).
    CustomisationLayer {
        /// Second stage, run by the first inside `fakeroot`: run fakeRootCommands, then pack.
        inside_fakeroot: bool,
    },
    /// Plan the store layers and write the stream conf JSON.
    Conf,
    /// Write the executable that streams the image.
    StreamScript,
    /// An executable that pushes the image to a registry (passthru.copyToRegistry).
    PushScript,
    /// Write the image archive, compressed.
    Archive,
    /// buildImage's new layer ($out/layer.tar, checksum, json, VERSION).
    ImageLayer,
    /// buildImage's image: base layers plus the new layer with its closure.
    Image,
    /// exportImage: an image's flattened file system as one tar.
    Export,
    /// Merge the images (attribute `images`) into one Docker archive.
    Merge,
    /// Make $out a directory of small files (attribute `files`).
    Files,
    /// Pack the directory ROOT into DIR/layer.tar and DIR/checksum (as the customisation layer).
    Pack {
        root: PathBuf,
        dir: PathBuf,
        /// Modification time of every member (Unix seconds).
        mtime: i64,
        /// Owners: `root` (0:0 for all) or `fs` (what lstat says, faked inside fakeroot).
        owners: Owners,
    },
}

/// Builds one action's output from the attributes Nix passed.
pub fn run(action: &Action) -> Result<()> {
    match action {
        Action::Text => text(&Attrs::load()?),
        Action::Symlinks => symlinks(&Attrs::load()?),
        Action::CustomisationLayer { inside_fakeroot } => customisation_layer(&Attrs::load()?, *inside_fakeroot),
        Action::Conf => {
            let attrs = Attrs::load()?;
            let out = attrs.out()?;
            let conf = build_conf(&attrs, &out, &conf::now())?;
            write_new(&out, serde_json::to_string_pretty(&conf)?.as_bytes(), 0o444)
        }
        Action::StreamScript => stream_script(&Attrs::load()?),
        Action::PushScript => push_script(&Attrs::load()?),
        Action::Archive => archive(&Attrs::load()?),
        Action::ImageLayer => crate::builder::build_image::image_layer(&Attrs::load()?),
        Action::Image => crate::builder::build_image::image(&Attrs::load()?),
        Action::Export => crate::builder::build_image::export(&Attrs::load()?),
        Action::Merge => merge_images(&Attrs::load()?),
        Action::Files => files(&Attrs::load()?),
        Action::Pack { root, dir, mtime, owners } => {
            let packed = rootfs::pack_to_dir(root, dir, &PackOptions { mtime: *mtime, owners: *owners })?;
            eprintln!("packed {} members, {} bytes, sha256 {}", packed.members, packed.size, crate::util::hex(&packed.digest));
            Ok(())
        }
    }
}

/// A derivation's structured attributes.
pub struct Attrs {
    map: Map<String, Value>,
}

/// [`crate::util::kind`] in Nix's words: objects are attribute sets.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "an attribute set",
        other => crate::util::kind(other),
    }
}

/// Where the structured attributes are: `NIX_ATTRS_JSON_FILE`, unless it does not exist, as
/// when Nix 2.8 names the path outside the sandbox; then `.attrs.json` in the build directory
/// (or the working directory, for Nix versions that set no variable).
fn attrs_path(env_file: Option<PathBuf>, build_top: Option<PathBuf>) -> PathBuf {
    let candidates: Vec<PathBuf> =
        [env_file, build_top.map(|top| top.join(".attrs.json")), Some(PathBuf::from(".attrs.json"))].into_iter().flatten().collect();
    candidates.iter().find(|p| p.exists()).unwrap_or(&candidates[0]).clone()
}

impl Attrs {
    /// Reads `NIX_ATTRS_JSON_FILE`, or `.attrs.json` in the working directory (older Nix).
    pub fn load() -> Result<Attrs> {
        let path = attrs_path(std::env::var_os("NIX_ATTRS_JSON_FILE").map(PathBuf::from), std::env::var_os("NIX_BUILD_TOP").map(PathBuf::from));
        let text = crate::util::limits::read_limited(&path, crate::util::limits::INPUT_LIMIT).map_err(|e| {
            anyhow!("{e:#}; `stevedore nix` runs as the builder of a derivation with __structuredAttrs = true")
        })?;
        let value: Value = crate::util::limits::parse_json(&text, crate::util::limits::INPUT_VALUES).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Attrs::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Attrs> {
        match value {
            Value::Object(map) => Ok(Attrs { map }),
            other => bail!("the structured attributes must be an object, not {}", kind(&other)),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("{key}: expected a string, got {}", kind(other)),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| anyhow!("{key}: missing"))
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!("{key}: expected a boolean, got {}", kind(other)),
        }
    }

    /// A non-negative integer; numeric strings are accepted too, as nixpkgs passes some
    /// numbers through the environment.
    pub(crate) fn u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            None => bail!("{key}: missing"),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(|| anyhow!("{key}: expected a non-negative integer, got {n}")),
            Some(Value::String(s)) => s.trim().parse().map_err(|_| anyhow!("{key}: expected a non-negative integer, got {s:?}")),
            Some(other) => bail!("{key}: expected an integer, got {}", kind(other)),
        }
    }

    pub(crate) fn str_list(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{key}: expected strings, got {}", kind(v))))
                .collect(),
            Some(other) => bail!("{key}: expected a list, got {}", kind(other)),
        }
    }

    /// The output path (`outputs.out`).
    pub fn out(&self) -> Result<PathBuf> {
        self.get("outputs")
            .and_then(|o| o.get("out"))
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("the structured attributes have no outputs.out"))
    }
}

/// Writes a new file whole, with the given mode.
pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| format!("cannot chmod {}", path.display()))
}

fn text(attrs: &Attrs) -> Result<()> {
    write_new(&attrs.out()?, attrs.str("text")?.as_bytes(), 0o444)
}

/// For the actions that make `$out` a directory from an attribute set of relative paths (`key`):
/// creates `$out` and returns it with the set, or says what the set should hold (`expected`).
fn output_tree<'a>(attrs: &'a Attrs, key: &str, expected: &str) -> Result<(PathBuf, &'a Map<String, Value>)> {
    let out = attrs.out()?;
    let Some(Value::Object(entries)) = attrs.get(key) else {
        bail!("{key}: expected {expected}");
    };
    fs::create_dir(&out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok((out, entries))
}

/// `out/rel` for an entry of [`output_tree`]'s set, once `rel` is a clean relative path.
fn tree_path(out: &Path, key: &str, rel: &str) -> Result<PathBuf> {
    if rel.starts_with('/') || rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("{key}: {rel:?} is not a clean relative path");
    }
    Ok(out.join(rel))
}

fn symlinks(attrs: &Attrs) -> Result<()> {
    let (out, links) = output_tree(attrs, "links", "an attribute set of relative path = target")?;
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

/// Parses `created`/`mtime` as the conf does (ISO-8601 or "now").
pub(crate) fn parse_time(field: &str, value: &str, now: &Timestamp) -> Result<Timestamp> {
    conf::parse_time(value, now).map_err(|e| anyhow!("{field}: {e}"))
}

/// What nixpkgs writes into the conf for `created`/`mtime`: `"now"` as is, anything else as
/// `date -Iseconds -d` prints it in the build's time zone (UTC): whole seconds, `+00:00`.
fn conf_time(field: &str, value: &str, now: &Timestamp) -> Result<String> {
    if value == "now" {
        return Ok("now".into());
    }
    let t = parse_time(field, value, now)?;
    // date drops fractions of a second, rounding toward the past; parse_time rounds toward 0.
    let fraction = t.iso.get(19..).is_some_and(|rest| rest.starts_with('.'));
    let secs = if fraction && t.unix < 0 { t.unix - 1 } else { t.unix };
    let (date, time) = conf::civil_from_unix(secs);
    Ok(format!("{date}T{time}+00:00"))
}

/// The build directory: commands run and trees are built under it.
pub(crate) fn build_top() -> Result<PathBuf> {
    match std::env::var_os("NIX_BUILD_TOP") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_dir().context("cannot find the working directory"),
    }
}

/// Runs `script` with the image's shell, in `dir`, with the tools on `PATH`. `-e` stops at the
/// first failing command, as nixpkgs' builders do.
pub(crate) fn run_commands(attrs: &Attrs, field: &str, script: &str, dir: &Path, proot: Option<&[String]>) -> Result<()> {
    let shell = attrs.str("shell").map_err(|_| anyhow!("{field}: no shell to run it with (the derivation has no `shell`)"))?;
    let mut cmd = match proot {
        None => {
            let mut c = Command::new(&shell);
            c.current_dir(dir);
            c
        }
        Some(prefix) => {
            let mut c = Command::new(&prefix[0]);
            c.args(&prefix[1..]).arg(&shell);
            c
        }
    };
    cmd.args(["-e", "-c", script]);
    command_env(attrs, &mut cmd)?;
    let status = cmd.status().with_context(|| format!("{field}: cannot run {}", cmd.get_program().to_string_lossy()))?;
    if !status.success() {
        bail!("{field} failed ({status})");
    }
    Ok(())
}

/// stdenv's `SOURCE_DATE_EPOCH` (1980-01-01): nixpkgs' file and registration times in builds.
pub const STDENV_EPOCH: i64 = 315532800;

/// What commands see besides the build's environment: `PATH`, `out` and stdenv's
/// `SOURCE_DATE_EPOCH`, which scripts written for nixpkgs may use.
pub(crate) fn command_vars(attrs: &Attrs) -> Result<[(&'static str, std::ffi::OsString); 3]> {
    Ok([
        ("PATH", attrs.opt_str("path")?.unwrap_or_default().into()),
        ("out", attrs.out()?.into()),
        ("SOURCE_DATE_EPOCH", STDENV_EPOCH.to_string().into()),
    ])
}

pub(crate) fn command_env(attrs: &Attrs, cmd: &mut Command) -> Result<()> {
    cmd.envs(command_vars(attrs)?);
    Ok(())
}

fn customisation_layer(attrs: &Attrs, inside_fakeroot: bool) -> Result<()> {
    let out = attrs.out()?;
    let root = build_top()?.join("root");
    let now = conf::now();
    let mtime = parse_time("mtime", &attrs.str("mtime")?, &now)?.unix;
    let fakeroot_commands = attrs.opt_str("fakeRootCommands")?.unwrap_or_default();
    let fakechroot = attrs.bool("enableFakechroot")?;

    if inside_fakeroot {
        if fakechroot {
            // As nixpkgs does, the commands see the image's root as `/`, with the store, the
            // kernel file systems and the build directory bound in. proot leaves no trace of
            // the bindings in the tree, so packing happens outside it, still under fakeroot.
            let proot = attrs.str("proot").map_err(|_| anyhow!("enableFakechroot: the derivation has no `proot`"))?;
            let store_dir = attrs.opt_str("storeDir")?.unwrap_or_else(|| "/nix/store".into());
            let top = build_top()?;
            let mut prefix = vec![proot, "-r".into(), root.display().to_string()];
            for p in ["/dev/".to_string(), "/proc/".into(), "/sys/".into(), format!("{store_dir}/"), top.display().to_string()] {
                prefix.push(format!("--bind={p}:{p}!"));
            }
            prefix.extend(["-w".into(), "/".into()]);
            run_commands(attrs, "fakeRootCommands", &fakeroot_commands, &root, Some(&prefix))?;
        } else if !fakeroot_commands.is_empty() {
            run_commands(attrs, "fakeRootCommands", &fakeroot_commands, &root, None)?;
        }
        let packed = rootfs::pack_to_dir(&root, &out, &PackOptions { mtime, owners: Owners::FromFs })?;
        eprintln!("customisation layer: {} members, {} bytes", packed.members, packed.size);
        return Ok(());
    }

    let contents: Vec<PathBuf> = attrs.str_list("contents")?.into_iter().map(PathBuf::from).collect();
    crate::util::files::make_dir(&root)?;
    rootfs::join(&contents, &root)?;
    if attrs.bool("includeNixDB")? {
        // Registered at stdenv's SOURCE_DATE_EPOCH, as nixpkgs' mkDbExtraCommand does.
        crate::builder::build_image::write_nix_db(attrs, &root, STDENV_EPOCH)?;
    }

    let extra = attrs.opt_str("extraCommands")?.unwrap_or_default();
    if !extra.is_empty() {
        run_commands(attrs, "extraCommands", &extra, &root, None)?;
    }

    if fakeroot_commands.is_empty() && !fakechroot {
        // Without fakeroot every file would show the build user as owner; under fakeroot they
        // would all be root, which is what nixpkgs' layers have.
        let packed = rootfs::pack_to_dir(&root, &out, &PackOptions { mtime, owners: Owners::Root })?;
        eprintln!("customisation layer: {} members, {} bytes", packed.members, packed.size);
        return Ok(());
    }

    // Second stage under fakeroot: its LD_PRELOAD library fakes chown & co. for the commands,
    // and fakes what lstat tells our own (dynamically linked) packer, so the owners set by the
    // commands end up in the layer.
    let fakeroot = attrs.str("fakeroot").map_err(|_| anyhow!("fakeRootCommands: the derivation has no `fakeroot`"))?;
    let me = std::env::current_exe().context("cannot find the stevedore executable")?;
    let mut cmd = Command::new(&fakeroot);
    cmd.arg("--").arg(&me).args(["nix", "customisation-layer", "--inside-fakeroot"]);
    command_env(attrs, &mut cmd)?;
    let status = cmd.status().with_context(|| format!("cannot run {fakeroot}"))?;
    if !status.success() {
        bail!("the fakeroot stage failed ({status})");
    }
    if !out.join("checksum").exists() {
        bail!("fakeRootCommands: the layer was not written (did the commands `exit`?)");
    }
    Ok(())
}

/// Plans the store layers as nixpkgs does: `auto` (its auto-layer) unless a layeringPipeline
/// is given, which then sets its own limits (nixpkgs ignores maxLayers with a pipeline).
fn plan_store_layers(graph: &ClosureGraph, exclude: &[String], max_layers: u64, base_layers: usize, pipeline: Option<&Value>) -> Result<Vec<Vec<String>>> {
    let (strategy, max_layers) = match pipeline {
        Some(p) => (Strategy::Pipeline(Pipeline::from_json(p).context("layeringPipeline")?), usize::MAX),
        None => (Strategy::Auto, usize::try_from(max_layers).unwrap_or(usize::MAX)),
    };
    let opts = PlanOptions { strategy, max_layers, base_layers, roots: Vec::new(), exclude: exclude.to_vec() };
    plan_layers(graph, &opts)
}

/// The stream conf, as nixpkgs' `conf` derivation writes it: the base JSON (`config`,
/// `architecture`, `os`) plus the layering and image fields.
pub fn build_conf(attrs: &Attrs, out: &Path, now: &Timestamp) -> Result<Value> {
    let base_path = attrs.str("baseJson")?;
    let mut conf = match crate::util::limits::read_json_input(Path::new(&base_path))? {
        Value::Object(m) => m,
        other => bail!("{base_path}: expected an object, got {}", kind(&other)),
    };

    let graph = match attrs.get("closure") {
        None => ClosureGraph::default(),
        Some(v) => ClosureGraph::from_json_value(v).context("the closure graph (exportReferencesGraph)")?,
    };
    let from_image = attrs.opt_str("fromImage")?;
    let base_layers = match &from_image {
        None => 0,
        Some(p) => BaseImage::load(Path::new(p)).context("fromImage")?.layers.len(),
    };
    let pipeline = match attrs.get("layeringPipeline") {
        None => None,
        Some(Value::String(file)) => {
            let text = crate::util::limits::read_limited(Path::new(file), crate::util::limits::INPUT_LIMIT).map_err(|e| anyhow!("layeringPipeline: {e:#}"))?;
            Some(crate::util::limits::parse_json(&text, crate::util::limits::INPUT_VALUES).map_err(|e| anyhow!("layeringPipeline: {file}: {e:#}"))?)
        }
        Some(v @ Value::Array(_)) => Some(v.clone()),
        Some(other) => bail!("layeringPipeline: expected a list or a JSON file, got {}", kind(other)),
    };
    let exclude = attrs.str_list("excludePaths")?;
    // nixpkgs ignores maxLayers when a pipeline is given.
    let max_layers = if pipeline.is_some() { u64::MAX } else { attrs.u64("maxLayers")? };
    let store_layers = plan_store_layers(&graph, &exclude, max_layers, base_layers, pipeline.as_ref())?;
    if attrs.bool("debug")? {
        eprintln!("store layers: {}", serde_json::to_string_pretty(&store_layers)?);
    }

    let repo_tag = repo_tag(attrs, out)?;
    let uid = attrs.u64("uid")?;
    let gid = attrs.u64("gid")?;
    conf.insert("store_dir".into(), attrs.opt_str("storeDir")?.unwrap_or_else(|| "/nix/store".into()).into());
    conf.insert("from_image".into(), from_image.map_or(Value::Null, Value::from));
    conf.insert("store_layers".into(), serde_json::to_value(&store_layers)?);
    conf.insert("customisation_layer".into(), attrs.str("customisationLayer")?.into());
    conf.insert("repo_tag".into(), repo_tag.into());
    conf.insert("created".into(), conf_time("created", &attrs.str("created")?, now)?.into());
    conf.insert("mtime".into(), conf_time("mtime", &attrs.str("mtime")?, now)?.into());
    conf.insert("uid".into(), uid.into());
    conf.insert("gid".into(), gid.into());
    conf.insert("uname".into(), attrs.str("uname")?.into());
    conf.insert("gname".into(), attrs.str("gname")?.into());
    let conf = Value::Object(conf);
    // Fail the build, not the first `docker load`, on a conf the streamer would reject.
    StreamConf::from_value(conf.clone(), now)?;
    Ok(conf)
}

/// Single-quotes a word for the shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn stream_script(attrs: &Attrs) -> Result<()> {
    let shell = attrs.str("shell")?;
    if !shell.starts_with('/') {
        bail!("shell: {shell:?} is not an absolute path");
    }
    let script = format!(
        "#!{shell}\n# Streams the image as a Docker archive to stdout; try --help.\nexec {} stream {} \"$@\"\n",
        shell_quote(&attrs.str("stevedore")?),
        shell_quote(&attrs.str("conf")?)
    );
    write_new(&attrs.out()?, script.as_bytes(), 0o555)
}

/// `push-script`: `shell`, `stevedore`, `conf`, `imageRef` → `$out`, an executable that runs
/// `stevedore push CONF DEST [OPTIONS]`, DEST defaulting to `docker://<imageRef>`.
fn push_script(attrs: &Attrs) -> Result<()> {
    let shell = attrs.str("shell")?;
    if !shell.starts_with('/') {
        bail!("shell: {shell:?} is not an absolute path");
    }
    let image_ref = attrs.str("imageRef")?;
    crate::image::reference::check_repo_tag(&image_ref).map_err(|e| anyhow!("imageRef: {e}"))?;
    let script = format!(
        "#!{shell}\n# Pushes the image to a registry: [docker://REGISTRY/REPO:TAG] [stevedore push options].\n\
         dest=docker://{}\ncase \"${{1:-}}\" in docker://*) dest=$1; shift ;; esac\n\
         exec {} push {} \"$dest\" \"$@\"\n",
        shell_quote(&image_ref),
        shell_quote(&attrs.str("stevedore")?),
        shell_quote(&attrs.str("conf")?)
    );
    write_new(&attrs.out()?, script.as_bytes(), 0o555)
}

/// `imageName:TAG`, TAG from [`tag_or_hash`], once Docker would read it as an image reference
/// (the error names nixpkgs' arguments, `name` and `tag`).
pub(crate) fn repo_tag(attrs: &Attrs, out: &Path) -> Result<String> {
    let repo_tag = format!("{}:{}", attrs.str("imageName")?, tag_or_hash(attrs, out)?);
    crate::image::reference::check_repo_tag(&repo_tag).map_err(|e| anyhow!("name and tag: {e}"))?;
    Ok(repo_tag)
}

/// The attribute `tag`, or as nixpkgs tags an untagged image: the hash part of `out`, the
/// derivation's own output path.
pub(crate) fn tag_or_hash(attrs: &Attrs, out: &Path) -> Result<String> {
    Ok(match attrs.opt_str("tag")? {
        Some(t) => t,
        None => {
            let base = out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            base.split('-').next().unwrap_or_default().to_string()
        }
    })
}

fn archive(attrs: &Attrs) -> Result<()> {
    let now = conf::now();
    let conf = StreamConf::load(Path::new(&attrs.str("conf")?), &now)?;
    write_image(&conf, attrs)
}

/// Writes the image to `$out` as the attribute `format` says: a Docker archive (the default)
/// compressed whole by `compressor` (as nixpkgs' buildLayeredImage does), or an OCI image
/// layout directory or oci-archive with each layer compressed by it.
pub(crate) fn write_image(conf: &StreamConf, attrs: &Attrs) -> Result<()> {
    let out = &attrs.out()?;
    let compressor = attrs.str("compressor")?;
    let compressor = Compressor::parse(&compressor).map_err(|_| anyhow!("compressor: {compressor:?} is not one of none, gz, zstd"))?;
    let format = match attrs.opt_str("format")? {
        None => Format::DockerArchive,
        Some(f) => Format::from_name(&f).map_err(|e| anyhow!("format: {e}"))?,
    };
    let progress = crate::util::progress::Progress { quiet: false };
    let create = || -> Result<BufWriter<File>> {
        let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        Ok(BufWriter::with_capacity(1 << 20, file))
    };
    match format {
        Format::DockerArchive => {
            let w = create()?;
            let mut w = match compressor {
                Compressor::None => image::stream(conf, None, w, &progress)?,
                kind => {
                    let enc = image::stream(conf, None, crate::compress::ParallelEncoder::new(w, kind), &progress)?;
                    enc.finish().with_context(|| format!("cannot write {}", out.display()))?
                }
            };
            w.flush().with_context(|| format!("cannot write {}", out.display()))
        }
        Format::Oci | Format::OciArchive => {
            let spec = image::ImageSpec::new(conf)?;
            let dir = if format == Format::Oci { out.to_path_buf() } else { build_top()?.join("oci-layout") };
            let written = crate::image::oci::write_layout(&spec, &dir, compressor, &conf.repo_tag, &progress)?;
            if format == Format::OciArchive {
                let mut w = create()?;
                crate::image::oci::tar_layout(&dir, &mut w, conf.mtime)?;
                w.flush().with_context(|| format!("cannot write {}", out.display()))?;
            }
            progress.say(format!("Done: {}", written.manifest.digest));
            Ok(())
        }
    }
}

fn merge_images(attrs: &Attrs) -> Result<()> {
    let out = attrs.out()?;
    let images: Vec<PathBuf> = attrs.str_list("images")?.into_iter().map(PathBuf::from).collect();
    let scratch = crate::util::files::TempDir::new_in(&build_top()?)?;
    let file = File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let progress = crate::util::progress::Progress { quiet: false };
    let mut w = crate::image::merge::merge(&images, &scratch.0, BufWriter::with_capacity(1 << 20, file), &progress)?;
    w.flush().with_context(|| format!("cannot write {}", out.display()))
}

fn files(attrs: &Attrs) -> Result<()> {
    let (out, files) = output_tree(attrs, "files", "an attribute set of relative path = { text; executable; } or { directory = true; }")?;
    for (rel, spec) in files {
        let path = tree_path(&out, "files", rel)?;
        let spec = Attrs::from_value(spec.clone()).map_err(|_| anyhow!("files.{rel}: expected an attribute set, got {}", kind(spec)))?;
        let dir = if spec.bool("directory").with_context(|| format!("files.{rel}"))? { path.as_path() } else { path.parent().unwrap_or(&out) };
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if dir == path {
            continue;
        }
        let text = spec.str("text").with_context(|| format!("files.{rel}"))?;
        let mode = if spec.bool("executable").with_context(|| format!("files.{rel}"))? { 0o555 } else { 0o444 };
        write_new(&path, text.as_bytes(), mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        Timestamp { iso: "2030-01-01T00:00:00+00:00".into(), unix: 1893456000 }
    }

    #[test]
    fn conf_times_are_whole_utc_seconds() {
        let n = now();
        assert_eq!(conf_time("created", "1970-01-01T00:00:01Z", &n).unwrap(), "1970-01-01T00:00:01+00:00");
        assert_eq!(conf_time("created", "2024-05-01T12:00:00.75+02:00", &n).unwrap(), "2024-05-01T10:00:00+00:00");
        assert_eq!(conf_time("created", "2024-05-01", &n).unwrap(), "2024-05-01T00:00:00+00:00");
        assert_eq!(conf_time("created", "now", &n).unwrap(), "now");
        let e = conf_time("mtime", "yesterday", &n).unwrap_err().to_string();
        assert!(e.starts_with("mtime: "), "{e}");
    }

    #[test]
    fn attrs_errors_name_the_field() {
        let a = Attrs::from_value(json!({"maxLayers": "x", "uid": -1, "tag": 3, "outputs": {"out": "/nix/store/abc-x"}})).unwrap();
        assert!(a.u64("maxLayers").unwrap_err().to_string().starts_with("maxLayers: "));
        assert!(a.u64("uid").unwrap_err().to_string().starts_with("uid: "));
        assert!(a.opt_str("tag").unwrap_err().to_string().starts_with("tag: "));
        assert_eq!(a.out().unwrap(), PathBuf::from("/nix/store/abc-x"));
        assert!(!a.bool("enableFakechroot").unwrap());
    }

    #[test]
    fn plan_respects_the_budget_and_excludes() {
        let graph = ClosureGraph::from_json_value(&json!([
            {"path": "/nix/store/00000000000000000000000000000000-a", "narSize": 1, "references": []},
            {"path": "/nix/store/11111111111111111111111111111111-b", "narSize": 2, "references": ["/nix/store/00000000000000000000000000000000-a"]},
            {"path": "/nix/store/22222222222222222222222222222222-c", "narSize": 3, "references": ["/nix/store/11111111111111111111111111111111-b"]},
            {"path": "/nix/store/33333333333333333333333333333333-d", "narSize": 4, "references": ["/nix/store/22222222222222222222222222222222-c"]}
        ]))
        .unwrap();
        let layers = plan_store_layers(&graph, &[], 3, 0, None).unwrap();
        assert!(layers.len() <= 2, "{layers:?}");
        assert_eq!(layers.iter().map(Vec::len).sum::<usize>(), 4);
        let excl = vec!["/nix/store/33333333333333333333333333333333-d".to_string()];
        let layers = plan_store_layers(&graph, &excl, 100, 0, None).unwrap();
        assert!(layers.iter().flatten().all(|p| !p.ends_with("-d")));
        let e = plan_store_layers(&graph, &[], 2, 1, None).unwrap_err().to_string();
        assert!(e.starts_with("maxLayers 2 is too low"), "{e}");
        // A pipeline ignores maxLayers, as in nixpkgs.
        let layers = plan_store_layers(&graph, &[], 1, 0, Some(&json!([["popularity_contest"]]))).unwrap();
        assert_eq!(layers.iter().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    fn files_writes_texts_modes_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let attrs = |files: Value| Attrs::from_value(json!({"outputs": {"out": out}, "files": files})).unwrap();
        files(&attrs(json!({
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
        let e = files(&attrs(json!({"../x": {"text": ""}}))).unwrap_err().to_string();
        assert!(e.contains("not a clean relative path"), "{e}");
        fs::remove_dir_all(&out).unwrap();
        let e = files(&attrs(json!({"x": {"executable": true}}))).unwrap_err();
        assert!(format!("{e:#}").starts_with("files.x: text: missing"), "{e:#}");
    }

    #[test]
    fn attrs_file_outside_the_sandbox_falls_back_to_the_build_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let inside = tmp.path().join(".attrs.json");
        let outside = tmp.path().join("outside/.attrs.json");
        let top = Some(tmp.path().to_path_buf());
        // Missing everywhere: the variable's path, for the error message.
        assert_eq!(attrs_path(Some(outside.clone()), top.clone()), outside);
        fs::write(&inside, "{}").unwrap();
        assert_eq!(attrs_path(Some(outside.clone()), top.clone()), inside);
        assert_eq!(attrs_path(None, top.clone()), inside);
        fs::create_dir_all(outside.parent().unwrap()).unwrap();
        fs::write(&outside, "{}").unwrap();
        assert_eq!(attrs_path(Some(outside.clone()), top), outside);
    }

    #[test]
    fn stream_script_quotes() {
        assert_eq!(shell_quote("/nix/store/x-a?b"), "'/nix/store/x-a?b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
