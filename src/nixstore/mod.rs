//! Store paths, Nix base32 and closure graphs (the little of nix-compat we need).
//!
//! A closure graph is what Nix writes for `exportReferencesGraph`: with `__structuredAttrs`, a JSON
//! list of `{ path, narHash, narSize, closureSize, references }`; without, a text block per path
//! (path, deriver, reference count, references). closureInfo's `registration` (the
//! `nix-store --load-db` format: path, narHash, narSize, deriver, count, references) and
//! `store-paths` (one path a line, no references) are read too.
//!
//! [`ClosureGraph`] keeps the paths sorted, as Nix writes them (it iterates ordered sets), so that
//! everything planned from a graph is the same whatever order the input came in.

pub mod db;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Nix's base32 alphabet: digits and lower-case letters without e, o, u and t.
pub const NIX_BASE32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// Length of a store path's hash part (160 bits in Nix base32).
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts after `HASH-`.
pub const MAX_NAME_LEN: usize = 211;

const NO_DIGIT: u8 = 0xff;
const BASE32_DIGITS: [u8; 256] = {
    let mut t = [NO_DIGIT; 256];
    let mut i = 0;
    while i < 32 {
        t[NIX_BASE32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Characters of the Nix base32 encoding of `n` bytes.
pub fn nix_base32_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Nix's base32: its own alphabet, and the last character holds the lowest bits of byte 0, so
/// the string reads "backwards" compared with RFC 4648.
pub fn nix_base32_encode(bytes: &[u8]) -> String {
    let len = nix_base32_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let mut c = (bytes[i] as u16) >> j;
        if i + 1 < bytes.len() {
            c |= (bytes[i + 1] as u16) << (8 - j);
        }
        out.push(NIX_BASE32_ALPHABET[(c & 0x1f) as usize] as char);
    }
    out
}

/// Decodes Nix base32; the result has `len * 5 / 8` bytes, and bits past them must be zero (as
/// Nix checks), so every byte string has exactly one encoding.
pub fn nix_base32_decode(s: &str) -> Result<Vec<u8>> {
    let s = s.as_bytes();
    let size = s.len() * 5 / 8;
    let mut out = vec![0u8; size];
    for n in 0..s.len() {
        let c = s[s.len() - n - 1];
        let digit = BASE32_DIGITS[c as usize];
        if digit == NO_DIGIT {
            bail!("invalid character {:?} in Nix base32", c as char);
        }
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = (digit as u16) << j;
        let high = if j > 3 { (digit as u16) >> (8 - j) } else { 0 };
        if i < size {
            out[i] |= low as u8;
        } else if low & 0xff != 0 {
            bail!("Nix base32 string has bits past its {size} bytes");
        }
        if high != 0 {
            if i + 1 < size {
                out[i + 1] |= high as u8;
            } else {
                bail!("Nix base32 string has bits past its {size} bytes");
            }
        }
    }
    Ok(out)
}

/// A parsed store path: `STORE_DIR/HASH-NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePath {
    pub store_dir: String,
    pub hash: String,
    pub name: String,
}

impl StorePath {
    /// Checks a store path as Nix does: an absolute store directory, 32 characters of Nix base32,
    /// a dash, and a name of 1 to 211 characters from `[A-Za-z0-9+-._?=]` whose first
    /// dash-separated part is not `.` or `..`.
    pub fn parse(path: &str) -> Result<StorePath> {
        let fail = |why: &str| anyhow!("invalid store path {path:?}: {why}");
        let (dir, base) = path.rsplit_once('/').ok_or_else(|| fail("not an absolute path"))?;
        if !path.starts_with('/') {
            return Err(fail("not an absolute path"));
        }
        if dir.len() > 1 && dir.ends_with('/') || dir.contains("//") {
            return Err(fail("the store directory is not a clean path"));
        }
        if base.len() < HASH_PART_LEN + 2 || base.as_bytes()[HASH_PART_LEN] != b'-' {
            return Err(fail("the base name must be a 32-character hash, a dash and a name"));
        }
        let (hash, name) = (&base[..HASH_PART_LEN], &base[HASH_PART_LEN + 1..]);
        if let Some(c) = hash.bytes().find(|&c| BASE32_DIGITS[c as usize] == NO_DIGIT) {
            return Err(fail(&format!("the hash part has {:?}, which is not Nix base32", c as char)));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(fail(&format!("the name is longer than {MAX_NAME_LEN} characters")));
        }
        if let Some(c) = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c))) {
            return Err(fail(&format!("the name has {c:?}, which Nix does not allow")));
        }
        let first = name.split('-').next().unwrap_or("");
        if first == "." || first == ".." {
            return Err(fail(&format!("the name may not start with {first:?}")));
        }
        Ok(StorePath { store_dir: if dir.is_empty() { "/".into() } else { dir.into() }, hash: hash.into(), name: name.into() })
    }
}

impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.store_dir.ends_with('/') { "" } else { "/" };
        write!(f, "{}{sep}{}-{}", self.store_dir, self.hash, self.name)
    }
}

/// Parses a NAR hash as Nix prints them: `sha256:` with 52 characters of Nix base32 or 64 of hex,
/// a bare 64-character hex digest (`nix-store --dump-db`), or SRI `sha256-` with base64.
pub fn parse_nar_hash(s: &str) -> Result<[u8; 32]> {
    let fail = |why: &str| anyhow!("invalid narHash {s:?}: {why}");
    let bytes = if let Some(rest) = s.strip_prefix("sha256:") {
        match rest.len() {
            52 => nix_base32_decode(rest).map_err(|e| fail(&e.to_string()))?,
            64 => decode_hex(rest).ok_or_else(|| fail("bad hex digit"))?,
            _ => return Err(fail("expected 52 characters of Nix base32 or 64 of hex after sha256:")),
        }
    } else if let Some(rest) = s.strip_prefix("sha256-") {
        decode_base64(rest).ok_or_else(|| fail("bad base64"))?
    } else if s.len() == 64 {
        decode_hex(s).ok_or_else(|| fail("bad hex digit"))?
    } else {
        return Err(fail("expected sha256:HASH, sha256-BASE64 or 64 hex digits"));
    };
    bytes.try_into().map_err(|_| fail("not a 32-byte digest"))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let body = s.trim_end_matches('=');
    if s.len() % 4 != 0 || s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in body.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be zero for a canonical encoding.
    (acc & ((1 << bits) - 1) == 0).then_some(out)
}

/// One store path as a closure graph lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    pub nar_hash: Option<String>,
    pub nar_size: u64,
    pub closure_size: Option<u64>,
    /// The paths it references, possibly itself.
    pub references: Vec<String>,
}

/// The input formats [`ClosureGraph::parse`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphFormat {
    /// Guess from the content.
    #[default]
    Auto,
    /// `exportReferencesGraph` under `__structuredAttrs` (or a `.attrs.json` with a `graph` list).
    Json,
    /// closureInfo's `registration` (`nix-store --load-db`): path, narHash, narSize, deriver,
    /// count, references.
    Registration,
    /// `exportReferencesGraph` without structured attrs: path, deriver, count, references.
    ReferencesGraph,
    /// closureInfo's `store-paths`: one path a line, no references.
    StorePaths,
}

impl crate::util::shared::Choice for GraphFormat {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[
        ("auto", GraphFormat::Auto, "Guess from the content"),
        ("json", GraphFormat::Json, "`exportReferencesGraph` under `__structuredAttrs` (or a `.attrs.json` with a `graph` list)"),
        ("registration", GraphFormat::Registration, "closureInfo's `registration` (`nix-store --load-db`): path, narHash, narSize, deriver, count, references"),
        ("references-graph", GraphFormat::ReferencesGraph, "`exportReferencesGraph` without structured attrs: path, deriver, count, references"),
        ("store-paths", GraphFormat::StorePaths, "closureInfo's `store-paths`: one path a line, no references"),
    ];
}

/// A node of a [`ClosureGraph`]; references are indices into the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub path: String,
    pub nar_hash: Option<String>,
    pub nar_size: u64,
    pub closure_size: Option<u64>,
    /// Other paths this one references, ascending, without itself.
    pub references: Vec<u32>,
    /// Whether the path references itself (Nix graphs often say so; it changes nothing here).
    pub self_reference: bool,
}

