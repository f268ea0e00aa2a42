//! The authorization matrix of the GCS (ARCHITECTURE.md, "Authorization"), checked end to end:
//! every operation, over SOAP and over JSON, as every role, as a second identity of a role
//! (a CTS speaking for another, a broker managing another's subscription), with no
//! certificate, with a certificate of another CA and with an expired one. What the matrix
//! allows must not be refused for want of rights; everything else must be refused (SOAP
//! `gca:AccessDeniedFault`, JSON 401 without a certificate and 403 with the wrong one, a
//! failed handshake for a certificate the site CA does not vouch for), and a refused request
//! must have written nothing: the whole database is compared before and after.

use gca_protocol::fault::FaultKind;
use gca_protocol::messages::*;
use gca_protocol::ops::*;
use gca_protocol::soap;
use integration_tests::*;

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Admin,
    Broker,
    /// A broker that did not create the subscriptions of the fixture.
    OtherBroker,
    /// `cts:cts-a`, the CTS the CTS-facing requests below speak for.
    Cts,
    /// `cts:cts-b`, a CTS speaking for cts-a.
    OtherCts,
    Gcs,
    User,
    Anonymous,
    Untrusted,
    Expired,
}

const EVERYONE: [Who; 10] = [
    Who::Admin,
    Who::Broker,
    Who::OtherBroker,
    Who::Cts,
    Who::OtherCts,
    Who::Gcs,
    Who::User,
    Who::Anonymous,
    Who::Untrusted,
    Who::Expired,
];

impl Who {
    fn client(self) -> reqwest::Client {
        let p = pki::pki();
        let id = match self {
            Who::Admin => pki::ADMIN,
            Who::Broker => pki::BROKER,
            Who::OtherBroker => "broker:other-broker",
            Who::Cts => "cts:cts-a",
            Who::OtherCts => "cts:cts-b",
            Who::Gcs => pki::GCS,
            Who::User => "user:alice",
            Who::Anonymous => return p.anonymous(),
            Who::Untrusted => {
                let f = p.untrusted_cert(pki::ADMIN);
                return pki::client_with(gca_protocol::transport::ClientTls {
                    ca: Some(p.ca()),
                    cert: Some(f.cert),
                    key: Some(f.key),
                });
            }
            Who::Expired => {
                let f = p.expired_cert(pki::ADMIN);
                return pki::client_with(gca_protocol::transport::ClientTls {
                    ca: Some(p.ca()),
                    cert: Some(f.cert),
                    key: Some(f.key),
                });
            }
        };
        p.client(id)
    }
}

use Who::*;

