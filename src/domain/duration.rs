//! Human durations: `250ms`, `30s`, `10m`, `1h2m3.5s`, `6m0s`, `1.5s`.
//!
//! The same grammar serves the config file and OpenAI's `x-ratelimit-reset-*`
//! headers, which are Go-style durations. Parsing is strict (no silent
//! truncation) and never panics on arbitrary input.

use std::fmt;
use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

/// Parses a sequence of `<number><unit>` pairs, units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, `d`.
///
/// A bare `0` is accepted (Go prints a zero duration as `0s`, some proxies as `0`).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError(
            "empty duration; write e.g. \"250ms\", \"30s\", \"10m\"".into(),
        ));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = |why: &str| {
        DurationError(format!(
            "invalid duration {input:?}: {why}; write e.g. \"250ms\", \"30s\", \"10m\", \"1h2m3.5s\""
        ))
    };
    let mut total_nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        if unit_len == 0 {
            return Err(bad("missing unit"));
        }
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
            return Err(bad("malformed number"));
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad("number too large"))?
        };
        let mut nanos = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| bad("too large"))?;
        // Fractions are exact to the nanosecond; extra digits are dropped.
        let mut scale = unit_nanos;
        for d in frac_part.bytes().take(18) {
            scale /= 10;
            nanos += u128::from(d - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| bad("too large"))?;
        rest = tail;
    }
    let nanos = u64::try_from(total_nanos).map_err(|_| bad("too large"))?;
    Ok(Duration::from_nanos(nanos))
}

/// Formats a duration compactly (`1m30s`, `250ms`) for messages and config echoes.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if !nanos.is_multiple_of(1_000_000_000) && nanos < 1_000_000_000 {
        if nanos.is_multiple_of(1_000_000) {
            return format!("{}ms", nanos / 1_000_000);
        }
        if nanos.is_multiple_of(1_000) {
            return format!("{}us", nanos / 1_000);
        }
        return format!("{nanos}ns");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let sub = d.subsec_nanos();
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || sub > 0 {
        if sub > 0 {
            // Exact to the nanosecond (fuzzing found `3h` for 3h + 3.25µs):
            // what is printed parses back to the same duration.
            let frac = format!("{sub:09}");
            out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
        } else {
            out.push_str(&format!("{s}s"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_config_and_openai_formats() {
        let cases = [
            ("250ms", ms(250)),
            ("30s", ms(30_000)),
            ("10m", ms(600_000)),
            ("1s", ms(1000)),
            ("6m0s", ms(360_000)),
            ("12ms", ms(12)),
            ("20ms", ms(20)),
            ("1h2m3.5s", ms(3_723_500)),
            ("1.5s", ms(1500)),
            ("0.5ms", Duration::from_micros(500)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (" 2s ", ms(2000)),
            ("1d", ms(86_400_000)),
            ("7us", Duration::from_micros(7)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_malformed_without_panicking() {
        for input in [
            "",
            "s",
            "10",
            "-1s",
            "1x",
            "1..2s",
            ".s",
            "1s2",
            "ms10",
            "99999999999999999999h",
            "1e3s",
            "NaN",
            "1 s",
        ] {
            assert!(parse_duration(input).is_err(), "{input:?} should fail");
        }
    }

    #[test]
    fn formats_round_trip() {
        for d in [
            ms(250),
            ms(30_000),
            ms(90_000),
            ms(3_723_500),
            Duration::ZERO,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(ms(90_000)), "1m30s");
    }
}
