//! Shard discovery for one table: from the previous [`Topology`] and AWS to the next one.
//!
//! `DescribeTable` names the table's stream and `DescribeStream` (paged) its shards. When the stream
//! ARN changes (stream disabled and re-enabled), the new stream is appended and the old stream is
//! followed until all its shards are finished (or it is gone). Finished shards are learnt from their
//! checkpoints, whichever replica wrote them; finished checkpoints of shards that left the stream are
//! deleted, so the bucket does not grow without bound.
//!
//! Invariant: the streams followed are listed once each, oldest first. `DescribeTable` is eventually
//! consistent and may name an older stream for a while after a re-enable; such a stale answer leaves
//! the list as it is (`place`). An older stream appended after a newer one would be followed again,
//! and once AWS deleted it, every refresh that found it last in the list would fail.
//!
//! A table that cannot be read (missing, no stream, `KEYS_ONLY`) is logged and counted here and marked
//! in the topology; a failed AWS or NATS call leaves the previous topology as it was, for the next try.

use std::collections::{BTreeSet, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use super::api::{StreamsApi, TableError};
use super::error::ReadError;
use super::topology::{Problem, StreamShards, Topology};
use crate::checkpoint::{self, CheckpointError, Checkpoints, Position};
use crate::metrics::Metrics;

/// What discovery reads from and counts with.
pub struct Discovery {
    pub api: StreamsApi,
    pub checkpoints: Checkpoints,
    pub metrics: Arc<Metrics>,
    /// `START_FROM_LATEST`: a table seen for the first time starts at the stream's end.
    pub start_from_latest: bool,
}

/// Why a refresh produced nothing to write.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("DynamoDB: {0}")]
    Aws(ReadError),
    #[error(transparent)]
    Checkpoints(#[from] CheckpointError),
}

/// Discovers `table`'s shards, starting from what the fleet knew (`None`: never seen).
pub async fn refresh(
    discovery: &Discovery,
    table: &str,
    previous: Option<&Topology>,
) -> Result<Topology, RefreshError> {
    let metrics = &discovery.metrics;
    let mut next = previous.cloned().unwrap_or_default();
    let stream = match discovery.api.table_stream(table).await {
        Ok(stream) => stream,
        Err(TableError::Call(err)) => {
            metrics.table_errors.with_label_values(&[table, err.kind().as_str()]).inc();
            return Err(RefreshError::Aws(err));
        }
        Err(problem) => {
            metrics.table_errors.with_label_values(&[table, problem.kind()]).inc();
            tracing::error!(table, error = %problem, "table cannot be read; retrying at the next refresh");
            // Shards of a stream that was disabled stay readable until they are finished.
            next.problem = Some(Problem { kind: problem.kind().to_owned(), message: problem.to_string() });
            return Ok(next);
        }
    };
    next.problem = None;
    if keep_in_order(&mut next.streams) {
        tracing::warn!(table, "the topology listed a stream twice or an older stream after a newer one; repaired");
    }
    match place(&next.streams, &stream.stream_arn) {
        Place::Newest => {}
        Place::Append => {
            if !next.streams.is_empty() {
                tracing::warn!(table, new_stream = %stream.stream_arn, "stream ARN changed; the old stream's shards are finished first");
            }
            next.streams.push(StreamShards { arn: stream.stream_arn.clone(), shards: Vec::new() });
        }
        Place::Stale => {
            let newest = next.streams.last().map(|s| s.arn.as_str()).unwrap_or_default();
            tracing::info!(
                table,
                stream = %stream.stream_arn,
                newest_stream = %newest,
                "DescribeTable named an older stream than the newest followed (a stale answer); streams followed kept"
            );
        }
    }

    let mut listed = Vec::with_capacity(next.streams.len());
    for (index, known) in next.streams.iter().enumerate() {
        match discovery.api.shards(&known.arn).await {
            Ok(shards) => listed.push(StreamShards { arn: known.arn.clone(), shards }),
            Err(ReadError::NotFound(_)) if index + 1 < next.streams.len() => {
                tracing::warn!(table, stream = %known.arn, "old stream is gone; following the newer one");
            }
            Err(err) => {
                metrics.get_records_errors.with_label_values(&[table, err.kind().as_str()]).inc();
                return Err(RefreshError::Aws(err));
            }
        }
    }
    next.streams = listed;

    learn_finished(discovery, table, &mut next).await?;
    // An old stream whose shards are all finished is done with.
    while next.streams.len() > 1
        && next.streams[0].shards.iter().all(|s| s.closed && next.finished.contains(&s.shard_id))
    {
        tracing::info!(table, stream = %next.streams[0].arn, "old stream finished");
        next.streams.remove(0);
    }
    if previous.is_none() && discovery.start_from_latest {
        start_at_latest(discovery, table, &mut next).await?;
    }
    clean_up(discovery, table, &mut next).await;
    Ok(next)
}

/// Where a stream `DescribeTable` names goes in the list of streams followed (oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// It is the newest stream followed: nothing changes.
    Newest,
    /// It is newer than every stream followed (the stream was re-enabled, or the list is empty).
    Append,
    /// It is followed already, or older than the newest followed: a stale answer.
    Stale,
}

