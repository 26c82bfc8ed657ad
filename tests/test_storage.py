"""Storage: the hand-kept migration matches the tables, upgrades are idempotent, SQLite runs in
WAL with the configured durability, and insert_ignore tells an insert from a conflict."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import make_config
from fakes import deadlock, wait_until
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import DBAPIError, OperationalError

from txsms.core import storage
from txsms.core.config import StorageConfig
from txsms.core.errors import ConfigError


@pytest.fixture
def engine(database_url) -> Engine:
    engine = storage.make_engine(StorageConfig(url=database_url))
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list:
    """What Alembic autogenerate would write to turn the database into `storage.metadata`."""
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return compare_metadata(context, storage.metadata)


def schema_snapshot(engine: Engine) -> dict:
    inspector = inspect(engine)
    return {
        name: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
            sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(name)),
            sorted(str(u["column_names"]) for u in inspector.get_unique_constraints(name)),
        )
        for name in sorted(inspector.get_table_names())
    }


def test_migrated_database_matches_the_table_definitions(engine):
    storage.upgrade(engine)
    assert storage.current_revision(engine) == storage.head_revision()
    assert schema_diff(engine) == []


def test_the_schema_comparison_notices_a_drift(engine):
    # The check above is only worth something if a difference shows up: drop one index.
    storage.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_messages_status_send_at"))
    diff = schema_diff(engine)
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_messages_status_send_at")]


def test_every_table_is_created_by_the_migration(engine):
    storage.upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert set(storage.metadata.tables) <= tables
    assert tables - set(storage.metadata.tables) == {"alembic_version"}


def test_upgrading_twice_changes_nothing(engine):
    storage.upgrade(engine)
    before = schema_snapshot(engine)
    now = time.time()
    with engine.begin() as conn:
        conn.execute(storage.cursors.insert().values(name="crm:x", value="42", updated_at=now))

    storage.upgrade(engine)

    assert schema_snapshot(engine) == before
    assert storage.current_revision(engine) == storage.head_revision()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(text("alembic_version"))).scalar() == 1
        assert conn.execute(select(storage.cursors.c.value)).scalars().all() == ["42"]


def test_sqlite_runs_in_wal_with_full_synchronous_by_default(tmp_path, sqlite_url):
    config = make_config(tmp_path, sqlite_url)
    assert config.storage.sqlite_synchronous == "FULL"
    engine = storage.make_engine(config.storage)
    try:
        storage.upgrade(engine)
        # Every pooled connection gets the pragmas, not only the first one. Raw DBAPI
        # connections: a SQLAlchemy transaction would BEGIN IMMEDIATE and hold the write lock.
        one, two = engine.raw_connection(), engine.raw_connection()
        try:
            for conn in (one, two):
                cur = conn.cursor()
                assert cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                # FULL's flush is made by the connection, after the write lock: see below.
                assert cur.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
                assert conn.driver_connection.flushes_wal is True
                assert cur.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
                assert cur.execute("PRAGMA foreign_keys").fetchone()[0] == 1
                assert cur.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
                assert cur.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 3_000
                assert cur.execute("PRAGMA journal_size_limit").fetchone()[0] == 64 << 20
                cur.close()
        finally:
            one.close()
            two.close()
    finally:
        engine.dispose()
    # WAL is a property of the file: a plain connection without txsms's pragmas sees it too.
    with closing(sqlite3.connect(tmp_path / "txsms.db")) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def turn_is_free(lock: Path) -> bool:
    """Whether another open file of `lock` could take the writers' turn now."""
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def waiting_for_turn(lock: Path) -> int:
    """How many flocks on `lock` wait (proc(5): a waiting lock's line in /proc/locks has "->")."""
    inode = str(lock.stat().st_ino)
    return sum(
        "->" in fields and "FLOCK" in fields and fields[-3].rsplit(":", 1)[-1] == inode
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
    )


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_sqlite_writers_wait_their_turn_in_the_kernel_then_begin_at_the_first_try(
    tmp_path, sqlite_url
):
    engine = storage.make_engine(make_config(tmp_path, sqlite_url).storage)
    storage.upgrade(engine)
    lock = tmp_path / "txsms.db-lock"
    holder = engine.connect()
    holder.begin()
    statements: list[str] = []
    seen: list[int] = []

    def write() -> None:
        with engine.connect() as conn:
            conn.connection.driver_connection.set_trace_callback(statements.append)
            with conn.begin():
                seen.append(
                    conn.execute(select(func.count()).select_from(storage.cursors)).scalar()
                )

    writer = threading.Thread(target=write)
    try:
        assert not turn_is_free(lock)  # the holder's turn, held in the kernel
        writer.start()
        wait_until(lambda: waiting_for_turn(lock) == 1)  # the writer sleeps in the kernel
        assert statements == []  # ... without having tried SQLite's lock
        holder.execute(storage.cursors.insert().values(name="c", value="1", updated_at=0.0))
        holder.commit()
        writer.join(5)
        assert seen == [1]  # began after the holder's commit, at the first try:
        assert statements[0] == "BEGIN IMMEDIATE"
        assert statements.count("BEGIN IMMEDIATE") == 1
        assert not any("busy_timeout" in s for s in statements)
        assert turn_is_free(lock)
    finally:
        holder.close()
        writer.join(5)
        engine.dispose()


