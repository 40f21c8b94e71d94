//! The shard reader on paused time, over the in-memory source, sink and store, with a lease from a
//! real coordinator: what it publishes and checkpoints, and how each way a shard can go wrong ends.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordination::{Coordinator, LeaseGuard, LeaseStore, MemoryStore, ShardKey};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Outcome, ShardReader};
use crate::checkpoint::{self, Checkpoints, Position, Progress, SequenceNumber};
use crate::config::BackfillConfig;
use crate::config::SelectedBy;
use crate::memory::MemoryBudget;
use crate::metrics::{Metrics, PublishErrorKind as FailureKind, WaitOn};
use crate::pipeline::backfill::state::{BackfillState, Phase, ReplayProgress, pin_key, replay_key};
use crate::pipeline::backfill::watch::{BackfillView, Backfills, TableBackfill};
use crate::pipeline::tables::Selected;
use crate::pipeline::topology::{Force, ReadableShards};
use crate::pipeline::{Pipeline, ReadSettings};
use crate::publish::memory::{MemorySink, Planned};
use crate::source::StartAt;
use crate::source::error::ReadError;
use crate::source::memory::{MemorySource, MemoryTable, record};
use crate::source::topology::Readable;
use crate::status::ShardProgress;
use crate::testing::{DEADLINE, lease};

const TABLE: &str = "t";
const SHARD: &str = "shardId-1";
/// Records are created at this second (epoch) unless a test says otherwise.
const CREATED: f64 = 1_767_225_600.0;
/// How long another writer's checkpoint must stay unchanged before a reader goes on with the shard.
const QUIET_FOR: Duration = Duration::from_secs(10);

struct Harness {
    source: Arc<MemorySource>,
    sink: Arc<MemorySink>,
    store: Arc<MemoryStore>,
    metrics: Arc<Metrics>,
    coordinator: Coordinator,
    guard: LeaseGuard,
    readable: watch::Sender<ReadableShards>,
    /// The fleet's table set: `t` alone until a test changes it.
    tables: watch::Sender<Selected>,
    forced: mpsc::UnboundedReceiver<String>,
    backfills: watch::Sender<Backfills>,
    /// `IDLE_POLL_MAX_MS` of the readers started (the poll interval, 500 ms, unless a test sets it).
    idle_poll_max: Duration,
    /// The readers' memory budget (unlimited unless a test sets one).
    memory: MemoryBudget,
    /// The readers' `TABLES_FILE` (none unless a test sets one).
    settings: Arc<crate::tables::TablesFile>,
}

fn shard() -> Readable {
    Readable {
        table: TABLE.to_owned(),
        stream_arn: "arn:stream".to_owned(),
        shard_id: SHARD.to_owned(),
        fresh_start: StartAt::TrimHorizon,
        closed: false,
        skip_before: None,
    }
}

impl Harness {
    /// A source with pages of `page_size` records and the lease of the shard.
    async fn new(page_size: usize) -> Harness {
        let store = Arc::new(MemoryStore::new());
        let (coordinator, guard) = lease(store.clone(), &ShardKey::for_shard(TABLE, SHARD)).await;
        let (readable, _) = watch::channel(None);
        let (_, forced) = Force::detached();
        Harness {
            source: Arc::new(MemorySource::new(page_size)),
            sink: Arc::new(MemorySink::default()),
            store,
            metrics: Arc::new(Metrics::new()),
            coordinator,
            guard,
            readable,
            tables: watch::channel(Some(Arc::new(BTreeMap::from([(TABLE.to_owned(), SelectedBy::Name)])))).0,
            forced,
            backfills: watch::channel(Backfills::default()).0,
            idle_poll_max: Duration::from_millis(500),
            memory: MemoryBudget::unlimited(),
            settings: Arc::default(),
        }
    }

