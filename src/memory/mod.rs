//! The memory budget (issue 18, "Memory within a container limit"): the bytes that pages of records
//! may hold across every reader of the process — pages being read and converted, converted batches
//! in hand or prefetched, and their unacknowledged publishes — counted against one budget derived from
//! the container's memory limit ([`limit`]), so the process stays under 75 % of that limit whatever
//! the number of busy shards.
//!
//! A reader takes a [`Charge`] of [`PAGE_RESERVE`] before it asks for a page (the most a page can
//! cost while it is read and converted), shrinks it to what the converted batch holds
//! ([`batch_bytes`]) and drops it with the batch, once every record of it is acknowledged (or the
//! reader stops, drains or loses its lease: the charge is a value that lives as long as the batch).
//! When the budget is spent, readers wait for it (throughput degrades; nothing fails).
//!
//! Invariants:
//! - **no deadlock**: a charge is never larger than the whole budget, so a reader can always hold one
//!   page, even with a budget smaller than a page; waiters are served first come first served (tokio's
//!   fair semaphore), so a large request is not starved by small ones; and no task waits for the
//!   budget while holding a charge that only its own progress can release: a reader's current page is
//!   published without taking more, and a prefetch charges its own page (it waits, the current page
//!   finishes and gives its charge back);
//! - **nothing leaks**: a charge is given back when it is dropped, on every path (stop, lease loss,
//!   an aborted prefetch, a panic);
//! - **unlimited stays as before**: without a limit, a charge costs nothing and nothing waits.

pub mod limit;

use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::publish::Prepared;

/// `GetRecords` returns at most 1 MB of records, and a `Scan` page holds at most 1 MB of items (the
/// APIs' limits).
pub const MAX_PAGE_DATA: usize = 1024 * 1024;

/// What one page may cost while it is read and converted: the answer's body (received in chunks,
/// then made contiguous and kept for the transcoder: up to three times its size for a moment, and
/// DynamoDB's JSON of 1 MB of data is larger than 1 MB), then the transcoded events beside the body,
/// then the published events while the transcoded ones are consumed. About 3.5 MB for a 1 MB page;
/// four times the page's data. After conversion the charge shrinks to what the batch holds
/// ([`batch_bytes`]).
pub const PAGE_RESERVE: usize = 4 * MAX_PAGE_DATA;

/// What a prepared record holds beside its events' bytes ([`Prepared::held_bytes`]): the headers,
/// the message id, the sequence number and the allocations around them.
const RECORD_OVERHEAD: usize = 1024;

/// The bytes a converted batch holds until it is dropped (see [`RECORD_OVERHEAD`]).
pub fn batch_bytes(batch: &[Prepared]) -> usize {
    batch.iter().map(|record| record.held_bytes() + RECORD_OVERHEAD).sum()
}

/// The process's memory budget; clones share it. [`MemoryBudget::unlimited`] charges nothing.
#[derive(Clone, Default)]
pub struct MemoryBudget {
    inner: Option<Arc<Limited>>,
}

struct Limited {
    /// One permit per byte.
    bytes: Arc<Semaphore>,
    capacity: usize,
    held: IntGauge,
    waits: IntCounter,
}

impl Limited {
    fn report(&self) {
        self.held.set(self.capacity.saturating_sub(self.bytes.available_permits()) as i64);
    }
}

impl MemoryBudget {
    /// No budget: every charge is free and nothing waits (the behaviour without a memory limit).
    pub fn unlimited() -> Self {
        MemoryBudget { inner: None }
    }

    /// A budget of `capacity` bytes (at least 1), reporting the bytes held in `held` and the waits in
    /// `waits`.
    pub fn new(capacity: usize, held: IntGauge, waits: IntCounter) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        held.set(0);
        let limited = Limited { bytes: Arc::new(Semaphore::new(capacity)), capacity, held, waits };
        MemoryBudget { inner: Some(Arc::new(limited)) }
    }

    /// The budget in bytes; `None` when unlimited.
    pub fn capacity(&self) -> Option<usize> {
        self.inner.as_ref().map(|limited| limited.capacity)
    }

    /// The bytes charged now.
    pub fn held(&self) -> usize {
        self.inner.as_ref().map_or(0, |limited| limited.capacity.saturating_sub(limited.bytes.available_permits()))
    }

    /// Takes `bytes` (at most the whole budget, so one page always fits), waiting while they are not
    /// free; waits are counted. Cancel-safe: dropping the future gives up the place in the queue.
    pub async fn take(&self, bytes: usize) -> Charge {
        let Some(limited) = &self.inner else { return Charge::free() };
        // A single acquisition counts in u32; pages are far smaller.
        let wanted = bytes.min(limited.capacity).min(u32::MAX as usize) as u32;
        let permit = match Arc::clone(&limited.bytes).try_acquire_many_owned(wanted) {
            Ok(permit) => Some(permit),
            Err(TryAcquireError::NoPermits) => {
                limited.waits.inc();
                // Declared before the wait, so dropped after it when the wait is given up: bytes
                // handed to a waiter go back to the budget only when the waiter is dropped.
                let _report = Report(limited);
                let permit = Arc::clone(&limited.bytes).acquire_many_owned(wanted).await;
                permit.ok()
            }
            // The semaphore is never closed.
            Err(TryAcquireError::Closed) => None,
        };
        limited.report();
        Charge { permit, budget: Some(Arc::clone(limited)) }
    }
}

