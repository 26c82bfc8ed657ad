"""Ingest decisions, on SQLite and PostgreSQL: every event ends in one recorded decision."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest
from fakes import notifications_until, statements_run
from sqlalchemy import func, select

from txsms.core import consent
from txsms.core.events import Consent, Event, Recipient
from txsms.core.pipeline import ingest, new_id
from txsms.core.storage import events, messages

PHONE = "+1 415 555 0100"  # America/Los_Angeles
NY_PHONE = "+1 212 555 0100"


def order(key="order:1001:created", phone=PHONE, kind="order.created", **kw) -> Event:
    recipient = kw.pop("recipient", Recipient(phone=phone, name="Ada Lovelace"))
    data = kw.pop("data", {"order": {"number": "#1001", "total": "$25.00"}})
    return Event(source="api", kind=kind, key=key, recipient=recipient, data=data, **kw)


def rows(runtime, **where):
    with runtime.engine.connect() as conn:
        query = select(messages)
        for column, value in where.items():
            query = query.where(messages.c[column] == value)
        return conn.execute(query).all()


def test_an_event_posted_three_times_makes_one_message(runtime):
    results = [ingest(runtime, [order()])[0] for _ in range(3)]
    assert [r.status for r in results] == ["accepted", "duplicate", "duplicate"]
    assert len({r.id for r in results}) == 1
    [row] = rows(runtime)
    assert row.status == "pending" and row.reason is None
    assert "Ada" in runtime.vault.decrypt(row.body_enc)


def test_duplicates_inside_one_batch_are_recognised(runtime):
    results = ingest(runtime, [order(), order()])
    assert [r.status for r in results] == ["accepted", "duplicate"]
    assert len(rows(runtime)) == 1


def test_same_key_from_another_source_is_another_event(runtime):
    ingest(runtime, [order()])
    other = Event(
        source="shopify:a.myshopify.com",
        kind="order.created",
        key="order:1001:created",
        recipient=Recipient(phone=PHONE),
    )
    assert ingest(runtime, [other])[0].status == "accepted"
    assert len(rows(runtime)) == 2


@pytest.mark.parametrize(
    ("phone", "reason"),
    [
        (None, "no_phone"),
        ("", "no_phone"),
        ("12345", "invalid_phone"),
        ("+1 555 555 5555", "invalid_phone"),
        ("not a number", "invalid_phone"),
    ],
)
def test_unaddressable_events_are_skipped_with_a_reason(runtime, phone, reason):
    [result] = ingest(runtime, [order(phone=phone)])
    assert result.status == "accepted"
    [row] = rows(runtime)
    assert (row.status, row.reason) == ("skipped", reason)
    assert row.to_enc is None


def test_country_hint_beats_default_region(runtime):
    event = order(recipient=Recipient(phone="020 7946 0018", country="GB"))
    ingest(runtime, [event])
    assert rows(runtime)[0].reason == "landline"  # parsed as a UK fixed line, not a US number
    mobile = order(key="k2", recipient=Recipient(phone="07911 123456", country="GB"))
    ingest(runtime, [mobile])
    assert rows(runtime, idempotency_key="api|k2|order.created")[0].status == "pending"


def test_opted_out_number_is_skipped_and_recorded(runtime):
    index = runtime.vault.index("+14155550100")
    with runtime.engine.begin() as conn:
        consent.record(conn, runtime.vault, index, scope="all", action="opt_out", source="test")
    ingest(runtime, [order()])
    [row] = rows(runtime)
    assert (row.status, row.reason) == ("skipped", "opted_out")


def test_start_after_stop_allows_transactional_again(runtime):
    index = runtime.vault.index("+14155550100")
    with runtime.engine.begin() as conn:
        consent.record(
            conn,
            runtime.vault,
            index,
            scope="all",
            action="opt_out",
            source="t",
            at=time.time() - 10,
        )
        consent.record(conn, runtime.vault, index, scope="all", action="opt_in", source="t")
        state = consent.state(conn, index)
    assert (state.transactional, state.marketing) == ("allowed", "not_opted_in")
    ingest(runtime, [order()])
    assert rows(runtime)[0].status == "pending"


def test_marketing_needs_a_recorded_opt_in(runtime_factory):
    runtime = runtime_factory(templates={"account.alert": {"category": "marketing"}})
    alert = order(kind="account.alert", key="promo:1", data={"alert": {"text": "Sale"}})
    ingest(runtime, [alert])
    assert rows(runtime)[0].reason == "not_opted_in"
    opted = Event(
        source="api",
        kind="account.alert",
        key="promo:2",
        recipient=Recipient(phone=NY_PHONE),
        data={"alert": {"text": "Sale"}},
        consent=Consent(scope="marketing", action="opt_in", evidence={"form": "x"}),
    )
    ingest(runtime, [opted])
    assert rows(runtime, idempotency_key="api|promo:2|account.alert")[0].status == "pending"


def test_category_switched_off_is_skipped(runtime):
    with runtime.engine.begin() as conn:
        consent.set_preference(conn, runtime.vault.index("+14155550100"), "orders", False)
    ingest(runtime, [order()])
    assert rows(runtime)[0].reason == "category_off"
    ingest(runtime, [order(kind="account.alert", key="a1", data={"alert": {"text": "x"}})])
    assert rows(runtime, kind="account.alert")[0].status == "pending"


def test_frequency_cap_skips_but_urgent_goes(runtime_factory):
    runtime = runtime_factory(policy={"max_per_day": 2})
    ingest(runtime, [order(key=f"o{n}") for n in range(3)])
    statuses = sorted((r.status, r.reason or "") for r in rows(runtime))
    assert statuses == [("pending", ""), ("pending", ""), ("skipped", "frequency_cap")]
    ingest(runtime, [order(kind="account.alert", key="alert", data={"alert": {"text": "x"}})])
    assert rows(runtime, kind="account.alert")[0].status == "pending"


def test_quiet_hours_defer_a_scheduled_message_and_spare_urgent(runtime_factory):
    runtime = runtime_factory(policy={"quiet_hours": "21:00-08:00"})
    tomorrow_night = (time.time() // 86400 + 2) * 86400 + 5 * 3600 + 1800  # 05:30 UTC
    ingest(runtime, [order(phone=NY_PHONE, send_at=tomorrow_night)])
    row = rows(runtime)[0]
    assert (row.status, row.reason) == ("deferred", "quiet_hours")
    assert datetime.fromtimestamp(row.send_at, UTC).strftime("%H:%M") in ("12:00", "13:00")
    urgent = order(
        kind="account.alert",
        key="a",
        phone=NY_PHONE,
        send_at=tomorrow_night,
        data={"alert": {"text": "x"}},
    )
    ingest(runtime, [urgent])
    row = rows(runtime, kind="account.alert")[0]
    assert (row.status, row.reason, row.send_at) == ("deferred", "scheduled", tomorrow_night)


def test_a_bad_value_fails_the_render_with_a_reason(runtime_factory):
    runtime = runtime_factory(
        templates={"order.created": {"body": "{{ shop.name }}: {{ order.total | money }}"}}
    )
    ingest(runtime, [order(data={"order": {"total": {"not": "a number"}}})])
    row = rows(runtime)[0]
    assert (row.status, row.reason) == ("failed", "render_error")


def test_empty_body_turns_a_kind_off(runtime_factory):
    runtime = runtime_factory(templates={"order.created": {"body": ""}})
    ingest(runtime, [order()])
    assert rows(runtime)[0].reason == "no_template"


def test_numbers_and_bodies_are_encrypted_and_indexed(runtime):
    ingest(runtime, [order()])
    with runtime.engine.connect() as conn:
        event = conn.execute(select(events)).one()
        n = conn.execute(select(func.count()).select_from(messages)).scalar_one()
    row = rows(runtime)[0]
    assert n == 1
    assert b"415" not in row.to_enc and runtime.vault.decrypt(row.to_enc) == "+14155550100"
    assert row.phone_index == event.phone_index == runtime.vault.index("+14155550100")
    assert runtime.vault.decrypt_json(event.payload_enc)["recipient"]["name"] == "Ada Lovelace"


def test_consent_event_records_an_opt_out(runtime):
    stop = Event(
        source="api",
        kind="customer.consent",
        key="c1",
        recipient=Recipient(phone=PHONE),
        consent=Consent(scope="all", action="opt_out", evidence={"via": "form"}),
    )
    [result] = ingest(runtime, [stop])
    assert result.status == "accepted" and result.messages == []
    ingest(runtime, [order()])
    assert rows(runtime)[0].reason == "opted_out"


def test_messages_cancel_cancels_what_is_pending_for_that_appointment(runtime):
    from txsms.core.events import OrderRef

    later = time.time() + 3600
    appt = OrderRef(ref="appointment:7")
    reminders = [
        Event(
            source="crm:x",
            kind="appointment.reminder",
            key=f"appt:7:reminder:{n}",
            recipient=Recipient(phone=PHONE),
            send_at=later + n,
            order=appt,
        )
        for n in range(2)
    ]
    other = Event(
        source="crm:x",
        kind="appointment.reminder",
        key="appt:8:reminder:0",
        recipient=Recipient(phone=PHONE),
        send_at=later,
        order=OrderRef(ref="appointment:8"),
    )
    ingest(runtime, [*reminders, other])
    cancel = Event(
        source="crm:x",
        kind="messages.cancel",
        key="appt:7:cancel:1",
        order=appt,
        data={"kinds": ["appointment.reminder"], "reason": "appointment_moved"},
    )
    ingest(runtime, [cancel])
    by_key = {r.idempotency_key.split("|")[1]: r for r in rows(runtime)}
    assert [by_key[f"appt:7:reminder:{n}"].status for n in range(2)] == ["cancelled"] * 2
    assert by_key["appt:7:reminder:0"].reason == "appointment_moved"
    assert by_key["appt:8:reminder:0"].status == "deferred"


def test_an_order_wide_skip_holds_for_the_orders_later_events(runtime):
    from txsms.core.events import OrderRef

    ref = OrderRef(ref="55")
    created = Event(
        source="shopify:s",
        kind="order.created",
        key="order:55:created",
        recipient=Recipient(phone=PHONE),
        order=ref,
        skip="test_order",
    )
    shipped = Event(
        source="shopify:s", kind="order.fulfilled", key="fulfillment:9:created", order=ref
    )
    ingest(runtime, [created])
    ingest(runtime, [shipped])
    assert {(r.kind, r.reason) for r in rows(runtime)} == {
        ("order.created", "test_order"),
        ("order.fulfilled", "test_order"),
    }


def test_a_later_event_without_a_number_is_addressed_from_the_order(runtime):
    from txsms.core.events import OrderRef

    ref = OrderRef(ref="56")
    ingest(
        runtime,
        [
            Event(
                source="s",
                kind="order.created",
                key="o56",
                order=ref,
                recipient=Recipient(phone=PHONE, name="Ada"),
                data={"order": {"number": "#56"}},
            )
        ],
    )
    ingest(
        runtime,
        [
            Event(
                source="s",
                kind="order.refunded",
                key="r1",
                order=ref,
                data={"refund": {"amount": "5.00"}},
            )
        ],
    )
    ingest(
        runtime,
        [Event(source="s", kind="order.refunded", key="r2", order=OrderRef(ref="never-seen"))],
    )
    refund = rows(runtime, idempotency_key="s|r1|order.refunded")[0]
    assert refund.status == "pending"
    body = runtime.vault.decrypt(refund.body_enc)
    assert "#56" in body and "5.00" in body
    assert rows(runtime, idempotency_key="s|r2|order.refunded")[0].reason == "unknown_order"


def test_a_batch_reads_each_orders_own_context_not_another_shops(runtime):
    from txsms.core.events import OrderRef

    def created(source: str, ref: str, phone: str | None) -> Event:
        return Event(
            source=source,
            kind="order.created",
            key=f"{ref}:created",
            recipient=Recipient(phone=phone),
            data={"order": {"number": f"#{ref}"}},
            order=OrderRef(ref=ref),
        )

    def refunded(source: str, ref: str) -> Event:
        return Event(source=source, kind="order.refunded", key=f"{ref}:r", order=OrderRef(ref=ref))

    ingest(runtime, [created("a", "1", "+14155550100"), created("b", "2", "+14155550101")])
    # One batch asks for (a, 2) and (b, 1): the stored (a, 1) and (b, 2) match each half of
    # the question, and neither may stand in for the other.
    ingest(runtime, [refunded("a", "2"), refunded("b", "1"), refunded("b", "2")])
    assert rows(runtime, idempotency_key="a|2:r|order.refunded")[0].reason == "unknown_order"
    assert rows(runtime, idempotency_key="b|1:r|order.refunded")[0].reason == "unknown_order"
    known = rows(runtime, idempotency_key="b|2:r|order.refunded")[0]
    assert known.status == "pending"
    assert runtime.vault.decrypt(known.to_enc) == "+14155550101"


def test_an_orders_event_and_its_stored_context_share_one_encrypted_document(runtime):
    """Both rows hold what later deliveries need of the order: encrypted once, the same
    token in each; a test order's skip is in it for the order's later events."""
    from txsms.core.events import OrderRef
    from txsms.core.storage import order_context

    test_order = order(order=OrderRef(ref="1001"), skip="test_order")
    ingest(runtime, [test_order, order(key="other", order=OrderRef(ref="1002"))])

    with runtime.engine.connect() as conn:
        payloads = dict(conn.execute(select(events.c.order_ref, events.c.payload_enc)).all())
        contexts = dict(
            conn.execute(select(order_context.c.order_ref, order_context.c.context_enc)).all()
        )
    assert payloads == contexts and len(payloads) == 2
    document = runtime.vault.decrypt_json(payloads["1001"])
    assert document["skip"] == "test_order"
    assert document["recipient"]["name"] == "Ada Lovelace"
    assert document["data"] == {"order": {"number": "#1001", "total": "$25.00"}}


def test_privacy_requests_keep_no_payload_and_export_by_order(runtime, tmp_path):
    from txsms.core.events import OrderRef

    ingest(
        runtime,
        [
            Event(
                source="s",
                kind="order.created",
                key="o57",
                order=OrderRef(ref="57"),
                recipient=Recipient(phone=PHONE),
            )
        ],
    )
    request = Event(
        source="s",
        kind="privacy.data_request",
        key="dr1",
        recipient=Recipient(phone="not a number"),
        data={"order_refs": [57]},
    )
    ingest(runtime, [request])
    with runtime.engine.connect() as conn:
        stored = conn.execute(select(events).where(events.c.key == "dr1")).one()
    assert stored.payload_enc is None
    [export] = (tmp_path / "data" / "exports").iterdir()
    assert '"o57"' in export.read_text()


def test_a_message_that_would_go_after_it_expires_is_skipped(runtime_factory):
    runtime = runtime_factory(policy={"quiet_hours": "21:00-08:00"})
    night = (time.time() // 86400 + 2) * 86400 + 5 * 3600  # 05:00 UTC: 01:00 in New York
    reminder = Event(
        source="crm:x",
        kind="appointment.reminder",
        key="r",
        send_at=night,
        expires_at=night + 3600,
        recipient=Recipient(phone=NY_PHONE),
    )
    ingest(runtime, [reminder])  # quiet hours would hold it until 08:00, after the start
    assert (rows(runtime)[0].status, rows(runtime)[0].reason) == ("skipped", "expired")


def test_postgresql_notifies_waiting_workers_when_a_message_becomes_due_and_only_then(
    pg_runtime,
):
    # (SQLite wakes workers in-process instead.)
    import psycopg

    from txsms.core.notify import CHANNEL, Waiting

    runtime = pg_runtime
    conninfo = runtime.engine.url.set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(conninfo, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")

        def payloads_until(sentinel: str) -> list[str]:
            return notifications_until(listener, runtime.engine, CHANNEL, sentinel)

        ingest(runtime, [_event("order:6:created")])
        assert payloads_until("no-one-waits") == []  # every worker busy: no NOTIFY to commit
        waiting = Waiting(runtime.autocommit, "test-worker")
        assert waiting.enter()  # a worker thread starts waiting: the row is written
        [result] = ingest(runtime, [_event("order:7:created")])
        assert result.messages[0].status == "pending"
        assert payloads_until("after-ingest") == [""]  # once per commit, by the trigger
        with runtime.engine.begin() as conn:
            conn.execute(messages.update().values(status="sent"))
        assert payloads_until("after-sent") == []  # nothing due: no wake-up
        with runtime.engine.begin() as conn:
            conn.execute(messages.update().values(status="pending", reason="retry"))
        assert payloads_until("after-retry") == [""]
        waiting.leave()  # it found work: the row is gone
        ingest(runtime, [_event("order:8:created")])
        assert payloads_until("after-leave") == []
        stale = Waiting(runtime.autocommit, "killed-worker", seconds=-1)
        assert stale.enter()  # a killed worker's row, run out
        ingest(runtime, [_event("order:9:created")])
        assert payloads_until("stale-row") == []


def _event(key: str) -> Event:
    return Event(
        source="api",
        kind="order.created",
        key=key,
        recipient=Recipient(phone="+14155550100", name="Ada"),
        data={"order": {"number": "#7", "total": "$5.00"}},
    )


def test_a_single_events_look_ups_bind_plain_values_and_a_batchs_lists(runtime):
    """One event (a webhook's usual delivery) asks with plain values, a batch with lists;
    a number's context, an order's and a source's read back the same either way."""
    from txsms.core.events import OrderRef
    from txsms.core.pipeline import _Lookups

    def created(ref: str, phone: str | None) -> Event:
        return Event(
            source="api",
            kind="order.created",
            key=f"{ref}:created",
            recipient=Recipient(phone=phone),
            data={"order": {"number": f"#{ref}"}},
            order=OrderRef(ref=ref),
        )

    ingest(runtime, [created("1", PHONE)])
    with statements_run(runtime.engine) as asked, runtime.engine.connect() as conn:
        one = _Lookups(runtime, conn, [created("1", PHONE)])
        none = _Lookups(runtime, conn, [created("9", None)])
        batch = _Lookups(runtime, conn, [created("1", PHONE), created("2", NY_PHONE)])
    plain, empty, lists = asked
    assert "json_each" not in plain[0] and "ANY" not in plain[0]
    assert None in (empty[1].values() if isinstance(empty[1], dict) else empty[1])
    assert "json_each" in lists[0] or "ANY" in lists[0]
    index = runtime.vault.index("+14155550100")
    for lookups in (one, batch):
        assert lookups.numbers[index].known
        assert lookups.contexts[("api", "1")] is not None
        assert lookups.sources == {"api": False}
    assert batch.contexts[("api", "2")] is None  # never seen
    assert none.numbers == {} and none.contexts == {("api", "9"): None}


def test_postgresql_settles_on_one_plan_for_plain_look_ups_and_plans_each_list(pg_runtime):
    """Why a single event's look-ups bind plain values: PostgreSQL plans a prepared statement
    with arrays anew at every call (the arrays' length changes what a plan costs), and with
    plain values keeps one plan after five calls (0.1 ms less per webhook)."""
    from sqlalchemy import text

    from txsms.core.pipeline import _LOOKUPS

    with pg_runtime.engine.connect() as conn:
        for i in range(15):  # psycopg prepares after 5 calls; PostgreSQL compares 5 plans
            conn.execute(
                _LOOKUPS["postgresql", True],
                {"indexes": f"i{i}", "order_sources": "s", "order_refs": f"r{i}", "names": "s"},
            ).all()
            conn.execute(
                _LOOKUPS["postgresql", False],
                {
                    "indexes": [f"i{i}"],
                    "order_sources": ["s"],
                    "order_refs": [f"r{i}"],
                    "names": ["s"],
                },
            ).all()
        plans = conn.execute(
            text(
                "SELECT statement LIKE '%ANY (%' AS lists, generic_plans, custom_plans"
                " FROM pg_prepared_statements WHERE statement LIKE '%recipient%'"
            )
        ).all()
    by_kind = {row.lists: row for row in plans}
    assert sorted(by_kind) == [False, True]
    plain, lists = by_kind[False], by_kind[True]
    assert plain.generic_plans > 0 and plain.custom_plans <= 5  # compared, then one for good
    assert lists.generic_plans == 0 and lists.custom_plans > 5  # every call planned anew


def test_row_ids_are_uuid7_and_sort_in_the_order_they_were_made(runtime):
    """Time-ordered keys: events and messages grow at one end of their primary-key index."""
    before = time.time_ns() // 1_000_000
    made = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(made)) == len(made)
    for value in made:
        parsed = uuid.UUID(hex=value)
        assert (parsed.version, parsed.variant, parsed.hex) == (7, uuid.RFC_4122, value)
    stamps = [int(value[:12], 16) for value in made]  # the milliseconds each was made in
    assert stamps == sorted(stamps) and before <= stamps[0] <= stamps[-1] <= after
    [result] = ingest(runtime, [order()])
    assert uuid.UUID(result.id).version == uuid.UUID(result.messages[0].id).version == 7
    assert int(result.id[:12], 16) >= stamps[-1]  # made later: its time is not earlier
