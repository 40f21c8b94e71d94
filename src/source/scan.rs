//! Reading a table's items for a backfill (issue 17, `docs/backfill.md`): one segment of a parallel
//! `Scan`, a page at a time, each page with the read units it consumed and the position to resume
//! after it.
//!
//! A position is the page's `LastEvaluatedKey` written as DynamoDB JSON with its attributes sorted
//! (`{"pk":{"S":"a"},"sk":{"N":"1"}}`), so it can be checkpointed in the bucket as text and read back
//! to exactly the key DynamoDB gave. Key attributes are strings, numbers or binaries; any other type in
//! a key is refused rather than guessed at.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use base64::Engine as _;
use serde_json::{Value as Json, json};

use super::error::ReadError;
use crate::checkpoint::Progress;
use crate::record::Map;

/// Where a segment's scan resumes: after the item with this primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPosition(String);

/// Why a stored position cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scan position {text:?}: {reason}")]
pub struct BadPosition {
    pub text: String,
    pub reason: &'static str,
}

impl ScanPosition {
    /// The position of a `LastEvaluatedKey`; `None` for a key attribute that is not a string, number or
    /// binary (DynamoDB keys are only those).
    pub fn of(key: &HashMap<String, AttributeValue>) -> Option<ScanPosition> {
        let mut fields = BTreeMap::new();
        for (name, value) in key {
            let typed = match value {
                AttributeValue::S(text) => json!({ "S": text }),
                AttributeValue::N(text) => json!({ "N": text }),
                AttributeValue::B(blob) => json!({ "B": base64::engine::general_purpose::STANDARD.encode(blob) }),
                _ => return None,
            };
            fields.insert(name.clone(), typed);
        }
        serde_json::to_string(&fields).ok().map(ScanPosition)
    }

    /// A position as stored.
    pub fn parse(text: &str) -> Result<ScanPosition, BadPosition> {
        let position = ScanPosition(text.to_owned());
        position.key().map(|_| position)
    }

    /// The text stored in the bucket.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `ExclusiveStartKey` to resume from.
    pub fn key(&self) -> Result<HashMap<String, AttributeValue>, BadPosition> {
        let bad = |reason| BadPosition { text: self.0.clone(), reason };
        let fields: BTreeMap<String, Json> = serde_json::from_str(&self.0).map_err(|_| bad("not a JSON object"))?;
        if fields.is_empty() {
            return Err(bad("no key attributes"));
        }
        let mut key = HashMap::with_capacity(fields.len());
        for (name, typed) in fields {
            let value = match typed.as_object().map(|object| object.iter().collect::<Vec<_>>()).as_deref() {
                Some([(kind, Json::String(text))]) => match kind.as_str() {
                    "S" => AttributeValue::S(text.clone()),
                    "N" => AttributeValue::N(text.clone()),
                    "B" => AttributeValue::B(
                        base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .map_err(|_| bad("binary key attribute is not base64"))?
                            .into(),
                    ),
                    _ => return Err(bad("key attribute type is not S, N or B")),
                },
                _ => return Err(bad("key attribute is not {\"S\"|\"N\"|\"B\": text}")),
            };
            key.insert(name, value);
        }
        Ok(key)
    }
}

/// One page of a segment.
#[derive(Debug, Default)]
pub struct ScanPage {
    /// The items, each a whole item.
    pub items: Vec<Map>,
    /// Where the segment resumes after this page; `None` when the segment is done.
    pub next: Option<ScanPosition>,
    /// Read capacity units the page consumed (`ConsumedCapacity`), for the read budget.
    pub read_units: f64,
}

/// One segment of a parallel scan: `index` of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub index: u32,
    pub total: u32,
}

/// How far a segment has been read, as its checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentProgress {
    /// Every item up to this key is published; resume after it.
    After(ScanPosition),
    /// The segment was read to its end.
    Done,
}

/// The value of a finished segment's checkpoint.
const DONE: &str = "DONE";

impl Progress for SegmentProgress {
    fn parse(text: &str) -> Option<Self> {
        match text {
            DONE => Some(SegmentProgress::Done),
            text => ScanPosition::parse(text).ok().map(SegmentProgress::After),
        }
    }

    fn encode(&self) -> String {
        match self {
            SegmentProgress::After(position) => position.as_str().to_owned(),
            SegmentProgress::Done => DONE.to_owned(),
        }
    }

    /// A scan only moves on (its positions are in the table's hash order, not comparable here); it
    /// never leaves `Done`.
    fn is_after(&self, previous: Option<&Self>) -> bool {
        previous != Some(&SegmentProgress::Done) && previous != Some(self)
    }
}

/// Scanning a table: DynamoDB in the service, memory in unit tests.
#[async_trait]
pub trait TableScan: Send + Sync {
    /// The table's key schema and size.
    async fn shape(&self, table: &str) -> Result<TableShape, ReadError>;

    /// One page of `segment` of `table` from `start` (its beginning: `None`), of at most `limit` items.
    async fn scan(
        &self,
        table: &str,
        segment: Segment,
        start: Option<&ScanPosition>,
        limit: i32,
    ) -> Result<ScanPage, ReadError>;
}

/// What a backfill needs to know of a table before it scans (`DescribeTable`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    /// The key schema's attribute names, the hash key first: the `keys` of each snapshot row.
    pub key_attributes: Vec<String>,
    /// DynamoDB's item count and size, refreshed by AWS about every six hours: an estimate, good for
    /// choosing segments and estimating the time left, not for counting.
    pub item_count: i64,
    pub size_bytes: i64,
}

