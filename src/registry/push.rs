//! Pushing a plan: HEAD every blob, mount what another repository has, upload the rest
//! (from files, the spooled layers as soon as the digest pass completes each, or streamed from
//! the pass), then the manifests and the tag.

use super::client::{with_digest, Registry, Tries};
use super::http::{io_failure, BodyWriter, Url};
use super::source::{Blob, BlobData, Plan, Spool, Spooled};
use crate::compress::{Annotations, Compressor, Pipeline};
use crate::util::hex;
use crate::image::{LayerSink};
use crate::util::progress::Progress;
use crate::util::io::HashingWriter;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

pub struct PushOptions {
    pub mount_from: Vec<String>,
    /// Blobs up to this size go in one PUT; larger ones in PATCH chunks of this size.
    pub chunk_size: u64,
}

#[derive(Default, Debug, Clone)]
pub struct Summary {
    pub blobs: usize,
    pub existed: usize,
    pub mounted: usize,
    pub uploaded: usize,
    pub uploaded_bytes: u64,
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(7 + 12)]
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Where the bytes of one upload go: the current request body, opening PATCH requests one
/// chunk at a time (or one PUT for the whole blob), and failing with the real cause kept aside.
struct UploadBody<'r> {
    reg: &'r Registry,
    repo: String,
    /// Where the next request goes; None until the upload is started (by the first byte, so
    /// uploads of layers compressed ahead never overlap on the connection).
    url: Option<Url>,
    digest: String,
    total: u64,
    sent: u64,
    chunk: u64,
    monolithic: bool,
    body: Option<(BodyWriter, u64)>,
    error: Rc<RefCell<Option<anyhow::Error>>>,
}

impl<'r> UploadBody<'r> {
    fn fail(&self, e: anyhow::Error) -> io::Error {
        let msg = format!("{e:#}");
        *self.error.borrow_mut() = Some(e);
        io::Error::other(msg)
    }

    /// Ends the current PATCH and moves on to the URL it returns.
    fn end_chunk(&mut self) -> Result<()> {
        if let Some((body, _)) = self.body.take() {
            let resp = body.finish().with_context(|| format!("uploading blob {}", self.digest))?;
            if resp.status != 202 {
                return Err(self.reg.fail(&format!("uploading blob {}", self.digest), resp));
            }
            let loc = resp.header("location").map(str::to_owned);
            resp.discard();
            if let (Some(loc), Some(url)) = (loc, &self.url) {
                self.url = Some(self.reg.join_location(url, &loc)?);
            }
        }
        Ok(())
    }

    fn url(&mut self) -> Result<Url> {
        if self.url.is_none() {
            self.url = Some(self.reg.start_upload(&self.repo)?);
        }
        Ok(self.url.clone().expect("just set"))
    }

    fn open(&mut self) -> Result<()> {
        let url = self.url()?;
        if self.monolithic {
            let url = with_digest(url, &self.digest);
            let w = self.reg.start_stream("PUT", &url, &[("Content-Type", "application/octet-stream")], self.total)?;
            self.body = Some((w, self.total));
        } else {
            let len = self.chunk.min(self.total - self.sent);
            let range = format!("{}-{}", self.sent, self.sent + len - 1);
            let w = self.reg.start_stream(
                "PATCH",
                &url,
                &[("Content-Type", "application/octet-stream"), ("Content-Range", &range)],
                len,
            )?;
            self.body = Some((w, len));
        }
        Ok(())
    }

    fn write_inner(&mut self, mut data: &[u8]) -> Result<()> {
        if self.sent + data.len() as u64 > self.total {
            bail!("blob {} is longer than the {} bytes the first pass gave: its input changed", self.digest, self.total);
        }
        while !data.is_empty() {
            if self.body.is_none() {
                self.open()?;
            }
            let (w, left) = self.body.as_mut().expect("opened");
            let k = (data.len() as u64).min(*left) as usize;
            if let Err(e) = w.write_all(&data[..k]) {
                // The server may have answered before it stopped reading (an expired token).
                let (w, _) = self.body.take().expect("opened");
                let what = format!("uploading blob {}", self.digest);
                return Err(match w.early_response() {
                    Some(resp) => self.reg.fail(&what, resp),
                    None => io_failure(what, &e),
                });
            }
            *left -= k as u64;
            self.sent += k as u64;
            data = &data[k..];
            if *left == 0 && !self.monolithic {
                self.end_chunk()?;
            }
        }
        Ok(())
    }

