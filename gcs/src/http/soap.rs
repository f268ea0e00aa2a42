//! The SOAP endpoint: `POST /wsrf/services/GridCheckpointService` (SOAP 1.1 and 1.2,
//! document/literal, WS-Addressing 1.0), and the WSDL/XSD files it is described by.

use std::future::Future;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use gca_protocol::fault::{Fault, FaultKind};
use gca_protocol::messages::{ListRequest, XmlContent};
use gca_protocol::ns;
use gca_protocol::ops::{self, Operation};
use gca_protocol::schemas;
use gca_protocol::soap::{self, SoapRequest, SoapVersion};
use gca_protocol::xml::Element;

use super::{ctx, read_body};
use crate::error::Error;
use crate::service::Gcs;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn xml_response(status: u16, content_type: String, body: String) -> Response {
    let status =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(http::header::CONTENT_TYPE, content_type)], body).into_response()
}

fn fault_response(version: SoapVersion, fault: &Fault, relates_to: Option<&str>) -> Response {
    let status = match fault.kind {
        FaultKind::PayloadTooLarge => 413,
        kind => version.fault_status(kind),
    };
    if fault.kind == FaultKind::Internal || !fault.kind.is_sender_fault() {
        tracing::warn!(fault.kind = ?fault.kind, fault.message = %fault.message, "SOAP fault");
    } else {
        tracing::debug!(fault.kind = ?fault.kind, fault.message = %fault.message, "SOAP fault");
    }
    xml_response(
        status,
        version.content_type(ns::FAULT_ACTION),
        soap::fault_envelope(version, fault, relates_to),
    )
}

pub async fn endpoint(State(gcs): State<Gcs>, headers: HeaderMap, body: Body) -> Response {
    let content_type = header(&headers, "content-type");
    let guessed = match content_type {
        Some(ct) if ct.contains("application/soap+xml") => SoapVersion::Soap12,
        _ => SoapVersion::Soap11,
    };
    let bytes = match read_body(&headers, body, gcs.config.max_body_bytes).await {
        Ok(b) => b,
        Err(f) => return fault_response(guessed, &f, None),
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return fault_response(
            guessed,
            &Fault::invalid("the request body is not UTF-8"),
            None,
        );
    };
    let req = match soap::parse_request(text, content_type, header(&headers, "soapaction")) {
        Ok(r) => r,
        Err(e) => return fault_response(e.version, &e.fault, None),
    };
    let ctx = ctx(&gcs, &headers);
    let relates_to = req.addressing.message_id.clone();
    match dispatch(&gcs, &ctx, &req).await {
        Ok((action, element)) => xml_response(
            200,
            req.version.content_type(&action),
            soap::response_envelope(req.version, &action, relates_to.as_deref(), element),
        ),
        Err(f) => fault_response(req.version, &f, relates_to.as_deref()),
    }
}

/// Checks the action, reads the request element, runs the operation, builds the response
/// element.
async fn call<O, F, Fut>(req: &SoapRequest, f: F) -> Result<(String, Element), Fault>
where
    O: Operation,
    F: FnOnce(O::Request) -> Fut,
    Fut: Future<Output = Result<O::Response, Error>>,
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
    let response = f(request).await.map_err(Error::into_fault)?;
    Ok((
        O::response_action(),
        response.to_element(&O::response_element()),
    ))
}

async fn dispatch(
    gcs: &Gcs,
    ctx: &crate::service::Ctx,
    req: &SoapRequest,
) -> Result<(String, Element), Fault> {
    use ops::*;
    if req.body.ns.as_deref() != Some(ns::GCA) {
        return Err(unsupported(req));
    }
    match req.body.name.as_str() {
        "DoCheckpoint" => call::<DoCheckpointOp, _, _>(req, |r| gcs.do_checkpoint(r)).await,
        "FindCTS" => call::<FindCtsOp, _, _>(req, |r| gcs.find_cts(r)).await,
        "GetCheckpoints" => call::<GetCheckpointsOp, _, _>(req, |r| gcs.get_checkpoints(r)).await,
        "GetRecoveryInfo" => {
            call::<GetRecoveryInfoOp, _, _>(req, |r| gcs.get_recovery_info(r, ctx)).await
        }
        "GetJob" => call::<GetJobOp, _, _>(req, |r| gcs.get_job(r)).await,
        "ListJobs" => call::<ListJobsOp, _, _>(req, |r| gcs.list_jobs(r)).await,
        "RegisterCheckpointerClass" => {
            call::<RegisterClassOp, _, _>(req, |r| gcs.register_class(r)).await
        }
        "RegisterCTSDescriptor" => {
            call::<RegisterDescriptorOp, _, _>(req, |r| gcs.register_descriptor(r)).await
        }
        "UnregisterCTS" => call::<UnregisterCtsOp, _, _>(req, |r| gcs.unregister_cts(r)).await,
        "ListCheckpointerClasses" => {
            call::<ListClassesOp, _, _>(req, |_: ListRequest| gcs.list_classes()).await
        }
        "ListCTSTypes" => {
            call::<ListCtsTypesOp, _, _>(req, |_: ListRequest| gcs.list_types()).await
        }
        "ListCTSInstances" => {
            call::<ListCtsInstancesOp, _, _>(req, |_: ListRequest| gcs.list_instances()).await
        }
        "RegisterCTSInstance" => {
            call::<RegisterCtsInstanceOp, _, _>(req, |r| gcs.register_instance(r)).await
        }
        "RegisterJob" => call::<RegisterJobOp, _, _>(req, |r| gcs.register_job(r)).await,
        "RegisterCheckpoint" => {
            call::<RegisterCheckpointOp, _, _>(req, |r| gcs.register_checkpoint(r)).await
        }
        "JobFinished" => call::<JobFinishedOp, _, _>(req, |r| gcs.job_finished(r)).await,
        _ => Err(unsupported(req)),
    }
}

fn unsupported(req: &SoapRequest) -> Fault {
    Fault::new(
        FaultKind::ActionNotSupported,
        format!(
            "the Grid Checkpoint Service has no operation for <{}> (action {:?}); its operations are {} in namespace {}; see ?wsdl",
            req.body.qname(),
            req.addressing.action.as_deref().unwrap_or(""),
            ops::GCS_OPERATIONS.join(", "),
            ns::GCA
        ),
    )
    .with_code("unknown-operation")
}

/// `GET ...GridCheckpointService?wsdl`
pub async fn wsdl(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match query.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("wsdl") => {
            let base = ctx(&gcs, &headers).gcs_url;
            xml_response(
                200,
                "text/xml; charset=utf-8".into(),
                schemas::rewrite(schemas::file("gcs.wsdl").unwrap_or_default(), &base),
            )
        }
        _ => (
            http::StatusCode::METHOD_NOT_ALLOWED,
            [(http::header::ALLOW, "POST")],
            "This is the SOAP endpoint of the Grid Checkpoint Service: POST SOAP 1.1 or 1.2 requests here. The WSDL is at ?wsdl.\n",
        )
            .into_response(),
    }
}

/// `GET /wsrf/schemas/{file}`
pub async fn schema(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Response {
    match schemas::file(&file) {
        Some(text) => {
            let base = ctx(&gcs, &headers).gcs_url;
            xml_response(
                200,
                "text/xml; charset=utf-8".into(),
                schemas::rewrite(text, &base),
            )
        }
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
