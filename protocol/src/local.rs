//! The local-only API on the CTS's UNIX socket: how wrappers register the jobs of this
//! resource (paper 3.4.1). Only processes on this machine can connect, and the CTS checks the
//! caller's credentials (`SO_PEERCRED`), so a job can neither register a GID on another
//! resource nor claim a process of another user.
//!
//! Also here: [`LocalClient`], the client the wrappers and tests use. The CTS serves this API
//! (`cts::http::local`); the wrappers use it without linking the CTS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::driver_config::DriverConfig;
use crate::fault::{ErrorBody, Fault, FaultKind};
use crate::messages::{JobState, Property, Retention};

/// `POST /v1/jobs`: a wrapper registering GID ↔ local process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterLocalJob {
    pub gid: String,
    /// The job's root process; normally the wrapper's own PID, which the job keeps by `exec`.
    pub pid: i32,
    /// Seconds between periodic checkpoints of this job; default from the CTS configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodic_interval_secs: Option<u64>,
    /// Set by the recovery wrapper: the job is restored from a checkpoint (paper 5.3 step 11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<LocalRecovery>,
    /// The owner's retention policy (what is kept of the job's images when it ends, and
    /// where), passed on to the GCS in `RegisterJob`. Checked with
    /// [`Retention::validate`](crate::messages::Retention::validate): an invalid one
    /// refuses the registration (400, code `invalid-retention`). `None` leaves the policy the
    /// GCS has for the job (the default, delete all, for a new job); a recovery may change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Limits for the job's cgroup, below the CTS type's (`crate::isolation::JobLimits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::isolation::JobLimits>,
}

/// A recovery registration (paper 5.3 step 11), in two steps: first with `restoring: true` and
/// the wrapper's own PID while the image is being restored (the GCS routes the GID here in
/// state `recovering`, and the CTS hands out the checkpoint directory and environment), then
/// with `restoring: false` and the restored job's PID once it runs (state `running`). A
/// wrapper whose restore failed withdraws the first step with `DELETE /v1/jobs/{gid}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRecovery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_checkpoint: Option<String>,
    /// The image is still being restored; `pid` is the recovery wrapper's.
    #[serde(default)]
    pub restoring: bool,
}

/// `POST /v1/images/fetch`: get a checkpoint's image into this CTS's store (fetched from the
/// CTS that took it when it is not here yet) and check it against the digest the GCS
/// recorded. The CTS looks the checkpoint up at its GCS itself: where it fetches from and the
/// digest it checks come from the GCS's record, never from the local caller. The recovery
/// wrapper restores from the returned directory; it never opens the store itself (the CTS
/// holds its lock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchImage {
    /// The job the checkpoint belongs to.
    pub gid: String,
    pub checkpoint_id: String,
    /// The digest the caller expects (`sha256:<hex>`, e.g. from its own GetRecoveryInfo): one
    /// that differs from the GCS's record is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The answer to [`FetchImage`]: a verified image in the local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedImage {
    pub checkpoint_id: String,
    pub image_dir: PathBuf,
    pub digest: String,
    /// Copied from another CTS now (`false`: it was in this store already).
    pub fetched: bool,
    /// Bytes received from the other CTS for it (only the chunks this store lacked).
    #[serde(default)]
    pub bytes_transferred: u64,
}

/// Whether the GCS has taken a registration yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GcsDelivery {
    /// The GCS has it.
    Registered,
    /// The GCS is unreachable; the CTS delivers it when the GCS is back.
    Pending,
}

/// A job as the CTS keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalJob {
    pub gid: String,
    pub pid: i32,
    pub state: JobState,
    /// The per-job checkpoint directory (`{CHECKPOINT_DIR}`).
    pub checkpoint_dir: PathBuf,
    /// Environment variables the job must run with (the CTS type's, expanded).
    pub environment: Vec<Property>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodic_interval_secs: Option<u64>,
    pub registered_at: DateTime<Utc>,
    pub checkpoints: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<String>,
    /// A checkpoint of this job is in flight.
    pub busy: bool,
    pub gcs: GcsDelivery,
    /// Its cgroup and usage, when the CTS gives jobs cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<crate::isolation::CgroupUsage>,
}

/// `POST /v1/jobs/{gid}/exit`: a wrapper that is the job's parent reporting how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalExit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// `GET /v1/info` (and, without the socket path, `GET /api/v1/local` on the public port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalInfo {
    pub name: String,
    pub cts_type: String,
    pub resource: String,
    pub url: String,
    pub socket: PathBuf,
    pub driver: String,
    /// The GCS this CTS reports to (its root URL or SOAP endpoint, as configured).
    #[serde(default)]
    pub gcs_url: String,
    /// The driver configuration, so that the recovery wrapper builds the same core
    /// checkpointer (`gca_drivers::make_driver`) and restores in its own process. Only on the
    /// socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_config: Option<DriverConfig>,
    /// The CTS type's recovery job parameters (patterns), appended to the job's arguments
    /// when the wrapper starts a job itself (`Restored::StartJob`).
    #[serde(default)]
    pub recovery_job_parameters: Vec<String>,
}

/// Client for the local socket.
#[derive(Debug, Clone)]
pub struct LocalClient {
    socket: PathBuf,
    timeout: Duration,
}

const MAX_LOCAL_RESPONSE: usize = 4 * 1024 * 1024;

