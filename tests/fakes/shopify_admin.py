"""A fake Shopify GraphQL Admin API over real HTTP: just the webhook subscription calls.

    with FakeShopifyAdmin() as admin:
        admin.add("ORDERS_PAID", "https://old.example.com/webhooks/shopify")
        admin.reject["REFUNDS_CREATE"] = "Address for this topic has already been taken"
        ... run `txsms install shopify` with the shop's admin_url = admin.url ...
        admin.subscriptions   # what Shopify would hold now

`POST /admin/api/<version>/graphql.json` with `X-Shopify-Access-Token`. Shapes follow Shopify's:
a bad token is HTTP 401 `{"errors": "[API] Invalid API key or access token ..."}`; an unknown
version 404; an unknown topic a top-level GraphQL error; a refused input a `userErrors` entry.
The operation is recognised by the root field named in the query (enough for one client).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "shpat_fake_0123456789abcdef0123456789"
VERSIONS = ("2025-10", "2026-01", "2026-04", "2026-07", "2026-10", "unstable")
TOPICS = {  # the WebhookSubscriptionTopic values a test may meet
    "APP_UNINSTALLED",
    "CUSTOMERS_CREATE",
    "CUSTOMERS_MARKETING_CONSENT_UPDATE",
    "CUSTOMERS_UPDATE",
    "FULFILLMENTS_CREATE",
    "FULFILLMENTS_UPDATE",
    "FULFILLMENT_EVENTS_CREATE",
    "ORDERS_CANCELLED",
    "ORDERS_CREATE",
    "ORDERS_FULFILLED",
    "ORDERS_PAID",
    "ORDERS_UPDATED",
    "PRODUCTS_CREATE",
    "REFUNDS_CREATE",
}


@dataclass
class Call:
    version: str
    token: str | None
    operation: str  # webhookSubscriptions, webhookSubscriptionCreate, ...
    variables: dict[str, Any]


class FakeShopifyAdmin:
    def __init__(self, token: str = TOKEN, page_size: int = 5):
        self.token = token
        self.page_size = page_size  # small, so that clients must follow pagination
        self.subscriptions: list[dict[str, Any]] = []
        self.reject: dict[str, str] = {}  # topic -> userErrors message for its create/update
        self.calls: list[Call] = []
        self._ids = itertools.count(1_000_000_000_001)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def __enter__(self) -> FakeShopifyAdmin:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def add(self, topic: str, uri: str) -> dict[str, Any]:
        sub = {"id": f"gid://shopify/WebhookSubscription/{next(self._ids)}", "topic": topic}
        sub |= {"uri": uri, "format": "JSON"}
        with self._lock:
            self.subscriptions.append(sub)
        return sub

    def uris(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for sub in self.subscriptions:
            found.setdefault(sub["topic"], []).append(sub["uri"])
        return found

    def mutations(self) -> list[Call]:
        return [c for c in self.calls if c.operation != "webhookSubscriptions"]

    # -- GraphQL, as far as the client needs ---------------------------------------------------

    def execute(self, operation: str, v: dict[str, Any]) -> dict[str, Any]:
        if operation == "webhookSubscriptions":
            start = int(v.get("after") or 0)
            page = self.subscriptions[start : start + self.page_size]
            more = start + self.page_size < len(self.subscriptions)
            nodes = [{k: s[k] for k in ("id", "topic", "uri")} for s in page]
            info = {"hasNextPage": more, "endCursor": str(start + len(page)) if page else None}
            return {"data": {operation: {"nodes": nodes, "pageInfo": info}}}
        if operation == "webhookSubscriptionDelete":
            found = self._find(v["id"])
            if found is None:
                return _payload(operation, deletedWebhookSubscriptionId=None, errors=["id"])
            self.subscriptions.remove(found)
            return _payload(operation, deletedWebhookSubscriptionId=v["id"])
        # Variables are told apart by type, so any variable names the client picks work.
        sub_input = next((x for x in v.values() if isinstance(x, dict)), {})
        uri = sub_input.get("uri", "")
        if operation == "webhookSubscriptionCreate":
            topic = v.get("topic")
            if topic not in TOPICS:  # an enum error is a GraphQL error, not a userError
                message = f"Variable $topic of type WebhookSubscriptionTopic! got {topic!r}"
                return {"errors": [{"message": message}]}
        else:
            found = self._find(v["id"])
            if found is None:
                return _payload(operation, webhookSubscription=None, errors=["id"])
            topic = found["topic"]
        problem = self.reject.get(topic) or _uri_problem(uri)
        if not problem and any(s["topic"] == topic and s["uri"] == uri for s in self.subscriptions):
            problem = "Address for this topic has already been taken"
        if problem:
            field = ["webhookSubscription", "uri"]
            return _payload(operation, webhookSubscription=None, errors=[field], message=problem)
        if operation == "webhookSubscriptionCreate":
            sub = self.add(topic, uri)
            sub["format"] = sub_input.get("format", "JSON")
        else:
            found["uri"] = uri
            sub = found
        return _payload(operation, webhookSubscription={k: sub[k] for k in ("id", "topic", "uri")})

    def _find(self, sub_id: str) -> dict[str, Any] | None:
        return next((s for s in self.subscriptions if s["id"] == sub_id), None)


def _uri_problem(uri: str) -> str | None:
    if not uri.startswith("https://"):
        return (
            "Address protocol http:// is not supported"
            if uri.startswith("http:")
            else ("Address is invalid")
        )
    return None


def _payload(operation: str, errors: list | None = None, message: str = "", **fields: Any):
    if errors:
        user_errors = [{"field": f, "message": message or "Invalid id"} for f in errors]
    else:
        user_errors = []
    return {"data": {operation: {**fields, "userErrors": user_errors}}}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeShopifyAdmin

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        fake = self.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        match = re.fullmatch(r"/admin/api/([^/]+)/graphql\.json", self.path)
        if not match or match.group(1) not in VERSIONS:
            return self._send(404, {"errors": "Not Found"})
        token = self.headers.get("X-Shopify-Access-Token")
        try:
            request = json.loads(raw)
            query, variables = request["query"], request.get("variables") or {}
        except (ValueError, KeyError, TypeError):
            return self._send(400, {"errors": {"query": "Required parameter missing or invalid"}})
        found = re.search(r"\b(webhookSubscription(?:s|Create|Update|Delete))\s*\(", query)
        operation = found.group(1) if found else "?"
        with fake._lock:
            fake.calls.append(Call(match.group(1), token, operation, variables))
        if token != fake.token:
            message = "[API] Invalid API key or access token (unrecognized login or wrong password)"
            return self._send(401, {"errors": message})
        if not found:
            return self._send(200, {"errors": [{"message": "unsupported by the fake"}]})
        with fake._lock:
            answer = fake.execute(operation, variables)
        self._send(200, answer)
