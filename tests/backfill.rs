//! Backfill with the real binary (issue 17, `docs/backfill.md`): a table filled before its stream was
//! enabled, of items holding every attribute type, is backfilled by three replicas while a writer keeps
//! inserting, updating and deleting items (scanned ones and ones not scanned yet); one replica is killed
//! mid-scan and one stopped gracefully and restarted. The stream, applied as a consumer applies it
//! (`INSERT`, `MODIFY` and snapshot rows upsert `new_image`, `REMOVE` deletes), must then hold exactly
//! what a final `Scan` of the table holds. A second backfill, requested with the subcommand, converges
//! the same way. The checkpoint bucket is the original deployment's (1 KiB values, history 1).
//!
//! The race the hand-off exists for is provoked, not hoped for: the replicas reach DynamoDB (`Scan`)
//! through a TCP proxy that delays every chunk, while they read the stream directly, so a change made
//! just after a page was read is published live before that page's snapshot rows, as a large page on
//! a busy network would be. Without the replay the consumer keeps the stale rows (checked by running
//! the test with the replay phase skipped).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, PutRequest, StreamSpecification, StreamViewType, WriteRequest};
use base64::Engine as _;
use serde_json::{Value as Json, json};
use test_support::fixtures::{self, Stored};
use test_support::proxy::FaultProxy;
use test_support::{Moto, NatsServer, ServiceProcess, http_get, wait_for};

const TABLE: &str = "orders";
const STREAM: &str = "dynamodb_streams";
/// Items in the table before its stream is enabled.
const PREFILL: usize = 1200;
/// The writer works on these keys: the prefilled ones and as many again that do not exist yet.
const KEY_SPACE: usize = 2 * PREFILL;
const DEADLINE: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

fn pk(n: usize) -> String {
    format!("item-{n:05}")
}

/// Item `n` at version `v`, with an attribute of every DynamoDB type.
fn item(n: usize, v: u64) -> HashMap<String, Av> {
    let blob = |text: &str| aws_sdk_dynamodb::primitives::Blob::new(text.as_bytes().to_vec());
    HashMap::from([
        ("pk".to_owned(), Av::S(pk(n))),
        ("v".to_owned(), Av::N(v.to_string())),
        ("s".to_owned(), Av::S(format!("ünïcode {n} \"quoted\""))),
        ("n".to_owned(), Av::N(format!("{n}.25"))),
        ("b".to_owned(), Av::B(blob(&format!("bytes-{n}")))),
        ("bool".to_owned(), Av::Bool(n.is_multiple_of(2))),
        ("null".to_owned(), Av::Null(true)),
        ("l".to_owned(), Av::L(vec![Av::S("a".to_owned()), Av::N("1".to_owned()), Av::Bool(true)])),
        ("m".to_owned(), Av::M(HashMap::from([("inner".to_owned(), Av::N(v.to_string()))]))),
        ("ss".to_owned(), Av::Ss(vec!["x".to_owned(), format!("y{n}")])),
        ("ns".to_owned(), Av::Ns(vec!["1".to_owned(), format!("{}", n + 2)])),
        ("bs".to_owned(), Av::Bs(vec![blob("p"), blob(&format!("q{n}"))])),
    ])
}

