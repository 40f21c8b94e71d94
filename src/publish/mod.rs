//! The NATS side of a change record: its event ([`event`]), the seam the shard reader publishes
//! through ([`EventSink`]), and its JetStream implementation ([`jetstream::Publisher`]) on a fenced
//! connection ([`connection`]).
//!
//! The contract of [`EventSink::publish_in_order`], kept by every implementation:
//! - it reports how many records of a batch, from its start, are acknowledged. Acks are awaited in
//!   publish order, so that count is a contiguous prefix: the only thing a checkpoint may cover;
//! - **per-item order whatever subset of the pipeline fails**: at most one publish per item (per
//!   primary key) is unacknowledged at any time. Different items pipeline; a record waits while an
//!   older version of its item awaits its ack. A reset connection loses the bytes the client had just
//!   written, a leader change or a refusal fails one message while later ones are stored: none of
//!   that can store a newer version of an item before an older one, because the newer one was not
//!   sent yet. The retry from the first unacknowledged record re-sends stored ones with their
//!   `Nats-Msg-Id` (deduplicated) and the lost ones in order;
//! - **fenced**: each record is handed on only while the shard's lease guard is valid; when the guard
//!   is lost while publishes are unacknowledged, what may still hold them is fenced (see
//!   [`connection`]) before the failure is returned;
//! - **pipelined across calls**: a call may stop once every record is sent ([`Until::Sent`]) and leave
//!   the last acknowledgements outstanding in the caller's [`Outbox`], where the next call (with more
//!   records appended to the batch) takes them up first: a shard's next page goes out while its
//!   previous page's tail is acknowledged. Per-item order holds across calls (the outbox keeps the
//!   items of its publishes), and so does fencing: the caller fences the outbox's connection when its
//!   lease is lost between calls ([`Outbox::unconfirmed`]).

pub mod connection;
pub mod event;
pub mod jetstream;
#[cfg(test)]
pub mod memory;

use std::collections::{HashSet, VecDeque};

use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use coordination::LeaseGuard;

use crate::checkpoint::SequenceNumber;
use crate::metrics::{Metrics, Omitted, PublishErrorKind as FailureKind};
use crate::record::{ChangeRecord, Origin};
use event::transcode::{Lighter, StreamEvent};
use event::{Encoded, Event, message_id};

pub use jetstream::Publisher;

/// Header names beside `Nats-Msg-Id`, so consumers can route without parsing JSON.
pub const HEADER_TABLE: &str = "Dynamodb-Table";
pub const HEADER_EVENT_NAME: &str = "Dynamodb-Event-Name";
pub const HEADER_SEQUENCE_NUMBER: &str = "Dynamodb-Sequence-Number";
pub const HEADER_SHARD_ID: &str = "Dynamodb-Shard-Id";
/// `true` on a backfill's snapshot row (which has no shard and no sequence number).
pub const HEADER_SNAPSHOT: &str = "Dynamodb-Snapshot";
/// `true` on a stream record published again after a backfill's scan.
pub const HEADER_REPLAY: &str = "Dynamodb-Replay";

/// Where events go: JetStream in the service ([`Publisher`]), memory in unit tests.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Makes a record ready to publish (its event written, reduced if it would not fit).
    fn prepare(&self, table: &str, shard_id: &str, record: ChangeRecord) -> Prepared;

    /// Makes a transcoded stream record ready to publish as `origin` (reduced if it would not fit).
    fn prepare_stream(&self, table: &str, shard_id: &str, event: StreamEvent, origin: Origin) -> Prepared;

    /// Publishes `batch[from..]` in order with at most the outbox's window of acks outstanding, each
    /// record handed on only while `guard` is valid (see the module comment), until `until`; returns
    /// how many records from `from` are acknowledged. `batch[from..outbox.sent_to()]` were sent by
    /// earlier calls and await their acks in `outbox`. A failure's `acked` counts from `from`, and
    /// leaves the outbox empty; the batch is back in `batch` when this returns.
    async fn publish_in_order(
        &self,
        shard: Destination<'_>,
        batch: &mut Vec<Prepared>,
        from: usize,
        guard: &LeaseGuard,
        outbox: &mut Outbox,
        until: Until,
    ) -> Result<usize, PublishFailure>;

    /// Throws away what publish connection `generation` may still hold, if it is still the current
    /// one (a lease was lost while publishes of its shard were unacknowledged).
    fn fence(&self, generation: u64, table: &str, shard_id: &str, why: &'static str);
}

