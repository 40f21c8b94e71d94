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
//! `lag_seconds` and `shard_readers` are computed when scraped from the shard-progress registry
//! ([`ShardProgress`]) that `/status` lists too, so the two never disagree.

mod labels;

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use labels::{
    EventName, LeaseChange, Omitted, PublishErrorKind, ReadErrorKind, ShardState, TableErrorKind, TableSetRefresh,
    UnreadableReason,
};

use crate::status::ShardProgress;

const PREFIX: &str = "dynamodb_stream_consumer";

/// What a shard reader waits on (`reader_wait_seconds_total{on}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOn {
    /// A `GetRecords` page not prefetched in time (and the memory budget for it).
    Read,
    /// Publishes of a page until they are sent (the next page is pipelined behind them) or
    /// acknowledged, with the checkpoint written beside them.
    Publish,
    /// A checkpoint write nothing else goes on beside.
    Checkpoint,
    /// The wait between polls (`POLL_GAP_MS`, `POLL_INTERVAL_MS`, the idle backoff).
    Pause,
}

impl WaitOn {
    pub const ALL: [WaitOn; 4] = [WaitOn::Read, WaitOn::Publish, WaitOn::Checkpoint, WaitOn::Pause];

    pub fn as_str(self) -> &'static str {
        match self {
            WaitOn::Read => "read",
            WaitOn::Publish => "publish",
            WaitOn::Checkpoint => "checkpoint",
            WaitOn::Pause => "pause",
        }
    }
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub records_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
    pub publish_fences: IntCounter,
    pub duplicate_publishes: IntCounterVec,
    pub oversize_events: IntCounterVec,
    pub unrepresentable_records: IntCounterVec,
    /// Records not published because of their table's settings (`TABLES_FILE`), by table and reason
    /// (`filter`, `ttl_delete`): checkpointed past all the same.
    pub records_filtered: IntCounterVec,
    pub get_records_calls: IntCounterVec,
    pub get_records_errors: IntCounterVec,
    pub records_per_get_records: HistogramVec,
    pub trimmed_data_gaps: IntCounterVec,
    pub checkpoints_written: IntCounterVec,
    pub checkpoint_conflicts: IntCounterVec,
    /// Moves of a held shard's checkpoint by a writer outside the fleet (the Go service during an
    /// upgrade, an operator), by table.
    pub foreign_checkpoint_moves: IntCounterVec,
    /// Shards held here but left alone until such a writer has stopped, by table.
    pub foreign_writer_shards: IntGaugeVec,
    /// Seconds shard readers spent waiting, by table and by what they waited on ([`WaitOn`]): where
    /// a shard's time goes when it is not converting records.
    pub reader_wait_seconds: CounterVec,
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
    /// Backfill (issue 17, `docs/backfill.md`): snapshot rows published, by table.
    pub backfill_items: IntCounterVec,
    /// Read capacity units the backfill's `Scan` calls consumed, by table.
    pub backfill_read_units: CounterVec,
    /// `Scan` calls refused for throughput, by table (retried with backoff).
    pub backfill_throttles: IntCounterVec,
    /// Changes since the pin re-published by the hand-off, by table.
    pub backfill_replayed: IntCounterVec,
    /// Hand-offs that needed records already trimmed from the stream, by table: the backfill is
    /// `inexact`.
    pub backfill_handoff_lost: IntCounterVec,
    /// 1 for the phase each table's latest backfill is in (as this replica last read it), by table
    /// and phase.
    pub backfill_phase: IntGaugeVec,
    /// The stream's duplicate window as found at start-up (`crate::nats::report_duplicate_window`).
    pub stream_duplicate_window: Gauge,
    /// 1 when that window is longer than a crash takeover (lease TTL + one renew interval), else 0.
    pub duplicate_window_covers_takeover: IntGauge,
    /// The memory budget for pages (`crate::memory`), in bytes; 0 without a memory limit.
    pub memory_budget: IntGauge,
    /// The container's memory limit the budget derives from, in bytes; 0 without one.
    pub memory_limit: IntGauge,
    /// Bytes of the budget charged now (pages being read, in hand, prefetched, being published).
    pub memory_held: IntGauge,
    /// Times a reader waited for the memory budget before reading a page.
    pub memory_waits: IntCounter,
    /// Tables selected now (named, matched by a pattern or tagged), as this replica last read the set.
    pub tables_selected: IntGauge,
    /// Evaluations of the table patterns and tags from AWS made by this replica, by outcome.
    pub table_set_refreshes: IntCounterVec,
    /// `ListTagsOfResource` calls made by this replica.
    pub table_tag_queries: IntCounter,
    /// The shards being read here: `lag_seconds` and `shard_readers` are derived from it.
    progress: Arc<ShardProgress>,
    /// The configured tables: each has a `lag_seconds` and `shard_readers` series, 0 without readers.
    tables: Mutex<BTreeSet<String>>,
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
        for change in LeaseChange::ALL {
            lease_changes.with_label_values(&[change.as_str()]);
        }

        let metrics = Metrics {
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
                "Records over the max payload, published without their old image or without both images",
                &["table", "omitted"],
            ),
            unrepresentable_records: counter(
                r,
                "unrepresentable_records_total",
                "Records with values that could not be converted exactly (published with what could be)",
                &["table"],
            ),
            records_filtered: counter(
                r,
                "records_filtered_total",
                "Records not published because of their table's settings (TABLES_FILE: filter, ttl_deletes: drop), checkpointed past",
                &["table", "reason"],
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
            foreign_checkpoint_moves: counter(
                r,
                "foreign_checkpoint_moves_total",
                "Moves of a held shard's checkpoint by a writer outside the fleet (the Go service during an upgrade, an operator)",
                &["table"],
            ),
            foreign_writer_shards: gauge_vec(
                r,
                "foreign_writer_shards",
                "Shards held but not read until a writer outside the fleet stops moving their checkpoints",
                &["table"],
            ),
            reader_wait_seconds: register(
                r,
                "reader_wait_seconds_total",
                CounterVec::new(
                    Opts::new(
                        format!("{PREFIX}_reader_wait_seconds_total"),
                        "Seconds shard readers waited, by what on: read (a GetRecords page, and the memory budget \
                         for it, when not prefetched), publish (sends and acknowledgements, a checkpoint written beside them), checkpoint (a write \
                         nothing else goes on beside), pause (between polls)",
                    ),
                    &["table", "on"],
                )
                .unwrap_or_else(|err| panic!("metric reader_wait_seconds_total is malformed: {err}")),
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
            backfill_items: counter(r, "backfill_items_total", "Snapshot rows published by backfills", &["table"]),
            backfill_read_units: register(
                r,
                "backfill_read_units_total",
                CounterVec::new(
                    Opts::new(
                        format!("{PREFIX}_backfill_read_units_total"),
                        "Read capacity units consumed by backfill scans",
                    ),
                    &["table"],
                )
                .unwrap_or_else(|err| panic!("metric backfill_read_units_total is malformed: {err}")),
            ),
            backfill_throttles: counter(
                r,
                "backfill_throttles_total",
                "Backfill Scan calls refused for throughput (retried with backoff)",
                &["table"],
            ),
            backfill_replayed: counter(
                r,
                "backfill_replayed_total",
                "Changes since a backfill's pin re-published at its hand-off",
                &["table"],
            ),
            backfill_handoff_lost: counter(
                r,
                "backfill_handoff_lost_total",
                "Backfill hand-offs that needed stream records already trimmed (the backfill is inexact)",
                &["table"],
            ),
            backfill_phase: gauge_vec(
                r,
                "backfill_phase",
                "1 for the phase of each table's latest backfill (pinning, scanning, replaying, done, inexact)",
                &["table", "phase"],
            ),
            duplicate_window_covers_takeover: gauge(
                r,
                "duplicate_window_covers_takeover",
                "1 when the stream's duplicate window is longer than LEASE_TTL_SEC + one lease renew interval, so \
                 records re-published after a crash takeover are deduplicated; 0 when they may be stored twice \
                 (set at start-up)",
            ),
            memory_budget: gauge(
                r,
                "memory_budget_bytes",
                "The memory budget for pages of records across all shards (75 % of the memory limit less the \
                 process's fixed memory); 0 without a memory limit",
            ),
            memory_limit: gauge(
                r,
                "memory_limit_bytes",
                "The memory limit the budget derives from (MEMORY_LIMIT_MB or the cgroup's); 0 without one",
            ),
            memory_held: gauge(
                r,
                "memory_held_bytes",
                "Bytes of the memory budget held now: pages being read, converted batches in hand or prefetched, \
                 and their unacknowledged publishes",
            ),
            memory_waits: counter_plain(
                r,
                "memory_waits_total",
                "Times a reader waited for the memory budget before reading a page (the budget was spent)",
            ),
            tables_selected: gauge(
                r,
                "tables_selected",
                "Tables selected now: named in DYNAMODB_TABLES, matched by one of its patterns, or carrying \
                 DYNAMODB_TABLE_TAGS",
            ),
            table_set_refreshes: counter(
                r,
                "table_set_refreshes_total",
                "Evaluations of the table patterns and tags from AWS by this replica (one replica per \
                 TABLE_REFRESH_INTERVAL_SEC for the fleet), by outcome",
                &["outcome"],
            ),
            table_tag_queries: counter_plain(
                r,
                "table_tag_queries_total",
                "ListTagsOfResource calls by this replica (AWS allows about 10 a second per account)",
            ),
            progress: Arc::default(),
            tables: Mutex::default(),
            registry,
        };
        for outcome in TableSetRefresh::ALL {
            metrics.table_set_refreshes.with_label_values(&[outcome.as_str()]);
        }
        metrics
    }

    /// Exports every series of `tables` with 0 (see the module comment).
    pub fn init_tables(&self, tables: &[String]) {
        for table in tables {
            let t = table.as_str();
            for event_name in EventName::ALL {
                self.records_published.with_label_values(&[t, event_name.as_str()]);
            }
            for kind in PublishErrorKind::ALL {
                self.publish_errors.with_label_values(&[t, kind.as_str()]);
            }
            for kind in ReadErrorKind::ALL {
                self.get_records_errors.with_label_values(&[t, kind.as_str()]);
                self.table_errors.with_label_values(&[t, kind.as_str()]);
            }
            for kind in TableErrorKind::ALL {
                self.table_errors.with_label_values(&[t, kind.as_str()]);
            }
            self.backfill_items.with_label_values(&[t]);
            self.backfill_read_units.with_label_values(&[t]);
            self.backfill_throttles.with_label_values(&[t]);
            self.backfill_replayed.with_label_values(&[t]);
            self.backfill_handoff_lost.with_label_values(&[t]);
            self.foreign_writer_shards.with_label_values(&[t]);
            for on in WaitOn::ALL {
                self.reader_wait_seconds.with_label_values(&[t, on.as_str()]);
            }
            for phase in crate::pipeline::backfill::state::Phase::ALL {
                self.backfill_phase.with_label_values(&[t, phase.as_str()]);
            }
            for state in ShardState::ALL {
                self.shards_known.with_label_values(&[t, state.as_str()]);
            }
            for reason in UnreadableReason::ALL {
                self.table_unreadable.with_label_values(&[t, reason.as_str()]);
            }
            for omitted in Omitted::ALL {
                self.oversize_events.with_label_values(&[t, omitted.as_str()]);
            }
            for reason in crate::tables::Dropped::ALL {
                self.records_filtered.with_label_values(&[t, reason.as_str()]);
            }
            for counter in [
                &self.duplicate_publishes,
                &self.unrepresentable_records,
                &self.get_records_calls,
                &self.trimmed_data_gaps,
                &self.checkpoints_written,
                &self.checkpoint_conflicts,
                &self.foreign_checkpoint_moves,
            ] {
                counter.with_label_values(&[t]);
            }
            for histogram in [&self.records_per_get_records, &self.publish_ack_seconds] {
                histogram.with_label_values(&[t]);
            }
            if let Ok(mut known) = self.tables.lock() {
                known.insert(table.clone());
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

    /// The shard-progress registry these metrics derive lag and readers from.
    pub fn progress(&self) -> &Arc<ShardProgress> {
        &self.progress
    }

    /// Sets each table's lag (the largest of its shards', as of now) and reader count.
    fn refresh_lags(&self) {
        let by_table = self.progress.by_table();
        let Ok(tables) = self.tables.lock() else { return };
        for table in tables.iter().chain(by_table.keys().filter(|table| !tables.contains(*table))) {
            let progress = by_table.get(table).copied().unwrap_or_default();
            self.lag_seconds.with_label_values(&[table]).set(progress.lag_seconds);
            self.shard_readers.with_label_values(&[table]).set(progress.readers as i64);
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
    fn a_table_reports_its_most_behind_shard_and_its_readers() {
        let metrics = Metrics::new();
        let progress = metrics.progress();
        progress.started("t", "a", None);
        progress.read("t", "b", Some(crate::status::now_secs() - 3600.0));
        let text = metrics.encode();
        let lag = sample(&text, "dynamodb_stream_consumer_lag_seconds{table=\"t\"}").unwrap();
        assert!((3600.0..3700.0).contains(&lag), "{text}");
        assert_eq!(sample(&text, "dynamodb_stream_consumer_shard_readers{table=\"t\"}"), Some(2.0), "{text}");

        progress.read("t", "b", None);
        progress.ended("t", "a");
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
            "memory_budget_bytes",
            "memory_held_bytes",
            "memory_waits_total",
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
                | ReadError::Other(_) => assert!(ReadErrorKind::ALL.contains(&error.kind()), "{error:?}"),
            }
        }
        for error in [TableError::Missing, TableError::NoStream, TableError::KeysOnly] {
            match error {
                TableError::Missing | TableError::NoStream | TableError::KeysOnly | TableError::Call(_) => {
                    assert!(TableErrorKind::ALL.iter().any(|kind| kind.as_str() == error.kind()), "{error:?}")
                }
            }
        }
    }
}
