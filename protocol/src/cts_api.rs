//! The CTS's own JSON API on its public port (`/api/v1`): status, and a checkpoint request
//! in JSON. (Its jobs are listed there as [`LocalJob`](crate::local::LocalJob)s, and
//! `/api/v1/local` answers a [`LocalInfo`](crate::local::LocalInfo) without the driver
//! configuration.)

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::messages::{CtsInstance, CtsType};

/// Load figures for status and FindCTS-style placement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Load {
    pub jobs: usize,
    pub checkpoints_in_flight: u64,
    pub checkpoints_taken: u64,
    pub store_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_max_bytes: Option<u64>,
}

/// `GET /api/v1/status`: the instance, its type's fields, its driver, its GCS link and load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub instance: CtsInstance,
    pub descriptor: CtsType,
    pub driver: String,
    pub driver_check: String,
    pub gcs: LinkStatus,
    pub load: Load,
    /// Namespaces and cgroups for jobs, and why not where not.
    #[serde(default)]
    pub isolation: crate::isolation::IsolationStatus,
}

/// What the CTS knows about its GCS, for status and health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub endpoint: String,
    /// The GCS has our instance registration and answered the last call.
    pub connected: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Items waiting for delivery.
    pub pending: usize,
    /// Items the GCS refused as wrong (kept under `outbox/rejected/` for an operator).
    pub rejected: u64,
    /// The last of them, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejected: Option<String>,
    /// Jobs registered again because the GCS did not know them (a restored database).
    #[serde(default)]
    pub reregistered_jobs: u64,
    /// Checkpoint records the outbox could not write to disk (full, or failing): each is
    /// delivered from memory, and its reservation stands for it until the GCS has it.
    #[serde(default)]
    pub unwritten_records: u64,
}

/// The body of `POST /api/v1/jobs/{gid}/checkpoint` (`{"stop": false}`; an empty body is
/// the default): the same as the SOAP `DoCheckpoint` on the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    #[serde(default)]
    pub stop: bool,
}
