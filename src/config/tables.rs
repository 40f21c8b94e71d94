//! Which tables are read (issue 20): `DYNAMODB_TABLES` names and glob patterns, and
//! `DYNAMODB_TABLE_TAGS`.
//!
//! A table is selected when it is **named**, when its name **matches a pattern** (`*` any run of
//! characters, `?` one character), **or** when it **carries every tag** of `DYNAMODB_TABLE_TAGS`:
//! the three are a union. A union keeps a plain name meaning exactly what it meant before patterns
//! and tags existed (read, whatever its tags, without asking AWS), so adding a tag rule to a working
//! deployment can only add tables, never silently drop one; an operator who wants "these names,
//! but only when tagged" tags exactly those tables and lists no names.
//!
//! A selection with only plain names is **static**: the set is known at start-up and nothing
//! changes at run time (the service behaves as before issue 20). With a pattern or a tag it is
//! **dynamic**: the set is re-evaluated every `TABLE_REFRESH_INTERVAL_SEC` by one replica for the
//! whole fleet (`crate::pipeline::tables`).

use std::time::Duration;

use super::checker::Checker;
use super::names::is_valid_table_name;

/// How a selected table was selected (shown on `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectedBy {
    /// Listed by name in `DYNAMODB_TABLES`.
    Name,
    /// Its name matches a pattern of `DYNAMODB_TABLES`.
    Pattern,
    /// It carries every tag of `DYNAMODB_TABLE_TAGS`.
    Tags,
}

impl SelectedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SelectedBy::Name => "name",
            SelectedBy::Pattern => "pattern",
            SelectedBy::Tags => "tags",
        }
    }
}

/// The validated table selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSelection {
    /// Plain names: always selected, without any AWS call.
    pub names: Vec<String>,
    /// Glob patterns (`*`, `?`) matched against the names `ListTables` returns.
    pub patterns: Vec<String>,
    /// `key=value` pairs a table must all carry (`ListTagsOfResource`).
    pub tags: Vec<(String, String)>,
    /// `TABLE_REFRESH_INTERVAL_SEC`: how often the fleet re-evaluates a dynamic selection.
    pub refresh_interval: Duration,
}

impl TableSelection {
    /// A selection that can change at run time (a pattern or a tag rule).
    pub fn is_dynamic(&self) -> bool {
        !self.patterns.is_empty() || !self.tags.is_empty()
    }

    /// Why `table` is selected by its name alone (named, or matching a pattern), if it is.
    pub fn by_name(&self, table: &str) -> Option<SelectedBy> {
        if self.names.iter().any(|name| name == table) {
            Some(SelectedBy::Name)
        } else if self.patterns.iter().any(|pattern| glob_match(pattern, table)) {
            Some(SelectedBy::Pattern)
        } else {
            None
        }
    }

    /// Whether a table carrying `tags` matches the tag rule (false without one).
    pub fn tags_match(&self, tags: &[(String, String)]) -> bool {
        !self.tags.is_empty() && self.tags.iter().all(|wanted| tags.iter().any(|tag| tag == wanted))
    }

    /// What names the lease group and the fleet's shared table set: the names, the patterns and the
    /// tag rules (`tag:key=value`; neither `:` nor `=` can be in a table name, so no rule reads as a
    /// name). With names only, exactly the names: the group of a static fleet is as before.
    pub fn fingerprint_parts(&self) -> Vec<String> {
        let mut parts = self.names.clone();
        parts.extend(self.patterns.iter().cloned());
        parts.extend(self.tags.iter().map(|(key, value)| format!("tag:{key}={value}")));
        parts
    }
}

/// Whether `name` matches the glob `pattern`: `*` matches any run of characters (none included), `?`
/// exactly one, anything else itself. Iterative with one backtrack point, so linear-ish in practice
/// and never recursive.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // The last `*` seen and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and try again.
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// Whether a `DYNAMODB_TABLES` entry is a pattern.
fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '?'])
}

/// A table name that can form checkpoint keys `{table}.{shard}`: no leading, trailing or doubled dot.
pub fn forms_keys(name: &str) -> bool {
    !(name.starts_with('.') || name.ends_with('.') || name.contains(".."))
}

/// `DYNAMODB_TABLES`, `DYNAMODB_TABLE_TAGS` and `TABLE_REFRESH_INTERVAL_SEC`.
pub(super) fn table_selection(check: &mut Checker, tables: &str, tags: &str, refresh: &str) -> TableSelection {
    const TABLES: &str = "DYNAMODB_TABLES";
    let mut selection = TableSelection::default();
    for entry in tables.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if is_pattern(entry) {
            // The pattern's literal characters must be ones a table name can have.
            let literal: String = entry.chars().filter(|c| !matches!(c, '*' | '?')).collect();
            if !literal.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
                check.fail(
                    TABLES,
                    format!("pattern {entry:?}: besides `*` and `?` only a-z A-Z 0-9 _ - . can match a table name"),
                );
            } else if selection.patterns.iter().any(|p| p == entry) {
                check.fail(TABLES, format!("pattern {entry:?} is listed twice"));
            } else {
                selection.patterns.push(entry.to_owned());
            }
        } else if !is_valid_table_name(entry) {
            check.fail(TABLES, format!("{entry:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"));
        } else if !forms_keys(entry) {
            // `{table}.{shard}` would not be a legal KV key, so no checkpoint could be written.
            check.fail(TABLES, format!("{entry:?}: a leading, trailing or doubled dot cannot form a checkpoint key"));
        } else if selection.names.iter().any(|t| t == entry) {
            check.fail(TABLES, format!("{entry:?} is listed twice"));
        } else {
            selection.names.push(entry.to_owned());
        }
    }
    selection.tags = table_tags(check, tags);
    let listed = !selection.names.is_empty() || !selection.patterns.is_empty();
    if !listed && selection.tags.is_empty() && check.0.iter().all(|(v, _)| !v.starts_with("DYNAMODB_TABLE")) {
        check.fail(TABLES, "required: a comma-separated list of table names or glob patterns (or DYNAMODB_TABLE_TAGS)");
    }
    selection.refresh_interval = check.secs("TABLE_REFRESH_INTERVAL_SEC", refresh, 1, 86_400);
    selection
}

