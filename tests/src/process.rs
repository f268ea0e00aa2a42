//! The services as real processes, for the faults only a process has: SIGKILL in the middle of
//! work, a restart on the same address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gca_protocol::client::SoapClient;
use gca_protocol::ops::Operation;

use crate::{http, pki, Actor};

/// `gcs` (the binary) serving mutual TLS on `addr` over `database_url`, its log in a file.
pub struct GcsProcess {
    pub addr: SocketAddr,
    pub url: String,
    pub database_url: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl GcsProcess {
    /// Starts `gcs` on a free port (`addr: None`) or on `addr`, and waits until it is healthy
    /// (it migrates the database itself).
    pub async fn start(addr: Option<SocketAddr>, database_url: &str, log_dir: &Path) -> Self {
        let addr = addr.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let url = format!("https://{addr}");
        let log = log_dir.join(format!("gcs-{}.log", addr.port()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let files = pki::pki().cert(pki::GCS);
        let child = Command::new(crate::wrappers::binary("gcs"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("GCS_LISTEN", addr.to_string())
            .env("GCS_PUBLIC_URL", &url)
            .env("DATABASE_URL", database_url)
            .env("GCS_TLS_CA", pki::pki().ca())
            .env("GCS_TLS_CERT", &files.cert)
            .env("GCS_TLS_KEY", &files.key)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start gcs");
        let mut p = Self {
            addr,
            url,
            database_url: database_url.to_string(),
            log,
            child: Some(child),
        };
        p.wait_healthy().await;
        p
    }

    async fn wait_healthy(&mut self) {
        wait_ready(&mut self.child, &self.log, &self.url, "gcs", |status, _| {
            status == 200
        })
        .await;
    }

    /// SIGKILL, as a crash or the OOM killer would; waits for the process to be gone.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// The GCS's SOAP endpoint as `id`.
    pub fn soap_as(&self, id: &str) -> SoapClient {
        SoapClient::new(
            crate::http_as(id),
            format!("{}{}", self.url, gcs::http::GCS_PATH),
        )
    }

    /// Calls `O` as the identity the request speaks for.
    pub async fn call<O: Operation>(
        &self,
        req: O::Request,
    ) -> Result<O::Response, gca_protocol::Fault>
    where
        O::Request: Actor,
    {
        self.soap_as(&req.actor()).call::<O>(&req).await
    }
}

impl Drop for GcsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `cts` (the binary) with a test configuration (`crate::cts::config_text`) and its state in
/// `dir`, registered at its GCS.
pub struct CtsProcess {
    pub url: String,
    /// The CTS's JSON API, as the GCS (which may ask it for checkpoints).
    pub json: gca_protocol::client::JsonClient,
    pub local: gca_protocol::local::LocalClient,
    pub log: PathBuf,
    child: Option<Child>,
}

impl CtsProcess {
    pub async fn start(setup: crate::cts::CtsSetup<'_>, dir: &Path) -> Self {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let url = format!("https://{addr}");
        let config = dir.join("cts.toml");
        std::fs::write(&config, crate::cts::config_text(&setup, dir, &url)).unwrap();
        let log = dir.join(format!("cts-{}.log", addr.port()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(crate::wrappers::binary("cts"))
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start cts");
        let local = gca_protocol::local::LocalClient::new(dir.join("state").join("cts.sock"));
        let mut p = Self {
            json: gca_protocol::client::JsonClient::new(crate::http_as(pki::GCS), url.clone()),
            url,
            local,
            log,
            child: Some(child),
        };
        p.wait_connected().await;
        p
    }

    async fn wait_connected(&mut self) {
        wait_ready(&mut self.child, &self.log, &self.url, "cts", |_, health| {
            health["gcs_connected"] == true
        })
        .await;
    }

    /// SIGKILL (the programs it started, such as CRIU, are in process groups of their own and
    /// go on).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for CtsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `url/healthz` until `ready` accepts its answer (status, JSON body or null); panics
/// with the service's log if it exits first or is not ready within a minute.
async fn wait_ready(
    child: &mut Option<Child>,
    log: &Path,
    url: &str,
    what: &str,
    ready: impl Fn(u16, &serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!(
                "{what} exited ({status}) before it was ready: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        let answer = http()
            .get(format!("{url}/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = answer {
            let status = r.status().as_u16();
            let body = r.json().await.unwrap_or(serde_json::Value::Null);
            if ready(status, &body) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within a minute: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGKILL, and waits for the process to be gone.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
