//! Registries without Docker: `push`, `pull`, `prefetch` and `index` over the Registry HTTP
//! API v2 (the OCI distribution spec).
//!
//! - `http`: a small blocking HTTP/1.1 client (rustls for https).
//! - `auth`: references, credentials from auth files, Basic and Bearer challenges.
//! - `client`: one registry session: retries, tokens, the API calls.
//! - `source`: what can be pushed (conf, OCI layout, oci-archive, Docker archive) as a plan.
//! - `push`, `pull`: moving blobs and manifests.
//! - `referrers`: artifacts about an image (SBOMs, attestations) attached with OCI 1.1 `subject`.

pub mod auth;
pub mod client;
pub mod http;
pub mod pull;
pub mod push;
pub mod referrers;
pub mod source;

use crate::compress::Compressor;
use crate::image::read::{ArchiveIndex, OciStore};
use crate::image::ImageSpec;
use crate::util::progress::Progress;
use crate::image::oci::INDEX_TYPE;
use anyhow::{anyhow, bail, Result};
use auth::Reference;
pub use client::Connect;
use client::Registry;
use pull::Platform;
use serde_json::{json, Value};
pub use source::ManifestFormat;
use source::{BlobData, ConfPass, DockerArchivePass, Plan, Source, Spool};
use std::path::PathBuf;

/// How a push compresses and uploads (the `push` and `index` options).
#[derive(Debug, Clone)]
pub struct Push {
    /// Repositories of the same registry to mount missing blobs from.
    pub mount_from: Vec<String>,
    /// How layers made from a conf or a Docker archive are compressed.
    pub compressor: Compressor,
    /// Blobs larger than this go up in PATCH chunks of this size; smaller ones in one PUT.
    pub chunk_size: u64,
    /// OCI manifests, or Docker schema 2 ones.
    pub manifest_format: ManifestFormat,
}

impl Push {
    /// Options that cannot go together, refused before anything is read or sent.
    fn check(&self) -> Result<()> {
        if self.manifest_format == ManifestFormat::V2s2 && self.compressor.is_zstd() {
            bail!("--manifest-format v2s2 cannot carry zstd layers (Docker's schema 2 has no zstd); use --compressor gz or none");
        }
        Ok(())
    }
}

/// The platform to pick from a multi-platform image.
#[derive(Debug, Clone)]
pub struct WantedPlatform {
    pub os: String,
    /// GOARCH name; this machine's if none.
    pub arch: Option<String>,
    pub variant: Option<String>,
}

impl WantedPlatform {
    fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            arch: self.arch.clone().unwrap_or_else(|| crate::util::shared::host_go_arch().to_string()),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
        }
    }
}

/// What `pull` writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PullFormat {
    /// A Docker archive, layers decompressed: skopeo's `docker-archive` bytes.
    DockerArchive,
    /// An OCI image layout directory.
    Oci,
}

impl crate::util::shared::Choice for PullFormat {
    const CHOICES: &'static [(&'static str, Self, &'static str)] =
        &[("docker-archive", PullFormat::DockerArchive, ""), ("oci", PullFormat::Oci, "")];
}

/// A pull: the image, which platform, and the output.
#[derive(Debug, Clone)]
pub struct Pull {
    /// `docker://REGISTRY/REPO[:TAG|@DIGEST]`
    pub image: String,
    pub platform: WantedPlatform,
    pub format: PullFormat,
    /// The output file (docker-archive) or directory (oci).
    pub output: PathBuf,
    /// The name recorded in the output (default: the reference's, as written).
    pub image_name: Option<String>,
    /// The tag recorded in the output (default: the reference's, or `latest`).
    pub image_tag: Option<String>,
}

/// A prefetch: pullImage's arguments for an image, with the hash of its output.
#[derive(Debug, Clone)]
pub struct Prefetch {
    pub image: String,
    pub platform: WantedPlatform,
    pub final_image_name: Option<String>,
    pub final_image_tag: Option<String>,
}

/// A size in bytes with an optional K, M or G suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| anyhow!("bad size {s:?}: use a number of bytes, with K, M or G"))?;
    if n == 0 {
        bail!("bad size {s:?}: must be positive");
    }
    Ok(n * mult)
}

