//! WS-BaseNotification 1.3 and WS-Topics 1.3 building blocks: the GCA topics, reading
//! Subscribe / Renew / Unsubscribe / GetCurrentMessage, and building the answers and the
//! `wsnt:Notify` a consumer receives.
//!
//! Topics are flat root topics in the `urn:gca:v1` namespace (`gca:CheckpointTaken`, ...),
//! named in the Simple dialect (a QName) or the Concrete dialect (the same QName: a root
//! topic is a valid Concrete path; child paths are refused because the topics have no
//! children). The GID filter is a `gca:GID` element inside `wsnt:Filter`.

use chrono::{DateTime, Utc};

use crate::fault::{Fault, FaultKind};
use crate::ns;
use crate::wsrf::{self, Epr};
use crate::xml::Element;

pub const SIMPLE_DIALECT: &str = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Simple";
pub const CONCRETE_DIALECT: &str = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Concrete";
pub const FULL_DIALECT: &str = "http://docs.oasis-open.org/wsn/t-1/TopicExpression/Full";
/// The topic expression dialects the GCS accepts, as advertised in its RP document.
pub const DIALECTS: &[&str] = &[SIMPLE_DIALECT, CONCRETE_DIALECT];

pub const SUBSCRIBE_REQUEST: &str =
    "http://docs.oasis-open.org/wsn/bw-2/NotificationProducer/SubscribeRequest";
pub const SUBSCRIBE_RESPONSE: &str =
    "http://docs.oasis-open.org/wsn/bw-2/NotificationProducer/SubscribeResponse";
pub const GET_CURRENT_MESSAGE_REQUEST: &str =
    "http://docs.oasis-open.org/wsn/bw-2/NotificationProducer/GetCurrentMessageRequest";
pub const NOTIFY: &str = "http://docs.oasis-open.org/wsn/bw-2/NotificationConsumer/Notify";
pub const RENEW_REQUEST: &str =
    "http://docs.oasis-open.org/wsn/bw-2/SubscriptionManager/RenewRequest";
pub const RENEW_RESPONSE: &str =
    "http://docs.oasis-open.org/wsn/bw-2/SubscriptionManager/RenewResponse";
pub const UNSUBSCRIBE_REQUEST: &str =
    "http://docs.oasis-open.org/wsn/bw-2/SubscriptionManager/UnsubscribeRequest";
pub const UNSUBSCRIBE_RESPONSE: &str =
    "http://docs.oasis-open.org/wsn/bw-2/SubscriptionManager/UnsubscribeResponse";

/// The GCA topics (root topics in the `urn:gca:v1` namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A checkpoint record was registered (message: `gca:CheckpointTaken`, a checkpoint record).
    CheckpointTaken,
    /// A new job (GID) was registered (message: `gca:JobRegistered`, the job).
    JobRegistered,
    /// A recovered job registered at a CTS, moving its routing (message: `gca:JobRecovered`).
    JobRecovered,
    /// A job finished, or its WS-Resource was destroyed (message: `gca:JobFinished`).
    JobFinished,
    /// A new CTS instance registered (message: `gca:CTSRegistered`, the instance).
    CtsRegistered,
    /// A CTS instance was not heard from for longer than the GCS's threshold
    /// (message: `gca:CTSLost`, the instance with its last-seen time).
    CtsLost,
}

impl Topic {
    pub const ALL: [Topic; 6] = [
        Topic::CheckpointTaken,
        Topic::JobRegistered,
        Topic::JobRecovered,
        Topic::JobFinished,
        Topic::CtsRegistered,
        Topic::CtsLost,
    ];

    /// The topic's local name in `urn:gca:v1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::CheckpointTaken => "CheckpointTaken",
            Topic::JobRegistered => "JobRegistered",
            Topic::JobRecovered => "JobRecovered",
            Topic::JobFinished => "JobFinished",
            Topic::CtsRegistered => "CTSRegistered",
            Topic::CtsLost => "CTSLost",
        }
    }

    pub fn parse(local: &str) -> Option<Topic> {
        Self::ALL.into_iter().find(|t| t.as_str() == local)
    }

    /// The message element of the topic's notifications: `gca:{topic}Event` (distinct from
    /// the topic's own name: `gca:JobFinished` is the CTS-facing request already).
    pub fn message_name(self) -> String {
        format!("{}Event", self.as_str())
    }

    /// The topic as written in a `wsnt:Topic` (the `gca` prefix is declared wherever a GCA
    /// message goes along).
    pub fn qname(self) -> String {
        format!("gca:{}", self.as_str())
    }
}

