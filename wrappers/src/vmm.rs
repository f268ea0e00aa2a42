//! The wrappers of a VMM CTS type (GCA paper, section 4 and figure 3).
//!
//! - `gca-vmm-exec` ([`run_exec`], the paper's *vmm-ready-job-executor*): registers itself at
//!   its CTS (its PID is the job's; QEMU is its child), makes the job's disk from the input
//!   directory and the job's command line, boots the type's VM (`gca_drivers::vmm::launch`,
//!   only what the type's `[driver]` says) and supervises it ([`supervise`]).
//! - `gca-recover` on a VMM type is the *vmm-ready-job-resumer*: the common recovery flow
//!   (`crate::recover`), whose restore starts QEMU from the image; then [`supervise`].
//!
//! Supervising: the Virtual Node Gate in the guest reports over the virtio-serial port
//! (`gca_protocol::gate`); SIGTERM, SIGINT and SIGHUP to the wrapper become `TERM` to the
//! job's process group in the guest; the job's directory comes back as a tar archive, which is
//! unpacked into `--output DIR`; the job's status is reported to the CTS, and the wrapper exits
//! with it. A VM that ends without the gate's status (stopped for migration by a checkpoint
//! with `stop`, or killed) ends the wrapper with 75 (temporary: recover it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use gca_drivers::vmm::launch::{self, Boot};
use gca_protocol::driver_config::{DriverConfig, VmmConfig};
use gca_protocol::gate::{FromGuest, ToGuest, MAX_LINE};
use gca_protocol::local::{LocalExit, RegisterLocalJob};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::VmmExecArgs;
use crate::cts_target::{self, Cts};
use crate::exit::{self, Class, Failure};
use crate::signals::{self, Ended};
use crate::warn;

/// How a supervised VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The gate reported the job's status.
    Job(i32),
    /// The VM ended without it (`how` QEMU ended).
    Gone(String),
    /// The gate could not start the job.
    GateFailed(String),
}

/// The VMM configuration of the CTS, or a usage failure when it is of another kind.
pub fn vmm_config(cts: &Cts) -> Result<VmmConfig, Failure> {
    match &cts.info.driver_config {
        Some(DriverConfig::Vmm(c)) => Ok(c.clone()),
        _ => Err(Failure::new(
            Class::Usage,
            format!(
                "CTS {:?} (type {:?}, driver {}) does not run jobs in virtual machines; use gca-exec",
                cts.info.name, cts.info.cts_type, cts.info.driver
            ),
        )),
    }
}

/// gca-vmm-exec to the end: the exit code.
pub async fn run_exec(args: VmmExecArgs) -> i32 {
    match exec(&args).await {
        Ok(code) => code,
        Err(f) => {
            warn("gca-vmm-exec", &f.message);
            f.code()
        }
    }
}

async fn exec(args: &VmmExecArgs) -> Result<i32, Failure> {
    let retention = args
        .retention
        .retention()
        .map_err(|e| Failure::new(Class::Usage, e))?;
    let job: Vec<String> = args
        .job
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| Failure::new(Class::Usage, "the job's command line must be UTF-8"))
        })
        .collect::<Result<_, _>>()?;
    // Caught from the start; a TERM before the job runs reaches it once it does.
    let mut signals = Signals::install()?;
    let cts = cts_target::connect(&args.cts).await?;
    let cfg = vmm_config(&cts)?;
    let registered = cts
        .client
        .register(&RegisterLocalJob {
            gid: args.gid.clone(),
            pid: std::process::id() as i32,
            periodic_interval_secs: args.periodic,
            recovery: None,
            retention,
            limits: None,
        })
        .await
        .map_err(|f| {
            Failure::fault(
                format!(
                    "cannot register job {:?} at CTS {:?}",
                    args.gid, cts.info.name
                ),
                &f,
            )
        })?;
    let run_dir = registered.checkpoint_dir.clone();
    let (uid, gid) = (
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let started = {
        let (cfg, run_dir, input) = (cfg.clone(), run_dir.clone(), args.input.clone());
        tokio::task::spawn_blocking(move || {
            launch::make_job_disk(&cfg, &run_dir, input.as_deref(), &job)?;
            launch::spawn(&cfg, &run_dir, Boot::Fresh { uid, gid })
                .map_err(|e| format!("cannot start {}: {e}", cfg.qemu.display()))
        })
        .await
        .map_err(|e| Failure::new(Class::Internal, format!("start task failed: {e}")))?
    };
    let child = match started {
        Ok(c) => c,
        Err(m) => {
            let _ = cts.client.abandon(&args.gid).await;
            let _ = cts
                .client
                .exited(
                    &args.gid,
                    &LocalExit {
                        exit_status: Some(exit::ENVIRONMENT),
                        signal: None,
                    },
                )
                .await;
            return Err(Failure::new(
                Class::Environment,
                format!(
                    "job {:?}: the virtual machine could not be started: {m}",
                    args.gid
                ),
            ));
        }
    };
    let qemu = child.id() as i32;
    // QEMU is waited for by PID (waitid), like a restored job.
    std::mem::forget(child);
    let end = supervise(&cfg, &run_dir, qemu, args.output.as_deref(), &mut signals).await;
    finish(&cts, &args.gid, qemu, end, "gca-vmm-exec").await
}

