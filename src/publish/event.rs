//! One stream record → one event: the JSON wire contract of SPEC §2 and the NATS headers beside it.
//!
//! Invariants kept here: numbers carry exactly the digits DynamoDB sent (they never pass through a
//! float; they are written as raw JSON text after a grammar check), `keys` is never empty, and the
//! message id is the same every time the same record is read again, and unique across tables and
//! shards. A value that cannot be represented is never dropped: it is written as a string and reported
//! in [`Event::lossy`] so the caller can log and count it.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodbstreams::types::{AttributeValue, Record};
use base64::Engine as _;
use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::value::RawValue;

/// A JSON value built from DynamoDB attributes; numbers stay as DynamoDB's exact text.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    String(String),
    /// A JSON number, already checked by [`is_json_number`].
    Number(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(value) => serializer.serialize_bool(*value),
            Json::String(value) => serializer.serialize_str(value),
            Json::Number(digits) => {
                RawValue::from_string(digits.clone()).map_err(serde::ser::Error::custom)?.serialize(serializer)
            }
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, value) in fields {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

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

/// Converts attributes to JSON, noting each value that had to be written in a lossy form.
#[derive(Default)]
struct Converter {
    lossy: Vec<String>,
}

impl Converter {
    fn number(&mut self, text: &str) -> Json {
        if is_json_number(text) {
            return Json::Number(text.to_owned());
        }
        // DynamoDB never sends these; if it does, keep the text rather than guess at a value.
        self.lossy.push(format!("number {text:?} is not JSON number syntax; kept as a string"));
        Json::String(text.to_owned())
    }

    fn value(&mut self, value: &AttributeValue) -> Json {
        let b64 = |blob: &aws_smithy_types::Blob| base64::engine::general_purpose::STANDARD.encode(blob.as_ref());
        match value {
            AttributeValue::S(text) => Json::String(text.clone()),
            AttributeValue::N(text) => self.number(text),
            AttributeValue::Bool(flag) => Json::Bool(*flag),
            AttributeValue::Null(_) => Json::Null,
            AttributeValue::M(map) => self.map(map),
            AttributeValue::L(items) => Json::Array(items.iter().map(|item| self.value(item)).collect()),
            AttributeValue::Ss(items) => Json::Array(items.iter().cloned().map(Json::String).collect()),
            AttributeValue::Ns(items) => Json::Array(items.iter().map(|n| self.number(n)).collect()),
            AttributeValue::B(blob) => Json::String(b64(blob)),
            AttributeValue::Bs(blobs) => Json::Array(blobs.iter().map(|b| Json::String(b64(b))).collect()),
            other => {
                self.lossy.push(format!("attribute type unknown to this version: {other:?}; written as null"));
                Json::Null
            }
        }
    }

    fn map(&mut self, map: &HashMap<String, AttributeValue>) -> Json {
        Json::Object(map.iter().map(|(key, value)| (key.clone(), self.value(value))).collect())
    }

    fn image(&mut self, map: Option<&HashMap<String, AttributeValue>>) -> Option<Json> {
        map.map(|m| self.map(m))
    }
}

/// Why a stream record could not become an event at all (it lacks what the contract requires).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("record has no `dynamodb` section")]
    NoStreamRecord,
    #[error("record has no sequence number")]
    NoSequenceNumber,
}

/// `userIdentity` of a record (TTL deletions are made by `dynamodb.amazonaws.com`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UserIdentity {
    #[serde(rename = "type")]
    pub kind: String,
    pub principal_id: String,
}

/// The event JSON of SPEC §2. Field order is the seed's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    pub event_id: String,
    pub event_name: String,
    pub table_name: String,
    pub sequence_number: String,
    pub approximate_creation_time: String,
    pub keys: Json,
    pub new_image: Option<Json>,
    pub old_image: Option<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_identity: Option<UserIdentity>,
    /// Set on a reduced event: the images were dropped because the full event exceeds the server's
    /// max payload.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub images_omitted: bool,
    /// Values that could not be represented exactly (not part of the JSON).
    #[serde(skip)]
    pub lossy: Vec<String>,
}

