//! The CTS's link to the GCS: instance registration (repeated as a heartbeat, and at once
//! when the GCS comes back after being unreachable) and the **outbox**, an ordered, on-disk
//! queue of everything the GCS must learn (jobs registered, checkpoints taken, jobs finished).
//!
//! Every message to the GCS goes through the outbox, in order, so a checkpoint is never
//! registered before its job and a record taken while the GCS is down is delivered when it is
//! back: a checkpoint that was taken is never lost from the registry. A caller that needs the
//! GCS's answer (a sequence number, a conflict) waits a bounded time for its item's delivery.
//!
//! What the GCS answers decides what becomes of an item ([`disposition`]): delivered; retried
//! with backoff (the GCS or its database is away, a server error, this CTS's own identity
//! refused: nothing is wrong with the item); the job registered again first (the GCS does not
//! know the job: its database was restored from an older backup); or, only when the GCS says
//! the item itself is wrong, set aside under `outbox/rejected/`, logged at ERROR and counted in
//! the status. A GCS that answers this CTS's registration with `Created` has never heard of
//! it (or lost it): every job running here is registered again before anything else.
//!
//! A checkpoint **reserves** its place before its image is committed ([`GcsLink::reserve`]):
//! a file that proves the outbox can take the record (and keeps the space for it), and that a
//! restarted CTS finds if it died between the commit and the record, so that the image is
//! registered whole or not at all. The record's file is written, then the record queued
//! ([`GcsLink::fill`]); a record still being written holds back the item after it
//! ([`GcsLink::written_out`]), so the order holds across a crash too.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::Utc;
use gca_protocol::client::SoapClient;
use gca_protocol::cts_api::LinkStatus;
use gca_protocol::fault::{Fault, FaultKind, RECORD_REFUSED};
use gca_protocol::messages::*;
use gca_protocol::ops::{
    AbandonRecoveryOp, JobFinishedOp, RegisterCheckpointOp, RegisterCtsInstanceOp, RegisterJobOp,
    SetImageLocationOp,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// One message for the GCS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OutboxItem {
    RegisterJob(RegisterJob),
    RegisterCheckpoint(Box<RegisterCheckpoint>),
    JobFinished(JobFinished),
    AbandonRecovery(AbandonRecovery),
    /// Where an image has got to in the object store (an `async` upload ended).
    SetImageLocation(SetImageLocation),
}

impl OutboxItem {
    fn describe(&self) -> String {
        match self {
            OutboxItem::RegisterJob(r) => format!("registration of job {:?}", r.gid),
            OutboxItem::RegisterCheckpoint(r) => format!(
                "checkpoint {:?} of job {:?}",
                r.checkpoint.id, r.checkpoint.gid
            ),
            OutboxItem::JobFinished(r) => format!("exit of job {:?}", r.gid),
            OutboxItem::AbandonRecovery(r) => format!("abandoned recovery of job {:?}", r.gid),
            OutboxItem::SetImageLocation(r) => format!(
                "location {} ({}) of checkpoint {:?} of job {:?}",
                r.location.name, r.location.state, r.checkpoint_id, r.gid
            ),
        }
    }

    fn gid(&self) -> &str {
        match self {
            OutboxItem::RegisterJob(r) => &r.gid,
            OutboxItem::RegisterCheckpoint(r) => &r.checkpoint.gid,
            OutboxItem::JobFinished(r) => &r.gid,
            OutboxItem::AbandonRecovery(r) => &r.gid,
            OutboxItem::SetImageLocation(r) => &r.gid,
        }
    }

    /// Items that report what already happened to a job (it ended, its recovery was given
    /// up, an upload of its image ended) are taken even when the outbox is full: refusing
    /// them would lose the news, and there is at most one per job (per image).
    fn always_taken(&self) -> bool {
        matches!(
            self,
            OutboxItem::JobFinished(_)
                | OutboxItem::AbandonRecovery(_)
                | OutboxItem::SetImageLocation(_)
        )
    }
}

/// The GCS's answer to a delivered item.
#[derive(Debug, Clone)]
pub enum Delivered {
    Job(JobRegistered),
    Checkpoint(Box<CheckpointRegistered>),
    Finished(JobInfo),
    /// The record as it is after a location change.
    Record(Box<CheckpointRecord>),
}

/// What becomes of an item after the GCS's answer to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Nothing is wrong with the item: keep it first in line and try again later.
    Retry(Fault),
    /// The GCS lost this CTS's registration: register the instance, then try again.
    RegisterInstance(Fault),
    /// The GCS does not know the item's job: register the job again, then try again.
    RegisterJob(Fault),
    /// The GCS says the item itself is wrong: set it aside for an operator.
    Reject(Fault),
}

/// How an item the GCS refused with `f` is handled. Only a refusal that says the item is
/// wrong rejects it (a malformed or conflicting record, a record this CTS may not register,
/// a bad signature); everything else is the GCS, the network or this CTS's configuration,
/// and retried until fixed.
pub fn disposition(item: &OutboxItem, f: Fault) -> Disposition {
    let code = f.code.as_deref();
    match f.kind {
        FaultKind::ResourceUnknown if code == Some("unknown-cts-instance") => {
            Disposition::RegisterInstance(f)
        }
        FaultKind::ResourceUnknown
            if code == Some("unknown-gid") && !matches!(item, OutboxItem::RegisterJob(_)) =>
        {
            Disposition::RegisterJob(f)
        }
        FaultKind::InvalidMessage
        | FaultKind::Conflict
        | FaultKind::PayloadTooLarge
        | FaultKind::ResourceUnknown => Disposition::Reject(f),
        // The record itself was refused; any other refusal is about this CTS's identity
        // (its certificate, its role), which an admin fixes without touching the item.
        FaultKind::AccessDenied
            if matches!(
                code,
                Some(RECORD_REFUSED) | Some("bad-signature") | Some("recovery-not-authorized")
            ) =>
        {
            Disposition::Reject(f)
        }
        _ => Disposition::Retry(f),
    }
}

