//! Exporting an image into its owner's directory: the "keep" of a job's retention policy
//! (`POST /images/{id}/export`, called by the GCS when a job with `keep = last | all` ends).
//!
//! The CTS runs as root and the directory is named by the job's owner, who may be hostile, so
//! everything happens through directory descriptors:
//!
//! 1. The image is opened in the store (a directory descriptor: a concurrent delete cannot
//!    swap it), its `manifest.json` read and parsed; the owner is the manifest's
//!    [`OWNER_UID_KEY`] / [`OWNER_GID_KEY`] (recorded by the CTS that took the image, and kept
//!    by a fetch since the manifest is digest-checked).
//! 2. The owner's directory is opened with `O_DIRECTORY | O_NOFOLLOW` (no symbolic link as its
//!    last component) and must belong to the owner's UID.
//! 3. The image is copied into `DIR/.ID.partial-RANDOM` with `mkdirat` / `openat(O_CREAT |
//!    O_EXCL | O_NOFOLLOW)` relative to descriptors only: directories 0700, files 0600, all
//!    `fchown`ed to the owner before any data is written (so the owner's quota pays). Every
//!    file is hashed while it is copied and checked against the manifest; `manifest.json` is
//!    written byte for byte, so the exported image has the stored image's digest. Everything
//!    is fsynced, then the copy is renamed to `DIR/ID` (`renameat2(RENAME_NOREPLACE)`).
//! 4. Any failure removes the partial copy (again through descriptors).
//!
//! Idempotence, for a caller that retries after a lost answer: a `DIR/ID` whose
//! `manifest.json` has the expected digest is a finished export (`already: true`), and an
//! image no longer in the store whose export is in place with the digest the caller gives is
//! one too (`already: true, removed: true`).
//!
//! Concurrency: readers of the store take no lock (see [`crate::store`]); an image deleted
//! while it is exported makes the export fail as unknown, with nothing left behind. Two
//! exports of one image into one directory each write their own partial copy; the second
//! rename finds the first one's result and answers `already`. The removal after an export
//! (`remove: true`) is the store's own [`ImageStore::delete`].

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use gca_protocol::images::{ExportRequest, Exported};
use gca_protocol::messages::check_keep_in;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::manifest::{Manifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use crate::names::{ImageId, MAX_PATH_DEPTH};
use crate::store::{is_out_of_space, ImageStore};

/// The key of `meta.extra` holding the numeric UID of the job's owner.
pub const OWNER_UID_KEY: &str = "uid";
/// The key of `meta.extra` holding the numeric group ID of the job's owner (not to be
/// confused with the job's GID, `meta.gid`).
pub const OWNER_GID_KEY: &str = "gid";

const COPY_BUF: usize = 1 << 20;
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// How deep the removal of a partial copy goes (the copy itself is at most
/// [`MAX_PATH_DEPTH`] deep; anything deeper was put there by someone else).
const MAX_REMOVE_DEPTH: usize = MAX_PATH_DEPTH + 8;

// Why an export fails: the `Export*`, `NoOwner`, `DigestDiffers`, `Dir*`, `TargetExists` and
// `NoSpace` variants of [`Error`] (and `NotFound`). Nothing is left in the owner's directory
// in any of these cases (except, for [`Error::ExportFailed`] after the copy, the finished
// export itself: see its message).

/// Exports image `id` of `store` as `req` asks (see the module documentation).
pub async fn export_image(
    store: &ImageStore,
    id: &ImageId,
    req: &ExportRequest,
) -> Result<Exported, Error> {
    check_keep_in(&req.dir).map_err(|m| {
        Error::ExportInvalid(format!(
            "cannot export image {id}: bad directory {:?}: {m}",
            req.dir
        ))
    })?;
    let digest = req.digest.as_deref().map(normalize_digest).transpose()?;
    let dir = req.dir.trim_end_matches('/').to_string();
    let image_path = store.image_path(id);
    let job = Job {
        id: id.to_string(),
        dir,
        digest,
        store_root: store.root().to_path_buf(),
        store: store.clone(),
    };
    let mut exported = tokio::task::spawn_blocking(move || job.run(&image_path))
        .await
        .map_err(|e| Error::ExportFailed(format!("the export of image {id} failed: {e}")))??;
    if req.remove && !exported.removed {
        match store.delete(id).await {
            Ok(_) | Err(Error::NotFound(_)) => exported.removed = true,
            Err(e) => {
                return Err(Error::ExportFailed(format!(
                    "image {id} was exported to {}, but it could not be removed from the \
                     store: {e}; the export is complete, retry it to remove the image",
                    exported.path
                )))
            }
        }
    }
    Ok(exported)
}

/// `sha256:<64 hex>`, lower-cased.
fn normalize_digest(d: &str) -> Result<String, Error> {
    let d = d.trim().to_ascii_lowercase();
    let ok = d
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(d)
    } else {
        Err(Error::ExportInvalid(format!(
            "bad digest {d:?}: expected sha256: and 64 hexadecimal digits"
        )))
    }
}

/// One export, on a blocking thread.
struct Job {
    id: String,
    /// Without a trailing `/`.
    dir: String,
    digest: Option<String>,
    /// The store's root: no export goes in there.
    store_root: std::path::PathBuf,
    /// Where the chunks of a format 2 image are read from.
    store: ImageStore,
}

/// The owner an image is exported for.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

