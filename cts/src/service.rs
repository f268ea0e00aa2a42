//! The CTS service layer: jobs, checkpoints, periodic and internal checkpoints, exits. The
//! HTTP layer (`crate::http`) only translates between the wire and these methods.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use gca_protocol::fault::Fault;
use gca_protocol::messages::*;
use gca_protocol::placeholders::{self, Values};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gcs_link::{write_atomically, Delivered, GcsLink, OutboxItem};
use gca_drivers::{proc, CheckpointRequest, CoreCheckpointer, DriverError, JobHandle};
use gca_protocol::cts_api::{Load, Status};
use gca_protocol::local::{
    FetchImage, FetchedImage, GcsDelivery, LocalExit, LocalInfo, LocalJob, RegisterLocalJob,
};
use gca_store::{ImageId, ImageMeta, ImageStore, Staging};

/// Who is calling the local API (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: Option<i32>,
    pub uid: u32,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Cts {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    cts_type: CtsType,
    instance: CtsInstance,
    driver: Arc<dyn CoreCheckpointer>,
    driver_check: String,
    store: ImageStore,
    link: GcsLink,
    /// For fetching images from other CTSes.
    http: reqwest::Client,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    in_flight: AtomicU64,
    checkpoints_taken: AtomicU64,
    cancel: CancellationToken,
}

/// A job running here.
struct Job {
    gid: String,
    pid: i32,
    start_time: u64,
    /// The job's owner (its process's real UID and GID); recorded in each of its images.
    uid: u32,
    owner_gid: Option<u32>,
    pidfd: Option<Arc<OwnedFd>>,
    checkpoint_dir: PathBuf,
    environment: Vec<Property>,
    periodic: Option<Duration>,
    registered_at: DateTime<Utc>,
    gcs: Mutex<GcsDelivery>,
    /// One checkpoint at a time per job.
    lock: tokio::sync::Mutex<()>,
    busy_since: Mutex<Option<(Origin, DateTime<Utc>)>>,
    /// Checkpointed and stopped for migration: its exit is expected, not a finish.
    stopping: AtomicBool,
    /// A recovery wrapper (`pid`) is restoring the job's image: no checkpoints, and the
    /// wrapper's exit is no finish (it registers the restored process next, or withdraws).
    restoring: bool,
    /// Exit already handled (by the watcher or a wrapper's report).
    gone: AtomicBool,
    checkpoints: AtomicU64,
    last_checkpoint: Mutex<Option<String>>,
    cancel: CancellationToken,
}

/// What survives a CTS restart about a job (`<state_dir>/jobs/<key>.json`).
#[derive(Debug, Serialize, Deserialize)]
struct SavedJob {
    gid: String,
    pid: i32,
    start_time: u64,
    uid: u32,
    /// The owner's group; absent in the files of CTS versions before it was recorded (then
    /// read again from the running process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_gid: Option<u32>,
    checkpoint_dir: PathBuf,
    environment: Vec<Property>,
    periodic_interval_secs: Option<u64>,
    registered_at: DateTime<Utc>,
    checkpoints: u64,
    last_checkpoint: Option<String>,
    /// A recovery wrapper is restoring the job (the first step of a recovery registration):
    /// a restarted CTS keeps the registration, so the wrapper's second step finds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    restoring: bool,
}

impl Job {
    fn new(saved: SavedJob, gcs: GcsDelivery, cancel: CancellationToken) -> Self {
        Job {
            pidfd: proc::pidfd(saved.pid).map(Arc::new),
            gid: saved.gid,
            pid: saved.pid,
            start_time: saved.start_time,
            uid: saved.uid,
            owner_gid: saved
                .owner_gid
                .or_else(|| proc::gid(saved.pid))
                .or_else(|| proc::passwd_gid(saved.uid)),
            checkpoint_dir: saved.checkpoint_dir,
            environment: saved.environment,
            periodic: saved.periodic_interval_secs.map(Duration::from_secs),
            registered_at: saved.registered_at,
            gcs: Mutex::new(gcs),
            lock: tokio::sync::Mutex::new(()),
            busy_since: Mutex::new(None),
            stopping: AtomicBool::new(false),
            restoring: saved.restoring,
            gone: AtomicBool::new(false),
            checkpoints: AtomicU64::new(saved.checkpoints),
            last_checkpoint: Mutex::new(saved.last_checkpoint),
            cancel,
        }
    }

    /// What survives a restart.
    fn saved(&self) -> SavedJob {
        SavedJob {
            gid: self.gid.clone(),
            pid: self.pid,
            start_time: self.start_time,
            uid: self.uid,
            owner_gid: self.owner_gid,
            checkpoint_dir: self.checkpoint_dir.clone(),
            environment: self.environment.clone(),
            periodic_interval_secs: self.periodic.map(|d| d.as_secs()),
            registered_at: self.registered_at,
            checkpoints: self.checkpoints.load(Ordering::SeqCst),
            last_checkpoint: self.last_checkpoint.lock().expect("lock").clone(),
            restoring: self.restoring,
        }
    }
}

