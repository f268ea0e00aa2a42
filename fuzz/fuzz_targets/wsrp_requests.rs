//! The WS-ResourceProperties, WS-ResourceLifetime and WS-BaseNotification request readers
//! on whatever element the input is, and the XPath check in front of the engine: an
//! expression the check lets through must parse (or fail) without overflowing the stack.
#![no_main]

use gca_protocol::wsn::{ManagerRequest, Subscribe};
use gca_protocol::wsrf::{RlRequest, RpRequest};
use gca_protocol::{ns, xml, xpath};
use libfuzzer_sys::fuzz_target;

const DECLARED: &[(&str, &str)] = &[
    (ns::GCA, "GID"),
    (ns::GCA, "State"),
    (ns::GCA, "Checkpoint"),
    (ns::WSRF_RL, "CurrentTime"),
    (ns::WSRF_RL, "TerminationTime"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The raw input as an XPath expression.
    let _ = xpath::compile(text);
    let Ok(body) = xml::parse(text) else {
        return;
    };
    let now = chrono::Utc::now();
    if let Ok(RpRequest::Query { expression, .. }) = RpRequest::read(&body, None, DECLARED) {
        let _ = xpath::compile(&expression);
    }
    let _ = RlRequest::read(&body, None, now);
    let _ = Subscribe::read(&body, None, now);
    let _ = ManagerRequest::read(&body, None, now);
});