/// An item as the service writes it in `new_image` (sets sorted: their order is DynamoDB's).
fn image(item: &HashMap<String, Av>) -> Json {
    fn value(attribute: &Av) -> Json {
        let b64 = |blob: &aws_sdk_dynamodb::primitives::Blob| {
            json!(base64::engine::general_purpose::STANDARD.encode(blob.as_ref()))
        };
        let sorted = |mut values: Vec<Json>| {
            values.sort_by_key(ToString::to_string);
            Json::Array(values)
        };
        match attribute {
            Av::S(text) => json!(text),
            Av::N(text) => serde_json::from_str(text).unwrap(),
            Av::B(blob) => b64(blob),
            Av::Bool(flag) => json!(flag),
            Av::Null(_) => Json::Null,
            Av::L(items) => Json::Array(items.iter().map(value).collect()),
            Av::M(map) => Json::Object(map.iter().map(|(k, v)| (k.clone(), value(v))).collect()),
            Av::Ss(items) => sorted(items.iter().map(|s| json!(s)).collect()),
            Av::Ns(items) => sorted(items.iter().map(|n| serde_json::from_str(n).unwrap()).collect()),
            Av::Bs(items) => sorted(items.iter().map(b64).collect()),
            other => panic!("unexpected type {other:?}"),
        }
    }
    Json::Object(item.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

/// An event's `new_image` with its sets sorted, to compare with [`image`].
fn normalized(mut image: Json) -> Json {
    for set in ["ss", "ns", "bs"] {
        if let Some(Json::Array(values)) = image.get_mut(set) {
            values.sort_by_key(ToString::to_string);
        }
    }
    image
}

async fn prefill(ddb: &aws_sdk_dynamodb::Client) {
    for chunk in (0..PREFILL).collect::<Vec<_>>().chunks(25) {
        let writes = chunk
            .iter()
            .map(|n| {
                WriteRequest::builder()
                    .put_request(PutRequest::builder().set_item(Some(item(*n, 0))).build().unwrap())
                    .build()
            })
            .collect();
        ddb.batch_write_item().request_items(TABLE, writes).send().await.unwrap();
    }
}

/// Inserts, updates and deletes items over [`KEY_SPACE`] until stopped, spread over the key space so
/// that it touches items already scanned and items not scanned yet.
struct Writer {
    stop: Arc<AtomicBool>,
    /// When each put (pk, v) returned (Unix seconds).
    puts: Arc<Mutex<HashMap<(String, u64), f64>>>,
    writes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(ddb: aws_sdk_dynamodb::Client, seed: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicUsize::new(0));
        let puts = Arc::new(Mutex::new(HashMap::new()));
        let (flag, count, log) = (Arc::clone(&stop), Arc::clone(&writes), Arc::clone(&puts));
        let task = tokio::spawn(async move {
            let mut versions: HashMap<usize, u64> = HashMap::new();
            let mut step = seed;
            while !flag.load(Ordering::SeqCst) {
                // A stride coprime with the key space visits every key; a few hot keys change often.
                step += 1;
                let n = if step.is_multiple_of(5) { step % 7 } else { (step * 7919) % KEY_SPACE };
                if step.is_multiple_of(4) {
                    ddb.delete_item().table_name(TABLE).key("pk", Av::S(pk(n))).send().await.unwrap();
                } else {
                    // Versions start at the seed, so two writers' puts never share a version.
                    let version = versions.entry(n).or_insert(seed as u64);
                    *version += 1;
                    ddb.put_item().table_name(TABLE).set_item(Some(item(n, *version))).send().await.unwrap();
                    log.lock().unwrap().insert((pk(n), *version), unix_now());
                }
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Writer { stop, puts, writes, task }
    }

    /// Stops; returns how many writes it made and when each put returned.
    async fn finish(self) -> (usize, HashMap<(String, u64), f64>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (self.writes.load(Ordering::SeqCst), self.puts.lock().unwrap().clone())
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Milliseconds from each put's return to its live event's storing, as (p50, p99, max): printed to
/// show what a backfill does to live changes (the benchmark shows speed; nothing here asserts time).
fn live_latency_ms(messages: &[Stored], puts: &HashMap<(String, u64), f64>) -> (f64, f64, f64) {
    let mut latencies: Vec<f64> = messages
        .iter()
        .filter_map(|message| {
            let event = message.json();
            if event["snapshot"] == true || event["replay"] == true || event["event_name"] == "REMOVE" {
                return None;
            }
            let key = (event["keys"]["pk"].as_str()?.to_owned(), event["new_image"]["v"].as_u64()?);
            puts.get(&key).map(|written| (message.stored_at - written) * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.99), latencies.last().copied().unwrap_or(0.0))
}

/// The table as a consistent `Scan` reads it now: pk → image.
async fn table_now(ddb: &aws_sdk_dynamodb::Client) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let mut start = None;
    loop {
        let page =
            ddb.scan().table_name(TABLE).consistent_read(true).set_exclusive_start_key(start).send().await.unwrap();
        for item in page.items() {
            let Some(Av::S(key)) = item.get("pk") else { panic!("item without pk: {item:?}") };
            out.insert(key.clone(), image(item));
        }
        match page.last_evaluated_key() {
            Some(key) => start = Some(key.clone()),
            None => return out,
        }
    }
}

/// The stream applied in order as a consumer does: upsert `new_image`, delete on `REMOVE`.
fn applied(messages: &[Stored]) -> BTreeMap<String, Json> {
    let mut state = BTreeMap::new();
    for message in messages {
        let event = message.json();
        let key = event["keys"]["pk"].as_str().unwrap().to_owned();
        match event["event_name"].as_str().unwrap() {
            "REMOVE" => {
                state.remove(&key);
            }
            _ => {
                state.insert(key, normalized(event["new_image"].clone()));
            }
        }
    }
    state
}

/// What differs between the consumer's state and the table (the first few).
fn differences(consumer: &BTreeMap<String, Json>, table: &BTreeMap<String, Json>) -> Vec<String> {
    let mut out = Vec::new();
    for (key, expected) in table {
        match consumer.get(key) {
            None => out.push(format!("{key}: missing (table has v={})", expected["v"])),
            Some(got) if got != expected => {
                out.push(format!("{key}: consumer v={} table v={}", got["v"], expected["v"]))
            }
            Some(_) => {}
        }
    }
    out.extend(
        consumer
            .keys()
            .filter(|key| !table.contains_key(*key))
            .map(|key| format!("{key}: deleted, consumer still has it")),
    );
    out.truncate(20);
    out
}

/// Waits until the stream, applied as a consumer applies it, holds exactly `table`; panics with the
/// differences after [`DEADLINE`]. Returns every message.
async fn converged(js: &async_nats::jetstream::Context, table: &BTreeMap<String, Json>) -> Vec<Stored> {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let messages = fixtures::all_messages(js, STREAM).await;
        let differences = differences(&applied(&messages), table);
        if differences.is_empty() {
            return messages;
        }
        assert!(tokio::time::Instant::now() < give_up, "the consumer does not hold the table: {differences:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Replica {
    name: &'static str,
    port: u16,
    process: Option<ServiceProcess>,
}

impl Replica {
    async fn start(name: &'static str, nats: &NatsServer, moto: &Moto, slow: &FaultProxy) -> Replica {
        let port = fixtures::http_port();
        let mut env = env(name, nats, moto, port);
        env.push(("AWS_ENDPOINT_URL_DYNAMODB".to_owned(), format!("http://127.0.0.1:{}", slow.port)));
        let process = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
        Replica { name, port, process: Some(process) }
    }

    async fn backfill(&self) -> Option<Json> {
        let (_, body) = http_get(self.port, "/status").await.ok()?;
        let status: Json = serde_json::from_str(&body).ok()?;
        status["backfills"].get(TABLE).cloned()
    }
}

fn env(name: &str, nats: &NatsServer, moto: &Moto, port: u16) -> Vec<(String, String)> {
    let mut env = fixtures::service_env(nats, moto, TABLE, port);
    env.extend(
        [
            ("REPLICA_ID", name),
            ("BACKFILL_TABLES", TABLE),
            ("BACKFILL_SEGMENTS", "8"),
            ("BACKFILL_PAGE_ITEMS", "40"),
            // moto reports one read unit per call: 4 calls a second for the fleet, about 8 s of scan.
            ("BACKFILL_READ_UNITS_PER_SEC", "4"),
            ("LEASE_TTL_SEC", "3"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env
}

/// Waits until `replica` has published snapshot rows, and checks that the scan is still running.
async fn mid_scan(replica: &Replica, what: &str) {
    let backfill =
        until_backfill(&[replica], what, |backfill| backfill["items_published_here"].as_u64() > Some(0)).await;
    assert_eq!(backfill["phase"], "scanning", "the scan must still run for this step to test anything: {backfill}");
}

/// Waits until a live replica reports `table`'s backfill matching `done`, and returns its status.
async fn until_backfill(replicas: &[&Replica], what: &str, done: impl Fn(&Json) -> bool) -> Json {
    wait_for(what, DEADLINE, || async {
        for replica in replicas {
            if let Some(backfill) = replica.backfill().await
                && done(&backfill)
            {
                return Some(backfill);
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_under_writes_kills_and_restarts_converges_to_the_table() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, TABLE, None).await;
    prefill(&ddb).await;
    let spec = StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewAndOldImages)
        .build()
        .unwrap();
    ddb.update_table().table_name(TABLE).stream_specification(spec).send().await.unwrap();

    // The bucket as the original deployment creates it: values of at most 1 KiB, history 1. Every
    // backfill key (state, pins, segment positions, replay progress) must fit it.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    fixtures::original_bucket(&js, "dynamodb-stream-checkpoints").await;

    // DynamoDB (Scan) through a slow network, the stream directly.
    let slow = FaultProxy::start(moto.port).await;
    slow.set_latency(Duration::from_millis(500));
    let mut a = Replica::start("replica-a", &nats, &moto, &slow).await;
    let mut b = Replica::start("replica-b", &nats, &moto, &slow).await;
    let mut c = Replica::start("replica-c", &nats, &moto, &slow).await;
    let writer = Writer::start(ddb.clone(), 0);

    // A crash mid-scan, once it has published a page: its segments resume elsewhere from their
    // checkpoints after the lease TTL.
    mid_scan(&b, "replica-b to publish a page of snapshot rows").await;
    b.process.take().unwrap().signal("KILL");
    // A graceful stop mid-scan hands its segments over at once; it comes back as a fourth process.
    mid_scan(&c, "replica-c to publish a page of snapshot rows").await;
    c.process.take().unwrap().stop_gracefully(Duration::from_secs(20)).await;
    c = Replica::start("replica-c2", &nats, &moto, &slow).await;
    b = Replica::start("replica-b2", &nats, &moto, &slow).await;
    let done = until_backfill(&[&a, &b, &c], "the backfill done", |backfill| backfill["phase"] == "done").await;
    let (writes, puts) = writer.finish().await;
    assert_eq!(done["epoch"], 1);
    assert_eq!(done["segments_done"], 8);

    let table = table_now(&ddb).await;
    let messages = converged(&js, &table).await;

    // Snapshot rows: the same JSON as stream events, flagged, with their header.
    let snapshots: Vec<&Stored> = messages.iter().filter(|m| m.json()["snapshot"] == true).collect();
    let replayed = messages.iter().filter(|m| m.json()["replay"] == true).count();
    for row in &snapshots {
        let event = row.json();
        assert_eq!(event["event_name"], "INSERT");
        assert_eq!(event["old_image"], Json::Null);
        assert_eq!(event["event_id"], "snapshot-1");
        assert_eq!(row.header("Dynamodb-Snapshot"), "true");
        assert_eq!(event["keys"]["pk"], event["new_image"]["pk"]);
    }
    let prefilled =
        snapshots.iter().find(|row| row.json()["new_image"]["v"] == 0).expect("a row of an item never written since");
    let n: usize = prefilled.json()["keys"]["pk"].as_str().unwrap()[5..].parse().unwrap();
    assert_eq!(
        normalized(prefilled.json()["new_image"].clone()),
        image(&item(n, 0)),
        "every attribute type as the stream writes it"
    );
    let (p50, p99, max) = live_latency_ms(&messages, &puts);
    println!(
        "backfill convergence: {PREFILL} items before the stream, {writes} writes during the backfill, {} snapshot rows, {replayed} replayed changes, {} messages, {} items at the end; live changes meanwhile (a crash takeover included): write to stored p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        snapshots.len(),
        messages.len(),
        table.len()
    );

    // A second backfill on request, while the writer writes again.
    let request = std::process::Command::new(binary())
        .args(["backfill", "request", TABLE])
        .envs(env("operator", &nats, &moto, fixtures::http_port()))
        .output()
        .unwrap();
    assert!(request.status.success(), "{}", String::from_utf8_lossy(&request.stderr));
    let writer = Writer::start(ddb.clone(), 1_000_000);
    until_backfill(&[&a, &b, &c], "the second backfill done", |backfill| {
        backfill["epoch"] == 2 && backfill["phase"] == "done"
    })
    .await;
    let (writes, puts) = writer.finish().await;
    let messages = converged(&js, &table_now(&ddb).await).await;
    assert!(messages.iter().any(|m| m.json()["event_id"] == "snapshot-2"));
    let (p50, p99, max) = live_latency_ms(&messages, &puts);
    println!(
        "second backfill (no fault): {writes} writes during it; live changes: write to stored p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms"
    );

    // The same writer without a backfill, for comparison.
    let writer = Writer::start(ddb.clone(), 2_000_000);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (writes, puts) = writer.finish().await;
    let messages = converged(&js, &table_now(&ddb).await).await;
    let (p50, p99, max) = live_latency_ms(&messages, &puts);
    println!(
        "no backfill: {writes} writes; live changes: write to stored p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms"
    );

    for replica in [&mut a, &mut b, &mut c] {
        let name = replica.name;
        let log = replica.process.take().unwrap().stop_gracefully(Duration::from_secs(20)).await;
        assert!(!log.contains("panicked"), "{name}: {log}");
    }
}
