//! The public router: `POST /wsrf/services/CheckpointTranslationService` (SOAP 1.1/1.2,
//! `?wsdl`), the schemas it imports (`/wsrf/schemas/{file}`), `/images/...` (the image store, for other CTSes and recovery wrappers), the JSON
//! API under `/api/v1` and `/healthz`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gca_protocol::cts_api::{CheckpointBody, Status};
use gca_protocol::fault::Fault;
use gca_protocol::local::{LocalInfo, LocalJob};
use gca_protocol::messages::{CheckpointRecord, DoCheckpoint};
use gca_protocol::ns;
use gca_protocol::ops::{CtsDoCheckpointOp, CTS_OPERATIONS};
use gca_protocol::schemas;
use gca_protocol::server::{self, ApiError};
use gca_protocol::soap::SoapRequest;
use gca_protocol::xml::Element;

use crate::policy::{self, PublicOp};
use crate::service::Cts;
use gca_protocol::identity::Caller;

pub fn router(cts: Cts) -> Router {
    let images = gca_store::http::routes()
        .with_state(cts.store().clone())
        .layer(axum::middleware::from_fn_with_state(
            cts.clone(),
            policy::images_guard,
        ));
    Router::new()
        .route(ns::CTS_SERVICE_PATH, post(soap_endpoint).get(wsdl))
        .route(&format!("{}/{{file}}", schemas::PATH), get(schema))
        .route("/api/v1/status", get(status))
        .route("/api/v1/local", get(local))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{gid}", get(job))
        .route("/api/v1/jobs/{gid}/checkpoint", post(checkpoint))
        .route("/healthz", get(health))
        .with_state(cts)
        .nest("/images", images)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(gca_protocol::request_log::trace_layer())
}

async fn soap_endpoint(
    State(cts): State<Cts>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let limit = cts.config().max_body_bytes;
    server::soap_endpoint(&headers, body, limit, |req| async move {
        dispatch(&cts, &caller, &req).await
    })
    .await
}

async fn dispatch(
    cts: &Cts,
    caller: &Caller,
    req: &SoapRequest,
) -> Result<(String, Element), Fault> {
    if req.body.ns.as_deref() != Some(ns::GCA) {
        return Err(unsupported(req));
    }
    policy::authorize(caller, PublicOp::DoCheckpoint)?;
    match req.body.name.as_str() {
        "DoCheckpoint" => {
            server::soap_call::<CtsDoCheckpointOp, _, _, _>(req, |r| cts.do_checkpoint(r)).await
        }
        _ => Err(unsupported(req)),
    }
}

fn unsupported(req: &SoapRequest) -> Fault {
    server::unsupported("Checkpoint Translation Service", CTS_OPERATIONS, req)
}

/// The root URL clients reach us at: the configured public URL, else the request's Host.
fn base(cts: &Cts, headers: &HeaderMap) -> String {
    let config = cts.config();
    match &config.public_url {
        Some(_) => config.public_url(),
        None => server::request_base(headers, config.tls.is_some())
            .unwrap_or_else(|| config.public_url()),
    }
}

async fn wsdl(State(cts): State<Cts>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    match query.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("wsdl") => server::schema_response("cts.wsdl", &base(&cts, &headers)),
        _ => (
            http::StatusCode::METHOD_NOT_ALLOWED,
            [(http::header::ALLOW, "POST")],
            "This is the SOAP endpoint of a Checkpoint Translation Service: POST SOAP 1.1 or 1.2 requests here. The WSDL is at ?wsdl.\n",
        )
            .into_response(),
    }
}

/// `GET /wsrf/schemas/{file}`: what the WSDL imports.
async fn schema(State(cts): State<Cts>, headers: HeaderMap, Path(file): Path<String>) -> Response {
    server::schema_response(&file, &base(&cts, &headers))
}

async fn status(State(cts): State<Cts>, caller: Caller) -> Result<Json<Status>, ApiError> {
    policy::authorize(&caller, PublicOp::ReadStatus)?;
    Ok(Json(cts.status()))
}

/// Where the local registration socket is: wrappers given the CTS's URL find it here.
async fn local(State(cts): State<Cts>) -> Json<LocalInfo> {
    let mut info = cts.local_info();
    info.driver_config = None;
    Json(info)
}

async fn jobs(State(cts): State<Cts>, caller: Caller) -> Result<Json<Vec<LocalJob>>, ApiError> {
    policy::authorize(&caller, PublicOp::ReadStatus)?;
    Ok(Json(cts.list_jobs(None)))
}

async fn job(
    State(cts): State<Cts>,
    caller: Caller,
    Path(gid): Path<String>,
) -> Result<Json<LocalJob>, ApiError> {
    policy::authorize(&caller, PublicOp::ReadStatus)?;
    Ok(Json(cts.get_job(&gid)?))
}

/// `POST /api/v1/jobs/{gid}/checkpoint` `{"stop": false}`: the same as the SOAP operation.
async fn checkpoint(
    State(cts): State<Cts>,
    caller: Caller,
    Path(gid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CheckpointRecord>, ApiError> {
    policy::authorize(&caller, PublicOp::DoCheckpoint)?;
    let bytes = server::read_body(&headers, body, cts.config().max_body_bytes).await?;
    let req: CheckpointBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        CheckpointBody::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| Fault::invalid(format!("invalid JSON body: {e}")))?
    };
    Ok(Json(
        cts.do_checkpoint(DoCheckpoint {
            gid,
            stop: req.stop,
        })
        .await?,
    ))
}

async fn health(State(cts): State<Cts>) -> Json<serde_json::Value> {
    // Counts only: which records were refused, and why, is in the authorized /api/v1/status.
    let gcs = cts.link().status();
    let status = if gcs.connected && gcs.rejected == 0 && gcs.unwritten_records == 0 {
        "ok"
    } else {
        "degraded"
    };
    Json(serde_json::json!({
        "status": status,
        "gcs_connected": gcs.connected,
        "outbox_pending": gcs.pending,
        "outbox_rejected": gcs.rejected,
        "outbox_unwritten_records": gcs.unwritten_records,
    }))
}
