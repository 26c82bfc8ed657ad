"""End to end: from an event accepted (the 202 of `POST /api/v1/events` on `txsms serve`) to its
provider request arriving at the fake Twilio. The fake runs in this process, so both ends are
read on one clock (`time.monotonic()`); `provider.rate_per_second` is high enough never to
throttle. Idle: one event at a time, spaced 50 ms. Under load: the same probes while the ingest
benchmark's load runs against the same server.
"""

from __future__ import annotations

import http.client
import json
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import ingest, load
from bench.common import TXSMS, database, free_port, start, stop, wait_http
from bench.fake_provider import FakeTwilio, provider_section

SPACING = 0.05
IDLE_EVENTS = 200
RATE = 100000  # provider.rate_per_second: never the limit here
NUMBER = re.compile(r"#(P[il]\d{5})\b")


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    events: int
    errors: int  # probes not accepted, or never sent within the deadline


def run(args, tmp: Path, kind: str) -> tuple[Latency, Latency, load.Result]:
    """(idle, under load, the load's own result) against one `txsms serve` on `kind`."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the fake's threads share this process: switch often
    try:
        with ExitStack() as stack:
            fake = stack.enter_context(FakeTwilio())
            url = stack.enter_context(database(kind, tmp))
            port, log = free_port(), tmp / f"latency-{kind}.log"
            provider = provider_section(fake.url, rate_per_second=RATE)
            config = ingest.serve_config(tmp, port, url, provider)
            proc = start([TXSMS, "serve", "--config", str(config)], log)
            stack.callback(stop, proc)
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            stack.callback(conn.close)

            first = time.monotonic() + 0.1
            idle = _probe(conn, fake, "i", [first + n * SPACING for n in range(IDLE_EVENTS)])
            with load.start(ingest.spec(port, 202, proc.pid, args)) as running:
                begin, end = running.window()
                slots = [begin + n * SPACING for n in range(int((end - begin) / SPACING))]
                loaded = _probe(conn, fake, "l", slots, wait=False)
                result = running.result()
            return idle, _arrivals(fake, *loaded), result
    finally:
        sys.setswitchinterval(interval)


def _probe(conn, fake, tag: str, slots: list[float], wait: bool = True):
    """One event per slot (later if the previous answer came late); when each was accepted."""
    accepted: dict[str, float] = {}
    errors = 0
    for n, slot in enumerate(slots):
        time.sleep(max(0.0, slot - time.monotonic()))  # pacing the probes, not readiness
        number = f"P{tag}{n:05d}"
        event = {
            "kind": "order.created",
            "key": f"order:{number}:created",
            "recipient": {"phone": ingest.PHONES[n % len(ingest.PHONES)], "name": "Ada"},
            "data": {"order": {"number": f"#{number}", "total": "$25.00"}},
        }
        try:
            conn.request("POST", "/api/v1/events", json.dumps(event).encode(), ingest.HEADERS)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            errors += 1
            continue
        if resp.status == 202:
            accepted[number] = time.monotonic()
        else:
            errors += 1
    return _arrivals(fake, accepted, errors) if wait else (accepted, errors)


def _arrivals(fake, accepted: dict[str, float], errors: int, timeout: float = 300) -> Latency:
    """Wait (with a deadline) for every accepted probe to reach the fake; the latencies."""
    deadline = time.monotonic() + timeout
    while True:
        arrived: dict[str, float] = {}
        for req in fake.requests:
            match = NUMBER.search(req.form.get("Body", ""))
            if match and match.group(1) in accepted:
                arrived.setdefault(match.group(1), req.at)
        if len(arrived) == len(accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    ms = sorted((arrived[k] - accepted[k]) * 1000 for k in arrived)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    return Latency(pct(0.5), pct(0.99), len(accepted), errors + len(accepted) - len(arrived))
