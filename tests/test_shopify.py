"""The Shopify connector: signatures, topics -> Events, addressing, install and simulate.

Payloads are Shopify's own (../shared/fixtures/shopify, posted byte for byte) or built here;
the receiver runs as a Flask test client on SQLite and PostgreSQL, and as a real `txsms serve`
process against a fake Twilio; `install` talks to a fake Admin API over real HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import twilio_section
from fakes import wait_until
from fakes.shopify_admin import TOKEN, FakeShopifyAdmin
from sqlalchemy import select

# Fixtures are imported "as" themselves (a re-export) so that pytest finds them here.
from test_cli import _restore_logging as _restore_logging  # autouse, for CliRunner runs
from test_serve import Server, base_config, write_config
from test_serve import server_factory as server_factory
from webhook_battery import WebhookBattery

from txsms.connectors import shopify
from txsms.connectors.shopify import Connector
from txsms.core import consent
from txsms.core.cli import cli
from txsms.core.config import config_from_mapping, load_config
from txsms.core.errors import PayloadError, SignatureError
from txsms.core.pipeline import source_disabled
from txsms.core.runtime import Runtime
from txsms.core.storage import consent_ledger, events, messages, order_context
from txsms.webhooks import create_app

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "shopify"  # = ../shared/fixtures
DOMAIN = "demo-shop.myshopify.com"
SOURCE = f"shopify:{DOMAIN}"
SECRET = "test_secret_key"  # the secret of the published fixture vectors
OLD_SECRET = "old-secret-still-listed"
PHONE = "+1 415 555 0111"
E164 = "+14155550111"
ORDER_ID = 820982911946154500  # the fixtures' order (rounded by their Go round trip)
BIG_ID = 820982911946154508  # the true id: above 2**53


def hmac_b64(secret: str, body: bytes) -> str:
    """Written out here, not imported: the tests check the connector against it."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def signed(
    topic: str, body: bytes, *, secret: str = SECRET, domain: str = DOMAIN, event_id=None
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Shop-Domain": domain,
        "X-Shopify-Hmac-Sha256": hmac_b64(secret, body),
        "X-Shopify-API-Version": "2026-07",
        "X-Shopify-Webhook-Id": str(uuid.uuid4()),
        "X-Shopify-Event-Id": event_id or str(uuid.uuid4()),
    }


def order(order_id: int = 1001, *, phone: str | None = PHONE, **extra: Any) -> dict[str, Any]:
    """A compact orders/* body in Shopify's shape."""
    address = {"first_name": "Ada", "last_name": "Lovelace", "country_code": "US", "phone": None}
    return {
        "id": order_id,
        "name": f"#{order_id}",
        "order_number": order_id,
        "test": False,
        "phone": phone,
        "customer_locale": "en",
        "currency": "USD",
        "total_price": "25.00",
        "order_status_url": f"https://{DOMAIN}/orders/{order_id}",
        "updated_at": "2026-11-01T10:00:00-05:00",
        "line_items": [{"id": 1, "name": "Blue T-shirt", "quantity": 2}],
        "customer": {"id": 7, "first_name": "Ada", "last_name": "Lovelace", "phone": None},
        "shipping_address": address,
        "billing_address": address,
        "fulfillments": [],
        **extra,
    }


def fulfillment(fid: int = 55, order_id: int = 1001, **extra: Any) -> dict[str, Any]:
    return {
        "id": fid,
        "order_id": order_id,
        "status": "success",
        "shipment_status": None,
        "tracking_company": "UPS",
        "tracking_number": "1Z999AA10123456784",
        "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
        **extra,
    }


def refund(rid: int = 77, order_id: int = 1001, amounts=("20.00", "5.50")) -> dict[str, Any]:
    transactions = [{"kind": "refund", "status": "success", "amount": a} for a in amounts]
    return {"id": rid, "order_id": order_id, "transactions": transactions}


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def fixture_topic(path: Path) -> str:
    return path.name.split(".")[0].replace("_", "/", 1)  # orders_create.x.json -> orders/create


def make_config(**shop: Any):
    shop = {"domain": DOMAIN, "secret": [SECRET, OLD_SECRET], **shop}
    return config_from_mapping({"shopify": {"shops": [shop]}, "sender": {"name": "Demo"}})


def translate(topic: str, payload: Any, **shop: Any):
    connector = Connector(make_config(**shop))
    body = payload if isinstance(payload, bytes) else dumps(payload)
    return connector.events(connector.verify(signed(topic, body), body), body)


# --- signatures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "body", "expected"),
    [  # the published vectors (../shared/fixtures/shopify/SOURCES.md via reference/shopify.md)
        ("test_secret_key", b'{"foo": "bar"}', "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g="),
        ("secret", b"foo=anything", "yCGX/RrK4fcuNtr3ztk5tQGsOBjcAzHpGLdMUrbV8yI="),
        ("old_secret", b"foo=anything", "XqRcjrSv57VACn6apEO9znyu/wkN1VC7QxdSPwK3Hzs="),
        ("hush", b'"my secret message"', "hMTq0K2x7oyOjoBwGYeTj5oxfnaVYXzbanUG9aajpKI="),
        ("hush", b'""', "ZAZ6P4c14f6v798OCPYCodtdf9g8Z+GfthdfCgyhUYg="),
    ],
)
def test_published_hmac_vectors(secret, body, expected):
    assert shopify.sign(secret, body) == expected
    assert shopify.sign(secret, body) == hmac_b64(secret, body)


