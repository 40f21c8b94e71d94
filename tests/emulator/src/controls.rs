//! The methods tests call on [`FaultyStreams`]: tables and writes, shard topology, streams re-enabled
//! and deleted, retention and iterator expiry, and queued faults with per-operation call counts.
//!
//! Each control takes the model lock once, so a change is atomic with respect to API calls: a
//! `DescribeStream` sees a split either wholly or not at all. Misuse (an unknown table or shard)
//! panics with a message, like the rest of the test harness.

use std::time::Duration;

use serde_json::Value;

use super::FaultyStreams;
use super::faults::{Fault, Op, Throttle};
use super::scan::Synthetic;
use super::types::{Attributes, NewRecord, ViewType, Written};

impl FaultyStreams {
    /// Creates a table keyed by the string attribute `key`, with an enabled stream of `view` type and
    /// one open shard. Returns the stream ARN.
    pub fn create_table(&self, name: &str, key: &str, view: ViewType) -> String {
        self.model().create_table(name, key, view, 1)
    }

    /// Like [`Self::create_table`], with `shards` open shards at once, each owning an equal slice of the
    /// key-hash space (a table of many partitions: the idle-fleet benchmark's thousand shards).
    pub fn create_table_with_shards(&self, name: &str, key: &str, view: ViewType, shards: usize) -> String {
        self.model().create_table(name, key, view, shards)
    }

    /// Creates a table keyed by the string attribute `pk`, with a `NEW_AND_OLD_IMAGES` stream of one
    /// open shard, whose `items` items of `item_bytes` bytes each (by DynamoDB's size rules) are
    /// generated when a `Scan` reads them: item `i` has key `i` zero-padded to ten digits, a number
    /// `n`, a boolean `even`, a list `tags` and a pseudo-random string `payload` filling it up, the
    /// same on every read. `DescribeTable` reports their count and size. The items cannot be written
    /// (records can still be [`Self::put`] into the stream). Returns the stream ARN.
    pub fn synthetic_table(&self, name: &str, items: u64, item_bytes: usize) -> String {
        self.model().create_synthetic_table(name, ViewType::NewAndOldImages, Synthetic { items, item_bytes })
    }

    /// The key of the synthetic tables' item `index` (see [`Self::synthetic_table`]).
    pub fn synthetic_key(index: u64) -> String {
        Synthetic::key(index)
    }

    /// The ARN of the table's latest stream.
    pub fn stream_arn(&self, table: &str) -> String {
        let model = self.model();
        model.table(table).map(|current| current.stream_arn.clone()).unwrap_or_else(|| panic!("no table {table}"))
    }

    /// The ids of the open shards of the table's latest stream, oldest first.
    pub fn open_shards(&self, table: &str) -> Vec<String> {
        self.model().open_shards(table)
    }

    /// The table's current item `pk`.
    pub fn item(&self, table: &str, pk: &str) -> Option<Attributes> {
        self.model().table(table).and_then(|current| current.items.get(pk).cloned())
    }

    /// Puts (`Some`, a JSON object of DynamoDB attribute values; the key attribute is added) or deletes
    /// (`None`) the item `pk`, and appends the `INSERT`, `MODIFY` or `REMOVE` record with the images
    /// the item state gives. `None` when nothing changed (like DynamoDB, no record then), the stream is
    /// disabled, or the shard owning the key was dropped.
    pub fn write(&self, table: &str, pk: &str, attributes: Option<Value>) -> Option<Written> {
        let attributes = attributes.map(|value| match value {
            Value::Object(map) => map,
            other => panic!("item attributes must be a JSON object, not {other}"),
        });
        self.model().write(table, pk, attributes)
    }

    /// Appends `record` as given (the table's items are not touched), to the open shard owning its keys.
    pub fn put(&self, table: &str, record: NewRecord) -> Option<Written> {
        self.model().append(table, record)
    }

    /// Closes an open shard (its `EndingSequenceNumber` becomes its last record's) and opens two children
    /// with `ParentShardId` set, each owning half of its keys. Returns the children's ids.
    pub fn split(&self, table: &str, shard_id: &str) -> (String, String) {
        self.model().split(table, shard_id)
    }

    /// Closes every open shard of the table's stream, each with one child taking over its keys.
    /// Returns `(parent, child)` pairs.
    pub fn roll_over(&self, table: &str) -> Vec<(String, String)> {
        self.model().roll_over(table)
    }

    /// Removes a shard with its records: it is no longer listed, and its iterators (old and new) get
    /// `ResourceNotFoundException`. Children keep their `ParentShardId`. Writes whose key an open
    /// dropped shard owned make no records.
    pub fn drop_shard(&self, table: &str, shard_id: &str) {
        self.model().drop_shard(table, shard_id);
    }

