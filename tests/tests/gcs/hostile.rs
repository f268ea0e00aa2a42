//! Hostile input sent to a running GCS (issue 15, docs/reliability.md): each must get a clear,
//! typed refusal, and the GCS must go on serving everyone else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ns;
use gca_protocol::ops::*;
use gca_protocol::wsrf::{self, XPATH_DIALECT};
use gca_protocol::xml::{self, Element};
use integration_tests::cts::eventually;
use integration_tests::*;

/// A GCS with one CTS instance, job `job-1` and two checkpoints of it.
async fn setup() -> TestGcs {
    let gcs = TestGcs::start().await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    for id in ["ck-1", "ck-2"] {
        gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record(id, "job-1", "cts-a"),
        })
        .await
        .unwrap();
    }
    gcs
}

/// Posts a SOAP 1.1 envelope around `body` (prefixes `gca`, `wsrf-rp`, `wsrf-rl`, `xsi`).
async fn soap(url: &str, action: &str, body: &str) -> (u16, Result<Element, Fault>) {
    let envelope = format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"{}\" xmlns:wsa=\"{}\" xmlns:gca=\"urn:gca:v1\" xmlns:wsrf-rp=\"{}\" xmlns:wsrf-rl=\"{}\" xmlns:xsi=\"{}\">\n<s:Header><wsa:Action>{action}</wsa:Action><wsa:MessageID>urn:uuid:{}</wsa:MessageID></s:Header>\n<s:Body>{body}</s:Body>\n</s:Envelope>",
        ns::SOAP11,
        ns::WSA,
        ns::WSRF_RP,
        ns::WSRF_RL,
        ns::XSI,
        uuid::Uuid::new_v4()
    );
    let (status, text) = post_raw(url, "text/xml; charset=utf-8", None, envelope).await;
    (status, gca_protocol::soap::parse_response(&text))
}

async fn query(url: &str, expr: &str) -> Result<Element, Fault> {
    soap(
        url,
        &wsrf::rp_request_action("QueryResourceProperties"),
        &format!(
            "<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect=\"{XPATH_DIALECT}\">{}</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>",
            xml::escape(expr)
        ),
    )
    .await
    .1
}

/// The GCS still answers: a registry call and a WS-RP call.
async fn still_serving(gcs: &TestGcs) {
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .expect("the GCS answers after the hostile request");
    assert_eq!(job.job.gid, "job-1");
    let r = query(&gcs.endpoint(), "string(//gca:CTSInstanceEntry/gca:Name)")
        .await
        .expect("queries still work");
    assert_eq!(r.elements().next().unwrap().text().trim(), "cts-a");
}

#[tokio::test]
async fn xpath_nested_100k_deep_is_refused_and_the_gcs_lives() {
    let gcs = setup().await;
    // ~200 KB: this overflowed sxd-xpath's recursive parser and aborted the whole GCS.
    let expr = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
    let f = query(&gcs.endpoint(), &expr).await.unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidQueryExpression, "{f}");
    assert!(f.message.contains("at most 4096"), "{f}");
    let expr = format!("{}1{}", "(".repeat(1000), ")".repeat(1000));
    let f = query(&gcs.endpoint(), &expr).await.unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidQueryExpression, "{f}");
    assert!(f.message.contains("nest deeper than 32 levels"), "{f}");
    still_serving(&gcs).await;
}

