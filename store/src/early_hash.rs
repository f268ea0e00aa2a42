//! CRIU's page files hashed while CRIU writes them, on a core the dump leaves idle.
//!
//! The bulk of a CRIU image is `pages-<N>.img`, and hashing it after the dump was most of
//! what a checkpoint cost beyond `criu dump` itself (docs/benchmarks.md). CRIU writes a page
//! file front to back and never goes back (it opens it truncated and appends each batch of
//! pages as it drains them from the job), and a file's size grows only once the bytes below
//! it are in the page cache; so the bytes below the size a reader sees are final, and a
//! thread can hash them while the dump goes on.
//!
//! What it cannot know yet is where the chunks begin: the cut follows the pagemap
//! (`criu_pages`), which CRIU writes at the end. The guess is the cut of the same file in
//! the job's previous image: while the job keeps its mappings and changes some pages, its
//! pagemap, and so its cut, is the same from one checkpoint to the next. At the commit the
//! cut takes a digest found here only for a chunk at the same offset with the same length,
//! and hashes the rest itself. A chunk whose digest was found early and that the store has
//! is not read again; one the store lacks is read and hashed at the commit, so what a
//! backend stores is always hashed from the bytes it gets. A wrong guess costs the work done
//! on the idle core, nothing else.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::chunks::{ChunkId, MAX_CHUNK};

/// Digests found early: per file (its full path), per chunk offset, the chunk's length and
/// name.
pub(crate) type Known = HashMap<PathBuf, HashMap<u64, (u32, ChunkId)>>;

/// How long the thread waits before looking at a file's size again.
const POLL: Duration = Duration::from_millis(1);
/// The most it reads at once.
const BATCH: usize = 1 << 20;

/// A thread hashing files as they grow, along guessed chunk lengths. Stopped by
/// [`EarlyHash::finish`] (which returns what it found) or on drop.
#[derive(Debug)]
pub(crate) struct EarlyHash {
    stop: Arc<AtomicBool>,
    /// Bytes hashed so far.
    hashed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Known>>,
}

impl EarlyHash {
    /// Starts hashing `files` (full path, guessed chunk lengths), one after the other, as
    /// each appears and grows.
    pub(crate) fn start(files: Vec<(PathBuf, Vec<u32>)>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let hashed = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), hashed.clone());
        let thread = std::thread::Builder::new()
            .name("early-hash".into())
            .spawn(move || hash_growing(files, &flag, &count))?;
        Ok(EarlyHash {
            stop,
            hashed,
            thread: Some(thread),
        })
    }

    /// How many bytes it has hashed so far.
    pub(crate) fn hashed_bytes(&self) -> u64 {
        self.hashed.load(Ordering::Acquire)
    }

    /// Stops the thread once its current read is hashed (the writer is done: what is left is
    /// the commit's) and returns what it found.
    pub(crate) fn finish(mut self) -> Known {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(known)) => known,
            _ => Known::new(),
        }
    }
}

