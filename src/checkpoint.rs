//! Checkpoints: how far each shard has been published, kept in the NATS KV bucket.
//!
//! Keys and values are the seed's: key `{table_name}.{shard_id}`, value the sequence number of the
//! last record published, so a bucket written by the Go service is resumed from as it is. A shard read
//! to its end gets the value `SHARD_END` (followed by `:{last sequence number}` when it had records).
//! Only the operator's `checkpoints rewind` writes the two values that replay a shard from its
//! start: `TRIM_HORIZON`, and `AT_TIMESTAMP:{unix seconds}` (records created before it are skipped);
//! the Go service cannot read them.
//!
//! Invariants: every write is a compare-and-swap on the revision this process last saw (a mismatch
//! means another writer moved the key: the caller stops and re-reads, it never overwrites); a
//! checkpoint never moves backwards ([`Position::is_after`]); and a shard's checkpoint is written
//! only while its lease guard is valid ([`ShardCheckpoint`] checks it before every write).

use std::cmp::Ordering;
use std::fmt;

use std::sync::Arc;

use backon::Retryable;
use bytes::Bytes;
use coordination::{LeaseGuard, LeaseLost, LeaseStore, Revision, StoreError};

use crate::retry;

/// The marker value of a shard read to its end.
pub const SHARD_END: &str = "SHARD_END";
/// The value of a shard rewound to its start (`checkpoints rewind --to trim-horizon`).
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// The prefix of a shard rewound to a time: `AT_TIMESTAMP:{unix seconds}`.
pub const AT_TIMESTAMP: &str = "AT_TIMESTAMP";

/// A DynamoDB Streams sequence number: decimal digits, compared as the number they spell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(String);

impl SequenceNumber {
    /// Accepts the non-empty decimal strings DynamoDB uses (21 to 40 digits in practice).
    pub fn parse(text: &str) -> Option<Self> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| SequenceNumber(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        let a = self.0.trim_start_matches('0');
        let b = other.0.trim_start_matches('0');
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a checkpoint says about a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Records up to and including this one are published; resume after it.
    After(SequenceNumber),
    /// The shard was read to its end; `last` is its last record, if it had any.
    Finished { last: Option<SequenceNumber> },
    /// Rewound by an operator: read the shard from `TRIM_HORIZON`, skipping the records created
    /// before second `since` (Unix epoch; `None`: skip nothing). DynamoDB Streams has no iterator at
    /// a time, so this is how a replay from a time is kept. Only `checkpoints rewind` writes it.
    Rewound { since: Option<u64> },
}

impl Position {
    /// Parses a stored value: the seed's bare sequence number, our end-of-shard marker, or a rewind.
    pub fn parse(value: &str) -> Option<Position> {
        let value = value.trim();
        if value == TRIM_HORIZON {
            return Some(Position::Rewound { since: None });
        }
        if let Some(since) = value.strip_prefix(AT_TIMESTAMP).and_then(|rest| rest.strip_prefix(':')) {
            let digits = !since.is_empty() && since.bytes().all(|b| b.is_ascii_digit());
            return digits.then(|| since.parse().ok()).flatten().map(|since| Position::Rewound { since: Some(since) });
        }
        if let Some(rest) = value.strip_prefix(SHARD_END) {
            return match rest.strip_prefix(':') {
                None if rest.is_empty() => Some(Position::Finished { last: None }),
                Some(seq) => SequenceNumber::parse(seq).map(|last| Position::Finished { last: Some(last) }),
                None => None,
            };
        }
        SequenceNumber::parse(value).map(Position::After)
    }

    /// The value written to the bucket.
    pub fn encode(&self) -> String {
        match self {
            Position::After(seq) => seq.to_string(),
            Position::Finished { last: None } => SHARD_END.to_owned(),
            Position::Finished { last: Some(seq) } => format!("{SHARD_END}:{seq}"),
            Position::Rewound { since: None } => TRIM_HORIZON.to_owned(),
            Position::Rewound { since: Some(since) } => format!("{AT_TIMESTAMP}:{since}"),
        }
    }

    /// The last published record, if any.
    pub fn last(&self) -> Option<&SequenceNumber> {
        match self {
            Position::After(seq) => Some(seq),
            Position::Finished { last } => last.as_ref(),
            Position::Rewound { .. } => None,
        }
    }

