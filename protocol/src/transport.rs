//! The one transport every GCA listener and client goes through: HTTP/1.1 over TCP, or over
//! TLS 1.2/1.3 with rustls, optionally with mutual authentication (X.509 client certificates,
//! the GSI model of paper section 6).
//!
//! Servers call [`serve`] with a bound listener, an axum router and a shutdown future; when the
//! connection carried a client certificate, each request gets a [`PeerIdentity`] extension for
//! the per-role authorization layer. Clients get a configured `reqwest::Client` from
//! [`http_client`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// A component's TLS settings (PEM files): the site CA it trusts, its own certificate and key,
/// and how certificates issued by another PKI map to GCA identities. Servers require nothing
/// at the handshake beyond a valid chain when a certificate is presented: a connection without
/// one is served as [`Caller::Anonymous`](crate::identity::Caller), which the policies refuse
/// for every operation but discovery (WSDL, schemas, health), with a message saying so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The site CA: peers' certificates (clients and servers) and image signatures are
    /// checked against it.
    pub ca: PathBuf,
    /// This component's certificate (its identity, e.g. `urn:gca:role:gcs:main`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificates of a site's own PKI, mapped to identities (tried before the URN SAN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity: Vec<crate::identity::IdentityRule>,
}

impl TlsConfig {
    /// The same files for outgoing calls.
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca: Some(self.ca.clone()),
            cert: Some(self.cert.clone()),
            key: Some(self.key.clone()),
        }
    }

    /// Checks the files and rules, and returns the identity this component's own certificate
    /// carries (so a service can refuse to start under the wrong name).
    pub fn own_identity(&self) -> anyhow::Result<crate::identity::Identity> {
        for rule in &self.identity {
            rule.validate().map_err(|e| anyhow!(e))?;
        }
        let certs = read_certs(&self.cert)?;
        let facts = crate::identity::CertificateFacts::from_der(&certs[0])
            .map_err(|e| anyhow!("{}: {e}", self.cert.display()))?;
        facts.identity(&self.identity).ok_or_else(|| {
            anyhow!(
                "the certificate {} ({}) carries no GCA identity: issue it with `gcactl pki issue --role ROLE --name NAME`, or map it with an identity rule",
                self.cert.display(),
                facts.subject
            )
        })
    }
}

/// Client-side TLS settings (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// CAs to trust for servers (the GCS, CTSes); without it, the system's roots are not used
    /// either, so set it whenever https URLs are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Our own certificate and key, for servers that require client authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// The environment variables every GCA client reads its TLS files from (gcactl, the
/// wrappers, scripts): the site CA, and the caller's certificate and key.
pub const ENV_CA: &str = "GCA_CA";
pub const ENV_CERT: &str = "GCA_CERT";
pub const ENV_KEY: &str = "GCA_KEY";

impl ClientTls {
    /// `GCA_CA`, `GCA_CERT`, `GCA_KEY` (read through `var`, empty values unset).
    pub fn from_env_with(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        ClientTls {
            ca: get(ENV_CA),
            cert: get(ENV_CERT),
            key: get(ENV_KEY),
        }
    }

    pub fn from_env() -> Self {
        Self::from_env_with(|k| std::env::var(k).ok())
    }
}

/// The authenticated peer of a TLS connection with a client certificate.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The end-entity certificate, DER.
    pub certificate: CertificateDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{} is not a PEM private key file", path.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", path.display()))
}

fn root_store(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
    }
    Ok(roots)
}

