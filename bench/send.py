"""Send: messages/s from one Worker to the fake Twilio, against a bare requests.Session loop
POSTing the same form bodies to the same fake. The worker runs in this process; the fake in its
own, so only the sender's CPU is measured here."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy import func, select

from bench.common import security_section
from bench.fake_provider import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, provider_section
from bench.ingest import PHONES

BATCH = 100


@dataclass(frozen=True)
class Result:
    rate: float  # messages/s
    errors: int  # messages not accepted by the fake


def runtime(db_url: str, fake_url: str, tmp: Path):
    from txsms.core.config import config_from_mapping
    from txsms.core.runtime import Runtime

    config = config_from_mapping(
        {
            "storage": {"url": db_url, "data_dir": str(tmp / "data")},
            "security": security_section(),
            "sender": {"name": "Bench Shop", "default_region": "US", "timezone": "UTC"},
            "provider": provider_section(fake_url, rate_per_second=100000),
        },
        file=str(tmp / "send.toml"),
    )
    return Runtime(config)


def fill(rt, count: int) -> None:
    """Queue `count` order messages through the real ingest pipeline."""
    from txsms.core.events import Event, Recipient
    from txsms.core.pipeline import ingest

    for first in range(0, count, BATCH):
        batch = [
            Event(
                source="api",
                kind="order.created",
                key=f"order:{n}:created",
                recipient=Recipient(phone=PHONES[n % len(PHONES)], name="Ada"),
                data={"order": {"number": f"#{n}", "total": "$25.00"}},
            )
            for n in range(first, min(count, first + BATCH))
        ]
        ingest(rt, batch)
    if (pending := count_status(rt.engine, "pending")) != count:
        raise RuntimeError(f"expected {count} pending messages, got {pending}")


def forms(rt) -> list[dict[str, str]]:
    """The form bodies the worker will send (minus the one-time footer)."""
    from txsms.core.storage import messages

    with rt.engine.connect() as conn:
        rows = conn.execute(select(messages.c.to_enc, messages.c.body_enc)).all()
    return [
        {
            "To": rt.vault.decrypt(r.to_enc),
            "Body": rt.vault.decrypt(r.body_enc),
            "From": FROM_NUMBER,
        }
        for r in rows
    ]


def bare(fake_url: str, bodies: list[dict[str, str]], threads: int = 1) -> Result:
    """POST `bodies` from `threads` loops, each with a `requests.Session` of its own."""
    url = f"{fake_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    errors = [0] * threads

    def loop(n: int) -> None:
        with requests.Session() as session:
            session.auth = (ACCOUNT_SID, AUTH_TOKEN)
            session.headers.update({"User-Agent": "txsms/0.1", "Accept": "application/json"})
            for form in bodies[n::threads]:
                resp = session.post(url, data=form, timeout=(5, 10), allow_redirects=False)
                errors[n] += resp.status_code != 201 or not resp.json().get("sid")

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    elapsed = time.perf_counter() - started
    return Result(len(bodies) / elapsed, sum(errors))


def worker(rt, concurrency: int, count: int, timeout: float = 300.0) -> Result:
    """Start a Worker on `count` pending messages; the time until the last one was recorded."""
    from sqlalchemy import create_engine

    from txsms.core.storage import messages
    from txsms.core.worker import Worker

    # A plain engine to watch progress: the runtime's SQLite engine takes the write lock on
    # every transaction (BEGIN IMMEDIATE), and the watcher must not compete with the worker.
    watcher = create_engine(rt.engine.url)
    w = Worker(rt, concurrency=concurrency)
    started = time.time()
    w.start()
    try:
        deadline = time.monotonic() + timeout
        while count_status(watcher, "pending", "sending") and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for the end; the rate is taken from `finished_at`
    finally:
        w.stop()
    with watcher.connect() as conn:
        last = conn.execute(select(func.max(messages.c.finished_at))).scalar_one()
    sent = count_status(watcher, "sent")
    watcher.dispose()
    return Result(sent / (last - started), count - sent)


def count_status(engine, *statuses: str) -> int:
    from txsms.core.storage import messages

    query = select(func.count()).select_from(messages).where(messages.c.status.in_(statuses))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def production_logging(log: Path) -> None:
    """INFO with the scrubbing filter, as `txsms serve` and `txsms worker` log, into a file."""
    from txsms.core.logs import setup_logging

    setup_logging("INFO")
    handler = logging.getLogger().handlers[0]
    handler.setStream(open(log, "a"))  # noqa: SIM115 - lives as long as the process
