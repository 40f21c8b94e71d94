//! The command line of `streams-fault`: its flags, their defaults and their parsing.
//!
//! Takes `--flag value` and `--flag=value`; `--help` wins over everything. A mistake is one
//! [`UsageError`] line naming the flag (the binary exits 2 with it), never a panic.

use std::fmt::{self, Display};
use std::time::Duration;

pub(crate) const USAGE: &str = "\
usage: streams-fault [FLAG VALUE]...

A fault-injecting DynamoDB Streams endpoint on 127.0.0.1 whose tables have many shards that roll over
and split, to run the service against without AWS. Prints the environment that points the service at
it, then runs until SIGINT or SIGTERM.

  --port N                   port on 127.0.0.1 (default 8000; 0 picks a free one)
  --tables N                 how many tables (default 1)
  --table-prefix NAME        tables are NAME-0, NAME-1, ... (default table)
  --shards-per-table N       open shards per table at the start (default 1)
  --rollover-every DURATION  close every open shard, each with one child (default never)
  --split-every DURATION     split one open shard per table into two (default never)
  --writes-per-sec N         write items across the tables at this rate (default 0)
  --retain DURATION          drop shards closed longer ago than this (default 24h)
  --page-size N              shards per DescribeStream page, 1 to 100 (default 100)
  -h, --help                 print this text

DURATION is a whole number with a unit: 500ms, 10s, 5m, 4h, 1d.
";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub(crate) enum Invocation {
    Run(Options),
    Help,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) port: u16,
    pub(crate) tables: usize,
    pub(crate) table_prefix: String,
    pub(crate) shards_per_table: usize,
    pub(crate) rollover_every: Option<Duration>,
    pub(crate) split_every: Option<Duration>,
    pub(crate) writes_per_sec: u32,
    pub(crate) retain: Duration,
    pub(crate) page_size: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port: 8000,
            tables: 1,
            table_prefix: "table".to_owned(),
            shards_per_table: 1,
            rollover_every: None,
            split_every: None,
            writes_per_sec: 0,
            retain: Duration::from_secs(24 * 3600),
            page_size: None,
        }
    }
}

impl Options {
    pub(crate) fn table_names(&self) -> Vec<String> {
        (0..self.tables).map(|i| format!("{}-{i}", self.table_prefix)).collect()
    }

    /// About how many shards all tables list once retention keeps pace with the roll-overs.
    pub(crate) fn steady_shards(&self) -> Option<u64> {
        let generations = 1 + self.retain.as_millis().div_ceil(self.rollover_every?.as_millis());
        let per_table = self.shards_per_table as u128 * generations;
        u64::try_from(per_table * self.tables as u128).ok()
    }
}

/// A command-line mistake: printed as one line, exit code 2.
#[derive(Debug, PartialEq)]
pub(crate) struct UsageError(pub(crate) String);

impl Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads `--flag value` and `--flag=value` pairs; `--help` wins over everything.
pub(crate) fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Invocation, UsageError> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, mut inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg, None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(Invocation::Help);
        }
        let value = || inline.take().or_else(|| args.next()).ok_or_else(|| UsageError(format!("{flag} needs a value")));
        apply(&mut options, &flag, value)?;
    }
    Ok(Invocation::Run(options))
}

/// Sets the option `flag` names from its value (taken only once the flag is known).
fn apply(
    options: &mut Options,
    flag: &str,
    mut value: impl FnMut() -> Result<String, UsageError>,
) -> Result<(), UsageError> {
    match flag {
        "--port" => options.port = port(flag, &value()?)?,
        "--tables" => options.tables = count(flag, &value()?, 1, 10_000)?,
        "--table-prefix" => options.table_prefix = table_prefix(flag, &value()?)?,
        "--shards-per-table" => options.shards_per_table = count(flag, &value()?, 1, 1_000_000)?,
        "--rollover-every" => options.rollover_every = Some(duration(flag, &value()?)?),
        "--split-every" => options.split_every = Some(duration(flag, &value()?)?),
        "--writes-per-sec" => options.writes_per_sec = count(flag, &value()?, 0, 1_000_000)? as u32,
        "--retain" => options.retain = duration(flag, &value()?)?,
        "--page-size" => options.page_size = Some(count(flag, &value()?, 1, 100)?),
        _ => return Err(UsageError(format!("unknown flag {flag:?} (see --help)"))),
    }
    Ok(())
}

