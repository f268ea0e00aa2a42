//! The GCS service layer: every operation, once, for both the SOAP and the JSON transport.
//! Transport code parses and serializes; the decisions are made here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gca_protocol::client::SoapClient;
use gca_protocol::fault::FaultKind;
use gca_protocol::identity::Caller;
use gca_protocol::messages::*;
use gca_protocol::ops::CtsDoCheckpointOp;
use gca_protocol::placeholders::{self, Values};
use gca_protocol::{descriptor, Fault};
use sqlx::PgPool;

use crate::config::Config;
use crate::db;
use crate::error::{violated_constraint, Error, Result};
use crate::notify::emit;
use crate::policy::{self, Op};
use gca_protocol::wsn::Topic;

/// Shared by every request; cheap to clone. Holds no registry state: that is all in the
/// database, so replicas can share one.
#[derive(Clone)]
pub struct Gcs {
    pub db: PgPool,
    /// Calls to CTSes, with the GCS's client certificate.
    pub http: reqwest::Client,
    /// Notifications to consumers: no client certificate.
    pub consumers: reqwest::Client,
    /// Checks image signatures against the site CA (`None` in insecure mode).
    pub verifier: Option<gca_protocol::signature::Verifier>,
    pub authenticator: gca_protocol::identity::Authenticator,
    pub config: Arc<Config>,
    /// Wakes this replica's notification deliverer after a commit (a signal, not state).
    pub wake: Arc<tokio::sync::Notify>,
    /// Wakes this replica's image task runner after a commit (see [`crate::retention`]).
    pub image_wake: Arc<tokio::sync::Notify>,
    /// The database is reachable and migrated (see [`Gcs::unmigrated`]): until then requests
    /// get `ServiceUnavailable` and `/healthz` says why.
    pub ready: tokio::sync::watch::Receiver<bool>,
    pub(crate) ready_tx: Arc<tokio::sync::watch::Sender<bool>>,
    /// DoCheckpoint calls this replica has in flight to each CTS (a bound, not state).
    pub in_flight: Arc<crate::inflight::InFlight>,
    /// Wraps the jobs' image keys (`None`: this GCS holds none; see
    /// [`crate::config::Config::job_key_wrapping_key_file`]).
    pub job_keys: Option<Arc<crate::job_keys::KeyWrapper>>,
}

/// Per-request context the service needs from the transport.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// This GCS's public URL (root), for `{GCS_URL}`.
    pub gcs_url: String,
    /// Who is asking (see [`crate::policy`]).
    pub caller: Caller,
}

const MAX_LIST: i64 = 1000;
const DEFAULT_LIST: i64 = 100;

/// Names of classes, types and instances: 1-64 of `[A-Za-z0-9._-]`, starting alphanumeric.
fn check_name(what: &str, value: &str) -> Result<()> {
    if descriptor::is_valid_name(value) {
        Ok(())
    } else {
        Err(Error::invalid(descriptor::invalid_name_message(
            what, value,
        )))
    }
}

/// GIDs and checkpoint IDs: chosen by brokers and CTSes, restricted to the one rule of
/// [`gca_protocol::ids`] (they reach command templates run as root).
fn check_id(what: &str, value: &str) -> Result<()> {
    gca_protocol::ids::check(what, value).map_err(|e| Error::invalid(e.to_string()))
}

/// The fault for recovering from a checkpoint whose image is no longer in a CTS's store.
fn image_gone(c: &CheckpointRecord) -> Error {
    let where_ = match (c.image_state, &c.kept_in) {
        (ImageState::Kept, Some(dir)) => format!(
            "was moved to the owner's directory {dir} (on the resource of CTS {:?}) by the job's retention policy",
            c.cts_name
        ),
        (ImageState::Deleted | ImageState::Deleting, _) => {
            "was deleted when the job ended (its retention policy keeps no images)".to_string()
        }
        (state, _) => format!("is {state}, not stored"),
    };
    Error::Fault(
        Fault::resource_unknown(format!(
            "cannot recover job {:?} from checkpoint {:?}: its image {where_}",
            c.gid, c.id
        ))
        .with_code("image-not-stored"),
    )
}

fn unknown_instance(name: &str) -> Error {
    Error::Fault(
        Fault::resource_unknown(format!(
            "no CTS instance named {name:?} is registered; a CTS registers itself when it starts"
        ))
        .with_code("unknown-cts-instance"),
    )
}

fn check_url(what: &str, value: &str) -> Result<()> {
    match reqwest::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(Error::invalid(format!(
            "{what} {value:?} is not an http(s) URL"
        ))),
    }
}

fn sorted_unique(props: &[Property], what: &str) -> Result<Vec<Property>> {
    let mut seen = BTreeMap::new();
    for p in props {
        if p.name.is_empty() {
            return Err(Error::invalid(format!("{what} with an empty name")));
        }
        if seen.insert(p.name.clone(), p.value.clone()).is_some() {
            return Err(Error::invalid(format!(
                "{what} {:?} is given more than once",
                p.name
            )));
        }
    }
    Ok(seen
        .into_iter()
        .map(|(name, value)| Property { name, value })
        .collect())
}

/// A CTS type's properties for class membership and FindCTS: the core service's functional
/// properties plus its capabilities as `external-checkpoints`, `internal-checkpoints`,
/// `recover-on-other-resource` and `recover-from-any-image` = `true`/`false`.
pub fn effective_properties(cts: &CtsType) -> BTreeMap<String, String> {
    let c = &cts.core_service;
    let mut m: BTreeMap<String, String> = c
        .properties
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    m.insert(
        "external-checkpoints".into(),
        c.external_checkpoints.to_string(),
    );
    m.insert(
        "internal-checkpoints".into(),
        c.internal_checkpoints.to_string(),
    );
    m.insert(
        "recover-on-other-resource".into(),
        c.recover_on_other_resource.to_string(),
    );
    m.insert(
        "recover-from-any-image".into(),
        c.recover_from_any_image.to_string(),
    );
    m
}

fn values_for(instance: &CtsInstance, ctx: &Ctx) -> Values {
    Values::new()
        .set("CTS_URL", instance.url.clone())
        .set("CTS_NAME", instance.name.clone())
        .set("CTS_TYPE", instance.cts_type.clone())
        .set("RESOURCE", instance.resource.clone())
        .set("EXECUTION_MANAGER", instance.execution_manager.clone())
        .set("GCS_URL", ctx.gcs_url.clone())
}

