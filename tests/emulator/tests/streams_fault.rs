#![allow(clippy::unwrap_used)]
//! The fault-injecting DynamoDB Streams endpoint, driven through the real AWS SDK clients.
//!
//! Every fault is checked as the SDK reports it (error code, HTTP status or error kind), which is what
//! the service classifies in `src/source/error.rs`; every topology change is checked as
//! `DescribeStream` and `GetRecords` show it.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::config::retry::RetryConfig;
use aws_sdk_dynamodbstreams::config::timeout::TimeoutConfig;
use aws_sdk_dynamodbstreams::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::{
    AttributeValue, OperationType, Record, Shard, ShardFilter, ShardFilterType, ShardIteratorType, StreamStatus,
};
use serde_json::json;
use streams_emulator::{EventName, FaultyStreams, NewRecord, Op, Throttle, UserIdentity, ViewType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ShardIteratorType::{AfterSequenceNumber, AtSequenceNumber, Latest, TrimHorizon};

/// A Streams client that reports every error (no SDK retries) and gives up on an attempt after 2 s.
async fn streams(server: &FaultyStreams) -> Client {
    streams_with(server, RetryConfig::disabled(), Duration::from_secs(2)).await
}

async fn streams_with(server: &FaultyStreams, retry: RetryConfig, attempt_timeout: Duration) -> Client {
    let timeouts = TimeoutConfig::builder().operation_attempt_timeout(attempt_timeout).build();
    let config = aws_sdk_dynamodbstreams::config::Builder::from(&server.sdk_config().await)
        .retry_config(retry)
        .timeout_config(timeouts)
        .build();
    Client::from_conf(config)
}

async fn dynamodb(server: &FaultyStreams) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::from(&server.sdk_config().await)
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// Every shard of the stream, following `LastEvaluatedShardId`; also returns the number of pages.
async fn shards(client: &Client, arn: &str) -> (Vec<Shard>, usize) {
    let (mut all, mut pages, mut start) = (Vec::new(), 0, None);
    loop {
        let output = client.describe_stream().stream_arn(arn).set_exclusive_start_shard_id(start).send().await;
        let description = output.unwrap().stream_description.unwrap();
        pages += 1;
        all.extend(description.shards.unwrap_or_default());
        start = description.last_evaluated_shard_id;
        if start.is_none() {
            return (all, pages);
        }
    }
}

async fn iterator(client: &Client, arn: &str, shard: &str, kind: ShardIteratorType, seq: Option<&str>) -> String {
    let request = client.get_shard_iterator().stream_arn(arn).shard_id(shard).shard_iterator_type(kind);
    let output = request.set_sequence_number(seq.map(str::to_owned)).send().await.unwrap();
    output.shard_iterator.unwrap()
}

async fn records(client: &Client, iterator: &str, limit: i32) -> (Vec<Record>, Option<String>) {
    let output = client.get_records().shard_iterator(iterator).limit(limit).send().await.unwrap();
    (output.records.unwrap_or_default(), output.next_shard_iterator)
}

fn seqs(records: &[Record]) -> Vec<String> {
    records.iter().map(|record| record.dynamodb().unwrap().sequence_number().unwrap().to_owned()).collect()
}

fn string(image: Option<&HashMap<String, AttributeValue>>, name: &str) -> Option<String> {
    image?.get(name)?.as_s().ok().cloned()
}

fn shard<'a>(shards: &'a [Shard], id: &str) -> &'a Shard {
    shards.iter().find(|shard| shard.shard_id() == Some(id)).unwrap()
}

fn ending(shard: &Shard) -> Option<&str> {
    shard.sequence_number_range()?.ending_sequence_number()
}

