//! SOAP 1.1 / 1.2 envelopes with WS-Addressing 1.0 headers, for servers and clients.
//!
//! Servers: [`parse_request`] reads any envelope a real client sends (SOAP 1.1 or 1.2, WS-A 1.0
//! or 2004/08, action from `wsa:Action`, the `SOAPAction` header or the SOAP 1.2 content type)
//! and [`response_envelope`] / [`fault_envelope`] write the answer. Clients: [`request_envelope`]
//! and [`parse_response`].

use chrono::Utc;

use crate::fault::{Fault, FaultKind};
use crate::ns;
use crate::xml::{self, Element};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoapVersion {
    Soap11,
    Soap12,
}

impl SoapVersion {
    pub fn envelope_ns(self) -> &'static str {
        match self {
            SoapVersion::Soap11 => ns::SOAP11,
            SoapVersion::Soap12 => ns::SOAP12,
        }
    }

    /// The Content-Type of a message; SOAP 1.2 carries the action in it.
    pub fn content_type(self, action: &str) -> String {
        match self {
            SoapVersion::Soap11 => "text/xml; charset=utf-8".to_string(),
            SoapVersion::Soap12 => {
                format!("application/soap+xml; charset=utf-8; action=\"{action}\"")
            }
        }
    }

    /// HTTP status of a fault response (SOAP 1.1 §6.2: always 500; SOAP 1.2: 400 for Sender).
    pub fn fault_status(self, kind: FaultKind) -> u16 {
        match self {
            SoapVersion::Soap11 => 500,
            SoapVersion::Soap12 if kind.is_sender_fault() => 400,
            SoapVersion::Soap12 => 500,
        }
    }
}

/// The WS-Addressing message information headers of a request.
#[derive(Debug, Clone, Default)]
pub struct Addressing {
    pub action: Option<String>,
    pub message_id: Option<String>,
    pub to: Option<String>,
    pub reply_to: Option<String>,
    /// Headers marked `wsa:IsReferenceParameter="true"` (and, for 2004/08 clients, every
    /// header outside the WS-A namespaces): the resource identity of the implied resource
    /// pattern.
    pub reference_parameters: Vec<Element>,
}

#[derive(Debug, Clone)]
pub struct SoapRequest {
    pub version: SoapVersion,
    pub addressing: Addressing,
    /// The single child of `Body`.
    pub body: Element,
}

/// An error reading a request, with the SOAP version to answer in (1.1 when unknown).
#[derive(Debug, Clone)]
pub struct SoapReadError {
    pub version: SoapVersion,
    pub fault: Fault,
}

fn read_err(version: SoapVersion, message: impl Into<String>) -> SoapReadError {
    SoapReadError {
        version,
        fault: Fault::invalid(message),
    }
}

/// Strips quotes and whitespace from a SOAPAction header value; `""` means "no action".
pub fn soap_action_header_value(raw: &str) -> Option<String> {
    let v = raw.trim().trim_matches('"').trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// The `action` parameter of a SOAP 1.2 content type.
pub fn content_type_action(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("action"))
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    })
}

