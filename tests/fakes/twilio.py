"""A fake Twilio Messages API over real HTTP, for tests and benchmarks.

    with FakeTwilio() as fake:
        provider = make_provider(fake.provider_config())
        fake.script(Reply(status=503), Drop())   # the next two sends; then normal answers
        ...
        fake.wait_for(lambda: len(fake.messages) == 3)

Shapes follow Twilio's: form-encoded POST with HTTP Basic auth, a 201 Message resource, error
bodies `{"code", "message", "more_info", "status"}`, the paged list with `DateSent>` filters.
Like Twilio, a message sent through a Messaging Service (no `From`) is answered with status
"accepted" and num_segments "0". Stored messages move from "queued" to "sent" (date_sent set)
as soon as they are answered, unless `auto_sent` is False.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from requests.structures import CaseInsensitiveDict

from fakes import wait_until

T = TypeVar("T")

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "fake-auth-token-5ecret-0123456789"
FROM_NUMBER = "+15005550006"  # Twilio's "valid sender" magic test number

ERRORS = {  # code -> (HTTP status, message), the texts Twilio sends
    20003: (401, "Authenticate"),
    20404: (404, "The requested resource {path} was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    20503: (503, "Service Unavailable"),
    21211: (400, "The 'To' number {to} is not a valid phone number."),
    21602: (400, "Message body is required."),
    21603: (400, "A 'From' or 'MessagingServiceSid' parameter is required to send a message."),
    21604: (400, "A 'To' phone number is required."),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21614: (400, "'To' number is not a valid mobile number"),
    30001: (400, "Queue overflow"),
}
DEFAULT_CODES = {401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}
E164 = re.compile(r"\+[1-9]\d{6,14}")


@dataclass(frozen=True)
class Reply:
    """Answer one request this way. status < 300 without `body`: a normal success."""

    status: int = 201
    code: int | None = None  # Twilio error code; default from the HTTP status (429 -> 20429)
    message: str | None = None  # default: Twilio's text for the code
    headers: dict[str, str] = field(default_factory=dict)
    body: str | bytes | dict | None = None  # sent as is instead of the generated body


@dataclass(frozen=True)
class Drop:
    """Read the request fully, keep the message (Twilio got it), close without answering.

    reset=True closes with a TCP RST (connection reset) instead of a clean FIN.
    """

    reset: bool = False


@dataclass(frozen=True)
class Delay:
    """Answer after `seconds` (the message is created on arrival), with `reply` or normally."""

    seconds: float
    reply: Reply | None = None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, str]
    form: dict[str, str]
    headers: CaseInsensitiveDict
    body: bytes
    at: float  # time.monotonic() on arrival (after the body was read)
    peer: tuple[str, int]  # the client's address: one port for many requests = keep-alive


def _rfc2822(ts: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(ts))


def _flat(qs: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}


class FakeTwilio:
    def __init__(
        self,
        account_sid: str = ACCOUNT_SID,
        auth_token: str = AUTH_TOKEN,
        *,
        delay: float = 0.0,
        auto_sent: bool = True,
        record: bool = True,
    ):
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.delay = delay  # seconds before every answer that has no scripted Delay
        self.auto_sent = auto_sent
        self.record = record  # False: keep no RecordedRequest (long benchmarks)
        self.opted_out: set[str] = set()  # sends to these get 21610, like after a STOP
        self.invalid: set[str] = set()  # sends to these get 21211
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._messages: dict[str, dict[str, Any]] = {}  # sid -> resource, in creation order
        self._scripts: dict[str, deque] = {"POST": deque(), "GET": deque()}
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeTwilio:
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        server.daemon_threads = True
        server.request_queue_size = 256  # a benchmark opens many connections at once
        server.handle_error = _quiet_handle_error.__get__(server)  # type: ignore[method-assign]
        server.server_bind()
        server.server_activate()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"FakeTwilio{self.url[6:]}"
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a Delay
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:  # keep-alive connections would otherwise outlive the server
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control and inspection --------------------------------------------------------------

    def script(self, *responses: Reply | Drop | Delay, method: str = "POST") -> None:
        """Queue answers for the next requests of `method` to Messages.json (after the auth check);
        once the queue is empty requests are answered normally."""
        with self._lock:
            self._scripts[method.upper()].extend(responses)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message Twilio would hold (including dropped and delayed answers), oldest first."""
        with self._lock:
            return [dict(m) for m in self._messages.values()]

    def set_status(self, sid: str, status: str, error_code: int | None = None) -> None:
        with self._lock:
            msg = self._messages[sid]
            msg.update(status=status, error_code=error_code, date_updated=_rfc2822(time.time()))

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Poll `predicate` (no arguments) until truthy; return its value. AssertionError at the
        deadline."""
        return wait_until(predicate, timeout=timeout)

    def provider_config(self, **overrides: Any):
        """A `ProviderConfig` pointing at this fake (kind twilio, From = FROM_NUMBER)."""
        from txsms.core.config import ProviderConfig

        values = dict(
            kind="twilio",
            base_url=self.url,
            account_sid=self.account_sid,
            auth_token=self.auth_token,
            from_=FROM_NUMBER,
        )
        values.update(overrides)
        return ProviderConfig(**values)

    # -- behaviour (called from handler threads) ---------------------------------------------

    def _record(self, req: RecordedRequest) -> None:
        if not self.record:
            return
        with self._lock:
            self._requests.append(req)

    def _next_scripted(self, method: str) -> Reply | Drop | Delay | None:
        with self._lock:
            queue = self._scripts.get(method)
            return queue.popleft() if queue else None

    def _create(self, form: dict[str, str]) -> dict[str, Any]:
        now = time.time()
        sid = "SM" + secrets.token_hex(16)
        service = form.get("MessagingServiceSid")
        via_service = bool(service) and not form.get("From")
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}"
        msg = {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": form.get("Body", ""),
            "date_created": _rfc2822(now),
            "date_sent": None,
            "date_updated": _rfc2822(now),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": "0" if via_service else "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if via_service else "queued",
            "subresource_uris": {
                "media": f"{base}/Media.json",
                "feedback": f"{base}/Feedback.json",
            },
            "to": form.get("To"),
            "uri": f"{base}.json",
        }
        with self._lock:
            self._messages[sid] = msg
            return dict(msg)

    def _mark_sent(self, sid: str) -> None:
        if not self.auto_sent:
            return
        with self._lock:
            msg = self._messages.get(sid)
            if msg and msg["status"] in ("queued", "accepted"):
                now = _rfc2822(time.time())
                msg.update(status="sent", date_sent=now, date_updated=now)
                if msg["num_segments"] == "0":
                    msg["num_segments"] = "1"

    def _list(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            msgs = [dict(m) for m in reversed(self._messages.values())]  # newest first
        for key, field_ in (("To", "to"), ("From", "from")):
            if key in query:
                msgs = [m for m in msgs if m[field_] == query[key]]
        for key, keep in (
            ("DateSent", lambda d, q: d == q),
            ("DateSent>", lambda d, q: d >= q),
            ("DateSent<", lambda d, q: d <= q),
        ):
            if key in query:
                wanted = date.fromisoformat(query[key][:10])
                msgs = [
                    m
                    for m in msgs
                    if m["date_sent"]
                    and keep(parsedate_to_datetime(m["date_sent"]).astimezone(UTC).date(), wanted)
                ]
        page = int(query.get("Page", 0))
        size = max(1, min(1000, int(query.get("PageSize", 50))))
        chunk = msgs[page * size : (page + 1) * size]
        filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

        def uri(n: int) -> str:
            return f"{path}?{urlencode({**filters, 'PageSize': size, 'Page': n})}"

        more = (page + 1) * size < len(msgs)
        return {
            "messages": chunk,
            "end": page * size + max(0, len(chunk) - 1),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1) if more else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": uri(page - 1) if page > 0 else None,
            "start": page * size,
            "uri": uri(page),
        }


def _error(code: int | None, status: int, **fmt: str) -> dict[str, Any]:
    message = ERRORS.get(code or 0, (status, f"HTTP {status}"))[1]
    return {
        "code": code,
        "message": message.format(**fmt) if fmt else message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}" if code else None,
        "status": status,
    }


def _quiet_handle_error(self, request, client_address) -> None:
    """Clients that time out and hang up are part of the tests, not errors worth a traceback."""
    if isinstance(sys.exc_info()[1], OSError):  # reset, broken pipe, closed by a Drop
        return
    ThreadingHTTPServer.handle_error(self, request, client_address)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTwilio
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "FakeTwilio/1.0"
    sys_version = ""
    wbufsize = 64 * 1024  # headers and body leave in one write...
    disable_nagle_algorithm = True  # ...and without waiting for a delayed ACK

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.fake._lock:
            self.fake._conns.discard(self.connection)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(payload, bytes):
            body, ctype = payload, "application/octet-stream"
        elif isinstance(payload, str):
            body, ctype = payload.encode(), "text/html; charset=utf-8"
        else:
            body, ctype = json.dumps(payload).encode(), "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method: str) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        form = _flat(raw.decode("utf-8", "replace")) if method == "POST" else {}
        req = RecordedRequest(
            method,
            parts.path,
            _flat(parts.query),
            form,
            CaseInsensitiveDict(self.headers.items()),
            raw,
            time.monotonic(),
            self.client_address[:2],
        )
        fake._record(req)

        expected = "Basic " + base64.b64encode(
            f"{fake.account_sid}:{fake.auth_token}".encode()
        ).decode("ascii")
        if self.headers.get("Authorization") != expected:
            return self._send(401, _error(20003, 401))
        base = f"/2010-04-01/Accounts/{fake.account_sid}/Messages"
        if parts.path == base + ".json":
            pass
        elif method == "GET" and parts.path.startswith(base + "/"):
            msg = next((m for m in fake.messages if m["uri"] == parts.path), None)
            if msg is None:
                return self._send(404, _error(20404, 404, path=parts.path))
            return self._send(200, msg)
        else:
            return self._send(404, _error(20404, 404, path=parts.path))

        action = fake._next_scripted(method)
        delay = fake.delay
        if isinstance(action, Delay):
            delay, action = action.seconds, action.reply
        if method == "GET":
            if delay:
                fake._stopping.wait(delay)
            if isinstance(action, Drop):
                return self._drop(action)
            if isinstance(action, Reply):
                return self._scripted(action)
            return self._send(200, fake._list(parts.path, req.query))

        if isinstance(action, Reply) and (action.status >= 300 or action.body is not None):
            if delay:
                fake._stopping.wait(delay)
            return self._scripted(action, to=form.get("To", ""))
        status, error = self._validate(form)
        if error:
            if delay:
                fake._stopping.wait(delay)
            return self._send(status, error)
        msg = fake._create(form)  # Twilio has it from here on, whatever happens to the answer
        fake._mark_sent(msg["sid"])  # `msg` is the snapshot answered: still queued/accepted
        if isinstance(action, Drop):
            return self._drop(action)
        if delay:
            fake._stopping.wait(delay)
        if isinstance(action, Reply):
            return self._send(action.status, msg, action.headers)
        self._send(201, msg)

    def _validate(self, form: dict[str, str]) -> tuple[int, dict | None]:
        to = form.get("To", "")
        if not to:
            return 400, _error(21604, 400)
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return 400, _error(21603, 400)
        if not form.get("Body"):
            return 400, _error(21602, 400)
        if not E164.fullmatch(to) or to in self.fake.invalid:
            return 400, _error(21211, 400, to=to)
        if to in self.fake.opted_out:
            return 400, _error(21610, 400)
        return 0, None

    def _scripted(self, reply: Reply, to: str = "") -> None:
        if reply.body is not None:
            return self._send(reply.status, reply.body, reply.headers)
        code = reply.code if reply.code is not None else DEFAULT_CODES.get(reply.status)
        payload = _error(code, reply.status, to=to, path=self.path.split("?")[0])
        if reply.message is not None:
            payload["message"] = reply.message
        self._send(reply.status, payload, reply.headers)

    def _drop(self, drop: Drop) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            if drop.reset:  # SO_LINGER 0, then close the descriptor now: the peer gets a RST
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                os.close(self.connection.detach())
            else:  # FIN now (close() would wait for rfile/wfile to let go of the socket)
                self.connection.shutdown(socket.SHUT_RDWR)


__all__ = [
    "ACCOUNT_SID",
    "AUTH_TOKEN",
    "FROM_NUMBER",
    "Delay",
    "Drop",
    "FakeTwilio",
    "RecordedRequest",
    "Reply",
]
