//! Small utilities every other module may use: atomic output files and temporary paths
//! (`files`), input size limits (`limits`), what the environment set (`settings`), hex.

use serde_json::Value;

pub mod files;
pub mod io;
pub mod limits;
pub mod progress;
pub mod settings;
pub mod shared;

/// `sha256:` and the lower-case hex SHA-256 of `data`: a blob's digest as OCI writes it.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex(&sha2::Sha256::digest(data)))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// What kind of JSON value `v` is, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