/// What the link needs to know about the jobs running here, to register them again when the
/// GCS has forgotten them.
pub trait LocalJobs: Send + Sync + 'static {
    /// The registration of job `gid`, if it runs here (a recovery still restoring does not:
    /// it is registered by its own wrapper's next step).
    fn registration(&self, gid: &str) -> Option<RegisterJob>;
    /// The registrations of every job running here.
    fn registrations(&self) -> Vec<RegisterJob>;
}

/// No jobs (for a link used without a CTS around it).
impl LocalJobs for () {
    fn registration(&self, _: &str) -> Option<RegisterJob> {
        None
    }
    fn registrations(&self) -> Vec<RegisterJob> {
        Vec::new()
    }
}

type Answer = Result<Delivered, Fault>;
type Waiter = oneshot::Sender<Answer>;

/// The GCS's answer to a queued item, when it comes ([`GcsLink::wait`]).
pub struct Pending(oneshot::Receiver<Answer>);

/// What a reservation was made for (`NNN.reserved`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservedFor {
    pub image: String,
    pub gid: String,
}

enum Slot {
    /// The place of an item whose file is being written (outside the queue's lock): the line
    /// stops here until it is. (The item is already seen by [`GcsLink::registration_for`]: a
    /// job's exit being written still tells how an earlier item's job is registered again.)
    Writing(OutboxItem),
    /// The place of the record of an image being committed.
    Reserved(ReservedFor),
    Item(OutboxItem),
}

struct Queue {
    next: u64,
    slots: BTreeMap<u64, Slot>,
    waiters: HashMap<u64, Waiter>,
    /// Reservations a previous run left without their record (see [`GcsLink::orphans`]).
    orphans: Vec<u64>,
    /// Records being written into their reserved place while they are delivered
    /// ([`GcsLink::fill`]), with what became of their file if the GCS answered first: the
    /// writer does it once the file is there.
    writing: HashMap<u64, Option<AfterWrite>>,
}

/// What the delivery of an item decided for its file while the file was still being written.
enum AfterWrite {
    /// Delivered: the file goes.
    Remove,
    /// Refused as wrong: the file is set aside at `path` (`bytes` are the item, for a file
    /// that could not be written).
    SetAside { path: PathBuf, bytes: Vec<u8> },
}

/// Space kept for a record by a reservation: far more than any record takes.
const RESERVED_BYTES: u64 = 64 * 1024;

/// See the module documentation.
#[derive(Clone)]
pub struct GcsLink {
    inner: Arc<Inner>,
}

struct Inner {
    client: SoapClient,
    instance: CtsInstance,
    dir: PathBuf,
    heartbeat: Duration,
    max_items: usize,
    queue: Mutex<Queue>,
    status: Mutex<LinkStatus>,
    wake: Notify,
    /// A record's file written and what its delivery decided done to it (see
    /// [`GcsLink::written_out`]).
    written: Notify,
}

