//! Command lines of both wrappers (clap derive) and the parsing rule: usage errors exit 64.

use std::ffi::OsString;

use clap::Parser;
use gca_protocol::messages::Retention;

use crate::cts_target::CtsTarget;
use crate::exit;

/// gca-exec: the execute-job-wrapper (GCA paper 3.4.1).
///
/// Registers GID <-> its own PID at the CTS of this resource, then executes the job in its
/// place, so the job keeps the PID the resource manager and the CTS know. The job runs with
/// the environment the CTS type asks for, plus GCA_CHECKPOINT_DIR.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gca-exec",
    version,
    after_help = "Exit codes: the job's own once it runs (gca-exec becomes the job; with --recover-if-checkpointed a recovered job's wrapper ends like it). Before:\n   64  usage\n   65  registration refused, or (recovering) no checkpoint usable (permanent)\n   70  internal failure\n   72  (recovering) the resource lacks something the job needs\n   75  CTS or GCS unreachable (temporary; or use --run-uncheckpointable)\n  126  the job program is not executable\n  127  the job program was not found"
)]
pub struct ExecArgs {
    /// The job's global identifier (GID), assigned by the broker.
    #[arg(long)]
    pub gid: String,
    /// The CTS of this resource: its URL, its SOAP endpoint, or unix:/path/to/cts.sock.
    #[arg(long, value_parser = CtsTarget::parse)]
    pub cts: CtsTarget,
    /// Checkpoint the job periodically, every SECS seconds (CTS types with internal
    /// checkpoints).
    #[arg(long, value_name = "SECS")]
    pub periodic: Option<u64>,
    /// When the job cannot be registered, run it anyway, uncheckpointable, with a warning
    /// (default: refuse to run it).
    #[arg(long)]
    pub run_uncheckpointable: bool,
    /// Stay in the caller's session. By default gca-exec starts a new session (setsid) so
    /// that the job is the leader of its own, as system-level checkpointers like CRIU need
    /// (otherwise the CTS must dump with `shell_job = true`). Note that a new session has no
    /// controlling terminal.
    #[arg(long)]
    pub keep_session: bool,
    /// The self-recovering mode, for resource managers that requeue or restart jobs: if the
    /// GCS has a checkpoint of GID whose image this user can recover, recover the job from
    /// the latest usable one (as gca-recover does: stay resident, forward signals, end like
    /// the job; an image that turns out corrupt or gone is skipped for the one before it);
    /// if the GID is new, execute the job; if the GID is known but was never checkpointed,
    /// execute it again from the beginning. The same command line serves the first start
    /// and every restart.
    #[arg(long)]
    pub recover_if_checkpointed: bool,
    /// With --recover-if-checkpointed: bound on a restore, in seconds (as gca-recover
    /// --timeout).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 120,
        requires = "recover_if_checkpointed"
    )]
    pub restore_timeout: u64,
    /// The job and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "JOB")]
    pub job: Vec<OsString>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Limit the job's memory (its cgroup's memory.max), in bytes; at most what the CTS
    /// type allows. Kept in its checkpoints: a recovery restores it with the job.
    #[arg(long, value_name = "BYTES")]
    pub memory_max: Option<u64>,
    /// Limit the job's CPU (its cgroup's cpu.max), in percent of one CPU; at most what the
    /// CTS type allows.
    #[arg(long, value_name = "PERCENT")]
    pub cpu_max: Option<u32>,
}

impl ExecArgs {
    /// The cgroup limits asked for, if any.
    pub fn limits(&self) -> Option<gca_protocol::isolation::JobLimits> {
        (self.memory_max.is_some() || self.cpu_max.is_some()).then_some(
            gca_protocol::isolation::JobLimits {
                memory_max_bytes: self.memory_max,
                cpu_max_percent: self.cpu_max,
            },
        )
    }

    /// The gca-recover command line the self-recovering mode recovers with.
    pub fn recover_args(&self) -> RecoverArgs {
        RecoverArgs {
            gid: self.gid.clone(),
            image: gca_protocol::messages::LATEST.to_string(),
            cts: self.cts.clone(),
            periodic: self.periodic,
            timeout: self.restore_timeout,
            job: self.job.clone(),
            output: None,
            retention: self.retention.clone(),
        }
    }
}

/// gca-checkpoint: a job's owner checkpoints their own job through the CTS of this resource
/// (e.g. from a job script before the resource manager's time limit, or a Grid Engine
/// checkpointing environment), with no certificate: the CTS knows the caller by the local
/// socket and checkpoints only the caller's own jobs (root: any). Prints the checkpoint's ID
/// and sequence number.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gca-checkpoint",
    version,
    after_help = "Exit codes: 0 checkpointed; 64 usage; 65 refused (not your job, unknown GID, busy); 75 the CTS is unreachable"
)]
pub struct CheckpointArgs {
    /// The job's global identifier (GID).
    #[arg(long)]
    pub gid: String,
    /// The CTS of this resource: its URL, its SOAP endpoint, or unix:/path/to/cts.sock.
    #[arg(long, value_parser = CtsTarget::parse)]
    pub cts: CtsTarget,
    /// Stop the job after the checkpoint (it is to be recovered elsewhere).
    #[arg(long)]
    pub stop: bool,
}