def test_re_encoded_body_does_not_verify():
    # hush over `my secret message` without the JSON quotes: the usual integration bug.
    assert (
        shopify.sign("hush", b"my secret message") != "hMTq0K2x7oyOjoBwGYeTj5oxfnaVYXzbanUG9aajpKI="
    )


FIXTURE_VECTORS = {  # derived in reference/shopify.md, secret test_secret_key, exact bytes
    "orders_create.json": "zmUv7dw6s+Inqq+0pdk2/4nuvFSSHbuV1TzJ39RiKvM=",
    "fulfillments_create.json": "VQK+wjUf8cYnYhYJzPoX85S8gaBKDwEU/gxkeHNfrZY=",
    "refunds_create.json": "08AJ4ZTErycUMDsWyBoXdZ+AyV4be0VOKLCostppHBo=",
    "customers_redact.json": "flosNb3EzojhcMF/FEMf47DM7v3Adm7+ujqYcmL8+GY=",
    "customers_data_request.json": "2zQxQmxaI7yC+1l1FmgUu9r/HlrKhaeCfaKiDTqYQwY=",
    "shop_redact.json": "E4o+AK0wo/CzB2Ljm7a1Ex6Ao+1NEAwS/KM55pvlAJc=",
}


def test_verify_accepts_either_header_form_in_any_case():
    connector = Connector(make_config())
    body = b'{"foo": "bar"}'
    for prefix in ("X-Shopify-", "x-shopify-", "shopify-", "SHOPIFY-"):
        headers = {
            f"{prefix}Topic": "orders/create",
            f"{prefix}Shop-Domain": DOMAIN.upper(),
            f"{prefix}Hmac-Sha256": "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=",
            f"{prefix}Event-Id": "ev-1",
            "content-type": "application/json; charset=utf-8",
        }
        delivery = connector.verify(headers, body)
        assert (delivery.source, delivery.topic) == (SOURCE, "orders/create")
        assert delivery.delivery_id == "orders/create|ev-1"


def test_verify_refuses_what_it_cannot_trust():
    connector = Connector(make_config())
    body = dumps(order())
    good = signed("orders/create", body)
    for change, error in [
        ({"X-Shopify-Hmac-Sha256": ""}, SignatureError),
        ({"X-Shopify-Hmac-Sha256": hmac_b64("nope", body)}, SignatureError),
        ({"X-Shopify-Hmac-Sha256": hashlib.sha256(body).hexdigest()}, SignatureError),
        ({"X-Shopify-Shop-Domain": "other.myshopify.com"}, SignatureError),
        ({"X-Shopify-Shop-Domain": ""}, SignatureError),
        ({"Content-Type": "text/plain"}, PayloadError),
        ({"X-Shopify-Topic": ""}, PayloadError),
    ]:
        with pytest.raises(error):
            connector.verify({**good, **change}, body)
    delivery = connector.verify({**good, "X-Shopify-Event-Id": ""}, body)  # Webhook-Id then
    assert delivery.delivery_id == f"orders/create|{good['X-Shopify-Webhook-Id']}"


# --- translation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "kind", "key"),
    [
        ("orders/create", "order.created", "order:1001:created"),
        ("orders/paid", "order.paid", "order:1001:paid"),
        ("orders/cancelled", "order.cancelled", "order:1001:cancelled"),
    ],
)
def test_order_topics(topic, kind, key):
    *_, event = translate(topic, order(), name="Demo Shop")
    assert (event.source, event.kind, event.key, event.skip) == (SOURCE, kind, key, None)
    assert event.recipient.phone == PHONE and event.recipient.locale == "en"
    updated = datetime(2026, 11, 1, 15, tzinfo=UTC).timestamp()
    assert event.order.ref == "1001" and event.order.modified_at == updated
    assert event.data == {
        "shop": {"name": "Demo Shop"},
        "customer": {"first_name": "Ada", "name": "Ada Lovelace"},
        "order": {
            "number": "#1001",
            "total": "$25.00",
            "currency": "USD",
            "status_url": f"https://{DOMAIN}/orders/1001",
            "items": [{"name": "Blue T-shirt", "quantity": 2}],
        },
    }


def test_total_is_the_presentment_money_in_the_customers_locale():
    paid = {"presentment_money": {"amount": "1234.50", "currency_code": "EUR"}}
    [event] = translate(
        "orders/create", order(customer_locale="fr-CA", total_price_set=paid, currency="CAD")
    )
    assert event.data["order"]["total"] == "1 234,50 €"
    assert event.data["order"]["currency"] == "EUR" and event.recipient.locale == "fr-CA"


def test_orders_fulfilled_gives_one_event_per_fulfillment_with_fulfillments_create_keys():
    fulfillments = [
        fulfillment(55),
        fulfillment(56, tracking_number=None),
        {"id": 57, "status": "cancelled"},
    ]
    result = translate("orders/fulfilled", order(fulfillments=fulfillments))
    assert [(e.kind, e.key) for e in result] == [
        ("order.fulfilled", "fulfillment:55:created"),
        ("order.fulfilled", "fulfillment:56:created"),
    ]
    assert result[0].data["shipment"]["tracking_number"] == "1Z999AA10123456784"
    [created] = translate("fulfillments/create", fulfillment(55))
    assert (created.kind, created.key) == ("order.fulfilled", "fulfillment:55:created")
    assert created.data["shipment"] == result[0].data["shipment"]
    # Addressed from the order: no number, no order time (it is not the order's payload).
    assert created.recipient.phone is None
    assert created.order.ref == "1001" and created.order.modified_at is None


