//! An image being written: an empty directory in the store's `staging/`, committed into
//! `images/` in one rename once its manifest is written and everything is fsynced.
//!
//! Format 2 (chunks): at the commit the files the driver wrote are cut into chunks by a few
//! threads at once ([`crate::chunks::chunk_files`]); only new chunks are written, appended to
//! a pack sealed once at the end ([`crate::local_chunks`]); the image
//! directory that is renamed into `images/` holds just the manifest, and the driver's files
//! are removed. Format 1 (whole files, [`ImageStore::open_with`]) keeps today's way: every
//! file hashed, fsynced and renamed with the manifest.

use std::path::{Path, PathBuf};

use crate::chunks::{chunk_files_knowing, PinSet, CHUNK_HASH};
use crate::early_hash::EarlyHash;
use crate::error::Error;
use crate::manifest::{
    FileEntry, ImageMeta, Manifest, MANIFEST_FORMAT, MANIFEST_FORMAT_WHOLE_FILES,
};
use crate::names::ImageId;
use crate::store::{
    blocking, compare_files, random_suffix, remove_any, scan_dir, walk_dir, write_err,
    write_manifest, ImageStore,
};

/// An image being written. Write its files into [`Staging::dir`], then
/// [`commit`](Staging::commit) it. Dropped without a commit, its directory is removed.
#[derive(Debug)]
pub struct Staging {
    /// An empty directory (when created) on the store's file system.
    pub dir: PathBuf,
    id: ImageId,
    store: ImageStore,
    /// The chunks this image counts on (pinned against the GC until it is committed).
    pins: Option<PinSet>,
    /// Remove `dir` on drop.
    armed: bool,
    /// Page files being hashed while the driver writes them.
    early: Option<EarlyHash>,
}

/// What a commit puts into `images/<id>/`.
enum Layout {
    /// The staging directory itself, with its files (format 1).
    WholeFiles,
    /// A directory with the manifest only (format 2); the staging directory is removed.
    ManifestOnly,
}

impl Staging {
    /// An empty staging directory `dir` for image `id` (made by [`ImageStore::stage`]).
    pub(crate) fn new(dir: PathBuf, id: ImageId, store: ImageStore) -> Self {
        let pins = store.chunks().pin_set();
        Staging {
            dir,
            id,
            store,
            pins: Some(pins),
            armed: true,
            early: None,
        }
    }

    pub fn id(&self) -> &ImageId {
        &self.id
    }

    /// The chunks this image counts on: pin a chunk here before looking it up or writing it
    /// (a fetch), so that the GC leaves it until the image is committed.
    pub fn pins(&self) -> &PinSet {
        self.pins.as_ref().expect("pins until committed")
    }

    /// Starts hashing CRIU's page files (`pages-<N>.img`) while the driver writes them, along
    /// the chunks the same files have in `previous`, the job's previous image in this store
    /// ([`crate::early_hash`]). Only for a driver that writes those files front to back and
    /// never goes back: CRIU. Nothing happens when `previous` is not here or has no such file
    /// in chunks; a guess that turns out wrong only costs the work of an otherwise idle core.
    pub async fn hash_page_files_early(&mut self, previous: &ImageId) {
        if self.store.writes_whole_files() || self.early.is_some() {
            return;
        }
        let Ok(m) = self.store.manifest(previous).await else {
            return;
        };
        let files: Vec<(PathBuf, Vec<u32>)> = m
            .files
            .iter()
            .filter(|f| {
                !f.path.contains('/')
                    && f.path.starts_with("pages-")
                    && f.path.ends_with(".img")
                    && !f.chunks.is_empty()
            })
            .map(|f| {
                let cuts = f.chunks.iter().map(|c| c.size).collect();
                (self.dir.join(f.path.as_str()), cuts)
            })
            .collect();
        if files.is_empty() {
            return;
        }
        match EarlyHash::start(files) {
            Ok(e) => self.early = Some(e),
            Err(e) => tracing::debug!(image = %self.id, error = %e,
                "cannot start hashing the page files early; they are hashed at the commit"),
        }
    }

    /// How many bytes of page files were hashed early so far.
    #[cfg(test)]
    pub(crate) fn early_hashed_bytes(&self) -> u64 {
        self.early.as_ref().map_or(0, EarlyHash::hashed_bytes)
    }

