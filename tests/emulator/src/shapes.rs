//! The JSON output shapes of the AWS API, built from the model.
//!
//! Field names follow the DynamoDB and DynamoDB Streams API references (and the SDK deserializers in
//! `aws-sdk-dynamodbstreams/src/protocol_serde/`); sequence numbers are decimal strings and times are
//! JSON numbers of epoch seconds, as AWS sends them.

use serde_json::{Map, Value, json};

use super::model::{Shard, Stream, Table};
use super::names;
use super::scan::ScanPage;
use super::types::{NewRecord, ViewType};

/// `DescribeTable`'s `Table`, naming `stream_arn` (with its `stream_label`) as the latest stream.
pub(crate) fn table(table: &Table, stream_arn: &str, stream_label: &str) -> Value {
    let mut specification = json!({ "StreamEnabled": table.stream_enabled });
    if table.stream_enabled {
        specification["StreamViewType"] = json!(table.view.as_str());
    }
    json!({
        "TableName": table.name,
        "TableArn": names::table_arn(&table.name),
        "TableStatus": "ACTIVE",
        "CreationDateTime": table.created_seconds,
        "ItemCount": table.item_count(),
        "TableSizeBytes": table.size_bytes(),
        "KeySchema": key_schema(&table.key),
        "AttributeDefinitions": [{ "AttributeName": table.key, "AttributeType": "S" }],
        "BillingModeSummary": { "BillingMode": "PAY_PER_REQUEST" },
        "StreamSpecification": specification,
        "LatestStreamArn": stream_arn,
        "LatestStreamLabel": stream_label,
    })
}

/// `DescribeStream`'s `StreamDescription` with one page of shards.
pub(crate) fn stream_description(stream: &Stream, shards: &[&Shard], last_evaluated_shard_id: Option<&str>) -> Value {
    let mut description = json!({
        "StreamArn": stream.arn,
        "StreamLabel": stream.label,
        "StreamStatus": if stream.enabled { "ENABLED" } else { "DISABLED" },
        "StreamViewType": stream.view.as_str(),
        "CreationRequestDateTime": stream.created_seconds,
        "TableName": stream.table,
        "KeySchema": key_schema(&stream.key),
        "Shards": shards.iter().map(|s| shard(s)).collect::<Vec<_>>(),
    });
    if let Some(last) = last_evaluated_shard_id {
        description["LastEvaluatedShardId"] = json!(last);
    }
    description
}

/// `ListStreams`' entry for one stream.
pub(crate) fn stream_summary(stream: &Stream) -> Value {
    json!({ "StreamArn": stream.arn, "TableName": stream.table, "StreamLabel": stream.label })
}

fn shard(shard: &Shard) -> Value {
    let mut range = json!({ "StartingSequenceNumber": shard.start.to_string() });
    if let Some(end) = shard.end {
        range["EndingSequenceNumber"] = json!(end.to_string());
    }
    let mut value = json!({ "ShardId": shard.id, "SequenceNumberRange": range });
    if let Some(parent) = &shard.parent {
        value["ParentShardId"] = json!(parent);
    }
    value
}

/// One entry of `GetRecords`' `Records`, with the images the stream's view type carries.
pub(crate) fn record(sequence_number: u128, created_seconds: u64, record: &NewRecord, view: ViewType) -> Value {
    let mut dynamodb = Map::new();
    dynamodb.insert("ApproximateCreationDateTime".into(), json!(created_seconds));
    dynamodb.insert("Keys".into(), Value::Object(record.keys.clone()));
    if let Some(image) = record.new_image.as_ref().filter(|_| view.has_new_image()) {
        dynamodb.insert("NewImage".into(), Value::Object(image.clone()));
    }
    if let Some(image) = record.old_image.as_ref().filter(|_| view.has_old_image()) {
        dynamodb.insert("OldImage".into(), Value::Object(image.clone()));
    }
    // An estimate of the record's size: the JSON length of its keys and images.
    let size: usize = ["Keys", "NewImage", "OldImage"]
        .into_iter()
        .filter_map(|name| dynamodb.get(name))
        .map(|value| value.to_string().len())
        .sum();
    dynamodb.insert("SequenceNumber".into(), json!(sequence_number.to_string()));
    dynamodb.insert("SizeBytes".into(), json!(size));
    dynamodb.insert("StreamViewType".into(), json!(view.as_str()));
    let mut value = json!({
        "eventID": names::event_id(sequence_number),
        "eventName": record.event_name.as_str(),
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": names::REGION,
        "dynamodb": dynamodb,
    });
    if let Some(identity) = &record.user_identity {
        value["userIdentity"] = json!({ "PrincipalId": identity.principal_id, "Type": identity.kind });
    }
    value
}

/// `Scan`'s output for one page, as text (the items are JSON text already); `capacity_units` gives its
/// `ConsumedCapacity` when the request asked for it.
pub(crate) fn scan(table: &Table, page: &ScanPage, capacity_units: Option<f64>) -> String {
    let mut output = String::with_capacity(128 + page.items.iter().map(|item| item.json.len() + 1).sum::<usize>());
    output.push_str("{\"Items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            output.push(',');
        }
        output.push_str(&item.json);
    }
    output.push_str("],\"Count\":");
    output.push_str(&page.items.len().to_string());
    output.push_str(",\"ScannedCount\":");
    output.push_str(&page.items.len().to_string());
    if let Some(key) = &page.last_evaluated_key {
        output.push_str(",\"LastEvaluatedKey\":");
        output.push_str(&json!({ table.key.as_str(): { "S": key } }).to_string());
    }
    if let Some(units) = capacity_units {
        output.push_str(",\"ConsumedCapacity\":");
        output.push_str(&json!({ "TableName": table.name, "CapacityUnits": units }).to_string());
    }
    output.push('}');
    output
}

fn key_schema(key: &str) -> Value {
    json!([{ "AttributeName": key, "KeyType": "HASH" }])
}
