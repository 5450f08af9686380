//! The image commands: stream, layers, export, nixdb, run-as-root, merge, and the hidden
//! builder mode (`nix ACTION`).

use super::{choice, with_output};
use anyhow::{anyhow, bail, Result};
use std::io::Write;
use std::path::PathBuf;
use stevedore::compress::Compressor;
use stevedore::image::{self, conf, flatten, oci, Format};
use stevedore::layering::{human_bytes, layer_bytes, plan_layers, sharing, Pipeline, PlanOptions, Sharing, Strategy};
use stevedore::nixstore::{db, ClosureGraph, GraphFormat, StorePath};
use stevedore::rootfs::Owners;
use stevedore::rootless::IdMapping;
use stevedore::util::progress::Progress;

#[derive(clap::Args)]
pub struct StreamCmd {
    /// The conf JSON file.
    conf: PathBuf,
    /// Override the image's repository and tag (`name:tag`; a name alone means `name:latest`).
    #[arg(short = 't', long = "repo_tag", visible_alias = "repo-tag", value_name = "NAME:TAG")]
    repo_tag: Option<String>,
    /// Write the archive to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    quiet: bool,
    /// The output format: a Docker archive (`docker save` format), an OCI image layout
    /// directory (needs --output), or that layout as a tar.
    #[arg(long, value_parser = choice::<Format>(), default_value = "docker-archive")]
    format: Format,
    /// How OCI layers are compressed, each on its own: none, gz or zstd (default gz).
    /// Docker archives keep uncompressed layers, as nixpkgs writes them.
    #[arg(long, value_name = "none|gz|zstd")]
    compressor: Option<String>,
    /// Deflate level of gz layers, 1 (fastest) to 9 (smallest); the default, 4, is about as
    /// small as pigz's 6 at several times its speed. Other levels make other bytes.
    #[arg(long, value_name = "1-9")]
    gzip_level: Option<u32>,
}

impl StreamCmd {
    pub fn run(self) -> Result<()> {
        let StreamCmd { conf: conf_path, repo_tag, output, quiet, format, compressor, gzip_level } = self;
        if let Some(tag) = &repo_tag {
            image::reference::check_repo_tag(tag).map_err(|e| anyhow!("--repo_tag: {e}"))?;
        }
        let repo_tag = repo_tag.map(|t| image::reference::with_default_tag(&t));
        let now = conf::now();
        let conf = conf::StreamConf::load(&conf_path, &now)?;
        let progress = Progress { quiet };
        let compressor = match (format, compressor.as_deref()) {
            (Format::DockerArchive, None | Some("none")) => Compressor::None,
            (Format::DockerArchive, Some(_)) => bail!("--compressor applies to OCI formats; Docker archives keep uncompressed layers"),
            (_, None) => Compressor::GZIP,
            (_, Some(c)) => Compressor::parse(c)?,
        }
        .with_gzip_level(gzip_level)?;
        let tag = repo_tag.as_deref().unwrap_or(&conf.repo_tag).to_string();
        match format {
            Format::Oci => {
                let Some(dir) = output else { bail!("--format oci writes a directory: give it with --output") };
                let spec = image::ImageSpec::new(&conf)?;
                let written = oci::write_layout(&spec, &dir, compressor, &tag, &progress)?;
                progress.say(format!("Done: {} in {}", written.manifest.digest, dir.display()));
                Ok(())
            }
            Format::DockerArchive | Format::OciArchive => with_output(output.as_deref(), |w| {
                if format == Format::DockerArchive {
                    return image::stream(&conf, repo_tag.as_deref(), w, &progress).map(drop);
                }
                let spec = image::ImageSpec::new(&conf)?;
                let scratch_parent = output.as_deref().and_then(|o| o.parent()).filter(|p| !p.as_os_str().is_empty());
                let mut w = w;
                let written = oci::write_archive(&spec, scratch_parent.unwrap_or(&stevedore::util::settings::get().temp_dir), compressor, &tag, &mut w, conf.mtime, &progress)?;
                progress.say(format!("Done: {}", written.manifest.digest));
                Ok(())
            }),
        }
    }
}

