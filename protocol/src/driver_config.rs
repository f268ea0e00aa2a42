//! The configuration of the core checkpointer drivers (`gca-drivers`): the `[driver]` table of
//! a CTS configuration, and what the CTS hands the recovery wrapper on its local socket
//! ([`LocalInfo::driver_config`](crate::local::LocalInfo::driver_config)) so that the wrapper
//! builds the same driver and restores in its own process.
//!
//! Plain data: the drivers check the values when they are built
//! (`gca_drivers::make_driver`). They are here, not in `gca-drivers`, because they are part of
//! the local API's wire form, which the CTS and the wrappers must read alike.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The core checkpointer this CTS drives.
/// Serialized for local callers: the recovery wrapper builds the same driver (`LocalInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DriverConfig {
    Criu(CriuConfig),
    Application(AppConfig),
    Command(CommandConfig),
    Vmm(VmmConfig),
}

/// How the CRIU driver is configured (the `[driver]` table of a CTS of kind `criu`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriuConfig {
    /// The `criu` binary. Default: `$GCA_CRIU`, else `criu` on `PATH`, else the driver's
    /// default (`gca_drivers::criu::DEFAULT_PATH`, where `scripts/install-criu` puts it).
    pub path: Option<PathBuf>,
    /// Appended to every `criu dump`.
    pub extra_dump_args: Vec<String>,
    /// Appended to every `criu restore`.
    pub extra_restore_args: Vec<String>,
    /// `--shell-job`: the job is attached to a terminal or session outside its own tree.
    pub shell_job: bool,
    /// `--tcp-established`: checkpoint established TCP connections (and restore them).
    pub tcp_established: bool,
    /// `--file-locks`: checkpoint file locks (without it, a job holding a lock cannot be
    /// dumped).
    pub file_locks: bool,
    /// CRIU's log level, 0 (none) to 4 (debug).
    pub log_level: u8,
    /// Whether `gca-exec` starts each job in its own PID and mount namespaces, which CRIU
    /// dumps and restores into fresh ones (so a restored job never needs its original PIDs
    /// to be free): `auto` (default: where the wrapper can create them, i.e. it runs as root;
    /// else as before, said on its standard error), `on` (refuse to start a job without
    /// them), `off`. With `shell_job = true`, `auto` means off: an isolated job's standard
    /// streams are pipes relayed by its wrapper, not the terminal.
    pub namespaces: crate::isolation::NamespaceMode,
}

impl Default for CriuConfig {
    fn default() -> Self {
        Self {
            path: None,
            extra_dump_args: Vec::new(),
            extra_restore_args: Vec::new(),
            shell_job: false,
            tcp_established: false,
            file_locks: true,
            log_level: 4,
            namespaces: crate::isolation::NamespaceMode::Auto,
        }
    }
}

/// Configuration of the application-level driver (its section of the CTS configuration).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// The signal that asks a job to checkpoint itself: `SIGUSR1`, `USR2`, `10`, ...
    pub signal: String,
    /// How often to look for the marker while waiting for a requested checkpoint.
    pub poll_interval_ms: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            signal: "SIGUSR1".to_string(),
            poll_interval_ms: 100,
        }
    }
}

/// How the command driver is configured (the `[driver]` table of a CTS of kind `command`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Takes a checkpoint of the running job into `{IMAGE_DIR}` and leaves it running.
    pub checkpoint: Vec<String>,
    /// Takes a checkpoint and stops the job (migration). Without it the driver runs
    /// `checkpoint` and reports the job as still running, and the CTS stops it.
    #[serde(default)]
    pub checkpoint_and_stop: Option<Vec<String>>,
    /// Restores the job from `{IMAGE_DIR}` and returns once it runs again; it must write the
    /// restored job's PID into `restore_pid_file`.
    #[serde(default)]
    pub restore: Option<Vec<String>>,
    /// Where `restore` writes the PID of the restored job (a template).
    #[serde(default)]
    pub restore_pid_file: Option<String>,
    /// A self-check run at CTS start-up (exit status 0 = usable); no placeholders.
    #[serde(default)]
    pub check: Option<Vec<String>>,
    /// Extra environment variables for every command; the values are templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// An upper bound on each command, on top of the CTS's own timeout for the operation.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// How the VMM driver is configured (the `[driver]` table of a CTS of kind `vmm`): the virtual
/// machine every job of this type runs in. The execute and recovery wrappers start QEMU, as the
/// job's user, with exactly this machine (`gca_drivers::vmm::launch`); the CTS never starts
/// QEMU, it only talks QMP to the job's own VM and runs `qemu_img` on its own image files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmConfig {
    /// The QEMU system emulator.
    pub qemu: PathBuf,
    /// `qemu-img` (creates the image's disk file and the restored VM's overlay).
    pub qemu_img: PathBuf,
    /// The guest kernel (`scripts/build-vmm-guest`).
    pub kernel: PathBuf,
    /// The guest initramfs holding the Virtual Node Gate.
    pub initrd: PathBuf,
    /// Extra kernel command-line words (after the gate's own).
    pub kernel_args: Vec<String>,
    /// `-accel`: `kvm`, or `tcg` where KVM cannot boot the guest.
    pub accel: String,
    /// The QEMU machine type, versioned (`pc-q35-7.2`): a VM restores only on the same one.
    pub machine: String,
    /// The CPU model (`qemu64`, a named model; `host` only where every resource has the same
    /// CPU): a VM restores only on the same one.
    pub cpu: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub smp: u32,
    /// The size of the job's disk (its directory in the guest), MiB.
    pub disk_mib: u32,
    /// How long the guest may take to boot and report READY, seconds.
    pub boot_timeout_secs: u64,
}

impl Default for VmmConfig {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            kernel: PathBuf::from("/var/cache/gca/vmm-guest/vmlinuz"),
            initrd: PathBuf::from("/var/cache/gca/vmm-guest/initrd.img"),
            kernel_args: Vec::new(),
            accel: "kvm".to_string(),
            machine: "pc-q35-7.2".to_string(),
            cpu: "qemu64".to_string(),
            memory_mib: 256,
            smp: 1,
            disk_mib: 64,
            boot_timeout_secs: 120,
        }
    }
}
