"""Work out a transaction before taking the write lock, then apply it with the lock held.

SQLite has one writer per database. When several processes write (gunicorn workers), each
holds that lock for its whole transaction, so the time a transaction spends in Python
(encrypting, rendering, deciding) while holding it caps the throughput of all of them together.

PostgreSQL has no such lock, but there each statement is a round trip. There, and where one
writer thread commits the requests of a process in groups, the rehearsal runs inside the write
transaction, its reads as they would be (on PostgreSQL the first with BEGIN), and its writes
are applied together, usually with their COMMIT: on PostgreSQL two round trips where a
delivery took eight, each straight through libpq (`core/libpq.py`; psycopg's own pipeline
where that cannot). Reads made there before any write need no second look, and no
statement goes through SQLAlchemy's per-execute work. What the work can assume instead of
reading (`Rehearsal.assume`), a statement checks that goes first with the writes: then the
whole transaction is one round trip.

A `Rehearsal` stands in for the connection while the unit of work runs (on SQLite without
the lock): reads go to the database and are remembered with their rows; writes are remembered,
not run.
`apply` then runs the same statements in the same order inside the write transaction. If
every read returns the rows the rehearsal saw and every insert-if-absent inserts, the work
would have issued exactly these statements had it run there, so applying them is the same as
running it under the lock. Otherwise `apply` rolls back to its savepoint and says so, and the
caller runs the work again for real.

What a rehearsal cannot predict, it refuses (`CannotRehearse`): the result of a write that the
work goes on to use (a count, RETURNING rows), and anything but reads and writes. A write that
fails on replay (a constraint) fails as it would have under the lock: the same statements on
the same state.
"""

from __future__ import annotations

import functools
import logging
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound

from txsms.core import libpq
from txsms.core.storage import INSERT_IGNORE, after_commit, driver_sql, for_driver
from txsms.core.storage import note as storage_note


class CannotRehearse(Exception):
    """The work needs something a rehearsal cannot know in advance."""


@dataclass
class _Step:
    sql: str  # as the driver takes it, compiled during the rehearsal
    params: Any
    rows: list[tuple] | None = None  # a read: the rows it returned; None: a write
    inserts: bool = False  # an insert-if-absent that must insert
    strict_sql: str | None = None  # PostgreSQL: that insert, failing where it would not
    # Run again when applied: every write, and a read unless it ran in the transaction
    # before any write was held back (then it read just what it would have).
    again: bool = True


@dataclass(frozen=True)
class _Reading:
    """How SQLAlchemy would hand back a statement's rows: named, each value converted as its
    column's type says (a SQLite boolean, a PostgreSQL numeric)."""

    row: type
    convert: tuple[Callable | None, ...]

    def __call__(self, values: tuple):
        return self.row(*(f(v) if f else v for f, v in zip(self.convert, values, strict=True)))


@functools.lru_cache(maxsize=256)
def _reading(dialect, statement, type_codes: tuple) -> _Reading:
    columns = list(statement.selected_columns)
    convert = tuple(
        column.type.dialect_impl(dialect).result_processor(dialect, code)
        for column, code in zip(columns, type_codes, strict=True)
    )
    return _Reading(namedtuple("Row", [c.key for c in columns], rename=True), convert)


class _Rows:
    """The part of SQLAlchemy's Result that a unit of work uses, over the driver's rows."""

    def __init__(self, reading: _Reading, rows: list[tuple]):
        self._rows = [reading(row) for row in rows]

    def __iter__(self):
        return iter(self._rows)

    def all(self) -> list:
        return list(self._rows)

    def first(self):
        return self._rows[0] if self._rows else None

    def one(self):
        if len(self._rows) != 1:
            raise NoResultFound if not self._rows else MultipleResultsFound
        return self._rows[0]

    def scalar(self):
        return self._rows[0][0] if self._rows else None

    def scalar_one(self):
        return self.one()[0]


class _BlindResult:
    """The result of a remembered INSERT, UPDATE or DELETE: the rehearsal cannot know it."""

    def __getattr__(self, name: str):
        raise CannotRehearse(f"the result of a write ({name}) is used")


class _Inserted:
    """What an insert-if-absent returns when it inserts: one row."""

    def first(self):
        return (True,)


