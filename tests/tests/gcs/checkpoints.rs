//! doCheckpoint routing, checkpoint bookkeeping and recovery information.

use std::collections::BTreeSet;
use std::time::Duration;

use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

async fn count_checkpoints(gcs: &TestGcs, gid: &str) -> i64 {
    sqlx::query_scalar("select count(*) from checkpoints where gid = $1")
        .bind(gid)
        .fetch_one(&gcs.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn do_checkpoint_is_routed_to_the_cts_in_charge_and_recorded() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await;
    cts.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    gcs.setup_cts("cts-a", "node-a", &cts.url).await;
    gcs.register_job("job-1", "cts-a").await;

    let first = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap();
    assert_eq!(first.sequence, Some(1));
    assert_eq!(first.cts_name, "cts-a");
    assert_eq!(first.origin, Origin::External);
    assert!(first.image_name.contains(&first.id));
    // Over JSON too, and the CTS that registers first plus the GCS recording again stays one record.
    let second: CheckpointRecord = gcs
        .json
        .post("/api/v1/jobs/job-1/checkpoints", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(second.sequence, Some(2));
    assert_eq!(cts.calls(), 2);

    let list = gcs
        .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of("job-1"))
        .await
        .unwrap();
    let seqs: Vec<_> = list
        .checkpoints
        .iter()
        .map(|c| c.sequence.unwrap())
        .collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(list.checkpoints[0].id, first.id);
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(
        (job.checkpoint_count, job.latest_checkpoint.as_deref()),
        (2, Some(second.id.as_str()))
    );
}

#[tokio::test]
async fn a_cts_that_cannot_reach_the_gcs_still_gets_its_checkpoint_recorded() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await; // does not register at the GCS itself
    gcs.setup_cts("cts-a", "node-a", &cts.url).await;
    gcs.register_job("job-1", "cts-a").await;
    let r = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: true,
        })
        .await
        .unwrap();
    assert_eq!(r.sequence, Some(1));
    assert!(r.job_stopped);
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(
        job.state,
        JobState::Stopped,
        "a checkpoint that stops the job stops it in the registry"
    );
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("recover"), "{}", err.message);
}

#[tokio::test]
async fn a_cts_that_is_down_or_slow_gives_a_clear_fault_and_nothing_is_recorded() {
    let gcs = TestGcs::start_with(|c| c.cts_timeout_secs = 1).await;
    // Down: nothing listens at this address.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/cts", dead.local_addr().unwrap());
    drop(dead);
    gcs.setup_cts("cts-dead", "node-a", &dead_url).await;
    gcs.register_job("job-1", "cts-dead").await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ServiceUnavailable, "{}", err.message);
    assert!(
        err.message.contains("cts-dead") && err.message.contains("no checkpoint was recorded"),
        "{}",
        err.message
    );
    assert_eq!(count_checkpoints(&gcs, "job-1").await, 0);

    // Slow: answers after the bound.
    let slow = FakeCts::start("cts-slow").await;
    slow.set(|b| b.delay = Duration::from_secs(3));
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-slow", "criu", "node-b", &slow.url),
    })
    .await
    .unwrap();
    gcs.register_job("job-2", "cts-slow").await;
    let started = std::time::Instant::now();
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-2".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ServiceUnavailable, "{}", err.message);
    assert_eq!(err.code.as_deref(), Some("timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the forward must be bounded by the configured timeout"
    );
    assert_eq!(count_checkpoints(&gcs, "job-2").await, 0);

    // Failing: the CTS's own fault comes through with its kind.
    let failing = FakeCts::start("cts-fail").await;
    failing.set(|b| {
        b.fault = Some(Fault::new(
            FaultKind::OperationFailed,
            "criu dump: Permission denied",
        ))
    });
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-fail", "criu", "node-c", &failing.url),
    })
    .await
    .unwrap();
    gcs.register_job("job-3", "cts-fail").await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-3".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::OperationFailed);
    assert!(
        err.message.contains("Permission denied") && err.message.contains("cts-fail"),
        "{}",
        err.message
    );
    assert_eq!(count_checkpoints(&gcs, "job-3").await, 0);
}

