//! The published contract: WSDL and XSD served, SOAP 1.2, and a generic SOAP client (zeep)
//! running the broker's scenario from the served WSDL.

use gca_protocol::ops::GCS_OPERATIONS;
use integration_tests::*;

#[tokio::test]
async fn the_wsdl_and_schemas_are_served_with_this_servers_address() {
    let gcs = TestGcs::start().await;
    let wsdl = http()
        .get(format!("{}?wsdl", gcs.endpoint()))
        .send()
        .await
        .unwrap();
    assert_eq!(wsdl.status().as_u16(), 200);
    let text = wsdl.text().await.unwrap();
    assert!(
        text.contains(&format!("location=\"{}\"", gcs.endpoint())),
        "the service address is this server's"
    );
    assert!(text.contains(&format!(
        "schemaLocation=\"{}/wsrf/schemas/gca.xsd\"",
        gcs.url
    )));
    assert!(!text.contains("localhost:8080"));
    for op in GCS_OPERATIONS {
        assert!(
            text.contains(&format!("name=\"{op}\"")),
            "the WSDL lacks {op}"
        );
        assert!(
            text.contains(&format!("urn:gca:v1/GridCheckpointService/{op}Request")),
            "the WSDL lacks {op}'s action"
        );
    }
    let xsd = http()
        .get(format!("{}/wsrf/schemas/gca.xsd", gcs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(xsd.status().as_u16(), 200);
    let xsd = xsd.text().await.unwrap();
    assert!(
        xsd.contains(&format!("{}/wsrf/schemas/cts-descriptor.xsd", gcs.url)),
        "relative includes are made absolute"
    );
    assert!(
        xsd.contains(&format!(
            "schemaLocation=\"{}/wsrf/schemas/bf-2.xsd\"",
            gcs.url
        )),
        "the OASIS imports point at the copies served here"
    );
    // Every file is served, and every import of every file points at a file served here.
    for (name, _) in gca_protocol::schemas::FILES {
        let resp = http()
            .get(format!("{}/wsrf/schemas/{name}", gcs.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{name}");
        let text = resp.text().await.unwrap();
        for loc in schema_locations(&text) {
            let file = loc
                .strip_prefix(&format!("{}/wsrf/schemas/", gcs.url))
                .unwrap_or_else(|| panic!("{name} imports {loc}, not a file served here"));
            assert!(
                gca_protocol::schemas::file(file).is_some(),
                "{name} imports {loc}, which is not served"
            );
        }
    }
    assert_eq!(
        http()
            .get(format!("{}/wsrf/schemas/nope.xsd", gcs.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    assert_eq!(
        http()
            .get(gcs.endpoint())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        405
    );
}

/// The `schemaLocation` of every XSD import and include in a schema or WSDL document.
fn schema_locations(text: &str) -> Vec<String> {
    fn walk(el: &gca_protocol::xml::Element, out: &mut Vec<String>) {
        if el.ns.as_deref() == Some("http://www.w3.org/2001/XMLSchema")
            && matches!(el.name.as_str(), "import" | "include")
        {
            if let Some(loc) = el.attr("", "schemaLocation") {
                out.push(loc.to_string());
            }
        }
        el.elements().for_each(|c| walk(c, out));
    }
    let mut out = Vec::new();
    walk(&gca_protocol::xml::parse(text).unwrap(), &mut out);
    out
}

#[tokio::test]
async fn zeep_runs_the_broker_scenario_from_the_served_wsdl() {
    let gcs = TestGcs::start().await;
    let cts = FakeCts::start("cts-a").await;
    cts.set(|b| b.register_at_gcs = Some(gcs.endpoint()));
    gcs.setup_cts("cts-a", "node-a", &cts.url).await;
    gcs.register_job("job-7", "cts-a").await;
    let wsdl = format!("{}?wsdl", gcs.endpoint());
    let stdout = run_python("zeep_broker.py", &["--wsdl", &wsdl, "--gid", "job-7"]).await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_loaded_from(&v["loaded"], &gcs.url, &wsdl);
    assert_eq!(v["find"], serde_json::json!(["cts-a"]));
    assert_eq!(v["execute_wrapper"], "gca-exec");
    assert_eq!(v["checkpoint"]["sequence"], 1);
    assert_eq!(v["checkpoint12"]["sequence"], 2);
    assert_eq!(v["sequences"], serde_json::json!([1, 2]));
    assert_eq!(
        v["fault"],
        "{http://docs.oasis-open.org/wsrf/r-2}ResourceUnknownFault"
    );
    assert!(v["fault_message"].as_str().unwrap().contains("no-such-gid"));
    let validated: Vec<String> = serde_json::from_value(v["validated"].clone()).unwrap();
    for el in [
        "FindCTSResponse",
        "DoCheckpointResponse",
        "GetCheckpointsResponse",
        "ResourceUnknownFault",
    ] {
        assert!(
            validated.iter().any(|x| x == el),
            "{el} was not schema-validated: {validated:?}"
        );
    }
    assert_eq!(cts.calls(), 2);
}

/// The XSD and the Rust descriptor checker agree on every example: valid ones pass both,
/// invalid ones fail both (tests/python/check_schemas.py checks the XSD side and the WSDLs).
#[tokio::test]
async fn descriptor_xsd_and_rust_checker_agree_on_the_examples() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/examples");
    let mut checked = 0;
    for (sub, valid) in [("", true), ("invalid", false)] {
        for entry in std::fs::read_dir(std::path::Path::new(dir).join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("xml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let result = gca_protocol::descriptor::parse(&text);
            assert_eq!(result.is_ok(), valid, "{}: {result:?}", path.display());
            if let Err(e) = result {
                assert!(
                    e.line.is_some(),
                    "{}: the error names no line: {e}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} examples found");
    let stdout = run_python::<&str>("check_schemas.py", &[]).await;
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

/// The CTS serves its WSDL and every schema it imports too: zeep loads it with nothing but
/// its address and decodes the CTS's typed fault, over SOAP 1.1 and 1.2.
#[tokio::test]
async fn zeep_loads_the_cts_wsdl_from_the_cts_alone_and_decodes_its_faults() {
    use integration_tests::cts::{TestCts, APP_DRIVER};
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "cts-app", "app-level", APP_DRIVER, "").await;
    let wsdl = format!("{}{}?wsdl", cts.url, gca_protocol::ns::CTS_SERVICE_PATH);
    // As the GCS, the only caller of a CTS's DoCheckpoint.
    let stdout = run_python_as(
        pki::GCS,
        "zeep_cts.py",
        &["--wsdl", &wsdl, "--gid", "no-such-gid"],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_loaded_from(&v["loaded"], &cts.url, &wsdl);
    for version in ["soap11", "soap12"] {
        assert_eq!(
            v[version]["fault"], "{http://docs.oasis-open.org/wsrf/r-2}ResourceUnknownFault",
            "{v}"
        );
        assert!(
            v[version]["message"]
                .as_str()
                .unwrap()
                .contains("no-such-gid"),
            "{v}"
        );
    }
    assert_eq!(v["schema_errors"], serde_json::json!([]), "{v}");
}
