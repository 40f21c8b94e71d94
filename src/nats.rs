//! The NATS resources: the connection, the JetStream stream and the checkpoint bucket (SPEC §3).
//!
//! Missing resources are created with the seed's settings. Existing ones are used as they are: each
//! setting that differs from the seed's is a warning, and a stream that would not capture a configured
//! table's subject is a refusal to start, because every publish to it would fail.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::Config;

/// The seed's stream retention: 14 days.
const STREAM_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// The seed's duplicate window (`--dupe-window 2m`), which makes re-publishes idempotent.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to NATS at {urls}: {source}")]
    Connect { urls: String, source: async_nats::ConnectError },
    #[error(
        "stream {stream:?} does not capture subject {subject:?} (its subjects: {subjects:?}); add `{prefix}.>` to its subjects or choose another NATS_STREAM_NAME"
    )]
    NotCaptured { stream: String, subject: String, subjects: Vec<String>, prefix: String },
    #[error("stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
    #[error("checkpoint bucket {bucket:?}: {message}")]
    Bucket { bucket: String, message: String },
}

/// Connects to NATS; the client reconnects on its own afterwards.
pub async fn connect(config: &Config) -> Result<async_nats::Client, SetupError> {
    let urls = config.nats_urls.join(",");
    let addresses: Vec<async_nats::ServerAddr> = config.nats_urls.iter().filter_map(|u| u.parse().ok()).collect();
    async_nats::ConnectOptions::new()
        .name(config.replica_id.clone())
        .max_reconnects(None)
        .connect(addresses)
        .await
        .map_err(|source| SetupError::Connect { urls, source })
}

/// The JetStream context publishes go through, with the configured ack timeout.
pub fn jetstream(client: async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new().timeout(config.publish_timeout).build(client)
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

/// Finds or creates the stream; checks it captures every table's subject.
pub async fn ensure_stream(js: &jetstream::Context, config: &Config) -> Result<(), SetupError> {
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
        js.create_stream(seed_stream_config(config)).await.map_err(|e| fail(e.to_string()))?;
        tracing::info!(stream = %name, subjects = %format!("{}.>", config.subject_prefix), "created stream");
        return Ok(());
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
    Ok(())
}

/// Finds or creates the checkpoint bucket.
pub async fn ensure_bucket(js: &jetstream::Context, config: &Config) -> Result<kv::Store, SetupError> {
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
            Ok(store)
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
            Ok(store)
        }
        Err(err) => Err(fail(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

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
