//! # gcs — the Grid Checkpoint Service
//!
//! The headquarters of the Grid Checkpointing Architecture (GCA paper 3.5): the registry of
//! checkpointer classes, CTS types and running CTS instances, the GID → CTS routing, the
//! checkpoint bookkeeping, and the router of `doCheckpoint(GID)` to the CTS in charge.
//!
//! Layout, in reading order:
//! - [`service`]: every operation, once, independent of the wire;
//! - [`db`]: all SQL (the only code that touches PostgreSQL) and the migrations;
//! - [`http`]: the SOAP endpoint, the WSDL/XSD files and the JSON API;
//! - [`wsrf`], [`notify`]: the WS-Resources, and WS-BaseNotification (subscriptions, the
//!   notification outbox and its delivery);
//! - [`retention`]: what happens to checkpoint images when their job ends (the image tasks
//!   the GCS carries out on the CTSes);
//! - [`error`]: the service error and its mapping to faults;
//! - [`config`], [`embedded_pg`]: start-up.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use gca_protocol::transport;
use tokio::net::TcpListener;

pub mod config;
pub mod db;
pub mod embedded_pg;
pub mod error;
pub mod http;
pub mod inflight;
pub mod job_keys;
pub mod notify;
pub mod policy;
pub mod retention;
pub mod service;
pub mod wsrf;

pub use config::Config;
pub use db::MIGRATOR;
pub use service::Gcs;

impl Gcs {
    /// The service on an open, migrated pool. With TLS, its certificate must carry the
    /// identity `gcs:NAME` (the CTSes let only that role checkpoint, delete and export).
    pub fn new(db: sqlx::PgPool, config: Config) -> anyhow::Result<Self> {
        config.check_security()?;
        let (cts_tls, consumer_tls, verifier) = match &config.tls {
            Some(tls) => {
                let me = tls.own_identity().context("the GCS's certificate")?;
                if me.role != gca_protocol::identity::Role::Gcs {
                    anyhow::bail!(
                        "the GCS's certificate {} says {me}; issue one with --role gcs",
                        tls.cert.display()
                    );
                }
                // Consumers of notifications get no client certificate: the GCS's identity
                // is for CTSes only (never a confused deputy at an address a subscriber
                // chose).
                let consumer = transport::ClientTls {
                    ca: Some(tls.ca.clone()),
                    ..Default::default()
                };
                let verifier = gca_protocol::signature::Verifier::from_tls(tls)?;
                (tls.client(), consumer, Some(verifier))
            }
            None => Default::default(),
        };
        let http = transport::http_client(&transport::ClientSettings {
            tls: cts_tls,
            request_timeout: config.cts_timeout() + std::time::Duration::from_secs(5),
            ..Default::default()
        })?;
        let consumers = transport::http_client(&transport::ClientSettings {
            tls: consumer_tls,
            request_timeout: std::time::Duration::from_secs(config.notify_timeout_secs.max(1)),
            ..Default::default()
        })?;
        let authenticator = match &config.tls {
            Some(tls) => gca_protocol::identity::Authenticator::with_rules(tls.identity.clone()),
            None => gca_protocol::identity::Authenticator::insecure(),
        };
        let job_keys = match config.job_key_wrapping() {
            Some((path, false)) => Some(job_keys::KeyWrapper::load(&path)?),
            Some((path, true)) => Some(job_keys::KeyWrapper::load_or_create(&path)?),
            None => None,
        }
        .map(Arc::new);
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(true);
        Ok(Gcs {
            job_keys,
            db,
            http,
            consumers,
            verifier,
            authenticator,
            config: Arc::new(config),
            wake: Arc::new(tokio::sync::Notify::new()),
            image_wake: Arc::new(tokio::sync::Notify::new()),
            ready: ready_rx,
            ready_tx: Arc::new(ready_tx),
            in_flight: Arc::default(),
        })
    }

    /// The same on a pool whose database may be down or not yet migrated (`gcs serve`):
    /// [`run`] then applies the migrations as soon as the database answers, retrying, and
    /// meanwhile answers every request with `ServiceUnavailable` instead of not starting.
    pub fn unmigrated(self) -> Self {
        let _ = self.ready_tx.send(false);
        self
    }

    /// Waits until the database is migrated.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Applies the migrations until they succeed (the database may be down, restarting or not
/// created yet), then marks the service ready.
async fn migrate_until_ready(gcs: Gcs) {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        match MIGRATOR.run(&gcs.db).await {
            Ok(()) => {
                tracing::info!("database reachable and migrated; serving");
                let _ = gcs.ready_tx.send(true);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "the database is not reachable yet; answering ServiceUnavailable meanwhile");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// The HTTP application (for in-process tests).
pub fn app(gcs: Gcs) -> axum::Router {
    let authenticator = gcs.authenticator.clone();
    authenticator.layer(http::router(gcs))
}

/// Serves the GCS on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    gcs: Gcs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = match &gcs.config.tls {
        Some(t) => Some(transport::server_config(t).context("TLS configuration")?),
        None => None,
    };
    if tls.is_none() {
        tracing::warn!("insecure = true: serving plain HTTP, and every caller may do everything; never run this on a network others can reach");
    }
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "GCS listening");
    let migrator = (!*gcs.ready.borrow()).then(|| tokio::spawn(migrate_until_ready(gcs.clone())));
    let sweeper = tokio::spawn(sweep(gcs.clone()));
    let notifier = tokio::spawn(notify::run(gcs.clone()));
    let images = tokio::spawn(retention::run(gcs.clone()));
    let limits = gcs.config.connections.clone();
    let result = transport::serve_with(listener, tls, app(gcs), shutdown, &limits).await;
    sweeper.abort();
    notifier.abort();
    images.abort();
    if let Some(m) = migrator {
        m.abort();
    }
    result
}

/// Destroys job resources whose WS-RL termination time passed, every
/// [`wsrf::SWEEP_INTERVAL`] (requests to such a job also destroy it on the spot).
async fn sweep(gcs: Gcs) {
    gcs.wait_ready().await;
    let mut tick = tokio::time::interval(wsrf::SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = gcs.sweep_expired_jobs().await {
            tracing::warn!(error = %e, "sweeping expired job resources failed");
        }
    }
}
