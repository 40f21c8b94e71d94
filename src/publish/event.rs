//! One stream record → one event: the JSON wire contract of SPEC §2 and the NATS headers beside it.
//!
//! Invariants kept here: numbers carry exactly the digits DynamoDB sent (they never pass through a
//! float; they are written as raw JSON text after a grammar check), object keys are written sorted
//! (as the seed's Go encoder wrote them), and the message id is the same every time the same record
//! is read again, and unique across tables and shards. A value that cannot be represented is never
//! dropped: it is written as a string (or `null`) and reported in [`Encoded::lossy`] so the caller can
//! log and count it.
//!
//! The JSON is written straight from the record's attributes into the payload buffer: no intermediate
//! tree, no copy of any string (this is the hot path: one call per record).

use base64::Engine as _;
use bytes::Bytes;

use crate::record::{ChangeRecord, Map, Value};

/// The JSON number grammar (RFC 8259 §6): `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
pub fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if bytes.get(i) == Some(&b'-') {
        i += 1;
    }
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == bytes.len()
}

/// Writes JSON into a buffer, noting each value that had to be written in a lossy form.
struct JsonWriter {
    out: Vec<u8>,
    lossy: Vec<String>,
}

impl JsonWriter {
    fn raw(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// A JSON string, escaped as `serde_json` escapes it: `"`, `\\` and control characters only.
    fn string(&mut self, text: &str) {
        let bytes = text.as_bytes();
        self.out.reserve(bytes.len() + 2);
        self.out.push(b'"');
        let mut start = 0;
        while let Some(offset) = first_to_escape(&bytes[start..]) {
            let at = start + offset;
            self.out.extend_from_slice(&bytes[start..at]);
            escape(&mut self.out, bytes[at]);
            start = at + 1;
        }
        self.out.extend_from_slice(&bytes[start..]);
        self.out.push(b'"');
    }

    /// A JSON string of base64 text (whose alphabet needs no escaping).
    fn base64(&mut self, blob: &[u8]) {
        let mut text = String::with_capacity(blob.len().div_ceil(3) * 4);
        base64::engine::general_purpose::STANDARD.encode_string(blob, &mut text);
        self.out.push(b'"');
        self.raw(&text);
        self.out.push(b'"');
    }

    fn number(&mut self, text: &str) {
        if is_json_number(text) {
            self.raw(text);
        } else {
            // DynamoDB never sends these; if it does, keep the text rather than guess at a value.
            self.lossy.push(format!("number {text:?} is not JSON number syntax; kept as a string"));
            self.string(text);
        }
    }

    /// `[a,b,…]` of `items`, each written by `item`.
    fn array<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.out.push(b'[');
        for (i, value) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            item(self, value);
        }
        self.out.push(b']');
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::S(text) => self.string(text),
            Value::N(text) => self.number(text),
            Value::Bool(flag) => self.raw(if *flag { "true" } else { "false" }),
            Value::Null => self.raw("null"),
            Value::M(map) => self.map(map),
            Value::L(items) => self.array(items, |w, item| w.value(item)),
            Value::Ss(items) => self.array(items, |w, item| w.string(item)),
            Value::Ns(items) => self.array(items, |w, item| w.number(item)),
            Value::B(blob) => self.base64(blob),
            Value::Bs(blobs) => self.array(blobs, |w, blob| w.base64(blob)),
            Value::Unknown(what) => {
                self.lossy.push(format!("attribute type unknown to this version: {what}; written as null"));
                self.raw("null");
            }
        }
    }

    /// An object with its keys sorted, as the seed wrote them (Go sorts map keys; a [`Map`] is kept
    /// sorted).
    fn map(&mut self, map: &Map) {
        self.out.push(b'{');
        for (i, (key, value)) in map.fields().iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.string(key);
            self.out.push(b':');
            self.value(value);
        }
        self.out.push(b'}');
    }

    /// `,"name":` before the field `name`.
    fn field(&mut self, name: &str) {
        self.out.push(b',');
        self.string(name);
        self.out.push(b':');
    }

    fn image(&mut self, image: Option<&Map>) {
        match image {
            Some(map) => self.map(map),
            None => self.raw("null"),
        }
    }
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// The index of the first byte of `bytes` a JSON string must escape. Eight bytes at a time: string
/// attributes are most of an event, and they rarely hold anything to escape.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // Whether some byte of `word` is below `n` (exact for n <= 128); a zero byte is one below 1.
    let any_below = |word: u64, n: u64| word.wrapping_sub(ONES * n) & !word & HIGH_BITS != 0;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let suspect = any_below(word, 0x20)
            || any_below(word ^ (ONES * u64::from(b'"')), 1)
            || any_below(word ^ (ONES * u64::from(b'\\')), 1);
        if suspect && let Some(i) = chunk.iter().position(|&byte| needs_escape(byte)) {
            return Some(offset + i);
        }
        offset += 8;
    }
    chunks.remainder().iter().position(|&byte| needs_escape(byte)).map(|i| offset + i)
}

