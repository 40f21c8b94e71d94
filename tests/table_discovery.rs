//! Table discovery without restarts (issue 20): three replicas of the real binary against one
//! `nats-server` and the moto emulator, selecting tables by name, by glob pattern and by tag, with
//! `TABLE_REFRESH_INTERVAL_SEC=1`, while a writer keeps writing to every table (also one that is never
//! selected):
//!
//! 1. the tables named, matched and tagged at start-up are read, each shard by exactly one replica,
//!    and the table that is neither is not;
//! 2. a table created and tagged while the fleet runs is picked up without a restart (the time from
//!    tagging to its first event is printed), and so is a table created under the pattern;
//! 3. a table untagged leaves the set: its readers stop and release their leases, its checkpoint
//!    stays in the bucket, and writes to it are not read meanwhile;
//! 4. tagged again, it resumes from that checkpoint.
//!
//! At the end every write to a selected table is in the stream exactly once, in write order per item,
//! and nothing of the unselected table is. The stream is created beforehand with a 100 ms duplicate
//! window, so JetStream cannot hide a record published twice while the set changes.
//!
//! A second test starts one replica with tags alone (no table selected at first), `START_FROM_LATEST`
//! and `BACKFILL_TABLES=*`: a table tagged later skips its changes from before it was first seen and
//! gets them as a backfill's snapshot rows instead.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType, Tag};
use futures::StreamExt;
use test_support::fixtures;
use test_support::{Moto, NatsServer, ServiceProcess, http_get, wait_for};
use tokio::time::Instant;

const STREAM: &str = "dynamodb_streams";
const BUCKET: &str = "dynamodb-stream-checkpoints";
const DEADLINE: Duration = Duration::from_secs(40);
/// The selection under test: a name, a pattern and a tag rule.
const SELECTED_BY_NAME: &str = "plain";
const PATTERN: &str = "itx-*";
const TAG: (&str, &str) = ("stream", "on");
/// Never selected: neither named, nor matching, nor tagged (it carries another value of the tag).
const NEVER: &str = "other";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

/// `(table, pk, version)` of one write.
type Item = (String, String, i64);

