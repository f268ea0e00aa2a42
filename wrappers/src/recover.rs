//! gca-recover: the recovery flow (paper 5.3 steps 9-12).
//!
//! The wrapper talks to its CTS only, over the local socket; the CTS asks the GCS on its
//! behalf and answers only the owner of the job's images (root: anyone).
//!
//! 1. Ask the CTS about itself (type, driver configuration) and about the checkpoint
//!    (`GET /v1/jobs/{gid}/recovery`: the GCS's `GetRecoveryInfo`, `latest` or an ID, whose
//!    signature the CTS checked), and check this CTS can recover it.
//! 2. Register the recovery at the CTS with `restoring: true`: the GCS routes the GID here,
//!    state `recovering` (if the job may move: it failed, was stopped, its CTS is lost, or a
//!    broker authorized it); the CTS hands out the checkpoint directory and environment. A
//!    retention policy given on the command line (`--keep-last`/`--keep-all`, `--keep-in`)
//!    goes with both registrations and replaces the job's at the GCS.
//! 3. Have the CTS get the image into its store (`POST /v1/images/fetch`): fetched from the
//!    CTS that took it (which lets us read it because the GCS now records the recovery
//!    here), or checked in place, against the digest and signature the GCS recorded. A
//!    corrupt or tampered image stops here, before anything is restored (the registration
//!    is withdrawn).
//! 4. Restore through the same core checkpointer the CTS drives (`gca_drivers::make_driver`), in this
//!    process: a CRIU-restored job is our child; an application-level job is started by us
//!    with the type's recovery job parameters. A failed restore withdraws step 3.
//! 5. Register the running job (state `running`; the GCS counts the recovery once).
//! 6. Forward signals to the job; when it ends, tell the CTS how (so the GCS gets
//!    `JobFinished` with the real status), reap it and end the same way.

use std::ffi::OsString;
use std::time::Duration;

use gca_drivers::{RestoreRequest, Restored};
use gca_protocol::local::{FetchImage, LocalExit, LocalJob, LocalRecovery, RegisterLocalJob};
use gca_protocol::messages::{RecoveryInfo, Retention};
use gca_protocol::placeholders::{self, Values};

use crate::cli::RecoverArgs;
use crate::cts_target::{self, Cts};
use crate::exit::{Class, Failure};
use crate::signals::{self, Ended, Forwarder};
use crate::warn;

/// Runs gca-recover to the end: returns the failure when the job could not be recovered;
/// once the job ran, this process ends like the job and never returns.
pub async fn run(args: RecoverArgs) -> Failure {
    let retention = match args.retention.retention() {
        Ok(r) => r,
        Err(e) => {
            return Failure::new(
                Class::Usage,
                format!("{e}; job {:?} was not recovered", args.gid),
            )
        }
    };
    // Catch signals from the start: one that comes during the restore reaches the job once
    // it runs.
    let forwarder = match Forwarder::install() {
        Ok(f) => f,
        Err(e) => {
            return Failure::new(
                Class::Internal,
                format!("cannot install signal handlers: {e}"),
            )
        }
    };
    let cts = match cts_target::connect(&args.cts).await {
        Ok(c) => c,
        Err(f) => return f,
    };
    recover_first_usable(
        &args,
        &cts,
        forwarder,
        retention,
        std::slice::from_ref(&args.image),
    )
    .await
}