const MAX_GID_LEN: usize = 256;

fn check_gid(gid: &str) -> Result<()> {
    if gid.is_empty() || gid.len() > MAX_GID_LEN || gid.chars().any(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "a GID must be 1-{MAX_GID_LEN} printable characters, got {gid:?}"
        )));
    }
    Ok(())
}

/// A file-name-safe key for a GID (GIDs are chosen by brokers and may hold any character).
fn job_key(gid: &str) -> String {
    use sha2::Digest;
    let safe: String = gid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(40)
        .collect();
    let hash = hex::encode(&sha2::Sha256::digest(gid.as_bytes())[..8]);
    format!(
        "{}{}{hash}",
        safe.trim_start_matches('.'),
        if safe.is_empty() { "" } else { "-" }
    )
}

impl Cts {
    /// Builds the service: checks the driver, opens the store and the outbox, reloads the
    /// jobs of a previous run that still run. Background work starts with [`Cts::start`].
    pub async fn new(
        config: Config,
        cts_type: CtsType,
        driver: Arc<dyn CoreCheckpointer>,
        http: reqwest::Client,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let driver_check = driver.self_check().await.map_err(|e| {
            anyhow::anyhow!(
                "the {} core checkpointer is not usable: {}",
                driver.kind(),
                e.message
            )
        })?;
        for dir in [
            config.state_dir.join("jobs"),
            config.state_dir.join("checkpoint"),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let max = (config.store.max_bytes > 0).then_some(config.store.max_bytes);
        let store =
            ImageStore::open(&config.store_dir(), max).map_err(|e| anyhow::anyhow!("{e}"))?;
        let instance = CtsInstance {
            name: config.name.clone(),
            cts_type: cts_type.name.clone(),
            url: format!(
                "{}{}",
                config.public_url(),
                gca_protocol::ns::CTS_SERVICE_PATH
            ),
            execution_manager: config.execution_manager.clone(),
            resource: config.resource.clone(),
            registered_at: None,
            last_seen: None,
        };
        let client = gca_protocol::client::SoapClient::new(http.clone(), config.gcs_endpoint());
        let link = GcsLink::open(
            client,
            instance.clone(),
            &config.state_dir.join("outbox"),
            Duration::from_secs(config.heartbeat_secs),
        )?;
        let cts = Cts {
            inner: Arc::new(Inner {
                config,
                cts_type,
                instance,
                driver,
                driver_check,
                store,
                link,
                http,
                jobs: Mutex::new(HashMap::new()),
                in_flight: AtomicU64::new(0),
                checkpoints_taken: AtomicU64::new(0),
                cancel: CancellationToken::new(),
            }),
        };
        cts.reload_jobs();
        Ok(cts)
    }

    /// Starts the GCS link, the store's reconciliation and the per-job watchers; they stop on
    /// [`Cts::shutdown`].
    pub fn start(&self) {
        tokio::spawn(self.inner.link.clone().run(self.inner.cancel.child_token()));
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
        let jobs: Vec<Arc<Job>> = self.jobs().values().cloned().collect();
        for job in jobs {
            self.spawn_job_tasks(job);
        }
    }

    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }
    pub fn store(&self) -> &ImageStore {
        &self.inner.store
    }
    pub fn instance(&self) -> &CtsInstance {
        &self.inner.instance
    }
    pub fn link(&self) -> &GcsLink {
        &self.inner.link
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.inner.jobs.lock().expect("jobs lock")
    }

    fn job(&self, gid: &str) -> Result<Arc<Job>> {
        check_gid(gid)?;
        self.jobs().get(gid).cloned().ok_or_else(|| {
            Error::Fault(
                Fault::resource_unknown(format!(
                    "no job with GID {gid:?} runs under CTS {:?}; jobs are registered here by their wrapper (gca-exec) when they start",
                    self.inner.instance.name
                ))
                .with_code("unknown-gid"),
            )
        })
    }

    pub fn status(&self) -> Status {
        Status {
            instance: self.inner.instance.clone(),
            descriptor: self.inner.cts_type.clone(),
            driver: self.inner.driver.kind().to_string(),
            driver_check: self.inner.driver_check.clone(),
            gcs: self.inner.link.status(),
            load: Load {
                jobs: self.jobs().len(),
                checkpoints_in_flight: self.inner.in_flight.load(Ordering::Relaxed),
                checkpoints_taken: self.inner.checkpoints_taken.load(Ordering::Relaxed),
                store_bytes: self.inner.store.usage(),
                store_max_bytes: (self.inner.config.store.max_bytes > 0)
                    .then_some(self.inner.config.store.max_bytes),
            },
        }
    }

