//! The application-level driver (class `basic`): the job checkpoints itself when signalled,
//! or on its own, into the directory the CTS gave it.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::TestGcs;

#[tokio::test]
async fn a_requested_checkpoint_holds_the_jobs_own_state() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-app", "app-level", APP_DRIVER, "").await;
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    let registered = cts.register("gid-app", job.pid).await;
    // The CTS type's environment, expanded for this job.
    let env: std::collections::BTreeMap<_, _> = registered
        .environment
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(env.get("GCA_GID"), Some(&"gid-app"));
    assert_eq!(
        env.get("GCA_CHECKPOINT_DIR").copied(),
        Some(registered.checkpoint_dir.to_str().unwrap())
    );
    job.start(&registered);
    job.wait_for_values(5).await;
    let before = job.last();
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-app".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint");
    assert_eq!(record.sequence, Some(1));
    assert_eq!(record.cts_type, "app-level");
    let image = cts.image_dir(&record.id);
    let state: u64 = std::fs::read_to_string(image.join("state"))
        .expect("the job's state file is in the image")
        .trim()
        .parse()
        .expect("the state is the counter");
    assert!(
        state >= before,
        "state {state} is older than the request ({before})"
    );
    // The handshake is over: the job's directory is empty again, and the job runs on.
    eventually(
        Duration::from_secs(2),
        "the checkpoint directory is handed back",
        || async {
            std::fs::read_dir(&registered.checkpoint_dir)
                .map(|d| d.count() == 0)
                .unwrap_or(false)
        },
    )
    .await;
    job.wait_past(state + 2).await;
    assert!(job.running());
}

#[tokio::test]
async fn checkpoints_the_job_takes_on_its_own_are_registered() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-app-self",
        "app-level",
        APP_DRIVER,
        "[checkpoint]\ninternal_poll_ms = 50",
    )
    .await;
    let job = TestJob::app_counter(cts.dir.path(), &[("APP_SELF_CHECKPOINT_EVERY", "5")]);
    job.start(&cts.register("gid-app-self", job.pid).await);
    eventually(
        Duration::from_secs(10),
        "the job's own checkpoints reach the GCS",
        || async { gcs_checkpoints(&gcs, "gid-app-self").await.len() >= 2 },
    )
    .await;
    let records = gcs_checkpoints(&gcs, "gid-app-self").await;
    assert!(
        records.iter().all(|r| r.origin == Origin::Job),
        "{records:?}"
    );
    let first: u64 = std::fs::read_to_string(cts.image_dir(&records[0].id).join("state"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let second: u64 = std::fs::read_to_string(cts.image_dir(&records[1].id).join("state"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        second > first,
        "checkpoints in order: {first} then {second}"
    );
}

#[tokio::test]
async fn stop_after_checkpoint_terminates_the_job() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-app-stop", "app-level", APP_DRIVER, "").await;
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    job.start(&cts.register("gid-app-stop", job.pid).await);
    job.wait_for_values(3).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-app-stop".into(),
            stop: true,
        })
        .await
        .unwrap();
    assert!(record.job_stopped);
    assert!(!job.running());
    assert_eq!(gcs_job(&gcs, "gid-app-stop").await.state, JobState::Stopped);
    assert!(cts.image_dir(&record.id).join("state").is_file());
}

#[tokio::test]
async fn a_request_waits_for_the_collection_of_the_jobs_own_checkpoint() {
    // The job checkpoints itself all the time and the CTS collects every 10 ms, holding the
    // job's checkpoint lock while it stores what it found: back-to-back broker requests
    // (busy_wait_secs = 0) wait for that instead of being refused as `checkpoint-in-progress`.
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-app-busy",
        "app-level",
        APP_DRIVER,
        "[checkpoint]\ninternal_poll_ms = 10",
    )
    .await;
    let job = TestJob::app_counter(cts.dir.path(), &[("APP_SELF_CHECKPOINT_EVERY", "1")]);
    job.start(&cts.register("gid-app-busy", job.pid).await);
    eventually(
        Duration::from_secs(10),
        "the job's own checkpoints are collected",
        || async { !gcs_checkpoints(&gcs, "gid-app-busy").await.is_empty() },
    )
    .await;
    for i in 1..=20 {
        let record = gcs
            .call::<DoCheckpointOp>(DoCheckpoint {
                gid: "gid-app-busy".into(),
                stop: false,
            })
            .await
            .unwrap_or_else(|f| panic!("request {i} refused: {f:?}"));
        assert_eq!(record.origin, Origin::External);
    }
    let records = gcs_checkpoints(&gcs, "gid-app-busy").await;
    assert!(
        records.iter().any(|r| r.origin == Origin::Job),
        "the job's own checkpoints went on meanwhile"
    );
}