fn invalid(flag: &str, value: &str, expected: &str) -> UsageError {
    UsageError(format!("{flag} {value:?}: expected {expected}"))
}

fn port(flag: &str, value: &str) -> Result<u16, UsageError> {
    value.parse().map_err(|_| invalid(flag, value, "a port number from 0 to 65535"))
}

fn count(flag: &str, value: &str, min: usize, max: usize) -> Result<usize, UsageError> {
    let parsed = value.parse().ok().filter(|n| (min..=max).contains(n));
    parsed.ok_or_else(|| invalid(flag, value, &format!("a whole number from {min} to {max}")))
}

/// A prefix that makes valid DynamoDB table names (3 to 255 of `a-z A-Z 0-9 _ . -`) with `-{i}` added.
fn table_prefix(flag: &str, value: &str) -> Result<String, UsageError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if (2..=240).contains(&value.len()) && value.chars().all(allowed) {
        Ok(value.to_owned())
    } else {
        Err(invalid(flag, value, "2 to 240 of the characters a-z A-Z 0-9 _ . - (DynamoDB table names)"))
    }
}

/// `500ms`, `10s`, `5m`, `4h` or `1d`: a whole number above zero with a unit.
fn duration(flag: &str, value: &str) -> Result<Duration, UsageError> {
    let bad = || invalid(flag, value, "a duration above zero such as 500ms, 10s, 5m, 4h or 1d");
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let millis = number.checked_mul(millis_per_unit).filter(|millis| *millis > 0).ok_or_else(bad)?;
    Ok(Duration::from_millis(millis))
}

/// A duration in the largest unit that divides it, as the flags take it.
pub(crate) fn human(duration: Duration) -> String {
    let millis = duration.as_millis();
    let units = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    match units.into_iter().find(|(size, _)| millis.is_multiple_of(*size)) {
        Some((size, unit)) => format!("{}{unit}", millis / size),
        None => format!("{millis}ms"),
    }
}

pub(crate) fn every(period: Option<Duration>) -> String {
    period.map_or_else(|| "never".to_owned(), |period| format!("every {}", human(period)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, UsageError> {
        parse_args(args.iter().map(|arg| arg.to_string()))
    }

    fn error(args: &[&str]) -> String {
        match parse(args) {
            Err(UsageError(message)) => message,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_set_their_options_and_the_rest_keep_their_defaults() {
        let args = ["--tables", "3", "--shards-per-table=4000", "--rollover-every", "10s", "--page-size", "7"];
        let expected = Options {
            tables: 3,
            shards_per_table: 4000,
            rollover_every: Some(Duration::from_secs(10)),
            page_size: Some(7),
            ..Options::default()
        };
        assert_eq!(parse(&args), Ok(Invocation::Run(expected)));
        assert_eq!(parse(&["--port", "0", "--help"]), Ok(Invocation::Help));
        assert_eq!(Options::default().table_names(), ["table-0"]);
    }

    #[test]
    fn durations_take_a_unit_and_print_back_in_the_largest_one() {
        let parsed = |text: &str| duration("--retain", text);
        assert_eq!(parsed("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parsed("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parsed("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["10", "0s", "s", "-1s", "1.5s", "10 s", "99999999999999999d", ""] {
            assert!(parsed(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(human(Duration::from_secs(24 * 3600)), "1d");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_millis(300)), "300ms");
    }

    #[test]
    fn bad_flags_are_one_line_naming_the_flag() {
        assert_eq!(error(&["--bogus"]), "unknown flag \"--bogus\" (see --help)");
        assert_eq!(error(&["--port"]), "--port needs a value");
        assert!(error(&["--port", "70000"]).starts_with("--port \"70000\": expected a port number"));
        assert!(error(&["--tables", "0"]).starts_with("--tables \"0\": expected a whole number from 1"));
        assert!(error(&["--page-size", "101"]).starts_with("--page-size \"101\""));
        assert!(error(&["--table-prefix", "a b"]).starts_with("--table-prefix \"a b\""));
        assert!(error(&["--rollover-every=10"]).starts_with("--rollover-every \"10\": expected a duration"));
    }
}