/// One operation: how to call it over SOAP (the body element, at a path under the service
/// address) and over JSON, and who may.
struct Case {
    name: &'static str,
    allowed: &'static [Who],
    soap: Option<(&'static str, String)>,
    json: Option<(&'static str, String, Option<serde_json::Value>)>,
}

const BROKERS: &[Who] = &[Admin, Broker, OtherBroker];

fn cases() -> Vec<Case> {
    let ns = "xmlns:gca=\"urn:gca:v1\"";
    let record = |id: &str, gid: &str| {
        let r = checkpoint_record(id, gid, "cts-a");
        r.to_element("Checkpoint").to_xml()
    };
    let gca = |body: &str| -> Option<(&'static str, String)> { Some(("", body.to_string())) };
    vec![
        Case {
            name: "DoCheckpoint",
            allowed: BROKERS,
            soap: gca(&format!("<gca:DoCheckpoint {ns}><gca:GID>job-1</gca:GID></gca:DoCheckpoint>")),
            json: Some(("POST", "/api/v1/jobs/job-1/checkpoints".into(), Some(serde_json::json!({})))),
        },
        Case {
            name: "FindCTS",
            allowed: &[Admin, Broker, OtherBroker, User],
            soap: gca(&format!("<gca:FindCTS {ns}/>")),
            json: Some(("POST", "/api/v1/find-cts".into(), Some(serde_json::json!({})))),
        },
        Case {
            name: "GetCheckpoints",
            allowed: &[Admin, Broker, OtherBroker, Cts, OtherCts],
            soap: gca(&format!("<gca:GetCheckpoints {ns}><gca:GID>job-1</gca:GID></gca:GetCheckpoints>")),
            json: Some(("GET", "/api/v1/jobs/job-1/checkpoints".into(), None)),
        },
        Case {
            name: "GetRecoveryInfo",
            allowed: &[Admin, Broker, OtherBroker, Cts, OtherCts],
            soap: gca(&format!("<gca:GetRecoveryInfo {ns}><gca:GID>job-1</gca:GID></gca:GetRecoveryInfo>")),
            json: Some(("GET", "/api/v1/jobs/job-1/recovery".into(), None)),
        },
        Case {
            name: "AuthorizeRecovery",
            allowed: BROKERS,
            soap: gca(&format!("<gca:AuthorizeRecovery {ns}><gca:GID>job-1</gca:GID><gca:CTSInstance>cts-b</gca:CTSInstance></gca:AuthorizeRecovery>")),
            json: Some((
                "POST",
                "/api/v1/jobs/job-1/recovery-grants".into(),
                Some(serde_json::json!({"cts_instance": "cts-b"})),
            )),
        },
        Case {
            name: "GetJob",
            allowed: &[Admin, Broker, OtherBroker, Cts, OtherCts],
            soap: gca(&format!("<gca:GetJob {ns}><gca:GID>job-1</gca:GID></gca:GetJob>")),
            json: Some(("GET", "/api/v1/jobs/job-1".into(), None)),
        },
        Case {
            name: "ListJobs",
            allowed: BROKERS,
            soap: gca(&format!("<gca:ListJobs {ns}/>")),
            json: Some(("GET", "/api/v1/jobs".into(), None)),
        },
        Case {
            name: "SetRetention",
            allowed: &[Admin],
            soap: gca(&format!("<gca:SetRetention {ns}><gca:GID>job-1</gca:GID><gca:Retention><gca:Keep>all</gca:Keep><gca:KeepIn>/tmp/kept</gca:KeepIn></gca:Retention></gca:SetRetention>")),
            json: Some((
                "PUT",
                "/api/v1/jobs/job-1/retention".into(),
                Some(serde_json::json!({"keep": "all", "keep_in": "/tmp/kept"})),
            )),
        },
        Case {
            name: "RegisterCheckpointerClass",
            allowed: &[Admin],
            soap: gca(&format!("<gca:RegisterCheckpointerClass {ns}><gca:CheckpointerClass><gca:Name>new-class</gca:Name></gca:CheckpointerClass></gca:RegisterCheckpointerClass>")),
            json: Some((
                "POST",
                "/api/v1/classes".into(),
                Some(serde_json::json!({"class": {"name": "new-class-json", "properties": []}})),
            )),
        },
        Case {
            name: "RegisterCTSDescriptor",
            allowed: &[Admin],
            soap: gca(&format!(
                "<gca:RegisterCTSDescriptor {ns}>{}</gca:RegisterCTSDescriptor>",
                CRIU_DESCRIPTOR
                    .replace("<Name>criu</Name>", "<Name>criu-soap</Name>")
                    .lines()
                    .skip_while(|l| !l.starts_with("<CTSDescriptor"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
            json: Some((
                "POST",
                "/api/v1/cts-types".into(),
                Some(serde_json::json!({
                    "descriptor_xml": CRIU_DESCRIPTOR.replace("<Name>criu</Name>", "<Name>criu-new</Name>")
                })),
            )),
        },
        Case {
            name: "UnregisterCTS",
            allowed: &[Admin],
            soap: gca(&format!("<gca:UnregisterCTS {ns}><gca:Instance>cts-spare</gca:Instance></gca:UnregisterCTS>")),
            json: Some(("DELETE", "/api/v1/cts-instances/cts-spare".into(), None)),
        },
        Case {
            name: "ListCheckpointerClasses",
            allowed: &[Admin, Broker, OtherBroker, User],
            soap: gca(&format!("<gca:ListCheckpointerClasses {ns}/>")),
            json: Some(("GET", "/api/v1/classes".into(), None)),
        },
        Case {
            name: "ListCTSTypes",
            allowed: &[Admin, Broker, OtherBroker, User],
            soap: gca(&format!("<gca:ListCTSTypes {ns}/>")),
            json: Some(("GET", "/api/v1/cts-types".into(), None)),
        },
        Case {
            name: "ListCTSInstances",
            allowed: BROKERS,
            soap: gca(&format!("<gca:ListCTSInstances {ns}/>")),
            json: Some(("GET", "/api/v1/cts-instances".into(), None)),
        },
        Case {
            name: "RegisterCTSInstance",
            allowed: &[Cts],
            soap: gca(&format!(
                "<gca:RegisterCTSInstance {ns}>{}</gca:RegisterCTSInstance>",
                instance("cts-a", "criu", "node-evil", UNREACHABLE_CTS)
                    .to_element("CTSInstance")
                    .to_xml()
            )),
            json: Some((
                "POST",
                "/api/v1/cts-instances".into(),
                Some(serde_json::json!({
                    "instance": instance("cts-a", "criu", "node-json", UNREACHABLE_CTS)
                })),
            )),
        },
        Case {
            name: "RegisterJob",
            allowed: &[Cts],
            soap: gca(&format!("<gca:RegisterJob {ns}><gca:GID>job-new</gca:GID><gca:CTSInstance>cts-a</gca:CTSInstance><gca:LocalID>1</gca:LocalID><gca:Recovery>false</gca:Recovery></gca:RegisterJob>")),
            json: Some((
                "POST",
                "/api/v1/jobs".into(),
                Some(serde_json::json!({"gid": "job-new-json", "cts_instance": "cts-a", "local_id": "1", "recovery": false})),
            )),
        },
        Case {
            name: "RegisterCheckpoint",
            allowed: &[Cts],
            soap: gca(&format!(
                "<gca:RegisterCheckpoint {ns}>{}</gca:RegisterCheckpoint>",
                record("ck-soap", "job-1")
            )),
            json: Some((
                "POST",
                "/api/v1/checkpoints".into(),
                Some(serde_json::json!({"checkpoint": checkpoint_record("ck-json", "job-1", "cts-a")})),
            )),
        },
        Case {
            name: "JobFinished",
            allowed: &[Cts],
            soap: gca(&format!("<gca:JobFinished {ns}><gca:GID>job-fin</gca:GID><gca:CTSInstance>cts-a</gca:CTSInstance><gca:ExitStatus>0</gca:ExitStatus></gca:JobFinished>")),
            json: Some((
                "POST",
                "/api/v1/jobs/job-fin-json/finished".into(),
                Some(serde_json::json!({"cts_instance": "cts-a", "exit_status": 0})),
            )),
        },
        Case {
            name: "AbandonRecovery",
            allowed: &[Cts],
            soap: gca(&format!("<gca:AbandonRecovery {ns}><gca:GID>job-1</gca:GID><gca:CTSInstance>cts-a</gca:CTSInstance></gca:AbandonRecovery>")),
            json: Some((
                "POST",
                "/api/v1/jobs/job-1/abandon-recovery".into(),
                Some(serde_json::json!({"cts_instance": "cts-a"})),
            )),
        },
        Case {
            name: "GetJobKey",
            allowed: &[Cts],
            soap: gca(&format!("<gca:GetJobKey {ns}><gca:GID>job-1</gca:GID></gca:GetJobKey>")),
            json: Some(("GET", "/api/v1/jobs/job-1/key".into(), None)),
        },
        Case {
            name: "SetImageLocation",
            allowed: &[Cts],
            soap: gca(&format!("<gca:SetImageLocation {ns}><gca:GID>job-1</gca:GID><gca:CheckpointID>ck-1</gca:CheckpointID><gca:Location><gca:Kind>object-store</gca:Kind><gca:Name>s3://gca/site</gca:Name><gca:State>stored</gca:State></gca:Location></gca:SetImageLocation>")),
            json: Some((
                "POST",
                "/api/v1/checkpoints/ck-1/locations".into(),
                Some(serde_json::json!({"gid": "job-1", "location": {"kind": "object-store", "name": "s3://gca/site", "state": "stored"}})),
            )),
        },
        Case {
            name: "GetResourcePropertyDocument",
            allowed: BROKERS,
            soap: Some((
                "",
                "<wsrf-rp:GetResourcePropertyDocument xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\"/>".into(),
            )),
            json: None,
        },
        Case {
            name: "GetResourceProperty (job)",
            allowed: BROKERS,
            soap: Some((
                "/jobs/job-1",
                "<wsrf-rp:GetResourceProperty xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\" xmlns:gca=\"urn:gca:v1\">gca:State</wsrf-rp:GetResourceProperty>".into(),
            )),
            json: None,
        },
        Case {
            name: "GetCurrentMessage",
            allowed: BROKERS,
            soap: Some((
                "",
                "<wsnt:GetCurrentMessage xmlns:wsnt=\"http://docs.oasis-open.org/wsn/b-2\" xmlns:gca=\"urn:gca:v1\"><wsnt:Topic Dialect=\"http://docs.oasis-open.org/wsn/t-1/TopicExpression/Simple\">gca:CheckpointTaken</wsnt:Topic></wsnt:GetCurrentMessage>".into(),
            )),
            json: None,
        },
        Case {
            name: "SetTerminationTime",
            allowed: &[Admin],
            soap: Some((
                "/jobs/job-1",
                "<wsrf-rl:SetTerminationTime xmlns:wsrf-rl=\"http://docs.oasis-open.org/wsrf/rl-2\"><wsrf-rl:RequestedLifetimeDuration>P30D</wsrf-rl:RequestedLifetimeDuration></wsrf-rl:SetTerminationTime>".into(),
            )),
            json: None,
        },
        Case {
            name: "Destroy",
            allowed: &[Admin],
            soap: Some((
                "/jobs/job-destroy",
                "<wsrf-rl:Destroy xmlns:wsrf-rl=\"http://docs.oasis-open.org/wsrf/rl-2\"/>".into(),
            )),
            json: None,
        },
        Case {
            name: "Subscribe",
            allowed: BROKERS,
            soap: Some((
                "",
                "<wsnt:Subscribe xmlns:wsnt=\"http://docs.oasis-open.org/wsn/b-2\" xmlns:wsa=\"http://www.w3.org/2005/08/addressing\"><wsnt:ConsumerReference><wsa:Address>http://127.0.0.1:9/consumer</wsa:Address></wsnt:ConsumerReference></wsnt:Subscribe>".into(),
            )),
            json: Some((
                "POST",
                "/api/v1/subscriptions".into(),
                Some(serde_json::json!({"consumer": "http://127.0.0.1:9/consumer"})),
            )),
        },
        Case {
            name: "ListSubscriptions",
            allowed: BROKERS,
            soap: None,
            json: Some(("GET", "/api/v1/subscriptions".into(), None)),
        },
    ]
}

/// Every row of every table, as JSON text (what "wrote nothing" compares).
async fn snapshot(gcs: &TestGcs) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables
         where table_schema = 'public' and table_name <> '_sqlx_migrations' order by 1",
    )
    .fetch_all(&gcs.pool)
    .await
    .unwrap();
    let mut out = String::new();
    for t in tables {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "select json_agg(x order by x::text)::text from {t} x"
        ))
        .fetch_one(&gcs.pool)
        .await
        .unwrap();
        out.push_str(&format!("{t}: {}\n", rows.unwrap_or_default()));
    }
    out
}

/// What came back: refused for want of rights, a handshake failure, or anything else.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Denied { unauthenticated: bool },
    Handshake,
    Other(String),
}

async fn soap_call(gcs: &TestGcs, who: Who, path: &str, body: &str) -> Answer {
    let url = format!("{}{path}", gcs.endpoint());
    let env = format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>{body}</s:Body></s:Envelope>"
    );
    let resp = match who
        .client()
        .post(&url)
        .header("content-type", "text/xml; charset=utf-8")
        .body(env)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return Answer::Handshake,
    };
    let text = resp.text().await.unwrap();
    match soap::parse_response(&text) {
        Err(f) if f.kind == FaultKind::AccessDenied => Answer::Denied {
            unauthenticated: f.code.as_deref() == Some("unauthenticated"),
        },
        Err(f) => Answer::Other(format!("{:?}: {}", f.kind, f.message)),
        Ok(_) => Answer::Other("ok".into()),
    }
}