#[tokio::test]
async fn runaway_xpath_queries_stop_at_the_deadline_while_others_are_served() {
    let gcs = setup().await;
    let started = Instant::now();
    let runaway = {
        let url = gcs.endpoint();
        tokio::spawn(async move { query(&url, "//*[count(//*[count(//*[count(//*)])])]").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The runaway runs on its own thread: the GCS answers meanwhile, at once.
    let t = Instant::now();
    gcs.call::<GetJobOp>(GidRequest {
        gid: "job-1".into(),
    })
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let f = runaway.await.unwrap().unwrap_err();
    assert_eq!(f.kind, FaultKind::QueryEvaluationError, "{f}");
    assert!(f.message.contains("ran longer than the limit of 5s"), "{f}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // Stopped at the deadline (it calls functions), so its slot is free again soon.
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serving(&gcs).await;
}

#[tokio::test]
async fn xml_bombs_under_the_body_limit_are_refused_and_the_gcs_lives() {
    let gcs = setup().await;
    let action = wsrf::rp_request_action("GetResourcePropertyDocument");
    // 10,000 attributes: quick-xml's duplicate check compares each with all before it.
    let attrs: String = (0..10_000).map(|i| format!(" a{i}=\"v\"")).collect();
    // Namespace declarations on 40,000 elements under 63 others: each used to copy them all.
    let decls: String = (0..63)
        .map(|i| format!(" xmlns:p{i}=\"urn:{}:{i}\"", "u".repeat(100)))
        .collect();
    let scoped = format!(
        "<gca:Pad{decls}>{}</gca:Pad>",
        "<c xmlns:x=\"u\"/>".repeat(40_000)
    );
    for (what, body, kind, expected) in [
        (
            "attributes",
            format!("<wsrf-rp:GetResourcePropertyDocument{attrs}/>"),
            FaultKind::InvalidMessage,
            "more than 64 attributes",
        ),
        // Read in linear memory now, and refused for what it is.
        (
            "scopes",
            scoped,
            FaultKind::ActionNotSupported,
            "no operation for <{urn:gca:v1}Pad>",
        ),
        (
            "elements",
            format!("<gca:Pad>{}</gca:Pad>", "<c/>".repeat(60_000)),
            FaultKind::InvalidMessage,
            "more than 50000 elements",
        ),
        (
            "text",
            format!("<gca:Pad>{}</gca:Pad>", "x".repeat(600_000)),
            FaultKind::InvalidMessage,
            "text of more than 524288 bytes",
        ),
    ] {
        let started = Instant::now();
        let (_, r) = soap(&gcs.endpoint(), &action, &body).await;
        let f = r.unwrap_err();
        assert_eq!(f.kind, kind, "{what}: {f}");
        assert!(f.message.contains(expected), "{what}: {f}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            started.elapsed()
        );
    }
    still_serving(&gcs).await;
}

#[tokio::test]
async fn durations_past_the_representable_are_typed_faults_not_panics() {
    let gcs = setup().await;
    let job = format!("{}/jobs/job-1", gcs.endpoint());
    // `now + P100000000D` panicked in chrono: the client got an empty reply.
    let (_, r) = soap(
        &job,
        wsrf::RL_SET_TERMINATION_TIME_REQUEST,
        "<wsrf-rl:SetTerminationTime><wsrf-rl:RequestedLifetimeDuration>P100000000D</wsrf-rl:RequestedLifetimeDuration></wsrf-rl:SetTerminationTime>",
    )
    .await;
    let f = r.unwrap_err();
    assert_eq!(f.kind, FaultKind::UnableToSetTerminationTime, "{f}");
    assert!(f.message.contains("latest time"), "{f}");

    let consumer = "<wsnt:ConsumerReference><wsa:Address>http://consumer.example/n</wsa:Address></wsnt:ConsumerReference>";
    let (_, r) = soap(
        &gcs.endpoint(),
        gca_protocol::wsn::SUBSCRIBE_REQUEST,
        &format!("<wsnt:Subscribe xmlns:wsnt=\"{}\">{consumer}<wsnt:InitialTerminationTime>P100000000D</wsnt:InitialTerminationTime></wsnt:Subscribe>", ns::WSNT),
    )
    .await;
    let f = r.unwrap_err();
    assert_eq!(f.kind, FaultKind::UnacceptableInitialTerminationTime, "{f}");

    // Renew reaches the parser once the subscription exists.
    let (_, r) = soap(
        &gcs.endpoint(),
        gca_protocol::wsn::SUBSCRIBE_REQUEST,
        &format!(
            "<wsnt:Subscribe xmlns:wsnt=\"{}\">{consumer}</wsnt:Subscribe>",
            ns::WSNT
        ),
    )
    .await;
    let resp = r.expect("subscribed");
    let address = resp
        .child(ns::WSNT, "SubscriptionReference")
        .and_then(|e| e.opt_text(ns::WSA, "Address"))
        .expect("a subscription address");
    let (_, r) = soap(
        &address,
        gca_protocol::wsn::RENEW_REQUEST,
        &format!("<wsnt:Renew xmlns:wsnt=\"{}\"><wsnt:TerminationTime>P100000000D</wsnt:TerminationTime></wsnt:Renew>", ns::WSNT),
    )
    .await;
    let f = r.unwrap_err();
    assert_eq!(f.kind, FaultKind::UnacceptableTerminationTime, "{f}");
    still_serving(&gcs).await;
}

/// A server on 127.0.0.1 that answers each request with `status` and an endless chunked
/// body; counts the bytes it managed to send before the client hung up.
async fn endless_answers(status: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 16 * 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n");
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                while s.write_all(chunk.as_bytes()).await.is_ok() {
                    counter.fetch_add(64 * 1024, Ordering::SeqCst);
                }
            });
        }
    });
    (url, written)
}

