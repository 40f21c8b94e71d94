//! The per-shard permission to publish: [`LeaseGuard`].
//!
//! Owns the fence between the lease protocol and the caller's side effects. Invariant kept: a guard
//! is valid only before its deadline — the start of the last successful write that keeps the lease
//! alive (the session key's; with a replica of the previous version about, also the lease's own) +
//! TTL − safety margin, see `DESIGN.md`, "Sessions" — and only while the coordinator that issued it
//! is running and has not revoked it. The deadline is checked against `tokio::time::Instant::now()`
//! at every call, so a guard turns invalid on time even when the coordinator's task is stalled.

use tokio::sync::watch;
use tokio::time::Instant;

use crate::keys::ShardKey;
use crate::lease::Term;

#[derive(Clone, Copy, Debug)]
struct Validity {
    deadline: Instant,
    revoked: bool,
}

/// Why a guard no longer allows publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    #[error("the lease deadline passed without a successful renewal")]
    Expired,
    #[error("the coordinator revoked the lease")]
    Revoked,
    #[error("the coordinator stopped")]
    CoordinatorGone,
}

/// Permission to publish and checkpoint one shard. Check it before each publish batch and each
/// checkpoint write; keep each batch shorter than the safety margin.
#[derive(Clone, Debug)]
pub struct LeaseGuard {
    shard: ShardKey,
    term: Term,
    validity: watch::Receiver<Validity>,
}

impl LeaseGuard {
    /// The shard this guard allows publishing for.
    pub fn shard(&self) -> &ShardKey {
        &self.shard
    }

    /// The tenure this guard belongs to: the term its acquisition wrote (each acquisition writes the
    /// previous term + 1, also when the same process takes a lease again).
    pub fn term(&self) -> Term {
        self.term
    }

    /// `Ok` while the coordinator that issued the guard runs, has not revoked it, and its deadline has
    /// not passed.
    pub fn check(&self) -> Result<(), LeaseLost> {
        if self.validity.has_changed().is_err() {
            return Err(LeaseLost::CoordinatorGone);
        }
        let validity = *self.validity.borrow();
        if validity.revoked {
            Err(LeaseLost::Revoked)
        } else if Instant::now() >= validity.deadline {
            Err(LeaseLost::Expired)
        } else {
            Ok(())
        }
    }

    pub fn is_valid(&self) -> bool {
        self.check().is_ok()
    }

    /// The instant the guard turns invalid unless a renewal (of the session, or of the lease while it
    /// is renewed on its own) moves it first; a revocation may end the guard before it.
    pub fn deadline(&self) -> Instant {
        self.validity.borrow().deadline
    }

    /// Resolves once the guard is no longer valid (for a `select!` beside the shard's work).
    pub async fn lost(&self) -> LeaseLost {
        let mut validity = self.validity.clone();
        loop {
            if let Err(lost) = self.check() {
                return lost;
            }
            let deadline = validity.borrow_and_update().deadline;
            tokio::select! {
                changed = validity.changed() => {
                    if changed.is_err() {
                        return LeaseLost::CoordinatorGone;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

/// The coordinator's side of a guard.
#[derive(Debug)]
pub(crate) struct GuardHandle {
    validity: watch::Sender<Validity>,
}

impl GuardHandle {
    pub(crate) fn issue(shard: ShardKey, term: Term, deadline: Instant) -> (GuardHandle, LeaseGuard) {
        let (validity, receiver) = watch::channel(Validity { deadline, revoked: false });
        (GuardHandle { validity }, LeaseGuard { shard, term, validity: receiver })
    }

    /// Moves the deadline forward (never backward: a late answer to an older write cannot shorten it).
    pub(crate) fn extend(&self, deadline: Instant) {
        self.validity.send_if_modified(|validity| {
            let later = deadline > validity.deadline;
            if later {
                validity.deadline = deadline;
            }
            later
        });
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.validity.borrow().deadline
    }

    pub(crate) fn revoke(&self) {
        self.validity.send_modify(|validity| validity.revoked = true);
    }
}

impl Drop for GuardHandle {
    fn drop(&mut self) {
        self.revoke();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn guard_expires_is_revoked_and_dies_with_its_coordinator() {
        let shard = ShardKey::new("t/s").unwrap();
        let start = Instant::now();
        let (handle, guard) = GuardHandle::issue(shard, Term::new(1), start + Duration::from_secs(8));
        assert_eq!(guard.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(guard.check(), Err(LeaseLost::Expired));
        handle.extend(start + Duration::from_secs(12));
        assert_eq!(guard.check(), Ok(()));
        handle.extend(start + Duration::from_secs(1));
        assert_eq!(guard.deadline(), start + Duration::from_secs(12));
        let waiter = guard.clone();
        let lost = tokio::spawn(async move { waiter.lost().await });
        handle.revoke();
        assert_eq!(lost.await.unwrap(), LeaseLost::Revoked);
        let (handle, guard) = GuardHandle::issue(guard.shard().clone(), Term::new(2), start + Duration::from_secs(60));
        drop(handle);
        assert!(!guard.is_valid());
    }
}