/// Builds the rustls server configuration: our certificate, and client certificates checked
/// against the site CA when presented (expired, revoked-by-chain or foreign ones fail the
/// handshake; none at all is an anonymous caller).
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&tls.ca)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .context("client certificate verifier")?;
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&tls.cert)?, read_key(&tls.key)?)
        .context("server certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Settings for outgoing HTTP(S) requests.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub tls: ClientTls,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on a whole request, unless a call sets its own.
    pub request_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            tls: ClientTls::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The HTTP client for image transfers between resources: no bound on the whole request (a
/// large image file over a slow link may take longer than any fixed bound), so the transfer
/// itself must bound progress (`gca_store::fetch`'s stall timeout: a stream that delivers
/// nothing for that long fails, and the next attempt resumes with a range).
pub fn transfer_client(tls: ClientTls) -> anyhow::Result<reqwest::Client> {
    build_client(
        &ClientSettings {
            tls,
            ..Default::default()
        },
        None,
    )
}

/// How long a transfer may wait for any byte, the response's headers included.
pub const TRANSFER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The HTTP client for every outgoing call.
pub fn http_client(settings: &ClientSettings) -> anyhow::Result<reqwest::Client> {
    build_client(settings, Some(settings.request_timeout))
}

fn build_client(
    settings: &ClientSettings,
    request_timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &settings.tls.ca {
        roots = root_store(ca)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let tls = match (&settings.tls.cert, &settings.tls.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .context("client certificate and key do not match")?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(anyhow!("a client certificate needs both `cert` and `key`")),
    };
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // A redirect would send the request (and a client certificate) wherever the peer
        // says: services call exactly the URL they were given (SSRF, issue 15).
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30));
    match request_timeout {
        Some(t) => builder = builder.timeout(t),
        // Each read, the wait for the headers too, is bounded instead.
        None => builder = builder.read_timeout(TRANSFER_READ_TIMEOUT),
    }
    builder.build().context("building the HTTP client")
}

/// Bounds every listener keeps on its connections (slowloris, idle sockets, stalled
/// requests, file descriptors). Configured per service (`[connections]` in the GCS config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeLimits {
    /// A client must send a request's complete headers within this many seconds of the
    /// connection becoming ready for one (after the TLS handshake, or after the previous
    /// response): a slowloris client is cut off.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in progress and no bytes moving for this many seconds is
    /// closed (keep-alive idle, a client that stopped reading a response).
    pub idle_timeout_secs: u64,
    /// A request must be answered (its body read and the response started) within this many
    /// seconds; after that it gets a `ServiceUnavailable` fault (`request-timeout`). A
    /// response body already streaming is not cut: `idle_timeout_secs` watches it. The
    /// default (10 min) is above the CTS's default checkpoint timeout (5 min), which a
    /// DoCheckpoint on a CTS may take.
    pub request_timeout_secs: u64,
    /// Connections served at once; beyond it the listener stops accepting (new clients wait
    /// in the kernel's backlog) until one closes, so descriptors cannot run out.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            request_timeout_secs: 600,
            max_connections: 512,
        }
    }
}

impl ServeLimits {
    fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs.max(1))
    }
    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }
}

/// The credentials of the peer of a UNIX socket connection (`SO_PEERCRED`, taken when the
/// connection is accepted). Handlers get it as an extension and as
/// `ConnectInfo<UnixPeer>`; unknown credentials are `uid = gid = u32::MAX`, nobody's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

impl UnixPeer {
    fn of(stream: &tokio::net::UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(c) => UnixPeer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(_) => UnixPeer {
                pid: None,
                uid: u32::MAX,
                gid: u32::MAX,
            },
        }
    }
}

/// Serves `router` on `listener` (TLS when `tls` is set) until `shutdown` resolves, then
/// stops accepting and waits up to 10 s for requests in flight; with [`ServeLimits::default`].
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(listener, tls, router, shutdown, &ServeLimits::default()).await
}

/// [`serve`] with the given limits.
pub async fn serve_with(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &ServeLimits,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let limits = limits.clone();
    accept_loop(
        shutdown,
        &limits,
        || listener.accept(),
        move |stream: tokio::net::TcpStream, peer: SocketAddr, conn: Connection| {
            let acceptor = acceptor.clone();
            async move {
                let _ = stream.set_nodelay(true);
                let mut extensions = http::Extensions::new();
                extensions.insert(axum::extract::ConnectInfo(peer));
                match acceptor {
                    None => conn.serve(stream, router_service(extensions)).await,
                    Some(acceptor) => {
                        let tls = match tokio::time::timeout(
                            Duration::from_secs(10),
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                        if let Some(c) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                        {
                            extensions.insert(PeerIdentity {
                                certificate: c.clone().into_owned(),
                            });
                        }
                        conn.serve(tls, router_service(extensions)).await
                    }
                }
            }
        },
        router,
    )
    .await;
    drop(listener);
    Ok(())
}

/// Serves `router` on a UNIX socket with the same limits as [`serve_with`]; each request
/// carries the peer's credentials ([`UnixPeer`]).
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &ServeLimits,
) -> anyhow::Result<()> {
    let limits = limits.clone();
    accept_loop(
        shutdown,
        &limits,
        || listener.accept(),
        |stream: tokio::net::UnixStream, _addr, conn: Connection| async move {
            let peer = UnixPeer::of(&stream);
            let mut extensions = http::Extensions::new();
            extensions.insert(peer);
            extensions.insert(axum::extract::ConnectInfo(peer));
            conn.serve(stream, router_service(extensions)).await
        },
        router,
    )
    .await;
    drop(listener);
    Ok(())
}

