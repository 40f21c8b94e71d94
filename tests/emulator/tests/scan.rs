#![allow(clippy::unwrap_used)]
//! DynamoDB `Scan` of the endpoint, driven through the real AWS SDK client as the service's backfill
//! calls it: a parallel scan of a synthetic table yields every item exactly once, resumes from any
//! `LastEvaluatedKey`, and reports the read units DynamoDB would charge; stored tables scan too.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::scan::{ScanError, ScanOutput};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use serde_json::json;
use streams_emulator::{FaultyStreams, ViewType};

/// A 4 KB read unit, halved for an eventually consistent read.
fn units(bytes: usize) -> f64 {
    bytes.div_ceil(4096).max(1) as f64 / 2.0
}

async fn dynamodb(server: &FaultyStreams) -> Client {
    let config = aws_sdk_dynamodb::config::Builder::from(&server.sdk_config().await)
        .retry_config(RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

async fn scan_page(
    client: &Client,
    table: &str,
    segment: i32,
    total: i32,
    limit: i32,
    start: Option<HashMap<String, AttributeValue>>,
) -> ScanOutput {
    client
        .scan()
        .table_name(table)
        .segment(segment)
        .total_segments(total)
        .limit(limit)
        .set_exclusive_start_key(start)
        .return_consumed_capacity(ReturnConsumedCapacity::Total)
        .send()
        .await
        .unwrap()
}

fn pk(item: &HashMap<String, AttributeValue>) -> String {
    item["pk"].as_s().unwrap().clone()
}

#[tokio::test]
async fn a_parallel_scan_of_a_synthetic_table_reads_every_item_once_at_dynamodb_read_units() {
    const ITEMS: u64 = 2500;
    const ITEM_BYTES: usize = 1000;
    const SEGMENTS: i32 = 7;
    const LIMIT: i32 = 97;
    let server = FaultyStreams::start().await;
    server.synthetic_table("synthetic", ITEMS, ITEM_BYTES);
    let client = dynamodb(&server).await;

    let described = client.describe_table().table_name("synthetic").send().await.unwrap().table.unwrap();
    assert_eq!(described.item_count, Some(ITEMS as i64));
    assert_eq!(described.table_size_bytes, Some((ITEMS as usize * ITEM_BYTES) as i64));
    assert_eq!(described.key_schema.unwrap()[0].attribute_name, "pk");
    assert!(described.latest_stream_arn.is_some_and(|arn| arn == server.stream_arn("synthetic")));

    let mut seen: BTreeMap<String, i32> = BTreeMap::new();
    let (mut pages, mut charged) = (0, 0.0);
    for segment in 0..SEGMENTS {
        let mut start = None;
        loop {
            let page = scan_page(&client, "synthetic", segment, SEGMENTS, LIMIT, start).await;
            let items = page.items.unwrap_or_default();
            assert!(items.len() <= LIMIT as usize);
            assert_eq!(page.count, items.len() as i32);
            let units_charged = page.consumed_capacity.and_then(|capacity| capacity.capacity_units).unwrap();
            assert_eq!(units_charged, units(items.len() * ITEM_BYTES), "segment {segment} page {pages}");
            charged += units_charged;
            pages += 1;
            for item in &items {
                assert!(matches!(item.get("n"), Some(AttributeValue::N(_))), "{item:?}");
                assert!(matches!(item.get("even"), Some(AttributeValue::Bool(_))), "{item:?}");
                assert!(matches!(item.get("tags"), Some(AttributeValue::L(tags)) if tags.len() == 2), "{item:?}");
                let previous = seen.insert(pk(item), segment);
                assert_eq!(previous, None, "{} read twice", pk(item));
            }
            match page.last_evaluated_key {
                Some(key) => {
                    assert_eq!(Some(&key["pk"]), items.last().map(|item| &item["pk"]), "the last item read");
                    start = Some(key);
                }
                None => break,
            }
        }
    }
    let expected: Vec<String> = (0..ITEMS).map(FaultyStreams::synthetic_key).collect();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), expected, "every item once");
    let per_segment = (0..SEGMENTS).map(|s| seen.values().filter(|owner| **owner == s).count());
    assert!(per_segment.clone().all(|n| n > 200), "segments share the items: {:?}", per_segment.collect::<Vec<_>>());
    assert!(pages >= ITEMS as usize / LIMIT as usize);
    // 97 items of 1000 bytes are 24 read units of 4 KB, 12 when eventually consistent: about 0.12 per item.
    let per_item = charged / ITEMS as f64;
    assert!((0.12..0.13).contains(&per_item), "{per_item} read units per item");

    // Resuming from any key a page returned reads the same items as the pages did.
    let first = scan_page(&client, "synthetic", 3, SEGMENTS, 10, None).await;
    let resumed = scan_page(
        &client,
        "synthetic",
        3,
        SEGMENTS,
        5,
        first.items.as_ref().map(|items| HashMap::from([("pk".to_owned(), items[4]["pk"].clone())])),
    )
    .await;
    let keys = |items: Option<Vec<HashMap<String, AttributeValue>>>| items.unwrap().iter().map(pk).collect::<Vec<_>>();
    assert_eq!(keys(resumed.items), keys(first.items)[5..].to_vec());
}

