//! The transcoder against the SDK path: arbitrary `GetRecords` bodies, written as DynamoDB Streams
//! sends them (with varied escaping, spacing and member order), are read by the real SDK (its
//! deserializer, through an HTTP client that answers with the body) and converted and written as the
//! service did before, and transcoded: every event must come out byte for byte the same, and a body
//! one side refuses must be refused by the other.

use std::fmt::Write as _;

use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use base64::Engine as _;
use proptest::prelude::*;

use super::Event;
use super::transcode::{TranscodedPage, transcode};
use crate::record::{ChangeRecord, Origin, Unusable};
use crate::source::convert;

/// An HTTP client that answers every request with 200 and `body`.
#[derive(Debug, Clone)]
struct Canned(bytes::Bytes);

impl HttpConnector for Canned {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let status = aws_smithy_runtime_api::http::StatusCode::try_from(200).expect("a status");
        let response = aws_smithy_runtime_api::http::Response::new(status, SdkBody::from(self.0.clone()));
        HttpConnectorFuture::ready(Ok(response))
    }
}

impl HttpClient for Canned {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

/// The records of a page as the SDK path converts them, and the next iterator.
type SdkPage = (Vec<Result<ChangeRecord, Unusable>>, Option<String>);

/// What the SDK path makes of `body`: its records converted, or its error.
fn sdk_path(runtime: &tokio::runtime::Runtime, body: &str) -> Result<SdkPage, String> {
    let config = aws_sdk_dynamodbstreams::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .http_client(Canned(bytes::Bytes::from(body.to_owned())))
        .build();
    let client = aws_sdk_dynamodbstreams::Client::from_conf(config);
    let output = runtime
        .block_on(client.get_records().shard_iterator("iterator").send())
        .map_err(|err| format!("{}", aws_smithy_types::error::display::DisplayErrorContext(err)))?;
    let records = output.records.unwrap_or_default().into_iter().map(convert::change_record).collect();
    Ok((records, output.next_shard_iterator))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

/// Checks the transcoder against the SDK path on `body`; the error of the one that refused it, if
/// both did.
fn compare(runtime: &tokio::runtime::Runtime, body: &str) -> Result<Option<String>, TestCaseError> {
    let theirs = sdk_path(runtime, body);
    let ours = transcode(body.as_bytes());
    let (records, next_iterator, page) = match (theirs, ours) {
        (Ok((records, next)), Ok(page)) => (records, next, page),
        (Err(theirs), Err(ours)) => return Ok(Some(format!("{ours} / {theirs}"))),
        (theirs, ours) => {
            return Err(TestCaseError::fail(format!(
                "SDK {:?} but transcoder {:?} on {body}",
                theirs.err(),
                ours.err()
            )));
        }
    };
    let TranscodedPage { events, unusable, next_iterator: ours_next } = page;
    prop_assert_eq!(ours_next, next_iterator);
    let (usable, theirs_unusable): (Vec<_>, Vec<_>) = records.into_iter().partition(Result::is_ok);
    let theirs_unusable: Vec<Unusable> = theirs_unusable.into_iter().filter_map(Result::err).collect();
    prop_assert_eq!(unusable, theirs_unusable);
    prop_assert_eq!(events.len(), usable.len());
    for (ours, theirs) in events.iter().zip(usable.into_iter().filter_map(Result::ok)) {
        prop_assert_eq!(&ours.sequence_number, &theirs.sequence_number);
        prop_assert_eq!(&ours.event_name, &theirs.event_name);
        prop_assert_eq!(ours.created_at.map(f64::to_bits), theirs.created_at.map(f64::to_bits));
        prop_assert_eq!(ours.size_bytes, theirs.size_bytes);
        for (table, origin) in [("table", Origin::Stream), ("t\u{e9}\"\\/", Origin::Replay { epoch: 3 })] {
            let mut theirs = theirs.clone();
            theirs.origin = origin;
            let event = Event::from_record(table, &theirs);
            let (expected, written) = (event.encode(), ours.encode(table, origin));
            prop_assert_eq!(text(&written.payload), text(&expected.payload));
            prop_assert_eq!(&written.lossy, &expected.lossy);
            prop_assert_eq!(written.item, expected.item);
            prop_assert_eq!(&written.payload[written.keys.clone()], &expected.payload[expected.keys.clone()]);
            prop_assert_eq!(ours.keys_json(), &expected.payload[expected.keys.clone()]);
            let lighter = event.without_old_image().map(|event| text(&event.encode().payload));
            prop_assert_eq!(ours.without_old_image(table, origin).map(|payload| text(&payload)), lighter);
            prop_assert_eq!(text(&ours.reduced(table, origin)), text(&event.reduced().encode().payload));
        }
    }
    Ok(None)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An attribute value as DynamoDB sends it.
#[derive(Debug, Clone)]
enum Attr {
    S(String),
    N(String),
    B(Vec<u8>),
    Ss(Vec<String>),
    Ns(Vec<String>),
    Bs(Vec<Vec<u8>>),
    M(Vec<(String, Attr)>),
    L(Vec<Attr>),
    Null,
    Bool(bool),
    /// A member this SDK does not know.
    Unknown,
}

#[derive(Debug, Clone)]
struct WireRecord {
    event_id: Option<String>,
    event_name: Option<String>,
    dynamodb: Option<WireStream>,
    identity: Option<(Option<String>, Option<String>)>,
}

#[derive(Debug, Clone)]
struct WireStream {
    time: Option<String>,
    keys: Option<Vec<(String, Attr)>>,
    new_image: Option<Vec<(String, Attr)>>,
    old_image: Option<Vec<(String, Attr)>>,
    sequence_number: Option<String>,
    size_bytes: Option<String>,
}

/// Text with what JSON must escape, what it may, and characters outside the BMP.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::string::string_regex("(\\PC|[\\x00-\\x1f\"\\\\/\\x7f\u{e9}\u{2028}\u{1F600}]|[a-z]{1,8}){0,12}").expect("regex"),
        1 => any::<String>(),
    ]
}

/// Field names: short ones (so a map sometimes names a field twice) and arbitrary text.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-dA-D_]{1,2}", 1 => any_text()]
}

