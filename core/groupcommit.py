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
Work = Callable[[Connection], object]


class GroupCommitter:
    def __init__(self, engine: Engine, max_items: int = 64):
        self.engine = engine
        self.max_items = max_items
        self._queue: queue.SimpleQueue[tuple[Work, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work(conn)` in a shared transaction; return its result once committed."""
        future: Future = Future()
        self._queue.put((work, future))
        self._ensure_thread()
        return future.result()

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
        while True:
            items = [self._queue.get()]
            while len(items) < self.max_items:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                with self.engine.begin() as conn:
                    results = [work(conn) for work, _ in items]
            except Exception:
                # One bad item must not fail the others: run each in a transaction of its own.
                for work, future in items:
                    self._alone(work, future)
                continue
            for (_, future), result in zip(items, results, strict=True):
                future.set_result(result)

    def _alone(self, work: Work, future: Future) -> None:
        try:
            with self.engine.begin() as conn:
                result = work(conn)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
