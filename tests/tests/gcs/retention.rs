//! The retention policy of checkpoint images, on the GCS side: when a job ends, the GCS deletes
//! or keeps its images on the CTS that holds each one, through the CTS's image store HTTP API.
//! Here the image store is a small in-test server that records the calls and answers as told,
//! so retries, refusals and races are deterministic; the real CTS store is exercised by the CTS
//! tests (tests/tests/cts/retention.rs).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::Json;
use gca_protocol::fault::{ErrorBody, Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use integration_tests::cts::eventually;
use integration_tests::*;
use serde_json::{json, Value};

/// One call the GCS made to the image store.
#[derive(Debug, Clone)]
struct Call {
    method: &'static str,
    id: String,
    body: Option<Value>,
}

#[derive(Clone, Default)]
struct StoreState {
    calls: Arc<Mutex<Vec<Call>>>,
    /// Answers to give before behaving: (status, message), first in first out.
    failures: Arc<Mutex<VecDeque<(u16, String)>>>,
}

/// An image store answering `DELETE /images/{id}` and `POST /images/{id}/export` like a CTS.
struct ImageStore {
    url: String,
    state: StoreState,
}

impl ImageStore {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = StoreState::default();
        let app = axum::Router::new()
            .route("/images/{id}", delete(store_delete))
            .route("/images/{id}/export", post(store_export))
            .with_state(state.clone());
        serve_tls(listener, &pki::cts("cts-a"), app, std::future::pending());
        ImageStore { url, state }
    }

    fn image_name(&self, id: &str) -> String {
        format!("{}/images/{id}", self.url)
    }

    fn fail_next(&self, status: u16, message: &str) {
        self.state
            .failures
            .lock()
            .unwrap()
            .push_back((status, message.to_string()));
    }

    fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }
}

fn scripted_failure(state: &StoreState) -> Option<(StatusCode, Json<Value>)> {
    let (status, message) = state.failures.lock().unwrap().pop_front()?;
    // The error body a real CTS sends (`gca_store::http`).
    let body = ErrorBody {
        error: Fault::new(FaultKind::OperationFailed, message).with_code("scripted"),
    };
    Some((
        StatusCode::from_u16(status).unwrap(),
        Json(serde_json::to_value(body).unwrap()),
    ))
}

async fn store_delete(
    State(state): State<StoreState>,
    Path(id): Path<String>,
) -> (StatusCode, Json<Value>) {
    state.calls.lock().unwrap().push(Call {
        method: "DELETE",
        id: id.clone(),
        body: None,
    });
    scripted_failure(&state).unwrap_or((StatusCode::OK, Json(json!({"id": id, "freed_bytes": 1}))))
}

async fn store_export(
    State(state): State<StoreState>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    state.calls.lock().unwrap().push(Call {
        method: "EXPORT",
        id: id.clone(),
        body: Some(body.clone()),
    });
    scripted_failure(&state).unwrap_or_else(|| {
        let path = format!("{}/{id}", body["dir"].as_str().unwrap_or("?"));
        (
            StatusCode::OK,
            Json(json!({"id": id, "path": path, "files": 1, "bytes": 1, "already": false, "removed": true})),
        )
    })
}

/// A GCS with fast retries and a store-backed CTS instance `cts-a`.
async fn setup(configure: impl FnOnce(&mut gcs::Config)) -> (TestGcs, ImageStore) {
    let gcs = TestGcs::start_with(|c| {
        c.image_task_retry_base_millis = 20;
        c.image_task_retry_max_secs = 1;
        c.notify_poll_millis = 50;
        configure(c);
    })
    .await;
    let store = ImageStore::start().await;
    gcs.setup_cts(
        "cts-a",
        "node-a",
        &format!("{}/wsrf/services/CheckpointTranslationService", store.url),
    )
    .await;
    (gcs, store)
}

async fn register_job(gcs: &TestGcs, gid: &str, retention: Option<Retention>) -> Job {
    gcs.call::<RegisterJobOp>(RegisterJob {
        gid: gid.into(),
        cts_instance: "cts-a".into(),
        local_id: Some("4242".into()),
        recovery: false,
        from_checkpoint: None,
        state: None,
        retention,
    })
    .await
    .expect("register the job")
    .job
}

/// Registers checkpoints `{gid}-ck-1..=n` whose images live in `store`.
async fn checkpoints(gcs: &TestGcs, store: &ImageStore, gid: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 1..=n {
        let id = format!("{gid}-ck-{i}");
        gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: record(&id, gid, &store.image_name(&id)),
        })
        .await
        .expect("register a checkpoint");
        ids.push(id);
    }
    ids
}