def test_shipment_statuses_from_both_topics_share_keys():
    for status in ("in_transit", "out_for_delivery", "delivered", "attempted_delivery", "failure"):
        [update] = translate("fulfillments/update", fulfillment(shipment_status=status))
        event = {"id": 9, "fulfillment_id": 55, "order_id": 1001, "status": status}
        [from_event] = translate("fulfillment_events/create", event)
        assert update.key == from_event.key == f"fulfillment:55:{status}"
        assert update.kind == from_event.kind == "shipment.updated"
        assert from_event.data["shipment"]["status"] == status
    for status in (None, "confirmed", "label_printed", "ready_for_pickup"):
        assert translate("fulfillments/update", fulfillment(shipment_status=status)) == []
    assert translate("fulfillments/create", fulfillment(status="cancelled")) == []


def test_refund_carries_the_refunded_amount_and_no_number():
    [event] = translate("refunds/create", refund())
    assert (event.kind, event.key, event.order.ref) == ("order.refunded", "refund:77", "1001")
    assert event.data["refund"]["amount"] == "25.50" and event.recipient.phone is None
    fixture = (FIXTURES / "refunds_create.json").read_bytes()
    [event] = translate("refunds/create", fixture)
    assert event.data["refund"]["amount"] == "85.00"  # 75.00 + 10.00


def test_big_ids_stay_exact():
    body = dumps(order(BIG_ID))
    assert str(BIG_ID).encode() in body
    [event] = translate("orders/create", body)
    assert event.key == f"order:{BIG_ID}:created" and event.order.ref == str(BIG_ID)
    raw = b'{"id":%d,"order_id":%d,"transactions":[]}' % (BIG_ID + 1, BIG_ID)
    [event] = translate("refunds/create", raw)
    assert event.key == f"refund:{BIG_ID + 1}" and event.order.ref == str(BIG_ID)
    assert float(BIG_ID) != BIG_ID  # what a float round trip would have lost


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        ((), ("+1 212 555 0101", "US")),  # the order's own number, with its address's country
        (("phone",), ("+1 212 555 0102", "US")),
        (("phone", "shipping"), ("020 7946 0103", "GB")),
        (("phone", "shipping", "billing"), ("+1 212 555 0104", "FR")),
        (("phone", "shipping", "billing", "customer"), ("06 12 34 56 78", "FR")),
        (("phone", "shipping", "billing", "customer", "home"), (None, None)),
    ],
)
def test_number_precedence_with_its_addresss_country(drop, expected):
    home = {"phone": "06 12 34 56 78", "country_code": "FR"}
    payload = order(phone="+1 212 555 0101")
    payload["shipping_address"] = {"phone": "+1 212 555 0102", "country_code": "US"}
    payload["billing_address"] = {"phone": "020 7946 0103", "country_code": "GB"}
    payload["customer"] = {"id": 7, "phone": "+1 212 555 0104", "default_address": home}
    where = {
        "phone": payload,
        "shipping": payload["shipping_address"],
        "billing": payload["billing_address"],
        "customer": payload["customer"],
        "home": home,
    }
    for name in drop:
        where[name]["phone"] = None if name != "customer" else "  "  # blank counts as absent
    [event] = translate("orders/create", payload)
    assert (event.recipient.phone, event.recipient.country) == expected


def test_customer_country_comes_from_the_default_address():
    payload = order(phone=None)
    payload["shipping_address"] = payload["billing_address"] = None
    payload["customer"] = {
        "id": 7,
        "phone": "+12125550104",
        "default_address": {"country_code": "CA"},
    }
    [event] = translate("orders/create", payload)
    assert (event.recipient.phone, event.recipient.country) == ("+12125550104", "CA")


def test_test_orders_are_skipped_and_keep_no_number_unless_the_shop_sends_them():
    [event] = translate("orders/create", order(test=True))
    assert event.skip == "test_order" and event.recipient.phone is None
    [event] = translate("orders/create", order(test=True), send_test_orders=True)
    assert event.skip is None and event.recipient.phone == PHONE


@pytest.mark.parametrize(
    ("topic", "state", "action"),
    [
        ("customers_marketing_consent/update", "subscribed", "opt_in"),
        ("customers/update", "unsubscribed", "opt_out"),
        ("customers/create", "SUBSCRIBED", "opt_in"),
    ],
)
def test_sms_marketing_consent_becomes_a_consent_event(topic, state, action):
    when = "2026-01-01T07:00:00-05:00"
    sms = {"state": state, "opt_in_level": "single_opt_in", "consent_updated_at": when}
    sms["consent_collected_from"] = "SHOPIFY"
    payload = {"id": BIG_ID, "phone": PHONE, "sms_marketing_consent": sms}
    [event] = translate(topic, payload)
    assert (event.kind, event.key) == ("customer.consent", f"customer:{BIG_ID}:consent:{when}")
    assert (event.consent.scope, event.consent.action) == ("marketing", action)
    assert event.consent.evidence["consent_collected_from"] == "SHOPIFY"
    assert event.consent.evidence["consent_updated_at"] == when
    assert event.occurred_at == datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()
    assert event.recipient.phone == PHONE


