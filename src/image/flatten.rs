//! Flattening images: the merged filesystem of an image's layers (`stevedore export`, nixpkgs'
//! `exportImage`), computed in memory.
//!
//! Every layer tar is indexed (member metadata and the offset of its data), whiteouts and opaque
//! directories are applied to an in-memory tree, and the result is written sorted, reading file
//! data by offset. Nothing is extracted, so owners and device nodes survive even for an
//! unprivileged builder. Compressed layers (and layers inside a compressed archive) are first
//! decompressed to scratch files, since the tree is written in name order, not layer order.
//!
//! `run-as-root` builds the same tree to lay out the image's root filesystem.

use crate::compress::{Compressor, ParallelEncoder};
use crate::util::io::out_err;
use crate::image::read::{open_image, LayerBlob, Region, Selector};
use crate::tar::read::{Entry as ReadEntry, Reader};
use crate::tar::{self as t, Header};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Reads `len` bytes at `offset` of `file` (an [`io::Read`] over a shared file).
pub struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> At<'a> {
    pub fn new(file: &'a File, offset: u64, len: u64) -> Self {
        At { file, pos: offset, end: offset + len }
    }
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        let k = self.file.read_at(&mut buf[..n], self.pos)?;
        if k == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ends early"));
        }
        self.pos += k as u64;
        Ok(k)
    }
}

/// Paths a flattened image may have: the tree is held in memory (about 250 bytes a path), so
/// this bounds what an image can make us hold.
pub const MAX_PATHS: usize = 2_000_000;

/// What a path in the merged tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// Data: `size` bytes at `offset` of layer `layer`'s tar. Hard links share `inode`.
    File { layer: u32, offset: u64, size: u64, inode: u64 },
    Symlink(Vec<u8>),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// The last layer that put this path or one below it in place: whiteouts and opaque
    /// markers of a layer hide only what lower layers had.
    pub touched: u32,
}

impl Node {
    fn implicit_dir() -> Node {
        Node { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0, touched: 0 }
    }
}

/// Keys of the tree are paths relative to the root with components joined by NUL: NUL sorts
/// before every byte a name can hold, so key order is the order of a walk that visits each
/// directory's entries sorted by name (tar's `--sort=name`), and a directory's descendants
/// are one contiguous key range.
pub const SEP: u8 = 0;

pub fn key_of(components: &[&[u8]]) -> Vec<u8> {
    components.join(&SEP)
}

/// The key of a member name (see [`components`]).
pub fn key_of_name(name: &[u8]) -> Result<Vec<u8>> {
    Ok(components(name)?.join(&SEP))
}

/// The member name of a key: `./a/b`, with a trailing `/` for directories.
pub fn member_name(key: &[u8], dir: bool) -> Vec<u8> {
    let mut name = Vec::with_capacity(key.len() + 3);
    name.extend_from_slice(b"./");
    name.extend(key.iter().map(|&b| if b == SEP { b'/' } else { b }));
    if dir && !key.is_empty() {
        name.push(b'/');
    }
    name
}

fn display_key(key: &[u8]) -> String {
    String::from_utf8_lossy(&member_name(key, false)[2..]).into_owned()
}

/// The merged filesystem of a stack of layers.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: Node,
    pub nodes: BTreeMap<Vec<u8>, Node>,
    next_inode: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Tree { root: Node::implicit_dir(), nodes: BTreeMap::new(), next_inode: 0 }
    }
}

/// Splits a member name into its components ([`crate::tar::name`]'s rule: `.` and empty ones
/// dropped, `..` resolved, never above the root, no NUL).
pub fn components(name: &[u8]) -> Result<Vec<Vec<u8>>> {
    let comps = crate::tar::name::components(name).map_err(|e| anyhow!("member {:?}: {e}", String::from_utf8_lossy(name)))?;
    Ok(comps.into_iter().map(<[u8]>::to_vec).collect())
}

