//! [`EventSink`] on JetStream: every shard's events on one fenced publish connection
//! ([`super::connection`]), pipelined with at most one unacknowledged publish per item.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_trait::async_trait;
use tokio::time::Instant;

use coordination::LeaseGuard;

use super::connection::{self, PublishConnection};
use super::event::transcode::StreamEvent;
use super::{Destination, EventSink, FailureKind, Prepared, PublishFailure};
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

    /// Publishes `batch[from..]` in order with at most `window` acks outstanding, awaiting acks in
    /// order, at most one unacknowledged publish per item, each record sent only while `guard` is
    /// valid. A failure's `acked` counts from `from`.
    ///
    /// The loop runs on the publish connection's runtime, beside the client's task, so a record and
    /// its ack do not each cross between threads; the batch is lent to it and is back in `batch`
    /// when this returns, also when a fence ends that runtime under the loop.
    async fn publish_in_order(
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
            subject: async_nats::Subject::from(subject),
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
    /// Cloned per publish without copying its text.
    subject: async_nats::Subject,
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
        // The counters of the event names seen so far, looked up once each rather than once a record.
        let mut published: Vec<(String, prometheus::IntCounter)> = Vec::with_capacity(3);
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
                // A record routed by its table's subject template goes there; the rest to the shard's.
                let to = record.subject.clone().unwrap_or_else(|| subject.clone());
                match connection.js.send_publish(to, message).await {
                    Ok(ack) => {
                        in_flight.insert(record.item);
                        pending.push_back((next, Instant::now(), ack));
                        next += 1;
                    }
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded && record.reducible() => {
                        // Our estimate of the headers' size was short; reduce and send again.
                        record.reduce(table, shard_id, publisher.client.max_payload(), &publisher.metrics);
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
