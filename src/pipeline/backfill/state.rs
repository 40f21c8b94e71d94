//! What a backfill keeps in the checkpoint bucket (`docs/backfill.md`, "Orchestration"): its keys
//! and the values under them, each well under the original deployment's 1 KiB.
//!
//! | key | value |
//! |---|---|
//! | `backfill/{table}/request` | when the last backfill was requested (Unix ms) |
//! | `backfill/{table}/state` | [`BackfillState`] as JSON |
//! | `backfill/{table}/{epoch}/pin.{shard}` | `P0`: a sequence number, or `START` |
//! | `backfill/{table}/{epoch}/segment.{i}-of-{n}` | a segment's [`SegmentProgress`] |
//! | `backfill/{table}/{epoch}/replay.{shard}` | a shard's [`ReplayProgress`] |

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Progress, SequenceNumber};
use crate::source::scan::Segment;
#[cfg(doc)]
use crate::source::scan::SegmentProgress;

/// The key `dynamodb-stream-consumer backfill request TABLE` writes (and the fleet itself, once, for a
/// `BACKFILL_TABLES` table that has never been backfilled).
pub fn request_key(table: &str) -> String {
    format!("backfill/{table}/request")
}

pub fn state_key(table: &str) -> String {
    format!("backfill/{table}/state")
}

/// The prefix of every key of one backfill of `table`.
pub fn epoch_prefix(table: &str, epoch: u64) -> String {
    format!("backfill/{table}/{epoch}/")
}

pub fn pin_key(table: &str, epoch: u64, shard_id: &str) -> String {
    format!("{}pin.{shard_id}", epoch_prefix(table, epoch))
}

pub fn segment_key(table: &str, epoch: u64, segment: Segment) -> String {
    format!("{}segment.{}-of-{}", epoch_prefix(table, epoch), segment.index, segment.total)
}

pub fn replay_key(table: &str, epoch: u64, shard_id: &str) -> String {
    format!("{}replay.{shard_id}", epoch_prefix(table, epoch))
}

/// What a key under [`epoch_prefix`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochKey<'k> {
    Pin(&'k str),
    Segment(Segment),
    Replay(&'k str),
}

impl<'k> EpochKey<'k> {
    /// `rest` is a key with its epoch prefix removed.
    pub fn parse(rest: &'k str) -> Option<EpochKey<'k>> {
        if let Some(shard) = rest.strip_prefix("pin.") {
            return Some(EpochKey::Pin(shard));
        }
        if let Some(shard) = rest.strip_prefix("replay.") {
            return Some(EpochKey::Replay(shard));
        }
        let (index, total) = rest.strip_prefix("segment.")?.split_once("-of-")?;
        Some(EpochKey::Segment(Segment { index: index.parse().ok()?, total: total.parse().ok()? }))
    }
}

/// Where a backfill is; every step is a compare-and-swap of the `state` key, so exactly one replica
/// takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Each shard's position is being recorded as the replay's start.
    Pinning,
    /// The table's segments are being read into snapshot rows.
    Scanning,
    /// Each shard re-publishes its changes since the pin.
    Replaying,
    /// The hand-off is exact.
    Done,
    /// A shard's changes since the pin were trimmed from the stream before they were replayed: the
    /// consumer may hold a stale or deleted item.
    Inexact,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Pinning, Phase::Scanning, Phase::Replaying, Phase::Done, Phase::Inexact];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pinning => "pinning",
            Phase::Scanning => "scanning",
            Phase::Replaying => "replaying",
            Phase::Done => "done",
            Phase::Inexact => "inexact",
        }
    }

    /// A backfill in this phase is over: a newer request starts the next one.
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Inexact)
    }
}

/// The `state` of a table's backfill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillState {
    /// 1 for the table's first backfill; names its keys and its events.
    pub epoch: u64,
    pub phase: Phase,
    /// The request (Unix ms) this backfill serves: a newer one starts the next backfill.
    pub requested: u64,
    /// When this phase was entered (Unix ms); a `pinning` claim left this long is taken over.
    pub since: u64,
    /// When the backfill started (Unix ms).
    #[serde(default)]
    pub started: u64,
    /// Segments of the scan (set when scanning starts).
    #[serde(default)]
    pub segments: u32,
    /// The table's key attributes: the `keys` of each snapshot row.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The table's item count as `DescribeTable` estimated it (updated about every six hours).
    #[serde(default)]
    pub items: i64,
    /// No `Scan` is made before this time (Unix ms): the margin after the pins.
    #[serde(default)]
    pub scan_after: u64,
}

impl BackfillState {
    pub fn encode(&self) -> bytes::Bytes {
        // A struct of numbers, strings and a list always serializes.
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    pub fn decode(value: &[u8]) -> Option<BackfillState> {
        serde_json::from_slice(value).ok()
    }
}

/// The value of a shard that had no checkpoint when it was pinned: its replay starts at its oldest
/// record (a wider replay is still exact: records are replayed in order, so the last one of an item
/// is its latest).
pub const PIN_START: &str = "START";

/// A pin: the shard's last published record when the backfill started; `None`: its start.
pub fn parse_pin(value: &str) -> Option<Option<SequenceNumber>> {
    match value {
        PIN_START => Some(None),
        seq => SequenceNumber::parse(seq).map(Some),
    }
}

pub fn encode_pin(pin: Option<&SequenceNumber>) -> String {
    pin.map_or_else(|| PIN_START.to_owned(), ToString::to_string)
}

/// How far a shard's replay (of its records in `(P0, P1]`) got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayProgress {
    /// Replaying: records up to `after` (`None`: none yet, from `P0`) are replayed; the replay ends
    /// at `p1`, the shard's last record published when the replay started.
    Running {
        p1: SequenceNumber,
        from: Option<SequenceNumber>,
        after: Option<SequenceNumber>,
        /// Part of the range was trimmed before it was replayed.
        lost: bool,
    },
    /// Replayed to `p1`; `lost`: part of the range was trimmed first.
    Done { lost: bool },
}

