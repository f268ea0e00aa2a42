//! `gca-exec --recover-if-checkpointed`: the self-recovering mode.
//!
//! One command line for a job's first start and for every restart by its resource manager
//! (a Slurm requeue after preemption or node failure, a Grid Engine migration or reschedule):
//!
//! - the CTS lists the job's checkpoints this user can recover from (`GET
//!   /v1/jobs/{gid}/checkpoints`: the GCS's records, image stored, the caller's), newest
//!   first; if there are any, the job is recovered from the first usable one, exactly as
//!   `gca-recover` does ([`recover::recover_first_usable`]): this process stays the job's
//!   parent, forwards signals and ends like it;
//! - if the GCS does not know the GID, the job is executed as `gca-exec` does;
//! - if the GCS knows it but it was never checkpointed (it failed, or was requeued, before
//!   its first checkpoint), it is executed again from the beginning, registered as a
//!   recovery from no checkpoint ([`Start::Over`]), which moves the GID's routing here;
//! - anything else is a failure with the wrappers' exit codes: the job has checkpoints but
//!   none this user can use (its images were deleted or kept when it ended: 65), the CTS or
//!   the GCS cannot be asked (75; the job is not started from scratch behind the back of a
//!   checkpoint that may exist, unless `--run-uncheckpointable` says so).

use gca_protocol::messages::LATEST;

use crate::cli::ExecArgs;
use crate::cts_target::{self, Cts};
use crate::exec::{self, Start};
use crate::exit::{self, Class, Failure};
use crate::recover;
use crate::signals::Forwarder;
use crate::warn;

/// What the self-recovering mode does for this GID.
enum Plan {
    Execute(Start),
    /// Recover from the first usable of these checkpoint IDs (newest first).
    Recover {
        cts: Box<Cts>,
        images: Vec<String>,
    },
}

/// Runs the self-recovering mode; returns only when no job ran (the exit code to use).
pub fn run(args: ExecArgs) -> i32 {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn("gca-exec", &format!("cannot start the async runtime: {e}"));
            return exit::INTERNAL;
        }
    };
    match runtime.block_on(plan(&args)) {
        Ok(Plan::Execute(start)) => {
            // No thread of the runtime may outlive it into the job.
            drop(runtime);
            exec::run_as(args, start)
        }
        Ok(Plan::Recover { cts, images }) => {
            let recover_args = args.recover_args();
            let failure = runtime.block_on(async {
                // Signals are caught from here on: one that comes during the restore
                // reaches the job once it runs.
                let forwarder = match Forwarder::install() {
                    Ok(f) => f,
                    Err(e) => {
                        return Failure::new(
                            Class::Internal,
                            format!("cannot install signal handlers: {e}"),
                        )
                    }
                };
                recover::recover_first_usable(&recover_args, &cts, forwarder, retention, &images)
                    .await
            });
            warn("gca-exec", &failure.message);
            failure.code()
        }
        Err(f) if f.class == Class::Temporary && args.run_uncheckpointable => {
            warn(
                "gca-exec",
                &format!(
                    "{f}; whether job {:?} has a checkpoint is unknown: starting it from the beginning, as --run-uncheckpointable asks",
                    args.gid
                ),
            );
            drop(runtime);
            exec::run_as(args, Start::New)
        }
        Err(f) => {
            warn(
                "gca-exec",
                &format!("{f}; job {:?} was not started", args.gid),
            );
            f.code()
        }
    }
}

async fn plan(args: &ExecArgs) -> Result<Plan, Failure> {
    let cts = cts_target::connect(&args.cts).await?;
    match cts.client.recoverable_checkpoints(&args.gid).await {
        Ok(list) if !list.is_empty() => Ok(Plan::Recover {
            images: list.into_iter().map(|r| r.id).collect(),
            cts: Box::new(cts),
        }),
        Ok(_) => never_checkpointed(args, &cts).await,
        Err(f) if f.code.as_deref() == Some("unknown-gid") => Ok(Plan::Execute(Start::New)),
        Err(f) => Err(Failure::fault(
            format!(
                "CTS {:?} cannot list the checkpoints of job {:?}",
                cts.info.name, args.gid
            ),
            &f,
        )),
    }
}

/// The job is known and has no checkpoint this user can recover from: was it ever
/// checkpointed?
async fn never_checkpointed(args: &ExecArgs, cts: &Cts) -> Result<Plan, Failure> {
    match cts.client.recovery_info(&args.gid, LATEST).await {
        Err(f) if f.code.as_deref() == Some("no-checkpoint") => Ok(Plan::Execute(Start::Over)),
        Err(f) if f.code.as_deref() == Some("unknown-gid") => Ok(Plan::Execute(Start::New)),
        Err(f) => Err(Failure::fault(
            format!(
                "job {:?} was checkpointed, but none of its checkpoints can be recovered by this user (it is not started again from the beginning)",
                args.gid
            ),
            &f,
        )),
        Ok(info) => Err(Failure::new(
            Class::Permanent,
            format!(
                "job {:?} was checkpointed (latest: {}), but none of its checkpoints can be recovered by this user; it is not started again from the beginning",
                args.gid, info.checkpoint.id
            ),
        )),
    }
}
