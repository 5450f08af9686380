//! The stream configuration: nixpkgs' `streamLayeredImage` conf JSON, read as is.

use crate::util::kind;
use crate::layering::{Pipeline, PlanOptions, Strategy};
use crate::nixstore::{ClosureGraph, GraphFormat};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A point in time as the conf gives it: what the image config prints (Python's
/// `datetime.isoformat()` of the parsed value) and the Unix time used for file mtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    pub iso: String,
    pub unix: i64,
}

/// Our extension of the conf: a closure graph to plan the store layers from, when the conf
/// has no `store_layers`. Planned with the same code as `stevedore layers`.
#[derive(Debug, Clone)]
pub struct LayeringConf {
    /// `closure_graph`: the graph itself (exportReferencesGraph's JSON list) or a file.
    pub graph: GraphSource,
    /// `layering` (strategy name, or a layeringPipeline list), `max_layers`, `roots`,
    /// `exclude_paths`; `base_layers` is filled in from the base image.
    pub options: PlanOptions,
}

#[derive(Debug, Clone)]
pub enum GraphSource {
    Inline(Value),
    File(PathBuf),
}

impl LayeringConf {
    pub fn load_graph(&self) -> Result<ClosureGraph> {
        match &self.graph {
            GraphSource::Inline(v) => ClosureGraph::from_json_value(v).map_err(|e| anyhow!("field 'closure_graph': {e:#}")),
            GraphSource::File(p) => ClosureGraph::load(p, GraphFormat::Auto),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamConf {
    pub store_layers: Vec<Vec<String>>,
    /// Set when the conf carries a closure graph instead of `store_layers`.
    pub layering: Option<LayeringConf>,
    pub customisation_layer: Option<PathBuf>,
    /// What the history names the customisation layer by (default: its directory). Not read
    /// from JSON: set by builders whose layer sits in a scratch directory.
    pub customisation_layer_source: Option<String>,
    pub from_image: Option<PathBuf>,
    /// Our extension: which image of a multi-image `from_image` to take (`name` and `tag`,
    /// the tag defaulting to `latest`), as buildImage's fromImageName/fromImageTag.
    pub from_image_name: Option<String>,
    pub from_image_tag: Option<String>,
    pub config: Value,
    pub architecture: String,
    /// The CPU variant (`v7` for arm, ...), in the config only when given.
    pub variant: Option<String>,
    pub os: String,
    pub created: Timestamp,
    pub mtime: i64,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub store_dir: String,
    /// `NAME:TAG`; an untagged name is given the tag `latest` here.
    pub repo_tag: String,
}

/// Fields nixpkgs writes (or has written) that we understand; anything else earns a warning.
const KNOWN_FIELDS: &[&str] = &[
    "store_layers",
    "closure_graph",
    "layering",
    "max_layers",
    "roots",
    "exclude_paths",
    "customisation_layer",
    "from_image",
    "from_image_name",
    "from_image_tag",
    "config",
    "architecture",
    "variant",
    "os",
    "created",
    "mtime",
    "uid",
    "gid",
    "uname",
    "gname",
    "store_dir",
    "repo_tag",
];

impl StreamConf {
    pub fn load(path: &Path, now: &Timestamp) -> Result<Self> {
        let text = crate::util::limits::read_limited(path, crate::util::limits::INPUT_LIMIT).context("the conf")?;
        let value: Value = crate::util::limits::parse_json(&text, crate::util::limits::INPUT_VALUES)
            .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Self::from_value(value, now).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    pub fn from_value(value: Value, now: &Timestamp) -> Result<Self> {
        let Value::Object(mut map) = value else {
            bail!("the conf must be a JSON object");
        };
        for key in map.keys() {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                eprintln!("warning: ignoring unknown conf field '{key}'");
            }
        }
        let created_text = req_str(&map, "created")?;
        let created = parse_time(&created_text, now).map_err(|e| anyhow!("field 'created': {e}"))?;
        let mtime = match opt_str(&map, "mtime")? {
            Some(s) => parse_time(&s, now).map_err(|e| anyhow!("field 'mtime': {e}"))?.unix,
            None => created.unix,
        };
        // nixpkgs always writes store_layers (empty for an image without store paths); only a
        // closure graph to plan them from stands in for it.
        let graph_given = map.get("closure_graph").is_some_and(|g| !g.is_null());
        let store_layers = match map.get("store_layers") {
            None | Some(Value::Null) if graph_given => Vec::new(),
            None => bail!("field 'store_layers' is missing (a list of layers, each a list of store paths; or give 'closure_graph')"),
            Some(Value::Array(layers)) => layers
                .iter()
                .enumerate()
                .map(|(i, layer)| match layer {
                    Value::Array(paths) => paths
                        .iter()
                        .map(|p| {
                            p.as_str().map(str::to_owned).ok_or_else(|| {
                                anyhow!("field 'store_layers'[{i}]: expected store path strings, got {p}")
                            })
                        })
                        .collect(),
                    other => Err(anyhow!("field 'store_layers'[{i}]: expected a list of store paths, got {}", kind(other))),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("field 'store_layers': expected a list of layers, got {}", kind(other)),
        };
        let layering = match map.remove("closure_graph") {
            None | Some(Value::Null) => None,
            Some(graph) => Some(layering_conf(graph, &map)?),
        };
        if layering.is_some() && !store_layers.is_empty() {
            bail!("give either 'store_layers' or 'closure_graph', not both");
        }
        let config = map.remove("config").unwrap_or(Value::Object(Map::new()));
        if !matches!(config, Value::Object(_) | Value::Null) {
            bail!("field 'config': expected an object, got {}", kind(&config));
        }
        if map.get("from_image_tag").is_some_and(|t| !t.is_null()) && map.get("from_image_name").is_none_or(Value::is_null) {
            bail!("field 'from_image_tag' needs 'from_image_name'");
        }
        Ok(StreamConf {
            store_layers,
            layering,
            customisation_layer: opt_str(&map, "customisation_layer")?.map(PathBuf::from),
            customisation_layer_source: None,
            from_image: opt_str(&map, "from_image")?.map(PathBuf::from),
            from_image_name: opt_str(&map, "from_image_name")?,
            from_image_tag: opt_str(&map, "from_image_tag")?,
            config,
            architecture: req_str(&map, "architecture")?,
            variant: opt_str(&map, "variant")?,
            os: opt_str(&map, "os")?.unwrap_or_else(|| "linux".into()),
            created,
            mtime,
            uid: req_id(&map, "uid")?,
            gid: req_id(&map, "gid")?,
            uname: req_str(&map, "uname")?,
            gname: req_str(&map, "gname")?,
            store_dir: req_str(&map, "store_dir")?,
            repo_tag: {
                let tag = req_str(&map, "repo_tag")?;
                crate::image::reference::check_repo_tag(&tag).map_err(|e| anyhow!("field 'repo_tag': {e}"))?;
                crate::image::reference::with_default_tag(&tag)
            },
        })
    }
}

fn layering_conf(graph: Value, map: &Map<String, Value>) -> Result<LayeringConf> {
    let graph = match graph {
        Value::String(file) => GraphSource::File(PathBuf::from(file)),
        v @ (Value::Array(_) | Value::Object(_)) => GraphSource::Inline(v),
        other => bail!("field 'closure_graph': expected a graph or a file name, got {}", kind(&other)),
    };
    let strategy = match map.get("layering") {
        None | Some(Value::Null) => Strategy::Auto,
        Some(Value::String(name)) => match name.as_str() {
            "auto" => Strategy::Auto,
            "popularity" => Strategy::Popularity,
            "dominator" => Strategy::Dominator,
            other => bail!("field 'layering': unknown strategy {other:?} (auto, popularity, dominator, or a pipeline list)"),
        },
        Some(v @ Value::Array(_)) => Strategy::Pipeline(Pipeline::from_json(v).map_err(|e| anyhow!("field 'layering': {e:#}"))?),
        Some(other) => bail!("field 'layering': expected a strategy name or a pipeline list, got {}", kind(other)),
    };
    let max_layers = match map.get("max_layers") {
        None | Some(Value::Null) => 100,
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("field 'max_layers': expected a positive integer, got {n}"))?,
        Some(other) => bail!("field 'max_layers': expected an integer, got {}", kind(other)),
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| anyhow!("field '{key}': expected store path strings, got {v}")))
                .collect(),
            Some(other) => bail!("field '{key}': expected a list of store paths, got {}", kind(other)),
        }
    };
    Ok(LayeringConf {
        graph,
        options: PlanOptions { strategy, max_layers, base_layers: 0, roots: strings("roots")?, exclude: strings("exclude_paths")? },
    })
}

fn req_str(map: &Map<String, Value>, key: &str) -> Result<String> {
    opt_str(map, key)?.ok_or_else(|| anyhow!("field '{key}' is missing"))
}

fn opt_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("field '{key}': expected a string, got {}", kind(other)),
    }
}

