//! The thin driver: performs the core's decisions against the store, renews, heartbeats and fences.
//!
//! Owns one replica's task: one `select!` loop over caller commands, shard-set changes, a timer and
//! (where the store can watch) the store's changes, which only bring the next read forward: a lease
//! released or a replica gone is seen within [`EARLY_READ_GAP`] instead of a poll interval.
//! Invariants kept: a guard's deadline only ever comes from the *start* time of a successful
//! compare-and-swap write plus TTL minus the safety margin; a held lease whose deadline passes is
//! revoked (the guard itself is already invalid by then); a lease is released only after its guard
//! is revoked.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::coordinator::{Command, Event, RevokeReason, Status};
use crate::guard::GuardHandle;
use crate::keys::{self, ShardKey};
use crate::lease::{self, LeaseValue, Owner, PresenceValue, Term};
use crate::plan::{self, Action, Holder, LeaseSeen, ReplicaSeen, View};
use crate::store::{Change, LeaseStore, Revision, StoreError, Versioned};

/// The shortest time between two reads of the lease table that the store's changes bring forward,
/// however many leases come free at once.
pub const EARLY_READ_GAP: Duration = Duration::from_millis(100);
/// How long starting a watch may take; a slower start is tried again after the next read.
const WATCH_START_TIMEOUT: Duration = Duration::from_millis(500);

/// A lease this replica holds.
#[derive(Debug)]
struct Held {
    revision: Revision,
    term: Term,
    next_renew: Instant,
    guard: GuardHandle,
    handing_over: bool,
}

pub(crate) struct Driver {
    store: Arc<dyn LeaseStore>,
    config: Config,
    me: Owner,
    shards_rx: watch::Receiver<Option<BTreeSet<ShardKey>>>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    status: watch::Sender<Status>,
    shards: BTreeSet<ShardKey>,
    shards_known: bool,
    finished: BTreeSet<ShardKey>,
    held: BTreeMap<ShardKey, Held>,
    leases: BTreeMap<ShardKey, LeaseSeen>,
    replicas: BTreeMap<String, ReplicaSeen>,
    absent_since: BTreeMap<ShardKey, Instant>,
    presence: Option<Revision>,
    beat: u64,
    next_poll: Instant,
    /// When the last read of the lease table started.
    last_read: Instant,
    /// A message whenever a write to the lease table frees a lease (from a task watching the store);
    /// `None` until started (after a read) or if the store cannot watch.
    freed: Option<mpsc::Receiver<()>>,
    next_heartbeat: Instant,
    wake_at: Option<Instant>,
    live_replicas: usize,
    store_reachable: bool,
    /// Set by [`Command::Drain`]: no lease is acquired any more.
    draining: bool,
}

/// Whether a write to the lease table frees a lease: a release, a finished (deleted) lease, or a
/// replica's presence gone.
fn frees_a_lease(change: &Change) -> bool {
    if change.key.starts_with(keys::SHARD_PREFIX) {
        change.value.as_deref().and_then(lease::decode::<LeaseValue>).is_none_or(|lease| lease.owner.is_none())
    } else {
        change.key.starts_with(keys::REPLICA_PREFIX) && change.value.is_none()
    }
}

/// A task following `changes`, sending a message (coalesced: at most one waits) for each that frees
/// a lease; it ends with the watch or when the receiver is dropped.
fn watch_freed(mut changes: BoxStream<'static, Change>) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                () = tx.closed() => return,
                change = changes.next() => change,
            };
            match change {
                None => return,
                Some(change) if frees_a_lease(&change) => {
                    if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                        return;
                    }
                }
                Some(_) => {}
            }
        }
    });
    rx
}

