//! The phase machine over an in-memory bucket: every step taken once, in order, by whichever replica
//! reads first, and nothing started without a request.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use coordination::{LeaseStore, MemoryStore};
use tokio::sync::watch;

use super::{BackfillContext, BackfillWatch, Backfills, PIN_TAKEOVER, now_ms};
use crate::checkpoint::{self, Checkpoints, Progress};
use crate::config::BackfillConfig;
use crate::metrics::Metrics;
use crate::pipeline::backfill::state::{
    BackfillState, Phase, ReplayProgress, epoch_prefix, pin_key, replay_key, request_key, segment_key, state_key,
};
use crate::pipeline::topology::ReadableShards;
use crate::source::StartAt;
use crate::source::memory::MemoryTable;
use crate::source::scan::{Segment, SegmentProgress};
use crate::source::topology::Readable;

const TABLE: &str = "t";

struct Rig {
    store: Arc<MemoryStore>,
    readable: watch::Sender<ReadableShards>,
}

impl Rig {
    /// Two shards of `t` readable; `shardId-1` checkpointed at 100.
    async fn new() -> Rig {
        let store = Arc::new(MemoryStore::new());
        store.create(&checkpoint::key(TABLE, "shardId-1"), "100".into()).await.unwrap();
        let shards: BTreeMap<_, _> = ["shardId-1", "shardId-2"]
            .into_iter()
            .map(|shard_id| {
                let shard = Readable {
                    table: TABLE.to_owned(),
                    stream_arn: "arn".to_owned(),
                    shard_id: shard_id.to_owned(),
                    fresh_start: StartAt::TrimHorizon,
                    closed: false,
                    skip_before: None,
                };
                (shard.lease_key(), shard)
            })
            .collect();
        Rig { store, readable: watch::channel(Some(Arc::new(shards))).0 }
    }

    fn watch(&self, backfill_tables: &[&str]) -> (BackfillWatch, watch::Receiver<Backfills>) {
        let context = BackfillContext {
            store: self.store.clone(),
            checkpoints: Checkpoints::new(self.store.clone()),
            scan: Arc::new(MemoryTable::new(Vec::new(), 1.0)),
            settings: BackfillConfig {
                tables: backfill_tables.iter().map(|table| (*table).to_owned()).collect(),
                segments: Some(3),
                ..BackfillConfig::default()
            },
            tables: watch::channel(Some(Arc::new(
                [TABLE, "other"].map(|table| (table.to_owned(), crate::config::SelectedBy::Name)).into(),
            )))
            .1,
            metrics: Arc::new(Metrics::new()),
        };
        BackfillWatch::new(Arc::new(context), self.readable.subscribe())
    }

    async fn state(&self) -> Option<BackfillState> {
        let entry = self.store.get(&state_key(TABLE)).await.unwrap()?;
        BackfillState::decode(&entry.value)
    }

    async fn value(&self, key: &str) -> Option<String> {
        let entry = self.store.get(key).await.unwrap()?;
        Some(String::from_utf8(entry.value.to_vec()).unwrap())
    }

    async fn put(&self, key: &str, value: String) {
        match self.store.get(key).await.unwrap() {
            Some(entry) => self.store.update(key, value.into(), entry.revision).await.unwrap(),
            None => self.store.create(key, value.into()).await.unwrap(),
        };
    }

    async fn segment_done(&self, epoch: u64, index: u32) {
        self.put(&segment_key(TABLE, epoch, Segment { index, total: 3 }), SegmentProgress::Done.encode()).await;
    }

    async fn replayed(&self, epoch: u64, shard_id: &str, lost: bool) {
        self.put(&replay_key(TABLE, epoch, shard_id), ReplayProgress::Done { lost }.encode()).await;
    }
}

fn segments(view: &watch::Receiver<Backfills>) -> BTreeSet<u32> {
    view.borrow().segments.values().map(|work| work.segment.index).collect()
}

#[tokio::test]
async fn a_backfill_table_goes_through_every_phase_once() {
    let rig = Rig::new().await;
    let (mut watch, view) = rig.watch(&[TABLE]);
    watch.read().await;
    // First sighting: requested, claimed, pinned and scanning in one read.
    assert!(rig.value(&request_key(TABLE)).await.is_some());
    let state = rig.state().await.unwrap();
    assert_eq!((state.epoch, state.phase, state.segments), (1, Phase::Scanning, 3));
    assert_eq!(state.keys, ["pk"]);
    assert!(state.scan_after >= state.since + 2000);
    assert_eq!(rig.value(&pin_key(TABLE, 1, "shardId-1")).await.as_deref(), Some("100"));
    assert_eq!(rig.value(&pin_key(TABLE, 1, "shardId-2")).await.as_deref(), Some("START"));
    assert_eq!(segments(&view), BTreeSet::from([0, 1, 2]));
    assert!(!view.borrow().tables.contains_key("other"), "a table not listed is not backfilled");

    rig.segment_done(1, 0).await;
    rig.segment_done(1, 2).await;
    watch.read().await;
    assert_eq!(segments(&view), BTreeSet::from([1]));
    assert_eq!(view.borrow().segments.values().next().unwrap().unfinished, 1);
    rig.segment_done(1, 1).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Replaying);
    assert!(segments(&view).is_empty());
    assert_eq!(view.borrow().running(TABLE), Some((1, Phase::Replaying)));

    rig.replayed(1, "shardId-1", false).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Replaying, "shardId-2 has not replayed");
    rig.replayed(1, "shardId-2", false).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Done);
    assert_eq!(view.borrow().running(TABLE), None);

    // Done stays done: BACKFILL_TABLES backfills once.
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().epoch, 1);
}

