//! Exit codes and failure classes, shared by both wrappers.
//!
//! The codes follow `sysexits.h` where one fits, so that a resource manager or broker can tell
//! "retry later" from "this will never work" without parsing messages:
//!
//! | code | class | meaning |
//! |---|---|---|
//! | 64 | usage | wrong command line |
//! | 65 | permanent | corrupt or tampered image, wrong CTS type, unknown GID or image, refused registration: retrying the same thing will fail again |
//! | 70 | internal | an unexpected failure (e.g. the core checkpointer is misconfigured) |
//! | 72 | environment | the resource lacks something the job needs (a file it had open is missing, another kernel, CRIU version or CPU: the image's restore facts): recover it elsewhere, restore the file, or relax the rule |
//! | 75 | temporary | the CTS or the GCS is unreachable, the job's PID is still in use: retry later |
//! | 126 | (gca-exec) | the job program is not executable |
//! | 127 | (gca-exec) | the job program was not found |
//!
//! Once the job runs, the wrappers end like the job: `gca-exec` *is* the job (exec), and
//! `gca-recover` exits with the job's exit status or dies of the signal that killed it.

use gca_protocol::{Fault, FaultKind};

pub const USAGE: i32 = 64;
pub const PERMANENT: i32 = 65;
pub const INTERNAL: i32 = 70;
pub const ENVIRONMENT: i32 = 72;
pub const TEMPORARY: i32 = 75;
pub const NOT_EXECUTABLE: i32 = 126;
pub const NOT_FOUND: i32 = 127;

/// The exit-code table above, for `--help`.
pub const HELP_TABLE: &str = "\
Exit codes (before the job runs):
   64  usage: wrong command line
   65  permanent: corrupt or tampered image, wrong CTS type, unknown GID or image,
       registration refused; retrying will not help
   70  internal: unexpected failure (e.g. a misconfigured core checkpointer)
   72  environment: the resource lacks something the job needs (a file it had open is
       missing, an older kernel, another CRIU version or CPU); restore the file, recover
       on another resource, or relax the rule in the CTS's [compatibility]
   75  temporary: CTS or GCS unreachable, the job's PID still in use; retry later
Once the job runs, the wrapper ends like the job: the job's exit status, or death by the
same signal.";

/// Why a wrapper gave up, by what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Usage,
    Permanent,
    Internal,
    Environment,
    Temporary,
}

impl Class {
    pub fn code(self) -> i32 {
        match self {
            Class::Usage => USAGE,
            Class::Permanent => PERMANENT,
            Class::Internal => INTERNAL,
            Class::Environment => ENVIRONMENT,
            Class::Temporary => TEMPORARY,
        }
    }

    /// The class of a fault from the CTS, the GCS or a core checkpointer.
    pub fn of_fault(f: &Fault) -> Class {
        match f.code.as_deref() {
            Some("pid-in-use" | "unreachable" | "timeout" | "store-full") => {
                return Class::Temporary
            }
            Some("file-missing" | "incompatible-resource") => return Class::Environment,
            Some("image-corrupt" | "unknown-image" | "unknown-gid" | "unknown-checkpoint") => {
                return Class::Permanent
            }
            Some("checkpointer-unavailable") => return Class::Internal,
            _ => {}
        }
        match f.kind {
            FaultKind::ServiceUnavailable => Class::Temporary,
            // Unknown GID or image, a conflict (another CTS type), refused access, a failed
            // restore: the same request fails the same way again.
            _ => Class::Permanent,
        }
    }
}

/// A failure with its class and a message that says what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: Class,
    pub message: String,
}

impl Failure {
    pub fn new(class: Class, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    /// `context: <the fault's message>`, classified by the fault.
    pub fn fault(context: impl std::fmt::Display, f: &Fault) -> Self {
        Self::new(Class::of_fault(f), format!("{context}: {}", f.message))
    }

    pub fn code(&self) -> i32 {
        self.class.code()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_map_to_classes() {
        let f = |kind, code: Option<&str>| {
            let mut f = Fault::new(kind, "x");
            f.code = code.map(str::to_string);
            Class::of_fault(&f)
        };
        assert_eq!(
            f(FaultKind::ServiceUnavailable, Some("pid-in-use")),
            Class::Temporary
        );
        assert_eq!(f(FaultKind::ServiceUnavailable, None), Class::Temporary);
        assert_eq!(
            f(FaultKind::OperationFailed, Some("image-corrupt")),
            Class::Permanent
        );
        assert_eq!(
            f(FaultKind::OperationFailed, Some("file-missing")),
            Class::Environment
        );
        assert_eq!(f(FaultKind::ResourceUnknown, None), Class::Permanent);
        assert_eq!(Class::Temporary.code(), 75);
        assert_eq!(Class::Environment.code(), 72);
        assert_eq!(Class::Permanent.code(), 65);
        assert_eq!(Class::Usage.code(), 64);
    }
}
