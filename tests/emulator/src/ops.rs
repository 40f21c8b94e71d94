//! The six API operations, from request body to output JSON or AWS error, over a locked model.
//!
//! Nothing here panics on request input: a body that is not JSON is a `SerializationException`, a
//! missing or mistyped field, an out-of-range `Limit`, an unknown iterator type or a token this server
//! did not issue is a `ValidationException`, as DynamoDB answers them.

use std::ops::Bound::{Excluded, Unbounded};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::faults::Op;
use super::iterator::IteratorToken;
use super::model::{MAX_SHARDS_PER_PAGE, Model, Shard, Stream};
use super::scan::{self, MAX_TOTAL_SEGMENTS};
use super::shapes;
use super::types::Attributes;

/// `GetRecords` returns at most 1000 records per call (the maximum and default of its `Limit`).
const MAX_RECORDS_PER_CALL: usize = 1000;
/// `GetRecords` answers with at most 1 MB of records (here: of their JSON), but at least one.
const MAX_BYTES_PER_CALL: usize = 1 << 20;

/// `ListStreams` returns at most 100 streams per call (the maximum and default of its `Limit`).
const MAX_STREAMS_PER_PAGE: usize = 100;

/// An AWS error answer: HTTP status, error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "ValidationException", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "ResourceNotFoundException", format!("Requested resource not found: {}", message.into()))
    }
}

