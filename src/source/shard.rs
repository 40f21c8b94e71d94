//! Reading one shard: iterator → GetRecords → publish in order → checkpoint, until the shard ends or
//! the reader is told to stop.
//!
//! Invariants: records are published in the shard's order; the checkpoint only covers records
//! JetStream acknowledged (or skipped as older than a `START_FROM_LATEST` first sighting); a failed
//! publish is retried from the first unacknowledged record (never skipped); once reading has stopped,
//! the batch in hand is still published and checkpointed, so a graceful stop leaves nothing to
//! publish twice, while a read in flight is abandoned (nothing is in hand yet). Fencing: the shard's
//! [`LeaseGuard`] is checked before every record handed to NATS (`crate::publish`) and every
//! checkpoint write; once it fails the reader ends at once, writing nothing more, and a publish
//! connection that may still hold its publishes is fenced. A shard AWS calls missing has ended only
//! if the topology lists it closed or no longer lists it.

use std::sync::Arc;
use std::time::Duration;

use coordination::LeaseGuard;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::Services;
use super::api::{Page, StartAt};
use super::watch::{Force, ReadableShards};

/// A `GetRecords` page made ready to publish: its records converted, the page itself dropped.
struct Fetched {
    /// Records the page held (some may have been skipped as unpublishable).
    count: usize,
    /// The sum of the records' `SizeBytes`.
    bytes: i64,
    next_iterator: Option<String>,
    batch: Vec<Prepared>,
}

/// A prefetch in flight: the iterator it reads, and the task reading and converting that page.
type Prefetch = (String, AbortOnDropHandle<Result<Fetched, ReadError>>);
use super::error::ReadError;
use crate::checkpoint::{self, AdvanceError, Position, ShardCheckpoint};
use crate::config::MAX_RECORDS_PER_CALL;
use crate::publish::{Destination, Prepared};

/// How a reader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Read to its end (or gone from the stream) and checkpointed as finished.
    Finished,
    /// Told to stop; its progress is checkpointed.
    Stopped,
    /// Its checkpoint was moved by another writer; it stopped without writing.
    Fenced,
    /// Its lease was lost (expired or taken): it stopped without publishing or writing more.
    LeaseLost,
}

/// Reads one shard of one table's stream.
pub struct ShardReader {
    pub services: Arc<Services>,
    pub table: String,
    pub subject: String,
    pub stream_arn: String,
    pub shard_id: String,
    /// Where to start when the shard has no checkpoint.
    pub fresh_start: StartAt,
    /// `START_FROM_LATEST`: records created before this second (epoch) are skipped when the shard is
    /// read without a checkpoint (see `Topology::since`).
    pub skip_before: Option<u64>,
    /// Told to stop gracefully (hand-over, shutdown): the batch in hand is still published.
    pub cancel: CancellationToken,
    /// The permission to publish and checkpoint this shard.
    pub guard: LeaseGuard,
    /// The shards that may be read now, as the fleet last saw them: tells whether a shard AWS calls
    /// missing is closed or gone (then it has ended) or still listed open (then NotFound is transient).
    pub readable: watch::Receiver<ReadableShards>,
    /// Asks for a refresh of the table's topology at once.
    pub force: Force,
}

/// Where the topology puts a shard that an AWS call said does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// Listed and open: AWS answers NotFound transiently (e.g. just after a stream is enabled).
    Open,
    /// Listed closed, or no longer listed: the shard has ended.
    Ended,
}

impl ShardReader {
    pub async fn run(self) -> Outcome {
        let outcome = self.read().await;
        self.services.progress.ended(&self.table, &self.shard_id);
        tracing::info!(table = %self.table, shard_id = %self.shard_id, ?outcome, "shard reader ended");
        outcome
    }

