//! Local registration (paper 3.4.1): a wrapper registers GID ↔ PID over the UNIX socket
//! (credentials checked against the process it claims), the CTS tells the GCS it is in charge
//! of the GID; recovery registrations in two steps and their withdrawal; how a job ended, as
//! its parent wrapper reports it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gca_drivers::proc;
use gca_protocol::fault::Fault;
use gca_protocol::local::{GcsDelivery, LocalExit, LocalJob, RegisterLocalJob};
use gca_protocol::messages::{AbandonRecovery, JobState, Property, RegisterJob};
use gca_protocol::placeholders::{self, Values};

use super::jobs::{check_gid, job_key, Job, SavedJob};
use super::Cts;
use crate::error::{Error, Result};
use crate::gcs_link::OutboxItem;

/// Who is calling the local API (from `SO_PEERCRED`): a local user and their process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCaller {
    pub pid: Option<i32>,
    pub uid: u32,
}

impl Cts {
    /// A wrapper registers GID ↔ PID (paper 3.4.1); the CTS then tells the GCS it is in
    /// charge of the GID. Idempotent for the same GID and process.
    pub async fn register_job(
        &self,
        req: RegisterLocalJob,
        caller: LocalCaller,
    ) -> Result<LocalJob> {
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
        crate::policy::caller_starts(&caller, req.pid)?;
        crate::policy::plainly_theirs(caller.uid, req.pid, &format!("job {:?}", req.gid))?;
        self.check_jobs_per_user(&req.gid, uid)?;
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
            // (A recovery wrapper that is the job's process itself, as a VMM type's is, takes
            // its own restoring registration over.)
            let takes_over = existing.restoring && req.recovery.is_some() && !restoring;
            if existing.pid == req.pid && existing.start_time == stat.start_time && !takes_over {
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
        if let (Some(r), None) = (&req.recovery, &taken_over) {
            self.check_recovery_owner(&req.gid, r.from_checkpoint.as_deref(), &caller)
                .await?;
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
        // Its cgroup (not while a recovery wrapper restores: the restored tree gets it when
        // it registers running); a recovery takes over the limits its image carried.
        let (cgroup, limits) = if restoring {
            (None, gca_protocol::isolation::JobLimits::default())
        } else {
            let carried = match (&req.limits, &req.recovery) {
                (None, Some(r)) => match &r.from_checkpoint {
                    Some(id) => self.limits_in_image(id).await,
                    None => None,
                },
                _ => None,
            };
            let limits = self
                .inner
                .cgroups
                .limits_for(req.limits.as_ref().or(carried.as_ref()))
                .map_err(Error::invalid)?;
            let dir = self
                .inner
                .cgroups
                .create(&req.gid, &[req.pid], &limits)
                .map_err(|m| {
                    Error::Fault(
                        Fault::new(gca_protocol::FaultKind::OperationFailed, m)
                            .with_code("cgroup-failed"),
                    )
                })?;
            (dir, limits)
        };
        let drop_cgroup = |dir: &Option<std::path::PathBuf>| {
            if let Some(d) = dir.clone() {
                tokio::spawn(crate::cgroup::Cgroups::remove(d));
            }
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
                drop_cgroup(&cgroup);
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
                retention: req.retention.clone(),
                cgroup,
                limits,
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

    /// The cgroup limits an image of this store carries (`isolation::LIMITS_FILE`).
    async fn limits_in_image(&self, id: &str) -> Option<gca_protocol::isolation::JobLimits> {
        let id = gca_store::ImageId::parse(id).ok()?;
        let rel = gca_store::RelPath::parse(gca_protocol::isolation::LIMITS_FILE).ok()?;
        let path = self.inner.store.file_path(&id, &rel).await.ok()?;
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// `limits.jobs_per_user`: a local user's jobs here at once (root's are not counted).
    fn check_jobs_per_user(&self, gid: &str, uid: u32) -> Result<()> {
        let limit = self.inner.config.limits.jobs_per_user;
        if uid == 0 {
            return Ok(());
        }
        let theirs = self
            .jobs()
            .values()
            .filter(|j| j.uid == uid && j.gid != gid)
            .count();
        if theirs >= limit {
            return Err(Error::Fault(
                Fault::new(
                    gca_protocol::FaultKind::ServiceUnavailable,
                    format!(
                        "user {uid} has {theirs} jobs registered on this resource, its limit (limits.jobs_per_user); job {gid:?} was not registered: wait for one to end"
                    ),
                )
                .with_code("too-many-jobs"),
            ));
        }
        Ok(())
    }

    pub(super) fn environment_for(&self, values: &Values) -> anyhow::Result<Vec<Property>> {
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

    /// Withdraws a recovery registration whose image was refused or whose restore failed
    /// (`DELETE /v1/jobs/{gid}`): the GCS puts the job back as it was before the recovery
    /// moved it (AbandonRecovery, through the ordered outbox), so it can be recovered again.
    pub fn abandon_recovery(&self, gid: &str, caller: LocalCaller) -> Result<LocalJob> {
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
        if let Err(e) =
            self.inner
                .link
                .enqueue_nowait(OutboxItem::AbandonRecovery(AbandonRecovery {
                    gid: gid.to_string(),
                    cts_instance: self.inner.instance.name.clone(),
                }))
        {
            tracing::error!(gid = %gid, error = %e, "cannot queue the abandoned recovery for the GCS");
        }
        tracing::info!(gid = %gid, "recovery withdrawn by its wrapper");
        Ok(self.view(&job))
    }

    pub(super) fn periodic_for(&self, asked: Option<u64>) -> Result<Option<Duration>> {
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

    /// A wrapper that is the job's parent (the recovery wrapper) reports how the job ended.
    pub async fn report_exit(
        &self,
        gid: &str,
        exit: LocalExit,
        caller: LocalCaller,
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

/// The jobs the GCS link registers again when the GCS has forgotten them: those running
/// here (a recovery still restoring is left to its wrapper's next step).
impl crate::gcs_link::LocalJobs for Cts {
    fn registration(&self, gid: &str) -> Option<RegisterJob> {
        let job = self.jobs().get(gid).cloned()?;
        self.registration_again(&job)
    }

    fn registrations(&self) -> Vec<RegisterJob> {
        let jobs: Vec<Arc<Job>> = self.jobs().values().cloned().collect();
        jobs.iter()
            .filter_map(|j| self.registration_again(j))
            .collect()
    }
}

impl Cts {
    fn registration_again(&self, job: &Job) -> Option<RegisterJob> {
        (!job.restoring && !job.stopping()).then(|| RegisterJob {
            gid: job.gid.clone(),
            cts_instance: self.inner.instance.name.clone(),
            local_id: Some(job.pid.to_string()),
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: job.retention.clone(),
        })
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
    use gca_protocol::messages::{Keep, Retention, XmlContent};

    fn req(retention: Option<Retention>) -> RegisterLocalJob {
        RegisterLocalJob {
            gid: "job-1".into(),
            pid: 4242,
            periodic_interval_secs: None,
            recovery: None,
            retention,
            limits: None,
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