/// DynamoDB numbers (up to 38 digits, sign, fraction, exponent), and rarely text that is none.
fn number() -> impl Strategy<Value = String> {
    let json = ("-?", "(0|[1-9][0-9]{0,37})", proptest::option::of("[0-9]{1,20}"), proptest::option::of(-130i32..126))
        .prop_map(|(sign, int, frac, exp)| {
            let mut text = format!("{sign}{int}");
            if let Some(frac) = frac {
                write!(text, ".{frac}").expect("a string");
            }
            if let Some(exp) = exp {
                write!(text, "E{exp:+}").expect("a string");
            }
            text
        });
    prop_oneof![20 => json, 1 => Just("+1".to_owned()), 1 => Just(".5".to_owned()), 1 => Just("1e".to_owned())]
}

fn attr() -> impl Strategy<Value = Attr> {
    let blob = proptest::collection::vec(any::<u8>(), 0..24);
    let leaf = prop_oneof![
        4 => any_text().prop_map(Attr::S),
        4 => number().prop_map(Attr::N),
        1 => any::<bool>().prop_map(Attr::Bool),
        1 => Just(Attr::Null),
        2 => blob.clone().prop_map(Attr::B),
        1 => proptest::collection::vec(number(), 0..4).prop_map(Attr::Ns),
        1 => proptest::collection::vec(any_text(), 0..4).prop_map(Attr::Ss),
        1 => proptest::collection::vec(blob, 0..3).prop_map(Attr::Bs),
        1 => Just(Attr::Unknown),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Attr::L),
            proptest::collection::vec((name(), inner), 0..5).prop_map(Attr::M),
        ]
    })
}

