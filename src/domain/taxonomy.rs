//! The failure taxonomy: which class an outcome belongs to.
//!
//! Each class gets its own treatment (see [`crate::domain::breaker::Effect`]):
//! a bad request must never trip a breaker, an invalid key must open it at
//! once, and a 429 must pause the budget rather than count as an outage. The
//! classification is a pure function of what the client reported; an explicit
//! class sent by the client always wins.

use std::fmt;

/// Outcome classes (mirrors `backstop.v1.OutcomeClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutcomeClass {
    Success,
    Transient,
    RateLimited,
    Persistent,
    BadInput,
    Partial,
    Timeout,
}

impl OutcomeClass {
    pub const ALL: [OutcomeClass; 7] = [
        OutcomeClass::Success,
        OutcomeClass::Transient,
        OutcomeClass::RateLimited,
        OutcomeClass::Persistent,
        OutcomeClass::BadInput,
        OutcomeClass::Partial,
        OutcomeClass::Timeout,
    ];

    /// Stable lower-case name used in config keys, metrics labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Success => "success",
            OutcomeClass::Transient => "transient",
            OutcomeClass::RateLimited => "rate_limited",
            OutcomeClass::Persistent => "persistent",
            OutcomeClass::BadInput => "bad_input",
            OutcomeClass::Partial => "partial",
            OutcomeClass::Timeout => "timeout",
        }
    }

    /// Dense index, for per-class counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for OutcomeClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an outcome could not be classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifyError {
    /// Neither an explicit class, an HTTP status nor an error type was given.
    NothingToClassify,
    /// The HTTP status is outside 100..=599.
    BadStatus(i32),
}

impl fmt::Display for ClassifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassifyError::NothingToClassify => f.write_str(
                "cannot classify the outcome: set `outcome`, or report the provider's `http_status` and/or `error_type`",
            ),
            ClassifyError::BadStatus(s) => write!(
                f,
                "http_status {s} is not an HTTP status code (expected 100..=599, or 0 for none)"
            ),
        }
    }
}

impl std::error::Error for ClassifyError {}

/// Error types / codes (matched case-insensitively as substrings) meaning the
/// account cannot make calls until a human acts: quota, billing, credit.
const QUOTA_MARKERS: &[&str] = &[
    "insufficient_quota",
    "credit balance",
    "credit_balance",
    "billing",
    "quota_exceeded",
    "perday",
    "per_day",
    "per day",
    "limit: 0",
];

/// Error types meaning the key itself is wrong or lacks permission.
const AUTH_MARKERS: &[&str] = &[
    "authentication_error",
    "permission_error",
    "invalid_api_key",
    "incorrect api key",
    "permission_denied",
    "unauthenticated",
    "account_deactivated",
];

/// Error types meaning the request itself is at fault.
const BAD_INPUT_MARKERS: &[&str] = &[
    "context_length_exceeded",
    "prompt is too long",
    "request_too_large",
    "invalid_request_error",
    "invalid_argument",
    "content_policy",
    "content_filter",
    "not_found_error",
];

const RATE_MARKERS: &[&str] = &["rate_limit", "resource_exhausted", "too_many_requests"];

const TIMEOUT_MARKERS: &[&str] = &["timeout", "timed_out", "deadline_exceeded"];

fn contains_any(haystack: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| haystack.contains(n))
}

