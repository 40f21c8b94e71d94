//! The rig every fault test shares: a real `nats-server`, the fault-injecting Streams endpoint with one
//! table, the real service binary, and the checks of what arrived in JetStream against what was written.
//!
//! Every write gives an item its next version (`v = 1, 2, 3, …`) and is remembered with the shard and
//! sequence number it landed on, so a check can say exactly which record is missing, doubled or out of
//! order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;
use streams_emulator::{FaultyStreams, REGION, ViewType};
use test_support::fixtures::{self, Stored};
use test_support::{NatsServer, ServiceProcess, http_get};
use tokio::time::Instant;

/// Seconds since the epoch, as DynamoDB's creation times (and so a first sighting) count them.
pub fn epoch_second() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The one table every test writes to.
pub const TABLE: &str = "orders";
/// The service's stream (and subject prefix), as the seed names it.
pub const STREAM: &str = "dynamodb_streams";
pub const BUCKET: &str = "dynamodb-stream-checkpoints";
/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The stream the tests create before the service starts.
pub enum Window {
    /// A 100 ms duplicate window: JetStream cannot hide a record published twice. For every fault
    /// after which the service must not publish anything again.
    Tiny,
    /// No stream beforehand: the service creates it with the seed's 2-minute window. For faults after
    /// which an unacknowledged publish is re-sent by design (at-least-once; the window absorbs it).
    Seed,
}

/// One record the service must publish: the item, its version, and where the write landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pk: String,
    pub version: u64,
    pub shard_id: String,
    pub sequence_number: String,
}

/// `k0`, `k1`, … `k{n-1}`.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}

pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

pub struct Rig {
    pub nats: NatsServer,
    pub streams: FaultyStreams,
    pub js: jetstream::Context,
    pub port: u16,
    service: Option<ServiceProcess>,
    /// The log of the last service process stopped.
    last_log: String,
    versions: BTreeMap<String, u64>,
    /// Every record written so far, in write order.
    pub written: Vec<Record>,
}

impl Rig {
    pub async fn new(window: Window) -> Rig {
        Rig::with_nats(NatsServer::start().await, window).await
    }

    pub async fn with_nats(nats: NatsServer, window: Window) -> Rig {
        let streams = FaultyStreams::start().await;
        streams.create_table(TABLE, "pk", ViewType::NewAndOldImages);
        let js = jetstream::new(connect(&nats).await);
        if let Window::Tiny = window {
            js.create_stream(stream_config(Duration::from_millis(100))).await.unwrap();
        }
        Rig {
            nats,
            streams,
            js,
            port: fixtures::http_port(),
            service: None,
            last_log: String::new(),
            versions: BTreeMap::new(),
            written: Vec::new(),
        }
    }