fn open_dir_at(at: BorrowedFd<'_>, path: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        at,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn open_file_at(at: BorrowedFd<'_>, path: &str) -> Result<File, Errno> {
    rustix::fs::openat(
        at,
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
}

fn read_manifest_at(at: BorrowedFd<'_>) -> Result<Vec<u8>, io::Error> {
    let f = open_file_at(at, MANIFEST_FILE)?;
    let mut buf = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

/// What `DIR/ID` holds already.
enum Target {
    Absent,
    /// An image directory with this `manifest.json`.
    Image(Vec<u8>),
    /// Something else (why).
    Other(String),
}

impl Job {
    fn target(&self) -> String {
        format!("{}/{}", self.dir, self.id)
    }

    /// An I/O error at `path`: [`Error::NoSpace`] for ENOSPC/EDQUOT, else
    /// [`Error::ExportFailed`] naming the path and the OS error.
    fn io_err(&self, what: &str, path: &str, e: impl Into<io::Error>) -> Error {
        let e: io::Error = e.into();
        if is_out_of_space(&e) {
            Error::NoSpace(format!(
                "no space left to export image {} into {}: {what} {path}: {e}; the partial \
                 copy was removed: free space (or quota) for the job's owner and retry",
                self.id, self.dir
            ))
        } else {
            Error::ExportFailed(format!(
                "cannot export image {} into {}: {what} {path}: {e}",
                self.id, self.dir
            ))
        }
    }

    fn run(&self, image_path: &std::path::Path) -> Result<Exported, Error> {
        let id = &self.id;
        // 1. The image, through one descriptor.
        let src = match rustix::fs::openat(
            rustix::fs::CWD,
            image_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return self.gone(),
            Err(e) => {
                return Err(self.io_err(
                    "opening the stored image",
                    &image_path.display().to_string(),
                    e,
                ))
            }
        };
        let bytes = match read_manifest_at(src.as_fd()) {
            Ok(b) => b,
            // Deleted since we opened it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.gone(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(Error::ExportCorrupt(format!(
                    "image {id} in the store: {e}"
                )))
            }
            Err(e) => {
                return Err(self.io_err(
                    "reading",
                    &image_path.join(MANIFEST_FILE).display().to_string(),
                    e,
                ))
            }
        };
        let manifest = Manifest::parse(&bytes)
            .map_err(|e| Error::ExportCorrupt(format!("image {id} in the store: {e}")))?;
        if manifest.id != id.as_str() {
            return Err(Error::ExportCorrupt(format!(
                "the manifest of image {id} in the store names image {}",
                manifest.id
            )));
        }
        let stored = Manifest::digest_of(&bytes);
        if let Some(want) = &self.digest {
            if *want != stored {
                return Err(Error::DigestDiffers(format!(
                    "image {id} in this store has digest {stored}, not {want}: refusing to \
                     export a different image"
                )));
            }
        }
        let owner = owner_of(&manifest)?;

        // 2. The owner's directory.
        let dir = self.open_owner_dir(owner)?;

        // Done before?
        match self.existing(dir.as_fd())? {
            Target::Absent => {}
            other => return self.finished(other, &stored, &manifest),
        }

        // 3. The copy.
        let partial = format!(".{id}.partial-{}", uuid::Uuid::new_v4().simple());
        rustix::fs::mkdirat(dir.as_fd(), partial.as_str(), Mode::from_raw_mode(DIR_MODE))
            .map_err(|e| self.io_err("creating", &format!("{}/{partial}", self.dir), e))?;
        let mut guard = Partial {
            dir: dir.as_fd(),
            name: &partial,
            owners: [owner.uid, rustix::process::geteuid().as_raw()],
            armed: true,
        };
        self.copy(src.as_fd(), dir.as_fd(), &partial, owner, &manifest, &bytes)?;
        match rustix::fs::renameat_with(
            dir.as_fd(),
            partial.as_str(),
            dir.as_fd(),
            id.as_str(),
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                // Another export of the same image won the race (or something else is
                // there): ours goes, theirs is judged like any existing target.
                drop(guard);
                let existing = self.existing(dir.as_fd())?;
                return self.finished(existing, &stored, &manifest);
            }
            // A file system without RENAME_NOREPLACE (NFS): check, then rename. A directory
            // created in between by the owner is the owner's race to lose (an empty one is
            // replaced, a full one makes the rename fail).
            Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::NOTSUP) => {
                match self.existing(dir.as_fd())? {
                    Target::Absent => {}
                    other => {
                        drop(guard);
                        return self.finished(other, &stored, &manifest);
                    }
                }
                rustix::fs::renameat(dir.as_fd(), partial.as_str(), dir.as_fd(), id.as_str())
                    .map_err(|e| self.io_err("renaming to", &self.target(), e))?;
            }
            Err(e) => return Err(self.io_err("renaming to", &self.target(), e)),
        }
        guard.armed = false;
        if let Err(e) = rustix::fs::fsync(dir.as_fd()) {
            tracing::warn!(dir = %self.dir, error = %e, "cannot fsync the export directory");
        }
        tracing::info!(image = %id, path = %self.target(), uid = owner.uid, gid = owner.gid,
            bytes = manifest.total_bytes, "image exported");
        Ok(self.exported(&manifest, false, false))
    }

    fn exported(&self, m: &Manifest, already: bool, removed: bool) -> Exported {
        Exported {
            id: self.id.clone(),
            path: self.target(),
            files: m.files.len(),
            bytes: m.total_bytes,
            already,
            removed,
        }
    }

    /// The answer when `DIR/ID` exists: done already if it has the expected digest.
    fn finished(
        &self,
        target: Target,
        expected: &str,
        manifest: &Manifest,
    ) -> Result<Exported, Error> {
        let target_path = self.target();
        match target {
            Target::Absent => Err(Error::ExportFailed(format!(
                "cannot export image {}: {target_path} appeared and disappeared during the \
                 export; retry",
                self.id
            ))),
            Target::Image(bytes) if Manifest::digest_of(&bytes) == expected => {
                Ok(self.exported(manifest, true, false))
            }
            Target::Image(bytes) => Err(Error::TargetExists(format!(
                "cannot export image {} (digest {expected}): {target_path} exists already with \
                 another image (digest {}); move it away or choose another directory",
                self.id,
                Manifest::digest_of(&bytes)
            ))),
            Target::Other(why) => Err(Error::TargetExists(format!(
                "cannot export image {}: {target_path} exists already and {why}; move it away \
                 or choose another directory",
                self.id
            ))),
        }
    }

    /// The image is not in the store: an export done before, with the digest the caller
    /// gives, is the answer; anything else is unknown.
    fn gone(&self) -> Result<Exported, Error> {
        let id = &self.id;
        let Some(want) = &self.digest else {
            return Err(Error::NotFound(format!(
                "no image {id} in this store (give its digest to confirm an earlier export \
                 to {})",
                self.target()
            )));
        };
        let unknown =
            |why: String| Error::NotFound(format!("no image {id} in this store, and {why}"));
        let dir = match open_dir_at(rustix::fs::CWD, &self.dir) {
            Ok(fd) => fd,
            Err(e) => {
                return Err(unknown(format!(
                    "directory {} cannot be opened: {}",
                    self.dir,
                    io::Error::from(e)
                )))
            }
        };
        match self.existing(dir.as_fd())? {
            Target::Image(bytes) if Manifest::digest_of(&bytes) == *want => {
                let m = Manifest::parse(&bytes).map_err(|e| {
                    Error::ExportCorrupt(format!("the export in {}: {e}", self.target()))
                })?;
                Ok(self.exported(&m, true, true))
            }
            Target::Image(bytes) => Err(unknown(format!(
                "{} holds another image (digest {}, not {want})",
                self.target(),
                Manifest::digest_of(&bytes)
            ))),
            Target::Absent => Err(unknown(format!("{} does not exist", self.target()))),
            Target::Other(why) => Err(unknown(format!("{} {why}", self.target()))),
        }
    }

    /// Opens `DIR` without following a symbolic link at its end and checks it belongs to
    /// the owner.
    fn open_owner_dir(&self, owner: Owner) -> Result<OwnedFd, Error> {
        let (id, dir) = (&self.id, &self.dir);
        let fd = match open_dir_at(rustix::fs::CWD, dir) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                return Err(Error::DirMissing(format!(
                    "cannot export image {id}: directory {dir} does not exist; the job's owner \
                     (uid {}) must create it first (mkdir -p {dir}) and own it",
                    owner.uid
                )))
            }
            // With O_DIRECTORY, Linux reports a symbolic link as ENOTDIR (ELOOP without):
            // look again, only to say which.
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                let is_link = rustix::fs::statat(rustix::fs::CWD, dir, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                return Err(Error::DirRefused(if is_link {
                    format!(
                        "cannot export image {id} into {dir}: it is a symbolic link; name the \
                         directory it points to"
                    )
                } else {
                    format!(
                        "cannot export image {id} into {dir}: it (or one of its parents) is \
                         not a directory"
                    )
                }));
            }
            Err(e) => return Err(self.io_err("opening", dir, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io_err("reading", dir, e))?;
        if self.inside_store(&st) {
            return Err(Error::DirRefused(format!(
                "cannot export image {id} into {dir}: it is inside the CTS's image store {}",
                self.store_root.display()
            )));
        }
        if st.st_uid != owner.uid {
            return Err(Error::DirRefused(format!(
                "cannot export image {id} into {dir}: the directory belongs to uid {}, not to \
                 the job's owner uid {}",
                st.st_uid, owner.uid
            )));
        }
        Ok(fd)
    }

    /// Whether the opened directory (`st`) is the store's root or one of its directories, or
    /// `DIR` names a path inside the store: an export there would pass for the image itself
    /// (and `remove` would then delete the only copy).
    fn inside_store(&self, st: &rustix::fs::Stat) -> bool {
        let root = std::fs::canonicalize(&self.store_root).unwrap_or(self.store_root.clone());
        if std::path::Path::new(&self.dir).starts_with(&root)
            || std::path::Path::new(&self.dir).starts_with(&self.store_root)
        {
            return true;
        }
        ["", "images", "staging"].iter().any(|sub| {
            rustix::fs::stat(root.join(sub))
                .is_ok_and(|s| s.st_dev == st.st_dev && s.st_ino == st.st_ino)
        })
    }

    /// What `DIR/ID` is, looked at through `dir` without following links.
    fn existing(&self, dir: BorrowedFd<'_>) -> Result<Target, Error> {
        let target = self.target();
        let st = match rustix::fs::statat(dir, self.id.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Target::Absent),
            Err(e) => return Err(self.io_err("reading", &target, e)),
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(Target::Other("is not a directory".into()));
        }
        let fd = match open_dir_at(dir, &self.id) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Target::Absent),
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Ok(Target::Other("is not a directory".into()))
            }
            Err(e) => return Err(self.io_err("opening", &target, e)),
        };
        match read_manifest_at(fd.as_fd()) {
            Ok(bytes) => Ok(Target::Image(bytes)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) || Errno::from_io_error(&e) == Some(Errno::LOOP) =>
            {
                Ok(Target::Other(format!(
                    "has no readable {MANIFEST_FILE} ({e})"
                )))
            }
            Err(e) => Err(self.io_err("reading", &format!("{target}/{MANIFEST_FILE}"), e)),
        }
    }

    /// Copies one stored file of a format 1 image into `out`, checking its size and SHA-256.
    fn copy_whole_file(
        &self,
        src: BorrowedFd<'_>,
        entry: &crate::manifest::FileEntry,
        out: &mut File,
        buf: &mut [u8],
        shown: &dyn Fn(&str) -> String,
    ) -> Result<(), Error> {
        let id = &self.id;
        let mut input = match open_file_at(src, &entry.path) {
            Ok(f) => f,
            Err(Errno::NOENT) => {
                return Err(Error::NotFound(format!(
                    "image {id} was deleted from this store during its export (file {} is \
                     gone); nothing was exported",
                    entry.path
                )))
            }
            Err(e) => {
                return Err(self.io_err(
                    "opening the stored file",
                    &format!("{id}/{}", entry.path),
                    e,
                ))
            }
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = match input.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.io_err(
                        "reading the stored file",
                        &format!("{id}/{}", entry.path),
                        e,
                    ))
                }
            };
            hasher.update(&buf[..n]);
            size += n as u64;
            if size > entry.size {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| self.io_err("writing", &shown(&entry.path), e))?;
        }
        let sha = hex::encode(hasher.finalize());
        if size != entry.size || Some(&sha) != entry.sha256.as_ref() {
            let what = if size != entry.size {
                format!(
                    "has {}{size} bytes, its manifest says {}",
                    if size > entry.size { "more than " } else { "" },
                    entry.size
                )
            } else {
                format!(
                    "has sha256 {sha}, its manifest says {}",
                    entry.sha256.as_deref().unwrap_or("-")
                )
            };
            return Err(Error::ExportCorrupt(format!(
                "image {id} in this store is corrupt: file {} {what}; nothing was exported",
                entry.path
            )));
        }
        Ok(())
    }

    /// Copies the image's files and manifest into `DIR/partial`, owned by `owner`, checking
    /// every file against the manifest; fsyncs everything.
    fn copy(
        &self,
        src: BorrowedFd<'_>,
        dir: BorrowedFd<'_>,
        partial: &str,
        owner: Owner,
        manifest: &Manifest,
        manifest_bytes: &[u8],
    ) -> Result<(), Error> {
        let id = &self.id;
        let shown = |rel: &str| {
            if rel.is_empty() {
                format!("{}/{partial}", self.dir)
            } else {
                format!("{}/{partial}/{rel}", self.dir)
            }
        };
        let root = open_dir_at(dir, partial).map_err(|e| self.io_err("opening", &shown(""), e))?;
        set_owner(&root, owner, DIR_MODE)
            .map_err(|e| self.io_err("setting owner of", &shown(""), e))?;
        // Directories created so far, by path inside the image ("" is the copy's root).
        let mut dirs: BTreeMap<String, OwnedFd> = BTreeMap::new();
        dirs.insert(String::new(), root);
        let mut buf = vec![0u8; COPY_BUF];
        for entry in &manifest.files {
            // Paths were validated by Manifest::parse: relative, no `.`/`..`, no empty parts.
            let (parent, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
            self.make_dirs(&mut dirs, parent, owner, &shown)?;
            let parent_fd = dirs.get(parent).expect("created above").as_fd();

            let out = rustix::fs::openat(
                parent_fd,
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(FILE_MODE),
            )
            .map_err(|e| self.io_err("creating", &shown(&entry.path), e))?;
            set_owner(&out, owner, FILE_MODE)
                .map_err(|e| self.io_err("setting owner of", &shown(&entry.path), e))?;
            let mut out = File::from(out);
            if manifest.is_chunked() {
                // Whole, readable files from the chunks, each checked as it is read; pinned
                // so that the GC leaves them while the export runs.
                let pins = self.store.chunks().pin_set();
                for c in &entry.chunks {
                    pins.pin(&c.id);
                    let data = self
                        .store
                        .read_chunk(id, &entry.path, c)
                        .map_err(|e| match e {
                            Error::ChunkCorrupt { .. } => {
                                Error::ExportCorrupt(format!("{e}; nothing was exported"))
                            }
                            other => other,
                        })?;
                    out.write_all(&data)
                        .map_err(|e| self.io_err("writing", &shown(&entry.path), e))?;
                }
            } else {
                self.copy_whole_file(src, entry, &mut out, &mut buf, &shown)?;
            }
            out.sync_all()
                .map_err(|e| self.io_err("syncing", &shown(&entry.path), e))?;
        }
        // The manifest, byte for byte: the export has the stored image's digest.
        let root = dirs.get("").expect("the root").as_fd();
        let out = rustix::fs::openat(
            root,
            MANIFEST_FILE,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| self.io_err("creating", &shown(MANIFEST_FILE), e))?;
        set_owner(&out, owner, FILE_MODE)
            .map_err(|e| self.io_err("setting owner of", &shown(MANIFEST_FILE), e))?;
        let mut out = File::from(out);
        out.write_all(manifest_bytes)
            .and_then(|()| out.sync_all())
            .map_err(|e| self.io_err("writing", &shown(MANIFEST_FILE), e))?;
        for (rel, fd) in &dirs {
            rustix::fs::fsync(fd).map_err(|e| self.io_err("syncing", &shown(rel), e))?;
        }
        Ok(())
    }

    /// Creates the directories of `rel` (inside the copy) that do not exist yet, 0700,
    /// owned by `owner`, and keeps a descriptor for each.
    fn make_dirs(
        &self,
        dirs: &mut BTreeMap<String, OwnedFd>,
        rel: &str,
        owner: Owner,
        shown: &dyn Fn(&str) -> String,
    ) -> Result<(), Error> {
        if dirs.contains_key(rel) {
            return Ok(());
        }
        let mut prefix = String::new();
        for part in rel.split('/') {
            let parent = prefix.clone();
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if dirs.contains_key(&prefix) {
                continue;
            }
            let parent_fd = dirs.get(&parent).expect("parents first").as_fd();
            rustix::fs::mkdirat(parent_fd, part, Mode::from_raw_mode(DIR_MODE))
                .map_err(|e| self.io_err("creating", &shown(&prefix), e))?;
            let fd = open_dir_at(parent_fd, part)
                .map_err(|e| self.io_err("opening", &shown(&prefix), e))?;
            set_owner(&fd, owner, DIR_MODE)
                .map_err(|e| self.io_err("setting owner of", &shown(&prefix), e))?;
            dirs.insert(prefix.clone(), fd);
        }
        Ok(())
    }
}