/// The next "a lease came free"; never ready without a watch. `None` when the watch ended.
async fn next_freed(freed: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match freed {
        Some(freed) => freed.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs `op` with the configured timeout; a timeout is an `Unavailable` (the write may still land).
async fn bounded<T>(limit: Duration, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    timeout(limit, op).await.unwrap_or_else(|_| Err(StoreError::Unavailable { reason: "timed out".into() }))
}

impl Driver {
    pub(crate) fn new(
        store: Arc<dyn LeaseStore>,
        config: Config,
        shards_rx: watch::Receiver<Option<BTreeSet<ShardKey>>>,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
        status: watch::Sender<Status>,
    ) -> Self {
        let now = Instant::now();
        Driver {
            store,
            me: config.owner(),
            config,
            shards_rx,
            commands,
            events,
            status,
            shards: BTreeSet::new(),
            shards_known: false,
            finished: BTreeSet::new(),
            held: BTreeMap::new(),
            leases: BTreeMap::new(),
            replicas: BTreeMap::new(),
            absent_since: BTreeMap::new(),
            presence: None,
            beat: 0,
            next_poll: now,
            last_read: now,
            freed: None,
            next_heartbeat: now,
            wake_at: None,
            live_replicas: 1,
            store_reachable: false,
            draining: false,
        }
    }

    pub(crate) async fn run(mut self) {
        info!(replica = %self.me.replica, instance = %self.me.instance, "coordinator started");
        loop {
            let wake = self.next_wake();
            tokio::select! {
                // Biased: a caller's release or finish is written before a due tick, and a fixed
                // branch order keeps simulations deterministic.
                biased;
                command = self.commands.recv() => {
                    // Fence first: a lease whose deadline passed while this task did not run (a
                    // stalled process) is revoked as expired, not released as if it were still ours.
                    self.fence(Instant::now());
                    match command {
                        Some(Command::Shutdown(done)) => {
                            self.shutdown().await;
                            let _ = done.send(());
                            return;
                        }
                        Some(Command::Release(shard)) => self.release(&shard).await,
                        Some(Command::Drain) => {
                            info!(replica = %self.me.replica, "draining: no more leases are taken");
                            self.draining = true;
                        }
                        Some(Command::Finish(shard)) => self.finish(&shard).await,
                        None => return,
                    }
                }
                changed = self.shards_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.take_shards();
                    self.next_poll = Instant::now();
                }
                () = sleep_until(wake) => self.tick().await,
                freed = next_freed(&mut self.freed) => self.on_freed(freed),
            }
        }
    }

    /// Brings the next read forward when a lease came free.
    fn on_freed(&mut self, freed: Option<()>) {
        if freed.is_none() {
            // The watch ended (a disconnection): another is started after the next read.
            self.freed = None;
            return;
        }
        let soon = (self.last_read + EARLY_READ_GAP).max(Instant::now());
        self.next_poll = self.next_poll.min(soon);
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_poll.min(self.next_heartbeat);
        for held in self.held.values() {
            wake = wake.min(held.next_renew).min(held.guard.deadline());
        }
        self.wake_at.map_or(wake, |at| wake.min(at))
    }

    fn take_shards(&mut self) {
        if let Some(shards) = self.shards_rx.borrow_and_update().clone() {
            self.finished.retain(|shard| shards.contains(shard));
            self.shards = shards;
            self.shards_known = true;
        }
    }

    fn emit(&self, event: Event) {
        // The receiver is gone only when the caller is shutting down; nothing to tell then.
        let _ = self.events.send(event);
    }

    fn lease_value(&self, owner: Option<Owner>, term: Term) -> LeaseValue {
        LeaseValue { owner, term, ttl_ms: lease::millis(self.config.ttl) }
    }

    fn deadline_after(&self, started: Instant) -> Instant {
        started + self.config.ttl - self.config.safety_margin
    }

    fn retry_delay(&self) -> Duration {
        self.config.renew_interval / 4
    }

    async fn tick(&mut self) {
        self.fence(Instant::now());
        self.renew_due().await;
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await;
        }
        self.fence(Instant::now());
        self.last_read = Instant::now();
        let read = bounded(self.config.op_timeout, self.store.scan(&keys::PREFIXES)).await;
        let now = Instant::now();
        self.next_poll = now + self.config.poll_interval;
        match read {
            Ok(entries) => {
                self.store_reachable = true;
                self.observe(entries, now);
            }
            Err(err) => {
                self.store_reachable = false;
                warn!(replica = %self.me.replica, error = %err, "cannot read the lease table");
                self.publish_status();
                return;
            }
        }
        let shards: BTreeSet<ShardKey> = self.shards.difference(&self.finished).cloned().collect();
        let held: BTreeSet<ShardKey> = self.held.keys().cloned().collect();
        let handing_over: BTreeSet<ShardKey> =
            self.held.iter().filter(|(_, held)| held.handing_over).map(|(shard, _)| shard.clone()).collect();
        let plan = plan::decide(&View {
            now,
            me: &self.me,
            ttl: self.config.ttl,
            max_leases: self.config.max_leases,
            group: &self.config.group,
            shards: &shards,
            shards_known: self.shards_known,
            leases: &self.leases,
            replicas: &self.replicas,
            held: &held,
            handing_over: &handing_over,
            absent_since: &self.absent_since,
        });
        self.wake_at = plan.wake_at;
        self.live_replicas = plan.live_replicas;
        self.apply(plan.actions).await;
        self.publish_status();
        // Last, and only after a read answered: starting the watch must not delay this tick's reads and
        // writes, nor hang while the store does not answer.
        if self.freed.is_none()
            && let Ok(Some(changes)) = timeout(WATCH_START_TIMEOUT, self.store.watch(&keys::PREFIXES)).await
        {
            self.freed = Some(watch_freed(changes));
        }
    }

    /// Revokes every held lease whose deadline has passed.
    fn fence(&mut self, now: Instant) {
        let expired: Vec<ShardKey> =
            self.held.iter().filter(|(_, held)| held.guard.deadline() <= now).map(|(shard, _)| shard.clone()).collect();
        for shard in expired {
            self.held.remove(&shard);
            warn!(replica = %self.me.replica, shard = %shard, "lease not renewed in time, stopping the shard");
            self.emit(Event::Revoked { shard, reason: RevokeReason::Expired });
        }
    }

    fn observe(&mut self, entries: Vec<(String, Versioned)>, now: Instant) {
        let mut leases = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for (key, entry) in entries {
            if let Some(shard) = keys::shard_of_lease_key(&key) {
                let first_seen = match self.leases.get(&shard) {
                    Some(seen) if seen.revision == entry.revision => seen.first_seen,
                    _ => now,
                };
                let (holder, term) = match lease::decode::<LeaseValue>(&entry.value) {
                    Some(LeaseValue { owner: Some(owner), term, ttl_ms }) => {
                        (Holder::Owned { owner, ttl: Duration::from_millis(ttl_ms) }, term)
                    }
                    Some(LeaseValue { owner: None, term, .. }) => (Holder::Free, term),
                    None => (Holder::Unreadable, Term::default()),
                };
                leases.insert(shard, LeaseSeen { revision: entry.revision, first_seen, holder, term });
            } else if key.starts_with(keys::REPLICA_PREFIX) {
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
                    };
                    replicas.insert(key, seen);
                }
            }
        }
        self.absent_since.retain(|shard, _| self.shards.contains(shard) && !leases.contains_key(shard));
        for shard in &self.shards {
            if !leases.contains_key(shard) {
                self.absent_since.entry(shard.clone()).or_insert(now);
            }
        }
        // A held lease read at a newer revision that still names this process: an earlier write
        // whose answer was lost did land. Adopt the revision (the deadline stays as it was).
        for (shard, held) in &mut self.held {
            if let Some(LeaseSeen { revision, holder: Holder::Owned { owner, .. }, .. }) = leases.get(shard)
                && *owner == self.me
            {
                held.revision = *revision;
            }
        }
        self.leases = leases;
        self.replicas = replicas;
    }

    async fn renew_due(&mut self) {
        let now = Instant::now();
        let due: Vec<(ShardKey, Revision, Term)> = self
            .held
            .iter()
            .filter(|(_, held)| held.next_renew <= now)
            .map(|(shard, held)| (shard.clone(), held.revision, held.term))
            .collect();
        if due.is_empty() {
            return;
        }
        let writes = due.into_iter().map(|(shard, revision, term)| {
            let store = Arc::clone(&self.store);
            let value = lease::encode(&self.lease_value(Some(self.me.clone()), term));
            let limit = self.config.op_timeout;
            async move {
                let key = keys::shard_lease_key(&shard);
                let started = Instant::now();
                let result = bounded(limit, store.update(&key, value, revision)).await;
                (shard, started, result)
            }
        });
        for (shard, started, result) in join_all(writes).await {
            self.renewed(shard, started, result).await;
        }
    }

    async fn renewed(&mut self, shard: ShardKey, started: Instant, result: Result<Revision, StoreError>) {
        let deadline = self.deadline_after(started);
        let next_renew = started + self.config.renew_interval;
        let retry_at = Instant::now() + self.retry_delay();
        match result {
            Ok(revision) => {
                if let Some(held) = self.held.get_mut(&shard) {
                    held.revision = revision;
                    held.next_renew = next_renew;
                    held.guard.extend(deadline);
                }
            }
            Err(StoreError::Conflict { .. }) => {
                let key = keys::shard_lease_key(&shard);
                match bounded(self.config.op_timeout, self.store.get(&key)).await {
                    Ok(Some(entry)) if self.names_me(&entry) => {
                        if let Some(held) = self.held.get_mut(&shard) {
                            held.revision = entry.revision;
                            held.next_renew = Instant::now();
                        }
                    }
                    Ok(_) => {
                        self.held.remove(&shard);
                        warn!(replica = %self.me.replica, shard = %shard, "lease taken by another replica");
                        self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
                    }
                    Err(_) => {
                        if let Some(held) = self.held.get_mut(&shard) {
                            held.next_renew = retry_at;
                        }
                    }
                }
            }
            Err(err) => {
                debug!(replica = %self.me.replica, shard = %shard, error = %err, "lease renewal failed");
                if let Some(held) = self.held.get_mut(&shard) {
                    held.next_renew = retry_at;
                }
            }
        }
    }

    fn names_me(&self, entry: &Versioned) -> bool {
        matches!(lease::decode::<LeaseValue>(&entry.value), Some(LeaseValue { owner: Some(owner), .. }) if owner == self.me)
    }

    async fn heartbeat(&mut self) {
        self.beat += 1;
        let key = keys::presence_key(&self.me.instance);
        let value = lease::encode(&PresenceValue {
            owner: self.me.clone(),
            ttl_ms: lease::millis(self.config.ttl),
            max_leases: self.config.max_leases,
            beat: self.beat,
            group: self.config.group.clone(),
        });
        let started = Instant::now();
        let limit = self.config.op_timeout;
        let result = match self.presence {
            Some(revision) => bounded(limit, self.store.update(&key, value, revision)).await,
            None => bounded(limit, self.store.create(&key, value)).await,
        };
        match result {
            Ok(revision) => {
                self.presence = Some(revision);
                self.next_heartbeat = started + self.config.renew_interval;
            }
            Err(StoreError::Conflict { .. }) => {
                // Our own earlier write landed, or a peer deleted the key while we stalled.
                self.presence = match bounded(limit, self.store.get(&key)).await {
                    Ok(entry) => entry.map(|entry| entry.revision),
                    Err(_) => self.presence,
                };
                self.next_heartbeat = Instant::now();
            }
            Err(err) => {
                debug!(replica = %self.me.replica, error = %err, "presence heartbeat failed");
                self.next_heartbeat = Instant::now() + self.retry_delay();
            }
        }
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        let mut acquisitions = Vec::new();
        for action in actions {
            match action {
                Action::Lost { shard } => {
                    if self.held.remove(&shard).is_some() {
                        warn!(replica = %self.me.replica, shard = %shard, "lease no longer ours, stopping the shard");
                        self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
                    }
                }
                Action::HandOver { shard } => {
                    if let Some(held) = self.held.get_mut(&shard) {
                        held.handing_over = true;
                        info!(replica = %self.me.replica, shard = %shard, "handing over a shard");
                        self.emit(Event::HandOver { shard });
                    }
                }
                Action::Acquire { .. } if self.draining => {}
                Action::Acquire { shard, expected, term } => acquisitions.push((shard, expected, term)),
                Action::Release { shard, expected, term } => {
                    let value = lease::encode(&self.lease_value(None, term));
                    let key = keys::shard_lease_key(&shard);
                    let _ = bounded(self.config.op_timeout, self.store.update(&key, value, expected)).await;
                }
                Action::Forget { shard, expected } => {
                    let key = keys::shard_lease_key(&shard);
                    let _ = bounded(self.config.op_timeout, self.store.delete(&key, expected)).await;
                }
                Action::ForgetReplica { key, expected } => {
                    let _ = bounded(self.config.op_timeout, self.store.delete(&key, expected)).await;
                }
            }
        }
        self.acquire(acquisitions).await;
    }

    async fn acquire(&mut self, wanted: Vec<(ShardKey, Option<Revision>, Term)>) {
        let writes = wanted.into_iter().map(|(shard, expected, term)| {
            let store = Arc::clone(&self.store);
            let value = lease::encode(&self.lease_value(Some(self.me.clone()), term));
            let limit = self.config.op_timeout;
            async move {
                let key = keys::shard_lease_key(&shard);
                let started = Instant::now();
                let result = match expected {
                    Some(revision) => bounded(limit, store.update(&key, value, revision)).await,
                    None => bounded(limit, store.create(&key, value)).await,
                };
                (shard, term, started, result)
            }
        });
        for (shard, term, started, result) in join_all(writes).await {
            match result {
                Ok(revision) => {
                    let deadline = self.deadline_after(started);
                    if Instant::now() >= deadline {
                        // Answered too late to be of use; the next read finds it ours and re-decides.
                        continue;
                    }
                    let (guard_handle, guard) = GuardHandle::issue(shard.clone(), term, deadline);
                    let next_renew = started + self.config.renew_interval;
                    let held = Held { revision, term, next_renew, guard: guard_handle, handing_over: false };
                    self.held.insert(shard.clone(), held);
                    info!(replica = %self.me.replica, shard = %shard, term = term.get(), "lease acquired");
                    self.emit(Event::Acquired { shard, guard });
                }
                Err(err) => debug!(replica = %self.me.replica, shard = %shard, error = %err, "lease not acquired"),
            }
        }
    }

    /// Writes `value` over a lease this process owns: on a conflict, re-reads once and retries if the
    /// lease still names this process (an earlier write of ours landed).
    async fn write_own(&self, shard: &ShardKey, revision: Revision, value: Option<LeaseValue>) {
        let key = keys::shard_lease_key(shard);
        let limit = self.config.op_timeout;
        let mut revision = revision;
        for _ in 0..2 {
            let result = match &value {
                Some(value) => {
                    bounded(limit, self.store.update(&key, lease::encode(value), revision)).await.map(|_| ())
                }
                None => bounded(limit, self.store.delete(&key, revision)).await,
            };
            match result {
                Err(StoreError::Conflict { .. }) => match bounded(limit, self.store.get(&key)).await {
                    Ok(Some(entry)) if self.names_me(&entry) => revision = entry.revision,
                    _ => return,
                },
                Ok(()) => return,
                Err(err) => {
                    warn!(replica = %self.me.replica, shard = %shard, error = %err, "cannot write a lease release");
                    return;
                }
            }
        }
    }

    async fn release(&mut self, shard: &ShardKey) {
        let Some(held) = self.held.remove(shard) else { return };
        held.guard.revoke();
        let value = self.lease_value(None, held.term);
        self.write_own(shard, held.revision, Some(value)).await;
        info!(replica = %self.me.replica, shard = %shard, "lease released");
        self.publish_status();
    }

    async fn finish(&mut self, shard: &ShardKey) {
        self.finished.insert(shard.clone());
        let Some(held) = self.held.remove(shard) else { return };
        held.guard.revoke();
        self.write_own(shard, held.revision, None).await;
        info!(replica = %self.me.replica, shard = %shard, "shard finished, lease deleted");
        self.publish_status();
    }

    async fn shutdown(&mut self) {
        // Presence first, so peers stop counting this replica before its leases come free.
        if let Some(revision) = self.presence.take() {
            let key = keys::presence_key(&self.me.instance);
            let _ = bounded(self.config.op_timeout, self.store.delete(&key, revision)).await;
        }
        let held = std::mem::take(&mut self.held);
        for held in held.values() {
            held.guard.revoke();
        }
        let writes = held.iter().map(|(shard, held)| {
            let value = self.lease_value(None, held.term);
            self.write_own(shard, held.revision, Some(value))
        });
        join_all(writes).await;
        info!(replica = %self.me.replica, released = held.len(), "coordinator stopped, leases released");
        self.publish_status();
    }

    fn publish_status(&self) {
        self.status.send_replace(Status {
            held: self.held.keys().cloned().collect(),
            live_replicas: self.live_replicas,
            shards: self.shards.len(),
            store_reachable: self.store_reachable,
        });
    }
}
