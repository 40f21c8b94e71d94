//! Issue 5: every failure of the Streams side and of NATS, produced on purpose against the real binary,
//! a real `nats-server` and the fault-injecting DynamoDB Streams endpoint, and survived with nothing lost.
//!
//! Each test produces one fault and compares what arrived in JetStream with what was written: nothing
//! missing, nothing twice, each item's records in write order. Where no re-publish is expected the
//! stream is created beforehand with a 100 ms duplicate window, so deduplication cannot hide a record
//! published twice; the final comparison is made after a graceful stop, when nothing can arrive late.

#![allow(clippy::unwrap_used)]

mod backfill;
mod backpressure;
mod bucket;
mod harness;
mod memory;
mod nats;
mod network;
mod reads;
mod shards;
mod start;
