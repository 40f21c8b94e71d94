//! Per-shard progress for `GET /status`: the shards this replica reads, each with its checkpoint, the
//! time of its last acknowledged publish and its lag. Shard readers report into it; nothing else reads
//! it, so a poisoned lock only costs the report, never the pipeline.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::checkpoint::Position;

/// One shard being read, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShardStatus {
    pub table: String,
    pub shard_id: String,
    /// The checkpoint value as stored (a sequence number or `SHARD_END`), if any.
    pub checkpoint: Option<String>,
    /// When the last checkpointed batch was acknowledged (RFC 3339, UTC).
    pub last_publish: Option<String>,
    /// Age of the last record read, in seconds, from `ApproximateCreationDateTime`; 0 when caught up.
    pub lag_seconds: f64,
}

/// The shards being read, by table and shard id.
#[derive(Debug, Default)]
pub struct ShardStatuses(Mutex<BTreeMap<(String, String), ShardStatus>>);

impl ShardStatuses {
    fn update(&self, table: &str, shard_id: &str, change: impl FnOnce(&mut ShardStatus)) {
        let Ok(mut shards) = self.0.lock() else { return };
        let entry = shards.entry((table.to_owned(), shard_id.to_owned())).or_insert_with(|| ShardStatus {
            table: table.to_owned(),
            shard_id: shard_id.to_owned(),
            ..ShardStatus::default()
        });
        change(entry);
    }

    /// A reader started from `position`.
    pub fn started(&self, table: &str, shard_id: &str, position: Option<&Position>) {
        self.update(table, shard_id, |status| status.checkpoint = position.map(Position::encode));
    }

    /// A read returned records this old (0: caught up).
    pub fn read(&self, table: &str, shard_id: &str, lag_seconds: f64) {
        self.update(table, shard_id, |status| status.lag_seconds = lag_seconds.max(0.0));
    }

    /// A checkpoint was written after a publish was acknowledged.
    pub fn checkpointed(&self, table: &str, shard_id: &str, position: Option<&Position>) {
        let now =
            aws_smithy_types::DateTime::from(SystemTime::now()).fmt(aws_smithy_types::date_time::Format::DateTime).ok();
        self.update(table, shard_id, |status| {
            status.checkpoint = position.map(Position::encode);
            status.last_publish = now;
        });
    }

    /// The reader ended.
    pub fn remove(&self, table: &str, shard_id: &str) {
        if let Ok(mut shards) = self.0.lock() {
            shards.remove(&(table.to_owned(), shard_id.to_owned()));
        }
    }

    pub fn snapshot(&self) -> Vec<ShardStatus> {
        self.0.lock().map(|shards| shards.values().cloned().collect()).unwrap_or_default()
    }
}
