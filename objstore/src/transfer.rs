//! Moving an image's chunks between a local image store and a job's part of the bucket, in
//! packs.
//!
//! Chunks are 16–256 KiB; one object per chunk costs an object store a request and a metadata
//! write each (measured on a 3-node Garage: ~120 chunk PUTs a second whatever the number in
//! flight, 6× slower than PUTs of the same bytes as whole files). So the transfers move
//! **packs**: the chunks an upload sends are sealed one by one as before and concatenated into
//! objects of up to [`PACK_BYTES`], `…/packs/<P>` (`P` random), each followed by its sealed
//! index `…/packs/<P>.index` (the keyed tag, offset and length of every chunk in it). An index
//! is written only after its pack, so an index in the bucket means its pack is whole. Packs
//! never change; a download reads the chunks it needs from them by HTTP ranges (neighbouring
//! ranges are coalesced by the client). Single-chunk objects (`…/chunks/<N>`, what
//! [`gca_store::ChunkBackend::put`] writes) are read too.
//!
//! An upload sends only the chunks the bucket lacks (from the job's indexes, read once and
//! cached: packs never change) and says where every chunk is ([`Places`], sealed into the
//! manifest's object); a download fetches only the chunks the local store lacks, from where
//! the image's places say (listing the job's objects only for chunks they do not place, or
//! when a pack they name is gone). Either is resumed by running it again. A pack goes at a
//! sweep when none of its chunks is kept (its index first, so a pack is never listed without
//! its contents); a pack some of whose chunks are kept stays whole (the space it keeps is
//! bounded by one pack per upload).
//!
//! Sealing, opening and hashing run on blocking threads, never on the runtime's workers.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use gca_store::chunks::ChunkReadError;
use gca_store::{ChunkId, ChunkRef, ImageStore};
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;
use ring::rand::{SecureRandom, SystemRandom};

use crate::places::{PackId, Places, PlacesBuilder};
use crate::{Error, JobChunks, Result};

/// Most plaintext bytes in one pack.
pub const PACK_BYTES: usize = 8 << 20;

/// Requests in flight per transfer (packs, or single-chunk objects).
pub const IN_FLIGHT: usize = 4;

/// The first bytes of a pack index, then per chunk: tag (32), offset (u64 LE), length (u32 LE).
const INDEX_MAGIC: &[u8; 8] = b"GCAPACK1";
const ENTRY: usize = 32 + 8 + 4;

/// What a transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Chunks sent or received.
    pub chunks: usize,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Chunks skipped because the other side had them.
    pub skipped: usize,
    /// Objects written or read for them.
    pub objects: usize,
    /// Whether the job's objects were listed (a download whose image records where its
    /// chunks are does not list them).
    pub listed: bool,
}

/// The distinct chunks of a manifest's files, in order of first use.
pub fn distinct_chunks<'a>(refs: impl IntoIterator<Item = &'a ChunkRef>) -> Vec<ChunkRef> {
    let mut seen = HashSet::new();
    refs.into_iter()
        .filter(|c| seen.insert(c.id))
        .copied()
        .collect()
}

/// One chunk in a pack index: its keyed tag and where its sealed bytes lie.
type Entry = ([u8; 32], Range<u64>);

/// Chunks wanted from one object, with where they lie in it.
type Wanted = Vec<(ChunkRef, Range<u64>)>;

/// What one pack took: its ID, where each chunk is in it, their plaintext bytes.
struct Sent {
    id: PackId,
    chunks: Vec<(ChunkId, Range<u64>)>,
    bytes: u64,
}

/// Where a chunk is in a pack.
#[derive(Debug, Clone)]
struct Slot {
    pack: Arc<str>,
    range: Range<u64>,
}

/// The job's pack indexes read so far, by pack object name.
#[derive(Debug, Default)]
pub(crate) struct PackIndex {
    packs: HashMap<Arc<str>, Vec<Entry>>,
}

/// Where each chunk of the job is, from one listing.
struct Located {
    slots: HashMap<[u8; 32], Slot>,
    /// Single-chunk objects.
    singles: HashSet<String>,
    /// Every pack with its index, and packs listed without one (being written, or left by
    /// an interrupted upload).
    packs: Vec<Arc<str>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Local(format!("a transfer task failed: {e}")))?
}

