//! The checkpoint bucket of the original deployment (issue 15): its Helm chart creates it with history
//! 1, a max value size of 1 KiB and no compression. The service works in it; a table whose shared
//! topology does not fit is never hidden behind a 200 `/readyz`; a bucket too small for the service's
//! own values is refused at start-up with a message that names it.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use test_support::ServiceProcess;
use test_support::streams_fault::ViewType;

use super::harness::{BUCKET, Rig, TABLE, Window, binary, keys};

/// A second table, with enough shards that its topology outgrows 1 KiB.
const WIDE: &str = "wide";

async fn create_bucket(rig: &Rig, max_value_size: i32) {
    rig.js
        .create_key_value(kv::Config {
            bucket: BUCKET.into(),
            history: 1,
            max_value_size,
            storage: stream::StorageType::File,
            compression: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn in_the_original_1_kib_bucket_a_table_that_does_not_fit_is_named_and_never_reported_ready() {
    let mut rig = Rig::new(Window::Tiny).await;
    create_bucket(&rig, 1024).await;
    rig.streams.create_table_with_shards(WIDE, "pk", ViewType::NewAndOldImages, 12);
    let tables = format!("{TABLE},{WIDE}");
    // Not `start`, which waits for 200: this replica must not become ready.
    let env = rig.env(&[("DYNAMODB_TABLES", tables.as_str())]);
    let service = ServiceProcess::start(binary(), &[], &env);
    let body = rig
        .until("/readyz to name the table that cannot be read", || async {
            match test_support::http_get(rig.port, "/readyz").await {
                Ok((503, body)) if body.contains("table wide cannot be read (value_too_large)") => Some(body),
                _ => None,
            }
        })
        .await;
    assert!(body.contains("max value size"), "{body}");
    let metric =
        super::harness::metric_at(rig.port, "table_unreadable", &[("table", WIDE), ("reason", "value_too_large")]);
    assert_eq!(metric.await, 1.0);
    let (_, status) = test_support::http_get(rig.port, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["tables_unreadable"][WIDE]["reason"], "value_too_large", "{status}");
    // The table that fits is read all the same.
    rig.write_all(&keys(5));
    rig.settle(&rig.written).await;
    let log = service.stop_gracefully(Duration::from_secs(20)).await;
    let errors: Vec<&str> =
        log.lines().filter(|line| line.contains("ERROR") && line.contains("table cannot be read")).collect();
    assert_eq!(errors.len(), 1, "one error line, naming the bucket:\n{log}");
    assert!(errors[0].contains(BUCKET), "{}", errors[0]);
    rig.assert_exact(&rig.messages().await, &rig.written);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_original_1_kib_bucket_works_for_a_table_that_fits() {
    let mut rig = Rig::new(Window::Tiny).await;
    create_bucket(&rig, 1024).await;
    rig.start(&[]).await;
    rig.write_all(&keys(5));
    rig.settle(&rig.written).await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_too_small_for_the_services_values_is_refused_at_start_up() {
    let rig = Rig::new(Window::Tiny).await;
    create_bucket(&rig, 256).await;
    let mut service = ServiceProcess::start(binary(), &[], &rig.env(&[]));
    let status = service.wait_exit(Duration::from_secs(30)).await;
    let log = service.log();
    assert!(!status.success(), "{log}");
    let wanted =
        format!("checkpoint bucket \"{BUCKET}\": its max value size is 256 bytes; the service needs at least 512");
    assert!(log.contains(&wanted), "the message must say {wanted:?}:\n{log}");
}
