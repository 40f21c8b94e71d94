//! The thin driver: performs the core's decisions against the store, renews, heartbeats and fences.
//!
//! Owns one replica's task: one `select!` loop over caller commands, shard-set changes, a timer and
//! (where the store can watch) the store's changes, which only bring the next read forward: a lease
//! released or a replica gone is seen within [`EARLY_READ_GAP`] instead of a poll interval.
//! Invariants kept: a guard's deadline only ever comes from the *start* time of a successful
//! compare-and-swap write (of the session key, and of the lease itself or the start of a read that
//! found no replica of the previous version) plus TTL minus the safety margin; a held lease whose
//! deadline passes is revoked (the guard itself is already invalid by then); a lease is released only
//! after its guard is revoked; a session that ends (its key deleted by a peer's fence) revokes every
//! guard before a new session starts.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::messages::{Command, Event, RevokeReason, Status};
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
/// Lease writes (acquisitions, renewals of each lease) in flight at once: thousands at once would
/// outlast their time-out on a busy connection and come back as lost answers.
const WRITES_IN_FLIGHT: usize = 64;
/// The keys read first in each read of the table; the presence keys are read after them (see
/// [`Driver::read`]).
const LEASE_PREFIXES: [&str; 1] = [keys::SHARD_PREFIX];

/// How long a mirror of the lease keys is trusted before it is rebuilt from a full read, whatever
/// its watch says (insurance against a watch that misses a write without ending).
const MIRROR_RESYNC: Duration = Duration::from_secs(300);

/// The lease keys as a full read found them, kept current by a watch started just before that read:
/// reading the table then costs what changed since, not the number of shards (with 10,000 leases, a
/// full read every `T/6` on each of 3 replicas outran the store). A hint like every watch: a write it
/// has not delivered yet makes a decision stale, and a stale decision's compare-and-swap fails.
struct Mirror {
    changes: mpsc::UnboundedReceiver<Change>,
    entries: BTreeMap<String, Versioned>,
    built: Instant,
}

impl Mirror {
    /// Applies what the watch delivered so far; `false` once the watch ended (the mirror is stale).
    fn catch_up(&mut self) -> bool {
        loop {
            match self.changes.try_recv() {
                Ok(change) => self.apply(change),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// A change older than what the full read found for its key (the watch started before the read)
    /// is skipped; anything newer replaces it.
    fn apply(&mut self, change: Change) {
        if self.entries.get(&change.key).is_some_and(|entry| entry.revision >= change.revision) {
            return;
        }
        match change.value {
            Some(value) => {
                self.entries.insert(change.key, Versioned { value, revision: change.revision });
            }
            None => {
                self.entries.remove(&change.key);
            }
        }
    }
}

/// A task moving `changes` into a channel the driver drains at each read; it ends with the watch (the
/// channel then reports the end) or when the receiver is dropped.
fn forward(mut changes: BoxStream<'static, Change>) -> mpsc::UnboundedReceiver<Change> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                () = tx.closed() => return,
                change = changes.next() => change,
            };
            let Some(change) = change else { return };
            if tx.send(change).is_err() {
                return;
            }
        }
    });
    rx
}

