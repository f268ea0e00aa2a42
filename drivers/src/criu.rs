//! CRIU (system-level checkpointing of whole process trees), through its command line.
//!
//! - checkpoint: `criu dump -t PID -D IMAGE_DIR -W IMAGE_DIR -o dump.log -v4 [--leave-running]
//!   [--shell-job] [--tcp-established] [--file-locks] EXTRA...`. CRIU's log (`dump.log`) and
//!   statistics (`stats-dump`) stay in the image directory and become part of the image.
//! - restore: `criu restore -D IMAGE_DIR -W WORK -o WORK/restore.log -v4 -d --restore-sibling
//!   --pidfile WORK/restore.pid [...] EXTRA...`, with WORK a fresh directory under the
//!   temporary directory, so the stored image is not touched (CRIU writes `stats-restore`,
//!   its log and the PID file into its work directory). With `--restore-sibling` the restored
//!   root process becomes a child of the process that called [`CoreCheckpointer::restore`]
//!   (verified on CRIU 4.1.1), which can then wait for it and get its exit status.
//!
//! CRIU restores the original PIDs: the restore waits (up to half its timeout) for the image's
//! root PID to be free, and reports `pid-in-use` (temporary) when it stays taken.
//!
//! CRIU >= 4.1 is required: 3.17 (Debian 12) fails on kernels >= 6.13 ("vdso: Unexpected rt
//! vDSO area bounds"). `scripts/install-criu` installs one at [`DEFAULT_PATH`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::OwnedFd;

use gca_protocol::driver_config::CriuConfig;
use gca_protocol::isolation::{self, IsolationNote, IsolationPipes};
use gca_protocol::FaultKind;
use tokio::time::Instant;

use crate::runner::{describe_status, last_lines, read_pid_file, run, RunError, RunOutput};
use crate::{
    live_job, proc, CheckpointOutcome, CheckpointRequest, CoreCheckpointer, DriverError,
    NamespacePipes, RestoreRequest, Restored,
};

/// Where `scripts/install-criu` puts its wrapper, the last place looked at.
pub const DEFAULT_PATH: &str = "/usr/local/sbin/criu";
/// The environment variable naming the CRIU binary when the configuration does not.
pub const ENV_VAR: &str = "GCA_CRIU";
/// The oldest CRIU that works on current kernels.
pub const MIN_VERSION: (u32, u32) = (4, 1);

/// The CRIU [`CoreCheckpointer`].
#[derive(Debug, Clone)]
pub struct Criu {
    cfg: CriuConfig,
    path: PathBuf,
    /// How `path` was found, for messages.
    found_by: &'static str,
}

/// How long `criu --version` and `criu check` may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a job's cgroup may take to freeze before a dump (CRIU's own default is 10 s).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds the CRIU binary as the driver does without a configured path: `$GCA_CRIU`, else
/// `criu` on `PATH`, else [`DEFAULT_PATH`] (returned even when it does not exist).
pub fn find_criu() -> PathBuf {
    locate().0
}

fn locate() -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty()) {
        return (PathBuf::from(p), "from $GCA_CRIU");
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("criu");
            if is_executable(&candidate) {
                return (candidate, "on PATH");
            }
        }
    }
    (PathBuf::from(DEFAULT_PATH), "the default")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The version in `criu --version` output ("Version: 4.1.1"), as numbers.
pub fn parse_version(text: &str) -> Option<Vec<u32>> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let numbers: Vec<u32> = v
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|p| !p.is_empty())
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    (!numbers.is_empty()).then_some(numbers)
}

fn version_string(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
}

