"""The WooCommerce connector: signatures over the shared fixtures, the creation ping, status
transitions out of noisy order.updated deliveries, shipment tracking, reconciliation of lost
deliveries, `txsms install|simulate|reconcile woocommerce`, and the webhook security battery.

The fixtures in ../shared/fixtures/woocommerce are read as they are, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import make_config, twilio_section
from fakes import wait_until
from fakes.woocommerce import CONSUMER_KEY, CONSUMER_SECRET, FakeWooCommerce, gmt, php_json
from sqlalchemy import select

# Fixtures are imported "as" themselves (a re-export) so that pytest finds them here.
from test_cli import _restore_logging as _restore_logging  # autouse, for CliRunner runs
from test_serve import base_config, write_config
from test_serve import server_factory as server_factory
from webhook_battery import WebhookBattery, stored

from txsms.connectors import woocommerce as wc
from txsms.core.cli import cli
from txsms.core.errors import ConfigError, PayloadError, SignatureError
from txsms.core.runtime import Runtime
from txsms.core.storage import cursors, messages
from txsms.core.worker import Worker
from txsms.webhooks import create_app

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "woocommerce"  # = ../shared/fixtures
STORE = "https://shop.example"
SECRET = "wc-secret-0123456789abcdef"
OLD_SECRET = "wc-old-secret-fedcba987654"
PHONE = "(415) 555-0100"
PATH = "/webhooks/woocommerce"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def order(
    order_id: int = 727,
    status: str = "processing",
    *,
    modified: float | None = None,
    phone: str = PHONE,
    meta: list | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The REST docs' order 727 (the webhook payload of order.* topics), with changes."""
    data = json.loads(fixture("docs-v3-order-727-processing.json"))
    data.update(id=order_id, number=str(order_id), status=status, **extra)
    data["billing"]["phone"] = phone
    data["meta_data"] = meta if meta is not None else data["meta_data"]
    data["date_modified_gmt"] = gmt(modified if modified is not None else 1_700_000_000)
    return data


def tracking(number: str, provider: str = "UPS", **extra: str) -> dict[str, Any]:
    item = {
        "tracking_provider": provider,
        "custom_tracking_provider": "",
        "custom_tracking_link": "",
        "tracking_number": number,
        "date_shipped": "1710288000",
        "tracking_id": hashlib.md5(number.encode()).hexdigest(),
    }
    return {"id": 99, "key": "_wc_shipment_tracking_items", "value": [{**item, **extra}]}


def headers(body: bytes, secret: str = SECRET, *, source: str = f"{STORE}/",
            topic: str = "order.updated") -> dict[str, str]:  # fmt: skip
    resource, _, event = topic.partition(".")
    return {
        "X-WC-Webhook-Source": source,
        "X-WC-Webhook-Topic": topic,
        "X-WC-Webhook-Resource": resource,
        "X-WC-Webhook-Event": event,
        "X-WC-Webhook-Signature": wc.sign(body, secret),
        "X-WC-Webhook-ID": "27",
        "X-WC-Webhook-Delivery-ID": "039f3155b209b1c591c26f60004d889f",
    }


def store_entry(url: str = STORE, **extra: Any) -> dict[str, Any]:
    return {"url": url, "secret": [SECRET, OLD_SECRET], "name": "Woo Shop", **extra}


def sections(*stores: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"woocommerce": {"stores": list(stores) or [store_entry()]},
            "server": {"max_body_bytes": 4096}, **more}  # fmt: skip


def connector(tmp_path, *stores: dict[str, Any]) -> wc.Connector:
    config = make_config(tmp_path, "sqlite:///unused.db", **sections(*stores))
    return wc.Connector(config)


def events_for(tmp_path, payload: dict[str, Any], **store: Any):
    store_ = wc.Store.from_config(store_entry(**store), make_config(tmp_path, "sqlite:///x.db"))
    return wc.translate(store_, payload)


def post(client, payload: dict[str, Any] | bytes, topic: str = "order.updated", **kw):
    body = payload if isinstance(payload, bytes) else php_json(payload)
    return client.post(
        PATH, data=body, headers=headers(body, topic=topic, **kw), content_type="application/json"
    )


