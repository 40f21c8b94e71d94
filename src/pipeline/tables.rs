//! The set of tables the fleet reads, kept in the bucket and re-evaluated from AWS by one replica at
//! a time for the whole fleet (issue 20; the rules are `crate::config::TableSelection`).
//!
//! A static selection (plain names only) never changes: [`TableSet::start`] publishes it once and no
//! task runs. A dynamic one (patterns or a tag rule) is shared through the checkpoint bucket, with the
//! claimed refresh the shard topology already uses (`coordination/DESIGN.md`, "Discovery in the
//! service"), under the lease group (a fingerprint of the rules), so fleets with other rules sharing
//! the bucket keep their own set:
//!
//! | key | value (bytes at most) |
//! |---|---|
//! | `tables/{group}/head` | `{"changes":n,"tables":n,"at":unix_ms}`, with `"pending":true` while the very first evaluation runs (< 128) |
//! | `tables/{group}/table.{escaped name}` | `{"table":"…","by":"pattern"\|"tags"}` (a 255-character name: < 320) |
//!
//! One key per table selected by a pattern or by tags (named tables are always selected and are not
//! stored), so no value grows with the number of tables and the original deployment's bucket (1 KiB
//! values, history 1) takes any set. Every second each replica reads the head (one KV get) and the
//! table keys only when the head's `changes` moved. A replica that has seen the same revision of the
//! head for `TABLE_REFRESH_INTERVAL_SEC` (on its own clock) first **claims** the refresh: it rewrites
//! the head by compare-and-swap at the revision it saw, which moves the revision every other replica
//! times the interval from; a replica that loses the claim makes no AWS call. The winner lists the
//! tables (`ListTables`), checks tags, writes the table keys that changed (each by compare-and-swap),
//! then the head again (`changes` + 1 when a key changed). So one replica per interval pays for the
//! AWS calls, whatever the size of the fleet, even when an evaluation takes longer than the
//! interval. A winner that dies before its second head write leaves the set as it was; the claim's
//! revision then stays unchanged for an interval and another replica refreshes.
//!
//! `ListTagsOfResource` is limited to about 10 calls per second per account, and is the only call
//! whose count grows with the account's tables: a refresh checks the tags of at most
//! [`TAG_QUERIES_PER_REFRESH`] tables, those never checked first, then those checked longest ago, at
//! most [`TAG_QUERIES_PER_SEC`] a second. A table's ARN (from `DescribeTable`, once per name) and the
//! result are cached on the replica; a table not checked in this refresh keeps its last result (on a
//! replica that never checked it, what the stored set says). Tables selected by name or pattern need
//! no tag check. With few tables every refresh re-checks them all; with many, each is re-checked
//! every `ceil(tables / 50)` intervals.
//!
//! Invariant: what a replica publishes is a set the fleet stored (or, before any was stored, the named
//! tables), so replicas disagree only for the second between a head write and their next read. A
//! table that leaves the set loses its shards from the readable set (`super::topology`); the lease
//! protocol hands over held leases of shards outside the set (the reader checkpoints and releases),
//! and checkpoints are never deleted here: a table that comes back resumes where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coordination::keys::escape;
use coordination::{LeaseStore, Revision, StoreError, Versioned};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{SelectedBy, TableSelection, forms_keys, is_valid_table_name};
use crate::metrics::{Metrics, TableSetRefresh};
use crate::pipeline::backfill::watch::now_ms;
use crate::source::TableCatalog;
use crate::source::error::ReadError;

/// How often the head is read: a set changed by another replica is followed within about this long.
const TABLES_READ_INTERVAL: Duration = Duration::from_secs(1);

/// Tables whose tags one refresh checks at most: 50 calls at [`TAG_QUERIES_PER_SEC`] take 10 s.
pub const TAG_QUERIES_PER_REFRESH: usize = 50;

/// `ListTagsOfResource` calls per second at most: half of AWS's limit of about 10 per second per
/// account, leaving the rest to other tools of the account.
pub const TAG_QUERIES_PER_SEC: u32 = 5;

/// The tables selected now, and why; `None` until the fleet's set was first read.
pub type Selected = Option<Arc<BTreeMap<String, SelectedBy>>>;

/// A stored table key's value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct TableValue {
    table: String,
    by: SelectedBy,
}

/// The head of the stored set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SetHead {
    /// Moves by one with every change of the table keys.
    changes: u64,
    /// Tables stored (selected by pattern or tags).
    tables: usize,
    /// When the set was last evaluated or claimed (Unix ms), for an operator reading the bucket.
    at: u64,
    /// Written by the claim of the very first evaluation, before any set was stored: nothing is
    /// published from it (it would be the named tables alone, a second before the whole set).
    #[serde(default)]
    pending: bool,
}

