//! Throughput against a ceiling: for each shard count and record size, a plain async-nats program
//! (the ceiling) and the real service publish the same number of records of the same size, and the
//! table compares their rates. The service's CPU and peak RSS come from `/proc`.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use crate::procfs::{cpu_time, peak_rss_mb};
use crate::records::insert;
use crate::service::{Running, STREAM, start_one_shard_tables, table};

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
    /// Where the shard readers' time went while the records drained: the share of (shards × wall
    /// time) spent waiting on a read, on acknowledgements, on checkpoint writes, in pauses
    /// (`reader_wait_seconds_total`); the rest is their own work.
    waits: Option<[f64; 4]>,
}

/// The `on` labels of `reader_wait_seconds_total`, in the order of [`Measured::waits`].
const WAITS: [&str; 4] = ["read", "publish", "checkpoint", "pause"];

/// Seconds waited on each of [`WAITS`] so far, summed over the shards.
fn waited(metrics: &str) -> [f64; 4] {
    WAITS.map(|on| crate::service::sum(metrics, "reader_wait_seconds_total", &format!("{{on=\"{on}\"")))
}

/// `read 12 / publish 60 / checkpoint 9 / pause 0 %`.
fn shares(waits: Option<[f64; 4]>) -> String {
    let Some(waits) = waits else { return "–".into() };
    let parts: Vec<String> = WAITS.iter().zip(waits).map(|(on, share)| format!("{on} {:.0}", share * 100.0)).collect();
    format!("{} %", parts.join(" / "))
}

/// One row of the table, kept for the plot.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub shards: usize,
    pub size: usize,
    pub ceiling: f64,
    pub service: f64,
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