fn encode_index(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_MAGIC.len() + entries.len() * ENTRY);
    out.extend_from_slice(INDEX_MAGIC);
    for (tag, r) in entries {
        out.extend_from_slice(tag);
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&((r.end - r.start) as u32).to_le_bytes());
    }
    out
}

fn decode_index(plain: &[u8]) -> Option<Vec<Entry>> {
    let body = plain.strip_prefix(&INDEX_MAGIC[..])?;
    if body.len() % ENTRY != 0 {
        return None;
    }
    body.chunks_exact(ENTRY)
        .map(|e| {
            let tag: [u8; 32] = e[..32].try_into().ok()?;
            let off = u64::from_le_bytes(e[32..40].try_into().ok()?);
            let len = u32::from_le_bytes(e[40..44].try_into().ok()?);
            Some((tag, off..off.checked_add(u64::from(len))?))
        })
        .collect()
}

impl JobChunks {
    fn packs_dir(&self) -> String {
        format!("{}/packs", self.dir)
    }

    /// The object name of pack `id`.
    fn pack_name(&self, id: &PackId) -> String {
        format!("{}/{}", self.packs_dir(), hex::encode(id))
    }

    /// The ID in a pack's object name (`None` for a name this version does not write).
    fn pack_id(&self, name: &str) -> Option<PackId> {
        let hex_id = name.strip_prefix(&self.packs_dir())?.strip_prefix('/')?;
        hex::decode(hex_id).ok()?.try_into().ok()
    }

    /// Lists the job's objects once, reads the indexes not read before, and says where every
    /// chunk of the job is.
    async fn locate(&self) -> Result<Located> {
        let (chunks_dir, packs_dir) = (format!("{}/chunks", self.dir), self.packs_dir());
        let (singles, packed) =
            futures::try_join!(self.bucket.list(&chunks_dir), self.bucket.list(&packs_dir))?;
        let indexed: HashSet<&str> = packed
            .iter()
            .filter_map(|n| n.strip_suffix(".index"))
            .collect();
        let packs: Vec<Arc<str>> = packed
            .iter()
            .filter(|n| !n.ends_with(".index"))
            .map(|n| Arc::<str>::from(n.as_str()))
            .collect();
        let unread: Vec<Arc<str>> = {
            let known = self.packs.lock().expect("pack index lock");
            packs
                .iter()
                .filter(|p| indexed.contains(&***p) && !known.packs.contains_key(*p))
                .cloned()
                .collect()
        };
        let read = futures::stream::iter(unread)
            .map(|pack| async move {
                let name = format!("{pack}.index");
                let path = ObjectPath::from(name.as_str());
                let body = self
                    .bucket
                    .each(|s| {
                        let path = path.clone();
                        async move { s.get(&path).await?.bytes().await }
                    })
                    .await?;
                let plain = self.open_blob(&name, &body, "a pack index")?;
                let entries = decode_index(&plain).ok_or_else(|| {
                    Error::Corrupt(format!(
                        "the pack index {name} of job {:?} is malformed",
                        self.gid
                    ))
                })?;
                Ok::<_, Error>((pack, entries))
            })
            .buffer_unordered(IN_FLIGHT * 4)
            .try_collect::<Vec<_>>()
            .await?;
        let mut known = self.packs.lock().expect("pack index lock");
        known.packs.extend(read);
        // A pack read before and gone since (swept by another CTS) locates nothing.
        let listed: HashSet<&str> = packs.iter().map(|p| &**p).collect();
        known
            .packs
            .retain(|p, _| listed.contains(&**p) && indexed.contains(&**p));
        let mut slots = HashMap::new();
        for (pack, entries) in &known.packs {
            for (tag, range) in entries {
                slots.insert(
                    *tag,
                    Slot {
                        pack: pack.clone(),
                        range: range.clone(),
                    },
                );
            }
        }
        Ok(Located {
            slots,
            singles: singles.into_iter().collect(),
            packs,
        })
    }

