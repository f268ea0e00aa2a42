//! Copying an image from another CTS into the local store (a job recovered on another
//! resource).
//!
//! The manifest comes first: its digest must be the one the GCS recorded for the checkpoint.
//! Then every file it lists is streamed to disk in the staging area, resuming with a `Range`
//! request after a transport error, and checked (size, SHA-256) against the manifest. Only
//! when all match is the image committed, with the fetched manifest bytes unchanged, so the
//! digest is the same on both sides. A refused image leaves nothing behind.
//!
//! A format 2 image (chunks) is fetched by chunks, not files: the chunks its manifest names
//! that this store lacks are asked for in batches ([`MAX_CHUNKS_PER_REQUEST`] chunks or
//! [`BATCH_BYTES`], whichever is less) on `POST /images/{id}/chunks`, [`PARALLEL_BATCHES`]
//! at once; each chunk is checked against its name once, as it arrives, and stored; a batch
//! cut short is asked again for its missing chunks only. Chunks the store has are neither
//! transferred nor hashed again.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gca_protocol::fault::ErrorBody;
use reqwest::{header, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use std::collections::BTreeMap;

use gca_protocol::images::{ChunksRequest, MAX_CHUNKS_PER_REQUEST};

use crate::chunks::{ChunkId, ChunkRef, PinSet};
use crate::error::Error;
use crate::manifest::{FileEntry, Manifest, MAX_MANIFEST_BYTES};
use crate::names::ImageId;
use crate::store::{write_err, ImageStore};

const WRITE_BUF: usize = 1 << 20;
const MAX_ERROR_BODY: u64 = 64 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The most bytes one chunk request asks for.
pub const BATCH_BYTES: u64 = 8 << 20;
/// Chunk requests in flight at once.
pub const PARALLEL_BATCHES: usize = 4;
/// Arrived chunks are checked and stored on a blocking thread in groups of about this size.
const STORE_GROUP: usize = 2 << 20;

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub manifest: Manifest,
    /// Bytes received for the image's contents (files or chunks), not counting the manifest.
    pub bytes_transferred: u64,
    /// Chunks received (format 2).
    pub chunks_transferred: usize,
    /// Chunks the store had already (format 2).
    pub chunks_present: usize,
    /// The chunks this fetch received and checked against their names as they arrived
    /// (format 2): [`ImageStore::materialize_checked`] does not hash them again.
    pub checked: Arc<HashSet<ChunkId>>,
}

/// How hard a fetch tries.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Attempts per request (the manifest, each file) before giving up on transport errors
    /// and 5xx answers; each new attempt of a file resumes where the last one stopped.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one (at most 10 s).
    pub backoff: Duration,
    /// A transfer that receives nothing for this long counts as failed.
    pub stall_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            attempts: 5,
            backoff: Duration::from_millis(250),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// [`fetch_image_with`] with the default [`FetchOptions`].
pub async fn fetch_image(
    http: &reqwest::Client,
    base_url: &str,
    id: &ImageId,
    expected_digest: Option<&str>,
    store: &ImageStore,
) -> Result<Manifest, Error> {
    fetch_image_with(
        http,
        base_url,
        id,
        expected_digest,
        store,
        &FetchOptions::default(),
    )
    .await
}

/// Copies image `id` from the CTS whose image routes are at `base_url` (e.g.
/// `http://host:port/images`) into `store`, and returns its manifest.
///
/// `expected_digest` is the `sha256:<hex>` the GCS recorded; `None` checks the transfer only
/// (every file against the fetched manifest), not that the image is the recorded one. An
/// image the store holds already with the same digest is returned without a download.
pub async fn fetch_image_with(
    http: &reqwest::Client,
    base_url: &str,
    id: &ImageId,
    expected_digest: Option<&str>,
    store: &ImageStore,
    opts: &FetchOptions,
) -> Result<Manifest, Error> {
    fetch_image_report(http, base_url, id, expected_digest, store, opts)
        .await
        .map(|f| f.manifest)
}

/// [`fetch_image_with`], telling what was transferred.
pub async fn fetch_image_report(
    http: &reqwest::Client,
    base_url: &str,
    id: &ImageId,
    expected_digest: Option<&str>,
    store: &ImageStore,
    opts: &FetchOptions,
) -> Result<Fetched, Error> {
    let ctx = Ctx {
        http,
        base: base_url.trim_end_matches('/'),
        id,
        store,
        opts,
        written: Default::default(),
    };

    let bytes = ctx.get_manifest().await?;
    let digest = Manifest::digest_of(&bytes);
    if let Some(expected) = expected_digest {
        if !expected.trim().eq_ignore_ascii_case(&digest) {
            return Err(Error::DigestMismatch(format!(
                "image {id} from {} has digest {digest}, the GCS recorded {}: refusing a \
                 corrupt or tampered image",
                ctx.base,
                expected.trim()
            )));
        }
    }
    let manifest = Manifest::parse(&bytes)
        .map_err(|e| Error::Corrupt(format!("image {id} from {}: {e}", ctx.base)))?;
    if manifest.id != *id {
        return Err(Error::Corrupt(format!(
            "{} answered the manifest of image {} when asked for image {id}",
            ctx.base, manifest.id
        )));
    }
    let nothing = |manifest| Fetched {
        manifest,
        bytes_transferred: 0,
        chunks_transferred: 0,
        chunks_present: 0,
        checked: Arc::default(),
    };
    if let Some(m) = local_copy(store, id, &digest).await? {
        tracing::info!(image = %id, %digest, "image already in the local store");
        return Ok(nothing(m));
    }

    let staging = store.stage_expecting(id, manifest.total_bytes).await?;
    let mut report = nothing(manifest.clone());
    if manifest.is_chunked() {
        match ctx.fetch_chunks(&manifest, staging.pins()).await {
            Ok((got, bytes, present, checked)) => {
                report.chunks_transferred = got;
                report.bytes_transferred = bytes;
                report.chunks_present = present;
                report.checked = Arc::new(checked);
            }
            Err(e) => {
                staging.discard().await;
                return Err(e);
            }
        }
    }
    for entry in manifest.files.iter().filter(|_| !manifest.is_chunked()) {
        report.bytes_transferred += entry.size;
        // Paths were validated by Manifest::parse.
        let dest = staging.dir.join(&entry.path);
        if let Err(e) = ctx.download_file(entry, &dest).await {
            staging.discard().await;
            return Err(e);
        }
    }
    match staging.commit_with_manifest(bytes).await {
        Ok(m) => {
            tracing::info!(image = %id, %digest, bytes = m.total_bytes, from = ctx.base,
                transferred = report.bytes_transferred, chunks = report.chunks_transferred,
                chunks_present = report.chunks_present, "image fetched");
            report.manifest = m;
            Ok(report)
        }
        // Fetched concurrently by someone else: fine if it is the same image.
        Err(Error::Conflict(msg)) => match local_copy(store, id, &digest).await? {
            Some(m) => {
                report.manifest = m;
                Ok(report)
            }
            None => Err(Error::Conflict(msg)),
        },
        Err(e) => Err(e),
    }
}

