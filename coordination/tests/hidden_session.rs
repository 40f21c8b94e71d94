//! Issue 15: a one-pass read of a bucket that keeps one value per key can miss a key rewritten while
//! the pass runs. A peer whose read misses a live session's key must not take that session's leases
//! as free: it reads every missing session key on its own first. Here the peer's reads never show the
//! holder's session at all (the worst case of that race); the holder must lose nothing but what it
//! hands over, and no shard may have two valid guards at any instant.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use coordination::keys::presence_key;
use coordination::{
    Config, Coordinator, Event, LeaseGuard, LeaseStore, MemoryStore, Revision, ShardKey, StoreError, Versioned,
};

const TTL: Duration = Duration::from_secs(10);

/// A store whose one-pass reads never show `hidden` (direct reads of it still do).
struct Hiding {
    inner: MemoryStore,
    hidden: String,
}

#[async_trait]
impl LeaseStore for Hiding {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }
    async fn create(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        self.inner.create(key, value).await
    }
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision, StoreError> {
        self.inner.update(key, value, expected).await
    }
    async fn delete(&self, key: &str, expected: Revision) -> Result<(), StoreError> {
        self.inner.delete(key, expected).await
    }
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.inner.keys(prefix).await?.into_iter().filter(|key| *key != self.hidden).collect())
    }
    async fn scan(&self, prefixes: &[&str]) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.inner.scan(prefixes).await?.into_iter().filter(|(key, _)| *key != self.hidden).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_missing_from_a_read_is_not_taken_for_gone() {
    let store = MemoryStore::new();
    let shards: Vec<ShardKey> = (0..6).map(|n| ShardKey::for_shard("t", &format!("shardId-{n}"))).collect();
    let mut holder_config = Config::new("holder", TTL);
    holder_config.instance = "holder-instance".into();
    let (holder, mut holder_events) = Coordinator::start(Arc::new(store.client("holder")), holder_config).unwrap();
    holder.set_shards(shards.clone());
    let mut guards: BTreeMap<ShardKey, Vec<(&str, LeaseGuard)>> = BTreeMap::new();
    while guards.len() < shards.len() {
        match tokio::time::timeout(TTL, holder_events.recv()).await.unwrap().unwrap() {
            Event::Acquired { shard, guard } => guards.entry(shard).or_default().push(("holder", guard)),
            other => panic!("unexpected {other:?}"),
        }
    }

    let hiding = Hiding { inner: store.client("peer"), hidden: presence_key("holder-instance") };
    let (peer, mut peer_events) = Coordinator::start(Arc::new(hiding), Config::new("peer", TTL)).unwrap();
    peer.set_shards(shards.clone());
    let end = tokio::time::Instant::now() + 3 * TTL;
    let mut handed_over = 0;
    while tokio::time::Instant::now() < end {
        tokio::select! {
            event = holder_events.recv() => match event.unwrap() {
                // The caller's side of a hand-over: stop, checkpoint, release.
                Event::HandOver { shard } => {
                    handed_over += 1;
                    holder.release(&shard);
                }
                Event::Revoked { shard, reason } => panic!("the holder lost {shard} ({reason:?}) to a peer that could not see its session"),
                Event::Acquired { shard, guard } => guards.entry(shard).or_default().push(("holder", guard)),
            },
            event = peer_events.recv() => match event.unwrap() {
                Event::Acquired { shard, guard } => {
                    let others: Vec<&str> =
                        guards.get(&shard).into_iter().flatten().filter(|(_, g)| g.is_valid()).map(|(r, _)| *r).collect();
                    assert!(others.is_empty(), "{shard} acquired by the peer while {others:?} hold a valid guard");
                    guards.entry(shard).or_default().push(("peer", guard));
                }
                other => panic!("unexpected at the peer: {other:?}"),
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    // Balance still works: the peer got its share by hand-over, and only that way.
    assert_eq!(handed_over, 3, "the holder should hand half of its shards over");
    assert_eq!(peer.status().held.len(), 3);
    peer.shutdown().await;
    holder.shutdown().await;
}
