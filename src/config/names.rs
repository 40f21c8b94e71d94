//! Naming rules of what the service reads from and writes to: DynamoDB tables, JetStream streams,
//! KV buckets and subjects, and the seed's table → subject mapping.
//!
//! Checked at start-up, so a bad name fails validation instead of a later AWS or JetStream call.

/// DynamoDB table names: 3 to 255 characters of `a-z A-Z 0-9 _ - .`.
pub fn is_valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A NATS subject made of literal tokens only: no wildcards, no empty tokens, no white space.
pub(super) fn is_literal_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
        })
}

/// JetStream stream names may not contain white space, `.`, `*`, `>`, path separators.
pub(super) fn is_valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

/// KV bucket names: `[a-zA-Z0-9_-]+`.
pub(super) fn is_valid_bucket_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// `{prefix}.{table}` with `.` and ` ` in the table name mapped to `_` (the seed's rule).
pub fn subject_for(prefix: &str, table: &str) -> String {
    format!("{prefix}.{}", table.replace(['.', ' '], "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_map_dots_and_spaces() {
        assert_eq!(subject_for("dynamodb_streams", "my.table"), "dynamodb_streams.my_table");
        assert_eq!(subject_for("dynamodb_streams", "my-table"), "dynamodb_streams.my-table");
        assert_eq!(subject_for("p", "a b.c"), "p.a_b_c");
    }
}
