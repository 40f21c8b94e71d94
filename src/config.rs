//! Every setting of the service: its environment variable, its flag, its default and its validation.
//!
//! The seed's variables keep their names and defaults. Every value arrives as text (from the
//! environment or a flag) and is checked in [`Args::validate`], which reports *every* bad variable in
//! one error instead of stopping at the first: an operator fixes a deployment in one round trip.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// GetRecords returns at most 1000 records per call (DynamoDB Streams API limit).
pub const MAX_RECORDS_PER_CALL: i32 = 1000;

/// Command-line flags, each backed by the environment variable named in `--help`.
#[derive(Debug, Clone, Parser)]
#[command(name = "dynamodb-stream-consumer", version, about, long_about = None)]
pub struct Args {
    /// Comma-separated DynamoDB table names to read the streams of
    #[arg(long, env = "DYNAMODB_TABLES", default_value = "")]
    pub dynamodb_tables: String,
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
    #[arg(long, env = "PORT", default_value = "8080")]
    pub port: String,
    /// Interface to bind the HTTP server on (`*` for all)
    #[arg(long, env = "BIND", default_value = "*")]
    pub bind: String,
    /// Enable debug logging
    #[arg(long, env = "DEBUG", default_value = "false")]
    pub debug: String,
    /// Log format: `text` or `json`
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
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
    pub tables: Vec<String>,
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
}

/// A secret setting (password, token): its `Debug` never shows the value, so neither a logged
/// configuration nor logged flags can leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Takes the value exactly as given (surrounding blanks may be part of a password).
    fn parse(text: &str) -> Result<Secret, std::convert::Infallible> {
        Ok(Secret(text.to_owned()))
    }

    /// The value, for the one place that hands it to the NATS client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// NATS authentication: at most one mode, as the server accepts one identity per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (a server without authorization).
    None,
    /// `NATS_CREDS_FILE`: a user JWT and its NKey seed (decentralized, operator-mode auth).
    CredsFile(PathBuf),
    /// `NATS_NKEY_SEED_FILE`: a user NKey seed; the server lists the public key.
    NkeySeedFile(PathBuf),
    /// `NATS_USER` and `NATS_PASSWORD`.
    UserPassword { user: String, password: Secret },
    /// `NATS_TOKEN`.
    Token(Secret),
}

impl NatsAuth {
    /// The mode's name, for logs (never a secret).
    pub fn mode(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::CredsFile(_) => "credentials file",
            NatsAuth::NkeySeedFile(_) => "nkey",
            NatsAuth::UserPassword { .. } => "user and password",
            NatsAuth::Token(_) => "token",
        }
    }

    /// The variables that configure this mode, for messages that tell an operator what to fix.
    pub fn variables(&self) -> &'static str {
        match self {
            NatsAuth::None => {
                "no credentials are configured (set NATS_CREDS_FILE, NATS_NKEY_SEED_FILE, NATS_USER and NATS_PASSWORD, or NATS_TOKEN)"
            }
            NatsAuth::CredsFile(_) => "NATS_CREDS_FILE",
            NatsAuth::NkeySeedFile(_) => "NATS_NKEY_SEED_FILE",
            NatsAuth::UserPassword { .. } => "NATS_USER and NATS_PASSWORD",
            NatsAuth::Token(_) => "NATS_TOKEN",
        }
    }
}

/// TLS towards NATS. TLS is required as soon as a CA or a client certificate is configured (or a
/// URL uses the `tls://` scheme); without a CA file the system's trusted roots are used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// `NATS_TLS_CA_FILE`: the only roots trusted for the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// `NATS_TLS_CERT_FILE` and `NATS_TLS_KEY_FILE`: the client certificate for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// True when this configuration asks for TLS.
    pub fn required(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some()
    }
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