fn dest_reference(s: &str) -> Result<Reference> {
    if !s.starts_with("docker://") {
        bail!("destination {s:?} must be docker://REGISTRY/REPO[:TAG]");
    }
    let r = Reference::parse(s).map_err(|e| anyhow!("destination: {e}"))?;
    if r.digest.is_some() {
        bail!("destination {s:?}: push to a tag, not a digest");
    }
    Ok(r)
}

fn push_scopes(dest: &Reference, opts: &Push) -> Vec<String> {
    let mut scopes = vec![format!("repository:{}:pull,push", dest.repo)];
    scopes.extend(opts.mount_from.iter().map(|r| format!("repository:{r}:pull")));
    scopes
}

fn push_options(opts: &Push) -> push::PushOptions {
    push::PushOptions { mount_from: opts.mount_from.clone(), chunk_size: opts.chunk_size }
}

/// Builds the plan for `source` (its manifests in `format`; layers compressed to learn their
/// digests kept in `spool`) and hands it to `f`; plans borrow from the loaded inputs.
pub fn with_plan<T>(source: &str, compressor: Compressor, format: ManifestFormat, spool: Option<&Spool>, progress: &Progress, f: impl FnOnce(&Plan) -> Result<T>) -> Result<T> {
    let finish = |mut plan: Plan| -> Result<T> {
        if format == ManifestFormat::V2s2 {
            source::into_docker_manifests(&mut plan).map_err(|e| anyhow!("{source}: {e:#}"))?;
        }
        f(&plan)
    };
    match Source::parse(source)? {
        Source::Conf(path) => {
            let conf = crate::image::conf::StreamConf::load(&path, &crate::image::conf::now())?;
            let pass = ConfPass { spec: ImageSpec::new(&conf)?, compressor };
            finish(source::plan_conf(&pass, spool, progress)?)
        }
        Source::DockerArchive(path, pick) => {
            let pass = DockerArchivePass { base: crate::image::base::BaseImage::load_picked(&path, pick.as_ref())?, compressor };
            finish(source::plan_docker_archive(&pass, spool, progress)?)
        }
        Source::OciDir(dir, r) => finish(source::plan_oci(&OciStore::Dir(&dir), r.as_deref())?.0),
        Source::OciArchive(path, r) => {
            let index = ArchiveIndex::load(&path)?;
            let (mut plan, members) = source::plan_oci(&OciStore::Archive(&index), r.as_deref())?;
            let pass = source::OciArchivePass { index, members };
            plan.pass = Some(&pass);
            finish(plan)
        }
    }
}

/// Plans `source` and pushes it to `repo` (and `tag`), then hands the plan to `then`. Layers
/// compressed to learn their digests go up from the spool while the plan is still being made.
fn push_source<T>(reg: &Registry, repo: &str, tag: Option<&str>, source: &str, push: &Push, progress: &Progress, then: impl FnOnce(&Plan) -> Result<T>) -> Result<T> {
    let opts = push_options(push);
    let (ready, spooled) = std::sync::mpsc::channel();
    let spool = Spool::new(ready)?;
    std::thread::scope(|scope| {
        let mut early = Some(scope.spawn(|| push::upload_spooled(reg, repo, spooled, &spool, &opts, progress)));
        let joined = |handle: std::thread::ScopedJoinHandle<'_, Result<push::Settled>>| handle.join().unwrap_or_else(|_| Err(anyhow!("internal error: the upload thread panicked")));
        let planned = with_plan(source, push.compressor, push.manifest_format, Some(&spool), progress, |plan| {
            spool.close();
            let settled = joined(early.take().expect("joined once"))?;
            push::push_plan(reg, repo, tag, plan, &opts, settled, progress)?;
            then(plan)
        });
        spool.close();
        match (planned, early.take().map(joined)) {
            // The pass stopped because an upload failed: that is the cause to tell.
            (Err(_), Some(Err(upload))) => Err(upload),
            (planned, _) => planned,
        }
    })
}

