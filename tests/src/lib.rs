//! Shared test harness: real GCS servers on port 0 over per-test PostgreSQL databases, SOAP
//! and JSON clients, and a small CTS that speaks the real CTS protocol.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use gca_protocol::client::{JsonClient, SoapClient};
use gca_protocol::fault::Fault;
use gca_protocol::identity::{Authenticator, Caller};
use gca_protocol::messages::*;
use gca_protocol::ops::{CtsDoCheckpointOp, Operation, RegisterCheckpointOp};
use gca_protocol::soap;
use gca_protocol::transport;
use tokio::sync::oneshot;

pub mod consumer;
pub mod cts;
pub mod db;
pub mod garage;
pub mod gridengine;
pub mod pki;
pub mod process;
pub mod slurm;
pub mod wrappers;

pub const CRIU_DESCRIPTOR: &str = include_str!("../../schemas/examples/criu-cts.xml");
pub const APP_DESCRIPTOR: &str = include_str!("../../schemas/examples/app-level-cts.xml");
pub const VMM_DESCRIPTOR: &str = include_str!("../../schemas/examples/vmm-cts.xml");

pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// An HTTP client that trusts the test site CA and presents the test admin's certificate.
pub fn http() -> reqwest::Client {
    pki::pki().client(pki::ADMIN)
}

/// An HTTP client presenting `id`'s certificate (`role:name`).
pub fn http_as(id: &str) -> reqwest::Client {
    pki::pki().client(id)
}

/// Who the harness calls an operation as by default: the CTS a CTS-facing request speaks
/// for, else the test admin (the authorization tests choose their callers themselves).
pub trait Actor {
    fn actor(&self) -> String {
        pki::ADMIN.to_string()
    }
}

macro_rules! admin_actor {
    ($($t:ty),*) => { $(impl Actor for $t {})* };
}
admin_actor!(
    DoCheckpoint,
    FindCts,
    GidRequest,
    GetCheckpoints,
    GetRecoveryInfo,
    AuthorizeRecovery,
    ListJobs,
    SetRetention,
    RegisterCheckpointerClass,
    RegisterCtsDescriptor,
    UnregisterCts,
    ListRequest
);

impl Actor for RegisterCtsInstance {
    fn actor(&self) -> String {
        pki::cts(&self.instance.name)
    }
}
impl Actor for RegisterJob {
    fn actor(&self) -> String {
        pki::cts(&self.cts_instance)
    }
}
impl Actor for RegisterCheckpoint {
    fn actor(&self) -> String {
        pki::cts(&self.checkpoint.cts_name)
    }
}
impl Actor for JobFinished {
    fn actor(&self) -> String {
        pki::cts(&self.cts_instance)
    }
}

/// A GCS server running in this process.
pub struct TestGcs {
    pub addr: SocketAddr,
    pub url: String,
    pub database_url: String,
    pub pool: sqlx::PgPool,
    pub soap: SoapClient,
    pub json: JsonClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestGcs {
    /// A GCS on a fresh, migrated database.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut gcs::Config)) -> Self {
        init_tracing();
        let database_url = db::fresh_database_url().await;
        Self::start_on(&database_url, configure).await
    }

    /// Another GCS replica on an existing database.
    pub async fn start_on(database_url: &str, configure: impl FnOnce(&mut gcs::Config)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_listening(listener, database_url, configure).await
    }

