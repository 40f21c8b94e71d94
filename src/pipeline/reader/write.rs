//! The shard reader's writing side: a page published until every record is acknowledged, the
//! checkpoint moved over each acknowledged prefix, and the finished marker of a shard read to its end.

use tokio::time::Instant;

use super::{Cursor, Outcome, ShardReader};
use crate::checkpoint::{AdvanceError, Position, ShardCheckpoint};
use crate::metrics::WaitOn;
use crate::pipeline::deliver::Delivery;
use crate::publish::{Destination, Prepared};
use crate::retry;
use crate::source::StartAt;

impl ShardReader {
    /// Publishes a batch until every record is acknowledged ([`Delivery`]), checkpointing each
    /// acknowledged prefix.
    pub(super) async fn publish(&self, batch: Vec<Prepared>, cursor: &mut Cursor) -> Result<(), Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let destination = Destination { subject: &self.subject, table, shard_id };
        let window = self.pipeline.settings.max_in_flight;
        let mut delivery = Delivery::new(self.pipeline.sink.as_ref(), destination, batch, window, &self.guard);
        loop {
            let publishing = Instant::now();
            let acked = delivery.acked().await;
            self.waited(WaitOn::Publish, publishing);
            let Some(last) = acked? else { return Ok(()) };
            let last = last.sequence_number.clone();
            cursor.start = StartAt::After(last.to_string());
            self.checkpoint(&mut cursor.checkpoint, Position::After(last)).await?;
        }
    }

    /// Writes a checkpoint; a lost lease ends the reader, a key moved by another writer ends this
    /// page (the reader then holds the shard off, `Holding`); a bucket that does not answer leaves the
    /// write to the next one (the records are published; only progress is unsaved).
    pub(super) async fn checkpoint(&self, checkpoint: &mut ShardCheckpoint, position: Position) -> Result<(), Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let writing = Instant::now();
        let advanced = checkpoint.advance(position).await;
        self.waited(WaitOn::Checkpoint, writing);
        match advanced {
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
                tracing::info!(
                    table,
                    shard_id,
                    key,
                    "checkpoint was moved by another writer; publishing of this shard stops"
                );
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
