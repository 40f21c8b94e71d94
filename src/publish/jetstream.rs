//! [`EventSink`] on JetStream: every shard's events on one fenced publish connection
//! ([`super::connection`]), pipelined with at most one unacknowledged publish per item.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::jetstream::{self, context::PublishErrorKind, publish::PublishAck};
use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use coordination::LeaseGuard;

use super::connection::{self, PublishConnection};
use super::event::transcode::StreamEvent;
use super::{Destination, EventSink, FailureKind, Outbox, Prepared, PublishFailure, Until};
use crate::metrics::Metrics;
use crate::record::{ChangeRecord, Origin};

/// How long a shard holding no unacknowledged publish waits when every ack permit of the process is
/// taken by other shards (their acks arrive within about a round trip to NATS).
const SATURATED_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Publishes events of every shard on one publish connection.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<PublishConnection>,
    /// The main connection: its server's max payload bounds every event.
    client: async_nats::Client,
    metrics: Arc<Metrics>,
}

impl Publisher {
    pub fn new(connection: PublishConnection, client: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        Publisher { connection: Arc::new(connection), client, metrics }
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
        PublishFailure::counted(&self.metrics, table, acked, kind, message, unconfirmed)
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

#[async_trait]
impl EventSink for Publisher {
    fn prepare(&self, table: &str, shard_id: &str, record: ChangeRecord) -> Prepared {
        Prepared::new(table, shard_id, record, self.client.max_payload(), &self.metrics)
    }

    fn prepare_stream(&self, table: &str, shard_id: &str, event: StreamEvent, origin: Origin) -> Prepared {
        Prepared::from_stream(table, shard_id, event, origin, self.client.max_payload(), &self.metrics)
    }

    /// Throws away what publish connection `generation` still holds (see [`connection`]), if it is
    /// still the current one: when a shard's lease is lost while its publishes may be there, and when
    /// an ack times out (the connection may be cut off; a retry on it would only queue more there).
    fn fence(&self, generation: u64, table: &str, shard_id: &str, why: &'static str) {
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

    /// Publishes `batch[from..]` in order with at most the outbox's window of acks outstanding,
    /// awaiting acks in order, at most one unacknowledged publish per item, each record sent only
    /// while `guard` is valid, until `until` (see [`EventSink::publish_in_order`]).
    ///
    /// The loop runs on the publish connection's runtime, beside the client's task, so a record and
    /// its ack do not each cross between threads; the batch and the outbox are lent to it and are
    /// back when this returns, also when a fence ends that runtime under the loop.
    async fn publish_in_order(
        &self,
        shard: Destination<'_>,
        batch: &mut Vec<Prepared>,
        from: usize,
        guard: &LeaseGuard,
        outbox: &mut Outbox,
        until: Until,
    ) -> Result<usize, PublishFailure> {
        let Destination { subject, table, shard_id } = shard;
        let connection = match self.connection.get().await {
            Ok(connection) => connection,
            Err(err) => {
                let unconfirmed = outbox.unconfirmed(from);
                outbox.clear();
                return Err(self.stop(table, 0, FailureKind::Disconnected, err.to_string(), unconfirmed));
            }
        };
        let generation = connection.generation;
        if let Some(earlier) = outbox.unconfirmed(from).filter(|earlier| *earlier != generation) {
            // The connection the outstanding publishes went out on was dropped (a fence): their acks
            // will not come. Sent again from the first unacknowledged, in order, on this one.
            outbox.clear();
            let message = "the publish connection of the unacknowledged publishes was replaced".to_owned();
            return Err(self.stop(table, 0, FailureKind::Disconnected, message, Some(earlier)));
        }
        let lent = Arc::new(Lent {
            state: tokio::sync::Mutex::new((std::mem::take(batch), std::mem::replace(outbox, Outbox::new(1)))),
            acked: AtomicUsize::new(0),
        });
        let job = Job {
            publisher: self.clone(),
            connection: connection.clone(),
            subject: async_nats::Subject::from(subject),
            table: table.to_owned(),
            shard_id: shard_id.to_owned(),
            guard: guard.clone(),
        };
        let run = {
            let lent = lent.clone();
            async move {
                let mut state = lent.state.lock().await;
                let (records, outbox) = &mut *state;
                job.run(records, from, outbox, until, &lent.acked).await
            }
        };
        let joined = connection.runtime.spawn(run).await;
        // The loop is over, or its task was dropped with the runtime: either way the batch is free.
        (*batch, *outbox) = std::mem::replace(&mut *lent.state.lock().await, (Vec::new(), Outbox::new(1)));
        let result = joined.unwrap_or_else(|join| {
            // A fence (of this shard or another) shut the runtime down under the loop; whatever it
            // had not seen acknowledged went with the connection.
            let acked = lent.acked.load(Ordering::Acquire);
            let message = format!("the publish connection was dropped under the batch: {join}");
            Err(self.stop(table, acked, FailureKind::Disconnected, message, None))
        });
        if result.is_err() {
            outbox.clear();
        }
        if let Err(PublishFailure { fence: Some(why), .. }) = &result {
            self.fence(generation, table, shard_id, why);
        }
        result
    }
}

/// A batch and its outbox lent to the publish loop on the publish runtime, and how many records
/// (from where the loop started) are acknowledged so far, readable when the loop's task was dropped.
struct Lent {
    state: tokio::sync::Mutex<(Vec<Prepared>, Outbox)>,
    acked: AtomicUsize,
}

/// A publish sent and not acknowledged yet ([`Outbox`]).
pub struct Outstanding {
    /// The record's index in the delivery's batch.
    pub(super) index: usize,
    sent: Instant,
    /// Its ack, until it is awaited (small: the future it becomes is boxed only for the oldest).
    ack: Option<jetstream::context::PublishAckFuture>,
    /// The ack being awaited: polled in place (not taken out), so a loop that stops waiting leaves
    /// it there for the next.
    awaited: Option<AckFuture>,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, jetstream::context::PublishError>> + Send>>;

impl Outstanding {
    fn awaited(&mut self) -> Option<&mut AckFuture> {
        if self.awaited.is_none() {
            self.awaited = self.ack.take().map(IntoFuture::into_future);
        }
        self.awaited.as_mut()
    }
}

/// What the publish loop of one batch owns on the publish runtime.
struct Job {
    publisher: Publisher,
    connection: connection::Connection,
    /// Cloned per publish without copying its text.
    subject: async_nats::Subject,
    table: String,
    shard_id: String,
    guard: LeaseGuard,
}

impl Job {
    /// The loop of [`Publisher::publish_in_order`]; `progress` follows the acknowledged count.
    async fn run(
        self,
        batch: &mut [Prepared],
        from: usize,
        outbox: &mut Outbox,
        until: Until,
        progress: &AtomicUsize,
    ) -> Result<usize, PublishFailure> {
        let Job { publisher, connection, subject, table, shard_id, guard } = self;
        let (table, shard_id) = (table.as_str(), shard_id.as_str());
        let generation = connection.generation;
        let metrics = &publisher.metrics;
        let ack_seconds = metrics.publish_ack_seconds.with_label_values(&[table]);
        // The counters of the event names seen so far, looked up once each rather than once a record.
        let mut published: Vec<(String, prometheus::IntCounter)> = Vec::with_capacity(3);
        let lost = guard.lost();
        tokio::pin!(lost);
        let ready = match &until {
            Until::Acked { ready: Some(ready) } => Some(ready.clone()),
            _ => None,
        };
        let sent_is_enough = matches!(until, Until::Sent);
        // Counted from `from` (failures report it so); `next` is an index into `batch`.
        let mut acked = 0;
        let mut next = outbox.next.max(from);
        outbox.generation = generation;
        // Set when every process-wide ack permit is taken: await an own ack before sending more.
        let mut saturated = false;
        while from + acked < batch.len() && !(sent_is_enough && next == batch.len()) {
            let may_send = !saturated || outbox.acks.is_empty();
            if next < batch.len()
                && outbox.acks.len() < outbox.window
                && may_send
                && !outbox.items.contains(&batch[next].item)
            {
                if let Err(lost) = guard.check() {
                    let unconfirmed = (!outbox.acks.is_empty()).then_some(generation);
                    return Err(publisher.stop(table, acked, FailureKind::LeaseLost, lost.to_string(), unconfirmed));
                }
                if connection.client.connection_state() != async_nats::connection::State::Connected {
                    let unconfirmed = (!outbox.acks.is_empty()).then_some(generation);
                    let message = "the publish connection is not connected".to_owned();
                    return Err(publisher.stop(table, acked, FailureKind::Disconnected, message, unconfirmed));
                }
                saturated = false;
                let record = &mut batch[next];
                let headers = record.headers.take().unwrap_or_else(|| record.build_headers(table, shard_id));
                let message = async_nats::jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(record.payload.clone());
                // A record routed by its table's subject template goes there; the rest to the shard's.
                let to = record.subject.clone().unwrap_or_else(|| subject.clone());
                match connection.js.send_publish(to, message).await {
                    Ok(ack) => {
                        outbox.items.insert(record.item);
                        let outstanding =
                            Outstanding { index: next, sent: Instant::now(), ack: Some(ack), awaited: None };
                        outbox.acks.push_back(outstanding);
                        next += 1;
                        outbox.next = next;
                    }
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded && record.reducible() => {
                        // Our estimate of the headers' size was short; reduce and send again.
                        record.reduce(table, shard_id, publisher.client.max_payload(), &publisher.metrics);
                    }
                    // Other shards hold every permit (`MAX_ACKS_IN_FLIGHT`): free one of ours
                    // by awaiting our oldest ack, or, holding none, give the others a moment.
                    Err(err) if err.kind() == PublishErrorKind::MaxAckPending => {
                        saturated = true;
                        if outbox.acks.is_empty() {
                            tokio::time::sleep(SATURATED_PAUSE).await;
                        }
                    }
                    Err(err) => {
                        // A publish the client refused was not queued; the earlier ones may be.
                        let unconfirmed = (!outbox.acks.is_empty()).then_some(generation);
                        return Err(publisher.failure(table, acked, &err, unconfirmed));
                    }
                }
                continue;
            }
            if ready.as_ref().is_some_and(CancellationToken::is_cancelled) {
                break;
            }
            let Some(ack) = outbox.acks.front_mut().and_then(Outstanding::awaited) else { break };
            let answer = tokio::select! {
                biased;
                answer = ack => answer,
                lost = &mut lost => {
                    // The lease may move on from now: nothing this shard queued may arrive later.
                    let mut failure = publisher.stop(table, acked, FailureKind::LeaseLost, lost.to_string(), None);
                    failure.fence = Some("lease lost with publishes unacknowledged");
                    return Err(failure);
                }
                // The next page is in hand: it goes out beside the acks still outstanding.
                () = cancelled(ready.as_ref()) => break,
            };
            let Some(Outstanding { index, sent, .. }) = outbox.acks.pop_front() else { break };
            match answer {
                Ok(ack) => {
                    let record = &batch[index];
                    outbox.items.remove(&record.item);
                    ack_seconds.observe(sent.elapsed().as_secs_f64());
                    if ack.duplicate {
                        metrics.duplicate_publishes.with_label_values(&[table]).inc();
                    } else {
                        let name = record.event_name();
                        match published.iter().find(|(seen, _)| seen == name) {
                            Some((_, counter)) => counter.inc(),
                            None => {
                                let counter = metrics.records_published.with_label_values(&[table, name]);
                                counter.inc();
                                published.push((name.to_owned(), counter));
                            }
                        }
                    }
                    acked = index + 1 - from;
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
        if outbox.acks.is_empty() {
            outbox.clear();
        }
        Ok(acked)
    }
}

/// Resolves once `ready` is cancelled; never without one.
async fn cancelled(ready: Option<&CancellationToken>) {
    match ready {
        Some(ready) => ready.cancelled().await,
        None => std::future::pending().await,
    }
}
