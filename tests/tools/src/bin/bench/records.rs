//! The records the scenarios write into the synthetic source, and the clock that stamps them.
//!
//! A record that carries its exact creation time (`t`, nanoseconds since the epoch) lets a subscriber
//! on the same host measure write-to-arrival latency: DynamoDB's own `ApproximateCreationDateTime` is
//! rounded down to the second, so it cannot be used.

use serde_json::json;
use streams_emulator::{EventName, NewRecord};

/// The attribute holding a record's creation time in nanoseconds.
pub const STAMP: &str = "t";

/// The `INSERT` of item `k{i}` whose new image carries `attribute` besides the key.
pub fn insert(i: u64, attribute: &str, value: serde_json::Value) -> NewRecord {
    let key = json!({"pk": {"S": format!("k{i}")}}).as_object().unwrap().clone();
    let mut image = key.clone();
    image.insert(attribute.into(), value);
    NewRecord { keys: key, new_image: Some(image), old_image: None, event_name: EventName::Insert, user_identity: None }
}

/// The `INSERT` of item `k{i}` stamped with the time of this call.
pub fn stamped(i: u64) -> NewRecord {
    insert(i, STAMP, json!({"N": now_nanos().to_string()}))
}

/// What a subscriber needs from a published stamped event: the item number and its creation time.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u128)> {
    let event: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let item = event["keys"]["pk"].as_str()?.strip_prefix('k')?.parse().ok()?;
    let written = event["new_image"][STAMP].to_string().parse().ok()?;
    Some((item, written))
}

/// Nanoseconds since the epoch on this host's clock (writer and subscriber share it).
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
