//! Upkeep of what this replica holds: when its session key (and, while a replica of the previous
//! version is about, each held lease) is rewritten, what the answer to such a write or a re-read after
//! a conflict means, how far each guard's deadline may go, and which guards must be revoked.
//!
//! Owns the timing of holding; the driver performs what it says and passes `now` and the answers it
//! got. Invariants kept: a guard's deadline only ever comes from the *start* of a successful
//! compare-and-swap write (of the session key; of the lease itself, or the start of a read that found
//! no replica of the previous version) plus TTL minus the safety margin; a guard whose deadline passed
//! is revoked; a session whose key a peer deleted (the fence) ends, every guard revoked, before a new
//! one starts; and a write whose answer was lost is adopted only when a read shows that it names this
//! process (and, for a lease, its current session).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::{Holder, LeaseSeen, ReplicaSeen};
use crate::config::Config;
use crate::keys::ShardKey;
use crate::lease::{Owner, Term};
use crate::store::Revision;

/// The settings the upkeep depends on (from [`Config`]).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub ttl: Duration,
    pub renew_interval: Duration,
    pub safety_margin: Duration,
    /// Whether held leases live through the session (`Config::sessions`).
    pub sessions: bool,
}

impl From<&Config> for Timing {
    fn from(config: &Config) -> Self {
        Timing {
            ttl: config.ttl,
            renew_interval: config.renew_interval,
            safety_margin: config.safety_margin,
            sessions: config.sessions,
        }
    }
}

impl Timing {
    /// The furthest a guard may reach on the strength of a write that started at `started`: peers may
    /// judge it expired at `started + T` at the earliest, and the guard ends the margin before.
    pub fn deadline_after(&self, started: Instant) -> Instant {
        started + self.ttl - self.safety_margin
    }

    /// How long a failed renewal waits before it is tried again.
    pub fn retry_delay(&self) -> Duration {
        self.renew_interval / 4
    }
}

/// What a read of one of this process's own keys found after a write of it conflicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reread {
    /// The key names this process (a lease: in its current session) at this revision: an earlier
    /// write of ours landed though its answer was lost.
    Mine(Revision),
    /// The key is absent or names someone else.
    NotMine,
    /// The read failed.
    Failed,
}

/// This process's session (see `DESIGN.md`, "Sessions"): its presence key and how the held leases are
/// kept alive.
#[derive(Debug)]
pub struct Session {
    /// This process's session number (grows when a session ends); unused without sessions.
    pub epoch: u64,
    /// The revision of the presence key as last written or adopted; `None` before the first answered
    /// write of a session.
    pub presence: Option<Revision>,
    /// The counter written in every presence value (each write visibly new).
    pub beat: u64,
    /// `T − m` after the start of the last successful write of the session key in this session; no
    /// lease is acquired without it.
    pub deadline: Option<Instant>,
    pub next_heartbeat: Instant,
    /// Leases are renewed one by one as well: a replica of the previous version is present, or was
    /// until a read that started at `legacy_gone_at` and not every held lease was rewritten since.
    pub mixed: bool,
    pub legacy_gone_at: Option<Instant>,
}

/// The next write of the presence key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub beat: u64,
    /// The revision it is written at; `None`: created.
    pub expected: Option<Revision>,
}

/// What the driver does after a write of the presence key was answered (or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterBeat {
    /// Nothing more until the next heartbeat.
    Nothing,
    /// The session was renewed: extend every guard, then read the presence keys (the guards' second
    /// bound, see [`Session::follow_protocols`]).
    MoveGuards,
    /// The session's key is gone (a peer's fence deleted it): revoke every guard, then
    /// [`Session::end`] it.
    EndSession,
}

/// How the held leases are kept alive, when [`Session::follow_protocols`] switched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// A replica of the previous version is present: each lease is renewed as well.
    EachLease,
    /// None is left and every held lease was rewritten since: the session alone.
    SessionAlone,
}

impl Session {
    pub fn new(now: Instant) -> Self {
        Session {
            epoch: 1,
            presence: None,
            beat: 0,
            deadline: None,
            next_heartbeat: now,
            mixed: false,
            legacy_gone_at: None,
        }
    }