fn head_key(group: &str) -> String {
    format!("tables/{group}/head")
}

fn table_prefix(group: &str) -> String {
    format!("tables/{group}/table.")
}

fn table_key(group: &str, table: &str) -> String {
    format!("{}{}", table_prefix(group), escape(table))
}

/// The tables of group `group`'s set selected by a pattern or tag, as the fleet last stored them (for
/// the operator's commands; the named tables are not stored).
pub async fn stored_tables(store: &dyn LeaseStore, group: &str) -> Result<Vec<String>, StoreError> {
    let prefix = table_prefix(group);
    let entries = store.scan(&[prefix.as_str()]).await?;
    let mut tables: Vec<String> = entries
        .into_iter()
        .filter_map(|(_, entry)| serde_json::from_slice::<TableValue>(&entry.value).ok())
        .map(|value| value.table)
        .collect();
    tables.sort();
    Ok(tables)
}

/// One table's tags as this replica last checked them.
struct TagCheck {
    arn: Option<String>,
    matched: bool,
    checked: Option<Instant>,
}

/// What the watch reads from and reports to.
pub struct TablesContext {
    pub api: Arc<dyn TableCatalog>,
    pub selection: TableSelection,
    /// The lease group: the fingerprint of the selection's rules.
    pub group: String,
    pub metrics: Arc<Metrics>,
}

/// Starts following the table set: the receiver, and the task to run for a dynamic selection.
pub struct TableSet;

impl TableSet {
    /// A static selection is published at once and needs no task; a dynamic one gets a watch.
    pub fn start(
        context: TablesContext,
        store: Arc<dyn LeaseStore>,
    ) -> (watch::Receiver<Selected>, Option<TableSetWatch>) {
        let named: BTreeMap<String, SelectedBy> =
            context.selection.names.iter().map(|name| (name.clone(), SelectedBy::Name)).collect();
        if !context.selection.is_dynamic() {
            context.metrics.tables_selected.set(named.len() as i64);
            let (_, receiver) = watch::channel(Some(Arc::new(named)));
            return (receiver, None);
        }
        let (sender, receiver) = watch::channel(None);
        let watch = TableSetWatch {
            context,
            store,
            seen: None,
            head: None,
            stored: BTreeMap::new(),
            read_at: None,
            tags: HashMap::new(),
            selected: sender,
            refresh_failed: false,
        };
        (receiver, Some(watch))
    }
}

/// The task that keeps a dynamic table set fresh.
pub struct TableSetWatch {
    context: TablesContext,
    store: Arc<dyn LeaseStore>,
    /// The head's revision and when this replica first saw it.
    seen: Option<(Revision, Instant)>,
    head: Option<SetHead>,
    /// The table keys as last read or written.
    stored: BTreeMap<String, Versioned>,
    /// The head's `changes` when `stored` was read.
    read_at: Option<u64>,
    tags: HashMap<String, TagCheck>,
    selected: watch::Sender<Selected>,
    /// The last refresh failed (its error was logged; the next success says so).
    refresh_failed: bool,
}

