//! In-place upgrade from the Go service (issue 18): the original deployment's rolling update runs the
//! old and the new process side by side. The old one holds no lease and puts its checkpoint after
//! every record ([`GoService`], a stand-in that behaves as it does). The service, started beside it
//! while a writer keeps updating a few items, must leave the shard alone while that checkpoint keeps
//! moving, and once the old process is stopped (aborted wherever it is) and its checkpoint has been
//! still for a lease TTL, read on from it. Compared with what was written: every version arrives,
//! per item never going backwards, and at most the one record in flight when the old process stopped
//! arrives twice (the two processes' message ids differ, so the duplicate window cannot drop it).
//! Without the hold the service publishes what the old process publishes, hundreds of times twice.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use test_support::fixtures::{self, Stored};
use test_support::go_service::{GoService, GoSettings};
use test_support::{Moto, NatsServer, ServiceProcess, wait_for};

const TABLE: &str = "orders";
const PREFIX: &str = "dynamodb_streams";
const BUCKET: &str = "dynamodb-stream-checkpoints";
const ITEMS: u64 = 5;
/// Long enough that a pause of the stand-in on a loaded machine is not taken for its stop.
const LEASE_TTL_SEC: u64 = 5;
const DEADLINE: Duration = Duration::from_secs(90);

/// Updates `ITEMS` items round robin, each version one higher than the last, until told to stop.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Vec<(String, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(ddb: aws_sdk_dynamodb::Client) -> Writer {
        let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (stopped, log) = (Arc::clone(&stop), Arc::clone(&written));
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                let (pk, v) = (format!("item-{}", n % ITEMS), n / ITEMS);
                let item =
                    HashMap::from([("pk".to_owned(), Av::S(pk.clone())), ("v".to_owned(), Av::N(v.to_string()))]);
                ddb.put_item().table_name(TABLE).set_item(Some(item)).send().await.unwrap();
                log.lock().unwrap().push((pk, v));
                n += 1;
            }
        });
        Writer { stop, written, task }
    }

    fn count(&self) -> usize {
        self.written.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        Arc::try_unwrap(self.written).unwrap().into_inner().unwrap()
    }
}

/// The item and version a message carries (the Go service's events and ours both have them).
fn version(message: &Stored) -> (String, u64) {
    let json = message.json();
    let pk = json["keys"]["pk"].as_str().unwrap().to_owned();
    let v = json["new_image"]["v"].as_f64().unwrap() as u64;
    (pk, v)
}

/// The Go service's message ids are bare sequence numbers; ours are `table:shard:sequence`.
fn from_go(message: &Stored) -> bool {
    !message.header("Nats-Msg-Id").contains(':')
}

#[tokio::test]
async fn the_service_beside_the_go_service_leaves_the_shard_to_it_and_reads_on_after_it_stops() {
    let nats = NatsServer::start().await;
    let moto = Moto::start().await;
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, TABLE, Some(StreamViewType::NewAndOldImages)).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(stream::Config {
        name: PREFIX.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    // The bucket as the original deployment creates it: values of at most 1 KiB, history 1.
    fixtures::original_bucket(&js, BUCKET).await;

    let writer = Writer::start(ddb.clone());
    let go = GoService::start(
        &moto,
        GoSettings {
            nats_url: nats.url(),
            table: TABLE.to_owned(),
            subject_prefix: PREFIX.to_owned(),
            bucket: BUCKET.to_owned(),
            poll: Duration::from_millis(100),
        },
    )
    .await;
    wait_for("the Go service publishing", DEADLINE, || async { (go.published() >= 100).then_some(()) }).await;

    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, TABLE, port);
    env.push(("LEASE_TTL_SEC".to_owned(), LEASE_TTL_SEC.to_string()));
    let binary = Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"));
    let service = ServiceProcess::start_ready(binary, &env, port, DEADLINE).await;
    let moves = format!("dynamodb_stream_consumer_foreign_checkpoint_moves_total{{table=\"{TABLE}\"}}");
    // One table: every sample of the metric is of it.
    let published = "dynamodb_stream_consumer_records_published_total{";
    // Side by side for a while: the service sees the Go service's checkpoint moving and publishes
    // nothing of its own.
    let go_before = go.published();
    wait_for("the service to see the Go service's checkpoint move, side by side", DEADLINE, || async {
        let seen = fixtures::metric(port, &moves).await;
        (seen >= 10.0 && go.published() >= go_before + 200).then_some(())
    })
    .await;
    assert_eq!(fixtures::metric(port, published).await, 0.0, "published beside the Go service: {}", service.log());

    let go_published = go.stop().await;
    let resumed_from = writer.count();
    wait_for("the service to read on after the Go service stopped", DEADLINE, || async {
        (fixtures::metric(port, published).await > 0.0).then_some(())
    })
    .await;
    wait_for("more writes after the take-over", DEADLINE, || async {
        (writer.count() >= resumed_from + 300).then_some(())
    })
    .await;
    let written = writer.finish().await;

    let stream_name = PREFIX;
    let expected: BTreeMap<&(String, u64), ()> = written.iter().map(|w| (w, ())).collect();
    let messages = wait_for("every written version in the stream", DEADLINE, || async {
        let messages = fixtures::all_messages(&js, stream_name).await;
        let arrived: std::collections::HashSet<(String, u64)> = messages.iter().map(version).collect();
        expected.keys().all(|w| arrived.contains(*w)).then_some(messages)
    })
    .await;
    let service_published = fixtures::metric(port, published).await as u64;
    drop(service);

    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    for message in &messages {
        let (pk, v) = version(message);
        *seen.entry((pk.clone(), v)).or_default() += 1;
        if let Some(previous) = last.insert(pk.clone(), v) {
            assert!(v >= previous, "{pk}: version {v} after {previous} (from the Go service: {})", from_go(message));
        }
    }
    let duplicated: usize = seen.values().map(|count| count - 1).sum();
    let arrived = messages.len();
    println!(
        "upgrade: records written {}, arrived {arrived}, duplicated {duplicated} \
         (published by the Go stand-in {go_published}, by the service {service_published})",
        written.len()
    );
    assert_eq!(seen.len(), written.len(), "every written version arrived, nothing else");
    assert!(duplicated <= 1, "only the record in flight when the Go service stopped may arrive twice: {duplicated}");
    assert!(messages.iter().any(from_go) && messages.iter().any(|m| !from_go(m)), "both processes published");
}
