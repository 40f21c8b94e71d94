//! A table's shard topology as the fleet shares it: the streams (oldest first) with their shards, the
//! shards that are finished, the first sighting for `START_FROM_LATEST`. One replica at a time refreshes it
//! from AWS ([`super::discovery`]) and writes it to the bucket as small keys ([`super::layout`]);
//! every replica reads it and derives the shards that may be read now ([`Topology::readable`]).
//!
//! Invariant (lineage): a shard is readable only when it belongs to the oldest stream still followed,
//! is not finished, and its parent is finished or has left the stream. So a child is never read
//! before its parent is read to its end, whichever replica read the parent.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::StartAt;
use super::api::ShardInfo;

/// One stream of a table and its shards, as `DescribeStream` listed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamShards {
    pub arn: String,
    pub shards: Vec<ShardInfo>,
}

/// Why the table cannot be read right now, as the discovering replica found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: String,
    pub message: String,
}

/// A table's shards as the fleet knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Oldest first; the shards of all but the first wait until the first is finished.
    #[serde(default)]
    pub streams: Vec<StreamShards>,
    /// Shards whose checkpoint says they were read to their end.
    #[serde(default)]
    pub finished: BTreeSet<String>,
    /// Shards that start at `LATEST` when they have no checkpoint: how topologies written before
    /// `since` existed kept `START_FROM_LATEST`. Read, no longer written.
    #[serde(default)]
    pub start_latest: BTreeSet<String>,
    /// `START_FROM_LATEST`: the second (epoch) of the table's first sighting. Shards without a
    /// checkpoint are read from `TRIM_HORIZON` and their records created before that second are
    /// skipped (checkpointed, not published), so everything from the first sighting on is published
    /// once, whoever reads the shard and whenever (see [`Readable::skip_before`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Set while the table cannot be read (missing, no stream, `KEYS_ONLY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// A shard that may be read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readable {
    pub table: String,
    pub stream_arn: String,
    pub shard_id: String,
    /// Where to start when the shard has no checkpoint.
    pub fresh_start: StartAt,
    /// `DescribeStream` listed it closed (it has an ending sequence number).
    pub closed: bool,
    /// Records created before this second (epoch) are skipped when the shard is read without a
    /// checkpoint (`START_FROM_LATEST`; the topology's `since`).
    pub skip_before: Option<u64>,
}

impl Readable {
    /// The shard's lease identity: unique across tables (shard ids repeat across tables on moto).
    pub fn lease_key(&self) -> coordination::ShardKey {
        coordination::ShardKey::for_shard(&self.table, &self.shard_id)
    }
}

/// Shards by state, for the `shards_known` metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub readable: i64,
    pub waiting_for_parent: i64,
    pub finished: i64,
}

impl Topology {
    /// Every listed shard id.
    pub fn present(&self) -> HashSet<&str> {
        self.streams.iter().flat_map(|s| &s.shards).map(|s| s.shard_id.as_str()).collect()
    }

    /// The shards of `table` that may be read now (see the module's lineage invariant).
    pub fn readable(&self, table: &str) -> Vec<Readable> {
        self.classify().0.into_iter().map(|(arn, shard)| self.readable_shard(table, arn, shard)).collect()
    }

    /// Shards by state.
    pub fn counts(&self) -> Counts {
        let (readable, waiting) = self.classify();
        let present = self.present();
        let finished = self.finished.iter().filter(|id| present.contains(id.as_str())).count();
        Counts { readable: readable.len() as i64, waiting_for_parent: waiting as i64, finished: finished as i64 }
    }

    fn readable_shard(&self, table: &str, arn: &str, shard: &ShardInfo) -> Readable {
        let fresh_start =
            if self.start_latest.contains(&shard.shard_id) { StartAt::Latest } else { StartAt::TrimHorizon };
        Readable {
            table: table.to_owned(),
            stream_arn: arn.to_owned(),
            shard_id: shard.shard_id.clone(),
            fresh_start,
            closed: shard.closed,
            skip_before: self.since,
        }
    }

    /// The readable shards with their stream, and how many unfinished shards wait.
    fn classify(&self) -> (Vec<(&str, &ShardInfo)>, usize) {
        let present = self.present();
        let mut readable = Vec::new();
        let mut waiting = 0;
        for (index, stream) in self.streams.iter().enumerate() {
            for shard in &stream.shards {
                if self.finished.contains(&shard.shard_id) {
                    continue;
                }
                let parent_done = shard
                    .parent_shard_id
                    .as_ref()
                    .is_none_or(|parent| self.finished.contains(parent) || !present.contains(parent.as_str()));
                if index == 0 && parent_done {
                    readable.push((stream.arn.as_str(), shard));
                } else {
                    waiting += 1;
                }
            }
        }
        (readable, waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>, closed: bool) -> ShardInfo {
        ShardInfo { shard_id: id.into(), parent_shard_id: parent.map(str::to_owned), closed }
    }

    fn ids(topology: &Topology) -> Vec<String> {
        topology.readable("t").into_iter().map(|r| r.shard_id).collect()
    }

    #[test]
    fn children_wait_for_their_parent_and_new_streams_for_the_old() {
        let mut topology = Topology {
            streams: vec![StreamShards {
                arn: "a1".into(),
                shards: vec![shard("p", None, true), shard("c1", Some("p"), false), shard("c2", Some("p"), false)],
            }],
            ..Topology::default()
        };
        assert_eq!(ids(&topology), ["p"]);
        assert_eq!(topology.counts(), Counts { readable: 1, waiting_for_parent: 2, finished: 0 });
        topology.finished.insert("p".into());
        assert_eq!(ids(&topology), ["c1", "c2"]);

        // A parent that left the stream (trimmed after 24 h) does not block its child.
        topology.streams[0].shards.remove(0);
        assert_eq!(ids(&topology), ["c1", "c2"]);

        // A second stream waits until the first one is dropped from the list.
        topology.streams.push(StreamShards { arn: "a2".into(), shards: vec![shard("n", None, false)] });
        assert_eq!(ids(&topology), ["c1", "c2"]);
        topology.streams.remove(0);
        assert_eq!(ids(&topology), ["n"]);
    }

    #[test]
    fn start_latest_applies_only_to_the_named_shards_and_the_value_round_trips() {
        let topology = Topology {
            streams: vec![StreamShards {
                arn: "a".into(),
                shards: vec![shard("x", None, false), shard("y", None, false)],
            }],
            start_latest: BTreeSet::from(["x".to_owned()]),
            ..Topology::default()
        };
        let readable = topology.readable("t");
        assert_eq!(readable[0].fresh_start, StartAt::Latest);
        assert_eq!(readable[1].fresh_start, StartAt::TrimHorizon);
        let json = serde_json::to_vec(&topology).unwrap();
        assert_eq!(serde_json::from_slice::<Topology>(&json).unwrap(), topology);
    }
}
