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
