//! Bad days, with real processes and a real PostgreSQL: the GCS killed with SIGKILL while
//! checkpoints are being registered, PostgreSQL restarted (`-m fast`) and crashed
//! (`-m immediate`) while brokers checkpoint jobs. After each, every checkpoint a CTS took is
//! in the registry exactly once, and each job's sequence numbers run 1..n without a gap.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use gca_protocol::messages::*;
use gca_protocol::ops::{DoCheckpointOp, GetCheckpointsOp, RegisterDescriptorOp};
use integration_tests::cts::*;
use integration_tests::process::GcsProcess;
use integration_tests::{db, TestGcs};

/// The image IDs in the CTS's store.
fn stored_images(cts: &TestCts) -> BTreeSet<String> {
    std::fs::read_dir(cts.state_dir().join("store").join("images"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that the registry holds exactly `taken` for `gid`, numbered 1..n.
fn assert_complete(gid: &str, records: &[CheckpointRecord], taken: &BTreeSet<String>) {
    let ids: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), records.len(), "{gid}: a record registered twice");
    assert_eq!(
        &ids, taken,
        "{gid}: the registry differs from what was taken"
    );
    let mut sequences: Vec<i64> = records.iter().filter_map(|r| r.sequence).collect();
    sequences.sort();
    assert_eq!(
        sequences,
        (1..=records.len() as i64).collect::<Vec<_>>(),
        "{gid}: sequence numbers with a gap or a repeat"
    );
}

#[tokio::test]
async fn a_gcs_killed_while_checkpoints_are_registered_loses_none() {
    let logs = tempfile::tempdir().unwrap();
    let database_url = db::fresh_database_url().await;
    let mut gcs = GcsProcess::start(None, &database_url, logs.path()).await;
    gcs.call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
        descriptor_xml: descriptor("criu").to_string(),
    })
    .await
    .expect("register the type");
    let cts = TestCts::start(CtsSetup {
        name: "cts-gcs-killed",
        cts_type: "criu",
        gcs_url: &gcs.url,
        driver: CRIU_DRIVER,
        extra: "gcs_wait_secs = 1",
    })
    .await;
    cts.wait_connected().await;
    let jobs: Vec<TestJob> = (0..3).map(|_| TestJob::counter(cts.dir.path())).collect();
    let gids: Vec<String> = (0..3).map(|i| format!("gid-killed-{i}")).collect();
    for (gid, job) in gids.iter().zip(&jobs) {
        cts.register(gid, job.pid).await;
    }

    // Three jobs checkpointed over and over (each checkpoint's record goes to the GCS as it
    // is taken) while the GCS is killed and started again on the same address.
    let per_job = 5;
    let load = futures::future::join_all(gids.iter().map(|gid| {
        let cts = &cts;
        async move {
            let mut taken = BTreeSet::new();
            for _ in 0..per_job {
                let r: CheckpointRecord = cts
                    .json
                    .post(
                        &format!("/api/v1/jobs/{gid}/checkpoint"),
                        &serde_json::json!({}),
                    )
                    .await
                    .expect("the CTS checkpoints whatever the GCS does");
                taken.insert(r.id);
            }
            taken
        }
    }));
    let chaos = async {
        // Kill it once records are flowing.
        eventually(Duration::from_secs(30), "records reach the GCS", || async {
            cts.cts.link().status().last_contact.is_some() && stored_images(&cts).len() >= 3
        })
        .await;
        gcs.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let queued = cts.cts.link().status().pending;
        (
            GcsProcess::start(Some(gcs.addr), &database_url, logs.path()).await,
            queued,
        )
    };
    let (taken, (gcs, queued)) = tokio::join!(load, chaos);
    eprintln!(
        "bad day: GCS killed; {} checkpoints taken, {queued} records queued while it was down",
        taken.iter().map(BTreeSet::len).sum::<usize>()
    );
    assert!(queued > 0, "checkpoints were taken while the GCS was down");
    eventually(Duration::from_secs(60), "the outbox drains", || async {
        cts.cts.link().status().pending == 0
    })
    .await;
    let status = cts.cts.link().status();
    assert_eq!(status.rejected, 0, "nothing refused: {status:?}");
    assert_eq!(
        stored_images(&cts),
        taken.iter().flatten().cloned().collect::<BTreeSet<_>>(),
        "every image stored was answered to its caller"
    );
    for (gid, taken) in gids.iter().zip(&taken) {
        assert_eq!(taken.len(), per_job);
        let records = gcs
            .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of(gid.clone()))
            .await
            .expect("GetCheckpoints")
            .checkpoints;
        assert_complete(gid, &records, taken);
    }
}

