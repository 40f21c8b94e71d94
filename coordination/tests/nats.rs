//! The lease protocol over a real `nats-server` KV bucket (the production store): two coordinators on
//! separate connections split the shards, a graceful stop hands its leases over at once, and a crash
//! hands them over only after the TTL.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordination::{Config, Coordinator, Event, LeaseGuard, NatsKvStore, Revision, ShardKey, Versioned};
use test_support::{NatsServer, wait_for};
use tokio::time::Instant;

/// Short enough for a quick test, long enough for a loaded 2-core machine: renew every 1 s, read the
/// table every 0.5 s, guards end 0.6 s before peers may consider a lease expired.
const TTL: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(30);

/// What one replica's caller has seen: the guards it holds and when it got each.
#[derive(Default)]
struct Seen {
    guards: Vec<(ShardKey, LeaseGuard, Instant)>,
}

impl Seen {
    fn held(&self) -> BTreeSet<ShardKey> {
        self.guards.iter().filter(|(_, guard, _)| guard.is_valid()).map(|(shard, _, _)| shard.clone()).collect()
    }

    fn acquired_at(&self, shard: &ShardKey) -> Option<Instant> {
        self.guards.iter().rev().find(|(s, guard, _)| s == shard && guard.is_valid()).map(|(_, _, at)| *at)
    }
}

struct Replica {
    /// Shared with the caller task, which releases what the coordinator asks to hand over (as the
    /// service does once its final checkpoint is written).
    coordinator: Arc<Mutex<Option<Coordinator>>>,
    seen: Arc<Mutex<Seen>>,
}

impl Replica {
    async fn shutdown(&self) {
        let coordinator = self.coordinator.lock().unwrap().take().unwrap();
        coordinator.shutdown().await;
    }

    /// Stops the coordinator as a crash would: nothing released.
    fn crash(&self) {
        drop(self.coordinator.lock().unwrap().take());
    }
}

/// Starts a coordinator on its own NATS connection, with a caller that records guards and releases at
/// once on hand-over.
async fn replica(nats: &NatsServer, id: &str, shards: &BTreeSet<ShardKey>) -> Replica {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "dynamodb-stream-checkpoints".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let (coordinator, mut events) = Coordinator::start(Arc::new(NatsKvStore::new(kv)), Config::new(id, TTL)).unwrap();
    coordinator.set_shards(shards.iter().cloned());
    let replica =
        Replica { coordinator: Arc::new(Mutex::new(Some(coordinator))), seen: Arc::new(Mutex::new(Seen::default())) };
    let (coordinator, seen) = (Arc::clone(&replica.coordinator), Arc::clone(&replica.seen));
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Acquired { shard, guard } => seen.lock().unwrap().guards.push((shard, guard, Instant::now())),
                Event::HandOver { shard } => {
                    if let Some(coordinator) = coordinator.lock().unwrap().as_ref() {
                        coordinator.release(&shard);
                    }
                }
                Event::Revoked { .. } => {}
            }
        }
    });
    replica
}

fn shards(count: usize) -> BTreeSet<ShardKey> {
    (0..count).map(|i| ShardKey::for_shard("my.table", &format!("shardId-{i:020}-0000abcd"))).collect()
}