    /// This process's session number, `None` when it renews each lease (the previous protocol).
    pub fn number(&self, timing: &Timing) -> Option<u64> {
        timing.sessions.then_some(self.epoch)
    }

    /// Whether each held lease is rewritten every renew interval.
    pub fn renews_each_lease(&self, timing: &Timing) -> bool {
        !timing.sessions || self.mixed
    }

    pub fn heartbeat_due(&self, now: Instant) -> bool {
        now >= self.next_heartbeat
    }

    /// Whether a lease acquired now would get a valid guard.
    pub fn valid(&self, timing: &Timing, now: Instant) -> bool {
        !timing.sessions || self.deadline.is_some_and(|deadline| deadline > now)
    }

    /// The deadline a guard may have at `now`, given its lease's own bound: that bound, and the
    /// session's.
    pub fn guard_deadline(&self, timing: &Timing, lease_deadline: Instant, now: Instant) -> Instant {
        match (timing.sessions, self.deadline) {
            (false, _) => lease_deadline,
            (true, Some(session)) => lease_deadline.min(session),
            // No session write has succeeded in this session: nothing may be held.
            (true, None) => now.min(lease_deadline),
        }
    }

    /// The session number and whether its key had been written (and the write answered): taken when a
    /// read of the presence keys starts, for [`Session::fenced`].
    pub fn mark(&self) -> (u64, bool) {
        (self.epoch, self.presence.is_some())
    }

    /// Whether a read of the presence keys that started at `before` (see [`Session::mark`]) and did
    /// not show this process's key proves that a peer's fence deleted it: written and answered before
    /// the read started, absent from it.
    pub fn fenced(&self, timing: &Timing, before: (u64, bool), shows_mine: bool) -> bool {
        timing.sessions && before == (self.epoch, true) && !shows_mine
    }

    /// The next write of the presence key.
    pub fn next_beat(&mut self) -> Beat {
        self.beat += 1;
        Beat { beat: self.beat, expected: self.presence }
    }

    /// The write of the presence key that started at `started` was answered with `revision`: with
    /// sessions, the session's deadline moves, and with it the guards.
    pub fn written(&mut self, timing: &Timing, started: Instant, revision: Revision) -> AfterBeat {
        self.presence = Some(revision);
        self.next_heartbeat = started + timing.renew_interval;
        if !timing.sessions {
            return AfterBeat::Nothing;
        }
        let deadline = timing.deadline_after(started);
        self.deadline = Some(self.deadline.map_or(deadline, |at| at.max(deadline)));
        AfterBeat::MoveGuards
    }

    /// The write of the presence key failed (no answer, or an error): tried again soon.
    pub fn write_failed(&mut self, timing: &Timing, now: Instant) -> AfterBeat {
        self.next_heartbeat = now + timing.retry_delay();
        AfterBeat::Nothing
    }

    /// The write of the presence key conflicted, and a read of it found `reread`; written again at
    /// once. The session ends when the key was ours (written and answered in this session) and is
    /// gone: a peer's fence deleted it. An adopted revision does not move the deadline; only the next
    /// answered write does.
    pub fn after_conflict(&mut self, timing: &Timing, reread: Reread, now: Instant) -> AfterBeat {
        self.next_heartbeat = now;
        match reread {
            Reread::Mine(revision) => self.presence = Some(revision),
            Reread::NotMine if timing.sessions && self.presence.is_some() => return AfterBeat::EndSession,
            Reread::NotMine => self.presence = None,
            Reread::Failed => {}
        }
        AfterBeat::Nothing
    }

    /// Ends the session (every guard already revoked): a new one starts with the next write.
    pub fn end(&mut self, now: Instant) {
        self.epoch += 1;
        self.presence = None;
        self.deadline = None;
        self.next_heartbeat = now;
    }

