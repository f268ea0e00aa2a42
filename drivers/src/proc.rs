//! Linux process facts and signals, by PID or (preferably) by pidfd, without `unsafe`.
//!
//! The CTS is not the parent of the jobs it checkpoints (the wrapper `exec`s the job under
//! the local resource manager), so it identifies a process by PID *and* start time, and holds
//! a pidfd from registration on: a PID that was reused by another process is never mistaken
//! for the job.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal};

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    /// `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    pub ppid: i32,
    /// Start time in clock ticks since boot: with the PID, identifies a process.
    pub start_time: u64,
    /// For a zombie: the wait status as `waitpid` would report it (Linux >= 3.5).
    pub exit_code: Option<i32>,
}

/// Reads `/proc/PID/stat`; `None` when there is no such process.
pub fn stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: i32, text: &str) -> Option<Stat> {
    // `comm` is in parentheses and may itself contain ") ": split at the last one.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    Some(Stat {
        pid,
        comm,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
        exit_code: field(52).and_then(|v| v.parse().ok()),
    })
}

/// The real UID a process runs as (`/proc/PID/status`).
pub fn uid(pid: i32) -> Option<u32> {
    status_id(pid, "Uid:")
}

/// The real GID (group) a process runs as (`/proc/PID/status`).
pub fn gid(pid: i32) -> Option<u32> {
    status_id(pid, "Gid:")
}

/// The first (real) ID on the `Uid:` or `Gid:` line of `/proc/PID/status`.
fn status_id(pid: i32, field: &str) -> Option<u32> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_id(&text, field)
}

fn parse_status_id(text: &str, field: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Who a process is, as far as privileges go (`/proc/PID/status` and the ownership of
/// `/proc/PID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Real, effective, saved and filesystem UIDs.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem GIDs.
    pub gids: [u32; 4],
    /// Effective capabilities (`CapEff`), a bit mask.
    pub cap_eff: u64,
    /// The process may be dumped by its own user: the kernel gives a process that is not
    /// (after a setuid or setgid exec, or `prctl(PR_SET_DUMPABLE, 0)`) a `/proc/PID` owned by
    /// root, so this is whether `/proc/PID` belongs to its real UID.
    pub dumpable: bool,
}

impl Credentials {
    /// Every UID and GID is the user's `uid`/`gid` (nothing setuid, setgid or changed).
    pub fn all_are(&self, uid: u32) -> bool {
        self.uids.iter().all(|u| *u == uid) && self.gids.iter().all(|g| *g == self.gids[0])
    }
}

/// The credentials of a process; `None` when it is gone.
pub fn credentials(pid: i32) -> Option<Credentials> {
    use std::os::unix::fs::MetadataExt;
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    let mut c = parse_credentials(&text)?;
    c.dumpable = owner == c.uids[0];
    Some(c)
}

fn parse_credentials(text: &str) -> Option<Credentials> {
    let four = |field: &str| -> Option<[u32; 4]> {
        let v: Vec<u32> = text
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        v.try_into().ok()
    };
    let cap_eff = text
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    Some(Credentials {
        uids: four("Uid:")?,
        gids: four("Gid:")?,
        cap_eff,
        dumpable: true,
    })
}

/// The live descendants of `pid` (children, their children, ...), from `/proc`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut all: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if let Some(s) = stat(p) {
                    all.push((p, s.ppid));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &all {
            if pp == parent && p != pid && !out.contains(&p) {
                out.push(p);
                frontier.push(p);
            }
        }
    }
    out
}

