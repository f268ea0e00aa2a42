//! The registry of the jobs running here (by GID) and its persistence: every job is saved
//! in `<state_dir>/jobs/<key>.json` when it registers or is checkpointed, and a restarted CTS
//! takes back those that still run (and reports the others finished).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gca_drivers::{proc, JobHandle};
use gca_protocol::fault::Fault;
use gca_protocol::isolation::JobLimits;
use gca_protocol::local::{GcsDelivery, LocalJob};
use gca_protocol::messages::{AbandonRecovery, JobFinished, JobState, Origin, Property, Retention};
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Cts;
use crate::error::{Error, Result};
use crate::gcs_link::{write_atomically, OutboxItem};

/// A job running here. What never changes is plain fields; what changes is in
/// [`Job::state`], under one lock that is never held across an await; the checkpoint lock
/// ([`Job::lock`]) is separate because a checkpoint holds it while the driver runs.
pub(super) struct Job {
    pub(super) gid: String,
    pub(super) pid: i32,
    pub(super) start_time: u64,
    /// The job's owner (its process's real UID and GID); recorded in each of its images.
    pub(super) uid: u32,
    pub(super) owner_gid: Option<u32>,
    pub(super) pidfd: Option<Arc<OwnedFd>>,
    pub(super) checkpoint_dir: PathBuf,
    pub(super) environment: Vec<Property>,
    pub(super) periodic: Option<Duration>,
    pub(super) registered_at: DateTime<Utc>,
    /// The retention policy the job registered with (given again if the GCS forgot it).
    pub(super) retention: Option<Retention>,
    /// A recovery wrapper (`pid`) is restoring the job's image: no checkpoints, and the
    /// wrapper's exit is no finish (it registers the restored process next, or withdraws).
    pub(super) restoring: bool,
    /// The job's cgroup (`crate::cgroup`), made when it registered running.
    pub(super) cgroup: Option<PathBuf>,
    /// The limits written into it (kept in its images, so a recovery restores them).
    pub(super) limits: JobLimits,
    /// One checkpoint at a time per job.
    pub(super) lock: tokio::sync::Mutex<()>,
    /// One write of its state file at a time (each takes the state when it runs).
    saving: Mutex<()>,
    state: Mutex<JobProgress>,
    pub(super) cancel: CancellationToken,
}

/// What changes about a job while it runs here.
#[derive(Debug)]
struct JobProgress {
    gcs: GcsDelivery,
    /// A checkpoint is in flight: what kind, since when.
    busy_since: Option<(Origin, DateTime<Utc>)>,
    /// The poller looks for a checkpoint the job took on its own (it holds, or is about to
    /// try, [`Job::lock`] for that moment): a request waits for it instead of being refused.
    collecting: bool,
    /// Checkpointed and stopped for migration: its exit is expected, not a finish.
    stopping: bool,
    /// Exit already handled (by the watcher or a wrapper's report).
    gone: bool,
    checkpoints: u64,
    last_checkpoint: Option<String>,
}

/// What survives a CTS restart about a job (`<state_dir>/jobs/<key>.json`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SavedJob {
    pub(super) gid: String,
    pub(super) pid: i32,
    pub(super) start_time: u64,
    pub(super) uid: u32,
    /// The owner's group; absent in the files of CTS versions before it was recorded (then
    /// read again from the running process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) owner_gid: Option<u32>,
    pub(super) checkpoint_dir: PathBuf,
    pub(super) environment: Vec<Property>,
    pub(super) periodic_interval_secs: Option<u64>,
    pub(super) registered_at: DateTime<Utc>,
    pub(super) checkpoints: u64,
    pub(super) last_checkpoint: Option<String>,
    /// A recovery wrapper is restoring the job (the first step of a recovery registration):
    /// a restarted CTS keeps the registration, so the wrapper's second step finds it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) restoring: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) retention: Option<Retention>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cgroup: Option<PathBuf>,
    #[serde(default)]
    pub(super) limits: JobLimits,
}

impl Job {
    pub(super) fn new(saved: SavedJob, gcs: GcsDelivery, cancel: CancellationToken) -> Self {
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
            retention: saved.retention,
            restoring: saved.restoring,
            cgroup: saved.cgroup,
            limits: saved.limits,
            lock: tokio::sync::Mutex::new(()),
            saving: Mutex::new(()),
            state: Mutex::new(JobProgress {
                gcs,
                busy_since: None,
                collecting: false,
                stopping: false,
                gone: false,
                checkpoints: saved.checkpoints,
                last_checkpoint: saved.last_checkpoint,
            }),
            cancel,
        }
    }

    /// What survives a restart.
    fn saved(&self) -> SavedJob {
        let progress = self.state.lock();
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
            checkpoints: progress.checkpoints,
            last_checkpoint: progress.last_checkpoint.clone(),
            restoring: self.restoring,
            retention: self.retention.clone(),
            cgroup: self.cgroup.clone(),
            limits: self.limits,
        }
    }

    /// The checkpoint in flight, if any: what kind, since when.
    pub(super) fn busy_since(&self) -> Option<(Origin, DateTime<Utc>)> {
        self.state.lock().busy_since
    }

    pub(super) fn set_busy(&self, busy: Option<(Origin, DateTime<Utc>)>) {
        self.state.lock().busy_since = busy;
    }

    pub(super) fn collecting(&self) -> bool {
        self.state.lock().collecting
    }

    pub(super) fn set_collecting(&self, collecting: bool) {
        self.state.lock().collecting = collecting;
    }

    /// Checkpointed and stopped for migration.
    pub(super) fn stopping(&self) -> bool {
        self.state.lock().stopping
    }

    pub(super) fn set_stopping(&self) {
        self.state.lock().stopping = true;
    }

    /// Marks the job's exit as handled; `true` when it was handled already.
    pub(super) fn mark_gone(&self) -> bool {
        std::mem::replace(&mut self.state.lock().gone, true)
    }

    /// The job's latest checkpoint, if it has one.
    pub(super) fn last_checkpoint(&self) -> Option<String> {
        self.state.lock().last_checkpoint.clone()
    }

    /// Counts checkpoint `id` as the job's latest.
    pub(super) fn checkpointed(&self, id: &str) {
        let mut s = self.state.lock();
        s.checkpoints += 1;
        s.last_checkpoint = Some(id.to_string());
    }
}

