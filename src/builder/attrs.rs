//! The contract between the Nix library and the builder: for each action, one struct holding
//! the structured attributes its derivation in `nix/` passes, under the names `nix/` gives them.
//! An attribute the struct does not declare is refused, naming it and the ones the action takes,
//! so an attribute renamed on one side fails the build instead of being silently ignored.
//!
//! Values are read with the checks nixpkgs' arguments need (a string, a list of strings, a
//! non-negative integer, ...); errors name the attribute. Nix's own attributes (`builder`,
//! `system`, `outputs`, `exportReferencesGraph`, ..., as `nix/enums.json` lists them) are set
//! aside first.

use crate::compress::Compressor;
use crate::image::Format;
use crate::util::limits::{parse_json, read_limited, INPUT_LIMIT, INPUT_VALUES};
use crate::util::shared::Choice;
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// What Nix itself reads from a derivation's attributes (or what every derivation of ours carries
/// for Nix's sake), not the builder: `nixAttributes` in `nix/enums.json`, which overrideAttrs in
/// the Nix library may add too (`requiredSystemFeatures`, `allowedReferences`, ...).
fn nix_keys() -> Vec<&'static str> {
    crate::util::shared::list("nixAttributes")
}

/// A derivation's structured attributes, as Nix wrote them.
pub struct Attrs {
    map: Map<String, Value>,
}

/// [`crate::util::kind`] in Nix's words: objects are attribute sets.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "an attribute set",
        other => crate::util::kind(other),
    }
}

/// Where the structured attributes are: `NIX_ATTRS_JSON_FILE`, unless it does not exist, as
/// when Nix 2.8 names the path outside the sandbox; then `.attrs.json` in the build directory
/// (or the working directory, for Nix versions that set no variable).
pub(super) fn attrs_path(env_file: Option<PathBuf>, build_top: Option<PathBuf>) -> PathBuf {
    let candidates: Vec<PathBuf> =
        [env_file, build_top.map(|top| top.join(".attrs.json")), Some(PathBuf::from(".attrs.json"))].into_iter().flatten().collect();
    candidates.iter().find(|p| p.exists()).unwrap_or(&candidates[0]).clone()
}

impl Attrs {
    /// Reads `NIX_ATTRS_JSON_FILE`, or `.attrs.json` in the working directory (older Nix).
    pub fn load() -> Result<Attrs> {
        let path = attrs_path(std::env::var_os("NIX_ATTRS_JSON_FILE").map(PathBuf::from), std::env::var_os("NIX_BUILD_TOP").map(PathBuf::from));
        let text = read_limited(&path, INPUT_LIMIT).map_err(|e| anyhow!("{e:#}; `stevedore nix` runs as the builder of a derivation with __structuredAttrs = true"))?;
        let value: Value = parse_json(&text, INPUT_VALUES).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Attrs::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<Attrs> {
        match value {
            Value::Object(map) => Ok(Attrs { map }),
            other => bail!("the structured attributes must be an object, not {}", kind(&other)),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The output path (`outputs.out`).
    pub fn out(&self) -> Result<PathBuf> {
        self.get("outputs")
            .and_then(|o| o.get("out"))
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("the structured attributes have no outputs.out"))
    }

    /// Refuses attributes that are neither Nix's nor in `known` (an action's attributes, plus
    /// the names of the graphs its derivation exports).
    fn check_known(&self, action: &str, known: &[&str]) -> Result<()> {
        let graphs: Vec<&str> = match self.map.get("exportReferencesGraph") {
            Some(Value::Object(g)) => g.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        let nix = nix_keys();
        for key in self.map.keys() {
            if !nix.contains(&key.as_str()) && !known.contains(&key.as_str()) && !graphs.contains(&key.as_str()) {
                bail!("{key}: not an attribute of `{action}` derivations (they take {}); is nix/ from another version of stevedore?", known.join(", "));
            }
        }
        Ok(())
    }
}

/// How one attribute's value is read, by the type of the field that holds it.
pub trait Field: Sized {
    fn read(attrs: &Attrs, key: &str) -> Result<Self>;
}

impl Field for Option<String> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match attrs.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("{key}: expected a string, got {}", kind(other)),
        }
    }
}

impl Field for String {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        Option::<String>::read(attrs, key)?.ok_or_else(|| anyhow!("{key}: missing"))
    }
}

/// Absent means false.
impl Field for bool {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match attrs.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!("{key}: expected a boolean, got {}", kind(other)),
        }
    }
}

