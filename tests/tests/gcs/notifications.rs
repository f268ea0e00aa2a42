//! WS-BaseNotification 1.3 on the GCS: Subscribe (topics in the Simple and Concrete dialects,
//! the gca:GID filter, initial termination time), Notify delivered to a consumer with retries,
//! Renew, Unsubscribe, expiry, CTSLost, delivery after a restart, exactly-once delivery with
//! two replicas, and the faults.

use std::collections::BTreeMap;
use std::time::Duration;

use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ns;
use gca_protocol::ops::*;
use gca_protocol::wsn;
use gca_protocol::xml::Element;
use integration_tests::consumer::{Consumer, Notification};
use integration_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// Fast retries, and loopback consumers allowed (the test consumers listen on 127.0.0.1).
fn fast(c: &mut gcs::Config) {
    c.allow_private_consumers = true;
    c.notify_poll_millis = 100;
    c.notify_retry_base_millis = 100;
    c.notify_retry_max_secs = 1;
}

fn env(action: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"{}\" xmlns:wsa=\"{}\" xmlns:wsnt=\"{}\" xmlns:gca=\"urn:gca:v1\" xmlns:xsi=\"{}\">\n<s:Header><wsa:Action>{action}</wsa:Action><wsa:MessageID>urn:uuid:{}</wsa:MessageID></s:Header>\n<s:Body>{body}</s:Body>\n</s:Envelope>",
        ns::SOAP11,
        ns::WSA,
        ns::WSNT,
        ns::XSI,
        uuid::Uuid::new_v4()
    )
}

async fn call(url: &str, action: &str, body: &str) -> Result<Element, Fault> {
    let (_, text) = post_raw(url, "text/xml; charset=utf-8", None, env(action, body)).await;
    gca_protocol::soap::parse_response(&text)
}

fn topic_filter(dialect: &str, topic: &str) -> String {
    format!("<wsnt:TopicExpression Dialect=\"{dialect}\">{topic}</wsnt:TopicExpression>")
}

/// Subscribes `consumer` with the given filter content and extra elements; returns the
/// response.
async fn subscribe_raw(
    gcs: &TestGcs,
    consumer: &str,
    filter: &str,
    extra: &str,
) -> Result<Element, Fault> {
    let filter = if filter.is_empty() {
        String::new()
    } else {
        format!("<wsnt:Filter>{filter}</wsnt:Filter>")
    };
    call(
        &gcs.endpoint(),
        wsn::SUBSCRIBE_REQUEST,
        &format!(
            "<wsnt:Subscribe><wsnt:ConsumerReference><wsa:Address>{consumer}</wsa:Address></wsnt:ConsumerReference>{filter}{extra}</wsnt:Subscribe>"
        ),
    )
    .await
}

/// Subscribes and returns the subscription's address.
async fn subscribe(gcs: &TestGcs, consumer: &Consumer, filter: &str) -> String {
    let resp = subscribe_raw(gcs, &consumer.url, filter, "")
        .await
        .expect("Subscribe");
    assert!(resp.is(ns::WSNT, "SubscribeResponse"));
    assert!(resp.child(ns::WSNT, "CurrentTime").is_some());
    resp.child(ns::WSNT, "SubscriptionReference")
        .and_then(|r| r.opt_text(ns::WSA, "Address"))
        .expect("a SubscriptionReference address")
}

async fn checkpoint(gcs: &TestGcs, id: &str, gid: &str) -> CheckpointRecord {
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record(id, gid, "cts-a"),
    })
    .await
    .expect("register checkpoint")
    .checkpoint
}

fn text(el: &Element, name: &str) -> String {
    el.opt_text(ns::GCA, name).unwrap_or_default()
}

/// No more than `n` notifications arrive within a short while.
async fn settle(consumer: &Consumer, n: usize) {
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        consumer.received().len(),
        n,
        "unexpected notifications: {:#?}",
        consumer.received()
    );
}

