//! Delivering batches: published through the sink until every record is acknowledged, each
//! acknowledged prefix handed to the caller (to checkpoint it). Shared by the shard reader and the
//! backfill's segment reader.
//!
//! A delivery may hold several pages: the shard reader pushes its next page while the previous
//! page's last acknowledgements are outstanding ([`Until::Sent`], the sink's [`Outbox`]), and takes
//! those acknowledgements while it waits for the page after ([`Until::Acked`] with `ready`). The
//! acknowledged prefix is still contiguous over the pages, so the checkpoint only ever covers it.
//!
//! Invariants: never skips a record (a failed publish is retried from the first unacknowledged one,
//! with backoff); not interrupted by a stop (the records in hand are delivered before the reader ends:
//! the drain); when the lease is lost while publishes may be left in the publish connection (a failed
//! attempt's, or the outbox's), that connection is fenced before returning, so none of them can
//! arrive after the next owner's.

use std::collections::VecDeque;
use std::time::Duration;

use coordination::LeaseGuard;

use super::reader::Outcome;
use crate::checkpoint::SequenceNumber;
use crate::memory::Charge;
use crate::publish::{Destination, EventSink, Outbox, Prepared, Until};
use crate::retry::{self, Backoff};

/// Batches being delivered: call [`Delivery::acked`] until it returns `Ok(None)`.
pub struct Delivery<'a> {
    sink: &'a dyn EventSink,
    destination: Destination<'a>,
    guard: &'a LeaseGuard,
    /// The records pushed and not all acknowledged yet: `batch[..done]` are.
    batch: Vec<Prepared>,
    done: usize,
    /// The memory of each page pushed, held until its last record is acknowledged: where the page
    /// ends in `batch`, and its charge.
    charges: VecDeque<(usize, Charge)>,
    /// Publishes sent whose acknowledgements are outstanding.
    outbox: Outbox,
    /// The publish connection that may still hold publishes of a failed attempt.
    unconfirmed: Option<u64>,
    delays: Backoff,
    /// The pause owed before the next attempt: a failed attempt whose acknowledged prefix was handed
    /// to the caller first.
    owed: Option<Duration>,
}

impl<'a> Delivery<'a> {
    /// A delivery of `batch` with at most `window` acknowledgements outstanding.
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
            guard,
            batch,
            done: 0,
            charges: VecDeque::new(),
            outbox: Outbox::new(window),
            unconfirmed: None,
            delays: retry::backoff(),
            owed: None,
        }
    }

    /// Appends a page, whose records and `charge` are dropped once its last record is acknowledged.
    pub fn push(&mut self, page: Vec<Prepared>, charge: Charge) {
        if self.batch.is_empty() {
            self.batch = page;
        } else {
            self.batch.reserve_exact(page.len());
            self.batch.extend(page);
        }
        self.charges.push_back((self.batch.len(), charge));
        self.release();
    }

    /// True while some record pushed is not acknowledged.
    pub fn outstanding(&self) -> bool {
        self.done < self.batch.len()
    }

    /// Publishes until some more records are acknowledged and returns the sequence number of the
    /// last of them; `Ok(None)` once the whole batch is; `Err(LeaseLost)` when the lease ends first.
    pub async fn acked(&mut self) -> Result<Option<SequenceNumber>, Outcome> {
        self.advance(Until::ACKED).await
    }

    /// Publishes until some more records are acknowledged and returns the sequence number of the
    /// last of them; `Ok(None)` once `until` is reached (every record sent, or acknowledged, or
    /// `ready`); `Err(LeaseLost)` when the lease ends first.
    pub async fn advance(&mut self, until: Until) -> Result<Option<SequenceNumber>, Outcome> {
        let Destination { table, shard_id, .. } = self.destination;
        while !self.reached(&until) {
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
            let (sink, destination, guard) = (self.sink, self.destination, self.guard);
            let result =
                sink.publish_in_order(destination, &mut self.batch, self.done, guard, &mut self.outbox, until.clone());
            let result = result.await;
            let count = match &result {
                Ok(count) => *count,
                Err(failure) => failure.acked,
            };
            match result {
                // Everything sent was acknowledged, so nothing of an earlier attempt is left either:
                // it went out before these on the same connection, or its connection is gone.
                Ok(_) if self.done + count == self.batch.len() => self.unconfirmed = None,
                Ok(_) => {}
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
                let last = self.batch[self.done - 1].sequence_number.clone();
                self.release();
                return Ok(Some(last));
            }
        }
        Ok(None)
    }

    /// True once `until` holds: nothing is left to publish before it.
    pub fn reached(&self, until: &Until) -> bool {
        match until {
            _ if !self.outstanding() => true,
            Until::Sent => self.outbox.sent_to() >= self.batch.len(),
            Until::Acked { ready } => ready.as_ref().is_some_and(|ready| ready.is_cancelled()),
        }
    }

    /// Drops the pages acknowledged to their last record, records and charges: the budget never
    /// counts as free what a batch still holds.
    fn release(&mut self) {
        let mut end = 0;
        while let Some((page_end, _)) = self.charges.front()
            && *page_end <= self.done
        {
            end = *page_end;
            self.charges.pop_front();
        }
        if end == 0 {
            return;
        }
        self.batch.drain(..end);
        // What is left is a page's tail at most: its room is given back with the head.
        if self.batch.capacity() > 2 * self.batch.len() {
            self.batch.shrink_to_fit();
        }
        self.outbox.rebase(end);
        self.done -= end;
        for (page_end, _) in &mut self.charges {
            *page_end -= end;
        }
    }

    /// Gives up what is outstanding without waiting for it (another writer took the checkpoint):
    /// whatever of it arrives is published, and nothing more is sent.
    pub fn abandon(&mut self) {
        self.outbox.clear();
        self.batch.clear();
        self.charges.clear();
        self.done = 0;
    }

    /// The lease ended: what the publish connection may still hold of these records is fenced.
    pub fn lease_lost(&mut self) -> Outcome {
        let Destination { table, shard_id, .. } = self.destination;
        let why = "lease lost with publishes unacknowledged";
        let failed = self.unconfirmed.take();
        let outstanding = self.outbox.unconfirmed(self.done).filter(|generation| failed != Some(*generation));
        for generation in [failed, outstanding].into_iter().flatten() {
            self.sink.fence(generation, table, shard_id, why);
        }
        self.outbox.clear();
        Outcome::LeaseLost
    }
}
