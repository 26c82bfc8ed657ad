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
HELD_FOR = 365 * 86400.0  # seconds ahead that held messages are scheduled


@dataclass(frozen=True)
class Result:
    count: int  # messages accepted by the fake
    seconds: float
    errors: int  # messages not accepted by the fake

    @property
    def rate(self) -> float:  # messages/s
        return self.count / self.seconds

    def __add__(self, other: Result) -> Result:
        """Two runs as one: their messages over their time."""
        return Result(
            self.count + other.count, self.seconds + other.seconds, self.errors + other.errors
        )


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


def fill(rt, count: int, start: int = 0, *, held: bool = False) -> None:
    """Queue `count` order messages (orders `start`, `start` + 1, …) through the real ingest
    pipeline; `held`: scheduled a year ahead, so a running worker leaves them until
    `release`. There must be no other pending (or held) messages."""
    from txsms.core.events import Event, Recipient
    from txsms.core.pipeline import ingest

    end = start + count
    send_at = time.time() + HELD_FOR if held else None
    for first in range(start, end, BATCH):
        batch = [
            Event(
                source="api",
                kind="order.created",
                key=f"order:{n}:created",
                recipient=Recipient(phone=PHONES[n % len(PHONES)], name="Ada"),
                data={"order": {"number": f"#{n}", "total": "$25.00"}},
                send_at=send_at,
            )
            for n in range(first, min(end, first + BATCH))
        ]
        ingest(rt, batch)
    status = "deferred" if held else "pending"
    if (queued := count_status(rt.engine, status)) != count:
        raise RuntimeError(f"expected {count} {status} messages, got {queued}")


def release(rt) -> float:
    """Make the held messages due now and wake the workers; the time they were released."""
    from txsms.core.storage import messages

    with rt.engine.begin() as conn:
        released = time.time()
        # Setting the status fires the NOTIFY trigger that wakes workers in other processes.
        conn.execute(
            messages.update()
            .where(messages.c.status == "deferred")
            .values(send_at=released, status="pending")
        )
    rt.wakeup.notify()  # and those of this process
    return released


def forms(rt) -> list[dict[str, str]]:
    """The form bodies the worker will send (minus the one-time footer): those waiting."""
    from txsms.core.storage import messages

    waiting = messages.c.status.in_(("pending", "deferred"))
    query = select(messages.c.to_enc, messages.c.body_enc).where(waiting)
    with rt.engine.connect() as conn:
        rows = conn.execute(query).all()
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
    return Result(len(bodies) - sum(errors), elapsed, sum(errors))


class Sender:
    """A Worker running in this process (`with Sender(rt, concurrency) as sender:`), idle
    until `sender.run` releases the held messages."""

    def __init__(self, rt, concurrency: int):
        from sqlalchemy import create_engine

        from txsms.core.worker import Worker

        self.rt = rt
        self.worker = Worker(rt, concurrency=concurrency)
        # A plain engine to watch progress: the runtime's SQLite engine takes the write lock
        # on every transaction (BEGIN IMMEDIATE), and the watcher must not compete with the
        # worker.
        self.watcher = create_engine(rt.engine.url)

    def __enter__(self) -> Sender:
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.watcher.dispose()

    def run(self, count: int, timeout: float = 300.0) -> Result:
        """Release the `count` held messages; the time until the last one was recorded."""
        already = count_status(self.watcher, "sent")  # by the runs before
        started = release(self.rt)
        last = drained(self.watcher, timeout)
        sent = count_status(self.watcher, "sent") - already
        return Result(sent, last - started, count - sent)


def drained(engine, timeout: float = 300.0) -> float:
    """Wait until no message is pending or being sent (or `timeout` seconds); when the last
    result was recorded. Rates are taken from that `finished_at`, not from this polling."""
    from txsms.core.storage import messages

    deadline = time.monotonic() + timeout
    while count_status(engine, "pending", "sending") and time.monotonic() < deadline:
        time.sleep(0.05)
    with engine.connect() as conn:
        return conn.execute(select(func.max(messages.c.finished_at))).scalar_one()


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
