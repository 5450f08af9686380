//! Rules the source itself must keep. Two: the library reads no environment variables and
//! no clap (only the front ends do), and every `unsafe` block, `unsafe impl`,
//! `unsafe fn` and `unsafe trait` under src/ says why it is sound, in a comment directly
//! above it that has `SAFETY:` (for an unsafe fn or trait, a `# Safety` doc section does
//! too), as clippy's `undocumented_unsafe_blocks` asks. A new one without fails here, named
//! by file and line.
//!
//! "Directly above": the comment lines right over the line with `unsafe` (no blank line
//! between), or over the start of its statement when `unsafe` is on one of its first few
//! continuation lines; a comment covers only the first `unsafe` below it. `unsafe` in
//! comments, doc comments, string and char literals is not code and is ignored, and so are
//! `unsafe fn(..)` pointer types.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Block,
    Impl,
    Fn,
    Trait,
    ExternBlock,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Block => "unsafe block",
            Kind::Impl => "unsafe impl",
            Kind::Fn => "unsafe fn",
            Kind::Trait => "unsafe trait",
            Kind::ExternBlock => "unsafe extern block",
        }
    }

    /// Items whose doc may say it in a `# Safety` section instead.
    fn has_doc(self) -> bool {
        matches!(self, Kind::Fn | Kind::Trait)
    }
}

/// The source as lines of code (comments and the insides of string and char literals made
/// blanks) and lines of comment text (everything else blanks), in step.
struct Split {
    code: Vec<String>,
    comments: Vec<String>,
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn split(src: &str) -> Split {
    #[derive(Clone, Copy, PartialEq)]
    enum Out {
        Code,
        Comment,
        Literal,
    }
    let c: Vec<char> = src.chars().collect();
    let (mut code, mut comments) = (String::new(), String::new());
    let mut put = |ch: char, out: Out| {
        if ch == '\n' {
            code.push('\n');
            comments.push('\n');
            return;
        }
        code.push(if out == Out::Code { ch } else { ' ' });
        comments.push(if out == Out::Comment { ch } else { ' ' });
    };
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let starts_token = i == 0 || !is_ident(c[i - 1]);
        // A raw string (r"..", r#".."#, br"..", cr#".."#; not a raw identifier, r#type): its
        // prefix's length and its number of hashes.
        let raw = (starts_token && (ch == 'r' || ((ch == 'b' || ch == 'c') && at(i + 1) == 'r')))
            .then(|| {
                let prefix = if ch == 'r' { 1 } else { 2 };
                let hashes = (i + prefix..c.len()).take_while(|&j| c[j] == '#').count();
                (at(i + prefix + hashes) == '"').then_some((prefix, hashes))
            })
            .flatten();
        if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                put(c[i], Out::Comment);
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            // Block comments nest.
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    put('/', Out::Comment);
                    put('*', Out::Comment);
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    put('*', Out::Comment);
                    put('/', Out::Comment);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    put(c[i], Out::Comment);
                    i += 1;
                }
            }
        } else if let Some((prefix, hashes)) = raw {
            for _ in 0..prefix + hashes + 1 {
                put(c[i], Out::Code);
                i += 1;
            }
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#')) {
                put(c[i], Out::Literal);
                i += 1;
            }
            for _ in 0..=hashes {
                if i < c.len() {
                    put(c[i], Out::Code);
                    i += 1;
                }
            }
        } else if ch == '"' {
            put('"', Out::Code);
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    put(c[i], Out::Literal);
                    i += 1;
                }
                put(c[i], Out::Literal);
                i += 1;
            }
            if i < c.len() {
                put('"', Out::Code);
                i += 1;
            }
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\'', '\u{..}'), or else a lifetime or label ('a).
            let end = if at(i + 1) == '\\' {
                (i + 3..c.len().min(i + 12)).find(|&j| c[j] == '\'')
            } else if at(i + 1) != '\n' && at(i + 2) == '\'' {
                Some(i + 2)
            } else {
                None
            };
            put('\'', Out::Code);
            i += 1;
            if let Some(end) = end {
                while i < end {
                    put(c[i], Out::Literal);
                    i += 1;
                }
                put('\'', Out::Code);
                i += 1;
            }
        } else {
            put(ch, Out::Code);
            i += 1;
        }
    }
    let lines = |s: String| s.split('\n').map(str::to_string).collect::<Vec<_>>();
    Split { code: lines(code), comments: lines(comments) }
}