/// Reports how the job ended to the CTS, reaps QEMU (`qemu`, ended) and returns the exit code
/// to end with.
pub async fn finish(
    cts: &Cts,
    gid: &str,
    qemu: i32,
    end: Result<VmEnd, Failure>,
    who: &str,
) -> Result<i32, Failure> {
    let end = match end {
        Ok(e) => e,
        Err(f) => {
            signals::reap(qemu);
            return Err(f);
        }
    };
    let (code, report) = match &end {
        VmEnd::Job(code) => (*code, true),
        VmEnd::GateFailed(why) => {
            warn(
                who,
                &format!("job {gid:?} could not be started in its virtual machine: {why}"),
            );
            (exit::ENVIRONMENT, true)
        }
        VmEnd::Gone(how) => {
            warn(
                who,
                &format!(
                    "the virtual machine of job {gid:?} ended ({how}) without the job's status: stopped for migration or killed; recover it from its checkpoint"
                ),
            );
            (exit::TEMPORARY, false)
        }
    };
    if report {
        if let Err(f) = cts
            .client
            .exited(
                gid,
                &LocalExit {
                    exit_status: Some(code),
                    signal: None,
                },
            )
            .await
        {
            if f.code.as_deref() != Some("unknown-gid") {
                warn(
                    who,
                    &format!("could not report how job {gid:?} ended: {}", f.message),
                );
            }
        }
    }
    signals::reap(qemu);
    Ok(code)
}

/// TERM, INT and HUP, caught from creation on.
pub struct Signals {
    streams: Vec<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Result<Self, Failure> {
        let mut streams = Vec::new();
        for k in [
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ] {
            streams.push(signal(k).map_err(|e| {
                Failure::new(
                    Class::Internal,
                    format!("cannot install signal handlers: {e}"),
                )
            })?);
        }
        Ok(Self { streams })
    }

    async fn next(&mut self) {
        let [a, b, c] = &mut self.streams[..] else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = a.recv() => {}
            _ = b.recv() => {}
            _ = c.recv() => {}
        }
    }
}

