//! This replica's share of the work: which shards it reads, decided by the lease protocol.
//!
//! One task owns the [`Coordinator`] and the shard readers. The shards that may be read now come from
//! the [`TopologyWatch`] (its own task: discovery never delays a lease event); they are the
//! coordinator's shard set, and it answers with leases:
//! - `Acquired` → a reader starts, holding the lease's guard;
//! - `HandOver` → the reader stops gracefully (the batch in hand is published and checkpointed), then
//!   the lease is released so that a peer takes it at once;
//! - `Revoked` → the reader stops at once (its guard already forbids publishing and checkpointing).
//!
//! The tables come from the table set (`super::tables`: fixed for plain names, a watch of its own
//! for patterns and tags); the topology watch follows it, so a table that leaves the set loses its
//! shards from the readable set and the coordinator hands their leases over like any other shard
//! that left the set.
//!
//! Backfill segments (`super::backfill`) are leased through a coordinator of their own, started
//! while the [`BackfillWatch`] lists segments to read: its lease group is the shards' group with
//! `.backfill` appended, so segments are shared out among themselves and their coming and going
//! never moves a shard (one coordinator for both once handed shards over as segments came and went,
//! and each hand-over paused the shard's changes for a second or more). A segment lease runs a
//! [`SegmentReader`].
//!
//! A reader that reads its shard to the end finishes the lease and makes this replica refresh the
//! table at once, so the children become readable. Shutdown order: readers stop and write their final
//! checkpoints, then every lease is released (a released lease may be taken by a peer at once).

use std::collections::HashMap;
use std::sync::Arc;

use coordination::{Coordinator, Event, Events, LeaseGuard, LeaseStore, RevokeReason, ShardKey, Status};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Pipeline;
use super::backfill::watch::{BackfillContext, BackfillWatch, Backfills, SegmentWork};
use super::backfill::{ReadBudget, SegmentReader};
use super::reader::{Outcome, ShardReader};
use super::tables::{Selected, TableSet, TableSetWatch, TablesContext};
use super::topology::{Force, ReadableShards, TopologyContext, TopologyWatch};
use crate::config::Config;
use crate::metrics::LeaseChange;
use crate::source::topology::Readable;

/// A running reader: its generation (a re-acquired shard gets a new reader), how to stop it, and
/// whose lease it holds.
struct Running {
    generation: u64,
    stop: CancellationToken,
    leases: Leases,
}

/// Which coordinator a lease comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leases {
    Shards,
    Segments,
}

/// The coordinator of backfill segments, while there are segments to read.
struct SegmentLeases {
    coordinator: Coordinator,
    events: Events,
}

