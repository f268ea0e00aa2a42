//! Integration tests of the Checkpoint Translation Service: real CTS servers registered at a
//! real GCS (real PostgreSQL), real jobs, real CRIU, the application-level and the
//! command-template drivers.

mod app;
mod authorization;
mod bad_days;
mod criu;
mod export;
mod faults;
mod limits;
mod outbox;
mod retention;
mod template;
mod tier;
