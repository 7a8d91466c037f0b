"""The shared client conformance scenarios (clients/conformance), run against this client.

Each scenario file is one test: a real server with the scenario's config, an
in-process scripted provider that raises exceptions shaped like the
``anthropic`` / ``openai`` SDKs' (without depending on them), the steps played
through the public API, and the expectations checked. The format is specified
in clients/conformance/README.md; this file is one implementation of it.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional

import grpc
import pytest

from backstop import (
    AllTargetsFailed,
    Backstop,
    BackstopUnreachable,
    BreakerMode,
    CircuitOpen,
    ControlPlaneError,
    Deferred,
    DeferredItem,
    DeferredWorker,
    LocalPolicy,
    RateLimited,
    Refused,
    RequestTooLarge,
    StructuredOutputError,
    structured,
)
from backstop.testing import BackstopServer

CONFORMANCE = Path(__file__).resolve().parents[2] / "conformance"
SCENARIOS = sorted((CONFORMANCE / "scenarios").glob("*.json"))

#: Capabilities of this client (see the README's "Capabilities").
CAPABILITIES = {"worker", "reconcile"}


# --- SDK-shaped errors ----------------------------------------------------------------
#
# The Python SDKs (Stainless-generated) raise APIStatusError subclasses named
# after the status, with status_code, response (httpx.Response), body and
# message; the OpenAI one keeps the inner "error" object as body and copies
# its type / code / param onto the exception. Timeouts and connection
# failures are APITimeoutError(APIConnectionError), not builtin exceptions.


class _HttpxResponse:
    def __init__(self, status_code: int, headers: Dict[str, str], text: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.text = text


class APIError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIStatusError(APIError):
    def __init__(self, message: str, response: _HttpxResponse, body: Any) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.body = body


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIConnectionError):
    pass


_STATUS_CLASS_NAMES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}
_CLASSES: Dict[str, type] = {}


def _status_class(status: int) -> type:
    name = _STATUS_CLASS_NAMES.get(status) or ("InternalServerError" if status >= 500 else "APIStatusError")
    if name == "APIStatusError":
        return APIStatusError
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (APIStatusError,), {})
    return _CLASSES[name]


def sdk_error(resp: Dict[str, Any]) -> Exception:
    """The exception the scenario's SDK raises for an HTTP error response."""
    status = int(resp["status"])
    err = resp.get("error", {})
    headers = {k.lower(): v for k, v in resp.get("headers", {}).items()}
    if resp.get("sdk", "anthropic") == "openai":
        inner = {"message": err.get("message", ""), "type": err.get("type"), "param": None, "code": err.get("code")}
        wire = {"error": inner}
        exc = _status_class(status)(
            f"Error code: {status} - {json.dumps(wire)}", _HttpxResponse(status, headers, json.dumps(wire)), inner
        )
        exc.type = inner["type"]  # type: ignore[attr-defined]
        exc.code = inner["code"]  # type: ignore[attr-defined]
        exc.param = None  # type: ignore[attr-defined]
        return exc
    body: Dict[str, Any] = {"type": "error", "error": {}}
    if "type" in err:
        body["error"]["type"] = err["type"]
    if "message" in err:
        body["error"]["message"] = err["message"]
    return _status_class(status)(
        f"Error code: {status} - {json.dumps(body)}", _HttpxResponse(status, headers, json.dumps(body)), body
    )


# --- the scripted provider ---------------------------------------------------------------


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class OpenAIUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Reply:
    text: str
    usage: Any
    headers: Dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    target: str
    key_slot: str
    correction: int
    started: float
    ended: float = 0.0


class ScriptedProvider:
    def __init__(self, spec: Dict[str, Any]) -> None:
        self.scripts: Dict[str, Deque[Dict[str, Any]]] = {}
        self.defaults: Dict[str, Optional[Dict[str, Any]]] = {}
        self.calls: List[Call] = []
        for target, s in spec.items():
            self.update(target, s)

    def update(self, target: str, s: Dict[str, Any]) -> None:
        self.scripts.setdefault(target, deque()).extend(s.get("script", []))
        if "default" in s:
            self.defaults[target] = s["default"]

    def invoke(self, target: str, key_slot: str = "", correction: int = 0) -> Reply:
        call = Call(target, key_slot, correction, time.monotonic())
        self.calls.append(call)
        q = self.scripts.get(target)
        resp = q.popleft() if q else (self.defaults.get(target) or {})
        try:
            if resp.get("latency_ms"):
                time.sleep(resp["latency_ms"] / 1000)
            failure = resp.get("failure")
            if failure == "timeout":
                raise APITimeoutError("Request timed out.")
            if failure == "connection":
                raise APIConnectionError("Connection error.")
            if failure == "client_bug":
                raise TypeError("the agent's own bug: 'NoneType' object is not subscriptable")
            status = int(resp.get("status", 200))
            if status >= 300:
                raise sdk_error(resp)
            u = resp.get("usage", {})
            inp, out = int(u.get("input_tokens", 10)), int(u.get("output_tokens", 20))
            usage: Any = OpenAIUsage(inp, out) if resp.get("sdk") == "openai" else Usage(inp, out)
            text = resp.get("text")
            return Reply(text if text is not None else f"reply from {target}", usage, dict(resp.get("headers", {})))
        finally:
            call.ended = time.monotonic()


