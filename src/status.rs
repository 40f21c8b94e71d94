//! What `/status` and the metrics report about this replica's work, derived once:
//! - [`ShardProgress`], the shards this replica reads, each with its checkpoint, the time of its last
//!   acknowledged publish and how far behind it is. Shard readers report into it; `/status` lists it
//!   and the metrics' `lag_seconds` and `shard_readers` are computed from it when scraped. Nothing
//!   else reads it, so a poisoned lock only costs the report, never the pipeline.
//! - [`UnreadableTables`], the configured tables that cannot be read for a reason of ours (`/readyz`).
//!
//! The field names are a stable contract (operators' scripts read them). Lag is computed when the
//! report is made, from the creation time of the newest record read while behind, so it keeps growing
//! while a shard's records wait (NATS down, publishes failing) instead of freezing at the last read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::checkpoint::Position;
use crate::metrics::UnreadableReason;

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

/// Per table: the largest lag of its shards and how many are read here.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TableProgress {
    pub lag_seconds: f64,
    pub readers: usize,
}

/// The shards being read here, by table and shard id: the one record of their progress.
#[derive(Debug, Default)]
pub struct ShardProgress(Mutex<BTreeMap<(String, String), ShardStatus>>);

impl ShardProgress {
    fn update(&self, table: &str, shard_id: &str, change: impl FnOnce(&mut ShardStatus)) {
        let Ok(mut shards) = self.0.lock() else { return };
        let entry = shards.entry((table.to_owned(), shard_id.to_owned())).or_insert_with(|| ShardStatus {
            table: table.to_owned(),
            shard_id: shard_id.to_owned(),
            ..ShardStatus::default()
        });
        change(entry);
    }

    /// A reader started from `position` (caught up until its first read says otherwise).
    pub fn started(&self, table: &str, shard_id: &str, position: Option<&Position>) {
        self.update(table, shard_id, |status| status.checkpoint = position.map(Position::encode));
    }

    /// A read returned records, the newest created at `newest` (Unix seconds); `None` when it came
    /// back empty (caught up).
    pub fn read(&self, table: &str, shard_id: &str, newest: Option<f64>) {
        let now = now_secs();
        self.update(table, shard_id, |status| {
            status.behind_since = newest.filter(|created| *created < now);
            status.lag_seconds = lag_at(now, status.behind_since);
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
    pub fn ended(&self, table: &str, shard_id: &str) {
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
            shard.lag_seconds = lag_at(now, shard.behind_since);
        }
        shards
    }

    /// Per table with a shard read here: its most behind shard's lag as of now, and its readers.
    pub fn by_table(&self) -> BTreeMap<String, TableProgress> {
        let now = now_secs();
        let mut tables: BTreeMap<String, TableProgress> = BTreeMap::new();
        let Ok(shards) = self.0.lock() else { return tables };
        for ((table, _), status) in shards.iter() {
            let entry = tables.entry(table.clone()).or_default();
            entry.lag_seconds = entry.lag_seconds.max(lag_at(now, status.behind_since));
            entry.readers += 1;
        }
        tables
    }
}

/// Seconds behind at `now` for a shard whose newest record read was created at `behind_since`
/// (`None`: its last read came back empty, so it is caught up).
fn lag_at(now: f64, behind_since: Option<f64>) -> f64 {
    behind_since.map_or(0.0, |since| (now - since).max(0.0))
}

/// Seconds since the Unix epoch, as DynamoDB's `ApproximateCreationDateTime` counts them.
pub fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_grows_while_behind() {
        assert_eq!(lag_at(100.0, None), 0.0);
        assert_eq!(lag_at(100.0, Some(90.0)), 10.0);
        assert_eq!(lag_at(130.0, Some(90.0)), 40.0);
        // A creation time ahead of this clock is no lag.
        assert_eq!(lag_at(100.0, Some(105.0)), 0.0);
    }

    #[test]
    fn a_shard_is_behind_by_its_newest_record_until_a_read_comes_back_empty() {
        let progress = ShardProgress::default();
        progress.read("t", "s", Some(now_secs() - 3600.0));
        let lag = progress.snapshot()[0].lag_seconds;
        assert!((3600.0..3700.0).contains(&lag), "{lag}");
        progress.read("t", "s", None);
        assert_eq!(progress.snapshot()[0].lag_seconds, 0.0);
        let json = serde_json::to_value(&progress.snapshot()[0]).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["checkpoint", "lag_seconds", "last_publish", "shard_id", "table"]);
    }

    #[test]
    fn a_table_reports_its_most_behind_shard_and_its_readers() {
        let progress = ShardProgress::default();
        progress.started("t", "a", None);
        progress.read("t", "b", Some(now_secs() - 3600.0));
        let table = progress.by_table()["t"];
        assert!((3600.0..3700.0).contains(&table.lag_seconds), "{table:?}");
        assert_eq!(table.readers, 2);
        progress.read("t", "b", None);
        progress.ended("t", "a");
        assert_eq!(progress.by_table()["t"], TableProgress { lag_seconds: 0.0, readers: 1 });
    }
}

/// A table that cannot be read for a reason of ours, as `/readyz` and `/status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    pub reason: UnreadableReason,
    pub message: String,
}

/// The configured tables that cannot be read for a reason of ours. While one is here, `/readyz`
/// answers 503 naming it: a replica is never "ready" while a table it serves stays unread.
#[derive(Debug, Default)]
pub struct UnreadableTables(Mutex<BTreeMap<String, Unreadable>>);

impl UnreadableTables {
    /// Marks `table` unreadable; true if it was not already (with the same reason).
    pub fn set(&self, table: &str, reason: UnreadableReason, message: String) -> bool {
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
