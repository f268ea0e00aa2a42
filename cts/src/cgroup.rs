//! A cgroup (v2) of its own for every job (issue 13): made by the CTS (root) when the job
//! registers running, with the limits its type allows and its submission asks for, frozen
//! by CRIU for a consistent dump (`--freeze-cgroup`), read for the job's usage in the status,
//! removed when the job has gone.
//!
//! Security: the CTS makes the directories as root and never hands them over, so the job's
//! user can neither write its limits nor move its processes out (moving needs write access
//! to `cgroup.procs` of both cgroups' common ancestor, which is root's).
//!
//! Where cgroup v2 is missing, or the CTS cannot make cgroups under the configured parent,
//! `mode = "auto"` falls back to no cgroups, logged at start and shown in
//! `/api/v1/status` (`isolation`); `mode = "on"` refuses to start. Limits need the `memory`
//! and `cpu` controllers in the parent: where they are bound to a cgroup v1 hierarchy (a
//! hybrid host), jobs still get a cgroup (membership, freezer, CPU usage from `cpu.stat`),
//! and a limit asked for is refused with the reason.

use std::path::{Path, PathBuf};

use gca_protocol::isolation::{CgroupUsage, IsolationStatus, JobLimits};
use serde::Deserialize;

/// `[cgroup]` of the CTS configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    /// `auto` (default: cgroups where this host has cgroup v2 and the CTS can make them;
    /// else none, said at start and in the status), `on` (refuse to start without them),
    /// `off`.
    pub mode: CgroupMode,
    /// The cgroup2 mount; default: found in `/proc/self/mountinfo` (`/sys/fs/cgroup` on a
    /// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
    pub mount: Option<PathBuf>,
    /// Where job cgroups are made, relative to the mount (placement `parent`).
    pub parent: String,
    /// `parent`: under `parent`; `nested`: under the cgroup the job's process is in when it
    /// registers (a resource manager's job cgroup, e.g. Slurm's `proctrack/cgroup` on a
    /// cgroup v2 host, so that the resource manager still tracks the job; limits then come
    /// from the resource manager, since a cgroup holding processes cannot enable
    /// controllers for its children).
    pub placement: Placement,
    /// The most memory a job of this type may have (`memory.max`), bytes; also its default.
    pub memory_max_bytes: Option<u64>,
    /// The most CPU a job of this type may use (`cpu.max`), in percent of one CPU; also its
    /// default.
    pub cpu_max_percent: Option<u32>,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            mode: CgroupMode::Auto,
            mount: None,
            parent: "gca".into(),
            placement: Placement::Parent,
            memory_max_bytes: None,
            cpu_max_percent: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Parent,
    Nested,
}

/// The CTS's job cgroups, as probed at start.
#[derive(Debug)]
pub struct Cgroups {
    cfg: CgroupConfig,
    /// The cgroup2 mount, when job cgroups are made.
    mount: Option<PathBuf>,
    /// The parent directory (placement `parent`).
    parent: Option<PathBuf>,
    controllers: Vec<String>,
    notes: Vec<String>,
}

