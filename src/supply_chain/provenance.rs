//! Provenance: an in-toto statement with a SLSA provenance v1 predicate saying what an image
//! was built from (the derivation, every store path in it with its NAR hash, its layers) and by
//! what (stevedore's version), and the DSSE envelope cosign stores attestations in.
//!
//! The predicate is made where the facts are (the build sandbox, from the closure graph); the
//! statement around it names the pushed manifest, known only once the push has made it.

use super::sbom::{LayerKind, SbomInput};
use super::sign::{base64, Key};
use crate::util::hex;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

/// The predicate type `cosign verify-attestation --type slsaprovenance1` looks for.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
pub const STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
/// What a DSSE envelope of an in-toto statement says it carries.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The media type of a cosign attestation's layer.
pub const DSSE_ENVELOPE_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// Names the build template: an image streamed from a conf over Nix store paths.
pub const BUILD_TYPE: &str = "https://stevedore.dev/provenance/nix-image/v1";
/// Names the builder in `runDetails`.
pub const BUILDER_ID: &str = "https://stevedore.dev/builder";

/// The SLSA provenance v1 predicate of the image `input` describes, built by `derivation`
/// (a `.drv` path) where it is known. Deterministic: the same image gives the same bytes.
pub fn predicate(input: &SbomInput, derivation: Option<&str>) -> Result<String> {
    let mut external = serde_json::Map::new();
    external.insert("image".into(), json!(if input.tag.is_empty() { input.name.clone() } else { format!("{}:{}", input.name, input.tag) }));
    if let Some(drv) = derivation {
        if !drv.ends_with(".drv") {
            bail!("derivation {drv:?} is not a .drv path");
        }
        external.insert("derivation".into(), json!(drv));
    }
    let mut deps = Vec::new();
    for o in &input.objects {
        let hash = o.nar_hash.as_deref().ok_or_else(|| anyhow!("{}: no narHash (the provenance names every store path by it)", o.path))?;
        let hex = hex(&crate::nixstore::parse_nar_hash(hash).map_err(|e| anyhow!("{}: {e:#}", o.path))?);
        let mut annotations = serde_json::Map::new();
        annotations.insert("narHash".into(), json!(hash));
        if let Some(size) = o.nar_size {
            annotations.insert("narSize".into(), json!(size));
        }
        // The digest is the NAR's, as `nix path-info` and narinfo files give it.
        deps.push(json!({"uri": format!("file://{}", o.path), "name": o.path, "digest": {"sha256": hex}, "annotations": annotations}));
    }
    let byproducts: Vec<Value> = input
        .layers
        .iter()
        .map(|l| {
            let kind = match l.kind {
                LayerKind::Base => "base",
                LayerKind::Store => "store",
                LayerKind::Customisation => "customisation",
            };
            json!({"name": format!("layer {} ({kind})", l.position), "digest": {"sha256": l.diff_id.trim_start_matches("sha256:")}, "mediaType": "application/vnd.oci.image.layer.v1.tar"})
        })
        .collect();
    let mut internal = json!({"architecture": input.architecture, "os": input.os});
    if let Some(id) = &input.image_id {
        internal["imageConfig"] = json!(id);
    }
    let doc = json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": internal,
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {"stevedore": env!("CARGO_PKG_VERSION")}},
            "byproducts": byproducts,
        },
    });
    // Keys in the order written here (serde_json keeps insertion order): the bytes depend only
    // on the facts.
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

/// Reads a predicate `stevedore provenance` (or passthru.provenance) wrote: a JSON object with
/// SLSA v1's two parts.
pub fn parse_predicate(what: &str, bytes: &[u8]) -> Result<Value> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| anyhow!("{what}: not JSON ({e})"))?;
    if v.get("buildDefinition").and_then(Value::as_object).is_none() || v.get("runDetails").and_then(Value::as_object).is_none() {
        bail!("{what}: not a SLSA provenance v1 predicate (no buildDefinition and runDetails objects)");
    }
    Ok(v)
}

/// The predicate types cosign gives SBOMs (`--type cyclonedx`, `--type spdxjson`).
pub const CYCLONEDX_PREDICATE: &str = "https://cyclonedx.org/bom";
pub const SPDX_PREDICATE: &str = "https://spdx.dev/Document";

