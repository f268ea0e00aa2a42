//! Everything that touches PostgreSQL: row types and queries. The GCS is the only component
//! with a database; nothing here holds state between requests, so any number of GCS processes
//! can serve one database.

use chrono::{DateTime, Utc};
use gca_protocol::facts::{ImageFacts, ResourceFacts};
use gca_protocol::messages::{
    CheckpointRecord, CheckpointerClass, CtsInstance, CtsType, ImageLocation, ImageOwner,
    ImageSignature, ImageState, Job, JobState, Keep, LocationKind, Origin, Property, Retention,
};
use sqlx::types::Json;
use sqlx::{FromRow, PgExecutor, PgPool};

use crate::error::{Error, Result};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects to `url`, bounded so that start-up fails clearly instead of hanging.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
        .context("cannot connect to PostgreSQL (check DATABASE_URL / database_url)")
}

/// A pool that connects when first used (the database may not be up yet).
pub fn connect_lazy(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy(url)
        .context("invalid PostgreSQL URL (check DATABASE_URL / database_url)")
}

fn bad_row(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(anyhow::anyhow!("corrupt {what} row: {e}"))
}

#[derive(FromRow)]
pub struct ClassRow {
    pub name: String,
    pub description: Option<String>,
    pub properties: sqlx::types::Json<Vec<Property>>,
    pub builtin: bool,
}

impl From<ClassRow> for CheckpointerClass {
    fn from(r: ClassRow) -> Self {
        CheckpointerClass {
            name: r.name,
            description: r.description,
            properties: r.properties.0,
            builtin: r.builtin,
        }
    }
}

pub async fn get_class(db: impl PgExecutor<'_>, name: &str) -> Result<Option<CheckpointerClass>> {
    Ok(sqlx::query_as::<_, ClassRow>(
        "select name, description, properties, builtin from checkpointer_classes where name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?
    .map(Into::into))
}

pub async fn list_classes(db: &PgPool) -> Result<Vec<CheckpointerClass>> {
    Ok(sqlx::query_as::<_, ClassRow>(
        "select name, description, properties, builtin from checkpointer_classes order by name",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Into::into)
    .collect())
}

/// Inserts the class unless the name is taken; true when inserted.
pub async fn insert_class(db: &PgPool, class: &CheckpointerClass) -> Result<bool> {
    let inserted = sqlx::query(
        "insert into checkpointer_classes (name, description, properties) values ($1, $2, $3)
         on conflict (name) do nothing",
    )
    .bind(&class.name)
    .bind(&class.description)
    .bind(sqlx::types::Json(&class.properties))
    .execute(db)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

#[derive(FromRow)]
pub struct TypeRow {
    pub descriptor: sqlx::types::Json<CtsType>,
    pub registered_at: DateTime<Utc>,
    pub instance_count: i64,
}

pub async fn get_type(db: impl PgExecutor<'_>, name: &str) -> Result<Option<CtsType>> {
    Ok(sqlx::query_scalar::<_, sqlx::types::Json<CtsType>>(
        "select descriptor from cts_types where name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?
    .map(|j| j.0))
}

pub async fn list_types(db: &PgPool) -> Result<Vec<TypeRow>> {
    Ok(sqlx::query_as::<_, TypeRow>(
        "select t.descriptor, t.registered_at, count(i.name) as instance_count
         from cts_types t left join cts_instances i on i.cts_type = t.name
         group by t.name order by t.name",
    )
    .fetch_all(db)
    .await?)
}

/// Inserts a CTS type with its class memberships in one transaction; false when the name is
/// taken (nothing is written then).
pub async fn insert_type(
    db: &PgPool,
    cts: &CtsType,
    xml: &str,
    properties: &serde_json::Value,
) -> Result<bool> {
    let mut tx = db.begin().await?;
    let inserted = sqlx::query(
        "insert into cts_types (name, core_service, descriptor, descriptor_xml, properties,
            external_checkpoints, internal_checkpoints, recover_on_other_resource, recover_from_any_image)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         on conflict (name) do nothing",
    )
    .bind(&cts.name)
    .bind(&cts.core_service.name)
    .bind(sqlx::types::Json(cts))
    .bind(xml)
    .bind(properties)
    .bind(cts.core_service.external_checkpoints)
    .bind(cts.core_service.internal_checkpoints)
    .bind(cts.core_service.recover_on_other_resource)
    .bind(cts.core_service.recover_from_any_image)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !inserted {
        return Ok(false);
    }
    sqlx::query("insert into cts_type_classes (cts_type, class) select $1, unnest($2::text[])")
        .bind(&cts.name)
        .bind(&cts.classes)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

pub async fn delete_type(db: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query("delete from cts_types where name = $1")
        .bind(name)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

#[derive(FromRow)]
pub struct InstanceRow {
    pub name: String,
    pub cts_type: String,
    pub url: String,
    pub execution_manager: String,
    pub resource: String,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub facts: Option<Json<ResourceFacts>>,
}

impl From<InstanceRow> for CtsInstance {
    fn from(r: InstanceRow) -> Self {
        CtsInstance {
            name: r.name,
            cts_type: r.cts_type,
            url: r.url,
            execution_manager: r.execution_manager,
            resource: r.resource,
            registered_at: Some(r.registered_at),
            last_seen: Some(r.last_seen),
            facts: r.facts.map(|f| f.0),
        }
    }
}

const INSTANCE_COLUMNS: &str =
    "name, cts_type, url, execution_manager, resource, registered_at, last_seen, facts";

pub async fn get_instance(db: impl PgExecutor<'_>, name: &str) -> Result<Option<CtsInstance>> {
    Ok(sqlx::query_as::<_, InstanceRow>(&format!(
        "select {INSTANCE_COLUMNS} from cts_instances where name = $1"
    ))
    .bind(name)
    .fetch_optional(db)
    .await?
    .map(Into::into))
}

pub async fn list_instances(db: &PgPool) -> Result<Vec<CtsInstance>> {
    Ok(sqlx::query_as::<_, InstanceRow>(&format!(
        "select {INSTANCE_COLUMNS} from cts_instances order by name"
    ))
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Into::into)
    .collect())
}

/// Instances of `cts_type`, optionally only those on `resource`.
pub async fn instances_of_type(
    db: &PgPool,
    cts_type: &str,
    resource: Option<&str>,
) -> Result<Vec<CtsInstance>> {
    Ok(sqlx::query_as::<_, InstanceRow>(&format!(
        "select {INSTANCE_COLUMNS} from cts_instances
         where cts_type = $1 and ($2::text is null or resource = $2) order by name"
    ))
    .bind(cts_type)
    .bind(resource)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Into::into)
    .collect())
}

/// Inserts an instance unless the name is taken; true when inserted.
pub async fn insert_instance(db: impl PgExecutor<'_>, i: &CtsInstance) -> Result<bool> {
    Ok(sqlx::query(
        "insert into cts_instances (name, cts_type, url, execution_manager, resource, facts)
         values ($1, $2, $3, $4, $5, $6) on conflict (name) do nothing",
    )
    .bind(&i.name)
    .bind(&i.cts_type)
    .bind(&i.url)
    .bind(&i.execution_manager)
    .bind(&i.resource)
    .bind(i.facts.clone().map(Json))
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

pub async fn update_instance(db: &PgPool, i: &CtsInstance) -> Result<()> {
    sqlx::query(
        "update cts_instances set url = $2, execution_manager = $3, resource = $4, last_seen = now(),
            lost_notified_at = null, facts = $5
         where name = $1",
    )
    .bind(&i.name)
    .bind(&i.url)
    .bind(&i.execution_manager)
    .bind(&i.resource)
    .bind(i.facts.clone().map(Json))
    .execute(db)
    .await?;
    Ok(())
}

/// Records that a CTS was heard from.
/// Records that a CTS instance was heard from. At most once a second per instance (and
/// whenever it was lost), and never inside another transaction: the row lock it takes would
/// serialize every registration from that CTS.
pub async fn touch_instance(db: &PgPool, name: &str) -> Result<()> {
    sqlx::query(
        "update cts_instances set last_seen = now(), lost_notified_at = null
         where name = $1
           and (last_seen < now() - interval '1 second' or lost_notified_at is not null)",
    )
    .bind(name)
    .execute(db)
    .await?;
    Ok(())
}

/// Deletes an instance row, taking its row lock: a registration routing a job to it holds
/// [`lock_instance_for_routing`] until it commits, so this waits for it, and a registration
/// after this finds no instance. Check [`active_jobs_on`] after it, in the same transaction.
pub async fn delete_instance(db: impl PgExecutor<'_>, name: &str) -> Result<bool> {
    Ok(sqlx::query("delete from cts_instances where name = $1")
        .bind(name)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

/// Holds an instance row (`for key share`) until the transaction ends, so that the instance
/// cannot be deleted while a job is routed to it; false when it is not registered (or was
/// deleted while this waited). `for key share` does not conflict with the updates of
/// `last_seen` and the address, only with a delete.
pub async fn lock_instance_for_routing(db: impl PgExecutor<'_>, name: &str) -> Result<bool> {
    Ok(
        sqlx::query("select 1 from cts_instances where name = $1 for key share")
            .bind(name)
            .fetch_optional(db)
            .await?
            .is_some(),
    )
}

pub async fn active_jobs_on(db: impl PgExecutor<'_>, instance: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from jobs where cts_instance = $1 and state in ('running', 'recovering')",
    )
    .bind(instance)
    .fetch_one(db)
    .await?)
}

/// The FindCTS search: every criterion given must hold.
pub struct FindFilter<'a> {
    pub cts_type: Option<&'a str>,
    pub class: Option<&'a str>,
    pub core_service: Option<&'a str>,
    pub resource: Option<&'a str>,
    pub properties: serde_json::Value,
    pub alive_within_secs: Option<i64>,
}

pub async fn find_instances(
    db: &PgPool,
    f: &FindFilter<'_>,
) -> Result<Vec<(CtsInstance, CtsType)>> {
    #[derive(FromRow)]
    struct Row {
        #[sqlx(flatten)]
        instance: InstanceRow,
        descriptor: sqlx::types::Json<CtsType>,
    }
    let rows = sqlx::query_as::<_, Row>(
        "select i.name, i.cts_type, i.url, i.execution_manager, i.resource, i.registered_at, i.last_seen,
                i.facts, t.descriptor
         from cts_instances i join cts_types t on t.name = i.cts_type
         where ($1::text is null or i.cts_type = $1)
           and ($2::text is null or exists
                (select 1 from cts_type_classes c where c.cts_type = t.name and c.class = $2))
           and ($3::text is null or t.core_service = $3)
           and ($4::text is null or i.resource = $4)
           and t.properties @> $5
           and ($6::bigint is null or i.last_seen >= now() - make_interval(secs => $6::double precision))
         order by i.name",
    )
    .bind(f.cts_type)
    .bind(f.class)
    .bind(f.core_service)
    .bind(f.resource)
    .bind(&f.properties)
    .bind(f.alive_within_secs)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.instance.into(), r.descriptor.0))
        .collect())
}

