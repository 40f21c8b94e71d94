//! The hand-off of a backfill (`docs/backfill.md`, "Replay"): once the table's scan has ended, the
//! shard reader re-publishes the shard's changes since the pin, `(P0, P1]` (`P1`: its last record
//! published when it learned the scan ended), flagged as replays with their own message ids, one page
//! after each live page, so live changes wait at most one replay page.
//!
//! Invariants: replayed records go out in the shard's order; a record of an item that already had a
//! change published live after `P1` is skipped (that change is newer and must stay last); the replay's
//! progress is checkpointed only after its page is acknowledged. A reader that takes a replay over
//! first reads the live records an earlier reader published after `P1` (up to the shard's checkpoint)
//! for their items, before it replays on. A shard that ends while its table's backfill runs is marked
//! finished only after its replay (its children must not publish before it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::{Cursor, Outcome, ShardReader};
use crate::checkpoint::{Fenced, SequenceNumber};
use crate::pipeline::backfill::state::{Phase, ReplayProgress, pin_key, replay_key};
use crate::pipeline::deliver::Delivery;
use crate::publish::Destination;
use crate::record::Origin;
use crate::retry::{self, Backoff};
use crate::source::error::ReadError;
use crate::source::{Page, StartAt};

/// A replay under way in this reader.
pub(super) struct Replay {
    epoch: u64,
    checkpoint: Fenced<ReplayProgress>,
    /// The pin: records after it are replayed (`None`: from the shard's oldest record).
    from: Option<SequenceNumber>,
    /// The last record to replay.
    p1: SequenceNumber,
    /// Replayed up to here (`None`: nothing yet, and the pin was the shard's start or trimmed).
    after: Option<SequenceNumber>,
    /// Part of the range was trimmed from the stream before it was replayed.
    lost: bool,
    /// Items with a change published live after `P1`: their replayed records are skipped.
    skip: HashSet<Bytes>,
    /// Taking over: live records after `P1` that an earlier reader published, still to be read for
    /// their items before anything is replayed.
    skim: Option<Skim>,
    /// The iterator of the next replay (or skim) read; `None`: get one at the position.
    iterator: Option<String>,
    /// The read of the next page, running beside the live reading.
    fetch: Option<Fetch>,
    /// After a failed read, the next one is not made before this.
    retry_at: Option<Instant>,
    delays: Backoff,
}

/// A replay page being read, or why it was not (with the iterator to try again; `None`: a new one).
type Fetch = AbortOnDropHandle<Result<Page, (Option<String>, ReadError)>>;

/// Live records already published after `P1`, read for their items only.
struct Skim {
    /// Read up to here (`None`: the stream's oldest record).
    after: Option<SequenceNumber>,
    /// The last record published live before this reader.
    until: SequenceNumber,
}

impl Replay {
    /// Where the next iterator starts.
    fn start(&self) -> StartAt {
        let after = match &self.skim {
            Some(skim) => &skim.after,
            None => &self.after,
        };
        after.as_ref().map_or(StartAt::TrimHorizon, |seq| StartAt::After(seq.to_string()))
    }

    fn progress(&self, done: bool) -> ReplayProgress {
        if done {
            return ReplayProgress::Done { lost: self.lost };
        }
        ReplayProgress::Running {
            p1: self.p1.clone(),
            from: self.from.clone(),
            after: self.after.clone(),
            lost: self.lost,
        }
    }
}

impl Cursor<'_> {
    /// The shard's last record published (or covered by its checkpoint).
    fn last_published(&self) -> Option<SequenceNumber> {
        match &self.start {
            StartAt::After(seq) => SequenceNumber::parse(seq),
            StartAt::TrimHorizon | StartAt::Latest => None,
        }
    }
}

impl ShardReader {
    /// Notes a live batch about to be published: while replaying, its items are skipped by the replay.
    pub(super) fn note_live(cursor: &mut Cursor<'_>, batch: &[crate::publish::Prepared]) {
        if let Some(replay) = cursor.replay.as_mut() {
            replay.skip.extend(batch.iter().filter_map(|record| item_key(record.keys_json())));
        }
    }

