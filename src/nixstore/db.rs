//! The Nix database of an image's store paths (`stevedore nixdb`): what nixpkgs gets from
//! `nix-store --load-db < registration` followed by `mkDbExtraCommand`'s fix-ups, without
//! running Nix.
//!
//! Under `--root`, it writes `nix/var/nix/db/db.sqlite` (schema version 10, created with the
//! exact text of Nix's `schema.sql`, rows inserted in the order `registerValidPaths` uses: paths
//! sorted, then each path's references sorted), `nix/var/nix/db/schema` (`10`), and
//! `nix/var/nix/gcroots/docker/<basename>` links to the roots. Registration times are fixed, so
//! the same closure gives the same bytes.

use crate::util::hex;
use crate::nixstore::{parse_nar_hash, ClosureGraph, GraphFormat};
use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{params, Connection};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Nix's `nixSchemaVersion` since Nix 1.12 (still current).
pub const SCHEMA_VERSION: u32 = 10;

/// `src/libstore/schema.sql` of Nix 2.x, verbatim: SQLite keeps each statement's text in
/// `sqlite_master`, so even the comments are part of the bytes Nix would write.
pub const SCHEMA: &str = r#"create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"#;

/// The closure in `closure` (in `format`); with `key`, the list under that key of a JSON object
/// such as `.attrs.json`.
pub fn load_graph(closure: &Path, format: GraphFormat, key: Option<&str>) -> Result<ClosureGraph> {
    let Some(key) = key else {
        return ClosureGraph::load(closure, format);
    };
    let name = closure.display();
    let bytes = crate::util::limits::read_limited(closure, crate::util::limits::INPUT_LIMIT).map_err(|e| anyhow!("{e:#}"))?;
    let value: serde_json::Value = crate::util::limits::parse_json(&bytes, crate::util::limits::INPUT_VALUES).map_err(|e| anyhow!("{name}: {e:#}"))?;
    let list = value.get(key).ok_or_else(|| anyhow!("{name}: no key {key:?}"))?;
    ClosureGraph::from_json_value(list).map_err(|e| anyhow!("{name}: {e:#}"))
}

/// The outputs a derivation file names (`Derive([("out","/nix/store/...","",""),...],...`),
/// sorted by name as Nix's `std::map` holds them; floating outputs (no path) are left out, as
/// Nix leaves them out of `DerivationOutputs`.
pub fn drv_outputs(text: &str) -> Result<Vec<(String, String)>> {
    let mut s = text.strip_prefix("Derive([").ok_or_else(|| anyhow!("not a derivation (no Derive([ prefix)"))?;
    fn string(s: &mut &str) -> Result<String> {
        let rest = s.strip_prefix('"').ok_or_else(|| anyhow!("expected a string"))?;
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    *s = &rest[i + 1..];
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        bail!("unterminated string")
    }
    fn expect(s: &mut &str, what: char) -> Result<()> {
        *s = s.strip_prefix(what).ok_or_else(|| anyhow!("expected {what:?}"))?;
        Ok(())
    }
    let mut outputs = Vec::new();
    while !s.starts_with(']') {
        if !outputs.is_empty() {
            expect(&mut s, ',')?;
        }
        expect(&mut s, '(')?;
        let name = string(&mut s)?;
        expect(&mut s, ',')?;
        let path = string(&mut s)?;
        for _ in 0..2 {
            expect(&mut s, ',')?;
            string(&mut s)?;
        }
        expect(&mut s, ')')?;
        outputs.push((name, path));
    }
    outputs.retain(|(_, p)| !p.is_empty());
    outputs.sort();
    Ok(outputs)
}

/// Removes a file, ignoring that it does not exist.
fn remove_if_exists(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow!("cannot remove {}: {e}", p.display())),
        _ => Ok(()),
    }
}

fn sqlite_leftovers(db: &Path) -> Vec<PathBuf> {
    ["-wal", "-shm", "-journal"]
        .iter()
        .map(|s| {
            let mut n = db.as_os_str().to_owned();
            n.push(s);
            PathBuf::from(n)
        })
        .collect()
}

