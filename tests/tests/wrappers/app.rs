//! The application-level type: gca-exec runs examples/app-counter.sh; after a checkpoint and
//! stop, gca-recover restarts it with the type's `--restart-from={CHECKPOINT_DIR}`.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::wrappers::*;
use integration_tests::TestGcs;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn app_level_job_restarts_from_its_checkpoint() {
    let gcs = TestGcs::start().await;
    let a = TestCts::registered(&gcs, "app-a", "app-level", APP_DRIVER, "").await;
    let gid = "gid-wrap-app";
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/app-counter.sh")
        .display()
        .to_string();
    let log = a.dir.path().join("app.log");
    let log_s = log.display().to_string();
    let url = a.url.clone();
    let mut job = Wrapper::spawn(
        "gca-exec",
        &["--gid", gid, "--cts", &url, "--", "bash", &script, &log_s],
        a.dir.path(),
    );
    eventually(T, "the job runs registered", || async {
        a.local.job(gid).await.is_ok() && values(&log).len() >= 3
    })
    .await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: true,
        })
        .await
        .expect("checkpoint and stop");
    assert_eq!(job.code(T).await, 0, "app-counter exits 0 when stopped");
    eventually(T, "the CTS lets the stopped job go", || async {
        a.local.job(gid).await.is_err()
    })
    .await;
    let saved: u64 = std::fs::read_to_string(a.image_files(&record.id).join("state"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stopped_at = values(&log).len();

    let mut rec = Wrapper::spawn(
        "gca-recover",
        &[
            "--gid", gid, "--image", "latest", "--cts", &url, "--", "bash", &script, &log_s,
        ],
        a.dir.path(),
    );
    eventually(T, "the restarted job counts", || async {
        values(&log).len() >= stopped_at + 3
    })
    .await;
    let local = a.local.job(gid).await.expect("registered again");
    rec.adopt(local.pid);
    assert_eq!(
        values(&log)[stopped_at],
        saved + 1,
        "continues from the checkpoint"
    );
    assert_eq!(local.state, JobState::Running);
    assert_ne!(local.pid, rec.pid);
    let at_gcs = gcs_job(&gcs, gid).await;
    assert_eq!(at_gcs.state, JobState::Running);
    assert_eq!(at_gcs.recoveries, 1);

    // SIGTERM reaches the job, which finishes its step and exits 0; so does the wrapper.
    rec.signal("TERM");
    assert_eq!(rec.code(T).await, 0, "{}", rec.stderr_text());
    eventually(T, "the GCS records the job finished", || async {
        let j = gcs_job(&gcs, gid).await;
        j.state == JobState::Finished && j.exit_status == Some(0)
    })
    .await;
}
