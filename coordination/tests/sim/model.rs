//! The side effects the lease protects, modelled the way the service performs them (`src/source/shard.rs`,
//! `src/publish/`): per-shard record logs, a reader per held guard, a publish client per replica, the
//! network between it and NATS, checkpoints in the store, and the JetStream stream with its duplicate
//! window.
//!
//! A reader resumes after its shard's checkpoint, hands a record to its replica's client only after
//! `guard.check()` passes (at most one unacknowledged publish per item, at most [`WINDOW`] in
//! flight), and checkpoints, by compare-and-swap in the lease store, only a contiguous acknowledged
//! prefix. A client holds its publishes while its replica is partitioned from NATS; its connection is
//! fenced (unwritten publishes dropped) when a guard is lost with publishes unacknowledged or an ack
//! is overdue. What was written to the network before a partition began ("on the wire") cannot be
//! recalled and arrives when the partition heals.
//!
//! Invariant kept, checked on every delivery: **an item's version never goes backwards in the stream
//! and no record is stored twice**, except the documented residual (DESIGN.md, "Fencing publishes"):
//! publishes on the wire when a partition began, at most one per item, stored a second time only when
//! the partition outlasted the duplicate window plus the guard's safety margin (half the window for a
//! new tenure's re-publish of a record its predecessor stored: late by the partition plus the time
//! since that first copy, one of which outlasted half the window). Records re-published after a crash or a hand-over
//! must land inside the window and are never stored twice.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coordination::{LeaseGuard, LeaseStore, MemoryStore, Revision, ShardKey, StoreError, Versioned};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// Items per shard: few, so versions of one item follow each other closely.
const ITEMS: usize = 3;
/// Chance per step (100 ms) that a shard gets a write: about one record every two seconds.
const WRITE_RATE: f64 = 0.05;
/// Unacknowledged publishes per reader (the service's publish window, scaled down).
pub const WINDOW: usize = 4;
/// An ack awaited longer fences the connection (the service's `PUBLISH_TIMEOUT_MS` default).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Worst one-way latency between a client and NATS.
const MAX_NET_MS: u64 = 40;

/// One change of one item: the `version`th write of `item` in its shard.
#[derive(Clone, Copy, Debug)]
struct Record {
    item: usize,
    version: u64,
}

struct Log {
    checkpoint_key: String,
    records: Vec<Record>,
    versions: [u64; ITEMS],
}

/// A publish as the client holds it.
struct Entry {
    shard: ShardKey,
    seq: usize,
    record: Record,
    reader: u64,
    /// When that reader's tenure began reading (its checkpoint load answered).
    reader_started: Instant,
    generation: u64,
    /// Written to the network (it will arrive, fenced or not), at `deliver_at` unless held.
    written: bool,
    deliver_at: Instant,
    /// Written before partition `n` began: arrives when it heals.
    on_wire: Option<usize>,
}

#[derive(Clone, Copy)]
struct Ack {
    at: Instant,
    generation: u64,
    reader: u64,
    seq: usize,
}

struct Partition {
    id: usize,
    began: Instant,
    until: Instant,
}

/// One replica's publish client and its link to NATS.
struct Client {
    store: MemoryStore,
    alive: bool,
    generation: u64,
    connected: bool,
    queue: VecDeque<Entry>,
    acks: Vec<Ack>,
    partition: Option<Partition>,
}

enum Phase {
    Loading { asked: bool },
    Reading,
}

/// The shard reader of one guard.
struct Reader {
    id: u64,
    started: Instant,
    replica: usize,
    shard: ShardKey,
    guard: LeaseGuard,
    phase: Phase,
    next: usize,
    /// Handed over and not yet acknowledged, in order: (seq, item, handed at, acked).
    in_flight: VecDeque<(usize, usize, Instant, bool)>,
    acked_upto: usize,
    checkpoint: usize,
    revision: Option<Revision>,
    writing: bool,
    /// The position being written: a write whose answer was lost is retried with the same position
    /// (as the service's `checkpoint` does), so a conflict with its own landed write can be recognised.
    attempt: Option<usize>,
}

/// A message id's last stored copy: when, from which reader, from the wire of which partition.
#[derive(Clone, Copy)]
struct Stored {
    at: Instant,
    reader: u64,
    wire: Option<usize>,
}