fn descendants_range(key: &[u8]) -> (std::ops::Bound<Vec<u8>>, std::ops::Bound<Vec<u8>>) {
    use std::ops::Bound::*;
    if key.is_empty() {
        return (Unbounded, Unbounded);
    }
    let mut lo = key.to_vec();
    lo.push(SEP);
    let mut hi = key.to_vec();
    hi.push(SEP + 1);
    (Included(lo), Excluded(hi))
}

const OPAQUE: &[u8] = b".wh..wh..opq";
const WH_PREFIX: &[u8] = b".wh.";

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes `key` and everything below it.
    pub fn remove_subtree(&mut self, key: &[u8]) {
        if key.is_empty() {
            self.nodes.clear();
            return;
        }
        self.nodes.remove(key);
        let doomed: Vec<Vec<u8>> = self.nodes.range(descendants_range(key)).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// The keys directly below `dir`, in order.
    pub fn children<'a>(&'a self, dir: &'a [u8]) -> impl Iterator<Item = (&'a Vec<u8>, &'a Node)> + 'a {
        let skip = if dir.is_empty() { 0 } else { dir.len() + 1 };
        self.nodes.range(descendants_range(dir)).filter(move |(k, _)| !k[skip..].contains(&SEP))
    }

    /// Resolves a directory path through the tree's symlinks (kept inside the root, as
    /// container runtimes do when they apply a layer). With `create`, missing directories are
    /// made (0755, root-owned); without, a missing or non-directory path gives `None`.
    fn resolve_dir(&mut self, comps: &[Vec<u8>], create: bool, layer: u32) -> Result<Option<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut queue: VecDeque<Vec<u8>> = comps.iter().cloned().collect();
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            match &c[..] {
                b"" | b"." => continue,
                b".." => {
                    out.pop();
                    continue;
                }
                _ => {}
            }
            out.push(c);
            let key = out.join(&SEP);
            match self.nodes.get(&key).map(|n| &n.kind) {
                Some(Kind::Dir) => {}
                Some(Kind::Symlink(target)) => {
                    hops += 1;
                    if hops > 40 {
                        bail!("{}: too many levels of symbolic links", display_key(&key));
                    }
                    let target = target.clone();
                    out.pop();
                    if target.starts_with(b"/") {
                        out.clear();
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        queue.push_front(part.to_vec());
                    }
                }
                Some(_) if create => bail!("{} is not a directory", display_key(&key)),
                Some(_) => return Ok(None),
                None if create => {
                    self.touch_ancestors(&key, layer);
                    self.nodes.insert(key, Node { touched: layer, ..Node::implicit_dir() });
                }
                None => return Ok(None),
            }
        }
        Ok(Some(out.join(&SEP)))
    }

    fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
        if parent.is_empty() {
            return name.to_vec();
        }
        let mut k = Vec::with_capacity(parent.len() + 1 + name.len());
        k.extend_from_slice(parent);
        k.push(SEP);
        k.extend_from_slice(name);
        k
    }

    /// Marks the ancestors of `key` as touched by `layer`.
    fn touch_ancestors(&mut self, key: &[u8], layer: u32) {
        let mut end = key.len();
        while let Some(i) = key[..end].iter().rposition(|&b| b == SEP) {
            end = i;
            match self.nodes.get_mut(&key[..end]) {
                Some(n) if n.touched != layer => n.touched = layer,
                _ => return,
            }
        }
    }

    fn touched_by(&self, key: &[u8], layer: u32) -> bool {
        self.nodes.get(key).is_some_and(|n| n.touched == layer)
    }

    /// Removes the entries below `dir` that `layer` did not add (an opaque directory).
    fn make_opaque(&mut self, dir: &[u8], layer: u32) {
        let doomed: Vec<Vec<u8>> = self.nodes.range(descendants_range(dir)).filter(|(_, n)| n.touched != layer).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    fn insert(&mut self, key: Vec<u8>, node: Node, layer: u32) {
        let replaced_dir = matches!(self.nodes.get(&key), Some(Node { kind: Kind::Dir, .. }));
        if replaced_dir && node.kind != Kind::Dir {
            self.remove_subtree(&key);
        }
        self.touch_ancestors(&key, layer);
        self.nodes.insert(key, Node { touched: layer, ..node });
    }

    /// Applies layer number `index` (its uncompressed tar in `blob`) on top of the tree.
    pub fn apply_layer(&mut self, index: u32, blob: &LayerBlob) -> Result<()> {
        let ctx = || format!("layer {} ({})", index + 1, blob.what);
        let file = File::open(&blob.path).with_context(|| format!("cannot open {}", blob.path.display()))?;
        let mut ar = Reader::seekable(BufReader::with_capacity(1 << 16, Region::new(file, blob.offset, blob.len)), blob.len);
        while let Some(entry) = ar.next().map_err(|e| anyhow!("{}: not a valid tar: {e}", ctx()))? {
            self.apply_entry(index, &entry).with_context(ctx)?;
            if self.nodes.len() > MAX_PATHS {
                bail!("{}: the image has more than {MAX_PATHS} paths", ctx());
            }
        }
        Ok(())
    }

    fn apply_entry(&mut self, index: u32, entry: &ReadEntry) -> Result<()> {
        let path = &entry.name;
        let mut comps = components(path)?;
        let (mode, uid, gid) = (entry.mode, entry.uid, entry.gid);
        let Some(name) = comps.pop() else {
            // The root itself ("./" or "/"): only its metadata can change.
            if entry.kind == t::DIRTYPE {
                self.root = Node { kind: Kind::Dir, mode, uid, gid, touched: index };
            }
            return Ok(());
        };
        if name.starts_with(WH_PREFIX) {
            let Some(dir) = self.resolve_dir(&comps, false, index)? else { return Ok(()) };
            if name == OPAQUE {
                self.make_opaque(&dir, index);
            } else if !name.starts_with(b".wh..wh.") {
                let target = Self::join(&dir, &name[WH_PREFIX.len()..]);
                if self.touched_by(&target, index) {
                    // This layer re-created what it hides: keep its own entries only.
                    self.make_opaque(&target, index);
                } else {
                    self.remove_subtree(&target);
                }
            }
            // Other `.wh..wh.` names are aufs bookkeeping (hard link directories).
            return Ok(());
        }
        let kind = match entry.kind {
            t::REGTYPE => {
                self.next_inode += 1;
                Kind::File { layer: index, offset: entry.data_offset, size: entry.size, inode: self.next_inode }
            }
            t::DIRTYPE => Kind::Dir,
            t::SYMTYPE => Kind::Symlink(entry.link.clone()),
            t::FIFOTYPE => Kind::Fifo,
            t::CHRTYPE => Kind::Char(entry.devmajor, entry.devminor),
            t::BLKTYPE => Kind::Block(entry.devmajor, entry.devminor),
            t::LNKTYPE => {
                let target = &entry.link;
                let mut tcomps = components(target)?;
                let tname = tcomps.pop().ok_or_else(|| anyhow!("{}: hard link to the root", String::from_utf8_lossy(path)))?;
                let tdir = self.resolve_dir(&tcomps, false, index)?;
                let found = tdir.and_then(|d| self.nodes.get(&Self::join(&d, &tname)).cloned());
                match found {
                    Some(n @ Node { kind: Kind::File { .. } | Kind::Symlink(_), .. }) => {
                        let parent = self.resolve_dir(&comps, true, index)?.unwrap_or_default();
                        self.insert(Self::join(&parent, &name), n, index);
                        return Ok(());
                    }
                    _ => bail!(
                        "{}: hard link to {}, which is not a file of this or a lower layer",
                        String::from_utf8_lossy(path),
                        String::from_utf8_lossy(target)
                    ),
                }
            }
            other => {
                eprintln!("stevedore: warning: skipping {} of unknown type {:?}", String::from_utf8_lossy(path), other as char);
                return Ok(());
            }
        };
        let parent = self.resolve_dir(&comps, true, index)?.unwrap_or_default();
        self.insert(Self::join(&parent, &name), Node { kind, mode, uid, gid, touched: index }, index);
        Ok(())
    }

    /// The merged tree of `layers`, bottom first.
    pub fn from_layers(layers: &[LayerBlob]) -> Result<Tree> {
        let mut tree = Tree::new();
        for (i, blob) in layers.iter().enumerate() {
            tree.apply_layer(i as u32, blob)?;
        }
        Ok(tree)
    }
}

