//! The one place that reads the process environment: every variable the library honours,
//! resolved into `stevedore::util::settings::Settings`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;
use stevedore::util::settings::{default_threads, DEFAULT_NIX_DB, Settings, DEFAULT_REGISTRY_TIMEOUT, REGISTRY_TIMEOUT_VAR as TIMEOUT_VAR};

pub const THREADS_VAR: &str = "STEVEDORE_THREADS";

/// The settings `get` (a variable's value, unset or empty as None) gives.
pub fn settings(get: impl Fn(&str) -> Option<OsString>) -> Settings {
    let var = |n: &str| get(n).filter(|v| !v.is_empty());
    let path = |n: &str| var(n).map(PathBuf::from);
    let text = |n: &str| var(n).map(|v| v.into_string().map_err(|_| format!("{n} is not UTF-8")));
    let home = path("HOME");
    let mut auth_files = Vec::new();
    // In the order skopeo and podman read them.
    auth_files.extend(path("REGISTRY_AUTH_FILE"));
    auth_files.extend(path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    auth_files.extend(path("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config"))).map(|d| d.join("containers/auth.json")));
    auth_files.extend(path("DOCKER_CONFIG").or_else(|| home.as_ref().map(|h| h.join(".docker"))).map(|d| d.join("config.json")));
    Settings {
        // A value that is not a positive number means the default, as it always has.
        threads: match text(THREADS_VAR).and_then(Result::ok).and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(n) if n > 0 => n.min(256),
            _ => default_threads(),
        },
        registry_timeout: match text(TIMEOUT_VAR) {
            None => Ok(DEFAULT_REGISTRY_TIMEOUT),
            Some(Err(_)) => Err(format!("{TIMEOUT_VAR} is not UTF-8: give a number of seconds")),
            Some(Ok(v)) => parse_timeout(&v),
        },
        default_mtime: match get("SOURCE_DATE_EPOCH").map(|v| v.into_string()) {
            None => Ok(1),
            Some(Ok(v)) => v.trim().parse().map_err(|_| format!("SOURCE_DATE_EPOCH is not a number: {v:?}")),
            Some(Err(v)) => Err(format!("SOURCE_DATE_EPOCH is not a number: {v:?}")),
        },
        // The variables Nix builds and OpenSSL-based tools honour, for a private registry's CA.
        ca_files: ["SSL_CERT_FILE", "NIX_SSL_CERT_FILE"].iter().filter_map(|n| Some((n.to_string(), path(n)?))).collect(),
        auth_files,
        // Not inside a Nix build: its HOME is a placeholder that must stay absent, and what a
        // build learns is no use to later runs anyway.
        digest_cache: match var("NIX_BUILD_TOP") {
            Some(_) => None,
            None => path("XDG_CACHE_HOME").or_else(|| home.as_ref().map(|h| h.join(".cache"))).map(|d| d.join("stevedore/layer-digests")),
        },
        temp_dir: path("TMPDIR").unwrap_or_else(|| PathBuf::from("/tmp")),
        search_path: var("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default(),
        nix_db: path("NIX_STATE_DIR").map_or_else(|| PathBuf::from(DEFAULT_NIX_DB), |d| d.join("db/db.sqlite")),
    }
}

/// A number of seconds, from 0.01 to 86400; blank means the default.
fn parse_timeout(v: &str) -> Result<Duration, String> {
    match v.trim() {
        "" => Ok(DEFAULT_REGISTRY_TIMEOUT),
        t => match t.parse::<f64>() {
            Ok(secs) if secs.is_finite() && (0.01..=86_400.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
            _ => Err(format!("{TIMEOUT_VAR}={v:?}: give a number of seconds, from 0.01 to 86400")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Settings {
        let m: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        settings(|n| m.get(n).cloned())
    }

    #[test]
    fn timeouts() {
        assert_eq!(from(&[]).registry_timeout, Ok(DEFAULT_REGISTRY_TIMEOUT));
        assert_eq!(from(&[(TIMEOUT_VAR, " ")]).registry_timeout, Ok(DEFAULT_REGISTRY_TIMEOUT));
        assert_eq!(from(&[(TIMEOUT_VAR, "2")]).registry_timeout, Ok(Duration::from_secs(2)));
        assert_eq!(from(&[(TIMEOUT_VAR, "0.5")]).registry_timeout, Ok(Duration::from_millis(500)));
        for bad in ["0", "-1", "x", "NaN", "inf", "1e9", "1 s", "a\nb"] {
            let e = from(&[(TIMEOUT_VAR, bad)]).registry_timeout.unwrap_err();
            assert!(e.starts_with("STEVEDORE_REGISTRY_TIMEOUT=") && !e.contains('\n'), "{bad:?}: {e}");
        }
    }

    #[test]
    fn threads_mtime_and_files() {
        assert_eq!(from(&[(THREADS_VAR, "3")]).threads, 3);
        assert_eq!(from(&[(THREADS_VAR, "100000")]).threads, 256);
        assert_eq!(from(&[(THREADS_VAR, "0")]).threads, default_threads());
        assert_eq!(from(&[(THREADS_VAR, "x")]).threads, default_threads());
        assert_eq!(from(&[]).default_mtime, Ok(1));
        assert_eq!(from(&[("SOURCE_DATE_EPOCH", " 315532800")]).default_mtime, Ok(315532800));
        assert!(from(&[("SOURCE_DATE_EPOCH", "soon")]).default_mtime.unwrap_err().contains("SOURCE_DATE_EPOCH"));
        let s = from(&[("HOME", "/h"), ("XDG_RUNTIME_DIR", "/run/u"), ("REGISTRY_AUTH_FILE", "/a.json"), ("DOCKER_CONFIG", "")]);
        let want = ["/a.json", "/run/u/containers/auth.json", "/h/.config/containers/auth.json", "/h/.docker/config.json"];
        assert_eq!(s.auth_files, want.iter().map(PathBuf::from).collect::<Vec<_>>());
        assert_eq!(s.digest_cache, Some(PathBuf::from("/h/.cache/stevedore/layer-digests")));
        assert_eq!(from(&[("HOME", "/homeless-shelter"), ("NIX_BUILD_TOP", "/build")]).digest_cache, None);
        assert_eq!(from(&[]).nix_db, PathBuf::from("/nix/var/nix/db/db.sqlite"));
        assert_eq!(from(&[("NIX_STATE_DIR", "/s")]).nix_db, PathBuf::from("/s/db/db.sqlite"));
        assert_eq!(from(&[]).temp_dir, PathBuf::from("/tmp"));
    }
}
