//! Logging: `tracing` to stderr, as text or JSON (`LOG_FORMAT`), at info or debug (`DEBUG`).
//! `RUST_LOG` overrides the level filter when set.
//!
//! What is logged where: one line per lease change (the coordinator, with `replica` and `shard`), per
//! shard lifecycle step (reader started, iterator renewed, read to its end, reader ended: with `table`
//! and `shard_id`) and per failure; per call and per record only at debug. JSON lines carry the event's
//! fields at the top level beside `timestamp`, `level`, `target` and `message`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, debug: bool) {
    // async-nats logs every connection event and reconnection attempt at info; the service logs each
    // connection change once itself (`nats::connect`), so the client's own lines show only at debug.
    // At debug, the dependencies' own debug output (HTTP, TLS, every NATS request) stays at info.
    let default =
        if debug { "debug,aws=info,hyper=info,h2=info,rustls=info,async_nats=info" } else { "info,async_nats=warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
