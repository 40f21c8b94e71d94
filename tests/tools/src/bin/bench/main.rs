//! The benchmark: `cargo run --release -p tools --bin bench`. It reports; it asserts nothing.
//!
//! Seven parts, each on fresh servers, each printing a Markdown table (`BENCH_ONLY=throughput,latency,
//! idle,idle_backoff,failover,backfill,memory` runs a subset; the default is all seven):
//! - **throughput** (`throughput.rs`): for each shard count (1, 8, 64) and record size (about 200 B and
//!   2 KB), the real release binary reading pre-filled records from the project's own DynamoDB Streams
//!   endpoint (the real AWS JSON protocol, so the SDK path is measured) against the **ceiling**, a plain
//!   async-nats program publishing the same messages with the same headers to a stream with the seed's
//!   settings; with the service's CPU per 1000 records and peak RSS. `BENCH_RECORDS` scales the record
//!   counts (default 1.0), `BENCH_SHARDS` (e.g. `8`) and `BENCH_SIZES` (e.g. `200`) narrow the grid,
//!   `BENCH_PERF=<file>` records a `perf` profile of the service while it drains.
//!   `BENCH_BASELINE=<binary>` compares another build of the service with this one in the same run
//!   (`BENCH_REPEAT` pairs per row, default 3, alternating order). The rows are also
//!   drawn as an SVG plot of records/s against shard count (`plot.rs`), written to `BENCH_PLOT`
//!   (default `target/bench-throughput.svg`).
//! - **latency** (`latency.rs`): write-to-arrival latency at a steady 200 records/s over 8 shards,
//!   polling at the default 1 s and at 50 ms; each record carries its exact creation time.
//! - **idle** (`idle.rs`): one replica with default settings holding 1 shard, 1000 idle shards, and
//!   1000 idle + 8 shards publishing at full speed: CPU, `GetRecords` per idle shard, writes to the
//!   checkpoint bucket by kind, RSS per idle shard, and whether any lease was lost meanwhile.
//! - **idle_backoff** (`idle_backoff.rs`): `GetRecords` per idle shard per hour polling every second
//!   and with `IDLE_POLL_MAX_MS` at 30 s, and the latency of the first write after a quiet spell.
//! - **failover** (`failover.rs`): three replicas at the default lease settings under a steady writer;
//!   the silence of a replica's shards after SIGKILL and after SIGTERM, and that nothing was lost.
//! - **backfill** (`backfill.rs`): one replica backfilling a synthetic table of `BENCH_BACKFILL_ITEMS`
//!   (default 1,000,000) items of 1 KiB at an unlimited read budget: items/s against the ceiling for
//!   rows of the same size, read units per item, CPU per 1000 items and peak RSS.
//! - **memory** (`memory.rs`): 64 busy shards of 2 KB records drained with a 256 MiB memory limit
//!   (the original deployment's) and without a budget, in the same run: peak RSS against the limit,
//!   records/s, and the readers' waits for the memory budget.
//!
//! It needs no cargo and no source tree when given built binaries: `BENCH_SERVICE_BIN` (a release
//! build of the service; without it the service is built with cargo) and `NATS_SERVER_BIN` (else the
//! repository's `.venv`, else `PATH`), so the bench binary can be copied to a bigger machine with them.
//! `BENCH_CORES=N` pins every service process to the first N cores (`taskset`), for per-core figures.

#![allow(clippy::unwrap_used)]

mod backfill;
mod failover;
mod idle;
mod idle_backoff;
mod kv_traffic;
mod latency;
mod memory;
mod plot;
mod procfs;
mod records;
mod service;
mod throughput;

/// The parts `BENCH_ONLY` can name, in the order they run.
const PARTS: [&str; 7] = ["throughput", "latency", "idle", "idle_backoff", "failover", "backfill", "memory"];

/// The parts to run: those `BENCH_ONLY` names (comma-separated), or all of them.
fn selected() -> Vec<&'static str> {
    let Ok(only) = std::env::var("BENCH_ONLY") else { return PARTS.to_vec() };
    let named: Vec<&str> = only.split(',').map(str::trim).filter(|part| !part.is_empty()).collect();
    if let Some(unknown) = named.iter().find(|part| !PARTS.contains(part)) {
        panic!("BENCH_ONLY names {unknown:?}; the parts are {}", PARTS.join(","));
    }
    PARTS.into_iter().filter(|part| named.contains(part)).collect()
}

#[tokio::main]
async fn main() {
    let parts = selected();
    let binary = match std::env::var_os("BENCH_SERVICE_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            let built = test_support::process::build_service();
            assert!(
                built.parent().is_some_and(|dir| dir.ends_with("release")),
                "run the benchmark with --release: `cargo run --release -p tools --bin bench`"
            );
            built
        }
    };
    assert!(binary.is_file(), "no service binary at {} (BENCH_SERVICE_BIN)", binary.display());
    if let Some(cores) = std::env::var("BENCH_CORES").ok().filter(|cores| !cores.is_empty()) {
        let cores: usize = cores.parse().ok().filter(|n| *n > 0).expect("BENCH_CORES is a number of cores");
        test_support::process::pin_services_to(cores);
        println!("service pinned to {cores} core{} (taskset)", if cores == 1 { "" } else { "s" });
    }
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            println!();
        }
        match *part {
            "throughput" => {
                let rows = throughput::run(&binary).await;
                let path = plot::path();
                plot::write(&rows, &path).unwrap_or_else(|err| panic!("write the plot {}: {err}", path.display()));
                println!();
                println!("plot: {}", path.display());
            }
            "latency" => latency::run(&binary).await,
            "idle" => idle::run(&binary).await,
            "idle_backoff" => idle_backoff::run(&binary).await,
            "failover" => failover::run(&binary).await,
            "backfill" => backfill::run(&binary).await,
            "memory" => memory::run(&binary).await,
            other => unreachable!("{other} is not in PARTS"),
        }
    }
}