    /// Completes the upload: the last request, then (chunked) the PUT with the digest.
    fn complete(mut self) -> Result<()> {
        if self.sent != self.total {
            bail!("blob {} came out {} bytes long, the first pass gave {}: its input changed", self.digest, self.sent, self.total);
        }
        if self.monolithic {
            if self.body.is_none() {
                self.open()?; // an empty blob
            }
            let (body, _) = self.body.take().expect("opened");
            let resp = body.finish().with_context(|| format!("uploading blob {}", self.digest))?;
            if resp.status != 201 {
                return Err(self.reg.fail(&format!("uploading blob {}", self.digest), resp));
            }
            resp.discard();
            return Ok(());
        }
        self.end_chunk()?;
        let url = with_digest(self.url()?, &self.digest);
        let resp = self.reg.start_stream("PUT", &url, &[("Content-Type", "application/octet-stream")], 0)?.finish().with_context(|| format!("completing blob {}", self.digest))?;
        if resp.status != 201 {
            return Err(self.reg.fail(&format!("completing blob {}", self.digest), resp));
        }
        resp.discard();
        Ok(())
    }
}

impl Write for UploadBody<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.error.borrow().is_some() {
            return Err(io::Error::other("upload already failed"));
        }
        match self.write_inner(data) {
            Ok(()) => Ok(data.len()),
            Err(e) => Err(self.fail(e)),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An upload of `digest` (`size` bytes); the registry hears of it at the first byte.
fn upload_body<'r>(reg: &'r Registry, repo: &str, digest: &str, size: u64, opts: &PushOptions, error: Rc<RefCell<Option<anyhow::Error>>>) -> UploadBody<'r> {
    UploadBody {
        reg,
        repo: repo.to_string(),
        url: None,
        digest: digest.to_string(),
        total: size,
        sent: 0,
        chunk: opts.chunk_size.max(1),
        monolithic: size <= opts.chunk_size,
        body: None,
        error,
    }
}

type UploadDone<'a> = Box<dyn FnMut(HashingWriter<UploadBody<'a>>, Annotations) -> io::Result<u64> + 'a>;

/// Pass 2: uploads the wanted items as the pass produces them. One compression pipeline for
/// all of them: a layer is compressed while the one before it is still uploading, and each
/// upload completes (checked against the digest of pass 1) before the next one starts.
struct UploadSink<'r, 'o> {
    reg: &'r Registry,
    repo: &'o str,
    opts: &'o PushOptions,
    /// Item -> (digest, size) still to upload.
    wanted: HashMap<usize, (String, u64)>,
    index: usize,
    pipe: Pipeline<HashingWriter<UploadBody<'r>>, u64, UploadDone<'r>>,
    /// Items begun and not uploaded yet, oldest first: the front one is what a failure is about.
    pending: VecDeque<usize>,
    /// The real cause of a failed write or completion (the pipeline passes on only a message).
    error: Rc<RefCell<Option<anyhow::Error>>>,
    done: Vec<(usize, u64)>,
}

impl<'r, 'o> UploadSink<'r, 'o> {
    fn new(reg: &'r Registry, repo: &'o str, opts: &'o PushOptions, wanted: HashMap<usize, (String, u64)>, compressor: Compressor, progress: &'r Progress) -> Self {
        let error: Rc<RefCell<Option<anyhow::Error>>> = Rc::new(RefCell::new(None));
        let slot = error.clone();
        // The annotations were learnt by the digest pass and are in the manifest already.
        let done: UploadDone<'r> = Box::new(move |hw: HashingWriter<UploadBody<'r>>, _| {
            let (body, digest, _) = hw.finish();
            let got = format!("sha256:{}", hex(&digest));
            let (want, size) = (body.digest.clone(), body.total);
            let result = if got != want {
                Err(anyhow!("blob {want} came out as {got} on the second pass: its input changed during the push"))
            } else {
                body.complete()
            };
            match result {
                Ok(()) => {
                    progress.say(format!("{}: uploaded {size} bytes", short(&want)));
                    Ok(size)
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    *slot.borrow_mut() = Some(e);
                    Err(io::Error::other(msg))
                }
            }
        });
        UploadSink {
            reg,
            repo,
            opts,
            wanted,
            index: 0,
            pipe: Pipeline::new(compressor, done),
            pending: VecDeque::new(),
            error,
            done: Vec::new(),
        }
    }

    fn collect(&mut self) {
        for size in self.pipe.take_finished() {
            let index = self.pending.pop_front().expect("a finished upload was begun");
            self.wanted.remove(&index);
            self.done.push((index, size));
        }
    }

    /// Waits for the last uploads. A failed one leaves its cause aside, as a failure during
    /// the pass does, for `failure` and the retry decision.
    fn finish(&mut self) -> Result<()> {
        let r = self.pipe.wait();
        self.collect();
        r.map_err(|e| anyhow!("{e}"))
    }

    /// Which item failed and why, if the pass failed in an upload.
    fn failure(&mut self) -> Option<(usize, anyhow::Error)> {
        let cause = self.error.borrow_mut().take()?;
        Some((*self.pending.front()?, cause))
    }
}

