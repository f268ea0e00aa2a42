//! The store's one error type, [`Error`], and the one place it becomes a wire fault and an
//! HTTP answer ([`Error::class`]: kind, code and, where it differs from the kind's, status).
//!
//! Every message names the image and, where it matters, the store or the directory, and says
//! what to do. Nothing is committed, fetched or exported when an operation fails.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gca_protocol::fault::{ErrorBody, Fault, FaultKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- names --------------------------------------------------------------------------
    /// The ID or file path is not one the store accepts ([`crate::ImageId`],
    /// [`crate::RelPath`]).
    #[error("{0}")]
    InvalidId(String),

    // ---- the store ----------------------------------------------------------------------
    /// No image with that ID (or no such file in it): in this store, at the CTS an image is
    /// fetched from, or for an export (and no finished export with the given digest).
    #[error("{0}")]
    NotFound(String),
    /// An image with that ID exists already.
    #[error("{0}")]
    Conflict(String),
    /// The quota or the file system is full.
    #[error("{0}")]
    StoreFull(String),
    /// The store cannot be written (read-only, permissions, not a directory, ...).
    #[error("{0}")]
    Unwritable(String),
    /// The image's contents do not match its manifest, or the manifest is unreadable (in
    /// this store, or as fetched).
    #[error("{0}")]
    Corrupt(String),
    /// A chunk of an image is missing or does not hash to its name (in this store, or as
    /// fetched): nothing is restored, fetched or exported from that image.
    #[error("image {image}: chunk {chunk} of file {file} {detail}: refusing a corrupt or tampered image")]
    ChunkCorrupt {
        image: String,
        file: String,
        chunk: String,
        detail: String,
    },
    /// The image holds something the store does not keep (a symlink, a device, a name that
    /// cannot be served).
    #[error("{0}")]
    Unsupported(String),
    /// An unexpected I/O error while reading the store.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    // ---- fetching from another CTS ([`crate::fetch`]) -----------------------------------
    /// The source CTS could not be reached or kept failing (transport errors, 5xx).
    #[error("{0}")]
    Unreachable(String),
    /// The source refused the request (a 4xx other than 404).
    #[error("{message}")]
    FetchRefused { status: u16, message: String },
    /// The fetched manifest's digest is not the one the GCS recorded.
    #[error("{0}")]
    DigestMismatch(String),

    // ---- exporting into the owner's directory ([`crate::export`]) -----------------------
    /// A bad image ID, directory or digest in an export request, or an unreadable request.
    #[error("{0}")]
    ExportInvalid(String),
    /// The image's manifest does not name its owner.
    #[error("{0}")]
    NoOwner(String),
    /// The stored image has another digest than the one the caller gave.
    #[error("{0}")]
    DigestDiffers(String),
    /// The directory does not exist (the owner must create it).
    #[error("{0}")]
    DirMissing(String),
    /// `DIR/ID` exists and is not this image.
    #[error("{0}")]
    TargetExists(String),
    /// The directory is a symbolic link, not a directory, inside the store, or not the
    /// owner's.
    #[error("{0}")]
    DirRefused(String),
    /// A stored file does not match the manifest while it is copied.
    #[error("{0}")]
    ExportCorrupt(String),
    /// No space (or quota) left in the directory's file system.
    #[error("{0}")]
    NoSpace(String),
    /// Another I/O error during an export; the message names the path and the OS error
    /// (and, after the copy, that the export itself is complete).
    #[error("{0}")]
    ExportFailed(String),

    // ---- requests on the image endpoints ([`crate::http`]) ------------------------------
    /// A request that cannot be read (a bad URL, an unreadable body).
    #[error("{0}")]
    BadRequest(String),
    /// A `Range` outside the file (416, with `Content-Range: bytes */len`).
    #[error("{message}")]
    RangeNotSatisfiable { message: String, len: u64 },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The fault kind, the machine-readable code and, where it is not the kind's own
    /// ([`FaultKind::http_status`]), the HTTP status of the image endpoints. This is the one
    /// table: an export's own failures keep the statuses the GCS's retention runner has
    /// always been answered with (500 for a corrupt copy or an I/O error, 507 for no space),
    /// more precise than `OperationFailed`'s 502.
    fn class(&self) -> (FaultKind, Option<&'static str>, Option<u16>) {
        use FaultKind as K;
        match self {
            Error::InvalidId(_) => (K::InvalidMessage, Some("invalid-image-id"), None),
            Error::NotFound(_) => (K::ResourceUnknown, Some("unknown-image"), None),
            Error::Conflict(_) => (K::Conflict, Some("image-exists"), None),
            Error::StoreFull(_) => (K::OperationFailed, Some("store-full"), None),
            Error::Unwritable(_) => (K::OperationFailed, Some("store-unwritable"), None),
            Error::Corrupt(_) | Error::DigestMismatch(_) | Error::ChunkCorrupt { .. } => {
                (K::OperationFailed, Some("image-corrupt"), None)
            }
            Error::Unsupported(_) => (K::OperationFailed, Some("image-unsupported"), None),
            Error::Io { .. } => (K::Internal, None, None),
            Error::Unreachable(_) => (K::ServiceUnavailable, Some("unreachable"), None),
            Error::FetchRefused { .. } => (K::OperationFailed, Some("image-fetch-failed"), None),
            Error::ExportInvalid(_) => (K::InvalidMessage, Some("invalid-export"), None),
            Error::NoOwner(_) => (K::Conflict, Some("image-owner-unknown"), None),
            Error::DigestDiffers(_) => (K::Conflict, Some("digest-mismatch"), None),
            Error::DirMissing(_) => (K::Conflict, Some("export-dir-missing"), None),
            Error::TargetExists(_) => (K::Conflict, Some("export-target-exists"), None),
            Error::DirRefused(_) => (K::AccessDenied, Some("export-dir-refused"), None),
            Error::ExportCorrupt(_) => (K::OperationFailed, Some("image-corrupt"), Some(500)),
            Error::NoSpace(_) => (K::OperationFailed, Some("no-space"), Some(507)),
            Error::ExportFailed(_) => (K::OperationFailed, Some("export-failed"), Some(500)),
            Error::BadRequest(_) => (K::InvalidMessage, None, None),
            Error::RangeNotSatisfiable { .. } => {
                (K::InvalidMessage, Some("range-not-satisfiable"), Some(416))
            }
        }
    }

    /// The HTTP status of this error on the image endpoints.
    pub fn http_status(&self) -> u16 {
        let (kind, _, status) = self.class();
        status.unwrap_or_else(|| kind.http_status())
    }

    /// The fault's machine-readable code.
    pub fn code(&self) -> Option<&'static str> {
        self.class().1
    }

    /// The fault to send. Unexpected I/O errors are logged here, once; callers get a generic
    /// message.
    pub fn into_fault(self) -> Fault {
        if let Error::Io { .. } = &self {
            tracing::error!(error = %self, "image store I/O error");
            return Fault::internal();
        }
        let (kind, code, _) = self.class();
        let fault = Fault::new(kind, self.to_string());
        match code {
            Some(c) => fault.with_code(c),
            None => fault,
        }
    }
}

