//! Content-defined chunks: how an image's files are cut, named and kept (manifest format 2).
//!
//! # The chunk API (what a backend implements)
//!
//! A chunk is at most [`MAX_CHUNK`] bytes, named by its [`ChunkId`], the BLAKE3 digest of its
//! bytes (64 lower-case hex digits on disk and on the wire; nothing else is ever a chunk
//! name). A backend only keeps bytes under names; it trusts nothing and checks nothing, the
//! [`Chunks`] front does (every chunk is hashed once when it is made or arrives, and once
//! more whenever it is read back for a restore, an export or a peer):
//!
//! | [`ChunkBackend`] method | contract |
//! |---|---|
//! | `has(id)` | whether a chunk of that name is stored (complete: a backend never shows a half-written chunk) |
//! | `put(id, bytes)` | stores it unless present (returns whether it wrote, then the caller passes `id` to `sync`); atomic: all or nothing under that name; not yet durable, and a backend may not show it (`has`, `read`, `list`) before `sync` |
//! | `sync(ids)` | makes the chunks written by earlier `put`s durable and present (once per commit or fetch, not per chunk) |
//! | `read(id)` | the bytes stored under the name (`NotFound` if none), at most [`MAX_CHUNK`] |
//! | `remove(id)` | removes it (absent is fine); only the store's GC calls it |
//! | `list()` | every stored name, for the GC's sweep |
//!
//! Every method blocks: the store calls them from blocking threads, never from the async
//! runtime. [`LocalChunks`] is the backend of a store on a file system: `chunks/ab/abcdef...`
//! (the first two hex digits are a directory). See [`LocalChunks`] for its write order.
//! A remote (object store) backend implements the same six methods.
//!
//! # Cutting files ([`chunk_files`])
//!
//! Each file is cut at fixed [`SEGMENT`] boundaries (so that several threads cut one large
//! file at once, and a changed page never moves a boundary outside its segment), and each
//! segment by FastCDC (2020, 16/64/256 KiB min/avg/max). Files and segments are cut, hashed
//! and stored by a few threads at once; new chunks are made durable once at the end
//! ([`ChunkBackend::sync`]).
//!
//! # Writes in progress and the GC
//!
//! A chunk an ongoing commit or fetch counts on is *pinned* ([`Pins`]) before it is looked up
//! or written, and unpinned only after its image is committed (or abandoned). The sweep
//! ([`crate::ImageStore::collect_garbage`]) runs under the store's commit lock and never
//! removes a pinned chunk, so a chunk a checkpoint found present (and so did not write) stays
//! there until the image naming it is committed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::store::{fsync_dir, random_suffix};

/// The largest chunk FastCDC makes (and the largest accepted from anywhere).
pub const MAX_CHUNK: usize = 256 * 1024;
/// The smallest chunk (but the last of a segment).
pub const MIN_CHUNK: usize = 16 * 1024;
/// The average chunk size FastCDC aims at.
pub const AVG_CHUNK: usize = 64 * 1024;
/// Files are cut into segments of this size first (each cut by FastCDC on its own).
pub const SEGMENT: usize = 8 << 20;
/// The chunk hash of manifest format 2 (see ARCHITECTURE.md for the measurement).
pub const CHUNK_HASH: &str = "blake3";
/// Threads cutting and hashing at once (at most).
const MAX_THREADS: usize = 4;
const TMP_PREFIX: &str = ".tmp-";
/// Up to this many new chunks, `sync` fsyncs each file; above, one `syncfs` of the store's
/// file system is cheaper (measured: ~2 ms per fsync on the development machine's disk).
const FSYNC_EACH_UP_TO: usize = 16;

/// A chunk's name: the BLAKE3 digest of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Exactly 64 lower-case hex digits; nothing else names a chunk.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkId::parse(&s).ok_or_else(|| {
            serde::de::Error::custom("a chunk ID is 64 lower-case hex digits (BLAKE3)")
        })
    }
}

/// One chunk of a file in a manifest: its name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub size: u32,
}

