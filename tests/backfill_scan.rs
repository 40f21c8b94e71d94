//! The backfill's `Scan` through the service's own AWS client ([`StreamsApi`]) against the moto
//! emulator: a table read segment by segment, each resumed from its position as the bucket would hold
//! it, yields every item exactly once with every attribute type intact, and each page reports the read
//! units it consumed.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue as Av, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use dynamodb_stream_consumer::record::{Map, Value};
use dynamodb_stream_consumer::source::api::StreamsApi;
use dynamodb_stream_consumer::source::error::ReadError;
use dynamodb_stream_consumer::source::scan::{ScanPosition, Segment, TableScan, segments_for};
use test_support::Moto;
use test_support::fixtures;

const TABLE: &str = "backfill_scan";
const ITEMS: usize = 60;

async fn api(moto: &Moto) -> StreamsApi {
    StreamsApi::new(&fixtures::aws_config(moto).await)
}

/// A table keyed by `pk` (string) and `sk` (number), without a stream: a backfill needs none.
async fn create_table(ddb: &aws_sdk_dynamodb::Client) {
    let attribute =
        |name: &str, kind| AttributeDefinition::builder().attribute_name(name).attribute_type(kind).build().unwrap();
    let key = |name: &str, kind| KeySchemaElement::builder().attribute_name(name).key_type(kind).build().unwrap();
    ddb.create_table()
        .table_name(TABLE)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("pk", ScalarAttributeType::S))
        .attribute_definitions(attribute("sk", ScalarAttributeType::N))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .send()
        .await
        .unwrap();
}

/// An item with an attribute of every DynamoDB type.
fn every_type(i: usize) -> HashMap<String, Av> {
    HashMap::from([
        ("pk".to_owned(), Av::S(format!("item-{i}"))),
        ("sk".to_owned(), Av::N(i.to_string())),
        ("b".to_owned(), Av::B(vec![0, 1, 255].into())),
        ("flag".to_owned(), Av::Bool(i.is_multiple_of(2))),
        ("nothing".to_owned(), Av::Null(true)),
        ("list".to_owned(), Av::L(vec![Av::S("x".to_owned()), Av::N("1.5".to_owned())])),
        ("map".to_owned(), Av::M(HashMap::from([("inner".to_owned(), Av::S("y".to_owned()))]))),
        ("ss".to_owned(), Av::Ss(vec!["a".to_owned()])),
        ("ns".to_owned(), Av::Ns(vec!["12345678901234567890123456789012345678".to_owned()])),
        ("bs".to_owned(), Av::Bs(vec![vec![7].into()])),
    ])
}

fn expected(i: usize) -> Map {
    Map::new(vec![
        ("pk".to_owned(), Value::S(format!("item-{i}"))),
        ("sk".to_owned(), Value::N(i.to_string())),
        ("b".to_owned(), Value::B(vec![0, 1, 255])),
        ("flag".to_owned(), Value::Bool(i.is_multiple_of(2))),
        ("nothing".to_owned(), Value::Null),
        ("list".to_owned(), Value::L(vec![Value::S("x".to_owned()), Value::N("1.5".to_owned())])),
        ("map".to_owned(), Value::M(Map::new(vec![("inner".to_owned(), Value::S("y".to_owned()))]))),
        ("ss".to_owned(), Value::Ss(vec!["a".to_owned()])),
        ("ns".to_owned(), Value::Ns(vec!["12345678901234567890123456789012345678".to_owned()])),
        ("bs".to_owned(), Value::Bs(vec![vec![7]])),
    ])
}

fn pk(item: &Map) -> String {
    match item.fields().iter().find(|(name, _)| name == "pk") {
        Some((_, Value::S(pk))) => pk.clone(),
        other => panic!("no string pk: {other:?}"),
    }
}

#[tokio::test]
async fn segments_resumed_from_their_positions_yield_every_item_once() {
    let moto = Moto::start().await;
    let ddb = fixtures::dynamodb(&moto).await;
    create_table(&ddb).await;
    for i in 0..ITEMS {
        ddb.put_item().table_name(TABLE).set_item(Some(every_type(i))).send().await.unwrap();
    }
    let api = api(&moto).await;

    let shape = api.shape(TABLE).await.unwrap();
    assert_eq!(shape.key_attributes, ["pk", "sk"], "the hash key first");
    assert_eq!(shape.item_count, ITEMS as i64);
    let total = segments_for(shape.size_bytes, None);
    assert_eq!(total, 4, "moto reports no table size: the fewest segments");

    let mut seen: BTreeMap<String, (u32, Map)> = BTreeMap::new();
    let mut pages = 0;
    for index in 0..total {
        let segment = Segment { index, total };
        let mut start: Option<ScanPosition> = None;
        loop {
            let page = api.scan(TABLE, segment, start.as_ref(), 7).await.unwrap();
            pages += 1;
            assert!(page.items.len() <= 7, "the limit is kept: {}", page.items.len());
            assert!(page.read_units > 0.0, "a page reports its consumed capacity");
            for item in page.items {
                if let Some((other, _)) = seen.insert(pk(&item), (index, item.clone())) {
                    panic!("{} read by segments {other} and {index}", pk(&item));
                }
            }
            // Resume as a replica taking the segment over would: from the stored text.
            match page.next {
                Some(position) => start = Some(ScanPosition::parse(position.as_str()).unwrap()),
                None => break,
            }
        }
    }
    assert_eq!(seen.len(), ITEMS, "every item once");
    assert!(pages > total as usize, "segments took several pages each: {pages}");
    let segments_used: std::collections::BTreeSet<u32> = seen.values().map(|(segment, _)| *segment).collect();
    assert!(segments_used.len() > 1, "the items are spread over the segments: {segments_used:?}");
    for i in 0..ITEMS {
        assert_eq!(seen[&format!("item-{i}")].1, expected(i), "item {i} kept every attribute");
    }
}

#[tokio::test]
async fn a_missing_table_and_an_impossible_segment_are_errors() {
    let moto = Moto::start().await;
    let api = api(&moto).await;
    let missing = api.shape("no_such_table").await.unwrap_err();
    assert!(matches!(missing, ReadError::NotFound(_)), "{missing:?}");
    let scan = api.scan("no_such_table", Segment { index: 0, total: 1 }, None, 10).await.unwrap_err();
    assert!(matches!(scan, ReadError::NotFound(_)), "{scan:?}");
    let impossible = api.scan(TABLE, Segment { index: 4, total: 4 }, None, 10).await.unwrap_err();
    assert!(matches!(impossible, ReadError::Other(_)), "{impossible:?}");
}
