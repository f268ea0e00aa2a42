//! Typed faults shared by every component and both wire formats.
//!
//! A [`Fault`] is what a service answers when a request cannot be carried out. It maps to one
//! HTTP status, one JSON error body and one SOAP fault whose detail is a WS-BaseFaults element,
//! all in this module, so that a client in any component gets the same [`FaultKind`] back
//! whichever transport it used.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::ns;
use crate::xml::Element;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// The GID, checkpoint, class, CTS type or instance named does not exist.
    ResourceUnknown,
    /// The request could not be read: malformed XML/JSON, missing or invalid fields.
    InvalidMessage,
    /// A CTS descriptor failed validation.
    InvalidDescriptor,
    /// A registration conflicts with what is registered already.
    Conflict,
    /// The SOAP action or operation is not one this endpoint serves.
    ActionNotSupported,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// A service this request depends on (a CTS, the GCS) did not answer in time or at all.
    ServiceUnavailable,
    /// The core checkpointer or the CTS reported that the operation failed.
    OperationFailed,
    /// The caller is not allowed to call this operation.
    AccessDenied,
    /// A bug or an unexpected condition on the server; details are in its log.
    Internal,
    /// WS-RP: the QName names no resource property of the resource.
    InvalidResourcePropertyQName,
    /// WS-RP: the query expression is not valid in its dialect.
    InvalidQueryExpression,
    /// WS-RP: the query expression failed while it was evaluated.
    QueryEvaluationError,
    /// WS-RP: the query expression dialect is not supported.
    UnknownQueryExpressionDialect,
    /// WS-RL: the requested termination time cannot be set.
    UnableToSetTerminationTime,
    /// WS-RL: the resource cannot be destroyed.
    ResourceNotDestroyed,
    /// WS-N: the subscription could not be created (e.g. an unusable consumer reference).
    SubscribeCreationFailed,
    /// WS-N: a filter component is not understood.
    InvalidFilter,
    /// WS-N: the topic expression dialect is not supported.
    TopicExpressionDialectUnknown,
    /// WS-N: the topic expression is not valid in its dialect.
    InvalidTopicExpression,
    /// WS-N: the topic is not one the producer offers.
    TopicNotSupported,
    /// WS-N: the initial termination time of a subscription is not acceptable.
    UnacceptableInitialTerminationTime,
    /// WS-N: the termination time asked for in Renew is not acceptable.
    UnacceptableTerminationTime,
    /// WS-N: GetCurrentMessage on a topic with no current message (the GCS keeps none).
    NoCurrentMessageOnTopic,
}

impl FaultKind {
    pub fn http_status(self) -> u16 {
        match self {
            FaultKind::ResourceUnknown => 404,
            FaultKind::InvalidMessage => 400,
            FaultKind::InvalidDescriptor => 422,
            FaultKind::Conflict => 409,
            FaultKind::ActionNotSupported => 400,
            FaultKind::PayloadTooLarge => 413,
            FaultKind::ServiceUnavailable => 503,
            FaultKind::OperationFailed => 502,
            FaultKind::AccessDenied => 403,
            FaultKind::Internal => 500,
            FaultKind::InvalidResourcePropertyQName => 400,
            FaultKind::InvalidQueryExpression => 400,
            FaultKind::QueryEvaluationError => 400,
            FaultKind::UnknownQueryExpressionDialect => 400,
            FaultKind::UnableToSetTerminationTime => 400,
            FaultKind::ResourceNotDestroyed => 409,
            FaultKind::SubscribeCreationFailed => 400,
            FaultKind::InvalidFilter => 400,
            FaultKind::TopicExpressionDialectUnknown => 400,
            FaultKind::InvalidTopicExpression => 400,
            FaultKind::TopicNotSupported => 400,
            FaultKind::UnacceptableInitialTerminationTime => 400,
            FaultKind::UnacceptableTerminationTime => 400,
            FaultKind::NoCurrentMessageOnTopic => 404,
        }
    }