    /// Switches between renewing the session alone and renewing each lease as well, from the presence
    /// keys of a read that started at `read_started`, and moves the leases' own bounds. Returns the
    /// switch made, if any, and whether the guards may be extended (their bounds moved).
    pub fn follow_protocols(
        &mut self,
        timing: &Timing,
        read_started: Instant,
        replicas: &BTreeMap<String, ReplicaSeen>,
        me: &Owner,
        held: &mut [&mut HeldLease],
    ) -> (Option<Switch>, bool) {
        if !timing.sessions {
            return (None, false);
        }
        let mut switch = None;
        // Expired presences count too: a previous-version replica that stalled may wake and act on
        // what it read before, until its key is deleted.
        let legacy = replicas.values().any(|seen| seen.session.is_none() && seen.owner != *me);
        if legacy {
            if !self.mixed {
                switch = Some(Switch::EachLease);
                self.mixed = true;
                for held in held.iter_mut() {
                    held.next_renew = read_started;
                }
            }
            self.legacy_gone_at = None;
        } else if self.mixed {
            // Every lease rewritten since the previous version's last replica was gone: whatever it
            // read before no longer matches any revision, so its compare-and-swap writes fail.
            let gone_at = *self.legacy_gone_at.get_or_insert(read_started);
            if held.iter().all(|held| held.last_write >= gone_at) {
                switch = Some(Switch::SessionAlone);
                self.mixed = false;
                self.legacy_gone_at = None;
            }
        }
        if self.mixed {
            return (switch, false);
        }
        // A replica of the previous version needs a TTL of an unchanged revision, first read within a
        // renew interval before its presence key shows (DESIGN.md, "Sessions"): none showed in this
        // read. `Config::validate` keeps renew interval + op timeout below TTL − margin.
        let bound = timing.deadline_after(read_started) - timing.renew_interval;
        for held in held.iter_mut() {
            held.lease_deadline = held.lease_deadline.max(bound);
        }
        (switch, true)
    }
}

/// A lease this replica holds, apart from its guard (the driver's).
#[derive(Clone, Debug)]
pub struct HeldLease {
    pub revision: Revision,
    pub term: Term,
    /// When this lease's own renewal is due (only while leases are renewed one by one).
    pub next_renew: Instant,
    /// When the last successful write of this lease started.
    pub last_write: Instant,
    /// The bound that keeps a replica of the previous version from taking it while the guard is valid:
    /// `T − m` after the last write of the lease or after the start of a read that found no such
    /// replica, whichever is later (see `DESIGN.md`, "Sessions").
    pub lease_deadline: Instant,
    pub handing_over: bool,
}

/// A held lease whose own renewal is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub shard: ShardKey,
    pub expected: Revision,
    pub term: Term,
}

/// What a conflicting renewal of a held lease comes to, once its key was read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewed {
    /// Still ours (or unknown): kept, with its next renewal set.
    Kept,
    /// The table names another owner: revoke it (`RevokeReason::Lost`).
    Lost,
}

impl HeldLease {
    /// The acquisition of a lease with `term`, started at `started`, was answered with `revision`: the
    /// lease as held and its guard's deadline, or `None` when the answer came too late to be of use
    /// (the next read finds the lease ours and decides again).
    pub fn acquired(
        timing: &Timing,
        session: &Session,
        revision: Revision,
        term: Term,
        started: Instant,
        now: Instant,
    ) -> Option<(HeldLease, Instant)> {
        let lease_deadline = timing.deadline_after(started);
        let deadline = session.guard_deadline(timing, lease_deadline, now);
        if now >= deadline {
            return None;
        }
        let held = HeldLease {
            revision,
            term,
            next_renew: started + timing.renew_interval,
            last_write: started,
            lease_deadline,
            handing_over: false,
        };
        Some((held, deadline))
    }

    /// The guard's deadline at `now`.
    pub fn guard_deadline(&self, timing: &Timing, session: &Session, now: Instant) -> Instant {
        session.guard_deadline(timing, self.lease_deadline, now)
    }

    /// Its own renewal, started at `started`, was answered with `revision`.
    pub fn renewed(&mut self, timing: &Timing, started: Instant, revision: Revision) {
        self.revision = revision;
        self.next_renew = started + timing.renew_interval;
        self.last_write = started;
        self.lease_deadline = self.lease_deadline.max(timing.deadline_after(started));
    }

    /// Its own renewal failed (no answer, or an error): tried again at `retry_at`.
    pub fn renewal_failed(&mut self, retry_at: Instant) {
        self.next_renew = retry_at;
    }
}

