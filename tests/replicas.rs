//! Several replicas of the real binary against one `nats-server` and the moto emulator, over six
//! tables, while a writer keeps writing: the shards split evenly; a SIGTERM hands shards over at once;
//! a rolling restart loses nothing; a SIGKILL moves shards after the lease TTL; a replica frozen past
//! its TTL stops publishing. At the end, the stream must hold every write exactly once, in write order
//! per item.
//!
//! The graceful phases run on a stream created beforehand with a 100 ms duplicate window, so JetStream
//! cannot hide a record published twice; only before the crash phases is the window widened to the
//! seed's 2 minutes, because a crashed replica's unacknowledged tail is re-published by design.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use futures::StreamExt;
use test_support::fixtures;
use test_support::{Moto, NatsServer, ServiceProcess, http_get, wait_for};
use tokio::time::Instant;

const STREAM: &str = "dynamodb_streams";
const TABLES: [&str; 6] = ["tab0", "tab1", "tab2", "tab.3", "tab4", "tab5"];
const DEADLINE: Duration = Duration::from_secs(60);
/// The lease TTL of the replicas under test (renewal every second).
const TTL: Duration = Duration::from_secs(3);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

/// `(table, pk, version)` of one write.
type Item = (String, String, i64);

/// Writes `v = 1, 2, 3, …` to ten items per table, round robin, until stopped; remembers when each
/// write returned.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Vec<(Item, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(ddb: aws_sdk_dynamodb::Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (Arc::clone(&stop), Arc::clone(&written));
        let task = tokio::spawn(async move {
            let mut versions: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut n = 0usize;
            while !flag.load(Ordering::SeqCst) {
                let table = TABLES[n % TABLES.len()].to_owned();
                let pk = format!("k{}", (n / TABLES.len()) % 10);
                let version = versions.entry((table.clone(), pk.clone())).or_default();
                *version += 1;
                ddb.put_item()
                    .table_name(&table)
                    .item("pk", Av::S(pk.clone()))
                    .item("v", Av::N(version.to_string()))
                    .send()
                    .await
                    .unwrap();
                log.lock().unwrap().push(((table, pk, *version), Instant::now()));
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Writer { stop, written, task }
    }

    async fn finish(self) -> Vec<(Item, Instant)> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.written.lock().unwrap().clone()
    }
}

/// The first arrival of every item on the subjects (a core subscription sees publishes as they land).
fn watch_arrivals(client: async_nats::Client) -> Arc<Mutex<BTreeMap<Item, Instant>>> {
    let arrivals = Arc::new(Mutex::new(BTreeMap::new()));
    let seen = Arc::clone(&arrivals);
    tokio::spawn(async move {
        let mut messages = client.subscribe("dynamodb_streams.>").await.unwrap();
        while let Some(message) = messages.next().await {
            let json: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            seen.lock().unwrap().entry(item_of(&json)).or_insert_with(Instant::now);
        }
    });
    arrivals
}

fn item_of(json: &serde_json::Value) -> Item {
    let version = json["new_image"]["v"].as_i64().unwrap();
    (json["table_name"].as_str().unwrap().to_owned(), json["keys"]["pk"].as_str().unwrap().to_owned(), version)
}

