//! The segment reader on paused time over an in-memory table, sink and store.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use coordination::{MemoryStore, ShardKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ReadBudget, SegmentReader};
use crate::checkpoint::{Checkpoints, Progress};
use crate::memory::MemoryBudget;
use crate::metrics::Metrics;
use crate::pipeline::backfill::state::segment_key;
use crate::pipeline::reader::Outcome;
use crate::publish::memory::MemorySink;
use crate::record::{Map, Value};
use crate::source::error::ReadError;
use crate::source::memory::MemoryTable;
use crate::source::scan::{Segment, SegmentProgress};
use crate::testing::{DEADLINE, lease};

const TABLE: &str = "t";

fn items(count: usize) -> Vec<Map> {
    (0..count)
        .map(|n| {
            Map::new(vec![
                ("pk".to_owned(), Value::S(format!("item-{n:05}"))),
                ("n".to_owned(), Value::N(n.to_string())),
            ])
        })
        .collect()
}

struct Rig {
    table: Arc<MemoryTable>,
    sink: Arc<MemorySink>,
    store: Arc<MemoryStore>,
    budget: Arc<ReadBudget>,
    value_limit: usize,
    memory: MemoryBudget,
    tables: Arc<crate::tables::TablesFile>,
}

impl Rig {
    fn new(count: usize, units_per_item: f64, budget: f64) -> Rig {
        Rig {
            table: Arc::new(MemoryTable::new(items(count), units_per_item)),
            sink: Arc::new(MemorySink::default()),
            store: Arc::new(MemoryStore::new()),
            budget: Arc::new(ReadBudget::new(budget)),
            value_limit: usize::MAX,
            memory: MemoryBudget::unlimited(),
            tables: Arc::default(),
        }
    }

    /// Reads `segment` to its end (or until the reader ends otherwise) with its own lease.
    async fn read(&self, segment: Segment) -> Outcome {
        let shard = ShardKey::for_shard(TABLE, &format!("backfill-1-{}", segment.index));
        let (_coordinator, guard) = lease(self.store.clone(), &shard).await;
        let reader = SegmentReader {
            scan: self.table.clone(),
            sink: self.sink.clone(),
            checkpoints: Checkpoints::new(self.store.clone()),
            table: TABLE.to_owned(),
            subject: "dynamodb_streams.t".to_owned(),
            epoch: 1,
            segment,
            key_attributes: vec!["pk".to_owned()],
            budget: self.budget.clone(),
            scan_after: 0,
            metrics: Arc::new(Metrics::new()),
            page_limit: 100,
            window: 64,
            value_limit: self.value_limit,
            cancel: CancellationToken::new(),
            guard,
            memory: self.memory.clone(),
            tables: self.tables.clone(),
            subject_prefix: "dynamodb_streams".to_owned(),
        };
        tokio::time::timeout(DEADLINE, reader.run()).await.unwrap()
    }

