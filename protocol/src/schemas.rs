//! The published WSDL and XSD files (`schemas/` at the workspace root), embedded so that every
//! service serves exactly the contract it was built with, together with copies of the standards'
//! schemas the contract imports: a client needs nothing but the WSDL's address, no internet
//! access and no local files.

/// (file name, contents) of every file served under `/wsrf/schemas/`.
pub const FILES: &[(&str, &str)] = &[
    ("gca.xsd", include_str!("../../schemas/gca.xsd")),
    (
        "cts-descriptor.xsd",
        include_str!("../../schemas/cts-descriptor.xsd"),
    ),
    ("gcs.wsdl", include_str!("../../schemas/gcs.wsdl")),
    ("cts.wsdl", include_str!("../../schemas/cts.wsdl")),
    // OASIS WSRF 1.2: WS-BaseFaults, WS-Resource, WS-ResourceProperties, WS-ResourceLifetime.
    ("bf-2.xsd", include_str!("../../schemas/bf-2.xsd")),
    ("r-2.xsd", include_str!("../../schemas/r-2.xsd")),
    ("rp-2.xsd", include_str!("../../schemas/rp-2.xsd")),
    ("rl-2.xsd", include_str!("../../schemas/rl-2.xsd")),
    // OASIS WSN 1.3: WS-BaseNotification, WS-Topics.
    ("b-2.xsd", include_str!("../../schemas/b-2.xsd")),
    ("t-1.xsd", include_str!("../../schemas/t-1.xsd")),
    // W3C: WS-Addressing 1.0 and the xml: namespace.
    (
        "wsaddressing10.xsd",
        include_str!("../../schemas/wsaddressing10.xsd"),
    ),
    ("xml.xsd", include_str!("../../schemas/xml.xsd")),
];

/// Where the files are served, below a service's root URL.
pub const PATH: &str = "/wsrf/schemas";

pub fn file(name: &str) -> Option<&'static str> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The address the WSDL files carry; replaced by the serving host's real one.
pub const GCS_PLACEHOLDER_ROOT: &str = "http://localhost:8080";
pub const CTS_PLACEHOLDER_ROOT: &str = "http://localhost:8090";

/// Prepares a schema file for serving from `base` (e.g. `http://gcs.example.org:8080`):
/// relative `schemaLocation`s (every import and include of the files above is one) become
/// `{base}/wsrf/schemas/{file}`, and the placeholder service address becomes `base`.
/// Absolute locations (only in xml.xsd's documentation text) are left as they are.
pub fn rewrite(text: &str, base: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut out = String::with_capacity(text.len() + 512);
    let mut rest = text;
    const ATTR: &str = "schemaLocation";
    while let Some(i) = rest.find(ATTR) {
        let (head, tail) = rest.split_at(i + ATTR.len());
        out.push_str(head);
        rest = tail;
        // `schemaLocation` S? `=` S? quote value quote
        let after_ws = rest.trim_start();
        let Some(after_eq) = after_ws.strip_prefix('=') else {
            continue;
        };
        let value_part = after_eq.trim_start();
        let Some(quote) = value_part
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
        else {
            continue;
        };
        let Some(len) = value_part[1..].find(quote) else {
            continue;
        };
        let loc = &value_part[1..1 + len];
        // Everything up to the opening quote, as written.
        let upto_value = rest.len() - value_part.len() + 1;
        out.push_str(&rest[..upto_value]);
        if loc.contains("://") || loc.is_empty() {
            out.push_str(loc);
        } else {
            out.push_str(&format!("{base}{PATH}/{loc}"));
        }
        rest = &value_part[1 + len..];
    }
    out.push_str(rest);
    out.replace(GCS_PLACEHOLDER_ROOT, base)
        .replace(CTS_PLACEHOLDER_ROOT, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_relative_locations_and_the_address() {
        let t = r#"<xsd:import schemaLocation="gca.xsd"/><xsd:import schemaLocation="http://docs.oasis-open.org/wsrf/bf-2.xsd"/><soap:address location="http://localhost:8080/wsrf/services/GridCheckpointService"/>"#;
        let r = rewrite(t, "https://h:1/");
        assert!(
            r.contains(r#"schemaLocation="https://h:1/wsrf/schemas/gca.xsd""#),
            "{r}"
        );
        assert!(r.contains(r#"schemaLocation="http://docs.oasis-open.org/wsrf/bf-2.xsd""#));
        assert!(r.contains(r#"location="https://h:1/wsrf/services/GridCheckpointService""#));
    }

    #[test]
    fn rewrites_locations_written_with_spaces_newlines_or_single_quotes() {
        let t = "<i schemaLocation=\n   \"bf-2.xsd\"/><i schemaLocation = 'xml.xsd'/><p>schemaLocation is</p><i schemaLocation=\"t-1.xsd\"/>";
        let r = rewrite(t, "http://g:2");
        assert_eq!(
            r,
            "<i schemaLocation=\n   \"http://g:2/wsrf/schemas/bf-2.xsd\"/><i schemaLocation = 'http://g:2/wsrf/schemas/xml.xsd'/><p>schemaLocation is</p><i schemaLocation=\"http://g:2/wsrf/schemas/t-1.xsd\"/>"
        );
    }

    #[test]
    fn every_file_is_present() {
        for (name, text) in FILES {
            assert!(!text.trim().is_empty(), "{name} is empty");
        }
    }

    /// Every `.xsd`/`.wsdl` of `schemas/` is embedded (so served), and every import or include
    /// of an embedded file names another embedded file: nothing points outside the service.
    #[test]
    fn every_schema_file_is_embedded_and_every_import_is_served() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".xsd") || n.ends_with(".wsdl"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "schemas/ and schemas::FILES differ");

        let base = "http://gcs.test:1";
        for (name, text) in FILES {
            let doc = crate::xml::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let served = rewrite(text, base);
            let mut locations = Vec::new();
            collect_locations(&doc, &mut locations);
            for loc in locations {
                assert!(
                    !loc.contains("://"),
                    "{name} imports {loc}: every import must be one of the served files"
                );
                assert!(
                    file(&loc).is_some(),
                    "{name} imports {loc}, which is not served"
                );
                assert!(
                    served.contains(&format!("{base}{PATH}/{loc}")),
                    "{name}: {loc} is not rewritten to the served copy"
                );
            }
        }
    }

    fn collect_locations(el: &crate::xml::Element, out: &mut Vec<String>) {
        if el.ns.as_deref() == Some("http://www.w3.org/2001/XMLSchema")
            && matches!(el.name.as_str(), "import" | "include" | "redefine")
        {
            if let Some(loc) = el.attr("", "schemaLocation") {
                out.push(loc.to_string());
            }
        }
        for child in el.elements() {
            collect_locations(child, out);
        }
    }
}
