//! The retention policy of checkpoint images (XtreemOS, `000_*` seed): the images of a job
//! are the system's to manage while the job can still need them, and are deleted when it
//! ends, unless its owner asked (at submission with `RegisterJob`, or later with
//! `SetRetention`) to keep the last N, or all, in a directory the owner names.
//!
//! A job *ends* here when it finishes with exit status 0 or its WS-Resource is destroyed
//! (Destroy, or its termination time passing). A job that fails (non-zero status, a signal, an
//! unknown status) has not ended: its images are what recovers it. It gets a termination time
//! of `failed_job_lifetime_secs` instead (unless it has one), cleared when it is recovered, so
//! images of a job nobody recovers go in the end.
//!
//! When a job ends, [`Gcs::apply_retention`] queues one task per image in `image_tasks`, in the
//! transaction of the change that ended it (like notifications). Every replica runs [`run`]: it
//! claims due tasks for a lease, calls the CTS holding the image through the record's image
//! name (`DELETE {image}`, or `POST {image}/export` into the owner's directory, which moves
//! it), and records the outcome. Unreachable CTSes are retried with backoff; a task that fails
//! for good leaves the image where it is, marked `failed` with the reason (nothing is lost:
//! setting the policy again retries it).

use std::time::Duration;

use gca_protocol::client::read_body;
use gca_protocol::fault::ErrorBody;
use gca_protocol::images::{ExportRequest, Exported};
use gca_protocol::messages::{ImageState, JobInfo, SetRetention};

use crate::db::{self, DueImageTask, ImageAction};
use crate::error::{Error, Result};
use crate::notify::backoff;
use crate::service::{Ctx, Gcs};

/// How many tasks one claim takes.
const BATCH: i64 = 8;

/// Most of a CTS's answer the runner reads (its answers are a few hundred bytes of JSON).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a call to a CTS failed: worth retrying, or not.
#[derive(Debug)]
enum TaskError {
    Retry(String),
    Permanent(String),
}

impl Gcs {
    /// Wakes this replica's image task runner (after a commit that queued tasks).
    pub fn wake_image_tasks(&self) {
        self.image_wake.notify_one();
    }

