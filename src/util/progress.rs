//! Progress on stderr: what is being done, how many bytes, how fast. Stdout carries only the
//! product.

use std::time::Instant;

/// Progress on stderr: nixpkgs' lines, then how much and how fast.
pub struct Progress {
    pub quiet: bool,
}

impl Progress {
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", line.as_ref());
        }
    }

    pub fn done(&self, what: &str, bytes: u64, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        let mib = bytes as f64 / (1024.0 * 1024.0);
        self.say(format!("  {what}: {mib:.1} MiB in {secs:.2} s ({:.0} MiB/s)", mib / secs.max(1e-6)));
    }
}
