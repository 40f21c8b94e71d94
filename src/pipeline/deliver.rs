//! Delivering a batch: published through the sink until every record is acknowledged, each
//! acknowledged prefix handed to the caller (to checkpoint it). Shared by the shard reader and the
//! backfill's segment reader.
//!
//! Invariants: never skips a record (a failed publish is retried from the first unacknowledged one,
//! with backoff); not interrupted by a stop (the records in hand are delivered before the reader ends:
//! the drain); when the lease is lost while a failed attempt may have left publishes in the publish
//! connection, that connection is fenced before returning, so none of them can arrive after the next
//! owner's.

use std::time::Duration;

use coordination::LeaseGuard;

use super::reader::Outcome;
use crate::publish::{Destination, EventSink, Prepared};
use crate::retry::{self, Backoff};

/// One batch being delivered: call [`Delivery::acked`] until it returns `Ok(None)`.
pub struct Delivery<'a> {
    sink: &'a dyn EventSink,
    destination: Destination<'a>,
    batch: Vec<Prepared>,
    window: usize,
    guard: &'a LeaseGuard,
    /// Records acknowledged, from the batch's start.
    done: usize,
    /// The publish connection that may still hold unacknowledged publishes of this batch.
    unconfirmed: Option<u64>,
    delays: Backoff,
    /// The pause owed before the next attempt: a failed attempt whose acknowledged prefix was handed
    /// to the caller first.
    owed: Option<Duration>,
}

impl<'a> Delivery<'a> {
    pub fn new(
        sink: &'a dyn EventSink,
        destination: Destination<'a>,
        batch: Vec<Prepared>,
        window: usize,
        guard: &'a LeaseGuard,
    ) -> Self {
        Delivery {
            sink,
            destination,
            batch,
            window,
            guard,
            done: 0,
            unconfirmed: None,
            delays: retry::backoff(),
            owed: None,
        }
    }

    /// Publishes until some more records are acknowledged and returns the last of them; `Ok(None)`
    /// once the whole batch is; `Err(LeaseLost)` when the lease ends first.
    pub async fn acked(&mut self) -> Result<Option<&Prepared>, Outcome> {
        let Destination { table, shard_id, .. } = self.destination;
        while self.done < self.batch.len() {
            if let Some(delay) = self.owed.take() {
                tokio::select! {
                    _ = self.guard.lost() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            if let Err(lost) = self.guard.check() {
                tracing::warn!(table, shard_id, reason = %lost, "lease lost: this reader stops publishing");
                return Err(self.lease_lost());
            }
            let (sink, destination, window, guard) = (self.sink, self.destination, self.window, self.guard);
            let result = sink.publish_in_order(destination, &mut self.batch, self.done, window, guard).await;
            let count = match &result {
                Ok(()) => self.batch.len() - self.done,
                Err(failure) => failure.acked,
            };
            match result {
                // Everything sent was acknowledged, so nothing of an earlier attempt is left either:
                // it went out before these on the same connection, or its connection is gone.
                Ok(()) => self.unconfirmed = None,
                Err(failure) => {
                    self.unconfirmed = failure.unconfirmed.or(self.unconfirmed);
                    if failure.lease_lost() {
                        tracing::warn!(table, shard_id, reason = %failure.message, "lease lost: this reader stops publishing");
                        return Err(self.lease_lost());
                    }
                    let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(table, shard_id, kind = %failure.kind, error = %failure.message,
                        retry_in_ms = delay.as_millis() as u64, pending = self.batch.len() - self.done - count,
                        "publish failed; retrying from the first unacknowledged record");
                    self.owed = Some(delay);
                }
            }
            if count > 0 {
                self.done += count;
                return Ok(Some(&self.batch[self.done - 1]));
            }
        }
        Ok(None)
    }

    /// The lease ended: what the publish connection may still hold of this batch is fenced.
    fn lease_lost(&self) -> Outcome {
        if let Some(generation) = self.unconfirmed {
            let Destination { table, shard_id, .. } = self.destination;
            self.sink.fence(generation, table, shard_id, "lease lost with publishes unacknowledged");
        }
        Outcome::LeaseLost
    }
}