/// The owner recorded in an image's manifest.
fn owner_of(m: &Manifest) -> Result<Owner, Error> {
    let get = |key: &str| {
        m.meta
            .extra
            .get(key)
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    match (get(OWNER_UID_KEY), get(OWNER_GID_KEY)) {
        (Some(uid), Some(gid)) => Ok(Owner { uid, gid }),
        _ => Err(Error::NoOwner(format!(
            "image {} does not name its owner (its manifest has no numeric meta.extra.{} and \
             {}; it was taken by a CTS that did not record them): it cannot be exported to an \
             owner's directory; copy it by hand (GET /images/{}) if it must be kept",
            m.id, OWNER_UID_KEY, OWNER_GID_KEY, m.id
        ))),
    }
}

/// `fchown` to the owner (when not theirs already) and `fchmod` to `mode` (exactly, whatever
/// the umask).
fn set_owner(fd: &OwnedFd, owner: Owner, mode: u32) -> Result<(), Errno> {
    let st = rustix::fs::fstat(fd)?;
    if st.st_uid != owner.uid || st.st_gid != owner.gid {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(owner.uid)),
            Some(rustix::fs::Gid::from_raw(owner.gid)),
        )?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
}

/// A partial copy in the owner's directory, removed on drop unless disarmed.
struct Partial<'a> {
    dir: BorrowedFd<'a>,
    name: &'a str,
    /// Whose entries may be removed (the owner's, and ours before the `fchown`).
    owners: [u32; 2],
    armed: bool,
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if self.armed {
            let removed = CString::new(self.name)
                .map_err(io::Error::other)
                .and_then(|name| remove_tree_at(self.dir, &name, &self.owners, 0));
            if let Err(e) = removed {
                tracing::warn!(partial = self.name, error = %e,
                    "cannot remove a partial export; its owner can delete it");
            }
        }
    }
}

