//! Keeps every table's [`Topology`] fresh in the bucket and publishes the shards that may be read now.
//!
//! A topology is kept as many small keys ([`crate::source::layout`]). Every second the watch reads each
//! table's head (one KV get per table), and the table's other keys only when the head says they
//! changed. A table whose head has not changed for `SHARD_REFRESH_INTERVAL_SEC`, as this replica
//! observed it, is refreshed from AWS ([`discovery::refresh`]); what changed is written, then
//! the head by compare-and-swap at the revision it was read at, so about one replica per interval
//! pays for `DescribeStream`, whatever the size of the fleet (`coordination/DESIGN.md`, "Discovery
//! in the service"). A table can be refreshed at once on
//! request ([`Force`]), e.g. when one of its shards was read to its end.
//!
//! It runs as its own task, so slow AWS calls never delay the lease events the fleet handles, and it
//! refreshes at most [`REFRESHES_PER_TICK`] tables per second: `DescribeStream` is limited to about
//! 10 calls per second per account.
//!
//! The tables come from the fleet's table set (`super::tables`): a table that joins it is followed
//! from its next read (a table never seen starts as `START_FROM_LATEST` says, as at start-up); a table
//! that leaves it is dropped, so its shards leave the readable set, and the lease protocol hands its
//! held leases over. Its keys and checkpoints stay in the bucket, for when it comes back. Nothing is
//! published as readable before the set is first known.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordination::{LeaseStore, Revision, ShardKey, StoreError, Versioned};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::tables::Selected;
use crate::metrics::{ShardState, UnreadableReason};
use crate::source::discovery::{self, Discovery};
use crate::source::layout::{self, Head};
use crate::source::topology::{Readable, Topology};
use crate::status::UnreadableTables;

/// How often the topology keys are read: children of a shard finished on another replica become
/// readable here within about this long.
const TOPOLOGY_READ_INTERVAL: Duration = Duration::from_secs(1);

/// At most this many tables are refreshed from AWS per read (forced ones first), so a fleet of many
/// tables stays under `DescribeStream`'s limit of about 10 calls per second per account.
pub const REFRESHES_PER_TICK: usize = 5;

/// Topology writes of one wave (shards whose parents are written) sent at once: a table of
/// thousands of shards is written in seconds, not one round trip per shard.
const WRITES_IN_FLIGHT: usize = 64;

/// What the topology watch reads, writes and reports with.
pub struct TopologyContext {
    pub discovery: Discovery,
    /// `SHARD_REFRESH_INTERVAL_SEC`.
    pub refresh_interval: Duration,
    /// The checkpoint bucket's name, for the message of a table whose topology does not fit it.
    pub bucket: String,
    /// The largest value the bucket takes (see `crate::nats::VALUE_HEADROOM`).
    pub value_limit: usize,
    pub unreadable: Arc<UnreadableTables>,
}

/// The shards that may be read now, by lease key; `None` until every table was read once.
pub type ReadableShards = Option<Arc<BTreeMap<ShardKey, Readable>>>;

/// A table's topology as this replica last read it.
#[derive(Default)]
struct TableView {
    /// The revision of the table's head, and when this replica first saw that revision.
    seen: Option<(Revision, Instant)>,
    head: Option<Head>,
    /// The table's stream and shard keys as last read or written.
    stored: layout::Stored,
    /// The head's `changes` when `stored` was read; `None` when it must be read again.
    read_at: Option<u64>,
    topology: Option<Topology>,
    /// Refresh at the next read whatever the age (a shard of this table just ended here).
    force: bool,
}

/// Asks the watch to refresh a table at once.
#[derive(Clone)]
pub struct Force(mpsc::UnboundedSender<String>);

impl Force {
    /// A handle not tied to a watch, and the receiving end of its requests (for tests).
    #[cfg(test)]
    pub fn detached() -> (Force, mpsc::UnboundedReceiver<String>) {
        let (force, forced) = mpsc::unbounded_channel();
        (Force(force), forced)
    }

    pub fn refresh(&self, table: &str) {
        // The watch is gone only during shutdown, when nothing needs refreshing.
        let _ = self.0.send(table.to_owned());
    }
}

