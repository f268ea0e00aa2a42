//! CTS descriptors (paper 5.5): the XML document an admin registers to define a CTS type.
//!
//! The format is `schemas/cts-descriptor.xsd`; [`parse`] checks a document against the same
//! structure (element order and cardinality, value types) plus the rules an XSD cannot say
//! (known placeholders, unique property names, sane names), and reports the first problem with
//! its line. A test keeps this checker and the XSD in agreement on the example descriptors.

use std::collections::BTreeSet;

use crate::messages::{CtsType, XmlContent};
use crate::ns::GCA;
use crate::placeholders;
use crate::xml::{self, Element, Node, XmlError};

/// (element, min occurs, max occurs) in sequence order; `usize::MAX` is unbounded.
type Sequence = &'static [(&'static str, usize, usize)];
const MANY: usize = usize::MAX;

const DESCRIPTOR: Sequence = &[
    ("Name", 1, 1),
    ("Description", 0, 1),
    ("CoreService", 1, 1),
    ("CheckpointerClass", 0, MANY),
    ("ExecuteWrapper", 1, 1),
    ("RecoveryWrapper", 1, 1),
    ("JobParameter", 0, MANY),
    ("RecoveryJobParameter", 0, MANY),
    ("Environment", 0, MANY),
];
const CORE_SERVICE: Sequence = &[
    ("Name", 1, 1),
    ("Version", 0, 1),
    ("ExternalCheckpoints", 1, 1),
    ("InternalCheckpoints", 1, 1),
    ("RecoverOnOtherResource", 1, 1),
    ("RecoverFromAnyImage", 1, 1),
    ("Property", 0, MANY),
];
const WRAPPER: Sequence = &[("Name", 1, 1), ("Parameter", 0, MANY)];
const PROPERTY: Sequence = &[("Name", 1, 1), ("Value", 1, 1)];

/// Checks that `el`'s children follow `seq`, naming the line of the first deviation.
fn check_sequence(el: &Element, seq: Sequence) -> Result<(), XmlError> {
    if let Some(a) = el
        .attrs
        .iter()
        .find(|a| a.ns.as_deref().is_none_or(|ns| ns == GCA))
    {
        return Err(el.error(format!(
            "<{}> does not take attributes (found {}=\"{}\")",
            el.name, a.name, a.value
        )));
    }
    for n in &el.children {
        if let Node::Text(t) = n {
            if !t.trim().is_empty() {
                return Err(el.error(format!(
                    "<{}> holds text {:?}; it may only contain elements",
                    el.name,
                    t.trim()
                )));
            }
        }
    }
    let mut pos = 0;
    let mut count = 0;
    for child in el.elements() {
        if child.ns.as_deref() != Some(GCA) {
            return Err(child.error(format!(
                "<{}> is not allowed in <{}>: descriptor elements must be in namespace {GCA}",
                child.qname(),
                el.name
            )));
        }
        loop {
            let Some((name, min, max)) = seq.get(pos) else {
                return Err(child.error(unexpected(el, child, seq)));
            };
            if child.name == *name {
                count += 1;
                if count > *max {
                    return Err(child.error(format!(
                        "<{}> may appear at most {max} time(s) in <{}>",
                        child.name, el.name
                    )));
                }
                break;
            }
            if count < *min {
                return Err(child.error(format!(
                    "expected <{name}> in <{}> before <{}>",
                    el.name, child.name
                )));
            }
            pos += 1;
            count = 0;
        }
    }
    // Whatever remains must be optional.
    while let Some((name, min, _)) = seq.get(pos) {
        if count < *min {
            return Err(el.error(format!(
                "<{}> is missing the required element <{name}>",
                el.name
            )));
        }
        pos += 1;
        count = 0;
    }
    Ok(())
}