/// The first word or punctuation at or after byte `col` of `line` in the code, across lines,
/// and where it ends.
fn next_token(code: &[String], mut line: usize, mut col: usize) -> (String, usize, usize) {
    loop {
        if let Some(p) = code[line][col..].find(|c: char| !c.is_whitespace()) {
            let start = col + p;
            let tail = &code[line][start..];
            let first = tail.chars().next().unwrap();
            let len = if is_ident(first) { tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len()) } else { first.len_utf8() };
            return (tail[..len].to_string(), line, start + len);
        }
        if line + 1 == code.len() {
            return (String::new(), line, code[line].len());
        }
        line += 1;
        col = 0;
    }
}

/// Byte offsets of the word `unsafe` in a line of code.
fn unsafe_words(code: &str) -> impl Iterator<Item = usize> + '_ {
    code.match_indices("unsafe").map(|(p, _)| p).filter(|&p| {
        let before = code[..p].chars().next_back();
        let after = code[p + "unsafe".len()..].chars().next();
        !matches!(before, Some(c) if is_ident(c)) && !matches!(after, Some(c) if is_ident(c))
    })
}

/// What `unsafe` at (line, col) introduces, if it is something that must be documented.
fn kind_at(code: &[String], line: usize, col: usize) -> Option<Kind> {
    let (mut word, mut l, mut c) = next_token(code, line, col + "unsafe".len());
    if word == "extern" {
        (word, l, c) = next_token(code, l, c);
        if word == "\"" {
            // The ABI string (its inside blanked): skip to its closing quote.
            let close = code[l][c..].find('"').map(|p| c + p + 1).unwrap_or(code[l].len());
            (word, l, c) = next_token(code, l, close);
        }
        if word == "{" {
            return Some(Kind::ExternBlock);
        }
    }
    match word.as_str() {
        "{" => Some(Kind::Block),
        "impl" => Some(Kind::Impl),
        "trait" => Some(Kind::Trait),
        // `unsafe fn(u8) -> u8` is a pointer type, not a function.
        "fn" => (next_token(code, l, c).0 != "(").then_some(Kind::Fn),
        // Attributes (`#[unsafe(no_mangle)]`), macro input: nothing to document here.
        _ => None,
    }
}

/// Whether the comment lines right above `line` (past up to three continuation lines of the
/// same statement, and attributes for items) say why the unsafe thing at `line` is sound.
fn documented(s: &Split, line: usize, kind: Kind) -> bool {
    let says = |comment: &str| comment.contains("SAFETY:") || (kind.has_doc() && comment.contains("# Safety"));
    if says(&s.comments[line]) {
        return true;
    }
    let mut continuation = 0;
    let mut l = line;
    while l > 0 {
        l -= 1;
        let code = s.code[l].trim();
        let comment = s.comments[l].trim();
        if code.is_empty() && comment.is_empty() {
            return false; // a blank line: nothing directly above
        }
        if code.is_empty() {
            // The comment block: all of it, up to the code or blank line above.
            let mut k = l;
            loop {
                if says(&s.comments[k]) {
                    return true;
                }
                if k == 0 || !s.code[k - 1].trim().is_empty() || s.comments[k - 1].trim().is_empty() {
                    return false;
                }
                k -= 1;
            }
        }
        if kind != Kind::Block && code.starts_with("#[") {
            continue; // an attribute of the item
        }
        // An earlier line of the same statement goes on to this one: it ends in none of `;`,
        // `{`, `}`, and has no `unsafe` of its own (whose comment it would be).
        let ends_statement = code.ends_with(';') || code.ends_with('{') || code.ends_with('}');
        continuation += 1;
        if ends_statement || unsafe_words(code).next().is_some() || continuation > 3 {
            return false;
        }
        if says(comment) {
            return true;
        }
    }
    false
}