/// Removes `name` in `dir` (a file, or a directory and everything in it) through
/// descriptors, never following a symbolic link, and only entries that belong to one of
/// `owners` (what the export created): whatever else the directory's owner put there stays.
fn remove_tree_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    owners: &[u32],
    depth: usize,
) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !owners.contains(&st.st_uid) {
        return Err(io::Error::other(format!(
            "{name:?} belongs to uid {}, not to the export",
            st.st_uid
        )));
    }
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into);
    }
    if depth > MAX_REMOVE_DEPTH {
        return Err(io::Error::other(format!(
            "{name:?} is nested deeper than {MAX_REMOVE_DEPTH} levels"
        )));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let n = entry.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            names.push(n.to_owned());
        }
    }
    // Remove all that can be removed; report the first thing that could not.
    let mut first_error = None;
    for n in names {
        if let Err(e) = remove_tree_at(fd.as_fd(), &n, owners, depth + 1) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use chrono::Utc;

    use super::*;
    use crate::manifest::ImageMeta;
    use crate::store::tests::{id, rel};
    use gca_protocol::Fault;

    const UID: u32 = 4321;
    const GID: u32 = 4322;

    fn require_root() {
        assert!(
            rustix::process::geteuid().is_root(),
            "the export tests need root (the CTS exports as root and chowns to the owner)"
        );
    }

    fn meta(owner: Option<(u32, u32)>) -> ImageMeta {
        let mut extra = BTreeMap::from([("pid".to_string(), "77".to_string())]);
        if let Some((u, g)) = owner {
            extra.insert(OWNER_UID_KEY.into(), u.to_string());
            extra.insert(OWNER_GID_KEY.into(), g.to_string());
        }
        ImageMeta {
            gid: "job-1".into(),
            created_at: Utc::now(),
            driver: "test".into(),
            origin: "cts-a".into(),
            extra,
        }
    }

    const FILES: &[(&str, &[u8])] = &[
        ("pages-1.img", b"some pages"),
        ("sub/dir/core-7.img", b"core"),
        ("sub/empty.img", b""),
    ];

    async fn put(store: &ImageStore, id: &str, owner: Option<(u32, u32)>) -> Manifest {
        let s = store.stage(&self::id(id)).await.unwrap();
        for (p, data) in FILES {
            let path = s.dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        s.commit_whole_files(meta(owner)).await.unwrap()
    }

    struct Setup {
        tmp: tempfile::TempDir,
        store: ImageStore,
        /// The owner's directory, owned by UID.
        keep: PathBuf,
    }

    async fn setup() -> Setup {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("store"), None).unwrap();
        put(&store, "img-1", Some((UID, GID))).await;
        let keep = tmp.path().join("home/alice/ckpt");
        fs::create_dir_all(&keep).unwrap();
        chown(&keep, UID);
        Setup { tmp, store, keep }
    }

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::chown(p, Some(uid), None).unwrap();
    }

    fn req(dir: &Path) -> ExportRequest {
        ExportRequest {
            dir: dir.display().to_string(),
            digest: None,
            remove: false,
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn status_and_message(e: Error) -> (u16, String) {
        (e.http_status(), e.to_string())
    }

    #[tokio::test]
    async fn a_chunked_image_is_exported_as_whole_readable_files() {
        let s = setup().await;
        let st = s.store.stage(&id("img-c")).await.unwrap();
        for (p, data) in FILES {
            let path = st.dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(st.dir.join("big.img"), &big).unwrap();
        let m = st.commit(meta(Some((UID, GID)))).await.unwrap();
        assert!(m.is_chunked());
        let done = export_image(&s.store, &id("img-c"), &req(&s.keep))
            .await
            .unwrap();
        let target = s.keep.join("img-c");
        for (p, data) in FILES {
            assert_eq!(fs::read(target.join(p)).unwrap(), *data, "{p}");
        }
        assert_eq!(fs::read(target.join("big.img")).unwrap(), big);
        assert_eq!(done.bytes, 14 + big.len() as u64);
        assert_eq!(
            Manifest::digest_of(&fs::read(target.join(MANIFEST_FILE)).unwrap()),
            s.store.digest(&id("img-c")).await.unwrap()
        );
        let m = fs::symlink_metadata(target.join("big.img")).unwrap();
        assert_eq!((m.uid(), m.permissions().mode() & 0o7777), (UID, 0o600));

        // A flipped byte in a chunk: nothing exported, the chunk named.
        let c = m_chunk(&s, "img-c", "big.img");
        crate::local_chunks::flip_byte(
            &s.tmp.path().join("store/chunks"),
            &crate::chunks::ChunkId::parse(&c).unwrap(),
            0,
        );
        let other = s.tmp.path().join("home/alice/other");
        fs::create_dir_all(&other).unwrap();
        chown(&other, UID);
        let e = export_image(&s.store, &id("img-c"), &req(&other))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ExportCorrupt(_)), "{e:?}");
        assert!(e.to_string().contains(&c), "{e}");
        assert_eq!(e.http_status(), 500);
        assert!(entries(&other).is_empty());
    }

    fn m_chunk(s: &Setup, image: &str, file: &str) -> String {
        let bytes = fs::read(
            s.tmp
                .path()
                .join("store/images")
                .join(image)
                .join(MANIFEST_FILE),
        )
        .unwrap();
        let m = Manifest::parse(&bytes).unwrap();
        m.files.iter().find(|f| f.path == file).unwrap().chunks[2]
            .id
            .to_hex()
    }

    #[tokio::test]
    async fn exports_a_copy_owned_by_the_owner_with_the_same_digest() {
        let s = setup().await;
        let stored = s.store.manifest_bytes(&id("img-1")).await.unwrap();
        let done = export_image(&s.store, &id("img-1"), &req(&s.keep))
            .await
            .unwrap();
        let target = s.keep.join("img-1");
        assert_eq!(
            done,
            Exported {
                id: "img-1".into(),
                path: target.display().to_string(),
                files: 3,
                bytes: 14,
                already: false,
                removed: false,
            }
        );
        assert_eq!(entries(&s.keep), ["img-1"], "no partial copy left");
        for (p, data) in FILES {
            assert_eq!(fs::read(target.join(p)).unwrap(), *data, "{p}");
        }
        let exported = fs::read(target.join(MANIFEST_FILE)).unwrap();
        assert_eq!(exported, stored, "manifest.json is byte-identical");
        assert_eq!(
            Manifest::digest_of(&exported),
            s.store.digest(&id("img-1")).await.unwrap()
        );
        // Everything belongs to the owner: directories 0700, files 0600.
        for rel in ["", "sub", "sub/dir"] {
            let m = fs::symlink_metadata(target.join(rel)).unwrap();
            assert!(m.is_dir());
            assert_eq!((m.uid(), m.gid()), (UID, GID), "{rel:?}");
            assert_eq!(m.permissions().mode() & 0o7777, 0o700, "{rel:?}");
        }
        for rel in [
            "pages-1.img",
            "sub/dir/core-7.img",
            "sub/empty.img",
            MANIFEST_FILE,
        ] {
            let m = fs::symlink_metadata(target.join(rel)).unwrap();
            assert!(m.is_file());
            assert_eq!((m.uid(), m.gid()), (UID, GID), "{rel}");
            assert_eq!(m.permissions().mode() & 0o7777, 0o600, "{rel}");
        }
        // Only the files the manifest lists.
        assert_eq!(entries(&target), [MANIFEST_FILE, "pages-1.img", "sub"]);
        // The store keeps the image (no `remove`).
        s.store.verify(&id("img-1")).await.unwrap();

        // A trailing slash names the same directory.
        let mut again = req(&s.keep);
        again.dir.push('/');
        let done = export_image(&s.store, &id("img-1"), &again).await.unwrap();
        assert!(done.already);
        assert_eq!(done.path, target.display().to_string());
    }

    #[tokio::test]
    async fn a_second_call_is_already_done_and_a_different_target_is_refused() {
        let s = setup().await;
        let digest = s.store.digest(&id("img-1")).await.unwrap();
        let first = export_image(&s.store, &id("img-1"), &req(&s.keep))
            .await
            .unwrap();
        assert!(!first.already);
        let mtime = fs::metadata(s.keep.join("img-1/pages-1.img"))
            .unwrap()
            .modified()
            .unwrap();
        for d in [
            None,
            Some(digest.clone()),
            Some(digest.to_uppercase().replace("SHA256", "sha256")),
        ] {
            let mut r = req(&s.keep);
            r.digest = d;
            let again = export_image(&s.store, &id("img-1"), &r).await.unwrap();
            assert!(again.already, "{again:?}");
            assert!(!again.removed);
            assert_eq!((again.files, again.bytes), (first.files, first.bytes));
        }
        assert_eq!(
            fs::metadata(s.keep.join("img-1/pages-1.img"))
                .unwrap()
                .modified()
                .unwrap(),
            mtime,
            "nothing was copied again"
        );
        assert_eq!(entries(&s.keep), ["img-1"]);

        // Another image under that name: refused, and left alone.
        put(&s.store, "img-2", Some((UID, GID))).await;
        let other = s.keep.join("img-2");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(MANIFEST_FILE), b"{\"not\": \"this image\"}\n").unwrap();
        let (status, msg) = status_and_message(
            export_image(&s.store, &id("img-2"), &req(&s.keep))
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 409, "{msg}");
        assert!(msg.contains("exists already with another image"), "{msg}");
        assert!(msg.contains(&other.display().to_string()), "{msg}");
        assert_eq!(
            fs::read(other.join(MANIFEST_FILE)).unwrap(),
            b"{\"not\": \"this image\"}\n"
        );
        // A file, or a directory without a manifest: refused too.
        fs::remove_dir_all(&other).unwrap();
        fs::write(&other, b"x").unwrap();
        let e = export_image(&s.store, &id("img-2"), &req(&s.keep))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TargetExists(_)), "{e}");
        assert!(e.to_string().contains("is not a directory"), "{e}");
        fs::remove_file(&other).unwrap();
        fs::create_dir(&other).unwrap();
        let e = export_image(&s.store, &id("img-2"), &req(&s.keep))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::TargetExists(_)), "{e}");
        assert!(
            e.to_string().contains("has no readable manifest.json"),
            "{e}"
        );
        assert_eq!(entries(&s.keep), ["img-1", "img-2"]);
        assert!(entries(&other).is_empty());
    }

    #[tokio::test]
    async fn a_directory_of_another_user_is_refused() {
        let s = setup().await;
        chown(&s.keep, 65534);
        let e = export_image(&s.store, &id("img-1"), &req(&s.keep))
            .await
            .unwrap_err();
        let (status, msg) = status_and_message(e);
        assert_eq!(status, 403);
        assert_eq!(
            msg,
            format!(
                "cannot export image img-1 into {}: the directory belongs to uid 65534, not to \
                 the job's owner uid {UID}",
                s.keep.display()
            )
        );
        assert!(entries(&s.keep).is_empty());
        // Root's own directory is no exception.
        chown(&s.keep, 0);
        let e = export_image(&s.store, &id("img-1"), &req(&s.keep))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("belongs to uid 0, not"), "{e}");
        assert!(entries(&s.keep).is_empty());
    }

    #[tokio::test]
    async fn a_symbolic_link_or_a_file_is_refused() {
        let s = setup().await;
        // A link the owner made to a directory of theirs (or anybody's).
        let link = s.tmp.path().join("home/alice/link");
        std::os::unix::fs::symlink(&s.keep, &link).unwrap();
        let (status, msg) = status_and_message(
            export_image(&s.store, &id("img-1"), &req(&link))
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 403, "{msg}");
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(msg.contains(&link.display().to_string()), "{msg}");
        assert!(entries(&s.keep).is_empty());

        let file = s.tmp.path().join("home/alice/file");
        fs::write(&file, b"x").unwrap();
        chown(&file, UID);
        let (status, msg) = status_and_message(
            export_image(&s.store, &id("img-1"), &req(&file))
                .await
                .unwrap_err(),
        );
        assert_eq!(status, 403, "{msg}");
        assert!(msg.contains("not a directory"), "{msg}");
    }

    #[tokio::test]
    async fn the_store_itself_is_refused() {
        let s = setup().await;
        let root = s.store.root().to_path_buf();
        // A job of root's naming the store (owned by root, like the image's owner here).
        put(&s.store, "root-img", Some((0, 0))).await;
        let link = s.tmp.path().join("to-store");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        for dir in [
            root.clone(),
            root.join("images"),
            root.join("staging"),
            root.join("images/img-1"),
        ] {
            let mut r = req(&dir);
            r.remove = true;
            let e = export_image(&s.store, &id("root-img"), &r)
                .await
                .unwrap_err();
            assert!(matches!(e, Error::DirRefused(_)), "{}: {e}", dir.display());
            assert!(
                e.to_string().contains("inside the CTS's image store"),
                "{e}"
            );
        }
        // Through a parent that is a link to it: the same directory, refused too.
        let e = export_image(&s.store, &id("root-img"), &req(&link.join("images")))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("inside the CTS's image store"),
            "{e}"
        );
        s.store.verify(&id("root-img")).await.unwrap();
        s.store.verify(&id("img-1")).await.unwrap();
    }

    #[test]
    fn removing_a_partial_copy_leaves_what_others_own() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join(".img.partial-x");
        fs::create_dir_all(top.join("mine/sub")).unwrap();
        fs::write(top.join("mine/sub/f"), b"x").unwrap();
        fs::create_dir(top.join("theirs")).unwrap();
        fs::write(top.join("theirs/g"), b"y").unwrap();
        chown(&top.join("theirs"), 65534);
        std::os::unix::fs::symlink("/etc", top.join("link")).unwrap();
        let dir = rustix::fs::open(
            tmp.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let name = CString::new(".img.partial-x").unwrap();
        let e = remove_tree_at(dir.as_fd(), &name, &[0], 0).unwrap_err();
        assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        assert!(top.join("theirs/g").exists());
        assert!(!top.join("mine").exists());
        assert!(!top.join("link").exists(), "the link itself is removed");
        assert!(Path::new("/etc/passwd").exists(), "not what it points to");
        chown(&top.join("theirs"), 0);
        remove_tree_at(dir.as_fd(), &name, &[0], 0).unwrap();
        assert!(!top.exists());
    }

    #[tokio::test]
    async fn bad_requests_are_refused_before_touching_the_disk() {
        let s = setup().await;
        let keep = s.keep.display().to_string();
        for dir in [
            "relative/dir".to_string(),
            format!("{keep}/../ckpt"),
            format!("{keep}/./x"),
            format!("{keep}//x"),
            "/".to_string(),
            String::new(),
        ] {
            let r = ExportRequest {
                dir: dir.clone(),
                digest: None,
                remove: true,
            };
            let e = export_image(&s.store, &id("img-1"), &r).await.unwrap_err();
            assert!(matches!(e, Error::ExportInvalid(_)), "{dir:?}: {e}");
            assert_eq!(e.http_status(), 400);
            assert!(e.to_string().contains("bad directory"), "{e}");
        }
        let mut r = req(&s.keep);
        r.digest = Some("md5:abc".into());
        let e = export_image(&s.store, &id("img-1"), &r).await.unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        // An escaping image ID cannot be named (the endpoint answers 400 invalid-export:
        // `http::tests::export_answers_with_statuses_and_json_errors`).
        let e = ImageId::parse("../img-1").unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
        assert!(entries(&s.keep).is_empty());
        s.store.verify(&id("img-1")).await.unwrap();
    }

    #[tokio::test]
    async fn a_different_digest_an_unknown_owner_or_a_missing_directory_is_a_conflict() {
        let s = setup().await;
        let mut r = req(&s.keep);
        r.digest = Some(format!("sha256:{}", "0".repeat(64)));
        r.remove = true;
        let e = export_image(&s.store, &id("img-1"), &r).await.unwrap_err();
        assert!(matches!(e, Error::DigestDiffers(_)), "{e}");
        assert_eq!(e.http_status(), 409);
        assert!(e
            .to_string()
            .contains(&s.store.digest(&id("img-1")).await.unwrap()));
        assert!(entries(&s.keep).is_empty());
        s.store.verify(&id("img-1")).await.unwrap();

        put(&s.store, "no-owner", None).await;
        let e = export_image(&s.store, &id("no-owner"), &req(&s.keep))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoOwner(_)), "{e}");
        assert_eq!(e.http_status(), 409);
        assert!(e.to_string().contains("does not name its owner"), "{e}");
        assert!(entries(&s.keep).is_empty());

        let missing = s.keep.join("not-yet");
        let e = export_image(&s.store, &id("img-1"), &req(&missing))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::DirMissing(_)), "{e}");
        assert_eq!(e.http_status(), 409);
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(e.to_string().contains("create it first"), "{e}");
        assert!(!missing.exists());

        let e = export_image(&s.store, &id("nope"), &req(&s.keep))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!(e.http_status(), 404);
    }

    #[tokio::test]
    async fn remove_deletes_from_the_store_and_a_retry_is_already_done() {
        let s = setup().await;
        let digest = s.store.digest(&id("img-1")).await.unwrap();
        let used = s.store.usage();
        let mut r = req(&s.keep);
        r.digest = Some(digest.clone());
        r.remove = true;
        let done = export_image(&s.store, &id("img-1"), &r).await.unwrap();
        assert!(!done.already);
        assert!(done.removed);
        assert!(matches!(
            s.store.manifest(&id("img-1")).await,
            Err(Error::NotFound(_))
        ));
        assert_eq!(s.store.usage(), used - 14);
        assert_eq!(
            Manifest::digest_of(&fs::read(s.keep.join("img-1").join(MANIFEST_FILE)).unwrap()),
            digest
        );

        // The answer was lost; the GCS asks again: done already.
        let again = export_image(&s.store, &id("img-1"), &r).await.unwrap();
        assert_eq!(
            again,
            Exported {
                already: true,
                ..done.clone()
            }
        );
        // Without `remove` too: the image is gone from the store either way.
        r.remove = false;
        let again = export_image(&s.store, &id("img-1"), &r).await.unwrap();
        assert!(again.already && again.removed);

        // Without a digest, or with another one, it cannot be confirmed: unknown.
        let e = export_image(&s.store, &id("img-1"), &req(&s.keep))
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 404, "{e}");
        let mut other = req(&s.keep);
        other.digest = Some(format!("sha256:{}", "1".repeat(64)));
        let e = export_image(&s.store, &id("img-1"), &other)
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 404, "{e}");
        assert!(e.to_string().contains("holds another image"), "{e}");
        let mut elsewhere = req(&s.tmp.path().join("home"));
        elsewhere.digest = Some(digest);
        let e = export_image(&s.store, &id("img-1"), &elsewhere)
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 404, "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn a_corrupt_stored_file_aborts_and_leaves_nothing() {
        let s = setup().await;
        let path = s
            .store
            .file_path(&id("img-1"), &rel("sub/dir/core-7.img"))
            .await
            .unwrap();
        fs::write(&path, b"CORE").unwrap();
        let mut r = req(&s.keep);
        r.remove = true;
        let (status, msg) =
            status_and_message(export_image(&s.store, &id("img-1"), &r).await.unwrap_err());
        assert_eq!(status, 500, "{msg}");
        assert!(
            msg.contains(
                "image img-1 in this store is corrupt: file sub/dir/core-7.img has sha256"
            ),
            "{msg}"
        );
        assert!(entries(&s.keep).is_empty(), "the partial copy is removed");
        // Not removed from the store: the caller decides.
        assert!(s.store.manifest(&id("img-1")).await.is_ok());

        // A truncated or grown file too.
        fs::write(&path, b"co").unwrap();
        let e = export_image(&s.store, &id("img-1"), &r).await.unwrap_err();
        assert!(
            e.to_string().contains("has 2 bytes, its manifest says 4"),
            "{e}"
        );
        fs::write(&path, vec![b'x'; 3 << 20]).unwrap();
        let e = export_image(&s.store, &id("img-1"), &r).await.unwrap_err();
        assert!(e.to_string().contains("has more than"), "{e}");
        assert!(entries(&s.keep).is_empty());
    }

    #[tokio::test]
    async fn concurrent_exports_of_one_image_both_succeed_once() {
        let s = setup().await;
        let r = req(&s.keep);
        let img = id("img-1");
        let (a, b) = tokio::join!(
            export_image(&s.store, &img, &r),
            export_image(&s.store, &img, &r)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(!(a.already && b.already), "{a:?} {b:?}");
        assert_eq!(entries(&s.keep), ["img-1"], "no partial copy left");
        assert_eq!(
            fs::read(s.keep.join("img-1").join(MANIFEST_FILE)).unwrap(),
            s.store.manifest_bytes(&id("img-1")).await.unwrap()
        );
    }

    #[test]
    fn out_of_space_is_507_and_other_errors_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let job = Job {
            id: "img-1".into(),
            dir: "/home/alice/ckpt".into(),
            digest: None,
            store_root: "/var/tmp/gca/store".into(),
            store: ImageStore::open(tmp.path(), None).unwrap(),
        };
        for errno in [Errno::NOSPC, Errno::DQUOT] {
            let e = job.io_err("writing", "/home/alice/ckpt/x", errno);
            assert!(matches!(e, Error::NoSpace(_)), "{e}");
            assert_eq!(e.http_status(), 507);
            let f: Fault = e.into();
            assert_eq!(f.code.as_deref(), Some("no-space"));
        }
        let e = job.io_err("creating", "/home/alice/ckpt/.x", Errno::ACCESS);
        assert_eq!(e.http_status(), 500);
        assert_eq!(
            e.to_string(),
            format!(
                "cannot export image img-1 into /home/alice/ckpt: creating /home/alice/ckpt/.x: {}",
                io::Error::from(Errno::ACCESS)
            )
        );
    }

    /// A full file system, for real: a 64 KiB tmpfs (needs root and permission to mount).
    #[tokio::test]
    async fn a_full_file_system_is_507_and_leaves_nothing() {
        let s = setup().await;
        let small = s.tmp.path().join("small");
        fs::create_dir(&small).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs"])
            .arg(&small)
            .status()
            .map(|st| st.success())
            .unwrap_or(false);
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (needs CAP_SYS_ADMIN)");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
        let _unmount = Unmount(small.clone());
        chown(&small, UID);
        let st = s.store.stage(&id("big")).await.unwrap();
        fs::write(st.dir.join("pages.img"), vec![7u8; 256 << 10]).unwrap();
        st.commit(meta(Some((UID, GID)))).await.unwrap();
        let e = export_image(&s.store, &id("big"), &req(&small))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e}");
        assert_eq!(e.http_status(), 507);
        assert!(
            e.to_string().contains("no space left to export image big"),
            "{e}"
        );
        assert!(entries(&small).is_empty(), "the partial copy is removed");
        assert!(s.store.manifest(&id("big")).await.is_ok());
    }
}