def message_rows(runtime: Runtime) -> list[Any]:
    with runtime.engine.connect() as conn:
        return conn.execute(select(messages).order_by(messages.c.created_at)).all()


# -- signatures: every shared vector, byte for byte ------------------------------------------------


def vectors() -> list[dict[str, Any]]:
    return json.loads(fixture("signature-vectors.json"))["vectors"]


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v["name"])
def test_every_fixture_vector_verifies_byte_for_byte(tmp_path, vector):
    body = fixture(vector["body_file"])
    assert len(body) == vector["body_len"]
    assert hashlib.sha256(body).hexdigest() == vector["body_sha256"]
    assert wc.sign(body, vector["secret"]) == vector["expected_signature"]
    # ...and through the receiver's own check, with the header as WooCommerce sends it.
    conn = connector(tmp_path, {"url": STORE, "secret": vector["secret"]})
    hdrs = headers(body, vector["secret"]) | {"Content-Type": "application/json"}
    hdrs["X-WC-Webhook-Signature"] = vector["expected_signature"]
    assert conn.verify(hdrs, body).source == "woocommerce:shop.example"
    with pytest.raises(SignatureError):
        conn.verify(hdrs, body + b" ")


def test_entity_secret_is_decoded_as_wordpress_does():
    body = fixture("vector-v5-entity-secret.json")
    assert wc.sign(body, "abc&amp;def") == wc.sign(body, "abc&def")
    literal = "Hwq7fhsBTktcGw4OGuMIPoDihFH4eREbXEuXFxkaS3w="  # the key NOT decoded
    assert wc.sign(body, "abc&amp;def") != literal


@pytest.mark.parametrize(
    "raw, decoded",
    [
        ("abc&amp;def", "abc&def"),
        ("&amp;lt;", "&lt;"),  # one strtr() pass, as PHP
        ("&#39;&#0039;&#X27;&#x027;", "''''"),
        ("&quot;&#34;&#x22;&lt;&gt;&#60;&#62;&#0038;&#x26;", '"""<><>&&'),
        ("&nbsp;&eacute;&#65;", "&nbsp;&eacute;&#65;"),  # only the special chars
        ("no entities", "no entities"),
    ],
)
def test_wp_specialchars_decode(raw, decoded):
    assert wc.wp_specialchars_decode(raw) == decoded


def test_bodies_are_encoded_as_wp_json_encode_writes_them():
    completed = json.loads(fixture("docs-v3-order-727-completed.json"))
    assert wc.wp_json(completed) == fixture("vector-v6-docs-order-completed.json")
    unicode = fixture("vector-v2-unicode-slashes.json")
    assert wc.wp_json(json.loads(unicode)) == unicode
    body = wc.wp_json(wc.sample_order(5, "processing", "+1 415 555 0100") | {"x": "Café/é"})
    assert body.isascii() and b"https:\\/\\/" in body and b"Caf\\u00e9\\/" in body


# -- the route: ping, store choice, topics ---------------------------------------------------------


@pytest.fixture
def wc_runtime(runtime_factory) -> Runtime:
    return runtime_factory(**sections())


@pytest.fixture
def client(wc_runtime):
    return create_app(runtime=wc_runtime).test_client()


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", None])
def test_creation_ping_is_exactly_200_and_changes_nothing(client, wc_runtime, content_type):
    response = client.post(PATH, data=b"webhook_id=42", content_type=content_type)
    assert response.status_code == 200
    assert stored(wc_runtime) == (0, 0, 0)


def test_a_ping_lookalike_with_webhook_headers_must_be_signed(client, wc_runtime):
    response = client.post(PATH, data=b"webhook_id=42", headers={"X-WC-Webhook-Topic": "x"})
    assert response.status_code == 401
    assert stored(wc_runtime) == (0, 0, 0)


@pytest.mark.parametrize("source", ["http://SHOP.example", "https://shop.example", STORE + "/"])
def test_store_is_chosen_by_source_whatever_scheme_case_and_slash(client, wc_runtime, source):
    assert post(client, order(), source=source).status_code == 200
    assert stored(wc_runtime)[:2] == (1, 1)