fn expand(patterns: &[String], values: &Values) -> Result<Vec<String>> {
    placeholders::expand_all_partial(patterns, values).map_err(|e| match e {
        placeholders::PatternError::BadValue { .. } => Error::invalid(e.to_string()),
        e => Error::Internal(anyhow::anyhow!("stored descriptor has a bad pattern: {e}")),
    })
}

fn expand_env(env: &[Property], values: &Values) -> Result<Vec<Property>> {
    env.iter()
        .map(|p| {
            Ok(Property {
                name: p.name.clone(),
                value: expand(std::slice::from_ref(&p.value), values)?.remove(0),
            })
        })
        .collect()
}

impl Gcs {
    async fn job(&self, gid: &str) -> Result<Job> {
        check_id("GID", gid)?;
        db::get_job(&self.db, gid).await?.ok_or_else(|| {
            Error::Fault(
                Fault::resource_unknown(format!(
                    "no job with GID {gid:?} is registered; jobs are registered by the CTS when their wrapper starts"
                ))
                .with_code("unknown-gid"),
            )
        })
    }

    async fn instance(&self, name: &str) -> Result<CtsInstance> {
        db::get_instance(&self.db, name)
            .await?
            .ok_or_else(|| unknown_instance(name))
    }

    async fn cts_type(&self, name: &str) -> Result<CtsType> {
        db::get_type(&self.db, name).await?.ok_or_else(|| {
            Error::Fault(
                Fault::resource_unknown(format!(
                    "no CTS type named {name:?} is registered; an admin registers its descriptor first (gcactl type register FILE)"
                ))
                .with_code("unknown-cts-type"),
            )
        })
    }

    // ---- broker -------------------------------------------------------------------------

    /// doCheckpoint (paper 5.2): find the CTS in charge, forward, record, return.
    pub async fn do_checkpoint(&self, ctx: &Ctx, req: DoCheckpoint) -> Result<CheckpointRecord> {
        policy::authorize(&ctx.caller, Op::DoCheckpoint)?;
        let job = self.job(&req.gid).await?;
        match job.state {
            JobState::Running => {}
            JobState::Finished => {
                return Err(Error::conflict(format!(
                    "job {:?} has finished; there is nothing left to checkpoint",
                    job.gid
                )))
            }
            JobState::Stopped => {
                return Err(Error::conflict(format!(
                    "job {:?} was stopped after its last checkpoint; recover it before checkpointing again",
                    job.gid
                )))
            }
            JobState::Recovering => {
                return Err(Error::conflict(format!(
                    "job {:?} is being recovered by CTS {:?}; retry when it runs again",
                    job.gid, job.cts_instance
                )))
            }
        }
        let instance = self.instance(&job.cts_instance).await?;
        let cts_type = self.cts_type(&instance.cts_type).await?;
        if !cts_type.core_service.external_checkpoints {
            return Err(Error::conflict(format!(
                "CTS type {:?} ({}) only takes checkpoints on its own; it does not accept doCheckpoint requests",
                cts_type.name, cts_type.core_service.name
            )));
        }
        let limit = self.config.max_checkpoints_in_flight_per_cts;
        let _place = self.in_flight.try_take(&instance.name, limit).map_err(|n| {
            tracing::warn!(gid = %job.gid, cts.name = %instance.name, in_flight = n, "doCheckpoint refused: the CTS has its limit of checkpoints in flight");
            Error::Fault(
                Fault::new(
                    FaultKind::ServiceUnavailable,
                    format!(
                        "CTS {:?} has {n} checkpoints in flight from this GCS, its limit (max_checkpoints_in_flight_per_cts = {limit}); job {:?} was not checkpointed, retry later",
                        instance.name, job.gid
                    ),
                )
                .with_code(gca_protocol::fault::CTS_BUSY),
            )
        })?;
        tracing::info!(gid = %job.gid, cts.name = %instance.name, cts.url = %instance.url, stop = req.stop, "forwarding doCheckpoint");
        let client = SoapClient::new(self.http.clone(), instance.url.clone());
        let record = client
            .call_with_timeout::<CtsDoCheckpointOp>(&req, Some(self.config.cts_timeout()))
            .await
            .map_err(|f| {
                let message = match f.kind {
                    FaultKind::ServiceUnavailable => format!(
                        "the CTS in charge of job {:?} ({:?} at {}) is unavailable: {}; no checkpoint was recorded",
                        job.gid, instance.name, instance.url, f.message
                    ),
                    _ => format!("CTS {:?} could not checkpoint job {:?}: {}", instance.name, job.gid, f.message),
                };
                Error::Fault(Fault { message, ..f })
            })?;
        if record.gid != job.gid || record.cts_name != instance.name {
            return Err(Error::kind(
                FaultKind::OperationFailed,
                format!(
                    "CTS {:?} answered with a checkpoint of job {:?} by CTS {:?}; expected job {:?}; nothing was recorded",
                    instance.name, record.gid, record.cts_name, job.gid
                ),
            ));
        }
        // The CTS has normally registered the record itself already (paper 5.2 step 8); this
        // is idempotent and covers a CTS that could not reach us. The record is checked as if
        // that CTS had registered it (its signature is what proves it took the image).
        let vouching = match ctx.caller {
            Caller::Insecure => Caller::Insecure,
            _ => Caller::Identified(
                gca_protocol::identity::Identity::new(
                    gca_protocol::identity::Role::Cts,
                    instance.name.clone(),
                )
                .map_err(|e| Error::Internal(anyhow::anyhow!(e)))?,
            ),
        };
        let registered = self.record_checkpoint(&vouching, record).await?;
        Ok(registered.checkpoint)
    }

