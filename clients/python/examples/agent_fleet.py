#!/usr/bin/env python3
"""A fleet of agents sharing one Backstop: the five-minute demo.

The classic three-model router -- a Sonnet-class primary, a GPT-4o-class
fallback, a Haiku-class last resort -- run by several worker *processes*
against a fake provider into which this script injects outages:

    t = 20% .. 60%   the primary answers 529 overloaded
    t = 40% .. 55%   the fallback answers 429 with retry-after
    t = 70% .. 80%   every model is down: requests are deferred to the queue
    afterwards       a DeferredWorker drains the queue once models recover

Every worker asks Backstop before each call, so the fleet discovers each
outage once (the primary's breaker opens after a couple of failures, for all
workers at once), backs off together, and resumes together. Each worker's
code is one ``bs.call(...)``; compare with the ~150 lines of per-process
retry/breaker/fallback/queue code it replaces (see the package README).

    python examples/agent_fleet.py                    # starts backstop (BACKSTOP_BIN) and the fake provider
    python examples/agent_fleet.py --workers 6 --duration 30
    python examples/agent_fleet.py --backstop 127.0.0.1:50051   # use a running server with a "chat" route
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import queue as queue_mod
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from backstop import AllTargetsFailed, Backstop, Deferred, DeferredItem, DeferredWorker
from backstop.testing import (
    BackstopServer,
    FakeProvider,
    FakeProviderClient,
    overloaded,
    rate_limited_openai,
)

SONNET, GPT4O, HAIKU = "anthropic/claude-sonnet", "openai/gpt-4o", "anthropic/claude-haiku"
ROUTE = [SONNET, GPT4O, HAIKU]
#: $ per million tokens (input, output).
PRICES: Dict[str, Tuple[float, float]] = {SONNET: (3.0, 15.0), GPT4O: (2.5, 10.0), HAIKU: (0.8, 4.0)}


def config() -> str:
    targets = "".join(
        f'[targets."{t}"]\ncost_per_mtok_input = {i}\ncost_per_mtok_output = {o}\nmax_tokens = 1024\n\n'
        for t, (i, o) in PRICES.items()
    )
    return f"""
# Short durations so the demo shows a whole outage cycle in seconds.
[defaults.breaker]
failure_threshold = 3
success_threshold = 2
open_duration = "1s"
max_open_duration = "2s"

[defaults.retry]
max_retries = 2
base_delay = "20ms"
max_delay = "200ms"