    /// Notes the items of live records the table's settings dropped: handled by the live path as
    /// much as published ones, so the replay leaves them alone too.
    pub(super) fn note_dropped(cursor: &mut Cursor<'_>, dropped: Vec<Vec<u8>>) {
        if let Some(replay) = cursor.replay.as_mut() {
            replay.skip.extend(dropped.iter().filter_map(|keys| item_key(keys)));
        }
    }

    /// Starts the table's replay when it is due, and handles its next page if it has been read (or,
    /// with `wait`, once it is): called after each live page. True when a replay page was handled
    /// (the reader then reads on without waiting).
    pub(super) async fn replay_turn(&self, cursor: &mut Cursor<'_>, wait: bool) -> Result<bool, Outcome> {
        let due = {
            let backfills = self.backfills.borrow();
            match backfills.running(&self.shard.table) {
                Some((epoch, Phase::Replaying)) if cursor.replayed != Some(epoch) => Some(epoch),
                _ => None,
            }
        };
        if let Some(epoch) = due
            && cursor.replay.as_ref().is_none_or(|replay| replay.epoch != epoch)
        {
            Box::pin(self.start_replay(cursor, epoch)).await?;
        }
        if cursor.replay.is_none() {
            return Ok(false);
        }
        Box::pin(self.replay_page(cursor, wait)).await
    }

    /// The shard has ended: while its table's backfill runs, it replays first (waiting for the scan
    /// to end if need be), so that it is marked finished, and its children read, only after.
    pub(super) async fn replay_before_finish(&self, cursor: &mut Cursor<'_>) -> Result<(), Outcome> {
        let mut backfills = self.backfills.clone();
        let mut told = false;
        loop {
            let running = backfills.borrow_and_update().running(&self.shard.table);
            match running {
                None => return Ok(()),
                Some((epoch, _)) if cursor.replayed == Some(epoch) => return Ok(()),
                Some((epoch, Phase::Replaying)) => {
                    self.replay_turn(cursor, true).await?;
                    // Not begun (the bucket did not answer): again after a pause, not in a spin.
                    let waiting = cursor.replay.is_none() && cursor.replayed != Some(epoch);
                    if waiting && !self.pause(Some(Duration::from_secs(1))).await {
                        return Err(self.stopped());
                    }
                }
                Some((epoch, phase)) => {
                    if !told {
                        told = true;
                        tracing::info!(table = %self.shard.table, shard_id = %self.shard.shard_id, epoch, phase = phase.as_str(),
                            "shard ended during a backfill: it is marked finished after its replay");
                    }
                    tokio::select! {
                        () = self.cancel.cancelled() => return Err(self.stopped()),
                        _ = self.guard.lost() => return Err(self.stopped()),
                        changed = backfills.changed() => if changed.is_err() { return Ok(()) },
                    }
                }
            }
        }
    }

    /// Loads the replay of `epoch` (another reader's goes on where it stopped) or begins it at the
    /// last record published.
    async fn start_replay(&self, cursor: &mut Cursor<'_>, epoch: u64) -> Result<(), Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let key = replay_key(table, epoch, shard_id);
        let loaded = crate::pipeline::load_fenced(&self.pipeline.checkpoints, &key, &self.guard, &self.cancel).await;
        let Some(mut checkpoint) = loaded else { return Err(self.stopped()) };
        let published = cursor.last_published();
        let (from, p1, after, lost, skim) = match checkpoint.position().cloned() {
            Some(ReplayProgress::Done { .. }) => {
                cursor.replayed = Some(epoch);
                return Ok(());
            }
            Some(ReplayProgress::Running { p1, from, after, lost }) => {
                let skim = published.filter(|last| *last > p1).map(|until| Skim { after: Some(p1.clone()), until });
                tracing::info!(table, shard_id, epoch, %p1, skim = skim.is_some(), "taking over the shard's backfill replay");
                (from, p1, after, lost, skim)
            }
            None => {
                let pin = match self.pipeline.checkpoints.load(&pin_key(table, epoch, shard_id)).await {
                    Ok(pin) => pin,
                    // Tried again at the next turn: a replay from the shard's oldest record would be
                    // exact too, but may re-publish a day of changes.
                    Err(err) => {
                        tracing::warn!(table, shard_id, error = %err, "cannot read the backfill's pin; retrying");
                        return Ok(());
                    }
                };
                // No pin (a shard that appeared after the pins) or an unreadable one: from the
                // shard's oldest record, a wider replay that is still exact.
                let from = pin.position.and_then(|pin| pin.last().cloned());
                match published {
                    Some(p1) if from.as_ref().is_none_or(|from| *from < p1) => {
                        tracing::info!(table, shard_id, epoch, from = ?from.as_ref().map(ToString::to_string), %p1,
                            "backfill scan ended: replaying the shard's changes since the pin");
                        (from.clone(), p1, from, false, None)
                    }
                    // Nothing was published since the pin: nothing to replay.
                    _ => {
                        self.advance_replay(&mut checkpoint, ReplayProgress::Done { lost: false }).await?;
                        cursor.replayed = Some(epoch);
                        return Ok(());
                    }
                }
            }
        };
        let mut replay = Replay {
            epoch,
            checkpoint,
            from,
            p1,
            after,
            lost,
            skip: HashSet::new(),
            skim,
            iterator: None,
            fetch: None,
            retry_at: None,
            delays: retry::backoff(),
        };
        let first = replay.progress(false);
        self.advance_replay(&mut replay.checkpoint, first).await?;
        cursor.replay = Some(replay);
        Ok(())
    }

