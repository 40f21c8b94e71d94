//! Prometheus metrics, all under the `dynamodb_stream_consumer_` prefix.
//!
//! Labels are bounded: table, event name, error kind, state, lease change. Never a shard id (shards
//! roll over, and a label per shard would grow without bound); per-shard detail belongs in `/status`.
//!
//! Every series whose label values are known in advance (each configured table times the fixed kinds
//! below) is exported from the start with the value 0 ([`Metrics::init_tables`]): a counter that only
//! appears at its first increment hides that increment from `rate()` and `increase()`, and a dashboard
//! or alert rule would query a name that does not exist yet.
//!
//! Lag is kept per shard as the creation time of the newest record read while behind, and turned into
//! seconds when scraped, so it keeps growing while a shard's records wait (NATS down, publishes
//! failing) instead of freezing at the value of the last read.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const PREFIX: &str = "dynamodb_stream_consumer";

/// `event_name` values: DynamoDB Streams' three record kinds.
pub const EVENT_NAMES: [&str; 3] = ["INSERT", "MODIFY", "REMOVE"];
/// `kind` values of `publish_errors_total` (`src/publish/mod.rs`, `Publisher::failure`).
/// `disconnected` and `lease_lost` are batches the service stopped itself (`publish::DISCONNECTED`,
/// `publish::LEASE_LOST`).
pub const PUBLISH_ERROR_KINDS: [&str; 8] = [
    "timed_out",
    "stream_not_found",
    "broken_pipe",
    "max_ack_pending",
    "max_payload_exceeded",
    "disconnected",
    "lease_lost",
    "other",
];
/// `kind` values of `get_records_errors_total` (`ReadError::kind`).
pub const READ_ERROR_KINDS: [&str; 6] = ["iterator_expired", "trimmed", "throttled", "not_found", "transient", "other"];
/// `kind` values of `table_errors_total` beside the read-error kinds (`TableError::kind`).
pub const TABLE_ERROR_KINDS: [&str; 3] = ["missing", "no_stream", "keys_only"];
/// `state` values of `shards_known` (`src/fleet.rs`).
pub const SHARD_STATES: [&str; 3] = ["reading", "waiting_for_parent", "finished"];
/// `change` values of `lease_changes_total`. `lost` is a lease the table names another owner for
/// (stolen); `expired` one this replica could not renew in time.
pub const LEASE_CHANGES: [&str; 6] = ["acquired", "handed_over", "released", "expired", "lost", "finished"];

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub records_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub publish_fences: IntCounter,
    pub duplicate_publishes: IntCounterVec,
    pub oversize_events: IntCounterVec,
    pub unrepresentable_records: IntCounterVec,
    pub get_records_calls: IntCounterVec,
    pub get_records_errors: IntCounterVec,
    pub records_per_get_records: HistogramVec,
    pub trimmed_data_gaps: IntCounterVec,
    pub checkpoints_written: IntCounterVec,
    pub checkpoint_conflicts: IntCounterVec,
    pub table_errors: IntCounterVec,
    pub shards_known: IntGaugeVec,
    pub table_unreadable: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub shard_readers: IntGaugeVec,
    pub publish_ack_seconds: HistogramVec,
    pub nats_connected: IntGauge,
    pub ready: IntGauge,
    pub leases_held: IntGauge,
    pub replicas_live: IntGauge,
    pub lease_changes: IntCounterVec,
    /// The stream's duplicate window as found at start-up (`crate::nats::report_duplicate_window`).
    pub stream_duplicate_window: Gauge,
    /// 1 when that window is longer than a crash takeover (lease TTL + one renew interval), else 0.
    pub duplicate_window_covers_takeover: IntGauge,
    /// Per table, the shards being read here, each with the creation time (Unix seconds) of the newest
    /// record read while behind, `None` once a read came back empty (caught up).
    shard_lags: Mutex<HashMap<String, HashMap<String, Option<f64>>>>,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, name: &str, metric: M) -> M {
    registry.register(Box::new(metric.clone())).unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, name, metric)
}

fn counter_plain(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::with_opts(Opts::new(format!("{PREFIX}_{name}"), help))
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, name, metric)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, name, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(format!("{PREFIX}_{name}"), help)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, name, metric)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(buckets), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    register(registry, name, metric)
}

