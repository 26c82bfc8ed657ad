"""Waking idle workers: LISTEN/NOTIFY on PostgreSQL, an in-process signal otherwise.

Receivers and workers may be different processes on different hosts. On PostgreSQL a trigger
on `messages` NOTIFYs `txsms_outbox` whenever a row becomes pending or deferred (delivered only
if the transaction commits; migration 0002) while some worker is waiting for work (`Waiting`,
migration 0006), and each worker process LISTENs and wakes at once; the poll
(`worker.poll_seconds`) stays as the fallback for anything missed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy import Connection, Engine, bindparam, func
from sqlalchemy.dialects.postgresql import insert

from txsms.core.storage import outbox_waiters

log = logging.getLogger(__name__)

CHANNEL = "txsms_outbox"

# How long a waiting process's row lasts unless renewed, at least (a worker that polls seldom
# keeps it for three polls): a killed worker's row stops the NOTIFYs this long after it died.
WAITING_SECONDS = 10.0


class Waiting:
    """Whether a thread of this worker process waits for work, as the database knows it.

    A NOTIFY is not free: PostgreSQL serializes the commits of the transactions that send one
    (a lock held through the commit's flush), and under load every ingest sent one to workers
    that were busy anyway. So the process keeps a row in `outbox_waiters` while one of its
    threads waits, and the trigger notifies only then. A thread that found nothing calls
    `enter()`; if that wrote the row, the thread looks for work once more before it sleeps,
    for what committed before the row and so sent no NOTIFY. It calls `leave()` as soon as it
    claims something, and `renew()` after each sleep.

    What can still slip through: a transaction that checked for the row just before it was
    written and committed just after that last look. It waits for the poll.
    """

    def __init__(
        self,
        autocommit: Callable[[], AbstractContextManager[Connection]],
        worker: str,
        seconds: float = WAITING_SECONDS,
    ):
        self._autocommit = autocommit
        self._params = {"worker": worker, "seconds": seconds}
        self._lock = threading.Lock()
        self._thread = threading.local()  # .waiting
        self._waiting = 0  # threads of this process
        self._renew_at: float | None = None  # (monotonic) while the row is there

    def enter(self) -> bool:
        """This thread waits. True: it wrote the row (and must look once more)."""
        with self._lock:
            if not getattr(self._thread, "waiting", False):
                self._thread.waiting = True
                self._waiting += 1
            return self._write()

    def renew(self) -> bool:
        """Keep the row while threads wait (written again if it was lost or is running out)."""
        with self._lock:
            return self._write()

    def leave(self) -> None:
        """This thread has work (nothing if it was not waiting); with the last one the row goes."""
        with self._lock:
            if not getattr(self._thread, "waiting", False):
                return
            self._thread.waiting = False
            self._waiting -= 1
            if not self._waiting and self._renew_at is not None:
                self._renew_at = None  # written again by the next enter() if this fails
                with self._autocommit() as conn:
                    conn.execute(_GONE, self._params)

    def _write(self) -> bool:
        if not self._waiting or (self._renew_at is not None and time.monotonic() < self._renew_at):
            return False
        with self._autocommit() as conn:
            conn.execute(_HERE, self._params)
        self._renew_at = time.monotonic() + self._params["seconds"] / 2
        return True


# Both on PostgreSQL's clock, as the trigger's check is: hosts' clocks may differ.
_here = insert(outbox_waiters).values(
    worker=bindparam("worker"),
    until=func.extract("epoch", func.now()) + bindparam("seconds"),
)
_HERE = _here.on_conflict_do_update(
    index_elements=[outbox_waiters.c.worker], set_={"until": _here.excluded.until}
)
_GONE = outbox_waiters.delete().where(outbox_waiters.c.worker == bindparam("worker"))


class PgListener:
    """A thread holding one LISTEN connection; calls `wake()` on every notification."""

    def __init__(self, engine: Engine, wake):
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self.wake = wake
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="txsms-listen", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)

    def _run(self) -> None:
        import psycopg

        while not self.stop_event.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self.stop_event.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=100):
                            self.wake()
            except Exception as exc:  # the poll still runs; reconnect shortly
                log.warning(
                    "LISTEN %s failed (%s); polling until it is back", CHANNEL, type(exc).__name__
                )
                self.stop_event.wait(2.0)
