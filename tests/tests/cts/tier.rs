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

/// A GCS whose retention tasks run at once and retry fast.
async fn quick_gcs() -> TestGcs {
    TestGcs::start_with(|c| {
        c.notify_poll_millis = 50;
        c.image_task_retry_base_millis = 50;
        c.image_task_retry_max_secs = 1;
    })
    .await
}

fn object_store_location(r: &CheckpointRecord) -> Option<&ImageLocation> {
    r.locations
        .iter()
        .find(|l| l.kind == LocationKind::ObjectStore)
}

fn signal(job: &TestJob, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &job.pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits until the job has finished at the GCS and none of its images is being deleted or
/// kept.
async fn settled(gcs: &TestGcs, gid: &str) -> Vec<CheckpointRecord> {
    eventually(
        Duration::from_secs(30),
        "the job finished and its image tasks are done",
        || async {
            gcs_job(gcs, gid).await.state == JobState::Finished
                && gcs_checkpoints(gcs, gid)
                    .await
                    .iter()
                    .all(|c| !matches!(c.image_state, ImageState::Deleting | ImageState::Keeping))
        },
    )
    .await;
    gcs_checkpoints(gcs, gid).await
}

#[tokio::test]
async fn a_replicated_record_lists_its_cts_and_the_object_store_at_once() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-loc-r",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-loc-r").await;
    for r in [
        record.clone(),
        gcs_checkpoints(&gcs, "gid-loc-r").await[0].clone(),
    ] {
        assert_eq!(r.locations.len(), 2, "{:#?}", r.locations);
        let here = &r.locations[0];
        assert_eq!(
            (here.kind, here.name.as_str(), here.state),
            (LocationKind::Cts, "cts-loc-r", LocationState::Stored)
        );
        assert_eq!(here.url.as_deref(), Some(r.image_name.as_str()));
        let bucket = &r.locations[1];
        assert_eq!(bucket.kind, LocationKind::ObjectStore);
        assert_eq!(bucket.state, LocationState::Stored);
        // Its identity: the bucket and prefix, never a key.
        assert!(
            bucket.name.starts_with("s3://") && bucket.name.ends_with("/cts-test"),
            "{}",
            bucket.name
        );
        assert!(bucket.since.is_some());
    }
}

#[tokio::test]
async fn an_async_records_object_store_location_goes_from_pending_to_stored() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-loc-a",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("async"),
    )
    .await;
    let (record, _job) = checkpointed(&gcs, &cts, "gid-loc-a").await;
    // Registered `pending` (the answer may already show the upload's end: it races it).
    let first = object_store_location(&record).expect("an object-store location");
    assert!(
        matches!(first.state, LocationState::Pending | LocationState::Stored),
        "{first:?}"
    );
    let registered_at = record.registered_at.expect("registered");
    eventually(
        Duration::from_secs(30),
        "the record's object-store location becomes stored",
        || async {
            gcs_checkpoints(&gcs, "gid-loc-a").await[0]
                .locations
                .iter()
                .any(|l| l.kind == LocationKind::ObjectStore && l.state == LocationState::Stored)
        },
    )
    .await;
    let r = gcs_checkpoints(&gcs, "gid-loc-a").await.remove(0);
    let l = object_store_location(&r).unwrap();
    assert!(
        l.since.unwrap() > registered_at,
        "stored by a later report than the registration (it was pending): {l:?}"
    );
    assert_eq!(l.error, None);
    // And the image is there.
    let job = garage.job(&gcs, "cts-loc-a", "gid-loc-a").await;
    assert!(job.get_manifest(&r.id).await.unwrap().is_some());
    // The recovery information shows the same locations.
    let info = gcs
        .call::<gca_protocol::ops::GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "gid-loc-a".into(),
            image: "latest".into(),
        })
        .await
        .expect("GetRecoveryInfo");
    assert_eq!(info.checkpoint.locations, r.locations);
}

#[tokio::test]
async fn a_job_that_ends_takes_its_objects_from_the_bucket() {
    let garage = Cluster::start();
    let gcs = quick_gcs().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-gc",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let (first, job) = checkpointed(&gcs, &cts, "gid-gc").await;
    job.wait_past(job.last() + 2).await;
    let second = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-gc".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint");
    let before = garage.object_names().await;
    assert!(
        before.iter().filter(|n| n.ends_with("/manifest")).count() == 2,
        "{before:#?}"
    );
    // Exit 0 (SIGTERM: the demo job finishes its step): the default policy deletes both.
    signal(&job, "TERM");
    let after = settled(&gcs, "gid-gc").await;
    assert!(
        after.iter().all(|c| c.image_state == ImageState::Deleted),
        "{after:#?}"
    );
    assert!(after.iter().all(|c| c.locations.is_empty()), "{after:#?}");
    for r in [&first, &second] {
        assert!(!cts.image_dir(&r.id).exists());
    }
    let left = garage.object_names().await;
    assert!(
        left.is_empty(),
        "nothing of the job is left in the bucket: {left:#?}"
    );
}

