//! The JSON writer of events: straight from the record's attributes into the payload buffer, no
//! intermediate tree, no copy of any string (this is the hot path: one call per record).
//!
//! Invariants: numbers carry exactly the digits the source sent (written as raw JSON text after a
//! grammar check, never through a float); object keys are written sorted (a [`Map`] is kept
//! sorted); strings are escaped byte for byte as `serde_json` escapes them; a value that cannot be
//! represented is written as a string (or `null`) and noted in [`JsonWriter::lossy`].

use base64::Engine as _;

use crate::record::{Map, Origin, Value};

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
pub(super) struct JsonWriter {
    pub(super) out: Vec<u8>,
    pub(super) lossy: Vec<String>,
}

impl JsonWriter {
    pub(super) fn raw(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    /// A JSON string, escaped as `serde_json` escapes it: `"`, `\\` and control characters only.
    pub(super) fn string(&mut self, text: &str) {
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
    pub(super) fn base64(&mut self, blob: &[u8]) {
        let mut text = String::with_capacity(blob.len().div_ceil(3) * 4);
        base64::engine::general_purpose::STANDARD.encode_string(blob, &mut text);
        self.out.push(b'"');
        self.raw(&text);
        self.out.push(b'"');
    }

    pub(super) fn number(&mut self, text: &str) {
        if is_json_number(text) {
            self.raw(text);
        } else {
            // DynamoDB never sends these; if it does, keep the text rather than guess at a value.
            self.lossy.push(format!("number {text:?} is not JSON number syntax; kept as a string"));
            self.string(text);
        }
    }

    /// `[a,b,…]` of `items`, each written by `item`.
    pub(super) fn array<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) {
        self.out.push(b'[');
        for (i, value) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            item(self, value);
        }
        self.out.push(b']');
    }

    pub(super) fn value(&mut self, value: &Value) {
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
            Value::Unknown(what) => self.unknown(what),
        }
    }

    /// A value of a type this version does not know (`what` describes it): `null`, noted as lossy.
    pub(super) fn unknown(&mut self, what: &str) {
        self.lossy.push(format!("attribute type unknown to this version: {what}; written as null"));
        self.raw("null");
    }

    /// An object with its keys sorted, as the seed wrote them (Go sorts map keys; a [`Map`] is kept
    /// sorted).
    pub(super) fn map(&mut self, map: &Map) {
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
    pub(super) fn field(&mut self, name: &str) {
        self.out.push(b',');
        self.string(name);
        self.out.push(b':');
    }

    /// `,"name":true`: one of the flags after an event's other fields.
    pub(super) fn flag(&mut self, name: &str) {
        self.field(name);
        self.raw("true");
    }

    /// The flag naming where a record comes from (none for a record read from the stream).
    pub(super) fn origin(&mut self, origin: Origin) {
        match origin {
            Origin::Stream => {}
            Origin::Snapshot { .. } => self.flag("snapshot"),
            Origin::Replay { .. } => self.flag("replay"),
        }
    }

    pub(super) fn image(&mut self, image: Option<&Map>) {
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

#[cfg(test)]
mod tests {
    use super::*;
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

    pub(super) fn map<const N: usize>(fields: [(&str, Value); N]) -> Map {
        fields.into_iter().map(|(name, value)| (name.to_owned(), value)).collect()
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
    }
}