/// Writes the database for `graph` to `db` (through a temporary name; nothing else is left).
pub fn write_db(graph: &ClosureGraph, registration_time: i64, db: &Path) -> Result<()> {
    let dir = db.parent().ok_or_else(|| anyhow!("{} has no parent directory", db.display()))?;
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    // A temporary file of util::files' (unique, removed on error or signal); SQLite opens the
    // empty file as a new database.
    let (file, temp) = crate::util::files::create_temp(dir, std::ffi::OsStr::new("db.sqlite")).with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let tmp = temp.path().to_path_buf();
    let result = (|| -> Result<()> {
        let sql = |e: rusqlite::Error| anyhow!("{}: {e}", tmp.display());
        let mut conn = Connection::open(&tmp).map_err(sql)?;
        // What Nix's LocalStore::openDB sets before creating the schema.
        conn.execute_batch("pragma foreign_keys = 1; pragma synchronous = normal;").map_err(sql)?;
        let mode: String = conn.query_row("pragma main.journal_mode = wal", [], |r| r.get(0)).map_err(sql)?;
        if mode != "wal" {
            bail!("{}: SQLite would not switch to WAL mode (got {mode})", tmp.display());
        }
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let tx = conn.transaction().map_err(sql)?;
        {
            let mut add_path = tx
                .prepare("insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) values (?, ?, ?, ?, ?, ?, ?, ?);")
                .map_err(sql)?;
            let mut add_output = tx.prepare("insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?);").map_err(sql)?;
            for (i, node) in graph.nodes().iter().enumerate() {
                let hash = node
                    .nar_hash
                    .as_deref()
                    .ok_or_else(|| anyhow!("{} has no narHash; the Nix database needs one for every path (use exportReferencesGraph with __structuredAttrs, or closureInfo's registration)", node.path))?;
                let digest = parse_nar_hash(hash).with_context(|| format!("path {}", node.path))?;
                let nar_size = (node.nar_size != 0).then_some(node.nar_size as i64);
                let no_text: Option<&str> = None;
                let no_int: Option<i64> = None;
                add_path
                    .execute(params![node.path, format!("sha256:{}", hex(&digest)), registration_time, no_text, nar_size, no_int, no_text, no_text])
                    .map_err(sql)?;
                // ids are assigned in insertion order: id = index + 1.
                debug_assert_eq!(tx.last_insert_rowid(), i as i64 + 1);
                if node.path.ends_with(".drv") {
                    let text = fs::read_to_string(&node.path).with_context(|| format!("cannot read derivation {} (its outputs go in the database)", node.path))?;
                    for (name, out) in drv_outputs(&text).with_context(|| format!("derivation {}", node.path))? {
                        add_output.execute(params![i as i64 + 1, name, out]).map_err(sql)?;
                    }
                }
            }
            let mut add_ref = tx.prepare("insert or replace into Refs (referrer, reference) values (?, ?);").map_err(sql)?;
            for (i, node) in graph.nodes().iter().enumerate() {
                let mut refs: Vec<u32> = node.references.clone();
                if node.self_reference {
                    refs.push(i as u32);
                    refs.sort_unstable();
                }
                for r in refs {
                    add_ref.execute(params![i as i64 + 1, r as i64 + 1]).map_err(sql)?;
                }
            }
        }
        tx.commit().map_err(sql)?;
        // Closing the last connection checkpoints the WAL into the database and deletes it.
        conn.close().map_err(|(_, e)| sql(e))?;
        if let Some(left) = sqlite_leftovers(&tmp).into_iter().find(|p| p.exists()) {
            bail!("SQLite left {} behind", left.display());
        }
        // A journal left beside an older database would be replayed onto ours.
        for p in sqlite_leftovers(db) {
            remove_if_exists(&p)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in sqlite_leftovers(&tmp) {
            let _ = fs::remove_file(p);
        }
        return Err(e);
    }
    temp.persist(file, db).with_context(|| format!("cannot rename {} to {}", tmp.display(), db.display()))
}

/// Replaces `path` with `data`, through a temporary name.
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    crate::util::files::write_file_atomically(path, data)
}

/// Replaces `link` with a symlink to `target`, through a temporary name.
fn write_symlink(target: &str, link: &Path) -> Result<()> {
    crate::util::files::replace_symlink(target, link)
}

/// Writes `nix/var/nix/db` (schema and database) for `graph` under `root`, and a GC root
/// `nix/var/nix/gcroots/docker/<basename>` for each of `roots` (which must be in the graph).
pub fn write_tree(graph: &ClosureGraph, root: &Path, roots: &[String], registration_time: i64) -> Result<()> {
    let mut named = Vec::new();
    for r in roots {
        if graph.index_of(r).is_none() {
            bail!("root {r} is not in the closure");
        }
        let base = Path::new(r).file_name().and_then(|b| b.to_str()).ok_or_else(|| anyhow!("root {r} has no base name"))?;
        named.push((r.as_str(), base));
    }
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    // Directories 0755 and files 0644 whatever the umask, as they may go into a layer.
    let mut dir = root.to_path_buf();
    for c in ["nix", "var", "nix", "db"] {
        dir.push(c);
        if fs::symlink_metadata(&dir).is_err() {
            crate::util::files::make_dir(&dir)?;
        }
    }
    let db_dir = dir;
    let gc_dir = root.join("nix/var/nix/gcroots/docker");
    for dir in [gc_dir.parent().expect("has a parent"), &gc_dir] {
        if fs::symlink_metadata(dir).is_err() {
            crate::util::files::make_dir(dir)?;
        }
    }
    for (path, base) in &named {
        write_symlink(path, &gc_dir.join(base))?;
    }
    write_file(&db_dir.join("schema"), SCHEMA_VERSION.to_string().as_bytes())?;
    // The database goes last: once it is there, everything else is too.
    let db = db_dir.join("db.sqlite");
    write_db(graph, registration_time, &db)?;
    for f in [db_dir.join("schema"), db] {
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).with_context(|| format!("cannot chmod {}", f.display()))?;
    }
    Ok(())
}

