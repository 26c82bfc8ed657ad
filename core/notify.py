"""Waking idle workers: LISTEN/NOTIFY on PostgreSQL, an in-process signal otherwise.

Receivers and workers may be different processes on different hosts. On PostgreSQL a trigger
on `messages` NOTIFYs `txsms_outbox` whenever a row becomes pending or deferred (delivered only
if the transaction commits; migration 0002), and each worker process LISTENs and wakes at once;
the poll (`worker.poll_seconds`) stays as the fallback for anything missed.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

log = logging.getLogger(__name__)

CHANNEL = "txsms_outbox"


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