{targets}
[routes.chat]
targets = {ROUTE!r}
""".replace("'", '"')


def cost(model: str, input_tokens: int, output_tokens: int) -> float:
    pin, pout = PRICES[model]
    return (input_tokens * pin + output_tokens * pout) / 1e6


def agent(worker: int, address: str, provider_url: str, until: float, events: mp.Queue[Any]) -> None:
    """One agent process: all of its resilience code is the bs.call(...) below."""
    provider = FakeProviderClient(provider_url)
    n = 0
    with Backstop(address, caller=f"agent-{worker}", local_routes={"chat": ROUTE}) as bs:
        while time.time() < until:
            n += 1
            prompt = f"agent {worker} task {n}: summarise the incident report"

            def ask(target: str, max_tokens: int, key_slot: str, prompt: str = prompt) -> Any:
                return provider.complete(target, prompt, max_tokens=max_tokens, timeout=2)

            try:
                r = bs.call("chat", ask, estimated_tokens=200, defer_to="queue", payload={"prompt": prompt})
            except AllTargetsFailed as e:  # only if deferring failed too
                events.put(("failed", worker, str(e).splitlines()[0], 0.0))
            else:
                if isinstance(r, Deferred):
                    events.put(("deferred", worker, r.message, 0.0))
                else:
                    events.put(("served", worker, r.model, cost(r.model, r.usage.input_tokens, r.usage.output_tokens)))
            time.sleep(0.05)
    events.put(("done", worker, "", 0.0))


class Tally:
    def __init__(self) -> None:
        self.served: Dict[str, int] = collections.Counter()
        self.cost = 0.0
        self.deferred = 0
        self.failed = 0
        self.done = 0
        self.message = ""

    def add(self, kind: str, detail: str, dollars: float) -> None:
        if kind == "served":
            self.served[detail] += 1
            self.cost += dollars
        elif kind == "deferred":
            self.deferred += 1
            self.message = detail
        elif kind == "failed":
            self.failed += 1
        elif kind == "done":
            self.done += 1

    @property
    def requests(self) -> int:
        return sum(self.served.values()) + self.deferred + self.failed


def states(bs: Backstop) -> str:
    by_name = {t.target: t.state.value for t in bs.list_targets()}
    short = {SONNET: "sonnet", GPT4O: "gpt-4o", HAIKU: "haiku"}
    return " ".join(f"{short[t]}={by_name.get(t, 'closed'):<9}" for t in ROUTE)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of traffic (outages scale with it)")
    ap.add_argument("--backstop", help="address of a running server (default: start target/debug/backstop)")
    args = ap.parse_args(argv)

    server = None if args.backstop else BackstopServer(config()).start()
    address = args.backstop or (server.address if server else "")
    provider = FakeProvider()
    d = args.duration
    # (start, end, model, behaviour while down) as fractions of the run.
    outages = [
        (0.20, 0.60, SONNET, overloaded()),
        (0.40, 0.55, GPT4O, rate_limited_openai(retry_after=1)),
        (0.70, 0.80, SONNET, overloaded()),
        (0.70, 0.80, GPT4O, overloaded()),
        (0.70, 0.80, HAIKU, overloaded()),
    ]
    print(f"backstop {address}, fake provider {provider.url}, {args.workers} agent processes, {d:g}s")
    for start, end, model, b in outages:
        print(f"  outage: {model:<24} {b['status']} from t={start * d:4.1f}s to t={end * d:4.1f}s")

    ctx = mp.get_context("spawn")
    events: mp.Queue[Any] = ctx.Queue()
    t0 = time.time()
    procs = [
        ctx.Process(target=agent, args=(i, address, provider.url, t0 + d, events), daemon=True)
        for i in range(args.workers)
    ]
    for p in procs:
        p.start()

    tally = Tally()
    admin = Backstop(address, timeout=1.0, caller="demo-admin")
    active: Dict[str, bool] = {m: False for m in PRICES}
    next_print = 0.0
    try:
        while tally.done < len(procs):
            now = time.time() - t0
            for model in PRICES:
                down = [b for s, e, m, b in outages if m == model and s * d <= now < e * d]
                if bool(down) != active[model]:
                    provider.set_default(model, down[0] if down else None)
                    active[model] = bool(down)
            try:
                kind, _, detail, dollars = events.get(timeout=0.05)
                tally.add(kind, detail, dollars)
            except queue_mod.Empty:
                pass
            if now >= next_print and now < d:
                served = " ".join(f"{m.split('/')[1]}={tally.served[m]}" for m in ROUTE)
                print(f"t={now:4.1f}s  {states(admin)} served: {served} deferred={tally.deferred}")
                next_print += max(1.0, d / 15)
        for p in procs:
            p.join(10)
        while True:  # late events
            try:
                kind, _, detail, dollars = events.get_nowait()
                tally.add(kind, detail, dollars)
            except queue_mod.Empty:
                break

        for model in PRICES:
            provider.set_default(model, None)
        drained_by: Dict[str, int] = collections.Counter()
        if tally.deferred:
            print(f"\nrecovered; draining {tally.deferred} deferred request(s) ...")

            def handle(item: DeferredItem) -> Any:
                # Backstop admitted this delivery to item.target; the worker reports and acks.
                reply = provider.complete(item.target, item.json()["prompt"], timeout=2)
                drained_by[item.target] += 1
                return reply

            DeferredWorker(admin, "chat", handle, wait=1.0).run(until_empty=True, timeout=60)
        drained = sum(drained_by.values())

        pstats = provider.stats()
        print("\nmodel                      served  drained  provider calls  provider errors")
        for m in ROUTE:
            s = pstats.get(m, {"calls": 0, "statuses": {}})
            errors = s["calls"] - s["statuses"].get("200", 0)
            print(f"{m:<26} {tally.served[m]:>6}  {drained_by[m]:>7}  {s['calls']:>14}  {errors:>15}")
        total = tally.requests
        fallbacks = total - tally.served[SONNET] - tally.deferred - tally.failed
        print(f"\nrequests: {total}; served by a fallback model: {fallbacks} ({100 * fallbacks / max(total, 1):.0f}%)")
        print(f"deferred while every model was down: {tally.deferred}; drained after recovery: {drained}")
        if tally.message:
            print(f'  what the user was told: "{tally.message}"')
        print(f"failed outright: {tally.failed}")
        print(f"model spend (at each model's price): ${tally.cost:.4f}")
        sonnet_errors = pstats.get(SONNET, {"statuses": {}})["statuses"].get("529", 0)
        print(
            f"\nThe primary was down for {0.5 * d:.1f}s of {d:g}s, yet it saw only {sonnet_errors} failed calls "
            f"from {args.workers} agent processes: its breaker opened for the whole fleet at once, and only "
            "single probes went through until it recovered."
        )
        return 0 if tally.failed == 0 and drained == tally.deferred else 1
    finally:
        admin.close()
        provider.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
        if server is not None:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
