//! The throughput benchmark: `cargo run --release -p test-support --bin bench`.
//!
//! For each shard count (1, 8, 64) and record size (about 200 B and 2 KB) it measures, in one run:
//! - the **ceiling**: a plain async-nats program publishing the same number of messages of the same
//!   size, with the same headers (a `Nats-Msg-Id` among them), to a stream with the seed's settings,
//!   one pipeline of at most 1000 unacknowledged publishes per shard, acks awaited in order;
//! - the **service**: the real release binary reading the same records from the project's own
//!   DynamoDB Streams endpoint (pre-filled, over the real AWS JSON protocol, so the SDK path is what
//!   gets measured) and publishing them to a fresh `nats-server`.
//!
//! The service is started first, with a reader on every shard, and the records appear at once after:
//! the figures are throughput, not start-up. It prints one Markdown table: records/s of each, their
//! ratio, the service's CPU time per 1000 records and its peak RSS. A benchmark reports; it asserts
//! nothing. `BENCH_PERF=<file>` records a `perf` profile of the service while it drains.
//!
//! A second table is write-to-arrival latency at a steady 200 records/s over 8 shards, polling at the
//! default 1 s and at 50 ms (`POLL_GAP_MS` too): each record carries its exact creation time (DynamoDB's own
//! `ApproximateCreationDateTime` is rounded down to the second), and a NATS subscriber takes the time
//! of arrival on the same host. `BENCH_RECORDS` scales the
//! record counts (default 1.0); `BENCH_SHARDS` (e.g. `8`) and `BENCH_SIZES` (e.g. `200`) narrow the grid.

#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use test_support::streams_fault::{EventName, FaultyStreams, NewRecord, ViewType};
use test_support::{NatsServer, ServiceProcess, free_port, http_get, wait_for};
use tokio::time::Instant;

const STREAM: &str = "dynamodb_streams";
/// The service's default in-flight window per shard (`MAX_IN_FLIGHT`), used by the ceiling too.
const WINDOW: usize = 1000;

#[derive(Clone, Copy, Debug)]
struct Scenario {
    shards: usize,
    size: usize,
    records: usize,
}

struct Measured {
    records_per_sec: f64,
    cpu_ms_per_1000: Option<f64>,
    peak_rss_mb: Option<f64>,
}