@pytest.mark.parametrize(
    "body, topic",
    [
        ("vector-v4-deleted.json", "order.deleted"),
        ("vector-v3-action-topic.json", "action.woocommerce_order_status_changed"),
        ("vector-v1-ascii.json", "product.updated"),
    ],
)
def test_deleted_action_and_other_topics_are_acknowledged_and_ignored(
    client, wc_runtime, body, topic
):
    assert post(client, fixture(body), topic=topic).status_code == 200
    assert stored(wc_runtime) == (0, 0, 0)


def test_the_captured_erpnext_delivery_is_accepted(runtime_factory):
    secret = "ec434676aa1de0e502389f515c38f89f653119ab35e9117c7a79e576"
    runtime = runtime_factory(**sections({"url": "https://erp.example", "secret": secret}))
    body = fixture("erpnext-order-created-signed.json")
    hdrs = headers(body, secret, source="https://erp.example/", topic="order.created")
    hdrs["X-WC-Webhook-Signature"] = "h1SjzQMPwd68MF5bficeFq20/RkQeRLsb9AVCUz/rLs="
    client = create_app(runtime=runtime).test_client()
    response = client.post(PATH, data=body, headers=hdrs, content_type="application/json")
    assert response.status_code == 200
    (event,) = response.json["events"]
    assert event["key"] == "order:74:status:processing" and event["status"] == "accepted"
    assert len(event["messages"]) == 1  # its number "123457890" is not a valid IN mobile


# -- translation: status map, addressing, tracking -------------------------------------------------


@pytest.mark.parametrize(
    "status, kind",
    [
        ("pending", None),
        ("failed", None),
        ("checkout-draft", None),
        ("on-hold", "order.created"),
        ("processing", "order.paid"),
        ("completed", "order.fulfilled"),
        ("cancelled", "order.cancelled"),
        ("refunded", "order.refunded"),
        ("shipped", None),  # custom statuses send nothing unless status_events says so
    ],
)
def test_default_status_map(tmp_path, status, kind):
    events = [e for e in events_for(tmp_path, order(5, status)) if e.kind != "messages.cancel"]
    assert [e.kind for e in events] == ([kind] if kind else [])
    for e in events:
        assert e.key == f"order:5:status:{status}" and e.source == "woocommerce:shop.example"
        assert e.order.ref == "5" and e.order.status == status
        assert e.order.modified_at == 1_700_000_000 == e.occurred_at


def test_status_events_override_the_defaults_per_store(tmp_path):
    custom = {"processing": "", "shipped": "order.fulfilled"}
    assert events_for(tmp_path, order(5, "processing"), status_events=custom) == []
    (event,) = events_for(tmp_path, order(5, "shipped"), status_events=custom)
    assert event.kind == "order.fulfilled"
    (event,) = events_for(tmp_path, order(5, "completed"), status_events=custom)
    assert event.kind == "order.fulfilled"  # the rest keep their defaults


def test_addressing_and_template_data(tmp_path):
    payload = order(9, "processing", phone="", currency="EUR", total="12.50")
    payload["billing"]["country"] = "DE"
    payload["shipping"].update(phone="0151 23456789", country="de")
    payload["line_items"][1]["name"] = "Ship Your Idea &ndash; Black"
    (event,) = events_for(tmp_path, payload, locale="de")
    assert event.recipient.phone == "0151 23456789" and event.recipient.country == "DE"
    assert event.recipient.name == "John Doe" and event.recipient.locale == "de"
    assert event.data["shop"] == {"name": "Woo Shop"}
    assert event.data["order"]["number"] == "9"
    assert (event.data["order"]["total"], event.data["order"]["currency"]) == ("12.50", "EUR")
    assert event.data["order"]["items"][1] == {"name": "Ship Your Idea \u2013 Black", "quantity": 1}
    assert event.data["customer"] == {"first_name": "John", "name": "John Doe"}


def test_locale_comes_from_order_meta_before_the_store(tmp_path):
    meta = [{"id": 1, "key": "wpml_language", "value": "fr"}]
    (event,) = events_for(tmp_path, order(meta=meta), locale="de")
    assert event.recipient.locale == "fr"
    (event,) = events_for(tmp_path, order(meta=[{"id": 1, "key": "locale", "value": "pt_BR"}]))
    assert event.recipient.locale == "pt-BR"
    (event,) = events_for(tmp_path, order())
    assert event.recipient.locale is None  # then the default templates