/// Whether each chunk is in `store`, on a blocking thread (pinning them first).
async fn missing_chunks(
    store: &ImageStore,
    pins: &PinSet,
    wanted: Vec<ChunkRef>,
    id: &ImageId,
) -> Result<Vec<ChunkRef>, Error> {
    for c in &wanted {
        pins.pin(&c.id);
    }
    let chunks = store.chunks().clone();
    let id = id.clone();
    tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for c in wanted {
            let has = chunks.backend().has(&c.id).map_err(|e| {
                Error::io(format!("cannot look up chunk {} of image {id}", c.id), e)
            })?;
            if !has {
                missing.push(c);
            }
        }
        Ok(missing)
    })
    .await
    .map_err(|e| Error::io("chunk lookup task failed", std::io::Error::other(e)))?
}

/// The local image `id` if it has `digest`; a conflict if it has another one.
async fn local_copy(
    store: &ImageStore,
    id: &ImageId,
    digest: &str,
) -> Result<Option<Manifest>, Error> {
    match store.digest(id).await {
        Ok(d) if d == digest => Ok(Some(store.manifest(id).await?)),
        Ok(d) => Err(Error::Conflict(format!(
            "image {id} is in the local store already with digest {d}, not {digest}: delete \
             it first"
        ))),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One failed attempt: try again, or give up now.
enum Attempt {
    Retry(String),
    Fatal(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Fatal(e)
    }
}

/// An error with its causes, `a: b: c` (reqwest's own message leaves them out).
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

struct Ctx<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    id: &'a ImageId,
    store: &'a ImageStore,
    opts: &'a FetchOptions,
    /// Chunks stored by this fetch and not yet made durable ([`ChunkBackend::sync`], once at
    /// the end of [`Ctx::fetch_chunks`]).
    ///
    /// [`ChunkBackend::sync`]: crate::ChunkBackend::sync
    written: parking_lot::Mutex<Vec<ChunkId>>,
}

impl Ctx<'_> {
    /// Fetches the chunks of `manifest` the store lacks (see the module documentation).
    /// Returns (chunks received, their bytes, chunks present already).
    async fn fetch_chunks(
        &self,
        manifest: &Manifest,
        pins: &PinSet,
    ) -> Result<(usize, u64, usize, HashSet<ChunkId>), Error> {
        let all = manifest.chunk_set();
        // For messages: the first file naming each chunk.
        let mut file_of: BTreeMap<ChunkId, &str> = BTreeMap::new();
        for f in &manifest.files {
            for c in &f.chunks {
                file_of.entry(c.id).or_insert(f.path.as_str());
            }
        }
        let wanted: Vec<ChunkRef> = all
            .iter()
            .map(|(&id, &size)| ChunkRef { id, size })
            .collect();
        let missing = missing_chunks(self.store, pins, wanted, self.id).await?;
        let present = all.len() - missing.len();
        let mut batches: Vec<Vec<ChunkRef>> = Vec::new();
        let mut bytes = 0u64;
        for c in &missing {
            let full = batches.last().is_none_or(|b| {
                b.len() >= MAX_CHUNKS_PER_REQUEST || bytes + u64::from(c.size) > BATCH_BYTES
            });
            if full {
                batches.push(Vec::new());
                bytes = 0;
            }
            bytes += u64::from(c.size);
            batches.last_mut().expect("a batch").push(*c);
        }
        let file_of = &file_of;
        let mut results = futures::stream::iter(batches)
            .map(|b| self.fetch_batch(b, file_of))
            .buffer_unordered(PARALLEL_BATCHES);
        let mut total = 0u64;
        while let Some(r) = results.next().await {
            total += r?;
        }
        drop(results);
        // Durable once, before the manifest naming them is committed.
        let written = std::mem::take(&mut *self.written.lock());
        let chunks = self.store.chunks().clone();
        let written = tokio::task::spawn_blocking(move || {
            chunks.backend().sync(&written)?;
            Ok::<_, std::io::Error>(written.into_iter().collect())
        })
        .await
        .map_err(|e| Error::io("chunk sync task failed", std::io::Error::other(e)))?
        .map_err(|e| self.write_error(e))?;
        Ok((missing.len(), total, present, written))
    }

    /// One batch of chunks, asked again (for what is still missing) after a transport error.
    async fn fetch_batch(
        &self,
        mut batch: Vec<ChunkRef>,
        file_of: &BTreeMap<ChunkId, &str>,
    ) -> Result<u64, Error> {
        let url = format!("{}/{}/chunks", self.base, self.id);
        let mut failures = 0;
        let mut got = 0u64;
        loop {
            let mut done = 0usize;
            let r = self
                .transfer_chunks(&url, &batch, file_of, &mut done, &mut got)
                .await;
            batch.drain(..done);
            match r {
                Ok(()) => return Ok(got),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(msg)) => {
                    failures += 1;
                    if failures >= self.opts.attempts {
                        return Err(Error::Unreachable(format!(
                            "cannot fetch the chunks of image {} from {url} ({failures} \
                             attempts, {} chunks still missing): {msg}",
                            self.id,
                            batch.len()
                        )));
                    }
                    self.backoff(failures, "chunks", &msg).await;
                }
            }
        }
    }

    /// One request for `batch`: each chunk checked and stored as it completes; `done` counts
    /// the chunks stored, `got` their bytes.
    async fn transfer_chunks(
        &self,
        url: &str,
        batch: &[ChunkRef],
        file_of: &BTreeMap<ChunkId, &str>,
        done: &mut usize,
        got: &mut u64,
    ) -> Result<(), Attempt> {
        let body = ChunksRequest {
            chunks: batch.iter().map(|c| c.id.to_hex()).collect(),
        };
        let res = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| Attempt::Retry(describe(&e)))?;
        if !res.status().is_success() {
            return Err(self.refused(url, res).await);
        }
        let expected: u64 = batch.iter().map(|c| u64::from(c.size)).sum();
        if let Some(len) = res.content_length() {
            if len != expected {
                return Err(Attempt::Fatal(Error::Corrupt(format!(
                    "{url} sends {len} bytes where the {} chunks asked for have {expected}: \
                     refusing image {}",
                    batch.len(),
                    self.id
                ))));
            }
        }
        let mut stream = res.bytes_stream();
        // The chunk being received, and the group of complete ones waiting to be stored.
        let mut cur: Vec<u8> = Vec::with_capacity(crate::chunks::MAX_CHUNK);
        let mut group: Vec<(ChunkRef, Vec<u8>)> = Vec::new();
        let mut group_bytes = 0usize;
        let mut next = *done;
        loop {
            let item = tokio::time::timeout(self.opts.stall_timeout, stream.next())
                .await
                .map_err(|_| {
                    Attempt::Retry(format!(
                        "{url} sent nothing for {:?}",
                        self.opts.stall_timeout
                    ))
                })?;
            let mut data = match item {
                None => break,
                Some(Err(e)) => {
                    // Keep what is complete.
                    self.store_group(std::mem::take(&mut group), file_of, done, got)
                        .await?;
                    return Err(Attempt::Retry(describe(&e)));
                }
                Some(Ok(d)) => d,
            };
            while !data.is_empty() {
                let Some(c) = batch.get(next) else {
                    return Err(Attempt::Fatal(Error::Corrupt(format!(
                        "{url} sends more than the {expected} bytes of the chunks asked for: \
                         refusing image {}",
                        self.id
                    ))));
                };
                let want = c.size as usize - cur.len();
                let take = want.min(data.len());
                cur.extend_from_slice(&data.split_to(take));
                if cur.len() == c.size as usize {
                    group_bytes += cur.len();
                    group.push((
                        *c,
                        std::mem::replace(&mut cur, Vec::with_capacity(crate::chunks::MAX_CHUNK)),
                    ));
                    next += 1;
                    if group_bytes >= STORE_GROUP {
                        group_bytes = 0;
                        self.store_group(std::mem::take(&mut group), file_of, done, got)
                            .await?;
                    }
                }
            }
        }
        self.store_group(group, file_of, done, got).await?;
        if *done != batch.len() {
            return Err(Attempt::Retry(format!(
                "{url} ended after {done} of {} chunks",
                batch.len()
            )));
        }
        Ok(())
    }

    /// Checks each arrived chunk against its name and stores it (a blocking thread).
    async fn store_group(
        &self,
        group: Vec<(ChunkRef, Vec<u8>)>,
        file_of: &BTreeMap<ChunkId, &str>,
        done: &mut usize,
        got: &mut u64,
    ) -> Result<(), Attempt> {
        if group.is_empty() {
            return Ok(());
        }
        let chunks = self.store.chunks().clone();
        let n = group.len();
        let bytes: u64 = group.iter().map(|(c, _)| u64::from(c.size)).sum();
        let r = tokio::task::spawn_blocking(move || {
            let mut written = Vec::with_capacity(group.len());
            for (c, data) in &group {
                let is = ChunkId::of(data);
                if is != c.id {
                    return Err(Ok((c.id, is)));
                }
                if chunks.backend().put(&c.id, data).map_err(Err)? {
                    written.push(c.id);
                }
            }
            Ok(written)
        })
        .await
        .map_err(|e| {
            Attempt::Fatal(Error::io(
                "chunk store task failed",
                std::io::Error::other(e),
            ))
        })?;
        match r {
            Ok(written) => {
                self.written.lock().extend(written);
                *done += n;
                *got += bytes;
                Ok(())
            }
            Err(Ok((want, is))) => Err(Attempt::Fatal(Error::ChunkCorrupt {
                image: self.id.to_string(),
                file: file_of.get(&want).copied().unwrap_or("-").to_string(),
                chunk: want.to_hex(),
                detail: format!("arrived from {} with bytes that hash to {is}", self.base),
            })),
            Err(Err(e)) => Err(Attempt::Fatal(self.write_error(e))),
        }
    }

    fn write_error(&self, e: std::io::Error) -> Error {
        write_err(self.store.root(), self.id.as_str(), e)
    }

    async fn backoff(&self, failures: u32, what: &str, msg: &str) {
        let wait = self
            .opts
            .backoff
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        tracing::warn!(
            image = %self.id,
            what,
            error = msg,
            ?wait,
            "fetch attempt failed; retrying"
        );
        tokio::time::sleep(wait).await;
    }

    /// Maps an answer that is not a success to an attempt failure.
    async fn refused(&self, url: &str, res: reqwest::Response) -> Attempt {
        let status = res.status();
        let body = read_body(res, MAX_ERROR_BODY, self.opts.stall_timeout)
            .await
            .unwrap_or_default();
        let detail = serde_json::from_slice::<ErrorBody>(&body)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
        let message = format!("{url} answered {status}: {detail}");
        if status == StatusCode::NOT_FOUND {
            Attempt::Fatal(Error::NotFound(format!(
                "the CTS at {} has no image {} ({message})",
                self.base, self.id
            )))
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Retry(message)
        } else {
            Attempt::Fatal(Error::FetchRefused {
                status: status.as_u16(),
                message: format!("cannot fetch image {}: {message}", self.id),
            })
        }
    }

    async fn get_manifest(&self) -> Result<Vec<u8>, Error> {
        let url = format!("{}/{}", self.base, self.id);
        let mut failures = 0;
        loop {
            let attempt = async {
                let res = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| Attempt::Retry(describe(&e)))?;
                if !res.status().is_success() {
                    return Err(self.refused(&url, res).await);
                }
                if res.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES) {
                    return Err(Attempt::Fatal(Error::Corrupt(format!(
                        "the manifest of image {} at {url} is larger than {MAX_MANIFEST_BYTES} \
                         bytes",
                        self.id
                    ))));
                }
                read_body(res, MAX_MANIFEST_BYTES, self.opts.stall_timeout)
                    .await
                    .map_err(|e| match e {
                        BodyError::TooLarge => Attempt::Fatal(Error::Corrupt(format!(
                            "the manifest of image {} at {url} is larger than \
                             {MAX_MANIFEST_BYTES} bytes",
                            self.id
                        ))),
                        BodyError::Transport(m) => Attempt::Retry(m),
                    })
            };
            match attempt.await {
                Ok(bytes) => return Ok(bytes),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(msg)) => {
                    failures += 1;
                    if failures >= self.opts.attempts {
                        return Err(Error::Unreachable(format!(
                            "cannot fetch the manifest of image {} from {url} ({failures} \
                             attempts): {msg}",
                            self.id
                        )));
                    }
                    self.backoff(failures, "manifest", &msg).await;
                }
            }
        }
    }

    /// Downloads one file to `dest`, resuming from what is there already, and checks its
    /// size and SHA-256.
    async fn download_file(&self, entry: &FileEntry, dest: &Path) -> Result<(), Error> {
        let url = format!("{}/{}/files/{}", self.base, self.id, entry.path);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dest)
            .await
            .map_err(|e| self.write_error(e))?;
        let mut have = file
            .metadata()
            .await
            .map_err(|e| self.write_error(e))?
            .len();
        let mut hasher = Sha256::new();
        // Resuming from a file an earlier attempt left: its bytes count only if the whole
        // file then matches; otherwise we start over once.
        let mut resumed_from_disk = false;
        if have > entry.size {
            file.set_len(0).await.map_err(|e| self.write_error(e))?;
            have = 0;
        } else if have > 0 {
            hash_prefix(&mut file, have, &mut hasher)
                .await
                .map_err(|e| self.write_error(e))?;
            resumed_from_disk = true;
            tracing::info!(image = %self.id, file = %entry.path, have, "resuming a partial file");
        }
        let mut out = BufWriter::with_capacity(WRITE_BUF, file);

        let mut failures = 0;
        loop {
            if have < entry.size {
                match self
                    .transfer(&url, entry, &mut out, &mut hasher, &mut have)
                    .await
                {
                    Ok(()) => {}
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(msg)) => {
                        failures += 1;
                        if failures >= self.opts.attempts {
                            return Err(Error::Unreachable(format!(
                                "cannot download file {} of image {} from {url} ({failures} \
                                 attempts, {have} of {} bytes received): {msg}",
                                entry.path, self.id, entry.size
                            )));
                        }
                        self.backoff(failures, &entry.path, &msg).await;
                        continue;
                    }
                }
            }
            out.flush().await.map_err(|e| self.write_error(e))?;
            let got = hex::encode(hasher.finalize_reset());
            if Some(&got) == entry.sha256.as_ref() {
                return Ok(());
            }
            if resumed_from_disk {
                tracing::warn!(image = %self.id, file = %entry.path,
                    "the partial file did not match; downloading it again");
                resumed_from_disk = false;
                restart(&mut out, &mut hasher, &mut have)
                    .await
                    .map_err(|e| self.write_error(e))?;
                continue;
            }
            return Err(Error::Corrupt(format!(
                "file {} of image {} from {url} has sha256 {got}, its manifest says {}: \
                 refusing a corrupt or tampered image",
                entry.path,
                self.id,
                entry.sha256.as_deref().unwrap_or("-")
            )));
        }
    }

    /// One request for the rest of a file (from `*have`), appended to `out`.
    async fn transfer(
        &self,
        url: &str,
        entry: &FileEntry,
        out: &mut BufWriter<tokio::fs::File>,
        hasher: &mut Sha256,
        have: &mut u64,
    ) -> Result<(), Attempt> {
        let werr = |e| Attempt::Fatal(self.write_error(e));
        let ranged = *have > 0;
        let mut req = self.http.get(url);
        if ranged {
            req = req
                .header(header::RANGE, format!("bytes={have}-"))
                .header(header::IF_RANGE, format!("\"{}\"", entry.etag()));
        }
        let res = req.send().await.map_err(|e| Attempt::Retry(describe(&e)))?;
        match res.status() {
            StatusCode::PARTIAL_CONTENT if ranged => {
                if content_range(res.headers()) != Some((*have, entry.size)) {
                    let asked = *have;
                    restart(out, hasher, have).await.map_err(werr)?;
                    return Err(Attempt::Retry(format!(
                        "{url} answered another range than bytes={asked}-"
                    )));
                }
            }
            // The server ignored the range (or the file changed: If-Range): start over.
            StatusCode::OK => {
                if ranged {
                    restart(out, hasher, have).await.map_err(werr)?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if ranged => {
                restart(out, hasher, have).await.map_err(werr)?;
                return Err(Attempt::Retry(format!("{url} refused to resume")));
            }
            s if s.is_success() => {
                return Err(Attempt::Fatal(Error::FetchRefused {
                    status: s.as_u16(),
                    message: format!("{url} answered {s} to a file request"),
                }))
            }
            _ => return Err(self.refused(url, res).await),
        }
        let remaining = entry.size - *have;
        if let Some(len) = res.content_length() {
            if len != remaining {
                return Err(Attempt::Fatal(Error::Corrupt(format!(
                    "{url} sends {len} bytes where {remaining} were expected: file {} of image \
                     {} does not match its manifest ({} bytes)",
                    entry.path, self.id, entry.size
                ))));
            }
        }
        let mut stream = res.bytes_stream();
        loop {
            let next = tokio::time::timeout(self.opts.stall_timeout, stream.next())
                .await
                .map_err(|_| {
                    Attempt::Retry(format!(
                        "{url} sent nothing for {:?}",
                        self.opts.stall_timeout
                    ))
                })?;
            let chunk = match next {
                None => break,
                Some(Err(e)) => return Err(Attempt::Retry(describe(&e))),
                Some(Ok(chunk)) => chunk,
            };
            if *have + chunk.len() as u64 > entry.size {
                return Err(Attempt::Fatal(Error::Corrupt(format!(
                    "{url} sends more than the {} bytes the manifest of image {} lists for \
                     file {}",
                    entry.size, self.id, entry.path
                ))));
            }
            out.write_all(&chunk).await.map_err(werr)?;
            hasher.update(&chunk);
            *have += chunk.len() as u64;
        }
        if *have != entry.size {
            return Err(Attempt::Fatal(Error::Corrupt(format!(
                "{url} ended after {have} bytes: file {} of image {} has {} bytes in its \
                 manifest",
                entry.path, self.id, entry.size
            ))));
        }
        Ok(())
    }
}

/// Truncates the file being written and resets the hash: the next request starts at 0.
async fn restart(
    out: &mut BufWriter<tokio::fs::File>,
    hasher: &mut Sha256,
    have: &mut u64,
) -> std::io::Result<()> {
    out.flush().await?;
    let f = out.get_mut();
    f.set_len(0).await?;
    f.seek(std::io::SeekFrom::Start(0)).await?;
    hasher.reset();
    *have = 0;
    Ok(())
}

/// Hashes the first `len` bytes of `file` and leaves it positioned at `len`.
async fn hash_prefix(
    file: &mut tokio::fs::File,
    len: u64,
    hasher: &mut Sha256,
) -> std::io::Result<()> {
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; WRITE_BUF];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "partial file shrank while resuming",
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// `Content-Range: bytes a-b/len` → `(a, len)`.
fn content_range(headers: &header::HeaderMap) -> Option<(u64, u64)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, len) = rest.split_once('/')?;
    let (a, _b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, len.trim().parse().ok()?))
}

