//! Typed configuration: defaults, then a TOML file, then `GCS_*` environment variables, then
//! command-line flags (applied by `main`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use gca_protocol::transport::{ServeLimits, TlsConfig};
use serde::Deserialize;

/// A secret string: never printed by `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The URL clients reach this GCS at (used in the WSDL and for `{GCS_URL}`); when unset, it
    /// is taken from each request's Host header.
    pub public_url: Option<String>,
    /// PostgreSQL server to use. Unset: a private cluster under `data_dir`.
    pub database_url: Option<Secret>,
    /// A file holding the database URL (a secret kept out of the environment and the command
    /// line, e.g. a Docker secret); read at start when `database_url` is unset.
    pub database_url_file: Option<PathBuf>,
    /// Directory for the private PostgreSQL cluster.
    pub data_dir: Option<PathBuf>,
    pub db_max_connections: u32,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Bound on a doCheckpoint forwarded to a CTS, in seconds.
    pub cts_timeout_secs: u64,
    /// Mutual TLS: the site CA, the GCS's certificate (role `gcs`) and key, identity rules.
    /// Required unless `insecure`.
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP and trust every caller with every operation (development only; a
    /// warning is logged at start). Without `tls` and without this, the GCS refuses to start.
    pub insecure: bool,
    /// `text` or `json` logs.
    pub log_format: LogFormat,
    /// A CTS instance not heard from for this long is lost (the `gca:CTSLost` notification):
    /// by default 3 × the CTS's default heartbeat of 30 s.
    pub cts_lost_after_secs: f64,
    /// Each replica looks for due notifications (and lost CTSes, expired subscriptions) this
    /// often, besides being woken by its own commits.
    pub notify_poll_millis: u64,
    /// The first retry of a failed Notify waits this long; each further one twice as long...
    pub notify_retry_base_millis: u64,
    /// ...up to this.
    pub notify_retry_max_secs: u64,
    /// After this many failed attempts a notification is given up (kept as failed, logged).
    pub notify_max_attempts: u32,
    /// Bound on one Notify POST, in seconds.
    pub notify_timeout_secs: u64,
    /// Deliveries (one per subscription) running at once in one replica.
    pub notify_concurrency: usize,
    /// The termination time of a subscription whose Subscribe names none, in seconds from then.
    pub subscription_default_lifetime_secs: u64,
    /// A job that fails (non-zero exit status, a signal, an unknown status) keeps its images
    /// for recovery; unless it has a termination time already, it gets one this many seconds
    /// later, when its retention policy applies (default 7 days).
    pub failed_job_lifetime_secs: u64,
    /// After this many failed attempts to delete or keep an image, the GCS gives up (the image
    /// stays on its CTS, its record says `failed` and why).
    pub image_task_max_attempts: u32,
    /// The first retry of a failed image task waits this long; each further one twice as long...
    pub image_task_retry_base_millis: u64,
    /// ...up to this.
    pub image_task_retry_max_secs: u64,
    /// How long a broker's AuthorizeRecovery lets the CTS it names take the job over.
    pub recovery_grant_secs: u64,
    /// Bounds on client connections (`[connections]`: header_read_timeout_secs,
    /// idle_timeout_secs, request_timeout_secs, max_connections); keep request_timeout_secs
    /// above cts_timeout_secs, which a DoCheckpoint may wait for.
    pub connections: ServeLimits,
    /// Whether subscription consumers may be at loopback, link-local, private or other
    /// internal addresses (by IP, `localhost` or a name resolving there). Off: the GCS would
    /// otherwise POST into its own network for anyone who subscribes (SSRF).
    pub allow_private_consumers: bool,
    /// Live subscriptions one identity (`role:name`) may hold at once; Subscribe beyond it is
    /// `SubscribeCreationFailed` with code `subscriptions-per-identity-limit`.
    pub max_subscriptions_per_identity: u64,
    /// Live subscriptions the GCS holds at once, all identities together; beyond it:
    /// `SubscribeCreationFailed` with code `subscriptions-limit`.
    pub max_subscriptions: u64,
    /// The most checkpoint records one GetCheckpoints answer holds (its default `Limit`, and
    /// the cap of a larger one); callers follow `Next` for the rest.
    pub checkpoints_page_size: u32,
    /// DoCheckpoint calls this replica forwards to one CTS at once; one more is refused at
    /// once with `ServiceUnavailable`, code `cts-busy`.
    pub max_checkpoints_in_flight_per_cts: usize,
    /// How GetRecoveryInfo judges candidates (`[compatibility]`: `kernel`, `criu_version`,
    /// `cpu`, `mapped_files`, `ignore_missing`; `GCS_COMPATIBILITY_*`): the strict rules of
    /// `gca_protocol::facts` unless relaxed. The recovering CTS applies its own.
    pub compatibility: gca_protocol::facts::Rules,
    /// The key the GCS wraps every job's image key with (a file of 64 hex digits, mode 0600;
    /// every replica reads the same file). Unset with the embedded database:
    /// `<data_dir>/job-key-wrapping.key`, made at first start. Unset otherwise: the GCS holds
    /// no job keys and refuses GetJobKey (`ServiceUnavailable`, code `no-job-keys`).
    pub job_key_wrapping_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            public_url: None,
            database_url: None,
            database_url_file: None,
            data_dir: None,
            db_max_connections: 16,
            max_body_bytes: 1024 * 1024,
            cts_timeout_secs: 60,
            tls: None,
            insecure: false,
            log_format: LogFormat::Text,
            cts_lost_after_secs: 90.0,
            notify_poll_millis: 1000,
            notify_retry_base_millis: 1000,
            notify_retry_max_secs: 300,
            notify_max_attempts: 10,
            notify_timeout_secs: 10,
            notify_concurrency: 16,
            subscription_default_lifetime_secs: 24 * 3600,
            failed_job_lifetime_secs: 7 * 24 * 3600,
            image_task_max_attempts: 12,
            image_task_retry_base_millis: 2000,
            image_task_retry_max_secs: 600,
            recovery_grant_secs: 3600,
            connections: ServeLimits::default(),
            allow_private_consumers: false,
            max_subscriptions_per_identity: 100,
            max_subscriptions: 10_000,
            checkpoints_page_size: 1000,
            max_checkpoints_in_flight_per_cts: 8,
            compatibility: Default::default(),
            job_key_wrapping_key_file: None,
        }
    }
}