def test_a_write_transaction_ends_once_the_wal_is_flushed_after_the_turn_was_given(
    tmp_path, sqlite_url, monkeypatch
):
    """FULL's durability, with the flush out of the write lock: commit (and rollback, which
    may have read another's commit not flushed yet) returns only once the WAL is on disk."""
    engine = storage.make_engine(make_config(tmp_path, sqlite_url).storage)
    storage.upgrade(engine)
    lock = tmp_path / "txsms.db-lock"
    flushes: list[tuple[int, bool]] = []  # (inode flushed, whether the turn was free by then)
    flush = storage._fdatasync

    def recording(fd: int) -> None:
        flushes.append((os.fstat(fd).st_ino, turn_is_free(lock)))
        flush(fd)

    monkeypatch.setattr(storage, "_fdatasync", recording)
    wal = (tmp_path / "txsms.db-wal").stat().st_ino  # there since the migrations
    try:
        with engine.begin() as conn:
            conn.execute(storage.cursors.insert().values(name="a", value="1", updated_at=0.0))
            assert flushes == []
        assert flushes == [(wal, True)]  # once, after the turn, before begin() returned
        with engine.connect() as conn:  # a write transaction that ends in a rollback
            conn.execute(select(storage.cursors.c.value)).all()
        assert flushes == [(wal, True)] * 2
        with storage.reader(engine) as conn:  # reads outside the write lock: nothing to flush
            assert conn.execute(select(storage.cursors.c.value)).scalars().all() == ["1"]
        assert len(flushes) == 2

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(storage, "_fdatasync", failing)
        with pytest.raises(OSError, match="Input/output"), engine.begin() as conn:
            conn.execute(storage.cursors.insert().values(name="b", value="2", updated_at=0.0))
        assert turn_is_free(lock)  # a failed flush is the caller's error, not a stuck turn
    finally:
        engine.dispose()


def test_a_writer_that_takes_no_turns_is_waited_for_and_a_failed_begin_gives_the_turn_back(
    tmp_path, sqlite_url
):
    engine = storage.make_engine(make_config(tmp_path, sqlite_url).storage)
    storage.upgrade(engine)
    lock = tmp_path / "txsms.db-lock"
    with closing(sqlite3.connect(tmp_path / "txsms.db", isolation_level=None)) as shell:
        shell.execute("BEGIN IMMEDIATE")  # SQLite's write lock, as the sqlite3 shell takes it
        raw = engine.raw_connection()
        try:
            queued = raw.driver_connection
            assert isinstance(queued, storage.QueuedWriter)
            queued.execute("PRAGMA busy_timeout=50")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                storage.begin_immediate(queued)
            assert queued.in_transaction is False
            assert turn_is_free(lock)  # not held on by the writer that gave up
            shell.execute("COMMIT")
            storage.begin_immediate(queued)
            assert queued.in_transaction is True
            assert not turn_is_free(lock)
            queued.rollback()
            assert turn_is_free(lock)
        finally:
            raw.close()
            engine.dispose()


