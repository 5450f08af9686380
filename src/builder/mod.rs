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
//! the argument at fault; [`attrs`] declares them, and refuses any other):
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
//! - `sbom`: `conf`, `closure` (the graph of `[ conf ]`), `packages` (the `meta` of what the user
//!   passed: `[{ path, license, homepage, description }]`), `sbomFormat` (`cyclonedx`, `spdx`)
//!   → `$out`, the document (see `crate::supply_chain`).
//! - `archive`: `conf`, `compressor` (`none`, `gz`, `zstd`), `format` (`docker-archive`,
//!   `oci`, `oci-archive`) → `$out`, the image.
//! - `push-script`: `shell`, `stevedore`, `conf` (a conf or an archive), `imageRef`, `attach`
//!   (documents to attach: passthru.sbom), `sign` (a key's path or `env://VAR`) → `$out`,
//!   an executable that pushes the image.
//! - `load-script`: `shell`, `stevedore`, `conf`, `runtime` (`podman`, `docker`, `containerd`)
//!   → `$out`, an executable that loads the image into that runtime (`stevedore load`).
//! - `image-layer`, `image`, `export`: buildImage and exportImage (see `build_image.rs`).
//! - `merge`: `images` (Docker archives or stream executables) → `$out`, one archive holding
//!   them all (see `crate::image::merge`).
//! - `files`: `files = { "rel/path" = { text = "..."; executable = bool; } or { directory = true; }; }`
//!   → `$out`, a directory of those files (fakeNss-style trees, small scripts in `bin/`).
//!
//! `stevedore nix pack ROOT DIR` packs a directory the way the customisation layer is packed.

pub mod attrs;
pub mod build_image;
mod files;
mod layered;

use crate::image::conf::{self, Timestamp};
use crate::rootfs::{self, Owners, PackOptions};
use anyhow::{anyhow, bail, Context, Result};
use attrs::ActionAttrs;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to build. Each action but `Pack` reads the attributes of its struct in `attrs`
/// (`Text` reads `attrs::Text`, and so on), which documents them; `stevedore nix --help` says
/// what each action makes.
#[derive(Debug, Clone)]
pub enum Action {
    Text,
    Symlinks,
    Files,
    /// `inside_fakeroot`: the second stage, which the first runs inside `fakeroot`.
    CustomisationLayer { inside_fakeroot: bool },
    Conf,
    StreamScript,
    PushScript,
    LoadScript,
    Sbom,
    Archive,
    ImageLayer,
    Image,
    Export,
    Merge,
    /// Pack directory `root` into `dir`/layer.tar and `dir`/checksum, every member at `mtime`.
    Pack { root: PathBuf, dir: PathBuf, mtime: i64, owners: Owners },
}

/// Builds one action's output from the attributes Nix passed.
pub fn run(action: &Action) -> Result<()> {
    match action {
        Action::Text => files::text(attrs::Text::load()?),
        Action::Symlinks => files::symlinks(attrs::Symlinks::load()?),
        Action::Files => files::files(attrs::Files::load()?),
        Action::CustomisationLayer { inside_fakeroot } => layered::customisation_layer(attrs::CustomisationLayer::load()?, *inside_fakeroot),
        Action::Conf => layered::conf(attrs::Conf::load()?),
        Action::StreamScript => layered::stream_script(attrs::StreamScript::load()?),
        Action::PushScript => layered::push_script(attrs::PushScript::load()?),
        Action::LoadScript => layered::load_script(attrs::LoadScript::load()?),
        Action::Sbom => layered::sbom(attrs::Sbom::load()?),
        Action::Archive => layered::archive(attrs::Archive::load()?),
        Action::Merge => layered::merge_images(attrs::Merge::load()?),
        Action::ImageLayer => build_image::image_layer(attrs::ImageLayer::load()?),
        Action::Image => build_image::image(attrs::Image::load()?),
        Action::Export => build_image::export(attrs::Export::load()?),
        Action::Pack { root, dir, mtime, owners } => {
            let packed = rootfs::pack_to_dir(root, dir, &PackOptions { mtime: *mtime, owners: *owners })?;
            eprintln!("packed {} members, {} bytes, sha256 {}", packed.members, packed.size, crate::util::hex(&packed.digest));
            Ok(())
        }
    }
}

