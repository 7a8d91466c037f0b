"""Several replicas: one client, a cluster of real ``backstop`` servers sharing
state through a real ``redis-server``.

The client balances decisions over the replicas and fails over between them;
killing one replica (``kill -9``) must not send a single decision to the local
fail-safe, which takes over only once every replica is gone. Addresses come
as a list, as a comma-separated string, or as one DNS name with several A
records (served here by a tiny DNS server, so gRPC's own resolver and
round_robin policy do the balancing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import pytest

from backstop import AsyncBackstop, Backstop, ControlPlaneError
from backstop._transport import parse_addresses, single_server, target_options
from backstop.testing import BackstopServer, RedisServer, find_redis, free_port

from conftest import CHAT, FAST

TARGET = "anthropic/sonnet"


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def served(server: BackstopServer, method: str = "CanProceed") -> int:
    """How many ``method`` decisions this replica answered (its own Prometheus
    counters), as unary calls or as items of a Decide stream."""
    text = server.metrics()
    total = 0
    for name in (method, f"Decide.{method}"):
        m = re.search(rf'^backstop_rpc_duration_seconds_count{{method="{re.escape(name)}"}} (\d+)', text, re.M)
        total += int(m.group(1)) if m else 0
    return total


# --- addresses, without a server ----------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051",)),
        ("a:1,b:2", ("a:1", "b:2")),
        (" a:1 , b:2 ", ("a:1", "b:2")),
        (["a:1", "b:2", "c:3"], ("a:1", "b:2", "c:3")),
        (("a:1",), ("a:1",)),
        # gRPC target URIs are one entry, commas and all.
        ("dns:///backstop-headless.ns.svc:50051", ("dns:///backstop-headless.ns.svc:50051",)),
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", ("ipv4:10.0.0.1:50051,10.0.0.2:50051",)),
        (["dns:///a:1", "b:2"], ("dns:///a:1", "b:2")),
        # ...but a host named like a scheme is still host:port.
        ("dns:50051,b:2", ("dns:50051", "b:2")),
    ],
)
def test_addresses_parse(given: Any, expected: Tuple[str, ...]) -> None:
    assert parse_addresses(given) == expected


@pytest.mark.parametrize(
    "given, error, match",
    [
        ("", ValueError, "empty address"),
        ("a:1,,b:2", ValueError, "empty address"),
        ("a:1,", ValueError, "empty address"),
        ([], ValueError, "no address"),
        ("a:1,a:1", ValueError, "listed twice"),
        (["a:1, b:2"], ValueError, "one address per list item"),
        ([b"a:1"], TypeError, "must be a str"),
        (b"a:1", TypeError, "not bytes"),
        (50051, TypeError, "got int"),
    ],
)
def test_addresses_reject(given: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_addresses(given)
    with pytest.raises(error, match=match):
        Backstop(given)


def test_client_keeps_the_address_it_was_given() -> None:
    with Backstop("127.0.0.1:1") as one, Backstop(["127.0.0.1:1", "127.0.0.1:2"]) as two:
        assert one.address == "127.0.0.1:1" and one.addresses == ("127.0.0.1:1",)
        assert two.address == "127.0.0.1:1,127.0.0.1:2" and two.addresses == ("127.0.0.1:1", "127.0.0.1:2")


def test_channel_options_balance_only_names() -> None:
    user = [("grpc.max_receive_message_length", 1 << 20)]
    # One IP and port is one server: nothing to balance, the options stay as they were.
    assert target_options("127.0.0.1:50051", user, sticky=False) == user
    assert target_options("[::1]:50051", user, sticky=False) == user
    assert single_server("10.1.2.3:50051") and not single_server("backstop:50051")
    # A name may resolve to several servers: round_robin, and gRPC's retry on UNAVAILABLE.
    named = dict(target_options("dns:///backstop-headless:50051", user, sticky=False))
    assert named["grpc.lb_policy_name"] == "round_robin"
    assert '"retryableStatusCodes": ["UNAVAILABLE"]' in named["grpc.service_config"]
    assert named["grpc.max_receive_message_length"] == 1 << 20
    # The deferred queue's channel stays on one server.
    sticky = dict(target_options("backstop:50051", user, sticky=True))
    assert sticky["grpc.lb_policy_name"] == "pick_first" and "grpc.service_config" not in sticky
    # The caller's own choice wins.
    mine = dict(target_options("backstop:50051", [("grpc.lb_policy_name", "pick_first")], sticky=False))
    assert mine["grpc.lb_policy_name"] == "pick_first"


# --- a cluster ------------------------------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    try:
        find_redis()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    with RedisServer() as r:
        yield r


@pytest.fixture
def cluster(
    redis: RedisServer, start_server: Callable[..., BackstopServer]
) -> Callable[..., List[BackstopServer]]:
    """cluster(n) -> n replicas on one Redis (HTTP on, for their per-replica metrics)."""

    def start(n: int = 2, **kw: Any) -> List[BackstopServer]:
        return [start_server(FAST + CHAT, redis=redis.url, **kw) for _ in range(n)]

    return start


class Agent:
    """Guarded calls in a loop on a thread: CanProceed, then RecordOutcome with the
    permit (often answered by another replica than the one that issued it)."""

    def __init__(self, bs: Backstop) -> None:
        self.bs = bs
        self.results: List[Dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.bs.guard(TARGET) as g:
                    pass
                out = g.outcome
                self.results.append({"local": g.local or out is None or out.local, "mode": self.bs.mode})
            except Exception as e:  # recorded: the test asserts there are none
                self.results.append({"error": repr(e), "mode": self.bs.mode})
            time.sleep(0.005)

    def count(self) -> int:
        return len(self.results)

    def __enter__(self) -> Agent:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)


def local_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if "deciding locally" in r.getMessage()]


@pytest.mark.parametrize("form", ["list", "comma-separated"])
def test_decisions_are_balanced_over_replicas(
    cluster: Callable[..., List[BackstopServer]], make_client: Callable[..., Backstop], form: str
) -> None:
    a, b = cluster(2)
    address: Any = [a.address, b.address] if form == "list" else f"{a.address}, {b.address}"
    bs = make_client(address)
    before = served(a), served(b)
    for _ in range(20):
        adm = bs.can_proceed(TARGET)
        assert adm.allowed and not adm.local
    got = served(a) - before[0], served(b) - before[1]
    assert sum(got) == 20
    assert abs(got[0] - got[1]) <= 2, f"decisions per replica: {got}"


def test_kill_one_replica_then_all(
    cluster: Callable[..., List[BackstopServer]],
    make_client: Callable[..., Backstop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    a, b = cluster(2)
    bs = make_client([a.address, b.address], timeout=0.25, reconnect_interval=0.1)
    with Agent(bs) as agent:
        wait_for(lambda: agent.count() >= 20, 10, "guarded calls through both replicas")
        assert served(a) > 0 and served(b) > 0

        a.kill()  # kill -9, mid-run
        n = agent.count()
        b_before = served(b)
        wait_for(lambda: agent.count() >= n + 40, 10, "guarded calls with one replica killed")
        # Every decision, before and after the kill, came from the cluster.
        assert [r for r in agent.results if "error" in r] == []
        assert [r for r in agent.results if r["local"] or r["mode"] != "remote"] == []
        assert local_warnings(caplog) == []
        # B answered every CanProceed since (but the one in flight while b_before was read).
        assert served(b) - b_before >= 40 - 1
        assert any(f"replica {a.address} is unreachable" in r.getMessage() for r in caplog.records)

        # The last replica too: now (and only now) the local fail-safe decides.
        b.kill()
        wait_for(lambda: bs.mode == "local", 5, "the switch to local decisions")
        n = agent.count()
        wait_for(lambda: agent.count() >= n + 10, 10, "calls while every replica is down")
        assert all(r.get("local") for r in agent.results[n:])
        assert len(local_warnings(caplog)) == 1

        # One replica back (same port): the fleet decides again.
        a.restart()
        wait_for(lambda: bs.mode == "remote", 10, "the switch back to the cluster")
        n = agent.count()
        wait_for(lambda: agent.count() >= n + 10, 10, "calls after a replica came back")
        assert not any(r.get("local") for r in agent.results[n + 1 :])


def test_async_kill_one_replica_then_all(cluster: Callable[..., List[BackstopServer]]) -> None:
    a, b = cluster(2)

    async def run() -> None:
        async with AsyncBackstop(f"{a.address},{b.address}", timeout=0.25, reconnect_interval=0.1) as bs:
            for _ in range(10):
                assert not (await bs.can_proceed(TARGET)).local
            assert served(a) > 0 and served(b) > 0
            a.kill()
            for _ in range(30):
                async with bs.guard(TARGET) as g:
                    pass
                assert not g.local and g.outcome is not None and not g.outcome.local
                assert bs.mode == "remote"
            b.kill()
            adm = await bs.can_proceed(TARGET)
            assert adm.local and bs.mode == "local"
            a.restart()
            deadline = time.monotonic() + 10
            while bs.mode != "remote":
                assert time.monotonic() < deadline, "the client never switched back"
                await asyncio.sleep(0.02)
            assert not (await bs.can_proceed(TARGET)).local

    asyncio.run(run())


def test_deferred_queue_stays_on_one_replica(
    cluster: Callable[..., List[BackstopServer]], make_client: Callable[..., Backstop]
) -> None:
    # The queue is in Redis, shared by every replica; the client still keeps
    # queue calls on one replica while it is up (a Defer is never retried on
    # another, so it is never saved twice).
    a, b = cluster(2)
    bs = make_client([a.address, b.address])
    only_a, only_b = make_client(a.address), make_client(b.address)
    for i in range(3):
        bs.defer("chat", {"n": i})
    assert [q.depth for q in only_a.queue_stats("chat")] == [3]
    assert [q.depth for q in only_b.queue_stats("chat")] == [3], "one queue, seen from both"
    claimed = bs.claim("chat", max_items=3)
    assert len(claimed.items) == 3
    for item in claimed.items:
        bs.ack(item)
    assert [(q.depth, q.in_flight) for q in only_a.queue_stats("chat")] == [(0, 0)]

    # Its replica killed: the queue moves to the next one.
    a.kill()
    saved = bs.defer("chat", {"n": "after"})
    assert saved.id
    assert [q.depth for q in only_b.queue_stats("chat")] == [1]


# --- one DNS name, several A records ----------------------------------------------------------


class DnsStub:
    """A UDP DNS server on loopback answering A queries for some names (and
    nothing else), so a gRPC ``dns://127.0.0.1:PORT/name:port`` target
    resolves ``name`` to several addresses."""

    def __init__(self, records: Dict[str, Sequence[str]]) -> None:
        self.records = {k.lower(): list(v) for k, v in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.asked: List[Tuple[str, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            answer = self._answer(query)
            if answer is not None:
                self.sock.sendto(answer, peer)

    def _answer(self, query: bytes) -> Optional[bytes]:
        if len(query) < 17:
            return None
        qid = struct.unpack(">H", query[:2])[0]
        labels, i = [], 12
        while i < len(query) and query[i]:
            labels.append(query[i + 1 : i + 1 + query[i]].decode(errors="replace"))
            i += 1 + query[i]
        qtype = struct.unpack(">H", query[i + 1 : i + 3])[0]
        question = query[12 : i + 5]
        name = ".".join(labels).lower()
        self.asked.append((name, qtype))
        answers = b""
        rcode = 3  # NXDOMAIN
        if name in self.records:
            rcode = 0
            if qtype == 1:  # A; an AAAA query gets an empty answer
                for ip in self.records[name]:
                    # A pointer to the question's name, type A, class IN, TTL 1 s, 4 bytes.
                    answers += struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip)
        count = len(answers) // 16
        # Response, authoritative, recursion desired + available.
        header = struct.pack(">HHHHHH", qid, 0x8000 | 0x0400 | 0x0100 | 0x0080 | rcode, 1, count, 0, 0)
        return header + question + answers

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_one_dns_name_with_several_addresses(
    redis: RedisServer, start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], stream: bool
) -> None:
    if os.environ.get("GRPC_DNS_RESOLVER", "").lower() == "native":
        pytest.skip("GRPC_DNS_RESOLVER=native cannot query a given DNS server")
    # Two replicas on one port, at two loopback addresses: what a DNS name of a
    # Kubernetes headless Service looks like.
    a = start_server(FAST + CHAT, redis=redis.url)
    b = start_server(FAST + CHAT, redis=redis.url, host="127.0.0.2", port=a.port)
    dns = DnsStub({"backstop.test": ["127.0.0.1", "127.0.0.2"]})
    try:
        bs = make_client(
            f"dns://127.0.0.1:{dns.port}/backstop.test:{a.port}", timeout=0.25, reconnect_interval=0.1, stream=stream
        )
        assert bs.addresses == (f"dns://127.0.0.1:{dns.port}/backstop.test:{a.port}",)
        before = served(a), served(b)
        # Unary calls alternate; a stream is replaced every ROTATE_AFTER (64)
        # items, and each new one goes to the next server.
        n = 200 if stream else 20
        for _ in range(n):
            assert not bs.can_proceed(TARGET).local
        assert ("backstop.test", 1) in dns.asked
        got = served(a) - before[0], served(b) - before[1]
        assert sum(got) == n and min(got) >= n // 4, f"decisions per server: {got}"

        # One server killed: gRPC's round_robin (and its retry of a call lost
        # with the server) keeps every decision on the cluster.
        a.kill()
        for _ in range(50):
            with bs.guard(TARGET) as g:
                pass
            assert not g.local and g.outcome is not None and not g.outcome.local
            assert bs.mode == "remote"
        b.kill()
        assert bs.can_proceed(TARGET).local and bs.mode == "local"
    finally:
        dns.close()


class BrokenReplica:
    """A gRPC server that answers every call UNAVAILABLE: a replica in the middle
    of dying (its calls fail; it is not yet gone from DNS or the client's list)."""

    def __init__(self, address: str) -> None:
        self.calls: List[str] = []
        outer = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                method = details.method

                def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
                    outer.calls.append(method)
                    context.abort(grpc.StatusCode.UNAVAILABLE, "this replica is going away")

                return grpc.unary_unary_rpc_method_handler(fail)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[Handler()])
        if self.server.add_insecure_port(address) == 0:
            raise RuntimeError(f"cannot listen on {address}")
        self.server.start()

    def decisions(self) -> int:
        return sum(1 for m in self.calls if m.startswith("/backstop.v1.Resilience/"))

    def close(self) -> None:
        self.server.stop(None)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_dns_name_retries_a_call_on_another_server(
    start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], stream: bool
) -> None:
    # gRPC's retry (from the client's service config) sends a call that failed
    # UNAVAILABLE on one server of the name to the next one, within its deadline.
    if os.environ.get("GRPC_DNS_RESOLVER", "").lower() == "native":
        pytest.skip("GRPC_DNS_RESOLVER=native cannot query a given DNS server")
    good = start_server()
    broken = BrokenReplica(f"127.0.0.2:{good.port}")
    dns = DnsStub({"backstop.test": ["127.0.0.1", "127.0.0.2"]})
    try:
        bs = make_client(f"dns://127.0.0.1:{dns.port}/backstop.test:{good.port}", timeout=0.5, stream=stream)
        # A stream is a call too: one round_robin sends to the broken server
        # fails there and is retried on the good one (a stream per 64 items).
        for _ in range(200 if stream else 20):
            adm = bs.can_proceed(TARGET)
            assert adm.allowed and not adm.local
        assert bs.mode == "remote"
        assert broken.decisions() >= (1 if stream else 5), "round_robin never picked the broken server"
    finally:
        dns.close()
        broken.close()


def test_a_failing_replica_in_a_list_gets_no_more_traffic(
    start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="backstop")
    good = start_server()
    broken_address = f"127.0.0.1:{free_port()}"
    broken = BrokenReplica(broken_address)
    try:
        bs = make_client([broken_address, good.address], reconnect_interval=0.05)
        for _ in range(20):
            adm = bs.can_proceed(TARGET)
            assert adm.allowed and not adm.local
        # Tried once, marked down; its health checks fail too, so it stays down.
        assert broken.decisions() == 1
        wait_for(lambda: any("Health/Check" in m for m in broken.calls), 5, "a health check of the broken replica")
        assert [r.target for r in bs._replicas.down()] == [broken_address]
        assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        broken.close()


def test_grpc_error_is_not_an_outage(
    cluster: Callable[..., List[BackstopServer]], make_client: Callable[..., Backstop]
) -> None:
    # A replica that answers "no" is not down: the error is the caller's, and no failover happens.
    a, b = cluster(2)
    bs = make_client([a.address, b.address])
    with pytest.raises(ControlPlaneError) as e:
        bs.route("no-such-route")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert served(a, "Route") + served(b, "Route") == 1
    assert bs.mode == "remote" and not any(r.down for r in bs._replicas.replicas)
