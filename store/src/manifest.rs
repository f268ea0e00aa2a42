//! The `manifest.json` of an image: what it holds (every file with its size and, in format 2,
//! the chunks it is made of; in format 1, its SHA-256) and who it is for ([`ImageMeta`]). The SHA-256 of its exact bytes ([`Manifest::digest_of`]) is
//! the image's identity: it authenticates the whole image, and a fetched image keeps the
//! source's bytes unchanged so that both sides compute the same digest. It is served as is on
//! `GET /images/{id}` (the store's own format, read only by this crate).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use gca_protocol::images::ImageSummary;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chunks::{ChunkId, ChunkRef, CHUNK_HASH, MAX_CHUNK};
use crate::error::Error;
use crate::names::{shown, ImageId, RelPath};

/// The name of the manifest inside an image directory (reserved: a checkpointer cannot write a
/// file of that name at the top of an image).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this code writes: files as lists of content-defined chunks
/// ([`crate::chunks`]).
pub const MANIFEST_FORMAT: u32 = 2;
/// The format of the stores before chunks: every file whole in the image directory, with its
/// SHA-256. Still read, served, fetched, exported and recovered.
pub const MANIFEST_FORMAT_WHOLE_FILES: u32 = 1;
/// Manifests larger than this are refused (about 500 000 chunks, a 32 GiB image).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// What the CTS records about an image when it commits it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The job the image belongs to.
    pub gid: String,
    pub created_at: DateTime<Utc>,
    /// The driver that wrote it (`criu`, `application`, `command`).
    pub driver: String,
    /// Where it was taken (the CTS instance name or resource).
    pub origin: String,
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// One file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Relative, `/`-separated.
    pub path: RelPath,
    pub size: u64,
    /// Format 1: lower-case hex SHA-256 of the contents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Format 2: the chunks, in order (none for an empty file).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
}

impl FileEntry {
    /// A strong validator of the contents (an HTTP `ETag`): the SHA-256 (format 1), or the
    /// BLAKE3 of the chunk names (format 2).
    pub fn etag(&self) -> String {
        match &self.sha256 {
            Some(s) => s.clone(),
            None => {
                let mut h = blake3::Hasher::new();
                for c in &self.chunks {
                    h.update(c.id.to_hex().as_bytes());
                }
                format!("b3-{}", h.finalize().to_hex())
            }
        }
    }
}

/// The `manifest.json` of an image, checked ([`Manifest::parse`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    pub id: ImageId,
    pub meta: ImageMeta,
    /// Format 2: the hash that names chunks ([`crate::chunks::CHUNK_HASH`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_hash: Option<String>,
    /// Sorted by path.
    pub files: Vec<FileEntry>,
    /// The sum of the files' sizes.
    pub total_bytes: u64,
}

impl Manifest {
    /// `sha256:<hex>` of the exact bytes of a `manifest.json`.
    pub fn digest_of(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    /// The bytes this code stores for a manifest it wrote: pretty JSON and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        bytes.push(b'\n');
        bytes
    }

    /// Whether the files are chunks (format 2) rather than whole files in the image directory.
    pub fn is_chunked(&self) -> bool {
        self.format == MANIFEST_FORMAT
    }

    /// Every chunk the image names, once each.
    pub fn chunk_set(&self) -> BTreeMap<ChunkId, u32> {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter())
            .map(|c| (c.id, c.size))
            .collect()
    }

    /// Reads and checks a manifest: format, ID, file paths (valid, unique, no file inside
    /// another), hashes or chunks, total.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, Error> {
        let m: RawManifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("unreadable image manifest: {e}")))?;
        m.check()
    }
}

