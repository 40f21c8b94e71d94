//! The delays every retry loop of the service waits between attempts (AWS throttling and 5xx
//! answers, NATS down, a checkpoint write unanswered), through `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// First retry delay after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: long enough to relieve a throttled shard, short enough to recover quickly.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A sequence of retry delays.
pub type Backoff = backon::ExponentialBackoff;

/// Exponential delays with jitter from `BACKOFF_MIN` to `BACKOFF_MAX`, without end.
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times()
}

/// The delays of [`policy`], without end; start a new one after a success.
pub fn backoff() -> Backoff {
    policy().build()
}
