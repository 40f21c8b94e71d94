//! The pure decision core: from the observed lease table and `now` to a list of [`Action`]s, and
//! from what this replica holds to what keeps it alive ([`upkeep`]: renewal timing, guard deadlines,
//! revocations, heartbeats, adoption of our own writes).
//!
//! Owns the assignment rules. No I/O and no clock: the driver passes `now`. This file reads the table
//! (what is up for taking, who is live, what is garbage); `balance` shares the leases out. Invariants
//! kept:
//! - a lease held by someone else is taken only when it is free (released or absent), when the session
//!   it names is gone, or (for a lease of the previous version, which names no session) when it expired:
//!   its revision has not changed for the longer of both TTLs, as observed locally. A lease whose
//!   session expired is not taken: the session key is deleted first (the fence, see `DESIGN.md`), and
//!   its leases are free from the read that no longer finds it;
//! - only live replicas of this replica's group (those that serve the same shards) share them: a
//!   replica of another group never lowers this one's share, and a lease it holds counts as taken;
//! - free leases go to the least-loaded live replica of the group (ties by owner), so replicas with the
//!   same view agree on who takes what;
//! - a replica hands over only when moving one lease from the most-loaded replica of its group to the
//!   least-loaded one narrows a gap of two or more (or it holds more than its cap): a group whose loads
//!   differ by at most one decides nothing, so a stable fleet (of one group or several) makes no lease
//!   moves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::keys::ShardKey;
use crate::lease::{Owner, Term};
use crate::store::Revision;

mod balance;
pub mod upkeep;

pub use upkeep::{
    AfterBeat, Beat, HeldLease, Renewal, Renewed, Reread, Session, Switch, Timing, adopt_own_writes,
    after_renewal_conflict, expired, next_wake, renewals_due,
};
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

/// Who a lease key names, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Released: may be taken at once.
    Free,
    /// Held by `owner`, whose TTL is `ttl`, in its session `session` (`None`: a lease of the previous
    /// version, renewed on its own).
    Owned { owner: Owner, ttl: Duration, session: Option<u64> },
    /// A value this version cannot read: treated as held by an unknown owner.
    Unreadable,
}

/// A lease key as observed by this replica.
#[derive(Clone, Debug)]
pub struct LeaseSeen {
    pub revision: Revision,
    /// When this replica first saw this revision (its own monotonic clock).
    pub first_seen: Instant,
    pub holder: Holder,
    pub term: Term,
    /// Since when (locally observed) the session this lease names has been missing from the table:
    /// the lease is free from then on. Kept by the driver with [`session_gone`].
    pub orphaned_since: Option<Instant>,
}

/// A presence key as observed by this replica.
#[derive(Clone, Debug)]
pub struct ReplicaSeen {
    pub owner: Owner,
    pub revision: Revision,
    pub first_seen: Instant,
    pub ttl: Duration,
    pub max_leases: Option<usize>,
    /// The group its presence value names (empty when written before groups existed).
    pub group: String,
    /// Its session number; `None` for a replica of the previous version (it renews each lease).
    pub session: Option<u64>,
}

/// Whether `holder` names a session that the presence keys read with it no longer show (deleted by a
/// fence or a shutdown, or replaced by a newer session of the same process). A lease of the previous
/// version names no session and is never orphaned.
pub fn session_gone(holder: &Holder, replicas: &BTreeMap<String, ReplicaSeen>) -> bool {
    let Holder::Owned { owner, session: Some(session), .. } = holder else { return false };
    !replicas
        .get(&crate::keys::presence_key(&owner.instance))
        .is_some_and(|seen| seen.owner == *owner && seen.session == Some(*session))
}