#[tokio::test]
async fn an_endless_answer_from_a_cts_is_cut_off_by_the_retention_runner() {
    let gcs = TestGcs::start_with(|c| {
        c.image_task_retry_base_millis = 60_000;
        c.notify_poll_millis = 50;
    })
    .await;
    let (evil, written) = endless_answers("500 Internal Server Error").await;
    gcs.setup_cts(
        "cts-a",
        "node-a",
        &format!("{evil}/wsrf/services/CheckpointTranslationService"),
    )
    .await;
    gcs.register_job("job-1", "cts-a").await;
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record_at("ck-1", "job-1", "cts-a", &evil),
    })
    .await
    .unwrap();
    // Exit status 0: the job has ended, its image is to be deleted (DELETE {image}).
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-1".into(),
        cts_instance: "cts-a".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    // The runner used to read the whole error answer (for up to cts_timeout_secs, 60 s).
    eventually(
        Duration::from_secs(15),
        "the failed DELETE is recorded",
        || async {
            gcs.call::<GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of("job-1"))
                .await
                .unwrap()
                .checkpoints[0]
                .image_error
                .as_deref()
                .is_some_and(|e| e.contains("HTTP 500"))
        },
    )
    .await;
    let sent = written.load(Ordering::SeqCst);
    assert!(sent < 8 * 1024 * 1024, "the CTS could send {sent} bytes");
    still_serving_job(&gcs).await;
}

async fn still_serving_job(gcs: &TestGcs) {
    gcs.call::<GetJobOp>(GidRequest {
        gid: "job-1".into(),
    })
    .await
    .expect("the GCS answers");
}

#[tokio::test]
async fn gids_and_ids_that_could_inject_are_refused_saying_what_is_allowed() {
    let gcs = setup().await;
    for gid in [
        "x; rm -rf /",
        "-rf",
        "$(id)",
        "../../etc",
        "a b",
        ".hidden",
        "%2e%2e",
    ] {
        let f = gcs
            .call::<RegisterJobOp>(RegisterJob {
                gid: gid.into(),
                cts_instance: "cts-a".into(),
                local_id: None,
                recovery: false,
                from_checkpoint: None,
                state: None,
                retention: None,
            })
            .await
            .unwrap_err();
        assert_eq!(f.kind, FaultKind::InvalidMessage, "{gid}: {f}");
        assert!(f.message.contains("A-Z a-z 0-9 . _ : @ + -"), "{gid}: {f}");
    }
    let f = gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record("-ck", "job-1", "cts-a"),
        })
        .await
        .unwrap_err();
    assert!(f.message.contains("would read as an option"), "{f}");
    // The JSON API and subscription filters follow the same rule.
    let f = gcs
        .json
        .get::<serde_json::Value>("/api/v1/jobs/a%20b")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidMessage, "{f}");
    let f = gcs
        .json
        .post::<_, serde_json::Value>(
            "/api/v1/subscriptions",
            &serde_json::json!({"consumer": "http://consumer.example/n", "gid": "a;b"}),
        )
        .await
        .unwrap_err();
    assert!(f.message.contains("A-Z a-z 0-9"), "{f}");
    still_serving(&gcs).await;
}

