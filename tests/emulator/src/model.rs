//! The state behind the endpoint: tables with their current items, and their streams, shards and records.
//!
//! Invariants kept here:
//! - sequence numbers come from one server-wide counter, so they are unique across all streams and
//!   increase within a shard; a shard's `StartingSequenceNumber` is reserved from the same counter;
//! - the open shards of a table's enabled stream own disjoint ranges of the key-hash space that together
//!   cover all of it (until `drop_shard` removes an open one), so every item key goes to exactly one
//!   shard, and a split or roll-over hands each part of a parent's range to exactly one child;
//! - a closed shard never gains records; its `EndingSequenceNumber` is its last record's;
//! - a stream's shards stay in creation order, which is the order of their ids, so a shard is found by
//!   binary search and a `DescribeStream` page starts without a scan (a stream may hold tens of
//!   thousands of shards when a long retention meets frequent roll-overs).
//!
//! Misuse by a test (an unknown table or shard, splitting a closed shard) panics with a message; the
//! request path only reads the model through lookups that return `Option`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::time::Instant;

use super::faults::Faults;
use super::names;
use super::scan::{self, Synthetic};
use super::shapes;
use super::types::{Attributes, EventName, NewRecord, ViewType, Written};

/// DynamoDB sequence numbers are decimal strings of 21 digits or more; 10^20 is the first with 21.
const FIRST_SEQUENCE_NUMBER: u128 = 100_000_000_000_000_000_000;

/// `DescribeStream` returns at most 100 shards per call (the maximum and default of its `Limit`).
pub(crate) const MAX_SHARDS_PER_PAGE: usize = 100;

/// A record in a shard.
#[derive(Debug, Clone)]
pub(crate) struct StoredRecord {
    pub sequence_number: u128,
    /// Its entry of `GetRecords`' `Records`, written once when the record is appended: serving a
    /// page is then a concatenation (the benchmark's source must cost far less than the reader).
    pub json: String,
}

#[derive(Debug)]
pub(crate) struct Shard {
    pub id: String,
    pub parent: Option<String>,
    pub start: u128,
    pub end: Option<u128>,
    /// The inclusive range of key hashes this shard owns while it is open.
    hashes: (u64, u64),
    /// The records still kept, oldest first.
    pub records: Vec<StoredRecord>,
    /// The last record ever written here (trimming does not change it).
    last_written: Option<u128>,
    /// Positions at or below this one were trimmed away.
    pub trimmed_through: Option<u128>,
    /// When the shard closed (the retention of closed shards counts from here).
    closed_at: Option<Instant>,
}

impl Shard {
    pub fn is_open(&self) -> bool {
        self.end.is_none()
    }

    /// Whether reading from `position` would skip trimmed records.
    pub fn is_trimmed(&self, position: u128) -> bool {
        self.trimmed_through.is_some_and(|through| position <= through)
    }

    /// The oldest position still readable (where `TRIM_HORIZON` starts).
    pub fn horizon(&self) -> u128 {
        self.trimmed_through.map_or(self.start, |through| self.start.max(through.saturating_add(1)))
    }

    /// The records at or after `position`.
    pub fn records_from(&self, position: u128) -> &[StoredRecord] {
        let first = self.records.partition_point(|stored| stored.sequence_number < position);
        &self.records[first..]
    }

    fn owns(&self, hash: u64) -> bool {
        self.is_open() && self.hashes.0 <= hash && hash <= self.hashes.1
    }

    fn close(&mut self) {
        if self.end.is_none() {
            self.end = Some(self.last_written.unwrap_or(self.start));
            self.closed_at = Some(Instant::now());
        }
    }

    fn closed_before(&self, cutoff: Instant) -> bool {
        self.closed_at.is_some_and(|closed| closed < cutoff)
    }

    fn trim_through(&mut self, through: u128) {
        self.records.retain(|stored| stored.sequence_number > through);
        self.trimmed_through = Some(self.trimmed_through.map_or(through, |old| old.max(through)));
    }
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub arn: String,
    pub label: String,
    pub table: String,
    pub key: String,
    pub view: ViewType,
    pub enabled: bool,
    pub created_seconds: u64,
    /// In creation order, which is also the order of their ids.
    pub shards: Vec<Shard>,
}

impl Stream {
    pub fn shard(&self, shard_id: &str) -> Option<&Shard> {
        self.position(shard_id).map(|i| &self.shards[i])
    }