    /// GetJobKey (issue 12): the job's image key for the CTS it is on, made at the first call.
    pub async fn get_job_key(&self, ctx: &Ctx, req: GetJobKey) -> Result<JobKey> {
        policy::authorize(&ctx.caller, Op::GetJobKey)?;
        let job = self.job(&req.gid).await?;
        let deleting_its_images = match ctx.caller.identity() {
            Some(i)
                if i.role == gca_protocol::identity::Role::Cts && !i.is_cts(&job.cts_instance) =>
            {
                db::deleting_checkpoint_by(&self.db, &job.gid, &i.name).await?
            }
            _ => false,
        };
        policy::may_hold_job_key(&ctx.caller, &job, deleting_its_images)?;
        let Some(wrapper) = &self.job_keys else {
            return Err(Error::Fault(
                Fault::new(
                    FaultKind::ServiceUnavailable,
                    "this GCS holds no job keys: give it a key-wrapping key (job_key_wrapping_key_file, GCS_JOB_KEY_WRAPPING_KEY_FILE; the same file on every replica)",
                )
                .with_code("no-job-keys"),
            ));
        };
        let (wrapped, created_at) =
            db::job_key(&self.db, &job.gid, || Ok(wrapper.new_job_key(&job.gid)?.1)).await?;
        let key = wrapper
            .unwrap(&job.gid, &wrapped)
            .map_err(Error::Internal)?;
        tracing::info!(gid = %job.gid, caller = %ctx.caller, "job key handed out");
        Ok(JobKey {
            gid: job.gid,
            key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key),
            created_at,
        })
    }

    /// SetImageLocation (issue 12): where a checkpoint's image has got to in an object store
    /// (an `async` upload finished or gave up), from the CTS that registered the record or
    /// the one its job is on now.
    pub async fn set_image_location(
        &self,
        ctx: &Ctx,
        req: SetImageLocation,
    ) -> Result<CheckpointRecord> {
        policy::authorize(&ctx.caller, Op::SetImageLocation)?;
        check_id("GID", &req.gid)?;
        check_id("checkpoint ID", &req.checkpoint_id)?;
        let mut l = req.location;
        if l.kind != LocationKind::ObjectStore {
            return Err(Error::invalid(format!(
                "SetImageLocation sets an object-store location; a {} location is the record's own (set when it is registered)",
                l.kind
            )));
        }
        check_location(&l)?;
        l.url = None;
        l.since = None;
        if l.state != LocationState::Failed {
            l.error = None;
        }
        let mut tx = self.db.begin().await?;
        let job = db::lock_job(&mut *tx, &req.gid).await?.ok_or_else(|| {
            Error::Fault(
                Fault::resource_unknown(format!("no job with GID {:?} is registered", req.gid))
                    .with_code("unknown-gid"),
            )
        })?;
        let record = db::get_checkpoint(&mut *tx, &req.checkpoint_id)
            .await?
            .filter(|c| c.gid == req.gid)
            .ok_or_else(|| {
                Error::Fault(
                    Fault::resource_unknown(format!(
                        "job {:?} has no checkpoint {:?}",
                        req.gid, req.checkpoint_id
                    ))
                    .with_code("unknown-checkpoint"),
                )
            })?;
        policy::may_set_location(&ctx.caller, &record, &job)?;
        let position = record.locations.len() as i32;
        db::set_location(&mut *tx, &record.id, &l, position).await?;
        let record = db::get_checkpoint(&mut *tx, &record.id)
            .await?
            .ok_or_else(|| {
                Error::Internal(anyhow::anyhow!("checkpoint {:?} vanished", record.id))
            })?;
        tx.commit().await?;
        tracing::info!(gid = %req.gid, checkpoint.id = %req.checkpoint_id, location = %l.name, state = %l.state, error = ?l.error, caller = %ctx.caller, "image location set");
        Ok(record)
    }

    pub async fn find_cts(&self, ctx: &Ctx, q: FindCts) -> Result<FindCtsResponse> {
        policy::authorize(&ctx.caller, Op::FindCts)?;
        let props = sorted_unique(&q.properties, "required property")?;
        let properties = serde_json::Value::Object(
            props
                .into_iter()
                .map(|p| (p.name, serde_json::Value::String(p.value)))
                .collect(),
        );
        if q.alive_within_secs.is_some_and(|s| s < 0) {
            return Err(Error::invalid("AliveWithinSeconds must not be negative"));
        }
        let found = db::find_instances(
            &self.db,
            &db::FindFilter {
                cts_type: q.cts_type.as_deref(),
                class: q.class.as_deref(),
                core_service: q.core_service.as_deref(),
                resource: q.resource.as_deref(),
                properties,
                alive_within_secs: q.alive_within_secs,
            },
        )
        .await?;
        Ok(FindCtsResponse {
            offers: found
                .into_iter()
                .map(|(instance, t)| CtsOffer {
                    instance,
                    core_service: t.core_service,
                    classes: t.classes,
                    execute_wrapper: t.execute_wrapper,
                    recovery_wrapper: t.recovery_wrapper,
                    job_parameters: t.job_parameters,
                    recovery_job_parameters: t.recovery_job_parameters,
                    environment: t.environment,
                })
                .collect(),
        })
    }

    /// One page of a job's records: at most `Limit`, and at most `checkpoints_page_size`
    /// (a job's records grow without bound; one answer must not), with `Next` when more follow.
    pub async fn get_checkpoints(&self, ctx: &Ctx, req: GetCheckpoints) -> Result<CheckpointList> {
        policy::authorize(&ctx.caller, Op::GetCheckpoints)?;
        let page_size = i64::from(self.config.checkpoints_page_size.max(1));
        let limit = match req.limit {
            None => page_size,
            Some(l) if l >= 1 => l.min(page_size),
            Some(l) => return Err(Error::invalid(format!("Limit must be at least 1, not {l}"))),
        };
        self.job(&req.gid).await?;
        let mut checkpoints =
            db::checkpoints_page(&self.db, &req.gid, req.after.unwrap_or(0), limit + 1).await?;
        let more = checkpoints.len() as i64 > limit;
        checkpoints.truncate(limit as usize);
        let next = if more {
            checkpoints.last().and_then(|c| c.sequence)
        } else {
            None
        };
        Ok(CheckpointList { checkpoints, next })
    }

    pub async fn get_job(&self, ctx: &Ctx, req: GidRequest) -> Result<JobInfo> {
        policy::authorize(&ctx.caller, Op::GetJob)?;
        Ok(JobInfo {
            job: self.job(&req.gid).await?,
        })
    }

    pub async fn list_jobs(&self, ctx: &Ctx, req: ListJobs) -> Result<JobList> {
        policy::authorize(&ctx.caller, Op::ListJobs)?;
        let limit = req.limit.unwrap_or(DEFAULT_LIST);
        if !(1..=MAX_LIST).contains(&limit) {
            return Err(Error::invalid(format!(
                "Limit must be between 1 and {MAX_LIST}"
            )));
        }
        Ok(JobList {
            jobs: db::list_jobs(
                &self.db,
                req.state,
                req.cts_instance.as_deref(),
                req.after.as_deref(),
                limit,
            )
            .await?,
        })
    }

    /// getRecoveryInfo (paper 5.3 steps 2-5).
    pub async fn get_recovery_info(&self, ctx: &Ctx, req: GetRecoveryInfo) -> Result<RecoveryInfo> {
        policy::authorize(&ctx.caller, Op::GetRecoveryInfo)?;
        let job = self.job(&req.gid).await?;
        let latest = db::latest_checkpoint(&self.db, &job.gid)
            .await?
            .ok_or_else(|| {
                Error::Fault(
                    Fault::resource_unknown(format!(
                        "job {:?} has no checkpoint to recover from",
                        job.gid
                    ))
                    .with_code("no-checkpoint"),
                )
            })?;
        let checkpoint = if req.image == LATEST || req.image == latest.id {
            latest.clone()
        } else {
            check_id("image ID", &req.image)?;
            match db::get_checkpoint(&self.db, &req.image).await? {
                Some(c) if c.gid == job.gid => c,
                _ => {
                    return Err(Error::Fault(
                        Fault::resource_unknown(format!(
                            "job {:?} has no checkpoint with ID {:?}",
                            job.gid, req.image
                        ))
                        .with_code("unknown-checkpoint"),
                    ))
                }
            }
        };
        if checkpoint.image_state != ImageState::Stored {
            return Err(image_gone(&checkpoint));
        }
        let cts_type = self.cts_type(&checkpoint.cts_type).await?;
        if !cts_type.core_service.recover_from_any_image && checkpoint.id != latest.id {
            return Err(Error::conflict(format!(
                "CTS type {:?} can only recover from the latest image of a job ({:?}), not from {:?}",
                cts_type.name, latest.id, checkpoint.id
            )));
        }
        let original_resource = db::get_instance(&self.db, &checkpoint.cts_name)
            .await?
            .map(|i| i.resource);
        let same_resource_only = !cts_type.core_service.recover_on_other_resource;
        let instances = match (same_resource_only, &original_resource) {
            (false, _) => db::instances_of_type(&self.db, &cts_type.name, None).await?,
            (true, Some(r)) => db::instances_of_type(&self.db, &cts_type.name, Some(r)).await?,
            // The resource that took the image is gone and the type cannot recover elsewhere.
            (true, None) => Vec::new(),
        };
        let mut candidates = Vec::with_capacity(instances.len());
        for instance in instances {
            let values = values_for(&instance, ctx)
                .set("GID", job.gid.clone())
                .set("IMAGE_ID", checkpoint.id.clone())
                .set(
                    "SEQUENCE",
                    checkpoint.sequence.unwrap_or_default().to_string(),
                );
            candidates.push(RecoveryCandidate {
                recovery_wrapper: WrapperSpec {
                    name: cts_type.recovery_wrapper.name.clone(),
                    parameters: expand(&cts_type.recovery_wrapper.parameters, &values)?,
                },
                job_parameters: expand(&cts_type.recovery_job_parameters, &values)?,
                environment: expand_env(&cts_type.environment, &values)?,
                compatibility: Some(gca_protocol::facts::judge(
                    checkpoint.facts.as_ref(),
                    instance.facts.as_ref(),
                    &self.config.compatibility,
                )),
                instance,
            });
        }
        // Compatible candidates first, then those nothing is known of, then the others (each
        // group in name order).
        gca_protocol::facts::order_by_verdict(&mut candidates, |c| {
            c.compatibility
                .as_ref()
                .map_or(gca_protocol::facts::Verdict::Unknown, |c| c.verdict)
        });
        Ok(RecoveryInfo {
            gid: job.gid,
            cts_type: cts_type.name,
            same_resource_only,
            original_resource,
            checkpoint,
            candidates,
        })
    }

    /// AuthorizeRecovery: a broker lets a CTS take a job over by a recovery although the job
    /// may still run elsewhere (see [`policy::may_move_job`]).
    pub async fn authorize_recovery(
        &self,
        ctx: &Ctx,
        req: AuthorizeRecovery,
    ) -> Result<RecoveryAuthorized> {
        policy::authorize(&ctx.caller, Op::AuthorizeRecovery)?;
        let job = self.job(&req.gid).await?;
        let instance = self.instance(&req.cts_instance).await?;
        if instance.cts_type != job.cts_type {
            return Err(Error::conflict(format!(
                "job {:?} is of CTS type {:?}; CTS {:?} is of type {:?} and cannot recover it",
                job.gid, job.cts_type, instance.name, instance.cts_type
            )));
        }
        if let Some(ck) = &req.checkpoint {
            check_id("checkpoint ID", ck)?;
            match db::get_checkpoint(&self.db, ck).await? {
                Some(c) if c.gid == job.gid && c.image_state == ImageState::Stored => {}
                Some(c) if c.gid == job.gid => return Err(image_gone(&c)),
                _ => {
                    return Err(Error::unknown(format!(
                        "job {:?} has no checkpoint with ID {ck:?}",
                        job.gid
                    )))
                }
            }
        }
        let by = ctx
            .caller
            .identity()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "insecure".into());
        let expires_at = db::grant_recovery(
            &self.db,
            &job.gid,
            &instance.name,
            &by,
            req.checkpoint.as_deref(),
            Duration::from_secs(self.config.recovery_grant_secs),
        )
        .await?;
        tracing::info!(gid = %job.gid, cts.name = %instance.name, by = %by, "recovery authorized");
        Ok(RecoveryAuthorized {
            gid: job.gid,
            cts_instance: instance.name,
            checkpoint: req.checkpoint,
            expires_at,
        })
    }

    // ---- admin --------------------------------------------------------------------------

    pub async fn register_class(
        &self,
        ctx: &Ctx,
        req: RegisterCheckpointerClass,
    ) -> Result<ClassRegistered> {
        policy::authorize(&ctx.caller, Op::RegisterClass)?;
        let mut class = req.class;
        check_name("checkpointer class", &class.name)?;
        class.properties = sorted_unique(&class.properties, "class property")?;
        class.builtin = false;
        class.description = class.description.filter(|d| !d.trim().is_empty());
        if db::insert_class(&self.db, &class).await? {
            tracing::info!(class = %class.name, "checkpointer class registered");
            return Ok(ClassRegistered {
                class,
                outcome: Registration::Created,
            });
        }
        let existing = db::get_class(&self.db, &class.name).await?.ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "class {} vanished during registration",
                class.name
            ))
        })?;
        if existing.builtin {
            return Err(Error::conflict(format!(
                "{:?} is a built-in checkpointer class and cannot be redefined",
                class.name
            )));
        }
        if existing.properties == class.properties && existing.description == class.description {
            return Ok(ClassRegistered {
                class: existing,
                outcome: Registration::Unchanged,
            });
        }
        Err(Error::conflict(format!(
            "checkpointer class {:?} is already registered with other properties or description; choose another name",
            class.name
        )))
    }

    pub async fn register_descriptor(
        &self,
        ctx: &Ctx,
        req: RegisterCtsDescriptor,
    ) -> Result<DescriptorRegistered> {
        policy::authorize(&ctx.caller, Op::RegisterDescriptor)?;
        let cts = descriptor::parse(&req.descriptor_xml).map_err(|e| {
            Error::Fault(Fault::new(
                FaultKind::InvalidDescriptor,
                format!("invalid CTS descriptor: {e}"),
            ))
        })?;
        let props = effective_properties(&cts);
        for class_name in &cts.classes {
            let class = db::get_class(&self.db, class_name).await?.ok_or_else(|| {
                Error::kind(
                    FaultKind::InvalidDescriptor,
                    format!(
                        "CTS type {:?} names checkpointer class {class_name:?}, which is not registered; register the class first",
                        cts.name
                    ),
                )
            })?;
            let missing: Vec<String> = class
                .properties
                .iter()
                .filter(|p| props.get(&p.name) != Some(&p.value))
                .map(|p| match props.get(&p.name) {
                    Some(v) => format!("{}={} (the type has {v})", p.name, p.value),
                    None => format!("{}={} (the type does not declare it)", p.name, p.value),
                })
                .collect();
            if !missing.is_empty() {
                return Err(Error::kind(
                    FaultKind::InvalidDescriptor,
                    format!(
                        "CTS type {:?} cannot join checkpointer class {class_name:?}: it lacks the class properties {}",
                        cts.name,
                        missing.join(", ")
                    ),
                ));
            }
        }
        let properties = serde_json::to_value(&props).map_err(|e| Error::Internal(e.into()))?;
        if db::insert_type(&self.db, &cts, &req.descriptor_xml, &properties).await? {
            tracing::info!(cts.type = %cts.name, core_service = %cts.core_service.name, "CTS type registered");
            return Ok(DescriptorRegistered {
                cts_type: cts,
                outcome: Registration::Created,
            });
        }
        let existing = self.cts_type(&cts.name).await?;
        if existing == cts {
            return Ok(DescriptorRegistered {
                cts_type: existing,
                outcome: Registration::Unchanged,
            });
        }
        Err(Error::conflict(format!(
            "CTS type {:?} is already registered with a different descriptor; unregister it first (when no instance runs) or choose another name",
            cts.name
        )))
    }

    pub async fn unregister_cts(&self, ctx: &Ctx, req: UnregisterCts) -> Result<Unregistered> {
        policy::authorize(&ctx.caller, Op::UnregisterCts)?;
        match (req.instance, req.cts_type) {
            (Some(name), None) => {
                // Delete first, then count, in one transaction: the delete waits for every
                // registration routing a job to the instance (they hold its row), and the count,
                // a later statement, sees what they committed; a later registration finds no
                // instance. A count taken before the delete could miss a job registered between.
                let mut tx = self.db.begin().await?;
                if !db::delete_instance(&mut *tx, &name).await? {
                    return Err(Error::unknown(format!("no CTS instance named {name:?} is registered")));
                }
                let active = db::active_jobs_on(&mut *tx, &name).await?;
                if active > 0 {
                    tx.rollback().await?;
                    return Err(Error::conflict(format!(
                        "CTS instance {name:?} is in charge of {active} running job(s); stop or move them first"
                    )));
                }
                tx.commit().await?;
                tracing::info!(cts.name = %name, "CTS instance unregistered");
            }
            (None, Some(name)) => match db::delete_type(&self.db, &name).await {
                Ok(true) => tracing::info!(cts.type = %name, "CTS type unregistered"),
                Ok(false) => return Err(Error::unknown(format!("no CTS type named {name:?} is registered"))),
                Err(Error::Db(e)) if violated_constraint(&e) == Some("cts_instances_cts_type_fkey") => {
                    return Err(Error::conflict(format!(
                        "CTS type {name:?} still has registered instances; unregister them first"
                    )))
                }
                Err(e) => return Err(e),
            },
            _ => {
                return Err(Error::invalid(
                    "UnregisterCTS takes exactly one of Instance (a CTS instance name) or CTSType (a type name)",
                ))
            }
        }
        Ok(Unregistered {})
    }

    pub async fn list_classes(&self, ctx: &Ctx) -> Result<ClassList> {
        policy::authorize(&ctx.caller, Op::ListClasses)?;
        Ok(ClassList {
            classes: db::list_classes(&self.db).await?,
        })
    }

    pub async fn list_types(&self, ctx: &Ctx) -> Result<CtsTypeList> {
        policy::authorize(&ctx.caller, Op::ListTypes)?;
        self.type_list().await
    }

    pub(crate) async fn type_list(&self) -> Result<CtsTypeList> {
        Ok(CtsTypeList {
            types: db::list_types(&self.db)
                .await?
                .into_iter()
                .map(|r| CtsTypeInfo {
                    descriptor: r.descriptor.0,
                    registered_at: r.registered_at,
                    instance_count: r.instance_count,
                })
                .collect(),
        })
    }

    pub async fn list_instances(&self, ctx: &Ctx) -> Result<CtsInstanceList> {
        policy::authorize(&ctx.caller, Op::ListInstances)?;
        Ok(CtsInstanceList {
            instances: db::list_instances(&self.db).await?,
        })
    }

    // ---- CTS-facing ---------------------------------------------------------------------

    /// registerCTSInstance: idempotent; a restarted CTS may come back at a new address, so
    /// URL, Execution Manager and resource are updated, but a name never changes type.
    pub async fn register_instance(
        &self,
        ctx: &Ctx,
        req: RegisterCtsInstance,
    ) -> Result<InstanceRegistered> {
        policy::authorize(&ctx.caller, Op::RegisterInstance)?;
        policy::acting_as(&ctx.caller, Op::RegisterInstance, &req.instance.name)?;
        let mut i = req.instance;
        check_name("CTS instance", &i.name)?;
        check_url("CTS URL", &i.url)?;
        if i.execution_manager.trim().is_empty() || i.resource.trim().is_empty() {
            return Err(Error::invalid(
                "ExecutionManager and Resource must not be empty",
            ));
        }
        if let Some(f) = &i.facts {
            f.check_bounds().map_err(Error::invalid)?;
        }
        self.cts_type(&i.cts_type).await?;
        i.registered_at = None;
        i.last_seen = None;
        let mut tx = self.db.begin().await?;
        let created = db::insert_instance(&mut *tx, &i).await?;
        if created {
            let stored = db::get_instance(&mut *tx, &i.name).await?.ok_or_else(|| {
                Error::Internal(anyhow::anyhow!("instance vanished during registration"))
            })?;
            emit(
                &mut *tx,
                Topic::CtsRegistered,
                None,
                &stored.to_element(&Topic::CtsRegistered.message_name()),
            )
            .await?;
        }
        tx.commit().await?;
        let outcome = if created {
            self.wake_deliverer();
            tracing::info!(cts.name = %i.name, cts.type = %i.cts_type, cts.url = %i.url, "CTS instance registered");
            Registration::Created
        } else {
            let existing = self.instance(&i.name).await?;
            if existing.cts_type != i.cts_type {
                return Err(Error::conflict(format!(
                    "CTS instance {:?} is registered with type {:?}, not {:?}; unregister it first or use another name",
                    i.name, existing.cts_type, i.cts_type
                )));
            }
            let changed = existing.url != i.url
                || existing.execution_manager != i.execution_manager
                || existing.resource != i.resource
                || existing.facts != i.facts;
            db::update_instance(&self.db, &i).await?;
            if changed {
                tracing::info!(cts.name = %i.name, cts.url = %i.url, "CTS instance re-registered with new settings");
                Registration::Updated
            } else {
                Registration::Unchanged
            }
        };
        Ok(InstanceRegistered {
            instance: self.instance(&i.name).await?,
            outcome,
        })
    }

    /// registerJob (paper 3.4.1, 5.1 step 4; with `recovery`, 5.3 step 11).
    pub async fn register_job(&self, ctx: &Ctx, mut req: RegisterJob) -> Result<JobRegistered> {
        policy::authorize(&ctx.caller, Op::RegisterJob)?;
        policy::acting_as(&ctx.caller, Op::RegisterJob, &req.cts_instance)?;
        check_id("GID", &req.gid)?;
        let instance = self.instance(&req.cts_instance).await?;
        let local_id = req.local_id.as_deref().filter(|l| !l.is_empty());
        let state = req.state.unwrap_or(JobState::Running);
        if !matches!(state, JobState::Running | JobState::Recovering) {
            return Err(Error::invalid("a job registers as running or recovering"));
        }
        if state == JobState::Recovering && !req.recovery {
            return Err(Error::invalid("State=recovering needs Recovery=true"));
        }
        if let Some(r) = req.retention.take() {
            r.validate().map_err(Error::invalid)?;
            req.retention = Some(r.normalized());
        }
        let mut tx = self.db.begin().await?;
        // The instance stays registered until this commits (UnregisterCTS waits for it).
        if !db::lock_instance_for_routing(&mut *tx, &instance.name).await? {
            return Err(unknown_instance(&instance.name));
        }
        let outcome = if !req.recovery {
            if db::insert_job(&mut *tx, &req.gid, &instance, local_id, state).await? {
                if let Some(r) = &req.retention {
                    db::set_retention(&mut *tx, &req.gid, r).await?;
                }
                self.emit_job(&mut tx, Topic::JobRegistered, &req.gid)
                    .await?;
                Registration::Created
            } else {
                let existing = db::lock_job(&mut *tx, &req.gid).await?.ok_or_else(|| {
                    Error::Internal(anyhow::anyhow!("job vanished during registration"))
                })?;
                if existing.cts_instance == instance.name
                    && existing.local_id.as_deref() == local_id
                    && existing.state == JobState::Running
                {
                    match &req.retention {
                        Some(r) if *r != existing.retention => {
                            db::set_retention(&mut *tx, &req.gid, r).await?;
                            Registration::Updated
                        }
                        _ => Registration::Unchanged,
                    }
                } else {
                    return Err(Error::conflict(format!(
                        "GID {:?} is already registered (CTS {:?}, local ID {:?}, {}); a recovered job registers with Recovery=true",
                        req.gid,
                        existing.cts_instance,
                        existing.local_id.unwrap_or_default(),
                        existing.state
                    )));
                }
            }
        } else {
            let existing = db::lock_job(&mut *tx, &req.gid).await?.ok_or_else(|| {
                Error::unknown(format!(
                    "cannot recover job {:?}: no job with that GID was ever registered",
                    req.gid
                ))
            })?;
            if existing.cts_type != instance.cts_type {
                return Err(Error::conflict(format!(
                    "job {:?} was checkpointed by CTS type {:?}; CTS {:?} is of type {:?} and cannot recover it",
                    req.gid, existing.cts_type, instance.name, instance.cts_type
                )));
            }
            let destroyed = db::job_lifetime(&mut *tx, &req.gid)
                .await?
                .is_some_and(|l| l.destroyed_at.is_some());
            let current = db::get_instance(&mut *tx, &existing.cts_instance).await?;
            let granted = existing.cts_instance != instance.name
                && db::take_recovery_grant(
                    &mut *tx,
                    &req.gid,
                    &instance.name,
                    req.from_checkpoint.as_deref(),
                )
                .await?;
            policy::may_move_job(
                &ctx.caller,
                &instance,
                &policy::RecoveryFacts {
                    job: &existing,
                    destroyed,
                    current_last_seen: current.and_then(|c| c.last_seen),
                    lost_after: chrono::Duration::milliseconds(
                        (self.config.cts_lost_after_secs * 1000.0) as i64,
                    ),
                    granted,
                    now: chrono::Utc::now(),
                },
            )?;
            if let Some(ck) = &req.from_checkpoint {
                match db::get_checkpoint(&mut *tx, ck).await? {
                    Some(c) if c.gid == req.gid && c.image_state == ImageState::Stored => {}
                    Some(c) if c.gid == req.gid => {
                        return Err(image_gone(&c));
                    }
                    _ => {
                        return Err(Error::unknown(format!(
                            "job {:?} has no checkpoint with ID {ck:?}",
                            req.gid
                        )))
                    }
                }
            }
            let retention_changed = req
                .retention
                .as_ref()
                .is_some_and(|r| *r != existing.retention);
            if let Some(r) = req.retention.as_ref().filter(|_| retention_changed) {
                db::set_retention(&mut *tx, &req.gid, r).await?;
            }
            if existing.cts_instance == instance.name
                && existing.local_id.as_deref() == local_id
                && existing.state == state
            {
                if retention_changed {
                    Registration::Updated
                } else {
                    Registration::Unchanged
                }
            } else {
                let count = existing.state != JobState::Recovering;
                db::route_job(&mut *tx, &req.gid, &instance, local_id, state, count).await?;
                if count {
                    // Once per recovery (the move that counts it), not per state change.
                    self.emit_job(&mut tx, Topic::JobRecovered, &req.gid)
                        .await?;
                }
                tracing::info!(gid = %req.gid, cts.name = %instance.name, from = %existing.cts_instance, state = %state, "job recovery registered");
                Registration::Updated
            }
        };
        tx.commit().await?;
        self.heard_from(&instance.name).await;
        if outcome != Registration::Unchanged {
            self.wake_deliverer();
        }
        if outcome == Registration::Created {
            tracing::info!(gid = %req.gid, cts.name = %instance.name, "job registered");
        }
        Ok(JobRegistered {
            job: self.job(&req.gid).await?,
            outcome,
        })
    }

    /// registerCheckpoint (paper 5.2 step 8): assigns the next sequence number atomically;
    /// registering the same record again returns it unchanged.
    pub async fn register_checkpoint(
        &self,
        ctx: &Ctx,
        req: RegisterCheckpoint,
    ) -> Result<CheckpointRegistered> {
        policy::authorize(&ctx.caller, Op::RegisterCheckpoint)?;
        self.record_checkpoint(&ctx.caller, req.checkpoint).await
    }

    /// Registers a record that `vouching` (the CTS that took it) vouches for: the caller of
    /// RegisterCheckpoint, or the CTS that answered a DoCheckpoint. Checked by
    /// [`policy::may_register_record`] and, with TLS, against the CTS's signature.
    async fn record_checkpoint(
        &self,
        vouching: &Caller,
        mut r: CheckpointRecord,
    ) -> Result<CheckpointRegistered> {
        check_id("checkpoint ID", &r.id)?;
        check_id("GID", &r.gid)?;
        if r.image_name.is_empty() {
            return Err(Error::invalid("ImageName must not be empty"));
        }
        if r.size_bytes.is_some_and(|s| s < 0) {
            return Err(Error::invalid("SizeBytes must not be negative"));
        }
        if let Some(f) = &r.facts {
            f.check_bounds().map_err(Error::invalid)?;
        }
        r.sequence = None;
        r.registered_at = None;
        r.locations = checked_locations(&r)?;
        policy::acting_as(vouching, Op::RegisterCheckpoint, &r.cts_name)?;
        let mut tx = self.db.begin().await?;
        let job = db::lock_job(&mut *tx, &r.gid).await?.ok_or_else(|| {
            Error::Fault(
                Fault::resource_unknown(format!(
                    "cannot register checkpoint {:?}: no job with GID {:?} is registered",
                    r.id, r.gid
                ))
                .with_code("unknown-gid"),
            )
        })?;
        let instance = db::get_instance(&mut *tx, &r.cts_name)
            .await?
            .ok_or_else(|| {
                Error::Fault(
                    Fault::resource_unknown(format!(
                        "cannot register checkpoint {:?}: no CTS instance named {:?} is registered",
                        r.id, r.cts_name
                    ))
                    .with_code("unknown-cts-instance"),
                )
            })?;
        let took_earlier = job.cts_instance != r.cts_name
            && db::has_checkpoint_by(&mut *tx, &r.gid, &r.cts_name).await?;
        policy::may_register_record(vouching, &r, &job, &instance, took_earlier)?;
        if let Some(verifier) = &self.verifier {
            verifier.verify_record(&r).map_err(|e| {
                Error::Fault(
                    Fault::new(
                        FaultKind::AccessDenied,
                        format!("checkpoint {:?} of job {:?} refused: {e}", r.id, r.gid),
                    )
                    .with_code("bad-signature"),
                )
            })?;
        }
        if let Some(existing) = db::get_checkpoint(&mut *tx, &r.id).await? {
            if existing.same_report(&r) {
                return Ok(CheckpointRegistered {
                    checkpoint: existing,
                    outcome: Registration::Unchanged,
                });
            }
            return Err(Error::conflict(format!(
                "checkpoint {:?} is already registered with different data (job {:?}, sequence {})",
                r.id,
                existing.gid,
                existing.sequence.unwrap_or_default()
            )));
        }
        let sequence = job.checkpoint_count + 1;
        let inserted = match db::insert_checkpoint(&mut tx, &r, sequence).await {
            Ok(i) => i,
            Err(Error::Db(e)) if violated_constraint(&e) == Some("checkpoints_pkey") => {
                return Err(Error::conflict(format!(
                    "checkpoint ID {:?} is already registered for another job",
                    r.id
                )))
            }
            Err(e) => return Err(e),
        };
        r.sequence = Some(sequence);
        r.registered_at = Some(inserted.registered_at);
        for (i, l) in r.locations.iter().enumerate() {
            db::set_location(&mut *tx, &r.id, l, i as i32).await?;
        }
        r.locations = db::get_checkpoint(&mut *tx, &r.id)
            .await?
            .map(|c| c.locations)
            .unwrap_or_default();
        // A record delivered late (queued at a CTS) for a job that has ended: its image goes
        // the way of the others.
        let late = inserted.job_ended;
        if late {
            self.apply_retention(&mut tx, &r.gid).await?;
        }
        emit(
            &mut *tx,
            Topic::CheckpointTaken,
            Some(&r.gid),
            &r.to_element(&Topic::CheckpointTaken.message_name()),
        )
        .await?;
        tx.commit().await?;
        self.heard_from(&r.cts_name).await;
        self.wake_deliverer();
        if late {
            self.wake_image_tasks();
        }
        tracing::info!(gid = %r.gid, checkpoint.id = %r.id, checkpoint.sequence = sequence, origin = %r.origin, cts.name = %r.cts_name, "checkpoint registered");
        Ok(CheckpointRegistered {
            checkpoint: r,
            outcome: Registration::Created,
        })
    }

    /// jobFinished: only the CTS in charge can finish a job; the exit of a job stopped for
    /// migration is expected and leaves it stopped. A job that exits with status 0 has ended:
    /// its retention policy applies. One that fails keeps its images for recovery, for
    /// `failed_job_lifetime_secs` unless it has a termination time already.
    pub async fn job_finished(&self, ctx: &Ctx, req: JobFinished) -> Result<JobInfo> {
        policy::authorize(&ctx.caller, Op::JobFinished)?;
        policy::acting_as(&ctx.caller, Op::JobFinished, &req.cts_instance)?;
        check_id("GID", &req.gid)?;
        let mut tx = self.db.begin().await?;
        let job = db::lock_job(&mut *tx, &req.gid).await?.ok_or_else(|| {
            Error::unknown(format!("no job with GID {:?} is registered", req.gid))
        })?;
        if job.cts_instance != req.cts_instance {
            return Err(Error::conflict(format!(
                "job {:?} is now in charge of CTS {:?}; the exit reported by {:?} is ignored",
                req.gid, job.cts_instance, req.cts_instance
            )));
        }
        match job.state {
            JobState::Running | JobState::Recovering => {
                db::finish_job(&mut *tx, &req.gid, req.exit_status, req.signal).await?;
                self.emit_job(&mut tx, Topic::JobFinished, &req.gid).await?;
                if req.exit_status == Some(0) && req.signal.is_none() {
                    self.apply_retention(&mut tx, &req.gid).await?;
                } else {
                    db::expire_failed_job(
                        &mut *tx,
                        &req.gid,
                        Duration::from_secs(self.config.failed_job_lifetime_secs),
                    )
                    .await?;
                }
                tracing::info!(gid = %req.gid, exit_status = ?req.exit_status, signal = ?req.signal, "job finished");
            }
            JobState::Stopped | JobState::Finished => {}
        }
        tx.commit().await?;
        self.heard_from(&req.cts_instance).await;
        self.wake_deliverer();
        self.wake_image_tasks();
        Ok(JobInfo {
            job: self.job(&req.gid).await?,
        })
    }

    /// abandonRecovery: the CTS a job is being recovered on gives the recovery up; the job goes
    /// back to the CTS, state and end it had before the recovery moved it.
    pub async fn abandon_recovery(&self, ctx: &Ctx, req: AbandonRecovery) -> Result<JobInfo> {
        policy::authorize(&ctx.caller, Op::AbandonRecovery)?;
        policy::acting_as(&ctx.caller, Op::AbandonRecovery, &req.cts_instance)?;
        check_id("GID", &req.gid)?;
        let mut tx = self.db.begin().await?;
        let job = db::lock_job(&mut *tx, &req.gid).await?.ok_or_else(|| {
            Error::unknown(format!("no job with GID {:?} is registered", req.gid))
        })?;
        if !db::revert_recovery(&mut *tx, &req.gid, &req.cts_instance).await? {
            return Err(Error::conflict(format!(
                "job {:?} is {} on CTS {:?}, not being recovered on {:?}: there is no recovery of it to abandon",
                req.gid, job.state, job.cts_instance, req.cts_instance
            )));
        }
        tx.commit().await?;
        self.heard_from(&req.cts_instance).await;
        let job = self.job(&req.gid).await?;
        tracing::info!(gid = %job.gid, cts.name = %req.cts_instance, back_to = %job.cts_instance, state = %job.state, "recovery abandoned");
        Ok(JobInfo { job })
    }

    /// Records that a CTS was heard from, after the request that proved it (outside its
    /// transaction, see [`db::touch_instance`]). Best effort: failing to record it does not
    /// fail that request.
    async fn heard_from(&self, cts: &str) {
        if let Err(e) = db::touch_instance(&self.db, cts).await {
            tracing::warn!(cts.name = %cts, error = %e, "cannot record that the CTS was heard from");
        }
    }

    /// Queues a job event (`gca:{topic}` with the job as it is now in `tx`).
    pub(crate) async fn emit_job(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        topic: Topic,
        gid: &str,
    ) -> Result<()> {
        let job = db::get_job(&mut **tx, gid)
            .await?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("job {gid:?} vanished")))?;
        emit(
            &mut **tx,
            topic,
            Some(gid),
            &job.to_element(&topic.message_name()),
        )
        .await
    }
}

