//! What an idle shard costs in `GetRecords` calls (AWS bills them as stream read requests), polling
//! every `POLL_INTERVAL_MS` as by default and with the opt-in idle backoff (`IDLE_POLL_MAX_MS`, 30 s),
//! and what the backoff costs in turn: the latency of the first write after a quiet spell.
//!
//! Each run, on fresh servers: one replica, [`SHARDS`] one-shard tables, nothing written; after
//! [`RAMP`] (long enough for the backoff to reach its cap: 1 + 2 + 4 + 8 + 16 s) the calls the source
//! answers are counted over [`WINDOW`]. Then one record is written to each of [`PROBES`] shards, one
//! every [`PROBE_EVERY`] (so they land at every phase of the backoff), and each record's
//! write-to-arrival latency is taken by a subscriber on the same host.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use streams_emulator::{FaultyStreams, Op, ViewType};
use test_support::{NatsServer, ServiceProcess, free_port};
use tokio::time::Instant;

use crate::records::{now_nanos, read_stamp, stamped};
use crate::service::{self, START_DEADLINE, STREAM, table, wait_for_readers};

const SHARDS: usize = 100;
const RAMP: Duration = Duration::from_secs(40);
const WINDOW: Duration = Duration::from_secs(60);
const PROBES: usize = 20;
const PROBE_EVERY: Duration = Duration::from_millis(1_500);

/// The figures of one run.
struct Figures {
    get_records_per_shard_hour: f64,
    /// Write-to-arrival latencies of the probes, seconds, sorted.
    first_write: Vec<f64>,
}

async fn measure(binary: &Path, cap_ms: Option<u64>) -> Figures {
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    let tables: Vec<String> = (0..SHARDS).map(table).collect();
    for name in &tables {
        source.create_table(name, "pk", ViewType::NewAndOldImages);
    }
    let port = free_port();
    let extra: Vec<(&str, String)> = cap_ms.map(|cap| ("IDLE_POLL_MAX_MS", cap.to_string())).into_iter().collect();
    let env = service::env(&nats, &source, &tables, port, &extra);
    let process = ServiceProcess::start_ready(binary, &env, port, START_DEADLINE).await;
    wait_for_readers(&[port], SHARDS).await;
    tokio::time::sleep(RAMP).await;
    let (calls, started) = (source.calls(Op::GetRecords), Instant::now());
    tokio::time::sleep(WINDOW).await;
    let calls = (source.calls(Op::GetRecords) - calls) as f64;
    let get_records_per_shard_hour = calls / SHARDS as f64 / started.elapsed().as_secs_f64() * 3_600.0;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut messages = client.subscribe(format!("{STREAM}.>")).await.unwrap();
    client.flush().await.unwrap();
    let writer = {
        let source = source.clone();
        tokio::spawn(async move {
            for probe in 0..PROBES {
                source.put(&table(probe * (SHARDS / PROBES)), stamped(probe as u64)).unwrap();
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };
    let mut first_write = Vec::with_capacity(PROBES);
    let give_up = Instant::now() + PROBE_EVERY * PROBES as u32 + Duration::from_secs(120);
    while first_write.len() < PROBES && Instant::now() < give_up {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { continue };
        let arrived = now_nanos();
        if let Some((_, written)) = read_stamp(&message.payload) {
            first_write.push(arrived.saturating_sub(written) as f64 / 1e9);
        }
    }
    writer.await.unwrap();
    process.stop_gracefully(Duration::from_secs(30)).await;
    first_write.sort_by(f64::total_cmp);
    Figures { get_records_per_shard_hour, first_write }
}

/// The default (no backoff) and a 30 s cap, in one run.
pub async fn run(binary: &Path) {
    println!(
        "| idle poll cap | idle shards | GetRecords per idle shard per hour | first write after idle: p50 s | max s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, cap) in [("none (POLL_INTERVAL_MS 1 s)", None), ("IDLE_POLL_MAX_MS 30 s", Some(30_000))] {
        let figures = measure(binary, cap).await;
        let latencies = &figures.first_write;
        let p50 = latencies.get(latencies.len() / 2).copied().unwrap_or(f64::NAN);
        let max = latencies.last().copied().unwrap_or(f64::NAN);
        println!(
            "| {name} | {SHARDS} | {:.0} | {p50:.2} | {max:.2} |{}",
            figures.get_records_per_shard_hour,
            if latencies.len() < PROBES {
                format!(" ({} of {PROBES} probes arrived)", latencies.len())
            } else {
                String::new()
            }
        );
    }
}
