//! stevedore: container images from Nix closures.
//!
//! The binary's subcommands are thin wrappers over these modules; the Nix library in `nix/`
//! runs the binary as the builder of its derivations.

pub mod archive;
pub mod base;
pub mod beneath;
pub mod buildimage;
pub mod compress;
pub mod conf;
pub mod flatten;
pub mod fsutil;
pub mod image;
pub mod layer;
pub mod layering;
pub mod limits;
pub mod merge;
pub mod nixbuild;
pub mod nixdb;
pub mod oci;
pub mod pyjson;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod rootless;
pub mod store;
pub mod tar;
