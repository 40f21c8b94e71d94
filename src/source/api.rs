//! The calls this service makes to AWS, and nothing else: `DescribeTable`, `DescribeStream`,
//! `GetShardIterator`, `GetRecords`, `Scan` (a backfill's segments; issue 17), `ListTables` and
//! `ListTagsOfResource` (table discovery by pattern and tag; issue 20) and `GetCallerIdentity` at
//! start-up.
//!
//! Each returns our own types and a classified [`ReadError`], so the rest of the service never sees
//! an SDK error. The IAM policy in `deploy/` lists exactly these actions.

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{KeyType, ReturnConsumedCapacity, StreamViewType};
use aws_sdk_dynamodbstreams::types::{SequenceNumberRange, Shard, ShardIteratorType};

use super::error::ReadError;
use super::raw_body::KeepBody;
use super::scan::{ScanPage, ScanPosition, Segment, TableScan, TableShape};
use super::{Page, ShardSource, StartAt, TableCatalog, convert};
use crate::config::MAX_RECORDS_PER_CALL;
use crate::metrics::TableErrorKind;
use crate::publish::event::transcode::transcode;

/// A shard as `DescribeStream` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub shard_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_shard_id: Option<String>,
    /// Set once the shard is closed (it has an ending sequence number).
    #[serde(default)]
    pub closed: bool,
}

/// A shard's sequence numbers as `DescribeStream` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRange {
    pub shard_id: String,
    /// The shard's first sequence number (`None` if AWS left it out).
    pub starting: Option<String>,
    /// Its last one, once the shard is closed.
    pub ending: Option<String>,
}

/// A table's current stream (checked to carry images).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStream {
    pub stream_arn: String,
}

/// Why a table cannot be read right now (reported per table; the other tables go on).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table does not exist")]
    Missing,
    #[error("table has no stream enabled")]
    NoStream,
    #[error("the stream's view type is KEYS_ONLY: events need images (use NEW_AND_OLD_IMAGES or NEW_IMAGE)")]
    KeysOnly,
    #[error("{0}")]
    Call(ReadError),
}

impl TableError {
    /// The bounded `kind` label of `table_errors_total`: a [`TableErrorKind`], or the failed call's
    /// [`crate::metrics::ReadErrorKind`].
    pub fn kind(&self) -> &'static str {
        match self {
            TableError::Missing => TableErrorKind::Missing.as_str(),
            TableError::NoStream => TableErrorKind::NoStream.as_str(),
            TableError::KeysOnly => TableErrorKind::KeysOnly.as_str(),
            TableError::Call(err) => err.kind().as_str(),
        }
    }
}

/// `GetShardIterator`, `GetRecords` and `Scan` calls in flight at once, across every shard of the replica.
/// The HTTP client keeps one connection per call in flight (and keeps it afterwards), so without a
/// bound a thousand idle shards polled in the same second kept about 1400 connections open, most of
/// an idle shard's memory (issue 15). 128 calls of 10–30 ms on real AWS are 4,000–12,000 calls a
/// second, more than one replica's CPU can sign and parse; locally a call takes a few milliseconds.
pub const CALLS_IN_FLIGHT: usize = 128;

/// Backfill `Scan` calls in flight at once on a replica, apart from the Streams calls: a replica may
/// hold hundreds of segments, and their scans (up to 1 MB each) must never take the turns live shards
/// read with. Eight pages in flight already read tens of MB a second on AWS.
pub const SCANS_IN_FLIGHT: usize = 8;

/// DynamoDB and DynamoDB Streams clients.
#[derive(Clone)]
pub struct StreamsApi {
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    calls: std::sync::Arc<tokio::sync::Semaphore>,
    scans: std::sync::Arc<tokio::sync::Semaphore>,
}