#[tokio::test]
async fn checkpoint_taken_reaches_subscribers_with_and_without_a_gid_filter() {
    let gcs = TestGcs::start_with(fast).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let all = Consumer::start().await;
    let one = Consumer::start().await;
    let sub_all = subscribe(
        &gcs,
        &all,
        &topic_filter(wsn::SIMPLE_DIALECT, "gca:CheckpointTaken"),
    )
    .await;
    let sub_one = subscribe(
        &gcs,
        &one,
        &format!(
            "{}<gca:GID>job-2</gca:GID>",
            topic_filter(wsn::CONCRETE_DIALECT, "gca:CheckpointTaken")
        ),
    )
    .await;
    assert!(sub_all.starts_with(&format!("{}/subscriptions/", gcs.endpoint())));
    assert_ne!(sub_all, sub_one);
    gcs.register_job("job-1", "cts-a").await;
    gcs.register_job("job-2", "cts-a").await;
    let c1 = checkpoint(&gcs, "ck-1", "job-1").await;
    let c2 = checkpoint(&gcs, "ck-2", "job-2").await;

    let got = all.wait_for(2, WAIT).await;
    assert_eq!(got.len(), 2);
    for (n, c) in got.iter().zip([&c1, &c2]) {
        assert_eq!(n.action, wsn::NOTIFY);
        assert_eq!(n.topic_name(), "CheckpointTaken");
        assert_eq!(n.dialect, wsn::SIMPLE_DIALECT);
        assert_eq!(n.subscription_address, sub_all);
        assert_eq!(n.producer_address, gcs.endpoint());
        assert!(n.message.is(ns::GCA, "CheckpointTakenEvent"));
        let back = CheckpointRecord::read_children(&n.message).unwrap();
        assert_eq!(back.id, c.id);
        assert_eq!(back.gid, c.gid);
        assert_eq!(back.sequence, Some(1));
        assert!(n.message.child(ns::GCA, "EndpointReference").is_some());
    }
    let got = one.wait_for(1, WAIT).await;
    assert_eq!(got[0].dialect, wsn::CONCRETE_DIALECT);
    assert_eq!(got[0].subscription_address, sub_one);
    assert_eq!(text(&got[0].message, "CheckpointID"), "ck-2");
    // Job registrations were not subscribed to; job-1's checkpoint was filtered out.
    settle(&all, 2).await;
    settle(&one, 1).await;
    // Re-registering the same record is no new checkpoint.
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: CheckpointRecord {
            sequence: None,
            registered_at: None,
            ..c2.clone()
        },
    })
    .await
    .unwrap();
    settle(&one, 1).await;
}

#[tokio::test]
async fn job_and_cts_events_reach_a_subscriber_of_every_topic() {
    let gcs = TestGcs::start_with(fast).await;
    let consumer = Consumer::start().await;
    subscribe(&gcs, &consumer, "").await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    checkpoint(&gcs, "ck-1", "job-1").await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", "http://node-b:8090/cts"),
    })
    .await
    .unwrap();
    // Recovery on cts-b (asked for by a broker): recovering, then running (one JobRecovered).
    gcs.authorize_recovery("job-1", "cts-b").await;
    for state in [JobState::Recovering, JobState::Running] {
        gcs.call::<RegisterJobOp>(RegisterJob {
            gid: "job-1".into(),
            cts_instance: "cts-b".into(),
            local_id: Some("77".into()),
            recovery: true,
            from_checkpoint: Some("ck-1".into()),
            state: Some(state),
            retention: None,
        })
        .await
        .unwrap();
    }
    gcs.call::<JobFinishedOp>(JobFinished {
        gid: "job-1".into(),
        cts_instance: "cts-b".into(),
        exit_status: Some(0),
        signal: None,
    })
    .await
    .unwrap();
    let got = consumer.wait_for(6, WAIT).await;
    let topics: Vec<&str> = got.iter().map(Notification::topic_name).collect();
    assert_eq!(
        topics,
        [
            "CTSRegistered",
            "JobRegistered",
            "CheckpointTaken",
            "CTSRegistered",
            "JobRecovered",
            "JobFinished"
        ]
    );
    assert_eq!(text(&got[0].message, "Name"), "cts-a");
    assert!(got[1].message.is(ns::GCA, "JobRegisteredEvent"));
    assert_eq!(text(&got[1].message, "GID"), "job-1");
    assert_eq!(text(&got[4].message, "CTSInstance"), "cts-b");
    assert_eq!(text(&got[5].message, "State"), "finished");
    assert_eq!(text(&got[5].message, "ExitStatus"), "0");
    settle(&consumer, 6).await;
}