/// The task that keeps the topologies fresh.
pub struct TopologyWatch {
    context: Arc<TopologyContext>,
    store: Arc<dyn LeaseStore>,
    tables: BTreeMap<String, TableView>,
    /// The fleet's table set; `tables` follows it at each read.
    selected: watch::Receiver<Selected>,
    readable: watch::Sender<ReadableShards>,
    forced: mpsc::UnboundedReceiver<String>,
}

impl TopologyWatch {
    /// The watch, a receiver of the readable shards, and the handle that forces a refresh.
    pub fn new(
        context: Arc<TopologyContext>,
        store: Arc<dyn LeaseStore>,
        selected: watch::Receiver<Selected>,
    ) -> (Self, watch::Receiver<ReadableShards>, Force) {
        let (readable, readable_rx) = watch::channel(None);
        let (force, forced) = mpsc::unbounded_channel();
        let tables = BTreeMap::new();
        (TopologyWatch { context, store, tables, selected, readable, forced }, readable_rx, Force(force))
    }

    /// Follows the table set: views for the tables that joined it, none for those that left. False
    /// while the set is not known yet.
    fn follow_set(&mut self) -> bool {
        let Some(selected) = self.selected.borrow_and_update().clone() else { return false };
        let metrics = &self.context.discovery.metrics;
        let joined: Vec<String> = selected.keys().filter(|table| !self.tables.contains_key(*table)).cloned().collect();
        if !joined.is_empty() {
            metrics.init_tables(&joined);
            for table in joined {
                self.tables.insert(table, TableView::default());
            }
        }
        let left: Vec<String> = self.tables.keys().filter(|table| !selected.contains_key(*table)).cloned().collect();
        for table in left {
            tracing::info!(table, "table left the set: its shards are no longer read (checkpoints stay)");
            self.tables.remove(&table);
            for state in ShardState::ALL {
                metrics.shards_known.with_label_values(&[&table, state.as_str()]).set(0);
            }
            self.context.unreadable.clear(&table);
        }
        true
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TOPOLOGY_READ_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Biased: a stop wins; a forced refresh is done before the next regular read.
                biased;
                () = stop.cancelled() => return,
                Some(table) = self.forced.recv() => {
                    if let Some(view) = self.tables.get_mut(&table) {
                        view.force = true;
                    }
                }
                // The table set changed: a new table is read at once, not at the next tick. (A
                // static set's sender is gone: this branch is then disabled, never busy.)
                Ok(()) = self.selected.changed() => {}
                _ = tick.tick() => {}
            }
            // A slow AWS call must not hold up a shutdown: a refresh cut short is redone by whoever
            // finds the topology stale next.
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.read() => {}
            }
        }
    }

    /// Reads every table's topology, refreshes the stale ones (forced first, at most
    /// [`REFRESHES_PER_TICK`]), and publishes the readable shards.
    async fn read(&mut self) {
        if !self.follow_set() {
            return;
        }
        let now = Instant::now();
        let interval = self.context.refresh_interval;
        for (table, view) in &mut self.tables {
            read_table(self.store.as_ref(), table, view, now).await;
        }
        let mut due: Vec<(&String, &mut TableView)> = self
            .tables
            .iter_mut()
            .filter(|(_, view)| view.force || view.seen.is_none_or(|(_, since)| now >= since + interval))
            .collect();
        due.sort_by_key(|(_, view)| (!view.force, view.seen.map(|(_, since)| since)));
        for (table, view) in due.into_iter().take(REFRESHES_PER_TICK) {
            refresh_table(&self.context, self.store.as_ref(), table, view).await;
        }
        let mut readable = BTreeMap::new();
        for (table, view) in &self.tables {
            let Some(topology) = &view.topology else { continue };
            let counts = topology.counts();
            let known = &self.context.discovery.metrics.shards_known;
            known.with_label_values(&[table, ShardState::Reading.as_str()]).set(counts.readable);
            known.with_label_values(&[table, ShardState::WaitingForParent.as_str()]).set(counts.waiting_for_parent);
            known.with_label_values(&[table, ShardState::Finished.as_str()]).set(counts.finished);
            readable.extend(topology.readable(table).into_iter().map(|shard| (shard.lease_key(), shard)));
        }
        self.readable.send_if_modified(|current| {
            let changed = current.as_ref().is_none_or(|old| **old != readable);
            if changed {
                *current = Some(Arc::new(readable));
            }
            changed
        });
    }
}

