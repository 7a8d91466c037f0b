//! Provider rate-limit signals, parsed from raw response headers.
//!
//! Agents forward the provider's response headers untouched; Backstop reads:
//! * `retry-after` (seconds, or an HTTP-date) and `retry-after-ms`;
//! * OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as
//!   Go durations (`1s`, `6m0s`, `20ms`);
//! * Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   resets as RFC 3339 times.
//!
//! Header names match case-insensitively. Providers and proxies send nonsense
//! (Azure sends `-1` and `0`): every malformed, negative or absurd value is
//! dropped with a warning, and every delay is clamped to `max_pause`, so a bad
//! header can neither panic the server nor pause a target for years. When the
//! same signal arrives twice, the more cautious value wins (the longer wait,
//! the smaller remaining), whatever order the map iterates in.

use super::budget::Kind;
use super::duration::parse_duration;
use super::time::Time;
use std::time::Duration;

/// What the provider said about one budget kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitSignal {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// How long until the provider's budget is fully restored.
    pub reset_after: Option<Duration>,
}

impl LimitSignal {
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset_after.is_none()
    }

    /// The provider said "nothing left until reset": pause for that long.
    pub fn exhausted_for(&self) -> Option<Duration> {
        match (self.remaining, self.reset_after) {
            (Some(0), Some(d)) if !d.is_zero() => Some(d),
            _ => None,
        }
    }
}

/// Everything parsed from one response's headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    pub retry_after: Option<Duration>,
    /// Indexed by [`Kind::index`].
    pub limits: [LimitSignal; 4],
    /// Values that were ignored or clamped, for a logged warning.
    pub warnings: Vec<String>,
}

impl Signals {
    pub fn limit(&self, kind: Kind) -> &LimitSignal {
        &self.limits[kind.index()]
    }

    /// The longest pause any signal asks for.
    pub fn pause(&self) -> Option<Duration> {
        let exhausted = self
            .limits
            .iter()
            .filter_map(LimitSignal::exhausted_for)
            .max();
        match (self.retry_after.filter(|d| !d.is_zero()), exhausted) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Clone, Copy)]
enum Field {
    Limit,
    Remaining,
    Reset,
}

/// Which budget signal a (lower-cased) header name carries, and how its reset is written.
fn classify_name(name: &str) -> Option<(Kind, Field, bool)> {
    if let Some(rest) = name.strip_prefix("x-ratelimit-") {
        let (field, kind) = rest.split_once('-')?;
        let kind = match kind {
            "requests" => Kind::Requests,
            "tokens" => Kind::Tokens,
            _ => return None,
        };
        let field = match field {
            "limit" => Field::Limit,
            "remaining" => Field::Remaining,
            "reset" => Field::Reset,
            _ => return None,
        };
        return Some((kind, field, false));
    }
    let rest = name.strip_prefix("anthropic-ratelimit-")?;
    let (kind, field) = rest.rsplit_once('-')?;
    let kind = match kind {
        "requests" => Kind::Requests,
        "tokens" => Kind::Tokens,
        "input-tokens" => Kind::InputTokens,
        "output-tokens" => Kind::OutputTokens,
        _ => return None,
    };
    let field = match field {
        "limit" => Field::Limit,
        "remaining" => Field::Remaining,
        "reset" => Field::Reset,
        _ => return None,
    };
    Some((kind, field, true))
}