    /// A chunk's sealed bytes from the pack holding it, if one does (for the single-chunk
    /// [`gca_store::ChunkBackend`] calls: a fresh listing each time).
    pub(crate) async fn read_packed(&self, id: &ChunkId) -> Result<Option<bytes::Bytes>> {
        let located = self.locate().await?;
        let Some(slot) = located.slots.get(&self.chunk_tag(id)) else {
            return Ok(None);
        };
        let path = ObjectPath::from(&*slot.pack);
        let range = slot.range.clone();
        let sealed = self
            .bucket
            .each(|s| {
                let (path, range) = (path.clone(), range.clone());
                async move { s.get_range(&path, range).await }
            })
            .await?;
        Ok(Some(sealed))
    }

    /// Whether a pack holds the chunk.
    pub(crate) async fn is_packed(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.locate().await?.slots.contains_key(&self.chunk_tag(id)))
    }

    /// Uploads the chunks of `refs` that the bucket does not hold yet, in packs, each chunk
    /// read back from `store` and checked against its name first (a corrupt local chunk is
    /// refused, never sealed and sent). Returns also where every packed chunk of `refs` is,
    /// which the caller gives [`JobChunks::put_manifest`] after this returns.
    pub async fn upload_chunks(
        self: &Arc<Self>,
        store: &ImageStore,
        refs: &[ChunkRef],
    ) -> Result<(Moved, Places)> {
        let located = self.locate().await?;
        let mut places = PlacesBuilder::default();
        let mut missing = Vec::new();
        for r in refs {
            if let Some(slot) = located.slots.get(&self.chunk_tag(&r.id)) {
                if let Some(pack) = self.pack_id(&slot.pack) {
                    places.add(r.id, pack, slot.range.clone());
                }
            } else if !located.singles.contains(&self.chunk_name(&r.id)) {
                missing.push(*r);
            }
        }
        let skipped = refs.len() - missing.len();
        let mut groups: Vec<Vec<ChunkRef>> = Vec::new();
        let mut filled = PACK_BYTES;
        for r in missing {
            if filled + r.size as usize > PACK_BYTES {
                groups.push(Vec::new());
                filled = 0;
            }
            filled += r.size as usize;
            groups.last_mut().expect("a group").push(r);
        }
        let objects = groups.len();
        let sent = futures::stream::iter(groups)
            .map(|group| self.upload_pack(store, group))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<Sent>>()
            .await?;
        let mut moved = Moved {
            skipped,
            objects,
            listed: true,
            ..Moved::default()
        };
        for pack in sent {
            moved.chunks += pack.chunks.len();
            moved.bytes += pack.bytes;
            for (id, range) in pack.chunks {
                places.add(id, pack.id, range);
            }
        }
        Ok((moved, places.build()))
    }

    /// One pack: its chunks read, sealed and concatenated, PUT, then its index.
    async fn upload_pack(
        self: &Arc<Self>,
        store: &ImageStore,
        group: Vec<ChunkRef>,
    ) -> Result<Sent> {
        let mut id: PackId = [0u8; 16];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Error::Sealed("no random numbers for a pack name".into()))?;
        let pack: Arc<str> = self.pack_name(&id).into();
        let ids: Vec<ChunkId> = group.iter().map(|r| r.id).collect();
        let (job, store) = (self.clone(), store.clone());
        let (body, entries, plain) = blocking(move || {
            let mut body = Vec::with_capacity(PACK_BYTES + group.len() * 16);
            let mut entries = Vec::with_capacity(group.len());
            let mut plain = 0u64;
            for r in &group {
                let data = store.chunks().read_verified(r).map_err(|e| match e {
                    ChunkReadError::Missing => {
                        Error::Local(format!("local chunk {} is missing", r.id))
                    }
                    ChunkReadError::Corrupt(why) => {
                        Error::Local(format!("local chunk {} is corrupt: {why}", r.id))
                    }
                    ChunkReadError::Io(e) => Error::Local(format!("local chunk {}: {e}", r.id)),
                })?;
                let sealed = job.seal_chunk(&job.chunk_name(&r.id), &r.id, &data);
                let start = body.len() as u64;
                body.extend_from_slice(&sealed);
                entries.push((job.chunk_tag(&r.id), start..body.len() as u64));
                plain += data.len() as u64;
            }
            Ok((bytes::Bytes::from(body), entries, plain))
        })
        .await?;
        let index_name = format!("{pack}.index");
        let index = bytes::Bytes::from(self.seal_blob(&index_name, &encode_index(&entries))?);
        for (name, body) in [(&*pack, body), (index_name.as_str(), index)] {
            let path = ObjectPath::from(name);
            self.bucket
                .each(|s| {
                    let (path, body) = (path.clone(), body.clone());
                    async move { s.put(&path, PutPayload::from(body)).await }
                })
                .await?;
        }
        let chunks = ids
            .into_iter()
            .zip(entries.iter().map(|(_, r)| r.clone()))
            .collect();
        self.packs
            .lock()
            .expect("pack index lock")
            .packs
            .insert(pack, entries);
        Ok(Sent {
            id,
            chunks,
            bytes: plain,
        })
    }

    /// Downloads the chunks of `refs` that `store` lacks into it: each is opened (its seal
    /// checked: a chunk altered in the bucket fails here, named) and hashed against its name
    /// before it is written; then one sync of what was written. `places` (from
    /// [`JobChunks::get_image`]) says where the chunks are; the job's objects are listed
    /// only for chunks it does not place, or if a pack it names is gone. The caller pins the
    /// chunks first and commits the manifest after this returns.
    pub async fn download_chunks(
        self: &Arc<Self>,
        store: &ImageStore,
        refs: &[ChunkRef],
        places: &Places,
    ) -> Result<Moved> {
        match self.download_placed(store, refs, places).await {
            Err(Error::Store {
                source: object_store::Error::NotFound { path, .. },
                ..
            }) if !places.is_empty() => {
                tracing::warn!(job = %self.gid, object = %path,
                    "a pack the image's manifest names is gone; listing the job's objects");
                self.download_placed(store, refs, &Places::default()).await
            }
            r => r,
        }
    }

    async fn download_placed(
        self: &Arc<Self>,
        store: &ImageStore,
        refs: &[ChunkRef],
        places: &Places,
    ) -> Result<Moved> {
        let missing = {
            let (store, refs) = (store.clone(), refs.to_vec());
            blocking(move || {
                let local = store.chunks().backend();
                let mut missing = Vec::new();
                for r in refs {
                    let have = local
                        .has(&r.id)
                        .map_err(|e| Error::Local(format!("local chunk lookup: {e}")))?;
                    if !have {
                        missing.push(r);
                    }
                }
                Ok(missing)
            })
            .await?
        };
        let skipped = refs.len() - missing.len();
        let mut located = None;
        // Per pack, the chunks wanted from it in the order they lie; single objects apart.
        let mut by_pack: HashMap<Arc<str>, Wanted> = HashMap::new();
        let mut names: HashMap<PackId, Arc<str>> = HashMap::new();
        let mut singles = Vec::new();
        for r in missing {
            // A place is taken only with the length a sealed chunk of this size has.
            let sealed_len = u64::from(r.size) + ring::aead::AES_256_GCM.tag_len() as u64;
            let placed = places
                .get(&r.id)
                .filter(|(_, range)| range.end - range.start == sealed_len);
            if let Some((pack, range)) = placed {
                let name = names
                    .entry(*pack)
                    .or_insert_with(|| self.pack_name(pack).into());
                by_pack.entry(name.clone()).or_default().push((r, range));
                continue;
            }
            if located.is_none() {
                located = Some(self.locate().await?);
            }
            let located = located.as_ref().expect("located above");
            if let Some(slot) = located.slots.get(&self.chunk_tag(&r.id)) {
                by_pack
                    .entry(slot.pack.clone())
                    .or_default()
                    .push((r, slot.range.clone()));
            } else if located.singles.contains(&self.chunk_name(&r.id)) {
                singles.push(r);
            } else {
                return Err(Error::Corrupt(format!(
                    "chunk {} is in no object of job {:?} in the object store (the image there is incomplete)",
                    r.id, self.gid
                )));
            }
        }
        let mut reads: Vec<(Option<Arc<str>>, Wanted)> = by_pack
            .into_iter()
            .map(|(p, mut v)| {
                v.sort_by_key(|(_, range)| range.start);
                (Some(p), v)
            })
            .collect();
        reads.extend(singles.into_iter().map(|r| (None, vec![(r, 0..0)])));
        let objects = reads.len();
        let written = futures::stream::iter(reads)
            .map(|(pack, wanted)| self.download_from(store, pack, wanted))
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<Vec<ChunkRef>>>()
            .await?;
        let written: Vec<ChunkRef> = written.into_iter().flatten().collect();
        let ids: Vec<ChunkId> = written.iter().map(|r| r.id).collect();
        let synced = store.clone();
        blocking(move || {
            synced
                .chunks()
                .backend()
                .sync(&ids)
                .map_err(|e| Error::Local(format!("syncing the downloaded chunks: {e}")))
        })
        .await?;
        Ok(Moved {
            chunks: written.len(),
            bytes: written.iter().map(|r| u64::from(r.size)).sum(),
            skipped,
            objects,
            listed: located.is_some(),
        })
    }

    /// The wanted chunks of one pack (by ranges), or one single-chunk object (`pack` None),
    /// opened, checked and stored.
    async fn download_from(
        self: &Arc<Self>,
        store: &ImageStore,
        pack: Option<Arc<str>>,
        wanted: Wanted,
    ) -> Result<Vec<ChunkRef>> {
        let sealed: Vec<bytes::Bytes> = match &pack {
            Some(pack) => {
                let path = ObjectPath::from(&**pack);
                let ranges: Vec<Range<u64>> = wanted.iter().map(|(_, r)| r.clone()).collect();
                self.bucket
                    .each(|s| {
                        let (path, ranges) = (path.clone(), ranges.clone());
                        async move { s.get_ranges(&path, &ranges).await }
                    })
                    .await?
            }
            None => {
                let path = ObjectPath::from(self.chunk_name(&wanted[0].0.id).as_str());
                vec![
                    self.bucket
                        .each(|s| {
                            let path = path.clone();
                            async move { s.get(&path).await?.bytes().await }
                        })
                        .await?,
                ]
            }
        };
        let (job, store) = (self.clone(), store.clone());
        blocking(move || {
            let local = store.chunks().backend();
            let mut done = Vec::with_capacity(wanted.len());
            for ((r, _), sealed) in wanted.into_iter().zip(sealed) {
                let data = job.open_sealed_chunk(&job.chunk_name(&r.id), &r.id, sealed.to_vec())?;
                if data.len() != r.size as usize || ChunkId::of(&data) != r.id {
                    return Err(Error::Corrupt(format!(
                        "chunk {} of job {:?} in the object store does not match its name",
                        r.id, job.gid
                    )));
                }
                local
                    .put(&r.id, &data)
                    .map_err(|e| Error::Local(format!("storing chunk {}: {e}", r.id)))?;
                done.push(r);
            }
            Ok(done)
        })
        .await
    }

    /// The pack part of [`JobChunks::sweep`]: every pack none of whose chunks `keep` names
    /// goes, its index first. Returns how many packs went. Packs without an index (being
    /// written now) are left alone.
    pub(crate) async fn sweep_packs(&self, keep: &BTreeSet<ChunkId>) -> Result<usize> {
        let located = self.locate().await?;
        let kept: HashSet<[u8; 32]> = keep.iter().map(|id| self.chunk_tag(id)).collect();
        let doomed: Vec<Arc<str>> = {
            let known = self.packs.lock().expect("pack index lock");
            located
                .packs
                .iter()
                .filter(|p| {
                    known
                        .packs
                        .get(*p)
                        .is_some_and(|entries| !entries.iter().any(|(t, _)| kept.contains(t)))
                })
                .cloned()
                .collect()
        };
        let n = doomed.len();
        futures::stream::iter(doomed)
            .map(|pack| async move {
                for name in [format!("{pack}.index"), pack.to_string()] {
                    self.bucket.delete(&ObjectPath::from(name.as_str())).await?;
                }
                self.packs
                    .lock()
                    .expect("pack index lock")
                    .packs
                    .remove(&pack);
                Ok(())
            })
            .buffer_unordered(IN_FLIGHT * 4)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_a_damaged_one_is_refused() {
        let entries = vec![([7u8; 32], 0..100), ([9u8; 32], 100..4196)];
        let bytes = encode_index(&entries);
        assert_eq!(decode_index(&bytes), Some(entries));
        assert_eq!(decode_index(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_index(b"GCAPACK2"), None);
        let mut overflow = INDEX_MAGIC.to_vec();
        overflow.extend_from_slice(&[1u8; 32]);
        overflow.extend_from_slice(&u64::MAX.to_le_bytes());
        overflow.extend_from_slice(&8u32.to_le_bytes());
        assert_eq!(decode_index(&overflow), None);
    }
}
