//! gca-exec: register, then become the job.

use std::os::unix::process::CommandExt;
use std::process::Command;

use gca_protocol::local::{LocalRecovery, RegisterLocalJob};
use gca_protocol::messages::Retention;

use crate::cli::ExecArgs;
use crate::exit::{self, Failure};
use crate::{cts_target, warn};

/// Runs gca-exec; returns only when the job could not be executed (the exit code to use).
/// With `--recover-if-checkpointed`, see [`crate::resume`].
pub fn run(args: ExecArgs) -> i32 {
    if args.recover_if_checkpointed {
        return crate::resume::run(args);
    }
    run_as(args, Start::New)
}

/// How an executed job is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new job: its first registration.
    New,
    /// A job the GCS knows that is started again from the beginning (it failed, or was
    /// requeued, before its first checkpoint): registered as a recovery from no checkpoint,
    /// which moves the GID's routing here.
    Over,
}

/// Registers the job (as `start` says) and becomes it; returns only when it could not be
/// executed (the exit code to use).
pub fn run_as(args: ExecArgs, start: Start) -> i32 {
    let retention = match args.retention.retention() {
        Ok(r) => r,
        Err(e) => {
            warn(
                "gca-exec",
                &format!("{e}; job {:?} was not started", args.gid),
            );
            return exit::USAGE;
        }
    };
    if !args.keep_session {
        // Fails (EPERM) only when we lead a process group already, e.g. a session leader
        // that Slurm or `setsid` started: then the job leads its session anyway, or the site
        // configures its CTS with `shell_job = true`.
        let _ = rustix::process::setsid();
    }
    let registered = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let r = rt.block_on(register(&args, retention, start));
            drop(rt);
            r
        }
        Err(e) => Err(Failure::new(
            exit::Class::Internal,
            format!("cannot start the async runtime: {e}"),
        )),
    };
    let program = &args.job[0];
    let mut cmd = Command::new(program);
    cmd.args(&args.job[1..]);
    match registered {
        Ok(job) => {
            for p in &job.environment {
                cmd.env(&p.name, &p.value);
            }
            cmd.env("GCA_CHECKPOINT_DIR", &job.checkpoint_dir);
        }
        Err(f) if args.run_uncheckpointable => {
            warn(
                "gca-exec",
                &format!(
                    "{f}; running job {:?} UNCHECKPOINTABLE as asked (--run-uncheckpointable)",
                    args.gid
                ),
            );
        }
        Err(f) => {
            warn(
                "gca-exec",
                &format!(
                    "{f}; job {:?} was not started (a job that cannot be registered cannot be checkpointed; add --run-uncheckpointable to run it anyway)",
                    args.gid
                ),
            );
            return f.code();
        }
    }
    // A setuid or setgid program started under gca-exec runs without its privileges: the root
    // CTS must never dump a privileged process into an image its user owns (the CTS also
    // refuses such a process before each checkpoint).
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        warn(
            "gca-exec",
            &format!(
                "cannot set no_new_privs ({e}); job {:?} is not started",
                args.gid
            ),
        );
        return exit::NOT_EXECUTABLE;
    }
    if args.recover_if_checkpointed {
        if let Err(f) = die_with_parent() {
            warn(
                "gca-exec",
                &format!("{f}; job {:?} was not started", args.gid),
            );
            return f.code();
        }
    }
    let err = cmd.exec();
    let code = match err.kind() {
        std::io::ErrorKind::NotFound => exit::NOT_FOUND,
        _ => exit::NOT_EXECUTABLE,
    };
    warn(
        "gca-exec",
        &format!(
            "cannot execute the job program {}: {err}",
            program.to_string_lossy()
        ),
    );
    code
}

async fn register(
    args: &ExecArgs,
    retention: Option<Retention>,
    start: Start,
) -> Result<gca_protocol::local::LocalJob, Failure> {
    let cts = cts_target::connect(&args.cts).await?;
    cts.client
        .register(&RegisterLocalJob {
            gid: args.gid.clone(),
            pid: std::process::id() as i32,
            periodic_interval_secs: args.periodic,
            recovery: match start {
                Start::New => None,
                Start::Over => Some(LocalRecovery {
                    from_checkpoint: None,
                    restoring: false,
                }),
            },
            retention,
        })
        .await
        .map_err(|f| {
            Failure::fault(
                format!(
                    "cannot register job {:?} at CTS {:?}",
                    args.gid, cts.info.name
                ),
                &f,
            )
        })
}

/// The self-recovering mode runs under a resource manager, which ends a job by ending the
/// process it started (SIGKILL to its process group, in Grid Engine), so the job dies with
/// its parent (`PR_SET_PDEATHSIG`, kept across `exec`). CRIU keeps the setting in the image, so
/// a job recovered from it dies with its recovery wrapper (its parent, see `recover`): a
/// resource manager's SIGKILL of the wrapper, the one signal no wrapper can forward, does not
/// leave the restored job running outside the resource manager's control.
fn die_with_parent() -> Result<(), Failure> {
    use rustix::process::{getppid, set_parent_process_death_signal, Signal};
    let parent = getppid();
    set_parent_process_death_signal(Some(Signal::KILL)).map_err(|e| {
        Failure::new(
            exit::Class::Internal,
            format!("cannot make the job end with its parent (PR_SET_PDEATHSIG): {e}"),
        )
    })?;
    if getppid() != parent {
        return Err(Failure::new(
            exit::Class::Temporary,
            "the process that started gca-exec ended meanwhile",
        ));
    }
    Ok(())
}
