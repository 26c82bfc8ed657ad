"""A fake generic JSON API over real HTTP (the `kind = "http"` CRM source), and the small JSON
server both it and the fake HubSpot are built on.

    with FakeJsonApi(auth=("basic", "user", "secret"), per_page=2) as api:
        api.upsert("7", status="booked", starts_at="2030-01-01T10:00:00Z")
        api.script(Reply(429, headers={"Retry-After": "1"}))   # the next request
        ...
        GET {api.url}/api/records?updated_since=<ISO>&page=2   → {"data": [...]} + Link: rel="next"

Records are kept in versions: an update is visible to listings only `visible_after` seconds
later (a lagging index, as search APIs have); until then the previous version is listed.
`paging` chooses how the next page is announced: "link" (a `Link: <…>; rel="next"` header),
"next_url" (`{"links": {"next": URL}}` in the body) or "cursor" (`{"meta": {"next_cursor": T}}`,
sent back as `?cursor=T`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from requests.structures import CaseInsensitiveDict


@dataclass(frozen=True)
class Reply:
    """Answer one request this way instead of normally."""

    status: int = 200
    body: Any = None  # JSON-encoded unless bytes or str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: CaseInsensitiveDict
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def iso_ms(seconds: float) -> str:
    """2026-01-02T03:04:05.678Z, as HubSpot writes times."""
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


class JsonServer:
    """A threaded HTTP server that answers JSON; subclasses implement `handle`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._requests: list[Request] = []
        self._scripts: deque[Reply] = deque()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def start(self):
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.handle_error = _quiet_handle_error.__get__(server)  # type: ignore[method-assign]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *replies: Reply) -> None:
        """Answer the next requests (after the auth check) with these, in order."""
        with self.lock:
            self._scripts.extend(replies)

    def scripted(self) -> Reply | None:
        with self.lock:
            return self._scripts.popleft() if self._scripts else None

    @property
    def requests(self) -> list[Request]:
        with self.lock:
            return list(self._requests)

    def handle(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        raise NotImplementedError


def _quiet_handle_error(self, request, client_address) -> None:
    if isinstance(sys.exc_info()[1], OSError):  # a client that hung up
        return
    ThreadingHTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: JsonServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        parts = urlsplit(self.path)
        req = Request(
            method,
            parts.path,
            {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
            CaseInsensitiveDict(self.headers.items()),
            self.rfile.read(length) if length else b"",
            time.monotonic(),
        )
        with self.fake.lock:
            self.fake._requests.append(req)
        status, payload, headers = self.fake.handle(req)
        if isinstance(payload, bytes):
            body = payload
        elif isinstance(payload, str):
            body = payload.encode()
        else:
            body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


class Versioned:
    """Records in versions: each update becomes visible to listings after its delay."""

    def __init__(self) -> None:
        self.versions: dict[str, list[tuple[float, dict[str, Any]]]] = {}

    def add(self, rid: str, version: dict[str, Any], visible_after: float) -> None:
        self.versions.setdefault(rid, []).append((time.time() + visible_after, version))

    def visible(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for history in self.versions.values():
            shown = [v for at, v in history if at <= now]
            if shown:
                out.append(shown[-1])
        return out

    def latest(self, rid: str) -> dict[str, Any] | None:
        history = self.versions.get(rid)
        return history[-1][1] if history else None


class FakeJsonApi(JsonServer):
    PATH = "/api/records"

    def __init__(
        self,
        *,
        auth: tuple[str, ...] = ("basic", "crm-user", "crm-pass-0123456789"),
        per_page: int = 50,
        paging: str = "link",
        index_delay: float = 0.0,
    ):
        super().__init__()
        self.auth = auth
        self.per_page = per_page
        self.paging = paging
        self.index_delay = index_delay
        self.records = Versioned()

    def upsert(
        self,
        rid: str,
        *,
        updated_at: float | None = None,
        visible_after: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Create or update a record (fields merge over the last version); returns it."""
        with self.lock:
            record = {**(self.records.latest(rid) or {}), **fields}
            record.update(id=rid, updated_at=iso_ms(updated_at or time.time()))
            delay = self.index_delay if visible_after is None else visible_after
            self.records.add(rid, record, delay)
            return record

    def _authorized(self, headers: CaseInsensitiveDict) -> bool:
        kind, *secret = self.auth
        if kind == "basic":
            token = base64.b64encode(f"{secret[0]}:{secret[1]}".encode()).decode()
            return headers.get("Authorization") == f"Basic {token}"
        if kind == "bearer":
            return headers.get("Authorization") == f"Bearer {secret[0]}"
        return headers.get(secret[0]) == secret[1]  # ("header", name, value)

    def handle(self, req: Request) -> tuple[int, Any, dict[str, str]]:
        if req.path != self.PATH or req.method != "GET":
            return 404, {"error": "not_found"}, {}
        if not self._authorized(req.headers):
            return 401, {"error": "unauthorized", "message": "bad credentials"}, {}
        if (reply := self.scripted()) is not None:
            return reply.status, reply.body if reply.body is not None else {}, reply.headers
        with self.lock:
            items = self.records.visible()
        since = req.query.get("updated_since")
        if since:
            floor = datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()
            items = [i for i in items if _ts(i["updated_at"]) >= floor - 1e-6]
        items.sort(key=lambda i: (_ts(i["updated_at"]), i["id"]))
        page = int(req.query.get("page") or req.query.get("cursor") or 1)
        size = int(req.query.get("per_page", self.per_page))
        chunk = items[(page - 1) * size : page * size]
        body: dict[str, Any] = {"data": chunk}
        headers: dict[str, str] = {}
        if page * size < len(items):
            query = {k: v for k, v in req.query.items() if k not in ("page", "cursor")}
            next_url = f"{self.url}{self.PATH}?{urlencode({**query, 'page': page + 1})}"
            if self.paging == "link":
                headers["Link"] = f'<{next_url}>; rel="next"'
            elif self.paging == "next_url":
                body["links"] = {"next": next_url}
            else:
                body["meta"] = {"next_cursor": str(page + 1)}
        return 200, body, headers


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


__all__ = ["FakeJsonApi", "JsonServer", "Reply", "Request", "Versioned", "iso_ms"]
