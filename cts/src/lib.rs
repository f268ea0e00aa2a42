//! # cts — the Checkpoint Translation Service
//!
//! One per computing resource (GCA paper 3.3, 5.5): the driver of a local core checkpointer.
//! It keeps the jobs running here (registered by their wrappers over a local-only socket),
//! takes checkpoints on request from the GCS or periodically, names and stores the images,
//! serves them to other resources, and logs every checkpoint at the GCS.
//!
//! Layout, in reading order:
//! - [`driver`]: the [`driver::CoreCheckpointer`] trait and its implementations;
//! - [`store`]: the image store (manifests, atomic commits, streaming with ranges) and
//!   [`fetch`], which copies an image from another CTS and checks its digest.

pub mod driver;
pub mod fetch;
pub mod proc;
pub mod store;