/// A record of CTS `cts-a` whose image is at `image_name` (the in-test image store).
fn record(id: &str, gid: &str, image_name: &str) -> CheckpointRecord {
    signed(CheckpointRecord {
        image_name: image_name.into(),
        digest: Some(format!("sha256:{}", "cd".repeat(32))),
        ..checkpoint_record(id, gid, "cts-a")
    })
}

async fn finish(gcs: &TestGcs, gid: &str, exit_status: Option<i32>, signal: Option<i32>) -> Job {
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: gid.into(),
        cts_instance: "cts-a".into(),
        exit_status,
        signal,
    })
    .await
    .expect("job finished")
    .job
}

async fn records(gcs: &TestGcs, gid: &str) -> Vec<CheckpointRecord> {
    gcs.call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of(gid))
        .await
        .unwrap()
        .checkpoints
}

/// Waits until no record of `gid` is being deleted or kept any more.
async fn settled(gcs: &TestGcs, gid: &str) -> Vec<CheckpointRecord> {
    eventually(
        Duration::from_secs(20),
        "the image tasks are done",
        || async {
            records(gcs, gid)
                .await
                .iter()
                .all(|c| !matches!(c.image_state, ImageState::Deleting | ImageState::Keeping))
        },
    )
    .await;
    records(gcs, gid).await
}

fn states(records: &[CheckpointRecord]) -> Vec<ImageState> {
    records.iter().map(|c| c.image_state).collect()
}

/// A WS-RP or WS-RL request (SOAP 1.1) to a job's resource address: (HTTP status, body).
async fn job_resource(gcs: &TestGcs, gid: &str, action: &str, body: &str) -> (u16, String) {
    post_raw(
        &format!("{}/jobs/{gid}", gcs.endpoint()),
        "text/xml; charset=utf-8",
        None,
        envelope11(action, body),
    )
    .await
}

const GET_RP: &str =
    "http://docs.oasis-open.org/wsrf/rpw-2/GetResourceProperty/GetResourcePropertyRequest";

async fn get_property(gcs: &TestGcs, gid: &str, qname: &str) -> (u16, String) {
    job_resource(
        gcs,
        gid,
        GET_RP,
        &format!("<wsrf-rp:GetResourceProperty xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\">{qname}</wsrf-rp:GetResourceProperty>"),
    )
    .await
}

async fn destroy(gcs: &TestGcs, gid: &str) {
    let (status, text) = job_resource(
        gcs,
        gid,
        "http://docs.oasis-open.org/wsrf/rlw-2/ImmediateResourceTermination/DestroyRequest",
        "<wsrf-rl:Destroy xmlns:wsrf-rl=\"http://docs.oasis-open.org/wsrf/rl-2\"/>",
    )
    .await;
    assert_eq!(status, 200, "Destroy failed: {text}");
}

#[tokio::test]
async fn a_job_that_exits_0_has_its_images_deleted_by_default() {
    let (gcs, store) = setup(|_| {}).await;
    let job = register_job(&gcs, "job-1", None).await;
    assert_eq!(
        job.retention,
        Retention::default(),
        "the default keeps nothing"
    );
    let ids = checkpoints(&gcs, &store, "job-1", 3).await;
    assert!(
        store.calls().is_empty(),
        "nothing is deleted while the job runs"
    );

    finish(&gcs, "job-1", Some(0), None).await;
    let after = settled(&gcs, "job-1").await;
    assert_eq!(states(&after), vec![ImageState::Deleted; 3]);
    let mut deleted: Vec<String> = store.calls().iter().map(|c| c.id.clone()).collect();
    deleted.sort();
    assert_eq!(deleted, ids, "one DELETE per image");
    assert!(store.calls().iter().all(|c| c.method == "DELETE"));

    // The bookkeeping stays; recovering from a deleted image is refused with the reason.
    let fault = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-1".into(),
            image: LATEST.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(fault.kind, FaultKind::ResourceUnknown);
    assert_eq!(fault.code.as_deref(), Some("image-not-stored"));
    assert!(
        fault.message.contains("was deleted when the job ended"),
        "{}",
        fault.message
    );

    // A record the CTS delivers late (it was queued while the GCS was away) goes the same way.
    let late = "job-1-ck-late";
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: record(late, "job-1", &store.image_name(late)),
    })
    .await
    .unwrap();
    let after = settled(&gcs, "job-1").await;
    assert_eq!(states(&after), vec![ImageState::Deleted; 4]);
    assert!(store.calls().iter().any(|c| c.id == late));
}