    /// The shards listed after `shard_id` (which need not exist any more), in id order.
    pub fn shards_after(&self, shard_id: &str) -> &[Shard] {
        let first = self.shards.partition_point(|shard| shard.id.as_str() <= shard_id);
        &self.shards[first..]
    }

    fn shard_mut(&mut self, shard_id: &str) -> &mut Shard {
        match self.position(shard_id) {
            Some(i) => &mut self.shards[i],
            None => panic!("stream {} has no shard {shard_id}", self.arn),
        }
    }

    fn position(&self, shard_id: &str) -> Option<usize> {
        self.shards.binary_search_by(|shard| shard.id.as_str().cmp(shard_id)).ok()
    }
}

#[derive(Debug)]
pub(crate) struct Table {
    pub name: String,
    pub key: String,
    pub view: ViewType,
    pub created_seconds: u64,
    /// The current items by their key value.
    pub items: BTreeMap<String, Attributes>,
    /// Set for a synthetic table: its items are generated, not stored (`items` stays empty), and
    /// `Scan` reads them.
    pub synthetic: Option<Synthetic>,
    /// The latest stream (the one writes go to while enabled).
    pub stream_arn: String,
    pub stream_enabled: bool,
}

#[derive(Debug)]
pub(crate) struct Model {
    pub tables: BTreeMap<String, Table>,
    /// Every stream by ARN, disabled ones included.
    pub streams: BTreeMap<String, Stream>,
    next_sequence: u128,
    next_shard: u64,
    last_label_millis: u64,
    /// Iterators issued under an older generation are expired.
    pub generation: u64,
    /// The most shards one `DescribeStream` page holds.
    pub max_page: usize,
    pub faults: Faults,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            tables: BTreeMap::new(),
            streams: BTreeMap::new(),
            next_sequence: FIRST_SEQUENCE_NUMBER,
            next_shard: 0,
            last_label_millis: 0,
            generation: 0,
            max_page: MAX_SHARDS_PER_PAGE,
            faults: Faults::default(),
        }
    }
}

impl Table {
    /// How many items the table holds, generated ones included.
    pub fn item_count(&self) -> u64 {
        self.synthetic.map_or(self.items.len() as u64, |synthetic| synthetic.items)
    }

    /// The table's size in bytes by DynamoDB's item size rules.
    pub fn size_bytes(&self) -> u64 {
        match self.synthetic {
            Some(synthetic) => synthetic.size_bytes(),
            None => self.items.values().map(|item| scan::item_size(item) as u64).sum(),
        }
    }
}

impl Model {
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    pub fn stream(&self, arn: &str) -> Option<&Stream> {
        self.streams.get(arn)
    }

    /// The next sequence number a record will get (a `LATEST` iterator starts here).
    pub fn next_sequence(&self) -> u128 {
        self.next_sequence
    }

    /// Creates a table whose stream starts with `shards` open shards, each owning an equal slice of
    /// the key-hash space (like a busy DynamoDB table's stream after its partitions have split).
    pub fn create_table(&mut self, name: &str, key: &str, view: ViewType, shards: usize) -> String {
        assert!(!self.tables.contains_key(name), "table {name} exists already");
        assert!(shards > 0, "a stream has at least one open shard");
        let arn = self.open_stream(name, key, view, shards);
        let table = Table {
            name: name.to_owned(),
            key: key.to_owned(),
            view,
            created_seconds: now_millis() / 1000,
            items: BTreeMap::new(),
            synthetic: None,
            stream_arn: arn.clone(),
            stream_enabled: true,
        };
        self.tables.insert(name.to_owned(), table);
        arn
    }

    /// Creates a table like [`Self::create_table`] (key `pk`, one shard) whose items are `synthetic`:
    /// generated when a `Scan` reads them, never stored.
    pub fn create_synthetic_table(&mut self, name: &str, view: ViewType, synthetic: Synthetic) -> String {
        let arn = self.create_table(name, "pk", view, 1);
        self.table_mut(name).synthetic = Some(synthetic);
        arn
    }

    /// Puts (`Some`) or deletes (`None`) the item `pk` and appends the record that change makes.
    /// No change (deleting a missing item, writing identical attributes) makes no record.
    pub fn write(&mut self, table: &str, pk: &str, attributes: Option<Attributes>) -> Option<Written> {
        let current = self.table_mut(table);
        assert!(current.synthetic.is_none(), "table {table} is synthetic: its items are generated, not written");
        let key_value = json!({ "S": pk });
        let mut keys = Attributes::new();
        keys.insert(current.key.clone(), key_value.clone());
        let new_image = attributes.map(|mut item| {
            item.insert(current.key.clone(), key_value);
            item
        });
        let old_image = current.items.get(pk).cloned();
        let event_name = match (&old_image, &new_image) {
            (None, None) => return None,
            (Some(old), Some(new)) if old == new => return None,
            (None, Some(_)) => EventName::Insert,
            (Some(_), Some(_)) => EventName::Modify,
            (Some(_), None) => EventName::Remove,
        };
        match &new_image {
            Some(item) => current.items.insert(pk.to_owned(), item.clone()),
            None => current.items.remove(pk),
        };
        self.append(table, NewRecord { keys, new_image, old_image, event_name, user_identity: None })
    }