fn image() -> impl Strategy<Value = Option<Vec<(String, Attr)>>> {
    proptest::option::weighted(0.8, proptest::collection::vec((name(), attr()), 0..6))
}

/// Epoch seconds as DynamoDB and moto send them: whole, with a fraction, or in exponent form.
fn time() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..4_000_000_000).prop_map(|secs| secs.to_string()),
        (0u64..4_000_000_000, "[0-9]{1,3}").prop_map(|(secs, frac)| format!("{secs}.{frac}")),
        (0u64..4_000_000_000_000).prop_map(|millis| format!("{:e}", millis as f64 / 1000.0)),
    ]
}

fn record() -> impl Strategy<Value = WireRecord> {
    let stream = (
        proptest::option::weighted(0.9, time()),
        image(),
        image(),
        image(),
        proptest::option::weighted(0.95, "[0-9]{1,30}"),
        proptest::option::of(prop_oneof![(0i64..400_000).prop_map(|n| n.to_string()), Just("12.0".to_owned())]),
    )
        .prop_map(|(time, keys, new_image, old_image, sequence_number, size_bytes)| WireStream {
            time,
            keys,
            new_image,
            old_image,
            sequence_number,
            size_bytes,
        });
    let event_name =
        prop_oneof![Just("INSERT".to_owned()), Just("MODIFY".to_owned()), Just("REMOVE".to_owned()), any_text()];
    (
        proptest::option::weighted(0.95, "[0-9a-f]{32}"),
        proptest::option::weighted(0.95, event_name),
        proptest::option::weighted(0.95, stream),
        proptest::option::weighted(0.3, (proptest::option::of(any_text()), proptest::option::of(any_text()))),
    )
        .prop_map(|(event_id, event_name, dynamodb, identity)| WireRecord {
            event_id,
            event_name,
            dynamodb,
            identity,
        })
}

/// A JSON writer that varies what JSON leaves free: escapes, spacing, member order.
struct Wire(u64);

