//! The GCS going away: a checkpoint taken meanwhile is kept and its record delivered when the
//! GCS is back; the CTS registers again on its own.

use std::time::Duration;

use gca_protocol::messages::*;
use integration_tests::cts::*;
use integration_tests::TestGcs;

#[tokio::test]
async fn records_taken_while_the_gcs_is_down_are_delivered_when_it_is_back() {
    let gcs = TestGcs::start().await;
    let addr = gcs.addr;
    let database_url = gcs.database_url.clone();
    let cts =
        TestCts::registered(&gcs, "cts-outbox", "criu", CRIU_DRIVER, "gcs_wait_secs = 1").await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-outbox", job.pid).await;
    let early = TestJob::counter(cts.dir.path());
    gcs.shutdown().await;

    // The checkpoint is taken and stored; its record waits in the outbox.
    let record: CheckpointRecord = cts
        .json
        .post("/api/v1/jobs/gid-outbox/checkpoint", &serde_json::json!({}))
        .await
        .expect("the CTS checkpoints while the GCS is down");
    assert_eq!(
        record.sequence, None,
        "no sequence number before the GCS has it"
    );
    assert!(cts.image_dir(&record.id).join("manifest.json").is_file());
    // A job registered meanwhile is accepted; its registration waits too.
    let pending = cts.register("gid-while-down", early.pid).await;
    assert_eq!(pending.gcs, gca_protocol::local::GcsDelivery::Pending);
    let status = cts.cts.link().status();
    assert!(!status.connected);
    assert_eq!(status.pending, 2);
    assert!(status.last_error.is_some());

    // The GCS comes back at the same address: the CTS registers again and delivers, in order.
    let gcs = TestGcs::start_at(addr, &database_url).await;
    eventually(
        Duration::from_secs(20),
        "the outbox is delivered",
        || async { cts.cts.link().status().pending == 0 },
    )
    .await;
    assert!(cts.cts.link().status().connected);
    let records = gcs_checkpoints(&gcs, "gid-outbox").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, record.id);
    assert_eq!(records[0].sequence, Some(1));
    assert_eq!(records[0].digest, record.digest);
    assert_eq!(
        gcs_job(&gcs, "gid-while-down").await.cts_instance,
        "cts-outbox"
    );
    // And checkpoints through the GCS work again.
    let next = gcs
        .call::<gca_protocol::ops::DoCheckpointOp>(DoCheckpoint {
            gid: "gid-outbox".into(),
            stop: false,
        })
        .await
        .unwrap();
    assert_eq!(next.sequence, Some(2));
}

/// The GCS's database going away while a record is delivered (the GCS answers
/// `ServiceUnavailable`): the record stays first in the outbox and arrives, with its sequence,
/// once the GCS can store it. Nothing is set aside as refused.
#[tokio::test]
async fn a_record_the_gcs_cannot_store_yet_is_retried_not_rejected() {
    let gcs = TestGcs::start().await;
    let addr = gcs.addr;
    let database_url = gcs.database_url.clone();
    let cts = TestCts::registered(
        &gcs,
        "cts-db-away",
        "criu",
        CRIU_DRIVER,
        "gcs_wait_secs = 1",
    )
    .await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-db-away", job.pid).await;
    gcs.pool.close().await;

    let record: CheckpointRecord = cts
        .json
        .post(
            "/api/v1/jobs/gid-db-away/checkpoint",
            &serde_json::json!({}),
        )
        .await
        .expect("the CTS checkpoints while the GCS's database is away");
    assert_eq!(record.sequence, None);
    // Give the link a few retries against the unavailable GCS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = cts.cts.link().status();
    assert_eq!(status.pending, 1, "{status:?}");
    assert_eq!(
        status.rejected, 0,
        "a database fault is no refusal: {status:?}"
    );
    assert!(
        !cts.state_dir().join("outbox").join("rejected").exists()
            || std::fs::read_dir(cts.state_dir().join("outbox").join("rejected"))
                .unwrap()
                .next()
                .is_none(),
        "nothing set aside"
    );

    gcs.shutdown().await;
    let gcs = TestGcs::start_at(addr, &database_url).await;
    eventually(
        Duration::from_secs(20),
        "the record is delivered",
        || async { cts.cts.link().status().pending == 0 },
    )
    .await;
    let records = gcs_checkpoints(&gcs, "gid-db-away").await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id, record.id);
    assert_eq!(records[0].sequence, Some(1));
    assert_eq!(cts.cts.link().status().rejected, 0);
}

/// A GCS back with an empty database (restored from nothing): the CTS sees its instance
/// registration answered `Created`, registers its running jobs again, and checkpoints through
/// the GCS work without anyone re-submitting the jobs.
#[tokio::test]
async fn a_gcs_that_lost_its_database_gets_the_running_jobs_again() {
    let gcs = TestGcs::start().await;
    let addr = gcs.addr;
    let cts = TestCts::registered(&gcs, "cts-resync", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-resync", job.pid).await;
    gcs.shutdown().await;

    let empty = integration_tests::db::fresh_database_url().await;
    let gcs = TestGcs::start_at(addr, &empty).await;
    // The site admin registers the type again; the CTS does the rest.
    register_type(&gcs, "criu").await;
    eventually(
        Duration::from_secs(30),
        "the job is registered again",
        || async {
            gcs.call::<gca_protocol::ops::GetJobOp>(GidRequest {
                gid: "gid-resync".into(),
            })
            .await
            .is_ok()
        },
    )
    .await;
    let job_at_gcs = gcs_job(&gcs, "gid-resync").await;
    assert_eq!(job_at_gcs.cts_instance, "cts-resync");
    // Counted once the GCS has answered the CTS, which may be a moment after it knows the job.
    eventually(
        Duration::from_secs(5),
        "the CTS counts the job registered again",
        || async { cts.cts.link().status().reregistered_jobs >= 1 },
    )
    .await;
    let record = gcs
        .call::<gca_protocol::ops::DoCheckpointOp>(DoCheckpoint {
            gid: "gid-resync".into(),
            stop: false,
        })
        .await
        .expect("checkpoints through the new GCS");
    assert_eq!(record.sequence, Some(1));
}

/// While the GCS is unreachable, a checkpoint whose image is committed and whose record is
/// queued no longer holds its job: the next on-demand checkpoint is taken instead of being
/// refused as `checkpoint-in-progress`.
#[tokio::test]
async fn a_job_is_free_for_its_next_checkpoint_once_the_image_is_queued() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-unlocked",
        "criu",
        CRIU_DRIVER,
        "gcs_wait_secs = 5",
    )
    .await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-unlocked", job.pid).await;
    gcs.shutdown().await;

    let post = || async {
        cts.json
            .post::<_, CheckpointRecord>(
                "/api/v1/jobs/gid-unlocked/checkpoint",
                &serde_json::json!({}),
            )
            .await
    };
    let (first, second) = tokio::join!(post(), async {
        // The first image is committed and queued, its request still waiting for the GCS.
        let outbox = cts.state_dir().join("outbox");
        eventually(
            Duration::from_secs(10),
            "the first record is queued",
            || {
                let queued = std::fs::read_dir(&outbox).is_ok_and(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
                });
                async move { queued }
            },
        )
        .await;
        post().await
    });
    let first = first.expect("the first checkpoint is kept");
    let second = second.expect("the second is taken, not refused as in progress");
    assert_ne!(first.id, second.id);
    assert_eq!(cts.cts.link().status().pending, 2);
}