    /// A GCS at a given address (e.g. the address of one that was shut down).
    pub async fn start_at(addr: SocketAddr, database_url: &str) -> Self {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "address still in use");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {addr} again: {e}"),
            }
        };
        Self::start_listening(listener, database_url, |_| {}).await
    }

    /// A GCS started as `gcs serve` starts it: on a database that may not exist or answer
    /// yet, which it migrates as soon as it can.
    pub async fn start_unmigrated(database_url: &str) -> Self {
        init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = gcs::db::connect_lazy(database_url, 8).expect("a valid database URL");
        Self::serve(listener, pool, database_url, |_| {}, false)
    }

    async fn start_listening(
        listener: tokio::net::TcpListener,
        database_url: &str,
        configure: impl FnOnce(&mut gcs::Config),
    ) -> Self {
        let pool = gcs::db::connect(database_url, 8)
            .await
            .expect("connect to the test database");
        gcs::MIGRATOR.run(&pool).await.expect("migrations");
        Self::serve(listener, pool, database_url, configure, true)
    }

    fn serve(
        listener: tokio::net::TcpListener,
        pool: sqlx::PgPool,
        database_url: &str,
        configure: impl FnOnce(&mut gcs::Config),
        migrated: bool,
    ) -> Self {
        let mut config = gcs::Config {
            tls: Some(pki::pki().tls(pki::GCS)),
            job_key_wrapping_key_file: Some(pki::pki().job_key_wrapping_key()),
            ..Default::default()
        };
        configure(&mut config);
        let addr = listener.local_addr().unwrap();
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{addr}");
        let mut service = gcs::Gcs::new(pool.clone(), config).unwrap();
        if !migrated {
            service = service.unmigrated();
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gcs::run(listener, service, async move {
            let _ = rx.await;
        }));
        let soap = SoapClient::new(http(), format!("{url}{}", gcs::http::GCS_PATH));
        let json = JsonClient::new(http(), url.clone());
        TestGcs {
            addr,
            url,
            database_url: database_url.to_string(),
            pool,
            soap,
            json,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}{}", self.url, gcs::http::GCS_PATH)
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server result");
        }
    }

    /// Calls `O` over SOAP as the identity the request speaks for ([`Actor`]).
    pub async fn call<O: Operation>(&self, req: O::Request) -> Result<O::Response, Fault>
    where
        O::Request: Actor,
    {
        self.soap_as(&req.actor()).call::<O>(&req).await
    }

    /// Calls `O` over SOAP as `id` (`role:name`).
    pub async fn call_as<O: Operation>(
        &self,
        id: &str,
        req: O::Request,
    ) -> Result<O::Response, Fault> {
        self.soap_as(id).call::<O>(&req).await
    }

    /// A SOAP client of this GCS presenting `id`'s certificate.
    pub fn soap_as(&self, id: &str) -> SoapClient {
        SoapClient::new(http_as(id), self.endpoint())
    }

    /// A JSON client of this GCS presenting `id`'s certificate.
    pub fn json_as(&self, id: &str) -> JsonClient {
        JsonClient::new(http_as(id), self.url.clone())
    }

    /// Registers the example CRIU type and one instance of it, named `name`, at `cts_url`.
    pub async fn setup_cts(&self, name: &str, resource: &str, cts_url: &str) -> CtsInstance {
        use gca_protocol::ops::*;
        self.call::<RegisterDescriptorOp>(RegisterCtsDescriptor {
            descriptor_xml: CRIU_DESCRIPTOR.to_string(),
        })
        .await
        .expect("register the CRIU descriptor");
        self.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance(name, "criu", resource, cts_url),
        })
        .await
        .expect("register the CTS instance")
        .instance
    }

    /// A broker's AuthorizeRecovery: CTS `cts` may take `gid` over while it still runs.
    pub async fn authorize_recovery(&self, gid: &str, cts: &str) {
        self.call_as::<gca_protocol::ops::AuthorizeRecoveryOp>(
            pki::BROKER,
            AuthorizeRecovery {
                gid: gid.into(),
                cts_instance: cts.into(),
                checkpoint: None,
            },
        )
        .await
        .expect("authorize the recovery");
    }

    pub async fn register_job(&self, gid: &str, cts: &str) -> Job {
        self.call::<gca_protocol::ops::RegisterJobOp>(RegisterJob {
            gid: gid.into(),
            cts_instance: cts.into(),
            local_id: Some("4242".into()),
            recovery: false,
            from_checkpoint: None,
            state: None,
            retention: None,
        })
        .await
        .expect("register job")
        .job
    }
}