    /// Appends `record` to the open shard of the table's stream that owns its keys. `None` when the
    /// stream is disabled or the owning shard was dropped.
    pub fn append(&mut self, table: &str, record: NewRecord) -> Option<Written> {
        let current = self.table_mut(table);
        if !current.stream_enabled {
            return None;
        }
        let arn = current.stream_arn.clone();
        let hash = names::key_hash(&record.keys);
        let stream = self.streams.get_mut(&arn)?;
        let view = stream.view;
        // Exactly one open shard owns the hash; after roll-overs the open ones are the newest.
        let shard = stream.shards.iter_mut().rev().find(|shard| shard.owns(hash))?;
        let sequence_number = self.next_sequence;
        self.next_sequence += 1;
        let event_name = record.event_name;
        let created_seconds = now_millis() / 1000;
        let json = shapes::record(sequence_number, created_seconds, &record, view).to_string();
        shard.records.push(StoredRecord { sequence_number, json });
        shard.last_written = Some(sequence_number);
        Some(Written { shard_id: shard.id.clone(), sequence_number: sequence_number.to_string(), event_name })
    }

    /// Closes an open shard of the table's current stream and opens two children that split its keys.
    pub fn split(&mut self, table: &str, shard_id: &str) -> (String, String) {
        let arn = self.table_mut(table).stream_arn.clone();
        let parent = self.stream_mut(&arn).shard_mut(shard_id);
        assert!(parent.is_open(), "shard {shard_id} of {table} is closed already");
        let (low, high) = parent.hashes;
        assert!(low < high, "shard {shard_id} owns a single key hash and cannot be split");
        parent.close();
        let middle = low + (high - low) / 2;
        let first = self.add_shard(&arn, Some(shard_id.to_owned()), (low, middle));
        let second = self.add_shard(&arn, Some(shard_id.to_owned()), (middle + 1, high));
        (first, second)
    }

    /// Closes every open shard of the table's current stream, each with one child: `(parent, child)`.
    pub fn roll_over(&mut self, table: &str) -> Vec<(String, String)> {
        let arn = self.table_mut(table).stream_arn.clone();
        let stream = self.stream_mut(&arn);
        let mut open = Vec::new();
        for shard in stream.shards.iter_mut().filter(|shard| shard.is_open()) {
            shard.close();
            open.push((shard.id.clone(), shard.hashes));
        }
        open.into_iter().map(|(parent, hashes)| (parent.clone(), self.add_shard(&arn, Some(parent), hashes))).collect()
    }

    /// Ends the table's stream: it becomes `DISABLED`, its open shards close, writes make no records.
    pub fn disable_stream(&mut self, table: &str) {
        let current = self.table_mut(table);
        current.stream_enabled = false;
        let arn = current.stream_arn.clone();
        let stream = self.stream_mut(&arn);
        stream.enabled = false;
        stream.shards.iter_mut().for_each(Shard::close);
    }

    /// Ends the table's stream and gives the table a new one (new label and ARN, one open shard).
    pub fn reenable_stream(&mut self, table: &str) -> String {
        self.disable_stream(table);
        let (key, view) = {
            let current = self.table_mut(table);
            (current.key.clone(), current.view)
        };
        let arn = self.open_stream(table, &key, view, 1);
        let current = self.table_mut(table);
        current.stream_arn = arn.clone();
        current.stream_enabled = true;
        arn
    }

    /// Deletes a stream that is no longer its table's latest, with its shards and records.
    pub fn delete_stream(&mut self, arn: &str) {
        let stream = self.streams.get(arn).unwrap_or_else(|| panic!("no stream {arn}"));
        let table = self.table(&stream.table).unwrap_or_else(|| panic!("no table {} of {arn}", stream.table));
        assert!(table.stream_arn != arn, "stream {arn} is its table's latest; re-enable the stream first");
        self.streams.remove(arn);
    }

