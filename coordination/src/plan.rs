//! The pure decision core: from the observed lease table and `now` to a list of [`Action`]s.
//!
//! Owns the assignment rules. No I/O and no clock: the driver passes `now`. Invariants kept:
//! - a lease held by someone else is taken only when it is free (released or absent) or expired, and
//!   expired means "its revision has not changed for the longer of both TTLs, as observed locally";
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

/// Who a lease key names, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Released: may be taken at once.
    Free,
    /// Held by `owner`, whose TTL is `ttl`.
    Owned { owner: Owner, ttl: Duration },
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
    let expiry = |first_seen: Instant, ttl: Duration| first_seen + ttl.max(view.ttl);

    // Held leases the table no longer gives to this process.
    for shard in view.held {
        let mine = matches!(
            view.leases.get(shard).map(|seen| &seen.holder),
            Some(Holder::Owned { owner, .. }) if owner == me
        );
        if !mine {
            plan.actions.push(Action::Lost { shard: shard.clone() });
        }
    }

    // Live replicas: fresh presence, minus owners of a lease that expired (they stopped serving).
    let mut stalled: BTreeSet<&Owner> = BTreeSet::new();
    let mut candidates = Vec::new();
    let mut loads: BTreeMap<&Owner, usize> = BTreeMap::new();
    for (shard, seen) in view.leases {
        let (owner, ttl) = match &seen.holder {
            Holder::Free => (None, view.ttl),
            Holder::Owned { owner, ttl } => (Some(owner), *ttl),
            Holder::Unreadable => (None, view.ttl),
        };
        let expires = expiry(seen.first_seen, ttl);
        let foreign = !matches!(seen.holder, Holder::Free) && owner != Some(me);
        let expired = foreign && view.now >= expires;
        if foreign && !expired {
            earliest(&mut plan.wake_at, expires);
        }
        if expired && let Some(owner) = owner {
            stalled.insert(owner);
        }
        let in_set = view.shards.contains(shard);
        if !in_set {
            if view.shards_known && (expired || matches!(seen.holder, Holder::Free)) {
                plan.actions.push(Action::Forget { shard: shard.clone(), expected: seen.revision });
            }
            continue;
        }
        match (&seen.holder, owner) {
            (Holder::Free, _) => candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since: seen.first_seen,
            }),
            (_, Some(owner)) if owner == me => {
                if !view.held.contains(shard) {
                    candidates.push(Candidate {
                        shard: shard.clone(),
                        expected: Some(seen.revision),
                        term: seen.term.next(),
                        stale_own: true,
                        free_since: seen.first_seen,
                    });
                }
            }
            _ if expired => candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since: expires,
            }),
            // Counted only if the owner is a live peer of this group (below); otherwise simply taken.
            (_, Some(owner)) => *loads.entry(owner).or_default() += 1,
            (_, None) => {}
        }
    }
    for shard in view.shards {
        if !view.leases.contains_key(shard) {
            let free_since = view.absent_since.get(shard).copied().unwrap_or(view.now);
            candidates.push(Candidate {
                shard: shard.clone(),
                expected: None,
                term: Term::new(1),
                stale_own: false,
                free_since,
            });
        }
    }

    let mut caps: BTreeMap<&Owner, Option<usize>> = BTreeMap::new();
    for (key, seen) in view.replicas {
        let expires = expiry(seen.first_seen, seen.ttl);
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
    let my_load =
        view.held.iter().filter(|shard| view.shards.contains(*shard) && !view.handing_over.contains(*shard)).count();
    let mut loads: BTreeMap<&Owner, usize> =
        caps.keys().map(|owner| (*owner, loads.get(owner).copied().unwrap_or(0))).collect();
    loads.insert(me, my_load);
    plan.live_replicas = caps.len();
    let my_cap = view.max_leases.unwrap_or(usize::MAX);
    let mut my_total = view.held.len();

    // Water-fill: each free lease to the least-loaded live replica with room (ties by owner).
    for candidate in candidates {
        let pick = least_loaded(&loads, &caps);
        // Fallback: a lease left free for a whole TTL (its assignee does not know the shard, or is
        // stuck) goes to anyone with room, so no shard waits on one replica's view.
        let take = my_total < my_cap && (pick == Some(me) || view.now >= candidate.free_since + view.ttl);
        if take {
            *loads.entry(me).or_default() += 1;
            my_total += 1;
            plan.actions.push(Action::Acquire {
                shard: candidate.shard,
                expected: candidate.expected,
                term: candidate.term,
            });
            continue;
        }
        if let Some(owner) = pick {
            *loads.entry(owner).or_default() += 1;
        }
        if candidate.stale_own
            && let Some(expected) = candidate.expected
        {
            plan.actions.push(Action::Release { shard: candidate.shard, expected, term: candidate.term });
        }
    }

    // Rebalance: move one lease at a time from the most loaded (ties: smallest owner) to the least
    // loaded with room, while they differ by two or more; count the moves that leave this replica.
    let mut surplus = 0usize;
    loop {
        let richest = loads.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(o, l)| (*o, *l));
        let poorest = least_loaded(&loads, &caps).map(|owner| (owner, loads.get(owner).copied().unwrap_or(0)));
        let (Some((rich, rich_load)), Some((poor, poor_load))) = (richest, poorest) else { break };
        if rich_load < poor_load + 2 {
            break;
        }
        *loads.entry(rich).or_default() -= 1;
        *loads.entry(poor).or_default() += 1;
        if rich == me {
            surplus += 1;
        }
    }
    let over_cap = my_load.saturating_sub(my_cap);
    surplus = surplus.max(over_cap);
    let mut handovers: Vec<ShardKey> = view
        .held
        .iter()
        .filter(|shard| !view.handing_over.contains(*shard) && !view.shards.contains(*shard))
        .cloned()
        .collect();
    handovers.extend(
        view.held
            .iter()
            .rev()
            .filter(|shard| !view.handing_over.contains(*shard) && view.shards.contains(*shard))
            .take(surplus)
            .cloned(),
    );
    plan.actions.extend(handovers.into_iter().map(|shard| Action::HandOver { shard }));
    plan
}

