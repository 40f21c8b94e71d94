//! The fleet as the checkpoint bucket shows it, read once for a command: which replicas are alive
//! (their presence keys), who holds each shard's lease, and each checkpoint with when it last moved.
//! `checkpoints list`, `status`, `checkpoints set` and `checkpoints rewind` all judge leases here, so
//! they agree on what "held", "expired" and "free" mean.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use coordination::lease::{LeaseValue, PresenceValue};
use coordination::{LeaseStore, NatsKvStore, ShardKey, StoreError, keys};
use dynamodb_stream_consumer::checkpoint::Checkpoints;

/// Who holds a shard's lease, as the bucket shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Held by a replica whose presence key is there (it is alive).
    Held { replica: String, instance: String },
    /// Its holder's presence key is gone: peers take it after its TTL.
    Expired { replica: String },
    /// Released, or never taken.
    Free,
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lease::Held { replica, .. } => write!(f, "held by {replica}"),
            Lease::Expired { replica } => write!(f, "expired (was {replica})"),
            Lease::Free => f.write_str("free"),
        }
    }
}

/// The checkpoint bucket opened for a command: the raw KV store (entries carry their write time)
/// and the service's compare-and-swap wrapper over it.
pub struct Bucket {
    pub name: String,
    pub kv: kv::Store,
    pub store: Arc<dyn LeaseStore>,
}

impl Bucket {
    pub fn new(name: String, kv: kv::Store) -> Self {
        let store: Arc<dyn LeaseStore> = Arc::new(NatsKvStore::new(kv.clone()));
        Bucket { name, kv, store }
    }

    pub fn checkpoints(&self) -> Checkpoints {
        Checkpoints::new(Arc::clone(&self.store))
    }
}

/// The replicas alive and the shard leases, read once.
pub struct Fleet {
    /// Presence values by instance id.
    pub alive: BTreeMap<String, PresenceValue>,
    /// Lease values by lease key.
    leases: BTreeMap<String, LeaseValue>,
}

impl Fleet {
    /// Reads every presence key and every shard lease key.
    pub async fn read(store: &dyn LeaseStore) -> Result<Fleet, StoreError> {
        let mut alive = BTreeMap::new();
        for key in store.keys(keys::REPLICA_PREFIX).await? {
            let presence = store.get(&key).await?.and_then(|entry| serde_json::from_slice(&entry.value).ok());
            if let (Some(instance), Some(presence)) = (key.strip_prefix(keys::REPLICA_PREFIX), presence) {
                alive.insert(instance.to_owned(), presence);
            }
        }
        let mut leases = BTreeMap::new();
        for key in store.keys(keys::SHARD_PREFIX).await? {
            let lease = store.get(&key).await?.and_then(|entry| serde_json::from_slice(&entry.value).ok());
            if let Some(lease) = lease {
                leases.insert(key, lease);
            }
        }
        Ok(Fleet { alive, leases })
    }

    /// Who holds the lease of `shard_id` of `table`.
    pub fn lease_of(&self, table: &str, shard_id: &str) -> Lease {
        let key = keys::shard_lease_key(&ShardKey::for_shard(table, shard_id));
        let Some(owner) = self.leases.get(&key).and_then(|lease| lease.owner.clone()) else { return Lease::Free };
        if self.alive.contains_key(&owner.instance) {
            Lease::Held { replica: owner.replica, instance: owner.instance }
        } else {
            Lease::Expired { replica: owner.replica }
        }
    }

    /// How many shard leases (of any table, backfill segments included) a live instance holds.
    pub fn leases_held_by(&self, instance: &str) -> usize {
        self.leases.values().filter(|lease| lease.owner.as_ref().is_some_and(|o| o.instance == instance)).count()
    }
}

/// One checkpoint as the bucket shows it.
pub struct Row {
    pub table: String,
    pub shard_id: String,
    /// The stored value as it is (empty when unreadable as text).
    pub value: String,
    /// How long ago it was last written, when the bucket says.
    pub moved: Option<Duration>,
    pub lease: Lease,
}

/// Every checkpoint of `tables`, sorted by table (in the order given) and shard.
pub async fn checkpoint_rows(bucket: &Bucket, fleet: &Fleet, tables: &[&str]) -> Result<Vec<Row>, StoreError> {
    let checkpoints = bucket.checkpoints();
    let unavailable = |err: &dyn fmt::Display| StoreError::Unavailable { reason: err.to_string() };
    let mut rows = Vec::new();
    for table in tables {
        let mut shards = checkpoints.shards_of(table).await.map_err(|err| unavailable(&err))?;
        shards.sort();
        for (key, shard_id) in shards {
            let entry = bucket.kv.entry(key).await.map_err(|err| unavailable(&err))?;
            let entry = entry.filter(|entry| entry.operation == kv::Operation::Put);
            let value = entry.as_ref().map(|entry| String::from_utf8_lossy(&entry.value).into_owned());
            let moved = entry.as_ref().and_then(|entry| age(entry.created.unix_timestamp_nanos()));
            let lease = fleet.lease_of(table, &shard_id);
            rows.push(Row { table: (*table).to_owned(), shard_id, value: value.unwrap_or_default(), moved, lease });
        }
    }
    Ok(rows)
}

/// The time since `nanos` after the epoch; `None` when that is ahead of this machine's clock.
fn age(nanos: i128) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_nanos();
    let nanos = u128::try_from(nanos).ok()?;
    now.checked_sub(nanos).map(|ago| Duration::from_nanos(u64::try_from(ago).unwrap_or(u64::MAX)))
}

/// An age as an operator reads it: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..120 => format!("{secs}s ago"),
        120..7_200 => format!("{}m ago", secs / 60),
        7_200..172_800 => format!("{}h ago", secs / 3_600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Left-aligned columns two spaces apart, the first row a header; trailing spaces trimmed.
pub fn columns<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let widths: Vec<usize> = (0..N).map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// `n thing` or `n things`.
pub fn count(n: usize, thing: &str) -> String {
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_the_largest_unit_that_fits() {
        assert_eq!(ago(Duration::from_secs(12)), "12s ago");
        assert_eq!(ago(Duration::from_secs(119)), "119s ago");
        assert_eq!(ago(Duration::from_secs(150)), "2m ago");
        assert_eq!(ago(Duration::from_secs(3 * 3_600 + 5)), "3h ago");
        assert_eq!(ago(Duration::from_secs(3 * 86_400)), "3d ago");
    }

    #[test]
    fn columns_are_aligned_and_trimmed() {
        let rows = [["A".to_owned(), "BB".to_owned()], ["ccc".to_owned(), String::new()]];
        assert_eq!(columns(&rows), ["A    BB", "ccc"]);
    }
}
