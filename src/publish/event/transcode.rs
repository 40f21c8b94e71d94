//! A `GetRecords` response body (DynamoDB Streams' JSON wire format) → the events of its records, in
//! one pass over the bytes (issue 19): no SDK record, no attribute map, no `String` per attribute.
//! Strings are borrowed from the body (copied only when they hold escapes), each value is written
//! as event JSON the moment it is parsed, and a map's fields are put in name order by moving their
//! written bytes (one reusable list of (name, span) for all maps of a page).
//!
//! Invariant: for every body the SDK reads, the events are byte for byte those of the SDK path (its
//! record → `source::convert::change_record` → [`super::Event`]), and a body the SDK refuses is
//! refused here too. Each value goes through the writer the SDK path uses, after the same decoding
//! the SDK does: strings are unescaped and escaped again, `B` is decoded from its text as sent and
//! encoded again, `ApproximateCreationDateTime` goes through the SDK's own number and `DateTime`
//! arithmetic. The property tests (`transcode_tests`) pin this against the real SDK deserializer.
//!
//! An event is kept written but for the table name and the flags after its images, so that it can
//! be completed for any table, as a replay, or without its old image or both images (an event over
//! the max payload) without being parsed again.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use aws_smithy_types::Number;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::json::JsonWriter;
use super::{Encoded, NO_KEYS, creation_time, fnv1a};
use crate::record::{Origin, Unusable};

/// A body that is not a `GetRecords` response as the SDK reads it: not JSON, or a value of the
/// wrong type or shape (the SDK refuses the same bodies).
#[derive(Debug, thiserror::Error)]
#[error("GetRecords response body cannot be read: {0}")]
pub struct MalformedBody(#[from] serde_json::Error);

/// The records of one `GetRecords` response, their events written.
#[derive(Debug, Default)]
pub struct TranscodedPage {
    pub events: Vec<StreamEvent>,
    /// Records without their `dynamodb` section or sequence number, as `convert::change_record`
    /// reports them.
    pub unusable: Vec<Unusable>,
    pub next_iterator: Option<String>,
}

/// One stream record's event, written but for its table name and the flags after its images.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// `INSERT`, `MODIFY` or `REMOVE` as sent (a header beside the event).
    pub event_name: String,
    /// The record's place in its shard, as sent.
    pub sequence_number: String,
    /// `ApproximateCreationDateTime`, seconds since the Unix epoch, as the SDK reads it.
    pub created_at: Option<f64>,
    /// `SizeBytes`.
    pub size_bytes: Option<i64>,
    /// What the record lacks and the values written in a lossy form, in the order the SDK path
    /// reports them.
    pub lossy: Vec<String>,
    /// `{"event_id":…,"event_name":…,"table_name":` then, from `table_at`, `,"sequence_number":…`
    /// up to the last field before the flags (no closing brace).
    json: Vec<u8>,
    table_at: usize,
    keys: Range<usize>,
    new_image: Option<Range<usize>>,
    old_image: Option<Range<usize>>,
    /// The hash of the `keys` JSON ([`Encoded::item`]).
    item: u64,
    /// A REMOVE whose `userIdentity` is DynamoDB's TTL (`Service`, `dynamodb.amazonaws.com`).
    ttl_delete: bool,
    /// Written with `"ttl_delete": true` after its origin flags (a table's `ttl_deletes: flag`).
    flag_ttl_delete: bool,
}

impl StreamEvent {
    /// The full event of this record in `table`, as [`super::Event::encode`] writes it.
    pub fn encode(&self, table: &str, origin: Origin) -> Encoded {
        self.full(table, origin).0
    }

    /// The full event and where its images lie in it: the record itself is no longer needed, since
    /// its lighter forms are cut from the event's own bytes ([`Lighter`]).
    pub fn full(&self, table: &str, origin: Origin) -> (Encoded, Lighter) {
        let mut w = JsonWriter { out: Vec::with_capacity(self.json.len() + table.len() + 24), lossy: Vec::new() };
        w.out.extend_from_slice(&self.json[..self.table_at]);
        w.string(table);
        let shift = w.out.len() - self.table_at;
        w.out.extend_from_slice(&self.json[self.table_at..]);
        w.origin(origin);
        if self.flag_ttl_delete {
            w.flag("ttl_delete");
        }
        w.raw("}");
        let moved = |range: &Range<usize>| range.start + shift..range.end + shift;
        let lighter =
            Lighter { new_image: self.new_image.as_ref().map(moved), old_image: self.old_image.as_ref().map(moved) };
        let encoded = Encoded {
            payload: Bytes::from(w.out),
            lossy: self.lossy.clone(),
            item: self.item,
            keys: moved(&self.keys),
        };
        (encoded, lighter)
    }

