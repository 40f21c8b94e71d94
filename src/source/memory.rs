//! An in-memory [`ShardSource`] for unit tests of the shard reader: each shard is a list of records,
//! an iterator is a position in it, and errors are served when a test plans them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::error::ReadError;
use super::scan::{ScanPage, ScanPosition, Segment, TableScan, TableShape};
use super::{Page, ShardSource, StartAt};
use crate::checkpoint::SequenceNumber;
use crate::publish::event::transcode::transcode;
use crate::record::{ChangeRecord, Map, Value};

#[derive(Default)]
struct Shard {
    records: Vec<ChangeRecord>,
    /// Records before this index are gone (older than the retention).
    trimmed: usize,
    /// Read to its end, the last page has no next iterator.
    closed: bool,
}

#[derive(Default)]
struct State {
    shards: HashMap<String, Shard>,
    /// Errors the next iterator calls answer with.
    planned_iterators: VecDeque<ReadError>,
    /// Errors the next records calls answer with.
    planned_records: VecDeque<ReadError>,
    calls: usize,
}

/// The in-memory source.
pub struct MemorySource {
    state: Mutex<State>,
    /// Records per page (`GetRecords` returns at most 1000).
    page_size: usize,
}

impl MemorySource {
    pub fn new(page_size: usize) -> Self {
        MemorySource { state: Mutex::default(), page_size }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn append(&self, shard_id: &str, records: impl IntoIterator<Item = ChangeRecord>) {
        self.lock().shards.entry(shard_id.to_owned()).or_default().records.extend(records);
    }

    /// The shard ends after its records.
    pub fn close(&self, shard_id: &str) {
        self.lock().shards.entry(shard_id.to_owned()).or_default().closed = true;
    }

    /// The first `count` records of the shard are trimmed.
    pub fn trim(&self, shard_id: &str, count: usize) {
        self.lock().shards.entry(shard_id.to_owned()).or_default().trimmed = count;
    }

    /// The next iterator call fails with `error`.
    pub fn plan_iterator(&self, error: ReadError) {
        self.lock().planned_iterators.push_back(error);
    }

    /// The next records call fails with `error`.
    pub fn plan_records(&self, error: ReadError) {
        self.lock().planned_records.push_back(error);
    }

    /// Calls answered so far.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }
}

/// A record of item `item` at version `version`, with sequence number `seq` and its creation time.
pub fn record(seq: u64, item: &str, version: u64, created_at: f64) -> ChangeRecord {
    let keys = Map::new(vec![("pk".to_owned(), Value::S(item.to_owned()))]);
    let image =
        Map::new(vec![("pk".to_owned(), Value::S(item.to_owned())), ("v".to_owned(), Value::N(version.to_string()))]);
    ChangeRecord {
        event_id: format!("e{seq}"),
        event_name: if version == 0 { "INSERT" } else { "MODIFY" }.to_owned(),
        sequence_number: format!("{seq:021}"),
        created_at: Some(created_at),
        keys: Some(keys),
        new_image: Some(image),
        size_bytes: Some(64),
        ..ChangeRecord::default()
    }
}

/// A record as `GetRecords` writes it: as Lambda shows it, but for `userIdentity`'s field names.
fn wire(record: &ChangeRecord) -> serde_json::Value {
    let mut json = crate::filter::document(record);
    if let Some(identity) = &record.user_identity {
        json["userIdentity"] = serde_json::json!({"Type": identity.kind, "PrincipalId": identity.principal_id});
    }
    json
}

fn position(iterator: &str) -> Option<(&str, usize)> {
    let (shard, index) = iterator.rsplit_once('#')?;
    Some((shard, index.parse().ok()?))
}

#[async_trait]
impl ShardSource for MemorySource {
    async fn iterator(&self, _stream_arn: &str, shard_id: &str, start: &StartAt) -> Result<String, ReadError> {
        let mut state = self.lock();
        state.calls += 1;
        if let Some(error) = state.planned_iterators.pop_front() {
            return Err(error);
        }
        let shard = state.shards.get(shard_id).ok_or_else(|| ReadError::NotFound(shard_id.to_owned()))?;
        let index = match start {
            StartAt::TrimHorizon => shard.trimmed,
            StartAt::Latest => shard.records.len(),
            StartAt::After(seq) => {
                let after = SequenceNumber::parse(seq).ok_or_else(|| ReadError::Other(seq.clone()))?;
                let index =
                    shard.records.iter().position(|r| SequenceNumber::parse(&r.sequence_number) > Some(after.clone()));
                let index = index.unwrap_or(shard.records.len());
                if index < shard.trimmed {
                    return Err(ReadError::Trimmed(format!("{seq} is trimmed")));
                }
                index
            }
        };
        Ok(format!("{shard_id}#{index}"))
    }

