//! The request log both services write: one line per request, at a level that says whose
//! problem it was. A request refused for the caller's mistake (an unknown GID, a bad message)
//! is `INFO`; a failure of something the server depends on (a CTS down, a checkpointer failing)
//! is `WARN`; a failure of the server itself (`Internal`, or a 5xx the server did not explain)
//! is `ERROR`; everything else is `DEBUG`.
//!
//! SOAP 1.1 answers every fault with status 500, so the status alone cannot tell these apart:
//! [`crate::server::fault_response`] and [`crate::server::ApiError`] attach a [`FaultOutcome`]
//! to the response, and [`trace_layer`] reads it.

use std::time::Duration;

use http::Response;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnBodyChunk, DefaultOnEos, DefaultOnRequest};
use tower_http::trace::{MakeSpan, OnResponse, TraceLayer};
use tracing::Span;

use crate::fault::{Fault, FaultKind};

/// The fault a response carries (a response extension).
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    pub kind: FaultKind,
    pub code: Option<String>,
    pub message: String,
}

impl FaultOutcome {
    pub fn of(fault: &Fault) -> Self {
        FaultOutcome {
            kind: fault.kind,
            code: fault.code.clone(),
            message: fault.message.clone(),
        }
    }
}

/// Whose problem a request's outcome is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The caller's: refused as sent.
    Refused,
    /// Something the server depends on failed.
    Unavailable,
    /// The server failed.
    Failed,
}

impl Outcome {
    pub fn of(status: u16, fault: Option<&FaultOutcome>) -> Outcome {
        match fault {
            Some(f) if f.kind == FaultKind::Internal => Outcome::Failed,
            Some(f) if f.kind.is_sender_fault() => Outcome::Refused,
            Some(_) => Outcome::Unavailable,
            None if status >= 500 => Outcome::Failed,
            None if status >= 400 => Outcome::Refused,
            None => Outcome::Ok,
        }
    }
}

/// The span of one request: `request{method, uri}` at `INFO`, with this module as its target
/// (so that `RUST_LOG=info` shows which request a refused or failed line is about).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> Span {
        tracing::info_span!("request", method = %request.method(), uri = %request.uri())
    }
}

/// Logs each response once, at the level of its [`Outcome`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LogOutcome;

impl<B> OnResponse<B> for LogOutcome {
    fn on_response(self, response: &Response<B>, latency: Duration, _span: &Span) {
        let status = response.status().as_u16();
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let fault = response.extensions().get::<FaultOutcome>();
        let kind = fault.map(|f| format!("{:?}", f.kind));
        let code = fault.and_then(|f| f.code.as_deref());
        let message = fault.map(|f| f.message.as_str());
        macro_rules! log {
            ($level:ident, $what:literal) => {
                tracing::$level!(
                    status,
                    latency_ms,
                    fault.kind = kind,
                    fault.code = code,
                    fault.message = message,
                    $what
                )
            };
        }
        match Outcome::of(status, fault) {
            Outcome::Ok => log!(debug, "request done"),
            Outcome::Refused => log!(info, "request refused"),
            Outcome::Unavailable => log!(warn, "request failed: a service it needs failed"),
            Outcome::Failed => log!(error, "request failed"),
        }
    }
}

/// The `TraceLayer` of [`trace_layer`].
pub type RequestTrace = TraceLayer<
    SharedClassifier<ServerErrorsAsFailures>,
    RequestSpan,
    DefaultOnRequest,
    LogOutcome,
    DefaultOnBodyChunk,
    DefaultOnEos,
    (),
>;

/// tower-http's request tracing with one line per response at its [`Outcome`]'s level (its
/// own failure line, `ERROR` for every 5xx, is off), in a [`RequestSpan`].
pub fn trace_layer() -> RequestTrace {
    TraceLayer::new_for_http()
        .make_span_with(RequestSpan)
        .on_response(LogOutcome)
        .on_failure(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;
    use crate::server::{fault_response, ApiError};
    use crate::soap::SoapVersion;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fault(kind: FaultKind) -> Fault {
        Fault::new(kind, format!("a {kind:?} fault")).with_code("test-code")
    }

    /// The log lines of one request to `path`, with the status it got.
    async fn log_of(path: &str) -> (u16, String) {
        let app = Router::new()
            .route(
                "/soap11/unknown",
                get(|| async {
                    fault_response(
                        SoapVersion::Soap11,
                        &fault(FaultKind::ResourceUnknown),
                        None,
                    )
                }),
            )
            .route(
                "/soap11/internal",
                get(|| async {
                    fault_response(SoapVersion::Soap11, &fault(FaultKind::Internal), None)
                }),
            )
            .route(
                "/soap12/unavailable",
                get(|| async {
                    fault_response(
                        SoapVersion::Soap12,
                        &fault(FaultKind::ServiceUnavailable),
                        None,
                    )
                }),
            )
            .route(
                "/json/conflict",
                get(|| async { ApiError(fault(FaultKind::Conflict)) }),
            )
            .route("/ok", get(|| async { "ok" }))
            .layer(trace_layer());
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let response = app
            .oneshot(
                http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (response.status().as_u16(), text)
    }

    fn lines_at<'a>(log: &'a str, level: &str) -> Vec<&'a str> {
        log.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(level))
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_soap11_client_fault_is_a_500_logged_at_info_not_error() {
        let (status, log) = log_of("/soap11/unknown").await;
        assert_eq!(status, 500, "SOAP 1.1 sends every fault with 500");
        let info = lines_at(&log, "INFO");
        assert_eq!(info.len(), 1, "{log}");
        assert!(info[0].contains("request refused"), "{log}");
        assert!(info[0].contains("ResourceUnknown"), "{log}");
        assert!(info[0].contains("test-code"), "{log}");
        assert!(info[0].contains("uri=/soap11/unknown"), "{log}");
        assert!(lines_at(&log, "ERROR").is_empty(), "{log}");
        assert!(lines_at(&log, "WARN").is_empty(), "{log}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_internal_fault_is_logged_at_error_once() {
        let (status, log) = log_of("/soap11/internal").await;
        assert_eq!(status, 500);
        let error = lines_at(&log, "ERROR");
        assert_eq!(error.len(), 1, "{log}");
        assert!(error[0].contains("Internal"), "{log}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_dependency_is_a_warning() {
        let (status, log) = log_of("/soap12/unavailable").await;
        assert!(status >= 500, "{status}");
        assert_eq!(lines_at(&log, "WARN").len(), 1, "{log}");
        assert!(lines_at(&log, "ERROR").is_empty(), "{log}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn json_errors_and_successes_get_their_levels() {
        let (status, log) = log_of("/json/conflict").await;
        assert_eq!(status, 409);
        assert_eq!(lines_at(&log, "INFO").len(), 1, "{log}");
        assert!(lines_at(&log, "INFO")[0].contains("Conflict"), "{log}");
        let (status, log) = log_of("/ok").await;
        assert_eq!(status, 200);
        let done: Vec<_> = lines_at(&log, "DEBUG")
            .into_iter()
            .filter(|l| l.contains("request done"))
            .collect();
        assert_eq!(done.len(), 1, "{log}");
        assert!(lines_at(&log, "INFO").is_empty(), "{log}");
    }
}
