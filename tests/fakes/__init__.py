"""Test doubles that speak real protocols over real sockets, and a polling helper.

`tests/` has no `__init__.py`, so pytest puts `tests/` itself on sys.path: import these as
`from fakes import wait_until` and `from fakes.twilio import FakeTwilio`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.exc import OperationalError

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail at the deadline.

    For "eventually" assertions without bare sleeps. Raises AssertionError naming the predicate.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"wait_until: {name} still false after {timeout}s")
        time.sleep(interval)


@contextmanager
def statements_run(engine: Engine) -> Iterator[list[tuple[str, object]]]:
    """The (SQL, parameters) sent through `engine`'s cursors while the block runs (what
    SQLAlchemy executes: statements sent straight to the driver are not seen)."""
    seen: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, _executemany) -> None:
        seen.append((statement, parameters))

    sqlalchemy_event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sqlalchemy_event.remove(engine, "before_cursor_execute", record)


def query_plan(conn, sql: str, params) -> str:
    """How the database would run `sql` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL,
    with sequential scans off there: a test's few rows are not what an index is judged by).
    Off for `conn`'s transaction only, not for the pooled connection's later users."""
    if conn.dialect.name == "sqlite":
        return " ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))


class _DeadlockDetected(Exception):
    sqlstate = "40P01"  # as psycopg's DeadlockDetected carries it


def deadlock(statement: str = "UPDATE recipients ...") -> OperationalError:
    """The error SQLAlchemy raises when PostgreSQL aborts a transaction as a deadlock victim
    (without needing psycopg installed)."""
    return OperationalError(statement, {}, _DeadlockDetected())


def notifications_until(listener, engine: Engine, channel: str, sentinel: str) -> list[str]:
    """The payloads `listener` (a psycopg connection LISTENing on `channel`) received up to a
    NOTIFY of `sentinel` sent through `engine` after everything before it committed: what
    arrived, with no waiting on a timeout to tell that nothing else will."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"NOTIFY {channel}, '{sentinel}'")
    seen = []
    for note in listener.notifies(timeout=10):
        if note.payload == sentinel:
            return seen
        seen.append(note.payload)
    raise AssertionError(f"{sentinel} never arrived")


__all__ = ["deadlock", "notifications_until", "query_plan", "statements_run", "wait_until"]
