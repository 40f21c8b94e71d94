//! The backfill settings (issue 17, `docs/backfill.md`): which tables to backfill once, the read
//! budget the fleet shares, and how a table is cut into `Scan` segments and pages.
//!
//! A table named in `BACKFILL_TABLES` must be one this replica can read: a backfill of a table
//! without a reader would publish a snapshot that no stream ever completes, so a name that cannot be
//! selected is refused at start-up rather than ignored. With a static selection that means a name of
//! `DYNAMODB_TABLES`; with patterns it may also be a name a pattern matches; with a tag rule any valid
//! name is accepted (whether it carries the tags is only known at run time, and a table never
//! selected is simply never backfilled). `*` stands for every selected table, including those
//! discovered later: each is backfilled once, the first time the fleet sees it.

use super::Args;
use super::checker::Checker;
use super::names::is_valid_table_name;
use super::tables::{TableSelection, forms_keys};
use crate::source::scan::MAX_SEGMENTS;

/// The read budget when `BACKFILL_READ_UNITS_PER_SEC` is unset: read capacity units per second for
/// the whole fleet. An eventually consistent `Scan` reads 8 KiB per unit, so 100 units are about 800
/// items of 1 KiB a second, a small share of an on-demand table's capacity.
pub const DEFAULT_READ_UNITS_PER_SEC: f64 = 100.0;

/// Items per `Scan` call when `BACKFILL_PAGE_ITEMS` is unset: with items of about 1 KiB, a page near
/// DynamoDB's 1 MB limit per call, and as many rows as a `GetRecords` page at most.
pub const DEFAULT_PAGE_ITEMS: i32 = 1000;

/// The most items per `Scan` call a setting may ask for. DynamoDB stops a page at 1 MB anyway; a
/// larger page only holds more rows in memory while they are published.
const MAX_PAGE_ITEMS: u64 = 10_000;

/// The validated backfill settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillConfig {
    /// Tables backfilled once, the first time the fleet sees them without a backfill recorded in the
    /// bucket; each is one of the configured tables (`*` lists the named ones and sets `all`). Empty: none.
    pub tables: Vec<String>,
    /// `BACKFILL_TABLES=*`: every selected table, those discovered at run time included.
    pub all: bool,
    /// Read capacity units per second, shared by every replica and every segment being read.
    pub read_units_per_sec: f64,
    /// `TotalSegments` of every backfill's `Scan`; `None`: from the table's size
    /// (`crate::source::scan::segments_for`).
    pub segments: Option<u32>,
    /// `Limit` of each `Scan` call.
    pub page_items: i32,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            tables: Vec::new(),
            all: false,
            read_units_per_sec: DEFAULT_READ_UNITS_PER_SEC,
            segments: None,
            page_items: DEFAULT_PAGE_ITEMS,
        }
    }
}

impl BackfillConfig {
    /// Whether `table` is to be backfilled once (when selected).
    pub fn covers(&self, table: &str) -> bool {
        self.all || self.tables.iter().any(|listed| listed == table)
    }
}

/// The backfill settings of `args`; `selection` is the validated table selection.
pub(super) fn backfill_config(check: &mut Checker, args: &Args, selection: &TableSelection) -> BackfillConfig {
    let all = args.backfill_tables.split(',').map(str::trim).filter(|name| !name.is_empty()).eq(["*"]);
    let mut config =
        BackfillConfig { tables: backfill_tables(check, &args.backfill_tables, selection), all, ..Default::default() };
    let units = args.backfill_read_units_per_sec.trim();
    if !units.is_empty() {
        match units.parse::<f64>() {
            Ok(value) if value.is_finite() && value > 0.0 => config.read_units_per_sec = value,
            _ => check.fail(
                "BACKFILL_READ_UNITS_PER_SEC",
                format!("{units:?} is not a positive number of read capacity units per second"),
            ),
        }
    }
    if !args.backfill_segments.trim().is_empty() {
        let segments = check.number("BACKFILL_SEGMENTS", &args.backfill_segments, 1, MAX_SEGMENTS.into());
        config.segments = u32::try_from(segments).ok();
    }
    if !args.backfill_page_items.trim().is_empty() {
        let items = check.number("BACKFILL_PAGE_ITEMS", &args.backfill_page_items, 1, MAX_PAGE_ITEMS);
        config.page_items = i32::try_from(items).unwrap_or(DEFAULT_PAGE_ITEMS);
    }
    config
}