#[tokio::test]
async fn destroying_a_job_resource_is_job_finished() {
    let gcs = TestGcs::start_with(fast).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    let consumer = Consumer::start().await;
    // Subscribing on the job resource filters by its GID.
    let job_url = format!("{}/jobs/job-1", gcs.endpoint());
    let resp = call(
        &job_url,
        wsn::SUBSCRIBE_REQUEST,
        &format!("<wsnt:Subscribe><wsnt:ConsumerReference><wsa:Address>{}</wsa:Address></wsnt:ConsumerReference><wsnt:Filter>{}</wsnt:Filter></wsnt:Subscribe>", consumer.url, topic_filter(wsn::SIMPLE_DIALECT, "gca:JobFinished")),
    )
    .await
    .unwrap();
    assert!(resp.is(ns::WSNT, "SubscribeResponse"));
    gcs.register_job("job-2", "cts-a").await;
    let destroy = |url: String| async move {
        call(
            &url,
            gca_protocol::wsrf::RL_DESTROY_REQUEST,
            "<wsrf-rl:Destroy xmlns:wsrf-rl=\"http://docs.oasis-open.org/wsrf/rl-2\"/>",
        )
        .await
        .unwrap()
    };
    destroy(format!("{}/jobs/job-2", gcs.endpoint())).await;
    destroy(job_url).await;
    let got = consumer.wait_for(1, WAIT).await;
    assert_eq!(got[0].topic_name(), "JobFinished");
    assert_eq!(text(&got[0].message, "GID"), "job-1");
    settle(&consumer, 1).await;
}

#[tokio::test]
async fn a_cts_not_heard_from_is_lost_once_per_loss() {
    let gcs = TestGcs::start_with(|c| {
        fast(c);
        c.cts_lost_after_secs = 0.5;
    })
    .await;
    let consumer = Consumer::start().await;
    subscribe(
        &gcs,
        &consumer,
        &topic_filter(wsn::SIMPLE_DIALECT, "gca:CTSLost"),
    )
    .await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let got = consumer.wait_for(1, WAIT).await;
    assert_eq!(got[0].topic_name(), "CTSLost");
    assert!(got[0].message.is(ns::GCA, "CTSLostEvent"));
    assert_eq!(text(&got[0].message, "Name"), "cts-a");
    settle(&consumer, 1).await;
    // Heard from again (its heartbeat re-registers it), then silent again: lost again.
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-a", "criu", "node-a", "http://node-a:8090/cts"),
    })
    .await
    .unwrap();
    consumer.wait_for(2, WAIT).await;
    settle(&consumer, 2).await;
}

#[tokio::test]
async fn a_failing_consumer_gets_the_notification_on_a_retry() {
    let gcs = TestGcs::start_with(fast).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let consumer = Consumer::start().await;
    consumer.fail(3);
    subscribe(
        &gcs,
        &consumer,
        &topic_filter(wsn::SIMPLE_DIALECT, "gca:JobRegistered"),
    )
    .await;
    let started = std::time::Instant::now();
    gcs.register_job("job-1", "cts-a").await;
    gcs.register_job("job-2", "cts-a").await;
    let got = consumer.wait_for(2, WAIT).await;
    // Backoff 100, 200, 400 ms before the first success; order is kept.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(text(&got[0].message, "GID"), "job-1");
    assert_eq!(text(&got[1].message, "GID"), "job-2");
    assert_eq!(
        consumer.requests.load(std::sync::atomic::Ordering::SeqCst),
        5
    );
    // The row goes once the consumer's answer is back, a moment after it received the Notify.
    integration_tests::cts::eventually(Duration::from_secs(5), "the outbox is empty", || async {
        gcs::db::notification_counts(&gcs.pool).await.unwrap() == (0, 0)
    })
    .await;
}