impl Event {
    /// Converts one stream record of `table`.
    pub fn from_record(table: &str, record: &Record) -> Result<Event, EventError> {
        let stream = record.dynamodb().ok_or(EventError::NoStreamRecord)?;
        let sequence_number = stream.sequence_number().ok_or(EventError::NoSequenceNumber)?.to_owned();
        let mut convert = Converter::default();
        let new_image = convert.image(stream.new_image.as_ref());
        let old_image = convert.image(stream.old_image.as_ref());
        let keys = match stream.keys.as_ref().filter(|keys| !keys.is_empty()) {
            Some(keys) => convert.map(keys),
            None => {
                convert.lossy.push("record has no Keys; keys left empty".to_owned());
                Json::Object(BTreeMap::new())
            }
        };
        let approximate_creation_time = match stream.approximate_creation_date_time() {
            Some(time) => rfc3339(time),
            None => {
                convert.lossy.push("record has no ApproximateCreationDateTime".to_owned());
                String::new()
            }
        };
        let user_identity = record.user_identity().map(|identity| UserIdentity {
            kind: identity.r#type().unwrap_or_default().to_owned(),
            principal_id: identity.principal_id().unwrap_or_default().to_owned(),
        });
        Ok(Event {
            event_id: record.event_id().unwrap_or_default().to_owned(),
            event_name: record.event_name().map(|name| name.as_str().to_owned()).unwrap_or_default(),
            table_name: table.to_owned(),
            sequence_number,
            approximate_creation_time,
            keys,
            new_image,
            old_image,
            user_identity,
            images_omitted: false,
            lossy: convert.lossy,
        })
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Bytes {
        // Serialising our own tree of strings, numbers checked for syntax and maps cannot fail.
        Bytes::from(
            serde_json::to_vec(self)
                .unwrap_or_else(|err| format!("{{\"serialisation_error\":{:?}}}", err.to_string()).into_bytes()),
        )
    }

    /// The same event without images, for a record whose full JSON exceeds the max payload.
    pub fn reduced(&self) -> Event {
        Event { new_image: None, old_image: None, images_omitted: true, ..self.clone() }
    }
}

/// RFC 3339 in UTC with a `Z`; milliseconds only when non-zero. The SDK parses DynamoDB's epoch
/// seconds through a float (`.715` arrives as `.714999…`), so the time is rounded to the millisecond.
pub fn rfc3339(time: &aws_smithy_types::DateTime) -> String {
    let millis = (time.as_secs_f64() * 1000.0).round() as i64;
    let rounded = aws_smithy_types::DateTime::from_millis(millis);
    let seconds = rounded.secs();
    let fraction = millis.rem_euclid(1000);
    // `Format::DateTime` writes `YYYY-MM-DDTHH:MM:SS[.fff]Z`; rebuild the seconds part ourselves.
    let whole = aws_smithy_types::DateTime::from_secs(seconds)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    if fraction == 0 {
        whole
    } else {
        let mut text = whole.trim_end_matches('Z').to_owned();
        let digits = format!("{fraction:03}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
        text.push('Z');
        text
    }
}

/// The `Nats-Msg-Id` of a record: table, shard and sequence number together, because sequence
/// numbers alone repeat across tables (the seed's collision).
pub fn message_id(table: &str, shard_id: &str, sequence_number: &str) -> String {
    format!("{table}:{shard_id}:{sequence_number}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::types::{Identity, OperationType, StreamRecord};
    use proptest::prelude::*;

    fn key(pk: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([("pk".to_owned(), AttributeValue::S(pk.to_owned()))])
    }

    fn record(name: OperationType, new: Option<HashMap<String, AttributeValue>>) -> Record {
        Record::builder()
            .event_id("e1")
            .event_name(name)
            .dynamodb(
                StreamRecord::builder()
                    .set_keys(Some(key("a")))
                    .set_new_image(new)
                    .sequence_number("000000000000000000001")
                    .approximate_creation_date_time(aws_smithy_types::DateTime::from_secs(1_767_225_600))
                    .build(),
            )
            .build()
    }

    #[test]
    fn seed_shape_for_an_insert() {
        let image = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("a".to_owned())),
            ("n".to_owned(), AttributeValue::N("12345678901234567890123456789012345678".to_owned())),
        ]);
        let event = Event::from_record("my.table", &record(OperationType::Insert, Some(image))).expect("event");
        let json = String::from_utf8(event.to_json().to_vec()).expect("utf8");
        assert_eq!(
            json,
            r#"{"event_id":"e1","event_name":"INSERT","table_name":"my.table","sequence_number":"000000000000000000001","approximate_creation_time":"2026-01-01T00:00:00Z","keys":{"pk":"a"},"new_image":{"n":12345678901234567890123456789012345678,"pk":"a"},"old_image":null}"#
        );
        assert!(event.lossy.is_empty());
    }

