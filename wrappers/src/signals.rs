//! Signal forwarding and ending like the job (as BLCR's `cr_restart` does): the recovery
//! wrapper stays the process the resource manager knows, so every signal it can catch goes
//! on to the job, and when the job ends the wrapper ends the same way.

use std::sync::{Arc, Mutex};

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{signal, SignalKind};

/// The signals forwarded to the job: every catchable one except SIGCHLD (ours, from the job)
/// and SIGPIPE (about the wrapper's own output).
pub const FORWARDED: &[Signal] = &[
    Signal::HUP,
    Signal::INT,
    Signal::QUIT,
    Signal::USR1,
    Signal::USR2,
    Signal::ALARM,
    Signal::TERM,
    Signal::CONT,
    Signal::TSTP,
    Signal::TTIN,
    Signal::TTOU,
    Signal::WINCH,
    Signal::URG,
    Signal::XCPU,
    Signal::XFSZ,
    Signal::VTALARM,
    Signal::PROF,
    Signal::IO,
    Signal::POWER,
    Signal::SYS,
];

/// Catches [`FORWARDED`] from the moment it is created (signals that come before the job
/// runs are kept and forwarded once it does).
pub struct Forwarder {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

/// Stops forwarding: after [`Forwarding::stop`] no signal is sent any more, so the job's
/// PID can be reaped (and reused) safely.
pub struct Forwarding {
    target: Arc<Mutex<Option<Pid>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Forwarder {
    /// Installs the handlers; needs a Tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        let mut streams = Vec::with_capacity(FORWARDED.len());
        for &sig in FORWARDED {
            streams.push((sig, signal(SignalKind::from_raw(sig.as_raw()))?));
        }
        Ok(Self { streams })
    }

    /// Forwards every caught signal to `pid` until stopped.
    pub fn start(self, pid: i32) -> Forwarding {
        let target = Arc::new(Mutex::new(Pid::from_raw(pid)));
        let tasks = self
            .streams
            .into_iter()
            .map(|(sig, mut stream)| {
                let target = target.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        let guard = target.lock().expect("signal target lock");
                        match *guard {
                            Some(pid) => {
                                let _ = rustix::process::kill_process(pid, sig);
                            }
                            None => return,
                        }
                    }
                })
            })
            .collect();
        Forwarding { target, tasks }
    }
}

impl Forwarding {
    pub fn stop(self) {
        *self.target.lock().expect("signal target lock") = None;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

/// Waits until child `pid` has ended, without reaping it (`waitid(WNOWAIT)`): the zombie
/// keeps the PID until [`reap`], so that nothing can reuse it meanwhile.
pub fn wait_ended(pid: i32) -> std::io::Result<Ended> {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    let pid = Pid::from_raw(pid).ok_or_else(|| std::io::Error::other("invalid PID"))?;
    loop {
        match waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Ok(Some(st)) => {
                if let Some(sig) = st.terminating_signal() {
                    return Ok(Ended::Signaled(sig));
                }
                if let Some(code) = st.exit_status() {
                    return Ok(Ended::Exited(code));
                }
            }
            Ok(None) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reaps child `pid` (after [`wait_ended`]).
pub fn reap(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}

/// Ends this process the way the job ended: its exit status, or death by its signal (the
/// disposition reset to the default first, since the wrapper caught it for forwarding).
pub fn end_like(ended: Ended) -> ! {
    match ended {
        Ended::Exited(code) => std::process::exit(code),
        Ended::Signaled(sig) => {
            let _ = signal_hook::low_level::emulate_default_handler(sig);
            // The signal's default action does not end a process (or could not be taken):
            // end like a shell reports a death by signal.
            std::process::exit(128 + sig)
        }
    }
}
