//! The private one-node Grid Engine cell of `scripts/gridengine-cell` as the wrappers' resource
//! manager: it runs jobs and records their exit status (qacct), and its checkpointing
//! environment "gca" (examples/gridengine/gca.ckpt) drives GCA: a job migrated by Grid Engine
//! (`qmod -sj`) is checkpointed and stopped by migr_command and comes back from that
//! checkpoint through restart_command; a job rescheduled without one (`qmod -f -rj`) comes back
//! from its latest checkpoint through its own self-recovering job script; periodic checkpoints
//! come through ckpt_command.
//!
//! Needs SGE_ROOT, SGE_CELL, SGE_QMASTER_PORT, SGE_EXECD_PORT (exported by scripts/test; or
//! `scripts/gridengine-cell start` and `eval "$(scripts/gridengine-cell env)"`). Without them
//! these tests fail, saying so; they do not skip.

use std::time::Duration;

use integration_tests::gridengine::{self as sge, JobGuard, Submit};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn exit_status_reaches_qacct() {
    sge::check_cell();
    let dir = tempfile::Builder::new()
        .prefix("gca-sge")
        .tempdir()
        .unwrap();
    let script = dir.path().join("exit7.sh");
    std::fs::write(&script, "#!/bin/bash\necho ran\nexit 7\n").unwrap();
    let submit = Submit::new("gca-test-exit7", dir.path());
    let id = submit.script::<&str>(&script, &[]);
    let _guard = JobGuard(id);
    let runs = sge::wait_finished(id, 1, WAIT);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].failed, 0);
    assert_eq!(
        runs[0].exit_status, 7,
        "qacct records the job's exit status"
    );
    let out = std::fs::read_to_string(submit.output()).unwrap();
    assert_eq!(out.trim(), "ran", "the job's output file");
}

mod through_gca;