/// Reads one table's head, and its stream and shard keys when the head says they changed (or when
/// this replica's copy of them may be stale); adopts what it reads.
async fn read_table(store: &dyn LeaseStore, table: &str, view: &mut TableView, now: Instant) {
    let stored = match store.get(&layout::head_key(table)).await {
        Ok(stored) => stored,
        Err(err) => {
            tracing::warn!(table, error = %err, "cannot read the table's topology; retrying");
            return;
        }
    };
    let revision = stored.as_ref().map(|entry| entry.revision);
    if view.seen.map(|(seen, _)| seen) != revision {
        view.seen = revision.map(|revision| (revision, now));
        view.head = match stored.map(|entry| serde_json::from_slice::<Head>(&entry.value)) {
            Some(Ok(head)) => Some(head),
            Some(Err(err)) => {
                tracing::error!(table, error = %err, "unreadable topology head; it is rebuilt from AWS");
                view.read_at = None;
                Some(Head::default())
            }
            None => None,
        };
    }
    let changes = view.head.as_ref().map(|head| head.changes);
    if changes.is_some() && view.read_at == changes {
        // The keys are as read; the head's own fields may still have moved.
        if let (Some(head), Some(topology)) = (&view.head, &mut view.topology) {
            topology.since = head.since;
            topology.problem = head.problem.clone();
        }
        return;
    }
    // Keys written by a refresh that has not written its head yet (or never will) are read too, so
    // that the next refresh writes over them at their revisions.
    let prefixes = [layout::stream_prefix(table), layout::shard_prefix(table)];
    let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    view.stored = match store.scan(&prefixes).await {
        Ok(entries) => entries.into_iter().collect(),
        Err(err) => {
            tracing::warn!(table, error = %err, "cannot read the table's shards; retrying");
            return;
        }
    };
    view.read_at = changes;
    let Some(head) = &view.head else {
        if view.topology.is_none() {
            view.topology = previous_layout(store, table).await;
        }
        return;
    };
    match layout::assemble(table, head, &view.stored) {
        Ok(topology) => view.topology = Some(topology),
        Err(err) => tracing::error!(table, error = %err, "unreadable topology; it is rebuilt from AWS"),
    }
}

/// The table's topology in the previous layout (one value per table), which the first refresh in
/// this layout carries over (its first sighting, its finished shards).
async fn previous_layout(store: &dyn LeaseStore, table: &str) -> Option<Topology> {
    let key = layout::previous_key(table);
    let entry = store.get(&key).await.ok().flatten()?;
    match serde_json::from_slice::<Topology>(&entry.value) {
        Ok(topology) => {
            tracing::info!(table, key, "carrying the topology over from the previous layout");
            Some(topology)
        }
        Err(err) => {
            tracing::warn!(table, key, error = %err, "unreadable topology in the previous layout; ignored");
            None
        }
    }
}

/// Why a refresh could not be written.
enum WriteError {
    /// Another replica wrote first; its topology is adopted at the next read.
    Conflict,
    Store(StoreError),
}

impl From<StoreError> for WriteError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict { .. } => WriteError::Conflict,
            err => WriteError::Store(err),
        }
    }
}

