//! # gca-store — the image store of a CTS
//!
//! One directory per checkpoint image with a manifest, committed atomically; the verified
//! copy of an image from another CTS; the verified copy of one into its owner's directory;
//! and the HTTP endpoints other CTSes and the GCS call. In reading order:
//!
//! - [`names`]: [`ImageId`] and [`RelPath`], the only names that reach the file system;
//! - [`manifest`]: the `manifest.json` of an image ([`Manifest`], [`ImageMeta`]) and its
//!   digest, the image's identity;
//! - [`chunks`]: chunk names, the backend trait, the cut (CRIU's page files along their
//!   pagemap, `criu_pages`; hashed while CRIU writes them, `early_hash`);
//!   [`local_chunks`]: chunks in packs on a file system;
//! - [`store`]: the store ([`ImageStore`]: open, list, read, verify, delete) and
//!   [`staging`]: an image being written, committed in one rename;
//! - [`fetch`]: a resumable, verified copy from another CTS;
//! - [`export`]: a copy into the owner's directory, through descriptors only (a retention
//!   policy's "keep");
//! - [`http`]: the image endpoints (`/images` on the CTS's public port; their requests and
//!   answers are `gca_protocol::images`);
//! - [`error`]: the one error type, mapped to faults and HTTP answers in one place.

pub mod chunks;
mod criu_pages;
mod early_hash;
pub mod error;
pub mod export;
pub mod fetch;
pub mod http;
pub mod local_chunks;
pub mod manifest;
pub mod names;
pub mod staging;
pub mod store;
mod writeback;

pub use chunks::{ChunkBackend, ChunkId, ChunkRef, Chunks};
pub use error::{Error, Result};
pub use local_chunks::{ChunkLocation, LocalChunks};
pub use manifest::{FileEntry, ImageMeta, Manifest};
pub use names::{ImageId, RelPath};
pub use staging::Staging;
pub use store::{read_image_offline, GcReport, ImageStore};