/// The process behind a local socket must be root's (the CTS) or the caller's own: anything
/// else is another user's program posing as the CTS, whose answers (the driver configuration
/// a recovery restores with, the checkpoint directory) must not be trusted.
fn check_server(stream: &tokio::net::UnixStream, endpoint: &str) -> Result<(), Fault> {
    use std::os::unix::fs::MetadataExt;
    let server = stream
        .peer_cred()
        .map_err(|e| {
            Fault::new(
                FaultKind::ServiceUnavailable,
                format!("{endpoint}: cannot read the server's credentials: {e}"),
            )
        })?
        .uid();
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if server == 0 || Some(server) == me {
        return Ok(());
    }
    Err(Fault::denied(format!(
        "{endpoint} is served by user {server}, neither root nor this user: refusing to talk to it (a CTS runs as root)"
    ))
    .with_code("untrusted-socket"))
}

impl LocalClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn info(&self) -> Result<LocalInfo, Fault> {
        self.request::<(), _>("GET", "/v1/info", None).await
    }

    pub async fn register(&self, req: &RegisterLocalJob) -> Result<LocalJob, Fault> {
        self.request("POST", "/v1/jobs", Some(req)).await
    }

    pub async fn job(&self, gid: &str) -> Result<LocalJob, Fault> {
        let path = format!("/v1/jobs/{}", crate::client::path_segment(gid));
        self.request::<(), _>("GET", &path, None).await
    }

    pub async fn jobs(&self) -> Result<Vec<LocalJob>, Fault> {
        self.request::<(), _>("GET", "/v1/jobs", None).await
    }

    pub async fn exited(&self, gid: &str, exit: &LocalExit) -> Result<LocalJob, Fault> {
        let path = format!("/v1/jobs/{}/exit", crate::client::path_segment(gid));
        self.request("POST", &path, Some(exit)).await
    }

    /// Withdraws a recovery registration made with `restoring: true` (the restore failed);
    /// the GCS keeps the job in state `recovering`, so it can be recovered again.
    pub async fn abandon(&self, gid: &str) -> Result<LocalJob, Fault> {
        let path = format!("/v1/jobs/{}", crate::client::path_segment(gid));
        self.request::<(), _>("DELETE", &path, None).await
    }

    pub async fn fetch_image(&self, req: &FetchImage) -> Result<FetchedImage, Fault> {
        self.request("POST", "/v1/images/fetch", Some(req)).await
    }

    /// How job `gid` can be recovered from `image` (`latest` or a checkpoint ID): the CTS
    /// asks its GCS on the caller's behalf, and answers only the owner of the job's images.
    pub async fn recovery_info(
        &self,
        gid: &str,
        image: &str,
    ) -> Result<crate::messages::RecoveryInfo, Fault> {
        let path = format!(
            "/v1/jobs/{}/recovery?image={}",
            crate::client::path_segment(gid),
            crate::client::path_segment(image)
        );
        self.request::<(), _>("GET", &path, None).await
    }

    /// The checkpoints of job `gid` the caller could recover from: the GCS's records whose
    /// image is still stored and belongs to the caller (root: any), newest first, at most the
    /// newest 100. Empty when the job has none; `unknown-gid` when the GCS has no such job.
    pub async fn recoverable_checkpoints(
        &self,
        gid: &str,
    ) -> Result<Vec<crate::messages::CheckpointRecord>, Fault> {
        let path = format!("/v1/jobs/{}/checkpoints", crate::client::path_segment(gid));
        self.request::<(), _>("GET", &path, None).await
    }

    /// A checkpoint of the caller's own job now (and, with `stop`, stop it afterwards).
    pub async fn checkpoint(
        &self,
        gid: &str,
        stop: bool,
    ) -> Result<crate::messages::CheckpointRecord, Fault> {
        let path = format!("/v1/jobs/{}/checkpoint", crate::client::path_segment(gid));
        self.request(
            "POST",
            &path,
            Some(&crate::cts_api::CheckpointBody { stop }),
        )
        .await
    }

    async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Fault> {
        let endpoint = format!("the CTS socket {}", self.socket.display());
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body, &endpoint)).await
        {
            Ok(r) => r,
            Err(_) => Err(Fault::new(
                FaultKind::ServiceUnavailable,
                format!("{endpoint} did not answer within {:?}", self.timeout),
            )
            .with_code("timeout")),
        }
    }

    async fn exchange<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        endpoint: &str,
    ) -> Result<T, Fault> {
        let unavailable =
            |what: String| Fault::new(FaultKind::ServiceUnavailable, what).with_code("unreachable");
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot connect to {endpoint}: {e}; is the CTS of this resource running?"
                ))
            })?;
        check_server(&stream, endpoint)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(format!("cannot talk HTTP to {endpoint}: {e}")))?;
        tokio::spawn(conn);
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| Fault::invalid(e.to_string()))?,
            None => Vec::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| Fault::invalid(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unavailable(format!("request to {endpoint} failed: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_LOCAL_RESPONSE)
            .collect()
            .await
            .map_err(|e| unavailable(format!("reading the answer of {endpoint}: {e}")))?
            .to_bytes();
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| {
                Fault::new(
                    FaultKind::OperationFailed,
                    format!("{endpoint} answered with unexpected JSON: {e}"),
                )
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => Err(e.error),
                Err(_) => Err(Fault::new(
                    FaultKind::OperationFailed,
                    format!(
                        "{endpoint} answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                )),
            }
        }
    }
}
