//! Bad input at the CTS: unknown GIDs and PIDs, duplicate and foreign registrations, busy
//! jobs, a full or unwritable store, jobs that exit. Each gets a clear fault and leaves
//! nothing half-done behind.

use std::time::Duration;

use cts::service::LocalCaller as Caller;
use gca_protocol::fault::FaultKind;
use gca_protocol::local::RegisterLocalJob;
use gca_protocol::messages::*;
use gca_protocol::ops::{CtsDoCheckpointOp, DoCheckpointOp, RegisterJobOp};
use integration_tests::cts::*;
use integration_tests::TestGcs;

fn reg(gid: &str, pid: i32) -> RegisterLocalJob {
    RegisterLocalJob {
        gid: gid.into(),
        pid,
        periodic_interval_secs: None,
        recovery: None,
        retention: None,
        limits: None,
    }
}

#[tokio::test]
async fn unknown_gid_and_unknown_pid_are_refused() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-unknown", "criu", CRIU_DRIVER, "").await;
    let err = cts
        .soap
        .call::<CtsDoCheckpointOp>(&DoCheckpoint {
            gid: "nobody-knows".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    assert_eq!(err.code.as_deref(), Some("unknown-gid"));
    assert!(err.message.contains("cts-unknown"), "{}", err.message);

    // A PID that does not exist (PIDs are below 2^22 on Linux).
    let err = cts
        .local
        .register(&reg("gid-x", 9_999_999))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    assert!(err.message.contains("9999999"), "{}", err.message);
    let err = cts.local.register(&reg("", 1)).await.unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidMessage);
    // Nothing reached the GCS.
    let err = gcs
        .call::<gca_protocol::ops::GetJobOp>(GidRequest {
            gid: "gid-x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
}

#[tokio::test]
async fn duplicate_and_foreign_registrations() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-dup", "criu", CRIU_DRIVER, "").await;
    let a = TestJob::counter(cts.dir.path());
    let b = TestJob::counter(cts.dir.path());
    let first = cts.register("gid-dup", a.pid).await;
    // The same registration again is harmless.
    let again = cts.register("gid-dup", a.pid).await;
    assert_eq!(again.registered_at, first.registered_at);
    // The GID for another live process, or the process under another GID: conflicts.
    let err = cts
        .local
        .register(&reg("gid-dup", b.pid))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains(&a.pid.to_string()), "{}", err.message);
    let err = cts
        .local
        .register(&reg("gid-other", a.pid))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    // Another user's process cannot be claimed (credentials come from SO_PEERCRED; here we
    // call the service as that user would arrive).
    let err = cts
        .cts
        .register_job(
            reg("gid-foreign", b.pid),
            Caller {
                pid: Some(1),
                uid: 65534,
            },
        )
        .await
        .unwrap_err()
        .into_fault();
    assert_eq!(err.kind, FaultKind::AccessDenied);
    assert!(err.message.contains("65534"), "{}", err.message);

    // A GID the GCS already routes to another CTS is refused here too (paper 3.4.1).
    let other = integration_tests::instance(
        "cts-elsewhere",
        "criu",
        "node-b",
        "http://127.0.0.1:9/wsrf/services/CheckpointTranslationService",
    );
    gcs.call::<gca_protocol::ops::RegisterCtsInstanceOp>(RegisterCtsInstance { instance: other })
        .await
        .unwrap();
    gcs.call::<RegisterJobOp>(RegisterJob {
        gid: "gid-taken".into(),
        cts_instance: "cts-elsewhere".into(),
        local_id: Some("77".into()),
        recovery: false,
        from_checkpoint: None,
        state: None,
        retention: None,
    })
    .await
    .unwrap();
    let err = cts
        .local
        .register(&reg("gid-taken", b.pid))
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("GCS"), "{}", err.message);
    assert!(cts.local.job("gid-taken").await.is_err());
    assert_eq!(cts.local.jobs().await.unwrap().len(), 1);
}

/// An application-level job that takes a second to write its checkpoint.
const SLOW_APP: &str = "trap 'sleep 1; echo $$ > \"$GCA_CHECKPOINT_DIR/state\"; touch \"$GCA_CHECKPOINT_DIR/.gca-complete\"' USR1; while :; do sleep 0.05 & wait $!; done";

