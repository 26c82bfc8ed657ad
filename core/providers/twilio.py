"""Twilio Programmable Messaging: one form POST per message, the answer classified into an Outcome.

Credentials: Twilio Console (console.twilio.com) -> Account Info shows the Account SID (`AC...`)
and Auth Token; a sender is a number you own (`from`, E.164) or a Messaging Service
(`messaging_service_sid`, `MG...`, under Messaging -> Services). Twilio has no idempotency key
for Messages create, so anything that may have reached it is UNKNOWN, never blindly resent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape as xml_escape

from txsms.core.errors import ConfigError, TxsmsError
from txsms.core.providers.base import (
    CallbackRequest,
    InboundMessage,
    LookupUnavailable,
    Outcome,
    OutgoingMessage,
    ProviderResult,
    StatusReport,
)
from txsms.core.providers.http import HttpProvider, positive_int
from txsms.core.redact import redact_phone

if TYPE_CHECKING:
    import requests

    from txsms.core.config import ProviderConfig

OPTED_OUT_CODES = frozenset({21610})
INVALID_NUMBER_CODES = frozenset({21211, 21614, 30005, 30006, 21217, 21401, 21407})
RETRY_CODES = frozenset({20429, 30001, 30003, 30008})


class TwilioLookupError(LookupUnavailable, TxsmsError):
    """`find_sent` could not ask Twilio; the caller must not conclude "never sent"."""


class TwilioProvider(HttpProvider):
    name = "twilio"
    default_base_url = "https://api.twilio.com"
    required = ("account_sid", "auth_token")
    secret_fields, secret_mark = ("auth_token",), "[token]"
    id_name = "message sid"

    def __init__(self, config: ProviderConfig, *, public_url: str | None = None):
        super().__init__(config, public_url=public_url)
        if not (config.from_ or config.messaging_service_sid):
            raise ConfigError("set `from` or `messaging_service_sid`", key="provider.from")
        self.messages_url = (
            f"{self.base_url}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        )
        self.session.auth = (config.account_sid, config.auth_token)

    def build_request(self, message: OutgoingMessage) -> tuple[str, dict]:
        form = {"To": message.to, "Body": message.body}
        if self.config.from_:
            form["From"] = self.config.from_
        else:
            form["MessagingServiceSid"] = self.config.messaging_service_sid
        if callback := self.status_callback_url():
            form["StatusCallback"] = callback
        return self.messages_url, {"data": form}

    def parse_sent(self, resp: requests.Response, data: dict, message: OutgoingMessage):
        if not data.get("sid"):
            return None
        return ProviderResult(
            Outcome.SENT,
            provider_message_id=str(data["sid"]),
            provider_status=data.get("status"),
            segments=positive_int(data.get("num_segments")),  # "0" via a service
        )

    def parse_error(self, resp: requests.Response, data: dict):
        code = data.get("code")
        code = int(code) if isinstance(code, int | str) and str(code).isdigit() else None
        text = str(data["message"]) if data.get("message") else None
        outcome = None
        if code in OPTED_OUT_CODES:
            outcome = Outcome.OPTED_OUT
        elif code in INVALID_NUMBER_CODES:
            outcome = Outcome.INVALID_NUMBER
        elif code in RETRY_CODES:
            outcome = Outcome.RETRY
        return code, text, outcome

    def find_sent(self, to: str, since: float) -> list[dict]:
        """Messages to `to` sent on or after the UTC day of `since` (newest first, all pages).

        Twilio filters by `date_sent`, which is null while a message is still queued: settle an
        `unknown` message only after a grace period. Raises TwilioLookupError if it cannot ask.
        """
        day = datetime.fromtimestamp(since, UTC).date().isoformat()
        url, params = self.messages_url, {"To": to, "DateSent>": day}
        found: list[dict] = []
        for _ in range(20):  # at most 20 pages: far more than one number ever gets in a day
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout)
                resp.raise_for_status()
                page = resp.json()
                messages, next_uri = list(page.get("messages") or []), page.get("next_page_uri")
            except Exception as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                what = f"HTTP {status}" if status else type(exc).__name__
                raise TwilioLookupError(f"listing messages to {redact_phone(to)}: {what}") from None
            found.extend(messages)
            if not next_uri:
                break
            url, params = self.base_url + next_uri, None
        return found

    # -- the return path ------------------------------------------------------------------

    invalid_number_codes = frozenset({"30005", "30006", "21614"})
    can_lookup = True

    def verify_callback(self, request: CallbackRequest) -> bool:
        """X-Twilio-Signature, as twilio's request_validator computes it (see providers.md)."""
        given = request.headers.get("X-Twilio-Signature", "")
        if not given:
            return False
        parts = urlsplit(request.url)
        params: dict[str, list[str]] = {}
        if "bodySHA256" in dict(parse_qsl(parts.query)):
            # JSON bodies: the URL carries the body's hash and is signed alone.
            expected = hashlib.sha256(request.body).hexdigest()
            if not hmac.compare_digest(expected, dict(parse_qsl(parts.query))["bodySHA256"]):
                return False
        else:
            params = {k: list(v) for k, v in request.form.items()}
        # Twilio is inconsistent about ports: accept the URL without its port and with the
        # scheme's default port.
        default = {"https": 443, "http": 80}.get(parts.scheme, 443)
        bare = parts._replace(netloc=parts.hostname or "")
        ported = parts._replace(netloc=f"{parts.hostname}:{default}")
        return any(
            hmac.compare_digest(twilio_signature(self.config.auth_token, u.geturl(), params), given)
            for u in (bare, ported)
        )

    def parse_inbound(self, request: CallbackRequest) -> InboundMessage:
        p = request.params()
        return InboundMessage(
            sender=p.get("From", ""),
            text=p.get("Body", ""),
            recipient=p.get("To"),
            provider_message_id=p.get("MessageSid") or p.get("SmsSid"),
            handled_keyword=(p.get("OptOutType") or "").upper() or None,
        )

    def parse_status(self, request: CallbackRequest) -> list[StatusReport]:
        p = request.params()
        sid = p.get("MessageSid") or p.get("SmsSid")
        if not sid:
            return []
        status = _STATUS.get((p.get("MessageStatus") or p.get("SmsStatus") or "").lower(), "queued")
        code = p.get("ErrorCode") or None
        return [StatusReport(sid, status, code, f"Twilio error {code}" if code else None)]

    def inbound_response(self, reply: str | None) -> tuple[bytes, str]:
        inner = f"<Message>{xml_escape(reply)}</Message>" if reply else ""
        body = f'<?xml version="1.0" encoding="UTF-8"?><Response>{inner}</Response>'
        return body.encode(), "application/xml"

    def lookup(self, to: str, body: str, since: float) -> ProviderResult | None:
        for found in self.find_sent(to, since):
            if found.get("body") != body:
                continue
            created = _rfc2822(found.get("date_created"))
            if created is not None and created < since - 120:  # an earlier, separate message
                continue
            status = _STATUS.get(str(found.get("status", "")).lower(), "queued")
            outcome = Outcome.FAILED if status in ("failed", "undelivered") else Outcome.SENT
            return ProviderResult(
                outcome,
                provider_message_id=found.get("sid"),
                provider_status=found.get("status"),
                error_code=str(found["error_code"]) if found.get("error_code") else None,
                segments=positive_int(found.get("num_segments")),
            )
        return None


# Twilio's statuses, in ours. "accepted", "scheduled", "sending" are all still on the way.
_STATUS = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
    "canceled": "failed",
}


def twilio_signature(auth_token: str, url: str, params: dict[str, list[str]]) -> str:
    """base64(HMAC-SHA1(token, url + sorted name+value pairs)); values sorted, de-duplicated."""
    data = url + "".join(
        name + value for name in sorted(params) for value in sorted(set(params[name]))
    )
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _rfc2822(value: object) -> float | None:
    try:
        return parsedate_to_datetime(str(value)).timestamp() if value else None
    except (TypeError, ValueError):
        return None
