//! `checkpoints set` and `checkpoints rewind`: an operator moves checkpoints by hand.
//!
//! Both check their input against AWS first (the table's current stream, its shards and their
//! sequence number ranges, from `DescribeStream`), then against the fleet: a shard whose lease a live
//! replica holds is refused unless `--force`. Every write is a compare-and-swap at the revision just
//! read (re-read and written again on a conflict, a few times), so nothing the command did not see is
//! overwritten unknowingly. A forced write makes the owner's next checkpoint write fail; the owner then
//! stops publishing that shard, waits until the key has not moved for a lease TTL, and resumes from
//! the checkpoint in the bucket: the one written here.

use bytes::Bytes;
use coordination::StoreError;
use dynamodb_stream_consumer::checkpoint::{self, Position, SequenceNumber};
use dynamodb_stream_consumer::config::Config;
use dynamodb_stream_consumer::source::api::{ShardRange, StreamsApi};

use super::fleet::{Bucket, Fleet, Lease};
use super::when::{self, RewindTo};
use super::{CommandError, bucket_error, known_table, now_secs, open_bucket};

/// Attempts of one compare-and-swap write while another writer keeps moving the key (an owner
/// checkpoints about once a page, so a few attempts find a moment between two of its writes).
const WRITE_ATTEMPTS: usize = 5;

/// Writes `Position::After(sequence)` to a shard's checkpoint: reading resumes after `sequence`.
pub async fn set(
    config: &Config,
    table: &str,
    shard_id: &str,
    sequence: &str,
    force: bool,
) -> Result<String, CommandError> {
    known_table(config, table, "set a checkpoint of")?;
    let bad_sequence = |reason: String| CommandError::BadSequence {
        sequence: sequence.to_owned(),
        shard: shard_id.to_owned(),
        reason,
    };
    let seq = SequenceNumber::parse(sequence).ok_or_else(|| bad_sequence("it is not decimal digits".to_owned()))?;
    let shards = current_shards(config, table).await?;
    let Some(range) = shards.iter().find(|shard| shard.shard_id == shard_id) else {
        let listed: Vec<&str> = shards.iter().map(|shard| shard.shard_id.as_str()).collect();
        return Err(CommandError::UnknownShard {
            table: table.to_owned(),
            shard: shard_id.to_owned(),
            shards: listed.join(", "),
        });
    };
    in_range(&seq, range).map_err(bad_sequence)?;
    let changes = vec![(shard_id.to_owned(), Position::After(seq.clone()))];
    let header = format!("checkpoint of {table} {shard_id} set: reading resumes after {seq}");
    write(config, table, changes, force, header).await
}

/// Writes `Position::Rewound` to the checkpoint of every shard of the table's current stream, closed
/// ones still listed included (their `SHARD_END` is replaced, so they are read again; their children
/// wait until they are finished again).
pub async fn rewind(config: &Config, table: &str, to: &str, force: bool) -> Result<String, CommandError> {
    known_table(config, table, "rewind")?;
    let now = now_secs()?;
    let point = when::parse(to, now).map_err(|reason| CommandError::BadTime { to: to.to_owned(), reason })?;
    let shards = current_shards(config, table).await?;
    let position = Position::Rewound { since: point.since() };
    let changes = shards.into_iter().map(|shard| (shard.shard_id, position.clone())).collect();
    let header = match point {
        RewindTo::TrimHorizon => {
            format!(
                "{table} rewound to TRIM_HORIZON: every shard is read again from the oldest record the stream holds"
            )
        }
        RewindTo::Since(since) => format!(
            "{table} rewound to {}: every shard is read again from TRIM_HORIZON, records created before then skipped",
            when::rfc3339(since)
        ),
    };
    write(config, table, changes, force, header).await
}

/// The shards of the table's current stream, with their sequence number ranges.
async fn current_shards(config: &Config, table: &str) -> Result<Vec<ShardRange>, CommandError> {
    let failed = |message: String| CommandError::Table { table: table.to_owned(), message };
    let api = StreamsApi::new(&dynamodb_stream_consumer::aws_sdk_config(config).await);
    let stream = api.table_stream(table).await.map_err(|err| failed(err.to_string()))?;
    api.shard_ranges(&stream.stream_arn).await.map_err(|err| failed(format!("DescribeStream: {err}")))
}

