//! The idle fleet: what a shard costs while nothing is written to it.
//!
//! One replica, every setting at its default (`POLL_INTERVAL_MS` 1 s, `LEASE_TTL_SEC` 10, renewal every
//! TTL/3), is measured in three runs, each on fresh servers:
//! - **1 shard**: the base, for memory;
//! - **1000 idle shards** (4 tables of 250 shards): CPU, `GetRecords` calls per idle shard, writes to
//!   the checkpoint bucket by kind, JetStream API requests, and RSS, so that an idle shard's memory is
//!   `(RSS₁₀₀₀ − RSS₁) / 999`;
//! - **1000 idle + 8 busy shards**: 8 one-shard tables kept full so the replica publishes at full
//!   speed, while lease renewal of all 1008 must go on without a lease lost or expired.
//!
//! `BENCH_IDLE_TABLES` and `BENCH_IDLE_SHARDS_PER_TABLE` change the idle tables (e.g. 40 × 250 for
//! 10,000 idle shards); `BENCH_IDLE_REPLICAS` runs the idle and busy runs on that many replicas (CPU
//! and RSS are their sums, `leases_held` the fleet's).
//!
//! Every run counts lease changes (`lease_changes_total{change="lost"|"expired"}`) and samples
//! `leases_held` through its window: the targets are zero and a constant count.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use streams_emulator::{FaultyStreams, Op, ViewType};
use test_support::{NatsServer, ServiceProcess, free_port, wait_for};
use tokio::time::Instant;

use crate::kv_traffic::{KvTraffic, Traffic};
use crate::procfs::{cpu_time, rss_kib};
use crate::records::insert;
use crate::service::{self, START_DEADLINE, scrape, sum, wait_for_readers};

/// 4 tables × 250 shards: the thousand idle shards, in tables of a realistic size (and more
/// than one `DescribeStream` page of 100 each).
const IDLE_TABLES: usize = 4;
const SHARDS_PER_TABLE: usize = 250;
const BUSY_TABLES: usize = 8;
/// The base run: long enough for the replica's start-up allocations to be behind it.
const BASE_WINDOW: Duration = Duration::from_secs(10);
/// 30 polls of every idle shard and 9 renewals of every lease.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Two lease TTLs of publishing at full speed.
const BUSY_WINDOW: Duration = Duration::from_secs(20);
/// Records kept unread ahead of each busy shard's reader: ten `GetRecords` pages of 1000, so a reader
/// never finds its shard drained between two top-ups (every 50 ms).
const BACKLOG: u64 = 10_000;
/// A busy record's payload: with the key and metadata, an event of about 200 bytes.
const PAYLOAD_BYTES: usize = 60;

/// The idle tables and their shards: `BENCH_IDLE_TABLES` × `BENCH_IDLE_SHARDS_PER_TABLE`, by
/// default [`IDLE_TABLES`] × [`SHARDS_PER_TABLE`].
fn idle_shape() -> (usize, usize) {
    let number = |name: &str, default: usize| {
        std::env::var(name).ok().and_then(|value| value.parse().ok()).filter(|n: &usize| *n > 0).unwrap_or(default)
    };
    (number("BENCH_IDLE_TABLES", IDLE_TABLES), number("BENCH_IDLE_SHARDS_PER_TABLE", SHARDS_PER_TABLE))
}

/// `BENCH_IDLE_REPLICAS`, 1 by default.
fn idle_replicas() -> usize {
    std::env::var("BENCH_IDLE_REPLICAS")
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(1)
}

/// The three runs, in the order they run and print.
fn run_names() -> [String; 3] {
    let (tables, per_table) = idle_shape();
    let idle = tables * per_table;
    let on = match idle_replicas() {
        1 => String::new(),
        replicas => format!(" on {replicas} replicas"),
    };
    ["1 shard".to_owned(), format!("{idle} idle shards{on}"), format!("{idle} idle + {BUSY_TABLES} busy shards{on}")]
}

