//! What an operator sees, from the real binary against a real `nats-server` and the moto DynamoDB
//! Streams emulator: `/metrics` counting exactly what was written, provoked and leased, parsed whole as
//! Prometheus text; `/status`'s stable fields; the JSON and text log formats; and every metric that the
//! Grafana dashboard and the Prometheus alert rules use being exported by the running binary.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use prometheus_parse::{LineInfo, SampleType, Scrape, Value};
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use test_support::{Moto, NatsServer, ServiceProcess, fixtures, http_get, wait_for};

const PREFIX: &str = "dynamodb_stream_consumer_";
const STREAM: &str = "dynamodb_streams";
const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

fn deploy(path: &str) -> PathBuf {
    test_support::workspace_root().join("deploy").join(path)
}

/// The service's environment with its own log settings: `RUST_LOG` and `LOG_FORMAT` removed, so
/// `DEBUG` and the defaults (or `extra`) decide.
fn env(nats: &NatsServer, moto: &Moto, port: u16, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = fixtures::service_env(nats, moto, "orders,customers,nostream", port);
    env.retain(|(key, _)| key != "RUST_LOG" && key != "LOG_FORMAT");
    // Leases outlive the NATS outage this test provokes, so it measures the outage, not a failover.
    env.push(("LEASE_TTL_SEC".into(), "30".into()));
    env.extend(extra.iter().map(|(key, value)| (key.to_string(), value.to_string())));
    env
}

/// Writes inserts, modifies and removes to `table`; returns how many records of each event name.
async fn workload(ddb: &aws_sdk_dynamodb::Client, table: &str, tag: &str, items: usize) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for i in 0..items {
        let pk = format!("{tag}-{i}");
        let versions = if i % 2 == 0 { 2 } else { 1 };
        for version in 0..versions {
            let put = ddb.put_item().table_name(table).item("pk", Av::S(pk.clone()));
            put.item("v", Av::N(version.to_string())).send().await.unwrap();
            *counts.entry(if version == 0 { "INSERT" } else { "MODIFY" }.to_owned()).or_default() += 1.0;
        }
        if i % 3 == 0 {
            ddb.delete_item().table_name(table).key("pk", Av::S(pk)).send().await.unwrap();
            *counts.entry("REMOVE".to_owned()).or_default() += 1.0;
        }
    }
    counts
}

fn total(counts: &BTreeMap<String, f64>) -> f64 {
    counts.values().sum()
}

// ---------------------------------------------------------------------------------------------------
// The exposition, parsed.

/// A `/metrics` answer parsed with `prometheus-parse`, after a strict check of every line.
struct Exposition {
    text: String,
    scrape: Scrape,
    /// Family name → type, from the `# TYPE` lines.
    families: BTreeMap<String, SampleType>,
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name="value",…` with escaped quotes in values and an optional trailing comma; the label names.
fn label_names(block: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = block;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or_else(|| format!("no `=\"` in {rest:?}"))?;
        if !is_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        names.push(name);
        let mut escaped = false;
        let end = after
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map(|(index, _)| index)
            .ok_or_else(|| format!("unterminated value in {after:?}"))?;
        rest = &after[end + 1..];
        if !rest.is_empty() {
            rest = rest.strip_prefix(',').ok_or_else(|| format!("expected `,` before {rest:?}"))?;
        }
    }
    Ok(names)
}

fn parse_value(value: &str) -> Option<f64> {
    match value {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => value.parse().ok(),
    }
}