/// Recovers the job from the first of `images` (IDs or `latest`, best first) that is usable:
/// an image that turns out to be unusable (corrupt, tampered, gone, not recoverable by this
/// CTS) is given up (its recovery registration withdrawn) and the next one tried; any other
/// failure (a refused registration, an unreachable CTS, a failed restore) ends the attempt.
/// Returns only when no job runs (the failure; the first image's when none was usable); once
/// the job runs, this process ends like the job.
pub async fn recover_first_usable(
    args: &RecoverArgs,
    cts: &Cts,
    forwarder: Forwarder,
    retention: Option<Retention>,
    images: &[String],
) -> Failure {
    let mut first_failure: Option<Failure> = None;
    for (n, image) in images.iter().enumerate() {
        let more = n + 1 < images.len();
        let attempt = match locate(args, cts, image).await {
            Ok(info) => match restore_from(args, cts, &info, &retention).await {
                Ok(Running::Process(pid)) => {
                    return supervise(args, cts, forwarder, &info, retention, pid).await
                }
                Ok(Running::Namespace(ns)) => {
                    return supervise_namespace(args, cts, forwarder, &info, retention, ns).await
                }
                Ok(Running::Vm { pid, run_dir }) => {
                    drop(forwarder);
                    return supervise_vm(args, cts, &info, retention, pid, &run_dir).await;
                }
                Err(a) => a,
            },
            Err(f) if f.class == Class::Permanent => Attempt::ImageUnusable(f),
            Err(f) => Attempt::Failed(f),
        };
        match attempt {
            Attempt::ImageUnusable(f) if more => {
                warn(
                    "gca-recover",
                    &format!("{}; trying the job's previous checkpoint", f.message),
                );
                first_failure.get_or_insert(f);
            }
            Attempt::ImageUnusable(f) | Attempt::Failed(f) => {
                return match first_failure {
                    Some(mut first) if n > 0 => {
                        first.message.push_str(&format!(
                            "; none of the job's {} checkpoints could be used (the oldest: {})",
                            n + 1,
                            f.message
                        ));
                        first
                    }
                    _ => f,
                }
            }
        }
    }
    first_failure.unwrap_or_else(|| {
        Failure::new(
            Class::Permanent,
            format!("job {:?} has no checkpoint to recover from", args.gid),
        )
    })
}

/// Why a recovery from one image did not get the job running.
enum Attempt {
    /// The image cannot be used (nothing was restored): an older one may be.
    ImageUnusable(Failure),
    /// Anything else: trying another image would not help now.
    Failed(Failure),
}

/// What runs after a restore.
enum Running {
    /// The job's process, our child.
    Process(i32),
    /// The job's namespaces: their init is our child (`crate::isolate`).
    Namespace(crate::isolate::Namespace),
    /// The job's virtual machine: QEMU, our child, in `run_dir` (a VMM type).
    Vm {
        pid: i32,
        run_dir: std::path::PathBuf,
    },
}

/// Steps 2-4 for one checkpoint: registered as restoring, the image fetched and verified,
/// the job restored; returns what runs. On failure the registration is withdrawn.
async fn restore_from(
    args: &RecoverArgs,
    cts: &Cts,
    info: &RecoveryInfo,
    retention: &Option<Retention>,
) -> Result<Running, Attempt> {
    let me = std::process::id() as i32;
    let registered = cts
        .client
        .register(&RegisterLocalJob {
            gid: args.gid.clone(),
            pid: me,
            periodic_interval_secs: None,
            recovery: Some(recovery_of(info, true)),
            retention: retention.clone(),
            limits: None,
        })
        .await
        .map_err(|f| {
            Attempt::Failed(Failure::fault(
                format!(
                    "CTS {:?} refused to take over job {:?}",
                    cts.info.name, args.gid
                ),
                &f,
            ))
        })?;
    let restored = match fetch(args, cts, info).await {
        Ok(image_dir) => restore(args, cts, info, &image_dir, &registered)
            .await
            .map_err(Attempt::Failed),
        Err(f) if f.class == Class::Permanent => Err(Attempt::ImageUnusable(f)),
        Err(f) => Err(Attempt::Failed(f)),
    };
    if restored.is_err() {
        if let Err(e) = cts.client.abandon(&args.gid).await {
            warn(
                "gca-recover",
                &format!(
                    "could not withdraw the recovery registration: {}",
                    e.message
                ),
            );
        }
    }
    restored
}

fn recovery_of(info: &RecoveryInfo, restoring: bool) -> LocalRecovery {
    LocalRecovery {
        from_checkpoint: Some(info.checkpoint.id.clone()),
        restoring,
    }
}