/// Supervises the job's VM (QEMU is `qemu`, our child, in `run_dir`) until it has ended (not
/// reaped: [`finish`] reports the job's end first, while the CTS still sees QEMU's PID).
pub async fn supervise(
    cfg: &VmmConfig,
    run_dir: &Path,
    qemu: i32,
    output: Option<&Path>,
    signals: &mut Signals,
) -> Result<VmEnd, Failure> {
    let mut exited = tokio::task::spawn_blocking(move || signals::wait_ended(qemu));
    let boot = Duration::from_secs(cfg.boot_timeout_secs.max(1));
    let gate = tokio::select! {
        g = connect_gate(run_dir, boot) => g,
        e = &mut exited => {
            let how = describe(e);
            return Ok(VmEnd::Gone(format!("{how} before its gate answered; {}", launch::logs_tail(run_dir))));
        }
    };
    let gate = match gate {
        Ok(g) => g,
        Err(m) => {
            kill(qemu);
            let _ = exited.await;
            return Err(Failure::new(Class::Environment, m));
        }
    };
    let (read, mut write) = gate.into_split();
    let mut read = BufReader::new(read);
    let mut term_pending = false;
    let mut files: Option<PathBuf> = None;
    let end = loop {
        let mut line = String::new();
        tokio::select! {
            r = next_line(&mut read, &mut line) => {
                match r {
                    Ok(0) | Err(_) => {
                        // The connection ended: QEMU is going away.
                        let how = describe((&mut exited).await);
                        break VmEnd::Gone(how);
                    }
                    Ok(_) => {}
                }
                match FromGuest::parse(&line) {
                    Ok(FromGuest::Ready) => {
                        if term_pending {
                            let _ = write.write_all(ToGuest::Term.line().as_bytes()).await;
                        }
                    }
                    Ok(FromGuest::Files(n)) => {
                        let path = run_dir.join("files.tar");
                        if let Err(e) = receive(&mut read, n, &path).await {
                            warn("gca-vmm", &format!("the job's files did not come back: {e}"));
                        } else {
                            files = Some(path);
                        }
                    }
                    Ok(FromGuest::Exit(code)) => {
                        let _ = write.write_all(ToGuest::Bye.line().as_bytes()).await;
                        break VmEnd::Job(code);
                    }
                    Ok(FromGuest::Fail(why)) => break VmEnd::GateFailed(why),
                    Err(e) => warn("gca-vmm", &format!("ignored from the guest: {e}")),
                }
            }
            _ = signals.next() => {
                term_pending = true;
                let _ = write.write_all(ToGuest::Term.line().as_bytes()).await;
            }
            e = &mut exited => {
                break VmEnd::Gone(describe(e));
            }
        }
    };
    if let (Some(tar), Some(out)) = (&files, output) {
        if let Err(e) = unpack(tar, out).await {
            warn(
                "gca-vmm",
                &format!("cannot unpack the job's files into {}: {e}", out.display()),
            );
        }
    }
    if let Some(tar) = &files {
        let _ = std::fs::remove_file(tar);
    }
    // The guest powers off after BYE; a VM that does not is ended. QEMU stays a zombie
    // until [`finish`] has reported the job's end (the CTS watches its PID).
    if !exited.is_finished()
        && tokio::time::timeout(Duration::from_secs(30), &mut exited)
            .await
            .is_err()
    {
        kill(qemu);
        let _ = exited.await;
    }
    Ok(end)
}

fn describe(e: Result<std::io::Result<Ended>, tokio::task::JoinError>) -> String {
    match e {
        Ok(Ok(Ended::Exited(c))) => format!("QEMU exited with status {c}"),
        Ok(Ok(Ended::Signaled(s))) => format!("QEMU was killed by signal {s}"),
        Ok(Err(e)) => format!("cannot wait for QEMU: {e}"),
        Err(e) => format!("waiting task failed: {e}"),
    }
}

fn kill(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
}

async fn connect_gate(run_dir: &Path, bound: Duration) -> Result<UnixStream, String> {
    // Relative to a descriptor of the run directory: its path may be longer than a socket
    // address allows.
    let dir = std::fs::File::open(run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}/{}", dir.as_raw_fd(), launch::GATE_SOCKET);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match UnixStream::connect(&path).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the virtual machine's gate socket did not open: {e}; {}",
                    launch::logs_tail(run_dir)
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One line from the gate, at most [`MAX_LINE`] bytes.
async fn next_line(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut String,
) -> std::io::Result<usize> {
    (&mut *read).take(MAX_LINE as u64).read_line(line).await
}

async fn receive(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    n: u64,
    path: &Path,
) -> std::io::Result<()> {
    let mut f = tokio::fs::File::create(path).await?;
    let copied = tokio::io::copy(&mut read.take(n), &mut f).await?;
    if copied != n {
        return Err(std::io::Error::other(format!("{copied} of {n} bytes")));
    }
    f.sync_all().await
}

async fn unpack(tar: &Path, out: &Path) -> Result<(), String> {
    if std::fs::metadata(tar).map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(());
    }
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let st = tokio::process::Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(out)
        .arg("--no-same-owner")
        // The gate's own files and the file system's.
        .args(["--exclude=./.gca", "--exclude=./lost+found"])
        .status()
        .await
        .map_err(|e| format!("cannot run tar: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("tar ended with {st}"))
    }
}
