//! The operator commands ([`Command`]): short-lived runs of the binary that show or change the fleet's
//! shared state in the checkpoint bucket and report what they did: `backfill request`, `status`,
//! `checkpoints list` (here), `checkpoints set` and `checkpoints rewind` ([`moves`]).
//!
//! Unlike the service, a command does not wait for NATS: an operator at a terminal wants the reason at
//! once (server down, credentials refused, wrong bucket), not a retry loop. It never creates the
//! bucket either: a bucket missing here means a mistyped `CHECKPOINT_BUCKET`, and a request written
//! into a new bucket would never reach the fleet.

mod fleet;
mod moves;
mod status;
mod when;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream;

use dynamodb_stream_consumer::config::{BackfillCommand, CheckpointsCommand, Command, Config, is_valid_table_name};
use dynamodb_stream_consumer::nats;
use dynamodb_stream_consumer::pipeline::backfill::state::request_key;
use dynamodb_stream_consumer::pipeline::backfill::watch::BACKFILL_READ_INTERVAL;

/// Exit code of a command that its arguments or the settings make impossible (as for invalid
/// settings: `EX_USAGE`-style).
const EXIT_USAGE: u8 = 2;

/// Why a command did not do its work.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("cannot {action} {table:?}: it is not one of DYNAMODB_TABLES ({tables})")]
    UnknownTable { action: &'static str, table: String, tables: String },
    #[error("{shard:?} is not a shard of the current stream of table {table} (its shards: {shards})")]
    UnknownShard { table: String, shard: String, shards: String },
    #[error("{sequence:?} is not a sequence number of shard {shard}: {reason}")]
    BadSequence { sequence: String, shard: String, reason: String },
    #[error("--to {to}: {reason}")]
    BadTime { to: String, reason: String },
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
    #[error(
        "refused: {what} leased by a live replica: {holders}. Stop the fleet first (the runbook's \
         \"Reset or move a checkpoint\"), or add --force: the command then frees those leases too, so \
         their readers stop and the shards are read from the new checkpoints within seconds"
    )]
    Leased { what: String, holders: String },
    #[error(transparent)]
    Connect(#[from] nats::SetupError),
    #[error(
        "checkpoint bucket {bucket:?} does not exist: set CHECKPOINT_BUCKET to the service's bucket (the service creates it when it first starts)"
    )]
    NoBucket { bucket: String },
    #[error("checkpoint bucket {bucket:?}: {message}")]
    Bucket { bucket: String, message: String },
    #[error("the system clock is before 1970, so the command cannot tell the time")]
    Clock,
}

impl CommandError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CommandError::UnknownTable { .. }
            | CommandError::UnknownShard { .. }
            | CommandError::BadSequence { .. }
            | CommandError::BadTime { .. } => ExitCode::from(EXIT_USAGE),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Carries out `command` with the validated settings; prints what it did, or why not.
pub fn run(command: Command, config: &Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let done = match command {
        Command::Backfill { action: BackfillCommand::Request { table } } => {
            runtime.block_on(request_backfill(config, &table))
        }
        Command::Checkpoints { action: CheckpointsCommand::List { table } } => {
            runtime.block_on(list_checkpoints(config, table.as_deref()))
        }
        Command::Checkpoints { action: CheckpointsCommand::Set { table, shard, sequence, force } } => {
            runtime.block_on(moves::set(config, &table, &shard, &sequence, force))
        }
        Command::Checkpoints { action: CheckpointsCommand::Rewind { table, to, force } } => {
            runtime.block_on(moves::rewind(config, &table, &to, force))
        }
        Command::Status { json } => runtime.block_on(status::status(config, json)),
    };
    match done {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            err.exit_code()
        }
    }
}

/// Writes `backfill/{table}/request` with the time now. A plain put, not a compare-and-swap: the
/// fleet compares the value with the request its last backfill served, so a newer request replacing
/// an older one not yet seen loses nothing. The value is kept above the one it replaces even when
/// this machine's clock lags the one that wrote it: a request dated earlier than the last backfill's
/// would be taken for one already served, and silently ignored.
async fn request_backfill(config: &Config, table: &str) -> Result<String, CommandError> {
    known_table(config, table, "request a backfill of")?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| CommandError::Clock)?.as_millis();
    let store = open_bucket(config).await?;
    let bucket = config.bucket.clone();
    let key = request_key(table);
    let failed = |action: &str, err: &dyn std::fmt::Display| CommandError::Bucket {
        bucket: bucket.clone(),
        message: format!("cannot {action} {key}: {err}"),
    };
    let previous = store.get(&key).await.map_err(|err| failed("read", &err))?;
    // A value that is not a number cannot be compared; the fleet reads it as no request at all.
    let previous_ms = previous.and_then(|value| std::str::from_utf8(&value).ok()?.trim().parse::<u128>().ok());
    let requested_ms = previous_ms.map_or(now_ms, |previous| now_ms.max(previous + 1));
    store.put(&key, requested_ms.to_string().into()).await.map_err(|err| failed("write", &err))?;
    Ok(format!(
        "backfill of {table} requested (key {key} in bucket {bucket}); the fleet reads requests every {} s \
         and starts it then, or once a backfill of the table still running is over (see /status)",
        BACKFILL_READ_INTERVAL.as_secs()
    ))
}

