//! Keeps every table's [`Topology`] fresh in the bucket and publishes the shards that may be read now.
//!
//! Every second the watch reads each table's topology key (one KV get per table). A table whose key
//! has not changed for `SHARD_REFRESH_INTERVAL_SEC`, as this replica observed it, is refreshed from
//! AWS ([`super::discovery::refresh`]) and written back by compare-and-swap at the revision it was
//! read at, so about one replica per interval pays for `DescribeStream`, whatever the size of the
//! fleet (`coordination/DESIGN.md`, "Discovery in the service"). A table can be refreshed at once on
//! request ([`TopologyWatch::force`]), e.g. when one of its shards was read to its end.
//!
//! It runs as its own task, so slow AWS calls never delay the lease events the fleet handles, and it
//! refreshes at most [`REFRESHES_PER_TICK`] tables per second: `DescribeStream` is limited to about
//! 10 calls per second per account.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use coordination::{LeaseStore, Revision, ShardKey, StoreError};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Services;
use super::discovery;
use super::topology::{self, Readable, Topology};
use crate::status;

/// How often the topology keys are read: children of a shard finished on another replica become
/// readable here within about this long.
const TOPOLOGY_READ_INTERVAL: Duration = Duration::from_secs(1);

/// At most this many tables are refreshed from AWS per read (forced ones first), so a fleet of many
/// tables stays under `DescribeStream`'s limit of about 10 calls per second per account.
pub const REFRESHES_PER_TICK: usize = 5;

/// The shards that may be read now, by lease key; `None` until every table was read once.
pub type ReadableShards = Option<Arc<BTreeMap<ShardKey, Readable>>>;

/// A table's topology as this replica last read it.
#[derive(Default)]
struct TableView {
    /// The revision of the topology key, and when this replica first saw that revision.
    seen: Option<(Revision, Instant)>,
    topology: Option<Topology>,
    /// Refresh at the next read whatever the age (a shard of this table just ended here).
    force: bool,
}

/// Asks the watch to refresh a table at once.
#[derive(Clone)]
pub struct Force(mpsc::UnboundedSender<String>);

impl Force {
    pub fn refresh(&self, table: &str) {
        // The watch is gone only during shutdown, when nothing needs refreshing.
        let _ = self.0.send(table.to_owned());
    }
}

/// The task that keeps the topologies fresh.
pub struct TopologyWatch {
    services: Arc<Services>,
    store: Arc<dyn LeaseStore>,
    tables: BTreeMap<String, TableView>,
    readable: watch::Sender<ReadableShards>,
    forced: mpsc::UnboundedReceiver<String>,
}

impl TopologyWatch {
    /// The watch, a receiver of the readable shards, and the handle that forces a refresh.
    pub fn new(services: Arc<Services>, store: Arc<dyn LeaseStore>) -> (Self, watch::Receiver<ReadableShards>, Force) {
        let tables = services.config.tables.iter().map(|table| (table.clone(), TableView::default())).collect();
        let (readable, readable_rx) = watch::channel(None);
        let (force, forced) = mpsc::unbounded_channel();
        (TopologyWatch { services, store, tables, readable, forced }, readable_rx, Force(force))
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
        let now = Instant::now();
        let interval = self.services.config.shard_refresh_interval;
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
        self.readable.send_if_modified(|current| {
            let changed = current.as_ref().is_none_or(|old| **old != readable);
            if changed {
                *current = Some(Arc::new(readable));
            }
            changed
        });
    }
}

/// Reads one table's topology key and adopts a new revision.
async fn read_table(store: &dyn LeaseStore, table: &str, view: &mut TableView, now: Instant) {
    let key = topology::key(table);
    let stored = match store.get(&key).await {
        Ok(stored) => stored,
        Err(err) => {
            tracing::warn!(table, error = %err, "cannot read the table's topology; retrying");
            return;
        }
    };
    let revision = stored.as_ref().map(|entry| entry.revision);
    if view.seen.map(|(seen, _)| seen) == revision {
        return;
    }
    view.seen = revision.map(|revision| (revision, now));
    view.topology = stored.and_then(|entry| match serde_json::from_slice::<Topology>(&entry.value) {
        Ok(topology) => Some(topology),
        Err(err) => {
            tracing::error!(table, key, error = %err, "unreadable topology value; it is rebuilt from AWS");
            None
        }
    });
}

/// Refreshes one table from AWS and writes it back by compare-and-swap at the revision last read.
async fn refresh_table(services: &Services, store: &dyn LeaseStore, table: &str, view: &mut TableView) {
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
    if value.len() > services.value_limit {
        let message = format!(
            "its shard topology ({} bytes, {} shards) does not fit the checkpoint bucket's max value size \
             ({} bytes usable); raise it (`nats kv edit {} --max-value-size`) or use a bucket without the limit",
            value.len(),
            next.present().len(),
            services.value_limit,
            services.config.bucket,
        );
        if services.unreadable.set(table, status::VALUE_TOO_LARGE, message.clone()) {
            tracing::error!(table, bucket = %services.config.bucket, "table cannot be read: {message}");
        }
        services.metrics.table_unreadable.with_label_values(&[table, status::VALUE_TOO_LARGE]).set(1);
        return;
    }
    let key = topology::key(table);
    let written = match view.seen {
        None => store.create(&key, value).await,
        Some((revision, _)) => store.update(&key, value, revision).await,
    };
    match written {
        Ok(revision) => {
            if services.unreadable.clear(table) {
                tracing::info!(table, "table can be read again: its topology fits the bucket");
            }
            services.metrics.table_unreadable.with_label_values(&[table, status::VALUE_TOO_LARGE]).set(0);
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
