//! gca-checkpoint: the owner's checkpoint of their own job, through the local socket.

use crate::cli::CheckpointArgs;
use crate::cts_target;
use crate::exit::{self, Failure};

/// Checkpoints the job; returns the exit code.
pub fn run(args: CheckpointArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::warn(
                "gca-checkpoint",
                &format!("cannot start the async runtime: {e}"),
            );
            return exit::INTERNAL;
        }
    };
    match rt.block_on(checkpoint(&args)) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(f) => {
            crate::warn("gca-checkpoint", &f.to_string());
            f.code()
        }
    }
}

async fn checkpoint(args: &CheckpointArgs) -> Result<String, Failure> {
    let cts = cts_target::connect(&args.cts).await?;
    let record = cts
        .client
        .clone()
        .with_timeout(std::time::Duration::from_secs(3600))
        .checkpoint(&args.gid, args.stop)
        .await
        .map_err(|f| {
            Failure::fault(
                format!(
                    "CTS {:?} did not checkpoint job {:?}",
                    cts.info.name, args.gid
                ),
                &f,
            )
        })?;
    Ok(format!(
        "{} {}",
        record.id,
        record
            .sequence
            .map(|s| s.to_string())
            .unwrap_or_else(|| "queued".into())
    ))
}