/// A non-negative integer; numeric strings are accepted too, as nixpkgs passes some numbers
/// through the environment.
impl Field for Option<u64> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match attrs.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| anyhow!("{key}: expected a non-negative integer, got {n}")),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| anyhow!("{key}: expected a non-negative integer, got {s:?}")),
            Some(other) => bail!("{key}: expected an integer, got {}", kind(other)),
        }
    }
}

impl Field for u64 {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        Option::<u64>::read(attrs, key)?.ok_or_else(|| anyhow!("{key}: missing"))
    }
}

/// Whole seconds (buildImage's `mtime`), if given.
impl Field for Option<i64> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match attrs.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| anyhow!("{key}: expected whole seconds, got {n}")),
            Some(other) => bail!("{key}: expected a number of seconds, got {}", kind(other)),
        }
    }
}

/// Absent means empty.
impl Field for Vec<String> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match attrs.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{key}: expected strings, got {}", kind(v))))
                .collect(),
            Some(other) => bail!("{key}: expected a list, got {}", kind(other)),
        }
    }
}

/// nixpkgs' compressor names (`none`, `gz`, `zstd`), and `zstd:chunked` for OCI layers.
impl Field for Compressor {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        let name = String::read(attrs, key)?;
        Compressor::parse(&name).map_err(|_| anyhow!("{key}: {name:?} is not one of none, gz, zstd, zstd:chunked"))
    }
}

impl Field for Option<Compressor> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match Option::<String>::read(attrs, key)? {
            None => Ok(None),
            Some(_) => Compressor::read(attrs, key).map(Some),
        }
    }
}

/// An output format; absent means a Docker archive.
impl Field for Format {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        match Option::<String>::read(attrs, key)? {
            None => Ok(Format::DockerArchive),
            Some(f) => Format::from_name(&f).map_err(|e| anyhow!("{key}: {e}")),
        }
    }
}

/// A value read later by its own rules (a closure graph, a layering pipeline, a tree of files).
impl Field for Option<Value> {
    fn read(attrs: &Attrs, key: &str) -> Result<Self> {
        Ok(attrs.get(key).cloned())
    }
}

/// An action's attributes: read from the derivation's, unknown ones refused.
pub trait ActionAttrs: Sized {
    /// The action's name (`stevedore nix NAME`).
    const ACTION: &'static str;
    /// The attributes it takes, as `nix/` names them.
    const NAMES: &'static [&'static str];
    fn read(attrs: &Attrs) -> Result<Self>;

    /// Reads and checks `attrs`; also returns the output path.
    fn from_attrs(attrs: &Attrs) -> Result<(PathBuf, Self)> {
        attrs.check_known(Self::ACTION, Self::NAMES)?;
        Ok((attrs.out()?, Self::read(attrs)?))
    }

    /// Loads the running derivation's attributes.
    fn load() -> Result<(PathBuf, Self)> {
        Self::from_attrs(&Attrs::load()?)
    }
}

/// Declares an action's attributes: `field: Type = "nixName"`, each documented where declared.
macro_rules! action_attrs {
    ($(#[$meta:meta])* $name:ident = $action:literal { $($(#[$fmeta:meta])* $field:ident : $ty:ty = $key:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl ActionAttrs for $name {
            const ACTION: &'static str = $action;
            const NAMES: &'static [&'static str] = &[$($key),*];
            fn read(attrs: &Attrs) -> Result<Self> {
                Ok($name { $($field: <$ty as Field>::read(attrs, $key)?,)* })
            }
        }
    };
}

action_attrs! {
    /// `text`: writeText.
    Text = "text" {
        /// The file's contents.
        text: String = "text",
    }
}

action_attrs! {
    /// `symlinks`: a directory of symlinks.
    Symlinks = "symlinks" {
        /// `{ "rel/path" = "target"; }`.
        links: Option<Value> = "links",
    }
}

action_attrs! {
    /// `files`: a directory of small files.
    Files = "files" {
        /// `{ "rel/path" = { text; executable; } or { directory = true; }; }`.
        files: Option<Value> = "files",
    }
}