async fn json_call(
    gcs: &TestGcs,
    who: Who,
    method: &str,
    path: &str,
    body: &Option<serde_json::Value>,
) -> Answer {
    let url = format!("{}{path}", gcs.url);
    let client = who.client();
    let mut req = client.request(method.parse().unwrap(), &url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(_) => return Answer::Handshake,
    };
    match resp.status().as_u16() {
        401 => Answer::Denied {
            unauthenticated: true,
        },
        403 => Answer::Denied {
            unauthenticated: false,
        },
        s => Answer::Other(format!("{s} {}", resp.text().await.unwrap_or_default())),
    }
}

async fn fixture() -> TestGcs {
    // Its test consumers listen on loopback.
    let gcs = TestGcs::start_with(|c| c.allow_private_consumers = true).await;
    gcs.setup_cts("cts-a", "node-a", UNREACHABLE_CTS).await;
    for (name, node) in [("cts-b", "node-b"), ("cts-spare", "node-s")] {
        gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance(name, "criu", node, UNREACHABLE_CTS),
        })
        .await
        .unwrap();
    }
    for gid in ["job-1", "job-fin", "job-fin-json", "job-destroy"] {
        gcs.register_job(gid, "cts-a").await;
    }
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: checkpoint_record("ck-1", "job-1", "cts-a"),
    })
    .await
    .unwrap();
    gcs
}