/// A path as a Nix database registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPath {
    pub path: String,
    /// `sha256:<base16>`, as Nix stores it.
    pub nar_hash: String,
    pub nar_size: Option<u64>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
    /// Sorted, itself included when it references itself.
    pub references: Vec<String>,
}

/// Reads `paths` and everything they reference from the database at `db`, read-only (a
/// database another process holds open in WAL mode is read as it was last committed). A path
/// the database does not list is an error naming it.
pub fn read_closure(db: &Path, paths: &[String]) -> Result<Vec<ValidPath>> {
    use rusqlite::OpenFlags;
    let sql = |e: rusqlite::Error| anyhow!("Nix database {}: {e}", db.display());
    if !db.exists() {
        bail!("Nix database {} does not exist (give a closure graph instead)", db.display());
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // Read-only needs the WAL index to be writable by someone; without, read it as immutable.
    let conn = Connection::open_with_flags(db, flags)
        .and_then(|c| c.query_row("select count(*) from ValidPaths limit 1", [], |_| Ok(())).map(|_| c))
        .or_else(|_| Connection::open_with_flags(format!("file:{}?immutable=1", db.display()), flags))
        .map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql)?;
    let mut by_path = conn.prepare("select id, hash, narSize, deriver, ca, sigs from ValidPaths where path = ?").map_err(sql)?;
    let mut refs = conn.prepare("select p.path from Refs r join ValidPaths p on p.id = r.reference where r.referrer = ?").map_err(sql)?;
    let mut seen = std::collections::BTreeMap::new();
    let mut todo: Vec<String> = paths.to_vec();
    while let Some(path) = todo.pop() {
        if seen.contains_key(&path) {
            continue;
        }
        type Row = (i64, String, Option<i64>, Option<String>, Option<String>, Option<String>);
        let row: Option<Row> = by_path
            .query_row([&path], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(sql)?;
        let Some((id, nar_hash, nar_size, deriver, ca, sigs)) = row else {
            bail!("Nix database {}: {path} is not a valid path there", db.display());
        };
        let mut references: Vec<String> = refs.query_map([id], |r| r.get(0)).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?;
        references.sort();
        references.dedup();
        todo.extend(references.iter().filter(|r| !seen.contains_key(*r)).cloned());
        let sigs = sigs.unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        let info = ValidPath {
            path: path.clone(),
            nar_hash,
            nar_size: nar_size.and_then(|n| u64::try_from(n).ok()),
            deriver: deriver.filter(|d| !d.is_empty()),
            ca: ca.filter(|c| !c.is_empty()),
            sigs,
            references,
        };
        seen.insert(path, info);
    }
    Ok(seen.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "/nix/store/0c7a4hbz5ylhypwpjfhcfh1mrnmpr1dq-a";
    const B: &str = "/nix/store/1lc9g5s3s8i1pl4gpkmnmn4sxvkqj3sw-b";
    const C: &str = "/nix/store/2lc9g5s3s8i1pl4gpkmnmn4sxvkqj3sw-c";

    fn graph() -> ClosureGraph {
        // Out of order on purpose: rows must come out sorted whatever the input order.
        let v = json!([
            {"path": C, "narHash": "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", "narSize": 120, "closureSize": 1, "references": [A, C]},
            {"path": A, "narHash": "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s", "narSize": 0, "closureSize": 1, "references": []},
            {"path": B, "narHash": "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "narSize": 7, "closureSize": 1, "references": [C, A]},
        ]);
        ClosureGraph::from_json_value(&v).unwrap()
    }

    #[test]
    fn a_written_database_reads_back_as_a_closure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db.sqlite");
        write_db(&graph(), 1, &p).unwrap();
        // Read-only, as a user who cannot write the WAL index would.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let got = read_closure(&p, &[B.to_string()]);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let got = got.unwrap();
        let paths: Vec<&str> = got.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(paths, [A, B, C]);
        assert_eq!(got[2].references, [A, C]);
        assert_eq!(got[2].nar_size, Some(120));
        assert!(got[0].nar_hash.starts_with("sha256:") && got[0].nar_hash.len() == 7 + 64);
        assert!(read_closure(&p, &["/nix/store/3lc9g5s3s8i1pl4gpkmnmn4sxvkqj3sw-d".into()]).unwrap_err().to_string().contains("-d is not a valid path"));
        assert!(read_closure(&d.path().join("none.sqlite"), &[]).is_err());
    }

    #[test]
    fn database_bytes_are_reproducible() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (p1, p2) = (d1.path().join("db.sqlite"), d2.path().join("db.sqlite"));
        write_db(&graph(), 1, &p1).unwrap();
        write_db(&graph(), 1, &p2).unwrap();
        assert!(fs::read(&p1).unwrap() == fs::read(&p2).unwrap(), "two runs gave different bytes");
        let mut left: Vec<String> = fs::read_dir(d1.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["db.sqlite"], "journal or temporary files left behind");
        // A stale journal beside the old database goes (SQLite would replay it onto ours).
        fs::write(d1.path().join("db.sqlite-wal"), b"stale").unwrap();
        write_db(&graph(), 1, &p1).unwrap();
        assert!(!d1.path().join("db.sqlite-wal").exists());
        assert!(fs::read(&p1).unwrap() == fs::read(&p2).unwrap());
        // A different registration time changes the bytes (it is really stored).
        let d3 = tempfile::tempdir().unwrap();
        write_db(&graph(), 2, &d3.path().join("db.sqlite")).unwrap();
        assert!(fs::read(&p1).unwrap() != fs::read(d3.path().join("db.sqlite")).unwrap());
    }

    #[test]
    fn rows_are_what_nix_inserts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db.sqlite");
        write_db(&graph(), 1, &p).unwrap();
        let conn = Connection::open(&p).unwrap();
        type Row = (i64, String, String, i64, Option<String>, Option<i64>, Option<i64>, Option<String>, Option<String>);
        let rows: Vec<Row> = conn
            .prepare("select id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths order by id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_string();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].0, rows[0].1.as_str(), rows[0].5), (1, A, None), "narSize 0 is stored as NULL, as Nix does");
        assert_eq!((rows[1].1.as_str(), &rows[1].2, rows[1].5), (B, &empty, Some(7)));
        assert_eq!((rows[2].1.as_str(), &rows[2].2, rows[2].3), (C, &empty, 1));
        assert!(rows.iter().all(|r| r.4.is_none() && r.6.is_none() && r.7.is_none() && r.8.is_none()));
        let refs: Vec<(i64, i64)> =
            conn.prepare("select referrer, reference from Refs order by rowid").unwrap().query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
        assert_eq!(refs, [(2, 1), (2, 3), (3, 1), (3, 3)]);
        let mode: String = conn.query_row("pragma journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        let objects: Vec<String> =
            conn.prepare("select name from sqlite_master order by rowid").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        assert_eq!(
            objects,
            [
                "ValidPaths",
                "sqlite_autoindex_ValidPaths_1",
                "sqlite_sequence",
                "Refs",
                "sqlite_autoindex_Refs_1",
                "IndexReferrer",
                "IndexReference",
                "DeleteSelfRefs",
                "DerivationOutputs",
                "sqlite_autoindex_DerivationOutputs_1",
                "IndexDerivationOutputs"
            ]
        );
        // The trigger works: deleting a self-referencing path is allowed.
        conn.execute_batch("pragma foreign_keys = 1; delete from Refs where referrer = 2; delete from ValidPaths where id = 2;").unwrap();
    }

    #[test]
    fn paths_without_hashes_are_refused() {
        let g = ClosureGraph::parse(format!("{A}\n").as_bytes(), GraphFormat::StorePaths).unwrap();
        let d = tempfile::tempdir().unwrap();
        let e = write_db(&g, 1, &d.path().join("db.sqlite")).unwrap_err().to_string();
        assert!(e.contains("has no narHash"), "{e}");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0, "a failed run left files");
    }

    #[test]
    fn derivation_outputs() {
        let drv = r#"Derive([("dev","/nix/store/x-dev","",""),("out","/nix/store/x","",""),("float","","r:sha256","")],[],["/a\"b"],"x86_64-linux","/bin/sh",[],[])"#;
        assert_eq!(drv_outputs(drv).unwrap(), [("dev".to_string(), "/nix/store/x-dev".to_string()), ("out".into(), "/nix/store/x".into())]);
        assert!(drv_outputs("garbage").is_err());
    }
}
