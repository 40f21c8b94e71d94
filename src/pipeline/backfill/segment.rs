//! A backfill's scan segments (`docs/backfill.md`): one segment read page by page, each page's items
//! published as snapshot rows (while the next page is read), and the segment's checkpoint moved past
//! the page once every row of it is acknowledged; reads paced by a read budget. The fleet runs one per segment lease it holds.
//!
//! Invariants: a page's position is checkpointed only after every row of the page is acknowledged, so
//! a segment resumed elsewhere reads that page again at worst (its rows are deduplicated by message
//! id, which names the backfill and the item); nothing is published or checkpointed without the
//! segment's lease ([`LeaseGuard`], checked by the sink and by the checkpoint); throttling is retried
//! with backoff, never fatal.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use coordination::LeaseGuard;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::state::segment_key;
use super::watch::now_ms;
use crate::checkpoint::{Checkpoints, Progress};
use crate::memory::{self, Charge, MemoryBudget};
use crate::metrics::Metrics;
use crate::pipeline::deliver::Delivery;
use crate::pipeline::reader::Outcome;
use crate::publish::{Destination, EventSink};
use crate::record::{ChangeRecord, Origin};
use crate::retry;
use crate::source::error::ReadError;
use crate::source::scan::{ScanPage, ScanPosition, Segment, SegmentProgress, TableScan, keys_of};
use crate::status::now_secs;
use crate::tables::Verdict;

/// Read capacity units per second, spent as pages report what they consumed (`ConsumedCapacity` is
/// known only after a page): a page is read only while the budget is not in debt.
pub struct ReadBudget {
    per_second: f64,
    /// Units owed, and when that was last brought up to date.
    debt: Mutex<(f64, Instant)>,
}

impl ReadBudget {
    pub fn new(per_second: f64) -> Self {
        ReadBudget { per_second, debt: Mutex::new((0.0, Instant::now())) }
    }

    /// The debt as of now (it is paid off at `per_second`).
    fn owed(&self) -> f64 {
        let mut debt = self.debt.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        debt.0 = (debt.0 - (now - debt.1).as_secs_f64() * self.per_second).max(0.0);
        debt.1 = now;
        debt.0
    }

    /// Waits until nothing is owed.
    pub async fn ready(&self) {
        loop {
            let owed = self.owed();
            if owed <= 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(owed / self.per_second)).await;
        }
    }

    /// A page consumed `units`.
    pub fn charge(&self, units: f64) {
        self.owed();
        self.debt.lock().unwrap_or_else(PoisonError::into_inner).0 += units;
    }
}

/// Reads one segment of one backfill.
pub struct SegmentReader {
    pub scan: Arc<dyn TableScan>,
    pub sink: Arc<dyn EventSink>,
    pub checkpoints: Checkpoints,
    pub table: String,
    pub subject: String,
    /// The backfill this segment belongs to.
    pub epoch: u64,
    pub segment: Segment,
    /// The table's key schema: the `keys` of each row.
    pub key_attributes: Vec<String>,
    pub budget: Arc<ReadBudget>,
    /// No `Scan` before this time (Unix ms): the margin after the pins.
    pub scan_after: u64,
    pub metrics: Arc<Metrics>,
    /// Items per `Scan` call.
    pub page_limit: i32,
    /// Publishes in flight (`MAX_IN_FLIGHT`).
    pub window: usize,
    /// The largest value the checkpoint bucket takes.
    pub value_limit: usize,
    /// Told to stop gracefully: the page in hand is still published and checkpointed.
    pub cancel: CancellationToken,
    pub guard: LeaseGuard,
    /// The process's memory budget: each page is charged before it is read, until it is published.
    pub memory: MemoryBudget,
    /// Per-table settings (`TABLES_FILE`): snapshot rows follow them as stream records do.
    pub tables: Arc<crate::tables::TablesFile>,
    /// `NATS_SUBJECT_PREFIX`, the `{prefix}` of subject templates.
    pub subject_prefix: String,
}

impl SegmentReader {
    pub async fn run(self) -> Outcome {
        let outcome = self.read().await;
        tracing::info!(table = %self.table, epoch = self.epoch, segment = self.segment.index, ?outcome, "segment reader ended");
        outcome
    }