    /// The event without its old image ([`super::Event::without_old_image`]): `None` when it has no
    /// old image to drop or no new image to keep.
    pub fn without_old_image(&self, table: &str, origin: Origin) -> Option<Bytes> {
        let (full, lighter) = self.full(table, origin);
        lighter.without_old_image(&full.payload)
    }

    /// The event without images ([`super::Event::reduced`]).
    pub fn reduced(&self, table: &str, origin: Origin) -> Bytes {
        let (full, lighter) = self.full(table, origin);
        lighter.reduced(&full.payload)
    }

    /// The `keys` JSON (`{}` when the record has none): the same primary key gives the same bytes.
    pub fn keys_json(&self) -> &[u8] {
        &self.json[self.keys.clone()]
    }

    /// The hash of the `keys` JSON ([`Encoded::item`]).
    pub fn item(&self) -> u64 {
        self.item
    }

    /// Whether DynamoDB's TTL made this deletion: a REMOVE by `userIdentity` `Service` /
    /// `dynamodb.amazonaws.com`.
    pub fn is_ttl_delete(&self) -> bool {
        self.ttl_delete
    }

    /// Marks the event `"ttl_delete": true` (written after its origin flags, before a reduction's).
    pub fn flag_ttl_delete(&mut self) {
        self.flag_ttl_delete = true;
    }

    /// The event with only the image attributes `keep` says yes to (`keys` untouched). The images are
    /// written event JSON with their fields in name order: each field is kept or cut as it stands.
    pub fn project(mut self, keep: impl Fn(&str) -> bool) -> StreamEvent {
        let images = [self.new_image.clone(), self.old_image.clone()];
        let mut json = Vec::with_capacity(self.json.len());
        let mut at = 0;
        let mut placed: [Option<Range<usize>>; 2] = [None, None];
        let mut spans: Vec<(usize, &Range<usize>)> =
            images.iter().enumerate().filter_map(|(index, range)| range.as_ref().map(|range| (index, range))).collect();
        spans.sort_by_key(|(_, range)| range.start);
        for (index, range) in spans {
            json.extend_from_slice(&self.json[at..range.start]);
            let start = json.len();
            match project_object(&self.json[range.clone()], &keep) {
                Some(projected) => json.extend_from_slice(&projected),
                // Not an object as the transcoder writes one (never): kept whole.
                None => json.extend_from_slice(&self.json[range.clone()]),
            }
            placed[index] = Some(start..json.len());
            at = range.end;
        }
        json.extend_from_slice(&self.json[at..]);
        let [new_image, old_image] = placed;
        // The keys come before the images, so their place does not move.
        self.json = json;
        self.new_image = new_image;
        self.old_image = old_image;
        self
    }
}

/// Where the images lie in a full event ([`StreamEvent::full`]), to cut its lighter forms from it:
/// an image becomes `null`, and the flag saying so goes after the origin's, before the closing brace,
/// where [`super::Event::encode`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lighter {
    new_image: Option<Range<usize>>,
    old_image: Option<Range<usize>>,
}

impl Lighter {
    /// `full` without its old image: `None` when it has no old image to drop or no new image to keep.
    pub fn without_old_image(&self, full: &[u8]) -> Option<Bytes> {
        let old = self.old_image.clone().filter(|_| self.new_image.is_some())?;
        Some(cut(full, [None, Some(old)], "old_image_omitted"))
    }

    /// `full` without images.
    pub fn reduced(&self, full: &[u8]) -> Bytes {
        cut(full, [self.new_image.clone(), self.old_image.clone()], "images_omitted")
    }
}

