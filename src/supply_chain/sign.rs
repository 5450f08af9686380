//! Signatures as cosign makes and checks them: ECDSA P-256 over SHA-256 of a "simple signing"
//! payload that names the image's manifest digest, with keys in cosign's encrypted format
//! (scrypt, then NaCl secretbox around a PKCS#8 key) or plain PKCS#8 / SEC1 PEM.
//!
//! Signing is deterministic (RFC 6979): the same key over the same image gives the same
//! signature, so signing again adds nothing.

use anyhow::{anyhow, bail, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::Value;

/// The media type of a simple-signing payload (a signature manifest's layers).
pub const SIMPLE_SIGNING_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation that carries a layer's signature, base64 of its DER bytes.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The most memory a key's scrypt parameters may ask for (cosign's keys take 64 MiB).
const SCRYPT_MEMORY_LIMIT: u64 = 256 << 20;

/// A private key to sign with.
pub struct Key {
    key: SigningKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The one PEM block of `text`: its label and decoded bytes.
fn pem_block(text: &str) -> Result<(String, Vec<u8>)> {
    let start = text.find("-----BEGIN ").ok_or_else(|| anyhow!("not a PEM file (no -----BEGIN line)"))?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----").ok_or_else(|| anyhow!("a PEM -----BEGIN line without its closing dashes"))?;
    let label = rest[..label_end].to_string();
    let body_start = label_end + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest.find(&end_marker).ok_or_else(|| anyhow!("no {end_marker} line"))?;
    let body: String = rest[body_start..body_end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = B64.decode(body).map_err(|_| anyhow!("the {label} block is not base64"))?;
    Ok((label, bytes))
}

fn b64_field(v: &Value, path: &[&str]) -> Result<Vec<u8>> {
    let mut at = v;
    for p in path {
        at = at.get(*p).ok_or_else(|| anyhow!("field {} is missing", path.join(".")))?;
    }
    let s = at.as_str().ok_or_else(|| anyhow!("field {} is not a string", path.join(".")))?;
    B64.decode(s).map_err(|_| anyhow!("field {} is not base64", path.join(".")))
}

fn uint_field(v: &Value, path: &[&str]) -> Result<u64> {
    let mut at = v;
    for p in path {
        at = at.get(*p).ok_or_else(|| anyhow!("field {} is missing", path.join(".")))?;
    }
    at.as_u64().ok_or_else(|| anyhow!("field {} is not a whole number", path.join(".")))
}

/// Opens cosign's encrypted key envelope (the JSON inside the PEM block): the PKCS#8 DER bytes.
fn decrypt_envelope(json: &[u8], passphrase: &[u8]) -> Result<Vec<u8>> {
    use crypto_secretbox::aead::{Aead, KeyInit};
    let v: Value = serde_json::from_slice(json).map_err(|_| anyhow!("the encrypted key is not cosign's JSON envelope"))?;
    let kdf = v.get("kdf").and_then(|k| k.get("name")).and_then(Value::as_str);
    let cipher = v.get("cipher").and_then(|k| k.get("name")).and_then(Value::as_str);
    if kdf != Some("scrypt") || cipher != Some("nacl/secretbox") {
        bail!("kdf {kdf:?} with cipher {cipher:?}: only scrypt with nacl/secretbox (cosign's) is known");
    }
    let n = uint_field(&v, &["kdf", "params", "N"])?;
    let r = uint_field(&v, &["kdf", "params", "r"])?;
    let p = uint_field(&v, &["kdf", "params", "p"])?;
    if !n.is_power_of_two() || n < 2 || !(1..=32).contains(&r) || !(1..=16).contains(&p) {
        bail!("scrypt parameters N={n} r={r} p={p} are not valid (N a power of two, r 1-32, p 1-16)");
    }
    // Saturating: a hostile N near 2^63 must not wrap into a small number.
    let memory = n.saturating_mul(128).saturating_mul(r);
    if memory > SCRYPT_MEMORY_LIMIT {
        bail!("scrypt parameters N={n} r={r} would take {} MiB (at most {} MiB)", memory >> 20, SCRYPT_MEMORY_LIMIT >> 20);
    }
    let salt = b64_field(&v, &["kdf", "salt"])?;
    let nonce = b64_field(&v, &["cipher", "nonce"])?;
    let sealed = b64_field(&v, &["ciphertext"])?;
    if nonce.len() != 24 {
        bail!("field cipher.nonce has {} bytes, not 24", nonce.len());
    }
    let params = scrypt::Params::new(n.trailing_zeros() as u8, r as u32, p as u32, 32).map_err(|e| anyhow!("scrypt parameters: {e}"))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(passphrase, &salt, &params, &mut key).map_err(|e| anyhow!("scrypt: {e}"))?;
    let boxed = crypto_secretbox::XSalsa20Poly1305::new((&key).into());
    let plain = boxed.decrypt(nonce.as_slice().into(), sealed.as_slice()).map_err(|_| anyhow!("wrong passphrase, or the key is corrupt"));
    key.fill(0);
    plain
}

impl Key {
    /// Reads a private key: cosign's `ENCRYPTED SIGSTORE PRIVATE KEY` (or the older `ENCRYPTED
    /// COSIGN PRIVATE KEY`), opened with `passphrase`, or an unencrypted PKCS#8 `PRIVATE KEY`
    /// or SEC1 `EC PRIVATE KEY`. Only ECDSA P-256 keys sign.
    pub fn from_pem(text: &str, passphrase: Option<&[u8]>) -> Result<Key> {
        let (label, bytes) = pem_block(text)?;
        let key = match label.as_str() {
            "ENCRYPTED SIGSTORE PRIVATE KEY" | "ENCRYPTED COSIGN PRIVATE KEY" => {
                let passphrase = passphrase.unwrap_or(b"");
                let mut der = decrypt_envelope(&bytes, passphrase)?;
                let key = SigningKey::from_pkcs8_der(&der).map_err(|_| anyhow!("the decrypted key is not an ECDSA P-256 PKCS#8 key"));
                der.fill(0);
                key?
            }
            "PRIVATE KEY" => SigningKey::from_pkcs8_der(&bytes).map_err(|_| anyhow!("not an ECDSA P-256 key (only P-256 keys sign, as cosign's do)"))?,
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(&bytes).map(SigningKey::from).map_err(|_| anyhow!("not an ECDSA P-256 key (only P-256 keys sign, as cosign's do)"))?,
            "ENCRYPTED PRIVATE KEY" => bail!("a PKCS#8-encrypted key: give cosign's encrypted format (cosign import-key-pair) or an unencrypted one"),
            other => bail!("a {other} block, not a private key"),
        };
        Ok(Key { key })
    }

    /// DER of the ECDSA signature over SHA-256 of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(payload);
        sig.to_der().as_bytes().to_vec()
    }

    /// The public key, as `cosign.pub` holds it.
    pub fn public_pem(&self) -> String {
        self.key.verifying_key().to_public_key_pem(LineEnding::LF).expect("a P-256 key encodes")
    }
}

/// Checks `signature` (DER) over `payload` against a PEM public key.
pub fn verify(public_pem: &str, payload: &[u8], signature: &[u8]) -> Result<()> {
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    let key = p256::ecdsa::VerifyingKey::from_public_key_pem(public_pem).map_err(|_| anyhow!("not an ECDSA P-256 public key"))?;
    let sig = Signature::from_der(signature).map_err(|_| anyhow!("the signature is not DER"))?;
    key.verify(payload, &sig).map_err(|_| anyhow!("the signature does not match"))
}

/// The payload cosign signs for the image `docker_reference` (`registry/repo`) at
/// `manifest_digest`, byte for byte as cosign writes it.
pub fn simple_signing_payload(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    let s = |v: &str| serde_json::to_string(v).expect("a string serializes");
    format!(
        "{{\"critical\":{{\"identity\":{{\"docker-reference\":{}}},\"image\":{{\"docker-manifest-digest\":{}}},\"type\":\"cosign container image signature\"}},\"optional\":null}}",
        s(docker_reference),
        s(manifest_digest)
    )
    .into_bytes()
}

/// The config blob of a signature manifest whose layers have `layer_digests`, as cosign writes
/// it (zero times, no platform).
pub fn signature_config(layer_digests: &[String]) -> Vec<u8> {
    let ids: Vec<String> = layer_digests.iter().map(|d| serde_json::to_string(d).expect("a string serializes")).collect();
    format!(
        "{{\"architecture\":\"\",\"created\":\"0001-01-01T00:00:00Z\",\"history\":[{{\"created\":\"0001-01-01T00:00:00Z\"}}],\"os\":\"\",\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{}]}},\"config\":{{}}}}",
        ids.join(",")
    )
    .into_bytes()
}

/// Base64, as signature annotations hold signatures.
pub fn base64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `COSIGN_PASSWORD=test-pass cosign generate-key-pair` (cosign 2.5.0): a key for
    // these tests only (and tests/registry.rs, tests/nix).
    const COSIGN_KEY: &str = include_str!("../../tests/data/cosign.key");
    const COSIGN_PUB: &str = include_str!("../../tests/data/cosign.pub");

    #[test]
    fn opens_cosigns_encrypted_keys_and_signs_deterministically() {
        let key = Key::from_pem(COSIGN_KEY, Some(b"test-pass")).unwrap();
        assert_eq!(key.public_pem(), COSIGN_PUB);
        let payload = simple_signing_payload("127.0.0.1:5000/team/app", &format!("sha256:{}", "ab".repeat(32)));
        let sig = key.sign(&payload);
        assert_eq!(sig, key.sign(&payload));
        verify(COSIGN_PUB, &payload, &sig).unwrap();
        let mut tampered = payload.clone();
        tampered[20] ^= 1;
        assert!(verify(COSIGN_PUB, &tampered, &sig).is_err());
        // Wrong or missing passphrases are one clear error, never the key.
        for wrong in [Some(&b"nope"[..]), None] {
            let e = Key::from_pem(COSIGN_KEY, wrong).unwrap_err().to_string();
            assert_eq!(e, "wrong passphrase, or the key is corrupt");
        }
    }

    #[test]
    fn plain_pkcs8_and_sec1_keys_and_what_is_refused() {
        let key = Key::from_pem(COSIGN_KEY, Some(b"test-pass")).unwrap();
        let der = key.key.to_bytes();
        let sec1 = p256::SecretKey::from_bytes(&der).unwrap();
        let pkcs8 = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&sec1, LineEnding::LF).unwrap();
        assert_eq!(Key::from_pem(&pkcs8, None).unwrap().public_pem(), COSIGN_PUB);
        let sec1_pem = sec1.to_sec1_pem(LineEnding::LF).unwrap();
        assert_eq!(Key::from_pem(&sec1_pem, None).unwrap().public_pem(), COSIGN_PUB);
        for (bad, want) in [
            ("hello", "not a PEM file"),
            (COSIGN_PUB, "a PUBLIC KEY block, not a private key"),
            ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an ECDSA P-256 key"),
            ("-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n", "not base64"),
            ("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\ne30=\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n", "only scrypt"),
        ] {
            let e = Key::from_pem(bad, Some(b"x")).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        // Parameters that would take gigabytes are refused before scrypt runs.
        // So are ones whose product overflows 64 bits (N = 2^62).
        for n in ["1073741824", "4611686018427387904"] {
            let huge = B64.encode(format!(r#"{{"kdf":{{"name":"scrypt","params":{{"N":{n},"r":8,"p":1}},"salt":"AA=="}},"cipher":{{"name":"nacl/secretbox","nonce":"AA=="}},"ciphertext":"AA=="}}"#));
            let e = Key::from_pem(&format!("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{huge}\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"), Some(b"x")).unwrap_err().to_string();
            assert!(e.contains("MiB"), "{e}");
        }
    }

    #[test]
    fn payload_and_config_are_cosigns_bytes() {
        // As cosign 2.5 wrote them for an image it signed.
        let payload = simple_signing_payload("127.0.0.1:5123/team/app", "sha256:44de92b7748f8ac59eac02d6cfa1e07ce828333d1271380f334d3b7e1c99bdab");
        assert_eq!(crate::util::sha256_digest(&payload), "sha256:95be1c93c80d1044db00ba5a2e54770494961cd177eba43aec6b8e8736470317");
        let config = signature_config(&[crate::util::sha256_digest(&payload)]);
        assert_eq!(crate::util::sha256_digest(&config), "sha256:fe642df4c788f2a00259c60ee997b57780dcaf5ae7705a87968b9a53244f4a16");
    }
}