    /// Whether the sender is at fault (SOAP `Client`/`Sender`) or the receiver.
    pub fn is_sender_fault(self) -> bool {
        !matches!(
            self,
            FaultKind::ServiceUnavailable
                | FaultKind::OperationFailed
                | FaultKind::Internal
                | FaultKind::QueryEvaluationError
        )
    }

    /// The namespace and local name of the WS-BaseFaults element carried in the SOAP detail.
    pub fn detail_element(self) -> (&'static str, &'static str) {
        match self {
            FaultKind::ResourceUnknown => (ns::WSRF_R, "ResourceUnknownFault"),
            FaultKind::ServiceUnavailable => (ns::WSRF_R, "ResourceUnavailableFault"),
            FaultKind::InvalidMessage => (ns::GCA, "InvalidMessageFault"),
            FaultKind::InvalidDescriptor => (ns::GCA, "InvalidDescriptorFault"),
            FaultKind::Conflict => (ns::GCA, "ConflictFault"),
            FaultKind::ActionNotSupported => (ns::GCA, "ActionNotSupportedFault"),
            FaultKind::PayloadTooLarge => (ns::GCA, "PayloadTooLargeFault"),
            FaultKind::OperationFailed => (ns::GCA, "OperationFailedFault"),
            FaultKind::AccessDenied => (ns::GCA, "AccessDeniedFault"),
            FaultKind::Internal => (ns::GCA, "InternalFault"),
            FaultKind::InvalidResourcePropertyQName => {
                (ns::WSRF_RP, "InvalidResourcePropertyQNameFault")
            }
            FaultKind::InvalidQueryExpression => (ns::WSRF_RP, "InvalidQueryExpressionFault"),
            FaultKind::QueryEvaluationError => (ns::WSRF_RP, "QueryEvaluationErrorFault"),
            FaultKind::UnknownQueryExpressionDialect => {
                (ns::WSRF_RP, "UnknownQueryExpressionDialectFault")
            }
            FaultKind::UnableToSetTerminationTime => {
                (ns::WSRF_RL, "UnableToSetTerminationTimeFault")
            }
            FaultKind::ResourceNotDestroyed => (ns::WSRF_RL, "ResourceNotDestroyedFault"),
            FaultKind::SubscribeCreationFailed => (ns::WSNT, "SubscribeCreationFailedFault"),
            FaultKind::InvalidFilter => (ns::WSNT, "InvalidFilterFault"),
            FaultKind::TopicExpressionDialectUnknown => {
                (ns::WSNT, "TopicExpressionDialectUnknownFault")
            }
            FaultKind::InvalidTopicExpression => (ns::WSNT, "InvalidTopicExpressionFault"),
            FaultKind::TopicNotSupported => (ns::WSNT, "TopicNotSupportedFault"),
            FaultKind::UnacceptableInitialTerminationTime => {
                (ns::WSNT, "UnacceptableInitialTerminationTimeFault")
            }
            FaultKind::UnacceptableTerminationTime => {
                (ns::WSNT, "UnacceptableTerminationTimeFault")
            }
            FaultKind::NoCurrentMessageOnTopic => (ns::WSNT, "NoCurrentMessageOnTopicFault"),
        }
    }

    pub fn from_detail_element(ns_uri: &str, name: &str) -> Option<FaultKind> {
        ALL_KINDS
            .iter()
            .copied()
            .find(|k| k.detail_element() == (ns_uri, name))
    }