/// The cgroup2 mount point in `/proc/self/mountinfo`.
fn find_cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl Cgroups {
    /// Probes the host (makes the parent, enables `memory` and `cpu` in it where they are
    /// available); logs what jobs get. Err only with `mode = "on"` and no cgroups.
    pub fn probe(cfg: &CgroupConfig) -> anyhow::Result<Self> {
        let mut me = Cgroups {
            cfg: cfg.clone(),
            mount: None,
            parent: None,
            controllers: Vec::new(),
            notes: Vec::new(),
        };
        if cfg.mode == CgroupMode::Off {
            me.notes
                .push("cgroups are off ([cgroup] mode = \"off\")".into());
            return Ok(me);
        }
        match me.set_up() {
            Ok(()) => {
                tracing::info!(mount = %me.mount.as_ref().map(|m| m.display().to_string()).unwrap_or_default(),
                    parent = ?me.parent, controllers = ?me.controllers, notes = ?me.notes,
                    "jobs get a cgroup (v2) of their own");
                Ok(me)
            }
            Err(why) if cfg.mode == CgroupMode::On => {
                anyhow::bail!("[cgroup] mode = \"on\", but {why}")
            }
            Err(why) => {
                tracing::warn!(reason = %why, "jobs get no cgroup of their own: running them as before ([cgroup] mode = \"auto\")");
                me.mount = None;
                me.parent = None;
                me.notes.push(why);
                Ok(me)
            }
        }
    }

    fn set_up(&mut self) -> Result<(), String> {
        let mount = match &self.cfg.mount {
            Some(m) => m.clone(),
            None => find_cgroup2_mount().ok_or("this host has no cgroup v2 (cgroup2) mount")?,
        };
        if !mount.join("cgroup.controllers").is_file() {
            return Err(format!("{} is not a cgroup2 mount", mount.display()));
        }
        self.mount = Some(mount.clone());
        if self.cfg.placement == Placement::Nested {
            self.notes.push(
                "placement nested: job cgroups are made under the cgroup of each job's process; limits come from the resource manager's cgroup"
                    .into(),
            );
            return Ok(());
        }
        let rel = self.cfg.parent.trim_matches('/');
        if rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!(
                "[cgroup] parent {:?} is not a relative cgroup path",
                self.cfg.parent
            ));
        }
        let parent = mount.join(rel);
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot make the cgroup parent {}: {e}", parent.display()))?;
        let available = words(&parent.join("cgroup.controllers"));
        let mut enabled = Vec::new();
        for c in ["memory", "cpu"] {
            if !available.iter().any(|a| a == c) {
                // Not ours to give: the parent's parent does not pass it down (or it is bound
                // to a v1 hierarchy); try enabling it along the path from the mount.
                let mut dir = mount.clone();
                for part in rel.split('/') {
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
                    dir = dir.join(part);
                }
            }
            if words(&parent.join("cgroup.controllers"))
                .iter()
                .any(|a| a == c)
                && std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
            {
                enabled.push(c.to_string());
            }
        }
        for c in ["memory", "cpu"] {
            if !enabled.iter().any(|e| e == c) {
                self.notes.push(format!(
                    "the {c} controller is not available in {} (bound to cgroup v1 on a hybrid host, or not passed down): no {c} limits",
                    parent.display()
                ));
            }
        }
        self.controllers = enabled;
        self.parent = Some(parent);
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.mount.is_some()
    }

    pub fn status(&self, namespaces: String) -> IsolationStatus {
        IsolationStatus {
            namespaces,
            cgroups: self.enabled(),
            cgroup_parent: self.parent.as_ref().map(|p| p.display().to_string()),
            controllers: self.controllers.clone(),
            notes: self.notes.clone(),
        }
    }

    /// The limits a job gets: what it asks for, at most (and by default) its type's.
    pub fn limits_for(&self, asked: Option<&JobLimits>) -> Result<JobLimits, String> {
        let pick = |asked: Option<u64>, max: Option<u64>, what: &str| match (asked, max) {
            (Some(a), Some(m)) if a > m => Err(format!(
                "job asks for {what} {a}, more than this CTS type allows ({m})"
            )),
            (Some(a), _) => Ok(Some(a)),
            (None, m) => Ok(m),
        };
        let l = JobLimits {
            memory_max_bytes: pick(
                asked.and_then(|a| a.memory_max_bytes),
                self.cfg.memory_max_bytes,
                "memory_max_bytes",
            )?,
            cpu_max_percent: pick(
                asked.and_then(|a| a.cpu_max_percent).map(u64::from),
                self.cfg.cpu_max_percent.map(u64::from),
                "cpu_max_percent",
            )?
            .map(|v| v as u32),
        };
        if l.cpu_max_percent == Some(0) || l.memory_max_bytes == Some(0) {
            return Err("a limit of 0 would stop the job".into());
        }
        Ok(l)
    }

    /// Makes the job's cgroup, writes its limits and moves `pids` (the job's process tree,
    /// root first) into it. `Ok(None)` when jobs get no cgroups here.
    pub fn create(
        &self,
        gid: &str,
        pids: &[i32],
        limits: &JobLimits,
    ) -> Result<Option<PathBuf>, String> {
        let Some(mount) = &self.mount else {
            if limits.memory_max_bytes.is_some() || limits.cpu_max_percent.is_some() {
                return Err(format!(
                    "the job asks for limits, but jobs get no cgroup on this resource ({})",
                    self.notes.join("; ")
                ));
            }
            return Ok(None);
        };
        let parent = match (&self.parent, pids.first()) {
            (Some(p), _) => p.clone(),
            (None, Some(&pid)) => mount.join(
                current_cgroup(pid)
                    .ok_or_else(|| format!("cannot read the cgroup v2 of process {pid}"))?,
            ),
            (None, None) => return Err("no process to place".into()),
        };
        let safe: String = gid
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let dir = parent.join(format!(
            "gca-{safe}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot make the job's cgroup {}: {e}", dir.display()))?;
        let fail = |msg: String| {
            let _ = std::fs::remove_dir(&dir);
            Err(msg)
        };
        if let Some(m) = limits.memory_max_bytes {
            if !self.controllers.iter().any(|c| c == "memory") {
                return fail(format!(
                    "the job asks for memory_max_bytes {m}, but {}",
                    self.why_not("memory")
                ));
            }
            if let Err(e) = std::fs::write(dir.join("memory.max"), m.to_string()) {
                return fail(format!("cannot write memory.max: {e}"));
            }
        }
        if let Some(p) = limits.cpu_max_percent {
            if !self.controllers.iter().any(|c| c == "cpu") {
                return fail(format!(
                    "the job asks for cpu_max_percent {p}, but {}",
                    self.why_not("cpu")
                ));
            }
            let period = 100_000u64;
            if let Err(e) = std::fs::write(
                dir.join("cpu.max"),
                format!("{} {period}", u64::from(p) * period / 100),
            ) {
                return fail(format!("cannot write cpu.max: {e}"));
            }
        }
        // Twice over: a process forked while the first pass ran is caught by the second.
        for _ in 0..2 {
            for &pid in pids
                .iter()
                .chain(gca_drivers::proc::descendants(pids[0]).iter())
            {
                if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                    if pid == pids[0] {
                        return fail(format!(
                            "cannot move process {pid} into {}: {e}",
                            dir.display()
                        ));
                    }
                }
            }
        }
        Ok(Some(dir))
    }

    fn why_not(&self, c: &str) -> String {
        self.notes
            .iter()
            .find(|n| n.contains(&format!("the {c} controller")))
            .cloned()
            .unwrap_or_else(|| format!("the {c} controller is not enabled for job cgroups here"))
    }

    /// The job's cgroup, as the status shows it.
    pub fn usage(&self, dir: &Path, limits: &JobLimits) -> CgroupUsage {
        let rel = self
            .mount
            .as_ref()
            .and_then(|m| dir.strip_prefix(m).ok())
            .map(|r| format!("/{}", r.display()))
            .unwrap_or_else(|| dir.display().to_string());
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
        CgroupUsage {
            path: rel,
            cpu_usec: stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok()),
            memory_bytes: std::fs::read_to_string(dir.join("memory.current"))
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            processes: std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|t| t.lines().count() as u64)
                .unwrap_or_default(),
            limits: *limits,
        }
    }

    /// Removes a job's cgroup once its processes are gone (retrying a moment: the last
    /// ones may still be exiting).
    pub async fn remove(dir: PathBuf) {
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        tracing::warn!(cgroup = %dir.display(), "the job's cgroup still holds processes; left in place");
    }
}

