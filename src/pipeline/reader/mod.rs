//! Reading one shard: iterator → `GetRecords` → publish in order → checkpoint, until the shard ends
//! or the reader is told to stop, as an explicit state machine (`State`):
//!
//! ```text
//! Positioning ──iterator──▶ Reading ──page, next iterator──▶ Reading
//!     ▲                        │ └──last page (no next iterator)──▶ Finishing ──▶ Ended(Finished)
//!     ├──expired / trimmed─────┘
//!     └──still for a lease TTL── Holding ◀──checkpoint moved by another writer── Reading | Finishing
//! any state ──stop or lease lost──▶ Ended(Stopped | LeaseLost)   (a page in hand is drained first)
//! ```
//!
//! A writer outside the fleet may move a shard's checkpoint: the Go service this one replaces, run
//! beside it during a rolling upgrade (it holds no lease and puts its checkpoint after every record),
//! or an operator. The lease holder then leaves the shard alone (`Holding`) until the key has not
//! moved for a lease TTL, and resumes from the checkpoint as that writer left it. A shard leased for
//! the first time (term 1) whose checkpoint exists was last written outside the fleet: it is held the
//! same way before its first read, so that a Go service still running is seen before anything is
//! published twice.
//!
//! While the table's backfill hands off to the stream, the reader also replays the shard's changes
//! since the backfill's pin, a page after each live page ([`replay`]); a shard that ends meanwhile
//! is marked finished only after its replay.
//!
//! Invariants: records are published in the shard's order; the checkpoint only covers records the
//! sink acknowledged (or skipped as older than a `START_FROM_LATEST` first sighting or a rewind); a failed
//! publish is retried from the first unacknowledged record (never skipped); once reading has stopped,
//! the page in hand is still published and checkpointed (it drains), so a graceful stop leaves nothing
//! to publish twice, while a read in flight is abandoned (nothing is in hand yet). Fencing: the
//! shard's [`LeaseGuard`] is checked by the sink before every record it hands on and by the
//! checkpoint before every write; once it fails the reader ends at once, writing nothing more, and a
//! publish connection that may still hold its publishes is fenced. A shard AWS calls missing has
//! ended only if the topology lists it closed or no longer lists it.
//!
//! Memory: each live page is charged to the process's memory budget ([`crate::memory`]) before it is
//! read, and the charge lives as long as its batch (until every record is acknowledged, or the reader
//! ends). A prefetch charges its own page on its own task, so the page in hand never waits for the
//! budget; the reader waits for it only while it holds no live page. A backfill replay's page (one
//! per shard, only during a hand-off) is not charged: it waits for the next live page, so a charge
//! held there could hold the budget that live page needs.

use std::sync::Arc;
use std::time::Duration;

use coordination::{LeaseGuard, Revision, Term};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

mod replay;
#[cfg(test)]
mod tests;
mod write;

use super::backfill::watch::Backfills;
use super::tables::Selected;
use super::topology::{Force, ReadableShards};
use super::{Pipeline, ReadSettings};
use crate::checkpoint::{self, Position, ShardCheckpoint};
use crate::config::MAX_RECORDS_PER_CALL;
use crate::memory::{self, Charge};
use crate::metrics::WaitOn;
use crate::pipeline::deliver::Delivery;
use crate::publish::{Destination, Prepared, Until};
use crate::record::Origin;
use crate::retry::{self, Backoff};
use crate::source::error::ReadError;
use crate::source::topology::Readable;
use crate::source::{Page, StartAt};

/// How a reader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Read to its end (or gone from the stream) and checkpointed as finished.
    Finished,
    /// Told to stop; its progress is checkpointed.
    Stopped,
    /// Progress it writes beside the shard's checkpoint (a backfill's replay position, a segment's)
    /// was moved by another writer; it stopped without writing. (A shard checkpoint moved by another
    /// writer is held off instead, see the module docs.)
    CheckpointTaken,
    /// Its lease was lost (expired or taken): it stopped without publishing or writing more.
    LeaseLost,
}

