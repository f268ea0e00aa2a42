//! Moving an image's chunks between a local image store and a job's part of the bucket, many
//! requests in flight.
//!
//! One chunk is one object and one request (chunks are 16–256 KiB), so a transfer's speed is
//! its number of requests in flight: one at a time, a 64 MiB image of ~1000 chunks pays ~1000
//! round trips. Both directions therefore keep [`IN_FLIGHT`] requests going, and skip what the
//! other side already has: an upload lists the job's chunk objects once (one paginated LIST
//! instead of a HEAD per chunk) and sends only the missing ones; a download asks the local
//! store and fetches only the chunks it lacks. Either is resumed by running it again.
//!
//! Hashing, sealing and opening run on blocking threads, never on the runtime's workers.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use gca_store::chunks::ChunkReadError;
use gca_store::{ChunkId, ChunkRef, ImageStore};
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;

use crate::{Error, JobChunks, Result};

/// Requests in flight per transfer. Measured with `scripts/bench tier` on a 3-node loopback
/// Garage: 1 → 8 multiplies the throughput by ~6; beyond 16 nothing more is gained on 2 cores.
pub const IN_FLIGHT: usize = 16;

/// What a transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Chunks sent or received.
    pub chunks: usize,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Chunks skipped because the other side had them.
    pub skipped: usize,
}

/// The distinct chunks of a manifest's files, in order of first use.
pub fn distinct_chunks<'a>(refs: impl IntoIterator<Item = &'a ChunkRef>) -> Vec<ChunkRef> {
    let mut seen = HashSet::new();
    refs.into_iter()
        .filter(|c| seen.insert(c.id))
        .copied()
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Local(format!("a transfer task failed: {e}")))?
}

impl JobChunks {
    /// The object names of every chunk the bucket holds for this job (one listing).
    async fn stored_chunk_names(&self) -> Result<HashSet<String>> {
        let prefix = ObjectPath::from(format!("{}/chunks", self.dir).as_str());
        let names = self
            .bucket
            .each(|s| {
                let prefix = prefix.clone();
                async move {
                    s.list(Some(&prefix))
                        .map_ok(|m| m.location.to_string())
                        .try_collect::<HashSet<_>>()
                        .await
                }
            })
            .await?;
        Ok(names)
    }

    /// Uploads the chunks of `refs` that the bucket does not hold yet, each read back from
    /// `store` and checked against its name first (a corrupt local chunk is refused, never
    /// sealed and sent). The caller uploads the manifest after this returns.
    pub async fn upload_chunks(
        self: &Arc<Self>,
        store: &ImageStore,
        refs: &[ChunkRef],
    ) -> Result<Moved> {
        let stored = self.stored_chunk_names().await?;
        let missing: Vec<ChunkRef> = refs
            .iter()
            .filter(|r| !stored.contains(&self.chunk_name(&r.id)))
            .copied()
            .collect();
        let skipped = refs.len() - missing.len();
        let bytes = futures::stream::iter(missing)
            .map(|r| {
                let (job, store) = (self.clone(), store.clone());
                async move {
                    let sealer = job.clone();
                    let (name, sealed) = blocking(move || {
                        let data = store.chunks().read_verified(&r).map_err(|e| match e {
                            ChunkReadError::Missing => {
                                Error::Local(format!("local chunk {} is missing", r.id))
                            }
                            ChunkReadError::Corrupt(why) => {
                                Error::Local(format!("local chunk {} is corrupt: {why}", r.id))
                            }
                            ChunkReadError::Io(e) => {
                                Error::Local(format!("local chunk {}: {e}", r.id))
                            }
                        })?;
                        let name = sealer.chunk_name(&r.id);
                        let sealed = sealer.seal_chunk(&name, &r.id, &data);
                        Ok((name, sealed))
                    })
                    .await?;
                    let path = ObjectPath::from(name.as_str());
                    let body = bytes::Bytes::from(sealed);
                    // One PUT is atomic: the object is whole or absent, and the same chunk
                    // seals to the same object, so a repeated upload is harmless.
                    job.bucket
                        .each(|s| {
                            let (path, body) = (path.clone(), body.clone());
                            async move { s.put(&path, PutPayload::from(body)).await }
                        })
                        .await?;
                    Ok::<u64, Error>(u64::from(r.size))
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<u64>>()
            .await?;
        Ok(Moved {
            chunks: bytes.len(),
            bytes: bytes.iter().sum(),
            skipped,
        })
    }

    /// Downloads the chunks of `refs` that `store` lacks into it: each is opened (its seal
    /// checked: a chunk altered in the bucket fails here) and hashed against its name before
    /// it is written; then one sync of what was written. The caller pins the chunks first and
    /// commits the manifest after this returns.
    pub async fn download_chunks(
        self: &Arc<Self>,
        store: &ImageStore,
        refs: &[ChunkRef],
    ) -> Result<Moved> {
        let missing = {
            let (store, refs) = (store.clone(), refs.to_vec());
            blocking(move || {
                let local = store.chunks().backend();
                let mut missing = Vec::new();
                for r in refs {
                    let have = local
                        .has(&r.id)
                        .map_err(|e| Error::Local(format!("local chunk lookup: {e}")))?;
                    if !have {
                        missing.push(r);
                    }
                }
                Ok(missing)
            })
            .await?
        };
        let skipped = refs.len() - missing.len();
        let written =
            futures::stream::iter(missing)
                .map(|r| {
                    let (job, store) = (self.clone(), store.clone());
                    async move {
                        let name = job.chunk_name(&r.id);
                        let path = ObjectPath::from(name.as_str());
                        let sealed = job
                            .bucket
                            .each(|s| {
                                let path = path.clone();
                                async move { s.get(&path).await?.bytes().await }
                            })
                            .await?;
                        blocking(move || {
                            let data = job.open_sealed_chunk(&name, &r.id, sealed.to_vec())?;
                            if data.len() != r.size as usize || ChunkId::of(&data) != r.id {
                                return Err(Error::Corrupt(format!(
                                "chunk {} of job {:?} in the object store does not match its name",
                                r.id, job.gid
                            )));
                            }
                            store.chunks().backend().put(&r.id, &data).map_err(|e| {
                                Error::Local(format!("storing chunk {}: {e}", r.id))
                            })?;
                            Ok(r)
                        })
                        .await
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<ChunkRef>>()
                .await?;
        let ids: Vec<ChunkId> = written.iter().map(|r| r.id).collect();
        let synced = store.clone();
        blocking(move || {
            synced
                .chunks()
                .backend()
                .sync(&ids)
                .map_err(|e| Error::Local(format!("syncing the downloaded chunks: {e}")))
        })
        .await?;
        Ok(Moved {
            chunks: written.len(),
            bytes: written.iter().map(|r| u64::from(r.size)).sum(),
            skipped,
        })
    }
}
