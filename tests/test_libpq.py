"""`core/libpq.py`: statements sent straight through libpq, on the real PostgreSQL. What the
server holds (`pg_prepared_statements`, the rows) is the evidence, not what the module
believes. (That a delivery's statements go in one round trip, sent whole, libpq's protocol
trace shows in `test_rehearsal.py`.)"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from conftest import PG_SKIP, pg_schema
from sqlalchemy import Connection, create_engine, text

from txsms.core import libpq

INSERT_A = "INSERT INTO a (n, s, f, b) VALUES (%(n)s, %(s)s, %(f)s, %(b)s)"
INSERT_B = "INSERT INTO b (n) VALUES (%(n)s)"


@pytest.fixture
def conn() -> Iterator[Connection]:
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with pg_schema() as url:
        engine = create_engine(url)
        with engine.begin() as setup:
            setup.execute(text("CREATE TABLE a (n int PRIMARY KEY, s text, f float8, b bytea)"))
            setup.execute(text("CREATE TABLE b (n int PRIMARY KEY)"))
        with engine.connect() as connection:
            yield connection
        engine.dispose()


def test_the_installed_psycopg_has_what_this_module_leans_on():
    """Its internals are probed at import, and a psycopg whose internals changed shape is
    not used at all (everything then goes through its cursor, correct but slower): this
    says so when an upgrade does that, instead of the receivers slowing down unnoticed."""
    assert libpq.PostgresQuery is not None


def send(conn: Connection, *statements: tuple[str, dict]) -> bool:
    """`statements` and their COMMIT, as a delivery's writes go: in a transaction SQLAlchemy
    began (and rolls back if they fail) but that nothing has opened on the server yet."""
    with conn.begin():
        return libpq.sent(conn, [("SAVEPOINT s", None), *statements, ("COMMIT", None)], begins=True)


def on_server(conn: Connection) -> set[str]:
    """The statements prepared on this connection's session, as the server knows them."""
    with conn.begin():
        rows = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").all()
    return {name for (name,) in rows if name.startswith("txsms_")}


