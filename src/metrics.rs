//! Prometheus metrics, all under the `dynamodb_stream_consumer_` prefix.
//!
//! Labels are bounded: table, event name, error kind, state. Never a shard id (shards roll over, and
//! a label per shard would grow without bound); per-shard detail belongs in `/status`.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "dynamodb_stream_consumer";

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    pub records_published: IntCounterVec,
    pub publish_errors: IntCounterVec,
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
    pub lag_seconds: GaugeVec,
    pub publish_ack_seconds: HistogramVec,
    pub nats_connected: IntGauge,
    pub leases_held: IntGauge,
    pub replicas_live: IntGauge,
    pub lease_changes: IntCounterVec,
    /// Per table, the lag of each shard being read; the gauge is the maximum.
    shard_lags: Mutex<HashMap<String, HashMap<String, f64>>>,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(format!("{PREFIX}_{name}"), help), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry.register(Box::new(metric.clone())).unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(format!("{PREFIX}_{name}"), help).buckets(buckets), labels)
        .unwrap_or_else(|err| panic!("metric {name} is malformed: {err}"));
    registry.register(Box::new(metric.clone())).unwrap_or_else(|err| panic!("metric {name} registered twice: {err}"));
    metric
}

impl Metrics {
    /// Builds and registers every metric. The names and labels are constants of this file, so a
    /// failure here is a programming error caught by the first test that starts the service.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let shards_known = IntGaugeVec::new(
            Opts::new(format!("{PREFIX}_shards_known"), "Shards known per table, by state"),
            &["table", "state"],
        )
        .unwrap_or_else(|err| panic!("shards_known: {err}"));
        let lag_seconds = GaugeVec::new(
            Opts::new(
                format!("{PREFIX}_lag_seconds"),
                "Per table, the largest age of the last record read (from ApproximateCreationDateTime); 0 when caught up",
            ),
            &["table"],
        )
        .unwrap_or_else(|err| panic!("lag_seconds: {err}"));
        let nats_connected = IntGauge::new(format!("{PREFIX}_nats_connected"), "1 while connected to NATS")
            .unwrap_or_else(|err| panic!("nats_connected: {err}"));
        let build_info = IntGaugeVec::new(
            Opts::new(format!("{PREFIX}_build_info"), "Always 1; labels name the build"),
            &["version"],
        )
        .unwrap_or_else(|err| panic!("build_info: {err}"));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for metric in [shards_known.clone(), build_info] {
            registry.register(Box::new(metric)).unwrap_or_else(|err| panic!("register: {err}"));
        }
        registry.register(Box::new(lag_seconds.clone())).unwrap_or_else(|err| panic!("register: {err}"));
        registry.register(Box::new(nats_connected.clone())).unwrap_or_else(|err| panic!("register: {err}"));
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(format!("{PREFIX}_{name}"), help).unwrap_or_else(|err| panic!("{name}: {err}"));
            registry.register(Box::new(metric.clone())).unwrap_or_else(|err| panic!("register: {err}"));
            metric
        };
        let leases_held = gauge("leases_held", "Shard leases this replica holds");
        let replicas_live = gauge("replicas_live", "Live replicas seen in the lease table, this one included");

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
                "Tables that could not be read (missing, no stream, KEYS_ONLY view)",
                &["table", "kind"],
            ),
            publish_ack_seconds: histogram(
                r,
                "publish_ack_seconds",
                "Time from a publish to its JetStream ack",
                &["table"],
                prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap_or_default(),
            ),
            lease_changes: counter(
                r,
                "lease_changes_total",
                "Lease changes at this replica: acquired, handed_over, expired, lost, finished",
                &["change"],
            ),
            shards_known,
            lag_seconds,
            nats_connected,
            leases_held,
            replicas_live,
            shard_lags: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Records a shard's lag (`None` when the shard stops being read) and updates its table's maximum.
    pub fn set_shard_lag(&self, table: &str, shard_id: &str, lag: Option<f64>) {
        let Ok(mut lags) = self.shard_lags.lock() else { return };
        let shards = lags.entry(table.to_owned()).or_default();
        match lag {
            Some(lag) => shards.insert(shard_id.to_owned(), lag.max(0.0)),
            None => shards.remove(shard_id),
        };
        let max = shards.values().copied().fold(0.0, f64::max);
        self.lag_seconds.with_label_values(&[table]).set(max);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
