//! # gca-drivers — the core checkpointer drivers
//!
//! Core checkpointer drivers (paper 3.3): one trait, [`CoreCheckpointer`], and one
//! implementation per kind of core service:
//!
//! - [`criu`]: CRIU (system level, whole process trees), through its command line;
//! - [`app`]: application-level checkpointing (the `basic` class): the job checkpoints itself
//!   when signalled, or on its own, into a per-job directory;
//! - [`command`]: any checkpointer with a command line (BLCR, DMTCP, a site's script),
//!   configured as command templates with placeholders;
//! - [`vmm`]: a virtual machine monitor (QEMU over QMP): each job runs in a VM of its own,
//!   checkpointed whole (paper section 4).
//!
//! What drivers share, so that no driver imports from another: [`runner`] (running a
//! program with a bound and describing how it ended), [`proc`] (pidfds, `/proc` facts,
//! signals) and [`error`] (the one error type, [`DriverError`]). Their configuration is
//! plain data in [`gca_protocol::driver_config`]; [`make_driver`] builds the driver it names.
//!
//! A driver only moves bytes between a process and a directory. Naming images, storing them
//! atomically, sequence numbers, locking and registration at the GCS belong to the CTS
//! (`cts::checkpoint`), so every driver gets them the same way. Both the CTS (checkpoints)
//! and the recovery wrapper (restores, in its own process) use this crate.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gca_protocol::driver_config::DriverConfig;
use gca_protocol::placeholders::Values;

pub mod app;
pub mod command;
pub mod criu;
pub mod error;
pub mod exits;
pub mod facts;
pub mod freezer;
pub mod proc;
pub mod runner;
#[cfg(test)]
mod test_support;
pub mod vmm;

pub use error::DriverError;

/// The core checkpointer the configuration names, checked (templates, log level, ...).
pub fn make_driver(cfg: &DriverConfig) -> Result<Arc<dyn CoreCheckpointer>, DriverError> {
    Ok(match cfg {
        DriverConfig::Criu(c) => Arc::new(criu::Criu::new(c.clone())?),
        DriverConfig::Application(c) => Arc::new(app::AppLevel::new(c.clone())?),
        DriverConfig::Command(c) => Arc::new(command::CommandDriver::new(c.clone())?),
        DriverConfig::Vmm(c) => Arc::new(vmm::Vmm::new(c.clone())?),
    })
}

/// A registered job as a driver sees it.
#[derive(Debug, Clone)]
pub struct JobHandle {
    pub gid: String,
    /// The job's root process (the PID the wrapper registered).
    pub pid: i32,
    /// A pidfd for `pid`, opened at registration: signals sent through it cannot reach a
    /// later process that reused the PID. `None` when the kernel has no pidfds.
    pub pidfd: Option<Arc<OwnedFd>>,
    /// The per-job checkpoint directory (`{CHECKPOINT_DIR}`), created by the CTS, owned by
    /// the job's user. Application-level jobs write their images here.
    pub checkpoint_dir: PathBuf,
    /// The job's cgroup (v2), when the CTS gave it one: CRIU freezes it for the dump.
    pub cgroup: Option<PathBuf>,
}

/// The job's process, if it still runs (not a zombie) and, when the CTS holds a pidfd for it,
/// is still the process that pidfd refers to (the PID was not reused).
pub(crate) fn live_job(job: &JobHandle) -> Option<proc::Stat> {
    let st = proc::stat(job.pid)?;
    if st.state == 'Z' || st.state == 'X' {
        return None;
    }
    if let Some(fd) = &job.pidfd {
        if proc::pidfd_pid(fd).is_some_and(|p| p != job.pid) {
            return None;
        }
    }
    Some(st)
}

/// One checkpoint to take.
#[derive(Debug)]
pub struct CheckpointRequest<'a> {
    pub job: &'a JobHandle,
    /// The unique ID the CTS gave this image.
    pub image_id: &'a str,
    /// An empty directory in the image store's staging area: write the image here. The CTS
    /// adds the manifest and moves it into the store only after the driver returns `Ok`.
    pub image_dir: &'a Path,
    /// `false`: the job must not be running any more when the driver returns (migration).
    /// A driver that cannot stop the job itself returns `stopped: false` and the CTS stops it.
    pub leave_running: bool,
    /// Placeholder values for command templates: GID, IMAGE_ID, CTS_*, RESOURCE, ...,
    /// CHECKPOINT_DIR, plus PID and IMAGE_DIR.
    pub values: &'a Values,
    /// Bound on the whole operation.
    pub timeout: Duration,
}

/// What a driver reports about a checkpoint it took.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckpointOutcome {
    /// The job no longer runs (the driver stopped it as part of the checkpoint).
    pub stopped: bool,
}

/// One restore to carry out (used by the recovery wrapper, which must be the restored job's
/// parent: the restore runs in the caller's process).
#[derive(Debug)]
pub struct RestoreRequest<'a> {
    pub gid: &'a str,
    /// The verified image, as the store holds it.
    pub image_dir: &'a Path,
    /// Where an application-level job finds its image (`{CHECKPOINT_DIR}`).
    pub checkpoint_dir: &'a Path,
    pub values: &'a Values,
    pub timeout: Duration,
}

/// The outcome of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The job runs again as `pid`, a child of the calling process (CRIU with
    /// `--restore-sibling`).
    Running { pid: i32 },
    /// The image is in place (in `checkpoint_dir`); the wrapper now starts the job itself with
    /// the CTS type's recovery job parameters (application-level checkpointing).
    StartJob,
    /// The job's virtual machine runs again: QEMU is `pid`, a child of the calling process,
    /// in `run_dir`, where the wrapper reaches the Virtual Node Gate
    /// (`vmm::launch::GATE_SOCKET`).
    VirtualMachine { pid: i32, run_dir: PathBuf },
    /// The job's PID and mount namespaces run again (a CRIU image of an isolated job): `pid`
    /// is their init's host PID, a child of the calling process; `pipes` are the wrapper's
    /// ends of the job's standard streams and of the init's status pipe
    /// (`gca_protocol::isolation`).
    Isolated {
        pid: i32,
        pipes: Arc<NamespacePipes>,
    },
}

/// The wrapper's ends of a restored namespace's pipes.
#[derive(Debug)]
pub struct NamespacePipes {
    /// The job's standard input (write end).
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The init's status pipe (read end).
    pub status: OwnedFd,
}

impl PartialEq for NamespacePipes {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for NamespacePipes {}

/// A core checkpointer, as the CTS drives it.
#[async_trait::async_trait]
pub trait CoreCheckpointer: Send + Sync + std::fmt::Debug {
    /// Short name for logs and status (`criu`, `application`, `command`, `vmm`).
    fn kind(&self) -> &'static str;

    /// Checks at start-up that the core checkpointer is usable (present, right version,
    /// enough privileges); returns a one-line description (e.g. its version).
    async fn self_check(&self) -> Result<String, DriverError>;

    /// Takes one checkpoint of `req.job` into `req.image_dir`.
    async fn checkpoint(
        &self,
        req: CheckpointRequest<'_>,
    ) -> Result<CheckpointOutcome, DriverError>;

    /// A checkpoint the job took on its own (paper 3.3, internal), if one is ready: moves it
    /// into `image_dir` and returns `true`. Drivers whose jobs never do this return `false`.
    async fn collect_internal(
        &self,
        _job: &JobHandle,
        _image_dir: &Path,
    ) -> Result<bool, DriverError> {
        Ok(false)
    }

    /// Restores a job from an image; the restored job becomes a child of the caller.
    async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, DriverError>;
}
