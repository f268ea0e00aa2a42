//! gca-exec: see `gca_wrappers::exec`.

fn main() {
    let args: gca_wrappers::cli::ExecArgs = gca_wrappers::cli::parse(std::env::args_os());
    std::process::exit(gca_wrappers::exec::run(args));
}