/// Where chunks are kept. See the module documentation for the contract; every method
/// blocks.
pub trait ChunkBackend: Send + Sync + fmt::Debug {
    fn has(&self, id: &ChunkId) -> io::Result<bool>;
    fn put(&self, id: &ChunkId, data: &[u8]) -> io::Result<bool>;
    fn sync(&self, written: &[ChunkId]) -> io::Result<()>;
    fn read(&self, id: &ChunkId) -> io::Result<Vec<u8>>;
    fn remove(&self, id: &ChunkId) -> io::Result<()>;
    fn list(&self) -> io::Result<Vec<ChunkId>>;
}

/// Chunks as files: `DIR/ab/abcdef...` (0600, in 0700 directories).
///
/// # Write order (crash safety)
///
/// A file under a chunk's final name is always complete, durable and hashes to its name;
/// temporary files (`DIR/ab/.tmp-*`) are never counted as chunks and are removed by
/// [`LocalChunks::open`].
///
/// 1. `put` writes the bytes into a new temporary file in the chunk's directory, without
///    fsync, and records it as *pending* (not shown by `has`, `read` or `list`).
/// 2. `sync(ids)` makes the pending ones among `ids` durable: each file fsynced when there
///    are at most [`FSYNC_EACH_UP_TO`], else one `syncfs` of the store's file system;
/// 3. then renames each to its final name;
/// 4. then fsyncs the directories holding them (at most [`FSYNC_EACH_UP_TO`] chunks) or
///    `syncfs` again, so that the names are durable before `sync` returns, that is before
///    the caller commits a manifest naming them.
///
/// A crash before 3 leaves temporary files only; between 3 and 4 complete chunks under
/// their final names that no committed manifest names yet (the GC removes them).
#[derive(Debug)]
pub struct LocalChunks {
    dir: PathBuf,
    /// Chunks written by `put` into a temporary file (complete, not yet durable), by name.
    pending: Mutex<HashMap<ChunkId, PathBuf>>,
}

impl LocalChunks {
    /// Opens (creating) the chunk directory and removes temporary files an earlier run left.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                let e = e?;
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(LocalChunks {
            dir: dir.to_path_buf(),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The chunk directory of a store another process has open, to read only (no clean-up).
    pub fn at(dir: &Path) -> Self {
        LocalChunks {
            dir: dir.to_path_buf(),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Chunks written by `put` and not yet passed to `sync` (tests).
    #[cfg(test)]
    pub(crate) fn pending_count(&self) -> usize {
        self.pending.lock().len()
    }

    /// One `syncfs` of the file system holding the chunks.
    fn syncfs(&self) -> io::Result<()> {
        let d = File::open(&self.dir)?;
        rustix::fs::syncfs(&d).map_err(io::Error::from)
    }

    fn sub(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(&id.to_hex()[..2])
    }

    /// Where a chunk is on disk.
    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }
}

impl ChunkBackend for LocalChunks {
    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        match fs::symlink_metadata(self.path(id)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> io::Result<bool> {
        let path = self.path(id);
        if fs::symlink_metadata(&path).is_ok() {
            return Ok(false);
        }
        if self.pending.lock().contains_key(id) {
            // Written by another put not yet synced: this caller syncs it too.
            return Ok(true);
        }
        let sub = self.sub(id);
        let tmp = sub.join(format!("{TMP_PREFIX}{}", random_suffix()));
        let open = || {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
        };
        let mut f = match open() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&sub)?;
                open()?
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = f.write_all(data) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(f);
        let mut pending = self.pending.lock();
        if pending.contains_key(id) {
            // Two puts of the same chunk at once: keep one file.
            drop(pending);
            let _ = fs::remove_file(&tmp);
        } else {
            pending.insert(*id, tmp);
        }
        Ok(true)
    }

    fn sync(&self, written: &[ChunkId]) -> io::Result<()> {
        if written.is_empty() {
            return Ok(());
        }
        let few = written.len() <= FSYNC_EACH_UP_TO;
        // 2. The pending files' bytes durable. A file stays pending (and so is not renamed by
        // another sync) until it is renamed below, under the lock.
        let mine: Vec<(ChunkId, PathBuf)> = {
            let pending = self.pending.lock();
            written
                .iter()
                .filter_map(|id| pending.get(id).map(|t| (*id, t.clone())))
                .collect()
        };
        if few {
            for (_, tmp) in &mine {
                match File::open(tmp) {
                    Ok(f) => f.sync_data()?,
                    // Renamed by a concurrent sync meanwhile (which made it durable first).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        } else if !mine.is_empty() {
            self.syncfs()?;
        }
        // 3. Renamed to their final names.
        {
            let mut pending = self.pending.lock();
            for (id, _) in &mine {
                if let Some(tmp) = pending.get(id) {
                    fs::rename(tmp, self.path(id))?;
                    pending.remove(id);
                }
            }
        }
        // Every chunk named is there now (ours, or renamed by another sync, which made its
        // bytes durable before).
        for id in written {
            if fs::symlink_metadata(self.path(id)).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("chunk {id} was written but is not in the store"),
                ));
            }
        }
        // 4. The names durable.
        if few {
            let subs: BTreeSet<PathBuf> = written.iter().map(|id| self.sub(id)).collect();
            for sub in &subs {
                fsync_dir(sub)?;
            }
            fsync_dir(&self.dir)?;
        } else {
            self.syncfs()?;
        }
        Ok(())
    }

    fn read(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let f = File::open(self.path(id))?;
        let mut buf = Vec::with_capacity(AVG_CHUNK);
        f.take(MAX_CHUNK as u64 + 1).read_to_end(&mut buf)?;
        if buf.len() > MAX_CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("chunk {id} is larger than {MAX_CHUNK} bytes"),
            ));
        }
        Ok(buf)
    }

    fn remove(&self, id: &ChunkId) -> io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for sub in fs::read_dir(&self.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                let e = e?;
                if let Some(id) = e.file_name().to_str().and_then(ChunkId::parse) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }
}

