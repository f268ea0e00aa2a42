//! The object-store tier (issue 12): a job's image chunks and manifests in an S3-compatible
//! bucket (Garage, Ceph RGW, MinIO, AWS S3), so that a checkpoint outlives the resource that
//! took it.
//!
//! # Layout of the bucket
//!
//! Everything of one job is under `PREFIX/jobs/<J>/`, where `J` is the hex SHA-256 of the
//! job's GID (a GID is not a safe object name, and a listing does not show GIDs):
//!
//! | object | contents |
//! |---|---|
//! | `…/chunks/<N>` | one chunk, sealed: AES-256-GCM under the job's chunk key; `N` = hex HMAC-SHA-256 of the chunk's BLAKE3 digest under the job's name key |
//! | `…/packs/<P>`, `…/packs/<P>.index` | chunks sealed as above, concatenated; the pack's index, sealed under the manifest key (`transfer`) |
//! | `…/images/<image-id>/manifest` | the image's `manifest.json` and where its chunks lie in the packs (`places`), sealed under the manifest key (random nonce, stored in front) |
//!
//! # Keys
//!
//! Each job has one 32-byte key, made and kept by the GCS (`GetJobKey`), given only to the
//! CTS the job is on. From it HKDF-SHA-256 derives three keys: for chunk contents, for chunk
//! names and for manifests. Chunk names are keyed so that a bucket's listing does not reveal
//! the digests of the plaintext (which would confirm guessed contents, e.g. a known library's
//! pages); a chunk's nonce is derived from its digest, so the same chunk of one job always
//! seals to the same object: deduplication within a job, and an upload is idempotent. Nothing
//! in the bucket opens without the job's key; a sealed object moved to another name or job
//! does not open either (the name is the associated data).
//!
//! # Blocking
//!
//! [`JobChunks`] implements [`gca_store::ChunkBackend`], whose methods block: they are called
//! from blocking threads (never from a runtime worker) and run the requests on the runtime
//! the [`Bucket`] was opened in.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gca_store::{ChunkBackend, ChunkId};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};
use serde::Deserialize;

mod places;
mod transfer;
pub use places::Places;
pub use transfer::{distinct_chunks, Moved, IN_FLIGHT, PACK_BYTES};

/// Bytes of a job key.
pub const JOB_KEY_LEN: usize = 32;

/// One error type for the tier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object store configuration: {0}")]
    Config(String),
    #[error("object store {endpoint}: {source}")]
    Store {
        endpoint: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}")]
    Sealed(String),
    /// What came from the bucket is not what was stored: a seal that does not open, or a
    /// chunk that does not hash to its name.
    #[error("{0}")]
    Corrupt(String),
    /// The local side of a transfer failed (the local store, a blocking task).
    #[error("{0}")]
    Local(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// A secret string that never shows in `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the bucket is and how to reach it (`[object_store]` of a CTS configuration).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// The S3 endpoints, tried in this order (each node of a Garage cluster serves the whole
    /// bucket; the nearest first).
    pub endpoints: Vec<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Object names start with this (several sites or test runs can share a bucket).
    #[serde(default)]
    pub prefix: String,
    /// Plain `http://` endpoints are refused unless this is set (a test cluster on loopback,
    /// or a TLS-terminating proxy on the same host); what is stored is sealed either way.
    #[serde(default)]
    pub allow_http: bool,
    /// Bound on one request, in seconds (a request carries at most one pack: 8 MiB).
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
}

fn default_timeout() -> u64 {
    30
}

/// One endpoint's client.
#[derive(Debug)]
struct Endpoint {
    url: String,
    store: Arc<dyn ObjectStore>,
}

/// An open bucket: a client per endpoint, and the runtime its blocking callers use.
#[derive(Debug, Clone)]
pub struct Bucket {
    endpoints: Arc<Vec<Endpoint>>,
    prefix: String,
    runtime: tokio::runtime::Handle,
}