/// Parses a request envelope.
///
/// `content_type` and `soap_action` are the HTTP headers, used to tell the version apart when
/// the envelope is unreadable and as fallbacks for the action.
pub fn parse_request(
    body: &str,
    content_type: Option<&str>,
    soap_action: Option<&str>,
) -> Result<SoapRequest, SoapReadError> {
    let guessed = match content_type {
        Some(ct) if ct.to_ascii_lowercase().contains("application/soap+xml") => SoapVersion::Soap12,
        _ => SoapVersion::Soap11,
    };
    let root = xml::parse(body)
        .map_err(|e| read_err(guessed, format!("the request is not well-formed XML: {e}")))?;
    let version = match root.ns.as_deref() {
        Some(ns::SOAP11) if root.name == "Envelope" => SoapVersion::Soap11,
        Some(ns::SOAP12) if root.name == "Envelope" => SoapVersion::Soap12,
        _ if root.name == "Envelope" => {
            return Err(SoapReadError {
                version: guessed,
                fault: Fault::invalid(format!(
                    "VersionMismatch: unknown SOAP envelope namespace {:?}; send SOAP 1.1 ({}) or SOAP 1.2 ({})",
                    root.ns.as_deref().unwrap_or(""),
                    ns::SOAP11,
                    ns::SOAP12
                ))
                .with_code("version-mismatch"),
            })
        }
        _ => {
            return Err(read_err(
                guessed,
                format!(
                    "line {}: expected a SOAP Envelope, found <{}>",
                    root.line,
                    root.qname()
                ),
            ))
        }
    };
    let env_ns = version.envelope_ns();
    let mut addressing = Addressing::default();
    if let Some(header) = root.child(env_ns, "Header") {
        for h in header.elements() {
            let h_ns = h.ns.as_deref().unwrap_or("");
            if h_ns == ns::WSA || h_ns == ns::WSA_2004 {
                let value = || h.text().trim().to_string();
                match h.name.as_str() {
                    "Action" => addressing.action = Some(value()),
                    "MessageID" => addressing.message_id = Some(value()),
                    "To" => addressing.to = Some(value()),
                    "ReplyTo" => addressing.reply_to = h.opt_text(h_ns, "Address"),
                    _ => {}
                }
                continue;
            }
            let is_ref_param = h
                .attr(ns::WSA, "IsReferenceParameter")
                .and_then(xml::parse_xsd_bool)
                .unwrap_or(false);
            let must_understand = h
                .attr(env_ns, "mustUnderstand")
                .and_then(xml::parse_xsd_bool)
                .unwrap_or(false);
            if must_understand && !is_ref_param {
                return Err(SoapReadError {
                    version,
                    fault: Fault::invalid(format!(
                        "MustUnderstand: header <{}> is marked mustUnderstand but this service does not process it",
                        h.qname()
                    ))
                    .with_code("must-understand"),
                });
            }
            addressing.reference_parameters.push(h.clone());
        }
    }
    let body_el = root
        .child(env_ns, "Body")
        .ok_or_else(|| read_err(version, "the SOAP Envelope has no Body"))?;
    let mut payload = body_el.elements();
    let first = payload
        .next()
        .ok_or_else(|| {
            read_err(
                version,
                format!("line {}: the SOAP Body is empty", body_el.line),
            )
        })?
        .clone();
    if let Some(extra) = payload.next() {
        return Err(read_err(
            version,
            format!(
                "line {}: the SOAP Body must hold exactly one element (document/literal); found a second one, <{}>",
                extra.line,
                extra.qname()
            ),
        ));
    }
    let header_action = soap_action
        .and_then(soap_action_header_value)
        .or_else(|| content_type.and_then(content_type_action));
    match (&addressing.action, header_action) {
        (Some(wsa), Some(http)) if *wsa != http => {
            return Err(SoapReadError {
                version,
                fault: Fault::invalid(format!(
                    "ActionMismatch: wsa:Action {wsa:?} differs from the HTTP action {http:?}"
                ))
                .with_code("action-mismatch"),
            })
        }
        (None, Some(http)) => addressing.action = Some(http),
        _ => {}
    }
    Ok(SoapRequest {
        version,
        addressing,
        body: first,
    })
}

fn envelope(version: SoapVersion, headers: Vec<Element>, body: Element) -> String {
    let env_ns = version.envelope_ns();
    Element::new(env_ns, "Envelope")
        .with_child(Element::new(env_ns, "Header").with_children(headers))
        .with_child(Element::new(env_ns, "Body").with_child(body))
        .to_document()
}

fn new_message_id() -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v4())
}

/// A response envelope: `wsa:Action`, a new `wsa:MessageID`, `wsa:RelatesTo` the request's.
pub fn response_envelope(
    version: SoapVersion,
    action: &str,
    relates_to: Option<&str>,
    body: Element,
) -> String {
    let mut headers = vec![
        Element::new(ns::WSA, "Action").with_text(action),
        Element::new(ns::WSA, "MessageID").with_text(new_message_id()),
    ];
    if let Some(r) = relates_to {
        headers.push(Element::new(ns::WSA, "RelatesTo").with_text(r));
    }
    envelope(version, headers, body)
}

