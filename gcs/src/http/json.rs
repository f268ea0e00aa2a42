//! The JSON API under `/api/v1`: the same operations as the SOAP endpoint, for scripts and
//! `gcactl`. Bodies are the protocol crate's message types; path parameters (GIDs, names) are
//! merged into them.

use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use gca_protocol::fault::Fault;
use gca_protocol::messages::*;
use serde::de::DeserializeOwned;

use super::{ctx, read_body, ApiError};
use crate::service::{Ctx, Gcs};
use gca_protocol::identity::Caller;

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn routes() -> Router<Gcs> {
    Router::new()
        .route("/jobs", get(list_jobs).post(register_job))
        .route("/jobs/{gid}", get(get_job))
        .route(
            "/jobs/{gid}/checkpoints",
            get(get_checkpoints).post(do_checkpoint),
        )
        .route("/jobs/{gid}/recovery", get(recovery_info))
        .route("/jobs/{gid}/recovery-grants", post(authorize_recovery))
        .route("/jobs/{gid}/retention", put(set_retention))
        .route("/jobs/{gid}/finished", post(job_finished))
        .route("/jobs/{gid}/abandon-recovery", post(abandon_recovery))
        .route("/jobs/{gid}/key", get(job_key))
        .route("/checkpoints", post(register_checkpoint))
        .route("/checkpoints/{id}/locations", post(set_image_location))
        .route("/find-cts", post(find_cts))
        .route("/classes", get(list_classes).post(register_class))
        .route("/cts-types", get(list_types).post(register_descriptor))
        .route("/cts-types/{name}", delete(unregister_type))
        .route(
            "/cts-instances",
            get(list_instances).post(register_instance),
        )
        .route("/cts-instances/{name}", delete(unregister_instance))
        .route("/subscriptions", get(list_subscriptions).post(subscribe))
        .route(
            "/subscriptions/{id}",
            get(get_subscription).delete(unsubscribe),
        )
}

/// Reads a JSON object body (an empty body is `{}`), sets `fields` from the URL path (a body
/// value that disagrees is refused), and deserializes it.
async fn body<T: DeserializeOwned>(
    gcs: &Gcs,
    headers: &HeaderMap,
    body: Body,
    fields: &[(&str, &str)],
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, gcs.config.max_body_bytes).await?;
    let mut value: serde_json::Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| Fault::invalid(format!("the request body is not valid JSON: {e}")))?
    };
    let obj = value
        .as_object_mut()
        .ok_or_else(|| Fault::invalid("the request body must be a JSON object"))?;
    for (k, v) in fields {
        match obj.get(*k) {
            Some(existing) if existing.as_str() != Some(v) => {
                return Err(Fault::invalid(format!(
                    "the body's {k:?} ({existing}) disagrees with the URL ({v:?})"
                ))
                .into())
            }
            _ => {
                obj.insert(
                    (*k).to_string(),
                    serde_json::Value::String((*v).to_string()),
                );
            }
        }
    }
    serde_json::from_value(value)
        .map_err(|e| Fault::invalid(format!("invalid request: {e}")).into())
}

/// The request's context (caller and public URL), for the handlers below.
struct Req {
    gcs: Gcs,
    ctx: Ctx,
    headers: HeaderMap,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Req
where
    Gcs: axum::extract::FromRef<S>,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        use axum::extract::FromRef;
        let gcs = Gcs::from_ref(state);
        let caller = Caller::from_request_parts(parts, state).await?;
        let ctx = ctx(&gcs, &parts.headers, caller);
        Ok(Req {
            gcs,
            ctx,
            headers: parts.headers.clone(),
        })
    }
}

impl Req {
    async fn body<T: DeserializeOwned>(
        &self,
        b: Body,
        fields: &[(&str, &str)],
    ) -> Result<T, ApiError> {
        body(&self.gcs, &self.headers, b, fields).await
    }

    /// The GCS's SOAP service address as this request reached it (subscription addresses).
    fn service_address(&self) -> String {
        format!("{}{}", self.ctx.gcs_url, gca_protocol::ns::GCS_SERVICE_PATH)
    }
}

