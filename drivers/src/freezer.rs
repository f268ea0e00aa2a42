//! The cgroup v2 freezer of a job's cgroup, for CRIU's `--freeze-cgroup`.
//!
//! CRIU freezes a thawed cgroup itself, but then waits in steps of 100 ms for the freeze to
//! complete (criu/seize.c `freeze_processes`), so every dump of a job in a cgroup paid about
//! 100 ms for a freeze that takes a few milliseconds (measured: 76-88 ms for `criu dump` of a
//! 64 MiB job, 119-215 ms with `--freeze-cgroup`). A cgroup that is already frozen when CRIU
//! starts is seized at once: CRIU thaws it once it holds every task, dumps, and freezes it
//! again at the end (it restores the state it found). So the driver freezes the cgroup,
//! waits for `cgroup.events` to say `frozen 1` in short steps, runs CRIU, and thaws it
//! afterwards, whatever CRIU did ([`Frozen`]'s drop). The consistency is the same as CRIU's
//! own: the whole tree stops at once before any task is seized.
//!
//! A CTS that dies between the freeze and the thaw leaves the job frozen; the CTS thaws the
//! cgroups of its jobs when it starts ([`thaw`]), since no dump of a previous run can still
//! be going on then.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The first wait between two looks at `cgroup.events`; doubled up to [`MAX_STEP`].
const FIRST_STEP: Duration = Duration::from_micros(500);
const MAX_STEP: Duration = Duration::from_millis(20);

/// A cgroup frozen by [`freeze`]; thawed when dropped.
#[derive(Debug)]
pub struct Frozen {
    dir: PathBuf,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = write_freeze(&self.dir, false) {
            // Gone with its job (a dump that ended it) is fine.
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(cgroup = %self.dir.display(), error = %e,
                    "cannot thaw a job's cgroup after its dump; the job stays frozen until \
                     `echo 0 > cgroup.freeze` or a restart of the CTS");
            }
        }
    }
}

/// Freezes the cgroup `dir` and waits up to `within` until every task in it is frozen.
/// `Ok(None)` when it was frozen already (by someone else: left as it is after the dump).
/// On a timeout the cgroup is thawed again and the error says what holds it up.
pub async fn freeze(dir: &Path, within: Duration) -> Result<Option<Frozen>, String> {
    let shown = dir.display();
    let state = std::fs::read_to_string(dir.join("cgroup.freeze"))
        .map_err(|e| format!("cannot read {shown}/cgroup.freeze: {e}"))?;
    if state.trim() == "1" {
        return Ok(None);
    }
    write_freeze(dir, true).map_err(|e| format!("cannot freeze the cgroup {shown}: {e}"))?;
    let frozen = Frozen {
        dir: dir.to_path_buf(),
    };
    let deadline = Instant::now() + within;
    let mut step = FIRST_STEP;
    loop {
        let events = std::fs::read_to_string(dir.join("cgroup.events"))
            .map_err(|e| format!("cannot read {shown}/cgroup.events: {e}"))?;
        if events.lines().any(|l| l.trim() == "frozen 1") {
            return Ok(Some(frozen));
        }
        if Instant::now() >= deadline {
            // `frozen` thaws it again as it goes.
            return Err(format!(
                "the job's cgroup {shown} did not freeze within {}s (a process in \
                 uninterruptible sleep or in a vfork?); nothing was dumped",
                within.as_secs_f32()
            ));
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(MAX_STEP);
    }
}

/// Thaws the cgroup `dir` if it is frozen (at the CTS's start, for a job a previous run may
/// have left frozen). A cgroup that is gone is no error.
pub fn thaw(dir: &Path) -> std::io::Result<()> {
    match std::fs::read_to_string(dir.join("cgroup.freeze")) {
        Ok(s) if s.trim() == "1" => write_freeze(dir, false),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn write_freeze(dir: &Path, on: bool) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.freeze"), if on { "1" } else { "0" })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup of our own under the cgroup2 mount (the tests run as root, like CRIU's).
    fn scratch_cgroup() -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mounts
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                post.starts_with("cgroup2 ")
                    .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .expect("a cgroup2 mount (the freezer needs cgroup v2)");
        let dir = root.join(format!("gca-freezer-test-{}", std::process::id()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot make {} (run as root): {e}", dir.display()));
        dir
    }

    #[tokio::test]
    async fn a_frozen_cgroup_is_thawed_when_dropped_and_one_frozen_before_is_left_frozen() {
        let dir = scratch_cgroup();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("join");
        let events = || std::fs::read_to_string(dir.join("cgroup.events")).unwrap();

        let frozen = freeze(&dir, Duration::from_secs(5))
            .await
            .expect("freeze")
            .expect("it was thawed: ours to thaw");
        assert!(events().contains("frozen 1"), "{}", events());
        drop(frozen);
        assert!(
            events().contains("frozen 0"),
            "thawed on drop: {}",
            events()
        );

        std::fs::write(dir.join("cgroup.freeze"), "1").unwrap();
        assert!(freeze(&dir, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze"))
                .unwrap()
                .trim(),
            "1",
            "someone else's freeze is left as it was"
        );
        thaw(&dir).expect("thaw");
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze"))
                .unwrap()
                .trim(),
            "0"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::write(dir.join("cgroup.freeze"), "0").ok();
        let _ = std::fs::remove_dir(&dir);
        assert!(thaw(&dir).is_ok(), "a cgroup that is gone is no error");
    }
}