/// The next lease event of the segments' coordinator; never ready while it does not run.
async fn segment_event(leases: &mut Option<SegmentLeases>) -> Option<Event> {
    match leases {
        Some(leases) => leases.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Owns the coordinator and the shard readers of this replica.
pub struct Fleet {
    config: Config,
    pipeline: Arc<Pipeline>,
    coordinator: Coordinator,
    events: Events,
    status: watch::Receiver<Status>,
    store: Arc<dyn LeaseStore>,
    segment_leases: Option<SegmentLeases>,
    tracker: TaskTracker,
    /// Parent of every reader's stop token.
    readers: CancellationToken,
    watch: Option<TopologyWatch>,
    backfill_watch: Option<BackfillWatch>,
    /// The table set's watch, for a selection by patterns or tags.
    tables_watch: Option<TableSetWatch>,
    tables_rx: watch::Receiver<Selected>,
    readable_rx: watch::Receiver<ReadableShards>,
    /// The shards that may be read now, as last given to the coordinator.
    readable: ReadableShards,
    backfills_rx: watch::Receiver<Backfills>,
    /// The backfills as last read: their segments are leased beside the shards.
    backfills: Backfills,
    force: Force,
    running: HashMap<ShardKey, Running>,
    generation: u64,
    ended_tx: mpsc::UnboundedSender<(ShardKey, u64, Outcome)>,
    ended_rx: mpsc::UnboundedReceiver<(ShardKey, u64, Outcome)>,
}

impl Fleet {
    /// Starts the coordinator (its settings were validated with the rest of the configuration).
    pub fn start(
        config: Config,
        pipeline: Arc<Pipeline>,
        topology: TopologyContext,
        store: Arc<dyn LeaseStore>,
        tracker: TaskTracker,
    ) -> Result<(Fleet, watch::Receiver<Status>), coordination::ConfigError> {
        let (coordinator, events) = Coordinator::start(Arc::clone(&store), config.lease.clone())?;
        pipeline.metrics.init_tables(&config.tables);
        let status = coordinator.watch_status();
        let tables = TablesContext {
            api: Arc::new(topology.discovery.api.clone()),
            selection: config.selection.clone(),
            group: config.lease.group.clone(),
            metrics: Arc::clone(&pipeline.metrics),
        };
        let (tables_rx, tables_watch) = TableSet::start(tables, Arc::clone(&store));
        let (topology, readable_rx, force) =
            TopologyWatch::new(Arc::new(topology), Arc::clone(&store), tables_rx.clone());
        let backfill = BackfillContext {
            store: Arc::clone(&store),
            checkpoints: pipeline.checkpoints.clone(),
            scan: Arc::clone(&pipeline.scan),
            settings: pipeline.backfill.clone(),
            tables: tables_rx.clone(),
            metrics: Arc::clone(&pipeline.metrics),
        };
        let (backfill_watch, backfills_rx) = BackfillWatch::new(Arc::new(backfill), readable_rx.clone());
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let fleet = Fleet {
            config,
            pipeline,
            coordinator,
            events,
            status: status.clone(),
            store,
            segment_leases: None,
            tracker,
            readers: CancellationToken::new(),
            watch: Some(topology),
            backfill_watch: Some(backfill_watch),
            tables_watch,
            tables_rx,
            readable_rx,
            readable: None,
            backfills_rx,
            backfills: Backfills::default(),
            force,
            running: HashMap::new(),
            generation: 0,
            ended_tx,
            ended_rx,
        };
        Ok((fleet, status))
    }

    /// The tables selected now, and why (for `/status`).
    pub fn tables(&self) -> watch::Receiver<Selected> {
        self.tables_rx.clone()
    }

    /// The tables' backfills as the fleet follows them (for `/status`).
    pub fn backfills(&self) -> watch::Receiver<Backfills> {
        self.backfills_rx.clone()
    }

    /// Runs until `stop` is cancelled, then stops the readers and releases every lease.
    pub async fn run(mut self, stop: CancellationToken) {
        if let Some(tables) = self.tables_watch.take() {
            self.tracker.spawn(tables.run(stop.child_token()));
        }
        if let Some(topology) = self.watch.take() {
            self.tracker.spawn(topology.run(stop.child_token()));
        }
        if let Some(backfills) = self.backfill_watch.take() {
            self.tracker.spawn(backfills.run(stop.child_token()));
        }
        loop {
            tokio::select! {
                // Biased: a stop request wins over new work, and a reader's end is handled before a
                // lease event that may concern the same shard.
                biased;
                () = stop.cancelled() => break,
                Some((shard, generation, outcome)) = self.ended_rx.recv() => self.ended(shard, generation, outcome),
                Some(event) = self.events.recv() => self.on_event(event, Leases::Shards),
                Some(event) = segment_event(&mut self.segment_leases) => self.on_event(event, Leases::Segments),
                Ok(()) = self.readable_rx.changed() => self.shards_changed(),
                Ok(()) = self.backfills_rx.changed() => self.segments_changed(),
                Ok(()) = self.status.changed() => {
                    let status = self.status.borrow_and_update();
                    self.pipeline.metrics.leases_held.set(status.held.len() as i64);
                    self.pipeline.metrics.replicas_live.set(status.live_replicas as i64);
                }
            }
        }
        self.shutdown().await;
    }

    /// The coordinator `leases` come from (the segments' one may have stopped meanwhile).
    fn coordinator(&self, leases: Leases) -> Option<&Coordinator> {
        match leases {
            Leases::Shards => Some(&self.coordinator),
            Leases::Segments => self.segment_leases.as_ref().map(|segments| &segments.coordinator),
        }
    }

    fn release(&self, shard: &ShardKey, leases: Leases) {
        self.pipeline.metrics.lease_changes.with_label_values(&[LeaseChange::Released.as_str()]).inc();
        if let Some(coordinator) = self.coordinator(leases) {
            coordinator.release(shard);
        }
    }

    fn on_event(&mut self, event: Event, leases: Leases) {
        let metrics = &self.pipeline.metrics;
        match event {
            Event::Acquired { shard, guard } => {
                metrics.lease_changes.with_label_values(&[LeaseChange::Acquired.as_str()]).inc();
                let readable = self.readable.as_deref().and_then(|readable| readable.get(&shard)).cloned();
                let segment = self.backfills.segments.get(&shard).cloned();
                match (leases, readable, segment) {
                    (Leases::Shards, Some(readable), _) => self.spawn_reader(shard, readable, guard),
                    (Leases::Segments, _, Some(segment)) => self.spawn_segment_reader(shard, segment, guard),
                    _ => {
                        tracing::info!(shard = %shard, "lease for a shard that is not readable here; releasing it");
                        self.release(&shard, leases);
                    }
                }
            }
            Event::HandOver { shard } => {
                metrics.lease_changes.with_label_values(&[LeaseChange::HandedOver.as_str()]).inc();
                match self.running.get(&shard) {
                    Some(running) => running.stop.cancel(),
                    None => self.release(&shard, leases),
                }
            }
            Event::Revoked { shard, reason } => {
                let change = match reason {
                    RevokeReason::Expired => LeaseChange::Expired,
                    RevokeReason::Lost => LeaseChange::Lost,
                };
                metrics.lease_changes.with_label_values(&[change.as_str()]).inc();
                if let Some(running) = self.running.get(&shard) {
                    running.stop.cancel();
                }
            }
        }
    }

    /// A new tenure of `shard`: its generation and stop token. A reader still ending from an earlier
    /// tenure cannot publish (its guard is invalid); the new one replaces it, and the old one's end
    /// is ignored.
    fn tenure(&self, shard: &ShardKey) -> (u64, CancellationToken) {
        if let Some(old) = self.running.get(shard) {
            old.stop.cancel();
        }
        (self.generation + 1, self.readers.child_token())
    }

    fn spawn_reader(&mut self, shard: ShardKey, readable: Readable, guard: LeaseGuard) {
        let (generation, stop) = self.tenure(&shard);
        let reader = ShardReader {
            pipeline: Arc::clone(&self.pipeline),
            subject: self.config.subject_for(&readable.table),
            shard: readable,
            cancel: stop.clone(),
            guard,
            readable: self.readable_rx.clone(),
            tables: self.tables_rx.clone(),
            force: self.force.clone(),
            backfills: self.backfills_rx.clone(),
        };
        self.track(shard, Running { generation, stop, leases: Leases::Shards }, reader.run());
    }

    fn spawn_segment_reader(&mut self, shard: ShardKey, work: SegmentWork, guard: LeaseGuard) {
        let (generation, stop) = self.tenure(&shard);
        let pipeline = &self.pipeline;
        // The fleet's budget, split evenly between the segments not finished yet (a replica holding
        // two of them spends two shares).
        let per_second = pipeline.backfill.read_units_per_sec / f64::from(work.unfinished.max(1));
        let reader = SegmentReader {
            scan: Arc::clone(&pipeline.scan),
            sink: Arc::clone(&pipeline.sink),
            checkpoints: pipeline.checkpoints.clone(),
            subject: self.config.subject_for(&work.table),
            table: work.table,
            epoch: work.epoch,
            segment: work.segment,
            key_attributes: work.keys,
            budget: Arc::new(ReadBudget::new(per_second)),
            scan_after: work.scan_after,
            metrics: Arc::clone(&pipeline.metrics),
            page_limit: pipeline.backfill.page_items,
            window: pipeline.settings.max_in_flight,
            value_limit: pipeline.value_limit,
            cancel: stop.clone(),
            guard,
            memory: pipeline.memory.clone(),
            tables: Arc::clone(&pipeline.tables),
            subject_prefix: pipeline.subject_prefix.clone(),
        };
        self.track(shard, Running { generation, stop, leases: Leases::Segments }, reader.run());
    }

    /// Runs a reader of `shard` and reports its end to the fleet.
    fn track(
        &mut self,
        shard: ShardKey,
        running: Running,
        reader: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        let generation = running.generation;
        self.generation = generation;
        self.running.insert(shard.clone(), running);
        let ended = self.ended_tx.clone();
        self.tracker.spawn(async move {
            let outcome = reader.await;
            // The fleet may be gone during shutdown; nothing waits for the news then.
            let _ = ended.send((shard, generation, outcome));
        });
    }

    fn ended(&mut self, shard: ShardKey, generation: u64, outcome: Outcome) {
        let Some(running) = self.running.get(&shard).filter(|running| running.generation == generation) else {
            return;
        };
        let leases = running.leases;
        self.running.remove(&shard);
        match outcome {
            Outcome::Finished => {
                self.pipeline.metrics.lease_changes.with_label_values(&[LeaseChange::Finished.as_str()]).inc();
                if let Some(coordinator) = self.coordinator(leases) {
                    coordinator.finish(&shard);
                }
                // Its children may be readable now: refresh the table at once.
                if let Some(readable) = self.readable.as_deref().and_then(|readable| readable.get(&shard)) {
                    self.force.refresh(&readable.table);
                }
            }
            // Handed over, or its lease lost, or its checkpoint moved by someone else: release (a no-op
            // when the lease is already gone), and whoever takes it resumes from the checkpoint.
            Outcome::LeaseLost => {
                if let Some(coordinator) = self.coordinator(leases) {
                    coordinator.release(&shard);
                }
            }
            Outcome::Stopped | Outcome::CheckpointTaken => self.release(&shard, leases),
        }
        self.segments_changed();
    }

    /// The readable shards changed: the shards' coordinator follows.
    fn shards_changed(&mut self) {
        let readable = self.readable_rx.borrow_and_update().clone();
        let Some(shards) = readable.as_deref() else { return };
        if self.readable.as_deref().is_none_or(|old| !old.keys().eq(shards.keys())) {
            self.coordinator.set_shards(shards.keys().cloned());
        }
        self.readable = readable;
    }

    /// The backfills changed (or a segment reader ended): the segments' coordinator follows. It is
    /// started when there are segments to read and stopped once there are none and none is read here.
    fn segments_changed(&mut self) {
        let backfills = self.backfills_rx.borrow_and_update().clone();
        let changed = !self.backfills.segments.keys().eq(backfills.segments.keys());
        self.backfills = backfills;
        if self.backfills.segments.is_empty() {
            let reading = self.running.values().any(|running| running.leases == Leases::Segments);
            if !reading && let Some(leases) = self.segment_leases.take() {
                tracing::info!("no backfill segments left to read: their coordinator stops");
                self.tracker.spawn(leases.coordinator.shutdown());
            }
            return;
        }
        if self.segment_leases.is_none() {
            match self.start_segment_leases() {
                Ok(leases) => self.segment_leases = Some(leases),
                Err(err) => {
                    tracing::error!(error = %err, "cannot lease backfill segments");
                    return;
                }
            }
        } else if !changed {
            return;
        }
        if let Some(leases) = &self.segment_leases {
            leases.coordinator.set_shards(self.backfills.segments.keys().cloned());
        }
    }

    /// The segments' coordinator: the shards' settings, its own instance, and the group of the
    /// shards with `.backfill` appended.
    fn start_segment_leases(&self) -> Result<SegmentLeases, coordination::ConfigError> {
        let mut config = self.config.lease.clone();
        config.instance = uuid::Uuid::new_v4().to_string();
        config.group = format!("{}.backfill", config.group);
        let (coordinator, events) = Coordinator::start(Arc::clone(&self.store), config)?;
        tracing::info!("backfill segments to read: their coordinator starts");
        Ok(SegmentLeases { coordinator, events })
    }

    async fn shutdown(mut self) {
        // No lease is taken from now on; held ones are released once their readers are done.
        self.coordinator.drain();
        if let Some(segments) = &self.segment_leases {
            segments.coordinator.drain();
        }
        self.readers.cancel();
        tracing::info!(readers = self.running.len(), "stopping shard readers; final checkpoints follow");
        while !self.running.is_empty() {
            let Some((shard, generation, _)) = self.ended_rx.recv().await else { break };
            if self.running.get(&shard).is_some_and(|running| running.generation == generation) {
                self.running.remove(&shard);
            }
        }
        let held = self.coordinator.status().held.len() as u64;
        self.pipeline.metrics.lease_changes.with_label_values(&[LeaseChange::Released.as_str()]).inc_by(held);
        if let Some(segments) = self.segment_leases.take() {
            segments.coordinator.shutdown().await;
        }
        self.coordinator.shutdown().await;
        tracing::info!(released = held, "leases released");
    }
}
