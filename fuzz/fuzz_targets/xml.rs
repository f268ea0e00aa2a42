//! The XML tree parser (`gca_protocol::xml`), with request and response limits: any input
//! must give a tree or an error, never a panic, a stack overflow or a runaway.
#![no_main]

use gca_protocol::xml;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(root) = xml::parse(text) {
        // What was read serializes and reads back the same.
        let again = xml::parse(&root.to_xml()).expect("serialized output parses");
        assert_eq!(again.qname(), root.qname());
        for e in root.elements() {
            let _ = e.scope.to_map();
            let _ = e.resolve_qname(&e.text());
        }
    }
    let _ = xml::parse_with(text, &xml::Limits::response());
});
