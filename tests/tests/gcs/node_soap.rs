//! A second SOAP toolkit family: node-soap (JavaScript, npm `soap`), with clients built at run
//! time from the WSDL each service serves, over SOAP 1.1 and 1.2 (`tests/js/soap_client.js`).
//! Like zeep (wire.rs), it loads everything from the service alone.

use integration_tests::cts::{TestCts, APP_DRIVER};
use integration_tests::*;

const RESOURCE_UNKNOWN: &str = "ResourceUnknownFault";
const WSRF_R: &str = "http://docs.oasis-open.org/wsrf/r-2";

/// A fault as soap_client.js decoded it: the detail element of WS-Resource's
/// ResourceUnknownFault with its WS-BaseFaults content, in the given SOAP version.
fn assert_resource_unknown(fault: &serde_json::Value, version: &str, gid: &str) {
    assert_eq!(fault["version"], version, "{fault}");
    assert_eq!(fault["element"], RESOURCE_UNKNOWN, "{fault}");
    assert_eq!(fault["ns"], WSRF_R, "{fault}");
    assert_eq!(fault["error_code"], "unknown-gid", "{fault}");
    assert!(
        fault["description"].as_str().unwrap_or("").contains(gid),
        "{fault}"
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(fault["timestamp"].as_str().unwrap_or("")).is_ok(),
        "{fault}"
    );
    let sender = if version == "1.1" { "Client" } else { "Sender" };
    assert!(
        fault["code"].as_str().unwrap_or("").contains(sender),
        "{fault}"
    );
}

#[tokio::test]
async fn node_soap_runs_the_broker_scenario_from_the_served_wsdl() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await;
    cts.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    gcs.setup_cts("cts-a", "node-a", &cts.url).await;
    gcs.register_job("job-7", "cts-a").await;
    let wsdl = format!("{}?wsdl", gcs.endpoint());
    let stdout = run_node_as(
        pki::BROKER,
        "soap_client.js",
        &["--wsdl", &wsdl, "--scenario", "broker", "--gid", "job-7"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_loaded_from(&v["loaded"], &gcs.url, &wsdl);
    assert_eq!(v["fault_declared"], true, "{v}");
    assert_eq!(v["find"], serde_json::json!(["cts-a"]), "{v}");
    assert_eq!(v["execute_wrapper"], "gca-exec", "{v}");
    assert_eq!(v["checkpoint"]["sequence"], 1, "{v}");
    assert_eq!(v["checkpoint12"]["sequence"], 2, "{v}");
    assert_eq!(v["checkpoint12"]["soap12_envelope"], true, "{v}");
    assert_eq!(v["sequences"], serde_json::json!([1, 2]), "{v}");
    assert_resource_unknown(&v["fault11"], "1.1", "no-such-gid");
    assert_resource_unknown(&v["fault12"], "1.2", "no-such-gid");
    // Both checkpoints reached the CTS; the faulted calls did not.
    assert_eq!(cts.calls(), 2);
    // What the GCS recorded is what node-soap was told.
    let recorded = gcs
        .call::<gca_protocol::ops::GetCheckpointsOp>(gca_protocol::messages::GetCheckpoints::of(
            "job-7",
        ))
        .await
        .unwrap();
    let ids: Vec<&str> = recorded.checkpoints.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            v["checkpoint"]["id"].as_str().unwrap(),
            v["checkpoint12"]["id"].as_str().unwrap()
        ]
    );
}

#[tokio::test]
async fn node_soap_loads_the_cts_wsdl_from_the_cts_alone_and_decodes_its_faults() {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-app", "app-level", APP_DRIVER, "").await;
    let wsdl = format!("{}{}?wsdl", cts.url, gca_protocol::ns::CTS_SERVICE_PATH);
    // The GCS is the only caller of a CTS's DoCheckpoint.
    let stdout = run_node_as(
        pki::GCS,
        "soap_client.js",
        &["--wsdl", &wsdl, "--scenario", "cts", "--gid", "no-such-gid"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_loaded_from(&v["loaded"], &cts.url, &wsdl);
    assert_resource_unknown(&v["fault11"], "1.1", "no-such-gid");
    assert_resource_unknown(&v["fault12"], "1.2", "no-such-gid");
}
