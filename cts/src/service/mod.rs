//! The CTS service: the one [`Cts`] object the HTTP layer (`crate::http`) calls, which only
//! translates between the wire and these methods. Its methods are split by concern:
//!
//! - [`jobs`]: the registry of the jobs running here and its persistence (`state_dir/jobs`),
//!   each job's mutable state under one lock;
//! - [`registration`]: local registration by the wrappers (paper 3.4.1), recovery
//!   registrations and their withdrawal, exits reported by a wrapper;
//! - [`checkpoint`]: one checkpoint (doCheckpoint, paper 5.2), and collecting one the job
//!   took on its own;
//! - [`watch`]: per-job background work: the exit watcher, periodic checkpoints, polling for
//!   internal checkpoints;
//! - [`recovery`]: getting a checkpoint's image into this store for a recovery, verified
//!   against the GCS's record;
//! - [`reconcile`]: removing images the GCS records as deleted or kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gca_drivers::CoreCheckpointer;
use gca_protocol::cts_api::{Load, Status};
use gca_protocol::local::LocalInfo;
use gca_protocol::messages::{CtsInstance, CtsType};
use gca_protocol::placeholders::Values;
use gca_store::ImageStore;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gcs_link::GcsLink;

mod checkpoint;
mod jobs;
mod reconcile;
mod recovery;
mod registration;
mod tier;
mod watch;

use jobs::Job;
pub use registration::LocalCaller;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Cts {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    cts_type: CtsType,
    instance: CtsInstance,
    driver: Arc<dyn CoreCheckpointer>,
    driver_check: String,
    /// The CRIU binary of a CRIU driver (for `criu cpuinfo check` before a recovery).
    criu: Option<std::path::PathBuf>,
    store: ImageStore,
    link: GcsLink,
    /// For fetching images from other CTSes: bounded by progress, not by a whole-request
    /// timeout (`transport::transfer_client`).
    transfers: reqwest::Client,
    /// Signs the images this CTS takes (`None` in insecure mode).
    signer: Option<gca_protocol::signature::Signer>,
    /// Checks the signatures of images this CTS recovers from (`None` in insecure mode).
    verifier: Option<gca_protocol::signature::Verifier>,
    /// Peers the GCS confirmed may read an image of ours (see [`crate::policy`]), and when.
    peer_grants: Mutex<HashMap<(String, String), std::time::Instant>>,
    /// The jobs running here, by GID (see [`jobs`]).
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    in_flight: AtomicU64,
    /// Places for checkpoints taken at once (`limits.checkpoints_in_flight`).
    checkpoint_places: Arc<tokio::sync::Semaphore>,
    /// Exit statuses of jobs from the kernel (`None`: not available here, see the log).
    exit_events: Option<Arc<gca_drivers::exits::ExitEvents>>,
    checkpoints_taken: AtomicU64,
    /// Job cgroups (`crate::cgroup`), as probed at start.
    cgroups: crate::cgroup::Cgroups,
    /// The object store (`[object_store]`), if any, and this type's durability.
    tier: Option<tier::Tier>,
    cancel: CancellationToken,
}

/// The `[driver] namespaces` setting as the status shows it (`none` for non-CRIU drivers).
fn namespace_mode(config: &Config) -> String {
    match &config.driver {
        gca_protocol::driver_config::DriverConfig::Criu(c) => serde_json::to_value(c.namespaces)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        _ => "none".into(),
    }
}

/// Why jobs of this CRIU type will not get namespaces, if this host cannot give them (a
/// kernel or container without PID or mount namespaces); the wrappers fall back (`auto`) or
/// refuse (`on`).
fn namespace_note(config: &Config) -> Option<String> {
    let wanted = !matches!(namespace_mode(config).as_str(), "off" | "none");
    let missing: Vec<&str> = ["pid", "mnt"]
        .into_iter()
        .filter(|ns| !std::path::Path::new(&format!("/proc/self/ns/{ns}")).exists())
        .collect();
    (wanted && !missing.is_empty()).then(|| {
        format!(
            "this host has no {} namespaces: jobs keep their host PIDs",
            missing.join(" and ")
        )
    })
}

