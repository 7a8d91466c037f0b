"""Separate client processes share one breaker through Backstop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from conftest import CHAT

from backstop import Backstop, BreakerState, CircuitOpen, Reason
from backstop.testing import BackstopServer, FakeProvider, overloaded

# Open for long enough that starting the other processes cannot outlast it.
CONFIG = CHAT + """
[defaults.breaker]
failure_threshold = 2
success_threshold = 1
open_duration = "2s"
jitter = 0.0
"""

AGENT = str(Path(__file__).with_name("agent_process.py"))
SONNET, GPT = "anthropic/sonnet", "openai/gpt-4o"


def run_agent(server: BackstopServer, provider: FakeProvider, mode: str, name: str, n: int) -> List[Dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, AGENT, server.address, provider.url, mode, name, str(n)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_failures_in_one_process_open_the_breaker_for_others(
    start_server: Callable[..., BackstopServer], make_client: Callable[..., Backstop], provider: FakeProvider
) -> None:
    server = start_server(CONFIG)
    bs = make_client(server.address)
    provider.set_default(SONNET, overloaded())

    # Process A: two 529s open Sonnet's breaker (failure_threshold = 2).
    a = run_agent(server, provider, "guard", SONNET, 2)
    assert a == [{"ok": False, "status": 529, "state": "closed"}, {"ok": False, "status": 529, "state": "open"}]

    # Process B never saw a failure, yet routes straight past Sonnet.
    b = run_agent(server, provider, "call", "chat", 3)
    assert [r.get("model") for r in b] == [GPT, GPT, GPT] and all(r["mode"] == "remote" for r in b)
    assert provider.calls(SONNET) == 2, "no other process called the open target"

    # And this (third) process is refused too, without calling the provider.
    adm = bs.can_proceed(SONNET)
    assert not adm.allowed and adm.reason == Reason.CIRCUIT_OPEN and not adm.local
    assert adm.retry_after is not None and 0 < adm.retry_after <= 2.0
    with pytest.raises(CircuitOpen):
        with bs.guard(SONNET):
            pytest.fail("must not be admitted")
    status = bs.get_target(SONNET)
    assert status.state == BreakerState.OPEN and "529" in status.last_cause

    # Recovery is shared as well: after open_duration one process's probe closes it for all.
    provider.set_default(SONNET, None)
    time.sleep(adm.retry_after + 0.05)
    probe = run_agent(server, provider, "guard", SONNET, 1)
    assert probe == [{"ok": True, "state": "closed"}]
    assert run_agent(server, provider, "call", "chat", 1)[0]["model"] == SONNET
