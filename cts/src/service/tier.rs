//! The object-store tier (issue 12): an image's chunks and sealed manifest go to the job's
//! part of the bucket (`gca_objstore`) after the local commit, at once (`replicated`) or in
//! the background (`async`); a recovery whose source CTS is unreachable fetches from there.
//! The job's key comes from the GCS (`GetJobKey`, given only to the CTS the job is on) and is
//! kept in memory only, never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use gca_objstore::{Bucket, JobChunks, JOB_KEY_LEN};
use gca_protocol::fault::Fault;
use gca_protocol::messages::GetJobKey;
use gca_protocol::ops::GetJobKeyOp;
use gca_protocol::FaultKind;
use gca_store::{ImageId, Manifest};
use parking_lot::Mutex;

use super::Cts;
use crate::config::Durability;
use crate::error::{Error, Result};

/// Background upload attempts of an `async` image before it is left to the local store only.
const ASYNC_ATTEMPTS: u32 = 8;

/// The bucket and the job keys fetched so far.
pub(super) struct Tier {
    pub(super) bucket: Bucket,
    pub(super) durability: Durability,
    keys: Mutex<HashMap<String, Arc<JobChunks>>>,
}

impl Tier {
    pub(super) fn new(bucket: Bucket, durability: Durability) -> Self {
        Self {
            bucket,
            durability,
            keys: Mutex::new(HashMap::new()),
        }
    }
}

/// A fault of the tier, with a code callers can tell.
fn tier_fault(code: &'static str, message: String) -> Error {
    Error::Fault(Fault::new(FaultKind::OperationFailed, message).with_code(code))
}

