//! The thin driver: performs what the pure core ([`crate::plan`]) decides, against the store.
//!
//! Owns one replica's task: one `select!` loop over caller commands, shard-set changes, a timer and
//! (where the store can watch) the store's changes, which only bring the next read forward: a lease
//! released or a replica gone is seen within [`EARLY_READ_GAP`] instead of a poll interval. What to
//! write and when — the table's actions ([`plan::decide`]), renewals, heartbeats, revocations, guard
//! deadlines, adoption of our own writes — comes from `plan`; this module reads ([`reads`]), writes
//! ([`writes`], [`session`]), and tells the caller. Invariants kept: a guard is revoked before the
//! caller is told and before its lease is written free; a session that ends revokes every guard before
//! a new session starts; and every store operation is bounded by the configured time-out, while the
//! session is renewed during any long read or round of writes ([`Driver::renewing_while`]).

mod mirror;
mod reads;
mod session;
mod writes;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::guard::GuardHandle;
use crate::keys::{self, ShardKey};
use crate::lease::{self, LeaseValue, Owner, Term};
use crate::messages::{Command, Event, Status};
use crate::plan::{self, HeldLease, LeaseSeen, ReplicaSeen, Session, Timing, View};
use crate::store::{LeaseStore, Revision, StoreError};
use mirror::{Mirror, next_freed, watch_freed};

/// The shortest time between two reads of the lease table that the store's changes bring forward,
/// however many leases come free at once.
pub const EARLY_READ_GAP: Duration = Duration::from_millis(100);
/// How long starting a watch may take; a slower start is tried again after the next read.
const WATCH_START_TIMEOUT: Duration = Duration::from_millis(500);
/// Lease writes (acquisitions, renewals of each lease) in flight at once: thousands at once would
/// outlast their time-out on a busy connection and come back as lost answers.
const WRITES_IN_FLIGHT: usize = 64;

/// A lease this replica holds: its timing (the core's) and its guard.
#[derive(Debug)]
struct Held {
    lease: HeldLease,
    guard: GuardHandle,
}