/// Refreshes one table from AWS and writes what changed: the stream and shard keys (parents first),
/// then the head by compare-and-swap at the revision last read, which claims the refresh.
async fn refresh_table(context: &TopologyContext, store: &dyn LeaseStore, table: &str, view: &mut TableView) {
    let next = match discovery::refresh(&context.discovery, table, view.topology.as_ref()).await {
        Ok(next) => next,
        Err(err) => {
            tracing::warn!(table, error = %err, "shard discovery failed; retrying at the next refresh");
            return;
        }
    };
    let (writes, deletes) = layout::diff(&view.stored, &layout::entries(table, &next));
    let changes = view.head.as_ref().map_or(0, |head| head.changes);
    let changes = if writes.is_empty() && deletes.is_empty() { changes } else { changes + 1 };
    let head = Head::of(&next, changes);
    let head_value = head.encode();
    let largest = writes.iter().map(|entry| entry.value.len()).max().unwrap_or(0).max(head_value.len());
    if largest > context.value_limit {
        let message = format!(
            "a value of its shard topology ({largest} bytes) does not fit the checkpoint bucket's max value \
             size ({} bytes usable); raise it (`nats kv edit {} --max-value-size`) or use a bucket without the limit",
            context.value_limit, context.bucket,
        );
        if context.unreadable.set(table, UnreadableReason::ValueTooLarge, message.clone()) {
            tracing::error!(table, bucket = %context.bucket, "table cannot be read: {message}");
        }
        context
            .discovery
            .metrics
            .table_unreadable
            .with_label_values(&[table, UnreadableReason::ValueTooLarge.as_str()])
            .set(1);
        return;
    }
    let (written, deleted, started) = (writes.len(), deletes.len(), Instant::now());
    match write(store, table, view, writes, deletes, head_value).await {
        Ok(revision) => {
            if written + deleted > 0 {
                let ms = started.elapsed().as_millis() as u64;
                tracing::info!(table, written, deleted, ms, shards = next.present().len(), "shard topology changed");
            }
            if context.unreadable.clear(table) {
                tracing::info!(table, "table can be read again: its topology fits the bucket");
            }
            context
                .discovery
                .metrics
                .table_unreadable
                .with_label_values(&[table, UnreadableReason::ValueTooLarge.as_str()])
                .set(0);
            view.seen = Some((revision, Instant::now()));
            view.read_at = Some(head.changes);
            view.head = Some(head);
            view.topology = Some(next);
            view.force = false;
        }
        // Another replica refreshed first: adopt its topology at the next read, all keys read
        // again (and refresh again if forced, since its refresh may have started before this
        // replica's shard ended).
        Err(WriteError::Conflict) => {
            view.read_at = None;
            tracing::debug!(table, "another replica refreshed the topology first");
        }
        Err(WriteError::Store(err)) => {
            view.read_at = None;
            tracing::warn!(table, error = %err, "cannot write the topology; retrying");
        }
    }
}

/// Writes a refresh: `writes` wave by wave (each at the revision last read, up to
/// [`WRITES_IN_FLIGHT`] at once within a wave), `deletes`, then the head.
async fn write(
    store: &dyn LeaseStore,
    table: &str,
    view: &mut TableView,
    writes: Vec<layout::Entry>,
    deletes: Vec<String>,
    head: Bytes,
) -> Result<Revision, WriteError> {
    let mut waves: BTreeMap<usize, Vec<layout::Entry>> = BTreeMap::new();
    for entry in writes {
        waves.entry(entry.wave).or_default().push(entry);
    }
    for wave in waves.into_values() {
        let stored = &view.stored;
        let written: Vec<(layout::Entry, Result<Revision, StoreError>)> = futures::stream::iter(wave)
            .map(|entry| async move {
                let written = match stored.get(&entry.key) {
                    Some(current) => store.update(&entry.key, entry.value.clone(), current.revision).await,
                    None => store.create(&entry.key, entry.value.clone()).await,
                };
                (entry, written)
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        let mut failed = None;
        for (entry, result) in written {
            match result {
                Ok(revision) => {
                    view.stored.insert(entry.key, Versioned { value: entry.value, revision });
                }
                Err(err) => failed = Some(err),
            }
        }
        if let Some(err) = failed {
            return Err(err.into());
        }
    }
    for key in deletes {
        if let Some(stored) = view.stored.get(&key) {
            store.delete(&key, stored.revision).await?;
            view.stored.remove(&key);
        }
    }
    let key = layout::head_key(table);
    let revision = match view.seen {
        None => store.create(&key, head).await?,
        Some((revision, _)) => store.update(&key, head, revision).await?,
    };
    Ok(revision)
}
