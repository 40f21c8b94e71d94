//! How a table's [`Topology`] is kept in the checkpoint bucket: many small values, none longer than
//! [`MAX_VALUE`] bytes whatever the number of shards or streams, so the original deployment's bucket
//! (1 KiB max value size) holds any table.
//!
//! | key | value |
//! |---|---|
//! | `topology/{table}/table` | the head: `{"changes":n,"since":s,"problem":{…}}` |
//! | `topology/{table}/stream.{label}` | one followed stream: `{"arn":"…","position":n}` |
//! | `topology/{table}/shard.{label}.{shard_id}` | one listed shard: `{"parent":"…","closed":true,"finished":true}` |
//!
//! (`{table}` and `{label}`, the stream ARN's last part, are escaped as lease keys are; a shard id
//! is KV-safe as it is, and escaped too when it is not.)
//!
//! Invariants:
//! - **a reader never sees a child without its parent**: a refresh writes streams before their
//!   shards and a parent before its children ([`diff`]), and a reader reads the keys in the order
//!   they were written (one pass in stream order). So a partial view is an earlier view: it may lack
//!   the newest shards, never make a child readable early;
//! - **one read per table per second in steady state**: the head's `changes` counts refreshes that
//!   changed a shard or stream key; readers read the head every second and the other keys only when
//!   `changes` moved. The head is rewritten by every refresh (its revision is the claim of the
//!   refresh protocol, `coordination/DESIGN.md`, "Discovery in the service").
//!
//! The previous layout (one value per table at `topology/{table}`, which outgrew 1 KiB within a day)
//! is read once, when a table has no head yet ([`previous_key`]), and carried over by the first
//! refresh; replicas of the previous version go on reading and writing their own key meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use coordination::Versioned;
use coordination::keys::escape;
use serde::{Deserialize, Serialize};

use super::api::ShardInfo;
use super::topology::{Problem, StreamShards, Topology};

/// The longest value this layout writes: the head with the longest problem message, a stream with
/// the longest ARN (a table name of 255 characters), a shard with the longest ids.
pub const MAX_VALUE: usize = 512;

/// A problem message is cut to this many bytes in the head (the full text is in the log).
const PROBLEM_MESSAGE_BYTES: usize = 160;

/// The key of the previous layout's single value per table.
pub fn previous_key(table: &str) -> String {
    format!("topology/{}", escape(table))
}

/// The key of a table's head.
pub fn head_key(table: &str) -> String {
    format!("topology/{}/table", escape(table))
}

/// The prefix of a table's stream keys.
pub fn stream_prefix(table: &str) -> String {
    format!("topology/{}/stream.", escape(table))
}

/// The prefix of a table's shard keys.
pub fn shard_prefix(table: &str) -> String {
    format!("topology/{}/shard.", escape(table))
}

/// A stream's label: the last part of its ARN (DynamoDB's creation timestamp), escaped.
fn label(arn: &str) -> String {
    escape(arn.rsplit('/').next().unwrap_or(arn))
}

/// A shard id as a key fragment: as it is when KV-safe (DynamoDB's always are), escaped otherwise.
fn shard_fragment(shard_id: &str) -> String {
    let safe = !shard_id.is_empty() && shard_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if safe { shard_id.to_owned() } else { escape(shard_id) }
}

/// The key of shard `shard_id` of the table's stream `arn`.
pub fn shard_key(table: &str, arn: &str, shard_id: &str) -> String {
    format!("{}{}.{}", shard_prefix(table), label(arn), shard_fragment(shard_id))
}

/// The head of a table's topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Refreshes that changed a stream or shard key: readers read those keys again when it moves.
    #[serde(default)]
    pub changes: u64,
    /// The topology's `since` (`START_FROM_LATEST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The topology's problem, its message cut to `PROBLEM_MESSAGE_BYTES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

