//! The VMM driver (GCA paper, section 4: the VMM as the core service): each job runs in a
//! QEMU virtual machine of its own, started by the execute wrapper (`gca-vmm-exec`, the
//! paper's vmm-ready-job-executor) as the job's user, with the Virtual Node Gate inside
//! (`scripts/vmm-guest/gate.sh`); a checkpoint is the whole machine: its device and memory
//! state (a QMP `migrate` into a file) and its disk (a full QMP `blockdev-backup`, so the image
//! is self-contained), taken while the VM is paused, so both are of the same instant.
//!
//! **What the root CTS does, and only that**: it connects to the QMP socket in the job's
//! checkpoint directory and accepts it only when the socket's peer (`SO_PEERCRED`) is the
//! registered job's process or one of its descendants, running as the job's user; it creates
//! the image's files in its own staging directory and hands QEMU *open descriptors* to them
//! (`add-fd`, `getfd`), so QEMU writes the image without ever naming a path of the CTS. It
//! never starts QEMU, never opens a path the job chose, never runs a program on the job's
//! files. A job's VM can write only into the descriptors the CTS opened for its image.
//!
//! **Restore** ([`Vmm::restore`], in the recovery wrapper's process, as the job's user):
//! checks that the image's machine type, CPU model, accelerator, memory, CPUs, kernel and
//! initramfs are this type's, makes a copy-on-write overlay over the image's disk, starts
//! QEMU paused with `-incoming defer`, loads the state through a descriptor, resumes it.

pub mod launch;
pub mod qmp;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gca_protocol::driver_config::VmmConfig;
use gca_protocol::FaultKind;
use rustix::fs::{Mode, OFlags};
use serde_json::json;

use crate::error::DriverError;
use crate::{live_job, CheckpointOutcome, CheckpointRequest, JobHandle, RestoreRequest, Restored};
use launch::{Boot, MachineImage};
use qmp::{Qmp, QmpError};

/// The VMM core checkpointer.
#[derive(Debug, Clone)]
pub struct Vmm {
    cfg: VmmConfig,
}

/// How long a VM stopped for migration may take to go away.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Vmm {
    pub fn new(cfg: VmmConfig) -> Result<Self, DriverError> {
        if cfg.memory_mib < 64 || cfg.smp == 0 || cfg.disk_mib < 4 {
            return Err(DriverError::unavailable(
                "driver: memory_mib must be at least 64, smp at least 1, disk_mib at least 4",
            ));
        }
        for (what, v) in [
            ("machine", &cfg.machine),
            ("cpu", &cfg.cpu),
            ("accel", &cfg.accel),
        ] {
            if v.is_empty() || v.contains([',', ' ']) {
                return Err(DriverError::unavailable(format!(
                    "driver: {what} {v:?} must be one name (no commas or spaces)"
                )));
            }
        }
        if let Some(a) = cfg
            .kernel_args
            .iter()
            .find(|a| a.contains(char::is_whitespace))
        {
            return Err(DriverError::unavailable(format!(
                "driver: kernel_args word {a:?} contains white space"
            )));
        }
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    /// The machine this type runs, as an image records it.
    fn describe(
        &self,
        qemu_version: &str,
        uid: u32,
        gid: u32,
        disk_bytes: u64,
    ) -> Result<MachineImage, DriverError> {
        Ok(MachineImage {
            format: launch::MACHINE_FORMAT.to_string(),
            qemu_version: qemu_version.to_string(),
            machine: self.cfg.machine.clone(),
            cpu: self.cfg.cpu.clone(),
            accel: self.cfg.accel.clone(),
            memory_mib: self.cfg.memory_mib,
            smp: self.cfg.smp,
            kernel_sha256: hash(&self.cfg.kernel)?,
            initrd_sha256: hash(&self.cfg.initrd)?,
            uid,
            gid,
            disk_bytes,
        })
    }

    /// Why an image's machine cannot be restored here, if it cannot.
    fn incompatible(&self, img: &MachineImage) -> Result<Option<String>, DriverError> {
        let here = self.describe("", img.uid, img.gid, img.disk_bytes)?;
        let mut diffs = Vec::new();
        if img.format != here.format {
            diffs.push(format!("format {:?} (not {:?})", img.format, here.format));
        }
        for (what, theirs, ours) in [
            ("machine type", &img.machine, &here.machine),
            ("CPU model", &img.cpu, &here.cpu),
            ("accelerator", &img.accel, &here.accel),
            ("kernel", &img.kernel_sha256, &here.kernel_sha256),
            ("initramfs", &img.initrd_sha256, &here.initrd_sha256),
        ] {
            if theirs != ours {
                diffs.push(format!("{what} {theirs:?} (here {ours:?})"));
            }
        }
        if (img.memory_mib, img.smp) != (here.memory_mib, here.smp) {
            diffs.push(format!(
                "{} MiB and {} CPUs (here {} MiB and {})",
                img.memory_mib, img.smp, here.memory_mib, here.smp
            ));
        }
        Ok((!diffs.is_empty()).then(|| diffs.join(", ")))
    }
}

