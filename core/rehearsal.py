"""Work out a transaction before taking the write lock, then apply it with the lock held.

SQLite has one writer per database. When several processes write (gunicorn workers), each
holds that lock for its whole transaction, so the time a transaction spends in Python
(encrypting, rendering, deciding) while holding it caps the throughput of all of them together.

A `Rehearsal` stands in for the connection while the unit of work runs without the lock:
reads go to the database and are remembered with their rows; writes are remembered, not run.
`replay` then runs the same statements in the same order inside the write transaction. If
every read returns the rows the rehearsal saw and every insert-if-absent inserts, the work
would have issued exactly these statements had it run there, so applying them is the same as
running it under the lock. Otherwise `replay` says so, and the caller rolls back to a savepoint
and runs the work again for real.

What a rehearsal cannot predict, it refuses (`CannotRehearse`): the result of a write that the
work goes on to use (a count, RETURNING rows), and anything but reads and writes. A write that
fails on replay (a constraint) fails as it would have under the lock: the same statements on
the same state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

#: Statement option set by `storage.insert_ignore`: an INSERT … ON CONFLICT DO NOTHING
#: RETURNING whose one row says the insert happened.
INSERT_IGNORE = "txsms_insert_ignore"


class CannotRehearse(Exception):
    """The work needs something a rehearsal cannot know in advance."""


@dataclass
class _Step:
    statement: Any
    params: Any
    rows: list | None = None  # a read: the rows it returned; None: a write
    inserts: bool = False  # an insert-if-absent that must insert


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
    steps: list[_Step] = field(default_factory=list)
    notes: list[tuple[logging.Logger, int, str, tuple]] = field(default_factory=list)

    @property
    def dialect(self):
        return self.reader.dialect

    def execute(self, statement, parameters=None):
        if statement.is_select:
            result = self.reader.execute(statement, parameters).freeze()
            self.steps.append(_Step(statement, parameters, rows=list(result.data)))
            return result()
        if statement.get_execution_options().get(INSERT_IGNORE):
            self.steps.append(_Step(statement, parameters, inserts=True))
            return _Inserted()
        if not statement.is_dml:
            raise CannotRehearse(f"a {type(statement).__name__} statement")
        # RETURNING: its rows decide what comes next. (`_returning`, because the public
        # `exported_columns` is memoised, and a `.returning()` copy of a statement whose
        # columns were asked for keeps the old, empty answer.)
        if statement._returning:
            raise CannotRehearse(f"a {type(statement).__name__} … RETURNING")
        self.steps.append(_Step(statement, parameters))
        return _BlindResult()

    def log(self, logger: logging.Logger, level: int, msg: str, *args) -> None:
        """Log once the work is applied: a rehearsal that is run again must not log twice."""
        self.notes.append((logger, level, msg, args))

    def replay(self, conn: Connection) -> bool:
        """Apply the recorded statements on `conn` (inside its transaction). False at the first
        difference from the rehearsal: the caller must then undo what was applied."""
        for step in self.steps:
            result = conn.execute(step.statement, step.params)
            if step.rows is not None:
                if result.all() != step.rows:
                    return False
            elif step.inserts and result.first() is None:
                return False
        return True

    def flush_notes(self) -> None:
        for logger, level, msg, args in self.notes:
            logger.log(level, msg, *args)
        self.notes.clear()


def log(conn, logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log now, or, while `conn` is a rehearsal, once its work is applied."""
    if isinstance(conn, Rehearsal):
        conn.log(logger, level, msg, *args)
    else:
        logger.log(level, msg, *args)