/// Chunks pinned by commits and fetches in progress (a count per chunk): the GC never removes
/// them.
#[derive(Debug, Default)]
pub struct Pins {
    counts: Mutex<HashMap<ChunkId, usize>>,
}

impl Pins {
    #[cfg(test)]
    pub(crate) fn is_pinned(&self, id: &ChunkId) -> bool {
        self.counts.lock().contains_key(id)
    }

    /// Runs `remove` unless `id` is pinned, holding the pins while it runs: a commit pinning
    /// `id` now waits, then finds it gone and writes it again. Returns whether it ran.
    pub(crate) fn remove_unless_pinned(
        &self,
        id: &ChunkId,
        remove: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<bool> {
        let counts = self.counts.lock();
        if counts.contains_key(id) {
            return Ok(false);
        }
        remove()?;
        Ok(true)
    }
}

/// The chunks one commit or fetch pinned; unpinned on drop.
#[derive(Debug)]
pub struct PinSet {
    pins: Arc<Pins>,
    mine: Mutex<BTreeSet<ChunkId>>,
}

impl PinSet {
    pub fn new(pins: Arc<Pins>) -> Self {
        PinSet {
            pins,
            mine: Mutex::new(BTreeSet::new()),
        }
    }

    /// Pins `id` (once per set).
    pub fn pin(&self, id: &ChunkId) {
        if self.mine.lock().insert(*id) {
            *self.pins.counts.lock().entry(*id).or_insert(0) += 1;
        }
    }
}

impl Drop for PinSet {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut *self.mine.lock());
        let mut counts = self.pins.counts.lock();
        for id in mine {
            if let Some(c) = counts.get_mut(&id) {
                *c -= 1;
                if *c == 0 {
                    counts.remove(&id);
                }
            }
        }
    }
}

/// The chunk store of an image store: a backend, checked. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Chunks {
    backend: Arc<dyn ChunkBackend>,
    pins: Arc<Pins>,
}

/// Why a chunk could not be read back.
#[derive(Debug)]
pub enum ChunkReadError {
    Missing,
    /// Its bytes do not hash to its name (or have another length than expected).
    Corrupt(String),
    Io(io::Error),
}

impl Chunks {
    pub fn new(backend: Arc<dyn ChunkBackend>) -> Self {
        Chunks {
            backend,
            pins: Arc::new(Pins::default()),
        }
    }