# --- expectations -----------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


class Bindings:
    """``"=NAME"`` expectations: first use binds, later uses must agree, names are distinct."""

    def __init__(self) -> None:
        self.values: Dict[str, str] = {}

    def match(self, expected: str, actual: str, what: str) -> None:
        if not expected.startswith("="):
            if expected != actual:
                raise Mismatch(f"{what}: expected {expected!r}, got {actual!r}")
            return
        name = expected[1:]
        if name in self.values:
            if self.values[name] != actual:
                raise Mismatch(f"{what}: {expected} is bound to {self.values[name]!r}, got {actual!r}")
            return
        for other, v in self.values.items():
            if v == actual:
                raise Mismatch(f"{what}: {expected} would bind {actual!r}, already bound to ={other}")
        self.values[name] = actual

    def resolve(self, key: str, what: str) -> str:
        if not key.startswith("="):
            return key
        if key[1:] not in self.values:
            raise Mismatch(f"{what}: {key} is not bound yet")
        return self.values[key[1:]]


def in_range(value: float, rng: Dict[str, float], what: str) -> None:
    lo, hi = rng.get("min", -math.inf), rng.get("max", math.inf)
    if not lo <= value <= hi:
        raise Mismatch(f"{what}: {value:g} not in [{lo:g}, {hi:g}]")


def enum_name(v: Any) -> str:
    return str(getattr(v, "value", v))


_ERROR_TYPES: Dict[str, Callable[[BaseException], bool]] = {
    "AllTargetsFailed": lambda e: isinstance(e, AllTargetsFailed),
    "CircuitOpen": lambda e: isinstance(e, CircuitOpen),
    "RateLimited": lambda e: isinstance(e, RateLimited),
    "RequestTooLarge": lambda e: isinstance(e, RequestTooLarge),
    "BackstopUnreachable": lambda e: isinstance(e, BackstopUnreachable),
    "StructuredOutputError": lambda e: isinstance(e, StructuredOutputError),
    "ProviderError": lambda e: isinstance(e, APIError),
    "ClientBug": lambda e: isinstance(e, TypeError),
}


def check_error(exp: Dict[str, Any], err: BaseException) -> None:
    if not _ERROR_TYPES[exp["type"]](err):
        raise Mismatch(f"expected {exp['type']}, got {type(err).__name__}: {err}")
    if "reason" in exp:
        assert isinstance(err, Refused), err
        if enum_name(err.reason) != exp["reason"]:
            raise Mismatch(f"reason: expected {exp['reason']}, got {enum_name(err.reason)}")
    if "retry_after_ms" in exp:
        ra = getattr(err, "retry_after", None)
        if ra is None:
            raise Mismatch(f"retry_after: expected a value, got none ({err})")
        in_range(ra * 1000, exp["retry_after_ms"], "retry_after_ms")
    if "status" in exp and getattr(err, "status_code", None) != exp["status"]:
        raise Mismatch(f"status: expected {exp['status']}, got {getattr(err, 'status_code', None)}")
    if "local" in exp and getattr(err, "local", None) != exp["local"]:
        raise Mismatch(f"local: expected {exp['local']}, got {getattr(err, 'local', None)}")
    for needle in exp.get("message_contains", []):
        if needle not in str(err):
            raise Mismatch(f"message does not contain {needle!r}: {err}")


