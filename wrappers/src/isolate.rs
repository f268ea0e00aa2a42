//! A job in its own PID and mount namespaces (issue 13; the wire side is
//! `gca_protocol::isolation`).
//!
//! ```text
//! resource manager ─▶ gca-exec (host PID W, stays resident: relays stdio, forwards signals)
//!                        └─ namespace init (host PID I = the PID registered at the CTS, PID 1
//!                           inside; gca-exec's own code: reaps, forwards signals, reports)
//!                              └─ the job (PID 2 inside)
//! ```
//!
//! The CTS dumps the tree from I: CRIU dumps the PID and mount namespaces with it, and
//! `gca-recover` restores them into fresh ones, so the job's PIDs never collide with the
//! target's. The init is needed because the init of a PID namespace receives only the
//! signals it handles: a job as PID 1 would ignore a forwarded SIGTERM.
//!
//! Ending: when the job ends, the init writes how ([`JobEnded`]) on its status pipe; the
//! wrapper reports it to the CTS (so the GCS records the job's status, not the init's),
//! SIGKILLs the init (which ends everything left in the namespace), reaps it and ends like
//! the job. The init dies with its wrapper (`PR_SET_PDEATHSIG`), so a resource manager's
//! SIGKILL of the wrapper ends the namespace too.

use std::ffi::OsString;
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

use gca_protocol::isolation::{InitStart, JobEnded, INIT_ARG};
use gca_protocol::local::LocalExit;
use rustix::process::{Pid, Signal};

use crate::cts_target::Cts;
use crate::exit::{Class, Failure};
use crate::signals::{self, Ended, Forwarder};
use crate::warn;

/// The wrapper's side of a running namespace: the init's host PID and the pipes to it.
#[derive(Debug)]
pub struct Namespace {
    /// The init's PID on the host (a child of this process).
    pub init_pid: i32,
    /// The job's standard input (we write).
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The init's status pipe (we read one [`JobEnded`] line).
    pub status: OwnedFd,
}

/// A namespace started but whose job waits for [`Starting::start`].
#[derive(Debug)]
pub struct Starting {
    pub ns: Namespace,
    start: OwnedFd,
}

/// Can this process create the namespaces (root, or `CAP_SYS_ADMIN`)?
pub fn can_isolate() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 21) != 0) // CAP_SYS_ADMIN
}

/// Starts the init of a new PID namespace running `job` (which waits until
/// [`Starting::start`]). Call with no other thread forking meanwhile: descriptors meant for
/// the init are inherited by number.
pub fn spawn(job: &[OsString]) -> std::io::Result<Starting> {
    let exe = std::env::current_exe()?;
    // New PID namespace for our next child; this process stays where it is. Until our
    // children's namespace is ours again, no thread can be created (EINVAL): back right after.
    let own = std::fs::File::open("/proc/self/ns/pid")?;
    raw::unshare_pid_namespace()?;
    let spawned = spawn_init(&exe, job);
    let back = rustix::thread::move_into_link_name_space(
        own.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::ProcessID),
    );
    let starting = spawned?;
    if let Err(e) = back {
        starting.cancel();
        return Err(e.into());
    }
    Ok(starting)
}

