//! CRIU through the GCS: the broker's doCheckpoint reaches the CTS in charge, CRIU dumps the
//! real job, the image lands in the store with its manifest, the record at the GCS.

use std::time::Duration;

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::TestGcs;

#[tokio::test]
async fn do_checkpoint_through_the_gcs_dumps_the_job_and_keeps_it_running() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-a", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    job.wait_for_values(3).await;
    let local = cts.register("gid-criu-1", job.pid).await;
    assert_eq!(local.pid, job.pid);
    assert_eq!(local.gcs, gca_protocol::local::GcsDelivery::Registered);
    let at_gcs = gcs_job(&gcs, "gid-criu-1").await;
    assert_eq!(at_gcs.cts_instance, "cts-a");
    assert_eq!(
        at_gcs.local_id.as_deref(),
        Some(job.pid.to_string().as_str())
    );

    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-criu-1".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint through the GCS");
    assert_eq!(record.gid, "gid-criu-1");
    assert_eq!(record.sequence, Some(1));
    assert_eq!(record.cts_name, "cts-a");
    assert_eq!(record.cts_type, "criu");
    assert_eq!(record.origin, Origin::External);
    assert!(!record.job_stopped);
    assert!(record
        .image_name
        .ends_with(&format!("/images/{}", record.id)));

    // The image is in the store: CRIU's files, its log and statistics, and the manifest.
    let dir = cts.image_files(&record.id);
    for f in [
        "manifest.json",
        "pstree.img",
        "inventory.img",
        "dump.log",
        "stats-dump",
    ] {
        assert!(
            dir.join(f).is_file(),
            "{f} missing from the image {}",
            dir.display()
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().expect("manifest lists files");
    assert!(files.iter().any(|f| f["path"] == "pstree.img"
        && f["chunks"].as_array().is_some_and(|c| !c.is_empty()
            && c.iter()
                .all(|c| c["id"].as_str().is_some_and(|h| h.len() == 64)))));
    assert_eq!(manifest["format"], 2);
    assert_eq!(manifest["chunk_hash"], "blake3");
    // Served over HTTP with the digest the GCS recorded.
    let resp = integration_tests::http()
        .get(&record.image_name)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-gca-digest")
            .and_then(|v| v.to_str().ok()),
        record.digest.as_deref()
    );

    // The job still runs and keeps counting.
    let before = job.last();
    job.wait_past(before + 3).await;
    assert!(job.running());

    // The record is at the GCS; a second checkpoint gets the next sequence number.
    let second = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-criu-1".into(),
            stop: false,
        })
        .await
        .unwrap();
    assert_eq!(second.sequence, Some(2));
    assert_ne!(second.id, record.id);
    let listed = gcs_checkpoints(&gcs, "gid-criu-1").await;
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.id.clone(), r.sequence))
            .collect::<Vec<_>>(),
        vec![(record.id.clone(), Some(1)), (second.id.clone(), Some(2))]
    );
    assert_eq!(listed[0].digest, record.digest);
    let status: serde_json::Value = cts.json.get("/api/v1/status").await.unwrap();
    assert_eq!(status["load"]["jobs"], 1);
    assert_eq!(status["load"]["checkpoints_taken"], 2);
    assert_eq!(status["descriptor"]["name"], "criu");
}

#[tokio::test]
async fn checkpoint_and_stop_for_migration() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-stop", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    job.wait_for_values(2).await;
    cts.register("gid-stop", job.pid).await;
    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-stop".into(),
            stop: true,
        })
        .await
        .unwrap();
    assert!(record.job_stopped);
    assert!(
        !job.running(),
        "the job must be stopped after a stop checkpoint"
    );
    assert!(cts.image_files(&record.id).join("pstree.img").is_file());
    let frozen = job.last();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(job.last(), frozen, "a stopped job writes nothing more");
    // The GCS knows it is stopped (not finished), and the CTS lets it go.
    assert_eq!(gcs_job(&gcs, "gid-stop").await.state, JobState::Stopped);
    eventually(
        Duration::from_secs(5),
        "the CTS forgets the stopped job",
        || async { cts.cts.list_jobs(None).is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gcs_job(&gcs, "gid-stop").await.state, JobState::Stopped);
    // Checkpointing it again is refused clearly at the GCS.
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-stop".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("stopped"), "{}", err.message);
}

