"""Ingest worked out before SQLite's write lock and applied under it (core/rehearsal.py):
applied only while the database still reads as the rehearsal saw it, else worked out again;
never a write outside the lock, never a decision made on stale reads."""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import API_TOKEN, INDEX_KEY, KEY, PG_SKIP, make_config, pg_schema, to_toml
from fakes import wait_until
from prometheus_client import REGISTRY
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import func, literal, select, text
from sqlalchemy.exc import DBAPIError, NoResultFound
from test_scaleout import _healthy
from test_serve import free_port

from txsms.core import consent, libpq, pipeline, storage
from txsms.core import rehearsal as core_rehearsal
from txsms.core.events import Event, OrderRef, Recipient
from txsms.core.pipeline import _committer, _parse_phone, _rehearse_outside, _Request, ingest
from txsms.core.rehearsal import CannotRehearse, Rehearsal, apply
from txsms.core.runtime import Runtime
from txsms.core.storage import (
    _insert_ignore_stmt,
    any_of,
    deliveries,
    events,
    for_driver,
    insert_ignore,
    messages,
    reader,
)

PHONE = "+1 415 555 0100"


@pytest.fixture
def runtime(tmp_path, sqlite_url):
    """SQLite: a receiver serving one request at a time rehearses before the transaction."""
    runtime = Runtime(make_config(tmp_path, sqlite_url))
    runtime.prepare_database(migrate=True)
    yield runtime
    runtime.close()


@pytest.fixture
def sqlite_runtime(runtime):
    """Where the test is about SQLite itself (its lock, its types), whatever the others do."""
    return runtime


@pytest.fixture
def any_runtime(runtime_factory):
    """SQLite, and PostgreSQL, where the rehearsal runs inside the write transaction."""
    return runtime_factory()


def order(n: int = 1, phone: str | None = PHONE, **kw) -> Event:
    return Event(
        source="api",
        kind=kw.pop("kind", "order.created"),
        key=f"order:{n}:created",
        recipient=Recipient(phone=phone, name="Ada"),
        data={"order": {"number": f"#{n}", "total": "$5.00"}},
        **kw,
    )


def new_order(n: int, phone: str | None = PHONE) -> Event:
    return order(n, phone=phone, order=OrderRef(f"o{n}"))


def paid_order(n: int) -> Event:
    """A later event of order `n`: what is stored about it is read."""
    return Event(
        source="api",
        kind="order.paid",
        key=f"order:{n}:paid",
        recipient=Recipient(phone=PHONE, name="Ada"),
        order=OrderRef(f"o{n}"),
        data={"order": {"number": f"#{n}", "total": "$5.00"}},
    )


def rehearsed(runtime, batch, delivery=None) -> _Request:
    """A request as a SQLite receiver serving one at a time makes it: rehearsed already."""
    phones = {(e.recipient.phone, e.recipient.country): _parse_phone(runtime, e) for e in batch}
    request = _Request(batch, delivery, phones)
    request.rehearsed = _rehearse_outside(runtime, request)
    return request


def rehearsed_inside(runtime, batch) -> _Request:
    """A request as the writer thread of grouped commits gets it: to be worked out there."""
    phones = {(e.recipient.phone, e.recipient.country): _parse_phone(runtime, e) for e in batch}
    return _Request(batch, None, phones, rehearse=True)


def rehearsals(outcome: str) -> float:
    return REGISTRY.get_sample_value("txsms_ingest_rehearsals_total", {"outcome": outcome}) or 0


def count(runtime, table) -> int:
    with runtime.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def message_rows(runtime):
    with runtime.engine.connect() as conn:
        return conn.execute(select(messages)).all()


def test_a_rehearsal_writes_nothing_and_its_replay_applies_exactly_what_it_worked_out(runtime):
    applied = rehearsals("applied")
    request = rehearsed(runtime, [order()], delivery=("api", "d-1"))
    assert request.rehearsed is not None
    [[planned]] = request.rehearsed.results
    assert planned.status == "accepted"
    assert (count(runtime, events), count(runtime, messages), count(runtime, deliveries)) == (
        0,
        0,
        0,
    )

    [result] = _committer(runtime).run(request)

    assert result is planned  # the rehearsal's own outcome, not a second working-out
    assert rehearsals("applied") == applied + 1
    [row] = message_rows(runtime)
    assert row.id == planned.messages[0].id and row.status == "pending"
    assert "Ada" in runtime.vault.decrypt(row.body_enc)
    assert count(runtime, events) == 1 and count(runtime, deliveries) == 1


def test_a_rehearsal_never_takes_the_write_lock(sqlite_runtime, sqlite_url):
    runtime = sqlite_runtime
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process is writing
    try:
        done: list[_Request] = []
        thread = threading.Thread(target=lambda: done.append(rehearsed(runtime, [order()])))
        thread.start()
        thread.join(10)
        assert done, "the rehearsal waited for the write lock"
        assert done[0].rehearsed is not None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert count(runtime, messages) == 0