    #[test]
    fn ttl_deletion_carries_user_identity() {
        let mut rec = record(OperationType::Remove, None);
        rec.user_identity = Some(Identity::builder().r#type("Service").principal_id("dynamodb.amazonaws.com").build());
        let json = String::from_utf8(Event::from_record("t", &rec).expect("event").to_json().to_vec()).expect("utf8");
        assert!(
            json.ends_with(r#""user_identity":{"type":"Service","principal_id":"dynamodb.amazonaws.com"}}"#),
            "{json}"
        );
    }

    #[test]
    fn reduced_event_drops_images_and_says_so() {
        let event = Event::from_record("t", &record(OperationType::Insert, Some(key("a")))).expect("event");
        let json: serde_json::Value = serde_json::from_slice(&event.reduced().to_json()).expect("json");
        assert_eq!(json["new_image"], serde_json::Value::Null);
        assert_eq!(json["images_omitted"], true);
        assert_eq!(json["keys"]["pk"], "a");
    }

    #[test]
    fn times_are_rfc3339_with_fraction_only_when_non_zero() {
        let t = |secs: f64| rfc3339(&aws_smithy_types::DateTime::from_secs_f64(secs));
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
        let image = HashMap::from([("n".to_owned(), AttributeValue::N("+1".to_owned()))]);
        let event = Event::from_record("t", &record(OperationType::Insert, Some(image))).expect("event");
        assert_eq!(event.lossy.len(), 1);
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).expect("json");
        assert_eq!(json["new_image"]["n"], "+1");
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

    fn attribute() -> impl Strategy<Value = AttributeValue> {
        let leaf = prop_oneof![
            any::<String>().prop_map(AttributeValue::S),
            dynamo_number().prop_map(AttributeValue::N),
            any::<bool>().prop_map(AttributeValue::Bool),
            Just(AttributeValue::Null(true)),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| AttributeValue::B(b.into())),
            proptest::collection::vec(dynamo_number(), 1..4).prop_map(AttributeValue::Ns),
            proptest::collection::vec(any::<String>(), 1..4).prop_map(AttributeValue::Ss),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(AttributeValue::L),
                proptest::collection::hash_map(any::<String>(), inner, 0..6).prop_map(AttributeValue::M),
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
    fn matches(attribute: &AttributeValue, json: &Json) -> bool {
        let b64 = |b: &aws_smithy_types::Blob| base64::engine::general_purpose::STANDARD.encode(b.as_ref());
        match (attribute, json) {
            (AttributeValue::S(s), Json::String(j)) => s == j,
            (AttributeValue::N(n), Json::Number(j)) => n == j,
            (AttributeValue::Bool(b), Json::Bool(j)) => b == j,
            (AttributeValue::Null(_), Json::Null) => true,
            (AttributeValue::B(b), Json::String(j)) => b64(b) == *j,
            (AttributeValue::Ss(s), Json::Array(j)) => {
                s.len() == j.len() && s.iter().zip(j).all(|(s, j)| *j == Json::String(s.clone()))
            }
            (AttributeValue::Ns(n), Json::Array(j)) => {
                n.len() == j.len() && n.iter().zip(j).all(|(n, j)| *j == Json::Number(n.clone()))
            }
            (AttributeValue::L(l), Json::Array(j)) => l.len() == j.len() && l.iter().zip(j).all(|(a, j)| matches(a, j)),
            (AttributeValue::M(m), Json::Object(j)) => {
                m.len() == j.len() && m.iter().all(|(k, a)| j.get(k).is_some_and(|j| matches(a, j)))
            }
            _ => false,
        }
    }

    proptest! {
        /// Every attribute converts to valid JSON that parses back to the same values, with every
        /// number's digits exactly as DynamoDB sent them.
        #[test]
        fn conversion_round_trips(image in proptest::collection::hash_map("[a-z]{1,8}", attribute(), 1..8)) {
            let mut convert = Converter::default();
            let json = convert.map(&image);
            prop_assert!(convert.lossy.is_empty());
            let text = serde_json::to_string(&json).expect("serialise");
            let raw: Box<RawValue> = serde_json::from_str(&text).expect("valid JSON");
            prop_assert!(matches(&AttributeValue::M(image), &parse_exact(&raw)), "{}", text);
        }
    }
}