/// How long a shut-down listener waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Accepts connections (at most `max_connections` at once) until `shutdown`, handing each to
/// `handle` on its own task, then drains.
async fn accept_loop<S, A, AFut, Addr, H, HFut>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &ServeLimits,
    mut accept: A,
    handle: H,
    router: axum::Router,
) where
    A: FnMut() -> AFut,
    AFut: Future<Output = std::io::Result<(S, Addr)>>,
    H: Fn(S, Addr, Connection) -> HFut,
    HFut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = ConnBuilder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout());
    let mut full_logged = false;
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the cap, clients wait in the backlog instead of taking descriptors.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                full_logged = false;
                p
            }
            Err(_) => {
                if !full_logged {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    full_logged = true;
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let conn = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            router: router.clone(),
            limits: limits.clone(),
            _permit: permit,
        };
        tokio::spawn(handle(stream, addr, conn));
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN:?}; closing them");
    }
}

/// What one accepted connection is served with; holds its connection slot.
struct Connection {
    builder: ConnBuilder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    router: axum::Router,
    limits: ServeLimits,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connection {
    /// Serves HTTP on `io` until the client is done, a timeout fires or the server drains.
    async fn serve<IO>(self, io: IO, service: RouterService)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: io,
            activity: activity.clone(),
        };
        let svc = service.bind(self.router, activity.clone(), self.limits.request_timeout());
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        let conn = self.watcher.watch(conn.into_owned());
        let idle = self.limits.idle_timeout();
        tokio::select! {
            _ = conn => {}
            _ = activity.idle_for(idle) => {
                tracing::debug!(idle = ?idle, "closing an idle connection");
            }
        }
    }
}

/// When bytes last moved on a connection, and how many requests are being handled on it.
struct Activity {
    start: std::time::Instant,
    last_millis: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last_millis: std::sync::atomic::AtomicU64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_millis
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no request is in progress and nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let quiet = self
                .start
                .elapsed()
                .saturating_sub(Duration::from_millis(self.last_millis.load(Relaxed)));
            if self.in_flight.load(Relaxed) == 0 && quiet >= idle {
                return;
            }
        }
    }
}

/// Marks a request in progress on its connection until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A stream that records when bytes move.
struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The per-connection facts every request of it carries (peer address or credentials, the
/// client certificate).
struct RouterService {
    extensions: http::Extensions,
}

fn router_service(extensions: http::Extensions) -> RouterService {
    RouterService { extensions }
}

impl RouterService {
    fn bind(
        self,
        router: axum::Router,
        activity: Arc<Activity>,
        request_timeout: Duration,
    ) -> hyper_util::service::TowerToHyperService<
        impl tower::Service<
                http::Request<hyper::body::Incoming>,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
                Future = impl Send,
            > + Clone,
    > {
        let extensions = self.extensions;
        let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            let router = router.clone();
            req.extensions_mut().extend(extensions.clone());
            let in_flight = InFlight::new(activity.clone());
            async move {
                let answer = router.oneshot(req.map(axum::body::Body::new));
                let response = match tokio::time::timeout(request_timeout, answer).await {
                    Ok(r) => r,
                    Err(_) => Ok(request_timed_out(request_timeout)),
                };
                drop(in_flight);
                response
            }
        });
        hyper_util::service::TowerToHyperService::new(svc)
    }
}