/// Places `arn` against `streams` (see [`Place`]). A stream that is not listed is older than the newest
/// listed when its label is: the label is the stream's creation time in ISO 8601, unique per table,
/// which sorts as text in time order. An ARN without a label is taken as new, as before.
fn place(streams: &[StreamShards], arn: &str) -> Place {
    let Some(newest) = streams.last() else { return Place::Append };
    if newest.arn == arn {
        return Place::Newest;
    }
    if streams.iter().any(|s| s.arn == arn) {
        return Place::Stale;
    }
    match (stream_label(arn), stream_label(&newest.arn)) {
        (Some(label), Some(newest)) if label < newest => Place::Stale,
        _ => Place::Append,
    }
}

/// The label of a stream ARN, `arn:aws:dynamodb:{region}:{account}:table/{table}/stream/{label}` (table
/// names cannot hold a `/`).
fn stream_label(arn: &str) -> Option<&str> {
    arn.rsplit_once("/stream/").map(|(_, label)| label).filter(|label| !label.is_empty())
}

/// Drops every stream that would not have been appended after the ones before it (a repeat, or an
/// older stream after a newer one), as topologies written before stale answers were recognised may
/// list them (`[S1, S2, S1]`). Returns whether anything was dropped.
fn keep_in_order(streams: &mut Vec<StreamShards>) -> bool {
    let before = streams.len();
    let mut kept: Vec<StreamShards> = Vec::with_capacity(before);
    for stream in streams.drain(..) {
        if place(&kept, &stream.arn) == Place::Append {
            kept.push(stream);
        }
    }
    *streams = kept;
    streams.len() != before
}

/// Adds the listed closed shards whose checkpoint says finished. Open shards are not read: only a
/// closed shard has children waiting on it, and a thousand idle open shards would cost a thousand
/// reads per refresh.
async fn learn_finished(discovery: &Discovery, table: &str, topology: &mut Topology) -> Result<(), CheckpointError> {
    let unfinished: Vec<String> = topology
        .streams
        .iter()
        .flat_map(|s| &s.shards)
        .filter(|s| s.closed && !topology.finished.contains(&s.shard_id))
        .map(|s| s.shard_id.clone())
        .collect();
    for shard_id in unfinished {
        let stored = discovery.checkpoints.load(&checkpoint::key(table, &shard_id)).await?;
        if matches!(stored.position, Some(Position::Finished { .. })) {
            topology.finished.insert(shard_id);
        }
    }
    Ok(())
}

/// On a table's first sighting with `START_FROM_LATEST` and no checkpoints at all, the fleet
/// remembers the second of that sighting: records created before it are skipped, everything after it
/// is published (see [`Topology::since`]). Shards are read from `TRIM_HORIZON` rather than `LATEST`:
/// a `LATEST` iterator taken when a shard is first read (after its parent is finished, or by a new
/// owner) would lose what was written between the sighting and that moment.
///
/// DynamoDB rounds `ApproximateCreationDateTime` down to the second, so the sighting is rounded down
/// too: a record written in the same second just before the sighting is published rather than one
/// just after it being lost.
async fn start_at_latest(discovery: &Discovery, table: &str, topology: &mut Topology) -> Result<(), CheckpointError> {
    if !discovery.checkpoints.shards_of(table).await?.is_empty() {
        return Ok(());
    }
    let since = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    topology.since = Some(since);
    tracing::info!(table, since, "first sighting with START_FROM_LATEST: records created before it are skipped");
    Ok(())
}