impl Exposition {
    /// Parses the whole text. `prometheus-parse` skips lines it cannot read, so each line is first
    /// classified with its own line parser and anything unreadable fails; then every sample must belong
    /// to a family declared (before it) with `# HELP` and `# TYPE`, counters must end in `_total`,
    /// histogram buckets must be cumulative up to `+Inf` = `_count`, and no label may name a shard.
    fn parse(text: &str) -> Exposition {
        let mut families = BTreeMap::new();
        let mut helped = BTreeSet::new();
        for line in text.lines() {
            match LineInfo::parse(line) {
                LineInfo::Ignored => panic!("not Prometheus text format: {line:?}"),
                LineInfo::Empty => {}
                LineInfo::Doc { metric_name, .. } => {
                    helped.insert(metric_name.to_owned());
                }
                LineInfo::Type { metric_name, metric_alias, sample_type } => {
                    assert!(line.starts_with("# TYPE "), "{line:?}");
                    let family = metric_alias.unwrap_or(metric_name);
                    assert!(helped.contains(&family), "TYPE without HELP before it: {line:?}");
                    assert!(families.insert(family, sample_type).is_none(), "family declared twice: {line:?}");
                }
                LineInfo::Sample { metric_name, labels, value, timestamp } => {
                    assert!(is_name(metric_name), "{line:?}");
                    assert!(parse_value(value).is_some(), "bad value in {line:?}");
                    assert!(timestamp.is_none(), "unexpected timestamp in {line:?}");
                    let labels =
                        label_names(labels.unwrap_or_default()).unwrap_or_else(|err| panic!("{err}: {line:?}"));
                    assert!(labels.iter().all(|label| !label.contains("shard")), "a shard label: {line:?}");
                    let family = Self::family_of(&families, metric_name)
                        .unwrap_or_else(|| panic!("sample before its family's TYPE: {line:?}"));
                    assert!(family.starts_with(PREFIX), "{line:?}");
                }
            }
        }
        for (family, kind) in &families {
            if *kind == SampleType::Counter {
                assert!(family.ends_with("_total"), "counter {family} is not named _total");
            }
        }
        let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap();
        let exposition = Exposition { text: text.to_owned(), scrape, families };
        for sample in &exposition.scrape.samples {
            if let Value::Histogram(buckets) = &sample.value {
                let counts: Vec<f64> = buckets.iter().map(|bucket| bucket.count).collect();
                assert!(counts.windows(2).all(|pair| pair[0] <= pair[1]), "not cumulative: {sample:?}");
                let last = buckets.last().unwrap();
                assert!(last.less_than.is_infinite(), "no +Inf bucket: {sample:?}");
                let labels: Vec<(&str, &str)> = sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let family = sample.metric.strip_prefix(PREFIX).unwrap();
                assert_eq!(last.count, exposition.value(&format!("{family}_count"), &labels), "{sample:?}");
            }
        }
        exposition
    }

    /// The family a sample name belongs to (a histogram's `_bucket`, `_sum` and `_count` included).
    fn family_of(families: &BTreeMap<String, SampleType>, name: &str) -> Option<String> {
        if families.contains_key(name) {
            return Some(name.to_owned());
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| families.get(*base) == Some(&SampleType::Histogram))
            .map(str::to_owned)
    }

    /// The sum of the samples `PREFIX + name` whose labels include `labels` (histograms: use the
    /// `_count` or `_sum` name).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let name = format!("{PREFIX}{name}");
        self.scrape
            .samples
            .iter()
            .filter(|sample| sample.metric == name)
            .filter(|sample| labels.iter().all(|(key, value)| sample.labels.get(key) == Some(*value)))
            .map(|sample| match sample.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                Value::Histogram(_) | Value::Summary(_) => panic!("{name} is a histogram: ask for _count or _sum"),
            })
            .sum()
    }

    /// Whether a series `PREFIX + name` with exactly these labels is exported.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let name = format!("{PREFIX}{name}");
        self.scrape.samples.iter().any(|sample| {
            sample.metric == name
                && sample.labels.len() == labels.len()
                && labels.iter().all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
    }
}

async fn scrape(port: u16) -> Option<Exposition> {
    match http_get(port, "/metrics").await {
        Ok((200, body)) => Some(Exposition::parse(&body)),
        _ => None,
    }
}

/// Scrapes `port` until `done` holds; panics with the last exposition after the deadline.
async fn scrape_until(port: u16, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let last = std::sync::Mutex::new(String::new());
    let (done, last_ref) = (&done, &last);
    let waited = tokio::time::timeout(
        DEADLINE,
        wait_for(what, DEADLINE + Duration::from_secs(1), move || async move {
            let exposition = scrape(port).await?;
            *last_ref.lock().unwrap() = exposition.text.clone();
            done(&exposition).then_some(exposition)
        }),
    )
    .await;
    waited.unwrap_or_else(|_| panic!("timed out waiting for {what}; last /metrics:\n{}", last.lock().unwrap()))
}

// ---------------------------------------------------------------------------------------------------
// Logs.

