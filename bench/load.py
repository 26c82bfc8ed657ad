"""A closed-loop HTTP load generator: keep-alive connections, one request in flight on each.

Runs in processes of its own (`procs`), each with one thread per connection, so the client's CPU
is not the server's. The rate counts the successes that end inside the measured window; the
latencies, the requests that start after the warm-up and end inside it.
"""

from __future__ import annotations

import http.client
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Empty

# (connection tag, request number) -> a distinct body, or (body, headers of its own) for
# requests that must each carry their own headers (a signature over the body, a delivery id).
Body = Callable[[str, int], bytes | tuple[bytes, dict[str, str]]]


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
    server_pid: int | tuple[int, ...] | None = None  # the server's CPU over the window (summed)
    first: int = 0  # the first request number on each connection (distinct bodies across runs)


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
    return start(spec).result()


def alternate(specs: list[Spec], rounds: int) -> list[Result]:
    """Each spec's load in `rounds` slices of `seconds / rounds`, taking turns (A B, B A, A B
    …), each slice with its own warm-up: servers compared this way see the same machine, where
    one run after the other can see a different one (a shared machine's speed moves by a
    third within minutes). One result per spec, over all its slices."""
    parts: list[list[dict]] = [[] for _ in specs]
    for r in range(rounds):
        order = list(enumerate(specs)) if r % 2 == 0 else list(enumerate(specs))[::-1]
        for i, spec in order:
            piece = replace(spec, seconds=spec.seconds / rounds, first=r * ROUND_REQUESTS)
            parts[i] += start(piece).parts()
    return [_summary(spec, p) for spec, p in zip(specs, parts, strict=True)]


#: Request numbers per slice: no connection makes this many in one.
ROUND_REQUESTS = 1_000_000


class Running:
    """A load under way: `window()` tells when it is measured, `result()` waits for the end."""

    def __init__(self, spec: Spec):
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        # Held here: the children unpickle them after this returns (collected, they'd be gone).
        self._barrier, self.queue = ctx.Barrier(spec.procs), ctx.Queue()
        self._window, self._started = ctx.Array("d", 2), ctx.Event()
        self.procs = [
            ctx.Process(
                target=_generate,
                args=(spec, n, self._barrier, self.queue, self._window, self._started),
            )
            for n in range(spec.procs)
        ]
        self._deadline = time.monotonic() + spec.warmup + spec.seconds + 60
        try:
            for p in self.procs:
                p.start()
        except BaseException:
            self._join()
            raise

    def window(self, timeout: float = 60.0) -> tuple[float, float]:
        """The measured window in `time.monotonic()` (one clock for every process)."""
        if not self._started.wait(timeout):
            raise RuntimeError(f"load generator did not start within {timeout:.0f}s")
        return self._window[0], self._window[1]

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self._join()  # after an error elsewhere: no generator outlives the benchmark

    def result(self) -> Result:
        return _summary(self.spec, self.parts())

    def parts(self) -> list[dict]:
        """Each generator process's report, once the load is over."""
        try:
            return _collect(self.queue, self.procs, self._deadline)
        finally:
            self._join()

    def _join(self) -> None:
        for p in self.procs:
            if p.pid is None:
                continue  # never started
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()


def start(spec: Spec) -> Running:
    return Running(spec)


def _summary(spec: Spec, parts: list[dict]) -> Result:
    latencies = sorted(x for part in parts for x in part["latencies"])
    server = [p["server_cpu"] for p in parts if p["server_cpu"] is not None]

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    return Result(  # (only the first generator process reports the server's CPU)
        rps=sum(p["completed"] for p in parts) / spec.seconds,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        errors=sum(p["errors"] for p in parts),
        answered=sum(p["answered"] for p in parts),
        server_cpu=sum(server) / spec.seconds if server else None,
        client_cpu=sum(p["client_cpu"] for p in parts) / spec.seconds,
    )


def _collect(queue, procs, deadline: float) -> list[dict]:
    parts: list[dict] = []
    while len(parts) < len(procs):
        try:
            parts.append(queue.get(timeout=0.5))
        except Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(f"load generator failed (exit codes {failed})") from None
    return parts


def _generate(spec: Spec, proc: int, barrier, queue, shared_window, started) -> None:
    """One generator process: its share of the connections, then a report on `queue`."""
    from bench.common import cpu_seconds

    mine = range(proc, spec.connections, spec.procs)
    conns = [http.client.HTTPConnection("127.0.0.1", spec.port, timeout=30) for _ in mine]
    for conn in conns:
        conn.connect()
    barrier.wait()  # every process opened its connections: start together
    begin = time.monotonic()
    window = (begin + spec.warmup, begin + spec.warmup + spec.seconds)
    if proc == 0:
        shared_window[0], shared_window[1] = window
        started.set()
    stats = [{"latencies": [], "errors": 0, "answered": 0, "completed": 0} for _ in conns]
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
            "completed": sum(s["completed"] for s in stats),
            "client_cpu": cpu1 - cpu0,
            "server_cpu": None if server0 is None else server1 - server0,
        }
    )


def _connection(spec: Spec, tag: str, conn, window: tuple[float, float], stats: dict) -> None:
    start, end = window
    n = spec.first
    while (t0 := time.monotonic()) < end:
        body, headers = spec.body(tag, n), spec.headers
        if isinstance(body, tuple):
            body, headers = body[0], {**headers, **body[1]}
        n += 1
        try:
            conn.request("POST", spec.path, body, headers)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == spec.status
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()  # reconnects on the next request
        t1 = time.monotonic()
        stats["answered"] += ok
        stats["errors"] += not ok  # warm-up included: any error is one too many
        stats["completed"] += ok and start <= t1 <= end
        if ok and start <= t0 and t1 <= end:
            stats["latencies"].append(t1 - t0)
    conn.close()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu(spec: Spec, proc: int, cpu_seconds) -> float | None:
    pids = (spec.server_pid,) if isinstance(spec.server_pid, int) else spec.server_pid or ()
    if proc != 0 or not pids or not all(Path(f"/proc/{pid}").exists() for pid in pids):
        return None
    return sum(cpu_seconds(pid) for pid in pids)
