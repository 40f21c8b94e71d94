//! `checkpoints set` and `checkpoints rewind`: an operator moves checkpoints by hand.
//!
//! Both check their input against AWS first (the table's current stream, its shards and their
//! sequence number ranges, from `DescribeStream`), then against the fleet: a shard whose lease a live
//! replica holds is refused unless `--force`. Every write is a compare-and-swap at the revision just
//! read (re-read and written again on a conflict, a few times), so nothing the command did not see is
//! overwritten unknowingly. With `--force`, once a leased shard's checkpoint is written its lease is
//! taken from the holder as a release would leave it (no owner, same term): the holder's coordinator
//! sees the lease is no longer its own and stops that shard's reader at once, writing nothing more,
//! and whichever replica takes the lease next reads from the new checkpoint, within seconds, busy or
//! idle. (Were the lease left alone, the holder would learn of the move only at its next checkpoint
//! write, never on an idle shard.)
//!
//! A rewind also reopens the closed shards already read to their end: their topology keys lose the
//! `finished` mark, so they are read again and their children wait for them again (per-item order
//! holds within the replay). Their checkpoints are rewound first, so no topology refresh can mark them
//! finished again; then the marks come off; then the other shards are rewound.

use bytes::Bytes;
use coordination::lease::LeaseValue;
use coordination::{ShardKey, StoreError, keys};
use dynamodb_stream_consumer::checkpoint::{self, Position, SequenceNumber};
use dynamodb_stream_consumer::config::Config;
use dynamodb_stream_consumer::source::api::{ShardRange, StreamsApi};
use dynamodb_stream_consumer::source::layout;

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
    let (_, shards) = current_shards(config, table).await?;
    let Some(range) = shards.iter().find(|shard| shard.shard_id == shard_id) else {
        let listed: Vec<&str> = shards.iter().map(|shard| shard.shard_id.as_str()).collect();
        return Err(CommandError::UnknownShard {
            table: table.to_owned(),
            shard: shard_id.to_owned(),
            shards: listed.join(", "),
        });
    };
    in_range(&seq, range).map_err(bad_sequence)?;
    let header = format!("checkpoint of {table} {shard_id} set: reading resumes after {seq}");
    let mut moves = Moves::begin(config, table, &[shard_id.to_owned()], force, header).await?;
    moves.write(shard_id, &Position::After(seq)).await?;
    moves.finish().await
}

/// Writes `Position::Rewound` to the checkpoint of every shard of the table's current stream, closed
/// ones still listed included (their `SHARD_END` is replaced, so they are read again; their children
/// wait until they are finished again).
pub async fn rewind(config: &Config, table: &str, to: &str, force: bool) -> Result<String, CommandError> {
    known_table(config, table, "rewind")?;
    let now = now_secs()?;
    let point = when::parse(to, now).map_err(|reason| CommandError::BadTime { to: to.to_owned(), reason })?;
    let (stream_arn, shards) = current_shards(config, table).await?;
    let position = Position::Rewound { since: point.since() };
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
    let shard_ids: Vec<String> = shards.into_iter().map(|shard| shard.shard_id).collect();
    let mut moves = Moves::begin(config, table, &shard_ids, force, header).await?;
    let finished = moves.finished_in_topology(&stream_arn, &shard_ids).await?;
    for (shard_id, _) in &finished {
        moves.write(shard_id, &position).await?;
    }
    moves.reopen(&finished).await?;
    for shard_id in shard_ids.iter().filter(|id| !finished.iter().any(|(done, _)| done == *id)) {
        moves.write(shard_id, &position).await?;
    }
    moves.finish().await
}

/// The table's current stream and its shards, with their sequence number ranges.
async fn current_shards(config: &Config, table: &str) -> Result<(String, Vec<ShardRange>), CommandError> {
    let failed = |message: String| CommandError::Table { table: table.to_owned(), message };
    let api = StreamsApi::new(&dynamodb_stream_consumer::aws_sdk_config(config).await);
    let stream = api.table_stream(table).await.map_err(|err| failed(err.to_string()))?;
    let shards = api.shard_ranges(&stream.stream_arn).await.map_err(|err| failed(format!("DescribeStream: {err}")))?;
    Ok((stream.stream_arn, shards))
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

/// The checkpoint moves of one command: the shards it may move (checked against the fleet), the
/// lines it reports, and the leases it takes from their holders at the end.
struct Moves<'a> {
    table: &'a str,
    bucket: Bucket,
    fleet: Fleet,
    lines: Vec<String>,
    /// Shards leased by a live replica whose checkpoint was written (`--force`).
    taken: Vec<String>,
}