def rows(conn: Connection, table: str) -> list[tuple]:
    with conn.begin():
        return [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY n")]


def test_writes_and_their_commit_are_applied_with_values_as_psycopg_adapts_them(conn):
    assert send(
        conn,
        (INSERT_A, {"n": 1, "s": "Ada", "f": 2.5, "b": b"\x00\xff"}),
        (INSERT_A, {"n": 2, "s": None, "f": None, "b": None}),
        (INSERT_B, {"n": 7}),
    )

    assert rows(conn, "a") == [(1, "Ada", 2.5, b"\x00\xff"), (2, None, None, None)]
    assert rows(conn, "b") == [(7,)]
    # One statement per text and type signature (a NULL's type differs), each prepared once.
    assert len(on_server(conn)) == 3


def test_a_statement_prepared_once_is_bound_by_name_after(conn):
    send(conn, (INSERT_B, {"n": 1}))
    prepared = on_server(conn)

    send(conn, (INSERT_B, {"n": 2}), (INSERT_B, {"n": 3}))

    assert on_server(conn) == prepared and len(prepared) == 1
    assert rows(conn, "b") == [(1,), (2,), (3,)]


def test_the_first_error_is_raised_and_what_the_server_skipped_is_prepared_next_time(conn):
    send(conn, (INSERT_B, {"n": 1}))
    known = on_server(conn)
    new = (INSERT_A, {"n": 1, "s": "x", "f": 1.0, "b": b""})

    # A duplicate first: the server skips what follows, the new statement's prepare included.
    with pytest.raises(psycopg.errors.UniqueViolation):
        send(conn, (INSERT_B, {"n": 1}), new)

    assert on_server(conn) == known  # the skipped prepare is not taken for done
    assert send(conn, new)
    assert rows(conn, "a") == [(1, "x", 1.0, b"")] and len(on_server(conn)) == 2


def test_statements_deallocated_behind_its_back_fail_once_then_are_prepared_again(conn):
    send(conn, (INSERT_B, {"n": 1}))
    # What psycopg sends when it sees a rollback with statements of its own prepared, and a
    # pooler between may do too.
    with conn.begin():
        conn.exec_driver_sql("DEALLOCATE ALL")

    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
        send(conn, (INSERT_B, {"n": 2}))

    assert send(conn, (INSERT_B, {"n": 3}))
    assert rows(conn, "b") == [(1,), (3,)] and len(on_server(conn)) == 1


def test_past_the_cap_statements_run_unprepared(conn, monkeypatch):
    monkeypatch.setattr(libpq, "MAX_PREPARED", 1)

    assert send(conn, (INSERT_B, {"n": 1}), (INSERT_A, {"n": 1, "s": "x", "f": 1.0, "b": b"y"}))

    assert rows(conn, "a") == [(1, "x", 1.0, b"y")] and rows(conn, "b") == [(1,)]
    assert len(on_server(conn)) == 1


def test_a_value_psycopg_cannot_adapt_fails_before_anything_is_sent(conn):
    driver = conn.connection.dbapi_connection
    with conn.begin():
        with pytest.raises(psycopg.ProgrammingError):
            libpq.sent(conn, [(INSERT_B, {"n": object()})], begins=True)
        assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # no BEGIN

    assert not driver.pgconn.pipeline_status
    assert rows(conn, "b") == []


def test_a_connection_lost_mid_round_trip_is_closed_and_raised(conn):
    pid = conn.connection.dbapi_connection.info.backend_pid
    with create_engine(conn.engine.url).connect() as other:
        other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")

    with pytest.raises(psycopg.OperationalError) as lost:
        libpq.sent(conn, [(INSERT_B, {"n": 1})], begins=True)

    driver = conn.connection.dbapi_connection
    assert driver.closed  # no one uses it again: SQLAlchemy takes it for a disconnect
    assert conn.dialect.is_disconnect(lost.value, driver, None)
    conn.invalidate()


def test_a_read_hands_back_what_psycopgs_cursor_would(conn):
    send(conn, (INSERT_A, {"n": 1, "s": "Ada", "f": 0.5, "b": b"\x01"}))
    send(conn, (INSERT_A, {"n": 2, "s": None, "f": None, "b": None}))
    inserts = on_server(conn)
    query = (
        "SELECT n, s, f, b, n > %(n)s AS big, CAST(n AS numeric) / 4 AS quarter,"
        " now() - now() AS gap FROM a WHERE n >= %(n)s ORDER BY n"
    )

    with conn.begin():
        read = libpq.read(conn, query, {"n": 1}, begins=True)
        again = libpq.read(conn, query, {"n": 2}, begins=False)  # in the same transaction
    with conn.begin():
        cursor = conn.connection.dbapi_connection.execute(query, {"n": 1})
        expected = (cursor.fetchall(), tuple(column[1] for column in cursor.description))

    assert read == expected
    assert read[0][0] == (1, "Ada", 0.5, b"\x01", False, Decimal("0.25"), timedelta(0))
    assert again[0] == [(2, None, None, None, False, Decimal("0.5"), timedelta(0))]
    assert len(on_server(conn) - inserts) == 1  # prepared once, then bound by name


def test_a_read_that_fails_raises_its_error(conn):
    with pytest.raises(psycopg.errors.UndefinedTable), conn.begin():
        libpq.read(conn, "SELECT * FROM nowhere WHERE n = %(n)s", {"n": 1}, begins=True)

    assert rows(conn, "a") == []  # the connection still serves


def test_each_statement_hands_back_its_rows(conn):
    send(conn, (INSERT_B, {"n": 1}))
    insert_if_absent = "INSERT INTO b (n) VALUES (%(n)s) ON CONFLICT DO NOTHING RETURNING 1"

    with conn.begin():
        found = libpq.rows(
            conn,
            [
                (insert_if_absent, {"n": 1}),  # there already: nothing inserted, no row
                (insert_if_absent, {"n": 2}),
                ("SELECT n FROM b WHERE n >= %(n)s ORDER BY n", {"n": 1}),
                (INSERT_B, {"n": 3}),
            ],
            begins=True,
        )

    assert found == [[], [(1,)], [(1,), (2,)], []]
    assert rows(conn, "b") == [(1,), (2,), (3,)]
