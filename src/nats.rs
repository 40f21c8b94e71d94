//! The NATS resources: the connection, the JetStream stream and the checkpoint bucket (SPEC §3).
//!
//! The connection carries the configured authentication (credentials file, NKey seed, user and
//! password, or token) and TLS (CA, client certificate). A first connection that fails because no
//! server answers is retried by the caller; one that a server refused (credentials, certificates)
//! is a [`SetupError::Refused`] whose message names the settings to fix.
//!
//! Missing resources are created with the seed's settings. Existing ones are used as they are: each
//! setting that differs from the seed's is a warning, and a stream that would not capture a configured
//! table's subject is a refusal to start, because every publish to it would fail.
//!
//! The stream's duplicate window is checked against the lease settings ([`takeover_deduplicated`]):
//! a crashed replica's shards are taken over after up to `LEASE_TTL_SEC` + one renew interval, and the
//! new owner re-publishes what was published after the last checkpoint; JetStream drops those
//! re-publishes only within the window. A window too short for that is a warning, not a refusal: the
//! guarantee is weakened (records may be stored twice after a crash), nothing is lost, and tests use a
//! short window on purpose.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::ConnectOptions;
use async_nats::jetstream::{self, kv, stream};
use async_nats::rustls::Error as TlsError;

use crate::config::{Config, NatsAuth, redact_url};
use crate::metrics::Metrics;

/// The seed's stream retention: 14 days.
const STREAM_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// The seed's duplicate window (`--dupe-window 2m`), which makes re-publishes idempotent.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No server could be reached (refused, timed out, not resolved): worth retrying.
    #[error("cannot connect to NATS at {urls}: {source}")]
    Unreachable { urls: String, source: async_nats::ConnectError },
    /// A server answered, but this configuration cannot connect to it (credentials, TLS): a retry
    /// would fail the same way. `cause` names the settings to fix.
    #[error("NATS at {urls} refused the connection: {cause}")]
    Refused { urls: String, cause: String },
    /// A credentials or seed file could not be loaded when connecting.
    #[error("{variable} {path}: {reason}")]
    File { variable: &'static str, path: String, reason: String },
    #[error(
        "stream {stream:?} does not capture subject {subject:?} (its subjects: {subjects:?}); add `{prefix}.>` to its subjects or choose another NATS_STREAM_NAME"
    )]
    NotCaptured { stream: String, subject: String, subjects: Vec<String>, prefix: String },
    #[error("stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
    #[error("checkpoint bucket {bucket:?}: {message}")]
    Bucket { bucket: String, message: String },
}

/// Connects to NATS; the client reconnects on its own afterwards. Each connection event sets the
/// `nats_connected` gauge and is logged once ([`on_connection_event`]).
pub async fn connect(config: &Config) -> Result<async_nats::Client, SetupError> {
    let urls = config.nats_urls.iter().map(|url| redact_url(url)).collect::<Vec<_>>().join(",");
    let connected_before = Arc::new(AtomicBool::new(false));
    connect_options(config)
        .await?
        .name(config.replica_id.clone())
        .max_reconnects(None)
        .event_callback(move |event| {
            let connected_before = Arc::clone(&connected_before);
            async move { on_connection_event(&event, &connected_before) }
        })
        .connect(server_addresses(config))
        .await
        .map_err(|source| classify(config, urls, source))
}

/// The configured NATS URLs as server addresses (each was checked by `Config::validate`).
pub fn server_addresses(config: &Config) -> Vec<async_nats::ServerAddr> {
    config.nats_urls.iter().filter_map(|url| url.parse().ok()).collect()
}