/// The meaningful error lines of a CRIU log: the `Error (file:line): ` lines, without the
/// harmless "Can't setup RLIMIT_NOFILE" one, each reduced to its message.
pub fn log_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| {
            let after = l.split_once("Error (").map_or(l, |(_, r)| r);
            let msg = after.split_once("): ").map_or(after, |(_, m)| m);
            msg.trim().to_string()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// Up to the last `n` reasons, leaving out CRIU's closing "Dumping FAILED." / "Restoring
/// FAILED." when there is anything else.
fn reasons(errors: &[String], n: usize) -> Option<String> {
    let specific: Vec<&String> = errors.iter().filter(|e| !e.ends_with("FAILED.")).collect();
    let chosen: Vec<&String> = if specific.is_empty() {
        errors.iter().collect()
    } else {
        specific
    };
    if chosen.is_empty() {
        return None;
    }
    Some(
        chosen[chosen.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

fn is_permission_problem(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("operation not permitted")
        || t.contains("permission denied")
        || t.contains("cap_sys_admin")
        || t.contains("cap_checkpoint_restore")
        || t.contains("unprivileged")
}

/// The PIDs (and thread IDs) of the process tree in a CRIU image, root first, from
/// `pstree.img`: two magic numbers, then entries, each a 32-bit length and a protobuf
/// `PstreeEntry` (field 1 `pid`, field 5 `threads`, both varints). `None` when the file is
/// missing or not in that format.
///
/// A live task's thread list starts with its own PID. A zombie's does not: CRIU 4.1 writes
/// one thread ID for it that it never filled in (any 32-bit value, seen as 2028262352 and
/// above `i32::MAX`), so an entry whose threads do not include its PID counts as the PID
/// alone. Reading that value as a PID would make a restore wait for an unrelated process.
pub fn image_pids(image_dir: &Path) -> Option<Vec<i32>> {
    const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
    const PSTREE_MAGIC: u32 = 0x5027_3030;
    let bytes = std::fs::read(image_dir.join("pstree.img")).ok()?;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    if word(0)? != IMG_COMMON_MAGIC || word(4)? != PSTREE_MAGIC {
        return None;
    }
    let mut pids = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let len = word(at)? as usize;
        let entry = bytes.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        let (raw_pid, threads) = pstree_entry(entry)?;
        let pid = i32::try_from(raw_pid).ok().filter(|p| *p > 0)?;
        let mut push = |p: i32| {
            if !pids.contains(&p) {
                pids.push(p);
            }
        };
        push(pid);
        if threads.contains(&raw_pid) {
            for t in threads {
                push(i32::try_from(t).ok().filter(|t| *t > 0)?);
            }
        }
    }
    (!pids.is_empty()).then_some(pids)
}

/// One `PstreeEntry`: its `pid` (required) and its `threads` (plain or packed).
fn pstree_entry(entry: &[u8]) -> Option<(u64, Vec<u64>)> {
    let mut pid = None;
    let mut threads = Vec::new();
    let mut i = 0;
    while i < entry.len() {
        let tag = varint(entry, &mut i)?;
        match (tag >> 3, tag & 7) {
            (field, 0) => {
                let v = varint(entry, &mut i)?;
                match field {
                    1 => pid = Some(v),
                    5 => threads.push(v),
                    _ => {}
                }
            }
            (field, 2) => {
                let n = usize::try_from(varint(entry, &mut i)?).ok()?;
                let body = entry.get(i..i + n)?;
                i += n;
                if field == 5 {
                    let mut j = 0;
                    while j < body.len() {
                        threads.push(varint(body, &mut j)?);
                    }
                }
            }
            (_, 5) => i += 4,
            (_, 1) => i += 8,
            _ => return None,
        }
    }
    Some((pid?, threads))
}

fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

impl Criu {
    pub fn new(cfg: CriuConfig) -> Result<Self, DriverError> {
        if cfg.log_level > 4 {
            return Err(DriverError::unavailable(format!(
                "criu driver: log_level {} is out of range (0 to 4)",
                cfg.log_level
            )));
        }
        let (path, found_by) = match &cfg.path {
            Some(p) => (p.clone(), "configured as driver.path"),
            None => locate(),
        };
        Ok(Self {
            cfg,
            path,
            found_by,
        })
    }

    /// The CRIU binary this driver runs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &CriuConfig {
        &self.cfg
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.path);
        // CRIU's output is in its log; keep the locale from changing its messages.
        cmd.env("LC_ALL", "C");
        cmd
    }

    fn common_flags(&self, args: &mut Vec<String>) {
        if self.cfg.shell_job {
            args.push("--shell-job".into());
        }
        if self.cfg.tcp_established {
            args.push("--tcp-established".into());
        }
        if self.cfg.file_locks {
            args.push("--file-locks".into());
        }
    }

    /// Runs `criu ARGS` for the self-check.
    async fn run_simple(&self, args: &[&str]) -> Result<(bool, String), DriverError> {
        let mut cmd = self.command();
        cmd.args(args);
        let shown = format!("{} {}", self.path.display(), args.join(" "));
        match run(cmd, CHECK_TIMEOUT, false).await {
            Ok(out) => {
                let text = format!("{}\n{}", out.stdout, out.stderr);
                Ok((out.status.success(), text))
            }
            Err(RunError::Spawn(e)) => Err(DriverError::unavailable(format!(
                "cannot run CRIU at {} ({}): {e}; install it with scripts/install-criu or set \
                 driver.path",
                self.path.display(),
                self.found_by
            ))),
            Err(RunError::Timeout(_)) => Err(DriverError::unavailable(format!(
                "`{shown}` did not finish within {}s",
                CHECK_TIMEOUT.as_secs()
            ))),
        }
    }

    fn not_found(&self) -> DriverError {
        let looked = if self.cfg.path.is_some() {
            String::new()
        } else {
            format!(" (looked at ${ENV_VAR}, PATH and {DEFAULT_PATH})")
        };
        DriverError::unavailable(format!(
            "CRIU not found at {}{looked}; install it with scripts/install-criu or set \
             driver.path",
            self.path.display()
        ))
    }
}

#[async_trait::async_trait]
impl CoreCheckpointer for Criu {
    fn kind(&self) -> &'static str {
        "criu"
    }

    async fn self_check(&self) -> Result<String, DriverError> {
        if !is_executable(&self.path) {
            return Err(self.not_found());
        }
        let (ok, text) = self.run_simple(&["--version"]).await?;
        let Some(version) = parse_version(&text).filter(|_| ok) else {
            return Err(DriverError::unavailable(format!(
                "`{} --version` did not report a CRIU version: {}",
                self.path.display(),
                last_lines(&text, 3).unwrap_or_else(|| "no output".into())
            )));
        };
        let shown = version_string(&version);
        let (major, minor) = (version[0], version.get(1).copied().unwrap_or(0));
        if (major, minor) < MIN_VERSION {
            return Err(DriverError::unavailable(format!(
                "CRIU {shown} at {} ({}) is too old: need {}.{}+ (older versions fail on kernels \
                 >= 6.13, see platform-notes); install it with scripts/install-criu or set \
                 driver.path",
                self.path.display(),
                self.found_by,
                MIN_VERSION.0,
                MIN_VERSION.1
            )));
        }
        let (ok, text) = self.run_simple(&["check"]).await?;
        if !ok {
            let why = last_lines(&text, 4).unwrap_or_else(|| "no output".into());
            let hint = if is_permission_problem(&text) {
                " (CRIU needs root or CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE)"
            } else {
                ""
            };
            return Err(DriverError::unavailable(format!(
                "`criu check` fails for CRIU {shown} at {}{hint}: {why}",
                self.path.display()
            )));
        }
        Ok(format!("CRIU {shown} at {}", self.path.display()))
    }

    async fn checkpoint(
        &self,
        req: CheckpointRequest<'_>,
    ) -> Result<CheckpointOutcome, DriverError> {
        let started = Instant::now();
        let job = req.job;
        let Some(st) = live_job(job) else {
            return Err(DriverError::job_gone(format!(
                "cannot checkpoint job {}: its process {} is gone",
                job.gid, job.pid
            )));
        };
        let dir = req.image_dir.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "dump".into(),
            "-t".into(),
            job.pid.to_string(),
            "-D".into(),
            dir.clone(),
            "-W".into(),
            dir,
            "-o".into(),
            "dump.log".into(),
            format!("-v{}", self.cfg.log_level),
        ];
        if req.leave_running {
            args.push("--leave-running".into());
        }
        // A job in its own namespaces (gca-exec's isolation): CRIU dumps them with it; the
        // host's mounts seen in its mount namespace are external (not dumped, bound again
        // from the host at restore), and the note tells the restore which pipes to replace.
        let note = match isolation_note(job.pid) {
            Ok(n) => n,
            Err(e) => {
                return Err(DriverError::failed(format!(
                    "cannot checkpoint job {} (pid {}): {e}",
                    job.gid, job.pid
                )))
            }
        };
        // The whole tree frozen at once by its cgroup, instead of seized task by task.
        if let Some(cg) = &job.cgroup {
            args.push("--freeze-cgroup".into());
            args.push(cg.to_string_lossy().into_owned());
        }
        if let Some(n) = &note {
            if n.mount_namespace {
                args.push("--external".into());
                args.push("mnt[]".into());
                args.push("--enable-external-masters".into());
            }
        }
        self.common_flags(&mut args);
        args.extend(self.cfg.extra_dump_args.iter().cloned());
        let log = req.image_dir.join("dump.log");
        let mut cmd = self.command();
        cmd.args(&args);
        tracing::info!(job.gid = %job.gid, job.pid = job.pid, image.dir = %req.image_dir.display(),
            leave_running = req.leave_running, "criu dump");
        // Frozen here rather than by CRIU, which would wait 100 ms for it (crate::freezer);
        // thawed once CRIU is done, whatever it did.
        let frozen = match &job.cgroup {
            Some(cg) => crate::freezer::freeze(cg, req.timeout.min(FREEZE_TIMEOUT))
                .await
                .map_err(|e| {
                    DriverError::failed(format!("cannot checkpoint job {}: {e}", job.gid))
                })?,
            None => None,
        };
        let out = match run(cmd, req.timeout, false).await {
            Ok(out) => out,
            Err(RunError::Spawn(e)) => {
                return Err(DriverError::unavailable(format!(
                    "cannot run CRIU at {}: {e}; install it with scripts/install-criu or set \
                     driver.path",
                    self.path.display()
                )))
            }
            Err(RunError::Timeout(_)) => {
                return Err(DriverError::timeout(format!(
                    "CRIU did not finish dumping job {} (pid {}) within {}s and was killed; log: \
                     {}",
                    job.gid,
                    job.pid,
                    req.timeout.as_secs_f32(),
                    log.display()
                )))
            }
        };
        drop(frozen);
        if !out.status.success() {
            let failure = Failure::read(&log, &out);
            let msg = format!(
                "CRIU could not dump job {} (pid {}): {}",
                job.gid, job.pid, failure.summary
            );
            if live_job(job).is_none() {
                return Err(DriverError::job_gone(format!(
                    "{msg} (the job's process is gone)"
                )));
            }
            if is_permission_problem(&failure.said) {
                return Err(DriverError::new(
                    FaultKind::AccessDenied,
                    "criu-permission",
                    msg,
                ));
            }
            return Err(DriverError::failed(msg));
        }
        tracing::debug!(job.gid = %job.gid, elapsed_ms = started.elapsed().as_millis() as u64,
            "criu dump done");
        if let Some(n) = &note {
            let text =
                serde_json::to_vec_pretty(n).map_err(|e| DriverError::failed(e.to_string()))?;
            std::fs::write(req.image_dir.join(isolation::NOTE_FILE), text).map_err(|e| {
                DriverError::failed(format!(
                    "cannot write {} into the image of job {}: {e}",
                    isolation::NOTE_FILE,
                    job.gid
                ))
            })?;
        }
        if req.leave_running {
            return Ok(CheckpointOutcome { stopped: false });
        }
        // CRIU kills the dumped tree when it is not told to leave it running.
        let left = req
            .timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if proc::wait_gone(job.pid, st.start_time, left).await {
            Ok(CheckpointOutcome { stopped: true })
        } else {
            tracing::warn!(job.gid = %job.gid, job.pid = job.pid,
                "criu dump succeeded but the job still runs; the CTS stops it");
            Ok(CheckpointOutcome { stopped: false })
        }
    }

    async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, DriverError> {
        let started = Instant::now();
        if !req.image_dir.join("pstree.img").is_file() {
            return Err(DriverError::failed(format!(
                "cannot restore job {}: {} is not a CRIU image (no pstree.img)",
                req.gid,
                req.image_dir.display()
            )));
        }
        let note = read_note(req.image_dir)?;
        if let Some(note) = note {
            // A fresh PID namespace: no PID of the image can be taken.
            return self.restore_attempt(&req, started, Some(&note)).await;
        }
        // CRIU restores the original PIDs: a killed original, or one of its children, that
        // was not reaped yet still holds its PID (criu#2383). Orphaned children are reaped by
        // init, which may take a while (about a second on the development machine).
        let pids = image_pids(req.image_dir).unwrap_or_default();
        let wait = req.timeout / 2;
        let deadline = Instant::now() + wait;
        for &pid in &pids {
            let left = deadline.saturating_duration_since(Instant::now());
            if proc::stat(pid).is_some() && !proc::wait_pid_free(pid, left).await {
                let who = proc::stat(pid)
                    .map(|s| format!(" by `{}` (state {})", s.comm, s.state))
                    .unwrap_or_default();
                let which = if Some(&pid) == pids.first() {
                    "its PID"
                } else {
                    "the PID of one of its processes,"
                };
                return Err(DriverError::new(
                    FaultKind::ServiceUnavailable,
                    "pid-in-use",
                    format!(
                        "cannot restore job {}: {which} {pid} is still in use{who} after {}s; \
                         CRIU restores the original PIDs, so retry when it is free or restore \
                         on another resource",
                        req.gid,
                        wait.as_secs_f32()
                    ),
                ));
            }
        }
        // The PID can still be taken for a moment after /proc no longer shows it (a task being
        // released); CRIU then fails with "Can't fork for PID: File exists": retry until the
        // wait is over.
        loop {
            match self.restore_attempt(&req, started, None).await {
                Err(e) if e.code == "pid-in-use" && started.elapsed() < wait => {
                    tracing::debug!(job.gid = %req.gid, "a PID of the image is still taken; retrying the restore");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }
}

impl Criu {
    /// One `criu restore`.
    async fn restore_attempt(
        &self,
        req: &RestoreRequest<'_>,
        started: Instant,
        note: Option<&IsolationNote>,
    ) -> Result<Restored, DriverError> {
        let work = make_work_dir(req.gid).map_err(|e| {
            DriverError::failed(format!(
                "cannot create a work directory for restoring job {}: {e}",
                req.gid
            ))
        })?;
        let log = work.join("restore.log");
        let pid_file = work.join("restore.pid");
        let mut args: Vec<String> = vec![
            "restore".into(),
            "-D".into(),
            req.image_dir.to_string_lossy().into_owned(),
            "-W".into(),
            work.to_string_lossy().into_owned(),
            "-o".into(),
            log.to_string_lossy().into_owned(),
            format!("-v{}", self.cfg.log_level),
            "-d".into(),
            "--restore-sibling".into(),
            "--pidfile".into(),
            pid_file.to_string_lossy().into_owned(),
            // The restored job stays in the cgroups of its restorer (the recovery wrapper's,
            // under a resource manager its job's); the CTS gives it its own when it registers.
            // CRIU's default would recreate the cgroups it had on the resource it was dumped
            // on, here, outside anyone's accounting.
            "--manage-cgroups=ignore".into(),
        ];
        // An isolated job: fresh namespaces (CRIU makes them from the image), the host's
        // mounts bound again where they were, and new pipes of ours in place of the old
        // ones. CRIU inherits its ends by number (not close-on-exec); ours are returned.
        let mut pipes = None;
        let mut criu_ends = Vec::new();
        if let Some(note) = note {
            let made = NewPipes::make().map_err(|e| {
                DriverError::failed(format!(
                    "cannot make the pipes to restore job {} with: {e}",
                    req.gid
                ))
            })?;
            if note.mount_namespace {
                args.extend([
                    "--root".into(),
                    "/".into(),
                    "--ext-mount-map".into(),
                    "auto".into(),
                ]);
            }
            let p = note.pipes;
            for (fd, inode) in [
                (&made.job_stdin, p.stdin),
                (&made.job_stdout, p.stdout),
                (&made.job_stderr, p.stderr),
                (&made.job_status, p.status),
            ] {
                use std::os::fd::AsRawFd;
                args.push("--inherit-fd".into());
                args.push(format!("fd[{}]:pipe:[{inode}]", fd.as_raw_fd()));
            }
            let (ours, theirs) = made.split();
            pipes = Some(ours);
            criu_ends = theirs;
        }
        self.common_flags(&mut args);
        args.extend(self.cfg.extra_restore_args.iter().cloned());
        let mut cmd = self.command();
        cmd.args(&args);
        let timeout = req.timeout.saturating_sub(started.elapsed());
        tracing::info!(job.gid = %req.gid, image.dir = %req.image_dir.display(), "criu restore");
        let out = run(cmd, timeout, false).await;
        drop(criu_ends);
        let out = match out {
            Ok(out) => out,
            Err(RunError::Spawn(e)) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(DriverError::unavailable(format!(
                    "cannot run CRIU at {}: {e}; install it with scripts/install-criu or set \
                     driver.path",
                    self.path.display()
                )));
            }
            Err(RunError::Timeout(_)) => {
                return Err(DriverError::timeout(format!(
                    "CRIU did not finish restoring job {} within {}s and was killed; log: {}",
                    req.gid,
                    req.timeout.as_secs_f32(),
                    log.display()
                )))
            }
        };
        if !out.status.success() {
            let failure = Failure::read(&log, &out);
            let msg = format!(
                "CRIU could not restore job {} from {}: {}",
                req.gid,
                req.image_dir.display(),
                failure.summary
            );
            return Err(restore_failure(msg, &failure.said));
        }
        let pid = read_pid_file(&pid_file).map_err(|e| {
            DriverError::failed(format!(
                "CRIU restored job {} but {e}; log: {}",
                req.gid,
                log.display()
            ))
        })?;
        // The log of a good restore is not needed; a failed one keeps it for the message.
        let _ = std::fs::remove_dir_all(&work);
        Ok(match pipes {
            Some(pipes) => Restored::Isolated {
                pid,
                pipes: std::sync::Arc::new(pipes),
            },
            None => Restored::Running { pid },
        })
    }
}

/// The pipes a restore of an isolated job plugs in: the job's ends (for CRIU) and ours.
struct NewPipes {
    job_stdin: OwnedFd,
    job_stdout: OwnedFd,
    job_stderr: OwnedFd,
    job_status: OwnedFd,
    ours: NamespacePipes,
}

impl NewPipes {
    fn make() -> std::io::Result<Self> {
        use rustix::pipe::{pipe_with, PipeFlags};
        let inherit = |fd: &OwnedFd| rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty());
        let (in_r, in_w) = pipe_with(PipeFlags::CLOEXEC)?;
        let (out_r, out_w) = pipe_with(PipeFlags::CLOEXEC)?;
        let (err_r, err_w) = pipe_with(PipeFlags::CLOEXEC)?;
        let (st_r, st_w) = pipe_with(PipeFlags::CLOEXEC)?;
        for fd in [&in_r, &out_w, &err_w, &st_w] {
            inherit(fd)?;
        }
        Ok(Self {
            job_stdin: in_r,
            job_stdout: out_w,
            job_stderr: err_w,
            job_status: st_w,
            ours: NamespacePipes {
                stdin: in_w,
                stdout: out_r,
                stderr: err_r,
                status: st_r,
            },
        })
    }

    fn split(self) -> (NamespacePipes, Vec<OwnedFd>) {
        (
            self.ours,
            vec![
                self.job_stdin,
                self.job_stdout,
                self.job_stderr,
                self.job_status,
            ],
        )
    }
}