impl From<Error> for Fault {
    fn from(e: Error) -> Fault {
        e.into_fault()
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let range = match &self {
            Error::RangeNotSatisfiable { len, .. } => {
                HeaderValue::from_str(&format!("bytes */{len}")).ok()
            }
            _ => None,
        };
        let mut res = (
            status,
            Json(ErrorBody {
                error: self.into_fault(),
            }),
        )
            .into_response();
        if let Some(v) = range {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_codes_and_statuses() {
        let cases = [
            (Error::InvalidId("x".into()), FaultKind::InvalidMessage, 400),
            (Error::NotFound("x".into()), FaultKind::ResourceUnknown, 404),
            (
                Error::StoreFull("x".into()),
                FaultKind::OperationFailed,
                502,
            ),
            (
                Error::ExportCorrupt("x".into()),
                FaultKind::OperationFailed,
                500,
            ),
            (Error::NoSpace("x".into()), FaultKind::OperationFailed, 507),
            (Error::DirRefused("x".into()), FaultKind::AccessDenied, 403),
            (
                Error::Unreachable("x".into()),
                FaultKind::ServiceUnavailable,
                503,
            ),
        ];
        for (e, kind, status) in cases {
            assert_eq!(e.http_status(), status, "{e:?}");
            let code = e.code();
            let f = e.into_fault();
            assert_eq!((f.kind, f.code.as_deref()), (kind, code));
            assert_eq!(f.message, "x");
        }
        let f = Error::io("reading", std::io::Error::other("boom")).into_fault();
        assert_eq!(f.kind, FaultKind::Internal);
        assert!(!f.message.contains("boom"), "{}", f.message);
    }
}