/// Where a reader is in its shard's life.
enum State {
    /// Needs an iterator at the cursor's start.
    Positioning,
    /// Holds an iterator, and maybe the page at it already being read (after a full page).
    Reading {
        iterator: String,
        prefetch: Option<Prefetch>,
    },
    /// The shard has ended: its checkpoint is marked finished so its children may be read.
    Finishing,
    /// Another writer moves (or may be moving) the checkpoint: nothing is read until it is still.
    Holding(Hold),
    Ended(Outcome),
}

/// Why a reader holds off its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// First lease of a shard with a checkpoint: written outside the fleet, maybe still being written.
    FirstLease,
    /// A checkpoint write found the key moved by another writer.
    Moved,
}

/// A `GetRecords` page made ready to publish: its records converted, the page itself dropped.
struct Fetched {
    /// Records the page held (some may have been unusable).
    count: usize,
    /// The sum of the records' `SizeBytes`.
    bytes: i64,
    next_iterator: Option<String>,
    batch: Vec<Prepared>,
    /// The `keys` JSON of the records the table's settings dropped (filtered out, TTL deletions):
    /// handled, not published.
    dropped: Vec<Vec<u8>>,
    /// The sequence number of the page's last record, when the table's settings dropped it.
    dropped_end: Option<checkpoint::SequenceNumber>,
    /// The creation time of the page's last record, whether published or dropped (only for a table
    /// with settings: its lag counts the records it drops too).
    last_created: Option<f64>,
    /// The batch's share of the memory budget: dropped with the batch, once it is published.
    charge: Charge,
}

/// A prefetch in flight: the task reading and converting the page at the state's iterator.
struct Prefetch {
    task: AbortOnDropHandle<Result<Fetched, ReadError>>,
    /// Cancelled once the task is over (read, failed, panicked or aborted).
    ready: CancellationToken,
}

impl Prefetch {
    fn spawn(pipeline: Arc<Pipeline>, shard: Readable, iterator: String) -> Prefetch {
        let ready = CancellationToken::new();
        let over = ready.clone().drop_guard();
        let task = tokio::spawn(async move {
            let _over = over;
            fetch(&pipeline, &shard, &iterator).await
        });
        Prefetch { task: AbortOnDropHandle::new(task), ready }
    }
}

/// What a reader carries from state to state.
struct Cursor<'a> {
    /// Where a new iterator starts: after the last record published, or the shard's fresh start.
    start: StartAt,
    checkpoint: ShardCheckpoint,
    /// Delays between attempts while calls fail; reset by a page read.
    delays: Backoff,
    /// Records created before this second are skipped: `START_FROM_LATEST` (only for a shard read
    /// without a checkpoint), or a checkpoint rewound to a time (`checkpoints rewind`).
    skip_before: Option<u64>,
    /// The backfill replay under way.
    replay: Option<replay::Replay>,
    /// The backfill whose replay this reader has done (or found done).
    replayed: Option<u64>,
    /// Empty reads in a row: an idle shard's wait grows with them (`IDLE_POLL_MAX_MS`).
    empty_reads: u32,
    /// The pages published and not all acknowledged: after a full page, its last acknowledgements
    /// may still be outstanding while the next page is read and sent (only in `Reading` with a
    /// prefetch; any other state waits for them first).
    delivery: Delivery<'a>,
    /// The checkpoint of the last acknowledged prefix when not written yet: it goes out beside the
    /// next publishes (see `ShardReader::publish`).
    unwritten: Option<Position>,
}