/// Collects problems while each setting is parsed.
#[derive(Default)]
struct Checker(Vec<(&'static str, String)>);

impl Checker {
    fn fail(&mut self, variable: &'static str, reason: impl Into<String>) {
        self.0.push((variable, reason.into()));
    }

    fn bool(&mut self, variable: &'static str, text: &str) -> bool {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            _ => {
                self.fail(variable, format!("{text:?} is not a boolean (use true or false)"));
                false
            }
        }
    }

    /// A whole number in `min..=max`.
    fn number(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> u64 {
        match text.trim().parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => value,
            Ok(value) => {
                self.fail(variable, format!("{value} is out of range {min}..={max}"));
                min
            }
            Err(_) => {
                self.fail(variable, format!("{text:?} is not a whole number"));
                min
            }
        }
    }

    fn millis(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.number(variable, text, min, max))
    }

    fn secs(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> Duration {
        Duration::from_secs(self.number(variable, text, min, max))
    }

    /// An optional path to a regular, readable file whose text passes `looks_right` (which returns
    /// what is wrong with it). Only the path is kept: secrets are read again where they are used.
    fn file(
        &mut self,
        variable: &'static str,
        text: &str,
        looks_right: fn(&str) -> Result<(), String>,
    ) -> Option<PathBuf> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let path = PathBuf::from(text);
        let problem = match std::fs::metadata(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_owned()),
            Err(err) => Some(format!("cannot be inspected: {err}")),
            Ok(meta) if !meta.is_file() => Some("is not a regular file".to_owned()),
            Ok(_) => match std::fs::read(&path) {
                Err(err) => Some(format!("cannot be read: {err}")),
                Ok(bytes) => match String::from_utf8(bytes) {
                    Err(_) => Some("is not a text (PEM) file".to_owned()),
                    Ok(contents) => looks_right(&contents).err(),
                },
            },
        };
        match problem {
            Some(problem) => {
                self.fail(variable, format!("{}: {problem}", path.display()));
                None
            }
            None => Some(path),
        }
    }
}

/// A credentials file as `nsc` writes it, parsed as the client will parse it (JWT and seed).
fn check_creds(contents: &str) -> Result<(), String> {
    async_nats::ConnectOptions::with_credentials(contents)
        .map(drop)
        .map_err(|err| format!("not a NATS credentials file ({err})"))
}

/// One user NKey seed: `SU` and 56 more characters of base32 (58 in all). The checksum is checked
/// when the client signs the server's challenge, which then fails start-up with a clear message.
fn check_nkey_seed(contents: &str) -> Result<(), String> {
    let seed = contents.trim();
    let base32 = |c: char| c.is_ascii_uppercase() || ('2'..='7').contains(&c);
    if seed.len() == 58 && seed.starts_with("SU") && seed.chars().all(base32) {
        Ok(())
    } else {
        Err("does not hold a single user NKey seed (58 characters starting with `SU`)".to_owned())
    }
}

fn check_certificates(contents: &str) -> Result<(), String> {
    if contents.contains("-----BEGIN CERTIFICATE-----") {
        Ok(())
    } else {
        Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned())
    }
}

fn check_private_key(contents: &str) -> Result<(), String> {
    if contents.lines().any(|line| line.starts_with("-----BEGIN") && line.ends_with("PRIVATE KEY-----")) {
        Ok(())
    } else {
        Err("holds no PEM private key (-----BEGIN … PRIVATE KEY-----)".to_owned())
    }
}

/// DynamoDB table names: 3 to 255 characters of `a-z A-Z 0-9 _ - .`.
pub fn is_valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A NATS subject made of literal tokens only: no wildcards, no empty tokens, no white space.
fn is_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
        })
}

/// JetStream stream names may not contain white space, `.`, `*`, `>`, path separators.
fn is_valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

/// KV bucket names: `[a-zA-Z0-9_-]+`.
fn is_valid_bucket_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

impl Args {
    /// Checks every setting and returns the configuration, or every problem at once.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut check = Checker::default();

