//! The values stored under lease and presence keys, and their JSON encoding.
//!
//! Owns the lease value format. Invariant kept: the `term` of a lease grows on every change of owner
//! (each acquisition writes the previous term + 1), so a term identifies one tenure of one owner.
//! Unknown fields are ignored when decoding, so a newer replica can add fields without breaking an
//! older one during a rolling upgrade.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Who holds a lease: the configured replica id (e.g. the host name) and the uuid of the process,
/// so that a restarted process with the same replica id is a different owner.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub replica: String,
    pub instance: String,
}

/// The tenure counter of a lease; grows on every change of owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Term(u64);

impl Term {
    pub const fn new(term: u64) -> Self {
        Term(term)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The term of the next tenure.
    pub const fn next(self) -> Self {
        Term(self.0.saturating_add(1))
    }
}

/// The value of `lease/shard.{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The holder; `None` once released (free to take at once).
    pub owner: Option<Owner>,
    pub term: Term,
    /// The holder's TTL in milliseconds: peers judge expiry with the longer of theirs and this.
    pub ttl_ms: u64,
    /// The holder's session (see [`PresenceValue::session`]) when it was acquired: the lease lives as
    /// long as that session does. Absent in leases of replicas that renew each lease (the previous
    /// version), which live as long as their own revision keeps changing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
}

/// The value of `lease/replica.{instance}`: a live replica heartbeats it every renew interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceValue {
    pub owner: Owner,
    pub ttl_ms: u64,
    /// The replica's cap on leases, if any, so peers do not assign it more.
    pub max_leases: Option<usize>,
    /// Heartbeat counter (the revision changes anyway; this makes each write visibly new).
    pub beat: u64,
    /// The replica's group (see `Config::group`); absent in values written before groups existed,
    /// which read as the empty group.
    #[serde(default)]
    pub group: String,
    /// The replica's session number: present when this key is the replica's session (its renewal keeps
    /// every lease of this session alive, and deleting it ends them all); absent in values of the
    /// previous version, whose replicas renew each lease and judge every lease by its own revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs cannot fail (no maps with non-string keys, no custom impls).
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_value_round_trips_and_tolerates_new_fields() {
        let value = LeaseValue {
            owner: Some(Owner { replica: "r1".into(), instance: "u1".into() }),
            term: Term::new(3),
            ttl_ms: 10_000,
            session: Some(2),
        };
        assert_eq!(decode::<LeaseValue>(&encode(&value)), Some(value.clone()));
        let previous = br#"{"owner":null,"term":4,"ttl_ms":10000}"#;
        assert_eq!(decode::<LeaseValue>(previous).map(|lease| lease.session), Some(None));
        let without = LeaseValue { session: None, ..value.clone() };
        assert!(!String::from_utf8_lossy(&encode(&without)).contains("session"));
        let newer = br#"{"owner":null,"term":4,"ttl_ms":10000,"reason":"shutdown"}"#;
        let released: LeaseValue = decode(newer).unwrap();
        assert_eq!(released.owner, None);
        assert_eq!(released.term.next(), Term::new(5));
        assert_eq!(decode::<LeaseValue>(b"1100000000017454423009"), None);
    }

    #[test]
    fn presence_value_carries_its_group_and_an_older_one_reads_as_the_empty_group() {
        let value = PresenceValue {
            owner: Owner { replica: "r1".into(), instance: "u1".into() },
            ttl_ms: 10_000,
            max_leases: None,
            beat: 7,
            group: "0123456789abcdef".into(),
            session: Some(1),
        };
        assert_eq!(decode::<PresenceValue>(&encode(&value)), Some(value));
        let older = br#"{"owner":{"replica":"r0","instance":"u0"},"ttl_ms":10000,"max_leases":null,"beat":3}"#;
        let older: PresenceValue = decode(older).unwrap();
        assert_eq!((older.group.as_str(), older.beat, older.session), ("", 3, None));
    }
}
