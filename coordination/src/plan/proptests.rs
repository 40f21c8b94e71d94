//! Property tests of [`decide`](super::decide) over a fleet of one group with sessions and no caps,
//! every replica seeing the same table: a balanced fleet makes no move (stability), and from any
//! holdings the fleet reaches one that is (balance) within a few rounds of decisions.
//!
//! The model: one lease table (absent, free, or held by a replica in its session), every replica's
//! presence fresh, `now` fixed (nothing expires, and the fallback for leases free for a TTL never
//! fires: only the water-filling and the rebalancing act). A round takes every replica's decisions
//! from the same table, then applies them in replica order as compare-and-swap writes (a write at a
//! revision that moved meanwhile is dropped); a hand-over is released by the caller at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::{Action, Holder, LeaseSeen, Plan, ReplicaSeen, View, decide};
use crate::keys::{ShardKey, presence_key};
use crate::lease::{Owner, Term};
use crate::store::Revision;

const TTL: Duration = Duration::from_secs(10);
const SESSION: Option<u64> = Some(1);

/// A lease in the model's table.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Absent,
    Free,
    Held(usize),
}

struct Fleet {
    replicas: usize,
    now: Instant,
    owners: Vec<Owner>,
    shards: BTreeSet<ShardKey>,
    /// The table: each shard's lease (absent ones are not listed), its revision and term.
    table: BTreeMap<ShardKey, (Revision, Term, Slot)>,
    presences: BTreeMap<String, ReplicaSeen>,
    next_revision: u64,
}

impl Fleet {
    fn new(replicas: usize, slots: &[Slot]) -> Fleet {
        let now = Instant::now();
        let owners: Vec<Owner> =
            (0..replicas).map(|i| Owner { replica: format!("r{i}"), instance: format!("u{i:02}") }).collect();
        let mut fleet = Fleet {
            replicas,
            now,
            shards: BTreeSet::new(),
            table: BTreeMap::new(),
            presences: BTreeMap::new(),
            next_revision: 0,
            owners: owners.clone(),
        };
        for owner in &owners {
            let revision = fleet.revision();
            let seen = ReplicaSeen {
                owner: owner.clone(),
                revision,
                first_seen: now,
                ttl: TTL,
                max_leases: None,
                group: String::new(),
                session: SESSION,
            };
            fleet.presences.insert(presence_key(&owner.instance), seen);
        }
        for (n, slot) in slots.iter().enumerate() {
            let shard = ShardKey::for_shard("t", &format!("shardId-{n:03}"));
            fleet.shards.insert(shard.clone());
            if *slot != Slot::Absent {
                let revision = fleet.revision();
                fleet.table.insert(shard, (revision, Term::new(1), slot.clone()));
            }
        }
        fleet
    }

    fn revision(&mut self) -> Revision {
        self.next_revision += 1;
        Revision::new(self.next_revision)
    }

    /// The table as every replica reads it.
    fn leases(&self) -> BTreeMap<ShardKey, LeaseSeen> {
        let seen = |(revision, term, slot): &(Revision, Term, Slot)| {
            let holder = match slot {
                Slot::Held(i) => Holder::Owned { owner: self.owners[*i].clone(), ttl: TTL, session: SESSION },
                Slot::Free | Slot::Absent => Holder::Free,
            };
            LeaseSeen { revision: *revision, first_seen: self.now, holder, term: *term, orphaned_since: None }
        };
        self.table.iter().map(|(shard, lease)| (shard.clone(), seen(lease))).collect()
    }

    fn held_by(&self, replica: usize) -> BTreeSet<ShardKey> {
        self.table
            .iter()
            .filter(|(_, (_, _, slot))| *slot == Slot::Held(replica))
            .map(|(shard, _)| shard.clone())
            .collect()
    }

    fn decide_for(&self, replica: usize, leases: &BTreeMap<ShardKey, LeaseSeen>) -> Plan {
        let held = self.held_by(replica);
        decide(&View {
            now: self.now,
            me: &self.owners[replica],
            ttl: TTL,
            max_leases: None,
            group: "",
            session: SESSION,
            shards: &self.shards,
            shards_known: true,
            leases,
            replicas: &self.presences,
            held: &held,
            handing_over: &BTreeSet::new(),
            absent_since: &BTreeMap::new(),
        })
    }

    /// Every replica decides from the same table, then the decisions are applied in replica order.
    /// Returns the actions that moved a lease (acquisitions, releases, hand-overs).
    fn round(&mut self) -> usize {
        let leases = self.leases();
        let plans: Vec<Plan> = (0..self.replicas).map(|replica| self.decide_for(replica, &leases)).collect();
        let mut moves = 0;
        for (replica, plan) in plans.into_iter().enumerate() {
            for action in plan.actions {
                moves += usize::from(self.apply(replica, action));
            }
        }
        moves
    }

