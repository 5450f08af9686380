//! The enumerations the Nix library and the binary share, read from `nix/enums.json` (which
//! the Nix side reads with `builtins.fromJSON`), so a name added on one side exists on both.

use serde_json::Value;
use std::sync::OnceLock;

/// The file as committed, compiled in.
pub const ENUMS_JSON: &str = include_str!("../../nix/enums.json");

fn enums() -> &'static Value {
    static PARSED: OnceLock<Value> = OnceLock::new();
    PARSED.get_or_init(|| serde_json::from_str(ENUMS_JSON).expect("nix/enums.json is valid JSON (checked by a unit test)"))
}

/// The names of one enumeration (`compressors`, `formats`), in the file's order.
pub fn names(kind: &str) -> Vec<&'static str> {
    enums()[kind].as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default()
}

/// The strings of a list (`nixAttributes`), in the file's order.
pub fn list(kind: &str) -> Vec<&'static str> {
    enums()[kind].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The GOARCH name (what the OCI image spec and registries call an architecture) of a Nix
/// system such as `x86_64-linux`.
pub fn go_arch_of(system: &str) -> Option<&'static str> {
    enums()["goArch"][system].as_str()
}

/// This machine's architecture in GOARCH names, as `goArch` maps its Nix system; Rust's own
/// name if the table lacks it.
pub fn host_go_arch() -> &'static str {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "powerpc64" if cfg!(target_endian = "little") => "powerpc64le",
        "arm" => "armv7l",
        other => other,
    };
    go_arch_of(&format!("{arch}-{}", std::env::consts::OS)).unwrap_or(std::env::consts::ARCH)
}

/// An enumeration a front end (command line, builder attributes, conf JSON) names by string.
pub trait Choice: Sized + Copy + 'static {
    /// Every value with its name and a one-line description, in the order help shows them.
    const CHOICES: &'static [(&'static str, Self, &'static str)];

    /// The value called `name`, or an error listing the names.
    fn from_name(name: &str) -> Result<Self, String> {
        Self::CHOICES.iter().find(|(n, _, _)| *n == name).map(|&(_, v, _)| v).ok_or_else(|| {
            let all: Vec<&str> = Self::CHOICES.iter().map(|(n, _, _)| *n).collect();
            format!("{name:?} is not one of {}", all.join(", "))
        })
    }

    /// The name `self` has in `CHOICES`.
    fn name(self) -> &'static str
    where
        Self: PartialEq,
    {
        Self::CHOICES.iter().find(|(_, v, _)| *v == self).map_or("", |(n, _, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_file_parses_and_maps_this_host() {
        assert!(enums().is_object());
        assert_eq!(go_arch_of("x86_64-linux"), Some("amd64"));
        assert_eq!(go_arch_of("aarch64-linux"), Some("arm64"));
        assert!(list("nixAttributes").contains(&"exportReferencesGraph"));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host_go_arch(), "amd64");
    }
}
