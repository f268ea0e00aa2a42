//! A job isolated in its own PID and mount namespaces (issue 13): what crosses the boundaries
//! between the wrapper outside, the namespace's init inside (`gca-exec`'s own code, PID 1 of
//! the namespace, the job's parent), and the CRIU driver that dumps and restores the
//! namespace.
//!
//! - The wrapper starts the init as `gca-exec --gca-ns-init --start-fd N --status-fd M --
//!   JOB...` ([`INIT_ARG`]) in a new PID namespace; the init makes its mount namespace (a
//!   slave copy of the host's, with its own `/proc`), reads one [`InitStart`] (a JSON line)
//!   from descriptor N once the wrapper registered it at the CTS, starts the job, forwards
//!   the signals it gets to it, reaps every orphan of the namespace, and when the job ends
//!   writes one [`JobEnded`] (a JSON line) on descriptor M and waits for the wrapper to end
//!   it. The wrapper reports that status to its CTS before it ends the namespace, so the
//!   GCS records the job's own status, not the init's.
//! - The job's standard input, output and error are pipes to the wrapper, which relays them
//!   to its own: a descriptor inherited from outside the namespace (a resource manager's
//!   output file) would be on a mount CRIU cannot find in the job's mount namespace.
//! - The CRIU image of an isolated job carries an [`IsolationNote`] ([`NOTE_FILE`]) naming
//!   those four pipes, so that a restore plugs new pipes of the recovery wrapper in their
//!   place (`criu restore --inherit-fd`).

use serde::{Deserialize, Serialize};

/// The hidden first argument of `gca-exec` that makes it a namespace init.
pub const INIT_ARG: &str = "--gca-ns-init";

/// The file in a CRIU image of an isolated job (written by the CTS's driver at dump time).
pub const NOTE_FILE: &str = "gca-isolation.json";

/// The file in an image of a job with cgroup limits: its [`JobLimits`] (written by the CTS
/// that took it), which the CTS that recovers it gives the restored job again.
pub const LIMITS_FILE: &str = "gca-limits.json";

/// What the wrapper tells the init once the job is registered: the environment the job
/// runs with (the CTS type's, and `GCA_CHECKPOINT_DIR`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitStart {
    pub env: Vec<(String, String)>,
}

/// How the job (the init's child) ended: exactly one of the two is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobEnded {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl JobEnded {
    /// One JSON line.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }

    /// The first line of `text`, if it is a valid status.
    pub fn parse(text: &str) -> Option<Self> {
        let line = text.lines().next()?;
        let e: JobEnded = serde_json::from_str(line).ok()?;
        (e.exit_status.is_some() != e.signal.is_some()).then_some(e)
    }
}

/// The pipes of an isolated job at dump time, by their inode (`pipe:[INODE]`): the init's
/// descriptors 0, 1 and 2 (the job's too) and its status descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationPipes {
    pub stdin: u64,
    pub stdout: u64,
    pub stderr: u64,
    pub status: u64,
    /// The init's descriptor number for `status`.
    pub status_fd: i32,
}

/// [`NOTE_FILE`]: the image is of a namespace whose init is the image's root process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsolationNote {
    /// Format version (1).
    pub version: u32,
    /// The job had its own PID namespace (its root process is the namespace's init).
    pub pid_namespace: bool,
    /// The job had its own mount namespace.
    pub mount_namespace: bool,
    pub pipes: IsolationPipes,
}

/// Whether a CRIU driver isolates the jobs of its type (`[driver] namespaces`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceMode {
    /// In their own namespaces where the execute wrapper can create them (it runs as root or
    /// with `CAP_SYS_ADMIN`); elsewhere as before, which the wrapper says on its standard
    /// error and the CTS in its status.
    #[default]
    Auto,
    /// Always: a job whose namespaces cannot be created is not started.
    On,
    /// Never (the jobs keep their host PIDs, and CRIU restores them).
    Off,
}

/// What a job asks of its cgroup (`gca-exec --memory-max/--cpu-max`): at most what the CTS
/// type allows (`[cgroup]`); a request above it is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLimits {
    /// `memory.max`, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_bytes: Option<u64>,
    /// `cpu.max`, in percent of one CPU (150 = one and a half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_percent: Option<u32>,
}

/// A job's cgroup and what it used so far (in the CTS's status and job views).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupUsage {
    /// The job's cgroup (v2), as a path under the cgroup2 mount.
    pub path: String,
    /// `cpu.stat` `usage_usec` (always there in cgroup v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usec: Option<u64>,
    /// `memory.current` (with the memory controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The processes in it (`cgroup.procs`).
    pub processes: u64,
    /// The limits written for it.
    pub limits: JobLimits,
}

/// What isolation this CTS gives its jobs (`/api/v1/status` `isolation`): said at start, so
/// a fallback to the old behaviour is visible.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationStatus {
    /// The `[driver] namespaces` setting of a CRIU type (`auto`, `on`, `off`), `none` for
    /// other drivers; the wrappers apply it (they need root to create namespaces).
    pub namespaces: String,
    /// Jobs get a cgroup of their own.
    pub cgroups: bool,
    /// The cgroup2 directory job cgroups are made in (placement `parent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    /// The controllers enabled for job cgroups (`memory`, `cpu`): limits need them.
    pub controllers: Vec<String>,
    /// Why something is not available (a cgroup v1 host, controllers bound to v1, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip_and_bad_ones_are_refused() {
        let e = JobEnded {
            exit_status: Some(7),
            signal: None,
        };
        assert_eq!(e.to_line(), "{\"exit_status\":7}\n");
        assert_eq!(JobEnded::parse(&e.to_line()), Some(e));
        assert_eq!(
            JobEnded::parse("{\"signal\":15}\nrest"),
            Some(JobEnded {
                exit_status: None,
                signal: Some(15)
            })
        );
        assert_eq!(JobEnded::parse("{}"), None);
        assert_eq!(JobEnded::parse("{\"exit_status\":1,\"signal\":2}"), None);
        assert_eq!(JobEnded::parse(""), None);
        let m: NamespaceMode = serde_json::from_str("\"auto\"").unwrap();
        assert_eq!(m, NamespaceMode::Auto);
        assert!(serde_json::from_str::<NamespaceMode>("\"yes\"").is_err());
    }
}
