//! [`LeaseStore`] over a NATS JetStream KV bucket (the checkpoint bucket).
//!
//! Owns the translation of async-nats KV results into [`StoreError`]: a wrong-last-revision or
//! already-exists answer is a `Conflict`; everything else is `Unavailable` (a write may have landed).
//! Deleted and purged keys read as absent, as `create` succeeds over them.

use std::collections::BTreeMap;

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{Change, LeaseStore, Revision, StoreError, Versioned};

/// A NATS KV bucket used as a lease store.
#[derive(Clone)]
pub struct NatsKvStore {
    kv: kv::Store,
}

impl NatsKvStore {
    pub fn new(kv: kv::Store) -> Self {
        NatsKvStore { kv }
    }
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { reason: err.to_string() }
}

#[async_trait]
impl LeaseStore for NatsKvStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let entry = self.kv.entry(key).await.map_err(|err| match err.kind() {
            kv::EntryErrorKind::InvalidKey => StoreError::InvalidKey { key: key.to_owned() },
            _ => unavailable(err),
        })?;
        Ok(entry.and_then(|entry| match entry.operation {
            Operation::Put => Some(Versioned { value: entry.value, revision: Revision::new(entry.revision) }),
            Operation::Delete | Operation::Purge => None,
        }))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        match self.kv.create(key, value).await {
            Ok(revision) => Ok(Revision::new(revision)),
            Err(err) => Err(match err.kind() {
                CreateErrorKind::AlreadyExists => StoreError::Conflict { key: key.to_owned() },
                CreateErrorKind::InvalidKey => StoreError::InvalidKey { key: key.to_owned() },
                _ => unavailable(err),
            }),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision, StoreError> {
        match self.kv.update(key, value, expected.get()).await {
            Ok(revision) => Ok(Revision::new(revision)),
            Err(err) => Err(update_error(key, err)),
        }
    }

    async fn delete(&self, key: &str, expected: Revision) -> Result<(), StoreError> {
        self.kv.delete_expect_revision(key, Some(expected.get())).await.map_err(|err| update_error(key, err))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let keys = self.kv.keys().await.map_err(unavailable)?;
        let keys: Vec<String> = keys.try_collect().await.map_err(unavailable)?;
        Ok(keys.into_iter().filter(|key| key.starts_with(prefix)).collect())
    }

    /// One pass over the bucket's stream: an ordered consumer delivers the last value of each key
    /// under `prefixes`. (Reading key by key costs a request per key; on a connection busy with
    /// publishes, a thousand of them outlast the operation time-out.)
    async fn scan(&self, prefixes: &[&str]) -> Result<Vec<(String, Versioned)>, StoreError> {
        let consumer = self
            .kv
            .stream
            .create_consumer(pull::OrderedConfig {
                description: Some("lease table read".to_owned()),
                filter_subjects: filter_subjects(&self.kv.prefix, prefixes),
                deliver_policy: DeliverPolicy::LastPerSubject,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut entries: BTreeMap<String, Versioned> = BTreeMap::new();
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(unavailable)?;
            let info = message.info().map_err(unavailable)?;
            let (revision, pending) = (Revision::new(info.stream_sequence), info.pending);
            let key = message.subject.strip_prefix(self.kv.prefix.as_str()).unwrap_or_default();
            if prefixes.iter().any(|prefix| key.starts_with(prefix)) {
                // Later messages (written during the read) replace earlier ones of the same key.
                if is_removal(message.headers.as_ref()) {
                    entries.remove(key);
                } else {
                    entries.insert(key.to_owned(), Versioned { value: message.payload.clone(), revision });
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(entries.into_iter().collect())
    }

    async fn watch(&self, prefixes: &[&str]) -> Option<futures::stream::BoxStream<'static, Change>> {
        let filters: Vec<String> = prefixes.iter().map(|prefix| format!("{prefix}>")).collect();
        let watch = self.kv.watch_many(filters).await.ok()?;
        // The first error ends the stream: the watch is a hint, and the caller starts another.
        let changes = watch.take_while(|entry| std::future::ready(entry.is_ok())).filter_map(|entry| {
            std::future::ready(entry.ok().map(|entry| Change {
                value: matches!(entry.operation, Operation::Put).then_some(entry.value),
                key: entry.key,
                revision: Revision::new(entry.revision),
            }))
        });
        Some(changes.boxed())
    }
}

/// The subject filters selecting `prefixes` of the bucket whose subjects start with `subject_prefix`
/// (`$KV.{bucket}.`): `{prefix}>` for a prefix ending at a `.`, the whole bucket otherwise (the
/// entries are filtered by prefix after).
fn filter_subjects(subject_prefix: &str, prefixes: &[&str]) -> Vec<String> {
    if prefixes.iter().all(|prefix| prefix.ends_with('.')) {
        prefixes.iter().map(|prefix| format!("{subject_prefix}{prefix}>")).collect()
    } else {
        vec![format!("{subject_prefix}>")]
    }
}

/// Whether a KV message is a delete or purge marker (`KV-Operation: DEL` or `PURGE`).
fn is_removal(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.and_then(|headers| headers.get("KV-Operation")).is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

fn update_error(key: &str, err: kv::UpdateError) -> StoreError {
    match err.kind() {
        UpdateErrorKind::WrongLastRevision => StoreError::Conflict { key: key.to_owned() },
        UpdateErrorKind::InvalidKey => StoreError::InvalidKey { key: key.to_owned() },
        _ => unavailable(err),
    }
}