/// What a store operation answered, for the reader that asked.
enum Answer {
    Loaded(u64, Result<Option<Versioned>, StoreError>),
    Written(u64, usize, Result<Revision, StoreError>),
    /// The key read again after a conflict (`ShardCheckpoint::advance`).
    Reread(u64, usize, Result<Option<Versioned>, StoreError>),
}

/// What the simulation must do for the model.
pub enum Action {
    /// The reader's checkpoint was moved by another writer: it stopped, release the lease.
    Release(usize, ShardKey),
}

#[derive(Default, Debug, Clone)]
pub struct ModelStats {
    pub records: u64,
    pub stored: u64,
    pub duplicates_dropped: u64,
    pub fences: u64,
    pub partitions: u64,
    pub checkpoints: u64,
    pub checkpoint_conflicts: u64,
    /// Conflicts with the reader's own write whose answer was lost: re-read and adopted.
    pub own_writes_adopted: u64,
    pub checkpoints_deleted: u64,
    /// Residual (b): publishes on the wire at a partition's start, delivered at its heal.
    pub late_from_wire: u64,
    /// Of those, stored a second time (partition longer than the window plus the margin).
    pub late_stored_twice: u64,
    /// Re-publishes of a new tenure stored twice because the takeover outlasted half the window.
    pub late_takeover_stored_twice: u64,
}

pub struct Model {
    rng: StdRng,
    pub window: Duration,
    /// The smallest guard safety margin in the fleet, less one step (the model fences at step
    /// granularity): a publish on the wire is stored twice only after a partition longer than
    /// `window + margin` (DESIGN.md, "Fencing publishes").
    margin: Duration,
    logs: BTreeMap<ShardKey, Log>,
    /// Shards that receive writes (not ended, writes not stopped).
    writing: bool,
    clients: Vec<Client>,
    readers: Vec<Reader>,
    next_reader: u64,
    next_partition: usize,
    inbox: Arc<Mutex<Vec<Answer>>>,
    /// Stream state: when each message id was last stored, and each item's latest version stored.
    stored_at: BTreeMap<(ShardKey, usize), Stored>,
    latest: BTreeMap<(ShardKey, usize), u64>,
    /// Items delivered from the wire per partition (at most one each).
    wire_items: BTreeMap<usize, BTreeSet<(ShardKey, usize)>>,
    partition_lengths: BTreeMap<usize, Duration>,
    /// Guards whose reader stopped on a checkpoint conflict and awaits its release: no new reader.
    stopped: Vec<(usize, ShardKey, LeaseGuard)>,
    pub stats: ModelStats,
    violations: Vec<String>,
}

impl Model {
    pub fn new(seed: u64, window: Duration, margin: Duration) -> Model {
        Model {
            rng: StdRng::seed_from_u64(seed),
            window,
            margin,
            logs: BTreeMap::new(),
            writing: true,
            clients: Vec::new(),
            readers: Vec::new(),
            next_reader: 0,
            next_partition: 0,
            inbox: Arc::default(),
            stored_at: BTreeMap::new(),
            latest: BTreeMap::new(),
            wire_items: BTreeMap::new(),
            partition_lengths: BTreeMap::new(),
            stopped: Vec::new(),
            stats: ModelStats::default(),
            violations: Vec::new(),
        }
    }

    pub fn add_shard(&mut self, shard: &ShardKey, table: &str, shard_id: &str) {
        let checkpoint_key = format!("{table}.{shard_id}");
        self.logs.entry(shard.clone()).or_insert(Log { checkpoint_key, records: Vec::new(), versions: [0; ITEMS] });
    }

    /// The shard ended: its readers stop and its finished checkpoint is cleaned up (deleted at its
    /// revision, as discovery's clean-up does).
    pub fn end_shard(&mut self, shard: &ShardKey, store: &MemoryStore) {
        let Some(log) = self.logs.remove(shard) else { return };
        self.readers.retain(|reader| reader.shard != *shard);
        let inbox = Arc::clone(&self.inbox);
        let store = store.clone();
        tokio::spawn(async move {
            if let Ok(Some(current)) = store.get(&log.checkpoint_key).await
                && store.delete(&log.checkpoint_key, current.revision).await.is_ok()
            {
                inbox.lock().unwrap().push(Answer::Written(u64::MAX, 0, Ok(current.revision)));
            }
        });
    }

