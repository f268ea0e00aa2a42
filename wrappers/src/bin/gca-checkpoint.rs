//! gca-checkpoint: see `gca_wrappers::checkpoint`.

fn main() {
    let args: gca_wrappers::cli::CheckpointArgs = gca_wrappers::cli::parse(std::env::args_os());
    std::process::exit(gca_wrappers::checkpoint::run(args));
}
