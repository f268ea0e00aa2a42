//! Parameter patterns with placeholders (paper 3.3, 5.1 step 5): `--gid={GID}`.
//!
//! The one implementation used by the GCS (to validate descriptors and fill in recovery
//! parameters), by brokers through `gcactl`, and by the wrappers. `{{` and `}}` stand for
//! literal braces. Only the names in [`KNOWN`] are accepted, so a typo in a descriptor is
//! caught when it is registered, not when a job is submitted.
//!
//! Expanded text may become an argument of a command run as root, so values are checked
//! as they are filled in: `{GID}` and `{IMAGE_ID}` must be IDs ([`crate::ids`]), and no value
//! may begin the expanded text with `-` (it would read as an option).

use std::collections::BTreeMap;

/// Every placeholder name, with what it stands for.
pub const KNOWN: &[(&str, &str)] = &[
    ("GID", "the job's global identifier, assigned by the broker"),
    (
        "IMAGE_ID",
        "the checkpoint (image) ID a job is recovered from",
    ),
    ("SEQUENCE", "the sequence number of that checkpoint"),
    ("CTS_URL", "the SOAP endpoint of the CTS instance in charge"),
    ("CTS_NAME", "the name of that CTS instance"),
    ("CTS_TYPE", "the CTS type"),
    ("GCS_URL", "the Grid Checkpoint Service endpoint"),
    ("RESOURCE", "the computing resource of the CTS instance"),
    (
        "EXECUTION_MANAGER",
        "the Execution Manager EPR address of the CTS instance",
    ),
    (
        "CHECKPOINT_DIR",
        "the per-job checkpoint directory chosen by the CTS",
    ),
    (
        "PID",
        "the local process ID of the job's root process (command templates)",
    ),
    (
        "IMAGE_DIR",
        "the directory the image is written to or restored from (command templates)",
    ),
];

/// Placeholders only a CTS can fill in (its command templates); descriptors may not use them.
pub const LOCAL_ONLY: &[&str] = &["PID", "IMAGE_DIR"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Placeholder(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("unclosed '{{' at offset {0} (write '{{{{' for a literal brace)")]
    Unclosed(usize),
    #[error("unmatched '}}' at offset {0} (write '}}}}' for a literal brace)")]
    Unmatched(usize),
    #[error("unknown placeholder {{{0}}}; known placeholders: {known}", known = known_list())]
    Unknown(String),
    #[error("no value for placeholder {{{0}}}")]
    Missing(String),
    #[error("the value of {{{name}}} is refused: {why}")]
    BadValue { name: String, why: String },
}

/// Checks a value as it is filled in; `at_start`: it begins the expanded text.
fn check_value(name: &str, value: &str, at_start: bool) -> Result<(), PatternError> {
    let bad = |why: String| PatternError::BadValue {
        name: name.to_string(),
        why,
    };
    if matches!(name, "GID" | "IMAGE_ID") {
        crate::ids::check(name, value).map_err(|e| bad(e.to_string()))?;
    }
    if at_start && value.starts_with('-') {
        return Err(bad(format!(
            "{value:?} would begin the argument with '-' and read as an option"
        )));
    }
    Ok(())
}

fn known_list() -> String {
    KNOWN
        .iter()
        .map(|(n, _)| format!("{{{n}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits a pattern into literals and placeholders, checking every name against [`KNOWN`].
pub fn parse(pattern: &str) -> Result<Vec<Segment>, PatternError> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = pattern.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let rest = &pattern[i + 1..];
                let end = rest.find('}').ok_or(PatternError::Unclosed(i))?;
                let name = &rest[..end];
                if name.contains('{') {
                    return Err(PatternError::Unclosed(i));
                }
                if !KNOWN.iter().any(|(n, _)| *n == name) {
                    return Err(PatternError::Unknown(name.to_string()));
                }
                if !lit.is_empty() {
                    out.push(Segment::Literal(std::mem::take(&mut lit)));
                }
                out.push(Segment::Placeholder(name.to_string()));
                for _ in 0..name.chars().count() + 1 {
                    chars.next();
                }
            }
            '}' => return Err(PatternError::Unmatched(i)),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        out.push(Segment::Literal(lit));
    }
    Ok(out)
}

/// The values to fill in, by placeholder name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values(BTreeMap<String, String>);

impl Values {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.to_string(), value.into());
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

fn escape_literal(s: &str) -> String {
    s.replace('{', "{{").replace('}', "}}")
}

/// Expands every placeholder; one without a value is an error.
pub fn expand(pattern: &str, values: &Values) -> Result<String, PatternError> {
    let mut out = String::new();
    for seg in parse(pattern)? {
        match seg {
            Segment::Literal(l) => out.push_str(&l),
            Segment::Placeholder(p) => {
                let v = values
                    .get(&p)
                    .ok_or_else(|| PatternError::Missing(p.clone()))?;
                check_value(&p, v, out.is_empty())?;
                out.push_str(v);
            }
        }
    }
    Ok(out)
}