def check_result(exp: Dict[str, Any], value: Any) -> None:
    if "text" in exp:
        text = getattr(value, "text", value)
        if text != exp["text"]:
            raise Mismatch(f"result text: expected {exp['text']!r}, got {text!r}")
    if "value" in exp:
        if value != exp["value"]:
            raise Mismatch(f"result value: expected {exp['value']!r}, got {value!r}")
    if "deferred" in exp:
        if not isinstance(value, Deferred):
            raise Mismatch(f"expected a Deferred, got {value!r}")
        if not value.id:
            raise Mismatch("the Deferred has no id")
        needle = exp["deferred"].get("message_contains")
        if needle is not None and needle not in value.message:
            raise Mismatch(f"deferred message {value.message!r} does not contain {needle!r}")


def check_calls(exp: List[Dict[str, Any]], calls: List[Call], b: Bindings) -> None:
    got = [(c.target, c.key_slot, c.correction) for c in calls]
    if [e["target"] for e in exp] != [c.target for c in calls]:
        raise Mismatch(f"provider calls: expected {[e['target'] for e in exp]}, got {got}")
    for i, (e, c) in enumerate(zip(exp, calls)):
        if "key_slot" in e:
            b.match(e["key_slot"], c.key_slot, f"call {i} key_slot")
        if "correction" in e and e["correction"] != c.correction:
            raise Mismatch(f"call {i} correction: expected {e['correction']}, got {c.correction}")


def check_gaps(exp: List[Dict[str, Any]], calls: List[Call]) -> None:
    for g in exp:
        i = g["after"]
        if i + 1 >= len(calls):
            raise Mismatch(f"gap after call {i}: only {len(calls)} calls")
        gap = (calls[i + 1].started - calls[i].ended) * 1000
        in_range(gap, {k[:3]: v for k, v in g.items() if k in ("min_ms", "max_ms")}, f"gap after call {i} (ms)")


# --- the runner ------------------------------------------------------------------------------


def _policy(p: Dict[str, Any]) -> LocalPolicy:
    kw: Dict[str, Any] = {}
    for k, v in p.items():
        if k.endswith("_ms"):
            kw[k[:-3]] = v / 1000
        else:
            kw[k] = v
    return LocalPolicy(**kw)


