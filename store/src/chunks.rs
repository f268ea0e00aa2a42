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
//! runtime. [`LocalChunks`](crate::local_chunks::LocalChunks) is the backend of a store on a
//! file system (chunks in packs; see its module for the layout and the write order).
//! A remote (object store) backend implements the same six methods.
//!
//! # Cutting files ([`chunk_files`])
//!
//! Each file is cut at fixed [`SEGMENT`] boundaries (so that several threads cut one large
//! file at once, and a changed page never moves a boundary outside its segment), and each
//! segment by FastCDC (2020, 16/64/256 KiB min/avg/max). CRIU's page files are cut along
//! their pagemap instead, at 64 KiB windows of the address space (`criu_pages`), which costs
//! no rolling hash. Files and segments are cut, hashed and stored by a few threads at once;
//! new chunks are made durable once at the end ([`ChunkBackend::sync`]).
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
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::early_hash::Known;

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

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        ChunkId(b)
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
    /// Called once a sweep's `remove`s are done, under the same lock: makes them durable
    /// (a backend whose `remove` is durable at once does nothing).
    fn finish_sweep(&self) -> io::Result<()> {
        Ok(())
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

impl CutStats {
    /// Adds what another part of the cut wrote.
    fn absorb(&mut self, other: CutStats) {
        self.new_chunks.extend(other.new_chunks);
        self.new_bytes += other.new_bytes;
        self.total_chunks += other.total_chunks;
    }
}

/// A piece of a file one thread cuts: by FastCDC, or along given chunk lengths.
struct Piece {
    file: usize,
    start: u64,
    len: usize,
    cuts: Option<Vec<u32>>,
}

/// Given chunk lengths in groups of at most [`SEGMENT`] bytes (each chunk is at most
/// [`MAX_CHUNK`]).
fn cut_groups(cuts: &[u32]) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0usize;
    for &c in cuts {
        if out.is_empty() || bytes + c as usize > SEGMENT {
            out.push(Vec::new());
            bytes = 0;
        }
        out.last_mut().expect("pushed").push(c);
        bytes += c as usize;
    }
    out
}

/// Cuts the files (on disk, full paths) into chunks, stores the new ones (pinned in `pins`)
/// and fsyncs them: several threads at once, over files and segments of files. Returns one
/// [`CutFile`] per path, in order, and what was written.
pub fn chunk_files(
    chunks: &Chunks,
    pins: &PinSet,
    paths: &[PathBuf],
) -> io::Result<(Vec<CutFile>, CutStats)> {
    chunk_files_knowing(chunks, pins, paths, &Known::new())
}