#[tokio::test]
async fn keep_last_moves_the_newest_images_to_the_owners_directory_on_destroy() {
    let (gcs, store) = setup(|_| {}).await;
    let policy = Retention::last(2, "/home/alice/checkpoints");
    let job = register_job(&gcs, "job-2", Some(policy.clone())).await;
    assert_eq!(job.retention, policy);
    let ids = checkpoints(&gcs, &store, "job-2", 3).await;

    // Destroying the job resource ends the job (WS-ResourceLifetime).
    destroy(&gcs, "job-2").await;
    let after = settled(&gcs, "job-2").await;
    assert_eq!(
        states(&after),
        vec![ImageState::Deleted, ImageState::Kept, ImageState::Kept]
    );
    for c in &after[1..] {
        assert_eq!(
            c.kept_in.as_deref(),
            Some(format!("/home/alice/checkpoints/{}", c.id).as_str())
        );
    }
    let calls = store.calls();
    let exports: Vec<&Call> = calls.iter().filter(|c| c.method == "EXPORT").collect();
    assert_eq!(exports.len(), 2);
    for e in &exports {
        let body = e.body.as_ref().unwrap();
        assert_eq!(body["dir"], "/home/alice/checkpoints");
        assert_eq!(body["remove"], true, "kept images leave the system's store");
        assert_eq!(body["digest"], format!("sha256:{}", "cd".repeat(32)));
    }
    assert!(calls.iter().any(|c| c.method == "DELETE" && c.id == ids[0]));

    // A kept image is not the system's any more: recovery says where it went.
    let fault = gcs
        .call::<GetRecoveryInfoOp>(GetRecoveryInfo {
            gid: "job-2".into(),
            image: ids[2].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(fault.code.as_deref(), Some("image-not-stored"));
    assert!(
        fault.message.contains("/home/alice/checkpoints"),
        "{}",
        fault.message
    );
}

#[tokio::test]
async fn a_failed_job_keeps_its_images_for_recovery_until_its_termination_time() {
    let (gcs, store) = setup(|c| c.failed_job_lifetime_secs = 2).await;
    register_job(&gcs, "job-3", None).await;
    checkpoints(&gcs, &store, "job-3", 2).await;

    // Killed (e.g. its node failed): the images are what recovers it.
    finish(&gcs, "job-3", None, Some(9)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        states(&records(&gcs, "job-3").await),
        vec![ImageState::Stored; 2]
    );
    assert!(store.calls().is_empty());
    let termination: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select termination_time from jobs where gid = 'job-3'")
            .fetch_one(&gcs.pool)
            .await
            .unwrap();
    assert!(
        termination.is_some(),
        "a failed job gets a termination time"
    );

    // Recovering it clears that termination time...
    gcs.call::<RegisterJobOp>(RegisterJob {
        gid: "job-3".into(),
        cts_instance: "cts-a".into(),
        local_id: Some("4343".into()),
        recovery: true,
        from_checkpoint: Some("job-3-ck-2".into()),
        state: Some(JobState::Running),
        retention: None,
    })
    .await
    .unwrap();
    let termination: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select termination_time from jobs where gid = 'job-3'")
            .fetch_one(&gcs.pool)
            .await
            .unwrap();
    assert_eq!(
        termination, None,
        "the recovered job runs again without an end"
    );

    // ...and when it fails again and nobody recovers it in time, its images go.
    finish(&gcs, "job-3", Some(3), None).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // The first request to the expired resource destroys it (the sweep would, later).
    let _ = gcs
        .call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of("job-3"))
        .await;
    let (status, _) = get_property(&gcs, "job-3", "gca:State").await;
    assert_ne!(status, 200, "the job resource has expired");
    let after = settled(&gcs, "job-3").await;
    assert_eq!(states(&after), vec![ImageState::Deleted; 2]);
}

#[tokio::test]
async fn unreachable_cts_is_retried_and_a_refusal_leaves_the_image_until_the_policy_is_set_again() {
    let (gcs, store) = setup(|c| c.image_task_max_attempts = 4).await;
    register_job(&gcs, "job-4", Some(Retention::all("/home/bob/not-his"))).await;
    let ids = checkpoints(&gcs, &store, "job-4", 1).await;

    // The CTS is in trouble twice, then refuses: the directory is not the owner's.
    store.fail_next(503, "store busy");
    store.fail_next(503, "store busy");
    store.fail_next(
        403,
        "directory /home/bob/not-his belongs to uid 1001, not to the job's owner uid 1000",
    );
    finish(&gcs, "job-4", Some(0), None).await;
    let after = settled(&gcs, "job-4").await;
    assert_eq!(states(&after), vec![ImageState::Failed]);
    let error = after[0].image_error.clone().unwrap_or_default();
    // The status and fault kind, not the CTS's text (anyone can read the record).
    assert!(
        error.contains("HTTP 403 Forbidden (OperationFailed, scripted)"),
        "{error}"
    );
    assert!(!error.contains("belongs to uid 1001"), "{error}");
    assert!(error.contains("after 3 attempt(s)"), "{error}");
    assert!(error.contains("set the retention policy again"), "{error}");
    assert_eq!(
        store.calls().len(),
        3,
        "503, 503, then the refusal is final"
    );

    // The owner fixes it: a new policy on an ended job applies at once, to the failed image.
    let info = gcs
        .call::<SetRetentionOp>(SetRetention {
            gid: "job-4".into(),
            retention: Retention::all("/home/alice/checkpoints"),
        })
        .await
        .unwrap();
    assert_eq!(
        info.job.retention,
        Retention::all("/home/alice/checkpoints")
    );
    let after = settled(&gcs, "job-4").await;
    assert_eq!(states(&after), vec![ImageState::Kept]);
    assert_eq!(
        after[0].kept_in.as_deref(),
        Some(format!("/home/alice/checkpoints/{}", ids[0]).as_str())
    );
    assert_eq!(after[0].image_error, None);

    // A CTS that never answers: given up after the attempts, the image stays where it was.
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance(
            "cts-gone",
            "criu",
            "node-gone",
            "https://127.0.0.1:9/wsrf/services/CheckpointTranslationService",
        ),
    })
    .await
    .unwrap();
    gcs.register_job("job-5", "cts-gone").await;
    let gone = "job-5-ck-1";
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record_at(gone, "job-5", "cts-gone", "https://127.0.0.1:9"),
    })
    .await
    .unwrap();
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-5".into(),
        cts_instance: "cts-gone".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    let after = settled(&gcs, "job-5").await;
    assert_eq!(states(&after), vec![ImageState::Failed]);
    assert!(
        after[0]
            .image_error
            .as_deref()
            .unwrap_or_default()
            .contains("after 4 attempt(s)"),
        "{:?}",
        after[0].image_error
    );
}

