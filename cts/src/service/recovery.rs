//! Getting a checkpoint's image into this store for a recovery (`POST /v1/images/fetch`):
//! where it comes from and the digest it must have are the GCS's record, never the caller's.

use gca_protocol::fault::Fault;
use gca_protocol::local::{FetchImage, FetchedImage};
use gca_protocol::messages::{
    CheckpointRecord, GetCheckpoints, GetRecoveryInfo, ImageOwner, ImageState, RecoveryInfo,
};
use gca_store::ImageId;

use super::{Cts, LocalCaller};

/// The most checkpoints `GET /v1/jobs/{gid}/checkpoints` answers: the newest recoverable
/// ones, which a recovery wrapper tries in turn (records are about 2 KiB each with their
/// signature, so this stays far below the 16 MiB a client reads).
pub const RECOVERABLE_CHECKPOINTS_MAX: usize = 100;
use crate::error::{Error, Result};
use crate::policy::owner_may;

impl Cts {
    /// Whose image a record is: the owner the taking CTS signed (checked against the site
    /// CA, so neither a forged record nor a fetched manifest can name another). Without TLS
    /// (insecure mode) the record's word is taken.
    pub(super) fn verified_owner(&self, r: &CheckpointRecord) -> Result<Option<ImageOwner>> {
        match &self.inner.verifier {
            Some(v) => {
                v.verify_record(r).map_err(|e| {
                    Error::Fault(
                        Fault::new(
                            gca_protocol::FaultKind::AccessDenied,
                            format!(
                                "checkpoint {} of job {:?} cannot be trusted: {e}; nothing was fetched or restored",
                                r.id, r.gid
                            ),
                        )
                        .with_code("bad-signature"),
                    )
                })?;
                Ok(r.owner)
            }
            None => Ok(r.owner),
        }
    }

    /// The caller may recover from `r`: it is their image (root: anyone's).
    fn may_recover(&self, caller: &LocalCaller, r: &CheckpointRecord) -> Result<()> {
        let what = format!("checkpoint {} of job {:?}", r.id, r.gid);
        match self.verified_owner(r)? {
            Some(owner) => owner_may(caller, owner.uid, &what),
            None if caller.uid == 0 => Ok(()),
            None => Err(Error::denied(format!(
                "{what} names no owner; only root may recover it"
            ))),
        }
    }

    /// `GET /v1/jobs/{gid}/recovery`: how the caller's job can be recovered from `image`
    /// (`latest` or an ID): the GCS's answer, for the owner of the image only.
    pub async fn recovery_info(
        &self,
        gid: &str,
        image: &str,
        caller: LocalCaller,
    ) -> Result<RecoveryInfo> {
        let info = self
            .inner
            .link
            .query::<gca_protocol::ops::GetRecoveryInfoOp>(&GetRecoveryInfo {
                gid: gid.to_string(),
                image: image.to_string(),
            })
            .await
            .map_err(|f| {
                Error::Fault(Fault {
                    message: format!(
                        "the GCS cannot say how to recover job {gid:?} from image {image:?}: {}",
                        f.message
                    ),
                    ..f
                })
            })?;
        self.may_recover(&caller, &info.checkpoint)?;
        // This CTS's own verdict replaces the GCS's for its candidate: it knows what only the
        // resource can tell (files, digests, criu cpuinfo check), by its own site's rules.
        let mut info = info;
        let here = self.compatibility_here(&info.checkpoint).await;
        match info
            .candidates
            .iter_mut()
            .find(|c| c.instance.name == self.inner.instance.name)
        {
            Some(c) => c.compatibility = Some(here),
            None => tracing::debug!(gid = %gid, "this CTS is not a candidate for the recovery"),
        }
        Ok(info)
    }

    /// Whether this resource can restore the image of `r`, by this CTS's
    /// `[compatibility]` rules ([`gca_drivers::facts::check_here`]).
    pub async fn compatibility_here(
        &self,
        r: &CheckpointRecord,
    ) -> gca_protocol::facts::Compatibility {
        gca_drivers::facts::check_here(
            r.facts.as_ref(),
            &self.resource_facts(),
            &self.inner.config.compatibility,
            self.inner.criu.as_deref(),
        )
        .await
    }