#[tokio::test]
async fn one_checkpoint_at_a_time_per_job_but_jobs_in_parallel() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-busy", "app-level", APP_DRIVER, "").await;
    let a = TestJob::after_registration(cts.dir.path(), SLOW_APP, &[]);
    let b = TestJob::after_registration(cts.dir.path(), SLOW_APP, &[]);
    a.start(&cts.register("gid-a", a.pid).await);
    b.start(&cts.register("gid-b", b.pid).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = |gid: &'static str| {
        let soap = gcs.soap.clone();
        async move {
            soap.call::<DoCheckpointOp>(&DoCheckpoint {
                gid: gid.into(),
                stop: false,
            })
            .await
        }
    };
    let started = std::time::Instant::now();
    let (a1, a2, b1) = tokio::join!(
        call("gid-a"),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            call("gid-a").await
        },
        call("gid-b")
    );
    let elapsed = started.elapsed();
    let a1 = a1.expect("the first request for gid-a");
    let err = a2.expect_err("a second request while the first is in flight");
    assert_eq!(err.kind, FaultKind::Conflict);
    assert_eq!(err.code.as_deref(), Some("checkpoint-in-progress"));
    assert!(err.message.contains("gid-a"), "{}", err.message);
    let b1 = b1.expect("another job is checkpointed in parallel");
    assert_eq!((a1.sequence, b1.sequence), (Some(1), Some(1)));
    // Both took about a second; in parallel, not one after the other.
    assert!(elapsed < Duration::from_millis(1900), "took {elapsed:?}");
    assert_eq!(gcs_checkpoints(&gcs, "gid-a").await.len(), 1);
}

#[tokio::test]
async fn a_full_store_refuses_the_image_and_registers_nothing() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(
        &gcs,
        "cts-full",
        "criu",
        CRIU_DRIVER,
        "[store]\nmax_bytes = 4096",
    )
    .await;
    let job = TestJob::counter(cts.dir.path());
    cts.register("gid-full", job.pid).await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-full".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::OperationFailed, "{err:?}");
    assert_eq!(err.code.as_deref(), Some("store-full"), "{err:?}");
    assert!(gcs_checkpoints(&gcs, "gid-full").await.is_empty());
    let store = cts.state_dir().join("store");
    assert_eq!(std::fs::read_dir(store.join("images")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(store.join("staging")).unwrap().count(), 0);
    assert!(job.running());
}

