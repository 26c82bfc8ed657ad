"""The worker against a fake Twilio over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise

import pytest
from conftest import PG_SKIP, make_config, pg_schema, twilio_section
from fakes import deadlock, notifications_until, query_plan, statements_run, wait_until
from fakes.twilio import Delay, Drop, Reply
from prometheus_client import REGISTRY
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from txsms.core import consent, outbox
from txsms.core.events import Event, Recipient
from txsms.core.pipeline import ingest
from txsms.core.ratelimit import RateLimiter
from txsms.core.runtime import Runtime
from txsms.core.storage import messages, outbox_waiters, rate_limits, recipients
from txsms.core.worker import Worker

PHONE = "+14155550100"


def event(key="order:1:created", phone=PHONE, kind="order.created"):
    return Event(
        source="api",
        kind=kind,
        key=key,
        recipient=Recipient(phone=phone, name="Ada"),
        data={"order": {"number": "#1", "total": "$5.00"}},
    )


def message(runtime, key="order:1:created"):
    with runtime.engine.connect() as conn:
        return conn.execute(
            select(messages).where(messages.c.idempotency_key == f"api|{key}|order.created")
        ).one()


def drain(worker: Worker, until, timeout=10.0):
    """Run the worker loop by hand until `until()` holds."""
    return wait_until(lambda: worker.run_once() is not None and until(), timeout=timeout)


def test_sends_once_with_twilio_shapes_and_the_footer_first_time(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    worker = Worker(runtime)
    ingest(runtime, [event("k1"), event("k2")])
    drain(worker, lambda: len(fake_twilio.messages) == 2)
    assert worker.run_once() == 0
    first, second = fake_twilio.requests
    assert first.form["To"] == PHONE and first.form["From"]
    assert first.form["StatusCallback"] == (
        "https://sms.example.test/webhooks/providers/twilio/status"
    )
    assert first.form["Body"].endswith("Reply STOP to opt out.")
    assert "Reply STOP" not in second.form["Body"]  # the disclosure goes with the first only
    row = message(runtime, "k1")
    assert row.status == "sent" and row.provider_message_id.startswith("SM")
    assert row.provider_message_id in {m["sid"] for m in fake_twilio.messages}
    footers = [
        runtime.vault.decrypt(message(runtime, k).body_enc).endswith("opt out.")
        for k in ("k1", "k2")
    ]
    assert sorted(footers) == [False, True]  # the stored body is the body that was sent


def test_503_twice_then_success_sends_one_message(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Reply(status=503), Reply(status=503))
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "sent")
    assert len(fake_twilio.requests) == 3
    assert len(fake_twilio.messages) == 1
    assert message(runtime).attempts == 3


def test_retry_after_is_honoured(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Reply(status=429, headers={"Retry-After": "2"}))
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "sent")
    first, second = fake_twilio.requests
    assert second.at - first.at >= 2.0


def test_21610_records_an_opt_out_and_stops_further_sends(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Reply(status=400, code=21610))
    worker = Worker(runtime)
    ingest(runtime, [event("k1")])
    drain(worker, lambda: message(runtime, "k1").status == "failed")
    row = message(runtime, "k1")
    assert (row.reason, row.error_code) == ("opted_out", "21610")
    with runtime.engine.connect() as conn:
        assert consent.state(conn, runtime.vault.index(PHONE)).opted_out
        [entry] = consent.ledger(conn, runtime.vault, runtime.vault.index(PHONE))
    assert entry["source"] == "provider:twilio" and entry["evidence"]["error_code"] == "21610"
    ingest(runtime, [event("k2")])
    assert message(runtime, "k2").reason == "opted_out"
    assert len(fake_twilio.requests) == 1


def test_opt_out_between_ingest_and_send_is_honoured(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    ingest(runtime, [event()])
    with runtime.engine.begin() as conn:
        consent.record(
            conn,
            runtime.vault,
            runtime.vault.index(PHONE),
            scope="all",
            action="opt_out",
            source="test",
        )
    Worker(runtime).run_once()
    assert (message(runtime).status, message(runtime).reason) == ("skipped", "opted_out")
    assert fake_twilio.requests == []


def test_invalid_number_marks_the_recipient(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Reply(status=400, code=21211))
    worker = Worker(runtime)
    ingest(runtime, [event("k1")])
    drain(worker, lambda: message(runtime, "k1").status == "failed")
    assert message(runtime, "k1").reason == "invalid_phone"
    assert "+1415" not in (message(runtime, "k1").error_text or "")
    with runtime.engine.connect() as conn:
        reason = conn.execute(select(recipients.c.invalid_reason)).scalar_one()
    assert reason == "provider:21211"
    ingest(runtime, [event("k2")])
    assert message(runtime, "k2").reason == "invalid_phone"


def test_dropped_connection_is_unknown_and_never_resent(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Drop())
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "unknown")
    for _ in range(3):
        worker.run_once()
    assert len(fake_twilio.requests) == 1


def test_read_timeout_is_unknown(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio, timeout_seconds=0.3))
    fake_twilio.script(Delay(1.0))
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "unknown")
    assert message(runtime).error_text


def test_permanent_error_fails_with_code_and_text(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    fake_twilio.script(Reply(status=401, code=20003))
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "failed")
    row = message(runtime)
    assert (row.reason, row.error_code, row.error_text) == (
        "provider_error",
        "20003",
        "Authenticate",
    )


def test_retries_stop_after_max_attempts(runtime_factory, fake_twilio):
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio),
        worker={"max_attempts": 2, "backoff_base_seconds": 0.05},
    )
    fake_twilio.script(*[Reply(status=503)] * 5)
    worker = Worker(runtime)
    ingest(runtime, [event()])
    drain(worker, lambda: message(runtime).status == "failed")
    assert message(runtime).reason == "retries_exhausted"
    assert len(fake_twilio.requests) == 2


def test_expired_lease_is_taken_over_unless_in_flight(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    ingest(runtime, [event("k1"), event("k2")])
    with runtime.engine.begin() as conn:  # a worker claims both, then dies
        claimed = outbox.claim(conn, "dead-worker", lease=-1, limit=10)
        outbox.update(conn, claimed[0].id, in_flight=True)  # the first was on the wire
    assert len(claimed) == 2
    worker = Worker(runtime)
    worker.run_once()
    drain(worker, lambda: len(fake_twilio.messages) == 1)
    by_id = {r.id: r for r in (message(runtime, "k1"), message(runtime, "k2"))}
    assert by_id[claimed[0].id].status == "unknown"
    assert by_id[claimed[0].id].reason == "interrupted"
    assert by_id[claimed[1].id].status == "sent"


def test_a_claim_takes_over_first_then_reads_the_queue_off_its_index_oldest_first(runtime):
    """Abandoned claims first, then the oldest due messages; the due ones come off
    `ix_messages_due` in `send_at` order, with no sort of the whole queue (which made a claim
    cost grow with the number of messages waiting)."""
    ingest(runtime, [event(f"k{n}") for n in range(12)])
    with runtime.engine.begin() as conn:  # a worker claims the newest, then dies
        newest = conn.execute(
            select(messages.c.id).order_by(messages.c.send_at.desc()).limit(1)
        ).scalar_one()
        spread = [(n, r.id) for n, r in enumerate(conn.execute(select(messages.c.id)))]
        for n, message_id in spread:  # distinct send_at, in an order unlike insertion
            outbox.update(conn, message_id, send_at=time.time() - 100 - (n * 7) % 12)
        outbox.update(conn, newest, status="sending", lease_until=0.0, claimed_by="dead")
    with statements_run(runtime.engine) as statements, runtime.engine.begin() as conn:
        rows = outbox.claim(conn, "w", lease=60, limit=5)
    with runtime.engine.connect() as conn:
        due = conn.execute(
            select(messages.c.id)
            .where(messages.c.id != newest)
            .order_by(messages.c.send_at)
            .limit(4)
        ).scalars()
        assert {r.id for r in rows} == {newest, *due}
        [(sql, params)] = [(q, p) for q, p in statements if "IN ('pending', 'deferred')" in q]
        plan = query_plan(conn, sql, params)
        assert "ix_messages_due" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # SQLite, PostgreSQL


def test_scheduled_message_waits_for_send_at(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    later = time.time() + 0.6
    ingest(
        runtime,
        [
            Event(
                source="api",
                kind="order.created",
                key="s",
                send_at=later,
                recipient=Recipient(phone=PHONE),
            )
        ],
    )
    worker = Worker(runtime)
    assert worker.run_once() == 0
    drain(worker, lambda: len(fake_twilio.requests) == 1)
    assert fake_twilio.requests[0].at >= 0  # sent after send_at
    row = message(runtime, "s")
    assert row.sent_at >= later


def test_rate_limit_holds_across_workers(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio, rate_per_second=5))
    ingest(runtime, [event(f"k{n}") for n in range(10)])
    workers = [Worker(runtime, concurrency=2), Worker(runtime, concurrency=2)]  # one limit
    for worker in workers:
        worker.start()
    try:
        fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 10, timeout=15)
    finally:
        for worker in workers:
            worker.stop()
    arrivals = sorted(r.at for r in fake_twilio.requests)
    for first in arrivals:  # never more than 5 in any one-second window
        assert len([t for t in arrivals if first <= t < first + 1.0]) <= 5
    assert arrivals[-1] - arrivals[0] >= 9 / 5  # ten requests spaced at least 1/rate apart


def _in_flight(runtime) -> list[bool]:
    with runtime.engine.connect() as conn:
        return [r[0] for r in conn.execute(select(messages.c.in_flight))]


def test_in_flight_window_is_wider_only_at_high_rates_where_the_provider_can_be_asked(
    runtime_factory, fake_twilio
):
    def window(rate: float, provider: dict | None = None, **worker) -> int:
        provider = provider or twilio_section(fake_twilio)
        runtime = runtime_factory(provider={**provider, "rate_per_second": rate}, worker=worker)
        return Worker(runtime).window

    # About 50 ms of sending per commit, 1 up to half a batch of 50: a crash's window is
    # settled by looking each message up, and at low rates a commit per message costs nothing.
    assert [window(rate) for rate in (1, 10, 40, 100, 400, 1000)] == [1, 1, 2, 5, 20, 25]
    vonage = {"kind": "vonage", "api_key": "k", "api_secret": "s", "from": "TXSMS"}
    assert window(1000, vonage) == 1  # no look-up: one message in flight at a time
    assert window(1000, in_flight_window=1) == 1
    assert window(1, in_flight_window=3) == 3


def test_a_window_is_marked_in_flight_before_its_first_request(runtime_factory, fake_twilio):
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio), worker={"lease_seconds": 0.5, "in_flight_window": 8}
    )
    keys = [f"k{n}" for n in range(5)]
    ingest(runtime, [event(key) for key in keys])
    fake_twilio.script(Delay(1.0))
    worker = Worker(runtime)
    worker.start()
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
    assert _in_flight(runtime) == [True] * 5  # one commit before the first request left
    worker.stop()  # the first request finishes; the other four never left
    assert len(fake_twilio.requests) == 1
    rows = [message(runtime, key) for key in keys]
    assert sorted(r.status for r in rows) == ["sending"] * 4 + ["sent"]
    assert not any(_in_flight(runtime))  # given back, not left to become `unknown`
    drain(Worker(runtime), lambda: len(fake_twilio.messages) == 5)
    rows = [message(runtime, key) for key in keys]
    assert [r.status for r in rows] == ["sent"] * 5
    assert len({r.provider_message_id for r in rows}) == 5
    assert len(fake_twilio.requests) == 5  # each message left once


def test_a_window_of_one_marks_one_message_at_a_time(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio), worker={"in_flight_window": 1})
    ingest(runtime, [event(f"k{n}") for n in range(3)])
    fake_twilio.script(Delay(1.0))
    worker = Worker(runtime)
    worker.start()
    try:
        fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
        assert sorted(_in_flight(runtime)) == [False, False, True]
        fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 3)
    finally:
        worker.stop()


def test_a_window_of_one_records_each_result_with_the_next_mark(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio), worker={"in_flight_window": 1})
    keys = ["k0", "k1", "k2"]
    ingest(runtime, [event(key) for key in keys])
    fake_twilio.script(Reply(), Delay(2.0))  # the second request is held at the provider
    worker = Worker(runtime)
    worker.start()
    try:
        fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 2)
        # The first result went with the second message's in-flight mark, not the batch's end.
        statuses = sorted(message(runtime, key).status for key in keys)
        assert statuses == ["sending", "sending", "sent"]
    finally:
        worker.stop()


def test_stop_confirmation_goes_out_beside_a_skipped_message_in_the_same_batch(
    runtime_factory, fake_twilio
):
    from types import SimpleNamespace

    from txsms.core.providers import InboundMessage
    from txsms.core.returnpath import REPLY_KIND, _queue_reply

    runtime = runtime_factory(provider=twilio_section(fake_twilio))
    ingest(runtime, [event("k1")])  # queued before the STOP
    index = runtime.vault.index(PHONE)
    with runtime.engine.begin() as conn:
        consent.record(conn, runtime.vault, index, scope="all", action="opt_out", source="sms")
        inbound = InboundMessage(sender=PHONE, text="STOP", provider_message_id="SMin1")
        provider = SimpleNamespace(name="twilio")
        _queue_reply(runtime, conn, provider, PHONE, index, "You are unsubscribed.", inbound)
    worker = Worker(runtime)
    assert worker.run_once() == 2  # one claimed batch holds both
    assert [r.form["Body"] for r in fake_twilio.requests] == ["You are unsubscribed."]
    assert (message(runtime, "k1").status, message(runtime, "k1").reason) == (
        "skipped",
        "opted_out",
    )
    with runtime.engine.connect() as conn:
        reply = conn.execute(select(messages).where(messages.c.kind == REPLY_KIND)).one()
    assert reply.status == "sent"


def test_a_window_records_when_each_message_was_sent(runtime_factory, fake_twilio):
    runtime = runtime_factory(provider=twilio_section(fake_twilio), worker={"in_flight_window": 8})
    keys = [f"k{n}" for n in range(3)]
    ingest(runtime, [event(key) for key in keys])
    fake_twilio.script(Reply(), Reply(), Delay(0.5))  # the last answer takes half a second
    worker = Worker(runtime)
    assert worker.run_once() == 3  # one window: all three results recorded together
    first, _, last = (message(runtime, key) for key in keys)
    assert (first.status, last.status) == ("sent", "sent")
    assert last.sent_at - first.sent_at >= 0.5  # the answers' times, not the commit's


def test_marking_in_flight_starts_the_lease_again(runtime):
    """A claim may wait behind earlier windows and batches before its requests leave: the
    lease counts from the mark, so a live worker's requests are not taken for a dead one's."""
    ingest(runtime, [event("k1")])
    with runtime.engine.begin() as conn:
        [row] = outbox.claim(conn, "claim-1", lease=5.0, limit=10)
        conn.execute(messages.update().values(lease_until=time.time() - 1))  # waited long
    before = time.time()
    with runtime.engine.begin() as conn:
        owned = outbox.mark_in_flight(conn, [row.id], "claim-1", "twilio", lease=5.0)
    assert owned == {row.id}
    marked = message(runtime, "k1")
    assert marked.in_flight and marked.lease_until >= before + 5.0
    with runtime.engine.begin() as conn:
        assert outbox.sweep_interrupted(conn) == 0  # still leased: not `unknown`


def test_results_recorded_when_another_worker_deadlocks_the_transaction(
    runtime_factory, fake_twilio
):
    """The last window's results go in a transaction of their own. When the database aborts it
    for another transaction's sake (two workers' footers on the same numbers), it runs again:
    rows left in flight would become `unknown` when the lease ends, though sent."""
    runtime = runtime_factory(provider=twilio_section(fake_twilio), worker={"in_flight_window": 8})
    keys = [f"k{n}" for n in range(3)]
    ingest(runtime, [event(key) for key in keys])
    worker = Worker(runtime)
    real, aborted = runtime.relaxed, []

    @contextmanager
    def deadlocked_once():
        with real() as conn:
            yield conn
            if not aborted:  # after the work: the transaction is rolled back
                aborted.append(True)
                raise deadlock()

    runtime.relaxed = deadlocked_once  # the rate limiter keeps the real one
    assert worker.run_once() == 3
    assert aborted == [True]
    assert len(fake_twilio.requests) == 3  # sent once each, not again
    for key in keys:
        m = message(runtime, key)
        assert (m.status, m.in_flight, m.provider_message_id is not None) == ("sent", False, True)


@pytest.mark.parametrize(("rate", "held"), [(5, 0), (1000, 17), (100_000, 31)])
def test_a_process_takes_a_few_slots_at_once_only_at_high_rates(runtime, rate, held):
    """One round trip takes the slots of the next 20 ms, but never more than a process can
    use before they go late."""
    limiter = RateLimiter(runtime.autocommit, "chunk-test", rate)  # as a worker's is
    first = limiter.acquire()
    assert first is not None
    assert len(limiter._slots) == held
    slots = [first, *limiter._slots]
    # Epoch seconds are exact to about 0.2 µs.
    assert all(b - a == pytest.approx(1.1 / rate, abs=1e-6) for a, b in pairwise(slots))
    with runtime.engine.connect() as conn:  # the database holds the time after the last one
        query = select(rate_limits.c.next_at).where(rate_limits.c.name == "chunk-test")
        next_at = conn.execute(query).scalar_one()
    assert next_at == pytest.approx(first + (held + 1) * 1.1 / rate, abs=1e-6)


def test_a_batch_claimed_ahead_records_the_results_the_batch_before_left(
    runtime_factory, fake_twilio
):
    """A full batch leaves its last window's results to the batch claimed ahead, whose first
    window comes marked in flight: no transaction of its own holds up the sending thread. A
    thread that stops records what it carried and gives back what it claimed ahead."""
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio, rate_per_second=8),  # batches of 4
        worker={"in_flight_window": 2},
    )
    ingest(runtime, [event(f"k{n}") for n in range(10)])
    worker = Worker(runtime)

    def states():
        with runtime.engine.connect() as conn:
            rows = conn.execute(select(messages.c.status, messages.c.in_flight)).all()
        return sorted(f"{status}{'*' if in_flight else ''}" for status, in_flight in rows)

    assert worker.run_once(claim_ahead=True) == 4
    # Two recorded (by the claim ahead), two sent but not recorded yet, in flight (*), two
    # claimed ahead and marked, two claimed ahead, two waiting: never more than two windows
    # in flight and not recorded.
    assert states() == ["pending"] * 2 + ["sending"] * 2 + ["sending*"] * 4 + ["sent"] * 2
    # The next batch's first commit (marking its second window) records the two left; it
    # leaves its own last two, and claims the last two messages ahead, marked.
    assert worker.run_once(claim_ahead=True) == 4
    assert states() == ["sending*"] * 4 + ["sent"] * 6
    assert len(fake_twilio.requests) == 8

    worker._release_next()  # what a worker thread does when it stops
    assert states() == ["sending"] * 2 + ["sent"] * 8
    with runtime.engine.connect() as conn:
        released = conn.execute(
            select(messages.c.lease_until, messages.c.attempts).where(
                messages.c.status == "sending"
            )
        ).all()
    assert [tuple(r) for r in released] == [(0.0, 0)] * 2  # claimable at once, no attempt
    drain(Worker(runtime), lambda: len(fake_twilio.messages) == 10)
    assert states() == ["sent"] * 10
    assert len(fake_twilio.requests) == 10  # each message left once


def test_autocommit_is_relaxed_and_commits_each_statement_on_postgresql(runtime):
    """The rate limiter's connection: on PostgreSQL each statement commits by itself (no BEGIN
    and COMMIT round trips), with the relaxed engine's settings; on SQLite a relaxed
    transaction that commits when it ends."""
    statement = rate_limits.insert().values(name="autocommit-test", next_at=1.0)
    count = select(func.count()).select_from(rate_limits)
    with runtime.autocommit() as conn:
        conn.execute(statement)
        if conn.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
            with runtime.engine.connect() as other:  # committed already, seen elsewhere
                assert other.execute(count).scalar() == 1
        else:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with runtime.engine.connect() as other:
        assert other.execute(count).scalar() == 1


def test_the_rate_limiters_connection_is_kept_between_slots_and_replaced_when_lost(pg_runtime):
    """On PostgreSQL a slot is one statement on a connection the process keeps: a check-out
    and its liveness ping cost three times the statement. Threads take turns on it; a lost
    connection fails one take (the caller carries on, as after any database error) and the
    next one opens a new connection."""
    checkouts: list[object] = []
    sqlalchemy_event.listen(
        pg_runtime._relaxed_engine, "checkout", lambda *args: checkouts.append(args[0])
    )
    limiter = RateLimiter(pg_runtime.autocommit, "kept-test", 5)  # a slot per round trip
    for _ in range(3):
        assert limiter._take() is not None
        limiter._slots.clear()
        with pg_runtime.autocommit() as conn:  # the next slot is due: make it due now
            conn.execute(rate_limits.update().values(next_at=0.0))
    with ThreadPoolExecutor(4) as pool:  # four threads at once: still the one connection
        pids = set(pool.map(lambda _: backend_pid(pg_runtime), range(40)))
    assert len(pids) == 1 and len(checkouts) == 1

    with pg_runtime.engine.connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids.pop()})
    with pytest.raises(OperationalError):
        limiter._take()
    assert limiter._take() is not None  # on a new connection
    assert len(checkouts) == 2


def backend_pid(runtime) -> int:
    with runtime.autocommit() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_results_handed_to_a_claim_ahead_that_fails_are_recorded_by_the_next_commit(
    runtime_factory, fake_twilio, caplog
):
    """The claim ahead records the last results with it; when it fails (rolled back), they
    are left to the next commit, not lost in flight."""
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio, rate_per_second=8),  # batches of 4
        worker={"in_flight_window": 2},
    )
    ingest(runtime, [event(f"k{n}") for n in range(6)])
    worker = Worker(runtime)
    claim = worker._claim

    def no_claim_ahead(conn, *, mark_first=False, results=()):
        if mark_first:
            raise RuntimeError("the database went away")
        return claim(conn, results=results)

    worker._claim = no_claim_ahead
    assert worker.run_once(claim_ahead=True) == 4
    assert worker.run_once(claim_ahead=True) == 2  # claimed again, not ahead
    assert "claiming the next batch failed" in caplog.text
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(messages.c.status, messages.c.in_flight)).all()
    assert [tuple(r) for r in rows] == [("sent", False)] * 6
    assert len(fake_twilio.requests) == 6


def test_a_full_batch_claims_the_next_one_while_its_last_window_is_sent(
    runtime_factory, fake_twilio
):
    """At rates that send in windows the next batch is claimed during the last window, not
    after it; a worker that stops then gives that batch back at once, and every message still
    leaves exactly once."""
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio, rate_per_second=8),  # batches of 4
        worker={"in_flight_window": 2, "lease_seconds": 0.5},
    )
    keys = [f"k{n}" for n in range(9)]
    ingest(runtime, [event(key) for key in keys])
    fake_twilio.script(Reply(), Reply(), Delay(1.0))  # the last window's first request waits
    worker = Worker(runtime)
    assert worker.batch == 4

    def rows():
        with runtime.engine.connect() as conn:
            return conn.execute(select(messages).order_by(messages.c.created_at)).all()

    def claimed_ahead():  # not the first batch's claim, whose rows still sending are in flight
        claims: dict[str, list] = {}
        for r in rows():
            if r.status == "sending":
                claims.setdefault(r.claimed_by, []).append(r)
        return next((c for c in claims.values() if not all(r.in_flight for r in c)), [])

    worker.start()
    try:
        fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 3)
        # The third request is still on its way, and the next four are already claimed, the
        # first window of them marked in flight with the claim.
        wait_until(lambda: len(claimed_ahead()) == 4, timeout=5)
        assert len(fake_twilio.requests) == 3
        assert sorted(r.in_flight for r in claimed_ahead()) == [False, False, True, True]
        ahead = {r.id for r in claimed_ahead()}
    finally:
        worker.stop()
    assert len(fake_twilio.requests) == 3  # the fourth was never started: stopping
    released = [r for r in rows() if r.id in ahead]
    assert [(r.status, r.in_flight, r.lease_until, r.attempts) for r in released] == [
        ("sending", False, 0.0, 0)  # claimable now, and no attempt counted
    ] * 4
    drain(Worker(runtime), lambda: len(fake_twilio.messages) == 9)
    assert [r.status for r in rows()] == ["sent"] * 9
    assert len(fake_twilio.requests) == 9  # each message left once
    assert len({r.provider_message_id for r in rows()}) == 9


def test_results_recorded_by_a_commit_run_again_are_logged_and_counted_once(
    runtime_factory, fake_twilio, caplog, monkeypatch
):
    """The third window's commit (which records the first window's results) is aborted once
    as a deadlock and run again alone: each message is still logged and counted as sent once,
    by the commit that kept it."""
    runtime = runtime_factory(
        provider=twilio_section(fake_twilio, rate_per_second=12),  # a batch of 6
        worker={"in_flight_window": 2},
    )
    ingest(runtime, [event(f"k{n}") for n in range(6)])
    marks = [0]
    mark_in_flight = outbox.mark_in_flight

    def deadlocked_once(*args, **kwargs):
        marks[0] += 1
        if marks[0] == 3:
            raise deadlock()
        return mark_in_flight(*args, **kwargs)

    monkeypatch.setattr(outbox, "mark_in_flight", deadlocked_once)
    sent = ("txsms_messages_total", {"status": "sent", "reason": ""})
    before = REGISTRY.get_sample_value(*sent) or 0.0
    caplog.set_level("INFO", logger="txsms.core.worker")
    assert Worker(runtime).run_once() == 6
    assert marks[0] == 4  # that window's commit ran twice
    lines = [r.getMessage() for r in caplog.records if " sent to " in r.getMessage()]
    assert len(lines) == 6 and len(set(lines)) == 6
    assert REGISTRY.get_sample_value(*sent) - before == 6
    assert len(fake_twilio.requests) == 6


@contextmanager
def pg_worker_and_receiver(tmp_path, fake_twilio, **worker_settings):
    """A worker process's runtime and a receiver's, on one PostgreSQL schema; the worker polls
    only once a minute, so anything sent sooner was woken by a NOTIFY."""
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with pg_schema() as url:
        receiver = Runtime(make_config(tmp_path, url, provider=twilio_section(fake_twilio)))
        receiver.prepare_database(migrate=True)
        sending = Runtime(
            make_config(
                tmp_path,
                url,
                provider=twilio_section(fake_twilio),
                worker={"poll_seconds": 60, **worker_settings},
            )
        )
        try:
            yield receiver, sending
        finally:
            sending.close()
            receiver.close()


def waiters(runtime) -> list[str]:
    with runtime.engine.connect() as conn:
        return list(conn.execute(select(outbox_waiters.c.worker)).scalars())


def test_an_idle_worker_on_postgresql_is_woken_by_a_notify_only_while_it_waits(
    tmp_path, fake_twilio
):
    """Idle, the worker process keeps one row in `outbox_waiters` (one a process, whatever its
    threads), and an ingest elsewhere wakes it at once. Busy, it has none: ingest sends no
    NOTIFY, and the worker finds the message itself when it comes back for more."""
    import psycopg

    from txsms.core.notify import CHANNEL

    with pg_worker_and_receiver(tmp_path, fake_twilio, concurrency=1) as (receiver, sending):
        worker = Worker(sending)
        conninfo = receiver.engine.url.set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(conninfo, autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")

            def notified(sentinel: str) -> list[str]:
                return notifications_until(listener, receiver.engine, CHANNEL, sentinel)

            worker.start()
            try:
                wait_until(lambda: waiters(receiver) == [worker.worker_id])
                with receiver.engine.connect() as conn:
                    left = conn.execute(
                        select(outbox_waiters.c.until - func.extract("epoch", func.now()))
                    ).scalar_one()
                assert left > 2 * 60  # outlives two polls: renewed after a wait, not during
                fake_twilio.script(Delay(2.0))  # the first message holds the only thread
                ingest(receiver, [event("k1")])
                fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
                assert waiters(receiver) == []  # busy: no NOTIFY wanted
                assert notified("after-k1") == [""]  # k1's
                ingest(receiver, [event("k2")])
                assert notified("after-k2") == []  # none for k2
                fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 2, timeout=10)
                wait_until(lambda: waiters(receiver) == [worker.worker_id])  # idle again
                ingest(receiver, [event("k3")])
                fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 3)
            finally:
                worker.stop()
        assert [message(sending, k).status for k in ("k1", "k2", "k3")] == ["sent"] * 3
        assert waiters(receiver) == []  # stopped: the row went with it


def test_a_worker_that_starts_waiting_looks_again_for_what_committed_before_it_said_so(
    tmp_path, fake_twilio, monkeypatch
):
    """A message committed between the worker's last empty look and its row in
    `outbox_waiters` sent no NOTIFY: the worker finds it by looking once more, not at the poll a
    minute later."""
    from txsms.core.notify import Waiting

    with pg_worker_and_receiver(tmp_path, fake_twilio, concurrency=1) as (receiver, sending):
        enter = Waiting.enter
        slipped: list[bool] = []

        def enter_after_an_ingest(self) -> bool:
            if not slipped:
                slipped.append(True)
                ingest(receiver, [event("slipped")])  # no row yet: no NOTIFY
            return enter(self)

        monkeypatch.setattr(Waiting, "enter", enter_after_an_ingest)
        worker = Worker(sending)
        worker.start()
        try:
            fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)
        finally:
            worker.stop()
        assert message(sending, "slipped").status == "sent"


def test_waiting_threads_share_one_row_that_goes_with_the_last_and_runs_out(pg_runtime):
    from txsms.core.notify import Waiting

    waiting = Waiting(pg_runtime.autocommit, "w1", seconds=30)
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as two:  # two worker threads
        assert one.submit(waiting.enter).result() is True  # written
        assert one.submit(waiting.enter).result() is False  # still waiting: nothing to write
        assert two.submit(waiting.enter).result() is False  # there already
        assert two.submit(waiting.renew).result() is False  # not running out yet
        one.submit(waiting.leave).result()
        one.submit(waiting.leave).result()  # not waiting: nothing
        assert waiters(pg_runtime) == ["w1"]  # the other thread still waits
        two.submit(waiting.leave).result()
        assert waiters(pg_runtime) == []
    short = Waiting(pg_runtime.autocommit, "w2", seconds=0.2)
    assert short.enter() is True
    with pg_runtime.engine.connect() as conn:
        first = conn.execute(select(outbox_waiters.c.until)).scalar_one()
    wait_until(short.renew, timeout=2)  # past half its time: written again, later
    with pg_runtime.engine.connect() as conn:
        assert conn.execute(select(outbox_waiters.c.until)).scalar_one() > first