impl ReplayProgress {
    pub fn is_done(&self) -> bool {
        matches!(self, ReplayProgress::Done { .. })
    }

    pub fn is_lost(&self) -> bool {
        matches!(self, ReplayProgress::Running { lost: true, .. } | ReplayProgress::Done { lost: true })
    }
}

impl Progress for ReplayProgress {
    /// `DONE`, `LOST` (done, part of it trimmed), or `p1 from after [lost]`, each position a
    /// sequence number or `-`.
    fn parse(text: &str) -> Option<Self> {
        match text {
            "DONE" => return Some(ReplayProgress::Done { lost: false }),
            "LOST" => return Some(ReplayProgress::Done { lost: true }),
            _ => {}
        }
        let optional = |part: &str| if part == "-" { Some(None) } else { SequenceNumber::parse(part).map(Some) };
        let parts: Vec<&str> = text.split(' ').collect();
        let (p1, from, after, lost) = match parts.as_slice() {
            [p1, from, after] => (p1, from, after, false),
            [p1, from, after, "lost"] => (p1, from, after, true),
            _ => return None,
        };
        Some(ReplayProgress::Running {
            p1: SequenceNumber::parse(p1)?,
            from: optional(from)?,
            after: optional(after)?,
            lost,
        })
    }

    fn encode(&self) -> String {
        let optional = |seq: &Option<SequenceNumber>| seq.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string);
        match self {
            ReplayProgress::Done { lost: false } => "DONE".to_owned(),
            ReplayProgress::Done { lost: true } => "LOST".to_owned(),
            ReplayProgress::Running { p1, from, after, lost } => {
                let lost = if *lost { " lost" } else { "" };
                format!("{p1} {} {}{lost}", optional(from), optional(after))
            }
        }
    }

    /// A replay only moves on; it never leaves `Done`.
    fn is_after(&self, previous: Option<&Self>) -> bool {
        !previous.is_some_and(ReplayProgress::is_done) && previous != Some(self)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).unwrap()
    }

    #[test]
    fn epoch_keys_read_back() {
        let prefix = epoch_prefix("a.b", 3);
        let of = |key: String| key.strip_prefix(&prefix).unwrap().to_owned();
        assert_eq!(EpochKey::parse(&of(pin_key("a.b", 3, "shardId-1"))), Some(EpochKey::Pin("shardId-1")));
        assert_eq!(EpochKey::parse(&of(replay_key("a.b", 3, "shardId-1"))), Some(EpochKey::Replay("shardId-1")));
        let segment = Segment { index: 7, total: 16 };
        assert_eq!(EpochKey::parse(&of(segment_key("a.b", 3, segment))), Some(EpochKey::Segment(segment)));
        assert_eq!(EpochKey::parse("segment.x-of-2"), None);
        assert_eq!(EpochKey::parse("other"), None);
    }

    #[test]
    fn replay_progress_reads_back_and_never_leaves_done() {
        let values = [
            ReplayProgress::Running { p1: seq("200"), from: None, after: None, lost: false },
            ReplayProgress::Running { p1: seq("200"), from: Some(seq("100")), after: Some(seq("150")), lost: true },
            ReplayProgress::Done { lost: false },
            ReplayProgress::Done { lost: true },
        ];
        for value in &values {
            assert_eq!(ReplayProgress::parse(&value.encode()).as_ref(), Some(value), "{}", value.encode());
        }
        assert!(values[1].is_after(Some(&values[0])));
        assert!(values[2].is_after(Some(&values[1])));
        assert!(!values[0].is_after(Some(&values[2])));
        assert!(!values[2].is_after(Some(&values[2])));
        assert_eq!(ReplayProgress::parse("1 2"), None);
    }

    #[test]
    fn states_fit_the_original_bucket() {
        let state = BackfillState {
            epoch: 12,
            phase: Phase::Scanning,
            requested: 1_764_000_000_000,
            since: 1_764_000_000_000,
            started: 1_764_000_000_000,
            segments: 1000,
            keys: vec!["a".repeat(255), "b".repeat(255)],
            items: i64::MAX,
            scan_after: 1_764_000_002_000,
        };
        let encoded = state.encode();
        assert!(encoded.len() < 900, "{}", encoded.len());
        assert_eq!(BackfillState::decode(&encoded), Some(state));
    }

    #[test]
    fn pins_read_back() {
        assert_eq!(parse_pin(&encode_pin(None)), Some(None));
        assert_eq!(parse_pin(&encode_pin(Some(&seq("42")))), Some(Some(seq("42"))));
        assert_eq!(parse_pin("x"), None);
    }
}