/// Classifies an outcome.
///
/// Precedence: explicit class; then quota/billing markers (an OpenAI
/// `insufficient_quota` arrives as a 429, Anthropic's "credit balance is too
/// low" as a 400, and both are PERSISTENT); then the HTTP status; then, with no
/// status (e.g. a connection error), the error type alone.
pub fn classify(
    explicit: Option<OutcomeClass>,
    http_status: i32,
    error_type: &str,
) -> Result<OutcomeClass, ClassifyError> {
    if let Some(class) = explicit {
        return Ok(class);
    }
    if http_status != 0 && !(100..=599).contains(&http_status) {
        return Err(ClassifyError::BadStatus(http_status));
    }
    let et = error_type.to_ascii_lowercase();
    if !(200..300).contains(&http_status) && contains_any(&et, QUOTA_MARKERS) {
        return Ok(OutcomeClass::Persistent);
    }
    let by_status = match http_status {
        0 => None,
        200..=299 => Some(OutcomeClass::Success),
        408 => Some(OutcomeClass::Timeout),
        429 => Some(OutcomeClass::RateLimited),
        401 | 403 => Some(OutcomeClass::Persistent),
        // 409 (conflict) and 425 (too early) are retried by the provider SDKs.
        409 | 425 => Some(OutcomeClass::Transient),
        400..=499 => Some(OutcomeClass::BadInput),
        500..=599 => Some(OutcomeClass::Transient),
        // 1xx / 3xx: the call did not yield a provider reply we can use, and
        // the provider is not failing; do not count it against the breaker.
        _ => Some(OutcomeClass::BadInput),
    };
    if let Some(class) = by_status {
        return Ok(class);
    }
    if et.is_empty() {
        return Err(ClassifyError::NothingToClassify);
    }
    // No status: the error type alone decides. Unknown errors without a status
    // are almost always network failures, hence TRANSIENT.
    Ok(if contains_any(&et, TIMEOUT_MARKERS) {
        OutcomeClass::Timeout
    } else if contains_any(&et, AUTH_MARKERS) {
        OutcomeClass::Persistent
    } else if contains_any(&et, RATE_MARKERS) {
        OutcomeClass::RateLimited
    } else if contains_any(&et, BAD_INPUT_MARKERS) {
        OutcomeClass::BadInput
    } else {
        // overloaded_error, api_error, UNAVAILABLE, ECONNRESET...
        OutcomeClass::Transient
    })
}

#[cfg(test)]
mod tests {
    use super::OutcomeClass::*;
    use super::*;

    #[test]
    fn status_table() {
        let table: &[(i32, &str, OutcomeClass)] = &[
            (200, "", Success),
            (201, "", Success),
            (204, "", Success),
            (408, "", Timeout),
            (429, "", RateLimited),
            (429, "rate_limit_error", RateLimited),
            (429, "RESOURCE_EXHAUSTED", RateLimited),
            (429, "insufficient_quota", Persistent),
            (429, "GenerateRequestsPerDayPerProjectPerModel", Persistent),
            (400, "Your credit balance is too low", Persistent),
            (500, "", Transient),
            (500, "api_error", Transient),
            (502, "", Transient),
            (503, "", Transient),
            (503, "server_is_overloaded", Transient),
            (504, "", Transient),
            (529, "overloaded_error", Transient),
            (529, "", Transient),
            (401, "", Persistent),
            (401, "authentication_error", Persistent),
            (403, "", Persistent),
            (403, "PERMISSION_DENIED", Persistent),
            (400, "", BadInput),
            (400, "context_length_exceeded", BadInput),
            (400, "invalid_request_error", BadInput),
            (404, "", BadInput),
            (413, "request_too_large", BadInput),
            (422, "", BadInput),
            (409, "", Transient),
            (418, "", BadInput),
            (507, "", Transient),
            (302, "", BadInput),
        ];
        for &(status, et, want) in table {
            assert_eq!(classify(None, status, et), Ok(want), "{status} {et:?}");
        }
    }

    #[test]
    fn error_type_alone() {
        let table: &[(&str, OutcomeClass)] = &[
            ("overloaded_error", Transient),
            ("timeout", Timeout),
            ("DEADLINE_EXCEEDED", Timeout),
            ("insufficient_quota", Persistent),
            ("invalid_api_key", Persistent),
            ("rate_limit_error", RateLimited),
            ("context_length_exceeded", BadInput),
            ("ECONNRESET", Transient),
        ];
        for &(et, want) in table {
            assert_eq!(classify(None, 0, et), Ok(want), "{et:?}");
        }
    }

    #[test]
    fn explicit_wins() {
        assert_eq!(classify(Some(Partial), 200, ""), Ok(Partial));
        assert_eq!(classify(Some(BadInput), 503, "overloaded"), Ok(BadInput));
    }

    #[test]
    fn rejects_what_cannot_be_classified() {
        assert_eq!(classify(None, 0, ""), Err(ClassifyError::NothingToClassify));
        assert_eq!(classify(None, 600, ""), Err(ClassifyError::BadStatus(600)));
        assert_eq!(classify(None, -1, ""), Err(ClassifyError::BadStatus(-1)));
        // A success status is never turned into a failure by a stray error type.
        assert_eq!(classify(None, 200, "insufficient_quota"), Ok(Success));
    }
}
