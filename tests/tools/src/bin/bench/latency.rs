//! Write-to-arrival latency at a steady write rate: each record carries its exact creation time, and a
//! NATS subscriber on the same host takes the time of arrival.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::records::{now_nanos, read_stamp, stamped};
use crate::service::{Running, STREAM, start_one_shard_tables, table};

/// Writes at a steady `rate` (records/s) over `shards` for `seconds` and returns the write-to-arrival
/// latencies (ms), sorted.
async fn latencies(binary: &Path, shards: usize, poll_interval_ms: u64, rate: u64, seconds: u64) -> Vec<f64> {
    let Running { nats, source, process, .. } = start_one_shard_tables(binary, shards, poll_interval_ms).await;
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
                source.put(&table(i as usize % shards), stamped(i)).unwrap();
            }
        })
    };
    let mut latencies = Vec::with_capacity(total as usize);
    let give_up = Instant::now() + Duration::from_secs(seconds + 60);
    while (latencies.len() as u64) < total && Instant::now() < give_up {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { break };
        let arrived = now_nanos();
        let written = read_stamp(&message.payload).map_or(arrived, |(_, written)| written);
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

/// Steady writes: 200 records/s over 8 shards for 10 s, polling at the default 1 s and at 50 ms (the
/// gap after a partial page shortened with it: at 25 records/s per shard most reads are partial).
pub async fn run(binary: &Path) {
    println!("| poll interval | records | latency p50 ms | latency p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|");
    for poll in [1000, 50] {
        let latencies = latencies(binary, 8, poll, 200, 10).await;
        println!(
            "| {poll} ms | {} | {:.1} | {:.1} | {:.1} |",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN),
        );
    }
}
