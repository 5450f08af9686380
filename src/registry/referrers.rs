//! What refers to an image: artifacts (an SBOM, an attestation) as OCI 1.1 image manifests with
//! an `artifactType` and a `subject`, found by clients through the registry's referrers API, or,
//! where the registry has none (it answers the manifest PUT without `OCI-Subject`), through the
//! referrers tag scheme: an index tagged `sha256-<hex of the subject>` listing them; and cosign's
//! signatures and attestations, manifests tagged `sha256-<hex>.sig` and `.att` with one layer
//! per signature or DSSE envelope.

use super::client::Registry;
use crate::supply_chain::sign::{base64, signature_config, simple_signing_payload, Key, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_TYPE};
use crate::image::oci::INDEX_TYPE;
use crate::util::progress::Progress;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};

/// The media type of OCI manifests, artifacts' included.
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The config of an artifact that has none: `{}`, as the image spec defines it.
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
const EMPTY: &[u8] = b"{}";

/// One document to attach: its `artifactType` (also its layer's media type), the file name
/// clients such as `oras pull` give it, and its bytes.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub artifact_type: String,
    pub file_name: String,
    pub bytes: Vec<u8>,
}

impl Attachment {
    /// An attachment of a document whose type its content tells: CycloneDX or SPDX JSON, or an
    /// in-toto statement. `what` names it in errors.
    pub fn detect(what: &str, bytes: Vec<u8>) -> Result<Attachment> {
        let v: Value = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{what}: not a JSON document ({e:#})"))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str);
        let (artifact_type, file_name) = if field("bomFormat") == Some("CycloneDX") {
            ("application/vnd.cyclonedx+json", "sbom.cdx.json")
        } else if field("spdxVersion").is_some_and(|s| s.starts_with("SPDX-")) {
            ("application/spdx+json", "sbom.spdx.json")
        } else if field("_type").is_some_and(|s| s.starts_with("https://in-toto.io/Statement/")) {
            ("application/vnd.in-toto+json", "statement.intoto.json")
        } else {
            bail!("{what}: neither a CycloneDX nor an SPDX document nor an in-toto statement (bomFormat, spdxVersion, _type)");
        };
        Ok(Attachment { artifact_type: artifact_type.into(), file_name: file_name.into(), bytes })
    }

    /// The predicate type cosign attests this document as, if it is an SBOM.
    pub fn predicate_type(&self) -> Option<&'static str> {
        use crate::supply_chain::provenance::{CYCLONEDX_PREDICATE, SPDX_PREDICATE};
        match self.artifact_type.as_str() {
            "application/vnd.cyclonedx+json" => Some(CYCLONEDX_PREDICATE),
            "application/spdx+json" => Some(SPDX_PREDICATE),
            _ => None,
        }
    }
}

/// What an artifact refers to: a manifest's descriptor.
#[derive(Debug, Clone)]
pub struct Subject {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// The artifact manifest of `att` about `subject`, and its digest. The same document about
/// the same image gives the same bytes: nothing in it depends on when or where it was made.
pub fn artifact_manifest(att: &Attachment, subject: &Subject) -> (Vec<u8>, String) {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": att.artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": EMPTY.len()},
        "layers": [{
            "mediaType": att.artifact_type,
            "digest": crate::util::sha256_digest(&att.bytes),
            "size": att.bytes.len(),
            "annotations": {"org.opencontainers.image.title": att.file_name},
        }],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    });
    let bytes = serde_json::to_vec(&manifest).expect("a JSON value serializes");
    let digest = crate::util::sha256_digest(&bytes);
    (bytes, digest)
}

/// Uploads the small blob `data` (its digest `digest`) unless `repo` has it already.
fn ensure_blob(reg: &Registry, repo: &str, digest: &str, data: &[u8]) -> Result<()> {
    match reg.blob_exists(repo, digest)? {
        Some(_) => Ok(()),
        None => reg.upload_bytes(repo, digest, data),
    }
}

/// The tag of the referrers index of `subject_digest` (`sha256:HEX` → `sha256-HEX`).
pub fn referrers_tag(subject_digest: &str) -> String {
    subject_digest.replacen(':', "-", 1)
}

