//! The server side of both wire forms, shared by every GCA service: bounded body reading,
//! the SOAP endpoint skeleton (parse, check the action, dispatch, answer or fault) and JSON
//! errors. A service supplies only its dispatch table.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::fault::{ErrorBody, Fault, FaultKind};
use crate::messages::XmlContent;
use crate::ns;
use crate::ops::Operation;
use crate::request_log::FaultOutcome;
use crate::schemas;
use crate::soap::{self, SoapRequest, SoapVersion};
use crate::xml::Element;

/// Reads a request body up to `limit` bytes; larger bodies (declared or chunked) are a
/// `PayloadTooLarge` fault.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Fault> {
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

pub fn xml_response(status: u16, content_type: String, body: String) -> Response {
    let status =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(http::header::CONTENT_TYPE, content_type)], body).into_response()
}

pub fn fault_response(version: SoapVersion, fault: &Fault, relates_to: Option<&str>) -> Response {
    let status = match fault.kind {
        FaultKind::PayloadTooLarge => 413,
        kind => version.fault_status(kind),
    };
    with_outcome(
        xml_response(
            status,
            version.content_type(ns::FAULT_ACTION),
            soap::fault_envelope(version, fault, relates_to),
        ),
        fault,
    )
}

/// Marks a response as carrying `fault`, for the request log ([`trace_layer`]): SOAP 1.1 sends
/// every fault with status 500, so the status alone cannot tell a refused request from a
/// server failure.
fn with_outcome(mut response: Response, fault: &Fault) -> Response {
    response.extensions_mut().insert(FaultOutcome::of(fault));
    response
}

/// `GET /wsrf/schemas/{file}` (and `GET {service}?wsdl`): an embedded schema or WSDL file with
/// `base` as the service's root URL (its imports point at the copies served there), or 404
/// naming the files there are.
pub fn schema_response(file: &str, base: &str) -> Response {
    match schemas::file(file) {
        Some(text) => xml_response(
            200,
            "text/xml; charset=utf-8".into(),
            schemas::rewrite(text, base),
        ),
        None => (
            http::StatusCode::NOT_FOUND,
            format!(
                "no schema named {file:?}; available: {}\n",
                schemas::FILES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
            .into_response(),
    }
}

/// The root URL a request reached us at (`{scheme}://{Host}`), when its Host header is usable.
pub fn request_base(headers: &HeaderMap, tls: bool) -> Option<String> {
    let host = header(headers, http::header::HOST.as_str())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))?;
    let scheme = if tls { "https" } else { "http" };
    Some(format!("{scheme}://{host}"))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A SOAP endpoint: reads at most `limit` bytes, parses the envelope (SOAP 1.1 or 1.2,
/// WS-Addressing), hands the request to `dispatch` and answers with its response element or
/// its fault, in the request's SOAP version.
pub async fn soap_endpoint<F, Fut>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    dispatch: F,
) -> Response
where
    F: FnOnce(SoapRequest) -> Fut,
    Fut: Future<Output = Result<(String, Element), Fault>>,
{
    let content_type = header(headers, "content-type");
    let guessed = match content_type {
        Some(ct) if ct.contains("application/soap+xml") => SoapVersion::Soap12,
        _ => SoapVersion::Soap11,
    };
    let bytes = match read_body(headers, body, limit).await {
        Ok(b) => b,
        Err(f) => return fault_response(guessed, &f, None),
    };
    let req = match parse_body(bytes, guessed, content_type, header(headers, "soapaction")).await {
        Ok(r) => r,
        Err(e) => return fault_response(e.version, &e.fault, None),
    };
    let version = req.version;
    let relates_to = req.addressing.message_id.clone();
    match dispatch(req).await {
        Ok((action, element)) => xml_response(
            200,
            version.content_type(&action),
            soap::response_envelope(version, &action, relates_to.as_deref(), element),
        ),
        Err(f) => fault_response(version, &f, relates_to.as_deref()),
    }
}

/// Bodies up to this size are parsed on the async worker; larger ones on a blocking thread,
/// so that a few large requests cannot hold up every connection of the service.
pub const PARSE_INLINE_BYTES: usize = 16 * 1024;

async fn parse_body(
    bytes: Bytes,
    guessed: SoapVersion,
    content_type: Option<&str>,
    soap_action: Option<&str>,
) -> Result<SoapRequest, soap::SoapReadError> {
    let parse = move |bytes: &[u8], ct: Option<&str>, sa: Option<&str>| {
        let text = std::str::from_utf8(bytes).map_err(|_| soap::SoapReadError {
            version: guessed,
            fault: Fault::invalid("the request body is not UTF-8"),
        })?;
        soap::parse_request(text, ct, sa)
    };
    if bytes.len() <= PARSE_INLINE_BYTES {
        return parse(&bytes, content_type, soap_action);
    }
    let (ct, sa) = (
        content_type.map(str::to_string),
        soap_action.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || parse(&bytes, ct.as_deref(), sa.as_deref()))
        .await
        .unwrap_or_else(|e| {
            Err(soap::SoapReadError {
                version: guessed,
                fault: Fault::new(
                    FaultKind::Internal,
                    format!("parsing the request failed: {e}"),
                ),
            })
        })
}

/// One operation of a dispatch table: checks the action against the body, reads the request,
/// runs `f`, builds the response element.
pub async fn soap_call<O, E, F, Fut>(req: &SoapRequest, f: F) -> Result<(String, Element), Fault>
where
    O: Operation,
    E: Into<Fault>,
    F: FnOnce(O::Request) -> Fut,
    Fut: Future<Output = Result<O::Response, E>>,
{
    let expected = O::request_action();
    if let Some(action) = &req.addressing.action {
        if *action != expected {
            return Err(Fault::new(
                FaultKind::ActionNotSupported,
                format!(
                    "action {action:?} does not match the body element <{}>; expected {expected:?}",
                    O::NAME
                ),
            )
            .with_code("action-mismatch"));
        }
    }
    let request = O::Request::read_children(&req.body)
        .map_err(|e| Fault::invalid(format!("invalid <{}> request: {e}", O::NAME)))?;
    let response = f(request).await.map_err(Into::into)?;
    Ok((
        O::response_action(),
        response.to_element(&O::response_element()),
    ))
}

/// The fault for a body element no operation of `service` handles.
pub fn unsupported(service: &str, operations: &[&str], req: &SoapRequest) -> Fault {
    Fault::new(
        FaultKind::ActionNotSupported,
        format!(
            "the {service} has no operation for <{}> (action {:?}); its operations are {} in namespace {}; see ?wsdl",
            req.body.qname(),
            req.addressing.action.as_deref().unwrap_or(""),
            operations.join(", "),
            ns::GCA
        ),
    )
    .with_code("unknown-operation")
}

/// A fault as a JSON response (`{"error": {...}}` with the fault's HTTP status).
#[derive(Debug)]
pub struct ApiError(pub Fault);

impl From<Fault> for ApiError {
    fn from(f: Fault) -> Self {
        ApiError(f)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http::StatusCode::from_u16(self.0.http_status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let outcome = FaultOutcome::of(&self.0);
        let mut response = (status, Json(ErrorBody { error: self.0 })).into_response();
        response.extensions_mut().insert(outcome);
        response
    }
}
