//! The messages between the caller's handle and the driver task: the [`Event`]s the caller receives,
//! the [`Command`]s the handle sends, and the [`Status`] the driver publishes.
//!
//! Owns the vocabulary both sides share, so that neither imports the other (the handle starts the
//! driver; the driver knows only these types). Invariant kept: an [`Event::Revoked`] is sent only
//! once the shard's guard is already invalid (the driver revokes first, then tells).

use std::collections::BTreeSet;

use tokio::sync::oneshot;

use crate::guard::LeaseGuard;
use crate::keys::ShardKey;

/// What the coordinator tells its caller.
#[derive(Debug)]
pub enum Event {
    /// This replica now holds `shard`: start reading it, checking `guard` before every publish
    /// batch and checkpoint.
    Acquired { shard: ShardKey, guard: LeaseGuard },
    /// Balance wants `shard` elsewhere: stop reading, write the final checkpoint, then call
    /// [`Coordinator::release`](crate::Coordinator::release). The guard stays valid meanwhile.
    HandOver { shard: ShardKey },
    /// `shard` is lost (the lease was taken, or could not be renewed in time): stop at once; the guard
    /// is already invalid. Do not checkpoint.
    Revoked { shard: ShardKey, reason: RevokeReason },
}

/// Why a shard was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// The guard's deadline passed before a renewal succeeded.
    Expired,
    /// The lease table names another owner (or no owner).
    Lost,
}

/// A snapshot for `/status`, readiness and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Shards this replica holds with a valid guard.
    pub held: BTreeSet<ShardKey>,
    /// Live replicas of this replica's group seen at the last read of the table, this one included.
    pub live_replicas: usize,
    /// Whether the last read of the lease table succeeded.
    pub store_reachable: bool,
    /// Whether held leases are renewed one by one (a replica of the previous version is or was just
    /// present, or sessions are off) rather than through the session alone.
    pub renews_each_lease: bool,
}

/// Messages from the handle to the driver; few (one per shard state change), hence unbounded.
#[derive(Debug)]
pub(crate) enum Command {
    Release(ShardKey),
    Drain,
    Finish(ShardKey),
    Shutdown(oneshot::Sender<()>),
}
