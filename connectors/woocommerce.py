"""WooCommerce: signed order webhooks become status *transitions*, missed ones are reconciled.

WooCommerce sends the whole order (its REST v3 representation) on every save, says nothing of
what changed, coalesces and reorders deliveries, and never retries a failed one
(shared/reference/woocommerce.md §1-§3). So this module translates an order's *state* into
events whose keys name the state (`order:<id>:status:<status>`, `order:<id>:tracking:<n>`):
however many deliveries (or reconciliation passes) show that state, the pipeline dedupes them
into one message, and its per-order context drops deliveries older than one already seen.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import click
import requests
from sqlalchemy import select

from txsms.connectors import common
from txsms.connectors.base import LOCALE, Delivery, as_dict, epoch, hmac_b64
from txsms.connectors.base import Connector as _Base
from txsms.core import jsoncodec
from txsms.core.cliutil import config_option, load, open_runtime
from txsms.core.config import Config
from txsms.core.errors import PayloadError, SignatureError
from txsms.core.events import Event, OrderRef, Recipient
from txsms.core.pipeline import ingest
from txsms.core.runtime import Runtime
from txsms.core.scheduler import Job
from txsms.core.storage import cursors, insert_ignore

log = logging.getLogger(__name__)

#: status -> event kind ("" sends nothing). `status_events` in a store's config overrides it.
#: processing -> order.paid only: an order first seen already processing (card payments skip
#: on-hold) gets one confirmation, not "received" and "paid" at once.
DEFAULT_STATUS_EVENTS: dict[str, str] = {
    "pending": "",
    "failed": "",
    "checkout-draft": "",  # the Block Checkout's draft leaks through order.updated (#66995)
    "on-hold": "order.created",
    "processing": "order.paid",
    "completed": "order.fulfilled",
    "cancelled": "order.cancelled",
    "refunded": "order.refunded",
}
#: Orders in these states are not (or no longer) going anywhere: tracking meta is not announced.
NOT_SHIPPING = {"checkout-draft", "pending", "failed", "cancelled", "refunded", "trash"}
#: An order that ends this way cancels its messages of these kinds that are still waiting.
ENDED = ("cancelled", "refunded", "failed")
ENDED_CANCELS = ("order.created", "order.paid", "order.fulfilled", "shipment.updated")
TRACKING_META = "_wc_shipment_tracking_items"  # official Shipment Tracking and AST alike
#: Predefined providers store only a name; both plugins build the link at display time.
TRACKING_URLS = {
    "ups": "https://www.ups.com/track?tracknum={}",
    "usps": "https://tools.usps.com/go/TrackConfirmAction?tLabels={}",
    "fedex": "https://www.fedex.com/fedextrack/?trknbr={}",
    "dhl": "https://www.dhl.com/global-en/home/tracking.html?tracking-id={}",
    "dhlexpress": "https://www.dhl.com/global-en/home/tracking.html?tracking-id={}",
    "royalmail": "https://www.royalmail.com/track-your-item#/tracking-results/{}",
}
TOPICS = ("order.created", "order.updated")  # what `install` registers
API = "/wp-json/wc/v3"
PER_PAGE = 100  # the REST API's maximum
FIRST_LOOK_BACK = timedelta(hours=24)  # reconciliation without a cursor or --since
OVERLAP = timedelta(minutes=5)  # re-read a little before the cursor: keys make it free
SAFE_PORTS = (80, 443, 8080)  # wp_http_validate_url refuses other ports


# -- stores ------------------------------------------------------------------------------------


def store_key(url: str) -> str:
    """`host[:port][/path]` of a store URL: X-WC-Webhook-Source is `home_url('/')`, so the
    scheme, the host's case and the trailing slash may differ from what the config says."""
    parts = urlsplit(url.strip() if "://" in url else f"https://{url.strip()}")
    host = (parts.hostname or "").lower()
    if parts.port and parts.port not in (80, 443):
        host = f"{host}:{parts.port}"
    return host + parts.path.rstrip("/")


