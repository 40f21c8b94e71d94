//! Memory under a container limit (issue 18): the release binary draining 64 busy one-shard tables of
//! 2 KB records, once with a memory limit of 256 MiB (`MEMORY_LIMIT_MB=256`, the original deployment's
//! container limit: the budget is 75 % of it less the process's fixed memory) and once without a
//! budget (`MEMORY_LIMIT_MB=0`), in the same run: peak RSS (`VmHWM`), records/s, and how often readers
//! waited for the budget. `BENCH_MEMORY_LIMIT_MB` changes the limit, `BENCH_MEMORY_RECORDS` the
//! record count (default 256,000: 4000 per shard, about nine 1 MB pages each).

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;
use tokio::time::Instant;

use crate::procfs::{cpu_time, peak_rss_mb};
use crate::records::insert;
use crate::service::{Running, scrape, start_one_shard_tables_with, sum, table};
use crate::throughput::{filler, stream_messages};

const SHARDS: usize = 64;
const SIZE: usize = 2048;
const LIMIT_MB: u64 = 256;
const RECORDS: usize = 256_000;

struct Measured {
    records_per_sec: f64,
    cpu_ms_per_1000: f64,
    peak_rss_mb: Option<f64>,
    budget_mb: f64,
    most_held_mb: f64,
    waits: f64,
}

fn number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

/// One drain of `records` records over [`SHARDS`] shards with `MEMORY_LIMIT_MB=limit_mb`.
async fn drain(binary: &Path, limit_mb: u64, records: usize) -> Measured {
    let per_shard = records / SHARDS;
    let total = (per_shard * SHARDS) as u64;
    let extra = [("MEMORY_LIMIT_MB", limit_mb.to_string())];
    let Running { nats, source, process, port } = start_one_shard_tables_with(binary, SHARDS, 100, &extra).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let pid = process.pid();
    for shard in 0..SHARDS {
        let name = table(shard);
        for i in 0..per_shard {
            source.put(&name, insert(i as u64, "payload", json!({"S": filler(SIZE)}))).unwrap();
        }
    }
    let mut first = None;
    let mut most_held: f64 = 0.0;
    let mut last_scrape = Instant::now();
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
        if now - last_scrape >= Duration::from_millis(200) {
            most_held = most_held.max(sum(&scrape(port).await, "memory_held_bytes", ""));
            last_scrape = now;
        }
        assert!(now < give_up, "the service published {count} of {total} records in 10 minutes:\n{}", process.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let cpu_end = cpu_time(pid);
    let peak_rss_mb = peak_rss_mb(pid);
    let metrics = scrape(port).await;
    let (start, count_at_start, cpu_start) = first.unwrap();
    process.stop_gracefully(Duration::from_secs(30)).await;
    drop(source);
    let measured = (total - count_at_start) as f64;
    let mib = |bytes: f64| bytes / f64::from(1 << 20);
    Measured {
        records_per_sec: measured / (end - start).as_secs_f64(),
        cpu_ms_per_1000: (cpu_end - cpu_start).as_secs_f64() * 1000.0 / (measured / 1000.0),
        peak_rss_mb,
        budget_mb: mib(sum(&metrics, "memory_budget_bytes", "")),
        most_held_mb: mib(most_held),
        waits: sum(&metrics, "memory_waits_total", ""),
    }
}

/// Prints the table: with the limit's budget, then without a budget.
pub async fn run(binary: &Path) {
    let limit_mb = number("BENCH_MEMORY_LIMIT_MB", LIMIT_MB);
    let records = number("BENCH_MEMORY_RECORDS", RECORDS as u64) as usize;
    println!(
        "| shards | record size | records | MEMORY_LIMIT_MB | budget MiB | most held MiB (sampled) | budget waits | service rec/s | CPU ms / 1000 rec | peak RSS MiB | peak RSS / limit |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for limit in [limit_mb, 0] {
        let m = drain(binary, limit, records).await;
        let (setting, share) = match limit {
            0 => ("0 (no budget)".to_owned(), m.peak_rss_mb.map(|rss| rss / limit_mb as f64)),
            limit => (limit.to_string(), m.peak_rss_mb.map(|rss| rss / limit as f64)),
        };
        println!(
            "| {SHARDS} | {SIZE} B | {records} | {setting} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
            m.budget_mb,
            m.most_held_mb,
            m.waits,
            m.records_per_sec,
            m.cpu_ms_per_1000,
            m.peak_rss_mb.map_or("–".into(), |rss| format!("{rss:.1}")),
            share.map_or("–".into(), |share| format!("{:.0} % of {limit_mb} MiB", share * 100.0)),
        );
    }
}
