"""The server's failure taxonomy, for the local fail-safe.

While Backstop is unreachable the client must classify outcomes exactly as the
server would, or an agent would back off from a 400 or hammer a provider that
said ``insufficient_quota``. This module is a line-by-line mirror of the
server's ``src/domain/taxonomy.rs`` (same marker lists under the same names,
same precedence), and is held to it by ``tests/test_taxonomy.py``, which
parses that file and asks a running server to classify every marker and
status: a marker added on one side only fails the suite.

The server is the single source of truth; when it reports an HTTP status the
client sends it unclassified and lets the server decide. This copy is used
only for decisions taken without the server.
"""

from __future__ import annotations

from typing import Tuple

from .types import OutcomeClass

#: Error types / codes (matched case-insensitively as substrings) meaning the
#: account cannot make calls until a human acts: quota, billing, credit.
QUOTA_MARKERS: Tuple[str, ...] = (
    "insufficient_quota",
    "credit balance",
    "credit_balance",
    "billing",
    "quota_exceeded",
    "perday",
    "per_day",
    "per day",
    "limit: 0",
)

#: Error types meaning the key itself is wrong or lacks permission.
AUTH_MARKERS: Tuple[str, ...] = (
    "authentication_error",
    "permission_error",
    "invalid_api_key",
    "incorrect api key",
    "permission_denied",
    "unauthenticated",
    "account_deactivated",
)

#: Error types meaning the request itself is at fault.
BAD_INPUT_MARKERS: Tuple[str, ...] = (
    "context_length_exceeded",
    "prompt is too long",
    "request_too_large",
    "invalid_request_error",
    "invalid_argument",
    "content_policy",
    "content_filter",
    "not_found_error",
)

RATE_MARKERS: Tuple[str, ...] = ("rate_limit", "resource_exhausted", "too_many_requests")

TIMEOUT_MARKERS: Tuple[str, ...] = ("timeout", "timed_out", "deadline_exceeded")

#: Without an HTTP status, the error type alone decides: the first list that
#: matches wins, in this order; nothing matching is TRANSIENT (a network failure).
BY_ERROR_TYPE: Tuple[Tuple[Tuple[str, ...], OutcomeClass], ...] = (
    (TIMEOUT_MARKERS, OutcomeClass.TIMEOUT),
    (AUTH_MARKERS, OutcomeClass.PERSISTENT),
    (RATE_MARKERS, OutcomeClass.RATE_LIMITED),
    (BAD_INPUT_MARKERS, OutcomeClass.BAD_INPUT),
)


def _contains_any(haystack: str, needles: Tuple[str, ...]) -> bool:
    return any(n in haystack for n in needles)


def _ascii_lower(s: str) -> str:
    """Lower-cases ASCII letters only, as Rust's ``to_ascii_lowercase`` (``str.lower``
    would also fold e.g. the Kelvin sign into ``k`` and match where the server does not)."""
    return s.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


def by_status(http_status: int) -> OutcomeClass:
    """The class an HTTP status (1..599, not 0) implies on its own."""
    if 200 <= http_status <= 299:
        return OutcomeClass.SUCCESS
    if http_status == 408:
        return OutcomeClass.TIMEOUT
    if http_status == 429:
        return OutcomeClass.RATE_LIMITED
    if http_status in (401, 403):
        return OutcomeClass.PERSISTENT
    # 409 (conflict) and 425 (too early) are retried by the provider SDKs.
    if http_status in (409, 425):
        return OutcomeClass.TRANSIENT
    if 400 <= http_status <= 499:
        return OutcomeClass.BAD_INPUT
    if 500 <= http_status <= 599:
        return OutcomeClass.TRANSIENT
    # 1xx / 3xx: no usable reply, and the provider is not failing.
    return OutcomeClass.BAD_INPUT


def classify(explicit: OutcomeClass, http_status: int, error_type: str) -> OutcomeClass:
    """The server's classification, for use while it is unreachable.

    Precedence: an explicit class; then quota/billing markers on anything but a
    2xx (OpenAI's ``insufficient_quota`` arrives as a 429, Anthropic's "credit
    balance is too low" as a 400: both PERSISTENT); then the HTTP status; then,
    with no status, the error type alone. Where the server would refuse to
    classify (no status and no error type, or a status outside 100..599) the
    fail-safe has to decide anyway: TRANSIENT and BAD_INPUT respectively.
    """
    if explicit != OutcomeClass.UNSPECIFIED:
        return explicit
    et = _ascii_lower(error_type)
    if not 200 <= http_status <= 299 and _contains_any(et, QUOTA_MARKERS):
        return OutcomeClass.PERSISTENT
    if http_status:
        return by_status(http_status)
    for markers, cls in BY_ERROR_TYPE:
        if _contains_any(et, markers):
            return cls
    # overloaded_error, api_error, UNAVAILABLE, ECONNRESET...
    return OutcomeClass.TRANSIENT