    /// Refuses, before anything is fetched, an image this resource cannot restore
    /// (`incompatible-resource`, with every reason). An image without facts (taken by an
    /// older CTS) is not refused: nothing is known against it.
    async fn refuse_incompatible(&self, r: &CheckpointRecord) -> Result<()> {
        let c = self.compatibility_here(r).await;
        if c.verdict != gca_protocol::facts::Verdict::Incompatible {
            return Ok(());
        }
        tracing::info!(gid = %r.gid, checkpoint.id = %r.id, reasons = ?c.reasons, "image refused: this resource cannot restore it");
        Err(Error::Fault(
            Fault::new(
                gca_protocol::FaultKind::OperationFailed,
                format!(
                    "CTS {:?} cannot restore checkpoint {} of job {:?}: {}; nothing was fetched (recover it on a compatible resource, GetRecoveryInfo lists them, or relax the rule in [compatibility])",
                    self.inner.instance.name,
                    r.id,
                    r.gid,
                    c.reasons.join("; ")
                ),
            )
            .with_code("incompatible-resource"),
        ))
    }

    /// A recovery registration of `gid` by `caller`: from `checkpoint` (the latest when
    /// none is named), which must be the caller's.
    pub(super) async fn check_recovery_owner(
        &self,
        gid: &str,
        checkpoint: Option<&str>,
        caller: &LocalCaller,
    ) -> Result<()> {
        if caller.uid == 0 {
            return Ok(());
        }
        let Some(id) = checkpoint else {
            // A restart from the beginning (gca-exec --recover-if-checkpointed for a job that
            // failed before its first checkpoint): nothing is restored, so nothing of anyone
            // else's; allowed only while the job has no checkpoint at all.
            if self.gcs_checkpoints(gid).await?.is_empty() {
                return Ok(());
            }
            return Err(Error::invalid(format!(
                "a recovery of job {gid:?} by user {} names the checkpoint it restores (from_checkpoint)",
                caller.uid
            )));
        };
        let record = self.recorded_checkpoint(gid, id).await?;
        self.may_recover(caller, &record)
    }
    /// `GET /v1/jobs/{gid}/checkpoints`: the checkpoints of `gid` the caller could recover
    /// from (image stored, the caller's by its verified owner; root: any), newest first, at
    /// most [`RECOVERABLE_CHECKPOINTS_MAX`] of them (a job's records grow without bound; the
    /// answer to the wrapper must not).
    pub async fn recoverable_checkpoints(
        &self,
        gid: &str,
        caller: LocalCaller,
    ) -> Result<Vec<CheckpointRecord>> {
        let mut list: Vec<CheckpointRecord> = self
            .gcs_checkpoints(gid)
            .await?
            .into_iter()
            .filter(|r| r.image_state == ImageState::Stored && self.may_recover(&caller, r).is_ok())
            .collect();
        list.sort_by_key(|r| std::cmp::Reverse(r.sequence));
        list.truncate(RECOVERABLE_CHECKPOINTS_MAX);
        Ok(list)
    }

    /// Every checkpoint record the GCS has of job `gid`, page after page (GetCheckpoints
    /// answers at most the GCS's page size; a job may have many more records).
    pub(super) async fn gcs_checkpoints(&self, gid: &str) -> Result<Vec<CheckpointRecord>> {
        let mut records = Vec::new();
        let mut req = GetCheckpoints::of(gid);
        loop {
            let page = self
                .inner
                .link
                .query::<gca_protocol::ops::GetCheckpointsOp>(&req)
                .await
                .map_err(|f| {
                    Error::Fault(Fault {
                        message: format!(
                            "cannot look up the checkpoints of job {gid:?} at the GCS: {}",
                            f.message
                        ),
                        ..f
                    })
                })?;
            let next = req.next_page(&page);
            records.extend(page.checkpoints);
            match next {
                Some(n) => req = n,
                None => return Ok(records),
            }
        }
    }

