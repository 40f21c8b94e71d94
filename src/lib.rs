//! dynamodb-stream-consumer: DynamoDB Streams → NATS JetStream, one JSON event per change record.
//!
//! [`run`] wires the parts and owns the process lifecycle. Shutdown order, written down once:
//! readiness off → no new leases → stop reads (a read in flight is abandoned) → finish in-flight
//! publishes → final checkpoints → release leases → exit, all within `SHUTDOWN_TIMEOUT_SEC`; a second signal aborts at once (peers then take the
//! leases after their TTL).

pub mod checkpoint;
pub mod config;
pub mod filter;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod nats;
pub mod pipeline;
pub mod publish;
pub mod record;
pub mod retry;
pub mod source;
pub mod status;
pub mod tables;
pub mod telemetry;
#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_config::BehaviorVersion;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use backon::Retryable;

use checkpoint::Checkpoints;
use config::Config;
use metrics::Metrics;
use pipeline::fleet::Fleet;
use pipeline::topology::TopologyContext;
use pipeline::{Pipeline, ReadSettings};
use publish::Publisher;
use source::api::StreamsApi;
use source::discovery::Discovery;

/// Longest wait for one attempt of an AWS call; a hung call then counts as transient and is retried.
const AWS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for an AWS call with the SDK's own retries (3 attempts by default).
const AWS_OPERATION_TIMEOUT: Duration = Duration::from_secs(35);

/// Exit code after a second signal cut the graceful shutdown short (128 + SIGINT).
const EXIT_ABORTED: u8 = 130;

/// SIGTERM and SIGINT, as one stream of "stop" requests.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs the service until a signal stops it.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::new()?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(http::Health::new(metrics.clone(), config.replica_id.clone()));
    let _ = health.settings.set((Arc::clone(&config.tables_file), config.tables.clone()));
    for table in &config.tables {
        let settings = config.tables_file.effective(table);
        if let Some(matched) = &settings.matched {
            tracing::info!(table, matched, filter = settings.filter.is_some(), include_attributes = ?settings.include_attributes,
                exclude_attributes = ?settings.exclude_attributes, subject = settings.subject, ttl_deletes = ?settings.ttl_deletes,
                "table settings from TABLES_FILE");
        }
    }
    let http_cancel = CancellationToken::new();
    let address = SocketAddr::new(config.bind, config.port);
    let server = http::serve(address, health.clone(), http_cancel.clone())
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {address} (BIND, PORT): {err}"))?;
    let http_task = tokio::spawn(server);

    let Started { pipeline, topology, store } = tokio::select! {
        started = start(&config, metrics.clone(), &health) => started?,
        signal = signals.next() => {
            tracing::info!(signal, "stopped during start-up");
            http_cancel.cancel();
            return Ok(ExitCode::SUCCESS);
        }
    };

    let root = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (fleet, leases) = Fleet::start(config.clone(), pipeline, topology, store, tracker.clone())?;
    let _ = health.leases.set(leases);
    let _ = health.backfills.set(fleet.backfills());
    let _ = health.tables.set(fleet.tables());
    tracker.spawn(fleet.run(root.clone()));
    health.serving.store(true, Ordering::SeqCst);
    tracing::info!(
        replica_id = %config.replica_id,
        tables = ?config.tables,
        patterns = ?config.selection.patterns,
        tags = ?config.selection.tags,
        "serving"
    );

    let signal = signals.next().await;
    tracing::info!(
        signal,
        timeout_sec = config.shutdown_timeout.as_secs(),
        "shutting down: reads stop, in-flight publishes finish, checkpoints are written, leases are released"
    );
    health.serving.store(false, Ordering::SeqCst);
    root.cancel();
    tracker.close();
    let code = tokio::select! {
        _ = tracker.wait() => {
            tracing::info!("shutdown complete");
            ExitCode::SUCCESS
        }
        _ = tokio::time::sleep(config.shutdown_timeout) => {
            tracing::error!(timeout_sec = config.shutdown_timeout.as_secs(), "shutdown timed out; unacknowledged records will be read again on restart");
            ExitCode::FAILURE
        }
        signal = signals.next() => {
            tracing::warn!(signal, "second signal: aborting shutdown; unacknowledged records will be read again on restart");
            ExitCode::from(EXIT_ABORTED)
        }
    };
    http_cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    Ok(code)
}

/// What start-up connects: the readers' pipeline, the topology watch's context and the lease store.
struct Started {
    pipeline: Arc<Pipeline>,
    topology: TopologyContext,
    /// The checkpoint bucket, where leases and checkpoints are kept.
    store: Arc<dyn coordination::LeaseStore>,
}