    pub fn local_info(&self) -> LocalInfo {
        LocalInfo {
            name: self.inner.instance.name.clone(),
            cts_type: self.inner.cts_type.name.clone(),
            resource: self.inner.instance.resource.clone(),
            url: self.inner.instance.url.clone(),
            socket: self.inner.config.local_socket(),
            driver: self.inner.driver.kind().to_string(),
            gcs_url: self.inner.config.gcs_url.clone(),
            driver_config: Some(self.inner.config.driver.clone()),
            recovery_job_parameters: self.inner.cts_type.recovery_job_parameters.clone(),
        }
    }

    fn base_values(&self) -> Values {
        let i = &self.inner.instance;
        Values::new()
            .set("CTS_URL", i.url.clone())
            .set("CTS_NAME", i.name.clone())
            .set("CTS_TYPE", i.cts_type.clone())
            .set("RESOURCE", i.resource.clone())
            .set("EXECUTION_MANAGER", i.execution_manager.clone())
            .set(
                "GCS_URL",
                self.inner.config.gcs_url.trim_end_matches('/').to_string(),
            )
    }

    fn job_values(&self, job: &Job) -> Values {
        self.base_values()
            .set("GID", job.gid.clone())
            .set("CHECKPOINT_DIR", job.checkpoint_dir.display().to_string())
            .set("PID", job.pid.to_string())
    }

    fn view(&self, job: &Job) -> LocalJob {
        LocalJob {
            gid: job.gid.clone(),
            pid: job.pid,
            state: if job.restoring {
                JobState::Recovering
            } else if job.stopping.load(Ordering::SeqCst) {
                JobState::Stopped
            } else {
                JobState::Running
            },
            checkpoint_dir: job.checkpoint_dir.clone(),
            environment: job.environment.clone(),
            periodic_interval_secs: job.periodic.map(|d| d.as_secs()),
            registered_at: job.registered_at,
            checkpoints: job.checkpoints.load(Ordering::SeqCst),
            last_checkpoint: job.last_checkpoint.lock().expect("lock").clone(),
            busy: job.busy_since.lock().expect("lock").is_some(),
            gcs: *job.gcs.lock().expect("lock"),
        }
    }

    pub fn list_jobs(&self) -> Vec<LocalJob> {
        let jobs: Vec<Arc<Job>> = self.jobs().values().cloned().collect();
        let mut out: Vec<LocalJob> = jobs.iter().map(|j| self.view(j)).collect();
        out.sort_by(|a, b| a.gid.cmp(&b.gid));
        out
    }

    pub fn get_job(&self, gid: &str) -> Result<LocalJob> {
        let job = self.job(gid)?;
        Ok(self.view(&job))
    }

    // ---- registration --------------------------------------------------------------------

    /// A wrapper registers GID ↔ PID (paper 3.4.1); the CTS then tells the GCS it is in
    /// charge of the GID. Idempotent for the same GID and process.
    pub async fn register_job(&self, req: RegisterLocalJob, caller: Caller) -> Result<LocalJob> {
        check_gid(&req.gid)?;
        let Some(stat) = proc::stat(req.pid).filter(|s| s.state != 'Z') else {
            return Err(Error::unknown(format!(
                "no process with PID {} runs on this resource; a wrapper registers its own PID before it executes the job",
                req.pid
            )));
        };
        let uid = proc::uid(req.pid).unwrap_or(u32::MAX);
        let owner_gid = proc::gid(req.pid).or_else(|| proc::passwd_gid(uid));
        if caller.uid != 0 && caller.uid != uid {
            return Err(Error::denied(format!(
                "process {} belongs to user {uid}, not to the caller (user {}); a job can only register its own processes",
                req.pid, caller.uid
            )));
        }
        check_retention(&req)?;
        let restoring = req.recovery.as_ref().is_some_and(|r| r.restoring);
        let periodic = if restoring {
            None
        } else {
            self.periodic_for(req.periodic_interval_secs)?
        };
        // The second step of a recovery takes over the first one's directory and environment
        // (the restored image may be in the directory already).
        let mut taken_over: Option<Arc<Job>> = None;
        if let Some(existing) = self.jobs().get(&req.gid).cloned() {
            if existing.pid == req.pid && existing.start_time == stat.start_time {
                return Ok(self.view(&existing));
            }
            if existing.restoring && req.recovery.is_some() && !restoring {
                if caller.uid != 0 && caller.uid != existing.uid {
                    return Err(Error::denied(format!(
                        "job {:?} is being recovered by user {}, not by the caller (user {})",
                        req.gid, existing.uid, caller.uid
                    )));
                }
                taken_over = Some(existing);
            } else if proc::is_alive(existing.pid, existing.start_time) {
                return Err(Error::conflict(format!(
                    "GID {:?} is already registered here for process {}, which still runs",
                    req.gid, existing.pid
                )));
            }
        }
        if let Some(other) = self
            .jobs()
            .values()
            .find(|j| j.pid == req.pid && j.start_time == stat.start_time && j.gid != req.gid)
        {
            return Err(Error::conflict(format!(
                "process {} is already registered as job {:?}",
                req.pid, other.gid
            )));
        }
        let key = job_key(&req.gid);
        let checkpoint_dir = self.inner.config.state_dir.join("checkpoint").join(&key);
        if taken_over.is_none() {
            prepare_checkpoint_dir(&checkpoint_dir, uid).map_err(|e| {
                anyhow::anyhow!(
                    "creating the checkpoint directory {}: {e}",
                    checkpoint_dir.display()
                )
            })?;
        }
        let values = self
            .base_values()
            .set("GID", req.gid.clone())
            .set("CHECKPOINT_DIR", checkpoint_dir.display().to_string());
        let environment = match &taken_over {
            Some(t) => t.environment.clone(),
            None => self.environment_for(&values)?,
        };
        // Tell the GCS first: a conflict there (the GID runs elsewhere) refuses the job here.
        let item = OutboxItem::RegisterJob(gcs_registration(&req, &self.inner.instance.name));
        let gcs = match self.inner.link.send(item, self.gcs_wait()).await {
            Ok(Some(_)) => GcsDelivery::Registered,
            Ok(None) => {
                tracing::warn!(gid = %req.gid, "GCS unreachable; job accepted, its registration is queued");
                GcsDelivery::Pending
            }
            Err(e) => {
                let f: Fault = e.into();
                return Err(Error::Fault(Fault {
                    message: format!("the GCS refused job {:?}: {}", req.gid, f.message),
                    ..f
                }));
            }
        };
        let job = Arc::new(Job::new(
            SavedJob {
                gid: req.gid.clone(),
                pid: req.pid,
                start_time: stat.start_time,
                uid,
                owner_gid,
                checkpoint_dir,
                environment,
                periodic_interval_secs: periodic.map(|d| d.as_secs()),
                registered_at: Utc::now(),
                checkpoints: 0,
                last_checkpoint: None,
                restoring,
            },
            gcs,
            self.inner.cancel.child_token(),
        ));
        if let Some(old) = self.jobs().insert(req.gid.clone(), job.clone()) {
            old.cancel.cancel();
        }
        self.save_job(&job);
        tracing::info!(gid = %job.gid, pid = job.pid, periodic_secs = ?job.periodic.map(|d| d.as_secs()), gcs = ?gcs, recovery = ?req.recovery, retention = ?req.retention, "job registered");
        self.spawn_job_tasks(job.clone());
        Ok(self.view(&job))
    }

