//! `streams-fault`: the fault-injecting DynamoDB Streams endpoint as a server of its own, so anyone can
//! run the service against thousands of shards that split and roll over, with no AWS account.
//!
//! ```text
//! cargo run -p streams-emulator --bin streams-fault -- --tables 3 --shards-per-table 4000 --rollover-every 10s
//! ```
//!
//! It serves [`FaultyStreams`] on 127.0.0.1 and creates `--tables` tables named `{prefix}-{i}` (key
//! `pk`, `NEW_AND_OLD_IMAGES` streams) of `--shards-per-table` open shards each. It prints one `#` line
//! per table, then the environment that points the service at it (so its stdout is an env file), and
//! until SIGINT or SIGTERM (exit code 0) changes the tables on timers, logging each change to stderr:
//!
//! - `--port N`: where to listen, always on 127.0.0.1 (default 8000; 0 lets the OS pick a free port);
//! - `--tables N` (default 1), `--table-prefix NAME` (default `table`), `--shards-per-table N` (default 1);
//! - `--rollover-every DURATION`: every open shard closes, each with one child (default never);
//! - `--split-every DURATION`: one open shard per table splits into two children (default never);
//! - `--writes-per-sec N`: items written at that rate, spread over the tables (default 0);
//! - `--retain DURATION`: a closed shard is dropped this long after it closed, as DynamoDB stops listing
//!   it after 24 hours (default `24h`);
//! - `--page-size N`: at most N shards per `DescribeStream` page (1 to 100, DynamoDB's maximum).
//!
//! A DURATION is a whole number with a unit: `500ms`, `10s`, `5m`, `4h`, `1d`. A bad flag is one line on
//! stderr and exit code 2; a port that cannot be bound, exit code 1.
//!
//! Memory: a table lists its open shards and those closed within `--retain`, so with a roll-over every
//! `R` about `shards × (1 + retain / R)` of them, at about [`SHARD_BYTES`] each; the start-up log says
//! how many that makes. Each split adds an open shard for good. Records stay until their shard is
//! dropped, so with `--writes-per-sec` and no roll-overs memory grows with every write.

mod options;

use std::fmt::Display;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use streams_emulator::{FaultyStreams, REGION, ViewType};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use options::{Invocation, Options, USAGE, UsageError, every, human, parse_args};

/// The key attribute of every table.
const KEY: &str = "pk";

/// The credentials the service should use: the endpoint ignores signatures, the SDK wants some.
const CREDENTIALS: &str = "test";

/// Distinct items the writer uses per table: their current images are all a table keeps, so item state
/// stays small in a long run, and once each was inserted further writes are `MODIFY`s.
const ITEMS_PER_TABLE: u64 = 10_000;

/// How often the writer catches up with its rate (it writes whatever is due since the start).
const WRITE_TICK: Duration = Duration::from_millis(20);

/// The longest wait between two sweeps for expired shards; a shorter `--retain` sweeps every tenth of it.
const MAX_SWEEP: Duration = Duration::from_secs(1);

/// What one listed shard without records costs, measured: resident memory grew by 24.6 MB while
/// 72 000 shards were added (3 tables × 4000 shards rolled over every 10 s for a minute), 350 bytes each
/// for the shard, its id, its parent's id and the vectors' spare room.
const SHARD_BYTES: u64 = 350;

/// Above this much estimated shard memory the start-up log warns and suggests a shorter `--retain`.
const MEMORY_WARNING_BYTES: u64 = 4 << 30;

