//! Layering: from a closure graph to a list of layers (`stevedore layers`).
//! (Being written: issue 3.)

use anyhow::{bail, Result};

/// Arguments of `stevedore layers`.
#[derive(clap::Args, Debug)]
pub struct LayersArgs {
    /// The closure graph JSON.
    pub graph: std::path::PathBuf,
}

pub fn run(_args: &LayersArgs) -> Result<()> {
    bail!("stevedore layers is not written yet")
}