impl StreamsApi {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        StreamsApi {
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            streams: aws_sdk_dynamodbstreams::Client::new(config),
            calls: std::sync::Arc::new(tokio::sync::Semaphore::new(CALLS_IN_FLIGHT)),
            scans: std::sync::Arc::new(tokio::sync::Semaphore::new(SCANS_IN_FLIGHT)),
        }
    }

    /// A turn to call (the semaphore is never closed, so this always gets one).
    async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.calls.acquire().await.ok()
    }

    /// The table's latest stream, checked to carry images.
    pub async fn table_stream(&self, table: &str) -> Result<TableStream, TableError> {
        let output = self.dynamodb.describe_table().table_name(table).send().await.map_err(|err| {
            match ReadError::from_sdk(err) {
                ReadError::NotFound(_) => TableError::Missing,
                other => TableError::Call(other),
            }
        })?;
        let description = output.table.ok_or(TableError::Missing)?;
        let stream_arn = description.latest_stream_arn.ok_or(TableError::NoStream)?;
        let specification = description.stream_specification;
        if specification.as_ref().is_some_and(|s| !s.stream_enabled) {
            return Err(TableError::NoStream);
        }
        if specification.and_then(|s| s.stream_view_type) == Some(StreamViewType::KeysOnly) {
            return Err(TableError::KeysOnly);
        }
        Ok(TableStream { stream_arn })
    }

    /// Every shard of a stream, paging through `DescribeStream`.
    pub async fn shards(&self, stream_arn: &str) -> Result<Vec<ShardInfo>, ReadError> {
        let shards = self.describe_stream(stream_arn).await?;
        Ok(shards
            .into_iter()
            .filter_map(|shard| {
                let closed = shard.sequence_number_range.and_then(|r| r.ending_sequence_number).is_some();
                Some(ShardInfo { shard_id: shard.shard_id?, parent_shard_id: shard.parent_shard_id, closed })
            })
            .collect())
    }

    /// Every shard of a stream with its sequence number range (for the operator's checkpoint
    /// commands, which check a sequence number against it).
    pub async fn shard_ranges(&self, stream_arn: &str) -> Result<Vec<ShardRange>, ReadError> {
        let shards = self.describe_stream(stream_arn).await?;
        Ok(shards
            .into_iter()
            .filter_map(|shard| {
                let range = shard.sequence_number_range.unwrap_or_else(|| SequenceNumberRange::builder().build());
                Some(ShardRange {
                    shard_id: shard.shard_id?,
                    starting: range.starting_sequence_number,
                    ending: range.ending_sequence_number,
                })
            })
            .collect())
    }

    /// The shards `DescribeStream` lists, every page of them.
    async fn describe_stream(&self, stream_arn: &str) -> Result<Vec<Shard>, ReadError> {
        let mut shards = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let output = self
                .streams
                .describe_stream()
                .stream_arn(stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(ReadError::from_sdk)?;
            let Some(description) = output.stream_description else {
                return Err(ReadError::NotFound(format!("stream {stream_arn} has no description")));
            };
            shards.extend(description.shards.unwrap_or_default());
            match description.last_evaluated_shard_id {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(shards),
            }
        }
    }
}

#[async_trait]
impl TableCatalog for StreamsApi {
    /// Every table name of the account and region, paging through `ListTables` (100 names a page).
    async fn list_tables(&self) -> Result<Vec<String>, ReadError> {
        let mut names = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let output = self
                .dynamodb
                .list_tables()
                .set_exclusive_start_table_name(start.take())
                .send()
                .await
                .map_err(ReadError::from_sdk)?;
            names.extend(output.table_names.unwrap_or_default());
            match output.last_evaluated_table_name {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(names),
            }
        }
    }

    /// The table's ARN (`DescribeTable`): `ListTagsOfResource` takes an ARN, `ListTables` lists names.
    async fn table_arn(&self, table: &str) -> Result<String, ReadError> {
        let output = self.dynamodb.describe_table().table_name(table).send().await.map_err(ReadError::from_sdk)?;
        output
            .table
            .and_then(|description| description.table_arn)
            .ok_or_else(|| ReadError::NotFound(format!("DescribeTable returned no ARN for table {table}")))
    }

    /// Every tag of the resource `arn`, paging through `ListTagsOfResource`.
    async fn tags(&self, arn: &str) -> Result<Vec<(String, String)>, ReadError> {
        let mut tags = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let output = self
                .dynamodb
                .list_tags_of_resource()
                .resource_arn(arn)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(ReadError::from_sdk)?;
            tags.extend(output.tags.unwrap_or_default().into_iter().map(|tag| (tag.key, tag.value)));
            match output.next_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(tags),
            }
        }
    }
}