#[tokio::test]
async fn records_carry_item_changes_in_order_with_images() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("orders", "pk", ViewType::NewAndOldImages);
    let client = streams(&server).await;

    let table = dynamodb(&server).await.describe_table().table_name("orders").send().await.unwrap().table.unwrap();
    assert_eq!(table.latest_stream_arn(), Some(arn.as_str()));
    let spec = table.stream_specification().unwrap();
    assert!(spec.stream_enabled());
    assert_eq!(spec.stream_view_type().map(|v| v.as_str()), Some("NEW_AND_OLD_IMAGES"));
    let missing = dynamodb(&server).await.describe_table().table_name("nope").send().await.unwrap_err();
    assert_eq!(missing.code(), Some("ResourceNotFoundException"));

    let writes = [
        server.write("orders", "a", Some(json!({ "v": { "S": "1" } }))).unwrap(),
        server.write("orders", "a", Some(json!({ "v": { "S": "2" } }))).unwrap(),
        server.write("orders", "a", None).unwrap(),
        server.write("orders", "b", Some(json!({ "n": { "N": "7" } }))).unwrap(),
    ];
    assert_eq!(server.write("orders", "a", None), None, "deleting a missing item makes no record");
    let keys = json!({ "pk": { "S": "b" } }).as_object().cloned().unwrap();
    let ttl = NewRecord {
        keys,
        new_image: None,
        old_image: server.item("orders", "b"),
        event_name: EventName::Remove,
        user_identity: Some(UserIdentity::ttl()),
    };
    let expired = server.put("orders", ttl).unwrap();

    let (shards, _) = shards(&client, &arn).await;
    assert_eq!(shards.len(), 1);
    let shard_id = shards[0].shard_id().unwrap();
    assert!(shards[0].parent_shard_id().is_none() && ending(&shards[0]).is_none());
    let start = iterator(&client, &arn, shard_id, TrimHorizon, None).await;
    let (read, next) = records(&client, &start, 1000).await;
    let expected: Vec<String> = writes.iter().chain([&expired]).map(|w| w.sequence_number.clone()).collect();
    assert_eq!(seqs(&read), expected);
    assert!(expected.iter().all(|s| s.len() >= 21), "{expected:?}");
    assert!(expected.windows(2).all(|p| p[0].parse::<u128>().unwrap() < p[1].parse::<u128>().unwrap()));
    let names: Vec<_> = read.iter().map(|r| r.event_name().unwrap().clone()).collect();
    use OperationType::{Insert, Modify, Remove};
    assert_eq!(names, [Insert, Modify, Remove, Insert, Remove]);
    let images = |i: usize| (read[i].dynamodb().unwrap().new_image(), read[i].dynamodb().unwrap().old_image());
    assert_eq!((string(images(1).0, "v"), string(images(1).1, "v")), (Some("2".into()), Some("1".into())));
    assert_eq!((images(2).0, string(images(2).1, "pk")), (None, Some("a".into())));
    assert_eq!(string(read[0].dynamodb().unwrap().keys(), "pk").as_deref(), Some("a"));
    assert_eq!(read[4].user_identity().unwrap().principal_id(), Some("dynamodb.amazonaws.com"));
    assert_eq!(read[0].event_version(), Some("1.1"));
    assert!(read[0].dynamodb().unwrap().approximate_creation_date_time().is_some());

    // An open shard always has a next iterator, even when there is nothing to read.
    let (empty, again) = records(&client, &next.unwrap(), 1000).await;
    assert!(empty.is_empty() && again.is_some());
    let (page, next) = records(&client, &start, 2).await;
    assert_eq!(seqs(&page), expected[..2]);
    assert_eq!(seqs(&records(&client, &next.unwrap(), 2).await.0), expected[2..4]);
    let after = iterator(&client, &arn, shard_id, AfterSequenceNumber, Some(&expected[0])).await;
    assert_eq!(seqs(&records(&client, &after, 1000).await.0), expected[1..]);
    let at = iterator(&client, &arn, shard_id, AtSequenceNumber, Some(&expected[1])).await;
    assert_eq!(seqs(&records(&client, &at, 1000).await.0), expected[1..]);
    let latest = iterator(&client, &arn, shard_id, Latest, None).await;
    let newest = server.write("orders", "c", Some(json!({}))).unwrap();
    assert_eq!(seqs(&records(&client, &latest, 1000).await.0), [newest.sequence_number]);

    let listed = client.list_streams().table_name("orders").send().await.unwrap();
    assert_eq!(listed.streams().iter().map(|s| s.stream_arn()).collect::<Vec<_>>(), [Some(arn.as_str())]);
}

