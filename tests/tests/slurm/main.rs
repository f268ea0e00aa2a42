//! The one-node Slurm cluster of `scripts/slurm-cluster` does what the wrappers need from a local
//! resource manager: it runs batch jobs, records their exit status, and `scancel` delivers
//! SIGTERM to the job (which `gca-recover` forwards to the restored process).
//!
//! Needs SLURM_CONF (exported by scripts/test; or `scripts/slurm-cluster start` and the export
//! line it prints). Without it these tests fail, saying so; they do not skip.

use std::time::Duration;

use integration_tests::slurm::{self, JobGuard, Submit};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn exit_status_is_recorded() {
    slurm::check_cluster();
    let dir = tempfile::tempdir().unwrap();
    let id = Submit::new("gca-test-exit7", dir.path()).wrap("echo ran; exit 7");
    let _guard = JobGuard(id);
    let state = slurm::wait_finished(id, WAIT);
    assert_eq!(state, "FAILED", "a job exiting 7 is FAILED");
    assert_eq!(slurm::exit_code(id), (7, 0), "ExitCode=7:0");
    assert_eq!(
        slurm::job_info(id).get("Reason").map(String::as_str),
        Some("NonZeroExitCode")
    );
    let out = std::fs::read_to_string(dir.path().join(format!("slurm-{id}.out"))).unwrap();
    assert_eq!(out.trim(), "ran", "the job's output file");

    let ok = Submit::new("gca-test-exit0", dir.path()).wrap("exit 0");
    let _guard = JobGuard(ok);
    assert_eq!(slurm::wait_finished(ok, WAIT), "COMPLETED");
    assert_eq!(slurm::exit_code(ok), (0, 0));
}

#[test]
fn scancel_delivers_sigterm() {
    slurm::check_cluster();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("signal.txt");
    let script = dir.path().join("trap.sh");
    // `ready` once the trap is installed; a short sleep loop so the trap runs promptly (bash runs
    // traps between commands; the sleep gets the SIGTERM too and ends).
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             trap 'echo got TERM > {flag}; exit 143' TERM\n\
             echo ready > {flag}\n\
             while :; do sleep 0.2; done\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    let id = Submit::new("gca-test-sigterm", dir.path()).script::<&str>(&script, &[]);
    let _guard = JobGuard(id);
    slurm::wait_state(id, &["RUNNING"], WAIT);
    slurm::wait_file_contains(&flag, "ready", WAIT);

    slurm::cancel(id);
    let text = slurm::wait_file_contains(&flag, "got TERM", WAIT);
    assert_eq!(text.trim(), "got TERM");
    assert_eq!(slurm::wait_finished(id, WAIT), "CANCELLED");
}

mod compat;
mod self_recovering;
mod through_wrappers;
mod tier;