impl Cts {
    /// Builds the service: checks the driver, opens the store and the outbox, reloads the
    /// jobs of a previous run that still run. Background work starts with [`Cts::start`].
    pub async fn new(
        config: Config,
        cts_type: CtsType,
        driver: Arc<dyn CoreCheckpointer>,
        http: reqwest::Client,
        transfers: reqwest::Client,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let driver_check = driver.self_check().await.map_err(|e| {
            anyhow::anyhow!(
                "the {} core checkpointer is not usable: {}",
                driver.kind(),
                e.message
            )
        })?;
        for dir in [
            config.state_dir.join("jobs"),
            config.state_dir.join("checkpoint"),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let max = (config.store.max_bytes > 0).then_some(config.store.max_bytes);
        let store = ImageStore::open_with(&config.store_dir(), max, config.store.whole_files)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // What this resource offers a restore, reported with every registration.
        let criu = gca_drivers::facts::criu_of(&config.driver);
        let mut facts = gca_drivers::facts::resource_facts(criu.as_deref()).await;
        if let Some(v) = &config.facts.criu_version {
            tracing::warn!(found = ?facts.criu_version, reported = %v, "reporting the CRIU version configured in [facts], not the one found");
            facts.criu_version = Some(v.clone());
        }
        tracing::info!(architecture = %facts.architecture, kernel = %facts.kernel, criu = ?facts.criu_version, cpuinfo = facts.cpuinfo.is_some(), "resource facts");
        let instance = CtsInstance {
            name: config.name.clone(),
            cts_type: cts_type.name.clone(),
            url: format!(
                "{}{}",
                config.public_url(),
                gca_protocol::ns::CTS_SERVICE_PATH
            ),
            execution_manager: config.execution_manager.clone(),
            resource: config.resource.clone(),
            registered_at: None,
            last_seen: None,
            facts: Some(facts),
        };
        let (signer, verifier) =
            match &config.tls {
                Some(tls) => (
                    Some(gca_protocol::signature::Signer::from_tls(tls).map_err(|e| {
                        anyhow::anyhow!("the CTS's signing key (its TLS key): {e:#}")
                    })?),
                    Some(gca_protocol::signature::Verifier::from_tls(tls)?),
                ),
                None => (None, None),
            };
        let client = gca_protocol::client::SoapClient::new(http.clone(), config.gcs_endpoint());
        let link = GcsLink::open(
            client,
            instance.clone(),
            &config.state_dir.join("outbox"),
            Duration::from_secs(config.heartbeat_secs),
            config.limits.outbox_max_items,
        )?;
        let exit_events = match gca_drivers::exits::ExitEvents::shared() {
            Ok(e) => Some(e),
            Err(why) => {
                tracing::warn!(reason = %why, "job exit statuses may be unknown");
                None
            }
        };
        let cgroups = crate::cgroup::Cgroups::probe(&config.cgroup)?;
        match namespace_note(&config) {
            Some(why) => tracing::warn!(reason = %why, "jobs get no namespaces of their own"),
            None if !matches!(namespace_mode(&config).as_str(), "off" | "none") => {
                tracing::info!(namespaces = %namespace_mode(&config),
                "jobs of this type run in their own PID and mount namespaces where their wrapper can create them ([driver] namespaces)")
            }
            None => {}
        }
        let checkpoint_places = Arc::new(tokio::sync::Semaphore::new(
            config.limits.checkpoints_in_flight,
        ));
        let tier = match &config.object_store {
            Some(os) => {
                let bucket = gca_objstore::Bucket::open(&os.bucket_config()?)
                    .map_err(|e| anyhow::anyhow!("[object_store]: {e}"))?;
                tracing::info!(endpoints = ?os.endpoints, bucket = %os.bucket, durability = %config.store.durability, "object store tier on");
                Some(tier::Tier::new(
                    bucket,
                    config.store.durability,
                    os.identity(),
                ))
            }
            None => None,
        };
        let cts = Cts {
            inner: Arc::new(Inner {
                config,
                cts_type,
                instance,
                driver,
                driver_check,
                criu,
                store,
                link,
                transfers,
                signer,
                verifier,
                peer_grants: Mutex::new(HashMap::new()),
                jobs: Mutex::new(HashMap::new()),
                in_flight: AtomicU64::new(0),
                checkpoint_places,
                exit_events,
                checkpoints_taken: AtomicU64::new(0),
                cgroups,
                tier,
                cancel: CancellationToken::new(),
            }),
        };
        cts.reload_jobs();
        cts.settle_unfinished_checkpoints().await;
        Ok(cts)
    }

    /// Starts the GCS link, the store's reconciliation and the per-job watchers; they stop on
    /// [`Cts::shutdown`].
    pub fn start(&self) {
        tokio::spawn(self.inner.link.clone().run(
            Arc::new(self.clone()) as Arc<dyn crate::gcs_link::LocalJobs>,
            self.inner.cancel.child_token(),
        ));
        self.spawn_reconciler();
        let jobs: Vec<Arc<Job>> = self.jobs().values().cloned().collect();
        for job in jobs {
            self.spawn_job_tasks(job);
        }
    }

    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether images also go to an object store (`[object_store]`).
    pub fn has_object_store(&self) -> bool {
        self.inner.tier.is_some()
    }

    pub fn store(&self) -> &ImageStore {
        &self.inner.store
    }

    pub fn instance(&self) -> &CtsInstance {
        &self.inner.instance
    }

    /// What this resource offers a restore, as reported to the GCS.
    pub fn resource_facts(&self) -> gca_protocol::facts::ResourceFacts {
        self.inner.instance.facts.clone().unwrap_or_default()
    }

    pub fn link(&self) -> &GcsLink {
        &self.inner.link
    }

    pub(crate) fn peer_grants(
        &self,
    ) -> parking_lot::MutexGuard<'_, HashMap<(String, String), std::time::Instant>> {
        self.inner.peer_grants.lock()
    }