fn hash(path: &Path) -> Result<String, DriverError> {
    launch::file_sha256(path).map_err(|e| {
        DriverError::unavailable(format!(
            "cannot read the guest file {}: {e}",
            path.display()
        ))
    })
}

fn qmp_failed(what: &str, e: QmpError) -> DriverError {
    match e {
        QmpError::Io(_) | QmpError::Protocol(_) => {
            DriverError::failed(format!("{what}: the job's virtual machine: {e}"))
        }
        QmpError::Command { .. } => DriverError::failed(format!("{what}: {e}")),
    }
}

fn internal(message: impl Into<String>) -> DriverError {
    DriverError::new(FaultKind::Internal, "driver-internal", message)
}

/// Connects to the QMP socket of `job`'s VM: `qmp.sock` in its checkpoint directory, reached
/// through a descriptor of that directory (opened without following a link, and the job's
/// user's), accepted only if the listening process is the job or a descendant of it, running as
/// the job's user.
fn connect_job_vm(job: &JobHandle, uid: u32, deadline: Instant) -> Result<Qmp, DriverError> {
    use std::os::unix::net::UnixStream;
    let dir: OwnedFd = rustix::fs::open(
        &job.checkpoint_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        DriverError::job_gone(format!(
            "job {:?} has no run directory {}: {e}",
            job.gid,
            job.checkpoint_dir.display()
        ))
    })?;
    let st = rustix::fs::fstat(&dir).map_err(|e| internal(format!("fstat: {e}")))?;
    if st.st_uid != uid && st.st_uid != 0 {
        return Err(DriverError::new(
            FaultKind::AccessDenied,
            "not-the-jobs",
            format!(
                "the run directory of job {:?} belongs to UID {}, not the job's {uid}",
                job.gid, st.st_uid
            ),
        ));
    }
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}/{}", dir.as_raw_fd(), launch::QMP_SOCKET);
    let stream = UnixStream::connect(&path).map_err(|e| {
        DriverError::job_gone(format!(
            "job {:?} has no virtual machine listening (QMP {}): {e}; was it started by gca-vmm-exec?",
            job.gid,
            job.checkpoint_dir.join(launch::QMP_SOCKET).display()
        ))
    })?;
    let peer = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(|e| internal(format!("SO_PEERCRED: {e}")))?;
    let peer_pid = peer.pid.as_raw_nonzero().get();
    if peer.uid.as_raw() != uid || !crate::proc::is_descendant(peer_pid, job.pid) {
        return Err(DriverError::new(
            FaultKind::AccessDenied,
            "not-the-jobs",
            format!(
                "the QMP socket of job {:?} is served by process {peer_pid} (UID {}), which is not the job's (PID {}, UID {uid}) or one of its descendants",
                job.gid,
                peer.uid.as_raw(),
                job.pid
            ),
        ));
    }
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| internal(format!("socket timeout: {e}")))?;
    Qmp::handshake(stream, deadline).map_err(|e| qmp_failed("connecting", e))
}

/// Creates `path` for QEMU to write (0600, root's: only the CTS reads the store).
fn create_image_file(path: &Path) -> Result<std::fs::File, DriverError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc_nofollow())
        .open(path)
        .map_err(|e| internal(format!("creating {}: {e}", path.display())))
}

fn libc_nofollow() -> i32 {
    OFlags::NOFOLLOW.bits() as i32
}

