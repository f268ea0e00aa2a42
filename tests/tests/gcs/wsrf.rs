//! WSRF 1.2 on the GCS: endpoint references, WS-ResourceProperties on the GCS, job,
//! checkpoint and CTS instance resources, WS-ResourceLifetime on jobs, and the standard faults,
//! with raw SOAP envelopes; then zeep and lxml validation against the OASIS schemas.

use std::time::Duration;

use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::*;
use gca_protocol::ns;
use gca_protocol::ops::*;
use gca_protocol::wsrf::{self, XPATH_DIALECT};
use gca_protocol::xml::{self, Element};
use integration_tests::*;

const RP: &str = "http://docs.oasis-open.org/wsrf/rp-2";
const RL: &str = "http://docs.oasis-open.org/wsrf/rl-2";

/// A SOAP 1.1 (or 1.2) envelope with extra headers; `wsrf-rp`, `wsrf-rl`, `gca` and `xsi`
/// prefixes are declared on the envelope.
fn env(soap12: bool, action: &str, headers: &str, body: &str) -> String {
    let env_ns = if soap12 { ns::SOAP12 } else { ns::SOAP11 };
    format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"{env_ns}\" xmlns:wsa=\"{}\" xmlns:gca=\"urn:gca:v1\" xmlns:wsrf-rp=\"{RP}\" xmlns:wsrf-rl=\"{RL}\" xmlns:xsi=\"{}\">\n<s:Header><wsa:Action>{action}</wsa:Action><wsa:MessageID>urn:uuid:{}</wsa:MessageID>{headers}</s:Header>\n<s:Body>{body}</s:Body>\n</s:Envelope>",
        ns::WSA,
        ns::XSI,
        uuid::Uuid::new_v4()
    )
}

async fn post(url: &str, soap12: bool, action: &str, headers: &str, body: &str) -> (u16, String) {
    let ct = if soap12 {
        format!("application/soap+xml; charset=utf-8; action=\"{action}\"")
    } else {
        "text/xml; charset=utf-8".to_string()
    };
    post_raw(url, &ct, None, env(soap12, action, headers, body)).await
}

/// Posts a WS-RP or WS-RL request and returns the response payload or the fault.
async fn call(url: &str, action: &str, headers: &str, body: &str) -> Result<Element, Fault> {
    let (_, text) = post(url, false, action, headers, body).await;
    gca_protocol::soap::parse_response(&text)
}

fn rp_action(op: &str) -> String {
    wsrf::rp_request_action(op)
}

async fn get_property(url: &str, headers: &str, qname: &str) -> Result<Element, Fault> {
    call(
        url,
        &rp_action("GetResourceProperty"),
        headers,
        &format!("<wsrf-rp:GetResourceProperty>{qname}</wsrf-rp:GetResourceProperty>"),
    )
    .await
}

async fn query(url: &str, expr: &str, dialect: &str) -> Result<Element, Fault> {
    call(
        url,
        &rp_action("QueryResourceProperties"),
        "",
        &format!(
            "<wsrf-rp:QueryResourceProperties><wsrf-rp:QueryExpression Dialect=\"{dialect}\">{}</wsrf-rp:QueryExpression></wsrf-rp:QueryResourceProperties>",
            xml::escape(expr)
        ),
    )
    .await
}

fn texts(el: &Element, ns_uri: &str, name: &str) -> Vec<String> {
    el.children_named(ns_uri, name)
        .map(|c| c.text().trim().to_string())
        .collect()
}

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

fn job_url(gcs: &TestGcs, gid: &str) -> String {
    format!("{}/jobs/{}", gcs.endpoint(), wsrf::percent_encode(gid))
}

