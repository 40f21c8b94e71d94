//! One stream record → one event: the JSON wire contract of SPEC §2 and the NATS headers beside it.
//!
//! Invariants kept here: numbers carry exactly the digits DynamoDB sent (they never pass through a
//! float; they are written as raw JSON text after a grammar check), object keys are written sorted
//! (as the seed's Go encoder wrote them), and the message id is the same every time the same record
//! is read again, and unique across tables and shards. A value that cannot be represented is never
//! dropped: it is written as a string (or `null`) and reported in [`Encoded::lossy`] so the caller can
//! log and count it.
//!
//! The JSON itself is written by `json`, straight from the record's attributes.

mod json;
pub mod transcode;
#[cfg(test)]
mod transcode_tests;

use bytes::Bytes;

use crate::record::{ChangeRecord, Map, Origin};
use json::JsonWriter;

/// `userIdentity` of a record (TTL deletions are made by `dynamodb.amazonaws.com`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UserIdentity<'r> {
    pub kind: &'r str,
    pub principal_id: &'r str,
}

/// The event of SPEC §2 for one record, borrowing the record's parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'r> {
    pub event_id: &'r str,
    pub event_name: &'r str,
    pub table_name: &'r str,
    pub sequence_number: &'r str,
    pub approximate_creation_time: String,
    pub keys: Option<&'r Map>,
    pub new_image: Option<&'r Map>,
    pub old_image: Option<&'r Map>,
    pub user_identity: Option<UserIdentity<'r>>,
    /// Set on a reduced event: the images were dropped because the full event exceeds the server's
    /// max payload.
    pub images_omitted: bool,
    /// Set on a lighter event: the old image was dropped because the full event exceeds the server's
    /// max payload (the new image, what a consumer upserts, is kept).
    pub old_image_omitted: bool,
    /// A snapshot row or a replayed change is flagged (`"snapshot": true`, `"replay": true`).
    pub origin: Origin,
    /// What the record itself lacks (keys, creation time): written as empty values and reported.
    problems: Vec<String>,
}

/// The problem noted for a record without keys (its event's `keys` are written as `{}`).
const NO_KEYS: &str = "record has no Keys; keys left empty";
/// The problem noted for a record without a creation time (written as `""`).
const NO_CREATION_TIME: &str = "record has no ApproximateCreationDateTime";

/// An event's JSON, and what in it could not be represented exactly.
#[derive(Debug)]
pub struct Encoded {
    pub payload: Bytes,
    pub lossy: Vec<String>,
    /// The item the event is about: a hash of its `keys` as written (the same primary key gives the
    /// same JSON, keys sorted). Two items may share a hash; that only makes one wait for the other.
    pub item: u64,
    /// Where the `keys` JSON lies in the payload (a snapshot row's message id holds it whole).
    pub keys: std::ops::Range<usize>,
}

/// `approximate_creation_time` of a record created at `created_at` (Unix seconds): RFC 3339, or
/// empty and noted in `lossy` when the record has no creation time.
pub(super) fn creation_time(created_at: Option<f64>, lossy: &mut Vec<String>) -> String {
    match created_at {
        Some(secs) => rfc3339(secs),
        None => {
            lossy.push(NO_CREATION_TIME.to_owned());
            String::new()
        }
    }
}

