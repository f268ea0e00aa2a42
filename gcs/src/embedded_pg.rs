//! A private PostgreSQL cluster for `gcs` when no `DATABASE_URL` is configured, also used by the
//! test harness.
//!
//! Layout under the directory given to [`EmbeddedPostgres::start`]:
//!
//! * `pgdata/` — the cluster (created by `initdb -U gca --auth=scram-sha-256` on first use);
//! * `superuser.password` — the superuser's password, generated then (32 random bytes, hex),
//!   mode 0600 and owned by the user running the GCS (not the `postgres` user);
//! * `postgres.log` — the server log (appended to by every start).
//!
//! The server listens only on `127.0.0.1`, on a port chosen at start, and has no UNIX socket.
//! The superuser is `gca`, authenticated by SCRAM with that password, so that other local users
//! cannot use the database; the URL is `postgres://gca:PASSWORD@127.0.0.1:PORT/DBNAME` (a
//! secret: never log it). A cluster made by an earlier version with `trust` authentication is
//! given a password and switched to SCRAM at its next start.
//!
//! PostgreSQL refuses to run as root: when this process runs as root, `initdb` and `pg_ctl` are
//! run as the `postgres` system user through `runuser -u postgres --`, `pgdata/` is owned by that
//! user, and every directory above it must be traversable by that user.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::process::Command;

/// The superuser `initdb` creates in the cluster.
pub const SUPERUSER: &str = "gca";
/// The database [`EmbeddedPostgres::start`] creates for the service.
pub const SERVICE_DATABASE: &str = "gcs";
/// The superuser's password, beside `pgdata/`.
pub const PASSWORD_FILE: &str = "superuser.password";
/// The system user PostgreSQL runs as when this process runs as root.
const SYSTEM_USER: &str = "postgres";
/// Environment variable naming the directory holding `initdb`, `pg_ctl` and `postgres`.
pub const BIN_DIR_ENV: &str = "GCA_PG_BIN_DIR";

const INSTALL_HINT: &str =
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; \
     Fedora: `dnf install postgresql-server`), or set GCA_PG_BIN_DIR to the directory holding \
     initdb, pg_ctl and postgres, or set DATABASE_URL to use an existing PostgreSQL server";

const START_ATTEMPTS: u32 = 5;
const PG_CTL_TIMEOUT_SECS: u32 = 60;
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 20;

/// Where the PostgreSQL server programs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    bin_dir: PathBuf,
}

