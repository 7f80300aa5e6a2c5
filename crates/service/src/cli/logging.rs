//! Log setup for the binary: `RUST_LOG`-style filtering, human or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `default` is the filter when RUST_LOG is unset.
pub fn init(default: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