/// The servers and the replicas of one run.
struct Fleet {
    _nats: NatsServer,
    source: FaultyStreams,
    processes: Vec<ServiceProcess>,
    ports: Vec<u16>,
    kv: KvTraffic,
    shards: usize,
    busy: Vec<String>,
    startup: Duration,
}

/// Starts fresh servers, `tables` idle tables of `shards_per_table` shards and `busy` empty one-shard
/// tables, and `replicas` replicas with default settings; returns once they hold and read every shard.
async fn start(binary: &Path, tables: usize, shards_per_table: usize, busy: usize, replicas: usize) -> Fleet {
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    let idle: Vec<String> = (0..tables).map(|t| format!("idle-{t}")).collect();
    for name in &idle {
        source.create_table_with_shards(name, "pk", ViewType::NewAndOldImages, shards_per_table);
    }
    let busy: Vec<String> = (0..busy).map(|b| format!("busy-{b}")).collect();
    for name in &busy {
        source.create_table(name, "pk", ViewType::NewAndOldImages);
    }
    let kv = KvTraffic::watch(&nats).await;
    let all: Vec<String> = idle.iter().chain(&busy).cloned().collect();
    let started = Instant::now();
    let (mut processes, mut ports) = (Vec::new(), Vec::new());
    for _ in 0..replicas {
        let port = free_port();
        let env = service::env(&nats, &source, &all, port, &[]);
        processes.push(ServiceProcess::start_ready(binary, &env, port, START_DEADLINE).await);
        ports.push(port);
    }
    let shards = tables * shards_per_table + busy.len();
    wait_for_readers(&ports, shards).await;
    Fleet { _nats: nats, source, processes, ports, kv, shards, busy, startup: started.elapsed() }
}

/// The counters a window is measured between.
struct Sample {
    at: Instant,
    cpu: Duration,
    source_get_records: usize,
    kv: Traffic,
    /// Every replica's `/metrics`, one after the other (sums add across replicas).
    metrics: String,
}

async fn sample(fleet: &Fleet) -> Sample {
    Sample {
        at: Instant::now(),
        cpu: fleet.processes.iter().map(|process| cpu_time(process.pid())).sum(),
        source_get_records: fleet.source.calls(Op::GetRecords),
        kv: fleet.kv.snapshot(),
        metrics: scrape_all(&fleet.ports).await,
    }
}

async fn scrape_all(ports: &[u16]) -> String {
    let mut all = String::new();
    for port in ports {
        all.push_str(&scrape(*port).await);
    }
    all
}

/// What one run measured over its window.
struct Figures {
    shards: usize,
    idle_shards: usize,
    startup: Duration,
    seconds: f64,
    /// CPU time over wall time: 1.0 is one core.
    cores: f64,
    /// `GetRecords` calls on the idle tables (the service's own count), per idle shard per second.
    idle_get_records: f64,
    /// `GetRecords` calls the source answered, per shard per second (busy shards included).
    source_get_records: f64,
    kv: Traffic,
    published: f64,
    lost: f64,
    expired: f64,
    held: (f64, f64),
    /// Summed over the replicas.
    rss_kib: f64,
    replicas: usize,
    /// The service's `WARN` and `ERROR` log lines over the whole run.
    warnings: Vec<String>,
}

