//! Where reading, publishing and coordinating meet: the only module that knows both the source
//! (`crate::source`) and the sink (`crate::publish`).
//!
//! - [`fleet`] (the supervisor): this replica's share of the work, from the lease protocol
//!   (`coordination`): a shard reader per held lease, stopped on hand-over or loss.
//! - [`reader`]: one shard read, published and checkpointed in order, as a state machine.
//! - [`deliver`]: a batch published until every record is acknowledged (readers of shards and of
//!   backfill segments).
//! - [`backfill`]: a table's existing items published as snapshot rows (segments leased like
//!   shards), then each shard's changes since the backfill began replayed by its reader.
//! - [`topology`]: every table's shards kept fresh in the bucket, and the shards readable now.
//! - [`tables`]: which tables are read, re-evaluated from AWS by one replica for the fleet (issue 20).

pub mod backfill;
pub mod deliver;
pub mod fleet;
mod judge;
pub mod reader;
pub mod tables;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use coordination::LeaseGuard;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{AdvanceError, Checkpoints, Fenced, Progress};
use crate::memory::MemoryBudget;
use crate::metrics::Metrics;
use crate::publish::EventSink;
use crate::retry;
use crate::source::ShardSource;
use crate::source::scan::TableScan;
use crate::status::ShardProgress;
pub(crate) use judge::Judge;
use reader::Outcome;

/// How a shard is polled and how many publishes it keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    /// `POLL_INTERVAL_MS`: the wait after an empty page.
    pub poll_interval: Duration,
    /// `POLL_GAP_MS`: the wait after a page that was not full.
    pub poll_gap: Duration,
    /// `IDLE_POLL_MAX_MS`: the wait after empty pages doubles from `poll_interval` up to this.
    pub idle_poll_max: Duration,
    /// `MAX_IN_FLIGHT`: unacknowledged publishes per shard.
    pub max_in_flight: usize,
    /// `LEASE_TTL_SEC`: how long a checkpoint moved by a writer outside the fleet (the Go service
    /// during an upgrade) must stay unchanged before the shard is read here.
    pub quiet_for: Duration,
}

/// What every shard reader reads from, publishes to, checkpoints in and reports to.
pub struct Pipeline {
    pub source: Arc<dyn ShardSource>,
    pub sink: Arc<dyn EventSink>,
    pub checkpoints: Checkpoints,
    pub metrics: Arc<Metrics>,
    pub progress: Arc<ShardProgress>,
    pub settings: ReadSettings,
    /// Scans tables for backfills.
    pub scan: Arc<dyn TableScan>,
    pub backfill: crate::config::BackfillConfig,
    /// The largest value the checkpoint bucket takes (see `crate::nats::VALUE_HEADROOM`).
    pub value_limit: usize,
    /// The bytes that pages may hold across every reader (`crate::memory`).
    pub memory: MemoryBudget,
    /// Per-table settings (`TABLES_FILE`): what flows, what of it, where.
    pub tables: Arc<crate::tables::TablesFile>,
    /// `NATS_SUBJECT_PREFIX`, the `{prefix}` of subject templates.
    pub subject_prefix: String,
}

/// How a reader that was told to stop, or whose lease ended, ends.
fn stopped(guard: &LeaseGuard) -> Outcome {
    if guard.is_valid() { Outcome::Stopped } else { Outcome::LeaseLost }
}

/// Sleeps for `delay` unless told to stop (or the lease is lost) first; false then.
async fn pause(cancel: &CancellationToken, guard: &LeaseGuard, delay: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        _ = guard.lost() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Reads the checkpoint at `key` under `guard`, retrying while the bucket does not answer; `None` if
/// told to stop (or the lease is lost) meanwhile.
async fn load_fenced<V: Progress>(
    checkpoints: &Checkpoints,
    key: &str,
    guard: &LeaseGuard,
    cancel: &CancellationToken,
) -> Option<Fenced<V>> {
    let load = || Fenced::<V>::load(checkpoints.clone(), key.to_owned(), guard.clone());
    let loaded = load.retry(retry::policy()).notify(|err, delay| {
        tracing::warn!(key, error = %err, retry_in_ms = delay.as_millis() as u64, "cannot read checkpoint; retrying");
    });
    tokio::select! {
        () = cancel.cancelled() => None,
        _ = guard.lost() => None,
        loaded = loaded => loaded.ok(),
    }
}

/// What a progress write of a reader means for it (`what` names the progress in the log): a lost
/// lease or a key moved by another writer ends the reader; a bucket that does not answer leaves the
/// write to the next one (what it covers is published: a resumption from older progress publishes it
/// again, with the same message ids).
fn settle(advanced: Result<bool, AdvanceError>, table: &str, what: &str) -> Result<(), Outcome> {
    match advanced {
        Ok(_) => Ok(()),
        Err(AdvanceError::LeaseLost(_)) => Err(Outcome::LeaseLost),
        Err(AdvanceError::Taken(key)) => {
            tracing::error!(table, key, "{what} was moved by another writer; this reader stops");
            Err(Outcome::CheckpointTaken)
        }
        Err(AdvanceError::Unavailable(err)) => {
            tracing::warn!(table, error = %err, "{what} not written; the next write covers it");
            Ok(())
        }
    }
}
