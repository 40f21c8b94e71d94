//! Sharing out: which of the leases up for taking this replica takes, and which of its own it hands
//! over, given the live replicas of its group and their loads.
//!
//! Owns water-filling and rebalancing. Invariants kept: every replica with the same view computes the
//! same assignment (free leases in key order, each to the least-loaded live replica below its cap,
//! ties by owner), so replicas do not race for one lease; and a lease moves only while the most- and
//! least-loaded replicas of the group differ by two or more (or this replica holds more than its
//! cap), so a group whose loads differ by at most one makes no moves.

use std::collections::BTreeMap;

use super::{Action, Candidate, Plan, View};
use crate::keys::ShardKey;
use crate::lease::Owner;

/// Assigns `candidates` (in order) by water-filling, then moves leases from the most-loaded replica to
/// the least-loaded one while they differ by two or more; pushes this replica's acquisitions, its
/// releases of stale own leases assigned elsewhere, and its hand-overs.
pub(super) fn assign<'a>(
    view: &View<'a>,
    candidates: Vec<Candidate>,
    foreign_loads: BTreeMap<&'a Owner, usize>,
    caps: BTreeMap<&'a Owner, Option<usize>>,
    plan: &mut Plan,
) {
    let me = view.me;
    let my_load =
        view.held.iter().filter(|shard| view.shards.contains(*shard) && !view.handing_over.contains(*shard)).count();
    let mut loads: BTreeMap<&Owner, usize> =
        caps.keys().map(|owner| (*owner, foreign_loads.get(owner).copied().unwrap_or(0))).collect();
    loads.insert(me, my_load);
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