/// The blocking part of a checkpoint (QMP is synchronous): pause, back the disk up, save the
/// state, then resume or quit.
fn checkpoint_blocking(
    vmm: &Vmm,
    job: &JobHandle,
    image_dir: &Path,
    leave_running: bool,
    deadline: Instant,
) -> Result<bool, DriverError> {
    let Some(_) = live_job(job) else {
        return Err(DriverError::job_gone(format!(
            "job {:?} (PID {}) is not running",
            job.gid, job.pid
        )));
    };
    let uid = crate::proc::uid(job.pid)
        .ok_or_else(|| DriverError::job_gone(format!("job {:?} is gone", job.gid)))?;
    let gid = crate::proc::gid(job.pid).unwrap_or(uid);
    let mut q = connect_job_vm(job, uid, deadline)?;
    let status = q.status().map_err(|e| qmp_failed("query-status", e))?;
    let was_running = match status.as_str() {
        "running" => true,
        "paused" => false,
        other => {
            return Err(DriverError::new(
                FaultKind::Conflict,
                "vm-not-ready",
                format!("the virtual machine of job {:?} is {other:?}", job.gid),
            ))
        }
    };
    // The disk's virtual size, bounded by what the type allows.
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .map_err(|e| qmp_failed("query-named-block-nodes", e))?;
    let disk_bytes = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node-name"] == launch::DISK_NODE))
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| {
            DriverError::failed(format!(
                "the virtual machine of job {:?} has no disk node {:?}",
                job.gid,
                launch::DISK_NODE
            ))
        })?;
    let allowed = u64::from(vmm.cfg.disk_mib) << 20;
    if disk_bytes > allowed {
        return Err(DriverError::new(
            FaultKind::Conflict,
            "vm-disk-too-large",
            format!(
                "the disk of job {:?} is {disk_bytes} bytes, more than the type's {} MiB",
                job.gid, vmm.cfg.disk_mib
            ),
        ));
    }
    let machine = vmm.describe(&q.version, uid, gid, disk_bytes)?;
    let disk_path = image_dir.join(launch::IMAGE_DISK);
    launch::run(
        std::process::Command::new(&vmm.cfg.qemu_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk_path)
            .arg(disk_bytes.to_string()),
        "qemu-img create",
    )
    .map_err(DriverError::unavailable)?;
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)
        .map_err(|e| internal(format!("opening {}: {e}", disk_path.display())))?;
    let state = create_image_file(&image_dir.join(launch::IMAGE_STATE))?;

    if was_running {
        q.execute("stop", None).map_err(|e| qmp_failed("stop", e))?;
    }
    let saved = save_paused(&mut q, disk.as_fd(), state.as_fd());
    // Whatever happened, the VM goes on (or ends, for a migration) as asked.
    let end = if saved.is_ok() && !leave_running {
        q.execute("quit", None).map(|_| ())
    } else if was_running {
        q.execute("cont", None).map(|_| ())
    } else {
        Ok(())
    };
    saved?;
    end.map_err(|e| qmp_failed("resuming", e))?;
    drop((disk, state));
    let text = serde_json::to_vec_pretty(&machine).map_err(|e| internal(e.to_string()))?;
    let mut f = create_image_file(&image_dir.join(launch::IMAGE_MACHINE))?;
    std::io::Write::write_all(&mut f, &text)
        .and_then(|_| f.sync_all())
        .map_err(|e| internal(format!("writing {}: {e}", launch::IMAGE_MACHINE)))?;
    Ok(!leave_running)
}

/// With the VM paused: its disk backed up whole into `disk` (a qcow2 the CTS created), its
/// state migrated into `state`.
fn save_paused(
    q: &mut Qmp,
    disk: std::os::fd::BorrowedFd<'_>,
    state: std::os::fd::BorrowedFd<'_>,
) -> Result<(), DriverError> {
    const TARGET: &str = "gca-ckpt-disk";
    const JOB: &str = "gca-ckpt";
    let added = q
        .execute_with_fd("add-fd", json!({}), disk)
        .map_err(|e| qmp_failed("add-fd", e))?;
    let fdset = added["fdset-id"]
        .as_i64()
        .ok_or_else(|| DriverError::failed(format!("add-fd answered {added}")))?;
    let backed_up = (|| {
        q.execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2",
                "node-name": TARGET,
                "file": { "driver": "file", "filename": format!("/dev/fdset/{fdset}") },
            })),
        )
        .map_err(|e| qmp_failed("opening the image's disk", e))?;
        let r = q
            .execute(
                "blockdev-backup",
                Some(json!({
                    "job-id": JOB,
                    "device": launch::DISK_NODE,
                    "target": TARGET,
                    "sync": "full",
                    "auto-dismiss": false,
                })),
            )
            .and_then(|_| q.wait_job(JOB))
            .map_err(|e| qmp_failed("backing the disk up", e));
        let _ = q.execute("blockdev-del", Some(json!({ "node-name": TARGET })));
        r
    })();
    let _ = q.execute("remove-fd", Some(json!({ "fdset-id": fdset })));
    backed_up?;
    q.execute_with_fd("getfd", json!({ "fdname": "gca-state" }), state)
        .map_err(|e| qmp_failed("getfd", e))?;
    // The VM is paused: one pass, as fast as the file takes it.
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1_i64 << 40 })),
    )
    .map_err(|e| qmp_failed("migrate-set-parameters", e))?;
    q.execute("migrate", Some(json!({ "uri": "fd:gca-state" })))
        .and_then(|_| q.wait_migration())
        .map_err(|e| qmp_failed("saving the machine state", e))?;
    Ok(())
}