impl LayerSink for UploadSink<'_, '_> {
    fn wants(&mut self, index: usize) -> bool {
        self.index = index;
        self.wanted.contains_key(&index)
    }
    fn begin(&mut self, _name: &str, _size: u64) -> Result<()> {
        let (digest, size) = self.wanted.get(&self.index).cloned().ok_or_else(|| anyhow!("internal error: unexpected item"))?;
        let body = upload_body(self.reg, self.repo, &digest, size, self.opts, self.error.clone());
        self.pending.push_back(self.index);
        self.pipe.begin(HashingWriter::new(body)).map_err(|e| anyhow!("{e}"))
    }
    fn out(&mut self) -> &mut dyn Write {
        &mut self.pipe
    }
    fn end(&mut self, _size: u64, _diff_id: &str) -> Result<()> {
        let r = self.pipe.end();
        self.collect();
        r.map_err(|e| anyhow!("{e}"))
    }
}

/// A writer that hashes what passes, if asked to.
struct Verifying<W> {
    inner: W,
    hasher: Option<Sha256>,
}

impl<W: Write> Write for Verifying<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(h) = &mut self.hasher {
            h.update(&data[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Uploads a blob whose bytes can be read again from the start (memory or a file), checking
/// its digest on the way if `verify` (not for the spool's files, which were hashed as they were
/// written; the registry checks every digest anyway).
fn upload_direct(reg: &Registry, repo: &str, blob: &Blob, opts: &PushOptions, verify: bool, progress: &Progress) -> Result<()> {
    let mut tries = Tries::new(reg.retries);
    loop {
        let error = Rc::new(RefCell::new(None));
        let result = (|| -> Result<()> {
            let mut body = upload_body(reg, repo, &blob.digest, blob.size, opts, error.clone());
            let mut hw = Verifying { inner: &mut body, hasher: verify.then(Sha256::new) };
            match &blob.data {
                BlobData::Bytes(b) => hw.write_all(b)?,
                BlobData::File(p) => {
                    let mut f = std::fs::File::open(p).map_err(|e| anyhow!("cannot open {}: {e}", p.display()))?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f.read(&mut buf).map_err(|e| anyhow!("cannot read {}: {e}", p.display()))?;
                        if n == 0 {
                            break;
                        }
                        hw.write_all(&buf[..n])?;
                    }
                }
                BlobData::Pass(_) => bail!("internal error: pass blob uploaded directly"),
            }
            if let Some(hasher) = hw.hasher {
                let got = format!("sha256:{}", hex(&hasher.finalize()));
                if got != blob.digest {
                    bail!("blob {} has digest {got}: the file changed or is corrupt", blob.digest);
                }
            }
            body.complete()
        })();
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                let e = error.borrow_mut().take().unwrap_or(e);
                let wait = tries.after_error(&e).ok_or(e)?;
                progress.say(format!("{}: upload failed; retrying from its start", short(&blob.digest)));
                std::thread::sleep(wait);
            }
        }
    }
}

/// Whether `blob` still has to be uploaded: not if the registry has it in `repo` already or
/// can mount it from one of `--mount-from`'s repositories (counted in `summary`).
fn needs_upload(reg: &Registry, repo: &str, blob: &Blob, opts: &PushOptions, summary: &mut Summary, progress: &Progress) -> Result<bool> {
    let (digest, what, size) = (&blob.digest, &blob.what, blob.size);
    summary.blobs += 1;
    if reg.blob_exists(repo, digest)?.is_some() {
        progress.say(format!("{}: exists ({what}, {})", short(digest), mib(size)));
        summary.existed += 1;
        return Ok(false);
    }
    for from in &opts.mount_from {
        if from != repo && reg.mount(repo, digest, from)? {
            progress.say(format!("{}: mounted from {from} ({what}, {})", short(digest), mib(size)));
            summary.mounted += 1;
            return Ok(false);
        }
    }
    Ok(true)
}

/// Blobs a push dealt with before its plan was complete.
#[derive(Default)]
pub struct Settled {
    pub digests: HashSet<String>,
    pub summary: Summary,
}