/// Everything a decision depends on.
#[derive(Debug)]
pub struct View<'a> {
    pub now: Instant,
    pub me: &'a Owner,
    pub ttl: Duration,
    pub max_leases: Option<usize>,
    /// This replica's group: only live replicas of the same group share its shards.
    pub group: &'a str,
    /// This replica's session number, `None` when it renews each lease (the previous version's
    /// protocol, which judges every lease by its own revision).
    pub session: Option<u64>,
    /// The shards the caller wants read (finished ones removed).
    pub shards: &'a BTreeSet<ShardKey>,
    /// Whether the caller has given a shard set yet (no garbage collection before).
    pub shards_known: bool,
    pub leases: &'a BTreeMap<ShardKey, LeaseSeen>,
    /// Presence keys by key.
    pub replicas: &'a BTreeMap<String, ReplicaSeen>,
    /// Shards this replica holds with a valid guard.
    pub held: &'a BTreeSet<ShardKey>,
    /// Held shards the caller was asked to hand over.
    pub handing_over: &'a BTreeSet<ShardKey>,
    /// Shards in the set whose lease key is absent, and since when (locally observed).
    pub absent_since: &'a BTreeMap<ShardKey, Instant>,
}

/// A step for the driver; every write it implies is a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take a free or expired lease (`expected: None` = create the key) with `term`.
    Acquire { shard: ShardKey, expected: Option<Revision>, term: Term },
    /// Mark free a lease the table says this process owns but that it does not hold.
    Release { shard: ShardKey, expected: Revision, term: Term },
    /// Ask the caller to checkpoint and release this held shard.
    HandOver { shard: ShardKey },
    /// The table says a held lease is no longer this replica's: stop at once.
    Lost { shard: ShardKey },
    /// Delete a free or expired lease of a shard that is not in the set.
    Forget { shard: ShardKey, expected: Revision },
    /// Delete an expired presence key.
    ForgetReplica { key: String, expected: Revision },
}

/// The outcome of [`decide`].
#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The next instant a foreign lease or presence would expire (worth waking up for).
    pub wake_at: Option<Instant>,
    /// Live replicas of this replica's group counted, this one included.
    pub live_replicas: usize,
}

/// What the lease keys say, before anything is assigned: the leases up for taking, in key order, and
/// the load of every owner of a live lease.
struct Table<'a> {
    candidates: Vec<Candidate>,
    /// Leases held by each owner (counted only for live peers of this group, later).
    loads: BTreeMap<&'a Owner, usize>,
    /// Owners of an expired lease: they stopped serving, whatever their presence says.
    stalled: BTreeSet<&'a Owner>,
}

/// A lease up for taking.
struct Candidate {
    shard: ShardKey,
    expected: Option<Revision>,
    term: Term,
    /// Owned by this process in the table but not held: only this replica may take it.
    stale_own: bool,
    free_since: Instant,
}

fn earliest(slot: &mut Option<Instant>, at: Instant) {
    *slot = Some(slot.map_or(at, |current| current.min(at)));
}

/// Decides what this replica does next.
pub fn decide(view: &View<'_>) -> Plan {
    let mut plan = Plan::default();
    let me = view.me;

    // Held leases the table no longer gives to this process (in this session).
    for shard in view.held {
        let mine = matches!(
            view.leases.get(shard).map(|seen| &seen.holder),
            Some(Holder::Owned { owner, session, .. }) if owner == me && *session == view.session
        );
        if !mine {
            plan.actions.push(Action::Lost { shard: shard.clone() });
        }
    }
    let table = read_leases(view, &mut plan);
    let caps = live_replicas(view, &table.stalled, &mut plan);
    balance::assign(view, table.candidates, table.loads, caps, &mut plan);
    plan
}

/// When a lease or presence judged by its revision expires: a TTL (the longer of the holder's and
/// this replica's) after this replica first saw that revision.
fn expiry(view: &View<'_>, first_seen: Instant, ttl: Duration) -> Instant {
    first_seen + ttl.max(view.ttl)
}