/// Where a publish call may stop.
#[derive(Clone, Debug)]
pub enum Until {
    /// Once every record is sent: the acknowledgements still outstanding stay in the outbox.
    Sent,
    /// Once every record is acknowledged, or, as soon as `ready` is cancelled (the next page is in
    /// hand), with what is acknowledged by then: the rest stays in the outbox.
    Acked { ready: Option<CancellationToken> },
}

impl Until {
    /// Every record acknowledged, however long that takes.
    pub const ACKED: Until = Until::Acked { ready: None };
}

/// Publishes a delivery sent and not yet acknowledged, carried from one publish call to the next
/// (see the module comment). Indices are into the delivery's batch ([`Outbox::rebase`] follows it
/// when its acknowledged head is dropped).
pub struct Outbox {
    /// At most this many publishes unacknowledged (`MAX_IN_FLIGHT`).
    window: usize,
    /// The publish connection they were sent on.
    generation: u64,
    /// Index of the first record not sent; the records before it from the first unacknowledged one
    /// on were sent (a failure empties the outbox: the retry sends from the first unacknowledged).
    next: usize,
    /// Their acknowledgements, oldest first (the in-memory sink's acknowledge at its next call and
    /// keep none here).
    acks: VecDeque<jetstream::Outstanding>,
    /// The items of the unacknowledged publishes: a record of one of them waits for that item's ack.
    items: HashSet<u64>,
}

impl Outbox {
    pub fn new(window: usize) -> Outbox {
        Outbox { window: window.max(1), generation: 0, next: 0, acks: VecDeque::new(), items: HashSet::new() }
    }

    /// Index of the first record not yet sent (0 when nothing is outstanding).
    pub fn sent_to(&self) -> usize {
        self.next
    }

    /// The publish connection that may hold publishes sent and not acknowledged, when any of
    /// `batch[from..]` are (`from`: the first unacknowledged record).
    pub fn unconfirmed(&self, from: usize) -> Option<u64> {
        (self.next > from).then_some(self.generation)
    }

    /// Forgets what is outstanding (after a failure, or when the delivery gives it up): whatever of
    /// it arrives is a duplicate of the retry or unwanted, and is not waited for.
    pub fn clear(&mut self) {
        self.next = 0;
        self.acks.clear();
        self.items.clear();
    }

    /// Everything before `next` was sent on connection `generation` (by a sink that keeps no acks
    /// here: the in-memory one).
    #[cfg(test)]
    fn sent(&mut self, generation: u64, next: usize) {
        self.generation = generation;
        self.next = next;
    }

    /// The delivery dropped its first `by` records (all acknowledged).
    pub fn rebase(&mut self, by: usize) {
        self.next = self.next.saturating_sub(by);
        for outstanding in &mut self.acks {
            outstanding.index -= by;
        }
    }
}

/// A record ready to publish. It owns its record, so records can be prepared on another task (the
/// prefetch of the next page) while the current page is published.
pub struct Prepared {
    pub sequence_number: SequenceNumber,
    /// Seconds since the epoch of the record's `ApproximateCreationDateTime`.
    pub created_at: Option<f64>,
    /// The item the record changes (a hash of its primary key), for per-item order in the pipeline.
    item: u64,
    /// Built with the payload (its size counts against the max payload) and moved into the first
    /// publish; rebuilt only if the record has to be sent again.
    headers: Option<HeaderMap>,
    message_id: String,
    payload: Bytes,
    /// The `keys` JSON of the event (the same primary key gives the same bytes).
    keys: Bytes,
    /// Kept until published, in case the full event turns out to exceed the max payload.
    body: Body,
    reduced: Reduction,
    /// The record's own subject (a table's `subject` template); `None`: its shard's.
    subject: Option<async_nats::Subject>,
}

/// What an event is written from, kept to write it lighter.
enum Body {
    /// A record in the service's types (a backfill's snapshot row).
    Record(ChangeRecord),
    /// A stream record as the transcoder wrote it from a `GetRecords` body: its full event, lighter
    /// forms cut from it (the record itself is dropped, so a batch holds each event once).
    Stream { origin: Origin, event_name: String, sequence_number: String, full: Bytes, lighter: Lighter },
}

impl Body {
    fn origin(&self) -> Origin {
        match self {
            Body::Record(record) => record.origin,
            Body::Stream { origin, .. } => *origin,
        }
    }

