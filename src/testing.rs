//! What the unit tests share: a lease from a real coordinator over the in-memory store.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use coordination::{Coordinator, Event, LeaseGuard, MemoryStore, ShardKey};

/// Longest a unit test waits for anything, in virtual time.
pub const DEADLINE: Duration = Duration::from_secs(600);

/// The lease of `shard`, from a coordinator (replica `r1`, the default TTL) over `store`; the
/// coordinator must be kept for the lease to be renewed.
pub async fn lease(store: Arc<MemoryStore>, shard: &ShardKey) -> (Coordinator, LeaseGuard) {
    let config = coordination::Config::new("r1", coordination::DEFAULT_TTL);
    let (coordinator, mut events) = Coordinator::start(store, config).unwrap();
    coordinator.set_shards([shard.clone()]);
    match tokio::time::timeout(DEADLINE, events.recv()).await.unwrap().unwrap() {
        Event::Acquired { guard, .. } => (coordinator, guard),
        other => panic!("unexpected {other:?}"),
    }
}
