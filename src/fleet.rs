//! This replica's share of the work: which shards it reads, decided by the lease protocol.
//!
//! One task owns the [`Coordinator`], the shard readers and the fleet's view of every table's
//! [`Topology`]. Every second it reads the topology keys; a table whose topology key has not changed
//! for `SHARD_REFRESH_INTERVAL_SEC`, as this replica observed it, is refreshed from AWS by this replica
//! and written back by compare-and-swap. So about one replica per interval pays for `DescribeStream`,
//! whatever the size of the fleet (`coordination/DESIGN.md`, "Discovery in the service").
//!
//! The readable shards of all tables are the coordinator's shard set; it answers with leases:
//! - `Acquired` → a reader starts, holding the lease's guard;
//! - `HandOver` → the reader stops gracefully (the batch in hand is published and checkpointed), then
//!   the lease is released so that a peer takes it at once;
//! - `Revoked` → the reader stops at once (its guard already forbids publishing and checkpointing).
//!
//! A reader that reads its shard to the end finishes the lease and makes this replica refresh the
//! table at once, so the children become readable. Shutdown order: readers stop and write their final
//! checkpoints, then every lease is released (a released lease may be taken by a peer at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use coordination::{Coordinator, Event, Events, LeaseGuard, LeaseStore, Revision, RevokeReason, ShardKey, StoreError};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::source::Services;
use crate::source::discovery;
use crate::source::shard::{Outcome, ShardReader};
use crate::source::topology::{self, Readable, Topology};

/// How often the topology keys are read: one KV get per table, so children of a shard finished on
/// another replica become readable here within about a second.
const TOPOLOGY_READ_INTERVAL: Duration = Duration::from_secs(1);

/// A table's topology as this replica last read it.
#[derive(Default)]
struct TableView {
    /// The revision of the topology key, and when this replica first saw that revision.
    seen: Option<(Revision, Instant)>,
    topology: Option<Topology>,
    /// Refresh at the next tick whatever the age (a shard of this table just ended here).
    force: bool,
}

/// A running reader: its generation (a re-acquired shard gets a new reader) and how to stop it.
struct Running {
    generation: u64,
    stop: CancellationToken,
}

/// Owns the coordinator and the shard readers of this replica.
pub struct Fleet {
    services: Arc<Services>,
    store: Arc<dyn LeaseStore>,
    coordinator: Coordinator,
    events: Events,
    tracker: TaskTracker,
    /// Parent of every reader's stop token.
    readers: CancellationToken,
    tables: BTreeMap<String, TableView>,
    readable: Option<BTreeMap<ShardKey, Readable>>,
    running: HashMap<ShardKey, Running>,
    generation: u64,
    ended_tx: mpsc::UnboundedSender<(ShardKey, u64, Outcome)>,
    ended_rx: mpsc::UnboundedReceiver<(ShardKey, u64, Outcome)>,
}

impl Fleet {
    /// Starts the coordinator (its settings were validated with the rest of the configuration).
    pub fn start(
        services: Arc<Services>,
        store: Arc<dyn LeaseStore>,
        tracker: TaskTracker,
    ) -> Result<(Fleet, tokio::sync::watch::Receiver<coordination::Status>), coordination::ConfigError> {
        let (coordinator, events) = Coordinator::start(Arc::clone(&store), services.config.lease.clone())?;
        let status = coordinator.watch_status();
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let fleet = Fleet {
            services,
            store,
            coordinator,
            events,
            tracker,
            readers: CancellationToken::new(),
            tables: BTreeMap::new(),
            readable: None,
            running: HashMap::new(),
            generation: 0,
            ended_tx,
            ended_rx,
        };
        Ok((fleet, status))
    }