impl<'r> Event<'r> {
    /// The event of one change record of `table`.
    pub fn from_record(table: &'r str, record: &'r ChangeRecord) -> Event<'r> {
        let mut problems = Vec::new();
        let keys = record.keys.as_ref().filter(|keys| !keys.is_empty());
        if keys.is_none() {
            problems.push(NO_KEYS.to_owned());
        }
        let approximate_creation_time = creation_time(record.created_at, &mut problems);
        Event {
            event_id: &record.event_id,
            event_name: &record.event_name,
            table_name: table,
            sequence_number: &record.sequence_number,
            approximate_creation_time,
            keys,
            new_image: record.new_image.as_ref(),
            old_image: record.old_image.as_ref(),
            user_identity: record
                .user_identity
                .as_ref()
                .map(|identity| UserIdentity { kind: &identity.kind, principal_id: &identity.principal_id }),
            images_omitted: false,
            old_image_omitted: false,
            origin: record.origin,
            problems,
        }
    }

    /// The JSON payload, fields in the seed's order.
    pub fn encode(&self) -> Encoded {
        let images = self.new_image.map_or(0, Map::len) + self.old_image.map_or(0, Map::len);
        let mut w = JsonWriter { out: Vec::with_capacity(256 + 64 * images), lossy: self.problems.clone() };
        w.raw("{\"event_id\":");
        w.string(self.event_id);
        w.field("event_name");
        w.string(self.event_name);
        w.field("table_name");
        w.string(self.table_name);
        w.field("sequence_number");
        w.string(self.sequence_number);
        w.field("approximate_creation_time");
        w.string(&self.approximate_creation_time);
        w.field("keys");
        let keys_start = w.out.len();
        match self.keys {
            Some(keys) => w.map(keys),
            None => w.raw("{}"),
        }
        let keys_end = w.out.len();
        let item = fnv1a(&w.out[keys_start..keys_end]);
        w.field("new_image");
        w.image(self.new_image);
        w.field("old_image");
        w.image(self.old_image);
        if let Some(identity) = self.user_identity {
            w.field("user_identity");
            w.raw("{\"type\":");
            w.string(identity.kind);
            w.raw(",\"principal_id\":");
            w.string(identity.principal_id);
            w.raw("}");
        }
        w.origin(self.origin);
        if self.images_omitted {
            w.flag("images_omitted");
        }
        if self.old_image_omitted {
            w.flag("old_image_omitted");
        }
        w.raw("}");
        Encoded { payload: Bytes::from(w.out), lossy: w.lossy, item, keys: keys_start..keys_end }
    }

    /// The same event without images, for a record whose full JSON exceeds the max payload.
    pub fn reduced(&self) -> Event<'r> {
        Event { new_image: None, old_image: None, images_omitted: true, old_image_omitted: false, ..self.clone() }
    }

    /// The same event without its old image (`None` when it has no old image to drop, or no new image
    /// to keep), the first thing to drop for a record whose full JSON exceeds the max payload.
    pub fn without_old_image(&self) -> Option<Event<'r>> {
        (self.old_image.is_some() && self.new_image.is_some()).then(|| Event {
            old_image: None,
            old_image_omitted: true,
            ..self.clone()
        })
    }
}

/// FNV-1a, 64 bits: a fixed, fast hash of a few bytes (an item's keys).
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

/// RFC 3339 in UTC with a `Z` (`YYYY-MM-DDTHH:MM:SS[.fff]Z`) of `secs` since the Unix epoch;
/// milliseconds only when non-zero. DynamoDB's epoch seconds are parsed through a float (`.715`
/// arrives as `.714999…`), so the time is rounded to the millisecond.
pub fn rfc3339(secs: f64) -> String {
    let millis = (secs * 1000.0).round() as i64;
    let (seconds, fraction) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    // Written digit by digit: once per record, where `format!` was a tenth of the service's CPU.
    let mut text = String::with_capacity(24);
    if (0..=9999).contains(&year) {
        digits(&mut text, year, 4);
    } else {
        // Outside four digits, as `{:04}` writes it: the sign, then at least four digits.
        use std::fmt::Write as _;
        let _ = write!(text, "{year:04}");
    }
    for (separator, value) in [('-', month), ('-', day), ('T', hour), (':', minute), (':', second)] {
        text.push(separator);
        digits(&mut text, value, 2);
    }
    if fraction != 0 {
        text.push('.');
        digits(&mut text, fraction, 3);
        while text.ends_with('0') {
            text.pop();
        }
    }
    text.push('Z');
    text
}