    pub fn backend(&self) -> &dyn ChunkBackend {
        &*self.backend
    }

    pub(crate) fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    pub fn pin_set(&self) -> PinSet {
        PinSet::new(self.pins.clone())
    }

    /// Reads a chunk and checks it against its name and the expected size.
    pub fn read_verified(&self, r: &ChunkRef) -> Result<Vec<u8>, ChunkReadError> {
        let data = match self.backend.read(&r.id) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkReadError::Missing),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(ChunkReadError::Corrupt(e.to_string()))
            }
            Err(e) => return Err(ChunkReadError::Io(e)),
        };
        if data.len() != r.size as usize {
            return Err(ChunkReadError::Corrupt(format!(
                "it has {} bytes, the manifest says {}",
                data.len(),
                r.size
            )));
        }
        let got = ChunkId::of(&data);
        if got != r.id {
            return Err(ChunkReadError::Corrupt(format!("its bytes hash to {got}")));
        }
        Ok(data)
    }
}

/// What [`chunk_files`] made of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutFile {
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

/// What a cut wrote: the chunks new in the backend, and their bytes.
#[derive(Debug, Default, Clone)]
pub struct CutStats {
    pub new_chunks: Vec<ChunkId>,
    pub new_bytes: u64,
    pub total_chunks: usize,
}