#[tokio::test]
async fn every_gcs_operation_is_allowed_or_refused_by_the_matrix_and_refusals_write_nothing() {
    let gcs = fixture().await;
    let mut problems = Vec::new();
    for case in cases() {
        // The refused first, so that what the allowed ones do cannot hide a refusal.
        let mut order: Vec<Who> = EVERYONE
            .iter()
            .copied()
            .filter(|w| !case.allowed.contains(w))
            .collect();
        order.extend(case.allowed.iter().copied());
        for who in order {
            let allowed = case.allowed.contains(&who);
            let mut calls: Vec<(&str, Answer)> = Vec::new();
            let before = snapshot(&gcs).await;
            if let Some((path, body)) = &case.soap {
                calls.push(("SOAP", soap_call(&gcs, who, path, body).await));
            }
            if !allowed {
                assert_eq!(
                    snapshot(&gcs).await,
                    before,
                    "{} over SOAP as {who:?} was refused but wrote",
                    case.name
                );
            }
            let before = snapshot(&gcs).await;
            if let Some((method, path, body)) = &case.json {
                calls.push(("JSON", json_call(&gcs, who, method, path, body).await));
            }
            if !allowed {
                assert_eq!(
                    snapshot(&gcs).await,
                    before,
                    "{} over JSON as {who:?} was refused but wrote",
                    case.name
                );
            }
            for (wire, answer) in calls {
                let fine = match (&answer, allowed, who) {
                    (Answer::Denied { .. }, true, _) => false,
                    (Answer::Handshake, _, Untrusted | Expired) => true,
                    (Answer::Denied { unauthenticated }, false, Anonymous) => *unauthenticated,
                    (Answer::Denied { unauthenticated }, false, _) => !unauthenticated,
                    (Answer::Other(_), true, _) => true,
                    _ => false,
                };
                if !fine {
                    problems.push(format!(
                        "{} over {wire} as {who:?} (allowed: {allowed}): {answer:?}",
                        case.name
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn subscriptions_are_managed_by_their_creator_and_admins_only() {
    let fixture = fixture().await;
    let gcs = &fixture;
    let make = |who: Who| async move {
        let r = who
            .client()
            .post(format!("{}/api/v1/subscriptions", gcs.url))
            .json(&serde_json::json!({"consumer": "http://127.0.0.1:9/c"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        r.json::<SubscriptionInfo>().await.unwrap()
    };
    let mine = make(Broker).await;
    let list = |who: Who| async move {
        who.client()
            .get(format!("{}/api/v1/subscriptions", gcs.url))
            .send()
            .await
            .unwrap()
            .json::<SubscriptionList>()
            .await
            .unwrap()
            .subscriptions
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(list(Broker).await, vec![mine.id.clone()]);
    assert!(
        list(OtherBroker).await.is_empty(),
        "brokers see only their own"
    );
    assert_eq!(list(Admin).await, vec![mine.id.clone()]);
    let renew = |who: Who| {
        let sub = mine.address.clone();
        async move {
            soap_call(
                gcs,
                who,
                &sub[sub.find("/subscriptions/").unwrap()..],
                "<wsnt:Renew xmlns:wsnt=\"http://docs.oasis-open.org/wsn/b-2\"><wsnt:TerminationTime>PT1H</wsnt:TerminationTime></wsnt:Renew>",
            )
            .await
        }
    };
    let before = snapshot(gcs).await;
    assert_eq!(
        renew(OtherBroker).await,
        Answer::Denied {
            unauthenticated: false
        }
    );
    let del = |who: Who| {
        let id = mine.id.clone();
        async move {
            json_call(
                gcs,
                who,
                "DELETE",
                &format!("/api/v1/subscriptions/{id}"),
                &None,
            )
            .await
        }
    };
    assert_eq!(
        del(OtherBroker).await,
        Answer::Denied {
            unauthenticated: false
        }
    );
    assert_eq!(snapshot(gcs).await, before, "refusals wrote nothing");
    assert_eq!(renew(Broker).await, Answer::Other("ok".into()));
    assert!(matches!(del(Broker).await, Answer::Other(s) if s.starts_with("200")));
}

#[tokio::test]
async fn discovery_needs_no_certificate() {
    let gcs = fixture().await;
    let anon = pki::pki().anonymous();
    for path in [
        format!("{}?wsdl", gcs.endpoint()),
        format!("{}/wsrf/schemas/gca.xsd", gcs.url),
        format!("{}/healthz", gcs.url),
    ] {
        let r = anon.get(&path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

/// What a CTS may register as a record, even as itself: only for a job it is in charge of,
/// with its own type, an image under its own registered address, a digest, and its own
/// valid signature over the record (a record signed by another CTS, or changed after it was
/// signed, is refused): so no client can make a forged record `latest`.
#[tokio::test]
async fn a_cts_registers_only_records_it_took_and_signed() {
    let gcs = fixture().await;
    gcs.register_job("job-b", "cts-b").await;
    let as_a = |r: CheckpointRecord| async {
        gcs.call_as::<RegisterCheckpointOp>("cts:cts-a", RegisterCheckpoint { checkpoint: r })
            .await
    };
    let refused = |r: Result<CheckpointRegistered, gca_protocol::Fault>, why: &str| {
        let f = r.expect_err(why);
        assert_eq!(f.kind, FaultKind::AccessDenied, "{why}: {f:?}");
        f
    };
    let before = snapshot(&gcs).await;
    // Of a job in another CTS's charge.
    refused(
        as_a(checkpoint_record("f-1", "job-b", "cts-a")).await,
        "another CTS's job",
    );
    // An image somewhere else than cts-a's address.
    let mut r = checkpoint_record("f-2", "job-1", "cts-a");
    r.image_name = "https://attacker.example.org/images/f-2".into();
    refused(as_a(signed(r)).await, "an image elsewhere");
    // No digest.
    let mut r = checkpoint_record("f-3", "job-1", "cts-a");
    r.digest = None;
    r.signature = None;
    refused(as_a(r).await, "no digest");
    // Changed after it was signed (another digest: another image).
    let mut r = checkpoint_record("f-4", "job-1", "cts-a");
    r.digest = Some(format!("sha256:{}", "ee".repeat(32)));
    let f = refused(as_a(r).await, "a tampered record");
    assert_eq!(f.code.as_deref(), Some("bad-signature"));
    // Signed by another CTS's key.
    let mut r = checkpoint_record("f-5", "job-1", "cts-a");
    r.signature = signed(CheckpointRecord {
        cts_name: "cts-b".into(),
        ..r.clone()
    })
    .signature;
    refused(as_a(r).await, "cts-b's signature");
    // Unsigned.
    let mut r = checkpoint_record("f-6", "job-1", "cts-a");
    r.signature = None;
    refused(as_a(r).await, "no signature");
    assert_eq!(snapshot(&gcs).await, before, "nothing was registered");
    as_a(checkpoint_record("ok-1", "job-1", "cts-a"))
        .await
        .expect("its own, signed record");
}

/// The attacks of a network peer on the registry, as CTS `cts-evil` with a certificate of
/// its own: it cannot re-register cts-a at its address, nor take job-1 over.
#[tokio::test]
async fn a_rogue_cts_cannot_redirect_an_instance_or_take_a_running_job() {
    let gcs = fixture().await;
    let before = snapshot(&gcs).await;
    let f = gcs
        .call_as::<RegisterCtsInstanceOp>(
            "cts:cts-evil",
            RegisterCtsInstance {
                instance: instance("cts-a", "criu", "node-evil", "https://evil.example.org/cts"),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(f.kind, FaultKind::AccessDenied, "{f:?}");
    assert!(f.message.contains("cts:cts-evil"), "{}", f.message);
    assert_eq!(snapshot(&gcs).await, before);
    // Its own instance: fine. Moving a running job to it: refused.
    gcs.call_as::<RegisterCtsInstanceOp>(
        "cts:cts-evil",
        RegisterCtsInstance {
            instance: instance("cts-evil", "criu", "node-evil", UNREACHABLE_CTS),
        },
    )
    .await
    .unwrap();
    let f = gcs
        .call_as::<RegisterJobOp>(
            "cts:cts-evil",
            RegisterJob {
                gid: "job-1".into(),
                cts_instance: "cts-evil".into(),
                local_id: Some("1".into()),
                recovery: true,
                from_checkpoint: Some("ck-1".into()),
                state: Some(JobState::Running),
                retention: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(f.code.as_deref(), Some("recovery-not-authorized"), "{f:?}");
    let job = gcs
        .call::<GetJobOp>(GidRequest {
            gid: "job-1".into(),
        })
        .await
        .unwrap()
        .job;
    assert_eq!((job.cts_instance.as_str(), job.recoveries), ("cts-a", 0));
    // FindCTS still hands brokers cts-a's own address.
    let offers = gcs
        .call::<FindCtsOp>(FindCts {
            cts_type: Some("criu".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .offers;
    let a = offers.iter().find(|o| o.instance.name == "cts-a").unwrap();
    assert_eq!(a.instance.url, UNREACHABLE_CTS);
}
