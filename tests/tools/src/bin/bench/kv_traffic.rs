//! Writes against the checkpoint bucket, counted by a plain core-NATS subscriber.
//!
//! A KV put is a publish to `$KV.<bucket>.<key>`, so a subscriber on `$KV.<bucket>.>` sees every write
//! of every replica as it happens, and the key tells what was written (`coordination/DESIGN.md`, "Key
//! layout"): lease renewals, acquisitions and releases under `lease/shard.`, replica heartbeats under
//! `lease/replica.`, shard topologies under `topology/`, and the seed's checkpoints `{table}.{shard}`.
//! Requests to the JetStream API (`$JS.API.>`: KV reads, key listings, stream info) are counted too, by
//! kind (`DIRECT.GET`, `CONSUMER.CREATE`, …), to show what a replica's reads of the bucket cost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use test_support::NatsServer;

use crate::service::BUCKET;

/// Counts of writes by kind, and of JetStream API requests.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    pub leases: u64,
    pub heartbeats: u64,
    pub topology: u64,
    pub checkpoints: u64,
    pub api_requests: u64,
    /// JetStream API requests by kind: the upper-case tokens of the subject after `$JS.API.`.
    pub api_kinds: BTreeMap<String, u64>,
}

impl Traffic {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let api_kinds = self
            .api_kinds
            .iter()
            .map(|(kind, count)| (kind.clone(), count - earlier.api_kinds.get(kind).copied().unwrap_or(0)))
            .filter(|(_, count)| *count > 0)
            .collect();
        Traffic {
            leases: self.leases - earlier.leases,
            heartbeats: self.heartbeats - earlier.heartbeats,
            topology: self.topology - earlier.topology,
            checkpoints: self.checkpoints - earlier.checkpoints,
            api_requests: self.api_requests - earlier.api_requests,
            api_kinds,
        }
    }
}

/// The running counters; counting stops when the server goes away.
#[derive(Clone)]
pub struct KvTraffic {
    counts: Arc<[AtomicU64; 5]>,
    api_kinds: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// `DIRECT.GET` for `$JS.API.DIRECT.GET.KV_bucket`: the request's kind without stream or consumer names.
fn api_kind(subject: &str) -> String {
    let tokens = subject.strip_prefix("$JS.API.").unwrap_or(subject).split('.');
    let kind: Vec<&str> = tokens.take_while(|token| token.chars().all(|c| c.is_ascii_uppercase())).collect();
    kind.join(".")
}

impl KvTraffic {
    /// Subscribes to the bucket's writes and to the JetStream API on `nats`; returns once both
    /// subscriptions are registered with the server, so no later write is missed.
    pub async fn watch(nats: &NatsServer) -> KvTraffic {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let writes = client.subscribe(format!("$KV.{BUCKET}.>")).await.unwrap();
        let api = client.subscribe("$JS.API.>").await.unwrap();
        client.flush().await.unwrap();
        let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
        let counting = Arc::clone(&counts);
        let api_kinds: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let kinds = Arc::clone(&api_kinds);
        let prefix = format!("$KV.{BUCKET}.");
        tokio::spawn(async move {
            let _client = client;
            let mut messages = futures::stream::select(writes, api);
            while let Some(message) = messages.next().await {
                let kind = match message.subject.as_str().strip_prefix(prefix.as_str()) {
                    Some(key) if key.starts_with("lease/shard.") => 0,
                    Some(key) if key.starts_with("lease/replica.") => 1,
                    Some(key) if key.starts_with("topology/") => 2,
                    Some(_) => 3,
                    None => {
                        *kinds.lock().unwrap().entry(api_kind(message.subject.as_str())).or_default() += 1;
                        4
                    }
                };
                counting[kind].fetch_add(1, Ordering::Relaxed);
            }
        });
        KvTraffic { counts, api_kinds }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Traffic {
        let count = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Traffic {
            leases: count(0),
            heartbeats: count(1),
            topology: count(2),
            checkpoints: count(3),
            api_requests: count(4),
            api_kinds: self.api_kinds.lock().unwrap().clone(),
        }
    }
}