def test_refund_amount_comes_from_the_refunds(tmp_path):
    refunds = [{"id": 1, "reason": "", "total": "-10.00"}, {"id": 2, "total": "-19.35"}]
    payload = order(5, "refunded", refunds=refunds)
    (_, event) = events_for(tmp_path, payload)
    assert event.kind == "order.refunded" and event.data["refund"] == {"amount": "29.35"}


def test_a_new_tracking_number_sends_once_with_carrier_number_and_url(tmp_path):
    payload = order(5, "processing", meta=[tracking("1Z999AA10123456784")])
    paid, shipped = events_for(tmp_path, payload)
    assert paid.kind == "order.paid" and paid.skip is None
    assert (shipped.kind, shipped.key) == ("order.fulfilled", "order:5:tracking:1Z999AA10123456784")
    assert shipped.data["shipment"] == {
        "carrier": "UPS",
        "tracking_number": "1Z999AA10123456784",
        "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
        "status": "in_transit",
    }
    # Completed with the tracking that came with it: one "shipped" text, not two.
    completed, shipped = events_for(tmp_path, order(5, "completed", meta=payload["meta_data"]))
    assert completed.skip == "covered_by_tracking" and shipped.skip is None
    # A custom provider brings its own link; shipment.updated when the store prefers it.
    custom = tracking(
        "AB1", "", custom_tracking_provider="Kurier", custom_tracking_link="https://k.example/AB1"
    )
    (_, event) = events_for(tmp_path, order(5, meta=[custom]), tracking_event="shipment.updated")
    assert event.kind == "shipment.updated"
    assert event.data["shipment"]["carrier"] == "Kurier"
    assert event.data["shipment"]["tracking_url"] == "https://k.example/AB1"


def test_tracking_meta_as_a_php_object_and_on_dead_orders(tmp_path):
    item = tracking("N1")["value"][0]
    meta = [{"id": 1, "key": "_wc_shipment_tracking_items", "value": {"0": item, "2": item}}]
    assert [e.key for e in events_for(tmp_path, order(5, meta=meta))][1:] == ["order:5:tracking:N1"]
    assert [e.kind for e in events_for(tmp_path, order(5, "cancelled", meta=meta))] == [
        "messages.cancel",
        "order.cancelled",
    ]


@pytest.mark.parametrize("payload", [{"status": "processing"}, {"id": 5}, {"id": True}])
def test_an_order_without_id_or_status_is_a_payload_error(tmp_path, payload):
    with pytest.raises(PayloadError):
        events_for(tmp_path, payload)


# -- transitions against a fake Twilio, on SQLite and PostgreSQL -----------------------------------


def test_transitions_not_deliveries(runtime_factory, fake_twilio):
    runtime = runtime_factory(**sections(), provider=twilio_section(fake_twilio))
    client = create_app(runtime=runtime).test_client()
    worker = Worker(runtime)

    def sent_after(response, expected: int) -> list[dict[str, Any]]:
        assert response.status_code == 200, response.get_data(as_text=True)
        wait_until(lambda: worker.run_once() == 0 and len(fake_twilio.messages) >= expected)
        assert len(fake_twilio.messages) == expected
        return fake_twilio.messages

    sent = sent_after(client.post(PATH, data=b"webhook_id=42"), 0)
    t = 1_700_000_000
    sent = sent_after(post(client, order(7, modified=t), topic="order.created"), 1)
    assert "Payment received for your order 7 ($29.35)" in sent[0]["body"]
    assert sent[0]["to"] == "+14155550100"
    sent_after(post(client, order(7, modified=t + 5)), 1)  # a save with the same status
    sent_after(post(client, order(7, modified=t + 5)), 1)  # a duplicate delivery
    sent = sent_after(post(client, order(7, "completed", modified=t + 10)), 2)
    assert "your order 7 has shipped" in sent[1]["body"]
    sent_after(post(client, order(7, "completed", modified=t + 20)), 2)
    response = post(client, order(7, "cancelled", modified=t + 8))  # older than what was seen
    assert response.json["events"][0]["status"] == "stale"
    sent_after(response, 2)
    # The processing delivery of another order was lost; its late arrival after completed
    # is stale, so no "payment received" follows "shipped".
    sent_after(post(client, order(8, "completed", modified=t + 30)), 3)
    response = post(client, order(8, "processing", modified=t + 25))
    assert response.json["events"][0]["status"] == "stale"
    sent_after(response, 3)


