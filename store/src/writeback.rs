//! Early writeback of packs being written: a pack that grew by [`WRITEBACK_BYTES`] since the
//! last kick has its data flushed (`fdatasync`) by a background thread while writers go on
//! appending, so that the seal's own fsync (the one durability counts on,
//! [`crate::local_chunks`]) finds little left to write: the disk works during a fetch or a
//! cut instead of after it (docs/benchmarks.md).
//!
//! This changes nothing in the write order: a pack is durable only once the seal's fsync has
//! returned. An error of a background flush is kept for the seal, which fails with it (an
//! error the kernel reported to one flush is not reported again to a later fsync of the same
//! file).

use std::fs::File;
use std::io;
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;

/// A pack is flushed early every this many bytes written.
pub(crate) const WRITEBACK_BYTES: u64 = 8 << 20;

/// The error of a background flush of one pack, kept for its seal.
pub(crate) type FlushError = Arc<Mutex<Option<io::Error>>>;

#[derive(Debug)]
struct Job {
    file: Arc<File>,
    error: FlushError,
}

/// The flusher of one store: a thread started at the first kick, ended when the store goes.
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Writeback {
    /// Asks for `file`'s written data to be flushed soon; an error goes into `error`.
    pub(crate) fn kick(&self, file: &Arc<File>, error: &FlushError) {
        let job = Job {
            file: file.clone(),
            error: error.clone(),
        };
        let mut tx = self.tx.lock();
        let job = match tx.as_ref() {
            Some(t) => match t.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (t, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("gca-store-writeback".into())
            .spawn(move || flusher(rx));
        if let Err(e) = started {
            // Only early writeback is lost: the seal flushes everything anyway.
            tracing::debug!(error = %e, "cannot start the store's writeback thread");
            return;
        }
        let _ = t.send(job);
        *tx = Some(t);
    }
}

fn flusher(rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        // Kicks that queued up meanwhile: each file once.
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            if !jobs.iter().any(|k| Arc::ptr_eq(&k.file, &j.file)) {
                jobs.push(j);
            }
        }
        for j in jobs {
            // Held during the flush: a seal that fsyncs meanwhile waits here before it looks
            // for an error, so one this flush took from the kernel is never missed.
            let mut error = j.error.lock();
            if let Err(e) = j.file.sync_data() {
                error.get_or_insert(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_kicked_file_is_flushed_and_its_error_kept() {
        let wb = Writeback::default();
        let tmp = tempfile::tempdir().unwrap();
        let mut f = File::create(tmp.path().join("p")).unwrap();
        f.write_all(b"bytes").unwrap();
        let f = Arc::new(f);
        let err: FlushError = Default::default();
        wb.kick(&f, &err);
        wb.kick(&f, &err);
        // The thread holds a clone of the file until its flush is done.
        for _ in 0..500 {
            if Arc::strong_count(&f) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(Arc::strong_count(&f), 1, "flushed and let go");
        assert!(err.lock().is_none());

        // A file that cannot be flushed (a pipe, here: fdatasync answers EINVAL): its error
        // waits for the seal.
        let (r, _w) = std::io::pipe().unwrap();
        let pipe = Arc::new(File::from(std::os::fd::OwnedFd::from(r)));
        wb.kick(&pipe, &err);
        for _ in 0..500 {
            if err.lock().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(err.lock().is_some(), "the flush's error is kept");
    }
}