pub(crate) struct Driver {
    store: Arc<dyn LeaseStore>,
    config: Config,
    timing: Timing,
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
    /// The session key, the heartbeat and the protocol followed.
    session: Session,
    next_poll: Instant,
    /// When the last read of the lease table started, and how long it took.
    last_read: Instant,
    last_read_took: Duration,
    /// A message whenever a write to the lease table frees a lease (from a task watching the store);
    /// `None` until started (after a read) or if the store cannot watch.
    freed: Option<mpsc::Receiver<()>>,
    /// `None` while there is none (before the first read, after its watch ended, or when the store
    /// cannot watch: then every read is a full one).
    mirror: Option<Mirror>,
    /// A command taken from the queue while gathering releases, performed next.
    stashed: Option<Command>,
    wake_at: Option<Instant>,
    live_replicas: usize,
    store_reachable: bool,
    /// Set by [`Command::Drain`]: no lease is acquired any more.
    draining: bool,
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
            timing: Timing::from(&config),
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
            session: Session::new(now),
            next_poll: now,
            last_read: now,
            last_read_took: Duration::ZERO,
            freed: None,
            mirror: None,
            stashed: None,
            wake_at: None,
            live_replicas: 1,
            store_reachable: false,
            draining: false,
        }
    }

    pub(crate) async fn run(mut self) {
        info!(replica = %self.me.replica, instance = %self.me.instance, "coordinator started");
        loop {
            if self.session.heartbeat_due(Instant::now()) {
                // Before anything else: a burst of commands (a thousand hand-overs released one by
                // one) must not hold back the one write every held lease depends on.
                self.fence(Instant::now());
                self.heartbeat().await;
            }
            if let Some(command) = self.stashed.take() {
                if self.command(Some(command)).await {
                    return;
                }
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                // Biased: a caller's release or finish is written before a due tick, and a fixed
                // branch order keeps simulations deterministic.
                biased;
                command = self.commands.recv() => {
                    if self.command(command).await {
                        return;
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

    /// Performs a caller's command; `true` when the driver stops.
    async fn command(&mut self, command: Option<Command>) -> bool {
        // Fence first: a lease whose deadline passed while this task did not run (a stalled process)
        // is revoked as expired, not released as if it were still ours.
        self.fence(Instant::now());
        match command {
            Some(Command::Shutdown(done)) => {
                self.shutdown().await;
                let _ = done.send(());
                return true;
            }
            Some(Command::Release(shard)) => self.give_back_all((shard, false)).await,
            Some(Command::Drain) => {
                info!(replica = %self.me.replica, "draining: no more leases are taken");
                self.draining = true;
            }
            Some(Command::Finish(shard)) => self.give_back_all((shard, true)).await,
            None => return true,
        }
        false
    }

    /// Gives back `first` and every release or finish already waiting behind it, together; the first
    /// other command met waits for the next turn of the loop.
    async fn give_back_all(&mut self, first: (ShardKey, bool)) {
        let mut shards = vec![first];
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Release(shard) => shards.push((shard, false)),
                Command::Finish(shard) => shards.push((shard, true)),
                other => {
                    self.stashed = Some(other);
                    break;
                }
            }
        }
        self.give_back(shards).await;
    }

    /// Brings the next read forward when a lease came free.
    fn on_freed(&mut self, freed: Option<()>) {
        if freed.is_none() {
            // The watch ended (a disconnection): another is started after the next read.
            self.freed = None;
            return;
        }
        let soon = (self.last_read + EARLY_READ_GAP.max(self.last_read_took)).max(Instant::now());
        self.next_poll = self.next_poll.min(soon);
    }

    fn next_wake(&self) -> Instant {
        let held = self.held.values().map(|held| (held.guard.deadline(), &held.lease));
        plan::next_wake(&self.timing, &self.session, self.next_poll, held, self.wake_at)
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

    /// This process's session number, `None` when it renews each lease (the previous protocol).
    fn session_number(&self) -> Option<u64> {
        self.session.number(&self.timing)
    }

    /// A lease value naming `owner` (and this process's session when it is the owner), or free.
    /// A write of `shard`'s lease naming this process (its session too) at `term`, by compare-and-swap
    /// at `expected` (`None`: the key is created), bounded by the operation time-out; an owned future,
    /// so that many run at once. Resolves to when the write started (a guard's deadline counts from
    /// there) and its result.
    fn write_own_lease(
        &self,
        shard: ShardKey,
        expected: Option<Revision>,
        term: Term,
    ) -> impl Future<Output = (Instant, Result<Revision, StoreError>)> + use<> {
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
            (started, result)
        }
    }

    fn lease_value(&self, owner: Option<Owner>, term: Term) -> LeaseValue {
        let session = owner.as_ref().and(self.session_number());
        LeaseValue { owner, term, ttl_ms: lease::millis(self.config.ttl), session }
    }

    /// Moves every guard to the deadline its lease's bounds allow now.
    fn extend_guards(&self) {
        let now = Instant::now();
        for held in self.held.values() {
            held.guard.extend(held.lease.guard_deadline(&self.timing, &self.session, now));
        }
    }

    /// Runs `work` while keeping the session renewed and the guards fenced, so that a long read of the
    /// table or a long round of writes never delays the one write every held lease depends on.
    async fn renewing_while<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            let heartbeat = self.session.next_heartbeat;
            tokio::select! {
                biased;
                done = &mut work => return done,
                () = sleep_until(heartbeat) => {
                    self.fence(Instant::now());
                    self.heartbeat().await;
                }
            }
        }
    }

    async fn tick(&mut self) {
        self.fence(Instant::now());
        if self.session.heartbeat_due(Instant::now()) {
            self.heartbeat().await;
        }
        if self.session.renews_each_lease(&self.timing) {
            self.renew_due().await;
        }
        self.fence(Instant::now());
        self.last_read = Instant::now();
        let read = self.read().await;
        let now = Instant::now();
        // A table so large that reading it takes longer than the poll interval is read less often
        // (half the time at most), so that reading it does not become all this replica does.
        self.last_read_took = now - self.last_read;
        debug!(replica = %self.me.replica, took = ?self.last_read_took, leases = self.leases.len(), mirrored = self.mirror.is_some(), "lease table read");
        self.next_poll = now + self.config.poll_interval.max(self.last_read_took);
        if let Err(err) = read {
            self.store_reachable = false;
            warn!(replica = %self.me.replica, error = %err, "cannot read the lease table");
            self.publish_status();
            return;
        }
        self.store_reachable = true;
        let shards: BTreeSet<ShardKey> = self.shards.difference(&self.finished).cloned().collect();
        let held: BTreeSet<ShardKey> = self.held.keys().cloned().collect();
        let handing_over: BTreeSet<ShardKey> =
            self.held.iter().filter(|(_, held)| held.lease.handing_over).map(|(shard, _)| shard.clone()).collect();
        let plan = plan::decide(&View {
            now,
            me: &self.me,
            ttl: self.config.ttl,
            max_leases: self.config.max_leases,
            group: &self.config.group,
            session: self.session_number(),
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

    fn publish_status(&self) {
        self.status.send_replace(Status {
            held: self.held.keys().cloned().collect(),
            live_replicas: self.live_replicas,
            store_reachable: self.store_reachable,
            renews_each_lease: self.session.renews_each_lease(&self.timing),
        });
    }
}