/// The namespace identity of `/proc/PID/ns/NAME` (`pid:[4026531836]`).
fn namespace_of(pid: &str, name: &str) -> std::io::Result<std::ffi::OsString> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/{name}"))?.into_os_string())
}

/// The inode of a pipe descriptor of `pid` (`pipe:[INODE]`).
fn pipe_inode(pid: i32, fd: i32) -> Result<u64, String> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| format!("cannot read its descriptor {fd}: {e}"))?;
    let text = link.to_string_lossy();
    text.strip_prefix("pipe:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("its descriptor {fd} is {text}, not the pipe gca-exec gave it"))
}

/// The note for an isolated job (its root process is the init of its own PID namespace,
/// started by gca-exec), or `None` for a job in the CTS's own PID namespace.
pub fn isolation_note(pid: i32) -> Result<Option<IsolationNote>, String> {
    let p = pid.to_string();
    let read = |name: &str| {
        namespace_of(&p, name).map_err(|e| format!("cannot read its {name} namespace: {e}"))
    };
    if read("pid")? == namespace_of("self", "pid").map_err(|e| e.to_string())? {
        return Ok(None);
    }
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let innermost = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last().map(str::to_string));
    if innermost.as_deref() != Some("1") {
        return Err(
            "it is in a PID namespace of its own but not that namespace's init; CRIU dumps a \
             PID namespace only from its init (start jobs with gca-exec)"
                .into(),
        );
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| e.to_string())?;
    let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let status_fd = words
        .iter()
        .position(|w| *w == b"--status-fd")
        .and_then(|at| words.get(at + 1))
        .and_then(|w| std::str::from_utf8(w).ok()?.parse::<i32>().ok())
        .filter(|_| {
            words
                .get(1)
                .is_some_and(|w| *w == isolation::INIT_ARG.as_bytes())
        })
        .ok_or_else(|| {
            "its root process is not gca-exec's namespace init (no --status-fd)".to_string()
        })?;
    let mount_namespace = read("mnt")? != namespace_of("self", "mnt").map_err(|e| e.to_string())?;
    Ok(Some(IsolationNote {
        version: 1,
        pid_namespace: true,
        mount_namespace,
        pipes: IsolationPipes {
            stdin: pipe_inode(pid, 0)?,
            stdout: pipe_inode(pid, 1)?,
            stderr: pipe_inode(pid, 2)?,
            status: pipe_inode(pid, status_fd)?,
            status_fd,
        },
    }))
}

