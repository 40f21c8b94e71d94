//! `TABLES_FILE` end to end (issue 20), with the real binary, a real `nats-server` and moto: a filter
//! pasted from AWS's documentation, projection, a subject template with a consumer subscribed to the
//! templated subjects, filtered records checkpointed past, a table without settings unchanged, and a
//! template the stream would not capture refused at start-up.
//!
//! TTL deletions need records with `userIdentity`, which moto's lack: they are tested against the
//! project's Streams emulator (`tests/emulator/`), which writes them as DynamoDB does.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue as Av, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType,
};
use futures::StreamExt as _;
use test_support::fixtures::{self, Stored};
use test_support::{Moto, NatsServer, ServiceProcess, http_get, wait_for};

const STREAM: &str = "dynamodb_streams";
const BUCKET: &str = "dynamodb-stream-checkpoints";
const DEADLINE: Duration = Duration::from_secs(60);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dynamodb-stream-consumer"))
}

/// The AWS documentation's example table: keyed by `CustomerName`.
async fn create_customers(ddb: &aws_sdk_dynamodb::Client, name: &str) {
    ddb.create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("CustomerName")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(KeySchemaElement::builder().attribute_name("CustomerName").key_type(KeyType::Hash).build().unwrap())
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

async fn put_customer(ddb: &aws_sdk_dynamodb::Client, name: &str, quantity: u32) {
    ddb.put_item()
        .table_name("customers")
        .item("CustomerName", Av::S(name.to_owned()))
        .item("Quantity", Av::N(quantity.to_string()))
        .item("PaymentTerms", Av::S("60 days".to_owned()))
        .send()
        .await
        .unwrap();
}

async fn put_person(ddb: &aws_sdk_dynamodb::Client, table: &str, pk: &str, version: i64) {
    ddb.put_item()
        .table_name(table)
        .item("pk", Av::S(pk.to_owned()))
        .item("v", Av::N(version.to_string()))
        .item("ssn", Av::S("078-05-1120".to_owned()))
        .item("name", Av::S("Ada".to_owned()))
        .send()
        .await
        .unwrap();
}

/// The sequence number of the last record in `table`'s stream (moto: one shard), and the shard id.
async fn last_record(moto: &Moto, table: &str) -> (String, String) {
    let (shard_id, records) = fixtures::first_shard_records(moto, table).await;
    let last = records.last().unwrap().dynamodb.as_ref().unwrap().sequence_number.clone().unwrap();
    (shard_id, last)
}

/// Lambda's documentation ("Filter DynamoDB events"), pasted: a key's exact value OR a numeric
/// range on the new image (`Quantity` in `(0, 5]`).
const FILE: &str = r#"
tables:
  customers:
    filter: |
      { "Filters": [
          { "Pattern": "{ \"dynamodb\" : { \"Keys\" : { \"CustomerName\" : { \"S\" : [ \"AnyCompany Industries\" ] } } } }" },
          { "Pattern": "{ \"dynamodb\": { \"NewImage\": { \"Quantity\": { \"N\": [ { \"numeric\": [ \">\", 0, \"<=\", 5 ] } ] } } } }" }
      ] }
  "people-*":
    exclude_attributes: [ssn]
    subject: "{prefix}.{table}.{event_name}.{key.pk}"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_tables_file_filters_projects_and_routes_and_filtered_records_advance_the_checkpoint() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    create_customers(&ddb, "customers").await;
    fixtures::create_table(&ddb, "people-eu", Some(StreamViewType::NewAndOldImages)).await;
    fixtures::create_table(&ddb, "plain", Some(StreamViewType::NewAndOldImages)).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tables.yaml");
    std::fs::write(&file, FILE).unwrap();
    let port = fixtures::http_port();
    let mut env = fixtures::service_env(&nats, &moto, "customers,people-eu,plain", port);
    env.push(("TABLES_FILE".to_owned(), file.display().to_string()));

    // A consumer on the templated subjects, subscribed before anything is written.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut inserts = client.subscribe("dynamodb_streams.people-eu.INSERT.*").await.unwrap();
    client.flush().await.unwrap();

    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;

    // customers: two pass (the key; the quantity), two are filtered out, the last record among them.
    put_customer(&ddb, "AnyCompany Industries", 10).await; // passes: the key
    put_customer(&ddb, "Example Corp", 3).await; // passes: Quantity in (0, 5]
    put_customer(&ddb, "Other Corp", 50).await; // filtered out
    ddb.delete_item().table_name("customers").key("CustomerName", Av::S("Other Corp".to_owned())).send().await.unwrap(); // filtered out: no NewImage, another key
    // people-eu: projected and routed; "p.1 x" is sanitised into one subject token.
    put_person(&ddb, "people-eu", "p.1 x", 1).await;
    put_person(&ddb, "people-eu", "p2", 1).await;
    put_person(&ddb, "people-eu", "p2", 2).await;
    // plain: no settings, today's events.
    put_person(&ddb, "plain", "x", 1).await;

    let js = async_nats::jetstream::new(client.clone());
    let total = 2 + 3 + 1;
    fixtures::wait_for_messages(&js, STREAM, total, DEADLINE).await;

    // The filtered records advance the checkpoint: it moves to the last record, which was filtered.
    let (shard_id, last) = last_record(&moto, "customers").await;
    let kv = js.get_key_value(BUCKET).await.unwrap();
    let key = format!("customers.{shard_id}");
    wait_for(&format!("checkpoint {key} = {last}"), DEADLINE, || async {
        let value = kv.get(&key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned());
        (value.as_deref() == Some(last.as_str())).then_some(())
    })
    .await;
    let filtered = fixtures::metric(
        port,
        "dynamodb_stream_consumer_records_filtered_total{reason=\"filter\",table=\"customers\"}",
    )
    .await;
    assert_eq!(filtered, 2.0, "records_filtered_total counts the filtered records");

    let messages = fixtures::all_messages(&js, STREAM).await;
    assert_eq!(messages.len() as u64, total, "nothing else published: {messages:#?}");
    let of = |table: &str| -> Vec<&Stored> { messages.iter().filter(|m| m.json()["table_name"] == table).collect() };

    let customers: Vec<String> =
        of("customers").iter().map(|m| m.json()["keys"]["CustomerName"].as_str().unwrap().to_owned()).collect();
    assert_eq!(customers, ["AnyCompany Industries", "Example Corp"]);
    for message in of("customers") {
        assert_eq!(message.subject, "dynamodb_streams.customers", "no template: the default subject");
    }

    let people = of("people-eu");
    let subjects: Vec<&str> = people.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "dynamodb_streams.people-eu.INSERT.p_1_x",
            "dynamodb_streams.people-eu.INSERT.p2",
            "dynamodb_streams.people-eu.MODIFY.p2"
        ]
    );
    for message in &people {
        let json = message.json();
        assert!(json["keys"]["pk"].is_string(), "keys intact: {json}");
        assert_eq!(json["new_image"]["name"], "Ada", "{json}");
        assert!(json["new_image"].get("ssn").is_none(), "excluded attribute in new_image: {json}");
        if !json["old_image"].is_null() {
            assert!(json["old_image"].get("ssn").is_none(), "excluded attribute in old_image: {json}");
            assert_eq!(json["old_image"]["v"], 1);
        }
        // Headers as without a template.
        assert_eq!(message.header("Dynamodb-Table"), "people-eu");
        assert_eq!(message.header("Dynamodb-Event-Name"), json["event_name"]);
    }
    // The subscriber got exactly the INSERTs, on their subjects.
    let mut received = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(DEADLINE, inserts.next()).await.unwrap().unwrap();
        received.push(message.subject.to_string());
    }
    assert_eq!(received, ["dynamodb_streams.people-eu.INSERT.p_1_x", "dynamodb_streams.people-eu.INSERT.p2"]);

    let plain = of("plain");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].subject, "dynamodb_streams.plain");
    assert_eq!(plain[0].json()["new_image"]["ssn"], "078-05-1120", "a table without settings keeps everything");

    // `/status` shows each table's effective settings.
    let (_, body) = http_get(port, "/status").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let settings = &status["table_settings"];
    assert_eq!(settings["customers"]["matched"], "customers", "{status}");
    assert!(settings["customers"]["filter"].as_str().unwrap().contains("AnyCompany Industries"), "{status}");
    assert_eq!(settings["people-eu"]["matched"], "people-*", "{status}");
    assert_eq!(settings["people-eu"]["exclude_attributes"], serde_json::json!(["ssn"]), "{status}");
    assert_eq!(settings["people-eu"]["subject"], "{prefix}.{table}.{event_name}.{key.pk}", "{status}");
    assert_eq!(settings["plain"]["matched"], serde_json::Value::Null, "{status}");
    assert_eq!(settings["plain"]["ttl_deletes"], "publish", "{status}");

    let log = service.stop_gracefully(Duration::from_secs(20)).await;
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_refuses_a_bad_file_or_a_template_the_stream_would_not_capture() {
    let (nats, moto) = (NatsServer::start().await, Moto::start().await);
    let ddb = fixtures::dynamodb(&moto).await;
    fixtures::create_table(&ddb, "orders", Some(StreamViewType::NewAndOldImages)).await;
    let dir = tempfile::tempdir().unwrap();

    let run = |text: &'static str| {
        let file = dir.path().join(format!("t{}.yaml", text.len()));
        std::fs::write(&file, text).unwrap();
        let port = fixtures::http_port();
        let mut env = fixtures::service_env(&nats, &moto, "orders", port);
        env.push(("TABLES_FILE".to_owned(), file.display().to_string()));
        env
    };
    for (text, expected) in [
        (
            "tables:\n  orders:\n    subject: 'elsewhere.{table}'\n",
            r#"table "orders", setting `subject` ("elsewhere.{table}"): stream "dynamodb_streams" does not capture subject "elsewhere.orders""#,
        ),
        (
            "tables:\n  orders:\n    include_attributes: [a]\n    exclude_attributes: [b]\n",
            "table \"orders\", setting `include_attributes`: set together with `exclude_attributes`",
        ),
    ] {
        let env = run(text);
        let mut service = ServiceProcess::start(binary(), &[], &env);
        let exit = service.wait_exit(DEADLINE).await;
        assert!(!exit.success(), "start-up refused");
        let log = service.log();
        assert!(log.contains(expected), "expected {expected:?} in:\n{log}");
    }
}

