//! The object-store tier from a CTS (issue 12): with `store.durability = "replicated"` a
//! checkpoint is in the bucket (sealed under the job's key from the GCS) before its record is
//! answered; with `async` it gets there in the background. A real 3-node Garage cluster
//! (`scripts/garage-cluster`; Garage from `scripts/install-garage`, which `scripts/install-deps`
//! runs): the test fails, it does not skip, when Garage is missing.

use std::time::Duration;

use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::garage::Cluster;
use integration_tests::TestGcs;

async fn checkpointed(gcs: &TestGcs, cts: &TestCts, gid: &str) -> (CheckpointRecord, TestJob) {
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    let registered = cts.register(gid, job.pid).await;
    job.start(&registered);
    job.wait_for_values(3).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: gid.into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint");
    (record, job)
}

#[tokio::test]
async fn a_replicated_checkpoint_is_in_the_bucket_when_it_is_answered() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-tier",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-tier-r").await;
    assert_eq!(record.sequence, Some(1));
    // At once: the sealed manifest is there, byte for byte the local one, and every chunk.
    let job = garage.job(&gcs, "cts-tier", "gid-tier-r").await;
    let remote = job
        .get_manifest(&record.id)
        .await
        .unwrap()
        .expect("the manifest is in the bucket when the checkpoint is answered");
    let local =
        std::fs::read(cts.image_dir(&record.id).join("manifest.json")).expect("local manifest");
    assert_eq!(remote, local);
    let manifest = gca_store::Manifest::parse(&remote).unwrap();
    assert!(manifest.is_chunked());
    let chunks = manifest.chunk_set();
    assert!(!chunks.is_empty());
    let ids: Vec<_> = chunks.keys().cloned().collect();
    let all = tokio::task::spawn_blocking(move || {
        use gca_store::ChunkBackend;
        ids.iter()
            .all(|c| job.read(c).is_ok_and(|d| gca_store::ChunkId::of(&d) == *c))
    })
    .await
    .unwrap();
    assert!(
        all,
        "every chunk of the image is in the bucket and opens to itself"
    );
}

#[tokio::test]
async fn an_async_checkpoint_reaches_the_bucket_after_it_is_answered() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-tier-a",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("async"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-tier-a").await;
    assert_eq!(record.sequence, Some(1));
    let job = garage.job(&gcs, "cts-tier-a", "gid-tier-a").await;
    let id = record.id.clone();
    eventually(
        Duration::from_secs(20),
        "the manifest reaches the bucket",
        || {
            let job = &job;
            let id = id.clone();
            async move { matches!(job.get_manifest(&id).await, Ok(Some(_))) }
        },
    )
    .await;
}