/// Open files of each layer, to read file data by offset.
pub struct LayerData<'a> {
    blobs: &'a [LayerBlob],
    files: Vec<Option<File>>,
}

impl<'a> LayerData<'a> {
    pub fn new(blobs: &'a [LayerBlob]) -> Self {
        LayerData { blobs, files: blobs.iter().map(|_| None).collect() }
    }

    /// A reader of `size` bytes at `offset` of layer `layer`'s tar.
    pub fn reader(&mut self, layer: u32, offset: u64, size: u64) -> Result<At<'_>> {
        let blob = self.blobs.get(layer as usize).ok_or_else(|| anyhow!("internal error: no layer {layer}"))?;
        if offset + size > blob.len {
            bail!("layer {} ({}): a member runs past the end of the layer", layer + 1, blob.what);
        }
        let slot = &mut self.files[layer as usize];
        if slot.is_none() {
            *slot = Some(File::open(&blob.path).with_context(|| format!("cannot open {}", blob.path.display()))?);
        }
        Ok(At::new(slot.as_ref().unwrap(), blob.offset + offset, size))
    }
}


/// The header of a tree node, with numeric owners and a fixed mtime.
pub fn node_header<'a>(name: &'a [u8], node: &'a Node, mtime: i64) -> Header<'a> {
    let (kind, size, link, dev) = match &node.kind {
        Kind::Dir => (t::DIRTYPE, 0, &b""[..], (0, 0)),
        Kind::File { size, .. } => (t::REGTYPE, *size, &b""[..], (0, 0)),
        Kind::Symlink(target) => (t::SYMTYPE, 0, &target[..], (0, 0)),
        Kind::Fifo => (t::FIFOTYPE, 0, &b""[..], (0, 0)),
        Kind::Char(a, b) => (t::CHRTYPE, 0, &b""[..], (*a, *b)),
        Kind::Block(a, b) => (t::BLKTYPE, 0, &b""[..], (*a, *b)),
    };
    Header {
        name,
        mode: node.mode,
        uid: node.uid,
        gid: node.gid,
        size,
        mtime,
        kind,
        linkname: link,
        uname: "",
        gname: "",
        devmajor: dev.0,
        devminor: dev.1,
    }
}