    async fn read(&self) -> Outcome {
        let key = segment_key(&self.table, self.epoch, self.segment);
        let loaded =
            crate::pipeline::load_fenced::<SegmentProgress>(&self.checkpoints, &key, &self.guard, &self.cancel).await;
        let Some(mut checkpoint) = loaded else { return self.stopped() };
        let mut start: Option<ScanPosition> = match checkpoint.position() {
            Some(SegmentProgress::Done) => return Outcome::Finished,
            Some(SegmentProgress::After(position)) => Some(position.clone()),
            None => None,
        };
        let wait = Duration::from_millis(self.scan_after.saturating_sub(now_ms()));
        if !wait.is_zero() && !self.pause(wait).await {
            return self.stopped();
        }
        let mut delays = retry::backoff();
        let mut oversized = false;
        let mut prefetch = None;
        loop {
            if self.cancel.is_cancelled() || !self.guard.is_valid() {
                return self.stopped();
            }
            let read = match prefetch.take() {
                Some(read) => read,
                None => self.read_page(start.clone()),
            };
            let page = tokio::select! {
                // Biased: a stop wins over a page arriving at the same moment (nothing is in hand).
                biased;
                () = self.cancel.cancelled() => return self.stopped(),
                _ = self.guard.lost() => return Outcome::LeaseLost,
                // A read that panicked is a failed call: the same position is asked again.
                joined = read => joined.unwrap_or_else(|err| Err(ReadError::Transient(err.to_string()))),
            };
            let (page, charge) = match page {
                Ok(read) => read,
                Err(err) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    match &err {
                        ReadError::Throttled(_) => {
                            self.metrics.backfill_throttles.with_label_values(&[&self.table]).inc();
                            tracing::info!(table = %self.table, segment = self.segment.index, retry_in_ms = delay.as_millis() as u64, "scan throttled; retrying")
                        }
                        _ => {
                            tracing::warn!(table = %self.table, segment = self.segment.index, error = %err, retry_in_ms = delay.as_millis() as u64, "scan failed; retrying")
                        }
                    }
                    if !self.pause(delay).await {
                        return self.stopped();
                    }
                    continue;
                }
            };
            delays = retry::backoff();
            self.budget.charge(page.read_units);
            // The next page is read (once the budget allows, this page charged) while this one is
            // published.
            prefetch = page.next.clone().map(|next| self.read_page(Some(next)));
            self.metrics.backfill_read_units.with_label_values(&[&self.table]).inc_by(page.read_units);
            let count = page.items.len() as u64;
            if let Err(outcome) = self.publish(page.items, charge).await {
                return outcome;
            }
            self.metrics.backfill_items.with_label_values(&[&self.table]).inc_by(count);
            let progress = match &page.next {
                Some(next) => SegmentProgress::After(next.clone()),
                None => SegmentProgress::Done,
            };
            // A key too large for the bucket's values (keys may hold 3 KB) is not written: a
            // resumption reads again from the last position that fitted (its rows are deduplicated).
            // `DONE` always fits.
            let fits = progress.encode().len() <= self.value_limit;
            if !fits && !oversized {
                oversized = true;
                tracing::warn!(table = %self.table, segment = self.segment.index, value_limit = self.value_limit,
                    "a scan position does not fit the checkpoint bucket's values: not checkpointed (a resumed segment reads again from the last one that fit)");
            }
            let advanced = if fits { checkpoint.advance(progress).await } else { Ok(false) };
            if let Err(outcome) = crate::pipeline::settle(advanced, &self.table, "segment checkpoint") {
                return outcome;
            }
            match page.next {
                None => return Outcome::Finished,
                Some(next) => start = Some(next),
            }
        }
    }

    /// Reads the page at `start` as a task of its own, once the read budget allows and its memory is
    /// charged (a prefetch waits for the memory on its own task: the page in hand never does).
    fn read_page(&self, start: Option<ScanPosition>) -> AbortOnDropHandle<Result<(ScanPage, Charge), ReadError>> {
        let (scan, budget, table) = (Arc::clone(&self.scan), Arc::clone(&self.budget), self.table.clone());
        let (segment, limit, memory) = (self.segment, self.page_limit, self.memory.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            budget.ready().await;
            let charge = memory.take(memory::PAGE_RESERVE).await;
            let page = scan.scan(&table, segment, start.as_ref(), limit).await?;
            Ok((page, charge))
        }))
    }

    /// Publishes a page's items as snapshot rows until every one is acknowledged; the page's memory
    /// `charge` is given back with the batch.
    async fn publish(&self, items: Vec<crate::record::Map>, mut charge: Charge) -> Result<(), Outcome> {
        let read_at = now_secs();
        let label = format!("backfill-{}-segment-{}-of-{}", self.epoch, self.segment.index, self.segment.total);
        let settings = self.tables.lookup(&self.table);
        let batch = items
            .into_iter()
            .filter_map(|item| {
                let row = ChangeRecord {
                    event_id: format!("snapshot-{}", self.epoch),
                    event_name: "INSERT".to_owned(),
                    created_at: Some(read_at),
                    keys: Some(keys_of(&item, &self.key_attributes)),
                    new_image: Some(item),
                    origin: Origin::Snapshot { epoch: self.epoch },
                    ..ChangeRecord::default()
                };
                let Some(settings) = settings else { return Some(self.sink.prepare(&self.table, &label, row)) };
                match settings.judge_record(&self.subject_prefix, &self.table, row) {
                    Verdict::Publish(row, subject) => Some(self.sink.prepare(&self.table, &label, row).routed(subject)),
                    Verdict::Drop(reason) => {
                        self.metrics.records_filtered.with_label_values(&[&self.table, reason.as_str()]).inc();
                        None
                    }
                }
            })
            .collect::<Vec<_>>();
        charge.shrink_to(memory::batch_bytes(&batch));
        let destination = Destination { subject: &self.subject, table: &self.table, shard_id: &label };
        let mut delivery = Delivery::new(self.sink.as_ref(), destination, batch, self.window, &self.guard);
        while delivery.acked().await?.is_some() {}
        drop(charge);
        Ok(())
    }

    fn stopped(&self) -> Outcome {
        crate::pipeline::stopped(&self.guard)
    }

    async fn pause(&self, delay: Duration) -> bool {
        crate::pipeline::pause(&self.cancel, &self.guard, delay).await
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