impl<'a> Moves<'a> {
    /// Refuses when any of `shard_ids` is leased by a live replica, unless `force`.
    async fn begin(
        config: &Config,
        table: &'a str,
        shard_ids: &[String],
        force: bool,
        header: String,
    ) -> Result<Moves<'a>, CommandError> {
        let bucket = Bucket::new(config.bucket.clone(), open_bucket(config).await?);
        let fleet = Fleet::read(bucket.store.as_ref()).await.map_err(|err| bucket_error(&bucket, &err))?;
        let held: Vec<String> = shard_ids
            .iter()
            .filter_map(|shard_id| match fleet.lease_of(table, shard_id) {
                Lease::Held { replica, .. } => Some(format!("{shard_id} ({replica})")),
                _ => None,
            })
            .collect();
        if !held.is_empty() && !force {
            let what = if held.len() == 1 { "a shard is".to_owned() } else { format!("{} shards are", held.len()) };
            return Err(CommandError::Leased { what, holders: held.join(", ") });
        }
        Ok(Moves { table, bucket, fleet, lines: vec![header], taken: Vec::new() })
    }

    /// Writes `position` to a shard's checkpoint and reports it.
    async fn write(&mut self, shard_id: &str, position: &Position) -> Result<(), CommandError> {
        let key = checkpoint::key(self.table, shard_id);
        let old = swap(&self.bucket, &key, position).await?;
        let mut line = format!("{key}: {} → {}", old.as_deref().unwrap_or("(none)"), position.encode());
        if let Lease::Held { replica, .. } = self.fleet.lease_of(self.table, shard_id) {
            line.push_str(&format!(" (was read by {replica}: its lease is freed below)"));
            self.taken.push(shard_id.to_owned());
        }
        self.lines.push(line);
        Ok(())
    }

    /// The shards of `shard_ids` that the table's topology marks finished (read to their end), with
    /// their topology keys.
    async fn finished_in_topology(
        &self,
        stream_arn: &str,
        shard_ids: &[String],
    ) -> Result<Vec<(String, String)>, CommandError> {
        let mut finished = Vec::new();
        for shard_id in shard_ids {
            let key = layout::shard_key(self.table, stream_arn, shard_id);
            let entry = self.bucket.store.get(&key).await.map_err(|err| bucket_error(&self.bucket, &err))?;
            if entry.is_some_and(|entry| layout::unfinished(&entry.value).is_some()) {
                finished.push((shard_id.clone(), key));
            }
        }
        Ok(finished)
    }

    /// Takes the `finished` mark off these shards' topology keys, then moves the topology head's
    /// `changes` so that every replica reads the keys again (both by compare-and-swap; a refresh
    /// running at the same time conflicts and stops, coordination/DESIGN.md, "Discovery in the
    /// service").
    async fn reopen(&mut self, finished: &[(String, String)]) -> Result<(), CommandError> {
        if finished.is_empty() {
            return Ok(());
        }
        for (_, key) in finished {
            cas(&self.bucket, key, layout::unfinished).await?;
        }
        let head = layout::head_key(self.table);
        cas(&self.bucket, &head, |value| {
            let mut head: layout::Head = serde_json::from_slice(value).ok()?;
            head.changes += 1;
            Some(head.encode())
        })
        .await?;
        let shards: Vec<&str> = finished.iter().map(|(shard_id, _)| shard_id.as_str()).collect();
        self.lines.push(format!(
            "closed shards read to their end reopened (read again before their children): {}",
            shards.join(", ")
        ));
        Ok(())
    }

    /// Frees the leases of the shards moved under a live holder, and returns the report.
    async fn finish(mut self) -> Result<String, CommandError> {
        for shard_id in std::mem::take(&mut self.taken) {
            let key = keys::shard_lease_key(&ShardKey::for_shard(self.table, &shard_id));
            let freed = cas(&self.bucket, &key, |value| {
                let mut lease: LeaseValue = serde_json::from_slice(value).ok()?;
                lease.owner.take()?;
                serde_json::to_vec(&lease).ok().map(Bytes::from)
            })
            .await?;
            self.lines.push(if freed {
                format!(
                    "lease of {shard_id} freed: its reader stops, and the shard is read from the new checkpoint as soon as a replica takes it"
                )
            } else {
                format!("lease of {shard_id} already moved on: its next holder reads from the new checkpoint")
            });
        }
        Ok(self.lines.join("\n"))
    }
}

/// Rewrites `key` by compare-and-swap with what `change` makes of its current value (`None`: the key
/// is absent), reading again on a conflict, a few times. `Ok(None)` when `change` leaves the key
/// alone; otherwise the value it replaced (`None`: there was none).
async fn rewrite(
    bucket: &Bucket,
    key: &str,
    change: impl Fn(Option<&[u8]>) -> Option<Bytes>,
) -> Result<Option<Option<Bytes>>, CommandError> {
    for _ in 0..WRITE_ATTEMPTS {
        let current = bucket.store.get(key).await.map_err(|err| bucket_error(bucket, &err))?;
        let Some(value) = change(current.as_ref().map(|entry| &entry.value[..])) else { return Ok(None) };
        let written = match &current {
            None => bucket.store.create(key, value).await,
            Some(entry) => bucket.store.update(key, value, entry.revision).await,
        };
        match written {
            Ok(_) => return Ok(Some(current.map(|entry| entry.value))),
            Err(StoreError::Conflict { .. }) => continue,
            Err(err) => return Err(bucket_error(bucket, &format!("cannot write {key}: {err}"))),
        }
    }
    Err(bucket_error(
        bucket,
        &format!("cannot write {key}: another writer moved it {WRITE_ATTEMPTS} times in a row; try again"),
    ))
}

/// Rewrites an existing `key` with `change` of its value; false when the key is absent or `change`
/// leaves it alone.
async fn cas(bucket: &Bucket, key: &str, change: impl Fn(&[u8]) -> Option<Bytes>) -> Result<bool, CommandError> {
    Ok(rewrite(bucket, key, |current| current.and_then(&change)).await?.is_some())
}

/// Writes `position` at `key`, whatever it holds; returns the value it replaced.
async fn swap(bucket: &Bucket, key: &str, position: &Position) -> Result<Option<String>, CommandError> {
    let value = Bytes::from(position.encode());
    let replaced = rewrite(bucket, key, |_| Some(value.clone())).await?.flatten();
    Ok(replaced.map(|old| String::from_utf8_lossy(&old).into_owned()))
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