impl Bucket {
    /// Opens the bucket (no request yet); call inside a Tokio runtime.
    pub fn open(config: &BucketConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let mut endpoints = Vec::new();
        for url in &config.endpoints {
            let http = url.starts_with("http://");
            if !http && !url.starts_with("https://") {
                return Err(Error::Config(format!(
                    "endpoint {url:?} is neither https:// nor http://"
                )));
            }
            if http && !config.allow_http {
                return Err(Error::Config(format!(
                    "endpoint {url} is plain HTTP: use https, or set allow_http = true for a loopback test cluster or a local TLS proxy"
                )));
            }
            let store = AmazonS3Builder::new()
                .with_endpoint(url)
                .with_region(&config.region)
                .with_bucket_name(&config.bucket)
                .with_access_key_id(&config.access_key_id)
                .with_secret_access_key(config.secret_access_key.expose())
                .with_virtual_hosted_style_request(false)
                // (allow_http lives in the client options: set there, not on the builder,
                // which the options would override.)
                .with_client_options(
                    ClientOptions::new()
                        .with_allow_http(config.allow_http)
                        .with_timeout(Duration::from_secs(config.request_timeout_secs.max(1)))
                        .with_connect_timeout(Duration::from_secs(5)),
                )
                // A node that is down is left for the next endpoint soon.
                .with_retry(RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(10),
                    ..Default::default()
                })
                .build()
                .map_err(|e| Error::Config(format!("endpoint {url}: {e}")))?;
            endpoints.push(Endpoint {
                url: url.clone(),
                store: Arc::new(store),
            });
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("Bucket::open needs a Tokio runtime".into()))?;
        Ok(Bucket {
            endpoints: Arc::new(endpoints),
            prefix: config.prefix.trim_matches('/').to_string(),
            runtime,
        })
    }

    /// The chunks and manifests of job `gid`, sealed under `key` (from the GCS's GetJobKey).
    pub fn job(&self, gid: &str, key: &[u8; JOB_KEY_LEN]) -> JobChunks {
        let digest = ring::digest::digest(&ring::digest::SHA256, gid.as_bytes());
        let mut dir = String::new();
        if !self.prefix.is_empty() {
            dir.push_str(&self.prefix);
            dir.push('/');
        }
        dir.push_str("jobs/");
        dir.push_str(&hex::encode(digest.as_ref()));
        JobChunks {
            bucket: self.clone(),
            gid: gid.to_string(),
            dir,
            keys: JobKeys::derive(key),
            packs: Default::default(),
        }
    }

    /// The names of every object under `prefix` (one paginated listing).
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = ObjectPath::from(prefix);
        self.each(|s| {
            let prefix = prefix.clone();
            async move {
                s.list(Some(&prefix))
                    .map_ok(|m| m.location.to_string())
                    .try_collect::<Vec<_>>()
                    .await
            }
        })
        .await
    }

    /// Deletes an object; one that is not there counts as deleted.
    async fn delete(&self, path: &ObjectPath) -> Result<()> {
        match self
            .each(|s| {
                let path = path.clone();
                async move { s.delete(&path).await }
            })
            .await
        {
            Ok(())
            | Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs `op` against each endpoint in turn until one answers (a `NotFound` is an answer).
    async fn each<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<dyn ObjectStore>) -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut last = None;
        for e in self.endpoints.iter() {
            match op(e.store.clone()).await {
                Ok(v) => return Ok(v),
                Err(err @ object_store::Error::NotFound { .. }) => {
                    return Err(Error::Store {
                        endpoint: e.url.clone(),
                        source: err,
                    })
                }
                Err(err) => {
                    tracing::warn!(endpoint = %e.url, error = %err, "object store endpoint failed; trying the next");
                    last = Some(Error::Store {
                        endpoint: e.url.clone(),
                        source: err,
                    });
                }
            }
        }
        Err(last.expect("at least one endpoint"))
    }
}

/// The three keys derived from a job key.
struct JobKeys {
    chunks: LessSafeKey,
    manifests: LessSafeKey,
    names: hmac::Key,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl JobKeys {
    fn derive(key: &[u8; JOB_KEY_LEN]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"gca object store v1").extract(key);
        let expand = |info: &[u8]| {
            let mut out = [0u8; 32];
            prk.expand(&[info], Len(32))
                .and_then(|okm| okm.fill(&mut out))
                .expect("32 bytes from HKDF-SHA-256");
            out
        };
        let aead = |info: &[u8]| {
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &expand(info)).expect("a 32-byte key"))
        };
        JobKeys {
            chunks: aead(b"chunks"),
            manifests: aead(b"manifests"),
            names: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"names")),
        }
    }
}

/// One job's part of the bucket: a [`ChunkBackend`], and its manifests.
pub struct JobChunks {
    bucket: Bucket,
    gid: String,
    dir: String,
    keys: JobKeys,
    /// The pack indexes read so far (packs never change once written).
    packs: std::sync::Mutex<transfer::PackIndex>,
}