/// The client options for the configured authentication mode and TLS. With a CA file, only that CA
/// is trusted (not the system's roots); with a CA or a client certificate, TLS is required even if a
/// server does not ask for it, so credentials never travel in clear by mistake.
pub async fn connect_options(config: &Config) -> Result<ConnectOptions, SetupError> {
    let options = ConnectOptions::new();
    let options = match &config.nats_auth {
        NatsAuth::None => options,
        NatsAuth::CredsFile(path) => {
            options.credentials_file(path).await.map_err(|err| file_error("NATS_CREDS_FILE", path, &err))?
        }
        NatsAuth::NkeySeedFile(path) => {
            let seed =
                tokio::fs::read_to_string(path).await.map_err(|err| file_error("NATS_NKEY_SEED_FILE", path, &err))?;
            options.nkey(seed.trim().to_owned())
        }
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::Token(token) => options.token(token.expose().to_owned()),
    };
    let tls = &config.nats_tls;
    let options = match &tls.ca_file {
        Some(ca) => options.add_root_certificates(ca.clone()),
        None => options,
    };
    let options = match &tls.client_cert {
        Some((cert, key)) => options.add_client_certificate(cert.clone(), key.clone()),
        None => options,
    };
    Ok(options.require_tls(tls.required()))
}

fn file_error(variable: &'static str, path: &Path, err: &std::io::Error) -> SetupError {
    SetupError::File { variable, path: path.display().to_string(), reason: err.to_string() }
}

/// Sorts a failed first connection into "unreachable, retry" and "refused, fix the named settings".
/// async-nats reports a TLS handshake failure as an I/O error; the `rustls` error inside tells it
/// apart from a server that is down.
fn classify(config: &Config, urls: String, error: async_nats::ConnectError) -> SetupError {
    use async_nats::ConnectErrorKind as Kind;
    let cause = match error.kind() {
        Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects => {
            if let Some(tls) = find_in_chain::<TlsError>(&error) {
                explain_tls(config, tls)
            } else if let Some(refusal) = find_in_chain::<async_nats::ServerError>(&error)
                .filter(|e| matches!(e, async_nats::ServerError::Other(text) if is_auth_refusal(text)))
            {
                format!("{refusal}: check {}", config.nats_auth.variables())
            } else {
                return SetupError::Unreachable { urls, source: error };
            }
        }
        Kind::AuthorizationViolation => match &config.nats_auth {
            NatsAuth::None => {
                format!(
                    "authorization violation: the server requires authentication and {}",
                    NatsAuth::None.variables()
                )
            }
            NatsAuth::CredsFile(_) => "authorization violation: the server rejected the user JWT of NATS_CREDS_FILE \
                 (unknown, expired or revoked user, or an account the server does not trust)"
                .to_owned(),
            auth => format!("authorization violation: the server rejected the credentials of {}", auth.variables()),
        },
        Kind::Authentication => {
            format!("cannot sign the server's challenge ({error}): check the seed in {}", config.nats_auth.variables())
        }
        Kind::Tls => {
            format!("TLS set-up failed ({error}): check NATS_TLS_CA_FILE, NATS_TLS_CERT_FILE, NATS_TLS_KEY_FILE")
        }
        Kind::ServerParse => format!("{error}: check NATS_URL"),
    };
    SetupError::Refused { urls, cause }
}

/// Server errors during the handshake that mean "these credentials will not do" (as opposed to,
/// say, an authentication timeout on a loaded server).
fn is_auth_refusal(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    (text.contains("authentication") || text.contains("authorization")) && !text.contains("timeout")
}

/// What went wrong in a TLS handshake, and which settings to look at.
fn explain_tls(config: &Config, tls: &TlsError) -> String {
    use async_nats::rustls::{AlertDescription as Alert, CertificateError as Cert};
    let trusted = match &config.nats_tls.ca_file {
        Some(ca) => format!("NATS_TLS_CA_FILE ({})", ca.display()),
        None => "the system's trusted roots (NATS_TLS_CA_FILE is not set)".to_owned(),
    };
    match tls {
        TlsError::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!(
                "TLS: the server's certificate does not name the host in NATS_URL ({tls}); connect by a name it holds"
            )
        }
        TlsError::InvalidCertificate(
            Cert::Expired | Cert::ExpiredContext { .. } | Cert::NotValidYet | Cert::NotValidYetContext { .. },
        ) => format!("TLS: the server's certificate is outside its validity period ({tls})"),
        TlsError::InvalidCertificate(_) => format!("TLS: the server's certificate is not trusted by {trusted} ({tls})"),
        TlsError::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => match &config.nats_tls.client_cert {
            None => format!(
                "TLS: the server requires a client certificate ({tls}): set NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE"
            ),
            Some((cert, _)) => format!(
                "TLS: the server refused the client certificate of NATS_TLS_CERT_FILE ({}): {tls}; it must be signed by a CA the server trusts and be valid",
                cert.display()
            ),
        },
        _ => format!(
            "TLS handshake failed ({tls}): check that the servers speak TLS, and NATS_TLS_CA_FILE, NATS_TLS_CERT_FILE, NATS_TLS_KEY_FILE"
        ),
    }
}