/// Parses one response's headers. `now` anchors absolute times; every delay is
/// clamped to `max_pause`.
pub fn parse_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: Time,
    max_pause: Duration,
) -> Signals {
    let mut s = Signals::default();
    let mut retry_after_ms: Option<Duration> = None;
    let mut zero_limits = [false; 4];
    for (raw_name, value) in headers {
        let name = raw_name.trim().to_ascii_lowercase();
        let value = value.trim();
        match name.as_str() {
            "retry-after" => match parse_retry_after(value, now) {
                Some(d) => {
                    let d = clamp(d, max_pause, raw_name, &mut s.warnings);
                    s.retry_after = Some(s.retry_after.map_or(d, |x| x.max(d)));
                }
                None => warn(
                    &mut s.warnings,
                    raw_name,
                    value,
                    "not seconds or an HTTP-date",
                ),
            },
            "retry-after-ms" => match parse_non_negative_f64(value) {
                Some(ms) => {
                    let d = clamp(
                        // Capped before conversion: from_secs_f64 panics past Duration::MAX.
                        Duration::from_secs_f64((ms / 1000.0).min(1e12)),
                        max_pause,
                        raw_name,
                        &mut s.warnings,
                    );
                    retry_after_ms = Some(retry_after_ms.map_or(d, |x| x.max(d)));
                }
                None => warn(
                    &mut s.warnings,
                    raw_name,
                    value,
                    "not a non-negative number of milliseconds",
                ),
            },
            _ => {
                let Some((kind, field, anthropic)) = classify_name(&name) else {
                    continue;
                };
                let sig = &mut s.limits[kind.index()];
                match field {
                    Field::Limit | Field::Remaining => {
                        let Some(n) = parse_count(value) else {
                            warn(
                                &mut s.warnings,
                                raw_name,
                                value,
                                "not a non-negative integer",
                            );
                            continue;
                        };
                        if matches!(field, Field::Limit) {
                            if n == 0 {
                                zero_limits[kind.index()] = true;
                                continue;
                            }
                            sig.limit = Some(sig.limit.map_or(n, |x| x.min(n)));
                        } else {
                            sig.remaining = Some(sig.remaining.map_or(n, |x| x.min(n)));
                        }
                    }
                    Field::Reset => {
                        let parsed = if anthropic {
                            parse_rfc3339(value).map(|t| now.until(t))
                        } else {
                            parse_duration(value).ok()
                        };
                        match parsed {
                            Some(d) => {
                                let d = clamp(d, max_pause, raw_name, &mut s.warnings);
                                sig.reset_after = Some(sig.reset_after.map_or(d, |x| x.max(d)));
                            }
                            None => warn(
                                &mut s.warnings,
                                raw_name,
                                value,
                                if anthropic {
                                    "not an RFC 3339 time"
                                } else {
                                    "not a duration like 6m0s"
                                },
                            ),
                        }
                    }
                }
            }
        }
    }
    // retry-after-ms is the more precise of the two when both are present.
    if retry_after_ms.is_some() {
        s.retry_after = retry_after_ms;
    }
    for kind in Kind::ALL {
        let sig = &mut s.limits[kind.index()];
        if zero_limits[kind.index()] {
            // A limit of 0 is what Azure sends when it has nothing to say.
            s.warnings.push(format!(
                "ignored {} rate-limit headers: a limit of 0 is not a real limit",
                kind.as_str()
            ));
            *sig = LimitSignal::default();
            continue;
        }
        if let (Some(limit), Some(rem)) = (sig.limit, sig.remaining)
            && rem > limit
        {
            s.warnings.push(format!(
                "ignored {} remaining {rem}: larger than the limit {limit}",
                kind.as_str()
            ));
            sig.remaining = None;
        }
    }
    s
}

fn warn(warnings: &mut Vec<String>, name: &str, value: &str, why: &str) {
    let shown: String = value.chars().take(64).collect();
    warnings.push(format!("ignored header {name}: {shown:?} is {why}"));
}

fn clamp(d: Duration, max: Duration, name: &str, warnings: &mut Vec<String>) -> Duration {
    if d > max {
        warnings.push(format!(
            "clamped header {name}: {}s exceeds the maximum pause of {}s",
            d.as_secs(),
            max.as_secs()
        ));
        max
    } else {
        d
    }
}

/// The smallest of a comma-separated list of non-negative integers (duplicated
/// headers are often joined with commas by proxies).
fn parse_count(value: &str) -> Option<u64> {
    value
        .split(',')
        .map(|v| {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                v.parse::<u64>().ok()
            }
        })
        .try_fold(None::<u64>, |acc, v| {
            v.map(|v| Some(acc.map_or(v, |a| a.min(v))))
        })
        .flatten()
}

fn parse_non_negative_f64(value: &str) -> Option<f64> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    v.parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0)
}