/// Cuts the files (on disk, full paths) into chunks, stores the new ones (pinned in `pins`)
/// and fsyncs them: several threads at once, over files and segments of files. Returns one
/// [`CutFile`] per path, in order, and what was written.
pub fn chunk_files(
    chunks: &Chunks,
    pins: &PinSet,
    paths: &[PathBuf],
) -> io::Result<(Vec<CutFile>, CutStats)> {
    // The work: (file index, segment index), biggest files first is not needed: segments are
    // all the same size.
    let mut sizes = Vec::with_capacity(paths.len());
    let mut work = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let len = fs::metadata(p)?.len();
        sizes.push(len);
        let segments = len.div_ceil(SEGMENT as u64).max(1);
        for s in 0..segments {
            work.push((i, s));
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_THREADS)
        .min(work.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    type SegResult = ((usize, u64), Vec<ChunkRef>);
    let results: Mutex<Vec<SegResult>> = Mutex::new(Vec::with_capacity(work.len()));
    let stats = Mutex::new(CutStats::default());
    let failure: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = vec![0u8; SEGMENT];
                let mut open: Option<(usize, File)> = None;
                loop {
                    if failure.lock().is_some() {
                        return;
                    }
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(fi, seg)) = work.get(n) else {
                        return;
                    };
                    let r = (|| -> io::Result<Vec<ChunkRef>> {
                        if open.as_ref().map(|(i, _)| *i) != Some(fi) {
                            open = Some((fi, File::open(&paths[fi])?));
                        }
                        let f = &open.as_ref().expect("opened").1;
                        let start = seg * SEGMENT as u64;
                        let want = (sizes[fi].saturating_sub(start)).min(SEGMENT as u64) as usize;
                        f.read_exact_at(&mut buf[..want], start)?;
                        let data = &buf[..want];
                        let mut refs = Vec::new();
                        let mut local = CutStats::default();
                        for c in fastcdc::v2020::FastCDC::new(
                            data,
                            MIN_CHUNK as u32,
                            AVG_CHUNK as u32,
                            MAX_CHUNK as u32,
                        ) {
                            let bytes = &data[c.offset..c.offset + c.length];
                            let id = ChunkId::of(bytes);
                            pins.pin(&id);
                            if chunks.backend.put(&id, bytes)? {
                                local.new_chunks.push(id);
                                local.new_bytes += bytes.len() as u64;
                            }
                            local.total_chunks += 1;
                            refs.push(ChunkRef {
                                id,
                                size: c.length as u32,
                            });
                        }
                        let mut s = stats.lock();
                        s.new_chunks.extend(local.new_chunks);
                        s.new_bytes += local.new_bytes;
                        s.total_chunks += local.total_chunks;
                        Ok(refs)
                    })();
                    match r {
                        Ok(refs) => results.lock().push(((fi, seg), refs)),
                        Err(e) => {
                            failure.lock().get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner() {
        return Err(e);
    }
    let mut results = results.into_inner();
    results.sort_by_key(|(k, _)| *k);
    let mut files: Vec<CutFile> = sizes
        .iter()
        .map(|&size| CutFile {
            size,
            chunks: Vec::new(),
        })
        .collect();
    for ((fi, _), refs) in results {
        files[fi].chunks.extend(refs);
    }
    let stats = stats.into_inner();
    chunks.backend.sync(&stats.new_chunks)?;
    Ok((files, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_hex_digests_only() {
        let id = ChunkId::of(b"x");
        assert_eq!(ChunkId::parse(&id.to_hex()), Some(id));
        for bad in [
            "",
            "../../etc/passwd",
            &"A".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &format!("{}/", "0".repeat(63)),
        ] {
            assert_eq!(ChunkId::parse(bad), None, "{bad:?}");
        }
    }

    /// Every file under the chunk directory: (final chunks, temporary files).
    fn on_disk(dir: &Path) -> (BTreeSet<ChunkId>, usize) {
        let (mut ids, mut tmps) = (BTreeSet::new(), 0);
        for sub in fs::read_dir(dir).unwrap() {
            let sub = sub.unwrap();
            if !sub.file_type().unwrap().is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path()).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) {
                    tmps += 1;
                } else {
                    ids.insert(ChunkId::parse(&name).expect("only chunk names"));
                }
            }
        }
        (ids, tmps)
    }

    fn blobs(n: usize, seed: u8) -> Vec<(ChunkId, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let d = vec![seed ^ (i as u8); 1000 + i];
                (ChunkId::of(&d), d)
            })
            .collect()
    }

    #[test]
    fn a_crash_before_sync_leaves_temporary_files_only_and_they_go_at_the_next_open() {
        // 3 chunks (fsync each) and 40 (syncfs): the two ways sync makes them durable.
        for n in [3, 40] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("c");
            let b = LocalChunks::open(&dir).unwrap();
            for (id, d) in blobs(n, 1) {
                assert!(b.put(&id, &d).unwrap());
                // Written, not synced: not a chunk yet.
                assert!(!b.has(&id).unwrap());
                assert_eq!(b.read(&id).unwrap_err().kind(), io::ErrorKind::NotFound);
            }
            assert!(b.list().unwrap().is_empty());
            assert_eq!(on_disk(&dir), (BTreeSet::new(), n));
            // The process dies here (no sync); the next one opens the store.
            drop(b);
            let b = LocalChunks::open(&dir).unwrap();
            assert_eq!(on_disk(&dir), (BTreeSet::new(), 0));
            assert!(b.list().unwrap().is_empty());
            assert_eq!(b.pending_count(), 0);
        }
    }

    #[test]
    fn sync_renames_complete_chunks_under_their_names() {
        for n in [1, FSYNC_EACH_UP_TO, FSYNC_EACH_UP_TO + 1, 200] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("c");
            let b = LocalChunks::open(&dir).unwrap();
            let all = blobs(n, 7);
            let mut written = Vec::new();
            for (id, d) in &all {
                if b.put(id, d).unwrap() {
                    written.push(*id);
                }
            }
            // A put of a chunk already pending counts as written (the caller syncs it too),
            // and leaves one file.
            assert!(b.put(&all[0].0, &all[0].1).unwrap());
            b.sync(&written).unwrap();
            assert_eq!(b.pending_count(), 0);
            let (ids, tmps) = on_disk(&dir);
            assert_eq!(tmps, 0);
            assert_eq!(ids.len(), n);
            for (id, d) in &all {
                assert!(b.has(id).unwrap());
                let back = b.read(id).unwrap();
                assert_eq!(&back, d);
                assert_eq!(ChunkId::of(&back), *id);
                // Present now: not written again.
                assert!(!b.put(id, d).unwrap());
            }
            // A sync naming a chunk another sync renamed already (two commits sharing one
            // new chunk) succeeds; one naming a chunk nobody wrote fails.
            b.sync(&written).unwrap();
            let ghost = ChunkId::of(b"never put");
            assert_eq!(
                b.sync(&[ghost]).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
            // A crash after the renames, before any manifest names them: complete chunks
            // that a reopened store shows (the GC removes them if nothing names them).
            drop(b);
            let b = LocalChunks::open(&dir).unwrap();
            assert_eq!(b.list().unwrap().len(), n);
        }
    }

    #[test]
    fn two_writers_of_the_same_new_chunks_both_sync_them() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Arc::new(LocalChunks::open(&tmp.path().join("c")).unwrap());
        let all = Arc::new(blobs(50, 3));
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let (b, all) = (b.clone(), all.clone());
                std::thread::spawn(move || {
                    let mut written = Vec::new();
                    for (id, d) in all.iter() {
                        if b.put(id, d).unwrap() {
                            written.push(*id);
                        }
                    }
                    b.sync(&written).unwrap();
                    // What this writer counts on is there when its sync returns.
                    for (id, _) in all.iter() {
                        assert!(b.has(id).unwrap());
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(b.pending_count(), 0);
        assert_eq!(
            on_disk(&tmp.path().join("c")),
            (all.iter().map(|(i, _)| *i).collect(), 0)
        );
    }

    #[test]
    fn cut_store_read_back_and_dedup() {
        let tmp = tempfile::tempdir().unwrap();
        let chunks = Chunks::new(Arc::new(LocalChunks::open(&tmp.path().join("c")).unwrap()));
        // Pseudo-random data, 20 MiB: three segments.
        let mut data = vec![0u8; 20 << 20];
        let mut x: u64 = 1;
        for b in data.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 56) as u8;
        }
        let f = tmp.path().join("f");
        fs::write(&f, &data).unwrap();
        let empty = tmp.path().join("e");
        fs::write(&empty, b"").unwrap();
        let pins = chunks.pin_set();
        let (cut, stats) = chunk_files(&chunks, &pins, &[f.clone(), empty.clone()]).unwrap();
        assert_eq!(cut[1].chunks, []);
        assert_eq!(cut[0].size, data.len() as u64);
        let sum: u64 = cut[0].chunks.iter().map(|c| c.size as u64).sum();
        assert_eq!(sum, data.len() as u64);
        assert!(cut[0].chunks.iter().all(|c| c.size as usize <= MAX_CHUNK));
        assert_eq!(stats.new_bytes, data.len() as u64);
        let mut back = Vec::new();
        for c in &cut[0].chunks {
            back.extend(chunks.read_verified(c).unwrap());
        }
        assert_eq!(back, data);
        assert!(pins.pins.is_pinned(&cut[0].chunks[0].id));
        drop(pins);
        assert!(!chunks.pins.is_pinned(&cut[0].chunks[0].id));

        // Change one page: only a chunk or two are new.
        data[5 << 20] ^= 0xff;
        fs::write(&f, &data).unwrap();
        let pins = chunks.pin_set();
        let (cut2, stats2) = chunk_files(&chunks, &pins, &[f]).unwrap();
        assert!(stats2.new_chunks.len() <= 2, "{}", stats2.new_chunks.len());
        assert!(stats2.new_bytes <= 2 * MAX_CHUNK as u64);
        let same = cut2[0]
            .chunks
            .iter()
            .zip(&cut[0].chunks)
            .filter(|(a, b)| a == b)
            .count();
        assert!(same + 2 >= cut[0].chunks.len());

        // A flipped byte on disk is caught, naming what is wrong.
        let victim = cut2[0].chunks[3];
        let p = tmp
            .path()
            .join("c")
            .join(&victim.id.to_hex()[..2])
            .join(victim.id.to_hex());
        let mut bytes = fs::read(&p).unwrap();
        bytes[7] ^= 1;
        fs::write(&p, bytes).unwrap();
        assert!(matches!(
            chunks.read_verified(&victim),
            Err(ChunkReadError::Corrupt(_))
        ));
        fs::remove_file(&p).unwrap();
        assert!(matches!(
            chunks.read_verified(&victim),
            Err(ChunkReadError::Missing)
        ));
    }
}