def test_an_opt_out_recorded_after_the_rehearsal_is_honoured(runtime, caplog):
    caplog.set_level(logging.INFO, logger="txsms.core.pipeline")
    request = rehearsed(runtime, [order()])
    assert request.rehearsed.results[0][0].messages[0].status == "pending"
    index = runtime.vault.index("+14155550100")
    with runtime.engine.begin() as conn:  # a STOP arrives before the lock is taken
        consent.record(conn, runtime.vault, index, scope="all", action="opt_out", source="reply")

    [result] = _committer(runtime).run(request)

    [decision] = result.messages
    assert (decision.status, decision.reason) == ("skipped", "opted_out")
    [row] = message_rows(runtime)
    assert (row.id, row.status, row.reason) == (decision.id, "skipped", "opted_out")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"message {decision.id} order.created skipped: opted_out"]


def test_a_delivery_recorded_after_the_rehearsal_stays_a_duplicate(runtime):
    request = rehearsed(runtime, [order()], delivery=("api", "d-1"))
    with runtime.engine.begin() as conn:  # another process took the delivery: no read changes
        row = {"source": "api", "delivery_id": "d-1", "received_at": 1.0}
        assert insert_ignore(conn, deliveries, row, ["source", "delivery_id"])

    assert _committer(runtime).run(request) is None
    assert count(runtime, events) == 0 and count(runtime, messages) == 0


def test_an_event_recorded_after_the_rehearsal_is_a_duplicate_and_nothing_else_is_kept(runtime):
    request = rehearsed(runtime, [order()], delivery=("api", "d-2"))
    # The same event through another delivery, without the number: nothing the rehearsal
    # read has changed, only the event now exists.
    [first] = ingest(runtime, [order(phone=None)], delivery=("api", "d-1"))

    [result] = _committer(runtime).run(request)

    assert (result.status, result.id) == ("duplicate", first.id)
    # The delivery written before the conflict was found is rolled back and written again.
    assert count(runtime, deliveries) == 2
    assert count(runtime, events) == 1
    [row] = message_rows(runtime)
    assert (row.status, row.reason) == ("skipped", "no_phone")


def test_skip_logs_of_a_rehearsal_wait_for_its_replay(runtime, caplog):
    caplog.set_level(logging.INFO, logger="txsms.core.pipeline")
    request = rehearsed(runtime, [order(phone=None)])
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]

    [result] = _committer(runtime).run(request)

    [decision] = result.messages
    assert (decision.status, decision.reason) == ("skipped", "no_phone")
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"message {decision.id} order.created skipped: no_phone"
    ]


def test_a_read_after_a_held_back_write_is_checked_when_applied(any_runtime):
    """Two events of one order in one request: the second reads the order's context, which
    the first stored. Its rehearsal cannot see that write, so applying finds the read
    changed and works the request out for real: the second is addressed from the first."""
    created = order(1, order=OrderRef("o1"))
    paid = Event(
        source="api",
        kind="order.paid",
        key="order:1:paid",
        order=OrderRef("o1"),
        data={"order": {"number": "#1", "total": "$5.00"}},
    )
    redone = rehearsals("redone")

    first, second = ingest(any_runtime, [created, paid])

    assert rehearsals("redone") == redone + 1
    assert [d.status for d in first.messages + second.messages] == ["pending", "pending"]


def test_a_conflict_committed_while_a_rehearsal_was_applied_is_caught(pg_runtime, monkeypatch):
    """On PostgreSQL the rehearsal runs inside the transaction: what can still change before
    its writes is a row another receiver commits, which its insert-if-absent then finds."""
    applying = pipeline.apply_rehearsals

    def another_receiver_first(conn, rehearsals_, **options):
        with pg_runtime.engine.begin() as other:
            row = {"source": "api", "delivery_id": "d-1", "received_at": 1.0}
            insert_ignore(other, deliveries, row, ["source", "delivery_id"])
        return applying(conn, rehearsals_, **options)

    monkeypatch.setattr(pipeline, "apply_rehearsals", another_receiver_first)
    redone = rehearsals("redone")

    assert ingest(pg_runtime, [order()], delivery=("api", "d-1")) is None

    assert rehearsals("redone") == redone + 1
    assert count(pg_runtime, events) == 0 and count(pg_runtime, messages) == 0


def test_on_postgresql_the_writes_and_their_commit_go_in_one_round_trip(pg_runtime, monkeypatch):
    """The inserts go without ON CONFLICT and COMMIT follows them in the same pipeline: the
    transaction's own commit then finds nothing to do. One that would insert nothing fails,
    and the work is done again for real (the test above)."""
    sent: list[str] = []
    committing = core_rehearsal._committed

    def recorded(conn, driver, steps):
        sent.extend(step.strict_sql or step.sql for step in steps)
        return committing(conn, driver, steps)

    monkeypatch.setattr(core_rehearsal, "_committed", recorded)
    applied = rehearsals("applied")

    [result] = ingest(pg_runtime, [order()], delivery=("api", "d-1"))

    assert rehearsals("applied") == applied + 1
    assert [sql.split()[2] for sql in sent] == [
        "deliveries",
        "events",
        "recipients",
        "messages",
    ]
    assert not any("ON CONFLICT" in sql for sql in sent)
    [row] = message_rows(pg_runtime)
    assert (row.id, row.status) == (result.messages[0].id, "pending")
    assert count(pg_runtime, deliveries) == 1 and count(pg_runtime, events) == 1