/// DynamoDB tag keys are 1-128 characters, values 0-256 (AWS tagging limits).
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;

/// `DYNAMODB_TABLE_TAGS`: `key=value` pairs, comma-separated, each key once.
fn table_tags(check: &mut Checker, text: &str) -> Vec<(String, String)> {
    const TAGS: &str = "DYNAMODB_TABLE_TAGS";
    let mut tags: Vec<(String, String)> = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            check.fail(TAGS, format!("{pair:?} is not key=value"));
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() || key.chars().count() > MAX_TAG_KEY {
            check.fail(TAGS, format!("{pair:?}: a tag key has 1 to {MAX_TAG_KEY} characters"));
        } else if value.chars().count() > MAX_TAG_VALUE {
            check.fail(TAGS, format!("{pair:?}: a tag value has at most {MAX_TAG_VALUE} characters"));
        } else if tags.iter().any(|(k, _)| k == key) {
            check.fail(TAGS, format!("tag key {key:?} is listed twice (a table carries one value per key)"));
        } else {
            tags.push((key.to_owned(), value.to_owned()));
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    #[test]
    fn globs_match_stars_and_question_marks() {
        assert!(glob_match("itx-*", "itx-orders"));
        assert!(glob_match("itx-*", "itx-"));
        assert!(!glob_match("itx-*", "xitx-orders"));
        assert!(glob_match("*-orders", "eu-orders"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("t?b", "tab"));
        assert!(!glob_match("t?b", "tb"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("**a", "a"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaab"));
        assert!(!glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn names_patterns_and_tags_are_read() {
        let config = args(&[
            ("dynamodb-tables", "orders, itx-*, t?b"),
            ("dynamodb-table-tags", "stream=on, team = data"),
            ("table-refresh-interval-sec", "5"),
        ])
        .validate()
        .expect("valid");
        let selection = &config.selection;
        assert_eq!(config.tables, ["orders"], "plain names only");
        assert_eq!(selection.patterns, ["itx-*", "t?b"]);
        assert_eq!(selection.tags, [("stream".to_owned(), "on".to_owned()), ("team".to_owned(), "data".to_owned())]);
        assert_eq!(selection.refresh_interval, Duration::from_secs(5));
        assert!(selection.is_dynamic());
        assert_eq!(selection.by_name("orders"), Some(SelectedBy::Name));
        assert_eq!(selection.by_name("itx-a"), Some(SelectedBy::Pattern));
        assert_eq!(selection.by_name("tab"), Some(SelectedBy::Pattern));
        assert_eq!(selection.by_name("other"), None);
        let tag = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert!(selection.tags_match(&[tag("team", "data"), tag("stream", "on"), tag("x", "y")]));
        assert!(!selection.tags_match(&[tag("stream", "on")]), "every tag must match");
        assert!(!selection.tags_match(&[tag("stream", "off"), tag("team", "data")]));
    }

    #[test]
    fn tags_alone_are_enough_and_names_alone_are_static() {
        let config = args(&[("dynamodb-table-tags", "stream=on")]).validate().expect("tags alone select");
        assert!(config.tables.is_empty() && config.selection.is_dynamic());
        assert_eq!(config.selection.refresh_interval, Duration::from_secs(60), "the default");
        let config = args(&[("dynamodb-tables", "orders")]).validate().expect("valid");
        assert!(!config.selection.is_dynamic());
        assert_eq!(config.selection.fingerprint_parts(), ["orders"], "a static group is as before");
    }

    #[test]
    fn bad_patterns_tags_and_intervals_are_each_named() {
        let error = args(&[
            ("dynamodb-tables", "itx-*,itx-*,a b*"),
            ("dynamodb-table-tags", "novalue,=x,k=1,k=2"),
            ("table-refresh-interval-sec", "0"),
        ])
        .validate()
        .expect_err("invalid");
        let named: Vec<&str> = error.0.iter().map(|(variable, _)| *variable).collect();
        assert_eq!(
            named,
            [
                "DYNAMODB_TABLES",
                "DYNAMODB_TABLES",
                "DYNAMODB_TABLE_TAGS",
                "DYNAMODB_TABLE_TAGS",
                "DYNAMODB_TABLE_TAGS",
                "TABLE_REFRESH_INTERVAL_SEC"
            ],
            "{error}"
        );
        let error = args(&[]).validate().expect_err("nothing selected");
        assert!(error.to_string().contains("DYNAMODB_TABLE_TAGS"), "{error}");
    }

    #[test]
    fn the_group_of_a_dynamic_selection_names_its_rules() {
        let group = |tables: &str, tags: &str| {
            args(&[("dynamodb-tables", tables), ("dynamodb-table-tags", tags)]).validate().expect("valid").lease.group
        };
        let static_group = group("orders", "");
        assert_ne!(group("orders,itx-*", ""), static_group);
        assert_ne!(group("orders", "a=b"), static_group);
        assert_ne!(group("orders", "a=b"), group("orders", "a=c"));
        assert_eq!(group("itx-*,orders", ""), group("orders,itx-*", ""), "order does not matter");
    }
}
