//! Key layout of the lease namespace inside the checkpoint bucket.
//!
//! Owns the mapping from shards and replicas to KV keys. Invariant kept: every key this
//! crate writes contains a `/`, which no checkpoint key `{table}.{shard_id}` can contain (table names
//! are `[a-zA-Z0-9_.-]`, shard ids `shardId-…`), so leases never collide with checkpoints; and every
//! key passes the NATS KV key rules (`[-/_=.a-zA-Z0-9]+`, no leading or trailing `.`, no `..`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix of shard lease keys: `lease/shard.{shard key}`.
pub const SHARD_PREFIX: &str = "lease/shard.";
/// Prefix of replica presence keys: `lease/replica.{instance uuid}`.
pub const REPLICA_PREFIX: &str = "lease/replica.";
/// Every key this crate writes starts with one of these (both under `lease/`, whose `/` keeps them
/// apart from checkpoint keys); each ends at a `.`, so a NATS subject filter (`{prefix}>`) can select
/// it. (`lease/leader.` was reserved for elections that were never written; nothing reads it.)
pub const PREFIXES: [&str; 2] = [SHARD_PREFIX, REPLICA_PREFIX];

/// A key that is not acceptable as (part of) a NATS KV key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key {key:?}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: &'static str,
}

/// Checks the NATS KV key rules (the client's `[-/_=.a-zA-Z0-9]+`, plus the server's refusal of `..`).
pub fn check_kv_key(key: &str) -> Result<(), KeyError> {
    let fail = |reason| Err(KeyError { key: key.to_owned(), reason });
    if key.is_empty() {
        return fail("empty");
    }
    if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.')) {
        return fail("only [-/_=.a-zA-Z0-9] are allowed");
    }
    if key.starts_with('.') || key.ends_with('.') {
        return fail("must not start or end with '.'");
    }
    if key.contains("..") {
        return fail("must not contain '..'");
    }
    Ok(())
}

/// The caller's opaque identity of a shard: KV-safe text, unique per shard across tables.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ShardKey(String);

impl ShardKey {
    /// Accepts any text that is a valid NATS KV key.
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        let key = key.into();
        check_kv_key(&key)?;
        Ok(ShardKey(key))
    }

    /// The key for `shard_id` of `table`: `{table}/{shard_id}`, each part escaped so that it holds
    /// only `[-_a-zA-Z0-9=]` (every other byte becomes `=XX`). Injective, and never contains `.`.
    pub fn for_shard(table: &str, shard_id: &str) -> Self {
        ShardKey(format!("{}/{}", escape(table), escape(shard_id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ShardKey {
    type Error = KeyError;
    fn try_from(key: String) -> Result<Self, KeyError> {
        ShardKey::new(key)
    }
}

impl From<ShardKey> for String {
    fn from(key: ShardKey) -> String {
        key.0
    }
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Escapes every byte outside `[-_a-zA-Z0-9]` as `=XX` (upper-case hex); `=` itself is escaped, so
/// the mapping is injective and the result is a valid KV key fragment without `.` or `/`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

/// The lease key of a shard.
pub fn shard_lease_key(shard: &ShardKey) -> String {
    format!("{SHARD_PREFIX}{}", shard.0)
}

/// The shard of a lease key, when `key` is one.
pub fn shard_of_lease_key(key: &str) -> Option<ShardKey> {
    key.strip_prefix(SHARD_PREFIX).and_then(|rest| ShardKey::new(rest).ok())
}

/// The presence key of a process (an instance uuid is always KV-safe).
pub fn presence_key(instance: &str) -> String {
    format!("{REPLICA_PREFIX}{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_are_kv_safe_and_injective() {
        let cases = [
            ("my-table", "shardId-00000001700000000000-abcdef12"),
            ("my.table", "shardId-1"),
            (".odd..table.", "shardId-1"),
            ("a=2E", "b"),
            ("a.", "b"),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (table, shard) in cases {
            let key = ShardKey::for_shard(table, shard);
            check_kv_key(&shard_lease_key(&key)).unwrap();
            assert!(seen.insert(key.clone()), "collision for {table}/{shard}: {key}");
        }
        assert_eq!(ShardKey::for_shard("my.table", "shardId-1").as_str(), "my=2Etable/shardId-1");
    }

    #[test]
    fn lease_keys_never_look_like_checkpoint_keys() {
        // A checkpoint key is `{table}.{shard_id}` and has no '/'.
        for key in [shard_lease_key(&ShardKey::for_shard("t", "s")), presence_key("0f8c")] {
            assert!(key.contains('/'), "{key}");
        }
    }

    #[test]
    fn rejects_keys_nats_would_reject() {
        for bad in ["", "a:b", "a b", ".a", "a.", "a..b", "a*", "a>"] {
            assert!(ShardKey::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(shard_of_lease_key("lease/shard.t/s"), Some(ShardKey::new("t/s").unwrap()));
        assert_eq!(shard_of_lease_key("t.s"), None);
    }
}