        let mut tables: Vec<String> = Vec::new();
        for name in self.dynamodb_tables.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !is_valid_table_name(name) {
                check.fail(
                    "DYNAMODB_TABLES",
                    format!("{name:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"),
                );
            } else if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
                // `{table}.{shard}` would not be a legal KV key, so no checkpoint could be written.
                check.fail(
                    "DYNAMODB_TABLES",
                    format!("{name:?}: a leading, trailing or doubled dot cannot form a checkpoint key"),
                );
            } else if tables.iter().any(|t| t == name) {
                check.fail("DYNAMODB_TABLES", format!("{name:?} is listed twice"));
            } else {
                tables.push(name.to_owned());
            }
        }
        if tables.is_empty() && check.0.iter().all(|(v, _)| *v != "DYNAMODB_TABLES") {
            check.fail("DYNAMODB_TABLES", "required: a comma-separated list of table names");
        }

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

        let nats_urls: Vec<String> =
            self.nats_url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        if nats_urls.is_empty() {
            check.fail("NATS_URL", "must name at least one server");
        }
        for url in &nats_urls {
            if url.parse::<async_nats::ServerAddr>().is_err() {
                check.fail("NATS_URL", format!("{url:?} is not a NATS server address"));
            }
        }

        let nats_auth = nats_auth(&mut check, self, &nats_urls);
        let nats_tls = nats_tls(&mut check, self);

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

        let lease = lease_config(&mut check, self, &replica_id, &tables);

        let port = check.number("PORT", &self.port, 0, u16::MAX.into()) as u16;
        let bind = match self.bind.trim() {
            "*" | "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            text => text.trim_matches(['[', ']']).parse().unwrap_or_else(|_| {
                check.fail("BIND", format!("{text:?} is not an IP address or '*'"));
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }),
        };
        let debug = check.bool("DEBUG", &self.debug);
        let log_format = match self.log_format.trim().to_ascii_lowercase().as_str() {
            "text" | "" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                check.fail("LOG_FORMAT", format!("{other:?} is not `text` or `json`"));
                LogFormat::Text
            }
        };

        if !check.0.is_empty() {
            return Err(ConfigError(check.0));
        }
        Ok(Config {
            tables,
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
        })
    }
}

/// The NATS authentication mode: at most one of credentials file, NKey seed file, user and password,
/// token (credentials in a `NATS_URL` count as one); a user needs a password and a password a user.
fn nats_auth(check: &mut Checker, args: &Args, urls: &[String]) -> NatsAuth {
    let creds = check.file("NATS_CREDS_FILE", &args.nats_creds_file, check_creds);
    let seed = check.file("NATS_NKEY_SEED_FILE", &args.nats_nkey_seed_file, check_nkey_seed);
    let user = args.nats_user.trim();
    let (password, token) = (args.nats_password.expose(), args.nats_token.expose());
    if !user.is_empty() && password.is_empty() {
        check.fail("NATS_PASSWORD", "required with NATS_USER");
    }
    if user.is_empty() && !password.is_empty() {
        check.fail("NATS_USER", "required with NATS_PASSWORD");
    }
    let modes: Vec<&'static str> = [
        (!args.nats_creds_file.trim().is_empty()).then_some("NATS_CREDS_FILE"),
        (!args.nats_nkey_seed_file.trim().is_empty()).then_some("NATS_NKEY_SEED_FILE"),
        (!user.is_empty() || !password.is_empty()).then_some("NATS_USER/NATS_PASSWORD"),
        (!token.is_empty()).then_some("NATS_TOKEN"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if modes.len() > 1 {
        let variable = if modes[0] == "NATS_USER/NATS_PASSWORD" { "NATS_USER" } else { modes[0] };
        check.fail(
            variable,
            format!(
                "{} are set together; choose one NATS authentication mode (credentials file, NKey seed file, user and password, or token)",
                modes.join(", ")
            ),
        );
    }
    if !modes.is_empty() && urls.iter().any(|url| redact_url(url) != *url) {
        check.fail(
            "NATS_URL",
            format!("carries credentials (…@host) while {} is set; keep them in one place", modes[0]),
        );
    }
    if let Some(path) = creds {
        NatsAuth::CredsFile(path)
    } else if let Some(path) = seed {
        NatsAuth::NkeySeedFile(path)
    } else if !user.is_empty() && !password.is_empty() {
        NatsAuth::UserPassword { user: user.to_owned(), password: args.nats_password.clone() }
    } else if !token.is_empty() {
        NatsAuth::Token(args.nats_token.clone())
    } else {
        NatsAuth::None
    }
}

/// The TLS files: each must be a readable PEM file; a client certificate needs its key and a key
/// its certificate.
fn nats_tls(check: &mut Checker, args: &Args) -> NatsTls {
    let ca_file = check.file("NATS_TLS_CA_FILE", &args.nats_tls_ca_file, check_certificates);
    let (cert_set, key_set) = (!args.nats_tls_cert_file.trim().is_empty(), !args.nats_tls_key_file.trim().is_empty());
    let cert = check.file("NATS_TLS_CERT_FILE", &args.nats_tls_cert_file, check_certificates);
    let key = check.file("NATS_TLS_KEY_FILE", &args.nats_tls_key_file, check_private_key);
    if cert_set && !key_set {
        check.fail("NATS_TLS_KEY_FILE", "required with NATS_TLS_CERT_FILE (the client certificate's private key)");
    }
    if key_set && !cert_set {
        check.fail("NATS_TLS_CERT_FILE", "required with NATS_TLS_KEY_FILE (the client certificate)");
    }
    NatsTls { ca_file, client_cert: cert.zip(key) }
}

/// A NATS URL fit for logs: `nats://user:secret@host` becomes `nats://***@host`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let Some((_, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    let path = path.map(|p| format!("/{p}")).unwrap_or_default();
    format!("{scheme}***@{host}{path}")
}