/// Measures `fleet` over `window`, sampling `leases_held` twice a second meanwhile.
async fn measure(fleet: &Fleet, window: Duration) -> Figures {
    let start = sample(fleet).await;
    let mut held = (f64::INFINITY, f64::NEG_INFINITY);
    while start.at.elapsed() < window {
        let now = sum(&scrape_all(&fleet.ports).await, "leases_held", "");
        held = (held.0.min(now), held.1.max(now));
        tokio::time::sleep(Duration::from_millis(500).min(window.saturating_sub(start.at.elapsed()))).await;
    }
    let end = sample(fleet).await;
    let seconds = (end.at - start.at).as_secs_f64();
    let delta = |name: &str, labels: &str| sum(&end.metrics, name, labels) - sum(&start.metrics, name, labels);
    let idle_shards = fleet.shards - fleet.busy.len();
    let published: f64 = fleet
        .busy
        .iter()
        .map(|table| delta("records_published_total", &format!("{{event_name=\"INSERT\",table=\"{table}\"}}")))
        .sum();
    Figures {
        shards: fleet.shards,
        idle_shards,
        startup: fleet.startup,
        seconds,
        cores: (end.cpu - start.cpu).as_secs_f64() / seconds,
        idle_get_records: delta("get_records_calls_total", "{table=\"idle-") / idle_shards as f64 / seconds,
        source_get_records: (end.source_get_records - start.source_get_records) as f64 / fleet.shards as f64 / seconds,
        kv: end.kv.since(&start.kv),
        published: published / seconds,
        lost: delta("lease_changes_total", "{change=\"lost\"}"),
        expired: delta("lease_changes_total", "{change=\"expired\"}"),
        held,
        rss_kib: fleet.processes.iter().map(|process| rss_kib(process.pid()).unwrap_or(f64::NAN)).sum(),
        replicas: fleet.processes.len(),
        warnings: Vec::new(),
    }
}