#[tokio::test]
async fn keeping_the_last_image_leaves_exactly_its_objects_in_the_bucket() {
    let garage = Cluster::start();
    let gcs = quick_gcs().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-gc-keep",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let keep = cts.dir.path().join("owner-checkpoints");
    std::fs::create_dir(&keep).unwrap();
    let (first, job) = checkpointed(&gcs, &cts, "gid-gc-keep").await;
    let mut records = vec![first];
    for _ in 0..2 {
        job.wait_past(job.last() + 2).await;
        records.push(
            gcs.call::<DoCheckpointOp>(DoCheckpoint {
                gid: "gid-gc-keep".into(),
                stop: false,
            })
            .await
            .expect("doCheckpoint"),
        );
    }
    gcs.call::<gca_protocol::ops::SetRetentionOp>(SetRetention {
        gid: "gid-gc-keep".into(),
        retention: Retention::last(1, keep.to_str().unwrap()),
    })
    .await
    .unwrap();
    signal(&job, "TERM");
    let after = settled(&gcs, "gid-gc-keep").await;
    assert_eq!(
        after.iter().map(|c| c.image_state).collect::<Vec<_>>(),
        vec![ImageState::Deleted, ImageState::Deleted, ImageState::Kept],
        "{after:#?}"
    );
    // The kept one's record lists the object store only (its CTS copy moved to the owner).
    let kept = &after[2];
    assert_eq!(
        kept.locations.iter().map(|l| l.kind).collect::<Vec<_>>(),
        vec![LocationKind::ObjectStore],
        "{kept:#?}"
    );
    // In the bucket: the kept image's manifest and exactly the chunks it names.
    let bucket = garage.job(&gcs, "cts-gc-keep", "gid-gc-keep").await;
    assert_eq!(bucket.images().await.unwrap(), vec![kept.id.clone()]);
    let manifest =
        gca_store::Manifest::parse(&bucket.get_manifest(&kept.id).await.unwrap().expect("kept"))
            .unwrap();
    let wanted: Vec<_> = manifest.chunk_set().into_keys().collect();
    // Chunks travel in packs (each with its index): a pack goes once none of its chunks is
    // kept, so what is left is the manifest and the packs holding the kept chunks.
    let names = garage.object_names().await;
    let packs = names
        .iter()
        .filter(|n| n.contains("/packs/") && !n.ends_with(".index"))
        .count();
    assert!((1..=3).contains(&packs), "{names:#?}");
    assert_eq!(names.len(), 1 + 2 * packs, "{names:#?}");
    let all_there = tokio::task::spawn_blocking(move || {
        use gca_store::ChunkBackend;
        wanted.iter().all(|c| bucket.has(c).unwrap())
    })
    .await
    .unwrap();
    assert!(all_there, "every chunk of the kept image is in the bucket");
}

#[tokio::test]
async fn a_flipped_byte_in_a_remote_chunk_stops_a_recovery_from_the_bucket() {
    let garage = Cluster::start();
    let gcs = TestGcs::start().await;
    let mut a = TestCts::registered(
        &gcs,
        "cts-flip-a",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let b = TestCts::registered(
        &gcs,
        "cts-flip-b",
        "app-level",
        APP_DRIVER,
        &garage.cts_extra("replicated"),
    )
    .await;
    let (record, job) = checkpointed(&gcs, &a, "gid-flip").await;
    let manifest = a.image_manifest(&record.id);
    // The job's resource fails: its job and its CTS are gone.
    signal(&job, "KILL");
    eventually(
        Duration::from_secs(20),
        "the GCS learns the job failed",
        || async { gcs_job(&gcs, "gid-flip").await.state == JobState::Finished },
    )
    .await;
    a.stop().await;
    // One chunk in the bucket altered.
    let names = garage.object_names().await;
    let chunk = names
        .iter()
        .find(|n| n.contains("/packs/") && !n.ends_with(".index"))
        .expect("a pack of chunks in the bucket");
    garage.flip_byte(chunk).await;
    let wrapper = TestJob::script(b.dir.path(), "sleep 60", &[]);
    b.local
        .register(&gca_protocol::local::RegisterLocalJob {
            gid: "gid-flip".into(),
            pid: wrapper.pid,
            periodic_interval_secs: None,
            recovery: Some(gca_protocol::local::LocalRecovery {
                from_checkpoint: Some(record.id.clone()),
                restoring: true,
            }),
            retention: None,
            limits: None,
        })
        .await
        .expect("the recovery registered on B");
    let f = b
        .local
        .fetch_image(&gca_protocol::local::FetchImage {
            gid: "gid-flip".into(),
            checkpoint_id: record.id.clone(),
            digest: record.digest.clone(),
        })
        .await
        .expect_err("an altered chunk is refused");
    assert_eq!(f.code.as_deref(), Some("image-corrupt"), "{f:?}");
    assert!(f.message.contains(&record.id), "{}", f.message);
    let named = manifest
        .chunk_set()
        .into_keys()
        .any(|c| f.message.contains(&c.to_hex()));
    assert!(named, "the fault names the chunk: {}", f.message);
    assert!(
        !b.image_dir(&record.id).exists(),
        "nothing of the image is committed on B"
    );
}
