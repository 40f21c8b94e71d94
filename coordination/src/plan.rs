//! The pure decision core: from the observed lease table and `now` to a list of [`Action`]s.
//!
//! Owns the assignment rules. No I/O and no clock: the driver passes `now`. Invariants kept:
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

    let sessions = view.session.is_some();

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

    // Live replicas: fresh presence, minus owners of a lease that expired (they stopped serving).
    let mut stalled: BTreeSet<&Owner> = BTreeSet::new();
    let mut candidates = Vec::new();
    let mut loads: BTreeMap<&Owner, usize> = BTreeMap::new();
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
        let expires = expiry(seen.first_seen, ttl);
        let expired = foreign && !by_session && view.now >= expires;
        if foreign && !by_session && !expired {
            earliest(&mut plan.wake_at, expires);
        }
        if expired && let Some(owner) = owner {
            stalled.insert(owner);
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
            candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since,
            });
        } else if mine {
            if !view.held.contains(shard) {
                candidates.push(Candidate {
                    shard: shard.clone(),
                    expected: Some(seen.revision),
                    term: seen.term.next(),
                    stale_own: true,
                    free_since: seen.first_seen,
                });
            }
        } else if expired {
            candidates.push(Candidate {
                shard: shard.clone(),
                expected: Some(seen.revision),
                term: seen.term.next(),
                stale_own: false,
                free_since: expires,
            });
        } else if let Some(owner) = owner {
            // Counted only if the owner is a live peer of this group (below); otherwise simply taken
            // (once it expires, or once its session is fenced).
            *loads.entry(owner).or_default() += 1;
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
            let holder = Holder::Owned { owner: holder.clone(), ttl, session: None };
            LeaseSeen {
                revision: Revision::new(revision),
                first_seen: now,
                holder,
                term: Term::new(1),
                orphaned_since: None,
            }
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
                session: None,
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
            session: None,
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

    /// Shard 0 held in session 1 by `peer`, whose presence (session `presence_session`, first seen
    /// `presence_age` ago) is in the table unless `None`; the lease's revision was first seen 10 TTLs
    /// ago. `me` judges with `my_session` (`None`: the previous protocol) and holds nothing.
    fn decide_sessions(presence: Option<(u64, Duration)>, my_session: Option<u64>, in_set: bool) -> Plan {
        let now = Instant::now() + Duration::from_secs(1000);
        let ttl = Duration::from_secs(10);
        let (me, peer) = (owner("me"), owner("peer"));
        let holder = Holder::Owned { owner: peer.clone(), ttl, session: Some(1) };
        let seen = LeaseSeen {
            revision: Revision::new(5),
            first_seen: now - 10 * ttl,
            holder,
            term: Term::new(3),
            orphaned_since: None,
        };
        let leases = BTreeMap::from([(shard(0), seen)]);
        let mut replicas = BTreeMap::new();
        if let Some((session, age)) = presence {
            let seen = ReplicaSeen {
                owner: peer.clone(),
                revision: Revision::new(9),
                first_seen: now - age,
                ttl,
                max_leases: None,
                group: String::new(),
                session: Some(session),
            };
            replicas.insert(crate::keys::presence_key(&peer.instance), seen);
        }
        let set: BTreeSet<ShardKey> = if in_set { BTreeSet::from([shard(0)]) } else { BTreeSet::new() };
        decide_holding_nothing(now, &me, my_session, &set, &leases, &replicas)
    }

    /// `decide` for `me` (group "", TTL 10 s, no cap) holding nothing, with every shard set known.
    fn decide_holding_nothing(
        now: Instant,
        me: &Owner,
        session: Option<u64>,
        shards: &BTreeSet<ShardKey>,
        leases: &BTreeMap<ShardKey, LeaseSeen>,
        replicas: &BTreeMap<String, ReplicaSeen>,
    ) -> Plan {
        decide(&View {
            now,
            me,
            ttl: Duration::from_secs(10),
            max_leases: None,
            group: "",
            session,
            shards,
            shards_known: true,
            leases,
            replicas,
            held: &BTreeSet::new(),
            handing_over: &BTreeSet::new(),
            absent_since: &BTreeMap::new(),
        })
    }

    #[test]
    fn a_lease_lives_as_long_as_its_session_however_old_its_revision() {
        let plan = decide_sessions(Some((1, Duration::from_secs(1))), Some(1), true);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.live_replicas, 2);
    }

    #[test]
    fn a_lease_of_an_expired_session_waits_for_the_fence() {
        // Only the presence key is deleted (the fence); its leases are taken from the next read on.
        let plan = decide_sessions(Some((1, Duration::from_secs(11))), Some(1), true);
        assert_eq!(
            plan.actions,
            vec![Action::ForgetReplica { key: crate::keys::presence_key("peer-uuid"), expected: Revision::new(9) }]
        );
    }

    #[test]
    fn a_lease_whose_session_is_gone_or_replaced_is_free_at_once() {
        for presence in [None, Some((2, Duration::from_secs(1)))] {
            let plan = decide_sessions(presence, Some(1), true);
            let acquire = Action::Acquire { shard: shard(0), expected: Some(Revision::new(5)), term: Term::new(4) };
            assert!(plan.actions.contains(&acquire), "{presence:?}: {:?}", plan.actions);
            // Out of my set, it is garbage like any free lease.
            let plan = decide_sessions(presence, Some(1), false);
            let forget = Action::Forget { shard: shard(0), expected: Revision::new(5) };
            assert!(plan.actions.contains(&forget), "{presence:?}: {:?}", plan.actions);
        }
    }

    #[test]
    fn the_previous_protocol_judges_a_session_lease_by_its_revision() {
        // What a replica of the previous version does with a lease nobody rewrote for a TTL: hence
        // leases are renewed one by one while such a replica is present.
        let plan = decide_sessions(Some((1, Duration::from_secs(1))), None, true);
        let acquire = Action::Acquire { shard: shard(0), expected: Some(Revision::new(5)), term: Term::new(4) };
        assert!(plan.actions.contains(&acquire), "{:?}", plan.actions);
    }

    #[test]
    fn my_own_lease_outside_my_set_is_given_back_while_my_session_keeps_it_alive() {
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        let me = owner("me");
        let holder = Holder::Owned { owner: me.clone(), ttl, session: Some(1) };
        let seen =
            LeaseSeen { revision: Revision::new(5), first_seen: now, holder, term: Term::new(3), orphaned_since: None };
        let leases = BTreeMap::from([(shard(0), seen)]);
        let mut replicas = BTreeMap::new();
        let presence = ReplicaSeen {
            owner: me.clone(),
            revision: Revision::new(9),
            first_seen: now,
            ttl,
            max_leases: None,
            group: String::new(),
            session: Some(1),
        };
        replicas.insert(crate::keys::presence_key(&me.instance), presence);
        let plan = decide_holding_nothing(now, &me, Some(1), &BTreeSet::new(), &leases, &replicas);
        assert_eq!(
            plan.actions,
            vec![Action::Release { shard: shard(0), expected: Revision::new(5), term: Term::new(3) }]
        );
    }
}