/// Writes the escape of one byte [`needs_escape`] chose (lower-case hex, as `serde_json` writes).
fn escape(out: &mut Vec<u8>, byte: u8) {
    let short = match byte {
        b'"' => b'"',
        b'\\' => b'\\',
        0x08 => b'b',
        0x0c => b'f',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
            return;
        }
    };
    out.push(b'\\');
    out.push(short);
}

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
    /// What the record itself lacks (keys, creation time): written as empty values and reported.
    problems: Vec<String>,
}

/// An event's JSON, and what in it could not be represented exactly.
#[derive(Debug)]
pub struct Encoded {
    pub payload: Bytes,
    pub lossy: Vec<String>,
    /// The item the event is about: a hash of its `keys` as written (the same primary key gives the
    /// same JSON, keys sorted). Two items may share a hash; that only makes one wait for the other.
    pub item: u64,
}

impl<'r> Event<'r> {
    /// The event of one change record of `table`.
    pub fn from_record(table: &'r str, record: &'r ChangeRecord) -> Event<'r> {
        let mut problems = Vec::new();
        let keys = record.keys.as_ref().filter(|keys| !keys.is_empty());
        if keys.is_none() {
            problems.push("record has no Keys; keys left empty".to_owned());
        }
        let approximate_creation_time = match record.created_at {
            Some(time) => rfc3339(time),
            None => {
                problems.push("record has no ApproximateCreationDateTime".to_owned());
                String::new()
            }
        };
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
        let item = fnv1a(&w.out[keys_start..]);
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
        if self.images_omitted {
            w.field("images_omitted");
            w.raw("true");
        }
        w.raw("}");
        Encoded { payload: Bytes::from(w.out), lossy: w.lossy, item }
    }

    /// The same event without images, for a record whose full JSON exceeds the max payload.
    pub fn reduced(&self) -> Event<'r> {
        Event { new_image: None, old_image: None, images_omitted: true, ..self.clone() }
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
    let mut text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
    if fraction != 0 {
        let digits = format!("{fraction:03}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push('Z');
    text
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
/// numbers alone repeat across tables (the seed's collision).
pub fn message_id(table: &str, shard_id: &str, sequence_number: &str) -> String {
    format!("{table}:{shard_id}:{sequence_number}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::UserIdentity as Identity;
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;

    /// JSON parsed back with every number's text kept.
    #[derive(Debug, PartialEq)]
    enum Json {
        Null,
        Bool(bool),
        String(String),
        Number(String),
        Array(Vec<Json>),
        Object(BTreeMap<String, Json>),
    }

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
    fn json_number_grammar() {
        for ok in ["0", "-0", "1", "-1.5", "1E+130", "1e-130", "12345678901234567890123456789012345678"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "+1", ".5", "1.", "01", "1e", "NaN", "Infinity", "1 ", "0x1"] {
            assert!(!is_json_number(bad), "{bad}");
        }
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
    fn object_keys_are_written_sorted_at_every_depth() {
        let inner = map([
            ("z", Value::Bool(true)),
            ("a", Value::Null),
            ("m", Value::Ns(vec!["1".to_owned(), "-2.5E+3".to_owned()])),
        ]);
        let image = map([
            ("pk", Value::S("a\"b".to_owned())),
            ("b", Value::M(inner)),
            ("bin", Value::B(b"hi".to_vec())),
            ("L", Value::L(vec![Value::Ss(vec!["x".to_owned()])])),
        ]);
        let mut writer = JsonWriter { out: Vec::new(), lossy: Vec::new() };
        writer.map(&image);
        assert_eq!(
            String::from_utf8(writer.out).expect("utf8"),
            r#"{"L":[["x"]],"b":{"a":null,"m":[1,-2.5E+3],"z":true},"bin":"aGk=","pk":"a\"b"}"#
        );
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
        assert_ne!(message_id("a", "s", "1"), message_id("b", "s", "1"));
        assert_eq!(message_id("a", "s", "1"), message_id("a", "s", "1"));
    }

    /// DynamoDB numbers: up to 38 significant digits, optional sign, fraction and exponent.
    fn dynamo_number() -> impl Strategy<Value = String> {
        ("-?", "(0|[1-9][0-9]{0,37})", proptest::option::of("[0-9]{1,20}"), proptest::option::of(-130i32..126))
            .prop_map(|(sign, int, frac, exp)| {
                let mut text = format!("{sign}{int}");
                if let Some(frac) = frac {
                    text.push('.');
                    text.push_str(&frac);
                }
                if let Some(exp) = exp {
                    text.push_str(&format!("E{exp:+}"));
                }
                text
            })
    }

    fn attribute() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<String>().prop_map(Value::S),
            dynamo_number().prop_map(Value::N),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::B),
            proptest::collection::vec(dynamo_number(), 1..4).prop_map(Value::Ns),
            proptest::collection::vec(any::<String>(), 1..4).prop_map(Value::Ss),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::L),
                proptest::collection::hash_map(any::<String>(), inner, 0..6)
                    .prop_map(|fields| Value::M(fields.into_iter().collect())),
            ]
        })
    }

    /// Parses JSON back into [`Json`] keeping every number's text, through `RawValue`.
    fn parse_exact(raw: &RawValue) -> Json {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'{') => {
                let fields: BTreeMap<String, Box<RawValue>> = serde_json::from_str(text).expect("object");
                Json::Object(fields.into_iter().map(|(k, v)| (k, parse_exact(&v))).collect())
            }
            Some(b'[') => {
                let items: Vec<Box<RawValue>> = serde_json::from_str(text).expect("array");
                Json::Array(items.iter().map(|v| parse_exact(v)).collect())
            }
            Some(b'"') => Json::String(serde_json::from_str(text).expect("string")),
            Some(b't' | b'f') => Json::Bool(text == "true"),
            Some(b'n') => Json::Null,
            _ => Json::Number(text.to_owned()),
        }
    }

    /// Checks JSON parsed back against the attribute it came from; numbers compared as text.
    fn matches(attribute: &Value, json: &Json) -> bool {
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        match (attribute, json) {
            (Value::S(s), Json::String(j)) => s == j,
            (Value::N(n), Json::Number(j)) => n == j,
            (Value::Bool(b), Json::Bool(j)) => b == j,
            (Value::Null, Json::Null) => true,
            (Value::B(b), Json::String(j)) => b64(b) == *j,
            (Value::Ss(s), Json::Array(j)) => {
                s.len() == j.len() && s.iter().zip(j).all(|(s, j)| *j == Json::String(s.clone()))
            }
            (Value::Ns(n), Json::Array(j)) => {
                n.len() == j.len() && n.iter().zip(j).all(|(n, j)| *j == Json::Number(n.clone()))
            }
            (Value::L(l), Json::Array(j)) => l.len() == j.len() && l.iter().zip(j).all(|(a, j)| matches(a, j)),
            (Value::M(m), Json::Object(j)) => {
                m.len() == j.len() && m.fields().iter().all(|(k, a)| j.get(k).is_some_and(|j| matches(a, j)))
            }
            _ => false,
        }
    }

    proptest! {
        /// Strings are escaped byte for byte as `serde_json` escapes them, wherever the characters
        /// to escape fall relative to the eight-byte steps.
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(
            text in proptest::string::string_regex("(\\PC|[\\x00-\\x1f\"\\\\\\x7f]|[a-z]{7,20}){0,40}").expect("regex")
        ) {
            let mut writer = JsonWriter { out: Vec::new(), lossy: Vec::new() };
            writer.string(&text);
            prop_assert_eq!(String::from_utf8(writer.out).expect("utf8"), serde_json::to_string(&text).expect("json"));
        }

        /// Every attribute converts to valid JSON that parses back to the same values, with every
        /// number's digits exactly as DynamoDB sent them.
        #[test]
        fn conversion_round_trips(image in proptest::collection::hash_map("[a-z]{1,8}", attribute(), 1..8)) {
            let image: Map = image.into_iter().collect();
            let mut writer = JsonWriter { out: Vec::new(), lossy: Vec::new() };
            writer.map(&image);
            prop_assert!(writer.lossy.is_empty());
            let text = String::from_utf8(writer.out).expect("utf8");
            let raw: Box<RawValue> = serde_json::from_str(&text).expect("valid JSON");
            prop_assert!(matches(&Value::M(image), &parse_exact(&raw)), "{}", text);
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
