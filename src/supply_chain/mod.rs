//! Supply chain: what an image is made of and who vouches for it, derived from the closure
//! stevedore built it from.
//!
//! - `sbom`: CycloneDX and SPDX documents, one component per store path.
//! - `sign`: cosign-compatible keys, payloads and ECDSA P-256 signatures.
//! - `provenance`: SLSA provenance v1 predicates, in-toto statements, DSSE envelopes.
//! - `verify`: whether an image holds exactly what a conf makes, and where it does not.
//!
//! [`describe`] gathers a document's facts from a conf: the layers (diff_ids from the digest
//! cache, or hashed), and each store path's narHash, size and references from a closure graph
//! or the Nix database.

pub mod provenance;
pub mod sbom;
pub mod sign;
pub mod verify;

use crate::image::conf::{civil_from_unix, StreamConf};
use crate::image::digests::DigestCache;
use crate::image::ImageSpec;
use crate::nixstore::ClosureGraph;
use crate::util::hex;
use crate::util::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use sbom::{Layer, LayerKind, License, PackageMeta, SbomInput, StoreObject};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// The document formats `stevedore sbom` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SbomFormat {
    #[default]
    CycloneDx,
    Spdx,
}

impl crate::util::shared::Choice for SbomFormat {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[
        ("cyclonedx", SbomFormat::CycloneDx, "CycloneDX 1.6 JSON"),
        ("spdx", SbomFormat::Spdx, "SPDX 2.3 JSON"),
    ];
}

impl SbomFormat {
    /// The media type of the document (an OCI artifact's `artifactType`).
    pub fn media_type(self) -> &'static str {
        match self {
            SbomFormat::CycloneDx => "application/vnd.cyclonedx+json",
            SbomFormat::Spdx => "application/spdx+json",
        }
    }

    pub fn render(self, input: &SbomInput) -> String {
        match self {
            SbomFormat::CycloneDx => sbom::cyclonedx(input),
            SbomFormat::Spdx => sbom::spdx(input),
        }
    }

    /// The file name an artifact gives the document.
    pub fn file_name(self) -> &'static str {
        match self {
            SbomFormat::CycloneDx => "sbom.cdx.json",
            SbomFormat::Spdx => "sbom.spdx.json",
        }
    }
}

/// Where the store paths' narHash, size and references come from.
pub enum PathInfos {
    Graph(ClosureGraph),
    /// A Nix database (`/nix/var/nix/db/db.sqlite`).
    NixDb(PathBuf),
}

impl PathInfos {
    /// The objects for `paths` (sorted, unique); an unknown path is an error naming it.
    fn objects(&self, paths: &[String]) -> Result<Vec<StoreObject>> {
        match self {
            PathInfos::Graph(g) => paths
                .iter()
                .map(|p| {
                    let i = g.index_of(p).ok_or_else(|| anyhow!("the closure graph does not list {p}, which the image holds"))?;
                    let n = g.node(i);
                    Ok(StoreObject {
                        path: p.clone(),
                        nar_hash: n.nar_hash.clone(),
                        nar_size: n.nar_hash.as_ref().map(|_| n.nar_size),
                        references: n.references.iter().map(|&r| g.path(r).to_string()).collect(),
                        self_reference: n.self_reference,
                        ..Default::default()
                    })
                })
                .collect(),
            PathInfos::NixDb(db) => {
                let all = crate::nixstore::db::read_closure(db, paths)?;
                Ok(all
                    .into_iter()
                    .filter(|v| paths.binary_search(&v.path).is_ok())
                    .map(|v| StoreObject {
                        self_reference: v.references.contains(&v.path),
                        references: v.references.iter().filter(|r| **r != v.path).cloned().collect(),
                        path: v.path,
                        nar_hash: Some(v.nar_hash),
                        nar_size: v.nar_size,
                        deriver: v.deriver,
                        ca: v.ca,
                        sigs: v.sigs,
                    })
                    .collect())
            }
        }
    }
}

/// `packages` as the Nix library passes them: a list of `{ path, license, homepage,
/// description }`, `license` a list of `{ spdxId, fullName }` (either may be absent).
pub fn parse_packages(v: &Value) -> Result<Vec<PackageMeta>> {
    let Value::Array(items) = v else { bail!("packages: expected a list") };
    let text = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    items
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let path = text(o, "path").ok_or_else(|| anyhow!("packages[{i}]: 'path' is missing"))?;
            let licenses = match o.get("license") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(l)) => l.iter().map(|l| License { spdx_id: text(l, "spdxId"), name: text(l, "fullName") }).collect(),
                Some(other) => bail!("packages[{i}]: 'license' must be a list, got {other}"),
            };
            Ok(PackageMeta { path, licenses, homepage: text(o, "homepage"), description: text(o, "description") })
        })
        .collect()
}

/// The facts of the image `conf` describes. Layers the digest cache does not know are read
/// and hashed.
pub fn describe(conf: &StreamConf, infos: &PathInfos, packages: Vec<PackageMeta>, progress: &Progress) -> Result<SbomInput> {
    let spec = ImageSpec::new(conf)?;
    let layers = spec.describe_layers(&mut DigestCache::open(), progress)?;
    let image_id = format!("sha256:{}", hex(&Sha256::digest(spec.config_json(&layers).as_bytes())));
    let nbase = spec.base.as_ref().map_or(0, |b| b.layers.len());
    let nstore = spec.store_layers().len();
    let store_paths: Vec<Vec<String>> = spec.store_layers().iter().map(|l| l.iter().map(|p| p.to_string_lossy().into_owned()).collect()).collect();
    let layers: Vec<Layer> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let kind = if i < nbase {
                LayerKind::Base
            } else if i < nbase + nstore {
                LayerKind::Store
            } else {
                LayerKind::Customisation
            };
            let paths = if kind == LayerKind::Store { store_paths[i - nbase].clone() } else { vec![] };
            Layer { position: i + 1, diff_id: format!("sha256:{}", l.diff_id), paths, kind }
        })
        .collect();
    let mut all: Vec<String> = store_paths.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    let objects = infos.objects(&all).context("describing the image's store paths")?;
    let (name, tag) = crate::image::merge::split_repo_tag(&conf.repo_tag);
    let (date, time) = civil_from_unix(conf.created.unix);
    Ok(SbomInput {
        name: name.to_string(),
        tag: tag.to_string(),
        created: format!("{date}T{time}Z"),
        architecture: conf.architecture.clone(),
        os: conf.os.clone(),
        image_id: Some(image_id),
        layers,
        objects,
        packages,
    })
}

/// The facts of a bare closure (no image): every path of `graph`, no layers; `name` names it.
pub fn describe_closure(graph: ClosureGraph, name: &str, created_unix: i64, packages: Vec<PackageMeta>) -> Result<SbomInput> {
    let paths: Vec<String> = graph.nodes().iter().map(|n| n.path.clone()).collect();
    let infos = PathInfos::Graph(graph);
    let objects = infos.objects(&paths)?;
    let (date, time) = civil_from_unix(created_unix);
    Ok(SbomInput {
        name: name.to_string(),
        tag: String::new(),
        created: format!("{date}T{time}Z"),
        architecture: crate::util::shared::host_go_arch().to_string(),
        os: "linux".into(),
        image_id: None,
        layers: vec![],
        objects,
        packages,
    })
}
