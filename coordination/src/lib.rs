//! Shard leases over a compare-and-swap key-value store.
//!
//! The lease protocol lands in its own issue; this crate exists so the workspace has its final shape.