#[derive(FromRow)]
pub struct JobRow {
    pub gid: String,
    pub cts_instance: String,
    pub cts_type: String,
    pub local_id: Option<String>,
    pub state: String,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub checkpoint_count: i64,
    pub latest_checkpoint: Option<String>,
    pub recoveries: i64,
    pub exit_status: Option<i32>,
    pub signal: Option<i32>,
    pub keep: String,
    pub keep_last: Option<i32>,
    pub keep_in: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = Error;
    fn try_from(r: JobRow) -> Result<Self> {
        Ok(Job {
            state: r.state.parse::<JobState>().map_err(|e| bad_row("job", e))?,
            gid: r.gid,
            cts_instance: r.cts_instance,
            cts_type: r.cts_type,
            local_id: r.local_id,
            registered_at: r.registered_at,
            updated_at: r.updated_at,
            checkpoint_count: r.checkpoint_count,
            latest_checkpoint: r.latest_checkpoint,
            recoveries: r.recoveries,
            exit_status: r.exit_status,
            signal: r.signal,
            retention: Retention {
                keep: r.keep.parse::<Keep>().map_err(|e| bad_row("job", e))?,
                keep_last: r.keep_last.map(|n| n as u32),
                keep_in: r.keep_in,
            },
        })
    }
}

const JOB_COLUMNS: &str =
    "gid, cts_instance, cts_type, local_id, state, registered_at, updated_at, \
     checkpoint_count, latest_checkpoint, recoveries, exit_status, signal, keep, keep_last, keep_in";

