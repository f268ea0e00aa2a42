//! Typed configuration: defaults, then a TOML file, then `CTS_*` environment variables, then
//! command-line flags (applied by `main`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use gca_protocol::messages::CtsType;
use gca_protocol::transport::TlsConfig;
use serde::Deserialize;

pub use gca_protocol::driver_config::DriverConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This CTS instance's name (unique in the grid): `[A-Za-z0-9._-]`, 1-64 characters.
    pub name: String,
    /// The computing resource it serves (a host or cluster name).
    pub resource: String,
    /// The EPR address of the Execution Manager whose jobs it checkpoints.
    pub execution_manager: String,
    /// The GCS: its root URL (`http://gcs:8080`) or its SOAP endpoint.
    pub gcs_url: String,
    /// The CTS descriptor (XML) of the type this CTS implements; its name is the type.
    pub descriptor: PathBuf,
    /// Public address (SOAP, images, status).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL other services reach this CTS at; default `http(s)://<listen>`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Jobs, the outbox of records for the GCS, per-job checkpoint directories.
    pub state_dir: PathBuf,
    /// The local-only socket wrappers register jobs on; default `<state_dir>/cts.sock`.
    #[serde(default)]
    pub local_socket: Option<PathBuf>,
    /// How often the CTS re-registers at the GCS (its heartbeat), in seconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// How long a request waits for the GCS to take a record before answering with the record
    /// still queued (it is delivered when the GCS is back), in seconds.
    #[serde(default = "default_gcs_wait")]
    pub gcs_wait_secs: u64,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub driver: DriverConfig,
    /// A cgroup (v2) per job: mode, mount, parent, placement, the type's limits
    /// (`crate::cgroup::CgroupConfig`).
    #[serde(default)]
    pub cgroup: crate::cgroup::CgroupConfig,
    /// Mutual TLS on the public port and for calls to the GCS and other CTSes: the site CA,
    /// this CTS's certificate (`cts:<name>`) and key (which also signs its images), identity
    /// rules. Required unless `insecure`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Plain HTTP, no identities, unsigned images (development only; warned at start).
    #[serde(default)]
    pub insecure: bool,
    /// Bounds on connections, the public port's and the local socket's (`[connections]`:
    /// header_read_timeout_secs, idle_timeout_secs, request_timeout_secs, max_connections).
    #[serde(default)]
    pub connections: gca_protocol::transport::ServeLimits,
    /// How this CTS judges an image it is asked to recover, before anything is fetched
    /// (`[compatibility]`: `kernel`, `criu_version`, `cpu`, `mapped_files`, `ignore_missing`;
    /// `CTS_COMPATIBILITY_*`): the strict rules of `gca_protocol::facts` unless relaxed.
    #[serde(default)]
    pub compatibility: gca_protocol::facts::Rules,
    /// What this CTS reports about its resource instead of what it finds (`[facts]`).
    #[serde(default)]
    pub facts: FactsConfig,
    /// The S3-compatible object store images also go to (`[object_store]`, issue 12); none:
    /// the local store only. Which images go there is `store.durability`.
    #[serde(default)]
    pub object_store: Option<ObjectStoreConfig>,
}

/// How far an image of this CTS's type goes before it counts as taken (`store.durability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The local store only (the default; no object store needed).
    #[default]
    Local,
    /// A checkpoint is acknowledged and registered only once its chunks and manifest are in
    /// the object store; an upload that fails is a fault (the local image stays).
    Replicated,
    /// Registered at once; uploaded in the background, with retries.
    Async,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Replicated => "replicated",
            Self::Async => "async",
        })
    }
}