#[tokio::test]
async fn operations_returning_jobs_checkpoints_and_instances_carry_their_eprs() {
    let gcs = setup().await;
    let (status, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(
            &GetJobOp::request_action(),
            "<gca:GetJob><gca:GID>job-1</gca:GID></gca:GetJob>",
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let resp = gca_protocol::soap::parse_response(&text).unwrap();
    let job = resp.child(ns::GCA, "Job").expect("Job");
    let epr =
        wsrf::Epr::from_element(job.child(ns::GCA, "EndpointReference").expect("EPR")).unwrap();
    assert_eq!(epr.address, job_url(&gcs, "job-1"));
    let rid = &epr.reference_parameters[0];
    assert!(rid.is(ns::GCA, "ResourceID"), "{}", rid.to_xml());
    assert_eq!(
        (rid.text().as_str(), rid.attr("", "Kind")),
        ("job-1", Some("jobs"))
    );

    // The typed client ignores the additional element.
    let typed = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(typed.job.checkpoint_count, 2);

    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(
            &GetCheckpointsOp::request_action(),
            "<gca:GetCheckpoints><gca:GID>job-1</gca:GID></gca:GetCheckpoints>",
        ),
    )
    .await;
    let resp = gca_protocol::soap::parse_response(&text).unwrap();
    let addrs: Vec<String> = resp
        .children_named(ns::GCA, "Checkpoint")
        .map(|c| {
            wsrf::Epr::from_element(c.child(ns::GCA, "EndpointReference").unwrap())
                .unwrap()
                .address
        })
        .collect();
    assert_eq!(
        addrs,
        vec![
            format!("{}/checkpoints/ck-1", gcs.endpoint()),
            format!("{}/checkpoints/ck-2", gcs.endpoint())
        ]
    );

    let (_, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        None,
        envelope11(
            &ListCtsInstancesOp::request_action(),
            "<gca:ListCTSInstances/>",
        ),
    )
    .await;
    assert!(
        text.contains(&format!(
            "<wsa:Address>{}/instances/cts-a</wsa:Address>",
            gcs.endpoint()
        )),
        "{text}"
    );
}

#[tokio::test]
async fn resource_property_documents_of_the_gcs_job_checkpoint_and_instance() {
    let gcs = setup().await;
    let action = rp_action("GetResourcePropertyDocument");
    let body = "<wsrf-rp:GetResourcePropertyDocument/>";

    let resp = call(&gcs.endpoint(), &action, "", body).await.unwrap();
    assert!(resp.is(RP, "GetResourcePropertyDocumentResponse"));
    let doc = resp
        .child(ns::GCA, "GCSResourceProperties")
        .expect("GCS doc");
    assert_eq!(texts(doc, ns::GCA, "JobCount"), ["1"]);
    assert_eq!(texts(doc, ns::GCA, "CheckpointCount"), ["2"]);
    assert_eq!(texts(doc, ns::GCA, "CTSInstanceCount"), ["1"]);
    assert_eq!(texts(doc, RP, "QueryExpressionDialect"), [XPATH_DIALECT]);
    let entry = doc.child(ns::GCA, "CTSInstanceEntry").expect("instance");
    assert!(entry.child(ns::GCA, "EndpointReference").is_some());
    assert!(doc.child(ns::GCA, "CTSTypeEntry").is_some());
    assert!(doc.child(ns::GCA, "CheckpointerClass").is_some());

    let resp = call(&job_url(&gcs, "job-1"), &action, "", body)
        .await
        .unwrap();
    let doc = resp
        .child(ns::GCA, "JobResourceProperties")
        .expect("job doc");
    assert_eq!(texts(doc, ns::GCA, "State"), ["running"]);
    assert_eq!(texts(doc, ns::GCA, "LatestCheckpoint"), ["ck-2"]);
    assert_eq!(doc.children_named(ns::GCA, "Checkpoint").count(), 2);
    let tt = doc.child(RL, "TerminationTime").expect("TerminationTime");
    assert_eq!(tt.attr(ns::XSI, "nil"), Some("true"));
    assert!(doc.child(RL, "CurrentTime").is_some());

    let url = format!("{}/checkpoints/ck-2", gcs.endpoint());
    let resp = call(&url, &action, "", body).await.unwrap();
    let doc = resp.child(ns::GCA, "CheckpointResourceProperties").unwrap();
    assert_eq!(texts(doc, ns::GCA, "SequenceNumber"), ["2"]);

    let url = format!("{}/instances/cts-a", gcs.endpoint());
    let resp = call(&url, &action, "", body).await.unwrap();
    let doc = resp
        .child(ns::GCA, "CTSInstanceResourceProperties")
        .unwrap();
    assert_eq!(texts(doc, ns::GCA, "Resource"), ["node-a"]);
}

/// JobCount and CheckpointCount of the GCS's property document.
async fn gcs_counts(gcs: &TestGcs) -> (i64, i64) {
    let resp = call(
        &gcs.endpoint(),
        &rp_action("GetResourcePropertyDocument"),
        "",
        "<wsrf-rp:GetResourcePropertyDocument/>",
    )
    .await
    .unwrap();
    let doc = resp.child(ns::GCA, "GCSResourceProperties").unwrap();
    let n = |name| texts(doc, ns::GCA, name)[0].parse::<i64>().unwrap();
    (n("JobCount"), n("CheckpointCount"))
}

/// The GCS's JobCount and CheckpointCount are kept counts (issue 15: counting every record
/// cost 0.36 s a request at 10^7 records); they must equal the rows there are, through
/// concurrent registrations, job ends with retention queued, and rows deleted.
#[tokio::test]
async fn the_gcs_counts_are_kept_right_across_inserts_retention_and_deletes() {
    let gcs = setup().await;
    let counted = |gcs: &TestGcs| {
        let pool = gcs.pool.clone();
        async move {
            let t = gcs::db::counted_totals(&pool).await.unwrap();
            (t.jobs, t.checkpoints)
        }
    };
    assert_eq!(gcs_counts(&gcs).await, (1, 2));

    // Concurrent registrations over several connections (so several counter slots).
    let mut tasks = Vec::new();
    for j in 0..8 {
        let soap = gcs.soap_as(&pki::cts("cts-a"));
        tasks.push(tokio::spawn(async move {
            let gid = format!("job-c{j}");
            soap.call::<RegisterJobOp>(&RegisterJob {
                gid: gid.clone(),
                cts_instance: "cts-a".into(),
                local_id: None,
                recovery: false,
                from_checkpoint: None,
                state: None,
                retention: None,
            })
            .await
            .unwrap();
            let first = checkpoint_record(&format!("ck-c{j}-0"), &gid, "cts-a");
            for k in 0..5 {
                let checkpoint = if k == 0 {
                    first.clone()
                } else {
                    checkpoint_record(&format!("ck-c{j}-{k}"), &gid, "cts-a")
                };
                soap.call::<RegisterCheckpointOp>(&RegisterCheckpoint { checkpoint })
                    .await
                    .unwrap();
            }
            // The same record again is unchanged, and counts once.
            let again = soap
                .call::<RegisterCheckpointOp>(&RegisterCheckpoint { checkpoint: first })
                .await
                .unwrap();
            assert_eq!(again.outcome, Registration::Unchanged);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(gcs_counts(&gcs).await, (9, 42));
    assert_eq!(counted(&gcs).await, (9, 42));
    // A refused registration (a duplicate GID elsewhere) counts nothing.
    assert!(gcs
        .call::<RegisterCheckpointOp>(RegisterCheckpoint {
            checkpoint: checkpoint_record("ck-c0-0", "job-c1", "cts-a"),
        })
        .await
        .is_err());
    assert_eq!(gcs_counts(&gcs).await, (9, 42));

    // Jobs ending: their images are queued for deletion (retention); the records stay.
    for j in 0..4 {
        gcs.call::<JobFinishedOp>(JobFinished {
            gid: format!("job-c{j}"),
            cts_instance: "cts-a".into(),
            exit_status: Some(0),
            signal: None,
        })
        .await
        .unwrap();
    }
    let queued: i64 = sqlx::query_scalar("select count(*) from image_tasks")
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
    assert_eq!(queued, 20, "retention queued the ended jobs' images");
    assert_eq!(gcs_counts(&gcs).await, (9, 42));

    // Rows deleted (an operator purging ended jobs): the counts follow, in the same
    // transaction; a rolled-back delete changes nothing.
    let mut tx = gcs.pool.begin().await.unwrap();
    sqlx::query("delete from checkpoints where gid = 'job-c7'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(gcs_counts(&gcs).await, (9, 42));
    let mut tx = gcs.pool.begin().await.unwrap();
    sqlx::query("delete from image_tasks where checkpoint_id like 'ck-c0-%' or checkpoint_id like 'ck-c1-%'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("delete from checkpoints where gid in ('job-c0', 'job-c1')")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("delete from jobs where gid in ('job-c0', 'job-c1')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(gcs_counts(&gcs).await, (7, 32));
    assert_eq!(counted(&gcs).await, (7, 32));
    sqlx::query(
        "truncate image_tasks, checkpoint_locations, checkpoints, recovery_grants, job_keys, jobs",
    )
    .execute(&gcs.pool)
    .await
    .unwrap();
    assert_eq!(gcs_counts(&gcs).await, (0, 0));
    gcs.register_job("job-after", "cts-a").await;
    assert_eq!(gcs_counts(&gcs).await, (1, 0));
}

#[tokio::test]
async fn a_resource_is_found_by_reference_parameter_address_query_or_wsa_to() {
    let gcs = setup().await;
    let header =
        "<gca:ResourceID wsa:IsReferenceParameter=\"true\" Kind=\"jobs\">job-1</gca:ResourceID>";
    let by_header = get_property(&gcs.endpoint(), header, "gca:State")
        .await
        .unwrap();
    assert_eq!(texts(&by_header, ns::GCA, "State"), ["running"]);

    let by_query = get_property(&format!("{}?gid=job-1", gcs.endpoint()), "", "gca:GID")
        .await
        .unwrap();
    assert_eq!(texts(&by_query, ns::GCA, "GID"), ["job-1"]);

    let to = format!("<wsa:To>{}</wsa:To>", job_url(&gcs, "job-1"));
    let by_to = get_property(&gcs.endpoint(), &to, "gca:CheckpointCount")
        .await
        .unwrap();
    assert_eq!(texts(&by_to, ns::GCA, "CheckpointCount"), ["2"]);

    // WS-Addressing 2004/08 clients copy reference parameters as plain headers.
    let (status, text) = post_raw(
        &gcs.endpoint(),
        "text/xml",
        Some(&format!("\"{}\"", rp_action("GetResourceProperty"))),
        format!(
            "<s:Envelope xmlns:s=\"{}\" xmlns:a=\"{}\" xmlns:g=\"urn:gca:v1\" xmlns:rp=\"{RP}\"><s:Header><a:Action>{}</a:Action><g:ResourceID Kind=\"jobs\">job-1</g:ResourceID></s:Header><s:Body><rp:GetResourceProperty>g:CTSInstance</rp:GetResourceProperty></s:Body></s:Envelope>",
            ns::SOAP11,
            ns::WSA_2004,
            rp_action("GetResourceProperty")
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("<gca:CTSInstance>cts-a</gca:CTSInstance>"),
        "{text}"
    );

    // A GID that needs percent-encoding (":", "@", "+"), by its EPR address.
    gcs.register_job("odd:gid@A+x", "cts-a").await;
    let odd = get_property(&job_url(&gcs, "odd:gid@A+x"), "", "gca:GID")
        .await
        .unwrap();
    assert_eq!(texts(&odd, ns::GCA, "GID"), ["odd:gid@A+x"]);
    let to = format!("<wsa:To>{}</wsa:To>", job_url(&gcs, "odd:gid@A+x"));
    let odd = get_property(&gcs.endpoint(), &to, "gca:GID").await.unwrap();
    assert_eq!(texts(&odd, ns::GCA, "GID"), ["odd:gid@A+x"]);

    // SOAP 1.2 to the job's address.
    let (status, text) = post(
        &job_url(&gcs, "job-1"),
        true,
        &rp_action("GetResourceProperty"),
        "",
        "<wsrf-rp:GetResourceProperty>gca:LatestCheckpoint</wsrf-rp:GetResourceProperty>",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("http://www.w3.org/2003/05/soap-envelope"));
    assert!(
        text.contains("<gca:LatestCheckpoint>ck-2</gca:LatestCheckpoint>"),
        "{text}"
    );
    assert!(
        text.contains(
            "<wsa:Action>http://docs.oasis-open.org/wsrf/rpw-2/GetResourceProperty/GetResourcePropertyResponse</wsa:Action>"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn get_resource_property_is_lenient_on_qname_prefixes() {
    let gcs = setup().await;
    let url = job_url(&gcs, "job-1");
    for qname in [
        "gca:State",
        "<!-- declared here -->x:State",
        "undeclared:State",
        "{urn:gca:v1}State",
        "State",
    ] {
        let body = if qname.contains("x:State") {
            "<wsrf-rp:GetResourceProperty xmlns:x=\"urn:gca:v1\">x:State</wsrf-rp:GetResourceProperty>".to_string()
        } else {
            format!("<wsrf-rp:GetResourceProperty>{qname}</wsrf-rp:GetResourceProperty>")
        };
        let resp = call(&url, &rp_action("GetResourceProperty"), "", &body)
            .await
            .unwrap_or_else(|f| panic!("{qname}: {f}"));
        assert_eq!(texts(&resp, ns::GCA, "State"), ["running"], "{qname}");
    }
    // Every instance of a repeated property, in document order.
    let resp = get_property(&url, "", "gca:Checkpoint").await.unwrap();
    let ids: Vec<String> = resp
        .children_named(ns::GCA, "Checkpoint")
        .map(|c| c.opt_text(ns::GCA, "CheckpointID").unwrap())
        .collect();
    assert_eq!(ids, ["ck-1", "ck-2"]);
    // A declared property with no value: an empty answer.
    let resp = get_property(&url, "", "gca:ExitStatus").await.unwrap();
    assert_eq!(resp.elements().count(), 0);
}

#[tokio::test]
async fn get_multiple_resource_properties_and_xpath_queries() {
    let gcs = setup().await;
    let url = job_url(&gcs, "job-1");
    let resp = call(
        &url,
        &rp_action("GetMultipleResourceProperties"),
        "",
        "<wsrf-rp:GetMultipleResourceProperties><wsrf-rp:ResourceProperty>gca:State</wsrf-rp:ResourceProperty><wsrf-rp:ResourceProperty>wsrf-rl:TerminationTime</wsrf-rp:ResourceProperty></wsrf-rp:GetMultipleResourceProperties>",
    )
    .await
    .unwrap();
    assert!(resp.is(RP, "GetMultipleResourcePropertiesResponse"));
    let names: Vec<String> = resp.elements().map(|e| e.qname()).collect();
    assert_eq!(
        names,
        [
            format!("{{{}}}State", ns::GCA),
            format!("{{{RL}}}TerminationTime")
        ]
    );

    let resp = query(
        &url,
        "/gca:JobResourceProperties/gca:Checkpoint[gca:SequenceNumber = 2]",
        XPATH_DIALECT,
    )
    .await
    .unwrap();
    assert!(resp.is(RP, "QueryResourcePropertiesResponse"));
    let found: Vec<&Element> = resp.elements().collect();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].opt_text(ns::GCA, "CheckpointID").as_deref(),
        Some("ck-2")
    );

    // Results that are not elements come in gca:QueryResult (rp-2 wants an element).
    for (expr, kind, value) in [
        ("count(//gca:Checkpoint)", "number", Some("2")),
        ("boolean(//gca:Checkpoint)", "boolean", Some("true")),
        ("string(/*/gca:GID)", "string", Some("job-1")),
        ("/*/gca:GID/text()", "text", Some("job-1")),
        ("//gca:Checkpoint[gca:SequenceNumber=99]", "empty", None),
    ] {
        let resp = query(&url, expr, XPATH_DIALECT).await.unwrap();
        let results: Vec<&Element> = resp.elements().collect();
        assert_eq!(results.len(), 1, "{expr}");
        assert!(results[0].is(ns::GCA, "QueryResult"), "{expr}");
        assert_eq!(results[0].attr("", "Type"), Some(kind), "{expr}");
        match value {
            Some(v) => assert_eq!(results[0].text().trim(), v, "{expr}"),
            None => assert!(results[0].children.is_empty(), "{expr}"),
        }
    }

    let resp = query(
        &gcs.endpoint(),
        "/gca:GCSResourceProperties/gca:CTSInstanceEntry[gca:Resource='node-a']/gca:Name",
        XPATH_DIALECT,
    )
    .await
    .unwrap();
    assert_eq!(texts(&resp, ns::GCA, "Name"), ["cts-a"]);
}

#[tokio::test]
async fn resource_property_faults_are_the_standard_ones() {
    let gcs = setup().await;
    let url = job_url(&gcs, "job-1");

    let f = get_property(&job_url(&gcs, "no-such-job"), "", "gca:State")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");
    let header = "<gca:ResourceID wsa:IsReferenceParameter=\"true\" Kind=\"checkpoints\">nope</gca:ResourceID>";
    let f = get_property(&gcs.endpoint(), header, "gca:GID")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");
    let f = get_property(&format!("{}/widgets/x", gcs.endpoint()), "", "gca:GID")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");

    for bad in ["gca:NoSuchProperty", "gca:JobCount", "", "a:b:c"] {
        let f = get_property(&url, "", bad).await.unwrap_err();
        assert_eq!(
            f.kind,
            FaultKind::InvalidResourcePropertyQName,
            "{bad}: {f}"
        );
    }
    let f = call(
        &url,
        &rp_action("GetMultipleResourceProperties"),
        "",
        "<wsrf-rp:GetMultipleResourceProperties><wsrf-rp:ResourceProperty>gca:State</wsrf-rp:ResourceProperty><wsrf-rp:ResourceProperty>gca:Bogus</wsrf-rp:ResourceProperty></wsrf-rp:GetMultipleResourceProperties>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidResourcePropertyQName);

    let f = query(&url, "//gca:Checkpoint[", XPATH_DIALECT)
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::InvalidQueryExpression, "{f}");
    let f = query(&url, "//nope:Checkpoint", XPATH_DIALECT)
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::QueryEvaluationError, "{f}");
    let f = query(&url, "no-such-function(1)", XPATH_DIALECT)
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::QueryEvaluationError, "{f}");
    let f = query(&url, "//gca:State", "urn:example:sql")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::UnknownQueryExpressionDialect, "{f}");

    // The action must match the body element.
    let f = call(
        &url,
        &rp_action("GetResourcePropertyDocument"),
        "",
        "<wsrf-rp:GetResourceProperty>gca:State</wsrf-rp:GetResourceProperty>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::ActionNotSupported);
    // Unsupported WS-RP operations are named.
    let f = call(
        &url,
        &rp_action("SetResourceProperties"),
        "",
        "<wsrf-rp:SetResourceProperties><wsrf-rp:Delete ResourceProperty=\"gca:State\"/></wsrf-rp:SetResourceProperties>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::ActionNotSupported);
    assert!(
        f.message.contains("QueryResourceProperties"),
        "{}",
        f.message
    );

    // The detail is the rp-2 fault element, in SOAP 1.2 too (HTTP 400 for Sender faults).
    let (status, text) = post(
        &url,
        true,
        &rp_action("GetResourceProperty"),
        "",
        "<wsrf-rp:GetResourceProperty>gca:Nope</wsrf-rp:GetResourceProperty>",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        text.contains("<wsrf-rp:InvalidResourcePropertyQNameFault"),
        "{text}"
    );
    assert!(text.contains("<env:Value>env:Sender</env:Value>"), "{text}");
}

async fn set_termination(url: &str, body: &str) -> Result<Element, Fault> {
    call(
        url,
        wsrf::RL_SET_TERMINATION_TIME_REQUEST,
        "",
        &format!("<wsrf-rl:SetTerminationTime>{body}</wsrf-rl:SetTerminationTime>"),
    )
    .await
}

async fn destroy(url: &str) -> Result<Element, Fault> {
    call(url, wsrf::RL_DESTROY_REQUEST, "", "<wsrf-rl:Destroy/>").await
}

#[tokio::test]
async fn set_termination_time_schedules_and_clears_a_jobs_termination() {
    let gcs = setup().await;
    let url = job_url(&gcs, "job-1");
    let before = chrono::Utc::now();
    let resp = set_termination(
        &url,
        "<wsrf-rl:RequestedLifetimeDuration>PT2H</wsrf-rl:RequestedLifetimeDuration>",
    )
    .await
    .unwrap();
    assert!(resp.is(RL, "SetTerminationTimeResponse"));
    let new_time: chrono::DateTime<chrono::Utc> = resp
        .opt_text(RL, "NewTerminationTime")
        .unwrap()
        .parse()
        .unwrap();
    assert!(new_time > before + chrono::Duration::minutes(119));
    assert!(resp.child(RL, "CurrentTime").is_some());
    let tt = get_property(&url, "", "wsrf-rl:TerminationTime")
        .await
        .unwrap();
    let stored: chrono::DateTime<chrono::Utc> =
        texts(&tt, RL, "TerminationTime")[0].parse().unwrap();
    assert_eq!(stored, new_time);

    let at = "2999-01-01T00:00:00Z";
    let resp = set_termination(
        &url,
        &format!("<wsrf-rl:RequestedTerminationTime>{at}</wsrf-rl:RequestedTerminationTime>"),
    )
    .await
    .unwrap();
    assert!(resp
        .opt_text(RL, "NewTerminationTime")
        .unwrap()
        .starts_with("2999-01-01T00:00:00"));

    let resp = set_termination(&url, "<wsrf-rl:RequestedTerminationTime xsi:nil=\"true\"/>")
        .await
        .unwrap();
    let n = resp.child(RL, "NewTerminationTime").unwrap();
    assert_eq!(n.attr(ns::XSI, "nil"), Some("true"));
    let tt = get_property(&url, "", "wsrf-rl:TerminationTime")
        .await
        .unwrap();
    assert_eq!(
        tt.child(RL, "TerminationTime")
            .unwrap()
            .attr(ns::XSI, "nil"),
        Some("true")
    );

    // Faults: a duration with years, a resource without a lifetime, an unknown job.
    let f = set_termination(
        &url,
        "<wsrf-rl:RequestedLifetimeDuration>P1Y</wsrf-rl:RequestedLifetimeDuration>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::UnableToSetTerminationTime, "{f}");
    let f = set_termination(
        &format!("{}/checkpoints/ck-1", gcs.endpoint()),
        "<wsrf-rl:RequestedLifetimeDuration>PT1H</wsrf-rl:RequestedLifetimeDuration>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::UnableToSetTerminationTime, "{f}");
    let f = set_termination(
        &job_url(&gcs, "ghost"),
        "<wsrf-rl:RequestedLifetimeDuration>PT1H</wsrf-rl:RequestedLifetimeDuration>",
    )
    .await
    .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");
}

#[tokio::test]
async fn destroy_finishes_the_job_and_ends_its_resource() {
    let gcs = setup().await;
    let url = job_url(&gcs, "job-1");
    let resp = destroy(&url).await.unwrap();
    assert!(resp.is(RL, "DestroyResponse"));
    let f = get_property(&url, "", "gca:State").await.unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");
    assert!(f.message.contains("destroyed"), "{}", f.message);
    let f = destroy(&url).await.unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown);
    // The bookkeeping keeps the finished job.
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(job.state, JobState::Finished);

    // Only jobs can be destroyed.
    let f = destroy(&gcs.endpoint()).await.unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceNotDestroyed, "{f}");
    let f = destroy(&format!("{}/instances/cts-a", gcs.endpoint()))
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceNotDestroyed, "{f}");
}

#[tokio::test]
async fn a_destroyed_job_cannot_be_made_running_again_by_a_recovery() {
    let gcs = setup().await;
    gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
        instance: instance("cts-b", "criu", "node-b", "http://127.0.0.1:2/cts"),
    })
    .await
    .unwrap();
    // A broker's grant for cts-b, given before the job is destroyed, does not survive it.
    gcs.authorize_recovery("job-1", "cts-b").await;
    destroy(&job_url(&gcs, "job-1")).await.unwrap();
    for (cts, state) in [
        ("cts-a", None),
        ("cts-a", Some(JobState::Recovering)),
        ("cts-b", None),
        ("cts-b", Some(JobState::Recovering)),
    ] {
        let f = gcs
            .call::<RegisterJobOp>(RegisterJob {
                gid: "job-1".into(),
                cts_instance: cts.into(),
                local_id: Some("777".into()),
                recovery: true,
                from_checkpoint: Some("ck-2".into()),
                state,
                retention: None,
            })
            .await
            .unwrap_err();
        assert_eq!(f.kind, FaultKind::ResourceUnknown, "{cts} {state:?}: {f}");
        assert_eq!(f.code.as_deref(), Some("job-destroyed"), "{cts}: {f}");
    }
    // Nor a plain registration under the same GID.
    let f = gcs
        .call::<RegisterJobOp>(RegisterJob {
            gid: "job-1".into(),
            cts_instance: "cts-a".into(),
            local_id: Some("4242".into()),
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::Conflict, "{f}");
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.cts_instance, "cts-a");
    assert_eq!(job.recoveries, 0);
    let f = get_property(&job_url(&gcs, "job-1"), "", "gca:State")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");
}

#[tokio::test]
async fn a_passed_termination_time_destroys_the_job() {
    let gcs = setup().await;
    gcs.register_job("job-2", "cts-a").await;
    gcs.register_job("job-3", "cts-a").await;

    // A time in the past destroys at once.
    set_termination(
        &job_url(&gcs, "job-1"),
        "<wsrf-rl:RequestedTerminationTime>2000-01-01T00:00:00Z</wsrf-rl:RequestedTerminationTime>",
    )
    .await
    .unwrap();
    let f = get_property(&job_url(&gcs, "job-1"), "", "gca:State")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown);

    // A short lifetime: the next request finds it gone (lazy check) ...
    for gid in ["job-2", "job-3"] {
        set_termination(
            &job_url(&gcs, gid),
            "<wsrf-rl:RequestedLifetimeDuration>PT0.5S</wsrf-rl:RequestedLifetimeDuration>",
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let f = get_property(&job_url(&gcs, "job-2"), "", "gca:State")
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::ResourceUnknown, "{f}");

    // ... and the background sweep finishes it without any request.
    let deadline = tokio::time::Instant::now() + gcs::wsrf::SWEEP_INTERVAL * 3;
    loop {
        let state: String = sqlx::query_scalar("select state from jobs where gid = 'job-3'")
            .fetch_one(&gcs.pool)
            .await
            .unwrap();
        if state == "finished" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "job-3 not swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_gcs_serves_a_service_group_view_of_its_cts_instances() {
    let gcs = setup().await;
    const SG: &str = "http://docs.oasis-open.org/wsrf/sg-2";
    let resp = get_property(&gcs.endpoint(), "", "wsrf-sg:Entry")
        .await
        .unwrap();
    let entries: Vec<&Element> = resp.children_named(SG, "Entry").collect();
    assert_eq!(entries.len(), 1);
    let e = entries[0];
    let entry_epr = wsrf::Epr::from_element(e.child(SG, "ServiceGroupEntryEPR").unwrap()).unwrap();
    assert_eq!(
        entry_epr.address,
        format!("{}/instances/cts-a", gcs.endpoint())
    );
    let member = wsrf::Epr::from_element(e.child(SG, "MemberServiceEPR").unwrap()).unwrap();
    assert_eq!(member.address, UNREACHABLE_CTS);
    let content = e.child(SG, "Content").unwrap();
    let inst = content.child(ns::GCA, "CTSInstanceEntry").unwrap();
    assert_eq!(
        inst.opt_text(ns::GCA, "Resource").as_deref(),
        Some("node-a")
    );

    // The member addresses as WSRF::Lite-style clients read them.
    let resp = query(
        &gcs.endpoint(),
        "//wsrf-sg:Entry/wsrf-sg:MemberServiceEPR/wsa:Address",
        XPATH_DIALECT,
    )
    .await
    .unwrap();
    assert_eq!(texts(&resp, ns::WSA, "Address"), [UNREACHABLE_CTS]);
    let rule = get_property(&gcs.endpoint(), "", "wsrf-sg:MembershipContentRule")
        .await
        .unwrap();
    assert_eq!(
        rule.child(SG, "MembershipContentRule")
            .unwrap()
            .attr("", "ContentElements"),
        Some("gca:CTSInstanceEntry")
    );
}

#[tokio::test]
async fn zeep_and_the_oasis_schemas_accept_every_wsrf_response_and_fault() {
    let gcs = setup().await;
    let endpoint = gcs.endpoint();
    let stdout = run_python("wsrf_check.py", &["--url", &endpoint, "--gid", "job-1"]).await;
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON output");
    assert_eq!(v["zeep_job_state"], "running", "{v}");
    assert_eq!(v["zeep_job_count"], 1, "{v}");
    assert_eq!(v["zeep_query_ids"], serde_json::json!(["ck-2"]), "{v}");
    assert_eq!(v["schema_errors"], serde_json::json!([]), "{v}");
    let validated: Vec<String> = v["validated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    for name in [
        "GetResourcePropertyDocumentResponse",
        "GetResourcePropertyResponse",
        "GetMultipleResourcePropertiesResponse",
        "QueryResourcePropertiesResponse",
        "SetTerminationTimeResponse",
        "DestroyResponse",
        "GetJobResponse",
        "ResourceUnknownFault",
        "InvalidResourcePropertyQNameFault",
        "InvalidQueryExpressionFault",
        "QueryEvaluationErrorFault",
        "UnknownQueryExpressionDialectFault",
        "UnableToSetTerminationTimeFault",
        "ResourceNotDestroyedFault",
    ] {
        assert!(
            validated.iter().any(|v| v == name),
            "{name} not validated: {v}"
        );
    }
}
