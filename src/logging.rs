//! Log output: human lines or JSON on stderr, filtered by RUST_LOG or else by --log-level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{LogFormat, LogOptions};

pub fn init(options: &LogOptions) {
    let filter =
        EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&options.log_level)).unwrap_or_else(|e| {
            eprintln!("sesame: invalid --log-level '{}': {e}; using info", options.log_level);
            EnvFilter::new("info")
        });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match options.log_format {
        LogFormat::Human => builder.with_target(false).with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