#[tokio::test]
async fn postgresql_restarted_or_crashed_under_load_loses_no_checkpoint() {
    // A cluster of this test's own, to restart.
    let dir = tempfile::Builder::new()
        .prefix("gca-pg-restart")
        .tempdir_in("/tmp")
        .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut pg = gcs::embedded_pg::EmbeddedPostgres::start(dir.path())
        .await
        .expect("a private cluster");
    let gcs = TestGcs::start_on(&pg.url("gcs"), |_| {}).await;
    let cts = TestCts::registered(&gcs, "cts-pg-restart", "criu", CRIU_DRIVER, "").await;
    let jobs: Vec<TestJob> = (0..2).map(|_| TestJob::counter(cts.dir.path())).collect();
    let gids: Vec<String> = (0..2).map(|i| format!("gid-pg-{i}")).collect();
    for (gid, job) in gids.iter().zip(&jobs) {
        cts.register(gid, job.pid).await;
    }

    // Brokers checkpoint both jobs through the GCS for as long as the restarts last; a call
    // that meets the database away is refused (typed), and is not lost if the CTS took it.
    let stop = tokio::sync::watch::channel(false);
    let answered = futures::future::join_all(gids.iter().map(|gid| {
        let gcs = &gcs;
        let mut done = stop.1.clone();
        async move {
            let (mut ok, mut refused) = (BTreeSet::new(), Vec::new());
            while !*done.borrow_and_update() {
                match gcs
                    .call::<DoCheckpointOp>(DoCheckpoint {
                        gid: gid.clone(),
                        stop: false,
                    })
                    .await
                {
                    Ok(r) => {
                        ok.insert(r.id);
                    }
                    Err(f) => {
                        refused.push(f);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            (ok, refused)
        }
    }));
    let chaos = async {
        for immediate in [false, true] {
            let before = Instant::now();
            let base = stored_images(&cts).len();
            eventually(Duration::from_secs(30), "checkpoints go on", || async {
                stored_images(&cts).len() >= base + 2
            })
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            pg.restart(immediate).await.expect("restart PostgreSQL");
            tracing::info!(immediate, after = ?before.elapsed(), "PostgreSQL restarted");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        stop.0.send(true).unwrap();
    };
    let (answered, ()) = tokio::join!(answered, chaos);
    for (gid, (ok, refused)) in gids.iter().zip(&answered) {
        eprintln!(
            "bad day: PostgreSQL restarted and crashed; {gid}: {} DoCheckpoints answered, {} refused as unavailable",
            ok.len(),
            refused.len()
        );
    }

    eventually(Duration::from_secs(60), "the outbox drains", || async {
        cts.cts.link().status().pending == 0
    })
    .await;
    assert_eq!(cts.cts.link().status().rejected, 0);
    let stored = stored_images(&cts);
    let mut registered = BTreeSet::new();
    for (gid, (ok, refused)) in gids.iter().zip(&answered) {
        for f in refused {
            assert_eq!(
                f.kind,
                gca_protocol::FaultKind::ServiceUnavailable,
                "a restart is a typed, retryable refusal: {f:?}"
            );
        }
        let records = gcs
            .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of(gid.clone()))
            .await
            .expect("GetCheckpoints after the restarts")
            .checkpoints;
        let ids: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
        assert!(
            ok.is_subset(&ids),
            "{gid}: a checkpoint answered to the broker is missing"
        );
        assert!(!ok.is_empty(), "{gid}: checkpoints went through");
        let taken: BTreeSet<String> = stored
            .iter()
            .filter(|id| ids.contains(*id))
            .cloned()
            .collect();
        assert_complete(gid, &records, &taken);
        registered.extend(ids);
    }
    assert_eq!(
        registered, stored,
        "every image the CTS stored is in the registry"
    );
    gcs.shutdown().await;
    cts.shutdown().await;
    pg.stop().await.unwrap();
}

/// Files under `dir`, recursively, with their sizes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out
}

/// The CTS (the binary) and its CRIU killed in the middle of dumping a job of a few hundred
/// MiB, as a crash of the resource's services would: at its restart the half-written image is
/// gone, nothing was registered, its outbox place is released, the job runs on, and its next
/// checkpoint is its first.
#[tokio::test]
async fn a_cts_killed_in_the_middle_of_a_dump_leaves_nothing_half_done() {
    let gcs = TestGcs::start().await;
    register_type(&gcs, "criu").await;
    let dir = tempfile::Builder::new()
        .prefix("cts-killed")
        .tempdir()
        .unwrap();
    let setup = || CtsSetup {
        name: "cts-killed",
        cts_type: "criu",
        gcs_url: &gcs.url,
        driver: CRIU_DRIVER,
        extra: "",
    };
    let mut cts = integration_tests::process::CtsProcess::start(setup(), dir.path()).await;
    let ready = dir.path().join("ready");
    // It gives its memory back once `shrink` exists, so that its checkpoint after the
    // restart is quick on a loaded machine.
    let shrink = dir.path().join("shrink");
    let job = TestJob::script(
        dir.path(),
        &format!(
            "python3 -c 'import os, sys, time\nb = bytearray(384 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nopen(sys.argv[1], \"w\").write(\"ready\")\nwhile True:\n  time.sleep(0.1)\n  if os.path.exists(sys.argv[2]): b = None\n' {ready:?} {shrink:?}"
        ),
        &[],
    );
    eventually(Duration::from_secs(30), "the job holds its memory", || {
        let r = ready.exists();
        async move { r }
    })
    .await;
    cts.local
        .register(&gca_protocol::local::RegisterLocalJob {
            gid: "gid-cts-killed".into(),
            pid: job.pid,
            periodic_interval_secs: None,
            recovery: None,
            retention: None,
            limits: None,
        })
        .await
        .expect("register the job");

    let staging = dir.path().join("state").join("store").join("staging");
    let json = cts.json.clone();
    let empty = serde_json::json!({});
    let request =
        json.post::<_, CheckpointRecord>("/api/v1/jobs/gid-cts-killed/checkpoint", &empty);
    let crash = async {
        eventually(Duration::from_secs(30), "CRIU is writing the pages", || {
            let writing = files_under(&staging).iter().any(|(_, n)| *n > 16 << 20);
            async move { writing }
        })
        .await;
        let outbox = dir.path().join("state").join("outbox");
        assert!(
            files_under(&outbox)
                .iter()
                .any(|(p, _)| p.extension().is_some_and(|e| e == "reserved")),
            "the checkpoint holds its outbox place while CRIU writes"
        );
        let criu = format!("criu dump .*-t {}( |$)", job.pid);
        assert!(
            std::process::Command::new("pgrep")
                .args(["-f", &criu])
                .status()
                .unwrap()
                .success(),
            "CRIU runs"
        );
        cts.kill();
        // The whole resource's services at once: CRIU too.
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &format!("criu dump .*-t {}( |$)", job.pid)])
            .status();
    };
    let (answer, ()) = tokio::join!(request, crash);
    assert!(answer.is_err(), "the request died with the CTS");
    eventually(Duration::from_secs(10), "CRIU is gone", || {
        let gone = !std::process::Command::new("pgrep")
            .args(["-f", &format!("criu dump .*-t {}( |$)", job.pid)])
            .status()
            .unwrap()
            .success();
        async move { gone }
    })
    .await;

    let cts = integration_tests::process::CtsProcess::start(setup(), dir.path()).await;
    let images = dir.path().join("state").join("store").join("images");
    assert!(
        files_under(&images).is_empty(),
        "no image was committed: {:?}",
        files_under(&images)
    );
    assert!(
        files_under(&staging).is_empty(),
        "the half-written dump is gone: {:?}",
        files_under(&staging)
    );
    let outbox = dir.path().join("state").join("outbox");
    assert!(
        !files_under(&outbox)
            .iter()
            .any(|(p, _)| p.extension().is_some_and(|e| e == "reserved")),
        "the outbox place is released"
    );
    assert!(gcs_checkpoints(&gcs, "gid-cts-killed").await.is_empty());
    // The job runs on (not left stopped by the interrupted dump), and is checkpointed anew.
    let state = gca_drivers::proc::stat(job.pid).expect("the job").state;
    assert!(matches!(state, 'S' | 'R'), "the job's state is {state}");
    std::fs::write(&shrink, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let record: CheckpointRecord = cts
        .json
        .post(
            "/api/v1/jobs/gid-cts-killed/checkpoint",
            &serde_json::json!({}),
        )
        .await
        .expect("the job is checkpointed after the restart");
    assert_eq!(record.sequence, Some(1));
}
