//! Reconciling the image store with the GCS: copies fetched for recoveries (the GCS deletes
//! an image only on the CTS that took it), and anything a missed deletion left, go once the
//! GCS records them deleted or kept.

use std::collections::BTreeMap;
use std::time::Duration;

use gca_protocol::messages::ImageState;
use gca_store::ImageId;

use super::Cts;
use crate::error::{Error, Result};

impl Cts {
    /// Every `[store] reconcile_secs` (0: never), until the service shuts down.
    pub(super) fn spawn_reconciler(&self) {
        let every = self.inner.config.store.reconcile_secs;
        if every > 0 {
            let cts = self.clone();
            let cancel = self.inner.cancel.child_token();
            tokio::spawn(async move {
                let every = Duration::from_secs(every);
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = cts.reconcile_store().await {
                        tracing::warn!(error = %e, "reconciling the image store with the GCS failed; will retry");
                    }
                }
            });
        }
    }

    /// Removes the images of this store that the GCS records as deleted or kept: copies
    /// fetched for a recovery (the GCS deletes an image only on the CTS that took it), and
    /// anything a missed deletion left. Only the GCS's word removes an image: images of jobs or
    /// checkpoints the GCS does not know (yet: a registration may still be queued), images
    /// being kept, images whose deletion failed, and images of jobs being restored here stay.
    /// Returns how many images were removed.
    pub async fn reconcile_store(&self) -> Result<usize> {
        let mut by_job: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
        for image in self.inner.store.list().await? {
            let Ok(id) = ImageId::parse(&image.id) else {
                continue;
            };
            by_job.entry(image.gid).or_default().push(id);
        }
        let mut removed = 0;
        for (gid, ids) in by_job {
            if self.jobs().get(&gid).is_some_and(|j| j.restoring) {
                continue;
            }
            let records = match self.gcs_checkpoints(&gid).await {
                Ok(records) => records,
                Err(Error::Fault(f)) if f.kind == gca_protocol::FaultKind::ResourceUnknown => {
                    continue
                }
                Err(e) => return Err(e),
            };
            for id in ids {
                let gone = records
                    .iter()
                    .find(|r| id == r.id.as_str())
                    .is_some_and(|r| {
                        matches!(
                            r.image_state,
                            ImageState::Deleted | ImageState::Deleting | ImageState::Kept
                        )
                    });
                if !gone {
                    continue;
                }
                match self.inner.store.delete(&id).await {
                    Ok(bytes) => {
                        removed += 1;
                        tracing::info!(%gid, checkpoint.id = %id, freed_bytes = bytes, "image removed: the GCS records it deleted or kept");
                    }
                    Err(gca_store::Error::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(%gid, checkpoint.id = %id, error = %e, "cannot remove an image the GCS records deleted or kept")
                    }
                }
            }
        }
        Ok(removed)
    }
}