@dataclass(frozen=True)
class Store:
    url: str  # as configured, without the trailing slash
    secrets: tuple[str, ...]  # newest first; install and simulate use the first
    name: str  # shop.name in templates
    source: str  # "woocommerce:<host>"
    consumer_key: str | None = None
    consumer_secret: str | None = None
    locale: str | None = None
    status_events: Mapping[str, str] = field(default_factory=dict)
    tracking_event: str = "order.fulfilled"
    reconcile_minutes: int | None = None

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], config: Config) -> Store:
        return cls(
            url=entry["url"].rstrip("/"),
            secrets=tuple(entry["secret"]),
            name=entry.get("name") or config.sender.name,
            source=f"woocommerce:{store_key(entry['url'])}",
            consumer_key=entry.get("consumer_key"),
            consumer_secret=entry.get("consumer_secret"),
            locale=entry.get("locale"),
            status_events={**DEFAULT_STATUS_EVENTS, **entry.get("status_events", {})},
            tracking_event=entry.get("tracking_event", "order.fulfilled"),
            reconcile_minutes=entry.get("reconcile_minutes"),
        )


def stores(config: Config) -> list[Store]:
    return [Store.from_config(s, config) for s in config.woocommerce.get("stores", [])]


def find_store(config: Config, url: str | None) -> Store:
    """The store named by --store, or the only one configured."""
    entry = common.pick_account(
        config, "woocommerce.stores", url, field="url", key=store_key, option="--store URL"
    )
    return Store.from_config(entry, config)


# -- signatures --------------------------------------------------------------------------------

# wp_specialchars_decode($secret, ENT_QUOTES), which WC_Webhook::deliver() applies to the secret
# (an admin may have saved it through a form that entity-encodes "&"). Zero-padded numeric
# forms are first normalised, then one strtr() pass: "&amp;lt;" becomes "&lt;", not "<".
_PADDED = (
    (re.compile(r"&#0*39;"), "&#039;"),
    (re.compile(r"&#x0*27;", re.I), "&#x27;"),
    (re.compile(r"&#0*34;"), "&#034;"),
    (re.compile(r"&#x0*22;", re.I), "&#x22;"),
    (re.compile(r"&#0*60;"), "&#060;"),
    (re.compile(r"&#0*62;"), "&#062;"),
    (re.compile(r"&#0*38;"), "&#038;"),
    (re.compile(r"&#x0*26;", re.I), "&#x26;"),
)
_ENTITIES = {
    "&#039;": "'", "&#x27;": "'", "&quot;": '"', "&#034;": '"', "&#x22;": '"',
    "&lt;": "<", "&#060;": "<", "&gt;": ">", "&#062;": ">",
    "&amp;": "&", "&#038;": "&", "&#x26;": "&",
}  # fmt: skip
_ENTITY = re.compile("|".join(map(re.escape, _ENTITIES)))


def wp_specialchars_decode(text: str) -> str:
    if "&" not in text:
        return text
    for pattern, normal in _PADDED:
        text = pattern.sub(normal, text)
    return _ENTITY.sub(lambda m: _ENTITIES[m.group()], text)


def sign(body: bytes, secret: str) -> str:
    """X-WC-Webhook-Signature: base64 of the raw HMAC-SHA256 of the exact body bytes."""
    return hmac_b64(wp_specialchars_decode(secret).encode("utf-8"), body)


