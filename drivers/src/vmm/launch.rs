//! The one place a VMM job's virtual machine is described: its QEMU command line (the same for
//! a VM booted for a job and one restored from an image, as migration needs), the job's disk,
//! and the machine description an image carries (`vm.json`).
//!
//! These run in the wrappers (the job's user's processes), never in the root CTS: the CTS only
//! talks QMP to the VM and creates the image's own files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use gca_protocol::driver_config::VmmConfig;
use serde::{Deserialize, Serialize};

/// File names in a job's run directory (its checkpoint directory).
pub const QMP_SOCKET: &str = "qmp.sock";
pub const GATE_SOCKET: &str = "gate.sock";
pub const DISK: &str = "disk.qcow2";
pub const CONSOLE_LOG: &str = "console.log";
pub const QEMU_LOG: &str = "qemu.log";

/// File names in an image.
pub const IMAGE_STATE: &str = "machine.state";
pub const IMAGE_DISK: &str = "disk.qcow2";
pub const IMAGE_MACHINE: &str = "vm.json";

/// The node name of the job's disk (what the driver backs up).
pub const DISK_NODE: &str = "jobdisk";

/// The format tag of `vm.json`.
pub const MACHINE_FORMAT: &str = "gca-vmm-1";

/// What an image says about the machine it was taken from; a VM restores only into the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineImage {
    pub format: String,
    /// The QEMU that ran it (informative: migration streams load into later versions).
    pub qemu_version: String,
    pub machine: String,
    pub cpu: String,
    pub accel: String,
    pub memory_mib: u32,
    pub smp: u32,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    /// The guest job's identity (the submitting user's).
    pub uid: u32,
    pub gid: u32,
    /// The disk's virtual size.
    pub disk_bytes: u64,
}

/// How the VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Booted for a new job, which runs as `uid`/`gid` in the guest.
    Fresh { uid: u32, gid: u32 },
    /// Waiting for a saved state (`-incoming defer`, paused: `migrate-incoming`, then `cont`).
    Incoming { uid: u32, gid: u32 },
}

