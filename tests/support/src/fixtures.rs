//! Fixtures for the service's integration tests: DynamoDB tables with streams on the emulator, the
//! service's environment, and everything that arrived in a JetStream stream.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification,
    StreamViewType,
};

use crate::{Moto, NatsServer, free_port};

/// The region every test uses (moto keeps state per region).
pub const REGION: &str = "us-east-1";

/// The AWS configuration of a client of the emulator (test credentials, [`REGION`]).
pub async fn aws_config(moto: &Moto) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(moto.endpoint())
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "tests"))
        .load()
        .await
}

/// The first shard of `table`'s stream (moto keeps one) and its records from `TRIM_HORIZON`, one
/// `GetRecords` page, read as the seed would have read them.
pub async fn first_shard_records(moto: &Moto, table: &str) -> (String, Vec<aws_sdk_dynamodbstreams::types::Record>) {
    let config = aws_config(moto).await;
    let ddb = aws_sdk_dynamodb::Client::new(&config);
    let streams = aws_sdk_dynamodbstreams::Client::new(&config);
    let described = ddb.describe_table().table_name(table).send().await.expect("DescribeTable");
    let arn = described.table.and_then(|t| t.latest_stream_arn).expect("the table has a stream");
    let stream = streams.describe_stream().stream_arn(&arn).send().await.expect("DescribeStream");
    let shards = stream.stream_description.and_then(|d| d.shards).unwrap_or_default();
    let shard_id = shards.first().and_then(|shard| shard.shard_id.clone()).expect("the stream has a shard");
    let iterator = streams
        .get_shard_iterator()
        .stream_arn(&arn)
        .shard_id(&shard_id)
        .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator
        .expect("an iterator");
    let records = streams.get_records().shard_iterator(iterator).send().await.expect("GetRecords").records;
    let records = records.unwrap_or_default();
    (shard_id, records)
}

/// A DynamoDB client on the emulator.
pub async fn dynamodb(moto: &Moto) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&aws_config(moto).await)
}

/// Creates a table keyed by the string `pk`, with a stream of the given view type (`None`: no stream).
pub async fn create_table(ddb: &aws_sdk_dynamodb::Client, name: &str, view: Option<StreamViewType>) {
    let mut request = ddb
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute definition"),
        )
        .key_schema(KeySchemaElement::builder().attribute_name("pk").key_type(KeyType::Hash).build().expect("key"));
    if let Some(view) = view {
        request = request.stream_specification(
            StreamSpecification::builder().stream_enabled(true).stream_view_type(view).build().expect("spec"),
        );
    }
    request.send().await.unwrap_or_else(|err| panic!("create table {name}: {err:?}"));
}

/// The environment for one service process against these servers.
pub fn service_env(nats: &NatsServer, moto: &Moto, tables: &str, http_port: u16) -> Vec<(String, String)> {
    [
        ("DYNAMODB_TABLES", tables.to_owned()),
        ("NATS_URL", nats.url()),
        ("AWS_ENDPOINT_URL", moto.endpoint()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", REGION.to_owned()),
        ("PORT", http_port.to_string()),
        ("BIND", "127.0.0.1".to_owned()),
        ("POLL_INTERVAL_MS", "100".to_owned()),
        ("SHARD_REFRESH_INTERVAL_SEC", "1".to_owned()),
        ("SHUTDOWN_TIMEOUT_SEC", "10".to_owned()),
        ("RUST_LOG", "info".to_owned()),
        // Test logs are read by people and searched for words: text (JSON is the default).
        ("LOG_FORMAT", "text".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A free port for the service's HTTP server.
pub fn http_port() -> u16 {
    free_port()
}

/// One message as stored in the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream_sequence: u64,
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub payload: String,
    /// When JetStream stored it (Unix seconds).
    pub stored_at: f64,
}

impl Stored {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|err| panic!("payload is not JSON ({err}): {}", self.payload))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }
}

/// The stream `name` on `dynamodb_streams.>` with a duplicate window too short (100 ms) to hide a
/// record published twice: what a test that counts duplicates publishes into.
pub fn stream_without_dedup(name: &str) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec!["dynamodb_streams.>".into()],
        duplicate_window: std::time::Duration::from_millis(100),
        ..Default::default()
    }
}

/// Creates the checkpoint bucket `bucket` as the original deployment creates it: values of at most
/// 1 KiB, history 1 (every key the service writes must fit it).
pub async fn original_bucket(js: &async_nats::jetstream::Context, bucket: &str) -> async_nats::jetstream::kv::Store {
    let config = async_nats::jetstream::kv::Config {
        bucket: bucket.to_owned(),
        history: 1,
        max_value_size: 1024,
        ..Default::default()
    };
    js.create_key_value(config).await.unwrap_or_else(|err| panic!("cannot create the bucket {bucket}: {err}"))
}

/// The number of messages in `stream` (0 while it does not exist).
pub async fn message_count(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until `stream` holds at least `count` messages, then returns all of them in stream order.
pub async fn wait_for_messages(
    js: &async_nats::jetstream::Context,
    stream: &str,
    count: u64,
    deadline: Duration,
) -> Vec<Stored> {
    crate::wait_for(&format!("{count} messages in stream {stream}"), deadline, || async {
        (message_count(js, stream).await >= count).then_some(())
    })
    .await;
    all_messages(js, stream).await
}

/// Every message in `stream`, in stream order.
pub async fn all_messages(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Stored> {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let info = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if info.messages == 0 {
        return out;
    }
    for seq in info.first_sequence..=info.last_sequence {
        let Ok(message) = s.get_raw_message(seq).await else { continue };
        let headers = message
            .headers
            .iter()
            .map(|(name, values)| {
                let name: &str = name.as_ref();
                (name.to_owned(), values.first().map(|v| v.as_str().to_owned()).unwrap_or_default())
            })
            .collect();
        out.push(Stored {
            stream_sequence: message.sequence,
            subject: message.subject.to_string(),
            headers,
            payload: String::from_utf8_lossy(&message.payload).into_owned(),
            stored_at: message.time.unix_timestamp_nanos() as f64 / 1e9,
        });
    }
    out
}

/// The sum of every sample of the service's `/metrics` whose line starts with `name_and_labels`
/// (e.g. `dynamodb_stream_consumer_records_published_total{`); 0 when there is none.
pub async fn metric(port: u16, name_and_labels: &str) -> f64 {
    let Ok((_, body)) = crate::http_get(port, "/metrics").await else { return 0.0 };
    body.lines()
        .filter(|line| line.starts_with(name_and_labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
