//! gca-exec: register, then become the job.

use std::os::unix::process::CommandExt;
use std::process::Command;

use gca_protocol::driver_config::DriverConfig;
use gca_protocol::isolation::NamespaceMode;
use gca_protocol::local::{LocalRecovery, RegisterLocalJob};
use gca_protocol::messages::Retention;

use crate::cli::ExecArgs;
use crate::cts_target::Cts;
use crate::exit::{self, Failure};
use crate::signals::Forwarder;
use crate::{cts_target, isolate, warn};

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
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn("gca-exec", &format!("cannot start the async runtime: {e}"));
            return exit::INTERNAL;
        }
    };
    let cts = rt.block_on(cts_target::connect(&args.cts));
    if let Ok(c) = &cts {
        match isolation(c) {
            Ok(true) => return run_isolated(rt, c, args, retention, start),
            Ok(false) => {}
            Err(f) => {
                warn(
                    "gca-exec",
                    &format!("{f}; job {:?} was not started", args.gid),
                );
                return f.code();
            }
        }
    }
    let registered = match &cts {
        Ok(c) => rt.block_on(register(
            c,
            &args,
            retention,
            start,
            std::process::id() as i32,
        )),
        Err(f) => Err(f.clone()),
    };
    drop(rt);
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
    cts: &Cts,
    args: &ExecArgs,
    retention: Option<Retention>,
    start: Start,
    pid: i32,
) -> Result<gca_protocol::local::LocalJob, Failure> {
    cts.client
        .register(&RegisterLocalJob {
            gid: args.gid.clone(),
            pid,
            periodic_interval_secs: args.periodic,
            recovery: match start {
                Start::New => None,
                Start::Over => Some(LocalRecovery {
                    from_checkpoint: None,
                    restoring: false,
                }),
            },
            retention,
            limits: args.limits(),
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

/// Whether this job runs in its own namespaces: the CTS's driver configuration says
/// (`[driver] namespaces`, CRIU only), and this process must be able to create them.
fn isolation(cts: &Cts) -> Result<bool, Failure> {
    let Some(DriverConfig::Criu(c)) = &cts.info.driver_config else {
        return Ok(false);
    };
    match c.namespaces {
        NamespaceMode::Off => Ok(false),
        NamespaceMode::Auto if c.shell_job => Ok(false),
        _ if isolate::can_isolate() => Ok(true),
        NamespaceMode::Auto => {
            warn(
                "gca-exec",
                &format!(
                    "no namespaces for this job (creating them needs root or CAP_SYS_ADMIN): it keeps its host PIDs, and a recovery of it needs them free (CTS {:?}, [driver] namespaces = \"auto\")",
                    cts.info.name
                ),
            );
            Ok(false)
        }
        NamespaceMode::On => Err(Failure::new(
            exit::Class::Environment,
            format!(
                "CTS {:?} runs its jobs in their own namespaces ([driver] namespaces = \"on\"), which needs root or CAP_SYS_ADMIN here",
                cts.info.name
            ),
        )),
    }
}

/// The job in its own PID and mount namespaces (`crate::isolate`): the namespace's init is
/// registered, then the job started; this process stays, relays, forwards and ends like the
/// job. Returns only when it could not run (the exit code to use).
fn run_isolated(
    rt: tokio::runtime::Runtime,
    cts: &Cts,
    args: ExecArgs,
    retention: Option<Retention>,
    start: Start,
) -> i32 {
    let forwarder = match rt.block_on(async { Forwarder::install() }) {
        Ok(f) => f,
        Err(e) => {
            warn("gca-exec", &format!("cannot install signal handlers: {e}"));
            return exit::INTERNAL;
        }
    };
    let starting = match isolate::spawn(&args.job) {
        Ok(s) => s,
        Err(e) => {
            warn(
                "gca-exec",
                &format!(
                    "cannot start the namespaces of job {:?}: {e}; it was not started",
                    args.gid
                ),
            );
            return exit::ENVIRONMENT;
        }
    };
    let init_pid = starting.ns.init_pid;
    let registered = rt.block_on(register(cts, &args, retention, start, init_pid));
    let env = match registered {
        Ok(job) => {
            let mut env: Vec<(String, String)> = job
                .environment
                .iter()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect();
            env.push((
                "GCA_CHECKPOINT_DIR".into(),
                job.checkpoint_dir.display().to_string(),
            ));
            env
        }
        Err(f) if args.run_uncheckpointable => {
            warn(
                "gca-exec",
                &format!(
                    "{f}; running job {:?} UNCHECKPOINTABLE as asked (--run-uncheckpointable)",
                    args.gid
                ),
            );
            Vec::new()
        }
        Err(f) => {
            starting.cancel();
            warn(
                "gca-exec",
                &format!(
                    "{f}; job {:?} was not started (a job that cannot be registered cannot be checkpointed; add --run-uncheckpointable to run it anyway)",
                    args.gid
                ),
            );
            return f.code();
        }
    };
    let ns = match starting.start(env) {
        Ok(ns) => ns,
        Err(e) => {
            warn(
                "gca-exec",
                &format!("cannot start job {:?} in its namespace: {e}", args.gid),
            );
            return exit::INTERNAL;
        }
    };
    let failure = rt.block_on(isolate::supervise(
        "gca-exec",
        Some(cts),
        &args.gid,
        forwarder,
        ns,
    ));
    warn("gca-exec", &failure.message);
    failure.code()
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
