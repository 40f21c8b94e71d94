//! The NATS side of a record: its event ([`event`]) and its in-order, pipelined JetStream publish.
//!
//! Invariant: [`Publisher::publish_in_order`] reports how many records of a batch, from its start,
//! are acknowledged by JetStream. Acks are awaited in publish order, so that count is a contiguous
//! prefix: the only thing a checkpoint may cover.

pub mod event;

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use aws_sdk_dynamodbstreams::types::Record;
use bytes::Bytes;
use tokio::time::Instant;

use crate::checkpoint::SequenceNumber;
use crate::metrics::Metrics;
use event::{Event, message_id};

/// Header names beside `Nats-Msg-Id`, so consumers can route without parsing JSON.
pub const HEADER_TABLE: &str = "Dynamodb-Table";
pub const HEADER_EVENT_NAME: &str = "Dynamodb-Event-Name";
pub const HEADER_SEQUENCE_NUMBER: &str = "Dynamodb-Sequence-Number";
pub const HEADER_SHARD_ID: &str = "Dynamodb-Shard-Id";

/// How long a shard holding no unacknowledged publish waits when every ack permit of the process is
/// taken by other shards (their acks arrive within about a round trip to NATS).
const SATURATED_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// A record ready to publish. It owns its record, so records can be prepared on another task (the
/// prefetch of the next page) while the current page is published.
pub struct Prepared {
    pub sequence_number: SequenceNumber,
    /// Seconds since the epoch of the record's `ApproximateCreationDateTime`.
    pub created_at: Option<f64>,
    /// Built with the payload (its size counts against the max payload) and moved into the first
    /// publish; rebuilt only if the record has to be sent again.
    headers: Option<HeaderMap>,
    message_id: String,
    payload: Bytes,
    /// Kept until published, in case the full event turns out to exceed the max payload.
    record: Record,
    reduced: bool,
}

impl Prepared {
    fn event_name(&self) -> &str {
        self.record.event_name().map(|name| name.as_str()).unwrap_or_default()
    }

    /// The headers of SPEC §3: the message id for JetStream's de-duplication, and routing fields.
    fn build_headers(&self, table: &str, shard_id: &str) -> HeaderMap {
        let sequence_number = self.record.dynamodb().and_then(|d| d.sequence_number()).unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.message_id.as_str());
        headers.insert(HEADER_TABLE, table);
        headers.insert(HEADER_EVENT_NAME, self.event_name());
        headers.insert(HEADER_SEQUENCE_NUMBER, sequence_number);
        headers.insert(HEADER_SHARD_ID, shard_id);
        headers
    }
}

/// Why a batch stopped: how many records from its start were acknowledged, and the failure.
#[derive(Debug)]
pub struct PublishFailure {
    pub acked: usize,
    pub kind: &'static str,
    pub message: String,
}

/// Publishes events of every shard on one JetStream context.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
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

impl Publisher {
    pub fn new(js: jetstream::Context, client: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        Publisher { js, client, metrics }
    }

    /// Converts a record. A record without a sequence number cannot be published or checkpointed;
    /// it is logged and counted and `None` is returned (DynamoDB always sends one).
    pub fn prepare(&self, table: &str, shard_id: &str, record: Record) -> Option<Prepared> {
        let event = match Event::from_record(table, &record) {
            Ok(event) => event,
            Err(err) => {
                tracing::error!(table, shard_id, error = %err, ?record, "record cannot be published: skipped");
                self.metrics.unrepresentable_records.with_label_values(&[table]).inc();
                return None;
            }
        };
        let encoded = event.encode();
        if !encoded.lossy.is_empty() {
            tracing::warn!(table, shard_id, sequence_number = %event.sequence_number, problems = ?encoded.lossy, "record converted with substitutions");
            self.metrics.unrepresentable_records.with_label_values(&[table]).inc();
        }
        let sequence_number = SequenceNumber::parse(event.sequence_number).unwrap_or_else(|| {
            tracing::warn!(table, shard_id, sequence_number = %event.sequence_number, "sequence number is not decimal");
            SequenceNumber::parse("0").unwrap_or_else(|| unreachable!("\"0\" is decimal"))
        });
        let created_at = record.dynamodb().and_then(|d| d.approximate_creation_date_time()).map(|t| t.as_secs_f64());
        let message_id = message_id(table, shard_id, event.sequence_number);
        let mut prepared = Prepared {
            sequence_number,
            created_at,
            headers: None,
            message_id,
            payload: encoded.payload,
            record,
            reduced: false,
        };
        let headers = prepared.build_headers(table, shard_id);
        if prepared.payload.len() + header_wire_len(&headers) > self.client.max_payload() {
            self.reduce(table, shard_id, &mut prepared);
        }
        prepared.headers = Some(headers);
        Some(prepared)
    }