/// Every unsafe site in `src`: (line, from 1; what; documented).
fn sites(src: &str) -> Vec<(usize, Kind, bool)> {
    let s = split(src);
    let mut found = Vec::new();
    for (line, code) in s.code.iter().enumerate() {
        for col in unsafe_words(code) {
            if let Some(kind) = kind_at(&s.code, line, col) {
                found.push((line + 1, kind, documented(&s, line, kind)));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_unsafe_says_why_it_is_sound() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(!files.is_empty());
    let mut problems = Vec::new();
    let mut count = 0;
    for file in &files {
        let src = fs::read_to_string(file).unwrap();
        for (line, kind, documented) in sites(&src) {
            count += 1;
            if !documented {
                let name = file.strip_prefix(root).unwrap_or(file).display();
                problems.push(format!("{name}:{line}: {} without a `// SAFETY:` comment directly above it", kind.name()));
            }
        }
    }
    assert!(problems.is_empty(), "{} of {count} unsafe sites do not say why they are sound:\n{}", problems.len(), problems.join("\n"));
}

/// Front ends resolve the environment and the command line into typed options
/// (`src/cli/environment.rs` into `util::settings`); the library below them reads neither.
/// The builder reads the variables Nix gives a builder (`NIX_ATTRS_JSON_FILE`, `NIX_BUILD_TOP`).
#[test]
fn only_front_ends_read_the_environment_or_clap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let name = file.strip_prefix(root).unwrap_or(file).to_string_lossy().into_owned();
        if name.starts_with("src/cli/") || name == "src/main.rs" {
            continue;
        }
        let src = fs::read_to_string(file).unwrap();
        let raw: Vec<&str> = src.lines().collect();
        for (i, line) in split(&src).code.iter().enumerate() {
            let compact: String = line.split_whitespace().collect();
            let env = ["env::var(", "env::var_os(", "env::vars(", "env::vars_os(", "env::temp_dir("].iter().any(|p| compact.contains(p));
            let builder_var = name.starts_with("src/builder/") && ["\"NIX_ATTRS_JSON_FILE\"", "\"NIX_BUILD_TOP\""].iter().any(|v| raw.get(i).is_some_and(|l| l.contains(v)));
            if env && !builder_var {
                problems.push(format!("{name}:{}: reads the environment (put it in util::settings, read by src/cli/environment.rs)", i + 1));
            }
            if compact.contains("clap::") {
                problems.push(format!("{name}:{}: uses clap outside src/cli", i + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself, on small sources.
#[test]
fn the_checker_finds_what_it_should() {
    let lines = |src: &str| sites(src).into_iter().filter(|s| !s.2).map(|s| s.0).collect::<Vec<_>>();
    // Documented: right above, over a long comment, over the statement's first line, on the
    // same line, and an unsafe fn by its doc.
    let good = r#####"
fn a() {
    // SAFETY: fine.
    unsafe { f() };
    // SAFETY: fine, for reasons
    // that take two lines.
    let x = match unsafe { g() } {
        _ => 1,
    };
    // SAFETY: the call's argument.
    let y = h(
        1,
        unsafe { i() },
    );
    let z = unsafe { j() }; // SAFETY: trailing.
}

/// Does things.
///
/// # Safety
///
/// Only on Tuesdays.
#[inline]
pub unsafe fn b() {}

// SAFETY: no fields.
unsafe impl Send for T {}

type F = unsafe fn(u8) -> u8;
type G = unsafe extern "C" fn(u8) -> u8;
"#####;
    let kinds = |src: &str| sites(src).into_iter().map(|s| s.1).collect::<Vec<_>>();
    assert_eq!(kinds(good), [Kind::Block, Kind::Block, Kind::Block, Kind::Block, Kind::Fn, Kind::Impl]);
    assert_eq!(lines(good), Vec::<usize>::new());
    // Not code: comments, doc comments, strings, raw strings, chars next to lifetimes.
    let not_code = r#####"
//! unsafe { in a module doc }
/// ```
/// unsafe { in an example }
/// ```
/* unsafe { /* nested */ unsafe { } } */
fn c<'a>(x: &'a str) -> char {
    let s = "unsafe { in a string \" still }";
    let r = r#"unsafe { "raw" }"#;
    let b = br##"unsafe {"# }"##;
    let q = '\'';
    let u = '"'; let v = "unsafe {";
    'outer: loop { break 'outer; }
    'x'
}
"#####;
    assert_eq!(kinds(not_code), []);
    // Undocumented: none at all, after a blank line, a comment already used by the unsafe
    // above, a plain comment, an unsafe fn and impl without one.
    let bad = r#####"
fn d() {
    unsafe { f() };
    // SAFETY: for g.

    unsafe { g() };
    // SAFETY: for h.
    unsafe { h() };
    unsafe { i() };
    // Calls j.
    unsafe { j() };
    let s = "}"; unsafe { k() };
}

/// No safety section.
pub unsafe fn e() {}

unsafe impl Sync for T {}
"#####;
    assert_eq!(lines(bad), vec![3, 6, 9, 11, 12, 16, 18]);
}
