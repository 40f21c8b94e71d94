//! Every setting of the service: its environment variable, its flag, its default and its validation.
//!
//! The seed's variables keep their names and defaults. Every value arrives as text (from the
//! environment or a flag) and is checked in [`Args::validate`], which reports *every* bad variable in
//! one error instead of stopping at the first: an operator fixes a deployment in one round trip.
//! The flags and the validated [`Config`] live here; the NATS connection settings (`nats`), the lease
//! settings (`lease`), the backfill settings (`backfill`), the naming rules (`names`), how the
//! command line and the environment become flags (`sources`: the Go service's flags, empty variables
//! as unset) and the problem-collecting `checker` each have their own module.

mod backfill;
mod checker;
mod command;
mod lease;
mod names;
mod nats;
mod sources;
pub mod tables;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use clap::Parser;

pub use backfill::{BackfillConfig, DEFAULT_PAGE_ITEMS, DEFAULT_READ_UNITS_PER_SEC};
use checker::Checker;
pub use command::{BackfillCommand, CheckpointsCommand, Command};
pub use lease::table_set_fingerprint;
use names::{is_literal_subject, is_valid_bucket_name, is_valid_stream_name};
pub use names::{is_valid_table_name, subject_for};
pub use nats::{NatsAuth, NatsTls, Secret, redact_url};
pub use tables::{SelectedBy, TableSelection, forms_keys, glob_match};

/// GetRecords returns at most 1000 records per call (DynamoDB Streams API limit).
pub const MAX_RECORDS_PER_CALL: i32 = 1000;

