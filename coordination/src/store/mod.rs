//! The compare-and-swap key-value store the protocol runs on.
//!
//! Owns the [`LeaseStore`] trait and its vocabulary ([`Revision`], [`Versioned`], [`StoreError`]).
//! Invariant kept by every implementation: a write succeeds only when the key is at the expected
//! revision (or absent, for `create`), and every successful write gives the key a revision that was
//! never used before in the store. A [`StoreError::Conflict`] means "someone else moved: re-read and
//! re-decide", never "retry the same write".

mod memory;
mod nats;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use memory::{Fault, FaultPlan, MemoryStore, Op};
pub use nats::NatsKvStore;

/// The revision of a key: grows with every write to the store (NATS: the stream sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(u64);

impl Revision {
    pub const fn new(revision: u64) -> Self {
        Revision(revision)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A value with the revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub revision: Revision,
}

/// Why a store operation did not happen (or may not have happened).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The key was not at the expected revision (or already existed, for `create`).
    #[error("revision conflict on {key}")]
    Conflict { key: String },
    /// The key is not a valid store key.
    #[error("invalid key {key}")]
    InvalidKey { key: String },
    /// The store did not answer, or answered with an error. A write may still have been applied.
    #[error("store unavailable: {reason}")]
    Unavailable { reason: String },
}

/// A write seen by a watch: the key, its new value (`None` when deleted or purged) and the revision
/// the write gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Bytes>,
    pub revision: Revision,
}

/// A key-value store with compare-and-swap writes: NATS KV in production, [`MemoryStore`] in tests.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// The current value and revision of `key`; `None` when absent or deleted.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `key` only if it is absent (or deleted).
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError>;
    /// Writes `key` only if its current revision is `expected`.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision, StoreError>;
    /// Deletes `key` only if its current revision is `expected`.
    async fn delete(&self, key: &str, expected: Revision) -> Result<(), StoreError>;
    /// The keys (not deleted) that start with `prefix`, in no particular order.
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// The keys (not deleted) under any of `prefixes` with their values. The default reads each key
    /// listed by `keys`.
    async fn scan(&self, prefixes: &[&str]) -> Result<Vec<(String, Versioned)>, StoreError> {
        let mut out = Vec::new();
        for prefix in prefixes {
            for key in self.keys(prefix).await? {
                if let Some(entry) = self.get(&key).await? {
                    out.push((key, entry));
                }
            }
        }
        Ok(out)
    }
    /// Writes to keys under `prefixes` from now on, as they happen. A hint for reading early, never
    /// the source of truth: it may end or miss writes. `None` (the default) when the store cannot
    /// watch; readers then poll alone.
    async fn watch(&self, _prefixes: &[&str]) -> Option<BoxStream<'static, Change>> {
        None
    }
}