/// The lease settings: TTL, renew interval (TTL/3 unless set) and cap, checked against the fencing
/// argument of `coordination/DESIGN.md` (a renewal must fit well before the guard's deadline).
fn lease_config(check: &mut Checker, args: &Args, replica_id: &str, tables: &[String]) -> coordination::Config {
    // Below 2 s the safety margin (TTL/5) would not cover one publish batch.
    let ttl = check.secs("LEASE_TTL_SEC", &args.lease_ttl_sec, 2, 3_600);
    let mut lease = coordination::Config::new(replica_id, ttl);
    // Replicas share leases only with peers that read the same tables (coordination/DESIGN.md,
    // "Groups"): deployments with other table lists in the same bucket, or the other side of a rolling
    // change of this list, do not lower this replica's share.
    lease.group = table_set_fingerprint(tables);
    if !args.lease_renew_interval_ms.trim().is_empty() {
        let renew = check.millis("LEASE_RENEW_INTERVAL_MS", &args.lease_renew_interval_ms, 100, 3_600_000);
        lease.renew_interval = renew;
        lease.poll_interval = renew / 2;
    }
    if !args.max_leases.trim().is_empty() {
        lease.max_leases = Some(check.number("MAX_LEASES", &args.max_leases, 1, 1_000_000) as usize);
    }
    let settings_ok = !check.0.iter().any(|(v, _)| v.starts_with("LEASE_") || *v == "MAX_LEASES");
    if settings_ok && let Err(err) = lease.validate() {
        check.fail("LEASE_RENEW_INTERVAL_MS", format!("{} (with LEASE_TTL_SEC {})", err.0, ttl.as_secs()));
    }
    lease
}