/// [`chunk_files`], given the digests of some chunks found while their files were written
/// ([`crate::early_hash`]): a chunk cut at an offset with a length found there, and that the
/// backend has, is not read or hashed again.
pub(crate) fn chunk_files_knowing(
    chunks: &Chunks,
    pins: &PinSet,
    paths: &[PathBuf],
    known: &Known,
) -> io::Result<(Vec<CutFile>, CutStats)> {
    // The work: pieces of at most SEGMENT bytes of a file, cut by FastCDC, or (CRIU's page
    // files, crate::criu_pages) along the lengths their pagemap gives.
    let page_cuts = crate::criu_pages::page_file_cuts(paths);
    let mut sizes = Vec::with_capacity(paths.len());
    let mut work: Vec<Piece> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let len = fs::metadata(p)?.len();
        sizes.push(len);
        // (Only if the file still has the length the pagemap gave.)
        let cuts = page_cuts
            .get(p)
            .filter(|c| c.iter().map(|&n| n as u64).sum::<u64>() == len);
        if let Some(cuts) = cuts {
            let mut start = 0u64;
            for group in cut_groups(cuts) {
                let bytes: u64 = group.iter().map(|&c| c as u64).sum();
                work.push(Piece {
                    file: i,
                    start,
                    len: bytes as usize,
                    cuts: Some(group),
                });
                start += bytes;
            }
            continue;
        }
        let segments = len.div_ceil(SEGMENT as u64).max(1);
        for s in 0..segments {
            let start = s * SEGMENT as u64;
            work.push(Piece {
                file: i,
                start,
                len: (len.saturating_sub(start)).min(SEGMENT as u64) as usize,
                cuts: None,
            });
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
                    let Some(piece) = work.get(n) else {
                        return;
                    };
                    let fi = piece.file;
                    let r = (|| -> io::Result<Vec<ChunkRef>> {
                        if open.as_ref().map(|(i, _)| *i) != Some(fi) {
                            open = Some((fi, File::open(&paths[fi])?));
                        }
                        let f = &open.as_ref().expect("opened").1;
                        let found = known
                            .get(&paths[fi])
                            .filter(|found| found.contains_key(&piece.start));
                        if let (Some(cuts), Some(found)) = (&piece.cuts, found) {
                            let (refs, local) =
                                cut_known(chunks, pins, f, piece.start, cuts, found, &mut buf)?;
                            stats.lock().absorb(local);
                            return Ok(refs);
                        }
                        f.read_exact_at(&mut buf[..piece.len], piece.start)?;
                        let data = &buf[..piece.len];
                        let mut refs = Vec::new();
                        let mut local = CutStats::default();
                        let bounds: Box<dyn Iterator<Item = (usize, usize)>> = match &piece.cuts {
                            Some(cuts) => Box::new(cuts.iter().scan(0usize, |at, &c| {
                                let b = (*at, c as usize);
                                *at += c as usize;
                                Some(b)
                            })),
                            None => Box::new(
                                fastcdc::v2020::FastCDC::new(
                                    data,
                                    MIN_CHUNK as u32,
                                    AVG_CHUNK as u32,
                                    MAX_CHUNK as u32,
                                )
                                .map(|c| (c.offset, c.length)),
                            ),
                        };
                        for (offset, length) in bounds {
                            let bytes = &data[offset..offset + length];
                            let id = ChunkId::of(bytes);
                            pins.pin(&id);
                            if chunks.backend.put(&id, bytes)? {
                                local.new_chunks.push(id);
                                local.new_bytes += bytes.len() as u64;
                            }
                            local.total_chunks += 1;
                            refs.push(ChunkRef {
                                id,
                                size: length as u32,
                            });
                        }
                        stats.lock().absorb(local);
                        Ok(refs)
                    })();
                    match r {
                        Ok(refs) => results.lock().push(((fi, piece.start), refs)),
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

/// Cuts a piece of a file along `cuts` (starting at `start`), taking the digests `found`
/// early: a chunk found there (same offset, same length) that the backend has is neither
/// read nor hashed; any other is read, hashed and put.
fn cut_known(
    chunks: &Chunks,
    pins: &PinSet,
    file: &File,
    start: u64,
    cuts: &[u32],
    found: &HashMap<u64, (u32, ChunkId)>,
    buf: &mut [u8],
) -> io::Result<(Vec<ChunkRef>, CutStats)> {
    let mut refs = Vec::with_capacity(cuts.len());
    let mut stats = CutStats::default();
    let mut offset = start;
    for &size in cuts {
        let early = found.get(&offset).filter(|(len, _)| *len == size);
        let present = match early {
            Some((_, id)) => {
                pins.pin(id);
                chunks.backend.has(id)?.then_some(*id)
            }
            None => None,
        };
        let id = match present {
            Some(id) => id,
            None => {
                // Hashed from the bytes the backend gets, whatever was found early.
                let bytes = &mut buf[..size as usize];
                file.read_exact_at(bytes, offset)?;
                let id = ChunkId::of(bytes);
                pins.pin(&id);
                if chunks.backend.put(&id, bytes)? {
                    stats.new_chunks.push(id);
                    stats.new_bytes += size as u64;
                }
                id
            }
        };
        stats.total_chunks += 1;
        refs.push(ChunkRef { id, size });
        offset += size as u64;
    }
    Ok((refs, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_chunks::LocalChunks;

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

    #[test]
    fn a_chunk_hashed_early_that_the_store_has_is_not_read_again_and_any_other_is() {
        let tmp = tempfile::tempdir().unwrap();
        let chunks = Chunks::new(Arc::new(LocalChunks::open(&tmp.path().join("c")).unwrap()));
        // Two 64 KiB windows of present pages: two chunks.
        let base = 0x7f00_0000_0000u64;
        let map = tmp.path().join("pagemap-9.img");
        fs::write(&map, crate::criu_pages::tests::pagemap(1, &[(base, 32, 4)])).unwrap();
        let pages = tmp.path().join("pages-1.img");
        let window = |n: u8| vec![n; 64 * 1024];
        fs::write(&pages, [window(1), window(2)].concat()).unwrap();
        let paths = [map.clone(), pages.clone()];
        let pins = chunks.pin_set();
        let (first, _) = chunk_files(&chunks, &pins, &paths).unwrap();
        assert_eq!(first[1].chunks.len(), 2);
        let (old0, old1) = (first[1].chunks[0].id, first[1].chunks[1].id);

        // Both windows change on disk after they were "hashed early": the first digest is of
        // a chunk the store has, the second of one it lacks.
        fs::write(&pages, [window(3), window(4)].concat()).unwrap();
        let lacking = ChunkId::of(b"never stored");
        let known: Known = [(
            pages.clone(),
            [(0u64, (65536u32, old0)), (65536, (65536, lacking))].into(),
        )]
        .into();
        let pins = chunks.pin_set();
        let (cut, stats) = chunk_files_knowing(&chunks, &pins, &paths, &known).unwrap();
        // The one the store has is taken as found (not read: its bytes on disk changed).
        assert_eq!(cut[1].chunks[0].id, old0);
        // The other is read and hashed from the file, whatever was found early.
        assert_eq!(cut[1].chunks[1].id, ChunkId::of(&window(4)));
        assert_ne!(cut[1].chunks[1].id, old1);
        assert_eq!(stats.new_chunks, vec![ChunkId::of(&window(4))]);
        assert_eq!(chunks.read_verified(&cut[1].chunks[1]).unwrap(), window(4));
        assert!(!chunks.backend().has(&lacking).unwrap());
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
        crate::local_chunks::flip_byte(&tmp.path().join("c"), &victim.id, 7);
        assert!(matches!(
            chunks.read_verified(&victim),
            Err(ChunkReadError::Corrupt(_))
        ));
        chunks.backend().remove(&victim.id).unwrap();
        assert!(matches!(
            chunks.read_verified(&victim),
            Err(ChunkReadError::Missing)
        ));
    }
}