fn milliseconds(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Writes to stdout; a closed stdout must not stop the endpoint.
fn print_out(text: &str) {
    let _ = io::stdout().lock().write_all(text.as_bytes());
}

/// Consecutive numbers to far-apart ones (Fibonacci hashing), for keys and shards picked "at random".
fn scramble(n: u64) -> u64 {
    n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

/// SIGINT and SIGTERM, listened for from the start so that a signal right after start-up is not the
/// default action (death without exit code 0).
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn listen() -> io::Result<Stop> {
        Ok(Stop { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    async fn signalled(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Changes the tables on timers (roll-overs, splits, writes, dropping expired shards) until a signal.
struct Driver {
    streams: FaultyStreams,
    tables: Vec<String>,
    options: Options,
    started: Instant,
    writes: u64,
    splits: u64,
}

impl Driver {
    async fn run(mut self, mut stop: Stop) {
        let mut rollover = timer(self.options.rollover_every);
        let mut split = timer(self.options.split_every);
        let mut write = timer((self.options.writes_per_sec > 0).then_some(WRITE_TICK));
        let mut sweep = timer(Some((self.options.retain / 10).min(MAX_SWEEP)));
        loop {
            tokio::select! {
                signal = stop.signalled() => {
                    self.log(format_args!("{signal}: stopping after {} records written", self.writes));
                    return;
                }
                () = tick(&mut rollover) => self.roll_over(),
                () = tick(&mut split) => self.split(),
                () = tick(&mut write) => self.write_due(),
                () = tick(&mut sweep) => self.drop_expired(),
            }
        }
    }

    fn roll_over(&self) {
        let began = Instant::now();
        let closed: usize = self.tables.iter().map(|table| self.streams.roll_over(table).len()).sum();
        let took = milliseconds(began.elapsed());
        self.log(format_args!("rolled over {closed} shards (each closed with one child) in {took}; {}", self.totals()));
    }

    /// Splits one open shard of each table, a different one each time.
    fn split(&mut self) {
        let began = Instant::now();
        for table in &self.tables {
            let open = self.streams.open_shards(table);
            if let Some(shard) = open.get(scramble(self.splits) as usize % open.len().max(1)) {
                self.streams.split(table, shard);
            }
        }
        self.splits += 1;
        let took = milliseconds(began.elapsed());
        self.log(format_args!("split {} shards (one per table) in {took}; {}", self.tables.len(), self.totals()));
    }

    /// Writes every item due by now at `--writes-per-sec` since the start.
    fn write_due(&mut self) {
        let due = (f64::from(self.options.writes_per_sec) * self.started.elapsed().as_secs_f64()) as u64;
        while self.writes < due {
            let tables = self.tables.len() as u64;
            let table = &self.tables[(self.writes % tables) as usize];
            let item = scramble(self.writes / tables) % ITEMS_PER_TABLE;
            self.streams.write(table, &format!("item-{item}"), Some(json!({ "n": { "N": self.writes.to_string() } })));
            self.writes += 1;
        }
    }

    fn drop_expired(&self) {
        let began = Instant::now();
        let dropped = self.streams.drop_closed_shards(self.options.retain);
        if dropped > 0 {
            let (retain, took) = (human(self.options.retain), milliseconds(began.elapsed()));
            self.log(format_args!("dropped {dropped} shards closed over {retain} ago in {took}; {}", self.totals()));
        }
    }

    fn totals(&self) -> String {
        let listed: usize = self.tables.iter().map(|table| self.streams.listed_shards(table)).sum();
        format!("{listed} shards listed, {} records written", self.writes)
    }

    /// One line on stderr, after the seconds since the start; a closed stderr must not stop the endpoint.
    fn log(&self, message: impl Display) {
        let _ = writeln!(io::stderr().lock(), "[{:>8.1}s] {message}", self.started.elapsed().as_secs_f64());
    }
}

/// A timer that first fires one `period` from now, or none.
fn timer(period: Option<Duration>) -> Option<Interval> {
    period.map(|period| {
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        interval
    })
}

/// The next tick of `timer`; never, without one.
async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The table lines and the environment for the service, as printed at the start.
fn announcement(streams: &FaultyStreams, tables: &[String], options: &Options) -> String {
    let mut lines: Vec<String> = tables
        .iter()
        .map(|table| {
            format!("# {table}: {} open shards, stream {}", options.shards_per_table, streams.stream_arn(table))
        })
        .collect();
    lines.push(format!(
        "# DynamoDB Streams on {}: roll-over {}, split {}, {} writes/s, closed shards kept {}",
        streams.endpoint(),
        every(options.rollover_every),
        every(options.split_every),
        options.writes_per_sec,
        human(options.retain),
    ));
    lines.push("# point the service at it with this environment (and NATS_URL):".to_owned());
    let environment = [
        ("AWS_ENDPOINT_URL", streams.endpoint()),
        ("AWS_REGION", REGION.to_owned()),
        ("AWS_ACCESS_KEY_ID", CREDENTIALS.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", CREDENTIALS.to_owned()),
        ("DYNAMODB_TABLES", tables.join(",")),
    ];
    lines.extend(environment.into_iter().map(|(name, value)| format!("{name}={value}")));
    lines.join("\n") + "\n"
}

/// What the shards will cost once retention keeps pace, and whether records grow without bound.
fn memory_notes(options: &Options) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(shards) = options.steady_shards() {
        let bytes = shards.saturating_mul(SHARD_BYTES);
        let estimate = format!(
            "about {shards} shards listed once closed ones are dropped, about {:.1} MiB",
            bytes as f64 / f64::from(1 << 20)
        );
        notes.push(if bytes > MEMORY_WARNING_BYTES {
            format!("warning: {estimate}; a shorter --retain keeps fewer")
        } else {
            estimate
        });
    }
    if options.writes_per_sec > 0 && options.rollover_every.is_none() {
        notes.push(
            "records stay until their shard is dropped: without --rollover-every, memory grows with every write"
                .to_owned(),
        );
    }
    notes
}

async fn run(options: Options) -> Result<(), String> {
    let stop = Stop::listen().map_err(|err| format!("cannot listen for SIGINT and SIGTERM: {err}"))?;
    let streams = FaultyStreams::start_on(options.port)
        .await
        .map_err(|err| format!("cannot listen on 127.0.0.1:{}: {err}", options.port))?;
    if let Some(page) = options.page_size {
        streams.page_size(page);
    }
    let began = Instant::now();
    let tables = options.table_names();
    for table in &tables {
        streams.create_table_with_shards(table, KEY, ViewType::NewAndOldImages, options.shards_per_table);
    }
    let created = milliseconds(began.elapsed());
    print_out(&announcement(&streams, &tables, &options));
    let driver = Driver { streams, tables, options, started: began, writes: 0, splits: 0 };
    let shards = driver.options.shards_per_table * driver.tables.len();
    driver.log(format_args!("created {} tables with {shards} open shards in {created}", driver.tables.len()));
    memory_notes(&driver.options).iter().for_each(|note| driver.log(note));
    driver.run(stop).await;
    Ok(())
}

fn main() -> ExitCode {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| arg.into_string().map_err(|arg| UsageError(format!("argument {arg:?} is not valid UTF-8"))));
    let options = match args.collect::<Result<Vec<_>, _>>().and_then(parse_args) {
        Ok(Invocation::Run(options)) => options,
        Ok(Invocation::Help) => {
            print_out(USAGE);
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let _ = writeln!(io::stderr(), "streams-fault: {err}");
            return ExitCode::from(2);
        }
    };
    let outcome = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run(options)),
        Err(err) => Err(format!("cannot start the tokio runtime: {err}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr(), "streams-fault: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_estimate_counts_the_generations_retention_keeps() {
        let options = Options {
            tables: 3,
            shards_per_table: 4000,
            rollover_every: Some(Duration::from_secs(10)),
            retain: Duration::from_secs(60),
            ..Options::default()
        };
        assert_eq!(options.steady_shards(), Some(3 * 4000 * 7));
        assert_eq!(Options::default().steady_shards(), None, "without roll-overs only splits add shards");
        let day = Options { retain: Duration::from_secs(86_400), ..options };
        assert!(memory_notes(&day)[0].starts_with("warning: about 103692000 shards"), "{:?}", memory_notes(&day));
    }
}