    /// Cuts the files written into the staging directory into chunks (format 2; format 1
    /// when the store writes whole files), writes the manifest and moves the image into the
    /// store. On any error the staging directory is removed.
    pub async fn commit(mut self, meta: ImageMeta) -> Result<Manifest, Error> {
        if self.store.writes_whole_files() {
            return self.commit_whole_files(meta).await;
        }
        let early = self.early.take();
        self.finish(move |dir, id, store, pins| {
            let started = std::time::Instant::now();
            let early_bytes = early.as_ref().map_or(0, EarlyHash::hashed_bytes);
            let known = early.map(EarlyHash::finish).unwrap_or_default();
            let found = walk_dir(dir, id.as_str(), true, false)?;
            let paths: Vec<PathBuf> = found.iter().map(|(_, p)| p.clone()).collect();
            let (cut, stats) = chunk_files_knowing(store.chunks(), pins, &paths, &known)
                .map_err(|e| write_err(store.root(), id.as_str(), e))?;
            let files: Vec<FileEntry> = found
                .into_iter()
                .zip(cut)
                .map(|((path, _), c)| FileEntry {
                    path,
                    size: c.size,
                    sha256: None,
                    chunks: c.chunks,
                })
                .collect();
            tracing::debug!(image = %id, chunks = stats.total_chunks,
                hashed_early_bytes = early_bytes,
                new_chunks = stats.new_chunks.len(), new_bytes = stats.new_bytes,
                elapsed_ms = started.elapsed().as_millis() as u64, "image cut into chunks");
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                id: id.clone(),
                meta,
                chunk_hash: Some(CHUNK_HASH.to_string()),
                total_bytes: files.iter().map(|f| f.size).sum(),
                files,
            };
            Ok((manifest.to_bytes(), manifest, Layout::ManifestOnly))
        })
        .await
    }

    /// Commits in format 1: every file hashed (SHA-256), fsynced and kept whole in the image
    /// directory (the stores before chunks; tests of old images).
    pub async fn commit_whole_files(self, meta: ImageMeta) -> Result<Manifest, Error> {
        self.finish(move |dir, id, _, _| {
            let files = scan_dir(dir, id.as_str(), true)?;
            let manifest = Manifest {
                format: MANIFEST_FORMAT_WHOLE_FILES,
                id: id.clone(),
                meta,
                chunk_hash: None,
                total_bytes: files.iter().map(|f| f.size).sum(),
                files,
            };
            Ok((manifest.to_bytes(), manifest, Layout::WholeFiles))
        })
        .await
    }

    /// Commits with a manifest made elsewhere (a fetched image), keeping its bytes exactly so
    /// that its digest is the same on both sides. Format 1: the files in the staging
    /// directory must be exactly the ones it lists, with the same sizes and SHA-256. Format
    /// 2: the staging directory must be empty and every chunk it names in the store (pinned
    /// in [`Staging::pins`]; fetched chunks were checked as they arrived).
    pub async fn commit_with_manifest(self, manifest_bytes: Vec<u8>) -> Result<Manifest, Error> {
        self.finish(move |dir, id, store, pins| {
            let manifest = Manifest::parse(&manifest_bytes)?;
            if manifest.id != *id {
                return Err(Error::Corrupt(format!(
                    "the manifest for image {id} names image {}",
                    manifest.id
                )));
            }
            let found = scan_dir(dir, id.as_str(), true)?;
            if !manifest.is_chunked() {
                compare_files(id.as_str(), &manifest.files, &found)?;
                return Ok((manifest_bytes, manifest, Layout::WholeFiles));
            }
            if let Some(extra) = found.first() {
                return Err(Error::Corrupt(format!(
                    "image {id}: file {} is not in the manifest",
                    extra.path
                )));
            }
            for f in &manifest.files {
                for c in &f.chunks {
                    pins.pin(&c.id);
                    let has = store.chunks().backend().has(&c.id).map_err(|e| {
                        Error::io(format!("cannot look up chunk {} of image {id}", c.id), e)
                    })?;
                    if !has {
                        return Err(Error::ChunkCorrupt {
                            image: id.to_string(),
                            file: f.path.to_string(),
                            chunk: c.id.to_hex(),
                            detail: "is missing from the store".into(),
                        });
                    }
                }
            }
            Ok((manifest_bytes, manifest, Layout::ManifestOnly))
        })
        .await
    }

    /// Removes the staging directory now (rather than in the background on drop).
    pub async fn discard(mut self) {
        self.armed = false;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || remove_any(&dir)).await;
    }

    async fn finish<F>(mut self, build: F) -> Result<Manifest, Error>
    where
        F: FnOnce(
                &Path,
                &ImageId,
                &ImageStore,
                &PinSet,
            ) -> Result<(Vec<u8>, Manifest, Layout), Error>
            + Send
            + 'static,
    {
        // From here the blocking task owns the directory: it removes it on failure, even if
        // this future is dropped.
        self.armed = false;
        let dir = self.dir.clone();
        let id = self.id.clone();
        let store = self.store.clone();
        // Held until the image is committed (or abandoned), then unpinned.
        let pins = self.pins.take().expect("pins until committed");
        blocking(move || {
            let mut made = None;
            let result = (|| {
                let (bytes, manifest, layout) = build(&dir, &id, &store, &pins)?;
                let image_dir = match layout {
                    Layout::WholeFiles => dir.clone(),
                    Layout::ManifestOnly => {
                        let d = store
                            .staging_root()
                            .join(format!("{id}.{}.m", random_suffix()));
                        std::fs::create_dir(&d)
                            .map_err(|e| write_err(store.root(), id.as_str(), e))?;
                        made = Some(d.clone());
                        d
                    }
                };
                write_manifest(&image_dir, &bytes)
                    .map_err(|e| write_err(store.root(), id.as_str(), e))?;
                store.finalize(&image_dir, id.as_str(), manifest.total_bytes)?;
                Ok(manifest)
            })();
            drop(pins);
            let leftovers = match (&result, made) {
                (Ok(_), None) => vec![],
                (Ok(_), Some(_)) => {
                    // The driver's files, cut into chunks: not on the answer's path.
                    crate::store::remove_in_background(store.staging_root(), &dir);
                    vec![]
                }
                (Err(_), made) => std::iter::once(dir).chain(made).collect(),
            };
            for d in leftovers {
                if let Err(e) = remove_any(&d) {
                    tracing::warn!(path = %d.display(), error = %e,
                        "cannot remove an image's staging directory");
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
        crate::store::remove_in_background(self.store.staging_root(), &self.dir);
    }
}
