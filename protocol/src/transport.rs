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
use hyper_util::rt::{TokioExecutor, TokioIo};
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

/// The HTTP client for every outgoing call.
pub fn http_client(settings: &ClientSettings) -> anyhow::Result<reqwest::Client> {
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
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// Serves `router` on `listener` (TLS when `tls` is set) until `shutdown` resolves, then
/// stops accepting and waits up to `drain` for requests in flight.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let drain = Duration::from_secs(10);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let builder = ConnBuilder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        service(router, peer, None),
                    );
                    let _ = watcher.watch(conn.into_owned()).await;
                }
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
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| PeerIdentity {
                            certificate: c.clone().into_owned(),
                        });
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(tls),
                        service(router, peer, identity),
                    );
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {drain:?}; closing them");
    }
    Ok(())
}

fn service(
    router: axum::Router,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
> {
    let svc = tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let router = router.clone();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        if let Some(id) = &identity {
            req.extensions_mut().insert(id.clone());
        }
        async move { router.oneshot(req.map(axum::body::Body::new)).await }
    });
    hyper_util::service::TowerToHyperService::new(svc)
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
