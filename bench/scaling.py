"""Send scaling on PostgreSQL: messages/s from N `txsms worker --concurrency 2` processes (the
README's scale-out) to the fake Twilio answering in `DELAY`, against two bare
`requests.Session` loops (a worker's two threads) POSTing the same form bodies to the same fake,
measured just before on the same queue.

The fake answers after a delay, as a provider's API does, so that a worker is held up by the
provider and not by this machine's two cores, which the fake and PostgreSQL share with the
workers: with an instant fake one worker already keeps the machine busy, and a second cannot
show whether workers get in each other's way (claims, the shared rate row, NOTIFY).

The messages are queued through the real pipeline and held (scheduled a year ahead) while the
workers start; one UPDATE (and NOTIFY) releases them all (`send.release`), and the rate runs
from that moment to the last recorded result.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import send
from bench.common import TXSMS, cpu_seconds, database, security_section, start, stop, toml, wait_log
from bench.fake_provider import provider_section

DELAY = 0.02  # seconds the fake takes to answer (a real provider takes 100-300 ms)
THREADS = 2  # txsms worker --concurrency, and the bare loops beside it
POLL = 0.1  # worker.poll_seconds: the fallback should LISTEN not be connected yet


@dataclass(frozen=True)
class Result:
    rate: float  # messages/s, all processes together
    errors: int  # messages not sent
    cpu: float  # cores the worker processes kept busy meanwhile
    bare: send.Result  # the bare loop measured just before


def run(args, tmp: Path, fake_url: str, processes: int) -> Result:
    with database("postgresql", tmp) as url:
        rt = send.runtime(url, fake_url, tmp)
        try:
            send.fill(rt, args.messages, held=True)
            bare = send.bare(fake_url, send.forms(rt), threads=THREADS)
            return _workers(rt, url, fake_url, tmp, processes, args.messages, bare)
        finally:
            rt.close()


def _workers(rt, url, fake_url, tmp, processes, count, bare) -> Result:
    config = tmp / f"scaling-{processes}.toml"
    config.write_text(
        toml(
            {
                "storage": {"url": url, "data_dir": str(tmp / "data")},
                "security": security_section(),
                "sender": {"name": "Bench Shop", "default_region": "US", "timezone": "UTC"},
                "provider": provider_section(fake_url, rate_per_second=100000),
                "worker": {"poll_seconds": POLL},
            }
        )
    )
    env = {**os.environ, "TXSMS_CONFIG": str(config)}
    with ExitStack() as stack:
        procs = []
        for n in range(processes):
            log = tmp / f"scaling-{processes}-{n}.log"
            proc = start([TXSMS, "worker", "--concurrency", str(THREADS)], log, env=env)
            stack.callback(stop, proc)
            procs.append((proc, log))
        for proc, log in procs:
            wait_log(log, "running with", proc)
        cpu0 = sum(cpu_seconds(p.pid) for p, _ in procs)
        started = send.release(rt)
        last = send.drained(rt.engine)
        wall = time.time() - started
        cpu = (sum(cpu_seconds(p.pid) for p, _ in procs) - cpu0) / wall
    sent = send.count_status(rt.engine, "sent")
    return Result(sent / (last - started), count - sent, cpu, bare)