    /// Drops every shard, of every table and stream, that closed more than `age` ago, with its records
    /// (DynamoDB stops listing a shard 24 hours after it closed). Returns how many went.
    pub fn drop_closed_shards(&self, age: Duration) -> usize {
        self.model().drop_closed_shards(age)
    }

    /// How many shards the table's streams list, open and closed.
    pub fn listed_shards(&self, table: &str) -> usize {
        self.model().listed_shards(table)
    }

    /// Disables the table's stream: `DISABLED`, shards closed, `DescribeTable` shows `StreamEnabled:
    /// false`, and writes make no records.
    pub fn disable_stream(&self, table: &str) {
        self.model().disable_stream(table);
    }

    /// Gives the table a new stream (new label and ARN, one fresh open shard). The old stream ends
    /// (`DISABLED`, all shards closed) and can still be described and read. Returns the new ARN.
    pub fn reenable_stream(&self, table: &str) -> String {
        self.model().reenable_stream(table)
    }

    /// Deletes a stream that is no longer its table's latest (as AWS does 24 hours after a stream was
    /// disabled): `DescribeStream`, `GetShardIterator` and its iterators get `ResourceNotFoundException`.
    pub fn delete_stream(&self, stream_arn: &str) {
        self.model().delete_stream(stream_arn);
    }

    /// Expires every iterator issued so far: `GetRecords` on one gets `ExpiredIteratorException`.
    pub fn expire_iterators(&self) {
        self.model().generation += 1;
    }

    /// Trims every record before `sequence_number` in all the table's shards. An `AT_`/`AFTER_`
    /// iterator request or a `GetRecords` at a trimmed position gets `TrimmedDataAccessException`;
    /// `TRIM_HORIZON` starts at the oldest record kept.
    pub fn trim_before(&self, table: &str, sequence_number: &str) {
        let number = sequence_number.parse().unwrap_or_else(|_| panic!("not a sequence number: {sequence_number}"));
        self.model().trim_before(table, number);
    }

    /// Trims each of the table's shards down to its newest `keep` records (see [`Self::trim_before`]).
    pub fn trim_all_but_last(&self, table: &str, keep: usize) {
        self.model().trim_all_but_last(table, keep);
    }

    /// The next `n` calls of `op` get the throttling error `kind` (HTTP 400).
    pub fn throttle(&self, op: Op, kind: Throttle, n: usize) {
        self.model().faults.push(op, Fault::throttle(kind), n);
    }

    /// The next `n` calls of `op` get HTTP 500 `InternalServerError`.
    pub fn fail_5xx(&self, op: Op, n: usize) {
        self.model().faults.push(op, Fault::internal_server_error(), n);
    }

    /// The next `n` calls of `op` get the error `code` with HTTP `status` (e.g. 400 `AccessDeniedException`).
    pub fn fail_with(&self, op: Op, status: u16, code: &'static str, n: usize) {
        self.model().faults.push(op, Fault::Error { status, code, message: "Injected failure" }, n);
    }

    /// The next `n` calls of `op` are answered normally, but only after `duration`: an SDK client with a
    /// shorter attempt timeout sees a time-out.
    pub fn delay(&self, op: Op, duration: Duration, n: usize) {
        self.model().faults.push(op, Fault::Delay(duration), n);
    }

    /// The next `n` `DescribeTable` calls get a stale answer, as DynamoDB's eventually consistent reads
    /// may give for a while after a stream is re-enabled: `LatestStreamArn` names `stream_arn` (an older
    /// stream) instead of the table's latest. Whichever table a call names.
    pub fn stale_describe_table(&self, stream_arn: &str, n: usize) {
        self.model().faults.push(Op::DescribeTable, Fault::StaleTable { stream_arn: stream_arn.to_owned() }, n);
    }

    /// How many faults are still queued for `op`.
    pub fn pending_faults(&self, op: Op) -> usize {
        self.model().faults.pending(op)
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.model().faults.clear();
    }

    /// `DescribeStream` returns at most `n` shards per page (with `LastEvaluatedShardId` when more
    /// remain); AWS's own maximum of 100 still applies.
    pub fn page_size(&self, n: usize) {
        assert!(n > 0, "a DescribeStream page holds at least one shard");
        self.model().max_page = n;
    }

    /// How many calls of `op` arrived so far, failed and delayed ones included.
    pub fn calls(&self, op: Op) -> usize {
        self.model().faults.calls(op)
    }
}
