//! A checkpoint outlives the resource that took it, through Slurm (issue 12): a job started
//! with the shipped `execute.sbatch` at CTS A, whose type keeps images `replicated` in a
//! three-node Garage cluster, is checkpointed and stopped through the GCS; A's CTS is stopped
//! and its store deleted, one Garage node killed; the shipped `recover.sbatch` at CTS B
//! recovers it from the bucket and it continues its count.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::garage::Cluster;
use integration_tests::slurm::{self, JobGuard};
use integration_tests::wrappers::values;
use integration_tests::TestGcs;

use super::compat::{blocking, submit};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slurm_job_is_recovered_from_the_object_store_after_its_resource_is_lost() {
    slurm::check_cluster();
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let extra = garage.cts_extra("replicated");
    let mut a = TestCts::registered(
        &gcs,
        "cts-slurm-tier-a",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        &extra,
    )
    .await;
    let b = TestCts::registered(
        &gcs,
        "cts-slurm-tier-b",
        "criu",
        CRIU_DRIVER_HOST_PIDS,
        &extra,
    )
    .await;
    let gid = "gid-slurm-tier";
    let dir = tempfile::Builder::new()
        .prefix("gca-slurm")
        .tempdir()
        .unwrap();
    let (log, script) = slurm::counting_job(dir.path());
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/slurm");
    let args = vec!["bash".to_string(), script.display().to_string()];

    let (s, e, x) = (
        submit("gca-exec", dir.path(), gid, &a),
        examples.join("execute.sbatch"),
        args.clone(),
    );
    let first = blocking(move || s.script(&e, &x)).await;
    let _g1 = JobGuard(first);
    eventually(WAIT, "the job registers and counts", || async {
        values(&log).len() >= 5 && a.local.job(gid).await.is_ok()
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
    let stopped_at = *values(&log).last().unwrap();

    // Resource A is lost: its CTS gone, its store deleted; a Garage node is down too.
    let store = a.state_dir().join("store");
    a.stop().await;
    std::fs::remove_dir_all(&store).expect("delete A's store");
    garage.kill(1);

    let (s, e, x) = (
        submit("gca-recover", dir.path(), gid, &b),
        examples.join("recover.sbatch"),
        args,
    );
    let second = blocking(move || s.script(&e, &x)).await;
    let _g2 = JobGuard(second);
    eventually(WAIT, "the recovered job counts on", || async {
        values(&log).last().is_some_and(|v| *v > stopped_at + 5)
    })
    .await;
    let v = values(&log);
    let expected: Vec<u64> = (1..=*v.last().unwrap()).collect();
    assert_eq!(v, expected, "the counter continues where it stopped");
    assert!(
        b.image_dir(&record.id).exists(),
        "B holds the image it downloaded from the bucket"
    );
    let job = gcs_job(&gcs, gid).await;
    assert_eq!(job.recoveries, 1);
    assert_eq!(job.cts_instance, "cts-slurm-tier-b", "{job:?}");
    blocking(move || slurm::cancel(second)).await;
    blocking(move || slurm::wait_finished(second, WAIT)).await;
}