/// Waits until the replicas hold these many shards each, with every shard held exactly once.
async fn wait_for_split(replicas: &[&Replica], all: &BTreeSet<ShardKey>, want: &[usize]) {
    wait_for(&format!("a split of {want:?}"), DEADLINE, || async {
        let held: Vec<BTreeSet<ShardKey>> = replicas.iter().map(|r| r.seen.lock().unwrap().held()).collect();
        let counts: Vec<usize> = held.iter().map(BTreeSet::len).collect();
        let union: BTreeSet<ShardKey> = held.iter().flatten().cloned().collect();
        let total: usize = counts.iter().sum();
        (counts == want && total == all.len() && union == *all).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_split_a_graceful_stop_hands_over_at_once_and_a_crash_after_the_ttl() {
    let nats = NatsServer::start().await;
    let all = shards(4);

    let a = replica(&nats, "replica-a", &all).await;
    wait_for_split(&[&a], &all, &[4]).await;

    // A second replica joins: the first hands two shards over and the second takes them.
    let b = replica(&nats, "replica-b", &all).await;
    wait_for_split(&[&a, &b], &all, &[2, 2]).await;

    // A graceful stop releases at once: the peer takes the shards well before a TTL has passed.
    let moved: BTreeSet<ShardKey> = b.seen.lock().unwrap().held();
    let stopped = Instant::now();
    b.shutdown().await;
    assert!(b.seen.lock().unwrap().held().is_empty(), "guards of a stopped replica are invalid");
    wait_for_split(&[&a], &all, &[4]).await;
    let handover = moved.iter().filter_map(|s| a.seen.lock().unwrap().acquired_at(s)).max().unwrap() - stopped;
    println!("graceful hand-over: peer took the shards after {handover:?} (TTL {TTL:?})");
    assert!(handover < TTL, "a released lease is taken without waiting for expiry ({handover:?})");

    // A third replica joins, then crashes without releasing: its shards are taken only after the TTL.
    let c = replica(&nats, "replica-c", &all).await;
    wait_for_split(&[&a, &c], &all, &[2, 2]).await;
    let orphaned: BTreeSet<ShardKey> = c.seen.lock().unwrap().held();
    let crashed = Instant::now();
    c.crash();
    // The driver task ends when the runtime processes the abort, and its guards with it.
    wait_for("the crashed coordinator's guards to turn invalid", DEADLINE, || async {
        c.seen.lock().unwrap().held().is_empty().then_some(())
    })
    .await;
    wait_for_split(&[&a], &all, &[4]).await;
    let takeover = orphaned.iter().filter_map(|s| a.seen.lock().unwrap().acquired_at(s)).max().unwrap() - crashed;
    println!("crash takeover: peer took the shards after {takeover:?} (TTL {TTL:?})");
    // The crashed lease was last renewed at most one renew interval before the crash.
    let renew = TTL / 3;
    assert!(takeover >= TTL - renew, "an unreleased lease was taken before it could expire ({takeover:?})");

    a.shutdown().await;
}

/// The one-pass read of the lease table: every live key under the prefixes with its value and
/// revision, nothing deleted, nothing outside them (checkpoints share the bucket), and an answer for
/// an empty table rather than a wait for messages that never come.
#[tokio::test(flavor = "multi_thread")]
async fn the_lease_table_is_read_in_one_pass_without_deleted_or_foreign_keys() {
    use coordination::LeaseStore;
    use coordination::keys::PREFIXES;

    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let config = async_nats::jetstream::kv::Config { bucket: "scan".into(), history: 1, ..Default::default() };
    let store = NatsKvStore::new(js.create_key_value(config).await.unwrap());
    let read = || async { tokio::time::timeout(DEADLINE, store.scan(&PREFIXES)).await.unwrap().unwrap() };
    assert!(read().await.is_empty(), "a fresh bucket has no leases");

    store.create("orders.shardId-1", "checkpoint".into()).await.unwrap();
    assert!(read().await.is_empty(), "a checkpoint is not part of the lease table");

    let kept = store.create("lease/shard.a", "1".into()).await.unwrap();
    let kept = store.update("lease/shard.a", "2".into(), kept).await.unwrap();
    let gone = store.create("lease/shard.b", "1".into()).await.unwrap();
    store.delete("lease/shard.b", gone).await.unwrap();
    let replica = store.create("lease/replica.r1", "here".into()).await.unwrap();
    let got: Vec<(String, Versioned)> = read().await;
    let got: Vec<(&str, &[u8], Revision)> =
        got.iter().map(|(key, entry)| (key.as_str(), entry.value.as_ref(), entry.revision)).collect();
    assert_eq!(got, vec![("lease/replica.r1", &b"here"[..], replica), ("lease/shard.a", &b"2"[..], kept)]);
}