    fn environment_for(&self, values: &Values) -> anyhow::Result<Vec<Property>> {
        self.inner
            .cts_type
            .environment
            .iter()
            .map(|p| {
                placeholders::expand_partial(&p.value, values)
                    .map(|value| Property {
                        name: p.name.clone(),
                        value,
                    })
                    .map_err(|e| anyhow::anyhow!("the descriptor's environment {}: {e}", p.name))
            })
            .collect()
    }

    /// Withdraws a recovery registration whose restore failed (`DELETE /v1/jobs/{gid}`). The
    /// GCS is not told: the job stays `recovering` there and can be recovered again.
    pub fn abandon_recovery(&self, gid: &str, caller: Caller) -> Result<LocalJob> {
        let job = self.job(gid)?;
        if !job.restoring {
            return Err(Error::conflict(format!(
                "job {gid:?} is not being recovered here; only a recovery registration that is still restoring can be withdrawn"
            )));
        }
        if caller.uid != 0 && caller.uid != job.uid {
            return Err(Error::denied(format!(
                "job {gid:?} belongs to user {}, not to the caller (user {})",
                job.uid, caller.uid
            )));
        }
        self.forget(&job);
        tracing::info!(gid = %gid, "recovery withdrawn by its wrapper");
        Ok(self.view(&job))
    }

