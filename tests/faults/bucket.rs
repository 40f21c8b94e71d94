//! The checkpoint bucket of the original deployment (issue 15): its Helm chart creates it with history
//! 1, a max value size of 1 KiB and no compression. The service works in it whatever the number of
//! shards (no value it writes passes 512 bytes); a topology stored by the previous version is
//! carried over; a bucket too small for the service's own values is refused at start-up with a
//! message that names it.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use test_support::ServiceProcess;

use super::harness::{BUCKET, Rig, TABLE, Window, binary, epoch_second, keys};

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

/// Generations of shards the table goes through: a roll-over every 4 hours for 2 days.
const GENERATIONS: usize = 12;
/// DynamoDB lists a closed shard for 24 hours: 6 generations of 4 hours.
const LISTED_GENERATIONS: usize = 6;

/// Before issue 15 the table's whole topology was one value, ~130 bytes per listed shard: with four
/// open shards rolling over every 4 hours it passed 1 KiB within the first day, its write failed,
/// and the table's new shards were never read. Now every value stays under 512 bytes.
#[tokio::test(flavor = "multi_thread")]
async fn the_original_1_kib_bucket_holds_a_table_whose_shards_roll_over_for_days() {
    let mut rig = Rig::new(Window::Tiny).await;
    create_bucket(&rig, 1024).await;
    let keys = keys(8);
    let root = rig.streams.open_shards(TABLE).remove(0);
    let (left, right) = rig.streams.split(TABLE, &root);
    rig.streams.split(TABLE, &left);
    rig.streams.split(TABLE, &right);
    rig.start(&[]).await;
    let mut generations: Vec<Vec<String>> = vec![vec![root, left, right]];
    let mut largest = 0;
    for _ in 0..GENERATIONS {
        rig.write_all(&keys);
        let rolled = rig.streams.roll_over(TABLE);
        generations.push(rolled.iter().map(|(parent, _)| parent.clone()).collect());
        rig.write_all(&keys);
        rig.settle(&rig.written).await;
        // AWS stops listing shards 24 hours after they closed (they were read to their end here).
        if generations.len() > LISTED_GENERATIONS {
            for shard in generations.remove(0) {
                rig.until_finished(&shard).await;
                rig.streams.drop_shard(TABLE, &shard);
            }
        }
        let bucket = rig.bucket().await;
        largest = largest.max(bucket.values().map(|value| value.len()).max().unwrap_or(0));
    }
    assert_eq!(rig.readyz().await, 200);
    assert_eq!(rig.metric("table_unreadable", &[("table", TABLE)]).await, 0.0);
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
    let bucket = rig.bucket().await;
    let prefix = format!("topology/{TABLE}/shard.");
    let shard_keys = bucket.keys().filter(|key| key.starts_with(&prefix)).count();
    // Four open shards per generation: six generations of closed ones listed, and the open ones.
    assert!(shard_keys >= 4 * LISTED_GENERATIONS, "{shard_keys} shard keys: {:?}", bucket.keys().collect::<Vec<_>>());
    println!("largest value written to the 1 KiB bucket: {largest} bytes ({shard_keys} shard keys at the end)");
    assert!(largest <= 512, "a value of {largest} bytes");
}

/// A table's topology as the previous version stored it (one value at `topology/{table}`) is carried
/// over: its first sighting for `START_FROM_LATEST` above all, or the records written since that
/// sighting and not yet read would be skipped as if they came before it.
#[tokio::test(flavor = "multi_thread")]
async fn a_topology_in_the_previous_layout_is_carried_over() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(6);
    let shard = rig.streams.open_shards(TABLE).remove(0);
    rig.write_all(&keys);
    let history = rig.written.len();
    let since = epoch_second() + 1;
    rig.until("the next second", || async { (epoch_second() >= since).then_some(()) }).await;
    rig.write_all(&keys);
    let bucket = kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() };
    let kv = rig.js.create_key_value(bucket).await.unwrap();
    let previous = serde_json::json!({
        "streams": [{"arn": rig.streams.stream_arn(TABLE), "shards": [{"shard_id": shard}]}],
        "since": since,
    });
    kv.put(format!("topology/{TABLE}"), serde_json::to_vec(&previous).unwrap().into()).await.unwrap();
    // Seconds later, the new version starts for the first time.
    rig.until("a later second", || async { (epoch_second() > since + 1).then_some(()) }).await;
    rig.start(&[("START_FROM_LATEST", "true")]).await;
    let after = rig.written[history..].to_vec();
    rig.settle(&after).await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &after);
    let head = kv.get(format!("topology/{TABLE}/table")).await.unwrap().expect("the head in the new layout");
    let head: serde_json::Value = serde_json::from_slice(&head).unwrap();
    assert_eq!(head["since"], since, "{head}");
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
        format!("checkpoint bucket \"{BUCKET}\": its max value size is 256 bytes; the service needs at least 640");
    assert!(log.contains(&wanted), "the message must say {wanted:?}:\n{log}");
}

/// Shards of the wide table: DynamoDB lists thousands for a table of thousands of partitions.
const WIDE_SHARDS: usize = 20_000;

/// A table of 20,000 shards, which the previous layout stored as one value of about 2.6 MB (past
/// NATS's default 1 MB max payload, so never written): one key per shard, every value under 512
/// bytes, and every replica reads the whole topology back. `MAX_LEASES` keeps the replica's share
/// small: what is measured is the topology, not 20,000 readers.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_of_20000_shards_fits_the_original_bucket() {
    let mut rig = Rig::new(Window::Tiny).await;
    create_bucket(&rig, 1024).await;
    let wide = "wide";
    rig.streams.create_table_with_shards(wide, "pk", streams_emulator::ViewType::NewAndOldImages, WIDE_SHARDS);
    let tables = format!("{TABLE},{wide}");
    rig.start(&[("DYNAMODB_TABLES", tables.as_str()), ("MAX_LEASES", "20")]).await;
    let labels = [("table", wide), ("state", "reading")];
    rig.until_within(Duration::from_secs(120), "every shard of the wide table to be known", || async {
        (rig.metric("shards_known", &labels).await == WIDE_SHARDS as f64).then_some(())
    })
    .await;
    assert_eq!(rig.readyz().await, 200);
    let bucket = rig.bucket().await;
    let prefix = format!("topology/{wide}/shard.");
    assert_eq!(bucket.keys().filter(|key| key.starts_with(&prefix)).count(), WIDE_SHARDS);
    let largest = bucket.values().map(|value| value.len()).max().unwrap_or(0);
    println!("largest value in the bucket with a table of {WIDE_SHARDS} shards: {largest} bytes");
    assert!(largest <= 512, "a value of {largest} bytes");
    rig.stop().await;
}