fn request_timed_out(limit: Duration) -> axum::response::Response {
    use axum::response::IntoResponse;
    let fault = crate::fault::Fault::new(
        crate::fault::FaultKind::ServiceUnavailable,
        format!(
            "the request was not answered within the limit of {}s (request_timeout_secs)",
            limit.as_secs()
        ),
    )
    .with_code("request-timeout");
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(crate::fault::ErrorBody { error: fault }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn client(&self, name: Option<&str>) -> reqwest::Client {
            http_client(&ClientSettings {
                tls: ClientTls {
                    ca: Some(self.path("ca.pem")),
                    cert: name.map(|n| self.path(&format!("{n}.pem"))),
                    key: name.map(|n| self.path(&format!("{n}.key"))),
                },
                ..Default::default()
            })
            .unwrap()
        }
    }

    /// A CA (`ca`), a server certificate for localhost, a client `admin:a`, an expired
    /// client `admin:old`, and `stranger:` issued by another CA.
    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let make_ca = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            (p.self_signed(&key).unwrap(), key)
        };
        let (ca, ca_key) = make_ca();
        let (other, other_key) = make_ca();
        let issue = |name: &str,
                     sans: Vec<String>,
                     uri: Option<&str>,
                     expired: bool,
                     by: (&rcgen::Certificate, &rcgen::KeyPair)| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            if let Some(u) = uri {
                p.subject_alt_names
                    .push(rcgen::SanType::URI(u.try_into().unwrap()));
            }
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = p.signed_by(&key, by.0, by.1).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        issue(
            "server",
            vec!["localhost".into()],
            None,
            false,
            (&ca, &ca_key),
        );
        issue(
            "client",
            vec![],
            Some("urn:gca:role:admin:a"),
            false,
            (&ca, &ca_key),
        );
        issue("nameless", vec![], None, false, (&ca, &ca_key));
        issue(
            "expired",
            vec![],
            Some("urn:gca:role:admin:old"),
            true,
            (&ca, &ca_key),
        );
        issue(
            "stranger",
            vec![],
            Some("urn:gca:role:admin:a"),
            false,
            (&other, &other_key),
        );
        Pki { dir }
    }

    async fn start(tls: TlsConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/who",
            axum::routing::get(|caller: crate::identity::Caller| async move { caller.to_string() }),
        );
        let router = crate::identity::Authenticator::with_rules(tls.identity.clone()).layer(router);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = server_config(&tls).unwrap();
        tokio::spawn(serve(listener, Some(config), router, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    fn server_tls(pki: &Pki) -> TlsConfig {
        TlsConfig {
            ca: pki.path("ca.pem"),
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            identity: vec![crate::identity::IdentityRule {
                subject: Some("CN=nameless".into()),
                san: None,
                role: crate::identity::Role::Broker,
                name: "mapped".into(),
            }],
        }
    }

    #[tokio::test]
    async fn mutual_tls_identifies_clients_and_refuses_strangers() {
        let pki = pki();
        let (addr, stop) = start(server_tls(&pki)).await;
        let url = format!("https://localhost:{}/who", addr.port());
        let who = |c: reqwest::Client| {
            let url = url.clone();
            async move { c.get(&url).send().await.map(|r| r.status()) }
        };
        let text = |c: reqwest::Client| {
            let url = url.clone();
            async move { c.get(&url).send().await.unwrap().text().await.unwrap() }
        };
        assert_eq!(text(pki.client(Some("client"))).await, "admin:a");
        assert_eq!(text(pki.client(Some("nameless"))).await, "broker:mapped");
        assert_eq!(
            text(pki.client(None)).await,
            "a caller without a client certificate"
        );
        assert!(
            who(pki.client(Some("expired"))).await.is_err(),
            "an expired client certificate must fail the handshake"
        );
        assert!(
            who(pki.client(Some("stranger"))).await.is_err(),
            "a certificate of another CA must fail the handshake"
        );
        let untrusting = http_client(&ClientSettings::default()).unwrap();
        assert!(
            untrusting.get(&url).send().await.is_err(),
            "an unknown server CA must be refused"
        );
        stop.send(()).unwrap();
    }

    #[tokio::test]
    async fn own_identity_is_read_from_the_certificate() {
        let pki = pki();
        let mut tls = server_tls(&pki);
        tls.cert = pki.path("client.pem");
        assert_eq!(tls.own_identity().unwrap().to_string(), "admin:a");
        tls.cert = pki.path("server.pem");
        let err = tls.own_identity().unwrap_err();
        assert!(
            format!("{err:#}").contains("carries no GCA identity"),
            "{err:#}"
        );
    }

    #[test]
    fn client_files_come_from_the_environment() {
        let tls = ClientTls::from_env_with(|k| match k {
            "GCA_CA" => Some("/etc/gca/ca.pem".into()),
            "GCA_CERT" => Some(String::new()),
            _ => None,
        });
        assert_eq!(tls.ca.as_deref(), Some(Path::new("/etc/gca/ca.pem")));
        assert_eq!(tls.cert, None);
    }

    fn test_router() -> axum::Router {
        axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/peer",
                axum::routing::get(|peer: axum::Extension<UnixPeer>| async move {
                    format!("uid={} pid={}", peer.uid, peer.pid.unwrap_or(-1))
                }),
            )
    }

    fn short_limits() -> ServeLimits {
        ServeLimits {
            header_read_timeout_secs: 1,
            idle_timeout_secs: 2,
            request_timeout_secs: 1,
            max_connections: 64,
        }
    }

    async fn start_plain(limits: ServeLimits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            serve_with(
                listener,
                None,
                test_router(),
                std::future::pending(),
                &limits,
            )
            .await
        });
        addr
    }

    /// Reads until the server closes the connection; false if it is still open after `within`.
    async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    async fn get_ok(url: &str) -> String {
        let client = http_client(&ClientSettings::default()).unwrap();
        client.get(url).send().await.unwrap().text().await.unwrap()
    }

    #[tokio::test]
    async fn slowloris_clients_are_cut_off_while_others_are_served() {
        use tokio::io::AsyncWriteExt;
        let addr = start_plain(short_limits()).await;
        // Headers that never end, and a connection that never sends anything.
        let mut slow = Vec::new();
        for i in 0..20 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await
                    .unwrap();
            }
            slow.push(s);
        }
        assert_eq!(get_ok(&format!("http://{addr}/ok")).await, "ok");
        for s in &mut slow {
            assert!(
                closed_within(s, Duration::from_secs(5)).await,
                "a client that does not finish its headers is cut off"
            );
        }
        // A kept-alive connection that goes quiet is closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut idle, Duration::from_secs(6)).await);
        assert_eq!(get_ok(&format!("http://{addr}/ok")).await, "ok");
    }

    #[tokio::test]
    async fn a_request_not_answered_in_time_gets_a_fault() {
        let addr = start_plain(short_limits()).await;
        let client = http_client(&ClientSettings::default()).unwrap();
        let started = std::time::Instant::now();
        let resp = client
            .get(format!("http://{addr}/slow"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 503);
        let body: crate::fault::ErrorBody = resp.json().await.unwrap();
        assert_eq!(body.error.code.as_deref(), Some("request-timeout"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn the_connection_cap_makes_clients_wait_not_fail() {
        let addr = start_plain(ServeLimits {
            max_connections: 2,
            ..short_limits()
        })
        .await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Both slots are taken until the silent clients are cut off (header timeout, 1 s).
        let started = std::time::Instant::now();
        assert_eq!(get_ok(&format!("http://{addr}/ok")).await, "ok");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn unix_sockets_get_the_same_limits_and_the_peer_credentials() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            serve_unix(
                listener,
                test_router(),
                std::future::pending(),
                &short_limits(),
            )
            .await
        });
        let mut slow = tokio::net::UnixStream::connect(&path).await.unwrap();
        slow.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut ok = tokio::net::UnixStream::connect(&path).await.unwrap();
        ok.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        let uid = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        assert!(
            answer.contains(&format!("uid={} pid={}", uid.unwrap(), std::process::id())),
            "{answer}"
        );
        assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let err = server_config(&TlsConfig {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            identity: vec![],
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/"));
    }
}
