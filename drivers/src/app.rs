//! Application-level checkpointing (class `basic`): the job checkpoints itself.
//!
//! This is the HTCondor self-checkpointing / BLCR-callback way (paper 3.3): the CTS asks the
//! job to write a checkpoint (external requests, from the GCS or periodic), and also notices
//! the checkpoints the job writes on its own (internal checkpoints) and registers them. The
//! job's checkpoint is a set of files; the CTS turns each one into an image.
//!
//! # The protocol an application follows
//!
//! 1. **The directory.** The job finds its checkpoint directory in the environment variable
//!    `GCA_CHECKPOINT_DIR` (in CTS type parameters: `{CHECKPOINT_DIR}`). The CTS creates it,
//!    owned by the job's user, before the job starts.
//! 2. **Who owns it.** The directory belongs to the job until the job creates the marker file
//!    `GCA_CHECKPOINT_DIR/.gca-complete`. From then on it belongs to the CTS, until the marker
//!    disappears: the job must not write, rename or delete anything in it, nor start a new
//!    checkpoint, while the marker exists.
//! 3. **Writing a checkpoint.** Write the state files (any names, subdirectories allowed) and
//!    close them; then create the marker, last. Write the marker under a temporary name and
//!    rename it to `.gca-complete`, so it appears complete in one step. Its content is
//!    optional: a line of text describing the checkpoint (e.g. `step 1200`), kept in the image.
//!    Everything in the directory when the marker appears is the checkpoint, so remove
//!    leftovers (from a restart, from an abandoned attempt) before writing the marker.
//! 4. **What a checkpoint may hold.** Regular files (with a single hard link each) and
//!    directories; nothing else: a symbolic link, FIFO, socket or device file anywhere in the
//!    directory makes the CTS refuse the checkpoint (it would otherwise copy whatever the link
//!    points to into an image that is served to other resources). The top-level name
//!    `manifest.json` is reserved for the image store.
//! 5. **On request.** The CTS sends the job `SIGUSR1` (configurable per CTS: `signal`) and
//!    waits, up to the request's timeout, for the marker. The job writes a checkpoint as soon
//!    as it can; the first checkpoint completed after the signal answers the request (one the
//!    job was already writing when the signal came counts). A job that does not answer in time
//!    fails the request; the job keeps running.
//! 6. **On its own.** The job may write a checkpoint at any time, the same way, as long as no
//!    marker exists (if one does, skip this one or wait until it is gone). The CTS looks for
//!    markers periodically and registers what it finds as internal checkpoints.
//! 7. **Collection.** The CTS moves the files out of the directory into a new image, the marker
//!    last. When the marker is gone the (now empty) directory is the job's again. If the CTS
//!    refuses a checkpoint (rule 4) or fails to take it, it drops it: it removes the marker,
//!    and any file it has not moved yet stays where it was.
//! 8. **Migration.** When the job is to stop after the checkpoint, the CTS stops it once the
//!    checkpoint is collected, with its usual stop signal; nothing special for the job to do.
//! 9. **Restart.** The recovery wrapper puts the image's files (without the marker) into a
//!    fresh checkpoint directory and starts the job with the CTS type's recovery job
//!    parameters, e.g. `--restart-from={CHECKPOINT_DIR}`; the job reads its state from there.
//!    The restored files stay in the directory (rule 3: overwrite or remove them before the
//!    next checkpoint).
//!
//! `examples/app-counter.sh` is a complete job that follows this protocol, in bash.
//!
//! # What the driver does
//!
//! - [`CoreCheckpointer::checkpoint`]: checks the job is alive (by PID, start time and pidfd;
//!   `job-gone` otherwise), refuses with `internal-checkpoint-pending` if a marker is already
//!   there (the CTS calls `collect_internal` first, under the same per-job lock, so this only
//!   happens if the job completed a checkpoint of its own in between: collect it and retry),
//!   sends the signal through the pidfd, polls for the marker every `poll_interval_ms` until
//!   the request's timeout (`checkpointer-timeout`; `job-gone` if the job dies first), then
//!   moves the checkpoint into the image. It never stops the job itself: with
//!   `leave_running: false` it returns `stopped: false` (or `true` if the job has exited on its
//!   own) and the CTS stops the job.
//! - [`CoreCheckpointer::collect_internal`]: if the marker exists, moves the checkpoint into
//!   the image and returns `true`, whether or not the job still runs.
//! - [`CoreCheckpointer::restore`]: copies the image's files (not `manifest.json`, not the
//!   marker) into the checkpoint directory (created if missing, emptied first), gives them to
//!   the directory's owner when it runs as root, and returns [`Restored::StartJob`].
//!
//! The image holds the job's files under their own names plus the marker, as `.gca-complete`.
//! Files are copied into the image (then removed from the checkpoint directory), never
//! renamed: a renamed file would stay the job's inode, which its owner could still change
//! (through a hard link or an open descriptor) after the CTS hashed it. Copies are root's,
//! keep their permission bits (plus owner read and write, without set-ID bits or group and
//! other write), in the store's directories that only root can reach. The driver walks
//! the directory through file descriptors opened with `O_NOFOLLOW`, creates the image's
//! directories itself, moves files one by one and checks each one again where it landed, in
//! the image directory the job cannot reach: a job that swaps a file for a link while the CTS
//! collects gets its checkpoint refused, not a foreign file in its image.
//!
//! Limits: a job that holds a file of its checkpoint open can still write to it after the CTS
//! moved it (it only spoils its own image, which then fails its digest check or its restart);
//! the CTS cannot tell a checkpoint written in answer to the signal from one the job had just
//! started before it.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gca_protocol::driver_config::AppConfig;
use gca_protocol::FaultKind;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::Signal;

use crate::{
    proc, CheckpointOutcome, CheckpointRequest, CoreCheckpointer, DriverError, JobHandle,
    RestoreRequest, Restored,
};