impl Drop for EarlyHash {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn hash_growing(files: Vec<(PathBuf, Vec<u32>)>, stop: &AtomicBool, hashed: &AtomicU64) -> Known {
    let mut known = Known::new();
    let mut buf = vec![0u8; BATCH];
    let stopped = || stop.load(Ordering::Acquire);
    for (path, mut cuts) in files {
        // A guess can only be followed up to its first impossible chunk length.
        if let Some(bad) = cuts
            .iter()
            .position(|&len| len == 0 || len as usize > MAX_CHUNK)
        {
            cuts.truncate(bad);
        }
        let file = loop {
            match File::open(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::NotFound && !stopped() => {
                    std::thread::sleep(POLL)
                }
                Err(_) => return known,
            }
        };
        let found = known.entry(path).or_default();
        let (mut next, mut offset) = (0usize, 0u64);
        while next < cuts.len() && !stopped() {
            let Ok(size) = file.metadata().map(|m| m.len()) else {
                return known;
            };
            // The guessed chunks wholly below the size, at most BATCH bytes of them.
            let (mut end, mut last) = (offset, next);
            while let Some(&len) = cuts.get(last) {
                let len = len as u64;
                if end + len > size || end + len - offset > BATCH as u64 {
                    break;
                }
                end += len;
                last += 1;
            }
            if last == next {
                std::thread::sleep(POLL);
                continue;
            }
            let data = &mut buf[..(end - offset) as usize];
            if file.read_exact_at(data, offset).is_err() {
                return known;
            }
            let mut at = 0usize;
            for &len in &cuts[next..last] {
                let bytes = &data[at..at + len as usize];
                found.insert(offset + at as u64, (len, ChunkId::of(bytes)));
                at += len as usize;
            }
            hashed.fetch_add(end - offset, Ordering::Release);
            (next, offset) = (last, end);
        }
        if stopped() {
            break;
        }
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn hashes_a_file_as_it_grows_and_stops_when_told() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pages-1.img");
        let chunk = |n: u8| vec![n; 64 * 1024];
        // Guessed: three chunks of 64 KiB, a fourth that never comes.
        let early = EarlyHash::start(vec![(path.clone(), vec![65536; 4])]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut f = std::fs::File::create(&path).unwrap();
        for n in 0..3u8 {
            f.write_all(&chunk(n)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        // Half a chunk: not hashed (it is not whole yet).
        f.write_all(&[9u8; 1000]).unwrap();
        // Wait until the thread has caught up, then stop it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while early.hashed_bytes() < 3 * 65536 {
            assert!(
                std::time::Instant::now() < deadline,
                "the file was not hashed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(5));
        let known = early.finish();
        let found = &known[&path];
        assert_eq!(found.len(), 3, "{found:?}");
        for n in 0..3u8 {
            assert_eq!(
                found[&(n as u64 * 65536)],
                (65536, ChunkId::of(&chunk(n))),
                "chunk {n}"
            );
        }
    }

    /// Through the store's API as the CTS uses it: the second image of a job whose page file
    /// is written while the staging hashes it. The writer here breaks CRIU's rule on purpose
    /// (it rewrites a window already written) to show that the commit took the digest found
    /// while the file grew, for a chunk the store had: the early path ran.
    #[tokio::test]
    async fn a_page_file_written_during_the_staging_is_hashed_as_it_grows() {
        use crate::store::tests::{id, meta};
        use crate::ImageStore;
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(tmp.path(), None).unwrap();
        let base = 0x7f00_0000_0000u64;
        let map = crate::criu_pages::tests::pagemap(1, &[(base, 16 * 8, 4)]);
        let window = |n: u8| vec![n; 64 * 1024];
        let pages: Vec<u8> = (0..8u8).flat_map(window).collect();

        let first = store.stage(&id("img-1")).await.unwrap();
        std::fs::write(first.dir.join("pagemap-7.img"), &map).unwrap();
        std::fs::write(first.dir.join("pages-1.img"), &pages).unwrap();
        let m1 = first.commit(meta("job")).await.unwrap();

        let mut second = store.stage(&id("img-2")).await.unwrap();
        second.hash_page_files_early(&id("img-1")).await;
        let dir = second.dir.clone();
        let writer = std::thread::spawn(move || -> std::fs::File {
            let mut f = std::fs::File::create(dir.join("pages-1.img")).unwrap();
            for n in 0..8u8 {
                // Window 5 changed since the first image.
                f.write_all(&window(if n == 5 { 50 } else { n })).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            f
        });
        let f = writer.join().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while second.early_hashed_bytes() < pages.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the page file was not hashed"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // (Against CRIU's rule) window 2 rewritten after it was hashed.
        f.write_all_at(&window(20), 2 * 65536).unwrap();
        std::fs::write(second.dir.join("pagemap-7.img"), &map).unwrap();
        let m2 = second.commit(meta("job")).await.unwrap();
        let c1 = &m1
            .files
            .iter()
            .find(|f| f.path == "pages-1.img")
            .unwrap()
            .chunks;
        let c2 = &m2
            .files
            .iter()
            .find(|f| f.path == "pages-1.img")
            .unwrap()
            .chunks;
        assert_eq!(c2.len(), 8);
        // Window 2: the digest found while the file grew (the store had that chunk).
        assert_eq!(c2[2], c1[2]);
        // Window 5: new, hashed (early or at the commit) from what is on disk, and stored.
        assert_eq!(c2[5].id, ChunkId::of(&window(50)));
        assert_eq!(store.chunks().read_verified(&c2[5]).unwrap(), window(50));
        for n in [0, 1, 3, 4, 6, 7] {
            assert_eq!(c2[n], c1[n], "window {n}");
        }
        store.verify(&id("img-2")).await.unwrap();
    }

    #[test]
    fn a_file_that_never_appears_finds_nothing_and_stops() {
        let tmp = tempfile::tempdir().unwrap();
        let early = EarlyHash::start(vec![(tmp.path().join("pages-1.img"), vec![4096])]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(early.finish().values().all(|m| m.is_empty()));
    }
}
