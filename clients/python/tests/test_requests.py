"""End-to-end user requests (issue #17), against the real server.

``call()`` and ``guard()`` name each user request with one ``request_id``,
sent on every Route / CanProceed / RecordOutcome of it (retries and fallbacks
included); the success report closes it as completed, giving up finishes it
as failed and deferring it as deferred (FinishRequest). The server then
counts it in ``backstop_requests_total{route,result}`` with its duration and
attempts. Finishing an id again answers ``duplicate`` with what was measured,
which is how these tests read a request's attempts.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable, List

import pytest

from backstop import (
    AllTargetsFailed,
    AsyncBackstop,
    Backstop,
    Deferred,
    FinishResult,
    RequestResult,
)
from backstop.testing import BackstopServer, ProviderError, free_port

CONFIG = """
[routes.chat]
targets = ["a", "b"]
[targets.a]
[targets.b]
"""


def total(server: BackstopServer, result: str, route: str = "chat") -> float:
    m = re.search(
        rf'^backstop_requests_total\{{route="{route}",result="{result}"\}} (\S+)$', server.metrics(), re.M
    )
    return float(m.group(1)) if m else 0.0


def attempts_sum(server: BackstopServer, route: str = "chat") -> float:
    m = re.search(rf'^backstop_request_attempts_sum\{{route="{route}"\}} (\S+)$', server.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def unauthorized() -> ProviderError:
    """A 401: PERSISTENT, not retried, so call() falls back to the next target."""
    return ProviderError(401, {}, '{"type":"error","error":{"type":"authentication_error","message":"bad key"}}')


class Fn:
    """Fails with a 401 on the targets in ``failing``, answers "ok from <target>" elsewhere."""

    def __init__(self, failing: List[str]) -> None:
        self.failing = failing
        self.calls: List[str] = []

    def __call__(self, target: str, max_tokens: int, key_slot: str) -> str:
        self.calls.append(target)
        if target in self.failing:
            raise unauthorized()
        return f"ok from {target}"


@pytest.fixture
def server(start_server: Callable[..., BackstopServer]) -> BackstopServer:
    return start_server(CONFIG)


@pytest.fixture
def bs(server: BackstopServer, make_client: Callable[..., Backstop]) -> Backstop:
    return make_client(server.address)


def test_a_fallback_is_one_completed_request_with_two_attempts(server: BackstopServer, bs: Backstop) -> None:
    fn = Fn(failing=["a"])
    assert bs.call("chat", fn, request_id="user-req-1") == "ok from b"
    assert fn.calls == ["a", "b"]
    assert total(server, "completed") == 1
    assert total(server, "failed") == 0
    assert attempts_sum(server) == 2

    # The id was used verbatim, and the request is closed already.
    again = bs.finish_request("user-req-1", RequestResult.FAILED)
    assert isinstance(again, FinishResult)
    assert (again.tracked, again.duplicate, again.attempts, again.route) == (True, True, 2, "chat")
    assert 0 <= again.duration < 10
    assert total(server, "failed") == 0


def test_call_names_its_request_without_being_asked(server: BackstopServer, bs: Backstop) -> None:
    assert bs.call("chat", Fn(failing=["a"])) == "ok from b"
    assert bs.call("chat", Fn(failing=[])) == "ok from b"  # a is open now: one attempt
    assert total(server, "completed") == 2
    assert attempts_sum(server) == 3


def test_exhausting_every_target_is_one_failed_request(server: BackstopServer, bs: Backstop) -> None:
    fn = Fn(failing=["a", "b"])
    with pytest.raises(AllTargetsFailed):
        bs.call("chat", fn, request_id="doomed")
    assert fn.calls == ["a", "b"]
    assert total(server, "failed") == 1
    assert total(server, "completed") == 0
    again = bs.finish_request("doomed", "completed")
    assert (again.duplicate, again.attempts) == (True, 2)


def test_deferring_is_a_deferred_request(server: BackstopServer, bs: Backstop) -> None:
    d = bs.call("chat", Fn(failing=["a", "b"]), defer_to="queue", payload={"prompt": "later"}, request_id="later-1")
    assert isinstance(d, Deferred)
    assert total(server, "deferred") == 1
    assert total(server, "failed") == 0
    assert bs.finish_request("later-1", "failed").duplicate


def test_async_call_measures_the_request_too(server: BackstopServer) -> None:
    async def main() -> None:
        async with AsyncBackstop(server.address, timeout=1.0, caller="pytest") as abs_:
            async def fn(target: str, max_tokens: int, key_slot: str) -> str:
                if target == "a":
                    raise unauthorized()
                return "ok"

            assert await abs_.call("chat", fn, request_id="async-1") == "ok"
            again = await abs_.finish_request("async-1", "failed")
            assert (again.duplicate, again.attempts, again.route) == (True, 2, "chat")
            with pytest.raises(AllTargetsFailed):
                await abs_.call("chat", lambda t, m, k: (_ for _ in ()).throw(unauthorized()))

    asyncio.run(main())
    assert total(server, "completed") == 1
    assert total(server, "failed") == 1


def test_guard_is_a_request_of_its_own(server: BackstopServer, bs: Backstop) -> None:
    with bs.guard("a") as g:
        pass
    assert len(g.request_id) == 32
    assert g.report is not None and g.report.finish == RequestResult.COMPLETED
    with pytest.raises(ProviderError):
        with bs.guard("b"):
            raise unauthorized()
    assert total(server, "completed", "direct") == 1
    assert total(server, "failed", "direct") == 1
    assert bs.finish_request(g.request_id, "failed").duplicate


def test_a_guard_given_an_id_leaves_failures_open_for_the_next_attempt(server: BackstopServer, bs: Backstop) -> None:
    with pytest.raises(ProviderError):
        with bs.guard("a", request_id="mine"):
            raise unauthorized()
    assert total(server, "failed", "direct") == 0
    with bs.guard("b", request_id="mine", attempt=1):
        pass
    assert total(server, "completed", "direct") == 1
    again = bs.finish_request("mine", "failed")
    assert (again.duplicate, again.attempts) == (True, 2)


def test_low_level_calls_take_a_request_id(server: BackstopServer, bs: Backstop) -> None:
    d = bs.route("chat", request_id="manual")
    assert d.target == "a"
    bs.record_outcome("a", permit=d.permit, http_status=200, request_id="manual", finish="completed")
    adm = bs.can_proceed("b", request_id="manual-2")
    bs.record_outcome("b", permit=adm.permit, http_status=500, request_id="manual-2")
    f = bs.finish_request("manual-2", RequestResult.FAILED)
    assert (f.tracked, f.duplicate, f.attempts, f.route) == (True, False, 1, "direct")
    # Never seen here: the client's own measure counts, under the route it names.
    f = bs.finish_request("elsewhere", "deferred", route="chat", elapsed=2.5, attempts=3)
    assert (f.tracked, f.duration, f.attempts, f.route) == (False, 2.5, 3, "chat")
    assert total(server, "completed") == 1
    assert total(server, "failed", "direct") == 1
    assert total(server, "deferred") == 1
    with pytest.raises(ValueError):
        bs.finish_request("", "failed")
    with pytest.raises(ValueError):
        bs.finish_request("x", "unspecified")


def test_local_mode_skips_the_finish_and_never_fails_the_call(make_client: Callable[..., Backstop]) -> None:
    bs = make_client(
        f"127.0.0.1:{free_port()}", timeout=0.2, connect_timeout=0.2, local_routes={"chat": ["a", "b"]}
    )
    assert bs.call("chat", Fn(failing=["a"])) == "ok from b"
    assert bs.is_local
    with pytest.raises(AllTargetsFailed):
        bs.call("chat", Fn(failing=["a", "b"]))
    with bs.guard("c") as g:
        pass
    assert g.local


def test_a_server_without_finish_request_is_not_an_error(
    server: BackstopServer, bs: Backstop, monkeypatch: Any
) -> None:
    """FinishRequest failing (an older server answers UNIMPLEMENTED) is logged, not raised."""
    import grpc

    from backstop import ControlPlaneError

    def refuse(*a: Any, **kw: Any) -> Any:
        raise ControlPlaneError(grpc.StatusCode.UNIMPLEMENTED, "unknown method", "FinishRequest")

    real = bs._unary
    monkeypatch.setattr(bs, "_unary", lambda rpc: refuse() if rpc.method == "FinishRequest" else real(rpc))
    with pytest.raises(AllTargetsFailed):
        bs.call("chat", Fn(failing=["a", "b"]))