    /// Removes a shard (of any of the table's streams) with its records.
    pub fn drop_shard(&mut self, table: &str, shard_id: &str) {
        let stream = self
            .streams
            .values_mut()
            .find(|stream| stream.table == table && stream.shard(shard_id).is_some())
            .unwrap_or_else(|| panic!("table {table} has no shard {shard_id}"));
        stream.shards.retain(|shard| shard.id != shard_id);
    }

    /// Removes every shard (of every stream) that closed before `now - age`, with its records, as
    /// DynamoDB stops listing a shard 24 hours after it closed. One pass over each stream, however many
    /// go. Returns how many went.
    pub fn drop_closed_shards(&mut self, age: Duration) -> usize {
        let Some(cutoff) = Instant::now().checked_sub(age) else { return 0 };
        let mut dropped = 0;
        for stream in self.streams.values_mut() {
            let before = stream.shards.len();
            stream.shards.retain(|shard| !shard.closed_before(cutoff));
            dropped += before - stream.shards.len();
        }
        dropped
    }

    /// How many shards the table's streams list, open and closed.
    pub fn listed_shards(&self, table: &str) -> usize {
        self.streams.values().filter(|stream| stream.table == table).map(|stream| stream.shards.len()).sum()
    }

    /// Trims every position before `sequence_number` in every shard of the table's streams.
    pub fn trim_before(&mut self, table: &str, sequence_number: u128) {
        let Some(through) = sequence_number.checked_sub(1) else { return };
        for shard in self.table_shards_mut(table) {
            shard.trim_through(through);
        }
    }

    /// Trims every shard of the table's streams down to its newest `keep` records.
    pub fn trim_all_but_last(&mut self, table: &str, keep: usize) {
        for shard in self.table_shards_mut(table) {
            if shard.records.len() > keep {
                let through = shard.records[shard.records.len() - keep - 1].sequence_number;
                shard.trim_through(through);
            }
        }
    }

    /// The ids of the open shards of the table's current stream.
    pub fn open_shards(&self, table: &str) -> Vec<String> {
        let arn = self.table(table).map(|current| current.stream_arn.as_str()).unwrap_or_default();
        let shards = self.stream(arn).map(|stream| stream.shards.as_slice()).unwrap_or_default();
        shards.iter().filter(|shard| shard.is_open()).map(|shard| shard.id.clone()).collect()
    }

    /// Opens a stream with `shards` open shards that split the key-hash space into contiguous slices.
    fn open_stream(&mut self, table: &str, key: &str, view: ViewType, shards: usize) -> String {
        let millis = now_millis().max(self.last_label_millis + 1);
        self.last_label_millis = millis;
        let label = names::stream_label(millis);
        let arn = names::stream_arn(table, &label);
        let stream = Stream {
            arn: arn.clone(),
            label,
            table: table.to_owned(),
            key: key.to_owned(),
            view,
            enabled: true,
            created_seconds: millis / 1000,
            shards: Vec::new(),
        };
        self.streams.insert(arn.clone(), stream);
        for hashes in hash_slices(shards) {
            self.add_shard(&arn, None, hashes);
        }
        arn
    }

    fn add_shard(&mut self, arn: &str, parent: Option<String>, hashes: (u64, u64)) -> String {
        let id = names::shard_id(self.next_shard, arn);
        self.next_shard += 1;
        let start = self.next_sequence;
        self.next_sequence += 1;
        let shard = Shard {
            id: id.clone(),
            parent,
            start,
            end: None,
            hashes,
            records: Vec::new(),
            last_written: None,
            trimmed_through: None,
            closed_at: None,
        };
        self.stream_mut(arn).shards.push(shard);
        id
    }

    fn table_mut(&mut self, name: &str) -> &mut Table {
        self.tables.get_mut(name).unwrap_or_else(|| panic!("no table {name}: create it first"))
    }

    fn stream_mut(&mut self, arn: &str) -> &mut Stream {
        self.streams.get_mut(arn).unwrap_or_else(|| panic!("no stream {arn}"))
    }

    fn table_shards_mut(&mut self, table: &str) -> impl Iterator<Item = &mut Shard> {
        assert!(self.tables.contains_key(table), "no table {table}: create it first");
        let streams = self.streams.values_mut().filter(move |stream| stream.table == table);
        streams.flat_map(|stream| stream.shards.iter_mut())
    }
}

/// `n` contiguous inclusive ranges that cover the whole key-hash space, the last one taking the rest.
fn hash_slices(n: usize) -> Vec<(u64, u64)> {
    let width = u64::MAX / n as u64;
    (0..n as u64).map(|i| (i * width, if i + 1 == n as u64 { u64::MAX } else { (i + 1) * width - 1 })).collect()
}