/// uid/gid: Python runs `int()` on them, so numeric strings are accepted too.
fn req_id(map: &Map<String, Value>, key: &str) -> Result<u64> {
    match map.get(key) {
        None => bail!("field '{key}' is missing"),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| anyhow!("field '{key}': expected a non-negative integer, got {n}")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| anyhow!("field '{key}': expected a non-negative integer, got {s:?}")),
        Some(other) => bail!("field '{key}': expected an integer, got {}", kind(other)),
    }
}

/// The current time, as Python's `datetime.now(tz=timezone.utc).isoformat()` prints it.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let unix = d.as_secs() as i64;
    let micros = d.subsec_micros();
    let (date, time) = civil_from_unix(unix);
    let frac = if micros == 0 { String::new() } else { format!(".{micros:06}") };
    Timestamp { iso: format!("{date}T{time}{frac}+00:00"), unix }
}

/// Parses what Python's `datetime.fromisoformat` accepts in practice (`YYYY-MM-DD`, then
/// optionally `T` or a space, `HH[:MM[:SS[.fff…]]]` and `Z` or `±HH:MM[:SS]`) or `"now"`.
/// Times without an offset are taken as UTC, so the result never depends on the machine's zone.
pub fn parse_time(s: &str, now: &Timestamp) -> Result<Timestamp> {
    if s == "now" {
        return Ok(now.clone());
    }
    let bad = || anyhow!("{s:?} is not an ISO-8601 date/time or \"now\"");
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64> {
        let part = s.get(range).ok_or_else(bad)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad());
    }
    let (mut hour, mut minute, mut second, mut micros) = (0, 0, 0, 0i64);
    let mut offset: Option<i64> = None;
    let mut rest = &s[10..];
    if !rest.is_empty() {
        if !(rest.starts_with('T') || rest.starts_with(' ')) {
            return Err(bad());
        }
        rest = &rest[1..];
        let tz_at = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
        let (time, tz) = rest.split_at(tz_at);
        let (hms, frac) = match time.split_once(['.', ',']) {
            Some((hms, frac)) => (hms, Some(frac)),
            None => (time, None),
        };
        let fields: Vec<&str> = hms.split(':').collect();
        let field = |i: usize| -> Result<i64> {
            match fields.get(i) {
                Some(f) if f.len() == 2 && f.bytes().all(|c| c.is_ascii_digit()) => Ok(f.parse().unwrap()),
                Some(_) => Err(bad()),
                None => Ok(0),
            }
        };
        if fields.len() > 3 || fields[0].is_empty() {
            return Err(bad());
        }
        hour = field(0)?;
        minute = field(1)?;
        second = field(2)?;
        if let Some(frac) = frac {
            if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            let padded = format!("{frac:0<6}");
            micros = padded[..6].parse().unwrap();
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(bad());
        }
        if !tz.is_empty() {
            offset = Some(if tz.eq_ignore_ascii_case("z") {
                0
            } else {
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                let parts: Vec<&str> = tz[1..].split(':').collect();
                let p = |i: usize| -> Result<i64> {
                    match parts.get(i) {
                        Some(f) if f.len() == 2 && f.bytes().all(|c| c.is_ascii_digit()) => Ok(f.parse().unwrap()),
                        Some(_) => Err(bad()),
                        None => Ok(0),
                    }
                };
                if parts.len() > 3 {
                    return Err(bad());
                }
                let (oh, om, os) = (p(0)?, p(1)?, p(2)?);
                if oh > 23 || om > 59 || os > 59 {
                    return Err(bad());
                }
                sign * (oh * 3600 + om * 60 + os)
            });
        }
    }
    let days = days_from_civil(year, month, day);
    let local = days * 86400 + hour * 3600 + minute * 60 + second;
    // Python takes int() of a float timestamp: fractions truncate toward zero.
    let unix = local - offset.unwrap_or(0) + i64::from(local - offset.unwrap_or(0) < 0 && micros > 0);
    let frac = if micros == 0 { String::new() } else { format!(".{micros:06}") };
    let tz = match offset {
        None => String::new(),
        Some(o) => {
            let sign = if o < 0 { '-' } else { '+' };
            let o = o.abs();
            let secs = if o % 60 != 0 { format!(":{:02}", o % 60) } else { String::new() };
            format!("{sign}{:02}:{:02}{secs}", o / 3600, (o / 60) % 60)
        }
    };
    let iso = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{frac}{tz}");
    Ok(Timestamp { iso, unix })
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