#[tokio::test]
async fn a_new_request_starts_the_next_backfill_and_a_trimmed_replay_makes_it_inexact() {
    let rig = Rig::new().await;
    let (mut watch, view) = rig.watch(&[]);
    watch.read().await;
    assert_eq!(rig.state().await, None, "nothing starts without a request");
    rig.put(&request_key(TABLE), now_ms().to_string()).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Scanning);
    // A request while one runs waits for it to end.
    rig.put(&request_key(TABLE), (now_ms() + 1).to_string()).await;
    for index in 0..3 {
        rig.segment_done(1, index).await;
    }
    watch.read().await;
    rig.replayed(1, "shardId-1", false).await;
    rig.replayed(1, "shardId-2", true).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Inexact);
    watch.read().await;
    let state = rig.state().await.unwrap();
    assert_eq!((state.epoch, state.phase), (2, Phase::Scanning));
    assert_eq!(segments(&view), BTreeSet::from([0, 1, 2]));
    // The first backfill's keys are gone; the second's are there.
    assert!(rig.store.keys(&epoch_prefix(TABLE, 1)).await.unwrap().is_empty());
    assert!(!rig.store.keys(&epoch_prefix(TABLE, 2)).await.unwrap().is_empty());
}

#[tokio::test]
async fn replicas_reading_in_turn_take_each_step_once() {
    let rig = Rig::new().await;
    let (mut a, _) = rig.watch(&[TABLE]);
    let (mut b, _) = rig.watch(&[TABLE]);
    a.read().await;
    b.read().await;
    for index in 0..3 {
        rig.segment_done(1, index).await;
    }
    b.read().await;
    a.read().await;
    rig.replayed(1, "shardId-1", false).await;
    rig.replayed(1, "shardId-2", false).await;
    a.read().await;
    b.read().await;
    let state = rig.state().await.unwrap();
    assert_eq!((state.epoch, state.phase), (1, Phase::Done));
}

#[tokio::test]
async fn pinning_left_unfinished_is_taken_over() {
    let rig = Rig::new().await;
    let stale = now_ms() - PIN_TAKEOVER.as_millis() as u64 - 1000;
    let claim = BackfillState {
        epoch: 1,
        phase: Phase::Pinning,
        requested: stale,
        since: stale,
        started: stale,
        segments: 0,
        keys: Vec::new(),
        items: 0,
        scan_after: 0,
    };
    rig.put(&request_key(TABLE), stale.to_string()).await;
    // The first pinner wrote one pin before it died: kept as written.
    rig.put(&pin_key(TABLE, 1, "shardId-1"), "90".to_owned()).await;
    rig.store.create(&state_key(TABLE), claim.encode()).await.unwrap();
    let (mut watch, _) = rig.watch(&[]);
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Scanning);
    assert_eq!(rig.value(&pin_key(TABLE, 1, "shardId-1")).await.as_deref(), Some("90"));
    assert_eq!(rig.value(&pin_key(TABLE, 1, "shardId-2")).await.as_deref(), Some("START"));
}

#[tokio::test]
async fn a_pinned_shard_finished_without_its_replay_makes_the_backfill_inexact_not_stuck() {
    let rig = Rig::new().await;
    let (mut watch, _) = rig.watch(&[TABLE]);
    watch.read().await;
    for index in 0..3 {
        rig.segment_done(1, index).await;
    }
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Replaying);
    // A replica of the previous version read shardId-2 to its end: it is no longer readable.
    rig.put(&checkpoint::key(TABLE, "shardId-2"), "SHARD_END".to_owned()).await;
    rig.readable.send_modify(|readable| {
        let mut shards = readable.as_deref().unwrap().clone();
        shards.retain(|_, shard| shard.shard_id != "shardId-2");
        *readable = Some(Arc::new(shards));
    });
    rig.replayed(1, "shardId-1", false).await;
    watch.read().await;
    assert_eq!(rig.state().await.unwrap().phase, Phase::Inexact);
    assert_eq!(rig.value(&replay_key(TABLE, 1, "shardId-2")).await.as_deref(), Some("LOST"));
}