/// Steps 5-6 for a virtual machine (the vmm-ready-job-resumer, `crate::vmm`): this wrapper
/// registered as the job's process (QEMU is its child), SIGTERM/INT/HUP sent to the job in the guest, the job's
/// files unpacked into `--output`, its status reported; exits with the job's status.
async fn supervise_vm(
    args: &RecoverArgs,
    cts: &Cts,
    info: &RecoveryInfo,
    retention: Option<Retention>,
    pid: i32,
    run_dir: &std::path::Path,
) -> Failure {
    let mut signals = match crate::vmm::Signals::install() {
        Ok(s) => s,
        Err(f) => return f,
    };
    let cfg = match crate::vmm::vmm_config(cts) {
        Ok(c) => c,
        Err(f) => return f,
    };
    // The job's process is this wrapper (its VM, QEMU, is our child): the CTS watches a
    // process whose end is the job's, and QEMU, its descendant, serves the QMP socket.
    register_restored(
        args,
        cts,
        info,
        retention,
        std::process::id() as i32,
        &format!("its VM is PID {pid}"),
    )
    .await;
    let end = crate::vmm::supervise(&cfg, run_dir, pid, args.output.as_deref(), &mut signals).await;
    match crate::vmm::finish(cts, &args.gid, pid, end, "gca-recover").await {
        Ok(code) => std::process::exit(code),
        Err(f) => f,
    }
}

/// Steps 5-6 for a job restored in its own namespaces: their init (our child, the PID
/// registered) relays and reports as under gca-exec (`crate::isolate::supervise`).
async fn supervise_namespace(
    args: &RecoverArgs,
    cts: &Cts,
    forwarder: Forwarder,
    info: &RecoveryInfo,
    retention: Option<Retention>,
    ns: crate::isolate::Namespace,
) -> Failure {
    let pid = ns.init_pid;
    register_restored(
        args,
        cts,
        info,
        retention,
        pid,
        &format!("its namespace's init is PID {pid}"),
    )
    .await;
    crate::isolate::supervise("gca-recover", Some(cts), &args.gid, forwarder, ns).await
}

/// Registers the restored job (process `pid`) at the CTS as a recovery; a refusal is only
/// warned about (`what` says which process runs the job): the job runs on, uncheckpointable
/// until recovered again.
async fn register_restored(
    args: &RecoverArgs,
    cts: &Cts,
    info: &RecoveryInfo,
    retention: Option<Retention>,
    pid: i32,
    what: &str,
) {
    if let Err(f) = cts
        .client
        .register(&RegisterLocalJob {
            gid: args.gid.clone(),
            pid,
            periodic_interval_secs: args.periodic,
            recovery: Some(recovery_of(info, false)),
            retention,
            limits: None,
        })
        .await
    {
        warn(
            "gca-recover",
            &format!(
                "job {:?} runs again ({what}) but CTS {:?} did not register it: {}; it cannot be checkpointed until it is recovered again",
                args.gid, cts.info.name, f.message
            ),
        );
    }
}

/// Steps 5-6: the running job registered, its signals forwarded, its end reported; ends
/// this process like the job (returns only on an internal failure).
async fn supervise(
    args: &RecoverArgs,
    cts: &Cts,
    forwarder: Forwarder,
    info: &RecoveryInfo,
    retention: Option<Retention>,
    pid: i32,
) -> Failure {
    let forwarding = forwarder.start(pid);
    register_restored(args, cts, info, retention, pid, &format!("PID {pid}")).await;
    let gid = args.gid.clone();
    let ended = match tokio::task::spawn_blocking(move || signals::wait_ended(pid)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            forwarding.stop();
            return Failure::new(
                Class::Internal,
                format!("cannot wait for job {gid:?} (PID {pid}): {e}"),
            );
        }
        Err(e) => {
            forwarding.stop();
            return Failure::new(Class::Internal, format!("waiting task failed: {e}"));
        }
    };
    forwarding.stop();
    // Report while the job is still a zombie, then reap it.
    let exit = match ended {
        Ended::Exited(code) => LocalExit {
            exit_status: Some(code),
            signal: None,
        },
        Ended::Signaled(sig) => LocalExit {
            exit_status: None,
            signal: Some(sig),
        },
    };
    if let Err(f) = cts.client.exited(&args.gid, &exit).await {
        // The CTS may have seen the exit itself already (it watches the process too).
        if f.code.as_deref() != Some("unknown-gid") {
            warn(
                "gca-recover",
                &format!(
                    "could not report how job {:?} ended: {}",
                    args.gid, f.message
                ),
            );
        }
    }
    signals::reap(pid);
    signals::end_like(ended)
}

