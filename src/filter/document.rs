//! A change record as Lambda shows it to a filter: the stream record's own JSON, its images in
//! DynamoDB's attribute format.

use base64::Engine as _;
use serde_json::{Map as JsonMap, Value as Json, json};

use crate::record::{ChangeRecord, Map, Value};

/// The record as a filter pattern sees it (fields the record lacks are left out, so that `exists`
/// and absence mean what they mean to Lambda).
pub fn document(record: &ChangeRecord) -> Json {
    let mut dynamodb = JsonMap::new();
    if let Some(keys) = &record.keys {
        dynamodb.insert("Keys".into(), image(keys));
    }
    if let Some(new_image) = &record.new_image {
        dynamodb.insert("NewImage".into(), image(new_image));
    }
    if let Some(old_image) = &record.old_image {
        dynamodb.insert("OldImage".into(), image(old_image));
    }
    dynamodb.insert("SequenceNumber".into(), json!(record.sequence_number));
    if let Some(size) = record.size_bytes {
        dynamodb.insert("SizeBytes".into(), json!(size));
    }
    if let Some(created) = record.created_at {
        dynamodb.insert("ApproximateCreationDateTime".into(), json!(created));
    }
    let mut document = JsonMap::new();
    document.insert("eventID".into(), json!(record.event_id));
    document.insert("eventName".into(), json!(record.event_name));
    document.insert("eventSource".into(), json!("aws:dynamodb"));
    document.insert("dynamodb".into(), Json::Object(dynamodb));
    if let Some(identity) = &record.user_identity {
        document.insert("userIdentity".into(), json!({"type": identity.kind, "principalId": identity.principal_id}));
    }
    Json::Object(document)
}

fn image(map: &Map) -> Json {
    Json::Object(map.fields().iter().map(|(name, value)| (name.clone(), attribute(value))).collect())
}

fn attribute(value: &Value) -> Json {
    let base64 = |blob: &[u8]| base64::engine::general_purpose::STANDARD.encode(blob);
    match value {
        Value::S(text) => json!({"S": text}),
        Value::N(text) => json!({"N": text}),
        Value::B(blob) => json!({"B": base64(blob)}),
        Value::Ss(texts) => json!({"SS": texts}),
        Value::Ns(texts) => json!({"NS": texts}),
        Value::Bs(blobs) => json!({"BS": blobs.iter().map(|blob| base64(blob)).collect::<Vec<_>>()}),
        Value::M(map) => json!({"M": image(map)}),
        Value::L(items) => json!({"L": items.iter().map(attribute).collect::<Vec<_>>()}),
        Value::Null => json!({"NULL": true}),
        Value::Bool(flag) => json!({"BOOL": flag}),
        Value::Unknown(_) => Json::Null,
    }
}
