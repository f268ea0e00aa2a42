//! The published WSDL and XSD files (`schemas/` at the workspace root), embedded so that every
//! service serves exactly the contract it was built with.

/// (file name, contents) of every file served under `/wsrf/schemas/`.
pub const FILES: &[(&str, &str)] = &[
    ("gca.xsd", include_str!("../../schemas/gca.xsd")),
    (
        "cts-descriptor.xsd",
        include_str!("../../schemas/cts-descriptor.xsd"),
    ),
    ("gcs.wsdl", include_str!("../../schemas/gcs.wsdl")),
    ("cts.wsdl", include_str!("../../schemas/cts.wsdl")),
];

pub fn file(name: &str) -> Option<&'static str> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The address the WSDL files carry; replaced by the serving host's real one.
pub const GCS_PLACEHOLDER_ROOT: &str = "http://localhost:8080";
pub const CTS_PLACEHOLDER_ROOT: &str = "http://localhost:8090";

/// Prepares a schema file for serving from `base` (e.g. `http://gcs.example.org:8080`):
/// relative `schemaLocation`s become `{base}/wsrf/schemas/{file}` and the placeholder service
/// address becomes `base`.
pub fn rewrite(text: &str, base: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut out = String::with_capacity(text.len() + 256);
    let mut rest = text;
    const ATTR: &str = "schemaLocation=\"";
    while let Some(i) = rest.find(ATTR) {
        let (head, tail) = rest.split_at(i + ATTR.len());
        out.push_str(head);
        let end = tail.find('"').unwrap_or(tail.len());
        let loc = &tail[..end];
        if loc.contains("://") {
            out.push_str(loc);
        } else {
            out.push_str(&format!("{base}/wsrf/schemas/{loc}"));
        }
        rest = &tail[end..];
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
    fn every_file_is_present() {
        for (name, text) in FILES {
            assert!(!text.trim().is_empty(), "{name} is empty");
        }
    }
}