/// A renewal of `held` conflicted and a read of the key found `reread`: adopted and rewritten at once
/// when ours, retried at `retry_at` when the read failed, lost otherwise. `held` is `None` when the
/// lease was revoked while the renewal was out (its deadline passed, or the session ended); a lease the
/// table gives to someone else is then still reported lost, as it always was (the caller has already
/// been told once; a second `Revoked` for a shard it no longer reads is harmless).
pub fn after_renewal_conflict(
    held: Option<&mut HeldLease>,
    reread: Reread,
    now: Instant,
    retry_at: Instant,
) -> Renewed {
    match (reread, held) {
        (Reread::NotMine, _) => return Renewed::Lost,
        (Reread::Mine(revision), Some(held)) => {
            held.revision = revision;
            held.next_renew = now;
        }
        (Reread::Failed, Some(held)) => held.next_renew = retry_at,
        (_, None) => {}
    }
    Renewed::Kept
}

/// Held leases whose guard's deadline (given with each) passed at `now`: revoke them as expired.
pub fn expired<'a>(deadlines: impl IntoIterator<Item = (&'a ShardKey, Instant)>, now: Instant) -> Vec<ShardKey> {
    deadlines.into_iter().filter(|(_, deadline)| *deadline <= now).map(|(shard, _)| shard.clone()).collect()
}

/// Held leases whose own renewal is due at `now`.
pub fn renewals_due<'a>(held: impl IntoIterator<Item = (&'a ShardKey, &'a HeldLease)>, now: Instant) -> Vec<Renewal> {
    held.into_iter()
        .filter(|(_, held)| held.next_renew <= now)
        .map(|(shard, held)| Renewal { shard: shard.clone(), expected: held.revision, term: held.term })
        .collect()
}

/// When the driver next has something to do: the next read, the next heartbeat, the earliest guard
/// deadline (to revoke it), the earliest lease renewal (while each lease is renewed), and the next
/// expiry `decide` asked to wake for.
pub fn next_wake<'a>(
    timing: &Timing,
    session: &Session,
    next_poll: Instant,
    held: impl IntoIterator<Item = (Instant, &'a HeldLease)>,
    wake_at: Option<Instant>,
) -> Instant {
    let mut wake = next_poll.min(session.next_heartbeat);
    let each_lease = session.renews_each_lease(timing);
    for (deadline, held) in held {
        wake = wake.min(deadline);
        if each_lease {
            wake = wake.min(held.next_renew);
        }
    }
    wake_at.map_or(wake, |at| wake.min(at))
}

/// Reconciles the lease keys just read with the writes of this process that were answered. A held
/// lease read naming this process in `session` has its revision adopted, whichever it is (the
/// deadline stays as it was): usually an earlier write whose answer was lost that did land; from a
/// mirror behind, possibly an older write of ours, and then our next write of it conflicts and the
/// read after the conflict adopts the newest. A held lease read at an older revision naming someone
/// else or nobody, or not read at all, keeps our answered write in the view.
pub fn adopt_own_writes<'a>(
    leases: &mut BTreeMap<ShardKey, LeaseSeen>,
    held: impl IntoIterator<Item = (&'a ShardKey, &'a mut HeldLease)>,
    me: &Owner,
    ttl: Duration,
    session: Option<u64>,
    now: Instant,
) {
    for (shard, held) in held {
        match leases.get(shard) {
            Some(LeaseSeen { revision, holder: Holder::Owned { owner, session: written, .. }, .. })
                if owner == me && *written == session =>
            {
                held.revision = *revision;
            }
            // Older than our own answered write (a mirror whose watch has not delivered it yet), or
            // not there yet: stale for this key, and our write stands. A write by anyone else since
            // has a newer revision (revisions never go back), so a lease taken is still seen as taken;
            // only a delete of a lease we hold goes unseen, and that happens only once our guard is
            // invalid (a fenced session, or an expired lease for a replica of the previous version),
            // which the deadline revokes anyway.
            Some(seen) if seen.revision >= held.revision => {}
            _ => {
                let holder = Holder::Owned { owner: me.clone(), ttl, session };
                let first_seen = leases.get(shard).map_or(now, |seen| seen.first_seen);
                let seen =
                    LeaseSeen { revision: held.revision, first_seen, holder, term: held.term, orphaned_since: None };
                leases.insert(shard.clone(), seen);
            }
        }
    }
}
