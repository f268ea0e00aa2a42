//! The CTS's side of the retention policy (the GCS's side, end to end, is in retention.rs): the policy given at registration is checked and
//! passed on to the GCS, every image records its owner, and an image is exported into its
//! owner's directory through its `image_name` (`POST {image_name}/export`), as the GCS does
//! when a job that keeps its images ends.

use gca_protocol::fault::{ErrorBody, FaultKind};
use gca_protocol::local::RegisterLocalJob;
use gca_protocol::messages::*;
use gca_protocol::ops::DoCheckpointOp;
use integration_tests::cts::*;
use integration_tests::TestGcs;

fn reg(gid: &str, pid: i32, retention: Option<Retention>) -> RegisterLocalJob {
    RegisterLocalJob {
        gid: gid.into(),
        pid,
        periodic_interval_secs: None,
        recovery: None,
        retention,
        limits: None,
    }
}

#[tokio::test]
async fn a_bad_retention_policy_refuses_the_registration() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-ret-bad", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    for (retention, want) in [
        (
            Retention::last(0, "/home/alice/ckpt"),
            "KeepLast must be between 1 and",
        ),
        (Retention::all("ckpt"), "KeepIn must be an absolute path"),
        (
            Retention {
                keep: Keep::All,
                keep_last: None,
                keep_in: None,
            },
            "keep = all needs KeepIn",
        ),
    ] {
        let err = cts
            .local
            .register(&reg("gid-ret-bad", job.pid, Some(retention.clone())))
            .await
            .unwrap_err();
        assert_eq!(err.kind, FaultKind::InvalidMessage, "{retention:?}");
        assert_eq!(err.code.as_deref(), Some("invalid-retention"));
        assert!(
            err.message
                .starts_with("invalid retention policy for job \"gid-ret-bad\": "),
            "{}",
            err.message
        );
        assert!(err.message.contains(want), "{}", err.message);
    }
    // Nothing was registered, here or at the GCS.
    assert!(cts.local.job("gid-ret-bad").await.is_err());
    let err = gcs
        .call::<gca_protocol::ops::GetJobOp>(GidRequest {
            gid: "gid-ret-bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ResourceUnknown);
}

#[tokio::test]
async fn images_name_their_owner_and_are_exported_through_their_image_name() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-ret", "criu", CRIU_DRIVER, "").await;
    let keep = cts.dir.path().join("kept");
    std::fs::create_dir(&keep).unwrap();
    let keep_in = keep.display().to_string();
    let job = TestJob::counter(cts.dir.path());
    job.wait_for_values(3).await;
    cts.local
        .register(&reg(
            "gid-ret",
            job.pid,
            Some(Retention::last(2, keep_in.clone())),
        ))
        .await
        .expect("a valid retention policy is accepted");

    let record = gcs
        .call::<DoCheckpointOp>(DoCheckpoint {
            gid: "gid-ret".into(),
            stop: false,
        })
        .await
        .expect("doCheckpoint");
    let digest = record.digest.clone().expect("a digest");

    // The manifest names the job's owner: the real UID and GID of its process.
    // As the GCS: the only caller of a CTS's image export (and reader of its manifests).
    let http = integration_tests::http_as(integration_tests::pki::GCS);
    let manifest: serde_json::Value = http
        .get(&record.image_name)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let extra = &manifest["meta"]["extra"];
    let (uid, gid) = (
        gca_drivers::proc::uid(job.pid).unwrap(),
        gca_drivers::proc::gid(job.pid).unwrap(),
    );
    assert_eq!(extra["uid"], uid.to_string(), "{manifest}");
    assert_eq!(extra["gid"], gid.to_string(), "{manifest}");
    assert_eq!(manifest["meta"]["gid"], "gid-ret");

    // What the GCS will do when the job ends: export the kept image, then drop it here.
    let export = |body: serde_json::Value| {
        http.post(format!("{}/export", record.image_name))
            .json(&body)
            .send()
    };
    let res = export(serde_json::json!({"dir": keep_in, "digest": digest, "remove": true}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let done: serde_json::Value = res.json().await.unwrap();
    let target = keep.join(&record.id);
    assert_eq!(done["path"], target.display().to_string());
    assert_eq!(done["already"], false);
    assert_eq!(done["removed"], true);
    assert_eq!(done["bytes"].as_i64(), record.size_bytes);
    let exported = std::fs::read(target.join("manifest.json")).unwrap();
    assert_eq!(gca_store::Manifest::digest_of(&exported), digest);
    assert!(target.join("pstree.img").is_file());
    assert!(
        !cts.image_dir(&record.id).exists(),
        "removed from the store"
    );
    assert_eq!(
        http.get(&record.image_name).send().await.unwrap().status(),
        404
    );
    // A retry after a lost answer is done already; without the digest it cannot be told.
    let res = export(serde_json::json!({"dir": keep_in, "digest": digest, "remove": true}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let again: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        (again["already"].clone(), again["removed"].clone()),
        (true.into(), true.into())
    );
    let res = export(serde_json::json!({"dir": keep_in})).await.unwrap();
    assert_eq!(res.status(), 404);
    let err: ErrorBody = res.json().await.unwrap();
    assert_eq!(err.error.code.as_deref(), Some("unknown-image"));
}

/// The policy given at registration is the job's at the GCS.
#[tokio::test]
async fn the_retention_policy_reaches_the_gcs() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-ret-gcs", "criu", CRIU_DRIVER, "").await;
    let job = TestJob::counter(cts.dir.path());
    cts.local
        .register(&reg(
            "gid-ret-gcs",
            job.pid,
            Some(Retention::last(2, "/home/alice/ckpt")),
        ))
        .await
        .unwrap();
    assert_eq!(
        gcs_job(&gcs, "gid-ret-gcs").await.retention,
        Retention::last(2, "/home/alice/ckpt")
    );
}
