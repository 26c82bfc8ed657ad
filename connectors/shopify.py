"""Shopify: verify webhook deliveries, translate them into canonical Events, register them.

    POST /webhooks/shopify   X-Shopify-Topic, X-Shopify-Shop-Domain, X-Shopify-Hmac-Sha256, ...

The shop is chosen by its domain from `[[shopify.shops]]`; the HMAC is base64(HMAC-SHA256(app
client secret, raw body)), tried with every configured secret (rotation). Nothing here talks
to the network on the request path: the route commits the Events and answers.
`txsms install shopify` registers the topics through the GraphQL Admin API;
`txsms simulate shopify TOPIC` posts a signed sample delivery to a running receiver.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import click
import phonenumbers
import requests

from txsms.connectors import common
from txsms.connectors.base import LOCALE, Delivery, as_dict, epoch, hmac_b64
from txsms.connectors.base import Connector as _Base
from txsms.core import jsoncodec
from txsms.core.cliutil import config_option, load, open_runtime
from txsms.core.config import Config
from txsms.core.errors import PayloadError, SignatureError
from txsms.core.events import SHIPMENT_STATUSES, Consent, Event, OrderRef, Recipient
from txsms.core.phones import PhoneError, normalize
from txsms.core.templates import money

log = logging.getLogger(__name__)

#: The Admin API version `install` speaks, pinned and bumped on purpose (each is supported
#: for 12 months); `[shopify] api_version` overrides it. 2025-10 or later: `uri` is needed.
API_VERSION = "2026-07"

#: Topic -> what it becomes; `install` registers exactly these.
TOPICS: dict[str, str] = {
    "orders/create": "order.created",
    "orders/paid": "order.paid",
    "orders/cancelled": "order.cancelled",
    "orders/fulfilled": "order.fulfilled",
    "fulfillments/create": "order.fulfilled",
    "fulfillments/update": "shipment.updated",
    "fulfillment_events/create": "shipment.updated",
    "refunds/create": "order.refunded",
    "customers/create": "customer.consent",
    "customers/update": "customer.consent",
    "customers_marketing_consent/update": "customer.consent",
    "app/uninstalled": "source.disabled",
}
#: Mandatory compliance topics: declared in the app's settings, not through the API.
PRIVACY_TOPICS: dict[str, str] = {
    "customers/data_request": "privacy.data_request",
    "customers/redact": "privacy.redact",
    "shop/redact": "privacy.redact",
}
_FAILED_FULFILLMENT = ("cancelled", "error", "failure")
_CANCELLED_BY_CANCEL = ["order.created", "order.paid", "order.fulfilled", "shipment.updated"]


def sign(secret: str, body: bytes) -> str:
    """X-Shopify-Hmac-Sha256 of `body`, keyed by the app's client secret as it is."""
    return hmac_b64(secret.encode(), body)


def shop_key(domain: str) -> str:
    """A shop is named by its myshopify domain, in any case."""
    return domain.strip().lower()


@dataclass(frozen=True)
class ShopifyDelivery(Delivery):
    event_id: str = ""  # X-Shopify-Event-Id (else Webhook-Id): makes one-off keys unique


