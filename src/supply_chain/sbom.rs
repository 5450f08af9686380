//! Software bills of materials from a closure: CycloneDX 1.6 and SPDX 2.3 JSON.
//!
//! One component per store path in the image, with the properties nixpkgs' CycloneDX property
//! taxonomy defines (`nix:store_path`, `nix:narinfo:*`), the layer that holds it, dependency
//! edges from its references, and the `meta` Nix evaluation had for the packages the user
//! passed. Everything is derived from the inputs alone (the timestamp is the image's `created`,
//! the serial number and document namespace are hashes of the content), so an unchanged image
//! keeps byte-identical documents.

use crate::util::hex;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// A store path as the closure graph or the Nix database describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreObject {
    pub path: String,
    /// As Nix gives it (`sha256:<base32>` from a graph, `sha256:<base16>` from the database).
    pub nar_hash: Option<String>,
    pub nar_size: Option<u64>,
    /// Other paths it references (itself excluded).
    pub references: Vec<String>,
    pub self_reference: bool,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
}

/// A license as nixpkgs' `lib.licenses` describes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct License {
    pub spdx_id: Option<String>,
    pub name: Option<String>,
}

/// What evaluation knew of a package the user passed (`meta`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageMeta {
    pub path: String,
    pub licenses: Vec<License>,
    pub homepage: Option<String>,
    pub description: Option<String>,
}

/// One layer of the image: its position (1 = bottom), diff_id and the store paths it holds
/// (none for base and customisation layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub position: usize,
    pub diff_id: String,
    pub paths: Vec<String>,
    pub kind: LayerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Base,
    Store,
    Customisation,
}

/// Everything a document says.
#[derive(Debug, Clone, Default)]
pub struct SbomInput {
    /// The repository (`registry/team/app`) and tag of the image.
    pub name: String,
    pub tag: String,
    /// ISO-8601 in UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    pub created: String,
    pub architecture: String,
    pub os: String,
    /// The image config's digest (`sha256:...`), the same in every format.
    pub image_id: Option<String>,
    pub layers: Vec<Layer>,
    /// Sorted by path, one per store path in the image.
    pub objects: Vec<StoreObject>,
    pub packages: Vec<PackageMeta>,
}

/// `(name, version)` of a store path's name part, as `builtins.parseDrvName` splits it (the
/// version starts at the first dash followed by a character that is not a letter), with a
/// trailing output name (`-bin`, `-lib`, ...) taken off the version.
pub fn name_and_version(store_name: &str) -> (String, Option<String>) {
    let b = store_name.as_bytes();
    let split = (0..b.len()).find(|&i| b[i] == b'-' && b.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()));
    let Some(i) = split else { return (store_name.to_string(), None) };
    let (name, mut version) = (&store_name[..i], &store_name[i + 1..]);
    const OUTPUTS: &[&str] = &["bin", "lib", "dev", "out", "man", "doc", "info", "debug", "static", "share", "devdoc", "lib32", "py", "modules"];
    if let Some((v, output)) = version.rsplit_once('-') {
        if OUTPUTS.contains(&output) && !v.is_empty() {
            version = v;
        }
    }
    (name.to_string(), Some(version.to_string()))
}

/// The store path's name part (after `HASH-`), and its hash part.
fn split_store_path(path: &str) -> (&str, &str) {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) => (name, hash),
        None => (base, base),
    }
}

impl SbomInput {
    fn layer_of(&self) -> BTreeMap<&str, &Layer> {
        let mut of = BTreeMap::new();
        for layer in &self.layers {
            for p in &layer.paths {
                of.entry(p.as_str()).or_insert(layer);
            }
        }
        of
    }

    fn meta_of(&self, path: &str) -> Option<&PackageMeta> {
        self.packages.iter().find(|p| p.path == path)
    }

    /// The store paths no other path in the image references: what the image is "of".
    fn roots(&self) -> Vec<&str> {
        let referenced: HashSet<&str> = self.objects.iter().flat_map(|o| o.references.iter().map(String::as_str)).collect();
        let mut roots: Vec<&str> = self.packages.iter().map(|p| p.path.as_str()).filter(|p| self.objects.iter().any(|o| o.path == *p)).collect();
        roots.extend(self.objects.iter().map(|o| o.path.as_str()).filter(|p| !referenced.contains(p)));
        roots.sort_unstable();
        roots.dedup();
        roots
    }

    fn in_image(&self) -> HashSet<&str> {
        self.objects.iter().map(|o| o.path.as_str()).collect()
    }
}

