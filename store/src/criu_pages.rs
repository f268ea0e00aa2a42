//! Chunk boundaries for CRIU's page files, from their pagemaps (no content-defined cut).
//!
//! CRIU writes a process's memory into `pages-<N>.img`: the present pages one after the other,
//! in the order `pagemap-<pid>.img` lists them (a head naming `N`, then entries of `vaddr`,
//! `nr_pages` and `flags`; the pages of an entry flagged `PE_PRESENT` are in the file). A
//! content-defined cut (FastCDC) finds boundaries again after pages appear or vanish, but its
//! rolling hash costs more than the chunk hash itself. The pagemap says where every page came
//! from, so a page file is cut at **virtual-address windows** instead: a chunk is the pages of
//! one [`WINDOW`]-aligned range of the address space. A page changed, added or removed changes
//! the chunk of its window only, wherever the other pages move in the file, and the cut costs
//! nothing but reading the pagemap.
//!
//! Any boundaries make a valid image (a manifest lists chunks that concatenate to the file,
//! whatever their sizes), so this only has to be right to dedup well: a pagemap that does not
//! parse, or whose present pages do not add up to the page file's size, leaves that file to
//! FastCDC.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The address-space window one chunk covers (16 pages of 4 KiB).
pub const WINDOW: u64 = 64 * 1024;
const PAGE: u64 = 4096;
/// `IMG_COMMON_MAGIC`, then `PAGEMAP_MAGIC` (CRIU's `magic.h`).
const MAGICS: [u32; 2] = [0x5456_4319, 0x5608_4025];
const PE_PARENT: u64 = 1;
const PE_PRESENT: u64 = 4;
/// A pagemap larger than this is not read (a real one has an entry per run of pages).
const MAX_PAGEMAP: u64 = 64 << 20;

/// For each page file among `paths` that a pagemap among them describes: the lengths of its
/// chunks, in file order.
pub(crate) fn page_file_cuts(paths: &[PathBuf]) -> HashMap<PathBuf, Vec<u32>> {
    let mut out = HashMap::new();
    for p in paths {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let Some((pages_id, runs)) = read_pagemap(p) else {
            continue;
        };
        let Some(dir) = p.parent() else { continue };
        let pages = dir.join(format!("pages-{pages_id}.img"));
        if !paths.contains(&pages) {
            continue;
        }
        let Ok(len) = fs::metadata(&pages).map(|m| m.len()) else {
            continue;
        };
        if let Some(cuts) = window_cuts(&runs, len) {
            out.insert(pages, cuts);
        }
    }
    out
}

/// The chunk lengths of a page file whose present pages are `runs` (vaddr, pages), if they
/// fill exactly `file_len` bytes.
fn window_cuts(runs: &[(u64, u64)], file_len: u64) -> Option<Vec<u32>> {
    let mut cuts = Vec::new();
    let mut total: u64 = 0;
    // The window the current chunk covers, and its length so far.
    let mut cur: Option<(u64, u64)> = None;
    for &(vaddr, pages) in runs {
        if vaddr % PAGE != 0 {
            return None;
        }
        let end = vaddr.checked_add(pages.checked_mul(PAGE)?)?;
        let mut a = vaddr;
        while a < end {
            let w = a / WINDOW;
            let next = ((w + 1) * WINDOW).min(end);
            let bytes = next - a;
            match &mut cur {
                Some((cw, n)) if *cw == w => *n += bytes,
                _ => {
                    if let Some((_, n)) = cur.take() {
                        cuts.push(n as u32);
                    }
                    cur = Some((w, bytes));
                }
            }
            total = total.checked_add(bytes)?;
            a = next;
        }
    }
    if let Some((_, n)) = cur {
        cuts.push(n as u32);
    }
    (total == file_len).then_some(cuts)
}

/// The pagemap's page file number and its present runs (vaddr, number of pages), in order.
fn read_pagemap(path: &Path) -> Option<(u64, Vec<(u64, u64)>)> {
    if fs::metadata(path).ok()?.len() > MAX_PAGEMAP {
        return None;
    }
    let b = fs::read(path).ok()?;
    let mut i = 0;
    for m in MAGICS {
        if u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) != m {
            return None;
        }
        i += 4;
    }
    let mut pages_id = None;
    let mut runs = Vec::new();
    while i < b.len() {
        let n = u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as usize;
        i += 4;
        let msg = b.get(i..i.checked_add(n)?)?;
        i += n;
        let fields = varint_fields(msg)?;
        let get = |k: u32| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| *v);
        if pages_id.is_none() {
            // The head: pages_id = 1.
            pages_id = Some(get(1)?);
            continue;
        }
        let (vaddr, nr) = (get(1)?, get(2)?);
        let present = match get(4) {
            Some(flags) => flags & PE_PRESENT != 0,
            // Before flags: `in_parent` (3) or in this file.
            None => get(3).unwrap_or(0) & PE_PARENT == 0,
        };
        if present {
            runs.push((vaddr, nr));
        }
    }
    Some((pages_id?, runs))
}

