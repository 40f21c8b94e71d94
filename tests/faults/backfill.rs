//! A backfill's scan against DynamoDB faults: throttling (both codes DynamoDB uses) and server errors
//! on `Scan` are retried with backoff and counted, never fatal, and every item is still published once
//! as a snapshot row.

use std::collections::BTreeSet;

use serde_json::Value;
use streams_emulator::{Op, Throttle};
use test_support::http_get;

use crate::harness::{Rig, TABLE, Window, keys};

#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_scan_is_retried_counted_and_publishes_every_item() {
    let mut rig = Rig::new(Window::Seed).await;
    let keys = keys(60);
    rig.write_all(&keys);
    // The SDK makes three attempts per call, so three faults in a row reach the service as one error;
    // one segment makes its calls one at a time, so each run of three is one call.
    rig.streams.throttle(Op::Scan, Throttle::ProvisionedThroughputExceeded, 6);
    rig.streams.fail_with(Op::Scan, 400, "ThrottlingException", 3);
    rig.streams.fail_5xx(Op::Scan, 3);
    rig.start(&[("BACKFILL_TABLES", TABLE), ("BACKFILL_SEGMENTS", "1"), ("BACKFILL_PAGE_ITEMS", "10")]).await;
    let port = rig.port;
    rig.until("the backfill done", || async move {
        let (_, body) = http_get(port, "/status").await.ok()?;
        let status: Value = serde_json::from_str(&body).ok()?;
        (status["backfills"][TABLE]["phase"] == "done").then_some(())
    })
    .await;
    assert_eq!(rig.streams.pending_faults(Op::Scan), 0, "every fault was met");
    let throttles = rig.metric("backfill_throttles_total", &[("table", TABLE)]).await;
    assert!(throttles >= 3.0, "three throttled calls counted: {throttles}");
    assert!(!rig.log_lines(&["scan throttled; retrying"]).is_empty());
    assert!(!rig.log_lines(&["scan failed; retrying", "InternalServerError"]).is_empty());
    let snapshot: Vec<String> = rig
        .messages()
        .await
        .iter()
        .map(|message| message.json())
        .filter(|event| event["snapshot"] == true)
        .map(|event| event["keys"]["pk"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(snapshot.len(), keys.len(), "every item once");
    assert_eq!(snapshot.iter().collect::<BTreeSet<_>>(), keys.iter().collect::<BTreeSet<_>>());
    rig.stop().await;
}