    /// Drops a restoring registration without telling the GCS.
    fn forget(&self, job: &Arc<Job>) {
        if job.gone.swap(true, Ordering::SeqCst) {
            return;
        }
        job.cancel.cancel();
        let mut jobs = self.jobs();
        if jobs.get(&job.gid).is_some_and(|j| Arc::ptr_eq(j, job)) {
            jobs.remove(&job.gid);
            drop(jobs);
            let _ = std::fs::remove_file(self.job_file(&job.gid));
            let _ = std::fs::remove_dir_all(&job.checkpoint_dir);
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
            let records = match self
                .inner
                .link
                .query::<gca_protocol::ops::GetCheckpointsOp>(&GidRequest { gid: gid.clone() })
                .await
            {
                Ok(list) => list.checkpoints,
                Err(f) if f.kind == gca_protocol::FaultKind::ResourceUnknown => continue,
                Err(f) => return Err(Error::Fault(f)),
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

    /// The GCS's record of checkpoint `id` of job `gid`, whose image must still be stored.
    async fn recorded_checkpoint(&self, gid: &str, id: &str) -> Result<CheckpointRecord> {
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

    fn periodic_for(&self, asked: Option<u64>) -> Result<Option<Duration>> {
        let c = &self.inner.config.checkpoint;
        let secs = asked.unwrap_or(c.periodic_interval_secs);
        if secs == 0 {
            return Ok(None);
        }
        if !self.inner.cts_type.core_service.internal_checkpoints {
            return Err(Error::invalid(format!(
                "CTS type {:?} does not take internal checkpoints, so it cannot checkpoint jobs periodically",
                self.inner.cts_type.name
            )));
        }
        if secs < c.min_periodic_interval_secs {
            return Err(Error::invalid(format!(
                "a periodic checkpoint interval of {secs} s is shorter than this CTS allows ({} s)",
                c.min_periodic_interval_secs
            )));
        }
        Ok(Some(Duration::from_secs(secs)))
    }

    fn gcs_wait(&self) -> Duration {
        Duration::from_secs(self.inner.config.gcs_wait_secs)
    }

    fn job_file(&self, gid: &str) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("jobs")
            .join(format!("{}.json", job_key(gid)))
    }

    fn save_job(&self, job: &Job) {
        let saved = job.saved();
        let path = self.job_file(&job.gid);
        let result = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(&path, &b));
        if let Err(e) = result {
            tracing::error!(gid = %job.gid, file = %path.display(), error = %e, "cannot save the job's state; it will be forgotten if the CTS restarts");
        }
    }

    /// Jobs of a previous run that still run are taken back; the others are reported as
    /// finished (their exit status is unknown).
    fn reload_jobs(&self) {
        let dir = self.inner.config.state_dir.join("jobs");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let saved: SavedJob = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable job state ignored");
                    continue;
                }
            };
            if saved.restoring && !proc::is_alive(saved.pid, saved.start_time) {
                // Its recovery wrapper died before the job ran: nothing finished (the GCS
                // keeps the job `recovering`, so it can be recovered again).
                tracing::info!(gid = %saved.gid, pid = saved.pid, "recovery of a previous run was abandoned; registration dropped");
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir_all(&saved.checkpoint_dir);
                continue;
            }
            if !proc::is_alive(saved.pid, saved.start_time) {
                tracing::info!(gid = %saved.gid, pid = saved.pid, "job of a previous run is gone; reporting it finished");
                let _ = std::fs::remove_file(&path);
                let _ = self
                    .inner
                    .link
                    .enqueue_nowait(OutboxItem::JobFinished(JobFinished {
                        gid: saved.gid,
                        cts_instance: self.inner.instance.name.clone(),
                        exit_status: None,
                        signal: None,
                    }));
                continue;
            }
            let job = Arc::new(Job::new(
                saved,
                GcsDelivery::Registered,
                self.inner.cancel.child_token(),
            ));
            tracing::info!(gid = %job.gid, pid = job.pid, restoring = job.restoring, "job of a previous run taken back");
            self.jobs().insert(job.gid.clone(), job);
        }
    }

    // ---- checkpoints ---------------------------------------------------------------------

    /// doCheckpoint from the GCS (paper 5.2 steps 4-9).
    pub async fn do_checkpoint(&self, req: DoCheckpoint) -> Result<CheckpointRecord> {
        if !self.inner.cts_type.core_service.external_checkpoints {
            return Err(Error::conflict(format!(
                "CTS type {:?} does not accept checkpoint requests; its jobs are checkpointed internally",
                self.inner.cts_type.name
            )));
        }
        let job = self.job(&req.gid)?;
        let stop = req.stop || self.inner.config.checkpoint.stop_after;
        let wait = Duration::from_secs(self.inner.config.checkpoint.busy_wait_secs);
        let guard = match job.lock.try_lock() {
            Ok(g) => g,
            Err(_) => {
                let busy = *job.busy_since.lock().expect("lock");
                match tokio::time::timeout(wait, job.lock.lock()).await {
                    Ok(g) => g,
                    Err(_) => {
                        let what = busy
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
                }
            }
        };
        let record = self
            .fresh_checkpoint_locked(&job, Origin::External, stop)
            .await;
        drop(guard);
        record
    }

    /// A checkpoint the job took on its own comes first (so sequence numbers follow time),
    /// then the requested one; the caller holds `job.lock`.
    async fn fresh_checkpoint_locked(
        &self,
        job: &Arc<Job>,
        origin: Origin,
        stop: bool,
    ) -> Result<CheckpointRecord> {
        self.collect_internal_locked(job).await;
        match self.checkpoint_locked(job, origin, stop).await {
            // The job finished one of its own in between: collect it and ask again, once.
            Err(Error::Driver(e)) if e.code == "internal-checkpoint-pending" => {
                self.collect_internal_locked(job).await;
                self.checkpoint_locked(job, origin, stop).await
            }
            other => other,
        }
    }

    /// Takes one checkpoint; the caller holds `job.lock`.
    async fn checkpoint_locked(
        &self,
        job: &Arc<Job>,
        origin: Origin,
        stop: bool,
    ) -> Result<CheckpointRecord> {
        if job.restoring {
            return Err(Error::conflict(format!(
                "job {:?} is being recovered; checkpoint it once it runs again",
                job.gid
            )));
        }
        if job.stopping.load(Ordering::SeqCst) {
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
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        *job.busy_since.lock().expect("lock") = Some((origin, Utc::now()));
        let result = self.take(job, origin, stop).await;
        *job.busy_since.lock().expect("lock") = None;
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        match &result {
            Ok(r) => {
                tracing::info!(gid = %job.gid, checkpoint.id = %r.id, checkpoint.sequence = ?r.sequence, origin = %origin, stopped = r.job_stopped, "checkpoint taken")
            }
            Err(e) => {
                tracing::warn!(gid = %job.gid, origin = %origin, error = %e, "checkpoint failed")
            }
        }
        result
    }

    /// Moves a written image into the store (manifest, atomic rename) and makes its record
    /// (without a sequence number: the GCS assigns it); counts it for the job.
    async fn commit_image(
        &self,
        job: &Arc<Job>,
        staging: Staging,
        id: &ImageId,
        taken_at: DateTime<Utc>,
        origin: Origin,
        stop: bool,
    ) -> Result<CheckpointRecord> {
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
                ]
                .into_iter()
                .chain(owner_extra(job))
                .collect(),
            })
            .await?;
        let digest = self.inner.store.digest(id).await?;
        job.checkpoints.fetch_add(1, Ordering::SeqCst);
        *job.last_checkpoint.lock().expect("lock") = Some(id.to_string());
        self.inner.checkpoints_taken.fetch_add(1, Ordering::SeqCst);
        self.save_job(job);
        Ok(CheckpointRecord {
            id: id.to_string(),
            gid: job.gid.clone(),
            sequence: None,
            cts_name: self.inner.instance.name.clone(),
            cts_type: self.inner.cts_type.name.clone(),
            taken_at,
            image_name: format!("{}/images/{id}", self.inner.config.public_url()),
            execution_manager: self.inner.instance.execution_manager.clone(),
            size_bytes: Some(manifest.total_bytes as i64),
            digest: Some(digest),
            parent: None,
            origin,
            job_stopped: stop,
            registered_at: None,
            image_state: Default::default(),
            kept_in: None,
            image_error: None,
        })
    }

    fn new_image_id(&self) -> Result<ImageId> {
        let rand = uuid::Uuid::new_v4().simple().to_string();
        Ok(ImageId::parse(&format!(
            "{}-{}-{}",
            self.inner.instance.name,
            Utc::now().format("%Y%m%dT%H%M%SZ"),
            &rand[..12]
        ))?)
    }

    async fn take(&self, job: &Arc<Job>, origin: Origin, stop: bool) -> Result<CheckpointRecord> {
        let id = self.new_image_id()?;
        let staging = self.inner.store.stage(&id).await?;
        let values = self
            .job_values(job)
            .set("IMAGE_ID", id.to_string())
            .set("IMAGE_DIR", staging.dir.display().to_string());
        let handle = self.handle(job);
        let timeout = self.inner.config.checkpoint_timeout();
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
            job.stopping.store(true, Ordering::SeqCst);
            if !outcome.stopped {
                self.stop_job(job).await;
            }
        }
        let record = self
            .commit_image(job, staging, &id, taken_at, origin, stop)
            .await
            .inspect_err(|e| {
                if stop {
                    tracing::error!(gid = %job.gid, error = %e, "job stopped but its image could not be stored");
                }
            })?;
        let item = OutboxItem::RegisterCheckpoint(RegisterCheckpoint {
            checkpoint: record.clone(),
        });
        match self.inner.link.send(item, self.gcs_wait()).await {
            Ok(Some(Delivered::Checkpoint(r))) => Ok(r.checkpoint),
            Ok(_) => {
                tracing::warn!(gid = %job.gid, checkpoint.id = %id, "GCS unreachable; checkpoint kept and its record queued");
                Ok(record)
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

    /// The staging directory of a failed checkpoint is removed; its logs (CRIU's `dump.log`,
    /// a command's `command.log`) are kept under `<state_dir>/failed/<image id>/` for the
    /// operator, and the error points there.
    fn keep_failure_logs(&self, id: &str, staging: &Path, mut e: DriverError) -> DriverError {
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

    fn handle(&self, job: &Job) -> JobHandle {
        JobHandle {
            gid: job.gid.clone(),
            pid: job.pid,
            pidfd: job.pidfd.clone(),
            checkpoint_dir: job.checkpoint_dir.clone(),
        }
    }

    /// Stops a job after a checkpoint: the configured signal, then SIGKILL after the grace.
    async fn stop_job(&self, job: &Job) {
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
    async fn collect_internal_locked(&self, job: &Arc<Job>) {
        if job.stopping.load(Ordering::SeqCst) {
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

    async fn register_collected(
        &self,
        job: &Arc<Job>,
        staging: Staging,
        taken_at: DateTime<Utc>,
    ) -> Result<()> {
        let id = staging.id().clone();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = async {
            let record = self
                .commit_image(job, staging, &id, taken_at, Origin::Job, false)
                .await?;
            tracing::info!(gid = %job.gid, checkpoint.id = %id, "checkpoint taken by the job itself");
            self.inner
                .link
                .enqueue_nowait(OutboxItem::RegisterCheckpoint(RegisterCheckpoint { checkpoint: record }))
                .map_err(|e| Error::Fault(e.into()))
        }
        .await;
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    // ---- per-job background work ---------------------------------------------------------

    fn spawn_job_tasks(&self, job: Arc<Job>) {
        // Exit watcher.
        let cts = self.clone();
        let j = job.clone();
        tokio::spawn(async move {
            if wait_exit(&j).await {
                if j.restoring {
                    // The recovery wrapper died before the job ran: nothing finished.
                    cts.forget(&j);
                } else {
                    cts.job_exited(&j, None).await;
                }
            }
        });
        if job.restoring {
            return;
        }
        // Periodic checkpoints.
        if let Some(every) = job.periodic {
            let cts = self.clone();
            let j = job.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = j.cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let Ok(guard) = j.lock.try_lock() else {
                        tracing::debug!(gid = %j.gid, "periodic checkpoint skipped: another one is in flight");
                        continue;
                    };
                    let _ = cts
                        .fresh_checkpoint_locked(&j, Origin::Periodic, false)
                        .await;
                    drop(guard);
                    if j.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                }
            });
        }
        // Checkpoints the job takes on its own.
        if self.inner.cts_type.core_service.internal_checkpoints {
            let cts = self.clone();
            let every =
                Duration::from_millis(self.inner.config.checkpoint.internal_poll_ms.max(10));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = job.cancel.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    if let Ok(guard) = job.lock.try_lock() {
                        cts.collect_internal_locked(&job).await;
                        drop(guard);
                    }
                }
            });
        }
    }

    /// The job's process is gone: collect a last internal checkpoint, forget the job, and tell
    /// the GCS (unless it was stopped for migration, which the GCS already knows).
    async fn job_exited(&self, job: &Arc<Job>, reported: Option<LocalExit>) {
        if job.gone.swap(true, Ordering::SeqCst) {
            return;
        }
        let (exit_status, signal) = match reported {
            Some(r) => (r.exit_status, r.signal),
            None => proc::stat(job.pid)
                .filter(|s| s.start_time == job.start_time && s.state == 'Z')
                .and_then(|s| s.exit_code)
                .map(proc::decode_wait_status)
                .unwrap_or((None, None)),
        };
        {
            let _guard = job.lock.lock().await;
            self.collect_internal_locked(job).await;
        }
        job.cancel.cancel();
        let current = {
            let mut jobs = self.jobs();
            let current = jobs.get(&job.gid).is_some_and(|j| Arc::ptr_eq(j, job));
            if current {
                jobs.remove(&job.gid);
            }
            current
        };
        // A recovery of the same GID may have registered meanwhile: its files stay.
        if current {
            let _ = std::fs::remove_file(self.job_file(&job.gid));
            let _ = std::fs::remove_dir_all(&job.checkpoint_dir);
        }
        if job.stopping.load(Ordering::SeqCst) {
            tracing::info!(gid = %job.gid, pid = job.pid, "job stopped after its checkpoint");
            return;
        }
        tracing::info!(gid = %job.gid, pid = job.pid, exit_status = ?exit_status, signal = ?signal, "job finished");
        let item = OutboxItem::JobFinished(JobFinished {
            gid: job.gid.clone(),
            cts_instance: self.inner.instance.name.clone(),
            exit_status,
            signal,
        });
        if let Err(e) = self.inner.link.enqueue_nowait(item) {
            tracing::error!(gid = %job.gid, error = %e, "cannot queue the job's exit for the GCS");
        }
    }

    /// A wrapper that is the job's parent (the recovery wrapper) reports how the job ended.
    pub async fn report_exit(
        &self,
        gid: &str,
        exit: LocalExit,
        caller: Caller,
    ) -> Result<LocalJob> {
        let job = self.job(gid)?;
        if caller.uid != 0 && caller.uid != job.uid {
            return Err(Error::denied(format!(
                "job {gid:?} belongs to user {}, not to the caller (user {})",
                job.uid, caller.uid
            )));
        }
        let view = self.view(&job);
        self.job_exited(&job, Some(exit)).await;
        Ok(view)
    }
}

