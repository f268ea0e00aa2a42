//! Exit statuses of processes that are not our children, from the kernel's process events
//! connector (netlink `NETLINK_CONNECTOR`, `CN_IDX_PROC`; needs CAP_NET_ADMIN, so the root
//! CTS has it).
//!
//! A job registered at the CTS is the child of its resource manager's shepherd, not of the
//! CTS, so `waitid` cannot give its status, and the zombie's `/proc/PID/stat` lasts only until
//! the shepherd reaps it (a race the CTS loses on a busy machine). The connector reports every
//! process's exit with its wait status as it happens; [`ExitEvents`] keeps those of the PIDs
//! it was asked to watch. Where the connector is not available (no CAP_NET_ADMIN, some
//! containers), [`ExitEvents::start`] says why and callers fall back to `/proc`.
//!
//! Hand-written rather than a crate: the protocol is three fixed C structures (`nlmsghdr`,
//! `cn_msg`, `proc_event`), and rustix gives the socket calls safely.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fd::OwnedFd;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;
/// `proc_event`: `what` (4), `cpu` (4), `timestamp_ns` (8), then the event's data.
const EVENT_DATA: usize = 16;

/// What [`ExitEvents`] remembers of a watched PID.
#[derive(Debug, Clone, Copy)]
enum Watched {
    Running,
    Exited(i32),
}

/// Exit statuses of watched PIDs, as the kernel reports them.
#[derive(Debug, Default)]
pub struct ExitEvents {
    watched: Mutex<HashMap<i32, Watched>>,
}

impl ExitEvents {
    /// The process's one subscription (made at the first call, with the thread that reads
    /// it, which lives as long as the process). `Err` says why events are not available.
    pub fn shared() -> Result<Arc<Self>, String> {
        static SHARED: std::sync::OnceLock<Result<Arc<ExitEvents>, String>> =
            std::sync::OnceLock::new();
        SHARED.get_or_init(Self::start).clone()
    }

    fn start() -> Result<Arc<Self>, String> {
        let fd = subscribe().map_err(|e| {
            format!("the kernel's process events connector is not available ({e}); job exit statuses come from /proc, and may be missed when the job's parent reaps it first")
        })?;
        let events = Arc::new(Self::default());
        let reader = Arc::clone(&events);
        std::thread::Builder::new()
            .name("gca-exit-events".into())
            .spawn(move || reader.read_loop(fd))
            .map_err(|e| format!("cannot start the exit events thread: {e}"))?;
        events.self_test()?;
        Ok(events)
    }

    /// The kernel ignores a subscription from outside the initial namespaces without saying
    /// so: a process of ours must be seen to exit.
    fn self_test(&self) -> Result<(), String> {
        // It exits once watched: when its standard input closes.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read _ignored; exit 3"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start /bin/sh to test the process events connector: {e}")
            })?;
        let pid = child.id() as i32;
        self.watch(pid);
        drop(child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        let seen = loop {
            if let Some(Watched::Exited(status)) = self.lock().get(&pid).copied() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.wait();
        self.unwatch(pid);
        match seen {
            Some(status) if crate::proc::decode_wait_status(status) == (Some(3), None) => Ok(()),
            Some(status) => Err(format!(
                "the process events connector reported wait status {status} for a process that exited 3"
            )),
            None => Err("the process events connector reports no exits here (a container or another namespace?); job exit statuses come from /proc, and may be missed when the job's parent reaps it first".into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Watched>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `pid`'s exit from now on (an exit already seen is kept).
    pub fn watch(&self, pid: i32) {
        self.lock().entry(pid).or_insert(Watched::Running);
    }

    /// Forgets `pid`.
    pub fn unwatch(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    /// `pid`'s wait status, waiting up to `within` for the event (it may come a moment after
    /// the process is seen gone); forgets the PID once it is known.
    pub async fn exit_status(&self, pid: i32, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            {
                let mut w = self.lock();
                match w.get(&pid) {
                    Some(Watched::Exited(status)) => {
                        let status = *status;
                        w.remove(&pid);
                        return Some(status);
                    }
                    Some(Watched::Running) => {}
                    None => return None,
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn read_loop(&self, fd: OwnedFd) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                Ok((n, _)) => n,
                // Events came faster than we read: some are lost (those PIDs fall back to
                // /proc); go on.
                Err(rustix::io::Errno::NOBUFS) | Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "process events connector failed; job exit statuses come from /proc from now on");
                    return;
                }
            };
            let mut at = 0;
            while let Some((len, exit)) = parse_message(&buf[at..n]) {
                if let Some((tgid, status)) = exit {
                    // The first exit of a watched PID is its job's (a later process with the
                    // same PID does not overwrite it).
                    if let Some(entry @ Watched::Running) = self.lock().get_mut(&tgid) {
                        *entry = Watched::Exited(status);
                    }
                }
                at += len;
                if at >= n {
                    break;
                }
            }
        }
    }
}

fn subscribe() -> rustix::io::Result<OwnedFd> {
    // Close-on-exec: a job or CRIU started by this process must not inherit it (CRIU refuses
    // to dump a process holding a netlink socket with unread data).
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        Some(netlink::CONNECTOR),
    )?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, CN_IDX_PROC))?;
    let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG + 4);
    let total = (NLMSG_HDR + CN_MSG + 4) as u32;
    // nlmsghdr: len, type, flags, seq, pid
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // cn_msg: id {idx, val}, seq, ack, len, flags
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&4u16.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    rustix::net::send(&fd, &msg, SendFlags::empty())?;
    Ok(fd)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("four bytes")))
}

