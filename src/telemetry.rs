//! Logging: `tracing` to stderr, as text or JSON (`LOG_FORMAT`), at info or debug (`DEBUG`).
//! `RUST_LOG` overrides the level filter when set.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, debug: bool) {
    let default = if debug { "debug,aws=info,hyper=info,h2=info,rustls=info" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