/// The image's isolation note, if it has one.
fn read_note(image_dir: &Path) -> Result<Option<IsolationNote>, DriverError> {
    let path = image_dir.join(isolation::NOTE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DriverError::failed(format!(
                "{} is not a valid isolation note: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DriverError::failed(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// What a failed CRIU run said: a summary for the message (its error lines, or its output,
/// and where the full log is) and everything it said, for classifying the failure.
struct Failure {
    summary: String,
    said: String,
}

impl Failure {
    fn read(log: &Path, out: &RunOutput) -> Self {
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        let errors = log_errors(&log_text);
        let reason = reasons(&errors, 4)
            .or_else(|| last_lines(&out.stderr, 4))
            .or_else(|| last_lines(&out.stdout, 2))
            .unwrap_or_else(|| describe_status(out.status));
        let where_log = if log_text.is_empty() {
            format!("CRIU {}, no log", describe_status(out.status))
        } else {
            format!("full log: {}", log.display())
        };
        Failure {
            summary: format!("{reason}; {where_log}"),
            said: format!("{}\n{}", errors.join("\n"), out.stderr),
        }
    }
}

/// The error for a failed `criu restore`, from what CRIU said.
fn restore_failure(msg: String, said: &str) -> DriverError {
    if said.contains("Can't fork for") && said.contains("File exists") {
        return DriverError::new(
            FaultKind::ServiceUnavailable,
            "pid-in-use",
            format!("{msg} (a PID of the image is in use; CRIU restores the original PIDs)"),
        );
    }
    if is_permission_problem(said) {
        return DriverError::new(FaultKind::AccessDenied, "criu-permission", msg);
    }
    // CRIU reopens the job's files by path: one that is gone on this resource fails the
    // restore ("Can't open file ... on restore: No such file or directory").
    if said.contains("No such file or directory") {
        return DriverError::new(
            FaultKind::OperationFailed,
            "file-missing",
            format!("{msg} (a file the job had open is missing on this resource)"),
        );
    }
    DriverError::failed(msg)
}

/// A fresh, private directory for one restore's log, statistics and PID file.
fn make_work_dir(gid: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let safe: String = gid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let dir = std::env::temp_dir().join(format!(
        "gca-criu-restore-{safe}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use gca_protocol::placeholders::Values;

    const T: Duration = Duration::from_secs(8);

    fn criu() -> Criu {
        Criu::new(CriuConfig {
            path: Some(criu_path()),
            ..CriuConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn parses_versions_logs_and_pstree() {
        assert_eq!(
            parse_version("Version: 4.1.1\nGitID: v4.1.1\n"),
            Some(vec![4, 1, 1])
        );
        assert_eq!(parse_version("Version: 3.17.1\n"), Some(vec![3, 17, 1]));
        assert_eq!(parse_version("Version: 4.2-rc1"), Some(vec![4, 2]));
        assert_eq!(parse_version("criu, who knows"), None);

        let log = "(00.000010) Version: 4.1.1\n\
            (00.035029) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
            (00.040779) Error (criu/sk-inet.c:191): inet: Connected TCP socket, consider using --tcp-established option.\n\
            (00.040791) Error (criu/cr-dump.c:1681): Dump files (pid: 2508) failed with -1\n\
            (00.045877) Error (criu/cr-dump.c:2111): Dumping FAILED.\n";
        let errors = log_errors(log);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(
            errors[0],
            "inet: Connected TCP socket, consider using --tcp-established option."
        );
        let r = reasons(&errors, 4).unwrap();
        assert!(
            r.contains("--tcp-established") && !r.contains("FAILED"),
            "{r}"
        );
        assert!(!is_permission_problem(&errors.join("\n")));
        assert!(is_permission_problem("seize: Operation not permitted"));

        let said = log_errors(
            "(00.032392) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
             (00.032934) Error (criu/cr-restore.c:1230): Can't fork for 12524: File exists\n\
             (00.032952) Error (criu/cr-restore.c:2320): Restoring FAILED.\n",
        )
        .join("\n");
        let e = restore_failure("m".into(), &said);
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::ServiceUnavailable, "pid-in-use")
        );
        let e = restore_failure("m".into(), "Error (x.c:1): Can't open: Permission denied");
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::AccessDenied, "criu-permission")
        );
        let e = restore_failure("m".into(), "Error (x.c:1): mnt: bad mount");
        assert_eq!(e.code, "checkpointer-failed");

        let dir = tempfile::tempdir().unwrap();
        // pstree.img of a bash loop (32625) with a `sleep` child (609), as CRIU 4.1.1 wrote it.
        let img = [
            "194356543030275012000000",
            "08f1fe01100018f1fe0120f1fe0128f1fe01",
            "12000000",
            "08e10410f1fe0118f1fe0120f1fe0128e104",
        ]
        .concat();
        std::fs::write(dir.path().join("pstree.img"), hex::decode(&img).unwrap()).unwrap();
        assert_eq!(image_pids(dir.path()), Some(vec![32625, 609]));
        // A `sleep 1000` (13354) with a zombie child (13356), as CRIU 4.1.1 wrote it: the
        // zombie's one thread ID is a value CRIU never filled in, here 2028262352; with
        // another above i32::MAX.
        let zombie = |thread: &str| {
            let img = [
                "19435654303027500e000000",
                "08aa681000",
                "18aa6820aa6828aa68",
                "12000000",
                "08ac6810aa6818aa6820aa6828",
                thread,
            ]
            .concat();
            std::fs::write(dir.path().join("pstree.img"), hex::decode(&img).unwrap()).unwrap();
            image_pids(dir.path())
        };
        assert_eq!(zombie("d0a793c707"), Some(vec![13354, 13356]));
        assert_eq!(zombie("d0a793c70f"), Some(vec![13354, 13356]));
        std::fs::write(dir.path().join("pstree.img"), b"junk").unwrap();
        assert_eq!(image_pids(dir.path()), None);
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: CriuConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, CriuConfig::default());
        assert!(cfg.file_locks && cfg.log_level == 4 && !cfg.shell_job);
        let cfg: CriuConfig =
            toml::from_str("path = \"/x/criu\"\nextra_dump_args = [\"--ext-unix-sk\"]").unwrap();
        assert_eq!(cfg.path.as_deref(), Some(Path::new("/x/criu")));
        let e = toml::from_str::<CriuConfig>("leave_runing = true").unwrap_err();
        assert!(e.to_string().contains("leave_runing"), "{e}");
        let e = Criu::new(CriuConfig {
            log_level: 9,
            ..CriuConfig::default()
        })
        .unwrap_err();
        assert!(e.message.contains("log_level"), "{e}");
    }

    #[tokio::test]
    async fn self_check_reports_version_or_why_not() {
        let c = criu();
        let said = c.self_check().await.unwrap();
        assert!(
            said.starts_with("CRIU 4.") && said.contains(" at /"),
            "{said}"
        );
        // find_criu() is what the default configuration uses.
        assert_eq!(
            Criu::new(CriuConfig::default()).unwrap().path(),
            criu_path()
        );

        let missing = Criu::new(CriuConfig {
            path: Some("/nonexistent/criu".into()),
            ..CriuConfig::default()
        })
        .unwrap();
        let e = missing.self_check().await.unwrap_err();
        assert_eq!(e.code, "checkpointer-unavailable");
        assert!(
            e.message.contains("CRIU not found at /nonexistent/criu")
                && e.message.contains("scripts/install-criu"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("criu");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version: 3.17.1' && exit 0\nexit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let old = Criu::new(CriuConfig {
            path: Some(fake.clone()),
            ..CriuConfig::default()
        })
        .unwrap();
        let e = old.self_check().await.unwrap_err();
        assert!(
            e.message.contains("CRIU 3.17.1") && e.message.contains("too old: need 4.1+"),
            "{e}"
        );

        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version: 4.1' && exit 0\n\
             echo 'vdso: Unexpected rt vDSO area bounds' >&2; exit 1\n",
        )
        .unwrap();
        let e = old.self_check().await.unwrap_err();
        assert!(
            e.message.contains("`criu check` fails for CRIU 4.1")
                && e.message.contains("Unexpected rt vDSO"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn dump_leave_running_then_dump_and_stop_then_restore() {
        let c = criu();
        let mut job = TestJob::start().await;
        let handle = job.handle("job-criu-1");
        let values = Values::new();

        // 1. A checkpoint that leaves the job running.
        let img1 = job.new_dir("img1");
        let out = c
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img1",
                image_dir: &img1,
                leave_running: true,
                values: &values,
                timeout: T,
            })
            .await
            .unwrap();
        assert_eq!(out, CheckpointOutcome { stopped: false });
        for f in ["pstree.img", "inventory.img", "dump.log", "stats-dump"] {
            assert!(img1.join(f).is_file(), "{f} in {:?}", list(&img1));
        }
        assert!(img1.join(format!("core-{}.img", job.pid)).is_file());
        assert_eq!(image_pids(&img1).unwrap()[0], job.pid);
        let n = job.last();
        job.wait_count(n + 3).await; // it still counts

        // Its PID is taken (the job runs): the restore says so instead of failing obscurely.
        let e = c
            .restore(RestoreRequest {
                gid: "job-criu-1",
                image_dir: &img1,
                checkpoint_dir: &handle.checkpoint_dir,
                values: &values,
                timeout: Duration::from_millis(600),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::ServiceUnavailable, "pid-in-use")
        );
        assert!(
            e.message
                .contains(&format!("PID {} is still in use", job.pid)),
            "{e}"
        );

        // 2. A checkpoint that stops the job.
        let img2 = job.new_dir("img2");
        let out = c
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img2",
                image_dir: &img2,
                leave_running: false,
                values: &values,
                timeout: T,
            })
            .await
            .unwrap();
        assert_eq!(out, CheckpointOutcome { stopped: true });
        assert!(live_job(&handle).is_none());
        let before = job.values();
        let last = *before.last().unwrap();
        job.reap();
        let stored = list(&img2);

        // 3. Restore: same PID, a child of ours, counting on from `last`.
        let restored = c
            .restore(RestoreRequest {
                gid: "job-criu-1",
                image_dir: &img2,
                checkpoint_dir: &handle.checkpoint_dir,
                values: &values,
                timeout: T,
            })
            .await
            .unwrap();
        assert_eq!(restored, Restored::Running { pid: job.pid });
        job.adopt_restored(job.pid);
        job.wait_count(last + 3).await;
        assert_continued(&job.values(), before.len(), last);
        assert_eq!(
            list(&img2),
            stored,
            "the restore leaves the image as it was"
        );

        let status = job.kill_and_reap().expect("reaped the restored job");
        assert_eq!(proc::decode_wait_status(status), (None, Some(9)));
    }

    #[tokio::test]
    async fn a_hanging_criu_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("criu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = Criu::new(CriuConfig {
            path: Some(fake),
            ..CriuConfig::default()
        })
        .unwrap();
        // This test process stands in for the job: the fake CRIU does not touch it.
        let handle = crate::JobHandle {
            gid: "job-slow".into(),
            pid: std::process::id() as i32,
            pidfd: None,
            checkpoint_dir: dir.path().to_path_buf(),
            cgroup: None,
        };
        let started = Instant::now();
        let e = c
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "x",
                image_dir: dir.path(),
                leave_running: true,
                values: &Values::new(),
                timeout: Duration::from_millis(300),
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::OperationFailed, "checkpointer-timeout")
        );
        assert!(
            e.message
                .contains("CRIU did not finish dumping job job-slow")
                && e.message.contains("was killed"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn missing_process_is_job_gone() {
        let c = criu();
        let dir = tempfile::tempdir().unwrap();
        let handle = JobHandleForTest::gone(dir.path());
        let e = c
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "x",
                image_dir: dir.path(),
                leave_running: true,
                values: &Values::new(),
                timeout: T,
            })
            .await
            .unwrap_err();
        assert_eq!((e.kind, e.code), (FaultKind::ResourceUnknown, "job-gone"));
        assert!(e.message.contains("is gone"), "{e}");
    }

    /// A job handle for a PID that cannot exist.
    struct JobHandleForTest;
    impl JobHandleForTest {
        fn gone(dir: &Path) -> crate::JobHandle {
            crate::JobHandle {
                gid: "job-gone".into(),
                pid: i32::MAX - 7,
                pidfd: None,
                checkpoint_dir: dir.to_path_buf(),
                cgroup: None,
            }
        }
    }

    #[tokio::test]
    async fn failures_carry_criu_reasons() {
        // An established TCP connection without --tcp-established: CRIU refuses, and says why.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let job = TestJob::start_with(r#"exec 4<>"/dev/tcp/127.0.0.1/$1";"#, &[&port]).await;
        let (_conn, _) = tokio::time::timeout(T, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let handle = job.handle("job-tcp");
        let img = job.new_dir("img");
        let e = criu()
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img",
                image_dir: &img,
                leave_running: true,
                values: &Values::new(),
                timeout: T,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::OperationFailed, "checkpointer-failed")
        );
        assert!(
            e.message.starts_with(&format!(
                "CRIU could not dump job job-tcp (pid {}): ",
                job.pid
            )) && e
                .message
                .contains("Connected TCP socket, consider using --tcp-established")
                && e.message
                    .contains(&format!("full log: {}", img.join("dump.log").display()))
                && !e.message.contains("RLIMIT_NOFILE"),
            "{e}"
        );
        let n = job.last();
        job.wait_count(n + 2).await; // CRIU let it go on

        // A bad extra argument: CRIU stops before writing a log; its stderr is the reason.
        let bogus = Criu::new(CriuConfig {
            path: Some(criu_path()),
            extra_dump_args: vec!["--no-such-option".into()],
            ..CriuConfig::default()
        })
        .unwrap();
        let img = job.new_dir("img-bogus");
        let e = bogus
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img",
                image_dir: &img,
                leave_running: true,
                values: &Values::new(),
                timeout: T,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, "checkpointer-failed");
        assert!(
            e.message.contains("unrecognized option '--no-such-option'")
                && e.message.contains("exit status 1"),
            "{e}"
        );

        // Not an image at all.
        let e = criu()
            .restore(RestoreRequest {
                gid: "job-tcp",
                image_dir: &img,
                checkpoint_dir: &handle.checkpoint_dir,
                values: &Values::new(),
                timeout: T,
            })
            .await
            .unwrap_err();
        assert!(e.message.contains("is not a CRIU image"), "{e}");
    }

    fn list(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}