/// The varint fields of a protobuf message (field number, value); `None` if it has fields of
/// another wire type or does not parse.
fn varint_fields(msg: &[u8]) -> Option<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        let key = varint(msg, &mut i)?;
        if key & 7 != 0 {
            return None;
        }
        let v = varint(msg, &mut i)?;
        out.push(((key >> 3) as u32, v));
    }
    Some(out)
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let c = *b.get(*i)?;
        *i += 1;
        v |= ((c & 0x7f) as u64) << shift;
        if c < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn enc_varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let c = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(c);
                return;
            }
            out.push(c | 0x80);
        }
    }

    fn message(fields: &[(u32, u64)]) -> Vec<u8> {
        let mut m = Vec::new();
        for &(k, v) in fields {
            enc_varint((k as u64) << 3, &mut m);
            enc_varint(v, &mut m);
        }
        m
    }

    /// A `pagemap-<pid>.img` naming `pages-<pages_id>.img`, with entries (vaddr, pages, flags).
    pub(crate) fn pagemap(pages_id: u64, entries: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        for m in MAGICS {
            b.extend_from_slice(&m.to_le_bytes());
        }
        let mut push = |m: Vec<u8>| {
            b.extend_from_slice(&(m.len() as u32).to_le_bytes());
            b.extend_from_slice(&m);
        };
        push(message(&[(1, pages_id)]));
        for &(vaddr, nr, flags) in entries {
            push(message(&[(1, vaddr), (2, nr), (4, flags)]));
        }
        b
    }

    #[test]
    fn page_files_are_cut_at_address_windows_and_a_new_page_changes_one_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = 0x7f00_0000_0000u64;
        // 3 pages at the end of one window, 20 in the next two, one in parent (not in the
        // file), 1 far away.
        let entries = [
            (base + 13 * PAGE, 23, PE_PRESENT),
            (base + 100 * PAGE, 4, PE_PARENT),
            (base + 1000 * PAGE, 1, PE_PRESENT | 2),
        ];
        fs::write(dir.join("pagemap-7.img"), pagemap(3, &entries)).unwrap();
        fs::write(dir.join("pages-3.img"), vec![0u8; 24 * PAGE as usize]).unwrap();
        let paths = vec![dir.join("pagemap-7.img"), dir.join("pages-3.img")];
        let cuts = page_file_cuts(&paths);
        let p = PAGE as u32;
        assert_eq!(
            cuts[&dir.join("pages-3.img")],
            vec![3 * p, 16 * p, 4 * p, p]
        );

        // A page appears before all of them: the other windows' chunks stay the same.
        let mut more = vec![(base, 1, PE_PRESENT)];
        more.extend_from_slice(&entries);
        fs::write(dir.join("pagemap-7.img"), pagemap(3, &more)).unwrap();
        fs::write(dir.join("pages-3.img"), vec![0u8; 25 * PAGE as usize]).unwrap();
        let cuts = page_file_cuts(&paths);
        assert_eq!(
            cuts[&dir.join("pages-3.img")],
            vec![4 * p, 16 * p, 4 * p, p]
        );
    }

    #[test]
    fn a_pagemap_that_does_not_add_up_or_parse_leaves_the_file_to_fastcdc() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let paths = vec![dir.join("pagemap-7.img"), dir.join("pages-1.img")];
        fs::write(dir.join("pages-1.img"), vec![0u8; 5 * PAGE as usize]).unwrap();
        // 4 pages listed, 5 in the file.
        fs::write(dir.join("pagemap-7.img"), pagemap(1, &[(0, 4, PE_PRESENT)])).unwrap();
        assert!(page_file_cuts(&paths).is_empty());
        // Not a pagemap.
        fs::write(dir.join("pagemap-7.img"), b"garbage").unwrap();
        assert!(page_file_cuts(&paths).is_empty());
        // A truncated entry.
        let mut b = pagemap(1, &[(0, 5, PE_PRESENT)]);
        b.truncate(b.len() - 1);
        fs::write(dir.join("pagemap-7.img"), b).unwrap();
        assert!(page_file_cuts(&paths).is_empty());
        // Right: cut.
        fs::write(dir.join("pagemap-7.img"), pagemap(1, &[(0, 5, PE_PRESENT)])).unwrap();
        assert_eq!(page_file_cuts(&paths).len(), 1);
    }
}
