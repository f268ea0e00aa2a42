//! Where an image's chunks lie in the job's packs, recorded next to its manifest.
//!
//! An upload knows, for every chunk of the image, the pack holding it and where (the packs it
//! wrote, and the indexes it read for the chunks the bucket had). It seals that table into
//! the image's manifest object with the manifest, so that a download (a recovery on another
//! resource) reads the chunks it lacks by ranges at once: no listing of the job's objects and
//! no pack index to read first. A listing is the slowest request we make of a Garage cluster
//! (~45 ms each on ours, docs/benchmarks.md); a cold download paid one plus a round of index
//! GETs before its first range.
//!
//! The table stays true for as long as the manifest is in the bucket: packs never change, and
//! a sweep keeps whole every pack holding a chunk of a kept image. A download still checks
//! every chunk (seal and BLAKE3), so a wrong entry costs a clear fault, never wrong bytes; a
//! pack the table names that is gone (swept under a race the sweep does not see) makes the
//! download fall back to a listing.
//!
//! # The manifest object (plaintext, before the seal)
//!
//! ```text
//! "GCAMAN02" | u32 manifest length | manifest.json bytes
//!            | u32 packs | packs × 16-byte pack ID
//!            | u32 entries | entries × (32-byte chunk ID, u32 pack, u64 offset, u32 length)
//! ```
//!
//! All integers little-endian. An object that does not start with the magic is a manifest
//! stored whole by an earlier version (`manifest.json` starts with `{`): it has no table, and
//! its download lists the job's objects as before.

use std::collections::HashMap;
use std::ops::Range;

use gca_store::ChunkId;

const MAGIC: &[u8; 8] = b"GCAMAN02";
const ENTRY: usize = 32 + 4 + 8 + 4;

/// The bytes of a pack's ID (its object name is `…/packs/<hex ID>`).
pub(crate) type PackId = [u8; 16];

/// Where each chunk of one image is: its pack and the range of its sealed bytes there.
#[derive(Clone, Default)]
pub struct Places {
    packs: Vec<PackId>,
    at: HashMap<ChunkId, (u32, Range<u64>)>,
}

/// The same chunks in the same places (whatever the order the packs were numbered in).
impl PartialEq for Places {
    fn eq(&self, other: &Self) -> bool {
        self.at.len() == other.at.len() && self.at.keys().all(|id| self.get(id) == other.get(id))
    }
}

impl Eq for Places {}

impl std::fmt::Debug for Places {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Places")
            .field("chunks", &self.at.len())
            .field("packs", &self.packs.len())
            .finish()
    }
}

impl Places {
    /// Chunks placed.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// The pack holding `id`, and where its sealed bytes are in it.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<(&PackId, Range<u64>)> {
        let (p, r) = self.at.get(id)?;
        Some((&self.packs[*p as usize], r.clone()))
    }
}

/// Builds a [`Places`], one entry per chunk.
#[derive(Debug, Default)]
pub(crate) struct PlacesBuilder {
    places: Places,
    index: HashMap<PackId, u32>,
}

impl PlacesBuilder {
    pub(crate) fn add(&mut self, id: ChunkId, pack: PackId, range: Range<u64>) {
        let next = self.places.packs.len() as u32;
        let p = *self.index.entry(pack).or_insert_with(|| {
            self.places.packs.push(pack);
            next
        });
        self.places.at.insert(id, (p, range));
    }

    pub(crate) fn build(self) -> Places {
        self.places
    }
}

/// The plaintext of a manifest object: the manifest's exact bytes, then the table.
pub(crate) fn encode(manifest: &[u8], places: &Places) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        MAGIC.len() + 12 + manifest.len() + places.packs.len() * 16 + places.at.len() * ENTRY,
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(manifest);
    out.extend_from_slice(&(places.packs.len() as u32).to_le_bytes());
    for p in &places.packs {
        out.extend_from_slice(p);
    }
    // In the chunks' order, so that the same image always seals the same plaintext.
    let mut entries: Vec<_> = places.at.iter().collect();
    entries.sort_by_key(|(id, _)| **id);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (id, (p, r)) in entries {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&((r.end - r.start) as u32).to_le_bytes());
    }
    out
}

/// The manifest's bytes and its table from a manifest object's plaintext; `None` if the
/// object has the magic but is malformed. An object without the magic is a whole manifest
/// with no table (see the module documentation).
pub(crate) fn decode(plain: Vec<u8>) -> Option<(Vec<u8>, Places)> {
    let Some(mut rest) = plain.strip_prefix(&MAGIC[..]) else {
        return Some((plain, Places::default()));
    };
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let len = u32_at(take(4)?) as usize;
    let manifest = take(len)?.to_vec();
    let n_packs = u32_at(take(4)?) as usize;
    let packs = take(n_packs.checked_mul(16)?)?
        .chunks_exact(16)
        .map(|p| p.try_into().expect("16 bytes"))
        .collect::<Vec<PackId>>();
    let n = u32_at(take(4)?) as usize;
    let body = take(n.checked_mul(ENTRY)?)?;
    if !rest.is_empty() {
        return None;
    }
    let mut at = HashMap::with_capacity(n);
    for e in body.chunks_exact(ENTRY) {
        let id = ChunkId::from_bytes(e[..32].try_into().expect("32 bytes"));
        let p = u32_at(&e[32..36]);
        let off = u64::from_le_bytes(e[36..44].try_into().expect("8 bytes"));
        let len = u32_at(&e[44..48]);
        if p as usize >= packs.len() {
            return None;
        }
        at.insert(id, (p, off..off.checked_add(u64::from(len))?));
    }
    Some((manifest, Places { packs, at }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn a_table_round_trips_with_its_manifest() {
        let mut b = PlacesBuilder::default();
        b.add(id(1), [1; 16], 0..100);
        b.add(id(2), [2; 16], 7..9);
        b.add(id(3), [1; 16], 100..300);
        let places = b.build();
        assert_eq!(places.packs.len(), 2, "one entry per pack");
        let manifest = br#"{"format":2}"#;
        let (m, back) = decode(encode(manifest, &places)).unwrap();
        assert_eq!(m, manifest);
        assert_eq!(back, places);
        assert_eq!(back.get(&id(3)), Some((&[1u8; 16], 100..300)));
        assert_eq!(back.get(&id(4)), None);
    }

    #[test]
    fn a_manifest_stored_whole_has_no_table_and_a_damaged_table_is_refused() {
        let whole = br#"{"format":2,"files":[]}"#.to_vec();
        assert_eq!(decode(whole.clone()), Some((whole, Places::default())));

        let mut b = PlacesBuilder::default();
        b.add(id(1), [1; 16], 0..100);
        let good = encode(b"{}", &b.build());
        assert!(
            decode(good[..good.len() - 1].to_vec()).is_none(),
            "truncated"
        );
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(longer).is_none(), "trailing bytes");
        let mut bad_pack = good.clone();
        let at = bad_pack.len() - 16;
        bad_pack[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(decode(bad_pack).is_none(), "an entry naming no pack");
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(huge).is_none(), "a length past the end");
    }
}