    /// True when moving from `previous` to `self` goes forward (never backwards, never out of the
    /// finished state). A rewind is where reading starts over, so anything read from it goes forward,
    /// and nothing but the operator's command goes back to one.
    pub fn is_after(&self, previous: Option<&Position>) -> bool {
        match (previous, self) {
            (None, _) => true,
            (Some(Position::Finished { .. }), _) => false,
            (Some(_), Position::Rewound { .. }) => false,
            (Some(Position::Rewound { .. }), _) => true,
            (Some(Position::After(old)), Position::After(new)) => new > old,
            (Some(Position::After(old)), Position::Finished { last }) => last.as_ref().is_none_or(|l| l >= old),
        }
    }
}

/// A value a fenced checkpoint holds: how it is stored, and which steps go forward.
pub trait Progress: Clone + PartialEq + Send + Sync {
    /// A stored value; `None` for one this version cannot read.
    fn parse(text: &str) -> Option<Self>;
    /// The value written to the bucket.
    fn encode(&self) -> String;
    /// True when moving from `previous` to `self` goes forward.
    fn is_after(&self, previous: Option<&Self>) -> bool;
}

impl Progress for Position {
    fn parse(text: &str) -> Option<Self> {
        Position::parse(text)
    }

    fn encode(&self) -> String {
        Position::encode(self)
    }

    fn is_after(&self, previous: Option<&Self>) -> bool {
        Position::is_after(self, previous)
    }
}

/// The seed's checkpoint key.
pub fn key(table: &str, shard_id: &str) -> String {
    format!("{table}.{shard_id}")
}

/// The shard id in `key` if it is a checkpoint key of `table` (shard ids contain no `.`, so
/// `a.b.shardId-x` belongs to table `a.b`, not to `a`).
pub fn shard_of<'k>(table: &str, key: &'k str) -> Option<&'k str> {
    key.strip_prefix(table)?.strip_prefix('.').filter(|shard| !shard.is_empty() && !shard.contains(['.', '/']))
}

/// A checkpoint as read from the bucket.
#[derive(Debug, Clone)]
pub struct Stored<V = Position> {
    /// `None` when the key is absent, deleted, or holds a value we cannot read.
    pub position: Option<V>,
    /// The key's revision; `None` when it is absent or deleted.
    pub revision: Option<Revision>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Someone else wrote the key since we read it.
    #[error("checkpoint {key} was changed by another writer")]
    Conflict { key: String },
    /// The bucket did not answer (a write may have landed), or refused the key.
    #[error("checkpoint {key}: {source}")]
    Store { key: String, source: StoreError },
}

impl CheckpointError {
    fn of(key: &str, source: StoreError) -> CheckpointError {
        match source {
            StoreError::Conflict { .. } => CheckpointError::Conflict { key: key.to_owned() },
            source => CheckpointError::Store { key: key.to_owned(), source },
        }
    }
}

/// Checkpoint reads and compare-and-swap writes, on the bucket's one compare-and-swap wrapper
/// ([`LeaseStore`], the lease protocol's store).
#[derive(Clone)]
pub struct Checkpoints {
    store: Arc<dyn LeaseStore>,
}

impl Checkpoints {
    pub fn new(store: Arc<dyn LeaseStore>) -> Self {
        Checkpoints { store }
    }

    /// Reads a shard's checkpoint and its revision.
    pub async fn load(&self, key: &str) -> Result<Stored, CheckpointError> {
        self.load_as(key).await
    }

    /// Reads a checkpoint holding a `V` and its revision.
    pub async fn load_as<V: Progress>(&self, key: &str) -> Result<Stored<V>, CheckpointError> {
        let entry = self.store.get(key).await.map_err(|err| CheckpointError::of(key, err))?;
        Ok(match entry {
            None => Stored { position: None, revision: None },
            Some(entry) => {
                let text = String::from_utf8_lossy(&entry.value);
                let position = V::parse(&text);
                if position.is_none() {
                    tracing::error!(key, value = %text, "checkpoint value cannot be read; starting as if there were none");
                }
                Stored { position, revision: Some(entry.revision) }
            }
        })
    }

    /// Writes `position` if the key is still at `expected` (`None`: absent); returns the new revision.
    pub async fn save<V: Progress>(
        &self,
        key: &str,
        position: &V,
        expected: Option<Revision>,
    ) -> Result<Revision, CheckpointError> {
        let value = Bytes::from(position.encode());
        let written = match expected {
            None => self.store.create(key, value).await,
            Some(revision) => self.store.update(key, value, revision).await,
        };
        written.map_err(|err| CheckpointError::of(key, err))
    }