    pub fn stop_writes(&mut self) {
        self.writing = false;
    }

    pub fn add_replica(&mut self, store: MemoryStore) {
        self.clients.push(Client {
            store,
            alive: true,
            generation: 0,
            connected: true,
            queue: VecDeque::new(),
            acks: Vec::new(),
            partition: None,
        });
    }

    /// The process dies: what it wrote to the network still arrives, nothing else.
    pub fn crash(&mut self, replica: usize) {
        self.readers.retain(|reader| reader.replica != replica);
        let client = &mut self.clients[replica];
        client.alive = false;
        client.generation += 1;
        client.queue.retain(|entry| entry.written);
        client.acks.clear();
    }

    pub fn partitioned(&self, replica: usize) -> bool {
        self.clients[replica].partition.is_some()
    }

    /// Cuts replica `replica` off from NATS until `until`: its publishes and acks are held, and what it
    /// already wrote is on the wire.
    pub fn partition(&mut self, replica: usize, until: Instant) {
        let now = Instant::now();
        let id = self.next_partition;
        self.next_partition += 1;
        self.stats.partitions += 1;
        self.partition_lengths.insert(id, until - now);
        let client = &mut self.clients[replica];
        for entry in client.queue.iter_mut().filter(|entry| entry.written) {
            entry.on_wire = Some(id);
        }
        client.partition = Some(Partition { id, began: now, until });
    }

    /// Ends every partition now (the end of the chaos).
    pub fn heal_all(&mut self) {
        let now = Instant::now();
        for client in &mut self.clients {
            if let Some(partition) = &mut client.partition {
                partition.until = now;
                self.partition_lengths.insert(partition.id, now - partition.began);
            }
        }
    }

    /// Drops what the client holds and has not written; acks of the old connection never arrive.
    fn fence(&mut self, replica: usize) {
        self.stats.fences += 1;
        let client = &mut self.clients[replica];
        client.generation += 1;
        client.connected = false;
        client.queue.retain(|entry| entry.written);
        client.acks.clear();
        // Every shard of this replica retries from its first unacknowledged record.
        for reader in self.readers.iter_mut().filter(|reader| reader.replica == replica) {
            reader.in_flight.clear();
            reader.next = reader.acked_upto;
        }
    }

