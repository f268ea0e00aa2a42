//! A core checkpointer with a command line (BLCR, DMTCP, a site's script, or CRIU itself),
//! configured as argv templates with placeholders (`protocol::placeholders`).
//!
//! ```toml
//! [driver]
//! checkpoint = ["dmtcp_command", "--coord-port", "7779", "--bcheckpoint"]
//! checkpoint_and_stop = ["dmtcp_command", "--coord-port", "7779", "--kcheckpoint"]
//! restore = ["/opt/site/restore-job", "--from", "{IMAGE_DIR}", "--pid-file", "{CHECKPOINT_DIR}/job.pid"]
//! restore_pid_file = "{CHECKPOINT_DIR}/job.pid"
//! check = ["dmtcp_command", "--version"]
//! env = { SITE_JOB = "{GID}" }
//! timeout_secs = 600
//! ```
//!
//! Every template is checked when the driver is built, so a typo stops the CTS at start-up.
//! Commands run without a shell, with stdin from `/dev/null`, in a process group of their own
//! (killed as a whole on timeout). The checkpoint commands run in the image directory and
//! their output (its last 4 KiB per stream) is kept there as `command.log`.
//!
//! Besides the CTS's values (`GID`, `IMAGE_ID`, `CTS_*`, `RESOURCE`, `EXECUTION_MANAGER`,
//! `GCS_URL`, `CHECKPOINT_DIR`), templates get `{PID}` (checkpoint only: the job's root
//! process) and `{IMAGE_DIR}`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gca_protocol::driver_config::CommandConfig;
use gca_protocol::placeholders::{self, Segment, Values};
use tokio::time::Instant;

use crate::runner::{
    describe_status, last_line, read_pid_file, run, said_suffix, shell_words, RunError, RunOutput,
    OUTPUT_TAIL,
};
use crate::{
    live_job, proc, CheckpointOutcome, CheckpointRequest, CoreCheckpointer, DriverError,
    RestoreRequest, Restored,
};

/// The [`CoreCheckpointer`] for [`CommandConfig`].
#[derive(Debug, Clone)]
pub struct CommandDriver {
    cfg: CommandConfig,
}

/// How long a `check` command may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

impl CommandDriver {
    /// Checks every template (known placeholders, balanced braces, no empty program, no
    /// placeholder where it can have no value) and builds the driver.
    pub fn new(cfg: CommandConfig) -> Result<Self, DriverError> {
        let bad = |what: String| DriverError::unavailable(format!("command driver: {what}"));
        check_argv("checkpoint", &cfg.checkpoint, &[]).map_err(bad)?;
        if let Some(argv) = &cfg.checkpoint_and_stop {
            check_argv("checkpoint_and_stop", argv, &[]).map_err(bad)?;
        }
        let restore_only = &[(
            "PID",
            "the job does not run yet when it is restored; the restore command reports its PID \
             through restore_pid_file",
        )];
        match (&cfg.restore, &cfg.restore_pid_file) {
            (Some(argv), Some(pid_file)) => {
                check_argv("restore", argv, restore_only).map_err(bad)?;
                check_template("restore_pid_file", pid_file, restore_only).map_err(bad)?;
            }
            (Some(_), None) => {
                return Err(bad(
                    "`restore` needs `restore_pid_file`: the file the restore command writes \
                     the restored job's PID into"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad("`restore_pid_file` is set but `restore` is not".into()))
            }
            (None, None) => {}
        }
        if let Some(argv) = &cfg.check {
            check_argv("check", argv, &[]).map_err(bad)?;
            for (i, arg) in argv.iter().enumerate() {
                if has_placeholders(arg) {
                    return Err(bad(format!(
                        "check[{i}] = {arg:?}: the check command runs at start-up, when no \
                         placeholder has a value; use literal arguments"
                    )));
                }
            }
        }
        for (name, value) in &cfg.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(bad(format!("env: {name:?} is not a valid variable name")));
            }
            check_template(&format!("env.{name}"), value, &[]).map_err(bad)?;
        }
        if cfg.timeout_secs == Some(0) {
            return Err(bad("timeout_secs must be at least 1".into()));
        }
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &CommandConfig {
        &self.cfg
    }