/// Reads one shard of one table's stream.
pub struct ShardReader {
    pub pipeline: Arc<Pipeline>,
    pub shard: Readable,
    pub subject: String,
    /// Told to stop gracefully (hand-over, shutdown): the page in hand is still published.
    pub cancel: CancellationToken,
    /// The permission to publish and checkpoint this shard.
    pub guard: LeaseGuard,
    /// The shards that may be read now, as the fleet last saw them: tells whether a shard AWS calls
    /// missing is closed or gone (then it has ended) or still listed open (then NotFound is transient).
    pub readable: watch::Receiver<ReadableShards>,
    /// The fleet's table set (`crate::pipeline::tables`): a table that left it is missing from
    /// `readable` too, which then says nothing about whether its shards ended.
    pub tables: watch::Receiver<Selected>,
    /// Asks for a refresh of the table's topology at once.
    pub force: Force,
    /// The tables' backfills: when one hands off, this reader replays the shard's part.
    pub backfills: watch::Receiver<Backfills>,
}

/// Where the topology puts a shard that an AWS call said does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// Listed and open: AWS answers NotFound transiently (e.g. just after a stream is enabled).
    Open,
    /// Listed closed, or no longer listed: the shard has ended.
    Ended,
}

/// `GetRecords` stops at 1000 records or 1 MB. A page whose records' `SizeBytes` add up to half of that
/// was most likely cut by the size limit (the answer's bytes count more than the items'), so the shard
/// is read on at once instead of after `POLL_GAP_MS`; a wrong guess costs one empty call.
const FULL_PAGE_BYTES: i64 = 512 * 1024;

impl ShardReader {
    pub async fn run(self) -> Outcome {
        let outcome = self.read().await;
        self.pipeline.progress.ended(&self.shard.table, &self.shard.shard_id);
        tracing::info!(table = %self.shard.table, shard_id = %self.shard.shard_id, ?outcome, "shard reader ended");
        outcome
    }

    async fn read(&self) -> Outcome {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let Some(checkpoint) = Box::pin(self.load_checkpoint()).await else { return self.stopped() };
        self.pipeline.progress.started(table, shard_id, checkpoint.position());
        let Some((start, skip_before)) = self.resume_at(checkpoint.position()) else { return Outcome::Finished };
        tracing::info!(table, shard_id, ?start, skip_before, "shard reader started");
        let first_lease = self.guard.term() == Term::new(1) && checkpoint.position().is_some();
        let destination = Destination { subject: &self.subject, table, shard_id };
        let (sink, window) = (self.pipeline.sink.as_ref(), self.pipeline.settings.max_in_flight);
        let mut cursor = Cursor {
            start,
            checkpoint,
            delays: retry::backoff(),
            skip_before,
            replay: None,
            replayed: None,
            empty_reads: 0,
            delivery: Delivery::new(sink, destination, Vec::new(), window, &self.guard),
            unwritten: None,
        };
        let mut state = if first_lease { State::Holding(Hold::FirstLease) } else { State::Positioning };
        loop {
            let unsettled = cursor.delivery.outstanding() || cursor.unwritten.is_some();
            if unsettled && !matches!(state, State::Reading { prefetch: Some(_), .. }) {
                state = Box::pin(self.settle(&mut cursor, state)).await;
            }
            state = match state {
                // Only this shard's checkpoint is held off; a backfill's replay progress moved by
                // another writer ends the reader as before.
                State::Ended(Outcome::CheckpointTaken) if cursor.checkpoint.taken() => State::Holding(Hold::Moved),
                State::Ended(outcome) => return outcome,
                State::Finishing => match Box::pin(self.replay_before_finish(&mut cursor)).await {
                    Ok(()) => State::Ended(Box::pin(self.finish(&mut cursor.checkpoint)).await),
                    Err(outcome) => State::Ended(outcome),
                },
                _ if self.cancel.is_cancelled() || !self.guard.is_valid() => State::Ended(self.stopped()),
                State::Holding(why) => Box::pin(self.hold(&mut cursor, why)).await,
                State::Positioning => Box::pin(self.position(&mut cursor)).await,
                State::Reading { iterator, prefetch } => {
                    Box::pin(self.read_page(&mut cursor, iterator, prefetch)).await
                }
            };
        }
    }

