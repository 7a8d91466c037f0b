"""Pure client-side logic: reading SDK-shaped errors, the local fail-safe engine, route memory."""

from __future__ import annotations

import asyncio
import email.message
import io
import json
import socket
import urllib.error
from typing import Any, Dict, List, Optional

import pytest

from backstop import (
    AllTargetsFailed,
    AttemptError,
    BreakerState,
    CircuitOpen,
    LocalPolicy,
    MalformedOutput,
    OutcomeClass,
    OutcomeReport,
    RateLimited,
    Reason,
    RequestTooLarge,
    RetryReason,
    RouteDecision,
    Skip,
)
from backstop._classify import (
    MAX_HEADERS,
    normalize_headers,
    observe_exception,
    observe_success,
    usage_of,
)
from backstop._local import LocalEngine, RouteMemory, classify, retry_hint
from backstop._plan import encode_payload
from backstop.errors import refusal


class _Resp:
    def __init__(self, status: int, headers: Dict[str, str]) -> None:
        self.status_code = status
        self.headers = headers


class OpenAIStyleError(Exception):
    """openai.APIStatusError: status_code, response, body = the inner error object, .code/.type."""

    def __init__(self, status: int, body: Dict[str, Any], headers: Dict[str, str]) -> None:
        super().__init__(body.get("message", ""))
        self.status_code = status
        self.response = _Resp(status, headers)
        self.body = body
        self.code = body.get("code")
        self.type = body.get("type")
        self.message = body.get("message")


class AnthropicStyleError(Exception):
    """anthropic.APIStatusError: status_code, response, body = the whole JSON body."""

    def __init__(self, status: int, body: Dict[str, Any], headers: Dict[str, str]) -> None:
        super().__init__(json.dumps(body))
        self.status_code = status
        self.response = _Resp(status, headers)
        self.body = body