/// `[object_store]`: the bucket (see `gca_objstore::BucketConfig`). The secret key comes from
/// `secret_access_key_file` or `CTS_OBJECT_STORE_SECRET_ACCESS_KEY`; it is never logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// S3 endpoints, the nearest first (`CTS_OBJECT_STORE_ENDPOINTS`, comma-separated).
    pub endpoints: Vec<String>,
    /// `CTS_OBJECT_STORE_REGION`.
    pub region: String,
    /// `CTS_OBJECT_STORE_BUCKET`.
    pub bucket: String,
    /// `CTS_OBJECT_STORE_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// A file holding the secret access key (its first line); `CTS_OBJECT_STORE_SECRET_ACCESS_KEY_FILE`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Set from `CTS_OBJECT_STORE_SECRET_ACCESS_KEY` only (never in the file).
    #[serde(skip)]
    pub secret_access_key: Option<gca_objstore::Secret>,
    /// Object names start with this.
    #[serde(default)]
    pub prefix: String,
    /// Accept plain `http://` endpoints (a cluster on loopback); objects are sealed either way.
    #[serde(default)]
    pub allow_http: bool,
    /// Bound on one request to the store, in seconds.
    #[serde(default = "default_objstore_timeout")]
    pub request_timeout_secs: u64,
    /// The bucket's identity in checkpoint records (their object-store location), the same
    /// on every CTS that uses this bucket: default `s3://<bucket>/<prefix>`. Set it when two
    /// S3 services hold buckets of the same name. `CTS_OBJECT_STORE_NAME`.
    #[serde(default)]
    pub name: Option<String>,
}

impl ObjectStoreConfig {
    /// The bucket's identity (see [`ObjectStoreConfig::name`]); never a secret.
    pub fn identity(&self) -> String {
        if let Some(n) = self
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            return n.to_string();
        }
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }
}

fn default_objstore_timeout() -> u64 {
    30
}

impl ObjectStoreConfig {
    /// The bucket's configuration, with the secret key read (from the environment or the file).
    pub fn bucket_config(&self) -> anyhow::Result<gca_objstore::BucketConfig> {
        let secret = match (&self.secret_access_key, &self.secret_access_key_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading object_store.secret_access_key_file {}",
                        path.display()
                    )
                })?;
                let line = text.lines().next().unwrap_or("").trim().to_string();
                if line.is_empty() {
                    bail!(
                        "object_store.secret_access_key_file {} is empty",
                        path.display()
                    );
                }
                gca_objstore::Secret::new(line)
            }
            (None, None) => bail!(
                "[object_store] has no secret key: set secret_access_key_file or CTS_OBJECT_STORE_SECRET_ACCESS_KEY"
            ),
        };
        Ok(gca_objstore::BucketConfig {
            endpoints: self.endpoints.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: secret,
            prefix: self.prefix.clone(),
            allow_http: self.allow_http,
            request_timeout_secs: self.request_timeout_secs,
        })
    }
}

/// Overrides of the facts a CTS finds about its resource (`[facts]`). For tests (a resource
/// with another CRIU without installing one) and for a site whose CRIU build reports a
/// misleading version; what is reported is what the GCS and this CTS judge images by.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactsConfig {
    /// Report this CRIU version (`CTS_FACTS_CRIU_VERSION`).
    pub criu_version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Default `<state_dir>/store`.
    pub dir: Option<PathBuf>,
    /// Refuse new images once the store holds this many bytes (0: no limit).
    pub max_bytes: u64,
    /// How often the store is reconciled with the GCS, in seconds (0: never): images the GCS
    /// records as deleted or kept (by the retention policy) are removed, which is how copies
    /// fetched for a recovery go once their job has ended.
    pub reconcile_secs: u64,
    /// Write new images in format 1, every file whole in the image directory, as the stores
    /// before chunks did (for a store older CTSes must still read; default false: format 2,
    /// content-defined chunks deduplicated across the store's images). Either format is read.
    pub whole_files: bool,
    /// `local` (default), `replicated` or `async` (see [`Durability`]); other than `local`
    /// needs `[object_store]` and format 2 (`whole_files = false`). `CTS_STORE_DURABILITY`.
    pub durability: Durability,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 0,
            reconcile_secs: 3600,
            whole_files: false,
            durability: Durability::Local,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Bound on one checkpoint, in seconds.
    pub timeout_secs: u64,
    /// Stop jobs after every checkpoint (a CTS type for migration), unless the request asks.
    pub stop_after: bool,
    /// Signal that stops a job after a checkpoint when the driver did not stop it itself.
    pub stop_signal: String,
    /// Grace period after `stop_signal` before SIGKILL, in seconds.
    pub stop_grace_secs: u64,
    /// Periodic (internal) checkpoints for jobs that do not ask for an interval: seconds
    /// between two, 0 for none.
    pub periodic_interval_secs: u64,
    /// Shortest periodic interval a job may ask for, in seconds.
    pub min_periodic_interval_secs: u64,
    /// A second request for a job whose checkpoint is in flight waits this long for it before
    /// being refused; 0 refuses at once.
    pub busy_wait_secs: u64,
    /// How often the CTS looks for checkpoints jobs took on their own, in milliseconds.
    pub internal_poll_ms: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 300,
            stop_after: false,
            stop_signal: "SIGTERM".into(),
            stop_grace_secs: 10,
            periodic_interval_secs: 0,
            min_periodic_interval_secs: 1,
            busy_wait_secs: 0,
            internal_poll_ms: 1000,
        }
    }
}

