//! streamLayeredImage and buildLayeredImage: the customisation layer, the stream conf with its
//! planned store layers, the scripts that stream and push the image, the archive; and
//! mergeImages.

use crate::image::conf::shell_quote;
use super::attrs::{self, kind};
use super::{build_top, parse_time, repo_tag, write_new, Commands, STDENV_EPOCH};
use crate::compress::Compressor;
use crate::image::base::BaseImage;
use crate::image::conf::{self, StreamConf, Timestamp};
use crate::image::{self, Format};
use crate::layering::{plan_layers, Pipeline, PlanOptions, Strategy};
use crate::nixstore::ClosureGraph;
use crate::rootfs::{self, Owners, PackOptions};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `customisation-layer`: `contents` joined, the Nix database, `extraCommands`, then (in a
/// second stage under fakeroot) `fakeRootCommands`, packed into `$out/layer.tar`.
pub(super) fn customisation_layer((out, a): (PathBuf, attrs::CustomisationLayer), inside_fakeroot: bool) -> Result<()> {
    let root = build_top()?.join("root");
    let now = conf::now();
    let mtime = parse_time("mtime", &a.mtime, &now)?.unix;
    let fakeroot_commands = a.fake_root_commands.clone().unwrap_or_default();
    let commands = Commands { shell: a.shell.as_deref(), path: a.path.as_deref(), out: &out };

    if inside_fakeroot {
        if a.enable_fakechroot {
            // As nixpkgs does, the commands see the image's root as `/`, with the store, the
            // kernel file systems and the build directory bound in. proot leaves no trace of
            // the bindings in the tree, so packing happens outside it, still under fakeroot.
            let proot = a.proot.clone().ok_or_else(|| anyhow!("enableFakechroot: the derivation has no `proot`"))?;
            let store_dir = a.store_dir.as_deref().unwrap_or("/nix/store");
            let top = build_top()?;
            let mut prefix = vec![proot, "-r".into(), root.display().to_string()];
            for p in ["/dev/".to_string(), "/proc/".into(), "/sys/".into(), format!("{store_dir}/"), top.display().to_string()] {
                prefix.push(format!("--bind={p}:{p}!"));
            }
            prefix.extend(["-w".into(), "/".into()]);
            commands.run("fakeRootCommands", &fakeroot_commands, &root, Some(&prefix))?;
        } else if !fakeroot_commands.is_empty() {
            commands.run("fakeRootCommands", &fakeroot_commands, &root, None)?;
        }
        let packed = rootfs::pack_to_dir(&root, &out, &PackOptions { mtime, owners: Owners::FromFs })?;
        eprintln!("customisation layer: {} members, {} bytes", packed.members, packed.size);
        return Ok(());
    }

    let contents: Vec<PathBuf> = a.contents.iter().map(PathBuf::from).collect();
    crate::util::files::make_dir(&root)?;
    rootfs::join(&contents, &root)?;
    if a.include_nix_db {
        // Registered at stdenv's SOURCE_DATE_EPOCH, as nixpkgs' mkDbExtraCommand does.
        super::build_image::write_nix_db(a.db_closure.as_ref(), &a.db_roots, &root, STDENV_EPOCH)?;
    }

    let extra = a.extra_commands.clone().unwrap_or_default();
    if !extra.is_empty() {
        commands.run("extraCommands", &extra, &root, None)?;
    }

    if fakeroot_commands.is_empty() && !a.enable_fakechroot {
        // Without fakeroot every file would show the build user as owner; under fakeroot they
        // would all be root, which is what nixpkgs' layers have.
        let packed = rootfs::pack_to_dir(&root, &out, &PackOptions { mtime, owners: Owners::Root })?;
        eprintln!("customisation layer: {} members, {} bytes", packed.members, packed.size);
        return Ok(());
    }

    // Second stage under fakeroot: its LD_PRELOAD library fakes chown & co. for the commands,
    // and fakes what lstat tells our own (dynamically linked) packer, so the owners set by the
    // commands end up in the layer.
    let fakeroot = a.fakeroot.clone().ok_or_else(|| anyhow!("fakeRootCommands: the derivation has no `fakeroot`"))?;
    let me = std::env::current_exe().context("cannot find the stevedore executable")?;
    let mut cmd = Command::new(&fakeroot);
    cmd.arg("--").arg(&me).args(["nix", "customisation-layer", "--inside-fakeroot"]);
    cmd.envs(commands.vars());
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

/// `conf`: the stream conf `stevedore stream` reads.
pub(super) fn conf((out, a): (PathBuf, attrs::Conf)) -> Result<()> {
    let conf = build_conf(&a, &out, &conf::now())?;
    write_new(&out, serde_json::to_string_pretty(&conf)?.as_bytes(), 0o444)
}

/// The stream conf, as nixpkgs' `conf` derivation writes it: the base JSON (`config`,
/// `architecture`, `os`) plus the layering and image fields.
pub fn build_conf(a: &attrs::Conf, out: &Path, now: &Timestamp) -> Result<Value> {
    let mut conf = match crate::util::limits::read_json_input(Path::new(&a.base_json))? {
        Value::Object(m) => m,
        other => bail!("{}: expected an object, got {}", a.base_json, kind(&other)),
    };

    let graph = match &a.closure {
        None => ClosureGraph::default(),
        Some(v) => ClosureGraph::from_json_value(v).context("the closure graph (exportReferencesGraph)")?,
    };
    let base_layers = match &a.from_image {
        None => 0,
        Some(p) => BaseImage::load(Path::new(p)).context("fromImage")?.layers.len(),
    };
    let pipeline = match &a.layering_pipeline {
        None => None,
        Some(Value::String(file)) => {
            let text = crate::util::limits::read_limited(Path::new(file), crate::util::limits::INPUT_LIMIT).map_err(|e| anyhow!("layeringPipeline: {e:#}"))?;
            Some(crate::util::limits::parse_json(&text, crate::util::limits::INPUT_VALUES).map_err(|e| anyhow!("layeringPipeline: {file}: {e:#}"))?)
        }
        Some(v @ Value::Array(_)) => Some(v.clone()),
        Some(other) => bail!("layeringPipeline: expected a list or a JSON file, got {}", kind(other)),
    };
    // nixpkgs ignores maxLayers when a pipeline is given.
    let max_layers = match (&pipeline, a.max_layers) {
        (Some(_), _) => u64::MAX,
        (None, Some(n)) => n,
        (None, None) => bail!("maxLayers: missing"),
    };
    let store_layers = plan_store_layers(&graph, &a.exclude_paths, max_layers, base_layers, pipeline.as_ref())?;
    if a.debug {
        eprintln!("store layers: {}", serde_json::to_string_pretty(&store_layers)?);
    }

    let repo_tag = repo_tag(&a.image_name, a.tag.as_deref(), out)?;
    conf.insert("store_dir".into(), a.store_dir.as_deref().unwrap_or("/nix/store").into());
    conf.insert("from_image".into(), a.from_image.clone().map_or(Value::Null, Value::from));
    conf.insert("store_layers".into(), serde_json::to_value(&store_layers)?);
    conf.insert("customisation_layer".into(), a.customisation_layer.clone().into());
    conf.insert("repo_tag".into(), repo_tag.into());
    conf.insert("created".into(), conf_time("created", &a.created, now)?.into());
    conf.insert("mtime".into(), conf_time("mtime", &a.mtime, now)?.into());
    conf.insert("uid".into(), a.uid.into());
    conf.insert("gid".into(), a.gid.into());
    conf.insert("uname".into(), a.uname.clone().into());
    conf.insert("gname".into(), a.gname.clone().into());
    let conf = Value::Object(conf);
    // Fail the build, not the first `docker load`, on a conf the streamer would reject.
    StreamConf::from_value(conf.clone(), now)?;
    Ok(conf)
}

fn check_shell(shell: &str) -> Result<()> {
    if !shell.starts_with('/') {
        bail!("shell: {shell:?} is not an absolute path");
    }
    Ok(())
}

/// `stream-script`: an executable that runs `stevedore stream CONF "$@"`.
pub(super) fn stream_script((out, a): (PathBuf, attrs::StreamScript)) -> Result<()> {
    check_shell(&a.shell)?;
    write_new(&out, crate::image::conf::stream_script(&a.shell, &a.stevedore, &a.conf).as_bytes(), 0o555)
}

/// `push-script`: an executable that runs `stevedore push CONF DEST [OPTIONS]`, DEST
/// defaulting to `docker://<imageRef>`.
pub(super) fn push_script((out, a): (PathBuf, attrs::PushScript)) -> Result<()> {
    check_shell(&a.shell)?;
    crate::image::reference::check_repo_tag(&a.image_ref).map_err(|e| anyhow!("imageRef: {e}"))?;
    let mut attach: String = a.attach.iter().map(|f| format!(" --attach {}", shell_quote(f))).collect();
    if let Some(key) = &a.sign {
        // The key's name only: it is read when the script runs, never in the build.
        if !key.starts_with("env://") && !key.starts_with('/') {
            bail!("sign: {key:?} is neither an absolute path nor env://VAR");
        }
        attach.push_str(&format!(" --sign {}", shell_quote(key)));
    }
    if let Some(predicate) = &a.provenance {
        if a.sign.is_none() {
            bail!("provenance: attesting needs sign");
        }
        attach.push_str(&format!(" --provenance {}", shell_quote(predicate)));
    }
    if let Some(c) = a.compressor {
        let name = <Compressor as crate::util::shared::Choice>::CHOICES.iter().find(|x| x.1 == c).map_or("gz", |x| x.0);
        attach.push_str(&format!(" --compressor {}", shell_quote(name)));
    }
    let script = format!(
        "#!{}\n# Pushes the image to a registry: [docker://REGISTRY/REPO:TAG] [stevedore push options].\n\
         dest=docker://{}\ncase \"${{1:-}}\" in docker://*) dest=$1; shift ;; esac\n\
         exec {} push {} \"$dest\"{attach} \"$@\"\n",
        a.shell,
        shell_quote(&a.image_ref),
        shell_quote(&a.stevedore),
        shell_quote(&a.conf)
    );
    write_new(&out, script.as_bytes(), 0o555)
}

/// `load-script`: an executable that runs `stevedore load CONF --into RUNTIME [OPTIONS]`.
pub(super) fn load_script((out, a): (PathBuf, attrs::LoadScript)) -> Result<()> {
    use crate::util::shared::Choice;
    check_shell(&a.shell)?;
    crate::serve::load::Runtime::from_name(&a.runtime).map_err(|e| anyhow!("runtime: {e:#}"))?;
    let script = format!(
        "#!{}\n# Loads the image into {}, sending only the layers it lacks: [stevedore load options].\n\
         exec {} load --into {} {} \"$@\"\n",
        a.shell,
        a.runtime,
        shell_quote(&a.stevedore),
        shell_quote(&a.runtime),
        shell_quote(&a.conf)
    );
    write_new(&out, script.as_bytes(), 0o555)
}

/// `sbom`: the image's bill of materials, from the conf and the graph of its closure.
pub(super) fn sbom((out, a): (PathBuf, attrs::Sbom)) -> Result<()> {
    use crate::supply_chain::{self, PathInfos, SbomFormat};
    use crate::util::shared::Choice;
    // passthru.provenance is the same facts in another document.
    let format = match a.format.as_str() {
        "slsa-provenance" => None,
        name => Some(SbomFormat::from_name(name).map_err(|e| anyhow!("sbomFormat: {e}"))?),
    };
    let conf = StreamConf::load(Path::new(&a.conf), &conf::now())?;
    let graph = a.closure.ok_or_else(|| anyhow!("closure: missing (exportReferencesGraph of the conf)"))?;
    let graph = crate::nixstore::ClosureGraph::from_json_value(&graph).map_err(|e| anyhow!("closure: {e:#}"))?;
    let packages = match &a.packages {
        None => vec![],
        Some(v) => supply_chain::parse_packages(v)?,
    };
    let input = supply_chain::describe(&conf, &PathInfos::Graph(graph), packages, &crate::util::progress::Progress { quiet: true })?;
    eprintln!("{} of {}:{}: {} store paths in {} layers", a.format, input.name, input.tag, input.objects.len(), input.layers.len());
    let doc = match format {
        Some(format) => format.render(&input),
        None => supply_chain::provenance::predicate(&input, a.derivation.as_deref()).map_err(|e| anyhow!("provenance: {e:#}"))?,
    };
    write_new(&out, doc.as_bytes(), 0o444)
}

/// `archive`: the image of a conf, as `format` and `compressor` say.
pub(super) fn archive((out, a): (PathBuf, attrs::Archive)) -> Result<()> {
    let now = conf::now();
    let conf = StreamConf::load(Path::new(&a.conf), &now)?;
    write_image(&conf, &out, a.compressor, a.format)
}

/// Writes the image to `out` as `format` says: a Docker archive (the default) compressed whole
/// by `compressor` (as nixpkgs' buildLayeredImage does), or an OCI image layout directory or
/// oci-archive with each layer compressed by it.
pub(crate) fn write_image(conf: &StreamConf, out: &Path, compressor: Compressor, format: Format) -> Result<()> {
    let progress = crate::util::progress::Progress { quiet: false };
    let create = || -> Result<BufWriter<File>> {
        let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        Ok(BufWriter::with_capacity(1 << 20, file))
    };
    match format {
        Format::DockerArchive => {
            if compressor == Compressor::ZstdChunked {
                bail!("compressor \"zstd:chunked\" is a layer format: use it with format = \"oci\" or \"oci-archive\" (a Docker archive is compressed whole; use \"zstd\")");
            }
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
            let written = if format == Format::Oci {
                crate::image::oci::write_layout(&spec, out, compressor, &conf.repo_tag, &progress)?
            } else {
                let mut w = create()?;
                let written = crate::image::oci::write_archive(&spec, &build_top()?, compressor, &conf.repo_tag, &mut w, conf.mtime, &progress)?;
                w.flush().with_context(|| format!("cannot write {}", out.display()))?;
                written
            };
            progress.say(format!("Done: {}", written.manifest.digest));
            Ok(())
        }
    }
}

/// `merge`: the images in one Docker archive.
pub(super) fn merge_images((out, a): (PathBuf, attrs::Merge)) -> Result<()> {
    let images: Vec<PathBuf> = a.images.iter().map(PathBuf::from).collect();
    let scratch = crate::util::files::TempDir::new_in(&build_top()?)?;
    let file = File::create(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let progress = crate::util::progress::Progress { quiet: false };
    let mut w = crate::image::merge::merge(&images, &scratch.0, BufWriter::with_capacity(1 << 20, file), &progress)?;
    w.flush().with_context(|| format!("cannot write {}", out.display()))
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
    fn stream_script_quotes() {
        assert_eq!(shell_quote("/nix/store/x-a?b"), "'/nix/store/x-a?b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
