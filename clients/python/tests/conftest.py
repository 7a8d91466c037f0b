"""Fixtures: the real backstop binary on a free port, a fake provider, clients.

Every test gets its own server (they start in ~0.1 s) with a config chosen for
the test, so breaker state never leaks between tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from backstop import Backstop
from backstop.testing import BackstopServer, FakeProvider, find_binary

REPO = Path(__file__).resolve().parents[3]

#: Short durations so the whole suite stays fast: a breaker opens after 2
#: consecutive failures, for 500 ms; retry delays are tens of milliseconds.
FAST = """
[defaults.breaker]
failure_threshold = 2
success_threshold = 1
open_duration = "500ms"
max_open_duration = "1s"
jitter = 0.0
persistent_open_duration = "30s"

[defaults.retry]
max_retries = 2
base_delay = "10ms"
max_delay = "40ms"
"""

CHAT = """
[routes.chat]
targets = ["anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"]
"""


@pytest.fixture(scope="session")
def backstop_bin() -> str:
    path = os.environ.get("BACKSTOP_BIN") or str(REPO / "target" / "debug" / "backstop")
    try:
        return find_binary(path)
    except FileNotFoundError as e:
        pytest.fail(f"{e} (run clients/python/scripts/test.sh, which builds it)")


@pytest.fixture
def start_server(backstop_bin: str) -> Iterator[Callable[..., BackstopServer]]:
    """start_server(config) -> a running BackstopServer, killed after the test."""
    servers: List[BackstopServer] = []

    def start(config: str = FAST + CHAT, **kw: object) -> BackstopServer:
        s = BackstopServer(config, binary=backstop_bin, **kw)  # type: ignore[arg-type]
        servers.append(s)
        return s.start()

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def server(start_server: Callable[..., BackstopServer]) -> BackstopServer:
    return start_server()


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    p = FakeProvider()
    yield p
    p.close()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Backstop]]:
    """make_client(address, **kw) -> Backstop, closed after the test.

    Tests that are not about the fail-safe use a generous deadline (1 s) so a
    loaded CI machine cannot push them into local mode by accident.
    """
    clients: List[Backstop] = []

    def make(address: str, **kw: object) -> Backstop:
        kw.setdefault("timeout", 1.0)
        kw.setdefault("caller", "pytest")
        c = Backstop(address, **kw)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def bs(server: BackstopServer, make_client: Callable[..., Backstop]) -> Backstop:
    return make_client(server.address)