impl std::fmt::Debug for JobChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobChunks")
            .field("gid", &self.gid)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl JobChunks {
    /// The object name of a chunk: keyed, so that it does not reveal the chunk's digest.
    fn chunk_name(&self, id: &ChunkId) -> String {
        format!("{}/chunks/{}", self.dir, hex::encode(self.chunk_tag(id)))
    }

    /// A chunk's keyed tag: its object name's last part, and its key in pack indexes.
    fn chunk_tag(&self, id: &ChunkId) -> [u8; 32] {
        let tag = hmac::sign(&self.keys.names, id.to_hex().as_bytes());
        tag.as_ref().try_into().expect("32 bytes of HMAC-SHA-256")
    }

    /// Seals a small object (a manifest, a pack index) under the manifest key: a random
    /// nonce in front, the object's name as associated data.
    fn seal_blob(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Sealed("no random numbers for a nonce".into()))?;
        let mut sealed = plain.to_vec();
        self.keys
            .manifests
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| Error::Sealed(format!("cannot seal {name}")))?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&sealed);
        Ok(body)
    }

    /// Opens what [`JobChunks::seal_blob`] made; `what` names it in errors.
    fn open_blob(&self, name: &str, body: &[u8], what: &str) -> Result<Vec<u8>> {
        if body.len() < NONCE_LEN {
            return Err(Error::Sealed(format!(
                "{what} of job {:?} in the object store is truncated",
                self.gid
            )));
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let mut sealed = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        let plain = self
            .keys
            .manifests
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut sealed)
            .map_err(|_| {
                Error::Sealed(format!(
                    "{what} of job {:?} in the object store does not open with the job's key (altered, or not this job's)",
                    self.gid
                ))
            })?;
        Ok(plain.to_vec())
    }

    fn manifest_name(&self, image: &str) -> Result<String> {
        let ok = !image.is_empty()
            && image.len() <= 128
            && image
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !image.starts_with('.');
        if !ok {
            return Err(Error::Config(format!("{image:?} is not an image ID")));
        }
        Ok(format!("{}/images/{image}/manifest", self.dir))
    }

    fn seal_chunk(&self, name: &str, id: &ChunkId, data: &[u8]) -> Vec<u8> {
        // The nonce follows from the digest: one chunk, one sealed form (see the module doc).
        let tag = hmac::sign(
            &self.keys.names,
            format!("nonce {}", id.to_hex()).as_bytes(),
        );
        let nonce: [u8; NONCE_LEN] = tag.as_ref()[..NONCE_LEN].try_into().expect("12 bytes");
        let mut out = data.to_vec();
        self.keys
            .chunks
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut out,
            )
            .expect("sealing a chunk");
        out
    }

    fn open_chunk(&self, name: &str, id: &ChunkId, mut sealed: Vec<u8>) -> io::Result<Vec<u8>> {
        let tag = hmac::sign(
            &self.keys.names,
            format!("nonce {}", id.to_hex()).as_bytes(),
        );
        let nonce: [u8; NONCE_LEN] = tag.as_ref()[..NONCE_LEN].try_into().expect("12 bytes");
        let n = self
            .keys
            .chunks
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "chunk {id} of job {:?} in the object store does not open with the job's key (altered, or not this job's)",
                        self.gid
                    ),
                )
            })?
            .len();
        sealed.truncate(n);
        Ok(sealed)
    }

    /// [`JobChunks::open_chunk`] for the transfers: a seal that does not open is corruption.
    fn open_sealed_chunk(&self, name: &str, id: &ChunkId, sealed: Vec<u8>) -> Result<Vec<u8>> {
        if sealed.len() > gca_store::chunks::MAX_CHUNK + AES_256_GCM.tag_len() {
            return Err(Error::Corrupt(format!(
                "chunk {id} of job {:?} in the object store is larger than any chunk",
                self.gid
            )));
        }
        self.open_chunk(name, id, sealed)
            .map_err(|e| Error::Corrupt(e.to_string()))
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.bucket.runtime.block_on(f)
    }

    /// Stores an image's manifest (its exact bytes) with where its chunks are (what
    /// [`JobChunks::upload_chunks`] returned), sealed.
    pub async fn put_manifest(&self, image: &str, manifest: &[u8], places: &Places) -> Result<()> {
        let name = self.manifest_name(image)?;
        let body = bytes::Bytes::from(self.seal_blob(&name, &places::encode(manifest, places))?);
        let path = ObjectPath::from(name.as_str());
        self.bucket
            .each(|s| {
                let (path, body) = (path.clone(), body.clone());
                async move { s.put(&path, PutPayload::from(body)).await }
            })
            .await?;
        Ok(())
    }

    /// An image's manifest bytes, as stored by [`JobChunks::put_manifest`]; `None` if absent.
    pub async fn get_manifest(&self, image: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_image(image).await?.map(|(manifest, _)| manifest))
    }

    /// An image's manifest bytes and where its chunks are (nothing placed for a manifest an
    /// earlier version stored); `None` if absent.
    pub async fn get_image(&self, image: &str) -> Result<Option<(Vec<u8>, Places)>> {
        let name = self.manifest_name(image)?;
        let path = ObjectPath::from(name.as_str());
        let body = match self
            .bucket
            .each(|s| {
                let path = path.clone();
                async move { s.get(&path).await?.bytes().await }
            })
            .await
        {
            Ok(b) => b.to_vec(),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let what = format!("the manifest of image {image}");
        let plain = self.open_blob(&name, &body, &what)?;
        places::decode(plain).map(Some).ok_or_else(|| {
            Error::Corrupt(format!(
                "{what} of job {:?} in the object store is malformed",
                self.gid
            ))
        })
    }

    /// Removes an image's manifest (its chunks go at the next [`JobChunks::sweep`]).
    pub async fn delete_manifest(&self, image: &str) -> Result<()> {
        let path = ObjectPath::from(self.manifest_name(image)?.as_str());
        self.bucket.delete(&path).await
    }

    /// The IDs of the images whose manifests the job has in the bucket.
    pub async fn images(&self) -> Result<Vec<String>> {
        let names = self.bucket.list(&format!("{}/images", self.dir)).await?;
        let mut ids: Vec<String> = names
            .iter()
            .filter_map(|n| {
                let rest = n.strip_prefix(&format!("{}/images/", self.dir))?;
                let id = rest.strip_suffix("/manifest")?;
                (!id.contains('/')).then(|| id.to_string())
            })
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Removes every chunk of the job that `keep` (the chunks of the job's images still
    /// recorded) does not name, and every pack none of whose chunks it names; returns how
    /// many objects (single chunks and packs) went. The caller makes `keep` under the same
    /// rule as the local store's sweep: an image being uploaded counts as kept.
    pub async fn sweep(&self, keep: &BTreeSet<ChunkId>) -> Result<usize> {
        let wanted: BTreeSet<String> = keep.iter().map(|id| self.chunk_name(id)).collect();
        let names = self.bucket.list(&format!("{}/chunks", self.dir)).await?;
        let unwanted: Vec<ObjectPath> = names
            .into_iter()
            .filter(|n| !wanted.contains(n))
            .map(|n| ObjectPath::from(n.as_str()))
            .collect();
        let removed = unwanted.len();
        futures::stream::iter(unwanted)
            .map(|name| async move { self.bucket.delete(&name).await })
            .buffer_unordered(IN_FLIGHT * 4)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(removed + self.sweep_packs(keep).await?)
    }
}

fn io_err(e: Error) -> io::Error {
    match e {
        Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        } => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

impl ChunkBackend for JobChunks {
    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        let path = ObjectPath::from(self.chunk_name(id).as_str());
        match self.block_on(self.bucket.each(|s| {
            let path = path.clone();
            async move { s.head(&path).await }
        })) {
            Ok(_) => Ok(true),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => self.block_on(self.is_packed(id)).map_err(io_err),
            Err(e) => Err(io_err(e)),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> io::Result<bool> {
        if self.has(id)? {
            return Ok(false);
        }
        let name = self.chunk_name(id);
        let sealed = self.seal_chunk(&name, id, data);
        let path = ObjectPath::from(name.as_str());
        // One PUT is atomic in S3: an object is whole or absent. The same chunk sealed twice
        // is the same object, so a race between two writers is harmless.
        self.block_on(self.bucket.each(|s| {
            let (path, body) = (path.clone(), sealed.clone());
            async move { s.put(&path, PutPayload::from(body)).await }
        }))
        .map_err(io_err)?;
        Ok(true)
    }

    fn sync(&self, _written: &[ChunkId]) -> io::Result<()> {
        // An S3 PUT is answered once the object is stored (Garage: on a write quorum).
        Ok(())
    }

    fn read(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let name = self.chunk_name(id);
        let path = ObjectPath::from(name.as_str());
        let sealed = match self.block_on(self.bucket.each(|s| {
            let path = path.clone();
            async move { s.get(&path).await?.bytes().await }
        })) {
            Ok(b) => b,
            Err(
                e @ Error::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                },
            ) => match self.block_on(self.read_packed(id)).map_err(io_err)? {
                Some(b) => b,
                None => return Err(io_err(e)),
            },
            Err(e) => return Err(io_err(e)),
        };
        if sealed.len() > gca_store::chunks::MAX_CHUNK + AES_256_GCM.tag_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {id} in the object store is larger than any chunk"),
            ));
        }
        self.open_chunk(&name, id, sealed.to_vec())
    }

    fn remove(&self, id: &ChunkId) -> io::Result<()> {
        let path = ObjectPath::from(self.chunk_name(id).as_str());
        self.block_on(self.bucket.delete(&path)).map_err(io_err)
    }

    fn list(&self) -> io::Result<Vec<ChunkId>> {
        // Object names are keyed digests: the bucket is swept by references instead
        // (`JobChunks::sweep`), never by listing chunk IDs.
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the object store's chunks are swept by JobChunks::sweep, not listed",
        ))
    }
}