/// Uploads `att` (its blob, the empty config, the artifact manifest) to `repo` and makes it
/// findable from `subject`; returns the artifact manifest's digest.
pub fn attach(reg: &Registry, repo: &str, subject: &Subject, att: &Attachment, progress: &Progress) -> Result<String> {
    let (manifest, digest) = artifact_manifest(att, subject);
    ensure_blob(reg, repo, &crate::util::sha256_digest(&att.bytes), &att.bytes)?;
    ensure_blob(reg, repo, EMPTY_DIGEST, EMPTY)?;
    let answered = reg.put_manifest(repo, &digest, MANIFEST_TYPE, &manifest)?;
    if answered.oci_subject.as_deref() == Some(subject.digest.as_str()) {
        progress.say(format!("{}: attached {digest} ({}; the registry lists referrers)", subject.digest, att.artifact_type));
        return Ok(digest);
    }
    let entry = json!({"mediaType": MANIFEST_TYPE, "digest": digest, "size": manifest.len(), "artifactType": att.artifact_type});
    add_to_referrers_tag(reg, repo, &subject.digest, entry)?;
    progress.say(format!("{}: attached {digest} ({}; listed under tag {})", subject.digest, att.artifact_type, referrers_tag(&subject.digest)));
    Ok(digest)
}