#[tokio::test]
async fn do_checkpoint_of_an_unknown_or_finished_job_is_refused() {
    let gcs = TestGcs::start().await;
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "ghost".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    assert_eq!(err.code.as_deref(), Some("unknown-gid"));
    let resp = http()
        .post(format!("{}/api/v1/jobs/ghost/checkpoints", gcs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);

    let cts = FakeCts::start("cts-a").await;
    gcs.setup_cts("cts-a", "node-a", &cts.url).await;
    gcs.register_job("job-1", "cts-a").await;
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-1".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    let err = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-1".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert_eq!(cts.calls(), 0, "nothing is forwarded for a finished job");
}

#[tokio::test]
async fn sequence_numbers_are_gapless_under_concurrent_registrations() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    let n = 40;
    let calls = (0..n).map(|i| {
        let soap = gcs.soap_as(&pki::cts("cts-a"));
        async move {
            soap.call::<RegisterCheckpointOp>(&RegisterCheckpoint {
                checkpoint: checkpoint_record(&format!("ck-{i}"), "job-1", "cts-a"),
            })
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let seqs: BTreeSet<i64> = results
        .into_iter()
        .map(|r| r.unwrap().checkpoint.sequence.unwrap())
        .collect();
    assert_eq!(seqs, (1..=n).collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn checkpoint_registration_is_idempotent_and_refuses_clashes() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    gcs.register_job("job-2", "cts-a").await;
    let r = checkpoint_record("ck-1", "job-1", "cts-a");
    let first = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: r.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        (first.outcome, first.checkpoint.sequence),
        (Registration::Created, Some(1))
    );
    let again = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: r.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        (again.outcome, again.checkpoint.sequence),
        (Registration::Unchanged, Some(1))
    );
    // Signed again (a CTS rebuilding the record from its image after a restart): another
    // value for the same facts, the same report.
    let resigned = signed(r.clone());
    assert_ne!(
        resigned.signature.as_ref().unwrap().value,
        r.signature.as_ref().unwrap().value,
        "ECDSA signatures are randomized"
    );
    let again = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: resigned,
        })
        .await
        .unwrap();
    assert_eq!(
        (again.outcome, again.checkpoint.sequence),
        (Registration::Unchanged, Some(1))
    );
    let mut other = r.clone();
    other.image_name = "https://127.0.0.1:1/images/somewhere-else".into();
    let err = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint { checkpoint: other })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    let mut stolen = r.clone();
    stolen.gid = "job-2".into();
    let err = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: signed(stolen),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    let err = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record("ck-x", "nojob", "cts-a"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
    let job2 = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-2".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(
        job2.checkpoint_count, 0,
        "refused registrations leave no trace"
    );
}

#[tokio::test]
async fn recovery_info_names_the_wrapper_parameters_and_candidates() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", "http://127.0.0.1:2/cts"),
    })
    .await
    .unwrap();
    gcs.register_job("job-1", "cts-a").await;
    let err = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: LATEST.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some("no-checkpoint"));
    for id in ["ck-1", "ck-2"] {
        gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record(id, "job-1", "cts-a"),
        })
        .await
        .unwrap();
    }
    let info = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: LATEST.into(),
        })
        .await
        .unwrap();
    assert_eq!(info.checkpoint.id, "ck-2");
    assert_eq!(info.cts_type, "criu");
    assert!(!info.same_resource_only);
    assert_eq!(info.original_resource.as_deref(), Some("node-a"));
    assert_eq!(info.candidates.len(), 2);
    let b = info
        .candidates
        .iter()
        .find(|c| c.instance.name == "cts-b")
        .unwrap();
    assert_eq!(b.recovery_wrapper.name, "gca-recover");
    assert_eq!(
        b.recovery_wrapper.parameters,
        [
            "--gid",
            "job-1",
            "--image",
            "ck-2",
            "--cts",
            "http://127.0.0.1:2/cts"
        ]
    );
    assert_eq!(b.environment, [Property::new("GCA_GID", "job-1")]);

    let older: RecoveryInfo = gcs
        .json
        .get("/api/v1/jobs/job-1/recovery?image=ck-1")
        .await
        .unwrap();
    assert_eq!(older.checkpoint.id, "ck-1");
    assert!(older.candidates[0]
        .recovery_wrapper
        .parameters
        .contains(&"ck-1".to_string()));
    let err = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: "ck-none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
}

