//! Reading the lease table into the view `plan::decide` takes: the lease keys (from the mirror or a
//! full read), then the presence keys, each observed with the local instant it was first seen.
//!
//! Owns the order and completeness of a read. Invariants kept: the leases are read before the
//! presence keys, and a process writes its session before its first lease, so a lease whose session
//! is missing from the read is free; every presence key the read must account for that a one-pass
//! read did not show is read on its own, and only a key a direct read finds absent is gone; a revision
//! keeps the instant it was first seen for as long as it is read unchanged (the expiry clock).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout};
use tracing::info;

use super::mirror::{LEASE_PREFIXES, MIRROR_RESYNC, Mirror, forward};
use super::{Driver, WATCH_START_TIMEOUT, bounded};
use crate::keys;
use crate::lease::{self, LeaseValue, PresenceValue, Term};
use crate::plan::{self, HeldLease, Holder, LeaseSeen, ReplicaSeen, Switch};
use crate::store::{StoreError, Versioned};

impl Driver {
    /// Reads the table: the leases first, then the presence keys. A lease that names a session was
    /// written after that session's key, so a read of the presence keys that starts after the lease
    /// was read shows the session, or that it ended: a lease whose session is missing is free.
    pub(super) async fn read(&mut self) -> Result<(), StoreError> {
        // The lease keys grow with the shard count; their read may take longer than one operation
        // (the session is renewed meanwhile), but not longer than a TTL.
        let leases = self.read_leases().await;
        // Read even when the leases could not be: the presence keys alone keep the guards' second
        // bound moving (see `follow_protocols`), and they are few.
        let started = Instant::now();
        let session_before = self.session.mark();
        let expected = self.sessions_expected(leases.as_deref().unwrap_or_default());
        let read = self.read_presence_keys(expected, self.config.renew_interval);
        let replicas = self.renewing_while(read).await?;
        let now = Instant::now();
        self.observe_replicas(replicas, now, session_before);
        self.follow_protocols(started);
        self.observe_leases(leases?, now);
        Ok(())
    }

    /// The lease keys: from the mirror when it is current, otherwise by a full read, which also
    /// builds a new mirror when the store can watch.
    async fn read_leases(&mut self) -> Result<Vec<(String, Versioned)>, StoreError> {
        if let Some(mirror) = &mut self.mirror {
            if mirror.catch_up() && mirror.built.elapsed() < MIRROR_RESYNC {
                return Ok(mirror.entries.iter().map(|(key, entry)| (key.clone(), entry.clone())).collect());
            }
            self.mirror = None;
        }
        // The watch first: what changes during the full read reaches the mirror after it.
        let watch = timeout(WATCH_START_TIMEOUT, self.store.watch(&LEASE_PREFIXES)).await.ok().flatten();
        let store = Arc::clone(&self.store);
        // The lease keys grow with the shard count; a full read may take longer than one operation
        // (the session is renewed meanwhile), but not longer than a TTL.
        let entries = self.renewing_while(bounded(self.config.ttl, store.scan(&LEASE_PREFIXES))).await?;
        if let Some(changes) = watch {
            let changes = forward(changes);
            let built = Instant::now();
            self.mirror = Some(Mirror { changes, entries: entries.iter().cloned().collect(), built });
        }
        Ok(entries)
    }

    /// Reads the presence keys alone, with every session renewal: the guards' second bound (see
    /// `follow_protocols`) then moves at least once per renew interval, however long the table's
    /// reads and the rounds of writes between them take.
    pub(super) async fn read_presences(&mut self) {
        let started = Instant::now();
        let session_before = self.session.mark();
        let expected = self.sessions_expected(&[]);
        if let Ok(replicas) = self.read_presence_keys(expected, self.config.op_timeout).await {
            self.observe_replicas(replicas, Instant::now(), session_before);
            self.follow_protocols(started);
        }
    }

    /// The presence keys a read must account for: every key of the last read, this process's own, and
    /// the session of every lease in `leases` (the new lease read) or in the last view.
    fn sessions_expected(&self, leases: &[(String, Versioned)]) -> BTreeSet<String> {
        let mut expected: BTreeSet<String> = self.replicas.keys().cloned().collect();
        expected.insert(keys::presence_key(&self.me.instance));
        let mut name = |holder: &Holder| {
            if let Holder::Owned { owner, session: Some(_), .. } = holder {
                expected.insert(keys::presence_key(&owner.instance));
            }
        };
        for seen in self.leases.values() {
            name(&seen.holder);
        }
        for (key, entry) in leases {
            let known = keys::shard_of_lease_key(key)
                .and_then(|shard| self.leases.get(&shard))
                .is_some_and(|seen| seen.revision == entry.revision);
            if !known && let Some(LeaseValue { owner: Some(owner), ttl_ms, session, .. }) = lease::decode(&entry.value)
            {
                name(&Holder::Owned { owner, ttl: Duration::from_millis(ttl_ms), session });
            }
        }
        expected
    }