/// gca-recover: the recovery-job-wrapper (GCA paper 3.4.2, 5.3).
///
/// Finds the job's checkpoint through the GCS, gets the image into this resource's CTS store
/// (fetched from the CTS that took it, checked against the digest the GCS recorded), moves
/// the job's routing to this CTS, restores the job as its own child and stays resident:
/// signals it receives go on to the job, and it ends the way the job ends.
#[derive(Debug, Clone, Parser)]
#[command(name = "gca-recover", version, after_help = exit::HELP_TABLE)]
pub struct RecoverArgs {
    /// The job's global identifier (GID).
    #[arg(long)]
    pub gid: String,
    /// The checkpoint (image) ID to recover from, or `latest`.
    #[arg(long, value_name = "ID|latest")]
    pub image: String,
    /// The CTS of this resource: its URL, its SOAP endpoint, or unix:/path/to/cts.sock.
    #[arg(long, value_parser = CtsTarget::parse)]
    pub cts: CtsTarget,
    /// Checkpoint the recovered job periodically, every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub periodic: Option<u64>,
    /// Bound on the restore, in seconds (CRIU waits up to half of it for the job's PID to be
    /// free).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// The job and its arguments, after `--` (started by the wrapper for application-level
    /// types, with the type's recovery job parameters appended; ignored when the core
    /// checkpointer restores the process itself).
    #[arg(last = true, value_name = "JOB")]
    pub job: Vec<OsString>,
    /// A VMM type (the vmm-ready-job-resumer): where the job's directory comes back when the
    /// job ends (unpacked from the guest). Without it the files are not kept.
    #[arg(long, value_name = "DIR")]
    pub output: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// gca-vmm-exec: the execute wrapper of a VMM CTS type (the paper's vmm-ready-job-executor).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gca-vmm-exec",
    version,
    after_help = "Runs JOB in a virtual machine of the CTS's type, in a directory made of --input DIR's files; the directory comes back into --output DIR when the job ends. Exit codes: the job's own once it ran. Before: 64 usage, 65 registration refused, 70 internal, 72 the VM could not be started, 75 the CTS or GCS unreachable, or the VM ended without the job's status (stopped for migration: recover it)"
)]
pub struct VmmExecArgs {
    /// The job's grid ID.
    #[arg(long)]
    pub gid: String,
    /// The CTS of this resource (a VMM type): `unix:PATH` or its https URL.
    #[arg(long, value_parser = CtsTarget::parse)]
    pub cts: CtsTarget,
    /// Ask the CTS for a checkpoint every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub periodic: Option<u64>,
    /// The files the job starts with (copied into its directory in the guest).
    #[arg(long, value_name = "DIR")]
    pub input: Option<std::path::PathBuf>,
    /// Where the job's directory comes back when the job ends.
    #[arg(long, value_name = "DIR")]
    pub output: Option<std::path::PathBuf>,
    /// The job: a program of the guest and its arguments, run in its directory.
    #[arg(last = true, required = true, value_name = "JOB")]
    pub job: Vec<OsString>,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// The job owner's retention policy: what is kept of the job's checkpoint images when it
/// ends, and where. Without these flags gca-exec registers no policy (the GCS's default:
/// every image is deleted when the job ends) and gca-recover leaves the job's policy as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
#[command(next_help_heading = "Retention of checkpoint images (when the job ends)")]
pub struct RetentionArgs {
    /// Keep the job's last N checkpoint images when it ends, in --keep-in DIR. Without
    /// --keep-last or --keep-all, gca-exec lets the images be deleted when the job ends and
    /// gca-recover leaves the job's policy as it was.
    #[arg(long, value_name = "N", conflicts_with = "keep_all")]
    pub keep_last: Option<u32>,
    /// Keep all of the job's checkpoint images when it ends, in --keep-in DIR.
    #[arg(long)]
    pub keep_all: bool,
    /// The directory the kept images are moved to: an absolute path on the resource that
    /// holds the images (usually a shared file system). It must exist and belong to you
    /// when the job ends; each image becomes DIR/<image ID>.
    #[arg(long, value_name = "DIR")]
    pub keep_in: Option<String>,
}

impl RetentionArgs {
    /// The policy these flags ask for (`None`: no flag given), checked with
    /// [`Retention::validate`]; the message says what to change on the command line.
    pub fn retention(&self) -> Result<Option<Retention>, String> {
        let r = match (self.keep_last, self.keep_all, &self.keep_in) {
            (None, false, None) => return Ok(None),
            (Some(n), _, Some(dir)) => Retention::last(n, dir.clone()),
            (None, true, Some(dir)) => Retention::all(dir.clone()),
            (None, false, Some(_)) => {
                return Err(
                    "--keep-in DIR needs --keep-last N or --keep-all (which images to keep)".into(),
                )
            }
            (_, _, None) => {
                return Err(format!(
                    "{} needs --keep-in DIR, the directory to keep the images in",
                    if self.keep_all {
                        "--keep-all"
                    } else {
                        "--keep-last"
                    }
                ))
            }
        };
        r.validate().map_err(|m| {
            format!("invalid retention policy (--keep-last N | --keep-all, --keep-in DIR): {m}")
        })?;
        Ok(Some(r))
    }
}

/// Parses a wrapper's command line: `--help`/`--version` print and exit 0, anything wrong
/// prints clap's message and exits 64 (EX_USAGE).
pub fn parse<T: Parser>(args: impl IntoIterator<Item = OsString>) -> T {
    match T::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn exec_takes_the_job_after_the_separator() {
        let a = ExecArgs::try_parse_from(os(&[
            "gca-exec", "--gid", "g1", "--cts", "unix:/s", "--", "bash", "-c", "x",
        ]))
        .unwrap();
        assert_eq!(a.gid, "g1");
        assert_eq!(a.job, os(&["bash", "-c", "x"]));
        assert!(!a.run_uncheckpointable);
        assert!(
            ExecArgs::try_parse_from(os(&["gca-exec", "--gid", "g", "--cts", "unix:/s"])).is_err()
        );
    }

    fn exec_with(flags: &[&str]) -> Result<ExecArgs, clap::Error> {
        let mut v = vec!["gca-exec", "--gid", "g", "--cts", "unix:/s"];
        v.extend_from_slice(flags);
        v.extend_from_slice(&["--", "true"]);
        ExecArgs::try_parse_from(os(&v))
    }

    #[test]
    fn retention_flags_make_a_valid_policy_or_a_usage_error() {
        let policy = |flags: &[&str]| exec_with(flags).unwrap().retention.retention();
        assert_eq!(policy(&[]), Ok(None));
        assert_eq!(
            policy(&["--keep-last", "2", "--keep-in", "/home/alice/ckpt"]),
            Ok(Some(Retention::last(2, "/home/alice/ckpt")))
        );
        assert_eq!(
            policy(&["--keep-all", "--keep-in", "/scratch/alice/"]),
            Ok(Some(Retention::all("/scratch/alice/")))
        );
        for (flags, want) in [
            (
                &["--keep-in", "/d"][..],
                "--keep-in DIR needs --keep-last N or --keep-all",
            ),
            (&["--keep-last", "2"][..], "--keep-last needs --keep-in DIR"),
            (&["--keep-all"][..], "--keep-all needs --keep-in DIR"),
            (
                &["--keep-last", "0", "--keep-in", "/d"][..],
                "KeepLast must be between 1 and",
            ),
            (&["--keep-all", "--keep-in", "rel/dir"][..], "absolute path"),
            (&["--keep-all", "--keep-in", "/a/../b"][..], "normalized"),
        ] {
            let e = policy(flags).unwrap_err();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
        // Contradictory or malformed flags are clap's usage errors.
        assert!(exec_with(&["--keep-last", "2", "--keep-all", "--keep-in", "/d"]).is_err());
        assert!(exec_with(&["--keep-last", "two", "--keep-in", "/d"]).is_err());
        assert!(exec_with(&["--keep-last", "-1", "--keep-in", "/d"]).is_err());

        // gca-recover takes the same flags.
        let a = RecoverArgs::try_parse_from(os(&[
            "gca-recover",
            "--gid",
            "g",
            "--image",
            "latest",
            "--cts",
            "unix:/s",
            "--keep-all",
            "--keep-in",
            "/d",
        ]))
        .unwrap();
        assert_eq!(a.retention.retention(), Ok(Some(Retention::all("/d"))));
    }

    #[test]
    fn the_self_recovering_mode_recovers_with_the_execute_command_line() {
        let a = exec_with(&[
            "--recover-if-checkpointed",
            "--restore-timeout",
            "30",
            "--periodic",
            "600",
        ])
        .unwrap();
        assert!(a.recover_if_checkpointed);
        let r = a.recover_args();
        assert_eq!((r.gid.as_str(), r.image.as_str()), ("g", "latest"));
        assert_eq!((r.timeout, r.periodic), (30, Some(600)));
        assert_eq!(r.job, os(&["true"]));
        assert_eq!(exec_with(&[]).unwrap().restore_timeout, 120);
        assert!(
            exec_with(&["--restore-timeout", "30"]).is_err(),
            "--restore-timeout needs --recover-if-checkpointed"
        );
    }

    #[test]
    fn recover_needs_gid_image_and_cts() {
        let a = RecoverArgs::try_parse_from(os(&[
            "gca-recover",
            "--gid",
            "g",
            "--image",
            "latest",
            "--cts",
            "http://h:1",
        ]))
        .unwrap();
        assert_eq!(a.image, "latest");
        assert!(a.job.is_empty());
        assert!(RecoverArgs::try_parse_from(os(&["gca-recover", "--gid", "g"])).is_err());
    }
}
