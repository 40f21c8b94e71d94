//! One replica end to end, against a real `nats-server` and the moto DynamoDB Streams emulator, with
//! the real binary: what arrives in JetStream is compared with what was written to the tables.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use test_support::fixtures::{self, Stored};
use test_support::proxy::FaultProxy;
use test_support::{Moto, NatsServer, ServiceProcess, http_get, http_get_at, wait_for};

const STREAM: &str = "dynamodb_streams";
const BUCKET: &str = "dynamodb-stream-checkpoints";
const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

async fn start(env: &[(String, String)], port: u16) -> ServiceProcess {
    ServiceProcess::start_ready(binary(), env, port, DEADLINE).await
}

async fn stop(service: ServiceProcess) -> String {
    service.stop_gracefully(Duration::from_secs(20)).await
}

async fn put(ddb: &aws_sdk_dynamodb::Client, table: &str, pk: &str, version: i64) {
    ddb.put_item()
        .table_name(table)
        .item("pk", Av::S(pk.to_owned()))
        .item("v", Av::N(version.to_string()))
        .send()
        .await
        .unwrap();
}

async fn delete(ddb: &aws_sdk_dynamodb::Client, table: &str, pk: &str) {
    ddb.delete_item().table_name(table).key("pk", Av::S(pk.to_owned())).send().await.unwrap();
}

/// Writes a workload of inserts, modifies and removes; returns `(event_name, pk, v)` in write order.
async fn workload(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    tag: &str,
    items: usize,
) -> Vec<(String, String, Option<i64>)> {
    let mut expected = Vec::new();
    for i in 0..items {
        let pk = format!("{tag}-{i}");
        put(ddb, table, &pk, 1).await;
        expected.push(("INSERT".to_owned(), pk.clone(), Some(1)));
        if i % 2 == 0 {
            put(ddb, table, &pk, 2).await;
            expected.push(("MODIFY".to_owned(), pk.clone(), Some(2)));
        }
        if i % 5 == 0 {
            delete(ddb, table, &pk).await;
            expected.push(("REMOVE".to_owned(), pk, None));
        }
    }
    expected
}

