//! The one definition of what a GID and a checkpoint (image) ID may be made of.
//!
//! Brokers choose GIDs and CTSes choose checkpoint IDs, and both end up in places where
//! characters matter: command templates run as root (`{GID}`, `{IMAGE_ID}`), file names, URL
//! paths, logs and shell lines an operator copies. So they are restricted at every edge that
//! accepts one (the GCS, the CTS, placeholder expansion) to [`ALLOWED`]: letters, digits and
//! `. _ : @ + -`, not starting with `-` (it would read as an option) or `.` (a hidden or
//! relative file name), at most [`MAX_LEN`] bytes. Spaces, quotes, `;`, `$`, `/`, `\`, `%`,
//! `*` and every non-ASCII or control character are refused, and the error says what is
//! allowed.

/// The longest GID or checkpoint ID accepted, in bytes.
pub const MAX_LEN: usize = 256;

/// What an ID may hold, for messages.
pub const ALLOWED: &str =
    "1-256 characters among A-Z a-z 0-9 . _ : @ + -, not starting with - or .";

/// An ID that breaks the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {why}; a {what} is {ALLOWED}")]
pub struct InvalidId {
    pub what: String,
    pub value: String,
    pub why: String,
}

fn allowed_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '+' | '-')
}

/// Checks a GID, checkpoint ID or image ID (`what` names it in the error).
pub fn check(what: &str, value: &str) -> Result<(), InvalidId> {
    let bad = |why: String| InvalidId {
        what: what.to_string(),
        // Keep the echo short: the value may be anything a caller sent.
        value: value.chars().take(80).collect(),
        why,
    };
    if value.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if value.len() > MAX_LEN {
        return Err(bad(format!("it is {} bytes long", value.len())));
    }
    if let Some(c) = value.chars().find(|c| !allowed_char(*c)) {
        return Err(bad(format!("it holds {c:?}")));
    }
    if value.starts_with('-') {
        return Err(bad(
            "it starts with '-', which would read as an option".into()
        ));
    }
    if value.starts_with('.') {
        return Err(bad("it starts with '.'".into()));
    }
    Ok(())
}

/// Whether `value` is a valid GID or checkpoint ID.
pub fn is_valid(value: &str) -> bool {
    check("ID", value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_ids_in_use_and_refuses_what_could_inject() {
        for ok in [
            "job-1",
            "demo-1",
            "slurm:4711@cluster-a",
            "cts-a-20261122T101500Z-0123456789ab",
            "a.b_c+d",
            &"x".repeat(MAX_LEN),
        ] {
            assert_eq!(check("GID", ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("-rf", "would read as an option"),
            ("--job", "would read as an option"),
            (".hidden", "starts with '.'"),
            ("a b", "' '"),
            ("a;reboot", "';'"),
            ("$(id)", "'$'"),
            ("../etc", "'/'"),
            ("a\"b", "'\"'"),
            ("a'b", "'\\''"),
            ("a\nb", "'\\n'"),
            ("%41", "'%'"),
            ("é", "'é'"),
            (&"x".repeat(MAX_LEN + 1), "bytes long"),
        ] {
            let e = check("GID", bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(why), "{bad:?}: {msg}");
            assert!(msg.contains("A-Z a-z 0-9 . _ : @ + -"), "{msg}");
            assert!(msg.len() < 400, "{msg}");
        }
    }
}
