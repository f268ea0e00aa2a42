//! Wrapper harness: `gca-exec` and `gca-recover` as real processes, each in its own session
//! (started with `setsid`, as under a resource manager), reaped and killed when dropped.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// A workspace binary built alongside the tests (target/<profile>/NAME).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A bash job that counts and appends each number to `log` through a descriptor it keeps
/// open (like `TestJob::counter`).
pub fn counter_script(log: &Path) -> String {
    format!("exec 3>>{log:?}; i=0; while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done")
}

/// The numbers in a counter's log.
pub fn values(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A wrapper process (`gca-exec` becomes the job; `gca-recover` stays its parent).
pub struct Wrapper {
    pub child: Child,
    pub pid: i32,
    pub stderr: PathBuf,
    /// Where its standard output goes, when asked for ([`Wrapper::spawn_capturing`]).
    pub stdout: Option<PathBuf>,
    status: Option<ExitStatus>,
    /// Processes to kill before the wrapper (a restored job, our grandchild's PID).
    adopted: Vec<i32>,
}

impl Wrapper {
    /// `setsid BIN ARGS...`, stdin and stdout on /dev/null, stderr into a file in `dir`.
    pub fn spawn(bin: &str, args: &[&str], dir: &Path) -> Self {
        Self::spawn_with(bin, args, dir, false)
    }

    /// As [`Wrapper::spawn`], with its standard output into a file of `dir`.
    pub fn spawn_capturing(bin: &str, args: &[&str], dir: &Path) -> Self {
        Self::spawn_with(bin, args, dir, true)
    }

    fn spawn_with(bin: &str, args: &[&str], dir: &Path, capture: bool) -> Self {
        let tag = uuid::Uuid::new_v4().simple();
        let stderr = dir.join(format!("{bin}-{tag}.err"));
        let stdout_path = capture.then(|| dir.join(format!("{bin}-{tag}.out")));
        let stdout = match &stdout_path {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        };
        let child = Command::new("setsid")
            .arg(binary(bin))
            .args(args)
            // The site CA, to check the CTS's certificate when given its https URL.
            .env(gca_protocol::transport::ENV_CA, crate::pki::pki().ca())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start the wrapper");
        let pid = child.id() as i32;
        // Our child is no process group leader, so `setsid` executes the wrapper in place.
        Wrapper {
            child,
            pid,
            stderr,
            stdout: stdout_path,
            status: None,
            adopted: Vec::new(),
        }
    }

    /// Kill `pid` too when dropped (before the wrapper, while it cannot have been reused).
    pub fn adopt(&mut self, pid: i32) {
        self.adopted.push(pid);
    }

    /// What it wrote on its standard output (with [`Wrapper::spawn_capturing`]).
    pub fn stdout_text(&self) -> String {
        self.stdout
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Ends the test's job: SIGKILL to the adopted processes (a restored job, which a
    /// SIGKILL of the wrapper would leave running), then waits for the wrapper to end.
    pub async fn kill_job_and_wait(&mut self, within: Duration) -> ExitStatus {
        for pid in &self.adopted {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.wait(within).await
    }

    /// Waits (polling) for the wrapper to end; panics after `within`.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                self.adopted.clear();
                return s;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "the wrapper (PID {}) did not end within {within:?}; stderr: {}",
                    self.pid,
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Exit code, or panics with what happened.
    pub async fn code(&mut self, within: Duration) -> i32 {
        let s = self.wait(within).await;
        s.code().unwrap_or_else(|| {
            panic!(
                "the wrapper died of signal {:?}; stderr: {}",
                s.signal(),
                self.stderr_text()
            )
        })
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid);
    }

    pub fn running(&self) -> bool {
        gca_drivers::proc::stat(self.pid).is_some_and(|s| s.state != 'Z')
    }
}

impl Drop for Wrapper {
    fn drop(&mut self) {
        for pid in self.adopted.drain(..) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `gca-exec` running [`counter_script`] (writing to `log`) as job `gid` under `cts` (by its
/// URL), once the CTS has the job and it has counted to 3.
pub async fn exec_counter(cts: &crate::cts::TestCts, gid: &str, log: &Path) -> Wrapper {
    let job = Wrapper::spawn(
        "gca-exec",
        &[
            "--gid",
            gid,
            "--cts",
            &cts.url,
            "--",
            "bash",
            "-c",
            &counter_script(log),
        ],
        cts.dir.path(),
    );
    crate::cts::eventually(
        Duration::from_secs(20),
        "the job runs registered",
        || async { cts.local.job(gid).await.is_ok() && values(log).len() >= 3 },
    )
    .await;
    job
}