/// Pushes `source` (a conf, OCI layout, oci-archive or Docker archive) to `dest`
/// (`docker://REGISTRY/REPO[:TAG]`), then signs it with `sign` (as cosign does), attests its
/// `provenance` (a SLSA v1 predicate) with the same key, and attaches `attachments` to it;
/// returns the manifest's digest.
pub fn push(source: &str, dest: &str, push: &Push, attachments: &[referrers::Attachment], sign: Option<&crate::supply_chain::sign::Key>, provenance: Option<&serde_json::Value>, connect: &Connect) -> Result<String> {
    let progress = Progress { quiet: connect.quiet };
    let dest = dest_reference(dest)?;
    push.check()?;
    let reg = Registry::connect(&dest, connect, push_scopes(&dest, push))?;
    let tag = dest.tag.clone().unwrap_or_else(|| "latest".into());
    let subject = push_source(&reg, &dest.repo, Some(&tag), source, push, &progress, |plan| {
        let top = plan.top();
        Ok(referrers::Subject { media_type: top.media_type.clone(), digest: top.digest.clone(), size: top.bytes.len() as u64 })
    })?;
    progress.say(format!("pushed {}:{tag}@{}", dest.name(), subject.digest));
    if let Some(key) = sign {
        let reference = docker_reference(&dest);
        referrers::sign(&reg, &dest.repo, &subject, &reference, key, &progress)?;
        if let Some(predicate) = provenance {
            referrers::attest(&reg, &dest.repo, &subject, &reference, crate::supply_chain::provenance::SLSA_PROVENANCE_V1, predicate, key, &progress)?;
        }
        // Signed SBOMs too, so `cosign verify-attestation --type cyclonedx` vouches for them.
        for att in attachments {
            if let Some(predicate_type) = att.predicate_type() {
                let doc: serde_json::Value = serde_json::from_slice(&att.bytes)?;
                referrers::attest(&reg, &dest.repo, &subject, &reference, predicate_type, &doc, key, &progress)?;
            }
        }
    } else if provenance.is_some() {
        bail!("provenance is attested with a key: give --sign too");
    }
    for att in attachments {
        referrers::attach(&reg, &dest.repo, &subject, att, &progress)?;
    }
    Ok(subject.digest)
}

/// The repository as cosign names it in what it signs (Docker Hub as `index.docker.io`).
fn docker_reference(dest: &Reference) -> String {
    let host = if dest.registry == "docker.io" { "index.docker.io" } else { dest.registry.as_str() };
    format!("{host}/{}", dest.repo)
}

fn output_name(reference: &Reference, given: &str) -> String {
    // The name as the user wrote it, without scheme, tag or digest.
    let s = given.strip_prefix("docker://").unwrap_or(given);
    match crate::image::reference::parse_reference(s) {
        Ok(parts) => parts.name.to_string(),
        Err(_) => reference.name(),
    }
}

/// Pulls an image into a Docker archive or an OCI layout; returns the manifest's digest.
pub fn pull(args: &Pull, connect: &Connect) -> Result<String> {
    let progress = Progress { quiet: connect.quiet };
    let reference = Reference::parse(&args.image)?;
    let reg = Registry::connect(&reference, connect, vec![format!("repository:{}:pull", reference.repo)])?;
    let img = pull::resolve(&reg, &reference, &args.platform.platform())?;
    let name = args.image_name.clone().unwrap_or_else(|| output_name(&reference, &args.image));
    let tag = args.image_tag.clone().or(reference.tag.clone()).unwrap_or_else(|| "latest".into());
    let repo_tag = format!("{name}:{tag}");
    crate::image::reference::check_repo_tag(&repo_tag).map_err(|e| anyhow!("--image-name and --image-tag: {e}"))?;
    match args.format {
        PullFormat::DockerArchive => {
            let (name, tag) = crate::image::reference::normalized_name_tag(&repo_tag).map_err(|e| anyhow!("--image-name and --image-tag: {e}"))?;
            pull::write_docker_archive(&reg, &reference.repo, &img, (&name, &tag), &args.output, &progress)?
        }
        PullFormat::Oci => pull::write_oci_layout(&reg, &reference.repo, &img, &repo_tag, &args.output, &progress)?,
    }
    progress.say(format!("pulled {}@{} into {}", reference.name(), img.manifest_digest, args.output.display()));
    Ok(img.manifest_digest)
}

