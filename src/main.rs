use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use stevedore::compress::Compressor;
use stevedore::image::{self, conf, oci};
use stevedore::util::io::OutputError;
use stevedore::util::progress::Progress;

#[derive(Parser)]
#[command(name = "stevedore", version, about = "Container images from Nix closures", max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a Docker image archive (`docker save` format) for a streamLayeredImage conf.
    ///
    /// CONF is the JSON file nixpkgs' streamLayeredImage writes: `store_layers` (a list of layers,
    /// each a list of store paths, bottom first), `customisation_layer` (a directory with
    /// `layer.tar` and its sha256 in `checksum`), `from_image` (null or a base image archive,
    /// plain, gzip or zstd), `config` (the container config, passed through), `architecture`,
    /// `created` and `mtime` (ISO-8601 or "now"), `uid`, `gid`, `uname`, `gname` (owner of every
    /// file in the store layers), `store_dir` and `repo_tag`.
    ///
    /// Store layers are byte-identical to the ones nixpkgs' stream_layered_image.py writes, so
    /// images share layer digests with nixpkgs-built ones. The archive goes to stdout (pipe it
    /// into `docker load` or `podman load`) or to --output; progress goes to stderr.
    Stream {
        /// The conf JSON file.
        conf: PathBuf,
        /// Override the image's repository and tag (`name:tag`).
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
        #[arg(long, value_enum, default_value_t = Format::DockerArchive)]
        format: Format,
        /// How OCI layers are compressed, each on its own: none, gz or zstd (default gz).
        /// Docker archives keep uncompressed layers, as nixpkgs writes them.
        #[arg(long, value_name = "none|gz|zstd")]
        compressor: Option<String>,
    },
    /// Plan layers from a closure graph (see `stevedore layers --help`).
    Layers(stevedore::layering::LayersArgs),
    /// Push an image (a conf, OCI layout, oci-archive or Docker archive) to a registry.
    ///
    /// Only blobs the registry lacks are uploaded (streamed, never staged); the manifest
    /// digest goes to stdout.
    Push(stevedore::registry::PushArgs),
    /// Pull an image from a registry into a Docker archive or an OCI layout.
    Pull(stevedore::registry::PullArgs),
    /// Print the pullImage arguments (with the output's hash) for an image, like
    /// nix-prefetch-docker.
    Prefetch(stevedore::registry::PrefetchArgs),
    /// Combine per-platform images into one multi-platform index and push it.
    Index(stevedore::registry::IndexArgs),
    /// Write an image's flattened filesystem as one tarball (nixpkgs' exportImage).
    ///
    /// Layers are applied in memory (whiteouts and opaque directories honoured, hard links
    /// stored as full files), then written as `tar --sort=name --mtime=@MTIME --numeric-owner`
    /// would write `./`: no extraction, so owners and devices survive without root.
    Export(stevedore::image::flatten::ExportArgs),
    /// Write the Nix database for a closure (nix-store --load-db plus nixpkgs' mkDbExtraCommand).
    ///
    /// Under --root: nix/var/nix/db/db.sqlite (schema 10, rows in Nix's order, fixed
    /// registration time, so the bytes are reproducible), nix/var/nix/db/schema, and
    /// nix/var/nix/gcroots/docker/<basename> links to the --roots.
    Nixdb(stevedore::nixstore::db::NixDbArgs),
    /// Run a script as root over an image's filesystem and write what it changed as a layer
    /// (nixpkgs' runAsRoot, without a VM: user namespaces, no privileges needed).
    ///
    /// The base image's layers and the --layer trees are laid out in a scratch directory, the
    /// store paths bind-mounted read-only, /proc and /dev set up, and the script run as uid 0
    /// in new user, mount and pid namespaces. The change (new and changed files with their
    /// owners, whiteouts, opaque directories) goes to --out-layer; its sha256 to stdout.
    RunAsRoot(stevedore::rootless::RunAsRootArgs),
    /// Merge images into one Docker archive that loads them all (nixpkgs' mergeImages).
    ///
    /// Each IMAGE is a Docker archive (plain, gzip or zstd) or an executable that streams one,
    /// like streamLayeredImage's result. Layers are named by content and written once, however
    /// many images share them; manifest.json lists the images in the order given.
    Merge(stevedore::image::merge::MergeArgs),
    /// Builder mode for the Nix library's derivations (reads NIX_ATTRS_JSON_FILE).
    #[command(hide = true)]
    Nix(stevedore::builder::NixArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    DockerArchive,
    Oci,
    OciArchive,
}

