//! `gcactl`: admin and broker command line for the Grid Checkpoint Service.
//!
//! Parses the command line, runs the command against the GCS JSON API, prints the result and
//! maps failures to the exit codes documented in `gcactl --help`.

mod cli;
mod commands;
mod pki;
mod table;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" too, printed to stdout with success.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(cli::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match commands::run(cli).await {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                // `gcactl job list | head`: the reader has gone away; nothing left to do.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gcactl: cannot write the output: {e}");
                    ExitCode::from(cli::EXIT_FAILURE)
                }
            }
        }
        Err(e) => {
            eprintln!("gcactl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