#[tokio::test]
async fn the_view_type_decides_which_images_a_record_carries() {
    let server = FaultyStreams::start().await;
    let client = streams(&server).await;
    let views = [
        ("keys", ViewType::KeysOnly, false, false),
        ("new", ViewType::NewImage, true, false),
        ("old", ViewType::OldImage, false, true),
        ("both", ViewType::NewAndOldImages, true, true),
    ];
    for (table, view, new, old) in views {
        let arn = server.create_table(table, "pk", view);
        server.write(table, "a", Some(json!({ "v": { "S": "1" } })));
        server.write(table, "a", Some(json!({ "v": { "S": "2" } })));
        let shard = server.open_shards(table).remove(0);
        let (read, _) = records(&client, &iterator(&client, &arn, &shard, TrimHorizon, None).await, 10).await;
        let change = read[1].dynamodb().unwrap();
        assert_eq!((change.new_image().is_some(), change.old_image().is_some()), (new, old), "{table}");
        assert_eq!(change.stream_view_type().map(|v| v.as_str()), Some(view.as_str()));
        assert!(change.keys().is_some());
    }
}

#[tokio::test]
async fn a_split_closes_the_parent_and_routes_each_key_to_one_child() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let parent = server.open_shards("t").remove(0);
    let before: Vec<String> =
        (0..3).map(|i| server.write("t", &format!("k{i}"), Some(json!({}))).unwrap().sequence_number).collect();
    let parent_iterator = iterator(&client, &arn, &parent, TrimHorizon, None).await;

    let (first, second) = server.split("t", &parent);
    let (listed, _) = shards(&client, &arn).await;
    assert_eq!(listed.len(), 3);
    assert_eq!(ending(shard(&listed, &parent)), Some(before[2].as_str()));
    for child in [&first, &second] {
        assert_eq!(shard(&listed, child).parent_shard_id(), Some(parent.as_str()));
        assert_eq!(ending(shard(&listed, child)), None);
    }
    let filter = ShardFilter::builder().r#type(ShardFilterType::ChildShards).shard_id(&parent).build();
    let children = client.describe_stream().stream_arn(&arn).shard_filter(filter).send().await.unwrap();
    let ids: BTreeSet<_> = children.stream_description.unwrap().shards().iter().map(|s| s.shard_id.clone()).collect();
    assert_eq!(ids, BTreeSet::from([Some(first.clone()), Some(second.clone())]));

    // The parent is read to its end: the last page carries its records and no next iterator.
    let (page, next) = records(&client, &parent_iterator, 2).await;
    assert_eq!((seqs(&page), next.is_some()), (before[..2].to_vec(), true));
    let (page, next) = records(&client, &next.unwrap(), 2).await;
    assert_eq!((seqs(&page), next), (before[2..].to_vec(), None));
    let after_end = iterator(&client, &arn, &parent, AfterSequenceNumber, Some(&before[2])).await;
    assert_eq!(records(&client, &after_end, 1000).await, (vec![], None));

    let mut landed: HashMap<String, String> = HashMap::new();
    for round in 0..2 {
        for key in 0..20 {
            let written = server.write("t", &format!("k{key}"), Some(json!({ "r": { "N": round.to_string() } })));
            let shard_id = written.unwrap().shard_id;
            assert!(shard_id == first || shard_id == second, "{shard_id}");
            assert_eq!(landed.entry(format!("k{key}")).or_insert(shard_id.clone()), &shard_id, "k{key} moved");
        }
    }
    assert_eq!(landed.values().collect::<BTreeSet<_>>().len(), 2, "both children get keys");
    let child_records = records(&client, &iterator(&client, &arn, &first, TrimHorizon, None).await, 1000).await;
    let expected = 2 * landed.values().filter(|shard| **shard == first).count();
    assert_eq!((child_records.0.len(), child_records.1.is_some()), (expected, true));
}

