//! The SOAP endpoint: `POST /wsrf/services/GridCheckpointService` (SOAP 1.1 and 1.2,
//! document/literal, WS-Addressing 1.0), and the WSDL/XSD files it is described by.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use gca_protocol::fault::Fault;
use gca_protocol::messages::ListRequest;
use gca_protocol::ns;
use gca_protocol::ops;
use gca_protocol::server;
use gca_protocol::soap::SoapRequest;
use gca_protocol::wsrf::{self, ResourceRef};
use gca_protocol::xml::Element;

use super::ctx;
use crate::service::Gcs;
use gca_protocol::identity::Caller;

/// `POST /wsrf/services/GridCheckpointService[?gid=...]`: the GCS resource, or the resource
/// named by a reference parameter header or the query.
pub async fn endpoint(
    State(gcs): State<Gcs>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    serve(gcs, caller, headers, None, query, body).await
}

/// `POST /wsrf/services/GridCheckpointService/{kind}/{id}`: a job, checkpoint or CTS instance
/// resource by its address (for clients that cannot echo reference parameters).
pub async fn resource_endpoint(
    State(gcs): State<Gcs>,
    caller: Caller,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    body: Body,
) -> Response {
    serve(gcs, caller, headers, Some((kind, id)), None, body).await
}

/// `GET` on a resource address.
pub async fn resource_get() -> Response {
    (
        http::StatusCode::METHOD_NOT_ALLOWED,
        [(http::header::ALLOW, "POST")],
        "This is the address of a WS-Resource of the Grid Checkpoint Service: POST SOAP 1.1 or 1.2 WS-ResourceProperties / WS-ResourceLifetime requests here. The WSDL is at /wsrf/services/GridCheckpointService?wsdl.\n",
    )
        .into_response()
}

async fn serve(
    gcs: Gcs,
    caller: Caller,
    headers: HeaderMap,
    path: Option<(String, String)>,
    query: Option<String>,
    body: Body,
) -> Response {
    let ctx = ctx(&gcs, &headers, caller);
    server::soap_endpoint(
        &headers,
        body,
        gcs.config.max_body_bytes,
        |req| async move {
            let resource = ResourceRef::from_request(
                &req.addressing,
                path.as_ref().map(|(k, i)| (k.as_str(), i.as_str())),
                query.as_deref(),
            )?;
            let service_address = format!("{}{}", ctx.gcs_url, ns::GCS_SERVICE_PATH);
            let (action, mut element) =
                dispatch(&gcs, &ctx, &resource, &service_address, &req).await?;
            wsrf::add_eprs(&mut element, &service_address);
            Ok((action, element))
        },
    )
    .await
}

async fn dispatch(
    gcs: &Gcs,
    ctx: &crate::service::Ctx,
    resource: &ResourceRef,
    service_address: &str,
    req: &SoapRequest,
) -> Result<(String, Element), Fault> {
    use ops::*;
    use server::soap_call as call;
    let action = req.addressing.action.as_deref();
    match req.body.ns.as_deref() {
        Some(ns::WSRF_RP) => {
            return Ok(gcs
                .resource_properties(ctx, resource, service_address, &req.body, action)
                .await?)
        }
        Some(ns::WSRF_RL) => {
            return Ok(gcs
                .resource_lifetime(ctx, resource, &req.body, action)
                .await?)
        }
        Some(ns::WSNT) => {
            return Ok(gcs
                .notification(ctx, resource, service_address, &req.body, action)
                .await?)
        }
        Some(ns::GCA) => {}
        _ => return Err(unsupported(req)),
    }
    // Refused before the request is even read.
    if let Some(op) = crate::policy::Op::of_gca_element(&req.body.name) {
        crate::policy::authorize(&ctx.caller, op)?;
    }
    match req.body.name.as_str() {
        "DoCheckpoint" => call::<DoCheckpointOp, _, _, _>(req, |r| gcs.do_checkpoint(ctx, r)).await,
        "FindCTS" => call::<FindCtsOp, _, _, _>(req, |r| gcs.find_cts(ctx, r)).await,
        "GetCheckpoints" => {
            call::<GetCheckpointsOp, _, _, _>(req, |r| gcs.get_checkpoints(ctx, r)).await
        }
        "GetRecoveryInfo" => {
            call::<GetRecoveryInfoOp, _, _, _>(req, |r| gcs.get_recovery_info(ctx, r)).await
        }
        "AuthorizeRecovery" => {
            call::<AuthorizeRecoveryOp, _, _, _>(req, |r| gcs.authorize_recovery(ctx, r)).await
        }
        "GetJob" => call::<GetJobOp, _, _, _>(req, |r| gcs.get_job(ctx, r)).await,
        "ListJobs" => call::<ListJobsOp, _, _, _>(req, |r| gcs.list_jobs(ctx, r)).await,
        "SetRetention" => call::<SetRetentionOp, _, _, _>(req, |r| gcs.set_retention(ctx, r)).await,
        "RegisterCheckpointerClass" => {
            call::<RegisterClassOp, _, _, _>(req, |r| gcs.register_class(ctx, r)).await
        }
        "RegisterCTSDescriptor" => {
            call::<RegisterDescriptorOp, _, _, _>(req, |r| gcs.register_descriptor(ctx, r)).await
        }
        "UnregisterCTS" => {
            call::<UnregisterCtsOp, _, _, _>(req, |r| gcs.unregister_cts(ctx, r)).await
        }
        "ListCheckpointerClasses" => {
            call::<ListClassesOp, _, _, _>(req, |_: ListRequest| gcs.list_classes(ctx)).await
        }
        "ListCTSTypes" => {
            call::<ListCtsTypesOp, _, _, _>(req, |_: ListRequest| gcs.list_types(ctx)).await
        }
        "ListCTSInstances" => {
            call::<ListCtsInstancesOp, _, _, _>(req, |_: ListRequest| gcs.list_instances(ctx)).await
        }
        "RegisterCTSInstance" => {
            call::<RegisterCtsInstanceOp, _, _, _>(req, |r| gcs.register_instance(ctx, r)).await
        }
        "RegisterJob" => call::<RegisterJobOp, _, _, _>(req, |r| gcs.register_job(ctx, r)).await,
        "RegisterCheckpoint" => {
            call::<RegisterCheckpointOp, _, _, _>(req, |r| gcs.register_checkpoint(ctx, r)).await
        }
        "JobFinished" => call::<JobFinishedOp, _, _, _>(req, |r| gcs.job_finished(ctx, r)).await,
        "AbandonRecovery" => {
            call::<AbandonRecoveryOp, _, _, _>(req, |r| gcs.abandon_recovery(ctx, r)).await
        }
        "GetJobKey" => call::<GetJobKeyOp, _, _, _>(req, |r| gcs.get_job_key(ctx, r)).await,
        "SetImageLocation" => {
            call::<SetImageLocationOp, _, _, _>(req, |r| gcs.set_image_location(ctx, r)).await
        }
        _ => Err(unsupported(req)),
    }
}

fn unsupported(req: &SoapRequest) -> Fault {
    server::unsupported("Grid Checkpoint Service", ops::GCS_OPERATIONS, req)
}

/// `GET ...GridCheckpointService?wsdl`
pub async fn wsdl(
    State(gcs): State<Gcs>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match query.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("wsdl") => {
            server::schema_response("gcs.wsdl", &ctx(&gcs, &headers, Caller::Anonymous).gcs_url)
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
    server::schema_response(&file, &ctx(&gcs, &headers, Caller::Anonymous).gcs_url)
}
