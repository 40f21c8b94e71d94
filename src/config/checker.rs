//! The checker every setting passes through on its way from text to a typed value.
//!
//! It records each problem with its variable name instead of stopping at the first, so
//! [`super::ConfigError`] names every bad variable at once. A bad value yields a placeholder (the
//! range's minimum, `false`, `None`) that is never used: any recorded problem fails validation.

use std::path::PathBuf;
use std::time::Duration;

/// Collects problems while each setting is parsed.
#[derive(Default)]
pub(super) struct Checker(pub(super) Vec<(&'static str, String)>);

impl Checker {
    pub(super) fn fail(&mut self, variable: &'static str, reason: impl Into<String>) {
        self.0.push((variable, reason.into()));
    }

    /// A boolean in any of the spellings the Go service and Go's `strconv.ParseBool` accept, in any
    /// case: `true yes t y 1` and `false no f n 0`. Anything else is refused rather than read as
    /// false, as the Go service did: `DEBUG=maybe` is a mistake to report, not a choice.
    pub(super) fn bool(&mut self, variable: &'static str, text: &str) -> bool {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "t" | "y" | "1" => true,
            "false" | "no" | "f" | "n" | "0" => false,
            _ => {
                self.fail(
                    variable,
                    format!("{text:?} is not a boolean (true, yes, t, y, 1 or false, no, f, n, 0, in any case)"),
                );
                false
            }
        }
    }

    /// A whole number in `min..=max`.
    pub(super) fn number(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> u64 {
        match text.trim().parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => value,
            Ok(value) => {
                self.fail(variable, format!("{value} is out of range {min}..={max}"));
                min
            }
            Err(_) => {
                self.fail(variable, format!("{text:?} is not a whole number"));
                min
            }
        }
    }

    pub(super) fn millis(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.number(variable, text, min, max))
    }

    pub(super) fn secs(&mut self, variable: &'static str, text: &str, min: u64, max: u64) -> Duration {
        Duration::from_secs(self.number(variable, text, min, max))
    }

    /// An optional path to a regular, readable file whose text passes `looks_right` (which returns
    /// what is wrong with it). Only the path is kept: secrets are read again where they are used.
    pub(super) fn file(
        &mut self,
        variable: &'static str,
        text: &str,
        looks_right: fn(&str) -> Result<(), String>,
    ) -> Option<PathBuf> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let path = PathBuf::from(text);
        let problem = match std::fs::metadata(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some("does not exist".to_owned()),
            Err(err) => Some(format!("cannot be inspected: {err}")),
            Ok(meta) if !meta.is_file() => Some("is not a regular file".to_owned()),
            Ok(_) => match std::fs::read(&path) {
                Err(err) => Some(format!("cannot be read: {err}")),
                Ok(bytes) => match String::from_utf8(bytes) {
                    Err(_) => Some("is not a text (PEM) file".to_owned()),
                    Ok(contents) => looks_right(&contents).err(),
                },
            },
        };
        match problem {
            Some(problem) => {
                self.fail(variable, format!("{}: {problem}", path.display()));
                None
            }
            None => Some(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` in lower case, upper case and capitalized.
    fn cases(text: &str) -> [String; 3] {
        let mut capitalized = text.to_owned();
        capitalized[..1].make_ascii_uppercase();
        [text.to_owned(), text.to_ascii_uppercase(), capitalized]
    }

    #[test]
    fn booleans_in_every_spelling_of_the_go_service_and_strconv_parse_bool() {
        for (spellings, expected) in [(["true", "yes", "t", "y", "1"], true), (["false", "no", "f", "n", "0"], false)] {
            for spelling in spellings {
                for text in cases(spelling).into_iter().chain([format!(" {spelling} "), "tRuE".to_owned()]) {
                    let text = if text == "tRuE" && !expected { "fAlSe".to_owned() } else { text };
                    let mut check = Checker::default();
                    assert_eq!(check.bool("DEBUG", &text), expected, "{text:?}");
                    assert!(check.0.is_empty(), "{text:?} refused: {:?}", check.0);
                }
            }
        }
    }

    #[test]
    fn a_boolean_that_means_nothing_is_refused_with_its_variable() {
        for text in ["maybe", "on", "off", "2", "truee", "-1", ""] {
            let mut check = Checker::default();
            assert!(!check.bool("DEBUG", text));
            assert_eq!(check.0.len(), 1, "{text:?} must be refused");
            let (variable, reason) = &check.0[0];
            assert_eq!(*variable, "DEBUG");
            assert!(reason.contains(&format!("{text:?} is not a boolean")), "{reason}");
        }
    }
}
