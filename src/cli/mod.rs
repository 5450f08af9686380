//! The command line: clap's argument structs and thin `run` functions that resolve them into
//! the library's typed options. Nothing below this module sees clap.

mod environment;
mod image;
mod registry;
mod supply_chain;

use anyhow::{bail, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use stevedore::util::io::OutputError;
use stevedore::util::shared::Choice;

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
    /// `variant` (optional, ours: the CPU variant in the config), `created` and `mtime` (ISO-8601 or "now"), `uid`, `gid`, `uname`, `gname` (owner of every
    /// file in the store layers), `store_dir` and `repo_tag`.
    ///
    /// Store layers are byte-identical to the ones nixpkgs' stream_layered_image.py writes, so
    /// images share layer digests with nixpkgs-built ones. The archive goes to stdout (pipe it
    /// into `docker load` or `podman load`) or to --output; progress goes to stderr.
    Stream(image::StreamCmd),
    /// Plan layers from a closure graph (see `stevedore layers --help`).
    Layers(image::LayersCmd),
    /// Push an image (a conf, OCI layout, oci-archive or Docker archive) to a registry.
    ///
    /// Only blobs the registry lacks are uploaded (streamed, never staged); the manifest
    /// digest goes to stdout.
    Push(registry::PushCmd),
    /// Pull an image from a registry into a Docker archive or an OCI layout.
    Pull(registry::PullCmd),
    /// Print the pullImage arguments (with the output's hash) for an image, like
    /// nix-prefetch-docker.
    Prefetch(registry::PrefetchCmd),
    /// Combine per-platform images into one multi-platform index and push it.
    Index(registry::IndexCmd),
    /// Serve images made from confs as a read-only registry (pull only), on loopback by default.
    ///
    /// Manifests are made from the confs at each request; layers go uncompressed, streamed
    /// from the store, so clients fetch only the layers they lack.
    Serve(registry::ServeCmd),
    /// Load an image into podman, Docker or containerd, sending only the layers it lacks.
    ///
    /// The runtime pulls the image from a loopback registry that lives for the one pull.
    Load(registry::LoadCmd),
    /// Write an image's flattened filesystem as one tarball (nixpkgs' exportImage).
    ///
    /// Layers are applied in memory (whiteouts and opaque directories honoured, hard links
    /// stored as full files), then written as `tar --sort=name --mtime=@MTIME --numeric-owner`
    /// would write `./`: no extraction, so owners and devices survive without root.
    Export(image::ExportCmd),
    /// Write the Nix database for a closure (nix-store --load-db plus nixpkgs' mkDbExtraCommand).
    ///
    /// Under --root: nix/var/nix/db/db.sqlite (schema 10, rows in Nix's order, fixed
    /// registration time, so the bytes are reproducible), nix/var/nix/db/schema, and
    /// nix/var/nix/gcroots/docker/<basename> links to the --roots.
    Nixdb(image::NixDbCmd),
    /// Run a script as root over an image's filesystem and write what it changed as a layer
    /// (nixpkgs' runAsRoot, without a VM: user namespaces, no privileges needed).
    ///
    /// The base image's layers and the --layer trees are laid out in a scratch directory, the
    /// store paths bind-mounted read-only, /proc and /dev set up, and the script run as uid 0
    /// in new user, mount and pid namespaces. The change (new and changed files with their
    /// owners, whiteouts, opaque directories) goes to --out-layer; its sha256 to stdout.
    RunAsRoot(image::RunAsRootCmd),
    /// Merge images into one Docker archive that loads them all (nixpkgs' mergeImages).
    ///
    /// Each IMAGE is a Docker archive (plain, gzip or zstd) or an executable that streams one,
    /// like streamLayeredImage's result. Layers are named by content and written once, however
    /// many images share them; manifest.json lists the images in the order given.
    Merge(image::MergeCmd),
    /// Write a software bill of materials (CycloneDX 1.6 or SPDX 2.3 JSON) for an image.
    ///
    /// One component per store path in the image, with its narHash, size, references (as
    /// dependencies) and the layer that holds it; byte-for-byte the same for the same image.
    Sbom(supply_chain::SbomCmd),
    /// Write the SLSA provenance v1 predicate of an image (for `push --sign --provenance`).
    ///
    /// It names the derivation, every store path in the image with its NAR hash, each layer's
    /// diff_id and stevedore's version; byte-for-byte the same for the same image.
    Provenance(supply_chain::ProvenanceCmd),
    /// Check that an image holds exactly what a conf makes (its layers, byte for byte, and
    /// its config).
    ///
    /// Prints `identical: ...` (exit 0), or the first layer that differs and the files in it
    /// that differ, or the config fields that do (exit 1); trouble exits 2.
    Verify(registry::VerifyCmd),
    /// Builder mode for the Nix library's derivations (reads NIX_ATTRS_JSON_FILE).
    #[command(hide = true)]
    Nix {
        #[command(subcommand)]
        action: image::NixCmd,
    },
}

/// A clap parser for one of the library's enumerations, with its names and descriptions.
fn choice<T: Choice + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    // Values without a description keep clap's short "[possible values: ...]" form.
    PossibleValuesParser::new(T::CHOICES.iter().map(|(name, _, help)| {
        let v = PossibleValue::new(*name);
        if help.is_empty() {
            v
        } else {
            v.help(*help)
        }
    }))
        .map(|name| T::from_name(&name).expect("clap checked the name"))
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
        Command::Stream(c) => c.run(),
        Command::Layers(c) => c.run(),
        Command::Merge(c) => c.run(),
        Command::Nix { action } => stevedore::builder::run(&action.into()),
        Command::Export(c) => c.run(),
        Command::Nixdb(c) => c.run(),
        Command::RunAsRoot(c) => c.run(),
        Command::Push(c) => c.run(),
        Command::Pull(c) => c.run(),
        Command::Prefetch(c) => c.run(),
        Command::Index(c) => c.run(),
        Command::Serve(c) => c.run(),
        Command::Load(c) => c.run(),
        Command::Sbom(c) => c.run(),
        Command::Provenance(c) => c.run(),
        Command::Verify(c) => c.run(),
    }
}

pub fn main() {
    // First, before any thread starts: every thread inherits the blocked signals.
    stevedore::util::files::install_signal_cleanup();
    stevedore::util::settings::install(environment::settings(|n| std::env::var_os(n)));
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
