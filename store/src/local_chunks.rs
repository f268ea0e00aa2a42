//! [`LocalChunks`]: the chunks of a store on a file system, in packs.
//!
//! # Layout
//!
//! ```text
//! chunks/
//!   packs/<P>.pack     chunks' bytes, one after the other (up to PACK_BYTES, then a new pack)
//!   packs/<P>.idx      the pack's live chunks: name, offset, length; checksummed
//!   packs/.tmp-*       an index being written (removed at open)
//!   ab/abcdef...       one chunk per file: stores written before packs (read, never written)
//! ```
//!
//! Why packs (measured, docs/benchmarks.md): a checkpoint into an empty store, a fetch and a
//! download from the object store each made one file per new chunk (~1000 for a 64 MiB image,
//! 16 to 256 KiB each); creating, syncing and renaming them cost more than cutting and hashing
//! the bytes. A pack is one file written sequentially and fsynced once.
//!
//! # Write order (crash safety)
//!
//! 1. `put` appends the bytes to the open pack (no fsync) and records the chunk as *pending*:
//!    not shown by `has`, `read` or `list`; a second `put` of it answers `true` (written).
//!    Every [`WRITEBACK_BYTES`] a background thread flushes what the pack holds so far
//!    ([`crate::writeback`]: the disk works while writers go on); durability is still 2's.
//! 2. `sync` seals every pack written to since the last seal (whoever wrote to it): fsyncs
//!    the pack, writes its index into a temporary file, fsyncs it, renames it to `<P>.idx`,
//!    fsyncs the directory; only then are its chunks shown. A pack file without an index holds
//!    no chunk and is removed at the next [`LocalChunks::open`].
//! 3. `remove` (only the GC's sweep) forgets a chunk at once; [`ChunkBackend::finish_sweep`]
//!    then makes the removals durable: a pack none of whose chunks is live goes (index first,
//!    then the pack); one that lost chunks gets its index written again without them (temporary
//!    file and rename), and one whose live chunks fill less than half of it is *compacted*: its
//!    live chunks are copied into a new pack, sealed as in 2, before the old one goes. A crash
//!    in between leaves a chunk in two packs (the open takes one and counts the other dead) or a
//!    removed chunk shown again (the next sweep removes it again): never a live chunk missing.
//!
//! Readers keep the pack file open ([`Arc<File>`]): a pack removed by a compaction under a
//! read in progress is still read whole.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::chunks::{ChunkBackend, ChunkId, AVG_CHUNK, MAX_CHUNK};
use crate::store::{fsync_dir, random_suffix};
use crate::writeback::{FlushError, Writeback, WRITEBACK_BYTES};

/// A pack takes new chunks until it holds this many bytes, then a new one is started.
pub const PACK_BYTES: u64 = 32 << 20;
/// A pack whose live chunks fill less than this fraction (1/N) is compacted by a sweep.
const COMPACT_BELOW: u64 = 2;
const TMP_PREFIX: &str = ".tmp-";
const PACKS: &str = "packs";
const INDEX_MAGIC: &[u8; 8] = b"GCAIDX01";
/// name (32) + offset (u64 LE) + length (u32 LE)
const ENTRY_BYTES: usize = 32 + 8 + 4;

/// Where a chunk's bytes are, for tools and tests that look at a store's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u32,
}

/// A pack's name: 32 hex digits (random).
type PackName = String;

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
}

/// A sealed pack.
#[derive(Debug)]
struct Pack {
    file: Arc<File>,
    /// The pack file's length.
    bytes: u64,
    live: HashMap<ChunkId, Entry>,
    live_bytes: u64,
    /// Chunks removed since the index was last written.
    dirty: bool,
}

/// A pack being written (not sealed).
#[derive(Debug)]
struct Open {
    name: PackName,
    file: Arc<File>,
    len: u64,
    entries: Vec<(ChunkId, Entry)>,
    /// `len` at the last early writeback ([`crate::writeback`]), and its error if any.
    kicked: u64,
    flush_error: FlushError,
}

