//! The SOAP reference, `docs/soap-operations.md`, made from real exchanges and checked.
//!
//! One session against a real GCS (real PostgreSQL, real HTTP) and a real CTS (the
//! application-level driver, with a small job that checkpoints itself when signalled): every
//! operation of `GCS_OPERATIONS`, WS-ResourceProperties on each kind of resource,
//! WS-ResourceLifetime, WS-BaseNotification (the Notify as a consumer receives it), the CTS's
//! own DoCheckpoint and one fault of each family. The requests are written here by hand, sent
//! as they are, and shown as sent; the responses are shown indented. Every request, response
//! and the Notify is validated against `schemas/gca.xsd` and the OASIS schemas it imports by
//! `tests/python/check_schemas.py --instances`.
//!
//! Run with `GCA_UPDATE_DOCS=1` to write the document; otherwise the test fails when the
//! checked-in document differs from what the services answer now. What changes from run to
//! run is replaced by stable values ([`Normalizer`]); nothing else is touched.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::ns;
use gca_protocol::ops::{CTS_OPERATIONS, GCS_OPERATIONS};
use gca_protocol::soap;
use gca_protocol::wsn;
use gca_protocol::wsrf;
use gca_protocol::xml::{self, Element, Node, XML_NS};
use integration_tests::consumer::Consumer;
use integration_tests::cts::{TestCts, TestJob, APP_DRIVER};
use integration_tests::{http_as, pki, run_python, signed, TestGcs, APP_DESCRIPTOR};

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/soap-operations.md");
const REGENERATE: &str = "GCA_UPDATE_DOCS=1 scripts/test -E 'test(soap_operations)'";

/// The host names the document shows instead of the test servers' `127.0.0.1:port`.
const GCS_HOST: &str = "gcs.example.org:8080";
const CTS_A_HOST: &str = "cts-a.example.org:8090";
const CONSUMER_HOST: &str = "broker.example.org:9000";
/// The time the document shows for the start of the run.
const BASE_TIME: &str = "2026-11-22T12:00:00Z";
/// The real job's PID, as the document shows it.
const PID_SHOWN: &str = "12345";

/// What cts-b (registered by the examples, no server behind it) reports for its checkpoint.
const CTS_B_IMAGE: &str = "cts-b-20261122T115500Z-5d41402abc4b";
const CTS_B_DIGEST: &str =
    "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// A job that follows the application-level protocol (cts/src/driver/app.rs) and always
/// writes the same checkpoint, so that image sizes are the same in every run: on SIGUSR1 it
/// writes `state`, then the marker (under a temporary name, then renamed). It writes one line
/// to its log once the handler is in place.
const JOB_SCRIPT: &str = r#"d="$GCA_CHECKPOINT_DIR"; trap 'printf "step 42\n" >"$d/state"; printf "ok\n" >"$d/.gca-complete.tmp"; mv -f "$d/.gca-complete.tmp" "$d/.gca-complete"' USR1; echo 1 >{LOG}; while :; do sleep 1 & wait $!; done"#;

// ---------------------------------------------------------------------------------------------
// What is documented

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Broker,
    Admin,
    CtsFacing,
    Cts,
    Rp,
    Rl,
    Wsn,
    Soap12,
    Faults,
}

impl Section {
    const ALL: [Section; 9] = [
        Section::Broker,
        Section::Admin,
        Section::CtsFacing,
        Section::Cts,
        Section::Rp,
        Section::Rl,
        Section::Wsn,
        Section::Faults,
        Section::Soap12,
    ];

    fn title(self) -> &'static str {
        match self {
            Section::Broker => "Broker operations",
            Section::Admin => "Admin operations",
            Section::CtsFacing => "Operations a CTS calls",
            Section::Cts => "The CTS's own endpoint",
            Section::Rp => "WS-ResourceProperties",
            Section::Rl => "WS-ResourceLifetime",
            Section::Wsn => "WS-BaseNotification",
            Section::Soap12 => "SOAP 1.2",
            Section::Faults => "Faults",
        }
    }

    fn intro(self) -> &'static str {
        match self {
            Section::Broker => "Called by a grid broker or scheduler (and by `gcactl`), at the GCS's service address.",
            Section::Admin => "Called by an administrator (`gcactl`), at the GCS's service address.",
            Section::CtsFacing => "Called by the CTSes at the GCS's service address: the GCS learns about instances, jobs, checkpoints and exits only through these. The CTS's `gcs_link` sends them from its on-disk outbox.",
            Section::Cts => "Each CTS serves one SOAP operation, at `/wsrf/services/CheckpointTranslationService` on its own host (`?wsdl` for its WSDL). The GCS calls it when a broker asks for a checkpoint.",
            Section::Rp => "Every WS-Resource of the GCS (the GCS itself, each job, checkpoint record, CTS instance and subscription) answers the four WS-RP operations on its own resource property document. The actions are `http://docs.oasis-open.org/wsrf/rpw-2/{Op}/{Op}Request` and `...Response`. A resource is addressed by its address (as most examples do), by its reference parameter echoed as a header (the checkpoint example), or by `?gid=`, `?checkpoint=`, `?instance=` on the service address.",
            Section::Rl => "Job resources can be given a termination time and destroyed; other resources refuse both (`wsrf-rl:UnableToSetTerminationTimeFault`, `wsrf-rl:ResourceNotDestroyedFault`). Destroying a job finishes it; its record stays (`GetJob`), its WS-Resource is gone.",
            Section::Wsn => "The GCS is a NotificationProducer; each subscription is a WS-Resource (its SubscriptionManager). A consumer is any HTTP endpoint that answers a POST with a 2xx status.",
            Section::Soap12 => "Every operation is also served over SOAP 1.2, at the same address: the action goes into the `action` parameter of `Content-Type: application/soap+xml` (or `wsa:Action`), and faults take the SOAP 1.2 form.",
            Section::Faults => "A fault is a SOAP fault whose detail is a WS-BaseFaults element: its `wsrf-bf:Timestamp`, often a `wsrf-bf:ErrorCode` (dialect `urn:gca:v1:error-codes`) a program can act on, and a `wsrf-bf:Description`. `faultcode` is `s:Client` for faults of the request (unknown resources, invalid requests, conflicts) and `s:Server` for failures of the service or a CTS. Over SOAP 1.1 every fault comes with HTTP status 500 (SOAP 1.1, section 6.2), over SOAP 1.2 with 400 (`env:Sender`) or 500 (`env:Receiver`); the JSON API maps the kinds to finer statuses. The action is `http://docs.oasis-open.org/wsrf/fault`. One example of each family follows; `schemas/gcs.wsdl` lists the faults of each operation.",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Broker,
    Admin,
    Cts,
}

/// Who calls each GCS operation and what it does, one line each.
fn gcs_operation(op: &str) -> Option<(Caller, &'static str)> {
    Some(match op {
        "DoCheckpoint" => (Caller::Broker, "Checkpoints the job with this GID now: the GCS forwards the request to the CTS in charge of the job and answers with the checkpoint record, including the sequence number it assigned. `Stop` = `true` stops the job after the checkpoint (migration)."),
        "FindCTS" => (Caller::Broker, "Where can a job run checkpointably: the CTS instances matching every criterion given (type, checkpointer class, core service, resource, core-service properties, heard from within so many seconds), each with its wrappers and parameter patterns to submit the job with, in instance name order."),
        "GetCheckpoints" => (Caller::Broker, "One page of a job's checkpoint records, in sequence order: at most `Limit` and the GCS's `checkpoints_page_size` (1000); `Next`, when present, is the `After` of the next page."),
        "AuthorizeRecovery" => (Caller::Broker, "Lets a CTS instance take a job over by a recovery although the job may still run elsewhere (a clone of it, or a migration the broker drives). Without it, a recovery registration moves a job only when the job failed, was stopped for migration or its CTS is lost. The grant is used up by that recovery, or expires (`recovery_grant_secs`)."),
        "GetRecoveryInfo" => (Caller::Broker, "How and where to recover a job from an image (`latest` or a checkpoint ID): the checkpoint, the CTS type that must restore it, and each candidate instance with the recovery wrapper's parameters expanded for it (`{CHECKPOINT_DIR}` is left for the CTS)."),
        "GetJob" => (Caller::Broker, "One job: its state, the CTS in charge, its latest checkpoint, how it ended."),
        "ListJobs" => (Caller::Broker, "Jobs, optionally by `State` and `CTSInstance`, in GID order, paged with `After` (the last GID seen) and `Limit`."),
        "RegisterCheckpointerClass" => (Caller::Admin, "Defines a checkpointer class: the properties every CTS type in the class must have. Registering the same class again is `unchanged`; the same name with other properties or description is a conflict."),
        "RegisterCTSDescriptor" => (Caller::Admin, "Registers a CTS type from its descriptor (`schemas/cts-descriptor.xsd`), inline as a `gca:CTSDescriptor` element. A descriptor with an error is refused with `gca:InvalidDescriptorFault` naming the line."),
        "UnregisterCTS" => (Caller::Admin, "Removes a CTS instance (refused while it is in charge of running jobs), or, with `CTSType`, a type that has no instances left."),
        "ListCheckpointerClasses" => (Caller::Admin, "Every checkpointer class, the built-in `basic` included."),
        "ListCTSTypes" => (Caller::Admin, "Every registered CTS type: its descriptor, when it was registered and how many instances it has."),
        "ListCTSInstances" => (Caller::Admin, "Every registered CTS instance, with when it was last heard from."),
        "RegisterCTSInstance" => (Caller::Cts, "A CTS announces itself: at start, every `heartbeat_secs` (its heartbeat), and when the GCS is back after being unreachable. Equal registrations are `unchanged`; a new address is `updated`; another type is a conflict."),
        "RegisterJob" => (Caller::Cts, "A CTS takes charge of a GID, when the execute wrapper registers the job there; with `Recovery` = `true` (and `FromCheckpoint`, `State`) when a recovery wrapper restores it, which moves the job to that CTS."),
        "RegisterCheckpoint" => (Caller::Cts, "A CTS records a checkpoint it took (on request, periodic, or by the job itself); the GCS assigns the next sequence number. The same record again is `unchanged`."),
        "AbandonRecovery" => (Caller::Cts, "The CTS a job is being recovered on gives the recovery up (it refused the image, or the restore failed): the job goes back to the CTS, state and end it had before the recovery moved it, and the recovery is not counted. Only that CTS, only while the job is `recovering` there."),
        "SetImageLocation" => (Caller::Cts, "Where a checkpoint's image has got to in an object store: the CTS that registered the record (or the one its job is on now) reports that an `async` upload finished (`stored`) or gave up (`failed`, with `Error`). A record lists every `Location` of its image: the store of the CTS that took it first (with its `URL`), then the object store (`Name`: the bucket's identity, `s3://<bucket>/<prefix>` unless the CTS's `[object_store] name` says otherwise), each with its `State` and `Since`. The answer is the record as it is now."),
        "GetJobKey" => (Caller::Cts, "The key a job's image chunks are encrypted with in an object store: 32 random bytes, base64, made at the first request and the same for every later one. The GCS keeps it wrapped under its key-wrapping key (`job_key_wrapping_key_file`) and gives it only to the CTS the job is on (running, stopped, recovering there, or last on), and to a CTS the job has left while the retention policy has it delete images of the job it took (from the object store too); the key follows the job when a recovery moves it. A secret: never log it."),
        "JobFinished" => (Caller::Cts, "The CTS in charge reports that the job exited, with its exit status or signal. Exit status 0 ends the job: its retention policy applies to its images. A job that failed keeps them for recovery (and gets a termination time, `failed_job_lifetime_secs`, unless it has one)."),
        "SetRetention" => (Caller::Admin, "The job owner's retention policy: what is kept of the job's images when it ends (exit status 0, or its resource destroyed). `Keep` `none` (the default: delete them), `last` (the newest `KeepLast`) or `all`, moved to `KeepIn`, a directory of the job's owner on the resource holding each image. On a job that has ended, it applies at once to the images still stored."),
        _ => return None,
    })
}