    async fn read(&self) -> Outcome {
        let (table, shard_id) = (self.table.as_str(), self.shard_id.as_str());
        let metrics = &self.services.metrics;
        let Some(mut checkpoint) = Box::pin(self.load_checkpoint()).await else { return self.stopped() };
        self.services.progress.started(table, shard_id, checkpoint.position());
        let mut start = match checkpoint.position() {
            Some(Position::Finished { .. }) => return Outcome::Finished,
            Some(Position::After(seq)) => StartAt::After(seq.to_string()),
            None => self.fresh_start.clone(),
        };
        // Only a shard read from its start skips: one with a checkpoint resumes after it, whoever wrote
        // it (the Go service during an upgrade included).
        let skip_before = self.skip_before.filter(|_| checkpoint.position().is_none());
        tracing::info!(table, shard_id, ?start, skip_before, "shard reader started");
        let mut iterator: Option<String> = None;
        // The next page, asked for and converted while the current one is published (only after a
        // full page, when the next call would be made at once anyway): reading and publishing overlap.
        let mut prefetch: Option<Prefetch> = None;
        let mut delays = super::backoff();
        loop {
            if self.cancel.is_cancelled() || !self.guard.is_valid() {
                return self.stopped();
            }
            let result = match prefetch.take() {
                Some((current, fetch)) => {
                    iterator = Some(current);
                    // A fetch that panicked is a failed call: the same iterator is asked again.
                    let Some(joined) = self.unless_stopped(fetch).await else { return self.stopped() };
                    joined.unwrap_or_else(|err| Err(ReadError::Transient(err.to_string())))
                }
                None => {
                    let current = match iterator.take() {
                        Some(it) => it,
                        None => match self
                            .unless_stopped(Box::pin(self.services.api.iterator(&self.stream_arn, shard_id, &start)))
                            .await
                        {
                            None => return self.stopped(),
                            Some(Ok(it)) => it,
                            Some(Err(err)) => {
                                metrics.get_records_errors.with_label_values(&[table, err.kind().as_str()]).inc();
                                match err {
                                    ReadError::Trimmed(_) => {
                                        if !Box::pin(self.trimmed(&mut start, &mut delays)).await {
                                            return self.stopped();
                                        }
                                    }
                                    ReadError::NotFound(message) => {
                                        if let Some(outcome) =
                                            Box::pin(self.not_found(&message, &mut checkpoint, &mut delays)).await
                                        {
                                            return outcome;
                                        }
                                    }
                                    other => {
                                        tracing::warn!(table, shard_id, error = %other, "cannot get a shard iterator; retrying");
                                        if !self.pause(delays.next()).await {
                                            return self.stopped();
                                        }
                                    }
                                }
                                continue;
                            }
                        },
                    };
                    let Some(result) =
                        self.unless_stopped(Box::pin(fetch(&self.services, table, shard_id, &current))).await
                    else {
                        return self.stopped();
                    };
                    iterator = Some(current);
                    result
                }
            };
            metrics.get_records_calls.with_label_values(&[table]).inc();
            let page = match self.on_page(result, &mut iterator, &mut start, &mut checkpoint, &mut delays).await {
                Ok(Some(page)) => page,
                Ok(None) => continue,
                Err(outcome) => return outcome,
            };
            let pending = (&mut iterator, &mut prefetch);
            if let Err(outcome) = self.handle(page, pending, skip_before, &mut start, &mut checkpoint).await {
                return outcome;
            }
        }
    }

    /// Sorts out a GetRecords answer for the iterator in `iterator`: the page, or `None` after an
    /// error that was dealt with (a new iterator is needed, or the call is retried after a pause).
    async fn on_page(
        &self,
        result: Result<Fetched, ReadError>,
        iterator: &mut Option<String>,
        start: &mut StartAt,
        checkpoint: &mut ShardCheckpoint,
        delays: &mut super::Backoff,
    ) -> Result<Option<Fetched>, Outcome> {
        let (table, shard_id) = (self.table.as_str(), self.shard_id.as_str());
        let err = match result {
            Ok(page) => {
                *delays = super::backoff();
                return Ok(Some(page));
            }
            Err(err) => err,
        };
        self.services.metrics.get_records_errors.with_label_values(&[table, err.kind().as_str()]).inc();
        match err {
            ReadError::IteratorExpired => {
                tracing::info!(table, shard_id, "shard iterator expired; getting a new one");
                *iterator = None;
            }
            ReadError::Trimmed(_) => {
                *iterator = None;
                if !Box::pin(self.trimmed(start, delays)).await {
                    return Err(self.stopped());
                }
            }
            ReadError::NotFound(message) => {
                *iterator = None;
                if let Some(outcome) = Box::pin(self.not_found(&message, checkpoint, delays)).await {
                    return Err(outcome);
                }
            }
            other => {
                tracing::warn!(table, shard_id, error = %other, "GetRecords failed; retrying");
                if !self.pause(delays.next()).await {
                    return Err(self.stopped());
                }
            }
        }
        Ok(None)
    }

