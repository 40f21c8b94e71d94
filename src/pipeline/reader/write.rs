//! The shard reader's writing side: a page published until every record is acknowledged, the
//! checkpoint moved over each acknowledged prefix, and the finished marker of a shard read to its end.

use tokio::time::Instant;

use super::{Cursor, Outcome, ShardReader};
use crate::checkpoint::{AdvanceError, Position, ShardCheckpoint};
use crate::metrics::WaitOn;
use crate::publish::Until;
use crate::retry;
use crate::source::StartAt;

impl ShardReader {
    /// Publishes the records the cursor's delivery holds until `until`
    /// ([`crate::pipeline::deliver::Delivery::advance`]), checkpointing each acknowledged prefix.
    ///
    /// A checkpoint is written beside the publishes that follow it: the prefix acknowledged when a
    /// page was sent is written while the next page is sent (or read). It is left in the cursor
    /// (`unwritten`) when this returns with publishes outstanding (`Until::Sent`, or `ready`), and
    /// written before this returns otherwise. A checkpoint written while publishes are outstanding
    /// watches the lease too: lost meanwhile, their connection is fenced at once.
    pub(super) async fn publish(&self, cursor: &mut Cursor<'_>, until: Until) -> Result<(), Outcome> {
        let leave_unwritten = !matches!(until, Until::Acked { ready: None });
        loop {
            let publishing = Instant::now();
            let (acked, written) = match cursor.unwritten.take() {
                None => (cursor.delivery.advance(until.clone()).await, Ok(())),
                Some(position) => {
                    let Cursor { delivery, checkpoint, .. } = &mut *cursor;
                    let checkpointing = async {
                        tokio::select! {
                            biased;
                            written = self.write_checkpoint(checkpoint, position) => written,
                            _ = self.guard.lost() => Err(Outcome::LeaseLost),
                        }
                    };
                    tokio::join!(delivery.advance(until.clone()), checkpointing)
                }
            };
            let last = match (acked, written) {
                (Ok(last), Ok(())) => last,
                (Err(Outcome::LeaseLost), _) | (_, Err(Outcome::LeaseLost)) => {
                    self.waited(WaitOn::Publish, publishing);
                    return Err(cursor.delivery.lease_lost());
                }
                (Err(outcome), _) | (_, Err(outcome)) => return Err(outcome),
            };
            self.waited(WaitOn::Publish, publishing);
            let Some(last) = last else { break };
            cursor.start = StartAt::After(last.to_string());
            cursor.unwritten = Some(Position::After(last));
            // Left for the next publishes to carry (rather than written alone now).
            if leave_unwritten && cursor.delivery.reached(&until) {
                break;
            }
        }
        if !leave_unwritten && let Some(position) = cursor.unwritten.take() {
            self.checkpoint(&mut cursor.checkpoint, position).await?;
        }
        Ok(())
    }

    /// Writes a checkpoint; a lost lease ends the reader, a key moved by another writer ends this
    /// page (the reader then holds the shard off, `Holding`); a bucket that does not answer leaves the
    /// write to the next one (the records are published; only progress is unsaved).
    pub(super) async fn checkpoint(&self, checkpoint: &mut ShardCheckpoint, position: Position) -> Result<(), Outcome> {
        let writing = Instant::now();
        let written = self.write_checkpoint(checkpoint, position).await;
        self.waited(WaitOn::Checkpoint, writing);
        written
    }

    /// [`ShardReader::checkpoint`] without counting the wait (one written beside publishes).
    async fn write_checkpoint(&self, checkpoint: &mut ShardCheckpoint, position: Position) -> Result<(), Outcome> {
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
