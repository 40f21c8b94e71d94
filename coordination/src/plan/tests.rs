//! Unit tests of [`decide`](super::decide): shares between groups, sessions, and leases of the
//! previous version, each from a hand-built view.

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
    assert_eq!(plan.actions, vec![Action::Release { shard: shard(0), expected: Revision::new(5), term: Term::new(3) }]);
}
