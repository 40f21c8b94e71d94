//! Where reading, publishing and coordinating meet: the only module that knows both the source
//! (`crate::source`) and the sink (`crate::publish`).
//!
//! - [`fleet`] (the supervisor): this replica's share of the work, from the lease protocol
//!   (`coordination`): a shard reader per held lease, stopped on hand-over or loss.
//! - [`reader`]: one shard read, published and checkpointed in order, as a state machine.
//! - [`deliver`]: a batch published until every record is acknowledged (readers of shards and of
//!   backfill segments).
//! - [`backfill`]: a backfill's scan segment read into snapshot rows (not wired into the fleet yet).
//! - [`topology`]: every table's shards kept fresh in the bucket, and the shards readable now.

pub mod backfill;
pub mod deliver;
pub mod fleet;
pub mod reader;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use crate::checkpoint::Checkpoints;
use crate::metrics::Metrics;
use crate::publish::EventSink;
use crate::source::ShardSource;
use crate::status::ShardProgress;

/// How a shard is polled and how many publishes it keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    /// `POLL_INTERVAL_MS`: the wait after an empty page.
    pub poll_interval: Duration,
    /// `POLL_GAP_MS`: the wait after a page that was not full.
    pub poll_gap: Duration,
    /// `MAX_IN_FLIGHT`: unacknowledged publishes per shard.
    pub max_in_flight: usize,
}

/// What every shard reader reads from, publishes to, checkpoints in and reports to.
pub struct Pipeline {
    pub source: Arc<dyn ShardSource>,
    pub sink: Arc<dyn EventSink>,
    pub checkpoints: Checkpoints,
    pub metrics: Arc<Metrics>,
    pub progress: Arc<ShardProgress>,
    pub settings: ReadSettings,
}