pub async fn get_job(db: impl PgExecutor<'_>, gid: &str) -> Result<Option<Job>> {
    sqlx::query_as::<_, JobRow>(&format!("select {JOB_COLUMNS} from jobs where gid = $1"))
        .bind(gid)
        .fetch_optional(db)
        .await?
        .map(Job::try_from)
        .transpose()
}

/// The job row, locked until the transaction ends: serializes everything done to one GID.
pub async fn lock_job(db: impl PgExecutor<'_>, gid: &str) -> Result<Option<Job>> {
    sqlx::query_as::<_, JobRow>(&format!(
        "select {JOB_COLUMNS} from jobs where gid = $1 for update"
    ))
    .bind(gid)
    .fetch_optional(db)
    .await?
    .map(Job::try_from)
    .transpose()
}

pub async fn list_jobs(
    db: &PgPool,
    state: Option<JobState>,
    cts_instance: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Job>> {
    sqlx::query_as::<_, JobRow>(&format!(
        "select {JOB_COLUMNS} from jobs
         where ($1::text is null or state = $1) and ($2::text is null or cts_instance = $2)
           and ($3::text is null or gid > $3)
         order by gid limit $4"
    ))
    .bind(state.map(JobState::as_str))
    .bind(cts_instance)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Job::try_from)
    .collect()
}