impl Caller {
    fn section(self) -> Section {
        match self {
            Caller::Broker => Section::Broker,
            Caller::Admin => Section::Admin,
            Caller::Cts => Section::CtsFacing,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Caller::Broker => "broker",
            Caller::Admin => "admin",
            Caller::Cts => "CTS",
        }
    }
}

/// A request and its response, as they went over the wire.
struct Call {
    url: String,
    soap12: bool,
    request: String,
    status: u16,
    response: String,
}

/// A notification as the consumer received it.
struct Received {
    url: String,
    soap_action: Option<String>,
    content_type: Option<String>,
    body: String,
}

enum Captured {
    Call(Call),
    Notify(Received),
}

struct Example {
    section: Section,
    /// The operation (the request element's local name, or `Notify`).
    op: String,
    title: String,
    about: String,
    action: String,
    captured: Captured,
}

/// Sends the hand-written requests and keeps every exchange.
struct Recorder {
    examples: Vec<Example>,
    next_message: u32,
    /// The CTS the next CTS-facing request speaks for, when its body names none.
    as_cts: Option<String>,
}

/// One request, before it is put into its envelope.
struct Request<'a> {
    url: &'a str,
    action: &'a str,
    /// Extra header elements (reference parameters), hand-written.
    headers: &'a str,
    /// The body element, hand-written (indented as it should appear, any common indentation
    /// is removed).
    body: &'a str,
    soap12: bool,
}

impl<'a> Request<'a> {
    fn new(url: &'a str, action: &'a str, body: &'a str) -> Self {
        Request {
            url,
            action,
            headers: "",
            body,
            soap12: false,
        }
    }
}

impl Recorder {
    /// Sends a request and records it; returns the response payload or the fault.
    async fn send(
        &mut self,
        section: Section,
        op: &str,
        title: &str,
        about: &str,
        req: Request<'_>,
    ) -> Result<Element, Fault> {
        // Each request with the identity of who calls it (see the policy in ARCHITECTURE.md).
        let caller = match (section, gcs_operation(op).map(|c| c.0)) {
            (Section::Cts, _) => pki::GCS.to_string(),
            (_, Some(Caller::Cts)) => {
                pki::cts(&self.as_cts.take().unwrap_or_else(|| cts_named_in(req.body)))
            }
            (_, Some(Caller::Admin)) | (Section::Rl, _) => pki::ADMIN.to_string(),
            _ => pki::BROKER.to_string(),
        };
        self.next_message += 1;
        let message_id = format!("urn:uuid:00000000-0000-0000-0000-{:012}", self.next_message);
        let text = envelope(
            req.soap12,
            req.action,
            &message_id,
            req.url,
            req.headers,
            req.body,
        );
        let content_type = if req.soap12 {
            format!(
                "application/soap+xml; charset=utf-8; action=\"{}\"",
                req.action
            )
        } else {
            "text/xml; charset=utf-8".to_string()
        };
        let mut post = http_as(&caller)
            .post(req.url)
            .header("content-type", content_type)
            .body(text.clone());
        if !req.soap12 {
            post = post.header("SOAPAction", format!("\"{}\"", req.action));
        }
        let resp = post.send().await.expect("POST");
        let status = resp.status().as_u16();
        let response = resp.text().await.expect("response body");
        let parsed = soap::parse_response(&response);
        // The response is addressed to this request.
        let env = xml::parse(&response).unwrap_or_else(|e| panic!("{title}: {e}\n{response}"));
        let relates_to = env
            .elements()
            .find(|e| e.name == "Header")
            .and_then(|h| h.opt_text(ns::WSA, "RelatesTo"));
        assert_eq!(
            relates_to.as_deref(),
            Some(message_id.as_str()),
            "{title}: wsa:RelatesTo\n{response}"
        );
        self.examples.push(Example {
            section,
            op: op.to_string(),
            title: title.to_string(),
            about: about.to_string(),
            action: req.action.to_string(),
            captured: Captured::Call(Call {
                url: req.url.to_string(),
                soap12: req.soap12,
                request: text,
                status,
                response,
            }),
        });
        parsed
    }

    /// A GCS operation at the service address, with its action and description.
    async fn gcs(&mut self, gcs: &TestGcs, op: &str, body: &str) -> Result<Element, Fault> {
        let (caller, about) =
            gcs_operation(op).unwrap_or_else(|| panic!("describe {op} in gcs_operation()"));
        let action = ns::request_action(ns::GCS_PORT_TYPE, op);
        let url = gcs.endpoint();
        self.send(
            caller.section(),
            op,
            op,
            about,
            Request::new(&url, &action, body),
        )
        .await
    }
}

