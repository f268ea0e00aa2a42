//! gca-vmm-exec: see `gca_wrappers::vmm`.

fn main() {
    let args: gca_wrappers::cli::VmmExecArgs = gca_wrappers::cli::parse(std::env::args_os());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            gca_wrappers::warn(
                "gca-vmm-exec",
                &format!("cannot start the async runtime: {e}"),
            );
            std::process::exit(gca_wrappers::exit::INTERNAL);
        }
    };
    let code = runtime.block_on(gca_wrappers::vmm::run_exec(args));
    std::process::exit(code);
}
