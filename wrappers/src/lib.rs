//! # gca-wrappers — execute- and recovery-job-wrappers (GCA paper 3.4)
//!
//! What the local resource manager runs instead of the job:
//!
//! - `gca-exec --gid GID --cts URL -- JOB [ARGS...]` ([`exec`]): registers GID ↔ its own PID
//!   at the CTS of this resource, then `exec()`s the job, which keeps that PID.
//! - `gca-recover --gid GID --image ID|latest --cts URL -- JOB [ARGS...]` ([`recover`]): gets
//!   the image (verified against the GCS's digest) into the local CTS's store, moves the
//!   job's routing here, restores the job as its own child, forwards signals to it and ends
//!   like it.
//!
//! - `gca-exec --recover-if-checkpointed ...` ([`resume`]): the self-recovering mode, one
//!   command line for the first start and every restart by the resource manager: recovers
//!   the job from its latest usable checkpoint if it has one, else executes it.
//!
//! - `gca-vmm-exec --gid GID --cts URL [--input DIR] [--output DIR] -- JOB [ARGS...]`
//!   ([`vmm`]): the execute wrapper of a VMM type (the paper's vmm-ready-job-executor): runs
//!   the job in a virtual machine; `gca-recover` on such a type is the vmm-ready-job-resumer.
//!
//! - `gca-checkpoint --gid GID --cts URL [--stop]` ([`checkpoint`]): the job's owner
//!   checkpoints their own job through the local socket (no certificate needed).
//!
//! The binaries are thin; the logic is here: [`cli`] (clap), [`cts_target`] (`--cts`),
//! [`exit`] (failure classes and exit codes), [`signals`] (forwarding, waiting, ending like
//! the job). Placeholders are expanded with `gca_protocol::placeholders`, the code the GCS
//! uses.

pub mod checkpoint;
pub mod cli;
pub mod cts_target;
pub mod exec;
pub mod exit;
pub mod isolate;
pub mod recover;
pub mod resume;
pub mod signals;
pub mod vmm;

/// `<wrapper>: <message>` on stderr.
pub fn warn(wrapper: &str, message: &str) {
    eprintln!("{wrapper}: {message}");
}