/// Writes the tree as one tar, as `tar -C root --hard-dereference --sort=name --mtime=@MTIME
/// --numeric-owner -cf - .` would: `./` first, then every path in name order, hard links as
/// regular files.
pub fn write_tree<W: Write>(tree: &Tree, layers: &[LayerBlob], w: W, mtime: i64) -> Result<(W, u64)> {
    let mut data = LayerData::new(layers);
    let mut out = crate::tar::write::Writer::new(w);
    out.member(&node_header(b"./", &tree.root, mtime), None)?;
    for (key, node) in &tree.nodes {
        let name = member_name(key, node.kind == Kind::Dir);
        let h = node_header(&name, node, mtime);
        if let Kind::File { layer, offset, size, .. } = node.kind {
            let mut r = data.reader(layer, offset, size)?;
            let what = || format!("{} in layer {}", display_key(key), layer + 1);
            out.member(&h, Some((&mut r, &what)))?;
        } else {
            out.member(&h, None)?;
        }
    }
    let entries = out.members();
    Ok((out.finish()?, entries))
}

/// Writes a file whole or not at all: into a temporary file beside it, renamed when complete.
pub fn write_atomically<T>(path: &Path, write: impl FnOnce(BufWriter<File>) -> Result<(BufWriter<File>, T)>) -> Result<T> {
    crate::util::files::write_atomically(path, write)
}

/// `SOURCE_DATE_EPOCH` if set (as in a Nix build), else 1.
pub fn default_mtime() -> Result<i64> {
    crate::util::settings::get().default_mtime()
}