class HTTPXStyleError(Exception):
    """httpx.HTTPStatusError: the status only on .response, the body as text."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__("boom")
        self.response = _Resp(status, {"Retry-After": "3"})
        self.response.text = text  # type: ignore[attr-defined]


class APITimeoutError(Exception):
    pass


class APIConnectionError(Exception):
    pass


def test_openai_insufficient_quota_carries_type_code_and_message() -> None:
    e = OpenAIStyleError(
        429,
        {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"},
        {"x-request-id": "r1"},
    )
    obs = observe_exception(e)
    assert obs.outcome == OutcomeClass.UNSPECIFIED  # the server classifies
    assert obs.http_status == 429
    assert obs.error_type == "insufficient_quota: You exceeded your current quota"
    assert obs.headers == {"x-request-id": "r1"}
    assert classify(obs.outcome, obs.http_status, obs.error_type) == OutcomeClass.PERSISTENT


def test_anthropic_credit_balance_is_persistent_via_the_message() -> None:
    e = AnthropicStyleError(
        400,
        {"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is too low"}},
        {"Request-Id": "req_1"},
    )
    obs = observe_exception(e)
    assert obs.http_status == 400 and obs.error_type.startswith("invalid_request_error: Your credit balance")
    assert obs.headers == {"request-id": "req_1"}
    assert classify(obs.outcome, obs.http_status, obs.error_type) == OutcomeClass.PERSISTENT


def test_httpx_and_urllib_shapes() -> None:
    obs = observe_exception(HTTPXStyleError(503, '{"error": {"status": "UNAVAILABLE", "message": "try later"}}'))
    assert (obs.http_status, obs.error_type, obs.headers) == (503, "UNAVAILABLE: try later", {"retry-after": "3"})

    hdrs = email.message.Message()
    hdrs["Retry-After"] = "7"
    err = urllib.error.HTTPError("http://x", 429, "Too Many Requests", hdrs, io.BytesIO(b""))
    obs = observe_exception(err)
    assert obs.http_status == 429 and obs.headers == {"retry-after": "7"}


@pytest.mark.parametrize(
    "exc,expected",
    [
        (TimeoutError("read timed out"), OutcomeClass.TIMEOUT),
        (asyncio.TimeoutError(), OutcomeClass.TIMEOUT),
        (socket.timeout("timed out"), OutcomeClass.TIMEOUT),
        (APITimeoutError("Request timed out."), OutcomeClass.TIMEOUT),
        (urllib.error.URLError(socket.timeout("timed out")), OutcomeClass.TIMEOUT),
        (ConnectionResetError("reset by peer"), OutcomeClass.TRANSIENT),
        (APIConnectionError("Connection error."), OutcomeClass.TRANSIENT),
        (urllib.error.URLError(ConnectionRefusedError("refused")), OutcomeClass.TRANSIENT),
        (json.JSONDecodeError("Expecting value", "{", 1), OutcomeClass.PARTIAL),
        (MalformedOutput("missing field"), OutcomeClass.PARTIAL),
        (KeyError("oops"), OutcomeClass.BAD_INPUT),
        (asyncio.CancelledError(), OutcomeClass.BAD_INPUT),
    ],
)
def test_exceptions_without_a_status(exc: BaseException, expected: OutcomeClass) -> None:
    obs = observe_exception(exc)
    assert obs.http_status == 0 and obs.outcome == expected and obs.error_type


def test_pydantic_validation_error_is_partial() -> None:
    from pydantic import BaseModel, ValidationError

    class M(BaseModel):
        n: int

    with pytest.raises(ValidationError) as e:
        M.model_validate({"n": "x"})
    assert observe_exception(e.value).outcome == OutcomeClass.PARTIAL


def test_headers_are_trimmed_keeping_the_signals() -> None:
    raw = [(f"x-noise-{i}", "v" * 10) for i in range(100)] + [("Retry-After", "2"), ("x-ratelimit-remaining-tokens", "0")]
    out = normalize_headers(raw)
    assert len(out) == MAX_HEADERS
    assert out["retry-after"] == "2" and out["x-ratelimit-remaining-tokens"] == "0"
    big = normalize_headers({"x-big": "v" * 20000, "retry-after": "1"})
    assert big == {"retry-after": "1"}
    assert normalize_headers([("Set-Cookie", "a"), ("set-cookie", "b")]) == {"set-cookie": "a, b"}


def test_usage_and_headers_of_a_success() -> None:
    class Anth:
        usage = type("U", (), {"input_tokens": 10, "output_tokens": 5})()

    assert usage_of(Anth()) == (10, 5)
    assert usage_of({"usage": {"prompt_tokens": 7, "completion_tokens": 3}}) == (7, 3)
    assert usage_of("text") == (0, 0)

    class WithHeaders:
        headers = {"X-RateLimit-Remaining-Requests": "0"}
        usage = None

    obs = observe_success(WithHeaders())
    assert obs.outcome == OutcomeClass.SUCCESS and obs.headers == {"x-ratelimit-remaining-requests": "0"}


def test_refusal_classes() -> None:
    assert isinstance(refusal("t", Reason.CIRCUIT_OPEN, retry_after=1.0), CircuitOpen)
    assert isinstance(refusal("t", Reason.PROBE_LIMIT), CircuitOpen)
    assert isinstance(refusal("t", Reason.KEY_SLOTS_UNAVAILABLE), CircuitOpen)
    assert isinstance(refusal("t", Reason.RETRY_BUDGET_EXHAUSTED), RateLimited)
    assert isinstance(refusal("t", Reason.CONCURRENCY_LIMIT), RateLimited)
    assert isinstance(refusal("t", Reason.REQUEST_TOO_LARGE), RequestTooLarge)
    assert "retry in 1.5s" in str(refusal("t", Reason.RATE_LIMITED, retry_after=1.5))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _report(target: str, permit: str, *, status: int = 0, outcome: OutcomeClass = OutcomeClass.UNSPECIFIED,
            headers: Optional[Dict[str, str]] = None, attempt: int = 0) -> OutcomeReport:
    return OutcomeReport(target=target, permit=permit, outcome=outcome, http_status=status, headers=headers or {}, attempt=attempt)


def test_local_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    eng = LocalEngine(LocalPolicy(failure_threshold=2, success_threshold=2, open_duration=10), clock=clock, rand=lambda: 0.5)
    for _ in range(2):
        adm = eng.admit("m")
        assert adm.allowed and adm.local and adm.permit.startswith("local:")
        res = eng.record(_report("m", adm.permit, status=529))
        assert res.classified_as == OutcomeClass.TRANSIENT and res.retry.retry
    assert res.state == BreakerState.OPEN
    refused = eng.admit("m")
    assert not refused.allowed and refused.reason == Reason.CIRCUIT_OPEN and refused.retry_after == 10

    clock.now += 10
    probe = eng.admit("m")
    assert probe.allowed and probe.state == BreakerState.HALF_OPEN
    assert eng.admit("m").reason == Reason.PROBE_LIMIT  # one probe at a time
    eng.record(_report("m", probe.permit, status=200))
    probe2 = eng.admit("m")
    assert eng.record(_report("m", probe2.permit, status=200)).state == BreakerState.CLOSED


def test_local_rules_follow_the_server_taxonomy() -> None:
    clock = Clock()
    eng = LocalEngine(LocalPolicy(failure_threshold=5, base_delay=1, max_delay=8, max_retries=3), clock=clock, rand=lambda: 0.5)
    # 429 with a hint pauses the target instead of counting a failure; advice waits at least the hint.
    adm = eng.admit("r")
    res = eng.record(_report("r", adm.permit, status=429, headers={"retry-after": "4"}))
    assert res.classified_as == OutcomeClass.RATE_LIMITED and res.retry.delay == 4
    paused = eng.admit("r")
    assert not paused.allowed and paused.reason == Reason.RATE_LIMITED and paused.retry_after == 4
    # 401 opens at once for the persistent duration; never retried.
    adm = eng.admit("p")
    res = eng.record(_report("p", adm.permit, status=401))
    assert res.state == BreakerState.OPEN and res.retry.reason == RetryReason.PERSISTENT
    assert eng.admit("p").retry_after == 600
    # Bad input never touches the breaker.
    for _ in range(10):
        adm = eng.admit("b")
        assert eng.record(_report("b", adm.permit, status=400)).state == BreakerState.CLOSED
    # Full-jitter backoff: uniform(0, min(max, base * 2^attempt)), then MAX_RETRIES.
    assert eng.record(_report("x", "", status=500, attempt=1)).retry.delay == pytest.approx(1.0)
    assert eng.record(_report("x", "", status=500, attempt=3)).retry.reason == RetryReason.MAX_RETRIES
    assert eng.record(_report("x", "", outcome=OutcomeClass.PARTIAL)).retry.reason == RetryReason.CORRECT_AND_RETRY


@pytest.mark.parametrize(
    "status,etype,expected",
    [
        (429, "insufficient_quota", OutcomeClass.PERSISTENT),
        (429, "rate_limit_exceeded", OutcomeClass.RATE_LIMITED),
        (400, "Your credit balance is too low", OutcomeClass.PERSISTENT),
        (529, "overloaded_error", OutcomeClass.TRANSIENT),
        (408, "", OutcomeClass.TIMEOUT),
        (403, "", OutcomeClass.PERSISTENT),
        (413, "request_too_large", OutcomeClass.BAD_INPUT),
        (409, "", OutcomeClass.TRANSIENT),
        (0, "ECONNRESET", OutcomeClass.TRANSIENT),
        (0, "invalid_api_key", OutcomeClass.PERSISTENT),
        (0, "DEADLINE_EXCEEDED", OutcomeClass.TIMEOUT),
        (200, "insufficient_quota", OutcomeClass.SUCCESS),
    ],
)
def test_local_classification_table(status: int, etype: str, expected: OutcomeClass) -> None:
    assert classify(OutcomeClass.UNSPECIFIED, status, etype) == expected


def test_retry_hint_parsing() -> None:
    assert retry_hint({"Retry-After": "3"}) == 3
    assert retry_hint({"retry-after-ms": "250"}) == 0.25
    assert retry_hint({"retry-after": "junk"}) is None
    assert retry_hint({"retry-after": "1"}, explicit=2.5) == 2.5


def test_route_memory_merges_observations_in_order() -> None:
    mem = RouteMemory()
    mem.learn("chat", RouteDecision(target="a"))
    assert mem.candidates("chat") == ["a"]
    mem.learn("chat", RouteDecision(target="c", skipped=(Skip("a", Reason.CIRCUIT_OPEN), Skip("b", Reason.RATE_LIMITED))))
    assert mem.candidates("chat") == ["a", "b", "c"]
    mem.learn("chat", RouteDecision(target=None, skipped=(Skip("a", Reason.EXCLUDED), Skip("a2", Reason.EXCLUDED), Skip("b", Reason.EXCLUDED))))
    assert mem.candidates("chat") == ["a", "a2", "b", "c"]
    assert RouteMemory({"x": ["p", "q"]}).candidates("x") == ["p", "q"]


def test_all_targets_failed_message() -> None:
    errs: List[AttemptError] = [
        AttemptError("a", OutcomeClass.TRANSIENT, "Overloaded", http_status=529),
        AttemptError("b", None, "skipped", reason=Reason.CIRCUIT_OPEN, retry_after=41.0),
    ]
    text = str(AllTargetsFailed("route 'chat'", errs, retry_after=41.0))
    assert text.splitlines() == [
        "all targets failed for route 'chat' (2 tried or skipped):",
        "  - a: TRANSIENT (http 529): Overloaded",
        "  - b: CIRCUIT_OPEN, retry in 41s",
        "  soonest retry in 41s",
    ]


def test_payload_encoding() -> None:
    assert encode_payload(b"\x00raw") == b"\x00raw"
    assert encode_payload("héllo") == "héllo".encode()
    assert json.loads(encode_payload({"b": 1, "a": [1, 2]})) == {"a": [1, 2], "b": 1}
