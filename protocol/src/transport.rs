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

/// Server-side TLS settings (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// Client-side TLS settings (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// The authenticated peer of a TLS connection with a client certificate.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The end-entity certificate, DER.
    pub certificate: CertificateDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
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

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
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

/// Builds the rustls server configuration.
pub fn server_config(tls: &ServerTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(ca)?),
                provider(),
            )
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
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
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issue = |name: &str, sans: Vec<String>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        issue("server", vec!["localhost".into()]);
        issue("client", vec![]);
        Pki { dir }
    }

    async fn start(tls: ServerTls) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route(
            "/who",
            axum::routing::get(|id: Option<axum::Extension<PeerIdentity>>| async move {
                if id.is_some() {
                    "authenticated"
                } else {
                    "anonymous"
                }
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = server_config(&tls).unwrap();
        tokio::spawn(serve(listener, Some(config), router, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    #[tokio::test]
    async fn mutual_tls_identifies_the_client_and_refuses_strangers() {
        let pki = pki();
        let (addr, _stop) = start(ServerTls {
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            client_ca: Some(pki.path("ca.pem")),
        })
        .await;
        let url = format!("https://localhost:{}/who", addr.port());
        let with_cert = http_client(&ClientSettings {
            tls: ClientTls {
                ca: Some(pki.path("ca.pem")),
                cert: Some(pki.path("client.pem")),
                key: Some(pki.path("client.key")),
            },
            ..Default::default()
        })
        .unwrap();
        let body = with_cert
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "authenticated");

        let without_cert = http_client(&ClientSettings {
            tls: ClientTls {
                ca: Some(pki.path("ca.pem")),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert!(
            without_cert.get(&url).send().await.is_err(),
            "a client without a certificate must be refused"
        );

        let untrusting = http_client(&ClientSettings::default()).unwrap();
        assert!(
            untrusting.get(&url).send().await.is_err(),
            "an unknown server CA must be refused"
        );
    }

    #[tokio::test]
    async fn server_tls_without_client_auth_serves_anonymous_clients() {
        let pki = pki();
        let (addr, stop) = start(ServerTls {
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            client_ca: None,
        })
        .await;
        let client = http_client(&ClientSettings {
            tls: ClientTls {
                ca: Some(pki.path("ca.pem")),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let url = format!("https://localhost:{}/who", addr.port());
        assert_eq!(
            client.get(&url).send().await.unwrap().text().await.unwrap(),
            "anonymous"
        );
        stop.send(()).unwrap();
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let err = server_config(&ServerTls {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/cert.pem"));
    }
}
