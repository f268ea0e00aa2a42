//! # gca-protocol
//!
//! Everything that crosses a process boundary in the Grid Checkpointing Architecture, shared
//! by the GCS, the CTS, the wrappers and `gcactl`:
//!
//! - [`xml`]: a namespace-aware XML tree (quick-xml) with source lines for error messages;
//! - [`soap`]: SOAP 1.1/1.2 envelopes with WS-Addressing 1.0 headers, faults;
//! - [`fault`]: typed faults ([`fault::FaultKind`]) mapped to HTTP, JSON and WS-BaseFaults;
//! - [`messages`] and [`ops`]: the message types and the operation table (one Rust type,
//!   two wire forms: JSON and XML);
//! - [`descriptor`]: CTS descriptor parsing and validation;
//! - [`placeholders`]: the one implementation of `{GID}`-style parameter patterns;
//! - [`ids`]: what a GID or checkpoint ID may be made of (one rule for every edge);
//! - [`transport`] and [`client`]: HTTP(S) listeners and clients on rustls;
//! - the CTS's own interfaces: [`local`] (the wrapper↔CTS API on its UNIX socket, with its
//!   client), [`images`] (the image endpoints other CTSes and the GCS call), [`cts_api`] (its
//!   status and JSON API) and [`driver_config`] (the core checkpointer configuration the
//!   local API hands the recovery wrapper);
//! - [`isolation`]: a job in its own namespaces and cgroup: the wrapper↔namespace-init
//!   messages, the note an isolated CRIU image carries, the isolation settings.

pub mod client;
pub mod cts_api;
pub mod descriptor;
pub mod destinations;
pub mod driver_config;
pub mod facts;
pub mod fault;
pub mod gate;
pub mod identity;
pub mod ids;
pub mod images;
pub mod isolation;
pub mod local;
pub mod messages;
pub mod ns;
pub mod ops;
pub mod placeholders;
pub mod request_log;
pub mod schemas;
pub mod server;
pub mod signature;
pub mod soap;
pub mod transport;
pub mod wsn;
pub mod wsrf;
pub mod xml;
pub mod xpath;

pub use fault::{Fault, FaultKind};