/// Table bytes per segment when the segment count follows the table's size. One segment is read by
/// one replica at a time; 64 MiB is 8,192 read units of an eventually consistent scan (8 KiB per
/// unit), under a minute and a half of the default fleet budget (100 units per second), so segments
/// are many enough to spread over the fleet and each is short enough to hand over cheaply.
pub const BYTES_PER_SEGMENT: i64 = 64 * 1024 * 1024;

/// The fewest segments a table is scanned in, however small: several replicas share even a small
/// table, and none waits for one slow segment.
pub const MIN_SEGMENTS: u32 = 4;

/// The most segments: each is a lease and a checkpoint key in the bucket while the backfill runs,
/// so the count is kept far below DynamoDB's own limit (`TotalSegments` up to 1,000,000).
pub const MAX_SEGMENTS: u32 = 1000;

/// How many segments to scan a table of `size_bytes` in: `configured` (`BACKFILL_SEGMENTS`) when
/// set, else one per [`BYTES_PER_SEGMENT`], within [`MIN_SEGMENTS`]`..=`[`MAX_SEGMENTS`]. A configured
/// count is only kept within `1..=MAX_SEGMENTS` (the configuration already refuses others).
pub fn segments_for(size_bytes: i64, configured: Option<u32>) -> u32 {
    match configured {
        Some(count) => count.clamp(1, MAX_SEGMENTS),
        None => {
            // Unsigned: `div_ceil` of signed integers is not stable yet.
            let by_size = size_bytes.max(0).unsigned_abs().div_ceil(BYTES_PER_SEGMENT.unsigned_abs());
            u32::try_from(by_size).unwrap_or(MAX_SEGMENTS).clamp(MIN_SEGMENTS, MAX_SEGMENTS)
        }
    }
}

/// The primary key of `item`: its attributes named in `key_attributes` (the table's key schema).
pub fn keys_of(item: &Map, key_attributes: &[String]) -> Map {
    item.fields().iter().filter(|(name, _)| key_attributes.contains(name)).cloned().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::record::Value;

    fn key_attribute() -> impl Strategy<Value = AttributeValue> {
        prop_oneof![
            any::<String>().prop_map(AttributeValue::S),
            "-?[0-9]{1,38}(\\.[0-9]{1,5})?".prop_map(AttributeValue::N),
            proptest::collection::vec(any::<u8>(), 1..40).prop_map(|bytes| AttributeValue::B(bytes.into())),
        ]
    }

    proptest! {
        /// A position read back is exactly the key DynamoDB gave, whatever its attributes hold.
        #[test]
        fn positions_read_back_to_the_same_key(key in proptest::collection::hash_map(".{1,12}", key_attribute(), 1..3)) {
            let position = ScanPosition::of(&key).unwrap();
            let stored = ScanPosition::parse(position.as_str()).unwrap();
            prop_assert_eq!(stored.key().unwrap(), key);
        }
    }

    #[test]
    fn positions_are_written_with_sorted_attributes() {
        let key = HashMap::from([
            ("sk".to_owned(), AttributeValue::N("10".to_owned())),
            ("pk".to_owned(), AttributeValue::S("a\"b".to_owned())),
        ]);
        assert_eq!(ScanPosition::of(&key).unwrap().as_str(), r#"{"pk":{"S":"a\"b"},"sk":{"N":"10"}}"#);
    }

    #[test]
    fn positions_that_are_no_key_are_refused() {
        let list = HashMap::from([("pk".to_owned(), AttributeValue::L(vec![]))]);
        assert_eq!(ScanPosition::of(&list), None);
        for text in ["", "[]", "{}", r#"{"pk":"a"}"#, r#"{"pk":{"M":"a"}}"#, r#"{"pk":{"B":"not base64!"}}"#] {
            assert!(ScanPosition::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn segments_follow_the_table_size_within_bounds() {
        const MIB: i64 = 1024 * 1024;
        assert_eq!(segments_for(0, None), MIN_SEGMENTS);
        assert_eq!(segments_for(-1, None), MIN_SEGMENTS, "a size DynamoDB did not report");
        assert_eq!(segments_for(200 * MIB, None), 4, "small tables still get several segments");
        assert_eq!(segments_for(256 * MIB + 1, None), 5, "a part of a segment counts as one");
        assert_eq!(segments_for(1024 * MIB, None), 16, "1 GiB is 16 segments of 64 MiB");
        assert_eq!(segments_for(10 * 1024 * MIB, None), 160);
        assert_eq!(segments_for(1024 * 1024 * MIB, None), MAX_SEGMENTS);
        assert_eq!(segments_for(i64::MAX, None), MAX_SEGMENTS);
    }

    #[test]
    fn a_configured_segment_count_wins_over_the_size() {
        assert_eq!(segments_for(10 * 1024 * 1024 * 1024, Some(2)), 2);
        assert_eq!(segments_for(0, Some(1)), 1, "one segment is allowed when asked for");
        assert_eq!(segments_for(0, Some(0)), 1);
        assert_eq!(segments_for(0, Some(5000)), MAX_SEGMENTS);
    }

    #[test]
    fn an_items_keys_are_its_key_schema_attributes() {
        let item = Map::new(vec![
            ("pk".to_owned(), Value::S("a".to_owned())),
            ("sk".to_owned(), Value::N("1".to_owned())),
            ("name".to_owned(), Value::S("x".to_owned())),
        ]);
        let keys = keys_of(&item, &["pk".to_owned(), "sk".to_owned()]);
        assert_eq!(keys.fields().iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["pk", "sk"]);
    }
}