/// Command-line flags, each backed by the environment variable named in `--help`.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "dynamodb-stream-consumer", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated DynamoDB table names or glob patterns (`*`, `?`) to read the streams of
    #[arg(long, env = "DYNAMODB_TABLES", default_value = "")]
    pub dynamodb_tables: String,
    /// Comma-separated `key=value` tags: tables carrying all of them are read too (ListTagsOfResource)
    #[arg(long, env = "DYNAMODB_TABLE_TAGS", default_value = "")]
    pub dynamodb_table_tags: String,
    /// Seconds between re-evaluations of the table patterns and tags (one replica for the fleet)
    #[arg(long, env = "TABLE_REFRESH_INTERVAL_SEC", default_value = "60")]
    pub table_refresh_interval_sec: String,
    /// AWS region
    #[arg(long, env = "AWS_REGION", default_value = "us-west-2")]
    pub aws_region: String,
    /// IAM role ARN to assume through STS (cross-account access); unset uses the credential chain as is
    #[arg(long, env = "AWS_ASSUME_ROLE_ARN", default_value = "")]
    pub aws_assume_role_arn: String,
    /// NATS server URL; several comma-separated URLs for a cluster
    // `--help` hides the environment's value: a URL may carry credentials (`nats://user:pass@host`).
    #[arg(long, env = "NATS_URL", default_value = "nats://localhost:4222", hide_env_values = true)]
    pub nats_url: String,
    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes it); one authentication mode only
    #[arg(long, env = "NATS_CREDS_FILE", default_value = "")]
    pub nats_creds_file: String,
    /// File holding a NATS user NKey seed (`SU…`); one authentication mode only
    #[arg(long, env = "NATS_NKEY_SEED_FILE", default_value = "")]
    pub nats_nkey_seed_file: String,
    /// NATS user name (with NATS_PASSWORD); one authentication mode only
    #[arg(long, env = "NATS_USER", default_value = "")]
    pub nats_user: String,
    /// NATS password (with NATS_USER)
    #[arg(long, env = "NATS_PASSWORD", default_value = "", hide_env_values = true, value_parser = Secret::parse)]
    pub nats_password: Secret,
    /// NATS authentication token; one authentication mode only
    #[arg(long, env = "NATS_TOKEN", default_value = "", hide_env_values = true, value_parser = Secret::parse)]
    pub nats_token: Secret,
    /// PEM file of the CA certificates that sign the NATS servers' certificates (turns TLS on)
    #[arg(long, env = "NATS_TLS_CA_FILE", default_value = "")]
    pub nats_tls_ca_file: String,
    /// PEM client certificate for mutual TLS (with NATS_TLS_KEY_FILE)
    #[arg(long, env = "NATS_TLS_CERT_FILE", default_value = "")]
    pub nats_tls_cert_file: String,
    /// PEM private key of the client certificate (with NATS_TLS_CERT_FILE)
    #[arg(long, env = "NATS_TLS_KEY_FILE", default_value = "")]
    pub nats_tls_key_file: String,
    /// JetStream stream the events are published to
    #[arg(long, env = "NATS_STREAM_NAME", default_value = "dynamodb_streams")]
    pub nats_stream_name: String,
    /// Subject prefix: events go to `{prefix}.{table}`
    #[arg(long, env = "NATS_SUBJECT_PREFIX", default_value = "dynamodb_streams")]
    pub nats_subject_prefix: String,
    /// NATS KV bucket holding checkpoints (and leases)
    #[arg(long, env = "CHECKPOINT_BUCKET", default_value = "dynamodb-stream-checkpoints")]
    pub checkpoint_bucket: String,
    /// Replicas of the stream when this service creates it (1, or 3 on a NATS cluster)
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value = "1")]
    pub nats_stream_replicas: String,
    /// Replicas of the checkpoint bucket when this service creates it
    #[arg(long, env = "CHECKPOINT_BUCKET_REPLICAS", default_value = "1")]
    pub checkpoint_bucket_replicas: String,
    /// Start shards without a checkpoint at LATEST (only the open shards found when a table is first seen)
    #[arg(long, env = "START_FROM_LATEST", default_value = "false")]
    pub start_from_latest: String,
    /// Milliseconds to wait between polls when a shard is caught up
    #[arg(long, env = "POLL_INTERVAL_MS", default_value = "1000")]
    pub poll_interval_ms: String,
    /// Milliseconds to wait after a read that returned some records but not a full page
    #[arg(long, env = "POLL_GAP_MS", default_value = "250")]
    pub poll_gap_ms: String,
    /// Longest wait between reads of an idle shard: the wait doubles from POLL_INTERVAL_MS after each
    /// empty read up to this (empty: POLL_INTERVAL_MS, no backoff)
    #[arg(long, env = "IDLE_POLL_MAX_MS", default_value = "")]
    pub idle_poll_max_ms: String,
    /// Seconds between shard discovery runs per table
    #[arg(long, env = "SHARD_REFRESH_INTERVAL_SEC", default_value = "10")]
    pub shard_refresh_interval_sec: String,
    /// Most publishes awaiting their JetStream ack per shard
    #[arg(long, env = "MAX_IN_FLIGHT", default_value = "1000")]
    pub max_in_flight: String,
    /// Most publishes awaiting their JetStream ack across all shards of this process
    #[arg(long, env = "MAX_ACKS_IN_FLIGHT", default_value = "16384")]
    pub max_acks_in_flight: String,
    /// Milliseconds to wait for a JetStream publish ack before retrying
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value = "5000")]
    pub publish_timeout_ms: String,
    /// Seconds a graceful shutdown may take before the process gives up and exits 1
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SEC", default_value = "25")]
    pub shutdown_timeout_sec: String,
    /// This replica's name in logs, NATS and leases (default: the host name)
    #[arg(long, env = "REPLICA_ID", default_value = "")]
    pub replica_id: String,
    /// Seconds a shard lease lives without renewal before peers may take it over
    #[arg(long, env = "LEASE_TTL_SEC", default_value = "10")]
    pub lease_ttl_sec: String,
    /// Milliseconds between lease renewals (default: a third of the lease TTL)
    #[arg(long, env = "LEASE_RENEW_INTERVAL_MS", default_value = "")]
    pub lease_renew_interval_ms: String,
    /// Most shard leases this replica holds at once (default: unlimited)
    #[arg(long, env = "MAX_LEASES", default_value = "")]
    pub max_leases: String,
    /// HTTP port for health checks and metrics
    #[arg(short = 'p', long, alias = "p", env = "PORT", default_value = "8080")]
    pub port: String,
    /// Interface to bind the HTTP server on (`*` for all; also `-bind ADDR`, as the Go service spelled it)
    #[arg(long, env = "BIND", default_value = "*")]
    pub bind: String,
    /// Enable debug logging: `-d` alone, or a boolean (`--debug=false`, `-d=true`)
    #[arg(
        short = 'd',
        long,
        alias = "d",
        env = "DEBUG",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub debug: String,
    /// Log format: `json` (the original's JSON lines) or `text`
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Comma-separated tables (of DYNAMODB_TABLES) to backfill once, or `*` for all of them
    #[arg(long, env = "BACKFILL_TABLES", default_value = "")]
    pub backfill_tables: String,
    /// Read capacity units per second that backfills may use, shared by the whole fleet (an eventually
    /// consistent Scan reads 8 KB per unit: 100 is about 800 items of 1 KB a second)
    #[arg(long, env = "BACKFILL_READ_UNITS_PER_SEC", default_value = "100")]
    pub backfill_read_units_per_sec: String,
    /// Segments of a backfill's parallel Scan, 1 to 1000 (default: one per 64 MiB of the table, at least 4)
    #[arg(long, env = "BACKFILL_SEGMENTS", default_value = "")]
    pub backfill_segments: String,
    /// Items per Scan call of a backfill (its Limit), 1 to 10000
    #[arg(long, env = "BACKFILL_PAGE_ITEMS", default_value = "1000")]
    pub backfill_page_items: String,
    /// YAML file of per-table settings (filter, include/exclude attributes, subject template,
    /// ttl_deletes), by table name or glob pattern; unset: every table as today
    #[arg(long, env = "TABLES_FILE", default_value = "")]
    pub tables_file: String,
    /// Memory limit in MiB the memory budget derives from (overrides the container's cgroup limit; `0`:
    /// no budget); unset: the cgroup's limit, if any
    #[arg(long, env = "MEMORY_LIMIT_MB", default_value = "")]
    pub memory_limit_mb: String,
    /// An operator command instead of the service (`backfill request TABLE`); none runs the service
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The tables named in `DYNAMODB_TABLES` (plain names; patterns and tags are in `selection`).
    pub tables: Vec<String>,
    /// Every rule of the table selection: names, patterns, tags, and how often they are re-evaluated.
    pub selection: TableSelection,
    pub aws_region: String,
    pub assume_role_arn: Option<String>,
    pub nats_urls: Vec<String>,
    /// How this replica proves who it is to NATS.
    pub nats_auth: NatsAuth,
    /// TLS towards NATS: the trusted CA and the client certificate.
    pub nats_tls: NatsTls,
    pub stream_name: String,
    pub subject_prefix: String,
    pub bucket: String,
    pub stream_replicas: usize,
    pub bucket_replicas: usize,
    pub start_from_latest: bool,
    pub poll_interval: Duration,
    pub poll_gap: Duration,
    /// `IDLE_POLL_MAX_MS`: the cap of an idle shard's doubling wait (`poll_interval`: no backoff).
    pub idle_poll_max: Duration,
    pub shard_refresh_interval: Duration,
    pub max_in_flight: usize,
    pub max_acks_in_flight: usize,
    pub publish_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub replica_id: String,
    /// The lease protocol's settings (replica id, TTL, renew interval, max leases, the table list's
    /// group), validated.
    pub lease: coordination::Config,
    pub bind: IpAddr,
    pub port: u16,
    pub debug: bool,
    pub log_format: LogFormat,
    /// What to backfill and how fast.
    pub backfill: BackfillConfig,
    /// `MEMORY_LIMIT_MB`: the memory limit the budget derives from, or where to find it.
    pub memory_limit: crate::memory::limit::Setting,
    /// `TABLES_FILE`: per-table settings (none without a file), read once at start-up.
    pub tables_file: std::sync::Arc<crate::tables::TablesFile>,
}