/// Wall-clock milliseconds since the Unix epoch (record times and stream labels are wall-clock in AWS).
fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(value: &str) -> Option<Attributes> {
        json!({ "v": { "S": value } }).as_object().cloned()
    }

    #[test]
    fn writes_derive_event_names_from_the_item_state() {
        let mut model = Model::default();
        model.create_table("t", "pk", ViewType::NewAndOldImages, 1);
        let event = |written: Option<Written>| written.map(|w| w.event_name);
        assert_eq!(event(model.write("t", "a", None)), None);
        assert_eq!(event(model.write("t", "a", item("1"))), Some(EventName::Insert));
        assert_eq!(event(model.write("t", "a", item("1"))), None);
        assert_eq!(event(model.write("t", "a", item("2"))), Some(EventName::Modify));
        assert_eq!(event(model.write("t", "a", None)), Some(EventName::Remove));
    }

    #[test]
    fn a_split_sends_each_key_to_one_child_for_good() {
        let mut model = Model::default();
        model.create_table("t", "pk", ViewType::NewImage, 1);
        let parent = model.open_shards("t").remove(0);
        let last = model.write("t", "k0", item("x")).map(|w| w.sequence_number);
        let (first, second) = model.split("t", &parent);
        let stream = model.stream(&model.tables["t"].stream_arn);
        let end = stream.and_then(|stream| stream.shard(&parent)).and_then(|shard| shard.end);
        assert_eq!(end.map(|end| end.to_string()), last);
        let mut children = std::collections::BTreeSet::new();
        for round in 0..3 {
            for key in 0..40 {
                let written = model.write("t", &format!("k{key}"), item(&round.to_string()));
                let shard = written.map(|w| w.shard_id).unwrap_or_default();
                assert!(shard == first || shard == second, "{shard}");
                let other = model.write("t", &format!("k{key}"), item("again")).map(|w| w.shard_id);
                assert_eq!(other.as_deref(), Some(shard.as_str()));
                children.insert(shard);
            }
        }
        assert_eq!(children.len(), 2, "40 keys should land in both children");
    }

    #[test]
    fn a_table_created_with_many_shards_sends_each_key_to_one_of_them() {
        assert_eq!(hash_slices(1), vec![(0, u64::MAX)]);
        let slices = hash_slices(7);
        assert_eq!((slices[0].0, slices[6].1), (0, u64::MAX));
        assert!(slices.windows(2).all(|pair| pair[0].1 + 1 == pair[1].0), "{slices:?}");
        let mut model = Model::default();
        model.create_table("t", "pk", ViewType::NewImage, 4);
        let open = model.open_shards("t");
        assert_eq!(open.len(), 4);
        let mut used = std::collections::BTreeSet::new();
        for key in 0..100 {
            let first = model.write("t", &format!("k{key}"), item("1")).map(|w| w.shard_id);
            let again = model.write("t", &format!("k{key}"), item("2")).map(|w| w.shard_id);
            assert_eq!(first, again, "k{key} moved between shards");
            used.insert(first.unwrap_or_default());
        }
        assert_eq!(used.into_iter().collect::<Vec<_>>(), open, "100 keys should land in all four shards");
    }

    #[test]
    fn closed_shards_go_once_older_than_the_age_and_the_rest_are_still_found() {
        let mut model = Model::default();
        let arn = model.create_table("t", "pk", ViewType::NewImage, 3);
        let first = model.open_shards("t");
        model.roll_over("t");
        let second = model.open_shards("t");
        assert_eq!(model.drop_closed_shards(Duration::from_secs(3600)), 0, "they closed just now");
        assert_eq!(model.listed_shards("t"), 6);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(model.drop_closed_shards(Duration::from_millis(1)), 3);
        assert_eq!(model.listed_shards("t"), 3);
        let stream = model.stream(&arn).unwrap();
        assert!(first.iter().all(|id| stream.shard(id).is_none()), "the closed parents are gone");
        for (parent, child) in first.iter().zip(&second) {
            assert_eq!(stream.shard(child).and_then(|shard| shard.parent.as_ref()), Some(parent));
        }
        let after_gone: Vec<&str> = stream.shards_after(&first[0]).iter().map(|shard| shard.id.as_str()).collect();
        assert_eq!(after_gone, second, "a page after a dropped shard starts at the next one kept");
        assert!(model.write("t", "k", item("1")).is_some_and(|written| second.contains(&written.shard_id)));
    }
}
