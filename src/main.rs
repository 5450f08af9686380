use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use stevedore::{conf, image, layer::OutputError};

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
    },
    /// Plan layers from a closure graph (see `stevedore layers --help`).
    Layers(stevedore::layering::LayersArgs),
    /// Builder mode for the Nix library's derivations (reads NIX_ATTRS_JSON_FILE).
    #[command(hide = true)]
    Nix(stevedore::nixbuild::NixArgs),
}

fn stdout_file() -> ManuallyDrop<File> {
    // Write to fd 1 directly: std's stdout is line-buffered, and we write megabytes at a time.
    ManuallyDrop::new(unsafe { File::from_raw_fd(1) })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Stream { conf: conf_path, repo_tag, output, quiet } => {
            let now = conf::now();
            let conf = conf::StreamConf::load(&conf_path, &now)?;
            let progress = image::Progress { quiet };
            match output {
                Some(path) => {
                    let tmp = path.with_extension("partial");
                    let file = File::create(&tmp).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", tmp.display()))?;
                    let result = image::stream(&conf, repo_tag.as_deref(), BufWriter::with_capacity(1 << 20, file), &progress);
                    match result {
                        Ok(w) => {
                            w.into_inner().map_err(|e| e.into_error())?.sync_all().ok();
                            std::fs::rename(&tmp, &path)?;
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(e);
                        }
                    }
                }
                None => {
                    let out = stdout_file();
                    if out.is_terminal() {
                        bail!("refusing to write an image archive to a terminal; pipe it into `podman load` or use --output");
                    }
                    let w = BufWriter::with_capacity(1 << 20, &*out);
                    let mut w = image::stream(&conf, repo_tag.as_deref(), w, &progress)?;
                    w.flush().map_err(|e| anyhow::Error::new(OutputError(e)))?;
                }
            }
            Ok(())
        }
        Command::Layers(args) => stevedore::layering::run(&args),
        Command::Nix(args) => stevedore::nixbuild::run(&args),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        if let Some(OutputError(io)) = e.downcast_ref::<OutputError>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                eprintln!("stevedore: the reader closed the output before the image was complete");
                std::process::exit(141);
            }
        }
        eprintln!("stevedore: {e:#}");
        std::process::exit(1);
    }
}
