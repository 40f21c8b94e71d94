//! `dynamodb-stream-consumer backfill request TABLE`, the real binary against a real `nats-server`:
//! the request key holds the time of the latest request, and a request the fleet could never serve
//! (a table it does not read, a bucket that is not the service's) is refused with its reason.

#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use test_support::NatsServer;

const BUCKET: &str = "backfill-request-test";

/// Runs `backfill request {table}` with exactly the settings a deployment would give the service.
async fn request(nats: &NatsServer, bucket: &str, table: &str) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
        .args(["backfill", "request", table])
        .env_clear()
        .env("DYNAMODB_TABLES", "orders,customers")
        .env("NATS_URL", nats.url())
        .env("CHECKPOINT_BUCKET", bucket)
        .env("SHARD_REFRESH_INTERVAL_SEC", "7")
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis().try_into().unwrap()
}

async fn bucket(nats: &NatsServer) -> kv::Store {
    let client = async_nats::connect(nats.url()).await.unwrap();
    jetstream::new(client)
        .create_key_value(kv::Config { bucket: BUCKET.to_owned(), history: 1, ..Default::default() })
        .await
        .unwrap()
}

/// The request key's value as a number of milliseconds, and its revision.
async fn requested(store: &kv::Store) -> Option<(u64, u64)> {
    let entry = store.entry("backfill/orders/request").await.unwrap()?;
    Some((text(&entry.value).parse().unwrap(), entry.revision))
}

#[tokio::test]
async fn a_request_writes_its_time_and_a_newer_one_replaces_it() {
    let nats = NatsServer::start().await;
    let store = bucket(&nats).await;

    let before = now_ms();
    let output = request(&nats, BUCKET, "orders").await;
    let after = now_ms();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim(),
        format!(
            "backfill of orders requested (key backfill/orders/request in bucket {BUCKET}); \
             the fleet reads requests every 2 s and starts it then, or once a backfill of the table \
             still running is over (see /status)"
        )
    );
    let (first, first_revision) = requested(&store).await.expect("the request key is written");
    assert!((before..=after).contains(&first), "{first} is not between {before} and {after}");

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let output = request(&nats, BUCKET, "orders").await;
    assert!(output.status.success(), "{output:?}");
    let (second, second_revision) = requested(&store).await.unwrap();
    assert!(second > first, "the newer request ({second}) replaces the older ({first})");
    assert!(second_revision > first_revision);
    assert_eq!(store.get("backfill/customers/request").await.unwrap(), None, "only the named table");
}

#[tokio::test]
async fn a_request_is_dated_after_the_one_it_replaces_even_from_a_lagging_clock() {
    let nats = NatsServer::start().await;
    let store = bucket(&nats).await;
    // The last request came from a machine whose clock is an hour ahead of this one.
    let ahead = now_ms() + 3_600_000;
    store.put("backfill/orders/request", ahead.to_string().into()).await.unwrap();

    let output = request(&nats, BUCKET, "orders").await;
    assert!(output.status.success(), "{output:?}");
    let (requested, _) = requested(&store).await.unwrap();
    assert_eq!(requested, ahead + 1, "the fleet would take an earlier time for a request already served");
}

#[tokio::test]
async fn a_table_that_is_not_read_is_refused_with_exit_code_2() {
    let nats = NatsServer::start().await;
    let store = bucket(&nats).await;

    let output = request(&nats, BUCKET, "invoices").await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(
        text(&output.stderr).trim(),
        "error: cannot request a backfill of \"invoices\": it is not one of DYNAMODB_TABLES (orders, customers)"
    );
    assert!(output.stdout.is_empty());
    let mut keys = store.keys().await.unwrap();
    assert!(futures::StreamExt::next(&mut keys).await.is_none(), "nothing is written");
}

#[tokio::test]
async fn a_bucket_that_does_not_exist_is_not_created() {
    let nats = NatsServer::start().await;

    let output = request(&nats, "no-such-bucket", "orders").await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("checkpoint bucket \"no-such-bucket\" does not exist"), "{stderr}");
    let client = async_nats::connect(nats.url()).await.unwrap();
    assert!(jetstream::new(client).get_key_value("no-such-bucket").await.is_err(), "the bucket was created");
}

#[tokio::test]
async fn an_unreachable_server_fails_at_once_with_the_reason() {
    let nats = NatsServer::start().await;
    let url = nats.url();
    drop(nats);

    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
        .args(["backfill", "request", "orders"])
        .env_clear()
        .env("DYNAMODB_TABLES", "orders")
        .env("NATS_URL", &url)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cannot connect to NATS"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "no retry loop: {:?}", started.elapsed());
}
