//! Failover with three replicas at the default lease settings: how long the shards of a replica are
//! silent after it is killed (SIGKILL: its leases must expire first) and after it stops gracefully
//! (SIGTERM: it releases them, and a peer takes them at its next read of the lease table).
//!
//! A writer puts stamped records at a steady rate, round robin over six one-shard tables, and a core
//! NATS subscriber takes the first arrival of each. For the tables the stopped replica held, the table
//! reports the longest gap between two consecutive arrivals on one table and the longest
//! write-to-arrival latency, among the records written from shortly before the event until every shard
//! is held again and everything written has arrived. At the end, every record written must have
//! arrived (nothing lost); copies seen twice are counted (a killed replica's unacknowledged tail is
//! re-published by design, and JetStream's duplicate window absorbs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use streams_emulator::{FaultyStreams, ViewType};
use test_support::{NatsServer, ServiceProcess, free_port, wait_for};
use tokio::time::Instant;

use crate::records::{now_nanos, read_stamp, stamped};
use crate::service::{self, START_DEADLINE, STREAM, status};

const TABLES: usize = 6;
/// Records per second over all tables: about 8 per table, so a table's arrivals are never far apart
/// in steady state and a silent shard stands out.
const RATE: u64 = 50;
/// Steady writing measured before the first event, as the baseline of both figures.
const STEADY: Duration = Duration::from_secs(10);
/// Records written this long before an event count towards it: their arrivals bound the gap.
const LEAD: Duration = Duration::from_secs(2);
/// Idle shards poll every 100 ms (the default is 1 s), so the gaps show the lease hand-over rather than
/// the polling; the steady row shows what polling alone costs.
const POLL_INTERVAL_MS: &str = "100";
/// The service's defaults (`src/config/`): `LEASE_TTL_SEC` 10 and `LEASE_RENEW_INTERVAL_MS` a third
/// of it. The replicas run with neither set.
const DEFAULT_TTL: Duration = Duration::from_secs(10);
const DEFAULT_RENEW: Duration = Duration::from_nanos(10_000_000_000 / 3);
/// How long catching up after an event may take before the harness gives up.
const DEADLINE: Duration = Duration::from_secs(90);

fn table(n: usize) -> String {
    format!("failover-{n}")
}

/// The first arrival of one record, and how many copies arrived.
struct Arrival {
    written: u128,
    first: u128,
    copies: u32,
}

type Arrivals = Arc<Mutex<BTreeMap<u64, Arrival>>>;

/// Subscribes to every table's subject; returns once the subscription is registered.
async fn watch_arrivals(nats: &NatsServer) -> Arrivals {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut messages = client.subscribe(format!("{STREAM}.>")).await.unwrap();
    client.flush().await.unwrap();
    let arrivals: Arrivals = Arc::default();
    let seen = Arc::clone(&arrivals);
    tokio::spawn(async move {
        let _client = client;
        while let Some(message) = messages.next().await {
            let arrived = now_nanos();
            let (item, written) = read_stamp(&message.payload).expect("a stamped event");
            let mut seen = seen.lock().unwrap();
            seen.entry(item).or_insert(Arrival { written, first: arrived, copies: 0 }).copies += 1;
        }
    });
    arrivals
}

/// Writes record `0, 1, 2, …` at `RATE`, record `i` to table `i % TABLES`, until aborted.
struct Writer {
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(source: FaultyStreams) -> Writer {
        let written = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&written);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / RATE));
            for i in 0u64.. {
                tick.tick().await;
                source.put(&table(i as usize % TABLES), stamped(i)).unwrap();
                count.store(i + 1, Ordering::SeqCst);
            }
        });
        Writer { written, task }
    }

    fn count(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Stops writing (only ever between two records) and returns how many were written.
    async fn stop(self) -> u64 {
        self.task.abort();
        let _ = self.task.await;
        self.written.load(Ordering::SeqCst)
    }
}

