//! The image store: one directory per checkpoint image, each with a manifest, committed
//! atomically.
//!
//! ```text
//! ROOT/
//!   .lock                   held (flock) by the one process that has the store open
//!   images/<id>/            committed images: the checkpointer's files + manifest.json
//!   staging/<id>.<random>/  images being written (by a driver or by a fetch)
//!   staging/.trash.<id>.<random>/  images being deleted
//! ```
//!
//! Rules the code keeps:
//!
//! - An image ID or a file path inside an image reaches the file system only after
//!   [`validate_id`] / [`validate_rel_path`] accepted it.
//! - An image appears in `images/` only by one `rename` of a complete, fsynced staging
//!   directory that already holds its `manifest.json`; so no half-written image is ever listed
//!   or served. Leftovers in `staging/` (a crash, a failed checkpoint) are removed at
//!   [`ImageStore::open`].
//! - The manifest lists every file with its size and SHA-256, so the digest of the
//!   `manifest.json` bytes ([`Manifest::digest_of`]) authenticates the whole image. A fetched
//!   image keeps the source's manifest bytes unchanged, so both sides compute the same digest.
//! - Files are hashed and copied in bounded buffers, never read whole into memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use gca_protocol::images::ImageSummary;
use gca_protocol::{Fault, FaultKind};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of the manifest inside an image directory (reserved: a checkpointer cannot write a
/// file of that name at the top of an image).
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this code writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// The longest image ID.
pub const MAX_ID_LEN: usize = 128;
/// The deepest file path inside an image (number of components).
pub const MAX_PATH_DEPTH: usize = 8;
const MAX_COMPONENT_LEN: usize = 255;
const MAX_REL_PATH_LEN: usize = 1024;
/// Manifests larger than this are refused (a manifest lists files, it is never this big).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// A new image is refused when the file system holding the store has less free space.
const MIN_FREE_BYTES: u64 = 1 << 20;
const HASH_BUF: usize = 1 << 20;
const TRASH_PREFIX: &str = ".trash.";
const PROBE_PREFIX: &str = ".probe-";

// ---------------------------------------------------------------------------------------------
// Errors

/// What went wrong in the store. Every message names the image and, where it matters, the
/// store, and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No image with that ID (or no such file in it).
    #[error("{0}")]
    NotFound(String),
    /// An image with that ID exists already.
    #[error("{0}")]
    Conflict(String),
    /// The ID or file path is not one the store accepts.
    #[error("{0}")]
    InvalidId(String),
    /// The quota or the file system is full.
    #[error("{0}")]
    StoreFull(String),
    /// The store cannot be written (read-only, permissions, not a directory, ...).
    #[error("{0}")]
    Unwritable(String),
    /// The image's contents do not match its manifest, or the manifest is unreadable.
    #[error("{0}")]
    Corrupt(String),
    /// The image holds something the store does not keep (a symlink, a device, a name that
    /// cannot be served).
    #[error("{0}")]
    Unsupported(String),
    /// An unexpected I/O error while reading the store.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Fault {
        match e {
            StoreError::NotFound(m) => {
                Fault::new(FaultKind::ResourceUnknown, m).with_code("unknown-image")
            }
            StoreError::InvalidId(m) => {
                Fault::new(FaultKind::InvalidMessage, m).with_code("invalid-image-id")
            }
            StoreError::Conflict(m) => Fault::new(FaultKind::Conflict, m).with_code("image-exists"),
            StoreError::StoreFull(m) => {
                Fault::new(FaultKind::OperationFailed, m).with_code("store-full")
            }
            StoreError::Unwritable(m) => {
                Fault::new(FaultKind::OperationFailed, m).with_code("store-unwritable")
            }
            StoreError::Corrupt(m) => {
                Fault::new(FaultKind::OperationFailed, m).with_code("image-corrupt")
            }
            StoreError::Unsupported(m) => {
                Fault::new(FaultKind::OperationFailed, m).with_code("image-unsupported")
            }
            e @ StoreError::Io { .. } => {
                tracing::error!(error = %e, "image store I/O error");
                Fault::internal()
            }
        }
    }
}

/// Whether an I/O error means "no space left" (ENOSPC) or "quota exceeded" (EDQUOT).
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::NOSPC) | Some(Errno::DQUOT)
    )
}

/// An I/O error while writing image `id` into the store at `root`: [`StoreError::StoreFull`]
/// for ENOSPC/EDQUOT, [`StoreError::Unwritable`] otherwise.
pub fn write_err(root: &Path, id: &str, e: io::Error) -> StoreError {
    if is_out_of_space(&e) {
        StoreError::StoreFull(format!(
            "image store {} is full: cannot write image {id}: {e}; delete old images or give \
             the store more space",
            root.display()
        ))
    } else {
        StoreError::Unwritable(format!(
            "cannot write image {id} in store {}: {e}",
            root.display()
        ))
    }
}

fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    format!("{out:?}")
}

// ---------------------------------------------------------------------------------------------
// Names

