//! The NATS side of a record: its event ([`event`]) and its in-order, pipelined JetStream publish on
//! a fenced connection ([`connection`]).
//!
//! Invariants of [`Publisher::publish_in_order`]:
//! - it reports how many records of a batch, from its start, are acknowledged by JetStream. Acks are
//!   awaited in publish order, so that count is a contiguous prefix: the only thing a checkpoint may
//!   cover;
//! - **per-item order whatever subset of the pipeline fails**: at most one publish per item (per
//!   primary key) is unacknowledged at any time. Different items pipeline; a record waits while an
//!   older version of its item awaits its ack. A reset connection loses the bytes the client had just
//!   written, a leader change or a refusal fails one message while later ones are stored: none of
//!   that can store a newer version of an item before an older one, because the newer one was not
//!   sent yet. The retry from the first unacknowledged record re-sends stored ones with their
//!   `Nats-Msg-Id` (deduplicated) and the lost ones in order;
//! - **fenced**: each record is handed to the client only while the shard's lease guard is valid and
//!   the client is connected (nothing queues in a disconnected client); when the guard is lost while
//!   publishes are unacknowledged, the publish connection is fenced (see [`connection`]).

pub mod connection;
pub mod event;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use aws_sdk_dynamodbstreams::types::Record;
use bytes::Bytes;
use tokio::time::Instant;

use coordination::LeaseGuard;

use crate::checkpoint::SequenceNumber;
use crate::metrics::{Metrics, PublishErrorKind as FailureKind};
use connection::PublishConnection;
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
    /// The item the record changes (a hash of its primary key), for per-item order in the pipeline.
    item: u64,
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
    /// Its `publish_errors_total` kind.
    pub kind: FailureKind,
    pub message: String,
    /// The publish connection that may still hold publishes of this batch that were not
    /// acknowledged (queued, unsent, or sent without an answer); `None` when none can be left.
    pub unconfirmed: Option<u64>,
    /// Why the publish connection must be fenced before anything else is sent (the lease was lost
    /// while publishes were unacknowledged, or an ack timed out); done by
    /// [`Publisher::publish_in_order`] before it returns.
    fence: Option<&'static str>,
}

impl PublishFailure {
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

/// Publishes events of every shard on one publish connection.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<PublishConnection>,
    /// The main connection: its server's max payload bounds every event.
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
    pub fn new(connection: PublishConnection, client: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        Publisher { connection: Arc::new(connection), client, metrics }
    }

