//! Unit tests of [`decide`](super::decide) (shares between groups, sessions, and leases of the
//! previous version, each from a hand-built view) and of the [`upkeep`](super::upkeep) decisions.

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

fn timing(sessions: bool) -> Timing {
    let ttl = Duration::from_secs(10);
    Timing { ttl, renew_interval: ttl / 3, safety_margin: ttl / 5, sessions }
}

fn held_lease(revision: u64, at: Instant) -> HeldLease {
    HeldLease {
        revision: Revision::new(revision),
        term: Term::new(1),
        next_renew: at,
        last_write: at,
        lease_deadline: at + Duration::from_secs(8),
        handing_over: false,
    }
}

#[test]
fn a_guard_reaches_no_further_than_the_session_write_and_nowhere_without_one() {
    let (timing, now) = (timing(true), Instant::now());
    let mut session = Session::new(now);
    let far = now + Duration::from_secs(60);
    assert_eq!(session.guard_deadline(&timing, far, now), now, "no session write answered yet");
    assert!(!session.valid(&timing, now));
    assert_eq!(session.written(&timing, now, Revision::new(3)), AfterBeat::MoveGuards);
    assert_eq!(session.guard_deadline(&timing, far, now), now + Duration::from_secs(8));
    assert!(!session.valid(&timing, now + Duration::from_secs(8)));
    // A later answer to an earlier write cannot pull the deadline back.
    session.written(&timing, now - Duration::from_secs(1), Revision::new(4));
    assert_eq!(session.deadline, Some(now + Duration::from_secs(8)));
    assert_eq!(Session::new(now).guard_deadline(&super::upkeep::Timing { sessions: false, ..timing }, far, now), far);
}

#[test]
fn a_session_whose_key_a_peer_deleted_ends_and_one_whose_write_landed_is_adopted() {
    let (timing, now) = (timing(true), Instant::now());
    let mut session = Session::new(now);
    assert!(!session.fenced(&timing, session.mark(), false), "not written yet: nothing to miss");
    session.written(&timing, now, Revision::new(3));
    let before = session.mark();
    assert!(session.fenced(&timing, before, false));
    assert!(!session.fenced(&timing, before, true));
    assert_eq!(session.after_conflict(&timing, Reread::Mine(Revision::new(5)), now), AfterBeat::Nothing);
    assert_eq!((session.presence, session.deadline), (Some(Revision::new(5)), Some(now + Duration::from_secs(8))));
    assert_eq!(session.after_conflict(&timing, Reread::Failed, now), AfterBeat::Nothing);
    assert_eq!(session.after_conflict(&timing, Reread::NotMine, now), AfterBeat::EndSession, "our key is gone");
    session.end(now);
    assert_eq!((session.epoch, session.presence, session.deadline), (2, None, None));
    assert!(!session.fenced(&timing, before, false), "a read begun in the previous session proves nothing");
}

#[test]
fn each_lease_is_renewed_while_a_previous_version_is_present_and_rewritten_once_after() {
    let (timing, start) = (timing(true), Instant::now());
    let (me, old) = (owner("me"), owner("old"));
    let presence = |session| ReplicaSeen {
        owner: old.clone(),
        revision: Revision::new(1),
        first_seen: start,
        ttl: Duration::from_secs(10),
        max_leases: None,
        group: String::new(),
        session,
    };
    let legacy = BTreeMap::from([("lease/replica.old".to_owned(), presence(None))]);
    let upgraded = BTreeMap::from([("lease/replica.old".to_owned(), presence(Some(1)))]);
    let mut session = Session::new(start);
    let mut lease = held_lease(1, start);
    let later = start + Duration::from_secs(1);
    assert_eq!(
        session.follow_protocols(&timing, later, &legacy, &me, &mut [&mut lease]),
        (Some(Switch::EachLease), false)
    );
    assert!(session.renews_each_lease(&timing));
    assert_eq!(lease.next_renew, later, "renewed at once");
    // Gone, but the lease was last written before: once more.
    let gone = start + Duration::from_secs(2);
    assert_eq!(session.follow_protocols(&timing, gone, &upgraded, &me, &mut [&mut lease]), (None, false));
    assert_eq!(renewals_due([(&shard(0), &lease)], gone).len(), 1);
    lease.renewed(&timing, gone, Revision::new(2));
    // Well after the rewrite: the read's bound is later than the lease's own.
    let read = start + Duration::from_secs(10);
    assert_eq!(
        session.follow_protocols(&timing, read, &upgraded, &me, &mut [&mut lease]),
        (Some(Switch::SessionAlone), true)
    );
    assert_eq!(lease.lease_deadline, read + Duration::from_secs(8) - timing.renew_interval);
    assert!(!session.renews_each_lease(&timing));
}

#[test]
fn guards_past_their_deadline_are_revoked_and_a_lost_renewal_answer_is_adopted() {
    let now = Instant::now();
    let deadlines = [(shard(0), now), (shard(1), now + Duration::from_millis(1))];
    assert_eq!(expired(deadlines.iter().map(|(shard, at)| (shard, *at)), now), vec![shard(0)]);
    let mut lease = held_lease(4, now);
    let retry = now + Duration::from_secs(1);
    assert_eq!(after_renewal_conflict(Some(&mut lease), Reread::Mine(Revision::new(6)), now, retry), Renewed::Kept);
    assert_eq!((lease.revision, lease.next_renew), (Revision::new(6), now));
    assert_eq!(after_renewal_conflict(Some(&mut lease), Reread::Failed, now, retry), Renewed::Kept);
    assert_eq!(lease.next_renew, retry);
    assert_eq!(after_renewal_conflict(Some(&mut lease), Reread::NotMine, now, retry), Renewed::Lost);
}

#[test]
fn our_answered_writes_stand_against_a_stale_read_and_a_landed_one_is_adopted() {
    let now = Instant::now();
    let (me, peer) = (owner("me"), owner("peer"));
    let seen = |revision, owner: &Owner| LeaseSeen {
        revision: Revision::new(revision),
        first_seen: now,
        holder: Holder::Owned { owner: owner.clone(), ttl: Duration::from_secs(10), session: Some(1) },
        term: Term::new(1),
        orphaned_since: None,
    };
    // Shard 0: a newer write of ours landed; 1: the read is older than our write (free before we took
    // it); 2: taken by a peer since; 3: not read at all.
    let free = LeaseSeen { holder: Holder::Free, ..seen(3, &peer) };
    let mut leases = BTreeMap::from([(shard(0), seen(7, &me)), (shard(1), free), (shard(2), seen(9, &peer))]);
    let mut held: Vec<(ShardKey, HeldLease)> = (0..4).map(|n| (shard(n), held_lease(5, now))).collect();
    adopt_own_writes(
        &mut leases,
        held.iter_mut().map(|(shard, lease)| (&*shard, lease)),
        &me,
        Duration::from_secs(10),
        Some(1),
        now,
    );
    assert_eq!(held[0].1.revision, Revision::new(7));
    assert_eq!(leases[&shard(1)].revision, Revision::new(5));
    assert!(matches!(&leases[&shard(1)].holder, Holder::Owned { owner, .. } if *owner == me));
    assert_eq!((held[2].1.revision, leases[&shard(2)].revision), (Revision::new(5), Revision::new(9)));
    assert!(matches!(&leases[&shard(3)].holder, Holder::Owned { owner, .. } if *owner == me));
}