/// A lease this replica holds.
#[derive(Debug)]
struct Held {
    revision: Revision,
    term: Term,
    /// When this lease's own renewal is due (only while leases are renewed one by one).
    next_renew: Instant,
    /// When the last successful write of this lease started.
    last_write: Instant,
    /// The bound that keeps a replica of the previous version from taking it while the guard is valid:
    /// `T − m` after the last write of the lease or after the start of a read that found no such
    /// replica, whichever is later (see `DESIGN.md`, "Sessions").
    lease_deadline: Instant,
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
    /// This process's session number (grows when a session ends); unused without sessions.
    epoch: u64,
    /// `T − m` after the start of the last successful write of the session key in this session; no
    /// lease is acquired without it.
    session_deadline: Option<Instant>,
    /// Leases are renewed one by one as well: a replica of the previous version is present, or was
    /// until a read that started at `legacy_gone_at` and not every held lease was rewritten since.
    mixed: bool,
    legacy_gone_at: Option<Instant>,
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
            epoch: 1,
            session_deadline: None,
            mixed: false,
            legacy_gone_at: None,
            next_poll: now,
            last_read: now,
            last_read_took: Duration::ZERO,
            freed: None,
            mirror: None,
            stashed: None,
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
            if Instant::now() >= self.next_heartbeat {
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
        let mut wake = self.next_poll.min(self.next_heartbeat);
        let each_lease = self.renews_each_lease();
        for held in self.held.values() {
            wake = wake.min(held.guard.deadline());
            if each_lease {
                wake = wake.min(held.next_renew);
            }
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

    /// This process's session number, `None` when it renews each lease (the previous protocol).
    fn session(&self) -> Option<u64> {
        self.config.sessions.then_some(self.epoch)
    }

    /// Whether each held lease is rewritten every renew interval.
    fn renews_each_lease(&self) -> bool {
        !self.config.sessions || self.mixed
    }

    /// A lease value naming `owner` (and this process's session when it is the owner), or free.
    fn lease_value(&self, owner: Option<Owner>, term: Term) -> LeaseValue {
        let session = owner.as_ref().and(self.session());
        LeaseValue { owner, term, ttl_ms: lease::millis(self.config.ttl), session }
    }

    fn deadline_after(&self, started: Instant) -> Instant {
        started + self.config.ttl - self.config.safety_margin
    }

    /// The deadline a guard may have now, given its lease's own bound: that bound, and the session's.
    fn guard_deadline(&self, lease_deadline: Instant) -> Instant {
        match (self.config.sessions, self.session_deadline) {
            (false, _) => lease_deadline,
            (true, Some(session)) => lease_deadline.min(session),
            // No session write has succeeded in this session: nothing may be held.
            (true, None) => Instant::now().min(lease_deadline),
        }
    }

    fn extend_guards(&self) {
        for held in self.held.values() {
            held.guard.extend(self.guard_deadline(held.lease_deadline));
        }
    }

    fn retry_delay(&self) -> Duration {
        self.config.renew_interval / 4
    }

    /// Runs `work` while keeping the session renewed and the guards fenced, so that a long read of the
    /// table or a long round of writes never delays the one write every held lease depends on.
    async fn renewing_while<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            let heartbeat = self.next_heartbeat;
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
        if Instant::now() >= self.next_heartbeat {
            self.heartbeat().await;
        }
        if self.renews_each_lease() {
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
            self.held.iter().filter(|(_, held)| held.handing_over).map(|(shard, _)| shard.clone()).collect();
        let plan = plan::decide(&View {
            now,
            me: &self.me,
            ttl: self.config.ttl,
            max_leases: self.config.max_leases,
            group: &self.config.group,
            session: self.session(),
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

    /// Reads the table: the leases first, then the presence keys. A lease that names a session was
    /// written after that session's key, so a read of the presence keys that starts after the lease
    /// was read shows the session, or that it ended: a lease whose session is missing is free.
    async fn read(&mut self) -> Result<(), StoreError> {
        // The lease keys grow with the shard count; their read may take longer than one operation
        // (the session is renewed meanwhile), but not longer than a TTL.
        let leases = self.read_leases().await;
        // Read even when the leases could not be: the presence keys alone keep the guards' second
        // bound moving (see `follow_protocols`), and they are few.
        let started = Instant::now();
        let session_before = (self.epoch, self.presence.is_some());
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
    async fn read_presences(&mut self) {
        let started = Instant::now();
        let session_before = (self.epoch, self.presence.is_some());
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

    /// The session ended (a peer deleted its key: the fence): every guard is revoked, then a new
    /// session starts, under which this replica takes leases again like any other.
    fn end_session(&mut self, why: &str) {
        warn!(replica = %self.me.replica, session = self.epoch, held = self.held.len(), why, "session ended, stopping every shard");
        for (shard, held) in std::mem::take(&mut self.held) {
            held.guard.revoke();
            self.emit(Event::Revoked { shard, reason: RevokeReason::Lost });
        }
        self.epoch += 1;
        self.presence = None;
        self.session_deadline = None;
        self.next_heartbeat = Instant::now();
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
        let mine = keys::presence_key(&self.me.instance);
        if self.config.sessions && session_before == (self.epoch, true) && !replicas.contains_key(&mine) {
            // Written (and answered) before this read started, absent from it: a peer's fence deleted it.
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
        // A held lease read at a newer revision that still names this process: an earlier write
        // whose answer was lost did land. Adopt the revision (the deadline stays as it was).
        let session = self.session();
        for (shard, held) in &mut self.held {
            match leases.get(shard) {
                Some(LeaseSeen { revision, holder: Holder::Owned { owner, session: written, .. }, .. })
                    if *owner == self.me && *written == session =>
                {
                    held.revision = *revision;
                }
                // Older than our own answered write (a mirror whose watch has not delivered it yet),
                // or not there yet: stale for this key, and our write stands. A write by anyone else
                // since has a newer revision (revisions never go back), so a lease taken is still
                // seen as taken; only a delete of a lease we hold goes unseen, and that happens only
                // once our guard is invalid (a fenced session, or an expired lease for a replica of
                // the previous version), which the deadline revokes anyway.
                Some(seen) if seen.revision >= held.revision => {}
                _ => {
                    let holder = Holder::Owned { owner: self.me.clone(), ttl: self.config.ttl, session };
                    let first_seen = leases.get(shard).map_or(now, |seen| seen.first_seen);
                    let seen = LeaseSeen {
                        revision: held.revision,
                        first_seen,
                        holder,
                        term: held.term,
                        orphaned_since: None,
                    };
                    leases.insert(shard.clone(), seen);
                }
            }
        }
        self.leases = leases;
    }

    /// Switches between renewing the session alone and renewing each lease as well, from the presence
    /// keys of a read that started at `read_started`, and moves the guards' bounds.
    fn follow_protocols(&mut self, read_started: Instant) {
        if !self.config.sessions {
            return;
        }
        // Expired presences count too: a previous-version replica that stalled may wake and act on
        // what it read before, until its key is deleted.
        let legacy = self.replicas.values().any(|seen| seen.session.is_none() && seen.owner != self.me);
        if legacy {
            if !self.mixed {
                info!(replica = %self.me.replica, "a replica of the previous version is present: renewing each lease too");
                self.mixed = true;
                for held in self.held.values_mut() {
                    held.next_renew = read_started;
                }
            }
            self.legacy_gone_at = None;
        } else if self.mixed {
            // Every lease rewritten since the previous version's last replica was gone: whatever it
            // read before no longer matches any revision, so its compare-and-swap writes fail.
            let gone_at = *self.legacy_gone_at.get_or_insert(read_started);
            if self.held.values().all(|held| held.last_write >= gone_at) {
                info!(replica = %self.me.replica, "no replica of the previous version left: renewing the session alone");
                self.mixed = false;
                self.legacy_gone_at = None;
            }
        }
        if !self.mixed {
            // A replica of the previous version needs a TTL of an unchanged revision, first read
            // within a renew interval before its presence key shows (DESIGN.md, "Sessions"): none
            // showed in this read.
            // `Config::validate` keeps renew interval + op timeout below TTL − margin.
            let bound = self.deadline_after(read_started) - self.config.renew_interval;
            for held in self.held.values_mut() {
                held.lease_deadline = held.lease_deadline.max(bound);
            }
            self.extend_guards();
        }
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
        let writes: Vec<_> = writes.collect();
        let results =
            self.renewing_while(stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>()).await;
        for (shard, started, result) in results {
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
                    held.last_write = started;
                    held.lease_deadline = held.lease_deadline.max(deadline);
                }
                if let Some(held) = self.held.get(&shard) {
                    held.guard.extend(self.guard_deadline(held.lease_deadline));
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

    /// Whether a lease value names this process in its current session.
    fn names_me(&self, entry: &Versioned) -> bool {
        matches!(
            lease::decode::<LeaseValue>(&entry.value),
            Some(LeaseValue { owner: Some(owner), session, .. }) if owner == self.me && session == self.session()
        )
    }

    /// Writes the presence key; with sessions it is the session, and a successful write moves every
    /// guard's deadline (one write per renew interval, whatever the number of leases held).
    async fn heartbeat(&mut self) {
        self.beat += 1;
        let key = keys::presence_key(&self.me.instance);
        let value = lease::encode(&PresenceValue {
            owner: self.me.clone(),
            ttl_ms: lease::millis(self.config.ttl),
            max_leases: self.config.max_leases,
            beat: self.beat,
            group: self.config.group.clone(),
            session: self.session(),
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
                if self.config.sessions {
                    let deadline = self.deadline_after(started);
                    self.session_deadline = Some(self.session_deadline.map_or(deadline, |at| at.max(deadline)));
                    self.extend_guards();
                    self.read_presences().await;
                }
            }
            Err(StoreError::Conflict { .. }) => {
                // Our own earlier write landed (its answer was lost), or a peer deleted the key.
                match bounded(limit, self.store.get(&key)).await {
                    Ok(Some(entry))
                        if lease::decode::<PresenceValue>(&entry.value).is_some_and(|v| v.owner == self.me) =>
                    {
                        // Adopted; the deadline moves only with the next write answered.
                        self.presence = Some(entry.revision);
                    }
                    Ok(_) if self.config.sessions && self.presence.is_some() => {
                        self.end_session("the session key was deleted");
                    }
                    Ok(_) => self.presence = None,
                    Err(_) => {}
                }
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
        let mut writes = Vec::new();
        let limit = self.config.op_timeout;
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
                Action::Acquire { .. } if self.draining || !self.session_valid() => {}
                Action::Acquire { shard, expected, term } => acquisitions.push((shard, expected, term)),
                Action::Release { shard, expected, term } => {
                    let (store, value) = (Arc::clone(&self.store), lease::encode(&self.lease_value(None, term)));
                    let key = keys::shard_lease_key(&shard);
                    let write =
                        async move { (false, bounded(limit, store.update(&key, value, expected)).await.map(|_| ())) };
                    writes.push(write.boxed());
                }
                Action::Forget { shard, expected } => {
                    let store = Arc::clone(&self.store);
                    let key = keys::shard_lease_key(&shard);
                    writes.push(async move { (false, bounded(limit, store.delete(&key, expected)).await) }.boxed());
                }
                Action::ForgetReplica { key, expected } => {
                    // For a session, this delete is the fence: once it lands, the session's owner can
                    // renew nothing, and its leases are free.
                    let store = Arc::clone(&self.store);
                    writes.push(async move { (true, bounded(limit, store.delete(&key, expected)).await) }.boxed());
                }
            }
        }
        let writes = stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>();
        let results = self.renewing_while(writes).await;
        // A fence that was answered (deleted, or someone moved first): read again at once, to take the
        // leases it frees.
        let fenced =
            results.iter().any(|(fence, result)| *fence && !matches!(result, Err(StoreError::Unavailable { .. })));
        self.acquire(acquisitions).await;
        if fenced {
            self.next_poll = Instant::now();
        }
    }

    /// Whether a lease acquired now would get a valid guard.
    fn session_valid(&self) -> bool {
        !self.config.sessions || self.session_deadline.is_some_and(|deadline| deadline > Instant::now())
    }

    async fn acquire(&mut self, wanted: Vec<(ShardKey, Option<Revision>, Term)>) {
        if wanted.is_empty() {
            return;
        }
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
        let writes: Vec<_> = writes.collect();
        let epoch = self.epoch;
        let results =
            self.renewing_while(stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<_>>()).await;
        for (shard, term, started, result) in results {
            if self.epoch != epoch {
                // The session these leases name ended meanwhile: they are free for everyone, not ours.
                break;
            }
            match result {
                Ok(revision) => {
                    let lease_deadline = self.deadline_after(started);
                    let deadline = self.guard_deadline(lease_deadline);
                    if Instant::now() >= deadline {
                        // Answered too late to be of use; the next read finds it ours and re-decides.
                        continue;
                    }
                    let (guard_handle, guard) = GuardHandle::issue(shard.clone(), term, deadline);
                    let held = Held {
                        revision,
                        term,
                        next_renew: started + self.config.renew_interval,
                        last_write: started,
                        lease_deadline,
                        guard: guard_handle,
                        handing_over: false,
                    };
                    self.held.insert(shard.clone(), held);
                    info!(replica = %self.me.replica, shard = %shard, term = term.get(), "lease acquired");
                    self.emit(Event::Acquired { shard, guard });
                }
                Err(err) => debug!(replica = %self.me.replica, shard = %shard, error = %err, "lease not acquired"),
            }
        }
    }

    /// Writes `value` over a lease this process owns (deletes it for `None`): on a conflict, re-reads
    /// once and retries if the lease still names this process in this session (an earlier write of
    /// ours landed). An owned future, so that many run at once while the session is renewed.
    fn write_own(
        &self,
        shard: &ShardKey,
        revision: Revision,
        value: Option<LeaseValue>,
    ) -> impl Future<Output = ()> + use<> {
        let (store, me, session) = (Arc::clone(&self.store), self.me.clone(), self.session());
        let (key, shard, limit) = (keys::shard_lease_key(shard), shard.clone(), self.config.op_timeout);
        let names_me = move |entry: &Versioned| {
            matches!(
                lease::decode::<LeaseValue>(&entry.value),
                Some(LeaseValue { owner: Some(owner), session: written, .. }) if owner == me && written == session
            )
        };
        async move {
            let mut revision = revision;
            for _ in 0..2 {
                let result = match &value {
                    Some(value) => bounded(limit, store.update(&key, lease::encode(value), revision)).await.map(|_| ()),
                    None => bounded(limit, store.delete(&key, revision)).await,
                };
                match result {
                    Err(StoreError::Conflict { .. }) => match bounded(limit, store.get(&key)).await {
                        Ok(Some(entry)) if names_me(&entry) => revision = entry.revision,
                        _ => return,
                    },
                    Ok(()) => return,
                    Err(err) => {
                        warn!(shard = %shard, error = %err, "cannot write a lease release");
                        return;
                    }
                }
            }
        }
    }

    /// Releases (`finished: false`) or deletes (`finished: true`) held leases, guards revoked first;
    /// the writes go out together while the session is renewed, so a thousand hand-overs do not hold
    /// back the session or the next read.
    async fn give_back(&mut self, shards: Vec<(ShardKey, bool)>) {
        let mut writes = Vec::new();
        for (shard, finished) in shards {
            if finished {
                self.finished.insert(shard.clone());
            }
            let Some(held) = self.held.remove(&shard) else { continue };
            held.guard.revoke();
            let value = (!finished).then(|| self.lease_value(None, held.term));
            writes.push(self.write_own(&shard, held.revision, value));
            if finished {
                info!(replica = %self.me.replica, shard = %shard, "shard finished, lease deleted");
            } else {
                info!(replica = %self.me.replica, shard = %shard, "lease released");
            }
        }
        if writes.is_empty() {
            return;
        }
        self.publish_status();
        let writes = stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<()>>();
        self.renewing_while(writes).await;
    }

    async fn shutdown(&mut self) {
        let held = std::mem::take(&mut self.held);
        for held in held.values() {
            held.guard.revoke();
        }
        // Presence next (guards first: with sessions, deleting it frees every lease of the session),
        // so peers stop counting this replica before its leases come free.
        if let Some(revision) = self.presence.take() {
            let key = keys::presence_key(&self.me.instance);
            let _ = bounded(self.config.op_timeout, self.store.delete(&key, revision)).await;
        }
        // Released one by one as well, for replicas of the previous version (they read no sessions).
        let writes: Vec<_> = held
            .iter()
            .map(|(shard, held)| self.write_own(shard, held.revision, Some(self.lease_value(None, held.term))))
            .collect();
        stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT).collect::<Vec<()>>().await;
        info!(replica = %self.me.replica, released = held.len(), "coordinator stopped, leases released");
        self.publish_status();
    }

    fn publish_status(&self) {
        self.status.send_replace(Status {
            held: self.held.keys().cloned().collect(),
            live_replicas: self.live_replicas,
            store_reachable: self.store_reachable,
            renews_each_lease: self.renews_each_lease(),
        });
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn change(key: &str, value: Option<&'static str>, revision: u64) -> Change {
        Change {
            key: key.into(),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
            revision: Revision::new(revision),
        }
    }

    #[test]
    fn a_mirror_keeps_the_newest_of_its_full_read_and_its_watch() {
        let (tx, changes) = mpsc::unbounded_channel();
        let read = |value: &'static str, revision| Versioned {
            value: Bytes::from_static(value.as_bytes()),
            revision: Revision::new(revision),
        };
        let entries = BTreeMap::from([("a".to_owned(), read("a5", 5)), ("b".to_owned(), read("b7", 7))]);
        let mut mirror = Mirror { changes, entries, built: Instant::now() };
        // The watch started before the full read: what it saw first is older than the read.
        for older in [change("a", Some("a4"), 4), change("b", None, 6)] {
            tx.send(older).unwrap();
        }
        // Then what came after the read: an update, a delete, a new key.
        for newer in [change("a", Some("a8"), 8), change("b", None, 9), change("c", Some("c10"), 10)] {
            tx.send(newer).unwrap();
        }
        assert!(mirror.catch_up());
        let now: Vec<(&str, u64)> =
            mirror.entries.iter().map(|(key, entry)| (key.as_str(), entry.revision.get())).collect();
        assert_eq!(now, [("a", 8), ("c", 10)]);
        drop(tx);
        assert!(!mirror.catch_up(), "a mirror whose watch ended is stale");
    }
}