/// The blocking part of a restore; returns QEMU's PID (our child).
fn restore_blocking(
    vmm: &Vmm,
    image_dir: &Path,
    run_dir: &Path,
    deadline: Instant,
) -> Result<i32, DriverError> {
    let text = std::fs::read(image_dir.join(launch::IMAGE_MACHINE)).map_err(|e| {
        DriverError::new(
            FaultKind::OperationFailed,
            "not-a-vm-image",
            format!("the image has no {}: {e}", launch::IMAGE_MACHINE),
        )
    })?;
    let img: MachineImage = serde_json::from_slice(&text).map_err(|e| {
        DriverError::new(
            FaultKind::OperationFailed,
            "not-a-vm-image",
            format!("the image's {} is not readable: {e}", launch::IMAGE_MACHINE),
        )
    })?;
    if let Some(why) = vmm.incompatible(&img)? {
        return Err(DriverError::new(
            FaultKind::Conflict,
            "vm-incompatible",
            format!("the image's virtual machine cannot be restored by this CTS type: {why}"),
        ));
    }
    launch::make_overlay(&vmm.cfg, run_dir, &image_dir.join(launch::IMAGE_DISK))
        .map_err(DriverError::unavailable)?;
    let state = std::fs::File::open(image_dir.join(launch::IMAGE_STATE))
        .map_err(|e| DriverError::failed(format!("the image's machine state: {e}")))?;
    let mut child = launch::spawn(
        &vmm.cfg,
        run_dir,
        Boot::Incoming {
            uid: img.uid,
            gid: img.gid,
        },
    )
    .map_err(|e| {
        DriverError::unavailable(format!("cannot start {}: {e}", vmm.cfg.qemu.display()))
    })?;
    let pid = child.id() as i32;
    let loaded = (|| {
        let mut q = Qmp::connect_waiting(&run_dir.join(launch::QMP_SOCKET), deadline)?;
        q.execute_with_fd("getfd", json!({ "fdname": "gca-state" }), state.as_fd())?;
        q.execute("migrate-incoming", Some(json!({ "uri": "fd:gca-state" })))?;
        q.wait_status(&["paused"])?;
        q.execute("cont", None)?;
        Ok::<_, QmpError>(())
    })();
    if let Err(e) = loaded {
        let _ = child.kill();
        let _ = child.wait();
        return Err(DriverError::failed(format!(
            "the virtual machine did not resume from the image: {e}; {}",
            launch::logs_tail(run_dir)
        )));
    }
    // The wrapper waits for it by PID.
    std::mem::forget(child);
    Ok(pid)
}

