//! The job wrappers end to end: `gca-exec` and `gca-recover` as real processes, real CTS
//! servers (two of one type stand for two resources), a real GCS on PostgreSQL, real CRIU.

mod app;
mod chunks;
mod compat;
mod criu;
mod failures;
mod isolation;
mod resume;
mod tier;
mod vmm;
