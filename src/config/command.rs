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
}

/// What to do about checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CheckpointsCommand {
    /// List each shard's checkpoint and who holds its lease, for TABLE or every table
    List {
        /// A table of DYNAMODB_TABLES (all of them when left out)
        table: Option<String>,
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
    fn without_a_command_the_service_runs() {
        let args = Args::try_parse_from(["dynamodb-stream-consumer", "--dynamodb-tables=orders"]).expect("parses");
        assert_eq!(args.command, None);
    }
}
