//! Moves every table's backfill through its phases and tells the fleet what there is to do
//! (`docs/backfill.md`, "Orchestration").
//!
//! Every [`BACKFILL_READ_INTERVAL`] each replica reads each table's `request` and `state` (two KV gets)
//! and, while a backfill runs, the keys of its epoch (one prefix read). A step to the next phase is a
//! compare-and-swap of `state` at the revision read, so exactly one replica takes it, and any replica
//! may take it (a replica that dies between steps leaves nothing that the others cannot redo):
//!
//! ```text
//! request newer than state ──claim──▶ pinning ──pins written──▶ scanning ──every segment DONE──▶ replaying
//!        ▲                                                                                           │
//!        └───────────── done | inexact ◀──every pinned or readable shard replayed─────────────────────┘
//! ```
//!
//! A `pinning` claim left for [`PIN_TAKEOVER`] (its replica died, or `DescribeTable` failed) is
//! claimed again; pins are create-only, so a second pinner keeps what the first wrote. The view it
//! publishes ([`Backfills`]) gives the fleet the segments to lease and the shard readers the phase.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use coordination::{LeaseStore, Revision, ShardKey, StoreError};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::state::{
    BackfillState, EpochKey, Phase, ReplayProgress, encode_pin, epoch_prefix, pin_key, replay_key, request_key,
    state_key,
};
use crate::checkpoint::{self, Checkpoints, Position, Progress};
use crate::config::BackfillConfig;
use crate::metrics::Metrics;
use crate::pipeline::tables::Selected;
use crate::pipeline::topology::ReadableShards;
use crate::source::scan::{Segment, SegmentProgress, TableScan, segments_for};

/// How often each table's backfill keys are read.
pub const BACKFILL_READ_INTERVAL: Duration = Duration::from_secs(2);

/// The wait between the pins and the first `Scan` call: every change an eventually consistent read
/// can miss (DynamoDB replicates within about a second) was made after the pins, so it is replayed.
pub const SCAN_MARGIN: Duration = Duration::from_secs(2);

/// A `pinning` claim older than this is claimed again by whichever replica sees it first.
pub const PIN_TAKEOVER: Duration = Duration::from_secs(30);

/// How often a running backfill logs its progress.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One segment to lease and read.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentWork {
    pub table: String,
    pub epoch: u64,
    pub segment: Segment,
    /// The table's key attributes.
    pub keys: Vec<String>,
    /// No `Scan` before this time (Unix ms).
    pub scan_after: u64,
    /// Segments of this backfill not finished yet: the fleet's read budget is split between them.
    pub unfinished: u32,
}

/// A table's backfill as last read.
#[derive(Debug, Clone, PartialEq)]
pub struct TableBackfill {
    pub state: BackfillState,
    pub segments_done: u32,
    /// Shards replayed, and shards that must be (pinned or readable now), while replaying.
    pub replays_done: usize,
    pub replays_due: usize,
}

/// What the fleet and the shard readers learn from the watch.
#[derive(Debug, Default, PartialEq)]
pub struct BackfillView {
    /// Tables that have a backfill (running or over).
    pub tables: BTreeMap<String, TableBackfill>,
    /// Segments to read now, by lease key.
    pub segments: BTreeMap<ShardKey, SegmentWork>,
}

impl BackfillView {
    /// The epoch of `table`'s backfill when one is running (not over).
    pub fn running(&self, table: &str) -> Option<(u64, Phase)> {
        let backfill = self.tables.get(table)?;
        (!backfill.state.phase.is_over()).then_some((backfill.state.epoch, backfill.state.phase))
    }
}

pub type Backfills = Arc<BackfillView>;

/// The lease key of a segment (shard ids of DynamoDB Streams start with `shardId-`, so none collides).
pub fn segment_lease_key(table: &str, epoch: u64, segment: Segment) -> ShardKey {
    ShardKey::for_shard(table, &format!("backfill-{epoch}-segment-{}-of-{}", segment.index, segment.total))
}

/// What the watch reads and writes with.
pub struct BackfillContext {
    pub store: Arc<dyn LeaseStore>,
    pub checkpoints: Checkpoints,
    pub scan: Arc<dyn TableScan>,
    pub settings: BackfillConfig,
    /// The fleet's table set (`crate::pipeline::tables`): a table that joins it is backfilled if
    /// `settings` covers it.
    pub tables: watch::Receiver<Selected>,
    pub metrics: Arc<Metrics>,
}