/// Adds `entry` to the list `field` ("manifests", "layers") of the manifest tagged `tag`,
/// keeping what others listed there; `make` writes the manifest for a list and returns its
/// media type and bytes (uploading any blob it needs). Two pushes may update the tag at once,
/// and a registry without the referrers API has no conditional PUT either: a writer that read
/// the tag before another's PUT overwrites it a few milliseconds later. So each writer reads
/// the tag back until it has found its entry there twice, 100 ms apart, adding it again
/// whenever it is missing: the manifest that stays holds every writer's entry.
fn add_to_tagged_list(reg: &Registry, repo: &str, tag: &str, field: &str, entry: Value, make: impl Fn(&[Value]) -> Result<(&'static str, Vec<u8>)>) -> Result<()> {
    let digest = entry["digest"].as_str().unwrap_or_default().to_string();
    let same = |m: &Value| m.get("digest") == entry.get("digest") && m.get("annotations") == entry.get("annotations");
    let mut confirmed = 0;
    for _ in 0..16 {
        let mut list = tagged_list(reg, repo, tag, field)?;
        if list.iter().any(same) {
            confirmed += 1;
            if confirmed == 2 {
                return Ok(());
            }
        } else {
            confirmed = 0;
            list.push(entry.clone());
            let (media_type, bytes) = make(&list)?;
            reg.put_manifest(repo, tag, media_type, &bytes)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("{}/{repo}:{tag}: the tag kept losing {digest} to other writers", reg.host)
}

fn add_to_referrers_tag(reg: &Registry, repo: &str, subject_digest: &str, entry: Value) -> Result<()> {
    add_to_tagged_list(reg, repo, &referrers_tag(subject_digest), "manifests", entry, |list| {
        let index = json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": list});
        Ok((INDEX_TYPE, serde_json::to_vec(&index)?))
    })
}

/// The entries of list `field` of the manifest tagged `tag` (none if there is no such tag).
fn tagged_list(reg: &Registry, repo: &str, tag: &str, field: &str) -> Result<Vec<Value>> {
    let Some((bytes, _, _)) = reg.find_manifest(repo, tag)? else { return Ok(Vec::new()) };
    let what = format!("{}/{repo}:{tag}", reg.host);
    let v: Map<String, Value> = crate::util::limits::parse_json(&bytes, crate::util::limits::METADATA_VALUES).map_err(|e| anyhow!("{what} is not JSON: {e:#}"))?;
    match v.get(field) {
        Some(Value::Array(list)) if list.iter().all(|m| m.get("digest").and_then(Value::as_str).is_some()) => Ok(list.clone()),
        _ => bail!("{what} has no list of {field} with digests: delete the tag or let its owner fix it"),
    }
}

/// The tag cosign keeps the signatures of `subject_digest` under (`sha256-HEX.sig`).
pub fn signature_tag(subject_digest: &str) -> String {
    format!("{}.sig", referrers_tag(subject_digest))
}

/// Signs the image `subject` in `repo` as cosign does: the simple-signing payload naming
/// `docker_reference` and the digest, its signature in the layer's annotation, added to the
/// manifest tagged `sha256-HEX.sig` beside any other signatures there.
pub fn sign(reg: &Registry, repo: &str, subject: &Subject, docker_reference: &str, key: &Key, progress: &Progress) -> Result<()> {
    let payload = simple_signing_payload(docker_reference, &subject.digest);
    let signature = base64(&key.sign(&payload));
    let tag = signature_tag(&subject.digest);
    add_to_cosign_list(reg, repo, &tag, SIMPLE_SIGNING_TYPE, &payload, json!({SIGNATURE_ANNOTATION: signature}))?;
    progress.say(format!("{}: signed (tag {tag})", subject.digest));
    Ok(())
}

/// Attests `predicate` (of `predicate_type`: SLSA provenance, an SBOM) about the image
/// `subject` as `cosign attest` does: the in-toto statement naming `docker_reference` and the
/// digest, in a DSSE envelope signed with `key`, added to the manifest tagged `sha256-HEX.att`
/// beside the attestations already there.
#[allow(clippy::too_many_arguments)]
pub fn attest(reg: &Registry, repo: &str, subject: &Subject, docker_reference: &str, predicate_type: &str, predicate: &Value, key: &Key, progress: &Progress) -> Result<()> {
    use crate::supply_chain::provenance::{envelope, statement, DSSE_ENVELOPE_TYPE};
    let envelope = envelope(&statement(docker_reference, &subject.digest, predicate_type, predicate)?, key)?;
    let tag = format!("{}.att", referrers_tag(&subject.digest));
    // cosign's attestations carry their signature inside the envelope: the annotation is empty.
    add_to_cosign_list(reg, repo, &tag, DSSE_ENVELOPE_TYPE, &envelope, json!({SIGNATURE_ANNOTATION: "", "predicateType": predicate_type}))?;
    progress.say(format!("{}: attested {predicate_type} (tag {tag})", subject.digest));
    Ok(())
}

/// Uploads `blob` and adds it, with `annotations`, to the cosign manifest tagged `tag` (the
/// config listing every layer, as cosign writes it).
fn add_to_cosign_list(reg: &Registry, repo: &str, tag: &str, media_type: &str, blob: &[u8], annotations: Value) -> Result<()> {
    let digest = crate::util::sha256_digest(blob);
    ensure_blob(reg, repo, &digest, blob)?;
    let entry = json!({"mediaType": media_type, "size": blob.len(), "digest": digest, "annotations": annotations});
    add_to_tagged_list(reg, repo, tag, "layers", entry, |layers| {
        let digests: Vec<String> = layers.iter().filter_map(|l| l.get("digest").and_then(Value::as_str).map(str::to_owned)).collect();
        let config = signature_config(&digests);
        let config_digest = crate::util::sha256_digest(&config);
        ensure_blob(reg, repo, &config_digest, &config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": config_digest},
            "layers": layers,
        });
        Ok((MANIFEST_TYPE, serde_json::to_vec(&manifest)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_digest_is_the_spec_one() {
        assert_eq!(crate::util::sha256_digest(EMPTY), EMPTY_DIGEST);
    }

    #[test]
    fn artifact_manifests_are_stable_and_name_their_subject() {
        let att = Attachment::detect("t", br#"{"bomFormat":"CycloneDX","specVersion":"1.6"}"#.to_vec()).unwrap();
        assert_eq!(att.artifact_type, "application/vnd.cyclonedx+json");
        let subject = Subject { media_type: MANIFEST_TYPE.into(), digest: format!("sha256:{}", "a".repeat(64)), size: 123 };
        let (a, da) = artifact_manifest(&att, &subject);
        let (b, db) = artifact_manifest(&att, &subject);
        assert_eq!((a.clone(), da.clone()), (b, db));
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["subject"]["digest"], subject.digest.as_str());
        assert_eq!(v["config"]["digest"], EMPTY_DIGEST);
        assert_eq!(v["layers"][0]["size"], att.bytes.len());
        assert_eq!(referrers_tag(&subject.digest), format!("sha256-{}", "a".repeat(64)));
    }

    #[test]
    fn documents_are_told_by_their_content() {
        assert_eq!(Attachment::detect("t", br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec()).unwrap().file_name, "sbom.spdx.json");
        assert_eq!(Attachment::detect("t", br#"{"_type":"https://in-toto.io/Statement/v1"}"#.to_vec()).unwrap().artifact_type, "application/vnd.in-toto+json");
        for bad in [&b"{}"[..], b"[1]", b"not json", b"{\"bomFormat\":7}"] {
            let e = Attachment::detect("doc.json", bad.to_vec()).unwrap_err().to_string();
            assert!(e.starts_with("doc.json: "), "{e}");
        }
    }
}