/// Every line of a JSON log (the default), each a JSON object with the original's `slog` keys first
/// (`time`, `level`, `msg`), then the event's fields and `target`.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|line| {
            let json: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line:?}"));
            assert!(line.starts_with(r#"{"time":""#) && line.contains(r#"","level":""#), "slog's order: {line}");
            for key in ["time", "level", "msg", "target"] {
                assert!(json[key].is_string(), "{key} missing in {line}");
            }
            let time = json["time"].as_str().unwrap();
            assert!(time.len() >= 20 && time.ends_with('Z') && &time[10..11] == "T", "RFC 3339 UTC: {time}");
            assert!(matches!(json["level"].as_str(), Some("DEBUG" | "INFO" | "WARN" | "ERROR")), "{line}");
            assert!(json.get("source").is_none(), "source only at debug: {line}");
            json
        })
        .collect()
}

/// The lines whose message starts with `message`.
fn lines_with<'a>(lines: &'a [serde_json::Value], message: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|line| line["msg"].as_str().is_some_and(|text| text.starts_with(message))).collect()
}

// ---------------------------------------------------------------------------------------------------
// The alert rules and the dashboard.

/// Metric names in a PromQL expression, read from its syntax tree.
struct Selectors(BTreeSet<String>);

impl ExprVisitor for Selectors {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let selector = match expr {
            Expr::VectorSelector(selector) => selector,
            Expr::MatrixSelector(matrix) => &matrix.vs,
            _ => return Ok(true),
        };
        let name = selector.name.clone().ok_or_else(|| format!("a selector without a metric name: {expr:?}"))?;
        self.0.insert(name);
        Ok(true)
    }
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let ast = parser::parse(expr).unwrap_or_else(|err| panic!("not PromQL ({err}): {expr}"));
    let mut names = Selectors(BTreeSet::new());
    walk_expr(&mut names, &ast).unwrap_or_else(|err| panic!("{err}"));
    names.0
}

/// Each alert rule's name and expression, after checking the rule's shape.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let rules: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        assert!(group["name"].as_str().is_some_and(|name| !name.is_empty()), "{group:?}");
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap_or_else(|| panic!("not an alert rule: {rule:?}")).to_owned();
            let expr = rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr")).to_owned();
            if let Some(period) = rule.get("for") {
                let period = period.as_str().unwrap_or_else(|| panic!("{name}: `for` is not a duration"));
                promql_parser::util::parse_duration(period).unwrap_or_else(|err| panic!("{name}: for {period}: {err}"));
            }
            let severity = rule["labels"]["severity"].as_str();
            assert!(matches!(severity, Some("warning" | "critical")), "{name}: severity {severity:?}");
            for annotation in ["summary", "description", "runbook"] {
                let text = rule["annotations"][annotation].as_str();
                assert!(text.is_some_and(|text| text.trim().len() > 10), "{name}: annotation {annotation}");
            }
            assert!(out.iter().all(|(other, _)| *other != name), "alert {name} defined twice");
            out.push((name, expr));
        }
    }
    out
}

/// Each dashboard query (panel targets and template variables) with what it belongs to, after checking
/// the panels' shape. Grafana's variables are replaced so that the query is plain PromQL.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string(), "dashboard uid and title");
    let variables: Vec<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(variables.contains(&"datasource") && variables.contains(&"table"), "{variables:?}");
    let plain = |query: &str| {
        let query = query.replace("$__rate_interval", "5m").replace("$table", ".*");
        assert!(!query.contains('$'), "unknown variable in {query}");
        query
    };

    let mut queries = Vec::new();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: panel id used twice");
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|key| grid[key].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the 24-column grid");
        for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
            assert!(cells.insert(cell), "{title} overlaps another panel");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        let ref_ids: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
        assert_eq!(ref_ids.len(), targets.len(), "{title}: refId used twice");
        for target in targets {
            queries.push((title.clone(), plain(target["expr"].as_str().unwrap())));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(query) = variable["query"]["query"].as_str() else { continue };
        // `label_values(metric, label)` is Grafana's, not PromQL: its metric is checked as a selector.
        let inner = query.strip_prefix("label_values(").and_then(|rest| rest.split_once(',')).unwrap().0;
        queries.push((format!("variable {}", variable["name"]), plain(inner.trim())));
    }
    queries
}

