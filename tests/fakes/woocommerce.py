"""A fake WooCommerce store over real HTTP: the REST v3 orders and webhooks endpoints, and the
webhook deliveries a store sends.

    with FakeWooCommerce() as shop:
        shop.save_order(order)                    # stored, modified "now", not delivered (lost)
        shop.save_order(order, deliver=True)      # ...and POSTed to every matching webhook
        shop.url                                  # the store's home URL, http://127.0.0.1:PORT

Shapes follow shared/reference/woocommerce.md: HTTP Basic auth with the consumer key and secret
(what WooCommerce accepts over HTTPS), errors `{"code", "message", "data": {"status"}}`, paged
lists with X-WP-Total / X-WP-TotalPages, `modified_after` strictly after (a date_query "after"),
webhook creation validating topic and delivery_url, DELETE needing force=true (else 501).
Deliveries are built the way WC_Webhook::deliver() builds them, independently of the connector:
PHP's json_encode bytes and base64 HMAC-SHA256 with the entity-decoded secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import json
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

CONSUMER_KEY = "ck_" + "0123456789abcdef" * 2 + "01234567"
CONSUMER_SECRET = "cs_" + "fedcba9876543210" * 2 + "76543210"
API = "/wp-json/wc/v3"
TOPIC = re.compile(
    r"(order|customer|product|coupon)\.(created|updated|deleted|restored)|action\..+"
)


def php_json(payload: Any) -> bytes:
    """trim(wp_json_encode($payload)): compact, ASCII only, "/" escaped."""
    return (
        json.dumps(payload, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode()
    )


def gmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class FakeWooCommerce:
    def __init__(self, consumer_key: str = CONSUMER_KEY, consumer_secret: str = CONSUMER_SECRET):
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.orders: dict[int, dict[str, Any]] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, query
        self.lock = threading.Lock()
        self.clock = time.time() - 3600  # store time; every save moves it on by a second
        self._next_webhook = 1
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FakeWooCommerce:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the store's side ----------------------------------------------------------------------

    def save_order(
        self, order: dict[str, Any], *, deliver: bool = False
    ) -> list[requests.Response]:
        """Save like $order->save(): date_modified moves on; order.created or order.updated is
        delivered to the matching active webhooks when `deliver` (else the delivery is lost)."""
        with self.lock:
            self.clock += 1
            order = {**order, "date_modified_gmt": gmt(self.clock)}
            order.setdefault("date_created_gmt", gmt(self.clock))
            new = order["id"] not in self.orders
            self.orders[order["id"]] = order
        return self.deliver(order, "order.created" if new else "order.updated") if deliver else []

    def deliver(self, payload: dict[str, Any], topic: str) -> list[requests.Response]:
        responses = []
        for hook in list(self.webhooks.values()):
            if hook["topic"] != topic or hook["status"] != "active":
                continue
            body = php_json(payload)
            key = html.unescape(hook["secret"]).encode()  # wp_specialchars_decode
            resource, _, event = topic.partition(".")
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "WooCommerce/10.2.1 Hookshot (WordPress/6.8.3)",
                "X-WC-Webhook-Source": f"{self.url}/",
                "X-WC-Webhook-Topic": topic,
                "X-WC-Webhook-Resource": resource,
                "X-WC-Webhook-Event": event,
                "X-WC-Webhook-Signature": base64.b64encode(
                    hmac.new(key, body, hashlib.sha256).digest()
                ).decode(),
                "X-WC-Webhook-ID": str(hook["id"]),
                "X-WC-Webhook-Delivery-ID": hashlib.md5(
                    f"{hook['id']}{int(time.time())}".encode()
                ).hexdigest(),
            }
            responses.append(
                requests.post(hook["delivery_url"], data=body, headers=headers, timeout=10)
            )
        return responses

    # -- the REST API --------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes, auth: str):
        with self.lock:
            self.requests.append((method, path, query))
        basic = base64.b64encode(f"{self.consumer_key}:{self.consumer_secret}".encode()).decode()
        if auth != f"Basic {basic}":
            return 401, error(
                "woocommerce_rest_cannot_view", "Sorry, you cannot list resources.", 401
            )
        if path == f"{API}/orders" and method == "GET":
            after = query.get("modified_after")
            with self.lock:
                found = [
                    o for o in self.orders.values() if not after or o["date_modified_gmt"] > after
                ]
            found.sort(key=lambda o: (o["date_created_gmt"], o["id"]), reverse=True)
            return self.page(found, query)
        if path == f"{API}/webhooks" and method == "GET":
            status = query.get("status", "all")
            hooks = [public(h) for h in self.webhooks.values() if status in ("all", h["status"])]
            return self.page(hooks, query)
        if path == f"{API}/webhooks" and method == "POST":
            data = json.loads(body or b"{}")
            if not TOPIC.fullmatch(str(data.get("topic", "")).lower()):
                msg = "Webhook topic is required and must be valid."
                return 400, error("woocommerce_rest_webhook_invalid_topic", msg, 400)
            if not str(data.get("delivery_url", "")).startswith(("http://", "https://")):
                msg = "Webhook delivery URL must be a valid URL starting with http:// or https://."
                return 400, error("woocommerce_rest_webhook_invalid_delivery_url", msg, 400)
            with self.lock:
                hook_id, self._next_webhook = self._next_webhook, self._next_webhook + 1
                self.webhooks[hook_id] = {
                    "id": hook_id,
                    "name": data.get("name") or f"Webhook created on {gmt(time.time())}",
                    "status": "active",  # create ignores a given status
                    "topic": data["topic"],
                    "delivery_url": data["delivery_url"],
                    "secret": data.get("secret") or secrets.token_urlsafe(37),
                }
            return 201, public(self.webhooks[hook_id])
        match = re.fullmatch(rf"{API}/webhooks/(\d+)", path)
        if match and method in ("GET", "PUT", "DELETE"):
            hook = self.webhooks.get(int(match[1]))
            if hook is None:
                return 404, error("woocommerce_rest_webhook_invalid_id", "Invalid ID.", 404)
            if method == "PUT":
                data = json.loads(body or b"{}")
                keys = ("name", "status", "topic", "delivery_url", "secret")
                hook.update({k: v for k, v in data.items() if k in keys})
            if method == "DELETE":
                if query.get("force") != "true":
                    msg = "Webhooks do not support trashing."
                    return 501, error("woocommerce_rest_trash_not_supported", msg, 501)
                del self.webhooks[hook["id"]]
            return 200, public(hook)
        return 404, error("rest_no_route", "No route was found matching the URL.", 404)

    def page(self, items: list[dict[str, Any]], query: dict[str, str]):
        per_page, page = int(query.get("per_page", 10)), int(query.get("page", 1))
        if not 1 <= per_page <= 100:
            return 400, error("rest_invalid_param", "Invalid parameter(s): per_page", 400)
        pages = max(1, -(-len(items) // per_page))
        headers = {"X-WP-Total": str(len(items)), "X-WP-TotalPages": str(pages)}
        return 200, items[(page - 1) * per_page : page * per_page], headers


def error(code: str, message: str, status: int) -> dict[str, Any]:
    return {"code": code, "message": message, "data": {"status": status}}


def public(hook: dict[str, Any]) -> dict[str, Any]:
    """A webhook as the API shows it: the secret is write-only (context=view)."""
    resource, _, event = hook["topic"].partition(".")
    return {
        **{k: v for k, v in hook.items() if k != "secret"},
        "resource": resource,
        "event": event,
    }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeWooCommerce
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        answer = self.fake.handle(
            self.command, parts.path, query, body, self.headers.get("Authorization", "")
        )
        status, payload, headers = (*answer, {})[:3]
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


__all__ = ["CONSUMER_KEY", "CONSUMER_SECRET", "FakeWooCommerce", "gmt", "php_json"]