/// Waits until the first `written` records have arrived.
async fn wait_arrived(written: u64, arrivals: &Arrivals) {
    wait_for(&format!("all {written} records written so far to arrive"), DEADLINE, || async {
        (arrivals.lock().unwrap().range(..written).count() as u64 == written).then_some(())
    })
    .await;
}

struct Replica {
    id: String,
    port: u16,
    process: ServiceProcess,
}

async fn start_replica(binary: &Path, nats: &NatsServer, source: &FaultyStreams, id: &str) -> Replica {
    let port = free_port();
    let tables: Vec<String> = (0..TABLES).map(table).collect();
    let extra = [
        ("REPLICA_ID", id.to_owned()),
        ("POLL_INTERVAL_MS", POLL_INTERVAL_MS.to_owned()),
        ("POLL_GAP_MS", POLL_INTERVAL_MS.to_owned()),
    ];
    let env = service::env(nats, source, &tables, port, &extra);
    let process = ServiceProcess::start_ready(binary, &env, port, START_DEADLINE).await;
    Replica { id: id.to_owned(), port, process }
}

/// The tables whose lease `replica` holds.
async fn held_tables(replica: &Replica) -> Vec<usize> {
    let leases = status(replica.port).await.map(|status| status.leases).unwrap_or_default();
    (0..TABLES).filter(|n| leases.iter().any(|lease| lease.starts_with(&format!("{}/", table(*n))))).collect()
}

/// Waits until these replicas hold every table's lease once, with loads within one.
async fn wait_for_balance(what: &str, replicas: &[Replica]) {
    wait_for(what, DEADLINE, || async {
        let mut loads = Vec::new();
        let mut held = Vec::new();
        for replica in replicas {
            let tables = held_tables(replica).await;
            loads.push(tables.len());
            held.extend(tables);
        }
        held.sort_unstable();
        held.dedup();
        let spread = loads.iter().max()? - loads.iter().min()?;
        (held.len() == TABLES && loads.iter().sum::<usize>() == TABLES && spread <= 1).then_some(())
    })
    .await;
}

/// The figures of one event.
struct Gap {
    event: String,
    moved: usize,
    /// From the signal until the stopped replica's process exited.
    exited: Option<Duration>,
    /// From the signal until the remaining replicas held every shard.
    takeover: Option<Duration>,
    /// The longest interval between consecutive first arrivals on one of the tables.
    longest_gap: Duration,
    /// The longest write-to-arrival latency on those tables.
    longest_latency: Duration,
    target: String,
}

/// The gap and latency figures of `tables` over the records written from `from` (ns since the epoch)
/// up to the `until`-th record.
fn gaps(arrivals: &Arrivals, tables: &[usize], from: u128, until: u64) -> (Duration, Duration) {
    let arrivals = arrivals.lock().unwrap();
    let mut longest_gap = 0;
    let mut longest_latency = 0;
    for table in tables {
        let mut firsts: Vec<u128> = arrivals
            .range(..until)
            .filter(|(item, arrival)| **item as usize % TABLES == *table && arrival.written >= from)
            .map(|(_, arrival)| {
                longest_latency = longest_latency.max(arrival.first.saturating_sub(arrival.written));
                arrival.first
            })
            .collect();
        firsts.sort_unstable();
        longest_gap = firsts.windows(2).map(|pair| pair[1] - pair[0]).fold(longest_gap, u128::max);
    }
    (Duration::from_nanos(longest_gap as u64), Duration::from_nanos(longest_latency as u64))
}