/// One netlink message at the start of `b`: its length (aligned) and, for a process's exit,
/// its thread group ID and wait status. `None` when `b` holds no whole message.
fn parse_message(b: &[u8]) -> Option<(usize, Option<(i32, i32)>)> {
    let len = u32_at(b, 0)? as usize;
    if len < NLMSG_HDR || len > b.len() {
        return None;
    }
    let aligned = (len + 3) & !3;
    let event = NLMSG_HDR + CN_MSG;
    let exit = (|| {
        let b = &b[..len];
        if u32_at(b, NLMSG_HDR)? != CN_IDX_PROC || u32_at(b, event)? != PROC_EVENT_EXIT {
            return None;
        }
        // exit_proc_event: process_pid, process_tgid, exit_code, exit_signal
        let data = event + EVENT_DATA;
        let pid = u32_at(b, data)? as i32;
        let tgid = u32_at(b, data + 4)? as i32;
        let code = u32_at(b, data + 8)? as i32;
        // A thread's end is not the process's.
        (pid == tgid).then_some((tgid, code))
    })();
    Some((aligned.max(NLMSG_HDR), exit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_message(pid: u32, tgid: u32, code: u32) -> Vec<u8> {
        let mut m = Vec::new();
        let total = (NLMSG_HDR + CN_MSG + EVENT_DATA + 16) as u32;
        m.extend_from_slice(&total.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&PROC_EVENT_EXIT.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        for v in [pid, tgid, code, 17] {
            m.extend_from_slice(&v.to_ne_bytes());
        }
        m
    }

    #[test]
    fn exits_of_processes_not_threads_are_read() {
        let m = exit_message(41, 41, 9);
        assert_eq!(parse_message(&m), Some((m.len(), Some((41, 9)))));
        let t = exit_message(42, 41, 0);
        assert_eq!(parse_message(&t), Some((t.len(), None)));
        assert_eq!(parse_message(&m[..10]), None, "a truncated message");
    }

    /// The real connector (the tests run as root, as the CTS does). The process is our child
    /// here, but its status is read from the kernel's event before anyone waits for it.
    #[tokio::test]
    async fn a_killed_process_is_reported_with_its_signal() {
        let events = ExitEvents::shared().expect("the process events connector (run as root)");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        events.watch(pid);
        child.kill().unwrap();
        let status = events
            .exit_status(pid, Duration::from_secs(5))
            .await
            .expect("the exit event");
        let _ = child.wait();
        assert_eq!(crate::proc::decode_wait_status(status), (None, Some(9)));
        // Not inherited by what this process starts.
        let fds = std::process::Command::new("ls")
            .arg("-l")
            .arg("/proc/self/fd")
            .output()
            .unwrap();
        let fds = String::from_utf8_lossy(&fds.stdout);
        assert!(
            !fds.contains("socket:"),
            "a child inherited a socket: {fds}"
        );
        assert_eq!(
            events.exit_status(pid, Duration::ZERO).await,
            None,
            "forgotten once read"
        );
    }
}
