"""Group commit: concurrent ingests share one transaction and one disk flush.

A webhook is acknowledged only after its events are committed, and on SQLite with
`synchronous = FULL` every commit waits for the disk. Instead of each request thread paying
for its own flush, requests hand their work to one writer thread, which runs whatever has
queued up in a single transaction and commits once; each caller returns when the commit that
holds its work is done. Under load the cost of a flush is shared.

In a process whose callers never overlap (a sync gunicorn worker serves one request at a
time) there is nothing to share, and the hand-off to the writer thread and back cost about a
tenth of a delivery's CPU; there each caller writes its own work on its own thread. The first
caller that finds another one writing starts the writer thread, and from then on every
caller hands its work over: under a threaded server's load, writing alone whenever the writer
happened to be idle made the commits alternate between a lone request and the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection, Engine

from txsms.core.storage import forgets_after_fork, inherited, run_transaction, transaction

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
        # Held by whoever writes (the writer thread or a caller writing its own work), and
        # guarding the one connection they share: no pool check-out per commit.
        self._writing = threading.Lock()
        self._conn: Connection | None = None
        forgets_after_fork(self)

    def forget_inherited(self) -> None:
        """In a forked child (`storage.forgets_after_fork`): the parent's connection and
        queue stay behind, and the writer thread did not come along."""
        inherited(self._conn, self._queue)
        self._queue = queue.SimpleQueue()
        self._lock, self._writing = threading.Lock(), threading.Lock()
        self._thread, self._conn = None, None

    def run(self, item):
        """Return `item`'s result once the commit holding it is done: written on this thread
        while callers have never overlapped, else handed to the writer thread."""
        if self._thread is None and self._writing.acquire(blocking=False):
            try:
                try:
                    [result] = self._commit([item])
                except Exception:
                    self._discard()
                    result = self._alone(item)
            finally:
                self._writing.release()
            return result
        return self.submit(item).result()

    @property
    def grouping(self) -> bool:
        """Callers have overlapped: their items are written together by the writer thread."""
        return self._thread is not None

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
        if self._writing.acquire(timeout=timeout):  # callers may have written without it
            try:
                self._discard()
            finally:
                self._writing.release()

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="txsms-group-commit", daemon=True
                )
                self._thread.start()

    def _commit(self, items: list) -> list:
        """Run `items` in one transaction and commit; the caller holds `_writing`."""
        with transaction(self._begin) as conn:  # the notes of a failed group are dropped
            return self.run_group(conn, items)

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A transaction on the held connection (a fresh one after `_discard`)."""
        if self._conn is None or self._conn.closed:
            self._conn = self.engine.connect()
        with self._conn.begin():
            yield self._conn

    def _discard(self) -> None:
        """After a failure: a broken connection must not be reused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            group = [self._queue.get()]
            with self._writing:
                # What queued up while a caller was writing joins this group.
                while len(group) < self.max_items:
                    try:
                        group.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if any(item is _STOP for item, _ in group):
                    stopping = True
                    group = [(item, future) for item, future in group if item is not _STOP]
                try:
                    results = self._commit([item for item, _ in group]) if group else []
                except Exception:
                    self._discard()
                    # One bad item must not fail the others: each in a transaction of its own.
                    for item, future in group:
                        try:
                            future.set_result(self._alone(item))
                        except Exception as exc:
                            future.set_exception(exc)
                    continue
            for (_, future), result in zip(group, results, strict=True):
                future.set_result(result)
        with self._writing:
            self._discard()

    def _alone(self, item):
        """`item` again, in a transaction of its own on a fresh connection: after a failed
        group (a deadlock with another process's group, say: run again until it passes), or
        a held connection that died between commits."""
        [result] = run_transaction(self.engine.begin, lambda conn: self.run_group(conn, [item]))
        return result