def test_consent_states_that_say_nothing_record_nothing():
    for state in ("not_subscribed", "pending", "redacted", None):
        payload = {"id": 1, "phone": PHONE, "sms_marketing_consent": {"state": state}}
        assert translate("customers/update", payload) == []
    assert translate("customers/create", {"id": 1, "phone": PHONE}) == []


def test_privacy_and_lifecycle_topics():
    [event] = translate("customers/redact", FIXTURES.joinpath("customers_redact.json").read_bytes())
    assert event.kind == "privacy.redact" and event.recipient.phone == "555-625-1199"
    assert event.data == {"order_refs": ["299938", "280263", "220458"]}
    [event] = translate("shop/redact", {"shop_id": 1, "shop_domain": DOMAIN})
    assert (event.kind, event.data) == ("privacy.redact", {"scope": "source"})
    [event] = translate(
        "customers/data_request", FIXTURES.joinpath("customers_data_request.json").read_bytes()
    )
    assert (event.kind, event.key) == ("privacy.data_request", "customer:191167:data_request:9999")
    [event] = translate("app/uninstalled", {"id": 1, "name": "Demo"})
    assert (event.kind, event.data) == ("source.disabled", {"reason": "app_uninstalled"})
    assert translate("products/create", {"id": 1}) == []


def test_unusable_payloads_are_payload_errors():
    for topic, payload in [
        ("orders/create", {"name": "#1"}),  # no id
        ("orders/create", {"id": 1.5e17}),  # an id that went through a float
        ("refunds/create", {"id": 1}),  # no order_id
        ("orders/create", []),
    ]:
        with pytest.raises(PayloadError):
            translate(topic, payload)


def test_every_simulated_topic_translates():
    connector = Connector(make_config())
    for topic in [*shopify.TOPICS, *shopify.PRIVACY_TOPICS]:
        payload = shopify.sample_payload(topic, DOMAIN, phone=PHONE, order_id=BIG_ID)
        body = json.dumps(payload).encode()
        headers = shopify.delivery_headers(topic, DOMAIN, SECRET, body)
        result = connector.events(connector.verify(headers, body), body)
        assert result, topic
        kind = shopify.TOPICS.get(topic) or shopify.PRIVACY_TOPICS[topic]
        assert {e.kind for e in result} - {"messages.cancel"} == {kind}
        assert all(e.order is None or e.order.ref == str(BIG_ID) for e in result)


# --- the receiver, on SQLite and PostgreSQL -----------------------------------------------------


class Receiver:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.client = create_app(runtime=runtime).test_client()

    def post(self, topic: str, payload: Any, **kw: Any):
        body = payload if isinstance(payload, bytes) else dumps(payload)
        headers = kw.pop("headers", None) or signed(topic, body, **kw)
        return self.client.post("/webhooks/shopify", data=body, headers=headers)

    def result(self, topic: str, payload: Any, **kw: Any) -> list[dict]:
        response = self.post(topic, payload, **kw)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["events"]

    def messages(self) -> list[tuple[str, str, str | None, str | None]]:
        with self.runtime.engine.connect() as conn:
            rows = conn.execute(select(messages).order_by(messages.c.created_at)).all()
        decrypt = self.runtime.vault.decrypt
        return [(r.kind, r.status, r.reason, r.body_enc and decrypt(r.body_enc)) for r in rows]


@pytest.fixture
def receiver(runtime_factory):
    def build(**shop: Any) -> Receiver:
        shop = {"domain": DOMAIN, "secret": [SECRET, OLD_SECRET], "name": "Demo Shop", **shop}
        return Receiver(runtime_factory(shopify={"shops": [shop]}))

    return build


def outcome(events_: list[dict]) -> list[tuple]:
    return [(e["status"], [(m["status"], m["reason"]) for m in e["messages"]]) for e in events_]


FIXTURE_OUTCOMES = {  # in an empty database, test orders not sent
    "app_uninstalled.json": [("accepted", [])],
    "customers_create.json": [],  # no sms_marketing_consent in the example
    "customers_data_request.json": [("accepted", [])],
    "customers_redact.json": [("accepted", [])],
    "fulfillments_create.json": [("accepted", [("skipped", "unknown_order")])],
    "fulfillments_update.json": [],  # shipment_status null
    "fulfillments_update.alt-gadget-exemplar.json": [],
    "orders_cancelled.json": [("accepted", []), ("accepted", [("skipped", "test_order")])],
    "orders_create.json": [("accepted", [("skipped", "test_order")])],
    "orders_create.alt-gadget-exemplar.json": [("accepted", [("skipped", "invalid_phone")])],
    "refunds_create.json": [("accepted", [("skipped", "unknown_order")])],
    "refunds_create.alt-gadget-exemplar.json": [("accepted", [("skipped", "unknown_order")])],
    "shop_redact.json": [("accepted", [])],
}


def test_the_outcomes_table_covers_every_fixture():
    assert sorted(FIXTURE_OUTCOMES) == sorted(p.name for p in FIXTURES.glob("*.json"))


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTCOMES))
def test_every_fixture_verifies_with_its_exact_bytes_and_is_handled(receiver, name):
    body = (FIXTURES / name).read_bytes()
    topic = fixture_topic(FIXTURES / name)
    headers = signed(topic, body)
    if name in FIXTURE_VECTORS:
        assert headers["X-Shopify-Hmac-Sha256"] == FIXTURE_VECTORS[name]
    shop = receiver()
    assert outcome(shop.result(topic, body, headers=headers)) == FIXTURE_OUTCOMES[name]
    assert shop.post(topic, body.replace(b"{", b"{ ", 1), headers=headers).status_code == 401


