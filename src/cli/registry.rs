//! The registry commands: push, pull, prefetch, index, serve.

use super::choice;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use stevedore::compress::Compressor;
use stevedore::registry::referrers::Attachment;
use stevedore::registry::source::Source;
use stevedore::registry::{self, Connect, ManifestFormat, Prefetch, Pull, PullFormat, Push, WantedPlatform};
use stevedore::supply_chain::sign::Key;
use stevedore::supply_chain::SbomFormat;
use stevedore::util::limits::{read_limited, INPUT_LIMIT};
use stevedore::util::progress::Progress;

#[derive(clap::Args)]
pub struct PushCmd {
    /// What to push: a stream conf JSON file, an OCI layout (`oci:DIR[:REF]` or a directory),
    /// an oci-archive (`oci-archive:FILE[:REF]`) or a Docker archive
    /// (`docker-archive:FILE[:NAME:TAG|:@N]`, picking one image of several); a plain file is
    /// recognized by its contents.
    pub source: String,
    /// Where: `docker://REGISTRY/REPO[:TAG]` (tag `latest` if none).
    pub dest: String,
    #[command(flatten)]
    pub push: PushOpts,
    /// Attach an SBOM of the image (a conf's: as `stevedore sbom` makes it, path infos from
    /// the conf's closure graph, else the Nix database) as an OCI 1.1 artifact whose subject
    /// is the pushed manifest.
    #[arg(long, value_parser = choice::<SbomFormat>(), value_name = "cyclonedx|spdx")]
    pub sbom: Option<SbomFormat>,
    /// Attach this document as an OCI 1.1 artifact whose subject is the pushed manifest: a
    /// CycloneDX or SPDX JSON SBOM (passthru.sbom) or an in-toto statement, told by its
    /// content (repeatable).
    #[arg(long, value_name = "FILE")]
    pub attach: Vec<PathBuf>,
    /// Sign the pushed manifest as `cosign sign --key` does (a `sha256-HEX.sig` tag, which
    /// `cosign verify --key` checks): KEY is a private key file or `env://VAR` (cosign's
    /// encrypted key, opened with $COSIGN_PASSWORD, or an unencrypted P-256 PEM key).
    #[arg(long, value_name = "KEY")]
    pub sign: Option<String>,
    /// Attest this SLSA provenance v1 predicate (passthru.provenance, `stevedore provenance`)
    /// of the pushed manifest as `cosign attest` does (a DSSE envelope signed with the --sign
    /// key, in the `sha256-HEX.att` manifest), for `cosign verify-attestation --type
    /// slsaprovenance1`.
    #[arg(long, value_name = "FILE", requires = "sign")]
    pub provenance: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(clap::Args)]
pub struct PushOpts {
    /// Try to mount missing blobs from this repository of the same registry (repeatable).
    #[arg(long = "mount-from", value_name = "REPO")]
    pub mount_from: Vec<String>,
    /// How layers made from a conf or a Docker archive are compressed: none, gz or zstd.
    #[arg(long, default_value = "gz", value_name = "none|gz|zstd")]
    pub compressor: String,
    /// Deflate level of gz layers, 1 (fastest) to 9 (smallest; about a quarter the speed and
    /// 5% smaller than the default 4). Other levels make other blobs, with digests of their own.
    #[arg(long, value_name = "1-9")]
    pub gzip_level: Option<u32>,
    /// Blobs larger than this many bytes are uploaded in PATCH chunks of this size (suffixes
    /// K, M, G); smaller ones in one PUT.
    #[arg(long, default_value = "64M", value_name = "BYTES")]
    pub chunk_size: String,
    /// Manifest media types: OCI, or Docker's schema 2 (manifest lists for indexes), for
    /// clients that read only those; v2s2 has no zstd layers.
    #[arg(long, value_parser = choice::<ManifestFormat>(), default_value = "oci", value_name = "oci|v2s2")]
    pub manifest_format: ManifestFormat,
}

#[derive(clap::Args)]
pub struct PlatformOpts {
    /// Operating system to pick from a multi-platform image.
    #[arg(long, default_value = "linux")]
    pub os: String,
    /// Architecture to pick (default: this machine's, in Go's names: amd64, arm64, ...).
    #[arg(long)]
    pub arch: Option<String>,
    /// CPU variant to pick (e.g. v7 for arm, v8 for arm64).
    #[arg(long)]
    pub variant: Option<String>,
}