#[async_trait]
impl ShardSource for StreamsApi {
    /// A shard iterator at `start`.
    async fn iterator(&self, stream_arn: &str, shard_id: &str, start: &StartAt) -> Result<String, ReadError> {
        let request = self.streams.get_shard_iterator().stream_arn(stream_arn).shard_id(shard_id);
        let request = match start {
            StartAt::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::After(seq) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq)
            }
        };
        let turn = self.turn().await;
        let output = request.send().await.map_err(ReadError::from_sdk)?;
        drop(turn);
        // A missing iterator means the shard is gone (AWS documents null for a closed, trimmed shard).
        output.shard_iterator.ok_or_else(|| ReadError::NotFound(format!("no iterator for shard {shard_id}")))
    }

    /// Up to [`MAX_RECORDS_PER_CALL`] records, transcoded from the response body as it arrived
    /// ([`KeepBody`]): the SDK signs, retries and classifies errors, but parses nothing of a success.
    async fn records(&self, iterator: &str) -> Result<Page, ReadError> {
        let body = KeepBody::default();
        let turn = self.turn().await;
        let output = self
            .streams
            .get_records()
            .shard_iterator(iterator)
            .limit(MAX_RECORDS_PER_CALL)
            .customize()
            .interceptor(body.clone())
            .send()
            .await
            .map_err(ReadError::from_sdk)?;
        drop(turn);
        drop(output);
        let Some(body) = body.take() else {
            return Err(ReadError::Other("GetRecords succeeded but its response body was not kept".to_owned()));
        };
        // A body the SDK could not read either: transient, as the SDK's own response error is.
        let page = transcode(&body).map_err(|err| ReadError::Transient(err.to_string()))?;
        Ok(Page { records: page.events, unusable: page.unusable, next_iterator: page.next_iterator, body })
    }
}

#[async_trait]
impl TableScan for StreamsApi {
    /// The table's key schema and its size, for a backfill: the `keys` of its snapshot rows and how
    /// many segments to scan it in ([`super::scan::segments_for`]).
    async fn shape(&self, table: &str) -> Result<TableShape, ReadError> {
        let output = self.dynamodb.describe_table().table_name(table).send().await.map_err(ReadError::from_sdk)?;
        let Some(description) = output.table else {
            return Err(ReadError::NotFound(format!("DescribeTable returned no description of table {table}")));
        };
        let mut key_schema = description.key_schema.unwrap_or_default();
        // The hash key first, whatever order the response lists them in: the order `keys` are named in
        // messages and logs.
        key_schema.sort_by_key(|element| element.key_type != KeyType::Hash);
        let key_attributes: Vec<String> = key_schema.into_iter().map(|element| element.attribute_name).collect();
        if key_attributes.is_empty() {
            return Err(ReadError::Other(format!("DescribeTable returned no key schema for table {table}")));
        }
        Ok(TableShape {
            key_attributes,
            item_count: description.item_count.unwrap_or(0),
            size_bytes: description.table_size_bytes.unwrap_or(0),
        })
    }

    /// One page of a parallel `Scan`, eventually consistent: a backfill scans only after its pin and
    /// margin (`docs/backfill.md`, "Pin"), so a strongly consistent read would buy nothing for twice
    /// the read units.
    async fn scan(
        &self,
        table: &str,
        segment: Segment,
        start: Option<&ScanPosition>,
        limit: i32,
    ) -> Result<ScanPage, ReadError> {
        let numbers = i32::try_from(segment.index).ok().zip(i32::try_from(segment.total).ok());
        let Some((index, total)) = numbers.filter(|(index, total)| *index < *total) else {
            return Err(ReadError::Other(format!(
                "segment {} of {} of table {table} is not a Scan segment",
                segment.index, segment.total
            )));
        };
        let start = start.map(ScanPosition::key).transpose().map_err(|err| ReadError::Other(err.to_string()))?;
        let request = self
            .dynamodb
            .scan()
            .table_name(table)
            .segment(index)
            .total_segments(total)
            .set_exclusive_start_key(start)
            .limit(limit)
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        // The semaphore is never closed.
        let turn = self.scans.acquire().await.ok();
        let output = request.send().await.map_err(ReadError::from_sdk)?;
        drop(turn);
        // DynamoDB ends a segment by leaving `LastEvaluatedKey` out; an empty map is read the same way,
        // since it could not be stored as a position to resume from.
        let next = match output.last_evaluated_key {
            Some(key) if !key.is_empty() => Some(ScanPosition::of(&key).ok_or_else(|| {
                ReadError::Other(format!("Scan of table {table} returned a LastEvaluatedKey that is no key: {key:?}"))
            })?),
            _ => None,
        };
        let read_units = output.consumed_capacity.and_then(|capacity| capacity.capacity_units).unwrap_or(0.0);
        let items = output.items.unwrap_or_default().into_iter().map(convert::item).collect();
        Ok(ScanPage { items, next, read_units })
    }
}