/// Runs `op` on `body` against the model; the JSON text of the answer.
pub(crate) fn dispatch(model: &Model, op: Op, body: &[u8]) -> Result<String, ApiError> {
    let output = match op {
        Op::DescribeTable => describe_table(model, parse(body)?),
        Op::DescribeStream => describe_stream(model, parse(body)?),
        Op::GetShardIterator => get_shard_iterator(model, parse(body)?),
        Op::GetRecords => return get_records(model, parse(body)?),
        Op::ListStreams => list_streams(model, parse(body)?),
        Op::Scan => return scan(model, parse(body)?),
    };
    output.map(|value| value.to_string())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeTableInput {
    table_name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeStreamInput {
    stream_arn: String,
    limit: Option<i64>,
    exclusive_start_shard_id: Option<String>,
    shard_filter: Option<ShardFilter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ShardFilter {
    #[serde(rename = "Type")]
    kind: Option<String>,
    shard_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetShardIteratorInput {
    stream_arn: String,
    shard_id: String,
    shard_iterator_type: String,
    sequence_number: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetRecordsInput {
    shard_iterator: String,
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListStreamsInput {
    table_name: Option<String>,
    limit: Option<i64>,
    exclusive_start_stream_arn: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScanInput {
    table_name: String,
    segment: Option<i64>,
    total_segments: Option<i64>,
    limit: Option<i64>,
    exclusive_start_key: Option<Attributes>,
    return_consumed_capacity: Option<String>,
    consistent_read: Option<bool>,
}

/// `DescribeTable` answered as if `stream_arn` were the table's latest stream (a stale read).
pub(crate) fn stale_describe_table(model: &Model, body: &[u8], stream_arn: &str) -> Result<String, ApiError> {
    describe_table_as(model, parse(body)?, Some(stream_arn)).map(|value| value.to_string())
}

fn describe_table(model: &Model, input: DescribeTableInput) -> Result<Value, ApiError> {
    describe_table_as(model, input, None)
}

/// The table's description naming `stream_arn` (the table's latest stream unless given) as its latest.
fn describe_table_as(model: &Model, input: DescribeTableInput, stream_arn: Option<&str>) -> Result<Value, ApiError> {
    let name = &input.table_name;
    let table = model.table(name).ok_or_else(|| ApiError::not_found(format!("Table: {name} not found")))?;
    let arn = stream_arn.unwrap_or(&table.stream_arn);
    // A stream deleted since has no label any more; the service reads only the ARN.
    let label = model.stream(arn).map(|stream| stream.label.as_str()).unwrap_or_default();
    Ok(json!({ "Table": shapes::table(table, arn, label) }))
}

fn describe_stream(model: &Model, input: DescribeStreamInput) -> Result<Value, ApiError> {
    let stream = find_stream(model, &input.stream_arn)?;
    let page = limit("limit", input.limit, MAX_SHARDS_PER_PAGE)?.min(model.max_page);
    let children_of = match input.shard_filter {
        None => None,
        Some(ShardFilter { kind: Some(kind), shard_id: Some(parent) }) if kind == "CHILD_SHARDS" => Some(parent),
        Some(_) => return Err(ApiError::validation("ShardFilter needs Type CHILD_SHARDS and a ShardId")),
    };
    // Shard ids sort in creation order, so a page starts after the given id even if that shard is gone.
    let after =
        input.exclusive_start_shard_id.as_deref().map_or(stream.shards.as_slice(), |id| stream.shards_after(id));
    let mut listed =
        after.iter().filter(|shard| children_of.as_ref().is_none_or(|parent| shard.parent.as_ref() == Some(parent)));
    let shards: Vec<&Shard> = listed.by_ref().take(page).collect();
    let more = listed.next().is_some();
    let last = shards.last().filter(|_| more).map(|shard| shard.id.as_str());
    Ok(json!({ "StreamDescription": shapes::stream_description(stream, &shards, last) }))
}

fn get_shard_iterator(model: &Model, input: GetShardIteratorInput) -> Result<Value, ApiError> {
    let (stream, shard) = find_shard(model, &input.stream_arn, &input.shard_id)?;
    let position = match input.shard_iterator_type.as_str() {
        "TRIM_HORIZON" => shard.horizon(),
        "LATEST" => shard.end.map_or(model.next_sequence(), |end| end.saturating_add(1)),
        kind @ ("AT_SEQUENCE_NUMBER" | "AFTER_SEQUENCE_NUMBER") => {
            let sequence_number = sequence_number_in(shard, input.sequence_number.as_deref())?;
            let position =
                if kind == "AT_SEQUENCE_NUMBER" { sequence_number } else { sequence_number.saturating_add(1) };
            if shard.is_trimmed(position) {
                return Err(ApiError::new(
                    400,
                    "TrimmedDataAccessException",
                    format!("Sequence number {sequence_number} of shard {} is beyond the trim horizon", shard.id),
                ));
            }
            position
        }
        other => return Err(ApiError::validation(format!("Invalid ShardIteratorType: {other}"))),
    };
    let token = IteratorToken::new(&stream.arn, &shard.id, position, model.generation);
    Ok(json!({ "ShardIterator": token.encode() }))
}

/// Answered as text: the page is the records' JSON written when they were appended, concatenated.
fn get_records(model: &Model, input: GetRecordsInput) -> Result<String, ApiError> {
    let token = IteratorToken::decode(&input.shard_iterator)
        .ok_or_else(|| ApiError::validation("Invalid ShardIterator: not issued by this server"))?;
    let limit = limit("limit", input.limit, MAX_RECORDS_PER_CALL)?;
    if token.generation != model.generation {
        return Err(ApiError::new(400, "ExpiredIteratorException", "Iterator expired"));
    }
    let (_, shard) = find_shard(model, &token.stream_arn, &token.shard_id)?;
    let position = token.position();
    if shard.is_trimmed(position) {
        let message = format!("The iterator of shard {} points at trimmed records", shard.id);
        return Err(ApiError::new(400, "TrimmedDataAccessException", message));
    }
    let available = shard.records_from(position);
    let mut bytes = 0;
    let fits = available[..available.len().min(limit)]
        .iter()
        .take_while(|stored| {
            bytes += stored.json.len();
            bytes <= MAX_BYTES_PER_CALL
        })
        .count();
    let page = &available[..fits.max(available.len().min(1))];
    let mut output = String::with_capacity(64 + page.iter().map(|stored| stored.json.len() + 1).sum::<usize>());
    output.push_str("{\"Records\":[");
    for (i, stored) in page.iter().enumerate() {
        if i > 0 {
            output.push(',');
        }
        output.push_str(&stored.json);
    }
    output.push(']');
    // A closed shard read to its end has no next iterator, even on the page with its last records.
    let exhausted = !shard.is_open() && page.len() == available.len();
    if !exhausted {
        let next = page.last().map_or(position, |stored| stored.sequence_number + 1);
        output.push_str(",\"NextShardIterator\":");
        output.push_str(&json!(token.at(next).encode()).to_string());
    }
    output.push('}');
    Ok(output)
}

fn list_streams(model: &Model, input: ListStreamsInput) -> Result<Value, ApiError> {
    let page = limit("limit", input.limit, MAX_STREAMS_PER_PAGE)?;
    if let Some(name) = input.table_name.as_deref().filter(|name| model.table(name).is_none()) {
        return Err(ApiError::not_found(format!("Table: {name} not found")));
    }
    let start = input.exclusive_start_stream_arn;
    let mut listed = model
        .streams
        .values()
        .filter(|stream| input.table_name.as_ref().is_none_or(|name| &stream.table == name))
        .filter(|stream| start.as_ref().is_none_or(|start| stream.arn.as_str() > start.as_str()));
    let streams: Vec<&Stream> = listed.by_ref().take(page).collect();
    let mut output = json!({ "Streams": streams.iter().map(|s| shapes::stream_summary(s)).collect::<Vec<_>>() });
    if let Some(last) = streams.last().filter(|_| listed.next().is_some()) {
        output["LastEvaluatedStreamArn"] = json!(last.arn);
    }
    Ok(output)
}

/// One page of one segment (the whole table when `TotalSegments` is not given). Answered as text: a
/// synthetic table's items are generated as JSON text, not as values.
fn scan(model: &Model, input: ScanInput) -> Result<String, ApiError> {
    let name = &input.table_name;
    let table = model.table(name).ok_or_else(|| ApiError::not_found(format!("Table: {name} not found")))?;
    let (segment, total) = match (input.segment, input.total_segments) {
        (None, None) => (0, 1),
        (Some(segment), Some(total)) => {
            let total = u32::try_from(total).ok().filter(|total| (1..=MAX_TOTAL_SEGMENTS).contains(total));
            let total = total.ok_or_else(|| {
                ApiError::validation(format!("TotalSegments must be between 1 and {MAX_TOTAL_SEGMENTS}"))
            })?;
            let segment = u32::try_from(segment).ok().filter(|segment| *segment < total);
            (
                segment
                    .ok_or_else(|| ApiError::validation("Segment must be at least 0 and less than TotalSegments"))?,
                total,
            )
        }
        _ => return Err(ApiError::validation("Segment and TotalSegments must be given together")),
    };
    let limit = match input.limit.map(usize::try_from) {
        None => usize::MAX,
        Some(Ok(limit)) if limit >= 1 => limit,
        Some(_) => return Err(ApiError::validation("Limit must be at least 1")),
    };
    let invalid_start = || ApiError::validation("The provided starting key is invalid");
    let start = match &input.exclusive_start_key {
        None => None,
        Some(key) => {
            let value = key.get(&table.key).filter(|_| key.len() == 1).and_then(|value| value["S"].as_str());
            Some(value.ok_or_else(invalid_start)?)
        }
    };
    let page = match table.synthetic {
        Some(synthetic) => {
            let after = start.map(|key| synthetic.index(key).ok_or_else(invalid_start)).transpose()?;
            scan::page(synthetic.members(segment, total, after), limit)
        }
        None => {
            let lower = start.map_or(Unbounded, Excluded);
            let members = table
                .items
                .range::<str, _>((lower, Unbounded))
                .filter(|(key, _)| scan::segment_of(key, total) == segment)
                .map(|(key, item)| scan::stored_item(key, item));
            scan::page(members, limit)
        }
    };
    let capacity = match input.return_consumed_capacity.as_deref() {
        None | Some("NONE") => None,
        Some("TOTAL" | "INDEXES") => Some(page.capacity_units(input.consistent_read.unwrap_or(false))),
        Some(other) => return Err(ApiError::validation(format!("Invalid ReturnConsumedCapacity: {other}"))),
    };
    Ok(shapes::scan(table, &page, capacity))
}

fn find_stream<'m>(model: &'m Model, arn: &str) -> Result<&'m Stream, ApiError> {
    model.stream(arn).ok_or_else(|| ApiError::not_found(format!("Stream: {arn} not found")))
}

fn find_shard<'m>(model: &'m Model, arn: &str, shard_id: &str) -> Result<(&'m Stream, &'m Shard), ApiError> {
    let stream = find_stream(model, arn)?;
    let shard = stream.shard(shard_id).ok_or_else(|| ApiError::not_found(format!("Shard: {shard_id} in {arn}")))?;
    Ok((stream, shard))
}

/// The sequence number of an `AT_`/`AFTER_SEQUENCE_NUMBER` request, checked to lie in the shard.
fn sequence_number_in(shard: &Shard, text: Option<&str>) -> Result<u128, ApiError> {
    let text = text.ok_or_else(|| ApiError::validation("SequenceNumber is required for this ShardIteratorType"))?;
    let number: u128 = text.parse().map_err(|_| ApiError::validation(format!("Invalid SequenceNumber: {text}")))?;
    if number < shard.start || shard.end.is_some_and(|end| number > end) {
        return Err(ApiError::validation(format!("Invalid SequenceNumber {number} for shard {}", shard.id)));
    }
    Ok(number)
}

/// A `Limit` between 1 and `max` (default `max`).
fn limit(name: &str, value: Option<i64>, max: usize) -> Result<usize, ApiError> {
    match value.map(usize::try_from) {
        None => Ok(max),
        Some(Ok(value)) if (1..=max).contains(&value) => Ok(value),
        _ => Err(ApiError::validation(format!(
            "1 validation error detected: Value '{}' at '{name}' failed to satisfy constraint: \
             Member must have value between 1 and {max}",
            value.unwrap_or_default()
        ))),
    }
}

/// Parses a request body; an empty body is `{}` (as the SDK sends for an input without fields).
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => ApiError::validation(err.to_string()),
        _ => ApiError::new(400, "SerializationException", err.to_string()),
    })
}
