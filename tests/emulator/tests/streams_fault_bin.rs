#![allow(clippy::unwrap_used)]
//! The `streams-fault` binary run as a process and read through the real AWS SDK client: it prints the
//! environment that points the service at it, lists every open shard over several `DescribeStream`
//! pages, rolls shards over on its timer with children naming their closed parents, drops closed shards
//! after `--retain`, exits 0 on SIGTERM, and refuses a bad flag with one line and exit code 2.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodbstreams::types::Shard;
use test_support::wait_for;

const BINARY: &str = env!("CARGO_BIN_EXE_streams-fault");

/// Open shards per table: more than one `DescribeStream` page of 100.
const SHARDS: usize = 150;

/// How long the binary may take to start, or a change to show.
const DEADLINE: Duration = Duration::from_secs(30);

/// The binary with its output collected line by line on threads (so it never blocks on a full pipe);
/// killed when dropped.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let mut child = Command::new(BINARY).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (stdout, out_reader) = collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect(child.stderr.take().unwrap());
        Running { child, stdout, stderr, readers: vec![out_reader, err_reader] }
    }

    /// The `NAME=value` lines printed so far.
    fn environment(&self) -> BTreeMap<String, String> {
        let lines = self.stdout.lock().unwrap();
        let pairs = lines.iter().filter(|line| !line.starts_with('#')).filter_map(|line| line.split_once('='));
        pairs.map(|(name, value)| (name.to_owned(), value.to_owned())).collect()
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the exit, and for the last lines it wrote (the readers end when its pipes close).
    async fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let status = wait_for("the binary to exit", DEADLINE, || std::future::ready(child.try_wait().unwrap())).await;
        self.readers.drain(..).for_each(|reader| reader.join().unwrap());
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `pipe` gives, collected by a thread that ends where the pipe does.
fn collect(pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        BufReader::new(pipe).lines().map_while(Result::ok).for_each(|line| sink.lock().unwrap().push(line));
    });
    (lines, reader)
}

async fn client(environment: &BTreeMap<String, String>) -> Client {
    let credentials = Credentials::new(
        &environment["AWS_ACCESS_KEY_ID"],
        &environment["AWS_SECRET_ACCESS_KEY"],
        None,
        None,
        "streams-fault",
    );
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(environment["AWS_REGION"].clone()))
        .endpoint_url(&environment["AWS_ENDPOINT_URL"])
        .credentials_provider(credentials)
        .load()
        .await;
    Client::new(&config)
}

/// One full listing of a stream, following `LastEvaluatedShardId`.
struct Listing {
    shards: Vec<Shard>,
    pages: usize,
}

impl Listing {
    async fn take(client: &Client, arn: &str) -> Listing {
        let (mut shards, mut pages, mut start) = (Vec::new(), 0, None);
        loop {
            let output = client.describe_stream().stream_arn(arn).set_exclusive_start_shard_id(start).send().await;
            let description = output.unwrap().stream_description.unwrap();
            pages += 1;
            shards.extend(description.shards.unwrap_or_default());
            start = description.last_evaluated_shard_id;
            if start.is_none() {
                return Listing { shards, pages };
            }
        }
    }

    /// A listing taken between two roll-overs (one between two pages shows more than `SHARDS` open) that
    /// passes `check`.
    async fn settled(client: &Client, arn: &str, what: &str, check: impl Fn(&Listing) -> bool) -> Listing {
        let check = &check;
        wait_for(what, DEADLINE, || async move {
            let listing = Listing::take(client, arn).await;
            (listing.open().count() == SHARDS && check(&listing)).then_some(listing)
        })
        .await
    }

    fn open(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().filter(|shard| !is_closed(shard))
    }

    fn closed_ids(&self) -> BTreeSet<String> {
        self.shards.iter().filter(|shard| is_closed(shard)).map(|shard| id(shard).to_owned()).collect()
    }

    fn get(&self, shard_id: &str) -> Option<&Shard> {
        self.shards.iter().find(|shard| id(shard) == shard_id)
    }
}

