//! The SOAP envelope readers: requests (both versions, WS-Addressing headers, the HTTP
//! action fallbacks) and responses (payload or fault).
#![no_main]

use gca_protocol::soap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for content_type in [None, Some("application/soap+xml; action=\"urn:x\"")] {
        if let Ok(req) = soap::parse_request(text, content_type, Some("\"urn:y\"")) {
            let _ = gca_protocol::wsrf::ResourceRef::from_request(&req.addressing, None, None);
        }
    }
    let _ = soap::parse_response(text);
});
