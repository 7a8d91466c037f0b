#!/usr/bin/env python3
"""Decisions per second of the Python client: over the Decide stream (the
default), the same client with ``stream=False`` (one unary call per decision),
and raw grpcio unary stub calls (no client logic at all), with N threads, and
the same three with N asyncio tasks.

    BACKSTOP_BIN=target/release/backstop python clients/python/scripts/bench_decisions.py
    python clients/python/scripts/bench_decisions.py --threads 1,4,16 --seconds 3 --op pair

Each worker repeats one guarded call's decisions: CanProceed, then (``--op
pair``, the default) RecordOutcome with the permit; every answer counts as a
decision. The server (``backstop.testing.BackstopServer``, embedded mode) runs
on this machine, so client and server share its cores: the numbers compare the
three ways of asking, not the server's capacity. Besides the rate, each row
shows the CPU time per decision of the client process (all its threads,
gRPC's included) and of the server process (from /proc). Loopback only; each
cell runs for ``--seconds`` and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # run from a checkout without installing

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

from backstop import AsyncBackstop, Backstop  # noqa: E402
from backstop._proto import resilience_pb2 as pb  # noqa: E402
from backstop._proto import resilience_pb2_grpc  # noqa: E402
from backstop.testing import BackstopServer  # noqa: E402

CONFIG = ""  # built-in defaults: no budgets, so every CanProceed is admitted

TARGET = "bench/model"
MODES = ("stream", "unary", "raw")


class Cpu:
    """CPU seconds used so far by this process (every thread) and by the server."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def server(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        except OSError:
            return float("nan")  # not Linux

    def both(self) -> Tuple[float, float]:
        return time.process_time(), self.server()


#: decisions/s, p50 ms per iteration, client and server CPU microseconds per decision.
Cell = Tuple[float, float, float, float]


def cell(decisions: int, elapsed: float, lat: List[float], before: Tuple[float, float], after: Tuple[float, float]) -> Cell:
    lat.sort()
    per = 1e6 / max(1, decisions)
    return (
        decisions / elapsed,
        percentile(lat, 0.5) * 1e3,
        (after[0] - before[0]) * per,
        (after[1] - before[1]) * per,
    )


def percentile(sorted_values: List[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- threads -------------------------------------------------------------------------------


def sync_worker(mode: str, address: str, op: str) -> Tuple[Callable[[], int], Callable[[], None]]:
    """(one iteration -> decisions made, close)."""
    if mode == "raw":
        channel = grpc.insecure_channel(address)
        stub = resilience_pb2_grpc.ResilienceStub(channel)
        req = pb.CanProceedRequest(target=TARGET, caller="bench")

        def raw() -> int:
            adm = stub.CanProceed(req, timeout=5)
            if op == "pair":
                stub.RecordOutcome(
                    pb.RecordOutcomeRequest(target=TARGET, permit=adm.permit, http_status=200, caller="bench"), timeout=5
                )
                return 2
            return 1

        return raw, channel.close
    bs = Backstop(address, timeout=5.0, caller="bench", stream=(mode == "stream"))

    def client() -> int:
        adm = bs.can_proceed(TARGET)
        if adm.local:
            raise RuntimeError("the client went to its fail-safe: the numbers would be meaningless")
        if op == "pair":
            bs.record_outcome(TARGET, permit=adm.permit, http_status=200)
            return 2
        return 1

    return client, bs.close


def run_threads(mode: str, address: str, threads: int, seconds: float, op: str, cpu: Cpu) -> Cell:
    """One client shared by ``threads`` threads."""
    one, close = sync_worker(mode, address, op)
    for _ in range(20):  # connect, open the stream, warm up
        one()
    counts = [0] * threads
    lat: List[List[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        start.wait()
        n, mine, clock = 0, lat[i], time.perf_counter
        while True:
            t0 = clock()
            if t0 >= stop_at[0]:
                break
            n += one()
            mine.append(clock() - t0)
        counts[i] = n

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    before = cpu.both()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    after = cpu.both()
    close()
    return cell(sum(counts), elapsed, [x for per in lat for x in per], before, after)


# --- asyncio -------------------------------------------------------------------------------


async def async_worker(mode: str, address: str, op: str) -> Tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[None]]]:
    if mode == "raw":
        channel = grpc.aio.insecure_channel(address)
        stub = resilience_pb2_grpc.ResilienceStub(channel)
        req = pb.CanProceedRequest(target=TARGET, caller="bench")

        async def raw() -> int:
            adm = await stub.CanProceed(req, timeout=5)
            if op == "pair":
                await stub.RecordOutcome(
                    pb.RecordOutcomeRequest(target=TARGET, permit=adm.permit, http_status=200, caller="bench"), timeout=5
                )
                return 2
            return 1

        return raw, channel.close
    bs = AsyncBackstop(address, timeout=5.0, caller="bench", stream=(mode == "stream"))

    async def client() -> int:
        adm = await bs.can_proceed(TARGET)
        if adm.local:
            raise RuntimeError("the client went to its fail-safe: the numbers would be meaningless")
        if op == "pair":
            await bs.record_outcome(TARGET, permit=adm.permit, http_status=200)
            return 2
        return 1

    return client, bs.close


async def run_tasks(mode: str, address: str, tasks: int, seconds: float, op: str, cpu: Cpu) -> Cell:
    one, close = await async_worker(mode, address, op)
    for _ in range(20):
        await one()
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    lat: List[float] = []

    async def work() -> int:
        n = 0
        while loop.time() < stop_at:
            t0 = time.perf_counter()
            n += await one()
            lat.append(time.perf_counter() - t0)
        return n

    before = cpu.both()
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(work() for _ in range(tasks)))
    elapsed = time.perf_counter() - t0
    after = cpu.both()
    await close()
    return cell(sum(counts), elapsed, lat, before, after)


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,4,16", help="comma-separated worker counts (threads, and asyncio tasks)")
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each cell")
    ap.add_argument("--op", choices=("pair", "can_proceed"), default="pair", help="what one iteration decides")
    ap.add_argument("--no-async", action="store_true", help="skip the asyncio rows")
    ap.add_argument("--binary", default=os.environ.get("BACKSTOP_BIN"), help="backstop binary (default: $BACKSTOP_BIN)")
    args = ap.parse_args()
    workers = [int(x) for x in args.threads.split(",") if x.strip()]

    rows: List[Tuple[str, int, Dict[str, Cell]]] = []
    with BackstopServer(CONFIG, binary=args.binary, extra_args=["--http", "off"]) as server:
        assert server.proc is not None
        cpu = Cpu(server.proc.pid)
        for n in workers:
            rows.append(("threads", n, {m: run_threads(m, server.address, n, args.seconds, args.op, cpu) for m in MODES}))
        if not args.no_async:
            for n in workers:
                cells = {m: asyncio.run(run_tasks(m, server.address, n, args.seconds, args.op, cpu)) for m in MODES}
                rows.append(("asyncio tasks", n, cells))

    print(
        f"op={args.op}, {args.seconds:g}s per cell; grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores shared by client and server; CPU = CPU time per decision"
    )
    names = {"stream": "stream (default)", "unary": "stream=False", "raw": "raw grpcio unary"}
    print("| workers | client | decisions/s | p50 ms / iteration | client CPU µs | server CPU µs |")
    print("|---|---|--:|--:|--:|--:|")
    for kind, n, cells in rows:
        for m in MODES:
            rate, p50, client_us, server_us = cells[m]
            print(f"| {n} {kind} | {names[m]} | {rate:,.0f} | {p50:.2f} | {client_us:,.0f} | {server_us:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