/// Why the process tree rooted at `pid` may not be checkpointed on behalf of user `uid` (a
/// non-root local caller): a process of it runs with another user's IDs, with setuid or
/// setgid IDs, with capabilities, or is not dumpable. `None` when every process is plainly
/// the user's. The root CTS dumps whatever CRIU is pointed at, and the image is then the
/// user's: a privileged process must never get into it.
pub fn foreign_process(pid: i32, uid: u32) -> Option<String> {
    for p in std::iter::once(pid).chain(descendants(pid)) {
        let Some(c) = credentials(p) else { continue };
        let what = if !c.all_are(uid) {
            format!(
                "runs with UIDs {:?} and GIDs {:?}, not only user {uid}'s (setuid, setgid or another user's)",
                c.uids, c.gids
            )
        } else if c.cap_eff != 0 {
            format!("has capabilities (CapEff {:016x})", c.cap_eff)
        } else if !c.dumpable {
            "is not dumpable (a setuid or setgid program, or PR_SET_DUMPABLE 0)".to_string()
        } else {
            continue;
        };
        let name = stat(p).map(|s| s.comm).unwrap_or_default();
        return Some(format!("process {p} ({name}) {what}"));
    }
    None
}

/// The primary group of user `uid` in `/etc/passwd` (local accounts only; the job's own
/// process, [`gid`], is the better source while it runs).
pub fn passwd_gid(uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd_gid(&text, uid)
}

fn parse_passwd_gid(text: &str, uid: u32) -> Option<u32> {
    text.lines().find_map(|line| {
        // name:password:uid:gid:gecos:home:shell
        let mut fields = line.split(':');
        let _name = fields.next()?;
        let _password = fields.next()?;
        let u: u32 = fields.next()?.parse().ok()?;
        let g: u32 = fields.next()?.parse().ok()?;
        (u == uid).then_some(g)
    })
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn is_descendant(pid: i32, ancestor: i32) -> bool {
    let mut cur = pid;
    for _ in 0..4096 {
        if cur == ancestor {
            return true;
        }
        match stat(cur) {
            Some(s) if s.ppid > 0 && s.ppid != cur => cur = s.ppid,
            _ => return false,
        }
    }
    false
}

/// A live (not zombie) process with this PID and start time exists.
pub fn is_alive(pid: i32, start_time: u64) -> bool {
    matches!(stat(pid), Some(s) if s.start_time == start_time && s.state != 'Z' && s.state != 'X')
}

/// Opens a pidfd for `pid`; `None` if the process is gone or the kernel has no pidfds.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    let pid = Pid::from_raw(pid)?;
    rustix::process::pidfd_open(pid, PidfdFlags::NONBLOCK).ok()
}

/// The PID a pidfd refers to (`/proc/self/fdinfo`, Linux >= 5.4), `-1` once the process has
/// been reaped; `None` when the kernel does not say.
pub fn pidfd_pid(fd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Signal numbers by name: `SIGUSR1`, `USR1`, `usr1` or `10`.
pub fn parse_signal(name: &str) -> Option<Signal> {
    let n = name.trim();
    if let Ok(raw) = n.parse::<i32>() {
        return Signal::from_named_raw(raw);
    }
    let upper = n.to_ascii_uppercase();
    let short = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match short {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "KILL" => Signal::KILL,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "PIPE" => Signal::PIPE,
        "ALRM" => Signal::ALARM,
        "TERM" => Signal::TERM,
        "CONT" => Signal::CONT,
        "STOP" => Signal::STOP,
        "TSTP" => Signal::TSTP,
        "XCPU" => Signal::XCPU,
        "WINCH" => Signal::WINCH,
        "PWR" => Signal::POWER,
        _ => return None,
    })
}

/// Sends `sig` through `pidfd` when there is one (immune to PID reuse), else to `pid`.
pub fn send_signal(pid: i32, pidfd: Option<&OwnedFd>, sig: Signal) -> std::io::Result<()> {
    match pidfd {
        Some(fd) => rustix::process::pidfd_send_signal(fd.as_fd(), sig).map_err(Into::into),
        None => {
            let pid = Pid::from_raw(pid).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "PID must be positive")
            })?;
            rustix::process::kill_process(pid, sig).map_err(Into::into)
        }
    }
}