def test_a_connection_without_turns_tries_again_until_the_lock_is_free(tmp_path, sqlite_url):
    """Connections made outside `make_engine` (no `QueuedWriter`) wait by trying again."""
    engine = storage.make_engine(make_config(tmp_path, sqlite_url).storage)
    storage.upgrade(engine)
    holder = engine.connect()
    holder.begin()  # BEGIN IMMEDIATE: the write lock is held
    released = threading.Event()

    def release_soon():
        released.wait(5)
        time.sleep(0.05)  # holds the lock a moment into the other's wait
        holder.commit()

    thread = threading.Thread(target=release_soon)
    thread.start()
    try:
        with closing(sqlite3.connect(tmp_path / "txsms.db", isolation_level=None)) as plain:
            plain.execute("PRAGMA busy_timeout=30000")
            # Held: a short wait gives up with SQLite's own error, nothing begun.
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                storage.begin_immediate(plain, timeout=0.05)
            assert plain.in_transaction is False
            released.set()  # the holder commits while the next try is waiting
            storage.begin_immediate(plain)
            assert plain.in_transaction is True
            # Other statements keep SQLite's own 30-second wait.
            assert plain.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
            plain.execute("ROLLBACK")
    finally:
        released.set()
        thread.join()
        holder.close()
        engine.dispose()


HOLD_A_TURN = """
import sys, time
from txsms.core import storage
from txsms.core.config import StorageConfig
engine = storage.make_engine(StorageConfig(url=sys.argv[1]))
conn = engine.connect()
conn.begin()
print("holding", flush=True)
time.sleep(60)
"""


def test_a_writer_killed_in_its_turn_hands_it_on(tmp_path, sqlite_url):
    engine = storage.make_engine(make_config(tmp_path, sqlite_url).storage)
    storage.upgrade(engine)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_TURN, sqlite_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert not turn_is_free(tmp_path / "txsms.db-lock")
        holder.kill()
        holder.wait(5)
        with engine.begin() as conn:  # would wait for ever if the turn outlived its process
            conn.execute(storage.cursors.insert().values(name="c", value="1", updated_at=0.0))
        assert turn_is_free(tmp_path / "txsms.db-lock")
    finally:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()
        engine.dispose()


@pytest.mark.parametrize(("setting", "expected"), [("normal", 1), ("EXTRA", 3), ("off", 0)])
def test_sqlite_synchronous_follows_the_config(tmp_path, sqlite_url, setting, expected):
    config = make_config(tmp_path, sqlite_url, storage={"sqlite_synchronous": setting})
    engine = storage.make_engine(config.storage)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.connection.driver_connection.flushes_wal is False  # SQLite's own
    finally:
        engine.dispose()


def test_an_sqlite_without_json_functions_is_refused_by_name(tmp_path, sqlite_url, monkeypatch):
    assert storage.sqlite_has_json()  # this Python's SQLite has them
    monkeypatch.setattr(storage, "sqlite_has_json", lambda: False)
    config = make_config(tmp_path, sqlite_url)
    with pytest.raises(ConfigError) as err:
        storage.make_engine(config.storage)
    assert err.value.key == "storage.url"
    assert f"SQLite {sqlite3.sqlite_version} lacks the JSON functions" in str(err.value)