    /// Starts a reader of the shard as `shard` describes it.
    fn start(&mut self, shard: Readable) -> (JoinHandle<Outcome>, CancellationToken) {
        let pipeline = Arc::new(Pipeline {
            source: self.source.clone(),
            sink: self.sink.clone(),
            checkpoints: Checkpoints::new(self.store.clone()),
            metrics: self.metrics.clone(),
            progress: Arc::new(ShardProgress::default()),
            settings: ReadSettings {
                poll_interval: Duration::from_millis(500),
                poll_gap: Duration::from_millis(100),
                idle_poll_max: self.idle_poll_max,
                max_in_flight: 64,
                quiet_for: QUIET_FOR,
            },
            scan: Arc::new(MemoryTable::new(Vec::new(), 1.0)),
            backfill: BackfillConfig::default(),
            value_limit: usize::MAX,
            memory: self.memory.clone(),
            tables: self.settings.clone(),
            subject_prefix: "dynamodb_streams".to_owned(),
        });
        let (force, forced) = Force::detached();
        self.forced = forced;
        let cancel = CancellationToken::new();
        let reader = ShardReader {
            pipeline,
            shard,
            subject: "dynamodb_streams.t".to_owned(),
            cancel: cancel.clone(),
            guard: self.guard.clone(),
            readable: self.readable.subscribe(),
            tables: self.tables.subscribe(),
            force,
            backfills: self.backfills.subscribe(),
        };
        (tokio::spawn(reader.run()), cancel)
    }

    async fn checkpoint(&self) -> Option<Position> {
        Checkpoints::new(self.store.clone()).load(&checkpoint::key(TABLE, SHARD)).await.unwrap().position
    }

    /// Waits (in virtual time, up to [`DEADLINE`]) until a page reached the sink (held or not).
    async fn until_in_sink(&self) {
        let waited = tokio::time::timeout(DEADLINE, async {
            while self.sink.calls() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the page reached the sink");
    }

    /// Waits (in virtual time, up to [`DEADLINE`]) until the sink holds `count` events.
    async fn until_stored(&self, count: usize) {
        let waited = tokio::time::timeout(DEADLINE, async {
            while self.sink.stored().len() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{} of {count} events stored", self.sink.stored().len());
    }
}

/// Records `first_seq..first_seq + count` of a stream cycling over `items` items from sequence number
/// 1, each item's versions counting up from 0.
fn records(first_seq: u64, count: u64, items: u64) -> Vec<crate::record::ChangeRecord> {
    let at = |seq: u64| record(seq, &format!("item-{}", (seq - 1) % items), (seq - 1) / items, CREATED);
    (first_seq..first_seq + count).map(at).collect()
}

/// Every record stored once, in sequence order, and per item its versions never going backwards.
fn assert_complete_and_ordered(sink: &MemorySink, first_seq: u64, count: u64) {
    let stored = sink.stored();
    let seqs: Vec<u64> = stored.iter().map(|event| event.sequence_number.parse().unwrap()).collect();
    assert_eq!(seqs, (first_seq..first_seq + count).collect::<Vec<_>>());
    let mut last: HashMap<String, u64> = HashMap::new();
    for event in &stored {
        let json: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        let item = json["keys"]["pk"].as_str().unwrap().to_owned();
        let version = json["new_image"]["v"].as_u64().unwrap();
        if let Some(previous) = last.insert(item.clone(), version) {
            assert!(version > previous, "{item}: version {version} after {previous}");
        }
    }
}

async fn outcome(task: JoinHandle<Outcome>) -> Outcome {
    tokio::time::timeout(DEADLINE, task).await.expect("reader ended in time").unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_closed_shard_is_published_in_order_and_checkpointed_as_finished() {
    let mut h = Harness::new(1000).await;
    // Full pages: the next page is prefetched while one is published.
    h.source.append(SHARD, records(1, 2500, 7));
    h.source.close(SHARD);
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 1, 2500);
    let last = crate::checkpoint::SequenceNumber::parse(&format!("{:021}", 2500)).unwrap();
    assert_eq!(h.checkpoint().await, Some(Position::Finished { last: Some(last) }));
    assert_eq!(h.sink.duplicates(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_is_retried_from_the_first_unacknowledged_record() {
    let mut h = Harness::new(100).await;
    h.source.append(SHARD, records(1, 300, 3));
    h.source.close(SHARD);
    // The fourth record of the first page is stored but its ack is lost; then a refusal.
    h.sink.plan(Planned { acked: 3, kind: FailureKind::TimedOut, stored_anyway: true });
    h.sink.plan(Planned { acked: 10, kind: FailureKind::BrokenPipe, stored_anyway: false });
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 1, 300);
    assert_eq!(h.sink.duplicates(), 1, "the record whose ack was lost is sent again and deduplicated");
}

#[tokio::test(start_paused = true)]
async fn an_expired_iterator_resumes_after_the_last_published_record() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 10, 2));
    let (task, stop) = h.start(shard());
    h.until_stored(10).await;
    h.source.plan_records(ReadError::IteratorExpired);
    h.source.append(SHARD, records(11, 10, 2));
    h.until_stored(20).await;
    stop.cancel();
    assert_eq!(outcome(task).await, Outcome::Stopped);
    assert_complete_and_ordered(&h.sink, 1, 20);
    let last = crate::checkpoint::SequenceNumber::parse(&format!("{:021}", 20)).unwrap();
    assert_eq!(h.checkpoint().await, Some(Position::After(last)));
    let expired = h.metrics.get_records_errors.with_label_values(&[TABLE, "iterator_expired"]).get();
    assert_eq!(expired, 1);
}

#[tokio::test(start_paused = true)]
async fn a_trimmed_checkpoint_goes_on_from_trim_horizon_and_counts_the_gap_once() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 30, 3));
    h.source.trim(SHARD, 10);
    h.source.close(SHARD);
    let key = checkpoint::key(TABLE, SHARD);
    h.store.create(&key, Bytes::from(format!("{:021}", 5))).await.unwrap();
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 11, 20);
    assert_eq!(h.metrics.trimmed_data_gaps.with_label_values(&[TABLE]).get(), 1);
}

