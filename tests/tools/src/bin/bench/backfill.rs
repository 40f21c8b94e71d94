//! Backfill speed (issue 17): one replica backfills a synthetic table of `BENCH_BACKFILL_ITEMS` items
//! (default 1,000,000) of about 1 KB at an unlimited read budget, with the default segment count
//! (one per 64 MiB of the table: 15 for a million 1 KiB items). The emulator generates the items as
//! a `Scan` reads them, so the table costs no memory and no writes.
//!
//! The clock runs from the first snapshot row in the stream (start-up, pinning and the 2 s margin
//! before the first `Scan` are not scan speed) to the last one; the time to `phase == "done"` (the
//! replay of the stream after the scan) is printed beside it. Items per second are compared with the
//! throughput scenario's ceiling (a plain async-nats program) publishing messages of the snapshot
//! rows' size over as many concurrent pipelines as there are segments. Read units per item come from
//! the service's own counters, as `/metrics` reports them.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use tokio::time::Instant;

use crate::procfs::{cpu_time, peak_rss_mb};
use crate::service::{self, STREAM, scrape, sum};
use crate::throughput::{self, stream_messages};
use streams_emulator::FaultyStreams;
use test_support::{NatsServer, ServiceProcess, free_port, http_get};

/// The table's name.
const TABLE: &str = "bench-backfill";

/// Each item's size by DynamoDB's rules: "~1 KB" in the issue.
const ITEM_BYTES: usize = 1024;

/// An unlimited budget: far above what one machine can read (a million 1 KiB items are 62,500 read
/// units of an eventually consistent scan).
const UNLIMITED_READ_UNITS: &str = "1000000000";

/// Messages the ceiling publishes: enough for a steady rate over several seconds, few enough that its
/// pre-built messages (about 1 KB each) stay small in memory.
const CEILING_RECORDS: usize = 240_000;

/// How long the backfill may take before the benchmark gives up.
const DEADLINE: Duration = Duration::from_secs(1800);

/// How often the stream and `/status` are polled: fine enough for runs of tens of seconds.
const POLL: Duration = Duration::from_millis(20);

/// The backfill's phase and segment count from the replica's `/status`.
async fn backfill_status(port: u16) -> Option<(String, u64)> {
    let (_, body) = http_get(port, "/status").await.ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let backfill = &status["backfills"][TABLE];
    Some((backfill["phase"].as_str()?.to_owned(), backfill["segments"].as_u64()?))
}

/// Prints the backfill row.
pub async fn run(binary: &Path) {
    let items: u64 = std::env::var("BENCH_BACKFILL_ITEMS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    source.synthetic_table(TABLE, items, ITEM_BYTES);
    let port = free_port();
    let extra = [("BACKFILL_TABLES", TABLE.to_owned()), ("BACKFILL_READ_UNITS_PER_SEC", UNLIMITED_READ_UNITS.into())];
    let env = service::env(&nats, &source, &[TABLE.to_owned()], port, &extra);
    let process = ServiceProcess::start_ready(binary, &env, port, Duration::from_secs(60)).await;
    let pid = process.pid();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());

    let give_up = Instant::now() + DEADLINE;
    let mut first = None;
    let mut last_row = None;
    let (done_at, segments) = loop {
        let count = stream_messages(&js).await;
        let now = Instant::now();
        if count > 0 && first.is_none() {
            first = Some((now, count, cpu_time(pid), cpu_time(std::process::id())));
        }
        if count >= items && last_row.is_none() {
            last_row = Some((now, cpu_time(pid), cpu_time(std::process::id())));
        }
        if let Some((phase, segments)) = backfill_status(port).await {
            assert!(phase != "inexact", "the backfill ended inexact:\n{}", process.log());
            if phase == "done" {
                break (now, segments);
            }
        }
        assert!(now < give_up, "{count} of {items} snapshot rows after {DEADLINE:?}:\n{}", process.log());
        tokio::time::sleep(POLL).await;
    };
    let count = stream_messages(&js).await;
    assert_eq!(count, items, "snapshot rows in the stream (no live writes ran)");
    let rss = peak_rss_mb(pid);
    let metrics = scrape(port).await;
    let read_units = sum(&metrics, "backfill_read_units_total", "");
    let published = sum(&metrics, "backfill_items_total", "");
    let sample = js.get_stream(STREAM).await.unwrap().get_raw_message(1).await.unwrap();
    let row_bytes = sample.payload.len();
    process.stop_gracefully(Duration::from_secs(30)).await;
    drop(nats);

    let (start, count_at_start, cpu_start, bench_cpu_start) = first.unwrap();
    let (end, cpu_end, bench_cpu_end) = last_row.unwrap_or((done_at, cpu_time(pid), cpu_time(std::process::id())));
    let measured = (items - count_at_start) as f64;
    let seconds = (end - start).as_secs_f64();
    let items_per_sec = measured / seconds;
    let cpu_per_1000 = (cpu_end - cpu_start).as_secs_f64() * 1000.0 / (measured / 1000.0);
    let source_cpu_per_1000 = (bench_cpu_end - bench_cpu_start).as_secs_f64() * 1000.0 / (measured / 1000.0);
    let pipelines = usize::try_from(segments).unwrap_or(1).max(1);
    let ceiling = throughput::ceiling_rate(pipelines, row_bytes, CEILING_RECORDS.min(items as usize)).await;
    println!(
        "| items | item size | segments | snapshot row | ceiling msg/s | backfill items/s | ratio | read units / item | service CPU ms / 1000 items | service peak RSS MiB | first row → last row s | first row → done s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {items} | {ITEM_BYTES} B | {segments} | {row_bytes} B | {ceiling:.0} | {items_per_sec:.0} | {:.2} | {:.4} | {cpu_per_1000:.1} | {} | {seconds:.1} | {:.1} |",
        items_per_sec / ceiling,
        read_units / published,
        rss.map_or("–".into(), |mb| format!("{mb:.1}")),
        (done_at - start).as_secs_f64(),
    );
    println!();
    println!(
        "read units {read_units:.1} for {published} items; the benchmark process (emulator generating the \
         items, and this poller) used {source_cpu_per_1000:.1} CPU ms / 1000 items meanwhile"
    );
}
