//! The operator's toolbox (issue 18), the real binary against a real `nats-server` and moto:
//! `checkpoints set` and `checkpoints rewind` check their input against `DescribeStream` and the
//! fleet's leases and write what they print; `status` shows the bucket as it is; and a service
//! restarted after a rewind publishes again exactly the records created from the rewind's time on.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use dynamodb_stream_consumer::source::layout;
use futures::StreamExt;
use test_support::fixtures::{self, Stored};
use test_support::{Moto, NatsServer, ServiceProcess, wait_for};

const BUCKET: &str = "operator-commands-test";
/// The service's default bucket and stream, for the test that runs the service.
const DEFAULT_BUCKET: &str = "dynamodb-stream-checkpoints";
const STREAM: &str = "dynamodb_streams";
const DEADLINE: Duration = Duration::from_secs(60);
const LIVE_INSTANCE: &str = "11111111-1111-1111-1111-111111111111";
const GONE_INSTANCE: &str = "22222222-2222-2222-2222-222222222222";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

/// Runs the binary with `args` and the service's settings for table `orders` (and `customers`).
async fn run(nats: &NatsServer, moto: Option<&Moto>, bucket: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .env_clear()
        .env("DYNAMODB_TABLES", "orders,customers")
        .env("NATS_URL", nats.url())
        .env("CHECKPOINT_BUCKET", bucket)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", fixtures::REGION);
    if let Some(moto) = moto {
        command.env("AWS_ENDPOINT_URL", moto.endpoint());
    }
    command.output().await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

async fn bucket(nats: &NatsServer, name: &str) -> kv::Store {
    let client = async_nats::connect(nats.url()).await.unwrap();
    jetstream::new(client)
        .create_key_value(kv::Config { bucket: name.to_owned(), history: 1, ..Default::default() })
        .await
        .unwrap()
}

async fn value(store: &kv::Store, key: &str) -> Option<String> {
    store.get(key).await.unwrap().map(|value| text(&value))
}

/// The table's one shard on moto and its first sequence number.
async fn shard_of(moto: &Moto, table: &str) -> (String, u128) {
    let ddb = fixtures::dynamodb(moto).await;
    let arn = ddb.describe_table().table_name(table).send().await.unwrap().table.unwrap().latest_stream_arn.unwrap();
    let streams = aws_sdk_dynamodbstreams::Client::new(&fixtures::aws_config(moto).await);
    let description = streams.describe_stream().stream_arn(arn).send().await.unwrap().stream_description.unwrap();
    let shard = description.shards.unwrap().remove(0);
    let start = shard.sequence_number_range.unwrap().starting_sequence_number.unwrap().parse().unwrap();
    (shard.shard_id.unwrap(), start)
}

/// Makes `shard` of `table` held by `replica-a` (alive: its presence key is there), or by
/// `replica-b`, whose presence key is gone, when `alive` is false.
async fn lease(store: &kv::Store, table: &str, shard: &str, alive: bool) {
    let (replica, instance) = if alive { ("replica-a", LIVE_INSTANCE) } else { ("replica-b", GONE_INSTANCE) };
    let value = format!(r#"{{"owner":{{"replica":"{replica}","instance":"{instance}"}},"term":3,"ttl_ms":10000}}"#);
    store.put(format!("lease/shard.{table}/{shard}"), value.into()).await.unwrap();
    let presence = format!(
        r#"{{"owner":{{"replica":"replica-a","instance":"{LIVE_INSTANCE}"}},"ttl_ms":10000,"max_leases":null,"beat":1}}"#
    );
    store.put(format!("lease/replica.{LIVE_INSTANCE}"), presence.into()).await.unwrap();
}

/// Servers with table `orders` (one shard, on moto) and the bucket, empty.
struct Orders {
    nats: NatsServer,
    moto: Moto,
    store: kv::Store,
    shard: String,
    /// The shard's first sequence number.
    start: u128,
    /// The shard's checkpoint key.
    key: String,
}

impl Orders {
    async fn start() -> Orders {
        let (nats, moto) = (NatsServer::start().await, Moto::start().await);
        fixtures::create_table(&fixtures::dynamodb(&moto).await, "orders", Some(StreamViewType::NewAndOldImages)).await;
        let store = bucket(&nats, BUCKET).await;
        let (shard, start) = shard_of(&moto, "orders").await;
        let key = format!("orders.{shard}");
        Orders { nats, moto, store, shard, start, key }
    }
}

#[tokio::test]
async fn set_checks_the_shard_the_sequence_number_and_the_lease() {
    let Orders { nats, moto, store, shard, start, key } = Orders::start().await;
    let set = |shard: &str, sequence: String, force: bool| {
        let mut args =
            vec!["checkpoints".to_owned(), "set".to_owned(), "orders".to_owned(), shard.to_owned(), sequence];
        if force {
            args.push("--force".to_owned());
        }
        let (nats, moto) = (&nats, &moto);
        async move { run(nats, Some(moto), BUCKET, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    let first = (start + 5).to_string();
    let output = set(&shard, first.clone(), false).await;
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&format!("{key}: (none) → {first}")), "{output:?}");
    assert_eq!(value(&store, &key).await.as_deref(), Some(first.as_str()));

    let wrong_shard = set("shardId-00000000000000000000-00000000", first.clone(), false).await;
    assert_eq!(wrong_shard.status.code(), Some(2), "{wrong_shard:?}");
    assert!(
        text(&wrong_shard.stderr).contains("is not a shard of the current stream of table orders"),
        "{wrong_shard:?}"
    );

    let below = set(&shard, (start - 1).to_string(), false).await;
    assert_eq!(below.status.code(), Some(2), "{below:?}");
    assert!(text(&below.stderr).contains(&format!("the shard starts at {start}")), "{below:?}");
    let not_a_number = set(&shard, "12ab".to_owned(), false).await;
    assert_eq!(not_a_number.status.code(), Some(2), "{not_a_number:?}");
    let unknown_table = run(&nats, Some(&moto), BUCKET, &["checkpoints", "set", "invoices", &shard, &first]).await;
    assert_eq!(unknown_table.status.code(), Some(2), "{unknown_table:?}");
    assert_eq!(value(&store, &key).await.as_deref(), Some(first.as_str()), "refusals write nothing");

    // A lease whose holder is gone does not stop the command.
    lease(&store, "orders", &shard, false).await;
    let second = (start + 7).to_string();
    let output = set(&shard, second.clone(), false).await;
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&format!("{key}: {first} → {second}")), "{output:?}");

    lease(&store, "orders", &shard, true).await;
    let third = (start + 9).to_string();
    let refused = set(&shard, third.clone(), false).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        text(&refused.stderr).contains(&format!("a shard is leased by a live replica: {shard} (replica-a)")),
        "{refused:?}"
    );
    assert!(text(&refused.stderr).contains("--force"), "{refused:?}");
    assert_eq!(value(&store, &key).await.as_deref(), Some(second.as_str()), "a refusal writes nothing");

    let forced = set(&shard, third.clone(), true).await;
    assert!(forced.status.success(), "{forced:?}");
    let stdout = text(&forced.stdout);
    assert!(stdout.contains(&format!("{key}: {second} → {third}")), "{stdout}");
    assert!(stdout.contains("(was read by replica-a: its lease is freed below)"), "{stdout}");
    assert!(stdout.contains(&format!("lease of {shard} freed")), "{stdout}");
    assert_eq!(value(&store, &key).await.as_deref(), Some(third.as_str()));
    // Freed as a release leaves a lease: no owner, the same term (the next holder takes term + 1).
    let freed: serde_json::Value =
        serde_json::from_str(&value(&store, &format!("lease/shard.orders/{shard}")).await.unwrap()).unwrap();
    assert_eq!((freed["owner"].clone(), freed["term"].clone()), (serde_json::Value::Null, serde_json::json!(3)));
}