#[tokio::test]
async fn recovery_info_respects_same_resource_and_latest_only_types() {
    let gcs = TestGcs::start().await;
    let local = CRIU_DESCRIPTOR
        .replace("<Name>criu</Name>", "<Name>criu-local</Name>")
        .replace(
            "<RecoverOnOtherResource>true",
            "<RecoverOnOtherResource>false",
        )
        .replace("<RecoverFromAnyImage>true", "<RecoverFromAnyImage>false")
        .replace("<CheckpointerClass>basic</CheckpointerClass>", "");
    gcs.call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
        descriptor_xml: local,
    })
    .await
    .unwrap();
    for (name, res) in [("l-a", "node-a"), ("l-a2", "node-a"), ("l-b", "node-b")] {
        gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance(name, "criu-local", res, UNREACHABLE_CTS),
        })
        .await
        .unwrap();
    }
    gcs.register_job("job-1", "l-a").await;
    for id in ["ck-1", "ck-2"] {
        let mut r = checkpoint_record(id, "job-1", "l-a");
        r.cts_type = "criu-local".into();
        gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: signed(r),
        })
        .await
        .unwrap();
    }
    let info = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: LATEST.into(),
        })
        .await
        .unwrap();
    assert!(info.same_resource_only);
    let mut names: Vec<_> = info
        .candidates
        .iter()
        .map(|c| c.instance.name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["l-a", "l-a2"]);
    let err = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: "ck-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::Conflict);
    assert!(err.message.contains("latest"), "{}", err.message);
}

/// `max_checkpoints_in_flight_per_cts` (issue 15): a CTS with its limit of DoCheckpoints in
/// flight from this GCS gets no more; the next is refused at once (`ServiceUnavailable`, code
/// `cts-busy`, over SOAP and JSON) without reaching it, nothing is recorded, other CTSes are
/// served meanwhile, and a place freed is usable again.
#[tokio::test]
async fn checkpoints_in_flight_per_cts_are_capped() {
    let gcs = TestGcs::start_with(|c| c.max_checkpoints_in_flight_per_cts = 2).await;
    let slow = FakeCts::start("cts-a").await;
    slow.set(|b| {
        b.register_at_gcs = Some(gcs.endpoint());
        b.delay = Duration::from_millis(1500);
    });
    let fast = FakeCts::start("cts-b").await;
    fast.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    gcs.setup_cts("cts-a", "node-a", &slow.url).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", &fast.url),
    })
    .await
    .unwrap();
    for gid in ["job-1", "job-2", "job-3"] {
        gcs.register_job(gid, "cts-a").await;
    }
    gcs.register_job("job-b", "cts-b").await;

    let busy: Vec<_> = ["job-1", "job-2"]
        .into_iter()
        .map(|gid| {
            let soap = gcs.soap_as(pki::BROKER);
            tokio::spawn(async move {
                soap.call::<DoCheckpointOp>(&DoCheckpoint {
                    gid: gid.into(),
                    stop: false,
                })
                .await
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while slow.calls() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two calls did not reach the CTS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = std::time::Instant::now();
    let f = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-3".into(),
            stop: false,
        })
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ServiceUnavailable, "{f:?}");
    assert_eq!(
        f.code.as_deref(),
        Some(gca_protocol::fault::CTS_BUSY),
        "{f:?}"
    );
    assert!(
        f.message.contains("max_checkpoints_in_flight_per_cts = 2"),
        "{}",
        f.message
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused at once, not after waiting: {:?}",
        started.elapsed()
    );
    let resp = http_as(pki::BROKER)
        .post(format!("{}/api/v1/jobs/job-3/checkpoints", gcs.url))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cts-busy", "{body}");
    assert_eq!(body["error"]["kind"], "ServiceUnavailable", "{body}");
    assert_eq!(slow.calls(), 2, "the refused calls never reached the CTS");
    // Another CTS is not held up by the busy one.
    gcs.call::<DoCheckpointOp>(DoCheckpoint {
        gid: "job-b".into(),
        stop: false,
    })
    .await
    .expect("a checkpoint on another CTS");

    for t in busy {
        t.await.unwrap().expect("the calls in flight complete");
    }
    assert_eq!(count_checkpoints(&gcs, "job-3").await, 0);
    slow.set(|b| b.delay = Duration::ZERO);
    let r = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "job-3".into(),
            stop: false,
        })
        .await
        .expect("places came back");
    assert_eq!(r.sequence, Some(1));
}