/// Expands the placeholders that have values and keeps the others (and literal braces) as
/// pattern text, for a later stage to finish: the GCS fills in what it knows, the CTS or the
/// wrapper the rest.
pub fn expand_partial(pattern: &str, values: &Values) -> Result<String, PatternError> {
    let mut out = String::new();
    for seg in parse(pattern)? {
        match seg {
            Segment::Literal(l) => out.push_str(&escape_literal(&l)),
            Segment::Placeholder(p) => match values.get(&p) {
                Some(v) => {
                    check_value(&p, v, out.is_empty())?;
                    out.push_str(&escape_literal(v));
                }
                None => {
                    out.push('{');
                    out.push_str(&p);
                    out.push('}');
                }
            },
        }
    }
    Ok(out)
}

/// Expands a list of patterns with [`expand_partial`].
pub fn expand_all_partial(
    patterns: &[String],
    values: &Values,
) -> Result<Vec<String>, PatternError> {
    patterns.iter().map(|p| expand_partial(p, values)).collect()
}

/// Expands a list of patterns with [`expand`].
pub fn expand_all(patterns: &[String], values: &Values) -> Result<Vec<String>, PatternError> {
    patterns.iter().map(|p| expand(p, values)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_known_placeholders_and_escapes() {
        let v = Values::new().set("GID", "job-1").set("CTS_NAME", "ck{7}");
        assert_eq!(expand("--gid={GID}", &v).unwrap(), "--gid=job-1");
        assert_eq!(
            expand("{{literal}} {CTS_NAME}", &v).unwrap(),
            "{literal} ck{7}"
        );
        assert_eq!(expand("plain", &v).unwrap(), "plain");
    }

    #[test]
    fn refuses_unknown_unbalanced_and_missing() {
        assert_eq!(parse("{GIDD}"), Err(PatternError::Unknown("GIDD".into())));
        assert_eq!(parse("a{GID"), Err(PatternError::Unclosed(1)));
        assert_eq!(parse("a}b"), Err(PatternError::Unmatched(1)));
        assert_eq!(
            expand("{CTS_URL}", &Values::new()),
            Err(PatternError::Missing("CTS_URL".into()))
        );
        let msg = PatternError::Unknown("X".into()).to_string();
        assert!(msg.contains("{GID}"), "{msg}");
    }

    #[test]
    fn values_that_could_inject_are_refused() {
        for gid in [
            "a b",
            "x;reboot",
            "$(id)",
            "../../etc/passwd",
            "-rf",
            "--all",
        ] {
            let v = Values::new().set("GID", gid);
            for pattern in ["{GID}", "--job={GID}", "/ck/{GID}.img"] {
                let e = expand(pattern, &v).unwrap_err();
                assert!(
                    matches!(e, PatternError::BadValue { .. }),
                    "{gid:?} in {pattern}: {e}"
                );
                assert!(e.to_string().contains("A-Z a-z 0-9"), "{e}");
                assert!(expand_partial(pattern, &v).is_err());
            }
        }
        let v = Values::new()
            .set("IMAGE_ID", "-x")
            .set("CHECKPOINT_DIR", "-/ck");
        assert!(expand("{IMAGE_ID}", &v).is_err());
        // Any value that would begin an argument with '-' reads as an option.
        let e = expand("{CHECKPOINT_DIR}/x", &v).unwrap_err();
        assert!(e.to_string().contains("read as an option"), "{e}");
        assert_eq!(expand("--dir={CHECKPOINT_DIR}", &v).unwrap(), "--dir=-/ck");
        let v = Values::new().set("GID", "slurm:42@c-1");
        assert_eq!(expand("--gid={GID}", &v).unwrap(), "--gid=slurm:42@c-1");
    }

    #[test]
    fn partial_expansion_can_be_finished_later() {
        let first = Values::new().set("GID", "g-1");
        let partial = expand_partial("--gid={GID} --dir={CHECKPOINT_DIR} {{x}}", &first).unwrap();
        assert_eq!(partial, "--gid=g-1 --dir={CHECKPOINT_DIR} {{x}}");
        let done = expand(&partial, &Values::new().set("CHECKPOINT_DIR", "/ck")).unwrap();
        assert_eq!(done, "--gid=g-1 --dir=/ck {x}");
        let braces = Values::new().set("CTS_NAME", "n{1}");
        let partial = expand_partial("{CTS_NAME}", &braces).unwrap();
        assert_eq!(expand(&partial, &Values::new()).unwrap(), "n{1}");
    }
}