/// The scratch directory: `--scratch`, else `$TMPDIR`, else `/tmp`.
pub fn scratch_dir(given: Option<&Path>) -> PathBuf {
    given.map(Path::to_owned).unwrap_or_else(|| crate::util::settings::get().temp_dir.clone())
}

/// What `export` writes: an image's flattened filesystem as one tarball.
#[derive(Debug, Clone)]
pub struct Export {
    /// The image: a Docker archive (plain, gzip or zstd), an OCI archive or an OCI layout
    /// directory.
    pub from_image: PathBuf,
    /// Take the image tagged NAME:TAG (default: the first image).
    pub from_image_name: Option<String>,
    /// The tag to go with --from-image-name (default `latest`).
    pub from_image_tag: Option<String>,
    /// The tarball to write (replaced only once complete).
    pub output: PathBuf,
    /// How to compress it: none, gz or zstd.
    pub compressor: Compressor,
    /// Modification time of every member, in seconds since the epoch (default:
    /// $SOURCE_DATE_EPOCH, else 1).
    pub mtime: Option<i64>,
    /// Where to decompress compressed layers (default: $TMPDIR, else /tmp).
    pub scratch: Option<PathBuf>,
    /// Print nothing on stderr but errors.
    pub quiet: bool,
}

/// `stevedore export`: the flattened filesystem of an image as one tarball.
pub fn export(args: &Export) -> Result<()> {
    let started = std::time::Instant::now();
    let compressor = args.compressor;
    let mtime = match args.mtime {
        Some(m) => m,
        None => default_mtime()?,
    };
    let sel = Selector { name: args.from_image_name.clone(), tag: args.from_image_tag.clone() };
    let scratch = scratch_dir(args.scratch.as_deref());
    let image = open_image(&args.from_image, &sel, &scratch, args.quiet)?;
    let tree = Tree::from_layers(&image.layers)?;
    let entries = write_atomically(&args.output, |w| match compressor {
        Compressor::None => write_tree(&tree, &image.layers, w, mtime),
        c => {
            let (enc, n) = write_tree(&tree, &image.layers, ParallelEncoder::new(w, c), mtime)?;
            Ok((enc.finish().map_err(out_err)?, n))
        }
    })?;
    if !args.quiet {
        eprintln!(
            "Exported {} layers as {} entries to {} in {:.2} s",
            image.layers.len(),
            entries,
            args.output.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer tar from (name, kind, data/link) triples, in the given order.
    fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
            h.set_uid(if name.contains("owned") { 1234 } else { 0 });
            h.set_mtime(0);
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
                'f' => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, data.as_bytes()).unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, name, data).unwrap();
                }
                'h' => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, name, data).unwrap();
                }
                _ => unreachable!(),
            }
        }
        b.into_inner().unwrap()
    }

    fn tree_of(layers: &[Vec<u8>]) -> (Tree, Vec<LayerBlob>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<LayerBlob> = layers
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let path = dir.path().join(format!("{i}.tar"));
                std::fs::write(&path, data).unwrap();
                LayerBlob { path, offset: 0, len: data.len() as u64, what: format!("test {i}") }
            })
            .collect();
        (Tree::from_layers(&blobs).unwrap(), blobs, dir)
    }

    fn paths(tree: &Tree) -> Vec<String> {
        tree.nodes.keys().map(|k| display_key(k)).collect()
    }

    fn content(tree: &Tree, blobs: &[LayerBlob], path: &str) -> String {
        let comps: Vec<&[u8]> = path.split('/').map(str::as_bytes).collect();
        let node = &tree.nodes[&key_of(&comps)];
        let Kind::File { layer, offset, size, .. } = node.kind else { panic!("{path} is not a file") };
        let mut s = String::new();
        LayerData::new(blobs).reader(layer, offset, size).unwrap().read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn whiteouts_and_opaque_directories() {
        let base = layer(&[
            ("etc/", 'd', ""),
            ("etc/passwd", 'f', "root"),
            ("gone/", 'd', ""),
            ("gone/deep/", 'd', ""),
            ("gone/deep/file", 'f', "x"),
            ("opq/", 'd', ""),
            ("opq/old", 'f', "old"),
            ("opq/sub/", 'd', ""),
            ("opq/sub/older", 'f', "older"),
            ("keep/", 'd', ""),
            ("keep/a", 'f', "a"),
            ("keep/b", 'f', "b"),
        ]);
        let top = layer(&[
            ("./gone/.wh.deep", 'f', ""),
            ("./keep/.wh.a", 'f', ""),
            ("./opq/", 'd', ""),
            // A same-layer entry sorted before the marker must survive it.
            ("./opq/+new", 'f', "new"),
            ("./opq/.wh..wh..opq", 'f', ""),
            ("./opq/z", 'f', "z"),
            ("./etc/passwd", 'f', "root\napp"),
            ("./.wh.nothing", 'f', ""),
        ]);
        let (tree, blobs, _d) = tree_of(&[base, top]);
        assert_eq!(paths(&tree), ["etc", "etc/passwd", "gone", "keep", "keep/b", "opq", "opq/+new", "opq/z"]);
        assert_eq!(content(&tree, &blobs, "etc/passwd"), "root\napp");
        assert_eq!(content(&tree, &blobs, "opq/+new"), "new");
    }

    #[test]
    fn replacing_kinds_and_symlinked_parents() {
        let base = layer(&[
            ("usr/", 'd', ""),
            ("usr/bin/", 'd', ""),
            ("usr/bin/sh", 'f', "sh"),
            ("bin", 'l', "usr/bin"),
            ("lib", 'l', "/usr/lib"),
            ("d/", 'd', ""),
            ("d/x", 'f', "x"),
            ("f", 'f', "file"),
        ]);
        let top = layer(&[
            // Through a relative symlink: lands in usr/bin.
            ("bin/ls", 'f', "ls"),
            // Through an absolute one to a missing directory: created.
            ("lib/libc.so", 'f', "libc"),
            // A file replaces a directory and everything below it; a directory a file.
            ("d", 'f', "now a file"),
            ("f/", 'd', ""),
            ("f/inner", 'f', "in"),
            // A hard link to a lower layer's file shares its data.
            ("usr/bin/sh2", 'h', "usr/bin/sh"),
        ]);
        let (tree, blobs, _d) = tree_of(&[base, top]);
        assert_eq!(
            paths(&tree),
            ["bin", "d", "f", "f/inner", "lib", "usr", "usr/bin", "usr/bin/ls", "usr/bin/sh", "usr/bin/sh2", "usr/lib", "usr/lib/libc.so"]
        );
        assert_eq!(content(&tree, &blobs, "usr/bin/sh2"), "sh");
        assert_eq!(content(&tree, &blobs, "d"), "now a file");
    }

    #[test]
    fn a_whiteout_hides_lower_layers_only() {
        let base = layer(&[("a/", 'd', ""), ("a/lower", 'f', "l")]);
        // `.wh.a` with `a/` in the same layer: the layer's own `a` stays, the lower one goes.
        let top = layer(&[("a/", 'd', ""), ("a/upper", 'f', "u"), (".wh.a", 'f', "")]);
        let (tree, _b, _d) = tree_of(&[base, top]);
        assert_eq!(paths(&tree), ["a", "a/upper"]);
    }

    #[test]
    fn export_order_is_tar_sort_name() {
        let base = layer(&[("a-b/", 'd', ""), ("a/", 'd', ""), ("a/z", 'f', "z"), ("a.c", 'f', "")]);
        let (tree, blobs, _d) = tree_of(&[base]);
        let (out, n) = write_tree(&tree, &blobs, Vec::new(), 7).unwrap();
        assert_eq!(n, 5);
        let mut ar = tar::Archive::new(&out[..]);
        let names: Vec<String> = ar.entries().unwrap().map(|e| String::from_utf8(e.unwrap().path_bytes().to_vec()).unwrap()).collect();
        // Component order: "a" and its contents before "a-b" and "a.c".
        assert_eq!(names, ["./", "./a/", "./a/z", "./a-b/", "./a.c"]);
    }
}