/// The seed's stream: limits, 14 days, file storage, S2, 2 minute duplicate window.
fn seed_stream() -> stream::Config {
    stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{STREAM}.>")],
        max_age: Duration::from_secs(14 * 24 * 3600),
        storage: stream::StorageType::File,
        compression: Some(stream::Compression::S2),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

fn table(shard: usize) -> String {
    format!("bench-{shard}")
}

/// A payload attribute that makes the event JSON about `size` bytes.
fn filler(size: usize) -> String {
    "x".repeat(size.saturating_sub(260).max(8))
}

/// An event like the service publishes for record `i` of `shard`, with the same headers.
fn message(shard: usize, i: usize, size: usize) -> (async_nats::HeaderMap, Bytes) {
    let table = table(shard);
    let sequence = format!("{:021}", 100_000_000_000_000_000u128 + i as u128);
    let event = json!({
        "event_id": format!("{:032x}", i),
        "event_name": "INSERT",
        "table_name": table,
        "sequence_number": sequence,
        "approximate_creation_time": "2026-11-25T12:00:00.5Z",
        "keys": {"pk": format!("k{i}")},
        "new_image": {"pk": format!("k{i}"), "payload": filler(size)},
        "old_image": null,
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{table}:shardId-00000001700000000000-{shard:08x}:{sequence}").as_str());
    headers.insert("Dynamodb-Table", table.as_str());
    headers.insert("Dynamodb-Event-Name", "INSERT");
    headers.insert("Dynamodb-Sequence-Number", sequence.as_str());
    headers.insert("Dynamodb-Shard-Id", format!("shardId-00000001700000000000-{shard:08x}").as_str());
    (headers, Bytes::from(serde_json::to_vec(&event).unwrap()))
}

/// The `INSERT` of item `k{i}` whose new image carries `attribute` besides the key.
fn insert(i: u64, attribute: &str, value: serde_json::Value) -> NewRecord {
    let key = json!({"pk": {"S": format!("k{i}")}}).as_object().unwrap().clone();
    let mut image = key.clone();
    image.insert(attribute.into(), value);
    NewRecord { keys: key, new_image: Some(image), old_image: None, event_name: EventName::Insert, user_identity: None }
}

/// A plain async-nats program publishing the scenario's messages: one pipeline per shard.
async fn ceiling(scenario: Scenario) -> Measured {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    // Room for every shard's window: async-nats' default cap (5000 unawaited acks, waited for inside
    // a publish) would deadlock pipelines that together hold more.
    let js = jetstream::ContextBuilder::new().max_ack_inflight(scenario.shards * WINDOW).build(client);
    js.create_stream(seed_stream()).await.unwrap();
    let per_shard = scenario.records / scenario.shards;
    let messages: Vec<Vec<(async_nats::HeaderMap, Bytes)>> =
        (0..scenario.shards).map(|shard| (0..per_shard).map(|i| message(shard, i, scenario.size)).collect()).collect();
    let started = Instant::now();
    let tasks: Vec<_> = messages
        .into_iter()
        .enumerate()
        .map(|(shard, messages)| {
            let js = js.clone();
            tokio::spawn(async move {
                let subject = format!("{STREAM}.{}", table(shard));
                let mut pending = VecDeque::new();
                for (headers, payload) in messages {
                    if pending.len() >= WINDOW {
                        let ack: jetstream::context::PublishAckFuture = pending.pop_front().unwrap();
                        ack.await.unwrap();
                    }
                    let message = jetstream::message::PublishMessage::build().headers(headers).payload(payload);
                    pending.push_back(js.send_publish(subject.clone(), message).await.unwrap());
                }
                for ack in pending {
                    ack.await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    Measured {
        records_per_sec: (per_shard * scenario.shards) as f64 / elapsed.as_secs_f64(),
        cpu_ms_per_1000: None,
        peak_rss_mb: None,
    }
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Peak resident set size in MiB, from `/proc/<pid>/status` (`VmHWM`).
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

async fn stream_messages(js: &jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(mut stream) => stream.info().await.map(|info| info.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The servers and the service of one scenario.
struct Running {
    nats: NatsServer,
    source: FaultyStreams,
    process: ServiceProcess,
}

/// Starts a fresh `nats-server`, the synthetic source with `shards` empty one-shard tables, and the
/// service polling idle shards every `poll_interval_ms` (and, after a partial page, waiting the same or
/// the default 250 ms, whichever is shorter); returns once every shard has a reader.
async fn start_service(binary: &Path, shards: usize, poll_interval_ms: u64) -> Running {
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    for shard in 0..shards {
        source.create_table(&table(shard), "pk", ViewType::NewAndOldImages);
    }
    let port = free_port();
    let tables: Vec<String> = (0..shards).map(table).collect();
    let env: Vec<(String, String)> = [
        ("DYNAMODB_TABLES", tables.join(",")),
        ("NATS_URL", nats.url()),
        ("AWS_ENDPOINT_URL", source.endpoint()),
        ("AWS_ACCESS_KEY_ID", "bench".into()),
        ("AWS_SECRET_ACCESS_KEY", "bench".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("PORT", port.to_string()),
        ("BIND", "127.0.0.1".into()),
        ("RUST_LOG", "warn".into()),
        ("POLL_INTERVAL_MS", poll_interval_ms.to_string()),
        ("POLL_GAP_MS", poll_interval_ms.min(250).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let process = ServiceProcess::start_ready(binary, &env, port, Duration::from_secs(60)).await;
    wait_for("a reader on every shard", Duration::from_secs(120), || async {
        let (_, body) = http_get(port, "/status").await.ok()?;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status["shards"].as_array()?.len() == shards).then_some(())
    })
    .await;
    Running { nats, source, process }
}

/// The real service draining the scenario's records from the synthetic source.
async fn service(scenario: Scenario, binary: &Path) -> Measured {
    let per_shard = scenario.records / scenario.shards;
    let total = (per_shard * scenario.shards) as u64;
    // Idle shards poll every 100 ms, so all of them start draining within a tenth of a second of the
    // records appearing (the default 1 s would stagger the start of the measurement). Every shard has
    // a reader before the records appear: the figure is throughput, not start-up.
    let Running { nats, source, process } = start_service(binary, scenario.shards, 100).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let pid = process.pid();
    for shard in 0..scenario.shards {
        let name = table(shard);
        for i in 0..per_shard {
            source.put(&name, insert(i as u64, "payload", json!({"S": filler(scenario.size)}))).unwrap();
        }
    }
    let profiler = std::env::var("BENCH_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-o", &out, "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run perf")
    });

    // The clock starts at the first message in the stream (start-up is not throughput).
    let mut first = None;
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let count = stream_messages(&js).await;
        let now = Instant::now();
        if count > 0 && first.is_none() {
            first = Some((now, count, cpu_time(pid)));
        }
        if count >= total {
            break;
        }
        assert!(now < give_up, "the service published {count} of {total} records in 10 minutes:\n{}", process.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let cpu_end = cpu_time(pid);
    let rss = peak_rss_mb(pid);
    if let Some(mut perf) = profiler {
        let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
        let _ = perf.wait();
    }
    let (start, count_at_start, cpu_start) = first.unwrap();
    process.stop_gracefully(Duration::from_secs(30)).await;
    let measured = (total - count_at_start) as f64;
    Measured {
        records_per_sec: measured / (end - start).as_secs_f64(),
        cpu_ms_per_1000: Some((cpu_end - cpu_start).as_secs_f64() * 1000.0 / (measured / 1000.0)),
        peak_rss_mb: rss,
    }
}

/// Nanoseconds since the epoch on this host's clock (writer and subscriber share it).
fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Writes at a steady `rate` (records/s) over `shards` for `seconds`, each record stamped with its
/// exact creation time, and returns the write-to-arrival latencies (ms) seen by a NATS subscriber:
/// DynamoDB's own `ApproximateCreationDateTime` is rounded down to the second, so it cannot be used.
async fn latency(binary: &Path, shards: usize, poll_interval_ms: u64, rate: u64, seconds: u64) -> Vec<f64> {
    let Running { nats, source, process } = start_service(binary, shards, poll_interval_ms).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut messages = client.subscribe(format!("{STREAM}.>")).await.unwrap();
    client.flush().await.unwrap();
    let total = rate * seconds;
    let writer = {
        let source = source.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            for i in 0..total {
                tick.tick().await;
                let record = insert(i, "t", json!({"N": now_nanos().to_string()}));
                source.put(&table(i as usize % shards), record).unwrap();
            }
        })
    };
    let mut latencies = Vec::with_capacity(total as usize);
    let give_up = Instant::now() + Duration::from_secs(seconds + 60);
    while (latencies.len() as u64) < total && Instant::now() < give_up {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { break };
        let arrived = now_nanos();
        let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let written: u128 = event["new_image"]["t"].to_string().parse().unwrap_or(arrived);
        latencies.push(arrived.saturating_sub(written) as f64 / 1e6);
    }
    writer.await.unwrap();
    process.stop_gracefully(Duration::from_secs(30)).await;
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn grid(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|text| text.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|values: &Vec<usize>| !values.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

#[tokio::main]
async fn main() {
    let binary = test_support::process::build_service();
    assert!(
        binary.parent().is_some_and(|dir| dir.ends_with("release")),
        "run the benchmark with --release: `cargo run --release -p test-support --bin bench`"
    );
    let scale: f64 = std::env::var("BENCH_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    println!(
        "| shards | record size | records | ceiling rec/s | service rec/s | ratio | service CPU ms / 1000 rec | service peak RSS MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in grid("BENCH_SIZES", &[200, 2048]) {
        for shards in grid("BENCH_SHARDS", &[1, 8, 64]) {
            let base = if size <= 512 { 128_000.0 } else { 32_000.0 };
            let records = ((base * scale) as usize / shards).max(1) * shards;
            let scenario = Scenario { shards, size, records };
            let top = ceiling(scenario).await;
            let ours = service(scenario, &binary).await;
            println!(
                "| {shards} | {size} B | {records} | {:.0} | {:.0} | {:.2} | {} | {} |",
                top.records_per_sec,
                ours.records_per_sec,
                ours.records_per_sec / top.records_per_sec,
                ours.cpu_ms_per_1000.map_or("–".into(), |v| format!("{v:.1}")),
                ours.peak_rss_mb.map_or("–".into(), |v| format!("{v:.1}")),
            );
        }
    }

    // Steady writes: 200 records/s over 8 shards for 10 s, polling at the default 1 s and at 50 ms (the
    // gap after a partial page shortened with it: at 25 records/s per shard most reads are partial).
    println!();
    println!("| poll interval | records | latency p50 ms | latency p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    for poll in [1000, 50] {
        let latencies = latency(&binary, 8, poll, 200, 10).await;
        println!(
            "| {poll} ms | {} | {:.1} | {:.1} | {:.1} |",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN),
        );
    }
}