/// The first error of type `E` in `error`'s source chain, looking inside `std::io::Error`s too
/// (whose `source()` skips the error they wrap).
fn find_in_chain<'a, E: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        let wrapped = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if let Some(found) = wrapped.and_then(|inner| inner.downcast_ref::<E>()) {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// Keeps the `nats_connected` gauge and logs the event once. The first connection is logged by
/// start-up; each failed reconnection attempt (a client IO error) only at debug, since async-nats
/// retries without end and the loss itself was logged.
fn on_connection_event(event: &async_nats::Event, connected_before: &AtomicBool) {
    use async_nats::Event;
    let gauge = crate::metrics::nats_connection();
    match event {
        Event::Connected => {
            gauge.set(1);
            if connected_before.swap(true, Ordering::SeqCst) {
                tracing::info!("NATS reconnected");
            }
        }
        Event::Disconnected => {
            gauge.set(0);
            tracing::warn!("NATS connection lost; publishes, checkpoints and lease renewals wait until it is back");
        }
        Event::Closed => {
            gauge.set(0);
            tracing::info!("NATS connection closed");
        }
        Event::ClientError(_) => tracing::debug!(event = %event, "NATS connection event"),
        Event::LameDuckMode | Event::SlowConsumer(_) | Event::ServerError(_) => {
            tracing::warn!(event = %event, "NATS connection event");
        }
        Event::Draining => tracing::info!(event = %event, "NATS connection event"),
    }
}

/// The JetStream context publishes go through, with the configured ack timeout.
pub fn jetstream(client: async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.publish_timeout)
        // `MAX_ACKS_IN_FLIGHT` bounds the memory of a busy replica (each shard's own window is
        // `MAX_IN_FLIGHT`). No waiting for a permit inside a publish: a shard that finds every permit
        // taken awaits its own oldest ack instead (see `Publisher::publish_in_order`). Waiting while
        // holding unawaited acks deadlocks once the shards' windows together exceed the cap.
        .max_ack_inflight(config.max_acks_in_flight)
        .backpressure_on_inflight(false)
        .build(client)
}

/// True when the subject filter `filter` (with `*` and `>` wildcards) matches the literal `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in filter.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(token)) if literal == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// The stream as the seed creates it.
fn seed_stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: config.stream_name.clone(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        retention: stream::RetentionPolicy::Limits,
        max_age: STREAM_MAX_AGE,
        storage: stream::StorageType::File,
        compression: Some(stream::Compression::S2),
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: config.stream_replicas,
        ..Default::default()
    }
}