/// A payload attribute that makes the event JSON about `size` bytes.
pub fn filler(size: usize) -> String {
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

/// A plain async-nats program publishing the scenario's messages: one pipeline per shard.
async fn ceiling(scenario: Scenario) -> Measured {
    let nats = test_support::NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    // Room for every shard's window: async-nats' default cap (5000 unawaited acks, waited for inside
    // a publish) would deadlock pipelines that together hold more.
    let js = jetstream::ContextBuilder::new().max_ack_inflight(scenario.shards * WINDOW).build(client);
    js.create_stream(seed_stream()).await.unwrap();
    let per_shard = scenario.records / scenario.shards;
    let messages: Vec<Vec<(async_nats::HeaderMap, Bytes)>> =
        (0..scenario.shards).map(|shard| (0..per_shard).map(|i| message(shard, i, scenario.size)).collect()).collect();
    let started = Instant::now();
    let cpu_start = cpu_time(std::process::id());
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
    // The benchmark process does nothing else meanwhile (the messages were built before the clock
    // started): this is what the async-nats client alone spends to publish them.
    let cpu = cpu_time(std::process::id()).saturating_sub(cpu_start);
    let published = (per_shard * scenario.shards) as f64;
    Measured {
        records_per_sec: published / elapsed.as_secs_f64(),
        cpu_ms_per_1000: Some(cpu.as_secs_f64() * 1000.0 / (published / 1000.0)),
        waits: None,
        peak_rss_mb: None,
    }
}

/// How many messages the service's stream holds (0 before it exists).
pub async fn stream_messages(js: &jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(mut stream) => stream.info().await.map(|info| info.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The ceiling's rate for `records` events of about `size` bytes published over `pipelines` concurrent
/// pipelines of the service's window each (the backfill compares its segments with it).
pub async fn ceiling_rate(pipelines: usize, size: usize, records: usize) -> f64 {
    let records = (records / pipelines).max(1) * pipelines;
    ceiling(Scenario { shards: pipelines, size, records }).await.records_per_sec
}

/// The real service draining the scenario's records from the synthetic source.
async fn service(scenario: Scenario, binary: &Path) -> Measured {
    let per_shard = scenario.records / scenario.shards;
    let total = (per_shard * scenario.shards) as u64;
    // Idle shards poll every 100 ms, so all of them start draining within a tenth of a second of the
    // records appearing (the default 1 s would stagger the start of the measurement). Every shard has
    // a reader before the records appear: the figure is throughput, not start-up.
    let Running { nats, source, process, port } = start_one_shard_tables(binary, scenario.shards, 100).await;
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
            first = Some((now, count, cpu_time(pid), waited(&crate::service::scrape(port).await)));
        }
        if count >= total {
            break;
        }
        assert!(now < give_up, "the service published {count} of {total} records in 10 minutes:\n{}", process.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let cpu_end = cpu_time(pid);
    let waits_end = waited(&crate::service::scrape(port).await);
    let rss = peak_rss_mb(pid);
    if let Some(mut perf) = profiler {
        let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
        let _ = perf.wait();
    }
    let (start, count_at_start, cpu_start, waits_start) = first.unwrap();
    let reader_seconds = (end - start).as_secs_f64() * scenario.shards as f64;
    let waits = std::array::from_fn(|i| (waits_end[i] - waits_start[i]) / reader_seconds);
    process.stop_gracefully(Duration::from_secs(30)).await;
    let measured = (total - count_at_start) as f64;
    Measured {
        records_per_sec: measured / (end - start).as_secs_f64(),
        cpu_ms_per_1000: Some((cpu_end - cpu_start).as_secs_f64() * 1000.0 / (measured / 1000.0)),
        peak_rss_mb: rss,
        waits: Some(waits),
    }
}

fn grid(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|text| text.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|values: &Vec<usize>| !values.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// Full `GetRecords` pages each shard reads at least (at `BENCH_RECORDS=1`).
const PAGES_PER_SHARD: usize = 4;

/// The scenarios of the grid: `BENCH_SIZES` × `BENCH_SHARDS`, counts scaled by `BENCH_RECORDS`.
fn scenarios() -> Vec<Scenario> {
    let scale: f64 = std::env::var("BENCH_RECORDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let mut scenarios = Vec::new();
    for size in grid("BENCH_SIZES", &[200, 2048]) {
        for shards in grid("BENCH_SHARDS", &[1, 8, 64]) {
            // Enough that every shard reads several full pages (1000 records each): with fewer, a
            // shard's one partial page and the polls after it are all that is measured.
            let base: f64 = if size <= 512 { 128_000.0 } else { 64_000.0 };
            let base = base.max((shards * PAGES_PER_SHARD * 1000) as f64);
            let records = ((base * scale) as usize / shards).max(1) * shards;
            scenarios.push(Scenario { shards, size, records });
        }
    }
    scenarios
}

fn optional(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{v:.1}"))
}

/// Prints the throughput table (`BENCH_RECORDS` scales the counts, `BENCH_SHARDS` and `BENCH_SIZES`
/// narrow the grid) and returns its rows. With `BENCH_BASELINE` naming another build of the service,
/// prints the before/after table instead (see [`compare`]).
pub async fn run(binary: &Path) -> Vec<Row> {
    if let Some(baseline) = std::env::var_os("BENCH_BASELINE") {
        return compare(Path::new(&baseline), binary).await;
    }
    println!(
        "| shards | record size | records | ceiling rec/s | service rec/s | ratio | ceiling CPU ms / 1000 rec | service CPU ms / 1000 rec | service peak RSS MiB | shard readers waiting on |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    for scenario in scenarios() {
        let Scenario { shards, size, records } = scenario;
        let top = ceiling(scenario).await;
        let ours = service(scenario, binary).await;
        println!(
            "| {shards} | {size} B | {records} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} |",
            top.records_per_sec,
            ours.records_per_sec,
            ours.records_per_sec / top.records_per_sec,
            optional(top.cpu_ms_per_1000),
            optional(ours.cpu_ms_per_1000),
            optional(ours.peak_rss_mb),
            shares(ours.waits),
        );
        rows.push(Row { shards, size, ceiling: top.records_per_sec, service: ours.records_per_sec });
    }
    rows
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Before and after in one run: for each scenario, the ceiling once, then `BENCH_REPEAT` pairs
/// (default 3) of the `baseline` build and this one, their order alternating from pair to pair so
/// that neither always runs on a warmer or a busier machine. Prints each pair's after/before ratio
/// and their median, and the median rates and CPU of each build; returns this build's median rows.
async fn compare(baseline: &Path, binary: &Path) -> Vec<Row> {
    let repeat: usize = std::env::var("BENCH_REPEAT").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    println!("before: {}", baseline.display());
    println!("after: {}", binary.display());
    println!();
    println!(
        "| shards | record size | records | ceiling rec/s | before rec/s (median) | after rec/s (median) | after / before per pair | after / before (median) | before CPU ms / 1000 | after CPU ms / 1000 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    let mut rows = Vec::new();
    let mut all_ratios = Vec::new();
    for scenario in scenarios() {
        let Scenario { shards, size, records } = scenario;
        let top = ceiling(scenario).await;
        let (mut before, mut after, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut before_cpu, mut after_cpu) = (Vec::new(), Vec::new());
        for pair in 0..repeat {
            let (old, new) = if pair % 2 == 0 {
                let old = service(scenario, baseline).await;
                (old, service(scenario, binary).await)
            } else {
                let new = service(scenario, binary).await;
                (service(scenario, baseline).await, new)
            };
            ratios.push(new.records_per_sec / old.records_per_sec);
            before.push(old.records_per_sec);
            after.push(new.records_per_sec);
            before_cpu.extend(old.cpu_ms_per_1000);
            after_cpu.extend(new.cpu_ms_per_1000);
        }
        let per_pair: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let after_median = median(&mut after);
        println!(
            "| {shards} | {size} B | {records} | {:.0} | {:.0} | {after_median:.0} | {} | {:.2} | {:.1} | {:.1} |",
            top.records_per_sec,
            median(&mut before),
            per_pair.join(", "),
            median(&mut ratios.clone()),
            median(&mut before_cpu),
            median(&mut after_cpu),
        );
        all_ratios.extend(ratios);
        rows.push(Row { shards, size, ceiling: top.records_per_sec, service: after_median });
    }
    println!();
    println!(
        "after / before over every pair of every row: median {:.2}, mean {:.2}",
        median(&mut all_ratios.clone()),
        all_ratios.iter().sum::<f64>() / all_ratios.len() as f64
    );
    rows
}