/// Goes through the lease keys in key order: garbage out of the set (forgotten, or given back when it
/// is this session's), leases up for taking, and the loads of live leases.
fn read_leases<'a>(view: &View<'a>, plan: &mut Plan) -> Table<'a> {
    let me = view.me;
    let sessions = view.session.is_some();
    let mut table = Table { candidates: Vec::new(), loads: BTreeMap::new(), stalled: BTreeSet::new() };
    for (shard, seen) in view.leases {
        let (owner, ttl, session) = match &seen.holder {
            Holder::Owned { owner, ttl, session } => (Some(owner), *ttl, *session),
            Holder::Free | Holder::Unreadable => (None, view.ttl, None),
        };
        // A session's lease lives and dies with its session; any other lease with its own revision.
        let by_session = sessions && session.is_some();
        let gone = by_session && session_gone(&seen.holder, view.replicas);
        let free = matches!(seen.holder, Holder::Free) || gone;
        let mine = !free && owner == Some(me) && session == view.session;
        let foreign = !free && !mine;
        let expires = expiry(view, seen.first_seen, ttl);
        let expired = foreign && !by_session && view.now >= expires;
        if foreign && !by_session && !expired {
            earliest(&mut plan.wake_at, expires);
        }
        if expired && let Some(owner) = owner {
            table.stalled.insert(owner);
        }
        let in_set = view.shards.contains(shard);
        if !in_set {
            if view.shards_known && (expired || free) {
                plan.actions.push(Action::Forget { shard: shard.clone(), expected: seen.revision });
            } else if sessions && mine && !view.held.contains(shard) {
                // Nobody else may take it while the session lives: give it back.
                plan.actions.push(Action::Release { shard: shard.clone(), expected: seen.revision, term: seen.term });
            }
            continue;
        }
        if free {
            let free_since = if gone { seen.orphaned_since.unwrap_or(view.now) } else { seen.first_seen };
            table.candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since,
            });
        } else if mine {
            if !view.held.contains(shard) {
                table.candidates.push(Candidate {
                    shard: shard.clone(),
                    expected: Some(seen.revision),
                    term: seen.term.next(),
                    stale_own: true,
                    free_since: seen.first_seen,
                });
            }
        } else if expired {
            table.candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since: expires,
            });
        } else if let Some(owner) = owner {
            // Counted only if the owner is a live peer of this group (below); otherwise simply taken
            // (once it expires, or once its session is fenced).
            *table.loads.entry(owner).or_default() += 1;
        }
    }
    for shard in view.shards {
        if !view.leases.contains_key(shard) {
            let free_since = view.absent_since.get(shard).copied().unwrap_or(view.now);
            table.candidates.push(Candidate {
                shard: shard.clone(),
                expected: None,
                term: Term::new(1),
                stale_own: false,
                free_since,
            });
        }
    }
    table
}

/// The live replicas of this replica's group with their caps (this one included); expired presence
/// keys of others are deleted (for a session: the fence).
fn live_replicas<'a>(
    view: &View<'a>,
    stalled: &BTreeSet<&'a Owner>,
    plan: &mut Plan,
) -> BTreeMap<&'a Owner, Option<usize>> {
    let me = view.me;
    let mut caps: BTreeMap<&Owner, Option<usize>> = BTreeMap::new();
    for (key, seen) in view.replicas {
        let expires = expiry(view, seen.first_seen, seen.ttl);
        if seen.owner == *me {
            continue;
        }
        if view.now >= expires {
            plan.actions.push(Action::ForgetReplica { key: key.clone(), expected: seen.revision });
        } else {
            earliest(&mut plan.wake_at, expires);
            // A replica of another group serves other shards: counting it would lower this replica's
            // share and hand over leases that only this group can take back, a TTL later.
            if seen.group == view.group && !stalled.contains(&seen.owner) {
                caps.insert(&seen.owner, seen.max_leases);
            }
        }
    }
    caps.insert(me, view.max_leases);
    plan.live_replicas = caps.len();
    caps
}
