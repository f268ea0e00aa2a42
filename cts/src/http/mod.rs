//! HTTP transport. Two routers:
//! - [`public`]: the CTS's network face: the SOAP endpoint the GCS calls, the images other
//!   resources fetch, status and health;
//! - [`local`]: the job registration API, served only on the local UNIX socket.

pub mod local;
pub mod public;
