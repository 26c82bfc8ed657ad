"""Fake Vonage, Plivo and MessageBird APIs over real HTTP, and the signed webhooks they send.

    with FakeVonage() as fake:
        runtime = runtime_factory(provider=fake.provider_section())
        fake.script(Reply(status=200, code=1), Drop())   # the next two sends; then normal answers
        ...
        fake.receipt(PUBLIC + "/webhooks/providers/vonage/status", msg_id, "delivered").send(client)

The machinery is FakeTwilio's: its lifecycle, scripting and recording methods are borrowed (not
copied), and `Reply`, `Drop` and `Delay` mean what they mean there. A `Reply` with a `code` or
an error status answers in the provider's own error shape: Vonage HTTP 200 with a non-zero
`status` per part (`Reply(status=200, code=1)` is "throttled"), Plivo `{"api_id", "error"}`,
MessageBird `{"errors": [{"code", "description", "parameter"}]}`.

Webhooks are signed by this module's own implementation of each scheme, written apart from
txsms's; test_providers_more.py pins both to the reference vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from requests.structures import CaseInsensitiveDict

from fakes.twilio import Delay, Drop, FakeTwilio, RecordedRequest, Reply, _flat, _quiet_handle_error
from fakes.twilio import _Handler as _TwilioHandler

Answer = tuple[int, Any]  # HTTP status and a payload for _Handler._send


@dataclass(frozen=True)
class Request(RecordedRequest):
    json: Any = None  # the parsed body of a JSON request


@dataclass(frozen=True)
class Webhook:
    """One callback as the provider sends it, to replay through Flask's test client."""

    method: str
    url: str  # the public URL the provider calls, query included
    headers: dict[str, str]
    body: bytes = b""

    def send(self, client):
        parts = urlsplit(self.url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return client.open(path, method=self.method, data=self.body, headers=self.headers)


def webhook(method: str, url: str, params: dict[str, str], *, as_json: bool = False) -> Webhook:
    """Params as a GET query, a POST form or a POST JSON body, unsigned."""
    if method == "GET":
        return Webhook("GET", f"{url}{'&' if '?' in url else '?'}{urlencode(params)}", {})
    if as_json:
        return Webhook(
            "POST", url, {"Content-Type": "application/json"}, json.dumps(params).encode()
        )
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return Webhook("POST", url, form, urlencode(params).encode())


class _Handler(_TwilioHandler):
    fake: FakeProvider

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        is_json = self.headers.get("Content-Type", "").startswith("application/json")
        form = _flat(raw.decode("utf-8", "replace")) if method == "POST" and not is_json else {}
        try:
            body = json.loads(raw) if is_json else None
        except ValueError:
            body = None
        req = Request(
            method,
            parts.path,
            _flat(parts.query),
            form,
            CaseInsensitiveDict(self.headers.items()),
            raw,
            time.monotonic(),
            self.client_address[:2],
            json=body,
        )
        self.fake._record(req)
        self.fake._answer(self, req)


class FakeProvider:
    """The shared part: a server on 127.0.0.1, scripted answers, recorded requests."""

    kind: ClassVar[str]
    send_path: str

    # FakeTwilio's generic machinery works on any fake that keeps the same state.
    stop = FakeTwilio.stop
    __exit__ = FakeTwilio.__exit__
    script = FakeTwilio.script
    requests = FakeTwilio.requests
    messages = FakeTwilio.messages
    wait_for = FakeTwilio.wait_for
    _record = FakeTwilio._record
    _next_scripted = FakeTwilio._next_scripted

    def __init__(self, *, number: str = "14155550999", delay: float = 0.0):
        self.number = number  # our number at the provider, international without +
        self.delay = delay
        self.record = True
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._messages: dict[str, dict[str, Any]] = {}
        self._scripts: dict[str, deque] = {"POST": deque(), "GET": deque()}
        self._stopping = threading.Event()
        self._conns: set = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> FakeProvider:
        name = type(self).__name__
        handler = type("Handler", (_Handler,), {"fake": self, "server_version": f"{name}/1.0"})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        server.daemon_threads = True
        server.handle_error = _quiet_handle_error.__get__(server)  # type: ignore[method-assign]
        server.server_bind()
        server.server_activate()
        self._server, self.url = server, f"http://127.0.0.1:{server.server_address[1]}"
        self._stopping.clear()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=name
        )
        self._thread.start()
        return self

    def __enter__(self) -> FakeProvider:
        return self.start()

    def provider_section(self, **extra: Any) -> dict[str, Any]:
        """The `[provider]` table pointing at this fake."""
        return {
            "kind": self.kind,
            "base_url": self.url,
            "from": self.number,
            **self.keys(),
            **extra,
        }

    def provider_config(self, **overrides: Any):
        from txsms.core.config import ProviderConfig

        values = {("from_" if k == "from" else k): v for k, v in self.provider_section().items()}
        return ProviderConfig(**{**values, **overrides})

    def _answer(self, h: _Handler, req: Request) -> None:
        if req.method != "POST" or req.path != self.send_path:
            return h._send(404, {"error": f"{req.method} {req.path} not found"})
        if not self.authorized(req):
            return h._send(*self.unauthorized())
        action, delay = self._next_scripted("POST"), self.delay
        if isinstance(action, Delay):
            delay, action = action.seconds, action.reply
        params = self.params(req)
        scripted = isinstance(action, Reply) and (
            action.status >= 300 or action.body is not None or action.code is not None
        )
        answer = self.error(action, params) if scripted else self.invalid(params)
        if answer is None:
            answer = self.accept(params)  # the provider has it now, whatever becomes of the answer
            if isinstance(action, Drop):
                return h._drop(action)
            if isinstance(action, Reply):
                answer = (action.status, answer[1])
        if delay:
            self._stopping.wait(delay)
        h._send(*answer, action.headers if isinstance(action, Reply) else None)

    def _store(self, message_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            self._messages[message_id] = message

    # -- what each provider fills in -----------------------------------------------------------

    def keys(self) -> dict[str, str]:
        raise NotImplementedError

    def authorized(self, req: Request) -> bool:
        raise NotImplementedError

    def unauthorized(self) -> Answer:
        raise NotImplementedError

    def params(self, req: Request) -> dict[str, Any]:
        return req.json if isinstance(req.json, dict) else {}

    def invalid(self, params: dict[str, Any]) -> Answer | None:
        raise NotImplementedError

    def accept(self, params: dict[str, Any]) -> Answer:
        raise NotImplementedError

    def error(self, reply: Reply, params: dict[str, Any]) -> Answer:
        raise NotImplementedError


def _basic(req: Request) -> tuple[str, str] | None:
    value = req.headers.get("Authorization", "")
    if not value.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(value[6:]).decode().partition(":")
    return user, password


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


# -- Vonage ------------------------------------------------------------------------------------

VONAGE_KEY, VONAGE_SECRET = "abcd1234", "vonage-api-5ecret-0123"
VONAGE_SIGNATURE_SECRET = "vonage-signature-5ecret-0123456789"
VONAGE_ERRORS = {  # status -> error-text: the API spec's names, but 4 as Vonage words it
    1: "Throttled",
    2: "Missing Parameters",
    3: "Invalid Parameters",
    4: "Bad Credentials",
    5: "Internal Error",
    6: "Invalid Message",
    7: "Number Barred",
    8: "Partner Account Barred",
    9: "Partner Quota Violation",
    10: "Too Many Existing Binds",
    15: "Invalid Sender Address",
    29: "Non-Whitelisted Destination",
    33: "Number De-activated",
}


def vonage_sign(params: dict[str, str], secret: str, method: str = "sha256") -> str:
    """Vonage's `sig`, written again from vonage-http-client's `Auth.sign_params`."""
    text = "".join(
        "&" + key + "=" + re.sub("[&=]", "_", str(params[key]))
        for key in sorted(params)
        if key != "sig"
    )
    if method == "md5hash":
        return hashlib.md5((text + secret).encode()).hexdigest()
    return hmac.new(secret.encode(), text.encode(), method).hexdigest()


def sms_parts(text: str, unicode: bool) -> int:
    """How many parts Vonage would split `text` into (close enough for a fake)."""
    if unicode:
        units, single, part = len(text.encode("utf-16-le")) // 2, 70, 67
    else:
        units, single, part = len(text) + sum(c in "^{}\\[~]|€\f" for c in text), 160, 153
    return 1 if units <= single else -(-units // part)


class FakeVonage(FakeProvider):
    kind = "vonage"
    send_path = "/sms/json"

    def __init__(self, *, signature_method: str = "sha256", **kwargs: Any):
        super().__init__(**kwargs)
        self.api_key, self.api_secret = VONAGE_KEY, VONAGE_SECRET
        self.signature_secret, self.signature_method = VONAGE_SIGNATURE_SECRET, signature_method

    def keys(self) -> dict[str, str]:
        return {
            "api_key": self.api_key,
            "api_secret": self.api_secret,
            "signature_secret": self.signature_secret,
            "signature_method": self.signature_method,
        }

    def params(self, req: Request) -> dict[str, Any]:
        return req.form

    def authorized(self, req: Request) -> bool:
        given = _basic(req) or (req.form.get("api_key"), req.form.get("api_secret"))
        return given == (self.api_key, self.api_secret)

    def unauthorized(self) -> Answer:  # Vonage answers every error with 200
        return 200, _vonage_error(4)

    def invalid(self, p: dict[str, Any]) -> Answer | None:
        for name in ("from", "to", "text"):
            if not p.get(name):
                return 200, _vonage_error(2, f"Missing {name} param")
        if not re.fullmatch(r"\d{7,15}", p["to"]):  # E.164 without the +
            return 200, _vonage_error(3, "Invalid to address")
        return None

    def accept(self, p: dict[str, Any]) -> Answer:
        count = sms_parts(p["text"], p.get("type") == "unicode")
        ids = [secrets.token_hex(8).upper() for _ in range(count)]  # one per part
        self._store(ids[0], {**p, "message-id": ids[0], "message-ids": ids})
        part = {"to": p["to"], "status": "0", "remaining-balance": "12.50", "network": "310260"}
        part["message-price"] = "0.03330000"
        if p.get("client-ref"):
            part["client-ref"] = p["client-ref"]
        messages = [{**part, "message-id": i} for i in ids]
        return 200, {"message-count": str(count), "messages": messages}

    def error(self, reply: Reply, p: dict[str, Any]) -> Answer:
        if reply.body is not None:
            return reply.status, reply.body
        if reply.code is None:  # a gateway in front of Vonage, not Vonage
            return reply.status, f"<html><body>{reply.status}</body></html>"
        return reply.status, _vonage_error(reply.code, reply.message)

    def inbound(self, url: str, text: str, sender: str = "14155550100", **kw: Any) -> Webhook:
        params = {
            "msisdn": sender,
            "to": self.number,
            "messageId": secrets.token_hex(8).upper(),
            "text": text,
            "type": "text",
            "keyword": (text.split() or [""])[0].upper(),
            "message-timestamp": _now(),
            "api-key": self.api_key,
        }
        return self.signed(url, params, **kw)

    def receipt(
        self, url: str, message_id: str, status: str, err_code: str = "0", **kw: Any
    ) -> Webhook:
        params = {
            "msisdn": "14155550100",
            "to": self.number,
            "network-code": "310260",
            "messageId": message_id,
            "price": "0.03330000",
            "status": status,
            "scts": time.strftime("%y%m%d%H%M", time.gmtime()),
            "err-code": err_code,
            "api-key": self.api_key,
            "message-timestamp": _now(),
        }
        return self.signed(url, params, **kw)

    def signed(
        self,
        url: str,
        params: dict[str, str],
        *,
        method: str = "POST",
        as_json: bool = False,
        timestamp: float | None = None,
        secret: str | None = None,
    ) -> Webhook:
        """Vonage's signed webhook: `timestamp`, `nonce` and an upper-case `sig` join the params."""
        params = {
            **params,
            "timestamp": str(int(timestamp or time.time())),
            "nonce": str(uuid.uuid4()),
        }
        params["sig"] = vonage_sign(
            params, secret or self.signature_secret, self.signature_method
        ).upper()
        return webhook(method, url, params, as_json=as_json)


def _vonage_error(status: int, text: str | None = None) -> dict[str, Any]:
    return {
        "message-count": "1",
        "messages": [{"status": str(status), "error-text": text or VONAGE_ERRORS[status]}],
    }


# -- Plivo -------------------------------------------------------------------------------------

PLIVO_AUTH_ID, PLIVO_AUTH_TOKEN = "MAODUMMY0123456789AB", "plivo-auth-t0ken-0123456789abcdef"


def plivo_v3_sign(
    auth_token: str, method: str, url: str, params: dict[str, str], nonce: str
) -> str:
    """X-Plivo-Signature-V3, written again from plivo-python's utils/signature_v3.py."""
    scheme, netloc, path, query, _ = urlsplit(url)
    base = urlunsplit((scheme, netloc, path, "", ""))
    query_params = {k: sorted(v) for k, v in parse_qs(query, keep_blank_values=True).items()}
    if method == "GET":
        query_params.update({k: [v] for k, v in params.items() if k not in query_params})
        params = {}
    sorted_query = "&".join(f"{k}={v}" for k in sorted(query_params) for v in query_params[k])
    if sorted_query or params:
        base += "?" + sorted_query
    if sorted_query and params:
        base += "."
    base += "".join(k + str(params[k]) for k in sorted(params))
    digest = hmac.new(auth_token.encode(), (base + "." + nonce).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class FakePlivo(FakeProvider):
    kind = "plivo"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.auth_id, self.auth_token = PLIVO_AUTH_ID, PLIVO_AUTH_TOKEN
        self.send_path = f"/v1/Account/{self.auth_id}/Message/"
        self._sequence = 0

    def keys(self) -> dict[str, str]:
        return {"auth_id": self.auth_id, "auth_token": self.auth_token}

    def authorized(self, req: Request) -> bool:
        return _basic(req) == (self.auth_id, self.auth_token)

    def unauthorized(self) -> Answer:
        return 401, {"api_id": str(uuid.uuid4()), "error": "authentication failed"}

    def invalid(self, p: dict[str, Any]) -> Answer | None:
        for name in ("src", "dst", "text"):
            if not p.get(name):
                return 400, {"api_id": str(uuid.uuid4()), "error": f"{name} parameter is required"}
        if p["src"] == p["dst"]:
            return 400, {"api_id": str(uuid.uuid4()), "error": "src and dst cannot be the same"}
        return None

    def accept(self, p: dict[str, Any]) -> Answer:
        message_uuid = str(uuid.uuid4())
        self._store(message_uuid, {**p, "message_uuid": message_uuid})
        return 202, {
            "api_id": str(uuid.uuid4()),
            "message": "message(s) queued",
            "message_uuid": [message_uuid],
        }

    def error(self, reply: Reply, p: dict[str, Any]) -> Answer:
        if reply.body is not None:
            return reply.status, reply.body
        return reply.status, {
            "api_id": str(uuid.uuid4()),
            "error": reply.message or f"HTTP {reply.status}",
        }

    def inbound(self, url: str, text: str, sender: str = "14155550100", **kw: Any) -> Webhook:
        params = {"From": sender, "To": self.number, "Text": text, "Type": "sms"}
        params.update(
            MessageUUID=str(uuid.uuid4()), Units="1", TotalRate="0.00000", TotalAmount="0.00000"
        )
        return self.signed(url, params, **kw)

    def receipt(
        self,
        url: str,
        message_uuid: str,
        status: str,
        error_code: str | None = None,
        units: str = "1",
        **kw: Any,
    ) -> Webhook:
        self._sequence += 1
        params = {
            "MessageUUID": message_uuid,
            "ParentMessageUUID": message_uuid,
            "PartInfo": f"1 of {units}",
            "To": "14155550100",
            "From": self.number,
            "Type": "sms",
            "Status": status,
            "Units": units,
            "TotalRate": "0.00500",
            "TotalAmount": f"{0.005 * int(units):.5f}",
            "MCC": "310",
            "MNC": "260",
            "Sequence": str(self._sequence),
            "MessageTime": _now(),
            **({"ErrorCode": error_code} if error_code else {}),
        }
        return self.signed(url, params, **kw)

    def signed(
        self, url: str, params: dict[str, str], *, method: str = "POST", token: str | None = None
    ) -> Webhook:
        """V3 and V2 signatures, as Plivo sends both; the nonce is random digits."""
        hook = webhook(method, url, params)
        nonce, token = str(secrets.randbelow(10**20)).zfill(20), token or self.auth_token
        v3 = plivo_v3_sign(token, method, hook.url, params if method == "POST" else {}, nonce)
        v2_data = urlunsplit((*urlsplit(url)[:3], "", "")) + nonce
        v2 = base64.b64encode(
            hmac.new(token.encode(), v2_data.encode(), hashlib.sha256).digest()
        ).decode()
        headers = {"X-Plivo-Signature-V3": v3, "X-Plivo-Signature-V3-Nonce": nonce}
        headers.update({"X-Plivo-Signature-V2": v2, "X-Plivo-Signature-V2-Nonce": nonce})
        return Webhook(hook.method, hook.url, {**hook.headers, **headers}, hook.body)


# -- MessageBird -------------------------------------------------------------------------------

MESSAGEBIRD_ACCESS_KEY = "live_messagebird0123456789abcdef"
MESSAGEBIRD_SIGNING_KEY = "messagebird-signing-key-0123456789"


def mint_jwt(key: str, claims: dict[str, Any], alg: str = "HS256") -> str:
    """A JWT as MessageBird signs its webhooks; alg "none" leaves the signature empty."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = (
        b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    if alg == "none":
        return head + "."
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return head + "." + b64(hmac.new(key.encode(), head.encode(), digest).digest())


class FakeMessageBird(FakeProvider):
    kind = "messagebird"
    send_path = "/messages"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.access_key, self.signing_key = MESSAGEBIRD_ACCESS_KEY, MESSAGEBIRD_SIGNING_KEY

    def keys(self) -> dict[str, str]:
        return {"access_key": self.access_key, "signing_key": self.signing_key}

    def authorized(self, req: Request) -> bool:
        return req.headers.get("Authorization") == f"AccessKey {self.access_key}"

    def unauthorized(self) -> Answer:
        return 401, _mb_error(2, "Request not allowed (incorrect access_key)", "access_key")

    def invalid(self, p: dict[str, Any]) -> Answer | None:
        if not p.get("originator"):
            return 422, _mb_error(9, "originator is required", "originator")
        if not all(re.fullmatch(r"\d{7,15}", r) for r in _recipients(p) or [""]):  # MSISDNs
            return 422, _mb_error(9, "no (correct) recipients found", "recipients")
        if not p.get("body"):
            return 422, _mb_error(9, "body is required", "body")
        if p.get("datacoding", "plain") not in ("plain", "unicode", "auto"):
            return 422, _mb_error(10, "datacoding is invalid", "datacoding")
        return None

    def accept(self, p: dict[str, Any]) -> Answer:
        message_id, now = (
            secrets.token_hex(16),
            time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        )
        items = [
            {"recipient": int(r), "status": "sent", "statusDatetime": now} for r in _recipients(p)
        ]
        message = {
            "id": message_id,
            "href": f"{self.url}/messages/{message_id}",
            "direction": "mt",
            "type": "sms",
            "originator": p["originator"],
            "body": p["body"],
            "reference": p.get("reference"),
            "reportUrl": p.get("reportUrl"),
            "validity": None,
            "gateway": 10,
            "typeDetails": {},
            "datacoding": p.get("datacoding", "plain"),
            "mclass": 1,
            "scheduledDatetime": None,
            "createdDatetime": now,
            "recipients": {
                "totalCount": len(items),
                "totalSentCount": len(items),
                "totalDeliveredCount": 0,
                "totalDeliveryFailedCount": 0,
                "items": items,
            },
        }
        self._store(message_id, message)
        return 201, message

    def error(self, reply: Reply, p: dict[str, Any]) -> Answer:
        if reply.body is not None:
            return reply.status, reply.body
        code = (
            reply.code
            if reply.code is not None
            else {401: 2, 404: 20, 422: 10}.get(reply.status, 99)
        )
        return reply.status, _mb_error(code, reply.message or f"HTTP {reply.status}")

    def inbound(self, url: str, text: str, sender: str = "14155550100", **kw: Any) -> Webhook:
        params = {
            "id": secrets.token_hex(16),
            "recipient": self.number,
            "originator": sender,
            "body": text,
        }
        params["createdDatetime"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        return self.signed(url, params, **kw)

    def receipt(
        self, url: str, message_id: str, status: str, error_code: str | None = None, **kw: Any
    ) -> Webhook:
        params = {
            "id": message_id,
            "reference": "ref",
            "recipient": "14155550100",
            "status": status,
            "statusDatetime": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            **(
                {"statusErrorCode": error_code, "statusReason": "unknown subscriber"}
                if error_code
                else {}
            ),
        }
        return self.signed(url, params, **kw)

    def signed(
        self,
        url: str,
        params: dict[str, str],
        *,
        method: str = "GET",
        as_json: bool = False,
        key: str | None = None,
        claims: dict[str, Any] | None = None,
    ) -> Webhook:
        """MessageBird-Signature-JWT over the exact URL and body; `claims` override defaults."""
        hook, now = webhook(method, url, params, as_json=as_json), int(time.time())
        payload = {"iss": "MessageBird", "nbf": now, "exp": now + 60, "jti": str(uuid.uuid4())}
        payload["url_hash"] = hashlib.sha256(hook.url.encode()).hexdigest()
        if hook.body:
            payload["payload_hash"] = hashlib.sha256(hook.body).hexdigest()
        token = mint_jwt(key or self.signing_key, {**payload, **(claims or {})})
        return Webhook(
            hook.method, hook.url, {**hook.headers, "MessageBird-Signature-JWT": token}, hook.body
        )


def _recipients(p: dict[str, Any]) -> list[str]:
    """An array or a comma-separated string: MessageBird takes both."""
    value = p.get("recipients") or []
    return [str(r) for r in value] if isinstance(value, list) else str(value).split(",")


def _mb_error(code: int, description: str, parameter: str | None = None) -> dict[str, Any]:
    return {"errors": [{"code": code, "description": description, "parameter": parameter}]}


__all__ = [
    "Delay",
    "Drop",
    "FakeMessageBird",
    "FakePlivo",
    "FakeProvider",
    "FakeVonage",
    "Reply",
    "Webhook",
    "mint_jwt",
    "plivo_v3_sign",
    "vonage_sign",
    "webhook",
]