#[derive(Debug, Default)]
struct State {
    /// Sealed chunks: the pack holding each.
    index: HashMap<ChunkId, PackName>,
    packs: HashMap<PackName, Pack>,
    /// The pack `put` appends to, and full ones not sealed yet.
    open: Option<Open>,
    full: Vec<Open>,
    /// Chunks in `open`, `full` or a pack being sealed.
    pending: BTreeSet<ChunkId>,
}

/// The chunks of a store on a file system: see the module documentation.
#[derive(Debug)]
pub struct LocalChunks {
    dir: PathBuf,
    packs_dir: PathBuf,
    state: Mutex<State>,
    /// One seal at a time (a sync waits for a seal in progress that holds its chunks).
    seal: Mutex<()>,
    writeback: Writeback,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

impl LocalChunks {
    /// Opens (creating) the chunk directory of a store this process owns: removes what an
    /// earlier run left half-written (temporary files, packs without an index, packs with no
    /// live chunk) and reads every pack's index.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let me = Self::new(dir);
        for d in [&me.dir, &me.packs_dir] {
            fs::create_dir_all(d)?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
        }
        // Loose chunks' temporary files (stores written before packs).
        for sub in fs::read_dir(&me.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() || sub.file_name() == PACKS {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                let e = e?;
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        me.load(true)?;
        Ok(me)
    }

    /// The chunk directory of a store another process has open, to read only (no clean-up):
    /// the packs sealed when it is called.
    pub fn at(dir: &Path) -> io::Result<Self> {
        let me = Self::new(dir);
        me.load(false)?;
        Ok(me)
    }

    fn new(dir: &Path) -> Self {
        LocalChunks {
            dir: dir.to_path_buf(),
            packs_dir: dir.join(PACKS),
            state: Mutex::new(State::default()),
            seal: Mutex::new(()),
            writeback: Writeback::default(),
        }
    }

    fn pack_path(&self, name: &str) -> PathBuf {
        self.packs_dir.join(format!("{name}.pack"))
    }

    fn index_path(&self, name: &str) -> PathBuf {
        self.packs_dir.join(format!("{name}.idx"))
    }

    fn loose_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Reads every index; with `clean`, removes temporary files, packs without an index and
    /// packs left without live chunks (a compaction interrupted after its new pack was sealed).
    fn load(&self, clean: bool) -> io::Result<()> {
        let rd = match fs::read_dir(&self.packs_dir) {
            Ok(rd) => rd,
            Err(e) if is_not_found(&e) && !clean => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut names = BTreeSet::new();
        let mut pack_files = BTreeSet::new();
        for e in rd {
            let e = e?;
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(TMP_PREFIX) {
                if clean {
                    let _ = fs::remove_file(e.path());
                }
            } else if let Some(n) = file.strip_suffix(".idx") {
                names.insert(n.to_string());
            } else if let Some(n) = file.strip_suffix(".pack") {
                pack_files.insert(n.to_string());
            }
        }
        let mut st = self.state.lock();
        for name in &names {
            let file = match File::open(self.pack_path(name)) {
                Ok(f) => f,
                Err(e) if is_not_found(&e) => {
                    // The pack went after its index (a sweep interrupted): nothing to read.
                    if clean {
                        let _ = fs::remove_file(self.index_path(name));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let bytes = file.metadata()?.len();
            let entries = read_index(&self.index_path(name), bytes)?;
            let mut live = HashMap::with_capacity(entries.len());
            let mut live_bytes = 0;
            for (id, e) in entries {
                // A chunk in two packs (a compaction interrupted): the first one read keeps it.
                if st.index.contains_key(&id) || live.contains_key(&id) {
                    continue;
                }
                live_bytes += e.len as u64;
                live.insert(id, e);
            }
            if live.is_empty() && clean {
                let _ = fs::remove_file(self.index_path(name));
                let _ = fs::remove_file(self.pack_path(name));
                continue;
            }
            for id in live.keys() {
                st.index.insert(*id, name.clone());
            }
            let dirty = false;
            st.packs.insert(
                name.clone(),
                Pack {
                    file: Arc::new(file),
                    bytes,
                    live,
                    live_bytes,
                    dirty,
                },
            );
        }
        if clean {
            for orphan in pack_files.difference(&names) {
                let _ = fs::remove_file(self.pack_path(orphan));
            }
        }
        Ok(())
    }

    /// Chunks written by `put` and not yet sealed (tests).
    #[cfg(test)]
    pub(crate) fn pending_count(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Where a stored chunk's bytes are (a pack and a range, or a loose file).
    pub fn locate(&self, id: &ChunkId) -> io::Result<Option<ChunkLocation>> {
        {
            let st = self.state.lock();
            if let Some(name) = st.index.get(id) {
                let e = st.packs[name].live[id];
                return Ok(Some(ChunkLocation {
                    path: self.pack_path(name),
                    offset: e.offset,
                    len: e.len,
                }));
            }
        }
        let path = self.loose_path(id);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ChunkLocation {
                path,
                offset: 0,
                len: m.len() as u32,
            })),
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bytes the chunk files take on disk: packs (dead chunks included until compacted)
    /// and loose chunks.
    pub fn disk_bytes(&self) -> io::Result<u64> {
        let packed: u64 = self.state.lock().packs.values().map(|p| p.bytes).sum();
        let mut loose = 0;
        for id in self.loose()? {
            loose += fs::symlink_metadata(self.loose_path(&id))?.len();
        }
        Ok(packed + loose)
    }

    fn loose_exists(&self, id: &ChunkId) -> io::Result<bool> {
        match fs::symlink_metadata(self.loose_path(id)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn loose(&self) -> io::Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if is_not_found(&e) => return Ok(out),
            Err(e) => return Err(e),
        };
        for sub in rd {
            let sub = sub?;
            if !sub.file_type()?.is_dir() || sub.file_name() == PACKS {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                if let Some(id) = e?.file_name().to_str().and_then(ChunkId::parse) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    fn new_pack(&self) -> io::Result<Open> {
        let name = random_suffix();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.pack_path(&name))?;
        Ok(Open {
            name,
            file: Arc::new(file),
            len: 0,
            entries: Vec::new(),
            kicked: 0,
            flush_error: FlushError::default(),
        })
    }

    /// Writes `entries` as the index of pack `name`: temporary file, fsync, rename (the
    /// directory is fsynced by the caller).
    fn write_index<'a>(
        &self,
        name: &str,
        entries: impl ExactSizeIterator<Item = (&'a ChunkId, &'a Entry)>,
    ) -> io::Result<()> {
        let mut buf = Vec::with_capacity(8 + 4 + entries.len() * ENTRY_BYTES + 32);
        buf.extend_from_slice(INDEX_MAGIC);
        buf.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (id, e) in entries {
            buf.extend_from_slice(id.as_bytes());
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&e.len.to_le_bytes());
        }
        let sum = *blake3::hash(&buf).as_bytes();
        buf.extend_from_slice(&sum);
        let tmp = self
            .packs_dir
            .join(format!("{TMP_PREFIX}{}", random_suffix()));
        let r = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            fs::rename(&tmp, self.index_path(name))
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    /// Makes the packs durable and indexed (step 2 of the write order), not yet shown.
    fn seal_packs(&self, todo: &[Open]) -> io::Result<()> {
        for p in todo {
            p.file.sync_data()?;
            // After the fsync: a background flush in progress holds the lock until its
            // result is in (crate::writeback).
            if let Some(e) = p.flush_error.lock().take() {
                return Err(e);
            }
        }
        for p in todo {
            self.write_index(&p.name, p.entries.iter().map(|(id, e)| (id, e)))?;
        }
        fsync_dir(&self.packs_dir)
    }

    /// Shows sealed packs' chunks.
    fn publish(st: &mut State, sealed: Vec<Open>) {
        for p in sealed {
            let mut live = HashMap::with_capacity(p.entries.len());
            let mut live_bytes = 0;
            for (id, e) in p.entries {
                st.pending.remove(&id);
                if st.index.contains_key(&id) {
                    continue;
                }
                live_bytes += e.len as u64;
                live.insert(id, e);
                st.index.insert(id, p.name.clone());
            }
            st.packs.insert(
                p.name,
                Pack {
                    file: p.file,
                    bytes: p.len,
                    live,
                    live_bytes,
                    dirty: false,
                },
            );
        }
    }

    /// Removes a pack's files: the index first (a pack without an index holds nothing).
    fn remove_pack_files(&self, name: &str) -> io::Result<()> {
        for p in [self.index_path(name), self.pack_path(name)] {
            match fs::remove_file(p) {
                Err(e) if !is_not_found(&e) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Copies the live chunks of pack `name` into a new sealed pack and removes the old one.
    fn compact(&self, name: &str) -> io::Result<()> {
        let (old, live): (Arc<File>, Vec<(ChunkId, Entry)>) = {
            let st = self.state.lock();
            let Some(p) = st.packs.get(name) else {
                return Ok(());
            };
            (
                p.file.clone(),
                p.live.iter().map(|(i, e)| (*i, *e)).collect(),
            )
        };
        let mut new = self.new_pack()?;
        let r = (|| {
            let mut buf = vec![0u8; MAX_CHUNK];
            for (id, e) in &live {
                let b = &mut buf[..e.len as usize];
                old.read_exact_at(b, e.offset)?;
                new.file.write_all_at(b, new.len)?;
                new.entries.push((
                    *id,
                    Entry {
                        offset: new.len,
                        len: e.len,
                    },
                ));
                new.len += e.len as u64;
            }
            self.seal_packs(std::slice::from_ref(&new))
        })();
        if let Err(e) = r {
            let _ = self.remove_pack_files(&new.name);
            return Err(e);
        }
        let mut st = self.state.lock();
        // Chunks removed meanwhile stay removed; the others move.
        let Some(mut oldp) = st.packs.remove(name) else {
            drop(st);
            return self.remove_pack_files(&new.name);
        };
        let mut moved = HashMap::new();
        let mut moved_bytes = 0;
        for (id, e) in new.entries.drain(..) {
            if oldp.live.remove(&id).is_some() {
                st.index.insert(id, new.name.clone());
                moved_bytes += e.len as u64;
                moved.insert(id, e);
            }
        }
        let dirty = moved.len() != live.len();
        st.packs.insert(
            new.name.clone(),
            Pack {
                file: new.file,
                bytes: new.len,
                live: moved,
                live_bytes: moved_bytes,
                dirty,
            },
        );
        drop(st);
        self.remove_pack_files(name)
    }
}

/// Parses a pack index, checking it against the pack's length.
fn read_index(path: &Path, pack_len: u64) -> io::Result<Vec<(ChunkId, Entry)>> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    let bad = |why: &str| invalid(format!("pack index {} {why}", path.display()));
    if buf.len() < 8 + 4 + 32 || &buf[..8] != INDEX_MAGIC {
        return Err(bad("is not a pack index"));
    }
    let (body, sum) = buf.split_at(buf.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("does not match its checksum"));
    }
    let n = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let rest = &body[12..];
    if rest.len() != n * ENTRY_BYTES {
        return Err(bad("has a wrong length"));
    }
    let mut out = Vec::with_capacity(n);
    for r in rest.chunks_exact(ENTRY_BYTES) {
        let id = ChunkId::from_bytes(r[..32].try_into().expect("32 bytes"));
        let offset = u64::from_le_bytes(r[32..40].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(r[40..44].try_into().expect("4 bytes"));
        if len as usize > MAX_CHUNK
            || offset
                .checked_add(len as u64)
                .is_none_or(|end| end > pack_len)
        {
            return Err(bad(&format!(
                "names chunk {id} outside its pack or larger than {MAX_CHUNK} bytes"
            )));
        }
        out.push((id, Entry { offset, len }));
    }
    Ok(out)
}

impl ChunkBackend for LocalChunks {
    fn has(&self, id: &ChunkId) -> io::Result<bool> {
        if self.state.lock().index.contains_key(id) {
            return Ok(true);
        }
        self.loose_exists(id)
    }

    fn put(&self, id: &ChunkId, data: &[u8]) -> io::Result<bool> {
        if data.len() > MAX_CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk {id} is larger than {MAX_CHUNK} bytes"),
            ));
        }
        {
            let st = self.state.lock();
            if st.index.contains_key(id) {
                return Ok(false);
            }
            if st.pending.contains(id) {
                // Written by another put not yet sealed: this caller's sync seals it too.
                return Ok(true);
            }
        }
        if self.loose_exists(id)? {
            return Ok(false);
        }
        let mut st = self.state.lock();
        if st.index.contains_key(id) {
            return Ok(false);
        }
        if st.pending.contains(id) {
            return Ok(true);
        }
        if st.open.is_none() {
            st.open = Some(self.new_pack()?);
        }
        let open = st.open.as_mut().expect("opened above");
        let offset = open.len;
        open.file.write_all_at(data, offset)?;
        open.len += data.len() as u64;
        open.entries.push((
            *id,
            Entry {
                offset,
                len: data.len() as u32,
            },
        ));
        if open.len - open.kicked >= WRITEBACK_BYTES {
            open.kicked = open.len;
            self.writeback.kick(&open.file, &open.flush_error);
        }
        let full = open.len >= PACK_BYTES;
        st.pending.insert(*id);
        if full {
            let p = st.open.take().expect("open");
            st.full.push(p);
        }
        Ok(true)
    }

    fn sync(&self, written: &[ChunkId]) -> io::Result<()> {
        if written.is_empty() {
            return Ok(());
        }
        {
            let _seal = self.seal.lock();
            let todo: Vec<Open> = {
                let mut st = self.state.lock();
                let mut v = std::mem::take(&mut st.full);
                v.extend(st.open.take());
                v
            };
            if !todo.is_empty() {
                let sealed = self.seal_packs(&todo);
                let mut st = self.state.lock();
                if let Err(e) = sealed {
                    // Not durable: these chunks were never stored (every writer of one fails
                    // its sync, below or now); the pack files go.
                    for p in &todo {
                        for (id, _) in &p.entries {
                            st.pending.remove(id);
                        }
                    }
                    drop(st);
                    for p in &todo {
                        let _ = self.remove_pack_files(&p.name);
                    }
                    return Err(e);
                }
                Self::publish(&mut st, todo);
            }
        }
        // Every chunk named is there now (sealed here, or by another sync that held it).
        for id in written {
            if !self.has(id)? {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("chunk {id} was written but is not in the store"),
                ));
            }
        }
        Ok(())
    }

    fn read(&self, id: &ChunkId) -> io::Result<Vec<u8>> {
        let packed = {
            let st = self.state.lock();
            st.index.get(id).map(|name| {
                let p = &st.packs[name];
                (p.file.clone(), p.live[id])
            })
        };
        if let Some((file, e)) = packed {
            let mut buf = vec![0u8; e.len as usize];
            file.read_exact_at(&mut buf, e.offset)?;
            return Ok(buf);
        }
        let f = File::open(self.loose_path(id))?;
        let mut buf = Vec::with_capacity(AVG_CHUNK);
        f.take(MAX_CHUNK as u64 + 1).read_to_end(&mut buf)?;
        if buf.len() > MAX_CHUNK {
            return Err(invalid(format!(
                "chunk {id} is larger than {MAX_CHUNK} bytes"
            )));
        }
        Ok(buf)
    }

    fn remove(&self, id: &ChunkId) -> io::Result<()> {
        {
            let mut st = self.state.lock();
            if let Some(name) = st.index.remove(id) {
                let p = st.packs.get_mut(&name).expect("indexed packs exist");
                if let Some(e) = p.live.remove(id) {
                    p.live_bytes -= e.len as u64;
                }
                p.dirty = true;
                return Ok(());
            }
        }
        match fs::remove_file(self.loose_path(id)) {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<ChunkId>> {
        let mut out: Vec<ChunkId> = self.state.lock().index.keys().copied().collect();
        out.extend(self.loose()?);
        Ok(out)
    }

    fn finish_sweep(&self) -> io::Result<()> {
        let dirty: Vec<(PackName, bool, bool)> = {
            let st = self.state.lock();
            st.packs
                .iter()
                .filter(|(_, p)| p.dirty)
                .map(|(n, p)| {
                    (
                        n.clone(),
                        p.live.is_empty(),
                        p.live_bytes * COMPACT_BELOW < p.bytes,
                    )
                })
                .collect()
        };
        let mut rewritten = false;
        for (name, empty, sparse) in dirty {
            if empty {
                self.state.lock().packs.remove(&name);
                self.remove_pack_files(&name)?;
            } else if sparse {
                self.compact(&name)?;
            } else {
                let st = self.state.lock();
                let Some(p) = st.packs.get(&name) else {
                    continue;
                };
                let entries: Vec<(ChunkId, Entry)> = p.live.iter().map(|(i, e)| (*i, *e)).collect();
                drop(st);
                self.write_index(&name, entries.iter().map(|(i, e)| (i, e)))?;
                rewritten = true;
                if let Some(p) = self.state.lock().packs.get_mut(&name) {
                    p.dirty = false;
                }
            }
        }
        if rewritten {
            fsync_dir(&self.packs_dir)?;
        }
        Ok(())
    }
}

/// Flips byte `at` of a stored chunk in place, on disk (tests of corruption).
#[cfg(test)]
pub(crate) fn flip_byte(dir: &Path, id: &ChunkId, at: u64) {
    let loc = LocalChunks::at(dir)
        .unwrap()
        .locate(id)
        .unwrap()
        .expect("a stored chunk");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&loc.path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, loc.offset + at).unwrap();
    f.write_all_at(&[b[0] ^ 1], loc.offset + at).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: usize, seed: u8) -> Vec<(ChunkId, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let d = vec![seed ^ (i as u8); 1000 + i];
                (ChunkId::of(&d), d)
            })
            .collect()
    }

    /// The files in the packs directory: (pack names with an index, packs, temporary files).
    fn on_disk(dir: &Path) -> (usize, usize, usize) {
        let (mut idx, mut packs, mut tmps) = (0, 0, 0);
        for e in fs::read_dir(dir.join(PACKS)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                tmps += 1;
            } else if name.ends_with(".idx") {
                idx += 1;
            } else if name.ends_with(".pack") {
                packs += 1;
            }
        }
        (idx, packs, tmps)
    }