async fn do_checkpoint(r: Req, Path(gid): Path<String>, b: Body) -> ApiResult<CheckpointRecord> {
    let req: DoCheckpoint = r.body(b, &[("gid", &gid)]).await?;
    Ok(Json(r.gcs.do_checkpoint(&r.ctx, req).await?))
}

/// `?after=SEQ&limit=N`: the page after sequence number SEQ (the `next` of the previous one).
#[derive(serde::Deserialize)]
struct CheckpointsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn get_checkpoints(
    r: Req,
    Path(gid): Path<String>,
    q: Result<Query<CheckpointsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<CheckpointList> {
    let Query(q) = q.map_err(|e| Fault::invalid(format!("invalid query: {e}")))?;
    let req = GetCheckpoints {
        gid,
        after: q.after,
        limit: q.limit,
    };
    Ok(Json(r.gcs.get_checkpoints(&r.ctx, req).await?))
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    image: Option<String>,
}

async fn recovery_info(
    r: Req,
    Path(gid): Path<String>,
    Query(q): Query<ImageQuery>,
) -> ApiResult<RecoveryInfo> {
    let req = GetRecoveryInfo {
        gid,
        image: q.image.unwrap_or_else(|| LATEST.to_string()),
    };
    Ok(Json(r.gcs.get_recovery_info(&r.ctx, req).await?))
}

/// `POST /jobs/{gid}/recovery-grants` `{"cts_instance": ..., "checkpoint": ...}`.
async fn authorize_recovery(
    r: Req,
    Path(gid): Path<String>,
    b: Body,
) -> ApiResult<RecoveryAuthorized> {
    let req: AuthorizeRecovery = r.body(b, &[("gid", &gid)]).await?;
    Ok(Json(r.gcs.authorize_recovery(&r.ctx, req).await?))
}

async fn list_subscriptions(r: Req) -> ApiResult<SubscriptionList> {
    Ok(Json(
        r.gcs
            .list_subscriptions(&r.ctx, &r.service_address())
            .await?,
    ))
}

async fn subscribe(r: Req, b: Body) -> ApiResult<SubscriptionInfo> {
    let req: NewSubscription = r.body(b, &[]).await?;
    Ok(Json(
        r.gcs
            .subscribe_json(&r.ctx, req, &r.service_address())
            .await?,
    ))
}

async fn get_subscription(r: Req, Path(id): Path<String>) -> ApiResult<SubscriptionInfo> {
    Ok(Json(
        r.gcs
            .subscription_info(&r.ctx, &id, &r.service_address())
            .await?,
    ))
}

async fn unsubscribe(r: Req, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    r.gcs.unsubscribe(&r.ctx, &id).await?;
    Ok(Json(serde_json::json!({ "id": id, "unsubscribed": true })))
}

/// `PUT /jobs/{gid}/retention` with a [`Retention`] body.
async fn set_retention(r: Req, Path(gid): Path<String>, b: Body) -> ApiResult<JobInfo> {
    let retention: Retention = r.body(b, &[]).await?;
    Ok(Json(
        r.gcs
            .set_retention(&r.ctx, SetRetention { gid, retention })
            .await?,
    ))
}

async fn get_job(r: Req, Path(gid): Path<String>) -> ApiResult<JobInfo> {
    Ok(Json(r.gcs.get_job(&r.ctx, GidRequest { gid }).await?))
}

async fn list_jobs(
    r: Req,
    q: Result<Query<ListJobs>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<JobList> {
    let Query(q) = q.map_err(|e| Fault::invalid(format!("invalid query: {e}")))?;
    Ok(Json(r.gcs.list_jobs(&r.ctx, q).await?))
}

async fn register_job(r: Req, b: Body) -> ApiResult<JobRegistered> {
    let req: RegisterJob = r.body(b, &[]).await?;
    Ok(Json(r.gcs.register_job(&r.ctx, req).await?))
}

async fn job_finished(r: Req, Path(gid): Path<String>, b: Body) -> ApiResult<JobInfo> {
    let req: JobFinished = r.body(b, &[("gid", &gid)]).await?;
    Ok(Json(r.gcs.job_finished(&r.ctx, req).await?))
}

async fn job_key(r: Req, Path(gid): Path<String>) -> ApiResult<JobKey> {
    Ok(Json(r.gcs.get_job_key(&r.ctx, GetJobKey { gid }).await?))
}

async fn abandon_recovery(r: Req, Path(gid): Path<String>, b: Body) -> ApiResult<JobInfo> {
    let req: AbandonRecovery = r.body(b, &[("gid", &gid)]).await?;
    Ok(Json(r.gcs.abandon_recovery(&r.ctx, req).await?))
}

async fn register_checkpoint(r: Req, b: Body) -> ApiResult<CheckpointRegistered> {
    let req: RegisterCheckpoint = r.body(b, &[]).await?;
    Ok(Json(r.gcs.register_checkpoint(&r.ctx, req).await?))
}

/// `POST /checkpoints/{id}/locations` `{"gid", "location": {...}}`: SetImageLocation.
async fn set_image_location(
    r: Req,
    Path(id): Path<String>,
    b: Body,
) -> ApiResult<CheckpointRecord> {
    let req: SetImageLocation = r.body(b, &[("checkpoint_id", &id)]).await?;
    Ok(Json(r.gcs.set_image_location(&r.ctx, req).await?))
}

async fn find_cts(r: Req, b: Body) -> ApiResult<FindCtsResponse> {
    let req: FindCts = r.body(b, &[]).await?;
    Ok(Json(r.gcs.find_cts(&r.ctx, req).await?))
}

async fn list_classes(r: Req) -> ApiResult<ClassList> {
    Ok(Json(r.gcs.list_classes(&r.ctx).await?))
}

async fn register_class(r: Req, b: Body) -> ApiResult<ClassRegistered> {
    let req: RegisterCheckpointerClass = r.body(b, &[]).await?;
    Ok(Json(r.gcs.register_class(&r.ctx, req).await?))
}

async fn list_types(r: Req) -> ApiResult<CtsTypeList> {
    Ok(Json(r.gcs.list_types(&r.ctx).await?))
}

/// Takes `{"descriptor_xml": "..."}`, or the descriptor document itself with an XML content
/// type (`curl --data-binary @cts.xml -H 'Content-Type: application/xml'`).
async fn register_descriptor(r: Req, b: Body) -> ApiResult<DescriptorRegistered> {
    let is_xml = r
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("xml"));
    let req = if is_xml {
        let bytes = read_body(&r.headers, b, r.gcs.config.max_body_bytes).await?;
        RegisterCtsDescriptor {
            descriptor_xml: String::from_utf8(bytes.to_vec())
                .map_err(|_| Fault::invalid("the descriptor is not UTF-8"))?,
        }
    } else {
        r.body(b, &[]).await?
    };
    Ok(Json(r.gcs.register_descriptor(&r.ctx, req).await?))
}

async fn unregister_type(r: Req, Path(name): Path<String>) -> ApiResult<Unregistered> {
    Ok(Json(
        r.gcs
            .unregister_cts(
                &r.ctx,
                UnregisterCts {
                    instance: None,
                    cts_type: Some(name),
                },
            )
            .await?,
    ))
}

async fn list_instances(r: Req) -> ApiResult<CtsInstanceList> {
    Ok(Json(r.gcs.list_instances(&r.ctx).await?))
}

async fn register_instance(r: Req, b: Body) -> ApiResult<InstanceRegistered> {
    let req: RegisterCtsInstance = r.body(b, &[]).await?;
    Ok(Json(r.gcs.register_instance(&r.ctx, req).await?))
}

async fn unregister_instance(r: Req, Path(name): Path<String>) -> ApiResult<Unregistered> {
    Ok(Json(
        r.gcs
            .unregister_cts(
                &r.ctx,
                UnregisterCts {
                    instance: Some(name),
                    cts_type: None,
                },
            )
            .await?,
    ))
}
