//! The CTS's one error type, and the one place it becomes a wire fault. The drivers' and the
//! image store's errors keep their own mapping (`gca_drivers::DriverError`, `gca_store::Error`),
//! each defined once in its crate.

use gca_protocol::fault::{Fault, FaultKind};

use gca_drivers::DriverError;
use gca_store::Error as StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An expected failure with a message for the caller (unknown GID, busy job, ...).
    #[error("{0}")]
    Fault(#[from] Fault),
    /// The core checkpointer failed or refused.
    #[error("{0}")]
    Driver(#[from] DriverError),
    /// The image store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The outbox of records for the GCS could not be written.
    #[error("{0}")]
    Outbox(String),
    /// The outbox holds as many items as it may while the GCS does not take them.
    #[error("{0}")]
    OutboxFull(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn unknown(message: impl Into<String>) -> Self {
        Error::Fault(Fault::resource_unknown(message))
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Error::Fault(Fault::conflict(message))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Fault(Fault::invalid(message))
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Error::Fault(Fault::new(FaultKind::AccessDenied, message))
    }

    /// The fault to send. Internal errors are logged here, once; callers get a generic
    /// message.
    pub fn into_fault(self) -> Fault {
        match self {
            Error::Fault(f) => f,
            Error::Driver(e) => e.into(),
            Error::Store(e) => e.into(),
            Error::Outbox(m) => {
                Fault::new(FaultKind::OperationFailed, m).with_code("outbox-unwritable")
            }
            Error::OutboxFull(m) => {
                Fault::new(FaultKind::ServiceUnavailable, m).with_code("outbox-full")
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                Fault::internal()
            }
        }
    }
}

impl From<Error> for Fault {
    fn from(e: Error) -> Fault {
        e.into_fault()
    }
}

impl From<Error> for gca_protocol::server::ApiError {
    fn from(e: Error) -> Self {
        gca_protocol::server::ApiError(e.into_fault())
    }
}
