//! The local demo: `cargo run -p tools --bin demo`.
//!
//! Starts a real `nats-server` with JetStream and the moto DynamoDB Streams emulator on free loopback
//! ports (installing both into `.venv` on first use), creates a table with a stream, runs the service
//! against them, writes items and prints every event as it arrives in JetStream. Stops everything it
//! started when done (or on Ctrl-C).

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue as Av, StreamViewType};
use futures::StreamExt;
use test_support::fixtures;
use test_support::{Moto, NatsServer, ServiceProcess, http_get, wait_for, workspace_root};

const TABLE: &str = "demo.orders";
const ITEMS: usize = 5;

fn install_servers() {
    let script = workspace_root().join(".ci/install-servers");
    let status = Command::new(&script).status().unwrap_or_else(|err| panic!("run {}: {err}", script.display()));
    assert!(status.success(), "installing the servers failed");
}

#[tokio::main]
async fn main() {
    install_servers();
    let binary = test_support::process::build_service();
    let nats = NatsServer::start().await;
    let moto = Moto::start().await;
    println!("nats-server (JetStream) on {}; DynamoDB Streams emulator on {}", nats.url(), moto.endpoint());

    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, TABLE, Some(StreamViewType::NewAndOldImages)).await;
    println!("created table {TABLE:?} with a NEW_AND_OLD_IMAGES stream");

    let port = fixtures::http_port();
    let env = fixtures::service_env(&nats, &moto, TABLE, port);
    let mut service = ServiceProcess::start(&binary, &[], &env);
    wait_for("the service to be ready", Duration::from_secs(60), || async {
        matches!(http_get(port, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    println!("service ready: http://127.0.0.1:{port}/metrics\n");

    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut events = client.subscribe("dynamodb_streams.>").await.unwrap();

    let mut written = 0;
    for i in 0..ITEMS {
        let pk = format!("order-{i}");
        ddb.put_item()
            .table_name(TABLE)
            .item("pk", Av::S(pk.clone()))
            .item("total", Av::N(format!("{}.99", 10 * (i + 1))))
            .item("status", Av::S("new".into()))
            .send()
            .await
            .unwrap();
        ddb.update_item()
            .table_name(TABLE)
            .key("pk", Av::S(pk))
            .update_expression("SET #s = :s")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", Av::S("paid".into()))
            .send()
            .await
            .unwrap();
        written += 2;
    }
    ddb.delete_item().table_name(TABLE).key("pk", Av::S("order-0".into())).send().await.unwrap();
    written += 1;
    println!("wrote {written} changes to {TABLE}; events arriving on dynamodb_streams.>:\n");

    let mut seen = 0;
    while seen < written {
        tokio::select! {
            message = events.next() => {
                let Some(message) = message else { break };
                seen += 1;
                println!("{}  {}", message.subject, String::from_utf8_lossy(&message.payload));
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                println!("no event for 30 s; service log:\n{}", service.log());
                break;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }

    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    println!("\nmetrics:");
    for line in metrics.lines().filter(|l| l.starts_with("dynamodb_stream_consumer_records_published_total")) {
        println!("  {line}");
    }
    service.signal("TERM");
    let status = service.wait_exit(Duration::from_secs(30)).await;
    println!("service stopped ({status}); {seen} of {written} events shown");
    if seen < written {
        std::process::exit(1);
    }
}