#[tokio::test]
async fn a_roll_over_gives_every_open_shard_one_child() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let (a, b) = server.split("t", &server.open_shards("t")[0]);
    let pairs = server.roll_over("t");
    assert_eq!(pairs.iter().map(|(parent, _)| parent.clone()).collect::<Vec<_>>(), [a.clone(), b.clone()]);
    let (listed, _) = shards(&client, &arn).await;
    assert_eq!(listed.len(), 5);
    for (parent, child) in &pairs {
        assert!(ending(shard(&listed, parent)).is_some());
        assert_eq!(shard(&listed, child).parent_shard_id(), Some(parent.as_str()));
    }
    let open: Vec<_> = listed.iter().filter(|s| ending(s).is_none()).map(|s| s.shard_id().unwrap()).collect();
    assert_eq!(open, pairs.iter().map(|(_, child)| child.as_str()).collect::<Vec<_>>());
}

#[tokio::test]
async fn expired_iterators_fail_until_a_new_one_is_taken() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let shard = server.open_shards("t").remove(0);
    let written = server.write("t", "a", Some(json!({}))).unwrap();
    let old = iterator(&client, &arn, &shard, TrimHorizon, None).await;
    let (_, next) = records(&client, &old, 1000).await;

    server.expire_iterators();
    for stale in [old, next.unwrap()] {
        let err = client.get_records().shard_iterator(stale).send().await.unwrap_err();
        assert_eq!(err.code(), Some("ExpiredIteratorException"));
        assert!(err.as_service_error().unwrap().is_expired_iterator_exception());
    }
    let fresh = iterator(&client, &arn, &shard, AtSequenceNumber, Some(&written.sequence_number)).await;
    assert_eq!(seqs(&records(&client, &fresh, 1000).await.0), [written.sequence_number]);
}

#[tokio::test]
async fn trimmed_positions_fail_and_trim_horizon_skips_them() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let shard = server.open_shards("t").remove(0);
    let written: Vec<String> =
        (0..5).map(|i| server.write("t", &format!("k{i}"), Some(json!({}))).unwrap().sequence_number).collect();
    let from_start = iterator(&client, &arn, &shard, TrimHorizon, None).await;

    server.trim_before("t", &written[2]);
    for (kind, at) in [(AfterSequenceNumber, &written[0]), (AtSequenceNumber, &written[1])] {
        let request = client.get_shard_iterator().stream_arn(&arn).shard_id(&shard).shard_iterator_type(kind);
        let err = request.sequence_number(at).send().await.unwrap_err();
        assert_eq!(err.code(), Some("TrimmedDataAccessException"));
        assert!(err.as_service_error().unwrap().is_trimmed_data_access_exception());
    }
    let err = client.get_records().shard_iterator(&from_start).send().await.unwrap_err();
    assert_eq!(err.code(), Some("TrimmedDataAccessException"));
    // Right after the last trimmed record nothing is lost.
    let after = iterator(&client, &arn, &shard, AfterSequenceNumber, Some(&written[1])).await;
    assert_eq!(seqs(&records(&client, &after, 1000).await.0), written[2..]);
    let horizon = iterator(&client, &arn, &shard, TrimHorizon, None).await;
    assert_eq!(seqs(&records(&client, &horizon, 1000).await.0), written[2..]);

    server.trim_all_but_last("t", 1);
    let horizon = iterator(&client, &arn, &shard, TrimHorizon, None).await;
    assert_eq!(seqs(&records(&client, &horizon, 1000).await.0), written[4..]);
    let request = client.get_shard_iterator().stream_arn(&arn).shard_id(&shard).shard_iterator_type(AtSequenceNumber);
    let err = request.sequence_number(&written[3]).send().await.unwrap_err();
    assert_eq!(err.code(), Some("TrimmedDataAccessException"));
}