/// Stops the replica (by `signal`) that holds the most leases and measures its tables' gap.
async fn stop_one(replicas: &mut Vec<Replica>, signal: &str, writer: &Writer, arrivals: &Arrivals) -> Gap {
    let mut loads = Vec::new();
    for replica in replicas.iter() {
        loads.push(held_tables(replica).await);
    }
    let (index, moved) = loads.into_iter().enumerate().max_by_key(|(_, tables)| tables.len()).unwrap();
    let stopped = replicas.remove(index);
    // A lead of steady writing first, so the records that count towards this event were not held up
    // by the one before (its catch-up would show as this event's latency).
    let settled = writer.count() + RATE * LEAD.as_secs();
    wait_for("a lead of steady writes", LEAD * 4, || async { (writer.count() >= settled).then_some(()) }).await;
    let from = now_nanos() - LEAD.as_nanos();
    let signalled = Instant::now();
    let target = if signal == "KILL" {
        stopped.process.signal("KILL");
        drop(stopped.process);
        format!("< TTL + renew interval = {:.1} s", (DEFAULT_TTL + DEFAULT_RENEW).as_secs_f64())
    } else {
        stopped.process.stop_gracefully(DEADLINE).await;
        "< 1 s".to_owned()
    };
    let exited = signalled.elapsed();
    wait_for_balance(&format!("the others taking {}'s shards after SIG{signal}", stopped.id), replicas).await;
    let takeover = signalled.elapsed();
    wait_arrived(writer.count(), arrivals).await;
    let (longest_gap, longest_latency) = gaps(arrivals, &moved, from, writer.count());
    let event = format!("SIG{signal} {}", stopped.id);
    Gap {
        event,
        moved: moved.len(),
        exited: Some(exited),
        takeover: Some(takeover),
        longest_gap,
        longest_latency,
        target,
    }
}

/// Runs the scenario and prints its table.
pub async fn run(binary: &Path) {
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    for n in 0..TABLES {
        source.create_table(&table(n), "pk", ViewType::NewAndOldImages);
    }
    let arrivals = watch_arrivals(&nats).await;
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(start_replica(binary, &nats, &source, id).await);
    }
    wait_for_balance("three replicas holding two shards each", &replicas).await;
    let writer = Writer::start(source.clone());

    // The baseline: steady writing with every shard held.
    let from = now_nanos();
    let steady_end = writer.count() + RATE * STEADY.as_secs();
    wait_for("the steady phase's writes", STEADY * 2, || async { (writer.count() >= steady_end).then_some(()) }).await;
    wait_arrived(writer.count(), &arrivals).await;
    let (longest_gap, longest_latency) = gaps(&arrivals, &(0..TABLES).collect::<Vec<_>>(), from, writer.count());
    let steady = Gap {
        event: "steady, 3 replicas".into(),
        moved: 0,
        exited: None,
        takeover: None,
        longest_gap,
        longest_latency,
        target: String::new(),
    };

    let killed = stop_one(&mut replicas, "KILL", &writer, &arrivals).await;
    let stopped = stop_one(&mut replicas, "TERM", &writer, &arrivals).await;

    let written = writer.stop().await;
    wait_arrived(written, &arrivals).await;
    let (arrived, copies) = {
        let arrivals = arrivals.lock().unwrap();
        let copies: u64 = arrivals.range(..written).map(|(_, arrival)| u64::from(arrival.copies)).sum();
        (arrivals.range(..written).count() as u64, copies)
    };
    for replica in replicas {
        replica.process.stop_gracefully(DEADLINE).await;
    }

    println!(
        "lease settings: LEASE_TTL_SEC and LEASE_RENEW_INTERVAL_MS unset, so TTL {:?} and renew interval {:?} \
         (the defaults); POLL_INTERVAL_MS {POLL_INTERVAL_MS}; {RATE} records/s over {TABLES} one-shard tables",
        DEFAULT_TTL, DEFAULT_RENEW
    );
    println!();
    println!(
        "| event | held shards moved | exited after, s | others hold all after, s | longest arrival gap, s | longest write→arrival, s | target |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for gap in [steady, killed, stopped] {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {} |",
            gap.event,
            gap.moved,
            gap.exited.map_or("–".into(), |d| format!("{:.2}", d.as_secs_f64())),
            gap.takeover.map_or("–".into(), |d| format!("{:.2}", d.as_secs_f64())),
            gap.longest_gap.as_secs_f64(),
            gap.longest_latency.as_secs_f64(),
            gap.target,
        );
    }
    println!();
    println!(
        "records written {written}, arrived {arrived} (lost {}), copies seen by the subscriber {copies} \
         (duplicates {})",
        written - arrived,
        copies - arrived
    );
}