#[tokio::test]
async fn an_unwritable_store_stops_the_cts_at_start_with_a_clear_error() {
    let gcs = TestGcs::start().await;
    integration_tests::cts::register_type(&gcs, "criu").await;
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("store-is-a-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let text = format!(
        "name = \"cts-broken\"\nresource = \"r\"\nexecution_manager = \"em\"\ngcs_url = {gcs:?}\ndescriptor = {desc:?}\nstate_dir = {state:?}\n[store]\ndir = {store:?}\n[driver]\nkind = \"criu\"\n",
        gcs = gcs.url,
        desc = dir.path().join("d.xml"),
        state = dir.path().join("state"),
        store = not_a_dir,
    );
    std::fs::write(dir.path().join("d.xml"), integration_tests::CRIU_DESCRIPTOR).unwrap();
    let mut config = cts::Config::from_toml(&format!("insecure = true\n{text}")).unwrap();
    config.insecure = false;
    config.tls =
        Some(integration_tests::pki::pki().tls(&integration_tests::pki::cts("cts-broken")));
    let err = match cts::build(config).await {
        Ok(_) => panic!("a CTS with an unusable store must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("store-is-a-file"), "{err}");
}

#[tokio::test]
async fn a_job_that_exits_is_reported_finished_with_its_status() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-exit", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::after_registration(cts.dir.path(), "sleep 0.2; exit 3", &[]);
    job.start(&cts.register("gid-exit", job.pid).await);
    eventually(
        Duration::from_secs(10),
        "the GCS learns the job finished",
        || async { gcs_job(&gcs, "gid-exit").await.state == JobState::Finished },
    )
    .await;
    let at_gcs = gcs_job(&gcs, "gid-exit").await;
    assert_eq!(at_gcs.exit_status, Some(3));
    assert_eq!(at_gcs.signal, None);
    assert!(cts.local.jobs().await.unwrap().is_empty());
    let err = cts
        .soap
        .call::<CtsDoCheckpointOp>(&DoCheckpoint {
            gid: "gid-exit".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
}

/// The first step of a recovery registration (the wrapper restoring the image) survives a CTS
/// restart: the wrapper's second step still finds it. A wrapper that died meanwhile leaves
/// nothing behind, and the job stays `recovering` at the GCS (it can be recovered again).
#[tokio::test]
async fn a_restarted_cts_keeps_a_recovery_that_is_still_restoring() {
    use gca_protocol::local::LocalRecovery;
    let gcs = TestGcs::start().await;
    let gcs_url = gcs.url.clone();
    let cts = TestCts::registered(&gcs, "cts-rr", "app-level", APP_DRIVER, "").await;
    // Two jobs that ran here and died (their node "failed").
    for gid in ["gid-rr", "gid-rr-gone"] {
        let first = TestJob::script(cts.dir.path(), "sleep 60", &[]);
        cts.register(gid, first.pid).await;
        drop(first);
        eventually(
            Duration::from_secs(10),
            "the GCS learns it died",
            || async { gcs_job(&gcs, gid).await.state == JobState::Finished },
        )
        .await;
    }
    let restoring = |gid: &str, pid: i32, restoring: bool| RegisterLocalJob {
        gid: gid.into(),
        pid,
        periodic_interval_secs: None,
        recovery: Some(LocalRecovery {
            from_checkpoint: None,
            restoring,
        }),
        retention: None,
        limits: None,
    };
    // Two recovery wrappers are restoring them when the CTS restarts.
    let wrapper = TestJob::script(cts.dir.path(), "sleep 60", &[]);
    let step1 = cts
        .local
        .register(&restoring("gid-rr", wrapper.pid, true))
        .await
        .unwrap();
    let doomed = TestJob::script(cts.dir.path(), "sleep 60", &[]);
    let doomed_dir = cts
        .local
        .register(&restoring("gid-rr-gone", doomed.pid, true))
        .await
        .unwrap()
        .checkpoint_dir;
    assert_eq!(gcs_job(&gcs, "gid-rr").await.state, JobState::Recovering);
    let setup = CtsSetup {
        name: "cts-rr",
        cts_type: "app-level",
        gcs_url: &gcs_url,
        driver: APP_DRIVER,
        extra: "",
    };
    let cts = cts.restart_after(setup, || drop(doomed)).await;
    cts.wait_connected().await;

    let jobs = cts.local.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0].pid, wrapper.pid);
    assert_eq!(jobs[0].state, JobState::Recovering);
    assert!(
        !doomed_dir.exists(),
        "the abandoned recovery's directory is removed"
    );
    // The second step: the restored process takes over the first step's directory.
    let restored = TestJob::script(cts.dir.path(), "sleep 60", &[]);
    let step2 = cts
        .local
        .register(&restoring("gid-rr", restored.pid, false))
        .await
        .expect("the second step finds the first one after the restart");
    assert_eq!(step2.checkpoint_dir, step1.checkpoint_dir);
    assert_eq!(step2.state, JobState::Running);
    eventually(
        Duration::from_secs(10),
        "the GCS has the job running",
        || async { gcs_job(&gcs, "gid-rr").await.state == JobState::Running },
    )
    .await;
    // The abandoned recovery: the GCS has the job back as it was (it failed here), and the
    // recovery that never ran is not counted.
    eventually(
        Duration::from_secs(10),
        "the GCS puts the abandoned job back",
        || async { gcs_job(&gcs, "gid-rr-gone").await.state == JobState::Finished },
    )
    .await;
    let back = gcs_job(&gcs, "gid-rr-gone").await;
    assert_eq!(
        (
            back.cts_instance.as_str(),
            back.recoveries,
            back.exit_status
        ),
        ("cts-rr", 0, None)
    );
}
