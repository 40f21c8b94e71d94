//! The service under test: its environment against the benchmark's servers, start-up until every shard
//! has a reader, and what it reports over HTTP (`/status`, `/metrics`).

use std::path::Path;
use std::time::Duration;

use streams_emulator::{FaultyStreams, ViewType};
use test_support::{NatsServer, ServiceProcess, free_port, http_get, wait_for};

/// The stream (and subject prefix) the service publishes to: the seed's default.
pub const STREAM: &str = "dynamodb_streams";
/// The KV bucket of checkpoints and leases: the seed's default `CHECKPOINT_BUCKET`.
pub const BUCKET: &str = "dynamodb-stream-checkpoints";
/// The service's metric names start with this.
pub const METRICS: &str = "dynamodb_stream_consumer_";
/// How long the service may take to start, and a replica to get its leases or readers.
pub const START_DEADLINE: Duration = Duration::from_secs(180);

/// The name of the `n`-th one-shard table of the throughput and latency scenarios.
pub fn table(shard: usize) -> String {
    format!("bench-{shard}")
}

/// The environment of one service process reading `tables` from `source`, publishing to `nats`,
/// serving HTTP on `port`; every other setting is the service's default unless `extra` sets it.
pub fn env(
    nats: &NatsServer,
    source: &FaultyStreams,
    tables: &[String],
    port: u16,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let base = [
        ("DYNAMODB_TABLES", tables.join(",")),
        ("NATS_URL", nats.url()),
        ("AWS_ENDPOINT_URL", source.endpoint()),
        ("AWS_ACCESS_KEY_ID", "bench".into()),
        ("AWS_SECRET_ACCESS_KEY", "bench".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("PORT", port.to_string()),
        ("BIND", "127.0.0.1".into()),
        ("RUST_LOG", "warn".into()),
    ];
    base.into_iter().chain(extra.iter().cloned()).map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The servers and the service of one scenario.
pub struct Running {
    pub nats: NatsServer,
    pub source: FaultyStreams,
    pub process: ServiceProcess,
    /// The service's HTTP port.
    pub port: u16,
}

/// Starts a fresh `nats-server`, the synthetic source with `shards` empty one-shard tables, and the
/// service polling idle shards every `poll_interval_ms` (and, after a partial page, waiting the same or
/// the default 250 ms, whichever is shorter); returns once every shard has a reader.
pub async fn start_one_shard_tables(binary: &Path, shards: usize, poll_interval_ms: u64) -> Running {
    start_one_shard_tables_with(binary, shards, poll_interval_ms, &[]).await
}

/// [`start_one_shard_tables`] with the settings `extra` besides.
pub async fn start_one_shard_tables_with(
    binary: &Path,
    shards: usize,
    poll_interval_ms: u64,
    extra: &[(&str, String)],
) -> Running {
    let nats = NatsServer::start().await;
    let source = FaultyStreams::start().await;
    for shard in 0..shards {
        source.create_table(&table(shard), "pk", ViewType::NewAndOldImages);
    }
    let port = free_port();
    let tables: Vec<String> = (0..shards).map(table).collect();
    let mut settings = vec![
        ("POLL_INTERVAL_MS", poll_interval_ms.to_string()),
        ("POLL_GAP_MS", poll_interval_ms.min(250).to_string()),
    ];
    settings.extend(extra.iter().cloned());
    let env = env(&nats, &source, &tables, port, &settings);
    let process = ServiceProcess::start_ready(binary, &env, port, Duration::from_secs(60)).await;
    wait_for_readers(&[port], shards).await;
    Running { nats, source, process, port }
}

/// What one replica's `/status` says: the leases it holds and the shards it has readers on.
pub struct Status {
    pub leases: Vec<String>,
    pub readers: usize,
}

/// The replica's `/status`, or `None` while it does not answer.
pub async fn status(port: u16) -> Option<Status> {
    let (_, body) = http_get(port, "/status").await.ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let leases = status["leases"].as_array()?.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect();
    Some(Status { leases, readers: status["shards"].as_array()?.len() })
}

/// Waits until the replicas on `ports` hold `shards` leases between them and have a reader on each.
pub async fn wait_for_readers(ports: &[u16], shards: usize) {
    wait_for(&format!("{shards} leases and readers"), START_DEADLINE, || async {
        let (mut leases, mut readers) = (0, 0);
        for port in ports {
            let status = status(*port).await?;
            (leases, readers) = (leases + status.leases.len(), readers + status.readers);
        }
        (leases == shards && readers == shards).then_some(())
    })
    .await;
}

/// The service's `/metrics` text (empty while it does not answer).
pub async fn scrape(port: u16) -> String {
    http_get(port, "/metrics").await.map(|(_, body)| body).unwrap_or_default()
}

/// The sum of the samples in `body` of metric `name` (without the prefix) whose labels start with
/// `labels` (e.g. `{change="lost"}`, or `""` for every sample).
pub fn sum(body: &str, name: &str, labels: &str) -> f64 {
    let wanted = format!("{METRICS}{name}{labels}");
    // Without labels, `leases_held` must not match `leases_held_something`.
    let matches = |line: &&str| {
        line.strip_prefix(wanted.as_str()).is_some_and(|rest| !labels.is_empty() || rest.starts_with(['{', ' ']))
    };
    body.lines().filter(matches).filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}