/// The in-toto v1 statement that `predicate` (of `predicate_type`) is about the manifest
/// `digest` of `name`.
pub fn statement(name: &str, digest: &str, predicate_type: &str, predicate: &Value) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").filter(|h| h.len() == 64).ok_or_else(|| anyhow!("{digest}: not a sha256 digest"))?;
    let doc = json!({
        "_type": STATEMENT_V1,
        "subject": [{"name": name, "digest": {"sha256": hex}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    });
    Ok(serde_json::to_vec(&doc)?)
}

/// DSSE's pre-authentication encoding: what the signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The DSSE envelope of an in-toto `statement`, signed with `key` (as `cosign attest` writes it).
pub fn envelope(statement: &[u8], key: &Key) -> Result<Vec<u8>> {
    let sig = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, statement));
    let doc = json!({
        "payloadType": IN_TOTO_PAYLOAD_TYPE,
        "payload": base64(statement),
        "signatures": [{"keyid": "", "sig": base64(&sig)}],
    });
    Ok(serde_json::to_vec(&doc)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use crate::supply_chain::sbom::{Layer, StoreObject};

    fn input() -> SbomInput {
        SbomInput {
            name: "registry.example/team/app".into(),
            tag: "v1".into(),
            architecture: "amd64".into(),
            os: "linux".into(),
            image_id: Some(format!("sha256:{}", "c".repeat(64))),
            layers: vec![Layer { position: 1, diff_id: format!("sha256:{}", "d".repeat(64)), paths: vec!["/nix/store/aaa-hello-2.12".into()], kind: LayerKind::Store }],
            objects: vec![StoreObject { path: "/nix/store/aaa-hello-2.12".into(), nar_hash: Some(format!("sha256:{}", "0".repeat(52))), nar_size: Some(10), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn nix_hashes_in_every_spelling() {
        let hex64 = "ab".repeat(32);
        let bytes: Vec<u8> = (0..32).map(|_| 0xab).collect();
        let digest_of = |nar_hash: &str| {
            let mut i = input();
            i.objects[0].nar_hash = Some(nar_hash.to_string());
            let v: Value = serde_json::from_str(&predicate(&i, None)?)?;
            Ok::<_, anyhow::Error>(v["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"].as_str().unwrap_or_default().to_string())
        };
        assert_eq!(digest_of(&format!("sha256:{hex64}")).unwrap(), hex64);
        assert_eq!(digest_of(&format!("sha256:{}", crate::nixstore::nix_base32_encode(&bytes))).unwrap(), hex64);
        assert_eq!(digest_of(&format!("sha256-{}", base64(&bytes))).unwrap(), hex64);
        for bad in ["sha256:xyz", "md5:abc", "sha256-!!", ""] {
            let e = digest_of(bad).unwrap_err().to_string();
            assert!(e.contains("aaa-hello-2.12") && e.contains("narHash"), "{bad}: {e}");
        }
    }


    #[test]
    fn predicates_name_every_path_and_layer_and_are_stable() {
        let a = predicate(&input(), Some("/nix/store/zzz-app.drv")).unwrap();
        assert_eq!(a, predicate(&input(), Some("/nix/store/zzz-app.drv")).unwrap());
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["buildDefinition"]["externalParameters"]["derivation"], "/nix/store/zzz-app.drv");
        assert_eq!(v["buildDefinition"]["resolvedDependencies"][0]["digest"]["sha256"], "0".repeat(64));
        assert_eq!(v["runDetails"]["byproducts"][0]["digest"]["sha256"], "d".repeat(64));
        parse_predicate("p", a.as_bytes()).unwrap();
        assert!(predicate(&input(), Some("/nix/store/zzz-app")).is_err());
        let mut no_hash = input();
        no_hash.objects[0].nar_hash = None;
        assert!(predicate(&no_hash, None).unwrap_err().to_string().contains("no narHash"));
        assert!(parse_predicate("p", b"{\"_type\":1}").unwrap_err().to_string().starts_with("p: not a SLSA"));
    }

    #[test]
    fn envelopes_sign_the_pre_authentication_encoding() {
        assert_eq!(pae("t", b"hi"), b"DSSEv1 1 t 2 hi");
        let key = Key::from_pem(include_str!("../../tests/data/cosign.key"), Some(b"test-pass")).unwrap();
        let st = statement("r/app", &format!("sha256:{}", "e".repeat(64)), SLSA_PROVENANCE_V1, &json!({"buildDefinition": {}, "runDetails": {}})).unwrap();
        let env: Value = serde_json::from_slice(&envelope(&st, &key).unwrap()).unwrap();
        let payload = base64::engine::general_purpose::STANDARD.decode(env["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload, st);
        let sig = base64::engine::general_purpose::STANDARD.decode(env["signatures"][0]["sig"].as_str().unwrap()).unwrap();
        crate::supply_chain::sign::verify(include_str!("../../tests/data/cosign.pub"), &pae(IN_TOTO_PAYLOAD_TYPE, &payload), &sig).unwrap();
        assert!(statement("r", "sha256:short", SLSA_PROVENANCE_V1, &json!({})).is_err());
    }
}