    fn event_name(&self) -> &str {
        match self {
            Body::Record(record) => &record.event_name,
            Body::Stream { event_name, .. } => event_name,
        }
    }

    /// The sequence number as the source sent it.
    fn sequence_number(&self) -> &str {
        match self {
            Body::Record(record) => &record.sequence_number,
            Body::Stream { sequence_number, .. } => sequence_number,
        }
    }

    /// The event without its old image, if it has one to drop and a new image to keep.
    fn without_old_image(&self, table: &str) -> Option<Bytes> {
        match self {
            Body::Record(record) => {
                Event::from_record(table, record).without_old_image().map(|event| event.encode().payload)
            }
            Body::Stream { full, lighter, .. } => lighter.without_old_image(full),
        }
    }

    /// The event without images.
    fn reduced(&self, table: &str) -> Bytes {
        match self {
            Body::Record(record) => Event::from_record(table, record).reduced().encode().payload,
            Body::Stream { full, lighter, .. } => lighter.reduced(full),
        }
    }
}

/// How far an event over the max payload was made lighter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    OldImage,
    Images,
}

impl Prepared {
    /// Writes the event of `record`; an event (with its headers) over `max_payload` bytes is reduced.
    /// Substitutions and reductions are logged and counted.
    pub fn new(table: &str, shard_id: &str, record: ChangeRecord, max_payload: usize, metrics: &Metrics) -> Prepared {
        let encoded = Event::from_record(table, &record).encode();
        let created_at = record.created_at;
        Prepared::written(table, shard_id, encoded, created_at, Body::Record(record), max_payload, metrics)
    }

    /// The event the transcoder wrote from a stream record, as `origin`; reduced as [`Prepared::new`]
    /// reduces.
    pub fn from_stream(
        table: &str,
        shard_id: &str,
        event: StreamEvent,
        origin: Origin,
        max_payload: usize,
        metrics: &Metrics,
    ) -> Prepared {
        let (encoded, lighter) = event.full(table, origin);
        let StreamEvent { event_name, sequence_number, created_at, .. } = event;
        let full = encoded.payload.clone();
        let body = Body::Stream { origin, event_name, sequence_number, full, lighter };
        Prepared::written(table, shard_id, encoded, created_at, body, max_payload, metrics)
    }

    fn written(
        table: &str,
        shard_id: &str,
        encoded: Encoded,
        created_at: Option<f64>,
        body: Body,
        max_payload: usize,
        metrics: &Metrics,
    ) -> Prepared {
        let text = body.sequence_number();
        if !encoded.lossy.is_empty() {
            tracing::warn!(table, shard_id, sequence_number = %text, problems = ?encoded.lossy, "record converted with substitutions");
            metrics.unrepresentable_records.with_label_values(&[table]).inc();
        }
        let zero = || SequenceNumber::parse("0").unwrap_or_else(|| unreachable!("\"0\" is decimal"));
        let sequence_number = match SequenceNumber::parse(text) {
            Some(sequence_number) => sequence_number,
            // A snapshot row has no place in a shard.
            None if matches!(body.origin(), Origin::Snapshot { .. }) => zero(),
            None => {
                tracing::warn!(table, shard_id, sequence_number = %text, "sequence number is not decimal");
                zero()
            }
        };
        let keys = encoded.payload.slice(encoded.keys.clone());
        let message_id = message_id(table, shard_id, text, body.origin(), &keys);
        let mut prepared = Prepared {
            sequence_number,
            created_at,
            item: encoded.item,
            headers: None,
            message_id,
            payload: encoded.payload,
            keys,
            body,
            reduced: Reduction::None,
            subject: None,
        };
        let headers = prepared.build_headers(table, shard_id);
        if prepared.payload.len() + header_wire_len(&headers) > max_payload {
            prepared.reduce(table, shard_id, max_payload, metrics);
        }
        prepared.headers = Some(headers);
        prepared
    }

    /// The record published to `subject` instead of its shard's.
    pub fn routed(mut self, subject: Option<String>) -> Prepared {
        self.subject = subject.map(async_nats::Subject::from);
        self
    }

    /// The record's own subject, if it has one (else its shard's).
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// The `keys` JSON of the event: the same primary key gives the same bytes (`{}` for none).
    pub fn keys_json(&self) -> &Bytes {
        &self.keys
    }

    pub(crate) fn event_name(&self) -> &str {
        self.body.event_name()
    }

    /// The sequence number as the source sent it.
    pub fn sequence_text(&self) -> &str {
        self.body.sequence_number()
    }

