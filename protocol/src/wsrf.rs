//! WSRF building blocks shared by every service: endpoint references, the resource a request
//! is addressed to (implied resource pattern), WS-ResourceProperties requests (lenient QName
//! resolution, XPath 1.0 queries) and WS-ResourceLifetime requests.
//!
//! The EPR scheme (ARCHITECTURE.md, "Endpoint references"): every WS-Resource of a service
//! has the service's address plus `/{kind}/{id}` (percent-encoded), and one reference
//! parameter `<gca:ResourceID Kind="{kind}">{id}</gca:ResourceID>`. Clients that echo
//! reference parameters as headers are served by the header; clients that cannot (zeep, suds)
//! post to the address. The service resource itself has the plain service address and no
//! reference parameter.

use chrono::{DateTime, Duration, Utc};

use crate::fault::{Fault, FaultKind};
use crate::ns;
use crate::soap::Addressing;
use crate::xml::{Element, Node, Scope};

/// The XPath 1.0 query dialect of WS-ResourceProperties.
pub const XPATH_DIALECT: &str = "http://www.w3.org/TR/1999/REC-xpath-19991116";

/// `http://docs.oasis-open.org/wsrf/rpw-2/{op}/{op}Request`
pub fn rp_request_action(op: &str) -> String {
    format!("http://docs.oasis-open.org/wsrf/rpw-2/{op}/{op}Request")
}
pub fn rp_response_action(op: &str) -> String {
    format!("http://docs.oasis-open.org/wsrf/rpw-2/{op}/{op}Response")
}
pub const RL_DESTROY_REQUEST: &str =
    "http://docs.oasis-open.org/wsrf/rlw-2/ImmediateResourceTermination/DestroyRequest";
pub const RL_DESTROY_RESPONSE: &str =
    "http://docs.oasis-open.org/wsrf/rlw-2/ImmediateResourceTermination/DestroyResponse";
pub const RL_SET_TERMINATION_TIME_REQUEST: &str =
    "http://docs.oasis-open.org/wsrf/rlw-2/ScheduledResourceTermination/SetTerminationTimeRequest";
pub const RL_SET_TERMINATION_TIME_RESPONSE: &str =
    "http://docs.oasis-open.org/wsrf/rlw-2/ScheduledResourceTermination/SetTerminationTimeResponse";

/// The WS-RP operations served (request element local names in the rp-2 namespace).
pub const RP_OPERATIONS: &[&str] = &[
    "GetResourcePropertyDocument",
    "GetResourceProperty",
    "GetMultipleResourceProperties",
    "QueryResourceProperties",
];

/// Whether `action` (when present) is the one expected; tolerates the Crux `open-oasis` typo.
pub fn action_matches(action: Option<&str>, expected: &str) -> bool {
    match action {
        None => true,
        Some(a) => {
            a == expected || a.replace("docs.open-oasis.org", "docs.oasis-open.org") == expected
        }
    }
}

/// A WS-Addressing endpoint reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epr {
    pub address: String,
    pub reference_parameters: Vec<Element>,
}

impl Epr {
    /// As an element `{ns}name` of type `wsa:EndpointReferenceType`.
    pub fn to_element(&self, ns_uri: &str, name: &str) -> Element {
        let mut el =
            Element::new(ns_uri, name).with_text_child(ns::WSA, "Address", self.address.clone());
        if !self.reference_parameters.is_empty() {
            el.push_child(
                Element::new(ns::WSA, "ReferenceParameters")
                    .with_children(self.reference_parameters.iter().cloned()),
            );
        }
        el
    }

    /// Reads an EPR (WS-Addressing 1.0 or 2004/08; 2004/08 ReferenceProperties count as
    /// reference parameters).
    pub fn from_element(el: &Element) -> Result<Epr, Fault> {
        for wsa in [ns::WSA, ns::WSA_2004] {
            if let Some(address) = el.opt_text(wsa, "Address") {
                let mut reference_parameters = Vec::new();
                for holder in ["ReferenceParameters", "ReferenceProperties"] {
                    if let Some(p) = el.child(wsa, holder) {
                        reference_parameters.extend(p.elements().cloned());
                    }
                }
                return Ok(Epr {
                    address,
                    reference_parameters,
                });
            }
        }
        Err(Fault::invalid(format!(
            "<{}> is not an endpoint reference: it has no wsa:Address",
            el.qname()
        )))
    }
}