/// pullImage's arguments for an image, as a Nix attribute set (nix-prefetch-docker's output).
pub fn prefetch(args: &Prefetch, connect: &Connect) -> Result<String> {
    let progress = Progress { quiet: connect.quiet };
    let reference = Reference::parse(&args.image)?;
    let reg = Registry::connect(&reference, connect, vec![format!("repository:{}:pull", reference.repo)])?;
    let img = pull::resolve(&reg, &reference, &args.platform.platform())?;
    let image_name = output_name(&reference, &args.image);
    let final_name = args.final_image_name.clone().unwrap_or_else(|| image_name.clone());
    let final_tag = args.final_image_tag.clone().or(reference.tag.clone()).unwrap_or_else(|| "latest".into());
    let final_ref = format!("{final_name}:{final_tag}");
    let (name, tag) = crate::image::reference::normalized_name_tag(&final_ref).map_err(|e| anyhow!("--final-image-name and --final-image-tag: {e}"))?;
    let tmp = crate::util::files::TempDir::new_in(&crate::util::settings::get().temp_dir)?;
    let out = tmp.0.join("image.tar");
    pull::write_docker_archive(&reg, &reference.repo, &img, (&name, &tag), &out, &progress)?;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut f = std::fs::File::open(&out)?;
    std::io::copy(&mut f, &mut hasher)?;
    let hash = auth::base64_encode(&sha2::Digest::finalize(hasher));
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default().replace("${", "\\${");
    let mut text = String::from("{\n");
    text.push_str(&format!("  imageName = {};\n", q(&image_name)));
    text.push_str(&format!("  imageDigest = {};\n", q(&img.top_digest)));
    text.push_str(&format!("  hash = {};\n", q(&format!("sha256-{hash}"))));
    text.push_str(&format!("  finalImageName = {};\n", q(&final_name)));
    text.push_str(&format!("  finalImageTag = {};\n", q(&final_tag)));
    let p = args.platform.platform();
    if p.os != "linux" || args.platform.arch.is_some() {
        text.push_str(&format!("  os = {};\n  arch = {};\n", q(&p.os), q(&p.arch)));
    }
    if let Some(variant) = &p.variant {
        text.push_str(&format!("  variant = {};\n", q(variant)));
    }
    text.push_str("}\n");
    Ok(text)
}