/// A `manifest.json` as read, before [`RawManifest::check`] made it a [`Manifest`].
#[derive(Debug, Deserialize)]
struct RawManifest {
    format: u32,
    id: String,
    meta: ImageMeta,
    #[serde(default)]
    chunk_hash: Option<String>,
    files: Vec<RawFileEntry>,
    total_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct RawFileEntry {
    path: String,
    size: u64,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    chunks: Option<Vec<ChunkRef>>,
}

impl RawManifest {
    fn check(self) -> Result<Manifest, Error> {
        let bad = |what: String| {
            Err(Error::Corrupt(format!(
                "bad manifest for image {}: {what}",
                shown(&self.id)
            )))
        };
        let chunked = match self.format {
            MANIFEST_FORMAT => true,
            MANIFEST_FORMAT_WHOLE_FILES => false,
            other => {
                return bad(format!(
                    "format {other} (this CTS reads formats {MANIFEST_FORMAT_WHOLE_FILES} and \
                     {MANIFEST_FORMAT})"
                ))
            }
        };
        match (&self.chunk_hash, chunked) {
            (None, false) => {}
            (Some(h), true) if h == CHUNK_HASH => {}
            (h, _) => {
                return bad(format!(
                    "chunk_hash {h:?} in a format {} manifest (format 2 names chunks by \
                     {CHUNK_HASH})",
                    self.format
                ))
            }
        }
        let id = match ImageId::parse(&self.id) {
            Ok(id) => id,
            Err(e) => return bad(e.to_string()),
        };
        let mut paths = BTreeSet::new();
        let mut files = Vec::with_capacity(self.files.len());
        let mut total: u64 = 0;
        for f in &self.files {
            let path = match RelPath::parse(&f.path) {
                Ok(p) => p,
                Err(e) => return bad(e.to_string()),
            };
            if f.path == MANIFEST_FILE {
                return bad(format!("it lists a file named {MANIFEST_FILE}"));
            }
            let chunks = match (chunked, &f.sha256, &f.chunks) {
                (false, Some(sha), None) if is_sha256_hex(sha) => Vec::new(),
                (false, _, _) => return bad(format!("file {} has no valid sha256", f.path)),
                (true, None, chunks) => {
                    let chunks = chunks.clone().unwrap_or_default();
                    let mut sum: u64 = 0;
                    for c in &chunks {
                        if c.size == 0 || c.size as usize > MAX_CHUNK {
                            return bad(format!(
                                "file {} has a chunk of {} bytes (1 to {MAX_CHUNK})",
                                f.path, c.size
                            ));
                        }
                        sum += u64::from(c.size);
                    }
                    if sum != f.size {
                        return bad(format!(
                            "file {} has {} bytes but its chunks add up to {sum}",
                            f.path, f.size
                        ));
                    }
                    chunks
                }
                (true, Some(_), _) => {
                    return bad(format!(
                        "file {} has a sha256 in a chunked (format 2) manifest",
                        f.path
                    ))
                }
            };
            if !paths.insert(f.path.as_str()) {
                return bad(format!("file {} is listed twice", f.path));
            }
            total = match total.checked_add(f.size) {
                Some(t) => t,
                None => return bad("the file sizes overflow".into()),
            };
            files.push(FileEntry {
                path,
                size: f.size,
                sha256: f.sha256.clone(),
                chunks,
            });
        }
        for p in &paths {
            let mut prefix = String::new();
            for c in p.split('/') {
                if !prefix.is_empty() && paths.contains(prefix.as_str()) {
                    return bad(format!("{prefix} is both a file and a directory"));
                }
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(c);
            }
        }
        if total != self.total_bytes {
            return bad(format!(
                "total_bytes is {} but the files add up to {total}",
                self.total_bytes
            ));
        }
        Ok(Manifest {
            format: self.format,
            id,
            meta: self.meta,
            chunk_hash: self.chunk_hash,
            files,
            total_bytes: self.total_bytes,
        })
    }
}

impl Manifest {
    pub fn summary(&self) -> ImageSummary {
        ImageSummary {
            id: self.id.to_string(),
            total_bytes: self.total_bytes,
            created_at: self.meta.created_at,
            gid: self.meta.gid.clone(),
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
