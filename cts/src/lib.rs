//! # cts — the Checkpoint Translation Service
//!
//! One per computing resource (GCA paper 3.3, 5.5): the driver of a local core checkpointer.
//! It keeps the jobs running here (registered by their wrappers over a local-only socket),
//! takes checkpoints on request from the GCS or periodically, names and stores the images,
//! serves them to other resources, and logs every checkpoint at the GCS.
//!
//! Layout, in reading order:
//! - [`service`]: jobs, checkpoints, periodic and internal checkpoints, exits;
//! - the core checkpointer drivers are the `gca-drivers` crate;
//! - the image store (manifests, atomic commits, fetch, export, its HTTP endpoints) is the
//!   `gca-store` crate;
//! - [`gcs_link`]: registration at the GCS and the outbox of records for it;
//! - [`http`]: the public router (SOAP, images, status) and the local one (UNIX socket);
//! - [`cgroup`]: a cgroup (v2) per job: limits, the freezer for dumps, usage;
//! - [`config`], [`error`].

use std::future::Future;
use std::path::Path;

use anyhow::Context;
use gca_protocol::transport;
use tokio::net::{TcpListener, UnixListener};

pub mod cgroup;
pub mod config;
pub mod error;
pub mod gcs_link;
pub mod http;
pub mod policy;
pub mod service;

pub use config::Config;
pub use service::Cts;

/// Builds the service from its configuration (driver, descriptor, HTTP client).
pub async fn build(config: Config) -> anyhow::Result<Cts> {
    let cts_type = config.load_descriptor()?;
    let driver = gca_drivers::make_driver(&config.driver)?;
    let tls = match &config.tls {
        Some(tls) => {
            let me = tls.own_identity().context("the CTS's certificate")?;
            if !me.is_cts(&config.name) {
                anyhow::bail!(
                    "the CTS's certificate {} says {me}, but this CTS is named {:?}; issue one with --role cts --name {}",
                    tls.cert.display(),
                    config.name,
                    config.name
                );
            }
            tls.client()
        }
        None => Default::default(),
    };
    let http = transport::http_client(&transport::ClientSettings {
        tls: tls.clone(),
        ..Default::default()
    })?;
    let transfers = transport::transfer_client(tls)?;
    Cts::new(config, cts_type, driver, http, transfers).await
}

/// Binds the local socket: replaces a stale one (nobody listening), refuses to steal a live
/// one, and lets every local user connect (the CTS checks credentials per request).
pub fn bind_local(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another CTS is listening on {}; give this one another local_socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the local socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves the CTS (public TCP listener and local socket) until `shutdown` resolves; starts
/// its background work (GCS registration, outbox, job watchers) and stops it at the end.
pub async fn run(
    listener: TcpListener,
    local: UnixListener,
    cts: Cts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = match &cts.config().tls {
        Some(t) => Some(transport::server_config(t).context("TLS configuration")?),
        None => None,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        socket = %cts.config().local_socket().display(),
        cts.name = %cts.instance().name,
        cts.type = %cts.instance().cts_type,
        tls = tls.is_some(),
        "CTS listening"
    );
    if tls.is_none() {
        tracing::warn!("insecure = true: serving plain HTTP to anyone, calling without a certificate, and taking unsigned images; never run this on a network others can reach");
    }
    let authenticator = match &cts.config().tls {
        Some(t) => gca_protocol::identity::Authenticator::with_rules(t.identity.clone()),
        None => gca_protocol::identity::Authenticator::insecure(),
    };
    cts.start();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut rx2 = rx.clone();
    let local_router = http::local::router(cts.clone());
    let limits = cts.config().connections.clone();
    let local_limits = limits.clone();
    let local_task = tokio::spawn(async move {
        transport::serve_unix(
            local,
            local_router,
            async move {
                let _ = rx2.wait_for(|v| *v).await;
            },
            &local_limits,
        )
        .await
    });
    let mut rx1 = rx;
    let public = transport::serve_with(
        listener,
        tls,
        authenticator.layer(http::public::router(cts.clone())),
        async move {
            let _ = rx1.wait_for(|v| *v).await;
        },
        &limits,
    );
    tokio::pin!(public);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut public => r,
        _ = &mut shutdown => {
            let _ = tx.send(true);
            public.await
        }
    };
    let _ = tx.send(true);
    let _ = local_task.await;
    cts.shutdown();
    let _ = std::fs::remove_file(cts.config().local_socket());
    result
}
