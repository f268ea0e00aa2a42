//! Per-job background work, started at registration (or when a restarted CTS takes a job
//! back) and cancelled with the job: the exit watcher (pidfd), periodic checkpoints and the
//! poll for checkpoints the job takes on its own; and what happens when the job is gone.

use std::sync::Arc;
use std::time::Duration;

use gca_drivers::proc;
use gca_protocol::local::LocalExit;
use gca_protocol::messages::{JobFinished, Origin};

use super::jobs::Job;
use super::Cts;
use crate::gcs_link::OutboxItem;

impl Cts {
    pub(super) fn spawn_job_tasks(&self, job: Arc<Job>) {
        // Exit watcher.
        if let Some(events) = &self.inner.exit_events {
            events.watch(job.pid);
        }
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
                    if j.stopping() {
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
                    // Flagged before the lock is tried, so that a request meeting the lock
                    // held knows it is only this look and waits for it.
                    job.set_collecting(true);
                    if let Ok(guard) = job.lock.try_lock() {
                        cts.collect_internal_locked(&job).await;
                        drop(guard);
                    }
                    job.set_collecting(false);
                }
            });
        }
    }

    /// The job's process is gone: collect a last internal checkpoint, forget the job, and tell
    /// the GCS (unless it was stopped for migration, which the GCS already knows).
    pub(super) async fn job_exited(&self, job: &Arc<Job>, reported: Option<LocalExit>) {
        if job.mark_gone() {
            return;
        }
        let (exit_status, signal) = match reported {
            Some(r) => (r.exit_status, r.signal),
            None => self.exit_status_of(job).await,
        };
        if let Some(events) = &self.inner.exit_events {
            events.unwatch(job.pid);
        }
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
        if let Some(dir) = job.cgroup.clone() {
            tokio::spawn(crate::cgroup::Cgroups::remove(dir));
        }
        if job.stopping() {
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
}

impl Cts {
    /// The wait status of a job that is not our child: its zombie's, if its parent has not
    /// reaped it yet, else the kernel's exit event (which may come a moment after the pidfd
    /// said it was gone). Unknown (`None, None`) only without the events connector.
    async fn exit_status_of(&self, job: &Job) -> (Option<i32>, Option<i32>) {
        let zombie = proc::stat(job.pid)
            .filter(|s| s.start_time == job.start_time && s.state == 'Z')
            .and_then(|s| s.exit_code);
        let status = match (zombie, &self.inner.exit_events) {
            (Some(code), _) => Some(code),
            (None, Some(events)) => events.exit_status(job.pid, Duration::from_secs(2)).await,
            (None, None) => None,
        };
        status.map(proc::decode_wait_status).unwrap_or((None, None))
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
