//! `--cts URL`: how a wrapper finds its CTS's local socket.
//!
//! Accepted: `unix:/path/to/cts.sock` (the socket itself), or the CTS's root URL or SOAP
//! endpoint (`http(s)://host:port[/wsrf/services/CheckpointTranslationService]`, what the
//! descriptor's `{CTS_URL}` expands to), from which the wrapper GETs `{root}/api/v1/local`
//! (over https it checks the CTS's certificate against the site CA in `GCA_CA`; it needs no
//! certificate of its own). Either way the socket must be served by root (the CTS) or by the
//! caller itself (`gca_protocol::local`), so another user cannot pose as the CTS.

use std::path::PathBuf;
use std::time::Duration;

use gca_protocol::client::JsonClient;
use gca_protocol::local::{LocalClient, LocalInfo};
use gca_protocol::transport;

use crate::exit::{Class, Failure};

/// A parsed `--cts` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtsTarget {
    Socket(PathBuf),
    /// The CTS's root URL, without a trailing slash.
    Url(String),
}

impl CtsTarget {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix: CTS address needs an absolute socket path (unix:/path/to/cts.sock)"
                ));
            }
            return Ok(CtsTarget::Socket(path.into()));
        }
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(format!(
                "{s:?} is not a CTS address: give its URL (http(s)://host:port, or its SOAP endpoint) or unix:/path/to/cts.sock"
            ));
        }
        let mut root = s.trim_end_matches('/');
        if let Some(r) = root.strip_suffix(gca_protocol::ns::CTS_SERVICE_PATH) {
            root = r;
        }
        Ok(CtsTarget::Url(root.to_string()))
    }
}

/// A connected CTS: its local client and what it says about itself.
#[derive(Debug, Clone)]
pub struct Cts {
    pub client: LocalClient,
    pub info: LocalInfo,
}

/// Finds the local socket and asks the CTS about itself.
pub async fn connect(target: &CtsTarget) -> Result<Cts, Failure> {
    let socket = match target {
        CtsTarget::Socket(p) => p.clone(),
        CtsTarget::Url(root) => {
            let tls = transport::ClientTls {
                cert: None,
                key: None,
                ..transport::ClientTls::from_env()
            };
            if root.starts_with("https://") && tls.ca.is_none() {
                return Err(Failure::new(
                    Class::Usage,
                    format!(
                        "the CTS at {root} speaks https: set {} to the site CA certificate, or give --cts unix:/path/to/cts.sock",
                        transport::ENV_CA
                    ),
                ));
            }
            let http = transport::http_client(&transport::ClientSettings {
                tls,
                request_timeout: Duration::from_secs(15),
                ..Default::default()
            })
            .map_err(|e| Failure::new(Class::Internal, format!("HTTP client: {e:#}")))?;
            let info: LocalInfo = JsonClient::new(http, root.clone())
                .get("/api/v1/local")
                .await
                .map_err(|f| {
                    Failure::fault(
                        format!("cannot ask the CTS at {root} where its local socket is"),
                        &f,
                    )
                })?;
            info.socket
        }
    };
    let client = LocalClient::new(socket);
    let info = client.info().await.map_err(|f| {
        Failure::fault(
            format!("cannot reach the CTS on {}", client.socket().display()),
            &f,
        )
    })?;
    Ok(Cts { client, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_endpoints_and_sockets() {
        assert_eq!(
            CtsTarget::parse("http://h:8090/wsrf/services/CheckpointTranslationService").unwrap(),
            CtsTarget::Url("http://h:8090".into())
        );
        assert_eq!(
            CtsTarget::parse("https://h/").unwrap(),
            CtsTarget::Url("https://h".into())
        );
        assert_eq!(
            CtsTarget::parse("unix:/run/cts.sock").unwrap(),
            CtsTarget::Socket("/run/cts.sock".into())
        );
        assert!(CtsTarget::parse("unix:relative.sock").is_err());
        assert!(CtsTarget::parse("ftp://h").is_err());
    }
}