/// Inserts a new job; false when the GID is taken.
pub async fn insert_job(
    db: impl PgExecutor<'_>,
    gid: &str,
    instance: &CtsInstance,
    local_id: Option<&str>,
    state: JobState,
) -> Result<bool> {
    Ok(sqlx::query(
        "insert into jobs (gid, cts_instance, cts_type, local_id, state) values ($1, $2, $3, $4, $5)
         on conflict (gid) do nothing",
    )
    .bind(gid)
    .bind(&instance.name)
    .bind(&instance.cts_type)
    .bind(local_id)
    .bind(state.as_str())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Moves a job to another CTS (recovery) and/or changes its state.
pub async fn route_job(
    db: impl PgExecutor<'_>,
    gid: &str,
    instance: &CtsInstance,
    local_id: Option<&str>,
    state: JobState,
    count_recovery: bool,
) -> Result<()> {
    sqlx::query(
        "update jobs set cts_instance = $2, cts_type = $3, local_id = $4, state = $5,
            recoveries = recoveries + $6, exit_status = null, signal = null, updated_at = now(),
            termination_time = case when termination_on_failure then null else termination_time end,
            termination_on_failure = false,
            before_recovery = case
                when $5 <> 'recovering' then null
                when $6 = 1 then jsonb_build_object(
                    'cts_instance', cts_instance, 'cts_type', cts_type, 'local_id', local_id,
                    'state', state, 'exit_status', exit_status, 'signal', signal,
                    'termination_time', termination_time,
                    'termination_on_failure', termination_on_failure)
                else before_recovery end
         where gid = $1",
    )
    .bind(gid)
    .bind(&instance.name)
    .bind(&instance.cts_type)
    .bind(local_id)
    .bind(state.as_str())
    .bind(i64::from(count_recovery))
    .execute(db)
    .await?;
    Ok(())
}

/// Puts a job whose recovery was abandoned back as it was before the recovery moved it
/// (`before_recovery`), without counting the recovery; false when there is nothing to put
/// back (not recovering on `cts`, or moved before the column existed).
pub async fn revert_recovery(db: impl PgExecutor<'_>, gid: &str, cts: &str) -> Result<bool> {
    Ok(sqlx::query(
        "update jobs set
            cts_instance = before_recovery->>'cts_instance',
            cts_type = before_recovery->>'cts_type',
            local_id = before_recovery->>'local_id',
            state = before_recovery->>'state',
            exit_status = (before_recovery->>'exit_status')::int,
            signal = (before_recovery->>'signal')::int,
            termination_time = (before_recovery->>'termination_time')::timestamptz,
            termination_on_failure = (before_recovery->>'termination_on_failure')::boolean,
            recoveries = greatest(recoveries - 1, 0),
            before_recovery = null,
            updated_at = now()
         where gid = $1 and cts_instance = $2 and state = 'recovering'
           and before_recovery is not null",
    )
    .bind(gid)
    .bind(cts)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

pub async fn finish_job(
    db: impl PgExecutor<'_>,
    gid: &str,
    exit_status: Option<i32>,
    signal: Option<i32>,
) -> Result<()> {
    sqlx::query(
        "update jobs set state = 'finished', exit_status = $2, signal = $3, updated_at = now() where gid = $1",
    )
    .bind(gid)
    .bind(exit_status)
    .bind(signal)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(FromRow)]
pub struct CheckpointRow {
    pub id: String,
    pub gid: String,
    pub sequence: i64,
    pub cts_name: String,
    pub cts_type: String,
    pub taken_at: DateTime<Utc>,
    pub image_name: String,
    pub execution_manager: String,
    pub size_bytes: Option<i64>,
    pub digest: Option<String>,
    pub parent: Option<String>,
    pub origin: String,
    pub job_stopped: bool,
    pub registered_at: DateTime<Utc>,
    pub image_state: String,
    pub kept_in: Option<String>,
    pub image_error: Option<String>,
    pub owner_uid: Option<i64>,
    pub owner_gid: Option<i64>,
    pub signature: Option<Json<ImageSignature>>,
    pub facts: Option<Json<ImageFacts>>,
    pub locations: Json<Vec<ImageLocation>>,
}

impl TryFrom<CheckpointRow> for CheckpointRecord {
    type Error = Error;
    fn try_from(r: CheckpointRow) -> Result<Self> {
        Ok(CheckpointRecord {
            origin: r
                .origin
                .parse::<Origin>()
                .map_err(|e| bad_row("checkpoint", e))?,
            id: r.id,
            gid: r.gid,
            sequence: Some(r.sequence),
            cts_name: r.cts_name,
            cts_type: r.cts_type,
            taken_at: r.taken_at,
            image_name: r.image_name,
            execution_manager: r.execution_manager,
            size_bytes: r.size_bytes,
            digest: r.digest,
            parent: r.parent,
            job_stopped: r.job_stopped,
            registered_at: Some(r.registered_at),
            image_state: r
                .image_state
                .parse::<ImageState>()
                .map_err(|e| bad_row("checkpoint", e))?,
            kept_in: r.kept_in,
            image_error: r.image_error,
            owner: match (r.owner_uid, r.owner_gid) {
                (Some(uid), Some(gid)) => Some(ImageOwner {
                    uid: u32::try_from(uid).map_err(|e| bad_row("checkpoint owner", e))?,
                    gid: u32::try_from(gid).map_err(|e| bad_row("checkpoint owner", e))?,
                }),
                _ => None,
            },
            signature: r.signature.map(|s| s.0),
            facts: r.facts.map(|f| f.0),
            locations: r.locations.0,
        })
    }
}

const CHECKPOINT_COLUMNS: &str =
    "id, gid, sequence, cts_name, cts_type, taken_at, image_name, execution_manager, \
     size_bytes, digest, parent, origin, job_stopped, registered_at, image_state, kept_in, image_error, \
     owner_uid, owner_gid, signature, facts, \
     (select coalesce(jsonb_agg(jsonb_strip_nulls(jsonb_build_object('kind', l.kind, 'name', l.name, \
        'url', l.url, 'state', l.state, 'since', l.updated_at, 'error', l.error)) \
        order by l.position, l.kind, l.name), '[]'::jsonb) \
      from checkpoint_locations l where l.checkpoint_id = checkpoints.id) as locations";

/// Sets a location of checkpoint `id` (added, or its state, URL and error replaced), stamped
/// now.
pub async fn set_location(
    db: impl PgExecutor<'_>,
    id: &str,
    l: &ImageLocation,
    position: i32,
) -> Result<()> {
    sqlx::query(
        "insert into checkpoint_locations (checkpoint_id, kind, name, url, state, error, position)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (checkpoint_id, kind, name) do update set url = excluded.url,
            state = excluded.state, error = excluded.error, updated_at = now()",
    )
    .bind(id)
    .bind(l.kind.as_str())
    .bind(&l.name)
    .bind(&l.url)
    .bind(l.state.as_str())
    .bind(&l.error)
    .bind(position)
    .execute(db)
    .await?;
    Ok(())
}

/// Removes the locations of checkpoint `id` of `kind` (all kinds: `None`).
pub async fn remove_locations(
    db: impl PgExecutor<'_>,
    id: &str,
    kind: Option<LocationKind>,
) -> Result<()> {
    sqlx::query(
        "delete from checkpoint_locations where checkpoint_id = $1 and ($2::text is null or kind = $2)",
    )
    .bind(id)
    .bind(kind.map(|k| k.as_str()))
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get_checkpoint(db: impl PgExecutor<'_>, id: &str) -> Result<Option<CheckpointRecord>> {
    sqlx::query_as::<_, CheckpointRow>(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoints where id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?
    .map(CheckpointRecord::try_from)
    .transpose()
}

pub async fn latest_checkpoint(db: &PgPool, gid: &str) -> Result<Option<CheckpointRecord>> {
    sqlx::query_as::<_, CheckpointRow>(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoints where gid = $1 order by sequence desc limit 1"
    ))
    .bind(gid)
    .fetch_optional(db)
    .await?
    .map(CheckpointRecord::try_from)
    .transpose()
}

/// Up to `limit` records of `gid` with a sequence number above `after`, in sequence order
/// (the `(gid, sequence)` index: each page costs its own size).
pub async fn checkpoints_page(
    db: &PgPool,
    gid: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<CheckpointRecord>> {
    sqlx::query_as::<_, CheckpointRow>(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoints where gid = $1 and sequence > $2
         order by sequence limit $3"
    ))
    .bind(gid)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(CheckpointRecord::try_from)
    .collect()
}

pub async fn checkpoints_of(db: &PgPool, gid: &str) -> Result<Vec<CheckpointRecord>> {
    sqlx::query_as::<_, CheckpointRow>(&format!(
        "select {CHECKPOINT_COLUMNS} from checkpoints where gid = $1 order by sequence"
    ))
    .bind(gid)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(CheckpointRecord::try_from)
    .collect()
}

/// What [`insert_checkpoint`] did.
#[derive(Debug, Clone, Copy)]
pub struct InsertedCheckpoint {
    pub registered_at: DateTime<Utc>,
    /// The job has ended already (its retention policy was applied): a late record.
    pub job_ended: bool,
}

/// Inserts a checkpoint with the next sequence number of its job and makes it the job's
/// latest. The caller holds the job row lock ([`lock_job`]) in the same transaction, which is
/// what makes the numbering gapless under concurrent registrations.
pub async fn insert_checkpoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    r: &CheckpointRecord,
    sequence: i64,
) -> Result<InsertedCheckpoint> {
    let registered_at: DateTime<Utc> = sqlx::query_scalar(
        "insert into checkpoints (id, gid, sequence, cts_name, cts_type, taken_at, image_name,
            execution_manager, size_bytes, digest, parent, origin, job_stopped, owner_uid,
            owner_gid, signature, facts)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
         returning registered_at",
    )
    .bind(&r.id)
    .bind(&r.gid)
    .bind(sequence)
    .bind(&r.cts_name)
    .bind(&r.cts_type)
    .bind(r.taken_at)
    .bind(&r.image_name)
    .bind(&r.execution_manager)
    .bind(r.size_bytes)
    .bind(&r.digest)
    .bind(&r.parent)
    .bind(r.origin.as_str())
    .bind(r.job_stopped)
    .bind(r.owner.map(|o| i64::from(o.uid)))
    .bind(r.owner.map(|o| i64::from(o.gid)))
    .bind(r.signature.clone().map(Json))
    .bind(r.facts.clone().map(Json))
    .fetch_one(&mut **tx)
    .await?;
    let job_ended: bool = sqlx::query_scalar(
        "update jobs set checkpoint_count = $2, latest_checkpoint = $3, updated_at = now(),
            state = case when $4 and state = 'running' then 'stopped' else state end
         where gid = $1
         returning retention_applied_at is not null",
    )
    .bind(&r.gid)
    .bind(sequence)
    .bind(&r.id)
    .bind(r.job_stopped)
    .fetch_one(&mut **tx)
    .await?;
    Ok(InsertedCheckpoint {
        registered_at,
        job_ended,
    })
}

/// Counts for the health endpoint.
pub async fn ping(db: &PgPool) -> Result<()> {
    sqlx::query("select 1").execute(db).await?;
    Ok(())
}

// ---- WS-ResourceLifetime of job resources -------------------------------------------------

/// A job's lifetime: (termination time, destroyed at).
#[derive(Debug, Clone, Copy, FromRow)]
pub struct JobLifetime {
    pub termination_time: Option<DateTime<Utc>>,
    pub destroyed_at: Option<DateTime<Utc>>,
}

pub async fn job_lifetime(db: impl PgExecutor<'_>, gid: &str) -> Result<Option<JobLifetime>> {
    Ok(sqlx::query_as::<_, JobLifetime>(
        "select termination_time, destroyed_at from jobs where gid = $1",
    )
    .bind(gid)
    .fetch_optional(db)
    .await?)
}

/// Sets (or clears) a live job's termination time; false when there is no live job resource.
pub async fn set_termination_time(
    db: impl PgExecutor<'_>,
    gid: &str,
    at: Option<DateTime<Utc>>,
) -> Result<bool> {
    Ok(sqlx::query(
        "update jobs set termination_time = $2, updated_at = now()
         where gid = $1 and destroyed_at is null",
    )
    .bind(gid)
    .bind(at)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Destroys a job resource: the job is finished (an unfinished job keeps no exit status).
/// False when there is no live job resource with that GID.
pub async fn destroy_job(db: impl PgExecutor<'_>, gid: &str) -> Result<bool> {
    Ok(sqlx::query(
        "update jobs set destroyed_at = now(), state = 'finished', updated_at = now()
         where gid = $1 and destroyed_at is null",
    )
    .bind(gid)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Destroys every job resource whose termination time has passed; returns their GIDs.
/// Safe to run from any number of replicas at once (each row is updated once).
/// With each GID, whether the job was unfinished until then (a JobFinished event is due).
pub async fn destroy_expired_jobs(db: impl PgExecutor<'_>) -> Result<Vec<(String, bool)>> {
    Ok(sqlx::query_as(
        "with due as (
            select gid, state from jobs
            where termination_time <= now() and destroyed_at is null
            for update skip locked)
         update jobs j set destroyed_at = now(), state = 'finished', updated_at = now()
         from due where j.gid = due.gid
         returning j.gid, due.state <> 'finished'",
    )
    .fetch_all(db)
    .await?)
}

/// Destroys one job resource if its termination time has passed (the lazy check). Some(was
/// unfinished) when it was destroyed now.
pub async fn destroy_job_if_expired(db: impl PgExecutor<'_>, gid: &str) -> Result<Option<bool>> {
    Ok(sqlx::query_scalar(
        "with due as (
            select gid, state from jobs
            where gid = $1 and termination_time <= now() and destroyed_at is null
            for update)
         update jobs j set destroyed_at = now(), state = 'finished', updated_at = now()
         from due where j.gid = due.gid
         returning due.state <> 'finished'",
    )
    .bind(gid)
    .fetch_optional(db)
    .await?)
}

/// Totals for the GCS resource property document.
#[derive(Debug, Clone, Copy, FromRow)]
pub struct Totals {
    pub jobs: i64,
    pub checkpoints: i64,
}

/// The kept counts (`registry_counters`, maintained by triggers in the transaction of every
/// insert and delete): 64 rows, whatever the size of the registry.
pub async fn totals(db: &PgPool) -> Result<Totals> {
    Ok(sqlx::query_as::<_, Totals>(
        "select coalesce(sum(jobs), 0)::bigint as jobs, coalesce(sum(checkpoints), 0)::bigint as checkpoints
         from registry_counters",
    )
    .fetch_one(db)
    .await?)
}

/// The same totals counted over every row: what the kept counts must equal (tests, checks).
pub async fn counted_totals(db: &PgPool) -> Result<Totals> {
    Ok(sqlx::query_as::<_, Totals>(
        "select (select count(*) from jobs) as jobs, (select count(*) from checkpoints) as checkpoints",
    )
    .fetch_one(db)
    .await?)
}

// ---- WS-BaseNotification: subscriptions and the notification outbox ----------------------

/// A subscription as stored.
#[derive(Debug, Clone, FromRow)]
pub struct SubscriptionRow {
    pub id: String,
    pub consumer_address: String,
    pub consumer_reference: String,
    pub topics: Option<Vec<String>>,
    pub topic_dialect: String,
    pub gid: Option<String>,
    pub producer_address: String,
    pub created_at: DateTime<Utc>,
    pub termination_time: Option<DateTime<Utc>>,
    /// Who created it (`role:name`); `None` for subscriptions made without an identity.
    pub owner: Option<String>,
}

pub async fn insert_subscription(db: impl PgExecutor<'_>, s: &SubscriptionRow) -> Result<()> {
    sqlx::query(
        "insert into subscriptions (id, consumer_address, consumer_reference, topics, topic_dialect,
            gid, producer_address, termination_time, owner)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&s.id)
    .bind(&s.consumer_address)
    .bind(&s.consumer_reference)
    .bind(&s.topics)
    .bind(&s.topic_dialect)
    .bind(&s.gid)
    .bind(&s.producer_address)
    .bind(s.termination_time)
    .bind(&s.owner)
    .execute(db)
    .await?;
    Ok(())
}

/// Whether [`insert_subscription_within`] stored the subscription, or which limit it met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionAdmission {
    Inserted,
    /// The owner holds this many live subscriptions already.
    OwnerFull(i64),
    /// The GCS holds this many live subscriptions already.
    Full(i64),
}

/// The advisory lock that serializes subscription creation across replicas, so that two
/// concurrent Subscribes cannot both pass the limits (Subscribe is rare; this costs little).
const SUBSCRIPTION_LOCK: i64 = 0x6763_615f_7375_6273; // "gca_subs"

/// Inserts a subscription unless its owner holds `per_owner` live subscriptions already, or
/// the GCS `total`; the check and the insert are one transaction under [`SUBSCRIPTION_LOCK`].
/// Expired subscriptions the sweep has not removed yet do not count.
pub async fn insert_subscription_within(
    db: &PgPool,
    s: &SubscriptionRow,
    per_owner: u64,
    total: u64,
) -> Result<SubscriptionAdmission> {
    let mut tx = db.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(SUBSCRIPTION_LOCK)
        .execute(&mut *tx)
        .await?;
    let (owned, all): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where owner is not distinct from $1), count(*)
         from subscriptions where termination_time is null or termination_time > now()",
    )
    .bind(&s.owner)
    .fetch_one(&mut *tx)
    .await?;
    let at_most = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if owned >= at_most(per_owner) {
        return Ok(SubscriptionAdmission::OwnerFull(owned));
    }
    if all >= at_most(total) {
        return Ok(SubscriptionAdmission::Full(all));
    }
    insert_subscription(&mut *tx, s).await?;
    tx.commit().await?;
    Ok(SubscriptionAdmission::Inserted)
}

/// A live subscription (one whose termination time has passed is gone, whether or not the
/// sweep has removed it yet).
pub async fn get_subscription(
    db: impl PgExecutor<'_>,
    id: &str,
) -> Result<Option<SubscriptionRow>> {
    Ok(sqlx::query_as::<_, SubscriptionRow>(
        "select id, consumer_address, consumer_reference, topics, topic_dialect, gid,
            producer_address, created_at, termination_time, owner
         from subscriptions
         where id = $1 and (termination_time is null or termination_time > now())",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Renews a live subscription; false when there is none.
pub async fn renew_subscription(
    db: impl PgExecutor<'_>,
    id: &str,
    at: Option<DateTime<Utc>>,
) -> Result<bool> {
    Ok(sqlx::query(
        "update subscriptions set termination_time = $2
         where id = $1 and (termination_time is null or termination_time > now())",
    )
    .bind(id)
    .bind(at)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Deletes a live subscription and its undelivered notifications; false when there is none.
pub async fn delete_subscription(db: impl PgExecutor<'_>, id: &str) -> Result<bool> {
    Ok(sqlx::query(
        "delete from subscriptions
         where id = $1 and (termination_time is null or termination_time > now())",
    )
    .bind(id)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Removes subscriptions whose termination time has passed (and what they had not received).
pub async fn delete_expired_subscriptions(db: &PgPool) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar(
            "delete from subscriptions where termination_time <= now() returning id",
        )
        .fetch_all(db)
        .await?,
    )
}

/// Queues an event for every live subscription it matches (topic and GID filter), in the
/// caller's transaction; returns how many notifications were queued.
pub async fn emit(
    db: impl PgExecutor<'_>,
    topic: &str,
    gid: Option<&str>,
    message_xml: &str,
) -> Result<u64> {
    Ok(sqlx::query(
        "insert into notifications (subscription_id, topic, message)
         select id, $1, $3 from subscriptions
         where (topics is null or $1 = any (topics))
           and (gid is null or gid = $2)
           and (termination_time is null or termination_time > now())
         order by created_at, id",
    )
    .bind(topic)
    .bind(gid)
    .bind(message_xml)
    .execute(db)
    .await?
    .rows_affected())
}

/// A notification claimed for delivery, with what the Notify needs from its subscription.
#[derive(Debug, Clone, FromRow)]
pub struct DueNotification {
    pub id: i64,
    pub topic: String,
    pub message: String,
    pub attempts: i32,
    pub subscription_id: String,
    pub consumer_address: String,
    pub consumer_reference: String,
    pub topic_dialect: String,
    pub producer_address: String,
}

/// Claims, for `lease` until `lease_for` from now, up to `limit` due notifications that are
/// each the first undelivered one of their live subscription (of `subscription` only, when
/// given), oldest first. A notification waiting for a retry or claimed by anyone holds back
/// the later ones of its subscription, so each subscription is delivered in order and by one
/// claimer at a time; no lock outlives this statement.
pub async fn claim_due_notifications(
    db: impl PgExecutor<'_>,
    limit: i64,
    lease: uuid::Uuid,
    lease_for: std::time::Duration,
    subscription: Option<&str>,
) -> Result<Vec<DueNotification>> {
    Ok(sqlx::query_as::<_, DueNotification>(
        "with claimed as (
             select n.id from notifications n join subscriptions s on s.id = n.subscription_id
             where n.failed_at is null and n.next_attempt_at <= now()
               and (n.leased_until is null or n.leased_until <= now())
               and (s.termination_time is null or s.termination_time > now())
               and ($4::text is null or n.subscription_id = $4)
               -- The first undelivered notification of its subscription.
               and not exists (
                   select 1 from notifications e
                   where e.subscription_id = n.subscription_id and e.id < n.id
                     and e.failed_at is null)
             order by n.id
             limit $1
             for update of n skip locked)
         update notifications n set lease = $2, leased_until = now() + make_interval(secs => $3)
         from claimed c, subscriptions s
         where n.id = c.id and s.id = n.subscription_id
         returning n.id, n.topic, n.message, n.attempts, s.id as subscription_id,
             s.consumer_address, s.consumer_reference, s.topic_dialect, s.producer_address",
    )
    .bind(limit)
    .bind(lease)
    .bind(lease_for.as_secs_f64())
    .bind(subscription)
    .fetch_all(db)
    .await?)
}

/// A delivered notification is deleted, if `lease` still holds it (else another claimer has
/// it now, and may send it again: at least once). False when it was not ours any more.
pub async fn delete_notification(
    db: impl PgExecutor<'_>,
    id: i64,
    lease: uuid::Uuid,
) -> Result<bool> {
    Ok(
        sqlx::query("delete from notifications where id = $1 and lease = $2")
            .bind(id)
            .bind(lease)
            .execute(db)
            .await?
            .rows_affected()
            == 1,
    )
}

/// Records a failed attempt under `lease`: retry after `retry_in`, or give up (`failed`).
pub async fn notification_failed(
    db: impl PgExecutor<'_>,
    id: i64,
    lease: uuid::Uuid,
    error: &str,
    retry_in: std::time::Duration,
    failed: bool,
) -> Result<()> {
    sqlx::query(
        "update notifications set attempts = attempts + 1, last_error = $3,
            next_attempt_at = now() + make_interval(secs => $4),
            failed_at = case when $5 then now() else null end,
            lease = null, leased_until = null
         where id = $1 and lease = $2",
    )
    .bind(id)
    .bind(lease)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .bind(failed)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks instances not heard from for `lost_after` as lost (once per loss) and returns them,
/// in the caller's transaction. Concurrent replicas each get a disjoint set (the update
/// re-checks `lost_notified_at is null` under the row lock).
pub async fn mark_lost_instances(
    db: impl PgExecutor<'_>,
    lost_after: std::time::Duration,
) -> Result<Vec<CtsInstance>> {
    Ok(sqlx::query_as::<_, InstanceRow>(&format!(
        "update cts_instances set lost_notified_at = now()
         where lost_notified_at is null
           and last_seen < now() - make_interval(secs => $1)
         returning {INSTANCE_COLUMNS}"
    ))
    .bind(lost_after.as_secs_f64())
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Into::into)
    .collect())
}

/// Undelivered notifications: (pending, failed), for tests and operators.
pub async fn notification_counts(db: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "select count(*) filter (where failed_at is null), count(*) filter (where failed_at is not null)
         from notifications",
    )
    .fetch_one(db)
    .await?)
}

// ---- Retention of checkpoint images -------------------------------------------------------

/// Sets a job's retention policy. None when there is no such job; else whether the job has
/// ended already (its policy was applied before).
pub async fn set_retention(
    db: impl PgExecutor<'_>,
    gid: &str,
    r: &Retention,
) -> Result<Option<bool>> {
    Ok(sqlx::query_scalar(
        "update jobs set keep = $2, keep_last = $3, keep_in = $4, updated_at = now()
         where gid = $1
         returning retention_applied_at is not null",
    )
    .bind(gid)
    .bind(r.keep.as_str())
    .bind(r.keep_last.map(|n| n as i32))
    .bind(&r.keep_in)
    .fetch_optional(db)
    .await?)
}

pub async fn mark_retention_applied(db: impl PgExecutor<'_>, gid: &str) -> Result<()> {
    sqlx::query("update jobs set retention_applied_at = now() where gid = $1")
        .bind(gid)
        .execute(db)
        .await?;
    Ok(())
}

/// The job's checkpoints whose image still exists or is being kept, newest first:
/// (ID, image state).
pub async fn images_of(db: impl PgExecutor<'_>, gid: &str) -> Result<Vec<(String, ImageState)>> {
    sqlx::query_as::<_, (String, String)>(
        "select id, image_state from checkpoints
         where gid = $1 and image_state in ('stored', 'failed', 'keeping', 'kept')
         order by sequence desc",
    )
    .bind(gid)
    .fetch_all(db)
    .await?
    .into_iter()
    .map(|(id, s)| {
        let s = s
            .parse::<ImageState>()
            .map_err(|e| bad_row("checkpoint", e))?;
        Ok((id, s))
    })
    .collect()
}

/// What to do to an image on its CTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageAction {
    Delete,
    Keep,
}

impl ImageAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageAction::Delete => "delete",
            ImageAction::Keep => "keep",
        }
    }
}