    /// Handles the replay's next page (or the skim's) once it has been read: the read runs as a task
    /// of its own, so the live reading goes on meanwhile (a page of 1000 records can take seconds on a
    /// slow endpoint). With `wait` (a shard that has ended: nothing live to read) the read is awaited.
    /// True when a page was handled (read on at once: there is likely more).
    async fn replay_page(&self, cursor: &mut Cursor<'_>, wait: bool) -> Result<bool, Outcome> {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        let Some(replay) = cursor.replay.as_mut() else { return Ok(false) };
        if let Some(at) = replay.retry_at {
            if !wait && Instant::now() < at {
                return Ok(false);
            }
            if !self.pause(Some(at.saturating_duration_since(Instant::now()))).await {
                return Err(self.stopped());
            }
            replay.retry_at = None;
        }
        if replay.fetch.is_none() {
            let start = replay.start();
            replay.fetch = Some(self.spawn_fetch(replay.iterator.take(), start));
        }
        let Some(fetch) = replay.fetch.as_mut() else { return Ok(false) };
        if !wait && !fetch.is_finished() {
            return Ok(false);
        }
        let Some(joined) = self.unless_stopped(fetch).await else { return Err(self.stopped()) };
        replay.fetch = None;
        // A fetch that panicked is a failed call: a new iterator is asked for at the same position.
        let page = match joined.unwrap_or_else(|err| Err((None, ReadError::Transient(err.to_string())))) {
            Ok(read) => read,
            // A new iterator at the same position.
            Err((_, ReadError::IteratorExpired)) => return Ok(false),
            Err((iterator, err)) => {
                if !matches!(err, ReadError::Trimmed(_)) {
                    replay.iterator = iterator;
                }
                self.replay_failed(replay, err);
                return Ok(false);
            }
        };
        replay.delays = retry::backoff();
        let Page { records, next_iterator, body, .. } = page;
        if let Some(skim) = replay.skim.as_mut() {
            let mut passed = next_iterator.is_none();
            for record in records {
                let Some(seq) = SequenceNumber::parse(&record.sequence_number) else { continue };
                if seq > skim.until {
                    passed = true;
                    break;
                }
                replay.skip.extend(item_key(record.keys_json()));
                passed = seq >= skim.until;
                skim.after = Some(seq);
                if passed {
                    break;
                }
            }
            if passed {
                replay.skim = None;
            } else {
                replay.iterator = next_iterator;
            }
            return Ok(true);
        }
        let mut done = next_iterator.is_none();
        let mut batch = Vec::new();
        let mut judge = crate::pipeline::Judge::new(&self.pipeline, table, shard_id, body);
        for record in records {
            let Some(seq) = SequenceNumber::parse(&record.sequence_number) else { continue };
            if seq > replay.p1 {
                done = true;
                break;
            }
            let last = seq >= replay.p1;
            replay.after = Some(seq);
            if !replay.skip.contains(record.keys_json()) {
                let origin = Origin::Replay { epoch: replay.epoch };
                // A record the table's settings drop is passed over like a published one.
                if let Ok(prepared) = judge.prepare(record, origin) {
                    batch.push(prepared);
                }
            }
            if last {
                done = true;
                break;
            }
        }
        let count = batch.len() as u64;
        if !batch.is_empty() {
            let destination = Destination { subject: &self.subject, table, shard_id };
            let window = self.pipeline.settings.max_in_flight;
            let mut delivery = Delivery::new(self.pipeline.sink.as_ref(), destination, batch, window, &self.guard);
            while delivery.acked().await?.is_some() {}
            self.pipeline.metrics.backfill_replayed.with_label_values(&[table]).inc_by(count);
        }
        let progress = replay.progress(done);
        self.advance_replay(&mut replay.checkpoint, progress).await?;
        if done {
            let (lost, epoch) = (replay.lost, replay.epoch);
            if lost {
                tracing::error!(
                    table,
                    shard_id,
                    epoch,
                    "backfill replay done, but part of it had been trimmed: the backfill is inexact"
                );
            } else {
                tracing::info!(table, shard_id, epoch, "backfill replay done");
            }
            cursor.replayed = Some(epoch);
            cursor.replay = None;
        } else {
            replay.iterator = next_iterator;
        }
        Ok(true)
    }