    /// Applies one action as the store and the caller would; `true` when it moved a lease.
    fn apply(&mut self, replica: usize, action: Action) -> bool {
        let current = |table: &BTreeMap<ShardKey, (Revision, Term, Slot)>, shard: &ShardKey| {
            table.get(shard).map(|(revision, _, _)| *revision)
        };
        match action {
            Action::Acquire { shard, expected, term } => {
                if current(&self.table, &shard) != expected {
                    return false;
                }
                let revision = self.revision();
                self.table.insert(shard, (revision, term, Slot::Held(replica)));
            }
            Action::Release { shard, expected, term } => {
                if current(&self.table, &shard) != Some(expected) {
                    return false;
                }
                let revision = self.revision();
                self.table.insert(shard, (revision, term, Slot::Free));
            }
            Action::HandOver { shard } => {
                // The caller checkpoints and releases at once.
                let Some((_, term, Slot::Held(holder))) = self.table.get(&shard).cloned() else { return false };
                if holder != replica {
                    return false;
                }
                let revision = self.revision();
                self.table.insert(shard, (revision, term, Slot::Free));
            }
            Action::Lost { .. } | Action::Forget { .. } | Action::ForgetReplica { .. } => return false,
        }
        true
    }

    /// Each replica's load, and whether every shard is held.
    fn loads(&self) -> (Vec<usize>, bool) {
        let mut loads = vec![0; self.replicas];
        let mut all_held = true;
        for shard in &self.shards {
            match self.table.get(shard) {
                Some((_, _, Slot::Held(i))) => loads[*i] += 1,
                _ => all_held = false,
            }
        }
        (loads, all_held)
    }

    fn balanced(&self) -> bool {
        let (loads, all_held) = self.loads();
        let (min, max) = (loads.iter().min().copied().unwrap_or(0), loads.iter().max().copied().unwrap_or(0));
        all_held && max <= min + 1
    }
}

/// A balanced fleet: `shards` shards dealt round-robin to `replicas` replicas, starting with replica
/// `rotate` (modulo), so each holds `floor` or `ceil` of them.
fn balanced_slots(replicas: usize, shards: usize, rotate: usize) -> Vec<Slot> {
    (0..shards).map(|n| Slot::Held((n + rotate) % replicas)).collect()
}

fn slot(replicas: usize) -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::Absent), Just(Slot::Free), (0..replicas).prop_map(Slot::Held)]
}

/// A fleet (1 to 6 replicas) and an arbitrary table of up to 40 shards.
fn fleet_and_slots() -> impl Strategy<Value = (usize, Vec<Slot>)> {
    (1usize..=6).prop_flat_map(|replicas| (Just(replicas), proptest::collection::vec(slot(replicas), 0..=40)))
}

/// Rounds enough for any start: in the first, every replica takes what water-filling gives it and
/// the richest hand their surplus over (all computed from the same table, so they agree); in the
/// second, the leases handed over are water-filled to the poorest. (One round is not enough: a
/// hand-over must be released before anyone can take it. 50,000 cases found no start needing three.)
const MAX_ROUNDS: usize = 2;

proptest! {
    /// Stability: in a fleet where every shard is held by a live replica and the loads differ by at
    /// most one, no replica's decision takes, releases or hands over anything.
    #[test]
    fn a_balanced_fleet_decides_nothing(replicas in 1usize..=8, shards in 0usize..=60, rotate in 0usize..8) {
        let fleet = Fleet::new(replicas, &balanced_slots(replicas, shards, rotate));
        prop_assert!(fleet.balanced());
        let leases = fleet.leases();
        for replica in 0..replicas {
            let plan = fleet.decide_for(replica, &leases);
            prop_assert!(plan.actions.is_empty(), "replica {} of {}: {:?}", replica, replicas, plan.actions);
            prop_assert_eq!(plan.live_replicas, replicas);
        }
    }

    /// Balance: from any holdings, applying every replica's decisions round after round leaves every
    /// shard held and the loads within one of each other, within `MAX_ROUNDS`; after that nobody
    /// moves a lease again.
    #[test]
    fn any_fleet_converges_to_balance((replicas, slots) in fleet_and_slots()) {
        let mut fleet = Fleet::new(replicas, &slots);
        let mut rounds = 0;
        while !fleet.balanced() {
            prop_assert!(rounds < MAX_ROUNDS, "not balanced after {} rounds: {:?}", rounds, fleet.loads());
            fleet.round();
            rounds += 1;
        }
        prop_assert_eq!(fleet.round(), 0, "a balanced fleet moved a lease");
    }
}
