//! One checkpoint (paper 5.2 steps 4-9): the job's lock, a staging directory, the driver,
//! the commit into the store, the record through the outbox; and collecting a checkpoint the
//! job took on its own (paper 3.3, internal).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gca_drivers::{proc, CheckpointRequest, DriverError};
use gca_protocol::facts::ImageFacts;
use gca_protocol::fault::Fault;
use gca_protocol::messages::{
    fmt_time, CheckpointRecord, DoCheckpoint, Origin, RegisterCheckpoint,
};
use gca_store::{ImageId, ImageMeta, Manifest, Staging};

/// The key of an image's restore facts (JSON) in its manifest's `meta.extra`: part of the
/// image (covered by its digest), so a record made again from the manifest has them too.
pub const FACTS_KEY: &str = "restore_facts";

use super::jobs::{Job, Saving};
use super::{Cts, LocalCaller};
use crate::error::{Error, Result};
use crate::gcs_link::{Delivered, GcsLink, OutboxItem, Pending, Reservation};

/// How long a checkpoint request waits at most for the poller that looks for (and stores) a
/// checkpoint the job took on its own, whatever `busy_wait_secs` says.
const COLLECTION_WAIT: Duration = Duration::from_secs(30);

/// How often a checkpoint request collects a checkpoint the job finished meanwhile and asks
/// again (`fresh_checkpoint_locked`; tested by
/// `cts app::a_request_waits_for_the_collection_of_the_jobs_own_checkpoint`).
const PENDING_RETRIES: u32 = 4;

/// When an image was taken, and what its restore depends on.
pub(super) struct Capture {
    pub(super) taken_at: DateTime<Utc>,
    pub(super) facts: ImageFacts,
}

/// A checkpoint taken, its image committed and its record queued for the GCS.
pub(super) struct Taken {
    pub(super) record: CheckpointRecord,
    pub(super) delivery: Pending,
    /// The job's state file being saved with the new count ([`Cts::save_job_soon`]).
    pub(super) saved: Saving,
}

impl Cts {
    /// doCheckpoint from the GCS (paper 5.2 steps 4-9).
    /// A job's owner asks for a checkpoint of it on the local socket (e.g. before the resource
    /// manager's time limit): the same as the GCS's request.
    pub async fn checkpoint_own(
        &self,
        req: DoCheckpoint,
        caller: LocalCaller,
    ) -> Result<CheckpointRecord> {
        let job = self.job(&req.gid)?;
        crate::policy::owner_may(&caller, job.uid, &format!("job {:?}", job.gid))?;
        self.do_checkpoint(req).await
    }

    pub async fn do_checkpoint(&self, req: DoCheckpoint) -> Result<CheckpointRecord> {
        if !self.inner.cts_type.core_service.external_checkpoints {
            return Err(Error::conflict(format!(
                "CTS type {:?} does not accept checkpoint requests; its jobs are checkpointed internally",
                self.inner.cts_type.name
            )));
        }
        let job = self.job(&req.gid)?;
        let stop = req.stop || self.inner.config.checkpoint.stop_after;
        // In a task of its own: a caller that goes away (a client disconnecting, a request
        // timeout, a shutdown) drops only the wait for the answer, never a checkpoint between
        // its commit and its record.
        let cts = self.clone();
        let taking = job.clone();
        let taken = tokio::spawn(async move { cts.take_external(&taking, &req, stop).await })
            .await
            .map_err(|e| anyhow::anyhow!("the checkpoint task of job {:?} failed: {e}", job.gid))?;
        self.registered(&job, taken?).await
    }