/// Connects to NATS and AWS and makes sure the stream and bucket exist.
async fn start(config: &Config, metrics: Arc<Metrics>, health: &http::Health) -> anyhow::Result<Started> {
    let client = connect_nats(config).await?;
    let _ = health.nats.set(client.clone());
    metrics.nats_connected.set(1);
    let js = nats::jetstream(client.clone(), config);
    let duplicate_window = nats::ensure_stream(&js, config).await?;
    nats::report_duplicate_window(&config.stream_name, duplicate_window, &config.lease, &metrics);
    let (bucket, max_value_size) = nats::ensure_bucket(&js, config).await?;
    // A compare-and-swap write carries a header (`Nats-Expected-Last-Subject-Sequence: n`) that counts
    // against the stream's max message size; 128 bytes covers it with room to spare.
    let value_limit =
        max_value_size.unwrap_or(usize::MAX).min(client.max_payload()).saturating_sub(nats::VALUE_HEADROOM);

    // Publishes go through a connection of their own, which a lost lease can fence (src/publish).
    let publish_connection = publish::connection::PublishConnection::new(config.clone(), &client.server_info());
    if let Err(err) = publish_connection.get().await {
        tracing::warn!(error = %err, "publish connection not made yet; the first publishes make it");
    }
    let aws = aws_config(config).await;
    let api = StreamsApi::new(&aws);
    let store: Arc<dyn coordination::LeaseStore> = Arc::new(coordination::NatsKvStore::new(bucket));
    let checkpoints = Checkpoints::new(Arc::clone(&store));
    // Sized once connected and before any page is read: what the process holds now is its fixed part.
    let limit = memory::limit::find(config.memory_limit, std::path::Path::new(memory::limit::CGROUP_ROOT));
    let sizing = memory::Sizing::new(limit, config.memory_limit, &metrics);
    let _ = health.memory.set(sizing.clone());
    let pipeline = Arc::new(Pipeline {
        source: Arc::new(api.clone()),
        sink: Arc::new(Publisher::new(publish_connection, client, metrics.clone())),
        checkpoints: checkpoints.clone(),
        metrics: metrics.clone(),
        progress: Arc::clone(metrics.progress()),
        settings: ReadSettings {
            poll_interval: config.poll_interval,
            poll_gap: config.poll_gap,
            idle_poll_max: config.idle_poll_max,
            max_in_flight: config.max_in_flight,
            quiet_for: config.lease.ttl,
        },
        scan: Arc::new(api.clone()),
        backfill: config.backfill.clone(),
        value_limit,
        memory: sizing.budget,
        tables: Arc::clone(&config.tables_file),
        subject_prefix: config.subject_prefix.clone(),
    });
    let topology = TopologyContext {
        discovery: Discovery { api, checkpoints, metrics, start_from_latest: config.start_from_latest },
        refresh_interval: config.shard_refresh_interval,
        bucket: config.bucket.clone(),
        value_limit,
        unreadable: Arc::clone(&health.unreadable),
    };
    Ok(Started { pipeline, topology, store })
}

/// Connects to NATS, retrying with backoff while no server can be reached. A refusal that a retry
/// cannot fix (credentials, TLS, a malformed address) ends start-up (exit 1) with its reason and the
/// settings to fix.
async fn connect_nats(config: &Config) -> anyhow::Result<async_nats::Client> {
    let client = (|| nats::connect(config))
        .retry(retry::policy())
        .when(|err| matches!(err, nats::SetupError::Unreachable { .. }))
        .notify(|err, delay| {
            if let nats::SetupError::Unreachable { source, urls } = err {
                tracing::warn!(urls, error = %source, retry_in_ms = delay.as_millis() as u64, "NATS unreachable; retrying");
            }
        })
        .await?;
    let urls: Vec<String> = config.nats_urls.iter().map(|url| config::redact_url(url)).collect();
    tracing::info!(?urls, auth = config.nats_auth.mode(), tls = config.nats_tls.required(), "connected to NATS");
    Ok(client)
}

/// The AWS configuration of the service ([`aws_sdk_config`]); its identity is logged beside start-up.
async fn aws_config(config: &Config) -> aws_config::SdkConfig {
    let sdk = aws_sdk_config(config).await;
    // Logged beside start-up, never before ready: a slow STS endpoint (up to `AWS_OPERATION_TIMEOUT`)
    // must not outlast a start-up probe (the original's chart allows 30 s), and nothing waits on it.
    let identity_config = sdk.clone();
    tokio::spawn(async move {
        match aws_sdk_sts::Client::new(&identity_config).get_caller_identity().send().await {
            Ok(identity) => tracing::info!(arn = identity.arn().unwrap_or_default(), "aws identity"),
            Err(err) => tracing::error!(
                error = %aws_smithy_types::error::display::DisplayErrorContext(&err),
                "cannot confirm the AWS identity (sts:GetCallerIdentity); reads will fail until credentials work"
            ),
        }
    });
    sdk
}

/// The AWS configuration, for the service and its operator commands alike: region and credentials
/// from the standard chain, endpoints from the standard `AWS_ENDPOINT_URL*` variables, and, with
/// `AWS_ASSUME_ROLE_ARN`, an assumed role.
pub async fn aws_sdk_config(config: &Config) -> aws_config::SdkConfig {
    let region = aws_config::Region::new(config.aws_region.clone());
    // Without these only the connect timeout applies, and a call that never answers would hang its
    // shard forever. GetRecords answers within a second or two when healthy.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_attempt_timeout(AWS_ATTEMPT_TIMEOUT)
        .operation_timeout(AWS_OPERATION_TIMEOUT)
        .build();
    let base = aws_config::defaults(BehaviorVersion::latest()).region(region).timeout_config(timeouts).load().await;
    match &config.assume_role_arn {
        None => base,
        Some(arn) => {
            // Role session names allow [\w+=,.@-], at most 64 characters; replica ids are a subset.
            let session: String = format!("dynamodb-stream-consumer-{}", config.replica_id).chars().take(64).collect();
            let provider = aws_config::sts::AssumeRoleProvider::builder(arn.clone())
                .session_name(session)
                .configure(&base)
                .build()
                .await;
            base.into_builder()
                .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(provider))
                .build()
        }
    }
}