fn spawn_init(exe: &std::path::Path, job: &[OsString]) -> std::io::Result<Starting> {
    let cloexec = rustix::pipe::PipeFlags::CLOEXEC;
    let (in_r, in_w) = rustix::pipe::pipe_with(cloexec)?;
    let (out_r, out_w) = rustix::pipe::pipe_with(cloexec)?;
    let (err_r, err_w) = rustix::pipe::pipe_with(cloexec)?;
    // These two are inherited by number: no CLOEXEC on the init's ends.
    let (status_r, status_w) = rustix::pipe::pipe_with(cloexec)?;
    rustix::io::fcntl_setfd(&status_w, rustix::io::FdFlags::empty())?;
    let (start_r, start_w) = rustix::pipe::pipe_with(cloexec)?;
    rustix::io::fcntl_setfd(&start_r, rustix::io::FdFlags::empty())?;
    let mut cmd = Command::new(exe);
    cmd.arg(INIT_ARG)
        .arg("--start-fd")
        .arg(start_r.as_raw_fd().to_string())
        .arg("--status-fd")
        .arg(status_w.as_raw_fd().to_string())
        .arg("--")
        .args(job)
        .stdin(Stdio::from(in_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    let child = cmd.spawn();
    drop(start_r);
    drop(status_w);
    let child = child?;
    Ok(Starting {
        ns: Namespace {
            init_pid: child.id() as i32,
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
            status: status_r,
        },
        start: start_w,
    })
}

impl Starting {
    /// Lets the job start, with `env`.
    pub fn start(self, env: Vec<(String, String)>) -> std::io::Result<Namespace> {
        let mut f = std::fs::File::from(self.start);
        let line = serde_json::to_string(&InitStart { env }).map_err(std::io::Error::other)?;
        f.write_all(line.as_bytes())?;
        drop(f);
        Ok(self.ns)
    }

    /// The job is not to run: ends the init.
    pub fn cancel(self) {
        kill_and_reap(self.ns.init_pid);
    }
}

fn kill_and_reap(pid: i32) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
    }
    signals::reap(pid);
}

