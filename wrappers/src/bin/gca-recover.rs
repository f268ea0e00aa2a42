//! gca-recover: see `gca_wrappers::recover`.

fn main() {
    let args: gca_wrappers::cli::RecoverArgs = gca_wrappers::cli::parse(std::env::args_os());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            gca_wrappers::warn(
                "gca-recover",
                &format!("cannot start the async runtime: {e}"),
            );
            std::process::exit(gca_wrappers::exit::INTERNAL);
        }
    };
    let failure = runtime.block_on(gca_wrappers::recover::run(args));
    gca_wrappers::warn("gca-recover", &failure.message);
    std::process::exit(failure.code());
}
