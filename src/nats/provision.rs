//! The JetStream resources (SPEC §3): the stream events are published to and the checkpoint bucket.
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

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use super::SetupError;
use crate::config::Config;
use crate::metrics::Metrics;

/// The seed's stream retention: 14 days.
const STREAM_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// The seed's duplicate window (`--dupe-window 2m`), which makes re-publishes idempotent.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
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

/// Refuses a subject template of `TABLES_FILE` whose subjects the stream's `subjects` would not all
/// capture. A template's subjects are checked as a filter (its shape): the prefix literal, the table
/// literal for a table's own key and for each configured table a pattern applies to (`*` for a
/// pattern that no configured table matches, and for every pattern when tables are discovered by
/// pattern or tag), every token holding a record's value as `*`.
fn templates_captured(config: &Config, stream: &str, subjects: &[String]) -> Result<(), SetupError> {
    let file = &config.tables_file;
    let mut checks: Vec<(String, &crate::tables::SubjectTemplate, Option<&str>)> = Vec::new();
    for table in &config.tables {
        if let Some(settings) = file.lookup(table)
            && let Some(template) = &settings.subject
        {
            checks.push((table.clone(), template, Some(table)));
        }
    }
    for (key, template) in file.templates() {
        let is_pattern = key.contains(['*', '?']);
        if !is_pattern {
            checks.push((key.to_owned(), template, Some(key)));
        } else if config.selection.is_dynamic()
            || !config.tables.iter().any(|table| file.lookup(table).is_some_and(|s| s.key == key))
        {
            // Discovery may select tables the pattern applies to at any time: each must be captured.
            checks.push((key.to_owned(), template, None));
        }
    }
    for (table, template, literal) in checks {
        let shape = template.shape(&config.subject_prefix, literal);
        if !subjects.iter().any(|filter| subject_matches(filter, &shape)) {
            return Err(SetupError::TemplateNotCaptured {
                stream: stream.to_owned(),
                table,
                template: template.text().to_owned(),
                subject: shape,
                subjects: subjects.to_vec(),
            });
        }
    }
    Ok(())
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
    let subjects = existing.as_ref().map_or_else(|| seed_stream_config(config).subjects, |s| s.subjects.clone());
    templates_captured(config, &name, &subjects)?;
    let Some(existing) = existing else {
        let created = js.create_stream(seed_stream_config(config)).await.map_err(|e| fail(e.to_string()))?;
        tracing::info!(stream = %name, subjects = %format!("{}.>", config.subject_prefix), "created stream");
        return Ok(created.cached_info().config.duplicate_window);
    };
    // Each named table's subject, and with patterns or tags every `{prefix}.{table}`: tables discovered
    // later have subjects of their own (a literal `*` token matches only a `*` or `>` filter).
    let named = config.tables.iter().map(|table| config.subject_for(table));
    let discovered = config.selection.is_dynamic().then(|| format!("{}.*", config.subject_prefix));
    for subject in named.chain(discovered) {
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
    fn a_template_the_stream_would_not_capture_is_refused_naming_table_setting_and_subject() {
        let config = |file: &str| {
            let argv = ["consumer", "--dynamodb-tables=orders,itx-a"].map(str::to_owned);
            let mut config = crate::config::Args::parse_with_env(argv, |_| None).unwrap().validate().unwrap();
            config.tables_file = std::sync::Arc::new(crate::tables::TablesFile::parse(file).unwrap());
            config
        };
        let seed = vec!["dynamodb_streams.>".to_owned()];
        let ok = config("tables:\n  orders:\n    subject: '{prefix}.{table}.{event_name}.{key.pk}'\n");
        assert!(templates_captured(&ok, "s", &seed).is_ok());
        let outside = config("tables:\n  'itx-*':\n    subject: 'elsewhere.{table}'\n");
        let err = templates_captured(&outside, "s", &seed).unwrap_err().to_string();
        assert!(err.contains("table \"itx-a\", setting `subject`") && err.contains("\"elsewhere.itx-a\""), "{err}");
        let per_table = vec!["dynamodb_streams.orders".to_owned()];
        let deeper = config("tables:\n  orders:\n    subject: '{prefix}.{table}.{event_name}'\n");
        let err = templates_captured(&deeper, "s", &per_table).unwrap_err().to_string();
        assert!(err.contains("\"dynamodb_streams.orders.*\""), "{err}");
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
        // With discovery, `{prefix}.*` stands for any table's subject: only a wildcard filter takes it.
        assert!(subject_matches("dynamodb_streams.>", "dynamodb_streams.*"));
        assert!(subject_matches("dynamodb_streams.*", "dynamodb_streams.*"));
        assert!(!subject_matches("dynamodb_streams.orders", "dynamodb_streams.*"));
    }
}
