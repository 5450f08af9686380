//! Builder mode: stevedore as the builder of the Nix library's derivations (`stevedore nix ...`).
//! (Being written: issue 4.)

use anyhow::{bail, Result};

/// Arguments of `stevedore nix`.
#[derive(clap::Args, Debug)]
pub struct NixArgs {
    /// What to build.
    pub action: String,
}

pub fn run(_args: &NixArgs) -> Result<()> {
    bail!("stevedore nix is not written yet")
}
