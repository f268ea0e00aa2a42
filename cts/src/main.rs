//! `cts --config FILE [--listen ADDR]`: runs a Checkpoint Translation Service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cts",
    version,
    about = "Checkpoint Translation Service: drives a core checkpointer for one computing resource"
)]
struct Args {
    /// Configuration file (TOML); CTS_* environment variables override it.
    #[arg(long, short, env = "CTS_CONFIG")]
    config: PathBuf,
    /// Listen on this address instead of the configured one.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// `text` or `json` logs.
    #[arg(long, default_value = "text", env = "CTS_LOG_FORMAT")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_http=warn".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut config = cts::Config::load(&args.config)?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    if config.public_url.is_none() {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        config.public_url = Some(format!("{scheme}://{}", listener.local_addr()?));
    }
    let local = cts::bind_local(&config.local_socket())?;
    let cts = cts::build(config).await?;
    cts::run(listener, local, cts, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    })
    .await
}