/// Keeps every busy table `BACKLOG` records ahead of what the service has published from it, and trims
/// what it has published, so the source's memory stays bounded over a run of a million records.
async fn feed(source: FaultyStreams, ports: Vec<u16>, tables: Vec<String>) {
    let payload = json!({"S": "x".repeat(PAYLOAD_BYTES)});
    let mut written = vec![0u64; tables.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for round in 0u64.. {
        tick.tick().await;
        let metrics = scrape_all(&ports).await;
        for (table, written) in tables.iter().zip(&mut written) {
            let labels = format!("{{event_name=\"INSERT\",table=\"{table}\"}}");
            let published = sum(&metrics, "records_published_total", &labels) as u64;
            while *written < published + BACKLOG {
                source.put(table, insert(*written, "payload", payload.clone())).unwrap();
                *written += 1;
            }
            // At most `BACKLOG` records were unread at the top-up: older ones were read already.
            if round % 20 == 0 {
                source.trim_all_but_last(table, 2 * BACKLOG as usize);
            }
        }
    }
}

/// Stops the replicas gracefully and adds what they warned about to its figures.
async fn stop(fleet: Fleet, mut figures: Figures) -> Figures {
    for process in fleet.processes {
        let log = process.stop_gracefully(Duration::from_secs(30)).await;
        figures
            .warnings
            .extend(log.lines().filter(|line| line.contains("WARN") || line.contains("ERROR")).map(str::to_owned));
    }
    figures
}

/// Runs the three scenarios and prints one table.
pub async fn run(binary: &Path) {
    let base = {
        let fleet = start(binary, 1, 1, 0, 1).await;
        let figures = measure(&fleet, BASE_WINDOW).await;
        stop(fleet, figures).await
    };
    let (tables, per_table) = idle_shape();
    let idle = {
        let fleet = start(binary, tables, per_table, 0, idle_replicas()).await;
        let figures = measure(&fleet, IDLE_WINDOW).await;
        stop(fleet, figures).await
    };
    let busy = {
        let fleet = start(binary, tables, per_table, BUSY_TABLES, idle_replicas()).await;
        let feeder = tokio::spawn(feed(fleet.source.clone(), fleet.ports.clone(), fleet.busy.clone()));
        // The window opens once every busy shard publishes.
        wait_for("every busy shard publishing", START_DEADLINE, || async {
            let metrics = scrape_all(&fleet.ports).await;
            fleet
                .busy
                .iter()
                .all(|table| {
                    let labels = format!("{{event_name=\"INSERT\",table=\"{table}\"}}");
                    sum(&metrics, "records_published_total", &labels) > 0.0
                })
                .then_some(())
        })
        .await;
        let figures = measure(&fleet, BUSY_WINDOW).await;
        feeder.abort();
        stop(fleet, figures).await
    };
    print(&[base, idle, busy]);
}

fn print(runs: &[Figures; 3]) {
    let [base, idle, _] = runs;
    // Each replica has the base's own memory (the binary, its runtime, its connections).
    let replicas = idle.replicas as f64;
    let per_idle_shard_kib =
        (idle.rss_kib - replicas * base.rss_kib) / (idle.shards as f64 - replicas * base.shards as f64);
    let row = |figure: &str, value: &dyn Fn(&Figures) -> String, target: &str| {
        let values: Vec<String> = runs.iter().map(value).collect();
        println!("| {figure} | {} | {target} |", values.join(" | "));
    };
    let rate = |count: u64, figures: &Figures| format!("{:.1}", count as f64 / figures.seconds);
    let names = run_names();
    println!("| figure | {} | target |", names.join(" | "));
    println!("|---|---:|---:|---:|---|");
    row("shards held", &|f| f.shards.to_string(), "");
    row("start-up until every shard has a reader, s", &|f| format!("{:.1}", f.startup.as_secs_f64()), "");
    row("measured window, s", &|f| format!("{:.0}", f.seconds), "");
    row(
        "records published / s",
        &|f| if f.shards > f.idle_shards { format!("{:.0}", f.published) } else { "–".into() },
        "full speed on the busy shards",
    );
    row("CPU, % of one core", &|f| format!("{:.2}", f.cores * 100.0), "");
    row(
        "CPU per idle shard, % of one core",
        &|f| if f.idle_shards == f.shards { format!("{:.4}", f.cores * 100.0 / f.shards as f64) } else { "–".into() },
        "negligible",
    );
    row(
        "GetRecords / idle shard / s (service count)",
        &|f| format!("{:.3}", f.idle_get_records),
        "≤ 1.0 (one per 1 s poll)",
    );
    row("GetRecords / shard / s (at the source)", &|f| format!("{:.3}", f.source_get_records), "");
    row("lease writes / s (`lease/shard.*`)", &|f| rate(f.kv.leases, f), "0 (leases move only)");
    row(
        "session writes / s (`lease/replica.*`)",
        &|f| rate(f.kv.heartbeats, f),
        "≤ 0.3 per replica (1 per 3.33 s renew interval)",
    );
    row("topology writes / s", &|f| rate(f.kv.topology, f), "");
    row("checkpoint writes / s", &|f| rate(f.kv.checkpoints, f), "");
    row("JetStream API requests / s", &|f| rate(f.kv.api_requests, f), "");
    row("leases lost / expired in the window", &|f| format!("{} / {}", f.lost, f.expired), "0 / 0");
    row("`leases_held` min – max in the window", &|f| format!("{} – {}", f.held.0, f.held.1), "= shards held");
    row("RSS at the end, MiB", &|f| format!("{:.1}", f.rss_kib / 1024.0), "base < 30 MB");
    let per_shard = |f: &Figures| {
        if std::ptr::eq(f, idle) { format!("{per_idle_shard_kib:.1}") } else { "–".into() }
    };
    row("RSS per idle shard, KiB ((RSS_idle − n·RSS₁) / (idle − n), n replicas)", &per_shard, "≤ 32 KiB");
    println!();
    for (name, figures) in names.iter().zip(runs) {
        let kinds: Vec<String> = figures
            .kv
            .api_kinds
            .iter()
            .map(|(kind, count)| format!("{kind} {:.1}", *count as f64 / figures.seconds))
            .collect();
        println!("JetStream API requests / s, {name}: {}", kinds.join(", "));
    }
    for (name, figures) in names.iter().zip(runs) {
        // The same message with other fields counts once: the line without its timestamp, shortened.
        let mut distinct: BTreeMap<String, usize> = BTreeMap::new();
        for line in &figures.warnings {
            let text = line.split_once(' ').map_or(line.as_str(), |(_, rest)| rest);
            *distinct.entry(text.chars().take(140).collect()).or_default() += 1;
        }
        println!("service warnings and errors, {name}: {}", figures.warnings.len());
        for (text, count) in distinct {
            println!("  {count} × {text}");
        }
    }
}
