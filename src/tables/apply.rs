//! A table's settings applied to one record: dropped (TTL deletion, filter), or published with its
//! images projected, flagged as a TTL deletion and routed to its subject.
//!
//! Stream records are judged on what the reader already has: the transcoded event, and for a
//! table with a filter, the page's body parsed again into the records as Lambda shows them
//! ([`PageDocuments`]; only tables with a filter pay that second parse). Snapshot rows of a backfill
//! (a [`ChangeRecord`]) are judged the same way on [`crate::filter::document`].

use base64::Engine as _;
use serde_json::Value as Json;
use serde_json::value::RawValue;

use super::{Dropped, Projection, TableSettings, TtlDeletes};
use crate::publish::event::transcode::{StreamEvent, TTL_IDENTITY_TYPE, TTL_PRINCIPAL};
use crate::record::{ChangeRecord, Map, Value};

/// What becomes of a record.
#[derive(Debug)]
pub enum Verdict<T> {
    /// Published as `T`, to `subject` (`None`: the table's default subject).
    Publish(T, Option<String>),
    /// Not published; checkpointed past and counted.
    Drop(Dropped),
}

/// The records of one `GetRecords` body as a filter sees them, taken in page order. The body is
/// kept and each record parsed into its document only when it is reached, so at most one document
/// is held at a time.
pub struct PageDocuments {
    body: bytes::Bytes,
    /// Where each record's JSON lies in the body, in page order.
    records: std::vec::IntoIter<std::ops::Range<usize>>,
}

impl PageDocuments {
    /// Finds the records of `body` (a `GetRecords` response); `None` if it cannot be read (the
    /// transcoder read it, so never in practice).
    pub fn parse(body: bytes::Bytes) -> Option<PageDocuments> {
        #[derive(serde::Deserialize)]
        struct Body<'a> {
            #[serde(rename = "Records", default, borrow)]
            records: Option<Vec<&'a RawValue>>,
        }
        if body.is_empty() {
            return Some(PageDocuments { body, records: Vec::new().into_iter() });
        }
        let parsed: Body<'_> = serde_json::from_slice(&body).ok()?;
        let start = body.as_ptr() as usize;
        let records: Vec<std::ops::Range<usize>> = parsed
            .records
            .unwrap_or_default()
            .into_iter()
            .map(|raw| {
                // A borrowed raw value is a slice of the body.
                let at = raw.get().as_ptr() as usize - start;
                at..at + raw.get().len()
            })
            .collect();
        Some(PageDocuments { body, records: records.into_iter() })
    }

    /// The document of the record with `sequence_number`, the next one of the page that has it.
    fn take(&mut self, sequence_number: &str) -> Option<Json> {
        for range in self.records.by_ref() {
            let Some(mut record) = self.body.get(range).and_then(|json| serde_json::from_slice::<Json>(json).ok())
            else {
                continue;
            };
            if record.pointer("/dynamodb/SequenceNumber").and_then(Json::as_str) == Some(sequence_number) {
                as_lambda_shows_it(&mut record);
                return Some(record);
            }
        }
        None
    }
}

/// A record of a `GetRecords` body as `filter::document` shows one (as Lambda does): without
/// `awsRegion`, `eventVersion` and `StreamViewType`, its `userIdentity` with Lambda's field names.
fn as_lambda_shows_it(record: &mut Json) {
    let Some(object) = record.as_object_mut() else { return };
    object.remove("awsRegion");
    object.remove("eventVersion");
    if let Some(Json::Object(dynamodb)) = object.get_mut("dynamodb") {
        dynamodb.remove("StreamViewType");
    }
    // The wire's `Type` / `PrincipalId`, as Lambda's event spells them.
    if let Some(Json::Object(identity)) = object.get_mut("userIdentity") {
        for (wire, lambda) in [("Type", "type"), ("PrincipalId", "principalId")] {
            if let Some(value) = identity.remove(wire) {
                identity.insert(lambda.to_owned(), value);
            }
        }
    }
}

impl TableSettings {
    /// Whether judging a stream record needs its page's documents.
    pub fn needs_documents(&self) -> bool {
        self.filter.is_some()
    }

