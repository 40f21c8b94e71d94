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

pub use segment::{ReadBudget, SegmentReader};