#[tokio::test]
async fn pages_stop_at_one_megabyte_and_the_last_page_has_no_key() {
    let server = FaultyStreams::start().await;
    server.synthetic_table("big", 300, 10_000);
    let client = dynamodb(&server).await;
    let first = scan_page(&client, "big", 0, 1, 1000, None).await;
    assert_eq!(first.count, (1 << 20) / 10_000, "1 MB of 10 KB items");
    assert_eq!(first.consumed_capacity.unwrap().capacity_units, Some(units(104 * 10_000)));
    let rest = scan_page(&client, "big", 0, 1, 1000, first.last_evaluated_key).await;
    let last = scan_page(&client, "big", 0, 1, 1000, rest.last_evaluated_key).await;
    assert_eq!((first.count + rest.count + last.count, last.last_evaluated_key), (300, None));
}

#[tokio::test]
async fn a_stored_table_scans_its_current_items_by_segment() {
    let server = FaultyStreams::start().await;
    server.create_table("t", "pk", ViewType::NewImage);
    for i in 0..50 {
        server.write("t", &format!("k{i:02}"), Some(json!({ "v": { "N": i.to_string() } })));
    }
    server.write("t", "k07", None);
    let client = dynamodb(&server).await;
    let described = client.describe_table().table_name("t").send().await.unwrap().table.unwrap();
    // Each item: "pk" + "k00" (5 bytes) and "v" + a number of one or two significant digits (3 bytes),
    // but 0 has none (2 bytes).
    assert_eq!((described.item_count, described.table_size_bytes), (Some(49), Some(49 * 8 - 1)));
    let mut keys = Vec::new();
    for segment in 0..3 {
        let mut start = None;
        loop {
            let page = scan_page(&client, "t", segment, 3, 4, start).await;
            keys.extend(page.items.unwrap_or_default().iter().map(pk));
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
    }
    keys.sort();
    let expected: Vec<String> = (0..50).filter(|i| *i != 7).map(|i| format!("k{i:02}")).collect();
    assert_eq!(keys, expected);
}

#[tokio::test]
async fn impossible_scans_are_validation_errors_and_a_missing_table_is_not_found() {
    let server = FaultyStreams::start().await;
    server.synthetic_table("s", 10, 100);
    let client = dynamodb(&server).await;
    let code = |result: Result<ScanOutput, SdkError<ScanError, HttpResponse>>| {
        result.unwrap_err().into_service_error().code().unwrap_or_default().to_owned()
    };
    let segment_past_total = client.scan().table_name("s").segment(3).total_segments(3).send().await;
    assert_eq!(code(segment_past_total), "ValidationException");
    let alien_start =
        client.scan().table_name("s").exclusive_start_key("pk", AttributeValue::S("zz".into())).send().await;
    assert_eq!(code(alien_start), "ValidationException");
    let missing = client.scan().table_name("nope").send().await;
    assert_eq!(code(missing), "ResourceNotFoundException");
}