/// The kinds of WS-Resource a GCA service exposes besides itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Job,
    Checkpoint,
    CtsInstance,
    /// A WS-BaseNotification subscription (the SubscriptionManager resource).
    Subscription,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 4] = [
        ResourceKind::Job,
        ResourceKind::Checkpoint,
        ResourceKind::CtsInstance,
        ResourceKind::Subscription,
    ];

    /// The path segment and `Kind` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Job => "jobs",
            ResourceKind::Checkpoint => "checkpoints",
            ResourceKind::CtsInstance => "instances",
            ResourceKind::Subscription => "subscriptions",
        }
    }

    pub fn parse(s: &str) -> Option<ResourceKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Query parameter names accepted for this kind on the service address.
    fn query_names(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Job => &["gid", "job"],
            ResourceKind::Checkpoint => &["checkpoint", "ckpt"],
            ResourceKind::CtsInstance => &["instance", "cts"],
            ResourceKind::Subscription => &["subscription"],
        }
    }
}

/// The WS-Resource a request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ResourceRef {
    /// The service itself (e.g. the GCS registry).
    Service,
    Resource(ResourceKind, String),
}

impl ResourceRef {
    pub fn job(gid: &str) -> Self {
        ResourceRef::Resource(ResourceKind::Job, gid.to_string())
    }
    pub fn checkpoint(id: &str) -> Self {
        ResourceRef::Resource(ResourceKind::Checkpoint, id.to_string())
    }
    pub fn instance(name: &str) -> Self {
        ResourceRef::Resource(ResourceKind::CtsInstance, name.to_string())
    }
    pub fn subscription(id: &str) -> Self {
        ResourceRef::Resource(ResourceKind::Subscription, id.to_string())
    }

    /// The EPR of this resource, given the service's full address.
    pub fn epr(&self, service_address: &str) -> Epr {
        let base = service_address.trim_end_matches('/');
        match self {
            ResourceRef::Service => Epr {
                address: base.to_string(),
                reference_parameters: Vec::new(),
            },
            ResourceRef::Resource(kind, id) => Epr {
                address: format!("{base}/{}/{}", kind.as_str(), percent_encode(id)),
                reference_parameters: vec![Element::new(ns::GCA, "ResourceID")
                    .with_attr("", "Kind", kind.as_str())
                    .with_text(id.clone())],
            },
        }
    }