#[derive(clap::Args)]
pub struct PullCmd {
    /// `docker://REGISTRY/REPO[:TAG|@DIGEST]`
    pub image: String,
    #[command(flatten)]
    pub platform: PlatformOpts,
    /// Output format: a Docker archive (skopeo's docker-archive, byte for byte: layers
    /// decompressed) or an OCI layout directory.
    #[arg(long, value_parser = choice::<PullFormat>(), default_value = "docker-archive")]
    pub format: PullFormat,
    /// Output file (docker-archive) or directory (oci).
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Image name recorded in the output (default: the reference's, as written).
    #[arg(long, value_name = "NAME")]
    pub image_name: Option<String>,
    /// Tag recorded in the output (default: the reference's tag, or `latest`).
    #[arg(long, value_name = "TAG")]
    pub image_tag: Option<String>,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(clap::Args)]
pub struct PrefetchCmd {
    /// `docker://REGISTRY/REPO[:TAG|@DIGEST]`
    pub image: String,
    #[command(flatten)]
    pub platform: PlatformOpts,
    /// finalImageName for pullImage (default: the image name).
    #[arg(long, value_name = "NAME")]
    pub final_image_name: Option<String>,
    /// finalImageTag for pullImage (default: the reference's tag, or `latest`).
    #[arg(long, value_name = "TAG")]
    pub final_image_tag: Option<String>,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(clap::Args)]
pub struct VerifyCmd {
    /// The image: `docker://REGISTRY/REPO[:TAG|@DIGEST]` (pulled into a scratch layout, the
    /// conf's platform picked from an index), a Docker archive
    /// (`docker-archive:FILE[:NAME:TAG|:@N]`), an oci-archive or an OCI layout directory.
    pub image: String,
    /// The stream conf the image should have been made from.
    #[arg(long, value_name = "CONF")]
    pub against: PathBuf,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

#[derive(clap::Args)]
pub struct IndexCmd {
    /// Where to push the index: `docker://REGISTRY/REPO[:TAG]`.
    pub dest: String,
    /// Per-platform images: `docker://` references on the same registry (already pushed), or
    /// sources (as for push), which are pushed to the destination repository first.
    #[arg(required = true)]
    pub images: Vec<String>,
    #[command(flatten)]
    pub push: PushOpts,
    #[command(flatten)]
    pub connect: ConnectOpts,
}

/// Connection options shared by the subcommands.
#[derive(clap::Args)]
pub struct ConnectOpts {
    /// USER:PASSWORD for the registry (else the auth files: $REGISTRY_AUTH_FILE,
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, ~/.docker/config.json,
    /// with their credential helpers: credHelpers, credsStore).
    #[arg(long, value_name = "USER:PASS")]
    pub creds: Option<String>,
    /// Allow plain HTTP and unverified TLS (like skopeo's --tls-verify=false).
    #[arg(long)]
    pub insecure: bool,
    /// How many times to retry a request that failed with a connection error, 5xx or 429 (one
    /// that timed out is retried once at most; the timeout is STEVEDORE_REGISTRY_TIMEOUT
    /// seconds, 60 by default).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub retries: u32,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

impl PushOpts {
    fn resolve(&self) -> Result<Push> {
        Ok(Push { mount_from: self.mount_from.clone(), compressor: Compressor::parse(&self.compressor)?.with_gzip_level(self.gzip_level)?, chunk_size: registry::parse_size(&self.chunk_size)?, manifest_format: self.manifest_format })
    }
}

impl PlatformOpts {
    fn resolve(&self) -> WantedPlatform {
        WantedPlatform { os: self.os.clone(), arch: self.arch.clone(), variant: self.variant.clone() }
    }
}

impl ConnectOpts {
    fn resolve(&self) -> Connect {
        Connect { creds: self.creds.clone(), insecure: self.insecure, retries: self.retries, quiet: self.quiet }
    }
}

impl PushCmd {
    pub fn run(self) -> Result<()> {
        let push = self.push.resolve()?;
        let connect = self.connect.resolve();
        // Every document is made or read before anything is sent.
        let mut attachments = Vec::new();
        if let Some(format) = self.sbom {
            let conf = match Source::parse(&self.source)? {
                Source::Conf(path) => path,
                _ => bail!("--sbom: {} is not a conf; give the image's SBOM with --attach FILE (passthru.sbom)", self.source),
            };
            let doc = super::supply_chain::sbom_of_conf(&conf, None, None, Vec::new(), format, &Progress { quiet: connect.quiet })?;
            attachments.push(Attachment::detect("--sbom", doc.into_bytes())?);
        }
        for file in &self.attach {
            let bytes = read_limited(file, INPUT_LIMIT).map_err(|e| anyhow!("--attach {}: {e:#}", file.display()))?;
            attachments.push(Attachment::detect(&file.display().to_string(), bytes)?);
        }
        let provenance = match &self.provenance {
            None => None,
            Some(file) => {
                let bytes = read_limited(file, INPUT_LIMIT).map_err(|e| anyhow!("--provenance {}: {e:#}", file.display()))?;
                Some(stevedore::supply_chain::provenance::parse_predicate(&format!("--provenance {}", file.display()), &bytes)?)
            }
        };
        let key = self.sign.as_deref().map(signing_key).transpose()?;
        println!("{}", registry::push(&self.source, &self.dest, &push, &attachments, key.as_ref(), provenance.as_ref(), &connect)?);
        Ok(())
    }
}

/// The key `--sign` names, opened before anything is sent. Neither the key nor the passphrase
/// appears in an error.
fn signing_key(spec: &str) -> Result<Key> {
    let text = match spec.strip_prefix("env://") {
        Some(var) => std::env::var(var).map_err(|_| anyhow!("--sign env://{var}: the variable is unset or not UTF-8"))?,
        None => {
            let bytes = read_limited(Path::new(spec), 1 << 20).map_err(|e| anyhow!("--sign {spec}: {e:#}"))?;
            String::from_utf8(bytes).map_err(|_| anyhow!("--sign {spec}: not a PEM file (not UTF-8)"))?
        }
    };
    let passphrase = std::env::var_os("COSIGN_PASSWORD").map(|p| p.into_encoded_bytes());
    Key::from_pem(&text, passphrase.as_deref()).map_err(|e| match passphrase {
        None if text.contains("ENCRYPTED") => anyhow!("--sign {spec}: {e:#} (the key is encrypted: set COSIGN_PASSWORD)"),
        _ => anyhow!("--sign {spec}: {e:#}"),
    })
}

impl VerifyCmd {
    /// Prints `identical ...` and exits 0, or what differs and exits 1; as cmp and diff do,
    /// trouble (an unreadable image, a registry error) exits 2.
    pub fn run(self) -> Result<()> {
        let scratch = stevedore::util::files::TempDir::new_in(&stevedore::util::settings::get().temp_dir)?;
        let outcome = self.compare(scratch.path());
        drop(scratch);
        match outcome {
            Ok(None) => Ok(()),
            Ok(Some(lines)) => {
                println!("differs from {}:", self.against.display());
                for l in lines {
                    println!("  {l}");
                }
                stevedore::util::files::exit(1, || {})
            }
            Err(e) => stevedore::util::files::exit(2, || eprintln!("stevedore: {e:#}")),
        }
    }

