"""Retention: bodies, event payloads, delivery ids and receipts that never found their message
go once `security.retention_days` have passed; the decisions stay; each round reads a partial
index of what is still kept and does a bounded number of rows."""

from __future__ import annotations

import time

from fakes import query_plan, statements_run
from sqlalchemy import func, select

from txsms.core import retention
from txsms.core.events import Event, Recipient
from txsms.core.pipeline import ingest
from txsms.core.providers import StatusReport, make_provider
from txsms.core.returnpath import apply_early_receipts, apply_reports
from txsms.core.storage import deliveries, events, messages, provider_callbacks

DAY = 86400.0


def message(id_: str, finished_days_ago: float | None) -> dict:
    now = time.time()
    return {
        "id": id_,
        "source": "api",
        "kind": "order.created",
        "idempotency_key": f"api|{id_}|order.created",
        "body_enc": b"token",
        "status": "sent" if finished_days_ago is not None else "pending",
        "send_at": now,
        "created_at": now,
        "updated_at": now,
        "finished_at": None if finished_days_ago is None else now - finished_days_ago * DAY,
    }


def event(id_: str, days_ago: float) -> dict:
    at = time.time() - days_ago * DAY
    return {
        "id": id_,
        "source": "api",
        "key": id_,
        "kind": "order.created",
        "payload_enc": b"token",
        "occurred_at": at,
        "received_at": at,
    }


def delivery(id_: str, days_ago: float) -> dict:
    return {"source": "shopify:a", "delivery_id": id_, "received_at": time.time() - days_ago * DAY}


def receipt(id_: int, days_ago: float, *, kind: str = "status", applied: bool = False) -> dict:
    at = time.time() - days_ago * DAY
    return {
        "id": id_,
        "provider": "twilio",
        "kind": kind,
        "provider_message_id": f"SM{id_}",
        "status": "delivered",
        "payload_enc": b"token",
        "received_at": at,
        "applied_at": at if applied else None,
    }


def test_what_is_past_the_retention_period_goes_and_the_rest_stays(runtime):
    with runtime.engine.begin() as conn:
        conn.execute(
            messages.insert(),
            [message("old", 31), message("recent", 29), message("waiting", None)],
        )
        conn.execute(events.insert(), [event("old", 31), event("recent", 29)])
        conn.execute(
            deliveries.insert(),
            [delivery("old", 31), delivery("new", 1)],
        )
        conn.execute(
            provider_callbacks.insert(),
            [
                receipt(1, 31),  # never found its message: goes
                receipt(2, 31, applied=True),  # applied: a record of the message's delivery
                receipt(3, 29),  # may still find its message
                receipt(4, 31, kind="inbound", applied=True),  # a reply, and consent evidence
            ],
        )
    with runtime.engine.begin() as conn:
        assert retention.purge(conn, 30) == {
            "bodies": 1,
            "payloads": 1,
            "deliveries": 1,
            "receipts": 1,
        }
    with runtime.engine.connect() as conn:
        bodies = dict(conn.execute(select(messages.c.id, messages.c.body_enc)).all())
        payloads = dict(conn.execute(select(events.c.id, events.c.payload_enc)).all())
        delivered = set(conn.execute(select(deliveries.c.delivery_id)).scalars())
        receipts = set(conn.execute(select(provider_callbacks.c.id)).scalars())
    assert bodies == {"old": None, "recent": b"token", "waiting": b"token"}
    assert payloads == {"old": None, "recent": b"token"}
    assert delivered == {"new"}
    assert receipts == {2, 3, 4}
    with runtime.engine.begin() as conn:  # nothing left to do: a round costs nothing more
        assert set(retention.purge(conn, 30).values()) == {0}


def test_a_long_history_is_worked_off_a_bounded_number_of_rows_a_round(runtime):
    with runtime.engine.begin() as conn:
        conn.execute(messages.insert(), [message(f"m{n}", 40 + n) for n in range(7)])
    done = []
    for _ in range(4):
        with runtime.engine.begin() as conn:
            done.append(retention.purge(conn, 30, limit=3)["bodies"])
    assert done == [3, 3, 1, 0]


def test_each_round_reads_the_partial_indexes_not_the_history(runtime):
    """The housekeeping runs every few seconds, on SQLite under the write lock: reading every
    message and receipt ever kept made it grow with the history (50 ms at 200,000 messages)."""
    with statements_run(runtime.engine) as statements, runtime.engine.begin() as conn:
        retention.purge(conn, 30)
    indexes = {
        "UPDATE messages": "ix_messages_body_kept",
        "UPDATE events": "ix_events_payload_kept",
        "DELETE FROM deliveries": "ix_deliveries_received_at",
        "DELETE FROM provider_callbacks": "ix_provider_callbacks_unapplied",
    }
    assert [sql.split(" SET")[0].split(" WHERE")[0] for sql, _ in statements] == list(indexes)
    with runtime.engine.connect() as conn:
        for (sql, params), index in zip(statements, indexes.values(), strict=True):
            plan = query_plan(conn, sql, params)
            assert index in plan, plan


def test_a_receipt_finds_its_message_and_an_early_one_is_found_again_through_small_indexes(
    runtime,
):
    """Receipts look a message up by the provider's id, whose index leaves out the messages
    not sent yet; the housekeeping looks for receipts not yet applied in their own index, not
    among every receipt ever applied."""
    provider = make_provider(runtime.config.provider)
    with runtime.engine.begin() as conn:
        conn.execute(messages.insert(), [{**message("m1", 1), "provider": provider.name}])
    with statements_run(runtime.engine) as statements:
        # Early: no message has this id yet. Then the message is sent and it applies.
        assert apply_reports(runtime, provider, [StatusReport("SM1", "delivered")]) == 0
        with runtime.engine.begin() as conn:
            conn.execute(
                messages.update().where(messages.c.id == "m1").values(provider_message_id="SM1")
            )
        assert apply_early_receipts(runtime, provider) == 1
    lookup = next(s for s in statements if s[0].startswith("SELECT messages.id"))
    early = next(s for s in statements if s[0].startswith("SELECT provider_callbacks."))
    with runtime.engine.connect() as conn:
        assert "ix_messages_provider_message_id" in query_plan(conn, *lookup)
        assert "ix_provider_callbacks_unapplied" in query_plan(conn, *early)
        status = conn.execute(select(messages.c.provider_status)).scalar_one()
    assert status == "delivered"


def test_a_redelivery_after_its_delivery_id_went_is_still_a_duplicate(runtime):
    """The delivery id only answers a redelivery early; the event's own key decides."""
    order = Event(
        source="shopify:shop.example",
        kind="order.created",
        key="order:1:created",
        recipient=Recipient(phone="+1 415 555 0101"),
        data={"order": {"number": "#1"}},
    )
    delivery = ("shopify:shop.example", "orders/create|event-1")
    [first] = ingest(runtime, [order], delivery=delivery)
    assert ingest(runtime, [order], delivery=delivery) is None  # known delivery: at once
    with runtime.engine.begin() as conn:
        conn.execute(deliveries.update().values(received_at=time.time() - 31 * DAY))
        assert retention.purge(conn, 30)["deliveries"] == 1
    [again] = ingest(runtime, [order], delivery=delivery)
    assert (first.status, again.status, again.id) == ("accepted", "duplicate", first.id)
    with runtime.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 1