/// `full` with the `images` (in the order they appear) written as `null`, and `flag` set.
fn cut(full: &[u8], images: [Option<Range<usize>>; 2], flag: &str) -> Bytes {
    let mut w = JsonWriter { out: Vec::with_capacity(full.len() + flag.len() + 8), lossy: Vec::new() };
    let mut at = 0;
    for range in images.into_iter().flatten() {
        w.out.extend_from_slice(&full[at..range.start]);
        w.raw("null");
        at = range.end;
    }
    // Everything after the last image but the closing brace.
    w.out.extend_from_slice(&full[at..full.len().saturating_sub(1).max(at)]);
    w.flag(flag);
    w.raw("}");
    Bytes::from(w.out)
}

/// Reads a `GetRecords` response body and writes the event of each of its records.
pub fn transcode(body: &[u8]) -> Result<TranscodedPage, MalformedBody> {
    // The SDK reads an empty body as `{}`.
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    let mut page = TranscodedPage::default();
    let mut scratch = Scratch {
        w: JsonWriter { out: Vec::with_capacity(4096), lossy: Vec::new() },
        fields: Vec::new(),
        blob: Vec::new(),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    BodySeed { page: &mut page, scratch: &mut scratch }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(page)
}

/// What one page reuses from record to record: the record's values as written so far, the fields
/// of the maps being written, a decoded blob.
struct Scratch<'de> {
    w: JsonWriter,
    fields: Vec<Field<'de>>,
    blob: Vec<u8>,
}

/// A map field whose value is written (at `value` in the scratch, with its lossy notes at `lossy`)
/// and waits to be put in name order.
struct Field<'de> {
    name: Cow<'de, str>,
    value: Range<usize>,
    lossy: Range<usize>,
}

/// A part of a record written in the scratch: its JSON and its lossy notes.
#[derive(Debug, Clone)]
struct Part {
    json: Range<usize>,
    lossy: Range<usize>,
}

/// A string, borrowed from the body unless it holds escapes; `None` for `null` when `nullable`.
struct Text {
    nullable: bool,
}

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.nullable { "a string or null" } else { "a string" })
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(text.to_owned())))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        if self.nullable { Ok(None) } else { Err(E::invalid_type(de::Unexpected::Unit, &self)) }
    }
}

fn text<'de, A: MapAccess<'de>>(access: &mut A) -> Result<Option<Cow<'de, str>>, A::Error> {
    access.next_value_seed(Text { nullable: true })
}

fn key<'de, A: MapAccess<'de>>(access: &mut A) -> Result<Option<Cow<'de, str>>, A::Error> {
    access.next_key_seed(Text { nullable: false }).map(Option::flatten)
}

/// The whole body: `{"Records":[…],"NextShardIterator":…}`.
struct BodySeed<'p, 's, 'de> {
    page: &'p mut TranscodedPage,
    scratch: &'s mut Scratch<'de>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a GetRecords response object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        while let Some(name) = key(&mut access)? {
            match name.as_ref() {
                "Records" => {
                    // A second `Records` replaces the first, as in the SDK's output builder.
                    self.page.events.clear();
                    self.page.unusable.clear();
                    access.next_value_seed(RecordsSeed { page: &mut *self.page, scratch: &mut *self.scratch })?;
                }
                "NextShardIterator" => self.page.next_iterator = text(&mut access)?.map(Cow::into_owned),
                _ => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// `[record, …]` or `null`.
struct RecordsSeed<'p, 's, 'de> {
    page: &'p mut TranscodedPage,
    scratch: &'s mut Scratch<'de>,
}

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of records or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut records: A) -> Result<(), A::Error> {
        while let Some(record) = records.next_element_seed(RecordSeed { scratch: &mut *self.scratch })? {
            match record {
                Ok(event) => self.page.events.push(event),
                Err(unusable) => self.page.unusable.push(unusable),
            }
            self.scratch.w.out.clear();
            self.scratch.w.lossy.clear();
        }
        Ok(())
    }
}