/// The QEMU command line of the job's VM, run in `run_dir` (relative socket and disk names, so
/// a long run directory cannot overflow a socket address). Only the type's configuration and
/// the boot mode shape it.
pub fn qemu_args(cfg: &VmmConfig, boot: Boot) -> Vec<String> {
    let (uid, gid) = match boot {
        Boot::Fresh { uid, gid } | Boot::Incoming { uid, gid } => (uid, gid),
    };
    let mut append = format!("console=ttyS0 quiet panic=-1 gca.uid={uid} gca.gid={gid}");
    for a in &cfg.kernel_args {
        append.push(' ');
        append.push_str(a);
    }
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-accel",
        &cfg.accel,
        "-machine",
        &cfg.machine,
        "-cpu",
        &cfg.cpu,
        "-m",
        &cfg.memory_mib.to_string(),
        "-smp",
        &cfg.smp.to_string(),
        "-kernel",
        &cfg.kernel.display().to_string(),
        "-initrd",
        &cfg.initrd.display().to_string(),
        "-append",
        &append,
        "-serial",
        &format!("file:{CONSOLE_LOG}"),
        "-blockdev",
        &format!("driver=file,filename={DISK},node-name=jobfile"),
        "-blockdev",
        &format!("driver=qcow2,file=jobfile,node-name={DISK_NODE}"),
        "-device",
        &format!("virtio-blk-pci,drive={DISK_NODE}"),
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        &format!("socket,id=gate,path={GATE_SOCKET},server=on,wait=off"),
        "-device",
        &format!(
            "virtserialport,bus=vser.0,chardev=gate,name={}",
            gca_protocol::gate::PORT_NAME
        ),
        "-qmp",
        &format!("unix:{QMP_SOCKET},server=on,wait=off"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Boot::Incoming { .. } = boot {
        args.extend(["-S", "-incoming", "defer"].map(String::from));
    }
    args
}

/// Starts the job's VM in `run_dir` (as the calling user), QEMU's own messages in
/// [`QEMU_LOG`]. Stale sockets of an earlier VM there are removed first.
pub fn spawn(cfg: &VmmConfig, run_dir: &Path, boot: Boot) -> std::io::Result<Child> {
    for s in [QMP_SOCKET, GATE_SOCKET] {
        let _ = std::fs::remove_file(run_dir.join(s));
    }
    let log = std::fs::File::create(run_dir.join(QEMU_LOG))?;
    Command::new(&cfg.qemu)
        .args(qemu_args(cfg, boot))
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// The last lines QEMU and the guest console wrote, for error messages.
pub fn logs_tail(run_dir: &Path) -> String {
    let mut out = Vec::new();
    for (what, f) in [("qemu", QEMU_LOG), ("console", CONSOLE_LOG)] {
        if let Ok(text) = std::fs::read_to_string(run_dir.join(f)) {
            if let Some(l) = crate::runner::last_lines(&text, 3) {
                out.push(format!("{what}: {l}"));
            }
        }
    }
    out.join("; ")
}

/// Quotes one word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Makes the job's disk `run_dir/disk.qcow2`: an ext2 file system (`mke2fs -d`, no mounting)
/// holding the files of `input` (if any) and `.gca/cmd`, the job's command line, which the
/// gate runs in the guest in that directory. Runs as the calling user.
pub fn make_job_disk(
    cfg: &VmmConfig,
    run_dir: &Path,
    input: Option<&Path>,
    job: &[String],
) -> Result<PathBuf, String> {
    let stage = run_dir.join("disk-stage");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join(".gca")).map_err(|e| format!("{}: {e}", stage.display()))?;
    if let Some(input) = input {
        let mut src = input.as_os_str().to_owned();
        src.push("/.");
        run(Command::new("cp").arg("-a").arg(&src).arg(&stage), "cp")?;
    }
    let cmd = job
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(stage.join(".gca/cmd"), format!("exec {cmd}\n"))
        .map_err(|e| format!("writing the job's command: {e}"))?;
    let raw = run_dir.join("disk.raw");
    let _ = std::fs::remove_file(&raw);
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext2", "-d"])
            .arg(&stage)
            .arg(&raw)
            .arg(format!("{}M", cfg.disk_mib)),
        "mke2fs",
    )?;
    let disk = run_dir.join(DISK);
    run(
        Command::new(&cfg.qemu_img)
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
        "qemu-img convert",
    )?;
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_dir_all(&stage);
    Ok(disk)
}

/// A copy-on-write overlay `run_dir/disk.qcow2` over an image's disk: the restored VM writes
/// there, the image stays as it was taken.
pub fn make_overlay(cfg: &VmmConfig, run_dir: &Path, base: &Path) -> Result<PathBuf, String> {
    let disk = run_dir.join(DISK);
    let _ = std::fs::remove_file(&disk);
    run(
        Command::new(&cfg.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&disk),
        "qemu-img create",
    )?;
    Ok(disk)
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{what} failed ({}){}",
        out.status,
        crate::runner::last_lines(&text, 3)
            .map(|l| format!(": {l}"))
            .unwrap_or_default()
    ))
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_comes_from_the_configuration_only() {
        let cfg = VmmConfig::default();
        let fresh = qemu_args(
            &cfg,
            Boot::Fresh {
                uid: 1000,
                gid: 100,
            },
        );
        assert!(fresh.contains(&"-nodefaults".to_string()));
        assert!(fresh.iter().any(|a| a.contains("gca.uid=1000 gca.gid=100")));
        assert!(!fresh.contains(&"-incoming".to_string()));
        assert!(!fresh.iter().any(|a| a.contains("netdev") || a == "-nic"));
        let restored = qemu_args(
            &cfg,
            Boot::Incoming {
                uid: 1000,
                gid: 100,
            },
        );
        assert_eq!(&restored[..fresh.len()], &fresh[..]);
        assert_eq!(&restored[fresh.len()..], ["-S", "-incoming", "defer"]);
    }

    #[test]
    fn job_words_are_quoted_for_the_guest_shell() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
