"""A closed-loop HTTP load generator: keep-alive connections, one request in flight on each.

Runs in processes of its own (`procs`), each with one thread per connection, so the client's CPU
is not the server's. Only requests that start after the warm-up and end inside the window count.
"""

from __future__ import annotations

import http.client
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Body = Callable[[str, int], bytes]  # (connection tag, request number) -> a distinct body


@dataclass(frozen=True)
class Spec:
    port: int
    path: str
    headers: dict[str, str]
    body: Body  # a module-level function: it travels to the generator processes by name
    status: int  # the answer that counts as a success
    connections: int = 16
    procs: int = 1
    seconds: float = 10.0
    warmup: float = 1.0
    server_pid: int | None = None  # to measure the server's CPU over the window


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # over the whole run, warm-up included
    answered: int  # successes, warm-up included: what the server must have stored
    server_cpu: float | None  # cores busy in the server process, over the window
    client_cpu: float  # cores busy in the load generator


def run(spec: Spec) -> Result:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(spec.procs), ctx.Queue()
    procs = [
        ctx.Process(target=_generate, args=(spec, n, barrier, queue)) for n in range(spec.procs)
    ]
    try:
        for p in procs:
            p.start()
        parts = [queue.get(timeout=spec.warmup + spec.seconds + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()
    latencies = sorted(x for part in parts for x in part["latencies"])
    server = [p["server_cpu"] for p in parts if p["server_cpu"] is not None]

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    return Result(
        rps=len(latencies) / spec.seconds,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        errors=sum(p["errors"] for p in parts),
        answered=sum(p["answered"] for p in parts),
        server_cpu=server[0] / spec.seconds if server else None,
        client_cpu=sum(p["client_cpu"] for p in parts) / spec.seconds,
    )


def _generate(spec: Spec, proc: int, barrier, queue) -> None:
    """One generator process: its share of the connections, then a report on `queue`."""
    from bench.common import cpu_seconds

    mine = range(proc, spec.connections, spec.procs)
    conns = [http.client.HTTPConnection("127.0.0.1", spec.port, timeout=30) for _ in mine]
    for conn in conns:
        conn.connect()
    barrier.wait()  # every process opened its connections: start together
    begin = time.monotonic()
    window = (begin + spec.warmup, begin + spec.warmup + spec.seconds)
    stats = [{"latencies": [], "errors": 0, "answered": 0} for _ in conns]
    threads = [
        threading.Thread(target=_connection, args=(spec, f"{proc}.{i}", conn, window, stats[i]))
        for i, conn in enumerate(conns)
    ]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))  # timing the window, not readiness
    cpu0, server0 = _own_cpu(), _server_cpu(spec, proc, cpu_seconds)
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu1, server1 = _own_cpu(), _server_cpu(spec, proc, cpu_seconds)
    for t in threads:
        t.join()
    queue.put(
        {
            "latencies": [x for s in stats for x in s["latencies"]],
            "errors": sum(s["errors"] for s in stats),
            "answered": sum(s["answered"] for s in stats),
            "client_cpu": cpu1 - cpu0,
            "server_cpu": None if server0 is None else server1 - server0,
        }
    )


def _connection(spec: Spec, tag: str, conn, window: tuple[float, float], stats: dict) -> None:
    start, end = window
    n = 0
    while (t0 := time.monotonic()) < end:
        body = spec.body(tag, n)
        n += 1
        try:
            conn.request("POST", spec.path, body, spec.headers)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == spec.status
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()  # reconnects on the next request
        t1 = time.monotonic()
        stats["answered"] += ok
        stats["errors"] += not ok  # warm-up included: any error is one too many
        if ok and start <= t0 and t1 <= end:
            stats["latencies"].append(t1 - t0)
    conn.close()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu(spec: Spec, proc: int, cpu_seconds) -> float | None:
    if proc != 0 or spec.server_pid is None or not Path(f"/proc/{spec.server_pid}").exists():
        return None
    return cpu_seconds(spec.server_pid)