/// Finds or creates the stream; checks it captures every table's subject. Returns the stream's actual
/// duplicate window.
pub async fn ensure_stream(js: &jetstream::Context, config: &Config) -> Result<Duration, SetupError> {
    let name = config.stream_name.clone();
    let fail = |message: String| SetupError::Stream { stream: name.clone(), message };
    let existing = match js.get_stream(&name).await {
        Ok(mut stream) => Some(stream.info().await.map_err(|e| fail(e.to_string()))?.config.clone()),
        Err(err) => match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                None
            }
            _ => return Err(fail(err.to_string())),
        },
    };
    let Some(existing) = existing else {
        let created = js.create_stream(seed_stream_config(config)).await.map_err(|e| fail(e.to_string()))?;
        tracing::info!(stream = %name, subjects = %format!("{}.>", config.subject_prefix), "created stream");
        return Ok(created.cached_info().config.duplicate_window);
    };
    for table in &config.tables {
        let subject = config.subject_for(table);
        if !existing.subjects.iter().any(|filter| subject_matches(filter, &subject)) {
            return Err(SetupError::NotCaptured {
                stream: name,
                subject,
                subjects: existing.subjects.clone(),
                prefix: config.subject_prefix.clone(),
            });
        }
    }
    let seed = seed_stream_config(config);
    let mut differs = Vec::new();
    if existing.retention != seed.retention {
        differs.push(format!("retention {:?} (seed: Limits)", existing.retention));
    }
    if existing.max_age != seed.max_age {
        differs.push(format!("max age {:?} (seed: 14 days)", existing.max_age));
    }
    if existing.storage != seed.storage {
        differs.push(format!("storage {:?} (seed: File)", existing.storage));
    }
    if existing.compression != seed.compression {
        differs.push(format!("compression {:?} (seed: S2)", existing.compression));
    }
    if existing.duplicate_window != seed.duplicate_window {
        differs.push(format!(
            "duplicate window {:?} (seed: 2 min; re-publishes after a crash are deduplicated only within it)",
            existing.duplicate_window
        ));
    }
    for difference in differs {
        tracing::warn!(stream = %name, %difference, "existing stream differs from the seed's settings; used as it is");
    }
    Ok(existing.duplicate_window)
}

/// The longest time from a replica's crash until its shards' new owner re-publishes what it had
/// published after its last checkpoint: the lease TTL plus one renew interval (`coordination/DESIGN.md`,
/// "Takeover bound").
pub fn crash_takeover(lease: &coordination::Config) -> Duration {
    lease.ttl + lease.renew_interval
}

/// Whether JetStream drops the re-publishes after a crash takeover as duplicates (same `Nats-Msg-Id`):
/// only if they arrive within `window` of the first publish, so the takeover must be shorter.
pub fn takeover_deduplicated(lease: &coordination::Config, window: Duration) -> bool {
    crash_takeover(lease) < window
}

/// Exports the duplicate window of `stream` and whether it covers a crash takeover under `lease`; warns
/// when it does not (called once, at start-up).
pub fn report_duplicate_window(stream: &str, window: Duration, lease: &coordination::Config, metrics: &Metrics) {
    let covered = takeover_deduplicated(lease, window);
    metrics.stream_duplicate_window.set(window.as_secs_f64());
    metrics.duplicate_window_covers_takeover.set(i64::from(covered));
    if !covered {
        tracing::warn!(
            stream = %stream,
            duplicate_window_ms = window.as_millis() as u64,
            lease_ttl_sec = lease.ttl.as_secs(),
            lease_renew_interval_ms = lease.renew_interval.as_millis() as u64,
            takeover_ms = crash_takeover(lease).as_millis() as u64,
            "the stream's duplicate window is not longer than LEASE_TTL_SEC + LEASE_RENEW_INTERVAL_MS: records \
             re-published after a crash takeover may be stored twice; lengthen the stream's duplicate window \
             or shorten the lease settings"
        );
    }
}

/// The smallest max value size the checkpoint bucket may have: the longest value the service writes
/// ([`crate::source::layout::MAX_VALUE`]; a lease or a checkpoint is far shorter) and room for the
/// headers of a compare-and-swap write. The original deployment creates the bucket with 1 KiB.
pub const MIN_VALUE_SIZE: usize = crate::source::layout::MAX_VALUE + VALUE_HEADROOM;

/// What a KV write's headers (`Nats-Expected-Last-Subject-Sequence`, …) take of a bucket's max value
/// size, rounded up.
pub const VALUE_HEADROOM: usize = 128;