    /// Publishes a page and checkpoints it; sets up the next read (prefetched after a full page) and
    /// waits as the polling rules say.
    async fn handle(
        &self,
        page: Fetched,
        (iterator, prefetch): (&mut Option<String>, &mut Option<Prefetch>),
        skip_before: Option<u64>,
        start: &mut StartAt,
        checkpoint: &mut ShardCheckpoint,
    ) -> Result<(), Outcome> {
        let (table, shard_id) = (self.table.as_str(), self.shard_id.as_str());
        let metrics = &self.services.metrics;
        let count = page.count;
        tracing::debug!(table, shard_id, records = count, ended = page.next_iterator.is_none(), "GetRecords");
        metrics.records_per_get_records.with_label_values(&[table]).observe(count as f64);
        let full = count >= MAX_RECORDS_PER_CALL as usize || page.bytes >= FULL_PAGE_BYTES;
        *iterator = page.next_iterator.clone();
        if full && let Some(next) = &page.next_iterator {
            let (services, table, shard_id, next_iterator) =
                (self.services.clone(), self.table.clone(), self.shard_id.clone(), next.clone());
            let task = tokio::spawn(async move { fetch(&services, &table, &shard_id, &next_iterator).await });
            *prefetch = Some((next.clone(), AbortOnDropHandle::new(task)));
        }
        let mut batch = page.batch;
        let page_end = batch.last().map(|record| record.sequence_number.clone());
        let skipped = skip_before.map_or(0, |before| skip_older(&mut batch, before));
        let newest = batch.last().and_then(|p| p.created_at).filter(|_| count > 0);
        // Reported before publishing, so the lag keeps growing while these records wait.
        self.services.progress.read(table, shard_id, newest);
        if !batch.is_empty() {
            Box::pin(self.publish(batch, checkpoint, start)).await?;
        }
        if skipped > 0
            && let Some(end) = page_end
        {
            // Every record of the page is published or skipped: the checkpoint covers the page.
            tracing::debug!(
                table,
                shard_id,
                skipped,
                "records created before the first sighting skipped (START_FROM_LATEST)"
            );
            *start = StartAt::After(end.to_string());
            Box::pin(self.checkpoint(checkpoint, Position::After(end))).await?;
        }
        if page.next_iterator.is_none() {
            return Err(Box::pin(self.finish(checkpoint)).await);
        }
        let wait = if full {
            Duration::ZERO
        } else if count > 0 {
            self.services.config.poll_gap
        } else {
            self.services.config.poll_interval
        };
        if !wait.is_zero() && !self.pause(Some(wait)).await {
            return Err(self.stopped());
        }
        Ok(())
    }

    /// How a reader that was told to stop (or lost its lease) ends.
    fn stopped(&self) -> Outcome {
        if self.guard.is_valid() { Outcome::Stopped } else { Outcome::LeaseLost }
    }

    /// The lease still allows publishing and checkpointing; `Err(LeaseLost)` otherwise.
    fn fenced(&self) -> Result<(), Outcome> {
        self.guard.check().map_err(|lost| {
            tracing::warn!(table = %self.table, shard_id = %self.shard_id, reason = %lost, "lease lost: this reader stops publishing");
            Outcome::LeaseLost
        })
    }