class Connector(_Base):
    name = "shopify"
    header_prefixes = ("X-Shopify-", "Shopify-")  # the second: the events form of the headers
    signature_header = "Hmac-Sha256"

    def __init__(self, config: Config):
        super().__init__(config)
        self.shops = {shop["domain"]: shop for shop in config.shopify.get("shops", [])}

    def verify(self, headers: Mapping[str, str], body: bytes) -> ShopifyDelivery:
        h = self.headers(headers)
        domain = shop_key(h["Shop-Domain"])
        shop = self.shops.get(domain)
        if shop is None:  # 401, as for a bad signature: nothing to verify it against
            raise SignatureError(f"unknown shop {domain[:100]!r}")
        expected = (sign(s, body) for s in shop["secret"])
        self.check_signature(h, expected, "signature does not match the body")
        # Shopify sends only JSON; anything else is refused with 400 before it is parsed.
        if h.mime != "application/json" and not h.mime.endswith("+json"):
            raise PayloadError(f"expected Content-Type application/json, got {h.mime[:60]!r}")
        topic = self.topic(h)
        event_id = (h["Event-Id"] or h["Webhook-Id"])[:120]
        # The same Event-Id may be shared by the deliveries of several topics that one merchant
        # action caused, so a delivery is (topic, id); business keys dedupe across topics.
        return ShopifyDelivery(
            source=f"shopify:{domain}",
            topic=topic,
            delivery_id=f"{topic}|{event_id}" if event_id else None,
            account=shop,
            event_id=event_id or uuid.uuid4().hex,
        )

    def events(self, delivery: Delivery, body: bytes) -> list[Event]:
        try:
            payload = jsoncodec.loads(body)  # exact for ids above 2**53, unlike JavaScript
        except (ValueError, UnicodeDecodeError):
            raise PayloadError("body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise PayloadError("expected a JSON object")
        handler = _HANDLERS.get(delivery.topic)
        if handler is None:
            log.info("%s: topic %s is not used; acknowledged", delivery.source, delivery.topic)
            return []
        shop = _Shop(
            source=delivery.source,
            name=delivery.account.get("name"),
            locale=delivery.account.get("locale"),
            send_test_orders=bool(delivery.account.get("send_test_orders")),
            region=self.config.sender.default_region,
            occurrence=getattr(delivery, "event_id", "") or uuid.uuid4().hex,
        )
        return handler(delivery.topic, payload, shop)


# --- Translation: one function per family of topics ------------------------------------------


@dataclass(frozen=True)
class _Shop:
    source: str
    name: str | None
    locale: str | None
    send_test_orders: bool
    region: str  # sender.default_region, for numbers without a country
    occurrence: str  # unique per merchant action, for events that may happen more than once

    def data(self, **data: Any) -> dict[str, Any]:
        return {"shop": {"name": self.name}, **data} if self.name else data


def _orders(topic: str, order: dict[str, Any], shop: _Shop) -> list[Event]:
    ref = _required_id(order, "id")
    recipient = order_recipient(order, shop.locale)
    skip = "test_order" if order.get("test") is True and not shop.send_test_orders else None
    if skip:
        # Not stored with the order either: its fulfillment or refund, which carry no `test`
        # flag, must not text the number a test order was placed with.
        recipient = Recipient(locale=recipient.locale, customer_id=recipient.customer_id)
    elif recipient.phone or topic == "orders/create":
        # The pipeline calls a missing or unusable number on an order it has not seen yet
        # `unknown_order`; this payload *is* the order, so the real reason is given here. A
        # later orders/* without a number still gets the one stored with the order.
        skip = _unusable_phone(recipient, shop.region)
    data = shop.data(customer=_customer_data(order), order=_order_data(order, recipient.locale))
    kind = TOPICS[topic]
    status = kind.split(".")[1]  # created, paid, cancelled, fulfilled
    # Only full-order payloads say when the order last changed: a retry of an older
    # orders/* delivery is then ignored instead of overwriting newer order context.
    ref_ = OrderRef(ref=ref, status=status, modified_at=epoch(order.get("updated_at")))
    at = epoch(order.get("updated_at")) or time.time()

    def event(kind: str, key: str, extra: dict[str, Any] | None = None) -> Event:
        data_ = {**data, **(extra or {})}
        return Event(shop.source, kind, key, recipient, data_, at, order=ref_, skip=skip)

    if topic == "orders/fulfilled":  # one message per fulfillment, shared with fulfillments/create
        return [
            event("order.fulfilled", f"fulfillment:{fid}:created", {"shipment": _shipment(f)})
            for f in _dicts(order.get("fulfillments"))
            if (fid := _id(f.get("id"))) and f.get("status") not in _FAILED_FULFILLMENT
        ]
    if topic == "orders/cancelled":  # what still waits (quiet hours) is no longer news
        cancel = {"kinds": _CANCELLED_BY_CANCEL, "reason": "order_cancelled"}
        return [
            Event(
                shop.source,
                "messages.cancel",
                f"order:{ref}:cancel_pending",
                data=cancel,
                order=ref_,
            ),
            event(kind, f"order:{ref}:{status}"),
        ]
    return [event(kind, f"order:{ref}:{status}")]


def _fulfillments(topic: str, fulfillment: dict[str, Any], shop: _Shop) -> list[Event]:
    fid = _required_id(fulfillment, "id")
    order = OrderRef(ref=_required_id(fulfillment, "order_id"))  # no modified_at: not the order
    at = epoch(fulfillment.get("updated_at")) or time.time()
    shipment = _shipment(fulfillment)
    if topic == "fulfillments/create":
        if fulfillment.get("status") in _FAILED_FULFILLMENT:
            return []
        key, kind = f"fulfillment:{fid}:created", "order.fulfilled"
    else:
        status = fulfillment.get("shipment_status")
        if status not in SHIPMENT_STATUSES:  # null, label_printed, confirmed, ...: no message
            return []
        key, kind = f"fulfillment:{fid}:{status}", "shipment.updated"
        shipment["status"] = status
    # No number: the order's own recipient (the one its confirmation went to) is used.
    return [
        Event(shop.source, kind, key, Recipient(), shop.data(shipment=shipment), at, order=order)
    ]


def _fulfillment_events(topic: str, fe: dict[str, Any], shop: _Shop) -> list[Event]:
    status = fe.get("status")
    if status not in SHIPMENT_STATUSES:
        return []
    fid = _required_id(fe, "fulfillment_id")
    at = epoch(fe.get("happened_at")) or epoch(fe.get("created_at")) or time.time()
    # Same key as fulfillments/update with that shipment_status: each status once.
    return [
        Event(
            shop.source,
            "shipment.updated",
            f"fulfillment:{fid}:{status}",
            data=shop.data(shipment={"status": status}),
            occurred_at=at,
            order=OrderRef(ref=_required_id(fe, "order_id")),
        )
    ]


def _refunds(topic: str, refund: dict[str, Any], shop: _Shop) -> list[Event]:
    # A refund names neither the order nor the customer: the pipeline addresses it from the
    # stored order context, and records `unknown_order` when that order was never seen.
    total, currency = Decimal(0), None
    counted = False
    for t in _dicts(refund.get("transactions")):
        if t.get("kind") != "refund" or t.get("status") in ("failure", "error"):
            continue
        try:
            total += Decimal(str(t.get("amount")))
            counted = True
        except InvalidOperation:
            continue
        currency = currency or t.get("currency")
    amount = f"{total:.2f}" if counted else ""  # the template's money filter formats it
    return [
        Event(
            shop.source,
            "order.refunded",
            f"refund:{_required_id(refund, 'id')}",
            data=shop.data(refund={"amount": amount, "currency": currency}),
            occurred_at=epoch(refund.get("created_at")) or time.time(),
            order=OrderRef(ref=_required_id(refund, "order_id")),
        )
    ]


_CONSENT_ACTIONS = {"subscribed": "opt_in", "unsubscribed": "opt_out"}


def _customers(topic: str, customer: dict[str, Any], shop: _Shop) -> list[Event]:
    consent = as_dict(customer.get("sms_marketing_consent"))
    action = _CONSENT_ACTIONS.get(str(consent.get("state") or "").lower())
    if action is None:  # not_subscribed, pending, redacted or absent: nothing to record
        return []
    cid = _required_id(customer, "id")
    updated = consent.get("consent_updated_at")
    country = _country(as_dict(customer.get("default_address")).get("country_code"))
    evidence = {
        "platform": "shopify",
        "topic": topic,
        "customer_id": cid,
        "state": consent.get("state"),
        "opt_in_level": consent.get("opt_in_level"),
        "consent_updated_at": updated,
        "consent_collected_from": consent.get("consent_collected_from"),
    }
    return [
        Event(
            shop.source,
            "customer.consent",
            f"customer:{cid}:consent:{updated or shop.occurrence}",
            Recipient(phone=_text(customer.get("phone")), country=country, customer_id=cid),
            occurred_at=epoch(updated) or time.time(),
            consent=Consent("marketing", action, evidence),
        )
    ]


def _uninstalled(topic: str, payload: dict[str, Any], shop: _Shop) -> list[Event]:
    data = {"reason": "app_uninstalled"}
    return [Event(shop.source, "source.disabled", f"shop:uninstalled:{shop.occurrence}", data=data)]


def _privacy(topic: str, payload: dict[str, Any], shop: _Shop) -> list[Event]:
    if topic == "shop/redact":
        key = f"shop:redact:{shop.occurrence}"
        return [Event(shop.source, "privacy.redact", key, data={"scope": "source"})]
    customer = as_dict(payload.get("customer"))
    cid = _id(customer.get("id")) or "unknown"
    recipient = Recipient(phone=_text(customer.get("phone")), customer_id=cid)
    if topic == "customers/redact":
        refs = [r for r in map(_id, payload.get("orders_to_redact") or []) if r]
        key = f"customer:{cid}:redact:{shop.occurrence}"
        return [Event(shop.source, "privacy.redact", key, recipient, {"order_refs": refs})]
    request_id = _id(as_dict(payload.get("data_request")).get("id")) or shop.occurrence
    key = f"customer:{cid}:data_request:{request_id}"
    return [Event(shop.source, "privacy.data_request", key, recipient)]


_HANDLERS: dict[str, Callable[[str, dict[str, Any], _Shop], list[Event]]] = {
    "orders/create": _orders,
    "orders/paid": _orders,
    "orders/cancelled": _orders,
    "orders/fulfilled": _orders,
    "fulfillments/create": _fulfillments,
    "fulfillments/update": _fulfillments,
    "fulfillment_events/create": _fulfillment_events,
    "refunds/create": _refunds,
    "customers/create": _customers,
    "customers/update": _customers,
    "customers_marketing_consent/update": _customers,
    "app/uninstalled": _uninstalled,
    "customers/data_request": _privacy,
    "customers/redact": _privacy,
    "shop/redact": _privacy,
}


def order_recipient(order: dict[str, Any], default_locale: str | None = None) -> Recipient:
    """The first number given, in this order, read with its own address's country."""
    shipping, billing = (
        as_dict(order.get("shipping_address")),
        as_dict(order.get("billing_address")),
    )
    customer = as_dict(order.get("customer"))
    home = as_dict(customer.get("default_address"))
    candidates = (
        (order.get("phone"), shipping or billing),  # the checkout contact number
        (shipping.get("phone"), shipping),
        (billing.get("phone"), billing),
        (customer.get("phone"), home or shipping or billing),
        (home.get("phone"), home),
    )
    phone, address = next(((p, a) for p, a in candidates if _text(p)), (None, {}))
    names = _customer_data(order)
    return Recipient(
        phone=_text(phone),
        name=names["name"] or None,
        locale=_locale(order.get("customer_locale")) or default_locale,
        country=_country(address.get("country_code")),
        customer_id=_id(customer.get("id")),
    )


def _unusable_phone(recipient: Recipient, region: str) -> str | None:
    try:
        normalize(recipient.phone, region, recipient.country)
    except PhoneError as exc:
        return exc.reason  # no_phone, invalid_phone, landline
    return None


def _customer_data(order: dict[str, Any]) -> dict[str, str]:
    for person in (
        as_dict(order.get("customer")),
        as_dict(order.get("shipping_address")),
        as_dict(order.get("billing_address")),
    ):
        first, last = _text(person.get("first_name")), _text(person.get("last_name"))
        if first or last:
            return {"first_name": first or "", "name": " ".join(filter(None, (first, last)))}
    return {"first_name": "", "name": ""}


def _order_data(order: dict[str, Any], locale: str | None) -> dict[str, Any]:
    # What the buyer paid, in the buyer's currency (presentment), when the payload says so.
    paid = as_dict(as_dict(order.get("total_price_set")).get("presentment_money"))
    amount, currency = paid.get("amount"), paid.get("currency_code")
    if not (amount and currency):
        amount, currency = order.get("total_price"), order.get("currency")
    number = _text(order.get("name")) or (
        f"#{order['order_number']}" if "order_number" in order else ""
    )
    return {
        "number": number,
        "total": _format_money(amount, currency, locale),
        "currency": currency or "",
        "status_url": _text(order.get("order_status_url")) or "",
        "items": [
            {
                "name": _text(li.get("name")) or _text(li.get("title")) or "",
                "quantity": li.get("quantity"),
            }
            for li in _dicts(order.get("line_items"))
        ],
    }


def _shipment(fulfillment: dict[str, Any]) -> dict[str, Any]:
    def first(one: str, many: str) -> str:
        values = [fulfillment.get(one), *(fulfillment.get(many) or [])]
        return next((v for v in map(_text, values) if v), "")

    return {
        "carrier": _text(fulfillment.get("tracking_company")) or "",
        "tracking_number": first("tracking_number", "tracking_numbers"),
        "tracking_url": first("tracking_url", "tracking_urls"),
    }


def _format_money(amount: Any, currency: Any, locale: str | None) -> str:
    if amount in (None, ""):
        return ""
    try:  # the templates' own `money` filter, so both format alike ("$25.00", "25,00 €")
        return money({"recipient": {"locale": locale}}, str(amount), str(currency or "USD"))
    except Exception:  # Babel's errors for an unknown currency or locale vary
        return f"{amount} {currency or ''}".strip()


# --- Small readers for payloads that may carry nulls or odd types ---------------------------


def _id(value: Any) -> str | None:
    """An id as a string, exactly (never through a float); gid://shopify/X/123 gives 123."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip().rsplit("/", 1)[-1]
    return None


def _required_id(payload: dict[str, Any], key: str) -> str:
    found = _id(payload.get(key))
    if found is None:
        raise PayloadError(f"payload has no usable '{key}'")
    return found


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _country(value: Any) -> str | None:
    code = value.upper() if isinstance(value, str) else None
    return code if code in phonenumbers.SUPPORTED_REGIONS else None


def _locale(value: Any) -> str | None:
    text = _text(value)
    return text if text and LOCALE.fullmatch(text) else None


# --- txsms install shopify: the GraphQL Admin API ---------------------------------------------

_LIST = """query Subscriptions($after: String) {
  webhookSubscriptions(first: 100, after: $after) {
    nodes { id topic uri }
    pageInfo { hasNextPage endCursor }
  }
}"""
_CREATE = """mutation Create($topic: WebhookSubscriptionTopic!, $sub: WebhookSubscriptionInput!) {
  webhookSubscriptionCreate(topic: $topic, webhookSubscription: $sub) {
    webhookSubscription { id topic uri }
    userErrors { field message }
  }
}"""
_UPDATE = """mutation Update($id: ID!, $sub: WebhookSubscriptionInput!) {
  webhookSubscriptionUpdate(id: $id, webhookSubscription: $sub) {
    webhookSubscription { id topic uri }
    userErrors { field message }
  }
}"""
_DELETE = """mutation Delete($id: ID!) {
  webhookSubscriptionDelete(id: $id) {
    deletedWebhookSubscriptionId
    userErrors { field message }
  }
}"""


class AdminAPI:
    """The few GraphQL Admin API calls `install` needs, authenticated by the shop's token."""

    def __init__(self, shop: Mapping[str, Any], version: str):
        base = shop.get("admin_url") or f"https://{shop['domain']}"  # admin_url: tests
        self.url = f"{base}/admin/api/{version}/graphql.json"
        self.session = requests.Session()
        self.session.headers["X-Shopify-Access-Token"] = shop["access_token"]

    def call(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.session.post(
                self.url, json={"query": query, "variables": variables or {}}, timeout=30
            )
        except requests.RequestException as exc:
            raise click.ClickException(f"cannot reach {self.url}: {exc}") from None
        try:
            body = r.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        # A bad token or version is an HTTP error; a bad query a 200 with top-level `errors`.
        if r.status_code != 200 or body.get("errors") or not isinstance(body.get("data"), dict):
            errors = body.get("errors") or r.text[:300]
            if isinstance(errors, list):
                errors = "; ".join(str(as_dict(e).get("message", e)) for e in errors)
            raise click.ClickException(f"Shopify Admin API answered {r.status_code}: {errors}")
        return body["data"]

    def subscriptions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.call(_LIST, {"after": after})["webhookSubscriptions"]
            found += page["nodes"]
            if not page["pageInfo"]["hasNextPage"]:
                return found
            after = page["pageInfo"]["endCursor"]

    def mutate(self, query: str, **variables: Any) -> list[str]:
        """Run a mutation; returns its userErrors as "field: message" lines."""
        (result,) = self.call(query, variables).values()
        return [
            f"{'.'.join(e.get('field') or []) or 'input'}: {e.get('message')}"
            for e in result.get("userErrors") or []
        ]


def _enum(topic: str) -> str:
    return topic.upper().replace("/", "_")  # orders/create -> ORDERS_CREATE


def plan(existing: list[dict[str, Any]], address: str, uninstall: bool = False) -> list[tuple]:
    """(topic, action, subscription) per topic: exists, create, update, delete or absent.

    Subscriptions of other topics, and of ours at a non-HTTP URI (Pub/Sub, EventBridge), are
    left alone; an HTTP one of ours at another address is an old address of this receiver.
    """
    steps: list[tuple] = []
    for topic in TOPICS:
        subs = [s for s in existing if s.get("topic") == _enum(topic)]
        ours = [s for s in subs if s.get("uri") == address]
        wrong = [s for s in subs if str(s.get("uri") or "").startswith(("https://", "http://"))]
        if uninstall:
            steps += [(topic, "delete", s) for s in ours] or [(topic, "absent", None)]
        elif ours:
            steps.append((topic, "exists", ours[0]))
        elif wrong:
            steps.append((topic, "update", wrong[0]))
        else:
            steps.append((topic, "create", None))
    return steps


@click.command("shopify")
@config_option
@click.option("--shop", "domain", help="Which [[shopify.shops]] entry (needed if several).")
@click.option("--address", help="Public URL of /webhooks/shopify (default: server.public_url).")
@common.dry_run_option
@common.uninstall_option
def install_command(
    config_path: str | None, domain: str | None, address: str | None, dry_run: bool, uninstall: bool
) -> None:
    """Register this receiver's Shopify webhooks (idempotent)."""
    config = load(config_path)
    shop = _pick_shop(config, domain)
    if not shop.get("access_token"):
        raise click.UsageError(f"shop {shop['domain']}: set access_token in [[shopify.shops]]")
    if address is None:
        if not config.server.public_url:
            raise click.UsageError("give --address URL or set server.public_url")
        address = f"{config.server.public_url}/webhooks/shopify"
    version = config.shopify.get("api_version") or API_VERSION
    api = AdminAPI(shop, version)
    click.echo(f"shop {shop['domain']}  address {address}  Admin API {version}")
    click.echo(f"  {'topic':<36} action")
    failures = 0
    for topic, action, sub in plan(api.subscriptions(), address, uninstall):
        done = {"create": "created", "update": "updated", "delete": "deleted"}.get(action)
        errors: list[str] = []
        if done and not dry_run:
            if action == "create":
                errors = api.mutate(
                    _CREATE, topic=_enum(topic), sub={"uri": address, "format": "JSON"}
                )
            elif action == "update":
                errors = api.mutate(_UPDATE, id=sub["id"], sub={"uri": address})
            else:
                errors = api.mutate(_DELETE, id=sub["id"])
        text = {"exists": "exists", "absent": "not registered"}.get(action) or (
            f"would {action}" if dry_run else done
        )
        if action == "update":
            text += f" (was {sub.get('uri')})"
        if errors:
            failures += 1
            text = f"FAILED {action}: " + "; ".join(errors)
        click.echo(f"  {topic:<36} {text}")
    click.echo(
        "Privacy topics (customers/data_request, customers/redact, shop/redact) are declared in\n"
        "the app's settings, not through this API: Partner or Dev Dashboard, or\n"
        f"`compliance_topics` in shopify.app.toml, with the address {address}"
    )
    if failures:
        raise click.ClickException(f"{failures} topic(s) failed (see above)")
    if not (dry_run or uninstall):
        _enable(config_path, f"shopify:{shop['domain']}")


def _enable(config_path: str | None, source: str) -> None:
    """Installing again undoes what app/uninstalled did."""
    from txsms.core.pipeline import set_source_disabled, source_disabled

    runtime = open_runtime(config_path)
    try:
        with runtime.engine.begin() as conn:
            if source_disabled(conn, source):
                set_source_disabled(conn, source, None)
                click.echo(f"{source}: sending enabled again (it was disabled by app/uninstalled)")
    finally:
        runtime.close()


def _pick_shop(config: Config, domain: str | None) -> dict[str, Any]:
    return common.pick_account(
        config, "shopify.shops", domain, field="domain", key=shop_key, option="--shop DOMAIN"
    )


# --- txsms simulate shopify: a signed sample delivery -------------------------------------------

SAMPLE_PHONE = "+14155550100"  # a fictional number (555-01xx)
_DESTRUCTIVE = ("app/uninstalled", "customers/redact", "shop/redact")


def _fresh_id() -> int:
    return 2**53 + secrets.randbelow(2**62)  # above 2**53, as real ones are: kept exact


def sample_payload(
    topic: str, domain: str, *, phone: str, order_id: int, status: str = "in_transit"
) -> dict[str, Any]:
    """A small but realistic body for `topic`, with fresh ids (the shapes Shopify sends)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    number = 1000 + order_id % 9000
    shop_id = 548380009
    consent = {"state": "subscribed", "opt_in_level": "single_opt_in"}
    consent |= {"consent_updated_at": now, "consent_collected_from": "OTHER"}
    customer = {"id": _fresh_id(), "first_name": "Jane", "last_name": "Doe", "phone": phone}
    customer |= {"email": "jane@example.com", "sms_marketing_consent": consent}
    address = {"first_name": "Jane", "last_name": "Doe", "address1": "1 Main St"}
    address |= {"city": "Springfield", "zip": "62701", "country_code": "US", "phone": phone}
    tracking = "1Z999AA10123456784"
    fulfillment = {"id": _fresh_id(), "order_id": order_id, "status": "success"}
    fulfillment |= {"tracking_company": "UPS", "tracking_number": tracking}
    fulfillment |= {"tracking_url": f"https://www.ups.com/track?tracknum={tracking}"}
    fulfillment |= {"shipment_status": status if topic == "fulfillments/update" else None}
    fulfillment |= {"created_at": now, "updated_at": now}
    order = {"id": order_id, "admin_graphql_api_id": f"gid://shopify/Order/{order_id}"}
    order |= {"name": f"#{number}", "order_number": number, "test": False, "phone": phone}
    order |= {"email": "jane@example.com", "customer_locale": "en", "currency": "USD"}
    order |= {"total_price": "25.00", "financial_status": "paid", "fulfillment_status": None}
    order |= {"order_status_url": f"https://{domain}/{shop_id}/orders/{uuid.uuid4().hex}"}
    order |= {"line_items": [{"id": _fresh_id(), "name": "Blue T-shirt", "quantity": 1}]}
    order |= {"customer": customer, "shipping_address": address, "billing_address": address}
    order |= {"fulfillments": [], "created_at": now, "updated_at": now}
    if topic == "orders/cancelled":
        order |= {"cancelled_at": now, "cancel_reason": "customer", "financial_status": "refunded"}
    if topic == "orders/fulfilled":
        order |= {"fulfillment_status": "fulfilled", "fulfillments": [fulfillment]}
    small_customer = {"id": customer["id"], "email": customer["email"], "phone": phone}
    privacy = {"shop_id": shop_id, "shop_domain": domain, "customer": small_customer}
    refund = {"id": _fresh_id(), "order_id": order_id, "created_at": now, "note": "Sample"}
    refund["transactions"] = [
        {"id": _fresh_id(), "order_id": order_id, "kind": "refund", "status": "success"}
        | {"amount": "25.00", "currency": "USD", "gateway": "bogus"}
    ]
    return {
        "fulfillments/create": fulfillment,
        "fulfillments/update": fulfillment,
        "fulfillment_events/create": {"id": _fresh_id(), "fulfillment_id": fulfillment["id"]}
        | {"order_id": order_id, "status": status, "happened_at": now, "shop_id": shop_id},
        "refunds/create": refund,
        "customers/create": customer,
        "customers/update": customer,
        "customers_marketing_consent/update": {"id": customer["id"], "phone": phone}
        | {"sms_marketing_consent": consent},
        "app/uninstalled": {"id": shop_id, "name": "Sample shop", "myshopify_domain": domain},
        "shop/redact": {"shop_id": shop_id, "shop_domain": domain},
        "customers/redact": privacy | {"orders_to_redact": [order_id]},
        "customers/data_request": privacy
        | {"orders_requested": [order_id], "data_request": {"id": _fresh_id()}},
    }.get(topic, order)


def delivery_headers(topic: str, domain: str, secret: str, body: bytes) -> dict[str, str]:
    """The headers Shopify sends, signed, with a fresh event id."""
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Shop-Domain": domain,
        "X-Shopify-Hmac-Sha256": sign(secret, body),
        "X-Shopify-API-Version": API_VERSION,
        "X-Shopify-Webhook-Id": str(uuid.uuid4()),
        "X-Shopify-Event-Id": str(uuid.uuid4()),
        "X-Shopify-Triggered-At": datetime.now(UTC).isoformat(),
    }


@click.command("shopify")
@config_option
@click.argument("topic", type=click.Choice(sorted([*TOPICS, *PRIVACY_TOPICS])))
@click.option("--to", "phone", default=SAMPLE_PHONE, show_default=True, help="Customer's number.")
@click.option("--shop", "domain", help="Which [[shopify.shops]] entry signs (needed if several).")
@click.option("--url", help="Receiver URL (default: this config's server, /webhooks/shopify).")
@click.option(
    "--order", "order_id", type=click.IntRange(1), help="Order id (to follow an earlier order)."
)
@click.option(
    "--status",
    type=click.Choice(SHIPMENT_STATUSES),
    default="in_transit",
    show_default=True,
    help="Shipment status for fulfillments/update and fulfillment_events/create.",
)
@click.option("--yes", is_flag=True, help="Do not ask before topics that erase or disable.")
def simulate_command(
    config_path: str | None,
    topic: str,
    phone: str,
    domain: str | None,
    url: str | None,
    order_id: int | None,
    status: str,
    yes: bool,
) -> None:
    """Post a correctly signed sample TOPIC delivery to a running receiver."""
    config = load(config_path)
    shop = _pick_shop(config, domain)
    if topic in _DESTRUCTIVE and not yes:
        click.confirm(f"{topic} erases or disables data of {shop['domain']}. Continue?", abort=True)
    if url is None:
        url = common.local_url(config, "shopify")
    order_id = order_id or _fresh_id()
    body = json.dumps(
        sample_payload(topic, shop["domain"], phone=phone, order_id=order_id, status=status)
    ).encode()
    headers = delivery_headers(topic, shop["domain"], shop["secret"][0], body)
    click.echo(f"POST {url}  {topic}  event {headers['X-Shopify-Event-Id']}")
    answer = common.post_delivery(url, body, headers, timeout=10)
    try:
        text = json.dumps(answer.json(), indent=2)
    except ValueError:
        text = answer.text
    click.echo(f"{answer.status_code} {answer.reason}\n{text}")
    if topic.startswith("orders/"):
        click.echo(
            f"order id {order_id}: follow it with --order {order_id}, e.g. fulfillments/create"
        )
    if answer.status_code >= 300:
        raise SystemExit(1)