/// Uploads the layers the plan's digest pass spools, each as soon as it is complete (while the
/// pass compresses the next ones), and removes their files. Runs until the spool is closed; on
/// a failure it tells the spool, so the pass stops, and returns the cause.
pub fn upload_spooled(reg: &Registry, repo: &str, ready: Receiver<Spooled>, spool: &Spool, opts: &PushOptions, progress: &Progress) -> Result<Settled> {
    let mut settled = Settled::default();
    let result = (|| -> Result<()> {
        for layer in ready {
            if settled.digests.contains(&layer.digest) {
                let _ = std::fs::remove_file(&layer.path);
                continue;
            }
            let blob = Blob { digest: layer.digest.clone(), size: layer.size, data: BlobData::File(layer.path.clone()), what: layer.what };
            if needs_upload(reg, repo, &blob, opts, &mut settled.summary, progress)? {
                upload_direct(reg, repo, &blob, opts, false, progress)?;
                progress.say(format!("{}: uploaded {} bytes ({})", short(&blob.digest), blob.size, blob.what));
                settled.summary.uploaded += 1;
                settled.summary.uploaded_bytes += blob.size;
            }
            let _ = std::fs::remove_file(&layer.path);
            settled.digests.insert(layer.digest);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(settled),
        Err(e) => {
            spool.fail();
            Err(e)
        }
    }
}

/// Pushes everything in `plan` to `repo`, then puts its manifests (children by digest, the
/// top one by digest and then by `tag`, if any). Blobs in `settled` were dealt with already.
pub fn push_plan(reg: &Registry, repo: &str, tag: Option<&str>, plan: &Plan, opts: &PushOptions, settled: Settled, progress: &Progress) -> Result<Summary> {
    let started = Instant::now();
    let mut summary = settled.summary;
    let mut seen = settled.digests;
    let mut missing: Vec<&Blob> = Vec::new();
    for blob in &plan.blobs {
        if !seen.insert(blob.digest.clone()) {
            continue;
        }
        if needs_upload(reg, repo, blob, opts, &mut summary, progress)? {
            missing.push(blob);
        }
    }

    // Files and bytes first (nothing to produce), then one pass for the made-on-the-fly blobs.
    let mut pass_items: HashMap<usize, (String, u64)> = HashMap::new();
    for blob in &missing {
        match blob.data {
            BlobData::Pass(i) => {
                pass_items.insert(i, (blob.digest.clone(), blob.size));
            }
            _ if blob.what == "config" => {}
            _ => {
                upload_direct(reg, repo, blob, opts, true, progress)?;
                progress.say(format!("{}: uploaded {} bytes", short(&blob.digest), blob.size));
                summary.uploaded += 1;
                summary.uploaded_bytes += blob.size;
            }
        }
    }
    if !pass_items.is_empty() {
        let pass = plan.pass.ok_or_else(|| anyhow!("internal error: plan has pass blobs but no pass"))?;
        let mut tries: HashMap<usize, Tries> = HashMap::new();
        let quiet = Progress { quiet: true };
        loop {
            let mut sink = UploadSink::new(reg, repo, opts, pass_items.clone(), pass.compressor().unwrap_or(Compressor::None), progress);
            let result = pass.run(&mut sink, &quiet).and_then(|()| sink.finish());
            for (i, size) in &sink.done {
                pass_items.remove(i);
                summary.uploaded += 1;
                summary.uploaded_bytes += size;
            }
            match result {
                Ok(()) if pass_items.is_empty() => break,
                Ok(()) => bail!("internal error: {} blobs were not produced by the pass", pass_items.len()),
                Err(e) => {
                    // A failed write surfaces as an I/O error from the pass; its cause is
                    // kept aside by the upload body, for the oldest item not uploaded.
                    let Some((index, cause)) = sink.failure() else { return Err(e) };
                    let Some(wait) = tries.entry(index).or_insert_with(|| Tries::new(reg.retries)).after_error(&cause) else { return Err(cause) };
                    let digest = pass_items.get(&index).map(|(d, _)| d.clone()).unwrap_or_default();
                    progress.say(format!("{}: upload failed ({cause:#}); retrying from its start", short(&digest)));
                    std::thread::sleep(wait);
                }
            }
        }
    }
    // Configs last among blobs: a registry may check a manifest's blobs, never the reverse.
    for blob in &missing {
        if blob.what == "config" && !matches!(blob.data, BlobData::Pass(_)) {
            upload_direct(reg, repo, blob, opts, true, progress)?;
            progress.say(format!("{}: uploaded {} bytes (config)", short(&blob.digest), blob.size));
            summary.uploaded += 1;
            summary.uploaded_bytes += blob.size;
        }
    }

    for m in &plan.manifests {
        reg.put_manifest(repo, &m.digest, &m.media_type, &m.bytes)?;
    }
    if let Some(tag) = tag {
        let top = plan.top();
        reg.put_manifest(repo, tag, &top.media_type, &top.bytes)?;
    }
    let stats = reg.http.stats.lock().map(|s| (s.requests, s.bytes_sent)).unwrap_or_default();
    progress.say(format!(
        "summary: {} blobs: {} uploaded ({} bytes), {} mounted, {} existed; {} requests, {} bytes sent in {:.2} s",
        summary.blobs,
        summary.uploaded,
        summary.uploaded_bytes,
        summary.mounted,
        summary.existed,
        stats.0,
        stats.1,
        started.elapsed().as_secs_f64()
    ));
    Ok(summary)
}