/// Finds or creates the checkpoint bucket. Returns it with its max value size (`None`: unlimited);
/// a bucket whose max value size is under [`MIN_VALUE_SIZE`] is refused.
pub async fn ensure_bucket(js: &jetstream::Context, config: &Config) -> Result<(kv::Store, Option<usize>), SetupError> {
    let bucket = config.bucket.clone();
    let fail = |message: String| SetupError::Bucket { bucket: bucket.clone(), message };
    match js.get_key_value(&bucket).await {
        Ok(store) => {
            let mut stream = js.get_stream(format!("KV_{bucket}")).await.map_err(|e| fail(e.to_string()))?;
            let info = stream.info().await.map_err(|e| fail(e.to_string()))?;
            if info.config.max_messages_per_subject != 1 {
                tracing::warn!(bucket = %bucket, history = info.config.max_messages_per_subject, "existing bucket keeps more history than the seed's 1; used as it is");
            }
            if info.config.storage != stream::StorageType::File {
                tracing::warn!(bucket = %bucket, storage = ?info.config.storage, "existing bucket is not file-backed; used as it is");
            }
            let max_value_size = usize::try_from(info.config.max_message_size).ok().filter(|size| *size > 0);
            if let Some(size) = max_value_size.filter(|size| *size < MIN_VALUE_SIZE) {
                return Err(fail(format!(
                    "its max value size is {size} bytes; the service needs at least {MIN_VALUE_SIZE} \
                     (raise it with `nats kv edit {bucket} --max-value-size`, or choose another CHECKPOINT_BUCKET)"
                )));
            }
            Ok((store, max_value_size))
        }
        Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            let store = js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    storage: stream::StorageType::File,
                    num_replicas: config.bucket_replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| fail(e.to_string()))?;
            tracing::info!(bucket = %bucket, "created checkpoint bucket");
            Ok((store, None))
        }
        Err(err) => Err(fail(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ttl_sec: u64, renew_ms: Option<u64>) -> coordination::Config {
        let mut lease = coordination::Config::new("r", Duration::from_secs(ttl_sec));
        if let Some(renew) = renew_ms {
            lease.renew_interval = Duration::from_millis(renew);
        }
        lease
    }

    #[test]
    fn a_crash_takeover_is_deduplicated_only_when_it_is_shorter_than_the_window() {
        // The defaults: 10 s + 10/3 s against the seed's 2 minutes.
        assert_eq!(crash_takeover(&lease(10, None)), Duration::from_secs(10) + Duration::from_secs(10) / 3);
        assert!(takeover_deduplicated(&lease(10, None), DUPLICATE_WINDOW));
        // The test rig's 100 ms window.
        assert!(!takeover_deduplicated(&lease(10, None), Duration::from_millis(100)));
        // 100 s + 20 s is the window exactly: a re-publish at its edge may be stored again.
        assert!(!takeover_deduplicated(&lease(100, Some(20_000)), DUPLICATE_WINDOW));
        assert!(takeover_deduplicated(&lease(100, Some(19_999)), DUPLICATE_WINDOW));
        assert!(!takeover_deduplicated(&lease(3_600, None), DUPLICATE_WINDOW));
    }

    #[test]
    fn the_window_and_the_verdict_are_exported() {
        let metrics = Metrics::new();
        report_duplicate_window("s", Duration::from_millis(100), &lease(10, None), &metrics);
        let text = metrics.encode();
        assert!(text.contains("dynamodb_stream_consumer_stream_duplicate_window_seconds 0.1\n"), "{text}");
        assert!(text.contains("dynamodb_stream_consumer_duplicate_window_covers_takeover 0\n"), "{text}");
        report_duplicate_window("s", DUPLICATE_WINDOW, &lease(10, None), &metrics);
        let text = metrics.encode();
        assert!(text.contains("dynamodb_stream_consumer_stream_duplicate_window_seconds 120\n"), "{text}");
        assert!(text.contains("dynamodb_stream_consumer_duplicate_window_covers_takeover 1\n"), "{text}");
    }

    #[test]
    fn filters_match_subjects() {
        assert!(subject_matches("dynamodb_streams.>", "dynamodb_streams.orders"));
        assert!(subject_matches(">", "dynamodb_streams.orders"));
        assert!(subject_matches("*.orders", "dynamodb_streams.orders"));
        assert!(subject_matches("dynamodb_streams.orders", "dynamodb_streams.orders"));
        assert!(!subject_matches("dynamodb_streams.*", "dynamodb_streams.a.b"));
        assert!(!subject_matches("dynamodb_streams.>", "dynamodb_streams"));
        assert!(!subject_matches("other.>", "dynamodb_streams.orders"));
        assert!(!subject_matches("dynamodb_streams.orders.x", "dynamodb_streams.orders"));
    }
}
