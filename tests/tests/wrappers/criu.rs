//! CRIU jobs executed by gca-exec, checkpointed and stopped through the GCS, recovered by
//! gca-recover on the same resource and on another one.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

fn soap_url(cts: &TestCts) -> String {
    format!("{}{}", cts.url, gca_protocol::ns::CTS_SERVICE_PATH)
}

pub(crate) async fn checkpoint(gcs: &TestGcs, gid: &str, stop: bool) -> CheckpointRecord {
    gcs.call::<DoCheckpointOp>(DoCheckpoint {
        gid: gid.into(),
        stop,
    })
    .await
    .expect("doCheckpoint through the GCS")
}

/// Runs `script` under gca-exec at `cts`; waits until it is registered with the wrapper's PID.
pub(crate) async fn exec_job(gcs: &TestGcs, cts: &TestCts, gid: &str, script: &str) -> Wrapper {
    let url = soap_url(cts);
    let job = Wrapper::spawn(
        "gca-exec",
        &["--gid", gid, "--cts", &url, "--", "bash", "-c", script],
        cts.dir.path(),
    );
    eventually(T, "gca-exec registers the job", || async {
        cts.local.job(gid).await.is_ok_and(|j| j.pid == job.pid)
    })
    .await;
    let at_gcs = gcs_job(gcs, gid).await;
    assert_eq!(at_gcs.cts_instance, cts.name);
    assert_eq!(at_gcs.local_id, Some(job.pid.to_string()));
    job
}

/// Checkpoints and stops the job through the GCS, reaps it, and waits until its CTS has
/// forgotten it.
pub(crate) async fn stop_job(
    gcs: &TestGcs,
    cts: &TestCts,
    gid: &str,
    job: &mut Wrapper,
) -> CheckpointRecord {
    let record = checkpoint(gcs, gid, true).await;
    assert!(record.job_stopped);
    job.wait(T).await;
    eventually(T, "the CTS lets the stopped job go", || async {
        cts.local.job(gid).await.is_err()
    })
    .await;
    assert_eq!(gcs_job(gcs, gid).await.state, JobState::Stopped);
    record
}

pub(crate) async fn wait_values(log: &std::path::Path, n: usize) {
    eventually(T, "the job counts", || async { values(log).len() >= n }).await;
}

#[tokio::test]
async fn exec_checkpoint_stop_and_recover_on_the_same_resource() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-wrap-same";
    let log = a.dir.path().join("counter.log");
    let mut job = exec_job(&gcs, &a, gid, &counter_script(&log)).await;
    let pid = job.pid;
    wait_values(&log, 5).await;
    stop_job(&gcs, &a, gid, &mut job).await;
    let stopped_at = values(&log).len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        values(&log).len(),
        stopped_at,
        "the job still counts after its stop"
    );

    let socket = format!("unix:{}", a.local.socket().display());
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", "latest", "--cts", &socket],
        a.dir.path(),
    );
    rec.adopt(pid);
    eventually(T, "the job runs again under the CTS", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        a.local
            .job(gid)
            .await
            .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    wait_values(&log, stopped_at + 5).await;
    // Same PID, a child of the wrapper; the counter went on where it stopped: no restart
    // from 1, no number lost or written twice.
    let stat = gca_drivers::proc::stat(pid).expect("the restored job runs");
    assert_eq!(
        stat.ppid, rec.pid,
        "the restored job is the wrapper's child"
    );
    let v = values(&log);
    assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "{v:?}");
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(at_gcs.state, JobState::Running);
    assert_eq!(at_gcs.cts_instance, "cts-a");
    assert_eq!(at_gcs.recoveries, 1);
    assert_eq!(at_gcs.local_id, Some(pid.to_string()));

    // SIGTERM to the wrapper reaches the job, which dies of it; so does the wrapper, and the
    // GCS learns how the job ended.
    rec.signal("TERM");
    let status = rec.wait(T).await;
    assert_eq!(status.signal(), Some(15), "stderr: {}", rec.stderr_text());
    assert!(
        gca_drivers::proc::stat(pid).is_none(),
        "the job is gone and reaped"
    );
    eventually(T, "the GCS records the job finished", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.signal == Some(15)
    })
    .await;
}

#[tokio::test]
async fn recover_on_another_resource_from_an_older_image_and_exit_status_comes_through() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let b = TestCts::registered(&gcs, "cts-b", "criu", CRIU_DRIVER_HOST_PIDS, "").await;
    let gid = "gid-wrap-move";
    let log = a.dir.path().join("counter.log");
    let marker = a.dir.path().join("usr1");
    // Counts; on SIGUSR1 writes a marker and exits 7.
    let script = format!(
        "trap 'echo got-usr1 > {marker:?}; exit 7' USR1; {}",
        counter_script(&log)
    );
    let mut job = exec_job(&gcs, &a, gid, &script).await;
    let pid = job.pid;
    wait_values(&log, 5).await;
    let before = values(&log).last().copied().unwrap();
    let first = checkpoint(&gcs, gid, false).await;
    let after = values(&log).last().copied().unwrap();
    wait_values(&log, after as usize + 5).await;
    let second = stop_job(&gcs, &a, gid, &mut job).await;
    assert_ne!(first.id, second.id);
    let stopped_at = values(&log).len();

    let b_url = b.url.clone();
    let mut rec = Wrapper::spawn(
        "gca-recover",
        &["--gid", gid, "--image", &first.id, "--cts", &b_url],
        b.dir.path(),
    );
    rec.adopt(pid);
    eventually(T, "the job runs again under CTS B", || async {
        assert!(rec.running(), "gca-recover ended: {}", rec.stderr_text());
        b.local
            .job(gid)
            .await
            .is_ok_and(|j| j.pid == pid && j.state == JobState::Running)
    })
    .await;
    // B fetched the image from A into its own store.
    assert!(b.image_files(&first.id).join("pstree.img").is_file());
    wait_values(&log, stopped_at + 3).await;
    // The log is appended to: the first number written after the recovery follows the first
    // checkpoint's value, not the second's.
    let resumed = values(&log)[stopped_at];
    assert!(
        before < resumed && resumed <= after + 1,
        "resumed at {resumed}, the first checkpoint was taken between {before} and {after}"
    );
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(at_gcs.state, JobState::Running);
    assert_eq!(at_gcs.cts_instance, "cts-b");
    assert_eq!(at_gcs.recoveries, 1);

    // SIGUSR1 is forwarded; the job's exit status 7 becomes the wrapper's.
    rec.signal("USR1");
    assert_eq!(rec.code(T).await, 7, "stderr: {}", rec.stderr_text());
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "got-usr1");
    eventually(T, "the GCS records exit status 7", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.exit_status == Some(7)
    })
    .await;
}