/// One record: `{"eventID":…,"eventName":…,"dynamodb":{…},"userIdentity":{…},…}`.
struct RecordSeed<'s, 'de> {
    scratch: &'s mut Scratch<'de>,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_, 'de> {
    type Value = Result<StreamEvent, Unusable>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_, 'de> {
    type Value = Result<StreamEvent, Unusable>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let (mut event_id, mut event_name, mut stream, mut identity) = (None, None, None, None);
        while let Some(name) = key(&mut access)? {
            match name.as_ref() {
                "eventID" => event_id = text(&mut access)?,
                "eventName" => event_name = text(&mut access)?,
                "eventVersion" | "eventSource" | "awsRegion" => {
                    text(&mut access)?;
                }
                "dynamodb" => stream = access.next_value_seed(StreamSeed { scratch: &mut *self.scratch })?,
                "userIdentity" => identity = access.next_value_seed(IdentitySeed)?,
                _ => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        let Some(stream) = stream else {
            let event_id = event_id.map(Cow::into_owned);
            return Ok(Err(Unusable { reason: "record has no `dynamodb` section", event_id }));
        };
        let Some(sequence_number) = stream.sequence_number.clone() else {
            let event_id = event_id.map(Cow::into_owned);
            return Ok(Err(Unusable { reason: "record has no sequence number", event_id }));
        };
        let event_name = event_name.unwrap_or_default();
        Ok(Ok(write_event(
            self.scratch,
            event_id.as_deref().unwrap_or_default(),
            event_name,
            sequence_number,
            &stream,
            identity,
        )))
    }
}

/// The event of a record whose parts are written in the scratch, in the order of
/// [`super::Event::encode`].
fn write_event(
    scratch: &Scratch<'_>,
    event_id: &str,
    event_name: Cow<'_, str>,
    sequence_number: Cow<'_, str>,
    stream: &StreamParts<'_>,
    identity: Option<Identity<'_>>,
) -> StreamEvent {
    let mut lossy = Vec::new();
    // An empty map is written `{}`: the event has no keys then, as in `Event::from_record`.
    let keys = stream.keys.clone().filter(|keys| keys.json.len() > 2);
    if keys.is_none() {
        lossy.push(NO_KEYS.to_owned());
    }
    let time = creation_time(stream.created_at, &mut lossy);
    let images = [&keys, &stream.new_image, &stream.old_image];
    let length: usize = images.iter().filter_map(|part| part.as_ref()).map(|part| part.json.len()).sum();
    let mut w = JsonWriter { out: Vec::with_capacity(length + 256), lossy };
    let copy = |w: &mut JsonWriter, part: &Option<Part>, absent: &str| match part {
        Some(part) => {
            let start = w.out.len();
            w.out.extend_from_slice(&scratch.w.out[part.json.clone()]);
            w.lossy.extend_from_slice(&scratch.w.lossy[part.lossy.clone()]);
            Some(start..w.out.len())
        }
        None => {
            w.raw(absent);
            None
        }
    };
    w.raw("{\"event_id\":");
    w.string(event_id);
    w.field("event_name");
    w.string(&event_name);
    w.field("table_name");
    let table_at = w.out.len();
    w.field("sequence_number");
    w.string(&sequence_number);
    w.field("approximate_creation_time");
    w.string(&time);
    w.field("keys");
    let keys_start = w.out.len();
    copy(&mut w, &keys, "{}");
    let keys = keys_start..w.out.len();
    w.field("new_image");
    let new_image = copy(&mut w, &stream.new_image, "null");
    w.field("old_image");
    let old_image = copy(&mut w, &stream.old_image, "null");
    let ttl_delete = event_name == "REMOVE"
        && identity.as_ref().is_some_and(|identity| {
            identity.kind.as_deref() == Some(TTL_IDENTITY_TYPE)
                && identity.principal_id.as_deref() == Some(TTL_PRINCIPAL)
        });
    if let Some(identity) = identity {
        w.field("user_identity");
        w.raw("{\"type\":");
        w.string(identity.kind.as_deref().unwrap_or_default());
        w.raw(",\"principal_id\":");
        w.string(identity.principal_id.as_deref().unwrap_or_default());
        w.raw("}");
    }
    StreamEvent {
        event_name: event_name.into_owned(),
        sequence_number: sequence_number.into_owned(),
        created_at: stream.created_at,
        size_bytes: stream.size_bytes,
        item: fnv1a(&w.out[keys.clone()]),
        lossy: w.lossy,
        json: w.out,
        table_at,
        keys,
        new_image,
        old_image,
        ttl_delete,
        flag_ttl_delete: false,
    }
}

/// The `userIdentity` of a deletion made by DynamoDB's TTL (AWS: "Time to Live (TTL) and DynamoDB
/// Streams": `"type": "Service"`, `"principalId": "dynamodb.amazonaws.com"`).
pub const TTL_IDENTITY_TYPE: &str = "Service";
pub const TTL_PRINCIPAL: &str = "dynamodb.amazonaws.com";

/// A written JSON object with only the fields `keep` says yes to, in their order; `None` if `object`
/// is not one.
fn project_object(object: &[u8], keep: &impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let fields: Vec<(Cow<'_, str>, &RawValue)> = serde_json::from_slice::<OrderedFields<'_>>(object).ok()?.0;
    let mut w = JsonWriter { out: Vec::with_capacity(object.len()), lossy: Vec::new() };
    w.raw("{");
    let mut first = true;
    for (name, value) in fields.iter().filter(|(name, _)| keep(name)) {
        if !first {
            w.raw(",");
        }
        first = false;
        w.string(name);
        w.raw(":");
        w.out.extend_from_slice(value.get().as_bytes());
    }
    w.raw("}");
    Some(w.out)
}

/// A JSON object's fields in the order written, values unparsed.
struct OrderedFields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for OrderedFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = OrderedFields<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(name) = key(&mut access)? {
                    fields.push((name, access.next_value::<&'de RawValue>()?));
                }
                Ok(OrderedFields(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A record's `dynamodb` section, its images written in the scratch.
#[derive(Default)]
struct StreamParts<'de> {
    sequence_number: Option<Cow<'de, str>>,
    created_at: Option<f64>,
    size_bytes: Option<i64>,
    keys: Option<Part>,
    new_image: Option<Part>,
    old_image: Option<Part>,
}

struct StreamSeed<'s, 'de> {
    scratch: &'s mut Scratch<'de>,
}

impl<'de> DeserializeSeed<'de> for StreamSeed<'_, 'de> {
    type Value = Option<StreamParts<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamSeed<'_, 'de> {
    type Value = Option<StreamParts<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a stream record or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut parts = StreamParts::default();
        while let Some(name) = key(&mut access)? {
            let image = match name.as_ref() {
                "Keys" => &mut parts.keys,
                "NewImage" => &mut parts.new_image,
                "OldImage" => &mut parts.old_image,
                "ApproximateCreationDateTime" => {
                    parts.created_at = epoch_seconds(access.next_value()?)?;
                    continue;
                }
                "SequenceNumber" => {
                    parts.sequence_number = text(&mut access)?;
                    continue;
                }
                "SizeBytes" => {
                    parts.size_bytes = size_bytes(access.next_value()?)?;
                    continue;
                }
                "StreamViewType" => {
                    text(&mut access)?;
                    continue;
                }
                _ => {
                    access.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let (start, lossy) = (self.scratch.w.out.len(), self.scratch.w.lossy.len());
            let written =
                access.next_value_seed(Member { scratch: &mut *self.scratch, kind: Kind::M, element: false })?;
            let part = Part { json: start..self.scratch.w.out.len(), lossy: lossy..self.scratch.w.lossy.len() };
            *image = written.then_some(part);
        }
        Ok(Some(parts))
    }
}

/// `ApproximateCreationDateTime` as the SDK reads it: a JSON number of epoch seconds, through its
/// number type and `DateTime` (so `.715` arrives as `.714999…`, as on the SDK path).
fn epoch_seconds<E: de::Error>(raw: &RawValue) -> Result<Option<f64>, E> {
    let Some(number) = number(raw)? else { return Ok(None) };
    let secs = number.to_f64_lossy();
    if !secs.is_finite() {
        return Err(E::custom(format!("{secs} is not a valid epoch")));
    }
    Ok(Some(aws_smithy_types::DateTime::from_secs_f64(secs).as_secs_f64()))
}

/// `SizeBytes` as the SDK reads it: a JSON number that is an `i64` without loss.
fn size_bytes<E: de::Error>(raw: &RawValue) -> Result<Option<i64>, E> {
    number(raw)?.map(|number| i64::try_from(number).map_err(E::custom)).transpose()
}

/// A JSON number (or `null`) as the SDK's tokenizer reads it: an integer while it fits 64 bits,
/// else a float.
fn number<E: de::Error>(raw: &RawValue) -> Result<Option<Number>, E> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(E::custom(format!("expected a number, found {text}")));
    }
    let float = || text.parse::<f64>().map(Number::Float).map_err(E::custom);
    let number = if text.contains(['.', 'e', 'E']) {
        float()?
    } else if let Some(digits) = text.strip_prefix('-') {
        match digits.parse::<u64>() {
            Ok(positive) if positive <= i64::MAX as u64 => Number::NegInt(-(positive as i64)),
            Ok(positive) if positive == i64::MAX as u64 + 1 => Number::NegInt(i64::MIN),
            Ok(positive) => Number::Float(-(positive as f64)),
            Err(_) => float()?,
        }
    } else {
        match text.parse::<u64>() {
            Ok(positive) => Number::PosInt(positive),
            Err(_) => float()?,
        }
    };
    Ok(Some(number))
}

/// `userIdentity`.
struct Identity<'de> {
    kind: Option<Cow<'de, str>>,
    principal_id: Option<Cow<'de, str>>,
}

struct IdentitySeed;

impl<'de> DeserializeSeed<'de> for IdentitySeed {
    type Value = Option<Identity<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IdentitySeed {
    type Value = Option<Identity<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a user identity or null")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut identity = Identity { kind: None, principal_id: None };
        while let Some(name) = key(&mut access)? {
            match name.as_ref() {
                "Type" => identity.kind = text(&mut access)?,
                "PrincipalId" => identity.principal_id = text(&mut access)?,
                _ => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(identity))
    }
}

/// An attribute value: `{"S":…}` and the other members of DynamoDB's union, exactly one of them
/// not `null` (a member given as `null` is ignored, `__type` is skipped, an unknown member is
/// written as `null` and noted, as the SDK's `AttributeValue::Unknown` is). The value itself is
/// never `null` (the SDK refuses nulls in maps and lists).
struct Attribute<'s, 'de> {
    scratch: &'s mut Scratch<'de>,
}

impl<'de> DeserializeSeed<'de> for Attribute<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Attribute<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an attribute value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
        let mut written = false;
        while let Some(name) = key(&mut access)? {
            let kind = Kind::of(&name);
            if access.next_value_seed(Member { scratch: &mut *self.scratch, kind, element: false })? {
                if written {
                    return Err(de::Error::custom("encountered mixed variants in union"));
                }
                written = true;
            }
        }
        if written { Ok(()) } else { Err(de::Error::custom("Union did not contain a valid variant.")) }
    }
}

/// A member of the attribute union (or an element of a set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    S,
    N,
    B,
    Ss,
    Ns,
    Bs,
    M,
    L,
    Null,
    Bool,
    /// `__type`, skipped.
    Type,
    Unknown,
}

impl Kind {
    fn of(name: &str) -> Kind {
        match name {
            "S" => Kind::S,
            "N" => Kind::N,
            "B" => Kind::B,
            "SS" => Kind::Ss,
            "NS" => Kind::Ns,
            "BS" => Kind::Bs,
            "M" => Kind::M,
            "L" => Kind::L,
            "NULL" => Kind::Null,
            "BOOL" => Kind::Bool,
            "__type" => Kind::Type,
            _ => Kind::Unknown,
        }
    }
}

/// Writes the value of one union member; `false` when nothing was written (`null`, `__type`). An
/// `element` of a set cannot be `null`.
struct Member<'s, 'de> {
    scratch: &'s mut Scratch<'de>,
    kind: Kind,
    element: bool,
}

impl<'de> DeserializeSeed<'de> for Member<'_, 'de> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Member<'_, '_> {
    /// What a value of a type this member cannot take means: skipped (`__type`), an unknown member
    /// (written as `null`), or an error.
    fn other<E: de::Error>(self, unexpected: de::Unexpected) -> Result<bool, E> {
        match self.kind {
            Kind::Type => Ok(false),
            Kind::Unknown => {
                self.scratch.w.unknown("Unknown");
                Ok(true)
            }
            _ => Err(E::invalid_type(unexpected, &self)),
        }
    }
}

impl<'de> Visitor<'de> for Member<'_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "the value of a {:?} attribute", self.kind)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        if self.element { Err(E::custom("dense list cannot contain null values")) } else { Ok(false) }
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<bool, E> {
        match self.kind {
            Kind::B => {
                let Scratch { w, blob, .. } = self.scratch;
                blob.clear();
                base64::engine::general_purpose::STANDARD
                    .decode_vec(text, blob)
                    .map_err(|err| E::custom(format!("failed to decode base64: {err}")))?;
                w.base64(blob);
                Ok(true)
            }
            _ => self.visit_str(text),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<bool, E> {
        match self.kind {
            Kind::S => self.scratch.w.string(text),
            Kind::N => self.scratch.w.number(text),
            // The SDK decodes the text as sent: an escape is no base64.
            Kind::B => return Err(E::custom("failed to decode base64: the text holds a JSON escape")),
            _ => return self.other(de::Unexpected::Str(text)),
        }
        Ok(true)
    }

    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<bool, E> {
        match self.kind {
            Kind::Null => self.scratch.w.raw("null"),
            Kind::Bool => self.scratch.w.raw(if flag { "true" } else { "false" }),
            _ => return self.other(de::Unexpected::Bool(flag)),
        }
        Ok(true)
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<bool, E> {
        self.other(de::Unexpected::Unsigned(number))
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<bool, E> {
        self.other(de::Unexpected::Signed(number))
    }

    fn visit_f64<E: de::Error>(self, number: f64) -> Result<bool, E> {
        self.other(de::Unexpected::Float(number))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<bool, A::Error> {
        let element = match self.kind {
            Kind::Ss => Kind::S,
            Kind::Ns => Kind::N,
            Kind::Bs => Kind::B,
            Kind::L => Kind::L,
            Kind::Type | Kind::Unknown if !self.element => {
                while items.next_element::<IgnoredAny>()?.is_some() {}
                return self.other(de::Unexpected::Seq);
            }
            _ => return Err(de::Error::invalid_type(de::Unexpected::Seq, &self)),
        };
        let scratch = self.scratch;
        scratch.w.out.push(b'[');
        let mut first = true;
        loop {
            let mark = scratch.w.out.len();
            if !first {
                scratch.w.out.push(b',');
            }
            let item = if element == Kind::L {
                items.next_element_seed(Attribute { scratch: &mut *scratch })?.is_some()
            } else {
                items.next_element_seed(Member { scratch: &mut *scratch, kind: element, element: true })?.is_some()
            };
            if !item {
                scratch.w.out.truncate(mark);
                break;
            }
            first = false;
        }
        scratch.w.out.push(b']');
        Ok(true)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<bool, A::Error> {
        match self.kind {
            Kind::M if !self.element => {
                write_map(self.scratch, access)?;
                Ok(true)
            }
            Kind::Type | Kind::Unknown if !self.element => {
                while access.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                self.other(de::Unexpected::Map)
            }
            _ => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
        }
    }
}

/// Writes a map of attributes with its fields in name order (a name given twice keeps its last
/// value, as the SDK's `HashMap` does): each value is written as it comes, then the fields are
/// copied after them in order and moved back into place.
fn write_map<'de, A: MapAccess<'de>>(scratch: &mut Scratch<'de>, mut access: A) -> Result<(), A::Error> {
    let mark = scratch.fields.len();
    let (base, lossy_base) = (scratch.w.out.len(), scratch.w.lossy.len());
    while let Some(name) = key(&mut access)? {
        let (start, lossy) = (scratch.w.out.len(), scratch.w.lossy.len());
        access.next_value_seed(Attribute { scratch: &mut *scratch })?;
        let (value, lossy) = (start..scratch.w.out.len(), lossy..scratch.w.lossy.len());
        scratch.fields.push(Field { name, value, lossy });
    }
    let Scratch { w, fields, .. } = scratch;
    let fields = &mut fields[mark..];
    // Every value takes at least one byte, so its start tells fields of the same name apart by order.
    fields.sort_unstable_by(|a, b| a.name.cmp(&b.name).then(a.value.start.cmp(&b.value.start)));
    let written = w.out.len();
    let lossy = w.lossy.split_off(lossy_base);
    w.out.push(b'{');
    let mut first = true;
    for (i, field) in fields.iter().enumerate() {
        if fields.get(i + 1).is_some_and(|next| next.name == field.name) {
            continue;
        }
        if !first {
            w.out.push(b',');
        }
        first = false;
        w.string(&field.name);
        w.out.push(b':');
        w.out.extend_from_within(field.value.clone());
        w.lossy.extend_from_slice(&lossy[field.lossy.start - lossy_base..field.lossy.end - lossy_base]);
    }
    w.out.push(b'}');
    w.out.copy_within(written.., base);
    w.out.truncate(base + (w.out.len() - written));
    scratch.fields.truncate(mark);
    Ok(())
}
