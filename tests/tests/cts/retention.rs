//! The retention policy end to end: a real GCS, a real CTS (application-level driver) and real
//! jobs. When a job ends, the GCS has the CTS delete its images, or move the ones the owner
//! keeps into the owner's directory; a job that fails keeps them for recovery.

use std::time::Duration;

use gca_protocol::local::FetchImage;
use gca_protocol::messages::*;
use gca_protocol::ops::{DoCheckpointOp, GetCheckpointsOp, SetRetentionOp};
use integration_tests::cts::*;
use integration_tests::TestGcs;

async fn gcs() -> TestGcs {
    TestGcs::start_with(|c| {
        c.notify_poll_millis = 50;
        c.image_task_retry_base_millis = 50;
        c.image_task_retry_max_secs = 1;
    })
    .await
}

/// Starts the demo job under `cts` as `gid` and takes `n` checkpoints through the GCS.
async fn job_with_checkpoints(
    gcs: &TestGcs,
    cts: &TestCts,
    gid: &str,
    n: usize,
) -> (TestJob, Vec<CheckpointRecord>) {
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    job.start(&cts.register(gid, job.pid).await);
    job.wait_for_values(2).await;
    let mut records = Vec::new();
    for _ in 0..n {
        let r = gcs
            .call::<DoCheckpointOp>(DoCheckpoint {
                gid: gid.into(),
                stop: false,
            })
            .await
            .expect("doCheckpoint");
        assert!(cts.image_dir(&r.id).exists());
        records.push(r);
    }
    (job, records)
}

fn signal(job: &TestJob, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &job.pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the GCS knows the job ended and no image of it is being deleted or kept.
async fn settled(gcs: &TestGcs, gid: &str) -> Vec<CheckpointRecord> {
    eventually(
        Duration::from_secs(20),
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
async fn images_are_deleted_when_the_job_exits_0_and_kept_when_it_fails() {
    let gcs = gcs().await;
    let cts = TestCts::registered(&gcs, "cts-ret", "app-level", APP_DRIVER, "").await;

    // Exits 0 (SIGTERM makes the demo job finish its step and exit 0): images deleted.
    let (done, records) = job_with_checkpoints(&gcs, &cts, "gid-done", 2).await;
    signal(&done, "TERM");
    let after = settled(&gcs, "gid-done").await;
    assert_eq!(gcs_job(&gcs, "gid-done").await.exit_status, Some(0));
    assert!(
        after.iter().all(|c| c.image_state == ImageState::Deleted),
        "{after:#?}"
    );
    for r in &records {
        assert!(
            !cts.image_dir(&r.id).exists(),
            "image {} is still in the CTS's store",
            r.id
        );
    }

    // A recovery wrapper cannot have a deleted image fetched: the CTS asks the GCS.
    let fetch = |gid: &str, id: &str, digest: Option<String>| FetchImage {
        gid: gid.into(),
        checkpoint_id: id.into(),
        digest,
    };
    let err = cts
        .local
        .fetch_image(&fetch("gid-done", &records[1].id, None))
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some("image-not-stored"), "{err:?}");
    assert!(err.message.contains("deleted"), "{}", err.message);

    // Killed: the images stay, they are what recovers it.
    let (killed, records) = job_with_checkpoints(&gcs, &cts, "gid-killed", 1).await;
    signal(&killed, "KILL");
    let after = settled(&gcs, "gid-killed").await;
    assert_eq!(gcs_job(&gcs, "gid-killed").await.signal, Some(9));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(after[0].image_state, ImageState::Stored);
    assert!(cts.image_dir(&records[0].id).exists());
    let ok = cts
        .local
        .fetch_image(&fetch(
            "gid-killed",
            &records[0].id,
            records[0].digest.clone(),
        ))
        .await
        .expect("a stored image is verified in place");
    assert!(!ok.fetched);
    // What the caller claims is checked against the GCS's record, not trusted.
    let err = cts
        .local
        .fetch_image(&fetch(
            "gid-killed",
            &records[0].id,
            Some(format!("sha256:{}", "00".repeat(32))),
        ))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("the GCS records digest"),
        "{}",
        err.message
    );
    let err = cts
        .local
        .fetch_image(&fetch("gid-done", &records[0].id, None))
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some("unknown-checkpoint"), "{err:?}");
}

#[tokio::test]
async fn the_owner_keeps_the_newest_images_in_their_directory() {
    let gcs = gcs().await;
    let cts = TestCts::registered(&gcs, "cts-keep", "app-level", APP_DRIVER, "").await;
    let keep = cts.dir.path().join("alice-checkpoints");
    std::fs::create_dir(&keep).unwrap();

    let (job, records) = job_with_checkpoints(&gcs, &cts, "gid-keep", 3).await;
    // Later than at submission: the owner asks to keep the newest two.
    gcs.call::<SetRetentionOp>(SetRetention {
        gid: "gid-keep".into(),
        retention: Retention::last(2, keep.to_str().unwrap()),
    })
    .await
    .unwrap();
    signal(&job, "TERM");
    let after = settled(&gcs, "gid-keep").await;
    assert_eq!(
        after.iter().map(|c| c.image_state).collect::<Vec<_>>(),
        vec![ImageState::Deleted, ImageState::Kept, ImageState::Kept],
        "{after:#?}"
    );
    for (r, c) in records.iter().zip(&after).skip(1) {
        let kept = keep.join(&r.id);
        assert_eq!(c.kept_in.as_deref(), kept.to_str());
        // The whole image, verified: the job's state and the manifest with the same digest.
        let state = std::fs::read_to_string(kept.join("state")).expect("the job's state");
        assert!(state.trim().parse::<u64>().is_ok(), "{state:?}");
        let manifest = std::fs::read(kept.join("manifest.json")).unwrap();
        assert_eq!(
            Some(gca_store::Manifest::digest_of(&manifest)),
            r.digest,
            "the kept image is the one the GCS recorded"
        );
        assert!(!cts.image_dir(&r.id).exists(), "moved, not copied");
    }
    assert!(!keep.join(&records[0].id).exists());
    assert!(!cts.image_dir(&records[0].id).exists());
}

