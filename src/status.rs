//! Per-shard progress for `GET /status`: the shards this replica reads, each with its checkpoint, the
//! time of its last acknowledged publish and its lag. Shard readers report into it; nothing else reads
//! it, so a poisoned lock only costs the report, never the pipeline.
//!
//! The field names are a stable contract (operators' scripts read them). Lag is computed when the
//! report is made, from the creation time of the newest record read while behind, so it keeps growing
//! while a shard's records wait, as `lag_seconds` in the metrics does.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Age of the newest record read, in seconds, from `ApproximateCreationDateTime`, while the shard
    /// is behind; 0 once a read came back empty (caught up).
    pub lag_seconds: f64,
    /// Creation time (Unix seconds) of the newest record read while behind; `None` when caught up.
    #[serde(skip)]
    behind_since: Option<f64>,
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
        let behind_since = (lag_seconds > 0.0).then_some(now_secs() - lag_seconds);
        self.update(table, shard_id, |status| {
            status.lag_seconds = lag_seconds.max(0.0);
            status.behind_since = behind_since;
        });
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

    /// Every shard being read, with its lag as of now.
    pub fn snapshot(&self) -> Vec<ShardStatus> {
        let now = now_secs();
        let mut shards: Vec<ShardStatus> =
            self.0.lock().map(|shards| shards.values().cloned().collect()).unwrap_or_default();
        for shard in &mut shards {
            shard.lag_seconds = shard.behind_since.map_or(0.0, |since| (now - since).max(0.0));
        }
        shards
    }
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_grows_while_behind_and_is_zero_when_caught_up() {
        let statuses = ShardStatuses::default();
        statuses.read("t", "s", 3600.0);
        let lag = statuses.snapshot()[0].lag_seconds;
        assert!((3600.0..3700.0).contains(&lag), "{lag}");
        statuses.read("t", "s", 0.0);
        assert_eq!(statuses.snapshot()[0].lag_seconds, 0.0);
        let json = serde_json::to_value(&statuses.snapshot()[0]).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["checkpoint", "lag_seconds", "last_publish", "shard_id", "table"]);
    }
}

/// Why a configured table cannot be read for a reason of the service's own (not AWS's: a missing table
/// or stream is the table's problem and is reported by `table_errors_total`). A `reason` label value.
pub const UNREADABLE_REASONS: [&str; 1] = [VALUE_TOO_LARGE];
/// The table's shard topology does not fit the checkpoint bucket's max value size (or the server's max
/// payload): it cannot be shared, so its shards are not read.
pub const VALUE_TOO_LARGE: &str = "value_too_large";

/// A table that cannot be read for a reason of ours, as `/readyz` and `/status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    pub reason: &'static str,
    pub message: String,
}

/// The configured tables that cannot be read for a reason of ours. While one is here, `/readyz`
/// answers 503 naming it: a replica is never "ready" while a table it serves stays unread.
#[derive(Debug, Default)]
pub struct UnreadableTables(Mutex<BTreeMap<String, Unreadable>>);

impl UnreadableTables {
    /// Marks `table` unreadable; true if it was not already (with the same reason).
    pub fn set(&self, table: &str, reason: &'static str, message: String) -> bool {
        let Ok(mut tables) = self.0.lock() else { return false };
        let fresh = tables.get(table).is_none_or(|known| known.reason != reason);
        tables.insert(table.to_owned(), Unreadable { reason, message });
        fresh
    }

    /// `table` can be read again; true if it was marked.
    pub fn clear(&self, table: &str) -> bool {
        self.0.lock().is_ok_and(|mut tables| tables.remove(table).is_some())
    }

    pub fn snapshot(&self) -> BTreeMap<String, Unreadable> {
        self.0.lock().map(|tables| tables.clone()).unwrap_or_default()
    }
}
