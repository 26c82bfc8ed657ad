"""MessageBird (now Bird) legacy REST API: one JSON POST per message, classified into an Outcome.

Credentials: the MessageBird dashboard's developer settings hold the live API access key and,
separately, the signing key that signs webhooks (MessageBird-Signature-JWT); neither is the
other. `from` is the originator: a number on the account or an alphanumeric name of at most 11
characters. Check that the account still has the legacy API: Bird's newer Channels API differs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    Outcome,
    OutgoingMessage,
    ProviderResult,
    StatusReport,
)
from txsms.core.providers.http import HttpProvider, http_text

if TYPE_CHECKING:
    import requests

    from txsms.core.config import ProviderConfig

log = logging.getLogger(__name__)

JWT_HEADER = "MessageBird-Signature-JWT"
LEEWAY = 1.0  # seconds of clock skew allowed on nbf and exp, as MessageBird's own validator
# The algorithms MessageBird's validator accepts; "none" and RS* never verify here.
JWT_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


class MessageBirdProvider(HttpProvider):
    name = "messagebird"
    default_base_url = "https://rest.messagebird.com"
    required = ("access_key", "from_")
    secret_fields = ("access_key", "signing_key")

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        self.messages_url = f"{self.base_url}/messages"
        self.session.headers["Authorization"] = f"AccessKey {config.access_key}"

    def build_request(self, message: OutgoingMessage) -> tuple[str, dict]:
        body = {
            "originator": self.config.from_,
            "recipients": message.to.lstrip("+"),  # an MSISDN, as MessageBird's SDK sends it
            "body": message.body,
            # Say it: "plain" would replace every character outside GSM-7.
            "datacoding": "unicode" if message.encoding == "UCS-2" else "plain",
            "reference": message.id,  # echoed in status reports and the dashboard
        }
        if callback := self.status_callback_url():
            body["reportUrl"] = callback
        return self.messages_url, {"json": body}

    def parse_sent(self, resp: requests.Response, data: dict, message: OutgoingMessage):
        if not data.get("id"):
            return None
        items = (data.get("recipients") or {}).get("items") or [{}]
        status = items[0].get("status") if isinstance(items[0], dict) else None
        return ProviderResult(Outcome.SENT, str(data["id"]), status)

    def parse_error(self, resp: requests.Response, data: dict):
        # No code in our reference means "opted out" or "no such number": the HTTP status
        # alone decides (FAILED, or RETRY/UNKNOWN for 429/503 and other 5xx).
        errors = data.get("errors") or [{}]
        first = errors[0] if isinstance(errors, list) and isinstance(errors[0], dict) else {}
        text = str(first.get("description") or http_text(resp))
        if first.get("parameter"):
            text += f" ({first['parameter']})"
        return first.get("code"), text, None

    # -- the return path ------------------------------------------------------------------

    invalid_number_codes = frozenset()  # statusErrorCodes are not in our reference: none trusted

    def verify_callback(self, request: CallbackRequest) -> bool:
        if not self.config.signing_key:
            log.warning("messagebird callback refused: set provider.signing_key")
            return False
        claims = verify_jwt(request.headers.get(JWT_HEADER, ""), self.config.signing_key)
        if claims is None or claims.get("iss") != "MessageBird":
            return False
        url_hash = hashlib.sha256(request.url.encode()).hexdigest()
        if not hmac.compare_digest(url_hash, str(claims.get("url_hash", ""))):
            return False
        payload_hash = claims.get("payload_hash")
        if not request.body:  # a hash of no body, or no hash of a body, is a forgery
            return not payload_hash
        body_hash = hashlib.sha256(request.body).hexdigest()
        return bool(payload_hash) and hmac.compare_digest(body_hash, str(payload_hash))

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        # Numbers forward as id/originator/recipient/body; short codes as mid/shortcode/message.
        p = _params(request)
        return InboundMessage(
            sender=_international(p["originator"]),
            text=p.get("body", p.get("message", "")),
            recipient=p.get("recipient") or p.get("shortcode"),
            provider_message_id=p.get("id") or p.get("mid"),
        )

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        p = _params(request)
        if not p.get("id"):
            return []
        status = _STATUS.get(p.get("status", "").lower(), "queued")
        code = p.get("statusErrorCode") or None
        text = (p.get("statusReason") or f"MessageBird error {code}") if code else None
        return [StatusReport(p["id"], status, code, text)]


_STATUS = {
    "scheduled": "queued",
    "buffered": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "expired": "undelivered",
    "delivery_failed": "failed",
}


def verify_jwt(token: str, key: str, *, now: float | None = None) -> dict | None:
    """The claims of an HMAC-signed JWT if its signature, `nbf` and `exp` hold; else None.

    `nbf` and `exp` are required (MessageBird always sets them), with LEEWAY seconds of skew."""
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(claims_b64))
        signature = _b64decode(signature_b64)
    except ValueError:  # binascii, Unicode and JSON decoding errors are all ValueErrors
        return None
    digest = JWT_DIGESTS.get(header.get("alg")) if isinstance(header, dict) else None
    if digest is None or not isinstance(claims, dict):
        return None
    signed = f"{header_b64}.{claims_b64}".encode()
    if not hmac.compare_digest(hmac.new(key.encode(), signed, digest).digest(), signature):
        return None
    nbf, exp = claims.get("nbf"), claims.get("exp")
    if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in (nbf, exp)):
        return None
    now = time.time() if now is None else now
    if nbf > now + LEEWAY or exp <= now - LEEWAY:
        return None
    return claims


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _params(request: CallbackRequest) -> dict[str, str]:
    """Query or form fields; a JSON body's top-level fields when MessageBird posts JSON."""
    if request.headers.get("Content-Type", "").startswith("application/json"):
        data = json.loads(request.body or b"{}")
        if not isinstance(data, dict):
            raise ValueError("JSON body is not an object")
        return {k: str(v) for k, v in data.items() if v is not None}
    return request.params()


def _international(number: str) -> str:
    """MessageBird's originator is an MSISDN without the +; without it, it reads as national."""
    return f"+{number}" if number.isdigit() else number