def wp_json(payload: Any) -> bytes:
    """A body as `wp_json_encode` writes it: compact, ASCII only, "/" as "\\/". For sending
    (simulate); verification never re-serialises."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")  # "/" occurs only inside JSON strings


# -- the receiver ------------------------------------------------------------------------------

_PING = re.compile(rb"webhook_id=\d+")


class Connector(_Base):
    name = "woocommerce"
    header_prefixes = ("X-WC-Webhook-",)
    signature_header = "Signature"

    def __init__(self, config: Config):
        super().__init__(config)
        self.stores = {store_key(s.url): s for s in stores(config)}
        self.by_source = {s.source: s for s in self.stores.values()}

    def verify(self, headers: Mapping[str, str], body: bytes) -> Delivery | None:
        h = self.headers(headers)
        if not h.any_platform_header and _PING.fullmatch(body.strip()):
            return None  # the creation ping: unsigned, and it must get exactly 200
        store = self.stores.get(store_key(h["Source"]))
        if store is None:
            raise SignatureError("unknown or missing X-WC-Webhook-Source")
        expected = (sign(body, s) for s in store.secrets)
        self.check_signature(h, expected, f"signature does not match the secret of {store.url}")
        if h.mime != "application/json":
            raise PayloadError("expected Content-Type: application/json")
        topic = self.topic(h)
        # X-WC-Webhook-Delivery-ID is wp_hash(id . time()): equal within one second, so it is
        # no dedupe key. The event keys are.
        return Delivery(store.source, topic, None, {"url": store.url})

    def events(self, delivery: Delivery, body: bytes) -> list[Event]:
        try:
            payload = jsoncodec.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise PayloadError("body is not JSON") from None
        if not isinstance(payload, dict):
            raise PayloadError("body is not a JSON object")
        # order.deleted carries only {"id"}; action.* only the hook's first argument; other
        # resources are not about an order. All are acknowledged (a non-2xx would count
        # towards WooCommerce disabling the webhook) and ignored.
        if delivery.topic not in ("order.created", "order.updated", "order.restored"):
            return []
        return translate(self.by_source[delivery.source], payload)


# -- translation: one order state -> events (shared by webhooks and reconciliation) -------------


def translate(store: Store, order: Mapping[str, Any]) -> list[Event]:
    order_id = order.get("id")
    if isinstance(order_id, bool) or not isinstance(order_id, int | str) or not str(order_id):
        raise PayloadError("order without an id")
    status = order.get("status")
    if not isinstance(status, str):
        raise PayloadError("order without a status")
    modified = epoch(order.get("date_modified_gmt"))
    ref = OrderRef(ref=str(order_id), status=status, modified_at=modified)
    fields = dict(
        source=store.source,
        recipient=_recipient(store, order),
        order=ref,
        occurred_at=modified or time.time(),
    )
    data = _data(store, order)

    out: list[Event] = []
    if status in ENDED:
        # What still waits for quiet hours ("we got your order", "shipped") would only confuse
        # once the order is cancelled or refunded; the status's own message goes on.
        cancel = {"kinds": list(ENDED_CANCELS), "reason": f"order_{status}"}
        key = f"order:{order_id}:cancel:{status}"
        out.append(Event(kind="messages.cancel", key=key, data=cancel, **fields))
    tracking = [] if status in NOT_SHIPPING or not store.tracking_event else _tracking(order)
    kind = store.status_events.get(status, "")
    if kind:
        # Shipment Tracking saves its meta without firing order.updated, so the items usually
        # arrive with "completed": one "shipped" text with the number, not two.
        covered = kind in ("order.fulfilled", "shipment.updated") and bool(tracking)
        status_data = {**data, "shipment": tracking[-1]} if tracking else data
        if kind == "order.refunded":
            status_data = {**status_data, "refund": {"amount": _refunded(order)}}
        key = f"order:{order_id}:status:{status}"[:300]
        skip = "covered_by_tracking" if covered else None
        out.append(Event(kind=kind, key=key, data=status_data, skip=skip, **fields))
    for shipment in tracking:
        key = f"order:{order_id}:tracking:{shipment['tracking_number']}"[:300]
        event_data = {**data, "shipment": shipment}
        out.append(Event(kind=store.tracking_event, key=key, data=event_data, **fields))
    return out


def _meta(order: Mapping[str, Any], key: str) -> Any:
    for item in order.get("meta_data") or []:
        if isinstance(item, dict) and item.get("key") == key:
            return item.get("value")
    return None


def _recipient(store: Store, order: Mapping[str, Any]) -> Recipient:
    billing, shipping = as_dict(order.get("billing")), as_dict(order.get("shipping"))
    # Phones are free text ("(555) 555-5555"); the address's country is the dialling hint.
    if str(billing.get("phone") or "").strip():
        phone, country = str(billing["phone"]), billing.get("country") or shipping.get("country")
    elif str(shipping.get("phone") or "").strip():
        phone, country = str(shipping["phone"]), shipping.get("country") or billing.get("country")
    else:
        phone, country = None, billing.get("country") or shipping.get("country")
    person = billing if billing.get("first_name") or billing.get("last_name") else shipping
    name = " ".join(str(person.get(k) or "").strip() for k in ("first_name", "last_name"))
    customer = order.get("customer_id")
    return Recipient(
        phone=phone,
        name=name.strip() or None,
        locale=_locale(order) or store.locale,  # WooCommerce itself sends no locale
        country=str(country).upper() if country else None,
        customer_id=str(customer) if customer else None,  # 0 is a guest
    )


def _locale(order: Mapping[str, Any]) -> str | None:
    for key in ("wpml_language", "locale"):
        value = _meta(order, key)
        if isinstance(value, str) and LOCALE.fullmatch(value):
            return value.replace("_", "-")
    return None


def _data(store: Store, order: Mapping[str, Any]) -> dict[str, Any]:
    person = as_dict(order.get("billing"))
    if not (person.get("first_name") or person.get("last_name")):
        person = as_dict(order.get("shipping"))
    first = str(person.get("first_name") or "").strip()
    items = [
        # REST v3 sends product names HTML-encoded ("Ship Your Idea &ndash; Color: Black").
        {"name": html.unescape(str(i.get("name") or "")), "quantity": i.get("quantity") or 0}
        for i in order.get("line_items") or []
        if isinstance(i, dict)
    ]
    return {
        "shop": {"name": store.name},
        "customer": {
            "first_name": first,
            "name": f"{first} {str(person.get('last_name') or '').strip()}".strip(),
        },
        "order": {
            "number": str(order.get("number") or order.get("id")),
            "total": str(order.get("total") or ""),  # `money` formats it with the currency
            "currency": str(order.get("currency") or ""),
            "items": items,
        },
    }


def _refunded(order: Mapping[str, Any]) -> str:
    """What was refunded: the refunds' totals (negative strings), else the order total."""
    try:
        total = sum((-Decimal(str(r.get("total"))) for r in order.get("refunds") or []), Decimal(0))
    except (InvalidOperation, AttributeError):
        total = Decimal(0)
    return f"{total:.2f}" if total > 0 else str(order.get("total") or "")