/// Deletes finished checkpoints of shards that have left every stream followed: those the topology
/// knows as finished, and those finished after they stopped being listed (a shard that vanished while
/// it was read ends with a finished checkpoint the topology never saw).
async fn clean_up(discovery: &Discovery, table: &str, topology: &mut Topology) {
    let present: HashSet<String> = topology.present().into_iter().map(str::to_owned).collect();
    topology.start_latest.retain(|id| present.contains(id));
    let mut gone: BTreeSet<String> = topology.finished.iter().filter(|id| !present.contains(*id)).cloned().collect();
    match discovery.checkpoints.shards_of(table).await {
        Ok(keys) => gone.extend(keys.into_iter().map(|(_, shard)| shard).filter(|shard| !present.contains(shard))),
        Err(err) => tracing::warn!(table, error = %err, "cannot list checkpoints; clean-up retried later"),
    }
    for shard_id in gone {
        let key = checkpoint::key(table, &shard_id);
        let result = async {
            let stored = discovery.checkpoints.load(&key).await?;
            let finished = match (stored.position, stored.revision) {
                (Some(Position::Finished { .. }), Some(revision)) => Some(revision),
                _ => None,
            };
            if let Some(revision) = finished {
                discovery.checkpoints.delete(&key, revision).await?;
            }
            Ok::<bool, CheckpointError>(finished.is_some())
        }
        .await;
        match result {
            Ok(deleted) => {
                if deleted {
                    tracing::info!(table, shard_id, "finished shard left the stream; checkpoint deleted");
                }
                topology.finished.remove(&shard_id);
            }
            Err(err) => {
                tracing::warn!(table, shard_id, error = %err, "cannot delete finished checkpoint; retrying later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: &str = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:00.000";
    const S2: &str = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-01T00:00:05.000";
    const S3: &str = "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-01-02T00:00:00.000";

    fn streams(arns: &[&str]) -> Vec<StreamShards> {
        arns.iter().map(|arn| StreamShards { arn: (*arn).to_owned(), shards: Vec::new() }).collect()
    }

    #[test]
    fn a_stream_is_appended_only_when_it_is_newer_than_every_one_followed() {
        assert_eq!(place(&[], S1), Place::Append);
        assert_eq!(place(&streams(&[S1]), S1), Place::Newest);
        assert_eq!(place(&streams(&[S1]), S2), Place::Append);
        assert_eq!(place(&streams(&[S1, S2]), S2), Place::Newest);
        // The issue: S1 named again after S2 was appended made [S1, S2, S1].
        assert_eq!(place(&streams(&[S1, S2]), S1), Place::Stale);
        // S1 finished and dropped from the list: still older than the newest followed.
        assert_eq!(place(&streams(&[S2]), S1), Place::Stale);
        assert_eq!(place(&streams(&[S2]), S3), Place::Append);
        // Labels of another precision (moto writes microseconds) still sort in time order.
        assert_eq!(place(&streams(&[S2]), &format!("{}.5", &S2[..S2.len() - 4])), Place::Append);
        // Without a label the answer cannot be judged older: followed, as before.
        assert_eq!(place(&streams(&[S2]), "arn:other"), Place::Append);
    }

    #[test]
    fn a_topology_listing_a_stream_twice_is_repaired_in_order() {
        let mut listed = streams(&[S1, S2, S1]);
        assert!(keep_in_order(&mut listed));
        assert_eq!(listed, streams(&[S1, S2]));
        let mut listed = streams(&[S2, S1, S3]);
        assert!(keep_in_order(&mut listed));
        assert_eq!(listed, streams(&[S2, S3]));
        let mut listed = streams(&[S1, S2, S3]);
        assert!(!keep_in_order(&mut listed));
        assert_eq!(listed, streams(&[S1, S2, S3]));
    }
}