    /// `Positioning`: gets an iterator at the cursor's start.
    async fn position(&self, cursor: &mut Cursor<'_>) -> State {
        let (stream_arn, shard_id) = (&self.shard.stream_arn, &self.shard.shard_id);
        let call = self.pipeline.source.iterator(stream_arn, shard_id, &cursor.start);
        match self.unless_stopped(call).await {
            None => State::Ended(self.stopped()),
            Some(Ok(iterator)) => State::Reading { iterator, prefetch: None },
            Some(Err(err)) => {
                self.count_error(&err);
                self.after_error(err, cursor, State::Positioning, "cannot get a shard iterator; retrying").await
            }
        }
    }

    /// What the previous page left outstanding (or its checkpoint unwritten) is settled before any
    /// state but the read of the next page: acknowledged and checkpointed (a stop drains it), fenced
    /// (the lease is lost), or given up (another writer took the checkpoint).
    async fn settle(&self, cursor: &mut Cursor<'_>, state: State) -> State {
        if matches!(state, State::Ended(Outcome::LeaseLost | Outcome::CheckpointTaken)) {
            cursor.unwritten = None;
        }
        match state {
            State::Ended(Outcome::LeaseLost) => State::Ended(cursor.delivery.lease_lost()),
            State::Ended(Outcome::CheckpointTaken) => {
                cursor.delivery.abandon();
                state
            }
            _ if !self.guard.is_valid() => State::Ended(cursor.delivery.lease_lost()),
            state => match self.publish(cursor, Until::ACKED).await {
                Ok(()) => state,
                Err(outcome) => State::Ended(outcome),
            },
        }
    }

    /// `Reading`: reads the page at `iterator` (or takes the prefetched one), publishes and
    /// checkpoints it, and sets up the next read.
    async fn read_page(&self, cursor: &mut Cursor<'_>, iterator: String, prefetch: Option<Prefetch>) -> State {
        let result = match prefetch {
            // A fetch that panicked is a failed call: the same iterator is asked again.
            Some(fetch) => {
                // The previous page's last acknowledgements are taken (and checkpointed) while this
                // page is read; once it is in hand, the rest go on beside its publishes.
                if !fetch.ready.is_cancelled() {
                    let ready = Until::Acked { ready: Some(fetch.ready.clone()) };
                    if let Err(outcome) = self.publish(cursor, ready).await {
                        return State::Ended(outcome);
                    }
                }
                let waiting = Instant::now();
                let fetched = self.unless_stopped(fetch.task).await;
                self.waited(WaitOn::Read, waiting);
                match fetched {
                    None => return State::Ended(self.stopped()),
                    Some(joined) => joined.unwrap_or_else(|err| Err(ReadError::Transient(err.to_string()))),
                }
            }
            None => {
                let waiting = Instant::now();
                let fetched = self.unless_stopped(fetch(&self.pipeline, &self.shard, &iterator)).await;
                self.waited(WaitOn::Read, waiting);
                match fetched {
                    None => return State::Ended(self.stopped()),
                    Some(result) => result,
                }
            }
        };
        self.pipeline.metrics.get_records_calls.with_label_values(&[&self.shard.table]).inc();
        match result {
            Ok(page) => {
                cursor.delays = retry::backoff();
                self.handle(cursor, page).await
            }
            Err(ReadError::IteratorExpired) => {
                self.count_error(&ReadError::IteratorExpired);
                tracing::info!(table = %self.shard.table, shard_id = %self.shard.shard_id, "shard iterator expired; getting a new one");
                State::Positioning
            }
            Err(err) => {
                self.count_error(&err);
                let retry = State::Reading { iterator, prefetch: None };
                self.after_error(err, cursor, retry, "GetRecords failed; retrying").await
            }
        }
    }