/// Writes a new file whole, with the given mode.
pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).with_context(|| format!("cannot chmod {}", path.display()))
}

/// Parses `created`/`mtime` as the conf does (ISO-8601 or "now").
pub(crate) fn parse_time(field: &str, value: &str, now: &Timestamp) -> Result<Timestamp> {
    conf::parse_time(value, now).map_err(|e| anyhow!("{field}: {e}"))
}

/// The build directory: commands run and trees are built under it.
pub(crate) fn build_top() -> Result<PathBuf> {
    match std::env::var_os("NIX_BUILD_TOP") {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_dir().context("cannot find the working directory"),
    }
}

/// stdenv's `SOURCE_DATE_EPOCH` (1980-01-01): nixpkgs' file and registration times in builds.
pub const STDENV_EPOCH: i64 = 315532800;

/// How a derivation's commands (extraCommands, fakeRootCommands) run: its `shell`, with its
/// `path` as `PATH`, `out` and stdenv's `SOURCE_DATE_EPOCH`, which scripts written for nixpkgs
/// may use.
pub(crate) struct Commands<'a> {
    pub shell: Option<&'a str>,
    pub path: Option<&'a str>,
    pub out: &'a Path,
}

impl Commands<'_> {
    /// What commands see besides the build's environment.
    pub(crate) fn vars(&self) -> [(&'static str, std::ffi::OsString); 3] {
        [("PATH", self.path.unwrap_or_default().into()), ("out", self.out.into()), ("SOURCE_DATE_EPOCH", STDENV_EPOCH.to_string().into())]
    }

    /// Runs `script` with the shell, in `dir` (or under `proot`'s command), with the tools on
    /// `PATH`. `-e` stops at the first failing command, as nixpkgs' builders do.
    pub(crate) fn run(&self, field: &str, script: &str, dir: &Path, proot: Option<&[String]>) -> Result<()> {
        let shell = self.shell.ok_or_else(|| anyhow!("{field}: no shell to run it with (the derivation has no `shell`)"))?;
        let mut cmd = match proot {
            None => {
                let mut c = Command::new(shell);
                c.current_dir(dir);
                c
            }
            Some(prefix) => {
                let mut c = Command::new(&prefix[0]);
                c.args(&prefix[1..]).arg(shell);
                c
            }
        };
        cmd.args(["-e", "-c", script]);
        cmd.envs(self.vars());
        let status = cmd.status().with_context(|| format!("{field}: cannot run {}", cmd.get_program().to_string_lossy()))?;
        if !status.success() {
            bail!("{field} failed ({status})");
        }
        Ok(())
    }
}

/// `imageName:TAG`, TAG from [`tag_or_hash`], once Docker would read it as an image reference
/// (the error names nixpkgs' arguments, `name` and `tag`).
pub(crate) fn repo_tag(image_name: &str, tag: Option<&str>, out: &Path) -> Result<String> {
    let repo_tag = format!("{image_name}:{}", tag_or_hash(tag, out));
    crate::image::reference::check_repo_tag(&repo_tag).map_err(|e| anyhow!("name and tag: {e}"))?;
    Ok(repo_tag)
}

/// The attribute `tag`, or as nixpkgs tags an untagged image: the hash part of `out`, the
/// derivation's own output path.
pub(crate) fn tag_or_hash(tag: Option<&str>, out: &Path) -> String {
    match tag {
        Some(t) => t.to_string(),
        None => {
            let base = out.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            base.split('-').next().unwrap_or_default().to_string()
        }
    }
}
