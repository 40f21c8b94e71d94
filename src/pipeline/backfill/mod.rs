//! Backfill (issue 17, `docs/backfill.md`): a table's existing items published as snapshot rows, then
//! an exact hand-off to the stream.
//!
//! - [`state`]: the keys and values a backfill keeps in the checkpoint bucket.
//! - [`watch`]: each table's backfill moved through its phases (pin, scan, replay), and the segments
//!   to read handed to the fleet, which leases them like shards.
//! - [`segment`]: one scan segment read into snapshot rows, paced by the read budget.
//! - the replay of each shard's changes since the pin runs in the shard reader
//!   (`crate::pipeline::reader`), interleaved with its live reading.

pub mod segment;
pub mod state;
pub mod watch;

use std::collections::BTreeSet;

pub use segment::{ReadBudget, SegmentReader};

/// The backfill settings (`BACKFILL_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillSettings {
    /// Tables backfilled once, the first time the fleet sees them without a backfill in the bucket.
    pub tables: BTreeSet<String>,
    /// Read capacity units per second the fleet's scans spend in all.
    pub read_units_per_sec: f64,
    /// Segments of a scan; `None`: from the table's size.
    pub segments: Option<u32>,
    /// Items per `Scan` call.
    pub page_items: i32,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        BackfillSettings { tables: BTreeSet::new(), read_units_per_sec: 100.0, segments: None, page_items: 1000 }
    }
}
