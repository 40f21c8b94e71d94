//! A stand-in for the Go service this one replaces (`cmd/dynamodb-stream-consumer` of
//! linuxfoundation/lfx-v1-sync-helper), as an in-place upgrade meets it: it holds no lease and knows
//! nothing of ours. For every shard of a table's stream it resumes after the checkpoint
//! `{table}.{shard_id}` (or at `TRIM_HORIZON` without one), reads pages with `GetRecords`, publishes
//! each record to `{prefix}.{table}` with the bare sequence number as `Nats-Msg-Id`, waits for the
//! acknowledgement, then *puts* the checkpoint (a plain put, after every record), and waits `poll`
//! after an empty page. Its events carry the original's fields (numbers as JSON numbers).
//!
//! [`GoService::stop`] aborts it wherever it is, as a SIGKILL (or the original's cancelled context)
//! would: at worst between a publish and its checkpoint put, the one record in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use aws_sdk_dynamodbstreams::types::{AttributeValue, ShardIteratorType};
use serde_json::{Value as Json, json};
use tokio::task::JoinSet;

use crate::Moto;

/// What the stand-in reads and where it writes.
pub struct GoSettings {
    pub nats_url: String,
    pub table: String,
    pub subject_prefix: String,
    pub bucket: String,
    pub poll: Duration,
}

/// The running stand-in; its shard loops are aborted when it is stopped or dropped.
pub struct GoService {
    shards: JoinSet<()>,
    published: Arc<AtomicU64>,
}

impl GoService {
    /// Starts one loop per shard of `settings.table`'s stream (as listed now). The bucket must exist.
    pub async fn start(moto: &Moto, settings: GoSettings) -> GoService {
        let aws = crate::fixtures::aws_config(moto).await;
        let streams = aws_sdk_dynamodbstreams::Client::new(&aws);
        let ddb = aws_sdk_dynamodb::Client::new(&aws);
        let table = ddb.describe_table().table_name(&settings.table).send().await.expect("describe table");
        let stream_arn = table.table().and_then(|t| t.latest_stream_arn()).expect("the table has a stream").to_owned();
        let described = streams.describe_stream().stream_arn(&stream_arn).send().await.expect("describe stream");
        let shard_ids: Vec<String> = described
            .stream_description()
            .map(|d| d.shards().iter().filter_map(|s| s.shard_id().map(str::to_owned)).collect())
            .unwrap_or_default();
        assert!(!shard_ids.is_empty(), "the stream of {} has no shards", settings.table);
        let client = async_nats::connect(&settings.nats_url).await.expect("connect to NATS");
        let js = jetstream::new(client);
        let kv = js.get_key_value(&settings.bucket).await.expect("the checkpoint bucket exists");
        let published = Arc::new(AtomicU64::new(0));
        let settings = Arc::new(settings);
        let mut shards = JoinSet::new();
        for shard_id in shard_ids {
            let reader = ShardLoop {
                streams: streams.clone(),
                js: js.clone(),
                kv: kv.clone(),
                stream_arn: stream_arn.clone(),
                shard_id,
                settings: Arc::clone(&settings),
                published: Arc::clone(&published),
            };
            shards.spawn(reader.run());
        }
        GoService { shards, published }
    }

    /// Records published (and acknowledged) so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// Aborts every shard loop wherever it is and waits until they are gone; returns what was
    /// published.
    pub async fn stop(mut self) -> u64 {
        self.shards.abort_all();
        while self.shards.join_next().await.is_some() {}
        self.published()
    }
}

struct ShardLoop {
    streams: aws_sdk_dynamodbstreams::Client,
    js: jetstream::Context,
    kv: jetstream::kv::Store,
    stream_arn: String,
    shard_id: String,
    settings: Arc<GoSettings>,
    published: Arc<AtomicU64>,
}

impl ShardLoop {
    async fn run(self) {
        let key = format!("{}.{}", self.settings.table, self.shard_id);
        let subject = format!("{}.{}", self.settings.subject_prefix, self.settings.table);
        let mut iterator = self.iterator(&key).await;
        while let Some(current) = iterator {
            let page = match self.streams.get_records().shard_iterator(&current).send().await {
                Ok(page) => page,
                Err(_) => {
                    tokio::time::sleep(self.settings.poll * 5).await;
                    iterator = self.iterator(&key).await;
                    continue;
                }
            };
            for record in page.records() {
                let Some(change) = record.dynamodb() else { continue };
                let Some(sequence) = change.sequence_number() else { continue };
                let event = json!({
                    "event_id": record.event_id(),
                    "event_name": record.event_name().map(|name| name.as_str()),
                    "table_name": self.settings.table,
                    "sequence_number": sequence,
                    "keys": change.keys().map(image),
                    "new_image": change.new_image().map(image),
                    "old_image": change.old_image().map(image),
                });
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", sequence);
                let payload = serde_json::to_vec(&event).expect("JSON").into();
                // As the original: a failed publish leaves the record to a restart (it ends the loop).
                let Ok(ack) = self.js.publish_with_headers(subject.clone(), headers, payload).await else { return };
                if ack.await.is_err() {
                    return;
                }
                self.published.fetch_add(1, Ordering::SeqCst);
                let _ = self.kv.put(&key, sequence.to_owned().into()).await;
            }
            if page.records().is_empty() {
                tokio::time::sleep(self.settings.poll).await;
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
        }
    }

    /// After the checkpoint when there is one, else at `TRIM_HORIZON`.
    async fn iterator(&self, key: &str) -> Option<String> {
        let checkpoint =
            self.kv.get(key).await.ok().flatten().map(|value| String::from_utf8_lossy(&value).into_owned());
        let request = self.streams.get_shard_iterator().stream_arn(&self.stream_arn).shard_id(&self.shard_id);
        let request = match checkpoint {
            Some(sequence) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(sequence)
            }
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        request.send().await.ok()?.shard_iterator().map(str::to_owned)
    }
}

/// An image as the original's events hold it: strings, numbers as JSON numbers, booleans, nulls,
/// lists and maps (sets as lists).
fn image(attributes: &HashMap<String, AttributeValue>) -> Json {
    attributes.iter().map(|(name, value)| (name.clone(), attribute(value))).collect::<serde_json::Map<_, _>>().into()
}

fn attribute(value: &AttributeValue) -> Json {
    let number = |text: &str| text.parse::<f64>().map_or(Json::Null, |n| json!(n));
    match value {
        AttributeValue::S(text) => json!(text),
        AttributeValue::N(text) => number(text),
        AttributeValue::Bool(flag) => json!(flag),
        AttributeValue::Null(_) => Json::Null,
        AttributeValue::L(items) => items.iter().map(attribute).collect(),
        AttributeValue::M(map) => image(map),
        AttributeValue::Ss(texts) => json!(texts),
        AttributeValue::Ns(texts) => texts.iter().map(|text| number(text)).collect(),
        _ => Json::Null,
    }
}