    fn bound(&self, timeout: Duration) -> Duration {
        match self.cfg.timeout_secs {
            Some(s) => timeout.min(Duration::from_secs(s)),
            None => timeout,
        }
    }

    /// Builds the command for `argv` with `values`; `name` names the template in errors.
    fn command(
        &self,
        name: &str,
        argv: &[String],
        values: &Values,
    ) -> Result<(Vec<String>, tokio::process::Command), DriverError> {
        let expanded = placeholders::expand_all(argv, values).map_err(|e| {
            DriverError::unavailable(format!("command driver: cannot expand {name}: {e}"))
        })?;
        let mut cmd = tokio::process::Command::new(&expanded[0]);
        cmd.args(&expanded[1..]);
        for (k, v) in &self.cfg.env {
            let v = placeholders::expand(v, values).map_err(|e| {
                DriverError::unavailable(format!("command driver: cannot expand env.{k}: {e}"))
            })?;
            cmd.env(k, v);
        }
        Ok((expanded, cmd))
    }
}

/// Checks one argv template; `forbidden` lists placeholders that can have no value there.
fn check_argv(name: &str, argv: &[String], forbidden: &[(&str, &str)]) -> Result<(), String> {
    match argv.first() {
        None => {
            return Err(format!(
                "`{name}` is empty: give the program and its arguments"
            ))
        }
        Some(p) if p.trim().is_empty() => return Err(format!("{name}[0] (the program) is empty")),
        Some(_) => {}
    }
    for (i, arg) in argv.iter().enumerate() {
        check_template(&format!("{name}[{i}]"), arg, forbidden)?;
    }
    Ok(())
}

fn check_template(name: &str, template: &str, forbidden: &[(&str, &str)]) -> Result<(), String> {
    let segments =
        placeholders::parse(template).map_err(|e| format!("{name} = {template:?}: {e}"))?;
    for seg in segments {
        if let Segment::Placeholder(p) = seg {
            if let Some((_, why)) = forbidden.iter().find(|(f, _)| *f == p) {
                return Err(format!(
                    "{name} = {template:?}: {{{p}}} cannot be used here: {why}"
                ));
            }
        }
    }
    Ok(())
}

/// Where `program` would be run from: itself when it has a slash, else the first match on
/// PATH; `None` when that is not an executable file.
fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}

fn has_placeholders(template: &str) -> bool {
    placeholders::parse(template)
        .map(|s| s.iter().any(|s| matches!(s, Segment::Placeholder(_))))
        .unwrap_or(false)
}