/// The environment variable that names the job's checkpoint directory.
pub const ENV_CHECKPOINT_DIR: &str = "GCA_CHECKPOINT_DIR";
/// The marker a job creates, last, when its checkpoint is complete.
pub const MARKER: &str = ".gca-complete";
/// The image store's metadata file: reserved, never taken from nor restored into a job's
/// directory.
pub const MANIFEST: &str = "manifest.json";

/// How deep a checkpoint's directories may nest.
const MAX_DEPTH: usize = 64;

/// The application-level core checkpointer: the job is its own checkpointer.
#[derive(Debug)]
pub struct AppLevel {
    signal: Signal,
    /// The signal as people write it, for messages: `SIGUSR1`.
    signal_name: String,
    poll_interval: Duration,
}

impl AppLevel {
    pub fn new(cfg: AppConfig) -> Result<Self, DriverError> {
        let signal = proc::parse_signal(&cfg.signal).ok_or_else(|| {
            DriverError::unavailable(format!(
                "application-level driver: unknown signal {:?} (use a name such as SIGUSR1 or a number)",
                cfg.signal
            ))
        })?;
        if signal == Signal::KILL || signal == Signal::STOP {
            return Err(DriverError::unavailable(format!(
                "application-level driver: signal {} cannot be handled by a job; use one it can catch, such as SIGUSR1",
                cfg.signal
            )));
        }
        if cfg.poll_interval_ms == 0 {
            return Err(DriverError::unavailable(
                "application-level driver: poll_interval_ms must be at least 1",
            ));
        }
        Ok(Self {
            signal,
            signal_name: signal_display_name(&cfg.signal),
            poll_interval: Duration::from_millis(cfg.poll_interval_ms),
        })
    }
}

/// `usr1` → `SIGUSR1`, `10` → `signal 10`.
fn signal_display_name(configured: &str) -> String {
    let s = configured.trim();
    if s.chars().all(|c| c.is_ascii_digit()) {
        return format!("signal {s}");
    }
    let upper = s.to_ascii_uppercase();
    if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    }
}

/// Seconds, as short as possible: `30`, `0.5`.
fn secs(d: Duration) -> String {
    format!("{}", (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// The job's process as found at the start of an operation: later checks use the start time
/// (and the pidfd, when there is one) so that a reused PID is never taken for the job.
struct Watched<'a> {
    job: &'a JobHandle,
    start_time: u64,
}

impl<'a> Watched<'a> {
    fn find(job: &'a JobHandle) -> Result<Self, DriverError> {
        let gone =
            || DriverError::job_gone(format!("job {} (pid {}) is not running", job.gid, job.pid));
        let st = proc::stat(job.pid).ok_or_else(gone)?;
        let w = Self {
            job,
            start_time: st.start_time,
        };
        if w.alive() {
            Ok(w)
        } else {
            Err(gone())
        }
    }

    fn alive(&self) -> bool {
        if !proc::is_alive(self.job.pid, self.start_time) {
            return false;
        }
        // The pidfd says which process it refers to: -1 once that one has been reaped.
        match self.job.pidfd.as_deref().and_then(proc::pidfd_pid) {
            Some(pid) => pid == self.job.pid,
            None => true,
        }
    }
}

fn marker_exists(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(MARKER)).is_ok()
}

fn internal(message: String) -> DriverError {
    DriverError::new(FaultKind::Internal, "internal", message)
}

#[async_trait::async_trait]
impl CoreCheckpointer for AppLevel {
    fn kind(&self) -> &'static str {
        "application"
    }

    async fn self_check(&self) -> Result<String, DriverError> {
        Ok(format!(
            "application-level checkpoints (signal {})",
            self.signal_name
        ))
    }

    async fn checkpoint(
        &self,
        req: CheckpointRequest<'_>,
    ) -> Result<CheckpointOutcome, DriverError> {
        let job = req.job;
        let watched = Watched::find(job)?;
        let dir = &job.checkpoint_dir;
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(DriverError::failed(format!(
                    "job {}: its checkpoint directory {} is missing or not a directory",
                    job.gid,
                    dir.display()
                )))
            }
        }
        if marker_exists(dir) {
            return Err(DriverError::new(
                FaultKind::Conflict,
                "internal-checkpoint-pending",
                format!(
                    "job {} has a checkpoint of its own waiting to be collected ({} exists); \
                     collect it first, then ask again",
                    job.gid,
                    dir.join(MARKER).display()
                ),
            ));
        }

        let started = tokio::time::Instant::now();
        let deadline = started + req.timeout;
        if let Err(e) = proc::send_signal(job.pid, job.pidfd.as_deref(), self.signal) {
            return Err(if e.raw_os_error() == Some(Errno::SRCH.raw_os_error()) {
                DriverError::job_gone(format!("job {} (pid {}) is not running", job.gid, job.pid))
            } else {
                DriverError::failed(format!(
                    "job {} (pid {}): cannot send {}: {e}",
                    job.gid, job.pid, self.signal_name
                ))
            });
        }
        tracing::debug!(gid = %job.gid, pid = job.pid, signal = %self.signal_name, "asked the job to checkpoint itself");

        loop {
            // Liveness first: a job that wrote its marker and then exited has still answered.
            let alive = watched.alive();
            if marker_exists(dir) {
                break;
            }
            let now = tokio::time::Instant::now();
            if !alive {
                return Err(DriverError::job_gone(format!(
                    "job {} (pid {}) exited {} s after {}, before completing its checkpoint",
                    job.gid,
                    job.pid,
                    secs(now - started),
                    self.signal_name
                )));
            }
            if now >= deadline {
                return Err(DriverError::timeout(format!(
                    "job {} (pid {}) did not complete its checkpoint within {} s after {sig}; \
                     is it an application-level checkpointing program that handles {sig} and \
                     writes {ENV_CHECKPOINT_DIR}/{MARKER}?",
                    job.gid,
                    job.pid,
                    secs(req.timeout),
                    sig = self.signal_name
                )));
            }
            tokio::time::sleep(self.poll_interval.min(deadline - now)).await;
        }
        tracing::info!(
            gid = %job.gid,
            image_id = req.image_id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the job completed its checkpoint"
        );

        collect_blocking(&job.gid, dir, req.image_dir).await?;
        let stopped = !req.leave_running && !watched.alive();
        Ok(CheckpointOutcome { stopped })
    }

    async fn collect_internal(
        &self,
        job: &JobHandle,
        image_dir: &Path,
    ) -> Result<bool, DriverError> {
        if !marker_exists(&job.checkpoint_dir) {
            return Ok(false);
        }
        collect_blocking(&job.gid, &job.checkpoint_dir, image_dir).await?;
        tracing::info!(gid = %job.gid, "collected a checkpoint the job took on its own");
        Ok(true)
    }

    async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, DriverError> {
        let gid = req.gid.to_string();
        let image_dir = req.image_dir.to_path_buf();
        let checkpoint_dir = req.checkpoint_dir.to_path_buf();
        tokio::task::spawn_blocking(move || restore_files(&gid, &image_dir, &checkpoint_dir))
            .await
            .map_err(|e| internal(format!("restore task failed: {e}")))??;
        Ok(Restored::StartJob)
    }
}