pub use crate::util::civil_from_unix;

/// `s` quoted for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The executable streamLayeredImage builds: `stevedore stream CONF` with the caller's options.
pub fn stream_script(shell: &str, stevedore: &str, conf: &str) -> String {
    format!(
        "#!{shell}\n# Streams the image as a Docker archive to stdout; try --help.\nexec {} stream {} \"$@\"\n",
        shell_quote(stevedore),
        shell_quote(conf)
    )
}

/// The conf a script of `stream_script`'s making streams, so `load` and `serve` can take the
/// script (`./result`) for its conf; None for any other text.
pub fn conf_of_stream_script(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("exec '"))?;
    let mut words = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        words.push(shell_word(&mut rest)?);
    }
    match words.as_slice() {
        [exec, _, stream, conf, args] if exec == "exec" && stream == "stream" && args == "\"$@\"" => Some(conf.clone()),
        _ => None,
    }
}

/// The next word of `rest` as `shell_quote` writes words ('quoted' runs and \' quotes), or a bare
/// one up to a space.
fn shell_word(rest: &mut &str) -> Option<String> {
    if !rest.starts_with(['\'', '\\']) {
        let end = rest.find(' ').unwrap_or(rest.len());
        let word = rest[..end].to_string();
        *rest = &rest[end..];
        return Some(word);
    }
    let mut word = String::new();
    loop {
        if let Some(r) = rest.strip_prefix('\'') {
            let end = r.find('\'')?;
            word.push_str(&r[..end]);
            *rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("\\'") {
            word.push('\'');
            *rest = r;
        } else {
            return Some(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        parse_time(s, &Timestamp { iso: "NOW".into(), unix: 42 }).unwrap()
    }

    #[test]
    fn stream_scripts_name_their_conf() {
        for conf in ["/nix/store/abc-conf.json", "/tmp/it's here/conf.json", "/x/'"] {
            let script = stream_script("/bin/sh", "/nix/store/s-stevedore/bin/stevedore", conf);
            assert_eq!(conf_of_stream_script(&script).as_deref(), Some(conf), "{script}");
        }
        assert_eq!(conf_of_stream_script("#!/bin/sh\nexec python3 stream.py conf.json\n"), None);
        assert_eq!(conf_of_stream_script("#!/bin/sh\nexec 'x' push 'c' \"$@\"\n"), None);
        assert_eq!(conf_of_stream_script("#!/bin/sh\nexec 'x' stream 'unterminated \"$@\"\n"), None);
    }

    #[test]
    fn parses_like_fromisoformat() {
        assert_eq!(t("1970-01-01T00:00:01Z"), Timestamp { iso: "1970-01-01T00:00:01+00:00".into(), unix: 1 });
        assert_eq!(t("2024-05-01T12:00:00+02:00").unix, 1714557600);
        assert_eq!(t("2024-05-01T12:00:00+02:00").iso, "2024-05-01T12:00:00+02:00");
        assert_eq!(t("2024-05-01").iso, "2024-05-01T00:00:00");
        assert_eq!(t("2024-05-01 10:20").iso, "2024-05-01T10:20:00");
        assert_eq!(t("2024-02-29T23:59:59.5Z").iso, "2024-02-29T23:59:59.500000+00:00");
        assert_eq!(t("2001-09-09T01:46:40").unix, 1_000_000_000);
        assert_eq!(t("1969-12-31T23:59:59Z").unix, -1);
        assert_eq!(t("1969-12-31T23:59:59.5Z").unix, 0);
        assert_eq!(t("1970-01-01T00:00:01.9Z").unix, 1);
        assert_eq!(t("now").unix, 42);
    }

    #[test]
    fn rejects_garbage() {
        let now = Timestamp { iso: String::new(), unix: 0 };
        for s in ["", "yesterday", "2024-13-01", "2023-02-29", "2024-01-01T25:00", "2024-01-01X", "2024-01-01T1:00"] {
            assert!(parse_time(s, &now).is_err(), "{s}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for t in [0i64, 1, 86399, 951782400, 1714557600, -86400] {
            let (d, h) = civil_from_unix(t);
            assert_eq!(parse_time(&format!("{d}T{h}Z"), &Timestamp { iso: String::new(), unix: 0 }).unwrap().unix, t);
        }
    }
}