/// `(event_name, pk, v)` of the events of `table`, in stream order.
fn observed(messages: &[Stored], table: &str) -> Vec<(String, String, Option<i64>)> {
    messages
        .iter()
        .map(Stored::json)
        .filter(|json| json["table_name"] == table)
        .map(|json| {
            let image = if json["event_name"] == "REMOVE" { &json["old_image"] } else { &json["new_image"] };
            let v = if json["event_name"] == "REMOVE" { None } else { image["v"].as_i64() };
            (json["event_name"].as_str().unwrap().to_owned(), json["keys"]["pk"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

fn assert_no_duplicates(messages: &[Stored]) {
    let ids: HashSet<&str> = messages.iter().map(|m| m.header("Nats-Msg-Id")).collect();
    assert_eq!(ids.len(), messages.len(), "a record was published twice");
}

async fn checkpoint_of(kv: &async_nats::jetstream::kv::Store, key: &str) -> Option<String> {
    kv.get(key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Waits until the checkpoint of the shard that carried `last` holds `last`'s sequence number.
async fn wait_for_checkpoint(js: &async_nats::jetstream::Context, last: &Stored) {
    let kv = js.get_key_value(BUCKET).await.unwrap();
    let key = format!("{}.{}", last.json()["table_name"].as_str().unwrap(), last.header("Dynamodb-Shard-Id"));
    let want = last.json()["sequence_number"].as_str().unwrap().to_owned();
    wait_for(&format!("checkpoint {key} = {want}"), DEADLINE, || async {
        (checkpoint_of(&kv, &key).await.as_deref() == Some(want.as_str())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tables_arrive_exact_in_order_once_with_seed_checkpoints() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    fixtures::create_table(&ddb, "my.table", Some(StreamViewType::NewAndOldImages)).await;

    // Some records exist before the service starts (read from TRIM_HORIZON), more come while it runs.
    let mut orders = workload(&ddb, "orders", "early", 10).await;
    let big = "12345678901234567890123456789012345678";
    ddb.put_item()
        .table_name("my.table")
        .item("pk", Av::S("types".into()))
        .item("big", Av::N(big.into()))
        .item("neg", Av::N("-0.000000000000000000000000000000000001".into()))
        .item("exp", Av::N("1E+125".into()))
        .item("flag", Av::Bool(true))
        .item("nothing", Av::Null(true))
        .item("map", Av::M(HashMap::from([("inner".into(), Av::L(vec![Av::S("x".into()), Av::N("7".into())]))])))
        .item("strings", Av::Ss(vec!["a".into(), "b".into()]))
        .item("numbers", Av::Ns(vec!["1".into(), "99999999999999999999999999999999999999".into()]))
        .item("blob", Av::B(vec![0u8, 1, 2, 255].into()))
        .item("blobs", Av::Bs(vec![vec![1u8].into(), vec![2u8, 3].into()]))
        .send()
        .await
        .unwrap();

    let port = fixtures::http_port();
    let env = fixtures::service_env(&nats, &moto, "orders,my.table", port);
    let service = start(&env, port).await;
    assert_eq!(http_get(port, "/livez").await.unwrap().0, 200);

    orders.extend(workload(&ddb, "orders", "late", 15).await);
    let mine = workload(&ddb, "my.table", "m", 12).await;
    let total = (orders.len() + 1 + mine.len()) as u64;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let messages = fixtures::wait_for_messages(&js, STREAM, total, DEADLINE).await;
    wait_for_checkpoint(&js, messages.iter().rfind(|m| m.json()["table_name"] == "orders").unwrap()).await;
    wait_for_checkpoint(&js, messages.iter().rfind(|m| m.json()["table_name"] == "my.table").unwrap()).await;
    let messages = fixtures::all_messages(&js, STREAM).await;

    assert_eq!(messages.len() as u64, total, "nothing missing, nothing extra");
    assert_no_duplicates(&messages);
    assert_eq!(observed(&messages, "orders"), orders, "orders: every write, in write order");
    let mut my_table = observed(&messages, "my.table");
    assert_eq!(my_table.remove(0).1, "types");
    assert_eq!(my_table, mine, "my.table: every write, in write order");

    for message in &messages {
        let json = message.json();
        let table = json["table_name"].as_str().unwrap();
        let subject = if table == "orders" { "dynamodb_streams.orders" } else { "dynamodb_streams.my_table" };
        assert_eq!(message.subject, subject);
        assert_eq!(message.header("Dynamodb-Table"), table);
        assert_eq!(message.header("Dynamodb-Event-Name"), json["event_name"]);
        assert_eq!(message.header("Dynamodb-Sequence-Number"), json["sequence_number"]);
        assert!(message.header("Nats-Msg-Id").starts_with(&format!("{table}:")));
        assert_eq!(json["event_id"].as_str().unwrap().len(), 32);
        let time = json["approximate_creation_time"].as_str().unwrap();
        assert!(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        match json["event_name"].as_str().unwrap() {
            "INSERT" => assert!(json["old_image"].is_null() && json["new_image"].is_object()),
            "MODIFY" => assert!(json["old_image"].is_object() && json["new_image"].is_object()),
            "REMOVE" => assert!(json["old_image"].is_object() && json["new_image"].is_null()),
            other => panic!("unexpected event name {other}"),
        }
    }

    // Every attribute type, numbers with DynamoDB's exact digits (checked in the raw payload text).
    let types = messages.iter().find(|m| m.json()["keys"]["pk"] == "types").unwrap();
    assert!(types.payload.contains(&format!("\"big\":{big}")), "{}", types.payload);
    assert!(types.payload.contains("\"numbers\":[1,99999999999999999999999999999999999999]"), "{}", types.payload);
    assert!(types.payload.contains("\"neg\":-"), "{}", types.payload);
    let image = &types.json()["new_image"];
    assert_eq!(image["flag"], true);
    assert!(image["nothing"].is_null());
    assert_eq!(image["map"]["inner"][0], "x");
    assert_eq!(image["map"]["inner"][1], 7);
    assert_eq!(image["strings"], serde_json::json!(["a", "b"]));
    assert_eq!(image["blob"], "AAEC/w==");
    assert_eq!(image["blobs"], serde_json::json!(["AQ==", "AgM="]));
    assert_eq!(types.json()["keys"], serde_json::json!({"pk": "types"}));

    // Metrics count what was written.
    let published = fixtures::metric(port, "dynamodb_stream_consumer_records_published_total{").await;
    assert_eq!(published as u64, total, "records_published_total");
    assert_eq!(http_get(port, "/readyz").await.unwrap().0, 200);

    // `/status`: this replica holds both shards' leases and shows each shard's checkpoint.
    let (_, body) = http_get(port, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["leases"].as_array().map(Vec::len), Some(2), "{status}");
    let shards = status["shards"].as_array().unwrap();
    for table in ["orders", "my.table"] {
        let last = messages.iter().rfind(|m| m.json()["table_name"] == table).unwrap().json();
        let shard = shards.iter().find(|s| s["table"] == table).unwrap_or_else(|| panic!("{table} in {status}"));
        assert_eq!(shard["checkpoint"], last["sequence_number"], "{status}");
        assert!(shard["last_publish"].as_str().is_some_and(|t| t.ends_with('Z')), "{status}");
    }

    let log = stop(service).await;
    assert!(log.contains("shutdown complete"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_publishes_nothing_twice_and_misses_nothing() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // A duplicate window too short to hide a record published twice.
    js.create_stream(fixtures::stream_without_dedup(STREAM)).await.unwrap();

    let port = fixtures::http_port();
    let env = fixtures::service_env(&nats, &moto, "orders", port);
    let first = start(&env, port).await;
    let mut expected = workload(&ddb, "orders", "a", 20).await;
    let messages = fixtures::wait_for_messages(&js, STREAM, expected.len() as u64, DEADLINE).await;
    wait_for_checkpoint(&js, messages.last().unwrap()).await;
    let log = stop(first).await;
    assert!(log.contains("duplicate window"), "a short duplicate window is warned about:\n{log}");

    // Written while no replica runs; then a second run resumes from the checkpoint.
    expected.extend(workload(&ddb, "orders", "b", 20).await);
    let second = start(&env, port).await;
    expected.extend(workload(&ddb, "orders", "c", 5).await);
    let messages = fixtures::wait_for_messages(&js, STREAM, expected.len() as u64, DEADLINE).await;
    wait_for_checkpoint(&js, messages.last().unwrap()).await;
    let messages = fixtures::all_messages(&js, STREAM).await;
    stop(second).await;

    assert_no_duplicates(&messages);
    assert_eq!(observed(&messages, "orders"), expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_written_by_the_seed_is_resumed_from() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewImage)).await;
    for i in 0..20 {
        put(&ddb, "orders", &format!("k{i}"), i).await;
    }
    // Read the stream as the seed would have, and checkpoint the 10th record the seed's way: a plain
    // put of the bare sequence number under `{table}.{shard_id}` in a history-1 bucket.
    let (shard, records) = fixtures::first_shard_records(&moto, "orders").await;
    let tenth = records[9].dynamodb().unwrap().sequence_number().unwrap().to_owned();

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() })
        .await
        .unwrap();
    kv.put(format!("orders.{shard}"), tenth.clone().into()).await.unwrap();

    let port = fixtures::http_port();
    let service = start(&fixtures::service_env(&nats, &moto, "orders", port), port).await;
    let messages = fixtures::wait_for_messages(&js, STREAM, 10, DEADLINE).await;
    wait_for_checkpoint(&js, messages.last().unwrap()).await;
    let messages = fixtures::all_messages(&js, STREAM).await;
    stop(service).await;

    let pks: Vec<String> = messages.iter().map(|m| m.json()["keys"]["pk"].as_str().unwrap().to_owned()).collect();
    let want: Vec<String> = (10..20).map(|i| format!("k{i}")).collect();
    assert_eq!(pks, want, "resumed right after the seed's checkpoint");
    // NEW_IMAGE view: no old images.
    assert!(messages.iter().all(|m| m.json()["old_image"].is_null()));
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_tables_are_reported_while_the_others_flow_and_a_late_table_is_picked_up() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "good", Some(StreamViewType::NewAndOldImages)).await;
    fixtures::create_table(&ddb, "keysonly", Some(StreamViewType::KeysOnly)).await;
    fixtures::create_table(&ddb, "nostream", None).await;

    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "good,later,keysonly,nostream", port);
    // Credentials come through STS AssumeRole, as for cross-account access.
    env.push(("AWS_ASSUME_ROLE_ARN".into(), "arn:aws:iam::123456789012:role/stream-reader".into()));
    let service = start(&env, port).await;
    let mut expected = workload(&ddb, "good", "g", 5).await;

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    fixtures::wait_for_messages(&js, STREAM, expected.len() as u64, DEADLINE).await;
    wait_for("errors for the three unreadable tables", DEADLINE, || async {
        let log = service.log();
        (log.contains("table does not exist") && log.contains("KEYS_ONLY") && log.contains("no stream enabled"))
            .then_some(())
    })
    .await;
    assert!(service.log().contains("assumed-role/stream-reader"), "the role was assumed:\n{}", service.log());

    // A table created after start is picked up at a later refresh.
    fixtures::create_table(&ddb, "later", Some(StreamViewType::NewAndOldImages)).await;
    let later = workload(&ddb, "later", "l", 3).await;
    expected.extend(workload(&ddb, "good", "h", 2).await);
    let messages = fixtures::wait_for_messages(&js, STREAM, (expected.len() + later.len()) as u64, DEADLINE).await;
    stop(service).await;
    assert_eq!(observed(&messages, "good"), expected);
    assert_eq!(observed(&messages, "later"), later);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_names_every_bad_variable_and_exits_2() {
    let env: Vec<(String, String)> = [
        ("DYNAMODB_TABLES", "ok_table,x"),
        ("POLL_INTERVAL_MS", "fast"),
        ("PORT", "99999"),
        ("START_FROM_LATEST", "sometimes"),
        ("LOG_FORMAT", "xml"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let mut service = ServiceProcess::start(binary(), &[], &env);
    let status = service.wait_exit(Duration::from_secs(10)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(2), "{log}");
    for variable in ["DYNAMODB_TABLES", "POLL_INTERVAL_MS", "PORT", "START_FROM_LATEST", "LOG_FORMAT"] {
        assert!(log.contains(variable), "{variable} not named in:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");

    let mut help = ServiceProcess::start(binary(), &["--help"], &[]);
    assert!(help.wait_exit(Duration::from_secs(10)).await.success());
    for variable in
        ["DYNAMODB_TABLES", "NATS_URL", "CHECKPOINT_BUCKET", "POLL_INTERVAL_MS", "SHARD_REFRESH_INTERVAL_SEC", "BIND"]
    {
        assert!(help.log().contains(variable), "--help lacks {variable}:\n{}", help.log());
    }
    assert!(help.log().contains("[default: dynamodb-stream-checkpoints]"), "{}", help.log());
}

/// The Go service's deployment still starts: its flags `-d -p PORT -bind ADDR` (which win over the
/// variables), empty variables read as unset, and a boolean that means nothing refused with its name.
#[tokio::test(flavor = "multi_thread")]
async fn the_go_services_flags_and_empty_variables_still_start() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let (port, env_port) = (fixtures::http_port(), fixtures::http_port());
    let mut env = fixtures::service_env(&nats, &moto, "orders", env_port);
    // `RUST_LOG` would override the level that `-d` sets.
    env.retain(|(key, _)| key != "RUST_LOG" && key != "BIND");
    for empty in ["BIND", "DEBUG", "START_FROM_LATEST", "LOG_FORMAT", "MAX_LEASES", "NATS_STREAM_NAME"] {
        env.push((empty.to_owned(), String::new()));
    }
    let port_text = port.to_string();
    let mut service = ServiceProcess::start(binary(), &["-d", "-p", &port_text, "-bind", "127.0.0.1"], &env);
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while !matches!(http_get(port, "/readyz").await, Ok((200, _))) {
        if let Some(status) = service.try_status() {
            panic!("service exited with {status} before it was ready; log:\n{}", service.log());
        }
        assert!(tokio::time::Instant::now() < give_up, "no /readyz 200 on the port of -p; log:\n{}", service.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(http_get(env_port, "/readyz").await.is_err(), "PORT is overridden by -p");
    let log = stop(service).await;
    let debug_lines = log.lines().filter(|l| l.contains(" DEBUG ") || l.contains("\"level\":\"DEBUG\""));
    assert!(debug_lines.count() >= 1, "-d turns debug logging on:\n{log}");

    let mut env = fixtures::service_env(&nats, &moto, "orders", fixtures::http_port());
    env.push(("DEBUG".to_owned(), "maybe".to_owned()));
    let mut service = ServiceProcess::start(binary(), &[], &env);
    let status = service.wait_exit(Duration::from_secs(10)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("DEBUG: \"maybe\" is not a boolean"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_does_not_capture_the_subjects_is_refused() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["elsewhere.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let port = fixtures::http_port();
    let env: Vec<(String, String)> = [
        ("DYNAMODB_TABLES", "orders".to_owned()),
        ("NATS_URL", nats.url()),
        ("PORT", port.to_string()),
        ("BIND", "127.0.0.1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut service = ServiceProcess::start(binary(), &[], &env);
    let status = service.wait_exit(Duration::from_secs(20)).await;
    let log = service.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("does not capture subject \"dynamodb_streams.orders\""), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// `BIND=*` (the default) listens on IPv6 and IPv4 alike, as the original's `:port` did: IPv6-only
/// clusters exist (issue 18).
#[tokio::test(flavor = "multi_thread")]
async fn bind_star_listens_on_ipv4_and_ipv6() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "orders", port);
    env.retain(|(key, _)| key != "BIND");
    let service = start(&env, port).await;
    for ip in [std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()] {
        let (status, body) = http_get_at(ip, port, "/livez").await.unwrap_or_else(|err| panic!("{ip}: {err}"));
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{ip}");
    }
    stop(service).await;
}

/// Nothing slow stands between start-up and ready: the AWS identity check (STS) runs beside it, so a
/// slow STS endpoint does not outlast the original chart's start-up probe (30 × 1 s; issue 18).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_sts_endpoint_does_not_delay_ready() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let slow = FaultProxy::start(moto.port).await;
    slow.set_latency(Duration::from_secs(20));
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "orders", port);
    env.push(("AWS_ENDPOINT_URL_STS".to_owned(), format!("http://127.0.0.1:{}", slow.port)));
    let service = ServiceProcess::start_ready(binary(), &env, port, Duration::from_secs(5)).await;
    assert!(slow.connections() > 0, "the identity check went to the slow endpoint");
    stop(service).await;
}