#[tokio::test]
async fn slowloris_connections_are_cut_off_and_the_gcs_serves_others() {
    let gcs = TestGcs::start_with(|c| {
        c.connections.header_read_timeout_secs = 1;
        c.connections.idle_timeout_secs = 2;
    })
    .await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    // Without a timer hyper's header timeout was off: these sockets stayed open for ever.
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(gcs.addr).await.unwrap();
        s.write_all(b"POST /wsrf/services/GridCheckpointService HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let t = Instant::now();
    still_serving_job(&gcs).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for s in &mut slow {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a slowloris connection is still open");
    }
    still_serving(&gcs).await;
}

async fn subscribe_json(gcs: &TestGcs, consumer: &str) -> Result<SubscriptionInfo, Fault> {
    gcs.json
        .post(
            "/api/v1/subscriptions",
            &NewSubscription {
                consumer: consumer.into(),
                topics: vec!["CheckpointTaken".into()],
                gid: None,
                lifetime_secs: None,
            },
        )
        .await
}

async fn last_errors(gcs: &TestGcs) -> Vec<String> {
    sqlx::query_scalar::<_, Option<String>>("select last_error from notifications order by id")
        .fetch_all(&gcs.pool)
        .await
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test]
async fn consumers_at_internal_addresses_are_refused_unless_the_site_allows_them() {
    let gcs = setup().await;
    for consumer in [
        "http://127.0.0.1:9/n",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/n",
        "http://[::1]:8080/n",
        "http://[::ffff:127.0.0.1]/n",
        "http://localhost:8080/n",
        "http://2130706433/n",
    ] {
        let f = subscribe_json(&gcs, consumer).await.unwrap_err();
        assert_eq!(
            f.kind,
            FaultKind::SubscribeCreationFailed,
            "{consumer}: {f}"
        );
        assert!(
            f.message.contains("allow_private_consumers"),
            "{consumer}: {f}"
        );
        let (_, r) = soap(
            &gcs.endpoint(),
            gca_protocol::wsn::SUBSCRIBE_REQUEST,
            &format!("<wsnt:Subscribe xmlns:wsnt=\"{}\"><wsnt:ConsumerReference><wsa:Address>{}</wsa:Address></wsnt:ConsumerReference></wsnt:Subscribe>", ns::WSNT, xml::escape(consumer)),
        )
        .await;
        assert_eq!(
            r.unwrap_err().kind,
            FaultKind::SubscribeCreationFailed,
            "{consumer}"
        );
    }
    // A public name is accepted (it is checked again, resolved, at delivery).
    subscribe_json(&gcs, "https://consumer.example.org/n")
        .await
        .unwrap();

    let allowing = TestGcs::start_with(|c| c.allow_private_consumers = true).await;
    subscribe_json(&allowing, "http://127.0.0.1:9/n")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_replica_that_refuses_internal_consumers_does_not_deliver_to_one() {
    let consumer = integration_tests::consumer::Consumer::start().await;
    let fast = |c: &mut gcs::Config| {
        c.notify_poll_millis = 50;
        c.notify_retry_base_millis = 50;
        c.notify_retry_max_secs = 1;
    };
    // Subscribed while internal consumers were allowed...
    let a = TestGcs::start_with(|c| {
        fast(c);
        c.allow_private_consumers = true;
    })
    .await;
    subscribe_json(&a, &consumer.url).await.unwrap();
    let url = a.database_url.clone();
    a.shutdown().await;
    // ...then the site turned it off: the address is checked again at delivery.
    let b = TestGcs::start_on(&url, fast).await;
    b.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    b.register_job("job-1", "cts-a").await;
    b.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record("ck-1", "job-1", "cts-a"),
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the refusal is recorded",
        || async {
            last_errors(&b)
                .await
                .iter()
                .any(|e| e.contains("is refused"))
        },
    )
    .await;
    assert!(
        consumer.received().is_empty(),
        "nothing reached the consumer"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let target = integration_tests::consumer::Consumer::start().await;
    // A consumer that sends the GCS on to another address (307 keeps the method and body).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector = format!("http://{}/n", listener.local_addr().unwrap());
    let to = target.url.clone();
    let app = axum::Router::new().route(
        "/n",
        axum::routing::post(move || {
            let to = to.clone();
            async move { axum::response::Redirect::temporary(&to) }
        }),
    );
    tokio::spawn(gca_protocol::transport::serve(
        listener,
        None,
        app,
        std::future::pending(),
    ));
    let gcs = TestGcs::start_with(|c| {
        c.allow_private_consumers = true;
        c.notify_poll_millis = 50;
        c.notify_retry_base_millis = 60_000;
    })
    .await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    subscribe_json(&gcs, &redirector).await.unwrap();
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record("ck-1", "job-1", "cts-a"),
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the redirect is a failure",
        || async {
            last_errors(&gcs)
                .await
                .iter()
                .any(|e| e.contains("HTTP 307"))
        },
    )
    .await;
    assert!(target.received().is_empty(), "the redirect was followed");
}