/// The CTS a CTS-facing request speaks for: its instance name, CTS name or CTS instance.
fn cts_named_in(body: &str) -> String {
    ["<gca:Name>", "<gca:CTSName>", "<gca:CTSInstance>"]
        .iter()
        .find_map(|tag| {
            let start = body.find(tag)? + tag.len();
            let end = start + body[start..].find('<')?;
            Some(body[start..end].trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| panic!("no CTS named in {body}"))
}

/// Removes the indentation common to all non-blank lines, and blank lines at both ends.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.trim_matches('\n').lines().collect();
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The prefixes a hand-written body may use, declared on the envelope when it does.
const BODY_PREFIXES: &[(&str, &str)] = &[
    ("gca", ns::GCA),
    ("wsrf-rp", ns::WSRF_RP),
    ("wsrf-rl", ns::WSRF_RL),
    ("wsnt", ns::WSNT),
    ("xsi", ns::XSI),
];

/// A readable SOAP envelope: WS-Addressing 1.0 headers (`Action`, `MessageID`, `To`), extra
/// headers, the body; namespaces declared on the envelope.
fn envelope(
    soap12: bool,
    action: &str,
    message_id: &str,
    to: &str,
    headers: &str,
    body: &str,
) -> String {
    let (p, env_ns) = if soap12 {
        ("env", ns::SOAP12)
    } else {
        ("s", ns::SOAP11)
    };
    let headers = dedent(headers);
    let body = dedent(body);
    let mut decls = vec![
        format!("xmlns:{p}=\"{env_ns}\""),
        format!("xmlns:wsa=\"{}\"", ns::WSA),
    ];
    for (prefix, uri) in BODY_PREFIXES {
        let used = format!("{prefix}:");
        if body.contains(&used) || headers.contains(&used) {
            decls.push(format!("xmlns:{prefix}=\"{uri}\""));
        }
    }
    let open = format!("<{p}:Envelope ");
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&open);
    out.push_str(&decls.join(&format!("\n{}", " ".repeat(open.len()))));
    out.push_str(">\n");
    let _ = writeln!(out, "  <{p}:Header>");
    let _ = writeln!(out, "    <wsa:Action>{action}</wsa:Action>");
    let _ = writeln!(out, "    <wsa:MessageID>{message_id}</wsa:MessageID>");
    let _ = writeln!(out, "    <wsa:To>{to}</wsa:To>");
    for line in headers.lines() {
        let _ = writeln!(out, "    {line}");
    }
    let _ = writeln!(out, "  </{p}:Header>");
    let _ = writeln!(out, "  <{p}:Body>");
    for line in body.lines() {
        let _ = writeln!(out, "    {line}");
    }
    let _ = writeln!(out, "  </{p}:Body>");
    let _ = write!(out, "</{p}:Envelope>");
    out
}

// ---------------------------------------------------------------------------------------------
// Stable values

/// What differs from run to run, and what the document shows instead. Nothing else is changed.
///
/// - The test servers' addresses `127.0.0.1:<port>`: the GCS's becomes `gcs.example.org:8080`,
///   the real CTS's `cts-a.example.org:8090`, the consumer's `broker.example.org:9000`.
/// - Times within two days of the start of the run: 2026-11-22T12:00:00Z plus their distance
///   from the start rounded to whole hours (so "now + PT2H" stays two hours after "now"), with
///   as many fractional digits (zeros) as the original.
/// - UUIDs the services generate (response `wsa:MessageID`s, subscription IDs; the requests'
///   `00000000-0000-0000-0000-…` IDs stay): `00000000-0000-4000-8000-…N`, numbered in the
///   order they appear in the document.
/// - Image IDs the real CTS chooses (`cts-a-<UTC time>-<12 hex digits>`) and image digests
///   other than the one the examples report for cts-b: `cts-a-20261122T120000Z-…N` and
///   `sha256:0…N`, likewise numbered.
/// - The real job's PID, in `gca:LocalID`: `12345`.
/// - An image signature's certificate and value (`gca:Signature`): a short description.
/// - This machine's kernel release and architecture in restore facts (`gca:Kernel`,
///   `gca:Architecture`): [`KERNEL_SHOWN`], [`ARCH_SHOWN`].
/// - A job's key (`gca:Key`): [`EXAMPLE_JOB_KEY`].
struct Normalizer {
    start: DateTime<Utc>,
    base: DateTime<Utc>,
    hosts: Vec<(String, &'static str)>,
    pid: String,
    uuids: HashMap<String, String>,
    images: HashMap<String, String>,
    digests: HashMap<String, String>,
}

impl Normalizer {
    fn new(start: DateTime<Utc>, hosts: Vec<(String, &'static str)>, pid: i32) -> Self {
        Normalizer {
            start,
            base: BASE_TIME.parse().unwrap(),
            hosts,
            pid: pid.to_string(),
            uuids: HashMap::new(),
            images: HashMap::new(),
            digests: HashMap::new(),
        }
    }

    /// A text value, attribute value or whole message.
    fn text(&mut self, s: &str) -> String {
        let mut s = s.to_string();
        // Inside each gca:Signature of a whole message.
        let mut from = 0;
        while let Some(at) = s[from..].find("<gca:Signature>").map(|i| i + from) {
            for name in ["Certificate", "Value"] {
                let end = s[at..].find("</gca:Signature>").map_or(s.len(), |i| i + at);
                let (open, close) = (format!("<gca:{name}>"), format!("</gca:{name}>"));
                let part = &s[at..end];
                if let (Some(a), Some(b)) = (part.find(&open), part.find(&close)) {
                    if a < b {
                        let shown = signature_shown(name).unwrap_or_default();
                        s.replace_range(at + a + open.len()..at + b, shown);
                    }
                }
            }
            from = at + 1;
        }
        for (from, to) in &self.hosts {
            s = s.replace(from.as_str(), to);
        }
        let b = s.as_bytes();
        let mut out = String::with_capacity(s.len());
        let mut i = 0;
        let mut copied = 0;
        while i < b.len() {
            let found = if let Some(n) = timestamp_at(b, i) {
                Some((n, self.time(&s[i..i + n])))
            } else if let Some(n) = uuid_at(b, i) {
                let u = &s[i..i + n];
                (!u.starts_with("00000000-0000-")).then(|| {
                    let next = self.uuids.len() + 1;
                    let p = self
                        .uuids
                        .entry(u.to_string())
                        .or_insert_with(|| format!("00000000-0000-4000-8000-{next:012}"));
                    (n, p.clone())
                })
            } else if let Some(n) = digest_at(b, i) {
                let d = &s[i..i + n];
                (d != CTS_B_DIGEST).then(|| {
                    let next = self.digests.len() + 1;
                    let p = self
                        .digests
                        .entry(d.to_string())
                        .or_insert_with(|| format!("sha256:{next:064}"));
                    (n, p.clone())
                })
            } else if let Some(n) = image_id_at(b, i) {
                let id = &s[i..i + n];
                let next = self.images.len() + 1;
                let p = self
                    .images
                    .entry(id.to_string())
                    .or_insert_with(|| format!("cts-a-20261122T120000Z-{next:012}"));
                Some((n, p.clone()))
            } else {
                None
            };
            match found {
                Some((n, replacement)) => {
                    out.push_str(&s[copied..i]);
                    out.push_str(&replacement);
                    i += n;
                    copied = i;
                }
                None => i += 1,
            }
        }
        out.push_str(&s[copied..]);
        out
    }

    fn time(&self, t: &str) -> String {
        let parsed = DateTime::parse_from_rfc3339(t)
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .with_timezone(&Utc);
        let offset = parsed - self.start;
        if offset.num_hours().abs() > 48 {
            return t.to_string();
        }
        let hours = (offset.num_seconds() as f64 / 3600.0).round() as i64;
        let shown = self.base + chrono::Duration::hours(hours);
        let fraction = t
            .find('.')
            .map(|dot| {
                let digits = t[dot + 1..].bytes().take_while(u8::is_ascii_digit).count();
                format!(".{}", "0".repeat(digits))
            })
            .unwrap_or_default();
        let zone = if t.ends_with("+00:00") { "+00:00" } else { "Z" };
        format!("{}{fraction}{zone}", shown.format("%Y-%m-%dT%H:%M:%S"))
    }

    /// A parsed message: every text and attribute value.
    fn tree(&mut self, el: &mut Element) {
        if el.is(ns::GCA, "Signature") {
            for c in el.children.iter_mut() {
                if let Node::Element(e) = c {
                    if let Some(shown) = signature_shown(&e.name) {
                        e.children = vec![Node::Text(shown.to_string())];
                    }
                }
            }
            return;
        }
        // The facts of this machine (a resource's and an image's).
        for (name, shown) in [("Kernel", KERNEL_SHOWN), ("Architecture", ARCH_SHOWN)] {
            if el.is(ns::GCA, name) {
                el.children = vec![Node::Text(shown.to_string())];
                return;
            }
        }
        // A job's key (GetJobKey) is random: an example key instead.
        if el.is(ns::GCA, "Key") {
            el.children = vec![Node::Text(EXAMPLE_JOB_KEY.to_string())];
            return;
        }
        let local_id = el.is(ns::GCA, "LocalID");
        for a in &mut el.attrs {
            a.value = self.text(&a.value);
        }
        for c in &mut el.children {
            match c {
                Node::Text(t) if local_id && t.trim() == self.pid => *t = PID_SHOWN.to_string(),
                Node::Text(t) => *t = self.text(t),
                Node::Element(e) => self.tree(e),
            }
        }
    }
}

/// What the document shows for this machine's kernel release.
const KERNEL_SHOWN: &str = "6.18.44";
/// What the document shows for this machine's architecture.
const ARCH_SHOWN: &str = "x86_64";
/// The key shown in GetJobKey's example: the bytes 0 to 31, base64.
const EXAMPLE_JOB_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// What the document shows for the parts of an image signature that differ from run to run
/// (each run's test CA issues new keys).
fn signature_shown(element: &str) -> Option<&'static str> {
    match element {
        "Certificate" => Some("MIIB…(the signing CTS's certificate, base64 DER)…"),
        "Value" => Some("MEUC…(the signature, base64)…"),
        _ => None,
    }
}

fn digits(b: &[u8], at: usize, n: usize) -> bool {
    b.len() >= at + n && b[at..at + n].iter().all(u8::is_ascii_digit)
}

fn hex(b: &[u8], at: usize, n: usize) -> bool {
    b.len() >= at + n
        && b[at..at + n]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` at `i`: its length.
fn timestamp_at(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && b[i - 1].is_ascii_alphanumeric() {
        return None;
    }
    let shape = digits(b, i, 4)
        && b.get(i + 4) == Some(&b'-')
        && digits(b, i + 5, 2)
        && b.get(i + 7) == Some(&b'-')
        && digits(b, i + 8, 2)
        && b.get(i + 10) == Some(&b'T')
        && digits(b, i + 11, 2)
        && b.get(i + 13) == Some(&b':')
        && digits(b, i + 14, 2)
        && b.get(i + 16) == Some(&b':')
        && digits(b, i + 17, 2);
    if !shape {
        return None;
    }
    let mut n = 19;
    if b.get(i + n) == Some(&b'.') {
        let d = b[i + n + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        n += 1 + d;
    }
    match b.get(i + n) {
        Some(b'Z') => Some(n + 1),
        Some(b'+' | b'-') if digits(b, i + n + 1, 2) && b.get(i + n + 3) == Some(&b':') => {
            Some(n + 6)
        }
        _ => None,
    }
}

/// A lower-case UUID at `i`: its length.
fn uuid_at(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && b[i - 1].is_ascii_hexdigit() {
        return None;
    }
    let ok = hex(b, i, 8)
        && b.get(i + 8) == Some(&b'-')
        && hex(b, i + 9, 4)
        && b.get(i + 13) == Some(&b'-')
        && hex(b, i + 14, 4)
        && b.get(i + 18) == Some(&b'-')
        && hex(b, i + 19, 4)
        && b.get(i + 23) == Some(&b'-')
        && hex(b, i + 24, 12)
        && !b.get(i + 36).is_some_and(u8::is_ascii_hexdigit);
    ok.then_some(36)
}

/// `sha256:<64 hex digits>` at `i`: its length.
fn digest_at(b: &[u8], i: usize) -> Option<usize> {
    (b[i..].starts_with(b"sha256:") && hex(b, i + 7, 64)).then_some(71)
}

/// An image ID of the real CTS, `cts-a-YYYYMMDDTHHMMSSZ-<12 hex>`, at `i`: its length.
fn image_id_at(b: &[u8], i: usize) -> Option<usize> {
    let p = b"cts-a-";
    let ok = b[i..].starts_with(p)
        && digits(b, i + 6, 8)
        && b.get(i + 14) == Some(&b'T')
        && digits(b, i + 15, 6)
        && b.get(i + 21) == Some(&b'Z')
        && b.get(i + 22) == Some(&b'-')
        && hex(b, i + 23, 12);
    ok.then_some(35)
}

// ---------------------------------------------------------------------------------------------
// Indentation

/// The element indented, two spaces a level, with the prefixes and namespace declarations of
/// the parsed message (a declaration appears where its binding starts). Text-only elements stay
/// on one line; a start tag longer than 100 columns gets one attribute a line.
fn pretty(el: &Element) -> String {
    let mut out = String::new();
    write_pretty(&mut out, el, &Default::default(), 0);
    out.pop();
    out
}

fn prefix_of(scope: &std::collections::BTreeMap<String, String>, uri: &str, attr: bool) -> String {
    if uri == XML_NS {
        return "xml:".into();
    }
    scope
        .iter()
        .find(|(p, u)| *u == uri && !(attr && p.is_empty()))
        .map(|(p, _)| {
            if p.is_empty() {
                String::new()
            } else {
                format!("{p}:")
            }
        })
        .unwrap_or_else(|| panic!("no prefix for {uri} in scope"))
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn escape_attr(s: &str) -> String {
    escape_text(s).replace('"', "&quot;")
}

fn write_pretty(
    out: &mut String,
    el: &Element,
    parent: &std::collections::BTreeMap<String, String>,
    depth: usize,
) {
    let indent = "  ".repeat(depth);
    let scope = &el.scope.to_map();
    let tag = match &el.ns {
        Some(uri) => format!("{}{}", prefix_of(scope, uri, false), el.name),
        None => el.name.clone(),
    };
    // New bindings, the element's own first.
    let own = tag.split_once(':').map_or("", |(p, _)| p);
    let mut declared: Vec<(&String, &String)> = scope
        .iter()
        .filter(|(p, u)| parent.get(*p) != Some(*u))
        .collect();
    declared.sort_by_key(|(p, _)| p.as_str() != own);
    let mut attrs: Vec<String> = declared
        .into_iter()
        .map(|(p, u)| {
            if p.is_empty() {
                format!("xmlns=\"{}\"", escape_attr(u))
            } else {
                format!("xmlns:{p}=\"{}\"", escape_attr(u))
            }
        })
        .collect();
    for a in &el.attrs {
        let name = match &a.ns {
            Some(uri) => format!("{}{}", prefix_of(scope, uri, true), a.name),
            None => a.name.clone(),
        };
        attrs.push(format!("{name}=\"{}\"", escape_attr(&a.value)));
    }
    let open = format!("{indent}<{tag}");
    let one_line: String = attrs.iter().map(|a| format!(" {a}")).collect();
    out.push_str(&open);
    if open.len() + one_line.len() > 100 && attrs.len() > 1 {
        let align = format!("\n{}", " ".repeat(open.len() + 1));
        out.push(' ');
        out.push_str(&attrs.join(&align));
    } else {
        out.push_str(&one_line);
    }
    if el.children.is_empty() {
        out.push_str("/>\n");
        return;
    }
    if el.children.iter().all(|c| matches!(c, Node::Text(_))) {
        let text: String = el
            .children
            .iter()
            .map(|c| match c {
                Node::Text(t) => t.as_str(),
                Node::Element(_) => "",
            })
            .collect();
        let _ = writeln!(out, ">{}</{tag}>", escape_text(&text));
        return;
    }
    out.push_str(">\n");
    for c in &el.children {
        match c {
            Node::Element(e) => write_pretty(out, e, scope, depth + 1),
            Node::Text(t) if t.trim().is_empty() => {}
            Node::Text(t) => {
                let _ = writeln!(out, "{indent}  {}", escape_text(t.trim()));
            }
        }
    }
    let _ = writeln!(out, "{indent}</{tag}>");
}

/// The message without whitespace-only text beside elements: what indenting may add.
fn canonical(el: &Element) -> String {
    fn strip(el: &mut Element) {
        if el.elements().next().is_some() {
            el.children
                .retain(|c| !matches!(c, Node::Text(t) if t.trim().is_empty()));
        }
        for c in &mut el.children {
            if let Node::Element(e) = c {
                strip(e);
            }
        }
    }
    let mut el = el.clone();
    strip(&mut el);
    el.to_xml()
}

/// A received message, normalized and indented; checks that indenting changed nothing but
/// whitespace.
fn show_message(text: &str, norm: &mut Normalizer) -> String {
    let mut root = xml::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    norm.tree(&mut root);
    let shown = pretty(&root);
    let back = xml::parse(&shown).unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(
        canonical(&back),
        canonical(&root),
        "indenting changed the message"
    );
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{shown}")
}

// ---------------------------------------------------------------------------------------------
// The document

fn status_line(status: u16) -> String {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("HTTP {status} {reason}")
}

fn render(examples: &[Example], norm: &mut Normalizer) -> String {
    check_coverage(examples);
    let mut doc = String::new();
    doc.push_str(INTRO);
    doc.push_str("\n## Operations\n\n| operation | called by | section |\n|---|---|---|\n");
    for &op in GCS_OPERATIONS {
        let (caller, _) = gcs_operation(op).expect("described");
        let _ = writeln!(
            doc,
            "| `{op}` | {} | {} |",
            caller.name(),
            caller.section().title()
        );
    }
    for (ops, caller, section) in [
        (CTS_OPERATIONS, "GCS", Section::Cts),
        (wsrf::RP_OPERATIONS, "anyone", Section::Rp),
        (
            &["SetTerminationTime", "Destroy"][..],
            "broker, admin",
            Section::Rl,
        ),
        (
            &["Subscribe", "GetCurrentMessage"][..],
            "broker, monitor",
            Section::Wsn,
        ),
        (
            &["Renew", "Unsubscribe"][..],
            "the subscriber",
            Section::Wsn,
        ),
        (&["Notify"][..], "GCS → consumer", Section::Wsn),
    ] {
        for op in ops {
            let _ = writeln!(doc, "| `{op}` | {caller} | {} |", section.title());
        }
    }
    for section in Section::ALL {
        let _ = write!(doc, "\n## {}\n\n{}\n", section.title(), section.intro());
        let mut in_section: Vec<&Example> =
            examples.iter().filter(|e| e.section == section).collect();
        if matches!(
            section,
            Section::Broker | Section::Admin | Section::CtsFacing
        ) {
            // The order of GCS_OPERATIONS (the WSDL's), examples of one operation as taken.
            in_section.sort_by_key(|e| GCS_OPERATIONS.iter().position(|o| *o == e.op));
        }
        for e in in_section {
            render_example(&mut doc, e, norm);
        }
    }
    for leftover in ["127.0.0.1", "/tmp/"] {
        assert!(
            !doc.contains(leftover),
            "the document still shows {leftover:?}: extend the normalization"
        );
    }
    doc
}

fn render_example(doc: &mut String, e: &Example, norm: &mut Normalizer) {
    let _ = write!(doc, "\n### {}\n\n{}\n\n", e.title, e.about);
    match &e.captured {
        Captured::Call(c) => {
            let version = if c.soap12 { "SOAP 1.2, " } else { "" };
            let _ = writeln!(
                doc,
                "Request ({version}action `{}`) to `{}`:\n\n```xml\n{}\n```\n",
                e.action,
                norm.text(&c.url),
                norm.text(&c.request)
            );
            let _ = writeln!(
                doc,
                "Response ({}):\n\n```xml\n{}\n```",
                status_line(c.status),
                show_message(&c.response, norm)
            );
        }
        Captured::Notify(r) => {
            let _ = writeln!(
                doc,
                "The GCS posts it to `{}` (`Content-Type: {}`, `SOAPAction: {}`); the consumer answers with any 2xx status and no body:\n\n```xml\n{}\n```",
                norm.text(&r.url),
                r.content_type.as_deref().unwrap_or("(none)"),
                r.soap_action.as_deref().unwrap_or("(none)"),
                show_message(&r.body, norm)
            );
        }
    }
}

/// Fails when an operation has no example: a new operation cannot be added without one.
fn check_coverage(examples: &[Example]) {
    let has =
        |section: Section, op: &str| examples.iter().any(|e| e.section == section && e.op == op);
    let mut missing = Vec::new();
    for &op in GCS_OPERATIONS {
        match gcs_operation(op) {
            None => missing.push(format!("{op} (no description in gcs_operation())")),
            Some((caller, _)) if !has(caller.section(), op) => missing.push(op.to_string()),
            Some(_) => {}
        }
    }
    let others: [(&[&str], Section); 4] = [
        (CTS_OPERATIONS, Section::Cts),
        (wsrf::RP_OPERATIONS, Section::Rp),
        (&["SetTerminationTime", "Destroy"], Section::Rl),
        (
            &[
                "Subscribe",
                "Notify",
                "Renew",
                "Unsubscribe",
                "GetCurrentMessage",
            ],
            Section::Wsn,
        ),
    ];
    for (ops, section) in others {
        for op in ops {
            if !has(section, op) {
                missing.push(format!("{op} ({})", section.title()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "no example in tests/tests/gcs/examples.rs for: {}",
        missing.join(", ")
    );
}

const INTRO: &str = "# SOAP operations: examples

<!-- Generated by tests/tests/gcs/examples.rs; do not edit. To regenerate:
     GCA_UPDATE_DOCS=1 scripts/test -E 'test(soap_operations)' -->

An example request and response for every SOAP operation of the Grid Checkpoint Service (GCS)
and of the Checkpoint Translation Service (CTS), the WSRF and WS-BaseNotification operations,
the notification a consumer receives, and the faults. The examples are not written by hand:
the test `soap_operations_reference` (`tests/tests/gcs/examples.rs`) sends each request as shown
to a real GCS on PostgreSQL, with a real CTS (application-level driver) running a real job,
validates every request, response and notification against `schemas/gca.xsd` and the OASIS
schemas it imports, and fails when this file no longer matches what the services answer.
`README.md` has the overview; the WSDLs are `schemas/gcs.wsdl` and `schemas/cts.wsdl`
(`GET …/GridCheckpointService?wsdl`).

## Conventions

- **Endpoint.** `POST http://gcs.example.org:8080/wsrf/services/GridCheckpointService`. Jobs,
  checkpoint records, CTS instances and subscriptions are WS-Resources with their own addresses
  below it (`…/jobs/{gid}`, `…/checkpoints/{id}`, `…/instances/{name}`,
  `…/subscriptions/{id}`), returned in `gca:EndpointReference` elements.
- **SOAP.** 1.1 with `Content-Type: text/xml` (the examples) or 1.2 with
  `Content-Type: application/soap+xml` ([SOAP 1.2](#soap-12)), document/literal, UTF-8.
- **WS-Addressing 1.0.** A request names its operation with `wsa:Action` (or the HTTP
  `SOAPAction` header in 1.1, the `action` parameter in 1.2; when both are given they must be
  equal) and should carry a `wsa:MessageID`; `wsa:To` is optional. The response carries the
  response action, its own `wsa:MessageID` and `wsa:RelatesTo` the request's.
- **Actions.** The GCS's operations: `urn:gca:v1/GridCheckpointService/{Operation}Request`, answered
  with `…/{Operation}Response`; the CTS's: `urn:gca:v1/CheckpointTranslationService/…`; WSRF and
  WS-BaseNotification: the OASIS actions, given with each example; every fault:
  `http://docs.oasis-open.org/wsrf/fault`.
- **Messages.** Elements are in `urn:gca:v1` (prefix `gca` here; any prefix will do), in the
  order `schemas/gca.xsd` declares them. Times are `xsd:dateTime` in UTC, durations
  `xsd:duration`.
- **The setting.** The GCS knows the built-in class `basic` and `migratable`, the CTS type
  `app-level` (`schemas/examples/app-level-cts.xml`), the instance `cts-a` (a running CTS on
  `node-a`) and `cts-b` (on `node-b`). `job-42` runs under `cts-a` and is checkpointed twice;
  `job-43` ran under `cts-b`, which reported one checkpoint and its end.
- **Stable values.** Addresses, times and generated IDs differ from run to run; here the
  servers are `gcs.example.org:8080`, `cts-a.example.org:8090` and `broker.example.org:9000`
  (the consumer), the run starts at 2026-11-22T12:00:00Z (later times keep their distance from
  it, in whole hours), generated UUIDs are `00000000-0000-4000-8000-…`, the images cts-a takes
  `cts-a-20261122T120000Z-…` with digests `sha256:0…`, and the job's PID `12345`.
";

// ---------------------------------------------------------------------------------------------
// The session

fn fast(c: &mut gcs::Config) {
    c.allow_private_consumers = true;
    c.notify_poll_millis = 100;
    c.notify_retry_base_millis = 100;
    c.notify_retry_max_secs = 1;
}

fn text_of(el: &Element, name: &str) -> String {
    el.opt_text(ns::GCA, name).unwrap_or_default()
}

/// Validates every message of the session against gca.xsd and the OASIS schemas with
/// `tests/python/check_schemas.py --instances`.
async fn validate(examples: &[Example]) {
    let dir = tempfile::Builder::new()
        .prefix("soap-examples")
        .tempdir()
        .unwrap();
    let mut files = 0;
    for (n, e) in examples.iter().enumerate() {
        let mut write = |what: &str, text: &str| {
            let name = format!("{n:03}-{}-{what}.xml", e.op);
            std::fs::write(dir.path().join(name), text).unwrap();
            files += 1;
        };
        match &e.captured {
            Captured::Call(c) => {
                write("request", &c.request);
                write("response", &c.response);
            }
            Captured::Notify(r) => write("notify", &r.body),
        }
    }
    let stdout = run_python(
        "check_schemas.py",
        &[std::ffi::OsStr::new("--instances"), dir.path().as_os_str()],
    )
    .await;
    let validated = stdout
        .lines()
        .filter(|l| l.starts_with("PASS  instance "))
        .count();
    assert_eq!(
        validated, files,
        "not every message was validated:\n{stdout}"
    );
}

#[tokio::test]
async fn soap_operations_reference_is_generated_from_real_exchanges() {
    let start = Utc::now();
    let gcs = TestGcs::start_with(fast).await;
    let consumer = Consumer::start().await;
    let service = gcs.endpoint();
    let mut rec = Recorder {
        examples: Vec::new(),
        next_message: 0,
        as_cts: None,
    };

    // Admin: a class and the application-level CTS type.
    let r = rec
        .gcs(
            &gcs,
            "RegisterCheckpointerClass",
            r#"
            <gca:RegisterCheckpointerClass>
              <gca:CheckpointerClass>
                <gca:Name>migratable</gca:Name>
                <gca:Description>Jobs that can be recovered on another computing resource</gca:Description>
                <gca:Property>
                  <gca:Name>recover-on-other-resource</gca:Name>
                  <gca:Value>true</gca:Value>
                </gca:Property>
              </gca:CheckpointerClass>
            </gca:RegisterCheckpointerClass>"#,
        )
        .await
        .expect("RegisterCheckpointerClass");
    assert_eq!(text_of(&r, "Outcome"), "created");

    let descriptor = APP_DESCRIPTOR
        .lines()
        .skip_while(|l| !l.starts_with("<CTSDescriptor"))
        .collect::<Vec<_>>()
        .join("\n");
    let body = format!(
        "<gca:RegisterCTSDescriptor>\n{}\n</gca:RegisterCTSDescriptor>",
        descriptor
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let r = rec
        .gcs(&gcs, "RegisterCTSDescriptor", &body)
        .await
        .expect("RegisterCTSDescriptor");
    assert_eq!(text_of(&r, "Outcome"), "created");

    // cts-a: a real CTS, which registers its instance itself.
    let cts = TestCts::registered(
        &gcs,
        "cts-a",
        "app-level",
        APP_DRIVER,
        "heartbeat_secs = 3600\ngcs_wait_secs = 30\nresource = \"node-a\"\nexecution_manager = \"https://node-a.example.org/wsrf/services/ManagedJobFactoryService\"",
    )
    .await;
    let cts_endpoint = format!("{}{}", cts.url, ns::CTS_SERVICE_PATH);

    // cts-b, as a CTS on node-b would register.
    let r = rec
        .gcs(
            &gcs,
            "RegisterCTSInstance",
            r#"
            <gca:RegisterCTSInstance>
              <gca:CTSInstance>
                <gca:Name>cts-b</gca:Name>
                <gca:Type>app-level</gca:Type>
                <gca:URL>http://cts-b.example.org:8090/wsrf/services/CheckpointTranslationService</gca:URL>
                <gca:ExecutionManager>https://node-b.example.org/wsrf/services/ManagedJobFactoryService</gca:ExecutionManager>
                <gca:Resource>node-b</gca:Resource>
              </gca:CTSInstance>
            </gca:RegisterCTSInstance>"#,
        )
        .await
        .expect("RegisterCTSInstance");
    assert_eq!(text_of(&r, "Outcome"), "created");

    // A broker subscribes to job-42's checkpoints.
    let consumer_url = consumer.url.clone();
    let subscribe = format!(
        r#"
        <wsnt:Subscribe>
          <wsnt:ConsumerReference>
            <wsa:Address>{consumer_url}</wsa:Address>
            <wsa:ReferenceParameters>
              <b:SubscriberKey xmlns:b="urn:example:broker">broker-7</b:SubscriberKey>
            </wsa:ReferenceParameters>
          </wsnt:ConsumerReference>
          <wsnt:Filter>
            <wsnt:TopicExpression Dialect="{}">gca:CheckpointTaken</wsnt:TopicExpression>
            <gca:GID>job-42</gca:GID>
          </wsnt:Filter>
          <wsnt:InitialTerminationTime>PT2H</wsnt:InitialTerminationTime>
        </wsnt:Subscribe>"#,
        wsn::SIMPLE_DIALECT
    );
    let r = rec
        .send(
            Section::Wsn,
            "Subscribe",
            "Subscribe",
            "A broker subscribes a consumer at the GCS (or at a job's address: only that job's events) to one or more topics (`gca:CheckpointTaken`, `gca:JobRegistered`, `gca:JobRecovered`, `gca:JobFinished`, `gca:CTSRegistered`, `gca:CTSLost`; none means all), optionally for one GID, until a time or for a duration (`InitialTerminationTime`; default one day). The answer is the subscription's EPR.",
            Request::new(&service, wsn::SUBSCRIBE_REQUEST, &subscribe),
        )
        .await
        .expect("Subscribe");
    let subscription = r
        .child(ns::WSNT, "SubscriptionReference")
        .and_then(|s| s.opt_text(ns::WSA, "Address"))
        .expect("the subscription's address");
    assert!(subscription.starts_with(&format!("{service}/subscriptions/")));

    // job-42: a real process under cts-a, registered through the CTS's local socket.
    let job = TestJob::after_registration(cts.dir.path(), JOB_SCRIPT, &[]);
    job.start(&cts.register("job-42", job.pid).await);
    job.wait_for_values(1).await;

    // job-43 under cts-b: what that CTS would report.
    let r = rec
        .gcs(
            &gcs,
            "RegisterJob",
            r#"
            <gca:RegisterJob>
              <gca:GID>job-43</gca:GID>
              <gca:CTSInstance>cts-b</gca:CTSInstance>
              <gca:LocalID>7781</gca:LocalID>
              <gca:Recovery>false</gca:Recovery>
            </gca:RegisterJob>"#,
        )
        .await
        .expect("RegisterJob");
    assert_eq!(text_of(&r, "Outcome"), "created");
    let taken_at = (Utc::now() - chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    // What cts-b signs with its key: the image's identity and owner.
    let signature = signed(gca_protocol::messages::CheckpointRecord {
        id: CTS_B_IMAGE.into(),
        gid: "job-43".into(),
        cts_name: "cts-b".into(),
        cts_type: "app-level".into(),
        digest: Some(CTS_B_DIGEST.into()),
        owner: Some(gca_protocol::messages::ImageOwner {
            uid: 1000,
            gid: 1000,
        }),
        ..integration_tests::checkpoint_record(CTS_B_IMAGE, "job-43", "cts-b")
    })
    .signature
    .expect("signed");
    let r = rec
        .gcs(
            &gcs,
            "RegisterCheckpoint",
            &format!(
                r#"
                <gca:RegisterCheckpoint>
                  <gca:Checkpoint>
                    <gca:CheckpointID>{CTS_B_IMAGE}</gca:CheckpointID>
                    <gca:GID>job-43</gca:GID>
                    <gca:CTSName>cts-b</gca:CTSName>
                    <gca:CTSType>app-level</gca:CTSType>
                    <gca:TakenAt>{taken_at}</gca:TakenAt>
                    <gca:ImageName>http://cts-b.example.org:8090/images/{CTS_B_IMAGE}</gca:ImageName>
                    <gca:ExecutionManager>https://node-b.example.org/wsrf/services/ManagedJobFactoryService</gca:ExecutionManager>
                    <gca:SizeBytes>5242880</gca:SizeBytes>
                    <gca:Digest>{CTS_B_DIGEST}</gca:Digest>
                    <gca:Origin>periodic</gca:Origin>
                    <gca:JobStopped>false</gca:JobStopped>
                    <gca:Owner>
                      <gca:UID>1000</gca:UID>
                      <gca:GroupID>1000</gca:GroupID>
                    </gca:Owner>
                    <gca:Signature>
                      <gca:Algorithm>{alg}</gca:Algorithm>
                      <gca:Certificate>{cert}</gca:Certificate>
                      <gca:Value>{value}</gca:Value>
                    </gca:Signature>
                    <gca:Location>
                      <gca:Kind>cts</gca:Kind>
                      <gca:Name>cts-b</gca:Name>
                      <gca:URL>http://cts-b.example.org:8090/images/{CTS_B_IMAGE}</gca:URL>
                      <gca:State>stored</gca:State>
                    </gca:Location>
                    <gca:Location>
                      <gca:Kind>object-store</gca:Kind>
                      <gca:Name>s3://gca-images/site-b</gca:Name>
                      <gca:State>pending</gca:State>
                    </gca:Location>
                  </gca:Checkpoint>
                </gca:RegisterCheckpoint>"#,
                alg = signature.algorithm,
                cert = signature.certificate,
                value = signature.value,
            ),
        )
        .await
        .expect("RegisterCheckpoint");
    let ck = r.child(ns::GCA, "Checkpoint").expect("Checkpoint");
    assert_eq!(text_of(ck, "SequenceNumber"), "1");
    // Its durability is async: the upload ends after the record, and cts-b says so.
    rec.as_cts = Some("cts-b".into());
    let r = rec
        .gcs(
            &gcs,
            "SetImageLocation",
            &format!(
                r#"
                <gca:SetImageLocation>
                  <gca:GID>job-43</gca:GID>
                  <gca:CheckpointID>{CTS_B_IMAGE}</gca:CheckpointID>
                  <gca:Location>
                    <gca:Kind>object-store</gca:Kind>
                    <gca:Name>s3://gca-images/site-b</gca:Name>
                    <gca:State>stored</gca:State>
                  </gca:Location>
                </gca:SetImageLocation>"#
            ),
        )
        .await
        .expect("SetImageLocation");
    let states: Vec<String> = r
        .children_named(ns::GCA, "Location")
        .map(|l| text_of(l, "State"))
        .collect();
    assert_eq!(states, ["stored", "stored"]);
    let r = rec
        .gcs(
            &gcs,
            "JobFinished",
            r#"
            <gca:JobFinished>
              <gca:GID>job-43</gca:GID>
              <gca:CTSInstance>cts-b</gca:CTSInstance>
              <gca:ExitStatus>0</gca:ExitStatus>
            </gca:JobFinished>"#,
        )
        .await
        .expect("JobFinished");
    let j = r.child(ns::GCA, "Job").expect("Job");
    assert_eq!(text_of(j, "State"), "finished");

    // The broker: where to run, then checkpoints.
    let r = rec
        .gcs(
            &gcs,
            "FindCTS",
            r#"
            <gca:FindCTS>
              <gca:CheckpointerClass>basic</gca:CheckpointerClass>
              <gca:Property>
                <gca:Name>level</gca:Name>
                <gca:Value>application</gca:Value>
              </gca:Property>
              <gca:AliveWithinSeconds>300</gca:AliveWithinSeconds>
            </gca:FindCTS>"#,
        )
        .await
        .expect("FindCTS");
    let offers: Vec<String> = r
        .children_named(ns::GCA, "CTS")
        .filter_map(|o| o.child(ns::GCA, "Instance"))
        .map(|i| text_of(i, "Name"))
        .collect();
    // In name order: cts-a, then cts-b.
    assert_eq!(offers, ["cts-a", "cts-b"]);

    let r = rec
        .gcs(
            &gcs,
            "DoCheckpoint",
            r#"
            <gca:DoCheckpoint>
              <gca:GID>job-42</gca:GID>
              <gca:Stop>false</gca:Stop>
            </gca:DoCheckpoint>"#,
        )
        .await
        .expect("DoCheckpoint");
    assert_eq!(text_of(&r, "SequenceNumber"), "1");
    assert_eq!(text_of(&r, "CTSName"), "cts-a");
    let first_image = text_of(&r, "CheckpointID");
    let image = cts.image_files(&first_image);
    assert_eq!(
        std::fs::read_to_string(image.join("state")).expect("the job's state is in the image"),
        "step 42\n"
    );

    // The notification the checkpoint caused.
    let got = consumer.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(got[0].topic_name(), "CheckpointTaken");
    assert_eq!(text_of(&got[0].message, "CheckpointID"), first_image);
    let received = consumer.received().remove(0);
    let header = |name: &str| {
        received
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    rec.examples.push(Example {
        section: Section::Wsn,
        op: "Notify".into(),
        title: "Notify (to the consumer)".into(),
        about: "Each event a subscription matches is posted to its consumer as a one-way SOAP 1.1 message: the subscription, the topic, the producer and the event, which is a `gca:CheckpointTakenEvent` (a checkpoint record), `gca:JobRegisteredEvent`, `gca:JobRecoveredEvent`, `gca:JobFinishedEvent` (a job), `gca:CTSRegisteredEvent` or `gca:CTSLostEvent` (an instance). The consumer reference's parameters come back as headers. Failed deliveries are retried with exponential backoff; a consumer's notifications arrive in order. This one was caused by the `DoCheckpoint` above.".into(),
        action: wsn::NOTIFY.into(),
        captured: Captured::Notify(Received {
            url: consumer.url.clone(),
            soap_action: header("soapaction"),
            content_type: header("content-type"),
            body: received.body.clone(),
        }),
    });

    // The CTS's own operation, as the GCS calls it.
    let r = rec
        .send(
            Section::Cts,
            "DoCheckpoint",
            "DoCheckpoint (CTS)",
            "Checkpoints the job with this GID on this CTS; the GCS sends it when a broker calls `DoCheckpoint`. The CTS takes the image, stores it with its manifest, registers the record at the GCS (`RegisterCheckpoint`, which assigns the sequence number) and answers with the record. Faults: `wsrf-r:ResourceUnknownFault` for a GID it does not run, `gca:ConflictFault` (`checkpoint-in-progress`) while the job's previous checkpoint runs, `gca:OperationFailedFault` when the core checkpointer fails.",
            Request::new(
                &cts_endpoint,
                &ns::request_action(ns::CTS_PORT_TYPE, "DoCheckpoint"),
                r#"
                <gca:DoCheckpoint>
                  <gca:GID>job-42</gca:GID>
                  <gca:Stop>false</gca:Stop>
                </gca:DoCheckpoint>"#,
            ),
        )
        .await
        .expect("the CTS's DoCheckpoint");
    assert_eq!(text_of(&r, "SequenceNumber"), "2");

    let r = rec
        .gcs(
            &gcs,
            "GetCheckpoints",
            r#"
            <gca:GetCheckpoints>
              <gca:GID>job-42</gca:GID>
            </gca:GetCheckpoints>"#,
        )
        .await
        .expect("GetCheckpoints");
    assert_eq!(r.children_named(ns::GCA, "Checkpoint").count(), 2);
    let r = rec
        .gcs(
            &gcs,
            "GetRecoveryInfo",
            r#"
            <gca:GetRecoveryInfo>
              <gca:GID>job-42</gca:GID>
              <gca:Image>latest</gca:Image>
            </gca:GetRecoveryInfo>"#,
        )
        .await
        .expect("GetRecoveryInfo");
    assert_eq!(r.children_named(ns::GCA, "Candidate").count(), 2);
    let r = rec
        .gcs(
            &gcs,
            "AuthorizeRecovery",
            r#"
            <gca:AuthorizeRecovery>
              <gca:GID>job-42</gca:GID>
              <gca:CTSInstance>cts-b</gca:CTSInstance>
            </gca:AuthorizeRecovery>"#,
        )
        .await
        .expect("AuthorizeRecovery");
    assert_eq!(text_of(&r, "CTSInstance"), "cts-b");
    // cts-b starts that recovery, then gives it up (say, the image fails its check there).
    let r = rec
        .gcs(
            &gcs,
            "RegisterJob",
            r#"
            <gca:RegisterJob>
              <gca:GID>job-42</gca:GID>
              <gca:CTSInstance>cts-b</gca:CTSInstance>
              <gca:LocalID>7790</gca:LocalID>
              <gca:Recovery>true</gca:Recovery>
              <gca:State>recovering</gca:State>
            </gca:RegisterJob>"#,
        )
        .await
        .expect("RegisterJob (recovery)");
    assert_eq!(text_of(&r, "Outcome"), "updated");
    let r = rec
        .gcs(
            &gcs,
            "AbandonRecovery",
            r#"
            <gca:AbandonRecovery>
              <gca:GID>job-42</gca:GID>
              <gca:CTSInstance>cts-b</gca:CTSInstance>
            </gca:AbandonRecovery>"#,
        )
        .await
        .expect("AbandonRecovery");
    let j = r.child(ns::GCA, "Job").expect("Job");
    assert_eq!(text_of(j, "CTSInstance"), "cts-a");
    assert_eq!(text_of(j, "State"), "running");
    rec.as_cts = Some("cts-a".into());
    let r = rec
        .gcs(
            &gcs,
            "GetJobKey",
            r#"
            <gca:GetJobKey>
              <gca:GID>job-42</gca:GID>
            </gca:GetJobKey>"#,
        )
        .await
        .expect("GetJobKey");
    assert_eq!(text_of(&r, "GID"), "job-42");
    let r = rec
        .gcs(
            &gcs,
            "GetJob",
            r#"
            <gca:GetJob>
              <gca:GID>job-42</gca:GID>
            </gca:GetJob>"#,
        )
        .await
        .expect("GetJob");
    let j = r.child(ns::GCA, "Job").expect("Job");
    assert_eq!(text_of(j, "LocalID"), job.pid.to_string());
    assert_eq!(text_of(j, "CheckpointCount"), "2");
    let r = rec
        .gcs(
            &gcs,
            "ListJobs",
            r#"
            <gca:ListJobs>
              <gca:Limit>10</gca:Limit>
            </gca:ListJobs>"#,
        )
        .await
        .expect("ListJobs");
    assert_eq!(r.children_named(ns::GCA, "Job").count(), 2);
    let r = rec
        .gcs(
            &gcs,
            "SetRetention",
            r#"
            <gca:SetRetention>
              <gca:GID>job-42</gca:GID>
              <gca:Retention>
                <gca:Keep>last</gca:Keep>
                <gca:KeepLast>2</gca:KeepLast>
                <gca:KeepIn>/home/alice/checkpoints</gca:KeepIn>
              </gca:Retention>
            </gca:SetRetention>"#,
        )
        .await
        .expect("SetRetention");
    let j = r.child(ns::GCA, "Job").expect("Job");
    let retention = j.child(ns::GCA, "Retention").expect("Retention");
    assert_eq!(text_of(retention, "KeepLast"), "2");

    // Admin lists.
    let r = rec
        .gcs(
            &gcs,
            "ListCheckpointerClasses",
            "<gca:ListCheckpointerClasses/>",
        )
        .await
        .expect("ListCheckpointerClasses");
    assert_eq!(r.children_named(ns::GCA, "CheckpointerClass").count(), 2);
    let r = rec
        .gcs(&gcs, "ListCTSTypes", "<gca:ListCTSTypes/>")
        .await
        .expect("ListCTSTypes");
    assert_eq!(r.children_named(ns::GCA, "CTSType").count(), 1);
    let r = rec
        .gcs(&gcs, "ListCTSInstances", "<gca:ListCTSInstances/>")
        .await
        .expect("ListCTSInstances");
    assert_eq!(r.children_named(ns::GCA, "CTSInstance").count(), 2);

    // WS-ResourceProperties on each kind of resource.
    let job_url = format!("{service}/jobs/job-42");
    let instance_url = format!("{service}/instances/cts-a");
    let rp = wsrf::rp_request_action;
    let doc_action = rp("GetResourcePropertyDocument");
    let doc_body = "<wsrf-rp:GetResourcePropertyDocument/>";
    let r = rec
        .send(
            Section::Rp,
            "GetResourcePropertyDocument",
            "GetResourcePropertyDocument: the GCS",
            "The GCS's whole resource property document, `gca:GCSResourceProperties`: the registry (classes, CTS types, CTS instances with their EPRs), counts, the query dialect, the time, its WS-ServiceGroup view of the CTS instances (`wsrf-sg:Entry`) and the NotificationProducer properties (topics, dialects).",
            Request::new(&service, &doc_action, doc_body),
        )
        .await
        .expect("the GCS's document");
    let d = r
        .child(ns::GCA, "GCSResourceProperties")
        .expect("GCSResourceProperties");
    assert_eq!(text_of(d, "JobCount"), "2");
    assert_eq!(text_of(d, "CheckpointCount"), "3");
    let r = rec
        .send(
            Section::Rp,
            "GetResourcePropertyDocument",
            "GetResourcePropertyDocument: a job",
            "A job's document, `gca:JobResourceProperties`: its fields, its checkpoint records in sequence order, and its WS-ResourceLifetime times (`wsrf-rl:TerminationTime` nil: none set).",
            Request::new(&job_url, &doc_action, doc_body),
        )
        .await
        .expect("the job's document");
    assert_eq!(
        r.child(ns::GCA, "JobResourceProperties")
            .map(|d| d.children_named(ns::GCA, "Checkpoint").count()),
        Some(2)
    );
    let r = rec
        .send(
            Section::Rp,
            "GetResourcePropertyDocument",
            "GetResourcePropertyDocument: a checkpoint record, by reference parameter",
            "A checkpoint record's document, `gca:CheckpointResourceProperties`. This request goes to the service address and names the resource by echoing its EPR's reference parameter as a header, as WS-Addressing clients do; posting to `…/checkpoints/{id}` is the same.",
            Request {
                headers: &format!(
                    r#"<gca:ResourceID wsa:IsReferenceParameter="true" Kind="checkpoints">{first_image}</gca:ResourceID>"#
                ),
                ..Request::new(&service, &doc_action, doc_body)
            },
        )
        .await
        .expect("the checkpoint's document");
    let d = r
        .child(ns::GCA, "CheckpointResourceProperties")
        .expect("CheckpointResourceProperties");
    assert_eq!(text_of(d, "CheckpointID"), first_image);
    let r = rec
        .send(
            Section::Rp,
            "GetResourcePropertyDocument",
            "GetResourcePropertyDocument: a CTS instance",
            "A CTS instance's document, `gca:CTSInstanceResourceProperties`: the instance as registered and when it was last heard from.",
            Request::new(&instance_url, &doc_action, doc_body),
        )
        .await
        .expect("the instance's document");
    assert!(r.child(ns::GCA, "CTSInstanceResourceProperties").is_some());
    let r = rec
        .send(
            Section::Rp,
            "GetResourcePropertyDocument",
            "GetResourcePropertyDocument: a subscription",
            "A subscription's document, `gca:SubscriptionResourceProperties`: the consumer reference and filter as subscribed, when it was created, and its WS-ResourceLifetime times.",
            Request::new(&subscription, &doc_action, doc_body),
        )
        .await
        .expect("the subscription's document");
    assert!(r.child(ns::GCA, "SubscriptionResourceProperties").is_some());
    let r = rec
        .send(
            Section::Rp,
            "GetResourceProperty",
            "GetResourceProperty: a job's state",
            "One property of a resource, by QName (a declared prefix, an undeclared well-known one such as `gca:`, `{urn:gca:v1}State`, or a local name that names one property): every element of that name in the document.",
            Request::new(
                &job_url,
                &rp("GetResourceProperty"),
                "<wsrf-rp:GetResourceProperty>gca:State</wsrf-rp:GetResourceProperty>",
            ),
        )
        .await
        .expect("GetResourceProperty");
    assert_eq!(text_of(&r, "State"), "running");
    let r = rec
        .send(
            Section::Rp,
            "GetResourceProperty",
            "GetResourceProperty: the GCS's topics",
            "The GCS's NotificationProducer properties: one `wsnt:TopicExpression` per topic it offers. (The WS-ServiceGroup view, `wsrf-sg:Entry`, is read the same way; it is left out here because `sg-2.xsd` is not among the OASIS schemas the examples are validated with.)",
            Request::new(
                &service,
                &rp("GetResourceProperty"),
                "<wsrf-rp:GetResourceProperty>wsnt:TopicExpression</wsrf-rp:GetResourceProperty>",
            ),
        )
        .await
        .expect("GetResourceProperty wsnt:TopicExpression");
    assert_eq!(r.children_named(ns::WSNT, "TopicExpression").count(), 6);
    let r = rec
        .send(
            Section::Rp,
            "GetMultipleResourceProperties",
            "GetMultipleResourceProperties: a job",
            "Several properties at once, in the order asked for.",
            Request::new(
                &job_url,
                &rp("GetMultipleResourceProperties"),
                r#"
                <wsrf-rp:GetMultipleResourceProperties>
                  <wsrf-rp:ResourceProperty>gca:LatestCheckpoint</wsrf-rp:ResourceProperty>
                  <wsrf-rp:ResourceProperty>gca:CheckpointCount</wsrf-rp:ResourceProperty>
                  <wsrf-rp:ResourceProperty>wsrf-rl:TerminationTime</wsrf-rp:ResourceProperty>
                </wsrf-rp:GetMultipleResourceProperties>"#,
            ),
        )
        .await
        .expect("GetMultipleResourceProperties");
    assert_eq!(text_of(&r, "CheckpointCount"), "2");
    let r = rec
        .send(
            Section::Rp,
            "QueryResourceProperties",
            "QueryResourceProperties: a job, elements",
            "An XPath 1.0 query (the only dialect, `http://www.w3.org/TR/1999/REC-xpath-19991116`) over the resource property document, with the document node as context. A node-set comes back as its elements.",
            Request::new(
                &job_url,
                &rp("QueryResourceProperties"),
                &format!(
                    r#"
                    <wsrf-rp:QueryResourceProperties>
                      <wsrf-rp:QueryExpression Dialect="{}">//gca:Checkpoint[gca:SequenceNumber=2]/gca:TakenAt</wsrf-rp:QueryExpression>
                    </wsrf-rp:QueryResourceProperties>"#,
                    wsrf::XPATH_DIALECT
                ),
            ),
        )
        .await
        .expect("QueryResourceProperties");
    assert!(r.child(ns::GCA, "TakenAt").is_some());
    let r = rec
        .send(
            Section::Rp,
            "QueryResourceProperties",
            "QueryResourceProperties: the GCS",
            "On the GCS's document: the addresses of the CTS instances on one resource. (Each instance is in the document twice, as `gca:CTSInstanceEntry` and inside its `wsrf-sg:Entry`, so this query starts at the root instead of with `//`.)",
            Request::new(
                &service,
                &rp("QueryResourceProperties"),
                &format!(
                    r#"
                    <wsrf-rp:QueryResourceProperties>
                      <wsrf-rp:QueryExpression Dialect="{}">/gca:GCSResourceProperties/gca:CTSInstanceEntry[gca:Resource='node-b']/gca:URL</wsrf-rp:QueryExpression>
                    </wsrf-rp:QueryResourceProperties>"#,
                    wsrf::XPATH_DIALECT
                ),
            ),
        )
        .await
        .expect("QueryResourceProperties on the GCS");
    assert_eq!(
        text_of(&r, "URL"),
        "http://cts-b.example.org:8090/wsrf/services/CheckpointTranslationService"
    );

    // WS-BaseNotification: the subscription manager, and the producer's one fault.
    let r = rec
        .send(
            Section::Wsn,
            "Renew",
            "Renew",
            "The subscriber moves the subscription's termination time: a time or a duration from now (`xsi:nil=\"true\"`: never). Sent to the subscription's address.",
            Request::new(
                &subscription,
                wsn::RENEW_REQUEST,
                r#"
                <wsnt:Renew>
                  <wsnt:TerminationTime>PT4H</wsnt:TerminationTime>
                </wsnt:Renew>"#,
            ),
        )
        .await
        .expect("Renew");
    assert!(r.child(ns::WSNT, "TerminationTime").is_some());
    let f = rec
        .send(
            Section::Wsn,
            "GetCurrentMessage",
            "GetCurrentMessage",
            "WS-BaseNotification's pull of the last message on a topic. The GCS keeps no last message, so the answer is always `wsnt:NoCurrentMessageOnTopicFault`; subscribe instead.",
            Request::new(
                &service,
                wsn::GET_CURRENT_MESSAGE_REQUEST,
                &format!(
                    r#"
                    <wsnt:GetCurrentMessage>
                      <wsnt:Topic Dialect="{}">gca:CheckpointTaken</wsnt:Topic>
                    </wsnt:GetCurrentMessage>"#,
                    wsn::SIMPLE_DIALECT
                ),
            ),
        )
        .await
        .expect_err("GetCurrentMessage is a fault");
    assert_eq!(f.kind, FaultKind::NoCurrentMessageOnTopic);

    // One fault of each family.
    let f = rec
        .send(
            Section::Faults,
            "GetJob",
            "wsrf-r:ResourceUnknownFault: an unknown GID",
            "Any operation naming a GID, checkpoint, class, type or instance the GCS does not know, and any request to a WS-Resource that does not exist (or no longer does).",
            Request::new(
                &service,
                &ns::request_action(ns::GCS_PORT_TYPE, "GetJob"),
                r#"
                <gca:GetJob>
                  <gca:GID>job-99</gca:GID>
                </gca:GetJob>"#,
            ),
        )
        .await
        .expect_err("unknown GID");
    assert_eq!(f.kind, FaultKind::ResourceUnknown);
    let f = rec
        .send(
            Section::Faults,
            "GetResourceProperty",
            "wsrf-rp:InvalidResourcePropertyQNameFault: no such property",
            "WS-RP: a QName that names no property of the resource. The other WS-RP and WS-RL faults (`InvalidQueryExpressionFault`, `QueryEvaluationErrorFault`, `UnknownQueryExpressionDialectFault`, `UnableToSetTerminationTimeFault`, `ResourceNotDestroyedFault`) look the same.",
            Request::new(
                &job_url,
                &rp("GetResourceProperty"),
                "<wsrf-rp:GetResourceProperty>gca:Owner</wsrf-rp:GetResourceProperty>",
            ),
        )
        .await
        .expect_err("unknown property");
    assert_eq!(f.kind, FaultKind::InvalidResourcePropertyQName);
    let f = rec
        .send(
            Section::Faults,
            "Subscribe",
            "wsnt:TopicNotSupportedFault: an unknown topic",
            "WS-BaseNotification faults are the b-2 ones: `TopicNotSupportedFault`, `TopicExpressionDialectUnknownFault`, `InvalidTopicExpressionFault`, `InvalidFilterFault`, `UnacceptableInitialTerminationTimeFault`, `SubscribeCreationFailedFault`, and at a subscription `UnacceptableTerminationTimeFault` or `wsrf-r:ResourceUnknownFault`.",
            Request::new(
                &service,
                wsn::SUBSCRIBE_REQUEST,
                &format!(
                    r#"
                    <wsnt:Subscribe>
                      <wsnt:ConsumerReference>
                        <wsa:Address>{consumer_url}</wsa:Address>
                      </wsnt:ConsumerReference>
                      <wsnt:Filter>
                        <wsnt:TopicExpression Dialect="{}">gca:CheckpointLost</wsnt:TopicExpression>
                      </wsnt:Filter>
                    </wsnt:Subscribe>"#,
                    wsn::SIMPLE_DIALECT
                ),
            ),
        )
        .await
        .expect_err("unknown topic");
    assert_eq!(f.kind, FaultKind::TopicNotSupported);
    let f = rec
        .send(
            Section::Faults,
            "DoCheckpoint",
            "gca:ConflictFault: a job that has finished",
            "A request that contradicts what is registered: a checkpoint of a job that is finished, stopped or being recovered, a registration that differs from the existing one, removing an instance that still runs jobs.",
            Request::new(
                &service,
                &ns::request_action(ns::GCS_PORT_TYPE, "DoCheckpoint"),
                r#"
                <gca:DoCheckpoint>
                  <gca:GID>job-43</gca:GID>
                  <gca:Stop>false</gca:Stop>
                </gca:DoCheckpoint>"#,
            ),
        )
        .await
        .expect_err("a finished job");
    assert_eq!(f.kind, FaultKind::Conflict);

    // SOAP 1.2.
    let r = rec
        .send(
            Section::Soap12,
            "ListCheckpointerClasses",
            "ListCheckpointerClasses over SOAP 1.2",
            "The same operation as above; the response is a SOAP 1.2 envelope with `Content-Type: application/soap+xml` and the response action in its `action` parameter.",
            Request {
                soap12: true,
                ..Request::new(
                    &service,
                    &ns::request_action(ns::GCS_PORT_TYPE, "ListCheckpointerClasses"),
                    "<gca:ListCheckpointerClasses/>",
                )
            },
        )
        .await
        .expect("SOAP 1.2");
    assert_eq!(r.children_named(ns::GCA, "CheckpointerClass").count(), 2);
    let f = rec
        .send(
            Section::Soap12,
            "GetCheckpoints",
            "A fault over SOAP 1.2",
            "`env:Sender` for faults of the request (unknown resources, invalid requests, conflicts), `env:Receiver` for failures of the service or a CTS; the detail is the same WS-BaseFaults element.",
            Request {
                soap12: true,
                ..Request::new(
                    &service,
                    &ns::request_action(ns::GCS_PORT_TYPE, "GetCheckpoints"),
                    r#"
                    <gca:GetCheckpoints>
                      <gca:GID>job-99</gca:GID>
                    </gca:GetCheckpoints>"#,
                )
            },
        )
        .await
        .expect_err("SOAP 1.2 fault");
    assert_eq!(f.kind, FaultKind::ResourceUnknown);

    // Ending things.
    let r = rec
        .send(
            Section::Wsn,
            "Unsubscribe",
            "Unsubscribe",
            "Ends the subscription at once: its undelivered notifications are dropped and its address is unknown from now on.",
            Request::new(&subscription, wsn::UNSUBSCRIBE_REQUEST, "<wsnt:Unsubscribe/>"),
        )
        .await
        .expect("Unsubscribe");
    assert!(r.is(ns::WSNT, "UnsubscribeResponse"));
    rec.gcs(
        &gcs,
        "UnregisterCTS",
        r#"
        <gca:UnregisterCTS>
          <gca:Instance>cts-b</gca:Instance>
        </gca:UnregisterCTS>"#,
    )
    .await
    .expect("UnregisterCTS");
    let r = rec
        .send(
            Section::Rl,
            "SetTerminationTime",
            "SetTerminationTime",
            "Schedules the end of a job's WS-Resource: `RequestedLifetimeDuration` (from now) or `RequestedTerminationTime` (`xsi:nil=\"true\"`: none). When the time comes the job is destroyed as by `Destroy`; a time not in the future destroys it at once.",
            Request::new(
                &job_url,
                wsrf::RL_SET_TERMINATION_TIME_REQUEST,
                r#"
                <wsrf-rl:SetTerminationTime>
                  <wsrf-rl:RequestedLifetimeDuration>PT2H</wsrf-rl:RequestedLifetimeDuration>
                </wsrf-rl:SetTerminationTime>"#,
            ),
        )
        .await
        .expect("SetTerminationTime");
    assert!(r.child(ns::WSRF_RL, "NewTerminationTime").is_some());
    let r = rec
        .send(
            Section::Rl,
            "Destroy",
            "Destroy",
            "Ends a job's WS-Resource now: the job is `finished` at the GCS (a `gca:JobFinished` event), its retention policy applies to its images (here: the newest two move to `/home/alice/checkpoints`), and its address answers `wsrf-r:ResourceUnknownFault` from then on.",
            Request::new(
                &job_url,
                wsrf::RL_DESTROY_REQUEST,
                "<wsrf-rl:Destroy/>",
            ),
        )
        .await
        .expect("Destroy");
    assert!(r.is(ns::WSRF_RL, "DestroyResponse"));

    validate(&rec.examples).await;

    let port = |url: &str| {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .expect("an http(s) URL");
        rest.split('/').next().unwrap().to_string()
    };
    let mut norm = Normalizer::new(
        start,
        vec![
            (port(&gcs.url), GCS_HOST),
            (port(&cts.url), CTS_A_HOST),
            (port(&consumer.url), CONSUMER_HOST),
        ],
        job.pid,
    );
    let doc = render(&rec.examples, &mut norm);
    if std::env::var("GCA_UPDATE_DOCS").as_deref() == Ok("1") {
        std::fs::write(DOC_PATH, &doc).expect("write docs/soap-operations.md");
        return;
    }
    let current = std::fs::read_to_string(DOC_PATH).unwrap_or_default();
    if current != doc {
        let line = current
            .lines()
            .zip(doc.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| current.lines().count().min(doc.lines().count()));
        panic!(
            "docs/soap-operations.md is out of date (first difference at line {}):\n  checked in: {:?}\n  now:        {:?}\nIf the change is intended, regenerate it with\n  {REGENERATE}\nand review the diff.",
            line + 1,
            current.lines().nth(line).unwrap_or("(end of file)"),
            doc.lines().nth(line).unwrap_or("(end of file)"),
        );
    }
}

/// The normalization is narrow: it replaces volatile values, and leaves fixed ones alone.
#[test]
fn soap_operations_normalization_is_narrow() {
    let start: DateTime<Utc> = "2031-05-04T09:10:00Z".parse().unwrap();
    let mut n = Normalizer::new(start, vec![("127.0.0.1:41234".into(), GCS_HOST)], 4711);
    assert_eq!(
        n.text("http://127.0.0.1:41234/wsrf/services/GridCheckpointService"),
        "http://gcs.example.org:8080/wsrf/services/GridCheckpointService"
    );
    // Near the start: base time plus whole hours, with the original precision.
    assert_eq!(
        n.text("2031-05-04T09:10:07.123456Z"),
        "2026-11-22T12:00:00.000000Z"
    );
    assert_eq!(n.text("2031-05-04T11:10:09Z"), "2026-11-22T14:00:00Z");
    // Far from it: a value someone chose.
    assert_eq!(n.text("2001-01-01T00:00:00Z"), "2001-01-01T00:00:00Z");
    // Generated UUIDs get numbers in order of appearance, the same number each time.
    let a = "urn:uuid:5f0c1e2d-3b4a-4c5d-8e6f-7a8b9c0d1e2f";
    assert_eq!(n.text(a), "urn:uuid:00000000-0000-4000-8000-000000000001");
    assert_eq!(
        n.text("…/subscriptions/9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"),
        "…/subscriptions/00000000-0000-4000-8000-000000000002"
    );
    assert_eq!(n.text(a), "urn:uuid:00000000-0000-4000-8000-000000000001");
    // The requests' own message IDs stay.
    let ours = "urn:uuid:00000000-0000-0000-0000-000000000007";
    assert_eq!(n.text(ours), ours);
    // The real CTS's image IDs and digests; cts-b's fixed ones stay.
    assert_eq!(
        n.text("http://x/images/cts-a-20310504T091001Z-0123456789ab"),
        "http://x/images/cts-a-20261122T120000Z-000000000001"
    );
    assert_eq!(n.text(CTS_B_IMAGE), CTS_B_IMAGE);
    assert_eq!(n.text(CTS_B_DIGEST), CTS_B_DIGEST);
    let d = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(n.text(&d), format!("sha256:{}1", "0".repeat(63)));
    // The PID only in gca:LocalID.
    let mut el = xml::parse(
        "<gca:Job xmlns:gca=\"urn:gca:v1\"><gca:LocalID>4711</gca:LocalID><gca:Recoveries>4711</gca:Recoveries></gca:Job>",
    )
    .unwrap();
    n.tree(&mut el);
    assert_eq!(text_of(&el, "LocalID"), PID_SHOWN);
    assert_eq!(text_of(&el, "Recoveries"), "4711");
}

#[test]
fn soap_operations_indenting_keeps_the_message() {
    let text = "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:gca=\"urn:gca:v1\"><s:Body><gca:X a=\"1 &amp; &quot;2&quot;\"><gca:Y>a &lt; b</gca:Y><gca:Z/><c:K xmlns:c=\"urn:c\" xml:lang=\"en\">k</c:K></gca:X></s:Body></s:Envelope>";
    let el = xml::parse(text).unwrap();
    let shown = pretty(&el);
    assert_eq!(
        shown,
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:gca=\"urn:gca:v1\">\n  <s:Body>\n    <gca:X a=\"1 &amp; &quot;2&quot;\">\n      <gca:Y>a &lt; b</gca:Y>\n      <gca:Z/>\n      <c:K xmlns:c=\"urn:c\" xml:lang=\"en\">k</c:K>\n    </gca:X>\n  </s:Body>\n</s:Envelope>"
    );
    assert_eq!(canonical(&xml::parse(&shown).unwrap()), canonical(&el));
}