#[tokio::test]
async fn throttled_calls_get_throttling_codes_and_the_sdk_backs_off() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let start = iterator(&client, &arn, &server.open_shards("t")[0], TrimHorizon, None).await;

    server.throttle(Op::GetRecords, Throttle::LimitExceeded, 1);
    server.throttle(Op::GetRecords, Throttle::ProvisionedThroughputExceeded, 1);
    let err = client.get_records().shard_iterator(&start).send().await.unwrap_err();
    assert_eq!(err.code(), Some("LimitExceededException"));
    assert!(err.as_service_error().unwrap().is_limit_exceeded_exception());
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 400);
    let err = client.get_records().shard_iterator(&start).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ProvisionedThroughputExceededException"));
    client.get_records().shard_iterator(&start).send().await.unwrap();
    assert_eq!(server.calls(Op::GetRecords), 3);

    // The SDK's standard retry treats both codes as throttling: two throttled attempts, then success.
    let retry = RetryConfig::standard().with_max_attempts(3).with_initial_backoff(Duration::from_millis(10));
    let retrying = streams_with(&server, retry, Duration::from_secs(2)).await;
    server.throttle(Op::DescribeStream, Throttle::LimitExceeded, 1);
    server.throttle(Op::DescribeStream, Throttle::ProvisionedThroughputExceeded, 1);
    let output = retrying.describe_stream().stream_arn(&arn).send().await.unwrap();
    assert_eq!(output.stream_description.unwrap().shards().len(), 1);
    assert_eq!((server.calls(Op::DescribeStream), server.pending_faults(Op::DescribeStream)), (3, 0));
}

#[tokio::test]
async fn server_errors_are_http_500_internal_server_error() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let shard = server.open_shards("t").remove(0);

    server.fail_5xx(Op::GetShardIterator, 1);
    let request = client.get_shard_iterator().stream_arn(&arn).shard_id(&shard).shard_iterator_type(TrimHorizon);
    let err = request.send().await.unwrap_err();
    assert_eq!(err.code(), Some("InternalServerError"));
    assert!(err.as_service_error().unwrap().is_internal_server_error());
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 500);
    iterator(&client, &arn, &shard, TrimHorizon, None).await;

    server.fail_5xx(Op::DescribeTable, 1);
    let err = dynamodb(&server).await.describe_table().table_name("t").send().await.unwrap_err();
    assert_eq!((err.code(), err.raw_response().map(|r| r.status().as_u16())), (Some("InternalServerError"), Some(500)));
    server.fail_with(Op::ListStreams, 400, "AccessDeniedException", 1);
    let err = client.list_streams().send().await.unwrap_err();
    assert_eq!(err.code(), Some("AccessDeniedException"));
    assert_eq!(server.calls(Op::GetShardIterator), 2);
}

#[tokio::test]
async fn delayed_answers_become_sdk_time_outs() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams_with(&server, RetryConfig::disabled(), Duration::from_millis(300)).await;
    let start = iterator(&client, &arn, &server.open_shards("t")[0], TrimHorizon, None).await;

    server.delay(Op::GetRecords, Duration::from_secs(30), 1);
    let began = Instant::now();
    let err = client.get_records().shard_iterator(&start).send().await.unwrap_err();
    assert!(matches!(err, SdkError::TimeoutError(_)), "{err:?}");
    assert!(began.elapsed() < Duration::from_secs(5), "the SDK gave up after {:?}", began.elapsed());
    // A short delay within the SDK's timeout is only a slow answer.
    server.delay(Op::GetRecords, Duration::from_millis(100), 1);
    let began = Instant::now();
    client.get_records().shard_iterator(&start).send().await.unwrap();
    assert!(began.elapsed() >= Duration::from_millis(100));
    assert_eq!(server.calls(Op::GetRecords), 2);
}

