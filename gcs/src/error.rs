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

/// The database is down, restarting, or out of connections (not a fault of the request):
/// no connection, a broken one, or PostgreSQL's SQLSTATE classes 08 (connection exception),
/// 57 (operator intervention: `admin_shutdown`, `cannot_connect_now` during a restart) and 53
/// (insufficient resources: too many connections, disk full).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57") || c.starts_with("53")),
        sqlx::Error::Protocol(m) => m.contains("connection") || m.contains("closed"),
        _ => false,
    }
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