@pytest.mark.parametrize("count", [0, 1, 3, 500])
def test_list_parameters_match_any_length(engine, count):
    """`any_of`: one parameter for a list of any length (SQLite: JSON, PostgreSQL: array)."""
    storage.upgrade(engine)
    with engine.begin() as conn:
        rows = [{"source": "s", "delivery_id": f"d{n}", "received_at": 0} for n in range(1000)]
        conn.execute(storage.deliveries.insert(), rows)
        wanted = [f"d{n}" for n in range(0, count * 2, 2)] + ["missing"]
        query = select(storage.deliveries.c.delivery_id).where(
            storage.any_of(storage.deliveries.c.delivery_id, "ids", conn.dialect.name)
        )
        found = set(conn.execute(query, {"ids": wanted}).scalars())
    assert found == set(wanted) - {"missing"}


def test_relaxed_engine_skips_the_flush_and_keeps_the_url_options(tmp_path, database_url):
    config = make_config(tmp_path, database_url, storage={"sqlite_synchronous": "extra"})
    durable = storage.make_engine(config.storage)
    relaxed = storage.make_engine(config.storage, relaxed=True)
    try:
        storage.upgrade(durable)
        # (one at a time: on SQLite every transaction takes the write lock)
        with durable.connect() as conn:
            if durable.dialect.name == "sqlite":
                durable_setting = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            else:
                durable_setting = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
                path = conn.exec_driver_sql("SHOW search_path").scalar()
        with relaxed.connect() as conn:
            if durable.dialect.name == "sqlite":
                assert (durable_setting, conn.exec_driver_sql("PRAGMA synchronous").scalar()) == (
                    3,  # EXTRA, as configured
                    1,  # NORMAL
                )
            else:
                setting = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
                assert (durable_setting, setting) == ("on", "off")
                # The URL's own options (here the test's schema) still apply.
                assert conn.exec_driver_sql("SHOW search_path").scalar() == path
            assert conn.execute(select(func.count()).select_from(storage.messages)).scalar() == 0
    finally:
        durable.dispose()
        relaxed.dispose()


def test_insert_ignore_reports_an_insert_then_a_conflict(engine):
    storage.upgrade(engine)
    table = storage.cursors
    with engine.begin() as conn:
        assert storage.insert_ignore(
            conn, table, {"name": "a", "value": "1", "updated_at": 1.0}, ["name"]
        )
        assert not storage.insert_ignore(
            conn, table, {"name": "a", "value": "2", "updated_at": 2.0}, ["name"]
        )
        # The conflict did not abort the transaction (PostgreSQL would refuse this otherwise).
        assert storage.insert_ignore(
            conn, table, {"name": "b", "value": "3", "updated_at": 3.0}, ["name"]
        )
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.name, table.c.value).order_by(table.c.name)).all()
    assert [tuple(r) for r in rows] == [("a", "1"), ("b", "3")]


def test_insert_ignore_on_a_composite_unique_key(engine):
    storage.upgrade(engine)
    row = {
        "id": "e1",
        "source": "api",
        "key": "order:1:created",
        "kind": "order.created",
        "occurred_at": 1.0,
        "received_at": 1.0,
    }
    conflict = ["source", "key"]
    with engine.begin() as conn:
        assert storage.insert_ignore(conn, storage.events, row, conflict)
    with engine.begin() as conn:
        assert not storage.insert_ignore(conn, storage.events, {**row, "id": "e2"}, conflict)
        assert storage.insert_ignore(
            conn, storage.events, {**row, "id": "e3", "source": "crm:x"}, conflict
        )
    with engine.connect() as conn:
        ids = conn.execute(select(storage.events.c.id).order_by(storage.events.c.id)).scalars()
        assert list(ids) == ["e1", "e3"]