    /// The GCS's record of checkpoint `id` of job `gid`, whose image must still be stored.
    pub(super) async fn recorded_checkpoint(
        &self,
        gid: &str,
        id: &str,
    ) -> Result<CheckpointRecord> {
        let record = self
            .gcs_checkpoints(gid)
            .await?
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

    /// Whether the record says this CTS's object store has the image: its location there is
    /// `stored`, or `pending` (an `async` upload whose end the GCS may not know yet: the
    /// manifest, uploaded last, says). `Err` says why not: `failed`, or no location in this
    /// CTS's bucket (durability `local`, or another bucket). A record with no locations at
    /// all (from a GCS before them) does not say: tried.
    fn bucket_has(&self, record: &CheckpointRecord) -> std::result::Result<(), String> {
        use gca_protocol::messages::{LocationKind, LocationState};
        let Some(tier) = &self.inner.tier else {
            return Err("this CTS has no [object_store]".into());
        };
        if record.locations.is_empty() {
            return Ok(());
        }
        let here = record
            .locations
            .iter()
            .find(|l| l.kind == LocationKind::ObjectStore && l.name == tier.identity);
        match here {
            Some(l) if l.state != LocationState::Failed => Ok(()),
            Some(l) => Err(format!(
                "its upload to object store {:?} failed{}",
                l.name,
                l.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )),
            None => {
                let others: Vec<&str> = record
                    .locations
                    .iter()
                    .filter(|l| l.kind == LocationKind::ObjectStore)
                    .map(|l| l.name.as_str())
                    .collect();
                Err(if others.is_empty() {
                    "the record lists no object-store copy (its CTS type's durability is local)"
                        .to_string()
                } else {
                    format!(
                        "the record lists copies in {} only, not in this CTS's object store {:?}",
                        others.join(", "),
                        tier.identity
                    )
                })
            }
        }
    }

    /// `POST /v1/images/fetch`: the image of a checkpoint, verified, in this store: checked
    /// in place when it is here already, else copied from the CTS that took it. Either way
    /// its digest must be the one the GCS recorded.
    pub async fn fetch_image(&self, req: FetchImage, caller: LocalCaller) -> Result<FetchedImage> {
        let image = ImageId::parse(&req.checkpoint_id)?;
        let id = image.as_str();
        let record = self.recorded_checkpoint(&req.gid, id).await?;
        self.may_recover(&caller, &record)?;
        self.refuse_incompatible(&record).await?;
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
        let mut bytes_transferred = 0;
        // The chunks a fetch from the CTS checked as they arrived: not hashed again below.
        let mut checked = Default::default();
        let fetched = match store.image_dir(&image).await {
            Ok(_) => {
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
                let from_cts = gca_store::fetch::fetch_image_report(
                    &self.inner.transfers,
                    base,
                    &image,
                    record.digest.as_deref(),
                    store,
                    &Default::default(),
                )
                .await;
                bytes_transferred = match from_cts {
                    Ok(f) => {
                        tracing::info!(checkpoint.id = %id, source = %source, "image fetched for a recovery");
                        checked = f.checked;
                        f.bytes_transferred
                    }
                    // The CTS that took it is unreachable (or lost it): the object store,
                    // unless the record says the image is not there.
                    Err(e) if self.inner.tier.is_some() => match self.bucket_has(&record) {
                        Ok(()) => {
                            tracing::warn!(checkpoint.id = %id, source = %source, error = %e, "image not fetched from its CTS; trying the object store");
                            self.fetch_from_bucket(&req.gid, &image, record.digest.as_deref())
                                .await?
                        }
                        Err(why) => {
                            let f: Fault = Error::from(e).into_fault();
                            return Err(Error::Fault(Fault {
                                message: format!(
                                    "{}; the object store was not tried: {why}",
                                    f.message
                                ),
                                ..f
                            }));
                        }
                    },
                    Err(e) => return Err(e.into()),
                };
                true
            }
            Err(e) => return Err(e.into()),
        };
        // The manifest (covered by the digest, which the signature covers) names the owner the
        // export to the owner's directory goes by: it must be the signed one.
        if let Some(owner) = record.owner {
            let meta = store.manifest(&image).await?.meta;
            let named = (
                meta.extra.get(gca_store::export::OWNER_UID_KEY).cloned(),
                meta.extra.get(gca_store::export::OWNER_GID_KEY).cloned(),
            );
            if named != (Some(owner.uid.to_string()), Some(owner.gid.to_string())) {
                return Err(Error::Fault(
                    Fault::new(
                        gca_protocol::FaultKind::OperationFailed,
                        format!(
                            "image {id}'s manifest names owner {:?}, its signed record {owner}: refusing it",
                            named
                        ),
                    )
                    .with_code("image-corrupt"),
                ));
            }
        }
        // Plain files for the restore, every file (format 1) or chunk (format 2) checked
        // against the manifest whose digest was checked above: each chunk once, as it
        // arrived or as it is read now.
        let image_dir = store.materialize_checked(&image, checked).await?;
        Ok(FetchedImage {
            checkpoint_id: id.to_string(),
            image_dir,
            digest: store.digest(&image).await?,
            fetched,
            bytes_transferred,
        })
    }
}