    /// Reads the replay's next page as a task: at `iterator`, or at a new one at `start`.
    fn spawn_fetch(&self, iterator: Option<String>, start: StartAt) -> Fetch {
        let source = Arc::clone(&self.pipeline.source);
        let (stream_arn, shard_id) = (self.shard.stream_arn.clone(), self.shard.shard_id.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            let iterator = match iterator {
                Some(iterator) => iterator,
                None => source.iterator(&stream_arn, &shard_id, &start).await.map_err(|err| (None, err))?,
            };
            source.records(&iterator).await.map_err(|err| (Some(iterator), err))
        }))
    }

    /// A failed replay read: a trimmed range is counted as lost and the replay goes on from the
    /// oldest record; anything else is tried again after a pause (the live reading goes on).
    fn replay_failed(&self, replay: &mut Replay, err: ReadError) {
        let (table, shard_id) = (self.shard.table.as_str(), self.shard.shard_id.as_str());
        self.count_error(&err);
        if let ReadError::Trimmed(_) = err {
            if replay.start() == StartAt::TrimHorizon {
                // The horizon moved between the iterator and the read: no new loss.
                replay.retry_at = replay.delays.next().map(|delay| Instant::now() + delay);
                return;
            }
            if !replay.lost {
                self.pipeline.metrics.backfill_handoff_lost.with_label_values(&[table]).inc();
                tracing::error!(
                    table,
                    shard_id,
                    epoch = replay.epoch,
                    "changes made during the backfill were trimmed from the stream before they could be replayed (the scan took longer than the stream's 24 h retention): the backfill is inexact"
                );
            }
            replay.lost = true;
            replay.iterator = None;
            match replay.skim.as_mut() {
                Some(skim) => skim.after = None,
                None => replay.after = None,
            }
            return;
        }
        let delay = replay.delays.next().unwrap_or(Duration::from_secs(1));
        tracing::warn!(table, shard_id, error = %err, retry_in_ms = delay.as_millis() as u64, "backfill replay read failed; retrying");
        replay.retry_at = Some(Instant::now() + delay);
    }

    /// Writes the replay's progress, as shard checkpoints are written (see `write.rs`).
    async fn advance_replay(
        &self,
        checkpoint: &mut Fenced<ReplayProgress>,
        progress: ReplayProgress,
    ) -> Result<(), Outcome> {
        crate::pipeline::settle(checkpoint.advance(progress).await, &self.shard.table, "backfill replay progress")
    }
}

/// The skip set's entry for an item: its `keys` JSON, copied (a slice would keep the whole event
/// alive); `None` for a record without keys, which is never skipped.
fn item_key(keys_json: &[u8]) -> Option<Bytes> {
    (keys_json != b"{}").then(|| Bytes::copy_from_slice(keys_json))
}