/// A checked closure graph: valid store paths in one store directory, sorted and unique,
/// every reference inside the graph, and no cycles but self-references.
#[derive(Debug, Clone, Default)]
pub struct ClosureGraph {
    nodes: Vec<Node>,
    index: HashMap<String, u32>,
    users: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonInfo {
    path: String,
    #[serde(default)]
    nar_hash: Option<String>,
    nar_size: u64,
    #[serde(default)]
    closure_size: Option<u64>,
    references: Vec<String>,
}

impl From<JsonInfo> for PathInfo {
    fn from(j: JsonInfo) -> Self {
        PathInfo { path: j.path, nar_hash: j.nar_hash, nar_size: j.nar_size, closure_size: j.closure_size, references: j.references }
    }
}

impl ClosureGraph {
    /// Reads a graph file (`-` for stdin); errors name the file.
    pub fn load(file: &Path, format: GraphFormat) -> Result<ClosureGraph> {
        let name = file.display().to_string();
        let bytes = if name == "-" {
            crate::util::limits::read_all_limited(std::io::stdin(), crate::util::limits::INPUT_LIMIT).context("cannot read the graph from stdin")?
        } else {
            crate::util::limits::read_limited(file, crate::util::limits::INPUT_LIMIT).map_err(|e| anyhow!("graph {e:#}"))?
        };
        Self::parse(&bytes, format).map_err(|e| anyhow!("{name}: {e:#}"))
    }

    /// Parses a graph in any of the [`GraphFormat`]s.
    pub fn parse(bytes: &[u8], format: GraphFormat) -> Result<ClosureGraph> {
        let format = match format {
            GraphFormat::Auto => detect_format(bytes),
            f => f,
        };
        if format == GraphFormat::Json {
            return Self::from_infos(parse_json(bytes)?);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| anyhow!("not UTF-8 text: {e}"))?;
        let infos = match format {
            GraphFormat::StorePaths => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| PathInfo { path: l.trim().into(), nar_hash: None, nar_size: 0, closure_size: None, references: vec![] })
                .collect(),
            GraphFormat::Registration => parse_blocks(text, true)?,
            _ => parse_blocks(text, false)?,
        };
        Self::from_infos(infos)
    }

    /// A graph from a JSON value as Nix writes it (a list of path infos, or an object with a
    /// `graph` list, like `.attrs.json`).
    pub fn from_json_value(value: &Value) -> Result<ClosureGraph> {
        Self::from_infos(json_infos(value)?)
    }

    /// Checks and indexes path infos.
    pub fn from_infos(mut infos: Vec<PathInfo>) -> Result<ClosureGraph> {
        let mut store_dir: Option<String> = None;
        for info in &infos {
            let sp = StorePath::parse(&info.path)?;
            match &store_dir {
                None => store_dir = Some(sp.store_dir),
                Some(d) if *d != sp.store_dir => bail!("{} is not in the store directory {d} of the other paths", info.path),
                Some(_) => {}
            }
            if let Some(h) = &info.nar_hash {
                parse_nar_hash(h).with_context(|| format!("path {}", info.path))?;
            }
        }
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(w) = infos.windows(2).find(|w| w[0].path == w[1].path) {
            bail!("{} is listed twice", w[0].path);
        }
        let index: HashMap<String, u32> = infos.iter().enumerate().map(|(i, info)| (info.path.clone(), i as u32)).collect();
        let mut nodes = Vec::with_capacity(infos.len());
        for (i, info) in infos.into_iter().enumerate() {
            let mut references = Vec::with_capacity(info.references.len());
            let mut self_reference = false;
            for r in &info.references {
                match index.get(r.as_str()) {
                    Some(&j) if j as usize == i => self_reference = true,
                    Some(&j) => references.push(j),
                    None => bail!("{} references {r}, which is not in the graph", info.path),
                }
            }
            references.sort_unstable();
            references.dedup();
            nodes.push(Node { path: info.path, nar_hash: info.nar_hash, nar_size: info.nar_size, closure_size: info.closure_size, references, self_reference });
        }
        let mut users = vec![Vec::new(); nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            for &r in &n.references {
                users[r as usize].push(i as u32);
            }
        }
        let graph = ClosureGraph { nodes, index, users };
        graph.check_acyclic()?;
        Ok(graph)
    }

