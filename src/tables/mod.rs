//! Per-table settings from `TABLES_FILE` (issue 20): which records of a table flow (`filter`,
//! `ttl_deletes`), what of their images (`include_attributes` / `exclude_attributes`) and to which
//! subject (`subject`). Read once at start-up ([`TablesFile::load`]); a bad file stops start-up with
//! one message naming the table, the setting and why. There is no reload.
//!
//! A key of the file is a table name or a glob pattern (`*` any run of characters, `?` one), so a
//! table that appears while the service runs (discovery) finds its settings too. A table takes the
//! settings of its exact key if there is one, else of the first pattern in file order that matches
//! it, else none: no settings is today's behaviour, byte for byte (nothing here is on that path but
//! one lookup per page).
//!
//! Invariant: a record that is filtered out or dropped is never published, yet is treated by the
//! readers as handled (the checkpoint moves past it) and counted (`records_filtered_total`).

mod apply;
mod subject;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::filter::FilterCriteria;

pub use apply::{PageDocuments, Verdict};
pub use subject::{SubjectTemplate, sanitize_token};

/// Why a record was not published (`records_filtered_total`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The table's `filter` did not match it.
    Filter,
    /// A deletion by DynamoDB's TTL, and `ttl_deletes: drop`.
    TtlDelete,
}

impl Dropped {
    pub const ALL: [Dropped; 2] = [Dropped::Filter, Dropped::TtlDelete];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Filter => "filter",
            Dropped::TtlDelete => "ttl_delete",
        }
    }
}

/// What happens to a deletion made by DynamoDB's TTL (`userIdentity` `Service` /
/// `dynamodb.amazonaws.com`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TtlDeletes {
    /// Published as any other REMOVE (today's behaviour).
    #[default]
    Publish,
    /// Not published (checkpointed and counted).
    Drop,
    /// Published with `"ttl_delete": true`.
    Flag,
}

/// Which attributes of the images are kept (`keys` are never reduced).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    #[default]
    All,
    /// Only these attributes.
    Include(Vec<String>),
    /// Every attribute but these.
    Exclude(Vec<String>),
}

impl Projection {
    /// Whether an image keeps the attribute `name`.
    pub fn keeps(&self, name: &str) -> bool {
        match self {
            Projection::All => true,
            Projection::Include(names) => names.iter().any(|kept| kept == name),
            Projection::Exclude(names) => !names.iter().any(|dropped| dropped == name),
        }
    }
}

/// One table's settings, validated.
#[derive(Debug, Clone)]
pub struct TableSettings {
    /// The key of the file they come from (a name or a pattern).
    pub key: String,
    pub filter: Option<FilterCriteria>,
    /// The filter as the file wrote it (normalised to Lambda's JSON), for `/status`.
    pub filter_json: Option<String>,
    pub projection: Projection,
    pub subject: Option<SubjectTemplate>,
    pub ttl_deletes: TtlDeletes,
}

/// A table's settings as `/status` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveSettings {
    /// The key of `TABLES_FILE` that applies (`null`: none, today's behaviour).
    pub matched: Option<String>,
    /// Lambda's `FilterCriteria` JSON (`null`: every record).
    pub filter: Option<String>,
    pub include_attributes: Option<Vec<String>>,
    pub exclude_attributes: Option<Vec<String>>,
    /// The subject template (`null`: `{prefix}.{table}`).
    pub subject: Option<String>,
    pub ttl_deletes: TtlDeletes,
}

/// Every table's settings: by exact name, then patterns in file order.
#[derive(Debug, Clone, Default)]
pub struct TablesFile {
    exact: HashMap<String, TableSettings>,
    patterns: Vec<(Glob, TableSettings)>,
}

/// A bad `TABLES_FILE`: where (the table key and the setting, when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct TablesFileError {
    pub table: Option<String>,
    pub setting: Option<&'static str>,
    pub reason: String,
}

impl TablesFileError {
    fn file(reason: impl Into<String>) -> Self {
        TablesFileError { table: None, setting: None, reason: reason.into() }
    }

    fn at(table: &str, setting: Option<&'static str>, reason: impl Into<String>) -> Self {
        TablesFileError { table: Some(table.to_owned()), setting, reason: reason.into() }
    }