def test_tracking_added_while_processing_then_completed_sends_two_texts_in_all(runtime_factory):
    runtime = runtime_factory(**sections())
    client = create_app(runtime=runtime).test_client()
    meta = [tracking("1Z1")]
    assert post(client, order(3, modified=1)).status_code == 200
    assert post(client, order(3, meta=meta, modified=2)).status_code == 200  # AST saves
    assert post(client, order(3, "completed", meta=meta, modified=3)).status_code == 200
    rows = message_rows(runtime)
    assert [(r.kind, r.status, r.reason) for r in rows] == [
        ("order.paid", "pending", None),
        ("order.fulfilled", "pending", None),
        ("order.fulfilled", "skipped", "covered_by_tracking"),
    ]


def test_a_cancelled_order_cancels_what_still_waits_for_quiet_hours(runtime_factory):
    runtime = runtime_factory(**sections(), policy={"quiet_hours": "00:00-23:59"})
    client = create_app(runtime=runtime).test_client()
    assert post(client, order(4, "on-hold", modified=1)).status_code == 200
    assert post(client, order(4, "cancelled", modified=2)).status_code == 200
    rows = message_rows(runtime)
    assert [(r.kind, r.status, r.reason) for r in rows] == [
        ("order.created", "cancelled", "order_cancelled"),
        ("order.cancelled", "deferred", "quiet_hours"),
    ]


# -- the security battery --------------------------------------------------------------------------


class TestWooCommerceBattery(WebhookBattery):
    path = PATH
    signature_headers = ("X-WC-Webhook-Signature",)
    old_secret = OLD_SECRET
    max_body_bytes = 4096

    @pytest.fixture
    def runtime(self, runtime_factory):
        return runtime_factory(**sections())

    @pytest.fixture
    def client(self, runtime):
        return create_app(runtime=runtime).test_client()

    def valid_body(self, n: int = 0) -> bytes:
        return php_json(order(1000 + n))

    def headers(self, body: bytes, *, secret: str | None = None) -> dict[str, str]:
        return headers(body, secret or SECRET)

    def unknown_account_headers(self, body: bytes) -> dict[str, str]:
        return headers(body, source="https://not-configured.example/")


# -- reconciliation --------------------------------------------------------------------------------


@pytest.fixture
def shop():
    with FakeWooCommerce() as fake:
        yield fake


def keyed(fake: FakeWooCommerce, **extra: Any) -> dict[str, Any]:
    keys = {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}
    return store_entry(fake.url, **{**keys, **extra})


def test_reconciliation_sends_a_lost_delivery_once(runtime_factory, shop, monkeypatch):
    monkeypatch.setattr(wc, "PER_PAGE", 5)
    runtime = runtime_factory(**sections(keyed(shop)))
    client = create_app(runtime=runtime).test_client()
    store = wc.find_store(runtime.config, shop.url)
    shop.save_order(order(1, "processing"))  # delivered:
    response = post(client, shop.orders[1], source=f"{shop.url}/", topic="order.created")
    assert response.status_code == 200
    for i in range(2, 14):  # lost: WooCommerce never retries a failed delivery
        shop.save_order(order(i, "on-hold" if i % 2 else "pending"))

    first = wc.reconcile(runtime, store)
    assert first.first_run and first.orders == 13  # in three pages of five
    assert (first.accepted, first.queued) == (6, 6)  # on-hold; pending sends nothing
    assert first.cursor == datetime.fromisoformat(shop.orders[13]["date_modified_gmt"] + "+00:00")
    assert len(message_rows(runtime)) == 7

    second = wc.reconcile(runtime, store)
    assert not second.first_run and (second.accepted, second.queued) == (0, 0)
    assert second.since == first.cursor - wc.OVERLAP
    assert len(message_rows(runtime)) == 7
    with runtime.engine.connect() as conn:
        cursor = conn.execute(select(cursors.c.value)).scalar_one()
    assert cursor == first.cursor.isoformat()
    pages = [q for m, p, q in shop.requests if p.endswith("/orders")]
    assert [q["page"] for q in pages] == ["1", "2", "3"] * 2  # the overlap re-reads them all
    assert pages[0]["modified_after"] and pages[0]["dates_are_gmt"] == "true"