#[tokio::test]
async fn a_consumer_that_never_answers_is_given_up_after_the_attempts() {
    let gcs = TestGcs::start_with(|c| {
        fast(c);
        c.notify_max_attempts = 3;
    })
    .await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let consumer = Consumer::start().await;
    consumer.fail(usize::MAX);
    subscribe(&gcs, &consumer, "").await;
    gcs.register_job("job-1", "cts-a").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while gcs::db::notification_counts(&gcs.pool).await.unwrap() != (0, 1) {
        assert!(tokio::time::Instant::now() < deadline, "not given up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        consumer.requests.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

#[tokio::test]
async fn renew_unsubscribe_and_expiry() {
    let gcs = TestGcs::start_with(fast).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let consumer = Consumer::start().await;
    let resp = subscribe_raw(
        &gcs,
        &consumer.url,
        "",
        "<wsnt:InitialTerminationTime>PT1H</wsnt:InitialTerminationTime>",
    )
    .await
    .unwrap();
    let sub = resp
        .child(ns::WSNT, "SubscriptionReference")
        .and_then(|r| r.opt_text(ns::WSA, "Address"))
        .unwrap();
    let t0 =
        chrono::DateTime::parse_from_rfc3339(&resp.opt_text(ns::WSNT, "TerminationTime").unwrap())
            .unwrap();
    let now = chrono::Utc::now();
    assert!(t0 > now + chrono::Duration::minutes(59) && t0 < now + chrono::Duration::minutes(61));

    let renewed = call(
        &sub,
        wsn::RENEW_REQUEST,
        "<wsnt:Renew><wsnt:TerminationTime>PT2H</wsnt:TerminationTime></wsnt:Renew>",
    )
    .await
    .unwrap();
    assert!(renewed.is(ns::WSNT, "RenewResponse"));
    let t1 = chrono::DateTime::parse_from_rfc3339(
        &renewed.opt_text(ns::WSNT, "TerminationTime").unwrap(),
    )
    .unwrap();
    assert!(t1 > t0 + chrono::Duration::minutes(59));
    // The subscription's RP document shows the new time.
    let doc = call(
        &sub,
        &gca_protocol::wsrf::rp_request_action("GetResourcePropertyDocument"),
        "<wsrf-rp:GetResourcePropertyDocument xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\"/>",
    )
    .await
    .unwrap();
    let doc = doc.elements().next().unwrap();
    assert!(doc.is(ns::GCA, "SubscriptionResourceProperties"));
    assert_eq!(
        doc.opt_text(ns::WSRF_RL, "TerminationTime").unwrap(),
        renewed.opt_text(ns::WSNT, "TerminationTime").unwrap()
    );

    // Past termination times are refused.
    let past = call(
        &sub,
        wsn::RENEW_REQUEST,
        "<wsnt:Renew><wsnt:TerminationTime>2001-01-01T00:00:00Z</wsnt:TerminationTime></wsnt:Renew>",
    )
    .await
    .unwrap_err();
    assert_eq!(past.kind, FaultKind::UnacceptableTerminationTime);

    let gone = call(&sub, wsn::UNSUBSCRIBE_REQUEST, "<wsnt:Unsubscribe/>")
        .await
        .unwrap();
    assert!(gone.is(ns::WSNT, "UnsubscribeResponse"));
    gcs.register_job("job-1", "cts-a").await;
    for (action, body) in [
        (wsn::UNSUBSCRIBE_REQUEST, "<wsnt:Unsubscribe/>"),
        (
            wsn::RENEW_REQUEST,
            "<wsnt:Renew><wsnt:TerminationTime>PT1H</wsnt:TerminationTime></wsnt:Renew>",
        ),
    ] {
        assert_eq!(
            call(&sub, action, body).await.unwrap_err().kind,
            FaultKind::ResourceUnknown
        );
    }

    // A subscription that expires gets nothing after its termination time and is unknown.
    let short = subscribe_raw(
        &gcs,
        &consumer.url,
        "",
        "<wsnt:InitialTerminationTime>PT0.5S</wsnt:InitialTerminationTime>",
    )
    .await
    .unwrap();
    let short = short
        .child(ns::WSNT, "SubscriptionReference")
        .and_then(|r| r.opt_text(ns::WSA, "Address"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    gcs.register_job("job-2", "cts-a").await;
    assert_eq!(
        call(&short, wsn::UNSUBSCRIBE_REQUEST, "<wsnt:Unsubscribe/>")
            .await
            .unwrap_err()
            .kind,
        FaultKind::ResourceUnknown
    );
    settle(&consumer, 0).await;
    let left: i64 = sqlx::query_scalar("select count(*) from subscriptions")
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the sweep removes expired subscriptions");
}

#[tokio::test]
async fn notifications_queued_while_the_consumer_is_down_survive_a_gcs_restart() {
    let a = TestGcs::start_with(|c| {
        fast(c);
        c.notify_retry_base_millis = 60_000;
    })
    .await;
    a.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    let consumer = Consumer::start().await;
    consumer.fail(1);
    subscribe(
        &a,
        &consumer,
        &topic_filter(wsn::SIMPLE_DIALECT, "gca:JobRegistered"),
    )
    .await;
    a.register_job("job-1", "cts-a").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumer.requests.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.register_job("job-2", "cts-a").await;
    let url = a.database_url.clone();
    a.shutdown().await;
    assert_eq!(
        gcs::db::notification_counts(&gcs::db::connect(&url, 1).await.unwrap())
            .await
            .unwrap(),
        (2, 0)
    );
    // A new GCS on the same database delivers them once the retry is due.
    let pool = gcs::db::connect(&url, 1).await.unwrap();
    sqlx::query("update notifications set next_attempt_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    let b = TestGcs::start_on(&url, fast).await;
    let got = consumer.wait_for(2, WAIT).await;
    let gids: Vec<String> = got.iter().map(|n| text(&n.message, "GID")).collect();
    assert_eq!(gids, ["job-1", "job-2"]);
    assert_eq!(
        got[0].producer_address,
        format!("{}{}", a_url_of(&got[0]), gcs::http::GCS_PATH)
    );
    settle(&consumer, 2).await;
    drop(b);
}

/// The root URL in a notification's producer address.
fn a_url_of(n: &Notification) -> String {
    n.producer_address
        .strip_suffix(gcs::http::GCS_PATH)
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn two_replicas_deliver_each_notification_exactly_once() {
    let a = TestGcs::start_with(fast).await;
    let b = TestGcs::start_on(&a.database_url, fast).await;
    a.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    a.register_job("job-1", "cts-a").await;
    let consumer = Consumer::start().await;
    subscribe(
        &b,
        &consumer,
        &topic_filter(wsn::SIMPLE_DIALECT, "gca:CheckpointTaken"),
    )
    .await;
    let ids: Vec<String> = (0..30).map(|i| format!("ck-{i}")).collect();
    let calls = ids.iter().enumerate().map(|(i, id)| {
        let gcs = if i % 2 == 0 { &a } else { &b };
        checkpoint(gcs, id, "job-1")
    });
    futures::future::join_all(calls).await;
    let got = consumer.wait_for(30, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got_after = consumer.notifications();
    assert_eq!(got_after.len(), 30, "duplicates delivered");
    let mut by_id = BTreeMap::new();
    for n in &got {
        *by_id.entry(text(&n.message, "CheckpointID")).or_insert(0) += 1;
    }
    assert_eq!(by_id.len(), 30);
    assert!(by_id.values().all(|&c| c == 1));
}

/// A consumer that accepts connections and never answers (nor reads).
async fn tarpit() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/consumer", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_tarpit_consumer_does_not_delay_another_consumers_notifications() {
    let gcs = TestGcs::start_with(|c| {
        fast(c);
        c.notify_timeout_secs = 20;
    })
    .await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    // The tarpit subscribes first, so its notifications are queued (and were claimed) first:
    // the one sequential deliverer used to wait out its 20 s timeout before anyone else.
    let (slow, _tarpit) = tarpit().await;
    let filter = topic_filter(wsn::SIMPLE_DIALECT, "gca:CheckpointTaken");
    subscribe_raw(&gcs, &slow, &filter, "")
        .await
        .expect("Subscribe");
    let consumer = Consumer::start().await;
    subscribe(&gcs, &consumer, &filter).await;
    for i in 1..=3 {
        let started = std::time::Instant::now();
        checkpoint(&gcs, &format!("ck-{i}"), "job-1").await;
        let got = consumer.wait_for(i, Duration::from_secs(5)).await;
        assert_eq!(got.len(), i, "notification {i} is late");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    // In order, while the tarpit's first notification is still in flight.
    let got: Vec<String> = consumer
        .notifications()
        .iter()
        .map(|n| text(&n.message, "CheckpointID"))
        .collect();
    assert_eq!(got, ["ck-1", "ck-2", "ck-3"]);
    // The tarpit's rows only: the other consumer's last notification may still be leased
    // for the moment between its answer and the GCS settling the row.
    let leased: i64 = sqlx::query_scalar(
        "select count(*) from notifications n join subscriptions s on s.id = n.subscription_id \
         where s.consumer_address = $1 and n.leased_until > now() and n.attempts = 0",
    )
    .bind(&slow)
    .fetch_one(&gcs.pool)
    .await
    .unwrap();
    assert_eq!(leased, 1, "only the tarpit's first notification is out");
}

#[tokio::test]
async fn bad_subscriptions_get_the_ws_base_notification_faults() {
    let gcs = TestGcs::start().await;
    let consumer = "http://127.0.0.1:9/consumer";
    let cases: Vec<(String, String, FaultKind)> = vec![
        (topic_filter("urn:nope", "gca:CheckpointTaken"), String::new(), FaultKind::TopicExpressionDialectUnknown),
        (topic_filter(wsn::FULL_DIALECT, "gca:*"), String::new(), FaultKind::TopicExpressionDialectUnknown),
        (topic_filter(wsn::SIMPLE_DIALECT, "gca:NoSuchTopic"), String::new(), FaultKind::TopicNotSupported),
        (topic_filter(wsn::SIMPLE_DIALECT, "gca:Job/CheckpointTaken"), String::new(), FaultKind::InvalidTopicExpression),
        (topic_filter(wsn::CONCRETE_DIALECT, "gca:JobFinished/Child"), String::new(), FaultKind::TopicNotSupported),
        (topic_filter(wsn::CONCRETE_DIALECT, "gca:*"), String::new(), FaultKind::InvalidTopicExpression),
        ("<wsnt:MessageContent Dialect=\"http://www.w3.org/TR/1999/REC-xpath-19991116\">true()</wsnt:MessageContent>".into(), String::new(), FaultKind::InvalidFilter),
        (String::new(), "<wsnt:InitialTerminationTime>2001-01-01T00:00:00Z</wsnt:InitialTerminationTime>".into(), FaultKind::UnacceptableInitialTerminationTime),
        (String::new(), "<wsnt:InitialTerminationTime>soon</wsnt:InitialTerminationTime>".into(), FaultKind::UnacceptableInitialTerminationTime),
    ];
    for (filter, extra, kind) in cases {
        let f = subscribe_raw(&gcs, consumer, &filter, &extra)
            .await
            .unwrap_err();
        assert_eq!(f.kind, kind, "{filter} {extra}: {f:?}");
    }
    let f = subscribe_raw(&gcs, "urn:not-http", "", "")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::SubscribeCreationFailed);
    let f = call(
        &gcs.endpoint(),
        wsn::GET_CURRENT_MESSAGE_REQUEST,
        &format!(
            "<wsnt:GetCurrentMessage><wsnt:Topic Dialect=\"{}\">gca:CheckpointTaken</wsnt:Topic></wsnt:GetCurrentMessage>",
            wsn::SIMPLE_DIALECT
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::NoCurrentMessageOnTopic);
    let f = call(
        &format!("{}/subscriptions/nope", gcs.endpoint()),
        wsn::UNSUBSCRIBE_REQUEST,
        "<wsnt:Unsubscribe/>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown);
    let none: i64 = sqlx::query_scalar("select count(*) from subscriptions")
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
    assert_eq!(none, 0);
}

#[tokio::test]
async fn the_gcs_document_advertises_its_topics() {
    let gcs = TestGcs::start().await;
    let doc = call(
        &gcs.endpoint(),
        &gca_protocol::wsrf::rp_request_action("GetResourceProperty"),
        "<wsrf-rp:GetResourceProperty xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\">wsnt:TopicExpression</wsrf-rp:GetResourceProperty>",
    )
    .await
    .unwrap();
    let topics: Vec<String> = doc
        .children_named(ns::WSNT, "TopicExpression")
        .map(|t| t.text())
        .collect();
    assert_eq!(
        topics,
        [
            "gca:CheckpointTaken",
            "gca:JobRegistered",
            "gca:JobRecovered",
            "gca:JobFinished",
            "gca:CTSRegistered",
            "gca:CTSLost"
        ]
    );
}

#[tokio::test]
async fn the_oasis_schemas_accept_every_notification_message_and_fault() {
    let gcs = TestGcs::start_with(fast).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    gcs.register_job("job-1", "cts-a").await;
    let endpoint = gcs.endpoint();
    let stdout = run_python("wsn_check.py", &["--url", &endpoint, "--gid", "job-1"]).await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON output");
    assert_eq!(v["schema_errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["notifications"], 2, "{v}");
    assert_eq!(v["zeep_subscribed"], true, "{v}");
    assert_eq!(v["zeep_notified"], 1, "{v}");
    assert_eq!(v["zeep_unsubscribed"], true, "{v}");
    assert_eq!(v["topic"], "{urn:gca:v1}JobFinished", "{v}");
    assert_eq!(v["dialect"], wsn::SIMPLE_DIALECT, "{v}");
    assert_eq!(v["message"], "{urn:gca:v1}JobFinishedEvent", "{v}");
    assert_eq!(v["subscription"], true, "{v}");
    assert_eq!(v["action"], wsn::NOTIFY, "{v}");
    assert_eq!(v["reference_parameter"], "c-1", "{v}");
    let validated: Vec<String> = v["validated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    for name in [
        "SubscribeResponse",
        "RenewResponse",
        "UnsubscribeResponse",
        "GetResourcePropertyDocumentResponse",
        "GetResourcePropertyResponse",
        "Notify",
        "TopicExpressionDialectUnknownFault",
        "TopicNotSupportedFault",
        "InvalidTopicExpressionFault",
        "InvalidFilterFault",
        "UnacceptableInitialTerminationTimeFault",
        "UnacceptableTerminationTimeFault",
        "NoCurrentMessageOnTopicFault",
        "ResourceUnknownFault",
        "DestroyResponse",
    ] {
        assert!(
            validated.contains(&name.to_string()),
            "{name} not validated: {v}"
        );
    }
}

/// Subscribes over SOAP as `id` to every topic; the subscription's address, or the fault.
async fn subscribe_as(gcs: &TestGcs, id: &str) -> Result<String, Fault> {
    let body = env(
        wsn::SUBSCRIBE_REQUEST,
        "<wsnt:Subscribe><wsnt:ConsumerReference><wsa:Address>http://127.0.0.1:9/consumer</wsa:Address></wsnt:ConsumerReference></wsnt:Subscribe>",
    );
    let resp = http_as(id)
        .post(gcs.endpoint())
        .header("content-type", "text/xml; charset=utf-8")
        .body(body)
        .send()
        .await
        .expect("POST Subscribe");
    let text = resp.text().await.unwrap();
    let el = gca_protocol::soap::parse_response(&text)?;
    Ok(el
        .child(ns::WSNT, "SubscriptionReference")
        .and_then(|r| r.opt_text(ns::WSA, "Address"))
        .expect("a SubscriptionReference address"))
}

/// Subscribes over JSON as `id`: the HTTP status and the JSON body.
async fn subscribe_json_as(gcs: &TestGcs, id: &str) -> (u16, serde_json::Value) {
    let resp = http_as(id)
        .post(format!("{}/api/v1/subscriptions", gcs.url))
        .json(&NewSubscription {
            consumer: "http://127.0.0.1:9/consumer".into(),
            topics: vec!["CheckpointTaken".into()],
            gid: None,
            lifetime_secs: None,
        })
        .send()
        .await
        .expect("POST /api/v1/subscriptions");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// `max_subscriptions_per_identity` and `max_subscriptions` (issue 15): concurrent Subscribes
/// cannot pass them together; the refusal is SubscribeCreationFailedFault with its code over
/// SOAP and the same kind and code over JSON; ended subscriptions free their place.
#[tokio::test]
async fn subscriptions_are_limited_per_identity_and_in_total() {
    let gcs = TestGcs::start_with(|c| {
        fast(c);
        c.max_subscriptions_per_identity = 2;
        c.max_subscriptions = 3;
    })
    .await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let endpoint = gcs.endpoint();
            tokio::spawn(async move {
                let body = env(
                    wsn::SUBSCRIBE_REQUEST,
                    "<wsnt:Subscribe><wsnt:ConsumerReference><wsa:Address>http://127.0.0.1:9/consumer</wsa:Address></wsnt:ConsumerReference></wsnt:Subscribe>",
                );
                let text = http_as(pki::BROKER)
                    .post(endpoint)
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                gca_protocol::soap::parse_response(&text).map(|_| ())
            })
        })
        .collect();
    let mut refused = Vec::new();
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => accepted += 1,
            Err(f) => refused.push(f),
        }
    }
    assert_eq!(
        accepted, 2,
        "per-identity limit 2 under 6 concurrent Subscribes: {refused:?}"
    );
    for f in &refused {
        assert_eq!(f.kind, FaultKind::SubscribeCreationFailed, "{f:?}");
        assert_eq!(
            f.code.as_deref(),
            Some(gca_protocol::fault::SUBSCRIPTIONS_PER_IDENTITY_LIMIT),
            "{f:?}"
        );
        assert!(f.message.contains(pki::BROKER), "{}", f.message);
        assert!(
            f.message.contains("max_subscriptions_per_identity = 2"),
            "{}",
            f.message
        );
    }
    // The SOAP detail is the WS-BaseNotification fault element with the code.
    let body = env(
        wsn::SUBSCRIBE_REQUEST,
        "<wsnt:Subscribe><wsnt:ConsumerReference><wsa:Address>http://127.0.0.1:9/consumer</wsa:Address></wsnt:ConsumerReference></wsnt:Subscribe>",
    );
    let raw = http_as(pki::BROKER)
        .post(gcs.endpoint())
        .header("content-type", "text/xml; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.contains("SubscribeCreationFailedFault"), "{raw}");
    assert!(raw.contains("subscriptions-per-identity-limit"), "{raw}");

    // Another identity (the admin, over JSON) takes the last place; then the GCS is full.
    let (status, body) = subscribe_json_as(&gcs, pki::ADMIN).await;
    assert!((200..300).contains(&status), "{status} {body}");
    let (status, body) = subscribe_json_as(&gcs, pki::ADMIN).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["kind"], "SubscribeCreationFailed", "{body}");
    assert_eq!(
        body["error"]["code"],
        gca_protocol::fault::SUBSCRIPTIONS_LIMIT,
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_subscriptions = 3"),
        "{body}"
    );
    let f = subscribe_as(&gcs, "broker:other-broker").await.unwrap_err();
    assert_eq!(
        f.code.as_deref(),
        Some(gca_protocol::fault::SUBSCRIPTIONS_LIMIT),
        "{f:?}"
    );

    // An unsubscribed and an expired subscription free their places.
    let mine: Vec<String> = sqlx::query_scalar("select id from subscriptions where owner = $1")
        .bind(pki::BROKER)
        .fetch_all(&gcs.pool)
        .await
        .unwrap();
    assert_eq!(mine.len(), 2);
    let unsub = http_as(pki::BROKER)
        .post(format!("{}/subscriptions/{}", gcs.endpoint(), mine[0]))
        .header("content-type", "text/xml; charset=utf-8")
        .body(env(wsn::UNSUBSCRIBE_REQUEST, "<wsnt:Unsubscribe/>"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    gca_protocol::soap::parse_response(&unsub).expect("Unsubscribe");
    subscribe_as(&gcs, "broker:other-broker")
        .await
        .expect("a place was freed");
    sqlx::query(
        "update subscriptions set termination_time = now() - interval '1 second' where id = $1",
    )
    .bind(&mine[1])
    .execute(&gcs.pool)
    .await
    .unwrap();
    subscribe_as(&gcs, pki::BROKER)
        .await
        .expect("an expired subscription does not count");
    let f = subscribe_as(&gcs, pki::BROKER).await.unwrap_err();
    assert_eq!(
        f.code.as_deref(),
        Some(gca_protocol::fault::SUBSCRIPTIONS_LIMIT),
        "{f:?}"
    );
}