    /// The presence keys, read in one pass; each key of `expected` the pass did not show is read on
    /// its own. A pass over a bucket that keeps one value per key can miss a key rewritten while it
    /// runs (the old value is gone, the new one comes after the pass ends), and a session missing
    /// from the read would make its leases look free: only a key that a direct read finds absent is.
    fn read_presence_keys(
        &self,
        expected: BTreeSet<String>,
        limit: Duration,
    ) -> impl Future<Output = Result<Vec<(String, Versioned)>, StoreError>> + use<> {
        let store = Arc::clone(&self.store);
        async move {
            let mut entries = bounded(limit, store.scan(&[keys::REPLICA_PREFIX])).await?;
            let found: BTreeSet<String> = entries.iter().map(|(key, _)| key.clone()).collect();
            for key in expected.difference(&found) {
                if let Some(entry) = bounded(limit, store.get(key)).await? {
                    entries.push((key.clone(), entry));
                }
            }
            Ok(entries)
        }
    }

    /// `session_before`: the session number when the read started, and whether its key had been
    /// written (and the write answered) by then.
    fn observe_replicas(&mut self, entries: Vec<(String, Versioned)>, now: Instant, session_before: (u64, bool)) {
        let mut replicas = BTreeMap::new();
        for (key, entry) in entries {
            let first_seen = match self.replicas.get(&key) {
                Some(seen) if seen.revision == entry.revision => seen.first_seen,
                _ => now,
            };
            if let Some(value) = lease::decode::<PresenceValue>(&entry.value) {
                let seen = ReplicaSeen {
                    owner: value.owner,
                    revision: entry.revision,
                    first_seen,
                    ttl: Duration::from_millis(value.ttl_ms),
                    max_leases: value.max_leases,
                    group: value.group,
                    session: value.session,
                };
                replicas.insert(key, seen);
            }
        }
        let shows_mine = replicas.contains_key(&keys::presence_key(&self.me.instance));
        if self.session.fenced(&self.timing, session_before, shows_mine) {
            self.end_session("the session key was deleted");
        }
        self.replicas = replicas;
    }

    fn observe_leases(&mut self, entries: Vec<(String, Versioned)>, now: Instant) {
        let mut leases = BTreeMap::new();
        for (key, entry) in entries {
            let Some(shard) = keys::shard_of_lease_key(&key) else { continue };
            let previous = self.leases.get(&shard).filter(|seen| seen.revision == entry.revision);
            let first_seen = previous.map_or(now, |seen| seen.first_seen);
            // A revision read before is not decoded again (most of a large table at every read).
            let (holder, term) = match previous {
                Some(seen) => (seen.holder.clone(), seen.term),
                None => match lease::decode::<LeaseValue>(&entry.value) {
                    Some(LeaseValue { owner: Some(owner), term, ttl_ms, session }) => {
                        (Holder::Owned { owner, ttl: Duration::from_millis(ttl_ms), session }, term)
                    }
                    Some(LeaseValue { owner: None, term, .. }) => (Holder::Free, term),
                    None => (Holder::Unreadable, Term::default()),
                },
            };
            let orphaned_since = plan::session_gone(&holder, &self.replicas)
                .then(|| previous.and_then(|seen| seen.orphaned_since).unwrap_or(now));
            leases.insert(shard, LeaseSeen { revision: entry.revision, first_seen, holder, term, orphaned_since });
        }
        self.absent_since.retain(|shard, _| self.shards.contains(shard) && !leases.contains_key(shard));
        for shard in &self.shards {
            if !leases.contains_key(shard) {
                self.absent_since.entry(shard.clone()).or_insert(now);
            }
        }
        let session = self.session_number();
        let held = self.held.iter_mut().map(|(shard, held)| (shard, &mut held.lease));
        plan::adopt_own_writes(&mut leases, held, &self.me, self.config.ttl, session, now);
        self.leases = leases;
    }

    /// Follows the protocol the presence keys of a read that started at `read_started` call for (see
    /// [`plan::Session::follow_protocols`]) and moves the guards when their bounds moved.
    fn follow_protocols(&mut self, read_started: Instant) {
        let mut held: Vec<&mut HeldLease> = self.held.values_mut().map(|held| &mut held.lease).collect();
        let (switch, moved) =
            self.session.follow_protocols(&self.timing, read_started, &self.replicas, &self.me, &mut held);
        match switch {
            Some(Switch::EachLease) => {
                info!(replica = %self.me.replica, "a replica of the previous version is present: renewing each lease too");
            }
            Some(Switch::SessionAlone) => {
                info!(replica = %self.me.replica, "no replica of the previous version left: renewing the session alone");
            }
            None => {}
        }
        if moved {
            self.extend_guards();
        }
    }
}