/// Copies `from` to `to` until EOF (or an error).
fn relay(from: OwnedFd, mut to: impl Write + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(from);
        let mut buf = [0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let _ = to.flush();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// Runs a namespace to its end: relays the job's standard streams, forwards signals to the
/// init, reports the job's status to the CTS, ends the namespace and this process like the
/// job. Returns only on an internal failure.
pub async fn supervise(
    wrapper: &'static str,
    cts: Option<&Cts>,
    gid: &str,
    forwarder: Forwarder,
    ns: Namespace,
) -> Failure {
    let Namespace {
        init_pid,
        stdin,
        stdout,
        stderr,
        status,
    } = ns;
    // Our standard input, to the job's; dropped at EOF so the job sees it.
    std::thread::spawn(move || {
        let mut to = std::fs::File::from(stdin);
        let mut from = std::io::stdin().lock();
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    let out = relay(stdout, std::io::stdout());
    let err = relay(stderr, std::io::stderr());
    let forwarding = forwarder.start(init_pid);
    let reported = match tokio::task::spawn_blocking(move || read_status(status)).await {
        Ok(r) => r,
        Err(e) => {
            forwarding.stop();
            return Failure::new(Class::Internal, format!("waiting task failed: {e}"));
        }
    };
    forwarding.stop();
    let ended = match reported {
        Some(job) => {
            if let Some(cts) = cts {
                let exit = LocalExit {
                    exit_status: job.exit_status,
                    signal: job.signal,
                };
                if let Err(f) = cts.client.exited(gid, &exit).await {
                    if f.code.as_deref() != Some("unknown-gid") {
                        warn(
                            wrapper,
                            &format!("could not report how job {gid:?} ended: {}", f.message),
                        );
                    }
                }
            }
            kill_and_reap(init_pid);
            match (job.exit_status, job.signal) {
                (Some(code), _) => Ended::Exited(code),
                (None, Some(sig)) => Ended::Signaled(sig),
                (None, None) => Ended::Exited(crate::exit::INTERNAL),
            }
        }
        // The init ended without a word: killed (a checkpoint that stopped the job, or
        // SIGKILL from outside); end like it.
        None => {
            let e = match tokio::task::spawn_blocking(move || signals::wait_ended(init_pid)).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    return Failure::new(
                        Class::Internal,
                        format!(
                            "cannot wait for the namespace of job {gid:?} (PID {init_pid}): {e}"
                        ),
                    )
                }
                Err(e) => {
                    return Failure::new(Class::Internal, format!("waiting task failed: {e}"))
                }
            };
            signals::reap(init_pid);
            e
        }
    };
    // Everything in the namespace is gone: the relays see EOF.
    let _ = tokio::task::spawn_blocking(move || {
        let _ = out.join();
        let _ = err.join();
    })
    .await;
    signals::end_like(ended)
}

/// The init's status line, or `None` at EOF (the init died without one).
fn read_status(fd: OwnedFd) -> Option<JobEnded> {
    let mut r = std::io::BufReader::new(std::fs::File::from(fd));
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {
                if let Some(e) = JobEnded::parse(&line) {
                    return Some(e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The namespace's init: `gca-exec --gca-ns-init --start-fd N --status-fd M -- JOB...`, as
/// PID 1 of a fresh PID namespace. Never returns.
pub fn init_main(args: Vec<OsString>) -> ! {
    let code = match init(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("gca-exec (namespace init): {e}");
            crate::exit::INTERNAL
        }
    };
    std::process::exit(code)
}

/// Marks the init's second start, in its mount namespace.
const IN_NAMESPACE: &str = "--in-namespace";

fn fd_arg(args: &[OsString], name: &str) -> Result<RawFd, String> {
    let at = args
        .iter()
        .position(|a| a == name)
        .ok_or_else(|| format!("{name} missing"))?;
    args.get(at + 1)
        .and_then(|v| v.to_str())
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{name} needs a descriptor number above 2"))
}

fn init(args: Vec<OsString>) -> Result<(), String> {
    let start_fd = fd_arg(&args, "--start-fd")?;
    let status_fd = fd_arg(&args, "--status-fd")?;
    let job: Vec<OsString> = match args.iter().position(|a| a == "--") {
        Some(at) => args[at + 1..].to_vec(),
        None => Vec::new(),
    };
    if job.is_empty() {
        return Err("no job given after --".into());
    }
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        return Err("not the init of a PID namespace".into());
    }
    if !args.iter().any(|a| a == IN_NAMESPACE) {
        // Nothing from outside but our own descriptors: a descriptor on a mount of the
        // host's namespace (a resource manager's file) is one CRIU cannot dump from ours.
        raw::close_inherited(&[start_fd, status_fd]);
        // Our own mount namespace, a slave copy of the host's (nothing we mount goes back),
        // with a /proc of our PID namespace.
        raw::unshare_mount_namespace()
            .map_err(|e| format!("cannot create a mount namespace: {e}"))?;
        use rustix::mount::{MountFlags, MountPropagationFlags};
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::DOWNSTREAM | MountPropagationFlags::REC,
        )
        .map_err(|e| format!("cannot make / a slave mount: {e}"))?;
        rustix::mount::mount(
            "proc",
            "/proc",
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        )
        .map_err(|e| format!("cannot mount /proc: {e}"))?;
        // Our program's mappings are still those of the host's mounts, which CRIU cannot
        // find in ours: execute it again, by its path, from our mounts.
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find our program: {e}"))?;
        let sep = args.iter().position(|a| a == "--").unwrap_or(args.len());
        let e = Command::new(&exe)
            .args(&args[1..sep])
            .arg(IN_NAMESPACE)
            .args(&args[sep..])
            .exec();
        return Err(format!("cannot execute {} again: {e}", exe.display()));
    }
    let start = raw::adopt(start_fd);
    let status = raw::adopt(status_fd);
    rustix::io::fcntl_setfd(&start, rustix::io::FdFlags::CLOEXEC)
        .and_then(|()| rustix::io::fcntl_setfd(&status, rustix::io::FdFlags::CLOEXEC))
        .map_err(|e| format!("cannot set up the init's descriptors: {e}"))?;
    // End with the wrapper, whatever kills it.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    // The leader of the namespace's one session (CRIU needs the session leader inside).
    let _ = rustix::process::setsid();
    // As gca-exec does for a job it executes in place.
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;

    let mut text = String::new();
    std::fs::File::from(start)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the start message: {e}"))?;
    if text.is_empty() {
        // The wrapper gave up (the registration failed): no job.
        return Ok(());
    }
    let go: InitStart =
        serde_json::from_str(&text).map_err(|e| format!("bad start message: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(run_init(job, go, std::fs::File::from(status)))
}

async fn run_init(
    job: Vec<OsString>,
    go: InitStart,
    mut status: std::fs::File,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: the init of a PID namespace gets only the signals it handles.
    let mut chld =
        signal(SignalKind::child()).map_err(|e| format!("cannot handle SIGCHLD: {e}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Signal>();
    for &sig in signals::FORWARDED {
        let mut s = signal(SignalKind::from_raw(sig.as_raw()))
            .map_err(|e| format!("cannot handle signal {sig:?}: {e}"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    return;
                }
            }
        });
    }
    let mut cmd = Command::new(&job[0]);
    cmd.args(&job[1..]);
    for (k, v) in &go.env {
        cmd.env(k, v);
    }
    let job_pid = match cmd.spawn() {
        Ok(child) => child.id() as i32,
        Err(e) => {
            eprintln!(
                "gca-exec: cannot execute the job program {}: {e}",
                job[0].to_string_lossy()
            );
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => crate::exit::NOT_FOUND,
                _ => crate::exit::NOT_EXECUTABLE,
            };
            let _ = status.write_all(
                JobEnded {
                    exit_status: Some(code),
                    signal: None,
                }
                .to_line()
                .as_bytes(),
            );
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    let mut job_alive = true;
    loop {
        tokio::select! {
            Some(sig) = rx.recv() => {
                if job_alive {
                    if let Some(p) = Pid::from_raw(job_pid) {
                        let _ = rustix::process::kill_process(p, sig);
                    }
                }
            }
            _ = chld.recv() => {
                // Reap every child that ended: the job, and orphans of the namespace.
                while let Ok(Some((pid, st))) =
                    rustix::process::wait(rustix::process::WaitOptions::NOHANG)
                {
                    if pid.as_raw_nonzero().get() == job_pid && job_alive {
                        job_alive = false;
                        let ended = JobEnded {
                            exit_status: st.exit_status(),
                            signal: st.terminating_signal(),
                        };
                        let _ = status.write_all(ended.to_line().as_bytes());
                        let _ = status.flush();
                    }
                }
            }
        }
    }
}

/// The few system calls that need `unsafe`.
#[allow(unsafe_code)]
mod raw {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

    pub fn unshare_pid_namespace() -> std::io::Result<()> {
        // SAFETY: `unshare_unsafe` is unsafe only for `CLONE_FILES`, which is not asked for;
        // CLONE_NEWPID changes only the namespace of this process's future children.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWPID) }
            .map_err(Into::into)
    }

    pub fn unshare_mount_namespace() -> std::io::Result<()> {
        // SAFETY: as above; CLONE_NEWNS affects this (single-threaded) process only.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
            .map_err(Into::into)
    }

    /// Takes ownership of descriptor `fd`, handed to this process by its parent at exec.
    pub fn adopt(fd: RawFd) -> OwnedFd {
        // SAFETY: called once per number, at start-up, for a descriptor the wrapper left
        // open for us by number (a pipe end); nothing else in this process owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Closes every descriptor above 2 but `keep`, at start-up (before anything of ours is
    /// open but the standard streams).
    pub fn close_inherited(keep: &[RawFd]) {
        let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
            Ok(d) => d
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(_) => return,
        };
        for fd in fds {
            if fd <= 2 || keep.contains(&fd) {
                continue;
            }
            // SAFETY: the borrow lasts for this one call; the number may be closed already
            // (the directory listing's own), which the call reports.
            let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok();
            if open {
                // SAFETY: at start-up nothing of this process owns descriptors above 2 but
                // those in `keep`.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}