/// The live replica with the fewest leases that is below its cap (ties: smallest owner).
fn least_loaded<'o>(
    loads: &BTreeMap<&'o Owner, usize>,
    caps: &BTreeMap<&'o Owner, Option<usize>>,
) -> Option<&'o Owner> {
    loads
        .iter()
        .filter(|(owner, load)| **load < caps.get(*owner).copied().flatten().unwrap_or(usize::MAX))
        .min_by_key(|(owner, load)| (**load, **owner))
        .map(|(owner, _)| *owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(name: &str) -> Owner {
        Owner { replica: name.into(), instance: format!("{name}-uuid") }
    }

    fn shard(n: usize) -> ShardKey {
        ShardKey::for_shard("t", &format!("shardId-{n}"))
    }

    /// `me` (group "x") holds shards 0..held of `shards`; `peers` are live replicas with their group and
    /// the shards they hold; every other shard has no lease yet.
    fn decide_for(shards: usize, held: usize, peers: &[(&str, &str, &[usize])]) -> Plan {
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let me = owner("me");
        let set: BTreeSet<ShardKey> = (0..shards).map(shard).collect();
        let mut leases = BTreeMap::new();
        let mut revision = 0;
        let mut lease = |holder: &Owner| {
            revision += 1;
            let holder = Holder::Owned { owner: holder.clone(), ttl };
            LeaseSeen { revision: Revision::new(revision), first_seen: now, holder, term: Term::new(1) }
        };
        for n in 0..held {
            leases.insert(shard(n), lease(&me));
        }
        let mut replicas = BTreeMap::new();
        for (name, group, holds) in peers {
            for n in *holds {
                leases.insert(shard(*n), lease(&owner(name)));
            }
            let seen = ReplicaSeen {
                owner: owner(name),
                revision: Revision::new(1),
                first_seen: now,
                ttl,
                max_leases: None,
                group: (*group).into(),
            };
            replicas.insert(format!("lease/replica.{name}"), seen);
        }
        let held: BTreeSet<ShardKey> = (0..held).map(shard).collect();
        decide(&View {
            now,
            me: &me,
            ttl,
            max_leases: None,
            group: "x",
            shards: &set,
            shards_known: true,
            leases: &leases,
            replicas: &replicas,
            held: &held,
            handing_over: &BTreeSet::new(),
            absent_since: &BTreeMap::new(),
        })
    }

    fn count(plan: &Plan, what: fn(&Action) -> bool) -> usize {
        plan.actions.iter().filter(|action| what(action)).count()
    }

    #[test]
    fn a_peer_of_the_same_group_gets_its_share() {
        let plan = decide_for(4, 4, &[("peer", "x", &[])]);
        assert_eq!(plan.live_replicas, 2);
        assert_eq!(count(&plan, |a| matches!(a, Action::HandOver { .. })), 2);
    }

    #[test]
    fn a_replica_of_another_group_does_not_lower_my_share() {
        // It cannot take my shards: handing them over would only bring them back after a TTL.
        let plan = decide_for(4, 4, &[("other", "y", &[])]);
        assert_eq!(plan.live_replicas, 1);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        // Free shards are all mine to take, not partly assigned to it.
        let plan = decide_for(4, 0, &[("other", "y", &[])]);
        assert_eq!(count(&plan, |a| matches!(a, Action::Acquire { .. })), 4);
    }

    #[test]
    fn a_lease_held_by_another_group_is_taken_not_balance_material() {
        // Shards 0..3 are held by a replica of the other group (it serves them too, as during a table
        // list change); my peer and I split the rest and nobody hands anything over.
        let plan = decide_for(5, 1, &[("other", "y", &[2, 3, 4]), ("peer", "x", &[])]);
        assert_eq!(plan.live_replicas, 2);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        let plan = decide_for(5, 2, &[("other", "y", &[2, 3, 4]), ("peer", "x", &[])]);
        assert_eq!(count(&plan, |a| matches!(a, Action::HandOver { .. })), 1);
    }
}