    /// The job an image of this store belongs to (its manifest's `gid`).
    pub(crate) async fn gid_of_image(&self, image: &str) -> Option<String> {
        let id = gca_store::ImageId::parse(image).ok()?;
        Some(self.inner.store.manifest(&id).await.ok()?.meta.gid)
    }

    pub fn status(&self) -> Status {
        Status {
            instance: self.inner.instance.clone(),
            descriptor: self.inner.cts_type.clone(),
            driver: self.inner.driver.kind().to_string(),
            driver_check: self.inner.driver_check.clone(),
            gcs: self.inner.link.status(),
            load: Load {
                jobs: self.jobs().len(),
                checkpoints_in_flight: self.inner.in_flight.load(Ordering::Relaxed),
                checkpoints_taken: self.inner.checkpoints_taken.load(Ordering::Relaxed),
                store_bytes: self.inner.store.usage(),
                store_max_bytes: (self.inner.config.store.max_bytes > 0)
                    .then_some(self.inner.config.store.max_bytes),
            },
            isolation: self.inner.cgroups.status(match &self.inner.config.driver {
                gca_protocol::driver_config::DriverConfig::Criu(c) => {
                    serde_json::to_value(c.namespaces)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                }
                _ => "none".into(),
            }),
        }
    }

    pub fn local_info(&self) -> LocalInfo {
        LocalInfo {
            name: self.inner.instance.name.clone(),
            cts_type: self.inner.cts_type.name.clone(),
            resource: self.inner.instance.resource.clone(),
            url: self.inner.instance.url.clone(),
            socket: self.inner.config.local_socket(),
            driver: self.inner.driver.kind().to_string(),
            gcs_url: self.inner.config.gcs_url.clone(),
            driver_config: Some(self.inner.config.driver.clone()),
            recovery_job_parameters: self.inner.cts_type.recovery_job_parameters.clone(),
        }
    }

    fn base_values(&self) -> Values {
        let i = &self.inner.instance;
        Values::new()
            .set("CTS_URL", i.url.clone())
            .set("CTS_NAME", i.name.clone())
            .set("CTS_TYPE", i.cts_type.clone())
            .set("RESOURCE", i.resource.clone())
            .set("EXECUTION_MANAGER", i.execution_manager.clone())
            .set(
                "GCS_URL",
                self.inner.config.gcs_url.trim_end_matches('/').to_string(),
            )
    }

    fn job_values(&self, job: &Job) -> Values {
        self.base_values()
            .set("GID", job.gid.clone())
            .set("CHECKPOINT_DIR", job.checkpoint_dir.display().to_string())
            .set("PID", job.pid.to_string())
    }

    fn gcs_wait(&self) -> Duration {
        Duration::from_secs(self.inner.config.gcs_wait_secs)
    }
}