def test_a_transaction_deadlocked_by_another_runs_again(pg_runtime):
    """Two transactions update the same two rows in opposite orders: PostgreSQL aborts one of
    them (deadlock), `run_transaction` runs it again, and both changes are kept, once each."""
    engine, table = pg_runtime.engine, storage.rate_limits
    with engine.begin() as conn:
        for name in ("a", "b"):
            storage.insert_ignore(conn, table, {"name": name, "next_at": 0.0}, ["name"])
    both_hold_one = threading.Barrier(2, timeout=10)
    attempts = {"ab": 0, "ba": 0}
    failures: list[BaseException] = []

    def bump(conn, name: str) -> None:
        conn.execute(table.update().where(table.c.name == name).values(next_at=table.c.next_at + 1))

    def run(order: str) -> None:
        def work(conn) -> None:
            attempts[order] += 1
            bump(conn, order[0])
            if attempts[order] == 1:
                both_hold_one.wait()
            bump(conn, order[1])

        try:
            storage.run_transaction(engine.begin, work)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(order,)) for order in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures
    assert sorted(attempts.values()) == [1, 2]  # one was aborted and ran again
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.name, table.c.next_at).order_by(table.c.name)).all()
    assert [tuple(r) for r in rows] == [("a", 2.0), ("b", 2.0)]


def test_run_transaction_gives_up_after_its_attempts_and_raises_other_errors_at_once(engine):
    calls: list[str] = []

    def deadlocked(conn) -> None:
        calls.append("deadlocked")
        raise deadlock()

    with pytest.raises(OperationalError):
        storage.run_transaction(engine.begin, deadlocked)
    assert calls == ["deadlocked"] * storage.TRANSACTION_ATTEMPTS

    def broken(conn) -> None:
        calls.append("broken")
        conn.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(DBAPIError):
        storage.run_transaction(engine.begin, broken)
    assert calls.count("broken") == 1


