//! Grid Engine harness: submit jobs to the private one-node cell of `scripts/gridengine-cell`,
//! follow their states, suspend, reschedule and delete them, read their accounting records.
//!
//! The cell is found through `SGE_ROOT`, `SGE_CELL`, `SGE_QMASTER_PORT` and `SGE_EXECD_PORT`
//! (which `scripts/test` exports); without them the harness panics and says how to start the
//! cell, rather than skipping. States come from `qstat`, the outcome of each run of a job from
//! `qacct -j` (the cell flushes its accounting file every second; a migrated or rescheduled job
//! has one record per run).
//!
//! Everything here is blocking (it runs the Grid Engine client commands); from async tests
//! call it through `tokio::task::spawn_blocking`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A Grid Engine job number, as `qsub -terse` prints it.
pub type JobId = u64;

/// The variables the client commands need, from this process's environment; panics with
/// instructions when they are missing.
pub fn cell_env() -> Vec<(&'static str, String)> {
    const VARS: [&str; 4] = ["SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT"];
    VARS.iter()
        .map(|v| match std::env::var(v) {
            Ok(x) if !x.is_empty() => (*v, x),
            _ => panic!(
                "{v} is not set: the Grid Engine tests need the one-node test cell. Start it \
                 with `scripts/gridengine-cell start` (as root; scripts/install-gridengine \
                 installs Grid Engine), then `eval \"$(scripts/gridengine-cell env)\"`, or run \
                 everything with scripts/test, which does both"
            ),
        })
        .collect()
}

/// The cell's directory (`SGE_ROOT`).
pub fn root() -> PathBuf {
    PathBuf::from(
        cell_env()
            .into_iter()
            .find(|(k, _)| *k == "SGE_ROOT")
            .map(|(_, v)| v)
            .unwrap_or_default(),
    )
}

fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.envs(cell_env());
    c
}

/// Runs a client command against the cell; returns its stdout, or panics with its output.
pub fn run<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = command(program).args(&args).output().unwrap_or_else(|e| {
        panic!("cannot run {program} (scripts/install-gridengine installs it): {e}")
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks that the qmaster answers and the queue takes jobs, with a clear message if not.
pub fn check_cell() {
    let env = cell_env();
    let out = command("qstat")
        .args(["-f", "-q", "all.q"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qstat (scripts/install-gridengine installs it): {e}")
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.lines().any(|l| l.starts_with("all.q@")),
        "the Grid Engine cell of {env:?} does not answer (`qstat -f`: {} {}); start it with \
         `scripts/gridengine-cell start`",
        text.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let ckpt = run("qconf", ["-sckptl"]);
    assert!(
        ckpt.lines().any(|l| l.trim() == "gca"),
        "the cell has no checkpointing environment \"gca\" (qconf -sckptl: {ckpt:?}); \
         `scripts/gridengine-cell start` installs it"
    );
}

/// A submission.
#[derive(Clone, Debug)]
pub struct Submit {
    /// `-N`.
    pub name: String,
    /// `-wd` (the job's working directory).
    pub cwd: PathBuf,
    /// `-o` (stdout and, with `-j y`, stderr): default `<cwd>/<name>.out`.
    pub output: Option<PathBuf>,
    /// `-ckpt`.
    pub ckpt: Option<String>,
    /// `-c`: when the checkpointing environment acts (overrides its `when`).
    pub when: Option<String>,
    /// `-v NAME=VALUE,...` (values must not contain commas).
    pub env: Vec<(String, String)>,
    /// `-l h_rt=SECS`, so that a job a failed test leaves behind does not run for ever.
    pub hard_runtime_secs: u32,
}

impl Submit {
    pub fn new(name: &str, cwd: &Path) -> Self {
        Submit {
            name: name.to_string(),
            cwd: cwd.to_path_buf(),
            output: None,
            ckpt: None,
            when: None,
            env: Vec::new(),
            hard_runtime_secs: 300,
        }
    }

    /// The output file.
    pub fn output(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| self.cwd.join(format!("{}.out", self.name)))
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "-terse".to_string(),
            "-N".into(),
            self.name.clone(),
            "-wd".into(),
            self.cwd.display().to_string(),
            "-o".into(),
            self.output().display().to_string(),
            "-j".into(),
            "y".into(),
            "-l".into(),
            format!("h_rt={}", self.hard_runtime_secs),
        ];
        if let Some(c) = &self.ckpt {
            a.extend(["-ckpt".into(), c.clone()]);
        }
        if let Some(w) = &self.when {
            a.extend(["-c".into(), w.clone()]);
        }
        if !self.env.is_empty() {
            for (k, v) in &self.env {
                assert!(!v.contains(','), "qsub -v cannot pass {k}={v:?} (a comma)");
            }
            let list: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            a.extend(["-v".into(), list.join(",")]);
        }
        a
    }

    /// `qsub ... SCRIPT ARGS...`.
    pub fn script<S: AsRef<str>>(&self, script: &Path, args: &[S]) -> JobId {
        let mut a = self.args();
        a.push(script.display().to_string());
        a.extend(args.iter().map(|s| s.as_ref().to_string()));
        parse_job_id(&run("qsub", a))
    }
}

/// The job number of `qsub -terse`'s output ("ID", or "ID.1-N:1" for an array).
pub fn parse_job_id(out: &str) -> JobId {
    let first = out.trim().split('.').next().unwrap_or_default();
    first
        .parse()
        .unwrap_or_else(|_| panic!("qsub -terse printed {out:?}, not a job number"))
}

/// The job's state letters in `qstat` (e.g. `qw`, `r`, `Rq`, `Rr`, `s`, `dr`), or `None` once
/// the job has left it (finished).
pub fn state(id: JobId) -> Option<String> {
    parse_qstat_state(&run("qstat", ["-u", "*"]), id)
}

pub fn parse_qstat_state(out: &str, id: JobId) -> Option<String> {
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id.to_string().as_str()) && f.len() > 4).then(|| f[4].to_string())
    })
}