def test_first_reconciliation_looks_back_24_hours_unless_told(runtime_factory, shop):
    runtime = runtime_factory(**sections(keyed(shop)))
    store = wc.find_store(runtime.config, shop.url)
    shop.clock -= 3 * 86400
    shop.save_order(order(1, "on-hold"))  # three days ago
    assert wc.reconcile(runtime, store).orders == 0
    since = datetime.now(UTC) - timedelta(days=4)
    assert wc.reconcile(runtime, store, since=since).queued == 1


def test_reconcile_command_and_a_rest_error(tmp_path, shop):
    path = write_stores(tmp_path, keyed(shop))
    shop.save_order(order(4, "on-hold"))
    out = run(path, "reconcile", "woocommerce").output
    assert f"{shop.url}: 1 order(s) modified since" in out and "first run: looked back" in out
    assert "1 message(s) queued" in out
    out = run(path, "reconcile", "woocommerce", "--store", shop.url).output
    assert "0 new event(s)" in out and "first run" not in out
    path = write_stores(tmp_path, keyed(shop, consumer_secret="cs_wrong"))
    result = run(path, "reconcile", "woocommerce", "--since", "2020-01-01T00:00:00", code=1)
    assert "HTTP 401 woocommerce_rest_cannot_view" in result.output


def test_serve_runs_reconciliation_only_where_configured(tmp_path, runtime_factory, shop):
    runtime = runtime_factory(
        **sections(store_entry(), keyed(shop, reconcile_minutes=15, name="Two"))
    )
    (job,) = wc.background_jobs(runtime)
    assert job.interval_seconds == 900 and "127.0.0.1" in job.name
    shop.save_order(order(2, "on-hold"))
    job.run()
    assert len(message_rows(runtime)) == 1


def test_config_checks(tmp_path):
    def load(**store):
        return make_config(tmp_path, "sqlite:///x.db", **sections(store_entry(**store)))

    with pytest.raises(ConfigError, match=r"status_events.processing.value: unknown event kind"):
        load(status_events={"processing": "order.payd"})
    with pytest.raises(ConfigError, match="reconcile_minutes: reconciliation reads the REST"):
        load(reconcile_minutes=5)
    with pytest.raises(ConfigError, match=r"stores\.1\.url: the same store as stores\.0"):
        twice = sections(store_entry(), store_entry("HTTP://Shop.Example/"))
        make_config(tmp_path, "sqlite:///x.db", **twice)


# -- install ---------------------------------------------------------------------------------------


def write_stores(tmp_path: Path, *stores: dict[str, Any]) -> Path:
    arrays = {"woocommerce.stores": list(stores)}
    return write_config(tmp_path / "txsms.toml", base_config(tmp_path), arrays)


