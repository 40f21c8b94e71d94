//! The shard reader's writing side: a page published until every record is acknowledged, the
//! checkpoint moved over each acknowledged prefix, and the finished marker of a shard read to its end.

use std::time::Duration;

use super::{Cursor, Outcome, ShardReader};
use crate::checkpoint::{AdvanceError, Position, ShardCheckpoint};
use crate::publish::{Destination, Prepared};
use crate::retry;
use crate::source::StartAt;

impl ShardReader {
    /// Publishes a batch until every record is acknowledged, checkpointing each acknowledged prefix.
    /// Waits (with backoff) while the sink refuses; never skips a record. Not interrupted by a stop:
    /// the records in hand are published before the reader ends (the drain). When the lease is lost
    /// while a failed attempt may have left publishes in the publish connection, that connection is
    /// fenced before the reader ends, so none of them can arrive after the next owner's.
    pub(super) async fn publish(&self, mut batch: Vec<Prepared>, cursor: &mut Cursor) -> Result<(), Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let sink = &self.pipeline.sink;
        let window = self.pipeline.settings.max_in_flight;
        let mut delays = retry::backoff();
        let mut done = 0;
        // The publish connection that may still hold unacknowledged publishes of this batch.
        let mut unconfirmed: Option<u64> = None;
        let destination = Destination { subject: &self.subject, table, shard_id };
        let lease_lost = |unconfirmed: Option<u64>| {
            if let Some(generation) = unconfirmed {
                sink.fence(generation, table, shard_id, "lease lost with publishes unacknowledged");
            }
            Outcome::LeaseLost
        };
        while done < batch.len() {
            if let Err(lost) = self.guard.check() {
                tracing::warn!(table, shard_id, reason = %lost, "lease lost: this reader stops publishing");
                return Err(lease_lost(unconfirmed));
            }
            let result = sink.publish_in_order(destination, &mut batch, done, window, &self.guard).await;
            let acked = match &result {
                Ok(()) => batch.len() - done,
                Err(failure) => failure.acked,
            };
            if acked > 0 {
                let last = batch[done + acked - 1].sequence_number.clone();
                cursor.start = StartAt::After(last.to_string());
                self.checkpoint(&mut cursor.checkpoint, Position::After(last)).await?;
            }
            done += acked;
            let failure = match result {
                // Everything sent was acknowledged, so nothing of an earlier attempt is left either:
                // it went out before these on the same connection, or its connection is gone.
                Ok(()) => {
                    unconfirmed = None;
                    continue;
                }
                Err(failure) => failure,
            };
            unconfirmed = failure.unconfirmed.or(unconfirmed);
            if failure.lease_lost() {
                tracing::warn!(table, shard_id, reason = %failure.message, "lease lost: this reader stops publishing");
                return Err(lease_lost(unconfirmed));
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(1));
            tracing::warn!(table, shard_id, kind = %failure.kind, error = %failure.message,
                retry_in_ms = delay.as_millis() as u64, pending = batch.len() - done, "publish failed; retrying from the first unacknowledged record");
            tokio::select! {
                _ = self.guard.lost() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
        Ok(())
    }

    /// Writes a checkpoint; a lost lease or a key taken by another writer ends the reader; a bucket
    /// that does not answer leaves the write to the next one (the records are published; only
    /// progress is unsaved).
    pub(super) async fn checkpoint(&self, checkpoint: &mut ShardCheckpoint, position: Position) -> Result<(), Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        match checkpoint.advance(position).await {
            Ok(written) => {
                if written {
                    self.pipeline.metrics.checkpoints_written.with_label_values(&[table]).inc();
                    self.pipeline.progress.checkpointed(table, shard_id, checkpoint.position());
                }
                Ok(())
            }
            Err(AdvanceError::LeaseLost(lost)) => {
                tracing::warn!(table, shard_id, reason = %lost, "lease lost: this reader stops publishing");
                Err(Outcome::LeaseLost)
            }
            Err(AdvanceError::Taken(key)) => {
                self.pipeline.metrics.checkpoint_conflicts.with_label_values(&[table]).inc();
                tracing::error!(table, shard_id, key, "checkpoint was moved by another writer; this reader stops");
                Err(Outcome::CheckpointTaken)
            }
            Err(AdvanceError::Unavailable(err)) => {
                tracing::warn!(table, shard_id, error = %err, "checkpoint not written; the next one will cover it");
                Ok(())
            }
        }
    }

    /// `Finishing`: marks the shard finished so its children may be read.
    pub(super) async fn finish(&self, checkpoint: &mut ShardCheckpoint) -> Outcome {
        let last = checkpoint.position().and_then(|p| p.last().cloned());
        let mut delays = retry::backoff();
        loop {
            match self.checkpoint(checkpoint, Position::Finished { last: last.clone() }).await {
                Err(outcome) => return outcome,
                Ok(()) if matches!(checkpoint.position(), Some(Position::Finished { .. })) => {
                    tracing::info!(table = %self.shard.table, shard_id = %self.shard.shard_id, "shard read to its end");
                    return Outcome::Finished;
                }
                // Not written yet: the children wait on this marker, so keep trying.
                Ok(()) => {
                    if !self.pause(delays.next()).await {
                        return self.stopped();
                    }
                }
            }
        }
    }
}