#[derive(clap::Args)]
#[command(
    about = "Plan layers from a closure graph",
    long_about = "Plan layers from a closure graph.\n\n\
GRAPH is a closure graph as Nix writes it: exportReferencesGraph under __structuredAttrs (a JSON \
list of {path, narHash, narSize, closureSize, references}, or a .attrs.json holding it as \
`graph`), exportReferencesGraph's text format, or closureInfo's `registration` or `store-paths`. \
`-` reads stdin.\n\n\
The plan, a JSON list of layers (bottom first), each a list of store paths, goes to stdout; it is \
what a streamLayeredImage conf holds as `store_layers`. With --explain a table goes there instead.\n\n\
maxLayers counts as nixpkgs counts it: base image layers (--base-layers) and one customisation \
layer come off it, and the store paths get the rest."
)]
pub struct LayersCmd {
    /// The closure graph (`-` for stdin).
    pub graph: PathBuf,
    /// How to group paths into layers (default: auto, nixpkgs' current default).
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyName>,
    /// A layeringPipeline as JSON (the list nixpkgs' Nix list turns into), or a file holding it.
    /// Implies --strategy pipeline.
    #[arg(long, value_name = "FILE_OR_JSON")]
    pub pipeline: Option<String>,
    /// The image's layer budget, as nixpkgs' maxLayers.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_layers: usize,
    /// Layers of the base image (fromImage), which come off the budget.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub base_layers: usize,
    /// Plan only the closure of these paths (repeatable). Without it, the whole graph.
    #[arg(long = "root", value_name = "PATH")]
    pub roots: Vec<String>,
    /// Leave this path out of every layer (repeatable), as nixpkgs' excludePaths.
    #[arg(long = "exclude", value_name = "PATH")]
    pub exclude: Vec<String>,
    /// The graph's format.
    #[arg(long, value_parser = choice::<GraphFormat>(), default_value = "auto")]
    pub format: GraphFormat,
    /// Print a table (layer, paths, bytes) instead of the JSON plan.
    #[arg(long)]
    pub explain: bool,
    /// Plan this other closure graph the same way and report the bytes both plans share
    /// (layers identical in both).
    #[arg(long, value_name = "OTHER_GRAPH")]
    pub against: Option<PathBuf>,
    /// Print nothing on stderr but errors and warnings.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Strategy names for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyName {
    Popularity,
    Auto,
    Pipeline,
    Dominator,
}

