//! Image locations (issue 12): a record lists where its image is (the CTS that took it first,
//! an object store with its state), and SetImageLocation moves an object-store location on,
//! for the CTS that registered the record or the one its job is on, nobody else.

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

fn set(gid: &str, id: &str, state: LocationState, error: Option<&str>) -> SetImageLocation {
    SetImageLocation {
        gid: gid.into(),
        checkpoint_id: id.into(),
        location: ImageLocation::object_store("s3://gca/site", state, error.map(String::from)),
    }
}

async fn record(gcs: &TestGcs, id: &str) -> CheckpointRecord {
    gcs.call::<GetCheckpointsOp>(GetCheckpoints::of("job-loc"))
        .await
        .unwrap()
        .checkpoints
        .into_iter()
        .find(|c| c.id == id)
        .expect("the record")
}

#[tokio::test]
async fn a_records_locations_follow_the_upload_and_only_its_ctses_move_them() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", UNREACHABLE_CTS),
    })
    .await
    .unwrap();
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-c", "criu", "node-c", UNREACHABLE_CTS),
    })
    .await
    .unwrap();
    gcs.register_job("job-loc", "cts-a").await;

    // Registered with the object store pending (durability async); the GCS lists the taking
    // CTS first, with the image's URL, even when the CTS did not.
    let mut r = checkpoint_record("ck-loc", "job-loc", "cts-a");
    r.locations = vec![ImageLocation::object_store(
        "s3://gca/site",
        LocationState::Pending,
        None,
    )];
    let registered = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: r.clone(),
        })
        .await
        .unwrap()
        .checkpoint;
    let kinds: Vec<_> = registered
        .locations
        .iter()
        .map(|l| (l.kind, l.name.as_str(), l.state))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (LocationKind::Cts, "cts-a", LocationState::Stored),
            (
                LocationKind::ObjectStore,
                "s3://gca/site",
                LocationState::Pending
            ),
        ]
    );
    assert_eq!(
        registered.locations[0].url.as_deref(),
        Some(r.image_name.as_str())
    );
    assert!(registered.locations.iter().all(|l| l.since.is_some()));
    assert_eq!(record(&gcs, "ck-loc").await.locations, registered.locations);
    // The same record again is unchanged, whatever it lists.
    let again = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint { checkpoint: r })
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Unchanged);

    // Another CTS, a broker, an admin: refused, nothing changed.
    for who in ["cts:cts-b", pki::BROKER, pki::ADMIN] {
        let f = gcs
            .call_as::<SetImageLocationOp>(
                who,
                set("job-loc", "ck-loc", LocationState::Stored, None),
            )
            .await
            .unwrap_err();
        assert_eq!(f.kind, FaultKind::AccessDenied, "{who}: {f:?}");
    }
    assert_eq!(record(&gcs, "ck-loc").await.locations, registered.locations);

    // The uploader (the CTS that registered it) says it failed, then stored (over JSON).
    let failed = gcs
        .call_as::<SetImageLocationOp>(
            "cts:cts-a",
            set(
                "job-loc",
                "ck-loc",
                LocationState::Failed,
                Some("no route to the bucket"),
            ),
        )
        .await
        .expect("the registering CTS");
    let l = &failed.locations[1];
    assert_eq!(l.state, LocationState::Failed);
    assert_eq!(l.error.as_deref(), Some("no route to the bucket"));
    let stored: CheckpointRecord = gcs
        .json_as("cts:cts-a")
        .post(
            "/api/v1/checkpoints/ck-loc/locations",
            &serde_json::json!({"gid": "job-loc", "location": {"kind": "object-store", "name": "s3://gca/site", "state": "stored", "error": "ignored"}}),
        )
        .await
        .expect("POST /api/v1/checkpoints/{id}/locations");
    let l = &stored.locations[1];
    assert_eq!((l.state, l.error.as_deref()), (LocationState::Stored, None));
    assert!(l.since >= failed.locations[1].since);

    // A CTS location is the record's own; unknown records and jobs are refused as such.
    let mut cts_loc = set("job-loc", "ck-loc", LocationState::Stored, None);
    cts_loc.location = ImageLocation::cts("cts-a", "https://elsewhere/images/ck-loc");
    let f = gcs
        .call_as::<SetImageLocationOp>("cts:cts-a", cts_loc)
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidMessage, "{f:?}");
    let f = gcs
        .call_as::<SetImageLocationOp>(
            "cts:cts-a",
            set("job-loc", "no-such", LocationState::Stored, None),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (f.kind, f.code.as_deref()),
        (FaultKind::ResourceUnknown, Some("unknown-checkpoint"))
    );
    // A record may not list another CTS's store.
    let mut other = checkpoint_record("ck-loc-2", "job-loc", "cts-a");
    other.locations = vec![ImageLocation::cts(
        "cts-c",
        "https://node-c/images/ck-loc-2",
    )];
    let f = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint { checkpoint: other })
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidMessage, "{f:?}");

    // The job fails on cts-a and is recovered on cts-b: now cts-b (the job's CTS) may tell
    // where the image has got to too, and cts-a (which registered it) still may; cts-c not.
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-loc".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(3),
        signal: None,
    })
    .await
    .unwrap();
    gcs.call_as::<RegisterJobOp>(
        "cts:cts-b",
        RegisterJob {
            gid: "job-loc".into(),
            cts_instance: "cts-b".into(),
            local_id: Some("4343".into()),
            recovery: true,
            from_checkpoint: Some("ck-loc".into()),
            state: None,
            retention: None,
        },
    )
    .await
    .expect("the recovery registers on cts-b");
    for who in ["cts:cts-b", "cts:cts-a"] {
        gcs.call_as::<SetImageLocationOp>(
            who,
            set("job-loc", "ck-loc", LocationState::Stored, None),
        )
        .await
        .unwrap_or_else(|f| panic!("{who}: {f:?}"));
    }
    let f = gcs
        .call_as::<SetImageLocationOp>(
            "cts:cts-c",
            set("job-loc", "ck-loc", LocationState::Stored, None),
        )
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::AccessDenied, "{f:?}");
    // The key follows the job to cts-b; cts-a, which took the image, has it only while the
    // retention policy has it delete the image (from the object store too, which takes the
    // key); cts-c never.
    let key_for = |who: &'static str| {
        let gcs = &gcs;
        async move {
            gcs.call_as::<GetJobKeyOp>(
                who,
                GetJobKey {
                    gid: "job-loc".into(),
                },
            )
            .await
        }
    };
    key_for("cts:cts-b").await.expect("the job's CTS");
    for who in ["cts:cts-a", "cts:cts-c"] {
        let f = key_for(who).await.unwrap_err();
        assert_eq!(f.kind, FaultKind::AccessDenied, "{who}: {f:?}");
    }
    // The job ends on cts-b (exit 0): the image cts-a took is being deleted (cts-a is
    // unreachable here: the task is retried), and cts-a may have the key meanwhile.
    gcs.call_as::<JobFinishedOp>(
        "cts:cts-b",
        JobFinished {
            gid: "job-loc".into(),
            cts_instance: "cts-b".into(),
            exit_status: Some(0),
            signal: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        record(&gcs, "ck-loc").await.image_state,
        ImageState::Deleting
    );
    key_for("cts:cts-a")
        .await
        .expect("the CTS deleting the job's image");
    let f = key_for("cts:cts-c").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::AccessDenied, "{f:?}");
    gcs.shutdown().await;
}