/// Queues `action` for a checkpoint's image (replacing a queued task for it) and moves the
/// record to `deleting` / `keeping`.
pub async fn queue_image_task(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    checkpoint: &str,
    action: ImageAction,
    keep_in: Option<&str>,
) -> Result<()> {
    let state = match action {
        ImageAction::Delete => ImageState::Deleting,
        ImageAction::Keep => ImageState::Keeping,
    };
    sqlx::query(
        "update checkpoints set image_state = $2, image_error = null, kept_in = null where id = $1",
    )
    .bind(checkpoint)
    .bind(state.as_str())
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "insert into image_tasks (checkpoint_id, action, keep_in) values ($1, $2, $3)
         on conflict (checkpoint_id) do update set action = excluded.action,
            keep_in = excluded.keep_in, created_at = now(), attempts = 0,
            next_attempt_at = now(), last_error = null",
    )
    .bind(checkpoint)
    .bind(action.as_str())
    .bind(keep_in)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An image task claimed by one replica, with what the call to the CTS needs.
#[derive(Debug, Clone, FromRow)]
pub struct DueImageTask {
    pub checkpoint_id: String,
    pub action: String,
    pub keep_in: Option<String>,
    /// Including this attempt.
    pub attempts: i32,
    pub gid: String,
    pub cts_name: String,
    pub image_name: String,
    pub digest: Option<String>,
}