/// The task that moves backfills on.
pub struct BackfillWatch {
    context: Arc<BackfillContext>,
    readable: watch::Receiver<ReadableShards>,
    view: watch::Sender<Backfills>,
    /// When each table's progress was last logged.
    logged: HashMap<String, Instant>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

/// What one read of a table found.
struct Found {
    backfill: Option<TableBackfill>,
    segments: Vec<(ShardKey, SegmentWork)>,
}

impl Found {
    fn none() -> Found {
        Found { backfill: None, segments: Vec::new() }
    }

    fn of(state: BackfillState) -> Found {
        // Past scanning, every segment is done.
        let segments_done = if matches!(state.phase, Phase::Pinning | Phase::Scanning) { 0 } else { state.segments };
        Found {
            backfill: Some(TableBackfill { state, segments_done, replays_done: 0, replays_due: 0 }),
            segments: Vec::new(),
        }
    }
}

impl BackfillWatch {
    pub fn new(
        context: Arc<BackfillContext>,
        readable: watch::Receiver<ReadableShards>,
    ) -> (BackfillWatch, watch::Receiver<Backfills>) {
        let (view, view_rx) = watch::channel(Backfills::default());
        (BackfillWatch { context, readable, view, logged: HashMap::new() }, view_rx)
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BACKFILL_READ_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A step cut short is redone by whoever reads the state next.
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.read() => {}
            }
        }
    }

    /// Reads (and moves on) every table's backfill and publishes the view.
    pub async fn read(&mut self) {
        let mut view = BackfillView::default();
        let selected = self.context.tables.borrow().clone();
        let tables: Vec<String> = selected.map(|set| set.keys().cloned().collect()).unwrap_or_default();
        for table in &tables {
            let found = match self.step(table).await {
                Ok(found) => found,
                Err(err) => {
                    tracing::warn!(table, error = %err, "cannot read the table's backfill; retrying");
                    // Keep what was known: a bucket hiccup must not stop segment readers.
                    let current = self.view.borrow().clone();
                    view.segments.extend(
                        current
                            .segments
                            .iter()
                            .filter(|(_, work)| work.table == *table)
                            .map(|(k, w)| (k.clone(), w.clone())),
                    );
                    if let Some(backfill) = current.tables.get(table) {
                        view.tables.insert(table.clone(), backfill.clone());
                    }
                    continue;
                }
            };
            view.segments.extend(found.segments);
            if let Some(backfill) = found.backfill {
                self.report(table, &backfill);
                view.tables.insert(table.clone(), backfill);
            }
        }
        self.view.send_if_modified(|current| {
            let changed = **current != view;
            if changed {
                *current = Arc::new(view);
            }
            changed
        });
    }

    /// One table: requests a first backfill for a `BACKFILL_TABLES` table, starts a requested one, and
    /// moves a running one on when its phase is complete.
    async fn step(&mut self, table: &str) -> Result<Found, StoreError> {
        let store = Arc::clone(&self.context.store);
        let mut request = store.get(&request_key(table)).await?.and_then(|entry| parse_ms(&entry.value));
        let (state, revision) = match store.get(&state_key(table)).await? {
            None => (None, None),
            Some(entry) => match BackfillState::decode(&entry.value) {
                Some(state) => (Some(state), Some(entry.revision)),
                None => {
                    tracing::error!(
                        table,
                        key = state_key(table),
                        "unreadable backfill state; no backfill runs until it is deleted"
                    );
                    return Ok(Found::none());
                }
            },
        };
        if state.is_none() && request.is_none() && self.context.settings.covers(table) {
            let now = now_ms();
            match store.create(&request_key(table), now.to_string().into()).await {
                Ok(_) => {
                    tracing::info!(table, "BACKFILL_TABLES: the table was never backfilled; backfill requested");
                    request = Some(now);
                }
                // Another replica requested it first: seen at the next read.
                Err(StoreError::Conflict { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        let newer =
            request.filter(|requested| state.as_ref().is_none_or(|s| s.phase.is_over() && *requested > s.requested));
        // Pins need the shards: a backfill starts once the topology was read.
        let topology_read = self.readable.borrow().is_some();
        if let Some(requested) = newer.filter(|_| topology_read) {
            let now = now_ms();
            let epoch = state.as_ref().map_or(1, |state| state.epoch + 1);
            let claim = BackfillState {
                epoch,
                phase: Phase::Pinning,
                requested,
                since: now,
                started: now,
                segments: 0,
                keys: Vec::new(),
                items: 0,
                scan_after: 0,
            };
            return match self.swap(table, revision, &claim).await? {
                Some(revision) => {
                    tracing::info!(table, epoch, "backfill started: pinning each shard's position");
                    if epoch > 1 {
                        self.forget(table, epoch - 1).await;
                    }
                    self.pin(table, claim, revision).await
                }
                None => Ok(state.map_or_else(Found::none, Found::of)),
            };
        }
        let (Some(state), Some(revision)) = (state, revision) else { return Ok(Found::none()) };
        match state.phase {
            Phase::Pinning if topology_read && now_ms() >= state.since + PIN_TAKEOVER.as_millis() as u64 => {
                let claim = BackfillState { since: now_ms(), ..state.clone() };
                match self.swap(table, Some(revision), &claim).await? {
                    Some(revision) => {
                        tracing::warn!(
                            table,
                            epoch = state.epoch,
                            "backfill pinning was left unfinished; pinning again"
                        );
                        self.pin(table, claim, revision).await
                    }
                    None => Ok(Found::of(state)),
                }
            }
            Phase::Scanning => self.scanning(table, state, revision).await,
            Phase::Replaying => self.replaying(table, state, revision).await,
            Phase::Pinning | Phase::Done | Phase::Inexact => Ok(Found::of(state)),
        }
    }

    /// Pinning (this replica's claim is `revision`): records every readable shard's checkpoint as its
    /// replay's start, then moves to scanning with the table's shape.
    async fn pin(&self, table: &str, mut state: BackfillState, revision: Revision) -> Result<Found, StoreError> {
        let shape = match self.context.scan.shape(table).await {
            Ok(shape) if !shape.key_attributes.is_empty() => shape,
            Ok(_) => {
                tracing::error!(table, "DescribeTable lists no key attributes; the backfill cannot start");
                return Ok(Found::of(state));
            }
            Err(err) => {
                tracing::warn!(table, error = %err, "DescribeTable failed; pinning is retried after {PIN_TAKEOVER:?}");
                return Ok(Found::of(state));
            }
        };
        let shards: Vec<String> = {
            let readable = self.readable.borrow();
            let Some(readable) = readable.as_deref() else {
                tracing::info!(table, "shard topology not read yet; pinning is retried after {PIN_TAKEOVER:?}");
                return Ok(Found::of(state));
            };
            readable.values().filter(|shard| shard.table == table).map(|shard| shard.shard_id.clone()).collect()
        };
        let store = self.context.store.as_ref();
        for shard_id in &shards {
            let stored = self
                .context
                .checkpoints
                .load(&checkpoint::key(table, shard_id))
                .await
                .map_err(|err| StoreError::Unavailable { reason: err.to_string() })?;
            let pin = encode_pin(stored.position.as_ref().and_then(|position| position.last()));
            match store.create(&pin_key(table, state.epoch, shard_id), pin.into()).await {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        let now = now_ms();
        state.phase = Phase::Scanning;
        state.since = now;
        state.segments = segments_for(shape.size_bytes, self.context.settings.segments);
        state.keys = shape.key_attributes;
        state.items = shape.item_count;
        state.scan_after = now + SCAN_MARGIN.as_millis() as u64;
        match self.swap(table, Some(revision), &state).await? {
            Some(revision) => {
                tracing::info!(
                    table,
                    epoch = state.epoch,
                    shards = shards.len(),
                    segments = state.segments,
                    items_estimate = state.items,
                    "backfill pinned; scanning"
                );
                self.scanning(table, state, revision).await
            }
            None => Ok(Found::none()),
        }
    }

    /// Scanning: the unfinished segments are work; when none is left, on to replaying.
    async fn scanning(&self, table: &str, state: BackfillState, revision: Revision) -> Result<Found, StoreError> {
        let keys = self.epoch_keys(table, state.epoch).await?;
        let done: BTreeSet<u32> = keys
            .segments
            .iter()
            .filter(|(segment, progress)| segment.total == state.segments && *progress == SegmentProgress::Done)
            .map(|(segment, _)| segment.index)
            .collect();
        let segments_done = done.len() as u32;
        if segments_done >= state.segments {
            let next = BackfillState { phase: Phase::Replaying, since: now_ms(), ..state.clone() };
            if self.swap(table, Some(revision), &next).await?.is_some() {
                tracing::info!(
                    table,
                    epoch = state.epoch,
                    segments = state.segments,
                    "backfill scan finished; replaying each shard's changes since the pin"
                );
                return Ok(Found::of(next));
            }
            return Ok(Found::of(state));
        }
        let unfinished = state.segments - segments_done;
        let segments = (0..state.segments)
            .filter(|index| !done.contains(index))
            .map(|index| {
                let segment = Segment { index, total: state.segments };
                let work = SegmentWork {
                    table: table.to_owned(),
                    epoch: state.epoch,
                    segment,
                    keys: state.keys.clone(),
                    scan_after: state.scan_after,
                    unfinished,
                };
                (segment_lease_key(table, state.epoch, segment), work)
            })
            .collect();
        Ok(Found { backfill: Some(TableBackfill { state, segments_done, replays_done: 0, replays_due: 0 }), segments })
    }

    /// Replaying: done once every shard that was pinned or is readable now has replayed.
    async fn replaying(&self, table: &str, state: BackfillState, revision: Revision) -> Result<Found, StoreError> {
        let mut keys = self.epoch_keys(table, state.epoch).await?;
        let readable: BTreeSet<String> = match self.readable.borrow().as_deref() {
            Some(readable) => {
                readable.values().filter(|shard| shard.table == table).map(|shard| shard.shard_id.clone()).collect()
            }
            None => return Ok(Found::of(state)),
        };
        self.unreplayable(table, &state, &readable, &mut keys).await?;
        let mut due: BTreeSet<String> = keys.pins.clone();
        due.extend(readable);
        let done = due.iter().filter(|shard| keys.replays.get(*shard).is_some_and(ReplayProgress::is_done)).count();
        let backfill = |state| TableBackfill {
            state,
            segments_done: keys.segments_done(),
            replays_done: done,
            replays_due: due.len(),
        };
        if done < due.len() {
            return Ok(Found { backfill: Some(backfill(state)), segments: Vec::new() });
        }
        let lost: Vec<&String> =
            due.iter().filter(|shard| keys.replays.get(*shard).is_some_and(ReplayProgress::is_lost)).collect();
        let phase = if lost.is_empty() { Phase::Done } else { Phase::Inexact };
        let next = BackfillState { phase, since: now_ms(), ..state.clone() };
        if self.swap(table, Some(revision), &next).await?.is_none() {
            return Ok(Found { backfill: Some(backfill(state)), segments: Vec::new() });
        }
        let took_s = next.since.saturating_sub(next.started) / 1000;
        if lost.is_empty() {
            tracing::info!(
                table,
                epoch = next.epoch,
                shards = due.len(),
                took_s,
                "backfill done: the hand-off to the stream is exact"
            );
        } else {
            tracing::error!(table, epoch = next.epoch, shards = ?lost, took_s,
                "backfill INEXACT: changes made during it were trimmed from the stream before they could be replayed (the scan took longer than the stream's 24 h retention); consumers may hold stale or deleted items: request a new backfill with a higher BACKFILL_READ_UNITS_PER_SEC");
        }
        Ok(Found { backfill: Some(backfill(next)), segments: Vec::new() })
    }

    /// A pinned shard that is no longer readable and was finished without replaying (by a replica
    /// of the previous version, during a rolling upgrade) can never replay: its replay is recorded
    /// lost (create-only), so the backfill ends `inexact` instead of waiting for ever.
    async fn unreplayable(
        &self,
        table: &str,
        state: &BackfillState,
        readable: &BTreeSet<String>,
        keys: &mut EpochKeys,
    ) -> Result<(), StoreError> {
        let waiting: Vec<String> = keys
            .pins
            .iter()
            .filter(|shard| {
                !readable.contains(*shard) && !keys.replays.get(*shard).is_some_and(ReplayProgress::is_done)
            })
            .cloned()
            .collect();
        for shard_id in waiting {
            let stored = self
                .context
                .checkpoints
                .load(&checkpoint::key(table, &shard_id))
                .await
                .map_err(|err| StoreError::Unavailable { reason: err.to_string() })?;
            if !matches!(stored.position, Some(Position::Finished { .. })) || keys.replays.contains_key(&shard_id) {
                continue;
            }
            let lost = ReplayProgress::Done { lost: true };
            match self.context.store.create(&replay_key(table, state.epoch, &shard_id), lost.encode().into()).await {
                Ok(_) => {
                    self.context.metrics.backfill_handoff_lost.with_label_values(&[table]).inc();
                    tracing::error!(
                        table,
                        shard_id,
                        epoch = state.epoch,
                        "a pinned shard was read to its end without its backfill replay (by a replica of an earlier version?): the backfill is inexact"
                    );
                    keys.replays.insert(shard_id, lost);
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Deletes the keys of backfill `epoch` of `table`, long over once the next one is claimed (no
    /// reader looks at a backfill that is over), so the bucket keeps those of one finished backfill
    /// at most. Best effort: what is left is deleted at the next claim.
    async fn forget(&self, table: &str, epoch: u64) {
        let store = self.context.store.as_ref();
        let prefix = epoch_prefix(table, epoch);
        let entries = match store.scan(&[prefix.as_str()]).await {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(table, epoch, error = %err, "cannot list the keys of an earlier backfill; left");
                return;
            }
        };
        let mut deleted = 0usize;
        for (key, entry) in entries {
            match store.delete(&key, entry.revision).await {
                Ok(()) => deleted += 1,
                Err(err) => tracing::debug!(key, error = %err, "key of an earlier backfill not deleted"),
            }
        }
        tracing::info!(table, epoch, deleted, "keys of the earlier backfill deleted");
    }

    /// The pins, segment checkpoints and replay progress of one backfill.
    async fn epoch_keys(&self, table: &str, epoch: u64) -> Result<EpochKeys, StoreError> {
        let prefix = epoch_prefix(table, epoch);
        let entries = self.context.store.scan(&[prefix.as_str()]).await?;
        let mut keys = EpochKeys::default();
        for (key, entry) in &entries {
            let Some(rest) = key.strip_prefix(&prefix) else { continue };
            let text = String::from_utf8_lossy(&entry.value);
            match EpochKey::parse(rest) {
                Some(EpochKey::Pin(shard)) => {
                    keys.pins.insert(shard.to_owned());
                }
                Some(EpochKey::Segment(segment)) => {
                    if let Some(progress) = SegmentProgress::parse(&text) {
                        keys.segments.push((segment, progress));
                    }
                }
                Some(EpochKey::Replay(shard)) => {
                    if let Some(progress) = ReplayProgress::parse(&text) {
                        keys.replays.insert(shard.to_owned(), progress);
                    }
                }
                None => {}
            }
        }
        Ok(keys)
    }

    /// Writes `state` at `revision` (`None`: creates it); `None` when another replica wrote first.
    async fn swap(
        &self,
        table: &str,
        revision: Option<Revision>,
        state: &BackfillState,
    ) -> Result<Option<Revision>, StoreError> {
        let key = state_key(table);
        let written = match revision {
            None => self.context.store.create(&key, state.encode()).await,
            Some(revision) => self.context.store.update(&key, state.encode(), revision).await,
        };
        match written {
            Ok(revision) => Ok(Some(revision)),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The phase gauge, and a progress line every [`PROGRESS_LOG_INTERVAL`] while a backfill runs.
    fn report(&mut self, table: &str, backfill: &TableBackfill) {
        let state = &backfill.state;
        for phase in Phase::ALL {
            let on = i64::from(phase == state.phase);
            self.context.metrics.backfill_phase.with_label_values(&[table, phase.as_str()]).set(on);
        }
        if state.phase.is_over() {
            return;
        }
        let now = Instant::now();
        if self.logged.get(table).is_some_and(|at| now < *at + PROGRESS_LOG_INTERVAL) {
            return;
        }
        self.logged.insert(table.to_owned(), now);
        let elapsed_s = now_ms().saturating_sub(state.started) / 1000;
        tracing::info!(
            table,
            epoch = state.epoch,
            phase = state.phase.as_str(),
            segments_done = backfill.segments_done,
            segments = state.segments,
            replays_done = backfill.replays_done,
            replays_due = backfill.replays_due,
            items_published_here = self.context.metrics.backfill_items.with_label_values(&[table]).get(),
            elapsed_s,
            eta_s = eta_secs(backfill, elapsed_s),
            "backfill progress"
        );
    }
}

/// The seconds a scan has left, from the share of segments done so far; `None` before any is done
/// or when not scanning.
pub fn eta_secs(backfill: &TableBackfill, elapsed_s: u64) -> Option<u64> {
    let (done, total) = (u64::from(backfill.segments_done), u64::from(backfill.state.segments));
    (backfill.state.phase == Phase::Scanning && done > 0).then(|| elapsed_s * (total.saturating_sub(done)) / done)
}

/// The keys of one backfill.
#[derive(Default)]
struct EpochKeys {
    pins: BTreeSet<String>,
    segments: Vec<(Segment, SegmentProgress)>,
    replays: BTreeMap<String, ReplayProgress>,
}

impl EpochKeys {
    fn segments_done(&self) -> u32 {
        self.segments.iter().filter(|(_, progress)| *progress == SegmentProgress::Done).count() as u32
    }
}

/// A request's time: Unix ms as decimal text.
fn parse_ms(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