/// Another writer outside the fleet (a Go service during an upgrade, say): puts `sequences` as the
/// checkpoint one after another, `every` apart; returns when done.
async fn foreign_writer(store: Arc<MemoryStore>, sequences: std::ops::RangeInclusive<u64>, every: Duration) {
    let key = checkpoint::key(TABLE, SHARD);
    for seq in sequences {
        let value = Bytes::from(format!("{seq:021}"));
        match store.get(&key).await.unwrap() {
            Some(stored) => store.update(&key, value, stored.revision).await.unwrap(),
            None => store.create(&key, value).await.unwrap(),
        };
        tokio::time::sleep(every).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_moved_by_another_writer_is_left_to_it_until_still_for_a_lease_ttl() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 10, 2));
    let (task, _) = h.start(shard());
    h.until_stored(10).await;
    // The other writer publishes 11..=14 itself and checkpoints each, 2 s apart; then it stops. The
    // page this reader had in hand when the first move happened is published (it learns of the move
    // at its next checkpoint write); nothing more until the key has been still for a lease TTL.
    let writer = tokio::spawn(foreign_writer(h.store.clone(), 11..=14, Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.source.append(SHARD, records(11, 6, 2));
    let started = tokio::time::Instant::now();
    h.until_stored(16).await;
    h.source.append(SHARD, records(17, 2, 2));
    h.until_stored(18).await;
    writer.await.unwrap();
    // 15 and 16 are published again from the other writer's checkpoint: same message ids, dropped by
    // the duplicate window.
    assert_complete_and_ordered(&h.sink, 1, 18);
    assert!(
        started.elapsed() >= Duration::from_secs(6) + QUIET_FOR,
        "read again only a lease TTL after the last move ({:?})",
        started.elapsed()
    );
    assert_eq!(h.checkpoint().await, Some(Position::After(SequenceNumber::parse(&format!("{:021}", 18)).unwrap())));
    assert_eq!(h.metrics.checkpoint_conflicts.with_label_values(&[TABLE]).get(), 1);
    assert!(h.metrics.foreign_checkpoint_moves.with_label_values(&[TABLE]).get() >= 3);
    assert_eq!(h.metrics.foreign_writer_shards.with_label_values(&[TABLE]).get(), 0);
    assert!(!task.is_finished(), "the reader goes on with the shard");
}

#[tokio::test(start_paused = true)]
async fn a_first_lease_with_a_checkpoint_waits_until_its_writer_has_stopped() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 20, 2));
    // The Go service read 1..=5 before this fleet took its first lease, and goes on to 8.
    foreign_writer(h.store.clone(), 5..=5, Duration::ZERO).await;
    let writer = tokio::spawn(foreign_writer(h.store.clone(), 6..=8, Duration::from_secs(3)));
    let started = tokio::time::Instant::now();
    let (_task, _) = h.start(shard());
    h.until_stored(12).await;
    writer.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(6) + QUIET_FOR, "{:?}", started.elapsed());
    assert_complete_and_ordered(&h.sink, 9, 12);
    assert!(h.metrics.foreign_checkpoint_moves.with_label_values(&[TABLE]).get() >= 2);
}