#[tokio::test]
async fn dropped_shards_vanish_from_listings_and_their_iterators_fail() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let parent = server.open_shards("t").remove(0);
    server.write("t", "a", Some(json!({})));
    let parent_iterator = iterator(&client, &arn, &parent, TrimHorizon, None).await;
    let (first, second) = server.split("t", &parent);

    server.drop_shard("t", &parent);
    let (listed, _) = shards(&client, &arn).await;
    let ids: Vec<_> = listed.iter().map(|s| s.shard_id().unwrap()).collect();
    assert_eq!(ids, [first.as_str(), second.as_str()]);
    assert!(listed.iter().all(|s| s.parent_shard_id() == Some(parent.as_str())), "children keep their parent id");
    let err = client.get_records().shard_iterator(&parent_iterator).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"));
    assert!(err.as_service_error().unwrap().is_resource_not_found_exception());
    let request = client.get_shard_iterator().stream_arn(&arn).shard_id(&parent).shard_iterator_type(TrimHorizon);
    assert_eq!(request.send().await.unwrap_err().code(), Some("ResourceNotFoundException"));

    // Dropping an open shard leaves its keys without a shard: their writes make no records.
    server.drop_shard("t", &first);
    let shards_written: BTreeSet<Option<String>> =
        (0..20).map(|i| server.write("t", &format!("k{i}"), Some(json!({}))).map(|w| w.shard_id)).collect();
    assert_eq!(shards_written, BTreeSet::from([None, Some(second.clone())]));
}

#[tokio::test]
async fn describe_stream_pages_by_page_size() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    for _ in 0..4 {
        server.roll_over("t");
    }
    let (all, pages) = shards(&client, &arn).await;
    assert_eq!((all.len(), pages), (5, 1));

    server.page_size(2);
    let calls = server.calls(Op::DescribeStream);
    let (paged, pages) = shards(&client, &arn).await;
    assert_eq!(pages, 3);
    assert_eq!(server.calls(Op::DescribeStream) - calls, 3);
    let ids = |shards: &[Shard]| shards.iter().map(|shard| shard.shard_id.clone().unwrap()).collect::<Vec<_>>();
    assert_eq!(ids(&paged), ids(&all), "every shard once, in order");
    let first = client.describe_stream().stream_arn(&arn).limit(1).send().await.unwrap().stream_description.unwrap();
    assert_eq!(first.shards().len(), 1);
    assert_eq!(first.last_evaluated_shard_id(), all[0].shard_id());
}

#[tokio::test]
async fn a_reenabled_stream_gets_a_new_arn_and_the_old_one_ends() {
    let server = FaultyStreams::start().await;
    let old_arn = server.create_table("t", "pk", ViewType::NewAndOldImages);
    let client = streams(&server).await;
    let ddb = dynamodb(&server).await;
    let old_shard = server.open_shards("t").remove(0);
    let before = server.write("t", "a", Some(json!({}))).unwrap();

    let new_arn = server.reenable_stream("t");
    assert_ne!(new_arn, old_arn);
    let table = ddb.describe_table().table_name("t").send().await.unwrap().table.unwrap();
    assert_eq!(table.latest_stream_arn(), Some(new_arn.as_str()));
    assert!(new_arn.ends_with(table.latest_stream_label().unwrap()));

    let old = client.describe_stream().stream_arn(&old_arn).send().await.unwrap().stream_description.unwrap();
    assert_eq!(old.stream_status(), Some(&StreamStatus::Disabled));
    assert!(old.shards().iter().all(|s| ending(s).is_some()), "every old shard ended");
    let (new_shards, _) = shards(&client, &new_arn).await;
    assert_eq!(new_shards.len(), 1);
    assert!(new_shards[0].parent_shard_id().is_none() && ending(&new_shards[0]).is_none());
    let after = server.write("t", "a", Some(json!({ "v": { "S": "x" } }))).unwrap();
    assert_eq!(after.shard_id, new_shards[0].shard_id().unwrap());
    let old_read = records(&client, &iterator(&client, &old_arn, &old_shard, TrimHorizon, None).await, 100).await;
    assert_eq!((seqs(&old_read.0), old_read.1), (vec![before.sequence_number], None));
    let listed = client.list_streams().table_name("t").send().await.unwrap();
    assert_eq!(listed.streams().len(), 2);

    server.disable_stream("t");
    let table = ddb.describe_table().table_name("t").send().await.unwrap().table.unwrap();
    assert!(!table.stream_specification().unwrap().stream_enabled());
    assert_eq!(server.write("t", "a", None), None, "a disabled stream records nothing");
}

