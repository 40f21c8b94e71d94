//! The identifiers the endpoint hands out: table and stream ARNs, stream labels, shard ids, event ids,
//! and the hash that routes an item key to a shard.
//!
//! Every identifier is derived from a server-wide counter or clock value that only goes up, so two
//! shards or two streams never share an id, and shard ids sort in creation order as plain strings
//! (`DescribeStream` pages by comparing them).

use serde_json::{Map, Value};

/// The region in every ARN (the SDK clients in tests use it too).
pub const REGION: &str = "us-east-1";

/// The account id in every ARN; moto uses the same one, so ARNs look alike across both emulators.
pub const ACCOUNT: &str = "123456789012";

/// Shard ids carry a 20-digit number like DynamoDB's (`shardId-00000001541626099285-f35f62ef`); ours
/// start at this value and count up by one per shard.
const FIRST_SHARD_NUMBER: u64 = 1_700_000_000_000;

/// `arn:aws:dynamodb:us-east-1:123456789012:table/<name>`.
pub fn table_arn(table: &str) -> String {
    format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}")
}

/// `arn:aws:dynamodb:us-east-1:123456789012:table/<name>/stream/<label>`.
pub fn stream_arn(table: &str, label: &str) -> String {
    format!("{}/stream/{label}", table_arn(table))
}

/// The `counter`-th shard id of the server: `shardId-<20 digits>-<8 hex>`.
pub fn shard_id(counter: u64, stream_arn: &str) -> String {
    let suffix = fnv1a(format!("{stream_arn}#{counter}").as_bytes()) as u32;
    format!("shardId-{:020}-{suffix:08x}", FIRST_SHARD_NUMBER + counter)
}

/// A 32-hex-digit event id, unique because the sequence number is.
pub fn event_id(sequence_number: u128) -> String {
    format!("{sequence_number:032x}")
}

/// A stream label as DynamoDB writes it: the creation time, `2026-11-25T10:11:12.345` (UTC).
pub fn stream_label(epoch_millis: u64) -> String {
    let seconds = epoch_millis / 1000;
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        epoch_millis % 1000
    )
}

/// The routing hash of an item's key attributes: stable across runs and independent of map order.
pub fn key_hash(keys: &Map<String, Value>) -> u64 {
    let mut names: Vec<&String> = keys.keys().collect();
    names.sort();
    let mut canonical = String::new();
    for name in names {
        canonical.push_str(name);
        canonical.push('=');
        canonical.push_str(&keys[name].to_string());
        canonical.push(';');
    }
    fnv1a(canonical.as_bytes())
}

/// FNV-1a, 64 bits: a fixed, dependency-free hash (`std`'s `DefaultHasher` may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Year, month and day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_iso_times() {
        assert_eq!(stream_label(0), "1970-01-01T00:00:00.000");
        assert_eq!(stream_label(1_700_000_000_123), "2023-11-14T22:13:20.123");
        assert_eq!(stream_label(951_825_600_000), "2000-02-29T12:00:00.000");
    }

    #[test]
    fn shard_ids_sort_in_creation_order() {
        let arn = stream_arn("t", &stream_label(0));
        let ids: Vec<String> = [0, 1, 9, 10, 12_345].into_iter().map(|n| shard_id(n, &arn)).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        assert_eq!(ids[0].len(), "shardId-00000001541626099285-f35f62ef".len());
    }

    #[test]
    fn key_hash_ignores_map_order() {
        let mut ab = Map::new();
        ab.insert("a".into(), serde_json::json!({"S": "1"}));
        ab.insert("b".into(), serde_json::json!({"N": "2"}));
        let mut ba = Map::new();
        ba.insert("b".into(), serde_json::json!({"N": "2"}));
        ba.insert("a".into(), serde_json::json!({"S": "1"}));
        assert_eq!(key_hash(&ab), key_hash(&ba));
        ba.insert("a".into(), serde_json::json!({"S": "2"}));
        assert_ne!(key_hash(&ab), key_hash(&ba));
    }
}