def run(path: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(cli, [*args, "--config", str(path)])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def test_install_is_idempotent_and_fixes_what_is_wrong(tmp_path, shop):
    path = write_stores(tmp_path, keyed(shop))
    address = "https://sms.example.com"
    out = run(path, "install", "woocommerce", "--address", address, "--dry-run").output
    assert "created (dry run)" in out and shop.webhooks == {}

    out = run(path, "install", "woocommerce", "--address", address).output
    assert "warning" not in out
    hooks = sorted(shop.webhooks.values(), key=lambda h: h["topic"])
    assert [(h["topic"], h["status"], h["secret"]) for h in hooks] == [
        ("order.created", "active", SECRET),  # our secret, never WooCommerce's random one
        ("order.updated", "active", SECRET),
    ]
    assert {h["delivery_url"] for h in hooks} == {f"{address}/webhooks/woocommerce"}

    writes = len([r for r in shop.requests if r[0] != "GET"])
    out = run(path, "install", "woocommerce", "--store", shop.url, "--address", address).output
    assert out.count("ok (active)") == 2
    assert len([r for r in shop.requests if r[0] != "GET"]) == writes  # changed nothing

    hooks[0].update(status="disabled", secret="something else")  # seven failed deliveries
    hooks[1]["delivery_url"] = "https://old.example.com/webhooks/woocommerce"
    out = run(path, "install", "woocommerce", "--address", address).output
    assert "fixed status" in out and "fixed delivery_url" in out
    assert all(h["status"] == "active" and h["secret"] == SECRET for h in hooks)
    assert len(shop.webhooks) == 2

    out = run(path, "install", "woocommerce", "--address", address, "--uninstall").output
    assert out.count("deleted") == 2 and shop.webhooks == {}
    deletes = [q for m, p, q in shop.requests if m == "DELETE"]
    assert deletes == [{"force": "true"}] * 2


@pytest.mark.parametrize(
    "address, warning",
    [
        ("https://sms.example.com:3000", "port 3000: WordPress refuses delivery URLs"),
        ("http://10.0.0.16:8080", "not a public address"),
        ("https://sms.example.com:8080", None),
    ],
)
def test_install_warns_about_addresses_wordpress_refuses(tmp_path, shop, address, warning):
    path = write_stores(tmp_path, keyed(shop))
    result = run(path, "install", "woocommerce", "--address", address, "--dry-run")
    if warning:
        assert warning in result.output
    else:
        assert "warning" not in result.output


def test_install_without_keys_or_with_wrong_ones_exits_non_zero(tmp_path, shop):
    path = write_stores(tmp_path, store_entry(shop.url))
    result = run(path, "install", "woocommerce", "--address", "https://a.example", code=1)
    assert "consumer_key and consumer_secret are needed" in result.output
    path = write_stores(tmp_path, keyed(shop, consumer_key="ck_wrong"))
    result = run(path, "install", "woocommerce", "--address", "https://a.example", code=1)
    assert "HTTP 401 woocommerce_rest_cannot_view" in result.output


# -- end to end: `txsms serve`, the fake store, a fake Twilio --------------------------------------


@pytest.mark.slow
def test_a_store_end_to_end(tmp_path, fake_twilio, shop, server_factory):
    config = base_config(tmp_path, provider=twilio_section(fake_twilio))
    server = server_factory(tmp_path, config, arrays={"woocommerce.stores": [keyed(shop)]})
    server.start()
    # install registers both topics pointing at the receiver, and says why a real
    # WordPress would refuse this address.
    result = run(server.path, "install", "woocommerce", "--address", server.url)
    assert "port" in result.output and "not a public address" in result.output
    assert len(shop.webhooks) == 2
    ping = requests.post(f"{server.url}{PATH}", data=b"webhook_id=1", timeout=5)
    assert ping.status_code == 200

    def sent(n: int) -> list[dict[str, Any]]:
        wait_until(lambda: len(fake_twilio.messages) >= n, timeout=10)
        assert len(fake_twilio.messages) == n
        return fake_twilio.messages

    def delivered(payload: dict[str, Any]) -> None:
        (response,) = shop.save_order(payload, deliver=True)
        assert response.status_code == 200, response.text

    delivered(order(11, "processing"))  # order.created
    assert "Payment received for your order 11" in sent(1)[0]["body"]
    delivered(order(11, "processing"))  # order.updated, same status
    delivered(order(11, "completed"))
    delivered(order(11, "completed"))
    stale = order(11, "processing", modified=shop.clock - 10)
    assert [r.status_code for r in shop.deliver(stale, "order.updated")] == [200]
    shop.save_order(order(12, "on-hold"))  # this delivery is lost
    assert len(sent(2)) == 2
    assert len([m for m in server.messages() if m["status"] != "skipped"]) == 2

    run(server.path, "reconcile", "woocommerce")
    assert "We got your order 12" in sent(3)[2]["body"]
    run(server.path, "reconcile", "woocommerce")
    out = run(server.path, "simulate", "woocommerce", "order.created", "--order-id", "77",
              "--to", "+1 415 555 0123").output  # fmt: skip
    assert "order 77: HTTP 200" in out
    assert sent(4)[3]["to"] == "+14155550123"
    run(server.path, "simulate", "woocommerce", "ping")
    assert len(server.messages()) == 4
    assert server.stop() == 0
    assert len(fake_twilio.messages) == 4
