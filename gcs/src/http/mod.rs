//! HTTP transport: the SOAP endpoint, the WSDL/XSD files, the JSON API and health. Handlers
//! only translate between the wire and [`crate::service::Gcs`].

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::service::{Ctx, Gcs};
use gca_protocol::identity::Caller;

mod json;
mod soap;

pub const GCS_PATH: &str = gca_protocol::ns::GCS_SERVICE_PATH;

pub fn router(gcs: Gcs) -> Router {
    Router::new()
        .route(GCS_PATH, post(soap::endpoint).get(soap::wsdl))
        .route(
            &format!("{GCS_PATH}/{{kind}}/{{id}}"),
            post(soap::resource_endpoint).get(soap::resource_get),
        )
        .route(
            &format!("{}/{{file}}", gca_protocol::schemas::PATH),
            get(soap::schema),
        )
        .nest("/api/v1", json::routes())
        .route("/healthz", get(health))
        .layer(axum::middleware::from_fn_with_state(
            gcs.clone(),
            ready_guard,
        ))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(gca_protocol::request_log::trace_layer())
        .with_state(gcs)
}

async fn health(State(gcs): State<Gcs>) -> Response {
    if !*gcs.ready.borrow() {
        return ApiError(not_ready()).into_response();
    }
    match crate::db::ping(&gcs.db).await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => ApiError(e.into_fault()).into_response(),
    }
}

fn not_ready() -> gca_protocol::Fault {
    gca_protocol::Fault::new(
        gca_protocol::FaultKind::ServiceUnavailable,
        "the GCS's database is not reachable yet (or not migrated); the GCS connects as soon as it is: retry later",
    )
    .with_code("database-unavailable")
}

/// Until the database is migrated, the operations answer `ServiceUnavailable` (discovery —
/// WSDL, schemas, health — still answers).
async fn ready_guard(
    State(gcs): State<Gcs>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ready = *gcs.ready.borrow();
    let json = req.uri().path().starts_with("/api/v1");
    if !ready && (json || req.method() == http::Method::POST) {
        let fault = not_ready();
        if json {
            return ApiError(fault).into_response();
        }
        return gca_protocol::server::fault_response(
            gca_protocol::soap::SoapVersion::Soap11,
            &fault,
            None,
        );
    }
    next.run(req).await
}

/// The request's context: who calls (see [`crate::policy`]), and the root URL clients reach
/// us at: the configured public URL, else the request's Host.
fn ctx(gcs: &Gcs, headers: &HeaderMap, caller: Caller) -> Ctx {
    let gcs_url = match &gcs.config.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let scheme = if gcs.config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let host = headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
                .map(str::to_string)
                .unwrap_or_else(|| gcs.config.listen.to_string());
            format!("{scheme}://{host}")
        }
    };
    Ctx { gcs_url, caller }
}

pub use gca_protocol::server::{read_body, ApiError};