#[async_trait::async_trait]
impl CoreCheckpointer for CommandDriver {
    fn kind(&self) -> &'static str {
        "command"
    }

    async fn self_check(&self) -> Result<String, DriverError> {
        let program = &self.cfg.checkpoint[0];
        let templates = [
            ("checkpoint", Some(&self.cfg.checkpoint)),
            ("checkpoint_and_stop", self.cfg.checkpoint_and_stop.as_ref()),
            ("restore", self.cfg.restore.as_ref()),
            ("check", self.cfg.check.as_ref()),
        ];
        for (name, argv) in templates {
            let Some(p) = argv.and_then(|a| a.first()) else {
                continue;
            };
            if !has_placeholders(p) && find_program(p).is_none() {
                return Err(DriverError::unavailable(format!(
                    "command driver: the {name} program {p:?} is not an executable file{}",
                    if p.contains('/') { "" } else { " on PATH" }
                )));
            }
        }
        let Some(argv) = &self.cfg.check else {
            return Ok(format!(
                "command driver ({program}; no check command configured)"
            ));
        };
        let (expanded, cmd) = self.command("check", argv, &Values::new())?;
        let shown = shell_words(&expanded);
        match run(cmd, self.bound(CHECK_TIMEOUT), true).await {
            Ok(out) if out.status.success() => {
                let said = last_line(&out.stdout).or_else(|| last_line(&out.stderr));
                Ok(match said {
                    Some(l) => format!("command driver ({program}); `{shown}`: {l}"),
                    None => format!("command driver ({program}); `{shown}` passed"),
                })
            }
            Ok(out) => Err(DriverError::unavailable(format!(
                "the check command `{shown}` failed ({}){}",
                describe_status(out.status),
                said_suffix(&out)
            ))),
            Err(RunError::Spawn(e)) => Err(DriverError::unavailable(format!(
                "cannot run the check command `{shown}`: {e}"
            ))),
            Err(RunError::Timeout(out)) => Err(DriverError::unavailable(format!(
                "the check command `{shown}` did not finish within {}s{}",
                self.bound(CHECK_TIMEOUT).as_secs(),
                said_suffix(&out)
            ))),
        }
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
        let (name, argv, stops) = match (&self.cfg.checkpoint_and_stop, req.leave_running) {
            (Some(argv), false) => ("checkpoint_and_stop", argv, true),
            _ => ("checkpoint", &self.cfg.checkpoint, false),
        };
        let values = req
            .values
            .clone()
            .set("PID", job.pid.to_string())
            .set("IMAGE_DIR", req.image_dir.to_string_lossy());
        let values = fill_missing(
            values,
            &[
                ("GID", job.gid.clone()),
                ("IMAGE_ID", req.image_id.to_string()),
                (
                    "CHECKPOINT_DIR",
                    job.checkpoint_dir.to_string_lossy().into_owned(),
                ),
            ],
        );
        let (expanded, mut cmd) = self.command(name, argv, &values)?;
        cmd.current_dir(req.image_dir);
        let shown = shell_words(&expanded);
        let timeout = self.bound(req.timeout);
        tracing::info!(job.gid = %job.gid, job.pid = job.pid, command = %shown, "running the checkpoint command");
        let result = run(cmd, timeout, true).await;
        save_command_log(&req.image_dir.join("command.log"), &shown, &result);
        let out = match result {
            Ok(out) => out,
            Err(RunError::Spawn(e)) => {
                return Err(DriverError::unavailable(format!(
                    "cannot run the {name} command `{shown}`: {e}"
                )))
            }
            Err(RunError::Timeout(out)) => {
                return Err(DriverError::timeout(format!(
                    "the {name} command for job {} (pid {}) did not finish within {}s and was \
                     killed{}",
                    job.gid,
                    job.pid,
                    timeout.as_secs_f32(),
                    said_suffix(&out)
                )))
            }
        };
        if !out.status.success() {
            let msg = format!(
                "the {name} command for job {} (pid {}) failed ({}){}",
                job.gid,
                job.pid,
                describe_status(out.status),
                said_suffix(&out)
            );
            if live_job(job).is_none() {
                return Err(DriverError::job_gone(format!(
                    "{msg}; the job's process is gone"
                )));
            }
            return Err(DriverError::failed(msg));
        }
        if !stops {
            return Ok(CheckpointOutcome { stopped: false });
        }
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if proc::wait_gone(job.pid, st.start_time, left).await {
            Ok(CheckpointOutcome { stopped: true })
        } else {
            tracing::warn!(job.gid = %job.gid, job.pid = job.pid,
                "the checkpoint_and_stop command succeeded but the job still runs; the CTS stops it");
            Ok(CheckpointOutcome { stopped: false })
        }
    }

    async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, DriverError> {
        let (Some(argv), Some(pid_file)) = (&self.cfg.restore, &self.cfg.restore_pid_file) else {
            return Err(DriverError::unavailable(
                "this command driver has no `restore` command configured",
            ));
        };
        let values = req
            .values
            .clone()
            .set("IMAGE_DIR", req.image_dir.to_string_lossy());
        let values = fill_missing(
            values,
            &[
                ("GID", req.gid.to_string()),
                (
                    "CHECKPOINT_DIR",
                    req.checkpoint_dir.to_string_lossy().into_owned(),
                ),
            ],
        );
        let pid_file = placeholders::expand(pid_file, &values).map_err(|e| {
            DriverError::unavailable(format!(
                "command driver: cannot expand restore_pid_file: {e}"
            ))
        })?;
        let pid_file = PathBuf::from(pid_file);
        // A PID file left from an earlier restore must not be mistaken for this one's.
        match std::fs::remove_file(&pid_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::failed(format!(
                    "cannot remove the old PID file {}: {e}",
                    pid_file.display()
                )))
            }
        }
        let (expanded, cmd) = self.command("restore", argv, &values)?;
        let shown = shell_words(&expanded);
        let timeout = self.bound(req.timeout);
        tracing::info!(job.gid = %req.gid, command = %shown, "running the restore command");
        let out = match run(cmd, timeout, true).await {
            Ok(out) => out,
            Err(RunError::Spawn(e)) => {
                return Err(DriverError::unavailable(format!(
                    "cannot run the restore command `{shown}`: {e}"
                )))
            }
            Err(RunError::Timeout(out)) => {
                return Err(DriverError::timeout(format!(
                    "the restore command for job {} did not finish within {}s and was killed{}",
                    req.gid,
                    timeout.as_secs_f32(),
                    said_suffix(&out)
                )))
            }
        };
        if !out.status.success() {
            return Err(DriverError::failed(format!(
                "the restore command for job {} failed ({}){}",
                req.gid,
                describe_status(out.status),
                said_suffix(&out)
            )));
        }
        let pid = read_pid_file(&pid_file).map_err(|e| {
            DriverError::failed(format!(
                "the restore command for job {} succeeded but {e}",
                req.gid
            ))
        })?;
        match proc::stat(pid) {
            Some(s) if s.state != 'Z' && s.state != 'X' => Ok(Restored::Running { pid }),
            _ => Err(DriverError::failed(format!(
                "the restore command for job {} reported PID {pid} (in {}), but no such process \
                 runs",
                req.gid,
                pid_file.display()
            ))),
        }
    }
}