    /// What follows a failed call: a trimmed position moves on to `TRIM_HORIZON`, a shard not found
    /// may have ended, anything else is retried (`retry`) after a pause.
    async fn after_error(&self, err: ReadError, cursor: &mut Cursor<'_>, retry: State, message: &str) -> State {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        match err {
            ReadError::Trimmed(_) => Box::pin(self.trimmed(cursor)).await,
            ReadError::NotFound(message) => Box::pin(self.not_found(&message, cursor)).await,
            other => {
                tracing::warn!(table, shard_id, error = %other, "{message}");
                if self.pause(cursor.delays.next()).await { retry } else { State::Ended(self.stopped()) }
            }
        }
    }

    /// Publishes a page and checkpoints it; sets up the next read (prefetched after a full page) and
    /// waits as the polling rules say.
    async fn handle(&self, cursor: &mut Cursor<'_>, page: Fetched) -> State {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let count = page.count;
        tracing::debug!(table, shard_id, records = count, ended = page.next_iterator.is_none(), "GetRecords");
        self.pipeline.metrics.records_per_get_records.with_label_values(&[table]).observe(count as f64);
        let full = count >= MAX_RECORDS_PER_CALL as usize || page.bytes >= FULL_PAGE_BYTES;
        // The next page, asked for and converted while this one is published (only after a full page,
        // when the next call would be made at once anyway): reading and publishing overlap.
        let prefetch = match &page.next_iterator {
            Some(next) if full => Some(Prefetch::spawn(Arc::clone(&self.pipeline), self.shard.clone(), next.clone())),
            _ => None,
        };
        let (mut batch, charge) = (page.batch, page.charge);
        // Records the table's settings dropped are handled too: the checkpoint may pass them.
        let page_end = batch.last().map(|record| record.sequence_number.clone()).max(page.dropped_end);
        let skipped = cursor.skip_before.map_or(0, |before| skip_older(&mut batch, before));
        let dropped = page.dropped.len();
        let newest = page.last_created.or_else(|| batch.last().and_then(|p| p.created_at)).filter(|_| count > 0);
        // Reported before publishing, so the lag keeps growing while these records wait.
        self.pipeline.progress.read(table, shard_id, newest);
        Self::note_live(cursor, &batch);
        Self::note_dropped(cursor, page.dropped);
        // The next page goes out while this one's last acknowledgements are outstanding when it is
        // read at once anyway (a prefetch) and nothing else waits for them: no records skipped or
        // dropped past the last one published (their checkpoint follows the page), no backfill.
        let pipelined = prefetch.is_some()
            && skipped + dropped == 0
            && cursor.replay.is_none()
            && self.backfills.borrow().running(table).is_none();
        // The page's memory is given back once its last record is acknowledged.
        cursor.delivery.push(batch, charge);
        let until = if pipelined { Until::Sent } else { Until::ACKED };
        if let Err(outcome) = Box::pin(self.publish(cursor, until)).await {
            return State::Ended(outcome);
        }
        if skipped + dropped > 0
            && let Some(end) = page_end
        {
            // Every record of the page is published, skipped or dropped: the checkpoint covers the page.
            tracing::debug!(
                table,
                shard_id,
                skipped,
                dropped,
                "records created before the first sighting (START_FROM_LATEST) or the rewind's time skipped, or dropped by the table's settings"
            );
            cursor.start = StartAt::After(end.to_string());
            if let Err(outcome) = self.checkpoint(&mut cursor.checkpoint, Position::After(end)).await {
                return State::Ended(outcome);
            }
        }
        let Some(iterator) = page.next_iterator else { return State::Finishing };
        // A backfill begun while this page was sent: its replay starts from the last record
        // acknowledged, so it waits for all of them.
        if (cursor.delivery.outstanding() || cursor.unwritten.is_some())
            && self.backfills.borrow().running(table).is_some()
            && let Err(outcome) = Box::pin(self.publish(cursor, Until::ACKED)).await
        {
            return State::Ended(outcome);
        }
        let replaying = match self.replay_turn(cursor, false).await {
            Ok(replaying) => replaying,
            Err(outcome) => return State::Ended(outcome),
        };
        cursor.empty_reads = if count > 0 { 0 } else { cursor.empty_reads.saturating_add(1) };
        let wait = if full || replaying {
            Duration::ZERO
        } else if count > 0 {
            self.pipeline.settings.poll_gap
        } else {
            self.idle_wait(cursor.empty_reads)
        };
        let pausing = Instant::now();
        let resumed = wait.is_zero() || self.pause(Some(wait)).await;
        self.waited(WaitOn::Pause, pausing);
        if !resumed {
            return State::Ended(self.stopped());
        }
        State::Reading { iterator, prefetch }
    }

    /// Where reading starts from a checkpoint: after it, whoever wrote it (the Go service during an
    /// upgrade included), or at the shard's fresh start when there is none (only then skipping what
    /// `START_FROM_LATEST` skips), and what older records are skipped; `None` for a shard read to its
    /// end.
    fn resume_at(&self, position: Option<&Position>) -> Option<(StartAt, Option<u64>)> {
        match position {
            Some(Position::Finished { .. }) => None,
            Some(Position::After(seq)) => Some((StartAt::After(seq.to_string()), None)),
            // Rewound by an operator (`checkpoints rewind`): from the shard's start, skipping what is
            // older than the time rewound to.
            Some(Position::Rewound { since }) => Some((StartAt::TrimHorizon, *since)),
            None => Some((self.shard.fresh_start.clone(), self.shard.skip_before)),
        }
    }

    /// `Holding`: leaves the shard to the writer that moves its checkpoint until the key has stayed
    /// unchanged for a lease TTL, then resumes from the checkpoint as that writer left it. The lease
    /// is kept meanwhile, so the shard does not wander from replica to replica while it waits.
    async fn hold(&self, cursor: &mut Cursor<'_>, why: Hold) -> State {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let quiet_for_s = self.pipeline.settings.quiet_for.as_secs_f64();
        match why {
            Hold::FirstLease => tracing::info!(
                table,
                shard_id,
                quiet_for_s,
                "first lease of a shard with a checkpoint written outside this fleet (by the Go service?): reading it once the checkpoint has not moved for a lease TTL"
            ),
            Hold::Moved => tracing::warn!(
                table,
                shard_id,
                quiet_for_s,
                "checkpoint moved by a writer outside this fleet (the Go service during an upgrade, or an operator): not reading this shard until it has not moved for a lease TTL"
            ),
        }
        let waiting = self.pipeline.metrics.foreign_writer_shards.with_label_values(&[table]);
        waiting.inc();
        let still = self.until_still(cursor.checkpoint.revision()).await;
        waiting.dec();
        if !still {
            return State::Ended(self.stopped());
        }
        let Some(checkpoint) = Box::pin(self.load_checkpoint()).await else { return State::Ended(self.stopped()) };
        let resumed = self.resume_at(checkpoint.position());
        tracing::info!(
            table,
            shard_id,
            checkpoint = checkpoint.position().map(Position::encode),
            "checkpoint still for a lease TTL: reading the shard from it"
        );
        cursor.checkpoint = checkpoint;
        let Some((start, skip_before)) = resumed else { return State::Ended(Outcome::Finished) };
        (cursor.start, cursor.skip_before) = (start, skip_before);
        State::Positioning
    }

    /// Reads the shard's checkpoint until its revision has stayed the same for a lease TTL, counting
    /// each move away from `seen` (the revision this reader held); false if told to stop (or the lease
    /// is lost) first. A read the bucket does not answer is no news.
    async fn until_still(&self, mut seen: Option<Revision>) -> bool {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let quiet_for = self.pipeline.settings.quiet_for;
        let every = (quiet_for / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let key = checkpoint::key(table, shard_id);
        let mut still_since = Instant::now();
        loop {
            match self.pipeline.checkpoints.load(&key).await {
                Ok(stored) if stored.revision != seen => {
                    self.pipeline.metrics.foreign_checkpoint_moves.with_label_values(&[table]).inc();
                    tracing::debug!(
                        table,
                        shard_id,
                        checkpoint = stored.position.map(|p| p.encode()),
                        "checkpoint moved by another writer"
                    );
                    (seen, still_since) = (stored.revision, Instant::now());
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(table, shard_id, error = %err, "cannot read checkpoint while holding; no news")
                }
            }
            let still_for = still_since.elapsed();
            if still_for >= quiet_for {
                return true;
            }
            if !self.pause(Some(every.min(quiet_for - still_for))).await {
                return false;
            }
        }
    }

    /// The wait after the `empty`-th empty read in a row: `POLL_INTERVAL_MS`, doubled after each
    /// further one up to `IDLE_POLL_MAX_MS` (by default the same: no backoff). A shard the topology
    /// lists closed is read at full speed: its last records and its end are near, and its children
    /// wait for that end.
    fn idle_wait(&self, empty: u32) -> Duration {
        let ReadSettings { poll_interval, idle_poll_max, .. } = self.pipeline.settings;
        if self.listing() == Listing::Ended {
            return poll_interval;
        }
        let doublings = empty.saturating_sub(1).min(20);
        poll_interval.saturating_mul(1 << doublings).min(idle_poll_max.max(poll_interval))
    }

    /// Counts the time since `since` as waited on `on` (`reader_wait_seconds_total`).
    pub(super) fn waited(&self, on: WaitOn, since: Instant) {
        let labels = [self.shard.table.as_str(), on.as_str()];
        self.pipeline.metrics.reader_wait_seconds.with_label_values(&labels).inc_by(since.elapsed().as_secs_f64());
    }

    /// How a reader that was told to stop (or lost its lease) ends.
    fn stopped(&self) -> Outcome {
        super::stopped(&self.guard)
    }

    fn count_error(&self, err: &ReadError) {
        let labels = [self.shard.table.as_str(), err.kind().as_str()];
        self.pipeline.metrics.get_records_errors.with_label_values(&labels).inc();
    }

    /// Reads the checkpoint, retrying while NATS is unavailable; `None` if told to stop (or the lease
    /// is lost) meanwhile.
    async fn load_checkpoint(&self) -> Option<ShardCheckpoint> {
        let key = checkpoint::key(&self.shard.table, &self.shard.shard_id);
        super::load_fenced(&self.pipeline.checkpoints, &key, &self.guard, &self.cancel).await
    }

    /// The checkpoint is older than the stream's retention: the records between are gone, so reading
    /// goes on from `TRIM_HORIZON`, and the gap is counted once. Trimmed again at `TRIM_HORIZON` (the
    /// horizon moved on between the iterator and the read) is no new gap: retried after a pause.
    async fn trimmed(&self, cursor: &mut Cursor<'_>) -> State {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        if cursor.start == StartAt::TrimHorizon {
            tracing::info!(table, shard_id, "trimmed at TRIM_HORIZON as well; retrying");
            return if self.pause(cursor.delays.next()).await {
                State::Positioning
            } else {
                State::Ended(self.stopped())
            };
        }
        self.pipeline.metrics.trimmed_data_gaps.with_label_values(&[table]).inc();
        tracing::error!(table, shard_id, start = ?cursor.start,
            "records after the checkpoint were trimmed from the stream (older than its 24 h retention) and are lost; continuing from TRIM_HORIZON");
        cursor.start = StartAt::TrimHorizon;
        State::Positioning
    }

    /// AWS says the shard (or its stream) does not exist. That is its end only if the topology lists
    /// it closed or no longer lists it; a shard listed open is asked again after a pause, and the
    /// table's topology is refreshed meanwhile.
    async fn not_found(&self, message: &str, cursor: &mut Cursor<'_>) -> State {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        if self.listing() == Listing::Ended {
            tracing::info!(table, shard_id, error = message, "shard is closed or gone from the stream; it has ended");
            return State::Finishing;
        }
        let delay = cursor.delays.next();
        tracing::warn!(
            table,
            shard_id,
            error = message,
            retry_in_ms = delay.map(|d| d.as_millis() as u64),
            "shard not found although listed open; retrying"
        );
        self.force.refresh(table);
        let resumed = self.pause(delay).await;
        // The refresh may have found it gone: the fleet then stops this reader, which ends it instead,
        // so its children need not wait and its checkpoint is cleaned up like any finished shard's.
        if self.listing() == Listing::Ended {
            tracing::info!(table, shard_id, "shard is gone from the stream; it has ended");
            return State::Finishing;
        }
        if resumed { State::Positioning } else { State::Ended(self.stopped()) }
    }

    fn listing(&self) -> Listing {
        // The table left the set (untagged, say): its shards left the readable set with it, not the
        // stream. Taking that for their end would mark this shard finished and skip the rest of it
        // if the table came back; the fleet stops this reader instead.
        let left = self.tables.borrow().as_deref().is_some_and(|set| !set.contains_key(&self.shard.table));
        if left {
            return Listing::Open;
        }
        let readable = self.readable.borrow();
        match readable.as_deref().map(|shards| shards.get(self.guard.shard())) {
            // No topology yet: nothing says it ended.
            None => Listing::Open,
            Some(Some(shard)) if !shard.closed => Listing::Open,
            Some(_) => Listing::Ended,
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
        super::pause(&self.cancel, &self.guard, delay.unwrap_or(Duration::from_secs(1))).await
    }
}

