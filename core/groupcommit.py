"""Group commit: concurrent ingests share one transaction and one disk flush.

A webhook is acknowledged only after its events are committed, and on SQLite with
`synchronous = FULL` every commit waits for the disk. Instead of each request thread paying
for its own flush, requests hand their work to one writer thread, which runs whatever has
queued up in a single transaction and commits once; each caller returns when the commit that
holds its work is done. Under load the cost of a flush is shared; alone, a request pays one
thread hand-off.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
RunGroup = Callable[[Connection, list], list]


_STOP = object()


def run_each(conn: Connection, items: list) -> list:
    """The default: every item is a callable `work(conn)`."""
    return [work(conn) for work in items]


class GroupCommitter:
    def __init__(self, engine: Engine, run_group: RunGroup = run_each, max_items: int = 64):
        """`run_group(conn, items)` does the work of a whole group and returns a result per
        item; it may share look-ups across the group (ingest does)."""
        self.engine = engine
        self.run_group = run_group
        self.max_items = max_items
        self._queue: queue.SimpleQueue[tuple[object, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, item):
        """Hand `item` to the writer; return its result once the commit holding it is done."""
        return self.submit(item).result()

    def submit(self, item) -> Future:
        """Hand `item` to the writer; the future resolves once the commit holding it is done."""
        future: Future = Future()
        self._queue.put((item, future))
        self._ensure_thread()
        return future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the writer after what is queued, and release its connection."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put((_STOP, None))
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="txsms-group-commit", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        conn: Connection | None = None  # held across groups: no pool check-out per commit
        stopping = False
        while not stopping:
            group = [self._queue.get()]
            while len(group) < self.max_items:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(item is _STOP for item, _ in group):
                stopping = True
                group = [(item, future) for item, future in group if item is not _STOP]
                if not group:
                    break
            items = [item for item, _ in group]
            try:
                if conn is None or conn.closed:
                    conn = self.engine.connect()
                with conn.begin():
                    results = self.run_group(conn, items)
            except Exception:
                if conn is not None:
                    conn.close()  # a broken connection must not be reused
                    conn = None
                # One bad item must not fail the others: run each in a transaction of its own.
                for item, future in group:
                    self._alone(item, future)
                continue
            for (_, future), result in zip(group, results, strict=True):
                future.set_result(result)
        if conn is not None:
            conn.close()

    def _alone(self, item, future: Future) -> None:
        try:
            with self.engine.begin() as conn:
                [result] = self.run_group(conn, [item])
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
