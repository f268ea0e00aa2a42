//! The CTS's link to the GCS: instance registration (repeated as a heartbeat, and at once
//! when the GCS comes back after being unreachable) and the **outbox**, an ordered, on-disk
//! queue of everything the GCS must learn (jobs registered, checkpoints taken, jobs finished).
//!
//! Every message to the GCS goes through the outbox, in order, so a checkpoint is never
//! registered before its job and a record taken while the GCS is down is delivered when it is
//! back: a checkpoint that was taken is never lost from the registry. A caller that needs the
//! GCS's answer (a sequence number, a conflict) waits a bounded time for its item's delivery.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use gca_protocol::client::SoapClient;
use gca_protocol::cts_api::LinkStatus;
use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ops::{
    AbandonRecoveryOp, JobFinishedOp, RegisterCheckpointOp, RegisterCtsInstanceOp, RegisterJobOp,
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
        }
    }
}

/// The GCS's answer to a delivered item.
#[derive(Debug, Clone)]
pub enum Delivered {
    Job(JobRegistered),
    Checkpoint(CheckpointRegistered),
    Finished(JobInfo),
}

type Waiter = oneshot::Sender<Result<Delivered, Fault>>;

struct Queue {
    next: u64,
    items: BTreeMap<u64, OutboxItem>,
    waiters: HashMap<u64, Waiter>,
}

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
    queue: Mutex<Queue>,
    status: Mutex<LinkStatus>,
    wake: Notify,
}

impl GcsLink {
    /// Opens the outbox in `dir` (items left by a previous run are delivered first).
    pub fn open(
        client: SoapClient,
        instance: CtsInstance,
        dir: &Path,
        heartbeat: Duration,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(dir.join("rejected"))
            .with_context(|| format!("creating the outbox {}", dir.display()))?;
        let mut items = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let text = std::fs::read(entry.path())?;
            match serde_json::from_slice::<OutboxItem>(&text) {
                Ok(item) => {
                    items.insert(seq, item);
                }
                Err(e) => {
                    tracing::error!(file = %entry.path().display(), error = %e, "unreadable outbox item set aside");
                    let _ = std::fs::rename(entry.path(), dir.join("rejected").join(&name));
                }
            }
        }
        if !items.is_empty() {
            tracing::info!(
                items = items.len(),
                "outbox items from a previous run will be delivered"
            );
        }
        let next = items.keys().next_back().map_or(1, |k| k + 1);
        let status = LinkStatus {
            endpoint: client.endpoint().to_string(),
            pending: items.len(),
            ..Default::default()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                instance,
                dir: dir.to_path_buf(),
                heartbeat,
                queue: Mutex::new(Queue {
                    next,
                    items,
                    waiters: HashMap::new(),
                }),
                status: Mutex::new(status),
                wake: Notify::new(),
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
        s.pending = self.inner.queue.lock().items.len();
        s
    }