/// Every invalid setting, each with its variable name and the reason.
#[derive(Debug)]
pub struct ConfigError(pub Vec<(&'static str, String)>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for (variable, reason) in &self.0 {
            write!(f, "\n  {variable}: {reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Args {
    /// Checks every setting and returns the configuration, or every problem at once.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut check = Checker::default();

        let selection = tables::table_selection(
            &mut check,
            &self.dynamodb_tables,
            &self.dynamodb_table_tags,
            &self.table_refresh_interval_sec,
        );
        let tables = selection.names.clone();

        let aws_region = self.aws_region.trim().to_owned();
        if aws_region.is_empty() {
            check.fail("AWS_REGION", "must not be empty");
        }
        let assume_role_arn = match self.aws_assume_role_arn.trim() {
            "" => None,
            arn if arn.starts_with("arn:") => Some(arn.to_owned()),
            arn => {
                check.fail("AWS_ASSUME_ROLE_ARN", format!("{arn:?} is not an ARN (arn:...)"));
                None
            }
        };

        let nats_urls = nats::nats_urls(&mut check, self);
        let nats_auth = nats::nats_auth(&mut check, self, &nats_urls);
        let nats_tls = nats::nats_tls(&mut check, self);

        let stream_name = self.nats_stream_name.trim().to_owned();
        if !is_valid_stream_name(&stream_name) {
            check.fail(
                "NATS_STREAM_NAME",
                format!("{stream_name:?} is not a stream name (no spaces, '.', '*', '>', '/')"),
            );
        }
        let subject_prefix = self.nats_subject_prefix.trim().to_owned();
        if !is_literal_subject(&subject_prefix) {
            check.fail(
                "NATS_SUBJECT_PREFIX",
                format!("{subject_prefix:?} is not a subject of literal tokens (no wildcards, no empty tokens)"),
            );
        }
        let bucket = self.checkpoint_bucket.trim().to_owned();
        if !is_valid_bucket_name(&bucket) {
            check.fail("CHECKPOINT_BUCKET", format!("{bucket:?} is not a bucket name ([a-zA-Z0-9_-]+)"));
        }
        // JetStream allows 1 to 5 replicas.
        let stream_replicas = check.number("NATS_STREAM_REPLICAS", &self.nats_stream_replicas, 1, 5) as usize;
        let bucket_replicas =
            check.number("CHECKPOINT_BUCKET_REPLICAS", &self.checkpoint_bucket_replicas, 1, 5) as usize;

        let start_from_latest = check.bool("START_FROM_LATEST", &self.start_from_latest);
        let poll_interval = check.millis("POLL_INTERVAL_MS", &self.poll_interval_ms, 1, 3_600_000);
        let poll_gap = check.millis("POLL_GAP_MS", &self.poll_gap_ms, 0, 3_600_000);
        let idle_poll_max = if self.idle_poll_max_ms.trim().is_empty() {
            poll_interval
        } else {
            let max = check.millis("IDLE_POLL_MAX_MS", &self.idle_poll_max_ms, 1, 3_600_000);
            if max < poll_interval {
                check.fail(
                    "IDLE_POLL_MAX_MS",
                    format!("{} ms is less than POLL_INTERVAL_MS ({} ms)", max.as_millis(), poll_interval.as_millis()),
                );
            }
            max
        };
        let shard_refresh_interval =
            check.secs("SHARD_REFRESH_INTERVAL_SEC", &self.shard_refresh_interval_sec, 1, 86_400);
        let max_in_flight = check.number("MAX_IN_FLIGHT", &self.max_in_flight, 1, 100_000) as usize;
        let max_acks_in_flight = check.number("MAX_ACKS_IN_FLIGHT", &self.max_acks_in_flight, 1, 1_000_000) as usize;
        let publish_timeout = check.millis("PUBLISH_TIMEOUT_MS", &self.publish_timeout_ms, 10, 600_000);
        let shutdown_timeout = check.secs("SHUTDOWN_TIMEOUT_SEC", &self.shutdown_timeout_sec, 1, 3_600);

        let replica_id = match self.replica_id.trim() {
            "" => default_replica_id(),
            id => id.to_owned(),
        };
        if !replica_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            check.fail("REPLICA_ID", format!("{replica_id:?} may only contain a-z A-Z 0-9 _ - ."));
        }

        let lease = lease::lease_config(&mut check, self, &replica_id, &selection.fingerprint_parts());
        let backfill = backfill::backfill_config(&mut check, self, &selection);

        let port = check.number("PORT", &self.port, 0, u16::MAX.into()) as u16;
        let bind = match self.bind.trim() {
            // IPv6 and IPv4 (`crate::http`), as the original's `:port`.
            "*" | "" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            text => text.trim_matches(['[', ']']).parse().unwrap_or_else(|_| {
                check.fail("BIND", format!("{text:?} is not an IP address or '*'"));
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }),
        };
        let memory_limit = memory_limit(&mut check, &self.memory_limit_mb);
        let tables_file = match self.tables_file.trim() {
            "" => crate::tables::TablesFile::default(),
            path => crate::tables::TablesFile::load(std::path::Path::new(path)).unwrap_or_else(|err| {
                check.fail("TABLES_FILE", format!("{path}: {err}"));
                crate::tables::TablesFile::default()
            }),
        };
        let debug = check.bool("DEBUG", &self.debug);
        let log_format = match self.log_format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" | "" => LogFormat::Json,
            other => {
                check.fail("LOG_FORMAT", format!("{other:?} is not `json` or `text`"));
                LogFormat::Json
            }
        };

        if !check.0.is_empty() {
            return Err(ConfigError(check.0));
        }
        Ok(Config {
            tables,
            selection,
            aws_region,
            assume_role_arn,
            nats_urls,
            nats_auth,
            nats_tls,
            stream_name,
            subject_prefix,
            bucket,
            stream_replicas,
            bucket_replicas,
            start_from_latest,
            poll_interval,
            poll_gap,
            idle_poll_max,
            shard_refresh_interval,
            max_in_flight,
            max_acks_in_flight,
            publish_timeout,
            shutdown_timeout,
            replica_id,
            lease,
            bind,
            port,
            debug,
            log_format,
            backfill,
            memory_limit,
            tables_file: std::sync::Arc::new(tables_file),
        })
    }
}