    fn put_all(b: &LocalChunks, all: &[(ChunkId, Vec<u8>)]) -> Vec<ChunkId> {
        all.iter()
            .filter(|(id, d)| b.put(id, d).unwrap())
            .map(|(id, _)| *id)
            .collect()
    }

    #[test]
    fn a_crash_before_sync_leaves_no_chunk_and_the_next_open_removes_the_pack() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        for (id, d) in blobs(40, 1) {
            assert!(b.put(&id, &d).unwrap());
            // Written, not synced: not a chunk yet.
            assert!(!b.has(&id).unwrap());
            assert_eq!(b.read(&id).unwrap_err().kind(), io::ErrorKind::NotFound);
        }
        assert!(b.list().unwrap().is_empty());
        assert_eq!(on_disk(&dir), (0, 1, 0));
        // Another process reading the store sees nothing either.
        assert!(LocalChunks::at(&dir).unwrap().list().unwrap().is_empty());
        // The process dies here (no sync); the next one opens the store.
        drop(b);
        let b = LocalChunks::open(&dir).unwrap();
        assert_eq!(on_disk(&dir), (0, 0, 0));
        assert!(b.list().unwrap().is_empty());
        assert_eq!(b.pending_count(), 0);
    }

    #[test]
    fn a_failed_early_writeback_fails_the_seal_and_shows_no_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        // Enough bytes for the pack to be flushed early at least once.
        let all: Vec<(ChunkId, Vec<u8>)> = (0..WRITEBACK_BYTES as usize / MAX_CHUNK + 1)
            .map(|i| {
                let d = vec![i as u8; MAX_CHUNK];
                (ChunkId::of(&d), d)
            })
            .collect();
        let written = put_all(&b, &all);
        // What a background flush that met an I/O error leaves for the seal.
        {
            let st = b.state.lock();
            let open = st.open.as_ref().expect("an open pack");
            assert!(open.kicked > 0, "flushed early");
            open.flush_error
                .lock()
                .get_or_insert(io::Error::other("EIO in the background"));
        }
        let e = b.sync(&written).unwrap_err();
        assert!(e.to_string().contains("EIO in the background"), "{e}");
        assert!(!b.has(&all[0].0).unwrap());
        assert_eq!(on_disk(&dir), (0, 0, 0), "the pack went");
    }

    #[test]
    fn sync_seals_one_pack_whose_chunks_read_back_here_and_in_another_process() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        let all = blobs(200, 7);
        let written = put_all(&b, &all);
        assert_eq!(written.len(), 200);
        // A put of a chunk already pending counts as written (the caller syncs it too).
        assert!(b.put(&all[0].0, &all[0].1).unwrap());
        b.sync(&written).unwrap();
        assert_eq!(b.pending_count(), 0);
        assert_eq!(on_disk(&dir), (1, 1, 0));
        for reader in [&b, &LocalChunks::at(&dir).unwrap()] {
            assert_eq!(reader.list().unwrap().len(), 200);
            for (id, d) in &all {
                assert!(reader.has(id).unwrap());
                assert_eq!(&reader.read(id).unwrap(), d);
                let at = reader.locate(id).unwrap().unwrap();
                assert_eq!(at.len as usize, d.len());
            }
        }
        // Present now: not written again.
        assert!(put_all(&b, &all).is_empty());
        // A sync naming chunks another sync sealed succeeds; one naming a chunk nobody
        // wrote fails.
        b.sync(&written).unwrap();
        let ghost = ChunkId::of(b"never put");
        assert_eq!(
            b.sync(&[ghost]).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        drop(b);
        let b = LocalChunks::open(&dir).unwrap();
        assert_eq!(b.list().unwrap().len(), 200);
    }

    #[test]
    fn a_large_write_spans_several_packs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        let n = (PACK_BYTES as usize / MAX_CHUNK) * 2 + 3;
        let all: Vec<(ChunkId, Vec<u8>)> = (0..n)
            .map(|i| {
                let mut d = vec![0u8; MAX_CHUNK];
                d[..8].copy_from_slice(&(i as u64).to_le_bytes());
                (ChunkId::of(&d), d)
            })
            .collect();
        let written = put_all(&b, &all);
        b.sync(&written).unwrap();
        assert_eq!(on_disk(&dir), (3, 3, 0));
        assert_eq!(b.disk_bytes().unwrap(), (n * MAX_CHUNK) as u64);
        for (id, d) in &all {
            assert_eq!(&b.read(id).unwrap(), d);
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
                    let written = put_all(&b, &all);
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
        let listed: BTreeSet<ChunkId> = b.list().unwrap().into_iter().collect();
        assert_eq!(listed, all.iter().map(|(i, _)| *i).collect());
        assert_eq!(b.list().unwrap().len(), 50, "each chunk stored once");
    }

    #[test]
    fn removals_are_durable_after_the_sweep_and_sparse_packs_are_compacted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        let first = blobs(10, 1);
        let second = blobs(10, 2);
        let w = put_all(&b, &first);
        b.sync(&w).unwrap();
        let w = put_all(&b, &second);
        b.sync(&w).unwrap();
        assert_eq!(on_disk(&dir), (2, 2, 0));
        // One chunk of the first pack goes: its index is written again without it.
        b.remove(&first[0].0).unwrap();
        assert!(!b.has(&first[0].0).unwrap());
        b.finish_sweep().unwrap();
        let reader = LocalChunks::at(&dir).unwrap();
        assert!(!reader.has(&first[0].0).unwrap());
        assert_eq!(reader.list().unwrap().len(), 19);
        // Most of the second pack goes: its two live chunks move into a new pack.
        for (id, _) in &second[2..] {
            b.remove(id).unwrap();
        }
        let before = b.disk_bytes().unwrap();
        b.finish_sweep().unwrap();
        assert!(b.disk_bytes().unwrap() < before);
        assert_eq!(on_disk(&dir), (2, 2, 0));
        for (id, d) in first[1..].iter().chain(&second[..2]) {
            assert_eq!(&b.read(id).unwrap(), d);
        }
        // The whole first pack goes: index and pack removed.
        for (id, _) in &first[1..] {
            b.remove(id).unwrap();
        }
        b.finish_sweep().unwrap();
        assert_eq!(on_disk(&dir), (1, 1, 0));
        drop(b);
        let b = LocalChunks::open(&dir).unwrap();
        let listed: BTreeSet<ChunkId> = b.list().unwrap().into_iter().collect();
        assert_eq!(listed, second[..2].iter().map(|(i, _)| *i).collect());
    }

    #[test]
    fn a_compaction_interrupted_leaves_every_live_chunk_readable_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        let all = blobs(10, 5);
        let w = put_all(&b, &all);
        b.sync(&w).unwrap();
        // The new pack sealed, the old one not yet removed: both name the chunks.
        let name = b.state.lock().packs.keys().next().unwrap().clone();
        let copy = "0".repeat(32);
        fs::copy(b.pack_path(&name), b.pack_path(&copy)).unwrap();
        fs::copy(b.index_path(&name), b.index_path(&copy)).unwrap();
        drop(b);
        let b = LocalChunks::open(&dir).unwrap();
        assert_eq!(b.list().unwrap().len(), 10);
        // The second of them holds no live chunk and is removed at open.
        assert_eq!(on_disk(&dir), (1, 1, 0));
        for (id, d) in &all {
            assert_eq!(&b.read(id).unwrap(), d);
        }
    }

    #[test]
    fn a_damaged_index_is_refused_with_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let b = LocalChunks::open(&dir).unwrap();
        let all = blobs(3, 9);
        let w = put_all(&b, &all);
        b.sync(&w).unwrap();
        let name = b.state.lock().packs.keys().next().unwrap().clone();
        drop(b);
        let idx = dir.join(PACKS).join(format!("{name}.idx"));
        let mut bytes = fs::read(&idx).unwrap();
        bytes[20] ^= 1;
        fs::write(&idx, bytes).unwrap();
        let e = LocalChunks::open(&dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&name), "{e}");
    }

    #[test]
    fn loose_chunks_of_an_older_store_are_read_listed_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let (id, d) = blobs(1, 4).remove(0);
        let hex = id.to_hex();
        fs::create_dir_all(dir.join(&hex[..2])).unwrap();
        fs::write(dir.join(&hex[..2]).join(&hex), &d).unwrap();
        fs::write(dir.join(&hex[..2]).join(".tmp-x"), b"half").unwrap();
        let b = LocalChunks::open(&dir).unwrap();
        assert!(!dir.join(&hex[..2]).join(".tmp-x").exists());
        assert!(b.has(&id).unwrap());
        assert_eq!(b.read(&id).unwrap(), d);
        assert_eq!(b.list().unwrap(), vec![id]);
        // Not written again into a pack.
        assert!(!b.put(&id, &d).unwrap());
        b.remove(&id).unwrap();
        assert!(b.list().unwrap().is_empty());
    }
}
