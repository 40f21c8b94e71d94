//! [`LeaseStore`] over a NATS JetStream KV bucket (the checkpoint bucket).
//!
//! Owns the translation of async-nats KV results into [`StoreError`]: a wrong-last-revision or
//! already-exists answer is a `Conflict`; everything else is `Unavailable` (a write may have landed).
//! Deleted and purged keys read as absent, as `create` succeeds over them.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;

use super::{LeaseStore, Revision, StoreError, Versioned};

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
}

fn update_error(key: &str, err: kv::UpdateError) -> StoreError {
    match err.kind() {
        UpdateErrorKind::WrongLastRevision => StoreError::Conflict { key: key.to_owned() },
        UpdateErrorKind::InvalidKey => StoreError::InvalidKey { key: key.to_owned() },
        _ => unavailable(err),
    }
}