/// The cgroup v2 path of `pid` (`0::/path` in `/proc/PID/cgroup`), relative.
fn current_cgroup(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_at_most_the_type_s_and_default_to_it() {
        let c = Cgroups {
            cfg: CgroupConfig {
                memory_max_bytes: Some(1 << 30),
                cpu_max_percent: Some(100),
                ..CgroupConfig::default()
            },
            mount: None,
            parent: None,
            controllers: Vec::new(),
            notes: vec!["no cgroup v2 here".into()],
        };
        assert_eq!(
            c.limits_for(None).unwrap(),
            JobLimits {
                memory_max_bytes: Some(1 << 30),
                cpu_max_percent: Some(100)
            }
        );
        let asked = JobLimits {
            memory_max_bytes: Some(1 << 20),
            cpu_max_percent: None,
        };
        assert_eq!(
            c.limits_for(Some(&asked)).unwrap().memory_max_bytes,
            Some(1 << 20)
        );
        let too_much = JobLimits {
            memory_max_bytes: Some(2 << 30),
            cpu_max_percent: None,
        };
        let e = c.limits_for(Some(&too_much)).unwrap_err();
        assert!(e.contains("more than this CTS type allows"), "{e}");
        // No cgroups here: a job with limits is refused, one without runs as before.
        let e = c.create("g", &[1], &asked).unwrap_err();
        assert!(e.contains("no cgroup v2 here"), "{e}");
        assert_eq!(c.create("g", &[1], &JobLimits::default()).unwrap(), None);
        let cfg: CgroupConfig = toml::from_str("mode = \"off\"\nplacement = \"nested\"").unwrap();
        assert_eq!(
            (cfg.mode, cfg.placement),
            (CgroupMode::Off, Placement::Nested)
        );
        assert!(toml::from_str::<CgroupConfig>("mod = \"off\"").is_err());
    }
}
