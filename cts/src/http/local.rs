//! The local router, served on the UNIX socket only (see [`gca_protocol::local`]). Every handler
//! knows the caller's credentials from `SO_PEERCRED`.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use gca_protocol::cts_api::CheckpointBody;
use gca_protocol::fault::Fault;
use gca_protocol::messages::{CheckpointRecord, DoCheckpoint, RecoveryInfo, LATEST};
use gca_protocol::server::{self, ApiError};
use gca_protocol::transport::UnixPeer;
use serde::de::DeserializeOwned;

use crate::service::{Cts, LocalCaller};
use gca_protocol::local::{
    FetchImage, FetchedImage, LocalExit, LocalInfo, LocalJob, RegisterLocalJob,
};

/// The local user calling, from the `SO_PEERCRED` that `transport::serve_unix` read when the
/// connection was accepted; unknown credentials are nobody's (such a caller can register
/// nothing).
#[derive(Debug, Clone, Copy)]
pub struct UdsPeer(pub LocalCaller);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for UdsPeer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(UdsPeer(match parts.extensions.get::<UnixPeer>() {
            Some(p) => LocalCaller {
                pid: p.pid,
                uid: p.uid,
            },
            None => LocalCaller {
                pid: None,
                uid: u32::MAX,
            },
        }))
    }
}

pub fn router(cts: Cts) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/jobs", get(jobs).post(register))
        .route("/v1/jobs/{gid}", get(job).delete(abandon))
        .route("/v1/images/fetch", post(fetch_image))
        .route("/v1/jobs/{gid}/exit", post(exit))
        .route("/v1/jobs/{gid}/recovery", get(recovery_info))
        .route("/v1/jobs/{gid}/checkpoints", get(recoverable_checkpoints))
        .route("/v1/jobs/{gid}/checkpoint", post(checkpoint))
        .with_state(cts)
}

async fn json_body<T: DeserializeOwned>(
    cts: &Cts,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = server::read_body(headers, body, cts.config().max_body_bytes).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError(Fault::invalid(format!("invalid JSON body: {e}"))))
}

async fn info(State(cts): State<Cts>) -> Json<LocalInfo> {
    Json(cts.local_info())
}

/// A user sees their own jobs (their environments are in them); root all.
async fn jobs(State(cts): State<Cts>, UdsPeer(caller): UdsPeer) -> Json<Vec<LocalJob>> {
    Json(cts.list_jobs((caller.uid != 0).then_some(caller.uid)))
}

async fn job(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
) -> Result<Json<LocalJob>, ApiError> {
    Ok(Json(cts.get_own_job(&gid, caller)?))
}

#[derive(serde::Deserialize)]
struct ImageQuery {
    image: Option<String>,
}

/// `GET /v1/jobs/{gid}/recovery?image=latest`: how the caller's job can be recovered.
async fn recovery_info(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
    Query(q): Query<ImageQuery>,
) -> Result<Json<RecoveryInfo>, ApiError> {
    let image = q.image.unwrap_or_else(|| LATEST.to_string());
    Ok(Json(cts.recovery_info(&gid, &image, caller).await?))
}

/// `GET /v1/jobs/{gid}/checkpoints`: the checkpoints the caller could recover the job from,
/// newest first.
async fn recoverable_checkpoints(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
) -> Result<Json<Vec<CheckpointRecord>>, ApiError> {
    Ok(Json(cts.recoverable_checkpoints(&gid, caller).await?))
}

/// `POST /v1/jobs/{gid}/checkpoint` `{"stop": false}`: the caller's own job, now.
async fn checkpoint(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CheckpointRecord>, ApiError> {
    let req: CheckpointBody = json_body(&cts, &headers, body).await?;
    Ok(Json(
        cts.checkpoint_own(
            DoCheckpoint {
                gid,
                stop: req.stop,
            },
            caller,
        )
        .await?,
    ))
}

async fn register(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LocalJob>, ApiError> {
    let req: RegisterLocalJob = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.register_job(req, caller).await?))
}

async fn abandon(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
) -> Result<Json<LocalJob>, ApiError> {
    Ok(Json(cts.abandon_recovery(&gid, caller)?))
}

async fn fetch_image(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FetchedImage>, ApiError> {
    let req: FetchImage = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.fetch_image(req, caller).await?))
}

async fn exit(
    State(cts): State<Cts>,
    UdsPeer(caller): UdsPeer,
    Path(gid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LocalJob>, ApiError> {
    let req: LocalExit = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.report_exit(&gid, req, caller).await?))
}