#[tokio::test]
async fn periodic_checkpoints_are_registered_as_internal() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-periodic", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    let local = cts
        .local
        .register(&gca_protocol::local::RegisterLocalJob {
            gid: "gid-periodic".into(),
            pid: job.pid,
            periodic_interval_secs: Some(1),
            recovery: None,
            retention: None,
            limits: None,
        })
        .await
        .unwrap();
    assert_eq!(local.periodic_interval_secs, Some(1));
    eventually(
        Duration::from_secs(15),
        "two periodic checkpoints are at the GCS",
        || async { gcs_checkpoints(&gcs, "gid-periodic").await.len() >= 2 },
    )
    .await;
    let records = gcs_checkpoints(&gcs, "gid-periodic").await;
    assert!(records
        .iter()
        .all(|r| r.origin == Origin::Periodic && !r.job_stopped));
    assert_eq!(records[0].sequence, Some(1));
    assert_eq!(records[1].sequence, Some(2));
    assert!(records[1].taken_at > records[0].taken_at);
    for r in &records {
        assert!(cts.image_dir(&r.id).join("manifest.json").is_file());
    }
    assert!(job.running());
}

#[tokio::test]
async fn criu_refusal_is_a_clear_fault_and_nothing_is_registered() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-refuse", "criu", CRIU_DRIVER, "").await;
    // A job holding an established TCP connection (to the GCS's port): CRIU refuses to dump
    // it unless told to (--tcp-established), which this CTS is not.
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; while :; do sleep 0.05; done",
        port = gcs.addr.port()
    );
    let job = TestJob::script(cts.dir.path(), &script, &[]);
    eventually(Duration::from_secs(5), "the job connects", || async {
        std::fs::read_dir(format!("/proc/{}/fd", job.pid))
            .map(|d| d.count() >= 4)
            .unwrap_or(false)
    })
    .await;
    cts.register("gid-tcp", job.pid).await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-tcp".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::OperationFailed, "{err:?}");
    assert!(
        err.message.to_lowercase().contains("tcp"),
        "the fault must carry CRIU's reason: {}",
        err.message
    );
    assert!(gcs_checkpoints(&gcs, "gid-tcp").await.is_empty());
    let images = std::fs::read_dir(cts.state_dir().join("store/images"))
        .unwrap()
        .count();
    assert_eq!(images, 0, "no image may be left in the store");
    assert!(job.running(), "a failed dump must leave the job running");
}

#[tokio::test]
async fn a_restarted_cts_takes_its_jobs_back() {
    let gcs = TestGcs::start().await;
    let gcs_url = gcs.url.clone();
    let cts = TestCts::registered(&gcs, "cts-restart", "criu", CRIU_DRIVER, "").await;
    let wsdl = integration_tests::http()
        .get(format!(
            "{}/wsrf/services/CheckpointTranslationService?wsdl",
            cts.url
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        wsdl.contains("CheckpointTranslationService") && wsdl.contains(&cts.url),
        "{wsdl}"
    );
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-restart", job.pid).await;
    let first = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-restart".into(),
            stop: false,
        })
        .await
        .unwrap();
    let setup = CtsSetup {
        name: "cts-restart",
        cts_type: "criu",
        gcs_url: &gcs_url,
        driver: CRIU_DRIVER,
        extra: "",
    };
    let cts = cts.restart(setup).await;
    cts.wait_connected().await;
    // The job is known again, and the GCS reaches the CTS at its new address.
    let jobs = cts.local.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].pid, job.pid);
    assert_eq!(jobs[0].last_checkpoint.as_deref(), Some(first.id.as_str()));
    let second = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-restart".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint after the CTS restarted");
    assert_eq!(second.sequence, Some(2));
    assert!(cts.image_dir(&first.id).join("manifest.json").is_file());
    assert!(job.running());
}