// ---------------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread")]
async fn metrics_status_and_logs_show_what_flowed_what_failed_and_where_the_leases_went() {
    let (mut nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    fixtures::create_table(&ddb, "customers", Some(StreamViewType::NewImage)).await;
    fixtures::create_table(&ddb, "nostream", None).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);

    let port_a = fixtures::http_port();
    // Logs as the original wrote them unless told otherwise: JSON lines on stdout.
    let env_a = env(&nats, &moto, port_a, &[("REPLICA_ID", "replica-a")]);
    let a = ServiceProcess::start_ready(binary(), &env_a, port_a, DEADLINE).await;

    // Records flow: every counter matches what was written, and lag returns to 0 once caught up.
    let orders = workload(&ddb, "orders", "o", 12).await;
    let customers = workload(&ddb, "customers", "c", 5).await;
    let written = total(&orders) + total(&customers);
    fixtures::wait_for_messages(&js, STREAM, written as u64, DEADLINE).await;
    let m = scrape_until(port_a, "everything published and caught up, two leases held", |m| {
        m.value("records_published_total", &[]) == written
            && m.value("lag_seconds", &[]) == 0.0
            && m.value("leases_held", &[]) == 2.0
            && m.value("checkpoints_written_total", &[("table", "customers")]) >= 1.0
    })
    .await;
    for (table, counts) in [("orders", &orders), ("customers", &customers)] {
        for event_name in ["INSERT", "MODIFY", "REMOVE"] {
            let want = counts.get(event_name).copied().unwrap_or_default();
            let got = m.value("records_published_total", &[("table", table), ("event_name", event_name)]);
            assert_eq!(got, want, "records_published_total{{{table}, {event_name}}}");
        }
        let t = [("table", table)];
        assert_eq!(m.value("publish_ack_seconds_count", &t), total(counts), "{table}: one ack timed per record");
        assert_eq!(m.value("records_per_get_records_sum", &t), total(counts), "{table}: records read");
        assert!(m.value("records_per_get_records_count", &t) >= 1.0, "{table}");
        assert!(m.value("get_records_calls_total", &t) >= m.value("records_per_get_records_count", &t));
        assert!(m.value("checkpoints_written_total", &t) >= 1.0, "{table}");
        assert!(m.has("lag_seconds", &t) && m.value("lag_seconds", &t) == 0.0, "{table}: caught up");
        assert_eq!(m.value("shard_readers", &t), 1.0, "{table}");
        assert_eq!(m.value("shards_known", &[("table", table), ("state", "reading")]), 1.0, "{table}");
    }
    // Provoked: a table without a stream, counted at every refresh; nothing else failed.
    assert!(m.value("table_errors_total", &[("table", "nostream"), ("kind", "no_stream")]) >= 1.0);
    assert_eq!(m.value("table_errors_total", &[("table", "orders")]), 0.0);
    assert!(m.has("table_errors_total", &[("table", "orders"), ("kind", "no_stream")]), "exported with 0");
    for zero in
        ["publish_errors_total", "duplicate_publishes_total", "trimmed_data_gaps_total", "checkpoint_conflicts_total"]
    {
        assert_eq!(m.value(zero, &[]), 0.0, "{zero}");
        assert!(
            m.has(zero, &[("table", "orders")]) || m.has(zero, &[("table", "orders"), ("kind", "other")]),
            "{zero}"
        );
    }
    assert_eq!(m.value("lease_changes_total", &[("change", "acquired")]), 2.0);
    for change in ["handed_over", "released", "expired", "lost", "finished"] {
        assert!(m.has("lease_changes_total", &[("change", change)]), "{change} exported");
        assert_eq!(m.value("lease_changes_total", &[("change", change)]), 0.0, "{change}");
    }
    assert_eq!(m.value("replicas_live", &[]), 1.0);
    assert_eq!(m.value("nats_connected", &[]), 1.0);
    assert_eq!(m.value("ready", &[]), 1.0);
    assert_eq!(m.value("build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    // `/status`: exactly the documented fields.
    let (_, body) = http_get(port_a, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys: BTreeSet<&str> = status.as_object().unwrap().keys().map(String::as_str).collect();
    let documented = [
        "replica_id",
        "serving",
        "nats_connected",
        "live_replicas",
        "lease_renewal",
        "leases",
        "shards",
        "tables",
        "tables_unreadable",
        "backfills",
        "memory",
        "table_settings",
    ];
    assert_eq!(keys, BTreeSet::from(documented));
    // Without TABLES_FILE every table has today's settings: none matched.
    for (_, settings) in status["table_settings"].as_object().unwrap() {
        assert_eq!(settings["matched"], serde_json::Value::Null, "{status}");
        assert_eq!(settings["ttl_deletes"], "publish", "{status}");
    }
    // Named tables are selected by name (issue 20), whether they can be read or not.
    let selected = status["tables"].as_object().unwrap();
    assert!(!selected.is_empty() && selected.values().all(|by| by == "name"), "{status}");
    assert!(selected.contains_key("orders") && selected.contains_key("customers"), "{status}");
    // The memory budget: its limit and budget are null without a memory limit (a CI container may
    // have one: then both are numbers).
    let memory = status["memory"].as_object().unwrap();
    let fields: BTreeSet<&str> = memory.keys().map(String::as_str).collect();
    let documented = ["limit_bytes", "limit_source", "fixed_bytes", "budget_bytes", "held_bytes", "waits"];
    assert_eq!(fields, BTreeSet::from(documented), "{status}");
    assert_eq!(memory["limit_bytes"].is_null(), memory["budget_bytes"].is_null(), "{status}");
    assert!(memory["held_bytes"].is_u64() && memory["waits"].is_u64(), "{status}");
    assert_eq!(status["backfills"], serde_json::json!({}), "no backfill requested");
    assert_eq!(status["lease_renewal"], "session", "no replica of the previous version here");
    assert_eq!(status["tables_unreadable"], serde_json::json!({}));
    assert_eq!(status["replica_id"], "replica-a");
    assert_eq!(status["serving"], true);
    assert_eq!(status["nats_connected"], true);
    assert_eq!(status["live_replicas"], 1);
    assert_eq!(status["leases"].as_array().unwrap().len(), 2, "{status}");
    let shards = status["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{status}");
    for shard in shards {
        let keys: BTreeSet<&str> = shard.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["table", "shard_id", "checkpoint", "last_publish", "lag_seconds"]));
        assert!(shard["checkpoint"].is_string() && shard["last_publish"].is_string(), "{shard}");
        assert_eq!(shard["lag_seconds"], 0.0, "{shard}");
    }

    // NATS goes away: the connection state follows, records read meanwhile wait, their lag grows and
    // the failed publishes are counted; once NATS is back everything is published once.
    nats.stop();
    scrape_until(port_a, "NATS disconnected and not ready", |m| {
        m.value("nats_connected", &[]) == 0.0 && m.value("ready", &[]) == 0.0
    })
    .await;
    assert_eq!(http_get(port_a, "/readyz").await.unwrap().0, 503);
    let late = workload(&ddb, "orders", "late", 3).await;
    let m = scrape_until(port_a, "lag growing while publishes fail", |m| {
        m.value("lag_seconds", &[("table", "orders")]) >= 1.5
            && m.value("publish_errors_total", &[("table", "orders")]) >= 1.0
    })
    .await;
    assert_eq!(m.value("lag_seconds", &[("table", "customers")]), 0.0, "customers got nothing new");
    let (_, body) = http_get(port_a, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let behind = status["shards"].as_array().unwrap().iter().find(|s| s["table"] == "orders").unwrap();
    assert!(behind["lag_seconds"].as_f64().unwrap() >= 1.5, "{status}");
    assert_eq!(status["nats_connected"], false);

    nats.restart().await;
    let written = written + total(&late);
    let m = scrape_until(port_a, "reconnected, everything published, caught up", |m| {
        m.value("nats_connected", &[]) == 1.0
            && m.value("ready", &[]) == 1.0
            && m.value("lag_seconds", &[]) == 0.0
            && m.value("records_published_total", &[]) + m.value("duplicate_publishes_total", &[]) == written
    })
    .await;
    // A publish that timed out may still have been stored: its retry is acknowledged as a duplicate.
    // Each record is acknowledged exactly once either way, and the stream holds each exactly once.
    assert_eq!(fixtures::wait_for_messages(&js, STREAM, written as u64, DEADLINE).await.len() as f64, written);
    assert!(m.value("publish_errors_total", &[("table", "orders")]) >= 1.0);
    assert_eq!(m.value("publish_errors_total", &[("table", "customers")]), 0.0);
    assert_eq!(m.value("lease_changes_total", &[("change", "expired")]), 0.0, "leases outlived the outage");

    // A second replica (text logs at debug level) joins: one lease is handed over and released.
    let port_b = fixtures::http_port();
    let env_b = env(&nats, &moto, port_b, &[("LOG_FORMAT", "text"), ("DEBUG", "true"), ("REPLICA_ID", "replica-b")]);
    let b = ServiceProcess::start_ready(binary(), &env_b, port_b, DEADLINE).await;
    let balanced = |m: &Exposition| m.value("leases_held", &[]) == 1.0 && m.value("replicas_live", &[]) == 2.0;
    let m = scrape_until(port_a, "replica-a down to one lease", balanced).await;
    assert_eq!(m.value("lease_changes_total", &[("change", "handed_over")]), 1.0);
    assert_eq!(m.value("lease_changes_total", &[("change", "released")]), 1.0);
    assert_eq!(m.value("shard_readers", &[]), 1.0);
    let m =
        scrape_until(port_b, "replica-b reading one shard", |m| balanced(m) && m.value("shard_readers", &[]) == 1.0)
            .await;
    assert_eq!(m.value("lease_changes_total", &[("change", "acquired")]), 1.0);
    assert_eq!(m.value("records_published_total", &[]), 0.0, "nothing new to publish");

    let log_b = b.stop_gracefully(Duration::from_secs(20)).await;
    let m = scrape_until(port_a, "replica-a took the released lease back", |m| {
        m.value("leases_held", &[]) == 2.0 && m.value("shard_readers", &[]) == 2.0
    })
    .await;
    assert_eq!(m.value("lease_changes_total", &[("change", "acquired")]), 3.0);
    let log_a = a.stop_gracefully(Duration::from_secs(20)).await;

    // Text at debug level: per-call detail with structured fields; no JSON.
    assert!(!log_b.lines().any(|line| line.starts_with('{')), "{log_b}");
    assert!(!log_b.contains(" WARN "), "a clean join and graceful stop warn about nothing:\n{log_b}");
    let debug_reads =
        log_b.lines().filter(|l| l.contains(" DEBUG ") && l.contains("GetRecords") && l.contains("shard_id="));
    assert!(debug_reads.count() >= 1, "DEBUG=true shows each GetRecords:\n{log_b}");
    assert!(
        log_b.lines().any(|l| l.contains(" INFO ") && l.contains("lease acquired") && l.contains("replica=replica-b")),
        "{log_b}"
    );

    // JSON at info level: one line per lease change and per shard lifecycle step, with their fields;
    // nothing per record.
    let lines = json_lines(&log_a);
    assert!(lines.iter().all(|line| line["level"] != "DEBUG" && line["level"] != "TRACE"), "info level only");
    let acquired = lines_with(&lines, "lease acquired");
    assert_eq!(acquired.len(), 3, "one line per acquisition: {acquired:?}");
    assert!(acquired.iter().all(|line| line["replica"] == "replica-a" && line["shard"].is_string()), "{acquired:?}");
    for (message, count) in [("handing over a shard", 1), ("lease released", 1)] {
        assert_eq!(lines_with(&lines, message).len(), count, "{message}");
    }
    for message in ["shard reader started", "shard reader ended"] {
        let steps = lines_with(&lines, message);
        assert_eq!(steps.len(), 3, "{message}: two readers at start, one after the hand-back: {steps:?}");
        assert!(steps.iter().all(|line| line["table"].is_string() && line["shard_id"].is_string()), "{steps:?}");
    }
    // The connection events: one warning for the loss (not one per reconnection attempt).
    let lost = lines_with(&lines, "NATS connection lost");
    assert!(lost.len() == 1 && lost[0]["level"] == "WARN", "{lost:?}");
    assert!(lines_with(&lines, "NATS connection event").iter().all(|line| line["level"] != "WARN"));
    assert!(!lines_with(&lines, "NATS reconnected").is_empty(), "reconnection logged");
    assert!(lines.iter().all(|line| line.get("sequence_number").is_none()), "a per-record line above debug");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_dashboard_and_the_alert_rules_use_is_exported_from_the_start() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let port = fixtures::http_port();
    let service =
        ServiceProcess::start_ready(binary(), &fixtures::service_env(&nats, &moto, "orders", port), port, DEADLINE)
            .await;
    // Nothing written and nothing failed: the per-table series exist anyway, with 0.
    let m = scrape_until(port, "the lease held", |m| m.value("leases_held", &[]) == 1.0).await;
    let exported: BTreeSet<&str> = m.families.keys().map(String::as_str).collect();
    let base = |name: &str| -> String {
        let stripped = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix));
        match stripped {
            Some(base) if m.families.get(base) == Some(&SampleType::Histogram) => base.to_owned(),
            _ => name.to_owned(),
        }
    };

    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let queries =
        alert_rules().into_iter().map(|(name, expr)| (format!("alert {name}"), expr)).chain(dashboard_queries());
    for (origin, expr) in queries {
        let names = metric_names(&expr);
        assert!(
            names.iter().any(|name| name.starts_with(PREFIX)),
            "{origin} uses none of the service's metrics: {expr}"
        );
        for name in names.into_iter().filter(|name| name.starts_with(PREFIX)) {
            used.entry(base(&name)).or_default().push(origin.clone());
        }
    }
    let missing: Vec<(&String, &Vec<String>)> =
        used.iter().filter(|(name, _)| !exported.contains(name.as_str())).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}\nexported: {exported:?}");

    // The other way round: the dashboard shows every metric the service exports.
    let on_dashboard: BTreeSet<String> =
        dashboard_queries().iter().flat_map(|(_, expr)| metric_names(expr)).map(|name| base(&name)).collect();
    let unshown: Vec<&&str> = exported.iter().filter(|name| !on_dashboard.contains(**name)).collect();
    assert!(unshown.is_empty(), "exported but on no dashboard panel: {unshown:?}");

    // Each histogram and each per-table counter is there for the configured table before any traffic.
    for (name, labels) in [
        ("publish_ack_seconds_count", vec![("table", "orders")]),
        ("records_per_get_records_count", vec![("table", "orders")]),
        ("trimmed_data_gaps_total", vec![("table", "orders")]),
        ("publish_errors_total", vec![("table", "orders"), ("kind", "timed_out")]),
        ("get_records_errors_total", vec![("table", "orders"), ("kind", "throttled")]),
        ("records_published_total", vec![("table", "orders"), ("event_name", "INSERT")]),
    ] {
        assert!(m.has(name, &labels), "{name}{labels:?} missing:\n{}", m.text);
    }
    service.stop_gracefully(Duration::from_secs(20)).await;
}

