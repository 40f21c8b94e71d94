//! Performing `plan::decide`'s actions and the caller's give-backs as compare-and-swap writes of
//! lease keys: acquisitions, releases, forgets, the fence of an expired session, hand-overs, and the
//! releases and deletes of `release`, `finish` and `shutdown`.
//!
//! Owns the lease writes. Invariants kept: every write is a compare-and-swap at the revision the
//! decision was made from, and a conflict is never retried blindly (only a write of our own lease
//! whose earlier answer was lost is written again, after a read shows it still names us); a guard is
//! revoked before its lease is written free or deleted; a lease is acquired only while the session is
//! valid and the replica is not draining, and an acquisition answered after the session ended, or too
//! late for a guard, is not held.

use std::future::Future;
use std::sync::Arc;

use futures::stream;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Driver, Held, WRITES_IN_FLIGHT, bounded};
use crate::guard::GuardHandle;
use crate::keys::{self, ShardKey};
use crate::lease::{self, LeaseValue, Term};
use crate::messages::{Event, RevokeReason};
use crate::plan::{Action, HeldLease};
use crate::store::{Revision, StoreError, Versioned};

impl Driver {
    pub(super) async fn apply(&mut self, actions: Vec<Action>) {
        let mut acquisitions = Vec::new();
        let mut writes = Vec::new();
        let limit = self.config.op_timeout;
        for action in actions {
            match action {
                Action::Lost { shard } => {
                    if self.held.remove(&shard).is_some() {
                        warn!(replica = %self.me.replica, shard = %shard, "lease no longer ours, stopping the shard");
                        self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
                    }
                }
                Action::HandOver { shard } => {
                    if let Some(held) = self.held.get_mut(&shard) {
                        held.lease.handing_over = true;
                        info!(replica = %self.me.replica, shard = %shard, "handing over a shard");
                        self.emit(Event::HandOver { shard });
                    }
                }
                Action::Acquire { .. } if self.draining || !self.session.valid(&self.timing, Instant::now()) => {}
                Action::Acquire { shard, expected, term } => acquisitions.push((shard, expected, term)),
                Action::Release { shard, expected, term } => {
                    let (store, value) = (Arc::clone(&self.store), lease::encode(&self.lease_value(None, term)));
                    let key = keys::shard_lease_key(&shard);
                    let write =
                        async move { (false, bounded(limit, store.update(&key, value, expected)).await.map(|_| ())) };
                    writes.push(write.boxed());
                }
                Action::Forget { shard, expected } => {
                    let store = Arc::clone(&self.store);
                    let key = keys::shard_lease_key(&shard);
                    writes.push(async move { (false, bounded(limit, store.delete(&key, expected)).await) }.boxed());
                }
                Action::ForgetReplica { key, expected } => {
                    // For a session, this delete is the fence: once it lands, the session's owner can
                    // renew nothing, and its leases are free.
                    let store = Arc::clone(&self.store);
                    writes.push(async move { (true, bounded(limit, store.delete(&key, expected)).await) }.boxed());
                }
            }
        }
        let writes = stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>();
        let results = self.renewing_while(writes).await;
        // A fence that was answered (deleted, or someone moved first): read again at once, to take the
        // leases it frees.
        let fenced =
            results.iter().any(|(fence, result)| *fence && !matches!(result, Err(StoreError::Unavailable { .. })));
        self.acquire(acquisitions).await;
        if fenced {
            self.next_poll = Instant::now();
        }
    }

    async fn acquire(&mut self, wanted: Vec<(ShardKey, Option<Revision>, Term)>) {
        if wanted.is_empty() {
            return;
        }
        let writes = wanted.into_iter().map(|(shard, expected, term)| {
            let write = self.write_own_lease(shard.clone(), expected, term);
            async move {
                let (started, result) = write.await;
                (shard, term, started, result)
            }
        });
        let writes: Vec<_> = writes.collect();
        let epoch = self.session.epoch;
        let results =
            self.renewing_while(stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>()).await;
        for (shard, term, started, result) in results {
            if self.session.epoch != epoch {
                // The session these leases name ended meanwhile: they are free for everyone, not ours.
                break;
            }
            match result {
                Ok(revision) => {
                    let now = Instant::now();
                    // `None`: answered too late to be of use; the next read finds it ours and re-decides.
                    let Some((lease, deadline)) =
                        HeldLease::acquired(&self.timing, &self.session, revision, term, started, now)
                    else {
                        continue;
                    };
                    let (guard_handle, guard) = GuardHandle::issue(shard.clone(), term, deadline);
                    self.held.insert(shard.clone(), Held { lease, guard: guard_handle });
                    info!(replica = %self.me.replica, shard = %shard, term = term.get(), "lease acquired");
                    self.emit(Event::Acquired { shard, guard });
                }
                Err(err) => debug!(replica = %self.me.replica, shard = %shard, error = %err, "lease not acquired"),
            }
        }
    }