impl GcsLink {
    /// Opens the outbox in `dir` (items left by a previous run are delivered first) holding
    /// at most `max_items` items.
    pub fn open(
        client: SoapClient,
        instance: CtsInstance,
        dir: &Path,
        heartbeat: Duration,
        max_items: usize,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(dir.join("rejected"))
            .with_context(|| format!("creating the outbox {}", dir.display()))?;
        let mut slots = BTreeMap::new();
        let mut reserved = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((seq, kind)) = name
                .split_once('.')
                .and_then(|(n, k)| Some((n.parse::<u64>().ok()?, k.to_string())))
            else {
                continue;
            };
            let text = std::fs::read(entry.path())?;
            match kind.as_str() {
                "json" => match serde_json::from_slice::<OutboxItem>(&text) {
                    Ok(item) => {
                        slots.insert(seq, Slot::Item(item));
                    }
                    Err(e) => {
                        let aside = set_aside_path(dir, seq);
                        tracing::error!(file = %entry.path().display(), aside = %aside.display(), error = %e, "unreadable outbox item set aside");
                        let _ = std::fs::rename(entry.path(), aside);
                    }
                },
                "reserved" => {
                    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
                    match serde_json::from_slice::<ReservedFor>(&text[..end]) {
                        Ok(r) => {
                            reserved.insert(seq, r);
                        }
                        Err(e) => {
                            tracing::error!(file = %entry.path().display(), error = %e, "unreadable outbox reservation removed");
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
                // A write interrupted before its rename.
                "tmp" => {
                    let _ = std::fs::remove_file(entry.path());
                }
                _ => {}
            }
        }
        let mut orphans = Vec::new();
        for (seq, r) in reserved {
            match slots.entry(seq) {
                // Filled: the record was written, the reservation not yet removed.
                std::collections::btree_map::Entry::Occupied(_) => {
                    let _ = std::fs::remove_file(reservation_path(dir, seq));
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Slot::Reserved(r));
                    orphans.push(seq);
                }
            }
        }
        if !slots.is_empty() {
            tracing::info!(
                items = slots.len(),
                unfinished_checkpoints = orphans.len(),
                "outbox items from a previous run will be delivered"
            );
        }
        let next = slots.keys().next_back().map_or(1, |k| k + 1);
        // What earlier runs set aside stays counted until an operator removes it.
        let rejected = std::fs::read_dir(dir.join("rejected"))
            .map(|d| d.flatten().count() as u64)
            .unwrap_or(0);
        let status = LinkStatus {
            endpoint: client.endpoint().to_string(),
            pending: slots.len(),
            rejected,
            ..Default::default()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                instance,
                dir: dir.to_path_buf(),
                heartbeat,
                max_items,
                queue: Mutex::new(Queue {
                    next,
                    slots,
                    waiters: HashMap::new(),
                    orphans,
                    writing: HashMap::new(),
                }),
                status: Mutex::new(status),
                wake: Notify::new(),
                written: Notify::new(),
            }),
        })
    }

    /// A direct call to the GCS (a query: not queued, not retried).
    pub async fn query<O: gca_protocol::ops::Operation>(
        &self,
        req: &O::Request,
    ) -> Result<O::Response, Fault> {
        self.inner.client.call::<O>(req).await
    }

    pub fn status(&self) -> LinkStatus {
        let mut s = self.inner.status.lock().clone();
        s.pending = self.inner.queue.lock().slots.len();
        s
    }

    /// Queues `item` (written to disk before this returns) and waits up to `wait` for the
    /// GCS's answer. `Ok(None)`: not delivered yet; it will be when the GCS is reachable.
    /// `Err(Error::Fault)`: the GCS refused it; `Err(Error::Outbox)`: it could not be queued.
    pub async fn send(&self, item: OutboxItem, wait: Duration) -> Result<Option<Delivered>, Error> {
        let pending = self.enqueue(item)?;
        Self::wait(pending, wait).await
    }

    /// Waits up to `wait` for the GCS's answer to a queued item (see [`GcsLink::send`]).
    pub async fn wait(pending: Pending, wait: Duration) -> Result<Option<Delivered>, Error> {
        match tokio::time::timeout(wait, pending.0).await {
            Ok(Ok(Ok(d))) => Ok(Some(d)),
            Ok(Ok(Err(f))) => Err(Error::Fault(f)),
            Ok(Err(_)) | Err(_) => Ok(None),
        }
    }

    /// Queues `item` without waiting for its delivery.
    pub fn enqueue_nowait(&self, item: OutboxItem) -> Result<(), Error> {
        self.enqueue(item).map(drop)
    }

    /// Queues `item`: written to disk before this returns. Its place in line is taken under
    /// the queue's lock and its file written outside it (the line stops at the place until
    /// then), so that callers do not wait for each other's fsyncs.
    pub fn enqueue(&self, item: OutboxItem) -> Result<Pending, Error> {
        let room = (!item.always_taken()).then(|| item.describe());
        let seq = self.take_place(room.as_deref(), Slot::Writing(item.clone()))?;
        if let Err(e) = self.write_item(seq, &item) {
            self.give_up_place(seq);
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.inner.queue.lock();
            q.slots.insert(seq, Slot::Item(item));
            q.waiters.insert(seq, tx);
        }
        self.inner.wake.notify_one();
        Ok(Pending(rx))
    }

    /// The next place in line, holding `slot`; with `room_for`, only if the outbox has room
    /// (`room_for` names what would take it, for the error).
    fn take_place(&self, room_for: Option<&str>, slot: Slot) -> Result<u64, Error> {
        let mut q = self.inner.queue.lock();
        if let Some(what) = room_for {
            self.check_room(&q, what)?;
        }
        let seq = q.next;
        q.next += 1;
        q.slots.insert(seq, slot);
        Ok(seq)
    }

    /// A place whose file could not be written: the line goes on without it.
    fn give_up_place(&self, seq: u64) {
        self.inner.queue.lock().slots.remove(&seq);
        self.inner.wake.notify_one();
    }

    /// Keeps the next place in line for the record of image `image` of job `gid`, before the
    /// image is committed: the outbox has room and can be written (the space for the record is
    /// allocated now). Items queued after wait behind it until it is filled or dropped.
    pub fn reserve(&self, image: &str, gid: &str) -> Result<Reservation, Error> {
        let what = ReservedFor {
            image: image.to_string(),
            gid: gid.to_string(),
        };
        // Written outside the queue's lock, like an item (see GcsLink::enqueue).
        let seq = self.take_place(
            Some(&format!(
                "the record of checkpoint {image:?} of job {gid:?}"
            )),
            Slot::Reserved(what.clone()),
        )?;
        let path = reservation_path(&self.inner.dir, seq);
        if let Err(e) = write_reservation(&path, &what) {
            let _ = std::fs::remove_file(&path);
            self.give_up_place(seq);
            return Err(Error::Outbox(format!(
                "the outbox {} cannot take the record of a checkpoint of job {gid:?} ({e}); nothing was checkpointed: free space there or fix its permissions",
                self.inner.dir.display()
            )));
        }
        Ok(Reservation {
            link: self.clone(),
            seq,
            what,
            settled: false,
        })
    }

    /// Reservations a previous run made and never filled (it died between an image's commit
    /// and its record): the caller fills each whose image was committed and drops the others.
    /// Given once.
    pub fn orphans(&self) -> Vec<Reservation> {
        let mut q = self.inner.queue.lock();
        let seqs = std::mem::take(&mut q.orphans);
        seqs.into_iter()
            .filter_map(|seq| match q.slots.get(&seq) {
                Some(Slot::Reserved(what)) => Some(Reservation {
                    link: self.clone(),
                    seq,
                    what: what.clone(),
                    settled: false,
                }),
                _ => None,
            })
            .collect()
    }

    fn check_room(&self, q: &Queue, what: &str) -> Result<(), Error> {
        if q.slots.len() < self.inner.max_items {
            return Ok(());
        }
        let since = self
            .inner
            .status
            .lock()
            .last_contact
            .map(|t| format!(" (last answer {})", fmt_time(&t)))
            .unwrap_or_default();
        Err(Error::OutboxFull(format!(
            "the outbox holds {} items the GCS at {} has not taken yet{since}, its limit (outbox_max_items); {what} was refused: retry when the GCS is reachable again",
            q.slots.len(),
            self.inner.client.endpoint()
        )))
    }

    fn item_path(&self, seq: u64) -> PathBuf {
        self.inner.dir.join(format!("{seq:020}.json"))
    }

    fn write_item(&self, seq: u64, item: &OutboxItem) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(item).map_err(|e| Error::Outbox(e.to_string()))?;
        write_atomically(&self.item_path(seq), &bytes).map_err(|e| {
            Error::Outbox(format!(
                "cannot write {} to the outbox {}: {e}",
                item.describe(),
                self.inner.dir.display()
            ))
        })
    }

    /// Writes the record into its place, then queues it. The reservation is the record's
    /// durable copy until its file is there: a CTS that stops first registers the image again
    /// from the store at its next start (the GCS answers an identical report `Unchanged`). A
    /// record that cannot be written is still delivered from memory, and its reservation
    /// stays until the GCS has it. (The machinery for delivering it while it is written,
    /// `queue_filled(.., true)` and `AfterWrite`, is kept, tested, for when the Slurm
    /// failure below is understood.)
    fn fill(&self, seq: u64, what: &ReservedFor, item: OutboxItem) -> Pending {
        let bytes = serde_json::to_vec_pretty(&item);
        let describe = item.describe();
        // For now the file is written before the record is queued: delivered while its file
        // was written, a job Slurm requeued right after its checkpoint failed to resume
        // (`slurm self_recovering`, cause not found yet; see docs/reliability.md).
        self.write_filled(seq, what, bytes, &describe);
        self.queue_filled(seq, item, false)
    }

    /// The record in its place in line; with `still_writing`, its file still to be written
    /// (what the delivery decides is then left to [`GcsLink::write_filled`]).
    fn queue_filled(&self, seq: u64, item: OutboxItem, still_writing: bool) -> Pending {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.inner.queue.lock();
            q.slots.insert(seq, Slot::Item(item));
            q.waiters.insert(seq, tx);
            if still_writing {
                q.writing.insert(seq, None);
            }
        }
        self.inner.wake.notify_one();
        Pending(rx)
    }

    /// The second half of [`GcsLink::fill`]: the record's file written, and what its delivery
    /// decided meanwhile done to it.
    fn write_filled(
        &self,
        seq: u64,
        what: &ReservedFor,
        bytes: serde_json::Result<Vec<u8>>,
        describe: &str,
    ) {
        let reserved = reservation_path(&self.inner.dir, seq);
        // The space kept is given back just before the record takes it (the reservation
        // itself stays readable until the record is written).
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&reserved) {
            let _ = f.set_len(reservation_header(what).len() as u64);
        }
        let written = match &bytes {
            Ok(b) => write_atomically(&self.item_path(seq), b),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        // What the delivery decided, if it has: the entry stays until that is done, so that
        // the deliverer waits for it (below). Otherwise the delivery does it when it ends.
        let after = {
            let mut q = self.inner.queue.lock();
            let after = q.writing.get_mut(&seq).and_then(Option::take);
            if after.is_none() {
                q.writing.remove(&seq);
            }
            after
        };
        match &written {
            Ok(()) => {
                let _ = std::fs::remove_file(&reserved);
            }
            Err(e) => {
                self.inner.status.lock().unwritten_records += 1;
                tracing::error!(item = %describe, outbox = %self.inner.dir.display(), error = %e, "cannot write a checkpoint's record to the outbox; it is delivered from memory, and registered from the store at the next start if the CTS stops first");
            }
        }
        if let Some(action) = after {
            self.do_after_delivery(seq, action);
            self.inner.queue.lock().writing.remove(&seq);
        }
        self.inner.written.notify_waiters();
    }

    /// Returns once item `seq`'s file is written (or could not be) and what its delivery
    /// decided is done to it. The deliverer waits for this before it sends the next item:
    /// a CTS that dies meanwhile sends nothing again after a later item at its next start.
    async fn written_out(&self, seq: u64) {
        loop {
            let notified = self.inner.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.inner.queue.lock().writing.contains_key(&seq) {
                return;
            }
            notified.await;
        }
    }

    /// Does `action` to item `seq`'s file now, or leaves it to [`GcsLink::fill`] if the file
    /// is still being written.
    fn after_delivery(&self, seq: u64, action: AfterWrite) {
        {
            let mut q = self.inner.queue.lock();
            if let Some(slot) = q.writing.get_mut(&seq) {
                *slot = Some(action);
                return;
            }
        }
        self.do_after_delivery(seq, action);
    }

    /// Removes or sets aside item `seq`'s file, and its reservation (kept until now by a
    /// record that could not be written).
    fn do_after_delivery(&self, seq: u64, action: AfterWrite) {
        let file = self.item_path(seq);
        match action {
            AfterWrite::Remove => {
                let _ = std::fs::remove_file(&file);
            }
            AfterWrite::SetAside { path, bytes } => match std::fs::rename(&file, &path) {
                Ok(()) => {}
                // Never written: set aside from memory.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Err(e) = write_atomically(&path, &bytes) {
                        tracing::error!(file = %path.display(), error = %e,
                            "cannot set aside an item the GCS refused");
                    }
                }
                Err(e) => tracing::error!(file = %file.display(), error = %e,
                    "cannot set aside an item the GCS refused"),
            },
        }
        let _ = std::fs::remove_file(reservation_path(&self.inner.dir, seq));
    }

    fn release(&self, seq: u64, keep_file: bool) {
        if !keep_file {
            let _ = std::fs::remove_file(reservation_path(&self.inner.dir, seq));
        }
        self.inner.queue.lock().slots.remove(&seq);
        self.inner.wake.notify_one();
    }

    /// Registers the instance, keeps re-registering every heartbeat, and delivers the outbox,
    /// until `cancel`. `jobs` are registered again when the GCS has forgotten them.
    pub async fn run(self, jobs: Arc<dyn LocalJobs>, cancel: CancellationToken) {
        let backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(30))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = backoff();
        let mut registered = false;
        // One interval across wake-ups, so that frequent deliveries do not put the heartbeat
        // off for ever.
        let mut heartbeat = tokio::time::interval(self.inner.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        // The GCS did not know this CTS: its jobs are registered again before anything else.
        let mut resync = false;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let step = async {
                if !registered {
                    let outcome = self.register_instance().await?;
                    tracing::info!(gcs = %self.inner.client.endpoint(), outcome = outcome.as_str(), "registered at the GCS");
                    registered = true;
                    if outcome == Registration::Created {
                        resync = true;
                    }
                }
                if resync {
                    self.register_jobs_again(jobs.as_ref()).await?;
                    resync = false;
                }
                self.deliver_all(jobs.as_ref()).await
            };
            match step.await {
                Ok(()) => delays = backoff(),
                Err(f) => {
                    self.failed(&f);
                    registered = false;
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    if f.kind == FaultKind::ServiceUnavailable {
                        tracing::warn!(gcs = %self.inner.client.endpoint(), error = %f.message, retry_in = ?delay, "GCS unreachable; the outbox waits");
                    } else {
                        tracing::error!(gcs = %self.inner.client.endpoint(), kind = ?f.kind, error = %f.message, retry_in = ?delay, "the GCS refused this CTS; retrying (nothing is lost meanwhile)");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                // Heartbeat: the registration doubles as "still alive".
                _ = heartbeat.tick() => registered = false,
            }
        }
    }

    async fn register_instance(&self) -> Result<Registration, Fault> {
        let r = self
            .inner
            .client
            .call::<RegisterCtsInstanceOp>(&RegisterCtsInstance {
                instance: self.inner.instance.clone(),
            })
            .await?;
        self.contacted();
        Ok(r.outcome)
    }

    /// The GCS answered our registration with `Created` (it never knew us, or lost its
    /// database): registers every job running here again. A job the GCS has elsewhere by now
    /// is only reported.
    async fn register_jobs_again(&self, jobs: &dyn LocalJobs) -> Result<(), Fault> {
        let all = jobs.registrations();
        if all.is_empty() {
            return Ok(());
        }
        tracing::warn!(jobs = all.len(), "the GCS did not know this CTS (a new or restored database?); registering its running jobs again");
        for reg in all {
            self.register_job_again(&reg).await?;
        }
        Ok(())
    }

    /// Registers one job again; `Err` only when it should be tried again later.
    async fn register_job_again(&self, reg: &RegisterJob) -> Result<bool, Fault> {
        match self.inner.client.call::<RegisterJobOp>(reg).await {
            Ok(r) => {
                self.contacted();
                self.inner.status.lock().reregistered_jobs += 1;
                tracing::warn!(gid = %reg.gid, outcome = r.outcome.as_str(), "job registered again at the GCS, which did not know it");
                Ok(true)
            }
            Err(f) => match disposition(&OutboxItem::RegisterJob(reg.clone()), f) {
                Disposition::Reject(f) => {
                    tracing::error!(gid = %reg.gid, error = %f.message, "the GCS refused to register a job running here again");
                    Ok(false)
                }
                Disposition::Retry(f)
                | Disposition::RegisterInstance(f)
                | Disposition::RegisterJob(f) => Err(f),
            },
        }
    }

    /// The first item in line, unless a reservation not yet filled or an item still being
    /// written comes first.
    fn next_to_deliver(&self) -> Option<(u64, OutboxItem)> {
        match self.inner.queue.lock().slots.iter().next() {
            Some((seq, Slot::Item(item))) => Some((*seq, item.clone())),
            None | Some((_, Slot::Reserved(_) | Slot::Writing(_))) => None,
        }
    }

    /// Delivers queued items in order, up to the first reservation not yet filled or item
    /// still being written. Returns `Err` when the first item must be tried again later (it
    /// stays first in line); items the GCS refuses are set aside and their waiters told.
    async fn deliver_all(&self, jobs: &dyn LocalJobs) -> Result<(), Fault> {
        loop {
            let Some((seq, item)) = self.next_to_deliver() else {
                return Ok(());
            };
            let mut answer = self.call(&item).await;
            if let Err(f) = &answer {
                if let Disposition::RegisterJob(_) = disposition(&item, f.clone()) {
                    if let Some(reg) = self.registration_for(seq, &item, jobs) {
                        if self.register_job_again(&reg).await? {
                            answer = self.call(&item).await;
                        }
                    }
                }
            }
            let answer = match answer {
                Ok(d) => {
                    self.contacted();
                    self.after_delivery(seq, AfterWrite::Remove);
                    Ok(d)
                }
                Err(f) => match disposition(&item, f) {
                    Disposition::Retry(f) | Disposition::RegisterInstance(f) => return Err(f),
                    Disposition::RegisterJob(f) | Disposition::Reject(f) => {
                        self.contacted();
                        self.reject(seq, &item, &f);
                        Err(f)
                    }
                },
            };
            let waiter = {
                let mut q = self.inner.queue.lock();
                q.slots.remove(&seq);
                q.waiters.remove(&seq)
            };
            if let Some(w) = waiter {
                let _ = w.send(answer);
            }
            self.written_out(seq).await;
        }
    }

    /// How to register the job of an item the GCS does not know the job of: as it runs here,
    /// or, for a job that has ended since (its exit is queued after the item), as it ran.
    fn registration_for(
        &self,
        seq: u64,
        item: &OutboxItem,
        jobs: &dyn LocalJobs,
    ) -> Option<RegisterJob> {
        let gid = item.gid();
        if let Some(r) = jobs.registration(gid) {
            return Some(r);
        }
        let q = self.inner.queue.lock();
        // The item itself may be the job's end.
        let ended_later = q.slots.range(seq..).any(|(_, s)| {
            matches!(s, Slot::Item(OutboxItem::JobFinished(f))
                    | Slot::Writing(OutboxItem::JobFinished(f)) if f.gid == gid)
        });
        ended_later.then(|| RegisterJob {
            gid: gid.to_string(),
            cts_instance: self.inner.instance.name.clone(),
            local_id: None,
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
    }

    fn reject(&self, seq: u64, item: &OutboxItem, f: &Fault) {
        let aside = set_aside_path(&self.inner.dir, seq);
        tracing::error!(item = %item.describe(), kind = ?f.kind, code = ?f.code, error = %f.message, file = %aside.display(), "the GCS refused an outbox item as wrong; set aside for an operator");
        let bytes = serde_json::to_vec_pretty(item).unwrap_or_default();
        self.after_delivery(seq, AfterWrite::SetAside { path: aside, bytes });
        let mut s = self.inner.status.lock();
        s.rejected += 1;
        s.last_rejected = Some(format!("{}: {}", item.describe(), f.message));
    }

    async fn call(&self, item: &OutboxItem) -> Result<Delivered, Fault> {
        let c = &self.inner.client;
        Ok(match item {
            OutboxItem::RegisterJob(r) => Delivered::Job(c.call::<RegisterJobOp>(r).await?),
            OutboxItem::RegisterCheckpoint(r) => {
                Delivered::Checkpoint(Box::new(c.call::<RegisterCheckpointOp>(r.as_ref()).await?))
            }
            OutboxItem::JobFinished(r) => Delivered::Finished(c.call::<JobFinishedOp>(r).await?),
            OutboxItem::AbandonRecovery(r) => {
                Delivered::Finished(c.call::<AbandonRecoveryOp>(r).await?)
            }
            OutboxItem::SetImageLocation(r) => {
                Delivered::Record(Box::new(c.call::<SetImageLocationOp>(r).await?))
            }
        })
    }

    fn contacted(&self) {
        let mut s = self.inner.status.lock();
        s.connected = true;
        s.last_contact = Some(Utc::now());
        s.last_error = None;
    }

    fn failed(&self, f: &Fault) {
        let mut s = self.inner.status.lock();
        s.connected = false;
        s.last_error = Some(f.message.clone());
    }
}

/// A place kept in the outbox for the record of an image being committed
/// ([`GcsLink::reserve`]). Dropped unfilled, it is given up (the checkpoint failed before its
/// commit).
pub struct Reservation {
    link: GcsLink,
    seq: u64,
    what: ReservedFor,
    settled: bool,
}

impl Reservation {
    pub fn image(&self) -> &str {
        &self.what.image
    }

    pub fn gid(&self) -> &str {
        &self.what.gid
    }

    /// Queues the record and puts it in its place (written to disk, while the GCS is called:
    /// see [`GcsLink::fill`]). If it cannot be written, the reservation file stays until
    /// the GCS has the record, for a next start to register the image from the store.
    pub fn fill(mut self, item: OutboxItem) -> Pending {
        self.settled = true;
        self.link.fill(self.seq, &self.what, item)
    }
}

impl Reservation {
    /// Gives the place up for this run but keeps the reservation file, so that the next
    /// start tries again to register the image.
    pub fn postpone(mut self) {
        self.settled = true;
        self.link.release(self.seq, true);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.link.release(self.seq, false);
        }
    }
}

/// Where an item the GCS refused (or that cannot be read) goes: sequence numbers start again
/// at 1 when a run starts with an empty outbox, so the name also carries when it was set
/// aside, and an earlier run's file is never overwritten.
fn set_aside_path(dir: &Path, seq: u64) -> PathBuf {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    dir.join("rejected").join(format!(
        "{seq:020}-{}-{}.json",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        &unique[..8]
    ))
}

fn reservation_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.reserved"))
}