    /// The checkpoint of a request: waits for the job's lock (`busy_wait_secs`), takes it,
    /// and frees the job once the image is committed and its record queued.
    async fn take_external(&self, job: &Arc<Job>, req: &DoCheckpoint, stop: bool) -> Result<Taken> {
        let wait = Duration::from_secs(self.inner.config.checkpoint.busy_wait_secs);
        let guard = match job.lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                let started = tokio::time::Instant::now();
                let mut lock = std::pin::pin!(job.lock.lock());
                loop {
                    // Another checkpoint is waited for `busy_wait_secs`; the poller's look for
                    // a checkpoint the job took on its own is no reason to refuse a request.
                    let budget = if job.collecting() {
                        wait.max(COLLECTION_WAIT)
                    } else {
                        wait
                    };
                    let left = budget.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        let what = job
                            .busy_since()
                            .map(|(o, t)| format!(" ({o}, started {})", fmt_time(&t)))
                            .unwrap_or_default();
                        return Err(Error::Fault(
                            Fault::conflict(format!(
                                "a checkpoint of job {:?} is already in progress{what}; retry when it has completed",
                                req.gid
                            ))
                            .with_code("checkpoint-in-progress"),
                        ));
                    }
                    tokio::select! {
                        g = &mut lock => break g,
                        _ = tokio::time::sleep(left.min(Duration::from_millis(20))) => {}
                    }
                }
            }
        };
        let taken = self
            .fresh_checkpoint_locked(job, Origin::External, stop)
            .await;
        // The image is committed and its record safe in the outbox: the job is free for the
        // next checkpoint while the GCS's answer is awaited.
        drop(guard);
        taken
    }

    /// Waits a bounded time for the GCS's answer to a checkpoint's record: the registered
    /// record (with its sequence number), or the record as queued when the GCS is away.
    async fn registered(&self, job: &Job, taken: Taken) -> Result<CheckpointRecord> {
        let id = taken.record.id.clone();
        // The job's state is saved while the GCS answers; the answer waits for both.
        let (answer, _) = tokio::join!(GcsLink::wait(taken.delivery, self.gcs_wait()), taken.saved);
        match answer {
            Ok(Some(Delivered::Checkpoint(r))) => Ok(r.checkpoint),
            Ok(_) => {
                tracing::warn!(gid = %job.gid, checkpoint.id = %id, "GCS unreachable; checkpoint kept and its record queued");
                Ok(taken.record)
            }
            Err(e) => {
                // The image is stored; the record is set aside in the outbox for an operator.
                let f: Fault = e.into();
                Err(Error::Fault(Fault {
                    message: format!(
                        "checkpoint {id:?} of job {:?} was taken and stored, but the GCS refused its record: {}",
                        job.gid, f.message
                    ),
                    ..f
                }))
            }
        }
    }

    /// A checkpoint the job took on its own comes first (so sequence numbers follow time),
    /// then the requested one; the caller holds `job.lock`.
    pub(super) async fn fresh_checkpoint_locked(
        &self,
        job: &Arc<Job>,
        origin: Origin,
        stop: bool,
    ) -> Result<Taken> {
        // The job may finish one of its own in between: collect it and ask again, a bounded
        // number of times (a job that checkpoints itself back to back can win once in a
        // while; seen once in eight runs of the test below with a single retry).
        let mut tries = 0;
        loop {
            self.collect_internal_locked(job).await;
            match self.checkpoint_locked(job, origin, stop).await {
                Err(Error::Driver(e))
                    if e.code == "internal-checkpoint-pending" && tries < PENDING_RETRIES =>
                {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    /// Takes one checkpoint; the caller holds `job.lock`.
    pub(super) async fn checkpoint_locked(
        &self,
        job: &Arc<Job>,
        origin: Origin,
        stop: bool,
    ) -> Result<Taken> {
        if job.restoring {
            return Err(Error::conflict(format!(
                "job {:?} is being recovered; checkpoint it once it runs again",
                job.gid
            )));
        }
        if job.stopping() {
            return Err(Error::conflict(format!(
                "job {:?} was stopped after its last checkpoint; recover it to checkpoint it again",
                job.gid
            )));
        }
        if !proc::is_alive(job.pid, job.start_time) {
            return Err(Error::Fault(
                Fault::resource_unknown(format!(
                    "job {:?} (process {}) is no longer running; nothing was checkpointed",
                    job.gid, job.pid
                ))
                .with_code("job-gone"),
            ));
        }
        let _place = self.checkpoint_place(&job.gid).await?;
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        job.set_busy(Some((origin, Utc::now())));
        let result = self.take(job, origin, stop).await;
        job.set_busy(None);
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        match &result {
            Ok(t) => {
                tracing::info!(gid = %job.gid, checkpoint.id = %t.record.id, origin = %origin, stopped = t.record.job_stopped, "checkpoint taken")
            }
            Err(e) => {
                tracing::warn!(gid = %job.gid, origin = %origin, error = %e, "checkpoint failed")
            }
        }
        result
    }

    /// Moves a written image into the store (manifest, atomic rename) and makes its record
    /// (without a sequence number: the GCS assigns it); counts it for the job. An image whose
    /// record cannot be made is removed again: an image is registered whole or not at all.
    pub(super) async fn commit_image(
        &self,
        job: &Arc<Job>,
        staging: Staging,
        id: &ImageId,
        capture: Capture,
        origin: Origin,
        stop: bool,
    ) -> Result<(CheckpointRecord, Saving)> {
        let Capture { taken_at, facts } = capture;
        let facts = serde_json::to_string(&facts)
            .map_err(|e| anyhow::anyhow!("image {id}: its restore facts: {e}"))?;
        // The job's cgroup limits travel with its image (a recovery gives them again).
        if job.limits != gca_protocol::isolation::JobLimits::default() {
            let text = serde_json::to_vec(&job.limits).unwrap_or_default();
            if let Err(e) =
                std::fs::write(staging.dir.join(gca_protocol::isolation::LIMITS_FILE), text)
            {
                tracing::warn!(gid = %job.gid, error = %e, "cannot note the job's limits in its image");
            }
        }
        let manifest = staging
            .commit(ImageMeta {
                gid: job.gid.clone(),
                created_at: taken_at,
                driver: self.inner.driver.kind().to_string(),
                origin: origin.to_string(),
                extra: [
                    ("cts".to_string(), self.inner.instance.name.clone()),
                    ("cts_type".to_string(), self.inner.cts_type.name.clone()),
                    ("pid".to_string(), job.pid.to_string()),
                    ("job_stopped".to_string(), stop.to_string()),
                    (FACTS_KEY.to_string(), facts),
                ]
                .into_iter()
                .chain(owner_extra(job))
                .collect(),
            })
            .await?;
        let record = match self.record_of(id, &manifest).await {
            Ok(r) => r,
            Err(e) if stop => {
                // The job is gone: its image is all that is left of it, kept for an operator.
                tracing::error!(gid = %job.gid, checkpoint.id = %id, error = %e, "no record can be made for the image of a job stopped by its checkpoint; the image is kept, unregistered");
                return Err(e);
            }
            Err(e) => {
                tracing::error!(gid = %job.gid, checkpoint.id = %id, error = %e, "no record can be made for a committed image; removing it");
                let _ = self.inner.store.delete(id).await;
                return Err(e);
            }
        };
        // `replicated`: registered only once the image is in the object store too (a failure
        // leaves the local image, unregistered, and is the caller's fault); `async`: uploaded
        // in the background.
        self.replicate(&job.gid, id).await?;
        job.checkpointed(id);
        self.inner.checkpoints_taken.fetch_add(1, Ordering::SeqCst);
        Ok((record, self.save_job_soon(job)))
    }

    /// The record of a committed image, from its manifest (what the CTS wrote when it
    /// committed it), signed.
    pub(super) async fn record_of(
        &self,
        id: &ImageId,
        manifest: &Manifest,
    ) -> Result<CheckpointRecord> {
        let meta = &manifest.meta;
        let digest = self.inner.store.digest(id).await?;
        let number = |k: &str| meta.extra.get(k).and_then(|v| v.parse::<u32>().ok());
        let owner = match (
            number(gca_store::export::OWNER_UID_KEY),
            number(gca_store::export::OWNER_GID_KEY),
        ) {
            (Some(uid), Some(gid)) if uid != u32::MAX => {
                Some(gca_protocol::messages::ImageOwner { uid, gid })
            }
            _ => None,
        };
        let origin = meta.origin.parse::<Origin>().map_err(|e| {
            anyhow::anyhow!("image {id}: its manifest's origin {:?}: {e}", meta.origin)
        })?;
        let mut record = CheckpointRecord {
            id: id.to_string(),
            gid: meta.gid.clone(),
            sequence: None,
            cts_name: self.inner.instance.name.clone(),
            cts_type: self.inner.cts_type.name.clone(),
            taken_at: meta.created_at,
            image_name: format!("{}/images/{id}", self.inner.config.public_url()),
            execution_manager: self.inner.instance.execution_manager.clone(),
            size_bytes: Some(manifest.total_bytes as i64),
            digest: Some(digest),
            parent: None,
            origin,
            job_stopped: meta.extra.get("job_stopped").is_some_and(|v| v == "true"),
            registered_at: None,
            image_state: Default::default(),
            kept_in: None,
            image_error: None,
            owner,
            signature: None,
            facts: match meta.extra.get(FACTS_KEY) {
                Some(f) => Some(serde_json::from_str(f).map_err(|e| {
                    anyhow::anyhow!("image {id}: its manifest's restore facts: {e}")
                })?),
                None => None,
            },
            locations: Vec::new(),
        };
        // Where the image is: here and, by the type's durability, in the object store
        // (`replicated`: uploaded before the record is queued; `async`: on its way).
        let image_name = record.image_name.clone();
        record
            .locations
            .push(gca_protocol::messages::ImageLocation::cts(
                &self.inner.instance.name,
                &image_name,
            ));
        if let Some(l) = self
            .inner
            .tier
            .as_ref()
            .and_then(|t| t.new_record_location())
        {
            record.locations.push(l);
        }
        if let Some(signer) = &self.inner.signer {
            let facts = gca_protocol::signature::SignedFacts::of(&record).ok_or_else(|| {
                Error::Fault(Fault::new(
                    gca_protocol::FaultKind::OperationFailed,
                    format!(
                        "image {id} of job {:?} cannot be signed: the job's owner is unknown",
                        meta.gid
                    ),
                ))
            })?;
            record.signature = Some(signer.sign(&facts).map_err(|e| {
                Error::Fault(Fault::new(
                    gca_protocol::FaultKind::Internal,
                    format!("signing image {id}: {e:#}"),
                ))
            })?);
        }
        Ok(record)
    }

    /// Waits for one of the `limits.checkpoints_in_flight` places for a checkpoint on this
    /// resource, up to `checkpoint.busy_wait_secs`.
    async fn checkpoint_place(&self, gid: &str) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let places = self.inner.checkpoint_places.clone();
        if let Ok(p) = places.clone().try_acquire_owned() {
            return Ok(p);
        }
        let wait = Duration::from_secs(self.inner.config.checkpoint.busy_wait_secs);
        match tokio::time::timeout(wait, places.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Error::Fault(
                Fault::new(
                    gca_protocol::FaultKind::ServiceUnavailable,
                    format!(
                        "{} checkpoints are being taken on this resource, its limit (limits.checkpoints_in_flight); job {gid:?} was not checkpointed: retry later",
                        self.inner.config.limits.checkpoints_in_flight
                    ),
                )
                .with_code("cts-busy"),
            )),
        }
    }

    /// Checkpoints a previous run committed but died before queueing the record of (see
    /// [`crate::gcs_link`]): registered from the store, whole; a reservation whose image was
    /// never committed is given up (the staging area is emptied when the store opens).
    pub(super) async fn settle_unfinished_checkpoints(&self) {
        for r in self.inner.link.orphans() {
            let Ok(id) = ImageId::parse(r.image()) else {
                continue;
            };
            let manifest = match self.inner.store.manifest(&id).await {
                Ok(m) => m,
                Err(_) => {
                    tracing::info!(checkpoint.id = %id, gid = %r.gid(), "a checkpoint interrupted before its commit left nothing; given up");
                    continue;
                }
            };
            let result = match self.record_of(&id, &manifest).await {
                Ok(mut record) => {
                    // Whether it reached the object store before the CTS stopped is not
                    // known: uploaded again (only missing chunks cross) in the background.
                    let upload = self
                        .inner
                        .tier
                        .as_ref()
                        .is_some_and(|t| t.durability != crate::config::Durability::Local);
                    if upload {
                        for l in &mut record.locations {
                            if l.kind == gca_protocol::messages::LocationKind::ObjectStore {
                                l.state = gca_protocol::messages::LocationState::Pending;
                            }
                        }
                    }
                    let gid = manifest.meta.gid.clone();
                    drop(r.fill(OutboxItem::RegisterCheckpoint(Box::new(
                        RegisterCheckpoint { checkpoint: record },
                    ))));
                    if upload {
                        let (cts, id) = (self.clone(), id.clone());
                        tokio::spawn(async move { cts.upload_in_background(&gid, &id).await });
                    }
                    Ok(())
                }
                Err(e) => {
                    r.postpone();
                    Err(e)
                }
            };
            match result {
                Ok(()) => {
                    tracing::warn!(checkpoint.id = %id, gid = %manifest.meta.gid, "a checkpoint committed just before the CTS stopped is registered now")
                }
                Err(e) => {
                    // Kept, image and reservation: the next start tries again (a full disk,
                    // say, may be cleared by then).
                    tracing::error!(checkpoint.id = %id, gid = %manifest.meta.gid, error = %e, "a checkpoint committed just before the CTS stopped cannot be registered now; kept for the next start");
                }
            }
        }
    }

    pub(super) fn new_image_id(&self) -> Result<ImageId> {
        let rand = uuid::Uuid::new_v4().simple().to_string();
        Ok(ImageId::parse(&format!(
            "{}-{}-{}",
            self.inner.instance.name,
            Utc::now().format("%Y%m%dT%H%M%SZ"),
            &rand[..12]
        ))?)
    }

    pub(super) async fn take(&self, job: &Arc<Job>, origin: Origin, stop: bool) -> Result<Taken> {
        // Checked before every dump: a job may have started a setuid program since it was
        // registered.
        crate::policy::plainly_theirs(job.uid, job.pid, &format!("job {:?}", job.gid))?;
        self.signable(job)?;
        let id = self.new_image_id()?;
        // What a restore will depend on, from the job's processes as they are just before
        // the dump (a CRIU dump may end them): read from /proc on a blocking thread while
        // the outbox place and the staging area are made. Not during the dump: CRIU and the
        // early hashing have both cores then (measured: the dump got slower).
        let facts = tokio::spawn(self.image_facts(job));
        // The outbox must be able to take the record before anything is dumped.
        let place = self.inner.link.reserve(&id, &job.gid)?;
        let mut staging = self.inner.store.stage(&id).await?;
        if self.inner.driver.kind() == gca_protocol::facts::CRIU {
            // Hashed on the idle core while CRIU writes them (gca_store::Staging).
            if let Some(previous) = job.last_checkpoint().and_then(|p| ImageId::parse(&p).ok()) {
                staging.hash_page_files_early(&previous).await;
            }
        }
        let values = self
            .job_values(job)
            .set("IMAGE_ID", id.to_string())
            .set("IMAGE_DIR", staging.dir.display().to_string());
        let handle = self.handle(job);
        let timeout = self.inner.config.checkpoint_timeout();
        let facts = facts
            .await
            .map_err(|e| anyhow::anyhow!("the restore facts of job {:?}: {e}", job.gid))?;
        let taken_at = Utc::now();
        let outcome = match tokio::time::timeout(
            timeout + Duration::from_secs(5),
            self.inner.driver.checkpoint(CheckpointRequest {
                job: &handle,
                image_id: &id,
                image_dir: &staging.dir,
                leave_running: !stop,
                values: &values,
                timeout,
            }),
        )
        .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(Error::Driver(self.keep_failure_logs(&id, &staging.dir, e))),
            Err(_) => {
                return Err(Error::Driver(DriverError::timeout(format!(
                    "the {} checkpoint of job {:?} did not finish within {timeout:?}",
                    self.inner.driver.kind(),
                    job.gid
                ))))
            }
        };
        if stop {
            job.set_stopping();
            if !outcome.stopped {
                self.stop_job(job).await;
            }
        }
        let (record, saved) = self
            .commit_image(job, staging, &id, Capture { taken_at, facts }, origin, stop)
            .await
            .inspect_err(|e| {
                if stop {
                    tracing::error!(gid = %job.gid, error = %e, "job stopped but its image could not be stored");
                }
            })?;
        let delivery = queue_record(place, &record);
        Ok(Taken {
            record,
            delivery,
            saved,
        })
    }

    /// The restore facts of a checkpoint of `job` taken now ([`gca_drivers::facts`]): this
    /// resource's, the job's processes' for a CRIU image, the type's declared properties
    /// for any other.
    fn image_facts(&self, job: &Job) -> impl std::future::Future<Output = ImageFacts> + 'static {
        let kind = self.inner.driver.kind();
        let declared = if kind == gca_protocol::facts::CRIU {
            Vec::new()
        } else {
            self.inner.cts_type.core_service.properties.clone()
        };
        let resource = self.resource_facts();
        let pid = job.pid;
        async move { gca_drivers::facts::image_facts(&resource, kind, pid, declared).await }
    }

    /// With signatures on, an image is signed with its owner: one whose owner is unknown
    /// could never be registered, so it is not taken.
    fn signable(&self, job: &Job) -> Result<()> {
        if self.inner.signer.is_some() && (job.uid == u32::MAX || job.owner_gid.is_none()) {
            return Err(Error::Fault(Fault::new(
                gca_protocol::FaultKind::OperationFailed,
                format!(
                    "job {:?} cannot be checkpointed: its owner (user and group) is unknown, and images are signed with their owner",
                    job.gid
                ),
            )));
        }
        Ok(())
    }

    /// The staging directory of a failed checkpoint is removed; its logs (CRIU's `dump.log`,
    /// a command's `command.log`) are kept under `<state_dir>/failed/<image id>/` for the
    /// operator, and the error points there.
    pub(super) fn keep_failure_logs(
        &self,
        id: &str,
        staging: &Path,
        mut e: DriverError,
    ) -> DriverError {
        let keep = self.inner.config.state_dir.join("failed").join(id);
        let Ok(entries) = std::fs::read_dir(staging) else {
            return e;
        };
        let mut kept = false;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_log = name.to_string_lossy().ends_with(".log");
            if is_log
                && entry.file_type().is_ok_and(|t| t.is_file())
                && std::fs::create_dir_all(&keep).is_ok()
                && std::fs::copy(entry.path(), keep.join(&name)).is_ok()
            {
                kept = true;
            }
        }
        if kept {
            let staged = staging.display().to_string();
            e.message = if e.message.contains(&staged) {
                e.message.replace(&staged, &keep.display().to_string())
            } else {
                format!("{} (logs kept in {})", e.message, keep.display())
            };
        }
        e
    }

    /// Stops a job after a checkpoint: the configured signal, then SIGKILL after the grace.
    pub(super) async fn stop_job(&self, job: &Job) {
        let c = &self.inner.config.checkpoint;
        let sig = proc::parse_signal(&c.stop_signal).unwrap_or(rustix::process::Signal::TERM);
        let fd = job.pidfd.as_deref();
        if proc::send_signal(job.pid, fd, sig).is_err() {
            return;
        }
        if !proc::wait_gone(
            job.pid,
            job.start_time,
            Duration::from_secs(c.stop_grace_secs),
        )
        .await
        {
            tracing::warn!(gid = %job.gid, pid = job.pid, "job ignored {}; killing it", c.stop_signal);
            let _ = proc::send_signal(job.pid, fd, rustix::process::Signal::KILL);
            proc::wait_gone(job.pid, job.start_time, Duration::from_secs(5)).await;
        }
    }

    /// Collects a checkpoint the job took on its own, if one is ready; the caller holds
    /// `job.lock`. Failures are logged: nothing else depends on them.
    pub(super) async fn collect_internal_locked(&self, job: &Arc<Job>) {
        if job.stopping() {
            return;
        }
        let staging = match self.new_image_id() {
            Ok(id) => self.inner.store.stage(&id).await.map_err(Error::from),
            Err(e) => Err(e),
        };
        let staging = match staging {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(gid = %job.gid, error = %e, "cannot stage an internal checkpoint");
                return;
            }
        };
        let handle = self.handle(job);
        let taken_at = Utc::now();
        match self
            .inner
            .driver
            .collect_internal(&handle, &staging.dir)
            .await
        {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.register_collected(job, staging, taken_at).await {
                    tracing::warn!(gid = %job.gid, error = %e, "could not store a checkpoint the job took on its own");
                }
            }
            Err(e) => {
                tracing::warn!(gid = %job.gid, error = %e.message, "could not collect a checkpoint the job took on its own")
            }
        }
    }

    pub(super) async fn register_collected(
        &self,
        job: &Arc<Job>,
        staging: Staging,
        taken_at: DateTime<Utc>,
    ) -> Result<()> {
        let id = staging.id().clone();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = async {
            self.signable(job)?;
            let place = self.inner.link.reserve(&id, &job.gid)?;
            let facts = self.image_facts(job).await;
            let (record, saved) = self
                .commit_image(job, staging, &id, Capture { taken_at, facts }, Origin::Job, false)
                .await?;
            let _ = saved.await;
            tracing::info!(gid = %job.gid, checkpoint.id = %id, "checkpoint taken by the job itself");
            drop(queue_record(place, &record));
            Ok(())
        }
        .await;
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

/// Puts a committed image's record in the place kept for it.
fn queue_record(place: Reservation, record: &CheckpointRecord) -> Pending {
    place.fill(OutboxItem::RegisterCheckpoint(Box::new(
        RegisterCheckpoint {
            checkpoint: record.clone(),
        },
    )))
}

/// `uid` and `gid` (the owner's numeric user and group, not the job's GID, which is
/// `meta.gid`) for an image's `meta.extra`: the owner an image is exported for
/// (`POST /images/{id}/export`). Left out when the CTS could not read them.
fn owner_extra(job: &Job) -> Vec<(String, String)> {
    match (job.uid, job.owner_gid) {
        (uid, Some(gid)) if uid != u32::MAX => vec![
            (
                gca_store::export::OWNER_UID_KEY.to_string(),
                uid.to_string(),
            ),
            (
                gca_store::export::OWNER_GID_KEY.to_string(),
                gid.to_string(),
            ),
        ],
        _ => {
            tracing::warn!(gid = %job.gid, pid = job.pid, "the job's owner is unknown; its images cannot be exported to the owner's directory");
            Vec::new()
        }
    }
}
