//! A change record as the pipeline carries it, in the service's own types: the source turns what it
//! reads into this at its boundary (`source::convert`), and publishing writes events from it, so
//! neither side knows the other's library.
//!
//! Invariants: values keep exactly what the source sent (numbers as their decimal text, never a
//! float); a [`Map`]'s fields are sorted by name once, when it is built, so every reader sees the
//! order the events are written in (the seed's Go encoder sorted map keys).

/// One attribute value, by DynamoDB's types.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    S(String),
    /// A number as its decimal text (up to 38 significant digits; it never passes through a float).
    N(String),
    B(Vec<u8>),
    Ss(Vec<String>),
    Ns(Vec<String>),
    Bs(Vec<Vec<u8>>),
    M(Map),
    L(Vec<Value>),
    Null,
    Bool(bool),
    /// A type this version does not know, described for the log.
    Unknown(String),
}

/// A map of attributes (an item, its keys, or an `M` value), its fields sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Map(Vec<(String, Value)>);

impl Map {
    /// The fields, in any order; they are sorted here.
    pub fn new(mut fields: Vec<(String, Value)>) -> Map {
        fields.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Map(fields)
    }

    /// The fields, sorted by name.
    pub fn fields(&self) -> &[(String, Value)] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, Value)> for Map {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(fields: I) -> Map {
        Map::new(fields.into_iter().collect())
    }
}

/// Who made a change (a TTL deletion is made by `dynamodb.amazonaws.com`).
#[derive(Debug, Clone, PartialEq)]
pub struct UserIdentity {
    pub kind: String,
    pub principal_id: String,
}

/// Where a change record comes from (`docs/backfill.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// Read from the table's stream: the record of one change.
    #[default]
    Stream,
    /// An item as a backfill's `Scan` found it (backfill `epoch`): no shard, no sequence number.
    Snapshot { epoch: u64 },
    /// A stream record published again after backfill `epoch`'s scan, so that it lands after every
    /// snapshot row of its item.
    Replay { epoch: u64 },
}

/// One change of one item, as a stream record describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeRecord {
    pub event_id: String,
    /// `INSERT`, `MODIFY` or `REMOVE` (whatever the source said, kept as text).
    pub event_name: String,
    /// The record's place in its shard: decimal digits as the source sent them.
    pub sequence_number: String,
    /// `ApproximateCreationDateTime`, seconds since the Unix epoch.
    pub created_at: Option<f64>,
    /// The item's primary key; `None` when the record carries none.
    pub keys: Option<Map>,
    pub new_image: Option<Map>,
    pub old_image: Option<Map>,
    pub user_identity: Option<UserIdentity>,
    /// The size of the record's data as the source counts it (`SizeBytes`).
    pub size_bytes: Option<i64>,
    pub origin: Origin,
}

/// A stream record that cannot become a change record (it lacks its `dynamodb` section or its
/// sequence number), described for the log: it can be neither published nor checkpointed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason} (event id {event_id:?})")]
pub struct Unusable {
    pub reason: &'static str,
    pub event_id: Option<String>,
}
