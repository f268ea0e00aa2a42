//! Names that reach the file system, parsed once: an [`ImageId`] or a [`RelPath`] can only be
//! made by `parse`, which refuses anything that could leave its directory, so every store
//! operation that takes one is safe by its type.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::error::Error;

/// The longest image ID.
pub const MAX_ID_LEN: usize = 128;
/// The deepest file path inside an image (number of components).
pub const MAX_PATH_DEPTH: usize = 8;
const MAX_COMPONENT_LEN: usize = 255;
const MAX_REL_PATH_LEN: usize = 1024;

/// An image ID: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ImageId(String);

impl ImageId {
    /// The check every ID passes before it becomes part of a path.
    pub fn parse(id: &str) -> Result<Self, Error> {
        let ok = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(ImageId(id.to_string()))
        } else {
            Err(Error::InvalidId(format!(
                "invalid image ID {}: an image ID has 1 to {MAX_ID_LEN} characters among A-Z \
                 a-z 0-9 . _ - and does not start with '.'",
                shown(id)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The path of a file inside an image: relative, `/`-separated, at most 8 components, each
/// made of `A-Z a-z 0-9 . _ + -` and neither empty nor `.` nor `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RelPath(String);

impl RelPath {
    pub fn parse(rel: &str) -> Result<Self, Error> {
        let ok = !rel.is_empty()
            && rel.len() <= MAX_REL_PATH_LEN
            && rel.split('/').count() <= MAX_PATH_DEPTH
            && rel.split('/').all(valid_component);
        if ok {
            Ok(RelPath(rel.to_string()))
        } else {
            Err(Error::InvalidId(format!(
                "invalid file path {} in an image: a path is relative, has at most \
                 {MAX_PATH_DEPTH} '/'-separated components of A-Z a-z 0-9 . _ + - and no empty, \
                 '.' or '..' component",
                shown(rel)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_name {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<Path> for $t {
            fn as_ref(&self) -> &Path {
                Path::new(&self.0)
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}
string_name!(ImageId);
string_name!(RelPath);

/// One component of a [`RelPath`].
pub(crate) fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.len() <= MAX_COMPONENT_LEN
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

/// A name from outside, quoted and cut for a message.
pub(crate) fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    format!("{out:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_that_could_leave_their_directory_are_refused() {
        for bad in [
            "../x",
            "a/b",
            "",
            ".hidden",
            ".",
            "..",
            "a\0b",
            "a b",
            "é",
            &"x".repeat(200),
        ] {
            assert!(
                matches!(ImageId::parse(bad), Err(Error::InvalidId(_))),
                "{bad:?}"
            );
        }
        for good in ["a", "img-1.2_3", &"x".repeat(128), "A.b..c"] {
            assert_eq!(ImageId::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            "a/",
            "a\\b",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(
                matches!(RelPath::parse(bad), Err(Error::InvalidId(_))),
                "{bad:?}"
            );
        }
        for good in ["a", "x/y.img", "c++/.hidden", "a/b/c/d/e/f/g/h"] {
            assert_eq!(RelPath::parse(good).unwrap().to_string(), good);
        }
        let f = gca_protocol::Fault::from(ImageId::parse("../x").unwrap_err());
        assert_eq!(f.kind, gca_protocol::FaultKind::InvalidMessage);
        assert_eq!(f.code.as_deref(), Some("invalid-image-id"));
    }
}