impl Drop for TestGcs {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The address of a CTS that is registered but never answers (nothing listens on port 1);
/// [`checkpoint_record`]s name images under it.
pub const UNREACHABLE_CTS: &str = "https://127.0.0.1:1/wsrf/services/CheckpointTranslationService";

/// A periodic checkpoint record of `gid` by CTS `cts` (type `criu`), as a CTS would register
/// it: an image under [`UNREACHABLE_CTS`], a digest, the test process's owner, and the
/// signature of `cts`'s test certificate.
pub fn checkpoint_record(id: &str, gid: &str, cts: &str) -> CheckpointRecord {
    checkpoint_record_at(id, gid, cts, "https://127.0.0.1:1")
}

/// [`checkpoint_record`] with the image on the CTS at `base` (its root URL).
pub fn checkpoint_record_at(id: &str, gid: &str, cts: &str, base: &str) -> CheckpointRecord {
    signed(CheckpointRecord {
        id: id.into(),
        gid: gid.into(),
        sequence: None,
        cts_name: cts.into(),
        cts_type: "criu".into(),
        taken_at: chrono::Utc::now(),
        image_name: format!("{}/images/{id}", base.trim_end_matches('/')),
        execution_manager: "https://node-a/em".into(),
        size_bytes: Some(1),
        digest: Some(format!("sha256:{}", "ab".repeat(32))),
        parent: None,
        origin: Origin::Periodic,
        job_stopped: false,
        registered_at: None,
        image_state: ImageState::Stored,
        kept_in: None,
        image_error: None,
        owner: Some(current_owner()),
        signature: None,
        facts: None,
        locations: Vec::new(),
    })
}

/// The UID and GID this test process runs as (the owner of its jobs).
pub fn current_owner() -> ImageOwner {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").expect("/proc/self");
    ImageOwner {
        uid: me.uid(),
        gid: me.gid(),
    }
}

/// `r` signed by the test certificate of the CTS it names (call again after changing it).
pub fn signed(mut r: CheckpointRecord) -> CheckpointRecord {
    let facts =
        gca_protocol::signature::SignedFacts::of(&r).expect("a record with digest and owner");
    let sig = pki::pki().signer(&r.cts_name).sign(&facts).expect("sign");
    r.signature = Some(sig);
    r
}

pub fn instance(name: &str, cts_type: &str, resource: &str, url: &str) -> CtsInstance {
    CtsInstance {
        name: name.into(),
        cts_type: cts_type.into(),
        url: url.into(),
        execution_manager: format!("https://{resource}/wsrf/services/ManagedJobFactoryService"),
        resource: resource.into(),
        registered_at: None,
        last_seen: None,
        facts: None,
    }
}

/// How the in-test CTS behaves.
#[derive(Clone, Debug)]
pub struct CtsBehaviour {
    /// Register each checkpoint at the GCS before answering (what a real CTS does).
    pub register_at_gcs: Option<String>,
    /// Sleep this long before answering.
    pub delay: Duration,
    /// Answer with this fault instead.
    pub fault: Option<Fault>,
}

/// A small CTS speaking the real CTS protocol over mutual TLS (with the test certificate of
/// `cts:<name>`): SOAP DoCheckpoint from the GCS's identity in, a signed checkpoint record out.
pub struct FakeCts {
    pub url: String,
    pub name: String,
    pub calls: Arc<AtomicUsize>,
    pub behaviour: Arc<Mutex<CtsBehaviour>>,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeCts {
    pub async fn start(name: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://{}/wsrf/services/CheckpointTranslationService",
            listener.local_addr().unwrap()
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(CtsBehaviour {
            register_at_gcs: None,
            delay: Duration::ZERO,
            fault: None,
        }));
        let state = (name.to_string(), calls.clone(), behaviour.clone());
        let app = axum::Router::new().route(
            "/wsrf/services/CheckpointTranslationService",
            axum::routing::post(move |caller: Caller, headers: HeaderMap, body: Bytes| {
                let (name, calls, behaviour) = state.clone();
                async move {
                    if caller.role() != Some(gca_protocol::identity::Role::Gcs) {
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            soap::fault_envelope(
                                soap::SoapVersion::Soap11,
                                &Fault::denied(format!("{caller} is not the GCS")),
                                None,
                            ),
                        )
                            .into_response();
                    }
                    fake_cts_handle(&name, &calls, &behaviour, &headers, &body).await
                }
            }),
        );
        let (tx, rx) = oneshot::channel::<()>();
        serve_tls(listener, &pki::cts(name), app, async move {
            let _ = rx.await;
        });
        FakeCts {
            url,
            name: name.to_string(),
            calls,
            behaviour,
            stop: Some(tx),
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut CtsBehaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for FakeCts {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn fake_cts_handle(
    name: &str,
    calls: &AtomicUsize,
    behaviour: &Mutex<CtsBehaviour>,
    headers: &HeaderMap,
    body: &[u8],
) -> axum::response::Response {
    calls.fetch_add(1, Ordering::SeqCst);
    let b = behaviour.lock().unwrap().clone();
    let text = std::str::from_utf8(body).unwrap_or_default();
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok());
    let sa = headers.get("soapaction").and_then(|v| v.to_str().ok());
    let req = match soap::parse_request(text, ct, sa) {
        Ok(r) => r,
        Err(e) => {
            return (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                soap::fault_envelope(e.version, &e.fault, None),
            )
                .into_response()
        }
    };
    assert_eq!(
        req.addressing.action.as_deref(),
        Some(CtsDoCheckpointOp::request_action().as_str()),
        "the GCS must send the CTS DoCheckpoint action"
    );
    tokio::time::sleep(b.delay).await;
    if let Some(f) = b.fault {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            soap::fault_envelope(req.version, &f, None),
        )
            .into_response();
    }
    let dc = DoCheckpoint::read_children(&req.body).expect("a valid DoCheckpoint");
    let id = format!("{name}-{}", uuid::Uuid::new_v4());
    let base = format!(
        "https://{}",
        headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
    );
    let mut record = signed(CheckpointRecord {
        size_bytes: Some(4096),
        origin: Origin::External,
        job_stopped: dc.stop,
        execution_manager: "https://node/wsrf/services/ManagedJobFactoryService".into(),
        ..checkpoint_record_at(&id, &dc.gid, name, &base)
    });
    if let Some(gcs) = &b.register_at_gcs {
        let client = SoapClient::new(http_as(&pki::cts(name)), gcs.clone());
        match client
            .call::<RegisterCheckpointOp>(&RegisterCheckpoint {
                checkpoint: record.clone(),
            })
            .await
        {
            Ok(r) => record = r.checkpoint,
            Err(f) => {
                return (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    soap::fault_envelope(req.version, &f, None),
                )
                    .into_response()
            }
        }
    }
    let action = CtsDoCheckpointOp::response_action();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            req.version.content_type(&action),
        )],
        soap::response_envelope(
            req.version,
            &action,
            req.addressing.message_id.as_deref(),
            record.to_element(&CtsDoCheckpointOp::response_element()),
        ),
    )
        .into_response()
}