fn fill_missing(mut values: Values, defaults: &[(&str, String)]) -> Values {
    for (name, value) in defaults {
        if values.get(name).is_none() {
            values = values.set(name, value.clone());
        }
    }
    values
}

fn save_command_log(path: &Path, shown: &str, result: &Result<RunOutput, RunError>) {
    let mut log = format!("$ {shown}\n");
    let (how, stdout, stderr) = match result {
        Ok(o) => (
            describe_status(o.status),
            o.stdout.as_str(),
            o.stderr.as_str(),
        ),
        Err(RunError::Spawn(e)) => (format!("could not start: {e}"), "", ""),
        Err(RunError::Timeout(p)) => (
            "timed out and killed".to_string(),
            p.stdout.as_str(),
            p.stderr.as_str(),
        ),
    };
    let _ = writeln!(log, "# {how}");
    let _ = write!(log, "--- stdout (last {OUTPUT_TAIL} bytes) ---\n{stdout}");
    if !stdout.is_empty() && !stdout.ends_with('\n') {
        log.push('\n');
    }
    let _ = write!(log, "--- stderr (last {OUTPUT_TAIL} bytes) ---\n{stderr}");
    if !stderr.is_empty() && !stderr.ends_with('\n') {
        log.push('\n');
    }
    if let Err(e) = std::fs::write(path, log) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write command.log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use crate::JobHandle;
    use gca_protocol::FaultKind;
    use std::collections::BTreeMap;

    const T: Duration = Duration::from_secs(8);

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn config(checkpoint: &[&str]) -> CommandConfig {
        CommandConfig {
            checkpoint: argv(checkpoint),
            checkpoint_and_stop: None,
            restore: None,
            restore_pid_file: None,
            check: None,
            env: BTreeMap::new(),
            timeout_secs: None,
        }
    }

    /// This test process stands in for a job where no real checkpoint is taken.
    fn this_process(dir: &Path) -> JobHandle {
        let pid = std::process::id() as i32;
        JobHandle {
            gid: "job-self".into(),
            pid,
            pidfd: proc::pidfd(pid).map(std::sync::Arc::new),
            checkpoint_dir: dir.to_path_buf(),
            cgroup: None,
        }
    }

    fn err(cfg: CommandConfig) -> String {
        CommandDriver::new(cfg).unwrap_err().message
    }

    #[test]
    fn templates_are_checked_at_construction() {
        let e = err(config(&[
            "criu",
            "dump",
            "-t",
            "{PID}",
            "-D",
            "{IMAGE_DIRR}",
        ]));
        assert!(
            e.contains("checkpoint[5]") && e.contains("unknown placeholder {IMAGE_DIRR}"),
            "{e}"
        );
        let e = err(CommandConfig {
            checkpoint_and_stop: Some(argv(&["stop", "{GID"])),
            ..config(&["ck"])
        });
        assert!(
            e.contains("checkpoint_and_stop[1]") && e.contains("unclosed"),
            "{e}"
        );
        let e = err(config(&[]));
        assert!(e.contains("`checkpoint` is empty"), "{e}");
        let e = err(CommandConfig {
            restore: Some(argv(&["restore", "{IMAGE_DIR}"])),
            ..config(&["ck"])
        });
        assert!(e.contains("needs `restore_pid_file`"), "{e}");
        let e = err(CommandConfig {
            restore: Some(argv(&["restore", "--pid={PID}"])),
            restore_pid_file: Some("{CHECKPOINT_DIR}/pid".into()),
            ..config(&["ck"])
        });
        assert!(
            e.contains("restore[1]") && e.contains("{PID} cannot be used here"),
            "{e}"
        );
        let e = err(CommandConfig {
            check: Some(argv(&["check", "{GID}"])),
            ..config(&["ck"])
        });
        assert!(
            e.contains("check[1]") && e.contains("no placeholder has a value"),
            "{e}"
        );
        let e = err(CommandConfig {
            env: [("JOB".to_string(), "{NOPE}".to_string())].into(),
            ..config(&["ck"])
        });
        assert!(e.contains("env.JOB") && e.contains("{NOPE}"), "{e}");
        // Literal braces are fine.
        CommandDriver::new(config(&["sh", "-c", "echo {{}}", "{GID}", "{IMAGE_ID}"])).unwrap();

        let cfg: CommandConfig = toml::from_str(
            "checkpoint = [\"ck\", \"{PID}\"]\nrestore = [\"rs\"]\nrestore_pid_file = \"/p\"\n\
             env = { A = \"{GID}\" }\ntimeout_secs = 5",
        )
        .unwrap();
        assert_eq!(cfg.timeout_secs, Some(5));
        CommandDriver::new(cfg).unwrap();
        let e =
            toml::from_str::<CommandConfig>("checkpoint = [\"x\"]\nrestor = [\"y\"]").unwrap_err();
        assert!(e.to_string().contains("restor"), "{e}");
    }

    #[tokio::test]
    async fn expands_placeholders_and_keeps_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::create_dir(&img).unwrap();
        let mut cfg = config(&[
            "sh",
            "-c",
            r#"echo "$0 $1 $2" > out; echo "env $GCA_T"; echo warn >&2"#,
            "{PID}",
            "{GID}",
            "{IMAGE_DIR}",
        ]);
        cfg.env
            .insert("GCA_T".into(), "{IMAGE_ID}@{RESOURCE}".into());
        let d = CommandDriver::new(cfg).unwrap();
        let job = this_process(dir.path());
        let values = Values::new().set("RESOURCE", "node-7");
        let out = d
            .checkpoint(CheckpointRequest {
                job: &job,
                image_id: "ck-1",
                image_dir: &img,
                leave_running: false,
                values: &values,
                timeout: T,
            })
            .await
            .unwrap();
        // No checkpoint_and_stop: the CTS stops the job.
        assert_eq!(out, CheckpointOutcome { stopped: false });
        let written = std::fs::read_to_string(img.join("out")).unwrap();
        assert_eq!(
            written.trim(),
            format!("{} job-self {}", job.pid, img.display())
        );
        let log = std::fs::read_to_string(img.join("command.log")).unwrap();
        assert!(log.starts_with("$ sh -c "), "{log}");
        assert!(log.contains("# exit status 0"), "{log}");
        assert!(
            log.contains("env ck-1@node-7") && log.contains("warn"),
            "{log}"
        );

        let said = CommandDriver::new(CommandConfig {
            check: Some(argv(&["sh", "-c", "echo checker 1.2"])),
            ..config(&["true"])
        })
        .unwrap()
        .self_check()
        .await
        .unwrap();
        assert!(said.contains("checker 1.2"), "{said}");
        let e = CommandDriver::new(CommandConfig {
            check: Some(argv(&["sh", "-c", "echo 'no licence' >&2; exit 4"])),
            ..config(&["true"])
        })
        .unwrap()
        .self_check()
        .await
        .unwrap_err();
        assert_eq!(e.code, "checkpointer-unavailable");
        assert!(
            e.message.contains("exit status 4") && e.message.contains("no licence"),
            "{e}"
        );
        let e = CommandDriver::new(CommandConfig {
            checkpoint_and_stop: Some(argv(&["dmtcp_comand", "-kc"])),
            ..config(&["sh"])
        })
        .unwrap()
        .self_check()
        .await
        .unwrap_err();
        assert!(
            e.message
                .contains("checkpoint_and_stop program \"dmtcp_comand\"")
                && e.message.contains("on PATH"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn failures_timeouts_and_gone_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let job = this_process(dir.path());
        let values = Values::new();
        let req = |img: &'static str, timeout| {
            let p = dir.path().join(img);
            std::fs::create_dir_all(&p).unwrap();
            (p, timeout)
        };

        // A failing command: its status and the last lines of its stderr.
        let (img, timeout) = req("fail", T);
        let d = CommandDriver::new(config(&[
            "sh",
            "-c",
            "echo starting; echo 'line 1' >&2; echo 'No space left on device' >&2; exit 3",
        ]))
        .unwrap();
        let e = d
            .checkpoint(CheckpointRequest {
                job: &job,
                image_id: "x",
                image_dir: &img,
                leave_running: true,
                values: &values,
                timeout,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind, e.code),
            (FaultKind::OperationFailed, "checkpointer-failed")
        );
        assert!(
            e.message.contains("failed (exit status 3)")
                && e.message.ends_with("line 1 | No space left on device"),
            "{e}"
        );
        let log = std::fs::read_to_string(img.join("command.log")).unwrap();
        assert!(
            log.contains("# exit status 3") && log.contains("starting"),
            "{log}"
        );

        // A command that hangs is killed with everything it started.
        let (img, timeout) = req("slow", Duration::from_millis(400));
        let d = CommandDriver::new(config(&[
            "sh",
            "-c",
            r#"sleep 30 & echo $! > bg.pid; echo waiting; wait"#,
        ]))
        .unwrap();
        let started = Instant::now();
        let e = d
            .checkpoint(CheckpointRequest {
                job: &job,
                image_id: "x",
                image_dir: &img,
                leave_running: true,
                values: &values,
                timeout,
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(e.code, "checkpointer-timeout");
        assert!(
            e.message.contains("within 0.4s") && e.message.contains("waiting"),
            "{e}"
        );
        let bg = read_pid_file(&img.join("bg.pid")).unwrap();
        let gone = async {
            while proc::stat(bg).is_some_and(|s| s.state != 'Z') {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), gone)
            .await
            .expect("the command's background process was killed too");

        // A command that leaves a process holding its output does not hang the driver.
        let (img, timeout) = req("bg", T);
        let d = CommandDriver::new(config(&[
            "sh",
            "-c",
            r#"sleep 5 & echo $! > bg.pid; echo done"#,
        ]))
        .unwrap();
        let started = Instant::now();
        d.checkpoint(CheckpointRequest {
            job: &job,
            image_id: "x",
            image_dir: &img,
            leave_running: true,
            values: &values,
            timeout,
        })
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        let bg = read_pid_file(&img.join("bg.pid")).unwrap();
        if let Some(p) = rustix::process::Pid::from_raw(bg) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        assert!(std::fs::read_to_string(img.join("command.log"))
            .unwrap()
            .contains("done"));

        // A job that is gone; a missing program.
        let gone = JobHandle {
            pid: i32::MAX - 7,
            ..job.clone()
        };
        let (img, timeout) = req("gone", T);
        let e = d
            .checkpoint(CheckpointRequest {
                job: &gone,
                image_id: "x",
                image_dir: &img,
                leave_running: true,
                values: &values,
                timeout,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, "job-gone");
        let e = CommandDriver::new(config(&["/nonexistent/checkpointer"]))
            .unwrap()
            .checkpoint(CheckpointRequest {
                job: &job,
                image_id: "x",
                image_dir: &img,
                leave_running: true,
                values: &values,
                timeout,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, "checkpointer-unavailable");
        assert!(e.message.contains("/nonexistent/checkpointer"), "{e}");
    }

    /// The command driver configured over CRIU's command line, end to end.
    #[tokio::test]
    async fn drives_criu_through_templates() {
        let criu = criu_path().to_string_lossy().into_owned();
        let dump = |extra: &[&str]| {
            let mut a = argv(&[&criu, "dump", "-t", "{PID}", "-D", "{IMAGE_DIR}"]);
            a.extend(argv(&["-o", "dump.log", "-v4"]));
            a.extend(argv(extra));
            a
        };
        let d = CommandDriver::new(CommandConfig {
            checkpoint: dump(&["--leave-running"]),
            checkpoint_and_stop: Some(dump(&[])),
            restore: Some(argv(&[
                &criu,
                "restore",
                "-D",
                "{IMAGE_DIR}",
                "-W",
                "{CHECKPOINT_DIR}",
                "-d",
                "--restore-sibling",
                "--pidfile",
                "{CHECKPOINT_DIR}/restore.pid",
            ])),
            restore_pid_file: Some("{CHECKPOINT_DIR}/restore.pid".into()),
            check: Some(argv(&[&criu, "check"])),
            env: BTreeMap::new(),
            timeout_secs: Some(20),
        })
        .unwrap();
        let said = d.self_check().await.unwrap();
        assert!(said.contains("Looks good"), "{said}");

        let mut job = TestJob::start().await;
        let handle = job.handle("job-cmd-1");
        let values = Values::new().set("GID", "job-cmd-1");

        let img1 = job.new_dir("img1");
        let out = d
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
        for f in ["pstree.img", "inventory.img", "dump.log", "command.log"] {
            assert!(img1.join(f).is_file(), "{f}");
        }
        let n = job.last();
        job.wait_count(n + 3).await;

        let img2 = job.new_dir("img2");
        let out = d
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
        let before = job.values();
        let last = *before.last().unwrap();
        job.reap();
        // Unlike the CRIU driver, the command driver does not know the image's PIDs: wait
        // until the job's children (reaped by init) are gone too.
        for pid in crate::criu::image_pids(&img2).unwrap() {
            assert!(proc::wait_pid_free(pid, Duration::from_secs(5)).await);
        }

        let restored = d
            .restore(RestoreRequest {
                gid: "job-cmd-1",
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
        // Restoring again while it runs: CRIU's own error (it logs to stderr without -o)
        // comes through.
        let e = d
            .restore(RestoreRequest {
                gid: "job-cmd-1",
                image_dir: &img2,
                checkpoint_dir: &handle.checkpoint_dir,
                values: &values,
                timeout: T,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, "checkpointer-failed");
        assert!(
            e.message.contains("failed (exit status 1)")
                && e.message
                    .contains(&format!("Can't fork for {}: File exists", job.pid)),
            "{e}"
        );
        job.kill_and_reap();
    }
}
