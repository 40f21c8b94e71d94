//! The DynamoDB Streams side: which shards exist ([`discovery`]), reading one shard ([`shard`]),
//! the AWS calls ([`api`]) and their error classification ([`error`]).

pub mod api;
pub mod discovery;
pub mod error;
pub mod layout;
pub mod shard;
pub mod topology;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::checkpoint::Checkpoints;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::status::{ShardProgress, UnreadableTables};
use api::StreamsApi;

/// What every table watcher and shard reader shares.
pub struct Services {
    pub config: Config,
    pub api: StreamsApi,
    pub publisher: Publisher,
    pub checkpoints: Checkpoints,
    pub metrics: Arc<Metrics>,
    /// Per-shard progress, for `/status` and the lag metrics.
    pub progress: Arc<ShardProgress>,
    /// Configured tables that cannot be read for a reason of ours (for `/readyz` and `/status`).
    pub unreadable: Arc<UnreadableTables>,
    /// The largest value the checkpoint bucket takes (its max value size and the server's max
    /// payload, less room for the headers of a compare-and-swap write).
    pub value_limit: usize,
}

/// First retry delay after a failure (throttling, 5xx, NATS down).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: long enough to relieve a throttled shard, short enough to recover quickly.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A sequence of retry delays.
pub type Backoff = backon::ExponentialBackoff;

/// Exponential delays with jitter, without end; start a new one after a success.
pub fn backoff() -> Backoff {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}
