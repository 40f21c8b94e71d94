//! The values tests exchange with the endpoint: view types, event names, records to append and where
//! a write landed.
//!
//! Items and images are DynamoDB JSON (`{"S": "x"}`, `{"N": "1"}`, ...) exactly as `GetRecords` returns
//! them, so a test can write what it later expects to read.

use serde_json::{Map, Value};

/// Attribute name to attribute value in DynamoDB JSON.
pub type Attributes = Map<String, Value>;

/// What a stream record carries besides the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewType {
    KeysOnly,
    NewImage,
    OldImage,
    NewAndOldImages,
}

impl ViewType {
    /// The `StreamViewType` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ViewType::KeysOnly => "KEYS_ONLY",
            ViewType::NewImage => "NEW_IMAGE",
            ViewType::OldImage => "OLD_IMAGE",
            ViewType::NewAndOldImages => "NEW_AND_OLD_IMAGES",
        }
    }

    pub(crate) fn has_new_image(self) -> bool {
        matches!(self, ViewType::NewImage | ViewType::NewAndOldImages)
    }

    pub(crate) fn has_old_image(self) -> bool {
        matches!(self, ViewType::OldImage | ViewType::NewAndOldImages)
    }
}

/// A record's `eventName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventName {
    Insert,
    Modify,
    Remove,
}

impl EventName {
    pub fn as_str(self) -> &'static str {
        match self {
            EventName::Insert => "INSERT",
            EventName::Modify => "MODIFY",
            EventName::Remove => "REMOVE",
        }
    }
}

/// A record's `userIdentity`: who made the change when it was not a client (a TTL expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity {
    pub principal_id: String,
    pub kind: String,
}

impl UserIdentity {
    /// The identity DynamoDB puts on the `REMOVE` record of an item its TTL expired.
    pub fn ttl() -> UserIdentity {
        UserIdentity { principal_id: "dynamodb.amazonaws.com".to_owned(), kind: "Service".to_owned() }
    }
}

/// A record exactly as a test wants it in the stream (see `FaultyStreams::put`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub keys: Attributes,
    pub new_image: Option<Attributes>,
    pub old_image: Option<Attributes>,
    pub event_name: EventName,
    pub user_identity: Option<UserIdentity>,
}

/// Where a write landed in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub shard_id: String,
    pub sequence_number: String,
    pub event_name: EventName,
}