/// Polls until `pred` holds for the job's state (`None`: finished); returns it. Panics after
/// `timeout`.
pub fn wait_state(
    id: JobId,
    what: &str,
    timeout: Duration,
    pred: impl Fn(Option<&str>) -> bool,
) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = state(id);
        if pred(s.as_deref()) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!(
                "job {id} is {s:?} after {timeout:?}, waiting for {what}; qstat -j: {}",
                command("qstat")
                    .args(["-j", &id.to_string()])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the job runs (`r`, or `Rr` after a restart).
pub fn wait_running(id: JobId, timeout: Duration) {
    wait_state(id, "running", timeout, |s| {
        s.is_some_and(|s| s == "r" || s == "Rr")
    });
}

/// One run of a job as `qacct -j` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// `failed`: 0, or Grid Engine's reason number (24 migrating, 25 rescheduling, ...).
    pub failed: u32,
    /// `failed`'s text after the number (e.g. "migrating").
    pub failed_reason: String,
    pub exit_status: i32,
}

/// The accounting records of the job, in order; empty while it has none.
pub fn runs(id: JobId) -> Vec<Run> {
    let out = command("qacct")
        .args(["-j", &id.to_string()])
        .output()
        .expect("cannot run qacct");
    if !out.status.success() {
        return Vec::new();
    }
    parse_qacct(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_qacct(out: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    for block in out.split("==============================================================") {
        let fields: HashMap<&str, &str> = block
            .lines()
            .filter_map(|l| {
                let l = l.trim_end();
                let (k, v) = l.split_once(char::is_whitespace)?;
                Some((k, v.trim()))
            })
            .collect();
        let (Some(failed), Some(exit)) = (fields.get("failed"), fields.get("exit_status")) else {
            continue;
        };
        let (num, reason) = failed
            .split_once(':')
            .map(|(n, r)| (n.trim(), r.trim()))
            .unwrap_or((failed.trim(), ""));
        let exit = exit.split_whitespace().next().unwrap_or_default();
        runs.push(Run {
            failed: num.parse().unwrap_or(u32::MAX),
            failed_reason: reason.to_string(),
            exit_status: exit.parse().unwrap_or(i32::MIN),
        });
    }
    runs
}

/// Waits until the job has left qstat and its last run is in the accounting file (at least
/// `min_runs` runs, the last one not a migration (24) or a reschedule (25)); returns the runs.
pub fn wait_finished(id: JobId, min_runs: usize, timeout: Duration) -> Vec<Run> {
    let deadline = Instant::now() + timeout;
    wait_state(id, "the job to finish", timeout, |s| s.is_none());
    loop {
        let r = runs(id);
        if r.len() >= min_runs && r.last().is_some_and(|x| !matches!(x.failed, 24 | 25)) {
            return r;
        }
        if Instant::now() >= deadline {
            panic!("job {id} finished, but qacct -j has {r:?} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `qmod -sj ID`: suspends the job; a job with the `x` occasion is migrated instead.
pub fn suspend(id: JobId) {
    run("qmod", ["-sj", &id.to_string()]);
}

/// `qmod -f -rj ID`: reschedules the job (killed, queued again; a checkpointing job refuses
/// without `-f`).
pub fn reschedule(id: JobId) {
    run("qmod", ["-f", "-rj", &id.to_string()]);
}

/// `qdel ID`.
pub fn delete(id: JobId) {
    run("qdel", [id.to_string()]);
}

/// Polls until `path` contains `needle`; returns its contents.
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

/// Deletes the job when dropped (a failing test leaves no job behind).
pub struct JobGuard(pub JobId);

impl Drop for JobGuard {
    fn drop(&mut self) {
        let _ = command("qdel").args(["-f", &self.0.to_string()]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qsub_qstat_and_qacct_output() {
        assert_eq!(parse_job_id("42\n"), 42);
        assert_eq!(parse_job_id("43.1-3:1\n"), 43);
        let qstat = "job-ID  prior   name       user         state submit/start at     queue                          slots ja-task-ID \n\
-----------------------------------------------------------------------------------------------------------------\n\
      2 0.50000 job.sh     root         Rq    12/01/2026 23:09:08                                    1        \n\
     12 0.50000 other      root         r     12/01/2026 23:09:08 all.q@vm                           1        \n";
        assert_eq!(parse_qstat_state(qstat, 2).as_deref(), Some("Rq"));
        assert_eq!(parse_qstat_state(qstat, 12).as_deref(), Some("r"));
        assert_eq!(parse_qstat_state(qstat, 1), None);
        let qacct = "==============================================================\n\
qname        all.q               \nfailed       24  : migrating\nexit_status  137                  (Killed)\n\
==============================================================\n\
qname        all.q               \nfailed       0    \nexit_status  5                   \n";
        assert_eq!(
            parse_qacct(qacct),
            vec![
                Run {
                    failed: 24,
                    failed_reason: "migrating".into(),
                    exit_status: 137
                },
                Run {
                    failed: 0,
                    failed_reason: String::new(),
                    exit_status: 5
                }
            ]
        );
    }
}