/// Whether `seq` lies in the shard's range: at or after its first sequence number, and at or before
/// its last once it is closed.
fn in_range(seq: &SequenceNumber, range: &ShardRange) -> Result<(), String> {
    let bound = |text: &Option<String>| text.as_deref().and_then(SequenceNumber::parse);
    if let Some(starting) = bound(&range.starting)
        && *seq < starting
    {
        return Err(format!("the shard starts at {starting}"));
    }
    if let Some(ending) = bound(&range.ending)
        && *seq > ending
    {
        return Err(format!("the shard is closed and ends at {ending}"));
    }
    Ok(())
}

/// Refuses shards leased by live replicas unless `force`, then writes each change and reports it.
async fn write(
    config: &Config,
    table: &str,
    changes: Vec<(String, Position)>,
    force: bool,
    header: String,
) -> Result<String, CommandError> {
    let bucket = Bucket::new(config.bucket.clone(), open_bucket(config).await?);
    let fleet = Fleet::read(bucket.store.as_ref()).await.map_err(|err| bucket_error(&bucket, &err))?;
    let ttl_secs = config.lease.ttl.as_secs();
    let held: Vec<String> = changes
        .iter()
        .filter_map(|(shard_id, _)| match fleet.lease_of(table, shard_id) {
            Lease::Held { replica, .. } => Some(format!("{shard_id} ({replica})")),
            _ => None,
        })
        .collect();
    if !held.is_empty() && !force {
        let what = if held.len() == 1 { "a shard is".to_owned() } else { format!("{} shards are", held.len()) };
        return Err(CommandError::Leased { what, holders: held.join(", "), ttl_secs });
    }
    let mut lines = vec![header];
    for (shard_id, position) in changes {
        let key = checkpoint::key(table, &shard_id);
        let old = swap(&bucket, &key, &position).await?;
        let mut line = format!("{key}: {} → {}", old.as_deref().unwrap_or("(none)"), position.encode());
        if let Lease::Held { replica, .. } = fleet.lease_of(table, &shard_id) {
            line.push_str(&format!(
                " (leased by {replica}: it resumes from the new checkpoint within about {ttl_secs} s after its next write)"
            ));
        }
        lines.push(line);
    }
    Ok(lines.join("\n"))
}

/// Writes `position` at `key` by compare-and-swap on the revision just read, reading again on a
/// conflict; returns the value it replaced.
async fn swap(bucket: &Bucket, key: &str, position: &Position) -> Result<Option<String>, CommandError> {
    let value = Bytes::from(position.encode());
    for _ in 0..WRITE_ATTEMPTS {
        let current = bucket.store.get(key).await.map_err(|err| bucket_error(bucket, &err))?;
        let old = current.as_ref().map(|entry| String::from_utf8_lossy(&entry.value).into_owned());
        let written = match current {
            None => bucket.store.create(key, value.clone()).await,
            Some(entry) => bucket.store.update(key, value.clone(), entry.revision).await,
        };
        match written {
            Ok(_) => return Ok(old),
            Err(StoreError::Conflict { .. }) => continue,
            Err(err) => return Err(bucket_error(bucket, &format!("cannot write {key}: {err}"))),
        }
    }
    Err(bucket_error(
        bucket,
        &format!("cannot write {key}: another writer moved it {WRITE_ATTEMPTS} times in a row; try again"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(starting: Option<&str>, ending: Option<&str>) -> ShardRange {
        ShardRange {
            shard_id: "shardId-1".to_owned(),
            starting: starting.map(str::to_owned),
            ending: ending.map(str::to_owned),
        }
    }

    fn seq(text: &str) -> SequenceNumber {
        SequenceNumber::parse(text).expect("digits")
    }

    #[test]
    fn a_sequence_number_must_lie_in_its_shards_range() {
        let open = range(Some("100"), None);
        assert_eq!(in_range(&seq("100"), &open), Ok(()));
        assert_eq!(in_range(&seq("99999999999999999999999"), &open), Ok(()));
        assert_eq!(in_range(&seq("99"), &open), Err("the shard starts at 100".to_owned()));
        let closed = range(Some("100"), Some("200"));
        assert_eq!(in_range(&seq("200"), &closed), Ok(()));
        assert_eq!(in_range(&seq("201"), &closed), Err("the shard is closed and ends at 200".to_owned()));
    }
}