/// Claims up to `limit` due image tasks for `lease`: they are not due again (for any replica)
/// until then, so a task is carried out by one replica at a time without holding a
/// transaction open across the call to the CTS. A replica that dies mid-task leaves it to be
/// retried when the lease runs out (the CTS calls are idempotent).
pub async fn claim_image_tasks(
    db: impl PgExecutor<'_>,
    limit: i64,
    lease: std::time::Duration,
) -> Result<Vec<DueImageTask>> {
    Ok(sqlx::query_as::<_, DueImageTask>(
        "with due as (
            select checkpoint_id from image_tasks where next_attempt_at <= now()
            order by next_attempt_at, checkpoint_id limit $1
            for update skip locked)
         update image_tasks t set attempts = t.attempts + 1,
            next_attempt_at = now() + make_interval(secs => $2)
         from due, checkpoints c
         where t.checkpoint_id = due.checkpoint_id and c.id = t.checkpoint_id
         returning t.checkpoint_id, t.action, t.keep_in, t.attempts, c.gid, c.cts_name,
            c.image_name, c.digest",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(db)
    .await?)
}

/// Completes a claimed task: the image is `deleted` or `kept` (in `kept_in`). False when the
/// task was replaced meanwhile (a new policy): then nothing changes.
pub async fn image_task_done(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task: &DueImageTask,
    kept_in: Option<&str>,
) -> Result<bool> {
    if !take_task(tx, task).await? {
        return Ok(false);
    }
    let state = if kept_in.is_some() {
        ImageState::Kept
    } else {
        ImageState::Deleted
    };
    sqlx::query(
        "update checkpoints set image_state = $2, kept_in = $3, image_error = null where id = $1",
    )
    .bind(&task.checkpoint_id)
    .bind(state.as_str())
    .bind(kept_in)
    .execute(&mut **tx)
    .await?;
    // Deleted: from the CTS and the object store (the CTS deletes both). Kept: moved out of
    // the CTS's store; an object store keeps its copy (the export is local only).
    let gone = if kept_in.is_some() {
        Some(LocationKind::Cts)
    } else {
        None
    };
    remove_locations(&mut **tx, &task.checkpoint_id, gone).await?;
    Ok(true)
}