    /// Runs until `stop` is cancelled, then stops the readers and releases every lease.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TOPOLOGY_READ_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Biased: a stop request wins over new work, and a reader's end is handled before a
                // lease event that may concern the same shard.
                biased;
                () = stop.cancelled() => break,
                Some((shard, generation, outcome)) = self.ended_rx.recv() => self.ended(shard, generation, outcome),
                Some(event) = self.events.recv() => self.on_event(event),
                _ = tick.tick() => self.refresh().await,
            }
        }
        self.shutdown().await;
    }

    fn on_event(&mut self, event: Event) {
        let metrics = &self.services.metrics;
        match event {
            Event::Acquired { shard, guard } => {
                metrics.lease_changes.with_label_values(&["acquired"]).inc();
                match self.readable.as_ref().and_then(|readable| readable.get(&shard)).cloned() {
                    Some(readable) => self.spawn_reader(shard, readable, guard),
                    None => {
                        tracing::info!(shard = %shard, "lease for a shard that is not readable here; releasing it");
                        self.coordinator.release(&shard);
                    }
                }
            }
            Event::HandOver { shard } => {
                metrics.lease_changes.with_label_values(&["handed_over"]).inc();
                match self.running.get(&shard) {
                    Some(running) => running.stop.cancel(),
                    None => self.coordinator.release(&shard),
                }
            }
            Event::Revoked { shard, reason } => {
                let change = match reason {
                    RevokeReason::Expired => "expired",
                    RevokeReason::Lost => "lost",
                };
                metrics.lease_changes.with_label_values(&[change]).inc();
                if let Some(running) = self.running.get(&shard) {
                    running.stop.cancel();
                }
            }
        }
    }

    fn spawn_reader(&mut self, shard: ShardKey, readable: Readable, guard: LeaseGuard) {
        // A reader still ending from an earlier tenure cannot publish (its guard is invalid); the new
        // one replaces it, and the old one's end is ignored.
        if let Some(old) = self.running.get(&shard) {
            old.stop.cancel();
        }
        self.generation += 1;
        let generation = self.generation;
        let stop = self.readers.child_token();
        let reader = ShardReader {
            services: Arc::clone(&self.services),
            subject: self.services.config.subject_for(&readable.table),
            table: readable.table,
            stream_arn: readable.stream_arn,
            shard_id: readable.shard_id,
            fresh_start: readable.fresh_start,
            cancel: stop.clone(),
            guard,
        };
        self.running.insert(shard.clone(), Running { generation, stop });
        let ended = self.ended_tx.clone();
        self.tracker.spawn(async move {
            let outcome = reader.run().await;
            // The fleet may be gone during shutdown; nothing waits for the news then.
            let _ = ended.send((shard, generation, outcome));
        });
    }

    fn ended(&mut self, shard: ShardKey, generation: u64, outcome: Outcome) {
        if self.running.get(&shard).map(|running| running.generation) != Some(generation) {
            return;
        }
        self.running.remove(&shard);
        match outcome {
            Outcome::Finished => {
                self.services.metrics.lease_changes.with_label_values(&["finished"]).inc();
                self.coordinator.finish(&shard);
                let table = self.readable.as_ref().and_then(|readable| readable.get(&shard)).map(|r| r.table.clone());
                if let Some(view) = table.and_then(|table| self.tables.get_mut(&table)) {
                    view.force = true;
                }
            }
            // Handed over, or its lease lost, or its checkpoint moved by someone else: release (a no-op
            // when the lease is already gone), and whoever takes it resumes from the checkpoint.
            Outcome::Stopped | Outcome::LeaseLost | Outcome::Fenced => self.coordinator.release(&shard),
        }
    }

    /// Reads every table's topology, refreshes the stale ones, and gives the coordinator the shards
    /// that may be read now.
    async fn refresh(&mut self) {
        for table in &self.services.config.tables {
            let view = self.tables.entry(table.clone()).or_default();
            refresh_table(&self.services, self.store.as_ref(), table, view).await;
        }
        let mut readable = BTreeMap::new();
        for (table, view) in &self.tables {
            let Some(topology) = &view.topology else { continue };
            let counts = topology.counts();
            let known = &self.services.metrics.shards_known;
            known.with_label_values(&[table, "reading"]).set(counts.readable);
            known.with_label_values(&[table, "waiting_for_parent"]).set(counts.waiting_for_parent);
            known.with_label_values(&[table, "finished"]).set(counts.finished);
            readable.extend(topology.readable(table).into_iter().map(|shard| (shard.lease_key(), shard)));
        }
        let changed = self.readable.as_ref().is_none_or(|old| !old.keys().eq(readable.keys()));
        if changed {
            self.coordinator.set_shards(readable.keys().cloned());
        }
        self.readable = Some(readable);
        let status = self.coordinator.status();
        self.services.metrics.leases_held.set(status.held.len() as i64);
        self.services.metrics.replicas_live.set(status.live_replicas as i64);
    }

    async fn shutdown(mut self) {
        self.readers.cancel();
        tracing::info!(readers = self.running.len(), "stopping shard readers; final checkpoints follow");
        while !self.running.is_empty() {
            let Some((shard, generation, _)) = self.ended_rx.recv().await else { break };
            if self.running.get(&shard).is_some_and(|running| running.generation == generation) {
                self.running.remove(&shard);
            }
        }
        self.coordinator.shutdown().await;
        tracing::info!("leases released");
    }
}

/// Reads one table's topology key; refreshes it from AWS when it is stale (unchanged for a refresh
/// interval, as seen here) or forced, and writes it back by compare-and-swap.
async fn refresh_table(services: &Services, store: &dyn LeaseStore, table: &str, view: &mut TableView) {
    let key = topology::key(table);
    let now = Instant::now();
    let stored = match store.get(&key).await {
        Ok(stored) => stored,
        Err(err) => {
            tracing::warn!(table, error = %err, "cannot read the table's topology; retrying");
            return;
        }
    };
    let revision = stored.as_ref().map(|entry| entry.revision);
    if view.seen.map(|(seen, _)| seen) != revision {
        view.seen = revision.map(|revision| (revision, now));
        view.topology = stored.and_then(|entry| match serde_json::from_slice::<Topology>(&entry.value) {
            Ok(topology) => Some(topology),
            Err(err) => {
                tracing::error!(table, key, error = %err, "unreadable topology value; it is rebuilt from AWS");
                None
            }
        });
    }
    let stale = view.seen.is_none_or(|(_, since)| now >= since + services.config.shard_refresh_interval);
    if !stale && !view.force {
        return;
    }
    let next = match discovery::refresh(services, table, view.topology.as_ref()).await {
        Ok(next) => next,
        Err(err) => {
            tracing::warn!(table, error = %err, "shard discovery failed; retrying at the next refresh");
            return;
        }
    };
    let value = match serde_json::to_vec(&next) {
        Ok(value) => bytes::Bytes::from(value),
        Err(err) => {
            tracing::error!(table, error = %err, "cannot encode the topology");
            return;
        }
    };
    let written = match view.seen {
        None => store.create(&key, value).await,
        Some((revision, _)) => store.update(&key, value, revision).await,
    };
    match written {
        Ok(revision) => {
            view.seen = Some((revision, Instant::now()));
            view.topology = Some(next);
            view.force = false;
        }
        // Another replica refreshed first: adopt its topology at the next read (and refresh again if
        // forced, since its refresh may have started before this replica's shard ended).
        Err(StoreError::Conflict { .. }) => tracing::debug!(table, "another replica refreshed the topology first"),
        Err(err) => tracing::warn!(table, error = %err, "cannot write the topology; retrying"),
    }
}