def test_fixture_order_then_its_fulfillment_and_refund(receiver):
    shop = receiver(send_test_orders=True)  # the doc example is a test order
    example = json.loads((FIXTURES / "orders_create.json").read_bytes())
    example["phone"] = PHONE  # its own numbers are free text ("555-555-SHIP")
    [created] = shop.result("orders/create", dumps(example))
    assert outcome([created]) == [("accepted", [("pending", None)])]
    for name in ("fulfillments_create.json", "refunds_create.json"):
        [event] = shop.result(fixture_topic(FIXTURES / name), (FIXTURES / name).read_bytes())
        assert outcome([event]) == [("accepted", [("pending", None)])]
    bodies = [m[3] for m in shop.messages()]
    assert "order #9999 ($388.00)" in bodies[0] and "Thanks John!" in bodies[0]
    assert example["order_status_url"] in bodies[0]
    assert "via UPS" in bodies[1] and "1z827wk74630" in bodies[1]
    assert "A refund of $85.00 for your order #9999" in bodies[2]
    assert all(b.startswith("Demo Shop:") for b in bodies)


def test_free_text_number_is_skipped_invalid_phone(receiver):
    shop = receiver(send_test_orders=True)
    body = (FIXTURES / "orders_create.json").read_bytes()  # shipping phone 555-555-SHIP
    assert outcome(shop.result("orders/create", body)) == [
        ("accepted", [("skipped", "invalid_phone")])
    ]


def test_one_message_per_order_and_kind_whatever_the_deliveries(receiver):
    shop = receiver()
    first = shop.result("orders/create", order(), event_id="e-1")
    assert outcome(first) == [("accepted", [("pending", None)])]
    again = shop.post("orders/create", order(), event_id="e-1")  # the same delivery
    assert again.get_json()["status"] == "duplicate delivery"
    retry = shop.result("orders/create", order(), event_id="e-2")  # a new delivery id
    assert outcome(retry) == [("duplicate", [])]
    paid = shop.result("orders/paid", order(updated_at="2026-11-01T10:05:00-05:00"), event_id="e-1")
    assert outcome(paid) == [("accepted", [("pending", None)])]  # same event id, other topic
    assert [m[0] for m in shop.messages()] == ["order.created", "order.paid"]


def test_one_shipped_message_per_fulfillment_and_each_status_once(receiver):
    shop = receiver()
    shop.result("orders/create", order())
    shop.result("fulfillments/create", fulfillment(55))
    fulfilled = order(fulfillments=[fulfillment(55)], updated_at="2026-11-02T10:00:00-05:00")
    assert outcome(shop.result("orders/fulfilled", fulfilled)) == [("duplicate", [])]
    shop.result("fulfillments/update", fulfillment(55, shipment_status="out_for_delivery"))
    event = {"id": 1, "fulfillment_id": 55, "order_id": 1001, "status": "out_for_delivery"}
    assert outcome(shop.result("fulfillment_events/create", event)) == [("duplicate", [])]
    shop.result("fulfillment_events/create", {**event, "id": 2, "status": "delivered"})
    kinds = [(m[0], m[1]) for m in shop.messages()]
    assert (
        kinds
        == [("order.created", "pending")]
        + [("order.fulfilled", "pending")]
        + [("shipment.updated", "pending")] * 2
    )
    bodies = [m[3] for m in shop.messages()]
    assert "Tracking 1Z999AA10123456784" in bodies[1] and "#1001" in bodies[1]
    assert "#1001 is out for delivery" in bodies[2] and "#1001 has been delivered" in bodies[3]


def test_refund_is_addressed_from_its_order_or_skipped(receiver):
    shop = receiver()
    assert outcome(shop.result("refunds/create", refund(1, 4242))) == [
        ("accepted", [("skipped", "unknown_order")])
    ]
    shop.result("orders/create", order(customer_locale="fr", total_price="30.00"))
    assert outcome(shop.result("refunds/create", refund(2))) == [("accepted", [("pending", None)])]
    assert outcome(shop.result("refunds/create", refund(2), event_id="other")) == [
        ("duplicate", [])
    ]
    body = shop.messages()[-1][3]
    assert "25,50" in body and "#1001" in body  # the order's locale and currency


def test_an_older_order_delivery_does_not_overwrite_newer_context(receiver):
    shop = receiver()
    shop.result("orders/paid", order(updated_at="2026-11-01T12:00:00Z"))
    late = shop.result("orders/create", order(updated_at="2026-11-01T11:00:00Z"))
    assert outcome(late) == [("stale", [])]  # out of order: paid came first
    assert [m[0] for m in shop.messages()] == ["order.paid"]


def test_test_orders_and_what_follows_them_send_nothing(receiver):
    shop = receiver()
    assert outcome(shop.result("orders/create", order(test=True))) == [
        ("accepted", [("skipped", "test_order")])
    ]
    for topic, payload in [("fulfillments/create", fulfillment()), ("refunds/create", refund())]:
        [(_, [(message, _)])] = outcome(shop.result(topic, payload))
        assert message == "skipped"
    assert all(m[1] == "skipped" for m in shop.messages())