fn id(shard: &Shard) -> &str {
    shard.shard_id().unwrap()
}

fn is_closed(shard: &Shard) -> bool {
    shard.sequence_number_range().and_then(|range| range.ending_sequence_number()).is_some()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_shards_that_roll_over_and_drops_closed_ones_after_the_retention() {
    let args = ["--port", "0", "--tables", "2", "--table-prefix", "orders", "--shards-per-table", "150"];
    let mut server = Running::start(&[&args[..], &["--rollover-every", "300ms", "--retain", "1s"]].concat());
    let environment = wait_for("the printed environment", DEADLINE, || async {
        Some(server.environment()).filter(|environment| environment.contains_key("DYNAMODB_TABLES"))
    })
    .await;
    assert!(environment["AWS_ENDPOINT_URL"].starts_with("http://127.0.0.1:"), "{environment:?}");
    assert_eq!(environment["DYNAMODB_TABLES"], "orders-0,orders-1");
    let client = client(&environment).await;

    let streams = client.list_streams().send().await.unwrap().streams.unwrap_or_default();
    let tables: BTreeSet<&str> = streams.iter().filter_map(|stream| stream.table_name()).collect();
    assert_eq!(tables, BTreeSet::from(["orders-0", "orders-1"]));

    for stream in &streams {
        let arn = stream.stream_arn().unwrap();
        let listing = Listing::settled(&client, arn, "every open shard listed", |_| true).await;
        assert!(listing.pages >= 2, "{SHARDS} shards fit one page");
        let ids: BTreeSet<&str> = listing.shards.iter().map(id).collect();
        assert_eq!(ids.len(), listing.shards.len(), "a shard listed twice");

        let rolled = Listing::settled(&client, arn, "a roll-over", |listing| listing.shards.len() > SHARDS).await;
        let parents: BTreeSet<&str> = rolled.open().map(|shard| shard.parent_shard_id().unwrap()).collect();
        assert_eq!(parents.len(), SHARDS, "each open shard has a parent of its own");
        for parent in &parents {
            assert!(rolled.get(parent).is_some_and(is_closed), "parent {parent} is not listed as closed");
        }

        let old = rolled.closed_ids();
        let renewed = Listing::settled(&client, arn, "the closed shards dropped", |listing| {
            listing.shards.iter().all(|shard| !old.contains(id(shard))) && !listing.closed_ids().is_empty()
        })
        .await;
        // A roll-over every 300 ms and 1 s of retention (swept every 100 ms) keep about four
        // generations of closed shards; without drops there would be more with every roll-over.
        assert!(renewed.shards.len() <= SHARDS * 8, "{} shards listed", renewed.shards.len());
    }

    let log = server.log();
    assert!(log.contains("rolled over 300 shards") && log.contains("closed over 1s ago"), "{log}");
    server.signal("TERM");
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(server.log().contains("SIGTERM: stopping"), "{}", server.log());
}

#[test]
fn a_bad_flag_exits_2_with_one_line_naming_it() {
    let cases: [(&[&str], &str); 5] = [
        (&["--shards-per-table", "many"], "--shards-per-table"),
        (&["--rollover-every", "10"], "--rollover-every"),
        (&["--retain=0s"], "--retain"),
        (&["--bogus", "1"], "--bogus"),
        (&["--tables"], "--tables"),
    ];
    for (args, flag) in cases {
        let output = Command::new(BINARY).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_names_every_flag() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let usage = String::from_utf8_lossy(&output.stdout);
    let flags = ["--port", "--tables", "--table-prefix", "--shards-per-table", "--rollover-every"];
    for flag in flags.into_iter().chain(["--split-every", "--writes-per-sec", "--retain", "--page-size"]) {
        assert!(usage.contains(flag), "{flag} missing from:\n{usage}");
    }
}

#[test]
fn a_port_in_use_is_an_error_not_a_panic() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = Command::new(BINARY).args(["--port", &port]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")) && !stderr.contains("panicked"), "{stderr}");
}