def _tracking(order: Mapping[str, Any]) -> list[dict[str, str]]:
    items = _meta(order, TRACKING_META)
    if isinstance(items, dict):  # a PHP array with gaps in its keys is a JSON object
        items = list(items.values())
    shipments: dict[str, dict[str, str]] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not str(item.get("tracking_number") or "").strip():
            continue
        number = str(item["tracking_number"]).strip()
        carrier = str(item.get("custom_tracking_provider") or item.get("tracking_provider") or "")
        template = TRACKING_URLS.get(re.sub(r"[^a-z]", "", carrier.lower()))
        url = item.get("custom_tracking_link") or item.get("formatted_tracking_link") or ""
        shipments[number] = {
            "carrier": carrier,
            "tracking_number": number,
            "tracking_url": str(url) or (template.format(number) if template else ""),
            "status": "in_transit",
        }
    return list(shipments.values())


# -- the REST API (reconciliation, install) ----------------------------------------------------


class WooError(click.ClickException):
    """A REST call that failed, with WooCommerce's own code and message."""


class Rest:
    """`/wp-json/wc/v3` with the store's consumer key and secret as HTTP Basic auth, which
    WooCommerce accepts over HTTPS. (Over plain HTTP it wants OAuth 1.0a signatures.)"""

    def __init__(self, store: Store):
        if not (store.consumer_key and store.consumer_secret):
            raise click.ClickException(
                f"{store.url}: consumer_key and consumer_secret are needed for the REST API"
            )
        self.store = store
        self.session = requests.Session()
        self.session.auth = (store.consumer_key, store.consumer_secret)
        self.session.headers["User-Agent"] = "txsms"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.store.url}{API}{path}"
        try:
            resp = self.session.request(method, url, timeout=30, **kwargs)
        except requests.RequestException as exc:
            raise WooError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 300:
            try:
                err = resp.json()
                detail = f"{err.get('code')}: {err.get('message')}"
            except (ValueError, AttributeError):
                detail = resp.text[:200]
            hint = ""
            if resp.status_code == 401 and url.startswith("http:"):
                hint = " (WooCommerce takes Basic auth only over HTTPS)"
            raise WooError(f"{method} {url}: HTTP {resp.status_code} {detail}{hint}")
        return resp

    def pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a paged list (X-WP-TotalPages)."""
        page = 1
        while True:
            resp = self.call("GET", path, params={**params, "page": page, "per_page": PER_PAGE})
            items = resp.json()
            if not isinstance(items, list):
                raise WooError(f"GET {path}: expected a JSON list, got {type(items).__name__}")
            yield from (i for i in items if isinstance(i, dict))
            if page >= int(resp.headers.get("X-WP-TotalPages") or 1) or not items:
                return
            page += 1


# -- reconciliation ----------------------------------------------------------------------------


@dataclass
class Reconciled:
    store: str
    since: datetime
    first_run: bool
    orders: int = 0
    accepted: int = 0  # new events (transitions the webhooks had not delivered)
    queued: int = 0  # of their messages, those pending or deferred
    cursor: datetime | None = None


def cursor_name(store: Store) -> str:
    return f"{store.source}:reconcile"


def reconcile(runtime: Runtime, store: Store, *, since: datetime | None = None) -> Reconciled:
    """Feed every order modified since the cursor through `translate` and `ingest`, exactly as
    webhooks do: the event keys collide with delivered ones, so nothing is sent twice."""
    name = cursor_name(store)
    with runtime.engine.connect() as conn:
        saved = conn.execute(select(cursors.c.value).where(cursors.c.name == name)).scalar()
    first_run = since is None and saved is None
    if since is None:
        since = (
            datetime.fromisoformat(saved) - OVERLAP
            if saved
            else datetime.now(UTC) - FIRST_LOOK_BACK
        )
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    result = Reconciled(store.url, since, first_run)
    params = {
        "modified_after": since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "dates_are_gmt": "true",
    }
    newest = epoch(saved) if saved else None
    for order in Rest(store).pages("/orders", params):
        result.orders += 1
        try:
            batch = translate(store, order)
        except PayloadError as exc:
            log.warning("%s: order skipped: %s", store.url, exc)
            continue
        for r in ingest(runtime, batch) or []:
            result.accepted += r.status == "accepted"
            result.queued += sum(d.status in ("pending", "deferred") for d in r.messages)
        modified = epoch(order.get("date_modified_gmt"))
        newest = max(filter(None, (newest, modified)), default=None)
    if newest is not None:  # the store's own clock, so our clock's skew does not matter
        result.cursor = datetime.fromtimestamp(newest, UTC)
        _save_cursor(runtime, name, result.cursor.isoformat())
    return result


def _save_cursor(runtime: Runtime, name: str, value: str) -> None:
    now = time.time()
    with runtime.engine.begin() as conn:
        row = {"name": name, "value": value, "updated_at": now}
        if not insert_ignore(conn, cursors, row, ["name"]):
            conn.execute(cursors.update().where(cursors.c.name == name).values(**row))


def _reconcile_job(runtime: Runtime, store: Store) -> None:
    r = reconcile(runtime, store)
    log.info(
        "woocommerce reconcile %s: %d order(s) since %s, %d new event(s), %d message(s) queued",
        store.url,
        r.orders,
        r.since.isoformat(timespec="seconds"),
        r.accepted,
        r.queued,
    )


def background_jobs(runtime: Runtime) -> list[Job]:
    """One reconciliation job per store with `reconcile_minutes` (off by default)."""
    return [
        Job(
            f"woocommerce-reconcile-{store_key(s.url)}",
            s.reconcile_minutes * 60,
            partial(_reconcile_job, runtime, s),
        )
        for s in stores(runtime.config)
        if s.reconcile_minutes
    ]


@click.command("woocommerce")
@config_option
@click.option("--store", "store_url", help="Only this store (default: every store with keys).")
@click.option("--since", help="ISO time (UTC if no offset); default: the saved cursor.")
def reconcile_command(config_path: str | None, store_url: str | None, since: str | None) -> None:
    """Fetch orders modified since the last run and send what webhooks missed."""
    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise click.BadParameter(f"not an ISO time: {since!r}", param_hint="--since") from None
    runtime = open_runtime(config_path)
    try:
        if store_url:
            chosen = [find_store(runtime.config, store_url)]
        else:
            chosen = [s for s in stores(runtime.config) if s.consumer_key and s.consumer_secret]
            if not chosen:
                raise click.ClickException("no [[woocommerce.stores]] with consumer_key/secret")
        for store in chosen:
            r = reconcile(runtime, store, since=start)
            hours = f"{FIRST_LOOK_BACK.total_seconds() / 3600:g}"
            note = f" (first run: looked back {hours} h; --since for more)" if r.first_run else ""
            click.echo(
                f"{r.store}: {r.orders} order(s) modified since "
                f"{r.since.isoformat(timespec='seconds')}{note}; {r.accepted} new event(s), "
                f"{r.queued} message(s) queued"
            )
    finally:
        runtime.close()


# -- install -----------------------------------------------------------------------------------


def address_warnings(address: str) -> list[str]:
    """Why WordPress might refuse a delivery URL (wp_http_validate_url), before it does."""
    parts = urlsplit(address)
    warnings = []
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if port not in SAFE_PORTS:
        warnings.append(
            f"port {port}: WordPress refuses delivery URLs on ports other than 80, 443 and 8080 "
            "(the webhook will not deliver); put txsms behind a reverse proxy on 443"
        )
    try:
        ip = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        ip = None
    if parts.hostname == "localhost" or (ip is not None and not ip.is_global):
        warnings.append(
            f"{parts.hostname} is not a public address: WordPress refuses private and loopback "
            "hosts unless a plugin allows them (http_request_host_is_external)"
        )
    if parts.scheme != "https":
        warnings.append("http: the orders' personal data would cross the internet unencrypted")
    return warnings


@click.command("woocommerce")
@config_option
@click.option("--store", "store_url", help="The store's url from the config.")
@click.option("--address", help="This receiver's public URL (default: server.public_url).")
@common.dry_run_option
@common.uninstall_option
def install_command(
    config_path: str | None,
    store_url: str | None,
    address: str | None,
    dry_run: bool,
    uninstall: bool,
) -> None:
    """Register order.created and order.updated webhooks (idempotent; prints a table)."""
    config = load(config_path)
    store = find_store(config, store_url)
    address = (address or config.server.public_url or "").rstrip("/")
    if not address.startswith(("http://", "https://")):
        raise click.UsageError("give --address https://… (or set server.public_url)")
    delivery_url = f"{address}/webhooks/woocommerce"
    for warning in address_warnings(address):
        click.echo(f"warning: {warning}", err=True)
    rest = Rest(store)
    hooks = list(rest.pages("/webhooks", {"status": "all"}))

    def ours(hook: dict[str, Any]) -> bool:  # by our URL, or by the name we give ours
        name = str(hook.get("name") or "")
        return hook.get("delivery_url") == delivery_url or name.startswith("txsms ")

    rows: list[tuple[str, str, str]] = []
    if uninstall:
        for hook in filter(ours, hooks):
            if not dry_run:  # without force=true WooCommerce answers 501 (no trash for these)
                rest.call("DELETE", f"/webhooks/{hook['id']}", params={"force": "true"})
            rows.append((str(hook.get("topic")), "deleted", str(hook["id"])))
    for topic in () if uninstall else TOPICS:
        mine = [h for h in hooks if h.get("topic") == topic and ours(h)]
        # Prefer one that is already right, so fixing never turns a spare into a duplicate.
        mine.sort(
            key=lambda h: (h.get("delivery_url") != delivery_url, h.get("status") != "active")
        )
        if not mine:
            hook_id = "-"
            if not dry_run:
                new = {"name": f"txsms {topic}", "topic": topic, "delivery_url": delivery_url,
                       "secret": store.secrets[0], "status": "active"}  # fmt: skip
                hook_id = str(rest.call("POST", "/webhooks", json=new).json().get("id"))
            rows.append((topic, "created", hook_id))
            continue
        hook, fix = mine[0], {}
        if hook.get("delivery_url") != delivery_url:
            fix["delivery_url"] = delivery_url
        if hook.get("status") == "disabled":  # by failures; "paused" is the merchant's choice
            fix["status"] = "active"
        if fix and not dry_run:  # with our secret again: whatever broke it may have been that
            rest.call("PUT", f"/webhooks/{hook['id']}", json={**fix, "secret": store.secrets[0]})
        action = ("fixed " + ", ".join(fix)) if fix else f"ok ({hook.get('status')})"
        rows.append((topic, action, str(hook["id"])))
    suffix = " (dry run)" if dry_run else ""
    click.echo(f"{'topic':<14}  {'action':<28}  id")
    for topic, action, hook_id in rows:
        shown = action if action.startswith("ok") else action + suffix
        click.echo(f"{topic:<14}  {shown:<28}  {hook_id}")
    click.echo(f"delivery URL: {delivery_url}")


# -- simulate ----------------------------------------------------------------------------------


def sample_order(order_id: int, status: str, phone: str) -> dict[str, Any]:
    """A REST v3 order like the docs' order 727, modified now (so it is never stale)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    address = {"first_name": "Jane", "last_name": "Doe", "company": "", "address_1": "969 Market",
               "address_2": "", "city": "San Francisco", "state": "CA", "postcode": "94103",
               "country": "US"}  # fmt: skip
    return {
        "id": order_id,
        "parent_id": 0,
        "number": str(order_id),
        "order_key": f"wc_order_{secrets.token_hex(6)}",
        "created_via": "checkout",
        "status": status,
        "currency": "USD",
        "date_created_gmt": now,
        "date_modified_gmt": now,
        "total": "29.35",
        "customer_id": 0,
        "billing": {**address, "email": "jane@example.com", "phone": phone},
        "shipping": {**address, "phone": ""},
        "payment_method": "bacs",
        "meta_data": [],
        "line_items": [{"id": 315, "name": "Woo Single #1", "quantity": 2, "price": 3}],
        "refunds": [],
        "_links": {"self": [{"href": f"https://example.com{API}/orders/{order_id}"}]},
    }