    /// Applies the job's retention policy, in the caller's transaction (which holds the job
    /// row or has just updated it): the newest images the policy keeps are queued to move to
    /// the owner's directory, every other stored image to be deleted. Images already kept or
    /// being kept count towards the number kept and are left alone. Returns how many tasks
    /// were queued; commit, then [`Gcs::wake_image_tasks`].
    pub(crate) async fn apply_retention(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        gid: &str,
    ) -> Result<usize> {
        let job = db::get_job(&mut **tx, gid)
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("job {gid:?} vanished")))?;
        let policy = job.retention;
        let keep_in = policy.keep_in.as_deref();
        let mut queued = 0;
        for (i, (id, state)) in db::images_of(&mut **tx, gid).await?.into_iter().enumerate() {
            if !matches!(state, ImageState::Stored | ImageState::Failed) {
                continue;
            }
            let keep = policy.kept_count().is_none_or(|n| i < n) && keep_in.is_some();
            let action = if keep {
                ImageAction::Keep
            } else {
                ImageAction::Delete
            };
            db::queue_image_task(tx, &id, action, keep.then_some(keep_in).flatten()).await?;
            queued += 1;
        }
        db::mark_retention_applied(&mut **tx, gid).await?;
        if queued > 0 {
            tracing::info!(%gid, retention = %policy, images = queued, "retention policy applied");
        }
        Ok(queued)
    }

    /// setRetention: a new policy for a job; applied at once if the job has ended already.
    pub async fn set_retention(&self, ctx: &Ctx, mut req: SetRetention) -> Result<JobInfo> {
        crate::policy::authorize(&ctx.caller, crate::policy::Op::SetRetention)?;
        req.retention.validate().map_err(Error::invalid)?;
        req.retention = req.retention.normalized();
        let mut tx = self.db.begin().await?;
        // The update locks the job row until the commit, like every change to one GID.
        let ended = db::set_retention(&mut *tx, &req.gid, &req.retention)
            .await?
            .ok_or_else(|| {
                Error::unknown(format!("no job with GID {:?} is registered", req.gid))
            })?;
        let queued = if ended {
            self.apply_retention(&mut tx, &req.gid).await?
        } else {
            0
        };
        tx.commit().await?;
        if queued > 0 {
            self.wake_image_tasks();
        }
        tracing::info!(gid = %req.gid, retention = %req.retention, "retention policy set");
        Ok(JobInfo {
            job: db::get_job(&self.db, &req.gid)
                .await?
                .ok_or_else(|| Error::unknown(format!("job {:?} vanished", req.gid)))?,
        })
    }

    /// Carries out every due image task this replica can claim; returns how many finished
    /// (done or given up).
    pub async fn run_image_tasks(&self) -> Result<usize> {
        let lease = self.config.cts_timeout() * 2 + Duration::from_secs(10);
        let mut finished = 0;
        loop {
            let due = db::claim_image_tasks(&self.db, BATCH, lease).await?;
            let claimed = due.len();
            for task in due {
                if self.carry_out(task).await? {
                    finished += 1;
                }
            }
            if claimed < BATCH as usize {
                return Ok(finished);
            }
        }
    }

    /// One task: the call to the CTS, then its outcome in the database. True when the task is
    /// over (done or given up).
    async fn carry_out(&self, task: DueImageTask) -> Result<bool> {
        let outcome = match task.action.as_str() {
            "delete" => self.delete_image(&task).await.map(|()| None),
            "keep" => self.export_image(&task).await.map(Some),
            other => Err(TaskError::Permanent(format!(
                "unknown image task {other:?}"
            ))),
        };
        let attempts = u32::try_from(task.attempts).unwrap_or(1);
        match outcome {
            Ok(kept_in) => {
                let mut tx = self.db.begin().await?;
                let current = db::image_task_done(&mut tx, &task, kept_in.as_deref()).await?;
                tx.commit().await?;
                if current {
                    tracing::info!(gid = %task.gid, checkpoint.id = %task.checkpoint_id, action = %task.action, kept_in = ?kept_in, "checkpoint image {}", if kept_in.is_some() { "kept" } else { "deleted" });
                }
                Ok(true)
            }
            Err(TaskError::Retry(why)) if attempts < self.config.image_task_max_attempts.max(1) => {
                let wait = backoff(
                    attempts,
                    Duration::from_millis(self.config.image_task_retry_base_millis.max(1)),
                    Duration::from_secs(self.config.image_task_retry_max_secs.max(1)),
                );
                tracing::warn!(gid = %task.gid, checkpoint.id = %task.checkpoint_id, action = %task.action, attempts, retry_in = ?wait, error = %why, "image task failed; will retry");
                db::image_task_retry(&self.db, &task, &why, wait).await?;
                Ok(false)
            }
            Err(TaskError::Retry(why) | TaskError::Permanent(why)) => {
                let why = format!(
                    "could not {} the image after {attempts} attempt(s): {why}; it stays on CTS {:?} (set the retention policy again to retry)",
                    task.action, task.cts_name
                );
                let mut tx = self.db.begin().await?;
                let current = db::image_task_given_up(&mut tx, &task, &why).await?;
                tx.commit().await?;
                if current {
                    tracing::error!(gid = %task.gid, checkpoint.id = %task.checkpoint_id, action = %task.action, error = %why, "image task given up");
                }
                Ok(true)
            }
        }
    }

    /// `DELETE {image}?gid={gid}`; an image the CTS does not have is deleted already. A CTS
    /// with an object store deletes it from the bucket too (and sweeps the job's chunks no
    /// image left there names); the GID names the job when the local copy is gone already.
    async fn delete_image(&self, task: &DueImageTask) -> std::result::Result<(), TaskError> {
        let mut url = image_url(task)?;
        url.query_pairs_mut().append_pair("gid", &task.gid);
        let resp = self
            .http
            .delete(url.clone())
            .timeout(self.config.cts_timeout())
            .send()
            .await
            .map_err(|e| TaskError::Retry(format!("DELETE {url} failed: {e}")))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(classify(status, &format!("DELETE {url}"), resp).await)
    }

    /// `POST {image}/export`: the CTS moves the image into the owner's directory (checking it
    /// belongs to the job's owner) and answers with where it went.
    async fn export_image(&self, task: &DueImageTask) -> std::result::Result<String, TaskError> {
        let Some(dir) = task.keep_in.as_deref() else {
            return Err(TaskError::Permanent(
                "no directory to keep the image in".into(),
            ));
        };
        let url = format!("{}/export", image_url(task)?);
        let resp = self
            .http
            .post(&url)
            .timeout(self.config.cts_timeout())
            .json(&ExportRequest {
                dir: dir.to_string(),
                digest: task.digest.clone(),
                remove: true,
            })
            .send()
            .await
            .map_err(|e| TaskError::Retry(format!("POST {url} failed: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            let body = read_body(resp, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| TaskError::Retry(format!("POST {url}: unreadable answer: {e}")))?;
            return serde_json::from_slice::<Exported>(&body)
                .map(|e| e.path)
                .map_err(|e| TaskError::Retry(format!("POST {url}: unreadable answer: {e}")));
        }
        Err(classify(status, &format!("POST {url}"), resp).await)
    }
}

/// The image's URL on its CTS: the record's image name, which must be an http(s) URL.
fn image_url(task: &DueImageTask) -> std::result::Result<reqwest::Url, TaskError> {
    match reqwest::Url::parse(&task.image_name) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(u),
        _ => Err(TaskError::Permanent(format!(
            "image name {:?} is not the http(s) URL of a CTS image store; the GCS cannot reach it",
            task.image_name
        ))),
    }
}