    fn check_acyclic(&self) -> Result<()> {
        if self.topological_order().len() == self.len() {
            return Ok(());
        }
        // Name one cycle: walk references from a node that Kahn's algorithm could not order.
        let ordered: HashSet<u32> = self.topological_order().into_iter().collect();
        let start = (0..self.len() as u32).find(|i| !ordered.contains(i)).unwrap_or(0);
        let mut seen = HashMap::new();
        let mut walk = vec![start];
        let mut cur = start;
        loop {
            seen.insert(cur, walk.len() - 1);
            let Some(&next) = self.nodes[cur as usize].references.iter().find(|r| !ordered.contains(r)) else { break };
            if let Some(&at) = seen.get(&next) {
                let cycle: Vec<&str> = walk[at..].iter().chain([&next]).map(|&i| self.nodes[i as usize].path.as_str()).collect();
                bail!("the references form a cycle: {}", cycle.join(" -> "));
            }
            walk.push(next);
            cur = next;
        }
        bail!("the references form a cycle")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: u32) -> &Node {
        &self.nodes[i as usize]
    }

    pub fn path(&self, i: u32) -> &str {
        &self.nodes[i as usize].path
    }

    pub fn index_of(&self, path: &str) -> Option<u32> {
        self.index.get(path).copied()
    }

    /// The paths that reference `i` (other than itself), ascending.
    pub fn users(&self, i: u32) -> &[u32] {
        &self.users[i as usize]
    }

    /// Nodes with every dependency before its users (Kahn's algorithm, smallest index first
    /// among ready nodes, so the order is fixed). Shorter than the graph if there is a cycle.
    pub fn topological_order(&self) -> Vec<u32> {
        let mut pending: Vec<usize> = self.nodes.iter().map(|n| n.references.len()).collect();
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<u32>> =
            (0..self.len() as u32).filter(|&i| pending[i as usize] == 0).map(std::cmp::Reverse).collect();
        let mut order = Vec::with_capacity(self.len());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &u in &self.users[i as usize] {
                pending[u as usize] -= 1;
                if pending[u as usize] == 0 {
                    ready.push(std::cmp::Reverse(u));
                }
            }
        }
        order
    }

    /// Every path reachable from `from` (including them), as a membership mask.
    pub fn closure_mask(&self, from: impl IntoIterator<Item = u32>) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut todo: Vec<u32> = from.into_iter().collect();
        while let Some(i) = todo.pop() {
            if !std::mem::replace(&mut seen[i as usize], true) {
                todo.extend(&self.nodes[i as usize].references);
            }
        }
        seen
    }

    /// The sub-graph of everything the given roots reference, transitively (what Nix would have
    /// exported for them). Unknown roots are an error.
    pub fn closure_of<S: AsRef<str>>(&self, roots: &[S]) -> Result<ClosureGraph> {
        let mut ids = Vec::with_capacity(roots.len());
        for r in roots {
            let r = r.as_ref();
            ids.push(self.index_of(r).ok_or_else(|| anyhow!("root {r} is not in the graph"))?);
        }
        let keep = self.closure_mask(ids);
        Ok(self.restricted(&keep))
    }

    /// The induced sub-graph on the kept nodes; references to dropped nodes are dropped too.
    pub fn restricted(&self, keep: &[bool]) -> ClosureGraph {
        let mut new_id = vec![u32::MAX; self.len()];
        let mut nodes = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if keep[i] {
                new_id[i] = nodes.len() as u32;
                nodes.push(n.clone());
            }
        }
        for n in &mut nodes {
            n.references = n.references.iter().map(|&r| new_id[r as usize]).filter(|&r| r != u32::MAX).collect();
        }
        let index = nodes.iter().enumerate().map(|(i, n)| (n.path.clone(), i as u32)).collect();
        let mut users = vec![Vec::new(); nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            for &r in &n.references {
                users[r as usize].push(i as u32);
            }
        }
        ClosureGraph { nodes, index, users }
    }

    /// The graph as Nix's structured-attrs JSON (references include the path itself where it
    /// referenced itself).
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let mut refs: Vec<&str> = n.references.iter().map(|&r| self.path(r)).collect();
                    if n.self_reference {
                        refs.push(self.path(i as u32));
                    }
                    refs.sort_unstable();
                    let mut o = serde_json::Map::new();
                    o.insert("path".into(), n.path.clone().into());
                    if let Some(h) = &n.nar_hash {
                        o.insert("narHash".into(), h.clone().into());
                    }
                    o.insert("narSize".into(), n.nar_size.into());
                    if let Some(c) = n.closure_size {
                        o.insert("closureSize".into(), c.into());
                    }
                    o.insert("references".into(), refs.into());
                    Value::Object(o)
                })
                .collect(),
        )
    }
}