async fn collect_blocking(gid: &str, dir: &Path, image_dir: &Path) -> Result<(), DriverError> {
    let (gid, dir, image_dir) = (gid.to_string(), dir.to_path_buf(), image_dir.to_path_buf());
    tokio::task::spawn_blocking(move || collect(&gid, &dir, &image_dir))
        .await
        .map_err(|e| internal(format!("collect task failed: {e}")))?
}

// ---------------------------------------------------------------------------------------------
// Moving and copying files without following links.

/// Why a walk stopped.
#[derive(Debug)]
enum WalkError {
    /// The checkpoint holds something it must not (protocol rule 4).
    Refused(String),
    /// An I/O error, with what was being done.
    Io(String),
}

type WalkResult<T = ()> = Result<T, WalkError>;

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> WalkError {
    WalkError::Io(format!("{what}: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Only check what the directory holds.
    Scan,
    /// Move everything into the destination (the job's directory → an image).
    Move,
    /// Copy everything into the destination (an image → a job's directory).
    Copy,
}

fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

fn open_subdir(parent: &OwnedFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The names in a directory (not `.` and `..`), sorted, read before anything is changed.
fn entries(dir: &OwnedFd, rel: &Path) -> WalkResult<Vec<CString>> {
    let list = rustix::fs::Dir::read_from(dir).map_err(|e| io_err(rel_display(rel), e))?;
    let mut names = Vec::new();
    for entry in list {
        let entry = entry.map_err(|e| io_err(rel_display(rel), e))?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn rel_display(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.display().to_string()
    }
}

fn join(rel: &Path, name: &CStr) -> PathBuf {
    rel.join(OsStr::from_bytes(name.to_bytes()))
}

fn kind_of(ft: FileType) -> &'static str {
    match ft {
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Unknown => "a file of unknown type",
    }
}

fn refused(path: &Path, what: &str) -> WalkError {
    WalkError::Refused(format!(
        "`{}` is {what}; an application-level checkpoint may hold only regular files (with one \
         hard link each) and directories",
        path.display()
    ))
}

/// Checks that a stat result is a regular file with one link (for files the CTS takes over).
fn check_takeable(st: &rustix::fs::Stat, path: &Path) -> WalkResult {
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::RegularFile {
        return Err(refused(path, kind_of(ft)));
    }
    if st.st_nlink != 1 {
        return Err(refused(path, "a file with more than one hard link"));
    }
    Ok(())
}

/// Walks `src` (a directory opened with `O_NOFOLLOW`), doing `op` into `dst`; names in
/// `skip_top` are left out at the top level.
fn walk(
    op: Op,
    src: &OwnedFd,
    dst: Option<&OwnedFd>,
    rel: &Path,
    depth: usize,
    skip_top: &[&str],
) -> WalkResult {
    if depth > MAX_DEPTH {
        return Err(WalkError::Refused(format!(
            "`{}` is nested more than {MAX_DEPTH} directories deep",
            rel.display()
        )));
    }
    for name in entries(src, rel)? {
        if depth == 0 && skip_top.iter().any(|s| s.as_bytes() == name.to_bytes()) {
            continue;
        }
        let path = join(rel, &name);
        if op == Op::Scan && depth == 0 && name.to_bytes() == MANIFEST.as_bytes() {
            return Err(WalkError::Refused(format!(
                "`{MANIFEST}` is reserved for the image store's metadata"
            )));
        }
        let st = rustix::fs::statat(src, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(format!("stat `{}`", path.display()), e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let sub = open_subdir(src, &name).map_err(|e| match e {
                    Errno::LOOP | Errno::NOTDIR => refused(&path, "no longer a directory"),
                    e => io_err(format!("open `{}`", path.display()), e),
                })?;
                match (op, dst) {
                    (Op::Scan, _) | (_, None) => walk(op, &sub, None, &path, depth + 1, skip_top)?,
                    (_, Some(dst)) => {
                        rustix::fs::mkdirat(dst, name.as_c_str(), Mode::from_raw_mode(0o755))
                            .map_err(|e| io_err(format!("create `{}`", path.display()), e))?;
                        let sub_dst = open_subdir(dst, &name)
                            .map_err(|e| io_err(format!("open `{}`", path.display()), e))?;
                        walk(op, &sub, Some(&sub_dst), &path, depth + 1, skip_top)?;
                        if op == Op::Move {
                            // Empty now, unless the job wrote into it meanwhile (against the
                            // protocol); then it stays.
                            if let Err(e) =
                                rustix::fs::unlinkat(src, name.as_c_str(), AtFlags::REMOVEDIR)
                            {
                                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a collected checkpoint directory");
                            }
                        }
                    }
                }
            }
            FileType::RegularFile => match (op, dst) {
                (Op::Scan, _) | (_, None) => check_takeable(&st, &path)?,
                (Op::Move, Some(dst)) => {
                    check_takeable(&st, &path)?;
                    move_file(src, &name, dst, &path)?;
                }
                (Op::Copy, Some(dst)) => copy_file(src, &name, dst, &path)?,
            },
            other => return Err(refused(&path, kind_of(other))),
        }
    }
    Ok(())
}

/// Moves one regular file by name from `src` into `dst`: a copy (a new inode of the CTS's,
/// which the job cannot reach), then the original removed. `copy_file` opens the source
/// without following a link and checks it is a regular file.
fn move_file(src: &OwnedFd, name: &CStr, dst: &OwnedFd, path: &Path) -> WalkResult {
    copy_file(src, name, dst, path)?;
    rustix::fs::unlinkat(src, name, AtFlags::empty())
        .map_err(|e| io_err(format!("remove `{}` after copying it", path.display()), e))
}

/// Copies one regular file by name from `src` into `dst` (which must not have it), without
/// following a link and without blocking on a FIFO.
fn copy_file(src: &OwnedFd, name: &CStr, dst: &OwnedFd, path: &Path) -> WalkResult {
    let input = rustix::fs::openat(
        src,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::LOOP => refused(path, "a symbolic link"),
        e => io_err(format!("open `{}`", path.display()), e),
    })?;
    let st =
        rustix::fs::fstat(&input).map_err(|e| io_err(format!("stat `{}`", path.display()), e))?;
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft != FileType::RegularFile {
        return Err(refused(path, kind_of(ft)));
    }
    let output = rustix::fs::openat(
        dst,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode((st.st_mode & 0o755) | 0o600),
    )
    .map_err(|e| io_err(format!("create `{}`", path.display()), e))?;
    let mut input = File::from(input);
    let mut output = File::from(output);
    std::io::copy(&mut input, &mut output)
        .and_then(|_| output.sync_all())
        .map_err(|e| io_err(format!("copy `{}`", path.display()), e))?;
    Ok(())
}

/// Removes everything in a directory (not the directory itself), without following links.
fn clear_dir(path: &Path) -> std::io::Result<()> {
    let fd = open_dir(path)?;
    let names = entries(&fd, Path::new("")).map_err(|e| match e {
        WalkError::Io(m) | WalkError::Refused(m) => std::io::Error::other(m),
    })?;
    for name in names {
        let st = rustix::fs::statat(&fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            // `remove_dir_all` does not follow links (it walks with openat/unlinkat).
            std::fs::remove_dir_all(path.join(OsStr::from_bytes(name.to_bytes())))?;
        } else {
            rustix::fs::unlinkat(&fd, name.as_c_str(), AtFlags::empty())?;
        }
    }
    Ok(())
}

/// The journal of a collection in progress: beside the job's directory (in the CTS's own
/// directory, out of the job's reach), naming the marker being collected.
fn journal_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    dir.with_file_name(format!(".{name}.collecting"))
}

/// Which marker file this is: a new one (the job's next checkpoint) differs even if it
/// reuses the inode of one collected before.
fn marker_identity(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(dir.join(MARKER)).ok()?;
    Some(format!(
        "{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn write_synced(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Takes the completed checkpoint in `dir` into `image_dir` (empty, in the store's staging
/// area). On error the checkpoint is dropped: `image_dir` is emptied and the marker removed.
///
/// Crash-safe: files are moved one by one, so a CTS that stops in the middle leaves part of
/// them in its staging area (emptied at its next start) and the rest, with the marker, in
/// `dir`. The journal written before the first move says so at the next collection, which
/// drops that remainder instead of taking it for a whole checkpoint.
fn collect(gid: &str, dir: &Path, image_dir: &Path) -> Result<(), DriverError> {
    let journal = journal_path(dir);
    let marker = marker_identity(dir);
    match std::fs::read_to_string(&journal) {
        Ok(collecting) if marker.as_deref() == Some(collecting.as_str()) => {
            tracing::error!(gid, dir = %dir.display(), "the collection of this checkpoint was interrupted (the CTS stopped); its remainder is dropped");
            let cleared = clear_dir(dir);
            let _ = std::fs::remove_file(&journal);
            cleared.map_err(|e| {
                DriverError::failed(format!(
                    "job {gid}: cannot drop the remainder of an interrupted collection in {}: {e}",
                    dir.display()
                ))
            })?;
            return Err(DriverError::new(
                FaultKind::OperationFailed,
                "app-collection-interrupted",
                format!(
                    "job {gid}: the collection of its checkpoint in {} was interrupted by a stop of the CTS; what was left of it was dropped, not registered",
                    dir.display()
                ),
            ));
        }
        // A collection that ended after its marker moved: nothing to undo.
        Ok(_) => {
            let _ = std::fs::remove_file(&journal);
        }
        Err(_) => {}
    }
    if let Some(id) = &marker {
        write_synced(&journal, id).map_err(|e| {
            DriverError::failed(format!(
                "job {gid}: cannot write the collection journal {}: {e}",
                journal.display()
            ))
        })?;
    }
    let result = collect_files(dir, image_dir);
    let _ = std::fs::remove_file(&journal);
    let Err(err) = result else {
        return Ok(());
    };
    if let Err(e) = clear_dir(image_dir) {
        tracing::warn!(gid, image_dir = %image_dir.display(), error = %e, "cannot empty the image directory after a failed collection");
    }
    let marker = dir.join(MARKER);
    let removed = match std::fs::symlink_metadata(&marker) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&marker),
        Ok(_) => std::fs::remove_file(&marker),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        tracing::warn!(gid, marker = %marker.display(), error = %e, "cannot remove the marker of a dropped checkpoint");
    }
    Err(match err {
        WalkError::Refused(m) => DriverError::new(
            FaultKind::OperationFailed,
            "app-bad-image",
            format!(
                "job {gid}: refused its checkpoint in {}: {m}; the checkpoint was dropped",
                dir.display()
            ),
        ),
        WalkError::Io(m) => DriverError::failed(format!(
            "job {gid}: cannot collect its checkpoint from {}: {m}; the checkpoint was dropped",
            dir.display()
        )),
    })
}

fn collect_files(dir: &Path, image_dir: &Path) -> WalkResult {
    let src = open_dir(dir).map_err(|e| io_err(format!("open {}", dir.display()), e))?;
    let marker = CString::new(MARKER).expect("no NUL in the marker name");
    let st = rustix::fs::statat(&src, marker.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io_err(format!("stat `{MARKER}`"), e))?;
    check_takeable(&st, Path::new(MARKER))?;
    // Check everything before moving anything: a bad checkpoint is refused untouched.
    walk(Op::Scan, &src, None, Path::new(""), 0, &[MARKER])?;
    let dst =
        open_dir(image_dir).map_err(|e| io_err(format!("open {}", image_dir.display()), e))?;
    walk(Op::Move, &src, Some(&dst), Path::new(""), 0, &[MARKER])?;
    // The marker last: while it exists the directory is still the CTS's.
    move_file(&src, marker.as_c_str(), &dst, Path::new(MARKER))
}

/// Puts an image's files into a job's (emptied) checkpoint directory.
fn restore_files(gid: &str, image_dir: &Path, checkpoint_dir: &Path) -> Result<(), DriverError> {
    let fail = |what: String| {
        DriverError::failed(format!(
            "job {gid}: cannot restore image {} into {}: {what}",
            image_dir.display(),
            checkpoint_dir.display()
        ))
    };
    std::fs::create_dir_all(checkpoint_dir).map_err(|e| fail(format!("create it: {e}")))?;
    clear_dir(checkpoint_dir).map_err(|e| fail(format!("empty it: {e}")))?;
    let src = open_dir(image_dir).map_err(|e| fail(format!("open the image: {e}")))?;
    let dst = open_dir(checkpoint_dir).map_err(|e| fail(format!("open it: {e}")))?;
    walk(
        Op::Copy,
        &src,
        Some(&dst),
        Path::new(""),
        0,
        &[MANIFEST, MARKER],
    )
    .map_err(|e| match e {
        WalkError::Refused(m) => DriverError::new(
            FaultKind::OperationFailed,
            "app-bad-image",
            format!(
                "job {gid}: image {} is not an application-level checkpoint: {m}",
                image_dir.display()
            ),
        ),
        WalkError::Io(m) => fail(m),
    })?;
    // Make sure the restored files are owned as the directory says, if we can (the recovery
    // wrapper may run as root for a job of another user).
    if let Ok(m) = std::fs::metadata(checkpoint_dir) {
        use std::os::unix::fs::MetadataExt;
        let _ = chown_tree(&dst, m.uid(), m.gid(), 0);
    }
    Ok(())
}

/// Gives everything under `dir` to `uid:gid` (best effort; only root can, and only root needs
/// to).
fn chown_tree(dir: &OwnedFd, uid: u32, gid: u32, depth: usize) -> WalkResult {
    if depth > MAX_DEPTH || rustix::process::geteuid().as_raw() != 0 {
        return Ok(());
    }
    let (u, g) = (
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    );
    for name in entries(dir, Path::new(""))? {
        let _ = rustix::fs::chownat(dir, name.as_c_str(), u, g, AtFlags::SYMLINK_NOFOLLOW);
        if let Ok(sub) = open_subdir(dir, &name) {
            chown_tree(&sub, uid, gid, depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;

    use gca_protocol::placeholders::Values;

    use super::*;

    /// A process started by a test: killed and reaped when dropped.
    struct Proc(Child);

    impl Proc {
        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/app-counter.sh")
    }

    fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start a test job"),
        )
    }

    fn counter(ckpt: &Path, log: &Path, env: &[(&str, &str)], args: &[&str]) -> Proc {
        spawn(
            Command::new("bash")
                .arg(script())
                .args(args)
                .arg(log)
                .env(ENV_CHECKPOINT_DIR, ckpt)
                .envs(env.iter().copied()),
        )
    }

    fn handle(gid: &str, p: &Proc, ckpt: &Path) -> JobHandle {
        JobHandle {
            gid: gid.to_string(),
            pid: p.pid(),
            pidfd: proc::pidfd(p.pid()).map(Arc::new),
            checkpoint_dir: ckpt.to_path_buf(),
            cgroup: None,
        }
    }

    fn driver() -> AppLevel {
        AppLevel::new(AppConfig {
            poll_interval_ms: 20,
            ..AppConfig::default()
        })
        .unwrap()
    }

    async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    fn log_values(log: &Path) -> Vec<u64> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn read_number(path: &Path) -> u64 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Names in a directory, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    async fn take(
        d: &AppLevel,
        job: &JobHandle,
        image_dir: &Path,
        timeout: Duration,
        leave_running: bool,
    ) -> Result<CheckpointOutcome, DriverError> {
        let values = Values::new();
        d.checkpoint(CheckpointRequest {
            job,
            image_id: "img-1",
            image_dir,
            leave_running,
            values: &values,
            timeout,
        })
        .await
    }

    fn ignores_usr1(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigIgn:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & (1 << (10 - 1)) != 0)
    }

    /// A CTS that stopped while moving a checkpoint's files (its journal names the marker
    /// still there) does not register the remainder; a journal left by a finished collection
    /// does not drop the job's next checkpoint.
    #[test]
    fn an_interrupted_collection_is_dropped_not_registered() {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, image) = (tmp.path().join("ckpt"), tmp.path().join("image"));
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::create_dir(&image).unwrap();
        // What the crash left: one file of two, the marker, and the journal naming it.
        std::fs::write(ckpt.join("part-2"), "second half").unwrap();
        std::fs::write(ckpt.join(MARKER), "").unwrap();
        std::fs::write(journal_path(&ckpt), marker_identity(&ckpt).unwrap()).unwrap();
        let e = collect("gid-crash", &ckpt, &image).unwrap_err();
        assert_eq!(e.code, "app-collection-interrupted", "{e:?}");
        assert!(names(&ckpt).is_empty(), "the remainder is dropped");
        assert!(names(&image).is_empty(), "nothing taken");
        assert!(!journal_path(&ckpt).exists());

        // A stale journal (its marker was collected) and the job's next checkpoint.
        std::fs::write(journal_path(&ckpt), "0:0:0.0").unwrap();
        std::fs::write(ckpt.join("state"), "42").unwrap();
        std::fs::write(ckpt.join(MARKER), "").unwrap();
        collect("gid-crash", &ckpt, &image).unwrap();
        assert_eq!(names(&image), vec![MARKER.to_string(), "state".to_string()]);
        assert!(!journal_path(&ckpt).exists());
    }

    #[tokio::test]
    async fn requested_checkpoint_moves_the_jobs_files_into_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, log, image) = (
            tmp.path().join("ckpt"),
            tmp.path().join("log"),
            tmp.path().join("image"),
        );
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::create_dir(&image).unwrap();
        let p = counter(&ckpt, &log, &[], &[]);
        let job = handle("gid-req", &p, &ckpt);
        assert!(until(Duration::from_secs(3), || log_values(&log).len() >= 2).await);
        let before = *log_values(&log).last().unwrap();

        let out = take(&driver(), &job, &image, Duration::from_secs(3), true)
            .await
            .unwrap();
        assert_eq!(out, CheckpointOutcome { stopped: false });
        assert_eq!(names(&image), vec![MARKER.to_string(), "state".to_string()]);
        let value = read_number(&image.join("state"));
        assert!(
            value >= before,
            "checkpointed {value}, counter was {before} at the request"
        );
        let description = std::fs::read_to_string(image.join(MARKER)).unwrap();
        assert!(
            description.contains(&format!("counter {value} (request")),
            "{description}"
        );
        // The directory is the job's again, and the job still counts.
        assert!(names(&ckpt).is_empty(), "{:?}", names(&ckpt));
        let w = Watched::find(&job).expect("still running");
        assert!(
            until(Duration::from_secs(3), || log_values(&log).last()
                > Some(&value))
            .await
        );
        assert!(w.alive());

        // A second request, for a migration: the driver leaves the stopping to the CTS.
        let image2 = tmp.path().join("image2");
        std::fs::create_dir(&image2).unwrap();
        let out = take(&driver(), &job, &image2, Duration::from_secs(3), false)
            .await
            .unwrap();
        assert_eq!(out, CheckpointOutcome { stopped: false });
        assert!(read_number(&image2.join("state")) > value);
    }

    #[tokio::test]
    async fn a_job_that_ignores_the_signal_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let p = spawn(Command::new("bash").args(["-c", "trap '' USR1; sleep 30"]));
        assert!(until(Duration::from_secs(3), || ignores_usr1(p.pid())).await);
        let job = handle("gid-deaf", &p, tmp.path());
        let image = tempfile::tempdir().unwrap();

        let err = take(
            &driver(),
            &job,
            image.path(),
            Duration::from_millis(400),
            true,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, "checkpointer-timeout", "{err}");
        assert_eq!(
            err.message,
            format!(
                "job gid-deaf (pid {}) did not complete its checkpoint within 0.4 s after SIGUSR1; \
                 is it an application-level checkpointing program that handles SIGUSR1 and writes \
                 GCA_CHECKPOINT_DIR/.gca-complete?",
                p.pid()
            )
        );
        assert!(Watched::find(&job).is_ok(), "the job keeps running");
        assert!(names(image.path()).is_empty());
    }

    #[tokio::test]
    async fn a_job_that_is_gone_or_dies_is_reported_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        let d = driver();

        // Exited (and reaped) before the request.
        let mut p = spawn(&mut Command::new("true"));
        let job = handle("gid-done", &p, tmp.path());
        p.0.wait().unwrap();
        let err = take(&d, &job, image.path(), Duration::from_secs(1), true)
            .await
            .unwrap_err();
        assert_eq!(err.code, "job-gone", "{err}");
        assert_eq!(err.kind, FaultKind::ResourceUnknown);

        // Dies of the signal (sleep does not handle SIGUSR1) while the driver waits.
        let p = spawn(Command::new("sleep").arg("30"));
        let job = handle("gid-dies", &p, tmp.path());
        let err = take(&d, &job, image.path(), Duration::from_secs(3), true)
            .await
            .unwrap_err();
        assert_eq!(err.code, "job-gone", "{err}");
        assert!(
            err.message.contains("before completing its checkpoint"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_the_job_takes_on_its_own_is_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, log) = (tmp.path().join("ckpt"), tmp.path().join("log"));
        std::fs::create_dir(&ckpt).unwrap();
        let p = counter(
            &ckpt,
            &log,
            &[
                ("APP_SELF_CHECKPOINT_EVERY", "3"),
                ("APP_COUNTER_STEP", "0.05"),
            ],
            &[],
        );
        let job = handle("gid-self", &p, &ckpt);
        let d = driver();

        let image = tmp.path().join("image");
        std::fs::create_dir(&image).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
        while !d.collect_internal(&job, &image).await.unwrap() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no internal checkpoint"
            );
            assert!(names(&image).is_empty());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let value = read_number(&image.join("state"));
        assert_eq!(value % 3, 0, "self checkpoints come every 3 steps: {value}");
        let description = std::fs::read_to_string(image.join(MARKER)).unwrap();
        assert!(description.contains("self checkpoint"), "{description}");
    }

    #[tokio::test]
    async fn a_request_while_a_checkpoint_of_the_jobs_own_is_pending_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("state"), "7\n").unwrap();
        std::fs::write(tmp.path().join(MARKER), "").unwrap();
        let p = spawn(Command::new("sleep").arg("30"));
        let job = handle("gid-pending", &p, tmp.path());
        let image = tempfile::tempdir().unwrap();
        let err = take(&driver(), &job, image.path(), Duration::from_secs(1), true)
            .await
            .unwrap_err();
        assert_eq!(err.code, "internal-checkpoint-pending", "{err}");
        assert!(Watched::find(&job).is_ok(), "no signal was sent");
        // Collecting it first clears the way.
        assert!(driver().collect_internal(&job, image.path()).await.unwrap());
        assert_eq!(
            names(image.path()),
            vec![MARKER.to_string(), "state".to_string()]
        );
    }

    #[tokio::test]
    async fn subdirectories_are_taken_and_the_directory_is_left_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, image) = (tmp.path().join("ckpt"), tmp.path().join("image"));
        std::fs::create_dir_all(ckpt.join("a/b")).unwrap();
        std::fs::create_dir(&image).unwrap();
        std::fs::write(ckpt.join("top"), "1").unwrap();
        std::fs::write(ckpt.join("a/one"), "2").unwrap();
        std::fs::write(ckpt.join("a/b/two"), "3").unwrap();
        std::fs::write(ckpt.join(MARKER), "step 42\n").unwrap();
        let job = JobHandle {
            gid: "gid-tree".into(),
            pid: std::process::id() as i32,
            pidfd: None,
            checkpoint_dir: ckpt.clone(),
            cgroup: None,
        };
        assert!(driver().collect_internal(&job, &image).await.unwrap());
        assert!(names(&ckpt).is_empty());
        assert_eq!(std::fs::read_to_string(image.join("top")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(image.join("a/one")).unwrap(), "2");
        assert_eq!(std::fs::read_to_string(image.join("a/b/two")).unwrap(), "3");
        assert_eq!(
            std::fs::read_to_string(image.join(MARKER)).unwrap(),
            "step 42\n"
        );
        // Nothing more to collect.
        assert!(!driver().collect_internal(&job, &image).await.unwrap());
    }

    /// The job's file arrives in the image as a new inode of the CTS's: writing to the
    /// original through a descriptor the job kept open, after the collection, changes
    /// nothing in the image.
    #[tokio::test]
    async fn files_are_copied_into_the_image_never_renamed() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, image) = (tmp.path().join("ckpt"), tmp.path().join("image"));
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::create_dir(&image).unwrap();
        std::fs::write(ckpt.join("state"), "41").unwrap();
        let mut kept = std::fs::OpenOptions::new()
            .append(true)
            .open(ckpt.join("state"))
            .unwrap();
        let original = kept.metadata().unwrap().ino();
        std::fs::write(ckpt.join(MARKER), "").unwrap();
        let job = JobHandle {
            gid: "gid-copy".into(),
            pid: std::process::id() as i32,
            pidfd: None,
            checkpoint_dir: ckpt.clone(),
            cgroup: None,
        };
        assert!(driver().collect_internal(&job, &image).await.unwrap());
        let copy = std::fs::metadata(image.join("state")).unwrap();
        assert_ne!(copy.ino(), original, "a copy, not the job's inode");
        kept.write_all(b"666").unwrap();
        assert_eq!(std::fs::read_to_string(image.join("state")).unwrap(), "41");
    }

    #[tokio::test]
    async fn links_and_special_files_are_refused() {
        type Plant = fn(&Path, &Path);
        let cases: Vec<(&str, Plant)> = vec![
            ("symbolic link", |ckpt, secret| {
                std::os::unix::fs::symlink(secret, ckpt.join("stolen")).unwrap()
            }),
            ("symbolic link in a subdirectory", |ckpt, secret| {
                std::fs::create_dir(ckpt.join("sub")).unwrap();
                std::fs::write(ckpt.join("sub/ok"), "x").unwrap();
                std::os::unix::fs::symlink(secret, ckpt.join("sub/stolen")).unwrap()
            }),
            ("symbolic link to a directory", |ckpt, secret| {
                std::os::unix::fs::symlink(secret.parent().unwrap(), ckpt.join("etc")).unwrap()
            }),
            ("marker as a symbolic link", |ckpt, secret| {
                std::fs::remove_file(ckpt.join(MARKER)).unwrap();
                std::os::unix::fs::symlink(secret, ckpt.join(MARKER)).unwrap()
            }),
            ("hard link", |ckpt, secret| {
                std::fs::hard_link(secret, ckpt.join("stolen")).unwrap()
            }),
            ("FIFO", |ckpt, _| {
                rustix::fs::mkfifoat(
                    rustix::fs::CWD,
                    ckpt.join("fifo"),
                    Mode::from_raw_mode(0o600),
                )
                .unwrap()
            }),
            ("socket", |ckpt, _| {
                drop(std::os::unix::net::UnixListener::bind(ckpt.join("sock")).unwrap())
            }),
            ("reserved name", |ckpt, _| {
                std::fs::write(ckpt.join(MANIFEST), "{}").unwrap()
            }),
        ];
        for (what, plant) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let (ckpt, image, secret) = (
                tmp.path().join("ckpt"),
                tmp.path().join("image"),
                tmp.path().join("private/secret"),
            );
            std::fs::create_dir(&ckpt).unwrap();
            std::fs::create_dir(&image).unwrap();
            std::fs::create_dir(secret.parent().unwrap()).unwrap();
            std::fs::write(&secret, "do not serve me").unwrap();
            std::fs::write(ckpt.join("state"), "5\n").unwrap();
            std::fs::write(ckpt.join(MARKER), "").unwrap();
            plant(&ckpt, &secret);
            let job = JobHandle {
                gid: "gid-evil".into(),
                pid: std::process::id() as i32,
                pidfd: None,
                checkpoint_dir: ckpt.clone(),
                cgroup: None,
            };
            let err = driver().collect_internal(&job, &image).await.unwrap_err();
            assert_eq!(err.code, "app-bad-image", "{what}: {err}");
            assert!(err.message.contains("gid-evil"), "{what}: {err}");
            assert!(names(&image).is_empty(), "{what}: {:?}", names(&image));
            // Dropped: the marker is gone, the job's files stay, the secret is untouched.
            assert!(!marker_exists(&ckpt), "{what}");
            assert!(ckpt.join("state").exists(), "{what}");
            assert_eq!(std::fs::read_to_string(&secret).unwrap(), "do not serve me");
        }
    }

    #[tokio::test]
    async fn a_checkpoint_is_moved_across_filesystems() {
        // /dev/shm is a tmpfs; skip when it is missing or on the same filesystem as TMPDIR.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let image = tempfile::tempdir().unwrap();
        if shm.path().metadata().unwrap().dev() == image.path().metadata().unwrap().dev() {
            return;
        }
        std::fs::create_dir(shm.path().join("d")).unwrap();
        std::fs::write(shm.path().join("d/state"), "9\n").unwrap();
        std::fs::write(shm.path().join(MARKER), "").unwrap();
        let job = JobHandle {
            gid: "gid-xdev".into(),
            pid: std::process::id() as i32,
            pidfd: None,
            checkpoint_dir: shm.path().to_path_buf(),
            cgroup: None,
        };
        assert!(driver().collect_internal(&job, image.path()).await.unwrap());
        assert!(names(shm.path()).is_empty());
        assert_eq!(read_number(&image.path().join("d/state")), 9);
        assert!(image.path().join(MARKER).is_file());
    }

    #[tokio::test]
    async fn restore_puts_the_image_in_place_and_the_job_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let (ckpt, log, image) = (
            tmp.path().join("ckpt"),
            tmp.path().join("log"),
            tmp.path().join("image"),
        );
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::create_dir(&image).unwrap();
        let d = driver();
        let value = {
            let p = counter(&ckpt, &log, &[], &[]);
            let job = handle("gid-rt", &p, &ckpt);
            assert!(until(Duration::from_secs(3), || !log_values(&log).is_empty()).await);
            take(&d, &job, &image, Duration::from_secs(3), false)
                .await
                .unwrap();
            read_number(&image.join("state"))
        };
        std::fs::write(image.join(MANIFEST), "{}").unwrap(); // as the store would add

        // Into a directory with leftovers, and into one that does not exist yet.
        let old = tmp.path().join("old");
        std::fs::create_dir_all(old.join("stale-dir")).unwrap();
        std::fs::write(old.join("stale"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", old.join("stale-link")).unwrap();
        for dir in [old, tmp.path().join("new/ckpt")] {
            let values = Values::new();
            let restored = d
                .restore(RestoreRequest {
                    gid: "gid-rt",
                    image_dir: &image,
                    checkpoint_dir: &dir,
                    values: &values,
                    timeout: Duration::from_secs(3),
                })
                .await
                .unwrap();
            assert_eq!(restored, Restored::StartJob);
            assert_eq!(names(&dir), vec!["state".to_string()]);
            assert_eq!(read_number(&dir.join("state")), value);
        }
        // The store keeps its image.
        assert_eq!(
            names(&image),
            vec![
                MARKER.to_string(),
                MANIFEST.to_string(),
                "state".to_string()
            ]
        );

        let restart_dir = tmp.path().join("new/ckpt");
        let log2 = tmp.path().join("log2");
        let arg = format!("--restart-from={}", restart_dir.display());
        let _p = counter(&restart_dir, &log2, &[], &[&arg]);
        assert!(until(Duration::from_secs(3), || !log_values(&log2).is_empty()).await);
        assert_eq!(log_values(&log2)[0], value + 1);
    }

    #[tokio::test]
    async fn configuration() {
        let cfg: AppConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, AppConfig::default());
        assert_eq!(cfg.signal, "SIGUSR1");
        assert_eq!(cfg.poll_interval_ms, 100);
        let cfg: AppConfig = toml::from_str("signal = \"usr2\"\npoll_interval_ms = 50").unwrap();
        let d = AppLevel::new(cfg).unwrap();
        assert_eq!(d.signal, Signal::USR2);
        assert_eq!(
            d.self_check().await.unwrap(),
            "application-level checkpoints (signal SIGUSR2)"
        );
        assert_eq!(d.kind(), "application");
        assert_eq!(
            AppLevel::new(AppConfig::default())
                .unwrap()
                .self_check()
                .await
                .unwrap(),
            "application-level checkpoints (signal SIGUSR1)"
        );
        assert!(toml::from_str::<AppConfig>("sginal = \"USR1\"").is_err());
        for bad in ["SIGNOPE", "KILL", "SIGSTOP"] {
            let err = AppLevel::new(AppConfig {
                signal: bad.into(),
                ..AppConfig::default()
            })
            .unwrap_err();
            assert_eq!(err.code, "checkpointer-unavailable", "{bad}");
        }
        assert!(AppLevel::new(AppConfig {
            poll_interval_ms: 0,
            ..AppConfig::default()
        })
        .is_err());
        assert_eq!(signal_display_name("10"), "signal 10");
        assert_eq!(secs(Duration::from_millis(400)), "0.4");
        assert_eq!(secs(Duration::from_secs(30)), "30");
    }
}
