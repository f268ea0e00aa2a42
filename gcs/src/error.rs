//! The GCS error type, and the one place it becomes a wire fault.

use gca_protocol::fault::{Fault, FaultKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An expected failure with a message for the caller (unknown GID, conflict, ...).
    #[error("{0}")]
    Fault(#[from] Fault),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
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
    pub fn kind(kind: FaultKind, message: impl Into<String>) -> Self {
        Error::Fault(Fault::new(kind, message))
    }

    /// The fault to send. Unexpected errors are logged here, once, and the caller gets a
    /// generic message: database and internal details stay in the server log.
    pub fn into_fault(self) -> Fault {
        match self {
            Error::Fault(f) => f,
            Error::Db(e) if is_unavailable(&e) => {
                tracing::error!(error = %e, "database unavailable");
                Fault::new(
                    FaultKind::ServiceUnavailable,
                    "the GCS database is unavailable; retry later",
                )
                .with_code("database-unavailable")
            }
            Error::Db(e) => {
                tracing::error!(error = %e, "database error");
                Fault::internal()
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                Fault::internal()
            }
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

/// The name of the constraint a database error violated, if any.
pub fn violated_constraint(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
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