def test_cancelling_an_order_cancels_what_still_waits(runtime_factory):
    shop = {"domain": DOMAIN, "secret": SECRET}
    receiver = Receiver(
        runtime_factory(shopify={"shops": [shop]}, policy={"quiet_hours": "00:00-23:59"})
    )
    receiver.result("orders/create", order())
    assert receiver.messages()[0][1:3] == ("deferred", "quiet_hours")
    cancel, _ = receiver.result("orders/cancelled", order(cancelled_at="2026-11-01"))
    assert (cancel["key"], cancel["status"]) == ("order:1001:cancel_pending", "accepted")
    assert [m[:3] for m in receiver.messages()] == [
        ("order.created", "cancelled", "order_cancelled"),
        ("order.cancelled", "deferred", "quiet_hours"),
    ]


def test_consent_lands_in_the_ledger_with_its_evidence(receiver):
    shop = receiver()
    sms = {"state": "subscribed", "consent_updated_at": "2026-01-01T00:00:00Z"}
    sms |= {"consent_collected_from": "SHOPIFY", "opt_in_level": "single_opt_in"}
    payload = {"id": 7, "phone": PHONE, "sms_marketing_consent": sms}
    shop.result("customers_marketing_consent/update", payload)
    shop.result("customers/update", payload)  # the same change, announced twice
    runtime = shop.runtime
    index = runtime.vault.index(E164)
    with runtime.engine.connect() as conn:
        assert consent.state(conn, index).marketing == "opted_in"
        ledger = conn.execute(select(consent_ledger)).all()
    assert len(ledger) == 1 and ledger[0].source == SOURCE
    evidence = runtime.vault.decrypt_json(ledger[0].evidence_enc)
    assert evidence["consent_collected_from"] == "SHOPIFY"
    later = {**sms, "state": "unsubscribed", "consent_updated_at": "2026-02-01T00:00:00Z"}
    shop.result("customers/update", {**payload, "sms_marketing_consent": later})
    with runtime.engine.connect() as conn:
        assert consent.state(conn, index).marketing == "opted_out"


def test_app_uninstalled_stops_the_shop_from_sending(receiver):
    shop = receiver()
    shop.result("app/uninstalled", {"id": 1, "name": "Demo"})
    assert outcome(shop.result("orders/create", order())) == [
        ("accepted", [("skipped", "source_disabled")])
    ]


def test_customers_redact_erases_the_number_messages_and_orders(receiver):
    shop = receiver()
    shop.result("orders/create", order(1001))
    shop.result(
        "orders/create", order(1002, phone="+1 415 555 0122")
    )  # same customer, other number
    redact = {"shop_id": 1, "shop_domain": DOMAIN, "customer": {"id": 7, "phone": PHONE}}
    redact["orders_to_redact"] = [1001, 1002]
    shop.result("customers/redact", redact)
    assert shop.messages() == []
    with shop.runtime.engine.connect() as conn:
        assert conn.execute(select(order_context)).all() == []
        payloads = conn.execute(select(events.c.key, events.c.payload_enc)).all()
    assert [k for k, p in payloads if p is not None] == []  # keys stay for dedupe, data goes
    assert outcome(shop.result("orders/create", order(1001))) == [("duplicate", [])]


def test_shop_redact_erases_only_that_shop(runtime_factory):
    shops = [
        {"domain": DOMAIN, "secret": SECRET},
        {"domain": "other.myshopify.com", "secret": SECRET},
    ]
    shop = Receiver(runtime_factory(shopify={"shops": shops}))
    shop.result("orders/create", order())
    shop.result("orders/create", order(), domain="other.myshopify.com")
    shop.result("shop/redact", {"shop_id": 1, "shop_domain": DOMAIN})
    with shop.runtime.engine.connect() as conn:
        left = conn.execute(select(messages.c.source)).scalars().all()
    assert left == ["shopify:other.myshopify.com"]


def test_data_request_writes_an_export_and_logs_its_path_without_the_number(receiver, caplog):
    shop = receiver()
    shop.result("orders/create", order())
    request = {"shop_id": 1, "shop_domain": DOMAIN, "customer": {"id": 7, "phone": PHONE}}
    request |= {"orders_requested": [1001], "data_request": {"id": 9999}}
    with caplog.at_level(logging.INFO, logger="txsms"):
        shop.result("customers/data_request", request)
    [line] = [r.getMessage() for r in caplog.records if "export written" in r.getMessage()]
    path = Path(line.rsplit(" ", 1)[-1])
    exported = json.loads(path.read_text())
    assert exported["phone"] == E164 and exported["orders"][0]["order"] == "1001"
    assert "0111" not in line


def test_unknown_topics_are_acknowledged_and_ignored(receiver):
    shop = receiver()
    response = shop.post("products/create", {"id": 1})
    assert response.status_code == 200 and response.get_json()["events"] == []
    assert shop.messages() == []


def test_privacy_topics_need_a_valid_signature(receiver):
    shop = receiver()
    for topic in shopify.PRIVACY_TOPICS:
        body = dumps({"shop_id": 1, "shop_domain": DOMAIN, "customer": {"id": 1}})
        assert shop.post(topic, body, secret="wrong").status_code == 401
        headers = {k: v for k, v in signed(topic, body).items() if "Hmac" not in k}
        assert shop.post(topic, body, headers=headers).status_code == 401


