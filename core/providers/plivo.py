"""Plivo Messaging: one JSON POST per message, the answer classified into an Outcome.

Credentials: the Plivo console (console.plivo.com) overview shows the Auth ID and Auth Token;
`from` is a Plivo number or sender ID on the account. Plivo signs every callback with the Auth
Token (X-Plivo-Signature-V3), so there is nothing to switch on. Plivo has no idempotency key
for sends, so anything that may have reached it is UNKNOWN, never blindly resent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    Outcome,
    OutgoingMessage,
    ProviderResult,
    StatusReport,
)
from txsms.core.providers.http import HttpProvider, positive_int

if TYPE_CHECKING:
    import requests

    from txsms.core.config import ProviderConfig


class PlivoProvider(HttpProvider):
    name = "plivo"
    default_base_url = "https://api.plivo.com"
    required = ("auth_id", "auth_token", "from_")
    secret_fields, secret_mark = ("auth_token",), "[token]"
    id_name = "message_uuid"

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        # The trailing slash matters.
        self.messages_url = f"{self.base_url}/v1/Account/{config.auth_id}/Message/"
        self.session.auth = (config.auth_id, config.auth_token)

    def build_request(self, message: OutgoingMessage) -> tuple[str, dict]:
        # Plivo picks GSM-7 or UCS-2 itself; there is no encoding field to set.
        body = {"src": self.config.from_, "dst": message.to, "text": message.body, "type": "sms"}
        if callback := self.status_callback_url():
            body.update(url=callback, method="POST")
        return self.messages_url, {"json": body}

    def parse_sent(self, resp: requests.Response, data: dict, message: OutgoingMessage):
        uuids = data.get("message_uuid")
        if isinstance(uuids, list) and uuids and uuids[0]:
            return ProviderResult(Outcome.SENT, str(uuids[0]), provider_status="queued")
        if data.get("invalid_number"):  # Plivo refused the number: nothing was sent
            text = "Plivo listed the number as invalid"
            return ProviderResult(Outcome.FAILED, error_code=str(resp.status_code), error_text=text)
        return None

    def parse_error(self, resp: requests.Response, data: dict):
        # Plivo's errors carry text only: the HTTP status is the code.
        error = data.get("error")
        return None, error if isinstance(error, str) else None, None

    # -- the return path ------------------------------------------------------------------

    invalid_number_codes = frozenset()  # receipt ErrorCodes are not in our reference: none trusted

    def verify_callback(self, request: CallbackRequest) -> bool:
        """X-Plivo-Signature-V3 only: V2 signs the URL alone, so a captured V2 request could be
        replayed with any body."""
        given = request.headers.get("X-Plivo-Signature-V3", "")
        nonce = request.headers.get("X-Plivo-Signature-V3-Nonce", "")
        if not given or not nonce:
            return False
        form = request.form if request.method == "POST" else {}
        base = plivo_v3_base(request.method, request.url, form)
        expected = plivo_signature_v3(self.config.auth_token, base, nonce)
        # Several signatures, comma-separated, while Plivo rotates a token.
        return any(hmac.compare_digest(expected, sig.strip()) for sig in given.split(","))

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        p = request.params()
        return InboundMessage(
            sender=_international(p["From"]),
            text=p.get("Text", ""),
            recipient=p.get("To"),
            provider_message_id=p.get("MessageUUID"),
        )

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        p = request.params()
        # ParentMessageUUID, where set, names the whole message (the id the send returned) even
        # if Plivo reports its parts; for one part it equals MessageUUID.
        uuid = p.get("ParentMessageUUID") or p.get("MessageUUID")
        if not uuid:
            return []
        status = _STATUS.get(p.get("Status", "").lower(), "queued")
        code = p.get("ErrorCode") if p.get("ErrorCode", "").strip("0") else None  # 000: no error
        text = f"Plivo error {code}" if code else None
        return [StatusReport(uuid, status, code, text, positive_int(p.get("Units")))]


_STATUS = {
    "queued": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "rejected": "failed",
}


def plivo_v3_base(method: str, url: str, params: Mapping[str, list[str]]) -> str:
    """The string Plivo signs, as plivo-python's signature_v3 builds it: the URL without its
    query, `?` and the query sorted as `k=v&k=v`; for a POST with parameters, `.` (only after
    a query) and the parameters as `kv` pairs, sorted by key, then by value."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    query = parse_qs(parts.query, keep_blank_values=True)
    post = {k: v for k, v in params.items() if v} if method.upper() == "POST" else {}
    sorted_query = "&".join(f"{k}={v}" for k in sorted(query) for v in sorted(query[k]))
    if sorted_query or post:
        base += "?" + sorted_query
    if sorted_query and post:
        base += "."
    return base + "".join(f"{k}{v}" for k in sorted(post) for v in sorted(post[k]))


def plivo_signature_v3(auth_token: str, base: str, nonce: str) -> str:
    digest = hmac.new(auth_token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def plivo_signature_v2(auth_token: str, url: str, nonce: str) -> str:
    """X-Plivo-Signature-V2: the URL without its query, then the nonce. Not accepted alone."""
    parts = urlsplit(url)
    data = f"{parts.scheme}://{parts.netloc}{parts.path}{nonce}"
    return base64.b64encode(
        hmac.new(auth_token.encode(), data.encode(), hashlib.sha256).digest()
    ).decode()


def _international(number: str) -> str:
    """Plivo's From is international without the +; without it, it would read as national."""
    return f"+{number}" if number.isdigit() else number
