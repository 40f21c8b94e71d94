//! Logging: `tracing` to stdout, as JSON lines by default or text (`LOG_FORMAT`), at info or debug
//! (`DEBUG`). `RUST_LOG` overrides the level filter when set.
//!
//! The JSON lines are the original Go service's (its `slog` JSON handler, which log pipelines of the
//! deployment already parse): `time` (RFC 3339, UTC), `level` (`DEBUG`, `INFO`, `WARN`, `ERROR`),
//! `msg`, and at debug `source` (`file`, `line`); then the event's own fields at the top level and
//! `target` (the module that logged it). Text is for humans (the local demo uses it).
//!
//! What is logged where: one line per lease change (the coordinator, with `replica` and `shard`), per
//! shard lifecycle step (reader started, iterator renewed, read to its end, reader ended: with `table`
//! and `shard_id`) and per failure; per call and per record only at debug.

use std::fmt;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

pub fn init(format: LogFormat, debug: bool) {
    // async-nats logs every connection event and reconnection attempt at info; the service logs each
    // connection change once itself (`nats::connect`), so the client's own lines show only at debug.
    // At debug, the dependencies' own debug output (HTTP, TLS, every NATS request) stays at info.
    let default =
        if debug { "debug,aws=info,hyper=info,h2=info,rustls=info,async_nats=info" } else { "info,async_nats=warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder.event_format(SlogJson { source: debug }).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

/// One JSON object per event, with the keys of Go's `slog` JSON handler first.
struct SlogJson {
    /// Adds `source` (slog's `AddSource`, which the original turns on with `-d`).
    source: bool,
}

impl<S, N> FormatEvent<S, N> for SlogJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let metadata = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let time = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap_or_default();
        // slog's order: time, level, msg, source; then the event's fields, then `target`.
        let mut entries: Vec<(String, Value)> = vec![
            ("time".to_owned(), Value::String(time)),
            ("level".to_owned(), Value::String(level(metadata.level()).to_owned())),
            ("msg".to_owned(), Value::String(fields.message.unwrap_or_default())),
        ];
        if self.source {
            entries
                .push(("source".to_owned(), serde_json::json!({ "file": metadata.file(), "line": metadata.line() })));
        }
        entries.extend(fields.others);
        entries.push(("target".to_owned(), Value::String(metadata.target().to_owned())));
        writer.write_char('{')?;
        let mut written: Vec<&str> = Vec::with_capacity(entries.len());
        for (name, value) in &entries {
            // A field named like one of slog's keys keeps the first (slog's) value.
            if written.contains(&name.as_str()) {
                continue;
            }
            if !written.is_empty() {
                writer.write_char(',')?;
            }
            let name_json = serde_json::to_string(name).map_err(|_| fmt::Error)?;
            let value_json = serde_json::to_string(value).map_err(|_| fmt::Error)?;
            write!(writer, "{name_json}:{value_json}")?;
            written.push(name);
        }
        writeln!(writer, "}}")
    }
}

/// slog's level names.
fn level(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// An event's message and fields, in the order they were recorded.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    others: Vec<(String, Value)>,
}

impl Fields {
    fn add(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("message", Value::String(text)) => self.message = Some(text),
            (name, value) => self.others.push((name.to_owned(), value)),
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.add(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.add(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.add(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.add(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.add(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn logged(source: bool, log: impl FnOnce()) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .event_format(SlogJson { source })
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_carry_slogs_keys_first_then_the_fields() {
        let line = logged(false, || tracing::warn!(table = "orders", shards = 3u64, ok = true, "lease \"lost\""));
        assert!(line.starts_with(r#"{"time":""#), "{line}");
        let tail = &line[line.find(r#","level""#).unwrap() + 1..];
        assert_eq!(
            tail,
            "\"level\":\"WARN\",\"msg\":\"lease \\\"lost\\\"\",\"table\":\"orders\",\"shards\":3,\"ok\":true,\"target\":\"dynamodb_stream_consumer::telemetry::tests\"}\n"
        );
        let json: Value = serde_json::from_str(&line).unwrap();
        assert!(json["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn debug_lines_carry_their_source() {
        let line = logged(true, || tracing::debug!(error = %io::Error::other("boom"), "call failed"));
        let json: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["level"], "DEBUG");
        assert_eq!(json["error"], "boom");
        assert_eq!(json["source"]["file"], "src/telemetry.rs");
        assert!(json["source"]["line"].as_u64().is_some());
    }
}
