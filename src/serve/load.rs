//! `stevedore load`: an image into a local runtime, sending only the layers it lacks. The image
//! is served on a loopback port for the length of one pull by the runtime itself (`podman pull`,
//! `docker pull`, `ctr images pull`): every runtime already skips the layers it has when it
//! pulls (containers-storage and Docker by diff_id, containerd by digest, and our layers'
//! digests are their diff_ids), and asks for a layer it lost. The pulled image is then tagged as
//! `podman load` / `docker load` would name it, and the loopback name dropped.

use super::{ServeOptions, Served};
use crate::util::progress::Progress;
use crate::util::shared::Choice;
use anyhow::{anyhow, bail, Result};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Which runtime gets the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Podman,
    Docker,
    Containerd,
}

impl crate::util::shared::Choice for Runtime {
    const CHOICES: &'static [(&'static str, Self, &'static str)] = &[
        ("podman", Runtime::Podman, "containers-storage, through podman"),
        ("docker", Runtime::Docker, "the Docker daemon (either image store)"),
        ("containerd", Runtime::Containerd, "containerd, through ctr"),
    ];
}

pub struct LoadOptions {
    pub runtime: Runtime,
    /// The name to give the image (`NAME:TAG`); the conf's repo_tag if None.
    pub name: Option<String>,
    /// containerd's namespace.
    pub namespace: String,
}

fn run(program: &str, args: &[&str], what: &str) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run {program} to {what}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        bail!("{program} {} failed ({}): {last}", args.first().copied().unwrap_or(""), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads `source` into the runtime: a stream conf, or an image on disk (a Docker archive, an
/// OCI layout or archive, as `serve` takes them), which must then be named.
pub fn load(source: &str, opts: &LoadOptions, progress: &Progress) -> Result<()> {
    let started = Instant::now();
    let served = match &opts.name {
        Some(n) => Served::parse(&format!("{n}={source}"))?,
        None => Served::parse(source)?,
    };
    // An image on disk without -t fails in parse, which asks for a name.
    let target = served.repo_tag.clone();
    crate::image::reference::check_repo_tag(&target).map_err(|e| anyhow!("image name {target}: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| anyhow!("cannot listen on a loopback port: {e}"))?;
    let addr = listener.local_addr()?;
    let source = format!("{addr}/{}:{}", served.name, served.tag);
    let server = super::Server::new(vec![served], Progress { quiet: true });
    let stats = server.stats.clone();
    let opts_serve = ServeOptions { max_connections: 16, timeout: Duration::from_secs(60) };
    // The server lives until the process ends; the pull is its only client.
    std::thread::spawn(move || server.run(listener, opts_serve));
    progress.say(format!("{} pulls {target} from {addr}", opts.runtime.name()));
    match opts.runtime {
        Runtime::Podman => {
            run("podman", &["pull", "-q", "--tls-verify=false", &source], "pull the image")?;
            run("podman", &["tag", &source, &target], "name the image")?;
            run("podman", &["untag", &source, &source], "drop the loopback name")?;
        }
        Runtime::Docker => {
            // Docker takes plain HTTP from 127.0.0.0/8 registries without being told.
            run("docker", &["pull", "-q", &source], "pull the image")?;
            run("docker", &["tag", &source, &target], "name the image")?;
            run("docker", &["rmi", &source], "drop the loopback name")?;
        }
        Runtime::Containerd => {
            let ns = opts.namespace.as_str();
            let full = crate::image::reference::normalized_repo_tag(&target).map_err(|e| anyhow!("image name {target}: {e:#}"))?;
            run("ctr", &["-n", ns, "images", "pull", "--plain-http", &source], "pull the image")?;
            run("ctr", &["-n", ns, "images", "tag", "--force", &source, &full], "name the image")?;
            run("ctr", &["-n", ns, "images", "rm", &source], "drop the loopback name")?;
        }
    }
    let (layers, bytes) = (stats.layers.load(Ordering::Relaxed), stats.layer_bytes.load(Ordering::Relaxed));
    // Our own peak, not the runtime's (a child): what a caller budgets for.
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().to_string())))
        .unwrap_or_default();
    progress.say(format!(
        "loaded {target} into {}: {layers} layers sent ({:.1} MiB), the others it had; {:.2} s, peak RSS {peak} KiB",
        opts.runtime.name(),
        bytes as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