    fn latency(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(1..=MAX_NET_MS))
    }

    /// One step: writes, the network, store answers, then every reader; `guards` are the valid guards
    /// (replica, shard, guard, handing over).
    pub fn step(&mut self, guards: Vec<(usize, ShardKey, LeaseGuard, bool)>) -> Vec<Action> {
        let now = Instant::now();
        self.write();
        self.network(now);
        let mut actions = self.answers();
        self.start_readers(&guards);
        let draining: BTreeSet<(usize, ShardKey)> =
            guards.into_iter().filter(|g| g.3).map(|(r, shard, _, _)| (r, shard)).collect();
        let mut index = 0;
        while index < self.readers.len() {
            let draining = draining.contains(&(self.readers[index].replica, self.readers[index].shard.clone()));
            match self.drive(index, now, draining) {
                Some(action) => {
                    let reader = self.readers.remove(index);
                    actions.extend(action.then_some(Action::Release(reader.replica, reader.shard)));
                }
                None => index += 1,
            }
        }
        actions
    }

    fn write(&mut self) {
        if !self.writing {
            return;
        }
        for log in self.logs.values_mut() {
            if self.rng.random_bool(WRITE_RATE) {
                let item = self.rng.random_range(0..ITEMS);
                log.versions[item] += 1;
                log.records.push(Record { item, version: log.versions[item] });
                self.stats.records += 1;
            }
        }
    }

    fn network(&mut self, now: Instant) {
        for replica in 0..self.clients.len() {
            if self.clients[replica].partition.take_if(|p| p.until <= now).is_some() {
                self.heal(replica, now);
            }
            if self.clients[replica].alive && self.clients[replica].partition.is_none() {
                self.clients[replica].connected = true;
            }
            if self.clients[replica].partition.is_some() {
                continue;
            }
            while self.clients[replica].queue.front().is_some_and(|e| e.written && e.deliver_at <= now) {
                if let Some(entry) = self.clients[replica].queue.pop_front() {
                    self.deliver(replica, entry, None, now);
                }
            }
            let (due, later): (Vec<Ack>, Vec<Ack>) =
                std::mem::take(&mut self.clients[replica].acks).into_iter().partition(|ack| ack.at <= now);
            self.clients[replica].acks = later;
            for ack in due {
                if ack.generation != self.clients[replica].generation {
                    continue;
                }
                if let Some(reader) = self.readers.iter_mut().find(|r| r.id == ack.reader) {
                    if let Some(slot) = reader.in_flight.iter_mut().find(|slot| slot.0 == ack.seq) {
                        slot.3 = true;
                    }
                    while reader.in_flight.front().is_some_and(|slot| slot.3) {
                        if let Some((seq, ..)) = reader.in_flight.pop_front() {
                            reader.acked_upto = seq + 1;
                        }
                    }
                }
            }
        }
    }

    /// The link is back: what was on the wire arrives first, then what the client held goes out.
    fn heal(&mut self, replica: usize, now: Instant) {
        let queue = std::mem::take(&mut self.clients[replica].queue);
        let mut held = VecDeque::new();
        for mut entry in queue {
            match entry.on_wire.take() {
                Some(id) => self.deliver(replica, entry, Some(id), now),
                None => held.push_back(entry),
            }
        }
        for entry in held.iter_mut() {
            entry.written = true;
            entry.deliver_at = now + self.latency();
        }
        self.clients[replica].queue = held;
    }

    /// JetStream receives a publish: stores it unless its id was stored within the window, and acks.
    fn deliver(&mut self, replica: usize, entry: Entry, from_wire: Option<usize>, now: Instant) {
        let Record { item, version } = entry.record;
        let id = (entry.shard.clone(), entry.seq);
        let seed_line = format!("record {}#{} (item {item} v{version}) from r{replica}", entry.shard, entry.seq);
        if let Some(partition) = from_wire {
            self.stats.late_from_wire += 1;
            if !self.wire_items.entry(partition).or_default().insert((entry.shard.clone(), item)) {
                self.violations.push(format!(
                    "{seed_line}: a second publish of one item on the wire at partition p{partition}'s start"
                ));
            }
        }
        let previous = self.stored_at.get(&id).copied();
        if previous.is_some_and(|first| now - first.at < self.window) {
            self.stats.duplicates_dropped += 1;
        } else {
            let excused = previous.is_some_and(|first| {
                // (b) the residual: on the wire at a partition that outlasted the window plus the
                // margin (written before the guard's deadline s + T - m, re-published at s + T at
                // the earliest, delivered at the heal).
                // A new tenure's re-publish of a record its predecessor stored is late by the partition
                // plus the time since that first copy: one of them outlasted half the window, and (a)
                // below covers the second.
                let residual = from_wire.or(first.wire);
                let republish = entry.reader != first.reader && from_wire.is_some();
                let bound = if republish { self.window / 2 } else { self.window + self.margin };
                let long = residual.is_some_and(|p| self.partition_lengths.get(&p).is_some_and(|len| *len > bound));
                // (a) a new tenure re-publishing the last one's unacknowledged or unchecked tail, whose
                // takeover (up to its read of the checkpoint) itself took more than half the window (chaos can hold a shard unowned that
                // long: every replica of its deployment stalled or partitioned); a calm takeover
                // (TTL + renew interval) must land inside the window.
                let late_takeover = entry.reader != first.reader
                    && entry.reader_started.saturating_duration_since(first.at) > self.window / 2;
                if long {
                    self.stats.late_stored_twice += 1;
                } else if late_takeover {
                    self.stats.late_takeover_stored_twice += 1;
                }
                long || late_takeover
            });
            if let Some(first) = previous.filter(|_| !excused) {
                let (this, began) = (entry.reader, entry.reader_started.saturating_duration_since(first.at));
                self.violations.push(format!(
                    "{seed_line} stored twice ({:?} after its first copy, by reader {}; this reader {this} began {began:?} after it)",
                    now - first.at,
                    first.reader
                ));
            }
            let latest = self.latest.entry((entry.shard.clone(), item)).or_insert(0);
            if version < *latest && !excused {
                self.violations.push(format!("{seed_line}: item went back from v{} to v{version}", *latest));
            }
            *latest = (*latest).max(version);
            self.stored_at.insert(id, Stored { at: now, reader: entry.reader, wire: from_wire });
            self.stats.stored += 1;
        }
        let at = now + self.latency();
        let client = &mut self.clients[replica];
        if client.alive {
            client.acks.push(Ack { at, generation: entry.generation, reader: entry.reader, seq: entry.seq });
        }
    }

    fn answers(&mut self) -> Vec<Action> {
        let answers = std::mem::take(&mut *self.inbox.lock().unwrap());
        let mut actions = Vec::new();
        for answer in answers {
            match answer {
                Answer::Loaded(id, result) => {
                    let Some(reader) = self.readers.iter_mut().find(|r| r.id == id) else { continue };
                    match result {
                        Ok(found) => {
                            let position = found.as_ref().map_or(0, |v| parse(&v.value));
                            reader.revision = found.map(|v| v.revision);
                            reader.checkpoint = position;
                            reader.acked_upto = position;
                            reader.next = position;
                            reader.phase = Phase::Reading;
                            reader.started = Instant::now();
                        }
                        Err(_) => reader.phase = Phase::Loading { asked: false },
                    }
                }
                Answer::Written(u64::MAX, ..) => self.stats.checkpoints_deleted += 1,
                Answer::Written(id, position, result) => {
                    let Some(index) = self.readers.iter().position(|r| r.id == id) else { continue };
                    let reader = &mut self.readers[index];
                    reader.writing = false;
                    match result {
                        Ok(revision) => {
                            self.stats.checkpoints += 1;
                            reader.revision = Some(revision);
                            reader.checkpoint = position;
                            reader.attempt = None;
                        }
                        // Our own write whose answer was lost, or another writer's: read the key again.
                        Err(StoreError::Conflict { .. }) => {
                            reader.writing = true;
                            let key = self.logs.get(&reader.shard).map(|log| log.checkpoint_key.clone());
                            let (store, inbox) = (self.clients[reader.replica].store.clone(), Arc::clone(&self.inbox));
                            if let Some(key) = key {
                                tokio::spawn(async move {
                                    let result = store.get(&key).await;
                                    inbox.lock().unwrap().push(Answer::Reread(id, position, result));
                                });
                            }
                        }
                        // Maybe written: retried with the same position.
                        Err(_) => {}
                    }
                }
                Answer::Reread(id, position, result) => {
                    let Some(index) = self.readers.iter().position(|r| r.id == id) else { continue };
                    let reader = &mut self.readers[index];
                    reader.writing = false;
                    match result {
                        // It holds what this reader wrote: adopt its revision.
                        Ok(Some(current)) if parse(&current.value) == position => {
                            self.stats.own_writes_adopted += 1;
                            reader.revision = Some(current.revision);
                            reader.checkpoint = position;
                            reader.attempt = None;
                        }
                        // Another writer moved it: this reader stops and releases (the service's `Fenced`).
                        Ok(_) => {
                            self.stats.checkpoint_conflicts += 1;
                            let reader = self.readers.remove(index);
                            if !reader.in_flight.is_empty() {
                                self.fence(reader.replica);
                            }
                            actions.push(Action::Release(reader.replica, reader.shard.clone()));
                            self.stopped.push((reader.replica, reader.shard, reader.guard));
                        }
                        // Unanswered: the write is retried, conflicts again and re-reads again.
                        Err(_) => {}
                    }
                }
            }
        }
        actions
    }

    fn start_readers(&mut self, guards: &[(usize, ShardKey, LeaseGuard, bool)]) {
        for (replica, shard, guard, _) in guards {
            if !self.logs.contains_key(shard) || !self.clients[*replica].alive {
                continue;
            }
            // One reader per guard: a replica holds at most one valid guard per shard.
            let same = |r: &usize, s: &ShardKey, g: &LeaseGuard| r == replica && s == shard && g.is_valid();
            self.stopped.retain(|(_, _, guard)| guard.is_valid());
            if self.readers.iter().any(|r| same(&r.replica, &r.shard, &r.guard))
                || self.stopped.iter().any(|(r, s, g)| same(r, s, g))
            {
                continue;
            }
            self.next_reader += 1;
            self.readers.push(Reader {
                id: self.next_reader,
                started: Instant::now(),
                replica: *replica,
                shard: shard.clone(),
                guard: guard.clone(),
                phase: Phase::Loading { asked: false },
                next: 0,
                in_flight: VecDeque::new(),
                acked_upto: 0,
                checkpoint: 0,
                revision: None,
                writing: false,
                attempt: None,
            });
        }
    }

    /// Drives reader `index`; `Some(release)` when it stops.
    fn drive(&mut self, index: usize, now: Instant, draining: bool) -> Option<bool> {
        let replica = self.readers[index].replica;
        if self.readers[index].guard.check().is_err() {
            // The service's shard task wakes from `guard.lost()` and fences what it left unacknowledged.
            if !self.readers[index].in_flight.is_empty() {
                self.fence(replica);
            }
            return Some(false);
        }
        let key = self.logs.get(&self.readers[index].shard)?.checkpoint_key.clone();
        let store = self.clients[replica].store.clone();
        let inbox = Arc::clone(&self.inbox);
        let reader = &mut self.readers[index];
        if let Phase::Loading { asked } = &mut reader.phase {
            if !*asked {
                *asked = true;
                let id = reader.id;
                tokio::spawn(async move {
                    let result = store.get(&key).await;
                    inbox.lock().unwrap().push(Answer::Loaded(id, result));
                });
            }
            return None;
        }
        if reader.in_flight.front().is_some_and(|slot| !slot.3 && now - slot.2 >= PUBLISH_TIMEOUT) {
            self.fence(replica);
        }
        let client_connected = self.clients[replica].connected;
        let reader = &mut self.readers[index];
        let records = &self.logs[&reader.shard].records;
        let mut handed = Vec::new();
        while client_connected && !draining && reader.in_flight.len() < WINDOW && reader.next < records.len() {
            let record = records[reader.next];
            if reader.in_flight.iter().any(|slot| slot.1 == record.item) || reader.guard.check().is_err() {
                break;
            }
            reader.in_flight.push_back((reader.next, record.item, now, false));
            handed.push((reader.next, record));
            reader.next += 1;
        }
        let (id, shard, reader_started) = (reader.id, reader.shard.clone(), reader.started);
        for (seq, record) in handed {
            let deliver_at = now + self.latency();
            let client = &mut self.clients[replica];
            let written = client.partition.is_none();
            let generation = client.generation;
            let entry = Entry {
                shard: shard.clone(),
                seq,
                record,
                reader: id,
                reader_started,
                generation,
                written,
                deliver_at,
                on_wire: None,
            };
            client.queue.push_back(entry);
        }
        let reader = &mut self.readers[index];
        if reader.acked_upto > reader.checkpoint && !reader.writing && reader.guard.check().is_ok() {
            reader.writing = true;
            let position = *reader.attempt.get_or_insert(reader.acked_upto);
            let expected = reader.revision;
            let value = Bytes::from(position.to_string());
            tokio::spawn(async move {
                let result = match expected {
                    Some(revision) => store.update(&key, value, revision).await,
                    None => store.create(&key, value).await,
                };
                inbox.lock().unwrap().push(Answer::Written(id, position, result));
            });
        }
        None
    }

    /// Violations found since the last call.
    pub fn take_violations(&mut self) -> Vec<String> {
        std::mem::take(&mut self.violations)
    }

    /// Records of live shards not in the stream (`None` for the shards given).
    pub fn missing(&self, shards: &BTreeSet<ShardKey>) -> Vec<String> {
        shards
            .iter()
            .filter_map(|shard| {
                let log = self.logs.get(shard)?;
                let missing =
                    (0..log.records.len()).filter(|seq| !self.stored_at.contains_key(&(shard.clone(), *seq))).count();
                (missing > 0).then(|| format!("{shard}: {missing} of {} records", log.records.len()))
            })
            .collect()
    }
}

fn parse(value: &Bytes) -> usize {
    std::str::from_utf8(value).ok().and_then(|text| text.parse().ok()).unwrap_or(0)
}
