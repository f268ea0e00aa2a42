//! The local router, served on the UNIX socket only (see [`gca_protocol::local`]). Every handler
//! knows the caller's credentials from `SO_PEERCRED`.

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use gca_protocol::fault::Fault;
use gca_protocol::server::{self, ApiError};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::service::{Caller, Cts};
use gca_protocol::local::{
    FetchImage, FetchedImage, LocalExit, LocalInfo, LocalJob, RegisterLocalJob,
};

/// The peer of a UNIX socket connection.
#[derive(Debug, Clone, Copy)]
pub struct UdsPeer(pub Caller);

impl Connected<IncomingStream<'_, UnixListener>> for UdsPeer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let caller = match stream.io().peer_cred() {
            Ok(c) => Caller {
                pid: c.pid(),
                uid: c.uid(),
            },
            // Unknown credentials are nobody's: such a caller can register nothing.
            Err(_) => Caller {
                pid: None,
                uid: u32::MAX,
            },
        };
        UdsPeer(caller)
    }
}

pub fn router(cts: Cts) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/jobs", get(jobs).post(register))
        .route("/v1/jobs/{gid}", get(job).delete(abandon))
        .route("/v1/images/fetch", post(fetch_image))
        .route("/v1/jobs/{gid}/exit", post(exit))
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

async fn jobs(State(cts): State<Cts>) -> Json<Vec<LocalJob>> {
    Json(cts.list_jobs())
}

async fn job(State(cts): State<Cts>, Path(gid): Path<String>) -> Result<Json<LocalJob>, ApiError> {
    Ok(Json(cts.get_job(&gid)?))
}

async fn register(
    State(cts): State<Cts>,
    ConnectInfo(UdsPeer(caller)): ConnectInfo<UdsPeer>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LocalJob>, ApiError> {
    let req: RegisterLocalJob = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.register_job(req, caller).await?))
}

async fn abandon(
    State(cts): State<Cts>,
    ConnectInfo(UdsPeer(caller)): ConnectInfo<UdsPeer>,
    Path(gid): Path<String>,
) -> Result<Json<LocalJob>, ApiError> {
    Ok(Json(cts.abandon_recovery(&gid, caller)?))
}

async fn fetch_image(
    State(cts): State<Cts>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FetchedImage>, ApiError> {
    let req: FetchImage = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.fetch_image(req).await?))
}

async fn exit(
    State(cts): State<Cts>,
    ConnectInfo(UdsPeer(caller)): ConnectInfo<UdsPeer>,
    Path(gid): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LocalJob>, ApiError> {
    let req: LocalExit = json_body(&cts, &headers, body).await?;
    Ok(Json(cts.report_exit(&gid, req, caller).await?))
}