    /// Queues `item` (written to disk before this returns) and waits up to `wait` for the
    /// GCS's answer. `Ok(None)`: not delivered yet; it will be when the GCS is reachable.
    /// `Err(Error::Fault)`: the GCS refused it; `Err(Error::Outbox)`: it could not be queued.
    pub async fn send(&self, item: OutboxItem, wait: Duration) -> Result<Option<Delivered>, Error> {
        let rx = self.enqueue(item)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(d))) => Ok(Some(d)),
            Ok(Ok(Err(f))) => Err(Error::Fault(f)),
            Ok(Err(_)) | Err(_) => Ok(None),
        }
    }

    /// Queues `item` without waiting for its delivery.
    pub fn enqueue_nowait(&self, item: OutboxItem) -> Result<(), Error> {
        self.enqueue(item).map(drop)
    }

    fn enqueue(
        &self,
        item: OutboxItem,
    ) -> Result<oneshot::Receiver<Result<Delivered, Fault>>, Error> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.inner.queue.lock();
            let seq = q.next;
            let path = self.inner.dir.join(format!("{seq:020}.json"));
            write_atomically(
                &path,
                &serde_json::to_vec_pretty(&item).map_err(|e| Error::Outbox(e.to_string()))?,
            )
            .map_err(|e| {
                Error::Outbox(format!(
                    "cannot write {} to the outbox {}: {e}",
                    item.describe(),
                    self.inner.dir.display()
                ))
            })?;
            q.next += 1;
            q.items.insert(seq, item);
            q.waiters.insert(seq, tx);
        }
        self.inner.wake.notify_one();
        Ok(rx)
    }

    /// Registers the instance, keeps re-registering every heartbeat, and delivers the outbox,
    /// until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        let mut registered = false;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if !registered {
                match self.register_instance().await {
                    Ok(outcome) => {
                        registered = true;
                        backoff = Duration::from_millis(250);
                        tracing::info!(gcs = %self.inner.client.endpoint(), outcome = outcome.as_str(), "registered at the GCS");
                    }
                    Err(f) => {
                        self.failed(&f);
                        let level_error = f.kind != FaultKind::ServiceUnavailable;
                        if level_error {
                            tracing::error!(gcs = %self.inner.client.endpoint(), error = %f.message, "the GCS refused this CTS's registration; retrying");
                        } else {
                            tracing::warn!(gcs = %self.inner.client.endpoint(), error = %f.message, "GCS unreachable; retrying");
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            match self.deliver_all().await {
                Ok(()) => {}
                Err(f) => {
                    self.failed(&f);
                    registered = false;
                    tracing::warn!(error = %f.message, "delivery to the GCS interrupted; will register again and resume");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                // Heartbeat: the registration doubles as "still alive".
                _ = tokio::time::sleep(self.inner.heartbeat) => registered = false,
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

    /// Delivers queued items in order. Returns `Err` when the GCS cannot be reached (the item
    /// stays first in line); items the GCS refuses are set aside and their waiters told.
    async fn deliver_all(&self) -> Result<(), Fault> {
        loop {
            let Some((seq, item)) = ({
                let q = self.inner.queue.lock();
                q.items.iter().next().map(|(s, i)| (*s, i.clone()))
            }) else {
                return Ok(());
            };
            let result = self.call(&item).await;
            let path = self.inner.dir.join(format!("{seq:020}.json"));
            let outcome = match result {
                Ok(d) => {
                    self.contacted();
                    let _ = std::fs::remove_file(&path);
                    Ok(d)
                }
                Err(f) if f.kind == FaultKind::ServiceUnavailable => return Err(f),
                Err(f)
                    if f.kind == FaultKind::ResourceUnknown
                        && f.code.as_deref() == Some("unknown-cts-instance") =>
                {
                    // The GCS lost our registration (e.g. an admin removed it): register again.
                    return Err(f);
                }
                Err(f) => {
                    self.contacted();
                    tracing::error!(item = %item.describe(), error = %f.message, file = %path.display(), "the GCS refused an outbox item; set aside under outbox/rejected");
                    let _ = std::fs::rename(
                        &path,
                        self.inner
                            .dir
                            .join("rejected")
                            .join(format!("{seq:020}.json")),
                    );
                    self.inner.status.lock().rejected += 1;
                    Err(f)
                }
            };
            let waiter = {
                let mut q = self.inner.queue.lock();
                q.items.remove(&seq);
                q.waiters.remove(&seq)
            };
            if let Some(w) = waiter {
                let _ = w.send(outcome);
            }
        }
    }

    async fn call(&self, item: &OutboxItem) -> Result<Delivered, Fault> {
        let c = &self.inner.client;
        Ok(match item {
            OutboxItem::RegisterJob(r) => Delivered::Job(c.call::<RegisterJobOp>(r).await?),
            OutboxItem::RegisterCheckpoint(r) => {
                Delivered::Checkpoint(c.call::<RegisterCheckpointOp>(r.as_ref()).await?)
            }
            OutboxItem::JobFinished(r) => Delivered::Finished(c.call::<JobFinishedOp>(r).await?),
            OutboxItem::AbandonRecovery(r) => {
                Delivered::Finished(c.call::<AbandonRecoveryOp>(r).await?)
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

/// Writes `bytes` to `path` through a temporary file, fsynced, then renamed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        // Job state and queued records hold job environments: the CTS's alone.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
