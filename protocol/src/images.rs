//! The image endpoints of a CTS (`/images` on its public port), as other CTSes (fetching an
//! image for a recovery) and the GCS (deleting or exporting images by their retention policy)
//! call them. The server is `gca_store::http`; the image's `manifest.json` itself is the
//! store's format (`gca_store::Manifest`), served byte for byte so its digest is the same
//! everywhere.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | JSON list of [`ImageSummary`] |
//! | `GET /{id}` | the `manifest.json` bytes as stored; [`DIGEST_HEADER`] and `ETag` = its digest |
//! | `GET`/`HEAD /{id}/files/{*path}` | a file, streamed; one `Range` (`a-b`, `a-`, `-n`) → 206; `If-Range` |
//! | `POST /{id}/chunks` [`ChunksRequest`] | the chunks' bytes, concatenated (format 2 images) |
//! | `DELETE /{id}` | [`Deleted`] |
//! | `POST /{id}/export` [`ExportRequest`] | [`Exported`] |
//!
//! Errors are JSON [`ErrorBody`](crate::fault::ErrorBody)s.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The header carrying an image's manifest digest.
pub const DIGEST_HEADER: &str = "x-gca-digest";

/// One line of the image list (`GET /images/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub id: String,
    pub total_bytes: u64,
    pub created_at: DateTime<Utc>,
    pub gid: String,
}

/// The answer to `DELETE /{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub freed_bytes: u64,
}

/// The body of `POST /images/{id}/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The owner's directory: absolute and normalized (the check of a retention policy's
    /// `KeepIn`); it must exist, must not be a symbolic link and must belong to the owner.
    pub dir: String,
    /// The digest the caller recorded for the image (`sha256:<hex>`): a stored image with
    /// another one is not exported. Needed to recognize an export that is done already when
    /// the image is no longer in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Delete the image from the store once it is exported.
    #[serde(default)]
    pub remove: bool,
}

/// The answer to a successful export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exported {
    pub id: String,
    /// `DIR/ID`, where the image now is.
    pub path: String,
    /// Number of files (without `manifest.json`).
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// The export was done already (by an earlier call); nothing was copied now.
    pub already: bool,
    /// The image is no longer in this store (removed now, or before).
    pub removed: bool,
}

/// The most chunks one `POST /images/{id}/chunks` asks for.
pub const MAX_CHUNKS_PER_REQUEST: usize = 1024;

/// The body of `POST /images/{id}/chunks`: chunks of image `id` (each named by 64 lower-case
/// hex digits, its BLAKE3 digest, and listed in the image's manifest), at most
/// [`MAX_CHUNKS_PER_REQUEST`]. The answer (`application/octet-stream`) is their bytes one
/// after the other, in the order asked, each as long as the manifest says; the caller checks
/// each against its name as it arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunksRequest {
    pub chunks: Vec<String>,
}