    /// Which resource a request addresses, in order: a `gca:ResourceID` reference parameter
    /// header, the request path (`/{kind}/{id}` under the service path, already
    /// percent-decoded), a query parameter
    /// (`?gid=`, `?checkpoint=`, `?instance=`, or `?res=` with the kind in the header), the
    /// path of `wsa:To`; else the service itself.
    pub fn from_request(
        addressing: &Addressing,
        path: Option<(&str, &str)>,
        query: Option<&str>,
    ) -> Result<ResourceRef, Fault> {
        for h in &addressing.reference_parameters {
            if h.is(ns::GCA, "ResourceID") {
                let id = h.text().trim().to_string();
                let kind_attr = h.attr("", "Kind").unwrap_or("");
                let kind = ResourceKind::parse(kind_attr).ok_or_else(|| {
                    Fault::resource_unknown(format!(
                        "the gca:ResourceID header has Kind {kind_attr:?}; expected jobs, checkpoints, instances or subscriptions"
                    ))
                    .with_code("unknown-resource-kind")
                })?;
                if id.is_empty() {
                    return Err(Fault::resource_unknown(
                        "the gca:ResourceID header is empty",
                    ));
                }
                return Ok(ResourceRef::Resource(kind, id));
            }
        }
        if let Some((kind, id)) = path {
            return Self::from_segments(kind, id, false).ok_or_else(|| {
                Fault::resource_unknown(format!(
                    "no resource kind {kind:?} at this service; expected jobs, checkpoints, instances or subscriptions"
                ))
                .with_code("unknown-resource-kind")
            });
        }
        if let Some(q) = query {
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = percent_decode(&v.replace('+', " "));
                if v.is_empty() {
                    continue;
                }
                for kind in ResourceKind::ALL {
                    if kind.query_names().contains(&k) {
                        return Ok(ResourceRef::Resource(kind, v));
                    }
                }
            }
        }
        if let Some(to) = &addressing.to {
            let no_query = to.split(['?', '#']).next().unwrap_or("");
            if let Some(i) = no_query.find(ns::GCS_SERVICE_PATH) {
                let rest = &no_query[i + ns::GCS_SERVICE_PATH.len()..];
                let mut parts = rest.trim_start_matches('/').splitn(2, '/');
                if let (Some(kind), Some(id)) = (parts.next(), parts.next()) {
                    if let Some(r) = Self::from_segments(kind, id, true) {
                        return Ok(r);
                    }
                }
            }
            if let Some((_, q)) = to.split_once('?') {
                if !q.eq_ignore_ascii_case("wsdl") {
                    return Self::from_request(&Addressing::default(), None, Some(q));
                }
            }
        }
        Ok(ResourceRef::Service)
    }

    fn from_segments(kind: &str, id: &str, encoded: bool) -> Option<ResourceRef> {
        let kind = ResourceKind::parse(kind)?;
        let id = if encoded {
            percent_decode(id)
        } else {
            id.to_string()
        };
        (!id.is_empty()).then_some(ResourceRef::Resource(kind, id))
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Adds a `gca:EndpointReference` (last child) to every job, checkpoint record and CTS
/// instance in a response, recognised by the shape of their XSD types (`JobType`,
/// `CheckpointRecordType`, `CtsInstanceType`). RP documents are walked but not decorated.
pub fn add_eprs(el: &mut Element, service_address: &str) {
    let target = if el.ns.as_deref() != Some(ns::GCA) || el.name.ends_with("ResourceProperties") {
        None
    } else if el.child(ns::GCA, "CheckpointID").is_some()
        && el.child(ns::GCA, "ImageName").is_some()
    {
        el.opt_text(ns::GCA, "CheckpointID")
            .map(|id| ResourceRef::checkpoint(&id))
    } else if el.child(ns::GCA, "GID").is_some()
        && el.child(ns::GCA, "State").is_some()
        && el.child(ns::GCA, "CTSInstance").is_some()
    {
        el.opt_text(ns::GCA, "GID")
            .map(|gid| ResourceRef::job(&gid))
    } else if el.child(ns::GCA, "URL").is_some()
        && el.child(ns::GCA, "ExecutionManager").is_some()
        && el.child(ns::GCA, "Resource").is_some()
    {
        el.opt_text(ns::GCA, "Name")
            .map(|n| ResourceRef::instance(&n))
    } else {
        None
    };
    for c in el.children.iter_mut() {
        if let Node::Element(e) = c {
            add_eprs(e, service_address);
        }
    }
    if let Some(r) = target {
        if el.child(ns::GCA, "EndpointReference").is_none() {
            el.push_child(
                r.epr(service_address)
                    .to_element(ns::GCA, "EndpointReference"),
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// WS-ResourceProperties
// ------------------------------------------------------------------------------------------

/// A resource property name: (namespace URI, local name).
pub type PropertyName = (&'static str, &'static str);

/// A WS-RP request, read from the SOAP body.
#[derive(Debug, Clone)]
pub enum RpRequest {
    GetDocument,
    /// One QName (GetResourceProperty) or several (GetMultipleResourceProperties), resolved.
    Get {
        multiple: bool,
        names: Vec<PropertyName>,
    },
    Query {
        expression: String,
        /// Namespace bindings for the expression.
        namespaces: Vec<(String, String)>,
    },
}

impl RpRequest {
    pub fn operation(&self) -> &'static str {
        match self {
            RpRequest::GetDocument => "GetResourcePropertyDocument",
            RpRequest::Get {
                multiple: false, ..
            } => "GetResourceProperty",
            RpRequest::Get { multiple: true, .. } => "GetMultipleResourceProperties",
            RpRequest::Query { .. } => "QueryResourceProperties",
        }
    }

    /// Reads a WS-RP request body. `declared` lists the properties of the resource's RP
    /// document, for QName resolution and the InvalidResourcePropertyQName fault.
    pub fn read(
        body: &Element,
        action: Option<&str>,
        declared: &[PropertyName],
    ) -> Result<RpRequest, Fault> {
        let op = body.name.as_str();
        if !RP_OPERATIONS.contains(&op) || body.ns.as_deref() != Some(ns::WSRF_RP) {
            return Err(Fault::new(
                FaultKind::ActionNotSupported,
                format!(
                    "WS-ResourceProperties operation <{}> is not supported; supported: {}",
                    body.qname(),
                    RP_OPERATIONS.join(", ")
                ),
            )
            .with_code("unknown-operation"));
        }
        let expected = rp_request_action(op);
        if !action_matches(action, &expected) {
            return Err(Fault::new(
                FaultKind::ActionNotSupported,
                format!(
                    "action {:?} does not match the body element <{op}>; expected {expected:?}",
                    action.unwrap_or("")
                ),
            )
            .with_code("action-mismatch"));
        }
        match op {
            "GetResourcePropertyDocument" => Ok(RpRequest::GetDocument),
            "GetResourceProperty" => Ok(RpRequest::Get {
                multiple: false,
                names: vec![resolve_property(body, &body.text(), declared)?],
            }),
            "GetMultipleResourceProperties" => {
                let names = body
                    .children_named(ns::WSRF_RP, "ResourceProperty")
                    .map(|c| resolve_property(c, &c.text(), declared))
                    .collect::<Result<Vec<_>, _>>()?;
                if names.is_empty() {
                    return Err(Fault::invalid(
                        "<GetMultipleResourceProperties> needs at least one <ResourceProperty>",
                    ));
                }
                Ok(RpRequest::Get {
                    multiple: true,
                    names,
                })
            }
            _ => {
                let qe = body.child(ns::WSRF_RP, "QueryExpression").ok_or_else(|| {
                    Fault::invalid("<QueryResourceProperties> needs a <QueryExpression>")
                })?;
                let dialect = qe.attr("", "Dialect").unwrap_or("").trim();
                if dialect != XPATH_DIALECT {
                    return Err(Fault::new(
                        FaultKind::UnknownQueryExpressionDialect,
                        format!(
                            "unknown query expression dialect {dialect:?}; the supported dialect is {XPATH_DIALECT}"
                        ),
                    ));
                }
                let expression = qe
                    .children
                    .iter()
                    .filter_map(|n| match n {
                        Node::Text(t) => Some(t.as_str()),
                        Node::Element(_) => None,
                    })
                    .collect::<String>()
                    .trim()
                    .to_string();
                if expression.is_empty() {
                    return Err(Fault::new(
                        FaultKind::InvalidQueryExpression,
                        "the XPath query expression is empty",
                    ));
                }
                crate::xpath::check_expression(&expression)?;
                Ok(RpRequest::Query {
                    expression,
                    namespaces: query_namespaces(&qe.scope),
                })
            }
        }
    }
}

/// Prefixes usable in queries: the ones in scope at the QueryExpression, plus the well-known
/// ones (gca, wsrf-rp, wsrf-rl, wsrf-sg, wsa) where the request did not bind them (zeep sends
/// expressions without declaring prefixes).
fn query_namespaces(scope: &Scope) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = scope.iter().filter(|(p, _)| !p.is_empty()).collect();
    for (p, u) in WELL_KNOWN_PREFIXES {
        if !out.iter().any(|(q, _)| q == p) {
            out.push((p.to_string(), u.to_string()));
        }
    }
    out
}

const WELL_KNOWN_PREFIXES: &[(&str, &str)] = &[
    ("gca", ns::GCA),
    ("wsrf-rp", ns::WSRF_RP),
    ("wsrf-rl", ns::WSRF_RL),
    ("wsrf-sg", ns::WSRF_SG),
    ("wsa", ns::WSA),
];

/// Resolves a QName-valued request value leniently: a declared prefix, Clark notation, a
/// well-known prefix even when undeclared (zeep), or an unprefixed local name that names
/// exactly one property. Anything else is `InvalidResourcePropertyQNameFault`.
pub fn resolve_property(
    at: &Element,
    value: &str,
    declared: &[PropertyName],
) -> Result<PropertyName, Fault> {
    let value = value.trim();
    let invalid = |why: &str| {
        Fault::new(
            FaultKind::InvalidResourcePropertyQName,
            format!(
                "{value:?} {why}; the resource properties are {}",
                declared
                    .iter()
                    .map(|(n, l)| format!("{{{n}}}{l}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    };
    if value.is_empty() {
        return Err(invalid("is not a QName"));
    }
    let find = |ns_uri: &str, local: &str| {
        declared
            .iter()
            .copied()
            .find(|(n, l)| *n == ns_uri && *l == local)
    };
    let by_local = |local: &str| {
        let mut m = declared.iter().copied().filter(|(_, l)| *l == local);
        match (m.next(), m.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    };
    if value.starts_with('{') {
        let (ns_uri, local) = match at.resolve_qname(value) {
            Some((n, l)) => (n.unwrap_or_default(), l),
            None => return Err(invalid("is not a QName")),
        };
        return find(&ns_uri, &local)
            .ok_or_else(|| invalid("is not a resource property of this resource"));
    }
    match value.split_once(':') {
        Some((prefix, local)) => {
            if let Some(ns_uri) = at.scope.get(prefix) {
                return find(ns_uri, local)
                    .ok_or_else(|| invalid("is not a resource property of this resource"));
            }
            if let Some((_, ns_uri)) = WELL_KNOWN_PREFIXES.iter().find(|(p, _)| *p == prefix) {
                if let Some(p) = find(ns_uri, local) {
                    return Ok(p);
                }
            }
            by_local(local).ok_or_else(|| {
                invalid("has an undeclared prefix and its local name names no single property")
            })
        }
        None => {
            if let Some(ns_uri) = at.scope.get("") {
                if let Some(p) = find(ns_uri, value) {
                    return Ok(p);
                }
            }
            by_local(value).ok_or_else(|| invalid("is not a resource property of this resource"))
        }
    }
}

/// The answer to a WS-RP request on an RP document: (response action, response element).
/// Queries are evaluated off the async workers, bounded ([`crate::xpath`]).
pub async fn answer(req: &RpRequest, document: &Element) -> Result<(String, Element), Fault> {
    let op = req.operation();
    let response = Element::new(ns::WSRF_RP, &format!("{op}Response"));
    let response = match req {
        RpRequest::GetDocument => response.with_child(document.clone()),
        RpRequest::Get { names, .. } => {
            let mut response = response;
            for (n, l) in names {
                response
                    .children
                    .extend(document.children_named(n, l).cloned().map(Node::Element));
            }
            response
        }
        RpRequest::Query {
            expression,
            namespaces,
        } => {
            let mut response = response;
            response.children = query(document, expression, namespaces).await?;
            response
        }
    };
    Ok((rp_response_action(op), response))
}

pub use crate::xpath::{query, QUERY_RESULT};

// ------------------------------------------------------------------------------------------
// WS-ResourceLifetime
// ------------------------------------------------------------------------------------------

/// A WS-RL request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RlRequest {
    Destroy,
    /// `None`: no scheduled termination (xsi:nil).
    SetTerminationTime(Option<DateTime<Utc>>),
}

impl RlRequest {
    pub fn read(
        body: &Element,
        action: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<RlRequest, Fault> {
        let (expected, req) = match body.name.as_str() {
            "Destroy" => (RL_DESTROY_REQUEST, None),
            "SetTerminationTime" => (RL_SET_TERMINATION_TIME_REQUEST, Some(())),
            other => {
                return Err(Fault::new(
                    FaultKind::ActionNotSupported,
                    format!("WS-ResourceLifetime operation <{other}> is not supported; supported: Destroy, SetTerminationTime"),
                )
                .with_code("unknown-operation"))
            }
        };
        if !action_matches(action, expected) {
            return Err(Fault::new(
                FaultKind::ActionNotSupported,
                format!(
                    "action {:?} does not match the body element <{}>; expected {expected:?}",
                    action.unwrap_or(""),
                    body.name
                ),
            )
            .with_code("action-mismatch"));
        }
        if req.is_none() {
            return Ok(RlRequest::Destroy);
        }
        let unable = |m: String| Fault::new(FaultKind::UnableToSetTerminationTime, m);
        if let Some(t) = body.child(ns::WSRF_RL, "RequestedTerminationTime") {
            if t.attr(ns::XSI, "nil").and_then(crate::xml::parse_xsd_bool) == Some(true) {
                return Ok(RlRequest::SetTerminationTime(None));
            }
            let text = t.text();
            let parsed = DateTime::parse_from_rfc3339(text.trim()).map_err(|e| {
                unable(format!(
                    "RequestedTerminationTime {text:?} is not an xsd:dateTime: {e}"
                ))
            })?;
            return Ok(RlRequest::SetTerminationTime(Some(
                parsed.with_timezone(&Utc),
            )));
        }
        if let Some(d) = body.child(ns::WSRF_RL, "RequestedLifetimeDuration") {
            let text = d.text();
            let dur = parse_duration(text.trim())
                .ok_or_else(|| unable(format!("RequestedLifetimeDuration {text:?} is not a supported xsd:duration (use PnDTnHnMnS)")))?;
            let at = after(now, dur).ok_or_else(|| {
                unable(format!(
                    "RequestedLifetimeDuration {text:?} ends past the latest time the service can represent; ask for less, or for no termination (xsi:nil)"
                ))
            })?;
            return Ok(RlRequest::SetTerminationTime(Some(at)));
        }
        Err(Fault::invalid(
            "<SetTerminationTime> needs <RequestedTerminationTime> or <RequestedLifetimeDuration>",
        ))
    }
}

/// `now + duration`, or None when the result is not representable (chrono panics on `+`
/// beyond year ±262,143: every date arithmetic on input goes through here).
pub fn after(now: DateTime<Utc>, duration: Duration) -> Option<DateTime<Utc>> {
    now.checked_add_signed(duration)
}

/// Parses the day-time subset of `xsd:duration` (`[-]PnDTnHnMn.nS`; years and months are
/// refused because their length varies).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (neg, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let rest = rest.strip_prefix('P')?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => {
            if t.is_empty() {
                return None;
            }
            (d, Some(t))
        }
        None => (rest, None),
    };
    let mut millis: i64 = 0;
    let mut num = String::new();
    for c in date.chars() {
        match c {
            '0'..='9' => num.push(c),
            'D' => {
                millis = millis.checked_add(num.parse::<i64>().ok()?.checked_mul(86_400_000)?)?;
                num.clear();
            }
            _ => return None,
        }
    }
    if !num.is_empty() {
        return None;
    }
    if let Some(time) = time {
        for c in time.chars() {
            match c {
                '0'..='9' | '.' => num.push(c),
                'H' | 'M' | 'S' => {
                    let v: f64 = num.parse().ok()?;
                    if c != 'S' && num.contains('.') {
                        return None;
                    }
                    let unit = match c {
                        'H' => 3_600_000.0,
                        'M' => 60_000.0,
                        _ => 1000.0,
                    };
                    let add = v * unit;
                    if !add.is_finite() || add > 1e15 {
                        return None;
                    }
                    millis = millis.checked_add(add as i64)?;
                    num.clear();
                }
                _ => return None,
            }
        }
        if !num.is_empty() {
            return None;
        }
    }
    let d = Duration::try_milliseconds(millis)?;
    Some(if neg { -d } else { d })
}

/// `wsrf-rl:CurrentTime` and `wsrf-rl:TerminationTime` (nil when none is scheduled).
pub fn lifetime_properties(now: DateTime<Utc>, termination: Option<DateTime<Utc>>) -> [Element; 2] {
    [
        Element::new(ns::WSRF_RL, "CurrentTime").with_text(crate::messages::fmt_time(&now)),
        termination_time_element("TerminationTime", termination),
    ]
}

/// A nillable dateTime element in the rl-2 namespace.
pub fn termination_time_element(name: &str, t: Option<DateTime<Utc>>) -> Element {
    match t {
        Some(t) => Element::new(ns::WSRF_RL, name).with_text(crate::messages::fmt_time(&t)),
        None => Element::new(ns::WSRF_RL, name).with_attr(ns::XSI, "nil", "true"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eprs_round_trip_and_address_resources() {
        let r = ResourceRef::job("job 1/a");
        let epr = r.epr("http://h:1/wsrf/services/GridCheckpointService/");
        assert_eq!(
            epr.address,
            "http://h:1/wsrf/services/GridCheckpointService/jobs/job%201%2Fa"
        );
        let el = epr.to_element(ns::GCA, "EndpointReference");
        let back = Epr::from_element(&crate::xml::parse(&el.to_xml()).unwrap()).unwrap();
        assert_eq!(back.address, epr.address);
        let a = Addressing {
            reference_parameters: back.reference_parameters.clone(),
            ..Default::default()
        };
        assert_eq!(ResourceRef::from_request(&a, None, None).unwrap(), r);
        let none = Addressing::default();
        assert_eq!(
            ResourceRef::from_request(&none, Some(("jobs", "job 1/a")), None).unwrap(),
            r
        );
        assert_eq!(
            ResourceRef::from_request(&none, None, Some("gid=job+1%2Fa")).unwrap(),
            r
        );
        let to = Addressing {
            to: Some(epr.address.clone()),
            ..Default::default()
        };
        assert_eq!(ResourceRef::from_request(&to, None, None).unwrap(), r);
        assert_eq!(
            ResourceRef::from_request(&none, None, None).unwrap(),
            ResourceRef::Service
        );
        assert!(ResourceRef::from_request(&none, Some(("nope", "x")), None).is_err());
    }

    #[test]
    fn durations_past_the_representable_are_refused_not_panics() {
        let now = Utc::now();
        for d in ["P100000000D", "-P100000000D", "P106751991167D"] {
            let body = crate::xml::parse(&format!(
                "<r:SetTerminationTime xmlns:r=\"{}\"><r:RequestedLifetimeDuration>{d}</r:RequestedLifetimeDuration></r:SetTerminationTime>",
                ns::WSRF_RL
            ))
            .unwrap();
            let f = RlRequest::read(&body, None, now).unwrap_err();
            assert_eq!(f.kind, FaultKind::UnableToSetTerminationTime, "{d}: {f}");
            assert!(f.message.contains("latest time"), "{d}: {f}");
        }
        assert_eq!(after(now, Duration::days(1)), Some(now + Duration::days(1)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("PT2H"), Some(Duration::hours(2)));
        assert_eq!(
            parse_duration("P1DT0.5S"),
            Some(Duration::milliseconds(86_400_500))
        );
        assert_eq!(parse_duration("-PT1M"), Some(-Duration::minutes(1)));
        assert_eq!(parse_duration("P1Y"), None);
        assert_eq!(parse_duration("PT"), None);
        assert_eq!(parse_duration("P"), None);
    }

    #[tokio::test]
    async fn queries_and_qnames() {
        let doc = crate::xml::parse(
            "<g:Doc xmlns:g=\"urn:gca:v1\"><g:N>1</g:N><g:N>2</g:N><g:S a=\"x\">s</g:S></g:Doc>",
        )
        .unwrap();
        let ns = query_namespaces(&Scope::default());
        let r = query(&doc, "/gca:Doc/gca:N[. > 1]", &ns).await.unwrap();
        assert_eq!(r.len(), 1);
        let result = |kind: &str, text: &str| {
            let el = Element::new(ns::GCA, QUERY_RESULT).with_attr("", "Type", kind);
            vec![Node::Element(if text.is_empty() {
                el
            } else {
                el.with_text(text)
            })]
        };
        assert_eq!(
            query(&doc, "count(//gca:N)", &ns).await.unwrap(),
            result("number", "2")
        );
        assert_eq!(
            query(&doc, "//gca:S/@a", &ns).await.unwrap(),
            result("text", "x")
        );
        assert_eq!(
            query(&doc, "//gca:Z", &ns).await.unwrap(),
            result("empty", "")
        );
        assert_eq!(
            query(&doc, "//gca:N[", &ns).await.unwrap_err().kind,
            FaultKind::InvalidQueryExpression
        );
        assert_eq!(
            query(&doc, "//nope:N", &ns).await.unwrap_err().kind,
            FaultKind::QueryEvaluationError
        );
        let declared: &[PropertyName] = &[(ns::GCA, "N"), (ns::WSRF_RL, "CurrentTime")];
        let at = crate::xml::parse("<x xmlns:q=\"urn:gca:v1\"/>").unwrap();
        assert_eq!(
            resolve_property(&at, "q:N", declared).unwrap(),
            (ns::GCA, "N")
        );
        assert_eq!(
            resolve_property(&at, "gca:N", declared).unwrap(),
            (ns::GCA, "N")
        );
        assert_eq!(
            resolve_property(&at, "zz:N", declared).unwrap(),
            (ns::GCA, "N")
        );
        assert_eq!(
            resolve_property(&at, "{urn:gca:v1}N", declared).unwrap(),
            (ns::GCA, "N")
        );
        assert_eq!(
            resolve_property(&at, "q:Other", declared).unwrap_err().kind,
            FaultKind::InvalidResourcePropertyQName
        );
    }
}
