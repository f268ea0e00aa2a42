//! Integration tests of the Grid Checkpoint Service: real servers on port 0, real PostgreSQL,
//! real HTTP, SOAP and JSON clients.

mod authorization;
mod checkpoints;
mod compatibility;
mod compose;
mod examples;
mod faults;
mod gcactl;
mod hostile;
mod job_keys;
mod locations;
mod node_soap;
mod notifications;
mod registry;
mod replicas;
mod retention;
mod wire;
mod wsrf;
