//! Per-test PostgreSQL databases.
//!
//! Every test gets a new, empty database `gca_test_<uuid>` on one shared server:
//!
//! * the server at `GCA_TEST_DATABASE_URL` (a maintenance-database URL such as
//!   `postgres://gca:PASSWORD@127.0.0.1:PORT/postgres`; `scripts/test` starts a cluster and sets it);
//! * else a private cluster ([`gcs::embedded_pg::EmbeddedPostgres`]) under
//!   `<workspace>/target/test-pg` (or `/tmp/gca-test-pg-<uid>` when the `postgres` user could not
//!   reach the workspace), started by the first test that needs it and left running for the
//!   next test processes (`scripts/test` stops it; so does `pg_ctl stop -D <dir>/pgdata`).
//!
//! Starting the cluster is guarded by a `tokio::sync::OnceCell` within a process and by an
//! exclusive `flock` on `<dir>.lock` across processes (nextest runs each test in its own
//! process; `scripts/test` takes the same lock).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use gcs::embedded_pg::{self, EmbeddedPostgres};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

/// The environment variable naming the test server's maintenance-database URL.
pub const TEST_DATABASE_URL_ENV: &str = "GCA_TEST_DATABASE_URL";
/// The prefix of every per-test database name.
pub const DATABASE_PREFIX: &str = "gca_test_";

static MAINTENANCE_URL: OnceCell<String> = OnceCell::const_new();

/// A fresh, empty database for one test; returns its URL. Panics (failing the test) with the
/// reason when no server can be had.
pub async fn fresh_database_url() -> String {
    let maintenance = maintenance_url().await;
    let name = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let result = async {
        let mut conn = PgConnection::connect(&maintenance).await.with_context(|| {
            format!("connecting to the test PostgreSQL server at {maintenance}")
        })?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {maintenance}"))?;
        let _ = conn.close().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        panic!("{e:#}");
    }
    with_database(&maintenance, &name)
}

/// Creates the database a URL from [`fresh_database_url`] names (after [`drop_database`]).
pub async fn create_database(url: &str) {
    let name = url
        .parse::<PgConnectOptions>()
        .ok()
        .and_then(|o| o.get_database().map(str::to_string))
        .filter(|n| n.starts_with(DATABASE_PREFIX))
        .unwrap_or_else(|| panic!("{url} does not name a {DATABASE_PREFIX}* database"));
    let mut conn = PgConnection::connect(&maintenance_url().await)
        .await
        .expect("the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("CREATE DATABASE");
    let _ = conn.close().await;
}

/// Drops a database made by [`fresh_database_url`] (best effort: failures are only printed;
/// connections still open to it are terminated). Never drops a database not named `gca_test_*`.
pub async fn drop_database(url: &str) {
    let name = match url.parse::<PgConnectOptions>() {
        Ok(opts) => opts.get_database().map(str::to_string),
        Err(_) => None,
    };
    let Some(name) = name.filter(|n| n.starts_with(DATABASE_PREFIX)) else {
        eprintln!("drop_database: {url} does not name a {DATABASE_PREFIX}* database; not dropped");
        return;
    };
    let maintenance = maintenance_url().await;
    let result = async {
        let mut conn = PgConnection::connect(&maintenance).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            name.replace('"', "\"\"")
        ))
        .execute(&mut conn)
        .await?;
        let _ = conn.close().await;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("drop_database: dropping {name}: {e:#}");
    }
}

/// The URL of the test server's maintenance database (`postgres`), starting the shared private
/// cluster when `GCA_TEST_DATABASE_URL` is not set.
pub async fn maintenance_url() -> String {
    MAINTENANCE_URL
        .get_or_init(|| async {
            if let Some(url) = std::env::var(TEST_DATABASE_URL_ENV)
                .ok()
                .filter(|u| !u.trim().is_empty())
            {
                return url;
            }
            match start_shared_cluster().await {
                Ok(url) => url,
                Err(e) => panic!(
                    "no test PostgreSQL server: {TEST_DATABASE_URL_ENV} is not set and the private \
                     cluster could not be started (run the tests with scripts/test): {e:#}"
                ),
            }
        })
        .await
        .clone()
}

/// The directory of the shared test cluster: `<workspace>/target/test-pg`, or
/// `/tmp/gca-test-pg-<uid>` when the `postgres` user (which runs the server when we are root)
/// cannot reach the workspace's target directory.
pub fn shared_cluster_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let target = workspace.join("target");
    if std::fs::create_dir_all(&target).is_ok() && embedded_pg::check_traversable(&target).is_ok() {
        return target.join("test-pg");
    }
    let uid = embedded_pg::effective_uid().unwrap_or(0);
    PathBuf::from(format!("/tmp/gca-test-pg-{uid}"))
}

async fn start_shared_cluster() -> anyhow::Result<String> {
    let dir = shared_cluster_dir();
    let lock_path = lock_path_for(&dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let mut lock = fd_lock::RwLock::new(file);
    let _guard = loop {
        match lock.try_write() {
            Ok(guard) => break guard,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e).with_context(|| format!("locking {}", lock_path.display())),
        }
    };
    let mut pg = EmbeddedPostgres::start(&dir)
        .await
        .with_context(|| format!("starting the test cluster in {}", dir.display()))?;
    // Left running for the other tests and test processes.
    pg.detach();
    Ok(pg.url("postgres"))
}

/// `<dir>.lock`, beside the cluster directory (the lock `scripts/test` takes too).
fn lock_path_for(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}

/// `url` with its database (path) replaced by `database`, keeping any query string.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let prefix = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_in_urls() {
        assert_eq!(
            with_database("postgres://gca@127.0.0.1:5432/postgres", "x"),
            "postgres://gca@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://gca@127.0.0.1:5432", "x"),
            "postgres://gca@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
    }

    #[test]
    fn lock_file_is_beside_the_cluster_dir() {
        assert_eq!(
            lock_path_for(Path::new("/a/target/test-pg")),
            PathBuf::from("/a/target/test-pg.lock")
        );
    }

    #[tokio::test]
    async fn fresh_databases_are_empty_distinct_and_droppable() {
        let a = fresh_database_url().await;
        let b = fresh_database_url().await;
        assert_ne!(a, b);
        let mut conn = PgConnection::connect(&a).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(tables, 0);
        sqlx::query("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await
            .unwrap();
        // drop_database terminates this still-open connection.
        drop_database(&a).await;
        drop_database(&b).await;
        let _ = conn.close().await;
        assert!(PgConnection::connect(&a).await.is_err(), "{a} still exists");
    }
}
