//! # gca-wrappers — execute- and recovery-job-wrappers
//!
//! Not built yet: `gca-exec` and `gca-recover` come with the job-wrapper issue. They will use
//! `gca_protocol::placeholders` for parameter expansion, the same code the GCS uses.