impl Cts {
    /// The job's part of the bucket, its key fetched from the GCS at the first use.
    pub(super) async fn job_chunks(&self, gid: &str) -> Result<Arc<JobChunks>> {
        let tier = self.inner.tier.as_ref().ok_or_else(|| {
            tier_fault(
                "no-object-store",
                "this CTS has no [object_store]".to_string(),
            )
        })?;
        if let Some(j) = tier.keys.lock().get(gid) {
            return Ok(j.clone());
        }
        let key = self
            .inner
            .link
            .query::<GetJobKeyOp>(&GetJobKey {
                gid: gid.to_string(),
            })
            .await
            .map_err(|f| {
                Error::Fault(Fault {
                    message: format!("the GCS did not give the key of job {gid:?}: {}", f.message),
                    ..f
                })
            })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.key.as_bytes())
            .ok()
            .and_then(|b| <[u8; JOB_KEY_LEN]>::try_from(b).ok())
            .ok_or_else(|| {
                tier_fault(
                    "bad-job-key",
                    format!("the GCS's key of job {gid:?} is not {JOB_KEY_LEN} bytes of base64"),
                )
            })?;
        let chunks = Arc::new(tier.bucket.job(gid, &bytes));
        tier.keys.lock().insert(gid.to_string(), chunks.clone());
        Ok(chunks)
    }

    /// Uploads a committed image: every chunk the bucket does not have yet (read verified from
    /// the local store), then its sealed manifest (last: a manifest in the bucket means the
    /// whole image is there).
    pub(super) async fn upload_image(&self, gid: &str, id: &ImageId) -> Result<()> {
        let remote = self.job_chunks(gid).await?;
        let bytes = self.inner.store.manifest_bytes(id).await?;
        let manifest = Manifest::parse(&bytes)?;
        if !manifest.is_chunked() {
            return Err(tier_fault(
                "not-chunked",
                format!("image {id} is not chunked (format 1); only chunked images go to the object store"),
            ));
        }
        let refs = gca_objstore::distinct_chunks(manifest.files.iter().flat_map(|f| &f.chunks));
        let moved = remote
            .upload_chunks(&self.inner.store, &refs)
            .await
            .map_err(|e| upload_err(id.as_str(), &e))?;
        remote
            .put_manifest(id.as_str(), &bytes)
            .await
            .map_err(|e| {
                tier_fault(
                    "object-store-upload-failed",
                    format!("image {id}: its manifest: {e}"),
                )
            })?;
        tracing::info!(%gid, checkpoint.id = %id, chunks.uploaded = moved.chunks, chunks.present = moved.skipped, packs = moved.objects, bytes = moved.bytes, "image in the object store");
        Ok(())
    }

    /// After a local commit, by the type's durability: `replicated` uploads before the caller
    /// registers (a failure is the caller's fault, the local image stays); `async` starts a
    /// background upload with retries; `local` does nothing.
    pub(super) async fn replicate(&self, gid: &str, id: &ImageId) -> Result<()> {
        let Some(tier) = &self.inner.tier else {
            return Ok(());
        };
        match tier.durability {
            Durability::Local => Ok(()),
            Durability::Replicated => self.upload_image(gid, id).await.map_err(|e| {
                let f: Fault = e.into();
                Error::Fault(Fault {
                    message: format!(
                        "checkpoint {id} of job {gid:?} was stored locally but not in the object store (durability replicated), so it is not registered: {}",
                        f.message
                    ),
                    ..f
                }
                .with_code("object-store-upload-failed"))
            }),
            Durability::Async => {
                let cts = self.clone();
                let (gid, id) = (gid.to_string(), id.clone());
                tokio::spawn(async move {
                    let mut wait = Duration::from_millis(500);
                    for attempt in 1..=ASYNC_ATTEMPTS {
                        match cts.upload_image(&gid, &id).await {
                            Ok(()) => return,
                            Err(e) => {
                                tracing::warn!(%gid, checkpoint.id = %id, attempt, error = %e, "background upload failed; retrying");
                            }
                        }
                        tokio::select! {
                            _ = cts.inner.cancel.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                    tracing::error!(%gid, checkpoint.id = %id, "image not uploaded to the object store after {ASYNC_ATTEMPTS} attempts; it is in the local store only");
                });
                Ok(())
            }
        }
    }
}

fn upload_err(image: &str, e: &gca_objstore::Error) -> Error {
    tier_fault("object-store-upload-failed", format!("image {image}: {e}"))
}

/// A download's error as a fault: what the bucket gave back is corrupt, or it (or the local
/// store) failed.
fn download_err(image: &str, e: gca_objstore::Error) -> Error {
    match e {
        gca_objstore::Error::Corrupt(why) => tier_fault(
            "image-corrupt",
            format!("image {image} from the object store: {why}"),
        ),
        gca_objstore::Error::Local(why) => {
            anyhow::anyhow!("image {image} from the object store: {why}").into()
        }
        other => tier_fault(
            "object-store-unavailable",
            format!("image {image} from the object store: {other}"),
        ),
    }
}

impl Cts {
    /// A recovery's fallback when the CTS that took an image is unreachable: the image from
    /// the job's part of the bucket into the local store. The manifest must have the digest
    /// the GCS recorded; each chunk is opened (its seal checked) and hashed against its name
    /// before it is stored; only chunks the local store lacks are downloaded. Returns the
    /// bytes downloaded.
    pub(super) async fn fetch_from_bucket(
        &self,
        gid: &str,
        id: &ImageId,
        digest: Option<&str>,
    ) -> Result<u64> {
        let remote = self.job_chunks(gid).await?;
        let bytes = remote
            .get_manifest(id.as_str())
            .await
            .map_err(|e| {
                tier_fault(
                    "object-store-unavailable",
                    format!("image {id} from the object store: {e}"),
                )
            })?
            .ok_or_else(|| {
                tier_fault(
                    "image-not-in-object-store",
                    format!("image {id} of job {gid:?} is not in the object store"),
                )
            })?;
        let have = Manifest::digest_of(&bytes);
        if let Some(want) = digest {
            if !want.trim().eq_ignore_ascii_case(&have) {
                return Err(tier_fault(
                    "image-corrupt",
                    format!("image {id} in the object store has digest {have}, the GCS recorded {want}: refusing it"),
                ));
            }
        }
        let manifest = Manifest::parse(&bytes)?;
        let staging = self.inner.store.stage(id).await?;
        let refs = gca_objstore::distinct_chunks(manifest.files.iter().flat_map(|f| &f.chunks));
        for c in &refs {
            staging.pins().pin(&c.id);
        }
        // (On an error the staging area is dropped, which removes it.)
        let moved = remote
            .download_chunks(&self.inner.store, &refs)
            .await
            .map_err(|e| download_err(id.as_str(), e))?;
        let downloaded = moved.bytes;
        staging.commit_with_manifest(bytes).await?;
        tracing::info!(%gid, checkpoint.id = %id, bytes = downloaded, "image fetched from the object store for a recovery");
        Ok(downloaded)
    }
}