def test_a_commit_that_fails_after_the_writes_is_raised_and_keeps_nothing(pg_runtime):
    """The COMMIT sent with the writes can fail on its own (here a deferred check; in life a
    lost connection): then there is no transaction to go back into, and the error is the
    caller's, as any failed commit is. Nothing was stored, and the webhook gets no 2xx."""
    with pg_runtime.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON deliveries"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )

    with pytest.raises(DBAPIError, match="refused at commit"):
        ingest(pg_runtime, [order()], delivery=("api", "d-1"))

    assert count(pg_runtime, deliveries) == 0 and count(pg_runtime, events) == 0


def test_a_rehearsal_is_applied_and_logs_once(any_runtime, caplog):
    caplog.set_level(logging.INFO, logger="txsms.core.pipeline")
    applied = rehearsals("applied")

    [result] = ingest(any_runtime, [order(phone=None)], delivery=("api", "d-1"))

    assert rehearsals("applied") == applied + 1
    [decision] = result.messages
    [row] = message_rows(any_runtime)
    assert (row.id, row.status, row.reason) == (decision.id, "skipped", "no_phone")
    assert count(any_runtime, deliveries) == 1 and count(any_runtime, events) == 1
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"message {decision.id} order.created skipped: no_phone"
    ]


def test_work_whose_write_results_matter_is_not_rehearsed_and_still_ingested(any_runtime):
    runtime = any_runtime
    booked = Event(
        source="api",
        kind="appointment.reminder",
        key="appt:1:reminder",
        recipient=Recipient(phone=PHONE),
        order=OrderRef("appt:1"),
        send_at=4_000_000_000,
    )
    ingest(runtime, [booked])
    cancel = Event(
        source="api",
        kind="messages.cancel",
        key="appt:1:cancel",
        order=OrderRef("appt:1"),
        data={"kinds": ["appointment.reminder"], "reason": "appointment_cancelled"},
    )
    refused = rehearsals("refused")

    [result] = ingest(runtime, [cancel])

    assert rehearsals("refused") == refused + 1  # it logs how many: a count of a write
    assert result.status == "accepted"
    [row] = message_rows(runtime)
    assert (row.status, row.reason) == ("cancelled", "appointment_cancelled")


def test_privacy_requests_are_never_rehearsed(runtime):
    redact = Event(source="api", kind="privacy.redact", key="r:1", recipient=Recipient(PHONE))
    assert rehearsed(runtime, [redact]).rehearsed is None


def test_a_rehearsal_refuses_what_it_cannot_know(runtime):
    with reader(runtime.engine) as conn:
        rehearsal = Rehearsal(conn)
        update = messages.update().values(status="x")
        blind = rehearsal.execute(update)
        with pytest.raises(CannotRehearse):
            blind.rowcount  # noqa: B018 - the use is the test
        with pytest.raises(CannotRehearse):
            rehearsal.execute(update.returning(messages.c.id))
        with pytest.raises(CannotRehearse):
            rehearsal.execute(text("SELECT 1"))
        row = {"source": "a", "delivery_id": "b", "received_at": 1.0}
        assert insert_ignore(rehearsal, deliveries, row, ["source", "delivery_id"])
    assert count(runtime, deliveries) == 0 and count(runtime, messages) == 0


def rehearse_count_then_insert(runtime, delivery_id: str) -> Rehearsal:
    with reader(runtime.engine) as conn:
        rehearsal = Rehearsal(conn)
        assert rehearsal.execute(select(func.count()).select_from(events)).scalar_one() == 0
        row = {"source": "a", "delivery_id": delivery_id, "received_at": 1.0}
        insert_ignore(rehearsal, deliveries, row, ["source", "delivery_id"])
    return rehearsal


def test_apply_runs_the_statements_only_while_the_reads_return_what_the_rehearsal_saw(runtime):
    first = rehearse_count_then_insert(runtime, "b1")
    late = rehearse_count_then_insert(runtime, "b2")
    with runtime.engine.begin() as conn:
        assert apply(conn, [first])
    assert count(runtime, deliveries) == 1

    ingest(runtime, [order()])  # the count now reads 1
    with runtime.engine.begin() as conn:
        assert not apply(conn, [late])
        # Rolled back to before it, inside the same transaction, which goes on.
        assert conn.execute(select(func.count()).select_from(deliveries)).scalar_one() == 1
    assert count(runtime, deliveries) == 1