#[tokio::test(start_paused = true)]
async fn a_first_lease_with_a_still_checkpoint_reads_after_one_lease_ttl() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 10, 2));
    foreign_writer(h.store.clone(), 4..=4, Duration::ZERO).await;
    let started = tokio::time::Instant::now();
    let (_task, _) = h.start(shard());
    h.until_stored(6).await;
    assert!(started.elapsed() >= QUIET_FOR && started.elapsed() < QUIET_FOR * 2, "{:?}", started.elapsed());
    assert_complete_and_ordered(&h.sink, 5, 6);
    assert_eq!(h.metrics.foreign_checkpoint_moves.with_label_values(&[TABLE]).get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_ends_the_reader_and_nothing_more_is_published_or_checkpointed() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 10, 2));
    let (task, _) = h.start(shard());
    h.until_stored(10).await;
    let before = h.checkpoint().await;
    h.coordinator.release(&ShardKey::for_shard(TABLE, SHARD));
    assert_eq!(outcome(task).await, Outcome::LeaseLost);
    h.source.append(SHARD, records(11, 10, 2));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.sink.stored().len(), 10);
    assert_eq!(h.checkpoint().await, before);
}

#[tokio::test(start_paused = true)]
async fn start_from_latest_skips_records_created_before_the_first_sighting() {
    let mut h = Harness::new(1000).await;
    let old = (1..=5).map(|seq| record(seq, "a", seq, CREATED - 10.0));
    let new = (6..=8).map(|seq| record(seq, "a", seq, CREATED));
    h.source.append(SHARD, old.chain(new));
    h.source.close(SHARD);
    let (task, _) = h.start(Readable { skip_before: Some(CREATED as u64), ..shard() });
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 6, 3);
}

#[tokio::test(start_paused = true)]
async fn a_shard_not_found_has_ended_only_once_the_topology_no_longer_lists_it_open() {
    let mut h = Harness::new(1000).await;
    let key = ShardKey::for_shard(TABLE, SHARD);
    h.readable.send_replace(Some(Arc::new(BTreeMap::from([(key.clone(), shard())]))));
    // No such shard at the source: AWS answers NotFound.
    let (task, _) = h.start(shard());
    let refresh = tokio::time::timeout(DEADLINE, h.forced.recv()).await.unwrap();
    assert_eq!(refresh.as_deref(), Some(TABLE), "a refresh of the table is asked for");
    assert!(!task.is_finished(), "listed open: NotFound is transient");
    h.readable.send_replace(Some(Arc::new(BTreeMap::from([(key, Readable { closed: true, ..shard() })]))));
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_eq!(h.checkpoint().await, Some(Position::Finished { last: None }));
}

#[tokio::test(start_paused = true)]
async fn a_shard_not_found_after_its_table_left_the_set_has_not_ended() {
    let mut h = Harness::new(1000).await;
    let key = ShardKey::for_shard(TABLE, SHARD);
    h.readable.send_replace(Some(Arc::new(BTreeMap::from([(key, shard())]))));
    // No such shard at the source: AWS answers NotFound, and keeps retrying while it is listed open.
    let (task, stop) = h.start(shard());
    tokio::time::timeout(DEADLINE, h.forced.recv()).await.unwrap();
    // The table is untagged: it leaves the set, and its shards the readable set with it.
    h.tables.send_replace(Some(Arc::new(BTreeMap::new())));
    h.readable.send_replace(Some(Arc::new(BTreeMap::new())));
    tokio::time::timeout(DEADLINE, h.forced.recv()).await.unwrap();
    assert!(!task.is_finished(), "a table that left the set says nothing about its shards' end");
    // The fleet hands the lease over: the reader stops, and the shard is not marked finished.
    stop.cancel();
    assert_eq!(outcome(task).await, Outcome::Stopped);
    assert_eq!(h.checkpoint().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_a_page_is_published_drains_that_page_and_checkpoints_it() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 40, 4));
    h.sink.hold(true);
    let (task, stop) = h.start(shard());
    h.until_in_sink().await;
    // Told to stop while the page is in the sink: the page in hand is still published and checkpointed.
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "the reader waits for the page in hand");
    h.sink.hold(false);
    assert_eq!(outcome(task).await, Outcome::Stopped);
    assert_complete_and_ordered(&h.sink, 1, 40);
    let last = crate::checkpoint::SequenceNumber::parse(&format!("{:021}", 40)).unwrap();
    assert_eq!(h.checkpoint().await, Some(Position::After(last)));
}

