//! HTTP transport: the SOAP endpoint, the WSDL/XSD files, the JSON API and health. Handlers
//! only translate between the wire and [`crate::service::Gcs`].

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gca_protocol::fault::{ErrorBody, Fault, FaultKind};
use tower_http::trace::TraceLayer;

use crate::service::{Ctx, Gcs};

mod json;
mod soap;

pub const GCS_PATH: &str = "/wsrf/services/GridCheckpointService";

pub fn router(gcs: Gcs) -> Router {
    Router::new()
        .route(GCS_PATH, post(soap::endpoint).get(soap::wsdl))
        .route("/wsrf/schemas/{file}", get(soap::schema))
        .nest("/api/v1", json::routes())
        .route("/healthz", get(health))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(TraceLayer::new_for_http())
        .with_state(gcs)
}

async fn health(State(gcs): State<Gcs>) -> Response {
    match crate::db::ping(&gcs.db).await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => ApiError(e.into_fault()).into_response(),
    }
}

/// The root URL clients reach us at: the configured public URL, else the request's Host.
fn ctx(gcs: &Gcs, headers: &HeaderMap) -> Ctx {
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
    Ctx { gcs_url }
}

/// Reads a request body up to `limit` bytes.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Fault> {
    let too_large = || {
        Fault::new(
            FaultKind::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            src = s.source();
        }
        Fault::invalid(format!("could not read the request body: {e}"))
    })
}

/// A fault as a JSON response.
pub struct ApiError(pub Fault);

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        ApiError(e.into_fault())
    }
}

impl From<Fault> for ApiError {
    fn from(f: Fault) -> Self {
        ApiError(f)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http::StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}
