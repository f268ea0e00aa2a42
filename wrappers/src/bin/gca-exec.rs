//! gca-exec: see `gca_wrappers::exec` (and `gca_wrappers::isolate` for the namespace init it
//! also is).

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == gca_protocol::isolation::INIT_ARG)
    {
        gca_wrappers::isolate::init_main(argv);
    }
    let args: gca_wrappers::cli::ExecArgs = gca_wrappers::cli::parse(argv);
    std::process::exit(gca_wrappers::exec::run(args));
}
