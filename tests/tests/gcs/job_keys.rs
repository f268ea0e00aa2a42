//! Per-job image keys (GetJobKey, issue 12): made once per job, kept wrapped, handed only to
//! the CTS the job is on, and following the job when a recovery moves it.

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::*;

async fn key_as(gcs: &TestGcs, who: &str, gid: &str) -> Result<JobKey, gca_protocol::Fault> {
    gcs.call_as::<GetJobKeyOp>(who, GetJobKey { gid: gid.into() })
        .await
}

fn key_bytes(k: &JobKey) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(&k.key)
        .expect("the key is base64")
}

#[tokio::test]
async fn a_jobs_key_is_made_once_kept_wrapped_and_given_to_its_cts_only() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", UNREACHABLE_CTS),
    })
    .await
    .unwrap();
    gcs.register_job("job-k", "cts-a").await;
    gcs.register_job("job-other", "cts-a").await;

    let first = key_as(&gcs, "cts:cts-a", "job-k")
        .await
        .expect("the job's CTS");
    let key = key_bytes(&first);
    assert_eq!(key.len(), 32);
    // The same key at every later request, also over JSON.
    let again = key_as(&gcs, "cts:cts-a", "job-k").await.unwrap();
    assert_eq!(again, first);
    let json: JobKey = gcs
        .json_as("cts:cts-a")
        .get("/api/v1/jobs/job-k/key")
        .await
        .expect("GET /api/v1/jobs/{gid}/key");
    assert_eq!(json, first);
    // Another job has another key.
    let other = key_as(&gcs, "cts:cts-a", "job-other").await.unwrap();
    assert_ne!(key_bytes(&other), key);
    // The database holds it wrapped only.
    let stored: Vec<u8> = sqlx::query_scalar("select wrapped from job_keys where gid = 'job-k'")
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
    assert!(
        !stored.windows(key.len()).any(|w| w == key.as_slice()),
        "the key is stored in the clear"
    );
    // Nobody else: another CTS, an admin, a broker, a user.
    for who in ["cts:cts-b", pki::ADMIN, pki::BROKER, "user:alice"] {
        let f = key_as(&gcs, who, "job-k").await.unwrap_err();
        assert_eq!(f.kind, FaultKind::AccessDenied, "{who}: {f:?}");
    }
    let f = key_as(&gcs, "cts:cts-a", "no-such-job").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f:?}");

    // A recovery on cts-b (after the job failed on cts-a): the key follows the job.
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-k".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(3),
        signal: None,
    })
    .await
    .unwrap();
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record("ck-k", "job-k", "cts-a"),
    })
    .await
    .unwrap();
    gcs.call_as::<RegisterJobOp>(
        "cts:cts-b",
        RegisterJob {
            gid: "job-k".into(),
            cts_instance: "cts-b".into(),
            local_id: Some("4343".into()),
            recovery: true,
            from_checkpoint: Some("ck-k".into()),
            state: None,
            retention: None,
        },
    )
    .await
    .expect("the recovery registers on cts-b");
    let on_b = key_as(&gcs, "cts:cts-b", "job-k")
        .await
        .expect("the recovering CTS");
    assert_eq!(on_b, first);
    let f = key_as(&gcs, "cts:cts-a", "job-k").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::AccessDenied, "the job left cts-a: {f:?}");
    gcs.shutdown().await;
}

#[tokio::test]
async fn a_gcs_without_a_wrapping_key_holds_no_job_keys() {
    let gcs = TestGcs::start_with(|c| c.job_key_wrapping_key_file = None).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-nokey", "cts-a").await;
    let f = key_as(&gcs, "cts:cts-a", "job-nokey").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::ServiceUnavailable, "{f:?}");
    assert_eq!(f.code.as_deref(), Some("no-job-keys"));
    assert!(f.message.contains("job_key_wrapping_key_file"), "{f}");
    gcs.shutdown().await;
}

#[tokio::test]
async fn a_replica_with_another_wrapping_key_refuses_instead_of_answering_a_wrong_key() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-rep", "cts-a").await;
    key_as(&gcs, "cts:cts-a", "job-rep").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.key");
    gcs::job_keys::KeyWrapper::load_or_create(&other).unwrap();
    let replica = TestGcs::start_on(&gcs.database_url, |c| {
        c.job_key_wrapping_key_file = Some(other.clone());
    })
    .await;
    let f = key_as(&replica, "cts:cts-a", "job-rep").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::Internal, "{f:?}");
    replica.shutdown().await;
    gcs.shutdown().await;
}