fn stdout_file() -> Result<File> {
    // Write to fd 1 directly (through a duplicate, which closing leaves stdout open): std's
    // stdout is line-buffered, and we write megabytes at a time.
    let fd = std::io::stdout().as_fd().try_clone_to_owned().map_err(|e| anyhow::anyhow!("cannot use stdout: {e}"))?;
    Ok(File::from(fd))
}

/// Runs `write` on the output file (written whole or not at all) or on stdout.
fn with_output(output: Option<&Path>, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    match output {
        Some(path) => stevedore::util::files::write_atomically(path, |mut w| {
            write(&mut w)?;
            Ok((w, ()))
        }),
        None => {
            let out = stdout_file()?;
            if out.is_terminal() {
                bail!("refusing to write an image archive to a terminal; pipe it into `podman load` or use --output");
            }
            let mut w = BufWriter::with_capacity(1 << 20, &out);
            write(&mut w)?;
            w.flush().map_err(|e| anyhow::Error::new(OutputError(e)))
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Stream { conf: conf_path, repo_tag, output, quiet, format, compressor } => {
            if let Some(tag) = &repo_tag {
                stevedore::image::reference::check_repo_tag(tag).map_err(|e| anyhow::anyhow!("--repo_tag: {e}"))?;
            }
            let now = conf::now();
            let conf = conf::StreamConf::load(&conf_path, &now)?;
            let progress = Progress { quiet };
            let compressor = match (format, compressor.as_deref()) {
                (Format::DockerArchive, None | Some("none")) => Compressor::None,
                (Format::DockerArchive, Some(_)) => bail!("--compressor applies to OCI formats; Docker archives keep uncompressed layers"),
                (_, None) => Compressor::Gzip,
                (_, Some(c)) => Compressor::parse(c)?,
            };
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
                    let scratch = oci::TempDir::new_in(scratch_parent.unwrap_or(&std::env::temp_dir()))?;
                    let written = oci::write_layout(&spec, &scratch.0, compressor, &tag, &progress)?;
                    let mut w = w;
                    oci::tar_layout(&scratch.0, &mut w, conf.mtime)?;
                    progress.say(format!("Done: {}", written.manifest.digest));
                    Ok(())
                }),
            }
        }
        Command::Layers(args) => stevedore::layering::run(&args),
        Command::Merge(args) => {
            let progress = Progress { quiet: args.quiet };
            // Spooled stream output goes next to the output file, or to the temporary directory.
            let scratch_parent = args.output.as_deref().and_then(|o| o.parent()).filter(|p| !p.as_os_str().is_empty());
            let scratch = oci::TempDir::new_in(scratch_parent.unwrap_or(&std::env::temp_dir()))?;
            with_output(args.output.as_deref(), |w| stevedore::image::merge::merge(&args.images, &scratch.0, w, &progress).map(drop))
        }
        Command::Nix(args) => stevedore::builder::run(&args),
        Command::Export(args) => stevedore::image::flatten::export(&args),
        Command::Nixdb(args) => stevedore::nixstore::db::run(&args),
        Command::RunAsRoot(args) => stevedore::rootless::run(&args),
        Command::Push(args) => stevedore::registry::run_push(&args),
        Command::Pull(args) => stevedore::registry::run_pull(&args),
        Command::Prefetch(args) => stevedore::registry::run_prefetch(&args),
        Command::Index(args) => stevedore::registry::run_index(&args),
    }
}

fn main() {
    // First, before any thread starts: every thread inherits the blocked signals.
    stevedore::util::files::install_signal_cleanup();
    let cli = Cli::parse();
    let (code, message) = match run(cli) {
        Ok(()) => (0, None),
        Err(e) if e.downcast_ref::<OutputError>().is_some_and(|OutputError(io)| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            (141, Some("the reader closed the output before the image was complete".to_string()))
        }
        Err(e) => (1, Some(format!("{e:#}"))),
    };
    stevedore::util::files::exit(code, || {
        if let Some(m) = message {
            eprintln!("stevedore: {m}");
        }
    })
}