@click.command("woocommerce")
@config_option
@click.argument("topic")
@click.option("--status", help="Order status (default: processing; order.updated: completed).")
@click.option("--to", "phone", default="+1 415 555 0100", show_default=True)
@click.option("--order-id", type=int, help="Default: a random id far above real ones.")
@click.option("--store", "store_url", help="The store to sign as (default: the only one).")
@click.option("--url", help="Receiver URL (default: http://server.host:server.port/webhooks/…).")
def simulate_command(
    config_path: str | None,
    topic: str,
    status: str | None,
    phone: str,
    order_id: int | None,
    store_url: str | None,
    url: str | None,
) -> None:
    """Post a signed delivery (order.created, order.updated, order.deleted, action.*, ping)."""
    config = load(config_path)
    store = find_store(config, store_url)
    url = url or common.local_url(config, "woocommerce")
    # A random high id: a simulated order must never consume a real order's status keys.
    order_id = order_id or secrets.randbelow(10**8) + 9 * 10**8
    if topic == "ping":  # as WordPress sends it: a form body, no X-WC headers, no signature
        body = f"webhook_id={order_id}".encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    else:
        resource, _, event = topic.partition(".")
        if topic == "order.deleted":
            payload: dict[str, Any] = {"id": order_id}
        elif resource == "action":
            payload = {"action": event, "arg": order_id}
        else:
            default = "completed" if topic == "order.updated" else "processing"
            payload = sample_order(order_id, status or default, phone)
        body = wp_json(payload)
        headers = {
            "Content-Type": "application/json",
            "X-WC-Webhook-Source": f"{store.url}/",
            "X-WC-Webhook-Topic": topic,
            "X-WC-Webhook-Resource": resource,
            "X-WC-Webhook-Event": event,
            "X-WC-Webhook-Signature": sign(body, store.secrets[0]),
            "X-WC-Webhook-ID": "0",
            "X-WC-Webhook-Delivery-ID": secrets.token_hex(16),
        }
    headers["User-Agent"] = "WooCommerce/txsms-simulate Hookshot"
    resp = common.post_delivery(url, body, headers, timeout=30)
    click.echo(f"order {order_id}: HTTP {resp.status_code} {resp.text.strip()}")
    if resp.status_code != 200:
        raise SystemExit(1)