/// Waits until the process with `pid` and `start_time` is gone (or a zombie), up to
/// `timeout`. Returns whether it is gone.
pub async fn wait_gone(pid: i32, start_time: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_alive(pid, start_time) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no process at all has `pid` (not even a zombie), up to `timeout`: a restore
/// that must reuse the PID needs this.
pub async fn wait_pid_free(pid: i32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if stat(pid).is_none() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a wait status (as in `/proc/PID/stat` field 52) ended: `(exit status, signal)`.
pub fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    let sig = status & 0x7f;
    if sig == 0 {
        (Some((status >> 8) & 0xff), None)
    } else {
        (None, Some(sig))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_from_status() {
        let text = "Name:\tx\nUid:\t1000\t0\t0\t1000\nGid:\t100\t100\t100\t100\nCapEff:\t0000000000000000\n";
        let c = parse_credentials(text).unwrap();
        assert_eq!(c.uids, [1000, 0, 0, 1000]);
        assert!(
            !c.all_are(1000),
            "a setuid process is not plainly the user's"
        );
        assert_eq!(c.cap_eff, 0);
        let me = credentials(std::process::id() as i32).unwrap();
        assert!(me.dumpable);
        assert!(me.all_are(me.uids[0]));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = descendants(std::process::id() as i32).contains(&(child.id() as i32));
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "a child is a descendant");
        // Root's processes have capabilities: only a root caller may register them.
        let foreign = foreign_process(std::process::id() as i32, me.uids[0]);
        if me.uids[0] == 0 {
            assert!(foreign.is_some_and(|f| f.contains("capabilities")));
        } else {
            assert_eq!(foreign, None);
        }
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 256";
        let s = parse_stat(4242, line).unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.start_time, 987654);
        assert_eq!(s.exit_code, Some(256));
        assert_eq!(decode_wait_status(256), (Some(1), None));
        assert_eq!(decode_wait_status(9), (None, Some(9)));
    }

    #[test]
    fn owner_ids_from_status_and_passwd() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t101\t101\t101\n";
        assert_eq!(parse_status_id(status, "Uid:"), Some(1000));
        assert_eq!(parse_status_id(status, "Gid:"), Some(100));
        assert_eq!(parse_status_id("Name:\tx\n", "Gid:"), None);
        let me = std::process::id() as i32;
        assert_eq!(uid(me), Some(rustix::process::getuid().as_raw()));
        assert_eq!(gid(me), Some(rustix::process::getgid().as_raw()));
        assert_eq!(gid(-1), None);

        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nalice:x:1000:1001::/home/alice:/bin/sh\n";
        assert_eq!(parse_passwd_gid(passwd, 1000), Some(1001));
        assert_eq!(parse_passwd_gid(passwd, 0), Some(0));
        assert_eq!(parse_passwd_gid(passwd, 4242), None);
    }

    #[test]
    fn own_process_is_alive_and_its_own_descendant() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(is_alive(me, s.start_time));
        assert!(!is_alive(me, s.start_time + 1));
        assert!(is_descendant(me, me));
        assert!(is_descendant(me, 1));
        assert!(!is_descendant(1, me));
        assert!(stat(-1).is_none());
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("SIGUSR1"), Some(Signal::USR1));
        assert_eq!(parse_signal("usr2"), Some(Signal::USR2));
        assert_eq!(parse_signal("15"), Some(Signal::TERM));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }

    #[tokio::test]
    async fn waits_for_a_killed_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = stat(pid).unwrap().start_time;
        let fd = pidfd(pid).expect("pidfd");
        send_signal(pid, Some(&fd), Signal::KILL).unwrap();
        assert!(wait_gone(pid, start, Duration::from_secs(5)).await);
        let status = stat(pid).and_then(|s| s.exit_code);
        assert_eq!(status.map(decode_wait_status), Some((None, Some(9))));
        child.wait().unwrap();
        assert!(wait_pid_free(pid, Duration::from_secs(5)).await);
    }
}