@dataclass
class Rehearsal:
    """A connection stand-in that records a unit of work's statements (see the module)."""

    reader: Connection
    # Reading inside the write transaction that will apply it (PostgreSQL): its reads
    # before the first write need no second look.
    in_transaction: bool = False
    steps: list[_Step] = field(default_factory=list)
    notes: list[Callable[[], object]] = field(default_factory=list)  # see `after_commit`
    assumed: bool = False  # worked on what `assume` checks instead of reading it

    @property
    def dialect(self):
        return self.reader.dialect

    def execute(self, statement, parameters=None):
        if not (statement.is_select or statement.is_dml):
            raise CannotRehearse(f"a {type(statement).__name__} statement")
        try:
            sql, params = for_driver(self.dialect, statement, parameters)
        except ValueError as exc:
            raise CannotRehearse(str(exc)) from exc
        if statement.is_select:  # read straight from the driver too: no second compile
            rows, codes = self._read(sql, params)
            written = any(step.rows is None for step in self.steps)
            again = written or not self.in_transaction
            self.steps.append(_Step(sql, params, rows=rows, again=again))
            return _Rows(_reading(self.dialect, statement, codes), rows)
        if (strict := statement.get_execution_options().get(INSERT_IGNORE)) is not None:
            strict_sql = None
            if self.in_transaction and self.dialect.name == "postgresql":
                strict_sql = driver_sql(self.dialect, strict, parameters or {})
            self.steps.append(_Step(sql, params, inserts=True, strict_sql=strict_sql))
            return _Inserted()
        # RETURNING: its rows decide what comes next. (`_returning`, because the public
        # `exported_columns` is memoised, and a `.returning()` copy of a statement whose
        # columns were asked for keeps the old, empty answer.)
        if statement._returning:
            raise CannotRehearse(f"a {type(statement).__name__} … RETURNING")
        self.steps.append(_Step(sql, params))
        return _BlindResult()

    def assume(self, statement, parameters=None) -> None:
        """Work on without reading what `statement` checks: held back with the writes, it
        runs before them when applied, and fails (an error, not rows) where the assumption no
        longer holds, which takes the transaction back to its savepoint as a conflicting
        insert does. PostgreSQL only: SQLite converts what it cannot (a division by zero, a
        cast) to a value, never an error."""
        if not (self.in_transaction and self.dialect.name == "postgresql"):
            raise CannotRehearse("an assumption checked by an error needs PostgreSQL")
        sql, params = for_driver(self.dialect, statement, parameters)
        self.steps.append(_Step(sql, params))
        self.assumed = True

    def _read(self, sql: str, params) -> tuple[list[tuple], tuple]:
        """The rows and the columns' type codes, read at once (on SQLite a later write would
        show in rows still to be fetched). On PostgreSQL inside the transaction, BEGIN goes
        in the same round trip (`core/libpq.py`)."""
        driver = self.reader.connection.dbapi_connection
        inside = self.in_transaction and self.dialect.name == "postgresql"
        if inside and (read := libpq.read(self.reader, sql, params, begins=_opens(driver))):
            return read
        cursor = driver.execute(sql, params)
        return cursor.fetchall(), tuple(column[1] for column in cursor.description)

    def after_commit(self, action: Callable[[], object]) -> None:
        """Run `action` (a log line, a counter) once the work is applied and that commits
        (`storage.after_commit`); never for work that is run again instead."""
        self.notes.append(action)

    def flush_notes(self, conn: Connection) -> None:
        """The work is applied on `conn`: its notes go out once that commits."""
        for note in self.notes:
            after_commit(conn, note)
        self.notes.clear()


def apply(conn: Connection, rehearsals: list[Rehearsal], *, commit: bool = False) -> bool:
    """Apply `rehearsals` in order on `conn`, inside its transaction: the same statements,
    straight to the driver. False, with nothing applied, at the first read that returns other
    rows than the rehearsal saw or insert-if-absent that inserts nothing: the caller then
    works them out under the lock.

    `commit`: the caller will commit right after. On PostgreSQL, when there is nothing to
    check but the inserts (no read to compare), the COMMIT then goes in the same round trip
    (`_committed`); the caller's own commit finds nothing left to do."""
    driver = conn.connection.dbapi_connection
    steps = [step for r in rehearsals for step in r.steps if step.again]
    postgresql = conn.dialect.name == "postgresql"
    if (
        postgresql
        and commit
        and all(s.rows is None and (s.strict_sql or not s.inserts) for s in steps)
    ):
        return _committed(conn, driver, steps)
    try:
        if postgresql:
            applied = _pipelined(conn, driver, steps)
        else:
            driver.execute("SAVEPOINT rehearsal")
            applied = all(
                _as_rehearsed(s, _outcome(s, driver.execute(s.sql, s.params))) for s in steps
            )
    except conn.dialect.loaded_dbapi.Error:  # a write that fails: it fails again for real
        applied = False
    if not applied:
        _back_to_savepoint(conn, driver)
    # An applied one keeps its savepoint until the commit: no round trip more.
    return applied