/// Refuses a table the service does not read.
fn known_table(config: &Config, table: &str, action: &'static str) -> Result<(), CommandError> {
    if config.tables.iter().any(|configured| configured == table) {
        return Ok(());
    }
    // With discovery (issue 20), a table a pattern matches, or any table when tags select: whether
    // it is read now is the fleet's to say, and its checkpoints are kept when it is not.
    let selection = &config.selection;
    if selection.by_name(table).is_some() || (!selection.tags.is_empty() && is_valid_table_name(table)) {
        return Ok(());
    }
    Err(CommandError::UnknownTable { action, table: table.to_owned(), tables: config.tables.join(", ") })
}

/// The tables the service reads: those named in `DYNAMODB_TABLES`, then (with patterns or tags) those
/// the fleet's table set holds now.
async fn selected_tables(config: &Config, bucket: &fleet::Bucket) -> Result<Vec<String>, CommandError> {
    let mut tables = config.tables.clone();
    if config.selection.is_dynamic() {
        let stored =
            dynamodb_stream_consumer::pipeline::tables::stored_tables(bucket.store.as_ref(), &config.lease.group)
                .await
                .map_err(|err| bucket_error(bucket, &err))?;
        tables.extend(stored.into_iter().filter(|table| !config.tables.contains(table)));
    }
    Ok(tables)
}

/// The service's checkpoint bucket; never created here (see the module docs).
async fn open_bucket(config: &Config) -> Result<jetstream::kv::Store, CommandError> {
    let client = nats::connect(config).await?;
    let bucket = config.bucket.clone();
    match jetstream::new(client).get_key_value(&bucket).await {
        Ok(store) => Ok(store),
        Err(err) if is_missing_bucket(&err) => Err(CommandError::NoBucket { bucket }),
        Err(err) => Err(CommandError::Bucket { bucket, message: err.to_string() }),
    }
}

/// Lists every checkpoint of `table` (or of every configured table): its stored value (a sequence
/// number, `SHARD_END…` once read to its end, or a rewind) and its lease: the replica holding it while
/// that replica is alive (its presence key is there), `expired` when the holder is gone, `free` when
/// released or never taken.
async fn list_checkpoints(config: &Config, table: Option<&str>) -> Result<String, CommandError> {
    let tables: Vec<&str> = match table {
        Some(table) => {
            known_table(config, table, "list the checkpoints of")?;
            vec![table]
        }
        None => Vec::new(),
    };
    let bucket = fleet::Bucket::new(config.bucket.clone(), open_bucket(config).await?);
    let every = match table {
        Some(_) => Vec::new(),
        None => selected_tables(config, &bucket).await?,
    };
    let tables: Vec<&str> = if table.is_some() { tables } else { every.iter().map(String::as_str).collect() };
    let fleet = fleet::Fleet::read(bucket.store.as_ref()).await.map_err(|err| bucket_error(&bucket, &err))?;
    let checkpoints =
        fleet::checkpoint_rows(&bucket, &fleet, &tables).await.map_err(|err| bucket_error(&bucket, &err))?;
    let mut rows = vec![["TABLE".to_owned(), "SHARD".to_owned(), "CHECKPOINT".to_owned(), "LEASE".to_owned()]];
    rows.extend(checkpoints.into_iter().map(|row| [row.table, row.shard_id, row.value, row.lease.to_string()]));
    let mut out = fleet::columns(&rows);
    out.push(format!("{} in bucket {}", fleet::count(rows.len() - 1, "checkpoint"), bucket.name));
    Ok(out.join("\n"))
}

/// A bucket read or write that failed.
fn bucket_error(bucket: &fleet::Bucket, err: &dyn std::fmt::Display) -> CommandError {
    CommandError::Bucket { bucket: bucket.name.clone(), message: err.to_string() }
}

/// Seconds since the epoch now.
fn now_secs() -> Result<u64, CommandError> {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|now| now.as_secs()).map_err(|_| CommandError::Clock)
}

/// Whether the bucket's stream does not exist, as opposed to a request that failed (a time-out, no
/// JetStream): async-nats reports both as `GetBucket`, the JetStream error code inside tells them
/// apart.
fn is_missing_bucket(error: &jetstream::context::KeyValueError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    let lookup = std::error::Error::source(error).and_then(|source| source.downcast_ref::<GetStreamError>());
    matches!(
        lookup.map(GetStreamError::kind),
        Some(GetStreamErrorKind::JetStream(err)) if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}