/// Checks an image ID: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
/// This is the check every ID passes before it becomes part of a path.
pub fn validate_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidId(format!(
            "invalid image ID {}: an image ID has 1 to {MAX_ID_LEN} characters among A-Z a-z \
             0-9 . _ - and does not start with '.'",
            shown(id)
        )))
    }
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.len() <= MAX_COMPONENT_LEN
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// Checks the path of a file inside an image: relative, `/`-separated, at most 8 components,
/// each made of `A-Z a-z 0-9 . _ + -` and neither empty nor `.` nor `..`.
pub fn validate_rel_path(rel: &str) -> Result<(), StoreError> {
    let ok = !rel.is_empty()
        && rel.len() <= MAX_REL_PATH_LEN
        && rel.split('/').count() <= MAX_PATH_DEPTH
        && rel.split('/').all(valid_component);
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidId(format!(
            "invalid file path {} in an image: a path is relative, has at most \
             {MAX_PATH_DEPTH} '/'-separated components of A-Z a-z 0-9 . _ + - and no empty, \
             '.' or '..' component",
            shown(rel)
        )))
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------------------------
// Manifest

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative, `/`-separated, valid for [`validate_rel_path`].
    pub path: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
}

/// The `manifest.json` of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    pub id: String,
    pub meta: ImageMeta,
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

    /// Reads and checks a manifest: format, ID, file paths (valid, unique, no file inside
    /// another), hashes, total.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, StoreError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("unreadable image manifest: {e}")))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), StoreError> {
        let bad = |what: String| {
            Err(StoreError::Corrupt(format!(
                "bad manifest for image {}: {what}",
                shown(&self.id)
            )))
        };
        if self.format != MANIFEST_FORMAT {
            return bad(format!(
                "format {} (this CTS reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        if let Err(e) = validate_id(&self.id) {
            return bad(e.to_string());
        }
        let mut paths = BTreeSet::new();
        let mut total: u64 = 0;
        for f in &self.files {
            if let Err(e) = validate_rel_path(&f.path) {
                return bad(e.to_string());
            }
            if f.path == MANIFEST_FILE {
                return bad(format!("it lists a file named {MANIFEST_FILE}"));
            }
            if !is_sha256_hex(&f.sha256) {
                return bad(format!("file {} has no valid sha256", f.path));
            }
            if !paths.insert(f.path.as_str()) {
                return bad(format!("file {} is listed twice", f.path));
            }
            total = match total.checked_add(f.size) {
                Some(t) => t,
                None => return bad("the file sizes overflow".into()),
            };
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
        Ok(())
    }

    pub fn summary(&self) -> ImageSummary {
        ImageSummary {
            id: self.id.clone(),
            total_bytes: self.total_bytes,
            created_at: self.meta.created_at,
            gid: self.meta.gid.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store

/// The image store of one CTS. Cheap to clone (an `Arc` inside).
#[derive(Clone, Debug)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    images: PathBuf,
    staging: PathBuf,
    max_bytes: Option<u64>,
    /// The sum of the committed images' `total_bytes`.
    usage: AtomicU64,
    /// Serializes the quota check and the rename of commits, and deletes.
    commit_lock: Mutex<()>,
    /// Holds the flock on `ROOT/.lock` while the store is open.
    _lock: File,
}

async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::io("image store task failed", io::Error::other(e)))?
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {cap} bytes"),
        ));
    }
    Ok(buf)
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, with an optional quota in bytes.
    ///
    /// Takes an exclusive lock on `root/.lock` (one process owns a store), removes what an
    /// earlier run left in `staging/`, checks that the store can be written and sums the
    /// committed images' sizes.
    pub fn open(root: &Path, max_bytes: Option<u64>) -> Result<Self, StoreError> {
        let unwritable = |e: io::Error| {
            StoreError::Unwritable(format!(
                "image store {} is not writable: {e}",
                root.display()
            ))
        };
        let images = root.join("images");
        let staging = root.join("staging");
        fs::create_dir_all(root).map_err(unwritable)?;
        fs::create_dir_all(&images).map_err(unwritable)?;
        fs::create_dir_all(&staging).map_err(unwritable)?;

        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(unwritable)?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(StoreError::Unwritable(format!(
                    "image store {} is in use by another process (or opened twice): its lock \
                     {} is held",
                    root.display(),
                    root.join(".lock").display()
                )))
            }
            Err(e) => return Err(unwritable(e.into())),
        }

        // Crash recovery: nothing in staging/ belongs to a live commit now.
        for entry in fs::read_dir(&staging).map_err(unwritable)? {
            let entry = entry.map_err(unwritable)?;
            tracing::info!(path = %entry.path().display(), "removing stale staging entry");
            remove_any(&entry.path()).map_err(unwritable)?;
        }
        // Probes an earlier run did not get to remove.
        for entry in fs::read_dir(&images).map_err(unwritable)? {
            let entry = entry.map_err(unwritable)?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(PROBE_PREFIX)
            {
                remove_any(&entry.path()).map_err(unwritable)?;
            }
        }
        for dir in [&staging, &images] {
            let probe = dir.join(format!("{PROBE_PREFIX}{}", random_suffix()));
            let write = || -> io::Result<()> {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&probe)?;
                f.write_all(b"probe")?;
                f.sync_all()?;
                fs::remove_file(&probe)
            };
            if let Err(e) = write() {
                let _ = fs::remove_file(&probe);
                return Err(if is_out_of_space(&e) {
                    StoreError::StoreFull(format!("image store {} is full: {e}", root.display()))
                } else {
                    unwritable(e)
                });
            }
        }

        let store = ImageStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                images,
                staging,
                max_bytes,
                usage: AtomicU64::new(0),
                commit_lock: Mutex::new(()),
                _lock: lock,
            }),
        };
        let usage = store.list_sync()?.iter().map(|s| s.total_bytes).sum();
        store.inner.usage.store(usage, Ordering::SeqCst);
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.inner.max_bytes
    }

    /// The sum of the committed images' sizes (their files, not counting manifests).
    pub fn usage(&self) -> u64 {
        self.inner.usage.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .commit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn full(&self, id: &str, what: String) -> StoreError {
        StoreError::StoreFull(format!(
            "image store {} is full: cannot store image {id}: {what}; delete old images or \
             raise the quota",
            self.inner.root.display()
        ))
    }

    /// Checks quota and free space for a new image of `expected` bytes (0: unknown).
    fn check_space(&self, id: &str, expected: u64) -> Result<(), StoreError> {
        let used = self.usage();
        if let Some(max) = self.inner.max_bytes {
            if used >= max || used.saturating_add(expected) > max {
                return Err(self.full(
                    id,
                    format!("{used} of its {max} bytes are in use, the image needs {expected}"),
                ));
            }
        }
        if let Ok(st) = rustix::fs::statvfs(&self.inner.root) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if free < MIN_FREE_BYTES.max(expected) {
                return Err(self.full(
                    id,
                    format!("its file system has {free} bytes free, the image needs {expected}"),
                ));
            }
        }
        Ok(())
    }

    /// Starts a new image: checks the ID, that no image has it, quota and free space, and
    /// creates an empty staging directory for the driver to write into.
    pub async fn stage(&self, id: &str) -> Result<Staging, StoreError> {
        self.stage_expecting(id, 0).await
    }

    /// [`ImageStore::stage`] for an image whose size is known (a fetch): refuses up front
    /// when it cannot fit.
    pub async fn stage_expecting(
        &self,
        id: &str,
        expected_bytes: u64,
    ) -> Result<Staging, StoreError> {
        validate_id(id)?;
        let store = self.clone();
        let id = id.to_string();
        blocking(move || {
            let target = store.inner.images.join(&id);
            if fs::symlink_metadata(&target).is_ok() {
                return Err(StoreError::Conflict(format!(
                    "image {id} exists already in this store"
                )));
            }
            store.check_space(&id, expected_bytes)?;
            let dir = store
                .inner
                .staging
                .join(format!("{id}.{}", random_suffix()));
            fs::create_dir(&dir).map_err(|e| write_err(&store.inner.root, &id, e))?;
            Ok(Staging {
                dir,
                id,
                store,
                armed: true,
            })
        })
        .await
    }

    /// Where a committed image with this ID is (or would be) on disk, without looking: for
    /// code that opens it itself (e.g. [`crate::export`], through a directory descriptor).
    pub fn image_path(&self, id: &str) -> Result<PathBuf, StoreError> {
        validate_id(id)?;
        Ok(self.inner.images.join(id))
    }

    /// The directory of a committed image.
    pub async fn image_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        validate_id(id)?;
        let dir = self.inner.images.join(id);
        match tokio::fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(not_found(id)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(id)),
            Err(e) => Err(StoreError::io(format!("cannot read image {id}"), e)),
        }
    }

    /// The `manifest.json` of an image, as stored.
    pub async fn manifest_bytes(&self, id: &str) -> Result<Vec<u8>, StoreError> {
        validate_id(id)?;
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.manifest_bytes_sync(&id)).await
    }

    fn manifest_bytes_sync(&self, id: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.inner.images.join(id).join(MANIFEST_FILE);
        match read_capped(&path, MAX_MANIFEST_BYTES) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(id)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(StoreError::Corrupt(format!(
                "the manifest of image {id} is {e}"
            ))),
            Err(e) => Err(StoreError::io(
                format!("cannot read the manifest of image {id}"),
                e,
            )),
        }
    }

    fn manifest_sync(&self, id: &str) -> Result<(Vec<u8>, Manifest), StoreError> {
        let bytes = self.manifest_bytes_sync(id)?;
        let m = Manifest::parse(&bytes)?;
        if m.id != id {
            return Err(StoreError::Corrupt(format!(
                "the manifest of image {id} names image {}",
                m.id
            )));
        }
        Ok((bytes, m))
    }

    /// The parsed manifest of an image.
    pub async fn manifest(&self, id: &str) -> Result<Manifest, StoreError> {
        validate_id(id)?;
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.manifest_sync(&id).map(|(_, m)| m)).await
    }

    /// The digest (`sha256:<hex>`) of an image's `manifest.json`.
    pub async fn digest(&self, id: &str) -> Result<String, StoreError> {
        Ok(Manifest::digest_of(&self.manifest_bytes(id).await?))
    }

    /// A file of an image as the manifest lists it, and where it is on disk. Only files the
    /// manifest lists are found.
    pub async fn file(&self, id: &str, rel: &str) -> Result<(PathBuf, FileEntry), StoreError> {
        validate_id(id)?;
        validate_rel_path(rel)?;
        let m = self.manifest(id).await?;
        let entry = m
            .files
            .into_iter()
            .find(|f| f.path == rel)
            .ok_or_else(|| StoreError::NotFound(format!("image {id} has no file {rel}")))?;
        let path = self.inner.images.join(id).join(&entry.path);
        Ok((path, entry))
    }

    /// Where a file of an image is on disk (see [`ImageStore::file`]).
    pub async fn file_path(&self, id: &str, rel: &str) -> Result<PathBuf, StoreError> {
        Ok(self.file(id, rel).await?.0)
    }

    /// The committed images, oldest first. Directories whose manifest cannot be read are
    /// left out (and logged).
    pub async fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let store = self.clone();
        blocking(move || store.list_sync()).await
    }

    fn list_sync(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let rd = fs::read_dir(&self.inner.images).map_err(|e| {
            StoreError::io(
                format!("cannot list image store {}", self.inner.root.display()),
                e,
            )
        })?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| StoreError::io("cannot list images", e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            if validate_id(id).is_err() {
                continue;
            }
            match self.manifest_sync(id) {
                Ok((_, m)) => out.push(m.summary()),
                // Deleted while we listed.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => tracing::warn!(image = id, error = %e, "skipping unreadable image"),
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Deletes an image; returns the bytes freed. The image leaves `images/` in one rename
    /// before its files are removed, so nobody sees it half deleted.
    pub async fn delete(&self, id: &str) -> Result<u64, StoreError> {
        validate_id(id)?;
        let store = self.clone();
        let id = id.to_string();
        blocking(move || {
            let inner = &store.inner;
            let trash = inner
                .staging
                .join(format!("{TRASH_PREFIX}{id}.{}", random_suffix()));
            let freed = {
                let _guard = store.lock();
                match fs::rename(inner.images.join(&id), &trash) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(&id)),
                    Err(e) => {
                        return Err(StoreError::Unwritable(format!(
                            "cannot delete image {id} from store {}: {e}",
                            inner.root.display()
                        )))
                    }
                }
                if let Err(e) = fsync_dir(&inner.images) {
                    tracing::warn!(error = %e, "cannot fsync the images directory");
                }
                let freed = read_capped(&trash.join(MANIFEST_FILE), MAX_MANIFEST_BYTES)
                    .ok()
                    .and_then(|b| Manifest::parse(&b).ok())
                    .map(|m| m.total_bytes)
                    .unwrap_or(0);
                let _ = inner
                    .usage
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                        Some(u.saturating_sub(freed))
                    });
                freed
            };
            if let Err(e) = fs::remove_dir_all(&trash) {
                tracing::warn!(image = %id, error = %e, path = %trash.display(),
                    "cannot remove a deleted image's files; the next start will");
            }
            Ok(freed)
        })
        .await
    }

    /// Re-hashes every file of an image and compares with its manifest (exact set of files,
    /// sizes, SHA-256). Returns the manifest when everything matches.
    pub async fn verify(&self, id: &str) -> Result<Manifest, StoreError> {
        validate_id(id)?;
        let store = self.clone();
        let id = id.to_string();
        blocking(move || {
            let (_, m) = store.manifest_sync(&id)?;
            let dir = store.inner.images.join(&id);
            let found = scan_dir(&dir, &id, false)?;
            compare_files(&id, &m.files, &found)?;
            Ok(m)
        })
        .await
    }

    /// The last step of a commit, under the commit lock: quota with the final size, the
    /// rename into `images/`, the usage counter.
    fn finalize(&self, dir: &Path, id: &str, total: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _guard = self.lock();
        if let Some(max) = inner.max_bytes {
            let used = self.usage();
            if used.saturating_add(total) > max {
                return Err(self.full(
                    id,
                    format!("the image has {total} bytes, {used} of its {max} bytes are in use"),
                ));
            }
        }
        let target = inner.images.join(id);
        let exists = || StoreError::Conflict(format!("image {id} exists already in this store"));
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            dir,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => return Err(exists()),
            // A file system without RENAME_NOREPLACE: the lock makes check-then-rename safe
            // against our own commits.
            Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                if fs::symlink_metadata(&target).is_ok() {
                    return Err(exists());
                }
                fs::rename(dir, &target).map_err(|e| write_err(&inner.root, id, e))?;
            }
            Err(e) => return Err(write_err(&inner.root, id, e.into())),
        }
        if let Err(e) = fsync_dir(&inner.images) {
            tracing::error!(image = id, error = %e, "cannot fsync the images directory");
        }
        inner.usage.fetch_add(total, Ordering::SeqCst);
        Ok(())
    }
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound(format!("no image {id} in this store"))
}

