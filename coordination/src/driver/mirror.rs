//! The lease keys mirrored from a watch, and the watch that brings the next read forward.
//!
//! Owns what the driver knows of the store between full reads. Invariant kept: both are hints. A
//! mirror behind the store makes a decision stale, and every write a decision implies is a
//! compare-and-swap, so a stale decision fails; a change older than what the full read found for its
//! key is skipped, so the mirror never goes back. A lost watch only means reads come at the poll
//! interval until the next one starts.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::keys;
use crate::lease::{self, LeaseValue};
use crate::store::{Change, Versioned};

/// The keys read first in each read of the table; the presence keys are read after them (see
/// `Driver::read`).
pub(super) const LEASE_PREFIXES: [&str; 1] = [keys::SHARD_PREFIX];

/// How long a mirror of the lease keys is trusted before it is rebuilt from a full read, whatever
/// its watch says (insurance against a watch that misses a write without ending).
pub(super) const MIRROR_RESYNC: Duration = Duration::from_secs(300);

/// The lease keys as a full read found them, kept current by a watch started just before that read:
/// reading the table then costs what changed since, not the number of shards (with 10,000 leases, a
/// full read every `T/6` on each of 3 replicas outran the store). A hint like every watch: a write it
/// has not delivered yet makes a decision stale, and a stale decision's compare-and-swap fails.
pub(super) struct Mirror {
    pub(super) changes: mpsc::UnboundedReceiver<Change>,
    pub(super) entries: BTreeMap<String, Versioned>,
    pub(super) built: Instant,
}

impl Mirror {
    /// Applies what the watch delivered so far; `false` once the watch ended (the mirror is stale).
    pub(super) fn catch_up(&mut self) -> bool {
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
pub(super) fn forward(mut changes: BoxStream<'static, Change>) -> mpsc::UnboundedReceiver<Change> {
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
pub(super) fn watch_freed(mut changes: BoxStream<'static, Change>) -> mpsc::Receiver<()> {
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
pub(super) async fn next_freed(freed: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match freed {
        Some(freed) => freed.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::store::Revision;

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