fn reservation_header(what: &ReservedFor) -> Vec<u8> {
    serde_json::to_vec(what).expect("a reservation serializes")
}

/// The reservation file: what it is for, then space allocated up to [`RESERVED_BYTES`].
fn write_reservation(path: &Path, what: &ReservedFor) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&reservation_header(what))?;
    let len = f.metadata()?.len();
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), len, RESERVED_BYTES) {
        Ok(()) => {}
        // A file system without fallocate: write the space out.
        Err(rustix::io::Errno::OPNOTSUPP) => f.write_all(&vec![0u8; RESERVED_BYTES as usize])?,
        Err(e) => return Err(e.into()),
    }
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let written = (|| {
        // Job state and queued records hold job environments: the CTS's alone.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // (A full disk keeps nothing of a write that failed.)
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(gid: &str) -> OutboxItem {
        OutboxItem::JobFinished(JobFinished {
            gid: gid.into(),
            cts_instance: "cts".into(),
            exit_status: Some(0),
            signal: None,
        })
    }

    fn job(gid: &str) -> OutboxItem {
        OutboxItem::RegisterJob(RegisterJob {
            gid: gid.into(),
            cts_instance: "cts".into(),
            local_id: None,
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
    }

    fn fault(kind: FaultKind, code: Option<&str>) -> Fault {
        let f = Fault::new(kind, "x");
        match code {
            Some(c) => f.with_code(c),
            None => f,
        }
    }

    #[test]
    fn only_a_refusal_of_the_item_itself_rejects_it() {
        let item = finished("job-1");
        let d = |k, c| disposition(&item, fault(k, c));
        // The GCS or its database away, server errors: retried.
        assert!(matches!(
            d(FaultKind::ServiceUnavailable, None),
            Disposition::Retry(_)
        ));
        assert!(matches!(
            d(FaultKind::Internal, None),
            Disposition::Retry(_)
        ));
        assert!(matches!(
            d(FaultKind::OperationFailed, None),
            Disposition::Retry(_)
        ));
        assert!(matches!(
            d(FaultKind::ActionNotSupported, None),
            Disposition::Retry(_)
        ));
        // This CTS's certificate or role refused: fixed by an admin, retried meanwhile.
        assert!(matches!(
            d(FaultKind::AccessDenied, Some("access-denied")),
            Disposition::Retry(_)
        ));
        assert!(matches!(
            d(FaultKind::AccessDenied, Some("unauthenticated")),
            Disposition::Retry(_)
        ));
        // The GCS lost us or the job: register again.
        assert!(matches!(
            d(FaultKind::ResourceUnknown, Some("unknown-cts-instance")),
            Disposition::RegisterInstance(_)
        ));
        assert!(matches!(
            d(FaultKind::ResourceUnknown, Some("unknown-gid")),
            Disposition::RegisterJob(_)
        ));
        // The record is wrong.
        assert!(matches!(
            d(FaultKind::InvalidMessage, None),
            Disposition::Reject(_)
        ));
        assert!(matches!(
            d(FaultKind::Conflict, None),
            Disposition::Reject(_)
        ));
        assert!(matches!(
            d(FaultKind::AccessDenied, Some(RECORD_REFUSED)),
            Disposition::Reject(_)
        ));
        assert!(matches!(
            d(FaultKind::AccessDenied, Some("bad-signature")),
            Disposition::Reject(_)
        ));
        // A job registration the GCS answers "unknown GID" is not registered again (in a loop).
        assert!(matches!(
            disposition(
                &job("job-1"),
                fault(FaultKind::ResourceUnknown, Some("unknown-gid"))
            ),
            Disposition::Reject(_)
        ));
    }

    fn link(dir: &Path, max_items: usize) -> GcsLink {
        let client = SoapClient::new(reqwest::Client::new(), "http://127.0.0.1:9/gcs");
        GcsLink::open(
            client,
            CtsInstance {
                name: "cts".into(),
                cts_type: "t".into(),
                url: "http://127.0.0.1:9/cts".into(),
                execution_manager: "em".into(),
                resource: "r".into(),
                registered_at: None,
                last_seen: None,
                facts: None,
            },
            dir,
            Duration::from_secs(30),
            max_items,
        )
        .unwrap()
    }

    #[test]
    fn a_reservation_holds_its_place_and_survives_a_restart_unfilled() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let r = l.reserve("img-1", "job-1").unwrap();
        let file = dir.path().join(format!("{:020}.reserved", 1));
        assert!(file.metadata().unwrap().len() >= RESERVED_BYTES);
        l.enqueue_nowait(finished("job-1")).unwrap();
        // The CTS dies here (the reservation is never settled).
        std::mem::forget(r);
        let again = link(dir.path(), 10);
        let orphans = again.orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!((orphans[0].image(), orphans[0].gid()), ("img-1", "job-1"));
        assert!(again.orphans().is_empty(), "given once");
        // Still first in line: the exit waits behind it.
        assert_eq!(again.status().pending, 2);
        let mut orphans = orphans;
        orphans.pop().unwrap().fill(job("job-1"));
        assert!(!file.exists());
        let third = link(dir.path(), 10);
        assert!(third.orphans().is_empty());
        let q = third.inner.queue.lock();
        let kinds: Vec<_> = q
            .slots
            .values()
            .map(|s| match s {
                Slot::Item(i) => i.describe(),
                Slot::Reserved(_) => "reserved".into(),
                Slot::Writing(_) => "writing".into(),
            })
            .collect();
        assert_eq!(
            kinds,
            ["registration of job \"job-1\"", "exit of job \"job-1\""]
        );
    }

    fn outbox_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "rejected")
            .collect();
        names.sort();
        names
    }

    /// A reservation for a record of job-1 that the test fills by hand, step by step.
    fn reserved(l: &GcsLink) -> (u64, ReservedFor) {
        let r = l.reserve("img-1", "job-1").unwrap();
        let place = (r.seq, r.what.clone());
        std::mem::forget(r);
        place
    }

    /// The GCS may answer before the record's file is written (`fill` queues it first): the
    /// file written after the answer must not bring the record back at the next start.
    #[test]
    fn a_record_delivered_before_its_file_is_written_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let (seq, what) = reserved(&l);
        let item = job("job-1");
        let bytes = serde_json::to_vec_pretty(&item);
        let _pending = l.queue_filled(seq, item, true);
        // The deliverer's success, first.
        l.after_delivery(seq, AfterWrite::Remove);
        l.inner.queue.lock().slots.remove(&seq);
        assert_eq!(outbox_files(dir.path()), [format!("{seq:020}.reserved")]);
        l.write_filled(seq, &what, bytes, "x");
        assert!(
            outbox_files(dir.path()).is_empty(),
            "{:?}",
            outbox_files(dir.path())
        );
        let again = link(dir.path(), 10);
        assert_eq!(again.status().pending, 0);
        assert!(again.orphans().is_empty());
    }

    /// Refused as wrong before its file is written: set aside once written, not queued again.
    #[test]
    fn a_record_refused_before_its_file_is_written_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let (seq, what) = reserved(&l);
        let item = job("job-1");
        let bytes = serde_json::to_vec_pretty(&item);
        let _pending = l.queue_filled(seq, item.clone(), true);
        l.reject(seq, &item, &fault(FaultKind::InvalidMessage, None));
        l.write_filled(seq, &what, bytes, "x");
        assert!(outbox_files(dir.path()).is_empty());
        assert_eq!(set_aside(dir.path()), [item]);
    }

    /// An item's file is written outside the queue's lock: its place holds the line until
    /// the file is there, and a write that fails gives the place up.
    #[test]
    fn an_item_being_written_holds_its_place_and_a_failed_write_gives_it_up() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 2);
        // Another caller's item, still being written.
        let first = l.take_place(None, Slot::Writing(job("job-0"))).unwrap();
        l.enqueue_nowait(job("job-1")).unwrap();
        assert_eq!(
            l.next_to_deliver(),
            None,
            "the line waits for the first item's file"
        );
        l.give_up_place(first);
        let (seq, item) = l.next_to_deliver().unwrap();
        assert_eq!((seq, item), (first + 1, job("job-1")));

        // A write that fails: the caller is told, and nothing of it stays in line.
        let next = l.inner.queue.lock().next;
        std::fs::create_dir(dir.path().join(format!("{next:020}.json"))).unwrap();
        match l.enqueue(job("job-2")) {
            Err(Error::Outbox(_)) => {}
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("queued without its file"),
        }
        assert_eq!(l.status().pending, 1);
        assert!(!dir.path().join(format!("{next:020}.tmp")).exists());
        // Its place counts no more against the limit (2): one more fits, then none.
        l.enqueue_nowait(job("job-3")).unwrap();
        let in_line: Vec<_> = l.inner.queue.lock().slots.keys().copied().collect();
        assert_eq!(in_line, [first + 1, next + 1]);
        assert!(matches!(
            l.enqueue_nowait(job("job-4")),
            Err(Error::OutboxFull(_))
        ));
    }

    /// A job's exit still being written counts for an earlier item of the job the GCS no
    /// longer knows: the job is registered again as it ran, not the item refused.
    #[test]
    fn an_exit_being_written_tells_how_to_register_its_job_again() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let item = job("job-1");
        l.enqueue_nowait(item.clone()).unwrap();
        let first = l.inner.queue.lock().slots.keys().next().copied().unwrap();
        assert_eq!(l.registration_for(first, &item, &()), None);
        l.take_place(None, Slot::Writing(finished("job-1")))
            .unwrap();
        let again = l
            .registration_for(first, &item, &())
            .expect("registered as it ran");
        assert_eq!(again.gid, "job-1");
    }

    /// A failed write of the record's bytes (as a full disk would fail it).
    fn unwritable() -> serde_json::Result<Vec<u8>> {
        serde_json::from_str::<Vec<u8>>("not json")
    }

    fn set_aside(dir: &Path) -> Vec<OutboxItem> {
        std::fs::read_dir(dir.join("rejected"))
            .unwrap()
            .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
            .collect()
    }

    /// A record refused as wrong whose file could not be written is set aside from memory,
    /// whichever came first, and its reservation goes (nothing to register again).
    #[test]
    fn a_refused_record_that_cannot_be_written_is_set_aside_from_memory() {
        for refused_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let l = link(dir.path(), 10);
            let (seq, what) = reserved(&l);
            let item = job("job-1");
            let _pending = l.queue_filled(seq, item.clone(), true);
            let refuse = || l.reject(seq, &item, &fault(FaultKind::InvalidMessage, None));
            if refused_first {
                refuse();
                l.write_filled(seq, &what, unwritable(), "x");
            } else {
                l.write_filled(seq, &what, unwritable(), "x");
                assert!(dir.path().join(format!("{seq:020}.reserved")).exists());
                refuse();
            }
            assert!(
                outbox_files(dir.path()).is_empty(),
                "refused first: {refused_first}: {:?}",
                outbox_files(dir.path())
            );
            assert_eq!(
                set_aside(dir.path()),
                [item],
                "refused first: {refused_first}"
            );
            assert_eq!(l.status().unwritten_records, 1);
        }
    }

    /// The deliverer sends nothing after a delivered record until the record's file is
    /// written and removed: a CTS that dies meanwhile never sends the record again after a
    /// later item.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_item_waits_until_a_delivered_records_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let (seq, what) = reserved(&l);
        let item = job("job-1");
        let bytes = serde_json::to_vec_pretty(&item);
        let _pending = l.queue_filled(seq, item, true);
        l.after_delivery(seq, AfterWrite::Remove);
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.written_out(seq).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "returned before the file was written"
        );
        // Written on another thread, as a checkpoint's task does.
        let writer = l.clone();
        tokio::task::spawn_blocking(move || writer.write_filled(seq, &what, bytes, "x"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken once the file is gone")
            .unwrap();
        assert!(outbox_files(dir.path()).is_empty());
        // Nothing to wait for: at once.
        tokio::time::timeout(Duration::from_secs(5), l.written_out(seq + 1))
            .await
            .unwrap();
    }

    /// A record whose file cannot be written is still queued (delivered from memory); its
    /// reservation stays for the next start until the GCS has it.
    #[test]
    fn a_record_that_cannot_be_written_keeps_its_reservation_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        let r = l.reserve("img-1", "job-1").unwrap();
        let seq = r.seq;
        // The record's file name is taken by a directory: its rename fails.
        std::fs::create_dir(dir.path().join(format!("{seq:020}.json"))).unwrap();
        let _pending = r.fill(job("job-1"));
        assert_eq!(l.status().pending, 1, "queued from memory");
        assert!(dir.path().join(format!("{seq:020}.reserved")).exists());
        // Stopped now: the next start finds the reservation.
        {
            std::fs::remove_dir(dir.path().join(format!("{seq:020}.json"))).unwrap();
            let _ = std::fs::remove_file(dir.path().join(format!("{seq:020}.tmp")));
            let again = link(dir.path(), 10);
            let orphans = again.orphans();
            assert_eq!(orphans.len(), 1);
            assert_eq!(orphans[0].image(), "img-1");
            orphans.into_iter().for_each(std::mem::forget);
        }
        // Delivered: the reservation goes.
        l.after_delivery(seq, AfterWrite::Remove);
        assert!(
            outbox_files(dir.path()).is_empty(),
            "{:?}",
            outbox_files(dir.path())
        );
    }

    #[test]
    fn a_dropped_reservation_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 10);
        drop(l.reserve("img-1", "job-1").unwrap());
        assert_eq!(l.status().pending, 0);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["rejected"]);
    }

    #[test]
    fn a_full_outbox_refuses_new_work_but_takes_exits() {
        let dir = tempfile::tempdir().unwrap();
        let l = link(dir.path(), 2);
        l.enqueue_nowait(job("job-1")).unwrap();
        let _r = l.reserve("img-2", "job-1").unwrap();
        let e = l.reserve("img-3", "job-1").err().expect("full");
        let f: Fault = e.into();
        assert_eq!(f.kind, FaultKind::ServiceUnavailable);
        assert_eq!(f.code.as_deref(), Some("outbox-full"));
        assert!(f.message.contains("outbox_max_items"), "{}", f.message);
        assert!(l.enqueue_nowait(job("job-2")).is_err());
        l.enqueue_nowait(finished("job-1"))
            .expect("an exit is always taken");
    }
}