/// The NATS connection gauge. Process-wide because the NATS client's event callback is built in
/// [`crate::nats::connect`], before and apart from any [`Metrics`]; every registry exports this gauge.
pub fn nats_connection() -> &'static IntGauge {
    static GAUGE: LazyLock<IntGauge> = LazyLock::new(|| {
        IntGauge::new(format!("{PREFIX}_nats_connected"), "1 while connected to NATS")
            .unwrap_or_else(|err| panic!("nats_connected: {err}"))
    });
    &GAUGE
}

/// Seconds behind at `now` for a shard whose newest record read was created at `behind_since`
/// (`None`: its last read came back empty, so it is caught up).
fn lag_at(now: f64, behind_since: Option<f64>) -> f64 {
    behind_since.map_or(0.0, |since| (now - since).max(0.0))
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

impl Metrics {
    /// Builds and registers every metric. The names and labels are constants of this file, so a
    /// failure here is a programming error caught by the first test that starts the service.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let lag_seconds = GaugeVec::new(
            Opts::new(
                format!("{PREFIX}_lag_seconds"),
                "Per table, the largest age of the newest record read from a shard that is not caught up \
                 (from ApproximateCreationDateTime, growing while its records wait); 0 when caught up",
            ),
            &["table"],
        )
        .unwrap_or_else(|err| panic!("lag_seconds: {err}"));
        let build_info = gauge_vec(r, "build_info", "Always 1; labels name the build", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let lease_changes = counter(
            r,
            "lease_changes_total",
            "Lease changes at this replica: acquired, handed_over, released, expired, lost (taken by another \
             replica), finished",
            &["change"],
        );
        for change in LEASE_CHANGES {
            lease_changes.with_label_values(&[change]);
        }

        Metrics {
            records_published: counter(
                r,
                "records_published_total",
                "Records published and acknowledged",
                &["table", "event_name"],
            ),
            duplicate_publishes: counter(
                r,
                "duplicate_publishes_total",
                "Publishes JetStream acknowledged as duplicates (a record re-read after a restart or retry)",
                &["table"],
            ),
            publish_errors: counter(
                r,
                "publish_errors_total",
                "Failed or timed-out JetStream publishes (retried)",
                &["table", "kind"],
            ),
            publish_fences: counter_plain(
                r,
                "publish_fences_total",
                "Publish connections dropped with what they still held: a shard's lease was lost while its publishes were unacknowledged",
            ),
            oversize_events: counter(
                r,
                "oversize_events_total",
                "Records published as reduced events because they exceed the max payload",
                &["table"],
            ),
            unrepresentable_records: counter(
                r,
                "unrepresentable_records_total",
                "Records with values that could not be converted exactly (published with what could be)",
                &["table"],
            ),
            get_records_calls: counter(r, "get_records_calls_total", "GetRecords calls", &["table"]),
            get_records_errors: counter(
                r,
                "get_records_errors_total",
                "Errors from DynamoDB Streams calls, by kind",
                &["table", "kind"],
            ),
            records_per_get_records: histogram(
                r,
                "records_per_get_records",
                "Records returned per GetRecords call",
                &["table"],
                vec![0.0, 1.0, 10.0, 100.0, 500.0, 999.0, 1000.0],
            ),
            trimmed_data_gaps: counter(
                r,
                "trimmed_data_gaps_total",
                "Checkpoints older than the stream's retention: records were lost before they could be read",
                &["table"],
            ),
            checkpoints_written: counter(r, "checkpoints_written_total", "Checkpoint writes", &["table"]),
            checkpoint_conflicts: counter(
                r,
                "checkpoint_conflicts_total",
                "Checkpoint writes refused because another writer moved the key",
                &["table"],
            ),
            table_errors: counter(
                r,
                "table_errors_total",
                "Tables that could not be read (missing, no stream, KEYS_ONLY view, or the call failed)",
                &["table", "kind"],
            ),
            shards_known: gauge_vec(
                r,
                "shards_known",
                "Shards known per table, by state (the fleet's shared topology as this replica read it)",
                &["table", "state"],
            ),
            table_unreadable: gauge_vec(
                r,
                "table_unreadable",
                "1 while a configured table cannot be read for a reason of the service's own (reason: value_too_large); /readyz answers 503 meanwhile",
                &["table", "reason"],
            ),
            lag_seconds: register(r, "lag_seconds", lag_seconds),
            shard_readers: gauge_vec(
                r,
                "shard_readers",
                "Shards of the table this replica is reading now (one reader per held lease)",
                &["table"],
            ),
            publish_ack_seconds: histogram(
                r,
                "publish_ack_seconds",
                "Time from a publish to its JetStream ack",
                &["table"],
                prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap_or_default(),
            ),
            nats_connected: register(r, "nats_connected", nats_connection().clone()),
            ready: gauge(r, "ready", "1 while GET /readyz answers 200 (serving, NATS connected, lease table readable)"),
            leases_held: gauge(r, "leases_held", "Shard leases this replica holds"),
            replicas_live: gauge(r, "replicas_live", "Live replicas with the same table list, this one included"),
            lease_changes,
            stream_duplicate_window: register(
                r,
                "stream_duplicate_window_seconds",
                Gauge::new(
                    format!("{PREFIX}_stream_duplicate_window_seconds"),
                    "The JetStream stream's duplicate window, read at start-up: re-publishes of a record are \
                     dropped only within it",
                )
                .unwrap_or_else(|err| panic!("stream_duplicate_window_seconds: {err}")),
            ),
            duplicate_window_covers_takeover: gauge(
                r,
                "duplicate_window_covers_takeover",
                "1 when the stream's duplicate window is longer than LEASE_TTL_SEC + one lease renew interval, so \
                 records re-published after a crash takeover are deduplicated; 0 when they may be stored twice \
                 (set at start-up)",
            ),
            shard_lags: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Exports every series of `tables` with 0 (see the module comment).
    pub fn init_tables(&self, tables: &[String]) {
        for table in tables {
            let t = table.as_str();
            for event_name in EVENT_NAMES {
                self.records_published.with_label_values(&[t, event_name]);
            }
            for kind in PUBLISH_ERROR_KINDS {
                self.publish_errors.with_label_values(&[t, kind]);
            }
            for kind in READ_ERROR_KINDS {
                self.get_records_errors.with_label_values(&[t, kind]);
            }
            for kind in TABLE_ERROR_KINDS.into_iter().chain(READ_ERROR_KINDS) {
                self.table_errors.with_label_values(&[t, kind]);
            }
            for state in SHARD_STATES {
                self.shards_known.with_label_values(&[t, state]);
            }
            for reason in crate::status::UNREADABLE_REASONS {
                self.table_unreadable.with_label_values(&[t, reason]);
            }
            for counter in [
                &self.duplicate_publishes,
                &self.oversize_events,
                &self.unrepresentable_records,
                &self.get_records_calls,
                &self.trimmed_data_gaps,
                &self.checkpoints_written,
                &self.checkpoint_conflicts,
            ] {
                counter.with_label_values(&[t]);
            }
            for histogram in [&self.records_per_get_records, &self.publish_ack_seconds] {
                histogram.with_label_values(&[t]);
            }
            if let Ok(mut lags) = self.shard_lags.lock() {
                lags.entry(table.clone()).or_default();
            }
        }
        self.refresh_lags();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.refresh_lags();
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// A shard's reader reports its lag after a read: `Some(seconds)` is the age of the newest record
    /// read (0 when the read came back empty: caught up); `None` when the reader ended.
    pub fn set_shard_lag(&self, table: &str, shard_id: &str, lag: Option<f64>) {
        let now = now_secs();
        if let Ok(mut lags) = self.shard_lags.lock() {
            let shards = lags.entry(table.to_owned()).or_default();
            match lag {
                Some(lag) => shards.insert(shard_id.to_owned(), (lag > 0.0).then_some(now - lag)),
                None => shards.remove(shard_id),
            };
        }
        self.refresh_lags();
    }

    /// Sets each table's lag (the largest of its shards', as of now) and reader count.
    fn refresh_lags(&self) {
        let now = now_secs();
        let Ok(lags) = self.shard_lags.lock() else { return };
        for (table, shards) in lags.iter() {
            let max = shards.values().map(|since| lag_at(now, *since)).fold(0.0, f64::max);
            self.lag_seconds.with_label_values(&[table]).set(max);
            self.shard_readers.with_label_values(&[table]).set(shards.len() as i64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::api::TableError;
    use crate::source::error::ReadError;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_grows_while_behind() {
        assert_eq!(lag_at(100.0, None), 0.0);
        assert_eq!(lag_at(100.0, Some(90.0)), 10.0);
        assert_eq!(lag_at(130.0, Some(90.0)), 40.0);
        // A creation time ahead of this clock is no lag.
        assert_eq!(lag_at(100.0, Some(105.0)), 0.0);
    }

    #[test]
    fn a_table_reports_its_most_behind_shard_and_its_readers() {
        let metrics = Metrics::new();
        metrics.set_shard_lag("t", "a", Some(0.0));
        metrics.set_shard_lag("t", "b", Some(3600.0));
        let text = metrics.encode();
        let lag = sample(&text, "dynamodb_stream_consumer_lag_seconds{table=\"t\"}").unwrap();
        assert!((3600.0..3700.0).contains(&lag), "{text}");
        assert_eq!(sample(&text, "dynamodb_stream_consumer_shard_readers{table=\"t\"}"), Some(2.0), "{text}");

        metrics.set_shard_lag("t", "b", Some(0.0));
        metrics.set_shard_lag("t", "a", None);
        let text = metrics.encode();
        assert_eq!(sample(&text, "dynamodb_stream_consumer_lag_seconds{table=\"t\"}"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "dynamodb_stream_consumer_shard_readers{table=\"t\"}"), Some(1.0), "{text}");
    }

    #[test]
    fn known_series_are_exported_with_zero_before_anything_happens() {
        let metrics = Metrics::new();
        metrics.init_tables(&["orders".to_owned()]);
        let text = metrics.encode();
        for series in [
            "records_published_total{event_name=\"REMOVE\",table=\"orders\"}",
            "publish_errors_total{kind=\"timed_out\",table=\"orders\"}",
            "get_records_errors_total{kind=\"throttled\",table=\"orders\"}",
            "table_errors_total{kind=\"no_stream\",table=\"orders\"}",
            "trimmed_data_gaps_total{table=\"orders\"}",
            "checkpoint_conflicts_total{table=\"orders\"}",
            "publish_ack_seconds_count{table=\"orders\"}",
            "records_per_get_records_count{table=\"orders\"}",
            "lag_seconds{table=\"orders\"}",
            "shard_readers{table=\"orders\"}",
            "shards_known{state=\"waiting_for_parent\",table=\"orders\"}",
            "lease_changes_total{change=\"released\"}",
            "leases_held",
            "ready",
        ] {
            let series = format!("{PREFIX}_{series}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series} in:\n{text}");
        }
        let build = format!("{PREFIX}_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        assert_eq!(sample(&text, &build), Some(1.0), "{text}");
        assert!(text.contains(&format!("{PREFIX}_nats_connected ")), "{text}");
    }

    #[test]
    fn every_error_kind_has_its_series() {
        let read_errors = [
            ReadError::IteratorExpired,
            ReadError::Trimmed(String::new()),
            ReadError::Throttled(String::new()),
            ReadError::NotFound(String::new()),
            ReadError::Transient(String::new()),
            ReadError::Other(String::new()),
        ];
        for error in &read_errors {
            // Exhaustive: a new variant fails to compile here until it is listed above.
            match error {
                ReadError::IteratorExpired
                | ReadError::Trimmed(_)
                | ReadError::Throttled(_)
                | ReadError::NotFound(_)
                | ReadError::Transient(_)
                | ReadError::Other(_) => assert!(READ_ERROR_KINDS.contains(&error.kind()), "{error:?}"),
            }
        }
        for error in [TableError::Missing, TableError::NoStream, TableError::KeysOnly] {
            match error {
                TableError::Missing | TableError::NoStream | TableError::KeysOnly | TableError::Call(_) => {
                    assert!(TABLE_ERROR_KINDS.contains(&error.kind()), "{error:?}")
                }
            }
        }
    }
}