fn names() -> String {
    Topic::ALL
        .iter()
        .map(|t| t.qname())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads one topic expression (`wsnt:TopicExpression` or `wsnt:Topic`): its dialect and the
/// topic it names. QNames are resolved leniently like resource property names: a declared
/// prefix, Clark notation, or an undeclared prefix (zeep sends `gca:X` verbatim).
pub fn read_topic_expression(el: &Element) -> Result<(String, Topic), Fault> {
    let dialect = el.attr("", "Dialect").unwrap_or("").trim().to_string();
    if dialect.is_empty() {
        return Err(Fault::new(
            FaultKind::TopicExpressionDialectUnknown,
            "the topic expression has no Dialect; use the Simple or Concrete dialect of WS-Topics 1.3",
        ));
    }
    if !DIALECTS.contains(&dialect.as_str()) {
        return Err(Fault::new(
            FaultKind::TopicExpressionDialectUnknown,
            format!(
                "topic expression dialect {dialect:?} is not supported; supported: {}",
                DIALECTS.join(", ")
            ),
        ));
    }
    let text = el.text();
    let expr = text.trim();
    let invalid = |why: &str| {
        Fault::new(
            FaultKind::InvalidTopicExpression,
            format!("topic expression {expr:?} is not valid in the dialect {dialect}: {why}"),
        )
    };
    if expr.is_empty() {
        return Err(invalid("it is empty"));
    }
    if expr.contains(['*', '|', ' ', '[', '(']) || expr.contains("//") || expr.starts_with('.') {
        return Err(invalid(
            "wildcards, unions and predicates belong to the Full dialect",
        ));
    }
    let (root, rest) = if let Some(r) = expr.strip_prefix('{') {
        // Clark notation: the root may contain '/' inside the namespace.
        match r.split_once('}') {
            Some((nsu, tail)) => {
                let (local, rest) = match tail.split_once('/') {
                    Some((l, r)) => (l, Some(r)),
                    None => (tail, None),
                };
                (format!("{{{nsu}}}{local}"), rest)
            }
            None => return Err(invalid("unbalanced '{'")),
        }
    } else {
        match expr.split_once('/') {
            Some((r, rest)) => (r.to_string(), Some(rest)),
            None => (expr.to_string(), None),
        }
    };
    if rest.is_some() && dialect == SIMPLE_DIALECT {
        return Err(invalid(
            "a Simple topic expression is one QName naming a root topic",
        ));
    }
    let (nsu, local) = match el.resolve_qname(&root) {
        Some(r) => r,
        // An undeclared prefix: judge by the local name.
        None => (
            Some(ns::GCA.to_string()),
            root.rsplit(':').next().unwrap_or("").to_string(),
        ),
    };
    if local.is_empty() || local.contains(':') {
        return Err(invalid("not a QName"));
    }
    let not_supported = || {
        Fault::new(
            FaultKind::TopicNotSupported,
            format!(
                "the GCS has no topic {expr:?}; its topics (namespace {}) are {}",
                ns::GCA,
                names()
            ),
        )
    };
    if nsu.as_deref().is_some_and(|n| n != ns::GCA) {
        return Err(not_supported());
    }
    let topic = Topic::parse(&local).ok_or_else(not_supported)?;
    if rest.is_some() {
        return Err(Fault::new(
            FaultKind::TopicNotSupported,
            format!(
                "{expr:?} names a child of {}, but the GCS's topics have no children",
                topic.qname()
            ),
        ));
    }
    Ok((dialect, topic))
}

/// A Subscribe request, read.
#[derive(Debug, Clone)]
pub struct Subscribe {
    pub consumer: Epr,
    /// The dialect the topic was named in (Simple when no topic was named).
    pub dialect: String,
    /// The topics subscribed to; empty: every topic.
    pub topics: Vec<Topic>,
    /// Only events about this job (`gca:GID` in the filter).
    pub gid: Option<String>,
    /// The requested termination: `None` = the producer's default, `Some(None)` = never (nil).
    pub termination: Option<Option<DateTime<Utc>>>,
}

/// Reads an `AbsoluteOrRelativeTimeType` value (dateTime or duration), or nil.
pub fn read_time(el: &Element, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, String> {
    if el.attr(ns::XSI, "nil").and_then(crate::xml::parse_xsd_bool) == Some(true) {
        return Ok(None);
    }
    let text = el.text();
    let t = text.trim();
    if t.starts_with('P') || t.starts_with("-P") {
        let d = wsrf::parse_duration(t)
            .ok_or_else(|| format!("{t:?} is not a supported xsd:duration (use PnDTnHnMnS)"))?;
        return wsrf::after(now, d).map(Some).ok_or_else(|| {
            format!("{t:?} ends past the latest time the GCS can represent; ask for less")
        });
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| Some(d.with_timezone(&Utc)))
        .map_err(|e| format!("{t:?} is neither an xsd:dateTime nor an xsd:duration: {e}"))
}

fn check_action(action: Option<&str>, expected: &str, op: &str) -> Result<(), Fault> {
    if wsrf::action_matches(action, expected) {
        Ok(())
    } else {
        Err(Fault::new(
            FaultKind::ActionNotSupported,
            format!(
                "action {:?} does not match the body element <wsnt:{op}>; expected {expected:?}",
                action.unwrap_or("")
            ),
        )
        .with_code("action-mismatch"))
    }
}

/// A fault for a filter component the GCS does not understand (the UnknownFilter QName is
/// written with the `wsnt` prefix for b-2 elements, else by its local name).
fn unknown_filter(el: &Element, why: String) -> Fault {
    let qname = if el.ns.as_deref() == Some(ns::WSNT) {
        format!("wsnt:{}", el.name)
    } else {
        el.name.clone()
    };
    Fault::new(FaultKind::InvalidFilter, why)
        .with_extra(Element::new(ns::WSNT, "UnknownFilter").with_text(qname))
}

impl Subscribe {
    pub fn read(body: &Element, action: Option<&str>, now: DateTime<Utc>) -> Result<Self, Fault> {
        check_action(action, SUBSCRIBE_REQUEST, "Subscribe")?;
        let consumer_el = body
            .child(ns::WSNT, "ConsumerReference")
            .ok_or_else(|| Fault::invalid("<wsnt:Subscribe> needs a <wsnt:ConsumerReference>"))?;
        let consumer = Epr::from_element(consumer_el)?;
        let mut topics = Vec::new();
        let mut dialect = None;
        let mut gid = None;
        if let Some(filter) = body.child(ns::WSNT, "Filter") {
            for c in filter.elements() {
                if c.is(ns::WSNT, "TopicExpression") {
                    let (d, t) = read_topic_expression(c)?;
                    dialect.get_or_insert(d);
                    if !topics.contains(&t) {
                        topics.push(t);
                    }
                } else if c.is(ns::GCA, "GID") {
                    let g = c.text().trim().to_string();
                    if g.is_empty() {
                        return Err(unknown_filter(c, "the gca:GID filter is empty".into()));
                    }
                    if gid.replace(g).is_some() {
                        return Err(unknown_filter(c, "give at most one gca:GID filter".into()));
                    }
                } else {
                    return Err(unknown_filter(
                        c,
                        format!(
                            "the filter component <{}> is not supported; the GCS filters by wsnt:TopicExpression (Simple or Concrete dialect) and gca:GID",
                            c.qname()
                        ),
                    ));
                }
            }
        }
        let termination = match body.child(ns::WSNT, "InitialTerminationTime") {
            None => None,
            Some(el) => Some(read_time(el, now).map_err(|why| {
                Fault::new(
                    FaultKind::UnacceptableInitialTerminationTime,
                    format!("InitialTerminationTime {why}"),
                )
                .with_extra(Element::new(ns::WSNT, "MinimumTime").with_text(fmt(now)))
            })?),
        };
        if let Some(Some(t)) = termination {
            if t <= now {
                return Err(Fault::new(
                    FaultKind::UnacceptableInitialTerminationTime,
                    format!("InitialTerminationTime {} is not in the future", fmt(t)),
                )
                .with_extra(Element::new(ns::WSNT, "MinimumTime").with_text(fmt(now))));
            }
        }
        Ok(Subscribe {
            consumer,
            dialect: dialect.unwrap_or_else(|| SIMPLE_DIALECT.to_string()),
            topics,
            gid,
            termination,
        })
    }
}

fn fmt(t: DateTime<Utc>) -> String {
    crate::messages::fmt_time(&t)
}

/// The requests on a subscription resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerRequest {
    /// Renew: the new termination time (`None`: never).
    Renew(Option<DateTime<Utc>>),
    Unsubscribe,
}

impl ManagerRequest {
    pub fn read(body: &Element, action: Option<&str>, now: DateTime<Utc>) -> Result<Self, Fault> {
        match body.name.as_str() {
            "Renew" => {
                check_action(action, RENEW_REQUEST, "Renew")?;
                let el = body
                    .child(ns::WSNT, "TerminationTime")
                    .ok_or_else(|| Fault::invalid("<wsnt:Renew> needs a <wsnt:TerminationTime>"))?;
                let unacceptable = |why: String| {
                    Fault::new(FaultKind::UnacceptableTerminationTime, why)
                        .with_extra(Element::new(ns::WSNT, "MinimumTime").with_text(fmt(now)))
                };
                let at =
                    read_time(el, now).map_err(|w| unacceptable(format!("TerminationTime {w}")))?;
                if at.is_some_and(|t| t <= now) {
                    return Err(unacceptable(format!(
                        "TerminationTime {} is not in the future",
                        fmt(at.unwrap_or(now))
                    )));
                }
                Ok(ManagerRequest::Renew(at))
            }
            "Unsubscribe" => {
                check_action(action, UNSUBSCRIBE_REQUEST, "Unsubscribe")?;
                Ok(ManagerRequest::Unsubscribe)
            }
            other => Err(Fault::new(
                FaultKind::ActionNotSupported,
                format!("a subscription serves wsnt:Renew and wsnt:Unsubscribe, not <{other}>"),
            )
            .with_code("unknown-operation")),
        }
    }
}

/// A nillable dateTime element in the b-2 namespace.
pub fn time_element(name: &str, t: Option<DateTime<Utc>>) -> Element {
    match t {
        Some(t) => Element::new(ns::WSNT, name).with_text(fmt(t)),
        None => Element::new(ns::WSNT, name).with_attr(ns::XSI, "nil", "true"),
    }
}

/// `wsnt:SubscribeResponse`.
pub fn subscribe_response(
    subscription: &Epr,
    now: DateTime<Utc>,
    termination: Option<DateTime<Utc>>,
) -> Element {
    Element::new(ns::WSNT, "SubscribeResponse")
        .with_child(subscription.to_element(ns::WSNT, "SubscriptionReference"))
        .with_child(Element::new(ns::WSNT, "CurrentTime").with_text(fmt(now)))
        .with_child(time_element("TerminationTime", termination))
}

/// `wsnt:RenewResponse`.
pub fn renew_response(now: DateTime<Utc>, termination: Option<DateTime<Utc>>) -> Element {
    Element::new(ns::WSNT, "RenewResponse")
        .with_child(time_element("TerminationTime", termination))
        .with_child(Element::new(ns::WSNT, "CurrentTime").with_text(fmt(now)))
}

/// `wsnt:Notify` with one `wsnt:NotificationMessage`.
pub fn notify(
    subscription: &Epr,
    dialect: &str,
    topic: &str,
    producer: &Epr,
    message: Element,
) -> Element {
    Element::new(ns::WSNT, "Notify").with_child(
        Element::new(ns::WSNT, "NotificationMessage")
            .with_child(subscription.to_element(ns::WSNT, "SubscriptionReference"))
            .with_child(
                Element::new(ns::WSNT, "Topic")
                    .with_attr("", "Dialect", dialect)
                    .with_text(format!("gca:{topic}")),
            )
            .with_child(producer.to_element(ns::WSNT, "ProducerReference"))
            .with_child(Element::new(ns::WSNT, "Message").with_child(message)),
    )
}

/// The NotificationProducer resource properties of the GCS: `wsnt:TopicExpression` per topic,
/// `wsnt:FixedTopicSet` true and the dialects. The optional `wstop:TopicSet` is left out: its
/// topic nodes would be elements named like the topics (`gca:JobFinished`), which `gca.xsd`
/// already declares as messages, so the t-1 wildcard's lax validation would reject them.
pub fn producer_properties() -> Vec<Element> {
    let mut out: Vec<Element> = Topic::ALL
        .iter()
        .map(|t| {
            Element::new(ns::WSNT, "TopicExpression")
                .with_attr("", "Dialect", SIMPLE_DIALECT)
                .with_text(t.qname())
        })
        .collect();
    out.push(Element::new(ns::WSNT, "FixedTopicSet").with_text("true"));
    for d in DIALECTS {
        out.push(Element::new(ns::WSNT, "TopicExpressionDialect").with_text(*d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn te(dialect: &str, text: &str) -> Element {
        crate::xml::parse(&format!(
            "<wsnt:TopicExpression xmlns:wsnt=\"{}\" xmlns:g=\"urn:gca:v1\" xmlns:o=\"urn:other\" Dialect=\"{dialect}\">{text}</wsnt:TopicExpression>",
            ns::WSNT
        ))
        .unwrap()
    }

    #[test]
    fn huge_durations_are_unacceptable_times_not_panics() {
        let now = Utc::now();
        let renew = crate::xml::parse(&format!(
            "<wsnt:Renew xmlns:wsnt=\"{}\"><wsnt:TerminationTime>P100000000D</wsnt:TerminationTime></wsnt:Renew>",
            ns::WSNT
        ))
        .unwrap();
        let f = ManagerRequest::read(&renew, None, now).unwrap_err();
        assert_eq!(f.kind, FaultKind::UnacceptableTerminationTime, "{f}");
        assert!(f.message.contains("latest time"), "{f}");
        let subscribe = crate::xml::parse(&format!(
            "<wsnt:Subscribe xmlns:wsnt=\"{}\" xmlns:wsa=\"{}\"><wsnt:ConsumerReference><wsa:Address>http://c.example/n</wsa:Address></wsnt:ConsumerReference><wsnt:InitialTerminationTime>P100000000D</wsnt:InitialTerminationTime></wsnt:Subscribe>",
            ns::WSNT,
            ns::WSA
        ))
        .unwrap();
        let f = Subscribe::read(&subscribe, None, now).unwrap_err();
        assert_eq!(f.kind, FaultKind::UnacceptableInitialTerminationTime, "{f}");
    }

    #[test]
    fn topic_expressions() {
        let ok = |d, t| read_topic_expression(&te(d, t)).map(|r| r.1);
        let kind = |d, t| read_topic_expression(&te(d, t)).unwrap_err().kind;
        assert_eq!(
            ok(SIMPLE_DIALECT, "g:CheckpointTaken"),
            Ok(Topic::CheckpointTaken)
        );
        assert_eq!(ok(SIMPLE_DIALECT, "gca:CTSLost"), Ok(Topic::CtsLost));
        assert_eq!(
            ok(CONCRETE_DIALECT, " {urn:gca:v1}JobFinished "),
            Ok(Topic::JobFinished)
        );
        assert_eq!(
            kind(FULL_DIALECT, "g:JobFinished"),
            FaultKind::TopicExpressionDialectUnknown
        );
        assert_eq!(
            kind(SIMPLE_DIALECT, "g:Job/X"),
            FaultKind::InvalidTopicExpression
        );
        assert_eq!(
            kind(CONCRETE_DIALECT, "g:JobFinished/X"),
            FaultKind::TopicNotSupported
        );
        assert_eq!(
            kind(CONCRETE_DIALECT, "g:*"),
            FaultKind::InvalidTopicExpression
        );
        assert_eq!(kind(SIMPLE_DIALECT, "g:Nope"), FaultKind::TopicNotSupported);
        assert_eq!(
            kind(SIMPLE_DIALECT, "o:CheckpointTaken"),
            FaultKind::TopicNotSupported
        );
        assert_eq!(kind(SIMPLE_DIALECT, ""), FaultKind::InvalidTopicExpression);
    }
}