/// Writes `v = 1, 2, 3, …` to five items per table, round robin over the tables it is given (more
/// can be added while it runs), until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    tables: Arc<Mutex<Vec<String>>>,
    written: Arc<Mutex<Vec<Item>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(ddb: aws_sdk_dynamodb::Client, tables: &[&str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tables = Arc::new(Mutex::new(tables.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (flag, list, log) = (Arc::clone(&stop), Arc::clone(&tables), Arc::clone(&written));
        let task = tokio::spawn(async move {
            let mut versions: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut n = 0usize;
            while !flag.load(Ordering::SeqCst) {
                let (table, round) = {
                    let list = list.lock().unwrap();
                    (list[n % list.len()].clone(), n / list.len())
                };
                let pk = format!("k{}", round % 5);
                let version = versions.entry((table.clone(), pk.clone())).or_default();
                *version += 1;
                ddb.put_item()
                    .table_name(&table)
                    .item("pk", Av::S(pk.clone()))
                    .item("v", Av::N(version.to_string()))
                    .send()
                    .await
                    .unwrap();
                log.lock().unwrap().push((table, pk, *version));
                n += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
        Writer { stop, tables, written, task }
    }

    fn add(&self, table: &str) {
        self.tables.lock().unwrap().push(table.to_owned());
    }

    fn count(&self, table: &str) -> usize {
        self.written.lock().unwrap().iter().filter(|(t, _, _)| t == table).count()
    }

    async fn finish(self) -> Vec<Item> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.written.lock().unwrap().clone()
    }
}

/// The first arrival of every item on the subjects, and of each table's first event.
#[derive(Default)]
struct Arrivals {
    items: BTreeSet<Item>,
    first_by_table: BTreeMap<String, Instant>,
}

fn watch_arrivals(client: async_nats::Client) -> Arc<Mutex<Arrivals>> {
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let seen = Arc::clone(&arrivals);
    tokio::spawn(async move {
        let mut messages = client.subscribe("dynamodb_streams.>").await.unwrap();
        while let Some(message) = messages.next().await {
            let json: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let item = item_of(&json);
            let mut seen = seen.lock().unwrap();
            seen.first_by_table.entry(item.0.clone()).or_insert_with(Instant::now);
            seen.items.insert(item);
        }
    });
    arrivals
}

fn item_of(json: &serde_json::Value) -> Item {
    let version = json["new_image"]["v"].as_i64().unwrap();
    (json["table_name"].as_str().unwrap().to_owned(), json["keys"]["pk"].as_str().unwrap().to_owned(), version)
}

/// A replica process and its HTTP port.
struct Replica {
    id: String,
    port: u16,
    process: ServiceProcess,
}

async fn start_replica(nats: &NatsServer, moto: &Moto, id: &str) -> Replica {
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(nats, moto, &format!("{SELECTED_BY_NAME},{PATTERN}"), port);
    env.extend(
        [
            ("REPLICA_ID", id),
            ("DYNAMODB_TABLE_TAGS", &format!("{}={}", TAG.0, TAG.1)),
            ("TABLE_REFRESH_INTERVAL_SEC", "1"),
            ("LEASE_TTL_SEC", "3"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let process = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    Replica { id: id.to_owned(), port, process }
}

async fn status(replica: &Replica) -> Option<serde_json::Value> {
    match http_get(replica.port, "/status").await {
        Ok((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// What every replica reports: its selected tables (with how they were selected) and its leases.
async fn views(replicas: &[Replica]) -> Option<Vec<(BTreeMap<String, String>, BTreeSet<String>)>> {
    let mut out = Vec::new();
    for replica in replicas {
        let status = status(replica).await?;
        let tables = status["tables"]
            .as_object()?
            .iter()
            .map(|(table, by)| (table.clone(), by.as_str().unwrap_or_default().to_owned()))
            .collect();
        let leases =
            status["leases"].as_array()?.iter().filter_map(|lease| lease.as_str().map(str::to_owned)).collect();
        out.push((tables, leases));
    }
    Some(out)
}

/// Waits until every replica selects exactly `expected` (table → how) and the fleet holds one lease
/// per selected table (moto streams have one shard), each on exactly one replica.
async fn wait_for_set(what: &str, replicas: &[Replica], expected: &[(&str, &str)]) {
    let expected: BTreeMap<String, String> =
        expected.iter().map(|(t, by)| ((*t).to_owned(), (*by).to_owned())).collect();
    let result = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(views) = views(replicas).await {
                let agreed = views.iter().all(|(tables, _)| *tables == expected);
                let held: Vec<&String> = views.iter().flat_map(|(_, leases)| leases).collect();
                let tables: BTreeSet<String> =
                    held.iter().map(|lease| lease.split('/').next().unwrap_or_default().to_owned()).collect();
                let distinct: BTreeSet<&&String> = held.iter().collect();
                if agreed && distinct.len() == held.len() && tables == expected.keys().cloned().collect() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if result.is_err() {
        let mut report = String::new();
        for replica in replicas {
            let status = status(replica).await.map(|s| s.to_string()).unwrap_or_default();
            let log = replica.process.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            report.push_str(&format!("\n{}: {status}\n{}", replica.id, tail.join("\n")));
        }
        panic!("timed out after {DEADLINE:?} waiting for {what}; expected {expected:?}; replicas:{report}");
    }
}

/// Waits until every write so far to `tables` has arrived.
async fn wait_arrived(what: &str, writer: &Writer, arrivals: &Mutex<Arrivals>, tables: &[&str]) {
    let written: Vec<Item> =
        writer.written.lock().unwrap().iter().filter(|(t, _, _)| tables.contains(&t.as_str())).cloned().collect();
    wait_for(what, DEADLINE, || async {
        let arrived = arrivals.lock().unwrap();
        written.iter().all(|item| arrived.items.contains(item)).then_some(())
    })
    .await;
}

async fn table_arn(ddb: &aws_sdk_dynamodb::Client, table: &str) -> String {
    ddb.describe_table().table_name(table).send().await.unwrap().table.unwrap().table_arn.unwrap()
}

async fn tag(ddb: &aws_sdk_dynamodb::Client, table: &str, value: &str) {
    let tag = Tag::builder().key(TAG.0).value(value).build().unwrap();
    ddb.tag_resource().resource_arn(table_arn(ddb, table).await).tags(tag).send().await.unwrap();
}

async fn untag(ddb: &aws_sdk_dynamodb::Client, table: &str) {
    ddb.untag_resource().resource_arn(table_arn(ddb, table).await).tag_keys(TAG.0).send().await.unwrap();
}

/// Runs the binary's operator command `args` with the fleet's selection; its stdout.
async fn command(nats: &NatsServer, args: &[&str]) -> String {
    let output = tokio::process::Command::new(binary())
        .args(args)
        .env_clear()
        .env("DYNAMODB_TABLES", format!("{SELECTED_BY_NAME},{PATTERN}"))
        .env("DYNAMODB_TABLE_TAGS", format!("{}={}", TAG.0, TAG.1))
        .env("NATS_URL", nats.url())
        .env("AWS_REGION", fixtures::REGION)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

async fn sum_metric(replicas: &[Replica], name_and_labels: &str) -> f64 {
    let mut total = 0.0;
    for replica in replicas {
        total += fixtures::metric(replica.port, name_and_labels).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_are_selected_by_name_pattern_and_tag_and_follow_tagging_without_a_restart() {
    let started = Instant::now();
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    for table in [SELECTED_BY_NAME, "itx-a", "tagged-1", NEVER] {
        fixtures::create_table(&ddb, table, Some(StreamViewType::NewAndOldImages)).await;
    }
    tag(&ddb, "tagged-1", TAG.1).await;
    tag(&ddb, NEVER, "off").await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(fixtures::stream_without_dedup(STREAM)).await.unwrap();
    // The bucket as the original deployment creates it: values of at most 1 KiB, history 1. The set's
    // keys (one per table, and the head) must fit it.
    fixtures::original_bucket(&js, BUCKET).await;
    let arrivals = watch_arrivals(client.clone());
    let writer = Writer::start(ddb.clone(), &[SELECTED_BY_NAME, "itx-a", "tagged-1", NEVER]);

    // 1. Three replicas agree on the set and split its shards, one replica per shard.
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(start_replica(&nats, &moto, id).await);
    }
    let initial = [(SELECTED_BY_NAME, "name"), ("itx-a", "pattern"), ("tagged-1", "tags")];
    wait_for_set("the named, matched and tagged tables read", &replicas, &initial).await;
    wait_arrived("the first writes", &writer, &arrivals, &[SELECTED_BY_NAME, "itx-a", "tagged-1"]).await;
    assert_eq!(sum_metric(&replicas, "dynamodb_stream_consumer_tables_selected ").await, 9.0, "3 tables × 3");

    // 2. A table created and tagged while the fleet runs is picked up; so is one under the pattern.
    fixtures::create_table(&ddb, "tagged-2", Some(StreamViewType::NewAndOldImages)).await;
    fixtures::create_table(&ddb, "itx-b", Some(StreamViewType::NewAndOldImages)).await;
    writer.add("tagged-2");
    writer.add("itx-b");
    wait_for("writes to tagged-2", DEADLINE, || async { (writer.count("tagged-2") >= 3).then_some(()) }).await;
    tag(&ddb, "tagged-2", TAG.1).await;
    let tagged = Instant::now();
    let first_event = wait_for("the first event of tagged-2", DEADLINE, || async {
        arrivals.lock().unwrap().first_by_table.get("tagged-2").copied()
    })
    .await;
    let pickup = first_event.saturating_duration_since(tagged);
    let grown = [
        (SELECTED_BY_NAME, "name"),
        ("itx-a", "pattern"),
        ("itx-b", "pattern"),
        ("tagged-1", "tags"),
        ("tagged-2", "tags"),
    ];
    wait_for_set("the new tables read", &replicas, &grown).await;
    let all_selected = [SELECTED_BY_NAME, "itx-a", "itx-b", "tagged-1", "tagged-2"];
    wait_arrived("every write to the grown set", &writer, &arrivals, &all_selected).await;

    // The operator's `status` lists the checkpoints of every table of the fleet's set.
    let listed = command(&nats, &["status", "--json"]).await;
    for table in all_selected {
        assert!(listed.contains(&format!("\"{table}\"")), "status lists {table}: {listed}");
    }

    // 3. Untagged, tagged-1 leaves the set: its lease is released, its checkpoint stays.
    untag(&ddb, "tagged-1").await;
    let shrunk: Vec<(&str, &str)> = grown.iter().copied().filter(|(table, _)| *table != "tagged-1").collect();
    wait_for_set("tagged-1 dropped", &replicas, &shrunk).await;
    wait_for("no reader of tagged-1 left", DEADLINE, || async {
        let readers = sum_metric(&replicas, "dynamodb_stream_consumer_shard_readers{table=\"tagged-1\"}").await;
        (readers == 0.0).then_some(())
    })
    .await;
    let kv = js.get_key_value(BUCKET).await.unwrap();
    let checkpoint_keys: Vec<String> =
        kv.keys().await.unwrap().filter_map(|key| async move { key.ok() }).collect::<Vec<_>>().await;
    let checkpoint = checkpoint_keys
        .iter()
        .find(|key| key.starts_with("tagged-1.shardId-"))
        .unwrap_or_else(|| panic!("the checkpoint of tagged-1 stays: {checkpoint_keys:?}"));
    let kept = kv.get(checkpoint).await.unwrap().unwrap();
    let listed = command(&nats, &["checkpoints", "list", "tagged-1"]).await;
    assert!(listed.contains("tagged-1") && listed.contains("free"), "a dropped table's checkpoint: {listed}");
    // Writes to tagged-1 go on while it is not read; a full round of the other tables arriving shows
    // the fleet kept reading them meanwhile.
    let unread_from = writer.count("tagged-1");
    wait_for("writes to tagged-1 while it is not read", DEADLINE, || async {
        (writer.count("tagged-1") >= unread_from + 5).then_some(())
    })
    .await;
    let others: Vec<&str> = all_selected.iter().copied().filter(|t| *t != "tagged-1").collect();
    wait_arrived("the other tables' writes while tagged-1 is out", &writer, &arrivals, &others).await;
    let unread: Vec<Item> =
        writer.written.lock().unwrap().iter().filter(|(t, _, _)| t == "tagged-1").skip(unread_from).cloned().collect();
    {
        let arrived = arrivals.lock().unwrap();
        let read: Vec<&Item> = unread.iter().filter(|item| arrived.items.contains(*item)).collect();
        assert!(read.is_empty(), "writes to tagged-1 after it left the set were read: {read:?}");
    }
    assert_eq!(kv.get(checkpoint).await.unwrap().unwrap(), kept, "nobody moved the checkpoint of a dropped table");

    // 4. Tagged again, it resumes from its checkpoint: what was written meanwhile arrives, once.
    tag(&ddb, "tagged-1", TAG.1).await;
    wait_for_set("tagged-1 back", &replicas, &grown).await;
    wait_arrived("the writes to tagged-1 made while it was out", &writer, &arrivals, &all_selected).await;

    // Every write to a selected table is in the stream exactly once, in order per item; none of NEVER.
    let written = writer.finish().await;
    let expected: Vec<&Item> = written.iter().filter(|(table, _, _)| table != NEVER).collect();
    let messages = fixtures::wait_for_messages(&js, STREAM, expected.len() as u64, DEADLINE).await;
    let refreshes = sum_metric(&replicas, "dynamodb_stream_consumer_table_set_refreshes_total{").await;
    let lost_claims =
        sum_metric(&replicas, "dynamodb_stream_consumer_table_set_refreshes_total{outcome=\"conflict\"}").await;
    let evaluations = refreshes - lost_claims;
    let tag_queries = sum_metric(&replicas, "dynamodb_stream_consumer_table_tag_queries_total ").await;
    let duplicates = sum_metric(&replicas, "dynamodb_stream_consumer_duplicate_publishes_total{").await;
    let elapsed = started.elapsed();
    for replica in replicas {
        replica.process.stop_gracefully(Duration::from_secs(25)).await;
    }
    let stored: Vec<Item> = messages.iter().map(|m| item_of(&m.json())).collect();
    assert!(stored.iter().all(|(table, _, _)| table != NEVER), "a table never selected was read");
    assert_eq!(stored.len(), expected.len(), "as many messages as writes to selected tables: none missing or twice");
    let mut last: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (table, pk, version) in &stored {
        let previous = last.insert((table.clone(), pk.clone()), *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "{table}/{pk}: version {version} after {previous} (order per item)");
    }
    assert_eq!(stored.iter().collect::<BTreeSet<_>>(), expected.into_iter().collect::<BTreeSet<_>>());
    // One replica per interval evaluates the set for the fleet: with a 1 s interval and a read every
    // second, at most one evaluation a second in all (three replicas each refreshing on their own would
    // make about three); a claim lost makes no AWS call.
    let per_second = evaluations / elapsed.as_secs_f64();
    assert!(per_second <= 1.0, "{evaluations} evaluations in {elapsed:?} by 3 replicas: the cost grew with the fleet");
    println!(
        "table discovery: tag→first event of a table created while the fleet ran: {pickup:?} \
         (TABLE_REFRESH_INTERVAL_SEC=1); {} writes to selected tables, each stored once; \
         {evaluations} set evaluations ({lost_claims} claims lost) and {tag_queries} ListTagsOfResource calls \
         by 3 replicas in {elapsed:?}; \
         duplicates absorbed by the stream: {duplicates}",
        stored.len()
    );
}

/// A table that joins the set starts where `START_FROM_LATEST` says (its changes from before it was
/// first seen are not read) and `BACKFILL_TABLES=*` backfills it once, so its items still arrive: as
/// snapshot rows, each item's last event its last write. The fleet starts with tags alone and no table
/// selected yet.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_tagged_later_starts_at_latest_and_is_backfilled_by_a_star() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "", port);
    env.extend(
        [
            ("DYNAMODB_TABLE_TAGS", format!("{}={}", TAG.0, TAG.1)),
            ("TABLE_REFRESH_INTERVAL_SEC", "1".to_owned()),
            ("START_FROM_LATEST", "true".to_owned()),
            ("BACKFILL_TABLES", "*".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let replica = Replica {
        id: "r1".to_owned(),
        port,
        process: ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await,
    };
    wait_for_set("an empty set", std::slice::from_ref(&replica), &[]).await;

    // Items written before the table is selected: their stream records precede its first sighting.
    fixtures::create_table(&ddb, "late", Some(StreamViewType::NewAndOldImages)).await;
    let put = |pk: String, v: i64| {
        let ddb = ddb.clone();
        async move {
            ddb.put_item()
                .table_name("late")
                .item("pk", Av::S(pk))
                .item("v", Av::N(v.to_string()))
                .send()
                .await
                .unwrap();
        }
    };
    for i in 0..5 {
        put(format!("k{i}"), 1).await;
    }
    tag(&ddb, "late", TAG.1).await;
    wait_for_set("the tagged table read", std::slice::from_ref(&replica), &[("late", "tags")]).await;
    // Changes after it was seen: read from the stream.
    for i in 0..5 {
        put(format!("k{i}"), 2).await;
    }
    put("k5".to_owned(), 1).await;
    let last_written: BTreeMap<String, i64> = (0..6).map(|i| (format!("k{i}"), if i < 5 { 2 } else { 1 })).collect();

    let backfill_done = || async {
        let status = status(&replica).await?;
        (status["backfills"]["late"]["phase"] == "done").then_some(())
    };
    wait_for("the backfill of the new table done", DEADLINE, backfill_done).await;
    let events: Vec<serde_json::Value> = wait_for("every item's last write last", DEADLINE, || async {
        let events: Vec<serde_json::Value> =
            fixtures::all_messages(&js, STREAM).await.iter().map(|m| m.json()).collect();
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for event in &events {
            last.insert(event["keys"]["pk"].as_str().unwrap().to_owned(), event["new_image"]["v"].as_i64().unwrap());
        }
        (last == last_written).then_some(events)
    })
    .await;
    replica.process.stop_gracefully(Duration::from_secs(25)).await;
    let snapshots = events.iter().filter(|event| event["snapshot"] == true).count();
    assert!(snapshots >= 5, "the items written before the table was seen arrive as snapshot rows: {events:?}");
    let early: Vec<&serde_json::Value> = events
        .iter()
        .filter(|event| event["snapshot"] != true && event["new_image"]["v"] == 1 && event["keys"]["pk"] != "k5")
        .collect();
    assert!(early.is_empty(), "changes from before the first sighting were read (START_FROM_LATEST): {early:?}");
}
