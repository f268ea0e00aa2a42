//! # cts — Checkpoint Translation Service
//!
//! Not built yet: the CTS daemon, its core-checkpointer drivers (CRIU, application-level,
//! command templates) and its image store come with the CTS issue. The GCS already speaks the
//! CTS side of the protocol (`gca_protocol::ops::CtsDoCheckpointOp`), and the integration
//! tests drive it with a small in-test CTS.