class Runner:
    def __init__(self, scenario: Dict[str, Any], binary: str) -> None:
        self.s = scenario
        self.server = BackstopServer(scenario["config"], binary=binary)
        self.provider = ScriptedProvider(scenario.get("provider", {}))
        self.bindings = Bindings()
        self.bs: Optional[Backstop] = None

    def client(self) -> Backstop:
        c = self.s.get("client", {})
        kw: Dict[str, Any] = {
            "timeout": c.get("timeout_ms", 1000) / 1000,
            "policy": c.get("policy", "fail_open"),
            "reconnect_interval": c.get("reconnect_interval_ms", 100) / 1000,
            "connect_timeout": c.get("connect_timeout_ms", 1000) / 1000,
            "caller": c.get("caller", "conformance"),
            "local_routes": c.get("local_routes", {}),
        }
        if "local_policy" in c:
            kw["local_policy"] = _policy(c["local_policy"])
        return Backstop(self.server.address, **kw)

    def run(self) -> None:
        try:
            self.server.start()
            self.bs = self.client()
            for i, step in enumerate(self.s["steps"]):
                try:
                    self.step(step)
                except Mismatch as e:
                    raise Mismatch(f"step {i} ({step['op']}): {e}") from None
        finally:
            if self.bs is not None:
                self.bs.close()
            self.server.close()

    # One step ------------------------------------------------------------------------------

    def step(self, st: Dict[str, Any]) -> None:
        op = st["op"]
        assert self.bs is not None
        if op in ("call", "guard"):
            self.act(st)
        elif op == "provider":
            self.provider.update(st["target"], st)
        elif op == "kill_server":
            self.server.kill()
        elif op == "restart_server":
            self.server.restart()
        elif op == "wait_mode":
            deadline = time.monotonic() + st.get("within_ms", 10000) / 1000
            while self.bs.mode != st["mode"]:
                if time.monotonic() > deadline:
                    raise Mismatch(f"mode is still {self.bs.mode!r}, expected {st['mode']!r}")
                time.sleep(0.02)
        elif op == "admin":
            action = st["action"]
            if action == "reset":
                self.bs.reset_target(st["target"])
            else:
                self.bs.set_breaker_state(st["target"], BreakerMode(action))
        elif op == "drain":
            self.drain(st)
        elif op == "expect_server":
            self.expect_server(st)
        else:
            raise Mismatch(f"unknown op {op!r}")

    def act(self, st: Dict[str, Any]) -> None:
        assert self.bs is not None
        exp = st.get("expect", {})
        first = len(self.provider.calls)
        started = time.monotonic()
        value: Any = None
        error: Optional[BaseException] = None
        guard: Any = None
        try:
            if st["op"] == "call":
                value = self.call(st)
            else:
                with self.bs.guard(
                    st["target"], estimated_tokens=st.get("estimated_tokens", 0), attempt=st.get("attempt", 0)
                ) as guard:
                    value = self.provider.invoke(st["target"], guard.key_slot)
                    guard.usage(getattr(value.usage, "input_tokens", 0) or getattr(value.usage, "prompt_tokens", 0),
                                getattr(value.usage, "output_tokens", 0) or getattr(value.usage, "completion_tokens", 0))
                    guard.response_headers(value.headers)
        except Exception as e:  # checked against the expectations below
            error = e
        elapsed = (time.monotonic() - started) * 1000
        calls = self.provider.calls[first:]
        if error is not None and "error" not in exp:
            raise Mismatch(f"unexpected {type(error).__name__}: {error}") from error
        if "error" in exp:
            if error is None:
                raise Mismatch(f"expected {exp['error']['type']}, but the step returned {value!r}")
            check_error(exp["error"], error)
        if "result" in exp:
            check_result(exp["result"], value)
        if "calls" in exp:
            check_calls(exp["calls"], calls, self.bindings)
        if "gaps" in exp:
            check_gaps(exp["gaps"], calls)
        if "max_duration_ms" in exp and elapsed > exp["max_duration_ms"]:
            raise Mismatch(f"took {elapsed:.0f} ms, expected at most {exp['max_duration_ms']}")
        if "mode" in exp and self.bs.mode != exp["mode"]:
            raise Mismatch(f"mode: expected {exp['mode']}, got {self.bs.mode}")
        if "admission" in exp:
            if guard is None or guard.admission is None:
                raise Mismatch("no admission (the guard was refused)")
            a = exp["admission"]
            if "local" in a and guard.admission.local != a["local"]:
                raise Mismatch(f"admission.local: expected {a['local']}, got {guard.admission.local}")
            if "key_slot" in a:
                self.bindings.match(a["key_slot"], guard.admission.key_slot, "admission key_slot")
        if "outcome" in exp:
            out = guard.outcome if guard is not None else None
            if out is None:
                raise Mismatch("no outcome was reported")
            o = exp["outcome"]
            if "classified_as" in o and enum_name(out.classified_as) != o["classified_as"]:
                raise Mismatch(f"classified_as: expected {o['classified_as']}, got {enum_name(out.classified_as)}")
            if "state" in o and enum_name(out.state) != o["state"]:
                raise Mismatch(f"state: expected {o['state']}, got {enum_name(out.state)}")
            if "retry" in o and out.retry.retry != o["retry"]:
                raise Mismatch(f"retry: expected {o['retry']}, got {out.retry.retry}")
            if "retry_reason" in o and enum_name(out.retry.reason) != o["retry_reason"]:
                raise Mismatch(f"retry_reason: expected {o['retry_reason']}, got {enum_name(out.retry.reason)}")
            if "delay_ms" in o:
                in_range(out.retry.delay * 1000, o["delay_ms"], "retry delay_ms")

    def call(self, st: Dict[str, Any]) -> Any:
        assert self.bs is not None
        kw: Dict[str, Any] = {
            "estimated_tokens": st.get("estimated_tokens", 0),
            "required_context_tokens": st.get("required_context_tokens", 0),
            "exclude": st.get("exclude", []),
        }
        if "defer" in st:
            d = st["defer"]
            kw.update(defer_to="queue", payload=d["payload"], metadata=d.get("metadata"),
                      idempotency_key=d.get("idempotency_key", ""))
        if "structured" in st:
            sd = st["structured"]

            def ask(target: str, max_tokens: int, key_slot: str, correction: Any) -> str:
                return self.provider.invoke(target, key_slot, correction.number if correction else 0).text

            fn: Any = structured(ask, sd["schema"], max_corrections=sd.get("max_corrections", 2))
        else:

            def fn(target: str, max_tokens: int, key_slot: str) -> Reply:
                return self.provider.invoke(target, key_slot)

        return self.bs.call(st["route"], fn, **kw)

    def drain(self, st: Dict[str, Any]) -> None:
        assert self.bs is not None
        handled: List[Dict[str, str]] = []
        first = len(self.provider.calls)

        def handler(item: DeferredItem) -> Reply:
            handled.append({"target": item.target, "payload": item.text()})
            return self.provider.invoke(item.target, item.key_slot)

        within = st.get("within_ms", 10000) / 1000
        worker = DeferredWorker(self.bs, st["queue"], handler, wait=0.2, lease=30, retry_delay=0.05)
        worker.run(until_empty=True, timeout=within)
        left = [q for q in self.bs.queue_stats(st["queue"]) if q.queue == st["queue"] and (q.depth or q.in_flight)]
        if left:
            raise Mismatch(f"queue {st['queue']} not drained within {within}s: {left}")
        exp = st.get("expect", {})
        if "handled" in exp:
            want = exp["handled"]
            got = [{k: v for k, v in h.items() if k in w} for h, w in zip(handled, want)]
            if len(handled) != len(want) or got != want:
                raise Mismatch(f"handled: expected {want}, got {handled}")
        if "calls" in exp:
            check_calls(exp["calls"], self.provider.calls[first:], self.bindings)

    def expect_server(self, st: Dict[str, Any]) -> None:
        deadline = time.monotonic() + st.get("within_ms", 0) / 1000
        while True:
            try:
                self.check_server(st)
                return
            except (Mismatch, ControlPlaneError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.025)

    def check_server(self, st: Dict[str, Any]) -> None:
        assert self.bs is not None
        for target, exp in st.get("targets", {}).items():
            try:
                status = self.bs.get_target(target)
            except ControlPlaneError as e:
                if e.code == grpc.StatusCode.NOT_FOUND and exp.get("exists") is False:
                    continue
                raise
            if exp.get("exists") is False:
                raise Mismatch(f"{target}: expected NOT_FOUND, but the server knows it")
            if "state" in exp and enum_name(status.state) != exp["state"]:
                raise Mismatch(f"{target}: state {enum_name(status.state)}, expected {exp['state']} ({status.last_cause})")
            if "consecutive_failures" in exp and status.consecutive_failures != exp["consecutive_failures"]:
                raise Mismatch(f"{target}: consecutive_failures {status.consecutive_failures}, expected {exp['consecutive_failures']}")
            for name, want in exp.get("counters", {}).items():
                got = getattr(status.counters, name)
                if got != want:
                    raise Mismatch(f"{target}: counters.{name} = {got}, expected {want} (all: {status.counters})")
            slots = {k.name: k for k in status.key_slots}
            for key, want in exp.get("key_slots", {}).items():
                name = self.bindings.resolve(key, f"{target} key_slots")
                if name not in slots:
                    raise Mismatch(f"{target}: no key slot {name!r} (has {sorted(slots)})")
                ks = slots[name]
                if "disabled" in want and ks.disabled != want["disabled"]:
                    raise Mismatch(f"{target}: key slot {name!r} disabled={ks.disabled}, expected {want['disabled']}")
                if "paused" in want:
                    import datetime as dt

                    paused = ks.paused_until is not None and ks.paused_until > dt.datetime.now(dt.timezone.utc)
                    if paused != want["paused"]:
                        raise Mismatch(f"{target}: key slot {name!r} paused={paused}, expected {want['paused']}")
            for kind, rng in exp.get("budgets", {}).items():
                budgets = {b.kind: b for b in status.raw.key_slots[0].budgets}
                if kind not in budgets:
                    raise Mismatch(f"{target}: no {kind} budget (has {sorted(budgets)})")
                in_range(budgets[kind].available, rng, f"{target}: {kind} budget available")
        for queue, want in st.get("queues", {}).items():
            stats = {q.queue: q for q in self.bs.queue_stats(queue)}
            q = stats.get(queue)
            for k, v in want.items():
                got = getattr(q, k) if q is not None else 0
                if got != v:
                    raise Mismatch(f"queue {queue}: {k} = {got}, expected {v}")


def _load(path: Path) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads(path.read_text())
    if data.get("format") != 1:
        raise ValueError(f"{path.name}: format {data.get('format')!r} is not 1")
    if data.get("name") != path.stem:
        raise ValueError(f"{path.name}: name {data.get('name')!r} must equal the file stem")
    return data


def test_the_suite_is_there() -> None:
    assert len(SCENARIOS) >= 10, f"no scenarios found under {CONFORMANCE}"


def test_scenarios_match_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CONFORMANCE / "scenario.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for path in SCENARIOS:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(json.loads(path.read_text()))]
        assert not errors, f"{path.name}: {errors[:3]}"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, backstop_bin: str) -> None:
    scenario = _load(path)
    missing = sorted(set(scenario.get("requires", [])) - CAPABILITIES)
    if missing:
        pytest.skip(f"the Python client lacks capability {', '.join(missing)}")
    Runner(scenario, backstop_bin).run()