    /// Reads the checkpoint, retrying while NATS is unavailable; `None` if told to stop meanwhile.
    async fn load_checkpoint(&self) -> Option<ShardCheckpoint> {
        let key = checkpoint::key(&self.table, &self.shard_id);
        let mut delays = super::backoff();
        loop {
            match ShardCheckpoint::load(self.services.checkpoints.clone(), key.clone()).await {
                Ok(checkpoint) => return Some(checkpoint),
                Err(err) => {
                    tracing::warn!(table = %self.table, shard_id = %self.shard_id, error = %err, "cannot read checkpoint; retrying");
                    if !self.pause(delays.next()).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The checkpoint is older than the stream's retention: the records between are gone, so reading
    /// goes on from `TRIM_HORIZON`, and the gap is counted once. Trimmed again at `TRIM_HORIZON` (the
    /// horizon moved on between the iterator and the read) is no new gap: the read is retried after a
    /// pause. False if told to stop meanwhile.
    async fn trimmed(&self, start: &mut StartAt, delays: &mut super::Backoff) -> bool {
        if *start == StartAt::TrimHorizon {
            tracing::info!(table = %self.table, shard_id = %self.shard_id, "trimmed at TRIM_HORIZON as well; retrying");
            return self.pause(delays.next()).await;
        }
        self.services.metrics.trimmed_data_gaps.with_label_values(&[&self.table]).inc();
        tracing::error!(table = %self.table, shard_id = %self.shard_id, ?start,
            "records after the checkpoint were trimmed from the stream (older than its 24 h retention) and are lost; continuing from TRIM_HORIZON");
        *start = StartAt::TrimHorizon;
        true
    }

    /// AWS says the shard (or its stream) does not exist. That is its end only if the topology lists
    /// it closed or no longer lists it; a shard listed open is asked again after a pause, and the
    /// table's topology is refreshed meanwhile. `Some(outcome)` when the reader ends.
    async fn not_found(
        &self,
        message: &str,
        checkpoint: &mut ShardCheckpoint,
        delays: &mut super::Backoff,
    ) -> Option<Outcome> {
        if self.listing() == Listing::Ended {
            tracing::info!(table = %self.table, shard_id = %self.shard_id, error = message, "shard is closed or gone from the stream; it has ended");
            return Some(self.finish(checkpoint).await);
        }
        let delay = delays.next();
        tracing::warn!(table = %self.table, shard_id = %self.shard_id, error = message,
            retry_in_ms = delay.map(|d| d.as_millis() as u64), "shard not found although listed open; retrying");
        self.force.refresh(&self.table);
        let resumed = self.pause(delay).await;
        // The refresh may have found it gone: the fleet then stops this reader, which ends it instead,
        // so its children need not wait and its checkpoint is cleaned up like any finished shard's.
        if self.listing() == Listing::Ended {
            tracing::info!(table = %self.table, shard_id = %self.shard_id, "shard is gone from the stream; it has ended");
            return Some(self.finish(checkpoint).await);
        }
        if resumed { None } else { Some(self.stopped()) }
    }

    fn listing(&self) -> Listing {
        let readable = self.readable.borrow();
        match readable.as_deref().map(|shards| shards.get(self.guard.shard())) {
            // No topology yet: nothing says it ended.
            None => Listing::Open,
            Some(Some(shard)) if !shard.closed => Listing::Open,
            Some(_) => Listing::Ended,
        }
    }

    /// Publishes a batch until every record is acknowledged, checkpointing each acknowledged prefix.
    /// Waits (with backoff) while NATS refuses; never skips a record. Not interrupted by a stop:
    /// the records in hand are published before the reader ends. When the lease is lost while a
    /// failed attempt may have left publishes in the publish connection, that connection is fenced
    /// before the reader ends, so none of them can arrive after the next owner's.
    async fn publish(
        &self,
        mut batch: Vec<Prepared>,
        checkpoint: &mut ShardCheckpoint,
        start: &mut StartAt,
    ) -> Result<(), Outcome> {
        let (table, shard_id) = (self.table.as_str(), self.shard_id.as_str());
        let publisher = &self.services.publisher;
        let window = self.services.config.max_in_flight;
        let mut delays = super::backoff();
        let mut done = 0;
        // The publish connection that may still hold unacknowledged publishes of this batch.
        let mut unconfirmed: Option<u64> = None;
        let destination = Destination { subject: &self.subject, table, shard_id };
        while done < batch.len() {
            if let Err(outcome) = self.fenced() {
                if let Some(generation) = unconfirmed {
                    publisher.fence(generation, table, shard_id, "lease lost with publishes unacknowledged");
                }
                return Err(outcome);
            }
            let result = publisher.publish_in_order(destination, &mut batch, done, window, &self.guard).await;
            let acked = match &result {
                Ok(()) => batch.len() - done,
                Err(failure) => failure.acked,
            };
            if acked > 0 {
                let last = batch[done + acked - 1].sequence_number.clone();
                *start = StartAt::After(last.to_string());
                self.checkpoint(checkpoint, Position::After(last)).await?;
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
                if let Some(generation) = unconfirmed {
                    publisher.fence(generation, table, shard_id, "lease lost with publishes unacknowledged");
                }
                tracing::warn!(table, shard_id, reason = %failure.message, "lease lost: this reader stops publishing");
                return Err(Outcome::LeaseLost);
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

    /// Writes a checkpoint; a fenced write ends the reader; an unavailable store is retried a few
    /// times and then left to the next batch (the records are published; only progress is unsaved).
    async fn checkpoint(&self, checkpoint: &mut ShardCheckpoint, position: Position) -> Result<(), Outcome> {
        let metrics = &self.services.metrics;
        let mut delays = super::backoff().take(5);
        loop {
            self.fenced()?;
            match checkpoint.advance(position.clone()).await {
                Ok(written) => {
                    if written {
                        metrics.checkpoints_written.with_label_values(&[&self.table]).inc();
                        self.services.progress.checkpointed(&self.table, &self.shard_id, checkpoint.position());
                    }
                    return Ok(());
                }
                Err(AdvanceError::Fenced(key)) => {
                    metrics.checkpoint_conflicts.with_label_values(&[&self.table]).inc();
                    tracing::error!(table = %self.table, shard_id = %self.shard_id, key, "checkpoint was moved by another writer; this reader stops");
                    return Err(Outcome::Fenced);
                }
                Err(AdvanceError::Unavailable(err)) => match delays.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => {
                        tracing::warn!(table = %self.table, shard_id = %self.shard_id, error = %err, "checkpoint not written; the next one will cover it");
                        return Ok(());
                    }
                },
            }
        }
    }

    /// The shard has ended: mark it finished so its children may be read.
    async fn finish(&self, checkpoint: &mut ShardCheckpoint) -> Outcome {
        let last = checkpoint.position().and_then(|p| p.last().cloned());
        let mut delays = super::backoff();
        loop {
            match self.checkpoint(checkpoint, Position::Finished { last: last.clone() }).await {
                Err(outcome) => return outcome,
                Ok(()) if matches!(checkpoint.position(), Some(Position::Finished { .. })) => {
                    tracing::info!(table = %self.table, shard_id = %self.shard_id, "shard read to its end");
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

    /// Runs a read (an AWS call) unless told to stop first: no page is in hand while one is read, so
    /// a hung call (up to `AWS_OPERATION_TIMEOUT` with the SDK's retries) must not hold up a hand-over
    /// or a shutdown. `None` when told to stop.
    async fn unless_stopped<T>(&self, read: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            // Biased: a stop wins over an answer arriving at the same moment (nothing is lost: the
            // checkpoint stands before this page).
            biased;
            () = self.cancel.cancelled() => None,
            value = read => Some(value),
        }
    }

    /// Sleeps for `delay` unless told to stop (or the lease is lost) first; false then.
    async fn pause(&self, delay: Option<Duration>) -> bool {
        let delay = delay.unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.guard.lost() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// `GetRecords` stops at 1000 records or 1 MB. A page whose records' `SizeBytes` add up to half of that
/// was most likely cut by the size limit (the answer's bytes count more than the items'), so the shard
/// is read on at once instead of after `POLL_GAP_MS`; a wrong guess costs one empty call.
const FULL_PAGE_BYTES: i64 = 512 * 1024;

/// Reads the page at `iterator` and converts its records.
async fn fetch(services: &Services, table: &str, shard_id: &str, iterator: &str) -> Result<Fetched, ReadError> {
    let Page { records, next_iterator } = services.api.records(iterator).await?;
    let count = records.len();
    let bytes = records.iter().filter_map(|record| record.dynamodb().and_then(|d| d.size_bytes())).sum();
    let batch = records.into_iter().filter_map(|record| services.publisher.prepare(table, shard_id, record)).collect();
    Ok(Fetched { count, bytes, next_iterator, batch })
}

/// Drops the records created before second `before` (epoch; DynamoDB's creation times are whole
/// seconds); returns how many. A record without a creation time is kept.
fn skip_older(batch: &mut Vec<Prepared>, before: u64) -> usize {
    let count = batch.len();
    batch.retain(|record| record.created_at.is_none_or(|created| created >= before as f64));
    count - batch.len()
}
