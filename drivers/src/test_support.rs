//! Test helpers shared by the drivers' tests: real jobs to checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitOptions};

use crate::proc;
use crate::JobHandle;

/// The job's loop: appends an increasing counter to the file `$0` (kept open as fd 3),
/// 20 times a second.
const COUNTER_LOOP: &str =
    r#"exec 3>>"$0"; i=0; while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done"#;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A child of this test process, held as `child`.
    Child,
    /// Restored by CRIU with `--restore-sibling`: a child of this process too, but not a
    /// `std::process::Child`.
    Restored,
    /// Reaped; nothing to clean up.
    Reaped,
}

/// A real process tree in a session of its own (`setsid`), detached from ours, with stdin,
/// stdout and stderr on /dev/null, counting into a file. Killed (with its process group)
/// and reaped on drop.
pub struct TestJob {
    pub pid: i32,
    pub counter: PathBuf,
    child: Option<std::process::Child>,
    state: State,
    pub dir: tempfile::TempDir,
}

impl TestJob {
    /// Starts the counting job.
    pub async fn start() -> Self {
        Self::start_with("", &[]).await
    }

    /// Starts the counting job after `prefix` (shell code; its arguments are `$1`...).
    pub async fn start_with(prefix: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let counter = dir.path().join("counter");
        // Our child is not a process group leader, so setsid(1) calls setsid() and execs
        // bash in place: the PID we get is the job's root (and session leader).
        let child = Command::new("setsid")
            .arg("bash")
            .arg("-c")
            .arg(format!("{prefix} {COUNTER_LOOP}"))
            .arg(&counter)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn setsid bash");
        let pid = child.id() as i32;
        let job = Self {
            pid,
            counter,
            child: Some(child),
            state: State::Child,
            dir,
        };
        job.wait_count(2).await;
        let st = proc::stat(pid).expect("job stat");
        assert_eq!(st.comm, "bash", "setsid must exec in place");
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap()
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(3),
            Some(pid.to_string().as_str()),
            "the job must lead its own session"
        );
        job
    }

    /// A handle as the CTS would have it (with a pidfd).
    pub fn handle(&self, gid: &str) -> JobHandle {
        let checkpoint_dir = self.new_dir("checkpoint");
        JobHandle {
            gid: gid.to_string(),
            pid: self.pid,
            pidfd: proc::pidfd(self.pid).map(Arc::new),
            checkpoint_dir,
            cgroup: None,
        }
    }

    /// A new (or existing) directory inside the job's temporary directory.
    pub fn new_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Every value written to the counter file so far.
    pub fn values(&self) -> Vec<u64> {
        read_counter(&self.counter)
    }

    pub fn last(&self) -> u64 {
        self.values().last().copied().unwrap_or(0)
    }

    /// Waits (up to 5 s) until the counter file has reached `n`.
    pub async fn wait_count(&self, n: u64) {
        for _ in 0..250 {
            if self.last() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the job's counter did not reach {n}: {:?}", self.values());
    }

    /// Reaps the job after it was killed (by `criu dump`), freeing its PID.
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = c.wait().expect("wait");
            assert!(!status.success(), "the job was killed: {status:?}");
        }
        self.state = State::Reaped;
    }

    /// The job runs again as `pid`, restored by CRIU as a child of this process.
    pub fn adopt_restored(&mut self, pid: i32) {
        assert_eq!(
            self.state,
            State::Reaped,
            "restore after reaping the original"
        );
        assert_eq!(
            proc::stat(pid).map(|s| s.ppid),
            Some(std::process::id() as i32),
            "--restore-sibling makes the restored job a child of the caller"
        );
        self.pid = pid;
        self.state = State::Restored;
    }

    /// Kills the job's process group and reaps the job; returns its wait status.
    pub fn kill_and_reap(&mut self) -> Option<i32> {
        if self.state == State::Reaped {
            return None;
        }
        if let Some(p) = Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process_group(p, Signal::KILL);
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
        let status = match (&self.state, self.child.take()) {
            (State::Child, Some(mut c)) => c.wait().ok().map(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.into_raw()
            }),
            _ => rustix::process::waitpid(Pid::from_raw(self.pid), WaitOptions::empty())
                .ok()
                .flatten()
                .map(|(_, s)| s.as_raw()),
        };
        self.state = State::Reaped;
        status
    }
}

impl Drop for TestJob {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

pub fn read_counter(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The CRIU binary, found the way the driver finds it; panics with advice when missing.
pub fn criu_path() -> PathBuf {
    let p = crate::criu::find_criu();
    assert!(
        p.is_file(),
        "CRIU not found at {} (run scripts/install-criu as root, or set GCA_CRIU)",
        p.display()
    );
    p
}

/// Asserts the counter went on from `last` after a restore: the next value written is
/// `last + 1` (not a restart from 1).
pub fn assert_continued(values: &[u64], before_len: usize, last: u64) {
    assert!(
        values.len() > before_len + 2,
        "the restored job writes again: {values:?}"
    );
    assert_eq!(
        &values[before_len..before_len + 3],
        &[last + 1, last + 2, last + 3],
        "the counter continues where it was checkpointed"
    );
}
