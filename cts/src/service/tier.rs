//! The object-store tier (issue 12): an image's chunks and sealed manifest go to the job's
//! part of the bucket (`gca_objstore`) after the local commit, at once (`replicated`) or in
//! the background (`async`); a recovery whose source CTS is unreachable fetches from there.
//! The job's key comes from the GCS (`GetJobKey`, given only to the CTS the job is on) and is
//! kept in memory only, never logged.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use gca_objstore::{Bucket, JobChunks, JOB_KEY_LEN};
use gca_protocol::fault::Fault;
use gca_protocol::messages::{GetJobKey, ImageLocation, LocationState, SetImageLocation};
use gca_protocol::ops::GetJobKeyOp;
use gca_protocol::FaultKind;
use gca_store::{ChunkId, ImageId, Manifest};
use parking_lot::Mutex;

use super::Cts;
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::gcs_link::OutboxItem;

/// Background upload attempts of an `async` image before it is left to the local store only.
const ASYNC_ATTEMPTS: u32 = 8;

/// The bucket and the job keys fetched so far.
pub(super) struct Tier {
    pub(super) bucket: Bucket,
    pub(super) durability: Durability,
    /// The bucket's identity in records' locations (`[object_store] name`).
    pub(super) identity: String,
    keys: Mutex<HashMap<String, Arc<JobChunks>>>,
    /// Uploads under way: (GID, image, its chunks). A sweep of the job's chunks keeps these
    /// (their manifest is not in the bucket yet).
    uploading: Mutex<Vec<(String, ImageId, BTreeSet<ChunkId>)>>,
}

impl Tier {
    pub(super) fn new(bucket: Bucket, durability: Durability, identity: String) -> Self {
        Self {
            bucket,
            durability,
            identity,
            keys: Mutex::new(HashMap::new()),
            uploading: Mutex::new(Vec::new()),
        }
    }

    /// The locations a new record of this CTS lists besides its own store: the object store,
    /// `stored` (replicated: uploaded before the record) or `pending` (async).
    pub(super) fn new_record_location(&self) -> Option<ImageLocation> {
        let state = match self.durability {
            Durability::Local => return None,
            Durability::Replicated => LocationState::Stored,
            Durability::Async => LocationState::Pending,
        };
        Some(ImageLocation::object_store(&self.identity, state, None))
    }
}

/// Removes an upload from [`Tier::uploading`] when dropped.
struct Uploading<'a> {
    tier: &'a Tier,
    id: ImageId,
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        self.tier.uploading.lock().retain(|(_, i, _)| *i != self.id);
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
        let tier = self.inner.tier.as_ref().expect("job_chunks checked it");
        tier.uploading.lock().push((
            gid.to_string(),
            id.clone(),
            refs.iter().map(|r| r.id).collect(),
        ));
        let _uploading = Uploading {
            tier,
            id: id.clone(),
        };
        let (moved, places) = remote
            .upload_chunks(&self.inner.store, &refs)
            .await
            .map_err(|e| upload_err(id.as_str(), &e))?;
        remote
            .put_manifest(id.as_str(), &bytes, &places)
            .await
            .map_err(|e| {
                tier_fault(
                    "object-store-upload-failed",
                    format!("image {id}: its manifest: {e}"),
                )
            })?;
        drop(_uploading);
        // Deleted here while it was being uploaded (the retention policy): it goes from the
        // bucket too (the delete may have looked before the manifest was there).
        if matches!(
            self.inner.store.manifest_bytes(id).await,
            Err(gca_store::Error::NotFound(_))
        ) {
            tracing::info!(%gid, checkpoint.id = %id, "image deleted during its upload; removing it from the object store");
            self.purge_from_bucket(gid, id).await?;
            return Err(tier_fault(
                "image-deleted",
                format!("image {id} was deleted during its upload"),
            ));
        }
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
                tokio::spawn(async move { cts.upload_in_background(&gid, &id).await });
                Ok(())
            }
        }
    }
}

