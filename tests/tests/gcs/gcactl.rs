//! `gcactl` against a real GCS: the admin and broker workflows and its exit codes.

use integration_tests::*;

/// The gcactl binary built alongside this test (target/<profile>/gcactl).
fn gcactl_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("gcactl");
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        path.display()
    );
    path
}

/// gcactl as the test admin (its certificate from GCA_CA, GCA_CERT, GCA_KEY).
async fn gcactl(gcs_url: &str, args: &[&str]) -> (i32, String, String) {
    gcactl_as(pki::ADMIN, gcs_url, args).await
}

async fn gcactl_as(id: &str, gcs_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(gcactl_path())
        .envs(pki::pki().env(id))
        .arg("--gcs")
        .arg(gcs_url)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn admin_and_broker_workflow() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await;
    cts.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    let descriptor = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/examples/criu-cts.xml"
    );

    let (code, out, err) = gcactl(&gcs.url, &["type", "register", descriptor]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("criu") && out.contains("created"), "{out}");
    let (code, out, _) = gcactl(
        &gcs.url,
        &[
            "class",
            "add",
            "migratable",
            "--property",
            "recover-on-other-resource=true",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("created"), "{out}");
    let (_, out, _) = gcactl(&gcs.url, &["class", "list"]).await;
    assert!(out.contains("basic") && out.contains("migratable"), "{out}");

    gcs.call::<gca_protocol::ops::RegisterCtsInstanceOp>(
        gca_protocol::messages::RegisterCtsInstance {
            instance: instance("cts-a", "criu", "node-a", &cts.url),
        },
    )
    .await
    .unwrap();
    gcs.register_job("job-9", "cts-a").await;

    let (code, out, err) = gcactl(&gcs.url, &["--json", "checkpoint", "job-9"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sequence"], 1);
    let id = v["id"].as_str().unwrap().to_string();
    let (code, out, _) = gcactl(&gcs.url, &["checkpoints", "job-9"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id), "{out}");
    let (code, out, _) = gcactl(&gcs.url, &["recovery-info", "job-9"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("gca-recover") && out.contains(&id) && out.contains("--gid"),
        "{out}"
    );
    let (_, out, _) = gcactl(&gcs.url, &["find-cts", "--class", "basic"]).await;
    assert!(out.contains("cts-a") && out.contains("gca-exec"), "{out}");

    let (code, _, err) = gcactl(&gcs.url, &["job", "show", "no-such-job"]).await;
    assert_eq!(code, 3, "not found: {err}");
    assert!(
        err.contains("ResourceUnknown") && err.contains("no-such-job"),
        "{err}"
    );
    let (code, _, err) = gcactl(
        &gcs.url,
        &["class", "add", "migratable", "--property", "x=y"],
    )
    .await;
    assert_eq!(code, 1, "conflict: {err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (code, _, err) = gcactl(&dead_url, &["class", "list"]).await;
    assert_eq!(code, 4, "unreachable: {err}");
}

#[tokio::test]
async fn subscriptions_over_json_and_gcactl_show_their_backlog() {
    use gca_protocol::messages::{NewSubscription, SubscriptionInfo, SubscriptionList};
    use integration_tests::consumer::Consumer;
    use std::time::Duration;

    let gcs = TestGcs::start_with(|c| {
        c.allow_private_consumers = true;
        c.notify_poll_millis = 50;
        c.notify_retry_base_millis = 20;
        c.notify_retry_max_secs = 1;
        c.notify_max_attempts = 2;
    })
    .await;
    let consumer = Consumer::start().await;

    // JSON: subscribe to one topic for one job; the Notify arrives like any WS-N subscriber's.
    let sub: SubscriptionInfo = gcs
        .json
        .post(
            "/api/v1/subscriptions",
            &NewSubscription {
                consumer: consumer.url.clone(),
                topics: vec!["CTSRegistered".into()],
                gid: None,
                lifetime_secs: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(sub.topics, vec!["CTSRegistered".to_string()]);
    assert_eq!(sub.termination_time, None, "lifetime 0: no end");
    assert!(
        sub.address.ends_with(&format!("/subscriptions/{}", sub.id)),
        "{}",
        sub.address
    );
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let got = consumer.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].topic_name(), "CTSRegistered");

    // Unknown topics and consumers the GCS cannot POST to are refused.
    let err = gcs
        .json
        .post::<_, SubscriptionInfo>(
            "/api/v1/subscriptions",
            &serde_json::json!({"consumer": consumer.url, "topics": ["Nope"]}),
        )
        .await
        .unwrap_err();
    assert!(
        err.message.contains("unknown topic \"Nope\""),
        "{}",
        err.message
    );
    let (code, _, err) = gcactl(&gcs.url, &["subscription", "add", "ftp://x/y"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not an http(s) URL"), "{err}");

    // gcactl: add one that fails, see its backlog and error, remove it.
    let (code, out, err) = gcactl(
        &gcs.url,
        &[
            "subscription",
            "add",
            &consumer.url,
            "--topic",
            "JobRegistered",
            "--lifetime",
            "3600",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .map(|v| v.trim().to_string())
        .expect("the subscription's ID");
    consumer.fail(10);
    gcs.register_job("job-1", "cts-a").await;
    let list_has_failed = || async {
        let list: SubscriptionList = gcs.json.get("/api/v1/subscriptions").await.unwrap();
        list.subscriptions
            .iter()
            .any(|s| s.id == id && s.failed == 1 && s.last_error.is_some())
    };
    integration_tests::cts::eventually(
        Duration::from_secs(10),
        "the notification fails",
        list_has_failed,
    )
    .await;
    let (code, out, _) = gcactl(&gcs.url, &["subscription", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("JobRegistered"), "{out}");
    assert!(out.contains("HTTP 503"), "the last error is shown: {out}");
    let (code, out, _) = gcactl(&gcs.url, &["subscription", "remove", &id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("unsubscribed"), "{out}");
    let (code, _, err) = gcactl(&gcs.url, &["subscription", "show", &id]).await;
    assert_eq!(code, 3, "an unknown subscription is not found: {err}");
}

#[tokio::test]
async fn retention_is_set_and_shown_by_gcactl() {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;

    let (code, out, err) = gcactl(&gcs.url, &["job", "show", "job-1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("delete all"), "the default policy: {out}");
    let (code, out, err) = gcactl(
        &gcs.url,
        &[
            "retention",
            "job-1",
            "--keep-last",
            "2",
            "--keep-in",
            "/home/alice/ckpt",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("keep last 2 in /home/alice/ckpt"), "{out}");
    let (_, out, _) = gcactl(&gcs.url, &["--json", "job", "show", "job-1"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["job"]["retention"]["keep"], "last");
    assert_eq!(v["job"]["retention"]["keep_last"], 2);

    // Refused before anything is sent: a policy that keeps needs a directory.
    let (code, _, err) = gcactl(&gcs.url, &["retention", "job-1", "--keep-all"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("needs KeepIn"), "{err}");
    // One of --keep-last, --keep-all, --keep-none is required (a usage error).
    let (code, _, _) = gcactl(&gcs.url, &["retention", "job-1"]).await;
    assert_eq!(code, 2);
    let (code, _, err) = gcactl(&gcs.url, &["retention", "nope", "--keep-none"]).await;
    assert_eq!(code, 3, "{err}");
}

/// GetCheckpoints answers one page (at most `checkpoints_page_size` records) with `Next` when
/// more follow (issue 15: one ever-growing answer broke recovery of a job with many records);
/// SOAP, JSON and gcactl, which follows the pages, see every record once, in order.
#[tokio::test]
async fn get_checkpoints_pages_a_job_with_more_records_than_a_page() {
    use gca_protocol::fault::FaultKind;
    use gca_protocol::messages::{CheckpointList, GetCheckpoints, RegisterCheckpoint};
    use gca_protocol::ops::{GetCheckpointsOp, RegisterCheckpointOp};

    let gcs = TestGcs::start_with(|c| c.checkpoints_page_size = 3).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    for i in 1..=8 {
        gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record(&format!("ck-{i}"), "job-1", "cts-a"),
        })
        .await
        .unwrap();
    }

    // SOAP: pages of 3, 3 and 2; Next is the last sequence number of a full page.
    let mut req = GetCheckpoints::of("job-1");
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = gcs.call::<GetCheckpointsOp>(req.clone()).await.unwrap();
        pages.push((page.checkpoints.len(), page.next));
        seen.extend(page.checkpoints.iter().map(|c| c.sequence.unwrap()));
        match req.next_page(&page) {
            Some(n) => req = n,
            None => break,
        }
    }
    assert_eq!(pages, [(3, Some(3)), (3, Some(6)), (2, None)]);
    assert_eq!(seen, (1..=8).collect::<Vec<i64>>());
    // A smaller Limit is honoured, a larger one is capped at the page size, 0 is refused.
    let mut small = GetCheckpoints::of("job-1");
    small.limit = Some(2);
    small.after = Some(5);
    let page = gcs.call::<GetCheckpointsOp>(small.clone()).await.unwrap();
    let ids: Vec<_> = page.checkpoints.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["ck-6", "ck-7"]);
    assert_eq!(page.next, Some(7));
    small.limit = Some(1000);
    small.after = None;
    let page = gcs.call::<GetCheckpointsOp>(small.clone()).await.unwrap();
    assert_eq!((page.checkpoints.len(), page.next), (3, Some(3)));
    small.limit = Some(0);
    let f = gcs.call::<GetCheckpointsOp>(small).await.unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidMessage, "{f}");
    // Past the end: an empty last page.
    let mut end = GetCheckpoints::of("job-1");
    end.after = Some(8);
    let page = gcs.call::<GetCheckpointsOp>(end).await.unwrap();
    assert!(
        page.checkpoints.is_empty() && page.next.is_none(),
        "{page:?}"
    );

    // JSON: ?after=&limit=, and `next` in the body.
    let page: CheckpointList = gcs
        .json
        .get("/api/v1/jobs/job-1/checkpoints?after=3")
        .await
        .unwrap();
    assert_eq!(page.checkpoints[0].id, "ck-4");
    assert_eq!(page.next, Some(6));
    let page: CheckpointList = gcs
        .json
        .get("/api/v1/jobs/job-1/checkpoints?after=6&limit=5")
        .await
        .unwrap();
    assert_eq!(page.checkpoints.len(), 2);
    assert_eq!(page.next, None);

    // gcactl follows the pages: every record, once.
    let (code, out, err) = gcactl(&gcs.url, &["checkpoints", "job-1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let ids: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let want: Vec<String> = (1..=8).map(|i| format!("ck-{i}")).collect();
    assert_eq!(ids, want, "{out}");
    let (code, out, err) = gcactl(&gcs.url, &["--json", "checkpoints", "job-1"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let all: CheckpointList = serde_json::from_str(&out).unwrap();
    let seqs: Vec<_> = all
        .checkpoints
        .iter()
        .map(|c| c.sequence.unwrap())
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<i64>>());
    assert_eq!(all.next, None);
}
