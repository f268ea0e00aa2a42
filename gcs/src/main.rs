//! `gcs`: start the Grid Checkpoint Service, or migrate its database.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gcs::config::{Config, LogFormat, Secret};
use gcs::embedded_pg::EmbeddedPostgres;

#[derive(Parser)]
#[command(name = "gcs", version, about = "Grid Checkpoint Service")]
struct Cli {
    /// TOML configuration file (environment: GCS_* variables override it).
    #[arg(long, env = "GCS_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Without a database URL: run a private PostgreSQL cluster under this directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (also DATABASE_URL); overrides --data-dir.
    #[arg(long)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the GCS (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,tower_http=info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("gcs: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = Some(d);
    }
    if let Some(u) = cli.database_url {
        config.database_url = Some(Secret::new(u));
    }
    init_tracing(config.log_format);

    let mut embedded = None;
    let url = match (&config.database_url()?, &config.data_dir) {
        (Some(url), _) => url.expose().to_string(),
        (None, Some(dir)) => {
            let pg = EmbeddedPostgres::start(dir).await?;
            tracing::info!(data_dir = %dir.display(), port = pg.port(), "private PostgreSQL cluster running");
            let url = pg.url("gcs");
            embedded = Some(pg);
            url
        }
        (None, None) => anyhow::bail!(
            "no database configured: set DATABASE_URL (or database_url in the config file), or pass --data-dir DIR to run a private PostgreSQL cluster there"
        ),
    };
    let result = serve(&url, config, cli.command).await;
    if let Some(mut pg) = embedded {
        if let Err(e) = pg.stop().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "stopping the private PostgreSQL cluster"
            );
        }
    }
    result
}

async fn serve(url: &str, config: Config, command: Option<Command>) -> anyhow::Result<()> {
    if matches!(command, Some(Command::Migrate)) {
        let pool = gcs::db::connect(url, config.db_max_connections).await?;
        gcs::MIGRATOR
            .run(&pool)
            .await
            .context("applying database migrations")?;
        println!("migrations applied");
        return Ok(());
    }
    // The database may be down at start (or restarting): the GCS serves anyway, answers
    // ServiceUnavailable and an unhealthy /healthz until it can migrate, then connects.
    let pool = gcs::db::connect_lazy(url, config.db_max_connections)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let gcs = gcs::Gcs::new(pool.clone(), config)?.unmigrated();
    gcs::run(listener, gcs, shutdown_signal()).await?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
