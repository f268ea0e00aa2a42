//! Getting a checkpoint's image into this store for a recovery (`POST /v1/images/fetch`):
//! where it comes from and the digest it must have are the GCS's record, never the caller's.

use gca_protocol::fault::Fault;
use gca_protocol::local::{FetchImage, FetchedImage};
use gca_protocol::messages::{CheckpointRecord, GidRequest, ImageState};
use gca_store::ImageId;

use super::Cts;
use crate::error::{Error, Result};

impl Cts {
    /// The GCS's record of checkpoint `id` of job `gid`, whose image must still be stored.
    pub(super) async fn recorded_checkpoint(
        &self,
        gid: &str,
        id: &str,
    ) -> Result<CheckpointRecord> {
        let list = self
            .inner
            .link
            .query::<gca_protocol::ops::GetCheckpointsOp>(&GidRequest {
                gid: gid.to_string(),
            })
            .await
            .map_err(|f| {
                Error::Fault(Fault {
                    message: format!(
                        "cannot look up checkpoint {id} of job {gid:?} at the GCS: {}",
                        f.message
                    ),
                    ..f
                })
            })?;
        let record = list
            .checkpoints
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| {
                Error::Fault(
                    Fault::resource_unknown(format!(
                        "the GCS has no checkpoint {id:?} of job {gid:?}"
                    ))
                    .with_code("unknown-checkpoint"),
                )
            })?;
        if record.image_state != ImageState::Stored {
            return Err(Error::Fault(
                Fault::resource_unknown(format!(
                    "the image of checkpoint {id} of job {gid:?} is {} (retention policy){}; it cannot be fetched",
                    record.image_state,
                    record
                        .kept_in
                        .as_deref()
                        .map(|d| format!(", in the owner's directory {d}"))
                        .unwrap_or_default()
                ))
                .with_code("image-not-stored"),
            ));
        }
        Ok(record)
    }

    /// `POST /v1/images/fetch`: the image of a checkpoint, verified, in this store: checked
    /// in place when it is here already, else copied from the CTS that took it. Either way
    /// its digest must be the one the GCS recorded.
    pub async fn fetch_image(&self, req: FetchImage) -> Result<FetchedImage> {
        let image = ImageId::parse(&req.checkpoint_id)?;
        let id = image.as_str();
        let record = self.recorded_checkpoint(&req.gid, id).await?;
        if let (Some(want), Some(have)) = (&req.digest, &record.digest) {
            if !want.trim().eq_ignore_ascii_case(have) {
                return Err(Error::conflict(format!(
                    "the GCS records digest {have} for image {id}, not {want}: refusing to fetch it"
                )));
            }
        }
        let store = &self.inner.store;
        let check_digest = |have: &str| -> Result<()> {
            match &record.digest {
                Some(want) if !want.trim().eq_ignore_ascii_case(have) => Err(Error::Fault(
                    Fault::new(
                        gca_protocol::FaultKind::OperationFailed,
                        format!(
                            "image {id} in the store of CTS {:?} has digest {have}, the GCS recorded {want}: refusing a different or tampered image",
                            self.inner.instance.name
                        ),
                    )
                    .with_code("image-corrupt"),
                )),
                _ => Ok(()),
            }
        };
        let fetched = match store.image_dir(&image).await {
            Ok(_) => {
                store.verify(&image).await?;
                check_digest(&store.digest(&image).await?)?;
                false
            }
            Err(gca_store::Error::NotFound(_)) => {
                let source = record.image_name.trim_end_matches('/');
                let base = source
                    .strip_suffix(&format!("/{id}"))
                    .filter(|b| b.starts_with("http://") || b.starts_with("https://"))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "cannot fetch image {id} from {source:?}: expected the record's image name, http(s)://<cts>/images/{id}"
                        ))
                    })?;
                gca_store::fetch::fetch_image(
                    &self.inner.http,
                    base,
                    &image,
                    record.digest.as_deref(),
                    store,
                )
                .await?;
                tracing::info!(checkpoint.id = %id, source = %source, "image fetched for a recovery");
                true
            }
            Err(e) => return Err(e.into()),
        };
        Ok(FetchedImage {
            checkpoint_id: id.to_string(),
            image_dir: store.image_dir(&image).await?,
            digest: store.digest(&image).await?,
            fetched,
        })
    }
}
