//! An in-memory [`LeaseStore`] with injectable latency and failures, for tests and simulation.
//!
//! Owns a map of keys to versioned values and a single revision counter (like a JetStream stream
//! sequence, revisions are never reused). With a [`FaultPlan`], every operation runs in its own task:
//! the request travels for `request_delay`, is applied (or lost), and the answer travels back for
//! `response_delay`. The application happens even if the caller stopped waiting, so a write that
//! "timed out" may still land later, as it can over a real network.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::{LeaseStore, Revision, StoreError, Versioned};

/// The kind of a store operation, given to the [`FaultPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Create,
    Update,
    Delete,
    Keys,
}

/// What happens to one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// Time before the operation is applied.
    pub request_delay: Duration,
    /// Time between application and the caller seeing the answer.
    pub response_delay: Duration,
    /// The request is lost: nothing is applied, the caller gets `Unavailable`.
    pub lose_request: bool,
    /// The answer is lost: the operation is applied, the caller gets `Unavailable`.
    pub lose_response: bool,
}

/// Decides the fate of each operation; `client` is the label given to [`MemoryStore::client`].
pub trait FaultPlan: Send {
    fn plan(&mut self, client: &str, op: Op, key: &str) -> Fault;
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Versioned>,
    last_revision: u64,
}

impl State {
    fn write(&mut self, key: &str, value: Bytes) -> Revision {
        self.last_revision += 1;
        let revision = Revision::new(self.last_revision);
        self.entries.insert(key.to_owned(), Versioned { value, revision });
        revision
    }

    fn current(&self, key: &str) -> Option<Revision> {
        self.entries.get(key).map(|entry| entry.revision)
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    faults: Mutex<Option<Box<dyn FaultPlan>>>,
}

/// An in-memory store; clones share the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    client: Arc<str>,
}

impl MemoryStore {
    /// A store that applies every operation at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose operations go through `plan`.
    pub fn with_faults(plan: impl FaultPlan + 'static) -> Self {
        let store = Self::default();
        *store.shared.faults.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(plan));
        store
    }

    /// A handle on the same data whose operations are labelled `client` for the fault plan.
    pub fn client(&self, client: &str) -> Self {
        MemoryStore { shared: Arc::clone(&self.shared), client: Arc::from(client) }
    }

    /// Every key with its value, in key order.
    pub fn dump(&self) -> Vec<(String, Versioned)> {
        let state = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.entries.iter().map(|(key, entry)| (key.clone(), entry.clone())).collect()
    }

    async fn run<T, F>(&self, op: Op, key: &str, apply: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut State) -> Result<T, StoreError> + Send + 'static,
    {
        let fault = {
            let mut faults = self.shared.faults.lock().unwrap_or_else(PoisonError::into_inner);
            faults.as_mut().map(|plan| plan.plan(&self.client, op, key))
        };
        let Some(fault) = fault else {
            return apply(&mut self.shared.state.lock().unwrap_or_else(PoisonError::into_inner));
        };
        let shared = Arc::clone(&self.shared);
        let (answer, answered) = oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(fault.request_delay).await;
            let result = if fault.lose_request {
                Err(StoreError::Unavailable { reason: "injected: request lost".into() })
            } else {
                let result = apply(&mut shared.state.lock().unwrap_or_else(PoisonError::into_inner));
                if fault.lose_response {
                    Err(StoreError::Unavailable { reason: "injected: answer lost".into() })
                } else {
                    result
                }
            };
            tokio::time::sleep(fault.response_delay).await;
            let _ = answer.send(result);
        });
        answered.await.unwrap_or_else(|_| Err(StoreError::Unavailable { reason: "store task ended".into() }))
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let owned = key.to_owned();
        self.run(Op::Get, key, move |state| Ok(state.entries.get(&owned).cloned())).await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        let owned = key.to_owned();
        self.run(Op::Create, key, move |state| match state.current(&owned) {
            Some(_) => Err(StoreError::Conflict { key: owned }),
            None => Ok(state.write(&owned, value)),
        })
        .await
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision, StoreError> {
        let owned = key.to_owned();
        self.run(Op::Update, key, move |state| match state.current(&owned) {
            Some(current) if current == expected => Ok(state.write(&owned, value)),
            _ => Err(StoreError::Conflict { key: owned }),
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Revision) -> Result<(), StoreError> {
        let owned = key.to_owned();
        self.run(Op::Delete, key, move |state| match state.current(&owned) {
            Some(current) if current == expected => {
                // A deletion is a write: it consumes a revision, as a NATS delete marker does.
                state.last_revision += 1;
                state.entries.remove(&owned);
                Ok(())
            }
            _ => Err(StoreError::Conflict { key: owned }),
        })
        .await
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let owned = prefix.to_owned();
        self.run(Op::Keys, prefix, move |state| {
            Ok(state.entries.keys().filter(|key| key.starts_with(&owned)).cloned().collect())
        })
        .await
    }

    /// One consistent read of every key under `prefixes` (one operation for the fault plan).
    async fn scan(&self, prefixes: &[&str]) -> Result<Vec<(String, Versioned)>, StoreError> {
        let owned: Vec<String> = prefixes.iter().map(|prefix| (*prefix).to_owned()).collect();
        self.run(Op::Keys, prefixes.first().copied().unwrap_or_default(), move |state| {
            Ok(state
                .entries
                .iter()
                .filter(|(key, _)| owned.iter().any(|prefix| key.starts_with(prefix.as_str())))
                .map(|(key, entry)| (key.clone(), entry.clone()))
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_write_is_compare_and_swap() {
        let store = MemoryStore::new();
        let first = store.create("k", Bytes::from_static(b"a")).await.unwrap();
        assert!(matches!(store.create("k", Bytes::new()).await, Err(StoreError::Conflict { .. })));
        let second = store.update("k", Bytes::from_static(b"b"), first).await.unwrap();
        assert!(second > first);
        assert!(matches!(store.update("k", Bytes::new(), first).await, Err(StoreError::Conflict { .. })));
        assert!(matches!(store.delete("k", first).await, Err(StoreError::Conflict { .. })));
        store.delete("k", second).await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), None);
        let third = store.create("k", Bytes::from_static(b"c")).await.unwrap();
        assert!(third.get() > second.get() + 1, "a deletion consumes a revision");
        assert_eq!(store.keys("k").await.unwrap(), vec!["k".to_owned()]);
    }

    struct LoseAnswers;
    impl FaultPlan for LoseAnswers {
        fn plan(&mut self, _: &str, _: Op, _: &str) -> Fault {
            Fault { lose_response: true, response_delay: Duration::from_millis(5), ..Fault::default() }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_still_applies_the_write() {
        let store = MemoryStore::with_faults(LoseAnswers);
        assert!(matches!(store.create("k", Bytes::from_static(b"a")).await, Err(StoreError::Unavailable { .. })));
        assert_eq!(store.dump().len(), 1);
    }
}