/// `ttl_deletes`: a deletion by DynamoDB's TTL (`userIdentity` `Service` / `dynamodb.amazonaws.com`) is
/// dropped (and checkpointed past, here as the last record) or flagged; a deletion by a client is
/// published as always.
#[tokio::test(flavor = "multi_thread")]
async fn ttl_deletions_are_dropped_or_flagged_and_other_deletions_published() {
    use streams_emulator::{EventName, FaultyStreams, NewRecord, UserIdentity, ViewType};
    let nats = NatsServer::start().await;
    let streams = FaultyStreams::start().await;
    for table in ["ttl-drop", "ttl-flag"] {
        streams.create_table(table, "pk", ViewType::NewAndOldImages);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tables.yaml");
    std::fs::write(&file, "tables:\n  ttl-drop:\n    ttl_deletes: drop\n  ttl-flag:\n    ttl_deletes: flag\n").unwrap();
    let port = fixtures::http_port();
    let env: Vec<(String, String)> = [
        ("DYNAMODB_TABLES", "ttl-drop,ttl-flag".to_owned()),
        ("NATS_URL", nats.url()),
        ("AWS_ENDPOINT_URL", streams.endpoint()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", streams_emulator::REGION.to_owned()),
        ("PORT", port.to_string()),
        ("BIND", "127.0.0.1".to_owned()),
        ("POLL_INTERVAL_MS", "100".to_owned()),
        ("SHARD_REFRESH_INTERVAL_SEC", "1".to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
        ("TABLES_FILE", file.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let service = ServiceProcess::start_ready(binary(), &env, port, DEADLINE).await;

    let item = |pk: &str| serde_json::json!({"pk": {"S": pk}, "v": {"N": "1"}});
    let expire = |table: &str, pk: &str| {
        let keys = serde_json::json!({"pk": {"S": pk}}).as_object().cloned().unwrap();
        streams
            .put(
                table,
                NewRecord {
                    keys,
                    new_image: None,
                    old_image: item(pk).as_object().cloned(),
                    event_name: EventName::Remove,
                    user_identity: Some(UserIdentity::ttl()),
                },
            )
            .unwrap()
    };
    let mut last = std::collections::HashMap::new();
    for table in ["ttl-drop", "ttl-flag"] {
        streams.write(table, "a", Some(item("a"))).unwrap();
        streams.write(table, "b", Some(item("b"))).unwrap();
        streams.write(table, "b", None).unwrap(); // a client's deletion
        last.insert(table, expire(table, "a")); // DynamoDB's TTL, the last record
    }

    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // ttl-drop: 3 published (the TTL deletion dropped); ttl-flag: all 4.
    fixtures::wait_for_messages(&js, STREAM, 3 + 4, DEADLINE).await;
    let kv = js.get_key_value(BUCKET).await.unwrap();
    for (table, written) in &last {
        let key = format!("{table}.{}", written.shard_id);
        let want = written.sequence_number.clone();
        wait_for(&format!("checkpoint {key} = {want}"), DEADLINE, || async {
            let value = kv.get(&key).await.ok().flatten().map(|v| String::from_utf8_lossy(&v).into_owned());
            (value.as_deref() == Some(want.as_str())).then_some(())
        })
        .await;
    }
    let messages = fixtures::all_messages(&js, STREAM).await;
    let events = |table: &str| -> Vec<(String, String, Option<bool>)> {
        messages
            .iter()
            .map(Stored::json)
            .filter(|json| json["table_name"] == table)
            .map(|json| {
                let pk = json["keys"]["pk"].as_str().unwrap().to_owned();
                (json["event_name"].as_str().unwrap().to_owned(), pk, json["ttl_delete"].as_bool())
            })
            .collect()
    };
    let e = |name: &str, pk: &str, flag: Option<bool>| (name.to_owned(), pk.to_owned(), flag);
    assert_eq!(events("ttl-drop"), [e("INSERT", "a", None), e("INSERT", "b", None), e("REMOVE", "b", None)]);
    assert_eq!(
        events("ttl-flag"),
        [e("INSERT", "a", None), e("INSERT", "b", None), e("REMOVE", "b", None), e("REMOVE", "a", Some(true))]
    );
    let flagged = messages.iter().map(Stored::json).find(|json| json["ttl_delete"] == true).unwrap();
    assert_eq!(flagged["user_identity"]["principal_id"], "dynamodb.amazonaws.com", "{flagged}");
    let dropped = fixtures::metric(
        port,
        "dynamodb_stream_consumer_records_filtered_total{reason=\"ttl_delete\",table=\"ttl-drop\"}",
    )
    .await;
    assert_eq!(dropped, 1.0);
    let log = service.stop_gracefully(Duration::from_secs(20)).await;
    assert!(!log.contains("panicked"), "{log}");
}