/// The RegisterJob a local registration becomes at the GCS.
fn gcs_registration(req: &RegisterLocalJob, cts_instance: &str) -> RegisterJob {
    RegisterJob {
        gid: req.gid.clone(),
        cts_instance: cts_instance.to_string(),
        local_id: Some(req.pid.to_string()),
        recovery: req.recovery.is_some(),
        from_checkpoint: req
            .recovery
            .as_ref()
            .and_then(|r| r.from_checkpoint.clone()),
        state: req.recovery.as_ref().map(|r| {
            if r.restoring {
                JobState::Recovering
            } else {
                JobState::Running
            }
        }),
        retention: req.retention.clone(),
    }
}

/// A retention policy given at registration must be complete and consistent
/// ([`Retention::validate`]); the GCS is not asked otherwise.
fn check_retention(req: &RegisterLocalJob) -> Result<()> {
    match &req.retention {
        Some(r) => r.validate().map_err(|m| {
            Error::Fault(
                Fault::invalid(format!(
                    "invalid retention policy for job {:?}: {m}",
                    req.gid
                ))
                .with_code("invalid-retention"),
            )
        }),
        None => Ok(()),
    }
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

/// Waits until the job's process has exited (pidfd readable, or polling when there is none).
/// Returns `false` when the job's tasks were cancelled first.
async fn wait_exit(job: &Job) -> bool {
    if let Some(fd) = &job.pidfd {
        if let Ok(dup) = fd.try_clone() {
            // The deprecation is about descriptors the AsyncFd does not own; this one is our
            // own duplicate, owned by the AsyncFd and closed with it.
            #[allow(deprecated)]
            let registered =
                tokio::io::unix::AsyncFd::with_interest(dup, tokio::io::Interest::READABLE);
            if let Ok(afd) = registered {
                tokio::select! {
                    _ = job.cancel.cancelled() => return false,
                    r = afd.readable() => {
                        if r.is_ok() {
                            return true;
                        }
                    }
                }
            }
        }
    }
    loop {
        if !proc::is_alive(job.pid, job.start_time) {
            return true;
        }
        tokio::select! {
            _ = job.cancel.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Creates the per-job checkpoint directory, empty, owned by the job's user.
fn prepare_checkpoint_dir(dir: &Path, uid: u32) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    if rustix::process::getuid().is_root() && uid != 0 {
        let owner = rustix::fs::Uid::from_raw(uid);
        rustix::fs::chown(dir, Some(owner), None).map_err(std::io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gca_protocol::local::LocalRecovery;

    fn req(retention: Option<Retention>) -> RegisterLocalJob {
        RegisterLocalJob {
            gid: "job-1".into(),
            pid: 4242,
            periodic_interval_secs: None,
            recovery: None,
            retention,
        }
    }

    #[test]
    fn the_retention_policy_goes_to_the_gcs_as_given() {
        let r = req(Some(Retention::last(2, "/home/alice/ckpt")));
        check_retention(&r).unwrap();
        let sent = gcs_registration(&r, "cts-a");
        assert_eq!(sent.retention, Some(Retention::last(2, "/home/alice/ckpt")));
        assert_eq!(sent.cts_instance, "cts-a");
        assert_eq!(sent.local_id.as_deref(), Some("4242"));
        assert!(!sent.recovery);
        assert_eq!(sent.state, None);

        // None stays None (the GCS keeps the job's policy, or its default for a new job).
        assert_eq!(gcs_registration(&req(None), "cts-a").retention, None);

        // A recovery may change it.
        let mut r = req(Some(Retention::all("/scratch/alice")));
        r.recovery = Some(LocalRecovery {
            from_checkpoint: Some("ck-1".into()),
            restoring: true,
        });
        let sent = gcs_registration(&r, "cts-b");
        assert!(sent.recovery);
        assert_eq!(sent.state, Some(JobState::Recovering));
        assert_eq!(sent.retention, Some(Retention::all("/scratch/alice")));
        // And it travels in the SOAP form too.
        let el = sent.to_element("RegisterJob");
        assert_eq!(RegisterJob::read_children(&el).unwrap(), sent);
    }

    #[test]
    fn a_bad_retention_policy_is_refused_with_the_reason() {
        let cases = [
            (Retention::last(0, "/d"), "KeepLast must be between 1"),
            (Retention::all("relative/dir"), "absolute path"),
            (Retention::all("/a/../b"), "normalized"),
            (
                Retention {
                    keep: Keep::Last,
                    keep_last: Some(3),
                    keep_in: None,
                },
                "needs KeepIn",
            ),
            (
                Retention {
                    keep: Keep::None,
                    keep_last: None,
                    keep_in: Some("/d".into()),
                },
                "KeepIn only goes with",
            ),
        ];
        for (r, want) in cases {
            let f: Fault = check_retention(&req(Some(r.clone()))).unwrap_err().into();
            assert_eq!(f.kind, gca_protocol::FaultKind::InvalidMessage, "{r:?}");
            assert_eq!(f.code.as_deref(), Some("invalid-retention"));
            assert!(
                f.message
                    .starts_with("invalid retention policy for job \"job-1\": "),
                "{}",
                f.message
            );
            assert!(f.message.contains(want), "{r:?}: {}", f.message);
        }
        check_retention(&req(None)).unwrap();
        check_retention(&req(Some(Retention::default()))).unwrap();
    }
}