/// Waits until every write made so far has arrived; on time-out, names what is missing and what each
/// replica reports.
async fn wait_arrived(writer: &Writer, arrivals: &Mutex<BTreeMap<Item, Instant>>, replicas: &[&Replica]) {
    let written: Vec<Item> = writer.written.lock().unwrap().iter().map(|(item, _)| item.clone()).collect();
    let give_up = Instant::now() + DEADLINE;
    loop {
        let missing: Vec<Item> = {
            let arrived = arrivals.lock().unwrap();
            written.iter().filter(|item| !arrived.contains_key(*item)).cloned().collect()
        };
        if missing.is_empty() {
            return;
        }
        if Instant::now() >= give_up {
            let mut report = String::new();
            for replica in replicas {
                let status = http_get(replica.port, "/status").await.map(|(_, body)| body).unwrap_or_default();
                let log = replica.process.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                report.push_str(&format!("\n{}: {status}\n{}", replica.id, tail.join("\n")));
            }
            panic!(
                "{} writes never arrived, first {:?}; replicas:{report}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica process and its HTTP port.
struct Replica {
    id: String,
    port: u16,
    process: ServiceProcess,
}

async fn start_replica(nats: &NatsServer, moto: &Moto, id: &str) -> Replica {
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(nats, moto, &TABLES.join(","), port);
    env.extend(
        [("REPLICA_ID", id), ("LEASE_TTL_SEC", "3"), ("SHUTDOWN_TIMEOUT_SEC", "20")]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let process = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    Replica { id: id.to_owned(), port, process }
}

/// The leases each replica reports holding (`None` when it does not answer).
async fn holdings(replicas: &[&Replica]) -> Vec<Option<BTreeSet<String>>> {
    let mut out = Vec::new();
    for replica in replicas {
        let leases = match http_get(replica.port, "/status").await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok().map(|status| {
                status["leases"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(str::to_owned))
                    .collect()
            }),
            _ => None,
        };
        out.push(leases);
    }
    out
}

/// Waits until these replicas hold all six shards, each exactly once, with loads within one.
async fn wait_for_balance(what: &str, replicas: &[&Replica]) {
    wait_for(what, DEADLINE, || async {
        let held = holdings(replicas).await;
        let held: Vec<BTreeSet<String>> = held.into_iter().collect::<Option<_>>()?;
        let loads: Vec<usize> = held.iter().map(BTreeSet::len).collect();
        let union: BTreeSet<&String> = held.iter().flatten().collect();
        let spread = loads.iter().max()? - loads.iter().min()?;
        (union.len() == TABLES.len() && loads.iter().sum::<usize>() == TABLES.len() && spread <= 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_split_hand_over_roll_fail_over_and_fence_without_losing_or_doubling_a_record() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    for table in TABLES {
        fixtures::create_table(&ddb, table, Some(StreamViewType::NewAndOldImages)).await;
    }
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let mut stream_config = fixtures::stream_without_dedup(STREAM);
    js.create_stream(stream_config.clone()).await.unwrap();
    let arrivals = watch_arrivals(client.clone());
    let writer = Writer::start(ddb.clone());

    // Three replicas split the six shards two by two.
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(start_replica(&nats, &moto, id).await);
    }
    wait_for_balance("three replicas holding two shards each", &replicas.iter().collect::<Vec<_>>()).await;
    let balanced = Instant::now();
    // A steady phase of about 60 writes, all arrived, as the latency baseline.
    let target = writer.written.lock().unwrap().len() + 60;
    wait_for("60 more writes", DEADLINE, || async { (writer.written.lock().unwrap().len() >= target).then_some(()) })
        .await;
    wait_arrived(&writer, &arrivals, &replicas.iter().collect::<Vec<_>>()).await;

    // SIGTERM one: its shards are taken at once by the others, and it exits 0.
    let leaving = replicas.pop().unwrap();
    let stopped = Instant::now();
    let log = leaving.process.stop_gracefully(Duration::from_secs(25)).await;
    assert!(log.contains("leases released"), "{log}");
    wait_for_balance("two replicas holding three shards each", &replicas.iter().collect::<Vec<_>>()).await;
    let handover = stopped.elapsed();
    replicas.push(start_replica(&nats, &moto, "r3").await);
    wait_for_balance("the returning replica taking its share", &replicas.iter().collect::<Vec<_>>()).await;

    // A rolling restart, one replica at a time, while writes go on.
    let rolling_started = Instant::now();
    for index in 0..replicas.len() {
        let id = replicas[index].id.clone();
        let old = replicas.remove(index);
        old.process.stop_gracefully(Duration::from_secs(25)).await;
        replicas.insert(index, start_replica(&nats, &moto, &id).await);
        wait_for_balance(&format!("balance after restarting {id}"), &replicas.iter().collect::<Vec<_>>()).await;
    }
    let rolling_ended = Instant::now();
    // Everything written so far arrives before the next phase, so the roll's latency is its own.
    wait_arrived(&writer, &arrivals, &replicas.iter().collect::<Vec<_>>()).await;

    // From here on faults re-publish by design: give JetStream the seed's duplicate window to absorb them.
    stream_config.duplicate_window = Duration::from_secs(120);
    js.update_stream(stream_config).await.unwrap();

    // SIGKILL one: its shards resume elsewhere after the lease TTL.
    let killed = replicas.pop().unwrap();
    let crashed = Instant::now();
    killed.process.signal("KILL");
    drop(killed);
    wait_for_balance("survivors taking the crashed replica's shards", &replicas.iter().collect::<Vec<_>>()).await;
    let failover = crashed.elapsed();
    replicas.push(start_replica(&nats, &moto, "r3").await);
    wait_for_balance("balance after the crashed replica returns", &replicas.iter().collect::<Vec<_>>()).await;

    // SIGSTOP one past its TTL: the others take its shards; once resumed it must not publish for them.
    replicas[0].process.signal("STOP");
    let frozen = Instant::now();
    wait_for_balance("peers taking the frozen replica's shards", &replicas[1..].iter().collect::<Vec<_>>()).await;
    assert!(frozen.elapsed() >= TTL - TTL / 3, "a frozen replica's leases were taken before they could expire");
    replicas[0].process.signal("CONT");
    wait_for_balance("balance after the frozen replica resumes", &replicas.iter().collect::<Vec<_>>()).await;
    let thawed_log = replicas[0].process.log();
    let fenced = ["lease not renewed in time", "lease taken by another replica", "lease no longer ours"];
    assert!(
        fenced.iter().any(|m| thawed_log.contains(m)),
        "the thawed replica must see its leases gone:\n{thawed_log}"
    );

    // Every write arrives exactly once, in write order per item.
    let written = writer.finish().await;
    let messages = fixtures::wait_for_messages(&js, STREAM, written.len() as u64, DEADLINE).await;
    let mut duplicates = 0.0;
    for replica in replicas {
        duplicates += fixtures::metric(replica.port, "dynamodb_stream_consumer_duplicate_publishes_total{").await;
        replica.process.stop_gracefully(Duration::from_secs(25)).await;
    }
    let stored: Vec<Item> = messages.iter().map(|m| item_of(&m.json())).collect();
    assert_eq!(stored.len(), written.len(), "as many messages as writes: nothing missing, nothing twice");
    let mut last: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (table, pk, version) in &stored {
        let previous = last.insert((table.clone(), pk.clone()), *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "{table}/{pk}: version {version} after {previous} (order per item)");
    }
    let want: BTreeSet<&Item> = written.iter().map(|(item, _)| item).collect();
    assert_eq!(stored.iter().collect::<BTreeSet<_>>(), want, "the stream holds exactly the writes");

    // Latency from each write to its first arrival: steady state before the faults, and during the roll.
    let arrivals = arrivals.lock().unwrap().clone();
    let latency = |from: Instant, to: Instant| -> Vec<Duration> {
        let mut out: Vec<Duration> = written
            .iter()
            .filter(|(_, at)| *at >= from && *at < to)
            .filter_map(|(item, at)| arrivals.get(item).map(|arrived| arrived.saturating_duration_since(*at)))
            .collect();
        out.sort();
        out
    };
    let steady = latency(balanced, stopped);
    let rolling = latency(rolling_started, rolling_ended);

    let median = |d: &[Duration]| d.get(d.len() / 2).copied().unwrap_or_default();
    let max = |d: &[Duration]| d.last().copied().unwrap_or_default();
    println!(
        "replicas: {} writes over 6 tables; graceful hand-over: peers held every shard {handover:?} after SIGTERM; \
         crash failover: {failover:?} after SIGKILL (TTL {TTL:?}); duplicates absorbed by the stream: {duplicates}; \
         write→arrival latency steady median {:?} max {:?}, during the rolling restart median {:?} max {:?}",
        written.len(),
        median(&steady),
        max(&steady),
        median(&rolling),
        max(&rolling),
    );
}
