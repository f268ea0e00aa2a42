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