action_attrs! {
    /// `customisation-layer`: streamLayeredImage's layer of `contents` and commands.
    CustomisationLayer = "customisation-layer" {
        /// Store paths joined into the root as symlinkJoin does.
        contents: Vec<String> = "contents",
        extra_commands: Option<String> = "extraCommands",
        fake_root_commands: Option<String> = "fakeRootCommands",
        enable_fakechroot: bool = "enableFakechroot",
        /// ISO-8601 or "now".
        mtime: String = "mtime",
        store_dir: Option<String> = "storeDir",
        /// The shell commands run with, and their PATH.
        shell: Option<String> = "shell",
        path: Option<String> = "path",
        include_nix_db: bool = "includeNixDB",
        /// The Nix database's closure (an exported graph) and its GC roots.
        db_closure: Option<Value> = "dbClosure",
        db_roots: Vec<String> = "dbRoots",
        /// Executables for fakeRootCommands and enableFakechroot.
        fakeroot: Option<String> = "fakeroot",
        proot: Option<String> = "proot",
    }
}

action_attrs! {
    /// `conf`: the stream conf (store layers planned).
    Conf = "conf" {
        /// A file with `config`, `architecture`, `os`.
        base_json: String = "baseJson",
        customisation_layer: String = "customisationLayer",
        /// The exported graph of the image's closure.
        closure: Option<Value> = "closure",
        exclude_paths: Vec<String> = "excludePaths",
        from_image: Option<String> = "fromImage",
        /// Null, a list, or a JSON file holding one.
        layering_pipeline: Option<Value> = "layeringPipeline",
        image_name: String = "imageName",
        /// Null: the hash of `$out`.
        tag: Option<String> = "tag",
        store_dir: Option<String> = "storeDir",
        /// Read only without a layering pipeline, as nixpkgs does.
        max_layers: Option<u64> = "maxLayers",
        created: String = "created",
        mtime: String = "mtime",
        uid: u64 = "uid",
        gid: u64 = "gid",
        uname: String = "uname",
        gname: String = "gname",
        debug: bool = "debug",
    }
}

action_attrs! {
    /// `stream-script`: the executable that streams the image.
    StreamScript = "stream-script" {
        shell: String = "shell",
        stevedore: String = "stevedore",
        conf: String = "conf",
    }
}

action_attrs! {
    /// `push-script`: passthru.copyToRegistry.
    PushScript = "push-script" {
        shell: String = "shell",
        stevedore: String = "stevedore",
        /// A conf or an image archive.
        conf: String = "conf",
        /// `name:tag`, the default destination's repository and tag.
        image_ref: String = "imageRef",
        /// Documents (passthru.sbom, passthru.spdx) to attach to the pushed image.
        attach: Vec<String> = "attach",
        /// The key to sign with (`--sign`): a path outside the store, or `env://VAR`.
        sign: Option<String> = "sign",
        /// The provenance predicate to attest with that key (`--provenance`).
        provenance: Option<String> = "provenance",
        /// The layers' compressor (`--compressor`), if not push's default.
        compressor: Option<Compressor> = "compressor",
    }
}

action_attrs! {
    /// `load-script`: passthru.copyToPodman, copyToDockerDaemon, copyToContainerd.
    LoadScript = "load-script" {
        shell: String = "shell",
        stevedore: String = "stevedore",
        conf: String = "conf",
        /// `podman`, `docker` or `containerd`.
        runtime: String = "runtime",
    }
}

action_attrs! {
    /// `sbom`: passthru.sbom and passthru.spdx, the image's bill of materials.
    Sbom = "sbom" {
        conf: String = "conf",
        /// The exported graph of the conf's closure (every store path of the image).
        closure: Option<Value> = "closure",
        /// `[{ path, license = [{ spdxId, fullName }], homepage, description }]`.
        packages: Option<Value> = "packages",
        /// `cyclonedx`, `spdx` or `slsa-provenance` (passthru.provenance).
        format: String = "sbomFormat",
        /// The image's derivation, which the provenance names.
        derivation: Option<String> = "derivation",
    }
}

action_attrs! {
    /// `archive`: buildLayeredImage's archive from a conf.
    Archive = "archive" {
        conf: String = "conf",
        compressor: Compressor = "compressor",
        format: Format = "format",
        /// Passed for the derivation's name; the conf holds the image's.
        image_name: Option<String> = "imageName",
    }
}