    /// The service's environment: the faulty endpoint for every AWS call, short intervals, and `extra`.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let (nats, endpoint, port) = (self.nats.url(), self.streams.endpoint(), self.port.to_string());
        let base = [
            ("DYNAMODB_TABLES", TABLE),
            ("NATS_URL", nats.as_str()),
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", REGION),
            ("PORT", port.as_str()),
            ("BIND", "127.0.0.1"),
            ("REPLICA_ID", "faults"),
            ("POLL_INTERVAL_MS", "100"),
            ("POLL_GAP_MS", "50"),
            ("SHARD_REFRESH_INTERVAL_SEC", "1"),
            ("SHUTDOWN_TIMEOUT_SEC", "10"),
            ("RUST_LOG", "info"),
            ("LOG_FORMAT", "text"),
        ];
        let mut env: BTreeMap<String, String> =
            base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env.retain(|_, value| !value.is_empty());
        env.into_iter().collect()
    }

    /// Starts the service and waits until it is ready.
    pub async fn start(&mut self, extra: &[(&str, &str)]) {
        assert!(self.service.is_none(), "the service runs already");
        let env = self.env(extra);
        self.service = Some(ServiceProcess::start_ready(binary(), &env, self.port, DEADLINE).await);
    }

    /// SIGTERM: the service must exit 0 within 20 s, without a panic.
    pub async fn stop(&mut self) {
        let service = self.service.take().expect("the service runs");
        self.last_log = service.stop_gracefully(Duration::from_secs(20)).await;
    }

    /// The running service's process id.
    pub fn pid(&self) -> Option<u32> {
        self.service.as_ref().map(ServiceProcess::pid)
    }

    /// The running service's log, or the last stopped one's.
    pub fn log(&self) -> String {
        self.service.as_ref().map_or_else(|| self.last_log.clone(), ServiceProcess::log)
    }

    /// The log lines containing every one of `words`.
    pub fn log_lines(&self, words: &[&str]) -> Vec<String> {
        self.log().lines().filter(|line| words.iter().all(|word| line.contains(word))).map(str::to_owned).collect()
    }

    /// Writes the next version of item `pk`; `None` when the write made no record (dropped shard).
    pub fn write(&mut self, pk: &str) -> Option<Record> {
        self.write_with(pk, json!({}))
    }

    /// Writes the next version of item `pk` with the attributes `extra` (DynamoDB JSON) beside `v`.
    pub fn write_with(&mut self, pk: &str, extra: serde_json::Value) -> Option<Record> {
        let version = self.versions.entry(pk.to_owned()).or_default();
        *version += 1;
        let version = *version;
        let mut item = extra;
        item["v"] = json!({ "N": version.to_string() });
        let written = self.streams.write(TABLE, pk, Some(item))?;
        let record =
            Record { pk: pk.to_owned(), version, shard_id: written.shard_id, sequence_number: written.sequence_number };
        self.written.push(record.clone());
        Some(record)
    }

    /// Writes the next version of each key; returns the records made.
    pub fn write_all(&mut self, keys: &[String]) -> Vec<Record> {
        keys.iter().filter_map(|pk| self.write(pk)).collect()
    }

    /// The sum of the samples of `dynamodb_stream_consumer_{name}` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.port, name, labels).await
    }

    /// The status of `GET /readyz` (0 when the service does not answer).
    pub async fn readyz(&self) -> u16 {
        http_get(self.port, "/readyz").await.map(|(status, _)| status).unwrap_or(0)
    }

    /// Polls `check` until it returns `Some`; fails the test after [`DEADLINE`] with the service's log.
    pub async fn until<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        self.until_within(DEADLINE, what, check).await
    }

    /// [`Rig::until`] with another deadline.
    pub async fn until_within<T, F, Fut>(&self, deadline: Duration, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let give_up = Instant::now() + deadline;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() >= give_up {
                panic!("timed out after {deadline:?} waiting for {what}; service log (tail):\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    /// The checkpoint value of `shard_id` (`None`: no key, or NATS does not answer).
    pub async fn checkpoint(&self, shard_id: &str) -> Option<String> {
        let kv = self.js.get_key_value(BUCKET).await.ok()?;
        let value = kv.get(format!("{TABLE}.{shard_id}")).await.ok()??;
        Some(String::from_utf8_lossy(&value).into_owned())
    }

    /// Waits until `shard_id`'s checkpoint says it was read to its end (`SHARD_END…`).
    pub async fn until_finished(&self, shard_id: &str) {
        self.until(&format!("{shard_id} to be read to its end"), || async {
            self.checkpoint(shard_id).await.filter(|value| value.starts_with("SHARD_END")).map(drop)
        })
        .await;
    }

    /// Every key of the checkpoint bucket with its value (deleted keys left out), read in one pass.
    pub async fn bucket(&self) -> BTreeMap<String, bytes::Bytes> {
        use futures::StreamExt;
        let kv = self.js.get_key_value(BUCKET).await.unwrap();
        let mut out = BTreeMap::new();
        let mut entries = kv.watch_all_from_revision(1).await.unwrap();
        // A watch from the first revision delivers every write; `delta` counts what is left.
        let status = kv.status().await.unwrap();
        if status.info.state.messages == 0 {
            return out;
        }
        while let Some(entry) = entries.next().await {
            let entry = entry.unwrap();
            match entry.operation {
                async_nats::jetstream::kv::Operation::Put => out.insert(entry.key.clone(), entry.value.clone()),
                _ => out.remove(&entry.key),
            };
            if entry.delta == 0 {
                break;
            }
        }
        out
    }

    /// The stream ARNs the fleet follows for the table, as stored in the bucket, oldest first.
    pub async fn followed_streams(&self) -> Vec<String> {
        let prefix = format!("topology/{TABLE}/stream.");
        let mut streams: Vec<(u64, String)> = self
            .bucket()
            .await
            .into_iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .map(|(key, value)| {
                let stream: serde_json::Value = serde_json::from_slice(&value).unwrap_or_else(|_| panic!("{key}"));
                (stream["position"].as_u64().unwrap(), stream["arn"].as_str().unwrap().to_owned())
            })
            .collect();
        streams.sort();
        streams.into_iter().map(|(_, arn)| arn).collect()
    }

    /// Waits until the stream holds at least `expected.len()` messages and the checkpoint of every shard
    /// in `expected` covers its last record there (a closed shard's finished checkpoint may also have
    /// been deleted already), so no publish of those records is still under way.
    pub async fn settle(&self, expected: &[Record]) {
        self.settle_within(DEADLINE, expected).await;
    }

    /// [`Rig::settle`], each wait up to `deadline`.
    pub async fn settle_within(&self, deadline: Duration, expected: &[Record]) {
        let count = expected.len() as u64;
        self.until_within(deadline, &format!("{count} messages in the stream"), || async {
            (fixtures::message_count(&self.js, STREAM).await >= count).then_some(())
        })
        .await;
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for record in expected {
            last.insert(&record.shard_id, &record.sequence_number);
        }
        let open = self.streams.open_shards(TABLE);
        for (shard, sequence_number) in last {
            let gone_ok = !open.iter().any(|id| id == shard);
            self.until_within(deadline, &format!("the checkpoint of {shard} to cover {sequence_number}"), || async {
                match self.checkpoint(shard).await {
                    Some(value) => covers(&value, sequence_number).then_some(()),
                    None => gone_ok.then_some(()),
                }
            })
            .await;
        }
    }

    /// Every message in the stream, in stream order.
    pub async fn messages(&self) -> Vec<Stored> {
        fixtures::all_messages(&self.js, STREAM).await
    }

    /// The stream holds exactly `expected`: nothing missing, nothing extra, no record twice, each
    /// item's records in write order, each on the shard it was written to, with its version.
    pub fn assert_exact(&self, messages: &[Stored], expected: &[Record]) {
        let got: Vec<Got> = messages.iter().map(Got::of).collect();
        let context = || format!("stream: {got:#?}\nservice log (tail):\n{}", self.log_tail());
        let mut ids = BTreeSet::new();
        for message in &got {
            assert!(ids.insert(message.msg_id.as_str()), "published twice: {message:?}\n{}", context());
        }
        let by_seq: HashMap<&str, &Record> = expected.iter().map(|r| (r.sequence_number.as_str(), r)).collect();
        let got_seqs: BTreeSet<&str> = got.iter().map(|g| g.sequence_number.as_str()).collect();
        let missing: Vec<&Record> =
            expected.iter().filter(|r| !got_seqs.contains(r.sequence_number.as_str())).collect();
        assert!(missing.is_empty(), "{} records missing: {missing:#?}\n{}", missing.len(), context());
        let extra: Vec<&Got> = got.iter().filter(|g| !by_seq.contains_key(g.sequence_number.as_str())).collect();
        assert!(extra.is_empty(), "records that were not expected: {extra:#?}\n{}", context());
        assert_eq!(got.len(), expected.len());
        for message in &got {
            let record = by_seq[message.sequence_number.as_str()];
            assert_eq!(message.pk, record.pk, "{message:?} is not {record:?}");
            assert_eq!(message.shard_id, record.shard_id, "{message:?} is not {record:?}");
            if let Some(version) = message.version {
                assert_eq!(version, record.version, "{message:?} is not {record:?}");
            }
        }
        let mut want: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for record in expected {
            want.entry(&record.pk).or_default().push(&record.sequence_number);
        }
        let mut have: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for message in &got {
            have.entry(&message.pk).or_default().push(&message.sequence_number);
        }
        for (pk, order) in &want {
            assert_eq!(have.get(pk), Some(order), "item {pk}: records out of write order\n{}", context());
        }
    }
}

/// A client of `nats`, reconnecting for ever. `NatsServer` is ready once `/jsz` answers, which can be a
/// moment before the client port accepts connections (the monitoring port opens first): retried.
async fn connect(nats: &NatsServer) -> async_nats::Client {
    let give_up = Instant::now() + DEADLINE;
    loop {
        match async_nats::ConnectOptions::new().max_reconnects(None).connect(nats.url()).await {
            Ok(client) => return client,
            Err(err) if Instant::now() < give_up => {
                eprintln!("connecting to nats-server at {}: {err}; retrying", nats.url());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot connect to nats-server at {}: {err}", nats.url()),
        }
    }
}

/// The sum of the samples of `dynamodb_stream_consumer_{name}` at the service on `port` whose labels
/// include `labels` (`[("kind", "throttled")]`); 0 when there is none or the service does not answer.
pub async fn metric_at(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Ok((200, body)) = http_get(port, "/metrics").await else { return 0.0 };
    let name = format!("dynamodb_stream_consumer_{name}");
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name && wanted.iter().all(|label| labels.contains(label.as_str()));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A `jetstream::stream::Config` like the seed's stream, with `window` as its duplicate window.
pub fn stream_config(window: Duration) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{STREAM}.>")],
        duplicate_window: window,
        ..Default::default()
    }
}

/// Whether the checkpoint value `value` (a sequence number or `SHARD_END[:seq]`) covers `sequence_number`.
pub fn covers(value: &str, sequence_number: &str) -> bool {
    let last = value.strip_prefix("SHARD_END:").unwrap_or(value);
    match (last.parse::<u128>(), sequence_number.parse::<u128>()) {
        (Ok(last), Ok(wanted)) => last >= wanted,
        _ => false,
    }
}

/// A message as the checks see it.
#[derive(Debug)]
pub struct Got {
    pub stream_sequence: u64,
    pub pk: String,
    /// `None` for an event published without images.
    pub version: Option<u64>,
    pub shard_id: String,
    pub sequence_number: String,
    pub msg_id: String,
}

impl Got {
    pub fn of(message: &Stored) -> Got {
        let json = message.json();
        Got {
            stream_sequence: message.stream_sequence,
            pk: json["keys"]["pk"].as_str().unwrap_or_else(|| panic!("no keys.pk in {json}")).to_owned(),
            version: json["new_image"]["v"].as_u64(),
            shard_id: message.header("Dynamodb-Shard-Id").to_owned(),
            sequence_number: json["sequence_number"].as_str().unwrap().to_owned(),
            msg_id: message.header("Nats-Msg-Id").to_owned(),
        }
    }
}

/// Every message of shard `then` comes after every message of shard `first` in the stream (lineage: a
/// child is read only once its parent is read to its end; a new stream only once the old one is). Both
/// must have messages.
pub fn assert_read_after(messages: &[Stored], first: &str, then: &str) {
    let got: Vec<Got> = messages.iter().map(Got::of).collect();
    let positions =
        |shard: &str| -> Vec<u64> { got.iter().filter(|g| g.shard_id == shard).map(|g| g.stream_sequence).collect() };
    let (of_first, of_then) = (positions(first), positions(then));
    assert!(!of_first.is_empty() && !of_then.is_empty(), "{first} and {then} both need records: {got:#?}");
    let (last_first, first_then) = (of_first.iter().max().unwrap(), of_then.iter().min().unwrap());
    assert!(
        last_first < first_then,
        "shard {then} was published from (stream seq {first_then}) before shard {first} was done \
         (stream seq {last_first}): {got:#?}"
    );
}

/// The last record written to `shard_id`.
pub fn last_in<'r>(records: &'r [Record], shard_id: &str) -> &'r Record {
    records.iter().rfind(|r| r.shard_id == shard_id).unwrap_or_else(|| panic!("no record was written to {shard_id}"))
}