def test_notes_go_out_once_their_transaction_commits_and_never_for_an_attempt_run_again(
    engine,
):
    """`after_commit` in `run_transaction`: a deadlocked attempt's notes are dropped, the
    attempt that commits writes its own once, after the commit (another connection sees the
    row when the note runs); outside `transaction` a note runs at once."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE noted (v INTEGER)"))
    notes: list[tuple[int, int]] = []
    attempts = [0]

    def seen() -> int:
        with engine.connect() as other:
            return other.execute(text("SELECT count(*) FROM noted")).scalar_one()

    def work(conn) -> None:
        attempts[0] += 1
        conn.execute(text("INSERT INTO noted (v) VALUES (1)"))
        storage.after_commit(conn, lambda n=attempts[0]: notes.append((n, seen())))
        assert notes == []  # held until the commit
        if attempts[0] == 1:
            raise deadlock()

    storage.run_transaction(engine.begin, work)
    assert notes == [(2, 1)]  # the second attempt's, once, with its row committed

    with pytest.raises(RuntimeError), storage.transaction(engine.begin) as conn:
        storage.after_commit(conn, lambda: notes.append((3, 0)))
        raise RuntimeError("rolled back")
    assert notes == [(2, 1)]  # rolled back: nothing said

    with engine.begin() as conn:  # not begun by `transaction`: at once
        storage.after_commit(conn, lambda: notes.append((4, 0)))
        assert notes[-1] == (4, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_opens_connections_of_its_own_and_leaves_the_parents_alone(runtime):
    """`gunicorn --preload`: the app (and its engine, which checked the migrations) is made
    before the workers are forked. A child that took the parent's pooled connection would share
    its PostgreSQL socket or its SQLite locks with the parent and its siblings."""
    from txsms.core.events import Event, Recipient
    from txsms.core.pipeline import _committer as committer
    from txsms.core.pipeline import ingest

    def event(n: int) -> Event:
        return Event(
            source="api",
            kind="order.created",
            key=f"order:{n}:created",
            recipient=Recipient(phone="+1 415 555 0101"),
            data={"order": {"number": f"#{n}"}},
        )

    ingest(runtime, [event(1)])  # the ingest writer keeps its connection between commits
    writer = committer(runtime)._conn.connection.dbapi_connection
    with runtime.readers.connection() as conn:  # this thread's, kept between uses
        parent_reader = conn.connection.dbapi_connection
    with runtime.engine.connect() as conn:  # back in the pool after this
        parent = conn.connection.dbapi_connection
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            [result] = ingest(runtime, [event(2)])
            my_writer = committer(runtime)._conn.connection.dbapi_connection
            with runtime.engine.connect() as conn:
                mine = conn.connection.dbapi_connection
            with runtime.readers.connection() as conn:
                my_reader = conn.connection.dbapi_connection
            used = {id(mine), id(my_reader), id(my_writer)} & {
                id(parent),
                id(parent_reader),
                id(writer),
            }
            os.write(write, f"{result.status} shared={len(used)}".encode())
            code = 0
        except BaseException as exc:
            os.write(write, repr(exc).encode()[:500])
        finally:
            os._exit(code)
    os.close(write)
    try:  # a child that hangs (a lock the fork left held) fails the test, not the whole run
        _, status = wait_until(lambda: (ended := os.waitpid(pid, os.WNOHANG))[0] and ended, 60)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report == "accepted shared=0"
    # The parent's connection is still its own and alive: the child neither used nor ended it.
    with runtime.engine.connect() as conn:
        assert conn.connection.dbapi_connection is parent
        assert conn.execute(text("SELECT count(*) FROM events")).scalar_one() == 2
    with runtime.readers.connection() as conn:
        assert conn.connection.dbapi_connection is parent_reader
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar_one() == 2
    ingest(runtime, [event(3)])
    assert committer(runtime)._conn.connection.dbapi_connection is writer


def test_a_connection_lost_mid_transaction_raises_the_drivers_error(pg_runtime):
    """Not SQLAlchemy's "Can't reconnect until invalid transaction is rolled back", which hid
    the outage from the callers that answer 503 or wait for the database."""
    engine = pg_runtime.engine
    lost = pytest.raises(OperationalError, match="terminat")
    with lost, storage.transaction(engine.begin) as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.execute(text("SELECT 1"))
    with engine.connect() as conn:  # the pool replaced the dead connection
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


@pytest.mark.parametrize("fillfactor", [None, 100])
def test_marking_in_flight_is_a_heap_only_update_on_postgresql(pg_runtime, fillfactor):
    """Pages of `messages` keep room for a row's next versions (migration 0005), so marking a
    claimed message in flight, which changes no indexed column, writes no index. On full pages
    (fillfactor 100, PostgreSQL's default) nearly every new version moves to another page and
    into all the table's indexes."""
    from txsms.core import outbox
    from txsms.core.events import Event, Recipient
    from txsms.core.pipeline import ingest

    engine = pg_runtime.engine
    with engine.connect() as conn:
        options = conn.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = 'messages'::regclass")
        ).scalar_one()
    assert options == [f"fillfactor={storage.MESSAGES_FILLFACTOR}"]
    if fillfactor is not None:  # what the table had before 0005
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE messages SET (fillfactor = {fillfactor})"))
    count = 300  # some twenty full pages
    for first in range(0, count, 100):
        ingest(
            pg_runtime,
            [
                Event(
                    source="api",
                    kind="order.created",
                    key=f"order:{n}:created",
                    recipient=Recipient(phone=f"+1 415 555 {n % 100:04d}"),
                    data={"order": {"number": f"#{n}"}},
                )
                for n in range(first, first + 100)
            ],
        )
    with engine.begin() as conn:
        claimed = [r.id for r in outbox.claim(conn, "w1", lease=60, limit=count)]
    assert len(claimed) == count
    hot = text(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
        "WHERE relid = 'messages'::regclass"
    )
    with engine.begin() as conn:  # the counts of this transaction's own updates
        assert outbox.mark_in_flight(conn, claimed, "w1", "twilio", lease=60) == set(claimed)
        updated, heap_only = conn.execute(hot).one()
    assert updated >= count
    # About three in four here: the claim's new versions took some of the room.
    if fillfactor is None:
        assert heap_only >= 0.5 * count, heap_only
    else:
        assert heap_only <= 0.1 * count, heap_only