/// The most locations a record lists.
const MAX_LOCATIONS: usize = 8;

/// One location as a CTS reports it: bounded names, URL and error.
fn check_location(l: &ImageLocation) -> Result<()> {
    if l.name.trim().is_empty() || l.name.len() > 512 {
        return Err(Error::invalid(
            "a location's Name must be 1 to 512 characters",
        ));
    }
    if l.url.as_ref().is_some_and(|u| u.len() > 2048) {
        return Err(Error::invalid(
            "a location's URL must be at most 2048 characters",
        ));
    }
    if l.error.as_ref().is_some_and(|e| e.len() > 4096) {
        return Err(Error::invalid(
            "a location's Error must be at most 4096 characters",
        ));
    }
    Ok(())
}

/// The locations a record is registered with: at most [`MAX_LOCATIONS`], each once; a CTS
/// location only for the CTS that took the image (listed first, added when the CTS listed
/// none: a record from an older CTS).
fn checked_locations(r: &CheckpointRecord) -> Result<Vec<ImageLocation>> {
    if r.locations.len() > MAX_LOCATIONS {
        return Err(Error::invalid(format!(
            "a record lists at most {MAX_LOCATIONS} locations, not {}",
            r.locations.len()
        )));
    }
    let mut out: Vec<ImageLocation> = vec![ImageLocation::cts(&r.cts_name, &r.image_name)];
    for l in &r.locations {
        check_location(l)?;
        match l.kind {
            LocationKind::Cts if l.name != r.cts_name => {
                return Err(Error::invalid(format!(
                    "checkpoint {:?} lists the store of CTS {:?}; a record lists the store of the CTS that took it ({:?}) only",
                    r.id, l.name, r.cts_name
                )))
            }
            LocationKind::Cts => {}
            LocationKind::ObjectStore => {
                if out.iter().any(|o| o.kind == l.kind && o.name == l.name) {
                    return Err(Error::invalid(format!(
                        "checkpoint {:?} lists object store {:?} twice",
                        r.id, l.name
                    )));
                }
                let mut l = l.clone();
                l.url = None;
                l.since = None;
                out.push(l);
            }
        }
    }
    Ok(out)
}