def _pipelined(conn: Connection, driver, steps: list[_Step]) -> bool:
    """PostgreSQL: all the statements in one round trip, then checked. A delivery is about
    six statements, each a round trip of its own through SQLAlchemy."""
    statements = [("SAVEPOINT rehearsal", None), *((step.sql, step.params) for step in steps)]
    if (found := libpq.rows(conn, statements, begins=_opens(driver))) is not None:
        return all(_as_rehearsed(s, rows) for s, rows in zip(steps, found[1:], strict=True))
    with driver.pipeline():
        cursors = [_queued(driver, sql, params) for sql, params in statements]
    return all(_as_rehearsed(s, _outcome(s, c)) for s, c in zip(steps, cursors[1:], strict=True))


def _committed(conn: Connection, driver, steps: list[_Step]) -> bool:
    """The writes and COMMIT in one round trip. Each insert that must insert goes without its
    ON CONFLICT, so one that would insert nothing fails instead, and with it the rest: the
    COMMIT never runs, and the transaction is taken back to the savepoint, as when a check
    fails. A failing COMMIT (the connection lost) leaves no transaction to go back into:
    that is raised, as SQLAlchemy raises a failed commit (a lost connection is then an
    OperationalError, which a webhook answers 503)."""
    from psycopg.pq import TransactionStatus  # PostgreSQL only: psycopg is there

    try:
        statements = [
            ("SAVEPOINT rehearsal", None),
            *((step.strict_sql or step.sql, step.params) for step in steps),
            ("COMMIT", None),
        ]
        if not libpq.sent(conn, statements, begins=_opens(driver)):
            # One cursor for all: no result of theirs is read, and a cursor each costs 3-5 µs.
            with driver.cursor() as cursor, driver.pipeline():
                for sql, params in statements:
                    _queued(cursor, sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        if driver.info.transaction_status == TransactionStatus.INERROR:
            _back_to_savepoint(conn, driver)
            return False
        lost = conn.dialect.is_disconnect(exc, driver, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            "COMMIT", None, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=lost
        ) from exc
    return True


def _back_to_savepoint(conn: Connection, driver) -> None:
    """Undo what was applied since the savepoint. On PostgreSQL not through psycopg, which on
    seeing a ROLLBACK's answer deallocates every statement prepared on the session, those
    `libpq` prepared too."""
    sql = "ROLLBACK TO SAVEPOINT rehearsal"
    if conn.dialect.name != "postgresql" or not libpq.sent(conn, [(sql, None)], begins=False):
        driver.execute(sql)


def _queued(executor, sql: str, params=None):
    """A statement into psycopg's pipeline (through a connection or a cursor), where
    `core/libpq.py` cannot be used, prepared on the server from its first use.

    psycopg prepares a statement the sixth time it runs it, and in a pipeline it counts the
    statement as prepared without looking at the answer to that Parse. In a pipeline that
    fails at an earlier statement (an insert that finds its row) the server skips the Parse,
    and every later use of the statement fails ("prepared statement … does not exist"),
    sending each delivery on that connection down the slow path. A statement prepared on its
    first use is checked: one the server skipped is forgotten, and prepared again."""
    return executor.execute(sql, params, prepare=True)


def _opens(driver) -> bool:
    """Whether the next statement opens the transaction: nothing was read in it before (the
    work assumed what it would have read, `Rehearsal.assume`)."""
    from psycopg.pq import TransactionStatus  # PostgreSQL only: psycopg is there

    return driver.info.transaction_status == TransactionStatus.IDLE


def _outcome(step: _Step, cursor) -> list:
    """What `_as_rehearsed` needs of a cursor: the rows of a read or an insert-if-absent,
    fetched at once (on SQLite a later write would show in rows still to be fetched)."""
    return cursor.fetchall() if step.rows is not None or step.inserts else []


def _as_rehearsed(step: _Step, rows: list) -> bool:
    """The statement's outcome (`rows`, what it returned) is what the rehearsal assumed."""
    if step.rows is not None:
        return rows == step.rows
    if step.inserts:
        return bool(rows)  # an insert-if-absent returns its row when it inserts
    return True


def log(conn, logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log once `conn`'s work is committed (`storage.after_commit`); for a rehearsal, once
    its work is applied and that commits. Work that is run again must not log twice."""
    if isinstance(conn, Rehearsal):
        conn.after_commit(functools.partial(logger.log, level, msg, *args))
    else:
        storage_note(conn, logger, level, msg, *args)