impl Cts {
    /// An `async` image's upload, retried with backoff; its outcome goes to the GCS through
    /// the outbox (on disk, delivered in order after the record, retried while the GCS is
    /// away): the record's object-store location becomes `stored`, or `failed` with the
    /// reason. A CTS that stops before the upload ends leaves the location `pending`.
    pub(super) async fn upload_in_background(&self, gid: &str, id: &ImageId) {
        let mut wait = Duration::from_millis(500);
        let mut last = String::new();
        for attempt in 1..=ASYNC_ATTEMPTS {
            match self.upload_image(gid, id).await {
                Ok(()) => {
                    self.report_location(gid, id, LocationState::Stored, None);
                    return;
                }
                Err(Error::Fault(f)) if f.code.as_deref() == Some("image-deleted") => return,
                Err(e) => {
                    tracing::warn!(%gid, checkpoint.id = %id, attempt, error = %e, "background upload failed; retrying");
                    last = e.to_string();
                }
            }
            if self.inner.store.manifest_bytes(id).await.is_err() {
                tracing::info!(%gid, checkpoint.id = %id, "image gone from the local store; its upload stops");
                return;
            }
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        tracing::error!(%gid, checkpoint.id = %id, error = %last, "image not uploaded to the object store after {ASYNC_ATTEMPTS} attempts; it is in the local store only");
        self.report_location(
            gid,
            id,
            LocationState::Failed,
            Some(format!(
                "not uploaded after {ASYNC_ATTEMPTS} attempts: {last}"
            )),
        );
    }

    /// Queues the new state of the record's object-store location for the GCS.
    fn report_location(
        &self,
        gid: &str,
        id: &ImageId,
        state: LocationState,
        error: Option<String>,
    ) {
        let Some(tier) = &self.inner.tier else {
            return;
        };
        let item = OutboxItem::SetImageLocation(SetImageLocation {
            gid: gid.to_string(),
            checkpoint_id: id.to_string(),
            location: ImageLocation::object_store(&tier.identity, state, error),
        });
        if let Err(e) = self.inner.link.enqueue_nowait(item) {
            tracing::error!(%gid, checkpoint.id = %id, location.state = %state, error = %e, "the image's location cannot be queued for the GCS; its record keeps the old state");
        }
    }

    /// Removes image `id` of job `gid` from the object store: its sealed manifest, then every
    /// chunk of the job that no manifest left in the bucket (nor an upload under way here)
    /// names. When it was the job's last image, nothing of the job is left in the bucket.
    /// Returns how many chunks went.
    pub(super) async fn purge_from_bucket(&self, gid: &str, id: &ImageId) -> Result<usize> {
        let remote = self.job_chunks(gid).await?;
        let unavailable = |what: &str, e: gca_objstore::Error| {
            tier_fault(
                "object-store-unavailable",
                format!("deleting image {id} of job {gid:?} from the object store: {what}: {e}"),
            )
        };
        remote
            .delete_manifest(id.as_str())
            .await
            .map_err(|e| unavailable("its manifest", e))?;
        let mut keep: BTreeSet<ChunkId> = BTreeSet::new();
        for other in remote
            .images()
            .await
            .map_err(|e| unavailable("listing its images", e))?
        {
            let bytes = remote
                .get_manifest(&other)
                .await
                .map_err(|e| unavailable(&format!("the manifest of image {other}"), e))?;
            let Some(bytes) = bytes else { continue };
            let manifest = Manifest::parse(&bytes)?;
            keep.extend(manifest.chunk_set().into_keys());
        }
        if let Some(tier) = &self.inner.tier {
            for (g, _, chunks) in tier.uploading.lock().iter() {
                if g == gid {
                    keep.extend(chunks.iter().copied());
                }
            }
        }
        let removed = remote
            .sweep(&keep)
            .await
            .map_err(|e| unavailable("sweeping its chunks", e))?;
        tracing::info!(%gid, checkpoint.id = %id, chunks.removed = removed, chunks.kept = keep.len(), "image removed from the object store");
        Ok(removed)
    }

    /// `DELETE /images/{id}` from the GCS (the retention policy): the image from this
    /// store and, with an object store, from the bucket. The job is the image's (from its
    /// manifest) or, when it is gone from here already (a retried delete), `gid` (the GCS
    /// names it). Returns the bytes freed here, `None` when the image was not here.
    pub async fn delete_image_everywhere(
        &self,
        id: &ImageId,
        gid: Option<&str>,
    ) -> Result<Option<u64>> {
        let here = match self.inner.store.manifest(id).await {
            Ok(m) => Some(m.meta.gid),
            Err(gca_store::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let (Some(mine), Some(named)) = (&here, gid) {
            if mine != named {
                return Err(Error::conflict(format!(
                    "image {id} is of job {mine:?} here, not of job {named:?}: not deleted"
                )));
            }
        }
        let freed = match self.inner.store.delete(id).await {
            Ok(n) => Some(n),
            Err(gca_store::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if freed.is_some() {
            tracing::info!(checkpoint.id = %id, freed_bytes = ?freed, "image deleted");
        }
        if self.inner.tier.is_some() {
            match here.as_deref().or(gid) {
                Some(g) => {
                    self.purge_from_bucket(g, id).await?;
                }
                None => {
                    tracing::warn!(checkpoint.id = %id, "image not here and no job named: nothing to delete from the object store")
                }
            }
        }
        Ok(freed)
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
        let (bytes, places) = remote
            .get_image(id.as_str())
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
            .download_chunks(&self.inner.store, &refs, &places)
            .await
            .map_err(|e| download_err(id.as_str(), e))?;
        let downloaded = moved.bytes;
        staging.commit_with_manifest(bytes).await?;
        tracing::info!(%gid, checkpoint.id = %id, bytes = downloaded, "image fetched from the object store for a recovery");
        Ok(downloaded)
    }
}