impl PgBinaries {
    /// Uses the programs in `bin_dir`, which must hold `initdb`, `pg_ctl` and `postgres`.
    pub fn from_dir(bin_dir: impl Into<PathBuf>) -> Result<Self> {
        let bin_dir = bin_dir.into();
        let missing = missing_programs(&bin_dir);
        if missing.is_empty() {
            Ok(Self { bin_dir })
        } else {
            bail!(
                "{} does not contain the PostgreSQL server programs (missing: {})",
                bin_dir.display(),
                missing.join(", ")
            )
        }
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn initdb(&self) -> PathBuf {
        self.bin_dir.join("initdb")
    }

    pub fn pg_ctl(&self) -> PathBuf {
        self.bin_dir.join("pg_ctl")
    }

    pub fn postgres(&self) -> PathBuf {
        self.bin_dir.join("postgres")
    }
}

const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

fn missing_programs(dir: &Path) -> Vec<&'static str> {
    PROGRAMS
        .iter()
        .copied()
        .filter(|p| !is_executable_file(&dir.join(p)))
        .collect()
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the server programs: `$GCA_PG_BIN_DIR`, else `pg_config --bindir` or `PATH`, else the
/// newest `/usr/lib/postgresql/*/bin` (or `/usr/pgsql-*/bin`).
fn find_binaries_from(
    bin_dir_env: Option<OsString>,
    path_env: Option<OsString>,
) -> Result<PgBinaries> {
    if let Some(dir) = bin_dir_env.filter(|d| !d.is_empty()) {
        return PgBinaries::from_dir(PathBuf::from(&dir)).with_context(|| {
            format!(
                "{BIN_DIR_ENV}={} is not usable; {INSTALL_HINT}",
                dir.to_string_lossy()
            )
        });
    }

    let path_dirs: Vec<PathBuf> = path_env
        .as_deref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();

    // pg_config knows the bindir of its installation (on Debian, /usr/bin/pg_config points to
    // /usr/lib/postgresql/N/bin).
    if let Some(pg_config) = path_dirs
        .iter()
        .map(|d| d.join("pg_config"))
        .find(|p| is_executable_file(p))
    {
        if let Ok(out) = std::process::Command::new(&pg_config)
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if let Ok(b) = PgBinaries::from_dir(dir) {
                    return Ok(b);
                }
            }
        }
    }

    if let Some(dir) = path_dirs.iter().find(|d| missing_programs(d).is_empty()) {
        return Ok(PgBinaries {
            bin_dir: dir.clone(),
        });
    }

    let mut candidates: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for (parent, prefix) in [("/usr/lib/postgresql", ""), ("/usr", "pgsql-")] {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            let Some(key) = parse_version(version) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if missing_programs(&bin).is_empty() {
                candidates.push((key, bin));
            }
        }
    }
    candidates.sort();
    if let Some((_, bin_dir)) = candidates.pop() {
        return Ok(PgBinaries { bin_dir });
    }

    bail!(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) not found: {BIN_DIR_ENV} is not set, \
         they are not on PATH nor in `pg_config --bindir`, and there is no /usr/lib/postgresql/*/bin; \
         {INSTALL_HINT}"
    )
}

fn parse_version(s: &str) -> Option<Vec<u64>> {
    if s.is_empty() {
        return None;
    }
    s.split('.').map(|p| p.parse().ok()).collect()
}

/// The effective uid of this process (from /proc/self/status, else `id -u`).
pub fn effective_uid() -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            if let Some(euid) = line.split_whitespace().nth(2).and_then(|u| u.parse().ok()) {
                return Some(euid);
            }
        }
    }
    let out = std::process::Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Whether this process runs with effective uid 0.
pub fn running_as_root() -> bool {
    effective_uid() == Some(0)
}

/// When running as root, checks that the `postgres` system user can traverse `dir` and every
/// directory above it (it must reach the cluster under `dir`). Succeeds at once when not root.
pub fn check_traversable(dir: &Path) -> Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    check_traversable_by_postgres(dir)
}

fn check_traversable_by_postgres(dir: &Path) -> Result<()> {
    // Outermost first, so that the first failure is the directory to fix.
    let mut dirs: Vec<&Path> = dir.ancestors().collect();
    dirs.reverse();
    let out = std::process::Command::new("runuser")
        .args(["-u", SYSTEM_USER, "--", "sh", "-c"])
        .arg(r#"for d in "$@"; do [ -x "$d" ] || { printf '%s' "$d"; exit 1; }; done"#)
        .arg("sh")
        .args(&dirs)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .context("running `runuser -u postgres` to check directory permissions")?;
    if out.status.success() {
        return Ok(());
    }
    let bad = String::from_utf8_lossy(&out.stdout).to_string();
    if bad.is_empty() {
        bail!(
            "checking that the `postgres` user can reach {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    bail!(
        "the `postgres` system user (which runs PostgreSQL, since this process runs as root) cannot \
         traverse {bad}, so it cannot reach the cluster under {}; use a data directory it can reach, \
         e.g. `--data-dir /var/lib/gca`, or run `chmod o+x {bad}`",
        dir.display()
    )
}

fn ensure_system_user_exists() -> Result<()> {
    let ok = std::process::Command::new("id")
        .args(["-u", SYSTEM_USER])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!(
            "this process runs as root, PostgreSQL refuses to run as root, and there is no `{SYSTEM_USER}` \
             system user to run it as; install the PostgreSQL server package (which creates it), create it \
             (`useradd --system {SYSTEM_USER}`), run as a non-root user, or set DATABASE_URL"
        );
    }
    Ok(())
}

/// A PostgreSQL cluster in a directory of ours, started (or found running) by [`Self::start`].
pub struct EmbeddedPostgres {
    dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    bins: PgBinaries,
    as_system_user: bool,
    /// We started the server and must stop it (in `stop` or on drop).
    owns_server: bool,
    /// The superuser's password (empty until read or made).
    password: String,
}

/// Without the password.
impl std::fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("as_system_user", &self.as_system_user)
            .field("owns_server", &self.owns_server)
            .finish_non_exhaustive()
    }
}

impl EmbeddedPostgres {
    /// Finds `initdb`, `pg_ctl` and `postgres`: `$GCA_PG_BIN_DIR`, else `PATH` (`pg_config
    /// --bindir` if available), else the newest `/usr/lib/postgresql/*/bin`.
    pub fn find_binaries() -> Result<PgBinaries> {
        find_binaries_from(std::env::var_os(BIN_DIR_ENV), std::env::var_os("PATH"))
    }

    /// Creates the cluster under `dir/pgdata` if missing and starts it on 127.0.0.1 on a free port,
    /// or reuses the server already running from that directory (which is then left running on
    /// drop). Creates the database `gcs` if missing.
    pub async fn start(dir: &Path) -> Result<Self> {
        let bins = Self::find_binaries()?;
        Self::start_with(dir, bins).await
    }

    /// [`Self::start`] with the given server programs.
    pub async fn start_with(dir: &Path, bins: PgBinaries) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let as_system_user = running_as_root();
        if as_system_user {
            ensure_system_user_exists()?;
            make_dir_searchable(&dir)?;
            check_traversable_by_postgres(&dir)?;
        }
        let mut pg = Self {
            data_dir: dir.join("pgdata"),
            log_file: dir.join("postgres.log"),
            dir,
            port: 0,
            bins,
            as_system_user,
            owns_server: false,
            password: String::new(),
        };
        pg.password = read_password(&pg.password_file())?.unwrap_or_default();

        if let Some(port) = pg.find_running_server().await? {
            tracing::info!(port, dir = %pg.dir.display(), "reusing the PostgreSQL server already running");
            pg.port = port;
        } else {
            pg.init_cluster_if_missing().await?;
            pg.start_server().await?;
        }
        if pg.password.is_empty() || pg.trusts_anyone()? {
            pg.require_password().await?;
        }
        pg.ensure_database(SERVICE_DATABASE).await?;
        Ok(pg)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://gca:PASSWORD@127.0.0.1:PORT/DATABASE` (the password is hex: nothing to
    /// escape). A secret: log [`Self::port`], not this.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// `dir/superuser.password`.
    pub fn password_file(&self) -> PathBuf {
        self.dir.join(PASSWORD_FILE)
    }

    /// The directory given to [`Self::start`] (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cluster's data directory (`dir/pgdata`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (`dir/postgres.log`).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Whether this handle started the server (and so stops it).
    pub fn started_here(&self) -> bool {
        self.owns_server
    }

    /// Leaves the server running when this handle is stopped or dropped.
    pub fn detach(&mut self) {
        self.owns_server = false;
    }

    /// Creates `database` if it does not exist.
    pub async fn ensure_database(&self, database: &str) -> Result<()> {
        let mut conn = connect(
            self.port,
            "postgres",
            &self.password,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("connecting to PostgreSQL on 127.0.0.1:{}", self.port))?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(database)
                .fetch_optional(&mut conn)
                .await
                .context("querying pg_database")?;
        if exists.is_none() {
            let sql = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
            if let Err(e) = sqlx::query(&sql).execute(&mut conn).await {
                // Someone else may have created it at the same time.
                let code = e
                    .as_database_error()
                    .and_then(|d| d.code().map(|c| c.into_owned()));
                if !matches!(code.as_deref(), Some("42P04") | Some("23505")) {
                    return Err(e).with_context(|| format!("creating database {database}"));
                }
            }
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Restarts the server on its port (`pg_ctl restart`, which keeps the options it was
    /// started with): `immediate` stops it as a crash would (recovery from the WAL at start),
    /// otherwise as a routine restart (`-m fast`: sessions are ended, work in flight fails).
    pub async fn restart(&self, immediate: bool) -> Result<()> {
        let mut cmd = self.pg_command(&self.bins.pg_ctl());
        cmd.arg("restart")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", if immediate { "immediate" } else { "fast" }])
            .args(["-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .arg("-l")
            .arg(&self.log_file);
        let out = run(&mut cmd).await.context("running pg_ctl restart")?;
        if !out.status.success() {
            bail!(
                "pg_ctl restart -D {} failed ({}): {}{}",
                self.data_dir.display(),
                out.status,
                out.text(),
                self.log_tail_since(0)
            );
        }
        Ok(())
    }

    /// Stops the server with `pg_ctl stop -m fast` if this handle started it; idempotent.
    pub async fn stop(&mut self) -> Result<()> {
        if !self.owns_server {
            return Ok(());
        }
        if !self.data_dir.join("postmaster.pid").exists() {
            self.owns_server = false;
            return Ok(());
        }
        let mut cmd = self.pg_command(&self.bins.pg_ctl());
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string());
        let out = run(&mut cmd).await.context("running pg_ctl stop")?;
        if !out.status.success() && self.data_dir.join("postmaster.pid").exists() {
            bail!(
                "pg_ctl stop -D {} failed ({}): {}{}",
                self.data_dir.display(),
                out.status,
                out.text(),
                self.log_tail_since(0)
            );
        }
        self.owns_server = false;
        Ok(())
    }

    // ----- internals -----

    /// A command running `program` as the `postgres` user when we are root.
    fn pg_command(&self, program: &Path) -> Command {
        let mut cmd = if self.as_system_user {
            let mut c = Command::new("runuser");
            c.args(["-u", SYSTEM_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir("/")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        cmd
    }

    fn std_pg_command(&self, program: &Path) -> std::process::Command {
        let mut cmd = if self.as_system_user {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", SYSTEM_USER, "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// The port of a server running from our data directory that accepts connections, if any.
    async fn find_running_server(&self) -> Result<Option<u16>> {
        let pid_file = self.data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return Ok(None);
        }
        if let Some(port) = read_pid_file_port(&pid_file) {
            if self.is_our_server(port).await {
                return Ok(Some(port));
            }
        }
        // The pid file may be stale (crash) or the server may be starting up.
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            if !self.server_process_alive().await? {
                tracing::info!(dir = %self.data_dir.display(), "stale postmaster.pid, starting the server");
                return Ok(None);
            }
            if let Some(port) = read_pid_file_port(&pid_file) {
                if self.is_our_server(port).await {
                    return Ok(Some(port));
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "a PostgreSQL server is running from {} (see postmaster.pid) but does not accept \
                     connections as {SUPERUSER} on 127.0.0.1:{}; stop it (pg_ctl stop -D {}) and retry{}",
                    self.data_dir.display(),
                    read_pid_file_port(&pid_file).map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                    self.data_dir.display(),
                    self.log_tail_since(0)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `pg_ctl status`: exit 0 when a server runs from the data directory, 3 when not.
    async fn server_process_alive(&self) -> Result<bool> {
        let mut cmd = self.pg_command(&self.bins.pg_ctl());
        cmd.arg("status").arg("-D").arg(&self.data_dir);
        let out = run(&mut cmd).await.context("running pg_ctl status")?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => bail!(
                "pg_ctl status -D {} failed ({}): {}",
                self.data_dir.display(),
                out.status,
                out.text()
            ),
        }
    }

    /// Whether the server on `port` answers and serves our data directory.
    async fn is_our_server(&self, port: u16) -> bool {
        let Ok(mut conn) = connect(port, "postgres", &self.password, Duration::from_secs(3)).await
        else {
            return false;
        };
        let dd: Result<String, _> = sqlx::query_scalar("SELECT current_setting('data_directory')")
            .fetch_one(&mut conn)
            .await;
        let _ = conn.close().await;
        match dd {
            Ok(dd) => {
                let theirs = Path::new(&dd)
                    .canonicalize()
                    .unwrap_or_else(|_| PathBuf::from(&dd));
                theirs == self.data_dir
            }
            Err(_) => false,
        }
    }

    async fn init_cluster_if_missing(&mut self) -> Result<()> {
        if self.data_dir.join("PG_VERSION").exists() {
            if self.as_system_user {
                self.chown_to_system_user(&self.data_dir, true).await?;
            }
            return Ok(());
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        if self.as_system_user {
            self.chown_to_system_user(&self.data_dir, true).await?;
        }
        // The password: ours in `superuser.password`; initdb reads it from a copy the
        // `postgres` user can read, removed once the cluster exists.
        let password = new_password()?;
        write_private(&self.password_file(), &password)?;
        self.password = password;
        let pwfile = self.dir.join(".initdb-password");
        write_private(&pwfile, &self.password)?;
        if self.as_system_user {
            self.chown_to_system_user(&pwfile, false).await?;
        }
        let result = self.initdb(&pwfile).await;
        let _ = std::fs::remove_file(&pwfile);
        result
    }

    async fn initdb(&self, pwfile: &Path) -> Result<()> {
        let mut errors = String::new();
        for locale in ["C.UTF-8", "C"] {
            let mut cmd = self.pg_command(&self.bins.initdb());
            cmd.arg("-D")
                .arg(&self.data_dir)
                .args(["-U", SUPERUSER, "--auth=scram-sha-256", "-E", "UTF8"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .arg(format!("--locale={locale}"));
            let out = run(&mut cmd).await.context("running initdb")?;
            if out.status.success() {
                tracing::info!(dir = %self.data_dir.display(), locale, "created PostgreSQL cluster");
                return Ok(());
            }
            let _ = write!(
                errors,
                "\n--- initdb --locale={locale} ({}):\n{}",
                out.status,
                out.text()
            );
        }
        bail!(
            "initdb -D {} failed (as {}): {}",
            self.data_dir.display(),
            if self.as_system_user {
                SYSTEM_USER
            } else {
                "the current user"
            },
            errors
        )
    }

    /// Whether `pg_hba.conf` lets anyone in without a password (`trust`).
    fn trusts_anyone(&self) -> Result<bool> {
        let hba = self.data_dir.join("pg_hba.conf");
        let text =
            std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        Ok(switch_trust_to_scram(&text) != text)
    }

    /// A cluster made by an earlier version trusts every local connection: gives the superuser
    /// a password, switches `pg_hba.conf`'s `trust` rules to `scram-sha-256`, and reloads. The
    /// password is on disk before the server knows it, and the switch is decided by what
    /// `pg_hba.conf` says, so an interrupted switch is finished at the next start and never
    /// leaves the cluster with a password nobody has.
    async fn require_password(&mut self) -> Result<()> {
        if self.password.is_empty() {
            let password = new_password()?;
            write_private(&self.password_file(), &password)?;
            self.password = password;
        }
        let hba = self.data_dir.join("pg_hba.conf");
        let text =
            std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        // Under `trust` the password is not asked for; once switched, it is.
        let mut conn = connect(self.port, "postgres", &self.password, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "{} has no usable {PASSWORD_FILE} and the server does not trust us either; restore the file or recreate the cluster",
                    self.dir.display()
                )
            })?;
        // Hex: nothing to quote.
        for sql in [
            "SET password_encryption = 'scram-sha-256'".to_string(),
            format!("ALTER ROLE {SUPERUSER} PASSWORD '{}'", self.password),
        ] {
            sqlx::query(&sql)
                .execute(&mut conn)
                .await
                .context("setting the superuser's password")?;
        }
        let _ = conn.close().await;
        // Replaced whole (a torn write cannot leave half a file), with its owner and mode.
        let tmp = hba.with_extension("conf.gca-tmp");
        write_private(&tmp, &switch_trust_to_scram(&text))?;
        if self.as_system_user {
            self.chown_to_system_user(&tmp, false).await?;
        }
        std::fs::rename(&tmp, &hba).with_context(|| format!("replacing {}", hba.display()))?;
        let mut cmd = self.pg_command(&self.bins.pg_ctl());
        cmd.arg("reload").arg("-D").arg(&self.data_dir);
        let out = run(&mut cmd).await.context("running pg_ctl reload")?;
        if !out.status.success() {
            bail!(
                "pg_ctl reload -D {} failed: {}",
                self.data_dir.display(),
                out.text()
            );
        }
        // The reload is asynchronous: wait until the password is needed and works.
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            let with = connect(
                self.port,
                "postgres",
                &self.password,
                Duration::from_secs(3),
            )
            .await;
            let without = connect(self.port, "postgres", "", Duration::from_secs(3)).await;
            if with.is_ok() && without.is_err() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "switched {} to scram-sha-256 but the server still {}",
                    hba.display(),
                    if with.is_err() {
                        "refuses the password"
                    } else {
                        "trusts connections without one"
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(dir = %self.dir.display(), "the private PostgreSQL cluster trusted local connections; it now requires the password in {PASSWORD_FILE}");
        Ok(())
    }

    async fn chown_to_system_user(&self, path: &Path, recursive: bool) -> Result<()> {
        let mut cmd = Command::new("chown");
        if recursive {
            cmd.arg("-R");
        }
        cmd.arg(format!("{SYSTEM_USER}:"))
            .arg(path)
            .stdin(Stdio::null());
        let out = run(&mut cmd).await.context("running chown")?;
        if !out.status.success() {
            bail!(
                "chown {SYSTEM_USER}: {} failed: {}",
                path.display(),
                out.text()
            );
        }
        Ok(())
    }

    async fn start_server(&mut self) -> Result<()> {
        if !self.log_file.exists() {
            // The server's log may quote statements: its users' alone.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.log_file)
                .with_context(|| format!("creating {}", self.log_file.display()))?;
        }
        if self.as_system_user {
            self.chown_to_system_user(&self.log_file, false).await?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let log_offset = std::fs::metadata(&self.log_file)
                .map(|m| m.len())
                .unwrap_or(0);
            let mut cmd = self.pg_command(&self.bins.pg_ctl());
            cmd.arg("start")
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t"])
                .arg(PG_CTL_TIMEOUT_SECS.to_string())
                .arg("-o")
                .arg(format!(
                    "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
                ));
            let out = run(&mut cmd).await.context("running pg_ctl start")?;
            if out.status.success() {
                self.port = port;
                self.owns_server = true;
                self.wait_until_accepting(log_offset).await?;
                tracing::info!(port, dir = %self.dir.display(), "started PostgreSQL");
                return Ok(());
            }
            let log = read_log_since(&self.log_file, log_offset);
            let clash = log.contains("could not bind") || log.contains("Address already in use");
            if clash && attempt < START_ATTEMPTS {
                tracing::warn!(
                    port,
                    "port clash starting PostgreSQL, retrying on another port"
                );
                continue;
            }
            bail!(
                "pg_ctl start -D {} (port {port}) failed ({}): {}{}",
                self.data_dir.display(),
                out.status,
                out.text(),
                self.log_tail_since(log_offset)
            );
        }
    }

    async fn wait_until_accepting(&self, log_offset: u64) -> Result<()> {
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            match connect(
                self.port,
                "postgres",
                &self.password,
                Duration::from_secs(3),
            )
            .await
            {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "PostgreSQL from {} started but does not accept connections on 127.0.0.1:{}{}",
                            self.data_dir.display(),
                            self.port,
                            self.log_tail_since(log_offset)
                        )
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn log_tail_since(&self, offset: u64) -> String {
        let log = read_log_since(&self.log_file, offset);
        let lines: Vec<&str> = log.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "\n--- last lines of {}:\n{}",
            self.log_file.display(),
            tail.join("\n")
        )
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if !self.owns_server || !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        let _ = self
            .std_pg_command(&self.bins.pg_ctl())
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t"])
            .arg(PG_CTL_TIMEOUT_SECS.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.owns_server = false;
    }
}

/// 32 bytes from the kernel's random source, as hex.
fn new_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the database password")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The password in `path`, if there is one; refused when others may read it.
fn read_password(path: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} may be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let password = text.trim();
    if password.is_empty() || !password.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{} does not hold a password this GCS made", path.display());
    }
    Ok(Some(password.to_string()))
}

/// Writes `contents` to a new file at `path`, mode 0600 from the start (replacing it).
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

/// `pg_hba.conf` with the method `trust` of every rule replaced by `scram-sha-256`.
fn switch_trust_to_scram(hba: &str) -> String {
    let mut out = String::with_capacity(hba.len() + 64);
    for line in hba.lines() {
        let rule = line.split('#').next().unwrap_or("");
        if rule.split_whitespace().any(|w| w == "trust") {
            let replaced: Vec<&str> = rule
                .split_whitespace()
                .map(|w| if w == "trust" { "scram-sha-256" } else { w })
                .collect();
            out.push_str(&replaced.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Adds o+x to `dir` (ours) if the `postgres` user could not otherwise enter it.
fn make_dir_searchable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        tracing::info!(dir = %dir.display(), "adding o+x so that the postgres user can reach the cluster");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
            .with_context(|| format!("chmod o+x {}", dir.display()))?;
    }
    Ok(())
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Line 4 of postmaster.pid is the port.
fn read_pid_file_port(pid_file: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    text.lines().nth(3)?.trim().parse().ok()
}

fn read_log_since(log_file: &Path, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log_file) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    // Bounded: the log of one start is small, but a long-lived log need not be read whole.
    let start = offset.max(len.saturating_sub(64 * 1024));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Connects as the superuser; an empty `password` sends none (a `trust` cluster of an earlier
/// version, before [`EmbeddedPostgres::require_password`]).
async fn connect(
    port: u16,
    database: &str,
    password: &str,
    timeout: Duration,
) -> Result<PgConnection> {
    let mut opts = PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(port)
        .username(SUPERUSER)
        .database(database)
        .disable_statement_logging();
    if !password.is_empty() {
        opts = opts.password(password);
    }
    match tokio::time::timeout(timeout, opts.connect()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(anyhow!(
            "connecting to 127.0.0.1:{port} timed out after {timeout:?}"
        )),
    }
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Output {
    fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.stderr).trim().to_string();
        let out = String::from_utf8_lossy(&self.stdout);
        if !out.trim().is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(out.trim());
        }
        s
    }
}

async fn run(cmd: &mut Command) -> Result<Output> {
    let program = describe(cmd);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("could not run {program}"))?;
    Ok(Output {
        status: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut parts: Vec<&OsStr> = vec![std.get_program()];
    parts.extend(std.get_args());
    parts
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_dir() -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("gca-embedded-pg-")
            .tempdir_in("/tmp")
            .expect("tempdir in /tmp");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    async fn answers(port: u16) -> bool {
        // Up: it lets us in, or asks for the password.
        match connect(port, "postgres", "", Duration::from_secs(2)).await {
            Ok(_) => true,
            Err(e) => format!("{e:#}").contains("password"),
        }
    }

    #[tokio::test]
    async fn start_connect_stop_restart_reuses_data() {
        let tmp = test_dir();
        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        assert!(pg.started_here());
        assert!(pg.url("gcs").starts_with("postgres://gca:"));
        let pool = sqlx::PgPool::connect(&pg.url("gcs")).await.unwrap();
        let one: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
        sqlx::query("create table kept (x int)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("insert into kept values (42)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;

        // A second handle on the same directory reuses the running server and leaves it running.
        let again = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        assert!(!again.started_here());
        assert_eq!(again.port(), pg.port());
        drop(again);
        assert!(
            answers(pg.port()).await,
            "dropping a reusing handle must not stop the server"
        );

        let port = pg.port();
        pg.stop().await.unwrap();
        pg.stop().await.unwrap(); // idempotent
        assert!(!answers(port).await, "server still answers after stop");
        assert!(!tmp.path().join("pgdata/postmaster.pid").exists());

        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        assert!(pg.started_here());
        let pool = sqlx::PgPool::connect(&pg.url("gcs")).await.unwrap();
        let x: i32 = sqlx::query_scalar("select x from kept")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(x, 42);
        pool.close().await;
        pg.stop().await.unwrap();
        drop(tmp);
    }

    #[tokio::test]
    async fn the_cluster_admits_only_who_holds_the_password() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = test_dir();
        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        let file = tmp.path().join(PASSWORD_FILE);
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let err = connect(pg.port(), "postgres", "", Duration::from_secs(3))
            .await
            .expect_err("no password, no connection");
        assert!(format!("{err:#}").contains("password"), "{err:#}");
        let wrong = connect(pg.port(), "postgres", "00", Duration::from_secs(3)).await;
        assert!(wrong.is_err(), "a wrong password is refused");
        assert!(!tmp.path().join(".initdb-password").exists());
        let mut conn = connect(pg.port(), "gcs", &pg.password, Duration::from_secs(3))
            .await
            .expect("the password works");
        let method: String = sqlx::query_scalar(
            "SELECT string_agg(DISTINCT auth_method, ',') FROM pg_hba_file_rules",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(method, "scram-sha-256");
        let _ = conn.close().await;
        pg.stop().await.unwrap();
    }

    #[tokio::test]
    async fn a_cluster_that_trusted_everyone_gets_a_password() {
        let tmp = test_dir();
        // A cluster as an earlier version made it: `trust`, no password file.
        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        let hba = tmp.path().join("pgdata").join("pg_hba.conf");
        let scram = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, scram.replace("scram-sha-256", "trust")).unwrap();
        pg.stop().await.unwrap();
        std::fs::remove_file(tmp.path().join(PASSWORD_FILE)).unwrap();

        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        let password = read_password(&tmp.path().join(PASSWORD_FILE))
            .unwrap()
            .expect("a password was made");
        assert!(
            !format!("{pg:?}").contains(&password),
            "Debug shows no password"
        );
        assert_ne!(password, "");
        assert!(
            connect(pg.port(), "postgres", "", Duration::from_secs(3))
                .await
                .is_err(),
            "trust is gone"
        );
        let pool = sqlx::PgPool::connect(&pg.url("gcs")).await.unwrap();
        pool.close().await;
        assert!(!std::fs::read_to_string(&hba)
            .unwrap()
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("trust")));
        pg.stop().await.unwrap();
    }

    /// A switch interrupted after the password was saved (here: `pg_hba.conf` still says
    /// `trust`) is finished at the next start, with the saved password.
    #[tokio::test]
    async fn an_interrupted_switch_is_finished_at_the_next_start() {
        let tmp = test_dir();
        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        let saved = pg.password.clone();
        let hba = tmp.path().join("pgdata").join("pg_hba.conf");
        let scram = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, scram.replace("scram-sha-256", "trust")).unwrap();
        pg.stop().await.unwrap();

        let mut pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        assert_eq!(pg.password, saved, "the saved password is kept");
        assert!(
            connect(pg.port(), "postgres", "", Duration::from_secs(3))
                .await
                .is_err(),
            "trust is gone"
        );
        connect(pg.port(), "postgres", &saved, Duration::from_secs(3))
            .await
            .expect("the saved password works");
        pg.stop().await.unwrap();
    }

    #[test]
    fn only_trust_rules_change() {
        let hba = "# comment with trust\nlocal all all trust\nhost all all 127.0.0.1/32 md5\nhost all all ::1/128 trust # was\n";
        let out = switch_trust_to_scram(hba);
        assert_eq!(
            out,
            "# comment with trust\nlocal all all scram-sha-256\nhost all all 127.0.0.1/32 md5\nhost all all ::1/128 scram-sha-256\n"
        );
    }

    #[tokio::test]
    async fn drop_stops_the_server_it_started() {
        let tmp = test_dir();
        let pg = EmbeddedPostgres::start(tmp.path()).await.unwrap();
        let port = pg.port();
        assert!(answers(port).await);
        assert!(tmp.path().join("postgres.log").exists());
        drop(pg);
        assert!(!answers(port).await, "server still answers after drop");
    }

    #[test]
    fn missing_bin_dir_gives_install_instructions() {
        let err =
            find_binaries_from(Some("/nonexistent".into()), std::env::var_os("PATH")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("GCA_PG_BIN_DIR=/nonexistent"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("dnf install postgresql-server"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");

        let err = find_binaries_from(None, Some("/nonexistent".into()));
        if let Err(err) = err {
            // Only when /usr/lib/postgresql has no server either.
            assert!(format!("{err:#}").contains("apt-get install postgresql"));
        }
    }

    #[test]
    fn finds_the_binaries_here() {
        let bins = EmbeddedPostgres::find_binaries()
            .expect("PostgreSQL server installed (scripts/install-deps)");
        assert!(bins.initdb().exists() && bins.pg_ctl().exists() && bins.postgres().exists());
    }

    #[test]
    fn parses_versions_and_pid_file() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("x"), None);
        let tmp = test_dir();
        let f = tmp.path().join("postmaster.pid");
        std::fs::write(
            &f,
            "123\n/data\n1700000000\n54321\n\n127.0.0.1\n  1 2\nready   \n",
        )
        .unwrap();
        assert_eq!(read_pid_file_port(&f), Some(54321));
    }

    #[tokio::test]
    async fn untraversable_parent_is_reported_when_root() {
        if !running_as_root() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp = test_dir();
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = EmbeddedPostgres::start(&closed.join("gca"))
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&closed.display().to_string()), "{msg}");
        assert!(msg.contains("--data-dir /var/lib/gca"), "{msg}");
        assert!(msg.contains("chmod o+x"), "{msg}");
    }
}