/// `retry-after`: delay-seconds or an HTTP-date (a past date means "now").
fn parse_retry_after(value: &str, now: Time) -> Option<Duration> {
    if let Some(secs) = parse_non_negative_f64(value) {
        return Some(Duration::from_secs_f64(secs.min(1e12)));
    }
    let t = httpdate::parse_http_date(value).ok()?;
    let nanos = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    // A date past what Time holds (year 2554+) is "very far away", not
    // "unreadable": it saturates and is then clamped like a huge seconds value.
    let at = Time::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
    Some(now.until(at))
}

/// Parses an RFC 3339 timestamp (`2026-01-01T00:00:00Z`, optional fraction,
/// `Z` or `±hh:mm`). Returns `None` for anything else, or times before 1970.
pub fn parse_rfc3339(value: &str) -> Option<Time> {
    let b = value.trim().as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = b.get(r)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.is_empty() {
            return None;
        }
        for (k, d) in digits.iter().take(9).enumerate() {
            nanos += i64::from(d - b'0') * 10i64.pow(8 - k as u32);
        }
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    if secs < 0 {
        return None;
    }
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    // Saturates like an HTTP-date: Anthropic's "never resets" 9999-12-31 is a
    // very long wait (clamped to max_pause by the caller), not garbage.
    Some(Time::from_nanos(u64::try_from(total).unwrap_or(u64::MAX)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn now() -> Time {
        parse_rfc3339("2026-11-28T12:00:00Z").expect("valid")
    }

    fn parse(h: &[(&str, &str)]) -> Signals {
        parse_headers(h.iter().copied(), now(), HOUR)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn rfc3339_parses_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(Time::ZERO));
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:01.5Z"),
            Some(Time::from_millis(1500))
        );
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(Time::ZERO));
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:00Z"),
            Some(Time::from_secs(951_868_800))
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-01-01 00:00:00",
            "1969-12-31T23:59:59Z",
            "2026-01-01T00:00:00+0100",
            "garbage-but-long-enough",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_seconds_date_and_ms() {
        assert_eq!(parse(&[("retry-after", "30")]).retry_after, Some(secs(30)));
        assert_eq!(
            parse(&[("Retry-After", "1.5")]).retry_after,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse(&[("retry-after", "Sat, 28 Nov 2026 12:00:45 GMT")]).retry_after,
            Some(secs(45))
        );
        // A date in the past means now.
        assert_eq!(
            parse(&[("retry-after", "Sat, 28 Nov 2026 11:00:00 GMT")]).retry_after,
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse(&[("retry-after-ms", "250")]).retry_after,
            Some(Duration::from_millis(250))
        );
        // Both: the millisecond header is the more precise one.
        assert_eq!(
            parse(&[("retry-after", "1"), ("retry-after-ms", "1200")]).retry_after,
            Some(Duration::from_millis(1200))
        );
    }

    #[test]
    fn openai_headers() {
        let s = parse(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-reset-tokens", "12ms"),
        ]);
        assert_eq!(
            *s.limit(Kind::Requests),
            LimitSignal {
                limit: Some(500),
                remaining: Some(0),
                reset_after: Some(secs(360))
            }
        );
        assert_eq!(
            s.limit(Kind::Tokens).reset_after,
            Some(Duration::from_millis(12))
        );
        assert_eq!(s.pause(), Some(secs(360)));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert_eq!(
            parse(&[("x-ratelimit-reset-tokens", "1h2m3.5s")])
                .limit(Kind::Tokens)
                .reset_after,
            Some(HOUR.min(Duration::from_millis(3_723_500)))
        );
    }

    #[test]
    fn anthropic_headers() {
        let s = parse(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-11-28T12:00:01Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-11-28T12:00:20.5Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-tokens-remaining", "100"),
        ]);
        assert_eq!(s.limit(Kind::Requests).remaining, Some(49));
        assert_eq!(s.limit(Kind::Requests).reset_after, Some(secs(1)));
        assert_eq!(
            s.limit(Kind::InputTokens).exhausted_for(),
            Some(Duration::from_millis(20_500))
        );
        assert_eq!(s.limit(Kind::OutputTokens).limit, Some(8000));
        assert_eq!(s.limit(Kind::Tokens).remaining, Some(100));
        assert_eq!(s.pause(), Some(Duration::from_millis(20_500)));
    }

    #[test]
    fn malformed_negative_huge_and_azure_values_are_ignored_or_clamped() {
        let s = parse(&[
            ("retry-after", "-1"),
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-limit-tokens", "0"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1s"),
            ("x-ratelimit-reset-requests", "soon"),
            ("anthropic-ratelimit-tokens-reset", "yesterday"),
            ("retry-after-ms", "NaN"),
        ]);
        assert_eq!(s.retry_after, None);
        assert!(s.limit(Kind::Requests).is_empty());
        assert!(
            s.limit(Kind::Tokens).is_empty(),
            "limit 0 discards the kind"
        );
        assert_eq!(s.pause(), None);
        assert_eq!(s.warnings.len(), 6, "{:#?}", s.warnings);
        // Absurd values are clamped to the maximum pause, never years.
        let s = parse(&[
            ("retry-after", "315360000"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "9000h"),
        ]);
        assert_eq!(s.retry_after, Some(HOUR));
        assert_eq!(s.pause(), Some(HOUR));
        assert_eq!(s.warnings.len(), 2);
        // Huge millisecond hints are clamped, not a panic.
        let s = parse(&[("retry-after-ms", "20000000000000000000000")]);
        assert_eq!(s.retry_after, Some(HOUR));
        // Numbers that overflow u64 are malformed, not a panic.
        let s = parse(&[("x-ratelimit-remaining-requests", "99999999999999999999999")]);
        assert!(s.limit(Kind::Requests).is_empty());
        // Remaining above the limit is inconsistent: drop the remaining.
        let s = parse(&[
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "11"),
        ]);
        assert_eq!(s.limit(Kind::Requests).remaining, None);
        assert_eq!(s.limit(Kind::Requests).limit, Some(10));
    }

    #[test]
    fn names_are_case_insensitive_and_duplicates_resolve_cautiously() {
        let s = parse(&[
            ("X-RateLimit-Remaining-Requests", "5"),
            ("x-ratelimit-remaining-requests", "3"),
            ("RETRY-AFTER", "2"),
            ("retry-after", "7"),
            ("x-ratelimit-limit-requests", "100, 100"),
        ]);
        assert_eq!(s.limit(Kind::Requests).remaining, Some(3));
        assert_eq!(s.limit(Kind::Requests).limit, Some(100));
        assert_eq!(s.retry_after, Some(secs(7)));
        // Order does not matter.
        let t = parse(&[
            ("retry-after", "7"),
            ("RETRY-AFTER", "2"),
            ("x-ratelimit-remaining-requests", "3"),
            ("X-RateLimit-Remaining-Requests", "5"),
            ("x-ratelimit-limit-requests", "100, 100"),
        ]);
        assert_eq!(s, t);
        // Unrelated headers are not warnings.
        assert!(
            parse(&[
                ("content-type", "application/json"),
                ("x-ratelimit-foo-bar", "1")
            ])
            .warnings
            .is_empty()
        );
    }

    #[test]
    fn far_future_dates_are_clamped_like_huge_seconds() {
        let by_seconds = parse(&[("retry-after", "99999999999")]);
        let by_date = parse(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]);
        assert_eq!(by_seconds.retry_after, Some(HOUR));
        assert_eq!(by_date.retry_after, Some(HOUR));
        assert!(by_date.warnings.iter().any(|w| w.contains("clamped")));
        let anthropic = parse(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ]);
        assert_eq!(anthropic.limit(Kind::Requests).reset_after, Some(HOUR));
        assert_eq!(anthropic.pause(), Some(HOUR));
    }

    #[test]
    fn a_reset_without_zero_remaining_is_not_a_pause() {
        let s = parse(&[
            ("x-ratelimit-remaining-requests", "1"),
            ("x-ratelimit-reset-requests", "30s"),
        ]);
        assert_eq!(s.pause(), None);
        let s = parse(&[("x-ratelimit-remaining-requests", "0")]);
        assert_eq!(s.pause(), None, "no reset time: nothing to pause until");
        assert_eq!(parse(&[("retry-after", "0")]).pause(), None);
    }
}