    /// None if identical (said on stdout), else the lines that say what differs.
    fn compare(&self, scratch: &Path) -> Result<Option<Vec<String>>> {
        use stevedore::image::conf::{self, StreamConf};
        use stevedore::supply_chain::verify::{verify, Verdict};
        let progress = Progress { quiet: self.connect.quiet };
        let conf = StreamConf::load(&self.against, &conf::now()).map_err(|e| anyhow!("--against {}: {e:#}", self.against.display()))?;
        let (path, pick) = if self.image.starts_with("docker://") {
            let output = scratch.join("image");
            let platform = WantedPlatform { os: conf.os.clone(), arch: Some(conf.architecture.clone()), variant: None };
            let pull = Pull { image: self.image.clone(), platform, format: PullFormat::Oci, output: output.clone(), image_name: None, image_tag: None };
            registry::pull(&pull, &self.connect.resolve())?;
            (output, None)
        } else {
            match Source::parse(&self.image)? {
                Source::Conf(p) => bail!("{}: a conf, not an image (give it as --against)", p.display()),
                Source::OciDir(p, None) | Source::OciArchive(p, None) => (p, None),
                Source::OciDir(p, Some(r)) | Source::OciArchive(p, Some(r)) => bail!("{}: picking image {r:?} of a layout is not supported: give a layout with one image", p.display()),
                Source::DockerArchive(p, pick) => (p, pick),
            }
        };
        match verify(&conf, &path, pick.as_ref(), &progress)? {
            Verdict::Identical { config, layers } => {
                println!("identical: config {config}, {layers} layers, as {} makes them", self.against.display());
                Ok(None)
            }
            Verdict::Differs(lines) => Ok(Some(lines)),
        }
    }
}

impl PullCmd {
    pub fn run(self) -> Result<()> {
        let pull = Pull {
            image: self.image,
            platform: self.platform.resolve(),
            format: self.format,
            output: self.output,
            image_name: self.image_name,
            image_tag: self.image_tag,
        };
        println!("{}", registry::pull(&pull, &self.connect.resolve())?);
        Ok(())
    }
}

impl PrefetchCmd {
    pub fn run(self) -> Result<()> {
        let prefetch = Prefetch {
            image: self.image,
            platform: self.platform.resolve(),
            final_image_name: self.final_image_name,
            final_image_tag: self.final_image_tag,
        };
        print!("{}", registry::prefetch(&prefetch, &self.connect.resolve())?);
        Ok(())
    }
}

impl IndexCmd {
    pub fn run(self) -> Result<()> {
        println!("{}", registry::index(&self.dest, &self.images, &self.push.resolve()?, &self.connect.resolve())?);
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct ServeCmd {
    /// Images to serve, each `[NAME[:TAG]=]SOURCE`: a stream conf (streamLayeredImage's
    /// `conf`, or any conf file), re-read at every manifest request, whose repo_tag names it
    /// without NAME; or, named, a Docker archive, an OCI layout or an oci-archive.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Address to listen on; port 0 picks a free one. The address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:5000", value_name = "HOST:PORT")]
    pub listen: String,
    /// Connections served at once; more wait their turn.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_connections: usize,
    /// Print nothing on stderr but errors (otherwise a line per request).
    #[arg(short, long)]
    pub quiet: bool,
}

impl ServeCmd {
    pub fn run(self) -> Result<()> {
        use stevedore::serve;
        let images = self.images.iter().map(|i| serve::Served::parse(i)).collect::<Result<Vec<_>>>()?;
        let listener = std::net::TcpListener::bind(&self.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", self.listen))?;
        let addr = listener.local_addr()?;
        {
            use std::io::Write as _;
            let mut out = std::io::stdout();
            writeln!(out, "{addr}")?;
            out.flush()?;
        }
        let progress = stevedore::util::progress::Progress { quiet: self.quiet };
        for i in &images {
            progress.say(format!("serving {addr}/{}:{} from {}", i.name, i.tag, i.what()));
        }
        let opts = serve::ServeOptions { max_connections: self.max_connections, timeout: std::time::Duration::from_secs(60) };
        serve::Server::new(images, progress).run(listener, opts)
    }
}

#[derive(clap::Args)]
pub struct LoadCmd {
    /// The image: a stream conf (streamLayeredImage's `conf`, or any conf file) or the stream
    /// executable (`./result`), or, named with -t, a Docker archive, an OCI layout or an
    /// oci-archive (as push takes them).
    pub source: String,
    /// The runtime to load into.
    #[arg(long, value_parser = choice::<stevedore::serve::load::Runtime>(), default_value = "podman")]
    pub into: stevedore::serve::load::Runtime,
    /// The name to give the image (`NAME[:TAG]`); the conf's repo_tag by default.
    #[arg(short = 't', long = "tag", value_name = "NAME:TAG")]
    pub name: Option<String>,
    /// containerd's namespace (`k8s.io` for Kubernetes' images).
    #[arg(long, default_value = "default", value_name = "NS")]
    pub namespace: String,
    /// Print nothing on stderr but errors.
    #[arg(short, long)]
    pub quiet: bool,
}

impl LoadCmd {
    pub fn run(self) -> Result<()> {
        let opts = stevedore::serve::load::LoadOptions { runtime: self.into, name: self.name, namespace: self.namespace };
        stevedore::serve::load::load(&self.source, &opts, &stevedore::util::progress::Progress { quiet: self.quiet })
    }
}