    /// Swaps in the reduced event (keys and metadata, images dropped), counted and logged.
    fn reduce(&self, table: &str, shard_id: &str, prepared: &mut Prepared) {
        let full = prepared.payload.len();
        // The record made an event in `prepare`, so it makes one again.
        if let Ok(event) = Event::from_record(table, &prepared.record) {
            prepared.payload = event.reduced().encode().payload;
        }
        prepared.reduced = true;
        self.metrics.oversize_events.with_label_values(&[table]).inc();
        tracing::warn!(table, shard_id, sequence_number = %prepared.sequence_number, bytes = full,
            max_payload = self.client.max_payload(), "event exceeds the max payload: published without images");
    }

    /// Publishes `batch` in order with at most `window` acks outstanding, awaiting acks in order.
    pub async fn publish_in_order(
        &self,
        subject: &str,
        table: &str,
        shard_id: &str,
        batch: &mut [Prepared],
        window: usize,
    ) -> Result<(), PublishFailure> {
        let ack_seconds = self.metrics.publish_ack_seconds.with_label_values(&[table]);
        let mut pending: VecDeque<(usize, Instant, jetstream::context::PublishAckFuture)> = VecDeque::new();
        let mut acked = 0;
        let mut next = 0;
        // Set when every process-wide ack permit is taken: await an own ack before sending more.
        let mut saturated = false;
        while acked < batch.len() {
            let may_send = !saturated || pending.is_empty();
            if next < batch.len() && pending.len() < window && may_send {
                saturated = false;
                let record = &mut batch[next];
                let headers = record.headers.take().unwrap_or_else(|| record.build_headers(table, shard_id));
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(record.payload.clone());
                match self.js.send_publish(subject.to_owned(), message).await {
                    Ok(ack) => {
                        pending.push_back((next, Instant::now(), ack));
                        next += 1;
                    }
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded && !record.reduced => {
                        // Our estimate of the headers' size was short; reduce and send again.
                        self.reduce(table, shard_id, record);
                    }
                    // Other shards hold every permit (`MAX_ACKS_IN_FLIGHT`): free one of ours
                    // by awaiting our oldest ack, or, holding none, give the others a moment.
                    Err(err) if err.kind() == PublishErrorKind::MaxAckPending => {
                        saturated = true;
                        if pending.is_empty() {
                            tokio::time::sleep(SATURATED_PAUSE).await;
                        }
                    }
                    Err(err) => return Err(self.failure(table, acked, &err)),
                }
                continue;
            }
            let Some((index, sent, ack)) = pending.pop_front() else { break };
            match ack.await {
                Ok(ack) => {
                    let record = &batch[index];
                    ack_seconds.observe(sent.elapsed().as_secs_f64());
                    if ack.duplicate {
                        self.metrics.duplicate_publishes.with_label_values(&[table]).inc();
                    } else {
                        self.metrics.records_published.with_label_values(&[table, record.event_name()]).inc();
                    }
                    acked = index + 1;
                    saturated = false;
                }
                Err(err) => return Err(self.failure(table, acked, &err)),
            }
        }
        Ok(())
    }

    fn failure(&self, table: &str, acked: usize, err: &jetstream::context::PublishError) -> PublishFailure {
        let kind = match err.kind() {
            PublishErrorKind::TimedOut => "timed_out",
            PublishErrorKind::StreamNotFound => "stream_not_found",
            PublishErrorKind::BrokenPipe => "broken_pipe",
            PublishErrorKind::MaxAckPending => "max_ack_pending",
            PublishErrorKind::MaxPayloadExceeded => "max_payload_exceeded",
            _ => "other",
        };
        self.metrics.publish_errors.with_label_values(&[table, kind]).inc();
        PublishFailure { acked, kind, message: err.to_string() }
    }
}