#[tokio::test]
async fn set_retention_checks_the_policy_and_shows_it_everywhere() {
    let (gcs, _store) = setup(|_| {}).await;
    register_job(&gcs, "job-6", None).await;

    for (bad, why) in [
        (
            Retention {
                keep: Keep::Last,
                keep_last: None,
                keep_in: Some("/d".into()),
            },
            "needs KeepLast",
        ),
        (
            Retention {
                keep: Keep::All,
                keep_last: None,
                keep_in: None,
            },
            "needs KeepIn",
        ),
        (Retention::all("relative/dir"), "absolute path"),
        (Retention::all("/home/../etc"), "normalized"),
        (Retention::last(0, "/d"), "between 1 and"),
        (
            Retention {
                keep: Keep::None,
                keep_last: None,
                keep_in: Some("/d".into()),
            },
            "only goes with",
        ),
    ] {
        let fault = gcs
            .call::<SetRetentionOp>(SetRetention {
                gid: "job-6".into(),
                retention: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(fault.kind, FaultKind::InvalidMessage, "{bad:?}");
        assert!(fault.message.contains(why), "{bad:?}: {}", fault.message);
    }
    let fault = gcs
        .call::<SetRetentionOp>(SetRetention {
            gid: "nope".into(),
            retention: Retention::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(fault.kind, FaultKind::ResourceUnknown);

    // Over JSON, and the job shows it (JSON, SOAP, its resource property document).
    let info: JobInfo = gcs
        .json
        .put(
            "/api/v1/jobs/job-6/retention",
            &json!({"keep": "last", "keep_last": 3, "keep_in": "/scratch/carol//"}),
        )
        .await
        .unwrap();
    assert_eq!(info.job.retention, Retention::last(3, "/scratch/carol"));
    let err = gcs
        .json
        .put::<_, JobInfo>(
            "/api/v1/jobs/job-6/retention",
            &json!({"keep": "sometimes"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::InvalidMessage);
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-6".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(job.retention, Retention::last(3, "/scratch/carol"));
    let (_, rp) = get_property(&gcs, "job-6", "gca:Retention").await;
    assert!(rp.contains("<gca:KeepLast>3</gca:KeepLast>"), "{rp}");
    assert!(rp.contains("/scratch/carol"), "{rp}");

    // While the job runs nothing is applied; re-registering it with a policy updates it.
    let again = gcs
        .call::<RegisterJobOp>(RegisterJob {
            gid: "job-6".into(),
            cts_instance: "cts-a".into(),
            local_id: Some("4242".into()),
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: Some(Retention::default()),
        })
        .await
        .unwrap();
    assert_eq!(again.outcome, Registration::Updated);
    assert_eq!(again.job.retention, Retention::default());
}