    /// Judges a transcoded stream record of `table`; `documents` are its page's (see
    /// [`Self::needs_documents`]). A record a filter cannot be matched against (no document) is
    /// published: nothing is dropped unseen.
    pub fn judge_stream(
        &self,
        prefix: &str,
        table: &str,
        event: StreamEvent,
        documents: Option<&mut PageDocuments>,
    ) -> Verdict<StreamEvent> {
        match self.drops(&event, documents) {
            Some(reason) => Verdict::Drop(reason),
            None => {
                let (event, subject) = self.shape(prefix, table, event);
                Verdict::Publish(event, subject)
            }
        }
    }

    /// Why a stream record is not published, if it is not ([`Self::judge_stream`]'s first half).
    pub fn drops(&self, event: &StreamEvent, documents: Option<&mut PageDocuments>) -> Option<Dropped> {
        if event.is_ttl_delete() && self.ttl_deletes == TtlDeletes::Drop {
            return Some(Dropped::TtlDelete);
        }
        if let Some(filter) = &self.filter {
            let document = documents.and_then(|documents| documents.take(&event.sequence_number));
            if let Some(document) = document
                && !filter.matches_document(&document)
            {
                return Some(Dropped::Filter);
            }
        }
        None
    }

    /// A stream record to publish: projected, flagged, and its subject ([`Self::judge_stream`]'s
    /// second half).
    pub fn shape(&self, prefix: &str, table: &str, mut event: StreamEvent) -> (StreamEvent, Option<String>) {
        let ttl_delete = event.is_ttl_delete();
        if self.projection != Projection::All {
            event = event.project(|name| self.projection.keeps(name));
        }
        if ttl_delete && self.ttl_deletes == TtlDeletes::Flag {
            event.flag_ttl_delete();
        }
        let subject = self.subject.as_ref().map(|template| {
            let keys = if template.uses_keys() { key_texts(event.keys_json()) } else { Vec::new() };
            template.render(prefix, table, &event.event_name, |attribute| lookup(&keys, attribute))
        });
        (event, subject)
    }

    /// Judges a change record of `table` (a backfill's snapshot row) as [`Self::judge_stream`] does.
    /// (`ttl_deletes: flag` does not apply: a snapshot row is an INSERT.)
    pub fn judge_record(&self, prefix: &str, table: &str, mut record: ChangeRecord) -> Verdict<ChangeRecord> {
        let ttl_delete = record.event_name == "REMOVE"
            && record
                .user_identity
                .as_ref()
                .is_some_and(|identity| identity.kind == TTL_IDENTITY_TYPE && identity.principal_id == TTL_PRINCIPAL);
        if ttl_delete && self.ttl_deletes == TtlDeletes::Drop {
            return Verdict::Drop(Dropped::TtlDelete);
        }
        if let Some(filter) = &self.filter
            && !filter.matches(&record)
        {
            return Verdict::Drop(Dropped::Filter);
        }
        if self.projection != Projection::All {
            let project = |image: Map| -> Map {
                image.fields().iter().filter(|(name, _)| self.projection.keeps(name)).cloned().collect()
            };
            record.new_image = record.new_image.map(project);
            record.old_image = record.old_image.map(project);
        }
        let subject = self.subject.as_ref().map(|template| {
            template.render(prefix, table, &record.event_name, |attribute| {
                let keys = record.keys.as_ref()?;
                let (_, value) = keys.fields().iter().find(|(name, _)| name == attribute)?;
                value_text(value)
            })
        });
        Verdict::Publish(record, subject)
    }
}

/// A key attribute's value as a subject takes it: a string as is, a number as its text, a binary
/// as base64; other types (never a key) are absent.
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::S(text) | Value::N(text) => Some(text.clone()),
        Value::B(blob) => Some(base64::engine::general_purpose::STANDARD.encode(blob)),
        _ => None,
    }
}

/// The attributes of an event's `keys` JSON with their values as text (a string unquoted, anything
/// else as written: a number's digits, a binary's base64 string).
fn key_texts(keys: &[u8]) -> Vec<(String, String)> {
    let Ok(fields) = serde_json::from_slice::<std::collections::BTreeMap<String, &RawValue>>(keys) else {
        return Vec::new();
    };
    fields
        .into_iter()
        .map(|(name, raw)| {
            let text = serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned());
            (name, text)
        })
        .collect()
}

fn lookup(keys: &[(String, String)], attribute: &str) -> Option<String> {
    keys.iter().find(|(name, _)| name == attribute).map(|(_, text)| text.clone())
}