# --- the reusable security battery --------------------------------------------------------------


class TestShopifyWebhookSecurity(WebhookBattery):
    path = "/webhooks/shopify"
    signature_headers = ("X-Shopify-Hmac-Sha256", "shopify-hmac-sha256")
    old_secret = OLD_SECRET

    @pytest.fixture
    def runtime(self, runtime_factory):
        shops = [{"domain": DOMAIN, "secret": ["new-secret-0123", OLD_SECRET]}]
        return runtime_factory(shopify={"shops": shops}, server={"max_body_bytes": 4096})

    @pytest.fixture
    def client(self, runtime):
        return create_app(runtime=runtime).test_client()

    def valid_body(self, n: int = 0) -> bytes:
        return dumps(order(2000 + n, phone=f"+1 415 555 01{n:02d}"))

    def headers(self, body: bytes, *, secret: str | None = None) -> dict[str, str]:
        return signed("orders/create", body, secret=secret or "new-secret-0123")

    def unknown_account_headers(self, body: bytes) -> dict[str, str]:
        return signed("orders/create", body, secret="new-secret-0123", domain="evil.myshopify.com")


# --- txsms install shopify, against a fake Admin API ------------------------------------------

ADDRESS = "https://sms.example.com/webhooks/shopify"


@pytest.fixture
def admin():
    with FakeShopifyAdmin() as fake:
        yield fake


@pytest.fixture
def install(tmp_path, admin):
    """Run `txsms install shopify ...`; returns (exit code, output)."""
    path = tmp_path / "txsms.toml"

    def run(*args: str, shop: dict | None = None, **shopify_section: Any) -> tuple[int, str]:
        entry = {"domain": DOMAIN, "secret": SECRET, "access_token": TOKEN, "admin_url": admin.url}
        public = {"public_url": "https://sms.example.com"}
        config = base_config(tmp_path, server=public, shopify=shopify_section)
        write_config(path, config, {"shopify.shops": [{**entry, **(shop or {})}]})
        result = CliRunner().invoke(cli, ["install", "shopify", *args, "--config", str(path)])
        return result.exit_code, result.output

    run.path = path
    return run


def table(output: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S+/\S+)\s+(.+)$", output, re.M))


def test_install_registers_every_topic_once(install, admin):
    code, output = install()
    assert code == 0, output
    assert table(output) == {topic: "created" for topic in shopify.TOPICS}
    assert admin.uris() == {shopify._enum(t): [ADDRESS] for t in shopify.TOPICS}
    assert {s["format"] for s in admin.subscriptions} == {"JSON"}
    assert "customers/redact" in output and "app's settings" in output
    assert {(c.version, c.token) for c in admin.calls} == {(shopify.API_VERSION, TOKEN)}
    admin.calls.clear()
    code, output = install()  # again: nothing to do
    assert code == 0 and set(table(output).values()) == {"exists"}
    assert admin.mutations() == []


def test_install_corrects_a_wrong_address_and_leaves_the_rest_alone(install, admin):
    old = admin.add("ORDERS_PAID", "https://old.example.com/webhooks/shopify")
    other = admin.add("PRODUCTS_CREATE", "https://elsewhere.example.com/hook")
    bus = admin.add("ORDERS_CREATE", "pubsub://project:topic")
    for n in range(6):  # more than one page of the listing
        admin.add("ORDERS_UPDATED", f"https://x{n}.example.com/")
    code, output = install()
    assert code == 0, output
    assert table(output)["orders/paid"] == "updated (was https://old.example.com/webhooks/shopify)"
    assert table(output)["orders/create"] == "created"
    assert old["uri"] == ADDRESS
    assert other["uri"] == "https://elsewhere.example.com/hook" and bus in admin.subscriptions
    assert len(admin.subscriptions) == 3 + 6 + len(shopify.TOPICS) - 1


def test_install_dry_run_changes_nothing(install, admin):
    admin.add("ORDERS_PAID", "https://old.example.com/webhooks/shopify")
    code, output = install("--dry-run")
    assert code == 0, output
    assert table(output)["orders/create"] == "would create"
    assert table(output)["orders/paid"].startswith("would update (was https://old.example.com")
    assert admin.mutations() == [] and len(admin.subscriptions) == 1


def test_install_shows_user_errors_and_fails(install, admin):
    admin.reject["REFUNDS_CREATE"] = "Address for this topic has already been taken"
    code, output = install()
    assert code != 0
    assert table(output)["refunds/create"] == (
        "FAILED create: webhookSubscription.uri: Address for this topic has already been taken"
    )
    assert "1 topic(s) failed" in output
    code, output = install("--address", "http://insecure.example.com/webhooks/shopify")
    assert code != 0 and "Address protocol http:// is not supported" in output


def test_install_reports_a_bad_token_or_version_clearly(install, admin):
    code, output = install(shop={"access_token": "shpat_wrong"})
    assert code != 0 and "401" in output and "Invalid API key or access token" in output
    assert "shpat_wrong" not in output
    code, output = install(api_version="2019-04")
    assert code != 0 and "404" in output
    code, output = install(api_version="2026-10")
    assert code == 0 and admin.calls[-1].version == "2026-10"


def test_uninstall_deletes_only_this_receivers_subscriptions(install, admin):
    install()
    other = admin.add("ORDERS_CREATE", "https://elsewhere.example.com/hook")
    code, output = install("--uninstall")
    assert code == 0, output
    assert set(table(output).values()) == {"deleted"}
    assert admin.subscriptions == [other]