/// A CTS's error answer: server-side trouble (5xx, 429) is retried, a refusal (4xx) is not.
/// What is stored (and shown to anyone who reads the record) is the status and, when the
/// answer is a GCA fault, its kind and code: never the answer's text, which would let anyone
/// who names an image URL read what an internal service answers (SSRF). The text is logged.
async fn classify(status: reqwest::StatusCode, what: &str, resp: reqwest::Response) -> TaskError {
    let body = read_body(resp, MAX_ANSWER_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // What the caller may see: the fault's kind and code, never the CTS's text (which an
    // image name pointing elsewhere would let anyone read back through GetCheckpoints).
    let fault = match serde_json::from_str::<ErrorBody>(&body) {
        Ok(b) => match b.error.code.filter(|c| {
            c.len() <= 64
                && c.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        }) {
            Some(code) => format!(" ({}, {code})", b.error.kind.as_str()),
            None => format!(" ({})", b.error.kind.as_str()),
        },
        Err(_) => String::new(),
    };
    let detail: String = body.chars().take(300).collect();
    tracing::warn!(%status, call = %what, answer = %detail, "a CTS refused an image task");
    let message = format!("{what}: HTTP {status}{fault}; the CTS's answer is in the GCS log");
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        TaskError::Retry(message)
    } else {
        TaskError::Permanent(message)
    }
}

/// The image task runner of one replica: runs when woken by a commit of this replica, and
/// every `notify_poll_millis` for tasks queued by other replicas and retries coming due.
pub async fn run(gcs: Gcs) {
    gcs.wait_ready().await;
    let poll = Duration::from_millis(gcs.config.notify_poll_millis.max(10));
    loop {
        tokio::select! {
            _ = gcs.image_wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        if let Err(e) = gcs.run_image_tasks().await {
            tracing::warn!(error = %e, "running image tasks failed");
        }
    }
}