#[tokio::test]
async fn copies_fetched_for_a_recovery_go_when_the_job_ends() {
    let gcs = gcs().await;
    let a = TestCts::registered(&gcs, "cts-copy-a", "app-level", APP_DRIVER, "").await;
    let b = TestCts::registered(
        &gcs,
        "cts-copy-b",
        "app-level",
        APP_DRIVER,
        "[store]\nreconcile_secs = 1",
    )
    .await;
    let (job, records) = job_with_checkpoints(&gcs, &a, "gid-copy", 1).await;
    let id = &records[0].id;
    // The job's node fails; a recovery on B gets the image there (and then fails too).
    signal(&job, "KILL");
    settled(&gcs, "gid-copy").await;
    let wrapper = integration_tests::cts::TestJob::script(b.dir.path(), "sleep 60", &[]);
    b.local
        .register(&gca_protocol::local::RegisterLocalJob {
            gid: "gid-copy".into(),
            pid: wrapper.pid,
            periodic_interval_secs: None,
            recovery: Some(gca_protocol::local::LocalRecovery {
                from_checkpoint: Some(id.clone()),
                restoring: true,
            }),
            retention: None,
            limits: None,
        })
        .await
        .expect("the recovery registered on B");
    let fetched = b
        .local
        .fetch_image(&FetchImage {
            gid: "gid-copy".into(),
            checkpoint_id: id.clone(),
            digest: records[0].digest.clone(),
        })
        .await
        .unwrap();
    assert!(fetched.fetched && b.image_dir(id).exists());
    b.local
        .abandon("gid-copy")
        .await
        .expect("the recovery withdrawn");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        b.image_dir(id).exists(),
        "a copy of a stored image stays: the job may be recovered from it"
    );

    // The owner gives up on the job: destroying it ends it, and with it every copy.
    let (status, body) = integration_tests::post_raw(
        &format!("{}/jobs/gid-copy", gcs.endpoint()),
        "text/xml; charset=utf-8",
        None,
        integration_tests::envelope11(
            "http://docs.oasis-open.org/wsrf/rlw-2/ImmediateResourceTermination/DestroyRequest",
            "<wsrf-rl:Destroy xmlns:wsrf-rl=\"http://docs.oasis-open.org/wsrf/rl-2\"/>",
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let after = settled(&gcs, "gid-copy").await;
    assert_eq!(after[0].image_state, ImageState::Deleted);
    assert!(!a.image_dir(id).exists(), "the GCS deleted the original");
    eventually(
        Duration::from_secs(10),
        "B's reconciliation removes its copy",
        || async { !b.image_dir(id).exists() },
    )
    .await;
}

/// A job with more records than one GetCheckpoints page (2 here): the CTS follows the pages
/// where it reads a job's records — the recoverable checkpoints and the recovery information
/// it gives the wrappers, and its store's reconciliation (issue 15: one answer of every record
/// broke recovery of a job with many).
#[tokio::test]
async fn the_cts_follows_the_pages_of_a_job_with_many_records() {
    let gcs = TestGcs::start_with(|c| {
        c.notify_poll_millis = 50;
        c.checkpoints_page_size = 2;
    })
    .await;
    let cts = TestCts::registered(&gcs, "cts-pages", "app-level", APP_DRIVER, "").await;
    let (job, records) = job_with_checkpoints(&gcs, &cts, "gid-pages", 5).await;
    let first = gcs
        .call::<GetCheckpointsOp>(GetCheckpoints::of("gid-pages"))
        .await
        .unwrap();
    assert_eq!(first.checkpoints.len(), 2);
    assert_eq!(first.next, Some(2), "more than one page");

    let recoverable = cts
        .local
        .recoverable_checkpoints("gid-pages")
        .await
        .expect("recoverable checkpoints");
    let ids: Vec<&str> = recoverable.iter().map(|r| r.id.as_str()).collect();
    let newest_first: Vec<&str> = records.iter().rev().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, newest_first, "every record, from every page");
    // The newest record is on the last page.
    let info = cts
        .local
        .recovery_info("gid-pages", &records[4].id)
        .await
        .expect("the recovery information of a record on the last page");
    assert_eq!(info.checkpoint.id, records[4].id);
    signal(&job, "KILL");
}

/// The CTS's local answer of recoverable checkpoints is bounded too: the newest 100, read
/// from the GCS's pages (7 records each here), newest first.
#[tokio::test]
async fn the_recoverable_checkpoints_a_wrapper_reads_are_the_newest_hundred() {
    let gcs = TestGcs::start_with(|c| {
        c.notify_poll_millis = 50;
        c.checkpoints_page_size = 7;
    })
    .await;
    let cts = TestCts::registered(&gcs, "cts-many", "app-level", APP_DRIVER, "").await;
    let (job, records) = job_with_checkpoints(&gcs, &cts, "gid-many", 103).await;
    let recoverable = cts
        .local
        .recoverable_checkpoints("gid-many")
        .await
        .expect("recoverable checkpoints");
    let ids: Vec<&str> = recoverable.iter().map(|r| r.id.as_str()).collect();
    let newest: Vec<&str> = records
        .iter()
        .rev()
        .take(100)
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(ids, newest);
    signal(&job, "KILL");
}