def test_install_enables_a_shop_that_app_uninstalled_disabled(install, admin):
    install("--dry-run")  # writes the config file
    runtime = Runtime(load_config(install.path))
    runtime.prepare_database(migrate=True)
    try:
        Receiver(runtime).result("app/uninstalled", {"id": 1})
        with runtime.engine.connect() as conn:
            assert source_disabled(conn, SOURCE)
        code, output = install()
        assert code == 0 and "sending enabled again" in output
        with runtime.engine.connect() as conn:
            assert not source_disabled(conn, SOURCE)
    finally:
        runtime.close()


def test_install_needs_an_address_and_a_token(install, tmp_path):
    code, output = install(shop={"access_token": ""})
    assert code != 0 and "access_token" in output
    code, output = install("--shop", "nope.myshopify.com")
    assert code != 0 and "nope.myshopify.com" in output


# --- end to end: `txsms serve`, a fake Twilio, real HTTP ---------------------------------------


@pytest.fixture
def serve(tmp_path, fake_twilio, server_factory):
    """Start `txsms serve` with one shop and the fake Twilio; killed afterwards."""

    def start(**shop: Any) -> Server:
        config = base_config(tmp_path, provider=twilio_section(fake_twilio))
        entry = {"domain": DOMAIN, "secret": [SECRET], "name": "Demo Shop", **shop}
        return server_factory(tmp_path, config, arrays={"shopify.shops": [entry]}).start()

    return start


def deliver(server: Server, topic: str, body: bytes, **kw: Any) -> requests.Response:
    url = f"{server.url}/webhooks/shopify"
    return requests.post(url, data=body, headers=signed(topic, body, **kw), timeout=10)


def test_end_to_end_with_fixtures(serve, fake_twilio):
    server = serve(send_test_orders=True)
    example = json.loads((FIXTURES / "orders_create.json").read_bytes())
    example["phone"] = PHONE
    body = dumps(example)
    assert deliver(server, "orders/create", body).status_code == 200
    fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 1)
    retry = deliver(server, "orders/create", body)  # a retry with a new event id
    assert retry.json()["events"][0]["status"] == "duplicate"
    for name, count in (("fulfillments_create.json", 2), ("refunds_create.json", 3)):
        fixture = (FIXTURES / name).read_bytes()
        assert deliver(server, fixture_topic(FIXTURES / name), fixture).status_code == 200
        fake_twilio.wait_for(lambda n=count: len(fake_twilio.messages) == n)
    bodies = [m["body"] for m in fake_twilio.messages]
    assert [m["to"] for m in fake_twilio.messages] == [E164] * 3
    assert sum("We got your order #9999" in b for b in bodies) == 1
    assert "1z827wk74630" in bodies[1] and "$85.00" in bodies[2]
    wait_until(lambda: {m["status"] for m in server.messages()} == {"sent"})
    assert len(server.cli("messages", "--phone", PHONE, "--json").splitlines()) == 3

    redact = dumps(
        {
            "shop_id": 954889,
            "shop_domain": DOMAIN,
            "customer": {"id": 115310627314723950, "email": "john@example.com", "phone": PHONE},
            "orders_to_redact": [ORDER_ID],
        }
    )
    assert deliver(server, "customers/redact", redact, secret="wrong").status_code == 401
    assert len(server.cli("messages", "--phone", PHONE, "--json").splitlines()) == 3
    assert deliver(server, "customers/redact", redact).status_code == 200
    assert server.cli("messages", "--phone", PHONE, "--json") == ""
    assert server.messages() == []


def test_simulate_shows_the_whole_path(serve, fake_twilio):
    server = serve()
    out = server.cli("simulate", "shopify", "orders/create", "--to", PHONE)
    assert "200 OK" in out and '"status": "pending"' in out
    order_id = re.search(r"order id (\d+)", out).group(1)
    assert int(order_id) > 2**53
    out = server.cli("simulate", "shopify", "fulfillments/create", "--order", order_id)
    assert '"status": "pending"' in out
    fake_twilio.wait_for(lambda: len(fake_twilio.messages) == 2)
    assert "has shipped via UPS" in fake_twilio.messages[1]["body"]
    assert {m["to"] for m in fake_twilio.messages} == {E164}
    out = server.cli("simulate", "shopify", "orders/create", "--to", PHONE)  # fresh ids again
    assert '"status": "accepted"' in out


def test_twenty_deliveries_are_acknowledged_while_the_provider_is_stuck(serve, fake_twilio):
    server = serve()
    fake_twilio.delay = 3.0  # every send takes 3 s
    bodies = [dumps(order(3000 + n, phone=f"+1 415 555 01{n:02d}")) for n in range(20)]
    assert deliver(server, "orders/create", bodies[0]).status_code == 200
    fake_twilio.wait_for(lambda: len(fake_twilio.requests) == 1)  # the worker is now held
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: deliver(server, "orders/create", b), bodies[1:]))
    assert [a.status_code for a in answers] == [200] * 19
    # All were answered while the provider still held its first request.
    assert fake_twilio.requests[0].at + 3.0 > time.monotonic()
    assert len(fake_twilio.requests) == 1
    statuses = [m["status"] for m in server.messages()]
    assert len(statuses) == 20 and statuses.count("sending") == 1