enum BodyError {
    TooLarge,
    Transport(String),
}

/// Reads a (small) body, at most `cap` bytes.
async fn read_body(
    res: reqwest::Response,
    cap: u64,
    stall: Duration,
) -> Result<Vec<u8>, BodyError> {
    let mut stream = res.bytes_stream();
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(stall, stream.next())
            .await
            .map_err(|_| BodyError::Transport(format!("nothing received for {stall:?}")))?;
        match next {
            None => return Ok(out),
            Some(Err(e)) => return Err(BodyError::Transport(describe(&e))),
            Some(Ok(chunk)) => {
                if (out.len() + chunk.len()) as u64 > cap {
                    return Err(BodyError::TooLarge);
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http as images;
    use crate::store::tests::{id, put, rel};
    use axum::extract::{Request, State};
    use axum::middleware::Next;
    use axum::response::Response;
    use axum::Router;
    use gca_protocol::{Fault, FaultKind};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// Records every request (path, Range header) and can cut the first response for a
    /// file after some bytes (an interrupted transfer).
    #[derive(Default)]
    struct Tracker {
        requests: Mutex<Vec<(String, Option<String>)>>,
        cut: Option<(String, usize)>,
        cut_done: AtomicBool,
        /// Sends file bodies in 256 KiB pieces with this pause between them, and, with a
        /// byte count, stops sending (without closing) after that many bytes.
        trickle: Option<(Duration, Option<usize>)>,
    }

    impl Tracker {
        fn requests(&self) -> Vec<(String, Option<String>)> {
            self.requests.lock().unwrap().clone()
        }
        fn file_requests(&self) -> Vec<(String, Option<String>)> {
            self.requests()
                .into_iter()
                .filter(|(p, _)| p.contains("/files/"))
                .collect()
        }
    }

    async fn track(State(t): State<Arc<Tracker>>, req: Request, next: Next) -> Response {
        let path = req.uri().path().to_string();
        let range = req
            .headers()
            .get("range")
            .map(|v| v.to_str().unwrap().to_string());
        t.requests.lock().unwrap().push((path.clone(), range));
        let cut = match &t.cut {
            Some((suffix, n)) if path.ends_with(suffix.as_str()) => {
                (!t.cut_done.swap(true, Ordering::SeqCst)).then_some(*n)
            }
            _ => None,
        };
        let res = next.run(req).await;
        if let (Some((pause, stall_after)), true) = (t.trickle, path.contains("/files/")) {
            return trickled(res, pause, stall_after);
        }
        let Some(n) = cut else { return res };
        let (parts, body) = res.into_parts();
        let mut stream = body.into_data_stream();
        let mut prefix = Vec::new();
        while prefix.len() < n {
            match stream.next().await {
                Some(Ok(b)) => prefix.extend_from_slice(&b),
                _ => break,
            }
        }
        prefix.truncate(n);
        let cut_stream = futures::stream::iter(vec![
            Ok(bytes::Bytes::from(prefix)),
            Err(std::io::Error::other("connection cut by the test")),
        ]);
        Response::from_parts(parts, axum::body::Body::from_stream(cut_stream))
    }

    fn trickled(res: Response, pause: Duration, stall_after: Option<usize>) -> Response {
        let (parts, body) = res.into_parts();
        let pieces = futures::stream::unfold(
            (body.into_data_stream(), bytes::BytesMut::new(), 0usize),
            move |(mut body, mut pending, sent)| async move {
                if stall_after.is_some_and(|n| sent >= n) {
                    std::future::pending::<()>().await;
                }
                while pending.len() < 256 << 10 {
                    match body.next().await {
                        Some(Ok(b)) => pending.extend_from_slice(&b),
                        _ => break,
                    }
                }
                if pending.is_empty() {
                    return None;
                }
                tokio::time::sleep(pause).await;
                let piece = pending.split_to(pending.len().min(256 << 10)).freeze();
                let n = piece.len();
                Some((Ok::<_, std::io::Error>(piece), (body, pending, sent + n)))
            },
        );
        Response::from_parts(parts, axum::body::Body::from_stream(pieces))
    }

    async fn serve_tracked(store: ImageStore, tracker: Arc<Tracker>) -> String {
        let app = Router::new()
            .nest("/images", images::routes())
            .with_state(store)
            .layer(axum::middleware::from_fn_with_state(tracker, track));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/images")
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const BIG: usize = 8 << 20;

    struct Setup {
        _tmp: tempfile::TempDir,
        src: ImageStore,
        dst: ImageStore,
        dst_root: std::path::PathBuf,
        base: String,
        tracker: Arc<Tracker>,
        big: Vec<u8>,
        digest: String,
    }

    async fn setup(tracker: Tracker, dst_quota: Option<u64>) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let dst_root = tmp.path().join("dst");
        let dst = ImageStore::open(&dst_root, dst_quota).unwrap();
        let big = noise(BIG, 42);
        put(
            &src,
            "ckpt-1",
            &[
                ("pages-1.img", &big),
                ("core-1.img", b"core"),
                ("empty", b""),
                ("fs/root/c++.log", b"log"),
            ],
        )
        .await;
        let digest = src.digest(&id("ckpt-1")).await.unwrap();
        let tracker = Arc::new(tracker);
        let base = serve_tracked(src.clone(), tracker.clone()).await;
        Setup {
            _tmp: tmp,
            src,
            dst,
            dst_root,
            base,
            tracker,
            big,
            digest,
        }
    }

    fn quick() -> FetchOptions {
        FetchOptions {
            attempts: 3,
            backoff: Duration::from_millis(10),
            stall_timeout: Duration::from_secs(10),
        }
    }

    /// Nothing in `staging/` but the trash being removed in the background.
    fn staging_is_empty(root: &Path) -> bool {
        std::fs::read_dir(root.join("staging")).unwrap().all(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(crate::store::TRASH_PREFIX)
        })
    }

    #[tokio::test]
    async fn fetch_copies_an_image_with_the_same_digest() {
        let s = setup(Tracker::default(), None).await;
        let http = crate::http::tests::client();
        let m = fetch_image(&http, &s.base, &id("ckpt-1"), Some(&s.digest), &s.dst)
            .await
            .unwrap();
        assert_eq!(m, s.src.manifest(&id("ckpt-1")).await.unwrap());
        assert_eq!(s.dst.digest(&id("ckpt-1")).await.unwrap(), s.digest);
        assert_eq!(
            s.dst.manifest_bytes(&id("ckpt-1")).await.unwrap(),
            s.src.manifest_bytes(&id("ckpt-1")).await.unwrap()
        );
        s.dst.verify(&id("ckpt-1")).await.unwrap();
        let p = s
            .dst
            .file_path(&id("ckpt-1"), &rel("pages-1.img"))
            .await
            .unwrap();
        assert!(std::fs::read(p).unwrap() == s.big);
        assert_eq!(s.dst.usage(), BIG as u64 + 7);
        assert!(staging_is_empty(&s.dst_root));
        // The empty file needs no request.
        assert_eq!(s.tracker.file_requests().len(), 3);

        // Already here: no download at all.
        let before = s.tracker.requests().len();
        let again = fetch_image(&http, &s.base, &id("ckpt-1"), Some(&s.digest), &s.dst)
            .await
            .unwrap();
        assert_eq!(again, m);
        let after = s.tracker.requests();
        assert_eq!(after.len(), before + 1);
        assert!(!after.last().unwrap().0.contains("/files/"));
    }

    /// A transfer slower than any whole-request timeout completes while it makes progress
    /// (the CTS fetches with `transport::transfer_client`); one that stops sending fails
    /// after the stall timeout, saying so.
    #[tokio::test]
    async fn a_slow_transfer_is_bounded_by_progress_not_by_time() {
        // One attempt of image ckpt-1 into the destination, with `stall` as its stall bound.
        async fn fetch_once(
            http: &reqwest::Client,
            s: &Setup,
            stall: Duration,
        ) -> Result<Manifest, Error> {
            let once = FetchOptions {
                attempts: 1,
                backoff: Duration::from_millis(10),
                stall_timeout: stall,
            };
            fetch_image_with(http, &s.base, &id("ckpt-1"), Some(&s.digest), &s.dst, &once).await
        }
        // 8 MiB in 32 pieces, 30 ms apart: about 1 s.
        let slow = Tracker {
            trickle: Some((Duration::from_millis(30), None)),
            ..Default::default()
        };
        let s = setup(slow, None).await;
        let bounded =
            gca_protocol::transport::http_client(&gca_protocol::transport::ClientSettings {
                request_timeout: Duration::from_millis(400),
                ..Default::default()
            })
            .unwrap();
        let e = fetch_once(&bounded, &s, Duration::from_secs(1))
            .await
            .expect_err("a whole-request timeout cuts a slow transfer");
        assert!(e.to_string().contains("pages-1.img"), "{e}");
        let transfers = gca_protocol::transport::transfer_client(Default::default()).unwrap();
        fetch_once(&transfers, &s, Duration::from_secs(1))
            .await
            .expect("a transfer that makes progress completes");
        s.dst.verify(&id("ckpt-1")).await.unwrap();

        let stalled = Tracker {
            trickle: Some((Duration::from_millis(1), Some(1 << 20))),
            ..Default::default()
        };
        let s = setup(stalled, None).await;
        let e = fetch_once(&transfers, &s, Duration::from_millis(500))
            .await
            .expect_err("a transfer that stops sending fails");
        assert!(e.to_string().contains("sent nothing for"), "{e}");
        assert!(s.dst.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_tampered_file_is_refused_and_nothing_is_committed() {
        let s = setup(Tracker::default(), None).await;
        let p = s
            .src
            .file_path(&id("ckpt-1"), &rel("pages-1.img"))
            .await
            .unwrap();
        let mut data = std::fs::read(&p).unwrap();
        data[BIG / 2] ^= 0xff;
        std::fs::write(&p, data).unwrap();

        let http = crate::http::tests::client();
        let e = fetch_image_with(
            &http,
            &s.base,
            &id("ckpt-1"),
            Some(&s.digest),
            &s.dst,
            &quick(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        assert!(e.to_string().contains("pages-1.img"), "{e}");
        let f: Fault = e.into();
        assert_eq!(f.kind, FaultKind::OperationFailed);
        assert_eq!(f.code.as_deref(), Some("image-corrupt"));
        assert!(s.dst.list().await.unwrap().is_empty());
        assert!(staging_is_empty(&s.dst_root));
        assert_eq!(s.dst.usage(), 0);
    }

    #[tokio::test]
    async fn a_wrong_digest_is_refused_before_any_download() {
        let s = setup(Tracker::default(), None).await;
        let http = crate::http::tests::client();
        let wrong = format!("sha256:{}", "0".repeat(64));
        let e = fetch_image(&http, &s.base, &id("ckpt-1"), Some(&wrong), &s.dst)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::DigestMismatch(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&s.digest) && msg.contains(&wrong), "{msg}");
        assert!(
            msg.contains("refusing a corrupt or tampered image"),
            "{msg}"
        );
        assert_eq!(Fault::from(e).code.as_deref(), Some("image-corrupt"));
        assert!(s.tracker.file_requests().is_empty());
        assert!(s.dst.list().await.unwrap().is_empty());
        assert!(staging_is_empty(&s.dst_root));
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_with_a_range() {
        let cut_at = 3 << 20;
        let s = setup(
            Tracker {
                cut: Some(("pages-1.img".into(), cut_at)),
                ..Tracker::default()
            },
            None,
        )
        .await;
        let http = crate::http::tests::client();
        let m = fetch_image_with(
            &http,
            &s.base,
            &id("ckpt-1"),
            Some(&s.digest),
            &s.dst,
            &quick(),
        )
        .await
        .unwrap();
        assert_eq!(m.id, "ckpt-1");
        assert_eq!(s.dst.digest(&id("ckpt-1")).await.unwrap(), s.digest);
        s.dst.verify(&id("ckpt-1")).await.unwrap();

        let pages: Vec<_> = s
            .tracker
            .file_requests()
            .into_iter()
            .filter(|(p, _)| p.ends_with("pages-1.img"))
            .collect();
        assert_eq!(pages.len(), 2, "{pages:?}");
        assert_eq!(pages[0].1, None);
        let range = pages[1]
            .1
            .as_deref()
            .expect("the second request has a Range");
        let start: u64 = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .unwrap()
            .parse()
            .unwrap();
        assert!(start > 0 && start <= cut_at as u64, "{range}");
        assert!(staging_is_empty(&s.dst_root));
    }

    #[tokio::test]
    async fn a_partial_file_in_staging_is_resumed_or_redone() {
        let s = setup(Tracker::default(), None).await;
        let http = crate::http::tests::client();
        let opts = quick();
        let ctx = Ctx {
            http: &http,
            base: &s.base,
            id: &id("ckpt-1"),
            store: &s.dst,
            opts: &opts,
            written: Default::default(),
        };
        let m = s.src.manifest(&id("ckpt-1")).await.unwrap();
        let entry = m.files.iter().find(|f| f.path == "pages-1.img").unwrap();

        // A good prefix: one ranged request.
        let staging = s.dst.stage(&id("ckpt-1")).await.unwrap();
        let dest = staging.dir.join("pages-1.img");
        std::fs::write(&dest, &s.big[..1_000_000]).unwrap();
        ctx.download_file(entry, &dest).await.unwrap();
        assert!(std::fs::read(&dest).unwrap() == s.big);
        assert_eq!(
            s.tracker.file_requests(),
            [(
                "/images/ckpt-1/files/pages-1.img".to_string(),
                Some("bytes=1000000-".to_string())
            )]
        );

        // A bad prefix: the ranged result does not match, so the whole file again.
        let mut bad = s.big[..500].to_vec();
        bad[3] ^= 1;
        std::fs::write(&dest, &bad).unwrap();
        ctx.download_file(entry, &dest).await.unwrap();
        assert!(std::fs::read(&dest).unwrap() == s.big);
        let reqs = s.tracker.file_requests();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[1].1.as_deref(), Some("bytes=500-"));
        assert_eq!(reqs[2].1, None);

        // Longer than the manifest says: started over.
        let mut long = s.big.clone();
        long.push(0);
        std::fs::write(&dest, &long).unwrap();
        ctx.download_file(entry, &dest).await.unwrap();
        assert!(std::fs::read(&dest).unwrap() == s.big);
        assert_eq!(s.tracker.file_requests()[3].1, None);

        std::fs::write(staging.dir.join("core-1.img"), b"core").unwrap();
        std::fs::write(staging.dir.join("empty"), b"").unwrap();
        std::fs::create_dir_all(staging.dir.join("fs/root")).unwrap();
        std::fs::write(staging.dir.join("fs/root/c++.log"), b"log").unwrap();
        staging
            .commit_with_manifest(s.src.manifest_bytes(&id("ckpt-1")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(s.dst.digest(&id("ckpt-1")).await.unwrap(), s.digest);
    }

    #[tokio::test]
    async fn unknown_images_unreachable_sources_and_full_stores() {
        let s = setup(Tracker::default(), Some(1 << 20)).await;
        let http = crate::http::tests::client();

        let e = fetch_image_with(&http, &s.base, &id("nope"), None, &s.dst, &quick())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!(Fault::from(e).kind, FaultKind::ResourceUnknown);

        // An ID that could leave the store cannot even be named.
        let e = ImageId::parse("../x").unwrap_err();
        assert!(matches!(e, Error::InvalidId(_)), "{e}");

        // The image (8 MB) does not fit the 1 MB quota: refused before any file request.
        let e = fetch_image_with(
            &http,
            &s.base,
            &id("ckpt-1"),
            Some(&s.digest),
            &s.dst,
            &quick(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::StoreFull(_)), "{e}");
        assert!(s.tracker.file_requests().is_empty());
        assert!(staging_is_empty(&s.dst_root));

        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = fetch_image_with(
            &http,
            &format!("http://127.0.0.1:{port}/images/"),
            &id("ckpt-1"),
            None,
            &s.dst,
            &quick(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("3 attempts"), "{e}");
        assert_eq!(Fault::from(e).kind, FaultKind::ServiceUnavailable);
    }

    // ---- format 2: chunks -----------------------------------------------------------------

    async fn put_chunked(store: &ImageStore, id: &str, pages: &[u8]) -> Manifest {
        crate::store::tests::put_v2(
            store,
            id,
            &[("pages-1.img", pages), ("core-1.img", b"core")],
        )
        .await
    }

    fn chunk_requests(t: &Tracker) -> usize {
        t.requests()
            .iter()
            .filter(|(p, _)| p.ends_with("/chunks"))
            .count()
    }

    #[tokio::test]
    async fn a_chunked_image_transfers_only_the_chunks_the_store_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let dst = ImageStore::open(&tmp.path().join("dst"), None).unwrap();
        let tracker = Arc::new(Tracker::default());
        let base = serve_tracked(src.clone(), tracker.clone()).await;
        let http = reqwest::Client::new();
        let mut pages = noise(20 << 20, 7);
        put_chunked(&src, "ckpt-1", &pages).await;
        let d1 = src.digest(&id("ckpt-1")).await.unwrap();
        let f1 = fetch_image_report(
            &http,
            &base,
            &id("ckpt-1"),
            Some(&d1),
            &dst,
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(f1.bytes_transferred, (20 << 20) + 4);
        assert_eq!(f1.chunks_present, 0);
        assert_eq!(dst.digest(&id("ckpt-1")).await.unwrap(), d1);
        // No file was asked for: chunks only, in batches of at most 8 MiB.
        assert!(tracker.file_requests().is_empty());
        assert!(chunk_requests(&tracker) >= 3, "{:?}", tracker.requests());

        // The next checkpoint of the job: three pages changed.
        for at in [1 << 20, 9 << 20, 17 << 20] {
            pages[at] ^= 0x5a;
        }
        put_chunked(&src, "ckpt-2", &pages).await;
        let d2 = src.digest(&id("ckpt-2")).await.unwrap();
        let f2 = fetch_image_report(
            &http,
            &base,
            &id("ckpt-2"),
            Some(&d2),
            &dst,
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert!(f2.chunks_transferred <= 3, "{f2:?}");
        assert!(
            f2.bytes_transferred <= 3 * crate::chunks::MAX_CHUNK as u64,
            "{}",
            f2.bytes_transferred
        );
        assert!(f2.chunks_present > 100, "{}", f2.chunks_present);
        assert_eq!(f2.checked.len(), f2.chunks_transferred);
        let dir = dst
            .materialize_checked(&id("ckpt-2"), f2.checked.clone())
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.join("pages-1.img")).unwrap(), pages);
        assert_eq!(std::fs::read(dir.join("core-1.img")).unwrap(), b"core");
        assert_eq!(dst.verify(&id("ckpt-2")).await.unwrap().id, "ckpt-2");

        // Only the chunks the fetch checked are trusted: one the store had before is
        // checked as the restore copy reads it.
        let m2 = dst.manifest(&id("ckpt-2")).await.unwrap();
        let old = m2
            .files
            .iter()
            .flat_map(|f| &f.chunks)
            .find(|c| !f2.checked.contains(&c.id) && c.size > 100)
            .unwrap();
        crate::local_chunks::flip_byte(&tmp.path().join("dst/chunks"), &old.id, 50);
        match dst.materialize_checked(&id("ckpt-2"), f2.checked).await {
            Err(Error::ChunkCorrupt { image, chunk, .. }) => {
                assert_eq!((image.as_str(), chunk), ("ckpt-2", old.id.to_hex()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_interrupted_chunk_batch_asks_again_for_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let dst = ImageStore::open(&tmp.path().join("dst"), None).unwrap();
        let tracker = Arc::new(Tracker {
            cut: Some(("/chunks".into(), 3 << 20)),
            ..Default::default()
        });
        let base = serve_tracked(src.clone(), tracker.clone()).await;
        let pages = noise(6 << 20, 9);
        put_chunked(&src, "ckpt-1", &pages).await;
        let opts = FetchOptions {
            backoff: Duration::from_millis(10),
            ..Default::default()
        };
        let f = fetch_image_report(
            &reqwest::Client::new(),
            &base,
            &id("ckpt-1"),
            None,
            &dst,
            &opts,
        )
        .await
        .unwrap();
        // Everything once, plus at most the chunk that was cut.
        assert!(f.bytes_transferred == (6 << 20) + 4, "{f:?}");
        assert_eq!(chunk_requests(&tracker), 2);
        let dir = dst.materialize(&id("ckpt-1")).await.unwrap();
        assert_eq!(std::fs::read(dir.join("pages-1.img")).unwrap(), pages);
    }

    #[tokio::test]
    async fn a_flipped_byte_in_a_chunk_stops_the_fetch_naming_image_and_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let dst_root = tmp.path().join("dst");
        let dst = ImageStore::open(&dst_root, None).unwrap();
        let base = serve_tracked(src.clone(), Arc::new(Tracker::default())).await;
        let m = put_chunked(&src, "ckpt-1", &noise(2 << 20, 3)).await;
        let victim = m
            .files
            .iter()
            .find(|f| f.path == "pages-1.img")
            .unwrap()
            .chunks[5];
        crate::local_chunks::flip_byte(&tmp.path().join("src/chunks"), &victim.id, 100);

        let e = fetch_image(&reqwest::Client::new(), &base, &id("ckpt-1"), None, &dst)
            .await
            .unwrap_err();
        match &e {
            Error::ChunkCorrupt {
                image, file, chunk, ..
            } => {
                assert_eq!(image, "ckpt-1");
                assert_eq!(file, "pages-1.img");
                assert_eq!(chunk, &victim.id.to_hex());
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&victim.id.to_hex()) && msg.contains("ckpt-1"),
            "{msg}"
        );
        let f: Fault = e.into();
        assert_eq!(f.code.as_deref(), Some("image-corrupt"));
        assert!(dst.list().await.unwrap().is_empty());
        assert!(std::fs::read_dir(dst_root.join("staging"))
            .unwrap()
            .next()
            .is_none());

        // The source's own restore catches it too.
        let e = src.materialize(&id("ckpt-1")).await.unwrap_err();
        assert!(matches!(e, Error::ChunkCorrupt { .. }), "{e:?}");
        assert!(matches!(
            src.verify(&id("ckpt-1")).await,
            Err(Error::ChunkCorrupt { .. })
        ));
    }

    #[tokio::test]
    async fn the_chunk_endpoint_serves_only_chunks_of_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let base = serve_tracked(src.clone(), Arc::new(Tracker::default())).await;
        let a = put_chunked(&src, "a", &noise(300_000, 1)).await;
        let b = put_chunked(&src, "b", &noise(300_000, 2)).await;
        let http = reqwest::Client::new();
        let ask = |img: &str, names: Vec<String>| {
            http.post(format!("{base}/{img}/chunks"))
                .json(&serde_json::json!({ "chunks": names }))
                .send()
        };
        let ca = a.files[1].chunks[0];
        let cb = b.files[1].chunks[0];
        let res = ask("a", vec![ca.id.to_hex(), ca.id.to_hex()])
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = res.bytes().await.unwrap();
        assert_eq!(body.len(), 2 * ca.size as usize);
        assert_eq!(ChunkId::of(&body[..ca.size as usize]), ca.id);
        // Another image's chunk through this image: refused whole.
        let res = ask("a", vec![ca.id.to_hex(), cb.id.to_hex()])
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
        for bad in [
            vec!["../../../etc/passwd".to_string()],
            vec![ca.id.to_hex().to_uppercase()],
            vec![],
            vec![ca.id.to_hex(); MAX_CHUNKS_PER_REQUEST + 1],
        ] {
            let res = ask("a", bad).await.unwrap();
            assert_eq!(res.status(), 400);
        }
        // A format 1 image has no chunks.
        put(&src, "old", &[("f", b"x")]).await;
        assert_eq!(
            ask("old", vec![ca.id.to_hex()]).await.unwrap().status(),
            404
        );
        // The files endpoint makes whole files from chunks, with ranges.
        let res = http
            .get(format!("{base}/a/files/pages-1.img"))
            .header("range", "bytes=70000-70009")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 206);
        assert_eq!(
            &res.bytes().await.unwrap()[..],
            &noise(300_000, 1)[70000..70010]
        );
        let res = http
            .get(format!("{base}/a/files/pages-1.img"))
            .send()
            .await
            .unwrap();
        assert_eq!(&res.bytes().await.unwrap()[..], &noise(300_000, 1)[..]);
    }

    #[tokio::test]
    async fn an_old_format_image_is_fetched_by_files_and_materialized_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let src = ImageStore::open(&tmp.path().join("src"), None).unwrap();
        let dst = ImageStore::open(&tmp.path().join("dst"), None).unwrap();
        let tracker = Arc::new(Tracker::default());
        let base = serve_tracked(src.clone(), tracker.clone()).await;
        let m = put(&src, "old", &[("pages-1.img", &noise(1 << 20, 5))]).await;
        assert_eq!(m.format, 1);
        let d = src.digest(&id("old")).await.unwrap();
        let f = fetch_image_report(
            &reqwest::Client::new(),
            &base,
            &id("old"),
            Some(&d),
            &dst,
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(f.bytes_transferred, 1 << 20);
        assert_eq!(tracker.file_requests().len(), 1);
        let dir = dst.materialize(&id("old")).await.unwrap();
        assert_eq!(dir, tmp.path().join("dst/images/old"));
        assert_eq!(
            std::fs::read(dir.join("pages-1.img")).unwrap(),
            noise(1 << 20, 5)
        );
        assert_eq!(dst.digest(&id("old")).await.unwrap(), d);
    }
}