/// Platform of an image from its config JSON.
fn platform_of(config: &[u8], what: &str) -> Result<Value> {
    let c: Value = crate::util::limits::parse_json(config, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{what}: config: {e:#}"))?;
    let arch = c.get("architecture").and_then(Value::as_str).filter(|a| !a.is_empty()).ok_or_else(|| anyhow!("{what}: config has no architecture"))?;
    let os = c.get("os").and_then(Value::as_str).filter(|a| !a.is_empty()).unwrap_or("linux");
    let mut p = json!({"architecture": arch, "os": os});
    if let Some(v) = c.get("variant").and_then(Value::as_str).filter(|v| !v.is_empty()) {
        p["variant"] = json!(v);
    }
    Ok(p)
}

fn plan_config(plan: &Plan) -> Result<Vec<u8>> {
    let top: Value = serde_json::from_slice(&plan.top().bytes)?;
    if top.get("manifests").is_some() {
        bail!("is already a multi-platform index; list its images instead");
    }
    let digest = top.pointer("/config/digest").and_then(Value::as_str).ok_or_else(|| anyhow!("manifest has no config"))?;
    let blob = plan.blobs.iter().find(|b| b.digest == digest).ok_or_else(|| anyhow!("config blob missing"))?;
    match &blob.data {
        BlobData::Bytes(b) => Ok(b.clone()),
        BlobData::File(p) => std::fs::read(p).map_err(|e| anyhow!("cannot read {}: {e}", p.display())),
        BlobData::Pass(_) => bail!("config is not readable before the push"),
    }
}

/// Pushes a multi-platform index of `images` (`docker://` references on the destination's
/// registry, or sources as for [`push`], pushed first) to `dest`; returns its digest.
pub fn index(dest: &str, images: &[String], push: &Push, connect: &Connect) -> Result<String> {
    let progress = Progress { quiet: connect.quiet };
    let dest = dest_reference(dest)?;
    push.check()?;
    let mut scopes = push_scopes(&dest, push);
    let mut refs = Vec::new();
    for image in images {
        if image.starts_with("docker://") {
            let r = Reference::parse(image)?;
            if r.registry != dest.registry {
                bail!("{image}: index images must be on the destination's registry {}", dest.registry);
            }
            if r.repo != dest.repo {
                scopes.push(format!("repository:{}:pull", r.repo));
            }
            refs.push(Some(r));
        } else {
            refs.push(None);
        }
    }
    let reg = Registry::connect(&dest, connect, scopes)?;
    let mut entries: Vec<Value> = Vec::new();
    for (image, r) in images.iter().zip(refs) {
        let (digest, media_type, size, platform) = match r {
            None => {
                progress.say(format!("pushing {image}"));
                push_source(&reg, &dest.repo, None, image, push, &progress, |plan| {
                    let platform = platform_of(&plan_config(plan).map_err(|e| anyhow!("{image}: {e}"))?, image)?;
                    let top = plan.top();
                    Ok((top.digest.clone(), top.media_type.clone(), top.bytes.len() as u64, platform))
                })?
            }
            Some(r) => {
                let (bytes, media_type, digest) = reg.get_manifest(&r.repo, r.reference())?;
                let json: Value = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{image}: manifest: {e:#}"))?;
                if json.get("manifests").is_some() {
                    bail!("{image} is already a multi-platform index; list its images instead");
                }
                let config = pull::resolve(&reg, &r, &Platform { os: String::new(), arch: String::new(), variant: None })?.config;
                let config_bytes = pull::get_json_blob(&reg, &r.repo, &config)?;
                let platform = platform_of(&config_bytes, image)?;
                if r.repo != dest.repo {
                    // Copy the image into the destination repository: mount its blobs.
                    let mut blobs: Vec<String> = json
                        .get("layers")
                        .and_then(Value::as_array)
                        .map(|ls| ls.iter().filter_map(|l| l.get("digest").and_then(Value::as_str).map(str::to_owned)).collect())
                        .unwrap_or_default();
                    blobs.push(config.digest.clone());
                    for b in &blobs {
                        if reg.blob_exists(&dest.repo, b)?.is_none() && !reg.mount(&dest.repo, b, &r.repo)? {
                            bail!("{image}: blob {b} could not be mounted into {}", dest.repo);
                        }
                    }
                    reg.put_manifest(&dest.repo, &digest, &media_type, &bytes)?;
                    progress.say(format!("{image}: mounted into {}", dest.repo));
                }
                (digest, media_type, bytes.len() as u64, platform)
            }
        };
        if entries.iter().any(|e| e["platform"] == platform) {
            bail!("{image}: another image already has platform {platform}");
        }
        progress.say(format!("{image}: {digest} for {}", platform_string(&platform)));
        entries.push(json!({"mediaType": media_type, "digest": digest, "size": size, "platform": platform}));
    }
    let index_type = match push.manifest_format {
        ManifestFormat::Oci => INDEX_TYPE,
        ManifestFormat::V2s2 => client::DOCKER_LIST,
    };
    let index = json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries});
    let bytes = serde_json::to_vec(&index)?;
    let digest = crate::util::sha256_digest(&bytes);
    let tag = dest.tag.clone().unwrap_or_else(|| "latest".into());
    reg.put_manifest(&dest.repo, &digest, index_type, &bytes)?;
    reg.put_manifest(&dest.repo, &tag, index_type, &bytes)?;
    progress.say(format!("pushed index {}:{tag}@{digest}", dest.name()));
    Ok(digest)
}

fn platform_string(p: &Value) -> String {
    let mut s = format!("{}/{}", p["os"].as_str().unwrap_or(""), p["architecture"].as_str().unwrap_or(""));
    if let Some(v) = p["variant"].as_str() {
        s.push('/');
        s.push_str(v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn output_names() {
        let r = Reference::parse("docker://127.0.0.1:5000/a/b:v1").unwrap();
        assert_eq!(output_name(&r, "docker://127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b");
        let r = Reference::parse("nixos/nix").unwrap();
        assert_eq!(output_name(&r, "nixos/nix"), "nixos/nix");
    }
}
