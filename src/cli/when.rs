//! `checkpoints rewind --to`: the point of a table's stream to replay from, as the second (Unix epoch)
//! whose records and later ones are published again, or the stream's start.
//!
//! Invariant: a time is never in the future and never older than the stream's retention: records
//! before it are trimmed, so such a rewind could not do what it says.

use std::time::Duration;

use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;

/// DynamoDB Streams keeps records for 24 hours.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a rewind starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindTo {
    /// Everything the stream still holds.
    TrimHorizon,
    /// Records created at or after this second.
    Since(u64),
}

impl RewindTo {
    /// The `since` of the checkpoint it writes.
    pub fn since(self) -> Option<u64> {
        match self {
            RewindTo::TrimHorizon => None,
            RewindTo::Since(since) => Some(since),
        }
    }
}

/// Parses `--to` at `now` (Unix seconds): `trim-horizon`; `latest` (now, so that nothing written
/// after the command is missed); an RFC 3339 time, rounded down to its second (DynamoDB's creation
/// times are whole seconds: nothing of that second is missed); or a time ago (`90m`, `2h`, `1h30m`,
/// `45s`, `1d`). `Err` says why not, for the operator.
pub fn parse(text: &str, now: u64) -> Result<RewindTo, String> {
    let since = match text.trim() {
        "trim-horizon" => return Ok(RewindTo::TrimHorizon),
        "latest" => now,
        text => match (ago(text), seconds_of(text)) {
            (Some(ago), _) => now.saturating_sub(ago.as_secs()),
            (None, Some(secs)) => u64::try_from(secs).map_err(|_| "before 1970".to_owned())?,
            (None, None) => {
                return Err("not trim-horizon, latest, an RFC 3339 time (2026-11-30T12:00:00Z) or a time ago \
                            (90m, 2h, 1h30m)"
                    .to_owned());
            }
        },
    };
    if since > now {
        return Err(format!("{} is in the future (now is {})", rfc3339(since), rfc3339(now)));
    }
    let oldest = now.saturating_sub(RETENTION.as_secs());
    if since < oldest {
        return Err(format!(
            "{} is older than the stream's 24 h retention (records before {} are trimmed); \
             use --to trim-horizon to replay everything the stream still holds",
            rfc3339(since),
            rfc3339(oldest)
        ));
    }
    Ok(RewindTo::Since(since))
}

/// `Some` duration for text such as `90m`, `2h`, `1h30m`: numbers each followed by `d`, `h`, `m` or `s`.
fn ago(text: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let number: u64 = digits.parse().ok()?;
        total = total.checked_add(number.checked_mul(unit)?)?;
        digits.clear();
    }
    (digits.is_empty() && !text.is_empty()).then(|| Duration::from_secs(total))
}

/// The second (Unix epoch) of an RFC 3339 time, in UTC (`Z`) or with an offset (`+02:00`), which
/// the SDK's parser does not take.
fn seconds_of(text: &str) -> Option<i64> {
    if let Ok(time) = DateTime::from_str(text, Format::DateTime) {
        return Some(time.secs());
    }
    let time_of_day = text.find(['T', 't'])?;
    let sign_at = text.rfind(['+', '-']).filter(|at| *at > time_of_day)?;
    let (hours, minutes) = text[sign_at + 1..].split_once(':')?;
    let digits = |part: &str| (part.len() == 2).then(|| part.parse::<i64>().ok()).flatten();
    let offset = digits(hours)? * 3_600 + digits(minutes)? * 60;
    let utc = DateTime::from_str(&format!("{}Z", &text[..sign_at]), Format::DateTime).ok()?.secs();
    Some(if text[sign_at..].starts_with('+') { utc - offset } else { utc + offset })
}

/// A second as RFC 3339 (`2026-11-30T12:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let time = DateTime::from_secs(i64::try_from(secs).unwrap_or(i64::MAX));
    time.fmt(Format::DateTime).unwrap_or_else(|_| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-30T12:00:00Z.
    const NOW: u64 = 1_796_040_000;

    #[test]
    fn every_form_of_to_is_understood() {
        assert_eq!(rfc3339(NOW), "2026-11-30T12:00:00Z");
        assert_eq!(parse("trim-horizon", NOW), Ok(RewindTo::TrimHorizon));
        assert_eq!(parse("latest", NOW), Ok(RewindTo::Since(NOW)));
        assert_eq!(parse("2h", NOW), Ok(RewindTo::Since(NOW - 7_200)));
        assert_eq!(parse("90m", NOW), Ok(RewindTo::Since(NOW - 5_400)));
        assert_eq!(parse("1h30m", NOW), Ok(RewindTo::Since(NOW - 5_400)));
        assert_eq!(parse("0s", NOW), Ok(RewindTo::Since(NOW)));
        assert_eq!(parse("24h", NOW), Ok(RewindTo::Since(NOW - 86_400)), "the retention's edge is inside it");
        assert_eq!(parse("2026-11-30T10:00:00Z", NOW), Ok(RewindTo::Since(NOW - 7_200)));
        assert_eq!(parse("2026-11-30T10:00:00.900Z", NOW), Ok(RewindTo::Since(NOW - 7_200)), "rounded down");
        assert_eq!(parse("2026-11-30T13:00:00+02:00", NOW), Ok(RewindTo::Since(NOW - 3_600)));
        assert_eq!(parse("2026-11-30T09:30:00-01:30", NOW), Ok(RewindTo::Since(NOW - 3_600)));
    }

    #[test]
    fn times_outside_the_retention_and_nonsense_are_refused() {
        let future = parse("2026-11-30T12:00:01Z", NOW).expect_err("in the future");
        assert!(future.contains("in the future"), "{future}");
        let old = parse("25h", NOW).expect_err("too old");
        assert!(old.contains("older than the stream's 24 h retention"), "{old}");
        assert!(parse("1d1s", NOW).is_err());
        for nonsense in ["", "h", "2", "2x", "yesterday", "-2h", "2026-11-30"] {
            let err = parse(nonsense, NOW).expect_err(nonsense);
            assert!(err.contains("not trim-horizon"), "{nonsense}: {err}");
        }
    }
}