    fn describe(&self) -> String {
        match (&self.table, self.setting) {
            (Some(table), Some(setting)) => format!("table {table:?}, setting `{setting}`: {}", self.reason),
            (Some(table), None) => format!("table {table:?}: {}", self.reason),
            _ => self.reason.clone(),
        }
    }
}

/// The settings of one key as the file writes them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    filter: Option<Json>,
    #[serde(default)]
    include_attributes: Option<Vec<String>>,
    #[serde(default)]
    exclude_attributes: Option<Vec<String>>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    ttl_deletes: Option<TtlDeletes>,
}

impl TablesFile {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<TablesFile, TablesFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| TablesFileError::file(format!("cannot read {}: {err}", path.display())))?;
        TablesFile::parse(&text)
    }

    /// Reads and validates a file's text: `tables:` mapping each table name or pattern to its
    /// settings.
    pub fn parse(text: &str) -> Result<TablesFile, TablesFileError> {
        let document: serde_norway::Value =
            serde_norway::from_str(text).map_err(|err| TablesFileError::file(format!("not YAML: {err}")))?;
        let top = match document {
            serde_norway::Value::Mapping(top) => top,
            serde_norway::Value::Null => serde_norway::Mapping::new(),
            _ => return Err(TablesFileError::file("expected a mapping with `tables:`")),
        };
        let mut tables = None;
        for (name, value) in top {
            match name.as_str() {
                Some("tables") => tables = Some(value),
                _ => return Err(TablesFileError::file(format!("unknown top-level key {name:?} (expected `tables`)"))),
            }
        }
        let entries = match tables {
            Some(serde_norway::Value::Mapping(entries)) => entries,
            Some(serde_norway::Value::Null) | None => serde_norway::Mapping::new(),
            Some(_) => return Err(TablesFileError::file("`tables` must map table names or patterns to settings")),
        };
        let mut file = TablesFile::default();
        for (key, value) in entries {
            let Some(key) = key.as_str().map(str::to_owned) else {
                return Err(TablesFileError::file(format!("a table key must be a string, not {key:?}")));
            };
            let settings = TableSettings::from_value(&key, value)?;
            if is_pattern(&key) {
                let glob = Glob::parse(&key).map_err(|reason| TablesFileError::at(&key, None, reason))?;
                if file.patterns.iter().any(|(seen, _)| seen.0 == key) {
                    return Err(TablesFileError::at(&key, None, "listed twice"));
                }
                file.patterns.push((glob, settings));
            } else {
                if !crate::config::is_valid_table_name(&key) {
                    return Err(TablesFileError::at(
                        &key,
                        None,
                        "not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .) nor a pattern with * or ?",
                    ));
                }
                if file.exact.insert(key.clone(), settings).is_some() {
                    return Err(TablesFileError::at(&key, None, "listed twice"));
                }
            }
        }
        Ok(file)
    }

    /// The settings of `table`: its exact key, else the first matching pattern, else none.
    pub fn lookup(&self, table: &str) -> Option<&TableSettings> {
        if self.exact.is_empty() && self.patterns.is_empty() {
            return None;
        }
        self.exact
            .get(table)
            .or_else(|| self.patterns.iter().find(|(glob, _)| glob.matches(table)).map(|(_, settings)| settings))
    }

    /// No settings for any table.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.patterns.is_empty()
    }

    /// What `/status` shows for `table`.
    pub fn effective(&self, table: &str) -> EffectiveSettings {
        match self.lookup(table) {
            None => EffectiveSettings {
                matched: None,
                filter: None,
                include_attributes: None,
                exclude_attributes: None,
                subject: None,
                ttl_deletes: TtlDeletes::Publish,
            },
            Some(settings) => EffectiveSettings {
                matched: Some(settings.key.clone()),
                filter: settings.filter_json.clone(),
                include_attributes: match &settings.projection {
                    Projection::Include(names) => Some(names.clone()),
                    _ => None,
                },
                exclude_attributes: match &settings.projection {
                    Projection::Exclude(names) => Some(names.clone()),
                    _ => None,
                },
                subject: settings.subject.as_ref().map(|template| template.text().to_owned()),
                ttl_deletes: settings.ttl_deletes,
            },
        }
    }

    /// Every subject template of the file with the key it belongs to, for the start-up check that
    /// the stream captures them.
    pub fn templates(&self) -> impl Iterator<Item = (&str, &SubjectTemplate)> {
        let exact = self.exact.values();
        let patterns = self.patterns.iter().map(|(_, settings)| settings);
        exact.chain(patterns).filter_map(|settings| settings.subject.as_ref().map(|t| (settings.key.as_str(), t)))
    }
}

