//! Issue 14, item 6: once the stop signal came, a replica takes no more leases (it would only have to
//! give them back a moment later, and a peer would wait for it). Leases it holds are kept until the
//! shutdown releases them.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use coordination::{Config, Coordinator, Event, MemoryStore, ShardKey};

const TTL: Duration = Duration::from_secs(10);

fn shards(range: std::ops::Range<usize>) -> BTreeSet<ShardKey> {
    range.map(|n| ShardKey::for_shard("t", &format!("shardId-{n}"))).collect()
}

#[tokio::test(start_paused = true)]
async fn a_draining_replica_takes_no_new_lease_and_keeps_the_ones_it_holds() {
    let store = Arc::new(MemoryStore::new());
    let (coordinator, mut events) = Coordinator::start(store, Config::new("r1", TTL)).unwrap();
    coordinator.set_shards(shards(0..2));
    let mut held = BTreeSet::new();
    while held.len() < 2 {
        match tokio::time::timeout(TTL, events.recv()).await.unwrap().unwrap() {
            Event::Acquired { shard, .. } => {
                held.insert(shard);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    coordinator.drain();
    coordinator.set_shards(shards(0..4));
    // Three TTLs: free shards 2 and 3 would have been taken within one read of the table.
    let quiet = tokio::time::timeout(3 * TTL, events.recv()).await;
    assert!(quiet.is_err(), "a draining replica acquired or lost a lease: {quiet:?}");
    assert_eq!(coordinator.status().held.iter().cloned().collect::<BTreeSet<_>>(), held);
    coordinator.shutdown().await;
}
