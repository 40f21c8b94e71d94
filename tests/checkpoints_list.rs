//! `dynamodb-stream-consumer checkpoints list [TABLE]`, the real binary against a real `nats-server`:
//! every checkpoint of the table (or of every table) with its value and who holds its lease, read from
//! the bucket as the fleet left it; an unknown table is refused.

#![allow(clippy::unwrap_used)]

use std::process::Output;

use async_nats::jetstream::{self, kv};
use test_support::NatsServer;

const BUCKET: &str = "checkpoints-list-test";

async fn list(nats: &NatsServer, table: Option<&str>) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
        .args(["checkpoints", "list"])
        .args(table)
        .env_clear()
        .env("DYNAMODB_TABLES", "orders,customers")
        .env("NATS_URL", nats.url())
        .env("CHECKPOINT_BUCKET", BUCKET)
        .output()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn checkpoints_are_listed_with_their_lease_and_an_unknown_table_is_refused() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let store = jetstream::new(client)
        .create_key_value(kv::Config { bucket: BUCKET.to_owned(), history: 1, ..Default::default() })
        .await
        .unwrap();
    let put = |key: &str, value: &str| {
        let (store, key, value) = (store.clone(), key.to_owned(), value.to_owned());
        async move { store.put(key, value.into()).await.unwrap() }
    };
    put("orders.shardId-1", "1100000000000000000042").await;
    put("orders.shardId-2", "SHARD_END:1100000000000000000007").await;
    put("orders.shardId-3", "1100000000000000000099").await;
    put("customers.shardId-9", "5").await;
    // shardId-1 is held by a live replica; shardId-3's holder is gone (no presence key).
    let lease = |replica: &str, instance: &str| {
        format!(r#"{{"owner":{{"replica":"{replica}","instance":"{instance}"}},"term":3,"ttl_ms":10000}}"#)
    };
    put("lease/shard.orders/shardId-1", &lease("replica-a", "11111111-1111-1111-1111-111111111111")).await;
    put("lease/shard.orders/shardId-3", &lease("replica-b", "22222222-2222-2222-2222-222222222222")).await;
    put(
        "lease/replica.11111111-1111-1111-1111-111111111111",
        r#"{"owner":{"replica":"replica-a","instance":"11111111-1111-1111-1111-111111111111"},"ttl_ms":10000,"max_leases":null,"beat":1}"#,
    )
    .await;

    let output = list(&nats, Some("orders")).await;
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    let lines: Vec<Vec<&str>> =
        stdout.lines().map(|line| line.split("  ").filter(|cell| !cell.is_empty()).map(str::trim).collect()).collect();
    assert_eq!(lines[0], ["TABLE", "SHARD", "CHECKPOINT", "LEASE"], "{stdout}");
    assert_eq!(lines[1], ["orders", "shardId-1", "1100000000000000000042", "held by replica-a"], "{stdout}");
    assert_eq!(lines[2], ["orders", "shardId-2", "SHARD_END:1100000000000000000007", "free"], "{stdout}");
    assert_eq!(lines[3], ["orders", "shardId-3", "1100000000000000000099", "expired (was replica-b)"], "{stdout}");
    assert_eq!(stdout.lines().last(), Some(format!("3 checkpoints in bucket {BUCKET}").as_str()));

    let all = text(&list(&nats, None).await.stdout);
    assert!(all.contains("customers") && all.contains("shardId-9"), "{all}");
    assert!(all.ends_with(&format!("4 checkpoints in bucket {BUCKET}\n")), "{all}");

    let unknown = list(&nats, Some("invoices")).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown.stderr).contains(
            r#"cannot list the checkpoints of "invoices": it is not one of DYNAMODB_TABLES (orders, customers)"#
        ),
        "{unknown:?}"
    );
}
