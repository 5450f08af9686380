//! stevedore: container images from Nix closures.
//!
//! The pipeline, front ends first; each module depends only on those listed after it:
//!
//! - `builder`: the Nix builder mode (`stevedore nix ACTION`), the Nix library's derivations.
//! - `registry`: pushing to and pulling from OCI distribution registries.
//! - `supply_chain`: SBOMs (CycloneDX, SPDX) of an image's closure.
//! - `rootless`: `run-as-root`, root steps in user namespaces without a VM.
//! - `image`: image configs, the Docker and OCI writers, the image reader, base images, merge.
//! - `layering`: which store paths go into which layer.
//! - `rootfs`: building and packing directory trees (customisation layers).
//! - `nixstore`: store paths, Nix base32, closure graphs, the Nix database.
//! - `tar`, `compress`: the archive format and the layer compressors.
//! - `pycompat`: byte-exact reproductions of what nixpkgs' Python scripts print.
//! - `util`: files written atomically, temporary paths, input limits, hex, progress.
//!
//! The binary (`src/main.rs`, `src/cli/`) parses the command line into the typed options these
//! modules take; the Nix library in `nix/` runs the binary as the builder of its derivations.

pub mod builder;
pub mod compress;
pub mod image;
pub mod layering;
pub mod nixstore;
pub mod pycompat;
pub mod registry;
pub mod rootfs;
pub mod rootless;
pub mod serve;
pub mod supply_chain;
pub mod tar;
pub mod util;
