//! Compatibility before restore through Slurm: a job checkpointed and stopped on one CTS is
//! resubmitted with the shipped `recover.sbatch` and `self-recovering.sbatch` at a CTS that
//! reports another CRIU version. Each batch job ends with exit status 72 (the resource lacks
//! what the job needs), saying why in its output, before anything is fetched or registered
//! (the job is not started from scratch either); resubmitted at a CTS whose site accepts
//! another CRIU minor version (`[compatibility] criu_version = "same-major"`) it continues from
//! its state.
//!
//! Every CTS runs the same CRIU here; one reports another version through `[facts]
//! criu_version`, which is what the GCS and the CTS judge images by.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::slurm::{self, JobGuard, Submit};
use integration_tests::wrappers::{binary, values};
use integration_tests::TestGcs;

const WAIT: Duration = Duration::from_secs(30);

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// `sbatch` options pointing the example scripts at `cts` for `gid`.
pub(crate) fn submit(name: &str, dir: &std::path::Path, gid: &str, cts: &TestCts) -> Submit {
    let mut s = Submit::new(name, dir);
    s.extra.push(format!(
        "--export=ALL,GID={gid},CTS_URL=unix:{},GCA_EXEC={},GCA_RECOVER={},GCA_CHECKPOINT={}",
        cts.local.socket().display(),
        binary("gca-exec").display(),
        binary("gca-recover").display(),
        binary("gca-checkpoint").display(),
    ));
    s
}

/// Runs `script` (an example) through Slurm and returns (exit status, its output) once the
/// batch job has ended.
async fn ended(s: Submit, script: std::path::PathBuf, args: Vec<String>) -> (i32, String) {
    let dir = s.chdir.clone();
    let id = blocking(move || s.script(&script, &args)).await;
    let _guard = JobGuard(id);
    blocking(move || slurm::wait_finished(id, WAIT)).await;
    let (status, _) = slurm::exit_code(id);
    let out = std::fs::read_to_string(dir.join(format!("slurm-{id}.out"))).unwrap_or_default();
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_resource_refuses_the_recovery_through_slurm_with_status_72() {
    slurm::check_cluster();
    let gcs = TestGcs::start().await;
    let here =
        TestCts::registered(&gcs, "cts-slurm-compat", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let other = TestCts::registered(
        &gcs,
        "cts-slurm-old-criu",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        "[facts]\ncriu_version = \"4.0.0\"\n",
    )
    .await;
    // Another CRIU minor version too, at a site that accepts one.
    let relaxed = TestCts::registered(
        &gcs,
        "cts-slurm-relaxed",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        "[facts]\ncriu_version = \"4.0.0\"\n[compatibility]\ncriu_version = \"same-major\"\n",
    )
    .await;
    let gid = "gid-slurm-compat";
    let dir = tempfile::Builder::new()
        .prefix("gca-slurm")
        .tempdir()
        .unwrap();
    let (log, script) = slurm::counting_job(dir.path());
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/slurm");
    let args = vec!["bash".to_string(), script.display().to_string()];

    // Executed and checkpointed with stop (a migration) on the first CTS.
    let (s, e, a) = (
        submit("gca-exec", dir.path(), gid, &here),
        examples.join("execute.sbatch"),
        args.clone(),
    );
    let first = blocking(move || s.script(&e, &a)).await;
    let _g1 = JobGuard(first);
    eventually(WAIT, "the job registers and counts", || async {
        values(&log).len() >= 5 && here.local.job(gid).await.is_ok()
    })
    .await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: true,
        })
        .await
        .expect("doCheckpoint of the Slurm job");
    blocking(move || slurm::wait_finished(first, WAIT)).await;
    eventually(WAIT, "the CTS lets the stopped job go", || async {
        here.local.job(gid).await.is_err()
    })
    .await;
    let stopped_at = *values(&log).last().unwrap();
    let criu = here
        .cts
        .resource_facts()
        .criu_version
        .expect("CRIU's version");
    let why = format!("CRIU 4.0.0 differs from {criu}");

    // recover.sbatch and self-recovering.sbatch at the other CTS: 72, the reason, nothing
    // fetched, registered or started.
    for example in ["recover.sbatch", "self-recovering.sbatch"] {
        let (status, out) = ended(
            submit("gca-compat", dir.path(), gid, &other),
            examples.join(example),
            args.clone(),
        )
        .await;
        assert_eq!(status, 72, "{example}: Slurm records 72: {out}");
        assert!(out.contains(&why), "{example} says why: {out}");
        assert!(out.contains("nothing was fetched"), "{example}: {out}");
        assert!(
            !other.image_dir(&record.id).exists(),
            "{example}: the image was fetched into the incompatible CTS's store"
        );
        let job = gcs_job(&gcs, gid).await;
        assert_eq!(
            (job.state, job.recoveries),
            (JobState::Stopped, 0),
            "{example}: nothing registered"
        );
        assert_eq!(
            *values(&log).last().unwrap(),
            stopped_at,
            "{example}: the job did not run (again from the beginning or otherwise)"
        );
    }

    // At the CTS whose site relaxes the rule it continues from its state.
    let (s, e, a) = (
        submit("gca-recover", dir.path(), gid, &relaxed),
        examples.join("recover.sbatch"),
        args,
    );
    let second = blocking(move || s.script(&e, &a)).await;
    let _g2 = JobGuard(second);
    eventually(WAIT, "the recovered job counts on", || async {
        values(&log).last().is_some_and(|v| *v > stopped_at + 5)
    })
    .await;
    let v = values(&log);
    let expected: Vec<u64> = (1..=*v.last().unwrap()).collect();
    assert_eq!(v, expected, "the counter continues where it stopped");
    let job = gcs_job(&gcs, gid).await;
    assert_eq!(job.recoveries, 1);
    assert_eq!(job.cts_instance, "cts-slurm-relaxed", "{job:?}");
    blocking(move || slurm::cancel(second)).await;
    blocking(move || slurm::wait_finished(second, WAIT)).await;
}