/// Bounds on what callers and a GCS that is away can make the CTS hold (`[limits]`); each,
/// when reached, is a clear refusal naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Items the outbox may hold while the GCS does not take them; beyond, new jobs and
    /// checkpoints are refused (`outbox-full`; exits are always taken).
    pub outbox_max_items: usize,
    /// Checkpoints taken at once on this resource; one more waits `checkpoint.busy_wait_secs`
    /// for a place, then is refused (`cts-busy`).
    pub checkpoints_in_flight: usize,
    /// Jobs one local user may have registered here at once (root: no limit).
    pub jobs_per_user: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            outbox_max_items: 100_000,
            checkpoints_in_flight: 4,
            jobs_per_user: 1_000,
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8090".parse().expect("valid address")
}
fn default_heartbeat() -> u64 {
    30
}
fn default_gcs_wait() -> u64 {
    10
}
fn default_max_body() -> usize {
    1024 * 1024
}

impl Config {
    /// Reads `path` (TOML), then applies `CTS_*` environment overrides.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the CTS configuration {}", path.display()))?;
        let mut cfg = Self::from_toml(&text)
            .with_context(|| format!("in the CTS configuration {}", path.display()))?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        if cfg.descriptor.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.descriptor = dir.join(&cfg.descriptor);
            }
        }
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `CTS_NAME`, `CTS_RESOURCE`, `CTS_EXECUTION_MANAGER`, `CTS_GCS_URL`, `CTS_LISTEN`,
    /// `CTS_PUBLIC_URL`, `CTS_STATE_DIR`, `CTS_LOCAL_SOCKET`, `CTS_STORE_DIR`, `CTS_TLS_CA`,
    /// `CTS_TLS_CERT`, `CTS_TLS_KEY`, `CTS_LIMITS_OUTBOX_MAX_ITEMS`,
    /// `CTS_LIMITS_CHECKPOINTS_IN_FLIGHT`, `CTS_LIMITS_JOBS_PER_USER`, `CTS_INSECURE`,
    /// `CTS_COMPATIBILITY_{KERNEL,CRIU_VERSION,CPU,MAPPED_FILES,IGNORE_MISSING}`,
    /// `CTS_FACTS_CRIU_VERSION`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(v) = get("CTS_NAME") {
            self.name = v;
        }
        if let Some(v) = get("CTS_RESOURCE") {
            self.resource = v;
        }
        if let Some(v) = get("CTS_EXECUTION_MANAGER") {
            self.execution_manager = v;
        }
        if let Some(v) = get("CTS_GCS_URL") {
            self.gcs_url = v;
        }
        if let Some(v) = get("CTS_LISTEN") {
            self.listen = v
                .parse()
                .with_context(|| format!("CTS_LISTEN={v:?} is not an address"))?;
        }
        if let Some(v) = get("CTS_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = get("CTS_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = get("CTS_LOCAL_SOCKET") {
            self.local_socket = Some(v.into());
        }
        if let Some(v) = get("CTS_STORE_DIR") {
            self.store.dir = Some(v.into());
        }
        if let Some(v) = get("CTS_STORE_DURABILITY") {
            self.store.durability = match v.as_str() {
                "local" => Durability::Local,
                "replicated" => Durability::Replicated,
                "async" => Durability::Async,
                _ => bail!("CTS_STORE_DURABILITY={v:?}: local, replicated or async"),
            };
        }
        self.apply_object_store_env(&get)?;
        if let Some(v) = get("CTS_CGROUP_MODE") {
            self.cgroup.mode = match v.as_str() {
                "auto" => crate::cgroup::CgroupMode::Auto,
                "on" => crate::cgroup::CgroupMode::On,
                "off" => crate::cgroup::CgroupMode::Off,
                _ => bail!("CTS_CGROUP_MODE={v:?}: auto, on or off"),
            };
        }
        if let Some(v) = get("CTS_CGROUP_PARENT") {
            self.cgroup.parent = v;
        }
        let file = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        match (
            file("CTS_TLS_CA"),
            file("CTS_TLS_CERT"),
            file("CTS_TLS_KEY"),
        ) {
            (Some(ca), Some(cert), Some(key)) => {
                let identity = self.tls.take().map(|t| t.identity).unwrap_or_default();
                self.tls = Some(TlsConfig {
                    ca,
                    cert,
                    key,
                    identity,
                });
            }
            (None, None, None) => {}
            _ => bail!("set all three of CTS_TLS_CA, CTS_TLS_CERT and CTS_TLS_KEY, or none"),
        }
        let number = |k: &str| -> anyhow::Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.parse()
                        .with_context(|| format!("{k}={v:?} is not a whole number"))
                })
                .transpose()
        };
        if let Some(v) = number("CTS_LIMITS_OUTBOX_MAX_ITEMS")? {
            self.limits.outbox_max_items = v;
        }
        if let Some(v) = number("CTS_LIMITS_CHECKPOINTS_IN_FLIGHT")? {
            self.limits.checkpoints_in_flight = v;
        }
        if let Some(v) = number("CTS_LIMITS_JOBS_PER_USER")? {
            self.limits.jobs_per_user = v;
        }
        self.compatibility
            .apply_env("CTS_", &get)
            .map_err(|e| anyhow::anyhow!(e))?;
        if let Some(v) = get("CTS_FACTS_CRIU_VERSION") {
            self.facts.criu_version = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("CTS_INSECURE") {
            self.insecure = v
                .parse()
                .with_context(|| format!("CTS_INSECURE={v:?} is not true or false"))?;
        }
        self.validate()
    }

    /// `CTS_OBJECT_STORE_{ENDPOINTS,REGION,BUCKET,ACCESS_KEY_ID,SECRET_ACCESS_KEY,
    /// SECRET_ACCESS_KEY_FILE,PREFIX,ALLOW_HTTP,NAME}`: with `ENDPOINTS` they make an `[object_store]`
    /// the file may not have.
    fn apply_object_store_env(
        &mut self,
        get: &impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<()> {
        let v = |k: &str| get(&format!("CTS_OBJECT_STORE_{k}")).filter(|v| !v.is_empty());
        if self.object_store.is_none() {
            let Some(endpoints) = v("ENDPOINTS") else {
                return Ok(());
            };
            let need = |k: &str| {
                v(k).with_context(|| {
                    format!("CTS_OBJECT_STORE_ENDPOINTS is set without CTS_OBJECT_STORE_{k}")
                })
            };
            self.object_store = Some(ObjectStoreConfig {
                endpoints: Vec::new(),
                region: need("REGION")?,
                bucket: need("BUCKET")?,
                access_key_id: need("ACCESS_KEY_ID")?,
                secret_access_key_file: None,
                secret_access_key: None,
                prefix: String::new(),
                allow_http: false,
                request_timeout_secs: default_objstore_timeout(),
                name: None,
            });
            let _ = endpoints;
        }
        let os = self.object_store.as_mut().expect("set above");
        if let Some(e) = v("ENDPOINTS") {
            os.endpoints = e
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(x) = v("REGION") {
            os.region = x;
        }
        if let Some(x) = v("BUCKET") {
            os.bucket = x;
        }
        if let Some(x) = v("ACCESS_KEY_ID") {
            os.access_key_id = x;
        }
        if let Some(x) = v("SECRET_ACCESS_KEY") {
            os.secret_access_key = Some(gca_objstore::Secret::new(x));
        }
        if let Some(x) = v("SECRET_ACCESS_KEY_FILE") {
            os.secret_access_key_file = Some(x.into());
        }
        if let Some(x) = v("PREFIX") {
            os.prefix = x;
        }
        if let Some(x) = v("NAME") {
            os.name = Some(x);
        }
        if let Some(x) = v("ALLOW_HTTP") {
            os.allow_http = x.parse().with_context(|| {
                format!("CTS_OBJECT_STORE_ALLOW_HTTP={x:?} is not true or false")
            })?;
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.store.durability != Durability::Local {
            if self.object_store.is_none() {
                bail!(
                    "store.durability = {:?} needs an [object_store] (or CTS_OBJECT_STORE_*); use \"local\" without one",
                    self.store.durability.to_string()
                );
            }
            if self.store.whole_files {
                bail!(
                    "store.durability = {:?} needs chunked images: set store.whole_files = false",
                    self.store.durability.to_string()
                );
            }
        }
        if let Some(os) = &self.object_store {
            if os.endpoints.is_empty() {
                bail!("[object_store] endpoints is empty");
            }
        }
        if !gca_protocol::descriptor::is_valid_name(&self.name) {
            bail!(gca_protocol::descriptor::invalid_name_message(
                "CTS name", &self.name
            ));
        }
        if self.resource.trim().is_empty() || self.execution_manager.trim().is_empty() {
            bail!("resource and execution_manager must not be empty");
        }
        for (what, url) in [
            ("gcs_url", Some(&self.gcs_url)),
            ("public_url", self.public_url.as_ref()),
        ] {
            if let Some(url) = url {
                match reqwest::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    _ => bail!("{what} {url:?} is not an http(s) URL"),
                }
            }
        }
        match (&self.tls, self.insecure) {
            (Some(_), true) => bail!("both [tls] and insecure = true are set; choose one"),
            (None, false) => bail!(
                "no [tls] configured: the CTS serves and calls with mutual TLS only. Give it the site CA and its certificate ([tls] ca/cert/key, or CTS_TLS_CA, CTS_TLS_CERT, CTS_TLS_KEY; make them with `gcactl pki issue --role cts --name {}`), or set insecure = true (CTS_INSECURE=true) for plain HTTP without authentication",
                self.name
            ),
            _ => {}
        }
        if self.heartbeat_secs == 0 {
            bail!("heartbeat_secs must be at least 1");
        }
        for (key, v) in [
            ("limits.outbox_max_items", self.limits.outbox_max_items),
            (
                "limits.checkpoints_in_flight",
                self.limits.checkpoints_in_flight,
            ),
            ("limits.jobs_per_user", self.limits.jobs_per_user),
        ] {
            if v == 0 {
                bail!("{key} must be at least 1");
            }
        }
        if self.checkpoint.timeout_secs == 0 {
            bail!("checkpoint.timeout_secs must be at least 1");
        }
        if gca_drivers::proc::parse_signal(&self.checkpoint.stop_signal).is_none() {
            bail!(
                "checkpoint.stop_signal {:?} is not a signal name (e.g. SIGTERM)",
                self.checkpoint.stop_signal
            );
        }
        Ok(())
    }

    /// Reads and validates the descriptor of the type this CTS implements.
    pub fn load_descriptor(&self) -> anyhow::Result<CtsType> {
        let text = std::fs::read_to_string(&self.descriptor)
            .with_context(|| format!("reading the CTS descriptor {}", self.descriptor.display()))?;
        gca_protocol::descriptor::parse(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.descriptor.display()))
    }

    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", self.listen)
            }
        }
    }

    /// The GCS SOAP endpoint.
    pub fn gcs_endpoint(&self) -> String {
        let url = self.gcs_url.trim_end_matches('/');
        match reqwest::Url::parse(url) {
            Ok(u) if u.path() != "/" && !u.path().is_empty() => url.to_string(),
            _ => format!("{url}{}", gca_protocol::ns::GCS_SERVICE_PATH),
        }
    }

    pub fn local_socket(&self) -> PathBuf {
        self.local_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cts.sock"))
    }

    pub fn store_dir(&self) -> PathBuf {
        self.store
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("store"))
    }

    pub fn checkpoint_timeout(&self) -> Duration {
        Duration::from_secs(self.checkpoint.timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configurations in `examples/` are valid, with their descriptors.
    #[test]
    fn example_configurations_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("cts-")
            {
                continue;
            }
            let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            cfg.load_descriptor()
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            gca_drivers::make_driver(&cfg.driver)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            seen += 1;
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn environment_overrides_and_clear_errors() {
        let text = "name = \"a\"\nresource = \"r\"\nexecution_manager = \"em\"\ngcs_url = \"http://gcs:8080\"\ndescriptor = \"d.xml\"\nstate_dir = \"/tmp/x\"\ninsecure = true\n[driver]\nkind = \"application\"\n";
        let mut cfg = Config::from_toml(text).unwrap();
        assert_eq!(
            cfg.gcs_endpoint(),
            "http://gcs:8080/wsrf/services/GridCheckpointService"
        );
        assert_eq!(cfg.local_socket(), Path::new("/tmp/x/cts.sock"));
        cfg.apply_env(|k| (k == "CTS_NAME").then(|| "b".to_string()))
            .unwrap();
        assert_eq!(cfg.name, "b");
        let err = cfg
            .apply_env(|k| (k == "CTS_NAME").then(|| "bad name".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
        let err = Config::from_toml(&text.replace("kind = \"application\"", "kind = \"blcr\""))
            .unwrap_err();
        assert!(format!("{err:#}").contains("blcr"), "{err:#}");
        let err = Config::from_toml(&format!("{text}\n[store]\nmax = 3\n")).unwrap_err();
        assert!(format!("{err:#}").contains("max"), "{err:#}");
    }

    /// `store.durability` other than local needs an object store; the secret key comes from
    /// the environment or a file and never shows in `Debug`.
    #[test]
    fn durability_and_object_store() {
        let text = "name = \"a\"\nresource = \"r\"\nexecution_manager = \"em\"\ngcs_url = \"http://gcs:8080\"\ndescriptor = \"d.xml\"\nstate_dir = \"/tmp/x\"\ninsecure = true\n[driver]\nkind = \"application\"\n";
        let cfg = Config::from_toml(text).unwrap();
        assert_eq!(cfg.store.durability, Durability::Local);
        assert!(cfg.object_store.is_none());
        let err = Config::from_toml(&format!("{text}[store]\ndurability = \"replicated\"\n"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("[object_store]"), "{err:#}");
        let mut cfg = Config::from_toml(text).unwrap();
        let env = |k: &str| {
            match k {
                "CTS_STORE_DURABILITY" => Some("async"),
                "CTS_OBJECT_STORE_ENDPOINTS" => {
                    Some("http://127.0.0.1:3900, http://127.0.0.1:3910")
                }
                "CTS_OBJECT_STORE_REGION" => Some("garage"),
                "CTS_OBJECT_STORE_BUCKET" => Some("b"),
                "CTS_OBJECT_STORE_ACCESS_KEY_ID" => Some("GKid"),
                "CTS_OBJECT_STORE_SECRET_ACCESS_KEY" => Some("very-secret"),
                "CTS_OBJECT_STORE_ALLOW_HTTP" => Some("true"),
                _ => None,
            }
            .map(str::to_string)
        };
        cfg.apply_env(env).unwrap();
        assert_eq!(cfg.store.durability, Durability::Async);
        let os = cfg.object_store.as_ref().unwrap();
        assert_eq!(os.endpoints.len(), 2);
        assert!(!format!("{cfg:?}").contains("very-secret"));
        let b = os.bucket_config().unwrap();
        assert_eq!(b.secret_access_key.expose(), "very-secret");
        assert!(b.allow_http);
        let err = Config::from_toml(&format!(
            "{text}[object_store]\nendpoints = [\"http://h:1\"]\nregion = \"r\"\nbucket = \"b\"\naccess_key_id = \"k\"\n"
        ))
        .unwrap()
        .object_store
        .unwrap()
        .bucket_config()
        .unwrap_err();
        assert!(format!("{err:#}").contains("secret"), "{err:#}");
    }
}