/// The least `MEMORY_LIMIT_MB` taken: below it the process's own fixed memory (about 25 MiB) leaves
/// no room for pages.
const MIN_MEMORY_LIMIT_MB: u64 = 48;

/// `MEMORY_LIMIT_MB`: unset (the cgroup's limit), `0` (no budget) or a limit in MiB.
fn memory_limit(check: &mut Checker, text: &str) -> crate::memory::limit::Setting {
    use crate::memory::limit::Setting;
    match text.trim() {
        "" => Setting::Detect,
        "0" => Setting::Off,
        text => {
            // Up to 16 TiB.
            let mib = check.number("MEMORY_LIMIT_MB", text, MIN_MEMORY_LIMIT_MB, 1 << 24);
            Setting::Bytes(mib << 20)
        }
    }
}

/// The host name (`HOSTNAME`, then `/etc/hostname`), which on Kubernetes is the pod name.
fn default_replica_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned())
}

impl Config {
    /// The subject a table's events are published on: `.` and ` ` in the name become `_`.
    pub fn subject_for(&self, table: &str) -> String {
        subject_for(&self.subject_prefix, table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags parsed from `--{flag}={value}` pairs, as the binary would parse them, with an empty
    /// environment (whatever the test process's own holds).
    pub(super) fn args(pairs: &[(&str, &str)]) -> Args {
        let mut argv = vec!["dynamodb-stream-consumer".to_owned()];
        for (flag, value) in pairs {
            argv.push(format!("--{flag}={value}"));
        }
        Args::parse_with_env(argv, |_| None).expect("flags parse")
    }

    #[test]
    fn a_bad_tables_file_stops_start_up_naming_the_table_the_setting_and_why() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tables.yaml");
        std::fs::write(&path, "tables:\n  orders:\n    ttl_deletes: flag\n    subject: '{prefix}.{nope}'\n").unwrap();
        let file = path.display().to_string();
        let err = args(&[("dynamodb-tables", "orders"), ("tables-file", &file)]).validate().expect_err("bad");
        let text = err.to_string();
        assert!(text.contains(&format!("TABLES_FILE: {file}: table \"orders\", setting `subject`:")), "{text}");
        assert!(text.contains("{nope}"), "{text}");
        let missing = args(&[("dynamodb-tables", "orders"), ("tables-file", "/nonexistent/t.yaml")]).validate();
        assert!(missing.expect_err("missing").to_string().contains("cannot read /nonexistent/t.yaml"));
        std::fs::write(&path, "tables:\n  orders:\n    ttl_deletes: flag\n").unwrap();
        let config = args(&[("dynamodb-tables", "orders"), ("tables-file", &file)]).validate().expect("valid");
        assert_eq!(config.tables_file.effective("orders").ttl_deletes, crate::tables::TtlDeletes::Flag);
        let none = args(&[("dynamodb-tables", "orders")]).validate().expect("valid");
        assert!(none.tables_file.is_empty(), "no file: no settings, today's behaviour");
    }

    #[test]
    fn the_idle_backoff_cap_follows_the_poll_interval_and_is_never_below_it() {
        let config = args(&[("dynamodb-tables", "orders"), ("poll-interval-ms", "200")]).validate().expect("valid");
        assert_eq!(config.idle_poll_max, Duration::from_millis(200));
        let capped = args(&[("dynamodb-tables", "orders"), ("idle-poll-max-ms", "30000")]).validate().expect("valid");
        assert_eq!(capped.idle_poll_max, Duration::from_secs(30));
        let error = args(&[("dynamodb-tables", "orders"), ("idle-poll-max-ms", "500")]).validate().unwrap_err();
        assert!(
            error.to_string().contains("IDLE_POLL_MAX_MS: 500 ms is less than POLL_INTERVAL_MS (1000 ms)"),
            "{error}"
        );
    }

    #[test]
    fn seed_defaults_are_kept() {
        let config = args(&[("dynamodb-tables", "orders")]).validate().expect("valid");
        assert_eq!(config.tables, ["orders"]);
        assert_eq!(config.aws_region, "us-west-2");
        assert_eq!(config.nats_urls, ["nats://localhost:4222"]);
        assert_eq!(config.stream_name, "dynamodb_streams");
        assert_eq!(config.subject_prefix, "dynamodb_streams");
        assert_eq!(config.bucket, "dynamodb-stream-checkpoints");
        assert!(!config.start_from_latest);
        assert_eq!(config.poll_interval, Duration::from_millis(1000));
        assert_eq!(config.idle_poll_max, config.poll_interval, "no idle backoff unless asked for");
        assert_eq!(config.shard_refresh_interval, Duration::from_secs(10));
        assert_eq!(config.port, 8080);
        assert_eq!(config.bind, IpAddr::V6(Ipv6Addr::UNSPECIFIED), "`*`: IPv6 and IPv4");
        assert!(!config.debug);
        assert_eq!(config.lease.ttl, Duration::from_secs(10));
        assert_eq!(config.lease.renew_interval, Duration::from_secs(10) / 3);
        assert_eq!(config.lease.max_leases, None);
    }

    #[test]
    fn every_bad_variable_is_named_in_one_error() {
        let error = args(&[
            ("dynamodb-tables", "ok_table,x"),
            ("poll-interval-ms", "soon"),
            ("port", "70000"),
            ("start-from-latest", "maybe"),
            ("checkpoint-bucket", "a.b"),
            ("log-format", "xml"),
        ])
        .validate()
        .expect_err("invalid");
        let named: Vec<&str> = error.0.iter().map(|(v, _)| *v).collect();
        assert_eq!(
            named,
            ["DYNAMODB_TABLES", "CHECKPOINT_BUCKET", "START_FROM_LATEST", "POLL_INTERVAL_MS", "PORT", "LOG_FORMAT"]
        );
        let text = error.to_string();
        assert!(text.contains("\"soon\" is not a whole number"), "{text}");
    }

    #[test]
    fn memory_limit_is_detected_set_in_mib_or_off() {
        use crate::memory::limit::Setting;
        let limit = |value: &str| args(&[("dynamodb-tables", "orders"), ("memory-limit-mb", value)]).validate();
        assert_eq!(limit("").expect("valid").memory_limit, Setting::Detect);
        assert_eq!(limit("0").expect("valid").memory_limit, Setting::Off);
        assert_eq!(limit(" 256 ").expect("valid").memory_limit, Setting::Bytes(256 << 20));
        for bad in ["lots", "-1", "12", "1.5"] {
            let error = limit(bad).expect_err(bad);
            assert_eq!(error.0[0].0, "MEMORY_LIMIT_MB", "{bad}");
        }
        assert!(limit("12").expect_err("too small").to_string().contains("out of range 48"));
    }

    #[test]
    fn tables_are_required() {
        let error = args(&[]).validate().expect_err("tables missing");
        assert_eq!(error.0[0].0, "DYNAMODB_TABLES");
        assert!(error.0[0].1.contains("required"));
    }

    #[test]
    fn several_nats_urls_and_bind_forms() {
        let config = args(&[
            ("dynamodb-tables", "t1a, t2b"),
            ("nats-url", "nats://a:4222, nats://b:4222"),
            ("bind", "127.0.0.1"),
        ])
        .validate()
        .expect("valid");
        assert_eq!(config.tables, ["t1a", "t2b"]);
        assert_eq!(config.nats_urls.len(), 2);
        assert_eq!(config.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
