//! An image being written: an empty directory in the store's `staging/`, committed into
//! `images/` in one rename once its manifest is written and everything is fsynced.

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::manifest::{ImageMeta, Manifest, MANIFEST_FORMAT};
use crate::names::ImageId;
use crate::store::{
    blocking, compare_files, remove_any, scan_dir, write_err, write_manifest, ImageStore,
};

/// An image being written. Write its files into [`Staging::dir`], then
/// [`commit`](Staging::commit) it. Dropped without a commit, its directory is removed.
#[derive(Debug)]
pub struct Staging {
    /// An empty directory (when created) on the store's file system.
    pub dir: PathBuf,
    id: ImageId,
    store: ImageStore,
    /// Remove `dir` on drop.
    armed: bool,
}

impl Staging {
    /// An empty staging directory `dir` for image `id` (made by [`ImageStore::stage`]).
    pub(crate) fn new(dir: PathBuf, id: ImageId, store: ImageStore) -> Self {
        Staging {
            dir,
            id,
            store,
            armed: true,
        }
    }

    pub fn id(&self) -> &ImageId {
        &self.id
    }

    /// Hashes the files written into the staging directory, writes the manifest and moves
    /// the image into the store. On any error the staging directory is removed.
    pub async fn commit(self, meta: ImageMeta) -> Result<Manifest, Error> {
        self.finish(move |dir, id| {
            let files = scan_dir(dir, id.as_str(), true)?;
            let manifest = Manifest {
                format: MANIFEST_FORMAT,
                id: id.clone(),
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
    pub async fn commit_with_manifest(self, manifest_bytes: Vec<u8>) -> Result<Manifest, Error> {
        self.finish(move |dir, id| {
            let manifest = Manifest::parse(&manifest_bytes)?;
            if manifest.id != *id {
                return Err(Error::Corrupt(format!(
                    "the manifest for image {id} names image {}",
                    manifest.id
                )));
            }
            let found = scan_dir(dir, id.as_str(), true)?;
            compare_files(id.as_str(), &manifest.files, &found)?;
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

    async fn finish<F>(mut self, build: F) -> Result<Manifest, Error>
    where
        F: FnOnce(&Path, &ImageId) -> Result<(Vec<u8>, Manifest), Error> + Send + 'static,
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
                write_manifest(&dir, &bytes)
                    .map_err(|e| write_err(store.root(), id.as_str(), e))?;
                store.finalize(&dir, id.as_str(), manifest.total_bytes)?;
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