/// A fault envelope carrying the fault's WS-BaseFaults element as detail.
pub fn fault_envelope(version: SoapVersion, fault: &Fault, relates_to: Option<&str>) -> String {
    let mut headers = vec![
        Element::new(ns::WSA, "Action").with_text(ns::FAULT_ACTION),
        Element::new(ns::WSA, "MessageID").with_text(new_message_id()),
    ];
    if let Some(r) = relates_to {
        headers.push(Element::new(ns::WSA, "RelatesTo").with_text(r));
    }
    let detail = fault.to_base_fault();
    let body = match version {
        SoapVersion::Soap11 => {
            let code = if fault.kind.is_sender_fault() {
                "s:Client"
            } else {
                "s:Server"
            };
            Element::new(ns::SOAP11, "Fault")
                .with_text_child("", "faultcode", code)
                .with_text_child("", "faultstring", fault.message.clone())
                .with_child(Element::new("", "detail").with_child(detail))
        }
        SoapVersion::Soap12 => {
            let code = if fault.kind.is_sender_fault() {
                "env:Sender"
            } else {
                "env:Receiver"
            };
            Element::new(ns::SOAP12, "Fault")
                .with_child(Element::new(ns::SOAP12, "Code").with_text_child(
                    ns::SOAP12,
                    "Value",
                    code,
                ))
                .with_child(
                    Element::new(ns::SOAP12, "Reason").with_child(
                        Element::new(ns::SOAP12, "Text")
                            .with_attr(xml::XML_NS, "lang", "en")
                            .with_text(fault.message.clone()),
                    ),
                )
                .with_child(Element::new(ns::SOAP12, "Detail").with_child(detail))
        }
    };
    envelope(version, headers, body)
}

/// A request envelope for a client: returns the XML and the message ID it carries.
pub fn request_envelope(
    version: SoapVersion,
    action: &str,
    to: &str,
    reference_parameters: &[Element],
    body: Element,
) -> (String, String) {
    let message_id = new_message_id();
    let mut headers = vec![
        Element::new(ns::WSA, "Action").with_text(action),
        Element::new(ns::WSA, "MessageID").with_text(message_id.clone()),
        Element::new(ns::WSA, "To").with_text(to),
    ];
    for p in reference_parameters {
        headers.push(p.clone().with_attr(ns::WSA, "IsReferenceParameter", "true"));
    }
    (envelope(version, headers, body), message_id)
}