#[async_trait::async_trait]
impl crate::CoreCheckpointer for Vmm {
    fn kind(&self) -> &'static str {
        "vmm"
    }

    async fn self_check(&self) -> Result<String, DriverError> {
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(&cfg.qemu_img)
                .arg("--version")
                .output()
                .map_err(|e| {
                    DriverError::unavailable(format!(
                        "cannot run {}: {e} (install qemu-utils: scripts/install-deps)",
                        cfg.qemu_img.display()
                    ))
                })?;
            let version = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            for f in [&cfg.kernel, &cfg.initrd] {
                std::fs::metadata(f).map_err(|e| {
                    DriverError::unavailable(format!(
                        "the guest file {} is missing ({e}): build it with scripts/build-vmm-guest",
                        f.display()
                    ))
                })?;
            }
            Ok(format!(
                "{version}; guest {} machine {} cpu {} accel {}",
                cfg.kernel.display(),
                cfg.machine,
                cfg.cpu,
                cfg.accel
            ))
        })
        .await
        .map_err(|e| internal(format!("self-check task failed: {e}")))?
    }

    async fn checkpoint(
        &self,
        req: CheckpointRequest<'_>,
    ) -> Result<CheckpointOutcome, DriverError> {
        let deadline = Instant::now() + req.timeout;
        let (vmm, job, image_dir, leave) = (
            self.clone(),
            req.job.clone(),
            req.image_dir.to_path_buf(),
            req.leave_running,
        );
        let quit = tokio::task::spawn_blocking(move || {
            checkpoint_blocking(&vmm, &job, &image_dir, leave, deadline)
        })
        .await
        .map_err(|e| internal(format!("checkpoint task failed: {e}")))??;
        if !quit {
            return Ok(CheckpointOutcome { stopped: false });
        }
        // QEMU quit; the wrapper sees its VM end and exits.
        let job = req.job;
        let gone = match crate::proc::stat(job.pid) {
            Some(st) => crate::proc::wait_gone(job.pid, st.start_time, STOP_GRACE).await,
            None => true,
        };
        Ok(CheckpointOutcome { stopped: gone })
    }

    async fn restore(&self, req: RestoreRequest<'_>) -> Result<Restored, DriverError> {
        let deadline = Instant::now() + req.timeout;
        // On the calling thread: QEMU is the caller's child, waited for by PID.
        let pid = restore_blocking(self, req.image_dir, req.checkpoint_dir, deadline)?;
        Ok(Restored::VirtualMachine {
            pid,
            run_dir: PathBuf::from(req.checkpoint_dir),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestJob;
    use crate::CoreCheckpointer;

    fn vmm() -> Vmm {
        Vmm::new(VmmConfig::default()).unwrap()
    }

    /// A QMP socket in the job's directory served by a process outside the job's tree (here,
    /// this test process) is refused before anything is sent to it, and no image file is made.
    #[tokio::test]
    async fn a_qmp_socket_not_served_by_the_jobs_tree_is_refused() {
        let job = TestJob::start().await;
        let handle = job.handle("gid-vmm-peer");
        let listener =
            std::os::unix::net::UnixListener::bind(handle.checkpoint_dir.join(launch::QMP_SOCKET))
                .unwrap();
        listener.set_nonblocking(true).unwrap();
        let image = tempfile::tempdir().unwrap();
        let values = gca_protocol::placeholders::Values::new();
        let err = vmm()
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img",
                image_dir: image.path(),
                leave_running: true,
                values: &values,
                timeout: Duration::from_secs(5),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, "not-the-jobs", "{err}");
        assert!(err.message.contains("not the job's"), "{err}");
        // The CTS connected, then said nothing: no QMP greeting was awaited, no command sent.
        let (mut conn, _) = listener.accept().expect("the CTS connected");
        let mut buf = [0u8; 1];
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the CTS sent something to a stranger's socket");
        assert_eq!(std::fs::read_dir(image.path()).unwrap().count(), 0);
    }

    /// A job without a VM (no QMP socket) is `job-gone`, not a hang.
    #[tokio::test]
    async fn a_job_without_a_vm_is_reported_as_such() {
        let job = TestJob::start().await;
        let handle = job.handle("gid-vmm-none");
        let image = tempfile::tempdir().unwrap();
        let values = gca_protocol::placeholders::Values::new();
        let err = vmm()
            .checkpoint(CheckpointRequest {
                job: &handle,
                image_id: "img",
                image_dir: image.path(),
                leave_running: true,
                values: &values,
                timeout: Duration::from_secs(5),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, "job-gone", "{err}");
        assert!(err.message.contains("gca-vmm-exec"), "{err}");
    }

    #[test]
    fn configurations_that_would_smuggle_options_are_refused() {
        for bad in [
            VmmConfig {
                machine: "q35,accel=tcg".into(),
                ..VmmConfig::default()
            },
            VmmConfig {
                cpu: "qemu64 -nic".into(),
                ..VmmConfig::default()
            },
            VmmConfig {
                kernel_args: vec!["a b".into()],
                ..VmmConfig::default()
            },
            VmmConfig {
                memory_mib: 1,
                ..VmmConfig::default()
            },
        ] {
            assert!(Vmm::new(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
