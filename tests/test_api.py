"""The event API and health routes, through Flask's client with raw bytes."""

from __future__ import annotations

import json

import pytest
from conftest import API_TOKEN
from sqlalchemy import func, select

from txsms.core.storage import events, messages
from txsms.webhooks import create_app

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
EVENT = {
    "kind": "order.created",
    "key": "order:1001:created",
    "recipient": {"phone": "+1 415 555 0100", "name": "Ada", "locale": "en"},
    "data": {"order": {"number": "#1001", "total": "$25.00"}},
    "send_at": None,
}


@pytest.fixture
def client(runtime):
    app = create_app(runtime=runtime)
    return app.test_client()


def count(runtime, table) -> int:
    with runtime.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def post(client, body, headers=AUTH, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        "/api/v1/events", data=data, headers=headers, content_type="application/json", **kw
    )


def test_one_event_is_accepted_then_duplicate(client, runtime):
    first = post(client, EVENT)
    assert first.status_code == 202
    [item] = first.json["events"]
    assert item["key"] == "order:1001:created" and item["status"] == "accepted"
    assert item["messages"][0]["status"] == "pending"
    again = post(client, EVENT)
    assert again.status_code == 202
    assert again.json["events"][0] == {**item, "status": "duplicate", "messages": []}
    assert count(runtime, messages) == 1


def test_batch_gives_a_result_per_event(client, runtime):
    batch = {"events": [EVENT, {**EVENT, "key": "k2", "recipient": {}}, EVENT]}
    response = post(client, batch)
    assert response.status_code == 202
    statuses = [
        (e["status"], [m["reason"] for m in e["messages"]]) for e in response.json["events"]
    ]
    assert statuses == [("accepted", [None]), ("accepted", ["no_phone"]), ("duplicate", [])]


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no header"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong"),
        ({"Authorization": f"Basic {API_TOKEN}"}, "scheme"),
        ({"Authorization": "Bearer "}, "empty"),
    ],
)
def test_without_a_valid_token_401_and_nothing_stored(client, runtime, headers, why):
    response = post(client, EVENT, headers=headers)
    assert response.status_code == 401, why
    assert "token" in response.json["error"]
    assert count(runtime, events) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**EVENT, "kind": "order.shipped"}, "events.0.kind"),
        ({**EVENT, "key": ""}, "events.0.key"),
        ({k: v for k, v in EVENT.items() if k != "key"}, "events.0.key"),
        ({**EVENT, "recipient": {"phone": "x", "shoe_size": 9}}, "events.0.recipient.shoe_size"),
        ({**EVENT, "send_at": "tomorrow"}, "events.0.send_at"),
        ({"events": [EVENT, {**EVENT, "kind": 3}]}, "events.1.kind"),
        ({"events": []}, "events"),
        ({"events": [EVENT] * 101}, "events"),
    ],
)
def test_invalid_events_get_400_with_field_errors_and_change_nothing(client, runtime, body, field):
    response = post(client, body)
    assert response.status_code == 400
    assert field in response.json["errors"], response.json
    assert count(runtime, events) == 0


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"'])
def test_malformed_body_is_400(client, runtime, raw):
    response = post(client, raw)
    assert response.status_code == 400
    assert "error" in response.json
    assert count(runtime, events) == 0


def test_too_large_is_413(runtime_factory):
    runtime = runtime_factory(server={"max_body_bytes": 4096})
    client = create_app(runtime=runtime).test_client()
    big = {**EVENT, "data": {"alert": {"text": "x" * 5000}}}
    response = post(client, big)
    assert response.status_code == 413
    assert response.is_json
    assert count(runtime, events) == 0


def test_send_at_in_the_future_is_deferred(client, runtime):
    response = post(client, {**EVENT, "send_at": "2099-01-01T10:00:00Z"})
    [decision] = response.json["events"][0]["messages"]
    assert (decision["status"], decision["reason"]) == ("deferred", "scheduled")


def test_healthz_and_metrics(client):
    assert client.get("/healthz").json == {"status": "ok"}
    post(client, EVENT)
    body = client.get("/metrics").get_data(as_text=True)
    assert 'txsms_events_total{kind="order.created",platform="api",result="accepted"}' in body


def test_unknown_route_and_method_answer_json(client):
    assert client.get("/nope").status_code == 404
    response = client.get("/api/v1/events")
    assert response.status_code == 405 and response.is_json


def test_an_order_ref_addresses_a_later_event_and_cancels_queued_ones(client, runtime):
    later = "2099-01-01T10:00:00Z"
    booked = {
        **EVENT,
        "key": "appt:1:reminder",
        "kind": "appointment.reminder",
        "send_at": later,
        "order": {"ref": "appt:1"},
    }
    assert post(client, booked).json["events"][0]["messages"][0]["status"] == "deferred"
    cancel = {
        "kind": "messages.cancel",
        "key": "appt:1:cancel",
        "order": {"ref": "appt:1"},
        "data": {"kinds": ["appointment.reminder"], "reason": "appointment_cancelled"},
    }
    assert post(client, cancel).status_code == 202
    no_phone = {
        "kind": "appointment.cancelled",
        "key": "appt:1:cancelled",
        "order": {"ref": "appt:1"},
    }
    [decision] = post(client, no_phone).json["events"][0]["messages"]
    assert decision["status"] == "pending"  # addressed from the stored appointment
    with runtime.engine.connect() as conn:
        statuses = dict(conn.execute(select(messages.c.kind, messages.c.status)).all())
    assert statuses["appointment.reminder"] == "cancelled"


def test_source_disabled_is_not_for_api_callers(client, runtime):
    response = post(client, {"kind": "source.disabled", "key": "x"})
    assert response.status_code == 400 and "events.0.kind" in response.json["errors"]
