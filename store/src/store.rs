//! The image store: one directory per checkpoint image, each with a manifest, committed
//! atomically, and the chunks the manifests name.
//!
//! ```text
//! ROOT/
//!   .lock                   held (flock) by the one process that has the store open
//!   images/<id>/            committed images: manifest.json (format 2: its files are chunks);
//!                           format 1 (older stores): the checkpointer's files + manifest.json
//!   chunks/packs/<P>.pack   the chunks of format 2 images, named by their BLAKE3 digest
//!   chunks/packs/<P>.idx    (crate::chunks), in packs with an index each (crate::local_chunks),
//!                           shared by every image of the store; chunks/ab/abcdef... one file
//!                           per chunk in stores written before packs (still read)
//!   restore/<id>/           an image's files made whole again for a restore (ImageStore::materialize)
//!   staging/<id>.<random>/  images being written (by a driver or by a fetch)
//!   staging/.trash.<id>.<random>/  images being deleted
//! ```
//!
//! Rules the code keeps:
//!
//! - An image ID or a file path inside an image reaches the file system only as an
//!   [`ImageId`] / [`RelPath`], which only their `parse` makes.
//! - An image appears in `images/` only by one `rename` of a complete, fsynced staging
//!   directory that already holds its `manifest.json`; so no half-written image is ever listed
//!   or served. Leftovers in `staging/` (a crash, a failed checkpoint) are removed at
//!   [`ImageStore::open`].
//! - The manifest lists every file with its size and SHA-256, so the digest of the
//!   `manifest.json` bytes ([`Manifest::digest_of`]) authenticates the whole image. A fetched
//!   image keeps the source's manifest bytes unchanged, so both sides compute the same digest.
//! - Files are hashed and copied in bounded buffers, never read whole into memory.
//! - Format 2: an image is committed only once every chunk it names is stored and durable;
//!   a chunk is removed only by [`ImageStore::collect_garbage`], when no committed image
//!   names it and no commit or fetch in progress has pinned it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gca_protocol::images::ImageSummary;
use parking_lot::Mutex;
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::chunks::{ChunkId, ChunkReadError, ChunkRef, Chunks};
use crate::error::Error;
use crate::local_chunks::LocalChunks;
use crate::manifest::{FileEntry, Manifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use crate::names::{shown, valid_component, ImageId, RelPath, MAX_PATH_DEPTH};
use crate::staging::Staging;

/// A new image is refused when the file system holding the store has less free space.
const MIN_FREE_BYTES: u64 = 1 << 20;
const HASH_BUF: usize = 1 << 20;
pub(crate) const TRASH_PREFIX: &str = ".trash.";
const PROBE_PREFIX: &str = ".probe-";

/// Whether an I/O error means "no space left" (ENOSPC) or "quota exceeded" (EDQUOT).
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(e),
        Some(Errno::NOSPC) | Some(Errno::DQUOT)
    )
}

/// An I/O error while writing image `id` into the store at `root`: [`Error::StoreFull`]
/// for ENOSPC/EDQUOT, [`Error::Unwritable`] otherwise.
pub fn write_err(root: &Path, id: &str, e: io::Error) -> Error {
    if is_out_of_space(&e) {
        Error::StoreFull(format!(
            "image store {} is full: cannot write image {id}: {e}; delete old images or give \
             the store more space",
            root.display()
        ))
    } else {
        Error::Unwritable(format!(
            "cannot write image {id} in store {}: {e}",
            root.display()
        ))
    }
}

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
    restore: PathBuf,
    chunks: Chunks,
    /// Write format 1 (whole files) rather than chunks: for stores older CTSes must read.
    whole_files: bool,
    max_bytes: Option<u64>,
    /// The sum of the committed images' `total_bytes`.
    usage: AtomicU64,
    /// Serializes the quota check and the rename of commits, and deletes.
    commit_lock: Mutex<()>,
    /// Holds the flock on `ROOT/.lock` while the store is open.
    _lock: File,
}

pub(crate) async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("image store task failed", io::Error::other(e)))?
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a directory of `staging` off the caller's path: renamed at once into the trash
/// (`.trash.*`, which nothing reads and the next open empties), then removed by a blocking
/// task. Without a runtime, or if the rename fails, it is removed here.
pub(crate) fn remove_in_background(staging: &Path, dir: &Path) {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let trash = trash_path(staging, &name.unwrap_or_default());
    let remove = |d: PathBuf| {
        if let Err(e) = remove_any(&d) {
            tracing::warn!(path = %d.display(), error = %e, "cannot remove a staging directory");
        }
    };
    match (
        fs::rename(dir, &trash),
        tokio::runtime::Handle::try_current(),
    ) {
        (Ok(()), Ok(rt)) => {
            rt.spawn_blocking(move || remove(trash));
        }
        (Ok(()), Err(_)) => remove(trash),
        (Err(_), _) => remove(dir.to_path_buf()),
    }
}

/// A fresh name in `staging`'s trash for something named `name`.
fn trash_path(staging: &Path, name: &str) -> PathBuf {
    staging.join(format!("{TRASH_PREFIX}{name}.{}", random_suffix()))
}

pub(crate) fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
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