/// What a fault scenario reports: records written, messages in the stream, records stored more than
/// once, records missing, and how often an item's version went backwards in stream order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub written: usize,
    pub in_stream: usize,
    pub duplicates: usize,
    pub missing: usize,
    pub backwards: usize,
}

impl Tally {
    pub fn of(messages: &[Stored], expected: &[Record]) -> Tally {
        let got: Vec<Got> = messages.iter().map(Got::of).collect();
        let mut ids = BTreeSet::new();
        let duplicates = got.iter().filter(|message| !ids.insert(message.msg_id.as_str())).count();
        let stored: BTreeSet<&str> = got.iter().map(|message| message.sequence_number.as_str()).collect();
        let missing = expected.iter().filter(|record| !stored.contains(record.sequence_number.as_str())).count();
        let mut newest: HashMap<&str, u64> = HashMap::new();
        let mut backwards = 0;
        for message in &got {
            let Some(version) = message.version else { continue };
            let seen = newest.entry(message.pk.as_str()).or_default();
            if version < *seen {
                backwards += 1;
            }
            *seen = (*seen).max(version);
        }
        Tally { written: expected.len(), in_stream: got.len(), duplicates, missing, backwards }
    }

    /// Every record once and no version going backwards.
    pub fn is_exact(&self) -> bool {
        self.in_stream == self.written && self.duplicates == 0 && self.missing == 0 && self.backwards == 0
    }
}
