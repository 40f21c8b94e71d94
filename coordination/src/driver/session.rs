//! Keeping what this replica holds alive: the session key's heartbeat, the renewal of each lease
//! (while a replica of the previous version is about), and the revocation of guards that ran out or
//! whose session ended — performed as `plan`'s upkeep ([`crate::plan::Session`],
//! [`crate::plan::HeldLease`]) says.
//!
//! Owns the writes that keep leases alive and the revocations they lead to. Invariants kept: a
//! guard's deadline moves only after a write (started before it) was answered; a guard whose deadline
//! passed is revoked with `RevokeReason::Expired` before anything else is done for its shard; a session
//! whose key a peer deleted revokes every guard before the next session's first write.

use futures::StreamExt;
use futures::stream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Driver, WRITES_IN_FLIGHT, bounded};
use crate::keys::{self, ShardKey};
use crate::lease::{self, LeaseValue, PresenceValue};
use crate::messages::{Event, RevokeReason};
use crate::plan::{self, AfterBeat, Renewal, Renewed, Reread};
use crate::store::{Revision, StoreError, Versioned};

impl Driver {
    /// Revokes every held lease whose deadline has passed.
    pub(super) fn fence(&mut self, now: Instant) {
        let deadlines = self.held.iter().map(|(shard, held)| (shard, held.guard.deadline()));
        for shard in plan::expired(deadlines, now) {
            self.held.remove(&shard);
            warn!(replica = %self.me.replica, shard = %shard, "lease not renewed in time, stopping the shard");
            self.emit(Event::Revoked { shard, reason: RevokeReason::Expired });
        }
    }

    /// The session ended (a peer deleted its key: the fence): every guard is revoked, then a new
    /// session starts, under which this replica takes leases again like any other.
    pub(super) fn end_session(&mut self, why: &str) {
        warn!(replica = %self.me.replica, session = self.session.epoch, held = self.held.len(), why, "session ended, stopping every shard");
        for (shard, held) in std::mem::take(&mut self.held) {
            held.guard.revoke();
            self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
        }
        self.session.end(Instant::now());
    }

    /// Writes the presence key; with sessions it is the session, and a successful write moves every
    /// guard's deadline (one write per renew interval, whatever the number of leases held).
    pub(super) async fn heartbeat(&mut self) {
        let beat = self.session.next_beat();
        let key = keys::presence_key(&self.me.instance);
        let value = lease::encode(&PresenceValue {
            owner: self.me.clone(),
            ttl_ms: lease::millis(self.config.ttl),
            max_leases: self.config.max_leases,
            beat: beat.beat,
            group: self.config.group.clone(),
            session: self.session_number(),
        });
        let started = Instant::now();
        let limit = self.config.op_timeout;
        let result = match beat.expected {
            Some(revision) => bounded(limit, self.store.update(&key, value, revision)).await,
            None => bounded(limit, self.store.create(&key, value)).await,
        };
        let next = match result {
            Ok(revision) => self.session.written(&self.timing, started, revision),
            Err(StoreError::Conflict { .. }) => {
                // Our own earlier write landed (its answer was lost), or a peer deleted the key.
                let reread = match bounded(limit, self.store.get(&key)).await {
                    Ok(Some(entry))
                        if lease::decode::<PresenceValue>(&entry.value).is_some_and(|v| v.owner == self.me) =>
                    {
                        Reread::Mine(entry.revision)
                    }
                    Ok(_) => Reread::NotMine,
                    Err(_) => Reread::Failed,
                };
                self.session.after_conflict(&self.timing, reread, Instant::now())
            }
            Err(err) => {
                debug!(replica = %self.me.replica, error = %err, "presence heartbeat failed");
                self.session.write_failed(&self.timing, Instant::now())
            }
        };
        match next {
            AfterBeat::MoveGuards => {
                self.extend_guards();
                self.read_presences().await;
            }
            AfterBeat::EndSession => self.end_session("the session key was deleted"),
            AfterBeat::Nothing => {}
        }
    }

    /// Rewrites every held lease whose own renewal is due (while leases are renewed one by one).
    pub(super) async fn renew_due(&mut self) {
        let due = plan::renewals_due(self.held.iter().map(|(shard, held)| (shard, &held.lease)), Instant::now());
        if due.is_empty() {
            return;
        }
        let writes = due.into_iter().map(|Renewal { shard, expected, term }| {
            let write = self.write_own_lease(shard.clone(), Some(expected), term);
            async move {
                let (started, result) = write.await;
                (shard, started, result)
            }
        });
        let writes: Vec<_> = writes.collect();
        let results =
            self.renewing_while(stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>()).await;
        for (shard, started, result) in results {
            self.renewed(shard, started, result).await;
        }
    }

    async fn renewed(&mut self, shard: ShardKey, started: Instant, result: Result<Revision, StoreError>) {
        let retry_at = Instant::now() + self.timing.retry_delay();
        match result {
            Ok(revision) => {
                if let Some(held) = self.held.get_mut(&shard) {
                    held.lease.renewed(&self.timing, started, revision);
                }
                if let Some(held) = self.held.get(&shard) {
                    held.guard.extend(held.lease.guard_deadline(&self.timing, &self.session, Instant::now()));
                }
            }
            Err(StoreError::Conflict { .. }) => {
                let key = keys::shard_lease_key(&shard);
                let reread = match bounded(self.config.op_timeout, self.store.get(&key)).await {
                    Ok(Some(entry)) if self.names_me(&entry) => Reread::Mine(entry.revision),
                    Ok(_) => Reread::NotMine,
                    Err(_) => Reread::Failed,
                };
                let held = self.held.get_mut(&shard).map(|held| &mut held.lease);
                if plan::after_renewal_conflict(held, reread, Instant::now(), retry_at) == Renewed::Lost {
                    self.held.remove(&shard);
                    warn!(replica = %self.me.replica, shard = %shard, "lease taken by another replica");
                    self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
                }
            }
            Err(err) => {
                debug!(replica = %self.me.replica, shard = %shard, error = %err, "lease renewal failed");
                if let Some(held) = self.held.get_mut(&shard) {
                    held.lease.renewal_failed(retry_at);
                }
            }
        }
    }

    /// Whether a lease value names this process in its current session.
    fn names_me(&self, entry: &Versioned) -> bool {
        matches!(
            lease::decode::<LeaseValue>(&entry.value),
            Some(LeaseValue { owner: Some(owner), session, .. }) if owner == self.me && session == self.session_number()
        )
    }
}
