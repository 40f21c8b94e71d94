//! Checkpoints: how far each shard has been published, kept in the NATS KV bucket.
//!
//! Keys and values are the seed's: key `{table_name}.{shard_id}`, value the sequence number of the
//! last record published, so a bucket written by the Go service is resumed from as it is. A shard read
//! to its end gets the value `SHARD_END` (followed by `:{last sequence number}` when it had records).
//!
//! Invariants: every write is a compare-and-swap on the revision this process last saw (a mismatch
//! means another writer moved the key: the caller stops and re-reads, it never overwrites); and a
//! checkpoint never moves backwards ([`Position::is_after`]).

use std::cmp::Ordering;
use std::fmt;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::TryStreamExt;

/// The marker value of a shard read to its end.
pub const SHARD_END: &str = "SHARD_END";

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
}

impl Position {
    /// Parses a stored value: the seed's bare sequence number, or our end-of-shard marker.
    pub fn parse(value: &str) -> Option<Position> {
        let value = value.trim();
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
        }
    }

    /// The last published record, if any.
    pub fn last(&self) -> Option<&SequenceNumber> {
        match self {
            Position::After(seq) => Some(seq),
            Position::Finished { last } => last.as_ref(),
        }
    }

    /// True when moving from `previous` to `self` goes forward (never backwards, never out of the
    /// finished state).
    pub fn is_after(&self, previous: Option<&Position>) -> bool {
        match (previous, self) {
            (None, _) => true,
            (Some(Position::Finished { .. }), _) => false,
            (Some(Position::After(old)), Position::After(new)) => new > old,
            (Some(Position::After(old)), Position::Finished { last }) => last.as_ref().is_none_or(|l| l >= old),
        }
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

/// A KV revision; 0 means "no entry seen".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Revision(pub u64);

/// A checkpoint as read from the bucket.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `None` when the key is absent, deleted, or holds a value we cannot read.
    pub position: Option<Position>,
    pub revision: Revision,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Someone else wrote the key since we read it.
    #[error("checkpoint {key} was changed by another writer")]
    Conflict { key: String },
    #[error("checkpoint {key}: {source}")]
    Nats { key: String, source: async_nats::Error },
}

/// Checkpoint reads and compare-and-swap writes on the bucket.
#[derive(Clone)]
pub struct Checkpoints {
    kv: kv::Store,
}

impl Checkpoints {
    pub fn new(kv: kv::Store) -> Self {
        Checkpoints { kv }
    }

    /// Reads a checkpoint and its revision.
    pub async fn load(&self, key: &str) -> Result<Stored, CheckpointError> {
        let nats = |source: kv::EntryError| CheckpointError::Nats { key: key.to_owned(), source: source.into() };
        let entry = self.kv.entry(key).await.map_err(nats)?;
        Ok(match entry {
            None => Stored { position: None, revision: Revision(0) },
            Some(entry) => {
                let position = match entry.operation {
                    kv::Operation::Put => {
                        let text = String::from_utf8_lossy(&entry.value);
                        let parsed = Position::parse(&text);
                        if parsed.is_none() {
                            tracing::error!(key, value = %text, "checkpoint value is neither a sequence number nor SHARD_END; the shard starts as if it had none");
                        }
                        parsed
                    }
                    _ => None,
                };
                Stored { position, revision: Revision(entry.revision) }
            }
        })
    }

    /// Writes `position` if the key is still at `expected`; returns the new revision.
    pub async fn save(&self, key: &str, position: &Position, expected: Revision) -> Result<Revision, CheckpointError> {
        let value = Bytes::from(position.encode());
        let result = if expected == Revision(0) {
            self.kv.create(key, value).await.map_err(|err| match err.kind() {
                kv::CreateErrorKind::AlreadyExists => CheckpointError::Conflict { key: key.to_owned() },
                _ => CheckpointError::Nats { key: key.to_owned(), source: err.into() },
            })
        } else {
            self.kv.update(key, value, expected.0).await.map_err(|err| match err.kind() {
                kv::UpdateErrorKind::WrongLastRevision => CheckpointError::Conflict { key: key.to_owned() },
                _ => CheckpointError::Nats { key: key.to_owned(), source: err.into() },
            })
        };
        result.map(Revision)
    }

    /// Deletes a checkpoint if it is still at `expected`.
    pub async fn delete(&self, key: &str, expected: Revision) -> Result<(), CheckpointError> {
        self.kv.delete_expect_revision(key, Some(expected.0)).await.map_err(|err| match err.kind() {
            kv::DeleteErrorKind::WrongLastRevision => CheckpointError::Conflict { key: key.to_owned() },
            _ => CheckpointError::Nats { key: key.to_owned(), source: err.into() },
        })
    }

    /// Every checkpoint key of `table`, with its shard id.
    pub async fn shards_of(&self, table: &str) -> Result<Vec<(String, String)>, CheckpointError> {
        let nats = |source: async_nats::Error| CheckpointError::Nats { key: format!("{table}.*"), source };
        let keys: Vec<String> =
            self.kv.keys().await.map_err(|e| nats(e.into()))?.try_collect().await.map_err(|e| nats(e.into()))?;
        Ok(keys
            .into_iter()
            .filter_map(|key| shard_of(table, &key).map(|shard| (key.clone(), shard.to_owned())))
            .collect())
    }
}

/// The checkpoint of one shard as this process holds it: the only place a checkpoint is advanced.
pub struct ShardCheckpoint {
    store: Checkpoints,
    key: String,
    position: Option<Position>,
    revision: Revision,
}

/// Why a checkpoint could not be advanced.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    /// Another writer owns the key now: stop this shard and let its owner go on.
    #[error("checkpoint {0} moved under us: another writer owns this shard")]
    Fenced(String),
    /// NATS did not answer; nothing is known to be written. Retry later.
    #[error(transparent)]
    Unavailable(CheckpointError),
}

impl ShardCheckpoint {
    /// Reads the shard's checkpoint.
    pub async fn load(store: Checkpoints, key: String) -> Result<Self, CheckpointError> {
        let stored = store.load(&key).await?;
        Ok(ShardCheckpoint { store, key, position: stored.position, revision: stored.revision })
    }

    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Writes `next` if it moves forward; a step that would not is skipped.
    ///
    /// A write whose answer was lost may have landed: on a revision conflict the key is read again,
    /// and if it already holds `next` that revision is adopted; anything else means another writer.
    pub async fn advance(&mut self, next: Position) -> Result<bool, AdvanceError> {
        if !next.is_after(self.position.as_ref()) {
            return Ok(false);
        }
        match self.store.save(&self.key, &next, self.revision).await {
            Ok(revision) => {
                self.revision = revision;
                self.position = Some(next);
                Ok(true)
            }
            Err(CheckpointError::Conflict { .. }) => {
                let stored = self.store.load(&self.key).await.map_err(AdvanceError::Unavailable)?;
                if stored.position.as_ref() == Some(&next) {
                    self.revision = stored.revision;
                    self.position = Some(next);
                    Ok(true)
                } else {
                    Err(AdvanceError::Fenced(self.key.clone()))
                }
            }
            Err(other) => Err(AdvanceError::Unavailable(other)),
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
