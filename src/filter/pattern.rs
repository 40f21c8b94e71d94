//! One filter pattern, parsed once and matched against every record (semantics in the module docs
//! of `crate::filter`).

use serde_json::Value as Json;

/// A pattern, or a part of one at some field of the record.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Every field must match (and, through `$or`, one of each group of alternatives).
    Object { fields: Vec<(String, Node)>, any_of: Vec<Vec<Node>> },
    /// The value at this field must match one of these.
    Leaf(Vec<Matcher>),
}

/// One way a value may match.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// A string, number, `null` or boolean, equal to the value (numbers compared as numbers).
    Exact(Json),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    /// Matches any value present but these.
    AnythingBut(Vec<Matcher>),
    /// Every comparison holds for the value read as a number.
    Numeric(Vec<(Comparison, f64)>),
    /// The field holds a value (`true`) or is absent (`false`).
    Exists(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Node {
    /// Parses a pattern (a JSON object); the error says where and why.
    pub fn parse(json: &Json) -> Result<Node, String> {
        let Json::Object(object) = json else { return Err("a pattern is a JSON object".to_owned()) };
        if object.is_empty() {
            return Err("an empty pattern".to_owned());
        }
        Node::object(object, "")
    }

    fn object(object: &serde_json::Map<String, Json>, path: &str) -> Result<Node, String> {
        let (mut fields, mut any_of) = (Vec::new(), Vec::new());
        for (name, value) in object {
            let here = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            if name == "$or" {
                let Json::Array(alternatives) = value else { return Err(format!("{here}: $or takes an array")) };
                if alternatives.len() < 2 {
                    return Err(format!("{here}: $or takes two or more patterns"));
                }
                let parsed = alternatives
                    .iter()
                    .map(|alternative| match alternative {
                        Json::Object(inner) if !inner.is_empty() => Node::object(inner, path),
                        _ => Err(format!("{here}: each alternative of $or is a non-empty object")),
                    })
                    .collect::<Result<_, _>>()?;
                any_of.push(parsed);
                continue;
            }
            let node = match value {
                Json::Object(inner) if !inner.is_empty() => Node::object(inner, &here)?,
                Json::Array(matchers) if !matchers.is_empty() => {
                    Node::Leaf(matchers.iter().map(|m| Matcher::parse(m, &here)).collect::<Result<_, _>>()?)
                }
                _ => return Err(format!("{here}: a field takes an object or a non-empty array of matchers")),
            };
            fields.push((name.clone(), node));
        }
        Ok(Node::Object { fields, any_of })
    }

    /// Whether the record's value at this place (`None`: absent) matches.
    pub fn matches(&self, value: Option<&Json>) -> bool {
        match self {
            Node::Object { fields, any_of } => {
                let field = |name: &str| value.and_then(|value| value.get(name));
                fields.iter().all(|(name, node)| node.matches(field(name)))
                    && any_of.iter().all(|alternatives| alternatives.iter().any(|node| node.matches(value)))
            }
            Node::Leaf(matchers) => matchers.iter().any(|matcher| matcher.matches_field(value)),
        }
    }
}

impl Matcher {
    fn parse(json: &Json, path: &str) -> Result<Matcher, String> {
        let Json::Object(object) = json else {
            return match json {
                Json::Array(_) => Err(format!("{path}: a matcher is not an array")),
                exact => Ok(Matcher::Exact(exact.clone())),
            };
        };
        let mut entries = object.iter();
        let (Some((operator, operand)), None) = (entries.next(), entries.next()) else {
            return Err(format!("{path}: a matcher object has exactly one operator"));
        };
        let text = |operand: &Json| match operand {
            Json::String(text) => Ok(text.clone()),
            _ => Err(format!("{path}: {operator} takes a string")),
        };
        match operator.as_str() {
            "prefix" => Ok(Matcher::Prefix(text(operand)?)),
            "suffix" => Ok(Matcher::Suffix(text(operand)?)),
            "equals-ignore-case" => Ok(Matcher::EqualsIgnoreCase(text(operand)?)),
            "exists" => match operand {
                Json::Bool(exists) => Ok(Matcher::Exists(*exists)),
                _ => Err(format!("{path}: exists takes true or false")),
            },
            "anything-but" => Matcher::anything_but(operand, path),
            "numeric" => Matcher::numeric(operand, path),
            other => Err(format!("{path}: unknown matcher {other:?}")),
        }
    }

    fn anything_but(operand: &Json, path: &str) -> Result<Matcher, String> {
        let excluded = match operand {
            Json::Array(values) if !values.is_empty() => values
                .iter()
                .map(|value| match value {
                    Json::String(_) | Json::Number(_) => Ok(Matcher::Exact(value.clone())),
                    _ => Err(format!("{path}: anything-but lists strings or numbers")),
                })
                .collect::<Result<_, _>>()?,
            Json::String(_) | Json::Number(_) => vec![Matcher::Exact(operand.clone())],
            Json::Object(_) => match Matcher::parse(operand, path)? {
                inner @ (Matcher::Prefix(_) | Matcher::Suffix(_) | Matcher::EqualsIgnoreCase(_)) => vec![inner],
                _ => return Err(format!("{path}: anything-but takes prefix, suffix or equals-ignore-case")),
            },
            _ => return Err(format!("{path}: anything-but takes a value, a list of values or a prefix")),
        };
        Ok(Matcher::AnythingBut(excluded))
    }

    fn numeric(operand: &Json, path: &str) -> Result<Matcher, String> {
        let malformed = || format!("{path}: numeric takes [op, number] or [op, number, op, number]");
        let Json::Array(parts) = operand else { return Err(malformed()) };
        if parts.is_empty() || parts.len() > 4 || parts.len() % 2 != 0 {
            return Err(malformed());
        }
        let comparisons = parts
            .chunks(2)
            .map(|pair| {
                let comparison = match pair[0].as_str() {
                    Some("=") => Comparison::Eq,
                    Some("<") => Comparison::Lt,
                    Some("<=") => Comparison::Le,
                    Some(">") => Comparison::Gt,
                    Some(">=") => Comparison::Ge,
                    _ => return Err(malformed()),
                };
                pair[1].as_f64().map(|bound| (comparison, bound)).ok_or_else(malformed)
            })
            .collect::<Result<_, _>>()?;
        Ok(Matcher::Numeric(comparisons))
    }

    /// Whether the record's value at the field (`None`: absent) matches: an array matches when any
    /// element does.
    fn matches_field(&self, value: Option<&Json>) -> bool {
        match (self, value) {
            (Matcher::Exists(exists), value) => *exists == value.is_some_and(|value| !value.is_object()),
            (_, None) => false,
            (_, Some(Json::Array(items))) => items.iter().any(|item| self.matches_value(item)),
            (_, Some(value)) => self.matches_value(value),
        }
    }

    fn matches_value(&self, value: &Json) -> bool {
        match self {
            Matcher::Exact(Json::Number(expected)) => {
                number(value).zip(expected.as_f64()).is_some_and(|(actual, expected)| actual == expected)
            }
            Matcher::Exact(expected) => value == expected,
            Matcher::Prefix(prefix) => value.as_str().is_some_and(|text| text.starts_with(prefix.as_str())),
            Matcher::Suffix(suffix) => value.as_str().is_some_and(|text| text.ends_with(suffix.as_str())),
            Matcher::EqualsIgnoreCase(expected) => {
                value.as_str().is_some_and(|text| text.to_lowercase() == expected.to_lowercase())
            }
            Matcher::AnythingBut(excluded) => !excluded.iter().any(|matcher| matcher.matches_value(value)),
            Matcher::Numeric(comparisons) => number(value).is_some_and(|actual| {
                comparisons.iter().all(|(comparison, bound)| match comparison {
                    Comparison::Eq => actual == *bound,
                    Comparison::Lt => actual < *bound,
                    Comparison::Le => actual <= *bound,
                    Comparison::Gt => actual > *bound,
                    Comparison::Ge => actual >= *bound,
                })
            }),
            Matcher::Exists(_) => false,
        }
    }
}

/// A JSON number, or a string that spells one (DynamoDB's `N` values are strings).
fn number(value: &Json) -> Option<f64> {
    match value {
        Json::Number(number) => number.as_f64(),
        Json::String(text) => text.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}