impl TableSettings {
    fn from_value(key: &str, value: serde_norway::Value) -> Result<TableSettings, TablesFileError> {
        let raw: RawSettings = match value {
            serde_norway::Value::Null => RawSettings::default(),
            value => serde_norway::from_value(value).map_err(|err| TablesFileError::at(key, None, err.to_string()))?,
        };
        let (filter, filter_json) = match raw.filter {
            None => (None, None),
            Some(filter) => {
                let text = filter_text(filter).map_err(|reason| TablesFileError::at(key, Some("filter"), reason))?;
                let criteria = FilterCriteria::parse(&text)
                    .map_err(|err| TablesFileError::at(key, Some("filter"), err.to_string()))?;
                (Some(criteria), Some(text))
            }
        };
        let names = |setting: &'static str, names: Vec<String>| {
            if names.is_empty() {
                return Err(TablesFileError::at(key, Some(setting), "an empty list (leave the setting out instead)"));
            }
            if let Some(blank) = names.iter().find(|name| name.is_empty()) {
                return Err(TablesFileError::at(key, Some(setting), format!("{blank:?} is not an attribute name")));
            }
            Ok(names)
        };
        let projection = match (raw.include_attributes, raw.exclude_attributes) {
            (Some(_), Some(_)) => {
                return Err(TablesFileError::at(
                    key,
                    Some("include_attributes"),
                    "set together with `exclude_attributes`: choose one",
                ));
            }
            (Some(include), None) => Projection::Include(names("include_attributes", include)?),
            (None, Some(exclude)) => Projection::Exclude(names("exclude_attributes", exclude)?),
            (None, None) => Projection::All,
        };
        let subject = raw
            .subject
            .map(|text| SubjectTemplate::parse(&text))
            .transpose()
            .map_err(|reason| TablesFileError::at(key, Some("subject"), reason))?;
        Ok(TableSettings {
            key: key.to_owned(),
            filter,
            filter_json,
            projection,
            subject,
            ttl_deletes: raw.ttl_deletes.unwrap_or_default(),
        })
    }
}

/// A filter as the file may write it → Lambda's `FilterCriteria` JSON text: a string holding that
/// JSON, or the same structure in YAML (`Filters: [{Pattern: …}]`), each `Pattern` a JSON string or
/// a mapping.
fn filter_text(filter: Json) -> Result<String, String> {
    match filter {
        Json::String(text) => Ok(text),
        Json::Object(mut criteria) => {
            if let Some(Json::Array(filters)) = criteria.get_mut("Filters") {
                for filter in filters {
                    if let Some(pattern) = filter.get_mut("Pattern")
                        && !pattern.is_string()
                    {
                        *pattern = Json::String(pattern.to_string());
                    }
                }
            }
            Ok(Json::Object(criteria).to_string())
        }
        other => Err(format!("a FilterCriteria JSON string or mapping (`Filters:`), not {other}")),
    }
}

fn is_pattern(key: &str) -> bool {
    key.contains(['*', '?'])
}

/// A table-name pattern: `*` any run of characters (none included), `?` exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    fn parse(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() || pattern.len() > 255 {
            return Err("a pattern of 1 to 255 characters".to_owned());
        }
        if let Some(bad) =
            pattern.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '*' | '?')))
        {
            return Err(format!("{bad:?} cannot be in a table name pattern (a-z A-Z 0-9 _ - . and * ?)"));
        }
        Ok(Glob(pattern.to_owned()))
    }

    /// Whether `name` matches, whole: as a `DYNAMODB_TABLES` pattern matches (one matcher for both).
    pub fn matches(&self, name: &str) -> bool {
        crate::config::tables::glob_match(&self.0, name)
    }
}