impl Wire {
    /// xorshift64*: choices from the case's seed.
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn space(&mut self) -> &'static str {
        match self.next() % 16 {
            0 => " ",
            1 => "\n  ",
            _ => "",
        }
    }

    fn string(&mut self, text: &str) -> String {
        let mut out = String::from("\"");
        let upper = self.chance(50);
        let unicode = |out: &mut String, unit: u16| {
            if upper {
                write!(out, "\\u{unit:04X}").expect("a string");
            } else {
                write!(out, "\\u{unit:04x}").expect("a string");
            }
        };
        for c in text.chars() {
            let short = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '/' if self.chance(50) => Some("\\/"),
                _ => None,
            };
            let must = c < ' ' || c == '"' || c == '\\';
            match short {
                Some(escape) if !must || self.chance(70) => out.push_str(escape),
                _ if must || self.chance(15) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        unicode(&mut out, *unit);
                    }
                }
                _ => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// An object of `members` (names unescaped, values written), in a shuffled order.
    fn object(&mut self, mut members: Vec<(String, String)>) -> String {
        for i in (1..members.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            members.swap(i, j);
        }
        let mut out = String::from("{");
        for (i, (name, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let (before, after) = (self.space(), self.space());
            out.push_str(before);
            out.push_str(&self.string(name));
            out.push_str(after);
            out.push(':');
            out.push_str(value);
        }
        out.push('}');
        out
    }

    /// A map whose members keep their order (a repeated name keeps its last value on both paths).
    fn ordered(&mut self, members: Vec<(String, String)>) -> String {
        let fields: Vec<String> =
            members.iter().map(|(name, value)| format!("{}:{value}", self.string(name))).collect();
        format!("{{{}}}", fields.join(","))
    }

    fn array(&mut self, items: Vec<String>) -> String {
        let space = self.space();
        format!("[{space}{}]", items.join(","))
    }

    fn blob(&mut self, blob: &[u8]) -> String {
        format!("\"{}\"", base64::engine::general_purpose::STANDARD.encode(blob))
    }

    fn attr(&mut self, attr: &Attr) -> String {
        let (member, value) = match attr {
            Attr::S(text) => ("S", self.string(text)),
            Attr::N(text) => ("N", self.string(text)),
            Attr::B(blob) => ("B", self.blob(blob)),
            Attr::Ss(texts) => ("SS", texts.iter().map(|text| self.string(text)).collect::<Vec<_>>().join(",")),
            Attr::Ns(texts) => ("NS", texts.iter().map(|text| self.string(text)).collect::<Vec<_>>().join(",")),
            Attr::Bs(blobs) => ("BS", blobs.iter().map(|blob| self.blob(blob)).collect::<Vec<_>>().join(",")),
            Attr::M(fields) => ("M", self.map(fields)),
            Attr::L(items) => ("L", items.iter().map(|item| self.attr(item)).collect::<Vec<_>>().join(",")),
            Attr::Null => ("NULL", "true".to_owned()),
            Attr::Bool(flag) => ("BOOL", flag.to_string()),
            Attr::Unknown => ("Q", "{\"x\":[1,{\"y\":null}]}".to_owned()),
        };
        let value = if matches!(attr, Attr::Ss(_) | Attr::Ns(_) | Attr::Bs(_) | Attr::L(_)) {
            format!("[{value}]")
        } else {
            value
        };
        let mut members = vec![(member.to_owned(), value)];
        // Members the SDK skips: `null` ones and `__type`.
        if self.chance(5) {
            members.push(("N".to_owned(), "null".to_owned()));
        }
        if self.chance(5) {
            members.push(("__type".to_owned(), "\"x\"".to_owned()));
        }
        self.object(members)
    }

    fn map(&mut self, fields: &[(String, Attr)]) -> String {
        let members = fields.iter().map(|(name, attr)| (name.clone(), self.attr(attr))).collect();
        self.ordered(members)
    }

    fn record(&mut self, record: &WireRecord) -> String {
        let mut members = vec![
            ("eventVersion".to_owned(), "\"1.1\"".to_owned()),
            ("eventSource".to_owned(), "\"aws:dynamodb\"".to_owned()),
            ("awsRegion".to_owned(), "\"us-east-1\"".to_owned()),
        ];
        if let Some(id) = &record.event_id {
            members.push(("eventID".to_owned(), self.string(id)));
        }
        if let Some(name) = &record.event_name {
            members.push(("eventName".to_owned(), self.string(name)));
        }
        if let Some(stream) = &record.dynamodb {
            let mut fields = vec![("StreamViewType".to_owned(), "\"NEW_AND_OLD_IMAGES\"".to_owned())];
            if let Some(time) = &stream.time {
                fields.push(("ApproximateCreationDateTime".to_owned(), time.clone()));
            }
            for (name, image) in
                [("Keys", &stream.keys), ("NewImage", &stream.new_image), ("OldImage", &stream.old_image)]
            {
                if let Some(image) = image {
                    let value = self.map(image);
                    fields.push((name.to_owned(), value));
                }
            }
            if let Some(sequence_number) = &stream.sequence_number {
                fields.push(("SequenceNumber".to_owned(), self.string(sequence_number)));
            }
            if let Some(size) = &stream.size_bytes {
                fields.push(("SizeBytes".to_owned(), size.clone()));
            }
            let value = self.object(fields);
            members.push(("dynamodb".to_owned(), value));
        }
        if let Some((kind, principal)) = &record.identity {
            let mut fields = Vec::new();
            if let Some(kind) = kind {
                fields.push(("Type".to_owned(), self.string(kind)));
            }
            if let Some(principal) = principal {
                fields.push(("PrincipalId".to_owned(), self.string(principal)));
            }
            let value = self.object(fields);
            members.push(("userIdentity".to_owned(), value));
        }
        self.object(members)
    }

    fn body(&mut self, records: &[WireRecord], next: Option<&str>) -> String {
        let records = records.iter().map(|record| self.record(record)).collect();
        let mut members = vec![("Records".to_owned(), self.array(records))];
        members.push(("NextShardIterator".to_owned(), next.map_or("null".to_owned(), |next| self.string(next))));
        self.object(members)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every event the transcoder writes is the one the SDK path writes, byte for byte: full, as a
    /// replay, without its old image, without images; with the same lossy notes, item hash,
    /// sequence number, creation time and size; unusable records reported alike.
    #[test]
    fn transcoded_events_are_the_sdk_paths(
        records in proptest::collection::vec(record(), 0..5),
        next in proptest::option::weighted(0.9, "[A-Za-z0-9/+=|:-]{1,40}"),
        seed in any::<u64>(),
    ) {
        let body = Wire(seed | 1).body(&records, next.as_deref());
        let refused = compare(&runtime(), &body)?;
        // Only non-JSON numbers in the wrong place could make either refuse; the generator makes none.
        prop_assert_eq!(refused, None, "{}", body);
    }
}

/// Checks one body on both paths; the errors when both refuse it.
fn both(body: &str) -> Option<String> {
    match compare(&runtime(), body) {
        Ok(refused) => refused,
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn malformed_bodies_are_refused_by_both_paths_with_a_clear_error() {
    let cases = [
        "not json",
        "{\"Records\":[",
        "{\"Records\":{}}",
        "{\"Records\":[null]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"S\":\"a\",\"N\":\"1\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":null}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"L\":[null]}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"SS\":[\"a\",null]}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"N\":5}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"B\":\"aGk\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"B\":\"aGl=\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"B\":\"a\\/8=\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":1}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"ApproximateCreationDateTime\":\"x\"}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"ApproximateCreationDateTime\":1e400}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"SizeBytes\":1.5}}]}",
        "{\"Records\":[]} trailing",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"Z\":1,\"z\":{\"Q\":[]}}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"S\":\"a\",\"z\":2}}}}]}",
    ];
    for body in cases {
        let refused = both(body);
        assert!(refused.is_some(), "both paths accepted {body}");
        let error = transcode(body.as_bytes()).expect_err("refused").to_string();
        assert!(error.starts_with("GetRecords response body cannot be read: "), "{error}");
    }
}

#[test]
fn odd_but_valid_bodies_read_alike_on_both_paths() {
    let cases = [
        "",
        "{}",
        "{\"Records\":null,\"NextShardIterator\":null}",
        "{\"Records\":[{\"eventID\":\"e\"}],\"NextShardIterator\":\"n\"}",
        "{\"Records\":[{\"eventID\":\"e\",\"dynamodb\":{}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"S\":\"a\"},\"k\":{\"N\":\"2\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"NULL\":false,\"__type\":\"x\"}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"Keys\":{\"k\":{\"z\":{\"Q\":[]}},\"j\":{\"Z\":3}}}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"ApproximateCreationDateTime\":-1.5,\"SizeBytes\":-0}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"ApproximateCreationDateTime\":18446744073709551616}}]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\"}}],\"Records\":[]}",
        "{\"Records\":[{\"dynamodb\":{\"SequenceNumber\":\"1\",\"NewImage\":{},\"OldImage\":null,\"Keys\":{}}}]}",
    ];
    for body in cases {
        assert_eq!(both(body), None, "{body}");
    }
}

#[test]
fn an_unusable_record_is_reported_with_its_event_id() {
    let page = transcode(br#"{"Records":[{"eventID":"e\u0031"},{"dynamodb":{}}]}"#).expect("readable");
    assert!(page.events.is_empty());
    assert_eq!(
        page.unusable,
        [
            Unusable { reason: "record has no `dynamodb` section", event_id: Some("e1".to_owned()) },
            Unusable { reason: "record has no sequence number", event_id: None },
        ]
    );
}
