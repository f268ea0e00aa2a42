//! Slurm harness: submit batch jobs to the private one-node cluster of `scripts/slurm-cluster`,
//! wait for their states, read their exit codes, cancel them.
//!
//! The cluster is found through `SLURM_CONF` (which `scripts/test` exports); without it the
//! harness panics and says how to start the cluster, rather than skipping. There is no slurmdbd
//! (so no `sacct`): states and exit codes come from `scontrol show job`, which keeps finished
//! jobs for `MinJobAge` (600 s in the generated slurm.conf).
//!
//! Everything here is blocking (it runs the Slurm client commands); from async tests call it
//! through `tokio::task::spawn_blocking`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A Slurm job id, as `sbatch --parsable` prints it.
pub type JobId = u64;

/// States after which a job does not run any more.
pub const FINAL_STATES: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
];

/// The slurm.conf of the test cluster, from `SLURM_CONF`; panics with instructions when unset.
pub fn conf() -> PathBuf {
    match std::env::var_os("SLURM_CONF") {
        Some(c) if !c.is_empty() => {
            let p = PathBuf::from(c);
            assert!(
                p.is_file(),
                "SLURM_CONF={} does not exist; start the test cluster with `scripts/slurm-cluster \
                 start` (as root) and export the SLURM_CONF it prints",
                p.display()
            );
            p
        }
        _ => panic!(
            "SLURM_CONF is not set: the Slurm tests need the one-node test cluster. Start it with \
             `scripts/slurm-cluster start` (as root; scripts/install-slurm installs Slurm), then \
             `export SLURM_CONF=/var/tmp/gca-slurm/slurm.conf` (the line it prints), or run \
             everything with scripts/test, which does both"
        ),
    }
}