fn detect_format(bytes: &[u8]) -> GraphFormat {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[' | b'{') => return GraphFormat::Json,
        None => return GraphFormat::StorePaths,
        _ => {}
    }
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().take(3).collect();
    match lines.as_slice() {
        // A narHash never starts with '/', a deriver line is empty or a path.
        [_, second, ..] if !second.is_empty() && !second.starts_with('/') => GraphFormat::Registration,
        [_, _, third] if third.trim().parse::<u64>().is_ok() => GraphFormat::ReferencesGraph,
        _ => GraphFormat::StorePaths,
    }
}

fn parse_json(bytes: &[u8]) -> Result<Vec<PathInfo>> {
    // Typed parsing is several times faster than going through Value, and serde's messages
    // name the missing or mistyped field with its line and column.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let infos: Vec<JsonInfo> = crate::util::limits::parse_json(bytes, crate::util::limits::INPUT_VALUES).map_err(|e| anyhow!("not a closure graph: {e:#}"))?;
        return Ok(infos.into_iter().map(PathInfo::from).collect());
    }
    let value: Value = crate::util::limits::parse_json(bytes, crate::util::limits::INPUT_VALUES)?;
    json_infos(&value)
}

fn json_infos(value: &Value) -> Result<Vec<PathInfo>> {
    let list = match value {
        Value::Object(map) => map.get("graph").ok_or_else(|| anyhow!("expected a list of path infos, or an object with a \"graph\" list"))?,
        v => v,
    };
    let infos = Vec::<JsonInfo>::deserialize(list).map_err(|e| anyhow!("not a closure graph: {e}"))?;
    Ok(infos.into_iter().map(PathInfo::from).collect())
}

