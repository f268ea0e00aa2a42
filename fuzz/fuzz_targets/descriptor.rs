//! The CTS descriptor checker: structure, values and placeholders, with a line for the first
//! problem; a descriptor it accepts writes back to one it accepts again.
#![no_main]

use gca_protocol::descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cts) = descriptor::parse(text) {
        let again = descriptor::parse(&descriptor::to_document(&cts))
            .expect("a written descriptor is valid");
        assert_eq!(again.name, cts.name);
    }
});