/// Step 1: the checkpoint `image` (an ID or `latest`), as the CTS has the GCS describe it,
/// and whether this CTS can recover it.
async fn locate(args: &RecoverArgs, cts: &Cts, image: &str) -> Result<RecoveryInfo, Failure> {
    let info = cts
        .client
        .recovery_info(&args.gid, image)
        .await
        .map_err(|f| {
            Failure::fault(
                format!(
                    "CTS {:?} cannot say how to recover job {:?} from image {image:?}",
                    cts.info.name, args.gid
                ),
                &f,
            )
        })?;
    if info.cts_type != cts.info.cts_type {
        return Err(Failure::new(
            Class::Permanent,
            format!(
                "checkpoint {} of job {:?} was taken by a CTS of type {:?}; CTS {:?} here is of type {:?} and cannot restore it: run gca-recover on a resource with a {:?} CTS (GetRecoveryInfo lists them)",
                info.checkpoint.id, args.gid, info.cts_type, cts.info.name, cts.info.cts_type, info.cts_type
            ),
        ));
    }
    if info.same_resource_only && info.original_resource.as_deref() != Some(&cts.info.resource) {
        return Err(Failure::new(
            Class::Permanent,
            format!(
                "CTS type {:?} recovers jobs only on the resource that checkpointed them ({}), not on {:?}",
                info.cts_type,
                info.original_resource.as_deref().unwrap_or("unknown"),
                cts.info.resource
            ),
        ));
    }
    // Compatibility before restore: the CTS judged this resource (its facts, the image's
    // files, criu cpuinfo check) in its answer; nothing is registered or fetched for an
    // image it cannot restore.
    let verdict = info
        .candidates
        .iter()
        .find(|c| c.instance.name == cts.info.name)
        .and_then(|c| c.compatibility.as_ref());
    if let Some(c) = verdict.filter(|c| c.verdict == gca_protocol::facts::Verdict::Incompatible) {
        return Err(Failure::new(
            Class::Environment,
            format!(
                "CTS {:?} on {:?} cannot restore checkpoint {} of job {:?}: {}; nothing was fetched: recover it on a compatible resource (gcactl recovery-info lists them) or relax the rule in the CTS's [compatibility]",
                cts.info.name, cts.info.resource, info.checkpoint.id, args.gid, c.reasons.join("; ")
            ),
        ));
    }
    Ok(info)
}

/// Step 3: the verified image in the local store.
async fn fetch(
    args: &RecoverArgs,
    cts: &Cts,
    info: &RecoveryInfo,
) -> Result<std::path::PathBuf, Failure> {
    let fetched = cts
        .client
        .clone()
        .with_timeout(Duration::from_secs(3600))
        .fetch_image(&FetchImage {
            gid: args.gid.clone(),
            checkpoint_id: info.checkpoint.id.clone(),
            digest: info.checkpoint.digest.clone(),
        })
        .await
        .map_err(|f| {
            let what = format!(
                "image {} of job {:?} (from {}) cannot be used",
                info.checkpoint.id, args.gid, info.checkpoint.image_name
            );
            let mut failure = Failure::fault(what, &f);
            if failure.class == Class::Permanent {
                failure
                    .message
                    .push_str("; nothing was restored: recover from another image");
            }
            failure
        })?;
    Ok(fetched.image_dir)
}