/// Walks an image directory: regular files and directories only. Returns the files, sorted,
/// with sizes and SHA-256; with `sync`, fsyncs every file and directory on the way. The
/// top-level `manifest.json` is skipped when `sync` is false (verifying a committed image)
/// and refused otherwise (it is reserved).
fn scan_dir(dir: &Path, id: &str, sync: bool) -> Result<Vec<FileEntry>, StoreError> {
    let read_err = |p: &Path, e: io::Error| {
        StoreError::io(format!("cannot read {} of image {id}", p.display()), e)
    };
    let mut files = Vec::new();
    let mut buf = vec![0u8; HASH_BUF];
    // (directory on disk, its path inside the image, depth)
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((d, prefix, depth)) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| read_err(&d, e))? {
            let entry = entry.map_err(|e| read_err(&d, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                StoreError::Unsupported(format!(
                    "image {id} has a file whose name is not UTF-8 ({}): the store cannot \
                     serve it",
                    path.display()
                ))
            })?;
            let rel = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            if prefix.is_empty() && name == MANIFEST_FILE {
                if sync {
                    return Err(StoreError::Unsupported(format!(
                        "image {id} has a file named {MANIFEST_FILE} at its top: that name is \
                         reserved for the store's manifest"
                    )));
                }
                continue;
            }
            if !valid_component(name) || depth + 1 > MAX_PATH_DEPTH {
                return Err(StoreError::Unsupported(format!(
                    "image {id} has a file the store cannot serve: {}: {}",
                    shown(&rel),
                    validate_rel_path(&rel)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| format!("deeper than {MAX_PATH_DEPTH} levels"))
                )));
            }
            let meta = fs::symlink_metadata(&path).map_err(|e| read_err(&path, e))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push((path, rel, depth + 1));
            } else if ft.is_file() {
                let (size, sha256) =
                    hash_file(&path, &mut buf, sync).map_err(|e| read_err(&path, e))?;
                files.push(FileEntry {
                    path: rel,
                    size,
                    sha256,
                });
            } else {
                let what = if ft.is_symlink() {
                    "a symbolic link"
                } else {
                    "a special file (device, FIFO or socket)"
                };
                return Err(StoreError::Unsupported(format!(
                    "image {id} has {what} at {rel}: an image holds regular files and \
                     directories only"
                )));
            }
        }
        if sync {
            fsync_dir(&d).map_err(|e| read_err(&d, e))?;
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn hash_file(path: &Path, buf: &mut [u8], sync: bool) -> io::Result<(u64, String)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    if sync {
        f.sync_all()?;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Compares the files found on disk with the manifest's list (both sorted by path).
fn compare_files(id: &str, listed: &[FileEntry], found: &[FileEntry]) -> Result<(), StoreError> {
    let corrupt = |what: String| Err(StoreError::Corrupt(format!("image {id}: {what}")));
    let found_by_path: BTreeMap<&str, &FileEntry> =
        found.iter().map(|f| (f.path.as_str(), f)).collect();
    for want in listed {
        match found_by_path.get(want.path.as_str()) {
            None => return corrupt(format!("file {} is missing", want.path)),
            Some(got) if got.size != want.size => {
                return corrupt(format!(
                    "file {} has {} bytes, the manifest says {}",
                    want.path, got.size, want.size
                ))
            }
            Some(got) if got.sha256 != want.sha256 => {
                return corrupt(format!(
                    "file {} has sha256 {}, the manifest says {}",
                    want.path, got.sha256, want.sha256
                ))
            }
            Some(_) => {}
        }
    }
    if found.len() != listed.len() {
        let listed: BTreeSet<&str> = listed.iter().map(|f| f.path.as_str()).collect();
        if let Some(extra) = found.iter().find(|f| !listed.contains(f.path.as_str())) {
            return corrupt(format!("file {} is not in the manifest", extra.path));
        }
    }
    Ok(())
}

fn write_manifest(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(MANIFEST_FILE))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fsync_dir(dir)
}

// ---------------------------------------------------------------------------------------------
// Staging

/// An image being written. Write its files into [`Staging::dir`], then
/// [`commit`](Staging::commit) it. Dropped without a commit, its directory is removed.
#[derive(Debug)]
pub struct Staging {
    /// An empty directory (when created) on the store's file system.
    pub dir: PathBuf,
    id: String,
    store: ImageStore,
    /// Remove `dir` on drop.
    armed: bool,
}

impl Staging {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Hashes the files written into the staging directory, writes the manifest and moves
    /// the image into the store. On any error the staging directory is removed.
    pub async fn commit(self, meta: ImageMeta) -> Result<Manifest, StoreError> {
        self.finish(move |dir, id| {
            let files = scan_dir(dir, id, true)?;
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                id: id.to_string(),
                meta,
                total_bytes: files.iter().map(|f| f.size).sum(),
                files,
            };
            Ok((manifest.to_bytes(), manifest))
        })
        .await
    }

    /// Commits with a manifest made elsewhere (a fetched image), keeping its bytes exactly so
    /// that its digest is the same on both sides. The files in the staging directory must be
    /// exactly the ones it lists, with the same sizes and SHA-256.
    pub async fn commit_with_manifest(
        self,
        manifest_bytes: Vec<u8>,
    ) -> Result<Manifest, StoreError> {
        self.finish(move |dir, id| {
            let manifest = Manifest::parse(&manifest_bytes)?;
            if manifest.id != id {
                return Err(StoreError::Corrupt(format!(
                    "the manifest for image {id} names image {}",
                    manifest.id
                )));
            }
            let found = scan_dir(dir, id, true)?;
            compare_files(id, &manifest.files, &found)?;
            Ok((manifest_bytes, manifest))
        })
        .await
    }

    /// Removes the staging directory now (rather than in the background on drop).
    pub async fn discard(mut self) {
        self.armed = false;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || remove_any(&dir)).await;
    }

    async fn finish<F>(mut self, build: F) -> Result<Manifest, StoreError>
    where
        F: FnOnce(&Path, &str) -> Result<(Vec<u8>, Manifest), StoreError> + Send + 'static,
    {
        // From here the blocking task owns the directory: it removes it on failure, even if
        // this future is dropped.
        self.armed = false;
        let dir = self.dir.clone();
        let id = self.id.clone();
        let store = self.store.clone();
        blocking(move || {
            let result = (|| {
                let (bytes, manifest) = build(&dir, &id)?;
                write_manifest(&dir, &bytes).map_err(|e| write_err(&store.inner.root, &id, e))?;
                store.finalize(&dir, &id, manifest.total_bytes)?;
                Ok(manifest)
            })();
            if result.is_err() {
                if let Err(e) = remove_any(&dir) {
                    tracing::warn!(path = %dir.display(), error = %e,
                        "cannot remove a failed image's staging directory");
                }
            }
            result
        })
        .await
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let dir = std::mem::take(&mut self.dir);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || remove_any(&dir));
            }
            Err(_) => {
                let _ = remove_any(&dir);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn meta(gid: &str) -> ImageMeta {
        ImageMeta {
            gid: gid.into(),
            created_at: Utc::now(),
            driver: "test".into(),
            origin: "cts-a".into(),
            extra: BTreeMap::from([("seq".to_string(), "1".to_string())]),
        }
    }

    /// Commits an image with the given files (path, contents).
    pub(crate) async fn put(store: &ImageStore, id: &str, files: &[(&str, &[u8])]) -> Manifest {
        let s = store.stage(id).await.unwrap();
        for (p, data) in files {
            let path = s.dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        s.commit(meta("job-1")).await.unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn commit_manifest_digest_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let m = put(
            &store,
            "img-1",
            &[("pages-1.img", b"hello"), ("sub/dir/core-7.img", b"world!")],
        )
        .await;
        assert_eq!(m.format, 1);
        assert_eq!(m.id, "img-1");
        assert_eq!(m.total_bytes, 11);
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["pages-1.img", "sub/dir/core-7.img"]);
        assert_eq!(m.files[0].sha256, hex::encode(Sha256::digest(b"hello")));

        let bytes = store.manifest_bytes("img-1").await.unwrap();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert_eq!(bytes, m.to_bytes());
        assert_eq!(
            store.digest("img-1").await.unwrap(),
            Manifest::digest_of(&bytes)
        );
        assert!(store.digest("img-1").await.unwrap().starts_with("sha256:"));
        assert_eq!(store.manifest("img-1").await.unwrap(), m);
        assert_eq!(store.verify("img-1").await.unwrap(), m);
        assert_eq!(store.usage(), 11);
        let list = store.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, "img-1");
        assert_eq!(list[0].gid, "job-1");
        assert_eq!(list[0].total_bytes, 11);
        let p = store
            .file_path("img-1", "sub/dir/core-7.img")
            .await
            .unwrap();
        assert_eq!(fs::read(p).unwrap(), b"world!");
        assert!(matches!(
            store.file("img-1", "manifest.json").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(entries(&tmp.path().join("staging")).is_empty());

        // Same ID again: conflict, up front.
        assert!(matches!(
            store.stage("img-1").await,
            Err(StoreError::Conflict(_))
        ));

        // Usage is recomputed at the next open.
        drop(store);
        let store = ImageStore::open(tmp.path(), None).unwrap();
        assert_eq!(store.usage(), 11);
    }

    #[tokio::test]
    async fn two_commits_racing_for_one_id() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let a = store.stage("same").await.unwrap();
        let b = store.stage("same").await.unwrap();
        fs::write(a.dir.join("f"), b"a").unwrap();
        fs::write(b.dir.join("f"), b"bb").unwrap();
        a.commit(meta("j")).await.unwrap();
        assert!(matches!(
            b.commit(meta("j")).await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(store.usage(), 1);
        assert_eq!(store.verify("same").await.unwrap().total_bytes, 1);
        assert!(entries(&tmp.path().join("staging")).is_empty());
    }

    #[tokio::test]
    async fn invalid_ids_are_refused_before_touching_the_disk() {
        for bad in [
            "../x",
            "a/b",
            "",
            ".hidden",
            ".",
            "..",
            "a\0b",
            "a b",
            "é",
            &"x".repeat(200),
        ] {
            assert!(
                matches!(validate_id(bad), Err(StoreError::InvalidId(_))),
                "{bad:?}"
            );
        }
        for good in ["a", "img-1.2_3", &"x".repeat(128), "A.b..c"] {
            validate_id(good).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            "a/",
            "a\\b",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(validate_rel_path(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "x/y.img", "c++/.hidden", "a/b/c/d/e/f/g/h"] {
            validate_rel_path(good).unwrap();
        }

        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let store = ImageStore::open(&root, None).unwrap();
        // Something an escaping ID would reach.
        fs::create_dir_all(tmp.path().join("victim")).unwrap();
        fs::write(tmp.path().join("victim/manifest.json"), b"{}").unwrap();
        for bad in [
            "../../victim",
            "../images",
            "a/b",
            "",
            ".hidden",
            &"y".repeat(200),
        ] {
            assert!(matches!(
                store.stage(bad).await,
                Err(StoreError::InvalidId(_))
            ));
            assert!(matches!(
                store.manifest(bad).await,
                Err(StoreError::InvalidId(_))
            ));
            assert!(matches!(
                store.image_dir(bad).await,
                Err(StoreError::InvalidId(_))
            ));
            assert!(matches!(
                store.delete(bad).await,
                Err(StoreError::InvalidId(_))
            ));
            assert!(matches!(
                store.verify(bad).await,
                Err(StoreError::InvalidId(_))
            ));
            assert!(matches!(
                store.file(bad, "x").await,
                Err(StoreError::InvalidId(_))
            ));
        }
        put(&store, "ok", &[("f", b"1")]).await;
        assert!(matches!(
            store.file("ok", "../../../victim/manifest.json").await,
            Err(StoreError::InvalidId(_))
        ));
        assert!(tmp.path().join("victim/manifest.json").exists());
        assert!(entries(&root.join("staging")).is_empty());
        assert_eq!(entries(&root.join("images")), ["ok"]);
        let f: Fault = validate_id("../x").unwrap_err().into();
        assert_eq!(f.kind, FaultKind::InvalidMessage);
    }

    #[tokio::test]
    async fn a_dropped_staging_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let s = store.stage("never").await.unwrap();
        fs::write(s.dir.join("half-written"), b"....").unwrap();
        let dir = s.dir.clone();
        drop(s);
        assert!(store.list().await.unwrap().is_empty());
        assert!(matches!(
            store.manifest("never").await,
            Err(StoreError::NotFound(_))
        ));
        for _ in 0..100 {
            if !dir.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!dir.exists());

        let s = store.stage("never").await.unwrap();
        let dir = s.dir.clone();
        s.discard().await;
        assert!(!dir.exists());
        assert_eq!(store.usage(), 0);
    }

    #[tokio::test]
    async fn stale_staging_is_removed_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        drop(ImageStore::open(tmp.path(), None).unwrap());
        // What a crash leaves: a half-written image and a half-deleted one.
        let staging = tmp.path().join("staging");
        fs::create_dir_all(staging.join("crashed.0123/sub")).unwrap();
        fs::write(staging.join("crashed.0123/sub/x"), b"x").unwrap();
        fs::create_dir_all(staging.join(".trash.old.4567")).unwrap();
        fs::write(tmp.path().join("images/.probe-89"), b"").unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        assert!(entries(&staging).is_empty());
        assert!(entries(&tmp.path().join("images")).is_empty());
        assert!(store.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_root_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _store = ImageStore::open(tmp.path(), None).unwrap();
        let e = ImageStore::open(tmp.path(), None).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[tokio::test]
    async fn quota_exceeded_is_store_full_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), Some(1000)).unwrap();
        let s = store.stage("big").await.unwrap();
        fs::write(s.dir.join("pages.img"), vec![7u8; 2000]).unwrap();
        let e = s.commit(meta("j")).await.unwrap_err();
        assert!(matches!(e, StoreError::StoreFull(_)), "{e}");
        assert!(e.to_string().contains(&tmp.path().display().to_string()));
        let f: Fault = e.into();
        assert_eq!(f.kind, FaultKind::OperationFailed);
        assert_eq!(f.code.as_deref(), Some("store-full"));
        assert!(store.list().await.unwrap().is_empty());
        assert!(entries(&tmp.path().join("staging")).is_empty());
        assert!(entries(&tmp.path().join("images")).is_empty());
        assert_eq!(store.usage(), 0);

        // Exactly full is allowed; then new images are refused up front.
        put(&store, "fits", &[("a", &[1u8; 1000])]).await;
        assert_eq!(store.usage(), 1000);
        assert!(matches!(
            store.stage("more").await,
            Err(StoreError::StoreFull(_))
        ));
        assert!(entries(&tmp.path().join("staging")).is_empty());
        // A fetch knows its size up front.
        store.delete("fits").await.unwrap();
        assert!(matches!(
            store.stage_expecting("more", 1001).await,
            Err(StoreError::StoreFull(_))
        ));
    }

    #[test]
    fn unwritable_store_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("images"), b"not a directory").unwrap();
        let e = ImageStore::open(&root, None).unwrap_err();
        assert!(matches!(e, StoreError::Unwritable(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("image store {} is not writable:", root.display())),
            "{e}"
        );
        let f: Fault = e.into();
        assert_eq!(f.code.as_deref(), Some("store-unwritable"));

        let file_root = tmp.path().join("plain-file");
        fs::write(&file_root, b"x").unwrap();
        assert!(matches!(
            ImageStore::open(&file_root, None),
            Err(StoreError::Unwritable(_))
        ));
    }

    #[tokio::test]
    async fn symlinks_and_reserved_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let s = store.stage("link").await.unwrap();
        fs::write(s.dir.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.dir.join("evil")).unwrap();
        let e = s.commit(meta("j")).await.unwrap_err();
        assert!(matches!(e, StoreError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        let s = store.stage("reserved").await.unwrap();
        fs::write(s.dir.join(MANIFEST_FILE), b"{}").unwrap();
        assert!(matches!(
            s.commit(meta("j")).await,
            Err(StoreError::Unsupported(_))
        ));

        let s = store.stage("badname").await.unwrap();
        fs::write(s.dir.join("has space"), b"x").unwrap();
        assert!(matches!(
            s.commit(meta("j")).await,
            Err(StoreError::Unsupported(_))
        ));
        assert!(store.list().await.unwrap().is_empty());
        assert!(entries(&tmp.path().join("staging")).is_empty());
    }

    #[tokio::test]
    async fn delete_frees_and_verify_finds_tampering() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        put(&store, "a", &[("f", &[1u8; 100])]).await;
        put(&store, "b", &[("g", &[2u8; 50])]).await;
        assert_eq!(store.usage(), 150);

        let p = store.file_path("b", "g").await.unwrap();
        let mut data = fs::read(&p).unwrap();
        data[10] ^= 1;
        fs::write(&p, data).unwrap();
        let e = store.verify("b").await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        fs::write(store.image_dir("a").await.unwrap().join("extra"), b"x").unwrap();
        assert!(matches!(
            store.verify("a").await,
            Err(StoreError::Corrupt(_))
        ));

        assert_eq!(store.delete("a").await.unwrap(), 100);
        assert_eq!(store.usage(), 50);
        assert!(matches!(
            store.delete("a").await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.image_dir("a").await,
            Err(StoreError::NotFound(_))
        ));
        let ids: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["b"]);
        assert!(entries(&tmp.path().join("staging")).is_empty());
        let f: Fault = store.delete("a").await.unwrap_err().into();
        assert_eq!(f.kind, FaultKind::ResourceUnknown);
        assert_eq!(f.code.as_deref(), Some("unknown-image"));
    }

    #[tokio::test]
    async fn commit_with_manifest_keeps_the_bytes_and_checks_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let src = put(&store, "src", &[("d/f", b"abc")]).await;
        let mut m = src.clone();
        m.id = "copy".into();
        // Not the bytes this code would write: they must be kept as they are.
        let bytes = serde_json::to_vec(&m).unwrap();

        let s = store.stage("copy").await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abd").unwrap();
        assert!(matches!(
            s.commit_with_manifest(bytes.clone()).await,
            Err(StoreError::Corrupt(_))
        ));
        let s = store.stage("copy").await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abc").unwrap();
        fs::write(s.dir.join("d/g"), b"").unwrap();
        assert!(matches!(
            s.commit_with_manifest(bytes.clone()).await,
            Err(StoreError::Corrupt(_))
        ));
        let s = store.stage("copy").await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abc").unwrap();
        assert_eq!(s.commit_with_manifest(bytes.clone()).await.unwrap(), m);
        assert_eq!(store.manifest_bytes("copy").await.unwrap(), bytes);
        assert_eq!(
            store.digest("copy").await.unwrap(),
            Manifest::digest_of(&bytes)
        );
        assert_eq!(store.usage(), 6);
    }

    #[test]
    fn bad_manifests_are_refused() {
        let good = Manifest {
            format: 1,
            id: "x".into(),
            meta: meta("j"),
            files: vec![FileEntry {
                path: "a".into(),
                size: 1,
                sha256: "0".repeat(64),
            }],
            total_bytes: 1,
        };
        Manifest::parse(&good.to_bytes()).unwrap();
        let mut cases = Vec::new();
        let mut m = good.clone();
        m.format = 2;
        cases.push(m);
        let mut m = good.clone();
        m.total_bytes = 2;
        cases.push(m);
        let mut m = good.clone();
        m.files[0].path = "../a".into();
        cases.push(m);
        let mut m = good.clone();
        m.files[0].sha256 = "xyz".into();
        cases.push(m);
        let mut m = good.clone();
        m.id = "../id".into();
        cases.push(m);
        let mut m = good.clone();
        m.files.push(m.files[0].clone());
        m.total_bytes = 2;
        cases.push(m);
        let mut m = good.clone();
        m.files.push(FileEntry {
            path: "a/b".into(),
            size: 0,
            sha256: "1".repeat(64),
        });
        cases.push(m);
        for m in cases {
            assert!(Manifest::parse(&m.to_bytes()).is_err(), "{m:?}");
        }
        assert!(Manifest::parse(b"not json").is_err());
    }
}
