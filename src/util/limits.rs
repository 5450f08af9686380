//! What any input may make us hold: inputs are read only from regular files (a FIFO or a
//! device could block or never end), within a size, and JSON is parsed only when it holds a
//! bounded number of values (a parsed value takes about 72 bytes, so 4 MiB of `[0,0,...]`
//! would take 150 MB). The limits sit far above what real inputs need.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The largest JSON input (a conf, a closure graph, a builder's attributes): real ones are a
/// few MiB even for closures of thousands of paths.
pub const INPUT_LIMIT: u64 = 32 << 20;
/// The most values such an input may hold (a graph of 20,000 paths has about 300,000).
pub const INPUT_VALUES: usize = 500_000;
/// The largest manifest, config or index read from an image or a registry (containers/image
/// allows the same).
pub const JSON_LIMIT: u64 = 4 << 20;
/// The most values image metadata may hold.
pub const METADATA_VALUES: usize = 100_000;

/// Checks that `path` can be read as a file without blocking.
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    Ok(meta)
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    check_regular(path)?;
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    read_all_limited(f, limit).with_context(|| format!("cannot read {}", path.display()))
}

/// Reads `r` to its end, failing once it passes `limit` bytes.
pub fn read_all_limited(r: impl Read, limit: u64) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    r.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        bail!("larger than the limit of {} MiB", limit >> 20);
    }
    Ok(data)
}

/// An upper bound on the values (and object keys) a JSON text holds: one more than the
/// separators and openers outside strings.
fn count_values(bytes: &[u8]) -> usize {
    let (mut n, mut in_str, mut esc) = (1usize, false, false);
    for &b in bytes {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b'"' => in_str = true,
                b',' | b':' | b'[' | b'{' => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// Parses JSON holding at most `max_values` values.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], max_values: usize) -> Result<T> {
    let n = count_values(bytes);
    if n > max_values {
        bail!("holds more than {max_values} JSON values; refused");
    }
    serde_json::from_slice(bytes).map_err(|e| anyhow!("not valid JSON: {e}"))
}

/// Reads and parses a JSON input file within [`INPUT_LIMIT`] and [`INPUT_VALUES`].
pub fn read_json_input<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_limited(path, INPUT_LIMIT)?;
    parse_json(&bytes, INPUT_VALUES).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_counts_bound_what_parsing_takes() {
        assert_eq!(count_values(b"{}"), 2);
        assert_eq!(count_values(br#"{"a,b:[{": [1, 2]}"#), 5);
        assert_eq!(count_values(br#""esc\"aped,""#), 1);
        let dense = format!("[{}0]", "0,".repeat(200_000));
        assert!(parse_json::<serde_json::Value>(dense.as_bytes(), METADATA_VALUES).unwrap_err().to_string().contains("JSON values"));
        assert!(parse_json::<serde_json::Value>(b"[1,2]", 10).is_ok());
        assert!(read_all_limited(std::io::repeat(b'x'), 1 << 20).is_err());
    }
}