    /// The kind's name as it appears in JSON (`"ResourceUnknown"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::ResourceUnknown => "ResourceUnknown",
            FaultKind::InvalidMessage => "InvalidMessage",
            FaultKind::InvalidDescriptor => "InvalidDescriptor",
            FaultKind::Conflict => "Conflict",
            FaultKind::ActionNotSupported => "ActionNotSupported",
            FaultKind::PayloadTooLarge => "PayloadTooLarge",
            FaultKind::ServiceUnavailable => "ServiceUnavailable",
            FaultKind::OperationFailed => "OperationFailed",
            FaultKind::AccessDenied => "AccessDenied",
            FaultKind::Internal => "Internal",
            FaultKind::InvalidResourcePropertyQName => "InvalidResourcePropertyQName",
            FaultKind::InvalidQueryExpression => "InvalidQueryExpression",
            FaultKind::QueryEvaluationError => "QueryEvaluationError",
            FaultKind::UnknownQueryExpressionDialect => "UnknownQueryExpressionDialect",
            FaultKind::UnableToSetTerminationTime => "UnableToSetTerminationTime",
            FaultKind::ResourceNotDestroyed => "ResourceNotDestroyed",
            FaultKind::SubscribeCreationFailed => "SubscribeCreationFailed",
            FaultKind::InvalidFilter => "InvalidFilter",
            FaultKind::TopicExpressionDialectUnknown => "TopicExpressionDialectUnknown",
            FaultKind::InvalidTopicExpression => "InvalidTopicExpression",
            FaultKind::TopicNotSupported => "TopicNotSupported",
            FaultKind::UnacceptableInitialTerminationTime => "UnacceptableInitialTerminationTime",
            FaultKind::UnacceptableTerminationTime => "UnacceptableTerminationTime",
            FaultKind::NoCurrentMessageOnTopic => "NoCurrentMessageOnTopic",
        }
    }
}

pub const ALL_KINDS: [FaultKind; 24] = [
    FaultKind::ResourceUnknown,
    FaultKind::InvalidMessage,
    FaultKind::InvalidDescriptor,
    FaultKind::Conflict,
    FaultKind::ActionNotSupported,
    FaultKind::PayloadTooLarge,
    FaultKind::ServiceUnavailable,
    FaultKind::OperationFailed,
    FaultKind::AccessDenied,
    FaultKind::Internal,
    FaultKind::InvalidResourcePropertyQName,
    FaultKind::InvalidQueryExpression,
    FaultKind::QueryEvaluationError,
    FaultKind::UnknownQueryExpressionDialect,
    FaultKind::UnableToSetTerminationTime,
    FaultKind::ResourceNotDestroyed,
    FaultKind::SubscribeCreationFailed,
    FaultKind::InvalidFilter,
    FaultKind::TopicExpressionDialectUnknown,
    FaultKind::InvalidTopicExpression,
    FaultKind::TopicNotSupported,
    FaultKind::UnacceptableInitialTerminationTime,
    FaultKind::UnacceptableTerminationTime,
    FaultKind::NoCurrentMessageOnTopic,
];

/// The code of an `AccessDenied` fault for a caller without an identity (JSON 401).
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// The code of an `AccessDenied` fault for an identity that may not do what it asked (403).
pub const ACCESS_DENIED: &str = "access-denied";
/// The code of a refusal of a record a CTS may not register (another CTS's job, an image not
/// under its address, no digest), as opposed to a refusal of the caller: the CTS sets the
/// record aside rather than retrying it.
pub const RECORD_REFUSED: &str = "record-refused";

/// The dialect of [`Fault::code`] values (our `wsrf-bf:ErrorCode` dialect).
pub const ERROR_CODE_DIALECT: &str = "urn:gca:v1:error-codes";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Fault {
    pub kind: FaultKind,
    /// What was wrong and what to do, for a person.
    pub message: String,
    /// A stable machine-readable code (e.g. `unknown-gid`, `cts-timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub timestamp: DateTime<Utc>,
    /// Elements the fault type adds after the WS-BaseFaults content (e.g. `wsnt:UnknownFilter`,
    /// `wsnt:MinimumTime`); SOAP only.
    #[serde(skip)]
    pub extra: Vec<Element>,
}

