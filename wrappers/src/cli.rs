//! Command lines of both wrappers (clap derive) and the parsing rule: usage errors exit 64.

use std::ffi::OsString;

use clap::Parser;

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
    after_help = "Exit codes: the job's own once it runs (gca-exec becomes the job). Before:\n   64  usage\n   65  registration refused (permanent)\n   75  CTS or GCS unreachable (temporary; or use --run-uncheckpointable)\n  126  the job program is not executable\n  127  the job program was not found"
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
    /// The job and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "JOB")]
    pub job: Vec<OsString>,
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
    /// The GCS (root URL or SOAP endpoint); default: the one this CTS reports to.
    #[arg(long, env = "GCA_GCS_URL")]
    pub gcs: Option<String>,
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
