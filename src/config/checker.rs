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

    pub(super) fn bool(&mut self, variable: &'static str, text: &str) -> bool {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" | "" => false,
            _ => {
                self.fail(variable, format!("{text:?} is not a boolean (use true or false)"));
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