impl Config {
    /// The security mode is explicit: mutual TLS, or plain HTTP with `insecure`.
    pub fn check_security(&self) -> anyhow::Result<()> {
        match (&self.tls, self.insecure) {
            (Some(_), true) => anyhow::bail!(
                "both [tls] and insecure = true are set; choose one (insecure serves plain HTTP)"
            ),
            (None, false) => anyhow::bail!(
                "no [tls] configured: the GCS serves mutual TLS only. Give it the site CA and its certificate ([tls] ca/cert/key, or GCS_TLS_CA, GCS_TLS_CERT, GCS_TLS_KEY; make them with `gcactl pki init` and `gcactl pki issue --role gcs`), or set insecure = true (GCS_INSECURE=true) for plain HTTP without authentication"
            ),
            _ => Ok(()),
        }
    }

    /// The database URL: `database_url`, else the contents of `database_url_file`.
    pub fn database_url(&self) -> anyhow::Result<Option<Secret>> {
        match (&self.database_url, &self.database_url_file) {
            (Some(url), _) => Ok(Some(url.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read the database URL file {}", path.display())
                })?;
                Ok(Some(Secret::new(text.trim())))
            }
            (None, None) => Ok(None),
        }
    }

    /// Where the job-key wrapping key is: the configured file, else (embedded database only)
    /// one in the data directory, made when missing; `None`: no job keys.
    pub fn job_key_wrapping(&self) -> Option<(PathBuf, bool)> {
        match (&self.job_key_wrapping_key_file, &self.data_dir) {
            (Some(f), _) => Some((f.clone(), false)),
            (None, Some(dir))
                if self.database_url.is_none() && self.database_url_file.is_none() =>
            {
                Some((dir.join("job-key-wrapping.key"), true))
            }
            _ => None,
        }
    }

    pub fn cts_timeout(&self) -> Duration {
        Duration::from_secs(self.cts_timeout_secs)
    }

    /// Reads the file (when given) and applies the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Applies `GCS_*` variables (and `DATABASE_URL`), read through `var`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        fn parse<T: std::str::FromStr>(key: &str, v: String) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse::<T>()
                .map_err(|e| anyhow::anyhow!("environment variable {key}={v:?} is invalid: {e}"))
        }
        if let Some(v) = var("GCS_LISTEN") {
            self.listen = parse("GCS_LISTEN", v)?;
        }
        if let Some(v) = var("GCS_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = var("GCS_DATABASE_URL").or_else(|| var("DATABASE_URL")) {
            self.database_url = Some(Secret::new(v));
        }
        if let Some(v) = var("GCS_DATABASE_URL_FILE") {
            self.database_url_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("GCS_DATA_DIR") {
            self.data_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = var("GCS_JOB_KEY_WRAPPING_KEY_FILE") {
            self.job_key_wrapping_key_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("GCS_DB_MAX_CONNECTIONS") {
            self.db_max_connections = parse("GCS_DB_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = var("GCS_MAX_BODY_BYTES") {
            self.max_body_bytes = parse("GCS_MAX_BODY_BYTES", v)?;
        }
        if let Some(v) = var("GCS_CTS_TIMEOUT_SECS") {
            self.cts_timeout_secs = parse("GCS_CTS_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = var("GCS_CTS_LOST_AFTER_SECS") {
            self.cts_lost_after_secs = parse("GCS_CTS_LOST_AFTER_SECS", v)?;
        }
        if let Some(v) = var("GCS_NOTIFY_MAX_ATTEMPTS") {
            self.notify_max_attempts = parse("GCS_NOTIFY_MAX_ATTEMPTS", v)?;
        }
        if let Some(v) = var("GCS_FAILED_JOB_LIFETIME_SECS") {
            self.failed_job_lifetime_secs = parse("GCS_FAILED_JOB_LIFETIME_SECS", v)?;
        }
        if let Some(v) = var("GCS_RECOVERY_GRANT_SECS") {
            self.recovery_grant_secs = parse("GCS_RECOVERY_GRANT_SECS", v)?;
        }
        if let Some(v) = var("GCS_IMAGE_TASK_MAX_ATTEMPTS") {
            self.image_task_max_attempts = parse("GCS_IMAGE_TASK_MAX_ATTEMPTS", v)?;
        }
        let tls_file = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let (Some(ca), Some(cert), Some(key)) = (
            tls_file("GCS_TLS_CA"),
            tls_file("GCS_TLS_CERT"),
            tls_file("GCS_TLS_KEY"),
        ) {
            let identity = self.tls.take().map(|t| t.identity).unwrap_or_default();
            self.tls = Some(TlsConfig {
                ca,
                cert,
                key,
                identity,
            });
        } else if ["GCS_TLS_CA", "GCS_TLS_CERT", "GCS_TLS_KEY"]
            .iter()
            .any(|k| tls_file(k).is_some())
        {
            anyhow::bail!("set all three of GCS_TLS_CA, GCS_TLS_CERT and GCS_TLS_KEY, or none");
        }
        if let Some(v) = var("GCS_INSECURE") {
            self.insecure = parse("GCS_INSECURE", v)?;
        }
        if let Some(v) = var("GCS_HEADER_READ_TIMEOUT_SECS") {
            self.connections.header_read_timeout_secs = parse("GCS_HEADER_READ_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = var("GCS_IDLE_TIMEOUT_SECS") {
            self.connections.idle_timeout_secs = parse("GCS_IDLE_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = var("GCS_REQUEST_TIMEOUT_SECS") {
            self.connections.request_timeout_secs = parse("GCS_REQUEST_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = var("GCS_MAX_CONNECTIONS") {
            self.connections.max_connections = parse("GCS_MAX_CONNECTIONS", v)?;
        }
        if let Some(v) = var("GCS_MAX_SUBSCRIPTIONS_PER_IDENTITY") {
            self.max_subscriptions_per_identity = parse("GCS_MAX_SUBSCRIPTIONS_PER_IDENTITY", v)?;
        }
        if let Some(v) = var("GCS_MAX_SUBSCRIPTIONS") {
            self.max_subscriptions = parse("GCS_MAX_SUBSCRIPTIONS", v)?;
        }
        if let Some(v) = var("GCS_CHECKPOINTS_PAGE_SIZE") {
            self.checkpoints_page_size = parse("GCS_CHECKPOINTS_PAGE_SIZE", v)?;
        }
        if let Some(v) = var("GCS_MAX_CHECKPOINTS_IN_FLIGHT_PER_CTS") {
            self.max_checkpoints_in_flight_per_cts =
                parse("GCS_MAX_CHECKPOINTS_IN_FLIGHT_PER_CTS", v)?;
        }
        self.compatibility
            .apply_env("GCS_", &var)
            .map_err(|e| anyhow::anyhow!(e))?;
        if let Some(v) = var("GCS_ALLOW_PRIVATE_CONSUMERS") {
            self.allow_private_consumers = match v.as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => anyhow::bail!("GCS_ALLOW_PRIVATE_CONSUMERS must be true or false, not {v:?}"),
            };
        }
        if let Some(v) = var("GCS_LOG_FORMAT") {
            self.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => anyhow::bail!("GCS_LOG_FORMAT must be text or json, not {v:?}"),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let mut c: Config = toml::from_str(
            "listen = \"0.0.0.0:9000\"\ndatabase_url = \"postgres://u:pw@h/db\"\ncts_timeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(
            !format!("{c:?}").contains("pw"),
            "secrets must not be printed"
        );
        c.apply_env(|k| (k == "GCS_CTS_TIMEOUT_SECS").then(|| "7".to_string()))
            .unwrap();
        assert_eq!(c.cts_timeout_secs, 7);
        let err = c
            .apply_env(|k| (k == "GCS_LISTEN").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("GCS_LISTEN"));
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let c: Config =
            toml::from_str("[connections]\nmax_connections = 7\nheader_read_timeout_secs = 3\n")
                .unwrap();
        assert_eq!(c.connections.max_connections, 7);
        assert_eq!(c.connections.header_read_timeout_secs, 3);
        assert_eq!(
            c.connections.idle_timeout_secs, 60,
            "the others keep their defaults"
        );
        assert!(toml::from_str::<Config>("[connections]\nmax_conns = 7\n").is_err());
    }

    #[test]
    fn limits_from_the_file_and_the_environment() {
        let mut c: Config = toml::from_str("max_subscriptions_per_identity = 3\n").unwrap();
        assert_eq!(c.max_subscriptions_per_identity, 3);
        assert_eq!(c.max_subscriptions, 10_000);
        c.apply_env(|k| (k == "GCS_MAX_SUBSCRIPTIONS").then(|| "5".to_string()))
            .unwrap();
        assert_eq!(c.max_subscriptions, 5);
        let err = c
            .apply_env(|k| (k == "GCS_MAX_SUBSCRIPTIONS_PER_IDENTITY").then(|| "-1".to_string()))
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("GCS_MAX_SUBSCRIPTIONS_PER_IDENTITY"));
        let mut c: Config =
            toml::from_str("checkpoints_page_size = 50\nmax_checkpoints_in_flight_per_cts = 3\n")
                .unwrap();
        assert_eq!(
            (c.checkpoints_page_size, c.max_checkpoints_in_flight_per_cts),
            (50, 3)
        );
        c.apply_env(|k| match k {
            "GCS_CHECKPOINTS_PAGE_SIZE" => Some("20".to_string()),
            "GCS_MAX_CHECKPOINTS_IN_FLIGHT_PER_CTS" => Some("1".to_string()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            (c.checkpoints_page_size, c.max_checkpoints_in_flight_per_cts),
            (20, 1)
        );
    }
}