impl Fault {
    pub fn new(kind: FaultKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            code: None,
            timestamp: Utc::now(),
            extra: Vec::new(),
        }
    }

    /// Adds an element after the WS-BaseFaults content of the detail.
    pub fn with_extra(mut self, el: Element) -> Self {
        self.extra.push(el);
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The HTTP status of the JSON answer: the kind's, except that a refusal for want of any
    /// identity (`AccessDenied` with code `unauthenticated`) is 401, not 403.
    pub fn http_status(&self) -> u16 {
        if self.kind == FaultKind::AccessDenied && self.code.as_deref() == Some(UNAUTHENTICATED) {
            401
        } else {
            self.kind.http_status()
        }
    }

    /// An `AccessDenied` fault for a caller that presented no identity.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(FaultKind::AccessDenied, message).with_code(UNAUTHENTICATED)
    }

    /// An `AccessDenied` fault for an identity the operation does not allow.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(FaultKind::AccessDenied, message).with_code(ACCESS_DENIED)
    }

    pub fn resource_unknown(message: impl Into<String>) -> Self {
        Self::new(FaultKind::ResourceUnknown, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FaultKind::InvalidMessage, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(FaultKind::Conflict, message)
    }

    pub fn internal() -> Self {
        Self::new(
            FaultKind::Internal,
            "internal error; the server log has the details",
        )
    }

    /// The WS-BaseFaults element for the SOAP fault detail.
    pub fn to_base_fault(&self) -> Element {
        let (fns, fname) = self.kind.detail_element();
        let mut el = Element::new(fns, fname).with_text_child(
            ns::WSRF_BF,
            "Timestamp",
            self.timestamp.to_rfc3339_opts(SecondsFormat::Millis, true),
        );
        if let Some(code) = &self.code {
            el.push_child(
                Element::new(ns::WSRF_BF, "ErrorCode")
                    .with_attr("", "dialect", ERROR_CODE_DIALECT)
                    .with_text(code.clone()),
            );
        }
        el.push_child(
            Element::new(ns::WSRF_BF, "Description")
                .with_attr(crate::xml::XML_NS, "lang", "en")
                .with_text(self.message.clone()),
        );
        el.children
            .extend(self.extra.iter().cloned().map(crate::xml::Node::Element));
        el
    }

    /// Reads a fault back from a SOAP fault detail element (any BaseFault-derived element).
    pub fn from_base_fault(el: &Element, fallback_message: &str) -> Fault {
        let kind = FaultKind::from_detail_element(el.ns.as_deref().unwrap_or(""), &el.name)
            .unwrap_or(FaultKind::Internal);
        let message = el
            .children_named(ns::WSRF_BF, "Description")
            .map(|d| d.text().trim().to_string())
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let timestamp = el
            .opt_text(ns::WSRF_BF, "Timestamp")
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(Utc::now);
        Fault {
            kind,
            message: if message.is_empty() {
                fallback_message.to_string()
            } else {
                message
            },
            code: el.opt_text(ns::WSRF_BF, "ErrorCode"),
            timestamp,
            extra: Vec::new(),
        }
    }
}

/// The JSON error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: Fault,
}

/// Subscribe refused: the caller's identity holds `max_subscriptions_per_identity` live
/// subscriptions (`SubscribeCreationFailed`).
pub const SUBSCRIPTIONS_PER_IDENTITY_LIMIT: &str = "subscriptions-per-identity-limit";
/// Subscribe refused: the GCS holds `max_subscriptions` live subscriptions
/// (`SubscribeCreationFailed`).
pub const SUBSCRIPTIONS_LIMIT: &str = "subscriptions-limit";

/// DoCheckpoint refused at once (`ServiceUnavailable`): the CTS in charge has as many
/// checkpoints in flight as it may (at the GCS: `max_checkpoints_in_flight_per_cts`).
pub const CTS_BUSY: &str = "cts-busy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_fault_round_trips_every_kind() {
        for kind in ALL_KINDS {
            let f = Fault::new(kind, format!("boom {kind:?}")).with_code("some-code");
            let xml = f.to_base_fault().to_xml();
            let el = crate::xml::parse(&xml).unwrap();
            let back = Fault::from_base_fault(&el, "fallback");
            assert_eq!(back.kind, kind);
            assert_eq!(back.message, f.message);
            assert_eq!(back.code.as_deref(), Some("some-code"));
        }
    }

    #[test]
    fn statuses_are_distinct_where_clients_need_them() {
        assert_eq!(FaultKind::ResourceUnknown.http_status(), 404);
        assert_eq!(FaultKind::Conflict.http_status(), 409);
        assert_eq!(FaultKind::PayloadTooLarge.http_status(), 413);
        assert!(!FaultKind::ServiceUnavailable.is_sender_fault());
        assert!(FaultKind::InvalidDescriptor.is_sender_fault());
    }
}
