//! The JSON API under `/api/v1`: the same operations as the SOAP endpoint, for scripts and
//! `gcactl`. Bodies are the protocol crate's message types; path parameters (GIDs, names) are
//! merged into them.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use gca_protocol::fault::Fault;
use gca_protocol::messages::*;
use serde::de::DeserializeOwned;

use super::{ctx, read_body, ApiError};
use crate::service::Gcs;

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
        .route("/jobs/{gid}/retention", put(set_retention))
        .route("/jobs/{gid}/finished", post(job_finished))
        .route("/checkpoints", post(register_checkpoint))
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

async fn do_checkpoint(
    State(gcs): State<Gcs>,
    Path(gid): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<CheckpointRecord> {
    let req: DoCheckpoint = body(&gcs, &headers, b, &[("gid", &gid)]).await?;
    Ok(Json(gcs.do_checkpoint(req).await?))
}

async fn get_checkpoints(
    State(gcs): State<Gcs>,
    Path(gid): Path<String>,
) -> ApiResult<CheckpointList> {
    Ok(Json(gcs.get_checkpoints(GidRequest { gid }).await?))
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    image: Option<String>,
}

async fn recovery_info(
    State(gcs): State<Gcs>,
    Path(gid): Path<String>,
    Query(q): Query<ImageQuery>,
    headers: HeaderMap,
) -> ApiResult<RecoveryInfo> {
    let req = GetRecoveryInfo {
        gid,
        image: q.image.unwrap_or_else(|| LATEST.to_string()),
    };
    Ok(Json(
        gcs.get_recovery_info(req, &ctx(&gcs, &headers)).await?,
    ))
}

/// The GCS's SOAP service address as this request reached it (subscription addresses).
fn service_address(gcs: &Gcs, headers: &HeaderMap) -> String {
    format!(
        "{}{}",
        ctx(gcs, headers).gcs_url,
        gca_protocol::ns::GCS_SERVICE_PATH
    )
}

async fn list_subscriptions(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
) -> ApiResult<SubscriptionList> {
    Ok(Json(
        gcs.list_subscriptions(&service_address(&gcs, &headers))
            .await?,
    ))
}

async fn subscribe(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<SubscriptionInfo> {
    let req: NewSubscription = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(
        gcs.subscribe_json(req, &service_address(&gcs, &headers))
            .await?,
    ))
}

async fn get_subscription(
    State(gcs): State<Gcs>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<SubscriptionInfo> {
    Ok(Json(
        gcs.subscription_info(&id, &service_address(&gcs, &headers))
            .await?,
    ))
}

async fn unsubscribe(
    State(gcs): State<Gcs>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    gcs.unsubscribe(&id).await?;
    Ok(Json(serde_json::json!({ "id": id, "unsubscribed": true })))
}

/// `PUT /jobs/{gid}/retention` with a [`Retention`] body.
async fn set_retention(
    State(gcs): State<Gcs>,
    Path(gid): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<JobInfo> {
    let retention: Retention = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(
        gcs.set_retention(SetRetention { gid, retention }).await?,
    ))
}

async fn get_job(State(gcs): State<Gcs>, Path(gid): Path<String>) -> ApiResult<JobInfo> {
    Ok(Json(gcs.get_job(GidRequest { gid }).await?))
}

async fn list_jobs(
    State(gcs): State<Gcs>,
    q: Result<Query<ListJobs>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<JobList> {
    let Query(q) = q.map_err(|e| Fault::invalid(format!("invalid query: {e}")))?;
    Ok(Json(gcs.list_jobs(q).await?))
}

async fn register_job(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<JobRegistered> {
    let req: RegisterJob = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(gcs.register_job(req).await?))
}

async fn job_finished(
    State(gcs): State<Gcs>,
    Path(gid): Path<String>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<JobInfo> {
    let req: JobFinished = body(&gcs, &headers, b, &[("gid", &gid)]).await?;
    Ok(Json(gcs.job_finished(req).await?))
}

async fn register_checkpoint(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<CheckpointRegistered> {
    let req: RegisterCheckpoint = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(gcs.register_checkpoint(req).await?))
}

async fn find_cts(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<FindCtsResponse> {
    let req: FindCts = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(gcs.find_cts(req).await?))
}

async fn list_classes(State(gcs): State<Gcs>) -> ApiResult<ClassList> {
    Ok(Json(gcs.list_classes().await?))
}

async fn register_class(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<ClassRegistered> {
    let req: RegisterCheckpointerClass = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(gcs.register_class(req).await?))
}

async fn list_types(State(gcs): State<Gcs>) -> ApiResult<CtsTypeList> {
    Ok(Json(gcs.list_types().await?))
}

/// Takes `{"descriptor_xml": "..."}`, or the descriptor document itself with an XML content
/// type (`curl --data-binary @cts.xml -H 'Content-Type: application/xml'`).
async fn register_descriptor(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<DescriptorRegistered> {
    let is_xml = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("xml"));
    let req = if is_xml {
        let bytes = read_body(&headers, b, gcs.config.max_body_bytes).await?;
        RegisterCtsDescriptor {
            descriptor_xml: String::from_utf8(bytes.to_vec())
                .map_err(|_| Fault::invalid("the descriptor is not UTF-8"))?,
        }
    } else {
        body(&gcs, &headers, b, &[]).await?
    };
    Ok(Json(gcs.register_descriptor(req).await?))
}

async fn unregister_type(
    State(gcs): State<Gcs>,
    Path(name): Path<String>,
) -> ApiResult<Unregistered> {
    Ok(Json(
        gcs.unregister_cts(UnregisterCts {
            instance: None,
            cts_type: Some(name),
        })
        .await?,
    ))
}

async fn list_instances(State(gcs): State<Gcs>) -> ApiResult<CtsInstanceList> {
    Ok(Json(gcs.list_instances().await?))
}

async fn register_instance(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<InstanceRegistered> {
    let req: RegisterCtsInstance = body(&gcs, &headers, b, &[]).await?;
    Ok(Json(gcs.register_instance(req).await?))
}

async fn unregister_instance(
    State(gcs): State<Gcs>,
    Path(name): Path<String>,
) -> ApiResult<Unregistered> {
    Ok(Json(
        gcs.unregister_cts(UnregisterCts {
            instance: Some(name),
            cts_type: None,
        })
        .await?,
    ))
}