    /// Throws away what publish connection `generation` still holds (see [`connection`]), if it is
    /// still the current one: when a shard's lease is lost while its publishes may be there, and when
    /// an ack times out (the connection may be cut off; a retry on it would only queue more there).
    pub fn fence(&self, generation: u64, table: &str, shard_id: &str, why: &'static str) {
        if self.connection.fence(generation) {
            self.metrics.publish_fences.inc();
            tracing::warn!(
                table,
                shard_id,
                generation,
                why,
                "publish connection dropped with everything it still held; the next publish connects anew"
            );
        }
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
            item: encoded.item,
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

    /// Publishes `batch[from..]` in order with at most `window` acks outstanding, awaiting acks in
    /// order, at most one unacknowledged publish per item, each record sent only while `guard` is
    /// valid. A failure's `acked` counts from `from`.
    ///
    /// The loop runs on the publish connection's runtime, beside the client's task, so a record and
    /// its ack do not each cross between threads; the batch is lent to it and is back in `batch`
    /// when this returns, also when a fence ends that runtime under the loop.
    pub async fn publish_in_order(
        &self,
        shard: Destination<'_>,
        batch: &mut Vec<Prepared>,
        from: usize,
        window: usize,
        guard: &LeaseGuard,
    ) -> Result<(), PublishFailure> {
        let Destination { subject, table, shard_id } = shard;
        let connection = match self.connection.get().await {
            Ok(connection) => connection,
            Err(err) => return Err(self.stop(table, 0, FailureKind::Disconnected, err.to_string(), None)),
        };
        let generation = connection.generation;
        let lent =
            Arc::new(Lent { records: tokio::sync::Mutex::new(std::mem::take(batch)), acked: AtomicUsize::new(0) });
        let job = Job {
            publisher: self.clone(),
            connection: connection.clone(),
            subject: subject.to_owned(),
            table: table.to_owned(),
            shard_id: shard_id.to_owned(),
            window,
            guard: guard.clone(),
        };
        let run = {
            let lent = lent.clone();
            async move {
                let mut records = lent.records.lock().await;
                job.run(&mut records[from..], &lent.acked).await
            }
        };
        let joined = connection.runtime.spawn(run).await;
        // The loop is over, or its task was dropped with the runtime: either way the batch is free.
        *batch = std::mem::take(&mut *lent.records.lock().await);
        let result = joined.unwrap_or_else(|join| {
            // A fence (of this shard or another) shut the runtime down under the loop; whatever it
            // had not seen acknowledged went with the connection.
            let acked = lent.acked.load(Ordering::Acquire);
            let message = format!("the publish connection was dropped under the batch: {join}");
            Err(self.stop(table, acked, FailureKind::Disconnected, message, None))
        });
        if let Err(PublishFailure { fence: Some(why), .. }) = &result {
            self.fence(generation, table, shard_id, why);
        }
        result
    }

    /// A batch stopped for a reason of ours (lease, connection): counted like a publish error.
    fn stop(
        &self,
        table: &str,
        acked: usize,
        kind: FailureKind,
        message: String,
        unconfirmed: Option<u64>,
    ) -> PublishFailure {
        self.metrics.publish_errors.with_label_values(&[table, kind.as_str()]).inc();
        PublishFailure { acked, kind, message, unconfirmed, fence: None }
    }

    fn failure(
        &self,
        table: &str,
        acked: usize,
        err: &jetstream::context::PublishError,
        unconfirmed: Option<u64>,
    ) -> PublishFailure {
        let kind = match err.kind() {
            PublishErrorKind::TimedOut => FailureKind::TimedOut,
            PublishErrorKind::StreamNotFound => FailureKind::StreamNotFound,
            PublishErrorKind::BrokenPipe => FailureKind::BrokenPipe,
            PublishErrorKind::MaxAckPending => FailureKind::MaxAckPending,
            PublishErrorKind::MaxPayloadExceeded => FailureKind::MaxPayloadExceeded,
            _ => FailureKind::Other,
        };
        self.stop(table, acked, kind, err.to_string(), unconfirmed)
    }
}

/// A batch lent to the publish loop on the publish runtime: the records, and how many of them (from
/// where the loop started) are acknowledged so far, readable when the loop's task was dropped.
struct Lent {
    records: tokio::sync::Mutex<Vec<Prepared>>,
    acked: AtomicUsize,
}

/// What the publish loop of one batch owns on the publish runtime.
struct Job {
    publisher: Publisher,
    connection: connection::Connection,
    subject: String,
    table: String,
    shard_id: String,
    window: usize,
    guard: LeaseGuard,
}

impl Job {
    /// The loop of [`Publisher::publish_in_order`]; `progress` follows the acknowledged count.
    async fn run(self, batch: &mut [Prepared], progress: &AtomicUsize) -> Result<(), PublishFailure> {
        let Job { publisher, connection, subject, table, shard_id, window, guard } = self;
        let (table, shard_id) = (table.as_str(), shard_id.as_str());
        let generation = connection.generation;
        let metrics = &publisher.metrics;
        let ack_seconds = metrics.publish_ack_seconds.with_label_values(&[table]);
        let mut pending: VecDeque<(usize, Instant, jetstream::context::PublishAckFuture)> = VecDeque::new();
        // The items of `pending`: a record whose item is here waits for that item's ack.
        let mut in_flight: HashSet<u64> = HashSet::new();
        let lost = guard.lost();
        tokio::pin!(lost);
        let mut acked = 0;
        let mut next = 0;
        // Set when every process-wide ack permit is taken: await an own ack before sending more.
        let mut saturated = false;
        while acked < batch.len() {
            let may_send = !saturated || pending.is_empty();
            if next < batch.len() && pending.len() < window && may_send && !in_flight.contains(&batch[next].item) {
                if let Err(lost) = guard.check() {
                    let unconfirmed = (!pending.is_empty()).then_some(generation);
                    return Err(publisher.stop(table, acked, FailureKind::LeaseLost, lost.to_string(), unconfirmed));
                }
                if connection.client.connection_state() != async_nats::connection::State::Connected {
                    let unconfirmed = (!pending.is_empty()).then_some(generation);
                    let message = "the publish connection is not connected".to_owned();
                    return Err(publisher.stop(table, acked, FailureKind::Disconnected, message, unconfirmed));
                }
                saturated = false;
                let record = &mut batch[next];
                let headers = record.headers.take().unwrap_or_else(|| record.build_headers(table, shard_id));
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(record.payload.clone());
                match connection.js.send_publish(subject.clone(), message).await {
                    Ok(ack) => {
                        in_flight.insert(record.item);
                        pending.push_back((next, Instant::now(), ack));
                        next += 1;
                    }
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded && !record.reduced => {
                        // Our estimate of the headers' size was short; reduce and send again.
                        publisher.reduce(table, shard_id, record);
                    }
                    // Other shards hold every permit (`MAX_ACKS_IN_FLIGHT`): free one of ours
                    // by awaiting our oldest ack, or, holding none, give the others a moment.
                    Err(err) if err.kind() == PublishErrorKind::MaxAckPending => {
                        saturated = true;
                        if pending.is_empty() {
                            tokio::time::sleep(SATURATED_PAUSE).await;
                        }
                    }
                    Err(err) => {
                        // A publish the client refused was not queued; the earlier ones may be.
                        let unconfirmed = (!pending.is_empty()).then_some(generation);
                        return Err(publisher.failure(table, acked, &err, unconfirmed));
                    }
                }
                continue;
            }
            let Some((index, sent, ack)) = pending.pop_front() else { break };
            let answer = tokio::select! {
                answer = ack => answer,
                lost = &mut lost => {
                    // The lease may move on from now: nothing this shard queued may arrive later.
                    let mut failure = publisher.stop(table, acked, FailureKind::LeaseLost, lost.to_string(), None);
                    failure.fence = Some("lease lost with publishes unacknowledged");
                    return Err(failure);
                }
            };
            match answer {
                Ok(ack) => {
                    let record = &batch[index];
                    in_flight.remove(&record.item);
                    ack_seconds.observe(sent.elapsed().as_secs_f64());
                    if ack.duplicate {
                        metrics.duplicate_publishes.with_label_values(&[table]).inc();
                    } else {
                        metrics.records_published.with_label_values(&[table, record.event_name()]).inc();
                    }
                    acked = index + 1;
                    progress.store(acked, Ordering::Release);
                    saturated = false;
                }
                // No answer in time: the retry goes out on a new connection, and whatever this one
                // still holds is dropped rather than delivered late.
                Err(err) if err.kind() == PublishErrorKind::TimedOut => {
                    let mut failure = publisher.failure(table, acked, &err, None);
                    failure.fence = Some("publish ack timed out");
                    return Err(failure);
                }
                // This one failed; the later ones may still be queued or on their way.
                Err(err) => return Err(publisher.failure(table, acked, &err, Some(generation))),
            }
        }
        Ok(())
    }
}
