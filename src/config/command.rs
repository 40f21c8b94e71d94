//! The operator commands of the binary, beside the service it runs by default: each one a
//! subcommand that reads the same settings as the service (its connection to NATS, its bucket, its
//! tables) and does one thing to the fleet's shared state. Only their shape lives here; the binary
//! carries them out.

use clap::Subcommand;

/// An operator command. Without one, the binary runs the service.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Backfills: publishing what a table already holds (docs/backfill.md)
    Backfill {
        #[command(subcommand)]
        action: BackfillCommand,
    },
    /// Checkpoints: how far each shard has been published
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointsCommand,
    },
    /// The fleet as the bucket shows it: live replicas and their leases, each shard's checkpoint,
    /// when it last moved and who holds it
    Status {
        /// One JSON document instead of tables (its shape is in the README)
        #[arg(long)]
        json: bool,
    },
}

/// What to do about checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CheckpointsCommand {
    /// List each shard's checkpoint and who holds its lease, for TABLE or every table
    List {
        /// A table of DYNAMODB_TABLES (all of them when left out)
        table: Option<String>,
    },
    /// Move a shard's checkpoint: reading resumes after SEQUENCE
    ///
    /// SHARD must be a shard of the table's current stream and SEQUENCE a sequence number inside its
    /// range (DescribeStream). Refused while a live replica holds the shard's lease, unless --force.
    Set {
        /// A table of DYNAMODB_TABLES
        table: String,
        /// A shard id of the table's current stream
        shard: String,
        /// The sequence number of the last record not to publish again
        sequence: String,
        /// Write even while a live replica holds the lease (it picks the change up after its next
        /// checkpoint write)
        #[arg(long)]
        force: bool,
    },
    /// Replay every shard of TABLE's current stream from a point in its 24 h retention
    ///
    /// Each shard is read again from TRIM_HORIZON, skipping records created before the time. Refused
    /// while live replicas hold the shards' leases, unless --force.
    Rewind {
        /// A table of DYNAMODB_TABLES
        table: String,
        /// `trim-horizon` (everything the stream still holds), `latest` (now: only what is written
        /// from now on), an RFC 3339 time (`2026-11-30T12:00:00Z`) or a time ago (`90m`, `2h`, `1h30m`)
        #[arg(long)]
        to: String,
        /// Write even while live replicas hold the leases (each picks the change up after its next
        /// checkpoint write)
        #[arg(long)]
        force: bool,
    },
}

/// What to do about backfills.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum BackfillCommand {
    /// Ask the fleet to backfill TABLE (again), without a restart
    ///
    /// Writes the time of the request to `backfill/TABLE/request` in the checkpoint bucket; a newer
    /// request replaces an older one. The NATS settings are the service's (NATS_URL, credentials, TLS,
    /// CHECKPOINT_BUCKET); given as flags, they come before `backfill`.
    Request {
        /// A table of DYNAMODB_TABLES
        table: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Args;

    #[test]
    fn a_backfill_request_names_its_table_and_keeps_the_settings_before_it() {
        let args = Args::try_parse_from([
            "dynamodb-stream-consumer",
            "--dynamodb-tables=orders",
            "backfill",
            "request",
            "orders",
        ])
        .expect("parses");
        assert_eq!(
            args.command,
            Some(Command::Backfill { action: BackfillCommand::Request { table: "orders".to_owned() } })
        );
        assert_eq!(args.dynamodb_tables, "orders");
        assert!(
            Args::try_parse_from(["dynamodb-stream-consumer", "backfill", "request"]).is_err(),
            "the table is required"
        );
    }

    #[test]
    fn set_and_rewind_take_their_arguments_and_force() {
        let parse = |args: &[&str]| {
            let mut all = vec!["dynamodb-stream-consumer", "--dynamodb-tables=orders", "checkpoints"];
            all.extend_from_slice(args);
            Args::try_parse_from(all).map(|args| args.command)
        };
        assert_eq!(
            parse(&["set", "orders", "shardId-1", "42", "--force"]).expect("parses"),
            Some(Command::Checkpoints {
                action: CheckpointsCommand::Set {
                    table: "orders".to_owned(),
                    shard: "shardId-1".to_owned(),
                    sequence: "42".to_owned(),
                    force: true,
                }
            })
        );
        assert_eq!(
            parse(&["rewind", "orders", "--to", "2h"]).expect("parses"),
            Some(Command::Checkpoints {
                action: CheckpointsCommand::Rewind { table: "orders".to_owned(), to: "2h".to_owned(), force: false }
            })
        );
        assert!(parse(&["rewind", "orders"]).is_err(), "--to is required");
        assert!(parse(&["set", "orders", "shardId-1"]).is_err(), "the sequence number is required");
    }

    #[test]
    fn without_a_command_the_service_runs() {
        let args = Args::try_parse_from(["dynamodb-stream-consumer", "--dynamodb-tables=orders"]).expect("parses");
        assert_eq!(args.command, None);
    }
}