/// Reads a response envelope: the body's payload element, or the fault it carries.
pub fn parse_response(text: &str) -> Result<Element, Fault> {
    let root = xml::parse_with(text, &xml::Limits::response()).map_err(|e| {
        Fault::new(
            FaultKind::OperationFailed,
            format!("the peer answered with malformed XML: {e}"),
        )
    })?;
    let env_ns = match root.ns.as_deref() {
        Some(ns::SOAP11) => ns::SOAP11,
        Some(ns::SOAP12) => ns::SOAP12,
        _ => {
            return Err(Fault::new(
                FaultKind::OperationFailed,
                format!(
                    "the peer answered with <{}>, not a SOAP envelope",
                    root.qname()
                ),
            ))
        }
    };
    let body = root.child(env_ns, "Body").ok_or_else(|| {
        Fault::new(
            FaultKind::OperationFailed,
            "the peer's SOAP envelope has no Body",
        )
    })?;
    let payload = body
        .elements()
        .next()
        .ok_or_else(|| Fault::new(FaultKind::OperationFailed, "the peer's SOAP Body is empty"))?;
    if payload.is(env_ns, "Fault") {
        let (message, detail) = if env_ns == ns::SOAP11 {
            (
                payload.opt_text("", "faultstring").unwrap_or_default(),
                payload.child("", "detail"),
            )
        } else {
            (
                payload
                    .child(ns::SOAP12, "Reason")
                    .and_then(|r| r.opt_text(ns::SOAP12, "Text"))
                    .unwrap_or_default(),
                payload.child(ns::SOAP12, "Detail"),
            )
        };
        return Err(match detail.and_then(|d| d.elements().next()) {
            Some(base) => Fault::from_base_fault(base, &message),
            None => Fault {
                kind: FaultKind::OperationFailed,
                message,
                code: None,
                timestamp: Utc::now(),
                extra: Vec::new(),
            },
        });
    }
    Ok(payload.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env11(headers: &str, body: &str) -> String {
        format!(
            "<s:Envelope xmlns:s=\"{}\" xmlns:wsa=\"{}\" xmlns:g=\"urn:gca:v1\"><s:Header>{headers}</s:Header><s:Body>{body}</s:Body></s:Envelope>",
            ns::SOAP11,
            ns::WSA
        )
    }

    #[test]
    fn reads_soap11_with_addressing_and_reference_parameters() {
        let text = env11(
            "<wsa:Action>\n urn:x/Op \n</wsa:Action><wsa:MessageID>urn:uuid:1</wsa:MessageID><g:ResourceID wsa:IsReferenceParameter=\"true\">job-1</g:ResourceID>",
            "<g:Op><g:GID>j</g:GID></g:Op>",
        );
        let req = parse_request(&text, Some("text/xml"), Some("\"urn:x/Op\"")).unwrap();
        assert_eq!(req.version, SoapVersion::Soap11);
        assert_eq!(req.addressing.action.as_deref(), Some("urn:x/Op"));
        assert_eq!(req.addressing.message_id.as_deref(), Some("urn:uuid:1"));
        assert_eq!(req.addressing.reference_parameters.len(), 1);
        assert!(req.body.is(ns::GCA, "Op"));
    }

    #[test]
    fn takes_the_action_from_http_when_wsa_is_absent_and_refuses_mismatch() {
        let text = env11("", "<g:Op/>");
        let req = parse_request(&text, None, Some("\"urn:x/Op\"")).unwrap();
        assert_eq!(req.addressing.action.as_deref(), Some("urn:x/Op"));
        let text12 = format!(
            "<e:Envelope xmlns:e=\"{}\"><e:Body><Op/></e:Body></e:Envelope>",
            ns::SOAP12
        );
        let req = parse_request(
            &text12,
            Some("application/soap+xml; charset=utf-8; action=\"urn:y\""),
            None,
        )
        .unwrap();
        assert_eq!(req.version, SoapVersion::Soap12);
        assert_eq!(req.addressing.action.as_deref(), Some("urn:y"));
        let text = env11("<wsa:Action>urn:a</wsa:Action>", "<g:Op/>");
        let err = parse_request(&text, None, Some("urn:b")).unwrap_err();
        assert_eq!(err.fault.code.as_deref(), Some("action-mismatch"));
    }

    #[test]
    fn refuses_bad_envelopes_clearly() {
        assert!(parse_request("<nope/>", None, None)
            .unwrap_err()
            .fault
            .message
            .contains("expected a SOAP Envelope"));
        let e = parse_request(&env11("", ""), None, None).unwrap_err();
        assert!(e.fault.message.contains("Body is empty"));
        let e = parse_request(&env11("", "<g:A/><g:B/>"), None, None).unwrap_err();
        assert!(e.fault.message.contains("exactly one element"));
        let e = parse_request(
            &env11("<g:Secret s:mustUnderstand=\"1\">x</g:Secret>", "<g:A/>"),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.fault.code.as_deref(), Some("must-understand"));
        let e = parse_request(
            "<s:Envelope xmlns:s=\"urn:wrong\"><s:Body/></s:Envelope>",
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(e.fault.code.as_deref(), Some("version-mismatch"));
    }

    #[test]
    fn faults_round_trip_in_both_versions() {
        for v in [SoapVersion::Soap11, SoapVersion::Soap12] {
            let f = Fault::resource_unknown("no job with GID x").with_code("unknown-gid");
            let text = fault_envelope(v, &f, Some("urn:uuid:1"));
            let back = parse_response(&text).unwrap_err();
            assert_eq!(back.kind, FaultKind::ResourceUnknown);
            assert_eq!(back.message, "no job with GID x");
            assert_eq!(back.code.as_deref(), Some("unknown-gid"));
        }
    }

    #[test]
    fn request_and_response_round_trip() {
        let (text, id) = request_envelope(
            SoapVersion::Soap12,
            "urn:x/Op",
            "http://h/x",
            &[Element::new(ns::GCA, "ResourceID").with_text("r1")],
            Element::new(ns::GCA, "Op"),
        );
        let req = parse_request(
            &text,
            Some(&SoapVersion::Soap12.content_type("urn:x/Op")),
            None,
        )
        .unwrap();
        assert_eq!(req.addressing.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(req.addressing.reference_parameters[0].text(), "r1");
        let resp = response_envelope(
            req.version,
            "urn:x/OpResponse",
            Some(&id),
            Element::new(ns::GCA, "OpResponse"),
        );
        assert!(parse_response(&resp).unwrap().is(ns::GCA, "OpResponse"));
    }
}