/// Steps 4: restore with the CTS's core checkpointer; returns the running job (its PID, a
/// child of this process) or its virtual machine.
///
/// Awaited in the binaries' `block_on`, i.e. on the main thread, which forks the core
/// checkpointer: a CRIU-restored job's parent is that thread, so a job whose image carries a
/// parent-death signal (`gca-exec --recover-if-checkpointed`) dies with this process and not
/// with some runtime thread. Do not move the restore into a spawned task.
async fn restore(
    args: &RecoverArgs,
    cts: &Cts,
    info: &RecoveryInfo,
    image_dir: &std::path::Path,
    registered: &LocalJob,
) -> Result<Running, Failure> {
    let Some(driver_config) = &cts.info.driver_config else {
        return Err(Failure::new(
            Class::Internal,
            format!(
                "CTS {:?} does not tell its driver configuration on its local socket; update the CTS",
                cts.info.name
            ),
        ));
    };
    let driver = gca_drivers::make_driver(driver_config).map_err(|e| {
        Failure::new(
            Class::Internal,
            format!(
                "cannot set up the {} core checkpointer: {e:#}",
                cts.info.driver
            ),
        )
    })?;
    let values = Values::new()
        .set("GID", args.gid.clone())
        .set("IMAGE_ID", info.checkpoint.id.clone())
        .set(
            "SEQUENCE",
            info.checkpoint.sequence.unwrap_or_default().to_string(),
        )
        .set(
            "CHECKPOINT_DIR",
            registered.checkpoint_dir.display().to_string(),
        )
        .set("IMAGE_DIR", image_dir.display().to_string())
        .set("CTS_URL", cts.info.url.clone())
        .set("CTS_NAME", cts.info.name.clone())
        .set("CTS_TYPE", cts.info.cts_type.clone())
        .set("RESOURCE", cts.info.resource.clone())
        .set("GCS_URL", cts.info.gcs_url.clone());
    let restored = driver
        .restore(RestoreRequest {
            gid: &args.gid,
            image_dir,
            checkpoint_dir: &registered.checkpoint_dir,
            values: &values,
            timeout: Duration::from_secs(args.timeout.max(1)),
        })
        .await
        .map_err(|e| {
            let f: gca_protocol::Fault = e.into();
            Failure::fault(
                format!(
                    "restoring job {:?} from image {} failed",
                    args.gid, info.checkpoint.id
                ),
                &f,
            )
        })?;
    match restored {
        Restored::Running { pid } => Ok(Running::Process(pid)),
        Restored::StartJob => start_job(args, cts, &values, registered).map(Running::Process),
        Restored::VirtualMachine { pid, run_dir } => Ok(Running::Vm { pid, run_dir }),
        Restored::Isolated { pid, pipes } => {
            let pipes = std::sync::Arc::try_unwrap(pipes).map_err(|_| {
                Failure::new(Class::Internal, "the restored namespace's pipes are shared")
            })?;
            Ok(Running::Namespace(crate::isolate::Namespace {
                init_pid: pid,
                stdin: pipes.stdin,
                stdout: pipes.stdout,
                stderr: pipes.stderr,
                status: pipes.status,
            }))
        }
    }
}

/// Application-level recovery: JOB ARGS + the type's recovery job parameters, as our child,
/// with the registration's environment.
fn start_job(
    args: &RecoverArgs,
    cts: &Cts,
    values: &Values,
    registered: &LocalJob,
) -> Result<i32, Failure> {
    let Some((program, rest)) = args.job.split_first() else {
        return Err(Failure::new(
            Class::Usage,
            format!(
                "the image of job {:?} is in place, but CTS type {:?} needs the job restarted: give the job after `--` (gca-recover ... -- JOB [ARGS...])",
                args.gid, cts.info.cts_type
            ),
        ));
    };
    let extra =
        placeholders::expand_all(&cts.info.recovery_job_parameters, values).map_err(|e| {
            Failure::new(
                Class::Permanent,
                format!(
                    "the recovery job parameters of CTS type {:?} cannot be filled in: {e}",
                    cts.info.cts_type
                ),
            )
        })?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).args(extra.iter().map(OsString::from));
    for p in &registered.environment {
        cmd.env(&p.name, &p.value);
    }
    cmd.env("GCA_CHECKPOINT_DIR", &registered.checkpoint_dir);
    let child = cmd.spawn().map_err(|e| {
        let class = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                Class::Environment
            }
            _ => Class::Internal,
        };
        Failure::new(
            class,
            format!(
                "cannot start the job program {}: {e}",
                program.to_string_lossy()
            ),
        )
    })?;
    // Waited for with waitpid by PID, like a CRIU-restored job.
    Ok(child.id() as i32)
}