/// Gives a claimed task up: the record is `failed` with `error`, the image stays where it is.
pub async fn image_task_given_up(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task: &DueImageTask,
    error: &str,
) -> Result<bool> {
    if !take_task(tx, task).await? {
        return Ok(false);
    }
    sqlx::query("update checkpoints set image_state = 'failed', image_error = $2 where id = $1")
        .bind(&task.checkpoint_id)
        .bind(error)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

/// Deletes the task row if it is still the one claimed (same action and attempt).
async fn take_task(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task: &DueImageTask,
) -> Result<bool> {
    Ok(sqlx::query(
        "delete from image_tasks where checkpoint_id = $1 and action = $2 and attempts = $3",
    )
    .bind(&task.checkpoint_id)
    .bind(&task.action)
    .bind(task.attempts)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Schedules the retry of a claimed task after a failed attempt; the record shows the error.
pub async fn image_task_retry(
    db: &PgPool,
    task: &DueImageTask,
    error: &str,
    retry_in: std::time::Duration,
) -> Result<()> {
    let mut tx = db.begin().await?;
    let n = sqlx::query(
        "update image_tasks set last_error = $4, next_attempt_at = now() + make_interval(secs => $5)
         where checkpoint_id = $1 and action = $2 and attempts = $3",
    )
    .bind(&task.checkpoint_id)
    .bind(&task.action)
    .bind(task.attempts)
    .bind(error)
    .bind(retry_in.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 1 {
        sqlx::query("update checkpoints set image_error = $2 where id = $1")
            .bind(&task.checkpoint_id)
            .bind(error)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A failed job gets a termination time (unless it has one) so that its images do not outlive
/// the chance to recover it; its recovery clears it ([`route_job`]).
pub async fn expire_failed_job(
    db: impl PgExecutor<'_>,
    gid: &str,
    lifetime: std::time::Duration,
) -> Result<()> {
    sqlx::query(
        "update jobs set termination_time = now() + make_interval(secs => $2),
            termination_on_failure = true
         where gid = $1 and termination_time is null and destroyed_at is null",
    )
    .bind(gid)
    .bind(lifetime.as_secs_f64())
    .execute(db)
    .await?;
    Ok(())
}

/// Counts for the health endpoint and tests: (queued image tasks, failed images).
pub async fn image_task_counts(db: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "select (select count(*) from image_tasks),
                (select count(*) from checkpoints where image_state = 'failed')",
    )
    .fetch_one(db)
    .await?)
}

/// A live subscription with its backlog: (row, pending, failed, most recent error).
#[derive(Debug, Clone, FromRow)]
pub struct SubscriptionStatus {
    #[sqlx(flatten)]
    pub row: SubscriptionRow,
    pub pending: i64,
    pub failed: i64,
    pub last_error: Option<String>,
}

/// Live subscriptions (in creation order) with their backlog: one (`id`), or all, or all of one `owner`.
pub async fn subscription_status(
    db: &PgPool,
    id: Option<&str>,
    owner: Option<&str>,
) -> Result<Vec<SubscriptionStatus>> {
    Ok(sqlx::query_as::<_, SubscriptionStatus>(
        "select s.id, s.consumer_address, s.consumer_reference, s.topics, s.topic_dialect, s.gid,
            s.producer_address, s.created_at, s.termination_time, s.owner,
            count(n.id) filter (where n.failed_at is null) as pending,
            count(n.id) filter (where n.failed_at is not null) as failed,
            (array_agg(n.last_error order by n.id desc) filter (where n.last_error is not null))[1]
                as last_error
         from subscriptions s left join notifications n on n.subscription_id = s.id
         where (s.termination_time is null or s.termination_time > now())
           and ($1::text is null or s.id = $1)
           and ($2::text is null or s.owner = $2)
         group by s.id
         order by s.created_at, s.id",
    )
    .bind(id)
    .bind(owner)
    .fetch_all(db)
    .await?)
}

// ---------------------------------------------------------------------------------------------
// Recovery grants: a broker's AuthorizeRecovery

/// Records (or renews) a broker's authorization for `cts` to take `gid` over by a recovery.
pub async fn grant_recovery(
    db: impl PgExecutor<'_>,
    gid: &str,
    cts: &str,
    granted_by: &str,
    checkpoint: Option<&str>,
    lifetime: std::time::Duration,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "insert into recovery_grants (gid, cts_instance, granted_by, checkpoint_id, expires_at)
         values ($1, $2, $3, $4, now() + make_interval(secs => $5))
         on conflict (gid, cts_instance) do update
            set granted_by = excluded.granted_by, checkpoint_id = excluded.checkpoint_id,
                granted_at = now(), expires_at = excluded.expires_at
         returning expires_at",
    )
    .bind(gid)
    .bind(cts)
    .bind(granted_by)
    .bind(checkpoint)
    .bind(lifetime.as_secs_f64())
    .fetch_one(db)
    .await?)
}

/// Uses up a live grant for `cts` to recover `gid` (from `checkpoint`, when the grant names
/// one); true when there was one.
pub async fn take_recovery_grant(
    db: impl PgExecutor<'_>,
    gid: &str,
    cts: &str,
    checkpoint: Option<&str>,
) -> Result<bool> {
    Ok(sqlx::query(
        "delete from recovery_grants
         where gid = $1 and cts_instance = $2 and expires_at > now()
           and (checkpoint_id is null or checkpoint_id = $3)",
    )
    .bind(gid)
    .bind(cts)
    .bind(checkpoint)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Whether `cts` has registered a checkpoint of `gid` before (it was in charge of the job).
pub async fn has_checkpoint_by(db: impl PgExecutor<'_>, gid: &str, cts: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from checkpoints where gid = $1 and cts_name = $2)",
    )
    .bind(gid)
    .bind(cts)
    .fetch_one(db)
    .await?)
}

/// The wrapped image key of job `gid` and when it was made: the stored one, else `wrapped`
/// stored now (when replicas race, the first insert wins and every caller gets that one).
pub async fn job_key(
    db: &PgPool,
    gid: &str,
    wrapped: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> Result<(Vec<u8>, DateTime<Utc>)> {
    const SELECT: &str = "select wrapped, created_at from job_keys where gid = $1";
    if let Some(row) = sqlx::query_as::<_, (Vec<u8>, DateTime<Utc>)>(SELECT)
        .bind(gid)
        .fetch_optional(db)
        .await?
    {
        return Ok(row);
    }
    sqlx::query("insert into job_keys (gid, wrapped) values ($1, $2) on conflict (gid) do nothing")
        .bind(gid)
        .bind(wrapped().map_err(Error::Internal)?)
        .execute(db)
        .await?;
    Ok(sqlx::query_as::<_, (Vec<u8>, DateTime<Utc>)>(SELECT)
        .bind(gid)
        .fetch_one(db)
        .await?)
}

/// Whether CTS `cts` took a checkpoint of `gid` whose image the retention policy is deleting
/// now (its task asks that CTS to delete it, from the object store too, which takes the key).
pub async fn deleting_checkpoint_by(db: impl PgExecutor<'_>, gid: &str, cts: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from checkpoints
            where gid = $1 and cts_name = $2 and image_state = 'deleting')",
    )
    .bind(gid)
    .bind(cts)
    .fetch_one(db)
    .await?)
}