/// The text formats: per path, its line, (with `hashes`) narHash and narSize lines, a deriver
/// line (maybe empty), a reference count and that many reference lines.
fn parse_blocks(text: &str, hashes: bool) -> Result<Vec<PathInfo>> {
    let lines: Vec<&str> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
    let mut i = 0;
    let mut infos = Vec::new();
    let line = |i: usize, what: &str| -> Result<&str> {
        lines.get(i).copied().ok_or_else(|| anyhow!("line {}: the file ends where {what} should be", i + 1))
    };
    while i < lines.len() {
        if lines[i..].iter().all(|l| l.is_empty()) {
            break;
        }
        let path = line(i, "a store path")?.to_string();
        i += 1;
        let (mut nar_hash, mut nar_size) = (None, 0);
        if hashes {
            let h = line(i, "a narHash")?;
            let normal = if h.contains(':') || h.contains('-') { h.to_string() } else { format!("sha256:{h}") };
            parse_nar_hash(&normal).map_err(|e| anyhow!("line {}: {e}", i + 1))?;
            nar_hash = Some(normal);
            i += 1;
            let s = line(i, "a narSize")?;
            nar_size = s.parse().map_err(|_| anyhow!("line {}: narSize {s:?} is not a number", i + 1))?;
            i += 1;
        }
        let _deriver = line(i, "a deriver line")?;
        i += 1;
        let c = line(i, "a reference count")?;
        let count: usize = c.parse().map_err(|_| anyhow!("line {}: reference count {c:?} is not a number", i + 1))?;
        i += 1;
        let mut references = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            references.push(line(i, "a reference")?.to_string());
            i += 1;
        }
        infos.push(PathInfo { path, nar_hash, nar_size, closure_size: None, references });
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq";
    const H2: &str = "1lc9g5s3s8i1pl4gpkmnmn4sxvkqj3sw";

    fn p(h: &str, name: &str) -> String {
        format!("/nix/store/{h}-{name}")
    }

    #[test]
    fn base32_round_trip_and_known_values() {
        // sha256("") in Nix base32, as `nix hash to-base32` prints it.
        let empty = decode_hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855").unwrap();
        assert_eq!(nix_base32_encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(nix_base32_encode(&[]), "");
        assert_eq!(nix_base32_encode(&[0x1f]), "0z");
        assert_eq!(nix_base32_encode(&[0xff]), "7z");
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let s = nix_base32_encode(&bytes);
            assert_eq!(s.len(), nix_base32_len(len));
            assert_eq!(nix_base32_decode(&s).unwrap(), bytes, "len {len}");
        }
    }

    #[test]
    fn base32_rejects_bad_input() {
        assert!(nix_base32_decode("0e").unwrap_err().to_string().contains("invalid character"));
        // "8z" would need a ninth bit in a one-byte value.
        assert!(nix_base32_decode("8z").is_err());
        assert!(nix_base32_decode("7z").is_ok());
    }

    #[test]
    fn store_path_parsing() {
        let sp = StorePath::parse(&p(H1, "hello-2.12.1")).unwrap();
        assert_eq!((sp.store_dir.as_str(), sp.hash.as_str(), sp.name.as_str()), ("/nix/store", H1, "hello-2.12.1"));
        assert_eq!(sp.to_string(), p(H1, "hello-2.12.1"));
        assert!(StorePath::parse(&p(H1, "a+b-c_d.e?f=g")).is_ok());
        assert!(StorePath::parse(&p(H1, ".dotfile")).is_ok());
        for (bad, why) in [
            ("nix/store/x".to_string(), "absolute"),
            (p(&H1[..31], "short"), "32-character"),
            (p(&H1.replace('0', "e"), "x"), "not Nix base32"),
            (p(H1, "sp ace"), "Nix does not allow"),
            (p(H1, "caf\u{e9}"), "Nix does not allow"),
            (p(H1, ""), "32-character"),
            (p(H1, "."), "may not start"),
            (p(H1, "..-x"), "may not start"),
            (p(H1, &"n".repeat(212)), "longer than"),
            (format!("/nix//store/{H1}-x"), "clean path"),
        ] {
            let e = StorePath::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(StorePath::parse(&p(H1, &"n".repeat(211))).is_ok());
    }

    #[test]
    fn nar_hash_formats() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let digest = parse_nar_hash(&format!("sha256:{hex}")).unwrap();
        assert_eq!(parse_nar_hash("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(), digest);
        assert_eq!(parse_nar_hash(hex).unwrap(), digest);
        assert_eq!(parse_nar_hash("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap(), digest);
        assert!(parse_nar_hash("md5:abc").is_err());
        assert!(parse_nar_hash("sha256:xyz").is_err());
        assert!(parse_nar_hash("sha256-!!!!").is_err());
    }

    fn json_graph() -> String {
        format!(
            r#"[{{"path":"{b}","narHash":"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73","narSize":10,"closureSize":10,"references":["{b}"]}},
               {{"path":"{a}","narHash":"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73","narSize":5,"closureSize":15,"references":["{b}","{a}"],"extra":true}}]"#,
            a = p(H2, "app"),
            b = p(H1, "lib")
        )
    }

    #[test]
    fn json_graph_is_sorted_and_indexed() {
        let g = ClosureGraph::parse(json_graph().as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g.path(0), p(H1, "lib"));
        assert_eq!(g.node(1).references, vec![0]);
        assert!(g.node(1).self_reference && g.node(0).self_reference);
        assert_eq!(g.users(0), &[1]);
        assert_eq!(g.topological_order(), vec![0, 1]);
        // The .attrs.json shape and a round trip through to_json.
        let attrs = format!(r#"{{"graph": {}, "pipeline": []}}"#, json_graph());
        let g2 = ClosureGraph::parse(attrs.as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!(g2.nodes(), g.nodes());
        let g3 = ClosureGraph::from_json_value(&g.to_json()).unwrap();
        assert_eq!(g3.nodes(), g.nodes());
    }

    #[test]
    fn text_formats() {
        let (a, b) = (p(H2, "app"), p(H1, "lib"));
        let registration = format!(
            "{a}\nsha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n5\n\n2\n{a}\n{b}\n{b}\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n10\n\n0\n"
        );
        let g = ClosureGraph::parse(registration.as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!((g.node(1).nar_size, g.node(0).nar_size), (5, 10));
        assert_eq!(g.node(1).references, vec![0]);
        let refs = format!("{a}\n\n2\n{a}\n{b}\n{b}\n/nix/store/{H1}-lib.drv\n0\n");
        let g = ClosureGraph::parse(refs.as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!(g.node(1).references, vec![0]);
        assert_eq!(g.node(0).nar_size, 0);
        let plain = format!("{a}\n{b}\n");
        let g = ClosureGraph::parse(plain.as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!(g.len(), 2);
        assert!(g.node(1).references.is_empty());
        // One path alone, and nothing at all.
        assert_eq!(ClosureGraph::parse(b.as_bytes(), GraphFormat::Auto).unwrap().len(), 1);
        assert!(ClosureGraph::parse(b"", GraphFormat::Auto).unwrap().is_empty());
        assert!(ClosureGraph::parse(b"[]", GraphFormat::Auto).unwrap().is_empty());
    }

    #[test]
    fn bad_graphs_get_clear_errors() {
        let (a, b) = (p(H2, "app"), p(H1, "lib"));
        let err = |s: &str, f: GraphFormat| format!("{:#}", ClosureGraph::parse(s.as_bytes(), f).unwrap_err());
        assert!(err("[{", GraphFormat::Auto).contains("line 1"));
        assert!(err(&format!(r#"[{{"path":"{a}","references":[]}}]"#), GraphFormat::Auto).contains("missing field `narSize`"));
        assert!(err(&format!(r#"[{{"path":"{a}","narSize":"x","references":[]}}]"#), GraphFormat::Auto).contains("invalid type"));
        assert!(err(&format!(r#"[{{"path":"{a}","narSize":1,"references":["{b}"]}}]"#), GraphFormat::Auto).contains("which is not in the graph"));
        let twice = format!(r#"[{{"path":"{a}","narSize":1,"references":[]}},{{"path":"{a}","narSize":1,"references":[]}}]"#);
        assert!(err(&twice, GraphFormat::Auto).contains("listed twice"));
        let cycle = format!(r#"[{{"path":"{a}","narSize":1,"references":["{b}"]}},{{"path":"{b}","narSize":1,"references":["{a}"]}}]"#);
        let e = err(&cycle, GraphFormat::Auto);
        assert!(e.contains("cycle") && e.contains(&a) && e.contains(&b), "{e}");
        assert!(err(&format!(r#"[{{"path":"{a}","narHash":"sha256:zz","narSize":1,"references":[]}}]"#), GraphFormat::Auto).contains("invalid narHash"));
        assert!(err(&format!(r#"[{{"path":"/other{}","narSize":1,"references":[]}},{{"path":"{b}","narSize":1,"references":[]}}]"#, &a[4..]), GraphFormat::Auto).contains("store directory"));
        assert!(err(&format!("{a}\n\n3\n{b}\n"), GraphFormat::ReferencesGraph).contains("ends where a reference"));
        assert!(err(&format!("{a}\n\nx\n"), GraphFormat::ReferencesGraph).contains("not a number"));
        assert!(err(&format!("{a}\nsha256:abc\n1\n\n0\n"), GraphFormat::Registration).contains("line 2"));
        assert!(err("not a path\n", GraphFormat::StorePaths).contains("invalid store path"));
        assert!(err(r#"{"other": 1}"#, GraphFormat::Auto).contains("\"graph\""));
    }

    #[test]
    fn closure_of_roots() {
        let (a, b) = (p(H2, "app"), p(H1, "lib"));
        let g = ClosureGraph::parse(json_graph().as_bytes(), GraphFormat::Auto).unwrap();
        assert_eq!(g.closure_of(&[&b]).unwrap().len(), 1);
        assert_eq!(g.closure_of(&[&a]).unwrap().len(), 2);
        assert!(g.closure_of(&["/nix/store/nope"]).unwrap_err().to_string().contains("not in the graph"));
    }
}