fn unexpected(parent: &Element, child: &Element, seq: Sequence) -> String {
    if seq.iter().any(|(n, _, _)| *n == child.name) {
        format!(
            "<{}> is out of order in <{}>; the order is: {}",
            child.name,
            parent.name,
            seq.iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "unknown element <{}> in <{}>; allowed: {}",
            child.name,
            parent.name,
            seq.iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Whether `value` is a valid name for a CTS type, checkpointer class or CTS instance: 1-64
/// letters, digits, '.', '_' or '-', starting with a letter or digit (the XSD's name type).
pub fn is_valid_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The message for a name that fails [`is_valid_name`].
pub fn invalid_name_message(what: &str, value: &str) -> String {
    format!(
        "{what} {value:?} is not a valid name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )
}

fn check_name(el: &Element, what: &str, value: &str) -> Result<(), XmlError> {
    if is_valid_name(value) {
        Ok(())
    } else {
        Err(el.error(invalid_name_message(what, value)))
    }
}

fn check_patterns(parent: &Element, name: &str) -> Result<(), XmlError> {
    for p in parent.children_named(GCA, name) {
        let segments = placeholders::parse(p.text().trim())
            .map_err(|e| p.error(format!("<{name}> {:?}: {e}", p.text().trim())))?;
        for seg in segments {
            if let placeholders::Segment::Placeholder(ph) = seg {
                if placeholders::LOCAL_ONLY.contains(&ph.as_str()) {
                    return Err(p.error(format!(
                        "<{name}> {:?}: {{{ph}}} is only known inside a CTS (command templates), not in a descriptor",
                        p.text().trim()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn check_properties(parent: &Element, name: &str) -> Result<(), XmlError> {
    let mut seen = BTreeSet::new();
    for p in parent.children_named(GCA, name) {
        check_sequence(p, PROPERTY)?;
        let key = p.req_text(GCA, "Name")?;
        if !seen.insert(key.clone()) {
            return Err(p.error(format!("<{name}> {key:?} is given more than once")));
        }
    }
    Ok(())
}

/// Validates a descriptor element and converts it.
pub fn from_element(root: &Element) -> Result<CtsType, XmlError> {
    if !root.is(GCA, "CTSDescriptor") {
        return Err(root.error(format!(
            "the root element must be <CTSDescriptor xmlns=\"{GCA}\">, found <{}>",
            root.qname()
        )));
    }
    check_sequence(root, DESCRIPTOR)?;
    let core = root
        .child(GCA, "CoreService")
        .expect("checked by the sequence");
    check_sequence(core, CORE_SERVICE)?;
    check_properties(core, "Property")?;
    for w in ["ExecuteWrapper", "RecoveryWrapper"] {
        let wel = root.child(GCA, w).expect("checked by the sequence");
        check_sequence(wel, WRAPPER)?;
        let wname = wel.req_text(GCA, "Name")?;
        if wname.chars().any(char::is_whitespace) {
            return Err(wel.error(format!("<{w}> name {wname:?} must not contain whitespace")));
        }
        check_patterns(wel, "Parameter")?;
    }
    check_patterns(root, "JobParameter")?;
    check_patterns(root, "RecoveryJobParameter")?;
    check_properties(root, "Environment")?;
    for e in root.children_named(GCA, "Environment") {
        let var = e.req_text(GCA, "Name")?;
        let valid = var
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(e.error(format!("environment variable name {var:?} is not valid")));
        }
        check_patterns(e, "Value")?;
    }
    let mut classes = BTreeSet::new();
    for c in root.children_named(GCA, "CheckpointerClass") {
        let name = c.text().trim().to_string();
        check_name(c, "checkpointer class", &name)?;
        if !classes.insert(name.clone()) {
            return Err(c.error(format!(
                "checkpointer class {name:?} is listed more than once"
            )));
        }
    }
    let cts = CtsType::read_children(root)?;
    check_name(
        root.child(GCA, "Name").unwrap_or(root),
        "CTS type name",
        &cts.name,
    )?;
    if !cts.core_service.external_checkpoints && !cts.core_service.internal_checkpoints {
        return Err(core.error(
            "a core service must take external checkpoint requests, internal ones, or both (ExternalCheckpoints / InternalCheckpoints are both false)",
        ));
    }
    Ok(cts)
}

/// Parses and validates a descriptor document.
pub fn parse(text: &str) -> Result<CtsType, XmlError> {
    from_element(&xml::parse(text)?)
}

/// The descriptor document for a CTS type (what [`parse`] reads back).
pub fn to_document(cts: &CtsType) -> String {
    cts.to_element("CTSDescriptor").to_document()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const CRIU: &str = include_str!("../../schemas/examples/criu-cts.xml");

    #[test]
    fn parses_the_example_and_round_trips() {
        let cts = parse(CRIU).unwrap();
        assert_eq!(cts.name, "criu");
        assert_eq!(cts.core_service.name, "CRIU");
        assert!(cts.core_service.recover_on_other_resource);
        assert_eq!(cts.execute_wrapper.name, "gca-exec");
        assert!(cts
            .execute_wrapper
            .parameters
            .iter()
            .any(|p| p.contains("{GID}")));
        let again = parse(&to_document(&cts)).unwrap();
        assert_eq!(again, cts);
    }

    fn err(text: &str) -> XmlError {
        parse(text).unwrap_err()
    }

    #[test]
    fn names_the_line_and_the_problem() {
        let missing = CRIU
            .replacen("<RecoveryWrapper>", "<Recoverywrapper>", 1)
            .replacen("</RecoveryWrapper>", "</Recoverywrapper>", 1);
        let e = err(&missing);
        let line = CRIU
            .lines()
            .position(|l| l.contains("<RecoveryWrapper>"))
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.message.contains("Recoverywrapper"), "{e}");

        let local = CRIU.replacen("{GID}", "{PID}", 1);
        let e = err(&local);
        assert!(
            e.message.contains("{PID} is only known inside a CTS"),
            "{e}"
        );

        let typo = CRIU.replacen("{GID}", "{GIDD}", 1);
        let e = err(&typo);
        assert!(e.message.contains("unknown placeholder {GIDD}"), "{e}");
        assert!(e.line.is_some());

        let bad_bool = CRIU.replacen(
            "<ExternalCheckpoints>true</ExternalCheckpoints>",
            "<ExternalCheckpoints>yes</ExternalCheckpoints>",
            1,
        );
        assert!(err(&bad_bool).message.contains("true, false"));

        let no_ns = CRIU.replacen("xmlns=\"urn:gca:v1\"", "", 1);
        assert!(err(&no_ns).message.contains("root element"));

        let out_of_order = CRIU.replacen("<Description>", "<Description2>", 1);
        assert!(err(&out_of_order).message.contains("Description2"));

        let neither = CRIU
            .replacen(
                "<ExternalCheckpoints>true</ExternalCheckpoints>",
                "<ExternalCheckpoints>false</ExternalCheckpoints>",
                1,
            )
            .replacen(
                "<InternalCheckpoints>true</InternalCheckpoints>",
                "<InternalCheckpoints>false</InternalCheckpoints>",
                1,
            );
        assert!(err(&neither).message.contains("both false"));
        assert!(err("<CTSDescriptor xmlns=\"urn:gca:v1\"><Name>x</Name>")
            .line
            .is_some());
    }
}