pub(crate) fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, with an optional quota in bytes.
    ///
    /// Takes an exclusive lock on `root/.lock` (one process owns a store), removes what an
    /// earlier run left in `staging/`, checks that the store can be written and sums the
    /// committed images' sizes.
    pub fn open(root: &Path, max_bytes: Option<u64>) -> Result<Self, Error> {
        Self::open_with(root, max_bytes, false)
    }

    /// [`ImageStore::open`]; with `whole_files`, new images are written in format 1 (every
    /// file whole in the image directory, as stores before chunks did) rather than as chunks.
    pub fn open_with(
        root: &Path,
        max_bytes: Option<u64>,
        whole_files: bool,
    ) -> Result<Self, Error> {
        let unwritable = |e: io::Error| {
            Error::Unwritable(format!(
                "image store {} is not writable: {e}",
                root.display()
            ))
        };
        let images = root.join("images");
        let staging = root.join("staging");
        let restore = root.join("restore");
        // Only the CTS reaches images (memory dumps, the job's files): 0700 all the way.
        for dir in [root, &images, &staging, &restore] {
            fs::create_dir_all(dir).map_err(unwritable)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(unwritable)?;
        }

        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(unwritable)?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(Error::Unwritable(format!(
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
        // Restores of an earlier run: made again when asked for.
        for entry in fs::read_dir(&restore).map_err(unwritable)? {
            let entry = entry.map_err(unwritable)?;
            remove_any(&entry.path()).map_err(unwritable)?;
        }
        let chunks = Chunks::new(Arc::new(
            LocalChunks::open(&root.join("chunks")).map_err(unwritable)?,
        ));
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
                    Error::StoreFull(format!("image store {} is full: {e}", root.display()))
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
                restore,
                chunks,
                whole_files,
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

    /// The chunks of the store (format 2 images).
    pub fn chunks(&self) -> &Chunks {
        &self.inner.chunks
    }

    /// Whether new images are written in format 1 (whole files).
    pub fn writes_whole_files(&self) -> bool {
        self.inner.whole_files
    }

    pub(crate) fn staging_root(&self) -> &Path {
        &self.inner.staging
    }

    /// The sum of the committed images' sizes (their files, not counting manifests).
    pub fn usage(&self) -> u64 {
        self.inner.usage.load(Ordering::SeqCst)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.inner.commit_lock.lock()
    }

    fn full(&self, id: &str, what: String) -> Error {
        Error::StoreFull(format!(
            "image store {} is full: cannot store image {id}: {what}; delete old images or \
             raise the quota",
            self.inner.root.display()
        ))
    }

    /// Checks quota and free space for a new image of `expected` bytes (0: unknown).
    fn check_space(&self, id: &str, expected: u64) -> Result<(), Error> {
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
    pub async fn stage(&self, id: &ImageId) -> Result<Staging, Error> {
        self.stage_expecting(id, 0).await
    }

    /// [`ImageStore::stage`] for an image whose size is known (a fetch): refuses up front
    /// when it cannot fit.
    pub async fn stage_expecting(
        &self,
        id: &ImageId,
        expected_bytes: u64,
    ) -> Result<Staging, Error> {
        let image = id.clone();
        let store = self.clone();
        let id = id.to_string();
        blocking(move || {
            let target = store.inner.images.join(&id);
            if fs::symlink_metadata(&target).is_ok() {
                return Err(Error::Conflict(format!(
                    "image {id} exists already in this store"
                )));
            }
            store.check_space(&id, expected_bytes)?;
            let dir = store
                .inner
                .staging
                .join(format!("{id}.{}", random_suffix()));
            fs::create_dir(&dir).map_err(|e| write_err(&store.inner.root, &id, e))?;
            Ok(Staging::new(dir, image, store))
        })
        .await
    }

    /// Where a committed image with this ID is (or would be) on disk, without looking: for
    /// code that opens it itself (e.g. [`crate::export`], through a directory descriptor).
    pub fn image_path(&self, id: &ImageId) -> PathBuf {
        self.inner.images.join(id)
    }

    /// The directory of a committed image.
    pub async fn image_dir(&self, id: &ImageId) -> Result<PathBuf, Error> {
        let dir = self.inner.images.join(id);
        match tokio::fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(not_found(id.as_str())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(id.as_str())),
            Err(e) => Err(Error::io(format!("cannot read image {id}"), e)),
        }
    }

    /// The `manifest.json` of an image, as stored.
    pub async fn manifest_bytes(&self, id: &ImageId) -> Result<Vec<u8>, Error> {
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.manifest_bytes_sync(&id)).await
    }

    fn manifest_bytes_sync(&self, id: &str) -> Result<Vec<u8>, Error> {
        let path = self.inner.images.join(id).join(MANIFEST_FILE);
        match read_capped(&path, MAX_MANIFEST_BYTES) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(id)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Err(Error::Corrupt(format!("the manifest of image {id} is {e}")))
            }
            Err(e) => Err(Error::io(
                format!("cannot read the manifest of image {id}"),
                e,
            )),
        }
    }

    fn manifest_sync(&self, id: &str) -> Result<(Vec<u8>, Manifest), Error> {
        let bytes = self.manifest_bytes_sync(id)?;
        let m = Manifest::parse(&bytes)?;
        if m.id != id {
            return Err(Error::Corrupt(format!(
                "the manifest of image {id} names image {}",
                m.id
            )));
        }
        Ok((bytes, m))
    }

    /// The parsed manifest of an image.
    pub async fn manifest(&self, id: &ImageId) -> Result<Manifest, Error> {
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.manifest_sync(&id).map(|(_, m)| m)).await
    }

    /// The digest (`sha256:<hex>`) of an image's `manifest.json`.
    pub async fn digest(&self, id: &ImageId) -> Result<String, Error> {
        Ok(Manifest::digest_of(&self.manifest_bytes(id).await?))
    }

    /// A file of an image as the manifest lists it, and where it is on disk. Only files the
    /// manifest lists are found.
    pub async fn file(&self, id: &ImageId, rel: &RelPath) -> Result<(PathBuf, FileEntry), Error> {
        let rel = rel.as_str();
        let m = self.manifest(id).await?;
        let entry = m
            .files
            .into_iter()
            .find(|f| f.path == rel)
            .ok_or_else(|| Error::NotFound(format!("image {id} has no file {rel}")))?;
        let path = self.inner.images.join(id).join(&entry.path);
        Ok((path, entry))
    }

    /// Where a file of an image is on disk (see [`ImageStore::file`]).
    pub async fn file_path(&self, id: &ImageId, rel: &RelPath) -> Result<PathBuf, Error> {
        Ok(self.file(id, rel).await?.0)
    }

    /// The committed images, oldest first. Directories whose manifest cannot be read are
    /// left out (and logged).
    pub async fn list(&self) -> Result<Vec<ImageSummary>, Error> {
        let store = self.clone();
        blocking(move || store.list_sync()).await
    }

    fn list_sync(&self) -> Result<Vec<ImageSummary>, Error> {
        let rd = fs::read_dir(&self.inner.images).map_err(|e| {
            Error::io(
                format!("cannot list image store {}", self.inner.root.display()),
                e,
            )
        })?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("cannot list images", e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str() else { continue };
            let Ok(id) = ImageId::parse(id) else {
                continue;
            };
            match self.manifest_sync(id.as_str()) {
                Ok((_, m)) => out.push(m.summary()),
                // Deleted while we listed.
                Err(Error::NotFound(_)) => {}
                Err(e) => tracing::warn!(image = %id, error = %e, "skipping unreadable image"),
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Deletes an image; returns the bytes freed. The image leaves `images/` in one rename
    /// before its files are removed, so nobody sees it half deleted.
    pub async fn delete(&self, id: &ImageId) -> Result<u64, Error> {
        let store = self.clone();
        let id = id.to_string();
        blocking(move || {
            let inner = &store.inner;
            let trash = trash_path(&inner.staging, &id);
            let freed = {
                let _guard = store.lock();
                match fs::rename(inner.images.join(&id), &trash) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(&id)),
                    Err(e) => {
                        return Err(Error::Unwritable(format!(
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
            if let Err(e) = remove_any(&inner.restore.join(&id)) {
                tracing::warn!(image = %id, error = %e, "cannot remove a deleted image's restore copy");
            }
            if let Err(e) = store.collect_garbage_sync() {
                tracing::warn!(image = %id, error = %e, "the chunk sweep after a delete failed; the next one retries");
            }
            Ok(freed)
        })
        .await
    }

    /// Re-hashes every file (format 1) or chunk (format 2) of an image and compares with its
    /// manifest (exact set of files, sizes, hashes). Returns the manifest when everything
    /// matches.
    pub async fn verify(&self, id: &ImageId) -> Result<Manifest, Error> {
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.verify_sync(&id)).await
    }

    fn verify_sync(&self, id: &str) -> Result<Manifest, Error> {
        let (_, m) = self.manifest_sync(id)?;
        let dir = self.inner.images.join(id);
        let found = scan_dir(&dir, id, false)?;
        if m.is_chunked() {
            if let Some(extra) = found.first() {
                return Err(Error::Corrupt(format!(
                    "image {id}: file {} is not in the manifest",
                    extra.path
                )));
            }
            for f in &m.files {
                for c in &f.chunks {
                    self.read_chunk(id, &f.path, c)?;
                }
            }
        } else {
            compare_files(id, &m.files, &found)?;
        }
        Ok(m)
    }

    /// A chunk of file `file` of image `image`, checked; missing or corrupt is
    /// [`Error::ChunkCorrupt`].
    pub(crate) fn read_chunk(
        &self,
        image: &str,
        file: &str,
        c: &ChunkRef,
    ) -> Result<Vec<u8>, Error> {
        let bad = |detail: String| Error::ChunkCorrupt {
            image: image.to_string(),
            file: file.to_string(),
            chunk: c.id.to_hex(),
            detail,
        };
        match self.inner.chunks.read_verified(c) {
            Ok(d) => Ok(d),
            Err(ChunkReadError::Missing) => Err(bad("is missing from the store".into())),
            Err(ChunkReadError::Corrupt(why)) => Err(bad(format!("is corrupt ({why})"))),
            Err(ChunkReadError::Io(e)) => Err(Error::io(
                format!("cannot read chunk {} of image {image}", c.id),
                e,
            )),
        }
    }

    /// A chunk of image `image` as stored, without hashing it (served to a peer, which checks
    /// every chunk as it arrives); only its length is checked.
    pub(crate) fn read_chunk_unverified(
        &self,
        image: &str,
        c: &ChunkRef,
    ) -> Result<Vec<u8>, Error> {
        match self.inner.chunks.backend().read(&c.id) {
            Ok(d) if d.len() == c.size as usize => Ok(d),
            Ok(d) => Err(Error::ChunkCorrupt {
                image: image.to_string(),
                file: "-".into(),
                chunk: c.id.to_hex(),
                detail: format!("has {} bytes, the manifest says {}", d.len(), c.size),
            }),
            Err(e) => Err(Error::io(
                format!("cannot read chunk {} of image {image}", c.id),
                e,
            )),
        }
    }

    /// An image's files as plain files in a directory, for a restore (CRIU and the other
    /// drivers read files): format 1 images are their own directory (checked first); format 2
    /// images are written whole into `restore/<id>/` from their chunks, each chunk checked as
    /// it is read. The directory is made again on every call, and removed with the image.
    pub async fn materialize(&self, id: &ImageId) -> Result<PathBuf, Error> {
        self.materialize_checked(id, Arc::default()).await
    }

    /// [`ImageStore::materialize`] right after a fetch: the chunks in `checked` (those the
    /// fetch received, [`crate::fetch::Fetched::checked`]) were checked against their names
    /// as they arrived, so they are copied without being hashed again; every other chunk
    /// (one the store had before) is checked as it is read.
    pub async fn materialize_checked(
        &self,
        id: &ImageId,
        checked: Arc<HashSet<ChunkId>>,
    ) -> Result<PathBuf, Error> {
        let store = self.clone();
        let id = id.to_string();
        blocking(move || store.materialize_sync(&id, &checked)).await
    }

    fn materialize_sync(&self, id: &str, checked: &HashSet<ChunkId>) -> Result<PathBuf, Error> {
        let (_, m) = self.manifest_sync(id)?;
        if !m.is_chunked() {
            self.verify_sync(id)?;
            return Ok(self.inner.images.join(id));
        }
        let tmp = self
            .inner
            .restore
            .join(format!(".{id}.{}", random_suffix()));
        let pins = self.inner.chunks.pin_set();
        let result = (|| {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            // The CTS's alone, like the store: memory dumps, the job's files.
            let mut dirs = fs::DirBuilder::new();
            dirs.recursive(true).mode(0o700);
            dirs.create(&tmp)
                .map_err(|e| write_err(&self.inner.root, id, e))?;
            for f in &m.files {
                let dest = tmp.join(&f.path);
                let werr = |e| write_err(&self.inner.root, id, e);
                if let Some(parent) = dest.parent() {
                    dirs.create(parent).map_err(werr)?;
                }
                let mut out = io::BufWriter::with_capacity(
                    HASH_BUF,
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&dest)
                        .map_err(werr)?,
                );
                for c in &f.chunks {
                    pins.pin(&c.id);
                    let data = if checked.contains(&c.id) {
                        self.read_chunk_unverified(id, c)?
                    } else {
                        self.read_chunk(id, &f.path, c)?
                    };
                    out.write_all(&data).map_err(werr)?;
                }
                out.flush().map_err(werr)?;
            }
            let target = self.inner.restore.join(id);
            remove_any(&target).map_err(|e| write_err(&self.inner.root, id, e))?;
            fs::rename(&tmp, &target).map_err(|e| write_err(&self.inner.root, id, e))?;
            Ok(target)
        })();
        if result.is_err() {
            let _ = remove_any(&tmp);
        }
        result
    }

    /// Removes every chunk no committed image names and no commit or fetch in progress has
    /// pinned (mark and sweep, under the commit lock: no image is committed meanwhile).
    /// Refuses to sweep when a manifest cannot be read (its chunks could be removed).
    pub async fn collect_garbage(&self) -> Result<GcReport, Error> {
        let store = self.clone();
        blocking(move || store.collect_garbage_sync()).await
    }

    fn collect_garbage_sync(&self) -> Result<GcReport, Error> {
        let _guard = self.lock();
        let mut live: BTreeSet<ChunkId> = BTreeSet::new();
        let rd = fs::read_dir(&self.inner.images)
            .map_err(|e| Error::io("cannot list the images for the chunk sweep", e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("cannot list the images", e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| ImageId::parse(n).ok()) else {
                continue;
            };
            let (_, m) = self.manifest_sync(id.as_str()).map_err(|e| {
                Error::Corrupt(format!(
                    "no chunk is removed while the manifest of image {id} cannot be read: {e}"
                ))
            })?;
            live.extend(m.chunk_set().into_keys());
        }
        let backend = self.inner.chunks.backend();
        let stored = backend
            .list()
            .map_err(|e| Error::io("cannot list the chunks for the sweep", e))?;
        let mut report = GcReport {
            kept: 0,
            removed: 0,
        };
        for id in stored {
            if live.contains(&id) {
                report.kept += 1;
                continue;
            }
            let removed = self
                .inner
                .chunks
                .pins()
                .remove_unless_pinned(&id, || backend.remove(&id))
                .map_err(|e| Error::io(format!("cannot remove chunk {id}"), e))?;
            if removed {
                report.removed += 1;
            } else {
                report.kept += 1;
            }
        }
        backend
            .finish_sweep()
            .map_err(|e| Error::io("cannot make the sweep's removals durable", e))?;
        if report.removed > 0 {
            tracing::info!(
                removed = report.removed,
                kept = report.kept,
                "unreferenced chunks removed"
            );
        }
        Ok(report)
    }

    /// The last step of a commit, under the commit lock: quota with the final size, the
    /// rename into `images/`, the usage counter.
    pub(crate) fn finalize(&self, dir: &Path, id: &str, total: u64) -> Result<(), Error> {
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
        let exists = || Error::Conflict(format!("image {id} exists already in this store"));
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

/// Writes the files of image `id` of the store at `root` whole into `dest` (created), with a
/// copy of its `manifest.json`, every file (format 1) or chunk (format 2) checked: for tools
/// and tests that read a store another process has open (no lock is taken, nothing in the
/// store is changed).
pub fn read_image_offline(root: &Path, id: &ImageId, dest: &Path) -> Result<Manifest, Error> {
    let dir = root.join("images").join(id);
    let bytes = read_capped(&dir.join(MANIFEST_FILE), MAX_MANIFEST_BYTES)
        .map_err(|e| Error::io(format!("cannot read the manifest of image {id}"), e))?;
    let m = Manifest::parse(&bytes)?;
    let local = LocalChunks::at(&root.join("chunks")).map_err(|e| {
        Error::io(
            format!("cannot read the chunk packs of {}", root.display()),
            e,
        )
    })?;
    let chunks = Chunks::new(Arc::new(local));
    let werr = |e| write_err(dest, id.as_str(), e);
    fs::create_dir_all(dest).map_err(werr)?;
    fs::write(dest.join(MANIFEST_FILE), &bytes).map_err(werr)?;
    if !m.is_chunked() {
        compare_files(id.as_str(), &m.files, &scan_dir(&dir, id.as_str(), false)?)?;
    }
    for f in &m.files {
        let out = dest.join(&f.path);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(werr)?;
        }
        if !m.is_chunked() {
            fs::copy(dir.join(&f.path), &out).map_err(werr)?;
            continue;
        }
        let mut w = io::BufWriter::new(File::create(&out).map_err(werr)?);
        for c in &f.chunks {
            let data = chunks.read_verified(c).map_err(|e| Error::ChunkCorrupt {
                image: id.to_string(),
                file: f.path.to_string(),
                chunk: c.id.to_hex(),
                detail: format!("{e:?}"),
            })?;
            w.write_all(&data).map_err(werr)?;
        }
        w.flush().map_err(werr)?;
    }
    Ok(m)
}

/// What a chunk sweep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks kept (named by an image, or pinned).
    pub kept: usize,
    /// Chunks removed.
    pub removed: usize,
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("no image {id} in this store"))
}

/// Walks an image directory: regular files and directories only. Returns the files, sorted,
/// with sizes and SHA-256; with `sync`, fsyncs every file and directory on the way. The
/// top-level `manifest.json` is skipped when `sync` is false (verifying a committed image)
/// and refused otherwise (it is reserved).
pub(crate) fn scan_dir(dir: &Path, id: &str, sync: bool) -> Result<Vec<FileEntry>, Error> {
    let read_err =
        |p: &Path, e: io::Error| Error::io(format!("cannot read {} of image {id}", p.display()), e);
    let mut buf = vec![0u8; HASH_BUF];
    let mut files = Vec::new();
    for (rel, path) in walk_dir(dir, id, sync, sync)? {
        let (size, sha256) = hash_file(&path, &mut buf, sync).map_err(|e| read_err(&path, e))?;
        files.push(FileEntry {
            path: rel,
            size,
            sha256: Some(sha256),
            chunks: Vec::new(),
        });
    }
    Ok(files)
}

/// The files of an image directory (its path inside the image, its path on disk), sorted:
/// regular files and directories only, names a [`RelPath`] takes. The top-level
/// `manifest.json` is refused with `refuse_manifest` (a driver's output) and skipped
/// otherwise; with `sync_dirs`, every directory is fsynced on the way.
pub(crate) fn walk_dir(
    dir: &Path,
    id: &str,
    refuse_manifest: bool,
    sync_dirs: bool,
) -> Result<Vec<(RelPath, PathBuf)>, Error> {
    let read_err =
        |p: &Path, e: io::Error| Error::io(format!("cannot read {} of image {id}", p.display()), e);
    let mut files = Vec::new();
    // (directory on disk, its path inside the image, depth)
    let mut stack = vec![(dir.to_path_buf(), String::new(), 0usize)];
    while let Some((d, prefix, depth)) = stack.pop() {
        for entry in fs::read_dir(&d).map_err(|e| read_err(&d, e))? {
            let entry = entry.map_err(|e| read_err(&d, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                Error::Unsupported(format!(
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
                if refuse_manifest {
                    return Err(Error::Unsupported(format!(
                        "image {id} has a file named {MANIFEST_FILE} at its top: that name is \
                         reserved for the store's manifest"
                    )));
                }
                continue;
            }
            if !valid_component(name) || depth + 1 > MAX_PATH_DEPTH {
                return Err(Error::Unsupported(format!(
                    "image {id} has a file the store cannot serve: {}: {}",
                    shown(&rel),
                    RelPath::parse(&rel)
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
                files.push((RelPath::parse(&rel)?, path));
            } else {
                let what = if ft.is_symlink() {
                    "a symbolic link"
                } else {
                    "a special file (device, FIFO or socket)"
                };
                return Err(Error::Unsupported(format!(
                    "image {id} has {what} at {rel}: an image holds regular files and \
                     directories only"
                )));
            }
        }
        if sync_dirs {
            fsync_dir(&d).map_err(|e| read_err(&d, e))?;
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
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
pub(crate) fn compare_files(
    id: &str,
    listed: &[FileEntry],
    found: &[FileEntry],
) -> Result<(), Error> {
    let corrupt = |what: String| Err(Error::Corrupt(format!("image {id}: {what}")));
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
                    want.path,
                    got.sha256.as_deref().unwrap_or("-"),
                    want.sha256.as_deref().unwrap_or("-")
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

pub(crate) fn write_manifest(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(MANIFEST_FILE))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fsync_dir(dir)
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::manifest::{FileEntry, ImageMeta};
    use chrono::Utc;
    use gca_protocol::{Fault, FaultKind};

    /// An image ID for a test.
    pub(crate) fn id(s: &str) -> ImageId {
        ImageId::parse(s).unwrap()
    }

    /// A file path for a test.
    pub(crate) fn rel(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    pub(crate) fn meta(gid: &str) -> ImageMeta {
        ImageMeta {
            gid: gid.into(),
            created_at: Utc::now(),
            driver: "test".into(),
            origin: "cts-a".into(),
            extra: BTreeMap::from([("seq".to_string(), "1".to_string())]),
        }
    }

    /// Commits an image with the given files (path, contents) in format 1 (whole files, as
    /// stores before chunks did: the tests of old images).
    pub(crate) async fn put(store: &ImageStore, id: &str, files: &[(&str, &[u8])]) -> Manifest {
        let s = store.stage(&self::id(id)).await.unwrap();
        for (p, data) in files {
            let path = s.dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        s.commit_whole_files(meta("job-1")).await.unwrap()
    }

    /// Commits an image with the given files in format 2 (chunks).
    pub(crate) async fn put_v2(store: &ImageStore, id: &str, files: &[(&str, &[u8])]) -> Manifest {
        let s = store.stage(&self::id(id)).await.unwrap();
        for (p, data) in files {
            let path = s.dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        let m = s.commit(meta("job-1")).await.unwrap();
        assert!(m.is_chunked());
        m
    }

    /// The entries of a directory, but the trash being removed in the background.
    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(TRASH_PREFIX))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn commit_manifest_digest_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let m = put_v2(
            &store,
            "img-1",
            &[("pages-1.img", b"hello"), ("sub/dir/core-7.img", b"world!")],
        )
        .await;
        assert_eq!(m.format, 2);
        assert_eq!(m.id, "img-1");
        assert_eq!(m.total_bytes, 11);
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["pages-1.img", "sub/dir/core-7.img"]);
        assert_eq!(m.files[0].sha256, None);
        assert_eq!(m.files[0].chunks.len(), 1);
        assert_eq!(m.files[0].chunks[0].id, ChunkId::of(b"hello"));
        // The image directory holds the manifest only; the files are chunks.
        assert_eq!(entries(&tmp.path().join("images/img-1")), [MANIFEST_FILE]);

        let bytes = store.manifest_bytes(&id("img-1")).await.unwrap();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert_eq!(bytes, m.to_bytes());
        assert_eq!(
            store.digest(&id("img-1")).await.unwrap(),
            Manifest::digest_of(&bytes)
        );
        assert!(store
            .digest(&id("img-1"))
            .await
            .unwrap()
            .starts_with("sha256:"));
        assert_eq!(store.manifest(&id("img-1")).await.unwrap(), m);
        assert_eq!(store.verify(&id("img-1")).await.unwrap(), m);
        assert_eq!(store.usage(), 11);
        let list = store.list().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, "img-1");
        assert_eq!(list[0].gid, "job-1");
        assert_eq!(list[0].total_bytes, 11);
        let restored = store.materialize(&id("img-1")).await.unwrap();
        assert_eq!(restored, tmp.path().join("restore/img-1"));
        use std::os::unix::fs::MetadataExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&restored.join("sub/dir/core-7.img")), 0o600);
        assert_eq!(mode(&restored.join("sub/dir")), 0o700);
        assert_eq!(
            fs::read(restored.join("sub/dir/core-7.img")).unwrap(),
            b"world!"
        );
        assert_eq!(fs::read(restored.join("pages-1.img")).unwrap(), b"hello");
        assert!(matches!(
            store.file(&id("img-1"), &rel("manifest.json")).await,
            Err(Error::NotFound(_))
        ));
        assert!(entries(&tmp.path().join("staging")).is_empty());

        // Same ID again: conflict, up front.
        assert!(matches!(
            store.stage(&id("img-1")).await,
            Err(Error::Conflict(_))
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
        let a = store.stage(&id("same")).await.unwrap();
        let b = store.stage(&id("same")).await.unwrap();
        fs::write(a.dir.join("f"), b"a").unwrap();
        fs::write(b.dir.join("f"), b"bb").unwrap();
        a.commit(meta("j")).await.unwrap();
        assert!(matches!(b.commit(meta("j")).await, Err(Error::Conflict(_))));
        assert!(entries(&tmp.path().join("staging")).is_empty());
        assert_eq!(store.usage(), 1);
        assert_eq!(store.verify(&id("same")).await.unwrap().total_bytes, 1);
        assert!(entries(&tmp.path().join("staging")).is_empty());
    }

    /// The store only takes parsed names ([`ImageId`], [`RelPath`]: their own tests are in
    /// `names`), so no name can reach outside it: an escaping ID or path is refused by its
    /// parse, before anything touches the disk.
    #[tokio::test]
    async fn invalid_ids_are_refused_before_touching_the_disk() {
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
            assert!(
                matches!(ImageId::parse(bad), Err(Error::InvalidId(_))),
                "{bad:?}"
            );
        }
        put(&store, "ok", &[("f", b"1")]).await;
        assert!(matches!(
            RelPath::parse("../../../victim/manifest.json"),
            Err(Error::InvalidId(_))
        ));
        assert!(tmp.path().join("victim/manifest.json").exists());
        assert!(entries(&root.join("staging")).is_empty());
        assert_eq!(entries(&root.join("images")), ["ok"]);
        // A directory in images/ whose name is no image ID is not listed.
        fs::create_dir(root.join("images/.odd")).unwrap();
        let ids: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["ok"]);
        let f: Fault = ImageId::parse("../x").unwrap_err().into();
        assert_eq!(f.kind, FaultKind::InvalidMessage);
    }

    #[tokio::test]
    async fn a_committed_image_s_staging_files_are_removed_after_the_answer() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let s = store.stage(&id("cut")).await.unwrap();
        fs::write(s.dir.join("pages-1.img"), vec![7u8; 1 << 20]).unwrap();
        s.commit(meta("j")).await.unwrap();
        // At once, nothing live is left; the driver's files go with the trash, soon.
        assert!(entries(&tmp.path().join("staging")).is_empty());
        let all = || fs::read_dir(tmp.path().join("staging")).unwrap().count();
        for _ in 0..200 {
            if all() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(all(), 0, "the trash is removed in the background");
        assert_eq!(store.verify(&id("cut")).await.unwrap().total_bytes, 1 << 20);
    }

    #[tokio::test]
    async fn a_dropped_staging_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let s = store.stage(&id("never")).await.unwrap();
        fs::write(s.dir.join("half-written"), b"....").unwrap();
        let dir = s.dir.clone();
        drop(s);
        assert!(store.list().await.unwrap().is_empty());
        assert!(matches!(
            store.manifest(&id("never")).await,
            Err(Error::NotFound(_))
        ));
        for _ in 0..100 {
            if !dir.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!dir.exists());

        let s = store.stage(&id("never")).await.unwrap();
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
        let s = store.stage(&id("big")).await.unwrap();
        fs::write(s.dir.join("pages.img"), vec![7u8; 2000]).unwrap();
        let e = s.commit(meta("j")).await.unwrap_err();
        assert!(matches!(e, Error::StoreFull(_)), "{e}");
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
            store.stage(&id("more")).await,
            Err(Error::StoreFull(_))
        ));
        assert!(entries(&tmp.path().join("staging")).is_empty());
        // A fetch knows its size up front.
        store.delete(&id("fits")).await.unwrap();
        assert!(matches!(
            store.stage_expecting(&id("more"), 1001).await,
            Err(Error::StoreFull(_))
        ));
    }

    #[test]
    fn unwritable_store_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("images"), b"not a directory").unwrap();
        let e = ImageStore::open(&root, None).unwrap_err();
        assert!(matches!(e, Error::Unwritable(_)), "{e:?}");
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
            Err(Error::Unwritable(_))
        ));
    }

    #[tokio::test]
    async fn symlinks_and_reserved_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let s = store.stage(&id("link")).await.unwrap();
        fs::write(s.dir.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.dir.join("evil")).unwrap();
        let e = s.commit(meta("j")).await.unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");

        let s = store.stage(&id("reserved")).await.unwrap();
        fs::write(s.dir.join(MANIFEST_FILE), b"{}").unwrap();
        assert!(matches!(
            s.commit(meta("j")).await,
            Err(Error::Unsupported(_))
        ));

        let s = store.stage(&id("badname")).await.unwrap();
        fs::write(s.dir.join("has space"), b"x").unwrap();
        assert!(matches!(
            s.commit(meta("j")).await,
            Err(Error::Unsupported(_))
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

        let p = store.file_path(&id("b"), &rel("g")).await.unwrap();
        let mut data = fs::read(&p).unwrap();
        data[10] ^= 1;
        fs::write(&p, data).unwrap();
        let e = store.verify(&id("b")).await.unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        fs::write(store.image_dir(&id("a")).await.unwrap().join("extra"), b"x").unwrap();
        assert!(matches!(
            store.verify(&id("a")).await,
            Err(Error::Corrupt(_))
        ));

        assert_eq!(store.delete(&id("a")).await.unwrap(), 100);
        assert_eq!(store.usage(), 50);
        assert!(matches!(
            store.delete(&id("a")).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            store.image_dir(&id("a")).await,
            Err(Error::NotFound(_))
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
        let f: Fault = store.delete(&id("a")).await.unwrap_err().into();
        assert_eq!(f.kind, FaultKind::ResourceUnknown);
        assert_eq!(f.code.as_deref(), Some("unknown-image"));
    }

    #[tokio::test]
    async fn commit_with_manifest_keeps_the_bytes_and_checks_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let src = put(&store, "src", &[("d/f", b"abc")]).await;
        let mut m = src.clone();
        m.id = id("copy");
        // Not the bytes this code would write: they must be kept as they are.
        let bytes = serde_json::to_vec(&m).unwrap();

        let s = store.stage(&id("copy")).await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abd").unwrap();
        assert!(matches!(
            s.commit_with_manifest(bytes.clone()).await,
            Err(Error::Corrupt(_))
        ));
        let s = store.stage(&id("copy")).await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abc").unwrap();
        fs::write(s.dir.join("d/g"), b"").unwrap();
        assert!(matches!(
            s.commit_with_manifest(bytes.clone()).await,
            Err(Error::Corrupt(_))
        ));
        let s = store.stage(&id("copy")).await.unwrap();
        fs::create_dir(s.dir.join("d")).unwrap();
        fs::write(s.dir.join("d/f"), b"abc").unwrap();
        assert_eq!(s.commit_with_manifest(bytes.clone()).await.unwrap(), m);
        assert_eq!(store.manifest_bytes(&id("copy")).await.unwrap(), bytes);
        assert_eq!(
            store.digest(&id("copy")).await.unwrap(),
            Manifest::digest_of(&bytes)
        );
        assert_eq!(store.usage(), 6);
    }

    #[test]
    fn bad_manifests_are_refused() {
        let good = Manifest {
            format: 1,
            id: id("x"),
            meta: meta("j"),
            chunk_hash: None,
            files: vec![FileEntry {
                path: rel("a"),
                size: 1,
                sha256: Some("0".repeat(64)),
                chunks: vec![],
            }],
            total_bytes: 1,
        };
        assert_eq!(Manifest::parse(&good.to_bytes()).unwrap(), good);
        // Manifests as another CTS could send them: the JSON, changed.
        let good = serde_json::to_value(&good).unwrap();
        let entry_a = good["files"][0].clone();
        type Change<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
        let changes: Vec<Change<'_>> = vec![
            Box::new(|m| m["format"] = 2.into()),
            Box::new(|m| m["total_bytes"] = 2.into()),
            Box::new(|m| m["files"][0]["path"] = "../a".into()),
            Box::new(|m| m["files"][0]["sha256"] = "xyz".into()),
            Box::new(|m| m["id"] = "../id".into()),
            Box::new(|m| {
                m["files"].as_array_mut().unwrap().push(entry_a.clone());
                m["total_bytes"] = 2.into();
            }),
            Box::new(|m| {
                m["files"].as_array_mut().unwrap().push(serde_json::json!({
                    "path": "a/b", "size": 0, "sha256": "1".repeat(64)
                }))
            }),
        ];
        for change in changes {
            let mut m = good.clone();
            change(&mut m);
            let bytes = serde_json::to_vec_pretty(&m).unwrap();
            assert!(
                matches!(Manifest::parse(&bytes), Err(Error::Corrupt(_))),
                "{m}"
            );
        }
        assert!(Manifest::parse(b"not json").is_err());
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn stored_chunks(store: &ImageStore) -> BTreeSet<ChunkId> {
        store
            .chunks()
            .backend()
            .list()
            .unwrap()
            .into_iter()
            .collect()
    }

    #[tokio::test]
    async fn checkpoints_of_an_almost_unchanged_job_store_only_the_changed_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let mut pages = noise(16 << 20, 11);
        let m1 = put_v2(&store, "c1", &[("pages-1.img", &pages)]).await;
        let after_one = stored_chunks(&store);
        assert_eq!(after_one.len(), m1.chunk_set().len());
        for i in 2..=8 {
            let n = pages.len();
            pages[(i * 1_900_000) % n] ^= 0xff;
            put_v2(&store, &format!("c{i}"), &[("pages-1.img", &pages)]).await;
        }
        let all = stored_chunks(&store);
        let bytes = |ids: &BTreeSet<ChunkId>| -> u64 {
            let local = LocalChunks::at(&tmp.path().join("chunks")).unwrap();
            ids.iter()
                .map(|c| local.locate(c).unwrap().expect("stored").len as u64)
                .sum()
        };
        // Eight images of 16 MiB: one image and the few chunks that changed.
        assert!(
            all.len() <= after_one.len() + 7 * 2,
            "{} {}",
            all.len(),
            after_one.len()
        );
        assert!(bytes(&all) <= bytes(&after_one) + 7 * 2 * crate::chunks::MAX_CHUNK as u64);
        assert_eq!(store.usage(), 8 * (16 << 20));
        let dir = store.materialize(&id("c8")).await.unwrap();
        assert_eq!(fs::read(dir.join("pages-1.img")).unwrap(), pages);
    }

    #[tokio::test]
    async fn the_sweep_removes_exactly_the_unreferenced_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let shared = noise(1 << 20, 1);
        let a = put_v2(&store, "a", &[("s", &shared), ("x", &noise(500_000, 2))]).await;
        let b = put_v2(&store, "b", &[("s", &shared), ("y", &noise(500_000, 3))]).await;
        let live = |ms: &[&Manifest]| -> BTreeSet<ChunkId> {
            ms.iter().flat_map(|m| m.chunk_set().into_keys()).collect()
        };
        assert_eq!(stored_chunks(&store), live(&[&a, &b]));
        assert_eq!(store.collect_garbage().await.unwrap().removed, 0);
        // delete sweeps.
        store.delete(&id("a")).await.unwrap();
        assert_eq!(stored_chunks(&store), live(&[&b]));
        // A chunk nobody names (a crashed commit) goes at the next sweep.
        let orphan = ChunkId::of(b"orphan");
        store.chunks().backend().put(&orphan, b"orphan").unwrap();
        store.chunks().backend().sync(&[orphan]).unwrap();
        assert_eq!(store.collect_garbage().await.unwrap().removed, 1);
        assert_eq!(stored_chunks(&store), live(&[&b]));
        store.delete(&id("b")).await.unwrap();
        assert!(stored_chunks(&store).is_empty());
        // An unreadable manifest stops the sweep: its chunks might be needed.
        let c = put_v2(&store, "c", &[("s", &shared)]).await;
        fs::write(tmp.path().join("images/c/manifest.json"), b"garbage").unwrap();
        let orphan = ChunkId::of(b"orphan");
        store.chunks().backend().put(&orphan, b"orphan").unwrap();
        store.chunks().backend().sync(&[orphan]).unwrap();
        assert!(store.collect_garbage().await.is_err());
        assert!(live(&[&c]).is_subset(&stored_chunks(&store)));
    }

    #[tokio::test]
    async fn the_sweep_never_removes_a_chunk_a_write_in_progress_counts_on() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let data = noise(3 << 20, 4);
        let old = put_v2(&store, "old", &[("pages", &data)]).await;
        // A fetch in progress: it pinned the chunks it counts on (present or arrived).
        let s = store.stage(&id("new")).await.unwrap();
        for c in old.chunk_set().keys() {
            s.pins().pin(c);
        }
        let arrived = ChunkId::of(b"arrived");
        s.pins().pin(&arrived);
        store.chunks().backend().put(&arrived, b"arrived").unwrap();
        store.chunks().backend().sync(&[arrived]).unwrap();
        // The old image goes; its chunks stay, pinned.
        store.delete(&id("old")).await.unwrap();
        assert!(stored_chunks(&store).contains(&arrived));
        assert!(old
            .chunk_set()
            .keys()
            .all(|c| stored_chunks(&store).contains(c)));
        drop(s);
        store.collect_garbage().await.unwrap();
        assert!(stored_chunks(&store).is_empty());

        // Commits and sweeps racing: every committed image stays whole.
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..6 {
                    let mut d = noise(2 << 20, 5);
                    d[i * 1000] ^= 1;
                    let s = store.stage(&id(&format!("w{i}"))).await.unwrap();
                    fs::write(s.dir.join("pages"), &d).unwrap();
                    s.commit(meta("j")).await.unwrap();
                    if i % 2 == 0 {
                        store.delete(&id(&format!("w{i}"))).await.unwrap();
                    }
                }
            })
        };
        let sweeper = {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..30 {
                    store.collect_garbage().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        writer.await.unwrap();
        sweeper.await.unwrap();
        for i in [1, 3, 5] {
            store.verify(&id(&format!("w{i}"))).await.unwrap();
        }
        store.collect_garbage().await.unwrap();
        let live: BTreeSet<ChunkId> = [1, 3, 5]
            .iter()
            .flat_map(|i| {
                let dir = tmp.path().join(format!("images/w{i}/manifest.json"));
                Manifest::parse(&fs::read(dir).unwrap())
                    .unwrap()
                    .chunk_set()
                    .into_keys()
            })
            .collect();
        assert_eq!(stored_chunks(&store), live);
    }

    #[tokio::test]
    async fn an_old_store_with_whole_file_images_is_read_and_still_writes_them_on_request() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open_with(tmp.path(), None, true).unwrap();
        let s = store.stage(&id("old")).await.unwrap();
        fs::write(s.dir.join("f"), b"whole").unwrap();
        let m = s.commit(meta("j")).await.unwrap();
        assert_eq!((m.format, m.is_chunked()), (1, false));
        assert_eq!(fs::read(tmp.path().join("images/old/f")).unwrap(), b"whole");
        drop(store);
        let store = ImageStore::open(tmp.path(), None).unwrap();
        put_v2(&store, "new", &[("f", b"whole")]).await;
        assert_eq!(store.verify(&id("old")).await.unwrap().format, 1);
        assert_eq!(
            store.materialize(&id("old")).await.unwrap(),
            tmp.path().join("images/old")
        );
        let d = store.materialize(&id("new")).await.unwrap();
        assert_eq!(fs::read(d.join("f")).unwrap(), b"whole");
        // The sweep leaves the old image's files alone (it names no chunk).
        store.collect_garbage().await.unwrap();
        assert_eq!(fs::read(tmp.path().join("images/old/f")).unwrap(), b"whole");
        store.delete(&id("new")).await.unwrap();
        assert!(!d.exists(), "the restore copy goes with the image");
        assert!(stored_chunks(&store).is_empty());
    }
}
