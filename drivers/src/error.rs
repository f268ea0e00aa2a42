//! The drivers' one error type, [`DriverError`], and the one place it becomes a wire fault.

use gca_protocol::{Fault, FaultKind};

/// A driver failure: a fault kind, a short machine-readable code and a message that says
/// what went wrong and, where the core checkpointer said why, its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    pub kind: FaultKind,
    pub code: &'static str,
    pub message: String,
}

impl DriverError {
    pub fn new(kind: FaultKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }
    /// The job's process is gone (exited, killed, never existed).
    pub fn job_gone(message: impl Into<String>) -> Self {
        Self::new(FaultKind::ResourceUnknown, "job-gone", message)
    }
    /// The core checkpointer ran and refused or failed.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FaultKind::OperationFailed, "checkpointer-failed", message)
    }
    /// The core checkpointer did not finish in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(FaultKind::OperationFailed, "checkpointer-timeout", message)
    }
    /// The driver is misconfigured or the core checkpointer is missing.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            FaultKind::ServiceUnavailable,
            "checkpointer-unavailable",
            message,
        )
    }
}

impl From<DriverError> for Fault {
    fn from(e: DriverError) -> Fault {
        Fault::new(e.kind, e.message).with_code(e.code)
    }
}
