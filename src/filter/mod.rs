//! Which records flow (issue 20): AWS Lambda's `FilterCriteria` for DynamoDB streams, accepted as
//! users have it, so a filter pasted from an event source mapping means here what it meant there.
//!
//! A criteria holds up to five patterns; a record passes when any pattern matches it (none: every
//! record passes). A pattern is matched against the record as Lambda shows it to a filter
//! ([`document`]): `eventName`, `eventID`, `eventSource` (no `awsRegion`), `dynamodb` with `Keys`,
//! `NewImage`, `OldImage` in DynamoDB's JSON (`{"S": "…"}`, `{"N": "5"}`, …), `SequenceNumber`,
//! `SizeBytes`, `ApproximateCreationDateTime`, and `userIdentity` when the record has one.
//!
//! Pattern semantics, as EventBridge's content filtering (which Lambda uses):
//! - an object matches when every field it names matches (AND); `"$or": [p, q, …]` in an object
//!   matches when any of its patterns does;
//! - a field's array of matchers matches when any matcher matches the record's value there (OR); a
//!   record value that is an array matches when any of its elements does;
//! - matchers: an exact string, number (compared as a number), `null` or boolean; `{"prefix": s}`,
//!   `{"suffix": s}`, `{"equals-ignore-case": s}`; `{"anything-but": v | [v, …] | {"prefix": s} |
//!   {"suffix": s}}`; `{"numeric": [op, n]}` or a range `[op, n, op, n]` with `=`, `<`, `<=`, `>`,
//!   `>=` (a DynamoDB `N`, which is a string, is compared as the number it spells); `{"exists":
//!   true | false}` (of a field that holds a value rather than an object).
//!
//! A criteria that cannot be read is refused when it is parsed, with a message naming what is wrong:
//! the caller puts the table and the setting in front of it.

mod document;
mod pattern;
#[cfg(test)]
mod tests;

use serde::Deserialize;
use serde_json::Value as Json;

pub use document::document;
use pattern::Node;

use crate::record::ChangeRecord;

/// Lambda's limit on patterns in one criteria.
pub const MAX_PATTERNS: usize = 5;

/// Why a criteria cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("not a FilterCriteria ({{\"Filters\": [{{\"Pattern\": \"…\"}}]}}): {0}")]
    Shape(String),
    #[error("{count} patterns, more than Lambda's {MAX_PATTERNS}")]
    TooMany { count: usize },
    #[error("pattern {index}: {reason}")]
    Pattern { index: usize, reason: String },
}

/// Up to [`MAX_PATTERNS`] patterns; a record passes when any of them matches.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterCriteria {
    patterns: Vec<Node>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Criteria {
    #[serde(rename = "Filters")]
    filters: Vec<Filter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    /// The pattern as a JSON text inside a string, as Lambda takes it.
    #[serde(rename = "Pattern")]
    pattern: String,
}

impl FilterCriteria {
    /// Reads a `FilterCriteria` document as Lambda's API, console and CloudFormation take it.
    pub fn parse(text: &str) -> Result<FilterCriteria, FilterError> {
        let criteria: Criteria = serde_json::from_str(text).map_err(|err| FilterError::Shape(err.to_string()))?;
        FilterCriteria::from_patterns(criteria.filters.iter().map(|filter| filter.pattern.as_str()))
    }

    /// The criteria of these patterns (each a JSON text).
    pub fn from_patterns<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<FilterCriteria, FilterError> {
        let texts: Vec<&str> = patterns.into_iter().collect();
        if texts.len() > MAX_PATTERNS {
            return Err(FilterError::TooMany { count: texts.len() });
        }
        let patterns = texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let json: Json = serde_json::from_str(text)
                    .map_err(|err| FilterError::Pattern { index, reason: format!("not JSON: {err}") })?;
                Node::parse(&json).map_err(|reason| FilterError::Pattern { index, reason })
            })
            .collect::<Result<_, _>>()?;
        Ok(FilterCriteria { patterns })
    }

    /// Whether `record` passes: any pattern matches (a criteria without patterns passes all).
    pub fn matches(&self, record: &ChangeRecord) -> bool {
        self.patterns.is_empty() || self.matches_document(&document(record))
    }

    /// Whether a record as Lambda shows it ([`document`]) passes.
    pub fn matches_document(&self, document: &Json) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|pattern| pattern.matches(Some(document)))
    }
}
