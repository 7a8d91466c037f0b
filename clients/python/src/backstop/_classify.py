"""What a provider call produced, in RecordOutcome terms.

Duck-typed on purpose: the ``anthropic`` and ``openai`` SDKs (and httpx,
requests and urllib) all raise errors carrying an HTTP status, the response
(with its headers) and a JSON error body, under slightly different attribute
names. Reading those shapes here means this package depends on no provider SDK.

When the provider answered with an HTTP status, the client does **not**
classify: it sends the status, the error type/code/message and the raw
headers, and the server's taxonomy decides (one taxonomy for the whole fleet;
e.g. a 429 ``insufficient_quota`` is PERSISTENT, a 429 with ``retry-after``
pauses the fleet). The client classifies only what the server cannot see:
timeouts, connection failures and unparseable replies.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import MalformedOutput, StructuredOutputError
from .types import OutcomeClass, OutcomeReport

#: Bounds the server enforces on RecordOutcome.headers (``[server] max_headers`` /
#: ``max_header_bytes`` defaults); over them the whole report would be rejected.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 16384
#: Longest error_type the server accepts.
MAX_ERROR_TYPE = 256

#: Headers the server reads, kept first when a response has too many to send.
_SIGNAL_PREFIXES = ("retry-after", "x-ratelimit", "anthropic-ratelimit", "ratelimit", "x-should-retry")

_TIMEOUT_WORDS = ("timeout", "timedout", "deadline")
_CONNECTION_WORDS = (
    "connection",
    "connect",
    "network",
    "protocol",
    "remotedisconnected",
    "incompleteread",
    "brokenpipe",
    "unreachable",
)


@dataclass
class Observed:
    """The fields of an outcome report derived from what the call produced."""

    outcome: OutcomeClass = OutcomeClass.UNSPECIFIED
    http_status: int = 0
    error_type: str = ""
    headers: Dict[str, str] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    #: A short human description (for AllTargetsFailed and logs).
    message: str = ""

    def report(
        self, *, target: str, permit: str, key_slot: str, attempt: int, latency: Optional[float], caller: str
    ) -> OutcomeReport:
        """The report of this observation for one admitted call: what happened
        (this object) plus which call it was. ``guard()``, ``call()`` and the
        deferred workers all build their reports here."""
        return OutcomeReport(
            target=target,
            permit=permit,
            outcome=self.outcome,
            http_status=self.http_status,
            error_type=self.error_type,
            latency=latency,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            attempt=attempt,
            headers=self.headers,
            key_slot=key_slot,
            caller=caller,
        )


def _int_status(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        return 0
    return v if 100 <= v <= 599 else 0


def http_status_of(exc: BaseException) -> int:
    """The HTTP status an exception carries, or 0."""
    for attr in ("status_code", "http_status", "status"):
        s = _int_status(getattr(exc, attr, None))
        if s:
            return s
    resp = getattr(exc, "response", None)
    if resp is not None:
        for attr in ("status_code", "status"):
            s = _int_status(getattr(resp, attr, None))
            if s:
                return s
    # urllib.error.HTTPError keeps the status in `.code` (an int), next to `.headers`.
    if getattr(exc, "headers", None) is not None:
        s = _int_status(getattr(exc, "code", None))
        if s:
            return s
    return 0


def _items(headers: Any) -> Iterable[Tuple[Any, Any]]:
    if headers is None:
        return ()
    items = getattr(headers, "items", None)
    if callable(items):
        try:
            return list(items())
        except TypeError:
            return ()
    if isinstance(headers, (list, tuple)):
        pairs: List[Tuple[Any, Any]] = []
        for kv in headers:
            if isinstance(kv, (list, tuple)) and len(kv) == 2:
                pairs.append((kv[0], kv[1]))
        return pairs
    return ()


def normalize_headers(headers: Any) -> Dict[str, str]:
    """Provider response headers as a plain dict, trimmed to what the server accepts.

    Rate-limit and retry headers are kept first; the rest fill up to the
    server's limits. Repeated headers are joined with ", " (as HTTP allows).
    """
    merged: Dict[str, str] = {}
    for k, v in _items(headers):
        key = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        val = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        key = key.strip().lower()
        if not key:
            continue
        merged[key] = f"{merged[key]}, {val}" if key in merged else val
    signals = [k for k in merged if k.startswith(_SIGNAL_PREFIXES)]
    others = [k for k in merged if not k.startswith(_SIGNAL_PREFIXES)]
    out: Dict[str, str] = {}
    size = 0
    for k in signals + others:
        cost = len(k.encode()) + len(merged[k].encode())
        if len(out) >= MAX_HEADERS or size + cost > MAX_HEADER_BYTES:
            continue
        out[k] = merged[k]
        size += cost
    return out


def headers_of(exc: BaseException) -> Dict[str, str]:
    resp = getattr(exc, "response", None)
    h = getattr(resp, "headers", None) if resp is not None else None
    if h is None:
        h = getattr(exc, "headers", None)
    return normalize_headers(h)


def _as_dict(body: Any) -> Optional[Mapping[str, Any]]:
    if isinstance(body, Mapping):
        return body
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        return parsed if isinstance(parsed, Mapping) else None
    return None


def _error_fields(exc: BaseException) -> Tuple[str, str, str]:
    """(type, code, message) from an SDK-shaped error.

    Anthropic's body is ``{"type": "error", "error": {"type": ..., "message": ...}}``;
    OpenAI's SDK keeps the inner ``error`` object as ``body`` and also exposes
    ``.type`` / ``.code``; Gemini's has ``error.status``.
    """
    etype = ecode = msg = ""
    body = _as_dict(getattr(exc, "body", None))
    if body is None:
        resp = getattr(exc, "response", None)
        content = getattr(resp, "text", None) if resp is not None else None
        if isinstance(content, str):
            body = _as_dict(content)
    if body is not None:
        inner = body.get("error")
        err = inner if isinstance(inner, Mapping) else body
        t = err.get("type")
        if isinstance(t, str) and t != "error":
            etype = t
        c = err.get("code") if err.get("code") is not None else err.get("status")
        if isinstance(c, (str, int)) and not isinstance(c, bool):
            ecode = str(c)
        m = err.get("message")
        if isinstance(m, str):
            msg = m
    for attr, current in (("type", etype), ("code", ecode)):
        v = getattr(exc, attr, None)
        if not current and isinstance(v, str):
            if attr == "type":
                etype = v
            else:
                ecode = v
    if not msg:
        m = getattr(exc, "message", None)
        msg = m if isinstance(m, str) else ""
    return etype, ecode, msg


def _clip(s: str, limit: int) -> str:
    b = s.encode("utf-8")
    if len(b) <= limit:
        return s
    return b[:limit].decode("utf-8", errors="ignore")


def compose_error_type(etype: str, ecode: str, message: str) -> str:
    """The error_type sent to the server: type, code and message.

    The server matches markers as substrings ("insufficient_quota",
    "credit balance", "per day"...), and some of them only ever appear in the
    message (Anthropic's "Your credit balance is too low" is a 400
    ``invalid_request_error``), so the message is included, clipped to the
    server's 256-byte limit.
    """
    parts = []
    for p in (etype, ecode):
        if p and p not in parts:
            parts.append(p)
    head = " ".join(parts)
    if message:
        head = f"{head}: {message}" if head else message
    return _clip(" ".join(head.split()), MAX_ERROR_TYPE)


def _name_chain(exc: BaseException) -> str:
    names = [c.__name__.lower() for c in type(exc).__mro__]
    return " ".join(names)


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return True
    reason = getattr(exc, "reason", None)  # urllib.error.URLError(reason=timeout)
    if isinstance(reason, BaseException) and reason is not exc and _is_timeout(reason):
        return True
    names = _name_chain(exc)
    return any(w in names for w in _TIMEOUT_WORDS)


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, socket.gaierror)):
        return True
    names = _name_chain(exc)
    if any(w in names for w in _CONNECTION_WORDS):
        return True
    # urllib.error.URLError without an HTTP status is a network failure.
    return type(exc).__name__ == "URLError"


def _is_parse_error(exc: BaseException) -> bool:
    if isinstance(exc, (MalformedOutput, StructuredOutputError, json.JSONDecodeError)):
        return True
    mod = type(exc).__module__ or ""
    return type(exc).__name__ == "ValidationError" and mod.startswith(("pydantic", "jsonschema"))


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def observe_exception(exc: BaseException) -> Observed:
    """Turns what a provider call raised into outcome-report fields.

    | raised | reported |
    |---|---|
    | anything carrying an HTTP status | status + "type code: message" + headers; the server classifies |
    | TimeoutError, asyncio.TimeoutError, *Timeout* types | TIMEOUT |
    | ConnectionError, *Connection*/network types, URLError | TRANSIENT |
    | JSON decode / pydantic ValidationError / MalformedOutput | PARTIAL |
    | cancellation (asyncio.CancelledError, KeyboardInterrupt) | BAD_INPUT "cancelled" |
    | anything else | BAD_INPUT "client_error: Type" |

    The last two rows keep the agent's own bugs and cancellations from being
    blamed on the provider: BAD_INPUT never moves the breaker, but the report
    still releases the permit's reserved budget and any half-open probe slot.
    """
    status = http_status_of(exc)
    if status:
        etype, ecode, msg = _error_fields(exc)
        return Observed(
            outcome=OutcomeClass.UNSPECIFIED,
            http_status=status,
            error_type=compose_error_type(etype, ecode, msg),
            headers=headers_of(exc),
            message=msg or describe(exc),
        )
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return Observed(outcome=OutcomeClass.BAD_INPUT, error_type="cancelled", message="cancelled")
    if _is_parse_error(exc):
        return Observed(
            outcome=OutcomeClass.PARTIAL,
            error_type=_clip(f"malformed_output: {type(exc).__name__}", MAX_ERROR_TYPE),
            message=describe(exc),
        )
    if _is_timeout(exc):
        return Observed(
            outcome=OutcomeClass.TIMEOUT,
            error_type=_clip(f"timeout: {type(exc).__name__}", MAX_ERROR_TYPE),
            message=describe(exc),
        )
    if _is_connection_error(exc):
        etype, ecode, msg = _error_fields(exc)
        et = compose_error_type(etype, ecode, msg) or type(exc).__name__
        return Observed(
            outcome=OutcomeClass.TRANSIENT,
            error_type=_clip(f"{type(exc).__name__}: {et}" if et != type(exc).__name__ else et, MAX_ERROR_TYPE),
            headers=headers_of(exc),
            message=describe(exc),
        )
    return Observed(
        outcome=OutcomeClass.BAD_INPUT,
        error_type=_clip(f"client_error: {type(exc).__name__}", MAX_ERROR_TYPE),
        message=describe(exc),
    )


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _nonneg_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return 0
    return max(0, int(v))


def usage_of(value: Any) -> Tuple[int, int]:
    """(input, output) tokens from a provider response, duck-typed.

    Anthropic: ``usage.input_tokens`` / ``usage.output_tokens``; OpenAI:
    ``usage.prompt_tokens`` / ``usage.completion_tokens`` (also as dicts).
    """
    if value is None:
        return 0, 0
    usage = _get(value, "usage")
    if usage is None:
        return 0, 0
    inp = _get(usage, "input_tokens")
    if inp is None:
        inp = _get(usage, "prompt_tokens")
    out = _get(usage, "output_tokens")
    if out is None:
        out = _get(usage, "completion_tokens")
    return _nonneg_int(inp), _nonneg_int(out)


def observe_success(value: Any) -> Observed:
    """A successful call: usage and (if the value carries them) response headers,
    whose rate-limit fields let the server pause the fleet *before* a 429."""
    inp, out = usage_of(value)
    headers = None if isinstance(value, Mapping) else getattr(value, "headers", None)
    return Observed(
        outcome=OutcomeClass.SUCCESS,
        headers=normalize_headers(headers) if headers is not None else {},
        input_tokens=inp,
        output_tokens=out,
    )