    /// Deletes a checkpoint if it is still at `expected`.
    pub async fn delete(&self, key: &str, expected: Revision) -> Result<(), CheckpointError> {
        self.store.delete(key, expected).await.map_err(|err| CheckpointError::of(key, err))
    }

    /// Every checkpoint key of `table`, with its shard id.
    pub async fn shards_of(&self, table: &str) -> Result<Vec<(String, String)>, CheckpointError> {
        let prefix = format!("{table}.");
        let keys = self.store.keys(&prefix).await.map_err(|err| CheckpointError::of(&format!("{prefix}*"), err))?;
        Ok(keys
            .into_iter()
            .filter_map(|key| shard_of(table, &key).map(|shard| (key.clone(), shard.to_owned())))
            .collect())
    }
}

/// Attempts of one checkpoint write while the bucket does not answer; after them the write is left to
/// the next one (the records are published; only progress is unsaved).
const WRITE_ATTEMPTS: usize = 5;

/// Unconfirmed positions remembered while the bucket does not answer (one per page read meanwhile);
/// forgetting an older one costs at most a needless hand-over, never a record.
const MAX_UNCONFIRMED: usize = 1024;

/// A checkpoint as this process holds it, of a shard ([`ShardCheckpoint`]) or of a backfill's scan
/// segment: the only place a checkpoint is advanced, and only while its lease allows it.
pub struct Fenced<V: Progress> {
    store: Checkpoints,
    key: String,
    position: Option<V>,
    revision: Option<Revision>,
    /// Positions this process wrote without an answer since its last confirmed write: any of them
    /// may have landed (issue 14: after `WRITE_ATTEMPTS` unanswered writes the reader went on, and
    /// the next write found the key moved by its own lost write and stopped as if fenced).
    unconfirmed: Vec<V>,
    /// The shard's lease: checked before every write.
    guard: LeaseGuard,
    /// Another writer moved the key under this process (a write ended in [`AdvanceError::Taken`]).
    taken: bool,
}

/// Why a checkpoint was not advanced.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    /// The shard's lease ended: nothing more may be written.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// Another writer moved the key: it reads this shard now; stop and let it go on.
    #[error("checkpoint {0} was moved by another writer")]
    Taken(String),
    /// The bucket did not answer `WRITE_ATTEMPTS` times; nothing is known to be written.
    #[error(transparent)]
    Unavailable(CheckpointError),
}

/// The checkpoint of one shard.
pub type ShardCheckpoint = Fenced<Position>;

impl<V: Progress> Fenced<V> {
    /// Reads the checkpoint at `key` of what `guard` is the lease of.
    pub async fn load(store: Checkpoints, key: String, guard: LeaseGuard) -> Result<Self, CheckpointError> {
        let stored = store.load_as::<V>(&key).await?;
        Ok(Fenced {
            store,
            key,
            position: stored.position,
            revision: stored.revision,
            unconfirmed: Vec::new(),
            guard,
            taken: false,
        })
    }

    pub fn position(&self) -> Option<&V> {
        self.position.as_ref()
    }

    /// The key's revision as this process last read or wrote it; `None` while absent.
    pub fn revision(&self) -> Option<Revision> {
        self.revision
    }

    /// Whether a write found the key moved by another writer ([`AdvanceError::Taken`]): what this
    /// process holds is no longer the checkpoint.
    pub fn taken(&self) -> bool {
        self.taken
    }