/// A name-based UUID (RFC 9562 version 8) from `data`'s sha256.
fn uuid_of(data: &[u8]) -> String {
    let mut h: [u8; 32] = Sha256::digest(data).into();
    h[6] = (h[6] & 0x0f) | 0x80;
    h[8] = (h[8] & 0x3f) | 0x80;
    let x = hex(&h[..16]);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32])
}

fn to_text(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("a JSON value serializes");
    s.push('\n');
    s
}

fn prop(name: &str, value: impl Into<String>) -> Value {
    json!({"name": name, "value": value.into()})
}

/// The CycloneDX 1.6 JSON document.
pub fn cyclonedx(input: &SbomInput) -> String {
    let layer_of = input.layer_of();
    let in_image = input.in_image();
    let mut components = Vec::new();
    for o in &input.objects {
        let (store_name, _) = split_store_path(&o.path);
        let (name, version) = name_and_version(store_name);
        let meta = input.meta_of(&o.path);
        let mut c = Map::new();
        c.insert("type".into(), json!(if meta.is_some() { "application" } else { "library" }));
        c.insert("bom-ref".into(), json!(o.path));
        c.insert("name".into(), json!(name));
        if let Some(v) = version {
            c.insert("version".into(), json!(v));
        }
        if let Some(m) = meta {
            if let Some(d) = &m.description {
                c.insert("description".into(), json!(d));
            }
            let licenses: Vec<Value> = m
                .licenses
                .iter()
                .filter_map(|l| match (&l.spdx_id, &l.name) {
                    (Some(id), _) => Some(json!({"license": {"id": id}})),
                    (None, Some(n)) => Some(json!({"license": {"name": n}})),
                    (None, None) => None,
                })
                .collect();
            if !licenses.is_empty() {
                c.insert("licenses".into(), Value::Array(licenses));
            }
            if let Some(h) = &m.homepage {
                c.insert("externalReferences".into(), json!([{"type": "website", "url": h}]));
            }
        }
        let mut props = vec![prop("nix:store_path", &o.path), prop("nix:narinfo:store_path", &o.path)];
        if let Some(h) = &o.nar_hash {
            props.push(prop("nix:narinfo:nar_hash", h));
        }
        if let Some(s) = o.nar_size {
            props.push(prop("nix:narinfo:nar_size", s.to_string()));
        }
        if let Some(d) = &o.deriver {
            props.push(prop("nix:narinfo:deriver", d));
        }
        if let Some(ca) = &o.ca {
            props.push(prop("nix:narinfo:ca", ca));
        }
        for s in &o.sigs {
            props.push(prop("nix:narinfo:sig", s));
        }
        let mut refs: Vec<&str> = o.references.iter().map(String::as_str).collect();
        if o.self_reference {
            refs.push(&o.path);
        }
        refs.sort_unstable();
        props.push(prop("nix:narinfo:references", refs.join(" ")));
        if let Some(layer) = layer_of.get(o.path.as_str()) {
            props.push(prop("stevedore:layer:position", layer.position.to_string()));
            props.push(prop("stevedore:layer:diff_id", &layer.diff_id));
        }
        c.insert("properties".into(), Value::Array(props));
        components.push(Value::Object(c));
    }
    let mut image_props = vec![prop("stevedore:image:architecture", &input.architecture), prop("stevedore:image:os", &input.os)];
    if let Some(id) = &input.image_id {
        image_props.push(prop("stevedore:image:config_digest", id));
    }
    for layer in &input.layers {
        let kind = match layer.kind {
            LayerKind::Base => "base",
            LayerKind::Store => "store",
            LayerKind::Customisation => "customisation",
        };
        image_props.push(prop("stevedore:image:layer", format!("{} {} {kind}", layer.position, layer.diff_id)));
    }
    let mut dependencies = vec![json!({"ref": "image", "dependsOn": input.roots()})];
    for o in &input.objects {
        let deps: Vec<&str> = o.references.iter().map(String::as_str).filter(|r| in_image.contains(r)).collect();
        dependencies.push(json!({"ref": o.path, "dependsOn": deps}));
    }
    let body = json!({
        "metadata": {
            "timestamp": input.created,
            "tools": {"components": [{"type": "application", "name": "stevedore", "version": env!("CARGO_PKG_VERSION")}]},
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": input.name,
                "version": input.tag,
                "properties": image_props,
            },
        },
        "components": components,
        "dependencies": dependencies,
    });
    let serial = uuid_of(to_text(&body).as_bytes());
    let mut doc = Map::new();
    doc.insert("$schema".into(), json!("http://cyclonedx.org/schema/bom-1.6.schema.json"));
    doc.insert("bomFormat".into(), json!("CycloneDX"));
    doc.insert("specVersion".into(), json!("1.6"));
    doc.insert("serialNumber".into(), json!(format!("urn:uuid:{serial}")));
    doc.insert("version".into(), json!(1));
    if let Value::Object(rest) = body {
        doc.extend(rest);
    }
    to_text(&Value::Object(doc))
}