/// `BACKFILL_TABLES`: names that can be selected, or `*` alone for all of them.
fn backfill_tables(check: &mut Checker, text: &str, selection: &TableSelection) -> Vec<String> {
    const VARIABLE: &str = "BACKFILL_TABLES";
    let tables = &selection.names;
    let names: Vec<&str> = text.split(',').map(str::trim).filter(|name| !name.is_empty()).collect();
    if names == ["*"] {
        return tables.to_vec();
    }
    // A table list with problems of its own is reported under DYNAMODB_TABLES; checking names against
    // what is left of it would only repeat them.
    let tables_ok = !check.0.iter().any(|(variable, _)| *variable == "DYNAMODB_TABLES");
    let mut chosen: Vec<String> = Vec::new();
    for name in names {
        if name == "*" {
            check.fail(VARIABLE, "`*` (every table of DYNAMODB_TABLES) stands alone, without other names");
        } else if chosen.iter().any(|table| table == name) {
            check.fail(VARIABLE, format!("{name:?} is listed twice"));
        } else if selection.is_dynamic() && (!is_valid_table_name(name) || !forms_keys(name)) {
            check.fail(VARIABLE, format!("{name:?} is not a table name that can be read"));
        } else if selection.is_dynamic() && selection.tags.is_empty() && selection.by_name(name).is_none() {
            check.fail(
                VARIABLE,
                format!(
                    "{name:?} is neither named nor matched by a pattern of DYNAMODB_TABLES ({}): only a table \
                     that is read can be backfilled",
                    selection.fingerprint_parts().join(", ")
                ),
            );
        } else if tables_ok && !selection.is_dynamic() && !tables.iter().any(|table| table == name) {
            check.fail(
                VARIABLE,
                format!(
                    "{name:?} is not one of DYNAMODB_TABLES ({}): only a table that is read can be backfilled",
                    tables.join(", ")
                ),
            );
        } else {
            chosen.push(name.to_owned());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    #[test]
    fn defaults_backfill_nothing_at_a_modest_rate() {
        let config = args(&[("dynamodb-tables", "orders")]).validate().expect("valid");
        assert_eq!(config.backfill, BackfillConfig::default());
        assert!(config.backfill.tables.is_empty());
        assert_eq!(config.backfill.read_units_per_sec, 100.0);
        assert_eq!(config.backfill.segments, None);
        assert_eq!(config.backfill.page_items, 1000);
    }

    #[test]
    fn every_setting_is_read() {
        let config = args(&[
            ("dynamodb-tables", "orders,customers,items"),
            ("backfill-tables", " items , orders"),
            ("backfill-read-units-per-sec", "2.5"),
            ("backfill-segments", "16"),
            ("backfill-page-items", "250"),
        ])
        .validate()
        .expect("valid");
        assert_eq!(config.backfill.tables, ["items", "orders"]);
        assert_eq!(config.backfill.read_units_per_sec, 2.5);
        assert_eq!(config.backfill.segments, Some(16));
        assert_eq!(config.backfill.page_items, 250);
    }

    #[test]
    fn a_star_backfills_every_configured_table() {
        let config =
            args(&[("dynamodb-tables", "orders,customers"), ("backfill-tables", "*")]).validate().expect("valid");
        assert_eq!(config.backfill.tables, ["orders", "customers"]);
    }

    #[test]
    fn empty_values_are_unset() {
        let config = args(&[
            ("dynamodb-tables", "orders"),
            ("backfill-tables", " , "),
            ("backfill-read-units-per-sec", ""),
            ("backfill-segments", " "),
            ("backfill-page-items", ""),
        ])
        .validate()
        .expect("valid");
        assert_eq!(config.backfill, BackfillConfig::default());
    }

    #[test]
    fn a_table_that_is_not_read_is_refused() {
        let error = args(&[("dynamodb-tables", "orders,customers"), ("backfill-tables", "orders,invoices")])
            .validate()
            .expect_err("invoices is not read");
        assert_eq!(error.0.len(), 1, "{error}");
        assert_eq!(error.0[0].0, "BACKFILL_TABLES");
        assert!(error.0[0].1.contains("\"invoices\" is not one of DYNAMODB_TABLES (orders, customers)"), "{error}");
    }

    #[test]
    fn bad_backfill_settings_are_each_named() {
        let error = args(&[
            ("dynamodb-tables", "orders"),
            ("backfill-tables", "orders,*,orders"),
            ("backfill-read-units-per-sec", "0"),
            ("backfill-segments", "1001"),
            ("backfill-page-items", "0"),
        ])
        .validate()
        .expect_err("invalid");
        let named: Vec<&str> = error.0.iter().map(|(variable, _)| *variable).collect();
        assert_eq!(
            named,
            [
                "BACKFILL_TABLES",
                "BACKFILL_TABLES",
                "BACKFILL_READ_UNITS_PER_SEC",
                "BACKFILL_SEGMENTS",
                "BACKFILL_PAGE_ITEMS"
            ],
            "{error}"
        );
        for units in ["-1", "many", "inf", "NaN"] {
            let error = args(&[("dynamodb-tables", "orders"), ("backfill-read-units-per-sec", units)])
                .validate()
                .expect_err("not a budget");
            assert_eq!(error.0[0].0, "BACKFILL_READ_UNITS_PER_SEC", "{units}");
        }
    }

    #[test]
    fn with_discovery_a_name_must_be_selectable() {
        let config = args(&[("dynamodb-tables", "orders,itx-*"), ("backfill-tables", "itx-a,orders")])
            .validate()
            .expect("itx-a matches a pattern");
        assert!(config.backfill.covers("itx-a") && config.backfill.covers("orders") && !config.backfill.covers("x-a"));
        let error = args(&[("dynamodb-tables", "itx-*"), ("backfill-tables", "other")])
            .validate()
            .expect_err("other cannot be selected");
        assert!(error.0[0].1.contains("\"other\" is neither named nor matched"), "{error}");
        let config =
            args(&[("dynamodb-tables", "itx-*"), ("dynamodb-table-tags", "a=b"), ("backfill-tables", "other")])
                .validate()
                .expect("other may carry the tags");
        assert!(config.backfill.covers("other"));
        let config = args(&[("dynamodb-table-tags", "a=b"), ("backfill-tables", "*")]).validate().expect("valid");
        assert!(config.backfill.all && config.backfill.covers("anything-discovered"));
    }

    #[test]
    fn backfill_names_are_not_checked_against_a_table_list_that_is_itself_wrong() {
        let error = args(&[("dynamodb-tables", "x"), ("backfill-tables", "x")]).validate().expect_err("bad table");
        let named: Vec<&str> = error.0.iter().map(|(variable, _)| *variable).collect();
        assert_eq!(named, ["DYNAMODB_TABLES"]);
    }
}