/// A job's state file being saved ([`Cts::save_job_soon`]).
pub(super) type Saving = tokio::task::JoinHandle<()>;

pub(super) fn check_gid(gid: &str) -> Result<()> {
    gca_protocol::ids::check("GID", gid).map_err(|e| Error::invalid(e.to_string()))
}

/// A file-name-safe key for a GID (GIDs are chosen by brokers and may hold any character).
pub(super) fn job_key(gid: &str) -> String {
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
    pub(super) fn jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.inner.jobs.lock()
    }

    pub(super) fn job(&self, gid: &str) -> Result<Arc<Job>> {
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

    pub(super) fn view(&self, job: &Job) -> LocalJob {
        let s = job.state.lock();
        LocalJob {
            gid: job.gid.clone(),
            pid: job.pid,
            state: if job.restoring {
                JobState::Recovering
            } else if s.stopping {
                JobState::Stopped
            } else {
                JobState::Running
            },
            checkpoint_dir: job.checkpoint_dir.clone(),
            environment: job.environment.clone(),
            periodic_interval_secs: job.periodic.map(|d| d.as_secs()),
            registered_at: job.registered_at,
            checkpoints: s.checkpoints,
            last_checkpoint: s.last_checkpoint.clone(),
            busy: s.busy_since.is_some(),
            gcs: s.gcs,
            cgroup: job
                .cgroup
                .as_ref()
                .map(|dir| self.inner.cgroups.usage(dir, &job.limits)),
        }
    }

    /// The jobs running here; `owner` limits them to one local user's.
    pub fn list_jobs(&self, owner: Option<u32>) -> Vec<LocalJob> {
        let jobs: Vec<Arc<Job>> = self
            .jobs()
            .values()
            .filter(|j| owner.is_none_or(|uid| j.uid == uid))
            .cloned()
            .collect();
        let mut out: Vec<LocalJob> = jobs.iter().map(|j| self.view(j)).collect();
        out.sort_by(|a, b| a.gid.cmp(&b.gid));
        out
    }

    pub fn get_job(&self, gid: &str) -> Result<LocalJob> {
        let job = self.job(gid)?;
        Ok(self.view(&job))
    }

    /// A job as its owner (or root) asks for it on the local socket.
    pub fn get_own_job(&self, gid: &str, caller: super::LocalCaller) -> Result<LocalJob> {
        let job = self.job(gid)?;
        crate::policy::owner_may(&caller, job.uid, &format!("job {gid:?}"))?;
        Ok(self.view(&job))
    }

    /// Drops a restoring registration without telling the GCS.
    pub(super) fn forget(&self, job: &Arc<Job>) {
        if job.mark_gone() {
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

    pub(super) fn job_file(&self, gid: &str) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("jobs")
            .join(format!("{}.json", job_key(gid)))
    }

    pub(super) fn save_job(&self, job: &Job) {
        // Under the job's save lock, the state taken now: of two saves, the later writes the
        // newer state.
        let _one_at_a_time = job.saving.lock();
        let saved = job.saved();
        let path = self.job_file(&job.gid);
        let result = serde_json::to_vec_pretty(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(&path, &b));
        if let Err(e) = result {
            tracing::error!(gid = %job.gid, file = %path.display(), error = %e, "cannot save the job's state; it will be forgotten if the CTS restarts");
        }
    }

    /// [`Cts::save_job`] on a blocking thread (it fsyncs twice), started now; a checkpoint's
    /// answer waits for it while the GCS answers.
    pub(super) fn save_job_soon(&self, job: &Arc<Job>) -> Saving {
        let (cts, job) = (self.clone(), job.clone());
        tokio::task::spawn_blocking(move || cts.save_job(&job))
    }

    /// Jobs of a previous run that still run are taken back; the others are reported as
    /// finished (their exit status is unknown).
    pub(super) fn reload_jobs(&self) {
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
                // Its recovery wrapper died before the job ran: nothing finished; the GCS
                // puts the job back as it was, so it can be recovered again.
                tracing::info!(gid = %saved.gid, pid = saved.pid, "recovery of a previous run was abandoned; registration dropped");
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir_all(&saved.checkpoint_dir);
                let _ =
                    self.inner
                        .link
                        .enqueue_nowait(OutboxItem::AbandonRecovery(AbandonRecovery {
                            gid: saved.gid,
                            cts_instance: self.inner.instance.name.clone(),
                        }));
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
            // A previous run that died during a dump may have left it frozen
            // (gca_drivers::freezer); no dump of it is going on now.
            if let Some(cg) = &saved.cgroup {
                if let Err(e) = gca_drivers::freezer::thaw(cg) {
                    tracing::error!(gid = %saved.gid, cgroup = %cg.display(), error = %e, "cannot thaw the cgroup of a job of a previous run");
                }
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

    pub(super) fn handle(&self, job: &Job) -> JobHandle {
        JobHandle {
            gid: job.gid.clone(),
            pid: job.pid,
            pidfd: job.pidfd.clone(),
            checkpoint_dir: job.checkpoint_dir.clone(),
            cgroup: job.cgroup.clone(),
        }
    }
}
