//! The NATS connection (SPEC §3): the configured authentication (credentials file, NKey seed, user and
//! password, or token) and TLS (CA, client certificate). A first connection that fails because no
//! server answers is retried by the caller; one that a server refused (credentials, certificates)
//! is a [`SetupError::Refused`] whose message names the settings to fix. The stream and the bucket
//! it serves are provisioned by `provision`.

mod provision;

pub use provision::{
    MIN_VALUE_SIZE, VALUE_HEADROOM, crash_takeover, ensure_bucket, ensure_stream, report_duplicate_window,
    subject_matches, takeover_deduplicated,
};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::ConnectOptions;
use async_nats::jetstream;
use async_nats::rustls::Error as TlsError;

use crate::config::{Config, NatsAuth, redact_url};

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
    #[error(
        "TABLES_FILE: table {table:?}, setting `subject` ({template:?}): stream {stream:?} does not capture subject {subject:?} (its subjects: {subjects:?}; `*` stands for a record's value); change the template or the stream's subjects"
    )]
    TemplateNotCaptured { stream: String, table: String, template: String, subject: String, subjects: Vec<String> },
    #[error("stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
    #[error("checkpoint bucket {bucket:?}: {message}")]
    Bucket { bucket: String, message: String },
}

/// Connects to NATS; the client reconnects on its own afterwards. Each connection event sets the
/// `nats_connected` gauge and is logged once (`on_connection_event`).
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
