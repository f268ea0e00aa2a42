//! Bad input on the wire: each gets a clear, typed fault and changes nothing.

use gca_protocol::fault::FaultKind;
use gca_protocol::ns;
use gca_protocol::ops::{DoCheckpointOp, Operation};
use integration_tests::*;
use std::time::Duration;

fn fault_detail(body: &str) -> gca_protocol::Fault {
    gca_protocol::soap::parse_response(body).expect_err("a SOAP fault")
}

#[tokio::test]
async fn malformed_xml_is_a_client_fault_naming_the_line() {
    let gcs = TestGcs::start().await;
    let body = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\n<s:Body>\n<gca:DoCheckpoint xmlns:gca=\"urn:gca:v1\"><gca:GID>x</gca:DoCheckpoint>\n</s:Body></s:Envelope>";
    let (status, text) = post_raw(
        &gcs.endpoint(),
        "text/xml; charset=utf-8",
        Some("\"\""),
        body.into(),
    )
    .await;
    assert_eq!(status, 500, "SOAP 1.1 faults travel with HTTP 500");
    assert!(text.contains("<faultcode>s:Client</faultcode>"), "{text}");
    let f = fault_detail(&text);
    assert_eq!(f.kind, FaultKind::InvalidMessage);
    assert!(f.message.contains("line 3"), "{}", f.message);
}

#[tokio::test]
async fn missing_fields_unknown_operations_and_wrong_actions_are_named() {
    let gcs = TestGcs::start().await;
    let action = DoCheckpointOp::request_action();
    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(
            &action,
            "<gca:DoCheckpoint><gca:Stop>true</gca:Stop></gca:DoCheckpoint>",
        ),
    )
    .await;
    let f = fault_detail(&text);
    assert_eq!(f.kind, FaultKind::InvalidMessage);
    assert!(f.message.contains("GID"), "{}", f.message);

    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11("urn:gca:v1/GridCheckpointService/FlyRequest", "<gca:Fly/>"),
    )
    .await;
    let f = fault_detail(&text);
    assert_eq!(f.kind, FaultKind::ActionNotSupported);
    assert!(
        f.message.contains("Fly") && f.message.contains("DoCheckpoint"),
        "{}",
        f.message
    );

    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(
            "urn:gca:v1/GridCheckpointService/FindCTSRequest",
            "<gca:DoCheckpoint><gca:GID>x</gca:GID></gca:DoCheckpoint>",
        ),
    )
    .await;
    assert_eq!(fault_detail(&text).code.as_deref(), Some("action-mismatch"));

    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(&action, "<other:DoCheckpoint xmlns:other=\"urn:other\"/>"),
    )
    .await;
    assert_eq!(fault_detail(&text).kind, FaultKind::ActionNotSupported);
}