/// The sequence number `n` as the memory source writes it.
fn sequence(n: u64) -> SequenceNumber {
    SequenceNumber::parse(&format!("{n:021}")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_failed_ack_of_the_previous_pages_tail_is_retried_from_it_before_the_next_page() {
    let mut h = Harness::new(1000).await;
    // Full pages over few items: each page goes out while the previous one's last ack is
    // outstanding (the memory sink gives it at the next call), and that ack fails once.
    h.source.append(SHARD, records(1, 3000, 7));
    h.source.close(SHARD);
    h.sink.plan(Planned { acked: 1000, kind: FailureKind::Other, stored_anyway: false });
    h.sink.plan(Planned { acked: 0, kind: FailureKind::TimedOut, stored_anyway: false });
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 1, 3000);
    assert_eq!(h.sink.duplicates(), 1, "the record stored before its ack failed is sent again and deduplicated");
    assert_eq!(h.checkpoint().await, Some(Position::Finished { last: Some(sequence(3000)) }));
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_previous_pages_last_acks_are_outstanding_drains_them_and_checkpoints_all_it_sent() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 2000, 5));
    // The first page goes out with its last ack outstanding; the call that would take it is held.
    h.sink.hold_after(1);
    let (task, stop) = h.start(shard());
    h.until_stored(1000).await;
    assert_eq!(h.checkpoint().await, Some(Position::After(sequence(999))), "only the acknowledged prefix");
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "the reader waits for the outstanding ack");
    h.sink.hold(false);
    assert_eq!(outcome(task).await, Outcome::Stopped);
    let stored = h.sink.stored().len() as u64;
    assert_complete_and_ordered(&h.sink, 1, stored);
    assert_eq!(h.checkpoint().await, Some(Position::After(sequence(stored))), "everything sent is checkpointed");
    assert_eq!(h.sink.fences(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_the_previous_pages_last_acks_are_outstanding_fences_their_connection() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 2000, 5));
    h.sink.hold_after(1);
    let (task, _) = h.start(shard());
    h.until_stored(1000).await;
    h.coordinator.release(&ShardKey::for_shard(TABLE, SHARD));
    h.sink.hold(false);
    assert_eq!(outcome(task).await, Outcome::LeaseLost);
    assert_eq!(h.sink.fences(), 1, "the connection that may still hold the unacknowledged publish is fenced");
    assert_eq!(h.sink.stored().len(), 1000, "nothing more is sent");
    assert_eq!(
        h.checkpoint().await,
        Some(Position::After(sequence(999))),
        "the checkpoint covers only what was acknowledged"
    );
}

/// The backfill view of table `t` in `phase` (epoch 1).
fn backfill(phase: Phase) -> Backfills {
    let state = BackfillState {
        epoch: 1,
        phase,
        requested: 1,
        since: 1,
        started: 1,
        segments: 1,
        keys: vec!["pk".to_owned()],
        items: 0,
        scan_after: 0,
    };
    let table = TableBackfill { state, segments_done: 1, replays_done: 0, replays_due: 1 };
    Arc::new(BackfillView { tables: BTreeMap::from([(TABLE.to_owned(), table)]), segments: BTreeMap::new() })
}

fn seq(n: u64) -> String {
    format!("{n:021}")
}

impl Harness {
    async fn replay_progress(&self) -> Option<ReplayProgress> {
        let key = replay_key(TABLE, 1, SHARD);
        Checkpoints::new(self.store.clone()).load_as::<ReplayProgress>(&key).await.unwrap().position
    }