/// Reports the bytes held when dropped.
struct Report<'a>(&'a Limited);

impl Drop for Report<'_> {
    fn drop(&mut self) {
        self.0.report();
    }
}

/// The budget as start-up sized it (`/status` shows it).
#[derive(Clone)]
pub struct Sizing {
    /// The memory limit and where it came from; `None`: no limit, no budget.
    pub limit: Option<limit::Limit>,
    /// The process's resident memory when the budget was sized, set aside from it.
    pub fixed_bytes: u64,
    pub budget: MemoryBudget,
}

impl Sizing {
    /// No limit: an unlimited budget.
    pub fn unlimited() -> Self {
        Sizing { limit: None, fixed_bytes: 0, budget: MemoryBudget::unlimited() }
    }

    /// The budget for `limit` (see [`limit::budget_for`]), its gauges set in `metrics` and its size
    /// logged with where the limit came from.
    pub fn new(limit: Option<limit::Limit>, setting: limit::Setting, metrics: &crate::metrics::Metrics) -> Self {
        let Some(found) = limit else {
            let why = match setting {
                limit::Setting::Off => "MEMORY_LIMIT_MB=0",
                _ => "no MEMORY_LIMIT_MB and no cgroup memory limit",
            };
            tracing::info!(why, "no memory limit: pages of records are not budgeted");
            return Sizing::unlimited();
        };
        let fixed_bytes = limit::resident_bytes();
        let bytes = limit::budget_for(found.bytes, fixed_bytes);
        let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
        metrics.memory_limit.set(i64::try_from(found.bytes).unwrap_or(i64::MAX));
        metrics.memory_budget.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        tracing::info!(
            limit_mib = mib(found.bytes),
            source = %found.source,
            target_percent = limit::TARGET_PERCENT,
            fixed_mib = mib(fixed_bytes),
            headroom_mib = mib(limit::RUNTIME_HEADROOM),
            allocator_slack_percent = limit::ALLOCATOR_SLACK_PERCENT,
            budget_mib = mib(bytes),
            page_reserve_mib = mib(PAGE_RESERVE as u64),
            "memory budget for pages of records"
        );
        if bytes == limit::MIN_BUDGET {
            tracing::warn!(
                limit_mib = mib(found.bytes),
                fixed_mib = mib(fixed_bytes),
                "the memory limit leaves little beside the process's fixed memory: pages are read a few at a time"
            );
        }
        let capacity = usize::try_from(bytes).unwrap_or(usize::MAX);
        let budget = MemoryBudget::new(capacity, metrics.memory_held.clone(), metrics.memory_waits.clone());
        Sizing { limit, fixed_bytes, budget }
    }

    /// `/status`'s `memory` object.
    pub fn status(&self, waits: u64) -> serde_json::Value {
        serde_json::json!({
            "limit_bytes": self.limit.map(|limit| limit.bytes),
            "limit_source": self.limit.map(|limit| limit.source.as_str()),
            "fixed_bytes": self.fixed_bytes,
            "budget_bytes": self.budget.capacity(),
            "held_bytes": self.budget.held(),
            "waits": waits,
        })
    }
}

/// Bytes taken from the budget, given back when dropped.
#[must_use = "a charge gives its bytes back when dropped"]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
    budget: Option<Arc<Limited>>,
}

impl Charge {
    /// A charge of nothing (unlimited budget).
    pub fn free() -> Self {
        Charge { permit: None, budget: None }
    }

    /// The bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives back what this charge holds beyond `bytes` (a page turned out smaller than reserved). A
    /// charge never grows: a batch larger than its reservation keeps what it has.
    pub fn shrink_to(&mut self, bytes: usize) {
        let Some(permit) = self.permit.as_mut() else { return };
        let excess = permit.num_permits().saturating_sub(bytes);
        if excess > 0 {
            drop(permit.split(excess));
            if let Some(budget) = &self.budget {
                budget.report();
            }
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(budget) = &self.budget {
            budget.report();
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge").field("bytes", &self.bytes()).finish()
    }
}

#[cfg(test)]
mod tests;
