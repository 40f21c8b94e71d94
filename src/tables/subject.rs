//! A table's `subject` template: literal text and placeholders, rendered per record.
//!
//! Placeholders: `{prefix}` (`NATS_SUBJECT_PREFIX`, as is: it may hold several tokens), `{table}`,
//! `{event_name}` (`INSERT`, `MODIFY`, `REMOVE`) and `{key.<attribute>}` (the value of a primary-key
//! attribute of the record: a string as is, a number as its decimal text, a binary as its base64).
//! Every value but the prefix is sanitised into one subject token ([`sanitize_token`]).

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Prefix,
    Table,
    EventName,
    Key(String),
}

/// A value made one NATS subject token: `.`, `*`, `>`, white space and control characters become
/// `_`; an empty value becomes `_`.
pub fn sanitize_token(value: &str) -> String {
    if value.is_empty() {
        return "_".to_owned();
    }
    value
        .chars()
        .map(|c| if matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control() { '_' } else { c })
        .collect()
}

impl SubjectTemplate {
    /// Parses a template; the error says what is wrong.
    pub fn parse(text: &str) -> Result<SubjectTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(at) if rest.as_bytes()[at] == b'}' => return Err(format!("{text:?}: a `}}` without its `{{`")),
                Some(at) => {
                    if at > 0 {
                        parts.push(Part::Literal(rest[..at].to_owned()));
                    }
                    let Some(end) = rest[at..].find('}') else {
                        return Err(format!("{text:?}: a `{{` without its `}}`"));
                    };
                    let name = &rest[at + 1..at + end];
                    parts.push(match name {
                        "prefix" => Part::Prefix,
                        "table" => Part::Table,
                        "event_name" => Part::EventName,
                        _ => match name.strip_prefix("key.") {
                            Some(attribute) if !attribute.is_empty() && !attribute.contains('{') => {
                                Part::Key(attribute.to_owned())
                            }
                            _ => {
                                return Err(format!(
                                    "{text:?}: unknown placeholder {{{name}}} (known: {{prefix}}, {{table}}, {{event_name}}, {{key.<attribute>}})"
                                ));
                            }
                        },
                    });
                    rest = &rest[at + end + 1..];
                }
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        let template = SubjectTemplate { text: text.to_owned(), parts };
        // Every token must be non-empty and literal whatever the values: rendered with a sample.
        let sample = template.render("p", "t", "INSERT", |_| Some("x".to_owned()));
        if let Some(problem) = literal_problem(&sample) {
            return Err(format!("{text:?} does not make a subject of literal tokens: {problem}"));
        }
        Ok(template)
    }

    /// The template as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether rendering needs the record's keys.
    pub fn uses_keys(&self) -> bool {
        self.parts.iter().any(|part| matches!(part, Part::Key(_)))
    }

    /// The subject of one record; `key` gives a key attribute's value as text (`None`: absent, `_`).
    pub fn render(&self, prefix: &str, table: &str, event_name: &str, key: impl Fn(&str) -> Option<String>) -> String {
        let mut subject = String::with_capacity(self.text.len() + table.len() + prefix.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => subject.push_str(text),
                Part::Prefix => subject.push_str(prefix),
                Part::Table => subject.push_str(&sanitize_token(table)),
                Part::EventName => subject.push_str(&sanitize_token(event_name)),
                Part::Key(attribute) => subject.push_str(&sanitize_token(&key(attribute).unwrap_or_default())),
            }
        }
        subject
    }

    /// The subjects this template can make, as a NATS subject filter: `prefix` literal, the table
    /// literal when known (else a `*` token), every token holding a record's value a `*`.
    pub fn shape(&self, prefix: &str, table: Option<&str>) -> String {
        let mut shape = String::new();
        // Per token: whether it holds a varying value.
        let mut tokens: Vec<(String, bool)> = vec![(String::new(), false)];
        let mut push = |text: &str, varies: bool| {
            for (index, piece) in text.split('.').enumerate() {
                if index > 0 {
                    tokens.push((String::new(), false));
                }
                if let Some(last) = tokens.last_mut() {
                    last.0.push_str(piece);
                    last.1 |= varies;
                }
            }
        };
        for part in &self.parts {
            match part {
                Part::Literal(text) => push(text, false),
                Part::Prefix => push(prefix, false),
                Part::Table => match table {
                    Some(table) => push(&sanitize_token(table), false),
                    None => push("x", true),
                },
                Part::EventName | Part::Key(_) => push("x", true),
            }
        }
        for (index, (token, varies)) in tokens.iter().enumerate() {
            if index > 0 {
                shape.push('.');
            }
            shape.push_str(if *varies { "*" } else { token });
        }
        shape
    }
}

/// What keeps `subject` from being a subject of literal tokens.
fn literal_problem(subject: &str) -> Option<String> {
    for token in subject.split('.') {
        if token.is_empty() {
            return Some("an empty token (a leading, trailing or doubled `.`)".to_owned());
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>') {
            return Some(format!("token {token:?} holds white space, `*` or `>`"));
        }
    }
    None
}