@pytest.mark.slow
def test_two_sync_gunicorn_workers_on_one_sqlite_file_record_each_event_once(tmp_path):
    """The deployment rehearsals are for: processes that each write their own commits. Many
    events share numbers, so rehearsals go stale and are worked out again under the lock."""
    url = f"sqlite:///{tmp_path / 'txsms.db'}"
    config = tmp_path / "txsms.toml"
    config.write_text(
        to_toml(
            {
                "server": {"public_url": "https://sms.example.test"},
                "storage": {"url": url, "data_dir": str(tmp_path)},
                "security": {"keys": [KEY], "index_key": INDEX_KEY, "api_tokens": [API_TOKEN]},
                "sender": {"name": "Test Shop", "timezone": "UTC"},
            }
        )
    )
    env = {**os.environ, "TXSMS_CONFIG": str(config)}
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "txsms", "db", "upgrade"], env=env, check=True, timeout=60)
    port = free_port()
    with open(tmp_path / "gunicorn.log", "ab") as log:
        server = subprocess.Popen(
            [
                bin_dir / "gunicorn",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                # The app is made in the master, then forked: each worker must open its own
                # connections (storage's fork guard), not share the master's.
                "--preload",
                "txsms.webhooks:create_app()",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(base), timeout=30)
        total, size = 400, 5
        batches = [
            [
                {
                    "kind": "order.created",
                    "key": f"order:{n}:created",
                    "recipient": {"phone": f"+1 415 555 {n % 20:04d}"},
                    "data": {"order": {"number": f"#{n}", "total": "$1.00"}},
                }
                for n in range(start, start + size)
            ]
            for start in range(0, total, size)
        ]
        statuses: list[int] = []

        def post(indexes: range) -> None:
            with requests.Session() as session:
                for i in indexes:
                    for _ in range(2 if i % 5 == 0 else 1):  # some batches twice
                        r = session.post(
                            f"{base}/api/v1/events",
                            json={"events": batches[i]},
                            headers={"Authorization": f"Bearer {API_TOKEN}"},
                            timeout=60,
                        )
                        statuses.append(r.status_code)

        threads = [
            threading.Thread(target=post, args=(range(k, len(batches), 4),)) for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert set(statuses) == {202} and len(statuses) == len(batches) + len(batches) // 5
    finally:
        server.terminate()
        server.wait(15)
    check = Runtime(make_config(tmp_path, url))
    try:
        with check.engine.connect() as conn:
            keys = conn.execute(select(events.c.key)).scalars().all()
            sent = conn.execute(select(messages.c.event_id, messages.c.status)).all()
            event_ids = set(conn.execute(select(events.c.id)).scalars())
    finally:
        check.close()
    assert sorted(keys) == sorted(f"order:{n}:created" for n in range(total))
    assert len(sent) == total and {status for _, status in sent} == {"pending"}
    assert {event_id for event_id, _ in sent} == event_ids


def test_statements_for_the_driver_carry_defaults_bind_processing_and_order(sqlite_runtime):
    dialect = sqlite_runtime.engine.dialect
    row = {"id": "m1", "event_id": "e1", "source": "api", "kind": "order.created"}
    sql, params = for_driver(dialect, _insert_ignore_stmt("sqlite", messages, ("id",)), row)
    # SQLite is positional: the values in the statement's order, with the columns' own
    # defaults (urgent, attempts, in_flight) that SQLAlchemy would fill at execute.
    names = sql[sql.index("(") + 1 : sql.index(")")].split(", ")
    assert dict(zip(names, params, strict=True)) == {
        **row,
        "urgent": False,
        "attempts": 0,
        "in_flight": False,
    }
    lookup = select(events.c.id).where(any_of(events.c.id, "ids", "sqlite"))
    assert for_driver(dialect, lookup, {"ids": ["a", "b"]})[1] == ('["a", "b"]',)  # as JSON
    with pytest.raises(ValueError, match="any_of"):
        for_driver(dialect, select(events.c.id).where(events.c.kind.in_(["a", "b"])), None)


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_values_taken_straight_from_the_parameters_are_sqlalchemys(dialect_name, monkeypatch):
    """`for_driver` reads an insert's or an update's values straight from its parameters
    (`_DriverBinds.direct`); SQLAlchemy's `construct_params` gives the same, for statements
    with defaults not given, a None given, bytes, and a literal in a WHERE (which takes
    SQLAlchemy's path)."""
    from sqlalchemy.dialects import postgresql, sqlite

    from txsms.core import outbox, storage

    dialect = sqlite.dialect() if dialect_name == "sqlite" else postgresql.psycopg.dialect()
    message = {"id": "m1", "event_id": None, "source": "api", "kind": "k", "attempts": None}
    event = {"id": "e1", "source": "shopify:x", "key": "order:1:created", "kind": "k"}
    event |= {"payload_enc": b"\x00token", "occurred_at": 1.5, "received_at": 2.5}
    cases = [
        (_insert_ignore_stmt(dialect_name, messages, ("id",)), message),
        (_insert_ignore_stmt(dialect_name, events, ("source", "key")), event),
        (outbox._UPDATE, {"_id": "m1", "status": "sent", "reason": None, "segments": 2}),
        (select(messages.c.id).where(messages.c.status == "sending", messages.c.id == "m1"), {}),
    ]
    compiled = storage._compiled_for_driver
    ours = [storage.for_driver(dialect, statement, row) for statement, row in cases]
    direct = [compiled(dialect, statement, tuple(row))[1].direct for statement, row in cases]
    assert [d is not None for d in direct] == [True, True, True, False]

    def sqlalchemys(*args):
        sql, binds = compiled(*args)
        return sql, dataclasses.replace(binds, direct=None)

    monkeypatch.setattr(storage, "_compiled_for_driver", sqlalchemys)
    assert [storage.for_driver(dialect, statement, row) for statement, row in cases] == ours


def test_a_statement_the_driver_path_does_not_cover_is_not_rehearsed(sqlite_runtime):
    with reader(sqlite_runtime.engine) as conn:
        rehearsal = Rehearsal(conn)
        with pytest.raises(CannotRehearse, match="any_of"):
            rehearsal.execute(select(events.c.id).where(events.c.kind.in_(["a", "b"])))
    assert rehearsal.steps == []


def test_a_frequency_cap_is_decided_from_rehearsed_reads(tmp_path, database_url):
    runtime = Runtime(make_config(tmp_path, database_url, policy={"max_per_day": 1}))
    runtime.prepare_database(migrate=True)
    try:
        ingest(runtime, [order(1)])
        applied = rehearsals("applied")
        [second] = ingest(runtime, [order(2)])
        assert rehearsals("applied") == applied + 1
        assert second.messages[0].reason == "frequency_cap"
        assert sorted((r.status, r.reason) for r in message_rows(runtime)) == [
            ("pending", None),
            ("skipped", "frequency_cap"),
        ]
    finally:
        runtime.close()


def test_a_thread_keeps_its_reader_until_it_releases_it(sqlite_runtime):
    readers = sqlite_runtime.readers
    with readers.connection() as first:
        pass
    with readers.connection() as again:
        assert again is first  # no check-out per request
    other: list = []

    def elsewhere() -> None:
        with readers.connection() as conn:
            other.append(conn)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join(10)
    assert other and other[0] is not first
    readers.release()
    assert first.closed
    with readers.connection() as fresh:
        assert fresh is not first and fresh.execute(select(1)).scalar_one() == 1
    readers.close()
    assert fresh.closed and other[0].closed


def test_a_reader_that_fails_is_replaced(sqlite_runtime):
    readers = sqlite_runtime.readers
    with pytest.raises(DBAPIError), readers.connection() as broken:
        broken.execute(text("SELECT * FROM no_such_table"))
    with readers.connection() as conn:
        assert conn is not broken and conn.execute(select(1)).scalar_one() == 1


def test_once_commits_are_grouped_a_thread_gives_its_reader_back(runtime):
    checked_out = runtime.engine.pool.checkedout
    ingest(runtime, [order(1)])  # one request at a time: rehearsed, the reader kept
    held = checked_out()
    committer = _committer(runtime)
    committer.submit(rehearsed(runtime, [order(2)])).result(10)  # callers overlapped
    assert committer.grouping

    [result] = ingest(runtime, [order(3)])

    assert result.status == "accepted"
    assert checked_out() == held - 1


def test_a_column_default_fills_only_a_column_not_given(sqlite_runtime):
    dialect = sqlite_runtime.engine.dialect
    stmt = _insert_ignore_stmt("sqlite", messages, ("id",))
    row = {"id": "m1", "event_id": "e1", "source": "api", "kind": "k", "attempts": None}
    sql, params = for_driver(dialect, stmt, row)
    names = sql[sql.index("(") + 1 : sql.index(")")].split(", ")
    given = dict(zip(names, params, strict=True))
    assert given["attempts"] is None  # a None given stays None
    assert given["in_flight"] == 0  # not given: its default, as SQLite stores a boolean


def test_rehearsed_reads_come_back_as_sqlalchemy_would_hand_them(any_runtime):
    runtime = any_runtime
    ingest(runtime, [order(1)])
    with runtime.readers.connection() as conn:
        rehearsal = Rehearsal(conn)
        query = select(messages.c.urgent, messages.c.attempts, messages.c.kind.label("what"))
        [row] = rehearsal.execute(query).all()
        assert (row.urgent, row.attempts, row.what) == (False, 0, "order.created")
        assert row.urgent is False  # SQLite stores 0: converted as SQLAlchemy converts it
        assert rehearsal.execute(select(literal(True))).scalar_one() is True
        nothing = select(events.c.id).where(events.c.key == "none")
        assert rehearsal.execute(nothing).first() is None
        assert rehearsal.execute(nothing).scalar() is None
        with pytest.raises(NoResultFound):
            rehearsal.execute(nothing).one()
    assert [len(step.rows) for step in rehearsal.steps] == [1, 1, 0, 0, 0]


def test_a_read_only_a_held_back_update_changes_is_checked_when_applied(any_runtime):
    """A known order, then one request with its paid (newer) and fulfilled (older) deliveries:
    paid updates the stored context (a write whose result is not used), fulfilled reads it.
    Only that read can tell that fulfilled is stale: no insert conflicts."""

    def step(kind: str, modified: float) -> Event:
        return Event(
            source="api",
            kind=kind,
            key=f"order:1:{kind}",
            order=OrderRef("o1", modified_at=modified),
            data={"order": {"number": "#1", "total": "$5.00"}},
        )

    ingest(any_runtime, [order(1, order=OrderRef("o1", modified_at=100.0))])
    redone = rehearsals("redone")

    paid, fulfilled = ingest(
        any_runtime, [step("order.paid", 200.0), step("order.fulfilled", 150.0)]
    )

    assert (paid.status, fulfilled.status) == ("accepted", "stale")
    assert rehearsals("redone") == redone + 1


def test_grouped_requests_are_worked_out_in_the_transaction_and_applied(any_runtime):
    committer = _committer(any_runtime)
    committer.submit(rehearsed_inside(any_runtime, [order(0)])).result(10)  # callers overlapped
    assert committer.grouping
    applied = rehearsals("applied")
    results: list = []

    def post(n: int) -> None:
        results.extend(ingest(any_runtime, [order(n, phone=f"+1 415 555 01{n % 3:02d}")]))

    threads = [threading.Thread(target=post, args=(n,)) for n in range(1, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(r.status for r in results) == ["accepted"] * 12
    assert rehearsals("applied") > applied  # groups of them applied, none worked out twice
    assert rehearsals("applied") - applied <= 12
    rows = message_rows(any_runtime)
    assert len(rows) == 13 and {r.status for r in rows} == {"pending"}
    assert {r.id for r in rows} >= {d.id for r in results for d in r.messages}


def protocol_turns(trace: Path) -> list[tuple[str, str]]:
    """libpq's trace of the protocol (regress mode) in turns: ("F", all the client sent before
    the server answered), ("B", the server's answer), and so on."""
    turns: list[tuple[str, str]] = []
    for line in trace.read_text().splitlines():
        side = line[0] if line[:2] in ("F\t", "B\t") else None  # else: a statement's next line
        if side and (not turns or turns[-1][0] != side):
            turns.append((side, ""))
        turns[-1] = (turns[-1][0], turns[-1][1] + line + "\n")
    return turns


@contextmanager
def traced_runtime(config, trace: Path) -> Iterator[Runtime]:
    """A runtime whose connections write libpq's trace of the protocol (regress mode) to
    `trace`."""
    from psycopg import pq

    engine = storage.make_engine(config.storage)
    with open(trace, "w") as out:

        @sqlalchemy_event.listens_for(engine, "connect")
        def traced(dbapi_conn, _record):
            dbapi_conn.pgconn.trace(out.fileno())
            dbapi_conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

        runtime = Runtime(config, engine=engine)
        try:
            yield runtime
        finally:
            runtime.close()


def protocol_messages(turn: str) -> list[str]:
    return [line.split("\t")[2] for line in turn.splitlines() if line[:2] == "F\t"]


def assert_sent_whole(turn: str) -> None:
    """The round trip went out whole before the server answered any of it, ended by one Sync
    and nothing after it (psycopg alone sends a statement at a time, waits for BEGIN's answer
    before the first, syncs after BEGIN and sends a Flush after the Sync)."""
    messages = protocol_messages(turn)
    assert messages.count("Sync") == 1 and messages[-1] == "Sync", messages
    assert "Flush" not in messages


def assert_in_order(text: str, parts: list[str]) -> None:
    assert [text.index(part) for part in parts] == sorted(text.index(part) for part in parts)


def test_on_postgresql_a_delivery_that_reads_is_two_round_trips_each_sent_whole(
    pg_runtime, tmp_path
):
    """An order's later event reads what is stored (the order's context, the number): BEGIN
    goes with the look-ups, the writes with their COMMIT: libpq's own trace of the protocol."""
    with traced_runtime(pg_runtime.config, tmp_path / "libpq.trace") as runtime:
        [result] = ingest(runtime, [paid_order(1)])

    assert result.messages[0].status == "pending"
    sent = [text for side, text in protocol_turns(tmp_path / "libpq.trace") if side == "F"]
    assert len(sent) == 3 and "Terminate" in sent[2]  # two round trips, then closing
    looks, writes = sent[:2]
    assert '"BEGIN"' in looks and "SELECT 'recipient' AS part" in looks
    for turn in (looks, writes):
        assert_sent_whole(turn)
    assert_in_order(
        writes, ["SAVEPOINT rehearsal", "INSERT INTO events", "INSERT INTO messages", '"COMMIT"']
    )


def test_on_postgresql_a_new_order_for_a_familiar_number_is_one_round_trip(pg_runtime, tmp_path):
    """The first order for a number reads it (two round trips) and stores it; the number's
    next new order (`order.created`) is worked out on assumptions instead of look-ups: the
    number as stored, the order unseen, the source enabled. One round trip holds BEGIN, the
    check of what the inserts cannot check, the inserts, and COMMIT."""
    with traced_runtime(pg_runtime.config, tmp_path / "libpq.trace") as runtime:
        first, second = (ingest(runtime, [new_order(n)])[0] for n in (1, 2))
        familiar = pipeline._familiar(runtime)

    assert [r.messages[0].status for r in (first, second)] == ["pending", "pending"]
    assert pg_runtime.vault.index("+14155550100") in familiar
    sent = [text for side, text in protocol_turns(tmp_path / "libpq.trace") if side == "F"]
    assert len(sent) == 4 and "Terminate" in sent[3]  # two round trips, one, then closing
    looks, writes, assumed = sent[:3]
    assert "SELECT 'recipient' AS part" in looks and "INSERT INTO recipients" in writes
    assert_sent_whole(assumed)
    assert assumed.count('"BEGIN"') == 1  # psycopg begins no second one after it
    assert "SELECT 'recipient' AS part" not in assumed
    assert_in_order(assumed, ['"BEGIN"', '"SELECT CAST(CASE WHEN'])
    # BEGIN, SAVEPOINT, the check, the events, order_context and messages rows, COMMIT: the
    # statements but the check prepared in the first order's round trip, bound by name here.
    assert protocol_messages(assumed).count("Bind") == 7


def _opt_out(conn, runtime, index):
    consent.record(conn, runtime.vault, index, scope="all", action="opt_out", source="reply")


def _category_off(conn, runtime, index):
    consent.set_preference(conn, index, "orders", False)


def _marked_invalid(conn, runtime, index):
    recipients_ = storage.recipients
    where = recipients_.c.phone_index == index
    conn.execute(recipients_.update().where(where).values(invalid_reason="invalid_phone"))


def _shop_uninstalled(conn, runtime, index):
    pipeline.set_source_disabled(conn, "api", "uninstalled")


@pytest.mark.parametrize(
    ("change", "reason", "still_familiar"),
    [
        (_opt_out, "opted_out", False),
        (_category_off, "category_off", False),
        (_marked_invalid, "invalid_phone", False),
        (_shop_uninstalled, "source_disabled", True),
    ],
)
def test_on_postgresql_what_another_process_changed_is_decided_on_not_what_was_assumed(
    pg_runtime, change, reason, still_familiar
):
    """A number this process knows as familiar, then changed by another process (a STOP, a
    preference, a provider's verdict) or its shop uninstalled: the next new order's check
    fails, the order is read and decided on what the database says, and the number is
    familiar only if it still is."""
    index = pg_runtime.vault.index("+14155550100")
    ingest(pg_runtime, [new_order(1)])
    assert index in pipeline._familiar(pg_runtime)  # stored new by that commit
    with pg_runtime.engine.begin() as conn:
        change(conn, pg_runtime, index)
    redone, applied = rehearsals("redone"), rehearsals("applied")

    [result] = ingest(pg_runtime, [new_order(2)])

    [decision] = result.messages
    assert (decision.status, decision.reason) == ("skipped", reason)
    # Not applied on the assumptions; applied as read (not worked out the slow way).
    assert (rehearsals("redone"), rehearsals("applied")) == (redone + 1, applied + 1)
    assert (index in pipeline._familiar(pg_runtime)) is still_familiar
    [row] = [r for r in message_rows(pg_runtime) if r.id == decision.id]
    assert (row.status, row.reason) == ("skipped", reason)


def test_on_postgresql_a_stop_before_any_order_is_honoured_by_the_first_one(pg_runtime):
    """A number can say STOP before anything was addressed to it: a ledger entry and no
    recipients row. Its first order reads it (a number this process has not met), is
    skipped, and the number does not become familiar though the order stored its row."""
    index = pg_runtime.vault.index("+14155550100")
    with pg_runtime.engine.begin() as conn:
        _opt_out(conn, pg_runtime, index)

    [result] = ingest(pg_runtime, [new_order(1)])

    [decision] = result.messages
    assert (decision.status, decision.reason) == ("skipped", "opted_out")
    assert index not in pipeline._familiar(pg_runtime)


def test_on_postgresql_a_new_order_another_receiver_stored_first_is_addressed_from_it(pg_runtime):
    """`order.created` is assumed to be an order not seen yet. Another receiver stored it first
    (its payment event came first, with the number): the insert of its context fails, and the
    order is read and worked out again, addressed from what the other stored."""
    other = Runtime(pg_runtime.config)
    try:
        ingest(other, [paid_order(7)])
    finally:
        other.close()
    redone = rehearsals("redone")

    [result] = ingest(pg_runtime, [new_order(7, phone=None)])

    [decision] = result.messages
    assert decision.status == "pending"  # as a new order it would be skipped: unknown_order
    assert rehearsals("redone") == redone + 1


def test_on_postgresql_a_pipeline_that_fails_leaves_no_statement_the_server_never_prepared(
    pg_runtime,
):
    """psycopg prepares a statement on its sixth use and, when that use is in a pipeline that
    failed at an earlier statement, never learns that the server skipped it: every later
    delivery on the connection failed with it and was worked out the slow way. Duplicate
    deliveries (which fail their pipeline at the first insert) between new ones: each new one
    is still applied at once."""
    redone, applied = rehearsals("redone"), rehearsals("applied")

    for n in range(1, 13):
        [result] = ingest(pg_runtime, [new_order(n)], delivery=("api", f"d-{n}"))
        assert result.messages[0].status == "pending"
        assert ingest(pg_runtime, [new_order(100 + n)], delivery=("api", f"d-{n}")) is None

    # Each duplicate: on assumptions, then on reads, both refused by its delivery's row.
    assert rehearsals("redone") == redone + 2 * 12
    assert rehearsals("applied") == applied + 12


def test_on_postgresql_new_orders_that_share_a_commit_are_assumed_and_checked_together(
    pg_runtime, monkeypatch
):
    """Deliveries that share a commit (`-k gthread`, `txsms serve`) are worked out together:
    one check for all their numbers. One of the three said STOP after it was met: the check
    fails, the group is read and worked out again, and only that number's order is skipped."""
    assumed: list = []
    assuming = Rehearsal.assume
    monkeypatch.setattr(
        Rehearsal, "assume", lambda self, *a: assumed.append(a) or assuming(self, *a)
    )
    phones = [f"+1 415 555 01{n:02d}" for n in range(3)]
    for n, phone in enumerate(phones):  # each number met
        ingest(pg_runtime, [new_order(n, phone=phone)])
    committer = _committer(pg_runtime)

    def group(first: int) -> list:
        requests = [
            rehearsed_inside(pg_runtime, [new_order(first + n, phone=p)])
            for n, p in enumerate(phones)
        ]
        with committer._writing:
            return [result for [result] in committer._commit(requests)]

    applied, redone = rehearsals("applied"), rehearsals("redone")
    assert [r.messages[0].status for r in group(10)] == ["pending"] * 3
    assert (rehearsals("applied"), rehearsals("redone")) == (applied + 1, redone)
    [(_, check)] = assumed
    assert sorted(check["indexes"]) == sorted(
        pg_runtime.vault.index(f"+1415555010{n}") for n in range(3)
    )
    with pg_runtime.engine.begin() as conn:
        _opt_out(conn, pg_runtime, pg_runtime.vault.index("+14155550101"))

    decided = [(r.messages[0].status, r.messages[0].reason) for r in group(20)]

    assert decided == [("pending", None), ("skipped", "opted_out"), ("pending", None)]
    assert (rehearsals("applied"), rehearsals("redone")) == (applied + 2, redone + 1)


def test_on_postgresql_statements_the_session_lost_cost_one_delivery_a_second_look(pg_runtime):
    """psycopg deallocates every statement prepared on the session when it sees a rollback
    while it has some of its own prepared (a pooler between may do it too), those the writes
    are bound to (`core/libpq.py`) with them. The next new order's round trip fails on one:
    it is read, decided and stored all the same, and the order after it is one round trip
    again."""
    ingest(pg_runtime, [new_order(1)])
    ingest(pg_runtime, [new_order(2)])  # the number familiar: on assumptions
    committer = _committer(pg_runtime)
    with committer._writing, committer._begin() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")
    redone, applied = rehearsals("redone"), rehearsals("applied")

    [result] = ingest(pg_runtime, [new_order(3)])

    assert result.messages[0].status == "pending"
    assert (rehearsals("redone"), rehearsals("applied")) == (redone + 1, applied + 1)
    [result] = ingest(pg_runtime, [new_order(4)])
    assert (rehearsals("redone"), rehearsals("applied")) == (redone + 1, applied + 2)
    assert count(pg_runtime, events) == 4 and len(message_rows(pg_runtime)) == 4


def test_on_postgresql_without_psycopgs_internals_the_work_goes_through_its_cursor(
    pg_runtime, monkeypatch
):
    """`core/libpq.py` leans on psycopg internals; with a psycopg without them, the look-ups
    and the writes with COMMIT go through psycopg's own cursor and pipeline, and are applied
    all the same (the reads checked again: the test below)."""
    monkeypatch.setattr(libpq, "PostgresQuery", None)
    ingest(pg_runtime, [new_order(1)])
    applied, redone = rehearsals("applied"), rehearsals("redone")

    [result] = ingest(pg_runtime, [new_order(2)])  # familiar: the writes alone, checked
    ingest(pg_runtime, [new_order(1)])  # a duplicate: fails, is read, and stays one

    assert result.messages[0].status == "pending"
    assert (rehearsals("applied"), rehearsals("redone")) == (applied + 1, redone + 2)
    assert count(pg_runtime, events) == 2
    committer = _committer(pg_runtime)
    with committer._writing, committer._begin() as conn:  # the session the writes went on
        prepared = conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars()
        assert not [name for name in prepared if name.startswith("txsms_")]


@pytest.mark.parametrize("internals", [True, False], ids=["libpq", "psycopg"])
def test_on_postgresql_a_read_after_held_back_writes_is_checked_in_their_round_trip(
    tmp_path, monkeypatch, internals
):
    """A daily cap counts the number's messages after the delivery's own writes are held
    back: the writes and that count go in one round trip (`libpq.rows`, or psycopg's pipeline
    without the internals it needs), the count is compared with the rehearsal's, and the
    delivery is applied."""
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    sent: list[list[str]] = []
    rows = libpq.rows
    monkeypatch.setattr(
        libpq, "rows", lambda conn, s, **kw: sent.append([q for q, _ in s]) or rows(conn, s, **kw)
    )
    if not internals:
        monkeypatch.setattr(libpq, "PostgresQuery", None)
    with pg_schema() as url:
        runtime = Runtime(make_config(tmp_path, url, policy={"max_per_day": 1}))
        runtime.prepare_database(migrate=True)
        try:
            ingest(runtime, [order(1)])
            applied, redone = rehearsals("applied"), rehearsals("redone")
            sent.clear()

            [second] = ingest(runtime, [order(2)])

            assert second.messages[0].reason == "frequency_cap"
            assert (rehearsals("applied"), rehearsals("redone")) == (applied + 1, redone)
            assert sorted(r.status for r in message_rows(runtime)) == ["pending", "skipped"]
        finally:
            runtime.close()
    [statements] = sent
    assert statements[0] == "SAVEPOINT rehearsal"
    assert any(q.startswith("INSERT INTO messages") for q in statements)
    assert any(q.startswith("SELECT count(*)") for q in statements)