#[tokio::test]
async fn unknown_gid_is_a_resource_unknown_fault_in_both_soap_versions() {
    let gcs = TestGcs::start().await;
    let body = "<gca:GetCheckpoints><gca:GID>ghost</gca:GID></gca:GetCheckpoints>";
    let action = "urn:gca:v1/GridCheckpointService/GetCheckpointsRequest";
    let (status, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        Some(&format!("\"{action}\"")),
        envelope11(action, body),
    )
    .await;
    assert_eq!(status, 500);
    assert!(
        text.contains("ResourceUnknownFault") && text.contains(ns::WSRF_R),
        "{text}"
    );
    assert!(
        text.contains("<wsa:Action>http://docs.oasis-open.org/wsrf/fault</wsa:Action>"),
        "{text}"
    );
    assert!(
        text.contains("wsa:RelatesTo"),
        "faults relate to the request's MessageID: {text}"
    );

    let env12 = format!(
        "<env:Envelope xmlns:env=\"http://www.w3.org/2003/05/soap-envelope\" xmlns:gca=\"urn:gca:v1\"><env:Body>{body}</env:Body></env:Envelope>"
    );
    let (status, text) = post_raw(
        &gcs.endpoint(),
        &format!("application/soap+xml; charset=utf-8; action=\"{action}\""),
        None,
        env12,
    )
    .await;
    assert_eq!(status, 400, "SOAP 1.2 sender faults travel with HTTP 400");
    assert!(text.contains("<env:Value>env:Sender</env:Value>"), "{text}");
    assert_eq!(fault_detail(&text).kind, FaultKind::ResourceUnknown);

    let resp = http()
        .get(format!("{}/api/v1/jobs/ghost", gcs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["kind"], "ResourceUnknown");
    assert!(v["error"]["message"].as_str().unwrap().contains("ghost"));
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_they_are_read() {
    let gcs = TestGcs::start_with(|c| c.max_body_bytes = 4096).await;
    let big = envelope11(
        "urn:x",
        &format!(
            "<gca:FindCTS><gca:CTSType>{}</gca:CTSType></gca:FindCTS>",
            "x".repeat(10_000)
        ),
    );
    let (status, text) = post_raw(&gcs.endpoint(), "text/xml", None, big).await;
    assert_eq!(status, 413);
    assert_eq!(fault_detail(&text).kind, FaultKind::PayloadTooLarge);
    // Chunked, without a Content-Length: still bounded.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b' '; 1024])).collect();
    let resp = http()
        .post(format!("{}/api/v1/find-cts", gcs.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
}

#[tokio::test]
async fn malformed_json_and_disagreeing_paths_are_refused() {
    let gcs = TestGcs::start().await;
    let resp = http()
        .post(format!("{}/api/v1/classes", gcs.url))
        .header("content-type", "application/json")
        .body("{\"class\": {\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{v}"
    );
    let resp = http()
        .post(format!("{}/api/v1/jobs/a/checkpoints", gcs.url))
        .json(&serde_json::json!({"gid": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = http()
        .post(format!("{}/api/v1/classes", gcs.url))
        .json(&serde_json::json!({"class": {"name": "bad name!", "properties": []}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = http()
        .get(format!("{}/api/v1/jobs?state=sleeping", gcs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}

#[tokio::test]
async fn the_database_going_away_is_reported_as_unavailable() {
    let gcs = TestGcs::start().await;
    assert_eq!(
        http()
            .get(format!("{}/healthz", gcs.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    gcs.pool.close().await;
    let resp = http()
        .get(format!("{}/healthz", gcs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    let err = gcs
        .call::<gca_protocol::ops::ListClassesOp>(gca_protocol::messages::ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ServiceUnavailable);
}

#[tokio::test]
async fn a_gcs_started_before_its_database_serves_once_the_database_is_there() {
    // A database that does not exist yet: the GCS must start, say why it cannot serve, and
    // migrate and serve by itself once the database appears (no restart).
    let url = db::fresh_database_url().await;
    db::drop_database(&url).await;
    let gcs = TestGcs::start_unmigrated(&url).await;
    let health = |gcs: &TestGcs| {
        let u = format!("{}/healthz", gcs.url);
        async move { http().get(u).send().await.unwrap() }
    };
    let resp = health(&gcs).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.text().await.unwrap().contains("database"));
    let err = gcs
        .call::<gca_protocol::ops::ListClassesOp>(gca_protocol::messages::ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.kind, FaultKind::ServiceUnavailable, "{err:?}");
    assert_eq!(err.code.as_deref(), Some("database-unavailable"));
    // Discovery still answers while the database is away.
    let wsdl = http()
        .get(format!("{}?wsdl", gcs.endpoint()))
        .send()
        .await
        .unwrap();
    assert_eq!(wsdl.status().as_u16(), 200);

    db::create_database(&url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health(&gcs).await.status().as_u16() != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the GCS did not pick up its database"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    gcs.call::<gca_protocol::ops::ListClassesOp>(gca_protocol::messages::ListRequest {})
        .await
        .expect("served once migrated");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, gcs::MIGRATOR.iter().count());
    gcs.shutdown().await;
    db::drop_database(&url).await;
}