/// The lease group of a table list: 16 hex digits of FNV-1a 64 over the sorted, distinct names, each
/// followed by a NUL byte (which no table name contains, so `["ab"]` and `["a", "b"]` differ).
/// Written out here rather than taken from `std`'s `DefaultHasher`, whose output may change between
/// Rust versions: replicas built by different compilers meet in a rolling upgrade and must agree.
pub fn table_set_fingerprint(tables: &[String]) -> String {
    // FNV-1a 64 parameters (Fowler, Noll, Vo: the 64-bit offset basis and prime).
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let names: BTreeSet<&str> = tables.iter().map(String::as_str).collect();
    let bytes = names.into_iter().flat_map(|name| name.bytes().chain([0]));
    let hash = bytes.fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    format!("{hash:016x}")
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

/// `{prefix}.{table}` with `.` and ` ` in the table name mapped to `_` (the seed's rule).
pub fn subject_for(prefix: &str, table: &str) -> String {
    format!("{prefix}.{}", table.replace(['.', ' '], "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> Args {
        let mut argv = vec!["dynamodb-stream-consumer".to_owned()];
        for (flag, value) in pairs {
            argv.push(format!("--{flag}={value}"));
        }
        Args::try_parse_from(argv).expect("flags parse")
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
        assert_eq!(config.shard_refresh_interval, Duration::from_secs(10));
        assert_eq!(config.port, 8080);
        assert_eq!(config.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(!config.debug);
        assert_eq!(config.lease.ttl, Duration::from_secs(10));
        assert_eq!(config.lease.renew_interval, Duration::from_secs(10) / 3);
        assert_eq!(config.lease.max_leases, None);
    }

    #[test]
    fn a_renew_interval_that_breaks_fencing_is_refused() {
        let error = args(&[("dynamodb-tables", "orders"), ("lease-ttl-sec", "3"), ("lease-renew-interval-ms", "2500")])
            .validate()
            .expect_err("renewal cannot fit");
        assert_eq!(error.0[0].0, "LEASE_RENEW_INTERVAL_MS", "{error}");
        let config = args(&[("dynamodb-tables", "orders"), ("lease-ttl-sec", "3"), ("max-leases", "4")])
            .validate()
            .expect("valid");
        assert_eq!(config.lease.max_leases, Some(4));
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
    fn tables_are_required() {
        let error = args(&[]).validate().expect_err("tables missing");
        assert_eq!(error.0[0].0, "DYNAMODB_TABLES");
        assert!(error.0[0].1.contains("required"));
    }

    #[test]
    fn table_set_fingerprint_ignores_order_and_duplicates() {
        let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<String>>();
        let orders = table_set_fingerprint(&list(&["orders", "customers"]));
        assert_eq!(orders, table_set_fingerprint(&list(&["customers", "orders"])));
        assert_eq!(orders, table_set_fingerprint(&list(&["customers", "orders", "customers"])));
        assert_ne!(orders, table_set_fingerprint(&list(&["orders"])));
        assert_ne!(table_set_fingerprint(&list(&["ab"])), table_set_fingerprint(&list(&["a", "b"])));
        // Pinned: replicas of another build must compute the same group, so a change of the algorithm
        // (which would split a fleet during its rolling upgrade) fails here.
        assert_eq!(table_set_fingerprint(&list(&["orders"])), "ddc04b9f33c6b224");
        assert_eq!(orders, "6b6a17171bbcbaa9");
        let config = args(&[("dynamodb-tables", "customers, orders")]).validate().expect("valid");
        assert_eq!(config.lease.group, orders);
    }

    #[test]
    fn subjects_map_dots_and_spaces() {
        assert_eq!(subject_for("dynamodb_streams", "my.table"), "dynamodb_streams.my_table");
        assert_eq!(subject_for("dynamodb_streams", "my-table"), "dynamodb_streams.my-table");
        assert_eq!(subject_for("p", "a b.c"), "p.a_b_c");
    }

    /// A file in `dir` with `contents`; returns its path as text.
    fn file_with(dir: &tempfile::TempDir, name: &str, contents: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write a test file");
        path.display().to_string()
    }

    /// A seed in the right shape (from async-nats' documentation; its checksum is valid).
    const SEED: &str = "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM";
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

    fn creds(seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.sig\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    }

    #[test]
    fn each_nats_authentication_mode_is_accepted_and_secrets_stay_out_of_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let with = |pairs: &[(&str, &str)]| {
            let mut all = vec![("dynamodb-tables", "orders")];
            all.extend_from_slice(pairs);
            args(&all).validate().expect("valid")
        };
        assert_eq!(with(&[]).nats_auth, NatsAuth::None);
        let config = with(&[("nats-user", "svc"), ("nats-password", "s3cret pass")]);
        let NatsAuth::UserPassword { user, password } = &config.nats_auth else { panic!("{:?}", config.nats_auth) };
        assert_eq!((user.as_str(), password.expose()), ("svc", "s3cret pass"));
        assert!(!format!("{config:?}").contains("s3cret"), "Debug shows the password");
        let config = with(&[("nats-token", "t0ken-value")]);
        assert_eq!(config.nats_auth, NatsAuth::Token(Secret("t0ken-value".into())));
        assert!(!format!("{config:?}").contains("t0ken-value"), "Debug shows the token");
        let flags = args(&[("nats-token", "t0ken-value"), ("nats-password", "s3cret")]);
        assert!(!format!("{flags:?}").contains("t0ken-value") && !format!("{flags:?}").contains("s3cret"));
        let seed = file_with(&dir, "user.nk", &format!("{SEED}\n"));
        assert_eq!(with(&[("nats-nkey-seed-file", &seed)]).nats_auth, NatsAuth::NkeySeedFile(seed.clone().into()));
        let creds = file_with(&dir, "user.creds", &creds(SEED));
        assert_eq!(with(&[("nats-creds-file", &creds)]).nats_auth, NatsAuth::CredsFile(creds.clone().into()));

        let (ca, cert, key) =
            (file_with(&dir, "ca.pem", CERT), file_with(&dir, "c.pem", CERT), file_with(&dir, "k.pem", KEY));
        let config = with(&[("nats-tls-ca-file", &ca), ("nats-tls-cert-file", &cert), ("nats-tls-key-file", &key)]);
        assert!(config.nats_tls.required());
        assert_eq!(config.nats_tls.ca_file, Some(ca.into()));
        assert_eq!(config.nats_tls.client_cert, Some((cert.into(), key.into())));
        assert!(!with(&[]).nats_tls.required());
    }

    #[test]
    fn contradictory_or_incomplete_nats_settings_name_their_variables() {
        let dir = tempfile::tempdir().expect("temp dir");
        let refuse = |pairs: &[(&str, &str)]| {
            let mut all = vec![("dynamodb-tables", "orders")];
            all.extend_from_slice(pairs);
            args(&all).validate().expect_err("invalid")
        };
        let error = refuse(&[("nats-user", "svc")]);
        assert_eq!(error.0[0].0, "NATS_PASSWORD", "{error}");
        let error = refuse(&[("nats-password", "pw")]);
        assert_eq!(error.0[0].0, "NATS_USER", "{error}");
        let error = refuse(&[("nats-user", "svc"), ("nats-password", "pw-9f3k"), ("nats-token", "tok-7q2z")]);
        let text = error.to_string();
        assert!(text.contains("NATS_USER/NATS_PASSWORD, NATS_TOKEN are set together"), "{text}");
        assert!(!text.contains("pw-9f3k") && !text.contains("tok-7q2z"), "a secret is in the message: {text}");
        let seed = file_with(&dir, "user.nk", SEED);
        let creds = file_with(&dir, "user.creds", &creds(SEED));
        let error = refuse(&[("nats-creds-file", &creds), ("nats-nkey-seed-file", &seed)]);
        assert_eq!(error.0[0].0, "NATS_CREDS_FILE", "{error}");
        assert!(error.to_string().contains("NATS_NKEY_SEED_FILE"), "{error}");
        let error = refuse(&[("nats-url", "nats://u:p@127.0.0.1:4222"), ("nats-token", "tok")]);
        assert_eq!(error.0[0].0, "NATS_URL", "{error}");

        let cert = file_with(&dir, "c.pem", CERT);
        let key = file_with(&dir, "k.pem", KEY);
        let error = refuse(&[("nats-tls-cert-file", &cert)]);
        assert_eq!(error.0[0].0, "NATS_TLS_KEY_FILE", "{error}");
        let error = refuse(&[("nats-tls-key-file", &key)]);
        assert_eq!(error.0[0].0, "NATS_TLS_CERT_FILE", "{error}");
    }

    #[test]
    fn nats_files_must_exist_be_readable_and_hold_what_they_should() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("absent.creds").display().to_string();
        let directory = dir.path().display().to_string();
        let not_a_seed = file_with(&dir, "bad.nk", "SUshort");
        let not_creds = file_with(&dir, "bad.creds", "user=svc");
        let bad_checksum = file_with(&dir, "crc.creds", &creds(&SEED.replace("SUA", "SUB")));
        let not_pem = file_with(&dir, "ca.txt", "not a certificate");
        let error = args(&[
            ("dynamodb-tables", "orders"),
            ("nats-creds-file", &missing),
            ("nats-tls-ca-file", &not_pem),
            ("nats-tls-cert-file", &directory),
            ("nats-tls-key-file", &not_pem),
        ])
        .validate()
        .expect_err("invalid");
        let named: Vec<&str> = error.0.iter().map(|(v, _)| *v).collect();
        assert_eq!(named, ["NATS_CREDS_FILE", "NATS_TLS_CA_FILE", "NATS_TLS_CERT_FILE", "NATS_TLS_KEY_FILE"]);
        let text = error.to_string();
        assert!(text.contains(&format!("{missing}: does not exist")), "{text}");
        assert!(text.contains("is not a regular file"), "{text}");
        assert!(text.contains("holds no PEM certificate"), "{text}");
        assert!(text.contains("holds no PEM private key"), "{text}");
        for (flag, path, expected) in [
            ("nats-nkey-seed-file", &not_a_seed, "does not hold a single user NKey seed"),
            ("nats-creds-file", &not_creds, "not a NATS credentials file"),
            ("nats-creds-file", &bad_checksum, "not a NATS credentials file"),
        ] {
            let error = args(&[("dynamodb-tables", "orders"), (flag, path)]).validate().expect_err("invalid");
            assert!(error.to_string().contains(expected), "{flag}: {error}");
        }
    }

    #[test]
    fn urls_lose_their_credentials_in_logs() {
        assert_eq!(redact_url("nats://u:p@127.0.0.1:4222"), "nats://***@127.0.0.1:4222");
        assert_eq!(redact_url("tls://token@nats.example.com:4222/x"), "tls://***@nats.example.com:4222/x");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
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
