//! The one way Breakwater writes a length of time, everywhere: in the custom resources
//! (`ttl: 30s`), in the agent's flags (`--deadline 5ms`) and in the lease HTTP API
//! (`{"wait": "10s"}`, `"ttl": "30s"`). One grammar, one parser ([`parse`]) and one printer
//! ([`format`]), so a value printed anywhere can be pasted anywhere else.
//!
//! The grammar is [`PATTERN`]: one or more whole numbers of 1 to 6 digits, each followed by
//! a unit — `h`, `m`, `s` or `ms` — with nothing in between (`30s`, `500ms`, `1m30s`,
//! `2h`, `0s`). Units may repeat and come in any order; the parts are added up. It is a
//! subset of Go's durations, so CEL's `duration()` reads every accepted value. The printer
//! writes the largest units first, each at most once, and drops any part below a
//! millisecond (`Duration::from_millis(90_500)` prints `1m30s500ms`).

use std::{fmt, time::Duration};

/// The pattern every duration matches (the CRDs' schema uses it as is).
pub const PATTERN: &str = "^([0-9]{1,6}(h|m|s|ms))+$";

/// The most digits one part may have.
const MAX_DIGITS: usize = 6;

/// A text that is not a duration, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a duration ({problem}): use whole numbers of h, m, s or ms, such as 30s, 500ms or 1m30s"
)]
pub struct InvalidDuration {
    pub text: String,
    pub problem: Problem,
}

/// What [`parse`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    Empty,
    /// A part does not start with a digit (`ms`, `-1s`, `1.5s`).
    NoNumber,
    /// A number of more than six digits.
    TooManyDigits,
    /// A number without a unit (`10`), or with one that is not h, m, s or ms (`5d`, `250us`).
    NoUnit,
    /// The total does not fit a `std::time::Duration`.
    TooLong,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::Empty => "empty",
            Problem::NoNumber => "a part does not start with a whole number",
            Problem::TooManyDigits => "a number has more than 6 digits",
            Problem::NoUnit => "a number is not followed by h, m, s or ms",
            Problem::TooLong => "too long",
        })
    }
}

/// Reads a duration written in the grammar of [`PATTERN`].
pub fn parse(text: &str) -> Result<Duration, InvalidDuration> {
    let invalid = |problem| InvalidDuration { text: text.to_string(), problem };
    if text.is_empty() {
        return Err(invalid(Problem::Empty));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid(Problem::NoNumber));
        }
        if digits > MAX_DIGITS {
            return Err(invalid(Problem::TooManyDigits));
        }
        // At most six digits: always a u32.
        let value: u32 = rest[..digits].parse().map_err(|_| invalid(Problem::TooManyDigits))?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(invalid(Problem::NoUnit));
        };
        rest = &rest[len..];
        total = unit
            .checked_mul(value)
            .and_then(|part| total.checked_add(part))
            .ok_or(invalid(Problem::TooLong))?;
    }
    Ok(total)
}

/// Writes `duration` in the grammar [`parse`] reads, largest units first: `30s`, `1m30s`,
/// `250ms`, `0s`. Parts below a millisecond are dropped.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    let parts = [(3_600_000, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")];
    let mut rest = millis;
    for (size, unit) in parts {
        let count = rest / size;
        rest %= size;
        if count > 0 {
            out.push_str(&count.to_string());
            out.push_str(unit);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grammar() {
        let cases = [
            ("30s", Some(30_000)),
            ("500ms", Some(500)),
            ("1m30s", Some(90_000)),
            ("2h", Some(7_200_000)),
            ("0s", Some(0)),
            ("1s500ms", Some(1_500)),
            ("30s1m", Some(90_000)),
            ("", None),
            ("10", None),
            ("1.5s", None),
            ("-1s", None),
            ("5d", None),
            ("250us", None),
            ("1m 30s", None),
            ("PT5S", None),
            ("1234567s", None),
        ];
        for (text, millis) in cases {
            assert_eq!(parse(text).ok().map(|d| d.as_millis()), millis, "{text:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let problem = |text: &str| parse(text).unwrap_err().problem;
        assert_eq!(problem(""), Problem::Empty);
        assert_eq!(problem("ms"), Problem::NoNumber);
        assert_eq!(problem("1234567s"), Problem::TooManyDigits);
        assert_eq!(problem("5d"), Problem::NoUnit);
        assert_eq!(problem("10"), Problem::NoUnit);
        assert_eq!(
            parse("5d").unwrap_err().to_string(),
            "\"5d\" is not a duration (a number is not followed by h, m, s or ms): use whole numbers \
             of h, m, s or ms, such as 30s, 500ms or 1m30s"
        );
    }

    #[test]
    fn pattern_agrees_with_parser() {
        let pattern = regex::Regex::new(PATTERN).expect("pattern compiles");
        for text in ["30s", "500ms", "1m30s", "10", "1.5s", "5d", "", "ms", "1s1", "1m 30s", "250us", "7h7h"]
        {
            assert_eq!(pattern.is_match(text), parse(text).is_ok(), "{text:?}");
        }
    }

    #[test]
    fn what_is_printed_parses_back() {
        let cases = [
            (0, "0s"),
            (250, "250ms"),
            (30_000, "30s"),
            (90_000, "1m30s"),
            (1_500, "1s500ms"),
            (3_600_000, "1h"),
            (3_661_001, "1h1m1s1ms"),
        ];
        for (millis, text) in cases {
            let duration = Duration::from_millis(millis);
            assert_eq!(format(duration), text);
            assert_eq!(parse(text), Ok(duration));
        }
        assert_eq!(format(Duration::from_micros(1_500)), "1ms", "below a millisecond is dropped");
    }
}