    async fn records(&self, iterator: &str) -> Result<Page, ReadError> {
        let mut state = self.lock();
        state.calls += 1;
        if let Some(error) = state.planned_records.pop_front() {
            return Err(error);
        }
        let (shard_id, index) = position(iterator).ok_or_else(|| ReadError::Other(iterator.to_owned()))?;
        let shard = state.shards.get(shard_id).ok_or_else(|| ReadError::NotFound(shard_id.to_owned()))?;
        let end = shard.records.len().min(index + self.page_size);
        let records = shard.records.get(index..end).unwrap_or_default();
        let next_iterator = (!shard.closed || end < shard.records.len()).then(|| format!("{shard_id}#{end}"));
        // Written as DynamoDB Streams answers and transcoded, the path the service reads pages on.
        let body = serde_json::json!({
            "Records": records.iter().map(wire).collect::<Vec<_>>(),
            "NextShardIterator": next_iterator,
        });
        let body = bytes::Bytes::from(body.to_string());
        let page = transcode(&body).map_err(|err| ReadError::Other(err.to_string()))?;
        Ok(Page { records: page.events, unusable: page.unusable, next_iterator: page.next_iterator, body })
    }
}

/// An in-memory table to scan: items in a fixed order, split into segments by position (item `i` is
/// in segment `i % total`), each item costing `units_per_item` read units; errors served when a test
/// plans them.
pub struct MemoryTable {
    items: Vec<Map>,
    units_per_item: f64,
    planned: Mutex<VecDeque<ReadError>>,
    calls: Mutex<usize>,
}

impl MemoryTable {
    /// `items`, each with a string attribute `pk` (its key).
    pub fn new(items: Vec<Map>, units_per_item: f64) -> Self {
        MemoryTable { items, units_per_item, planned: Mutex::default(), calls: Mutex::default() }
    }

    /// The next scan call fails with `error`.
    pub fn plan(&self, error: ReadError) {
        self.planned.lock().unwrap_or_else(PoisonError::into_inner).push_back(error);
    }

    pub fn calls(&self) -> usize {
        *self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key_of(item: &Map) -> HashMap<String, aws_sdk_dynamodb::types::AttributeValue> {
        item.fields()
            .iter()
            .filter(|(name, _)| name == "pk")
            .filter_map(|(name, value)| match value {
                Value::S(text) => Some((name.clone(), aws_sdk_dynamodb::types::AttributeValue::S(text.clone()))),
                _ => None,
            })
            .collect()
    }
}

#[async_trait]
impl TableScan for MemoryTable {
    async fn shape(&self, _table: &str) -> Result<TableShape, ReadError> {
        Ok(TableShape { key_attributes: vec!["pk".to_owned()], item_count: self.items.len() as i64, size_bytes: 0 })
    }

    async fn scan(
        &self,
        _table: &str,
        segment: Segment,
        start: Option<&ScanPosition>,
        limit: i32,
    ) -> Result<ScanPage, ReadError> {
        *self.calls.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        if let Some(error) = self.planned.lock().unwrap_or_else(PoisonError::into_inner).pop_front() {
            return Err(error);
        }
        let mine: Vec<&Map> = self
            .items
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % segment.total == segment.index)
            .map(|(_, item)| item)
            .collect();
        let from = match start {
            None => 0,
            Some(position) => {
                let key = position.key().map_err(|err| ReadError::Other(err.to_string()))?;
                let at = mine.iter().position(|item| Self::key_of(item) == key);
                at.map_or(mine.len(), |at| at + 1)
            }
        };
        let end = mine.len().min(from + limit.max(1) as usize);
        let items: Vec<Map> = mine[from..end].iter().map(|item| (*item).clone()).collect();
        let next =
            (end < mine.len()).then(|| items.last().and_then(|last| ScanPosition::of(&Self::key_of(last)))).flatten();
        let read_units = self.units_per_item * items.len() as f64;
        Ok(ScanPage { items, next, read_units })
    }
}
