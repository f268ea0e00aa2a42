//! A checkpoint outlives the resource that took it (issue 12): a CRIU job checkpointed on A
//! with `store.durability = "replicated"` into a three-node Garage cluster (RF 3); A's CTS
//! stopped and its store deleted; one Garage node killed; `gca-recover` on B recovers the job
//! from the bucket and it continues from the checkpoint's state.

use std::time::Duration;

use gca_protocol::messages::*;
use integration_tests::cts::*;
use integration_tests::garage::Cluster;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

use super::criu::{exec_job, stop_job, wait_values};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_job_is_recovered_from_the_object_store_after_its_resource_and_a_garage_node_are_lost() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let extra = garage.cts_extra("replicated");
    let mut a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, &extra).await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, &extra).await;
    let gid = "gid-tier";
    let log = b.dir.path().join("counter.log");
    let mut job = exec_job(&gcs, &a, gid, &counter_script(&log)).await;
    let pid = job.pid;
    wait_values(&log, 5).await;
    let image = stop_job(&gcs, &a, gid, &mut job).await;
    let before = values(&log);
    let last = *before.last().unwrap();

    // Resource A is lost: its CTS gone, its store deleted. One Garage node is down too (the
    // first endpoint: the next answers).
    let store = a.state_dir().join("store");
    a.stop().await;
    let _ = std::fs::remove_dir_all(&store);
    assert!(!store.exists(), "A's store is gone");
    garage.kill(1);

    let url = b.url.clone();
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", &image.id, "--cts", &url],
        b.dir.path(),
    );
    rec.adopt(pid);
    eventually(T, "the job runs again on B", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        b.local
            .job(gid)
            .await
            .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    wait_values(&log, before.len() + 5).await;
    let after = values(&log);
    // It continues from the checkpoint's state: the next number after the last it wrote.
    assert_eq!(
        after[before.len()],
        last + 1,
        "the recovered job continues its count: {after:?}"
    );
    rec.kill_job_and_wait(T).await;
}
