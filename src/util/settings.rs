//! What the process environment tells the library (thread count, registry timeout,
//! `SOURCE_DATE_EPOCH`, auth and CA files, cache and scratch directories, the Nix database). The front end reads
//! the environment once (`src/cli/environment.rs`) and installs the result here before any
//! work starts; library code reads these typed values and never the environment itself.
//! A library user that installs nothing gets `Settings::default()`: no auth files, no extra CAs,
//! no digest cache.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The variable that sets the registry timeout, named in timeout messages.
pub const REGISTRY_TIMEOUT_VAR: &str = "STEVEDORE_REGISTRY_TIMEOUT";

/// Where Nix keeps its database when `NIX_STATE_DIR` does not say.
pub const DEFAULT_NIX_DB: &str = "/nix/var/nix/db/db.sqlite";

/// The registry timeout when nothing sets one.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Threads that compress; output bytes never depend on it.
    pub threads: usize,
    /// How long a registry may keep us waiting, or why the setting is wrong: reported when a
    /// registry is used, so a bad value does not break commands that never talk to one.
    pub registry_timeout: Result<Duration, String>,
    /// Modification time of members when the caller gives none, or why the setting is wrong.
    pub default_mtime: Result<i64, String>,
    /// Extra CA certificates to trust: (where the path came from, PEM file).
    pub ca_files: Vec<(String, PathBuf)>,
    /// Registry auth files, in the order they are read.
    pub auth_files: Vec<PathBuf>,
    /// The file that remembers compressed digests of layers pushed before.
    pub digest_cache: Option<PathBuf>,
    /// Where scratch files go when the caller names no directory.
    pub temp_dir: PathBuf,
    /// Directories searched for helper programs (`newuidmap`).
    pub search_path: Vec<PathBuf>,
    /// This machine's Nix database, read for path infos when no closure graph is given.
    pub nix_db: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            threads: default_threads(),
            registry_timeout: Ok(DEFAULT_REGISTRY_TIMEOUT),
            default_mtime: Ok(1),
            ca_files: Vec::new(),
            auth_files: Vec::new(),
            digest_cache: None,
            temp_dir: PathBuf::from("/tmp"),
            search_path: Vec::new(),
            nix_db: PathBuf::from(DEFAULT_NIX_DB),
        }
    }
}

/// One compression thread a core, at most 16.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(16)
}

static INSTALLED: OnceLock<Settings> = OnceLock::new();

/// Makes `s` the settings of this process. Only the first call counts: settings never change
/// once work has started.
pub fn install(s: Settings) {
    let _ = INSTALLED.set(s);
}

/// The settings of this process.
pub fn get() -> &'static Settings {
    INSTALLED.get_or_init(Settings::default)
}

impl Settings {
    pub fn registry_timeout(&self) -> anyhow::Result<Duration> {
        self.registry_timeout.clone().map_err(anyhow::Error::msg)
    }

    pub fn default_mtime(&self) -> anyhow::Result<i64> {
        self.default_mtime.clone().map_err(anyhow::Error::msg)
    }
}