    /// Writes `value` over a lease this process owns (deletes it for `None`): on a conflict, re-reads
    /// once and retries if the lease still names this process in this session (an earlier write of
    /// ours landed). An owned future, so that many run at once while the session is renewed.
    fn write_own(
        &self,
        shard: &ShardKey,
        revision: Revision,
        value: Option<LeaseValue>,
    ) -> impl Future<Output = ()> + use<> {
        let (store, me, session) = (Arc::clone(&self.store), self.me.clone(), self.session_number());
        let (key, shard, limit) = (keys::shard_lease_key(shard), shard.clone(), self.config.op_timeout);
        let names_me = move |entry: &Versioned| {
            matches!(
                lease::decode::<LeaseValue>(&entry.value),
                Some(LeaseValue { owner: Some(owner), session: written, .. }) if owner == me && written == session
            )
        };
        async move {
            let mut revision = revision;
            for _ in 0..2 {
                let result = match &value {
                    Some(value) => bounded(limit, store.update(&key, lease::encode(value), revision)).await.map(|_| ()),
                    None => bounded(limit, store.delete(&key, revision)).await,
                };
                match result {
                    Err(StoreError::Conflict { .. }) => match bounded(limit, store.get(&key)).await {
                        Ok(Some(entry)) if names_me(&entry) => revision = entry.revision,
                        _ => return,
                    },
                    Ok(()) => return,
                    Err(err) => {
                        warn!(shard = %shard, error = %err, "cannot write a lease release");
                        return;
                    }
                }
            }
        }
    }

    /// Releases (`finished: false`) or deletes (`finished: true`) held leases, guards revoked first;
    /// the writes go out together while the session is renewed, so a thousand hand-overs do not hold
    /// back the session or the next read.
    pub(super) async fn give_back(&mut self, shards: Vec<(ShardKey, bool)>) {
        let mut writes = Vec::new();
        for (shard, finished) in shards {
            if finished {
                self.finished.insert(shard.clone());
            }
            let Some(held) = self.held.remove(&shard) else { continue };
            held.guard.revoke();
            let value = (!finished).then(|| self.lease_value(None, held.lease.term));
            writes.push(self.write_own(&shard, held.lease.revision, value));
            if finished {
                info!(replica = %self.me.replica, shard = %shard, "shard finished, lease deleted");
            } else {
                info!(replica = %self.me.replica, shard = %shard, "lease released");
            }
        }
        if writes.is_empty() {
            return;
        }
        self.publish_status();
        let writes = stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<()>>();
        self.renewing_while(writes).await;
    }

    pub(super) async fn shutdown(&mut self) {
        let held = std::mem::take(&mut self.held);
        for held in held.values() {
            held.guard.revoke();
        }
        // Presence next (guards first: with sessions, deleting it frees every lease of the session),
        // so peers stop counting this replica before its leases come free.
        if let Some(revision) = self.session.presence.take() {
            let key = keys::presence_key(&self.me.instance);
            let _ = bounded(self.config.op_timeout, self.store.delete(&key, revision)).await;
        }
        // Released one by one as well, for replicas of the previous version (they read no sessions).
        let writes: Vec<_> = held
            .iter()
            .map(|(shard, held)| {
                self.write_own(shard, held.lease.revision, Some(self.lease_value(None, held.lease.term)))
            })
            .collect();
        stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<()>>().await;
        info!(replica = %self.me.replica, released = held.len(), "coordinator stopped, leases released");
        self.publish_status();
    }
}