#[derive(clap::Args)]
pub struct ExportCmd {
    /// The image: a Docker archive (plain, gzip or zstd), an OCI archive or an OCI layout
    /// directory.
    #[arg(long, value_name = "IMAGE")]
    pub from_image: PathBuf,
    /// Take the image tagged NAME:TAG (default: the first image).
    #[arg(long, value_name = "NAME")]
    pub from_image_name: Option<String>,
    /// The tag to go with --from-image-name (default `latest`).
    #[arg(long, value_name = "TAG", requires = "from_image_name")]
    pub from_image_tag: Option<String>,
    /// The tarball to write (replaced only once complete).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// How to compress it: none, gz or zstd.
    #[arg(long, value_name = "none|gz|zstd", default_value = "gz")]
    pub compressor: String,
    /// Modification time of every member, in seconds since the epoch (default:
    /// $SOURCE_DATE_EPOCH, else 1).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub mtime: Option<i64>,
    /// Where to decompress compressed layers (default: $TMPDIR, else /tmp).
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct NixDbCmd {
    /// Write `nix/var/nix/db` and `nix/var/nix/gcroots/docker` under this directory (the
    /// customisation layer's root).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The closure: `exportReferencesGraph` JSON (with `__structuredAttrs`: a list of `{ path,
    /// narHash, narSize, references }`) or closureInfo's `registration`.
    #[arg(long, value_name = "FILE")]
    pub closure: PathBuf,
    /// The closure file's format (default: guessed from its content).
    #[arg(long, value_parser = choice::<GraphFormat>(), default_value = "auto")]
    pub format: GraphFormat,
    /// For a JSON object such as `.attrs.json`: the key holding the closure list.
    #[arg(long, value_name = "NAME")]
    pub key: Option<String>,
    /// Paths to register as GC roots (`nix/var/nix/gcroots/docker/<basename>`); each must be in
    /// the closure.
    #[arg(long, value_name = "PATH", num_args = 1.., action = clap::ArgAction::Append)]
    pub roots: Vec<String>,
    /// `registrationTime` of every path (nixpkgs sets $SOURCE_DATE_EPOCH).
    #[arg(long, value_name = "SECONDS", default_value_t = 1, allow_negative_numbers = true)]
    pub registration_time: i64,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct RunAsRootCmd {
    /// The base image (a Docker archive, plain, gzip or zstd, an OCI archive or layout);
    /// without it the script starts from an empty root.
    #[arg(long, value_name = "IMAGE")]
    pub from_image: Option<PathBuf>,
    /// Take the image tagged NAME:TAG from it (default: the first image).
    #[arg(long, value_name = "NAME", requires = "from_image")]
    pub from_image_name: Option<String>,
    /// The tag to go with --from-image-name (default `latest`).
    #[arg(long, value_name = "TAG", requires = "from_image_name")]
    pub from_image_tag: Option<String>,
    /// A directory tree copied onto the root before the script runs (copyToRoot), as
    /// `rsync -ak --chown=0:0 DIR/ ROOT/` would: symlinks to directories become directories,
    /// owners are root. Repeatable; later ones win. Its contents end up in the new layer.
    #[arg(long = "layer", value_name = "DIR")]
    pub layers: Vec<PathBuf>,
    /// Copy --layer trees as `rsync -aK` (keepContentsDirlinks): symlinks stay symlinks, and
    /// symlinks to directories already in the root are followed.
    #[arg(long)]
    pub keep_dirlinks: bool,
    /// A store path to bind-mount read-only at the same place (repeatable).
    #[arg(long = "store-path", value_name = "PATH")]
    pub store_paths: Vec<PathBuf>,
    /// Bind-mount this whole store directory read-only instead (e.g. /nix/store).
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
    /// The script to run.
    #[arg(long, value_name = "FILE")]
    pub script: PathBuf,
    /// The shell that runs it, as a path inside the root (a store path's shell, usually).
    #[arg(long, value_name = "PATH", default_value = "/bin/sh")]
    pub shell: String,
    /// An environment variable for the script (repeatable). The environment is only these,
    /// plus PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin if not given.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Commands run after the script (nixpkgs' extraCommands): by `--extra-commands-shell`,
    /// not chrooted, with the root filesystem as working directory and stevedore's own
    /// environment, as root of the namespace. What they change goes into the layer too.
    #[arg(long, value_name = "FILE")]
    pub extra_commands: Option<PathBuf>,
    /// The shell for --extra-commands, a path outside the image.
    #[arg(long, value_name = "PATH", default_value = "/bin/sh")]
    pub extra_commands_shell: PathBuf,
    /// Where to write the new layer (a tar; replaced only once complete).
    #[arg(long, value_name = "FILE")]
    pub out_layer: PathBuf,
    /// Also write the layer's sha256 (hex) to this file. It always goes to stdout.
    #[arg(long, value_name = "FILE")]
    pub out_checksum: Option<PathBuf>,
    /// Modification time of every member (default: $SOURCE_DATE_EPOCH, else 1).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub mtime: Option<i64>,
    /// How ids are mapped in the user namespace.
    #[arg(long, value_parser = choice::<IdMapping>(), default_value = "auto")]
    pub id_mapping: IdMapping,
    /// Where to lay out the root filesystem (default: $TMPDIR, else /tmp).
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// Print nothing on stderr but errors (the script's output still goes there).
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct MergeCmd {
    /// Docker archives (plain, gzip or zstd) or executables that write one to stdout.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Write the archive to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

/// What to build (see the module documentation for the attributes each reads).
#[derive(clap::Subcommand)]
pub enum NixCmd {
    /// Write the attribute `text` to $out.
    Text,
    /// Make $out a directory of symlinks (attribute `links`).
    Symlinks,
    /// Build the customisation layer ($out/layer.tar and $out/checksum).
    CustomisationLayer {
        /// Second stage, run by the first inside `fakeroot`: run fakeRootCommands, then pack.
        #[arg(long, hide = true)]
        inside_fakeroot: bool,
    },
    /// Plan the store layers and write the stream conf JSON.
    Conf,
    /// Write the executable that streams the image.
    StreamScript,
    /// An executable that pushes the image to a registry (passthru.copyToRegistry).
    PushScript,
    /// An executable that loads the image into a runtime (passthru.copyToPodman and the like).
    LoadScript,
    /// Write the image's bill of materials (passthru.sbom, passthru.spdx).
    Sbom,
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
        #[arg(long, default_value_t = 1)]
        mtime: i64,
        /// Owners: `root` (0:0 for all) or `fs` (what lstat says, faked inside fakeroot).
        #[arg(long, default_value = "root", value_parser = ["root", "fs"])]
        owners: String,
    },
}

impl ExportCmd {
    pub fn run(self) -> Result<()> {
        flatten::export(&flatten::Export {
            from_image: self.from_image,
            from_image_name: self.from_image_name,
            from_image_tag: self.from_image_tag,
            output: self.output,
            compressor: match Compressor::parse(&self.compressor)? {
                Compressor::ZstdChunked => bail!("--compressor zstd:chunked is a format of image layers; an export is one tarball (use zstd)"),
                c => c,
            },
            mtime: self.mtime,
            scratch: self.scratch,
            quiet: self.quiet,
        })
    }
}

impl NixDbCmd {
    pub fn run(&self) -> Result<()> {
        let graph = db::load_graph(&self.closure, self.format, self.key.as_deref())?;
        if graph.is_empty() {
            bail!("{}: the closure is empty", self.closure.display());
        }
        db::write_tree(&graph, &self.root, &self.roots, self.registration_time).map_err(|e| anyhow!("{}: {e:#}", self.closure.display()))?;
        if !self.quiet {
            eprintln!("Registered {} paths and {} GC roots under {}", graph.len(), self.roots.len(), self.root.display());
        }
        Ok(())
    }
}

impl MergeCmd {
    pub fn run(self) -> Result<()> {
        let progress = Progress { quiet: self.quiet };
        // Spooled stream output goes next to the output file, or to the temporary directory.
        let scratch_parent = self.output.as_deref().and_then(|o| o.parent()).filter(|p| !p.as_os_str().is_empty());
        let scratch = stevedore::util::files::TempDir::new_in(scratch_parent.unwrap_or(&stevedore::util::settings::get().temp_dir))?;
        with_output(self.output.as_deref(), |w| image::merge::merge(&self.images, &scratch.0, w, &progress).map(drop))
    }
}

impl LayersCmd {
    /// The plan options these arguments ask for.
    fn plan_options(&self) -> Result<PlanOptions> {
        let strategy = match (self.strategy, &self.pipeline) {
            (None | Some(StrategyName::Pipeline), Some(p)) => Strategy::Pipeline(Pipeline::from_arg(p)?),
            (Some(StrategyName::Pipeline), None) => bail!("--strategy pipeline needs --pipeline"),
            (Some(s), Some(_)) => bail!("--pipeline goes with --strategy pipeline, not {s:?}"),
            (None | Some(StrategyName::Auto), None) => Strategy::Auto,
            (Some(StrategyName::Popularity), None) => Strategy::Popularity,
            (Some(StrategyName::Dominator), None) => Strategy::Dominator,
        };
        Ok(PlanOptions { strategy, max_layers: self.max_layers, base_layers: self.base_layers, roots: self.roots.clone(), exclude: self.exclude.clone() })
    }

    pub fn run(&self) -> Result<()> {
            let args = self;
        let opts = args.plan_options()?;
        opts.store_layer_budget()?;
        let graph = ClosureGraph::load(&args.graph, args.format)?;
        for p in &opts.exclude {
            if graph.index_of(p).is_none() && !args.quiet {
                eprintln!("stevedore: warning: --exclude {p} is not in the graph");
            }
        }
        let started = std::time::Instant::now();
        let plan = plan_layers(&graph, &opts).map_err(|e| anyhow!("{}: {e:#}", args.graph.display()))?;
        let elapsed = started.elapsed();
        // A pipeline sets its own limits, as in nixpkgs; say so when it goes past the budget.
        if let (Strategy::Pipeline(_), Ok(budget)) = (&opts.strategy, opts.store_layer_budget()) {
            if plan.len() > budget && !args.quiet {
                eprintln!("stevedore: warning: the pipeline made {} layers, more than the {budget} maxLayers leaves for store paths", plan.len());
            }
        }
        let against = match &args.against {
            None => None,
            Some(other) => {
                let other_graph = ClosureGraph::load(other, args.format)?;
                let other_opts = PlanOptions { roots: vec![], ..opts.clone() };
                let other_plan = plan_layers(&other_graph, &other_opts).map_err(|e| anyhow!("{}: {e:#}", other.display()))?;
                Some((other.display().to_string(), sharing(&graph, &plan, &other_plan)))
            }
        };
        if !args.quiet {
            let paths: usize = plan.iter().map(Vec::len).sum();
            eprintln!("stevedore: {} layers for {paths} store paths in {:.1} ms", plan.len(), elapsed.as_secs_f64() * 1e3);
            if let Some((name, s)) = &against {
                eprintln!("stevedore: {}", sharing_line(name, s, plan.len()));
            }
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if args.explain {
            write_explain(&mut out, &graph, &plan, against.as_ref())?;
        } else {
            serde_json::to_writer_pretty(&mut out, &plan)?;
            writeln!(out)?;
        }
        out.flush()?;
        Ok(())
    }
}


fn sharing_line(name: &str, s: &Sharing, layers: usize) -> String {
    let pct = if s.total_bytes > 0 { 100.0 * s.shared_bytes as f64 / s.total_bytes as f64 } else { 0.0 };
    format!(
        "against {name}: {} of {layers} layers identical, {} of {} shared ({pct:.1}%)",
        s.shared_layers,
        human_bytes(s.shared_bytes),
        human_bytes(s.total_bytes)
    )
}

fn write_explain(out: &mut impl Write, graph: &ClosureGraph, plan: &[Vec<String>], against: Option<&(String, Sharing)>) -> Result<()> {
    let total: u64 = plan.iter().map(|l| layer_bytes(graph, l)).sum();
    writeln!(out, "{:>5}  {:>6}  {:>14}  {:>6}  contents", "layer", "paths", "bytes", "share")?;
    for (i, layer) in plan.iter().enumerate() {
        let bytes = layer_bytes(graph, layer);
        let pct = if total > 0 { 100.0 * bytes as f64 / total as f64 } else { 0.0 };
        let first = layer.first().map(|p| StorePath::parse(p).map(|s| s.name).unwrap_or_else(|_| p.clone())).unwrap_or_default();
        let more = if layer.len() > 1 { format!(" (+{} more)", layer.len() - 1) } else { String::new() };
        writeln!(out, "{i:>5}  {:>6}  {bytes:>14}  {pct:>5.1}%  {first}{more}", layer.len())?;
    }
    let paths: usize = plan.iter().map(Vec::len).sum();
    writeln!(out, "total: {} layers, {paths} store paths, {} ({total} bytes)", plan.len(), human_bytes(total))?;
    if let Some((name, s)) = against {
        writeln!(out, "{}", sharing_line(name, s, plan.len()))?;
    }
    Ok(())
}

impl RunAsRootCmd {
    pub fn run(self) -> Result<()> {
        stevedore::rootless::run(&stevedore::rootless::RunAsRoot {
            from_image: self.from_image,
            from_image_name: self.from_image_name,
            from_image_tag: self.from_image_tag,
            layers: self.layers,
            keep_dirlinks: self.keep_dirlinks,
            store_paths: self.store_paths,
            store_dir: self.store_dir,
            script: self.script,
            shell: self.shell,
            env: self.env,
            extra_commands: self.extra_commands,
            extra_commands_shell: self.extra_commands_shell,
            extra_commands_env: Vec::new(),
            out_layer: self.out_layer,
            out_checksum: self.out_checksum,
            mtime: self.mtime,
            id_mapping: self.id_mapping,
            scratch: self.scratch,
            quiet: self.quiet,
        })
    }
}

impl From<NixCmd> for stevedore::builder::Action {
    fn from(c: NixCmd) -> Self {
        use stevedore::builder::Action;
        match c {
            NixCmd::Text => Action::Text,
            NixCmd::Symlinks => Action::Symlinks,
            NixCmd::CustomisationLayer { inside_fakeroot } => Action::CustomisationLayer { inside_fakeroot },
            NixCmd::Conf => Action::Conf,
            NixCmd::StreamScript => Action::StreamScript,
            NixCmd::PushScript => Action::PushScript,
            NixCmd::LoadScript => Action::LoadScript,
            NixCmd::Sbom => Action::Sbom,
            NixCmd::Archive => Action::Archive,
            NixCmd::ImageLayer => Action::ImageLayer,
            NixCmd::Image => Action::Image,
            NixCmd::Export => Action::Export,
            NixCmd::Merge => Action::Merge,
            NixCmd::Files => Action::Files,
            NixCmd::Pack { root, dir, mtime, owners } => {
                Action::Pack { root, dir, mtime, owners: if owners == "fs" { Owners::FromFs } else { Owners::Root } }
            }
        }
    }
}
