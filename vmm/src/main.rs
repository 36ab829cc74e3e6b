fn main() {
    // A panic is a bug in the VMM: report it in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        eprintln!("vmm: internal error (a bug): {message}{location}");
    }));
    std::process::exit(vmm::cli::main_with_args(std::env::args_os()));
}