/// An SPDX identifier's allowed characters (letters, digits, `.` and `-`).
fn spdx_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' }).collect()
}

/// The SPDX 2.3 JSON document.
pub fn spdx(input: &SbomInput) -> String {
    let layer_of = input.layer_of();
    let in_image = input.in_image();
    let id_of = |path: &str| {
        let (name, hash) = split_store_path(path);
        format!("SPDXRef-Nix-{}-{}", spdx_id(hash), spdx_id(name))
    };
    let mut packages = vec![json!({
        "SPDXID": "SPDXRef-Image",
        "name": input.name,
        "versionInfo": input.tag,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "comment": match &input.image_id {
            Some(id) => format!("image config {id}, {} {}", input.os, input.architecture),
            None => format!("{} {}", input.os, input.architecture),
        },
    })];
    let mut relationships = vec![json!({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-Image"})];
    for o in &input.objects {
        let (store_name, _) = split_store_path(&o.path);
        let (name, version) = name_and_version(store_name);
        let meta = input.meta_of(&o.path);
        let mut p = Map::new();
        p.insert("SPDXID".into(), json!(id_of(&o.path)));
        p.insert("name".into(), json!(name));
        if let Some(v) = version {
            p.insert("versionInfo".into(), json!(v));
        }
        p.insert("packageFileName".into(), json!(o.path));
        p.insert("downloadLocation".into(), json!("NOASSERTION"));
        p.insert("filesAnalyzed".into(), json!(false));
        let declared = meta
            .and_then(|m| {
                let ids: Option<Vec<&str>> = m.licenses.iter().map(|l| l.spdx_id.as_deref()).collect();
                ids.filter(|ids| !ids.is_empty()).map(|ids| if ids.len() == 1 { ids[0].to_string() } else { format!("({})", ids.join(" AND ")) })
            })
            .unwrap_or_else(|| "NOASSERTION".into());
        p.insert("licenseConcluded".into(), json!("NOASSERTION"));
        p.insert("licenseDeclared".into(), json!(declared));
        p.insert("copyrightText".into(), json!("NOASSERTION"));
        if let Some(m) = meta {
            if let Some(h) = &m.homepage {
                p.insert("homepage".into(), json!(h));
            }
            if let Some(d) = &m.description {
                p.insert("description".into(), json!(d));
            }
            p.insert("primaryPackagePurpose".into(), json!("APPLICATION"));
        }
        let mut comment = Vec::new();
        if let Some(h) = &o.nar_hash {
            comment.push(format!("narHash {h}"));
        }
        if let Some(s) = o.nar_size {
            comment.push(format!("narSize {s}"));
        }
        if let Some(layer) = layer_of.get(o.path.as_str()) {
            comment.push(format!("in layer {} ({})", layer.position, layer.diff_id));
        }
        if !comment.is_empty() {
            p.insert("comment".into(), json!(comment.join("; ")));
        }
        packages.push(Value::Object(p));
        relationships.push(json!({"spdxElementId": "SPDXRef-Image", "relationshipType": "CONTAINS", "relatedSpdxElement": id_of(&o.path)}));
        for r in o.references.iter().filter(|r| in_image.contains(r.as_str())) {
            relationships.push(json!({"spdxElementId": id_of(&o.path), "relationshipType": "DEPENDS_ON", "relatedSpdxElement": id_of(r)}));
        }
    }
    let body = json!({
        "creationInfo": {"created": input.created, "creators": [format!("Tool: stevedore-{}", env!("CARGO_PKG_VERSION"))]},
        "packages": packages,
        "relationships": relationships,
    });
    let namespace = format!("https://stevedore.invalid/spdx/{}/{}", spdx_id(&input.name), uuid_of(to_text(&body).as_bytes()));
    let mut doc = Map::new();
    doc.insert("spdxVersion".into(), json!("SPDX-2.3"));
    doc.insert("dataLicense".into(), json!("CC0-1.0"));
    doc.insert("SPDXID".into(), json!("SPDXRef-DOCUMENT"));
    doc.insert("name".into(), json!(format!("{}:{}", input.name, input.tag)));
    doc.insert("documentNamespace".into(), json!(namespace));
    if let Value::Object(rest) = body {
        doc.extend(rest);
    }
    to_text(&Value::Object(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_split_as_parse_drv_name() {
        let nv = |s: &str| name_and_version(s);
        assert_eq!(nv("hello-2.12.1"), ("hello".into(), Some("2.12.1".into())));
        assert_eq!(nv("glibc-2.39-52"), ("glibc".into(), Some("2.39-52".into())));
        assert_eq!(nv("python3.12-requests-2.31.0"), ("python3.12-requests".into(), Some("2.31.0".into())));
        assert_eq!(nv("openssl-3.0.13-bin"), ("openssl".into(), Some("3.0.13".into())));
        assert_eq!(nv("source"), ("source".into(), None));
        assert_eq!(nv("bash-interactive"), ("bash-interactive".into(), None));
        assert_eq!(nv("name-"), ("name-".into(), None));
        assert_eq!(nv("ünïcode-1"), ("ünïcode".into(), Some("1".into())));
    }

    fn input() -> SbomInput {
        let a = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello-2.12.1";
        let b = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.39-52";
        SbomInput {
            name: "registry.example/app".into(),
            tag: "v1".into(),
            created: "1970-01-01T00:00:01Z".into(),
            architecture: "amd64".into(),
            os: "linux".into(),
            image_id: Some(format!("sha256:{}", "c".repeat(64))),
            layers: vec![
                Layer { position: 1, diff_id: format!("sha256:{}", "1".repeat(64)), paths: vec![b.into()], kind: LayerKind::Store },
                Layer { position: 2, diff_id: format!("sha256:{}", "2".repeat(64)), paths: vec![a.into()], kind: LayerKind::Store },
            ],
            objects: vec![
                StoreObject { path: a.into(), nar_hash: Some("sha256:0abc".into()), nar_size: Some(10), references: vec![b.into()], self_reference: true, ..Default::default() },
                StoreObject { path: b.into(), nar_hash: Some("sha256:0def".into()), nar_size: Some(20), self_reference: true, ..Default::default() },
            ],
            packages: vec![PackageMeta {
                path: a.into(),
                licenses: vec![License { spdx_id: Some("GPL-3.0-or-later".into()), name: Some("GNU GPL v3+".into()) }],
                homepage: Some("https://www.gnu.org/software/hello/".into()),
                description: Some("A program that produces a familiar, friendly greeting".into()),
            }],
        }
    }

    #[test]
    fn cyclonedx_has_components_properties_and_edges() {
        let doc: Value = serde_json::from_str(&cyclonedx(&input())).unwrap();
        assert_eq!(doc["specVersion"], "1.6");
        assert!(doc["serialNumber"].as_str().unwrap().starts_with("urn:uuid:"));
        let c = &doc["components"][0];
        assert_eq!((c["name"].as_str(), c["version"].as_str(), c["type"].as_str()), (Some("hello"), Some("2.12.1"), Some("application")));
        assert_eq!(c["licenses"][0]["license"]["id"], "GPL-3.0-or-later");
        let props: Vec<(&str, &str)> = c["properties"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap(), p["value"].as_str().unwrap())).collect();
        assert!(props.contains(&("nix:narinfo:nar_hash", "sha256:0abc")));
        assert!(props.contains(&("stevedore:layer:position", "2")));
        assert_eq!(doc["dependencies"][0]["dependsOn"], json!([c["bom-ref"]]));
        assert_eq!(doc["dependencies"][1]["dependsOn"], json!([doc["components"][1]["bom-ref"]]));
        assert_eq!(doc["components"][1]["type"], "library");
    }

    #[test]
    fn documents_are_deterministic_and_follow_their_content() {
        let i = input();
        assert_eq!(cyclonedx(&i), cyclonedx(&i.clone()));
        assert_eq!(spdx(&i), spdx(&i.clone()));
        let mut other = i.clone();
        other.objects[1].nar_size = Some(21);
        let serial = |d: &str| serde_json::from_str::<Value>(d).unwrap()["serialNumber"].clone();
        assert_ne!(serial(&cyclonedx(&i)), serial(&cyclonedx(&other)));
        let ns = |d: &str| serde_json::from_str::<Value>(d).unwrap()["documentNamespace"].clone();
        assert_ne!(ns(&spdx(&i)), ns(&spdx(&other)));
    }

    #[test]
    fn spdx_has_packages_and_relationships() {
        let doc: Value = serde_json::from_str(&spdx(&input())).unwrap();
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        let p = &doc["packages"][1];
        assert_eq!(p["licenseDeclared"], "GPL-3.0-or-later");
        assert_eq!(p["SPDXID"], "SPDXRef-Nix-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello-2.12.1");
        let rels: Vec<&str> = doc["relationships"].as_array().unwrap().iter().map(|r| r["relationshipType"].as_str().unwrap()).collect();
        assert_eq!(rels, ["DESCRIBES", "CONTAINS", "DEPENDS_ON", "CONTAINS"]);
    }
}