impl TableSetWatch {
    pub async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TABLES_READ_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A refresh cut short is redone by whoever finds the head unchanged for the interval.
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.step() => {}
            }
        }
    }

    /// Reads the stored set, refreshes it from AWS when due, and publishes it.
    async fn step(&mut self) {
        let now = Instant::now();
        if let Err(err) = self.read(now).await {
            tracing::warn!(error = %err, "cannot read the table set; retrying");
            return;
        }
        let due = self.seen.is_none_or(|(_, since)| now >= since + self.context.selection.refresh_interval);
        if due {
            self.refresh().await;
        }
        self.publish();
    }

    /// Reads the head, and the table keys when the head says they changed.
    async fn read(&mut self, now: Instant) -> Result<(), StoreError> {
        let group = &self.context.group;
        let entry = self.store.get(&head_key(group)).await?;
        let revision = entry.as_ref().map(|entry| entry.revision);
        if self.seen.map(|(seen, _)| seen) != revision {
            self.seen = revision.map(|revision| (revision, now));
            self.head = entry.map(|entry| {
                serde_json::from_slice::<SetHead>(&entry.value).unwrap_or_else(|err| {
                    tracing::error!(error = %err, "unreadable table set head; it is rebuilt from AWS");
                    SetHead::default()
                })
            });
        }
        let changes = self.head.as_ref().map(|head| head.changes);
        if changes.is_some() && changes == self.read_at {
            return Ok(());
        }
        let prefix = table_prefix(group);
        self.stored = self.store.scan(&[prefix.as_str()]).await?.into_iter().collect();
        self.read_at = changes;
        Ok(())
    }

    /// The set as stored, plus the named tables (selected whatever the bucket holds).
    fn stored_set(&self) -> BTreeMap<String, SelectedBy> {
        let mut set: BTreeMap<String, SelectedBy> =
            self.context.selection.names.iter().map(|name| (name.clone(), SelectedBy::Name)).collect();
        for (key, entry) in &self.stored {
            match serde_json::from_slice::<TableValue>(&entry.value) {
                Ok(value) => {
                    set.entry(value.table).or_insert(value.by);
                }
                Err(err) => tracing::warn!(key, error = %err, "unreadable table set entry; ignored"),
            }
        }
        set
    }

    fn publish(&self) {
        // Before any set is stored (no head, or the first claim's), only a failed refresh publishes
        // (the named tables, which need no AWS call), so a fleet whose first refresh fails still
        // reads what it was told by name.
        if self.head.as_ref().is_none_or(|head| head.pending) && !self.refresh_failed {
            return;
        }
        let set = self.stored_set();
        self.context.metrics.tables_selected.set(set.len() as i64);
        self.selected.send_if_modified(|current| {
            let changed = current.as_deref().is_none_or(|old| *old != set);
            if changed {
                let added: Vec<&String> =
                    set.keys().filter(|t| current.as_deref().is_none_or(|old| !old.contains_key(*t))).collect();
                let removed: Vec<&String> = current
                    .as_deref()
                    .map(|old| old.keys().filter(|t| !set.contains_key(*t)).collect())
                    .unwrap_or_default();
                tracing::info!(?added, ?removed, tables = set.len(), "table set changed");
                *current = Some(Arc::new(set.clone()));
            }
            changed
        });
    }

    /// Claims the refresh (the head rewritten by compare-and-swap at the revision seen, so that no
    /// other replica finds it due), evaluates the selection from AWS, writes the table keys that
    /// changed, then the head again. A replica that loses the claim makes no AWS call.
    async fn refresh(&mut self) {
        let metrics = Arc::clone(&self.context.metrics);
        let count = |outcome: TableSetRefresh| metrics.table_set_refreshes.with_label_values(&[outcome.as_str()]).inc();
        let pending = self.head.as_ref().is_none_or(|head| head.pending);
        let claim = SetHead { at: now_ms(), pending, ..self.head.clone().unwrap_or_default() };
        match self.write_head(claim).await {
            Ok(()) => {}
            Err(StoreError::Conflict { .. }) => {
                count(TableSetRefresh::Conflict);
                tracing::debug!("another replica claimed the table set's refresh first");
                return;
            }
            Err(err) => {
                count(TableSetRefresh::Failed);
                tracing::warn!(error = %err, "cannot claim the table set's refresh; retrying");
                return;
            }
        }
        let next = match self.evaluate().await {
            Ok(next) => next,
            Err(err) => {
                count(TableSetRefresh::Failed);
                self.refresh_failed = true;
                tracing::warn!(error = %err, "table discovery failed; retrying at the next refresh");
                return;
            }
        };
        if std::mem::take(&mut self.refresh_failed) {
            tracing::info!("table discovery works again");
        }
        match self.write(&next).await {
            Ok(changed) => count(if changed { TableSetRefresh::Changed } else { TableSetRefresh::Unchanged }),
            Err(StoreError::Conflict { .. }) => {
                count(TableSetRefresh::Conflict);
                self.read_at = None;
                tracing::debug!("another replica refreshed the table set meanwhile");
            }
            Err(err) => {
                count(TableSetRefresh::Failed);
                self.read_at = None;
                tracing::warn!(error = %err, "cannot write the table set; retrying");
            }
        }
    }

    /// The tables selected by pattern or tags now (named ones are not stored).
    async fn evaluate(&mut self) -> Result<BTreeMap<String, SelectedBy>, ReadError> {
        let selection = &self.context.selection;
        let listed = self.context.api.list_tables().await?;
        let mut next = BTreeMap::new();
        let mut candidates = Vec::new();
        for table in &listed {
            if !is_valid_table_name(table) || !forms_keys(table) {
                tracing::debug!(table, "a table whose name cannot form checkpoint keys is never selected");
                continue;
            }
            match selection.by_name(table) {
                Some(SelectedBy::Name) => {}
                Some(by) => {
                    next.insert(table.clone(), by);
                }
                None if !selection.tags.is_empty() => candidates.push(table.clone()),
                None => {}
            }
        }
        self.tags.retain(|table, _| listed.contains(table));
        if !candidates.is_empty() {
            self.check_tags(&candidates).await;
        }
        let stored = self.stored_set();
        for table in candidates {
            let matched = match self.tags.get(&table) {
                Some(check) if check.checked.is_some() => check.matched,
                // Never checked here: as the fleet last stored it.
                _ => stored.get(&table) == Some(&SelectedBy::Tags),
            };
            if matched {
                next.insert(table, SelectedBy::Tags);
            }
        }
        Ok(next)
    }

    /// Checks the tags of up to [`TAG_QUERIES_PER_REFRESH`] of `candidates`, stalest first, paced at
    /// [`TAG_QUERIES_PER_SEC`]. A table whose check fails keeps its previous result.
    async fn check_tags(&mut self, candidates: &[String]) {
        let mut order: Vec<(Option<Instant>, &String)> =
            candidates.iter().map(|table| (self.tags.get(table).and_then(|check| check.checked), table)).collect();
        // `None` (never checked) sorts first.
        order.sort();
        let mut pace = tokio::time::interval(Duration::from_secs(1) / TAG_QUERIES_PER_SEC);
        pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
        for (_, table) in order.into_iter().take(TAG_QUERIES_PER_REFRESH) {
            pace.tick().await;
            let check = self.tags.entry(table.clone()).or_insert(TagCheck { arn: None, matched: false, checked: None });
            let arn = match &check.arn {
                Some(arn) => arn.clone(),
                None => match self.context.api.table_arn(table).await {
                    Ok(arn) => check.arn.insert(arn).clone(),
                    Err(err) => {
                        tracing::warn!(table, error = %err, "cannot find the table's ARN to check its tags");
                        continue;
                    }
                },
            };
            self.context.metrics.table_tag_queries.inc();
            match self.context.api.tags(&arn).await {
                Ok(tags) => {
                    check.matched = self.context.selection.tags_match(&tags);
                    check.checked = Some(Instant::now());
                }
                Err(ReadError::NotFound(_)) => {
                    // Deleted since it was listed.
                    check.matched = false;
                    check.checked = Some(Instant::now());
                }
                Err(err) => tracing::warn!(table, error = %err, "cannot read the table's tags; the last result stands"),
            }
        }
    }

    /// Writes the table keys that changed and then the head by compare-and-swap at the revision seen
    /// (the claim). True when the set changed.
    async fn write(&mut self, next: &BTreeMap<String, SelectedBy>) -> Result<bool, StoreError> {
        let group = self.context.group.clone();
        let mut wanted: BTreeMap<String, Bytes> = BTreeMap::new();
        for (table, by) in next {
            let value = serde_json::json!({ "table": table, "by": by.as_str() }).to_string();
            wanted.insert(table_key(&group, table), Bytes::from(value));
        }
        let mut changed = false;
        for (key, value) in &wanted {
            let revision = match self.stored.get(key) {
                Some(current) if current.value == *value => continue,
                Some(current) => self.store.update(key, value.clone(), current.revision).await?,
                None => self.store.create(key, value.clone()).await?,
            };
            changed = true;
            self.stored.insert(key.clone(), Versioned { value: value.clone(), revision });
        }
        let gone: Vec<(String, Revision)> = self
            .stored
            .iter()
            .filter(|(key, _)| !wanted.contains_key(*key))
            .map(|(key, entry)| (key.clone(), entry.revision))
            .collect();
        for (key, revision) in gone {
            self.store.delete(&key, revision).await?;
            self.stored.remove(&key);
            changed = true;
        }
        let previous = self.head.as_ref().map_or(0, |head| head.changes);
        let changes = if changed { previous + 1 } else { previous };
        self.write_head(SetHead { changes, tables: wanted.len(), at: now_ms(), pending: false }).await?;
        Ok(changed)
    }

    /// Writes `head` by compare-and-swap at the revision seen (created when there was none) and
    /// adopts it.
    async fn write_head(&mut self, head: SetHead) -> Result<(), StoreError> {
        let mut value = serde_json::json!({ "changes": head.changes, "tables": head.tables, "at": head.at });
        if head.pending {
            value["pending"] = serde_json::Value::Bool(true);
        }
        let value = Bytes::from(value.to_string());
        let key = head_key(&self.context.group);
        let revision = match self.seen {
            None => self.store.create(&key, value).await?,
            Some((revision, _)) => self.store.update(&key, value, revision).await?,
        };
        self.seen = Some((revision, Instant::now()));
        if self.read_at == self.head.as_ref().map(|head| head.changes) {
            self.read_at = Some(head.changes);
        }
        self.head = Some(head);
        Ok(())
    }
}

#[cfg(test)]
#[path = "tables_tests.rs"]
mod tests;