#[tokio::test]
async fn stale_describe_table_answers_name_the_older_stream_and_deleted_streams_are_gone() {
    let server = FaultyStreams::start().await;
    let old_arn = server.create_table("t", "pk", ViewType::NewAndOldImages);
    let client = streams(&server).await;
    let ddb = dynamodb(&server).await;
    let old_shard = server.open_shards("t").remove(0);
    let new_arn = server.reenable_stream("t");
    let latest = || async { ddb.describe_table().table_name("t").send().await.unwrap().table.unwrap() };

    server.stale_describe_table(&old_arn, 2);
    for _ in 0..2 {
        let table = latest().await;
        assert_eq!(table.latest_stream_arn(), Some(old_arn.as_str()));
        assert!(old_arn.ends_with(table.latest_stream_label().unwrap()));
    }
    assert_eq!(latest().await.latest_stream_arn(), Some(new_arn.as_str()), "two stale answers, then the latest");
    assert_eq!(server.pending_faults(Op::DescribeTable), 0);

    let old_iterator = iterator(&client, &old_arn, &old_shard, TrimHorizon, None).await;
    server.delete_stream(&old_arn);
    let err = client.describe_stream().stream_arn(&old_arn).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"));
    let err = client.get_records().shard_iterator(&old_iterator).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"));
    let listed = client.list_streams().table_name("t").send().await.unwrap();
    let arns: Vec<_> = listed.streams().iter().filter_map(|s| s.stream_arn()).collect();
    assert_eq!(arns, [new_arn.as_str()]);
    assert_eq!(shards(&client, &new_arn).await.0.len(), 1, "the latest stream is untouched");
}

#[tokio::test]
async fn bad_requests_get_client_errors_not_panics() {
    let server = FaultyStreams::start().await;
    let arn = server.create_table("t", "pk", ViewType::NewImage);
    let client = streams(&server).await;
    let shard = server.open_shards("t").remove(0);

    let err = client.get_records().shard_iterator("garbage").send().await.unwrap_err();
    assert_eq!(err.code(), Some("ValidationException"));
    let start = iterator(&client, &arn, &shard, TrimHorizon, None).await;
    let err = client.get_records().shard_iterator(&start).limit(1001).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ValidationException"));
    let request = client.get_shard_iterator().stream_arn(&arn).shard_id(&shard);
    let err = request.shard_iterator_type(AtSequenceNumber).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ValidationException"));
    let err = client.describe_stream().stream_arn(format!("{arn}x")).send().await.unwrap_err();
    assert_eq!(err.code(), Some("ResourceNotFoundException"));

    let port = server.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let (status, body) = post(port, None, "{}").await;
    assert_eq!(status, 400);
    assert!(body.contains("#UnknownOperationException"), "{body}");
    let (status, body) = post(port, Some("DynamoDBStreams_20120810.DescribeStream"), "{not json").await;
    assert_eq!(status, 400);
    assert!(body.contains("#SerializationException"), "{body}");
    let (status, body) = post(port, Some("DynamoDBStreams_20120810.DescribeStream"), r#"{"StreamArn": 5}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("#ValidationException"), "{body}");
    assert_eq!(server.calls(Op::DescribeStream), 3, "bad requests are counted too");
}

/// A raw HTTP/1.0 `POST /` with an optional `X-Amz-Target`; returns the status and body.
async fn post(port: u16, target: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let target = target.map(|t| format!("X-Amz-Target: {t}\r\n")).unwrap_or_default();
    let request = format!(
        "POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/x-amz-json-1.0\r\n{target}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response.split_once("\r\n\r\n").unwrap().1.to_owned())
}
