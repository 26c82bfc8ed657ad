"""Statements sent to PostgreSQL in one round trip, through libpq itself.

On PostgreSQL a delivery is one or two round trips (`rehearsal`): its look-ups with BEGIN
(`read`), then its writes with COMMIT (`sent`; a new order for a number met before: the
writes alone; deliveries that share a commit: their writes and the reads to check, `rows`). The
client's work around each cost more than the server's: psycopg's pipeline and cursor take
about 110 µs to enter and leave and 16 µs a statement in Python (seven statements and
COMMIT: 280 µs of CPU, against 100 µs straight through libpq). Here the statements go to
libpq (psycopg's `pgconn`): the values adapted, and the rows loaded, by psycopg's own
`Transformer`; each statement prepared on the server the first time the session sends it;
every answer read and checked for an error. In process, a Shopify delivery took about a
tenth less CPU (alternated batches of 250: 1.58 -> 1.40 ms writing alone, 3.49 -> 3.12 ms
reading first, on a machine slowed down by then).

What psycopg would keep track of is kept here, per connection (SQLAlchemy's
`connection.info`, which lives as long as the driver's connection): the names of the
statements prepared on its session. A prepare counts once its answer says it ran; one the
server skipped (an earlier statement failed) is sent again next time. Statements the session
lost (psycopg deallocates all on a rollback while it has its own prepared, a pooler between
may too) fail the next round trip: the names are then forgotten, and the caller's error path
runs as for any failed statement.

This leans on psycopg's internals (`psycopg._queries.PostgresQuery`, its generators), probed
at import: without them, or with them changed, `sent` returns False (`read` and `rows` None)
and the caller goes through psycopg's own cursor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

try:  # PostgreSQL only: psycopg's pieces, as psycopg 3.2 and 3.3 have them
    from psycopg import errors as _errors
    from psycopg._queries import PostgresQuery
    from psycopg.adapt import Transformer
    from psycopg.generators import fetch_many, send
    from psycopg.pq import ExecStatus

    # Internals may change shape in a later psycopg: one that does is not used at all (a
    # delivery half sent and then failing on Python's side would be worse than slower).
    _probe = PostgresQuery(Transformer())
    _probe.convert("SELECT %(a)s", {"a": 1})
    if _probe.query != b"SELECT $1" or len(_probe.params) != 1 or len(_probe.types) != 1:
        raise ImportError("psycopg's PostgresQuery is not what core/libpq.py expects")
    if not all(hasattr(Transformer, name) for name in ("set_pgresult", "load_rows")):
        raise ImportError("psycopg's Transformer is not what core/libpq.py expects")
    del _probe
except Exception:  # without psycopg (or these pieces), psycopg's own cursor serves
    PostgresQuery = None

#: Where a connection's session state lives in SQLAlchemy's `connection.info`.
_SESSION = "txsms.libpq"
#: The SQLSTATE of "prepared statement … does not exist".
_NO_SUCH_STATEMENT = "26000"
#: Statements prepared on one session at most (each holds a plan there); more go unprepared.
MAX_PREPARED = 200
_names = itertools.count(1)  # across connections, so a name is never reused on any session


@dataclass
class _Session:
    transformer: Any  # psycopg's Transformer for the connection: its adapters, cached
    prepared: dict[tuple, bytes] = field(default_factory=dict)  # (query, types) -> name


@dataclass
class _Statement:
    query: bytes
    params: Any = None
    types: Any = None
    formats: Any = None
    name: bytes | None = None  # bound to the statement prepared under this name
    prepare: bool = False  # prepared under `name` first, in the same round trip


def sent(conn, statements: list[tuple[str, Any]], *, begins: bool) -> bool:
    """Send `statements` (SQL as psycopg takes it, with its values or None) on `conn`'s
    driver connection in one round trip, BEGIN first if `begins`, and read every answer.
    Raises the first statement's error (psycopg's exception, as its cursor would); False,
    with nothing sent, where psycopg lacks what this needs."""
    return _run(conn, statements, begins) is not None


def read(conn, sql: str, params, *, begins: bool) -> tuple[list[tuple], tuple[int, ...]] | None:
    """A SELECT in one round trip (BEGIN first if `begins`): its rows as psycopg's cursor
    hands them (tuples of Python values), and its columns' type OIDs (the cursor's
    `description` type codes). Raises as `sent`; None where psycopg lacks what this needs."""
    if (results := _run(conn, [(sql, params)], begins)) is None:
        return None
    [result] = results
    rows = _rows(conn, result)
    return rows, tuple(result.ftype(i) for i in range(result.nfields))


def rows(conn, statements: list[tuple[str, Any]], *, begins: bool) -> list[list[tuple]] | None:
    """As `sent`, and the rows each statement returned (none for most writes)."""
    if (results := _run(conn, statements, begins)) is None:
        return None
    return [_rows(conn, result) for result in results]


def _rows(conn, result) -> list[tuple]:
    if not result.ntuples:
        return []
    transformer = conn.connection.info[_SESSION].transformer
    transformer.set_pgresult(result)
    try:
        return transformer.load_rows(0, result.ntuples, tuple)
    finally:
        transformer.set_pgresult(None)


def _run(conn, statements: list[tuple[str, Any]], begins: bool) -> list | None:
    """The round trip: each statement's result (BEGIN's not among them)."""
    if PostgresQuery is None:
        return None
    driver = conn.connection.dbapi_connection
    session = conn.connection.info.get(_SESSION)
    if session is None:
        session = conn.connection.info[_SESSION] = _Session(Transformer(driver))
    # Everything that can fail on the values fails here, before a byte is sent.
    batch = [_Statement(b"BEGIN")] if begins else []
    naming = dict(session.prepared)  # with the names this batch will prepare
    for sql, params in statements:
        batch.append(_adapted(session, naming, sql, params))
    with driver.lock:
        error, results = _round_trip(driver, session, batch)
    if error is not None:
        if error.sqlstate == _NO_SUCH_STATEMENT:
            session.prepared.clear()
        raise error
    return results[1:] if begins else results


def _adapted(session: _Session, naming: dict[tuple, bytes], sql: str, params) -> _Statement:
    if params is None:
        return _Statement(sql.encode())
    query = PostgresQuery(session.transformer)
    query.convert(sql, params)
    statement = _Statement(query.query, query.params, query.types, query.formats)
    key = (query.query, query.types)
    statement.name = naming.get(key)
    if statement.name is None and len(naming) < MAX_PREPARED:
        statement.name = naming[key] = b"txsms_%d" % next(_names)
        statement.prepare = True
    return statement


def _round_trip(
    driver, session: _Session, batch: list[_Statement]
) -> tuple[Exception | None, list]:
    """Send `batch` in pipeline mode with one Sync: the first error among the answers (the
    statements after it are skipped by the server) or None, and each statement's result."""
    pgconn = driver.pgconn
    pgconn.enter_pipeline_mode()
    try:
        for s in batch:
            if s.prepare:
                pgconn.send_prepare(s.name, s.query, param_types=s.types)
            if s.name is None:
                pgconn.send_query_params(s.query, s.params, s.types, s.formats)
            else:
                pgconn.send_query_prepared(s.name, s.params, s.formats)
        pgconn.pipeline_sync()
        driver.wait(send(pgconn))
        errors, results = [], []
        for s in batch:
            if s.prepare:
                prepared = driver.wait(fetch_many(pgconn))
                errors += _failed(driver, prepared)
                if _ran(prepared):
                    session.prepared[s.query, s.types] = s.name
            answers = driver.wait(fetch_many(pgconn))  # one result (or the error, or skipped)
            errors += _failed(driver, answers)
            results.append(answers[-1])
        driver.wait(fetch_many(pgconn))  # the Sync's own answer
    except BaseException:
        # Answers left unread (the connection lost, the thread interrupted): the connection
        # is of no use to anyone now, and closed says so (SQLAlchemy then drops it).
        driver.close()
        raise
    pgconn.exit_pipeline_mode()
    return (errors[0] if errors else None), results


def _failed(driver, results) -> list[Exception]:
    return [
        _errors.error_from_result(r, encoding=driver.info.encoding)
        for r in results
        if r.status == ExecStatus.FATAL_ERROR
    ]


def _ran(results) -> bool:
    """A prepare's answers say it ran (not skipped after an earlier error)."""
    return bool(results) and results[-1].status == ExecStatus.COMMAND_OK
