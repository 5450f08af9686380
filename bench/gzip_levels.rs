//! Single-thread speed and ratio of gzip layer compression at each zlib-rs level, with and
//! without storing incompressible sub-blocks, over the files given (tars): run by
//! bench/gzip-levels.

use std::time::Instant;
use stevedore::compress::{deflate_piece_with, GZIP_LEVEL};

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: gzip_levels FILE...");
        std::process::exit(2);
    }
    println!("{:<14} {:>5} {:>6} {:>9} {:>7}", "input", "level", "stored", "MB/s", "ratio");
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("cannot read {f}: {e}"));
        let name = std::path::Path::new(f).file_name().unwrap().to_string_lossy().into_owned();
        for (level, store) in [(1, false), (3, false), (4, false), (6, false), (9, false), (4, true), (6, true)] {
            let started = Instant::now();
            let mut out = 0;
            // 1 MiB pieces, as layers are cut.
            for piece in data.chunks(1 << 20) {
                out += deflate_piece_with(piece, false, level, store).expect("deflate").len();
            }
            let secs = started.elapsed().as_secs_f64();
            let mark = if level == GZIP_LEVEL && store { " <- default" } else { "" };
            println!(
                "{name:<14} {level:>5} {:>6} {:>9.0} {:>7.3}{mark}",
                if store { "yes" } else { "no" },
                data.len() as f64 / 1e6 / secs,
                out as f64 / data.len() as f64
            );
        }
    }
}