impl Head {
    /// The head of `topology` after `changes` changing refreshes.
    pub fn of(topology: &Topology, changes: u64) -> Head {
        let problem = topology.problem.as_ref().map(|problem| Problem {
            kind: truncate(&problem.kind, 40).to_owned(),
            message: truncate(&problem.message, PROBLEM_MESSAGE_BYTES).to_owned(),
        });
        Head { changes, since: topology.since, problem }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// `text` cut to at most `bytes` bytes at a character boundary.
fn truncate(text: &str, bytes: usize) -> &str {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredStream {
    arn: String,
    /// Oldest first: the order of `Topology::streams`.
    position: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredShard {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    closed: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    finished: bool,
    /// Carried over from the previous layout's `start_latest`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    latest: bool,
}

/// A shard key's value with its `finished` mark taken off (the operator's `checkpoints rewind`: the
/// shard is read again, and its children wait for it again); `None` when the value is not a shard's
/// or is not marked finished.
pub fn unfinished(value: &[u8]) -> Option<Bytes> {
    let mut shard: StoredShard = serde_json::from_slice(value).ok()?;
    if !shard.finished {
        return None;
    }
    shard.finished = false;
    serde_json::to_vec(&shard).ok().map(Bytes::from)
}

/// One stream or shard key and its value, as a refresh writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    /// Written only once every entry of a lower wave is: a stream is in wave 0, a shard one wave
    /// after its parent (wave 1 when its parent is not listed). Entries of one wave may be written
    /// at once.
    pub wave: usize,
}

/// The stream and shard entries of `topology` (not the head), in an order a refresh may write
/// them in one by one: each stream before its shards, each shard after its parent.
pub fn entries(table: &str, topology: &Topology) -> Vec<Entry> {
    let mut out = Vec::new();
    for (position, stream) in topology.streams.iter().enumerate() {
        let value = StoredStream { arn: stream.arn.clone(), position };
        out.push(Entry {
            key: format!("{}{}", stream_prefix(table), label(&stream.arn)),
            value: encode(&value),
            wave: 0,
        });
    }
    for stream in &topology.streams {
        let mut waves: HashMap<&str, usize> = HashMap::new();
        for shard in parents_first(&stream.shards) {
            let value = StoredShard {
                parent: shard.parent_shard_id.clone(),
                closed: shard.closed,
                finished: topology.finished.contains(&shard.shard_id),
                latest: topology.start_latest.contains(&shard.shard_id),
            };
            let parent_wave =
                shard.parent_shard_id.as_deref().and_then(|parent| waves.get(parent)).copied().unwrap_or(0);
            waves.insert(&shard.shard_id, parent_wave + 1);
            let key = shard_key(table, &stream.arn, &shard.shard_id);
            out.push(Entry { key, value: encode(&value), wave: parent_wave + 1 });
        }
    }
    out
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// `shards` with every parent listed in `shards` before its children (otherwise in listed order).
fn parents_first(shards: &[ShardInfo]) -> Vec<&ShardInfo> {
    let listed: HashMap<&str, &ShardInfo> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut out = Vec::with_capacity(shards.len());
    for shard in shards {
        // Walk up to the oldest unplaced ancestor listed here, then place down the chain.
        let mut chain = vec![shard];
        while let Some(parent) = chain.last().and_then(|s| s.parent_shard_id.as_deref()).and_then(|p| listed.get(p)) {
            if placed.contains(parent.shard_id.as_str()) || chain.iter().any(|s| s.shard_id == parent.shard_id) {
                break;
            }
            chain.push(parent);
        }
        for shard in chain.into_iter().rev() {
            if placed.insert(shard.shard_id.as_str()) {
                out.push(shard);
            }
        }
    }
    out
}

/// The stored stream and shard entries of a table, by key.
pub type Stored = BTreeMap<String, Versioned>;

/// The writes that turn the `current` entries into `next`'s: entries to write, in the order of
/// [`entries`], then keys to delete, shards before streams.
pub fn diff(current: &Stored, next: &[Entry]) -> (Vec<Entry>, Vec<String>) {
    let writes: Vec<Entry> = next
        .iter()
        .filter(|entry| current.get(&entry.key).is_none_or(|stored| stored.value != entry.value))
        .cloned()
        .collect();
    let kept: BTreeSet<&str> = next.iter().map(|entry| entry.key.as_str()).collect();
    let mut deletes: Vec<String> = current.keys().filter(|key| !kept.contains(key.as_str())).cloned().collect();
    // `shard.` sorts after `stream.`: shards first.
    deletes.sort_by(|a, b| b.contains("/shard.").cmp(&a.contains("/shard.")).then(a.cmp(b)));
    (writes, deletes)
}

/// Why stored entries could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("unreadable topology value at {key}: {reason}")]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

/// The topology stored as `head` and `entries` (key → value) for `table`. A shard whose stream has
/// no entry (not written yet) is left out.
pub fn assemble(table: &str, head: &Head, entries: &Stored) -> Result<Topology, Unreadable> {
    let unreadable = |key: &str, err: serde_json::Error| Unreadable { key: key.to_owned(), reason: err.to_string() };
    let (stream_prefix, shard_prefix) = (stream_prefix(table), shard_prefix(table));
    let mut streams: Vec<(usize, String, StreamShards)> = Vec::new();
    for (key, Versioned { value, .. }) in entries {
        if let Some(label) = key.strip_prefix(&stream_prefix) {
            let stream: StoredStream = serde_json::from_slice(value).map_err(|err| unreadable(key, err))?;
            streams.push((stream.position, label.to_owned(), StreamShards { arn: stream.arn, shards: Vec::new() }));
        }
    }
    streams.sort_by_key(|(position, _, _)| *position);
    let mut topology = Topology { since: head.since, problem: head.problem.clone(), ..Topology::default() };
    for (key, Versioned { value, .. }) in entries {
        let Some(rest) = key.strip_prefix(&shard_prefix) else { continue };
        let Some((label, fragment)) = rest.split_once('.') else { continue };
        let Some((_, _, stream)) = streams.iter_mut().find(|(_, l, _)| l == label) else { continue };
        let shard: StoredShard = serde_json::from_slice(value).map_err(|err| unreadable(key, err))?;
        let shard_id = unescape(fragment);
        if shard.finished {
            topology.finished.insert(shard_id.clone());
        }
        if shard.latest {
            topology.start_latest.insert(shard_id.clone());
        }
        stream.shards.push(ShardInfo { shard_id, parent_shard_id: shard.parent, closed: shard.closed });
    }
    topology.streams = streams.into_iter().map(|(_, _, stream)| stream).collect();
    Ok(topology)
}

/// The inverse of [`escape`] (and the identity on text without `=`).
fn unescape(fragment: &str) -> String {
    let bytes = fragment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match (bytes[i], hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'=', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shard(id: &str, parent: Option<&str>, closed: bool) -> ShardInfo {
        ShardInfo { shard_id: id.into(), parent_shard_id: parent.map(str::to_owned), closed }
    }

    fn stored(table: &str, topology: &Topology) -> Stored {
        let revision = coordination::Revision::new(1);
        entries(table, topology)
            .into_iter()
            .map(|entry| (entry.key, Versioned { value: entry.value, revision }))
            .collect()
    }

    #[test]
    fn a_topology_round_trips_through_its_entries() {
        let topology = Topology {
            streams: vec![
                StreamShards {
                    arn: "arn:aws:dynamodb:us-east-1:1:table/t/stream/2026-01-01T00:00:00.000".into(),
                    shards: vec![shard("shardId-c", Some("shardId-p"), false), shard("shardId-p", None, true)],
                },
                StreamShards {
                    arn: "arn:aws:dynamodb:us-east-1:1:table/t/stream/2026-02-01T00:00:00.000".into(),
                    shards: vec![shard("shardId-n", None, false)],
                },
            ],
            finished: BTreeSet::from(["shardId-p".to_owned()]),
            start_latest: BTreeSet::from(["shardId-n".to_owned()]),
            since: Some(1_700_000_000),
            problem: None,
        };
        let head = Head::of(&topology, 3);
        let back = assemble("my.table", &head, &stored("my.table", &topology)).unwrap();
        let ids = |topology: &Topology| -> BTreeSet<String> {
            topology.readable("t").into_iter().map(|r| r.shard_id).collect()
        };
        assert_eq!(ids(&back), ids(&topology));
        assert_eq!(back.counts(), topology.counts());
        assert_eq!(
            (back.finished, back.start_latest, back.since),
            (topology.finished, topology.start_latest, topology.since)
        );
        assert!(head_key("my.table").starts_with("topology/my=2Etable/"));
        assert_ne!(head_key("t"), previous_key("t"));
    }

    #[test]
    fn a_shard_whose_stream_is_not_written_yet_is_left_out() {
        let topology = Topology {
            streams: vec![StreamShards { arn: "a/stream/1".into(), shards: vec![shard("shardId-1", None, false)] }],
            ..Topology::default()
        };
        let mut entries = stored("t", &topology);
        entries.retain(|key, _| key.contains("/shard."));
        assert!(assemble("t", &Head::default(), &entries).unwrap().streams.is_empty());
    }

    #[test]
    fn the_diff_writes_only_what_changed_and_deletes_shards_before_streams() {
        let old = Topology {
            streams: vec![StreamShards { arn: "a/stream/1".into(), shards: vec![shard("shardId-p", None, false)] }],
            ..Topology::default()
        };
        let mut new = old.clone();
        new.streams[0].shards[0].closed = true;
        new.streams[0].shards.push(shard("shardId-c", Some("shardId-p"), false));
        let (writes, deletes) = diff(&stored("t", &old), &entries("t", &new));
        let keys: Vec<&str> = writes.iter().map(|entry| entry.key.as_str()).collect();
        assert_eq!(keys, ["topology/t/shard.1.shardId-p", "topology/t/shard.1.shardId-c"]);
        assert!(deletes.is_empty());
        let (writes, deletes) = diff(&stored("t", &new), &entries("t", &Topology::default()));
        assert!(writes.is_empty());
        assert_eq!(deletes, ["topology/t/shard.1.shardId-c", "topology/t/shard.1.shardId-p", "topology/t/stream.1"]);
    }

    fn long_id() -> impl Strategy<Value = String> {
        // DynamoDB's shard ids are at most 65 characters; anything KV-unsafe is escaped (×3).
        "[a-zA-Z0-9_.:-]{1,65}"
    }

    proptest! {
        /// Whatever the names and however many shards, streams or parents: every value fits
        /// [`MAX_VALUE`], every key is a valid KV key, and parents are written before children.
        #[test]
        fn every_value_fits_and_parents_come_first(
            table in "[a-zA-Z0-9_.-]{3,255}",
            labels in proptest::collection::vec("[0-9TZ:.-]{1,40}", 1..4),
            ids in proptest::collection::btree_set(long_id(), 1..40),
            parents in proptest::collection::vec(proptest::option::of(0usize..40), 1..40),
            message in "\\PC{0,600}",
        ) {
            let ids: Vec<String> = ids.into_iter().collect();
            let arn = |label: &str| format!("arn:aws-us-gov:dynamodb:ap-southeast-3:123456789012:table/{table}/stream/{label}");
            let streams: Vec<StreamShards> = labels.iter().map(|label| StreamShards {
                arn: arn(label),
                // Parents are older (earlier in `ids`), listed in any order: here, children first.
                shards: ids.iter().enumerate().rev().map(|(i, id)| {
                    let parent = parents.get(i).copied().flatten().filter(|_| i > 0).map(|p| ids[p % i].clone());
                    ShardInfo { shard_id: id.clone(), parent_shard_id: parent, closed: i % 2 == 0 }
                }).collect(),
            }).collect();
            let topology = Topology {
                streams,
                finished: ids.iter().cloned().collect(),
                start_latest: ids.iter().cloned().collect(),
                since: Some(u64::MAX),
                problem: Some(Problem { kind: "stream_disabled".into(), message }),
            };
            let written = entries(&table, &topology);
            let head = Head::of(&topology, u64::MAX).encode();
            prop_assert!(head.len() <= MAX_VALUE, "head of {} bytes", head.len());
            for Entry { key, value, .. } in &written {
                prop_assert!(value.len() <= MAX_VALUE, "{key}: {} bytes", value.len());
                prop_assert!(coordination::keys::check_kv_key(key).is_ok(), "{key}");
            }
            // Parents come first, one wave earlier at least.
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for Entry { key, value, wave } in written.iter().filter(|entry| entry.key.contains("/shard.")) {
                let shard: StoredShard = serde_json::from_slice(value).unwrap();
                let (stream_part, _) = key.rsplit_once('.').unwrap_or_default();
                if let Some(parent) = shard.parent.filter(|p| ids.contains(p)) {
                    let parent_key = format!("{stream_part}.{}", shard_fragment(&parent));
                    let parent_wave = seen.get(parent_key.as_str());
                    prop_assert!(parent_wave.is_some_and(|w| w < wave), "{key} (wave {wave}) before its parent");
                }
                seen.insert(key, *wave);
            }
        }
    }

    #[test]
    fn a_rewound_shard_loses_its_finished_mark_and_keeps_the_rest() {
        let finished = br#"{"parent":"shardId-p","closed":true,"finished":true}"#;
        let value = unfinished(finished).expect("marked finished");
        assert_eq!(&value[..], br#"{"parent":"shardId-p","closed":true}"#);
        assert_eq!(unfinished(&value), None, "not finished any more");
        assert_eq!(unfinished(b"not json"), None);
    }
}