    /// Writes `next` if it moves forward (`Ok(false)`: a step that would not is skipped), while the
    /// lease allows it; retried a few times while the bucket does not answer.
    ///
    /// A write whose answer was lost may have landed: on a revision conflict the key is read again;
    /// if it holds `next`, that revision is adopted; if it holds a position this process wrote without
    /// an answer, that revision is adopted and `next` written over it; anything else means another
    /// writer.
    pub async fn advance(&mut self, next: V) -> Result<bool, AdvanceError> {
        if !next.is_after(self.position.as_ref()) {
            return Ok(false);
        }
        let unconfirmed = &self.unconfirmed;
        let (store, key, guard) = (&self.store, self.key.as_str(), &self.guard);
        let expected = self.revision;
        let attempt = || async {
            guard.check()?;
            let mut written = store.save(key, &next, expected).await;
            if let Err(CheckpointError::Conflict { .. }) = written {
                let stored = store.load_as::<V>(key).await.map_err(AdvanceError::Unavailable)?;
                match (stored.position, stored.revision) {
                    (Some(position), Some(revision)) if position == next => return Ok(revision),
                    (Some(position), Some(revision)) if unconfirmed.contains(&position) => {
                        written = store.save(key, &next, Some(revision)).await;
                    }
                    _ => return Err(AdvanceError::Taken(key.to_owned())),
                }
            }
            written.map_err(|err| match err {
                CheckpointError::Conflict { .. } => AdvanceError::Taken(key.to_owned()),
                other => AdvanceError::Unavailable(other),
            })
        };
        let result = attempt
            .retry(retry::policy().with_max_times(WRITE_ATTEMPTS - 1))
            .when(|err| matches!(err, AdvanceError::Unavailable(_)))
            .await;
        match result {
            Ok(revision) => {
                self.revision = Some(revision);
                self.position = Some(next);
                self.unconfirmed.clear();
                Ok(true)
            }
            Err(err) => {
                self.taken |= matches!(err, AdvanceError::Taken(_));
                if matches!(err, AdvanceError::Unavailable(_)) {
                    if self.unconfirmed.len() == MAX_UNCONFIRMED {
                        self.unconfirmed.remove(0);
                    }
                    self.unconfirmed.push(next);
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).expect("digits")
    }

    #[test]
    fn seed_values_and_end_markers_round_trip() {
        for value in ["1100000000017454423009", "SHARD_END", "SHARD_END:000000000000000000042"] {
            assert_eq!(Position::parse(value).expect("parses").encode(), value);
        }
        assert_eq!(Position::parse("not a number"), None);
        assert_eq!(Position::parse("SHARD_ENDX"), None);
    }

    #[test]
    fn rewinds_round_trip_and_malformed_ones_are_refused() {
        assert_eq!(Position::parse("TRIM_HORIZON"), Some(Position::Rewound { since: None }));
        assert_eq!(Position::parse("AT_TIMESTAMP:1795593789"), Some(Position::Rewound { since: Some(1_795_593_789) }));
        for value in ["TRIM_HORIZON", "AT_TIMESTAMP:1795593789", "AT_TIMESTAMP:0"] {
            assert_eq!(Position::parse(value).expect("parses").encode(), value);
        }
        for bad in [
            "AT_TIMESTAMP",
            "AT_TIMESTAMP:",
            "AT_TIMESTAMP:-5",
            "AT_TIMESTAMP:12x",
            "TRIM_HORIZONX",
            "AT_TIMESTAMP:1:2",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        assert_eq!(Position::Rewound { since: Some(7) }.last(), None);
    }

    #[test]
    fn reading_on_from_a_rewind_goes_forward_and_only_the_command_goes_back_to_one() {
        let at = |s: &str| Position::After(seq(s));
        let rewound = Position::Rewound { since: Some(1_795_593_789) };
        let horizon = Position::Rewound { since: None };
        assert!(at("5").is_after(Some(&rewound)));
        assert!(at("5").is_after(Some(&horizon)));
        assert!(Position::Finished { last: None }.is_after(Some(&rewound)));
        assert!(Position::Finished { last: Some(seq("9")) }.is_after(Some(&horizon)));
        assert!(rewound.is_after(None), "a first write may be anything");
        assert!(!rewound.is_after(Some(&at("5"))), "a reader never writes a rewind");
        assert!(!horizon.is_after(Some(&rewound)));
        assert!(!rewound.is_after(Some(&Position::Finished { last: None })));
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert!(seq("100") > seq("99"));
        assert!(seq("0100") > seq("99"));
        assert_eq!(seq("0042").cmp(&seq("42")), Ordering::Equal);
    }

    #[test]
    fn a_checkpoint_never_goes_backwards() {
        let at = |s: &str| Position::After(seq(s));
        assert!(at("5").is_after(None));
        assert!(at("6").is_after(Some(&at("5"))));
        assert!(!at("5").is_after(Some(&at("5"))));
        assert!(!at("4").is_after(Some(&at("5"))));
        assert!(Position::Finished { last: Some(seq("5")) }.is_after(Some(&at("5"))));
        assert!(!at("9").is_after(Some(&Position::Finished { last: None })));
    }

    #[test]
    fn keys_belong_to_exactly_one_table() {
        let key = key("a.b", "shardId-1");
        assert_eq!(key, "a.b.shardId-1");
        assert_eq!(shard_of("a.b", &key), Some("shardId-1"));
        assert_eq!(shard_of("a", &key), None);
        assert_eq!(shard_of("a.b", "a.bc.shardId-1"), None);
    }
}

#[cfg(test)]
mod fencing {
    #![allow(clippy::unwrap_used)]

    use coordination::{MemoryStore, ShardKey};

    use super::*;
    use crate::testing::lease;

    fn after(seq: u64) -> Position {
        Position::After(SequenceNumber::parse(&seq.to_string()).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_is_written_only_while_the_lease_holds() {
        let store = Arc::new(MemoryStore::new());
        let shard = ShardKey::for_shard("t", "s");
        let (coordinator, guard) = lease(store.clone(), &shard).await;
        let checkpoints = Checkpoints::new(store);
        let mut checkpoint = ShardCheckpoint::load(checkpoints.clone(), key("t", "s"), guard).await.unwrap();
        assert!(checkpoint.advance(after(5)).await.unwrap());
        assert!(!checkpoint.advance(after(4)).await.unwrap(), "never backwards");

        coordinator.release(&shard);
        tokio::time::sleep(coordination::DEFAULT_TTL).await;
        assert!(matches!(checkpoint.advance(after(6)).await, Err(AdvanceError::LeaseLost(_))));
        assert_eq!(checkpoints.load(&key("t", "s")).await.unwrap().position, Some(after(5)));
    }

    /// Loses the answer of every write to a checkpoint key while `lose` is set (the write lands).
    struct LostAnswers(Arc<std::sync::atomic::AtomicBool>);

    impl coordination::store::FaultPlan for LostAnswers {
        fn plan(&mut self, _client: &str, op: coordination::store::Op, key: &str) -> coordination::store::Fault {
            let write = matches!(op, coordination::store::Op::Create | coordination::store::Op::Update);
            let lose = write && key == "t.s" && self.0.load(std::sync::atomic::Ordering::SeqCst);
            coordination::store::Fault { lose_response: lose, ..Default::default() }
        }
    }

    /// Issue 14: after every attempt of a write went unanswered (it landed), the next write finds the
    /// key moved by that lost write. It is this process's own write: adopted, and the next position
    /// written over it, instead of stopping the reader as if another writer had taken the shard.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_landed_unanswered_is_adopted_by_the_next_one() {
        let lose = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = Arc::new(MemoryStore::with_faults(LostAnswers(lose.clone())));
        let shard = ShardKey::for_shard("t", "s");
        let (_coordinator, guard) = lease(store.clone(), &shard).await;
        let checkpoints = Checkpoints::new(store);
        let mut checkpoint = ShardCheckpoint::load(checkpoints.clone(), key("t", "s"), guard).await.unwrap();
        assert!(checkpoint.advance(after(5)).await.unwrap());
        lose.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(checkpoint.advance(after(6)).await, Err(AdvanceError::Unavailable(_))));
        lose.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(checkpoints.load(&key("t", "s")).await.unwrap().position, Some(after(6)), "it landed");
        assert!(checkpoint.advance(after(7)).await.unwrap());
        assert_eq!(checkpoints.load(&key("t", "s")).await.unwrap().position, Some(after(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_whose_answer_was_lost_is_adopted_and_anything_else_is_taken() {
        let store = Arc::new(MemoryStore::new());
        let shard = ShardKey::for_shard("t", "s");
        let (_coordinator, guard) = lease(store.clone(), &shard).await;
        let checkpoints = Checkpoints::new(store);
        let mut checkpoint = ShardCheckpoint::load(checkpoints.clone(), key("t", "s"), guard).await.unwrap();
        // Our write of 5 landed but its answer was lost: the key holds 5 at a revision we never saw.
        checkpoints.save(&key("t", "s"), &after(5), None).await.unwrap();
        assert!(checkpoint.advance(after(5)).await.unwrap(), "adopted");
        assert!(checkpoint.advance(after(6)).await.unwrap(), "and written over at the adopted revision");
        let stored = checkpoints.load(&key("t", "s")).await.unwrap();
        checkpoints.save(&key("t", "s"), &after(9), stored.revision).await.unwrap();
        assert!(matches!(checkpoint.advance(after(7)).await, Err(AdvanceError::Taken(_))));
    }
}
