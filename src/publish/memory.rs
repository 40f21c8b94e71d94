//! An in-memory [`EventSink`] for unit tests of the shard reader: it stores events in the order it
//! is given them, deduplicates by message id within its whole life (as JetStream does within its
//! duplicate window), acknowledges at once, and fails when a test plans it.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use coordination::LeaseGuard;

use super::event::transcode::StreamEvent;
use super::{Destination, EventSink, FailureKind, Outbox, Prepared, PublishFailure, Until};
use crate::metrics::Metrics;
use crate::record::{ChangeRecord, Origin};

/// An event as the sink stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub subject: String,
    pub message_id: String,
    pub sequence_number: String,
    pub payload: Bytes,
}

/// A failure a test plans for a coming publish.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    /// Records acknowledged by the failing call before it fails.
    pub acked: usize,
    pub kind: FailureKind,
    /// The failing record was stored although its ack never came (a lost ack).
    pub stored_anyway: bool,
}

#[derive(Default)]
struct State {
    stored: Vec<Stored>,
    ids: HashSet<String>,
    duplicates: usize,
    planned: VecDeque<Planned>,
    fences: usize,
}

/// The in-memory sink.
#[derive(Default)]
pub struct MemorySink {
    metrics: Metrics,
    state: Mutex<State>,
    /// While `true`, publish calls wait (a publish in flight, for tests of what happens meanwhile).
    held: tokio::sync::watch::Sender<bool>,
    /// Publish calls that have begun, held or not.
    calls: std::sync::atomic::AtomicUsize,
    /// Only calls after this many are held by [`MemorySink::hold`].
    hold_after: std::sync::atomic::AtomicUsize,
}

impl MemorySink {
    /// The next publish call fails as planned (calls after it follow the next plan, if any).
    pub fn plan(&self, failure: Planned) {
        self.lock().planned.push_back(failure);
    }

    /// Holds (`true`) or releases (`false`) every publish call.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Holds every publish call after the first `calls` (until released with `hold(false)`).
    pub fn hold_after(&self, calls: usize) {
        self.hold_after.store(calls, std::sync::atomic::Ordering::SeqCst);
        self.hold(true);
    }

    /// Publish calls that have begun.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every event stored, in order.
    pub fn stored(&self) -> Vec<Stored> {
        self.lock().stored.clone()
    }

    /// Publishes that were dropped as duplicates of a stored message id.
    pub fn duplicates(&self) -> usize {
        self.lock().duplicates
    }

    /// How many times a connection was fenced.
    pub fn fences(&self) -> usize {
        self.lock().fences
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(state: &mut State, subject: &str, record: &Prepared) {
        if state.ids.insert(record.message_id.clone()) {
            state.stored.push(Stored {
                subject: subject.to_owned(),
                message_id: record.message_id.clone(),
                sequence_number: record.sequence_text().to_owned(),
                payload: record.payload.clone(),
            });
        } else {
            state.duplicates += 1;
        }
    }
}

/// The generation of the one "connection" this sink has.
const GENERATION: u64 = 1;

#[async_trait]
impl EventSink for MemorySink {
    fn prepare(&self, table: &str, shard_id: &str, record: ChangeRecord) -> Prepared {
        Prepared::new(table, shard_id, record, usize::MAX, &self.metrics)
    }

    fn prepare_stream(&self, table: &str, shard_id: &str, event: StreamEvent, origin: Origin) -> Prepared {
        Prepared::from_stream(table, shard_id, event, origin, usize::MAX, &self.metrics)
    }

    /// Stores `batch[from..]` in order. With [`Until::Sent`] the last record's ack is left
    /// outstanding in the outbox and given at the next call (a planned failure may come first), so
    /// that pipelining across calls is exercised.
    async fn publish_in_order(
        &self,
        shard: Destination<'_>,
        batch: &mut Vec<Prepared>,
        from: usize,
        guard: &LeaseGuard,
        outbox: &mut Outbox,
        until: Until,
    ) -> Result<usize, PublishFailure> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if call > self.hold_after.load(std::sync::atomic::Ordering::SeqCst) {
            let mut held = self.held.subscribe();
            // The sender lives as long as the sink, so the wait ends when released.
            let _ = held.wait_for(|held| !held).await;
        }
        let mut state = self.lock();
        let planned = state.planned.pop_front();
        // Sent by an earlier call: stored already, their acks outstanding.
        let stored_to = outbox.sent_to().max(from);
        for (acked, record) in batch[from..].iter().enumerate() {
            let index = from + acked;
            let unconfirmed = (stored_to > index).then_some(GENERATION);
            if let Err(lost) = guard.check() {
                outbox.clear();
                let kind = FailureKind::LeaseLost;
                return Err(PublishFailure::counted(
                    &self.metrics,
                    shard.table,
                    acked,
                    kind,
                    lost.to_string(),
                    unconfirmed,
                ));
            }
            if let Some(plan) = planned.filter(|plan| plan.acked == acked) {
                if plan.stored_anyway && index >= stored_to {
                    Self::store(&mut state, record.subject().unwrap_or(shard.subject), record);
                }
                outbox.clear();
                let message = "planned failure".to_owned();
                let unconfirmed = Some(GENERATION);
                return Err(PublishFailure::counted(
                    &self.metrics,
                    shard.table,
                    acked,
                    plan.kind,
                    message,
                    unconfirmed,
                ));
            }
            if index >= stored_to {
                Self::store(&mut state, record.subject().unwrap_or(shard.subject), record);
            }
            if matches!(until, Until::Sent) && index + 1 == batch.len() {
                outbox.sent(GENERATION, batch.len());
                return Ok(acked);
            }
        }
        outbox.clear();
        Ok(batch.len() - from)
    }

    fn fence(&self, _generation: u64, _table: &str, _shard_id: &str, _why: &'static str) {
        self.lock().fences += 1;
    }
}