#[test]
fn alert_rules_and_dashboard_are_well_formed_promql() {
    let rules = alert_rules();
    let alerts: BTreeSet<&str> = rules.iter().map(|(name, _)| name.as_str()).collect();
    // The conditions operators asked to be paged for, each by at least one rule.
    for needed in
        ["LagHigh", "TableNotRead", "PublishErrors", "TrimmedDataGap", "ReplicaNotReady", "NatsDisconnected", "Down"]
    {
        assert!(alerts.iter().any(|alert| alert.ends_with(needed)), "no alert for {needed}: {alerts:?}");
    }
    for (origin, expr) in rules.iter().cloned().chain(dashboard_queries()) {
        // Parsing is the check: a malformed expression panics with its origin.
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{origin}: {expr}");
    }
    // The promtool unit tests of the rules (run by hand) name only alerts that exist.
    let unit_tests: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy("prometheus/alerts_test.yml")).unwrap()).unwrap();
    for case in unit_tests["tests"].as_sequence().unwrap() {
        for check in case["alert_rule_test"].as_sequence().unwrap() {
            let name = check["alertname"].as_str().unwrap();
            assert!(alerts.contains(name), "alerts_test.yml tests {name}, which alerts.yml does not define");
        }
    }
    // The example scrape configuration loads these rules.
    let prometheus: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap()).unwrap();
    let files: Vec<&str> = prometheus["rule_files"].as_sequence().unwrap().iter().filter_map(|f| f.as_str()).collect();
    assert_eq!(files, ["alerts.yml"]);
}