    async fn until_replay(&self, done: bool) {
        let waited = tokio::time::timeout(DEADLINE, async {
            while self.replay_progress().await.is_none_or(|progress| progress.is_done() != done) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "replay progress {:?}", self.replay_progress().await);
    }
}

/// The stored events as (item, version, replayed), in the order stored.
fn events(sink: &MemorySink) -> Vec<(String, u64, bool)> {
    sink.stored()
        .iter()
        .map(|event| {
            let json: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
            let item = json["keys"]["pk"].as_str().unwrap().to_owned();
            (item, json["new_image"]["v"].as_u64().unwrap(), json["replay"] == true)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_replay_republishes_the_changes_since_the_pin_and_each_items_last_event_is_its_latest() {
    let mut h = Harness::new(10).await;
    h.source.append(SHARD, records(1, 300, 7));
    let (task, _cancel) = h.start(shard());
    h.until_stored(300).await;
    h.store.create(&pin_key(TABLE, 1, SHARD), seq(100).into()).await.unwrap();
    // The sink holds the first replayed page; meanwhile three items change again.
    h.sink.hold(true);
    h.backfills.send_replace(backfill(Phase::Replaying));
    h.until_replay(false).await;
    let live: Vec<_> = (0..3).map(|n| record(301 + n, &format!("item-{n}"), 1000, CREATED)).collect();
    h.source.append(SHARD, live);
    h.sink.hold(false);
    h.until_replay(true).await;
    h.until_stored(303).await;

    let events = events(&h.sink);
    let replayed: Vec<_> = events.iter().filter(|(_, _, replayed)| *replayed).collect();
    assert!(replayed.len() >= 10, "at least the page held: {}", replayed.len());
    assert!(replayed.len() < 200, "records of items changed live after P1 are skipped: {}", replayed.len());
    // A consumer that upserts each event holds every item's latest version.
    let mut consumer: HashMap<String, u64> = HashMap::new();
    for (item, version, _) in &events {
        consumer.insert(item.clone(), *version);
    }
    let mut latest: HashMap<String, u64> = HashMap::new();
    for record in records(1, 300, 7) {
        let json = crate::publish::event::Event::from_record(TABLE, &record).encode().payload;
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        latest.insert(json["keys"]["pk"].as_str().unwrap().to_owned(), json["new_image"]["v"].as_u64().unwrap());
    }
    for n in 0..3 {
        latest.insert(format!("item-{n}"), 1000);
    }
    assert_eq!(consumer, latest);
    assert_eq!(h.metrics.backfill_replayed.with_label_values(&[TABLE]).get(), replayed.len() as u64);
    assert!(!task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_shard_that_ends_during_a_backfill_is_finished_only_after_its_replay() {
    let mut h = Harness::new(10).await;
    h.source.append(SHARD, records(1, 50, 5));
    h.source.close(SHARD);
    h.backfills.send_replace(backfill(Phase::Scanning));
    let (task, _cancel) = h.start(shard());
    h.until_stored(50).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.checkpoint().await, Some(Position::After(SequenceNumber::parse(&seq(50)).unwrap())));
    assert!(!task.is_finished(), "its children must wait for its replay");
    // No pin: the replay starts at the shard's oldest record.
    h.backfills.send_replace(backfill(Phase::Replaying));
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert!(matches!(h.checkpoint().await, Some(Position::Finished { .. })));
    assert_eq!(h.replay_progress().await, Some(ReplayProgress::Done { lost: false }));
    let events = events(&h.sink);
    assert_eq!(events.len(), 100);
    assert!(events[50..].iter().all(|(_, _, replayed)| *replayed));
}

#[tokio::test(start_paused = true)]
async fn a_replay_whose_pin_was_trimmed_is_lost_counted_and_still_replays_what_is_left() {
    let mut h = Harness::new(10).await;
    h.source.append(SHARD, records(1, 100, 5));
    h.source.trim(SHARD, 50);
    let (_task, _cancel) = h.start(shard());
    h.until_stored(50).await;
    h.store.create(&pin_key(TABLE, 1, SHARD), seq(10).into()).await.unwrap();
    h.backfills.send_replace(backfill(Phase::Replaying));
    h.until_replay(true).await;
    assert_eq!(h.replay_progress().await, Some(ReplayProgress::Done { lost: true }));
    assert_eq!(h.metrics.backfill_handoff_lost.with_label_values(&[TABLE]).get(), 1);
    let events = events(&h.sink);
    assert_eq!(events.iter().filter(|(_, _, replayed)| *replayed).count(), 50);
}

#[tokio::test(start_paused = true)]
async fn a_replay_taken_over_skips_the_items_an_earlier_reader_published_live_after_p1() {
    let mut h = Harness::new(10).await;
    // 1..=100 over items 0..4; 101..=120 change item-0 only, 121..=130 item-1 only.
    h.source.append(SHARD, records(1, 100, 5));
    h.source.append(SHARD, (101..=120).map(|n| record(n, "item-0", 100 + n, CREATED)));
    h.source.append(SHARD, (121..=130).map(|n| record(n, "item-1", 1000 + n, CREATED)));
    // An earlier reader published live up to 120 and replayed up to 60 of (50, 100].
    h.store.create(&checkpoint::key(TABLE, SHARD), seq(120).into()).await.unwrap();
    let p = |n| SequenceNumber::parse(&seq(n)).unwrap();
    let taken = ReplayProgress::Running { p1: p(100), from: Some(p(50)), after: Some(p(60)), lost: false };
    h.store.create(&replay_key(TABLE, 1, SHARD), taken.encode().into()).await.unwrap();
    h.backfills.send_replace(backfill(Phase::Replaying));
    let (_task, _cancel) = h.start(shard());
    h.until_replay(true).await;
    let replayed: Vec<_> = events(&h.sink).into_iter().filter(|(_, _, replayed)| *replayed).collect();
    // (60, 100] is 40 records, 8 of each item: item-0 was published live after P1 by the earlier
    // reader (found by reading (100, 120] again), item-1 by this one.
    assert_eq!(replayed.len(), 24);
    assert!(replayed.iter().all(|(item, _, _)| item != "item-0" && item != "item-1"));
}

#[tokio::test(start_paused = true)]
async fn an_idle_shard_is_read_less_and_less_often_up_to_the_cap_and_at_full_speed_again_after_a_record() {
    let mut h = Harness::new(1000).await;
    h.idle_poll_max = Duration::from_secs(4);
    h.source.append(SHARD, Vec::new());
    let reads = |h: &Harness| h.metrics.get_records_calls.with_label_values(&[TABLE]).get();
    let (_task, _) = h.start(shard());
    // Waits after empty reads: 0.5, 1, 2, 4, 4, … s.
    tokio::time::sleep(Duration::from_millis(7_600)).await;
    assert_eq!(reads(&h), 5, "reads at 0, 0.5, 1.5, 3.5 and 7.5 s");
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(reads(&h), 15, "then one every 4 s");
    h.source.append(SHARD, records(1, 1, 1));
    let written = tokio::time::Instant::now();
    h.until_stored(1).await;
    assert!(
        written.elapsed() <= Duration::from_secs(4),
        "the first record waits at most the cap: {:?}",
        written.elapsed()
    );
    // After a record the wait starts from the poll interval again.
    let before = reads(&h);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(reads(&h) >= before + 2, "{} reads in the second after a record", reads(&h) - before);
}

#[tokio::test(start_paused = true)]
async fn without_a_cap_an_idle_shard_is_read_every_poll_interval() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, Vec::new());
    let (_task, _) = h.start(shard());
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    assert_eq!(h.metrics.get_records_calls.with_label_values(&[TABLE]).get(), 21);
}

/// A memory budget of `capacity` bytes for the harness's readers, with its held-bytes gauge and
/// wait counter.
fn tiny_budget(h: &mut Harness, capacity: usize) -> (prometheus::IntGauge, prometheus::IntCounter) {
    let held = prometheus::IntGauge::new("held", "held").unwrap();
    let waits = prometheus::IntCounter::new("waits", "waits").unwrap();
    h.memory = MemoryBudget::new(capacity, held.clone(), waits.clone());
    (held, waits)
}

#[tokio::test(start_paused = true)]
async fn a_memory_budget_smaller_than_a_page_still_reads_every_page_in_order_and_gives_it_all_back() {
    let mut h = Harness::new(1000).await;
    let (held, _) = tiny_budget(&mut h, 1000);
    h.source.append(SHARD, records(1, 4500, 7));
    h.source.close(SHARD);
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    assert_complete_and_ordered(&h.sink, 1, 4500);
    assert_eq!(h.sink.duplicates(), 0);
    assert_eq!((h.memory.held(), held.get()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_budget_is_spent_drains_the_page_in_hand_and_gives_everything_back() {
    let mut h = Harness::new(1000).await;
    let (held, waits) = tiny_budget(&mut h, 1000);
    h.source.append(SHARD, records(1, 2500, 5));
    h.sink.hold(true);
    let (task, stop) = h.start(shard());
    h.until_in_sink().await;
    // The page in hand holds the whole budget; its prefetch waits for it.
    assert_eq!(h.memory.held(), 1000);
    assert_eq!(waits.get(), 1, "the prefetch waits");
    stop.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "the reader drains the page in hand");
    h.sink.hold(false);
    assert_eq!(outcome(task).await, Outcome::Stopped);
    assert_complete_and_ordered(&h.sink, 1, 1000);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!((h.memory.held(), held.get()), (0, 0), "the prefetch gave up its place and nothing is held");
}

#[tokio::test(start_paused = true)]
async fn a_reader_counts_where_its_time_goes() {
    let mut h = Harness::new(1000).await;
    h.source.append(SHARD, records(1, 10, 2));
    let (_task, _) = h.start(shard());
    h.until_stored(10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waited = |on: WaitOn| h.metrics.reader_wait_seconds.with_label_values(&[TABLE, on.as_str()]).get();
    // A partial page, then empty reads every 500 ms: about two seconds of pauses.
    assert!((1.5..=2.5).contains(&waited(WaitOn::Pause)), "{}", waited(WaitOn::Pause));
    assert!(h.metrics.checkpoints_written.with_label_values(&[TABLE]).get() > 0);
    for on in WaitOn::ALL {
        assert!(waited(on) >= 0.0);
    }
}

/// A table's settings (`TABLES_FILE`) on the live path: what a filter or `ttl_deletes: drop` drops is
/// not published but checkpointed past, also when it ends the page, and counted; what passes is
/// projected and routed to its templated subject.
#[tokio::test(start_paused = true)]
async fn records_the_tables_settings_drop_are_checkpointed_past_counted_and_the_rest_routed() {
    let mut h = Harness::new(1000).await;
    h.settings = Arc::new(
        crate::tables::TablesFile::parse(
            r#"
tables:
  "*":
    filter: '{"Filters":[{"Pattern":"{\"dynamodb\":{\"Keys\":{\"pk\":{\"S\":[{\"prefix\":\"keep\"}]}}}}"}]}'
    exclude_attributes: [v]
    subject: "{prefix}.{table}.{key.pk}"
    ttl_deletes: drop
"#,
        )
        .unwrap(),
    );
    let mut ttl = record(4, "keep-ttl", 1, CREATED);
    ttl.event_name = "REMOVE".to_owned();
    ttl.old_image = ttl.new_image.take();
    ttl.user_identity = Some(crate::record::UserIdentity {
        kind: "Service".to_owned(),
        principal_id: "dynamodb.amazonaws.com".to_owned(),
    });
    h.source.append(
        SHARD,
        [
            record(1, "keep-a", 0, CREATED),
            record(2, "drop-b", 0, CREATED),
            record(3, "keep-c", 1, CREATED),
            ttl,
            record(5, "drop-d", 1, CREATED),
        ],
    );
    h.source.close(SHARD);
    let (task, _) = h.start(shard());
    assert_eq!(outcome(task).await, Outcome::Finished);
    let last = SequenceNumber::parse(&seq(5)).unwrap();
    assert_eq!(h.checkpoint().await, Some(Position::Finished { last: Some(last) }), "the dropped tail is covered");
    let stored = h.sink.stored();
    let subjects: Vec<&str> = stored.iter().map(|s| s.subject.as_str()).collect();
    assert_eq!(subjects, [format!("dynamodb_streams.{TABLE}.keep-a"), format!("dynamodb_streams.{TABLE}.keep-c")]);
    for event in &stored {
        let json: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        assert!(json["new_image"].get("v").is_none() && json["new_image"]["pk"].is_string(), "{json}");
    }
    let filtered = |reason: &str| h.metrics.records_filtered.with_label_values(&[TABLE, reason]).get();
    assert_eq!((filtered("filter"), filtered("ttl_delete")), (2, 1));
}

/// A backfill's replay follows the table's settings as the live path does: a record the filter
/// rejects is passed over (the replay still ends), the rest is projected.
#[tokio::test(start_paused = true)]
async fn the_replay_follows_the_tables_settings() {
    let mut h = Harness::new(10).await;
    h.settings = Arc::new(
        crate::tables::TablesFile::parse(
            r#"
tables:
  "*":
    filter:
      Filters:
        - Pattern: '{"dynamodb": {"Keys": {"pk": {"S": ["item-0", "item-1"]}}}}'
    exclude_attributes: [v]
"#,
        )
        .unwrap(),
    );
    h.source.append(SHARD, records(1, 300, 7));
    let (task, _cancel) = h.start(shard());
    // Items 0 and 1 of 7: 43 records each.
    h.until_stored(86).await;
    h.store.create(&pin_key(TABLE, 1, SHARD), seq(100).into()).await.unwrap();
    h.backfills.send_replace(backfill(Phase::Replaying));
    h.until_replay(true).await;
    let stored: Vec<serde_json::Value> =
        h.sink.stored().iter().map(|event| serde_json::from_slice(&event.payload).unwrap()).collect();
    let replayed: Vec<_> = stored.iter().filter(|json| json["replay"] == true).collect();
    // Seq 101..=300 of items 0 and 1 (106, 113, …, 295 and 107, …, 296): 28 + 28.
    assert_eq!(replayed.len(), 56, "only what passes the filter is replayed");
    for json in &stored {
        assert!(["item-0", "item-1"].contains(&json["keys"]["pk"].as_str().unwrap()), "{json}");
        assert!(json["new_image"].get("v").is_none() && json["new_image"]["pk"].is_string(), "{json}");
    }
    let filtered = h.metrics.records_filtered.with_label_values(&[TABLE, "filter"]).get();
    assert_eq!(filtered, 214 + 144, "live: 300 - 86; replay: 200 - 56");
    assert!(!task.is_finished());
}