action_attrs! {
    /// `image-layer`: buildImage's new layer.
    ImageLayer = "image-layer" {
        copy_to_root: Vec<String> = "copyToRoot",
        keep_contents_dirlinks: bool = "keepContentsDirlinks",
        extra_commands: Option<String> = "extraCommands",
        shell: Option<String> = "shell",
        path: Option<String> = "path",
        uid: Option<u64> = "uid",
        gid: Option<u64> = "gid",
        mtime: Option<i64> = "mtime",
        base_json: Option<String> = "baseJson",
        store_dir: Option<String> = "storeDir",
        include_nix_db: bool = "includeNixDB",
        db_closure: Option<Value> = "dbClosure",
        db_roots: Vec<String> = "dbRoots",
        /// The root step and what it runs over.
        run_as_root: Option<String> = "runAsRoot",
        run_as_root_shell: Option<String> = "runAsRootShell",
        run_as_root_path: Option<String> = "runAsRootPath",
        from_image: Option<String> = "fromImage",
        from_image_name: Option<String> = "fromImageName",
        from_image_tag: Option<String> = "fromImageTag",
    }
}

action_attrs! {
    /// `image`: buildImage's archive.
    Image = "image" {
        /// The `image-layer` output.
        layer: String = "layer",
        /// The exported graph of the layer's closure.
        closure: Option<Value> = "closure",
        base_json: String = "baseJson",
        from_image: Option<String> = "fromImage",
        from_image_name: Option<String> = "fromImageName",
        from_image_tag: Option<String> = "fromImageTag",
        image_name: String = "imageName",
        tag: Option<String> = "tag",
        store_dir: Option<String> = "storeDir",
        created: String = "created",
        mtime: Option<i64> = "mtime",
        compressor: Compressor = "compressor",
        format: Format = "format",
    }
}

action_attrs! {
    /// `export`: exportImage.
    Export = "export" {
        from_image: String = "fromImage",
        from_image_name: Option<String> = "fromImageName",
        from_image_tag: Option<String> = "fromImageTag",
        mtime: Option<i64> = "mtime",
    }
}

action_attrs! {
    /// `merge`: mergeImages.
    Merge = "merge" {
        /// Docker archives or stream executables.
        images: Vec<String> = "images",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_attribute() {
        let a = Attrs::from_value(json!({"maxLayers": "x", "uid": -1, "tag": 3, "outputs": {"out": "/nix/store/abc-x"}})).unwrap();
        assert!(u64::read(&a, "maxLayers").unwrap_err().to_string().starts_with("maxLayers: "));
        assert!(u64::read(&a, "uid").unwrap_err().to_string().starts_with("uid: "));
        assert!(Option::<String>::read(&a, "tag").unwrap_err().to_string().starts_with("tag: "));
        assert_eq!(a.out().unwrap(), PathBuf::from("/nix/store/abc-x"));
        assert!(!bool::read(&a, "enableFakechroot").unwrap());
    }

    #[test]
    fn unknown_attributes_are_refused_by_name() {
        let a = Attrs::from_value(json!({"text": "hi", "txet": "typo", "builder": "/x", "outputs": {"out": "/nix/store/abc-x"}})).unwrap();
        let e = Text::from_attrs(&a).unwrap_err().to_string();
        assert!(e.starts_with("txet: not an attribute of `text` derivations (they take text)"), "{e}");
        // The graphs a derivation exports come under the names it gives them.
        let a = Attrs::from_value(json!({"images": [], "exportReferencesGraph": {"g": []}, "g": [], "outputs": {"out": "/o"}})).unwrap();
        assert!(Merge::from_attrs(&a).is_ok());
        // What Nix reads (an overrideAttrs may add it) is not the builder's business.
        let a = Attrs::from_value(json!({"images": [], "requiredSystemFeatures": ["kvm"], "allowedReferences": [], "outputs": {"out": "/o"}})).unwrap();
        assert!(Merge::from_attrs(&a).is_ok());
    }

    #[test]
    fn attrs_file_outside_the_sandbox_falls_back_to_the_build_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let inside = tmp.path().join(".attrs.json");
        let outside = tmp.path().join("outside/.attrs.json");
        let top = Some(tmp.path().to_path_buf());
        // Missing everywhere: the variable's path, for the error message.
        assert_eq!(attrs_path(Some(outside.clone()), top.clone()), outside);
        std::fs::write(&inside, "{}").unwrap();
        assert_eq!(attrs_path(Some(outside.clone()), top.clone()), inside);
        assert_eq!(attrs_path(None, top.clone()), inside);
        std::fs::create_dir_all(outside.parent().unwrap()).unwrap();
        std::fs::write(&outside, "{}").unwrap();
        assert_eq!(attrs_path(Some(outside.clone()), top), outside);
    }
}