    fn published_keys(&self) -> Vec<String> {
        self.sink
            .stored()
            .iter()
            .map(|event| {
                let json: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
                assert_eq!(json["snapshot"], true);
                assert_eq!(json["event_name"], "INSERT");
                assert_eq!(json["keys"]["pk"], json["new_image"]["pk"]);
                json["keys"]["pk"].as_str().unwrap().to_owned()
            })
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn every_item_of_every_segment_is_published_once_and_each_segment_ends_done() {
    let rig = Rig::new(1050, 0.5, 1e9);
    for index in 0..4 {
        assert_eq!(rig.read(Segment { index, total: 4 }).await, Outcome::Finished);
        let stored = Checkpoints::new(rig.store.clone())
            .load_as::<SegmentProgress>(&segment_key(TABLE, 1, Segment { index, total: 4 }))
            .await
            .unwrap();
        assert_eq!(stored.position, Some(SegmentProgress::Done));
    }
    let keys = rig.published_keys();
    assert_eq!(keys.len(), 1050);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 1050, "every item once");
    assert_eq!(rig.sink.duplicates(), 0);
    // A finished segment is not read again.
    let calls = rig.table.calls();
    assert_eq!(rig.read(Segment { index: 0, total: 4 }).await, Outcome::Finished);
    assert_eq!(rig.table.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn a_segment_resumes_after_its_checkpoint_and_a_page_read_again_is_deduplicated() {
    let rig = Rig::new(300, 0.5, 1e9);
    let segment = Segment { index: 0, total: 1 };
    assert_eq!(rig.read(segment).await, Outcome::Finished);
    // The checkpoint is set back to after item 149 (as if the last writes were lost): the rest is
    // read again and deduplicated by message id.
    let key = segment_key(TABLE, 1, segment);
    let checkpoints = Checkpoints::new(rig.store.clone());
    let stored = checkpoints.load_as::<SegmentProgress>(&key).await.unwrap();
    let after_149 = crate::source::scan::ScanPosition::parse(r#"{"pk":{"S":"item-00149"}}"#).unwrap();
    checkpoints.save(&key, &SegmentProgress::After(after_149), stored.revision).await.unwrap();
    assert_eq!(rig.read(segment).await, Outcome::Finished);
    assert_eq!(rig.published_keys().len(), 300);
    assert_eq!(rig.sink.duplicates(), 150);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retried_with_backoff_never_fatal() {
    let rig = Rig::new(250, 0.5, 1e9);
    for _ in 0..3 {
        rig.table.plan(ReadError::Throttled("ProvisionedThroughputExceededException".to_owned()));
    }
    assert_eq!(rig.read(Segment { index: 0, total: 1 }).await, Outcome::Finished);
    assert_eq!(rig.published_keys().len(), 250);
    assert_eq!(rig.table.calls(), 3 + 3, "three refused calls, then three pages");
}

#[tokio::test(start_paused = true)]
async fn reads_are_paced_by_the_read_units_the_pages_consumed() {
    // 1000 items of 1 unit in pages of 100, at 100 units a second: the first page is free, the other
    // nine wait for the one before to be paid off.
    let rig = Rig::new(1000, 1.0, 100.0);
    let started = Instant::now();
    assert_eq!(rig.read(Segment { index: 0, total: 1 }).await, Outcome::Finished);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(9), "{took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
}

#[test]
fn a_finished_segment_never_moves_again() {
    let position = |pk: &str| {
        SegmentProgress::After(
            crate::source::scan::ScanPosition::parse(&format!(r#"{{"pk":{{"S":"{pk}"}}}}"#)).unwrap(),
        )
    };
    assert!(position("a").is_after(None));
    assert!(position("b").is_after(Some(&position("a"))));
    assert!(SegmentProgress::Done.is_after(Some(&position("a"))));
    assert!(!position("a").is_after(Some(&SegmentProgress::Done)));
    assert!(!SegmentProgress::Done.is_after(Some(&SegmentProgress::Done)));
    assert_eq!(SegmentProgress::parse(&SegmentProgress::Done.encode()), Some(SegmentProgress::Done));
    assert_eq!(SegmentProgress::parse(&position("x").encode()), Some(position("x")));
}

#[tokio::test(start_paused = true)]
async fn a_position_too_large_for_the_bucket_is_not_checkpointed_and_the_segment_still_ends_done() {
    let mut rig = Rig::new(250, 0.5, 1e9);
    rig.value_limit = 10;
    let segment = Segment { index: 0, total: 1 };
    assert_eq!(rig.read(segment).await, Outcome::Finished);
    assert_eq!(rig.published_keys().len(), 250);
    let stored =
        Checkpoints::new(rig.store.clone()).load_as::<SegmentProgress>(&segment_key(TABLE, 1, segment)).await.unwrap();
    assert_eq!(stored.position, Some(SegmentProgress::Done));
}

#[tokio::test(start_paused = true)]
async fn segments_sharing_a_memory_budget_smaller_than_a_page_all_end_done_and_give_it_back() {
    let mut rig = Rig::new(1050, 0.5, 1e9);
    let (held, waits) =
        (prometheus::IntGauge::new("held", "held").unwrap(), prometheus::IntCounter::new("w", "w").unwrap());
    rig.memory = MemoryBudget::new(1000, held.clone(), waits.clone());
    let rig = Arc::new(rig);
    let readers: Vec<_> = (0..4)
        .map(|index| {
            let rig = rig.clone();
            tokio::spawn(async move { rig.read(Segment { index, total: 4 }).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), Outcome::Finished);
    }
    let keys = rig.published_keys();
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 1050, "every item once");
    assert!(waits.get() > 0, "a page and its prefetch do not both fit: readers waited");
    assert_eq!((rig.memory.held(), held.get()), (0, 0), "every charge was given back");
}

/// Snapshot rows follow their table's settings (`TABLES_FILE`) as stream records do: filtered,
/// projected and routed; the segment still ends done.
#[tokio::test(start_paused = true)]
async fn snapshot_rows_are_filtered_projected_and_routed_by_the_tables_settings() {
    let mut rig = Rig::new(20, 0.5, 1e9);
    let file = r#"
tables:
  "?":
    filter: '{"Filters":[{"Pattern":"{\"dynamodb\":{\"NewImage\":{\"n\":{\"N\":[{\"numeric\":[\"<\",5]}]}}}}"}]}'
    include_attributes: [pk]
    subject: "{prefix}.{table}.{event_name}"
"#;
    rig.tables = Arc::new(crate::tables::TablesFile::parse(file).unwrap());
    assert_eq!(rig.read(Segment { index: 0, total: 1 }).await, Outcome::Finished);
    let stored = rig.sink.stored();
    assert_eq!(stored.len(), 5, "items 0 to 4 pass the filter");
    for event in &stored {
        assert_eq!(event.subject, "dynamodb_streams.t.INSERT");
        let json: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        assert_eq!(json["new_image"].as_object().map(|image| image.len()), Some(1), "{json}");
        assert_eq!(json["snapshot"], true);
    }
}