/// Reads the page at `iterator` and prepares its records; unusable records are logged and counted.
///
/// The page's memory is charged before the call (the most a page costs while it is read and
/// converted) and the charge shrunk to what the converted batch holds; a failed call gives it back.
async fn fetch(pipeline: &Pipeline, shard: &Readable, iterator: &str) -> Result<Fetched, ReadError> {
    let (table, shard_id) = (shard.table.as_str(), shard.shard_id.as_str());
    let mut charge = pipeline.memory.take(memory::PAGE_RESERVE).await;
    let Page { records, unusable, next_iterator, body } = pipeline.source.records(iterator).await?;
    for record in &unusable {
        tracing::error!(table, shard_id, error = %record, "record cannot be published: skipped");
        pipeline.metrics.unrepresentable_records.with_label_values(&[table]).inc();
    }
    let count = records.len() + unusable.len();
    let bytes = records.iter().filter_map(|record| record.size_bytes).sum();
    let mut judge = super::Judge::new(pipeline, table, shard_id, body);
    let (mut dropped, mut dropped_end) = (Vec::new(), None);
    if !judge.has_settings() {
        let batch: Vec<Prepared> = records
            .into_iter()
            .map(|event| pipeline.sink.prepare_stream(table, shard_id, event, Origin::Stream))
            .collect();
        charge.shrink_to(memory::batch_bytes(&batch));
        return Ok(Fetched { count, bytes, next_iterator, batch, dropped, dropped_end, last_created: None, charge });
    }
    let mut batch: Vec<Prepared> = Vec::with_capacity(records.len());
    let last_created = records.last().and_then(|event| event.created_at);
    for event in records {
        let sequence_number = event.sequence_number.clone();
        match judge.prepare(event, Origin::Stream) {
            Ok(prepared) => {
                batch.push(prepared);
                dropped_end = None;
            }
            Err(keys) => {
                dropped.push(keys);
                dropped_end = checkpoint::SequenceNumber::parse(&sequence_number);
            }
        }
    }
    charge.shrink_to(memory::batch_bytes(&batch));
    Ok(Fetched { count, bytes, next_iterator, batch, dropped, dropped_end, last_created, charge })
}

/// Drops the records created before second `before` (epoch; DynamoDB's creation times are whole
/// seconds); returns how many. A record without a creation time is kept.
fn skip_older(batch: &mut Vec<Prepared>, before: u64) -> usize {
    let count = batch.len();
    batch.retain(|record| record.created_at.is_none_or(|created| created >= before as f64));
    count - batch.len()
}
