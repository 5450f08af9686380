//! The supply-chain commands: sbom, provenance.

use super::choice;
use anyhow::{anyhow, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use stevedore::image::conf::{self, StreamConf};
use stevedore::nixstore::{ClosureGraph, GraphFormat};
use stevedore::supply_chain::{self, sbom::PackageMeta, PathInfos, SbomFormat};
use stevedore::util::progress::Progress;

#[derive(clap::Args)]
pub struct SbomCmd {
    /// A streamLayeredImage conf (the image's store paths, with the layer each is in), or a
    /// closure graph alone (every path in it).
    source: PathBuf,
    /// Where narHash, narSize and references come from: a closure graph
    /// (exportReferencesGraph's JSON, closureInfo's registration, ...). Default: the conf's
    /// closure_graph, else the Nix database (--nix-db).
    #[arg(long, value_name = "GRAPH")]
    graph: Option<PathBuf>,
    /// The Nix database to read path infos from (default: $NIX_STATE_DIR/db/db.sqlite, else
    /// /nix/var/nix/db/db.sqlite).
    #[arg(long, value_name = "FILE", conflicts_with = "graph")]
    nix_db: Option<PathBuf>,
    /// The document's format.
    #[arg(long, value_parser = choice::<SbomFormat>(), default_value = "cyclonedx")]
    format: SbomFormat,
    /// A JSON list of `{ path, license: [{ spdxId, fullName }], homepage, description }`: the
    /// `meta` of packages in the image (the Nix library passes what evaluation has).
    #[arg(long, value_name = "FILE")]
    packages: Option<PathBuf>,
    /// The name of a bare closure's document (a conf names its image).
    #[arg(long, default_value = "closure")]
    name: String,
    /// Write the document to FILE (atomically) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct ProvenanceCmd {
    /// A streamLayeredImage conf.
    conf: PathBuf,
    /// Where the store paths' narHash comes from, as for `stevedore sbom`.
    #[arg(long, value_name = "GRAPH")]
    graph: Option<PathBuf>,
    #[arg(long, value_name = "FILE", conflicts_with = "graph")]
    nix_db: Option<PathBuf>,
    /// The derivation that built the image (a `.drv` path), named as the build's parameter.
    #[arg(long, value_name = "DRV")]
    derivation: Option<String>,
    /// Write the predicate to FILE (atomically) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    quiet: bool,
}

/// Whether `path` holds a conf rather than a graph: a JSON object with a conf's fields.
fn is_conf(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(m)) => m.contains_key("store_layers") || m.contains_key("closure_graph") || m.contains_key("repo_tag"),
        _ => false,
    }
}

fn load_packages(path: Option<&Path>) -> Result<Vec<PackageMeta>> {
    let Some(path) = path else { return Ok(vec![]) };
    let text = stevedore::util::limits::read_limited(path, stevedore::util::limits::INPUT_LIMIT).context("--packages")?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    supply_chain::parse_packages(&v).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// The path infos for a conf's image: `graph`, else the conf's own graph, else the Nix database.
pub fn path_infos(conf: &StreamConf, graph: Option<&Path>, nix_db: Option<&Path>) -> Result<PathInfos> {
    if let Some(g) = graph {
        return Ok(PathInfos::Graph(ClosureGraph::load(g, GraphFormat::Auto)?));
    }
    if nix_db.is_none() {
        if let Some(layering) = &conf.layering {
            return Ok(PathInfos::Graph(layering.load_graph()?));
        }
    }
    Ok(PathInfos::NixDb(nix_db.map(Path::to_path_buf).unwrap_or_else(|| stevedore::util::settings::get().nix_db.clone())))
}

/// The SBOM of the image `conf_path` describes, in `format`.
pub fn sbom_of_conf(conf_path: &Path, graph: Option<&Path>, nix_db: Option<&Path>, packages: Vec<PackageMeta>, format: SbomFormat, progress: &Progress) -> Result<String> {
    let started = std::time::Instant::now();
    let input = describe_conf(conf_path, graph, nix_db, packages)?;
    progress.say(format!("SBOM of {}:{}: {} store paths in {} layers ({:.2} s)", input.name, input.tag, input.objects.len(), input.layers.len(), started.elapsed().as_secs_f64()));
    Ok(format.render(&input))
}

/// The facts of the image `conf_path` describes (its layers' own progress lines kept quiet).
fn describe_conf(conf_path: &Path, graph: Option<&Path>, nix_db: Option<&Path>, packages: Vec<PackageMeta>) -> Result<supply_chain::sbom::SbomInput> {
    let conf = StreamConf::load(conf_path, &conf::now())?;
    let infos = path_infos(&conf, graph, nix_db)?;
    supply_chain::describe(&conf, &infos, packages, &Progress { quiet: true })
}

fn write_output(output: Option<&Path>, doc: &str) -> Result<()> {
    match output {
        Some(path) => stevedore::util::files::write_atomically(path, |mut w| {
            w.write_all(doc.as_bytes()).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
            Ok((w, ()))
        }),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(doc.as_bytes()).and_then(|_| out.flush()).map_err(|e| anyhow::Error::new(stevedore::util::io::OutputError(e)))
        }
    }
}

impl ProvenanceCmd {
    pub fn run(self) -> Result<()> {
        let started = std::time::Instant::now();
        let input = describe_conf(&self.conf, self.graph.as_deref(), self.nix_db.as_deref(), vec![])?;
        let doc = supply_chain::provenance::predicate(&input, self.derivation.as_deref())?;
        Progress { quiet: self.quiet }.say(format!("provenance of {}:{}: {} store paths in {} layers ({:.2} s)", input.name, input.tag, input.objects.len(), input.layers.len(), started.elapsed().as_secs_f64()));
        write_output(self.output.as_deref(), &doc)
    }
}

impl SbomCmd {
    pub fn run(self) -> Result<()> {
        let progress = Progress { quiet: self.quiet };
        let packages = load_packages(self.packages.as_deref())?;
        let bytes = stevedore::util::limits::read_limited(&self.source, stevedore::util::limits::INPUT_LIMIT).with_context(|| self.source.display().to_string())?;
        let doc = if is_conf(&bytes) {
            sbom_of_conf(&self.source, self.graph.as_deref(), self.nix_db.as_deref(), packages, self.format, &progress)?
        } else {
            let graph = ClosureGraph::load(&self.source, GraphFormat::Auto)?;
            let created = stevedore::util::settings::get().default_mtime()?;
            self.format.render(&supply_chain::describe_closure(graph, &self.name, created, packages)?)
        };
        write_output(self.output.as_deref(), &doc)
    }
}
