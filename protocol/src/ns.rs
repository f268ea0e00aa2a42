//! Namespace URIs and WS-Addressing action URIs used on the wire.

pub const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
pub const SOAP12: &str = "http://www.w3.org/2003/05/soap-envelope";
/// WS-Addressing 1.0, what we emit.
pub const WSA: &str = "http://www.w3.org/2005/08/addressing";
/// The 2004/08 member submission, tolerated on input.
pub const WSA_2004: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
pub const WSA_ANONYMOUS: &str = "http://www.w3.org/2005/08/addressing/anonymous";
pub const WSRF_BF: &str = "http://docs.oasis-open.org/wsrf/bf-2";
pub const WSRF_R: &str = "http://docs.oasis-open.org/wsrf/r-2";
pub const WSRF_RP: &str = "http://docs.oasis-open.org/wsrf/rp-2";
pub const WSRF_RL: &str = "http://docs.oasis-open.org/wsrf/rl-2";
pub const WSRF_SG: &str = "http://docs.oasis-open.org/wsrf/sg-2";
pub const WSNT: &str = "http://docs.oasis-open.org/wsn/b-2";
pub const WSTOP: &str = "http://docs.oasis-open.org/wsn/t-1";
pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Our own namespace: GCS and CTS messages, the CTS descriptor, GCA faults.
pub const GCA: &str = "urn:gca:v1";

/// The WS-Addressing action for every WSRF/GCA fault.
pub const FAULT_ACTION: &str = "http://docs.oasis-open.org/wsrf/fault";
/// Variant seen in Globus Crux WSDLs; accepted, never emitted.
pub const FAULT_ACTION_PLURAL: &str = "http://docs.oasis-open.org/wsrf/faults";

/// Port type names, used in the default action pattern `{GCA}/{PortType}/{Op}Request`.
pub const GCS_PORT_TYPE: &str = "GridCheckpointService";
pub const CTS_PORT_TYPE: &str = "CheckpointTranslationService";

/// `urn:gca:v1/{port_type}/{op}Request`
pub fn request_action(port_type: &str, op: &str) -> String {
    format!("{GCA}/{port_type}/{op}Request")
}

/// `urn:gca:v1/{port_type}/{op}Response`
pub fn response_action(port_type: &str, op: &str) -> String {
    format!("{GCA}/{port_type}/{op}Response")
}

/// Where each service's SOAP endpoint lives, under its root URL.
pub const GCS_SERVICE_PATH: &str = "/wsrf/services/GridCheckpointService";
pub const CTS_SERVICE_PATH: &str = "/wsrf/services/CheckpointTranslationService";
