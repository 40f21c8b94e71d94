//! The table set's watch over the in-memory store and an in-memory catalog, on paused time: one
//! replica evaluates per interval whatever the fleet's size, tag checks are bounded and stalest
//! first, and a replica that cannot check a table keeps what the fleet stored.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use coordination::MemoryStore;

use super::*;

/// Tables with their tags; counts the calls.
#[derive(Default)]
struct Catalog {
    tables: Mutex<BTreeMap<String, Vec<(String, String)>>>,
    /// Tables whose tags cannot be read (throttled).
    failing: Mutex<BTreeSet<String>>,
    lists: AtomicUsize,
    /// `ListTables` fails (access denied).
    list_fails: std::sync::atomic::AtomicBool,
    tag_calls: Mutex<Vec<String>>,
}

impl Catalog {
    fn with(tables: &[(&str, bool)]) -> Arc<Catalog> {
        let catalog = Catalog::default();
        for (table, tagged) in tables {
            catalog.set(table, *tagged);
        }
        Arc::new(catalog)
    }

    fn set(&self, table: &str, tagged: bool) {
        let tags = if tagged { vec![("stream".to_owned(), "on".to_owned())] } else { Vec::new() };
        self.tables.lock().unwrap().insert(table.to_owned(), tags);
    }

    fn tag_calls(&self) -> Vec<String> {
        self.tag_calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl TableCatalog for Catalog {
    async fn list_tables(&self) -> Result<Vec<String>, ReadError> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        if self.list_fails.load(Ordering::SeqCst) {
            return Err(ReadError::Other("AccessDeniedException: dynamodb:ListTables".to_owned()));
        }
        Ok(self.tables.lock().unwrap().keys().cloned().collect())
    }

    async fn table_arn(&self, table: &str) -> Result<String, ReadError> {
        Ok(format!("arn:aws:dynamodb:r:123456789012:table/{table}"))
    }

    async fn tags(&self, arn: &str) -> Result<Vec<(String, String)>, ReadError> {
        let table = arn.rsplit('/').next().unwrap().to_owned();
        self.tag_calls.lock().unwrap().push(table.clone());
        if self.failing.lock().unwrap().contains(&table) {
            return Err(ReadError::Throttled("slow down".to_owned()));
        }
        self.tables.lock().unwrap().get(&table).cloned().ok_or_else(|| ReadError::NotFound(table))
    }
}

const INTERVAL: Duration = Duration::from_secs(2);

/// A replica's watch: names `named`, pattern `itx-*`, tag `stream=on`.
fn replica(
    catalog: &Arc<Catalog>,
    store: &Arc<MemoryStore>,
    named: &[&str],
) -> (TableSetWatch, watch::Receiver<Selected>) {
    let selection = TableSelection {
        names: named.iter().map(|name| (*name).to_owned()).collect(),
        patterns: vec!["itx-*".to_owned()],
        tags: vec![("stream".to_owned(), "on".to_owned())],
        refresh_interval: INTERVAL,
    };
    let api: Arc<dyn TableCatalog> = catalog.clone();
    let context = TablesContext { api, selection, group: "g".to_owned(), metrics: Arc::new(Metrics::new()) };
    let store: Arc<dyn LeaseStore> = store.clone();
    let (selected, watch) = TableSet::start(context, store);
    (watch.expect("a dynamic selection has a watch"), selected)
}

fn set(selected: &watch::Receiver<Selected>) -> Vec<(String, &'static str)> {
    selected
        .borrow()
        .as_deref()
        .map(|set| set.iter().map(|(t, by)| (t.clone(), by.as_str())).collect())
        .unwrap_or_default()
}

fn expect(pairs: &[(&str, &'static str)]) -> Vec<(String, &'static str)> {
    pairs.iter().map(|(t, by)| ((*t).to_owned(), *by)).collect()
}

#[tokio::test(start_paused = true)]
async fn one_replica_evaluates_per_interval_whatever_the_fleet_size() {
    let catalog = Catalog::with(&[("itx-a", false), ("tagged", true), ("other", false)]);
    let store = Arc::new(MemoryStore::new());
    let mut replicas: Vec<_> = (0..3).map(|_| replica(&catalog, &store, &["plain"])).collect();
    let seconds = 30;
    // The replicas read at the same moments, and a refresh takes time (its tag checks are paced), so
    // they all find the set due together.
    for _ in 0..seconds {
        futures::future::join_all(replicas.iter_mut().map(|(watch, _)| watch.step())).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let lists = catalog.lists.load(Ordering::SeqCst);
    // At most one evaluation per interval for the fleet (three replicas on their own: about 30).
    assert!(lists <= seconds / INTERVAL.as_secs() as usize + 1, "{lists} ListTables calls in {seconds} s");
    assert!(lists >= 5, "the set is re-evaluated: {lists}");
    for (_, selected) in &replicas {
        assert_eq!(set(selected), expect(&[("itx-a", "pattern"), ("plain", "name"), ("tagged", "tags")]));
    }
    // A table tagged later joins every replica's set within an interval and a read or two.
    catalog.set("other", true);
    for _ in 0..(INTERVAL.as_secs() + 3) {
        futures::future::join_all(replicas.iter_mut().map(|(watch, _)| watch.step())).await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    for (_, selected) in &replicas {
        assert!(set(selected).contains(&("other".to_owned(), "tags")), "{:?}", set(selected));
    }
}

#[tokio::test(start_paused = true)]
async fn tags_are_checked_at_most_fifty_per_refresh_never_checked_first_then_stalest() {
    let tables: Vec<(String, bool)> = (0..120).map(|i| (format!("t{i:03}"), i % 2 == 0)).collect();
    let catalog = Catalog::with(&tables.iter().map(|(t, tagged)| (t.as_str(), *tagged)).collect::<Vec<_>>());
    let store = Arc::new(MemoryStore::new());
    let (mut watch, selected) = replica(&catalog, &store, &[]);
    let started = Instant::now();
    watch.step().await;
    let first = catalog.tag_calls();
    assert_eq!(first.len(), TAG_QUERIES_PER_REFRESH);
    // Paced: 50 calls at 5 a second take about 10 s.
    assert!(started.elapsed() >= Duration::from_secs(9), "{:?}", started.elapsed());
    assert_eq!(set(&selected).len(), 25, "the tagged half of the 50 checked");
    tokio::time::advance(INTERVAL).await;
    watch.step().await;
    tokio::time::advance(INTERVAL).await;
    watch.step().await;
    let calls = catalog.tag_calls();
    assert_eq!(calls.len(), 3 * TAG_QUERIES_PER_REFRESH);
    let checked: BTreeSet<&String> = calls[..120].iter().collect();
    assert_eq!(checked.len(), 120, "every table checked once before any twice");
    assert_eq!(&calls[120..], &first[..30], "then the stalest first");
    assert_eq!(set(&selected).len(), 60, "every tagged table");
}

#[tokio::test(start_paused = true)]
async fn a_table_whose_tags_cannot_be_read_keeps_what_the_fleet_stored() {
    let catalog = Catalog::with(&[("tagged", true), ("plain", false)]);
    let store = Arc::new(MemoryStore::new());
    let (mut first, _) = replica(&catalog, &store, &["plain", "missing"]);
    first.step().await;
    // Another replica, which never checked `tagged` and cannot now, refreshes next.
    catalog.failing.lock().unwrap().insert("tagged".to_owned());
    let (mut second, selected) = replica(&catalog, &store, &["plain", "missing"]);
    for _ in 0..(INTERVAL.as_secs() + 2) {
        second.step().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert!(catalog.lists.load(Ordering::SeqCst) >= 2, "the second replica refreshed");
    // Named tables are selected without any call, even one that does not exist (yet).
    assert_eq!(set(&selected), expect(&[("missing", "name"), ("plain", "name"), ("tagged", "tags")]));
    assert!(!catalog.tag_calls().contains(&"plain".to_owned()), "a named table's tags are never read");
    // Untagged and readable again: it leaves the set.
    catalog.failing.lock().unwrap().clear();
    catalog.set("tagged", false);
    for _ in 0..(INTERVAL.as_secs() + 2) {
        second.step().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(set(&selected), expect(&[("missing", "name"), ("plain", "name")]));
}

#[test]
fn stored_values_stay_small_with_the_longest_names() {
    let table = "t".repeat(255);
    let value = serde_json::json!({ "table": table, "by": SelectedBy::Pattern.as_str() }).to_string();
    assert!(value.len() < 320, "{}", value.len());
    let decoded: TableValue = serde_json::from_str(&value).unwrap();
    assert_eq!(decoded, TableValue { table: table.clone(), by: SelectedBy::Pattern });
    let head = SetHead { changes: u64::MAX, tables: usize::MAX, at: u64::MAX, pending: true };
    assert!(serde_json::to_vec(&head).unwrap().len() < 128);
    let key = table_key("0123456789abcdef", &table);
    coordination::keys::check_kv_key(&key).expect("a valid KV key");
    assert!(table_key("g", "a.b").ends_with("table.a=2Eb"));
}

#[tokio::test(start_paused = true)]
async fn named_tables_are_read_while_discovery_fails_and_the_rest_joins_once_it_works() {
    let catalog = Catalog::with(&[("plain", false), ("itx-a", false)]);
    catalog.list_fails.store(true, Ordering::SeqCst);
    let store = Arc::new(MemoryStore::new());
    let (mut watch, selected) = replica(&catalog, &store, &["plain"]);
    watch.step().await;
    assert_eq!(set(&selected), expect(&[("plain", "name")]), "the named tables need no AWS call");
    catalog.list_fails.store(false, Ordering::SeqCst);
    for _ in 0..(INTERVAL.as_secs() + 2) {
        tokio::time::advance(Duration::from_secs(1)).await;
        watch.step().await;
    }
    assert_eq!(set(&selected), expect(&[("itx-a", "pattern"), ("plain", "name")]));
}

#[tokio::test(start_paused = true)]
async fn a_replica_reading_the_first_claim_publishes_nothing_until_the_set_is_stored() {
    let catalog = Catalog::with(&[("plain", false), ("itx-a", false)]);
    let store = Arc::new(MemoryStore::new());
    let (mut first, first_selected) = replica(&catalog, &store, &["plain"]);
    let (mut second, second_selected) = replica(&catalog, &store, &["plain"]);
    // The first replica's claim is written, its evaluation not yet.
    let pending = SetHead { pending: true, ..SetHead::default() };
    first.write_head(pending).await.unwrap();
    second.step().await;
    assert!(second_selected.borrow().is_none(), "not the named tables alone: {:?}", set(&second_selected));
    // The evaluation lands: both publish the whole set.
    first.refresh().await;
    first.publish();
    tokio::time::advance(Duration::from_secs(1)).await;
    second.step().await;
    let whole = expect(&[("itx-a", "pattern"), ("plain", "name")]);
    assert_eq!((set(&first_selected), set(&second_selected)), (whole.clone(), whole));
}