/// Serves `app` with mutual TLS as `id` (the test certificate of `role:name`); handlers see
/// the [`Caller`].
pub fn serve_tls(
    listener: tokio::net::TcpListener,
    id: &str,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let tls = pki::pki().tls(id);
    let app = Authenticator::with_rules(Vec::new()).layer(app);
    let server = transport::server_config(&tls).expect("test server TLS");
    tokio::spawn(transport::serve(listener, Some(server), app, shutdown));
}

/// Posts a raw SOAP 1.1 envelope, returning (status, body).
pub async fn post_raw(
    url: &str,
    content_type: &str,
    soap_action: Option<&str>,
    body: String,
) -> (u16, String) {
    let mut req = http()
        .post(url)
        .header("content-type", content_type)
        .body(body);
    if let Some(a) = soap_action {
        req = req.header("SOAPAction", a);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// A SOAP 1.1 envelope around `body` (with the `gca` prefix declared).
pub fn envelope11(action: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:wsa=\"http://www.w3.org/2005/08/addressing\" xmlns:gca=\"urn:gca:v1\">\n<s:Header><wsa:Action>{action}</wsa:Action><wsa:MessageID>urn:uuid:{}</wsa:MessageID></s:Header>\n<s:Body>{body}</s:Body>\n</s:Envelope>",
        uuid::Uuid::new_v4()
    )
}

/// The Python that has zeep, lxml and xmlschema: `GCA_PYTHON`, else the checkout's `.venv`
/// (made by scripts/install-deps), else `python3`.
pub fn python() -> String {
    std::env::var("GCA_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if std::path::Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    })
}

/// Runs `tests/python/{script}` with `args` as the test admin (its certificate in
/// `GCA_CA`/`GCA_CERT`/`GCA_KEY`, which the scripts' zeep and urllib clients use) and returns
/// its standard output; a failure panics with both outputs.
pub async fn run_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> String {
    run_python_as(pki::ADMIN, script, args).await
}

/// [`run_python`] presenting `id`'s certificate.
pub async fn run_python_as<S: AsRef<std::ffi::OsStr>>(
    id: &str,
    script: &str,
    args: &[S],
) -> String {
    let path = format!("{}/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(python())
        .envs(pki::pki().env(id))
        .arg(&path)
        .args(args)
        .output()
        .await
        .expect("run python (scripts/install-deps sets up .venv with zeep and lxml)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A toolkit's list of what it fetched (`loaded`): the WSDL at `wsdl`, and every schema it
/// imports, the OASIS and W3C ones included, from the service at `root` and nowhere else.
pub fn assert_loaded_from(loaded: &serde_json::Value, root: &str, wsdl: &str) {
    let loaded: Vec<String> = serde_json::from_value(loaded.clone()).unwrap();
    assert_eq!(loaded.first().map(String::as_str), Some(wsdl), "{loaded:?}");
    for url in &loaded {
        assert!(url.starts_with(root), "{url} is not at {root}: {loaded:?}");
    }
    for file in [
        "gca.xsd",
        "cts-descriptor.xsd",
        "bf-2.xsd",
        "r-2.xsd",
        "wsaddressing10.xsd",
        "xml.xsd",
    ] {
        let url = format!("{root}/wsrf/schemas/{file}");
        assert!(loaded.contains(&url), "{url} was not loaded: {loaded:?}");
    }
}

/// The `node` that runs the JavaScript SOAP tests: `GCA_NODE`, else `node`.
pub fn node() -> String {
    std::env::var("GCA_NODE").unwrap_or_else(|_| "node".to_string())
}

/// Runs `tests/js/{script}` (node-soap, installed into tests/js/node_modules by
/// scripts/install-deps) with `args` and returns its standard output; a failure panics with
/// both outputs.
pub async fn run_node<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> String {
    run_node_as(pki::ADMIN, script, args).await
}

/// [`run_node`] presenting `id`'s certificate (`--ca`, `--cert`, `--key`).
pub async fn run_node_as<S: AsRef<std::ffi::OsStr>>(id: &str, script: &str, args: &[S]) -> String {
    let files = pki::pki().cert(id);
    let tls = [
        "--ca".into(),
        pki::pki().ca().into_os_string(),
        "--cert".into(),
        files.cert.into_os_string(),
        "--key".into(),
        files.key.into_os_string(),
    ];
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/js");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/soap/package.json")
            .exists(),
        "{dir}/node_modules has no soap package: run scripts/install-deps"
    );
    let out = tokio::process::Command::new(node())
        .arg(format!("{dir}/{script}"))
        .args(args)
        .args(tls)
        .output()
        .await
        .expect("run node (scripts/install-deps installs nodejs and tests/js/node_modules)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