/// `value` (`0..10^width`) as exactly `width` decimal digits.
fn digits(text: &mut String, value: i64, width: u32) {
    for place in (0..width).rev() {
        let digit = (value / 10_i64.pow(place)) % 10;
        text.push(char::from(b'0' + digit as u8));
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// exact for every `i64` day a timestamp can name).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The `Nats-Msg-Id` of a record: table, shard and sequence number together, because sequence
/// numbers alone repeat across tables (the seed's collision). A replayed record adds its backfill
/// epoch (it must be stored again, not deduplicated against its first publish); a snapshot row is
/// named by its epoch and its item's `keys` JSON, whole (a hash could make two items one), so a page
/// read again is deduplicated and a second backfill is not.
pub fn message_id(table: &str, shard_id: &str, sequence_number: &str, origin: Origin, keys_json: &[u8]) -> String {
    match origin {
        Origin::Stream => {
            // Built by hand: once per record, where `format!` showed in the profile.
            let mut id = String::with_capacity(table.len() + shard_id.len() + sequence_number.len() + 2);
            for (at, part) in [table, shard_id, sequence_number].into_iter().enumerate() {
                if at > 0 {
                    id.push(':');
                }
                id.push_str(part);
            }
            id
        }
        Origin::Replay { epoch } => format!("{table}:{shard_id}:{sequence_number}:replay-{epoch}"),
        Origin::Snapshot { epoch } => format!("{table}:snapshot-{epoch}:{}", String::from_utf8_lossy(keys_json)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{UserIdentity as Identity, Value};
    use proptest::prelude::*;

    fn map<const N: usize>(fields: [(&str, Value); N]) -> Map {
        fields.into_iter().map(|(name, value)| (name.to_owned(), value)).collect()
    }

    fn key(pk: &str) -> Map {
        map([("pk", Value::S(pk.to_owned()))])
    }

    fn record(name: &str, new: Option<Map>) -> ChangeRecord {
        ChangeRecord {
            event_id: "e1".to_owned(),
            event_name: name.to_owned(),
            sequence_number: "000000000000000000001".to_owned(),
            created_at: Some(1_767_225_600.0),
            keys: Some(key("a")),
            new_image: new,
            ..ChangeRecord::default()
        }
    }

    #[test]
    fn seed_shape_for_an_insert() {
        let image = map([
            ("pk", Value::S("a".to_owned())),
            ("n", Value::N("12345678901234567890123456789012345678".to_owned())),
        ]);
        let record = record("INSERT", Some(image));
        let encoded = Event::from_record("my.table", &record).encode();
        let json = String::from_utf8(encoded.payload.to_vec()).expect("utf8");
        assert_eq!(
            json,
            r#"{"event_id":"e1","event_name":"INSERT","table_name":"my.table","sequence_number":"000000000000000000001","approximate_creation_time":"2026-01-01T00:00:00Z","keys":{"pk":"a"},"new_image":{"n":12345678901234567890123456789012345678,"pk":"a"},"old_image":null}"#
        );
        assert!(encoded.lossy.is_empty());
    }

    #[test]
    fn ttl_deletion_carries_user_identity() {
        let mut rec = record("REMOVE", None);
        rec.user_identity =
            Some(Identity { kind: "Service".to_owned(), principal_id: "dynamodb.amazonaws.com".to_owned() });
        let json = String::from_utf8(Event::from_record("t", &rec).encode().payload.to_vec()).expect("utf8");
        assert!(
            json.ends_with(r#""user_identity":{"type":"Service","principal_id":"dynamodb.amazonaws.com"}}"#),
            "{json}"
        );
    }

    #[test]
    fn a_lighter_event_drops_only_the_old_image_and_says_so() {
        let mut record = record("MODIFY", Some(key("a")));
        record.old_image = Some(key("old"));
        let event = Event::from_record("t", &record);
        let json: serde_json::Value =
            serde_json::from_slice(&event.without_old_image().expect("has both").encode().payload).expect("json");
        assert_eq!(json["old_image"], serde_json::Value::Null);
        assert!(json["new_image"].is_object());
        assert_eq!(json["old_image_omitted"], true);
        assert_eq!(json.get("images_omitted"), None);
        record.new_image = None;
        assert!(Event::from_record("t", &record).without_old_image().is_none(), "a REMOVE keeps nothing then");
    }

    #[test]
    fn reduced_event_drops_images_and_says_so() {
        let record = record("INSERT", Some(key("a")));
        let event = Event::from_record("t", &record);
        let json: serde_json::Value = serde_json::from_slice(&event.reduced().encode().payload).expect("json");
        assert_eq!(json["new_image"], serde_json::Value::Null);
        assert_eq!(json["images_omitted"], true);
        assert_eq!(json["keys"]["pk"], "a");
    }

    #[test]
    fn times_are_rfc3339_with_fraction_only_when_non_zero() {
        let t = rfc3339;
        assert_eq!(t(1_795_593_789.0), "2026-11-25T08:03:09Z");
        assert_eq!(t(1_795_593_789.67), "2026-11-25T08:03:09.67Z");
        assert_eq!(t(1_795_593_789.715), "2026-11-25T08:03:09.715Z");
        assert_eq!(t(1_795_593_789.999_6), "2026-11-25T08:03:10Z");
    }

    #[test]
    fn unrepresentable_number_is_kept_as_text_and_reported() {
        let record = record("INSERT", Some(map([("n", Value::N("+1".to_owned()))])));
        let encoded = Event::from_record("t", &record).encode();
        assert_eq!(encoded.lossy.len(), 1);
        let json: serde_json::Value = serde_json::from_slice(&encoded.payload).expect("json");
        assert_eq!(json["new_image"]["n"], "+1");
    }

    #[test]
    fn record_without_keys_or_time_is_written_with_empty_values_and_reported() {
        let record = ChangeRecord {
            event_name: "MODIFY".to_owned(),
            sequence_number: "5".to_owned(),
            ..ChangeRecord::default()
        };
        let encoded = Event::from_record("t", &record).encode();
        let json: serde_json::Value = serde_json::from_slice(&encoded.payload).expect("json");
        assert_eq!(json["keys"], serde_json::json!({}));
        assert_eq!(json["approximate_creation_time"], "");
        assert_eq!(encoded.lossy.len(), 2, "{:?}", encoded.lossy);
    }

    #[test]
    fn message_ids_differ_across_tables() {
        let id = |table, origin| message_id(table, "s", "1", origin, b"{}");
        assert_ne!(id("a", Origin::Stream), id("b", Origin::Stream));
        assert_eq!(id("a", Origin::Stream), id("a", Origin::Stream));
        assert_eq!(id("a", Origin::Stream), "a:s:1", "the format consumers may already parse");
        assert_ne!(id("a", Origin::Stream), id("a", Origin::Replay { epoch: 1 }));
        assert_ne!(id("a", Origin::Replay { epoch: 1 }), id("a", Origin::Replay { epoch: 2 }));
    }

    #[test]
    fn a_snapshot_row_is_an_insert_flagged_and_named_by_its_keys() {
        let row = ChangeRecord {
            event_id: "snapshot-7".to_owned(),
            event_name: "INSERT".to_owned(),
            created_at: Some(1_767_225_600.0),
            keys: Some(key("a")),
            new_image: Some(map([("pk", Value::S("a".to_owned())), ("n", Value::N("1".to_owned()))])),
            origin: Origin::Snapshot { epoch: 7 },
            ..ChangeRecord::default()
        };
        let encoded = Event::from_record("t", &row).encode();
        let json = String::from_utf8(encoded.payload.to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"event_id":"snapshot-7","event_name":"INSERT","table_name":"t","sequence_number":"","approximate_creation_time":"2026-01-01T00:00:00Z","keys":{"pk":"a"},"new_image":{"n":1,"pk":"a"},"old_image":null,"snapshot":true}"#
        );
        let keys = &encoded.payload[encoded.keys.clone()];
        assert_eq!(message_id("t", "", "", row.origin, keys), r#"t:snapshot-7:{"pk":"a"}"#);
        let other = message_id("t", "", "", row.origin, br#"{"pk":"b"}"#);
        assert_ne!(message_id("t", "", "", row.origin, keys), other);
    }

    proptest! {
        /// Every attribute converts to valid JSON that parses back to the same values, with every

        /// Written digit by digit, a time reads as `format!` writes it, fractions and years outside
        /// four digits included.
        #[test]
        fn times_are_written_as_format_writes_them(millis in -100_000_000_000_000i64..400_000_000_000_000i64) {
            let secs = millis as f64 / 1000.0;
            let millis = (secs * 1000.0).round() as i64;
            let (seconds, fraction) = (millis.div_euclid(1000), millis.rem_euclid(1000));
            let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
            let (year, month, day) = civil_from_days(days);
            let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
            let mut expected = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
            if fraction != 0 {
                expected.push('.');
                expected.push_str(format!("{fraction:03}").trim_end_matches('0'));
            }
            expected.push('Z');
            prop_assert_eq!(rfc3339(secs), expected);
        }

        /// Times are written as the SDK's own RFC 3339 formatter writes whole seconds, across the
        /// whole range a creation time can take (leap years and centuries included).
        #[test]
        fn times_match_the_sdk_formatter(secs in -62_135_596_800i64..253_402_300_799i64) {
            let expected = aws_smithy_types::DateTime::from_secs(secs)
                .fmt(aws_smithy_types::date_time::Format::DateTime)
                .expect("in range");
            prop_assert_eq!(rfc3339(secs as f64), expected);
        }
    }
}