/// Runs a Slurm client command against the test cluster; returns its stdout, or panics with
/// its stderr.
pub fn run<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = Command::new(program)
        .args(&args)
        .env("SLURM_CONF", conf())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (scripts/install-slurm installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks that the controller answers (`scontrol ping`), with a clear message if not.
pub fn check_cluster() {
    let conf = conf();
    let out = Command::new("scontrol")
        .arg("ping")
        .env("SLURM_CONF", &conf)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scontrol (scripts/install-slurm installs it): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("is UP"),
        "the Slurm cluster of SLURM_CONF={} does not answer (`scontrol ping`: {} {}); start it \
         with `scripts/slurm-cluster start`",
        conf.display(),
        text.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Options common to the test submissions.
#[derive(Clone, Debug)]
pub struct Submit {
    /// `--job-name`.
    pub name: String,
    /// `--chdir` (the job's working directory).
    pub chdir: PathBuf,
    /// `--output` (`%j` is the job id); default `<chdir>/slurm-%j.out`.
    pub output: Option<PathBuf>,
    /// `--time` in minutes, so that a job a failed test leaves behind does not run forever.
    pub time_minutes: u32,
    /// Further `sbatch` options (e.g. `--signal=B:USR1@60`, `--export=ALL,GID=...`).
    pub extra: Vec<String>,
}

impl Submit {
    pub fn new(name: &str, chdir: &Path) -> Self {
        Submit {
            name: name.to_string(),
            chdir: chdir.to_path_buf(),
            output: None,
            time_minutes: 5,
            extra: Vec::new(),
        }
    }

    fn args(&self) -> Vec<String> {
        let output = self
            .output
            .clone()
            .unwrap_or_else(|| self.chdir.join("slurm-%j.out"));
        let mut a = vec![
            "--parsable".to_string(),
            format!("--job-name={}", self.name),
            format!("--chdir={}", self.chdir.display()),
            format!("--output={}", output.display()),
            format!("--time={}", self.time_minutes),
        ];
        a.extend(self.extra.iter().cloned());
        a
    }

    /// `sbatch --wrap COMMAND` (COMMAND runs under `sh -c`).
    pub fn wrap(&self, command: &str) -> JobId {
        let mut a = self.args();
        a.push(format!("--wrap={command}"));
        parse_job_id(&run("sbatch", a))
    }

    /// `sbatch SCRIPT ARGS...`.
    pub fn script<S: AsRef<str>>(&self, script: &Path, args: &[S]) -> JobId {
        let mut a = self.args();
        a.push(script.display().to_string());
        a.extend(args.iter().map(|s| s.as_ref().to_string()));
        parse_job_id(&run("sbatch", a))
    }
}

/// The job id of `sbatch --parsable`'s output ("ID" or "ID;CLUSTER").
pub fn parse_job_id(out: &str) -> JobId {
    let first = out.trim().split(';').next().unwrap_or_default();
    first
        .parse()
        .unwrap_or_else(|_| panic!("sbatch --parsable printed {out:?}, not a job id"))
}

/// `scontrol show job -o ID` as key → value (values with spaces, e.g. `Command`, come out cut at
/// the first space; the keys tests use — JobState, ExitCode, Reason, StdOut — have none).
pub fn job_info(id: JobId) -> HashMap<String, String> {
    let out = run("scontrol", ["show", "job", "-o", &id.to_string()]);
    parse_job_info(&out)
}

pub fn parse_job_info(out: &str) -> HashMap<String, String> {
    out.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The job's state (`JobState`, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED).
pub fn state(id: JobId) -> String {
    job_info(id)
        .remove("JobState")
        .unwrap_or_else(|| panic!("scontrol show job {id} has no JobState"))
}

/// Polls until the job's state is one of `states`, returning it; panics after `timeout` (or when
/// the job ends in another state, if `states` has no final state).
pub fn wait_state(id: JobId, states: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let waits_for_final = states.iter().any(|s| FINAL_STATES.contains(s));
    loop {
        let info = job_info(id);
        let s = info.get("JobState").cloned().unwrap_or_default();
        if states.contains(&s.as_str()) {
            return s;
        }
        if !waits_for_final && FINAL_STATES.contains(&s.as_str()) {
            panic!("job {id} ended ({s}, {info:?}) while waiting for {states:?}");
        }
        if Instant::now() >= deadline {
            panic!("job {id} still {s} after {timeout:?} (waiting for {states:?}): {info:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until the job has finished (any final state); returns the state.
pub fn wait_finished(id: JobId, timeout: Duration) -> String {
    wait_state(id, FINAL_STATES, timeout)
}

/// The job's `ExitCode=STATUS:SIGNAL` as (exit status, signal number).
pub fn exit_code(id: JobId) -> (i32, i32) {
    let info = job_info(id);
    let ec = info
        .get("ExitCode")
        .unwrap_or_else(|| panic!("scontrol show job {id} has no ExitCode: {info:?}"));
    parse_exit_code(ec).unwrap_or_else(|| panic!("job {id}: unparsable ExitCode={ec}"))
}

pub fn parse_exit_code(ec: &str) -> Option<(i32, i32)> {
    let (status, signal) = ec.split_once(':')?;
    Some((status.parse().ok()?, signal.parse().ok()?))
}

/// `scancel ID`: Slurm sends SIGCONT and SIGTERM to every process of the job (batch shell and
/// steps), then SIGKILL after KillWait seconds.
pub fn cancel(id: JobId) {
    run("scancel", [id.to_string()]);
}

/// `scancel --signal=SIG [--batch] ID`: only sends the signal, the job goes on. With `batch`,
/// only the batch shell gets it (as with `#SBATCH --signal=B:...`).
pub fn signal(id: JobId, sig: &str, batch: bool) {
    let mut a = vec![format!("--signal={sig}")];
    if batch {
        a.push("--batch".into());
    }
    a.push(id.to_string());
    run("scancel", a);
}

/// How many times the job was requeued (`Restarts`).
pub fn restarts(id: JobId) -> u32 {
    job_info(id)
        .get("Restarts")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("scontrol show job {id} has no Restarts"))
}

/// `scontrol requeue ID`: Slurm kills the job (SIGTERM, then SIGKILL after KillWait) and puts
/// it back in the queue.
pub fn requeue(id: JobId) {
    run("scontrol", ["requeue", &id.to_string()]);
}

/// How long a requeued job stays pending before [`wait_requeued_running`] starts it: more
/// than the one-second granularity of slurmd's credential revocation.
pub const REVOKE_GRACE: Duration = Duration::from_millis(2500);

/// Waits until the job runs again after its `restarts`-th requeue. Slurm makes a requeued
/// job eligible only `cred_expire` (120 s) later; this moves its start to now
/// (`scontrol update StartTime=now`, as an operator may) once it has been pending for
/// [`REVOKE_GRACE`].
///
/// Not at once: slurmd revokes the job's credential when it kills the old instance and
/// refuses a launch whose credential is not newer than the revocation, in whole seconds
/// ("Job N already killed, do not launch batch job"); a start in the same second as the
/// requeue fails the job for good (FAILED, ExitCode 1:0, RunTime 0), which is what
/// `cred_expire` protects against.
pub fn wait_requeued_running(id: JobId, restarts: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut pending_since = None;
    loop {
        let info = job_info(id);
        let state = info.get("JobState").cloned().unwrap_or_default();
        let n: u32 = info
            .get("Restarts")
            .and_then(|r| r.parse().ok())
            .unwrap_or_default();
        if n >= restarts && state == "RUNNING" {
            return;
        }
        if state == "PENDING"
            && pending_since.get_or_insert_with(Instant::now).elapsed() >= REVOKE_GRACE
        {
            let _ = Command::new("scontrol")
                .args(["update", &format!("JobId={id}"), "StartTime=now"])
                .env("SLURM_CONF", conf())
                .output();
        }
        if Instant::now() >= deadline {
            panic!("job {id} is not running after requeue {restarts} within {timeout:?}: {info:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until `path` exists and contains `needle`; returns its contents.
pub fn wait_file_contains(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} does not contain {needle:?} after {timeout:?}; it has {text:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cancels the job when dropped unless it has finished: a failing test leaves no job behind.
pub struct JobGuard(pub JobId);

impl Drop for JobGuard {
    fn drop(&mut self) {
        let _ = Command::new("scancel")
            .arg(self.0.to_string())
            .env("SLURM_CONF", conf())
            .output();
    }
}

/// A batch job's payload for the wrapper tests: a bash script in `dir` counting into
/// `counter.log` through an open descriptor (so CRIU restores the file's offset); interrupted
/// (SIGTERM) it exits 3, not 0, since a job that exits 0 has ended and its images go.
/// Returns (the log, the script).
pub fn counting_job(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("counter.log");
    let script = dir.join("job.sh");
    std::fs::write(
        &script,
        format!(
            "trap 'exit 3' TERM; exec 3>>{log:?}; i=0; while :; do i=$((i+1)); echo $i >&3; sleep 0.05; done"
        ),
    )
    .expect("write the job's script");
    (log, script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scontrol_and_sbatch_output() {
        assert_eq!(parse_job_id("42\n"), 42);
        assert_eq!(parse_job_id("42;gca\n"), 42);
        let info = parse_job_info(
            "JobId=7 JobName=x UserId=root(0) JobState=FAILED Reason=NonZeroExitCode \
             ExitCode=7:0 StdOut=/tmp/o\n",
        );
        assert_eq!(info["JobState"], "FAILED");
        assert_eq!(parse_exit_code(&info["ExitCode"]), Some((7, 0)));
        assert_eq!(parse_exit_code("0:15"), Some((0, 15)));
        assert_eq!(parse_exit_code("x"), None);
    }
}