    /// The headers of SPEC §3: the message id for JetStream's de-duplication, and routing fields.
    fn build_headers(&self, table: &str, shard_id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.message_id.as_str());
        headers.insert(HEADER_TABLE, table);
        headers.insert(HEADER_EVENT_NAME, self.body.event_name());
        match self.body.origin() {
            Origin::Snapshot { .. } => headers.insert(HEADER_SNAPSHOT, "true"),
            origin => {
                headers.insert(HEADER_SEQUENCE_NUMBER, self.body.sequence_number());
                headers.insert(HEADER_SHARD_ID, shard_id);
                if let Origin::Replay { .. } = origin {
                    headers.insert(HEADER_REPLAY, "true");
                }
            }
        }
        headers
    }

    /// Swaps in a lighter event, counted and logged: without the old image if that fits (and was not
    /// tried already), else without both images (keys and metadata). A consumer that upserts
    /// `new_image` loses nothing in the first case.
    fn reduce(&mut self, table: &str, shard_id: &str, max_payload: usize, metrics: &Metrics) {
        let full = self.payload.len();
        let headers = header_wire_len(&self.build_headers(table, shard_id));
        let lighter = match self.reduced {
            Reduction::None => self.body.without_old_image(table),
            Reduction::OldImage | Reduction::Images => None,
        };
        let (payload, reduction, omitted) = match lighter {
            Some(payload) if payload.len() + headers <= max_payload => {
                (payload, Reduction::OldImage, Omitted::OldImage)
            }
            _ => (self.body.reduced(table), Reduction::Images, Omitted::Images),
        };
        self.payload = payload;
        self.reduced = reduction;
        metrics.oversize_events.with_label_values(&[table, omitted.as_str()]).inc();
        let what = match omitted {
            Omitted::OldImage => "published without its old image",
            Omitted::Images => "published without images",
        };
        tracing::warn!(table, shard_id, sequence_number = %self.sequence_number, bytes = full,
            max_payload, "event exceeds the max payload: {what}");
    }

    /// The bytes of the event as it would be published now.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// The bytes of events and records this holds: the event published now, and what a lighter one
    /// would be written from (a transcoded record's full event, usually the same bytes; a record's
    /// images, about as long as its event).
    pub fn held_bytes(&self) -> usize {
        match &self.body {
            Body::Record(_) => 2 * self.payload.len(),
            Body::Stream { full, .. } if full.as_ptr() == self.payload.as_ptr() => full.len(),
            Body::Stream { full, .. } => full.len() + self.payload.len(),
        }
    }

    /// True while the event can still be made lighter.
    pub(crate) fn reducible(&self) -> bool {
        self.reduced != Reduction::Images
    }
}

/// Bytes of a header block on the wire: `NATS/1.0\r\n`, `Name: value\r\n` per header, `\r\n`.
fn header_wire_len(headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values.iter().map(|value| name.len() + value.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    10 + fields + 2
}

/// Why a batch stopped: how many records from its start were acknowledged, and the failure.
#[derive(Debug)]
pub struct PublishFailure {
    pub acked: usize,
    /// Its `publish_errors_total` kind.
    pub kind: FailureKind,
    pub message: String,
    /// The publish connection that may still hold publishes of this batch that were not
    /// acknowledged (queued, unsent, or sent without an answer); `None` when none can be left.
    pub unconfirmed: Option<u64>,
    /// Why the publish connection must be fenced before anything else is sent (the lease was lost
    /// while publishes were unacknowledged, or an ack timed out); done by the sink before
    /// `publish_in_order` returns.
    fence: Option<&'static str>,
}

impl PublishFailure {
    /// A batch stopped after `acked` records, counted in `publish_errors_total`.
    fn counted(
        metrics: &Metrics,
        table: &str,
        acked: usize,
        kind: FailureKind,
        message: String,
        unconfirmed: Option<u64>,
    ) -> PublishFailure {
        metrics.publish_errors.with_label_values(&[table, kind.as_str()]).inc();
        PublishFailure { acked, kind, message, unconfirmed, fence: None }
    }

    /// The shard's lease guard stopped the batch.
    pub fn lease_lost(&self) -> bool {
        self.kind == FailureKind::LeaseLost
    }
}

/// Where one shard's records go (`subject`), and the names they are counted and logged under.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub subject: &'a str,
    pub table: &'a str,
    pub shard_id: &'a str,
}
