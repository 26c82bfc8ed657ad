"""Storage: the tables (SQLAlchemy Core), the engine, and migrations.

Times are stored as UTC epoch seconds (floats): they compare and index the same way on SQLite
and PostgreSQL, and the worker's claim query is a plain `send_at <= :now`.
Columns ending in `_enc` hold MultiFernet tokens; `phone_index` holds the keyed blind index.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    ARRAY,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    make_url,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from txsms.core.config import StorageConfig
from txsms.core.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: writers wait by trying again, and FULL flushes inside COMMIT
    fcntl = None

log = logging.getLogger(__name__)

metadata = MetaData()


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, for both dialects."""
    return {"sqlite_where": text(condition), "postgresql_where": text(condition)}


events = Table(
    "events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("source", String(200), nullable=False),
    Column("key", String(300), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("phone_index", String(64), index=True),
    # Recipient + data, for a data request's export; dropped after `security.retention_days`.
    Column("payload_enc", LargeBinary),
    Column("order_ref", String(200)),
    Column("occurred_at", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("source", "key", name="uq_events_source_key"),
    Index("ix_events_source_order", "source", "order_ref"),
    # Only the payloads still kept (`retention.purge`): the housekeeping finds the old ones
    # without reading the whole history every few seconds.
    Index("ix_events_payload_kept", "received_at", **_where("payload_enc IS NOT NULL")),
)

#: Messages a worker claims once their `send_at` has come. Literal in the SQL, so that both
#: databases can use the partial index `ix_messages_due` (with a bound value they cannot).
DUE = text("status IN ('pending', 'deferred')")
#: Percent of each PostgreSQL page of `messages` filled by inserts (see the table).
MESSAGES_FILLFACTOR = 70

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("event_id", String(32)),
    Column("source", String(200), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("idempotency_key", String(600), nullable=False, unique=True),
    Column("order_ref", String(200)),
    Column("phone_index", String(64)),
    Column("to_enc", LargeBinary),
    Column("body_enc", LargeBinary),
    Column("locale", String(20)),
    Column("category", String(20)),
    Column("urgent", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(64)),
    Column("encoding", String(8)),
    Column("segments", Integer),
    Column("attempts", Integer, nullable=False, default=0),
    Column("send_at", Float, nullable=False),
    Column("expires_at", Float),  # not sent after this (see Event.expires_at)
    Column("lease_until", Float),
    Column("claimed_by", String(64)),
    # Set and committed just before the provider request: after a crash it tells
    # "never sent, safe to retry" from "may have reached the provider" (unknown).
    Column("in_flight", Boolean, nullable=False, default=False),
    Column("provider", String(20)),
    Column("provider_message_id", String(64)),
    Column("provider_status", String(32)),
    Column("error_code", String(32)),
    Column("error_text", String(500)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("sent_at", Float),
    Column("finished_at", Float),
    Index("ix_messages_status_send_at", "status", "send_at"),
    # The queue in the order it is claimed, and nothing else (see `outbox.claim`): a claim
    # reads its batch off the front and stops, however many messages wait behind it.
    Index("ix_messages_due", "send_at", sqlite_where=DUE, postgresql_where=DUE),
    Index("ix_messages_phone_created", "phone_index", "created_at"),
    Index("ix_messages_source_order", "source", "order_ref"),
    # Receipts find their message by the provider's id, which a message has only once sent:
    # the queued ones stay out of the index (one B-tree fewer for every message ingested).
    Index(
        "ix_messages_provider_message_id",
        "provider_message_id",
        **_where("provider_message_id IS NOT NULL"),
    ),
    # The bodies still kept of finished messages, by when they finished (`retention.purge`);
    # a message enters it when it finishes, not when it is queued.
    Index(
        "ix_messages_body_kept",
        "finished_at",
        **_where("body_enc IS NOT NULL AND finished_at IS NOT NULL"),
    ),
    # Room on every page for a row's next versions (migration 0005): a message is updated
    # three times, and marking it in flight then touches no index (a heap-only update).
    postgresql_with={"fillfactor": MESSAGES_FILLFACTOR},
)

recipients = Table(
    "recipients",
    metadata,
    Column("phone_index", String(64), primary_key=True),
    Column("phone_enc", LargeBinary),
    Column("region", String(8)),
    Column("zones", String(400)),  # space-separated IANA zones; empty: unknown
    Column("invalid_reason", String(64)),  # set by permanent handset errors
    Column("footer_sent_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

consent_ledger = Table(
    "consent_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("phone_index", String(64), nullable=False, index=True),
    Column("scope", String(20), nullable=False),  # "all" | "marketing"
    Column("action", String(16), nullable=False),  # "opt_out" | "opt_in"
    Column("source", String(200), nullable=False),
    Column("evidence_enc", LargeBinary),
    Column("created_at", Float, nullable=False),
)

preferences = Table(
    "preferences",
    metadata,
    Column("phone_index", String(64), primary_key=True),
    Column("category", String(20), primary_key=True),
    Column("enabled", Boolean, nullable=False),
    Column("updated_at", Float, nullable=False),
)

provider_callbacks = Table(
    "provider_callbacks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("provider", String(20), nullable=False),
    Column("kind", String(16), nullable=False),  # "status" | "inbound"
    Column("provider_message_id", String(64), index=True),
    Column("status", String(32)),
    Column("payload_enc", LargeBinary),
    Column("received_at", Float, nullable=False),
    Column("applied_at", Float),
    # Receipts that came before their message was sent, looked for by every housekeeping
    # round (`returnpath.apply_early_receipts`): only these, not every receipt ever applied.
    Index("ix_provider_callbacks_unapplied", "id", **_where("applied_at IS NULL")),
)

cursors = Table(
    "cursors",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

order_context = Table(
    "order_context",
    metadata,
    Column("source", String(200), primary_key=True),
    Column("order_ref", String(200), primary_key=True),
    Column("phone_index", String(64), index=True),
    Column("context_enc", LargeBinary),  # recipient and template data for later deliveries
    Column("last_status", String(40)),
    Column("last_modified", Float),
    Column("updated_at", Float, nullable=False),
)


deliveries = Table(
    "deliveries",
    metadata,
    # A platform's own delivery id (Shopify X-Shopify-Event-Id): a redelivery is answered
    # at once, before any translation.
    Column("source", String(200), primary_key=True),
    Column("delivery_id", String(200), primary_key=True),
    Column("received_at", Float, nullable=False, index=True),
)

sources = Table(
    "sources",
    metadata,
    Column("source", String(200), primary_key=True),
    Column("disabled_at", Float),  # set: nothing from this source is sent
    Column("reason", String(64)),
    Column("updated_at", Float, nullable=False),
)


rate_limits = Table(
    "rate_limits",
    metadata,
    # The earliest time the next provider request may start (see core/ratelimit.py).
    Column("name", String(100), primary_key=True),
    Column("next_at", Float, nullable=False),
)


outbox_waiters = Table(
    "outbox_waiters",
    metadata,
    # A worker process with a thread waiting for work, until when (PostgreSQL's clock): the
    # outbox trigger NOTIFYs only while one is here (core/notify.py, migration 0006).
    Column("worker", String(200), primary_key=True),
    Column("until", Float, nullable=False),
)


def make_engine(storage: StorageConfig, *, relaxed: bool = False, **kwargs) -> Engine:
    """The engine for `storage`. `relaxed`: commits survive a crash of this process but may be
    lost on power failure (PostgreSQL's synchronous_commit off, SQLite's synchronous NORMAL)."""
    url = storage.url
    if not url.startswith("sqlite"):
        if relaxed:  # set per connection: no SET round trip in every transaction
            parsed = make_url(url)
            options = " ".join(
                filter(None, (parsed.query.get("options"), "-c synchronous_commit=off"))
            )
            kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "options": options}
            url = parsed.difference_update_query(["options"])
        return _fork_safe(create_engine(url, pool_pre_ping=True, **kwargs))
    if not sqlite_has_json():  # lists are bound as JSON (`any_of`)
        raise ConfigError(
            f"Python's SQLite {sqlite3.sqlite_version} lacks the JSON functions "
            "(SQLite 3.38 or later has them built in)",
            key="storage.url",
        )
    connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": 30}
    database = make_url(url).database
    if fcntl and database and database != ":memory:" and not database.startswith("file:"):
        connect_args["factory"] = functools.partial(QueuedWriter, database)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    synchronous = "NORMAL" if relaxed else storage.sqlite_synchronous

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        # Let SQLAlchemy, not the driver, open transactions (see "begin" below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        wal = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        if wal and synchronous == "FULL" and isinstance(dbapi_conn, QueuedWriter):
            dbapi_conn.flushes_wal = True  # FULL's flush, after the lock (see QueuedWriter)
            cur.execute("PRAGMA synchronous=NORMAL")
        else:
            cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        # A savepoint's journal (the rehearsal applies under one) outgrows SQLite's 64 KiB
        # in-memory spill limit and went to a temporary file created and deleted per
        # delivery: 0.15 ms of each one. Held in memory it costs a copy of the pages.
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
        cur.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        # IMMEDIATE takes the write lock up front: a read-then-write transaction can then
        # never fail to upgrade its lock ("database is locked") when another writer is busy.
        if not conn.get_execution_options().get(_READER):  # each read its own transaction
            begin_immediate(conn.connection.dbapi_connection)

    return _fork_safe(engine)


# -- fork --------------------------------------------------------------------------------------
# A connection must not cross a fork: two processes on one PostgreSQL socket read each other's
# results, and SQLite forbids using a connection in a child (its locks are the parent's).
# `gunicorn --preload` forks its workers after `create_app()` has used the engine (the
# migration check), and the pool would hand the parent's connection to every worker. So a
# child starts with empty pools. What it inherited is kept, neither used nor closed: psycopg
# leaves another process's connection alone when it is collected, but Python's sqlite3 closes
# the files, and closing a file drops every POSIX lock this process holds on it, those of its
# own connections to the same database too (SQLite's "how to corrupt": 2.2).

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_holders: weakref.WeakSet = weakref.WeakSet()  # see `forgets_after_fork`
_inherited: list[object] = []  # the parent's pools and connections, in a child


def _fork_safe(engine: Engine) -> Engine:
    _engines.add(engine)
    return engine


def forgets_after_fork(holder: Any) -> None:
    """`holder` keeps connections between uses: in a forked child its `forget_inherited()`
    hands them to `inherited` and starts afresh (new locks too: another of the parent's
    threads may have held one, and the parent's threads are not in the child)."""
    _holders.add(holder)


def inherited(*things: object) -> None:
    """Keep what a child inherited, unused and unclosed (see above)."""
    _inherited.extend(things)


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        inherited(engine.pool)
        engine.dispose(close=False)  # a new, empty pool; the old one is left as it is
    for holder in list(_holders):
        holder.forget_inherited()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def sqlite_has_json() -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT value FROM json_each('[1]')")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


#: The WAL is copied back into the database once it holds this many pages (SQLite's default
#: is 1,000, 4 MB). A delivery writes one page of each of about 20 tables and indexes, mostly
#: the same hot pages again, so a larger WAL copies each of them back once for many
#: deliveries. The copy runs in the COMMIT that crossed the mark, in its writer's turn
#: (`QueuedWriter`), so the other writers wait for it: a shorter one every 3,000 pages gave
#: gunicorn ingest a p99 of 21.7, 23.4, 25.1 and 22.6 ms against 24.9, 24.4 and 25.7 every
#: 10,000 (alternated runs, the same throughput); 30,000 gave 50 ms.
SQLITE_CHECKPOINT_PAGES = 3_000
#: A WAL that grew beyond this (a long read held back the checkpoint) is cut back to it.
SQLITE_WAL_LIMIT_BYTES = 64 * 1024 * 1024

#: How long a transaction waits for another writer before "database is locked".
SQLITE_BUSY_SECONDS = 30.0


class QueuedWriter(sqlite3.Connection):
    """A SQLite connection whose write transactions wait their turn in the kernel, and flush
    their commit to disk after they have given the turn to the next.

    SQLite has no queue for its write lock: a writer that finds it taken can only sleep and
    try again, so with two processes writing (gunicorn workers) the waiting one either sleeps
    on after the lock came free or spends CPU trying. Here every txsms writer of the file takes
    an exclusive `flock` on `<database>-lock` before BEGIN IMMEDIATE and gives it up once its
    COMMIT or ROLLBACK has returned: the kernel wakes the next one at once. The turn is the
    open file's, not the process's, so threads with connections of their own queue too; a
    process that dies gives its turn up with its files. The wait for a turn has no deadline:
    only a txsms transaction holds it, and those are short. A writer that takes no turns (the
    sqlite3 shell, say) still holds SQLite's own lock, and `begin_immediate` waits for that.

    `flushes_wal` (set when `storage.sqlite_synchronous` is FULL and the file is in WAL mode):
    SQLite's FULL flushes the WAL inside COMMIT, under the write lock, so every other writer
    waits for the disk too (half the lock's time per delivery). Here SQLite runs with NORMAL,
    which writes the commit to the WAL without flushing it, and the connection flushes the WAL
    once it has given up its turn, before `commit` returns: a commit is on disk when it
    returns, as with FULL, and the next writer works while the disk flushes. The flush covers
    everything written to the WAL before it, so whatever a transaction read from another
    that had not flushed yet is on disk too once it ends, rollback included. With two gunicorn
    workers, ingest went from 812/837 to 882/888 req/s with the turns, then to 940/958 with
    the flush after them (alternated runs), and its p99 from 31/30 to 27/27 ms.
    """

    flushes_wal = False

    def __init__(self, database: str, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock_path, self._wal_path = database + "-lock", database + "-wal"
        self._lock_fd: int | None = None  # opened by the first write: readers never need it
        self._has_turn = False

    def take_turn(self) -> None:
        if self._has_turn:
            return
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._has_turn = True

    def give_turn(self) -> bool:
        """Whether there was a turn to give (a write transaction ended)."""
        if not self._has_turn:
            return False
        self._has_turn = False
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return True

    def commit(self) -> None:
        self._end(super().commit)

    def rollback(self) -> None:
        self._end(super().rollback)

    def _end(self, end: Callable[[], None]) -> None:
        """COMMIT or ROLLBACK, the turn to the next writer, then the flush (see above)."""
        try:
            end()
        finally:
            ended = self.give_turn()
        if ended and self.flushes_wal:
            # Opened each time (a few µs): SQLite creates the WAL with the first write, and
            # deletes it when the last connection to the file closes.
            fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _fdatasync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._has_turn = False
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # and with it the turn, if held
                self._lock_fd = None


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has only fsync


def begin_immediate(dbapi_conn, timeout: float = SQLITE_BUSY_SECONDS) -> None:
    """BEGIN IMMEDIATE, waiting for the writer that holds the lock.

    A `QueuedWriter` waits for its turn; then only a writer that takes no turns can hold the
    lock, and SQLite's own busy handler waits for it. Other connections try again after
    0.1 ms, doubling up to 2 ms: SQLite's handler sleeps 1, 2, 5, 10 … 100 ms between tries,
    a p99 of 100+ ms for transactions that hold the lock for about 2."""
    if isinstance(dbapi_conn, QueuedWriter):
        dbapi_conn.take_turn()
        try:
            dbapi_conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            dbapi_conn.give_turn()
            raise
        return
    delay, deadline = 0.0001, time.monotonic() + timeout
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
    finally:  # everything else keeps SQLite's own wait
        dbapi_conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")


#: SQLSTATEs with which PostgreSQL aborts a transaction only because of another one, and
#: asks for it to be run again: a deadlock, a serialization failure.
RETRY_SQLSTATES = frozenset({"40P01", "40001"})
TRANSACTION_ATTEMPTS = 3

T = TypeVar("T")


_AFTER_COMMIT = "txsms_after_commit"


@contextmanager
def transaction(begin: Callable[[], AbstractContextManager[Connection]]) -> Iterator[Connection]:
    """`begin()`'s transaction, running what `after_commit` was given in it once it has
    committed: not if it rolls back, so an attempt that is run again (a group commit that
    failed, a deadlock) does not log or count what it did twice."""
    pending: list[Callable[[], object]] = []
    with begin() as conn:
        conn.info[_AFTER_COMMIT] = pending
        try:
            yield conn
        finally:
            # A connection lost mid-transaction is invalidated, its `info` gone with it; asking
            # for it would raise "Can't reconnect until invalid transaction is rolled back"
            # over the driver's error, which says what happened.
            if not conn.invalidated:
                conn.info.pop(_AFTER_COMMIT, None)
    for action in pending:
        try:
            action()
        except Exception:  # committed is committed: a failing log line must not say otherwise
            log.exception("after-commit action failed")


def after_commit(conn: Connection, action: Callable[[], object]) -> None:
    """Run `action` (a log line, a counter) once `conn`'s transaction commits, if it was
    begun by `transaction`; at once otherwise."""
    pending = conn.info.get(_AFTER_COMMIT)
    if pending is None:
        action()
    else:
        pending.append(action)


def note(conn: Connection, logger: logging.Logger, level: int, msg: str, *args) -> None:
    """A log line about `conn`'s work, written once that commits (see `after_commit`)."""
    after_commit(conn, functools.partial(logger.log, level, msg, *args))


def run_transaction(
    begin: Callable[[], AbstractContextManager[Connection]],
    work: Callable[[Connection], T],
    attempts: int = TRANSACTION_ATTEMPTS,
) -> T:
    """`work` in a transaction of its own (`transaction`), run again if the database aborted
    it for another transaction's sake (two workers recording results for the same numbers)."""
    attempt = 1
    while True:
        try:
            with transaction(begin) as conn:
                return work(conn)
        except DBAPIError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate not in RETRY_SQLSTATES or attempt == attempts:
                raise
            reason = type(exc.orig).__name__
        attempt += 1
        log.warning(
            "transaction aborted by the database (%s, SQLSTATE %s); attempt %d of %d",
            reason,
            sqlstate,
            attempt,
            attempts,
        )


_READER = "txsms_reader"
#: Statement option of `insert_ignore`'s statements: an INSERT … ON CONFLICT DO NOTHING
#: RETURNING whose one row says the insert happened (a rehearsal may assume it does). Its
#: value is the statement's strict twin: the same INSERT without ON CONFLICT, which fails
#: where this one would insert nothing.
INSERT_IGNORE = "txsms_insert_ignore"


def reader(engine: Engine) -> Connection:
    """A connection for reads outside any write transaction (use it as a context manager):
    each statement reads the latest committed state on its own. On SQLite it never takes the
    write lock; on PostgreSQL it costs no BEGIN and no ROLLBACK round trip. Writing through it
    is a mistake."""
    if is_sqlite(engine):
        return engine.connect().execution_options(**{_READER: True})
    return autocommitter(engine)


def autocommitter(engine: Engine) -> Connection:
    """A PostgreSQL connection on which every statement commits by itself: one round trip for
    a single-statement write, where BEGIN, the statement and COMMIT take three."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


class KeptConnections:
    """Connections (by default `reader`s) kept between uses: no pool check-out and, on
    PostgreSQL, no liveness ping per use. That check-out and ping cost a single-row statement
    three times its own time. One connection per thread; `shared`: one for the process,
    used by one thread at a time."""

    def __init__(
        self,
        engine: Engine,
        opener: Callable[[Engine], Connection] = reader,
        *,
        shared: bool = False,
    ):
        self.engine = engine
        self.opener = opener
        self.shared = shared
        self._start()
        forgets_after_fork(self)

    def _start(self) -> None:
        self._local: Any = types.SimpleNamespace() if self.shared else threading.local()
        self._turn: AbstractContextManager = threading.Lock() if self.shared else nullcontext()
        self._lock = threading.Lock()
        self._made: list[Connection] = []

    def forget_inherited(self) -> None:
        inherited(self._local, self._made)
        self._start()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._turn:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self.opener(self.engine)
                with self._lock:
                    self._made.append(conn)
            try:
                yield conn
            except DBAPIError:  # perhaps a dead connection: the next use starts a fresh one
                self._local.conn = None
                with self._lock:
                    self._made.remove(conn)
                conn.invalidate()
                conn.close()
                raise

    def release(self) -> None:
        """Give this thread's connection (`shared`: the process's, once no thread uses it)
        back to the pool."""
        with self._turn:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                self._local.conn = None
                with self._lock:
                    self._made.remove(conn)
                conn.close()

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        for conn in made:
            conn.close()


def unavailable(exc: OperationalError) -> str:
    """A database that is down, unreachable or locked, in one line for the log: the driver's
    error class and the first line of its message, without the statement or its values (an
    outage would otherwise log a traceback for every request and every poll)."""
    cause = exc.orig if exc.orig is not None else exc  # raised by SQLAlchemy itself: its own
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"


def log_failure(logger: logging.Logger, msg: str, *args: object) -> None:
    """For an `except` block of a loop that carries on: the database being unavailable is a
    warning line (`unavailable`), anything else an error with its traceback."""
    exc = sys.exc_info()[1]
    if isinstance(exc, OperationalError):
        logger.warning(f"{msg} (database unavailable: %s)", *args, unavailable(exc))
    else:
        logger.exception(msg, *args)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


MIGRATIONS = Path(__file__).parent / "migrations"


def _alembic_config(engine: Engine):
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply Alembic migrations up to `revision`."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


DIALECTS = ("sqlite", "postgresql")


class _JSONList(TypeDecorator):
    """A list bound as one JSON text parameter (SQLite's stand-in for an array)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(list(value))


def any_of(col, name: str, dialect: str, *, single: bool = False):
    """`col` is one of the values of the list parameter `name`.

    One parameter whatever the list's length, so the statement's text never changes: it is
    compiled once and stays in the driver's statement cache. PostgreSQL takes the list as an
    array; SQLite as JSON read back by `json_each` (an expanding `IN (?, ?, …)` is rendered
    anew for every call, which cost a webhook more than the query itself).

    `single`: for a statement built for lists of at most one value, bound as that value or
    None (which matches nothing). PostgreSQL plans a statement with an array anew for every
    call, since the array's length changes what the plan costs; with plain values it settles
    on one plan for all calls after five (0.1 ms less for ingest's look-ups).
    """
    if single:
        return col == bindparam(name, type_=col.type)
    if dialect == "postgresql":
        return col == any_(bindparam(name, type_=ARRAY(col.type)))
    values = func.json_each(bindparam(name, type_=_JSONList())).table_valued("value")
    return col.in_(select(values.c.value))


def for_driver(dialect, statement, params: dict | None) -> tuple[str, dict | tuple]:
    """`statement` with `params` as the driver takes them: SQL text and bound values, each
    value through its type's bind processing (positional for SQLite). For running many
    statements without SQLAlchemy's per-execute work, or several at once (PostgreSQL's
    pipeline), which its execute cannot. ValueError for what this does not cover (an
    expanding IN, a column default that is not a constant)."""
    params = params or {}
    sql, binds = _compiled_for_driver(dialect, statement, tuple(params))
    if binds.direct is not None:
        values = {name: params[key] for name, key in binds.direct}
    else:
        values = binds.construct_params(params)
    values.update(binds.defaults)  # only columns not given have one: they are compiled in
    for name, process in binds.processors.items():
        if values.get(name) is not None:
            values[name] = process(values[name])
    if binds.positions is not None:
        return sql, tuple(values[name] for name in binds.positions)
    return sql, values


def driver_sql(dialect, statement, keys: Iterable[str]) -> str:
    """The SQL text `for_driver` gives for `statement` with parameters named `keys`, without
    working out their values."""
    return _compiled_for_driver(dialect, statement, tuple(keys))[0]


@dataclass(frozen=True)
class _DriverBinds:
    construct_params: Callable[[dict], dict]
    defaults: dict[str, Any]  # columns' own defaults, which SQLAlchemy fills at execute
    processors: dict[str, Callable]
    positions: list[str] | None  # the names in order, for a positional paramstyle
    # (name in the SQL, key in the parameters) of every bind when each takes its value from
    # the parameters or from `defaults`, as an insert's or an update's do: their values
    # without SQLAlchemy's `construct_params`, which checks every bind for every case (a
    # fifth of the time of a statement's `for_driver`, and a delivery runs five). None
    # where some bind has a value of its own (a literal in a WHERE).
    direct: tuple[tuple[str, str], ...] | None


@functools.lru_cache(maxsize=256)
def _compiled_for_driver(dialect, statement, keys: tuple[str, ...]) -> tuple[str, _DriverBinds]:
    # Statements are hashed by identity: the hot ones are built once (module constants,
    # `_insert_ignore_stmt`); one built per call is compiled per call, as SQLAlchemy would.
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    if compiled.post_compile_params:  # an expanding IN: its text depends on the values
        raise ValueError(f"{statement}: a list parameter that is not `any_of`")
    defaults = {}
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        if not column.default.is_scalar:  # no such column yet; it would need SQLAlchemy's
            raise ValueError(f"{column}: only constant defaults are filled for the driver")
        defaults[compiled.escaped_bind_names.get(column.key, column.key)] = column.default.arg
    processors = {}
    for key, bind in compiled.binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors[compiled.escaped_bind_names.get(key, key)] = process
    names = [
        (compiled.escaped_bind_names.get(name, name), bind.key)
        for bind, name in compiled.bind_names.items()
    ]
    given = [(name, key) for name, key in names if name not in defaults]
    direct = tuple(given) if all(key in keys for _, key in given) else None
    return compiled.string, _DriverBinds(
        compiled.construct_params, defaults, processors, compiled.positiontup, direct
    )


def insert_ignore(conn, table: Table, values: dict, conflict: list[str]) -> bool:
    """INSERT that does nothing when `conflict` columns already exist; True if a row was added.

    Unlike catching IntegrityError this never aborts the surrounding PostgreSQL transaction,
    so two receivers racing on one delivery both commit, and one of them creates nothing.
    """
    stmt = _insert_ignore_stmt(conn.dialect.name, table, tuple(conflict))
    return conn.execute(stmt, values).first() is not None


@functools.cache
def _insert_ignore_stmt(dialect: str, table: Table, conflict: tuple[str, ...]):
    # Built once per table: the values travel as parameters, so SQLAlchemy's compiled cache
    # applies (building `.values(**row)` each time costs more than the query on SQLite).
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    strict = insert(table)
    return (
        insert(table)
        .on_conflict_do_nothing(index_elements=list(conflict))
        .returning(table.c[conflict[0]])  # rowcount is -1 here with psycopg 3; RETURNING is exact
        .execution_options(**{INSERT_IGNORE: strict})
    )