#[tokio::test]
async fn rewind_takes_every_form_of_time_and_refuses_one_outside_the_retention() {
    let Orders { nats, moto, store, shard, start, key } = Orders::start().await;
    store.put(&key, format!("SHARD_END:{start}").into()).await.unwrap();
    let rewind = |to: String, force: bool| {
        let (nats, moto) = (&nats, &moto);
        async move {
            let mut args = vec!["checkpoints", "rewind", "orders", "--to", &to];
            if force {
                args.push("--force");
            }
            run(nats, Some(moto), BUCKET, &args).await
        }
    };

    let output = rewind("trim-horizon".to_owned(), false).await;
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&format!("{key}: SHARD_END:{start} → TRIM_HORIZON")), "{output:?}");
    assert_eq!(value(&store, &key).await.as_deref(), Some("TRIM_HORIZON"));

    let before = now_secs();
    let output = rewind("latest".to_owned(), false).await;
    assert!(output.status.success(), "{output:?}");
    let stored = value(&store, &key).await.unwrap();
    let since: u64 = stored.strip_prefix("AT_TIMESTAMP:").unwrap().parse().unwrap();
    assert!((before..=now_secs()).contains(&since), "latest is the command's time: {stored}");

    let too_old = aws_smithy_types::DateTime::from_secs(now_secs() as i64 - 25 * 3_600)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap();
    let output = rewind(too_old, false).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("is older than the stream's 24 h retention"), "{output:?}");
    let output = rewind("25h".to_owned(), false).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let output = rewind("2999-01-01T00:00:00Z".to_owned(), false).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("is in the future"), "{output:?}");
    assert_eq!(value(&store, &key).await, Some(stored), "refusals write nothing");

    let an_hour_ago = now_secs() - 3_600;
    let rfc3339 = aws_smithy_types::DateTime::from_secs(an_hour_ago as i64)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap();
    let output = rewind(rfc3339.clone(), false).await;
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&format!("orders rewound to {rfc3339}")), "{output:?}");
    assert_eq!(value(&store, &key).await, Some(format!("AT_TIMESTAMP:{an_hour_ago}")));

    let before = now_secs();
    lease(&store, "orders", &shard, true).await;
    let refused = rewind("90m".to_owned(), false).await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(text(&refused.stderr).contains(&format!("{shard} (replica-a)")), "{refused:?}");
    // The shard as a fleet that read it to its end left its topology: marked finished.
    let arn = fixtures::dynamodb(&moto)
        .await
        .describe_table()
        .table_name("orders")
        .send()
        .await
        .unwrap()
        .table
        .unwrap()
        .latest_stream_arn
        .unwrap();
    let topology_key = layout::shard_key("orders", &arn, &shard);
    store.put(&topology_key, r#"{"closed":true,"finished":true}"#.into()).await.unwrap();
    store.put(layout::head_key("orders"), r#"{"changes":7}"#.into()).await.unwrap();
    let forced = rewind("90m".to_owned(), true).await;
    assert!(forced.status.success(), "{forced:?}");
    let stdout = text(&forced.stdout);
    assert!(stdout.contains(&format!("lease of {shard} freed")), "{stdout}");
    assert!(stdout.contains(&format!("reopened (read again before their children): {shard}")), "{stdout}");
    assert_eq!(value(&store, &topology_key).await.as_deref(), Some(r#"{"closed":true}"#), "no longer finished");
    assert_eq!(value(&store, &layout::head_key("orders")).await.as_deref(), Some(r#"{"changes":8}"#), "read again");
    let stored = value(&store, &key).await.unwrap();
    let since: u64 = stored.strip_prefix("AT_TIMESTAMP:").unwrap().parse().unwrap();
    assert!((before - 5_400..=now_secs() - 5_400).contains(&since), "90 minutes ago: {stored}");
}

#[tokio::test]
async fn status_shows_replicas_leases_checkpoints_and_when_they_moved() {
    let nats = NatsServer::start().await;
    let store = bucket(&nats, BUCKET).await;
    store.put("orders.shardId-1", "1100000000000000000042".into()).await.unwrap();
    store.put("orders.shardId-2", "AT_TIMESTAMP:1796040000".into()).await.unwrap();
    store.put("customers.shardId-9", "SHARD_END".into()).await.unwrap();
    lease(&store, "orders", "shardId-1", true).await;
    lease(&store, "orders", "shardId-2", false).await;

    let output = run(&nats, None, BUCKET, &["status"]).await;
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    let lines: Vec<Vec<&str>> =
        stdout.lines().map(|line| line.split("  ").filter(|cell| !cell.is_empty()).map(str::trim).collect()).collect();
    assert_eq!(lines[0], ["REPLICA", "INSTANCE", "GROUP", "LEASES"], "{stdout}");
    assert_eq!(lines[1], ["replica-a", LIVE_INSTANCE, "1"], "{stdout}");
    assert_eq!(lines[2], [format!("1 replica alive in bucket {BUCKET}")], "{stdout}");
    assert_eq!(lines[4], ["TABLE", "SHARD", "CHECKPOINT", "MOVED", "LEASE"], "{stdout}");
    let moved = |cell: &str| cell.strip_suffix("s ago").and_then(|secs| secs.parse::<u64>().ok());
    assert_eq!(lines[5][..3], ["orders", "shardId-1", "1100000000000000000042"], "{stdout}");
    assert!(moved(lines[5][3]).is_some_and(|secs| secs < 60), "{stdout}");
    assert_eq!(lines[5][4], "held by replica-a", "{stdout}");
    assert_eq!(lines[6][..3], ["orders", "shardId-2", "AT_TIMESTAMP:1796040000"], "{stdout}");
    assert_eq!(lines[6][4], "expired (was replica-b)", "{stdout}");
    assert_eq!(lines[7][..3], ["customers", "shardId-9", "SHARD_END"], "{stdout}");
    assert_eq!(lines[7][4], "free", "{stdout}");
    assert_eq!(lines[8], ["3 checkpoints"], "{stdout}");

    let output = run(&nats, None, BUCKET, &["status", "--json"]).await;
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["bucket"], BUCKET);
    assert_eq!(
        json["replicas"],
        serde_json::json!([{"replica": "replica-a", "instance": LIVE_INSTANCE, "group": "", "leases": 1}])
    );
    let checkpoints = json["checkpoints"].as_array().unwrap();
    assert_eq!(checkpoints.len(), 3, "{json}");
    assert_eq!(checkpoints[0]["table"], "orders");
    assert_eq!(checkpoints[0]["shard"], "shardId-1");
    assert_eq!(checkpoints[0]["checkpoint"], "1100000000000000000042");
    assert_eq!(checkpoints[0]["lease"], "held");
    assert_eq!(checkpoints[0]["holder"], "replica-a");
    assert!(checkpoints[0]["moved_seconds_ago"].as_u64().is_some_and(|secs| secs < 60), "{json}");
    assert_eq!(checkpoints[1]["lease"], "expired");
    assert_eq!(checkpoints[1]["holder"], "replica-b");
    assert_eq!(checkpoints[2]["lease"], "free");
    assert_eq!(checkpoints[2]["holder"], serde_json::Value::Null);
}

async fn put(ddb: &aws_sdk_dynamodb::Client, pk: &str) {
    ddb.put_item().table_name("orders").item("pk", Av::S(pk.to_owned())).send().await.unwrap();
}

/// The checkpoint as the service left it, once it is `expected`.
async fn wait_for_checkpoint(store: &kv::Store, key: &str, expected: &str) {
    wait_for(&format!("checkpoint {key} = {expected}"), DEADLINE, || async {
        (value(store, key).await.as_deref() == Some(expected)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn after_a_rewind_the_service_publishes_again_exactly_the_records_created_since() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    for i in 0..3 {
        put(&ddb, &format!("before-{i}")).await;
    }
    // moto's creation times are the server's clock with milliseconds: the next whole second is after
    // every record above, and every record below is created at or after it.
    let since = now_secs() + 1;
    wait_for("the second after the first batch", Duration::from_secs(3), || async {
        (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() > since as f64 + 0.2).then_some(())
    })
    .await;
    for i in 0..3 {
        put(&ddb, &format!("after-{i}")).await;
    }

    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "orders", port);
    env.push(("CHECKPOINT_BUCKET".to_owned(), DEFAULT_BUCKET.to_owned()));
    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let first: Vec<Stored> = fixtures::wait_for_messages(&js, STREAM, 6, DEADLINE).await;
    let last = first.last().unwrap().header("Dynamodb-Sequence-Number").to_owned();
    let (shard, _) = shard_of(&moto, "orders").await;
    let key = format!("orders.{shard}");
    let store = js.get_key_value(DEFAULT_BUCKET).await.unwrap();
    wait_for_checkpoint(&store, &key, &last).await;
    service.stop_gracefully(Duration::from_secs(20)).await;

    let rfc3339 =
        aws_smithy_types::DateTime::from_secs(since as i64).fmt(aws_smithy_types::date_time::Format::DateTime).unwrap();
    let output = run(&nats, Some(&moto), DEFAULT_BUCKET, &["checkpoints", "rewind", "orders", "--to", &rfc3339]).await;
    assert!(output.status.success(), "{output:?}");
    assert!(text(&output.stdout).contains(&format!("{key}: {last} → AT_TIMESTAMP:{since}")), "{output:?}");

    // JetStream drops the republished records as duplicates (same message ids, within its window), so
    // what the service publishes is watched on the subjects themselves.
    let mut published = client.subscribe(format!("{STREAM}.>")).await.unwrap();
    client.flush().await.unwrap();
    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    wait_for("the rewind to be read through", DEADLINE, || async {
        (value(&store, &key).await.as_deref() == Some(last.as_str())).then_some(())
    })
    .await;
    service.stop_gracefully(Duration::from_secs(20)).await;
    client.flush().await.unwrap();
    let mut again = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), published.next()).await {
        let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        again.push(event["keys"]["pk"].as_str().unwrap().to_owned());
    }
    assert_eq!(again, ["after-0", "after-1", "after-2"], "exactly the records created at or after {rfc3339}");

    // On a running fleet, idle: a forced rewind frees the lease, so the shard is read again at once
    // (left alone, an idle owner would never write a checkpoint, and never learn of the rewind).
    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;
    wait_for("the service to hold the shard's lease", DEADLINE, || async {
        let lease = value(&store, &format!("lease/shard.orders/{shard}")).await.unwrap_or_default();
        lease.contains(r#""owner":{"#).then_some(())
    })
    .await;
    let output =
        run(&nats, Some(&moto), DEFAULT_BUCKET, &["checkpoints", "rewind", "orders", "--to", "trim-horizon"]).await;
    assert_eq!(output.status.code(), Some(1), "refused while the service reads the shard: {output:?}");
    let output = run(
        &nats,
        Some(&moto),
        DEFAULT_BUCKET,
        &["checkpoints", "rewind", "orders", "--to", "trim-horizon", "--force"],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let mut replayed = Vec::new();
    let read_again = tokio::time::timeout(DEADLINE, async {
        while replayed.len() < 6 {
            let Some(message) = published.next().await else { break };
            let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            replayed.push(event["keys"]["pk"].as_str().unwrap().to_owned());
        }
    })
    .await;
    assert!(read_again.is_ok(), "the running service read the rewound shard again: {replayed:?}\n{}", service.log());
    assert_eq!(replayed, ["before-0", "before-1", "before-2", "after-0", "after-1", "after-2"], "{}", service.log());
    service.stop_gracefully(Duration::from_secs(20)).await;
}
